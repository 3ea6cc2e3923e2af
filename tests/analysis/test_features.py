"""Feature statistics: a planted feature is chosen and replicates on the held-out groups while nulls
stay null, every statistic matches a reference (scipy, scikit-learn, statsmodels, the formula), the
held-out test is one-sided in the chosen direction and permutes whole prompts, selection and report use
disjoint groups (and the held-out report undoes the winner's curse), files round-trip as strict JSON.
Calibration on simulated null worlds: tests/analysis/test_calibration.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from helpers import run
from helpers.analysis import features as F
from helpers.stats import rank_sum


@pytest.fixture(autouse=True)
def one_blas_thread():
    """These matrices are tiny: BLAS threads only contend with other jobs on a shared CI machine."""
    with threadpool_limits(limits=1):
        yield


def sae_like(n_groups=60, per_group=4, d_sae=1500, planted=(), shift=1.5, seed=0):
    """Sparse non-negative activations (ReLU of shifted Gaussians) with per-group offsets; the planted
    columns get +shift before the ReLU in deceptive completions. Labels vary within groups."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per_group)
    y = rng.integers(0, 2, len(groups))
    pre = rng.standard_normal((len(y), d_sae)) + 0.5 * rng.standard_normal((n_groups, d_sae))[groups] - 0.8
    pre[:, list(planted)] += shift * y[:, None]
    return np.maximum(pre, 0).astype(np.float32), y, groups


def test_planted_feature_is_chosen_and_replicates_while_nulls_stay_null():
    acts, y, groups = sae_like(planted=(123,))
    rows = F.feature_stats(acts, y, groups=groups)
    assert [r["feature"] for r in rows] == list(range(acts.shape[1]))
    d = np.array([r["cohens_d"] for r in rows])
    assert np.argmax(np.abs(d)) == 123
    top = rows[123]
    assert top["d_ci"][0] > 0.3 and top["auroc"] > 0.7
    assert (
        top["mean_deceptive"] > top["mean_honest"]
        and top["firing_rate_deceptive"] > top["firing_rate_honest"]
    )
    lo, hi = np.array([r["d_ci"] for r in rows]).T
    assert (np.delete((lo < 0) & (hi > 0), 123)).mean() > 0.93  # ~95% of null CIs cover 0

    report = F.select_and_report(acts, y, groups, k=10, n_permutations=999, seed=0)
    assert report[0]["feature"] == 123 and report[0]["direction"] == "deceptive higher"
    assert report[0]["p_value"] == pytest.approx(1 / 1000) and report[0]["q_value"] <= 0.01
    assert all(r["q_value"] > 0.05 for r in report[1:]), "the other nine chosen are null"
    assert "one-sided permutation test" in report[0]["test"] and report[0]["n_permutations"] == 999


def test_statistics_match_references():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(30, int), np.ones(20, int)]
    acts = np.c_[
        rng.normal(size=(50, 3)),
        np.round(rng.exponential(size=(50, 2))),  # many ties
        np.maximum(rng.normal(size=50) - 1, 0),  # mostly zero
        np.zeros(50),  # dead feature
    ]
    acts[y == 1, 0] += 1.0
    rows = F.feature_stats(acts, y, ci=False)
    for j in range(6):
        col, r = acts[:, j], rows[j]
        a, b = col[y == 1], col[y == 0]
        pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(col) - 2))
        assert r["cohens_d"] == pytest.approx((a.mean() - b.mean()) / pooled)
        assert r["auroc"] == pytest.approx(roc_auc_score(y, col))
        assert r["firing_rate_deceptive"] == pytest.approx((a > 0).mean())
        assert r["mean_honest"] == pytest.approx(b.mean())
        assert np.isnan(r["d_ci"][0])  # ci=False: no CI
    dead = rows[6]
    assert (dead["cohens_d"], dead["auroc"], dead["firing_rate_honest"]) == (0, 0.5, 0)


def cr2_bell_mccaffrey(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float, float]:
    """(m1 - m0, its CR2 SE, Bell-McCaffrey df) by the textbook matrices (Pustejovsky & Tipton 2018):
    OLS of x on class indicators X, A_g = (I - H_gg)^(-1/2) by eigendecomposition, V = sum_g (c' B X_g'
    A_g e_g)^2 with B = (X'X)^-1, and df = tr(G'G)^2 / tr((G'G)^2), G_g = (I - H)_g' A_g X_g B c."""
    X = np.c_[1 - y, y].astype(float)
    B = np.linalg.inv(X.T @ X)
    c = np.array([-1.0, 1.0])
    H = X @ B @ X.T
    e = x - H @ x
    V, cols = 0.0, []
    for g in np.unique(groups):
        rows = groups == g
        val, vec = np.linalg.eigh(np.eye(rows.sum()) - H[np.ix_(rows, rows)])
        A = vec @ np.diag(val**-0.5) @ vec.T
        V += float(c @ B @ X[rows].T @ A @ e[rows]) ** 2
        cols.append((np.eye(len(x)) - H)[:, rows] @ A @ X[rows] @ B @ c)
    GG = np.array(cols) @ np.array(cols).T
    return float(c @ B @ X.T @ x), np.sqrt(V), float(np.trace(GG) ** 2 / np.trace(GG @ GG))


def test_the_ci_of_d_is_the_cr2_interval_with_bell_mccaffrey_df():
    """The CI of the mean difference must equal the textbook CR2 interval with Bell-McCaffrey degrees of
    freedom (dense matrices, `cr2_bell_mccaffrey`), scaled by the pooled SD; with one-label groups and
    80/20 labels its df are far below G - 1 (the old CR1 interval's t(G - 1) undercovered there)."""
    rng = np.random.default_rng(2)
    for groups, y in (
        (np.repeat(np.arange(25), 6), np.repeat(np.arange(75) % 2, 2)),  # labels per prompt
        (np.repeat(np.arange(12), 5), np.repeat((np.arange(12) < 3).astype(int), 5)),  # 3 of 12 groups lie
    ):
        n = len(y)
        x = rng.standard_normal(groups.max() + 1)[groups] + rng.standard_normal(n) + 0.4 * y
        r = F.feature_stats(x[:, None], y, groups=groups)[0]
        diff, se, df = cr2_bell_mccaffrey(x, y, groups)
        pooled = np.sqrt((x[y == 1].var() * y.sum() + x[y == 0].var() * (n - y.sum())) / (n - 2))
        half = stats.t.ppf(0.975, df) * se
        assert r["d_ci"][0] == pytest.approx((diff - half) / pooled, rel=1e-6)
        assert r["d_ci"][1] == pytest.approx((diff + half) / pooled, rel=1e-6)
    assert df < 4, "3 deceptive groups of 12: few degrees of freedom"


def dense_feature_stats(a: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of feature_stats computed plainly on the dense float64 columns of a [n, d] (as
    the code did before it worked from the non-zeros): numpy's class means and variances, rank_sum's
    AUROC, and the CR2 CI from each row's influence summed per group."""
    a, dec = np.asarray(a, np.float64), y == 1
    n1, n0 = int(dec.sum()), int((~dec).sum())
    m1, m0 = a[dec].mean(0), a[~dec].mean(0)
    sd = np.sqrt((a[dec].var(0) * n1 + a[~dec].var(0) * n0) / (n1 + n0 - 2))
    scale_a = np.abs(a).max(0)
    gidx = np.unique(groups, return_inverse=True)[1]
    n_groups = gidx.max() + 1
    per_class = np.stack([np.bincount(gidx[y == c], minlength=n_groups) for c in (0, 1)])
    x = np.where(dec, 1 / n1, -1 / n0) / np.sqrt(1 - per_class / np.array([[n0], [n1]]))[y, gidx]
    psi = np.where(dec[:, None], a - m1, a - m0) * x[:, None]  # [n, d] each row's influence
    se = np.sqrt(sum(psi[gidx == g].sum(0) ** 2 for g in range(n_groups)))
    half = stats.t.ppf(0.975, F.bell_mccaffrey_df(x, y, gidx, n_groups)) * se
    return {
        "cohens_d": F._cohens_d(m1 - m0, sd, scale_a),
        "lo": F._cohens_d(m1 - m0 - half, sd, scale_a),
        "hi": F._cohens_d(m1 - m0 + half, sd, scale_a),
        "mean_honest": m0,
        "mean_deceptive": m1,
        "auroc": rank_sum(a, y)[0],
        "firing_rate_honest": (a[~dec] > 0).mean(0),
        "firing_rate_deceptive": (a[dec] > 0).mean(0),
    }


def awkward_world(seed=8):
    """sae_like features (~20% non-zero) with awkward columns in front: dead, always on, only the
    deceptive rows firing, ties among the non-zeros, negative values, a constant; 30 groups of 4."""
    acts, y, groups = sae_like(n_groups=30, d_sae=60, planted=(40,), seed=seed)
    rng = np.random.default_rng(seed)
    some = rng.random(len(y)) < 0.3
    acts[:, :6] = np.c_[
        np.zeros(len(y)),
        rng.exponential(size=len(y)) + 0.1,
        np.where(y == 1, rng.exponential(size=len(y)), 0),
        np.round(2 * rng.exponential(size=len(y))) * some,
        np.round(2 * rng.normal(size=len(y))) * some,
        np.full(len(y), 0.25),
    ]
    return acts, y, groups


def test_feature_stats_from_the_non_zeros_equal_the_dense_computation():
    """feature_stats works from the non-zero entries; every statistic must equal the plain dense
    computation (`dense_feature_stats`): AUROC, firing rates and class means to the bit, d and its CI
    to rounding. Dense, scipy sparse and torch inputs give the same rows."""
    acts, y, groups = awkward_world()
    want = dense_feature_stats(acts, y, groups)
    rows = F.feature_stats(acts, y, groups=groups)
    got = {k: np.array([r[k] for r in rows]) for k in want if k not in ("lo", "hi")}
    got["lo"], got["hi"] = np.array([r["d_ci"] for r in rows]).T
    for key in ("auroc", "firing_rate_honest", "firing_rate_deceptive", "mean_honest", "mean_deceptive"):
        assert got[key].tobytes() == want[key].tobytes(), key
    for key in ("cohens_d", "lo", "hi"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0, err_msg=key)
    assert np.isfinite(got["lo"][1:]).all() and got["cohens_d"][0] == 0
    assert rows == F.feature_stats(sp.csr_matrix(acts), y, groups=groups)
    assert rows == F.feature_stats(torch.from_numpy(acts), y, groups=groups)


def test_select_and_report_rows_equal_the_dense_computation():
    """select_and_report's rows (chosen features, held-out statistics, p-values) must be those of the
    plain dense computation on the same split, for dense and scipy sparse input alike."""
    acts, y, groups = awkward_world(seed=9)
    rows = F.select_and_report(acts, y, groups, k=8, n_permutations=199, seed=0)
    assert rows == F.select_and_report(sp.csc_matrix(acts), y, groups, k=8, n_permutations=199, seed=0)
    sel, held = F.split_by_group(groups, 0.5, 0, y=y)
    d_sel = dense_feature_stats(acts[sel], y[sel], groups[sel])["cohens_d"]
    chosen = np.argsort(-np.abs(d_sel), kind="stable")[:8]
    assert [r["feature"] for r in rows] == chosen.tolist() and 40 in chosen
    want = dense_feature_stats(acts[held], y[held], groups[held])
    for key in ("auroc", "firing_rate_honest", "firing_rate_deceptive", "mean_honest", "mean_deceptive"):
        assert [r[key] for r in rows] == want[key][chosen].tolist(), key
    np.testing.assert_allclose([r["cohens_d"] for r in rows], want["cohens_d"][chosen], rtol=1e-12)
    np.testing.assert_allclose([r["d_ci"] for r in rows], np.c_[want["lo"], want["hi"]][chosen], rtol=1e-12)
    ids = np.arange(len(y)).astype(str)  # select_and_report's names: every row its own prompt
    p, _ = F.heldout_tests(
        acts[held][:, chosen],
        y[held],
        np.sign(d_sel[chosen]),
        groups=groups.astype(str)[held],
        prompts=ids[held],
        n_permutations=199,
    )
    assert [r["p_value"] for r in rows] == p.tolist()


def test_heldout_test_is_one_sided_and_permutes_whole_prompts():
    """A feature whose held-out sign flips is not a replication (p near 1), the same data tested in its
    own direction is; with one label per prompt, permuting completions instead of prompts would make
    the null far too narrow."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 8)
    prompts = np.repeat(np.arange(80), 4)
    y = np.repeat(np.tile([0, 1], 40), 4)  # contrast pairs: one label per prompt
    x = 3 * rng.standard_normal(80)[prompts] + 0.3 * rng.standard_normal(320) - 1.5 * y
    p_down, scheme = F.heldout_tests(
        x[:, None], y, [-1.0], groups=groups, prompts=prompts, n_permutations=199
    )
    p_up, _ = F.heldout_tests(x[:, None], y, [+1.0], groups=groups, prompts=prompts, n_permutations=199)
    assert p_down[0] < 0.05 < 0.9 < p_up[0]
    assert scheme == "permuted: 80 prompts' labels within their groups"
    null = 3 * rng.standard_normal(80)[prompts] + 0.3 * rng.standard_normal(320)
    up = [float(np.sign(null[y == 1].mean() - null[y == 0].mean()))]  # the direction the noise points
    by_prompt = F.heldout_tests(null[:, None], y, up, groups=groups, prompts=prompts, n_permutations=199)[0][
        0
    ]
    by_row = F.heldout_tests(null[:, None], y, up, groups=groups, n_permutations=199)[0][0]
    assert by_row == 1 / 200 < 0.1 < by_prompt, "completion-level permutations call prompt noise an effect"


def test_grouped_ci_is_wider_when_groups_differ():
    """With one label per group and strong group effects, rows of a group are not independent: the
    cluster-robust CI of d must be wider than one that pretends they are (each row its own cluster)."""
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(30), 8)
    y = np.repeat(np.arange(30) % 2, 8)
    acts = (2 * rng.standard_normal(30)[groups] + 0.3 * rng.standard_normal(240) + 0.5 * y)[:, None]
    by_group = F.feature_stats(acts, y, groups=groups)[0]["d_ci"]
    by_row = F.feature_stats(acts, y)[0]["d_ci"]
    assert by_group[1] - by_group[0] > 2 * (by_row[1] - by_row[0])


def test_split_by_group_is_disjoint_balanced_and_seeded():
    _, y, groups = sae_like(n_groups=41, d_sae=2)
    sel, held = F.split_by_group(groups, 0.5, seed=0, y=y)
    assert not set(groups[sel]) & set(groups[held]) and len(sel) + len(held) == len(y)
    assert len(set(groups[held])) in (20, 21)
    assert abs(y[sel].mean() - y[held].mean()) < 0.1
    np.testing.assert_array_equal(F.split_by_group(groups, 0.5, seed=0, y=y)[1], held)
    assert not np.array_equal(F.split_by_group(groups, 0.5, seed=1, y=y)[1], held)
    assert len(set(groups[F.split_by_group(groups, 0.25, seed=0)[1]])) in (10, 11)
    with pytest.raises(ValueError, match="cannot be split"):
        F.split_by_group(["a", "a", "b"], 0.1)


def test_heldout_report_undoes_the_winners_curse():
    """On pure noise the largest |d| among 1500 features on one split looks like an effect; the same
    features measured on the other split are null. With a planted feature, it is chosen and holds up."""
    acts, y, groups = sae_like(seed=5)
    sel, held = F.split_by_group(groups, 0.5, seed=0, y=y)
    chosen = F.feature_stats(acts[sel], y[sel], ci=False)
    report = F.top_features(chosen, F.feature_stats(acts[held], y[held], ci=False), k=10)
    assert [r["rank"] for r in report] == list(range(1, 11))
    assert np.mean([abs(r["select_cohens_d"]) for r in report]) > 0.45
    assert np.mean([abs(r["cohens_d"]) for r in report]) < 0.2
    assert {r["direction"] for r in report} <= {"deceptive higher", "deceptive lower"}

    acts, y, groups = sae_like(planted=(7, 900), seed=6)
    report = F.select_and_report(acts, y, groups, k=5, n_permutations=999, seed=0)
    assert {report[0]["feature"], report[1]["feature"]} == {7, 900}
    assert all(r["d_ci"][0] > 0 and r["q_value"] < 0.01 for r in report[:2])
    with pytest.raises(ValueError, match="selection stats cover 3 features, held-out 2"):
        F.top_features(chosen[:3], chosen[:2])


def test_token_firing_rates_stream_numpy_and_torch():
    rng = np.random.default_rng(7)
    acts = np.maximum(rng.standard_normal((100, 12)), 0).astype(np.float32)
    labels = rng.integers(0, 2, 100)
    batches = [acts[:40], torch.from_numpy(acts[40:90]), acts[90:]]
    rate_h, rate_d = F.token_firing_rates(iter(batches), labels)
    np.testing.assert_allclose(rate_h, (acts[labels == 0] > 0).mean(0))
    np.testing.assert_allclose(rate_d, (acts[labels == 1] > 0).mean(0))
    with pytest.raises(ValueError, match="held 100 tokens but token_labels has 101"):
        F.token_firing_rates(iter(batches), np.r_[labels, 0])
    with pytest.raises(ValueError, match="more tokens than token_labels"):
        F.token_firing_rates(iter(batches), labels[:99])


def test_features_jsonl_round_trip_is_strict_json(tmp_path):
    acts, y, groups = sae_like(d_sae=5)
    rows = F.feature_stats(acts, y, groups=groups)
    rows[0]["cohens_d"] = float("inf")
    path = tmp_path / "features" / "d32_topk_L12_mixed.jsonl"
    run.write_jsonl(path, rows)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and "Infinity" not in lines[0] and "NaN" not in path.read_text()
    back = run.read_jsonl(path)
    assert back[0]["cohens_d"] is None and back[1]["d_ci"] == list(rows[1]["d_ci"])
    assert back[2] == json.loads(json.dumps({**rows[2], "d_ci": list(rows[2]["d_ci"])}))


def test_one_label_class_is_a_clear_error():
    acts, y, groups = sae_like(d_sae=4)
    with pytest.raises(ValueError, match="240 honest and 0 deceptive completions"):
        F.feature_stats(acts, np.zeros_like(y))
    with pytest.raises(ValueError, match="needs >= 2 completions per class"):
        F.feature_stats(acts[:5], np.array([0, 0, 0, 0, 1]))
