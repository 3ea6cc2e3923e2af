"""THE run folder contract (DESIGN.md §3): every path in it, atomic writes, JSONL, `run.json`, hashes.

Every notebook reads and writes one run folder. A write goes to a temporary file in the same folder
and is renamed into place, so a Colab disconnect mid-write never leaves a half-written file that a
later stage would trust. `run.json` records what the run is (model, dtype, layers, seeds, package
version) and which stages finished, so Run all after a disconnect skips finished work.

A run folder holds one experiment. Each stage records the settings that determine its outputs (`settings`
in run.json: a stable hash and the readable values) and `check_stage_settings` compares a rerun's with
them before anything is written: the same settings resume; others stop with a NotebookError naming each
difference (on disk → now) and the choices (a new RUN_NAME, OVERWRITE, or ADD_TO_RUN where the change only
adds data). Provenance is append-only: `created_with` is the release that started the run and `history`
lists every stage's status and settings check with the release that made it; `release_flag` marks results
of an older release where they are shown. What OVERWRITE replaces is moved to `replaced/` (`set_aside`),
never read again, so a mistaken OVERWRITE loses nothing; when a stage goes on, the temp files that killed
atomic writes left in its folders are removed (`remove_stale_temps`).

Every path of the run folder is spelled here and nowhere else:

    run.json                      RUN_JSON
    completions.jsonl             completions_path(run_dir)
    datasets.json                 datasets_path(run_dir): every dataset of the run, its role and source
    activations/layer_{L}/        activations_dir(run_dir, L)
    pooled/layer_{L}.safetensors  pooled_path(run_dir, L)
    saes/{sae_id}/                sae_dir(run_dir, sae_id): SAE_CFG, SAE_WEIGHTS, SAE_SPARSITY, SAE_METRICS
    probes.json                   probes_path(run_dir)
    features/{sae_id}.jsonl       features_path(run_dir, sae_id)
    features/{sae_id}.controls.json  feature_controls_path(run_dir, sae_id): random features, the
                                  autointerp baseline
    steering.jsonl                steering_path(run_dir)
    corpus/layer_{L}/             corpus_dir(run_dir, L)
    explorer/                     explorer_dir(run_dir)
    neuronpedia/                  neuronpedia_dir(run_dir)
    figures/                      figures_dir(run_dir)
    judge_cache.sqlite            judge_cache_path(run_dir)
    replaced/{stage}-{time}/      replaced_dir(run_dir): what OVERWRITE replaced (set_aside); never read
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from helpers.env import NotebookError
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
    """One vector per completion (mean and last token, the prompt's last token) at one layer, for the
    probes."""
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


def read_probes(run_dir: str | os.PathLike) -> dict[str, Any]:
    """probes.json of the run (written by notebook 04's probe_table)."""
    path = probes_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run probe_table (notebook 04) first")
    return json.loads(path.read_text())


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
    kept = "what was there before is kept" if path.exists() else "nothing of it was written"
    return (
        f"the disk (or Drive quota) holding {path.parent} is full: writing {path.name} ({size / 1e6:.1f} MB) "
        f"failed with {err.strerror or err}; {free / 1e9:.2f} GB free there, and {kept}. Free space (delete "
        "old run folders, SAE checkpoints or other files; on Drive also empty the trash) or set the run "
        "folder on a larger disk, then rerun this cell: finished work is skipped (SAE training resumes "
        "from its last checkpoint)."
    )


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder beside `path` to fill inside the block; when the block ends without an error
    it takes the place of `path` (an existing `path` is removed first) by a rename on one filesystem, so
    `path` is never half-written. On any error the temporary folder is removed and `path` is kept as it
    was. Made with mkdir (not mkdtemp), so it has the usual umask permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    text = "".join(_jsonl_line(r) for r in rows)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.errno in DISK_FULL:  # what did reach the disk is a torn tail: the next append drops it
            raise OSError(err.errno, _disk_full_message(path, len(text.encode()), err)) from err
        raise


def _drop_torn_tail(path: Path) -> None:
    """Before appending: cut a last line without its newline (an append interrupted mid-write), or, when
    that line is a whole record (killed between its `}` and its newline; `read_jsonl` counts it as
    done), end it with the newline it lacks."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    head, tail = data[: data.rfind(b"\n") + 1], data[data.rfind(b"\n") + 1 :]
    try:
        whole = isinstance(json.loads(tail), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = False
    atomic_write_bytes(path, data + b"\n" if whole else head)


def stable_hash(*parts: Any) -> int:
    """A 63-bit integer from `parts` that is the same in every process and Python version (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def read_json_record(path: str | os.PathLike, fix: str = "fix or delete it") -> dict[str, Any]:
    """A JSON record file (run.json, a sweep's sweep.json), or {} when it does not exist yet. A corrupt
    file is an error naming `fix`, never overwritten."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}). It was not overwritten: {fix}") from err


def read_run_json(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's `run.json`, or {} for a fresh run folder. A corrupt file is an error, never overwritten."""
    return read_json_record(
        Path(run_dir) / RUN_JSON, "fix or delete it, or start a new run with another run_name."
    )


NO_MODEL = (
    "run notebook 01 (load checkpoint) with this RUN_NAME first, or check that RUN_NAME matches the run "
    "you want to continue"
)


def model_record(run_dir: str | os.PathLike, *, required: bool = True) -> dict[str, Any]:
    """What notebook 01 recorded about the run's model in `run.json` (`spec`, `revision`, `dtype`,
    `n_layers`, `d_model`, ...). Without a recorded `spec`: a FileNotFoundError saying to run notebook 01
    first, or {} when `required` is False (for what only describes a run)."""
    model = read_run_json(run_dir).get("model") or {}
    if required and not model.get("spec"):
        raise FileNotFoundError(f"{Path(run_dir) / RUN_JSON} records no model: {NO_MODEL}.")
    return model


def update_run_json(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into `run.json` (top-level keys; dict values merged one level deep) atomically.

    Provenance is never overwritten: `created_with` keeps the release that started the run, `history`
    only grows, and a write by another release than the last one is recorded there (`package_version` is
    the release of the latest write)."""

    run = read_run_json(run_dir)
    for key, value in fields.items():
        if key in (HISTORY, "created_with"):
            raise ValueError(f"run.json's {key!r} is append-only: use mark_stage / check_stage_settings")
        if isinstance(value, dict) and isinstance(run.get(key), dict):
            run[key] = {**run[key], **value}
        else:
            run[key] = value
    now = _now()
    before = run.get("package_version")
    run.setdefault("created_with", before or __version__)
    if before and before != __version__:
        _history(run).append({"event": "release changed", "from": before, "to": __version__, "at": now})
    run["package_version"] = __version__
    run["updated_at"] = now
    atomic_write_json(Path(run_dir) / RUN_JSON, run)
    return run


HISTORY = "history"
"""run.json's list of what happened to the run, oldest first, never rewritten: each stage's status with the
release and the settings hash that produced it, settings recorded or replaced, release changes."""
SETTINGS = "settings"
"""run.json's record of each stage's settings: {stage: {"hash", "values", "package_version", "at"}}."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _history(run: dict[str, Any]) -> list[dict[str, Any]]:
    return run.setdefault(HISTORY, [])


def mark_stage(
    run_dir: str | os.PathLike, stage: str, status: str = "done", **details: Any
) -> dict[str, Any]:
    """Record a stage's status (e.g. `mark_stage(run_dir, "load_checkpoint")`) in `run.json`, and append
    it to the history with the release and the stage's settings hash (when it recorded settings)."""
    if status not in ("started", "done", "failed"):
        raise ValueError(f"stage status must be 'started', 'done' or 'failed', got {status!r}")
    now = _now()
    entry = {"status": status, "at": now, "package_version": __version__, **details}
    run = read_run_json(run_dir)
    settings_hash = ((run.get(SETTINGS) or {}).get(stage) or {}).get("hash")
    event = {"stage": stage, "status": status, "package_version": __version__, "at": now}
    _append_history(run_dir, {**event, **({"settings_hash": settings_hash} if settings_hash else {})})
    return update_run_json(run_dir, stages={stage: entry})


def _append_history(run_dir: str | os.PathLike, event: dict[str, Any]) -> None:
    run = read_run_json(run_dir)
    _history(run).append(event)
    run.setdefault("created_with", run.get("package_version") or __version__)
    atomic_write_json(Path(run_dir) / RUN_JSON, run)


# --- settings-aware resume --------------------------------------------------------------------------------
def settings_hash(values: Any) -> str:
    """A stable 16-hex-digit hash of settings (JSON with sorted keys: the same in every process)."""
    text = json.dumps(jsonable(values), sort_keys=True, allow_nan=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


Settings = TypeVar("Settings")


def override_fields(settings: Settings, overrides: dict[str, Any], what: str) -> Settings:
    """`settings` (a dataclass) with the fields named in `overrides` replaced; an unknown name is a
    TypeError listing the known ones (`what` names the settings in it: "sampling settings")."""
    names = [f.name for f in fields(settings)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}: the {what} are {names}")
    return replace(settings, **overrides)


def split_overrides(overrides: dict[str, Any], settings: dict[str, Any]) -> tuple[Any, ...]:
    """Each settings object of `settings` ({what: dataclass}, e.g. {"pair settings": pair}) with the
    fields named in `overrides` replaced, each name going to the first that has it; an unknown name is
    a TypeError listing every set of names."""
    names = {what: [f.name for f in fields(s)] for what, s in settings.items()}
    unknown = sorted(set(overrides) - {n for ns in names.values() for n in ns})
    if unknown:
        sets = ", ".join(
            f"the {what} {'are ' if i == 0 else ''}{ns}" for i, (what, ns) in enumerate(names.items())
        )
        raise TypeError(f"unexpected keyword arguments {unknown}: {sets}")
    out, left = [], dict(overrides)
    for what, s in settings.items():
        mine = {k: left.pop(k) for k in names[what] if k in left}
        out.append(replace(s, **mine))
    return tuple(out)


_ABSENT = "(absent)"


def settings_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs; `(absent)` marks a missing key."""
    old, new = jsonable(old), jsonable(new)
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append((key, _ABSENT, new[k]))
            elif k not in new:
                out.append((key, old[k], _ABSENT))
            else:
                out += settings_diff(old[k], new[k], key)
        return out
    return [] if old == new else [(prefix, old, new)]


def _adds(key: str, old: Any, new: Any, addable: tuple[str, ...]) -> bool:
    """Whether changing `key` from `old` to `new` only adds to what is there (more of the same data):
    a new entry, a larger count, or a list that keeps every old item; and `key` is one of `addable`
    (dotted keys; `*` matches any one part)."""

    def matches(pattern: str) -> bool:
        parts, want = key.split("."), pattern.split(".")
        return len(parts) == len(want) and all(w in ("*", p) for w, p in zip(want, parts, strict=True))

    if not any(matches(p) for p in addable) or new == _ABSENT:
        return False
    if old == _ABSENT:
        return True
    if isinstance(old, int | float) and isinstance(new, int | float) and not isinstance(old, bool):
        return new > old
    if isinstance(old, list) and isinstance(new, list):
        return all(x in new for x in old)
    return False


def describe_diff(diff: list[tuple[str, Any, Any]], limit: int = 12) -> str:
    """'key: old → new' lines for a settings difference (at most `limit`, then a count)."""
    lines = [f"  {k}: {_short(a)} → {_short(b)}" for k, a, b in diff[:limit]]
    if len(diff) > limit:
        lines.append(f"  ... and {len(diff) - limit} more")
    return "\n".join(lines)


def _short(v: Any, width: int = 70) -> str:
    text = v if v == _ABSENT else json.dumps(v, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def settings_conflict(
    what: str,
    diff: list[tuple[str, Any, Any]],
    *,
    can_add: bool,
    overwrite_does: str,
    add_param: str = "ADD_TO_RUN",
    recorded: str = "",
) -> NotebookError:
    """The error of a rerun whose settings differ from those that made what is on disk: what differs
    (old → new) and the choices. Nothing has been written when it is raised."""
    choices = [
        "a new RUN_NAME: a new run folder for the new settings (this one stays as it is)",
        f"OVERWRITE = True: {overwrite_does}",
    ]
    if can_add:
        choices.append(f"{add_param} = True: add to this run (every difference above only adds data)")
    else:
        choices.append("or set the parameters back to the values on the left to resume this run")
    return NotebookError(
        f"{what} already holds results made with other settings{recorded}; nothing was written. "
        f"What differs (on disk → now):\n{describe_diff(diff)}\nChoose one:\n"
        + "\n".join(f"  - {c}" for c in choices)
    )


@dataclass(frozen=True)
class StageRules:
    """How a stage's recorded settings may change: what counts as adding, and what OVERWRITE does (the
    stage's own words in the refusal). `check_stage_settings` takes these fields as keywords."""

    addable: tuple[str, ...] = ()
    """Dotted keys (`*` for any one part) whose change only adds: new entries, larger counts, longer
    lists (e.g. notebook 02's `("datasets.*", "layers")`). Nothing is addable by default."""
    overwrite_does: str = "redo this stage with the new settings (its earlier outputs go to replaced/)"
    """What OVERWRITE would do, as the refusal offers it."""


def check_stage_settings(
    run_dir: str | os.PathLike,
    stage: str,
    settings: dict[str, Any],
    *,
    overwrite: bool = False,
    add: bool = False,
    has_outputs: bool = True,
    legacy: dict[str, Any] | None = None,
    **rules: Any,
) -> str:
    """Compare a stage's `settings` (what determines its outputs) with those recorded in run.json by its
    last run, and record them. Returns what to do:

    - "new": nothing recorded yet (or the stage left no outputs: `has_outputs` False): go on;
    - "same": the same settings: go on, finished work is skipped as before;
    - "add": differences that only add (keys under `addable`: new entries, larger counts, longer lists)
      and `add` is True: go on, adding;
    - "overwrite": other settings and `overwrite` True: the caller replaces the stage's outputs, moving
      the old ones to replaced/ with `set_aside`.

    Any other difference raises a NotebookError naming each (on disk → now) and the choices, before
    anything is written (run.json included). The check, the settings and the release go to the history;
    when the stage goes on, the temp files killed writes left in its folders go (`remove_stale_temps`).
    `legacy`: the settings to compare with when none are recorded (what an older run.json says).
    `rules`: the stage's `StageRules` fields (`addable`, `overwrite_does`); another name is a TypeError.
    E.g. notebook 05: `check_stage_settings(run_dir, "05_steer", {"sae": SAE_ID, "strengths": STRENGTHS,
    ...}, overwrite=OVERWRITE)` before its first write."""
    rule = override_fields(StageRules(), rules, "stage rules")
    run = read_run_json(run_dir)
    before = (run.get(SETTINGS) or {}).get(stage)
    if before is None and legacy is not None:  # a run folder from before settings were recorded
        before = {
            "values": legacy,
            "at": run.get("updated_at"),
            "package_version": run.get("package_version"),
        }
    new_hash = settings_hash(settings)
    if before and before.get("hash") == new_hash:
        remove_stale_temps(run_dir, stage)
        return "same"
    decision = "new"
    if before and has_outputs:
        diff = settings_diff(before.get("values"), settings)
        adds_only = bool(diff) and all(_adds(k, a, b, rule.addable) for k, a, b in diff)
        if not diff:  # legacy settings equal to these: resume, now with the settings recorded
            decision = "same"
        elif adds_only and add:
            decision = "add"
        elif overwrite:
            decision = "overwrite"
        else:
            raise settings_conflict(
                f"stage {stage} of {Path(run_dir)}",
                diff,
                can_add=adds_only,
                overwrite_does=rule.overwrite_does,
                recorded=f" (recorded {before.get('at')} by release {before.get('package_version')})",
            )
    record = {"hash": new_hash, "values": jsonable(settings), "package_version": __version__, "at": _now()}
    _append_history(
        run_dir,
        {
            "stage": stage,
            "settings": decision,
            "settings_hash": new_hash,
            "previous_hash": (before or {}).get("hash"),
            "package_version": __version__,
            "at": record["at"],
        },
    )
    update_run_json(run_dir, **{SETTINGS: {stage: record}})
    remove_stale_temps(run_dir, stage)
    return decision


# --- what OVERWRITE replaces, and what killed writes leave -------------------------------------------------
REPLACED = "replaced"
"""The run folder's `replaced/`: results that OVERWRITE replaced, kept (`set_aside`). No stage reads it."""
KEEP_REPLACED_ENV = "KEEP_REPLACED"
"""`KEEP_REPLACED=0` in the environment: OVERWRITE deletes what it replaces instead of keeping it."""


def replaced_dir(run_dir: str | os.PathLike) -> Path:
    """Where `set_aside` keeps replaced results: `replaced/{stage}-{UTC time}/`, each file at its place in
    the run folder. Delete it to free the space; nothing reads it."""
    return Path(run_dir) / REPLACED


def set_aside(run_dir: str | os.PathLike, stage: str, paths: Any, *, keep: bool | None = None) -> Path | None:
    """Move the files or folders `paths` (inside the run folder) that OVERWRITE is about to replace into
    `replaced/{stage}-{UTC time}/`, at the same place relative to the run folder, so that a mistaken
    OVERWRITE loses nothing; say where, and record it in run.json's history. `keep` False (default: the
    environment's KEEP_REPLACED, kept unless it is 0) deletes them instead. Returns the folder they went
    to (None when nothing was there or they were deleted). A move within the run folder is a rename:
    no copy, no extra space."""
    run_dir = Path(run_dir).resolve()
    if keep is None:
        keep = os.environ.get(KEEP_REPLACED_ENV, "1").strip().lower() not in ("0", "false", "no")
    present = []
    for path in map(Path, paths):
        rel = path.resolve().relative_to(run_dir)  # a ValueError for a path outside the run folder
        if not rel.parts or rel.parts[0] == REPLACED:
            raise ValueError(
                f"set_aside takes results inside {run_dir} (not the run folder itself or replaced/)"
            )
        if path.exists() or path.is_symlink():
            present.append(rel)
    if not present:
        return None
    names = ", ".join(r.as_posix() for r in present)
    if not keep:
        for rel in present:
            target = run_dir / rel
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        print(f"OVERWRITE: deleted {names} (made with the old settings; {KEEP_REPLACED_ENV} is off)")
        _append_history(run_dir, {"stage": stage, "event": "replaced", "deleted": names, "at": _now()})
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = replaced_dir(run_dir) / f"{stage}-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = replaced_dir(run_dir) / f"{stage}-{stamp}-{n}"
    for rel in present:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / rel, dest / rel)
    print(
        f"OVERWRITE: moved {names} (made with the old settings) to {dest}: nothing is lost, and no notebook "
        f"reads it. Delete that folder to free the space (or set {KEEP_REPLACED_ENV}=0 in the environment "
        "to delete instead of keeping)."
    )
    kept = dest.relative_to(run_dir).as_posix()
    _append_history(run_dir, {"stage": stage, "event": "replaced", "moved": names, "to": kept, "at": _now()})
    return dest


STAGE_FOLDERS = {
    "02_collect_activations": ("activations", "pooled"),
    "02_corpus": ("corpus",),
    "03_train_saes": ("saes",),
    "04_autolabel_features": ("features",),
    "06_explore_features": ("explorer", "neuronpedia"),
}
"""The folders of the run folder that only one stage writes (by its stage name), where
`remove_stale_temps` removes every temp file of ours; in the run folder itself and `figures/`, written
by several stages, only temp files older than `SHARED_TEMP_AGE_S` go."""
SHARED_TEMP_AGE_S = 600
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
"""`atomic_write_bytes`'s temp names: `.{name}.` + mkstemp's 8 random characters + `.tmp`."""
_TEMP_DIR_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{8}$")
"""`atomic_directory`'s temp folder names: `.{name}.tmp-` + 8 hex digits."""


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of `atomic_write_bytes`'s temp files (a write killed before its rename
    leaves one; no reader may take it for data)."""
    return _TEMP_NAME.match(name) is not None


def remove_stale_temps(run_dir: str | os.PathLike, stage: str) -> list[Path]:
    """Remove what killed atomic writes left when `stage` starts again: temp files (`is_temp_name`, plain
    files only) and `atomic_directory`'s temp folders (`.{name}.tmp-XXXXXXXX`, with all they hold),
    anywhere under the folders only it writes (`STAGE_FOLDERS`), and those older than SHARED_TEMP_AGE_S
    directly in the run folder and in figures/ (another stage may be writing those now; a folder's age is
    that of the newest thing in it). Nothing else is touched. Returns what was removed."""
    run_dir = Path(run_dir)
    own = [run_dir / f for f in STAGE_FOLDERS.get(stage, ())]
    shared = [run_dir, figures_dir(run_dir)]
    candidates = []
    for pattern in (".*.tmp-*", ".*.tmp"):  # folders first: a temp file inside one goes with it
        candidates += [(p, 0.0) for folder in own if folder.is_dir() for p in folder.rglob(pattern)]
        candidates += [
            (p, SHARED_TEMP_AGE_S) for folder in shared if folder.is_dir() for p in folder.glob(pattern)
        ]
    removed, now = [], datetime.now(UTC).timestamp()
    for path, min_age in candidates:
        if path.is_symlink() or not path.exists():
            continue
        if path.is_dir() and _TEMP_DIR_NAME.match(path.name):
            try:  # its newest entry's time: a folder another stage is still filling stays
                newest = max([path.lstat().st_mtime, *(p.lstat().st_mtime for p in path.rglob("*"))])
            except FileNotFoundError:  # renamed into place or removed while we looked: not ours to remove
                continue
            if now - newest >= min_age:
                shutil.rmtree(path)
                removed.append(path)
        elif path.is_file() and is_temp_name(path.name) and now - path.stat().st_mtime >= min_age:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        what = f"{len(removed)} temp file(s) or folder(s)"
        print(f"{stage}: removed {what} left by interrupted writes (e.g. {removed[0].name})")
    return removed


def release_flag(version: str | None) -> str:
    """'' for a result made by this release; otherwise a short flag for a table column, e.g. 'older
    release 0.1.0' (or 'release not recorded' for results from before releases were recorded)."""
    if version == __version__:
        return ""
    return (
        "release not recorded"
        if not version
        else f"{'older' if _older(version) else 'other'} release {version}"
    )


def sae_release_flag(run_dir: str | os.PathLike, sae_id: str) -> str:
    """`release_flag` of the release that made an SAE of the run (from its metrics.json): the
    leaderboard's `release` column, and the explorer's."""
    path = sae_dir(run_dir, sae_id) / SAE_METRICS
    version = json.loads(path.read_text()).get("package_version") if path.exists() else None
    return release_flag(version)


def _older(version: str) -> bool:
    def key(v: str) -> tuple:
        return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split("."))

    return key(version) < key(__version__)


def run_summary(run_dir: str | os.PathLike) -> str:
    """A few readable lines about the run (what a notebook ends on, instead of the whole run.json): the
    folder, the model, the layers, the release that started it, and each stage's status with what it
    recorded, in words (a dict of counts as its values, a list as its items)."""
    run = read_run_json(run_dir)
    model = model_record(run_dir, required=False)
    lines = [f"run folder: {Path(run_dir)}"]
    if model:
        lines.append(f"model: {model.get('spec')} ({model.get('dtype')}, {model.get('n_layers')} layers)")
    if run.get("layers"):
        lines.append(f"layers: {run['layers']}")
    if run.get("created_with"):
        changed = [e for e in run.get(HISTORY, []) if e.get("event") == "release changed"]
        lines.append(
            f"started with release {run['created_with']}"
            + (f", since written by {', '.join(e['to'] for e in changed)}" if changed else "")
        )
    for stage, entry in (run.get("stages") or {}).items():
        details = [
            f"{k}: {_in_words(v)}"
            for k, v in entry.items()
            if k not in ("status", "at", "package_version") and _in_words(v) is not None
        ]
        flag = release_flag(entry.get("package_version")) if "package_version" in entry else ""
        head = f"  {stage}: {entry.get('status')} {entry.get('at', '')}" + (f" ({flag})" if flag else "")
        lines.append(head + ("; " + "; ".join(details) if details else ""))
    return "\n".join(line.rstrip() for line in lines)


def _in_words(v: Any, width: int = 80) -> str | None:
    """A recorded value as a reader wants it: `honest 12, deceptive 10` for a dict of scalars, the items
    of a short list, `5 (a, b, ...)` for a long one; None for what does not fit on a line."""
    if isinstance(v, dict):
        if not v or not all(isinstance(x, int | float | str | None) for x in v.values()):
            return f"{len(v)} entries" if v else "none"
        text = ", ".join(f"{k} {x}" for k, x in v.items())
    elif isinstance(v, list | tuple):
        if not v:
            return "none"
        text = ", ".join(map(str, v))
        if len(text) > width:
            return f"{len(v)} ({text[: width - 10]}...)"
    elif isinstance(v, int | float | str):
        text = str(v)
    else:
        return None
    return text if len(text) <= width else None


def stage_done(run_dir: str | os.PathLike, stage: str) -> bool:
    return read_run_json(run_dir).get("stages", {}).get(stage, {}).get("status") == "done"


def id_part(text: str) -> str:
    """`text` fit for one part of an sae_id: every character but letters, digits, '.' and '-' becomes '-'
    (in particular '_', the separator of the parts)."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def model_short(spec: str) -> str:
    """'karpathy/nanochat-d32' -> 'd32'; 'org/Some_Model' -> 'Some-Model'."""
    return id_part(spec.rstrip("/").replace(":", "/").split("/")[-1].removeprefix("nanochat-"))


def sae_id_of(spec: str, arch: str, layer: int, condition: str, l0: int | None = None) -> str:
    """The id of an SAE of the run (its folder under `saes/`, its `features/` file, `metadata.sae_id` in
    its cfg.json): `{model}_{arch}_L{layer}_{condition}`, with `-l0-{l0}` after the architecture in an L0
    sweep. A loaded SAE gives it back as `LoadedSAE.sae_id`."""
    return f"{model_short(spec)}_{arch}{'' if l0 is None else f'-l0-{l0}'}_L{layer}_{condition}"


DRY_RUN_DIR = "publish_dry_run"
