"""Share a run: zip its folder for download (publishing SAEs to the Hub is `helpers.saes.hub`).

`zip_run(run_dir)`: one .zip beside the run folder, written atomically. The per-token activation store
(`activations/`, often gigabytes, recomputable by notebook 02 from completions.jsonl), training
checkpoints, temp files and a judge cache above `max_cache_mb` are left out, and the summary says so.
Notebook 06's static explorer (`explorer/`) and Neuronpedia export (`neuronpedia/`) go in when present.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

from helpers import env
from helpers.run import (
    DRY_RUN_DIR,
    REPLACED,
    explorer_dir,
)


def zip_run(
    run_dir: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    include_activations: bool = False,
    max_cache_mb: float = 50.0,
) -> Path:
    """Zip `run_dir` into `out` (default: `<run_dir>.zip` beside it) atomically; returns the zip's path."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: check RUN_NAME (or NB_RUN_DIR)")
    out = Path(out).resolve() if out else run_dir.parent / f"{run_dir.name}.zip"
    kept, left_out = [], Counter()
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir)
        why = _excluded(rel, path, include_activations, max_cache_mb)
        if path == out or why:
            left_out[why or "the zip itself"] += 1
            continue
        kept.append((path, f"{run_dir.name}/{rel.as_posix()}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path, arc in kept:
                zf.write(path, arc)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    skipped = "; ".join(f"{n} {why}" for why, n in left_out.items()) or "nothing"
    print(f"{out}: {len(kept)} files, {out.stat().st_size / 1e6:.1f} MB (left out: {skipped})")
    if (explorer_dir(run_dir) / "index.html").exists():
        print(
            f"inside: the feature explorer, {run_dir.name}/explorer/index.html "
            "(unzip, then open it in a browser)"
        )
    return out


def _excluded(rel: Path, path: Path, include_activations: bool, max_cache_mb: float) -> str | None:
    if rel.parts[0] == "activations" and not include_activations:
        return "activation-store files (include_activations=True keeps them)"
    if rel.parts[0] == REPLACED:
        return "results OVERWRITE replaced (replaced/)"
    if (
        rel.parts[0].lstrip(".").startswith(DRY_RUN_DIR)
        or path.name == "checkpoint.pt"
        or path.name.endswith(".tmp")
    ):
        return "checkpoint / temp / dry-run files"
    if path.name == "judge_cache.sqlite" and path.stat().st_size > max_cache_mb * 1e6:
        return f"judge cache over {max_cache_mb:g} MB"
    return None


def download(path: str | os.PathLike) -> None:
    """Offer a file for download in Colab; elsewhere say where it is."""
    if env.in_colab():
        from google.colab import files  # type: ignore[import-not-found]

        files.download(str(path))
    else:
        print(f"not in Colab: the file is at {Path(path).resolve()}")


# --- the model card -------------------------------------------------------------------------------
