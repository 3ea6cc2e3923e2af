"""Probes: a planted linear signal is found (and a shuffled one is not), CV never splits a prompt group
(and ungrouped CV visibly leaks), results match a plain scikit-learn pipeline (the batched solver
itself, on each device path: tests/analysis/test_logistic.py), the bootstrap refits the probe, folds
do not depend on labels that permutations move, controls and the paired comparison behave, bad inputs
fail with a clear message.
Calibration on simulated null worlds: tests/analysis/test_calibration.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from helpers.analysis import probes
from helpers.stats import (
    balanced_accuracy_rows,
    group_bootstrap_weights,
    label_permutations,
    nested_index,
)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """These matrices are tiny: BLAS threads only contend with other jobs on a shared CI machine."""
    with threadpool_limits(limits=1):
        yield


def planted(n_groups=60, per_group=4, d=32, signal=3.0, group_sd=1.0, seed=0):
    """X = group offset + noise + signal * y * u (u a unit direction); labels vary within groups."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"scenario{g}" for g in range(n_groups)], per_group)
    y = rng.integers(0, 2, n_groups * per_group)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    offsets = group_sd * rng.standard_normal((n_groups, d))
    X = np.repeat(offsets, per_group, axis=0) + rng.standard_normal((len(y), d)) + signal * np.outer(y, u)
    return X, y, groups


class LinearReLUSAE(torch.nn.Module):
    """Stand-in with the SAE interface: encode(x) -> (acts, pre_acts), attributes d_in and d_sae."""

    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d_in, self.d_sae = d_in, d_sae
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.b_enc = torch.nn.Parameter(-0.1 * torch.ones(d_sae))

    def encode(self, x):
        pre = x @ self.W_enc + self.b_enc
        return torch.relu(pre), pre


def test_planted_signal_is_found_and_shuffled_labels_are_not():
    X, y, groups = planted()
    r = probes.probe(X, y, groups, n_permutations=99, n_bootstrap=200, name="raw")
    assert r.balanced_accuracy > 0.75 and r.ba_ci[0] > 0.6 and r.auroc_ci[0] > 0.7
    assert r.ba_ci[0] < r.balanced_accuracy < r.ba_ci[1]
    assert r.p_value == pytest.approx(1 / 100)  # no permutation reached the observed AUROC
    assert (r.n, r.n_groups, r.n_prompts, r.n_folds, len(r.fold_scores)) == (240, 60, 240, 5, 5)
    assert len(r.boot_ba) == r.n_bootstrap == 200 and "refitted" in r.ci_method
    # labels vary within groups and no prompts were given: every completion is its own prompt
    assert "prompts' labels within their groups" in r.permutation_scheme
    json.dumps(r.to_dict())  # what probes.json stores

    shuffled = np.random.default_rng(1).permutation(y)
    null = probes.probe(X, shuffled, groups, n_permutations=49, n_bootstrap=200)
    assert abs(null.balanced_accuracy - 0.5) < 0.08 and null.ba_ci[0] < 0.5 < null.ba_ci[1]
    assert null.p_value > 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_folds_never_split_a_group(seed):
    X, y, groups = planted(n_groups=23, per_group=5, seed=seed)
    y[groups == "scenario3"] = 1  # uneven groups and labels
    folds = probes.grouped_folds(groups, n_folds=5, seed=seed, y=y)
    assert len(folds) == 5
    seen = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(y)))  # every row tested exactly once
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
        assert set(y[te]) == {0, 1}  # stratified: both classes in each test fold


def test_ungrouped_cv_leaks_and_grouped_cv_does_not():
    """The anchor bug: strong per-prompt offsets and one label per prompt. Completions of a prompt in
    both train and test let the probe recognise the prompt; grouped CV shows there is no signal."""
    rng = np.random.default_rng(0)
    n_groups, per_group, d = 40, 6, 64
    groups = np.repeat(np.arange(n_groups), per_group)
    y = np.repeat(rng.permutation(np.arange(n_groups) % 2), per_group)
    X = np.repeat(3 * rng.standard_normal((n_groups, d)), per_group, axis=0) + rng.standard_normal((240, d))
    leaky = probes.probe(X, y, np.arange(len(y)), n_permutations=0, n_bootstrap=100)  # each row its own group
    grouped = probes.probe(X, y, groups, n_permutations=49, n_bootstrap=200)
    assert leaky.balanced_accuracy > 0.9
    assert grouped.balanced_accuracy < 0.65 and grouped.ba_ci[0] < 0.5
    assert grouped.permutation_scheme == "permuted: 40 one-label groups' labels across groups"
    assert grouped.p_value > 0.05


@pytest.mark.parametrize("d", [16, 400], ids=["d<n", "d>n (SVD path)"])
def test_matches_a_plain_sklearn_pipeline(d):
    X, y, groups = planted(n_groups=40, per_group=4, d=d, signal=1.5)
    r = probes.probe(X, y, groups, n_permutations=0, n_bootstrap=10, C=0.1)
    folds = probes.grouped_folds(groups, 5, 0, y=y)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))
    want = cross_val_predict(pipe, X, y, cv=folds, method="predict_proba")[:, 1]
    np.testing.assert_allclose(r.oof_proba, want, atol=2e-3)
    assert r.auroc == pytest.approx(roc_auc_score(y, want), abs=2e-3)
    assert r.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, want >= 0.5), abs=1e-2)
    for (_, te), score in zip(folds, r.fold_scores, strict=True):
        assert score == pytest.approx(balanced_accuracy_score(y[te], want[te] >= 0.5), abs=2e-2)


def test_folds_do_not_move_when_permutations_move_labels():
    """Stratification uses only what permutations keep (module doc of grouped_folds): a label vector
    the permutation test draws gets the same folds as the observed one."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(30), 8)
    prompts = np.repeat(np.arange(120), 2)
    y = np.repeat(rng.integers(0, 2, 120), 2)  # labels per prompt, groups of 4 prompts
    base = probes.grouped_folds(groups, 5, 0, y=y)
    pidx, gidx = nested_index(prompts, groups)
    for y_perm in label_permutations(y, pidx, gidx, 10, rng)[0]:
        again = probes.grouped_folds(groups, 5, 0, y=y_perm)
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(base, again, strict=True))


def test_the_bootstrap_refits_the_probe():
    """Each draw reruns the CV on resampled groups: refitted draws vary more than the fixed
    out-of-fold predictions' group bootstrap would, and two probes with the same seed draw the same
    groups (their differences are paired)."""
    X, y, groups = planted(signal=1.0)
    a = probes.probe(X, y, groups, n_permutations=0, n_bootstrap=100, seed=4)
    b = probes.probe(X[:, ::-1], y, groups, n_permutations=0, n_bootstrap=100, seed=4)
    W = group_bootstrap_weights(a.group_idx, 100, np.random.default_rng([4, 0])).astype(float)
    fixed = balanced_accuracy_rows(np.broadcast_to(a.oof_proba, W.shape), y, W)
    assert np.nanstd(a.boot_ba) > np.nanstd(fixed)
    assert np.allclose(a.boot_ba, b.boot_ba, atol=0.02), "same rows up to column order: same draws, same fits"


def test_bag_of_words_finds_a_planted_word_and_nothing_without_one():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(60)]
    y = rng.integers(0, 2, 160)
    groups = np.repeat(np.arange(40), 4)
    base = [" ".join(rng.choice(vocab, 8)) for _ in y]
    texts = [t + (" frankly" if label else "") for t, label in zip(base, y, strict=True)]
    r = probes.bag_of_words_probe(texts, y, groups, n_permutations=19, n_bootstrap=200)
    assert r.balanced_accuracy > 0.95 and r.p_value == pytest.approx(1 / 20)
    assert r.details["top_terms"]["deceptive"][0] == "frankly"
    assert "frankly" not in r.details["top_terms"]["honest"]
    assert "zebra" not in sum(r.details["top_terms"].values(), [])  # absent from every text
    plain = probes.bag_of_words_probe(base, y, groups, n_permutations=19, n_bootstrap=200)
    assert abs(plain.balanced_accuracy - 0.5) < 0.12 and plain.p_value > 0.1


def test_compare_paired_detects_the_better_probe():
    X, y, groups = planted()
    noise = np.random.default_rng(5).standard_normal(X.shape)
    good = probes.probe(X, y, groups, n_permutations=0, n_bootstrap=100, name="raw")
    bad = probes.probe(noise, y, groups, n_permutations=0, n_bootstrap=100, name="noise")
    out = probes.compare_paired(good, bad)
    assert out["mean_difference"] > 0.2 and out["p_value"] < 0.05 and out["ba_difference_ci"][0] > 0.1
    same = probes.compare_paired(good, good)
    assert same["p_value"] == 1.0 and same["ba_difference_ci"] == (0.0, 0.0)
    other_folds = probes.probe(X, y, groups, n_permutations=0, n_bootstrap=10, seed=1)
    with pytest.raises(ValueError, match="same rows and folds"):
        probes.compare_paired(good, other_folds)


def test_compare_paired_never_gives_p_zero_for_a_constant_fold_difference():
    # Two probes whose fold balanced accuracies differ by the same amount in every fold (a perfect probe
    # against one at chance): the t statistic's variance is 0; p must be the sign test's floor, not 0.
    X, y, groups = planted()
    good = probes.probe(X, y, groups, n_permutations=0, n_bootstrap=0, name="raw")
    flat = dataclasses.replace(good, name="flat", fold_scores=[s - 0.25 for s in good.fold_scores])
    out = probes.compare_paired(good, flat)
    k = len(good.fold_scores)
    assert out["mean_difference"] == pytest.approx(0.25)
    assert out["p_value"] == pytest.approx(2 * 0.5**k) and out["p_value"] > 0
    assert "sign test" in out["test"]


def test_random_direction_control_separates_specific_from_broad_signals():
    X, y, groups = planted()
    control = probes.random_direction_control(X, y, groups, n_directions=15, seed=0)
    assert control["n_directions"] == 15 and len(control["balanced_accuracies"]) == 15
    assert control["ba_quantiles"]["50%"] < 0.62  # a random direction barely sees a 1-D signal in 32-D
    broad = X + 4.0 * y[:, None]  # deception shifts every coordinate: any direction sees it
    assert probes.random_direction_control(broad, y, groups, n_directions=15)["ba_quantiles"]["50%"] > 0.7


def test_sae_features_encode_in_batches_and_feed_a_probe():
    X, y, groups = planted(d=16, signal=3.0)
    sae = LinearReLUSAE(16, 300)
    F = probes.sae_features(sae, X.astype(np.float32), batch_size=7)
    want = torch.relu(torch.as_tensor(X, dtype=torch.float32) @ sae.W_enc + sae.b_enc).detach().numpy()
    np.testing.assert_allclose(F, want, rtol=1e-5, atol=1e-6)
    assert F.shape == (240, 300) and (F == 0).mean() > 0.3
    r = probes.probe(F, y, groups, n_permutations=0, n_bootstrap=100, name="sae")  # d_sae > n_train
    assert r.balanced_accuracy > 0.75


@pytest.mark.filterwarnings("ignore:The least populated class")  # the one-group case below
def sparse_features(n=60, d=400, seed=5):
    """SAE-like features [n, d], ~4% non-zero, plus the columns the sparse design must treat with care:
    one non-zero everywhere and nearly constant (mu / sd ~ 1e5: the centring correction would cancel
    the digits away), one constant, one non-zero on the last rows only (zero on the training rows),
    one non-zero in half the rows (denser than probes.SPARSE_DENSITY)."""
    rng = np.random.default_rng(seed)
    X = np.where(rng.random((n, d)) < 0.04, rng.exponential(1.0, (n, d)), 0.0)
    X[:, 0] = 1000 + 0.01 * rng.standard_normal(n)
    X[:, 1] = 2.5
    X[:, 2] = 0.0
    X[-5:, 2] = 3.0
    X[:, 3] = np.where(rng.random(n) < 0.5, rng.exponential(1.0, n), 0.0)
    return X, rng.integers(0, 2, n)


def test_the_sparse_design_is_the_dense_one():
    """Sparse SAE features are standardised as a sparse Gram plus a rank-2 centring correction (no
    densified copy per fold): the same Gram and test-by-train products as the dense path, to rounding,
    on every awkward column of `sparse_features`; the SVD coordinates stay orthogonal."""
    X, _ = sparse_features()
    X32 = X.astype(np.float32)  # SAE features arrive as float32
    S = probes.design_input(X32)
    assert isinstance(S, probes.sp.csr_matrix) and S.dtype == np.float64
    tr, te = np.arange(10, 50), np.r_[np.arange(10), np.arange(50, 60)]
    A, B = probes.standardised_design(X32.astype(np.float64), tr, te)
    A1, B1 = probes.standardised_design(S, tr, te)
    assert A1.shape == A.shape and B1.shape == B.shape
    scale = np.abs(A @ A.T).max()
    np.testing.assert_allclose(A1 @ A1.T, A @ A.T, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(B1 @ A1.T, B @ A.T, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(A1.T @ A1, np.diag(np.diag(A1.T @ A1)), rtol=0, atol=1e-10 * scale)
    assert isinstance(probes.design_input(X32[:, :50]), np.ndarray)  # longer than wide: dense
    assert isinstance(probes.design_input(np.ones((10, 40))), np.ndarray)  # not sparse: dense


@pytest.mark.parametrize("kernel", ["scipy's csr_matmat", "A @ B", "changed kernel"])
def test_dense_product_is_scipys_product(kernel, monkeypatch):
    """The Gram products skip scipy's counting pass (or fall back to A @ B where its kernel is missing):
    the same numbers, bit for bit, with empty rows and columns and an empty product."""
    if kernel == "A @ B":
        monkeypatch.setattr(probes, "_csr_matmat", None)
    if kernel == "changed kernel":  # a scipy whose private kernel takes other arguments

        def changed(*args):
            raise TypeError("csr_matmat() takes 9 positional arguments")

        monkeypatch.setattr(probes, "_csr_matmat", changed)
    rng = np.random.default_rng(8)
    dense = probes.sp.random(30, 200, density=0.05, random_state=rng).toarray()
    dense[3] = 0.0  # a row with no entries
    A, B = (
        probes.sp.csr_matrix(dense),
        probes.sp.random(200, 25, density=0.05, format="csc", random_state=rng),
    )
    np.testing.assert_array_equal(probes._dense_product(A, B), (A @ B).toarray())
    np.testing.assert_array_equal(probes._dense_product(A, A.T), (A @ A.T).toarray())
    assert probes._dense_product(A[:0], B).shape == (0, 25)


def test_a_probe_on_sparse_features_gives_the_dense_paths_numbers(monkeypatch):
    """Through a whole probe (permutations and refitted bootstrap), a transfer score and the random-
    direction control: the sparse path's statistics equal the dense path's (forced: SPARSE_DENSITY < 0)."""
    from helpers.analysis import detection

    X, y = sparse_features(n=80, seed=6)
    X[:, 10:14] += 2.0 * y[:, None] * (np.arange(80)[:, None] % 3 == 0)  # a weak planted signal
    groups = np.arange(80) // 4
    kw = dict(n_permutations=20, n_bootstrap=20)
    sparse = probes.probe(X, y, groups, **kw)
    scores = detection.fit_scores(X, np.arange(50), y[:50], [np.arange(50, 80)])[0]
    control = probes.random_direction_control(X, y, groups, n_directions=5)
    monkeypatch.setattr(probes, "SPARSE_DENSITY", -1.0)
    assert isinstance(probes.design_input(X), np.ndarray)
    dense = probes.probe(X, y, groups, **kw)
    np.testing.assert_allclose(sparse.oof_proba, dense.oof_proba, rtol=0, atol=1e-10)
    assert (sparse.auroc, sparse.p_value, sparse.ba_ci) == (dense.auroc, dense.p_value, dense.ba_ci)
    np.testing.assert_array_equal(sparse.boot_auroc, dense.boot_auroc)
    np.testing.assert_allclose(
        scores, detection.fit_scores(X, np.arange(50), y[:50], [np.arange(50, 80)])[0], rtol=0, atol=1e-9
    )
    dense_control = probes.random_direction_control(X, y, groups, n_directions=5)
    assert control["balanced_accuracies"] == dense_control["balanced_accuracies"]
    np.testing.assert_allclose(control["aurocs"], dense_control["aurocs"], rtol=0, atol=1e-12)


def test_bad_inputs_fail_with_the_counts_and_the_fix():
    X, y, groups = planted(n_groups=10)
    with pytest.raises(ValueError, match="40 honest and 0 deceptive completions: sample more per prompt"):
        probes.probe(X, np.zeros(40, int), groups, n_permutations=0)
    with pytest.raises(ValueError, match="at least 5 prompt groups.* got 3 groups: lower n_folds"):
        probes.probe(X[:12], y[:12], groups[:12], n_permutations=0)
    with pytest.raises(ValueError, match="labels must be 1-D 0/1"):
        probes.probe(X, np.full(40, 2), groups)
    with pytest.raises(ValueError, match=r"d_in=16 .*d_model=32"):
        probes.sae_features(LinearReLUSAE(16, 64), X)
    with pytest.raises(ValueError, match="3 texts but 40 labels"):
        probes.bag_of_words_probe(["a", "b", "c"], y, groups)
    one_deceptive_group = np.where(groups == "scenario0", 1, 0)
    with pytest.raises(
        ValueError, match="training fold .* has no deceptive completions: .* from 1 prompt group"
    ):
        probes.probe(X, one_deceptive_group, groups, n_permutations=0)
