"""Statistics primitives against references (scipy, scikit-learn, statsmodels, formulas by hand), and
the label permutations' invariants at each level: one-label groups move whole, prompt labels move within
their group, completion labels move within their prompt. Calibration of the statistics built on them:
tests/analysis/test_calibration.py."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from statsmodels.stats.multitest import multipletests

from helpers import stats as S


def test_bh_qvalues_match_reference():
    # By hand: sorted p .005 .01 .03 .04, m = 4 -> p*m/rank .02 .02 .04 .04 (already monotone).
    np.testing.assert_allclose(S.bh_qvalues([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    p = np.random.default_rng(2).uniform(size=500) ** 3
    np.testing.assert_allclose(S.bh_qvalues(p), stats.false_discovery_control(p, method="bh"), rtol=1e-12)


def test_holm_matches_statsmodels():
    p = np.random.default_rng(3).uniform(size=9) ** 2
    np.testing.assert_allclose(S.holm(p), multipletests(p, method="holm")[1], rtol=1e-12)
    assert S.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])


def test_auroc_and_balanced_accuracy_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    scores = np.round(rng.uniform(size=80) + 0.3 * y, 1)  # ties
    W = rng.integers(0, 3, (4, 80)).astype(float)
    got_auc, got_ba = S.weighted_auroc(scores, y, W), S.balanced_accuracy(scores, y, W)
    rows = np.round(rng.uniform(size=(4, 80)), 1)  # a score row per draw, labels per row
    Y = rng.integers(0, 2, (4, 80))
    auc_rows, ba_rows = S.auroc_rows(rows, Y, W), S.balanced_accuracy_rows(rows, Y, W)
    for b in range(4):
        assert got_auc[b] == pytest.approx(roc_auc_score(y, scores, sample_weight=W[b]))
        assert got_ba[b] == pytest.approx(balanced_accuracy_score(y, scores >= 0.5, sample_weight=W[b]))
        assert auc_rows[b] == pytest.approx(roc_auc_score(Y[b], rows[b], sample_weight=W[b]))
        assert ba_rows[b] == pytest.approx(balanced_accuracy_score(Y[b], rows[b] >= 0.5, sample_weight=W[b]))
    assert S.weighted_auroc(scores, y)[0] == pytest.approx(roc_auc_score(y, scores))


def awkward_columns() -> tuple[np.ndarray, np.ndarray]:
    """(X [30, 11], y): columns where a shortcut through the non-zeros could go wrong."""
    rng = np.random.default_rng(11)
    y = np.r_[np.zeros(18, int), np.ones(12, int)]
    some = rng.random(30) < 0.4
    X = np.c_[
        np.zeros(30),  # dead
        rng.exponential(size=30) + 0.1,  # all non-zero
        np.round(3 * rng.exponential(size=30)) * some,  # ties among the non-zeros
        np.round(2 * rng.normal(size=30)) * some,  # negatives, zeros and positives, with ties
        -np.round(3 * rng.exponential(size=30)) * some,  # non-positive
        np.where(y == 1, rng.exponential(size=30), 0),  # only deceptive rows fire
        np.where(y == 0, 1.5, 0),  # only honest rows fire, one value
        np.full(30, -2.0),  # constant non-zero
        np.r_[np.ones(18), -np.ones(12)],  # perfect separation, negative side deceptive
        rng.normal(size=30),  # dense
        np.where(some, rng.normal(size=30), 0),
    ]
    return X, y


def test_sparse_auroc_equals_rank_sum_bitwise_on_awkward_columns():
    """The AUROC from the non-zeros (zeros one tie group ranked by counts) must be rank_sum's AUROC of
    the dense columns to the bit (both sum half-integer ranks exactly), and scikit-learn's to rounding;
    stored zeros and -0.0 are zeros, a nan ranks last as argsort puts it."""
    X, y = awkward_columns()
    want = S.rank_sum(X, y)[0]
    got = S.sparse_auroc(sp.csc_matrix(X), y)
    assert got.tobytes() == want.tobytes(), np.c_[got, want]
    assert got == pytest.approx([roc_auc_score(y, col) for col in X.T], abs=1e-12)
    assert S.sparse_auroc(sp.csr_matrix(X[:, 2:4]), y).tobytes() == want[2:4].tobytes()  # any format
    # half the zeros stored explicitly (half of those as -0.0): still the zeros' tie group
    rows, cols = (ix[::2] for ix in np.nonzero(X == 0))
    (nz_rows, nz_cols), zero = np.nonzero(X), np.where(np.arange(len(rows)) % 2, 0.0, -0.0)
    entries = (np.r_[X[nz_rows, nz_cols], zero], (np.r_[nz_rows, rows], np.r_[nz_cols, cols]))
    stored = sp.coo_matrix(entries, X.shape)
    assert stored.tocsc().nnz == np.count_nonzero(X) + len(rows)
    assert S.sparse_auroc(stored.tocsc(), y).tobytes() == want.tobytes()
    X[[3, 20], 3] = np.nan
    assert S.sparse_auroc(sp.csc_matrix(X), y).tobytes() == S.rank_sum(X, y)[0].tobytes()


def test_dense_to_csr_round_trips():
    X, _ = awkward_columns()
    A = S.dense_to_csr(X.astype(np.float32))
    assert A.dtype == np.float64 and A.has_sorted_indices and A.nnz == np.count_nonzero(X)
    np.testing.assert_array_equal(A.toarray(), X.astype(np.float32))


def test_ratio_ci_is_the_leverage_adjusted_cluster_interval():
    rng = np.random.default_rng(4)
    den = rng.integers(5, 50, 12).astype(float)
    num = den * rng.gamma(5, 0.2, 12)
    r, lo, hi = S.ratio_ci(num, den)
    assert r == pytest.approx(num.sum() / den.sum())
    resid = (num - r * den) / den.sum() / (1 - den / den.sum())
    half = stats.t.ppf(0.975, 11) * np.sqrt((resid**2).sum())
    assert (lo, hi) == pytest.approx((r - half, r + half))
    assert np.isnan(S.ratio_ci(num[:1], den[:1])[1])
    one_holds_all = S.ratio_ci(np.array([1.0, 0.0]), np.array([3.0, 0.0]))  # one cluster has every token
    assert np.isnan(one_holds_all[1])


def test_nested_index_refuses_a_prompt_in_two_groups():
    pidx, gidx = S.nested_index(["a", "a", "b", "c"], ["g1", "g1", "g1", "g2"])
    assert pidx.tolist() == [0, 0, 1, 2] and gidx.tolist() == [0, 0, 0, 1]
    assert S.nested_index(None, ["g", "g", "h"])[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="appears in more than one group"):
        S.nested_index(["a", "a"], ["g1", "g2"])


def test_label_permutations_move_labels_only_at_the_level_they_vary():
    """One world with all three kinds of unit: one-label groups (labels move between them, whole),
    two-label groups of one-label prompts (prompt labels move within the group), and prompts whose
    completions differ (labels move within the prompt)."""
    prompts, groups, y = [], [], []
    for g in range(6):  # one-label groups: 2 prompts x 3 completions, groups 0-2 honest, 3-5 deceptive
        for p in range(2):
            prompts += [f"g{g:02d}p{p}"] * 3
            groups += [f"g{g:02d}"] * 3
            y += [int(g >= 3)] * 3
    for g in range(6, 12):  # contrast pairs: an honest and a lie prompt of 4 completions each
        for p, label in enumerate((0, 1)):
            prompts += [f"g{g:02d}p{p}"] * 4
            groups += [f"g{g:02d}"] * 4
            y += [label] * 4
    for g in range(12, 15):  # sampled answers: each prompt has both labels
        prompts += [f"g{g:02d}p0"] * 5
        groups += [f"g{g:02d}"] * 5
        y += [0, 0, 1, 0, 1]
    y = np.array(y)
    pidx, gidx = S.nested_index(prompts, groups)
    draws, units = S.label_permutations(y, pidx, gidx, 400, np.random.default_rng(0))
    assert units == {"one_label_groups": 6, "one_label_prompts_within_groups": 12, "two_label_prompts": 3}
    assert "6 one-label groups" in S.permutation_scheme(units)
    for d in draws:
        for p in range(pidx.max() + 1):  # a one-label prompt stays one-label; mixed prompts keep counts
            rows = pidx == p
            assert d[rows].sum() == y[rows].sum() or len(set(d[rows])) == 1
        for g in range(gidx.max() + 1):
            rows = gidx == g
            if g >= 6:
                assert d[rows].sum() == y[rows].sum(), "two-label groups keep their label counts"
            else:
                assert len(set(d[rows])) == 1, "a one-label group stays one-label"
        assert d[gidx < 6].sum() == y[gidx < 6].sum()
    rows0 = gidx == 0
    assert {int(d[rows0][0]) for d in draws} == {0, 1}, "one-label groups swap labels"
    first = pidx == pidx[np.flatnonzero(gidx == 6)[0]]
    assert {int(d[first][0]) for d in draws} == {0, 1}, "a pair's prompts swap labels"
    mixed = gidx == 12
    assert len({tuple(d[mixed]) for d in draws}) == 10, "all C(5,2) orders of one prompt's completions"


@pytest.mark.parametrize("n", [1, 3, 7, 10, 2.5, 13.7, 100])
def test_wilson_interval_contains_the_proportion_exactly_at_zero_and_one(n):
    # At k = 0 the formula's lower end came out 5.6e-17 (above p = 0): a plot's error bar p - lo < 0 failed.
    assert S.wilson_ci(0, n)[0] == 0.0 and S.wilson_ci(n, n)[1] == 1.0
    for k in np.linspace(0, n, 7):
        lo, hi = S.wilson_ci(k, n)
        assert lo <= k / n <= hi
