"""Statistics primitives shared by every stage: cluster-bootstrap weights and intervals, label
permutations at the level the labels vary, balanced accuracy, AUROC, rank-sum tests, multiplicity
corrections, exact sign-flip tests, binomial intervals.

A probe's score, a feature's effect and a steering condition are judged by the same numerics here.
Labels: y = 1 deceptive, 0 honest. Functions take plain numpy arrays and never read the run folder.

Completions of one prompt share the prompt (and prompts of one group, a scenario or a fact, share it):
they are not independent units. Every resampling here works on the units where the randomness is
(DESIGN.md §9): bootstrap draws resample groups; permutations move labels between the units that carry
them (`label_permutations`), never across the rows of a prompt whose label is fixed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
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


def nested_index(prompts: Sequence | None, groups: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(prompt index, group index) per row, 0-based. `prompts` None: every row is its own prompt. A
    prompt that appears in two groups is an error (prompts must nest in groups)."""
    gidx, _ = group_index(groups)
    pidx = np.arange(len(gidx)) if prompts is None else group_index(prompts)[0]
    if len(pidx) != len(gidx):
        raise ValueError(f"{len(pidx)} prompt ids for {len(gidx)} groups: pass one prompt id per row")
    first_group = np.full(int(pidx.max()) + 1 if len(pidx) else 0, -1)
    first_group[pidx] = gidx
    if len(pidx) and not np.array_equal(first_group[pidx], gidx):
        bad = int(pidx[first_group[pidx] != gidx][0])
        raise ValueError(
            f"prompt #{bad} appears in more than one group: every completion of a prompt must carry the same "
            "group (the scenario or fact); check the `group` and `prompt_id` fields of completions.jsonl"
        )
    return pidx, gidx


def label_permutations(
    y: np.ndarray, pidx: np.ndarray, gidx: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, int]]:
    """[n_permutations, n] label vectors drawn under the null, moving labels at the level they vary.

    - a group whose rows all carry one label (one-label group): the group labels are permuted across
      the one-label groups;
    - a prompt whose rows carry one label inside a group with both labels (a contrast pair's honest and
      lie prompts; a scenario's paraphrases labelled per prompt): the prompt labels are permuted among
      the one-label prompts of the same group, whole prompts at a time;
    - a prompt with both labels among its completions (same-prompt sampling, labelled per answer): its
      completions' labels are shuffled within the prompt.

    Under the null (activations independent of labels given prompts and groups, whose random effects
    are exchangeable within their level) every draw has the distribution of the observed labels, so a
    permutation test is exact. Shuffling rows across the prompts of a group instead breaks the
    clustering of labels by prompt: in null worlds with prompt-level effects it rejected 18% at 0.05.
    Returns the draws and how many units of each kind moved."""
    y = np.asarray(y).astype(np.int8)
    n_prompts, n_groups = int(pidx.max()) + 1, int(gidx.max()) + 1
    group_of = np.zeros(n_prompts, np.int64)
    group_of[pidx] = gidx
    p_sum, p_n = np.bincount(pidx, y, n_prompts), np.bincount(pidx, minlength=n_prompts)
    g_sum, g_n = np.bincount(gidx, y, n_groups), np.bincount(gidx, minlength=n_groups)
    p_one = (p_n > 0) & ((p_sum == 0) | (p_sum == p_n))
    g_one = (g_n > 0) & ((g_sum == 0) | (g_sum == g_n))
    out = np.repeat(y[None], n_permutations, axis=0)

    one_groups = np.flatnonzero(g_one)
    if len(one_groups) > 1:
        labels = (g_sum[one_groups] > 0).astype(np.int8)
        glab = np.zeros((n_permutations, n_groups), np.int8)
        glab[:, one_groups] = labels[np.argsort(rng.random((n_permutations, len(one_groups))), axis=1)]
        rows = np.flatnonzero(g_one[gidx])
        out[:, rows] = glab[:, gidx[rows]]

    one_prompts = np.flatnonzero(p_one & ~g_one[group_of])
    if len(one_prompts):
        labels = (p_sum[one_prompts] > 0).astype(np.int8)
        home = group_of[one_prompts]
        base = np.argsort(home, kind="stable")  # positions sorted by group
        order = np.argsort(home[None, :] + rng.random((n_permutations, len(one_prompts))), axis=1)
        plab = np.zeros((n_permutations, n_prompts), np.int8)
        plab[:, one_prompts[base]] = labels[order]  # same group sizes on both sides: within-group moves
        rows = np.flatnonzero(p_one[pidx] & ~g_one[gidx])
        out[:, rows] = plab[:, pidx[rows]]

    mixed = np.flatnonzero(~p_one[pidx])
    if len(mixed):
        home = pidx[mixed]
        base = mixed[np.argsort(home, kind="stable")]
        order = np.argsort(home[None, :] + rng.random((n_permutations, len(mixed))), axis=1)
        out[:, base] = y[mixed[order]]
    units = {
        "one_label_groups": int(len(one_groups)) if len(one_groups) > 1 else 0,
        "one_label_prompts_within_groups": int(len(one_prompts)),
        "two_label_prompts": int((~p_one & (p_n > 0)).sum()),
    }
    return out, units


def permutation_scheme(units: dict[str, int]) -> str:
    """The words for what `label_permutations` moved."""
    n_groups = units["one_label_groups"]
    n_prompts = units["one_label_prompts_within_groups"]
    n_two_label = units["two_label_prompts"]
    parts = [
        f"{n_groups} one-label groups' labels across groups" if n_groups else "",
        f"{n_prompts} prompts' labels within their groups" if n_prompts else "",
        f"completion labels within {n_two_label} two-label prompts" if n_two_label else "",
    ]
    parts = [p for p in parts if p]
    return "permuted: " + "; ".join(parts) if parts else "nothing to permute (one label unit)"


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


def balanced_accuracy_rows(proba: np.ndarray, Y: np.ndarray, W: np.ndarray | None = None) -> np.ndarray:
    """Balanced accuracy [B] of B prediction rows proba [B, n] against labels Y ([B, n] or [n]), with
    optional row weights W [B, n] (bootstrap counts); nan where a row lacks a class."""
    proba = np.atleast_2d(proba)
    labels = np.broadcast_to(Y, proba.shape)
    W = np.ones(proba.shape) if W is None else W
    hit = (proba >= 0.5) == (labels == 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recalls = [(W * (hit & (labels == c))).sum(1) / (W * (labels == c)).sum(1) for c in (0, 1)]
    return (recalls[0] + recalls[1]) / 2


def auroc_rows(scores: np.ndarray, Y: np.ndarray, W: np.ndarray | None = None) -> np.ndarray:
    """AUROC [B] of each score row [B, n] against its labels (Y [B, n] or [n]), ties 1/2, with optional
    row weights W [B, n]. Rows are sorted one at a time (B is a few hundred)."""
    scores = np.atleast_2d(scores)
    Y = np.broadcast_to(Y, scores.shape)
    out = np.empty(len(scores))
    for b in range(len(scores)):
        out[b] = weighted_auroc(scores[b], Y[b], None if W is None else W[b : b + 1])[0]
    return out


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


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values: family-wise error control for a few comparisons (the
    raw-vs-SAE probe tests of one layer), valid under any dependence between them."""
    p = np.asarray(p, float)
    m = p.size
    order = np.argsort(p)
    adj = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
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


def dense_to_csr(X: np.ndarray, nonzero: np.ndarray | None = None) -> sp.csr_matrix:
    """Dense X [n, d] as float64 CSR (column indices sorted within each row), from one boolean pass
    (`nonzero`: X != 0, if the caller has it) and its flat indices: 0.045 s at 1,216 x 16,384 where
    sp.csr_matrix(X) took 0.11 (np.nonzero on the floats, then a COO -> CSR pass)."""
    on = X != 0 if nonzero is None else nonzero
    flat = np.flatnonzero(on)
    indptr = np.zeros(len(X) + 1, np.int64)
    np.cumsum(np.count_nonzero(on, axis=1), out=indptr[1:])
    index = np.int32 if X.shape[1] < np.iinfo(np.int32).max else np.int64
    data = X.ravel()[flat].astype(np.float64)  # float32 -> float64 is exact
    return sp.csr_matrix((data, (flat % X.shape[1]).astype(index), indptr), shape=X.shape)


def sparse_auroc(acts: sp.spmatrix | sp.sparray, y: np.ndarray) -> np.ndarray:
    """AUROC per column of a sparse acts [n, d] (ties 1/2), from its non-zero entries only: bitwise
    equal to `rank_sum(acts.toarray(), y)[0]`, in time and memory of the non-zeros (SAE features fire on
    a few % of completions). Each column's zeros are one tie group whose average rank is known from
    counts (after the column's negatives, before the rest), so only the non-zeros are sorted. Every
    rank is a half-integer and U sums them: exact in float64 in any order, hence the same bits."""
    A = sp.csc_matrix(acts)  # no copy if already CSC; duplicates are summed
    n, d = A.shape
    y = np.asarray(y)
    n1, n0 = int(y.sum()), n - int(y.sum())
    col = np.repeat(np.arange(d), np.diff(A.indptr))  # [nnz] column of each stored entry
    keep = A.data != 0  # a stored zero (or -0.0) belongs to the zeros' tie group
    col, row, v = col[keep], A.indices[keep], A.data[keep]
    # By column, then value (nan last, as argsort puts it): a sort of the values, then a stable sort
    # of their columns (a radix sort for 16-bit integers), ~2.5x faster than np.lexsort((v, col)).
    order = np.argsort(v)
    order = order[np.argsort(col[order].astype(np.uint16 if d <= 1 << 16 else np.int64), kind="stable")]
    cs, vs, ys = col[order], v[order], y[row[order]]
    new = np.ones(len(vs), bool)
    new[1:] = (cs[1:] != cs[:-1]) | (vs[1:] != vs[:-1])  # a tie group begins
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(vs)))
    nnz = np.bincount(col, minlength=d)
    first = np.cumsum(nnz) - nnz  # where each column's run begins in the sorted entries
    n_neg, n_zero = np.bincount(col[v < 0], minlength=d), n - nnz
    # 1-based average rank among the column's non-zeros, then shifted past its zeros unless negative
    rank = (starts - first[cs[starts]] + (counts + 1) / 2)[np.cumsum(new) - 1]
    rank += np.where(vs < 0, 0, n_zero[cs])
    zeros_1 = n1 - np.bincount(cs, weights=ys, minlength=d)  # deceptive rows at zero, per column
    u1 = np.bincount(cs, weights=rank * ys, minlength=d) + zeros_1 * (n_neg + (n_zero + 1) / 2)
    return (u1 - n1 * (n1 + 1) / 2) / (n1 * n0)


def ratio_ci(num: np.ndarray, den: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(R, lo, hi): the ratio of sums R = sum(num) / sum(den) over independent clusters (one entry per
    group: a prompt group's summed loss and its token count, say) with a t interval (df = clusters - 1)
    from its cluster-robust linearised SE with each cluster's residual leverage-adjusted (CR3 / HC3 style:
    R is a weighted least-squares fit in which cluster g has leverage h_g = den_g / sum(den)):
    sqrt(sum_g ((num_g - R den_g) / (sum(den) (1 - h_g)))^2). On simulated LM-loss shapes (skewed gamma
    group effects, tests/null_worlds.py) it covers 94% with 5 to 64 clusters, where the plain
    linearised SE with a G/(G-1) factor covered 91% at 5 and 92% at 10 clusters and a percentile cluster
    bootstrap 88-93%. Nan bounds with fewer than 2 clusters (or one cluster holding all of `den`)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    total = den.sum()
    r = float(num.sum() / total) if total else math.nan
    g = len(num)
    leverage = den / total if total else np.ones_like(den)
    if g < 2 or not total or np.any(leverage >= 1):
        return r, math.nan, math.nan
    se = math.sqrt(float((((num - r * den) / (total * (1 - leverage))) ** 2).sum()))
    half = float(stats.t.ppf(0.5 + level / 2, g - 1)) * se
    return r, r - half, r + half


def wilson_ci(k: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (treats samples as independent; n may be an effective
    sample size, k = p n)."""
    if n == 0:
        return (math.nan, math.nan)
    p, denom = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / denom, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval contains p exactly; rounding can put its end a hair past p (5.6e-17 above k = 0), which a
    # plot's error bar (p - lo < 0) refuses.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def difference_ci(
    a: tuple[float, float, float], b: tuple[float, float, float], correlation: float
) -> tuple[float, float]:
    """Interval of a - b from the intervals (estimate, lo, hi) of a and b and the correlation of their
    estimates (e.g. of two steering conditions' per-scenario rates): the MOVER of Zou & Donner (2008),
    which carries asymmetric score intervals (Wilson's near 0 or 1) over to the difference: lo = d - sqrt(da^2
    + db^2 - 2 r da db) with da = a - lo_a, db = hi_b - b, and the mirror image for hi.
    Nan when either interval is."""
    (pa, la, ua), (pb, lb, ub) = a, b
    if not all(map(math.isfinite, (pa, la, ua, pb, lb, ub))):
        return (math.nan, math.nan)
    r = correlation if math.isfinite(correlation) else 0.0
    d = pa - pb
    lo = d - math.sqrt(max((pa - la) ** 2 + (ub - pb) ** 2 - 2 * r * (pa - la) * (ub - pb), 0.0))
    hi = d + math.sqrt(max((ua - pa) ** 2 + (pb - lb) ** 2 - 2 * r * (ua - pa) * (pb - lb), 0.0))
    return (lo, hi)


def sign_flip_test(diffs: np.ndarray, n_permutations: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of mean(diffs) = 0, flipping each prompt's sign: exact over
    all 2^P flips for P <= 16 prompts, else Monte Carlo. The smallest possible p is 2 / 2^P."""
    d, obs = np.asarray(diffs, float), abs(float(np.mean(diffs)))
    if len(d) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs(signs @ d / len(d)) >= obs - 1e-12))
    signs = np.random.default_rng([seed, 8]).choice((1.0, -1.0), size=(n_permutations, len(d)))
    return float((1 + np.sum(np.abs(signs @ d / len(d)) >= obs - 1e-12)) / (1 + n_permutations))


# --- A detector evaluated on another dataset (the field's protocol: REFERENCE.md "Deception detection") ---
# The probe is fixed (trained on other data), so only the evaluation set's sampling is uncertain, and its
# completions are clustered by prompt group: every interval below treats groups as the independent units.


AUROC_VARIANCE_FLOOR = 0.25
"""Share of Hanley & McNeil's independent-rows variance below which
`clustered_auroc`'s variance never falls."""


def clustered_auroc(
    scores: np.ndarray, y: np.ndarray, clusters: Sequence, level: float = 0.95
) -> tuple[float, float, float]:
    """(AUROC, lo, hi) of fixed scores against labels y, with Obuchowski's (1997, Biometrics 53:567)
    nonparametric variance for clustered data: each positive's placement V10 (share of negatives it
    outranks, ties 1/2) and each negative's V01 are summed per cluster, and
    var = S10/M + S01/N + 2 S11/(M N) with S10 = I/((I-1) M) sum_i (V10_i - m_i A)^2 (S01 alike, S11 the
    cross term), I clusters holding M positives and N negatives in all. The interval is built on the logit
    scale with t(I - 1) quantiles (stays inside [0, 1]; few clusters widen it); a cluster may hold both
    labels. At AUROC 0 or 1 the logit is taken at half a pair from the boundary. Nan bounds with fewer
    than 2 clusters; nan throughout when a label is missing."""
    s, y = np.asarray(scores, float), np.asarray(y).astype(int)
    cidx, n_clusters = group_index(clusters)
    pos, neg = s[y == 1], s[y == 0]
    M, N = len(pos), len(neg)
    if M == 0 or N == 0:
        return (math.nan, math.nan, math.nan)
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    v10 = (np.searchsorted(neg_sorted, pos, "left") + np.searchsorted(neg_sorted, pos, "right")) / (2 * N)
    v01 = (2 * M - np.searchsorted(pos_sorted, neg, "left") - np.searchsorted(pos_sorted, neg, "right")) / (
        2 * M
    )
    auc = float(v10.mean())
    if n_clusters < 2:
        return (auc, math.nan, math.nan)
    m_i = np.bincount(cidx[y == 1], minlength=n_clusters)
    n_i = np.bincount(cidx[y == 0], minlength=n_clusters)
    r10 = np.bincount(cidx[y == 1], v10, n_clusters) - m_i * auc
    r01 = np.bincount(cidx[y == 0], v01, n_clusters) - n_i * auc
    k = n_clusters / (n_clusters - 1)
    var = k * ((r10**2).sum() / M**2 + (r01**2).sum() / N**2 + 2 * (r10 * r01).sum() / (M * N))
    edge = 0.5 / (M * N)
    a = min(max(auc, edge), 1 - edge)
    # A quarter of Hanley & McNeil's (1982) variance for independent rows as a floor: near AUROC 1 few
    # pairs are misordered and the placement variance alone collapses (coverage 0.82 at AUROC 0.997
    # with 12 groups; 0.985 with the floor, and 0.94 unchanged at AUROC 0.5-0.94: test_detection.py).
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var_hm = (a * (1 - a) + (M - 1) * (q1 - a * a) + (N - 1) * (q2 - a * a)) / (M * N)
    se_logit = math.sqrt(max(var, AUROC_VARIANCE_FLOOR * var_hm, 0.0)) / (a * (1 - a))
    # Degrees of freedom from the scarcer side: with labels held by whole groups, the positives'
    # placement variance rests on the groups that hold positives only.
    df = max(1, min(np.count_nonzero(m_i), np.count_nonzero(n_i), n_clusters) - 1)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se_logit
    centre = math.log(a / (1 - a))
    return (auc, float(1 / (1 + math.exp(-(centre - half)))), float(1 / (1 + math.exp(-(centre + half)))))


def clustered_proportion_ci(
    hits: np.ndarray, clusters: Sequence, level: float = 0.95
) -> tuple[float, float, float]:
    """(p, lo, hi): a proportion of 0/1 outcomes that come in clusters (completions of one prompt group),
    as a Wilson interval on the effective sample size n / deff, with the design effect deff = the
    cluster-robust variance of p over the binomial one (floored at 1). With no hit or no miss the design
    effect cannot be estimated: each cluster then counts as one unit (n_eff = clusters for equal sizes),
    the conservative end. Wilson keeps the interval away from [0, 0] when nothing was seen, where a
    percentile bootstrap collapses. The quantile is t with df = (clusters on the scarcer side: holding a
    hit, or a miss) - 1, at least min(clusters - 1, 5): a rare outcome seen in 3 of 30 groups rests on
    those 3 (coverage 0.925 -> 0.96 at rate 0.03 with strong group effects; test_detection.py)."""
    h = np.asarray(hits, float)
    n = len(h)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    cidx, n_clusters = group_index(clusters)
    p = float(h.mean())
    sizes = np.bincount(cidx, minlength=n_clusters).astype(float)
    sums = np.bincount(cidx, h, n_clusters)
    if 0 < p < 1 and n_clusters > 1:
        var_cluster = n_clusters / (n_clusters - 1) * float(((sums - p * sizes) ** 2).sum()) / n**2
        n_eff = n / max(1.0, var_cluster / (p * (1 - p) / n))
    else:
        n_eff = n * n / float((sizes**2).sum())  # = clusters for equal sizes
    if n_clusters > 1:
        scarce = min(n_clusters, np.count_nonzero(sums), np.count_nonzero(sums < sizes))
        z = float(stats.t.ppf(0.5 + level / 2, max(scarce - 1, min(n_clusters - 1, 5))))
    else:
        z = float(stats.norm.ppf(0.5 + level / 2))
    return (p, *wilson_ci(p * n_eff, n_eff, z))


def control_threshold(
    control_scores: np.ndarray, fpr: float = 0.01, groups: Sequence | None = None
) -> dict[str, Any]:
    """The score threshold at which at most `fpr` of the control (benign) answers score above it: with n
    control scores, k = floor(fpr n) may exceed it, so the threshold is the (k+1)-th largest score and a
    completion is flagged when its score is strictly above. `realised_fpr` = exceedances / n on the
    control set itself; `resolution` = 1 / n (the FPR steps that n answers can express; fewer than
    1 / fpr answers cannot express `fpr` at all, and `too_small` says so); `fpr_upper` = the one-sided
    95% bound on the control population's FPR at this threshold: Clopper-Pearson when each answer is its
    own unit, and with `groups` (several answers per control prompt) the upper end of the two-sided 90%
    `clustered_proportion_ci`, which counts prompts, not answers."""
    c_unsorted = np.asarray(control_scores, float)
    c = np.sort(c_unsorted)[::-1]
    n = len(c)
    if n == 0:
        raise ValueError("the control set is empty: add a control dataset (role 'control') to the run")
    k = int(math.floor(fpr * n + 1e-9))
    threshold = float(c[min(k, n - 1)])
    exceed = int((c > threshold).sum())
    if groups is not None and group_index(groups)[1] < n:
        upper = clustered_proportion_ci(c_unsorted > threshold, groups, level=0.90)[2]
    else:
        upper = float(stats.beta.ppf(0.95, exceed + 1, n - exceed)) if exceed < n else 1.0
    return {
        "threshold": threshold,
        "target_fpr": fpr,
        "n_control": n,
        "control_exceed": exceed,
        "realised_fpr": exceed / n,
        "resolution": 1 / n,
        "fpr_upper": upper,
        "too_small": n < math.ceil(1 / fpr - 1e-9),
    }
