"""Which SAE features separate deceptive from honest completions, measured on data not used to pick them.

Features are CHOSEN on one split of the prompt groups and their statistics REPORTED on the other
(`split_by_group`, `top_features`): the 20 largest of 16k effect sizes, reported on the rows that chose
them, report the selection's luck (winner's curse). Per feature, vectorised (16k features in seconds):
- Cohen's d (deceptive minus honest, pooled SD) with a 95% percentile bootstrap CI; pass `groups` to
  resample prompt groups (a cluster bootstrap), since completions of one prompt are not independent;
- AUROC = P(deceptive activation > honest) + ties/2, and the two-sided Mann–Whitney U p-value
  (normal approximation with tie and continuity corrections, as scipy's "asymptotic" method). U treats
  completions as independent, so with several per prompt its p-values are optimistic: read them with
  the group-bootstrap CI of d beside them;
- Benjamini–Hochberg q-values across all features, firing rates (fraction of completions > 0).

probes.py and features.py share the numerics of helpers.stats (cluster-bootstrap weights, weighted AUROC, balanced accuracy): a
probe's score and a feature are judged by the same statistics. Labels: y = 1 deceptive, 0 honest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from helpers.stats import bh_qvalues, check_labels, group_bootstrap_weights, group_index, rank_sum


def _cohens_d(diff: np.ndarray, pooled_sd: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """diff / pooled_sd; 0 where the feature does not vary (dead or constant), ±inf where it does not
    vary within classes but differs between them. `scale` (max |activation|) sets "does not vary"."""
    tiny = 1e-9 * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        flat_d = np.where(np.abs(diff) <= tiny, 0.0, np.sign(diff) * np.inf)
        return np.where(pooled_sd <= tiny, flat_d, diff / pooled_sd)


def _chunk_stats(a: np.ndarray, y: np.ndarray, W: np.ndarray | None) -> dict[str, np.ndarray]:
    """Statistics of the columns of a [n, c] (float64); W [B, n] bootstrap weights or None."""
    dec, hon = y == 1, y == 0
    n1, n0 = int(dec.sum()), int(hon.sum())
    scale = np.abs(a).max(0)
    m1, m0 = a[dec].mean(0), a[hon].mean(0)
    ss = a[dec].var(0) * n1 + a[hon].var(0) * n0  # within-class sums of squares
    auc, p = rank_sum(a, y)
    out = {
        "d": _cohens_d(m1 - m0, np.sqrt(ss / (n1 + n0 - 2)), scale),
        "m1": m1,
        "m0": m0,
        "auc": auc,
        "p": p,
        "f1": (a[dec] > 0).mean(0),
        "f0": (a[hon] > 0).mean(0),
        "lo": np.full(a.shape[1], np.nan),
        "hi": np.full(a.shape[1], np.nan),
    }
    if W is None:
        return out
    # Frequency-weighted means and within-class sums of squares for every draw at once ([B, n] @ [n, c]);
    # centring first keeps the float32 sums of squares accurate.
    x = (a - a.mean(0)).astype(np.float32)
    W1, W0 = W * dec, W * hon
    N1, N0 = W1.sum(1)[:, None], W0.sum(1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        bm1, bm0 = (W1 @ x) / N1, (W0 @ x) / N0
        bss = (W1 @ x**2) - N1 * bm1**2 + (W0 @ x**2) - N0 * bm0**2
        bd = _cohens_d(bm1 - bm0, np.sqrt(np.maximum(bss, 0) / (N1 + N0 - 2)), scale)
    bd[((N1 < 2) | (N0 < 2)).ravel()] = np.nan  # a draw without two rows of each class has no d
    out["lo"], out["hi"] = np.nanpercentile(bd, [2.5, 97.5], axis=0)
    return out


def feature_stats(
    acts: np.ndarray,
    y: np.ndarray,
    *,
    groups: Sequence | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-feature statistics of acts [n, d_sae] (one row per completion, e.g. its mean SAE activation
    over tokens). `n_bootstrap=0` skips the CI of d (the selection split does not need it)."""
    acts = acts.numpy() if hasattr(acts, "numpy") else np.asarray(acts)
    if acts.ndim != 2:
        raise ValueError(f"acts must be [n_completions, d_sae], got shape {acts.shape}")
    y = check_labels(y, len(acts))
    n1, n0 = int(y.sum()), len(y) - int(y.sum())
    if min(n1, n0) < 2:
        raise ValueError(f"Cohen's d needs >= 2 completions per class, got {n0} honest, {n1} deceptive")
    gidx = group_index(groups)[0] if groups is not None else np.arange(len(y))
    if len(gidx) != len(y):
        raise ValueError(f"{len(gidx)} groups for {len(y)} completions: pass one group per row")
    W = group_bootstrap_weights(gidx, n_bootstrap, np.random.default_rng([seed, 5])) if n_bootstrap else None
    chunk = max(1, (1 << 23) // max(len(y), n_bootstrap))  # features at a time: ~64 MB per work array
    parts = [
        _chunk_stats(acts[:, i : i + chunk].astype(np.float64), y, W) for i in range(0, acts.shape[1], chunk)
    ]
    c = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    q = bh_qvalues(c["p"])
    return [
        {
            "feature": f,
            "cohens_d": float(c["d"][f]),
            "d_ci": (float(c["lo"][f]), float(c["hi"][f])),
            "mean_honest": float(c["m0"][f]),
            "mean_deceptive": float(c["m1"][f]),
            "auroc": float(c["auc"][f]),
            "u_p_value": float(c["p"][f]),
            "q_value": float(q[f]),
            "firing_rate_honest": float(c["f0"][f]),
            "firing_rate_deceptive": float(c["f1"][f]),
            "n_honest": n0,
            "n_deceptive": n1,
        }
        for f in range(acts.shape[1])
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
        for side, idx in (("selection", select_idx), ("held-out", heldout_idx)):
            if len(np.unique(np.asarray(y)[idx])) < 2:
                raise ValueError(
                    f"the {side} split of {n_groups} groups has only one label class: "
                    "add prompts (more groups with deceptive completions) or change the seed"
                )
    return select_idx, heldout_idx


def top_features(
    select_stats: list[dict[str, Any]], heldout_stats: list[dict[str, Any]], k: int = 20
) -> list[dict[str, Any]]:
    """The k features with the largest |d| on the selection split, with their HELD-OUT statistics.

    Adds `rank`, `select_cohens_d` and `q_value_selected`: BH over these k held-out p-values only,
    valid because the k were chosen on other data (the held-out `q_value` corrects for all d_sae).
    """
    if len(select_stats) != len(heldout_stats):
        raise ValueError(
            f"selection stats cover {len(select_stats)} features, held-out {len(heldout_stats)}: "
            "compute both with the same SAE"
        )
    d_sel = np.array([r["cohens_d"] for r in select_stats], float)
    chosen = np.argsort(-np.nan_to_num(np.abs(d_sel), nan=-1.0), kind="stable")[:k]
    held = {r["feature"]: r for r in heldout_stats}
    rows = [
        {**held[select_stats[i]["feature"]], "rank": r + 1, "select_cohens_d": float(d_sel[i])}
        for r, i in enumerate(chosen)
    ]
    for row, q in zip(rows, bh_qvalues([row["u_p_value"] for row in rows]), strict=True):
        row["q_value_selected"] = float(q)
    return rows


def select_and_report(
    acts: np.ndarray,
    y: np.ndarray,
    groups: Sequence,
    *,
    k: int = 20,
    test_fraction: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The whole recipe: split by group, choose by |d| on one side, report the other side's statistics."""
    acts, y = np.asarray(acts), check_labels(y, len(acts))
    groups = np.asarray([str(g) for g in groups])
    sel, held = split_by_group(groups, test_fraction, seed, y=y)
    chosen = feature_stats(acts[sel], y[sel], n_bootstrap=0)
    report = feature_stats(acts[held], y[held], groups=groups[held], n_bootstrap=n_bootstrap, seed=seed)
    return top_features(chosen, report, k)


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
