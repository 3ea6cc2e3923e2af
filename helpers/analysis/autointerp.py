"""Auto-interpretation: Gemini explains SAE features from their example windows (contexts.py), and the
explanations are scored on held-out windows (scoring.py; REFERENCE.md "Auto-interpretability practice").

- `explain_features`: Gemini sees each feature's EXPLAIN windows (firing tokens marked <<like this>>,
  examples spread over the activation quantiles, plus non-activating and near-miss windows) and answers
  one sentence, whether it is deception-related, and its kind. The completions' honest / deceptive
  labels are never shown: a feature is explained by the text it fires on, not by which set the text
  came from (DESIGN.md §8).
- `autointerp`: explain, then score by detection and fuzzing, each against the explanation of an
  unrelated feature (random `controls` of the same SAE, explained in the same requests; scoring.py),
  with one Asker (helpers.gemini): several features per request, validated,
  cached and budgeted; one daily-quota or budget stop ends the whole pass, and only cached answers are
  still used after it, so the next run continues from the cache.
- Nothing is invented: without a client every explanation and score is None with its source saying
  "unavailable (no Gemini key)".
- `plan` counts the requests before spending (the free tier allows ~20 a day).
- `AutointerpSettings` (defined in scoring.py, which uses every field) holds how a pass asks and
  scores; `autointerp`, `explain_features` and `score_explanations` take one, or any of its fields as
  keywords (`features_per_request=4`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel

from helpers.analysis.contexts import FeatureContexts
from helpers.analysis.scoring import AutointerpSettings, score_with
from helpers.gemini import (
    FREE_TIER_REQUESTS_PER_DAY,
    LEFT_OUT,
    OFFLINE,
    Asker,
    GeminiClient,
    ask_batched,
    check_ids,
)

KINDS = ("lying about a fact", "concealing a role", "evasion", "refusal", "other", "none")
Kind = Literal["lying about a fact", "concealing a role", "evasion", "refusal", "other", "none"]
MAX_EXPLANATION_CHARS = 300


class FeatureExplanation(BaseModel):
    feature: int
    explanation: str
    deception_related: Literal["yes", "no", "unclear"]
    kind: Kind


class ExplainAnswer(BaseModel):
    features: list[FeatureExplanation]


EXPLAIN_SYSTEM = """You explain features of a sparse autoencoder trained on a chat language model's
internal activations, for research on deception in language models. Each item is one feature with text
windows from the model's own answers. In "activating" windows the tokens where the feature fires are
marked <<like this>>, with the strongest activation in the window; the examples span weak to strong
activations. "not_activating" windows are text where the feature is zero, some of them near misses.
For each feature write ONE sentence saying what text the feature responds to: specific enough that a
reader could predict on new text whether it fires, true of weak as well as strong examples, and not true
of the non-activating windows. Describe the text, not what you expect a deception feature to do. Then say
whether the feature is deception-related (yes, no, unclear) and its kind: lying about a fact, concealing
a role, evasion, refusal, other (deception-related in another way), none (not deception-related).
Return exactly one entry per item with the item's feature number unchanged."""


def plan(
    n_features: int,
    features_per_request: int = 8,
    *,
    n_saes: int = 1,
    score_features_per_request: int | None = None,
    baseline: bool = True,
    fuzzing: bool = True,
    n_controls: int = 2,
) -> dict[str, Any]:
    """Requests an `autointerp` pass over `n_features` features of each of `n_saes` SAEs will send,
    before follow-ups for features Gemini leaves out; cached requests are free. The `n_controls` random
    features whose explanations are the baselines are explained with them (when `baseline`). Each score
    (detection, fuzzing) and its baseline is one request per `score_features_per_request` features."""
    if min(n_features, features_per_request, n_saes, n_controls) < 0 or features_per_request < 1:
        raise ValueError("n_features, n_saes and n_controls must be >= 0 and features_per_request >= 1")
    explain = math.ceil((n_features + (n_controls if baseline else 0)) / features_per_request)
    score = math.ceil(n_features / (score_features_per_request or features_per_request))
    rows = {
        "explain_requests": n_saes * explain,
        "detection_requests": n_saes * score,
        "detection_baseline_requests": n_saes * score if baseline else 0,
        "fuzzing_requests": n_saes * score if fuzzing else 0,
        "fuzzing_baseline_requests": n_saes * score if fuzzing and baseline else 0,
    }
    total = sum(rows.values())
    return {
        "n_saes": n_saes,
        "features_per_sae": n_features,
        "features_per_request": features_per_request,
        **rows,
        "requests": total,
        "free_tier_requests_per_day": FREE_TIER_REQUESTS_PER_DAY,
        "days_on_free_tier": math.ceil(total / FREE_TIER_REQUESTS_PER_DAY),
    }


def explain_item(ctx: FeatureContexts) -> dict[str, Any] | None:
    """What the explainer sees of one feature (None when it has no activating explain window)."""
    act = sorted((e for e in ctx.explain if e["kind"] == "activating"), key=lambda e: -e["max_activation"])
    if not act:
        return None
    return {
        "feature": ctx.feature,
        "activating": [{"max_activation": round(e["max_activation"], 3), "text": e["marked"]} for e in act],
        "not_activating": [e["text"] for e in ctx.explain if e["kind"] != "activating"],
    }


def explain_features(
    contexts: Sequence[FeatureContexts],
    client: GeminiClient | None,
    *,
    settings: AutointerpSettings | None = None,
    **overrides: Any,
) -> dict[int, dict[str, Any]]:
    """Per feature: explanation, deception_related, kind and explanation_source ("gemini:<model>" or
    why it is unavailable); the fields are None wherever Gemini gave no answer. Uses the settings'
    `features_per_request` and `max_followups`."""
    s = (settings or AutointerpSettings()).with_overrides(overrides)
    return _explain(Asker(client), contexts, s.features_per_request, s.max_followups)


def _explain(
    asker: Asker, contexts: Sequence[FeatureContexts], features_per_request: int, max_followups: int
) -> dict[int, dict[str, Any]]:
    items = {c.feature: explain_item(c) for c in contexts}

    def parse(answer: ExplainAnswer, chunk: list[dict[str, Any]]) -> dict[int, Any]:
        wanted, out = check_ids([e.feature for e in answer.features], chunk), {}
        for e in answer.features:
            text = (e.explanation.strip().splitlines() or [""])[0][:MAX_EXPLANATION_CHARS]
            if e.feature in wanted and e.feature not in out and text:
                out[e.feature] = {
                    "explanation": text,
                    "deception_related": e.deception_related,
                    "kind": e.kind,
                }
        return out

    todo = [it for it in items.values() if it is not None]
    got = ask_batched(
        asker, todo, "Explain", ExplainAnswer, EXPLAIN_SYSTEM, parse, features_per_request, max_followups
    )
    results = {}
    for f, item in items.items():
        if f in got:
            results[f] = {**got[f], "explanation_source": asker.source}
            continue
        why = (
            "unavailable (no activating windows in the explain split)"
            if item is None
            else asker.stopped or LEFT_OUT
        )
        results[f] = {"explanation": None, "deception_related": None, "kind": None, "explanation_source": why}
    return results


def autointerp(
    contexts: Sequence[FeatureContexts],
    client: GeminiClient | None,
    *,
    controls: Sequence[FeatureContexts] = (),
    settings: AutointerpSettings | None = None,
    **overrides: Any,
) -> dict[int, dict[str, Any]]:
    """Explain `contexts` and the random `controls`, then score the contexts' explanations by detection
    and fuzzing against the controls' explanations (scoring.py): per feature of `contexts`, the fields of
    both and `baseline_explanation` (the text the baselines used). One stop (quota, budget) ends the
    whole pass; cached answers are still used after it. `settings` (default `AutointerpSettings()`), or
    any of its fields as keywords."""
    s = (settings or AutointerpSettings()).with_overrides(overrides)
    if client is None:
        print(f"autointerp: no Gemini client; explanations and scores are marked {OFFLINE!r}")
    asker = Asker(client)
    controls = list(controls) if s.baseline else []
    expl = _explain(asker, [*contexts, *controls], s.features_per_request, s.max_followups)
    texts = {f: e["explanation"] for f, e in expl.items()}
    scores = score_with(asker, contexts, texts, s, [c.feature for c in controls])
    return {
        c.feature: {
            "feature": c.feature,
            **expl[c.feature],
            **scores[c.feature],
            "baseline_explanation": texts.get(scores[c.feature]["baseline_explanation_of"]),
        }
        for c in contexts
    }
