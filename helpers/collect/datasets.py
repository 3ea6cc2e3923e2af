"""The datasets of a run: public deception datasets loaded at run time, and each dataset's role.

A run may hold several datasets, each with a role (how the field measures detection, REFERENCE.md
"Deception detection"): a probe is trained on the `train` set(s), evaluated on each `eval` set, and its
threshold set at 1% false positives on the answers to a benign `control` set. Two kinds stay distinct:

    prompts       on-policy: the user's model answers them itself (sampling.py); the label comes from the
                  judge (what the answer says) or from the instruction the prompt gave (contrast pairs)
    transcripts   off-policy: someone else's conversation read through the model without sampling
                  (`transcript_records`); the label comes from the dataset, `label_source="dataset:<id>"`

`datasets.json` in the run folder lists them (`write_datasets` / `read_datasets`):

    {"datasets": [{"name": "contrast", "spec": "builtin:contrast", "role": "train", "kind": "prompts",
                   "policy": "on-policy", "source": "builtin:contrast", "licence": "MIT ...",
                   "label_by": "instruction", "n_prompts": 452, "citation": "..."}, ...]}

and every completion record carries `"dataset": <name>` and `"policy": "on-policy" | "off-policy"`.

Public datasets (`SPECS`) are read with `datasets.load_dataset`, from the Hub or, when the environment
variable `NB_HF_DATASETS_DIR` is set, from `<dir>/<org>/<name>/`: a local copy in the Hub repository's
own layout (the same data files and README configs), so tests and offline runs go through the same code.
No row of these datasets is ever stored in this repository; their licences are printed when they load.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from helpers.collect.completions import read_completions
from helpers.collect.prompts import Prompt, contrast_user_text, data_dir, dedupe
from helpers.env import NotebookError
from helpers.model.chat import encode_conversation
from helpers.model.protocols import Tokenizer
from helpers.run import atomic_write_json, datasets_path, read_jsonl, read_run_json

Role = Literal["train", "eval", "control"]
Kind = Literal["prompts", "transcripts"]
LabelBy = Literal["judge", "instruction", "dataset", "none"]
ROLES = ("train", "eval", "control")
LABEL_BY = ("judge", "instruction", "dataset", "none")
POLICY = {"prompts": "on-policy", "transcripts": "off-policy"}
MIRROR_ENV = "NB_HF_DATASETS_DIR"
"""A folder holding local copies of Hub datasets as `<org>/<name>/` (the Hub repository's layout)."""
BENIGN_FILE = "benign_prompts.jsonl"
OURS = "MIT (written for this repository)"
UNCONFIRMED = (
    "not confirmed (the dataset card states none we could check): check it before publishing results"
)


@dataclass(frozen=True)
class Transcript:
    """One conversation someone else wrote, ending in the assistant turn that is labelled."""

    id: str
    group: str
    """What grouped CV splits by: the dataset's pair id (an honest and a deceptive
    answer to one situation)."""
    messages: list[dict[str, str]]
    """`[{"role": "system" | "user" | "assistant", "content": str}, ...]`, the last one the assistant's."""
    label: str
    """"honest" or "deceptive", from the dataset."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A public dataset we know how to read: where it is, which of its columns we use, and on what terms."""

    hub_id: str
    """The Hugging Face dataset id, e.g. "tatsu-lab/alpaca"."""
    name: str
    """Our short name (the dataset's `name` in datasets.json, prefix of its prompt ids)."""
    kind: Kind
    role: Role
    """The role it takes unless the notebook's DATASETS entry says otherwise."""
    label_by: LabelBy
    columns: tuple[str, ...]
    """Columns that must exist (read by `build`); a missing one means the dataset changed on the Hub."""
    build: Callable[[DatasetSpec, list[dict[str, Any]]], list[Prompt] | list[Transcript]]
    """Rows (dicts, in the dataset's order) to our prompts or transcripts."""
    licence: str
    citation: str
    split: str = "train"
    configs: tuple[str | None, ...] = (None,)
    """Configs loaded by default (None = the dataset's default config)."""
    gated: bool = False
    """Access needs the terms accepted on the Hub page and a token (the HF_TOKEN secret)."""
    redistribution: Literal["allowed", "non-commercial", "forbidden", "unconfirmed"] = "unconfirmed"
    """What its licence says about sharing its text (completions.jsonl holds it)."""
    group_by: str | None = None
    """For transcripts, the column that splits it into one eval set per value (diverse-deception's
    `source_dataset`)."""

    def __post_init__(self) -> None:
        if self.kind not in POLICY or self.role not in ROLES or self.label_by not in LABEL_BY:
            raise ValueError(f"{self.hub_id}: bad kind/role/label_by {self.kind}/{self.role}/{self.label_by}")


@dataclass
class RunDataset:
    """One dataset of a run, loaded: its datasets.json entry plus its prompts or transcripts."""

    name: str
    spec: str
    """What the notebook asked for: "builtin:contrast", "hf:tatsu-lab/alpaca", a file path."""
    role: Role
    kind: Kind
    source: str
    licence: str
    label_by: LabelBy
    prompts: list[Prompt] = field(default_factory=list)
    transcripts: list[Transcript] = field(default_factory=list)
    citation: str = ""

    def __post_init__(self) -> None:
        check_entry(self.entry())
        for p in self.prompts:  # completion_record reads the dataset from here
            p.meta["dataset"] = self.name

    def entry(self) -> dict[str, Any]:
        """The datasets.json entry."""
        return {
            "name": self.name,
            "spec": self.spec,
            "role": self.role,
            "kind": self.kind,
            "policy": POLICY[self.kind],
            "source": self.source,
            "licence": self.licence,
            "label_by": self.label_by,
            "n_prompts": len(self.transcripts if self.kind == "transcripts" else self.prompts),
            "citation": self.citation,
        }


def check_entry(entry: Mapping[str, Any]) -> None:
    """A datasets.json entry's fields are valid; an error names the bad value and the choices."""
    name = str(entry.get("name") or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)*", name):
        raise ValueError(
            f"dataset name {name!r}: use letters, digits, '_', '-', "
            "'.' (and '/' between parts), e.g. 'benign'"
        )
    for key, choices in (("role", ROLES), ("kind", tuple(POLICY)), ("label_by", LABEL_BY)):
        if entry.get(key) not in choices:
            raise ValueError(
                f"dataset {name!r}: {key} must be one of {list(choices)}, got {entry.get(key)!r}"
            )


# --- the built-in control set ------------------------------------------------------------------------
def load_benign() -> list[Prompt]:
    """`builtin:benign`: 150 benign requests of our own writing (how-to, explain, summarise, short creative,
    coding, facts), for the control set whose answers fix a detector's 1% false-positive threshold. Each
    prompt is its own group."""
    prompts = []
    for row in read_jsonl(data_dir() / BENIGN_FILE, missing_ok=False):
        pid = f"benign/{row['id'].removeprefix('benign_')}"
        meta = {"category": row["category"]}
        prompts.append(Prompt(pid, "builtin:benign", row["prompt"], None, pid, "custom", None, meta))
    return dedupe(prompts)


# --- reading a public dataset ------------------------------------------------------------------------
def mirror_dir(hub_id: str) -> Path | None:
    """The local copy of `hub_id` under `$NB_HF_DATASETS_DIR`, or None to read the Hub."""
    root = os.environ.get(MIRROR_ENV)
    if not root:
        return None
    folder = Path(root).expanduser() / hub_id
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{MIRROR_ENV}={root} has no {hub_id}/ folder: copy the dataset there in the Hub's layout, "
            f"or unset {MIRROR_ENV} to read it from the Hub"
        )
    return folder


def gated_message(spec: DatasetSpec, problem: str) -> str:
    return (
        f"{spec.hub_id} is gated ({problem}). To use it: open "
        f"https://huggingface.co/datasets/{spec.hub_id} while logged in and accept its terms, create a "
        "read token at https://huggingface.co/settings/tokens, and add it as a secret named HF_TOKEN "
        "(Colab: the key icon in the left bar; elsewhere the HF_TOKEN environment variable), then rerun "
        "this cell. Nothing collected so far is lost."
    )


def load_rows(spec: DatasetSpec, config: str | None, *, token: str | None) -> list[dict[str, Any]]:
    """The rows of one config of `spec` through `datasets.load_dataset` (Hub or local copy), after
    checking that the columns we read are there."""
    local = mirror_dir(spec.hub_id)
    if local is None and spec.gated and not token:
        raise PermissionError(gated_message(spec, "no HF_TOKEN secret is set"))
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(
            "public datasets need the `datasets` package: `%pip install datasets` and rerun this cell"
        ) from err
    try:
        ds = load_dataset(str(local) if local else spec.hub_id, config, split=spec.split, token=token)
    except Exception as err:  # noqa: BLE001 - translated when it is an access problem, else re-raised
        text = f"{type(err).__name__}: {err}"
        if re.search(r"gated|401|403|unauthori[sz]ed|restricted|authenticat", text, re.IGNORECASE):
            raise PermissionError(gated_message(spec, f"the Hub refused access: {text[:200]}")) from err
        raise
    found = list(ds.column_names)
    missing = [c for c in spec.columns if c not in found]
    if missing:
        raise ValueError(
            f"{spec.hub_id}{f' (config {config})' if config else ''}: expected columns {list(spec.columns)}, "
            f"found {found} (missing {missing}). The dataset changed on the Hub since this package was "
            "written. Fix: load it as your own data with a column map (DATA = 'hf:<id>' with COLUMNS = "
            "{'user': <prompt column>, ...}), or pin the older revision, and open an issue so the spec is "
            "updated. Nothing collected so far is lost."
        )
    return [dict(r) for r in ds]


def announce(spec: DatasetSpec) -> None:
    """Print the licence and citation (and what the licence means for the run folder)."""
    print(f"{spec.hub_id}: licence {spec.licence}. Cite: {spec.citation}")
    if spec.redistribution == "forbidden":
        print(
            f"  WARNING: {spec.hub_id}'s licence forbids redistributing its text, and completions.jsonl of "
            "this run holds it: do not share or publish the run folder (zip_run) as is. Publishing SAEs "
            "(weights only) is unaffected."
        )
    elif spec.redistribution == "non-commercial":
        print(
            f"  note: non-commercial licence: a run folder holding {spec.hub_id}'s text is for research only"
        )
    elif spec.redistribution == "unconfirmed":
        print(
            f"  note: {spec.hub_id}'s licence is not confirmed: check its card before sharing the run folder"
        )


def load_public(
    spec: DatasetSpec,
    *,
    token: str | None = None,
    configs: Sequence[str | None] | None = None,
    subsets: Sequence[str] | None = None,
    role: Role | None = None,
    label_by: LabelBy | None = None,
    name: str | None = None,
) -> list[RunDataset]:
    """`spec` loaded as one RunDataset, or one per value of `spec.group_by` (diverse-deception: one eval set
    per source dataset; `subsets` keeps only those)."""
    announce(spec)
    items: list[Any] = []
    for config in configs or spec.configs:
        items += spec.build(spec, load_rows(spec, config, token=token))
    base = name or spec.name
    common = dict(
        spec=f"hf:{spec.hub_id}",
        role=role or spec.role,
        kind=spec.kind,
        licence=spec.licence,
        label_by=label_by or spec.label_by,
        citation=spec.citation,
    )
    if spec.group_by is None:
        key = "transcripts" if spec.kind == "transcripts" else "prompts"
        return [RunDataset(name=base, source=f"hf:{spec.hub_id}", **common, **{key: items})]
    by_subset: dict[str, list[Transcript]] = {}
    for t in items:
        by_subset.setdefault(str(t.meta[spec.group_by]), []).append(t)
    if subsets:
        unknown = sorted(set(subsets) - set(by_subset))
        if unknown:
            raise ValueError(f"{spec.hub_id}: no {spec.group_by} {unknown}; it has {sorted(by_subset)}")
        by_subset = {k: by_subset[k] for k in subsets}
    out = []
    for subset, ts in sorted(by_subset.items()):
        sub = slug(subset)
        ts = [
            Transcript(f"{base}/{sub}/{t.id}", f"{base}/{sub}/{t.group}", t.messages, t.label, t.meta)
            for t in ts
        ]
        out.append(
            RunDataset(
                name=f"{base}/{sub}",
                source=f"hf:{spec.hub_id} ({spec.group_by}={subset})",
                transcripts=ts,
                **common,
            )
        )
    print(
        f"  {len(out)} eval sets, one per {spec.group_by}: "
        + ", ".join(f"{d.name} ({len(d.transcripts)})" for d in out)
    )
    return out


def slug(text: str) -> str:
    """`text` safe in a dataset name and a file name."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("_") or "x"


# --- row builders (one per dataset layout) -----------------------------------------------------------
def _messages(value: Any, hub_id: str, row: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise ValueError(f"{hub_id} row {row}: `messages` is not a list of {{role, content}} messages")
    return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in value]


def _label(value: Any, hub_id: str, row: int) -> str:
    text = str(value).strip().lower()
    mapped = {"true": "deceptive", "1": "deceptive", "false": "honest", "0": "honest"}.get(text, text)
    if mapped not in ("honest", "deceptive"):
        raise ValueError(
            f"{hub_id} row {row}: label {value!r} is not honest/deceptive (or a deceptive flag): the "
            "dataset's labels changed; check its card and tell us"
        )
    return mapped


def _transcripts(spec: DatasetSpec, rows: list[dict[str, Any]]) -> list[Transcript]:
    """Rows with `messages` ending in the labelled assistant turn, `label`, `pair_id` and `spec.group_by`."""
    out = []
    for i, row in enumerate(rows):
        messages = _messages(row["messages"], spec.hub_id, i)
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"{spec.hub_id} row {i}: the last message is not the assistant's answer")
        pair = str(row.get("pair_id") if row.get("pair_id") is not None else i)
        meta = {k: row[k] for k in (spec.group_by, "pair_id") if k and k in row}
        out.append(Transcript(str(i), pair, messages, _label(row["label"], spec.hub_id, i), meta))
    return out


def _instructed_statements(spec: DatasetSpec, rows: list[dict[str, Any]]) -> list[Prompt]:
    """True/false statements as contrast pairs, like builtin:contrast: the same question under the honest
    and the dishonest instruction (helpers.collect.prompts.contrast_user_text), labelled by instruction."""
    out = []
    for i, row in enumerate(rows):
        statement = str(row["statement"]).strip()
        question = f'Is this statement true or false? "{statement}"'
        truth = _truth(row["label"], spec.hub_id, i)
        for instruction, label in (("honest", "honest"), ("dishonest", "deceptive")):
            pid, group = f"{spec.name}/{i}/{instruction}", f"{spec.name}/{i}"
            meta = {"instruction": instruction, "statement": statement, "statement_is_true": truth}
            out.append(
                Prompt(
                    pid,
                    f"hf:{spec.hub_id}",
                    contrast_user_text(question, instruction),
                    None,
                    group,
                    "contrast",
                    label,
                    meta,
                )
            )
    return out


def _truth(value: Any, hub_id: str, row: int) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true"):
        return True
    if text in ("0", "false"):
        return False
    raise ValueError(f"{hub_id} row {row}: label {value!r} is not 1/0 or true/false; check the dataset card")


def _prompt(
    spec: DatasetSpec, i: int, user: str, system: str | None, group: str | None = None, **meta
) -> Prompt:
    pid = f"{spec.name}/{i}"
    return Prompt(pid, f"hf:{spec.hub_id}", user, system or None, group or pid, "custom", None, meta)


def _deceptionbench(spec: DatasetSpec, rows: list[dict[str, Any]]) -> list[Prompt]:
    """PKU DeceptionBench: the `outer_prompt` under its `system_prompt`; `inner_prompt` (the question that
    elicits the model's own belief, without pressure) is kept in meta for the judge."""
    return [
        _prompt(
            spec,
            int(r.get("id", i)) if str(r.get("id", i)).isdigit() else i,
            str(r["outer_prompt"]),
            r.get("system_prompt"),
            type=r.get("type"),
            inner_prompt=r.get("inner_prompt"),
        )
        for i, r in enumerate(rows)
    ]


def _chat_prompts(spec: DatasetSpec, rows: list[dict[str, Any]]) -> list[Prompt]:
    """Chat rows (`messages`): the first user turn (and a system message before it) becomes the prompt;
    any answer in the row belongs to another model and is dropped."""
    out = []
    for i, row in enumerate(rows):
        messages = _messages(row["messages"], spec.hub_id, i)
        user = next((m["content"] for m in messages if m["role"] == "user" and m["content"].strip()), None)
        if user is None:
            continue
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        out.append(
            _prompt(spec, i, user, system, **{k: row[k] for k in ("model", "dataset", "source") if k in row})
        )
    return out


def _mask(spec: DatasetSpec, rows: list[dict[str, Any]]) -> list[Prompt]:
    """MASK: the pressure prompt (`system_prompt` + `user_prompt`); the proposition and ground truth go to
    meta for the judge."""
    return [
        _prompt(
            spec,
            i,
            str(r["user_prompt"]),
            r.get("system_prompt"),
            str(r.get("task_id") or "") or None,
            proposition=r.get("proposition"),
            ground_truth=r.get("ground_truth"),
        )
        for i, r in enumerate(rows)
    ]


def _alpaca(spec: DatasetSpec, rows: list[dict[str, Any]]) -> list[Prompt]:
    """Alpaca: the instruction, with its `input` (when there is one) below it; the reference output is
    another model's and is dropped."""
    out = []
    for i, r in enumerate(rows):
        extra = str(r.get("input") or "").strip()
        out.append(_prompt(spec, i, str(r["instruction"]) + (f"\n\n{extra}" if extra else ""), None))
    return out


SPECS: dict[str, DatasetSpec] = {
    s.hub_id: s
    for s in (
        DatasetSpec(
            hub_id="AlignmentResearch/diverse-deception",
            name="diverse_deception",
            kind="transcripts",
            role="eval",
            label_by="dataset",
            columns=("messages", "label", "source_dataset", "pair_id"),
            build=_transcripts,
            licence=UNCONFIRMED,
            citation=(
                "FAR.AI (AlignmentResearch), diverse-deception: "
                "honest/deceptive transcripts from many sources"
            ),
            group_by="source_dataset",
        ),
        DatasetSpec(
            hub_id="L1Fthrasir/Facts-true-false",
            name="facts",
            kind="prompts",
            role="train",
            label_by="instruction",
            columns=("statement", "label"),
            build=_instructed_statements,
            licence=UNCONFIRMED,
            citation=(
                "true/false facts (Azaria & Mitchell 2023) as used by Goldowsky-Dill et al. 2025 and "
                "UK AISI's probes"
            ),
        ),
        DatasetSpec(
            hub_id="PKU-Alignment/DeceptionBench",
            name="deceptionbench",
            kind="prompts",
            role="eval",
            label_by="judge",
            columns=("outer_prompt", "system_prompt", "inner_prompt"),
            build=_deceptionbench,
            licence="MIT",
            citation=(
                "Ji et al. 2025, Mitigating Deceptive Alignment via Self-Monitoring "
                "(DeceptionBench, 180 scenarios)"
            ),
            split="test",
            redistribution="allowed",
        ),
        DatasetSpec(
            hub_id="Cadenza-Labs/liars-bench",
            name="liars_bench",
            kind="prompts",
            role="eval",
            label_by="judge",
            columns=("messages",),
            build=_chat_prompts,
            licence=(
                UNCONFIRMED
                + "; its labels belong to the four models that answered, so only its prompts are used"
            ),
            citation=(
                "Kretschmar et al. 2025, Liars' Bench: Evaluating Lie Detectors for Language Models "
                "(arXiv 2511.16035)"
            ),
            split="test",
            configs=("instructed-deception",),
            gated=True,
        ),
        DatasetSpec(
            hub_id="cais/MASK",
            name="mask",
            kind="prompts",
            role="eval",
            label_by="judge",
            columns=("system_prompt", "user_prompt"),
            build=_mask,
            licence="see the dataset card (gated; terms accepted on the Hub)",
            citation="Ren et al. 2025, The MASK Benchmark: Disentangling Honesty from Accuracy in AI Systems",
            split="test",
            configs=("known_facts",),
            gated=True,
        ),
        DatasetSpec(
            hub_id="tatsu-lab/alpaca",
            name="alpaca",
            kind="prompts",
            role="control",
            label_by="none",
            columns=("instruction", "input"),
            build=_alpaca,
            licence="CC BY-NC 4.0",
            citation="Taori et al. 2023, Stanford Alpaca",
            redistribution="non-commercial",
        ),
        DatasetSpec(
            hub_id="HuggingFaceTB/smol-smoltalk",
            name="smoltalk",
            kind="prompts",
            role="control",
            label_by="none",
            columns=("messages",),
            build=_chat_prompts,
            licence="Apache-2.0",
            citation="Allal et al. 2025, SmolLM2 (smol-smoltalk)",
            redistribution="allowed",
        ),
    )
}
"""The public datasets we read, by Hub id."""


def spec_for(data: str) -> DatasetSpec | None:
    """The built-in spec of `hf:<id>` (or a bare id), or None for a dataset we have no spec for."""
    return SPECS.get(data.removeprefix("hf:").strip("/"))


# --- transcripts through the model, without sampling -------------------------------------------------
def encode_transcript(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a conversation whose last message is the assistant's answer.

    The prompt is everything before the answer in the model's chat format, ending where the assistant's
    answer starts, exactly as sampling encodes it (`encode_conversation`); the answer is
    its text tokenised without special tokens and without the stop token, as a sampled completion is.
    """
    *before, answer = messages
    if answer["role"] != "assistant":
        raise ValueError("a transcript must end with the assistant's answer")
    return encode_conversation(tokenizer, before), tokenizer.encode(
        answer["content"], add_special_tokens=False
    )


def transcript_records(
    tokenizer: Tokenizer, dataset: RunDataset, *, max_context: int | None = None
) -> list[dict[str, Any]]:
    """completions.jsonl records of a transcripts dataset, with the fields of a sampled record
    (`completion_record` in pipeline.py), `sample_index` 0, `seed` None, and the dataset's label
    (`label_source="dataset:<hub id>"`). Transcripts longer than `max_context`
    tokens are left out (counted)."""
    if dataset.kind != "transcripts":
        raise ValueError(f"dataset {dataset.name!r} holds prompts, not transcripts: sample it instead")
    hub_id = dataset.spec.removeprefix("hf:")
    records, too_long = [], 0
    for t in dataset.transcripts:
        prompt_ids, completion_ids = encode_transcript(tokenizer, t.messages)
        if max_context is not None and len(prompt_ids) + len(completion_ids) > max_context:
            too_long += 1
            continue
        user = next((m["content"] for m in reversed(t.messages[:-1]) if m["role"] == "user"), "")
        system = next((m["content"] for m in t.messages[:-1] if m["role"] == "system"), None)
        records.append(
            {
                "id": f"{t.id}#0",
                "prompt_id": t.id,
                "sample_index": 0,
                "prompt_token_ids": prompt_ids,
                "completion_token_ids": completion_ids,
                "completion": tokenizer.decode(completion_ids, skip_special_tokens=True).strip(),
                "n_prompt_tokens": len(prompt_ids),
                "n_tokens": len(completion_ids),
                "stopped": True,
                "seed": None,
                "source": dataset.source,
                "group": t.group,
                "kind": "transcript",
                "prompt": user,
                "system": system,
                "expected_label": t.label,
                "label": t.label,
                "label_source": f"dataset:{hub_id}",
                "label_confidence": 1.0,
                "label_reason": f"the label given by {hub_id} (another model's text)",
                "dataset": dataset.name,
                "policy": "off-policy",
            }
        )
    if too_long:
        print(
            f"{dataset.name}: left out {too_long} transcript(s) longer "
            f"than the model's context ({max_context})"
        )
    return records


# --- datasets.json -----------------------------------------------------------------------------------
def dataset_name(spec: str) -> str:
    """The short name of a dataset given by its spec or a record's `source`: "builtin:contrast" ->
    "contrast", "hf:org/name[/config/split]" -> the spec's name or "name", a file -> its stem."""
    if spec.startswith("builtin:"):
        return slug(spec.removeprefix("builtin:"))
    if spec.startswith("hf:"):
        parts = spec.removeprefix("hf:").split(" ")[0].strip("/").split("/")
        known = SPECS.get("/".join(parts[:2]))
        return known.name if known else slug(parts[1] if len(parts) > 1 else parts[0])
    text = spec.split(":", 1)[1] if spec.startswith(("file:", "url:")) else spec
    return slug(Path(text.split("?")[0]).stem)


def dataset_of(record: Mapping[str, Any]) -> str:
    """The dataset a completion record belongs to: its `dataset`, or (a record written before runs had
    several datasets) the name of its source."""
    return str(record.get("dataset") or dataset_name(str(record.get("source") or "")))


def read_datasets(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's datasets.json entries. A run folder from before datasets.json: one entry named from
    run.json's `data.spec`, role "train" ([] when run.json records no data either)."""
    path = datasets_path(run_dir)
    if path.exists():
        try:
            return list(json.loads(path.read_text())["datasets"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a datasets.json ({err}); fix or delete it") from err
    data = read_run_json(run_dir).get("data") or {}
    if not data.get("spec"):
        return []
    spec = str(data["spec"])
    return [
        {
            "name": dataset_name(spec),
            "spec": spec,
            "role": "train",
            "kind": "prompts",
            "policy": "on-policy",
            "source": spec,
            "licence": OURS if spec.startswith("builtin:") else "not recorded",
            "label_by": data.get("label_by") or "judge",
            "n_prompts": int(data.get("n_prompts") or 0),
        }
    ]


def write_datasets(
    run_dir: str | os.PathLike, datasets: Iterable[RunDataset], *, add: bool = False
) -> list[dict[str, Any]]:
    """Declare the run's datasets in datasets.json (entries of datasets not named again are kept).

    A run folder that already holds completions keeps them apart: a dataset it does not declare yet (or
    one declared with another spec) is refused unless `add=True`, so two experiments never mix silently
    in one completions.jsonl. Nothing is written when refusing."""
    new = list(datasets)
    names = [d.name for d in new]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"two datasets of this run are named {dup}: give one a different 'name'")
    old = {e["name"]: e for e in read_datasets(run_dir)}
    used = {dataset_of(r) for r in read_completions(run_dir)}
    for name in used - set(old):  # records written before datasets.json, with no run.json data either
        old[name] = {"name": name, "spec": "", "role": "train", "kind": "prompts", "label_by": "judge"}
    if used and not add:
        clash = [d.name for d in new if d.name not in old or (old[d.name].get("spec") not in ("", d.spec))]
        if clash:
            raise NotebookError(
                f"{Path(run_dir)} already holds completions of {sorted(used)}, and this run adds {clash}, "
                f"which its datasets.json does not declare (declared: {sorted(old)}). Completions of "
                "different experiments must not mix silently. Use a new RUN_NAME, or, to add them to this "
                "run on purpose, set ADD_TO_RUN = True in notebook 02 (collect.write_datasets(run_dir, "
                "datasets, add=True)), or OVERWRITE = True to replace them. Nothing was changed."
            )
    entries = {**old, **{d.name: d.entry() for d in new}}
    for e in entries.values():
        if e.get("spec") == "":
            e["spec"] = e["source"] = e["name"]
            e.setdefault("licence", "not recorded")
            e.setdefault("policy", "on-policy")
            e.setdefault("n_prompts", 0)
    atomic_write_json(datasets_path(run_dir), {"datasets": list(entries.values())})
    return list(entries.values())


def check_declared(run_dir: str | os.PathLike, names: Iterable[str]) -> None:
    """Refuse to append completions of a dataset that datasets.json does not declare (when the run folder
    already holds completions), naming the fix."""
    declared = {e["name"] for e in read_datasets(run_dir)}
    records = read_completions(run_dir)
    declared |= {dataset_of(r) for r in records} if not datasets_path(run_dir).exists() else set()
    missing = sorted(set(names) - declared)
    if records and missing:
        raise ValueError(
            f"{Path(run_dir)} already holds completions, and datasets {missing} are not declared in its "
            f"datasets.json ({sorted(declared)}): call collect.write_datasets(run_dir, datasets) first (it "
            "says how to add datasets on purpose), or use a new RUN_NAME. Nothing was appended."
        )
