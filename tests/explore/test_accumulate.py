"""The streaming per-feature accumulators against brute force on the whole stream at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.explore.accumulate import (
    LogHistogram,
    TopPerFeature,
    distinct_groups,
    linear_histograms,
    quantile_edges,
)


def stream(seed: int, n_features: int = 40, n_batches: int = 30, per_batch: int = 300):
    """COO batches (feature, value, doc, pos); values with many ties so tie-breaking is exercised."""
    rng = np.random.default_rng(seed)
    for b in range(n_batches):
        f = rng.integers(0, n_features, per_batch)
        v = np.round(rng.gamma(1.0, 1.0 + f / 10, per_batch), 1).astype(np.float32) + 0.1
        d = rng.integers(0, 25, per_batch) + 25 * (b // 10)
        p = rng.integers(0, 50, per_batch)
        yield f, v, d, p


def brute_top(entries, n_features, k, distinct):
    f, v, d, p, order = entries
    out = {}
    for feat in range(n_features):
        idx = np.flatnonzero(f == feat)
        idx = idx[np.lexsort((order[idx], -v[idx]))]  # by value, then first seen
        if distinct:
            seen, keep = set(), []
            for i in idx:
                if d[i] not in seen:
                    seen.add(d[i])
                    keep.append(i)
            idx = np.array(keep, int)
        out[feat] = [(float(v[i]), int(d[i]), int(p[i])) for i in idx[:k]]
    return out


@pytest.mark.parametrize("distinct", [True, False])
@pytest.mark.parametrize("tensors", [False, True], ids=["numpy", "torch"])
def test_top_per_feature_matches_brute_force(distinct, tensors):
    """Fed numpy arrays, or torch tensors (the explorer pass's device path, here on the CPU): the same."""
    n_features, k = 40, 5
    acc = TopPerFeature(
        n_features, k, width=3, distinct_docs=distinct, budget=200, extra_width=2
    )  # many compactions
    parts, count = [], 0
    lib = torch if tensors else np
    for f, v, d, p in stream(1):
        # the window of an entry encodes where it came from, to check each entry keeps its own window
        fv = [torch.from_numpy(a) for a in (f, v, d, p)] if tensors else [f, v, d, p]
        part = acc.select(
            fv[0],
            fv[1],
            fv[1],
            fv[2],
            fv[3],
            lambda idx, d=fv[2], p=fv[3]: lib.stack([d[idx], p[idx], d[idx] * 0], 1) * 1.0,
            lambda idx, d=fv[2], p=fv[3]: lib.stack([p[idx], d[idx]], 1),
        )
        acc.keep(part)
        parts.append((f, v, d, p, np.arange(count, count + len(f))))
        count += len(f)
    entries = tuple(np.concatenate(x) for x in zip(*parts, strict=True))
    want = brute_top(entries, n_features, k, distinct)
    kept = acc.result()
    for feat in range(n_features):
        s = kept.of(feat)
        got = [(float(kept.value[i]), int(kept.doc[i]), int(kept.pos[i])) for i in range(s.start, s.stop)]
        assert [g[0] for g in got] == [w[0] for w in want[feat]], feat
        if distinct:
            assert len({g[1] for g in got}) == len(got), "one entry per document"
        assert (kept.window[s, 0] == kept.doc[s]).all() and (kept.window[s, 1] == kept.pos[s]).all()
        assert (kept.extra[s, 0] == kept.pos[s]).all() and (kept.extra[s, 1] == kept.doc[s]).all(), (
            "extra kept along"
        )
        assert (kept.feature[s] == feat).all()


def test_random_keys_give_a_uniform_sample():
    """Keeping the k largest uniform keys per feature samples its entries uniformly: every entry of a
    feature is kept with probability k / n over repeated draws."""
    n, k, reps = 20, 5, 2000
    hits = np.zeros(n)
    rng = np.random.default_rng(0)
    for _ in range(reps):
        acc = TopPerFeature(1, k, width=1, distinct_docs=False, budget=4)
        for start in range(0, n, 7):
            idx = np.arange(start, min(start + 7, n))
            part = acc.select(
                np.zeros(len(idx), np.int64),
                rng.random(len(idx)).astype(np.float32),
                idx.astype(np.float32),
                idx,
                idx,
                lambda i: np.zeros((len(i), 1), np.float32),
            )
            acc.keep(part)
        hits[acc.result().value.astype(int)] += 1
    assert np.allclose(hits / reps, k / n, atol=0.04), hits / reps


def test_log_histogram_counts_and_derived_views():
    rng = np.random.default_rng(2)
    n_features = 6
    feats = rng.integers(0, n_features, 5000)
    vals = rng.lognormal(0.0, 1.0 + feats / 3).astype(np.float32)
    h = LogHistogram(n_features)
    for s in range(0, 5000, 700):
        h.add(torch.from_numpy(feats[s : s + 700]), torch.from_numpy(vals[s : s + 700]))
    edges, table = h.edges(), h.table()
    for f in range(n_features):
        want, _ = np.histogram(vals[feats == f], bins=edges)
        assert (table[f] == want).all(), "exact counts in the log2 bins"
    top = np.array([vals[feats == f].max() for f in range(n_features)])
    lin = linear_histograms(table, edges, top, 10)
    assert (lin.sum(1) == table.sum(1)).all(), "rebinning keeps every count"
    for f in range(n_features):
        exact, _ = np.histogram(vals[feats == f], bins=np.linspace(0, top[f], 11))
        assert np.abs(lin[f] - exact).sum() <= 0.12 * exact.sum(), "a count moves at most one display bin"
    low = np.array([vals[feats == f].min() for f in range(n_features)])
    lin = linear_histograms(table, edges, top, 10, low)
    assert (lin.sum(1) == table.sum(1)).all()
    for f in range(n_features):
        exact, _ = np.histogram(vals[feats == f], bins=np.linspace(low[f], top[f], 11))
        assert np.abs(lin[f] - exact).sum() <= 0.12 * exact.sum(), "from the smallest activation, too"
        assert lin[f, 0] > 0, "the first bar starts at the smallest nonzero activation"
    q, below = quantile_edges(table, edges, top, 4, low)
    for f in range(n_features):
        v = vals[feats == f]
        exact = np.quantile(v, [0.25, 0.5, 0.75])
        assert q[f, 0] == low[f] and q[f, -1] == pytest.approx(top[f])
        assert np.all(q[f, 1:-1] >= exact * 0.99) and np.all(q[f, 1:-1] <= exact * 1.10), "within one 9% bin"
        assert [int((v <= e).sum()) for e in q[f, 1:]] == below[f, 1:].tolist(), (
            "exact counts below each edge"
        )
        groups = distinct_groups(q[f], below[f])
        assert len(groups) == 4 and sum(c for _, _, c in groups) == len(v)


def test_quantile_groups_never_degenerate():
    """Many equal activations (a feature that fires at one value, or mostly at one): no zero-width group,
    no empty group, counts that add up; a feature that never fired has none."""
    h = LogHistogram(4)
    one = np.full(50, 25.0, np.float32)  # always 25: 'activation 25–25' four times before
    mostly = np.r_[np.full(90, 3.0), np.linspace(4, 9, 10)].astype(np.float32)
    two = np.r_[np.full(10, 1.0), np.full(30, 8.0)].astype(np.float32)
    for f, v in enumerate((one, mostly, two)):
        h.add(torch.full((len(v),), f), torch.from_numpy(v))
    table, edges = h.table(), h.edges()
    top = np.array([25.0, 9.0, 8.0, 0.0])
    low = np.array([25.0, 3.0, 1.0, 0.0])
    q, below = quantile_edges(table, edges, top, 4, low)
    got = [distinct_groups(q[f], below[f]) for f in range(4)]
    assert got[0] == [(25.0, 25.0, 50)], "one value: one group"
    assert got[3] == [], "never fired: no group"
    for f, v in ((1, mostly), (2, two)):
        assert all(lo < hi and c > 0 for lo, hi, c in got[f]), got[f]
        assert sum(c for _, _, c in got[f]) == len(v) and got[f][0][0] == v.min() and got[f][-1][1] == v.max()
        for lo, hi, c in got[f]:
            assert c == int(((v > lo) & (v <= hi)).sum() + (v == lo).sum() * (lo == v.min())), (lo, hi, c)
