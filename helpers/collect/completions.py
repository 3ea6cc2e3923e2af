"""`completions.jsonl`: the sampled completions of a run and their labels (DESIGN.md §3).

One JSON object per line: `id`, `prompt_id`, `source`, `group`, `prompt`, `system`, `completion`,
`n_tokens`, `label` (honest / deceptive / ambiguous, or null before judging), `label_source`
("gemini:<model>", "rules", "expected"), `label_confidence`, `label_reason`, plus the exact token ids so
activations are recomputed on exactly the tokens the model produced.

Sampling appends a batch at a time (a disconnect loses at most one batch; a torn last line is
ignored on read); labelling rewrites the whole file atomically.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any

from helpers.run import append_jsonl, completions_path, read_jsonl, stable_hash, write_jsonl

LABELS = ("honest", "deceptive", "ambiguous")
ANALYSIS_FRACTION = 0.5
"""Share of the prompt groups reserved for notebook 04's probes and feature tests (`analysis_split`)."""


def read_completions(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records; [] when the file does not exist. A torn final line (disconnect mid-append) is skipped."""
    path = completions_path(run_dir)
    records = read_jsonl(path)
    ids = [r["id"] for r in records]
    if len(ids) != len(set(ids)):
        dup = [k for k, v in Counter(ids).items() if v > 1][:5]
        raise ValueError(
            f"{path} has duplicate completion ids {dup}: it was edited by hand or by two runs at once"
        )
    return records


def append_completions(run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Append records and fsync, so a batch that finished survives a disconnect."""
    append_jsonl(completions_path(run_dir), records)


def write_completions(run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Rewrite the whole file atomically (after labelling)."""
    write_jsonl(completions_path(run_dir), records)


def label_table(records: list[dict[str, Any]], by: str = "group") -> list[dict[str, Any]]:
    """Rows `{by, honest, deceptive, ambiguous, unlabelled, total}` per value of `by`, plus a total row."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        counts[str(r.get(by))][r.get("label") or "unlabelled"] += 1
    total: Counter = Counter()
    rows = []
    for key in sorted(counts):
        c = counts[key]
        total.update(c)
        rows.append({by: key, **{k: c[k] for k in (*LABELS, "unlabelled")}, "total": sum(c.values())})
    rows.append({by: "ALL", **{k: total[k] for k in (*LABELS, "unlabelled")}, "total": sum(total.values())})
    return rows


def ids_for_condition(records: list[dict[str, Any]], condition: str) -> list[str]:
    """Completion ids that a training condition uses: `mixed` = honest + deceptive, `deceptive_only`,
    `honest_only`. Ambiguous and unlabelled completions are in none of them."""
    wanted = {"mixed": {"honest", "deceptive"}, "deceptive_only": {"deceptive"}, "honest_only": {"honest"}}
    if condition not in wanted:
        raise ValueError(f"unknown condition {condition!r}: choose one of {sorted(wanted)}")
    return [r["id"] for r in records if r.get("label") in wanted[condition]]


def split_completions(
    rows: list[dict], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids), grouped by `group` (the scenario or fact; else `prompt_id`) so no group
    is on both sides, e.g. a fact's honest and dishonest prompts. A group's side depends only on its
    name and the seed, so adding completions never moves old ones. With one group nothing can be held
    out: evaluation then uses the training completions (announced)."""
    group = {r["id"]: str(r.get("group") or r["prompt_id"]) for r in rows}
    names = sorted(set(group.values()))
    held = {g for g in names if stable_hash(seed, "eval", g) % 10_000 < eval_fraction * 10_000}
    if not held and len(names) > 1 and eval_fraction > 0:
        held = {min(names, key=lambda g: stable_hash(seed, "eval", g))}
    if len(held) == len(names):
        held = set()
    if not held:
        print(f"{len(names)} group(s): none can be held out, so metrics use the training completions")
    train = [i for i in group if group[i] not in held]
    return train, [i for i in group if group[i] in held] or train


def analysis_split(
    rows: list[dict], fraction: float = ANALYSIS_FRACTION, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(ids SAEs may train on, ids reserved for analysis): about `fraction` of the prompt groups (`group`,
    else `prompt_id`) are reserved, by a hash of the group name and the seed, so the choice never moves
    when completions are added and both notebook 03 (which never trains an SAE on the reserved groups)
    and notebook 04 (which probes and tests features only on them) compute the same split.

    Why (DESIGN.md §9): a `deceptive_only` SAE trains on rows chosen by their label; probed on those rows
    it scores well in worlds with no signal at all (balanced accuracy +0.03 to +0.10 over a mixed SAE in
    simulations). Every SAE trained on behaviour data skips the reserved groups, so SAEs of every
    condition are compared on the same rows none of them saw."""
    if not 0 < fraction < 1:
        raise ValueError(f"the analysis fraction must be between 0 and 1, got {fraction}")
    group = {r["id"]: str(r.get("group") or r["prompt_id"]) for r in rows}
    names = sorted(set(group.values()))
    reserved = {g for g in names if stable_hash(seed, "analysis", g) % 10_000 < fraction * 10_000}
    if len(names) > 1 and not reserved:  # tiny runs: reserve at least one group, keep at least one
        reserved = {min(names, key=lambda g: stable_hash(seed, "analysis", g))}
    if len(names) > 1 and len(reserved) == len(names):
        reserved.discard(max(names, key=lambda g: stable_hash(seed, "analysis", g)))
    return [i for i in group if group[i] not in reserved], [i for i in group if group[i] in reserved]
