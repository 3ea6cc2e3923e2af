"""Fault injection (issue 21): the notebooks' work (tests/fault_stages.py: notebook 02's sampling, labels,
capture and corpus, 03's SAE grid, 06's explorer pass) killed with SIGKILL at a seeded write point of
every stage, given a full disk, or left with a truncated shard, then rerun as Run all would: the run
folder must end as an uninterrupted run's does (the same completions, the same files with the same
bytes, SAE weights equal). Each run is a fresh process, as after a Colab disconnect.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers.collect.completions import read_completions
from helpers.collect.store import LayerStore
from helpers.run import activations_dir
from tests.fault_stages import LAYER, STAGES

ROOT = Path(__file__).resolve().parent.parent
SEED = 21
RUN = "run"
"""Every run folder of these tests has this name: records name their run folder (e.g. an SAE's dataset_path)."""
VOLATILE = {"seconds", "tokens_per_second", "at", "updated_at", "built_at", "generated_at"}
"""Fields that hold wall-clock times: they differ between any two runs."""


def drive(run_dir: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "tests.fault_stages", str(run_dir), fault],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """An uninterrupted run, and how many write points each stage has."""
    run_dir = tmp_path_factory.mktemp("reference") / RUN
    out = ok(drive(run_dir, "count"))
    counts = json.loads(out.split("COUNTS ", 1)[1].splitlines()[0])
    assert all(counts[s] > 1 for s in STAGES), counts
    return run_dir, counts


def without_times(v):
    if isinstance(v, dict):
        return {k: without_times(x) for k, x in v.items() if k not in VOLATILE}
    if isinstance(v, list):
        return [without_times(x) for x in v]
    return v


def contents(run_dir: Path, *, skip_shards: bool = False) -> dict[str, str]:
    """Every file of the run folder: its sha256, or for a JSON file recording times its content without
    them (run.json: the stages and the settings; its history differs by design: it records the kills).
    Hidden temporaries of a killed write are left out (no reader opens them; listed by `temporaries`)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = str(p.relative_to(run_dir))
        if not p.is_file() or p.name.startswith(".") and p.name.endswith(".tmp"):
            continue
        if skip_shards and rel.startswith(("activations/", "pooled/")):
            continue
        if p.name == "run.json":
            run = json.loads(p.read_text())
            out[rel] = json.dumps(without_times({k: run.get(k) for k in ("stages", "settings", "layers")}))
        elif p.name == "complete.json":  # the explorer's resume record: file stamps hold modification times
            done = json.loads(p.read_text())
            out[rel] = json.dumps(
                without_times({k: v for k, v in done.items() if k != "settings"}), sort_keys=True
            )
        elif p.suffix == ".json" and ("saes/" in rel or "explorer/" in rel):
            out[rel] = json.dumps(without_times(json.loads(p.read_text())), sort_keys=True)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp"))


def assert_same_run(got: Path, want: Path, *, skip_shards: bool = False) -> None:
    assert read_completions(got) == read_completions(want), "the same completions, labels included"
    a, b = contents(got, skip_shards=skip_shards), contents(want, skip_shards=skip_shards)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, differ
    for weights in sorted(want.glob("saes/*/sae_weights.safetensors")):
        mine = load_file(got / weights.relative_to(want))
        theirs = load_file(weights)
        assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in theirs)


def test_a_kill_at_a_seeded_point_of_every_stage_resumes_to_the_uninterrupted_run(reference, tmp_path):
    want, counts = reference
    rng = random.Random(SEED)
    points = {stage: rng.randint(1, counts[stage]) for stage in STAGES}
    got = tmp_path / RUN
    for stage in STAGES:  # each rerun resumes the stages before and is killed inside the next one
        proc = drive(got, f"kill:{stage}:{points[stage]}")
        assert proc.returncode == -9, (stage, points[stage], proc.stderr[-3000:])
    ok(drive(got))
    assert_same_run(got, want)
    assert all(Path(t).name.endswith(".killed.tmp") for t in temporaries(got)), temporaries(got)


def test_a_full_disk_stops_with_the_fix_and_the_rerun_completes_the_same_run(reference, tmp_path):
    want, counts = reference
    rng = random.Random(SEED + 1)
    got = tmp_path / RUN
    for stage in ("collect", "train"):
        point = rng.randint(1, counts[stage])
        proc = drive(got, f"enospc:{stage}:{point}")
        assert proc.returncode == 28, (stage, point, proc.stderr[-3000:])
        said = proc.stderr.splitlines()[-1]
        assert "is full" in said and "GB free there" in said and "rerun this cell" in said, said
    ok(drive(got))
    assert_same_run(got, want)
    assert temporaries(got) == [], "a failed write removes its temporary file"


def test_a_truncated_shard_is_named_and_recollected_by_the_rerun(reference, tmp_path):
    want, _ = reference
    got = tmp_path / RUN
    shutil.copytree(want, got)
    shard = activations_dir(got, LAYER) / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a Drive sync cut short
    held = [e[0] for e in json.loads(shard.with_suffix(".json").read_text())["entries"]]
    with pytest.raises(ValueError, match=rf"shard_00001\.npy is damaged .*{held[0]}.*Rerun notebook 02"):
        LayerStore(got, LAYER)
    out = ok(drive(got))
    assert f"removed damaged shard_00001 of {activations_dir(got, LAYER)}" in out, out[-3000:]
    fixed, ref = LayerStore(got, LAYER), LayerStore(want, LAYER)
    assert sorted(fixed.completion_ids) == sorted(ref.completion_ids)
    for cid in ref.completion_ids:
        assert np.array_equal(fixed.tokens_of(cid), ref.tokens_of(cid)), cid
    assert_same_run(got, want, skip_shards=True)  # the re-collected shard is written under a new number
