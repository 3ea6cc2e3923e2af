"""The run folder contract (DESIGN.md §3): atomic writes and `run.json`.

Every notebook reads and writes one run folder. A write goes to a temporary file in the same folder
and is renamed into place, so a Colab disconnect mid-write never leaves a half-written file that a
later stage would trust. `run.json` records what the run is (model, dtype, layers, seeds, package
version) and which stages finished, so Run all after a disconnect skips finished work.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RUN_JSON = "run.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder + `os.replace` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


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
    from . import __version__

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


def stage_done(run_dir: str | os.PathLike, stage: str) -> bool:
    return read_run_json(run_dir).get("stages", {}).get(stage, {}).get("status") == "done"


def id_part(text: str) -> str:
    """`text` fit for one part of an sae_id: every character but letters, digits, '.' and '-' becomes '-'
    (in particular '_', the separator of the parts)."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def model_short(spec: str) -> str:
    """'karpathy/nanochat-d32' -> 'd32'; 'org/Some_Model' -> 'Some-Model'."""
    return id_part(spec.rstrip("/").replace(":", "/").split("/")[-1].removeprefix("nanochat-"))
