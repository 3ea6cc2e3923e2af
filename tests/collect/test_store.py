"""The activation store: round trips, resume, streaming under a memory budget, and failure safety."""

from __future__ import annotations

import errno
import threading

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


def test_token_ids_round_trip_resume_and_old_stores_without_them(tmp_path):
    acts = fake_acts(7)
    rng = np.random.default_rng(0)
    ids = {cid: rng.integers(0, 50_000, len(a)) for cid, a in acts.items()}
    pos = {cid: np.sort(rng.choice(np.arange(1, 40), len(a), replace=False)) for cid, a in acts.items()}
    first = list(acts)[:4]
    with ActivationWriter(tmp_path, 3, shard_tokens=8, kind="corpus") as w:
        for cid in first:
            w.add(cid, acts[cid], token_ids=ids[cid], positions=pos[cid])
    with ActivationWriter(tmp_path, 3, shard_tokens=8, kind="corpus") as w:  # a resumed run
        assert w.done_ids == set(first)
        for cid, a in acts.items():
            w.add(cid, a, token_ids=torch.tensor(ids[cid]), positions=torch.tensor(pos[cid]))
    s = LayerStore(tmp_path, 3, kind="corpus")
    assert sorted(s.completion_ids) == sorted(acts) and len(s.has_token_ids) > 2 and all(s.has_token_ids)
    for cid in acts:
        np.testing.assert_array_equal(s.token_ids_of(cid), np.stack([ids[cid], pos[cid]], 1))
        assert s.entries[cid][3] == pos[cid][0], "the first position is the first row's"
    # A store written before token ids were kept: its shards load, without ids.
    old = tmp_path / "old"
    write(old, acts)
    for meta in (old / "activations" / "layer_3").glob("shard_*.json"):
        assert "token_ids" not in meta.read_text()
    s = LayerStore(old, 3)
    assert not any(s.has_token_ids) and s.token_ids_of("c0") is None and s.n_tokens > 0
    with pytest.raises(ValueError, match="3 rows but 2 token ids"), ActivationWriter(tmp_path, 4) as w:
        w.add("x", acts["c0"], token_ids=[1, 2])
    with (
        pytest.raises(ValueError, match="for every entry .* or for none"),
        ActivationWriter(tmp_path, 4) as w,
    ):
        w.add("y", acts["c0"], token_ids=[1, 2, 3])
        w.add("z", acts["c1"])


def test_a_truncated_shard_names_its_completions_and_a_rerun_recollects_them(tmp_path, capsys):
    acts = fake_acts(6)
    write(tmp_path, acts, shard_tokens=8)
    d = activations_dir(tmp_path, 3)
    shard = d / "shard_00001.npy"
    held = [e[0] for e in LayerStore(tmp_path, 3)._metas[1]["entries"]]
    shard.write_bytes(shard.read_bytes()[:-40])  # a Drive sync cut short
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ValueError, match=rf"shard_00001\.npy is damaged .*{held[0]}.*Rerun notebook 02"):
        LayerStore(tmp_path, 3)  # was: ValueError: mmap length is greater than file size (on first read)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the error changed nothing

    w = ActivationWriter(tmp_path, 3, shard_tokens=8)  # what rerunning notebook 02 does
    assert w.done_ids == set(acts) - set(held) and "removed damaged shard_00001" in capsys.readouterr().out
    write(tmp_path, acts, shard_tokens=8)
    s = LayerStore(tmp_path, 3)
    assert sorted(s.completion_ids) == sorted(acts)
    for cid, a in acts.items():
        np.testing.assert_allclose(s.tokens_of(cid), a.numpy(), atol=1e-2)


def test_stream_rows_reads_the_groups_in_order_ahead_of_the_consumer(tmp_path):
    acts = fake_acts(12)
    write(tmp_path, acts)
    s = LayerStore(tmp_path, 3)
    ids = list(acts)
    groups = [[(ids[0], 0), (ids[1], 2)], [(ids[2], 1)], [(i, 0) for i in ids[3:]]]
    got = list(s.stream_rows(groups, depth=1))
    for group, x in zip(groups, got, strict=True):
        want = np.concatenate([s.tokens_of(cid)[skip:] for cid, skip in group])
        assert x.dtype == torch.float16 and np.array_equal(x.float().numpy(), want)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            s.stream_rows(groups, pin_memory=True)


def test_prefetched_reraises_the_readers_error_and_stops_its_thread_when_dropped():
    def items():
        yield from range(3)
        raise OSError("disk gone")

    it = store.prefetched(items(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    endless = store.prefetched(iter(lambda: 1, None), depth=2)
    for n, _ in enumerate(endless):
        if n == 5:
            break
    endless.close()
    assert not [t for t in threading.enumerate() if t.name == "store-reader"]
    with pytest.raises(ValueError, match="depth must be at least 1"):
        store.prefetched([], depth=0)
