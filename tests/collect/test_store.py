"""The activation store: round trips, resume, streaming under a memory budget, and failure safety."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

from helpers.collect import store
from helpers.collect.store import ActivationWriter, LayerStore
from helpers.run import activations_dir


def fake_acts(n_completions: int, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"c{i}": torch.randn(3 + i % 4, d, generator=g) for i in range(n_completions)}


def write(run_dir, acts, shard_tokens=10, layer=3):
    with ActivationWriter(run_dir, layer, shard_tokens=shard_tokens) as w:
        for cid, a in acts.items():
            w.add(cid, a, first_position=5)


def test_round_trip_and_index(tmp_path):
    acts = fake_acts(9)
    write(tmp_path, acts)
    s = LayerStore(tmp_path, 3)
    assert s.completion_ids == list(acts) and s.d_model == 8
    assert s.n_tokens == sum(len(a) for a in acts.values())
    assert len(s._paths) > 1, "several shards expected with shard_tokens=10"
    for cid, a in acts.items():
        np.testing.assert_allclose(s.tokens_of(cid), a.numpy(), atol=2e-3)  # float16 storage
        assert s.entries[cid][3] == 5


def test_iter_batches_visits_every_row_once_within_budget(tmp_path):
    acts = fake_acts(30)
    write(tmp_path, acts, shard_tokens=16)
    s = LayerStore(tmp_path, 3)
    batches = list(
        s.iter_batches(7, shuffle=True, seed=1, buffer_bytes=200)
    )  # ~6 rows of float32: tiny buffer
    assert all(len(b) == 7 for b in batches[:-1]) and sum(len(b) for b in batches) == s.n_tokens
    got = torch.cat(batches).numpy()
    want = np.concatenate([s.tokens_of(c) for c in acts])
    np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(want, axis=0))
    unshuffled = torch.cat(list(s.iter_batches(7, shuffle=False))).numpy()
    assert not np.array_equal(got, unshuffled)
    np.testing.assert_array_equal(unshuffled, want)


def test_completion_filter(tmp_path):
    acts = fake_acts(10)
    write(tmp_path, acts)
    s = LayerStore(tmp_path, 3)
    keep = ["c1", "c4", "c7"]
    got = torch.cat(list(s.iter_batches(4, completion_ids=keep, shuffle=False))).numpy()
    np.testing.assert_array_equal(got, np.concatenate([s.tokens_of(c) for c in keep]))
    assert s.count(keep) == len(got)
    with pytest.raises(KeyError, match="c99"):
        s.count(["c99"])


def test_resume_skips_stored_and_ignores_incomplete_shard(tmp_path):
    acts = fake_acts(8)
    first = dict(list(acts.items())[:5])
    write(tmp_path, first, shard_tokens=6)
    d = activations_dir(tmp_path, 3)
    (d / "shard_00099.npy").write_bytes(b"garbage from a disconnect")  # .npy without .json: incomplete
    w = ActivationWriter(tmp_path, 3, shard_tokens=6)
    assert w.done_ids == set(first)
    with w:
        for cid, a in acts.items():
            w.add(cid, a)
    s = LayerStore(tmp_path, 3)
    assert sorted(s.completion_ids) == sorted(acts) and len(s.completion_ids) == len(acts)


def test_non_finite_is_refused_with_location(tmp_path):
    bad = torch.zeros(4, 8)
    bad[2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"'cX' at token 2, dim 5"), ActivationWriter(tmp_path, 0) as w:
        w.add("cX", bad)


def test_large_values_stored_as_float32(tmp_path):
    big = torch.full((3, 8), 1e6)
    write(tmp_path, {"big": big})
    s = LayerStore(tmp_path, 3)
    assert s._metas[0]["dtype"] == "float32"
    np.testing.assert_array_equal(s.tokens_of("big"), big.numpy())


def test_disk_full_leaves_no_corrupt_shard(tmp_path, monkeypatch):
    acts = fake_acts(6)
    write(tmp_path, dict(list(acts.items())[:3]), shard_tokens=1)
    real = store.atomic_write_json

    def full_disk(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "atomic_write_json", full_disk)
    w = ActivationWriter(tmp_path, 3, shard_tokens=1)
    with pytest.raises(OSError, match="free disk space"):
        w.add("c3", acts["c3"])
    monkeypatch.setattr(store, "atomic_write_json", real)
    d = activations_dir(tmp_path, 3)
    assert len(list(d.glob("*.npy"))) == len(list(d.glob("*.json"))) == 3 and not list(d.glob("*.tmp"))
    assert "c3" not in w.done_ids
    s = LayerStore(tmp_path, 3)
    assert sorted(s.completion_ids) == ["c0", "c1", "c2"]


def test_missing_layer_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        LayerStore(tmp_path, 7)
