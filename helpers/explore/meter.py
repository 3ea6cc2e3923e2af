"""The live deception meter: the run's raw-activation probe of notebook 04, refit on every labelled
completion so that it can score new tokens, with its own held-out quality and its calibration caveat.

Notebook 04 saves cross-validated metrics (probes.json), not fitted weights. Refitting is cheap (one
logistic regression on the pooled [n_completions, d_model] residuals of one layer) and uses the same
objective as `analysis.probes.probe`: each column standardised with the training rows' mean and standard
deviation, then L2-penalised logistic regression with balanced class weights and an unpenalised
intercept (scikit-learn's `LogisticRegression(C, class_weight="balanced")`, which notebook 04's solver
reproduces) at probes.json's C and pooling; tests/explore/test_meter.py checks that refitting this way on
each training fold gives notebook 04's out-of-fold predictions. Its quality (`DeceptionMeter.cv`) is
the grouped cross-validation of that same recipe on the rows the meter is fit on (`analysis.probes.probe`:
completions of a prompt group never on both sides, refitted cluster-bootstrap CIs): every labelled
completion, where notebook 04's raw probe (probes.json, kept as `DeceptionMeter.analysis_cv` and quoted
beside it, named as such) saw only the analysis split. The refit's accuracy on the rows it was fit on
would be optimistic and is never shown.

Calibration caveat (`CAVEAT`): the probe was trained on one vector per completion, the mean of its
completion tokens' residuals (or its last token's, with pooling "last"). A single token's residual is
not such a vector, so a per-token P(deceptive) is the probe's reading of an input it was not fit on;
the running mean over the tokens generated so far is its own input type (for mean pooling), and only
its value at the end of an answer matches what the CV figures describe. Neither is calibrated for
prompts unlike the run's scenarios.

Honesty about chance: the meter is drawn greyed out, and says why, unless the probe it actually uses is
better than chance by its own grouped CV: both the AUROC and the balanced-accuracy 95% CIs above 0.5
(`DeceptionMeter.chance`). A probe whose CI includes 0.5 would otherwise paint confident red bars
(P = 0.9 is an extreme of a logistic fit, not evidence). The figure quoted first is always that probe's
own (`DeceptionMeter.quality`); notebook 04's is quoted after it, named as a different fit.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from helpers.analysis.probes import probe
from helpers.collect.capture import load_pooled
from helpers.collect.completions import read_completions
from helpers.run import probes_path
from helpers.tables import value_ci

METER_COLOUR, CHANCE_COLOUR = "#d63027", "#b8b8b8"
CAVEAT = (
    "meter's probe (raw residuals at layer {layer}), by its own held-out quality (grouped CV on the {n} "
    "labelled completions it is fit on): {cv}. Notebook 04's raw probe on its analysis split (another fit): "
    "{analysis}. Calibration caveat: the probe was trained on one pooled vector per completion ({pooling} "
    "over its tokens); a single token's score reads an input it never saw, and the running mean over the "
    "answer so far is its own input type only at the end of an answer."
)


@dataclass
class DeceptionMeter:
    """A linear probe P(deceptive | x) = sigmoid(x @ coef + intercept) on raw residuals at `layer`."""

    layer: int
    pooling: str
    coef: np.ndarray  # [d_model], in raw residual units (the standardisation folded in)
    intercept: float
    n_train: int
    cv: dict[str, Any]
    """Grouped CV of this meter's recipe on its own training rows (balanced accuracy, AUROC, their CIs,
    n, n_groups, n_folds), or {"reason": why there is none}."""
    analysis_cv: dict[str, Any] | None = None
    """probes.json's raw-probe row at this layer (notebook 04, analysis split), when notebook 04 ran."""

    def score(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(deceptive) of each row of x [n, d_model] (or one vector [d_model] -> [1])."""
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
        z = np.atleast_2d(x) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    @property
    def chance(self) -> str | None:
        """Why this meter is no better than chance (its own grouped CV: an AUROC or balanced-accuracy
        95% CI that includes 0.5, or no CV at all), or None when both CIs lie above 0.5."""
        if "reason" in self.cv:
            return f"its quality is unknown ({self.cv['reason']})"
        for key, ci, name in (
            ("auroc", "auroc_ci", "AUROC"),
            ("balanced_accuracy", "ba_ci", "balanced accuracy"),
        ):
            if self.cv.get(ci) is None or None in self.cv[ci]:
                return f"its {name} has no confidence interval (too few prompt groups to bootstrap)"
            lo, hi = self.cv[ci]
            if lo <= 0.5:
                return f"its {name} {self.cv[key]:.2f} [{lo:.2f}, {hi:.2f}] includes chance (0.5)"
        return None

    @property
    def caveat(self) -> str:
        analysis = (
            _quality(self.analysis_cv)
            if self.analysis_cv
            else "none (probes.json has no raw probe at this layer)"
        )
        text = CAVEAT.format(
            layer=self.layer, pooling=self.pooling, n=self.n_train, cv=_quality(self.cv), analysis=analysis
        )
        if self.chance:
            return f"Greyed out: this meter is no better than chance: {self.chance}. The {text}"
        return f"The {text}"

    def bar_html(self, value: float, token: float | None = None) -> str:
        """A reading as an HTML bar: red, as long as P(deceptive), when the probe beats chance; grey with
        the reason on hover (and no colour to read meaning into) when it does not (`chance`)."""
        reading = f"{value:.2f}" + (f" (token: {token:.2f})" if token is not None else "")
        style = f"display:inline-block; width:{80 * value:.0f}px; height:9px; background:"
        if self.chance is None:
            return f"<span style='{style}{METER_COLOUR}'></span> {reading}"
        why = html.escape(f"no better than chance: {self.chance}")
        return (
            f"<span style='color:#999' title=\"{why}\"><span style='{style}{CHANCE_COLOUR}'></span> "
            f"{reading} <i>no better than chance</i></span>"
        )


def _quality(cv: dict[str, Any]) -> str:
    if "reason" in cv:
        return f"unknown ({cv['reason']})"

    auroc = "unknown" if cv.get("auroc") is None else value_ci(cv["auroc"], cv.get("auroc_ci"))
    return f"balanced accuracy {value_ci(cv['balanced_accuracy'], cv.get('ba_ci'))}, AUROC {auroc}"


def fit_probe(X: np.ndarray, y: np.ndarray, C: float = 1.0) -> tuple[np.ndarray, float]:
    """(coef [d], intercept) of `probes.probe`'s estimator fit on all rows of X [n, d], with the
    standardisation folded in so it applies to raw vectors."""
    X = np.asarray(X, np.float64)
    mu, sd = X.mean(0), X.std(0)
    sd[sd == 0] = 1.0  # as probes.probe: a column constant on the training rows carries nothing
    # A tight tolerance: the meter should be the optimum notebook 04's solver reaches, not an early stop.
    clf = LogisticRegression(C=C, class_weight="balanced", tol=1e-8, max_iter=10_000)
    clf.fit((X - mu) / sd, np.asarray(y))
    w = clf.coef_[0] / sd
    return w, float(clf.intercept_[0] - mu @ w)


def fit_meter(
    run_dir: str | os.PathLike, layer: int, *, n_bootstrap: int = 100, seed: int = 0
) -> DeceptionMeter:
    """The deception meter of `layer`: its probe refit on the run's labelled pooled completions, and that
    recipe's grouped-CV quality on the same rows with `n_bootstrap` refitted draws
    for its CIs (module doc)."""
    probes = json.loads(probes_path(run_dir).read_text()) if probes_path(run_dir).exists() else {}
    pooling = probes.get("pooling", "mean")
    raw = next(
        (r for r in probes.get("rows", []) if r.get("kind") == "raw" and r.get("layer") == layer), None
    )
    C = float(((raw or {}).get("details") or {}).get("C", 1.0))
    ids, mean, last = load_pooled(run_dir, layer)
    records = {r["id"]: r for r in read_completions(run_dir)}
    label = {cid: r.get("label") for cid, r in records.items()}
    rows = [i for i, cid in enumerate(ids) if label.get(cid) in ("honest", "deceptive")]
    y = np.array([label[ids[i]] == "deceptive" for i in rows], int)
    if len(rows) < 4 or y.min() == y.max():
        raise ValueError(
            "the deception meter needs labelled honest and deceptive completions at layer "
            f"{layer}; the run has {int((y == 0).sum())} honest and {int(y.sum())} "
            "deceptive: collect and label more in notebook 02"
        )
    X = (mean if pooling == "mean" else last)[rows].numpy()
    coef, intercept = fit_probe(X, y, C)
    keys = ("balanced_accuracy", "ba_ci", "auroc", "auroc_ci", "n", "n_groups", "n_folds")
    groups = [str(records[ids[i]].get("group") or records[ids[i]]["prompt_id"]) for i in rows]
    n_groups = len(set(groups))
    try:
        result = probe(
            X,
            y,
            groups,
            prompts=[records[ids[i]]["prompt_id"] for i in rows],
            n_folds=min(5, n_groups),
            seed=seed,
            n_permutations=0,
            n_bootstrap=n_bootstrap,
            C=C,
        )
        cv = {k: getattr(result, k) for k in keys} | {"ci_method": result.ci_method}
    except ValueError as err:  # too few groups, or a class in too few of them, for a grouped CV
        cv = {"reason": f"no grouped CV on {n_groups} prompt groups: {err}"}
    analysis_cv = {k: raw.get(k) for k in keys} if raw is not None else None
    return DeceptionMeter(layer, pooling, coef, intercept, len(rows), cv, analysis_cv)
