"""`completions.jsonl`: the sampled completions of a run and their labels (DESIGN.md §3).

One JSON object per line: `id`, `prompt_id`, `source`, `group`, `prompt`, `system`, `completion`,
`n_tokens`, `label` (honest / deceptive / ambiguous, or null before judging), `label_source`
("gemini:<model>", "rules", "expected"), `label_confidence`, `label_reason`, plus the exact token ids so
activations are recomputed on exactly the tokens the model produced.

Sampling appends a batch at a time (a disconnect loses at most one batch; a torn last line is
ignored on read); labelling rewrites the whole file atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .runs import atomic_write_bytes

FILE = "completions.jsonl"
LABELS = ("honest", "deceptive", "ambiguous")


def path_of(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FILE


def read_completions(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records; [] when the file does not exist. A torn final line (disconnect mid-append) is skipped."""
    path = path_of(run_dir)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                print(f"{path.name}: ignoring a torn last line (an interrupted write); it will be resampled")
                continue
            raise ValueError(
                f"{path} line {i + 1} is not valid JSON ({err}); fix or delete that line"
            ) from err
    ids = [r["id"] for r in records]
    if len(ids) != len(set(ids)):
        dup = [k for k, v in Counter(ids).items() if v > 1][:5]
        raise ValueError(
            f"{path} has duplicate completion ids {dup}: it was edited by hand or by two runs at once"
        )
    return records


def append_completions(run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Append records and fsync, so a batch that finished survives a disconnect."""
    path = path_of(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_tail(path: Path) -> None:
    """Remove an incomplete last line left by an interrupted append, so new lines start cleanly."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])


def write_completions(run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Rewrite the whole file atomically (after labelling)."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path_of(run_dir), body.encode())


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


def stable_hash(*parts: Any) -> int:
    """A 63-bit integer from `parts` that is the same in every process and Python version (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


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
