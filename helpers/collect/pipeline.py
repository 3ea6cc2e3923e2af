"""Notebook 02's steps over the run folder: choose prompts, sample into completions.jsonl, label, show.

Each step resumes: sampling skips completion ids already in `completions.jsonl` (appended a batch at a
time), labelling only sends completions that have no label yet (or lost theirs to a quota stop), and the
judge's answers are cached in the run folder, so Run all after a disconnect or the next day continues
where it stopped and spends nothing twice.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

from helpers.collect.completions import (
    LABELS,
    append_completions,
    label_table,
    read_completions,
    write_completions,
)
from helpers.collect.judge import label_all
from helpers.collect.prompts import (
    Prompt,
    check_fits_context,
    dedupe,
    load_contrast_pairs,
    load_file,
    load_hf_dataset,
    load_scenarios,
)
from helpers.collect.sampling import Completion, sample_completions
from helpers.env import get_secret
from helpers.gemini import GeminiClient
from helpers.tables import format_table

BUILTIN = {"builtin:scenarios": load_scenarios, "builtin:contrast": load_contrast_pairs}


def load_prompts(
    data: str,
    *,
    columns: dict[str, str] | None = None,
    split: str = "train",
    hf_config: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from `builtin:scenarios`, `builtin:contrast`, `hf:<dataset id>`, or a CSV/JSONL/JSON path or URL."""
    if data in BUILTIN:
        prompts = BUILTIN[data]()
    elif data.startswith("hf:"):
        prompts = load_hf_dataset(
            data[3:], split=split, columns=columns or {}, config=hf_config, token=get_secret("HF_TOKEN")
        )
    elif data.startswith("builtin:"):
        raise ValueError(f"unknown built-in set {data!r}: choose one of {sorted(BUILTIN)}")
    else:
        prompts = load_file(data, columns=columns)
    prompts = dedupe(prompts)
    return spread_over_groups(prompts, limit) if limit else prompts


def spread_over_groups(prompts: list[Prompt], limit: int) -> list[Prompt]:
    """The first `limit` prompts taken round-robin over groups (scenarios), so a small run still covers
    many situations instead of the paraphrases of the first one. Contrast pairs stay whole: a fact
    without its other instruction is no contrast."""
    by_group: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_group.setdefault(p.group, []).append(p)
    if all(p.kind == "contrast" for p in prompts):
        return [p for group in by_group.values() for p in group][: limit + limit % 2]
    out: list[Prompt] = []
    while len(out) < min(limit, len(prompts)):
        for group in by_group.values():
            if group and len(out) < limit:
                out.append(group.pop(0))
    return out


def completion_record(c: Completion, p: Prompt) -> dict[str, Any]:
    """A completions.jsonl row: the sample, where its prompt came from, and empty label fields."""
    return {
        **c.to_dict(),
        "source": p.source,
        "group": p.group,
        "kind": p.kind,
        "prompt": p.user,
        "system": p.system,
        "expected_label": p.expected_label,
        "label": None,
        "label_source": None,
        "label_confidence": None,
        "label_reason": None,
    }


def sample_into_run(
    lm: Any,
    prompts: list[Prompt],
    run_dir: str | os.PathLike,
    *,
    n_per_prompt: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Sample what is missing from completions.jsonl (appending each batch as it finishes); return all rows."""
    max_context = getattr(lm.model.config, "max_position_embeddings", None) or 2048
    check_fits_context(prompts, lm.tokenizer, max_context, max_new_tokens)
    by_id = {p.id: p for p in prompts}
    done = {r["id"] for r in read_completions(run_dir)}
    wanted = len(prompts) * n_per_prompt
    print(
        f"{len(prompts)} prompts x {n_per_prompt} samples = {wanted}; {len(done)} already in completions.jsonl"
    )
    sample_completions(
        lm,
        [(p.id, p.user, p.system) for p in prompts],
        n_per_prompt=n_per_prompt,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        done_ids=done,
        on_batch=lambda batch: append_completions(
            run_dir, [completion_record(c, by_id[c.prompt_id]) for c in batch]
        ),
    )
    return read_completions(run_dir)


def label_run(
    run_dir: str | os.PathLike,
    prompts: list[Prompt],
    *,
    client: GeminiClient | None,
    batch_size: int = 25,
    label_by: str = "judge",
) -> list[dict[str, Any]]:
    """Label the completions that have no label yet; rewrite completions.jsonl with everything obtained.

    `label_by="judge"` labels what each completion says (Gemini, or the offline rules).
    `label_by="instruction"` is for contrast pairs and labelled datasets: the label is the prompt's
    `expected_label` (the honest / dishonest instruction), marked `label_source="instruction"`; this is
    instructed deception, a different question from what the model chooses to say.
    """
    if label_by not in ("judge", "instruction"):
        raise ValueError(f"label_by must be 'judge' or 'instruction', got {label_by!r}")
    records = read_completions(run_dir)
    by_id = {p.id: p for p in prompts}
    todo = [r for r in records if r.get("label") is None or r.get("label_source") == "none"]
    if not todo:
        print(f"all {len(records)} completions are labelled")
        return records
    if label_by == "instruction":
        missing = sorted({r["prompt_id"] for r in todo if not r.get("expected_label")})
        if missing:
            raise ValueError(
                f"label_by='instruction' needs prompts with an expected label; {len(missing)} have none "
                f"(e.g. {missing[:3]}). Use builtin:contrast or a dataset with a label column, or label_by='judge'."
            )
        for r in todo:
            r.update(
                label=r["expected_label"],
                label_source="instruction",
                label_confidence=1.0,
                label_reason="contrast pair: the label is the instruction the prompt gave",
            )
        write_completions(run_dir, records)
        return records
    labels = label_all(todo, by_id, client=client, batch_size=batch_size)
    for r in records:
        if (lab := labels.get(r["id"])) is not None:
            r.update(
                label=lab.label,
                label_source=lab.source,
                label_confidence=lab.confidence,
                label_reason=lab.reason,
            )
    write_completions(run_dir, records)
    missing = sum(1 for r in records if r.get("label_source") == "none")
    if missing:
        print(
            f"{missing} completions are still unlabelled (quota or budget): rerun this cell later to finish"
        )
    return records


def label_balance(records: list[dict[str, Any]], by: str = "group", max_rows: int = 30) -> str:
    """Labels per `by` value as a table ending in the ALL row. Beyond `max_rows` values, the most
    one-sided ones are shown (where a label is missing or rare) and the rest counted in one line."""
    rows = label_table(records, by=by)
    body, total = rows[:-1], rows[-1]
    if len(body) > max_rows:

        def balance(r: dict[str, Any]) -> float:
            return min(r["honest"], r["deceptive"]) / max(r["total"], 1)

        shown = sorted(sorted(body, key=balance)[:max_rows], key=lambda r: r[by])
        hidden = {by: f"({len(body) - max_rows} more)"}
        for k in total:
            if k != by:
                hidden[k] = total[k] - sum(r[k] for r in shown)
        body = [*shown, hidden]
    return format_table([*body, total])


def examples(records: list[dict[str, Any]], per_label: int = 2, width: int = 110, seed: int = 0) -> str:
    """A few completions of each label with the judge's reason, to eyeball the labels' quality."""
    import random

    rng = random.Random(seed)
    out = []
    for label in LABELS:
        pool = [r for r in records if r.get("label") == label]
        out.append(f"=== {label} ({len(pool)}) ===")
        for r in rng.sample(pool, min(per_label, len(pool))):
            out.append(f"[{r['prompt_id']}] Q: {textwrap.shorten(r['prompt'], width)}")
            out.append(f"    A: {textwrap.shorten(r['completion'] or '(empty)', width)}")
            out.append(f"    -> {label} ({r.get('label_source')}): {r.get('label_reason')}")
    return "\n".join(out)
