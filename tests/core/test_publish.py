"""Zipping a run folder for download: large caches and the activation store left out, written atomically."""

from __future__ import annotations

import zipfile

import pytest

from helpers.publish import zip_run
from tests.saes.test_hub import IDS, run  # noqa: F401  (the fixture: a run folder with two SAEs)


def test_zip_run_leaves_out_large_caches_and_is_atomic(run):  # noqa: F811 (the fixture)
    (run / "activations" / "layer_3").mkdir(parents=True)
    (run / "activations" / "layer_3" / "shard_00000.npy").write_bytes(b"x" * 1000)
    (run / "judge_cache.sqlite").write_bytes(b"c" * 3000)
    path = zip_run(run, max_cache_mb=0.002)
    assert path == run.parent / "my_run.zip" and not list(run.parent.glob(".my_run.zip.*"))
    names = set(zipfile.ZipFile(path).namelist())
    assert {
        "my_run/run.json",
        "my_run/completions.jsonl",
        f"my_run/saes/{IDS[0]}/sae_weights.safetensors",
    } <= names
    assert not any("activations/" in n or "checkpoint.pt" in n or "judge_cache" in n for n in names)
    with_all = zipfile.ZipFile(
        zip_run(run, out=run / "inside.zip", include_activations=True, max_cache_mb=1)
    ).namelist()
    assert (
        "my_run/activations/layer_3/shard_00000.npy" in with_all and "my_run/judge_cache.sqlite" in with_all
    )
    assert "my_run/inside.zip" not in with_all
    with pytest.raises(FileNotFoundError, match="RUN_NAME"):
        zip_run(run / "nope")
