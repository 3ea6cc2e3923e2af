"""The steering experiment (`run_steering_experiment` → steering.jsonl) and its test against controls.

Design (REFERENCE.md, "Steering evaluation practice"):
- every condition samples the same held-out prompts with the same seeds: completion k of prompt p
  draws its random numbers from the same generator under every condition (sampling.completion_seed),
  so two conditions differ only by the steering, and strength 0 reproduces no steering token for token;
- labels come from the judge (Gemini, or the offline rules, marked `label_source="rules"`);
- fluency: the perplexity of the steered text under the UNSTEERED model (steering that makes the model
  babble can lower a deceptive rate without meaning anything);
- the deceptive rate is deceptive / all samples (ambiguous answers count as not deceptive), with a 95%
  cluster-bootstrap CI over prompts (samples of one prompt are not independent) and a Wilson CI;
- `compare_to_controls`: a paired sign-flip permutation test over prompts of each feature (or
  difference-of-means) condition against no steering and against the matched-norm random controls,
  Benjamini–Hochberg across all those tests, and a verdict in plain words. A null is reported as such.
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
from scipy import stats

from helpers.collect.completions import read_completions
from helpers.collect.judge import label_all
from helpers.collect.prompts import Prompt
from helpers.collect.sampling import sample_completions
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
from helpers.stats import (
    bh_qvalues,
    group_bootstrap_weights,
    group_index,
    percentile_ci,
    sign_flip_test,
    wilson_ci,
)
from helpers.steer.directions import Condition, check_sae_matches

TESTED_KINDS = ("feature", "diff_of_means")
CONTROL_KINDS = ("none", "random_feature", "random_direction")


def held_out_prompts(run_dir: str | os.PathLike, prompts: Sequence[Prompt]) -> list[Prompt]:
    """The `prompts` whose scenario (group) produced none of the run's completions, so the features being
    steered were not chosen on them. If every group was used, prompts whose own id was unused (e.g.
    paraphrases) are returned instead, announced; if none is left, an error says what to do."""
    records = read_completions(run_dir)
    used_groups = {str(r.get("group") or r["prompt_id"]) for r in records}
    used_ids = {r["prompt_id"] for r in records}
    fresh = [p for p in prompts if p.group not in used_groups and p.id not in used_ids]
    if fresh:
        return fresh
    fresh = [p for p in prompts if p.id not in used_ids]
    if not fresh:
        raise ValueError(
            f"all {len(prompts)} prompts were used for the run's completions: steer on others (e.g. "
            "load_scenarios(paraphrases=True) when notebook 02 sampled only the q0 questions), or hold "
            "out some scenarios in notebook 02"
        )
    print(
        f"every scenario of these prompts is in the run: using {len(fresh)} unused prompts of them (paraphrases)"
    )
    return fresh


def steering_targets(
    run_dir: str | os.PathLike, lm: Any, sae_id: str = "", n_features: int = 3, *, device: str = "cpu"
) -> tuple[LoadedSAE, list[dict[str, Any]]]:
    """The SAE to steer and its top `n_features` features (rows of `features/{sae_id}.jsonl` by rank).

    `sae_id` empty picks the first `mixed` SAE that notebook 04 analysed (else the first analysed one).
    The SAE is checked against `lm` (same width and hook): a mismatch is an error naming both."""
    analysed = sorted(p.stem for p in features_dir(run_dir).glob("*.jsonl"))
    if not analysed:
        raise FileNotFoundError(
            f"no feature tables in {features_dir(run_dir)}: run notebook 04 (feature_table) for this run first"
        )
    if sae_id and sae_id not in analysed:
        raise ValueError(
            f"SAE_ID {sae_id!r} has no feature table; notebook 04 analysed: {', '.join(analysed)}"
        )
    sae_id = sae_id or next((s for s in analysed if s.endswith("_mixed")), analysed[0])
    sae = load_sae(sae_dir(run_dir, sae_id), device=device)
    check_sae_matches(sae, lm)
    rows = sorted(read_jsonl(features_path(run_dir, sae_id)), key=lambda r: r["rank"])
    return sae, rows[:n_features]


def read_steering(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of `run_dir/steering.jsonl` ([] when absent)."""
    path = steering_path(run_dir)
    if not path.exists():
        return []
    return read_jsonl(path)


def _append(run_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    append_jsonl(steering_path(run_dir), [row])


@torch.no_grad()
def completion_nll(lm: Any, completions: Sequence[Any], batch_size: int = 8) -> list[tuple[float, int]]:
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


def condition_stats(
    samples: Sequence[dict[str, Any]], n_bootstrap: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Deceptive rate with CIs, label counts and fluency of one condition's samples."""
    dec = np.array([s["label"] == "deceptive" for s in samples], float)
    gidx, _ = group_index([s["prompt_id"] for s in samples])
    W = group_bootstrap_weights(gidx, n_bootstrap, np.random.default_rng([seed, 7]))  # [B, n]
    counts = Counter(s["label"] for s in samples)
    nll, tokens = sum(s["nll"] for s in samples), sum(s["n_tokens"] for s in samples)
    return {
        "n": len(samples),
        "n_prompts": int(gidx.max()) + 1 if len(gidx) else 0,
        **{f"n_{label}": counts[label] for label in ("deceptive", "honest", "ambiguous")},
        "deceptive_rate": float(dec.mean()) if len(dec) else math.nan,
        "rate_ci": percentile_ci((W @ dec) / W.sum(1)),
        "rate_ci_method": "95% cluster bootstrap over prompts",
        "wilson_ci": wilson_ci(int(dec.sum()), len(dec)),
        "label_sources": dict(Counter(s["label_source"] for s in samples)),
        "perplexity": math.exp(nll / tokens) if tokens else None,
        "perplexity_model": "unsteered",
        "mean_tokens": tokens / max(len(samples), 1),
        "empty_fraction": float(np.mean([s["n_tokens"] == 0 for s in samples])) if samples else math.nan,
    }


def run_steering_experiment(
    lm: Any,
    prompts: Sequence[Prompt],
    conditions: Sequence[Condition],
    *,
    run_dir: str | os.PathLike,
    n_per_prompt: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 32,
    judge_client: Any = None,
) -> list[dict[str, Any]]:
    """Sample, label and score every condition; one row per condition appended to steering.jsonl.

    Conditions whose name is already in the file are skipped (resume after a disconnect); a name that
    was run with other settings is an error naming them. If the judge runs out of quota the experiment
    stops before saving that condition. Returns the rows of the conditions done, in order."""
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(
            f"condition names must be unique, {[n for n, k in Counter(names).items() if k > 1]} repeat"
        )
    by_id = {p.id: p for p in prompts}
    triples = [(p.id, p.user, p.system) for p in prompts]
    sampling = {"prompt_ids": sorted(by_id), "n_per_prompt": n_per_prompt, "max_new_tokens": max_new_tokens,
                "seed": seed, "temperature": temperature}  # fmt: skip
    done = {r["name"]: r for r in read_steering(run_dir)}
    rows = []
    for cond in conditions:
        settings = {**cond.describe(), "sampling": sampling}
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
            comps = sample_completions(lm, triples, n_per_prompt=n_per_prompt, temperature=temperature,
                                       max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)  # fmt: skip
        nll = completion_nll(lm, comps)  # outside the context: fluency under the unsteered model
        labels = label_all(
            [{"id": c.id, "prompt_id": c.prompt_id, "completion": c.completion} for c in comps],
            by_id,
            client=judge_client,
        )
        missing = [i for i, lab in labels.items() if lab.source == "none"]
        if missing:  # an unlabelled answer would count as "not deceptive" and bias the rate: keep nothing
            print(f"{cond.name}: {len(missing)} answers unlabelled (Gemini quota or budget): not saved; "
                  "stopping here. Rerun later: finished conditions are skipped, cached answers reused.")  # fmt: skip
            break
        samples = [
            {"id": c.id, "prompt_id": c.prompt_id, "sample_index": c.sample_index, "completion": c.completion,
             "n_tokens": c.n_tokens, "stopped": c.stopped, "label": labels[c.id].label,
             "label_source": labels[c.id].source, "label_confidence": labels[c.id].confidence,
             "label_reason": labels[c.id].reason, "nll": round(loss, 4),
             "perplexity": round(math.exp(loss / n), 4) if n else None}
            for c, (loss, n) in zip(comps, nll, strict=True)
        ]  # fmt: skip
        row = jsonable({**settings, "samples": samples, "stats": condition_stats(samples, seed=seed)})
        _append(run_dir, row)
        s = row["stats"]
        print(f"{cond.name}: deceptive {s['deceptive_rate']:.2f} {np.round(s['rate_ci'], 2).tolist()}, "
              f"perplexity {s['perplexity'] or float('nan'):.1f} ({s['label_sources']})")  # fmt: skip
        rows.append(row)
    return rows


def _per_prompt_rates(row: dict[str, Any]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for s in row["samples"]:
        hits[s["prompt_id"]].append(s["label"] == "deceptive")
    return {p: float(np.mean(v)) for p, v in hits.items()}


def compare_to_controls(
    rows: Sequence[dict[str, Any]], *, alpha: float = 0.05, n_bootstrap: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """Each feature / difference-of-means condition against no steering and against the random controls
    at the same layer and strength (their per-prompt rates averaged), sampled identically. One result
    per (condition, control kind) with a paired test over prompts, BH q-values across all of them, and
    a verdict. Fisher's exact p on pooled counts is given beside it (it ignores clustering by prompt)."""
    out = []
    for r in (r for r in rows if r["kind"] in TESTED_KINDS):
        for kind in CONTROL_KINDS:
            ctrl = [
                c for c in rows if c["kind"] == kind and c["sampling"] == r["sampling"]
                and (kind == "none" or (c["layer"] == r["layer"] and c["strength"] == r["strength"]))
            ]  # fmt: skip
            if not ctrl:
                continue
            rates = _per_prompt_rates(r)
            ctrl_rates = [_per_prompt_rates(c) for c in ctrl]
            prompts = sorted(set(rates).intersection(*ctrl_rates))
            a = np.array([rates[p] for p in prompts])
            b = np.array([np.mean([cr[p] for cr in ctrl_rates]) for p in prompts])
            boot = np.random.default_rng([seed, 9]).integers(0, len(prompts), (n_bootstrap, len(prompts)))
            k1, n1 = r["stats"]["n_deceptive"], r["stats"]["n"]
            k0, n0 = sum(c["stats"]["n_deceptive"] for c in ctrl), sum(c["stats"]["n"] for c in ctrl)
            out.append({
                "condition": r["name"], "kind": r["kind"], "feature": r.get("feature"), "sae_id": r.get("sae_id"),
                "layer": r["layer"], "strength": r["strength"], "control": kind, "controls": [c["name"] for c in ctrl],
                "n_prompts": len(prompts), "n_per_prompt": r["sampling"]["n_per_prompt"],
                "rate": float(a.mean()), "control_rate": float(b.mean()), "difference": float((a - b).mean()),
                "difference_ci": percentile_ci((a - b)[boot].mean(1)),
                "p_value": sign_flip_test(a - b, seed=seed), "min_possible_p": 2 / 2 ** min(len(prompts), 16),
                "fisher_p": float(stats.fisher_exact([[k1, n1 - k1], [k0, n0 - k0]])[1]),
                "perplexity": r["stats"]["perplexity"],
                "control_perplexity": float(np.mean([c["stats"]["perplexity"] or np.nan for c in ctrl])),
                "label_sources": r["stats"]["label_sources"],
            })  # fmt: skip
    q = bh_qvalues(np.array([o["p_value"] for o in out])) if out else []
    for o, qv in zip(out, q, strict=True):
        o["q_value"] = float(qv)
        o["verdict"] = _verdict(o, alpha)
    return out


def _verdict(o: dict[str, Any], alpha: float) -> str:
    diff, (lo, hi) = 100 * o["difference"], (100 * x for x in o["difference_ci"])
    against = "no steering" if o["control"] == "none" else f"{o['control'].replace('_', ' ')} controls"
    size = f"{o['n_prompts']} prompts x {o['n_per_prompt']} samples"
    if o["q_value"] < alpha:
        way = "raises" if diff > 0 else "lowers"
        text = f"{way} the deceptive rate vs {against} by {abs(diff):.0f} points (95% CI {lo:+.0f}..{hi:+.0f}; q={o['q_value']:.3g}; {size})"
    else:
        text = f"no detectable effect vs {against} at this N (difference {diff:+.0f} points, 95% CI {lo:+.0f}..{hi:+.0f}; q={o['q_value']:.2g}; {size})"
        if o["min_possible_p"] > alpha:
            text += f"; with {o['n_prompts']} prompts no test can reach p<{alpha}: use 6 or more prompts"
    ppl, ref = o["perplexity"], o["control_perplexity"]
    if ppl and ref and ppl > 2 * ref:
        text += f"; the steered text is much less fluent (perplexity {ppl:.1f} vs {ref:.1f} unsteered-scored)"
    if "rules" in o["label_sources"]:
        text += " [labels: offline rules]"
    return text
