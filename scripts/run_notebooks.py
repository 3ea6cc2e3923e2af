"""Execute the numbered notebooks headless, as Colab's Run all would (used by the tests and the README).

    python scripts/run_notebooks.py --smoke            # all notebooks, offline model, tiny data -> ./runs/smoke
    python scripts/run_notebooks.py --smoke 01 02      # only these
    python scripts/run_notebooks.py --params runs/offline_run.json --run-dir runs/offline   # your parameters

`--params` names a JSON file mapping a notebook number to parameter values, e.g.
`{"02": {"N_PROMPTS": 100}}`: a cell setting them is inserted after that notebook's parameters cell, as
papermill does, so the run is exactly Run all with those values typed into the form.

Each notebook runs in a fresh kernel with `NB_RUN_DIR` pointing at one shared run folder, so later
notebooks read what earlier ones wrote, exactly as in Colab. Executed copies (with outputs) are saved
under `<run folder>/executed/` for reading; the notebooks in git stay output-free.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def notebook_paths(selected: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if selected:
        paths = [p for p in paths if p.name[:2] in selected]
        if not paths:
            raise ValueError(f"no notebook numbered {selected} in {NOTEBOOK_DIR}")
    return paths


def smoke_env(run_dir: Path, gpu: bool = False) -> dict[str, str]:
    """The environment of a smoke run: offline model, no Hub, no Gemini key; no GPU unless `gpu`."""
    env = dict(os.environ)
    env.update(
        NB_SMOKE="1",
        NB_RUN_DIR=str(run_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for secret in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        env.pop(secret, None)
    return env


def inject_parameters(nb, params: dict[str, Any]) -> None:
    """Insert a cell assigning `params` right after the cell tagged `parameters` (the form's defaults).

    Every name must be a parameter the form assigns: a typo fails here, not silently in the run.
    """
    import nbformat

    at = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if at is None:
        raise ValueError("this notebook has no cell tagged 'parameters' to override")
    known = {line.split("=", 1)[0].strip() for line in nb.cells[at].source.splitlines() if "=" in line}
    unknown = sorted(set(params) - known)
    if unknown:
        raise KeyError(f"{unknown} are not parameters of this notebook; it has {sorted(known)}")
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell("# Injected parameters\n" + source)
    cell.metadata["tags"] = ["injected-parameters"]
    if (nb.nbformat, nb.nbformat_minor) < (4, 5):  # cell ids came with 4.5: a 4.4 notebook must have none
        cell.pop("id", None)
    nb.cells.insert(at + 1, cell)


def run_notebook(
    path: Path,
    run_dir: Path,
    *,
    smoke: bool = True,
    params: dict[str, Any] | None = None,
    timeout: int = 1200,
    gpu: bool = False,
) -> Path:
    """Execute one notebook in a fresh kernel; return the executed copy's path. Raises on a failing cell.

    `params` override the notebook's form values (see `inject_parameters`).
    """
    import nbformat
    from nbclient import NotebookClient

    run_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    if params:
        inject_parameters(nb, params)
    env = smoke_env(run_dir, gpu) if smoke else {**os.environ, "NB_RUN_DIR": str(run_dir)}
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits the environment of the process that starts it
    try:
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}
        )
        client.execute()
    finally:
        out = run_dir / "executed" / path.name
        out.parent.mkdir(exist_ok=True)
        nbformat.write(nb, out)
        os.environ.clear()
        os.environ.update(old)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("numbers", nargs="*", help="notebook numbers to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="offline model, tiny data, few steps")
    parser.add_argument("--run-dir", default="runs/smoke", help="run folder shared by the notebooks")
    parser.add_argument("--params", help='JSON file: {"02": {"N_PROMPTS": 100}, ...} per notebook number')
    parser.add_argument("--timeout", type=int, default=1200, help="seconds allowed per cell")
    parser.add_argument("--gpu", action="store_true", help="smoke mode on the GPU (default: CPU only)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    params = json.loads(Path(args.params).read_text()) if args.params else {}
    paths = notebook_paths(args.numbers)
    stray = sorted(set(params) - {p.name[:2] for p in notebook_paths()})
    if stray:
        raise SystemExit(f"--params names notebooks {stray}, which do not exist; use the two-digit numbers")
    for path in paths:
        print(f"running {path.name} -> {run_dir}", flush=True)
        out = run_notebook(
            path,
            run_dir,
            smoke=args.smoke,
            params=params.get(path.name[:2]),
            timeout=args.timeout,
            gpu=args.gpu,
        )
        print(f"  ok, executed copy: {out}", flush=True)
    print(f"done: results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
