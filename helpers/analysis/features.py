"""Which SAE features separate deceptive from honest completions, measured on data not used to pick them.

Features are CHOSEN on one split of the prompt groups and TESTED on the other (`split_by_group`,
`top_features`): the 20 largest of 16k effect sizes, reported on the rows that chose them, report the
selection's luck (winner's curse). Per feature, vectorised over the non-zero entries (SAE features
fire on a few %; 16k features at d32 scale in ~0.1 s, `feature_stats`):
- Cohen's d (deceptive minus honest, pooled SD) with a 95% CI from the cluster-robust (CR2) SE of the
  mean difference over prompt groups with Bell-McCaffrey degrees of freedom (`feature_stats`), since
  completions of one prompt are not independent and a label may sit in few groups;
- AUROC = P(deceptive activation > honest) + ties/2 (descriptive), firing rates (fraction > 0).

The test (`heldout_tests`) runs only on the k chosen features, on the held-out split, ONE-SIDED in the
direction the selection split chose (a feature whose sign flips between the halves did not replicate):
a permutation test of Cohen's d with labels moved at the level they vary (`stats.label_permutations`:
prompt labels within their group, completion labels within their prompt), so completions of one
prompt are never treated as independent. A Mann-Whitney test on completions did that: in null worlds
with half the variance per prompt it put 20% of features at p < 0.05. The q-values are
Benjamini-Hochberg over the k held-out p-values, valid because the k were chosen on other data.

probes.py and features.py share the numerics of helpers.stats (label permutations, AUROC): a probe's
score and a feature are judged by the same statistics. Labels: y = 1 deceptive, 0 honest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy import stats

from helpers.analysis import logistic
from helpers.stats import (
    bh_qvalues,
    check_labels,
    dense_to_csr,
    group_index,
    label_permutations,
    nested_index,
    permutation_scheme,
    sparse_auroc,
)


def _cohens_d(diff: np.ndarray, pooled_sd: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """diff / pooled_sd; 0 where the feature does not vary (dead or constant), ±inf where it does not
    vary within classes but differs between them. `scale` (max |activation|) sets "does not vary"."""
    tiny = 1e-9 * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        flat_d = np.where(np.abs(diff) <= tiny, 0.0, np.sign(diff) * np.inf)
        return np.where(pooled_sd <= tiny, flat_d, diff / pooled_sd)


def bell_mccaffrey_df(x: np.ndarray, y: np.ndarray, gidx: np.ndarray, n_groups: int) -> float:
    """Bell & McCaffrey's degrees of freedom of the CR2 variance sum_g (sum_{i in g} x_i e_i)^2 of the
    class-mean contrast, under independent homoscedastic errors: with G_g = (I - H) x_g (x_g: the
    weights x on group g's rows, zero elsewhere), df = tr(G'G)^2 / tr((G'G)^2). H projects on the class
    indicators, so G'G = diag(sum_g x^2) - sum_c s_c s_c' / n_c with s_c[g] = sum of x over group g's
    class-c rows: a [G, G] matrix, whatever the number of rows."""
    M = np.diag(np.bincount(gidx, x * x, n_groups))
    for c in (0, 1):
        s_c = np.bincount(gidx[y == c], x[y == c], n_groups)
        M -= np.outer(s_c, s_c) / (y == c).sum()
    return float(np.trace(M) ** 2 / (M * M).sum())


def _chunk_stats(
    a: sp.csc_matrix, y: np.ndarray, gidx: np.ndarray | None, d_only: bool = False
) -> dict[str, np.ndarray]:
    """Statistics of the columns of a [n, c] (CSC, float64) from its non-zero entries: SAE features
    fire on a few % of completions, and a dense float64 copy of [n, c] (with its page faults) cost more
    than the statistics. A zero adds nothing to a sum, so class sums add the same entries in the same
    (row) order as numpy's column sums of the dense array; a class's zeros add m^2 each to its sum of
    squares. `gidx` (group per row) asks for the CI of d; `d_only`: d alone (what the selection uses)."""
    n_cols = a.shape[1]
    dec = y == 1
    n1, n0 = int(dec.sum()), len(y) - int(dec.sum())
    col = np.repeat(np.arange(n_cols), np.diff(a.indptr))  # [nnz] column of each stored entry
    row, v = a.indices, a.data
    e1 = dec[row]  # [nnz] entry in a deceptive row
    m0, m1 = np.bincount(col[~e1], v[~e1], n_cols) / n0, np.bincount(col[e1], v[e1], n_cols) / n1
    ss = np.zeros(n_cols)  # within-class sums of squares about the class means, zeros included
    for e, m_class, n_class in ((~e1, m0, n0), (e1, m1, n1)):
        stored = np.bincount(col[e], minlength=n_cols)
        ss += np.bincount(col[e], (v[e] - m_class[col[e]]) ** 2, n_cols) + (n_class - stored) * m_class**2
    sd = np.sqrt(ss / (n1 + n0 - 2))  # pooled within-class SD
    scale_a = np.zeros(n_cols)  # max |activation| per column (0 for an all-zero one)
    live = np.flatnonzero(np.diff(a.indptr))
    if len(live):
        scale_a[live] = np.maximum.reduceat(np.abs(v), a.indptr[live])
    if d_only:
        return {"d": _cohens_d(m1 - m0, sd, scale_a)}
    fires = v > 0
    out = {
        "d": _cohens_d(m1 - m0, sd, scale_a),
        "m1": m1,
        "m0": m0,
        "auc": sparse_auroc(a, y),  # the AUROC only (as rank_sum's): its p treats completions as independent
        "f1": np.bincount(col[fires & e1], minlength=n_cols) / n1,
        "f0": np.bincount(col[fires & ~e1], minlength=n_cols) / n0,
        "lo": np.full(n_cols, np.nan),
        "hi": np.full(n_cols, np.nan),
    }
    if gidx is None:
        return out
    # Cluster-robust SE of the mean difference with CR2's bias reduction and Bell & McCaffrey's (2002)
    # degrees of freedom (Pustejovsky & Tipton 2018; Imbens & Kolesar 2016): m1 - m0 is the OLS
    # contrast of the activation on two class indicators, whose hat matrix within group g and class c
    # is J / n_c on its m_gc rows, so (I - H_gg)^(-1/2) scales the rows' influence by
    # (1 - m_gc / n_c)^(-1/2). Both depend only on labels and groups: computed once for all features.
    n_groups = int(gidx.max()) + 1
    m = np.stack([np.bincount(gidx[y == c], minlength=n_groups) for c in (0, 1)])  # [2, G] rows per class
    n_c = np.array([[n0], [n1]])
    if n_groups < 3 or (m == n_c).any():  # too few groups, or one group holds a whole class: no CI
        return out
    scale = 1 / np.sqrt(1 - m / n_c)  # [2, G]
    x = np.where(dec, 1 / n1, -1 / n0) * scale[y, gidx]  # [n] adjusted contrast weights
    # Per group g, sum_i x_i (a_i - m_class(i)) = (sum of x_i a_i over the non-zeros) - X_1g m1 - X_0g m0,
    # X_cg = sum of x over g's class-c rows: [G, n_cols], never [n, n_cols] unless every row is its own group.
    xa = np.bincount(gidx[row] * n_cols + col, x[row] * v, n_groups * n_cols).reshape(n_groups, n_cols)
    X0, X1 = (np.bincount(gidx[y == k], x[y == k], n_groups)[:, None] for k in (0, 1))
    se = np.sqrt(((xa - X1 * m1 - X0 * m0) ** 2).sum(0))
    half = stats.t.ppf(0.975, bell_mccaffrey_df(x, y, gidx, n_groups)) * se
    with np.errstate(invalid="ignore", divide="ignore"):
        lo, hi = _cohens_d(m1 - m0 - half, sd, scale_a), _cohens_d(m1 - m0 + half, sd, scale_a)
    out["lo"], out["hi"] = lo, hi
    return out


def feature_stats(
    acts: np.ndarray | sp.spmatrix | sp.sparray,
    y: np.ndarray,
    *,
    groups: Sequence | None = None,
    ci: bool = True,
) -> list[dict[str, Any]]:
    """Per-feature effect sizes of acts [n, d_sae] (one row per completion, e.g. its mean SAE activation
    over tokens; dense, torch or scipy sparse): Cohen's d with its 95% CI, AUROC, means and firing rates
    per class, and no test (`heldout_tests` tests the chosen few). `ci=False` skips the CI (the selection
    split needs none).

    The CI of d is the CI of the mean difference divided by the pooled SD (treated as known): mean
    difference ± t(df) × its cluster-robust SE over the `groups` (None: every row its own group), CR2
    with Bell & McCaffrey's df (`bell_mccaffrey_df`: few groups holding a label give few df). The CR1
    SE with t(G - 1) covered 95-97% of simulated worlds with 16-113 groups (bench/calibration.py) but
    83% when 2-3 of 12 groups held the deceptive label and 92% with 80/20 labels per paraphrase; CR2
    with these df covered 95-99.6% there (tests/analysis/test_calibration.py). The group bootstrap's
    percentile interval covered 91% with 30 groups (89% for features that fire on < 10% of
    completions). Nan when a class sits in one group (or fewer than 3 groups)."""
    c = _feature_arrays(acts, y, groups, ci)
    return _rows(c, range(len(c["d"])))


def _feature_arrays(
    acts: Any, y: np.ndarray, groups: Sequence | None, ci: bool, d_only: bool = False
) -> dict[str, Any]:
    """feature_stats' statistics as arrays [d_sae] (keys of `_chunk_stats`) and the class sizes."""
    if not sp.issparse(acts):
        acts = acts.numpy() if hasattr(acts, "numpy") else np.asarray(acts)
    if acts.ndim != 2:
        raise ValueError(f"acts must be [n_completions, d_sae], got shape {acts.shape}")
    y = check_labels(y, acts.shape[0])
    n1, n0 = int(y.sum()), len(y) - int(y.sum())
    if min(n1, n0) < 2:
        raise ValueError(f"Cohen's d needs >= 2 completions per class, got {n0} honest, {n1} deceptive")
    gidx = group_index(groups)[0] if groups is not None else np.arange(len(y))
    if len(gidx) != len(y):
        raise ValueError(f"{len(gidx)} groups for {len(y)} completions: pass one group per row")
    # [n, d_sae] float64 CSC: the non-zeros column by column, each column's in row order
    A = sp.csc_matrix(acts if sp.issparse(acts) else dense_to_csr(acts), dtype=np.float64)
    chunk = max(1, (1 << 23) // len(y))  # features at a time: [groups, chunk] work arrays of <= ~64 MB
    parts = [
        _chunk_stats(A[:, i : i + chunk], y, gidx if ci else None, d_only)
        for i in range(0, A.shape[1], chunk)
    ]
    return {**{k: np.concatenate([part[k] for part in parts]) for k in parts[0]}, "n0": n0, "n1": n1}


def _rows(c: dict[str, Any], features: Iterable[int]) -> list[dict[str, Any]]:
    """feature_stats' rows of `features` from `_feature_arrays`. Only the rows asked for are built:
    16k dicts per call cost more than their statistics once the garbage collector walks them."""
    f = np.asarray(features, int)
    cols = (c[k][f].tolist() for k in ("d", "lo", "hi", "m0", "m1", "auc", "f0", "f1"))  # python floats
    return [
        {
            "feature": i,
            "cohens_d": d,
            "d_ci": (lo, hi),
            "mean_honest": m0,
            "mean_deceptive": m1,
            "auroc": auc,
            "firing_rate_honest": f0,
            "firing_rate_deceptive": f1,
            "n_honest": c["n0"],
            "n_deceptive": c["n1"],
        }
        for i, d, lo, hi, m0, m1, auc, f0, f1 in zip(f.tolist(), *cols, strict=True)
    ]


def split_by_group(
    groups: Sequence, test_fraction: float = 0.5, seed: int = 0, *, y: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(select_idx, heldout_idx): row indices of two disjoint sets of prompt groups, `test_fraction` of
    the groups held out. With `y`, groups are sorted by their deceptive fraction (random tie-break) and
    every 1/test_fraction-th is held out (systematic sampling), so both sides get similar label mixes."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    gidx, n_groups = group_index(groups)
    rng = np.random.default_rng([seed, 4])
    rate = np.zeros(n_groups) if y is None else np.bincount(gidx, weights=y) / np.bincount(gidx)
    order = np.lexsort((rng.random(n_groups), rate))
    i, u = np.arange(n_groups), rng.random()
    held = order[np.floor((i + 1) * test_fraction + u) > np.floor(i * test_fraction + u)]
    if len(held) in (0, n_groups):
        raise ValueError(
            f"{n_groups} prompt groups cannot be split with test_fraction={test_fraction}: "
            "add prompts from more scenarios or move test_fraction toward 0.5"
        )
    is_held = np.isin(gidx, held)
    select_idx, heldout_idx = np.flatnonzero(~is_held), np.flatnonzero(is_held)
    if y is not None:
        for side, idx, move in (("selection", select_idx, "lower"), ("held-out", heldout_idx, "raise")):
            n1 = int(np.asarray(y)[idx].sum())
            n0 = len(idx) - n1
            if min(n0, n1) < 2:  # Cohen's d needs two of each class (a pooled SD per class)
                short = "deceptive" if n1 < 2 else "honest"
                groups_of = len(np.unique(gidx[idx]))
                raise TooFewCompletions(
                    f"the {side} split ({groups_of} of {n_groups} prompt groups) has {n0} honest and "
                    f"{n1} deceptive completions; the statistics need at least 2 of each. Add prompts so "
                    f"that more groups hold {short} completions (notebook 02: more prompts, or more "
                    f"DATASETS / groups), or {move} test_fraction (now {test_fraction}) to give the {side} "
                    "split more groups."
                )
    return select_idx, heldout_idx


class TooFewCompletions(ValueError):
    """A split of the prompt groups holds fewer than 2 completions of a class: no effect size."""


def heldout_tests(
    acts: np.ndarray,
    y: np.ndarray,
    direction: Sequence[float],
    *,
    groups: Sequence,
    prompts: Sequence | None = None,
    n_permutations: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """One-sided permutation p-values [k] of Cohen's d of the columns of acts [n, k], each in the sign of
    `direction` [k] (+ deceptive higher, - lower), with labels permuted at the level they vary (module
    doc); Phipson & Smyth's (1 + #null >= observed) / (1 + n_permutations). Also returns the scheme."""
    a = np.asarray(acts, np.float64)
    y = check_labels(y, len(a))
    sign = np.sign(np.asarray(direction, float))
    if a.ndim != 2 or len(sign) != a.shape[1]:
        raise ValueError(f"acts must be [n, k] with one direction per column, got {a.shape} and {len(sign)}")
    pidx, gidx = nested_index(prompts, groups)
    Y, units = label_permutations(y, pidx, gidx, n_permutations, np.random.default_rng([seed, 10]))
    Y = np.concatenate([y[None], Y]).astype(np.float64)  # row 0: the observed labels
    x = a - a.mean(0)
    n1 = Y.sum(1, keepdims=True)
    n0 = len(y) - n1
    s1, q1 = _class_sums(Y, x)  # [B + 1, k] deceptive sums of x and x^2
    s0, q0 = x.sum(0) - s1, (x**2).sum(0) - q1
    with np.errstate(invalid="ignore", divide="ignore"):
        ss = q1 - s1**2 / n1 + q0 - s0**2 / n0
        d = (s1 / n1 - s0 / n0) / np.sqrt(np.maximum(ss, 0) / (n1 + n0 - 2))
    d = np.nan_to_num(d * sign, nan=0.0)  # a constant column: no evidence either way
    p = (1 + (d[1:] >= d[0] - 1e-12).sum(0)) / (1 + n_permutations)
    return p, permutation_scheme(units)


def _class_sums(Y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Y @ x, Y @ x^2) for label rows Y [B, n] and columns x [n, k], on the statistics device
    (`logistic.pick_device`: numpy on the CPU, else torch in float64), a block of label rows within
    `logistic.MEMORY_BUDGET` at a time."""
    dev = logistic.pick_device()
    if dev is None:
        return Y @ x, Y @ x**2
    xx = logistic.to_device(np.concatenate([x, x**2], axis=1), dev)
    block = max(1, logistic.MEMORY_BUDGET // (8 * (Y.shape[1] + xx.shape[1])))
    out = np.concatenate(
        [logistic.to_numpy(logistic.to_device(Y[i : i + block], dev) @ xx) for i in range(0, len(Y), block)]
    )
    return out[:, : x.shape[1]], out[:, x.shape[1] :]


def top_features(
    select_stats: list[dict[str, Any]], heldout_stats: list[dict[str, Any]], k: int = 20
) -> list[dict[str, Any]]:
    """The k features with the largest |d| on the selection split, with their HELD-OUT statistics, and
    `rank`, `select_cohens_d` and `direction` ("deceptive higher" / "deceptive lower": the sign the
    selection chose, which the held-out test checks)."""
    if len(select_stats) != len(heldout_stats):
        raise ValueError(
            f"selection stats cover {len(select_stats)} features, held-out {len(heldout_stats)}: "
            "compute both with the same SAE"
        )
    d_sel = np.array([r["cohens_d"] for r in select_stats], float)
    held = {r["feature"]: r for r in heldout_stats}
    chosen = _largest(d_sel, k)
    return _ranked([held[select_stats[i]["feature"]] for i in chosen], d_sel[chosen])


def _largest(d: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |d| (nan last; ties in index order)."""
    return np.argsort(-np.nan_to_num(np.abs(d), nan=-1.0), kind="stable")[:k]


def _ranked(heldout_rows: list[dict[str, Any]], d_sel: np.ndarray) -> list[dict[str, Any]]:
    """The chosen features' held-out rows in rank order with what the selection split chose."""
    return [
        {
            **row,
            "rank": r + 1,
            "select_cohens_d": float(d),
            "direction": "deceptive higher" if d >= 0 else "deceptive lower",
        }
        for r, (row, d) in enumerate(zip(heldout_rows, d_sel, strict=True))
    ]


def select_and_report(
    acts: np.ndarray,
    y: np.ndarray,
    groups: Sequence,
    *,
    prompts: Sequence | None = None,
    k: int = 20,
    test_fraction: float = 0.5,
    n_permutations: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The whole recipe: split by group, choose by |d| on one side, report the other side's statistics
    and test each chosen feature there, one-sided in the chosen direction (`heldout_tests`)."""
    # [n, d_sae] as CSR once: both splits' rows, then their columns (feature_stats), from the non-zeros
    acts = acts if sp.issparse(acts) else np.asarray(acts)
    if acts.ndim != 2:
        raise ValueError(f"acts must be [n_completions, d_sae], got shape {acts.shape}")
    acts = sp.csr_matrix(acts, dtype=np.float64) if sp.issparse(acts) else dense_to_csr(acts)
    y = check_labels(y, acts.shape[0])
    groups = np.asarray([str(g) for g in groups])
    prompts = np.arange(len(y)).astype(str) if prompts is None else np.asarray([str(p) for p in prompts])
    sel, held = split_by_group(groups, test_fraction, seed, y=y)
    d_sel = _feature_arrays(acts[sel], y[sel], None, ci=False, d_only=True)["d"]
    chosen = _largest(d_sel, k)  # as top_features, building rows for the chosen k only
    rows = _ranked(_rows(_feature_arrays(acts[held], y[held], groups[held], ci=True), chosen), d_sel[chosen])
    cols = [r["feature"] for r in rows]
    p, scheme = heldout_tests(
        acts[held][:, cols].toarray(),
        y[held],
        [r["select_cohens_d"] for r in rows],
        groups=groups[held],
        prompts=prompts[held],
        n_permutations=n_permutations,
        seed=seed,
    )
    test = (
        f"one-sided permutation test of held-out d in the chosen direction ({scheme}); "
        f"q: BH over the top {len(rows)}"
    )
    for row, pv, q in zip(rows, p, bh_qvalues(p), strict=True):
        row.update(p_value=float(pv), q_value=float(q), test=test, n_permutations=n_permutations)
    return rows


def token_firing_rates(token_acts_iter: Iterable[Any], token_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature fraction of honest and of deceptive TOKENS with activation > 0.

    token_acts_iter yields [batch, d_sae] activations (numpy or torch) in the order of token_labels
    (one 0/1 per token: its completion's label). Descriptive only: tokens of one completion are not
    independent, and a token's label is its completion's, not evidence about what that token does.
    """
    labels = np.asarray(token_labels).ravel()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("token_labels must be 0/1 (1 = the token's completion is deceptive)")
    fired = {0: 0, 1: 0}
    pos = 0
    for batch in token_acts_iter:
        on = (batch > 0).cpu().numpy() if hasattr(batch, "cpu") else np.asarray(batch) > 0  # [b, d_sae]
        lab = labels[pos : pos + len(on)]
        if len(lab) != len(on):
            raise ValueError(f"the activation stream holds more tokens than token_labels ({len(labels)})")
        fired = {c: fired[c] + on[lab == c].sum(0) for c in (0, 1)}
        pos += len(on)
    if pos != len(labels):
        raise ValueError(
            f"the activation stream held {pos} tokens but token_labels has {len(labels)}: "
            "build both from the same completion ids in the same order"
        )
    n_tok = {c: int((labels == c).sum()) for c in (0, 1)}
    if min(n_tok.values()) == 0:
        raise ValueError(f"token counts honest={n_tok[0]}, deceptive={n_tok[1]}: need tokens of both labels")
    return fired[0] / n_tok[0], fired[1] / n_tok[1]
