"""Linear probes: is "deceptive vs honest" linearly readable from pooled activations or SAE features?

Every score comes from out-of-fold predictions of a cross-validation GROUPED by prompt group (the
scenario or fact a prompt belongs to): a probe tested on completions of prompts it trained on can score
by recognising the prompt (DESIGN.md §8; test_probes.py shows the inflation). y = 1 deceptive, 0 honest.

- Balanced accuracy at threshold 0.5 (balanced class weights make 0.5 the right threshold) and AUROC,
  on all out-of-fold predictions; 95% percentile CIs from a cluster bootstrap over groups (which groups
  were sampled; the probes are not refitted).
- Permutation p-value (Phipson & Smyth 2010: (1 + #null >= observed) / (1 + n_permutations)) of the
  AUROC, re-running the grouped CV per permutation on the same folds.
- Standardisation is fitted inside each training fold. When d > n_train the probe fits in the training
  rows' SVD coordinates: L2-penalised weights lie in their span, so predictions are unchanged at a
  fraction of the cost (Hastie & Tibshirani 2004). Done once per fold, reused by every permutation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from helpers.run import jsonable
from helpers.stats import (
    balanced_accuracy,
    check_labels,
    group_bootstrap_weights,
    group_index,
    percentile_ci,
    weighted_auroc,
)


@dataclass
class ProbeResult:
    name: str
    balanced_accuracy: float
    ba_ci: tuple[float, float]
    auroc: float
    auroc_ci: tuple[float, float]
    p_value: float  # permutation p-value of the AUROC; nan when n_permutations = 0
    n: int
    n_groups: int
    n_folds: int
    fold_scores: list[float]  # balanced accuracy per test fold, in fold order (for paired tests)
    n_permutations: int
    permutation_scheme: str  # "group labels", "blocks" (see `permuted_labels`) or "none"
    fold_signature: str  # hash of the fold assignment: `compare_paired` refuses results whose folds differ
    details: dict[str, Any] = field(default_factory=dict)
    oof_proba: np.ndarray = field(default=None, repr=False)  # [n] out-of-fold P(deceptive)
    labels: np.ndarray = field(default=None, repr=False)  # [n] 0/1
    group_idx: np.ndarray = field(default=None, repr=False)  # [n] group index 0..n_groups-1

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-row arrays, JSON-ready (nan -> None), for probes.json."""
        return jsonable({k: v for k, v in vars(self).items() if not isinstance(v, np.ndarray)})


def grouped_folds(
    groups: Sequence, n_folds: int = 5, seed: int = 0, *, y: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of (train_idx, test_idx) in which no group is on both sides; stratified by `y` when
    given (sklearn's StratifiedGroupKFold keeps each fold's class balance close to the whole)."""
    gidx, n_groups = group_index(groups)
    if n_folds < 2 or n_groups < n_folds:
        raise ValueError(
            f"{n_folds}-fold grouped CV needs at least {max(n_folds, 2)} prompt groups and n_folds >= 2, "
            f"got {n_groups} groups: lower n_folds to at most {n_groups} or add prompts from more scenarios"
        )
    labels = np.zeros(len(gidx), int) if y is None else np.asarray(y)
    if len(labels) != len(gidx):
        raise ValueError(f"{len(gidx)} groups for {len(labels)} labels: pass one group per completion")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(gidx)), labels, gidx)]


def probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: Sequence,
    *,
    n_folds: int = 5,
    seed: int = 0,
    n_permutations: int = 200,
    n_bootstrap: int = 1000,
    C: float = 1.0,
    name: str = "",
) -> ProbeResult:
    """Grouped-CV logistic-regression probe on X [n, d] (pooled activations or SAE features). Cost on 2 CPU
    cores at n = 1000 with 200 permutations: ~15 s for d = 2048, ~80 s for d_sae = 16k."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be [n, d] with n = len(y) = {len(y)}, got shape {X.shape}")
    design = partial(_standardised, X)
    return _cross_validate(design, y, groups, n_folds, seed, n_permutations, n_bootstrap, C, name)


def bag_of_words_probe(
    texts: Sequence[str],
    y: np.ndarray,
    groups: Sequence,
    *,
    n_folds: int = 5,
    seed: int = 0,
    n_permutations: int = 200,
    n_bootstrap: int = 1000,
    C: float = 1.0,
    name: str = "bag_of_words",
    top_terms: int = 10,
) -> ProbeResult:
    """The surface-wording control: a probe on which words and word pairs a completion contains
    (binary unigrams + bigrams seen in >= 2 training texts, scaled to unit variance like the activation
    probe's inputs, so the L2 penalty treats every term alike), fitted inside each training fold. If it
    matches the activation probe, the activations may only be reading wording. `details["top_terms"]`
    lists the terms a fit on all rows weighs most per class (descriptive: what gives the label away)."""
    texts = list(texts)
    if len(texts) != len(y):
        raise ValueError(f"{len(texts)} texts but {len(y)} labels: pass one text per labelled completion")

    def vectorise(tr: np.ndarray, te: np.ndarray):
        vec = CountVectorizer(binary=True, ngram_range=(1, 2), min_df=2).fit([texts[i] for i in tr])
        Z_tr, Z_te = vec.transform([texts[i] for i in tr]), vec.transform([texts[i] for i in te])
        scaler = StandardScaler(with_mean=False).fit(Z_tr)  # sparse stays sparse
        return scaler.transform(Z_tr), scaler.transform(Z_te), vec

    result = _cross_validate(vectorise, y, groups, n_folds, seed, n_permutations, n_bootstrap, C, name)
    everything = np.arange(len(texts))
    Z, _, vec = vectorise(everything, everything)
    order = np.argsort(_fit(Z, result.labels, C).coef_[0])
    terms = vec.get_feature_names_out()
    result.details["top_terms"] = {
        "deceptive": [str(terms[i]) for i in order[::-1][:top_terms]],
        "honest": [str(terms[i]) for i in order[:top_terms]],
    }
    return result


def random_direction_control(
    X: np.ndarray,
    y: np.ndarray,
    groups: Sequence,
    *,
    n_directions: int = 20,
    dim: int = 1,
    n_folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
) -> dict[str, Any]:
    """Balanced accuracy of probes that may only read `dim` random unit directions of X's space.

    Default dim = 1: "how well does an arbitrary direction separate the classes?". If deception shifts
    activations broadly (norm, length), random directions score well above 0.5, and a learned probe at
    that level shows nothing specific. Same folds as `probe` with the same seed; no permutation test."""
    X = np.asarray(X, dtype=np.float64)
    y = check_labels(y, len(X))
    folds = grouped_folds(groups, n_folds, seed, y=y)
    rng = np.random.default_rng([seed, 2])
    bas, aucs = [], []
    for _ in range(n_directions):
        R = rng.standard_normal((X.shape[1], dim))
        Z = X @ (R / np.linalg.norm(R, axis=0))  # [n, dim] projections on unit directions
        proba = _oof_proba([_standardised(Z, tr, te) for tr, te in folds], folds, y, C)
        bas.append(float(balanced_accuracy(proba, y)))
        aucs.append(float(weighted_auroc(proba, y)[0]))
    q5, q50, q95 = np.percentile(bas, [5, 50, 95]).tolist()
    return {
        "name": f"random_{dim}d",
        "dim": dim,
        "n_directions": n_directions,
        "balanced_accuracies": bas,
        "aurocs": aucs,
        "ba_mean": float(np.mean(bas)),
        "ba_quantiles": {"5%": q5, "50%": q50, "95%": q95},
        "ba_max": float(np.max(bas)),
    }


def compare_paired(a: ProbeResult, b: ProbeResult, *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Is probe `a` better than probe `b` on the same rows and folds?

    Test: Nadeau & Bengio's (2003) corrected paired t-test on per-fold balanced accuracy. Folds share
    training rows, so their scores correlate and a plain paired t-test is anticonservative; the variance
    factor 1/k becomes 1/k + n_test/n_train = 1/k + 1/(k-1), df = k - 1 (a Wilcoxon test on 5 folds
    cannot reach p < 0.0625). Beside it, paired cluster-bootstrap CIs of the pooled differences.
    """
    if a.fold_signature != b.fold_signature or not np.array_equal(a.labels, b.labels):
        raise ValueError(
            f"probes {a.name!r} and {b.name!r} were not run on the same rows and folds "
            f"(fold signatures {a.fold_signature} vs {b.fold_signature}): run both on the same completions "
            "with the same groups, n_folds and seed"
        )
    diff = np.asarray(a.fold_scores) - np.asarray(b.fold_scores)
    k = len(diff)
    se = np.sqrt(diff.var(ddof=1) * (1 / k + 1 / (k - 1)))
    with np.errstate(divide="ignore", invalid="ignore"):  # se = 0: the same difference in every fold
        t = float(diff.mean() / se) if diff.mean() != 0 else 0.0
    p = float(2 * stats.t.sf(abs(t), k - 1))
    W = group_bootstrap_weights(a.group_idx, n_bootstrap, np.random.default_rng([seed, 3]))
    d_ba = balanced_accuracy(a.oof_proba, a.labels, W) - balanced_accuracy(b.oof_proba, b.labels, W)
    d_auc = weighted_auroc(a.oof_proba, a.labels, W) - weighted_auroc(b.oof_proba, b.labels, W)
    return {
        "a": a.name,
        "b": b.name,
        "test": "Nadeau-Bengio corrected paired t-test on fold balanced accuracy",
        "mean_difference": float(diff.mean()),
        "fold_differences": diff.tolist(),
        "t": t,
        "df": k - 1,
        "p_value": p,
        "ba_difference": a.balanced_accuracy - b.balanced_accuracy,
        "ba_difference_ci": percentile_ci(d_ba),
        "auroc_difference": a.auroc - b.auroc,
        "auroc_difference_ci": percentile_ci(d_auc),
    }


def sae_features(sae: Any, X: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """SAE feature activations [n, d_sae] (float32) of vectors X [n, d_in], encoded in batches.

    Encoding a mean-pooled vector is not the mean of per-token feature activations (the encoder is
    nonlinear): for per-feature statistics (features.py) pool the per-token activations instead."""
    d_in = int(sae.d_in)
    if X.ndim != 2 or X.shape[1] != d_in:
        raise ValueError(
            f"the SAE reads vectors of d_in={d_in} but the pooled activations are shaped {tuple(X.shape)} "
            f"(d_model={X.shape[-1]}): use the SAE trained on this model and layer (its sae_id names it)"
        )
    params = list(sae.parameters()) if isinstance(sae, torch.nn.Module) else []
    device, dtype = (params[0].device, params[0].dtype) if params else (torch.device("cpu"), torch.float32)
    X, out = torch.as_tensor(X), []
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            acts, _ = sae.encode(X[start : start + batch_size].to(device, dtype))
            out.append(acts.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, int(sae.d_sae)), np.float32)


def permuted_labels(y: np.ndarray, gidx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One draw of labels under the null, respecting the grouping.

    - Labels constant within every group ("group labels"): the group labels are permuted across groups.
    - Otherwise ("blocks"): whole label blocks are exchanged between groups of equal size, then
      shuffled within each group. A plain shuffle of all rows would break the clustering of labels
      by prompt (some prompts elicit lies far more often), making the null too narrow under grouped CV.
    """
    sizes, n_dec = np.bincount(gidx), np.bincount(gidx, weights=y)
    if np.all((n_dec == 0) | (n_dec == sizes)):
        return rng.permutation((n_dec > 0).astype(y.dtype))[gidx], "group labels"
    members = [np.flatnonzero(gidx == g) for g in range(len(sizes))]
    out = np.empty_like(y)
    for size in np.unique(sizes):
        same = np.flatnonzero(sizes == size)
        for dst, src in zip(same, rng.permutation(same), strict=True):
            out[members[dst]] = rng.permutation(y[members[src]])
    return out, "blocks"


def _cross_validate(
    design: Callable[..., tuple], y, groups, n_folds, seed, n_permutations, n_bootstrap, C, name
):
    gidx, n_groups = group_index(groups)
    y = check_labels(y, len(gidx))
    folds = grouped_folds(groups, n_folds, seed, y=y)
    for i, (tr, _) in enumerate(folds):
        if len(np.unique(y[tr])) < 2:
            gone = 1 - y[tr][0]  # the class this training fold lacks
            raise ValueError(
                f"training fold {i} has no {('honest', 'deceptive')[gone]} completions: they come from "
                f"{len(np.unique(gidx[y == gone]))} prompt group(s), and each class needs several groups "
                f"(ideally >= n_folds={n_folds}): add prompts or lower n_folds"
            )
    # design(train_idx, test_idx) -> (Z_train, Z_test, ...): label-independent, reused by every permutation
    designs = [design(tr, te)[:2] for tr, te in folds]
    proba = _oof_proba(designs, folds, y, C)
    fold_scores = [float(balanced_accuracy(proba[te], y[te])) for _, te in folds]
    ba, auc = float(balanced_accuracy(proba, y)), float(weighted_auroc(proba, y)[0])
    W = group_bootstrap_weights(gidx, n_bootstrap, np.random.default_rng([seed, 0]))
    rng = np.random.default_rng([seed, 1])
    null, scheme = [], "none"
    for _ in range(n_permutations):
        y_perm, scheme = permuted_labels(y, gidx, rng)
        null.append(weighted_auroc(_oof_proba(designs, folds, y_perm, C), y_perm)[0])
    p = (1 + np.sum(np.asarray(null) >= auc)) / (1 + n_permutations) if n_permutations else np.nan
    assignment = np.zeros(len(y), int)  # test fold of each row
    for i, (_, te) in enumerate(folds):
        assignment[te] = i
    return ProbeResult(
        name=name,
        balanced_accuracy=ba,
        ba_ci=percentile_ci(balanced_accuracy(proba, y, W)),
        auroc=auc,
        auroc_ci=percentile_ci(weighted_auroc(proba, y, W)),
        p_value=float(p),
        n=len(y),
        n_groups=n_groups,
        n_folds=n_folds,
        fold_scores=fold_scores,
        n_permutations=n_permutations,
        permutation_scheme=scheme,
        fold_signature=hashlib.sha1(assignment.tobytes() + y.tobytes()).hexdigest()[:12],
        details={"C": C, "seed": seed, "n_bootstrap": n_bootstrap, "class_balance": float(y.mean())},
        oof_proba=proba,
        labels=y,
        group_idx=gidx,
    )


def _standardised(X: np.ndarray, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score with the training fold's mean/std; SVD coordinates when d > n_train (module doc)."""
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0  # a column constant on the training fold carries nothing; avoid 0/0
    Z_tr, Z_te = (X[tr] - mu) / sd, (X[te] - mu) / sd
    if Z_tr.shape[1] > Z_tr.shape[0]:
        # Z_tr = U S V^T via the Gram matrix Z_tr Z_tr^T = U S^2 U^T (10x faster than an SVD at 800 x 16k):
        # train coordinates U S, test coordinates Z_te V = Z_te Z_tr^T U / S.
        gram = Z_tr @ Z_tr.T
        with threadpool_limits(limits=1):  # a threaded eigh ran 50x slower on a busy 2-core VM
            eig, U = np.linalg.eigh(gram)
        keep = eig > eig[-1] * 1e-12  # numerically null directions carry nothing
        S = np.sqrt(eig[keep])
        Z_tr, Z_te = U[:, keep] * S, (Z_te @ Z_tr.T) @ U[:, keep] / S
    return Z_tr, Z_te


def _fit(Z: Any, y: np.ndarray, C: float) -> LogisticRegression:
    # Balanced classes: 0.5 is the BA threshold. Default tol: 1.5-2.3x faster than 1e-6, BA/AUROC +-0.002.
    return LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(Z, y)


def _oof_proba(designs: list, folds: list, y: np.ndarray, C: float) -> np.ndarray:
    """Out-of-fold P(deceptive) [n]. A permuted training fold with one class predicts 0.5 (no information)."""
    proba = np.full(len(y), 0.5)
    # One BLAS thread: these fits are small (d <= n_train after the SVD), so threads only add
    # synchronisation, and on a busy 2-core VM oversubscription made them up to 20x slower.
    with threadpool_limits(limits=1):
        for (Z_tr, Z_te), (tr, te) in zip(designs, folds, strict=True):
            if len(np.unique(y[tr])) == 2:
                proba[te] = _fit(Z_tr, y[tr], C).predict_proba(Z_te)[:, 1]
    return proba
