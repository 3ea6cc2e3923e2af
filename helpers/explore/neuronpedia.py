"""A Neuronpedia-ready export of the run's SAEs, built from the explorer's per-feature pages (site.py),
so the export and the explorer show the same numbers (REFERENCE.md "SAE field, late 2026").

Layout: the bulk-import layout that Neuronpedia's `neuronpedia-utils` converters write and its admin
import route reads, one folder per source (`<model_id>/<layer>-<set_id>`), plus the SAELens weights:

    neuronpedia/README.md                             how to submit it (written by `export_neuronpedia`)
    neuronpedia/<model_id>/<layer>-<set_id>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl     one record each
        features/batch-<k>.jsonl.gz                   one record per latent (`Neuron` in their database)
        activations/batch-<k>.jsonl.gz                the example windows of those latents
        explanations/batch-0.jsonl.gz                 notebook 04's explanations (when there are any)
    neuronpedia/saelens/<sae_id>/                     cfg.json + sae_weights.safetensors (SAELens 6.x)

`REQUIRED` lists, per record type, the fields Neuronpedia's schema has no default for (neuronpedia-utils
`db_models`, Aug 2026), with their JSON types; `validate_export` checks every record of an export
against it, and the layout. Field names are theirs (camelCase, some snake_case).

Mapping: `maxActApprox` = the largest activation seen; `frac_nonzero` = the firing rate over the
scanned completion tokens; the frequency histogram = our activation histogram (bar centres, counts);
`pos_str`/`neg_str` = the logit effects; `topkCosSimIndices` = nearest decoder rows in the same SAE.
An activation record is one window (our windows are short: `before` + 1 + `after` tokens of the
completion, not whole 128-token prompts); quantile-group windows carry `binMin`/`binMax`. The top windows
in the reference corpus follow (where the run stored one with its token ids), `dataSource` naming their
corpus sequence (`corpus:seq000000042`) and `dataIndex` the token's position in it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from helpers.explore.site import iter_pages, sae_info
from helpers.release import __version__
from helpers.run import (
    SAE_CFG,
    SAE_SPARSITY,
    SAE_WEIGHTS,
    atomic_write_bytes,
    id_part,
    neuronpedia_dir,
    read_run_json,
    sae_dir,
)

STR, INT, NUM, BOOL, LIST = (str,), (int,), (int, float), (bool,), (list,)
REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    "release": {"name": STR, "description": STR, "creatorName": STR, "creatorId": STR},
    "model": {"id": STR, "instruct": BOOL, "creatorId": STR},
    "sourceset": {"modelId": STR, "name": STR, "creatorId": STR},
    "source": {"id": STR, "modelId": STR, "setName": STR, "creatorId": STR},
    "feature": {"modelId": STR, "layer": STR, "index": STR},
    "activation": {
        "id": STR,
        "tokens": LIST,
        "index": STR,
        "layer": STR,
        "modelId": STR,
        "maxValue": NUM,
        "maxValueTokenIndex": INT,
        "minValue": NUM,
        "values": LIST,
        "creatorId": STR,
    },  # fmt: skip
    "explanation": {
        "id": STR,
        "modelId": STR,
        "layer": STR,
        "index": STR,
        "description": STR,
        "authorId": STR,
    },
}
"""Per record type: the fields without a default in Neuronpedia's schema, and their JSON types."""
FEATURES_PER_BATCH = 1024
CREATOR_ID = "REPLACE-with-your-Neuronpedia-creator-id"
"""Neuronpedia's database id of the uploader; their team fills it in when they import a submission."""


def model_id_of(run_dir: str | os.PathLike) -> str:
    """A Neuronpedia model id from run.json's model: the Hub name's last part, lower case."""
    spec = (read_run_json(run_dir).get("model") or {}).get("spec") or "model"
    return id_part(spec.rstrip("/").split("/")[-1].split(":")[-1]).lower()


def set_id_of(info: dict[str, Any]) -> str:
    """A source-set id for an SAE: its sae_id without the model and layer parts, plus its width
    (`smollm2_topk_L15_mixed` with d_sae 4608 -> `dsl-topk-mixed-4608`); alphanumeric and dashes."""
    parts = [p for p in str(info["sae_id"]).split("_")[1:] if not (p.startswith("L") and p[1:].isdigit())]
    return "-".join(["dsl", *[id_part(p).lower().replace(".", "-") for p in parts], str(info["d_sae"])])


def _cuid(*parts: Any) -> str:
    """A deterministic 25-character id shaped like Neuronpedia's (a 'c' then hex)."""
    return "c" + hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:24]


def _jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode()
    atomic_write_bytes(path, gzip.compress(body, compresslevel=6, mtime=0))


def _activations(page: dict[str, Any], common: dict[str, Any]) -> Iterator[dict[str, Any]]:
    groups = [(None, ex) for ex in page["top"]] + [(g, ex) for g in page["quantiles"] for ex in g["examples"]]
    groups += [(None, ex) for ex in (page.get("corpus") or {}).get("top", [])]
    for i, (g, ex) in enumerate(groups):
        values = [float(v) for v in ex["acts"]]
        top = max(range(len(values)), key=values.__getitem__)
        yield {
            "id": _cuid(common["layer"], page["feature"], i),
            "tokens": ex["tokens"],
            "index": str(page["feature"]),
            "values": values,
            "maxValue": values[top],
            "maxValueTokenIndex": top,
            "minValue": min(values),
            "binMin": None if g is None else g["lo"],
            "binMax": None if g is None else g["hi"],
            "binContains": None if g is None else 1 / max(len(page["quantiles"]), 1),
            "qualifyingTokenIndex": ex["center"],
            "dataSource": f"corpus:{ex['sequence_id']}" if "sequence_id" in ex else ex["completion_id"],
            "dataIndex": str(ex["position"]),
            **common,
        }


def _feature(page: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    h = page["histogram"]
    n = len(h["counts"])
    width = (h["max"] or 0) / max(n, 1)
    logits = page.get("logits") or {"positive": [], "negative": []}
    return {
        "index": str(page["feature"]),
        "maxActApprox": page["max_activation"] or 0,
        "hasVector": False,
        "frac_nonzero": page["firing_rate"] or 0,
        "freq_hist_data_bar_heights": [float(c) for c in h["counts"]],
        "freq_hist_data_bar_values": [round(width * (i + 0.5), 6) for i in range(n)],
        "pos_str": [t for t, _ in logits["positive"]],
        "pos_values": [v for _, v in logits["positive"]],
        "neg_str": [t for t, _ in logits["negative"]],
        "neg_values": [v for _, v in logits["negative"]],
        "topkCosSimIndices": [j for j, _ in page["similar"]],
        "topkCosSimValues": [c for _, c in page["similar"]],
        **common,
    }


def export_sae(
    run_dir: str | os.PathLike,
    sae_id: str,
    *,
    release: str,
    creator_name: str,
    creator_id: str = CREATOR_ID,
    model_id: str | None = None,
    hf_repo_id: str | None = None,
    include_weights: bool = True,
) -> Path:
    """Export one SAE whose explorer data are complete (module doc); returns its source folder."""
    run_dir = Path(run_dir)
    info = sae_info(run_dir, sae_id)
    run = read_run_json(run_dir)
    model_id = model_id or model_id_of(run_dir)
    set_id = set_id_of(info)
    source_id = f"{info['layer']}-{set_id}"
    out = neuronpedia_dir(run_dir) / model_id / source_id
    now = datetime.now(UTC).isoformat(timespec="seconds")
    creator = {"creatorId": creator_id, "createdAt": now}
    desc = f"Residual stream, layer {info['layer']}: {info['architecture']} SAE ({sae_id}), {info['d_sae']} latents"
    meta = {
        "release": {"name": release, "description": f"Deception SAEs of {model_id} (deception-sae-lab)",
                    "descriptionShort": "deception-sae-lab", "creatorName": creator_name, "urls": [], **creator},
        "model": {"id": model_id, "instruct": True, "displayName": (run.get("model") or {}).get("spec") or model_id,
                  "displayNameShort": model_id, "layers": int((run.get("model") or {}).get("n_layers") or 0),
                  "dimension": info["d_in"], "neuronsPerLayer": info["d_in"], **creator},
        "sourceset": {"modelId": model_id, "name": set_id, "description": desc, "creatorName": creator_name,
                      "releaseName": release, "visibility": "PUBLIC", "type": "saelens", **creator},
        "source": {"id": source_id, "modelId": model_id, "setName": set_id, "hasDashboards": True,
                   "saelensSaeId": sae_id, "hfRepoId": hf_repo_id, "hfFolderId": sae_id if hf_repo_id else None,
                   "dataset": "deception-sae-lab completions (honest / deceptive answers of the model itself)",
                   "num_prompts": info["n_completions"], "notes": info.get("logit_note"), **creator},
    }  # fmt: skip
    for name, record in meta.items():
        atomic_write_bytes(out / f"{name}.jsonl", (json.dumps(record, ensure_ascii=False) + "\n").encode())
    common = {"modelId": model_id, "layer": source_id, **creator}
    features, acts, explanations, k = [], [], [], 0
    for page in iter_pages(run_dir, sae_id):
        features.append(_feature(page, common))
        acts.extend(_activations(page, common))
        a = page.get("analysis") or {}
        if a.get("explanation"):
            notes = {key: a.get(key) for key in ("deception_related", "kind", "cohens_d", "d_ci", "q_value",
                                                 "detection", "fuzzing")}  # fmt: skip
            explanations.append({"id": _cuid(source_id, page["feature"], "explanation"), "modelId": model_id,
                                 "layer": source_id, "index": str(page["feature"]), "description": a["explanation"],
                                 "authorId": creator_id, "typeName": "deception-sae-lab-autointerp",
                                 "explanationModelName": str(a.get("explanation_source") or ""),
                                 "notes": json.dumps(notes), "createdAt": now})  # fmt: skip
        if len(features) == FEATURES_PER_BATCH:
            _jsonl_gz(out / "features" / f"batch-{k}.jsonl.gz", features)
            _jsonl_gz(out / "activations" / f"batch-{k}.jsonl.gz", acts)
            features, acts, k = [], [], k + 1
    if features:
        _jsonl_gz(out / "features" / f"batch-{k}.jsonl.gz", features)
        _jsonl_gz(out / "activations" / f"batch-{k}.jsonl.gz", acts)
    if explanations:
        _jsonl_gz(out / "explanations" / "batch-0.jsonl.gz", explanations)
    if include_weights:
        dst = neuronpedia_dir(run_dir) / "saelens" / sae_id
        dst.mkdir(parents=True, exist_ok=True)
        for name in (SAE_CFG, SAE_WEIGHTS, SAE_SPARSITY):
            if (sae_dir(run_dir, sae_id) / name).exists():
                shutil.copyfile(sae_dir(run_dir, sae_id) / name, dst / name)
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def validate_export(folder: str | os.PathLike) -> dict[str, int]:
    """Check a source folder (`<model_id>/<layer>-<set_id>`): the four metadata files and at least one
    features batch exist, every record has `REQUIRED`'s fields with their types, ids are unique, and
    every activation and explanation belongs to an exported feature of this source. Returns record
    counts; raises ValueError listing the first problems."""
    folder = Path(folder)
    problems: list[str] = []
    counts: dict[str, int] = {}
    seen_ids: set[str] = set()

    def check(kind: str, rec: dict[str, Any], where: str) -> None:
        for name, types in REQUIRED[kind].items():
            value = rec.get(name)
            if (
                value is None
                or (types is not BOOL and isinstance(value, bool))
                or not isinstance(value, types)
            ):
                problems.append(
                    f"{where}: {kind} field {name!r} is {value!r}, needs {'/'.join(t.__name__ for t in types)}"
                )
        if kind in ("activation", "explanation"):
            if rec.get("id") in seen_ids:
                problems.append(f"{where}: duplicate id {rec.get('id')!r}")
            seen_ids.add(rec.get("id"))

    for kind in ("release", "model", "sourceset", "source"):
        path = folder / f"{kind}.jsonl"
        if not path.exists():
            problems.append(f"{path.name} is missing")
            continue
        recs = _records(path)
        if len(recs) != 1:
            problems.append(f"{path.name} holds {len(recs)} records, needs 1")
        for rec in recs:
            check(kind, rec, path.name)
        counts[kind] = len(recs)
    source = (_records(folder / "source.jsonl") or [{}])[0] if (folder / "source.jsonl").exists() else {}
    if source and source.get("id") != folder.name:
        problems.append(f"source id {source.get('id')!r} differs from its folder name {folder.name!r}")
    indices: set[str] = set()
    for sub, kind in (
        ("features", "feature"),
        ("activations", "activation"),
        ("explanations", "explanation"),
    ):
        paths = sorted((folder / sub).glob("batch-*.jsonl.gz"))
        if sub == "features" and not paths:
            problems.append("features/ holds no batch-*.jsonl.gz")
        counts[sub] = 0
        for path in paths:
            for n, rec in enumerate(_records(path)):
                where = f"{sub}/{path.name} line {n + 1}"
                check(kind, rec, where)
                if rec.get("layer") != folder.name:
                    problems.append(f"{where}: layer {rec.get('layer')!r} is not the source {folder.name!r}")
                if kind == "feature":
                    indices.add(rec.get("index"))
                elif rec.get("index") not in indices:
                    problems.append(f"{where}: index {rec.get('index')!r} is not an exported feature")
                if kind == "activation" and len(rec.get("tokens") or []) != len(rec.get("values") or []):
                    problems.append(f"{where}: {len(rec['tokens'])} tokens but {len(rec['values'])} values")
                counts[sub] += 1
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(f"{folder} is not a valid Neuronpedia export:\n" + "\n".join(problems[:10]) + more)
    return counts


README = """# Neuronpedia export of run `{run}`

Written by deception-sae-lab {version} (notebook 06). One folder per SAE ("source"), in the bulk-import
layout that Neuronpedia's own converters (`neuronpedia-utils`) write and its admin import reads:

{sources}

`saelens/<sae_id>/` holds each SAE's SAELens 6.x weights (`cfg.json`, `sae_weights.safetensors`): load
them with `sae_lens.SAE.load_from_disk`.

What the records hold: per latent its largest activation, firing rate over the run's completion tokens,
activation histogram, logit effects ({logit_note}) and nearest latents by decoder cosine; per latent its
top activating windows (one per completion), windows from quantile groups of its activations and, where
the run stored a reference corpus with its text, its top windows in that corpus (`dataSource`
`corpus:<sequence id>`); notebook 04's explanations (Gemini) where there are any, with the effect size
and scores in each explanation's `notes`. Every record was checked against the fields Neuronpedia's schema requires
(`helpers.explore.neuronpedia.validate_export`).

## Submitting it

1. Publish the SAEs to the Hugging Face Hub (notebook 05's `publish_saes`, or upload `saelens/`), and
   put the repo id in each `source.jsonl` (`hfRepoId`, `hfFolderId`) if it is not there yet.
2. Replace `creatorId` / `authorId` (`{creator_id}`) with your Neuronpedia user id, or leave it for
   Neuronpedia's team.
3. Neuronpedia's README (section "I Want to Generate My Own Dashboards/Data and Add It to Neuronpedia")
   says that exports go into the public `neuronpedia-datasets` bucket through their team: contact them
   (the README gives the address) with a link to this folder (a zip or a Hugging Face dataset).
4. To look at it yourself first: run a local Neuronpedia (their README's quick start), copy this folder
   under its dataset path as `<model_id>/<source_id>/`, and call its admin import
   (`/api/admin/import?modelId=<model_id>&sourceId=<source_id>`).

Our windows are short (`before` + 1 + `after` tokens of the model's own answers, or of the reference
corpus), not 128-token prompts; the model id (`{model_id}`) may need to match a model Neuronpedia already hosts.
"""


def export_neuronpedia(
    run_dir: str | os.PathLike,
    sae_ids: list[str],
    *,
    release: str = "deception-sae-lab",
    creator_name: str = "deception-sae-lab user",
    creator_id: str = CREATOR_ID,
    model_id: str | None = None,
    hf_repo_id: str | None = None,
    include_weights: bool = True,
) -> list[dict[str, Any]]:
    """Export the SAEs `sae_ids` (their explorer data must be complete), validate every source folder,
    and write the README; returns one summary row per SAE."""
    if not sae_ids:
        raise ValueError("sae_ids is empty: pass the SAEs to export (build_explorer's rows name them)")
    rows, sources = [], []
    for sid in sae_ids:
        folder = export_sae(run_dir, sid, release=release, creator_name=creator_name, creator_id=creator_id,
                            model_id=model_id, hf_repo_id=hf_repo_id, include_weights=include_weights)  # fmt: skip
        counts = validate_export(folder)
        rel = folder.relative_to(neuronpedia_dir(run_dir))
        sources.append(f"- `{rel}/`: `{sid}`")
        rows.append({"sae_id": sid, "source": str(rel), "features": counts["features"],
                     "activations": counts["activations"], "explanations": counts["explanations"], "valid": True})  # fmt: skip
    info = sae_info(run_dir, sae_ids[0])
    text = README.format(run=Path(run_dir).name, version=__version__, sources="\n".join(sources),
                         logit_note=info.get("logit_note") or "not computed: the model was not loaded",
                         creator_id=creator_id, model_id=model_id or model_id_of(run_dir))  # fmt: skip
    atomic_write_bytes(neuronpedia_dir(run_dir) / "README.md", text.encode())
    return rows
