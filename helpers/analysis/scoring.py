"""Scores of auto-interpretation explanations (autointerp.py writes them) on each feature's held-out
SCORING windows, as in EleutherAI's delphi (REFERENCE.md "Auto-interpretability practice"). Gemini plays
the reader: it sees only the explanation and the windows, and its predictions are checked against the
SAE's activations.

- DETECTION (which windows fire?): all scoring windows (activating, random non-activating, hard
  negatives), shuffled and unmarked; the reader gives each a 0–1 probability that the feature fires on
  at least one of its tokens. Truth: the window is activating.
- FUZZING (which tokens?): the activating scoring windows only, each with some tokens marked <<like
  this>>, as the explanation prompt marks firing tokens. In half of them (seeded) the marks sit on
  exactly the tokens the feature fires on; in the other half the same pattern of marks (the same runs
  and gaps) is moved onto tokens where the feature is silent. Every window is shown cropped to the same
  random amount of text before its first mark and after its last one, so neither the shape of the marks
  nor where they sit in the text tells right from wrong: a reader that ignores the explanation scores
  AUROC 0.5 (tests/analysis/test_calibration.py; with marks scattered at random over silent tokens and
  the example token always marked, counting spans scored 0.83 and checking the position 1.0). The
  reader gives each a 0–1 probability that the marked tokens are the ones the feature fires on. Truth:
  the marking is correct. An explanation that names only the topic of the text passes detection but
  not fuzzing, which asks for the tokens.
- Each gives balanced accuracy at 0.5 and AUROC, with a Mann–Whitney p-value of the AUROC (about 10–20
  windows per feature: read the verdict, not the digits). The BASELINE scores the same windows with
  an UNRELATED feature's explanation: a random live feature of the same SAE (`controls`, chosen by
  notebook 04 and explained with the others), so the baseline is not a near-copy of the explanation
  under test, as the next top feature's often is (both are chosen for separating deception). Without
  controls, the next explained feature (cyclically) stands in, and `baseline_kind` says so. An
  explanation is worth what it beats.
- Requests go through helpers.gemini (Asker, ask_batched): several features per request, answers
  validated (feature ids of the batch, every window scored once), follow-ups for features left out,
  cached and budgeted. Nothing is invented: a score Gemini did not give is None and its source says why.

Per feature, for each method m in METHODS: `m` and `m_baseline` (metrics dicts or None), `m_source` and
`m_baseline_source` ("gemini:<model>" or why it is unavailable), `m_ba_over_baseline`;
`baseline_explanation_of`, the feature whose explanation the baselines used, and `baseline_kind`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from helpers.analysis.contexts import FeatureContexts, marked_text
from helpers.gemini import LEFT_OUT, Asker, GeminiClient, ask_batched, check_ids
from helpers.run import override_fields
from helpers.stats import balanced_accuracy, rank_sum

METHODS = ("detection", "fuzzing")


@dataclass(frozen=True)
class AutointerpSettings:
    """How an auto-interpretation pass asks Gemini and scores the answers (`autointerp.autointerp`,
    `explain_features`, `score_explanations`)."""

    features_per_request: int = 8
    """Features explained (and scored) in one request."""
    baseline: bool = True
    """Score each explanation against an unrelated feature's too (the controls')."""
    fuzzing: bool = True
    """Score by fuzzing as well as by detection."""
    seed: int = 0
    """Shuffles the scoring windows."""
    max_followups: int = 2
    """Follow-up requests for the features Gemini leaves out of an answer."""

    def __post_init__(self) -> None:
        if self.features_per_request < 1:
            raise ValueError(f"features_per_request must be at least 1, got {self.features_per_request}")

    def with_overrides(self, overrides: dict[str, Any]) -> AutointerpSettings:
        """These settings with the fields named in `overrides` replaced; an unknown name is an error
        listing the known ones."""
        return override_fields(self, overrides, "autointerp settings")


class WindowScore(BaseModel):
    window: int
    score: float = Field(ge=0.0, le=1.0)


class FeatureScores(BaseModel):
    feature: int
    scores: list[WindowScore]


class ScoreAnswer(BaseModel):
    features: list[FeatureScores]


DETECTION_SYSTEM = """You test explanations of features of a sparse autoencoder trained on a chat language
model. Each item gives one feature's explanation and numbered text windows. For every window give the
probability, from 0 to 1, that the feature fires on at least one token of the window, judging only by
the explanation. Some windows fire and some do not. Return exactly one entry per item with the item's
feature number unchanged, and one score for every window number of that item."""

FUZZING_SYSTEM = """You test explanations of features of a sparse autoencoder trained on a chat language
model. Each item gives one feature's explanation and numbered text windows; the feature fires somewhere
in every window. In each window some tokens are marked <<like this>>. In some windows the marked tokens
are exactly the tokens the feature fires on; in the others the same pattern of marks was moved onto
tokens where it does not fire. For every window give the probability, from 0 to 1, \
that the marked tokens are the ones the
feature fires on, judging only by the explanation. Return exactly one entry per item with the item's
feature number unchanged, and one score for every window number of that item."""

SYSTEMS = {"detection": DETECTION_SYSTEM, "fuzzing": FUZZING_SYSTEM}
VERBS = {"detection": "Score the windows of", "fuzzing": "Judge the marked tokens in the windows of"}


def detection_windows(ctx: FeatureContexts, seed: int = 0) -> list[dict[str, Any]] | None:
    """The scoring windows in a seeded shuffled order, unmarked: {"window" (the number shown), "text",
    "kind", "truth" (1 = activating)}. None unless there are activating and non-activating ones."""
    n_act = sum(e["kind"] == "activating" for e in ctx.score)
    if not 0 < n_act < len(ctx.score):
        return None
    perm = np.random.default_rng([seed, ctx.feature]).permutation(len(ctx.score))
    return [
        {"window": j, "text": e["text"], "kind": e["kind"], "truth": int(e["kind"] == "activating")}
        for j, e in enumerate(ctx.score[k] for k in perm)
    ]


def fuzzing_windows(ctx: FeatureContexts, seed: int = 0) -> list[dict[str, Any]] | None:
    """Of the activating scoring windows that can be shown both ways, half correctly and half wrongly
    marked, in a seeded shuffled order: {"window" (the number shown), "text" (cropped and marked),
    "example" (index in ctx.score), "marked" (marked token indices in the stored window), "shown"
    ([start, end) of the crop in the stored window), "truth" (1 = the marks are its firing tokens)}.

    Per window: `before` tokens to show before the first mark and `after` after the last are drawn
    uniformly among the pairs in [L/8, L/2] x [0, L/8] (L: the feature's longest window) for which both
    the right marks and some shifted copy fit in the window with that much text around them, then a
    shift s != 0 among those that move every firing token onto a silent one. What a window shows around
    its marks is thus chosen before, and independently of, whether it shows the right or the shifted
    marks (which the seed decides). Windows with no such pair are left out; None when no pair of
    windows (one right, one wrong) can be made."""
    act = [k for k, e in enumerate(ctx.score) if e["kind"] == "activating"]
    rng = np.random.default_rng([seed, 9, ctx.feature])
    longest = max((len(ctx.score[k]["acts"]) for k in act), default=0)
    before_range, after_range = (longest // 8, longest // 2), (0, max(1, longest // 8))
    plans: dict[int, tuple[np.ndarray, np.ndarray, int, int]] = {}
    for k in (act[i] for i in rng.permutation(len(act))):
        acts = np.asarray(ctx.score[k]["acts"])
        fire, n_tok = np.flatnonzero(acts > 0), len(acts)
        silent_shifts = np.array(
            [
                sh
                for sh in range(-n_tok + 1, n_tok)
                if sh
                and len(fire)
                and fire.min() + sh >= 0
                and fire.max() + sh < n_tok
                and (acts[fire + sh] <= 0).all()
            ]
        )
        options = []  # (before, after, shifts) where the right marks and some shifted ones both fit
        for before, after in itertools.product(
            range(before_range[0], before_range[1] + 1), range(after_range[0], after_range[1] + 1)
        ):
            if not len(fire) or fire.min() < before or fire.max() + after > n_tok - 1:
                continue
            ok = silent_shifts[
                (fire.min() + silent_shifts >= before) & (fire.max() + silent_shifts <= n_tok - 1 - after)
            ]
            if len(ok):
                options.append((before, after, ok))
        if options:
            before, after, shifts = options[int(rng.integers(len(options)))]
            plans[k] = (fire, fire + int(rng.choice(shifts)), before, after)
    n = len(plans) // 2
    if n == 0:
        return None
    order = list(plans)
    wrong = set(order[:n])
    out = []
    for j, k in enumerate(int(k) for k in rng.permutation(order[: 2 * n])):
        fire, moved, before, after = plans[k]
        marked = moved if k in wrong else fire
        lo, hi = int(marked.min()) - before, int(marked.max()) + after + 1
        mask = np.zeros(hi - lo)
        mask[marked - lo] = 1.0
        text = marked_text(ctx.score[k]["tokens"][lo:hi], mask)
        out.append(
            {
                "window": j,
                "text": text,
                "example": k,
                "marked": marked.tolist(),
                "shown": [lo, hi],
                "truth": int(k not in wrong),
            }
        )
    return out


def reader_metrics(scores: Sequence[float], truth: Sequence[int]) -> dict[str, Any]:
    """Balanced accuracy (threshold 0.5), AUROC and its two-sided Mann–Whitney p-value, and a verdict."""
    s, t = np.asarray(scores, float), np.asarray(truth, int)
    auc, p = rank_sum(s[:, None], t)
    significant = p[0] < 0.05
    verdict = (
        "above chance" if significant and auc[0] > 0.5 else "below chance" if significant else "at chance"
    )
    return {
        "balanced_accuracy": float(balanced_accuracy(s, t)),
        "auroc": float(auc[0]),
        "p_value": float(p[0]),
        "verdict": verdict,
        "n_windows": len(t),
        "scores": s.tolist(),
    }


def detection_metrics(scores: Sequence[float], windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`reader_metrics`, the number of activating windows, and the fraction of hard negatives scored
    below 0.5."""
    s = np.asarray(scores, float)
    hard = np.array([w["kind"] == "hard_negative" for w in windows])
    return {
        **reader_metrics(s, [w["truth"] for w in windows]),
        "n_activating": sum(w["truth"] for w in windows),
        "hard_negative_rejection": float((s[hard] < 0.5).mean()) if hard.any() else None,
    }


def fuzzing_metrics(scores: Sequence[float], windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`reader_metrics` and the number of correctly marked windows."""
    return {
        **reader_metrics(scores, [w["truth"] for w in windows]),
        "n_correct": sum(w["truth"] for w in windows),
    }


MAKERS: dict[str, Callable[[FeatureContexts, int], list[dict[str, Any]] | None]] = {
    "detection": detection_windows,
    "fuzzing": fuzzing_windows,
}
METRICS = {"detection": detection_metrics, "fuzzing": fuzzing_metrics}
CANNOT = {
    "detection": "unavailable (the scoring split needs activating and non-activating windows)",
    "fuzzing": "unavailable (fuzzing needs two activating scoring windows with enough silent tokens)",
}


def score_explanations(
    contexts: Sequence[FeatureContexts],
    explanations: Mapping[int, str | None],
    client: GeminiClient | None,
    *,
    controls: Sequence[int] = (),
    settings: AutointerpSettings | None = None,
    **overrides: Any,
) -> dict[int, dict[str, Any]]:
    """Detection and (unless `fuzzing=False`) fuzzing scores per feature, each with the baseline unless
    `baseline=False` (the explanation of a control feature in `controls`, whose explanations must be in
    `explanations`): the fields the module doc lists. `settings` (default `AutointerpSettings()`), or
    any of its fields as keywords."""
    s = (settings or AutointerpSettings()).with_overrides(overrides)
    return score_with(Asker(client), contexts, explanations, s, controls)


def score_with(
    asker: Asker,
    contexts: Sequence[FeatureContexts],
    explanations: Mapping[int, str | None],
    settings: AutointerpSettings,
    controls: Sequence[int] = (),
) -> dict[int, dict[str, Any]]:
    """`score_explanations` through an Asker that may already have stopped (autointerp.py shares one)."""
    baseline = settings.baseline
    explained = [c.feature for c in contexts if explanations.get(c.feature)]
    usable = [f for f in controls if explanations.get(f)]
    results: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(contexts):
        if usable:  # an unrelated (random) feature's explanation, the controls taken in turn
            partner, kind = usable[i % len(usable)], "random feature"
        else:
            partner = (
                explained[(explained.index(c.feature) + 1) % len(explained)]
                if c.feature in explained
                else None
            )
            kind = "next explained feature (no random control explained)"
        ok = baseline and partner is not None and partner != c.feature
        results[c.feature] = {
            "baseline_explanation_of": partner if ok else None,
            "baseline_kind": kind if ok else None,
        }
    for method in METHODS:
        if method == "fuzzing" and not settings.fuzzing:
            for res in results.values():
                res.update(
                    {
                        method: None,
                        f"{method}_baseline": None,
                        f"{method}_source": "not run",
                        f"{method}_baseline_source": "not run",
                    }
                )
            continue
        _score_method(asker, method, contexts, explanations, results, settings)
    for res in results.values():  # how far each explanation beats another feature's on the same windows
        for method in METHODS:
            own, base = res[method], res[f"{method}_baseline"]
            res[f"{method}_ba_over_baseline"] = (
                own["balanced_accuracy"] - base["balanced_accuracy"] if own and base else None
            )
    return results


def _parse(answer: ScoreAnswer, chunk: list[dict[str, Any]]) -> dict[int, list[float]]:
    """Scores in window order per feature of `chunk` whose answer scores every window exactly once."""
    wanted, out = check_ids([e.feature for e in answer.features], chunk), {}
    n_windows = {it["feature"]: len(it["windows"]) for it in chunk}
    for e in answer.features:
        scores = {w.window: w.score for w in e.scores}  # a repeated window keeps its last score
        if e.feature in wanted and e.feature not in out and set(scores) == set(range(n_windows[e.feature])):
            out[e.feature] = [scores[j] for j in range(n_windows[e.feature])]
    return out


def _score_method(
    asker: Asker,
    method: str,
    contexts: Sequence[FeatureContexts],
    explanations: Mapping[int, str | None],
    results: dict[int, dict[str, Any]],
    settings: AutointerpSettings,
) -> None:
    """Fills `method`'s fields of `results`: own explanations first, then the baselines."""
    windows, jobs = {}, {method: [], f"{method}_baseline": []}
    for c in contexts:
        res = results[c.feature]
        res[method] = res[f"{method}_baseline"] = None
        if not explanations.get(c.feature):
            why = asker.stopped or "unavailable (no explanation)"
        else:
            windows[c.feature] = MAKERS[method](c, settings.seed)
            why = CANNOT[method] if windows[c.feature] is None else None
        if why:
            res[f"{method}_source"] = res[f"{method}_baseline_source"] = why
            continue
        shown = [{"window": w["window"], "text": w["text"]} for w in windows[c.feature]]
        jobs[method].append({"feature": c.feature, "explanation": explanations[c.feature], "windows": shown})
        partner = res["baseline_explanation_of"]
        if partner is None:
            why = "not run" if not settings.baseline else "unavailable (needs two explained features)"
            res[f"{method}_baseline_source"] = why
            continue
        jobs[f"{method}_baseline"].append(
            {"feature": c.feature, "explanation": explanations[partner], "windows": shown}
        )
    for key, items in jobs.items():
        got = ask_batched(
            asker,
            items,
            VERBS[method],
            ScoreAnswer,
            SYSTEMS[method],
            _parse,
            settings.features_per_request,
            settings.max_followups,
        )
        for item in items:
            f = item["feature"]
            if f in got:
                results[f][key] = METRICS[method](got[f], windows[f])
            results[f][f"{key}_source"] = asker.source if f in got else asker.stopped or LEFT_OUT


def score_summary(results: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per method: features scored, mean balanced accuracy and AUROC of the explanations and of the
    baseline, and how many of each are above chance."""
    rows = list(results.values()) if isinstance(results, Mapping) else list(results)

    def mean(xs: list[dict[str, Any]], key: str) -> float | None:
        return float(np.mean([x[key] for x in xs])) if xs else None

    out: dict[str, Any] = {"n_features": len(rows)}
    for m in METHODS:
        own = [r[m] for r in rows if r.get(m)]
        base = [r[f"{m}_baseline"] for r in rows if r.get(f"{m}_baseline")]
        out.update(
            {
                f"{m}_n_scored": len(own),
                f"{m}_balanced_accuracy": mean(own, "balanced_accuracy"),
                f"{m}_auroc": mean(own, "auroc"),
                f"{m}_baseline_balanced_accuracy": mean(base, "balanced_accuracy"),
                f"{m}_baseline_auroc": mean(base, "auroc"),
                f"{m}_n_above_chance": sum(x["verdict"] == "above chance" for x in own),
                f"{m}_n_baseline_above_chance": sum(x["verdict"] == "above chance" for x in base),
            }
        )
    return out


def score_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Display rows: per feature, balanced accuracy / AUROC of detection and fuzzing with its explanation
    and with the baseline's (an unrelated feature's explanation; blank where unavailable), then the
    explanation or why there is none."""

    def pair(m: Mapping[str, Any] | None) -> str:
        return "" if not m else f"{m['balanced_accuracy']:.2f} / {m['auroc']:.2f}"

    return [
        {
            "feature": str(r["feature"]),
            "detection BA / AUROC": pair(r.get("detection")),
            "baseline (det.)": pair(r.get("detection_baseline")),
            "fuzzing BA / AUROC": pair(r.get("fuzzing")),
            "baseline (fuzz.)": pair(r.get("fuzzing_baseline")),
            "explanation": r.get("explanation") or str(r.get("explanation_source") or ""),
        }
        for r in rows
    ]
