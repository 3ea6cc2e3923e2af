"""Feature statistics: a planted feature ranks first with a CI that excludes 0 while nulls stay null,
every statistic matches a reference (scipy, scikit-learn, the formula), selection and report use
disjoint groups (and the held-out report undoes the winner's curse), files round-trip as strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from threadpoolctl import threadpool_limits

from helpers import run
from helpers import stats as S
from helpers.analysis import features as F


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


def test_planted_feature_ranks_first_and_nulls_stay_null():
    acts, y, groups = sae_like(planted=(123,))
    rows = F.feature_stats(acts, y, groups=groups, n_bootstrap=300, seed=0)
    assert [r["feature"] for r in rows] == list(range(acts.shape[1]))
    d = np.array([r["cohens_d"] for r in rows])
    q = np.array([r["q_value"] for r in rows])
    assert np.argmax(np.abs(d)) == 123 and np.argmin(q) == 123
    top = rows[123]
    assert top["d_ci"][0] > 0.3 and top["q_value"] < 1e-3 and top["auroc"] > 0.7
    assert (
        top["mean_deceptive"] > top["mean_honest"]
        and top["firing_rate_deceptive"] > top["firing_rate_honest"]
    )
    nulls = np.delete(q, 123)
    assert (nulls > 0.05).mean() > 0.99
    lo = np.array([r["d_ci"][0] for r in rows])
    hi = np.array([r["d_ci"][1] for r in rows])
    assert (np.delete((lo < 0) & (hi > 0), 123)).mean() > 0.9  # ~95% of null CIs cover 0


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
    rows = F.feature_stats(acts, y, n_bootstrap=0)
    for j in range(6):
        col, r = acts[:, j], rows[j]
        a, b = col[y == 1], col[y == 0]
        pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(col) - 2))
        assert r["cohens_d"] == pytest.approx((a.mean() - b.mean()) / pooled)
        assert r["auroc"] == pytest.approx(roc_auc_score(y, col))
        want_p = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue
        assert r["u_p_value"] == pytest.approx(want_p, rel=1e-9)
        assert r["firing_rate_deceptive"] == pytest.approx((a > 0).mean())
        assert r["mean_honest"] == pytest.approx(b.mean())
        assert np.isnan(r["d_ci"][0])  # n_bootstrap=0: no CI
    dead = rows[6]
    assert (dead["cohens_d"], dead["auroc"], dead["u_p_value"], dead["firing_rate_honest"]) == (0, 0.5, 1, 0)
    q = S.bh_qvalues([r["u_p_value"] for r in rows])
    np.testing.assert_allclose([r["q_value"] for r in rows], q)


def test_bh_qvalues_match_reference():
    # By hand: sorted p .005 .01 .03 .04, m = 4 -> p*m/rank .02 .02 .04 .04 (already monotone).
    np.testing.assert_allclose(S.bh_qvalues([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    p = np.random.default_rng(2).uniform(size=500) ** 3
    np.testing.assert_allclose(S.bh_qvalues(p), stats.false_discovery_control(p, method="bh"), rtol=1e-12)


def test_weighted_auroc_and_balanced_accuracy_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    scores = np.round(rng.uniform(size=80) + 0.3 * y, 1)  # ties
    W = rng.integers(0, 3, (4, 80)).astype(float)
    got_auc = S.weighted_auroc(scores, y, W)
    got_ba = S.balanced_accuracy(scores, y, W)
    for b in range(4):
        assert got_auc[b] == pytest.approx(roc_auc_score(y, scores, sample_weight=W[b]))
        assert got_ba[b] == pytest.approx(balanced_accuracy_score(y, scores >= 0.5, sample_weight=W[b]))
    assert S.weighted_auroc(scores, y)[0] == pytest.approx(roc_auc_score(y, scores))


def test_cluster_bootstrap_is_wider_when_groups_differ():
    """With one label per group and strong group effects, rows of a group are not independent: the
    group bootstrap's CI of d must be wider than a row bootstrap's that pretends they are."""
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(30), 8)
    y = np.repeat(np.arange(30) % 2, 8)
    acts = (2 * rng.standard_normal(30)[groups] + 0.3 * rng.standard_normal(240) + 0.5 * y)[:, None]
    by_group = F.feature_stats(acts, y, groups=groups, n_bootstrap=400)[0]["d_ci"]
    by_row = F.feature_stats(acts, y, n_bootstrap=400)[0]["d_ci"]
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
    chosen = F.feature_stats(acts[sel], y[sel], n_bootstrap=0)
    report = F.top_features(chosen, F.feature_stats(acts[held], y[held], n_bootstrap=0), k=10)
    assert [r["rank"] for r in report] == list(range(1, 11))
    assert np.mean([abs(r["select_cohens_d"]) for r in report]) > 0.45
    assert np.mean([abs(r["cohens_d"]) for r in report]) < 0.2
    assert all(r["q_value_selected"] > 0.05 for r in report)

    acts, y, groups = sae_like(planted=(7, 900), seed=6)
    report = F.select_and_report(acts, y, groups, k=5, n_bootstrap=200, seed=0)
    assert {report[0]["feature"], report[1]["feature"]} == {7, 900}
    assert all(r["d_ci"][0] > 0 and r["q_value_selected"] < 0.01 for r in report[:2])
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
    rows = F.feature_stats(acts, y, groups=groups, n_bootstrap=50)
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
