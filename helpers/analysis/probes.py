"""Linear probes: is "deceptive vs honest" linearly readable from pooled activations or SAE features?

Every score comes from out-of-fold predictions of a cross-validation GROUPED by prompt group (the
scenario or fact a prompt belongs to): a probe tested on completions of prompts it trained on can score
by recognising the prompt (DESIGN.md §8; test_probes.py shows the inflation). y = 1 deceptive, 0 honest.

- Balanced accuracy at threshold 0.5 (balanced class weights make 0.5 the right threshold) and AUROC,
  on all out-of-fold predictions.
- 95% CIs from a cluster bootstrap WITH REFITTING: each draw resamples the prompt groups (a group drawn
  twice counts twice, on one side of its fold) and reruns the whole grouped CV on the draw, so the
  interval includes how much the probe itself changes with its training data; percentile interval,
  widened to include the estimate when the estimate falls outside it.
  Bootstrapping fixed out-of-fold predictions instead covered the truth in only 77-90% of null worlds.
  Measured in simulated worlds (bench/calibration.py): the refitted percentile interval covered the
  true balanced accuracy in 96-100% of worlds from BA 0.5 to 0.97; the draws centre near the truth
  rather than on the estimate, so the basic interval (reflected about the estimate) covered 66-93%
  and the normal one (estimate ± 1.96 SD of the draws) 88% at BA 0.97 (0.90 over 300 worlds when
  rechecked: at high BA the draws' long lower tail is what the percentile interval keeps and the
  normal one cuts; elsewhere the two are as wide, and the widening never triggered).
- Permutation p-value (Phipson & Smyth 2010: (1 + #null >= observed) / (1 + n_permutations)) of the
  AUROC, re-running the grouped CV per permutation on the same folds, with labels permuted at the level
  they vary (`helpers.stats.label_permutations`: prompt labels within their group, never completions
  across the prompts of a group). Pass `prompts` whenever several completions share a prompt.
- Standardisation is fitted inside each training fold, and the probe fits in the training rows' SVD
  coordinates: L2-penalised weights lie in their span, so predictions are unchanged (Hastie &
  Tibshirani 2004), and in those coordinates the many refits (permutations, bootstrap draws) of one
  fold are solved together (`logistic.fit`). Done once per fold, reused by every refit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy import stats
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import ThreadpoolController

from helpers.analysis import logistic
from helpers.model.protocols import EncodingSAE
from helpers.run import jsonable, override_fields
from helpers.stats import (
    auroc_rows,
    balanced_accuracy,
    balanced_accuracy_rows,
    check_labels,
    dense_to_csr,
    group_bootstrap_weights,
    group_index,
    label_permutations,
    nested_index,
    percentile_ci,
    permutation_scheme,
    weighted_auroc,
)

try:  # scipy's CSR product kernel (behind A @ B), called with room for a dense result: `_dense_product`
    from scipy.sparse._sparsetools import csr_matmat as _csr_matmat
except ImportError:  # a scipy without it: A @ B, the same kernel and numbers, plus its counting pass
    _csr_matmat = None

_THREADS = ThreadpoolController()  # inspected once: each threadpool_limits() call rescans the libraries
CI_METHOD = "95% percentile cluster bootstrap over prompt groups, probe refitted in every draw"


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe is cross-validated and tested (`probe`, `bag_of_words_probe`). A whole
    `settings=ProbeSettings(...)` or single fields as keywords (`n_folds=4`), which win over it."""

    n_folds: int = 5
    """Grouped cross-validation folds."""
    seed: int = 0
    """Seeds the folds, the permutations and the bootstrap draws."""
    n_permutations: int = 200
    """Label permutations for the p-value (0: none)."""
    n_bootstrap: int = 200
    """Refitted cluster-bootstrap draws for the CIs (0: none)."""
    C: float = 1.0
    """Inverse L2 penalty of the logistic regression."""

    def with_overrides(self, overrides: dict[str, Any]) -> ProbeSettings:
        """These settings with the fields named in `overrides` replaced (unknown names are refused)."""
        return override_fields(self, overrides, "probe settings")


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
    n_prompts: int
    n_folds: int
    fold_scores: list[float]  # balanced accuracy per test fold, in fold order (for paired tests)
    n_permutations: int
    permutation_scheme: str  # what `stats.label_permutations` moved (or "none")
    n_bootstrap: int
    ci_method: str
    fold_signature: str  # hash of the fold assignment: `compare_paired` refuses results whose folds differ
    details: dict[str, Any] = field(default_factory=dict)
    oof_proba: np.ndarray = field(default=None, repr=False)  # [n] out-of-fold P(deceptive)
    labels: np.ndarray = field(default=None, repr=False)  # [n] 0/1
    group_idx: np.ndarray = field(default=None, repr=False)  # [n] group index 0..n_groups-1
    boot_ba: np.ndarray = field(default=None, repr=False)  # [n_bootstrap] refitted draws (paired tests)
    boot_auroc: np.ndarray = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-row arrays, JSON-ready (nan -> None), for probes.json."""
        return jsonable({k: v for k, v in vars(self).items() if not isinstance(v, np.ndarray)})


def grouped_folds(
    groups: Sequence, n_folds: int = 5, seed: int = 0, *, y: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of (train_idx, test_idx) in which no group is on both sides; stratified by `y` when
    given (sklearn's StratifiedGroupKFold keeps each fold's class balance close to the whole).

    Stratification uses only what the permutation test keeps fixed: a group with both labels is
    balanced by its rows' labels (permutations move labels within it), while a one-label group counts
    as a third class whatever its label (permutations move its label to other groups). Folds that
    depended on which one-label groups are deceptive would differ for every permuted label vector, and
    the permutation test (run on the observed folds) rejected 14% at 0.10 in such null worlds."""
    gidx, n_groups = group_index(groups)
    if n_folds < 2 or n_groups < n_folds:
        raise ValueError(
            f"{n_folds}-fold grouped CV needs at least {max(n_folds, 2)} prompt groups and n_folds >= 2, "
            f"got {n_groups} groups: lower n_folds to at most {n_groups} or add prompts from more scenarios"
        )
    labels = np.zeros(len(gidx), int) if y is None else np.asarray(y).astype(int)
    if len(labels) != len(gidx):
        raise ValueError(f"{len(gidx)} groups for {len(labels)} labels: pass one group per completion")
    g_rate = np.bincount(gidx, labels, n_groups) / np.bincount(gidx, minlength=n_groups)
    labels = np.where((g_rate[gidx] > 0) & (g_rate[gidx] < 1), labels, 2)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(gidx)), labels, gidx)]


def probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: Sequence,
    *,
    prompts: Sequence | None = None,
    settings: ProbeSettings | None = None,
    name: str = "",
    **overrides: Any,
) -> ProbeResult:
    """Grouped-CV logistic-regression probe on X [n, d] (pooled activations or SAE features); `prompts`
    (one id per row; None: every row its own prompt) sets the permutation level. Every refit is a
    permutation or a bootstrap draw: cost grows with n_permutations + n_bootstrap (bench/probe_cost.py).
    `settings` (default `ProbeSettings()`), or any of its fields as keywords (`n_folds=4`)."""
    s = (settings or ProbeSettings()).with_overrides(overrides)
    X = design_input(X)
    if X.ndim != 2 or X.shape[0] != len(y):
        raise ValueError(f"X must be [n, d] with n = len(y) = {len(y)}, got shape {X.shape}")
    return _cross_validate(partial(standardised_design, X), y, groups, prompts, s, name)


def bag_of_words_probe(
    texts: Sequence[str],
    y: np.ndarray,
    groups: Sequence,
    *,
    prompts: Sequence | None = None,
    settings: ProbeSettings | None = None,
    name: str = "bag_of_words",
    top_terms: int = 10,
    **overrides: Any,
) -> ProbeResult:
    """The surface-wording control: a probe on which words and word pairs a completion contains
    (binary unigrams + bigrams seen in >= 2 training texts, scaled to unit variance like the activation
    probe's inputs, so the L2 penalty treats every term alike), fitted inside each training fold. If it
    matches the activation probe, the activations may only be reading wording. `details["top_terms"]`
    lists the terms a fit on all rows weighs most per class (descriptive: what gives the label away).
    `settings` (default `ProbeSettings()`), or any of its fields as keywords."""
    s = (settings or ProbeSettings()).with_overrides(overrides)
    texts = list(texts)
    if len(texts) != len(y):
        raise ValueError(f"{len(texts)} texts but {len(y)} labels: pass one text per labelled completion")

    vectorise = partial(bag_of_words_design, texts)
    result = _cross_validate(vectorise, y, groups, prompts, s, name)
    everything = np.arange(len(texts))
    Z, _, vec = vectorise(everything, everything)
    W, c = logistic.fit(Z, result.labels[None], logistic.balanced_weights(result.labels), s.C)
    # Back from SVD coordinates Z = Z_terms V (columns of squared norm S^2) to one weight per term:
    # V w = Z_terms^T Z (w / S^2).
    Z_terms = StandardScaler(with_mean=False).fit_transform(vec.transform(texts))
    order = np.argsort(np.asarray(Z_terms.T @ (Z @ (W[0] / (Z * Z).sum(0)))).ravel())
    terms = vec.get_feature_names_out()
    result.details["top_terms"] = {
        "deceptive": [str(terms[i]) for i in order[::-1][:top_terms]],
        "honest": [str(terms[i]) for i in order[:top_terms]],
    }
    return result


def bag_of_words_design(texts: Sequence[str], tr: np.ndarray, te: np.ndarray) -> tuple[Any, Any, Any]:
    """(Z_train, Z_test, vectoriser): the bag-of-words probe's design, binary unigrams + bigrams seen in
    >= 2 training texts, scaled to unit variance on the training rows, in SVD coordinates."""
    vec = CountVectorizer(binary=True, ngram_range=(1, 2), min_df=2).fit([texts[i] for i in tr])
    Z_tr, Z_te = vec.transform([texts[i] for i in tr]), vec.transform([texts[i] for i in te])
    scaler = StandardScaler(with_mean=False).fit(Z_tr)  # sparse stays sparse
    return *_svd_coordinates(scaler.transform(Z_tr), scaler.transform(Z_te)), vec


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
    X = design_input(X)  # sparse SAE features: 20 sparse products instead of a float64 copy and dense ones
    y = check_labels(y, X.shape[0])
    folds = grouped_folds(groups, n_folds, seed, y=y)
    rng = np.random.default_rng([seed, 2])
    bas, aucs = [], []
    for _ in range(n_directions):
        R = rng.standard_normal((X.shape[1], dim))
        Z = X @ (R / np.linalg.norm(R, axis=0))  # [n, dim] projections on unit directions
        proba = _refit([standardised_design(Z, tr, te) for tr, te in folds], folds, y[None], None, C)[0][0]
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


def compare_paired(a: ProbeResult, b: ProbeResult) -> dict:
    """Is probe `a` better than probe `b` on the same rows and folds?

    Test: Nadeau & Bengio's (2003) corrected paired t-test on per-fold balanced accuracy. Folds share
    training rows, so their scores correlate and a plain paired t-test is anticonservative; the variance
    factor 1/k becomes 1/k + n_test/n_train = 1/k + 1/(k-1), df = k - 1 (a Wilcoxon test on 5 folds
    cannot reach p < 0.0625). Beside it, CIs of the differences from the two probes' refitted bootstrap
    draws, which resampled the same groups (same seed), so each draw's difference is paired.
    """
    if a.fold_signature != b.fold_signature or not np.array_equal(a.labels, b.labels):
        raise ValueError(
            f"probes {a.name!r} and {b.name!r} were not run on the same rows and folds "
            f"(fold signatures {a.fold_signature} vs {b.fold_signature}): run both on the same completions "
            "with the same groups, n_folds and seed"
        )
    diff = np.asarray(a.fold_scores) - np.asarray(b.fold_scores)
    k = len(diff)
    test = "Nadeau-Bengio corrected paired t-test on fold balanced accuracy"
    if np.ptp(diff) <= 1e-12:  # the same difference in every fold: the t statistic's variance is 0
        t = 0.0 if abs(diff.mean()) <= 1e-12 else float(np.sign(diff.mean()) * np.inf)
        # t = ±inf would give p = 0, which no test of k folds can support: the exact two-sided sign test
        # (every fold on one side) is the smallest p these folds can give.
        p = 1.0 if t == 0 else min(1.0, 2 * 0.5**k)
        if t != 0:
            test = "exact sign test on fold balanced accuracy (the same difference in every fold: no t-test)"
    else:
        se = np.sqrt(diff.var(ddof=1) * (1 / k + 1 / (k - 1)))
        t = float(diff.mean() / se)
        p = float(2 * stats.t.sf(abs(t), k - 1))
    paired = a.boot_ba is not None and b.boot_ba is not None and len(a.boot_ba) == len(b.boot_ba) > 0
    d_ba = a.balanced_accuracy - b.balanced_accuracy
    d_auc = a.auroc - b.auroc
    return {
        "a": a.name,
        "b": b.name,
        "test": test,
        "mean_difference": float(diff.mean()),
        "fold_differences": diff.tolist(),
        "t": t,
        "df": k - 1,
        "p_value": p,
        "ba_difference": d_ba,
        "ba_difference_ci": percentile_ci(a.boot_ba - b.boot_ba) if paired else (np.nan, np.nan),
        "auroc_difference": d_auc,
        "auroc_difference_ci": percentile_ci(a.boot_auroc - b.boot_auroc) if paired else (np.nan, np.nan),
    }


def sae_features(sae: EncodingSAE, X: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
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


def _interval(estimate: float, draws: np.ndarray) -> tuple[float, float]:
    """The percentile interval of refitted draws, widened to include the estimate when it falls outside
    (the draws centre near the truth, not on the estimate: module doc); nan without draws."""
    if not len(draws):
        return (np.nan, np.nan)
    lo, hi = percentile_ci(draws)
    return (min(lo, estimate), max(hi, estimate))


def _cross_validate(
    design: Callable[..., tuple],
    y: np.ndarray,
    groups: Sequence,
    prompts: Sequence | None,
    settings: ProbeSettings,
    name: str,
) -> ProbeResult:
    """The grouped CV of `probe` and `bag_of_words_probe` on `design(train_idx, test_idx)`, with the
    refitted bootstrap and the permutation test that `settings` asks for (module doc)."""
    n_folds, seed, C = settings.n_folds, settings.seed, settings.C
    n_permutations, n_bootstrap = settings.n_permutations, settings.n_bootstrap
    pidx, gidx = nested_index(prompts, groups)
    n_groups = int(gidx.max()) + 1
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
    # design(train_idx, test_idx) -> (Z_train, Z_test, ...): label-independent, reused by every refit
    designs = [design(tr, te)[:2] for tr, te in folds]
    proba, fits = _refit(designs, folds, y[None], None, C)
    proba = proba[0]
    fold_scores = [float(balanced_accuracy(proba[te], y[te])) for _, te in folds]
    ba, auc = float(balanced_accuracy(proba, y)), float(weighted_auroc(proba, y)[0])

    boot_ba = boot_auc = np.zeros(0)
    if n_bootstrap:
        counts = group_bootstrap_weights(gidx, n_bootstrap, np.random.default_rng([seed, 0])).astype(
            np.float64
        )
        # Each draw's refit starts at the probe's own fit of its fold: the draws' optima lie near it
        # (7 Newton steps instead of 14 on SAE features at d32 scale); a permutation's do not.
        boot = _refit(designs, folds, np.broadcast_to(y, counts.shape), counts, C, fits)[0]
        boot_ba, boot_auc = balanced_accuracy_rows(boot, y, counts), auroc_rows(boot, y, counts)
    p, scheme = np.nan, "none"
    if n_permutations:
        Y, units = label_permutations(y, pidx, gidx, n_permutations, np.random.default_rng([seed, 1]))
        null = auroc_rows(_refit(designs, folds, Y, None, C)[0], Y)
        p, scheme = (1 + np.sum(null >= auc - 1e-12)) / (1 + n_permutations), permutation_scheme(units)
    assignment = np.zeros(len(y), int)  # test fold of each row
    for i, (_, te) in enumerate(folds):
        assignment[te] = i
    return ProbeResult(
        name=name,
        balanced_accuracy=ba,
        ba_ci=_interval(ba, boot_ba),
        auroc=auc,
        auroc_ci=_interval(auc, boot_auc),
        p_value=float(p),
        n=len(y),
        n_groups=n_groups,
        n_prompts=int(pidx.max()) + 1,
        n_folds=n_folds,
        fold_scores=fold_scores,
        n_permutations=n_permutations,
        permutation_scheme=scheme,
        n_bootstrap=n_bootstrap,
        ci_method=CI_METHOD,
        fold_signature=hashlib.sha1(assignment.tobytes() + y.tobytes()).hexdigest()[:12],
        details={"C": C, "seed": seed, "class_balance": float(y.mean())},
        oof_proba=proba,
        labels=y,
        group_idx=gidx,
        boot_ba=boot_ba,
        boot_auroc=boot_auc,
    )


def _svd_coordinates(Z_tr: Any, Z_te: Any) -> tuple[np.ndarray, np.ndarray]:
    """Training rows in their SVD coordinates U S [n_tr, r] and test rows in the same basis Z_te V,
    from the smaller of the two Gram matrices (dense or sparse inputs). Z_tr^T Z_tr becomes diagonal,
    which is what `logistic.fit`'s preconditioner needs, and r <= min(n_tr, d).

    Dense inputs: the products run where `logistic.pick_device()` says (numpy on the CPU, else torch,
    float64), streamed through the device in blocks of `logistic.MEMORY_BUDGET`; the small [r, r]
    eigendecomposition runs in numpy on the CPU either way, so both paths share it."""
    n, d = Z_tr.shape
    if sp.issparse(Z_tr) and d > n:  # bag of words: the sparse products, on the CPU
        Z_trt = Z_tr.T.tocsr()
        return _coordinates_from_gram(_dense_product(Z_tr, Z_trt), _dense_product(Z_te, Z_trt))
    Z_tr = np.asarray(Z_tr.todense()) if sp.issparse(Z_tr) else np.asarray(Z_tr, np.float64)
    Z_te = np.asarray(Z_te.todense()) if sp.issparse(Z_te) else np.asarray(Z_te, np.float64)
    dev = logistic.pick_device()
    put = partial(logistic.to_device, dev=dev)
    # blocks of columns (d > n) or rows (d <= n) of this size fit the budget on the device
    block = max(n, d, 1) if dev is None else max(1, logistic.MEMORY_BUDGET // (8 * (n + len(Z_te) + d)))
    if d > n:  # Z_tr = U S V^T via Z_tr Z_tr^T = U S^2 U^T; test: Z_te V = Z_te Z_tr^T U / S
        gram, cross = 0, 0
        for j in range(0, d, block):
            A, T = put(Z_tr[:, j : j + block]), put(Z_te[:, j : j + block])
            gram, cross = gram + A @ A.T, cross + T @ A.T
        eig, U, keep = _eigh(logistic.to_numpy(gram))
        S = np.sqrt(eig[keep])
        return U[:, keep] * S, logistic.to_numpy(cross @ put(U[:, keep])) / S
    gram = 0
    for i in range(0, n, block):
        A = put(Z_tr[i : i + block])
        gram = gram + A.T @ A
    eig, V, keep = _eigh(logistic.to_numpy(gram))
    Vk = put(V[:, keep])

    def rotate(M):  # M V, a block of rows at a time
        parts = [logistic.to_numpy(put(M[i : i + block]) @ Vk) for i in range(0, len(M), block)]
        return np.concatenate(parts) if parts else np.zeros((0, len(Vk.T)))

    return rotate(Z_tr), rotate(Z_te)


def _coordinates_from_gram(gram: np.ndarray, cross: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SVD coordinates from the training rows' Gram Z_tr Z_tr^T [n, n] and the test rows' cross products
    Z_te Z_tr^T [m, n]: Z_tr = U S V^T gives Z_tr V = U S and Z_te V = Z_te Z_tr^T U / S."""
    eig, U, keep = _eigh(gram)
    S = np.sqrt(eig[keep])
    return U[:, keep] * S, cross @ U[:, keep] / S


def _eigh(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues, eigenvectors and which to keep (numerically null directions carry nothing)."""
    # A threaded eigh ran 50x slower on a busy 2-core VM; the products keep their threads.
    with _THREADS.limit(limits=1):
        eig, U = np.linalg.eigh(gram)
    return eig, U, eig > max(eig[-1], 0) * 1e-12


SPARSE_DENSITY = 0.1
"""Wide inputs with at most this fraction of non-zero entries (SAE features: ~1,000 of 16,384 per
completion) take the sparse path of `standardised_design` on the numpy path (`design_input`). Its
products cost ~ density^2 of the dense ones' and run ~50x slower per multiply: one fold's design at
816 x 16,384 (650 training rows) took 0.14 / 0.26 / 0.29 / 0.50 s at density 0.06 / 0.10 / 0.12 / 0.15
against 0.31-0.37 s dense (1 thread)."""


def design_input(X) -> np.ndarray | sp.csr_matrix:
    """X [n, d] as `standardised_design` takes it: float64 CSR when the statistics run in numpy (no
    device, `logistic.pick_device`), X is wider than it is long and at most `SPARSE_DENSITY` of it is
    non-zero; a float64 array otherwise. Convert once and reuse it for every fold and fit."""
    if sp.issparse(X):
        if logistic.pick_device() is None and X.shape[1] > X.shape[0]:
            return sp.csr_matrix(X, dtype=np.float64)
        return X.toarray().astype(np.float64, copy=False)
    X = np.asarray(X)
    if X.ndim != 2 or logistic.pick_device() is not None or not X.shape[1] > X.shape[0] > 0:
        return np.asarray(X, dtype=np.float64)
    on = X != 0
    if np.count_nonzero(on) > SPARSE_DENSITY * X.size:
        return np.asarray(X, dtype=np.float64)
    return dense_to_csr(X, on)


def standardised_design(X: np.ndarray, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score with the training rows' mean/std, then SVD coordinates (module doc): the design every
    probe fits on (here and in detection.py). X a float64 array, or CSR (`design_input`: sparse SAE
    features), whose design is the same up to rounding (`_sparse_standardised_design`)."""
    tr, te = np.asarray(tr), np.asarray(te)
    if sp.issparse(X) and X.shape[1] > len(tr):
        return _sparse_standardised_design(sp.csr_matrix(X), tr, te)
    if sp.issparse(X):  # no wider than the training rows: the dense path, on these rows only
        rows = np.concatenate([tr, te])
        X, tr, te = X[rows].toarray().astype(np.float64), np.arange(len(tr)), np.arange(len(tr), len(rows))
    # In place on one gathered copy each (the moments as np.mean/np.std compute them): on 16k-wide SAE
    # features the temporaries of (X[tr] - mu) / sd and X[tr].std(0) took 8x longer (bench/probe_cost.py).
    Z_tr, Z_te = (np.asarray(X[idx], np.float64) for idx in (tr, te))  # copies, never views
    mu = Z_tr.mean(0)
    Z_tr -= mu
    sd = np.sqrt(np.einsum("ij,ij->j", Z_tr, Z_tr) / max(len(Z_tr), 1))
    sd[sd == 0] = 1.0  # a column constant on the training fold carries nothing; avoid 0/0
    Z_tr /= sd
    Z_te -= mu
    Z_te /= sd
    return _svd_coordinates(Z_tr, Z_te)


def _sparse_standardised_design(
    X: sp.csr_matrix, tr: np.ndarray, te: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`standardised_design` of sparse X without densifying it. With B = X D^-1 (D the training rows'
    standard deviations) and m = mu / sd, the z-scored rows are B_i - m, so

        Z_i . Z_k = B_i . B_k - B_i . m - B_k . m + m . m,

    a sparse Gram plus a rank-2 correction, exact in real arithmetic. Columns non-zero in more than a
    fraction p = SPARSE_DENSITY of the training rows go through the dense centred product instead: their
    sparse cost grows with their density squared, the dense one does not, and mostly non-zero columns
    are where the correction would cancel digits away (a feature on in every completion with a small
    spread has m_j ~ 1e3 or more). In the sparse ones |m_j| <= sqrt(p / (1 - p)) = 0.33 (Jensen:
    mu^2 <= p E[x^2]), no larger than a z-score, so the rounding is the dense path's size. Needs
    d > n_train (the Gram of rows is the smaller one)."""
    A, T = X[tr], X[te]  # CSR copies [n, d], [m, d]
    n, d = A.shape
    nnz = np.bincount(A.indices, minlength=d)
    mu = np.bincount(A.indices, A.data, minlength=d) / max(n, 1)
    dev = A.data - mu[A.indices]  # two-pass moments as the dense path: stored values, then the zeros
    sd = np.sqrt((np.bincount(A.indices, dev * dev, minlength=d) + (n - nnz) * mu * mu) / max(n, 1))
    sd[sd == 0] = 1.0
    m = mu / sd
    dense_cols = np.flatnonzero(nnz > SPARSE_DENSITY * n)
    scale, m = 1 / sd, m.copy()
    scale[dense_cols], m[dense_cols] = 0.0, 0.0  # the sparse part leaves these columns out
    A.data *= scale[A.indices]
    T.data *= scale[T.indices]
    if len(dense_cols):
        A.eliminate_zeros()
        T.eliminate_zeros()
    At = A.T.tocsr()
    am, tm, mm = A @ m, T @ m, m @ m
    gram, cross = _dense_product(A, At), _dense_product(T, At)
    for M, left in ((gram, am), (cross, tm)):  # in place: [n, n] and [m, n] temporaries cost as much
        M -= left[:, None]
        M -= am[None, :]
        M += mm
    if len(dense_cols):
        cols = X[:, dense_cols]
        Zd_tr = (cols[tr].toarray() - mu[dense_cols]) / sd[dense_cols]
        Zd_te = (cols[te].toarray() - mu[dense_cols]) / sd[dense_cols]
        gram += Zd_tr @ Zd_tr.T
        cross += Zd_te @ Zd_tr.T
    return _coordinates_from_gram(gram, cross)


def _dense_product(A: sp.spmatrix, B: sp.spmatrix) -> np.ndarray:
    """(A @ B).toarray() for sparse A [n, k] and B [k, m] whose product is (nearly) dense, such as a
    Gram of sparse rows. scipy's A @ B first walks the product once only to count its non-zeros, then
    again to compute it; with room for all n m entries the count is not needed: 0.05 instead of 0.08 s
    for a 650 x 650 Gram of 16,384-wide rows at 6% density (1 thread). Same kernel, same numbers."""
    A, B = sp.csr_matrix(A), sp.csr_matrix(B)
    n, m = A.shape[0], B.shape[1]
    if _csr_matmat is None or not n * m:
        return (A @ B).toarray()
    idx = np.int32 if max(n * m, A.nnz, B.nnz) < np.iinfo(np.int32).max else np.int64
    dtype = np.result_type(A.dtype, B.dtype)
    indptr, indices, data = np.empty(n + 1, idx), np.empty(n * m, idx), np.empty(n * m, dtype)
    operands = [
        (np.asarray(M.indptr, idx), np.asarray(M.indices, idx), np.asarray(M.data, dtype)) for M in (A, B)
    ]
    try:
        _csr_matmat(n, m, *operands[0], *operands[1], indptr, indices, data)
    except (TypeError, ValueError):  # a scipy whose private kernel takes other arguments: the public product
        return (A @ B).toarray()
    out = np.zeros((n, m), dtype)
    rows = np.repeat(np.arange(n), np.diff(indptr))  # each row's entries come unsorted: scatter them
    out[rows, indices[: indptr[-1]]] = data[: indptr[-1]]
    return out


def _refit(
    designs: list,
    folds: list,
    Y: np.ndarray,
    counts: np.ndarray | None,
    C: float,
    start: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Out-of-fold P(deceptive) [B, n] of B refits: labels Y [B, n] (permutations) and row weights
    `counts` [B, n] (bootstrap draws; None = all 1), and each fold's fits (W [B, r], c [B]). A refit
    whose training rows hold one class, or rows drawn zero times, predicts 0.5 there (no information);
    test rows weigh what they were drawn. `start`: per fold, a fit every refit's solver starts from."""
    proba, fits = np.full(Y.shape, 0.5), []
    for i, ((Z_tr, Z_te), (tr, te)) in enumerate(zip(designs, folds, strict=True)):
        S = logistic.balanced_weights(Y[:, tr], None if counts is None else counts[:, tr])
        W, c = logistic.fit(Z_tr, Y[:, tr], S, C, start=None if start is None else start[i])
        proba[:, te] = logistic.predict_proba(Z_te, W, c)
        fits.append((W, c))
    return proba, fits
