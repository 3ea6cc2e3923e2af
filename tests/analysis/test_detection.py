"""The field's detector protocol (helpers/analysis/detection.py and its statistics in helpers/stats.py):
brute-force checks on small data, and calibration on simulated worlds where completions of a prompt
group share a random effect (DESIGN.md §9: coverage >= 0.93, also with few groups, 80/20 labels, labels
held by whole groups and rare outcomes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from helpers.analysis.detection import EvalSet, bag_of_words_scores, evaluate_set, fit_scores, transfer_matrix
from helpers.stats import clustered_auroc, clustered_proportion_ci, control_threshold


def obuchowski_brute(s, y, g):
    """Obuchowski (1997) written out pair by pair, for a handful of rows."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    psi = np.array([[1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0 for j in neg] for i in pos])
    M, N = len(pos), len(neg)
    auc = psi.mean()
    v10, v01 = psi.mean(1), psi.mean(0)
    clusters = sorted(set(g))
    I = len(clusters)  # noqa: E741 - Obuchowski's notation
    r10 = np.array([v10[g[pos] == c].sum() - (g[pos] == c).sum() * auc for c in clusters])
    r01 = np.array([v01[g[neg] == c].sum() - (g[neg] == c).sum() * auc for c in clusters])
    s10 = I / ((I - 1) * M) * (r10**2).sum()
    s01 = I / ((I - 1) * N) * (r01**2).sum()
    s11 = I / (I - 1) * (r10 * r01).sum()
    return auc, s10 / M + s01 / N + 2 * s11 / (M * N)


def test_clustered_auroc_matches_brute_force_and_sklearn():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(7), 5)
    y = rng.integers(0, 2, len(g))
    s = np.round(rng.normal(size=len(g)) + y, 1)  # rounded: ties must count 1/2
    auc, lo, hi = clustered_auroc(s, y, g)
    brute_auc, brute_var = obuchowski_brute(s, y, g)
    assert auc == pytest.approx(brute_auc) == pytest.approx(roc_auc_score(y, s))
    # Rebuild the interval: logit scale, the brute-force variance (floored at a quarter of Hanley &
    # McNeil's), t quantile with df from the scarcer side's clusters.
    a, M, N = auc, y.sum(), len(y) - y.sum()
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    hm = (a * (1 - a) + (M - 1) * (q1 - a * a) + (N - 1) * (q2 - a * a)) / (M * N)
    df = min(len(set(g[y == 1])), len(set(g[y == 0]))) - 1
    half = stats.t.ppf(0.975, df) * math.sqrt(max(brute_var, hm / 4)) / (a * (1 - a))
    centre = math.log(a / (1 - a))
    assert lo == pytest.approx(1 / (1 + math.exp(-(centre - half))))
    assert hi == pytest.approx(1 / (1 + math.exp(-(centre + half))))


def test_clustered_auroc_undefined_cases():
    assert all(math.isnan(v) for v in clustered_auroc(np.arange(4.0), np.ones(4), [0, 0, 1, 1]))
    auc, lo, hi = clustered_auroc(np.arange(4.0), np.array([0, 0, 1, 1]), [0, 0, 0, 0])
    assert auc == 1.0 and math.isnan(lo) and math.isnan(hi)


def test_control_threshold_brute_force():
    rng = np.random.default_rng(1)
    for n in (50, 99, 100, 101, 250, 1000):
        c = rng.normal(size=n)
        thr = control_threshold(c, 0.01)
        exceed = (c > thr["threshold"]).sum()
        assert exceed == thr["control_exceed"] <= 0.01 * n
        # The threshold is the lowest control score that keeps the FPR within 1%.
        lower = np.sort(c)[np.sort(c) < thr["threshold"]]
        if len(lower):
            assert (c > lower.max()).sum() > 0.01 * n
        assert thr["resolution"] == 1 / n and thr["too_small"] == (n < 100)
        assert thr["fpr_upper"] == pytest.approx(stats.beta.ppf(0.95, exceed + 1, n - exceed))
    with pytest.raises(ValueError, match="control set is empty"):
        control_threshold(np.zeros(0))


def test_fit_scores_matches_sklearn_balanced_logistic():
    rng = np.random.default_rng(2)
    for d in (5, 60):  # fewer and more features than training rows
        X = rng.normal(size=(50, d))
        y = (X[:, 0] + rng.normal(size=50) > 0.5).astype(int)
        tr, te = np.arange(35), np.arange(35, 50)
        mu, sd = X[tr].mean(0), X[tr].std(0)
        ref = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=10_000)
        ref.fit((X[tr] - mu) / sd, y[tr])
        ours = fit_scores(X, tr, y[tr], [te])[0]
        np.testing.assert_allclose(ours, ref.decision_function((X[te] - mu) / sd), atol=1e-4)
    with pytest.raises(ValueError, match="one class only"):
        fit_scores(X, tr, np.zeros(35, int), [te])


def test_evaluate_set_brute_force_and_reasons():
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(10), 6)
    y = np.tile([0, 1], 30)
    s = rng.normal(size=60) + 1.5 * y
    control = rng.normal(size=300)
    out = evaluate_set(s, y, g, control)
    t = np.sort(control)[::-1][3]  # floor(0.01 * 300) = 3 answers may exceed
    assert out["threshold"]["threshold"] == t
    assert out["recall"] == pytest.approx((s[y == 1] > t).mean())
    spec = (s[y == 0] <= t).mean()
    assert out["ba_at_threshold"] == pytest.approx((out["recall"] + spec) / 2)
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert out["auroc_ci"][0] < out["auroc"] < out["auroc_ci"][1] and not out["why"]
    # A small control set is marked; no control set, one class: the reasons are given, not a number.
    small = evaluate_set(s, y, g, control[:40])
    assert small["threshold"]["too_small"] and any("too few" in w for w in small["why"])
    none = evaluate_set(s, y, g, None)
    assert none["recall"] is None and any("no control set" in w for w in none["why"])
    one = evaluate_set(s[y == 1], y[y == 1], g[y == 1], control)
    assert one["auroc"] is None and one["recall"] is not None and any("undefined" in w for w in one["why"])


def test_transfer_matrix_diagonal_is_cross_validated():
    rng = np.random.default_rng(4)
    n, d = 120, 8
    X = rng.normal(size=(n, d))
    y = np.tile([0, 1], n // 2)
    X[:, 0] += 2 * y  # both datasets share the signal direction
    g = np.repeat(np.arange(n // 4), 4)
    a = EvalSet("a", "train", np.arange(60), y[:60], g[:60])
    b = EvalSet("b", "eval", np.arange(60, 120), y[60:], g[60:])
    m = transfer_matrix(X, [a, b], n_folds=3)
    assert m["train"] == ["a", "b"]
    assert all(0.8 < m["auroc"][i][j] <= 1 for i in range(2) for j in range(2))
    assert m["auroc_ci"][0][0] == [None, None] and None not in m["auroc_ci"][0][1]  # no CI on CV scores
    off = fit_scores(X, a.idx, a.y, [b.idx])[0]
    assert m["auroc"][0][1] == pytest.approx(roc_auc_score(b.y, off))
    # The diagonal is not the in-sample score: on pure noise it is near 0.5, in-sample it is not.
    Xn = rng.normal(size=(n, 100))
    m0 = transfer_matrix(Xn, [a, b], n_folds=3)
    in_sample = roc_auc_score(a.y, fit_scores(Xn, a.idx, a.y, [a.idx])[0])
    assert in_sample > 0.95 and abs(m0["auroc"][0][0] - 0.5) < 0.2
    # A dataset whose deceptive completions sit in one group gets no diagonal, with the reason.
    c = EvalSet(
        "c", "eval", np.arange(60, 68), np.array([0] * 6 + [1] * 2), np.array([0, 0, 1, 1, 2, 2, 3, 3])
    )
    m1 = transfer_matrix(X, [a, c], n_folds=3)
    assert m1["auroc"][1][1] is None and "1 prompt group(s) hold deceptive" in m1["why"]["c->c"]


def _world(rng, n_groups, per_group, shift, group_sd, frac_pos, whole_groups):
    g = np.repeat(np.arange(n_groups), per_group)
    if whole_groups:  # every completion of a group has its group's label (a paraphrase design)
        y = (rng.random(n_groups) < frac_pos).astype(int)[g]
    else:
        y = (rng.random(len(g)) < frac_pos).astype(int)
    return g, y, rng.normal(0, group_sd, n_groups)[g] + rng.normal(size=len(g)) + shift * y


@pytest.mark.parametrize(
    "n_groups,per_group,shift,group_sd,frac_pos,whole_groups",
    [
        (12, 8, 0.0, 1.0, 0.5, False),  # null, few groups
        (12, 8, 1.0, 1.0, 0.5, False),
        (12, 8, 4.0, 0.3, 0.5, False),  # AUROC 0.997: the variance floor's case
        (40, 4, 1.0, 1.0, 0.2, False),  # 80/20 labels
        (20, 5, 1.5, 1.0, 0.2, True),  # 80/20, labels held by whole groups
    ],
)
def test_clustered_auroc_coverage(n_groups, per_group, shift, group_sd, frac_pos, whole_groups):
    # 300 worlds: a coverage of 0.95 has Monte-Carlo SE 0.013.
    rng = np.random.default_rng([n_groups, per_group, int(10 * shift)])
    truth = stats.norm.cdf(shift / math.sqrt(2 * (group_sd**2 + 1)))
    hits = []
    for _ in range(300):
        g, y, s = _world(rng, n_groups, per_group, shift, group_sd, frac_pos, whole_groups)
        if 0 < y.sum() < len(y) and len(set(g[y == 1])) > 1 and len(set(g[y == 0])) > 1:
            _, lo, hi = clustered_auroc(s, y, g)
            hits.append(lo <= truth <= hi)
    assert np.mean(hits) >= 0.93, np.mean(hits)


@pytest.mark.parametrize(
    "n_groups,per_group,rate,logit_sd",
    [(10, 4, 0.02, 1.0), (10, 4, 0.10, 1.0), (12, 8, 0.3, 1.0), (12, 8, 0.9, 1.0), (30, 10, 0.03, 1.5)],
)
def test_clustered_proportion_coverage_rare_and_common(n_groups, per_group, rate, logit_sd):
    """Recall at the control threshold is a clustered proportion, often rare: the Wilson interval on the
    cluster-adjusted sample size covers, also when no completion is flagged."""
    rng = np.random.default_rng([n_groups, int(1000 * rate)])
    centre = math.log(rate / (1 - rate))
    truth = float(np.mean(1 / (1 + np.exp(-(centre + rng.normal(0, logit_sd, 400_000))))))
    hits = []
    g = np.repeat(np.arange(n_groups), per_group)
    for _ in range(600):  # SE 0.009 at 0.95
        p_group = 1 / (1 + np.exp(-(centre + rng.normal(0, logit_sd, n_groups))))
        _, lo, hi = clustered_proportion_ci(rng.random(len(g)) < p_group[g], g)
        hits.append(lo <= truth <= hi)
    assert np.mean(hits) >= 0.93, np.mean(hits)
    _, lo, hi = clustered_proportion_ci(np.zeros(len(g), bool), g)
    assert lo == 0 and hi > 0.05  # nothing flagged: not the degenerate [0, 0]


def test_recall_and_ba_coverage_at_the_control_threshold():
    """The whole row: a fixed detector, a control set setting the threshold, an evaluation set with
    group effects. Estimand: recall (and balanced accuracy) at the threshold the control answers set."""
    rng = np.random.default_rng(7)
    hits_r, hits_b = [], []
    for _ in range(300):
        control = rng.normal(size=200)
        g, y, s = _world(rng, 12, 8, 2.0, 0.7, 0.5, False)
        out = evaluate_set(s, y, g, control)
        t = out["threshold"]["threshold"]
        # Population recall / specificity at t: score = group effect + noise (+ shift).
        sd = math.sqrt(0.7**2 + 1)
        recall, spec = stats.norm.sf((t - 2.0) / sd), stats.norm.cdf(t / sd)
        hits_r.append(out["recall_ci"][0] <= recall <= out["recall_ci"][1])
        hits_b.append(out["ba_ci"][0] <= (recall + spec) / 2 <= out["ba_ci"][1])
    assert np.mean(hits_r) >= 0.93 and np.mean(hits_b) >= 0.93, (np.mean(hits_r), np.mean(hits_b))


@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_transfer_auroc_covers_the_fixed_probes_true_auroc(shift):
    """End to end: a probe trained on one simulated dataset, scored on another whose completions share
    group effects; the eval set's AUROC CI covers the trained probe's population AUROC (null: 0.5)."""
    rng = np.random.default_rng([5, int(10 * shift)])
    d, hits = 20, []

    def dataset(n_groups, per_group):
        g = np.repeat(np.arange(n_groups), per_group)
        y = np.tile([0, 1], len(g) // 2)
        effects = rng.normal(0, 0.8, (n_groups, d))
        return effects[g] + rng.normal(size=(len(g), d)) + np.outer(shift * y, np.eye(d)[0]), y, g

    for _ in range(200):  # SE 0.015 at 0.95
        X_tr, y_tr, _ = dataset(10, 8)
        X_ev, y_ev, g_ev = dataset(12, 8)
        X = np.vstack([X_tr, X_ev])
        tr, ev = np.arange(len(y_tr)), np.arange(len(y_tr), len(X))
        # The probe's weights w on the raw scale: its scores on unit vectors, less the intercept.
        basis = np.vstack([np.zeros(d), np.eye(d)])
        s0, *s = fit_scores(np.vstack([X, basis]), tr, y_tr, [ev, *[[len(X) + 1 + i] for i in range(d)]])
        w = np.array([v[0] for v in s]) - fit_scores(np.vstack([X, basis]), tr, y_tr, [[len(X)]])[0][0]
        # Score = w.x + c: per class Gaussian with variance |w|^2 (0.8^2 + 1), means differ by shift * w0.
        truth = stats.norm.cdf(shift * w[0] / math.sqrt(2 * (w @ w) * (0.64 + 1)))
        _, lo, hi = clustered_auroc(s0, y_ev, g_ev)
        hits.append(lo <= truth <= hi)
    assert np.mean(hits) >= 0.93, np.mean(hits)


def test_control_fpr_bound_counts_prompts_when_answers_share_one():
    """Three answers per control prompt with a strong prompt effect: the 95% upper bound on the control
    population's FPR at the threshold holds when it counts prompts (groups=), and falls short when it
    treats the answers as independent."""
    rng = np.random.default_rng(9)
    n_prompts, per, sd_prompt = 150, 3, 1.5
    g = np.repeat(np.arange(n_prompts), per)
    total_sd = math.sqrt(sd_prompt**2 + 1)
    held, naive = [], []
    for _ in range(400):  # SE 0.011 at 0.95
        scores = rng.normal(0, sd_prompt, n_prompts)[g] + rng.normal(size=len(g))
        truth = stats.norm.sf(control_threshold(scores, 0.01)["threshold"] / total_sd)
        held.append(truth <= control_threshold(scores, 0.01, g)["fpr_upper"])
        naive.append(truth <= control_threshold(scores, 0.01)["fpr_upper"])
    assert np.mean(held) >= 0.93 and np.mean(naive) < np.mean(held), (np.mean(held), np.mean(naive))


def test_bag_of_words_scores_match_sklearn_on_the_same_terms():
    rng = np.random.default_rng(11)
    words = ["yes", "no", "maybe", "sure", "never", "truth", "lie", "well"]
    texts = [" ".join(rng.choice(words, 6)) + (" lie" if i % 2 else " truth") for i in range(60)]
    y = np.arange(60) % 2
    tr, te = np.arange(40), np.arange(40, 60)
    vec = CountVectorizer(binary=True, ngram_range=(1, 2), min_df=2).fit([texts[i] for i in tr])
    scaler = StandardScaler(with_mean=False).fit(vec.transform([texts[i] for i in tr]))
    ref = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=10_000)
    ref.fit(scaler.transform(vec.transform([texts[i] for i in tr])), y[tr])
    want = ref.decision_function(scaler.transform(vec.transform([texts[i] for i in te])))
    np.testing.assert_allclose(bag_of_words_scores(texts, tr, y[tr], [te])[0], want, atol=1e-4)
