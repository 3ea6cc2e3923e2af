"""The steering experiment (`run_steering_experiment` → steering.jsonl) and its test against controls.

Design (REFERENCE.md, "Steering evaluation practice"; DESIGN.md §9):
- held-out prompts come ONE PER SCENARIO by default (`held_out_prompts`): paraphrases of one scenario
  share it (its secret, its motive) and answer alike, so they are not independent units; asking for
  more prompts brings more scenarios before any second paraphrase;
- every condition samples the same prompts with the same seeds: completion k of prompt p draws its
  random numbers from the same generator under every condition (sampling.completion_seed), so two
  conditions differ only by the steering, and strength 0 reproduces no steering token for token;
- labels come from the judge (Gemini, or the offline rules, marked `label_source="rules"`); deceptive,
  honest and AMBIGUOUS are three categories, each with its rate: the deceptive rate is deceptive / all
  answers, and a condition that makes answers ambiguous shows up in the ambiguous rate, not as honesty;
- fluency: the perplexity of the steered text under the UNSTEERED model (steering that makes the model
  babble can lower a deceptive rate without meaning anything);
- rates come with 95% Wilson intervals at the effective number of answers (answers / the design
  effect of their scenarios, `stats.clustered_proportion_ci`): answers of one scenario are not independent,
  and deception is often rare, where a t interval over ~10 scenarios covered 41-81% of simulated
  worlds at rates 0.02-0.10 (and was [0, 0] when no answer was deceptive);
- `compare_to_controls`: each feature (or difference-of-means) condition against no steering and
  against the matched-norm random controls, paired BY SCENARIO (each scenario's mean over its prompts
  and samples): an exact sign-flip permutation test over scenarios and a t interval of the mean
  difference's interval (Zou & Donner's MOVER from the two rates' Wilson intervals and the correlation
  of their per-scenario rates: a t interval of per-scenario differences covered 64-94% of rare-rate
  worlds with a true effect), Benjamini–Hochberg across all those tests, and a verdict in plain words.
  Testing the prompts as units when paraphrases share a scenario rejected 12% of true nulls at 0.05.
  The number of scenarios and the smallest p they allow are printed before sampling. A null is
  reported as such.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from helpers.collect.completions import read_completions
from helpers.collect.judge import label_all
from helpers.collect.prompts import Prompt
from helpers.collect.sampling import SamplingSettings, sample_completions
from helpers.model.protocols import HookableModel
from helpers.run import (
    append_jsonl,
    features_dir,
    features_path,
    jsonable,
    read_jsonl,
    sae_dir,
    steering_path,
)
from helpers.saes.io import LoadedSAE, load_sae
from helpers.stats import bh_qvalues, clustered_proportion_ci, difference_ci, sign_flip_test
from helpers.steer.directions import Condition, check_sae_matches

TESTED_KINDS = ("feature", "diff_of_means")
CONTROL_KINDS = ("none", "random_feature", "random_direction")


def held_out_prompts(
    run_dir: str | os.PathLike,
    prompts: Sequence[Prompt],
    n: int | None = None,
    per_scenario: int | None = None,
) -> list[Prompt]:
    """Up to `n` of `prompts` (all when None) whose scenario (group) produced none of the run's
    completions, so the features being steered were not chosen on them, in rounds: the first prompt
    (in the given order) of every scenario, then the second of every scenario, and so on (at most
    `per_scenario` rounds). So n prompts come from n scenarios while there are that many: more prompts
    means more scenarios, the units of the test. If every scenario was used, prompts whose own id was
    unused (e.g. paraphrases) are taken instead, announced; if none is left, an error says what to do."""
    records = read_completions(run_dir)
    used_groups = {str(r.get("group") or r["prompt_id"]) for r in records}
    used_ids = {r["prompt_id"] for r in records}
    fresh = [p for p in prompts if p.group not in used_groups and p.id not in used_ids]
    if not fresh:
        fresh = [p for p in prompts if p.id not in used_ids]
        if not fresh:
            raise ValueError(
                f"all {len(prompts)} prompts were used for the run's completions: steer on others (e.g. "
                "load_scenarios(paraphrases=True) when notebook 02 sampled only the q0 questions), or hold "
                "out some scenarios in notebook 02"
            )
        print(
            "every scenario of these prompts is in the run: using unused prompts of them (paraphrases), "
            "whose scenarios the features were chosen on"
        )
    by_group: dict[str, list[Prompt]] = defaultdict(list)
    for prompt in fresh:
        by_group[prompt.group].append(prompt)
    rounds = max((len(ps) for ps in by_group.values()), default=0)
    rounds = rounds if per_scenario is None else min(rounds, per_scenario)
    chosen = [ps[i] for i in range(rounds) for ps in by_group.values() if i < len(ps)]
    return chosen[:n] if n is not None else chosen


def sample_size(prompts: Sequence[Prompt], n_per_prompt: int) -> dict[str, Any]:
    """What a steering test over these prompts can show: scenarios (the units of the paired test),
    prompts, answers per condition, and the smallest p-value the sign-flip test can reach
    (2 / 2^scenarios)."""
    n_scenarios = len({p.group for p in prompts})
    return {
        "n_scenarios": n_scenarios,
        "n_prompts": len(prompts),
        "n_per_prompt": n_per_prompt,
        "answers_per_condition": len(prompts) * n_per_prompt,
        "min_possible_p": 2 / 2**n_scenarios if n_scenarios else 1.0,
    }


def steering_targets(
    run_dir: str | os.PathLike,
    lm: HookableModel,
    sae_id: str = "",
    n_features: int = 3,
    *,
    device: str = "cpu",
    alpha: float = 0.05,
) -> tuple[LoadedSAE, list[dict[str, Any]]]:
    """The SAE to steer and `n_features` of its features (rows of `features/{sae_id}.jsonl`), those that
    REPLICATED first: notebook 04 chose features on one half of the prompt groups and tested them on the
    other, one-sided in the chosen direction; a feature with held-out q < `alpha` replicated. Then the
    rest by rank. Each row gets `replicated` (bool); how many replicated is printed, and when none did,
    that the features steered are unvalidated candidates.

    `sae_id` empty picks the first `mixed` SAE that notebook 04 analysed (else the first analysed one).
    The SAE is checked against `lm` (same width and hook): a mismatch is an error naming both."""
    analysed = sorted(p.stem for p in features_dir(run_dir).glob("*.jsonl"))
    if not analysed:
        raise FileNotFoundError(
            f"no feature tables in {features_dir(run_dir)}: run notebook 04 (feature_table) for this run "
            "first"
        )
    if sae_id and sae_id not in analysed:
        raise ValueError(
            f"SAE_ID {sae_id!r} has no feature table; notebook 04 analysed: {', '.join(analysed)}"
        )
    sae_id = sae_id or next((s for s in analysed if s.endswith("_mixed")), analysed[0])
    sae = load_sae(sae_dir(run_dir, sae_id), device=device)
    check_sae_matches(sae, lm)
    rows = sorted(read_jsonl(features_path(run_dir, sae_id)), key=lambda r: r["rank"])
    for r in rows:
        r["replicated"] = r.get("q_value") is not None and r["q_value"] < alpha
    chosen = sorted(rows, key=lambda r: (not r["replicated"], r["rank"]))[:n_features]
    n_rep = sum(r["replicated"] for r in rows)
    if not any(r.get("q_value") is not None for r in rows):
        print(
            f"{sae_id}: notebook 04's table has no held-out q-values (an older run: rerun notebook 04); "
            f"steering the top {len(chosen)} by rank, none of them validated on held-out data"
        )
    elif n_rep == 0:
        print(
            f"{sae_id}: no feature replicated on the held-out half (every q >= {alpha}): steering the top "
            f"{len(chosen)} by selection-split effect size as unvalidated candidates, not deception features"
        )
    else:
        extra = f", then {len(chosen) - n_rep} that did not, by rank" if len(chosen) > n_rep else ""
        print(
            f"{sae_id}: {n_rep} of {len(rows)} analysed features replicated on the held-out half "
            f"(q < {alpha}): steering {min(n_rep, len(chosen))} of them first{extra}"
        )
    return sae, chosen


def read_steering(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of `run_dir/steering.jsonl` ([] when absent)."""
    path = steering_path(run_dir)
    if not path.exists():
        return []
    return read_jsonl(path)


def _append(run_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    append_jsonl(steering_path(run_dir), [row])


@torch.no_grad()
def completion_nll(
    lm: HookableModel, completions: Sequence[Any], batch_size: int = 8
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, n tokens) of each completion given its prompt, under the model
    as it is now: call it outside any steering context to score fluency under the unsteered model."""
    model, out = lm.model, []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        seqs = [c.prompt_token_ids + c.completion_token_ids for c in chunk]
        ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):  # right padding: real tokens keep their positions
            ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for b, c in enumerate(chunk):
            n_p, n_c = len(c.prompt_token_ids), len(c.completion_token_ids)
            # logits at position t predict token t + 1, so the completion is predicted from n_p - 1 on.
            pred = logits[b, n_p - 1 : n_p - 1 + n_c].float()  # [n_c, vocab]
            target = ids[b, n_p : n_p + n_c].to(pred.device)
            out.append((float(F.cross_entropy(pred, target, reduction="sum")) if n_c else 0.0, n_c))
    return out


def condition_stats(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rates of deceptive, honest and ambiguous answers with 95% CIs that count scenarios (`group`, else
    the prompt) as clusters (`stats.clustered_proportion_ci`), label counts and fluency of one condition's
    samples."""
    scenario = [s.get("group") or s["prompt_id"] for s in samples]
    counts = Counter(s["label"] for s in samples)
    nll, tokens = sum(s["nll"] for s in samples), sum(s["n_tokens"] for s in samples)
    out: dict[str, Any] = {
        "n": len(samples),
        "n_prompts": len({s["prompt_id"] for s in samples}),
        "n_scenarios": len(set(scenario)),
        **{f"n_{label}": counts[label] for label in ("deceptive", "honest", "ambiguous")},
    }
    for label in ("deceptive", "honest", "ambiguous"):
        rate, lo, hi = clustered_proportion_ci(
            np.array([s["label"] == label for s in samples], float), scenario
        )
        out[f"{label}_rate"] = rate
        out[f"{label}_rate_ci"] = (lo, hi)
    decided = counts["deceptive"] + counts["honest"]
    return {
        **out,
        "rate_ci": out["deceptive_rate_ci"],
        "rate_ci_method": "95% Wilson interval at answers / design effect of scenarios; rates are of all "
        "answers, ambiguous included",
        "deceptive_among_decided": counts["deceptive"] / decided if decided else math.nan,
        "label_sources": dict(Counter(s["label_source"] for s in samples)),
        "perplexity": math.exp(nll / tokens) if tokens else None,
        "perplexity_model": "unsteered",
        "mean_tokens": tokens / max(len(samples), 1),
        "empty_fraction": float(np.mean([s["n_tokens"] == 0 for s in samples])) if samples else math.nan,
    }


STEERING_SAMPLING = SamplingSettings(temperature=1.0, max_new_tokens=64, seed=0, batch_size=32)
"""The steering experiment's sampling defaults (temperature 1, as the behavioural sampling of notebook 02)."""


def run_steering_experiment(
    lm: HookableModel,
    prompts: Sequence[Prompt],
    conditions: Sequence[Condition],
    *,
    run_dir: str | os.PathLike,
    n_per_prompt: int = 8,
    sampling: SamplingSettings = STEERING_SAMPLING,
    judge_client: Any = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Sample, label and score every condition; one row per condition appended to steering.jsonl.

    Conditions whose name is already in the file are skipped (resume after a disconnect); a name that
    was run with other settings is an error naming them. If the judge runs out of quota the experiment
    stops before saving that condition. Returns the rows of the conditions done, in order. `sampling`
    (default `STEERING_SAMPLING`), or any of its fields as keywords (`max_new_tokens=32`), sets how the
    answers are drawn; the record keeps every field but the batch size (it changes no token)."""
    sampling = sampling.with_overrides(overrides)
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(
            f"condition names must be unique, {[n for n, k in Counter(names).items() if k > 1]} repeat"
        )
    by_id = {p.id: p for p in prompts}
    size = sample_size(prompts, n_per_prompt)
    print(
        f"{size['n_scenarios']} scenarios, {size['n_prompts']} prompts x {n_per_prompt} samples = "
        f"{size['answers_per_condition']} answers per condition; the paired test's units are the scenarios, "
        f"so no p-value can fall below {size['min_possible_p']:.3g}"
    )
    triples = [(p.id, p.user, p.system) for p in prompts]
    record = {
        "prompt_ids": sorted(by_id),
        "n_per_prompt": n_per_prompt,
        "max_new_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
        "temperature": sampling.temperature,
        # recorded only when it cuts, so the records written before it could be set still match
        **({"top_p": sampling.top_p} if sampling.top_p != 1 else {}),
    }
    done = {r["name"]: r for r in read_steering(run_dir)}
    rows = []
    for cond in conditions:
        settings = {**cond.describe(), "sampling": record}
        if cond.name in done:
            old = {k: done[cond.name].get(k) for k in settings}
            # "none" adds nothing, so its layer does not matter: one no-steering row serves every layer.
            keys = [k for k in settings if not (cond.kind == "none" and k == "layer")]
            changed = [k for k in keys if json.dumps(old[k]) != json.dumps(settings[k])]
            if changed:
                raise ValueError(
                    f"steering.jsonl already has condition {cond.name!r} run with other {changed}: give this "
                    "condition a new name, or delete its line from the file to rerun it"
                )
            print(f"{cond.name}: done earlier, skipped")
            rows.append(done[cond.name])
            continue
        with cond.context(lm.model):
            comps = sample_completions(lm, triples, n_per_prompt=n_per_prompt, sampling=sampling)
        nll = completion_nll(lm, comps)  # outside the context: fluency under the unsteered model
        labels = label_all(
            [{"id": c.id, "prompt_id": c.prompt_id, "completion": c.completion} for c in comps],
            by_id,
            client=judge_client,
        )
        missing = [i for i, lab in labels.items() if lab.source == "none"]
        if missing:  # an unlabelled answer would count as "not deceptive" and bias the rate: keep nothing
            print(
                f"{cond.name}: {len(missing)} answers unlabelled (Gemini quota or budget): not saved; "
                "stopping here. Rerun later: finished conditions are skipped, cached answers reused."
            )
            break
        samples = [
            {
                "id": c.id,
                "prompt_id": c.prompt_id,
                "group": by_id[c.prompt_id].group,
                "sample_index": c.sample_index,
                "completion": c.completion,
                "n_tokens": c.n_tokens,
                "stopped": c.stopped,
                "label": labels[c.id].label,
                "label_source": labels[c.id].source,
                "label_confidence": labels[c.id].confidence,
                "label_reason": labels[c.id].reason,
                "nll": round(loss, 4),
                "perplexity": round(math.exp(loss / n), 4) if n else None,
            }
            for c, (loss, n) in zip(comps, nll, strict=True)
        ]
        row = jsonable({**settings, "samples": samples, "stats": condition_stats(samples)})
        _append(run_dir, row)
        s = row["stats"]
        print(
            f"{cond.name}: deceptive {s['deceptive_rate']:.2f} {np.round(s['rate_ci'], 2).tolist()}, "
            f"ambiguous {s['ambiguous_rate']:.2f}, perplexity {s['perplexity'] or float('nan'):.1f} "
            f"({s['label_sources']})"
        )
        rows.append(row)
    return rows


def _per_scenario_rates(row: dict[str, Any], label: str = "deceptive") -> dict[str, float]:
    """Per scenario (a sample's `group`; rows written before it was stored: the prompt), the mean over
    its prompts of each prompt's rate of `label`."""
    hits: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for s in row["samples"]:
        hits[s.get("group") or s["prompt_id"]][s["prompt_id"]].append(s["label"] == label)
    return {g: float(np.mean([np.mean(v) for v in by_prompt.values()])) for g, by_prompt in hits.items()}


def paired_scenario_test(a: np.ndarray, b: np.ndarray, answers: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Per-scenario rates of a condition `a` [k] and of its control `b` [k], with `answers` [k] per
    scenario -> the mean difference, its 95% interval (the two rates' `stats.clustered_proportion_ci`
    combined by `stats.difference_ci` with the correlation of the per-scenario rates), the exact (or,
    above 16 scenarios, Monte Carlo) sign-flip p-value of the per-scenario differences, and the
    smallest p the scenarios allow."""
    a, b, answers = (np.asarray(v, float) for v in (a, b, answers))
    k, d = len(a), a - b
    with np.errstate(invalid="ignore", divide="ignore"):
        r = float(np.corrcoef(a, b)[0, 1]) if k > 1 and a.std() > 0 and b.std() > 0 else 0.0
    rows = np.repeat(np.arange(k), answers.astype(int))  # each scenario's answers, one row each
    ci = difference_ci(clustered_proportion_ci(a[rows], rows), clustered_proportion_ci(b[rows], rows), r)
    return {
        "difference": float(d.mean()),
        "difference_ci": ci,
        "p_value": sign_flip_test(d, seed=seed),
        "min_possible_p": 2 / 2 ** min(k, 16),
    }


def compare_to_controls(
    rows: Sequence[dict[str, Any]], *, alpha: float = 0.05, seed: int = 0
) -> list[dict[str, Any]]:
    """Each feature / difference-of-means condition against no steering and against the random controls
    at the same layer and strength (their per-scenario rates averaged), sampled identically. One result
    per (condition, control kind) with a paired test over scenarios (`paired_scenario_test`), the
    ambiguous-rate difference beside it, BH q-values across all of them, and a verdict. (No test on
    pooled answers: answers of one scenario are not independent.)"""
    out = []
    for r in (r for r in rows if r["kind"] in TESTED_KINDS):
        for kind in CONTROL_KINDS:
            ctrl = [
                c
                for c in rows
                if c["kind"] == kind
                and c["sampling"] == r["sampling"]
                and (kind == "none" or (c["layer"] == r["layer"] and c["strength"] == r["strength"]))
            ]
            if not ctrl:
                continue
            rates, amb = _per_scenario_rates(r), _per_scenario_rates(r, "ambiguous")
            ctrl_rates = [_per_scenario_rates(c) for c in ctrl]
            ctrl_amb = [_per_scenario_rates(c, "ambiguous") for c in ctrl]
            scenarios = sorted(set(rates).intersection(*ctrl_rates))
            answers = Counter(s.get("group") or s["prompt_id"] for s in r["samples"])
            a = np.array([rates[g] for g in scenarios])
            b = np.array([np.mean([cr[g] for cr in ctrl_rates]) for g in scenarios])
            amb_diff = np.mean([amb[g] - np.mean([ca[g] for ca in ctrl_amb]) for g in scenarios])
            out.append(
                {
                    "condition": r["name"],
                    "kind": r["kind"],
                    "feature": r.get("feature"),
                    "sae_id": r.get("sae_id"),
                    "layer": r["layer"],
                    "strength": r["strength"],
                    "control": kind,
                    "controls": [c["name"] for c in ctrl],
                    "n_scenarios": len(scenarios),
                    "n_prompts": r["stats"].get("n_prompts"),
                    "n_per_prompt": r["sampling"]["n_per_prompt"],
                    "rate": float(a.mean()),
                    "control_rate": float(b.mean()),
                    **paired_scenario_test(a, b, np.array([answers[g] for g in scenarios]), seed=seed),
                    "ambiguous_difference": float(amb_diff),
                    "test": (
                        "exact sign-flip test over scenarios; "
                        "MOVER interval from scenario-clustered Wilson intervals"
                    ),
                    "perplexity": r["stats"]["perplexity"],
                    "control_perplexity": float(np.mean([c["stats"]["perplexity"] or np.nan for c in ctrl])),
                    "label_sources": r["stats"]["label_sources"],
                }
            )
    q = bh_qvalues(np.array([o["p_value"] for o in out])) if out else []
    for o, qv in zip(out, q, strict=True):
        o["q_value"] = float(qv)
        o["verdict"] = _verdict(o, alpha)
    return out


def _verdict(o: dict[str, Any], alpha: float) -> str:
    diff, (lo, hi) = 100 * o["difference"], (100 * x for x in o["difference_ci"])
    against = "no steering" if o["control"] == "none" else f"{o['control'].replace('_', ' ')} controls"
    size = f"{o['n_scenarios']} scenarios x {o['n_per_prompt']} samples"
    if o["q_value"] < alpha:
        way = "raises" if diff > 0 else "lowers"
        text = (
            f"{way} the deceptive rate vs {against} by {abs(diff):.0f} points "
            f"(95% CI {lo:+.0f}..{hi:+.0f}; q={o['q_value']:.3g}; {size})"
        )
    else:
        text = (
            f"no detectable effect vs {against} at this N (difference {diff:+.0f} points, "
            f"95% CI {lo:+.0f}..{hi:+.0f}; q={o['q_value']:.2g}; {size})"
        )
        if o["min_possible_p"] > alpha:
            text += (
                f"; with {o['n_scenarios']} scenarios no test can reach p<{alpha}: use 6 or more scenarios"
            )
    if abs(o["ambiguous_difference"]) >= 0.1:
        text += f"; ambiguous answers {100 * o['ambiguous_difference']:+.0f} points (not counted as honest)"
    ppl, ref = o["perplexity"], o["control_perplexity"]
    if ppl and ref and ppl > 2 * ref:
        text += f"; the steered text is much less fluent (perplexity {ppl:.1f} vs {ref:.1f} unsteered-scored)"
    if "rules" in o["label_sources"]:
        text += " [labels: offline rules]"
    return text


CONTROL_NAMES = {
    "none": "no steering",
    "random_feature": "random features",
    "random_direction": "random directions",
}


def comparison_table(
    results: Sequence[dict[str, Any]], *, alpha: float = 0.05
) -> tuple[list[dict[str, Any]], list[str]]:
    """`compare_to_controls`' results as a table: one row per steered condition, one column per control
    (`vs no steering`, ...) holding the difference in deceptive rate in points, its 95% CI and q (`*`
    when q < alpha), then a short verdict across the controls and the row's own flags (fluency,
    ambiguous answers). What every row shares (sample size, the smallest p the scenarios allow, offline
    labels, how many tests passed) is returned once as notes, instead of repeated in every sentence."""
    by_condition: dict[str, dict[str, Any]] = {}
    for o in results:
        row = by_condition.setdefault(
            o["condition"],
            {
                "condition": o["condition"],
                "strength": o["strength"],
                "rate %": round(100 * o["rate"]),
                "_sig": [],
                "_flags": set(),
            },
        )
        lo, hi = (100 * x for x in o["difference_ci"])
        star = "*" if o["q_value"] < alpha else ""
        row[f"vs {CONTROL_NAMES[o['control']]}"] = (
            f"{100 * o['difference']:+.0f} [{lo:+.0f}, {hi:+.0f}] q={o['q_value']:.2g}{star}"
        )
        row["_sig"].append(np.sign(o["difference"]) if star else 0.0)
        if o["control"] == "none" and abs(o["ambiguous_difference"]) >= 0.1:
            row["_flags"].add(f"ambiguous answers {100 * o['ambiguous_difference']:+.0f} pts (not honest)")
        ppl, ref = o["perplexity"], o["control_perplexity"]
        if ppl and ref and ppl > 2 * ref:
            row["_flags"].add("much less fluent")
    rows = []
    for row in by_condition.values():
        sig = row.pop("_sig")
        up, down = sum(v > 0 for v in sig), sum(v < 0 for v in sig)
        if not up and not down:
            row["verdict"] = "no detectable effect"
        elif up and down:
            row["verdict"] = "raises vs some controls, lowers vs others"
        else:
            way, n = ("raises", up) if up else ("lowers", down)
            row["verdict"] = (
                f"{way} the rate beyond every control"
                if n == len(sig)
                else f"{way} the rate vs {n} of {len(sig)} controls only"
            )
        row["flags"] = "; ".join(sorted(row.pop("_flags"))) or "-"
        rows.append(row)
    notes = []
    if results:
        n_sig = sum(o["q_value"] < alpha for o in results)
        notes.append(
            f"{n_sig} of {len(results)} comparisons at q < {alpha} (* ; Benjamini-Hochberg over all "
            "of them; differences in points of deceptive rate, 95% CI)"
        )
        sizes = sorted({(o["n_scenarios"], o["n_per_prompt"]) for o in results})
        notes.append("sample: " + ", ".join(f"{k} scenarios x {m} samples per prompt" for k, m in sizes))
        few = sorted({o["n_scenarios"] for o in results if o["min_possible_p"] > alpha})
        if few:
            notes.append(
                f"with {'/'.join(map(str, few))} scenarios no test can reach p < {alpha}: "
                "use 6 or more scenarios (N_HELD_OUT_PROMPTS)"
            )
        if any("rules" in o["label_sources"] for o in results):
            notes.append("labels: offline rules (no Gemini judge), a rough proxy for deception")
    return rows, notes
