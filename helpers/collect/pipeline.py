"""Notebook 02's steps over the run folder: choose datasets, sample into completions.jsonl, label, show.

A run holds one or more datasets with roles (train / eval / control, `datasets.py`): `load_datasets`
reads them, `write_datasets` declares them in datasets.json, `sample_into_run` answers the prompts of
on-policy ones, `add_transcripts` reads off-policy transcripts through the model without sampling, and
`label_run` labels each dataset its own way (judge, instruction, the dataset's label; control answers are
never judged, so they cost no Gemini request).

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
from helpers.collect.datasets import (
    OURS,
    RunDataset,
    check_declared,
    dataset_name,
    dataset_of,
    load_benign,
    load_public,
    read_datasets,
    spec_for,
    transcript_records,
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
from helpers.collect.sampling import Completion, SamplingSettings, sample_completions
from helpers.env import get_secret
from helpers.gemini import GeminiClient
from helpers.model.protocols import HookableModel, Tokenizer
from helpers.run import (
    activations_dir,
    check_stage_settings,
    completions_path,
    datasets_path,
    pooled_dir,
    set_aside,
)
from helpers.tables import format_table

BUILTIN = {
    "builtin:scenarios": load_scenarios,
    "builtin:contrast": load_contrast_pairs,
    "builtin:benign": load_benign,
}
BUILTIN_ROLES = {
    "builtin:contrast": ("train", "instruction"),
    "builtin:scenarios": ("eval", "judge"),
    "builtin:benign": ("control", "none"),
}
"""Each built-in set's role and labelling unless a DATASETS entry says otherwise."""
ENTRY_KEYS = ("data", "role", "label_by", "name", "limit", "columns", "split", "config", "subsets")


def load_prompts(
    data: str,
    *,
    columns: dict[str, str] | None = None,
    split: str = "train",
    hf_config: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from `builtin:scenarios`, `builtin:contrast`, `builtin:benign`, `hf:<dataset id>` (with
    `columns`), or a CSV/JSONL/JSON path or URL."""
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


def load_datasets(
    entries: list[dict[str, Any]],
    *,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
    split: str = "train",
    hf_config: str | None = None,
) -> list[RunDataset]:
    """The datasets of notebook 02's DATASETS: each entry is `{"data": ..., "role": ..., "label_by": ...}`
    plus optional `name`, `limit` (default `limit`), and for a dataset we have no spec for `columns`,
    `split`, `config` (defaults from the arguments); `subsets` picks diverse-deception's sources.

    `data` is `builtin:contrast` / `scenarios` / `benign`, `hf:<id>` (a public dataset of
    `datasets.SPECS`, or any Hub dataset with `columns`), or a CSV / JSONL / JSON path or URL. Built-in and
    registered sets have a default role and labelling; other data needs its `role`."""
    out: list[RunDataset] = []
    for entry in entries:
        if unknown := sorted(set(entry) - set(ENTRY_KEYS)):
            raise ValueError(f"DATASETS entry {entry}: unknown key(s) {unknown}; allowed: {list(ENTRY_KEYS)}")
        if not entry.get("data"):
            raise ValueError(f"DATASETS entry {entry} has no 'data' (e.g. 'builtin:contrast')")
        data, n = str(entry["data"]), entry.get("limit", limit) or None
        spec = spec_for(data) if data.startswith("hf:") and not entry.get("columns", columns) else None
        if spec is not None:
            loaded = load_public(
                spec,
                token=get_secret("HF_TOKEN"),
                role=entry.get("role"),
                label_by=entry.get("label_by"),
                name=entry.get("name"),
                subsets=entry.get("subsets"),
                configs=[entry["config"]] if entry.get("config") else None,
            )
            for d in loaded:
                if d.kind == "prompts" and n:
                    d.prompts = spread_over_groups(dedupe(d.prompts), n)
                elif n:
                    d.transcripts = d.transcripts[:n]
            out += loaded
            continue
        role, label_by = BUILTIN_ROLES.get(data, (entry.get("role"), entry.get("label_by") or "judge"))
        if role is None:
            raise ValueError(f"DATASETS entry {entry}: say its role ('train', 'eval' or 'control')")
        prompts = load_prompts(
            data,
            columns=entry.get("columns", columns),
            split=entry.get("split", split),
            hf_config=entry.get("config", hf_config),
            limit=n,
        )
        out.append(
            RunDataset(
                name=entry.get("name") or dataset_name(data),
                spec=data,
                role=entry.get("role") or role,
                kind="prompts",
                source=prompts[0].source if prompts else data,
                licence=OURS if data in BUILTIN else "your data (not checked)",
                label_by=entry.get("label_by") or label_by,
                prompts=prompts,
            )
        )
    check_unique_ids(out)
    for d in out:
        n_items = len(d.prompts) if d.kind == "prompts" else len(d.transcripts)
        print(
            f"{d.name}: {d.role}, {d.kind} ({'on' if d.kind == 'prompts' else 'off'}-policy), {n_items} "
            f"{d.kind}, labels by {d.label_by}; {d.source}"
        )
    return out


def check_unique_ids(datasets: list[RunDataset]) -> None:
    """Prompt ids never collide across the datasets of a run (they key completions)."""
    owner: dict[str, str] = {}
    for d in datasets:
        for pid in [p.id for p in d.prompts] + [t.id for t in d.transcripts]:
            if owner.setdefault(pid, d.name) != d.name:
                raise ValueError(
                    f"prompt id {pid!r} is in datasets {owner[pid]!r} and {d.name!r}: the same data twice? "
                    "Drop one entry, or load your file with other ids (an `id` column)."
                )


def add_transcripts(
    tokenizer: Tokenizer,
    datasets: list[RunDataset],
    run_dir: str | os.PathLike,
    *,
    max_context: int | None = None,
) -> list[dict[str, Any]]:
    """Append the off-policy datasets' transcripts to completions.jsonl (no sampling: their text is read
    through the model later, as a sampled completion's is); those already there are
    skipped. Returns all rows."""
    off = [d for d in datasets if d.kind == "transcripts"]
    check_declared(run_dir, [d.name for d in off])
    done = {r["id"] for r in read_completions(run_dir)}
    for d in off:
        new = [r for r in transcript_records(tokenizer, d, max_context=max_context) if r["id"] not in done]
        if new:
            append_completions(run_dir, new)
        print(
            f"{d.name}: {len(new)} transcripts added "
            f"({len(d.transcripts) - len(new)} already there or too long)"
        )
    return read_completions(run_dir)


COLLECT_STAGE = "02_collect_activations"
"""Notebook 02's stage in run.json (its settings: `collection_settings`)."""
ADDABLE = ("datasets.*", "datasets.*.n_items", "sampling.n_per_prompt", "layers")
"""Changes of notebook 02's settings that only add to a run (ADD_TO_RUN): another dataset, more prompts
of a dataset (a larger N_PROMPTS keeps the earlier ones), more samples per prompt, more layers."""


def collection_settings(
    model_spec: str,
    datasets: list[RunDataset],
    layers: list[int],
    *,
    n_per_prompt: int,
    include_prompt: bool,
    sampling: SamplingSettings | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """What determines notebook 02's completions and activations (compared on a rerun): the datasets,
    `n_per_prompt` and the `sampling` that `sample_into_run` is given (its fields may come as keywords,
    as there), the layers, and whether prompt tokens are kept (`include_prompt`)."""
    sampling = (sampling or SamplingSettings()).with_overrides(overrides)
    return {
        "model": model_spec,
        "datasets": {
            d.name: {
                "spec": d.spec,
                "role": d.role,
                "kind": d.kind,
                "label_by": d.label_by,
                "n_items": len(d.prompts if d.kind == "prompts" else d.transcripts),
            }
            for d in datasets
        },
        "sampling": {
            "n_per_prompt": n_per_prompt,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
        },
        "layers": sorted(layers),
        "include_prompt": include_prompt,
    }


def check_collection(
    run_dir: str | os.PathLike, settings: dict[str, Any], *, overwrite: bool = False, add: bool = False
) -> str:
    """Notebook 02's settings against those that made the run folder's completions (run.json): the same
    resume; other settings stop before anything is written, naming each difference and the choices (a
    new RUN_NAME, OVERWRITE, or ADD_TO_RUN when the change only adds: another dataset, more prompts,
    samples or layers). With `overwrite`, the completions, datasets.json, activations and pooled vectors
    made with the old settings are moved to replaced/ here (the corpus and the judge's cache stay). Returns
    check_stage_settings's decision."""
    has_outputs = completions_path(run_dir).exists() or datasets_path(run_dir).exists()
    decision = check_stage_settings(
        run_dir,
        COLLECT_STAGE,
        settings,
        overwrite=overwrite,
        add=add,
        addable=ADDABLE,
        has_outputs=has_outputs,
        overwrite_does="move this run's completions, datasets.json, activations and pooled vectors to "
        "replaced/ and collect them again with the new settings (the corpus and the judge's cache stay)",
    )
    if decision == "overwrite":  # kept in replaced/ (run.set_aside), collected again
        old = [completions_path(run_dir), datasets_path(run_dir), pooled_dir(run_dir)]
        set_aside(run_dir, COLLECT_STAGE, [*old, activations_dir(run_dir, 0).parent])
    elif decision == "add":
        print("ADD_TO_RUN: adding to this run's completions (what is there is kept and skipped)")
    return decision


def completion_record(c: Completion, p: Prompt) -> dict[str, Any]:
    """A completions.jsonl row: the sample, where its prompt came from, its
    dataset, and empty label fields."""
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
        "dataset": p.meta.get("dataset") or dataset_name(p.source),
        "policy": "on-policy",
    }


def sample_into_run(
    lm: HookableModel,
    prompts: list[Prompt],
    run_dir: str | os.PathLike,
    *,
    n_per_prompt: int,
    sampling: SamplingSettings | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Sample what is missing from completions.jsonl (appending each batch as it finishes); return all
    rows. `sampling` (default `SamplingSettings()`: temperature 1, no nucleus cut, 128 new tokens, seed 0,
    batches of 32) with any of its fields given as keywords instead (`temperature=0` is greedy)."""
    sampling = (sampling or SamplingSettings()).with_overrides(overrides)
    max_context = getattr(lm.model.config, "max_position_embeddings", None) or 2048
    check_fits_context(prompts, lm.tokenizer, max_context, sampling.max_new_tokens)
    check_declared(run_dir, {p.meta.get("dataset") or dataset_name(p.source) for p in prompts})
    by_id = {p.id: p for p in prompts}
    done = {r["id"] for r in read_completions(run_dir)}
    wanted = len(prompts) * n_per_prompt
    print(
        f"{len(prompts)} prompts x {n_per_prompt} samples = {wanted}; "
        f"{len(done)} already in completions.jsonl"
    )
    sample_completions(
        lm,
        [(p.id, p.user, p.system) for p in prompts],
        n_per_prompt=n_per_prompt,
        sampling=sampling,
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
    """Label the completions that have no label yet, each by its dataset's `label_by` (datasets.json);
    rewrite completions.jsonl with everything obtained.

    `judge` labels what each completion says (Gemini, or the offline rules). `instruction` is for contrast
    pairs and labelled datasets: the label is the prompt's `expected_label` (the honest / dishonest
    instruction), marked `label_source="instruction"`; instructed deception, a different question from
    what the model chooses to say. Transcripts carry their dataset's label already. Control answers are
    never judged (no Gemini request is spent on them): `label=None`, `label_source="control"`.
    `label_by` is used for records of a dataset datasets.json does not name (a run folder from before it).
    Records written before runs had several datasets get their `dataset` and `policy` fields here.
    """
    if label_by not in ("judge", "instruction"):
        raise ValueError(f"label_by must be 'judge' or 'instruction', got {label_by!r}")
    records = read_completions(run_dir)
    entries = {e["name"]: e for e in read_datasets(run_dir)}
    by_id = {p.id: p for p in prompts}

    def method(r: dict[str, Any]) -> str:
        entry = entries.get(dataset_of(r)) or {}
        return "control" if entry.get("role") == "control" else entry.get("label_by") or label_by

    for r in records:
        r.setdefault("dataset", dataset_of(r))
        r.setdefault("policy", "off-policy" if r.get("kind") == "transcript" else "on-policy")
        if method(r) == "control" and r.get("label_source") != "control":
            r.update(
                label=None,
                label_source="control",
                label_confidence=None,
                label_reason="control set: answers are never judged",
            )
    todo = [
        r
        for r in records
        if (r.get("label") is None or r.get("label_source") == "none")
        and method(r) in ("judge", "instruction")
    ]
    instructed = [r for r in todo if method(r) == "instruction"]
    missing = sorted({r["prompt_id"] for r in instructed if not r.get("expected_label")})
    if missing:
        raise ValueError(
            f"label_by='instruction' needs prompts with an expected label; {len(missing)} have none (e.g. "
            f"{missing[:3]}). Use builtin:contrast or a dataset with a label column, or label_by='judge'."
        )
    for r in instructed:
        r.update(
            label=r["expected_label"],
            label_source="instruction",
            label_confidence=1.0,
            label_reason="contrast pair: the label is the instruction the prompt gave",
        )
    judged = [r for r in todo if method(r) == "judge"]
    if judged:
        labels = label_all(judged, by_id, client=client, batch_size=batch_size)
        for r in judged:
            if (lab := labels.get(r["id"])) is not None:
                r.update(
                    label=lab.label,
                    label_source=lab.source,
                    label_confidence=lab.confidence,
                    label_reason=lab.reason,
                )
    write_completions(run_dir, records)
    if not todo:
        print(f"all {len(records)} completions are labelled (control answers stay unlabelled by design)")
    still = sum(1 for r in records if r.get("label_source") == "none")
    if still:
        print(f"{still} completions are still unlabelled (quota or budget): rerun this cell later to finish")
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
