"""A Neuronpedia-ready export of the run's SAEs, built from the explorer's per-feature pages (site.py),
so the export and the explorer show the same numbers (REFERENCE.md "SAE field, late 2026").

Layout: the bulk-import layout that Neuronpedia's `neuronpedia-utils` converters write and its admin
import route reads, one folder per source (`<model_id>/<layer>-<set_id>`), plus the SAELens weights:

    neuronpedia/README.md                             how to submit it (written by `export_neuronpedia`)
    neuronpedia/<model_id>/<layer>-<set_id>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl     one record each
        features/batch-<k>.jsonl.gz                   one record per latent (`Neuron` in their database)
        activations/batch-<k>.jsonl.gz                the example windows of those latents
        explanations-pending/batch-0.jsonl.gz         notebook 04's explanations (README: what to ask first)
    neuronpedia/upload-batch/<model_id>/<layer>-<set_id>/batch-<k>.json
                                                      the same features as bodies of Neuronpedia's self-serve
                                                      `POST /api/feature/upload-batch` (<= 128 features each)
    neuronpedia/saelens/<sae_id>/                     cfg.json + sae_weights.safetensors (SAELens 6.x)

The self-serve route (`UPLOAD_SOURCE`, `apps/webapp/app/api/feature/upload-batch/route.tsx`) serves a user
with an API key and no contact with Neuronpedia's team: `POST /api/model/new` (when the model is not on
Neuronpedia), `POST /api/source-set/new` (creates the sources `<layer>-<set name>` of every layer,
UNLISTED, owned by the caller), then one upload-batch call per file. It stores less than the bulk layout:
per feature its density, top / bottom logits, explanations (method and model names must be ones
Neuronpedia already has, so ours go without them) and windows (`quantileMin/Max/Fraction` become
binMin/binMax/binContains); no histograms, no decoder neighbours, and a feature needs at least one window.
`UPLOAD_SCHEMA` holds the route's request schema (tests/explore/neuronpedia_upload_batch_schema.json is the
derivation, a test keeps the two equal) and `validate_upload_batch` checks a body against it.

`SCHEMA` holds, per record type, the columns of Neuronpedia's schema that the export writes or that the
schema requires (hijohnnylin/neuronpedia at `SCHEMA_SOURCE`; tests/explore/neuronpedia_schema.json
is the full derivation and a test keeps the two equal); `validate_export` checks every record and the
admin import's own rules against it. Field names are theirs (camelCase, some snake_case).

Mapping: `frac_nonzero` = the firing rate over the scanned completion tokens; the frequency histogram =
our activation histogram (bar centres from the smallest nonzero activation, counts); the logit histogram
(`logits_hist_data_*`) = the decoder row's logit weights over the vocabulary (bar centres, counts; empty
lists when the explorer was built without the model); `pos_str`/`neg_str` = the logit effects;
`topkCosSimIndices` = nearest decoder rows in the same SAE; `maxActApprox` = the largest activation seen
or exported. An activation record is one window (our windows are short: `before` + 1
+ `after` tokens, not whole 128-token prompts); top windows carry binMin = binContains = -1 and binMax =
`maxActApprox` (SAEDashboard's marker), quantile-group windows their interval and the share of all
scanned tokens in it. Features that fire nowhere are left out by default. The top windows
in the reference corpus follow (where the run stored one with its token ids), `dataSource` naming their
corpus sequence (`corpus:seq000000042`) and `dataIndex` the token's position in it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
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
    model_record,
    neuronpedia_dir,
    override_fields,
    sae_dir,
)

SCHEMA_SOURCE = "hijohnnylin/neuronpedia@ebb8426fc550ad5d1f76d52c271a624af3c08a57"
"""The commit whose `apps/webapp/prisma/schema.prisma` and admin import (`app/api/admin/import/route.ts`,
`lib/db/import.ts`) `SCHEMA` follows (tests/explore/neuronpedia_schema.json holds the whole derivation)."""


def _cols(spec: str) -> dict[str, dict[str, Any]]:
    """`"name:String tags:String[] notes:String? visibility:Visibility=PRIVATE"` ->
    the fixture's column shape."""
    out = {}
    for item in spec.split():
        name, typ = item.split(":")
        typ, _, default = typ.partition("=")
        out[name] = {
            "type": typ.rstrip("[]?"),
            "list": "[]" in typ,
            "nullable": typ.endswith("?"),
            "default": default or None,
        }
    return out


_WHO = "creatorId:String createdAt:DateTime=now()"
SCHEMA: dict[str, Any] = {
    "files": {
        "release": "SourceRelease",
        "model": "Model",
        "sourceset": "SourceSet",
        "source": "Source",
        "feature": "Neuron",
        "activation": "Activation",
        "explanation": "Explanation",
    },
    "enums": {"Visibility": ["PUBLIC", "UNLISTED", "PRIVATE"]},
    "models": {
        "SourceRelease": {
            "columns": _cols(
                f"name:String description:String descriptionShort:String? urls:String[] "
                f"creatorName:String visibility:Visibility=PRIVATE {_WHO}"
            )
        },
        "Model": {
            "columns": _cols(
                f'id:String instruct:Boolean=false displayName:String="" '
                f'displayNameShort:String="" layers:Int neuronsPerLayer:Int dimension:Int? '
                f"owner:String visibility:Visibility=PRIVATE {_WHO}"
            )
        },
        "SourceSet": {
            "columns": _cols(
                f"modelId:String name:String description:String creatorName:String "
                f'releaseName:String? visibility:Visibility=PRIVATE type:String="" {_WHO}'
            )
        },
        "Source": {
            "columns": _cols(
                f"id:String modelId:String setName:String hasDashboards:Boolean=true "
                f"saelensSaeId:String? hfRepoId:String? hfFolderId:String? dataset:String? "
                f"num_prompts:Int? notes:String? visibility:Visibility=PRIVATE {_WHO}"
            )
        },
        "Neuron": {
            "columns": _cols(
                "modelId:String layer:String index:String creatorId:String? createdAt:DateTime=now() "
                "maxActApprox:Float?=0 hasVector:Boolean=false frac_nonzero:Float=0 "
                "freq_hist_data_bar_heights:Float[]=[] freq_hist_data_bar_values:Float[]=[] "
                "logits_hist_data_bar_heights:Float[]=[] logits_hist_data_bar_values:Float[]=[] "
                "pos_str:String[]=[] pos_values:Float[]=[] neg_str:String[]=[] neg_values:Float[]=[] "
                "topkCosSimIndices:Int[]=[] topkCosSimValues:Float[]=[]"
            )
        },
        "Activation": {
            "columns": _cols(
                "id:String=cuid() tokens:String[] index:String layer:String modelId:String values:Float[] "
                "maxValue:Float maxValueTokenIndex:Int minValue:Float binMin:Float? binMax:Float? "
                f"binContains:Float? qualifyingTokenIndex:Int? dataSource:String? dataIndex:String? {_WHO}"
            )
        },
        "Explanation": {
            "columns": _cols(
                "id:String=cuid() modelId:String layer:String index:String "
                "description:String authorId:String notes:String? typeName:String? "
                "explanationModelName:String? createdAt:DateTime=now()"
            )
        },
    },
}
"""The columns of Neuronpedia's schema our export writes, plus every column it requires (not nullable, no
default, not a list), per record type, in the shape of tests/explore/neuronpedia_schema.json (a test keeps
them equal). `validate_export` checks records against it or against a fuller schema of the same shape."""
VISIBILITIES = ("PUBLIC", "UNLISTED", "PRIVATE")
EXPLANATIONS_PENDING = "explanations-pending"
"""Where explanations go: the admin import reads only `explanations/`, and their `typeName` /
`explanationModelName` are foreign keys to rows Neuronpedia's team creates (README of the export)."""
EXPLANATION_TYPE = "deception-sae-lab_contrast"
FEATURES_PER_BATCH = 1024
CREATOR_ID = "REPLACE-with-your-Neuronpedia-creator-id"
"""Neuronpedia's database id of the uploader; their team fills it in when they import a submission."""


UPLOAD_SOURCE = "hijohnnylin/neuronpedia@ebb8426fc550ad5d1f76d52c271a624af3c08a57"
"""The commit whose `apps/webapp/app/api/feature/upload-batch/route.tsx` (and the source-set / model
routes it depends on) `UPLOAD_SCHEMA` follows."""
UPLOAD_BATCH = "upload-batch"
EMPTY_TOKEN = "\u200b"
"""What an empty token piece is sent as (the route requires non-empty strings): a zero-width space."""
# Fields the upload schema repeats (the same yup rule under several keys).
_LOGITS: dict[str, Any] = {
    "type": "array",
    "required": False,
    "nullable": True,
    "max": 20,
    "of": {
        "type": "object",
        "fields": {
            "token": {"type": "string", "required": True},
            "value": {"type": "number", "required": True},
        },
    },
}
_OPTIONAL_NAME: dict[str, Any] = {"type": "string", "required": False, "nullable": True, "lowercase": True}
_QUANTILE_BOUND: dict[str, Any] = {"type": "number", "required": False, "nullable": True, "max": 99999999}


def _per_token(kind: str) -> dict[str, Any]:
    """One value of `kind` per token of an activation record (1 to 1024 of them)."""
    return {"type": "array", "required": True, "min": 1, "max": 1024, "of": {"type": kind, "required": True}}


UPLOAD_SCHEMA: dict[str, Any] = {
    "route": {
        "method": "POST",
        "path": "/api/feature/upload-batch",
        "auth_header": "x-api-key",
        "max_features": 128,
    },
    "body": {
        "type": "object",
        "fields": {
            "modelId": {"type": "string", "required": True, "lowercase": True},
            "source": {"type": "string", "required": True, "lowercase": True},
            "features": {
                "type": "array",
                "required": True,
                "min": 1,
                "max": 128,
                "of": {
                    "type": "object",
                    "fields": {
                        "index": {
                            "type": "number",
                            "integer": True,
                            "required": True,
                            "min": 0,
                            "max": 10000000,
                        },
                        "density": {"type": "number", "required": False, "min": 0, "max": 1},
                        "topLogits": _LOGITS,
                        "bottomLogits": _LOGITS,
                        "explanations": {
                            "type": "array",
                            "required": False,
                            "of": {
                                "type": "object",
                                "fields": {
                                    "text": {"type": "string", "required": True, "min": 1, "max": 512},
                                    "methodName": _OPTIONAL_NAME,
                                    "modelName": _OPTIONAL_NAME,
                                },
                            },
                        },
                        "activations": {
                            "type": "array",
                            "required": True,
                            "min": 1,
                            "of": {
                                "type": "object",
                                "fields": {
                                    "tokens": _per_token("string"),
                                    "values": _per_token("number"),
                                    "quantileMax": _QUANTILE_BOUND,
                                    "quantileMin": _QUANTILE_BOUND,
                                    "quantileFraction": {
                                        "type": "number",
                                        "required": False,
                                        "nullable": True,
                                        "min": 0,
                                        "max": 1,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "prerequisites": {
        "model": {
            "route": "POST /api/model/new",
            "when": "the model id is not on Neuronpedia yet",
            "id_pattern": "^[a-z][a-z0-9.-]*[a-z0-9]$|^[a-z]$",
            "id_min": 2,
            "id_max": 32,
            "id_forbids": ["--", ".."],
            "layers_min": 1,
            "layers_max": 127,
        },
        "source_set": {
            "route": "POST /api/source-set/new",
            "body": ["name", "modelId", "description", "url"],
            "name_pattern": "^[a-z][a-z0-9-]*[a-z0-9]$|^[a-z0-9]$",
            "name_forbids": ["--"],
            "name_not": ["neurons"],
            "description_max": 128,
            "visibility": "UNLISTED",
            "creates_sources": "{layer}-{name} for every layer 0 .. model.layers - 1",
        },
    },
}
"""The self-serve upload route's request body (yup schema as JSON: type, required, nullable, min / max,
integer, lowercase) and what must exist before the call, from `UPLOAD_SOURCE`."""


def model_id_of(run_dir: str | os.PathLike) -> str:
    """A Neuronpedia model id from run.json's model: the Hub name's last part, lower case."""
    spec = model_record(run_dir, required=False).get("spec") or "model"
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


def release_name_of(run_dir: str | os.PathLike, sae_ids: list[str], creator_name: str) -> str:
    """A release name unique per user and run (`SourceRelease.name` is unique across Neuronpedia):
    `dsl-<run folder>-<model id>-<hash>`, the hash over the creator and the SAEs' weights."""
    h = hashlib.sha1(creator_name.encode())
    for sid in sorted(sae_ids):
        h.update(sid.encode())
        path = sae_dir(run_dir, sid) / SAE_WEIGHTS
        if path.exists():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    name = f"dsl-{id_part(Path(run_dir).name)}-{model_id_of(run_dir)}-{h.hexdigest()[:8]}"
    return name.lower()


def model_owner_of(run_dir: str | os.PathLike) -> str | None:
    """`Model.owner` (required by Neuronpedia): the Hub organisation of run.json's model, if it names one."""
    spec = model_record(run_dir, required=False).get("spec") or ""
    parts = spec.split(":")[-1].strip("/").split("/")
    return parts[0] if len(parts) == 2 and parts[0] and not spec.startswith((".", "/", "~")) else None


def _max_act(page: dict[str, Any]) -> float:
    """`maxActApprox`: the largest activation among the page's statistics and every exported window, so no
    window exceeds it (the corpus windows may exceed the completions' maximum)."""
    windows = page["top"] + [ex for g in page["quantiles"] for ex in g["examples"]]
    windows += (page.get("corpus") or {}).get("top", [])
    return max([float(page["max_activation"] or 0)] + [float(v) for ex in windows for v in ex["acts"]])


def _fires(page: dict[str, Any]) -> bool:
    return bool(page.get("n_firing")) or bool((page.get("corpus") or {}).get("n_firing"))


def _binned_windows(
    page: dict[str, Any], max_act: float, keys: tuple[str, str, str], *, top_share: float | None
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each example window of a dashboard page with its bin under `keys` (low, high, share): top windows
    (completions', then the reference corpus's) get low -1, high the feature's max and `top_share`;
    quantile windows their interval and the share of ALL scanned tokens that fall in it (the groups hold
    equal shares of the firings, or `count` firings where a group says so)."""
    low, high, share_key = keys
    top = {low: -1.0, high: max_act, share_key: top_share}
    windows = [(top, ex) for ex in page["top"] + (page.get("corpus") or {}).get("top", [])]
    n_groups = max(len(page["quantiles"]), 1)
    for g in page["quantiles"]:
        share = g["count"] / max(page["n_firing"], 1) if "count" in g else 1 / n_groups
        binned = {
            low: float(g["lo"]),
            high: float(g["hi"]),
            share_key: float(page["firing_rate"] or 0) * share,
        }
        windows += [(binned, ex) for ex in g["examples"]]
    return windows


def _activations(page: dict[str, Any], common: dict[str, Any], max_act: float) -> Iterator[dict[str, Any]]:
    # Top windows carry SAEDashboard's marker binMin = -1, binContains = -1: Neuronpedia lists them under
    # "Top Activations".
    groups = _binned_windows(page, max_act, ("binMin", "binMax", "binContains"), top_share=-1.0)
    for i, (bins, ex) in enumerate(groups):
        values = [float(v) for v in ex["acts"]]
        at = max(range(len(values)), key=values.__getitem__)
        yield {
            "id": _cuid(common["layer"], page["feature"], i),
            "tokens": ex["tokens"],
            "index": str(page["feature"]),
            "values": values,
            "maxValue": values[at],
            "maxValueTokenIndex": at,
            "minValue": min(values),
            **bins,
            "qualifyingTokenIndex": ex["center"],
            "dataSource": f"corpus:{ex['sequence_id']}" if "sequence_id" in ex else ex["completion_id"],
            "dataIndex": str(ex["position"]),
            **common,
        }


def _bars(h: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    """(heights, centres) of a page's histogram ({min, max, counts}; min 0 in data of an older release)."""
    if not h:
        return [], []
    n, lo = len(h["counts"]), float(h.get("min") or 0)
    width = (float(h["max"] or 0) - lo) / max(n, 1)
    return [float(c) for c in h["counts"]], [round(lo + width * (i + 0.5), 6) for i in range(n)]


def _feature(page: dict[str, Any], common: dict[str, Any], max_act: float) -> dict[str, Any]:
    heights, values = _bars(page["histogram"])
    logit_heights, logit_values = _bars(page.get("logit_histogram"))
    logits = page.get("logits") or {"positive": [], "negative": []}
    return {
        "index": str(page["feature"]),
        "maxActApprox": max_act,
        "hasVector": False,
        "frac_nonzero": page["firing_rate"] or 0,
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": values,
        "logits_hist_data_bar_heights": logit_heights,
        "logits_hist_data_bar_values": logit_values,
        "pos_str": [t for t, _ in logits["positive"]],
        "pos_values": [v for _, v in logits["positive"]],
        "neg_str": [t for t, _ in logits["negative"]],
        "neg_values": [v for _, v in logits["negative"]],
        "topkCosSimIndices": [j for j, _ in page["similar"]],
        "topkCosSimValues": [c for _, c in page["similar"]],
        **common,
    }


@dataclass(frozen=True)
class ExportSettings:
    """Who publishes the export and what goes in it: the settings `export_neuronpedia` and `export_sae`
    share. Both accept a whole `settings=ExportSettings(...)` or single fields as keywords
    (`include_dead=True`), which win over it (`with_overrides`)."""

    creator_name: str = "deception-sae-lab user"
    creator_id: str = CREATOR_ID
    model_id: str | None = None
    """Neuronpedia's model id; None: `model_id_of(run_dir)`."""
    model_owner: str | None = None
    """Neuronpedia's required `Model.owner`; None: the model's Hub organisation, else `creator_name`."""
    visibility: str = "PUBLIC"
    hf_repo_id: str | None = None
    """The Hub repository holding the SAE weights, if published there."""
    include_weights: bool = True
    include_dead: bool = False
    """Also export the features that fire nowhere (completions or corpus)."""

    def __post_init__(self) -> None:
        if self.visibility not in VISIBILITIES:
            raise ValueError(
                f"visibility={self.visibility!r}: Neuronpedia's Visibility is one of {VISIBILITIES}"
            )

    def with_overrides(self, overrides: dict[str, Any]) -> ExportSettings:
        """These settings with the fields named in `overrides` replaced (unknown names are refused)."""
        return override_fields(self, overrides, "export settings")


def export_sae(
    run_dir: str | os.PathLike,
    sae_id: str,
    *,
    release: str,
    settings: ExportSettings | None = None,
    **overrides: Any,
) -> Path:
    """Export one SAE whose explorer data are complete (module doc); returns its source folder. Features that
    fire nowhere (completions or corpus) are left out unless `include_dead`. `settings` (default
    `ExportSettings()`), or any of its fields as keywords."""
    s = (settings or ExportSettings()).with_overrides(overrides)
    creator_name, creator_id, model_id, model_owner = s.creator_name, s.creator_id, s.model_id, s.model_owner
    visibility, hf_repo_id, include_weights, include_dead = (
        s.visibility,
        s.hf_repo_id,
        s.include_weights,
        s.include_dead,
    )
    run_dir = Path(run_dir)
    info = sae_info(run_dir, sae_id)
    recorded = model_record(run_dir, required=False)
    model_id = model_id or model_id_of(run_dir)
    owner = model_owner or model_owner_of(run_dir) or creator_name
    set_id = set_id_of(info)
    source_id = f"{info['layer']}-{set_id}"
    out = neuronpedia_dir(run_dir) / model_id / source_id
    if out.exists():
        shutil.rmtree(out)  # a rerun (e.g. without the dead features) leaves no stale batch behind
    now = datetime.now(UTC).isoformat(timespec="seconds")
    creator = {"creatorId": creator_id, "createdAt": now}
    desc = (
        f"Residual stream, layer {info['layer']}: {info['architecture']} SAE ({sae_id}), "
        f"{info['d_sae']} latents"
    )
    meta = {
        "release": {
            "name": release,
            "description": f"Deception SAEs of {model_id} (deception-sae-lab)",
            "descriptionShort": "deception-sae-lab",
            "creatorName": creator_name,
            "urls": [],
            "visibility": visibility,
            **creator,
        },
        "model": {
            "id": model_id,
            "instruct": True,
            "displayName": recorded.get("spec") or model_id,
            "displayNameShort": model_id,
            "layers": int(recorded.get("n_layers") or 0),
            "dimension": info["d_in"],
            "neuronsPerLayer": info["d_in"],
            "owner": owner,
            "visibility": visibility,
            **creator,
        },
        "sourceset": {
            "modelId": model_id,
            "name": set_id,
            "description": desc,
            "creatorName": creator_name,
            "releaseName": release,
            "visibility": visibility,
            "type": "saelens",
            **creator,
        },
        "source": {
            "id": source_id,
            "modelId": model_id,
            "setName": set_id,
            "hasDashboards": True,
            "saelensSaeId": sae_id,
            "hfRepoId": hf_repo_id,
            "hfFolderId": sae_id if hf_repo_id else None,
            "dataset": "deception-sae-lab completions (honest / deceptive answers of the model itself)",
            "num_prompts": info["n_completions"],
            "notes": info.get("logit_note"),
            "visibility": visibility,
            **creator,
        },
    }
    for name, record in meta.items():
        atomic_write_bytes(out / f"{name}.jsonl", (json.dumps(record, ensure_ascii=False) + "\n").encode())
    common = {"modelId": model_id, "layer": source_id, **creator}
    features, acts, explanations, k, n_dead = [], [], [], 0, 0
    for page in iter_pages(run_dir, sae_id):
        if not include_dead and not _fires(page):
            n_dead += 1
            continue
        max_act = _max_act(page)
        features.append(_feature(page, common, max_act))
        acts.extend(_activations(page, common, max_act))
        a = page.get("analysis") or {}
        if a.get("explanation"):
            notes = {
                key: a.get(key)
                for key in (
                    "deception_related",
                    "kind",
                    "cohens_d",
                    "d_ci",
                    "q_value",
                    "detection",
                    "fuzzing",
                    "explanation_source",
                )
            }
            explanations.append(
                {
                    "id": _cuid(source_id, page["feature"], "explanation"),
                    "modelId": model_id,
                    "layer": source_id,
                    "index": str(page["feature"]),
                    "description": a["explanation"],
                    "authorId": creator_id,
                    "typeName": EXPLANATION_TYPE,
                    "explanationModelName": id_part(str(a.get("explanation_source") or "unknown")),
                    "notes": json.dumps(notes),
                    "createdAt": now,
                }
            )
        if len(features) == FEATURES_PER_BATCH:
            _jsonl_gz(out / "features" / f"batch-{k}.jsonl.gz", features)
            _jsonl_gz(out / "activations" / f"batch-{k}.jsonl.gz", acts)
            features, acts, k = [], [], k + 1
    if features:
        _jsonl_gz(out / "features" / f"batch-{k}.jsonl.gz", features)
        _jsonl_gz(out / "activations" / f"batch-{k}.jsonl.gz", acts)
    elif k == 0:
        raise ValueError(
            f"no feature of {sae_id} fires on the run's data ({n_dead} never fire): nothing to export; "
            "pass include_dead=True to export them anyway"
        )
    if explanations:
        _jsonl_gz(out / EXPLANATIONS_PENDING / "batch-0.jsonl.gz", explanations)
    write_upload_batches(run_dir, sae_id, model_id=model_id, source_id=source_id, include_dead=include_dead)
    if include_weights:
        dst = neuronpedia_dir(run_dir) / "saelens" / sae_id
        dst.mkdir(parents=True, exist_ok=True)
        for name in (SAE_CFG, SAE_WEIGHTS, SAE_SPARSITY):
            if (sae_dir(run_dir, sae_id) / name).exists():
                shutil.copyfile(sae_dir(run_dir, sae_id) / name, dst / name)
    return out


def _token(t: str) -> str:
    return t or EMPTY_TOKEN


def _upload_feature(page: dict[str, Any], max_act: float) -> dict[str, Any] | None:
    """One feature of an upload-batch body (module doc), or None when it has no window to send (the route
    needs at least one)."""
    # quantileMin -1: "Top Activations"
    windows = _binned_windows(
        page, max_act, ("quantileMin", "quantileMax", "quantileFraction"), top_share=None
    )
    if not windows:
        return None
    logits = page.get("logits") or {"positive": [], "negative": []}
    a = page.get("analysis") or {}
    out: dict[str, Any] = {
        "index": int(page["feature"]),
        "density": float(page["firing_rate"] or 0),
        "topLogits": [{"token": _token(t), "value": float(v)} for t, v in logits["positive"][:20]],
        "bottomLogits": [{"token": _token(t), "value": float(v)} for t, v in logits["negative"][:20]],
        "activations": [
            {"tokens": [_token(t) for t in ex["tokens"]], "values": [float(v) for v in ex["acts"]], **bins}
            for bins, ex in windows
        ],
    }
    if a.get("explanation"):
        out["explanations"] = [{"text": a["explanation"][:512], "methodName": None, "modelName": None}]
    return out


def write_upload_batches(
    run_dir: str | os.PathLike, sae_id: str, *, model_id: str, source_id: str, include_dead: bool = False
) -> tuple[Path, int, int]:
    """The SAE's features as bodies of `POST /api/feature/upload-batch`, at most the route's 128 per file
    (module doc), each checked by `validate_upload_batch`; returns (folder, features written, features
    left out: never firing, or without a window to send)."""
    out = neuronpedia_dir(run_dir) / UPLOAD_BATCH / model_id / source_id
    if out.exists():
        shutil.rmtree(out)
    per = UPLOAD_SCHEMA["route"]["max_features"]
    batch, k, n, left_out = [], 0, 0, 0

    def flush() -> None:
        nonlocal batch, k
        body = {"modelId": model_id, "source": source_id, "features": batch}
        problems = validate_upload_batch(body)
        if problems:
            raise ValueError(
                f"upload batch {k} of {sae_id} breaks the route's schema:\n" + "\n".join(problems[:10])
            )
        atomic_write_bytes(
            out / f"batch-{k:04d}.json", json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        )
        batch, k = [], k + 1

    for page in iter_pages(run_dir, sae_id):
        feature = _upload_feature(page, _max_act(page)) if include_dead or _fires(page) else None
        if feature is None:
            left_out += 1
            continue
        batch.append(feature)
        n += 1
        if len(batch) == per:
            flush()
    if batch:
        flush()
    return out, n, left_out


def _yup(spec: dict[str, Any], value: Any, where: str, problems: list[str]) -> None:
    """Check `value` against one field of the route's yup schema as `UPLOAD_SCHEMA` writes it."""
    if value is None:  # absent or null (an object's null fields are checked by the object)
        if spec.get("required"):
            problems.append(f"{where} is missing or null; the route requires it")
        return
    typ, size = spec["type"], None
    if typ == "string":
        if not isinstance(value, str):
            return problems.append(f"{where} is {value!r}, needs a string")
        if spec.get("required") and value == "":
            problems.append(f"{where} is empty; the route requires a non-empty string")
        if spec.get("lowercase") and value != value.lower():
            problems.append(f"{where} {value!r} is lower-cased by the route: name it in lower case")
        size = len(value)
    elif typ == "number":
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or value != value
            or abs(value) == float("inf")
        ):
            return problems.append(f"{where} is {value!r}, needs a finite number")
        if spec.get("integer") and value != int(value):
            problems.append(f"{where} is {value!r}, needs an integer")
        size = value
    elif typ == "array":
        if not isinstance(value, list):
            return problems.append(f"{where} is {type(value).__name__}, needs a list")
        size = len(value)
        for i, item in enumerate(value):
            _yup(spec["of"], item, f"{where}[{i}]", problems)
    elif typ == "object":
        if not isinstance(value, dict):
            return problems.append(f"{where} is {type(value).__name__}, needs an object")
        for key in value.keys() - spec["fields"].keys():
            problems.append(f"{where}.{key} is not a field of the route (it would be dropped)")
        for key, sub in spec["fields"].items():
            if key in value or sub.get("required"):
                if key in value and value[key] is None and not sub.get("nullable"):
                    problems.append(f"{where}.{key} is null; the route takes it absent or {sub['type']}")
                    continue
                _yup(sub, value.get(key), f"{where}.{key}", problems)
    what = "long" if typ in ("string", "array") else ""
    if size is not None and "min" in spec and size < spec["min"]:
        problems.append(
            f"{where} is {size}{' ' + what if what else ''}, the route's minimum is {spec['min']}"
        )
    if size is not None and "max" in spec and size > spec["max"]:
        problems.append(
            f"{where} is {size}{' ' + what if what else ''}, the route's maximum is {spec['max']}"
        )


def validate_upload_batch(body: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """The problems (none: an empty list) that Neuronpedia's upload-batch route would find in `body`: its
    yup schema (`UPLOAD_SCHEMA`, or a schema of the same shape such as the test fixture), then the route's
    own checks: tokens and values of equal length, unique indexes, explanation method / model names left
    null (non-null ones must already exist on Neuronpedia), and a source `<layer>-<set name>` whose set
    name the source-set route accepts."""
    schema = schema or UPLOAD_SCHEMA
    problems: list[str] = []
    _yup(schema["body"], body, "body", problems)
    if problems:
        return problems
    for i, f in enumerate(body["features"]):
        for j, act in enumerate(f["activations"]):
            if len(act["tokens"]) != len(act["values"]):
                problems.append(
                    f"body.features[{i}].activations[{j}]: "
                    f"{len(act['tokens'])} tokens, {len(act['values'])} values"
                )
        for j, e in enumerate(f.get("explanations") or []):
            for key in ("methodName", "modelName"):
                if e.get(key) is not None:
                    problems.append(
                        f"body.features[{i}].explanations[{j}].{key} is {e[key]!r}: it must name a type "
                        "Neuronpedia already has (ask their team), or be null"
                    )
    indexes = [f["index"] for f in body["features"]]
    if len(set(indexes)) != len(indexes):
        problems.append("body.features: indexes repeat; the route requires unique indexes per call")
    pre = schema["prerequisites"]
    layer, _, set_name = body["source"].partition("-")
    name = pre["source_set"]
    if (
        not layer.isdigit()
        or not re.fullmatch(name["name_pattern"], set_name)
        or set_name in name["name_not"]
        or any(x in set_name for x in name["name_forbids"])
    ):
        problems.append(
            f"body.source {body['source']!r} is not <layer>-<set name> "
            "with a set name the source-set route accepts"
        )
    model = pre["model"]
    mid = body["modelId"]
    if not (
        re.fullmatch(model["id_pattern"], mid)
        and model["id_min"] <= len(mid) <= model["id_max"]
        and not any(x in mid for x in model["id_forbids"])
    ):
        problems.append(f"body.modelId {mid!r} is not an id the model route accepts")
    return problems


def _records(path: Path) -> list[dict[str, Any]]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


_JSON_TYPES = {"String": (str,), "DateTime": (str,), "Int": (int,), "Float": (int, float), "Boolean": (bool,)}


def _problem(col: str, spec: dict[str, Any], value: Any, enums: dict[str, list[str]]) -> str | None:
    """Why `value` cannot go into a column `spec` of the schema (None if it can)."""
    if value is None:
        return None if spec["nullable"] else "is null, the column is NOT NULL"
    items = value if spec["list"] else [value]
    if spec["list"] and not isinstance(value, list):
        return f"is {value!r}, needs a list of {spec['type']}"
    for v in items:
        if spec["type"] in enums:
            if v not in enums[spec["type"]]:
                return f"is {v!r}, needs one of {enums[spec['type']]}"
        elif spec["type"] in _JSON_TYPES:
            types = _JSON_TYPES[spec["type"]]
            if not isinstance(v, types) or (spec["type"] != "Boolean" and isinstance(v, bool)):
                return f"is {v!r}, needs {spec['type']}"
    return None


def validate_export(folder: str | os.PathLike, schema: dict[str, Any] | None = None) -> dict[str, int]:
    """Check a source folder (`<model_id>/<layer>-<set_id>`) against Neuronpedia's schema (`SCHEMA`, or a
    schema of the same shape, such as tests/explore/neuronpedia_schema.json) and its admin import: the four
    metadata files hold one record each and features/ at least one batch; every record has each required
    column, no column the table lacks (Prisma's create rejects it), values of the column's type (enums
    included, null only where nullable); within a batch every line has the first line's keys (the import
    takes the columns from the first line); ids and (modelId, layer, index) are unique; activations and
    explanations belong to exported features, no window exceeds its feature's `maxActApprox`, top windows
    carry binMin = binContains = -1. Returns record counts; raises ValueError listing the first problems."""
    folder, schema = Path(folder), schema or SCHEMA
    problems: list[str] = []
    counts: dict[str, int] = {}
    seen: set[Any] = set()

    def check(kind: str, rec: dict[str, Any], where: str) -> None:
        columns = schema["models"][schema["files"][kind]]["columns"]
        for col, spec in columns.items():
            required = not spec["nullable"] and spec["default"] is None and not spec["list"]
            if required and col not in rec:
                problems.append(f"{where}: {kind} lacks the required column {col!r}")
        for col, value in rec.items():
            if col not in columns:
                problems.append(
                    f"{where}: {kind} column {col!r} is not in Neuronpedia's {schema['files'][kind]}"
                )
            elif why := _problem(col, columns[col], value, schema["enums"]):
                problems.append(f"{where}: {kind} field {col!r} {why}")
        key = (
            (kind, rec.get("id"))
            if kind != "feature"
            else (kind, rec.get("modelId"), rec.get("layer"), rec.get("index"))
        )
        if kind in ("feature", "activation", "explanation"):
            if key in seen:
                problems.append(f"{where}: duplicate {kind} {key[1:]!r}")
            seen.add(key)

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
    max_act: dict[str, float] = {}
    counts["explanations"] = 0
    for sub, kind in (
        ("features", "feature"),
        ("activations", "activation"),
        ("explanations", "explanation"),
        (EXPLANATIONS_PENDING, "explanation"),
    ):
        paths = sorted((folder / sub).glob("batch-*.jsonl.gz"))
        if sub == "features" and not paths:
            problems.append("features/ holds no batch-*.jsonl.gz")
        counts.setdefault(sub.split("-")[0], 0)
        for path in paths:
            recs = _records(path)
            for n, rec in enumerate(recs):
                where = f"{sub}/{path.name} line {n + 1}"
                check(kind, rec, where)
                if set(rec) != set(recs[0]):
                    problems.append(
                        f"{where}: keys differ from line 1's (the import reads line 1's columns only)"
                    )
                if rec.get("layer") != folder.name:
                    problems.append(f"{where}: layer {rec.get('layer')!r} is not the source {folder.name!r}")
                if kind == "feature":
                    max_act[rec.get("index")] = rec.get("maxActApprox") or 0
                elif rec.get("index") not in max_act:
                    problems.append(f"{where}: index {rec.get('index')!r} is not an exported feature")
                if kind == "activation":
                    if len(rec.get("tokens") or []) != len(rec.get("values") or []):
                        problems.append(
                            f"{where}: {len(rec['tokens'] or [])} tokens "
                            f"but {len(rec['values'] or [])} values"
                        )
                    if (rec.get("maxValue") or 0) > max_act.get(rec.get("index"), float("inf")):
                        problems.append(
                            f"{where}: maxValue {rec['maxValue']} exceeds the feature's maxActApprox "
                            f"{max_act[rec['index']]}"
                        )
                    if rec.get("binMin") == -1 and rec.get("binContains") != -1:
                        problems.append(f"{where}: a top window (binMin -1) needs binContains -1")
                    if rec.get("binMin") is None or not -1 <= (rec.get("binContains") or 0) <= 1:
                        problems.append(
                            f"{where}: binMin {rec.get('binMin')!r} / binContains "
                            f"{rec.get('binContains')!r}: a top window has -1, a quantile window "
                            "its interval and share of all tokens"
                        )
                counts[sub.split("-")[0]] += 1
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
and scores in each explanation's `notes`. Features that fire nowhere are left out ({n_dead} of them).
Release `{release}`, visibility {visibility}, model owner `{owner}`. Every record was checked against
Neuronpedia's schema ({schema}: `apps/webapp/prisma/schema.prisma`) and its admin import
(`helpers.explore.neuronpedia.validate_export`). Each latent's logit histogram (`logits_hist_data_*`: its
decoder row's logit weights over the vocabulary) is there when the explorer was built with the model.

## Without Neuronpedia's team: the self-serve upload route

`upload-batch/<model_id>/<source_id>/batch-*.json` hold the same latents as request bodies of Neuronpedia's
`POST /api/feature/upload-batch` (at most 128 latents each; read from {upload_source},
`apps/webapp/app/api/feature/upload-batch/route.tsx`, and checked against its request schema). That route
needs only your API key (Settings on neuronpedia.org), sent as the `x-api-key` header:

1. If Neuronpedia has no model `{model_id}` yet: `POST /api/model/new` with
   `{{"id": "{model_id}", "layers": <the model's layer count>}}`.
2. `POST /api/source-set/new` with `{{"modelId": "{model_id}", "name": "<set name>", "description": "..."}}`
   for each set name below; it creates the sources `<layer>-<set name>` of every layer, UNLISTED, yours.
3. Each file in turn: `curl -X POST https://www.neuronpedia.org/api/feature/upload-batch -H "x-api-key: $KEY"
   -H "Content-Type: application/json" --data @batch-0000.json`.

Sources: {upload_sources}. The route stores less than the bulk layout above: per latent its density, top
and bottom logits, windows (quantile windows with their interval and share of all tokens; top windows
with quantileMin -1) and explanations without a method or model name (the route refuses names Neuronpedia
does not already have); no activation or logit histograms and no decoder neighbours. Latents with no
window to send are left out ({n_no_window}). Empty token pieces are sent as a zero-width space (the route
refuses empty strings).

## Explanations: what to ask Neuronpedia's team

Each source's explanations are in `explanations-pending/`, not `explanations/`, because the import would
refuse them: their `typeName` and `explanationModelName` are foreign keys to rows Neuronpedia keeps outside
its repository (its config bucket). Ask their team to create the explanation type `{explanation_type}`
(display name "deception-sae-lab contrast explanation": Gemini reads a latent's top windows from honest and
deceptive answers; detection / fuzzing scores and the held-out effect size in `notes`) and the explanation
model type(s) {models}, or to tell you existing names to use instead; then rename `explanations-pending/`
to `explanations/` (after replacing the names if they gave others).

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
corpus), not 128-token prompts; the model id (`{model_id}`) may need to match a model Neuronpedia \
already hosts.
"""


def export_neuronpedia(
    run_dir: str | os.PathLike,
    sae_ids: list[str],
    *,
    release: str | None = None,
    settings: ExportSettings | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Export the SAEs `sae_ids` (their explorer data must be complete), validate every source folder,
    and write the README; returns one summary row per SAE (an SAE where no feature fires gets a row saying
    so, `source` None, and no folder). `release` defaults to `release_name_of` (unique
    per user and run); `model_owner` (Neuronpedia's required `Model.owner`) to the model's Hub organisation,
    else `creator_name`. `settings` (default `ExportSettings()`), or any of its fields as keywords
    (`creator_name=...`, `include_dead=True`)."""
    settings = (settings or ExportSettings()).with_overrides(overrides)
    creator_name, creator_id, model_id = settings.creator_name, settings.creator_id, settings.model_id
    model_owner, visibility, include_dead = settings.model_owner, settings.visibility, settings.include_dead
    if not sae_ids:
        raise ValueError("sae_ids is empty: pass the SAEs to export (build_explorer's rows name them)")
    release = release or release_name_of(run_dir, sae_ids, creator_name)
    owner = model_owner or model_owner_of(run_dir) or creator_name
    rows, sources, n_dead, models = [], [], 0, set()
    upload_sources: list[str] = []
    n_no_window = 0
    for sid in sae_ids:
        if (
            not include_dead and not sae_info(run_dir, sid)["n_alive"]
        ):  # an SAE where nothing fires: a row, no stop
            why = "no feature fires on the run's data (include_dead=True exports its latents anyway)"
            print(f"{sid}: left out of the Neuronpedia export: {why}")
            rows.append(
                {
                    "sae_id": sid,
                    "source": None,
                    "features": 0,
                    "activations": 0,
                    "explanations": 0,
                    "upload batches": 0,
                    "valid": None,
                    "left out": why,
                }
            )
            continue
        folder = export_sae(
            run_dir,
            sid,
            release=release,
            settings=settings,
            model_owner=owner,
        )
        counts = validate_export(folder)
        batches = neuronpedia_dir(run_dir) / UPLOAD_BATCH / folder.parent.name / folder.name
        n_upload = sum(
            len(json.loads(b.read_text())["features"]) for b in sorted(batches.glob("batch-*.json"))
        )
        n_no_window += counts["features"] - n_upload  # exported above, but with no window to send
        upload_sources.append(
            f"`{folder.name}` (set name `{folder.name.split('-', 1)[1]}`, {n_upload} latents)"
        )
        n_dead += int(sae_info(run_dir, sid)["d_sae"]) - counts["features"]
        for path in (folder / EXPLANATIONS_PENDING).glob("batch-*.jsonl.gz"):
            models |= {r["explanationModelName"] for r in _records(path)}
        rel = folder.relative_to(neuronpedia_dir(run_dir))
        sources.append(f"- `{rel}/`: `{sid}`")
        rows.append(
            {
                "sae_id": sid,
                "source": str(rel),
                "features": counts["features"],
                "activations": counts["activations"],
                "explanations": counts["explanations"],
                "upload batches": len(list(batches.glob("batch-*.json"))),
                "valid": True,
            }
        )
    info = sae_info(run_dir, sae_ids[0])
    sources += [f"- `{r['sae_id']}`: left out, {r['left out']}" for r in rows if r.get("left out")]
    text = README.format(
        run=Path(run_dir).name,
        version=__version__,
        sources="\n".join(sources),
        logit_note=info.get("logit_note") or "not computed: the model was not loaded",
        creator_id=creator_id,
        model_id=model_id or model_id_of(run_dir),
        n_dead=n_dead,
        release=release,
        visibility=visibility,
        owner=owner,
        schema=SCHEMA_SOURCE,
        explanation_type=EXPLANATION_TYPE,
        upload_source=UPLOAD_SOURCE,
        upload_sources=", ".join(upload_sources) or "(none)",
        n_no_window=n_no_window,
        models=", ".join(f"`{m}`" for m in sorted(models)) or "(none yet)",
    )
    atomic_write_bytes(neuronpedia_dir(run_dir) / "README.md", text.encode())
    return rows
