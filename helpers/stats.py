"""Statistics primitives shared by every stage: cluster-bootstrap weights and intervals, balanced
accuracy, AUROC, rank-sum tests, multiplicity correction, exact sign-flip tests, binomial intervals.

A probe's score, a feature's effect and a steering condition are judged by the same numerics here.
Labels: y = 1 deceptive, 0 honest. Functions take plain numpy arrays and never read the run folder.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats


def check_labels(y: Any, n: int) -> np.ndarray:
    """y as int 0/1 of length n, both classes present, else a ValueError saying what to change."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 1-D 0/1 (1 = deceptive) of length {n}, got shape {y.shape}")
    y = y.astype(np.int64)
    n_dec = int(y.sum())
    if n_dec == 0 or n_dec == n:
        raise ValueError(
            f"this run has {n - n_dec} honest and {n_dec} deceptive completions: sample more per prompt, "
            "raise temperature, or use the contrast-pair mode"
        )
    return y


def group_index(groups: Sequence) -> tuple[np.ndarray, int]:
    """Group labels (any hashables) -> (index 0..n_groups-1 per row, n_groups)."""
    _, gidx = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return gidx.ravel(), int(gidx.max()) + 1 if len(gidx) else 0


def group_bootstrap_weights(gidx: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """[n_bootstrap, n] row weights of a cluster bootstrap: each draw resamples the groups with
    replacement, and a row's weight is how many times its group was drawn."""
    n_groups = int(gidx.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_bootstrap)
    return counts[:, gidx].astype(np.float32)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (draws that were undefined, nan, are left out)."""
    samples = np.asarray(samples, float)
    if not np.isfinite(samples).any():
        return (float("nan"), float("nan"))
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def balanced_accuracy(proba: np.ndarray, y: np.ndarray, W: np.ndarray | None = None) -> np.ndarray:
    """Mean recall of the two classes at threshold 0.5. Without W: over the classes present (one test
    fold may hold one class). With W [B, n] bootstrap weights: [B], nan where a draw lacks a class."""
    hit = (proba >= 0.5) == (y == 1)
    if W is None:
        return np.mean([hit[y == c].mean() for c in (0, 1) if (y == c).any()])
    with np.errstate(invalid="ignore", divide="ignore"):
        recalls = [(W * (hit & (y == c))).sum(1) / (W * (y == c)).sum(1) for c in (0, 1)]
    return (recalls[0] + recalls[1]) / 2


def weighted_auroc(scores: np.ndarray, y: np.ndarray, W: np.ndarray | None = None) -> np.ndarray:
    """AUROC with ties counted 1/2, for each row of weights W [B, n] at once (unweighted: B = 1).

    AUROC = sum over positives i, negatives j of w_i w_j [s_i > s_j] (+1/2 if equal) / (W_pos W_neg):
    sort once, sum weights per distinct score, and a cumulative sum gives the negatives below.
    """
    W = np.ones((1, len(y))) if W is None else W
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    wp = np.add.reduceat((W * (y == 1))[:, order], starts, axis=1)  # [B, distinct scores]
    wn = np.add.reduceat((W * (y == 0))[:, order], starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    with np.errstate(invalid="ignore", divide="ignore"):
        return (wp * (below + 0.5 * wn)).sum(1) / (wp.sum(1) * wn.sum(1))


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg (1995) q-values: q_(i) = min_{j >= i} p_(j) m / j, capped at 1."""
    p = np.asarray(p, float)
    m = p.size
    order = np.argsort(p)
    q = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def rank_sum(acts: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of acts [n, d]: (AUROC, two-sided Mann–Whitney p). Constant columns: (0.5, 1)."""
    n, d = acts.shape
    n1, n0 = int(y.sum()), n - int(y.sum())
    x = acts.T  # [d, n]: tie groups are runs within each sorted row
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    new = np.ones((d, n), bool)
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    starts = np.flatnonzero(new)  # flat position where each tie group begins
    counts = np.diff(np.append(starts, d * n)).astype(float)
    avg_rank = starts % n + (counts + 1) / 2  # 1-based average rank of each tie group
    ranks = np.empty((d, n))
    np.put_along_axis(ranks, order, avg_rank[np.cumsum(new.ravel()) - 1].reshape(d, n), axis=1)
    tie_term = np.bincount(starts // n, weights=counts**3 - counts, minlength=d)
    u1 = ranks @ y - n1 * (n1 + 1) / 2
    sigma = np.sqrt(n1 * n0 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    z = (np.maximum(u1, n1 * n0 - u1) - n1 * n0 / 2 - 0.5) / np.where(sigma > 0, sigma, 1)
    p = np.where(sigma > 0, np.clip(2 * stats.norm.sf(z), 0, 1), 1.0)
    return u1 / (n1 * n0), p


def wilson_ci(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (treats samples as independent)."""
    if n == 0:
        return (math.nan, math.nan)
    p, denom = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / denom, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def sign_flip_test(diffs: np.ndarray, n_permutations: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of mean(diffs) = 0, flipping each prompt's sign: exact over
    all 2^P flips for P <= 16 prompts, else Monte Carlo. The smallest possible p is 2 / 2^P."""
    d, obs = np.asarray(diffs, float), abs(float(np.mean(diffs)))
    if len(d) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs(signs @ d / len(d)) >= obs - 1e-12))
    signs = np.random.default_rng([seed, 8]).choice((1.0, -1.0), size=(n_permutations, len(d)))
    return float((1 + np.sum(np.abs(signs @ d / len(d)) >= obs - 1e-12)) / (1 + n_permutations))
