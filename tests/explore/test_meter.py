"""The deception meter: refitting notebook 04's probe recipe on a fold's training rows gives notebook
04's own out-of-fold predictions (the peer: `analysis.probes.probe`), and fit_meter on a run."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from helpers.analysis.probes import grouped_folds, probe
from helpers.collect.capture import load_pooled
from helpers.collect.completions import read_completions, write_completions
from helpers.explore.live import TokenStep
from helpers.explore.meter import CHANCE_COLOUR, METER_COLOUR, fit_meter, fit_probe
from helpers.explore.views import live_html
from helpers.run import probes_path
from tests.conftest import tiny_chat_llama
from tests.explore.fake_run import LAYER, make_run


@pytest.mark.parametrize("d", [6, 80], ids=["d<n", "d>n"])
def test_refit_reproduces_notebook_04s_out_of_fold_predictions(d):
    rng = np.random.default_rng(d)
    n, n_groups = 72, 12
    groups = np.repeat(np.arange(n_groups), n // n_groups)
    y = (rng.random(n) < 0.5).astype(int)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + 0.8 * y[:, None] * (np.arange(d) < 3)
    X[:, -1] = 2.0  # a constant column, as a dead SAE feature or a fixed dimension would be
    result = probe(X, y, groups, n_folds=3, seed=1, n_permutations=0, n_bootstrap=0, C=0.5)
    for tr, te in grouped_folds(groups, 3, 1, y=y):
        coef, intercept = fit_probe(X[tr], y[tr], C=0.5)
        proba = 1 / (1 + np.exp(-(X[te] @ coef + intercept)))
        assert np.allclose(proba, result.oof_proba[te], atol=2e-4), np.abs(proba - result.oof_proba[te]).max()


@pytest.fixture(scope="module")
def run(offline_lm, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("meter_run"), tiny_chat_llama(offline_lm.tokenizer))


def test_fit_meter_on_a_run(run):
    meter = fit_meter(run, LAYER)
    ids, mean, _ = load_pooled(run, LAYER)
    labels = {r["id"]: r["label"] for r in read_completions(run)}
    keep = [i for i, c in enumerate(ids) if labels[c] in ("honest", "deceptive")]
    assert meter.n_train == len(keep) == 23 and meter.pooling == "mean"
    y = np.array([labels[ids[i]] == "deceptive" for i in keep], int)
    labels_and_groups = {r["id"]: r["group"] for r in read_completions(run)}
    coef, intercept = fit_probe(mean[keep].numpy(), y, C=0.5)
    assert np.allclose(
        meter.score(mean[keep]), 1 / (1 + np.exp(-(mean[keep].numpy() @ coef + intercept))), atol=1e-6
    )
    # its quality is the grouped CV of its own recipe on the rows it is fit on (the peer: notebook 04's
    # probe on those rows); notebook 04's figure for the analysis split is quoted beside it, as such
    groups = [labels_and_groups[ids[i]] for i in keep]
    ref = probe(
        mean[keep].numpy(),
        y,
        groups,
        prompts=[ids[i].split("#")[0] for i in keep],
        n_folds=5,
        n_permutations=0,
        n_bootstrap=100,
        C=0.5,
    )
    assert meter.cv["balanced_accuracy"] == ref.balanced_accuracy and meter.cv["ba_ci"] == ref.ba_ci
    assert meter.cv["n"] == 23 and meter.cv["n_groups"] == 6 and meter.analysis_cv["balanced_accuracy"] == 0.8
    lo, hi = ref.ba_ci
    assert (
        f"balanced accuracy {ref.balanced_accuracy:.2f} [{lo:.2f}, {hi:.2f}]"
        in meter.caveat.split("Notebook 04")[0]
    )
    assert "grouped CV on the 23 labelled completions it is fit on" in meter.caveat
    assert (
        "Notebook 04's raw probe on its analysis split (another fit): balanced accuracy 0.80 [0.70, 0.90]"
        in meter.caveat
    )
    assert "one pooled vector per completion" in meter.caveat
    # this tiny random model's probe is at chance on 6 prompt groups: the meter says so first
    assert meter.cv["auroc_ci"][0] <= 0.5 and meter.caveat.startswith("Greyed out: this meter is no better")
    assert meter.score(mean[0]).shape == (1,)


def test_meter_without_probes_json_or_labels(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    probes_path(copy).unlink()
    assert "analysis split (another fit): none (probes.json has no raw probe" in fit_meter(copy, LAYER).caveat
    write_completions(copy, [{**r, "label": "honest"} for r in read_completions(copy)])
    with pytest.raises(ValueError, match=r"needs labelled honest and deceptive.*24 honest and 0 deceptive"):
        fit_meter(copy, LAYER)


def test_meter_greys_out_and_says_why_when_its_probe_is_no_better_than_chance(run):
    meter = fit_meter(run, LAYER)
    steps = [TokenStep(0, 1, "No", [], 0, meter=0.95, meter_running=0.93)]
    good = dataclasses.replace(
        meter,
        cv={
            **meter.cv,
            "auroc": 0.9,
            "auroc_ci": (0.8, 0.97),
            "balanced_accuracy": 0.85,
            "ba_ci": (0.7, 0.95),
        },
    )
    assert good.chance is None and not good.caveat.startswith("Greyed out")
    assert "layer 1" in good.caveat and "AUROC 0.90 [0.80, 0.97]" in good.caveat.split("Notebook 04")[0]
    page = live_html(steps, good)
    assert METER_COLOUR in page and CHANCE_COLOUR not in page and "0.93 (token: 0.95)" in page
    # the case: full red bars at 0.93 for a probe whose own AUROC is 0.47
    chance = dataclasses.replace(meter, cv={**good.cv, "auroc": 0.47, "auroc_ci": (0.3, 0.62)})
    assert chance.chance == "its AUROC 0.47 [0.30, 0.62] includes chance (0.5)"
    page = live_html(steps, chance)
    assert METER_COLOUR not in page and CHANCE_COLOUR in page and "no better than chance" in page
    assert (
        "Greyed out: this meter is no better than chance: its AUROC 0.47 [0.30, 0.62] includes chance" in page
    )
    ba = dataclasses.replace(meter, cv={**good.cv, "ba_ci": (0.5, 0.7)})
    assert "balanced accuracy 0.85 [0.50, 0.70] includes chance" in ba.chance
    unknown = dataclasses.replace(meter, cv={"reason": "no grouped CV on 2 prompt groups: too few"})
    assert unknown.chance.startswith("its quality is unknown (no grouped CV on 2 prompt groups")
    assert CHANCE_COLOUR in unknown.bar_html(0.9) and "unknown (no grouped CV" in unknown.caveat
    no_ci = dataclasses.replace(meter, cv={**good.cv, "auroc_ci": None})
    assert "AUROC has no confidence interval" in no_ci.chance
