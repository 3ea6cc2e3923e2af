"""THE run folder contract (DESIGN.md §3): every path in it, atomic writes, JSONL, `run.json`, hashes.

Every notebook reads and writes one run folder. A write goes to a temporary file in the same folder
and is renamed into place, so a Colab disconnect mid-write never leaves a half-written file that a
later stage would trust. `run.json` records what the run is (model, dtype, layers, seeds, package
version) and which stages finished, so Run all after a disconnect skips finished work.

Every path of the run folder is spelled here and nowhere else:

    run.json                      RUN_JSON
    completions.jsonl             completions_path(run_dir)
    datasets.json                 datasets_path(run_dir): every dataset of the run, its role and source
    activations/layer_{L}/        activations_dir(run_dir, L)
    pooled/layer_{L}.safetensors  pooled_path(run_dir, L)
    saes/{sae_id}/                sae_dir(run_dir, sae_id): SAE_CFG, SAE_WEIGHTS, SAE_SPARSITY, SAE_METRICS
    probes.json                   probes_path(run_dir)
    features/{sae_id}.jsonl       features_path(run_dir, sae_id)
    features/{sae_id}.controls.json  feature_controls_path(run_dir, sae_id): random features, the autointerp baseline
    steering.jsonl                steering_path(run_dir)
    corpus/layer_{L}/             corpus_dir(run_dir, L)
    explorer/                     explorer_dir(run_dir)
    neuronpedia/                  neuronpedia_dir(run_dir)
    figures/                      figures_dir(run_dir)
    judge_cache.sqlite            judge_cache_path(run_dir)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from helpers.release import __version__

RUN_JSON = "run.json"
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_SPARSITY = "sparsity.safetensors"
SAE_METRICS = "metrics.json"
JUDGE_CACHE = "judge_cache.sqlite"


def completions_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "completions.jsonl"


def datasets_path(run_dir: str | os.PathLike) -> Path:
    """The run's datasets with their roles (train / eval / control), kinds and licences
    (`helpers.collect.datasets` writes and reads it)."""
    return Path(run_dir) / "datasets.json"


def activations_dir(run_dir: str | os.PathLike, layer: int) -> Path:
    """Per-token residual activation shards of one layer, with their index."""
    return Path(run_dir) / "activations" / f"layer_{layer}"


def corpus_dir(run_dir: str | os.PathLike, layer: int) -> Path:
    """Reference-corpus activation shards of one layer (same shard format as activations/)."""
    return Path(run_dir) / "corpus" / f"layer_{layer}"


def layer_of_dir(folder: str | os.PathLike) -> int:
    """The layer L of an `activations/layer_{L}` or `corpus/layer_{L}` folder."""
    name = Path(folder).name
    if not name.startswith("layer_") or not name.removeprefix("layer_").isdigit():
        raise ValueError(f"{folder} is not a layer folder named layer_<L>")
    return int(name.removeprefix("layer_"))


def pooled_dir(run_dir: str | os.PathLike) -> Path:
    """The pooled vectors of every layer (the stored layers and the layer sweep's)."""
    return Path(run_dir) / "pooled"


def pooled_path(run_dir: str | os.PathLike, layer: int) -> Path:
    """One vector per completion (mean and last token, the prompt's last token) at one layer, for the probes."""
    return pooled_dir(run_dir) / f"layer_{layer}.safetensors"


def saes_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "saes"


def sae_dir(run_dir: str | os.PathLike, sae_id: str) -> Path:
    """A SAELens folder: SAE_CFG + SAE_WEIGHTS (+ SAE_SPARSITY), and our SAE_METRICS."""
    return saes_dir(run_dir) / sae_id


def read_sae_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The metrics.json of every SAE in the run (sorted by sae_id); each has at least sae_id,
    architecture, layer, condition, and `activations` / `lm` / `training` sections when measured."""
    rows = []
    for path in sorted(saes_dir(run_dir).glob(f"*/{SAE_METRICS}")):
        rows.append({"sae_id": path.parent.name, **json.loads(path.read_text())})
    return rows


def probes_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "probes.json"


def features_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "features"


def features_path(run_dir: str | os.PathLike, sae_id: str) -> Path:
    return features_dir(run_dir) / f"{sae_id}.jsonl"


def feature_controls_path(run_dir: str | os.PathLike, sae_id: str) -> Path:
    return features_dir(run_dir) / f"{sae_id}.controls.json"


def steering_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "steering.jsonl"


def figures_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "figures"


def explorer_dir(run_dir: str | os.PathLike) -> Path:
    """The static feature explorer: index.html and its data, opened from disk without a server."""
    return Path(run_dir) / "explorer"


def neuronpedia_dir(run_dir: str | os.PathLike) -> Path:
    """The Neuronpedia bulk-import export of the run's SAEs."""
    return Path(run_dir) / "neuronpedia"


def judge_cache_path(run_dir: str | os.PathLike) -> Path:
    """The SQLite cache of LLM calls (answers only: no key is ever stored)."""
    return Path(run_dir) / JUDGE_CACHE


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""A full disk, or a full quota (Google Drive): errors that `atomic_write_bytes` explains."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder + `os.replace` (atomic on POSIX): on any
    error the old file, if any, is kept as it was. A full disk is an OSError (same errno) naming the
    folder, its free space and the fix, instead of a bare `[Errno 28]`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            raise OSError(err.errno, _disk_full_message(path, len(data), err)) from err
        raise
    return path


def _disk_full_message(path: Path, size: int, err: OSError) -> str:
    folder = next((p for p in [path.parent, *path.parents] if p.exists()), path.parent)
    free = shutil.disk_usage(folder).free
    kept = "the previous version is kept" if path.exists() else "nothing of it was written"
    return (
        f"the disk (or Drive quota) holding {path.parent} is full: writing {path.name} ({size / 1e6:.1f} MB) "
        f"failed with {err.strerror or err}; {free / 1e9:.2f} GB free there, and {kept}. Free space (delete "
        "old run folders, SAE checkpoints or other files; on Drive also empty the trash) or set the run folder "
        "on a larger disk, then rerun this cell: finished work is skipped (SAE training resumes from its last "
        "checkpoint)."
    )


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def jsonable(v: Any) -> Any:
    """v with numpy types as Python ones and nan/inf as None, for strict JSON."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return float(v) if np.isfinite(v) else None
    return v


def _jsonl_line(row: Any) -> str:
    return json.dumps(jsonable(row), allow_nan=False, ensure_ascii=False) + "\n"


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = True) -> list[dict[str, Any]]:
    """Every record of a JSONL file ([] when it does not exist and `missing_ok`).

    A torn final line (a disconnect during an append) is skipped and announced; a bad line elsewhere is
    an error naming the line, since it means the file was edited or two runs wrote at once.
    """
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                print(f"{path.name}: ignoring a torn last line (an interrupted write); it will be redone")
                continue
            raise ValueError(
                f"{path} line {i + 1} is not valid JSON ({err}); fix or delete that line"
            ) from err
    return rows


def write_jsonl(path: str | os.PathLike, rows: Any) -> Path:
    """Rewrite a JSONL file atomically; numpy values become Python ones and nan/inf null (strict JSON)."""
    return atomic_write_bytes(path, "".join(_jsonl_line(r) for r in rows).encode())


def append_jsonl(path: str | os.PathLike, rows: Any) -> None:
    """Append records and fsync, so what finished survives a disconnect (a torn tail is dropped first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(_jsonl_line(r) for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (an append interrupted mid-write) before appending after it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]
        atomic_write_bytes(path, keep)


def stable_hash(*parts: Any) -> int:
    """A 63-bit integer from `parts` that is the same in every process and Python version (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def read_run_json(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's `run.json`, or {} for a fresh run folder. A corrupt file is an error, never overwritten."""
    path = Path(run_dir) / RUN_JSON
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}). It was not overwritten: fix or delete it, "
            "or start a new run with another run_name."
        ) from err


def update_run_json(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into `run.json` (top-level keys; dict values merged one level deep) atomically."""

    run = read_run_json(run_dir)
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(run.get(key), dict):
            run[key] = {**run[key], **value}
        else:
            run[key] = value
    run["package_version"] = __version__
    run["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    atomic_write_json(Path(run_dir) / RUN_JSON, run)
    return run


def mark_stage(
    run_dir: str | os.PathLike, stage: str, status: str = "done", **details: Any
) -> dict[str, Any]:
    """Record a stage's status (e.g. `mark_stage(run_dir, "load_checkpoint")`) in `run.json`."""
    if status not in ("started", "done", "failed"):
        raise ValueError(f"stage status must be 'started', 'done' or 'failed', got {status!r}")
    entry = {"status": status, "at": datetime.now(UTC).isoformat(timespec="seconds"), **details}
    return update_run_json(run_dir, stages={stage: entry})


def run_summary(run_dir: str | os.PathLike) -> str:
    """A few readable lines about the run (what a notebook ends on, instead of the whole run.json):
    the folder, the model, the layers, and each stage's status with the scalar details it recorded."""
    run = read_run_json(run_dir)
    model = run.get("model") or {}
    lines = [f"run folder: {Path(run_dir)}"]
    if model:
        lines.append(f"model: {model.get('spec')} ({model.get('dtype')}, {model.get('n_layers')} layers)")
    if run.get("layers"):
        lines.append(f"layers: {run['layers']}")
    for stage, entry in (run.get("stages") or {}).items():
        details = [
            f"{k}={v}" for k, v in entry.items()
            if k not in ("status", "at") and isinstance(v, int | float | str) and len(str(v)) <= 60
        ]  # fmt: skip
        counts = [f"{k}: {len(v)}" for k, v in entry.items() if isinstance(v, list | dict)]
        lines.append(
            f"  {stage}: {entry.get('status')} {entry.get('at', '')}  " + ", ".join(details + counts)
        )
    return "\n".join(line.rstrip() for line in lines)


def stage_done(run_dir: str | os.PathLike, stage: str) -> bool:
    return read_run_json(run_dir).get("stages", {}).get(stage, {}).get("status") == "done"


def id_part(text: str) -> str:
    """`text` fit for one part of an sae_id: every character but letters, digits, '.' and '-' becomes '-'
    (in particular '_', the separator of the parts)."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def model_short(spec: str) -> str:
    """'karpathy/nanochat-d32' -> 'd32'; 'org/Some_Model' -> 'Some-Model'."""
    return id_part(spec.rstrip("/").replace(":", "/").split("/")[-1].removeprefix("nanochat-"))


DRY_RUN_DIR = "publish_dry_run"
