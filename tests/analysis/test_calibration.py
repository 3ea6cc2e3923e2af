"""Calibration: every p-value and CI the suite prints, on simulated null worlds with group- and
prompt-level random effects (tests/null_worlds.py) in the designs notebook 02 makes (contrast pairs;
paraphrased scenarios labelled per prompt; same-prompt sampling labelled per answer). False-positive
rates must sit within ±0.03 of alpha and CIs must cover the truth in >= 93% of worlds. A larger run,
with the numbers before and after, is bench/calibration.py.

The world counts are set so the checks mean something: with 360 worlds a false-positive rate of 0.05
has a standard error of 0.011, so ±0.03 is nearly three of them, and the old probe test (18% at 0.05 in
contrast-pair worlds) or the old feature test would fail by a wide margin.
"""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from tests import null_worlds as nw

SMALL = dict(n_groups=20, n_prompts=3, n_samples=2, d=6)


@pytest.fixture(scope="module")
def impl():
    return nw.current()


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1):
        yield


def test_probe_permutation_p_values_and_cis(impl):
    """W1 and M1: the permutation p of a probe's AUROC rejects about alpha of null worlds in every
    design, and the refitted bootstrap CIs of balanced accuracy and AUROC cover chance."""
    tests = {d: nw.probe_calibration(impl, d, 120, size=SMALL, n_bootstrap=0) for d in nw.DESIGNS}
    for alpha in ("0.05", "0.10"):
        pooled = np.mean([r[f"false_positive_rate_{alpha}"] for r in tests.values()])
        assert abs(pooled - float(alpha)) <= 0.03, (alpha, tests)
    assert all(r["false_positive_rate_0.05"] <= 0.10 for r in tests.values()), tests
    cis = {
        d: nw.probe_calibration(impl, d, 40, size=SMALL, n_permutations=0, n_bootstrap=30, seed=1)
        for d in nw.DESIGNS
    }
    for key in ("ba_ci_coverage", "auroc_ci_coverage"):
        assert np.mean([r[key] for r in cis.values()]) >= 0.93, cis


def test_probe_with_few_groups_and_unbalanced_labels(impl):
    """Few groups (12 scenarios, each all honest or all deceptive: labels permuted across groups) and
    80/20 labels per paraphrase: the permutation p keeps its level and the refitted bootstrap CIs cover
    chance. 240 worlds per design: SE of a pooled false-positive rate of 0.05 is 0.010."""
    designs = {
        "grouped": dict(n_groups=12, n_prompts=3, n_samples=2, d=6),
        "paraphrase": dict(n_groups=20, n_prompts=3, n_samples=2, d=6, deceptive_share=0.2),
    }
    tests = {d: nw.probe_calibration(impl, d, 240, size=size, n_bootstrap=0) for d, size in designs.items()}
    for alpha in ("0.05", "0.10"):
        assert (
            abs(np.mean([r[f"false_positive_rate_{alpha}"] for r in tests.values()]) - float(alpha)) <= 0.03
        )
    cis = {
        d: nw.probe_calibration(impl, d, 40, size=size, n_permutations=0, n_bootstrap=30, seed=1)
        for d, size in designs.items()
    }
    for key in ("ba_ci_coverage", "auroc_ci_coverage"):
        assert np.mean([r[key] for r in cis.values()]) >= 0.93, cis


def test_paired_probe_comparison(impl):
    """The raw-vs-SAE test (Nadeau-Bengio on fold scores) between two null probes on the same rows, and
    the paired bootstrap CIs of their differences. The test is conservative at these sizes (0-4% at
    0.05: its variance correction overstates the fold scores' correlation), so only its upper side is
    held to ±0.03; bench/calibration.py reports it at larger sizes."""
    tests = [nw.paired_calibration(impl, d, 70, size=nw.PROBE_SIZE) for d in nw.DESIGNS]
    assert np.mean([r["false_positive_rate_0.05"] for r in tests]) <= 0.05 + 0.03, tests
    cis = nw.paired_calibration(impl, "contrast", 40, size=SMALL, n_bootstrap=30)
    assert cis["ba_difference_ci_coverage"] >= 0.93 and cis["auroc_difference_ci_coverage"] >= 0.93, cis


def test_held_out_feature_tests(impl):
    """W3 and M5: of the k features chosen on one half, about alpha test significant on the other half
    (one-sided, prompt-level permutations); BH over the k keeps the family-wise error at alpha; the CI
    of d covers zero."""
    runs = [nw.feature_calibration(impl, d, 40, n_permutations=399) for d in nw.DESIGNS]
    assert abs(np.mean([r["chosen_features_at_p_0.05"] for r in runs]) - 0.05) <= 0.03, runs
    assert np.mean([r["worlds_with_any_q_0.05"] for r in runs]) <= 0.05 + 0.03, runs
    assert min(r["d_ci_coverage"] for r in runs) >= 0.93, runs


def test_the_ci_of_d_with_few_groups_and_unbalanced_labels(impl):
    """Few groups (12), unbalanced labels (80/20): the CI of d covers zero when 2 of 12 groups hold the
    deceptive label, with 3 groups per label (6 groups), and with 80/20 labels per paraphrase on sparse
    features: 0.996, 0.95, 0.95 (CR1 with t(G - 1) covered 0.82, 0.92, 0.92). 200 worlds per design: the
    Monte-Carlo SE of each coverage, from the spread over worlds, is 0.001-0.006."""
    few = dict(n_groups=12, n_prompts=4, n_samples=4, d=20)
    runs = [
        nw.d_ci_calibration(impl, "grouped", 200, world="dense", size={**few, "deceptive_share": 0.2}),
        nw.d_ci_calibration(impl, "grouped", 200, world="dense", size={**few, "n_groups": 6}),
        nw.d_ci_calibration(impl, "paraphrase", 200, size={**few, "d": 100, "deceptive_share": 0.2}),
    ]
    assert min(r["d_ci_coverage"] for r in runs) >= 0.93, runs


def test_steering_tests_and_cis(impl):
    """M2: paraphrases share their scenario's effect; the test over scenarios keeps its level, its CI
    covers a zero effect, and a condition's rate CI covers the true rate."""
    r = nw.steering_calibration(impl, 1000)
    assert abs(r["false_positive_rate_0.05"] - 0.05) <= 0.03, r
    assert r["difference_ci_coverage"] >= 0.93 and r["rate_ci_coverage"] >= 0.93, r


def test_steering_cis_when_deception_is_rare(impl):
    """Rare outcomes (DESIGN §9): 10 scenarios x 4 answers at deceptive rates 0.02-0.10, scenario rates
    correlated (ICC 0.05 and 0.3), steering that raises the rate. The rate CI covers the true rate and is
    never [0, 0]; the difference CI covers the true difference. A t interval over scenarios covered
    41-89% (rates) and 61-84% (differences) here. 150 worlds per cell, 6 cells: SE of a pooled coverage
    of 0.95 is 0.007, of one cell 0.018."""
    runs = [
        nw.rare_steering_calibration(impl, 150, rate, steered, icc=icc)
        for rate, steered in ((0.02, 0.05), (0.05, 0.10), (0.10, 0.10))
        for icc in (0.05, 0.3)
    ]
    for key in ("rate_ci_coverage", "difference_ci_coverage"):
        assert np.mean([r[key] for r in runs]) >= 0.93 and min(r[key] for r in runs) >= 0.9, runs
    assert max(r["rate_ci_is_0_0"] for r in runs) == 0, runs


def test_lm_loss_cis():
    """M3: the CE / KL increases and scores are ratios of sums over prompt groups; their t intervals
    cover with the groups evaluate_lm spreads its completions over (skewed group effects)."""
    for n_groups in (10, 40):  # 10: the fewest a small LM_EVAL_COMPLETIONS spreads over
        r = nw.lm_loss_calibration(2000, n_groups=n_groups)
        assert r["ci_coverage"] >= 0.93, r


def test_a_fuzzing_reader_without_the_explanation_is_at_chance(impl):
    """M4: counting marked spans, or looking at where the marks sit, tells right marks from wrong ones
    no better than a coin (the old windows: AUROC 0.83 and 1.0)."""
    r = nw.fuzzing_calibration(impl, 200)
    assert r["n_windows"] > 2000
    for key in (
        "reader_auroc_span_count",
        "reader_auroc_position_of_first_mark",
        "reader_auroc_text_after_last_mark",
    ):
        assert abs(r[key] - 0.5) <= 0.03, r


def test_a_label_conditioned_dictionary_has_no_edge_on_rows_it_never_saw(impl):
    """W2: a dictionary fitted on deceptive rows only, probed on the analysis split it never saw, does no
    better than a mixed one in null worlds; probed on rows it was fitted on (no split), it does."""
    fair = nw.conditioned_sae_calibration(impl, 60)
    assert abs(fair["mean_ba_conditioned_minus_mixed"]) <= max(0.02, 2.5 * fair["se"]), fair
    leaky = nw.conditioned_sae_calibration(
        nw.SimpleNamespace(**{**vars(impl), "reserved": lambda *_: None}), 20
    )
    assert leaky["mean_ba_conditioned_minus_mixed"] > 0.1, leaky
