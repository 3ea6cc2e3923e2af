"""Execute the numbered notebooks headless, as Colab's Run all would (used by the tests and the README).

    python scripts/run_notebooks.py --demo         # all notebooks, offline model, demo preset -> ./runs/demo
    python scripts/run_notebooks.py --smoke        # all notebooks, offline model, tiny data -> ./runs/smoke
    python scripts/run_notebooks.py --smoke 01 02  # only these
    python scripts/run_notebooks.py --params runs/offline_run.json --run-dir runs/offline  # your parameters

`--params` names a JSON file mapping a notebook number to parameter values, e.g.
`{"02": {"N_PROMPTS": 100}}`: a cell setting them is inserted after that notebook's parameters cell, as
papermill does, so the run is exactly Run all with those values typed into the form.

`--demo` runs the notebooks of `scripts/demo_params.json` (the same format) on the offline model with no
Hub and no Gemini key, like smoke mode but not in smoke mode (`NB_SMOKE` unset, so the notebooks keep the
values given): data and training sized to finish in about a quarter of an hour on a 2-core CPU with
results that are not degenerate (a probe that reads the label, SAEs whose features fire).

Each notebook runs in a fresh kernel with `NB_RUN_DIR` pointing at one shared run folder, so later
notebooks read what earlier ones wrote, exactly as in Colab. Executed copies (with outputs) are saved
under `<run folder>/executed/` for reading; the notebooks in git stay output-free. The widgets' final
state is saved with them, and every progress bar's text is rewritten to where the bar ended (a widget's
saved text is its first frame, 0%, in any viewer that does not draw widgets, GitHub's included).

Kernels talk to the runner over Unix sockets in a private folder, not TCP ports on localhost: a port picked
free by the runner can be taken by another process before the kernel binds it, and the kernel's heartbeat
thread then dies with a `ZMQError: Address already in use` traceback in the middle of an otherwise good run.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
DEMO_PARAMS = Path(__file__).resolve().parent / "demo_params.json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def notebook_paths(selected: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if selected:
        paths = [p for p in paths if p.name[:2] in selected]
        if not paths:
            raise ValueError(f"no notebook numbered {selected} in {NOTEBOOK_DIR}")
    return paths


def smoke_env(run_dir: Path, gpu: bool = False, *, smoke: bool = True) -> dict[str, str]:
    """The environment of a smoke run: offline model, no Hub, no Gemini key; no GPU unless `gpu`.

    `smoke=False` is the demo's environment: the same isolation, without NB_SMOKE's overrides."""
    env = dict(os.environ)
    env.pop("NB_SMOKE", None)
    if smoke:
        env["NB_SMOKE"] = "1"
    env.update(
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


def _plain(widget_html: str) -> str:
    """A tqdm label widget's HTML value as text (tqdm pads with figure spaces and escapes `<`)."""
    return html.unescape(re.sub(r"<[^>]*>", "", widget_html)).replace("\u2007", " ")


def progress_text(state: dict[str, dict], model_id: str, width: int = 10) -> str | None:
    """The text of a tqdm.notebook bar where it ended, from the saved widget state; None for another widget.

    tqdm draws a bar as an HBox of (HTML label, FloatProgress, HTML counts); the text mirrors its console
    form, e.g. `sampling: 100%|██████████| 50/50 [00:03<00:00, 15.2it/s]`."""
    box = state.get(model_id, {})
    children = box.get("state", {}).get("children") or []
    if box.get("model_name") != "HBoxModel" or len(children) != 3:
        return None
    parts = [state.get(str(c).removeprefix("IPY_MODEL_"), {}) for c in children]
    if [p.get("model_name") for p in parts] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (p["state"] for p in parts)
    total, value = bar.get("max") or 0, bar.get("value") or 0
    filled = min(width, int(width * value / total)) if total > 0 else 0
    drawn = "█" * filled + " " * (width - filled) if total > 0 else ""
    return f"{_plain(left.get('value', ''))}|{drawn}|{_plain(right.get('value', ''))}"


def finish_progress_bars(nb) -> int:
    """Rewrite each widget output's text/plain to the final text of its progress bar; return how many.

    A widget's text/plain is captured when it is first displayed (tqdm's 0%); its later updates reach only
    the widget state that nbclient stores (`store_widget_state=True`) in the notebook's metadata."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    done = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = progress_text(state, view["model_id"]) if view else None
            if text is not None:
                output["data"]["text/plain"] = text
                done += 1
    return done


def run_notebook(
    path: Path,
    run_dir: Path,
    *,
    smoke: bool = True,
    params: dict[str, Any] | None = None,
    timeout: int = 1200,
    gpu: bool = False,
    offline: bool | None = None,
) -> Path:
    """Execute one notebook in a fresh kernel; return the executed copy's path. Raises on a failing cell.

    `params` override the notebook's form values (see `inject_parameters`). `offline` (default: `smoke`)
    isolates the kernel as smoke mode does (no Hub, no Gemini key, no GPU unless `gpu`); with `smoke`
    False it is the demo's environment.
    """
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    run_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    if params:
        inject_parameters(nb, params)
    offline = smoke if offline is None else offline
    env = smoke_env(run_dir, gpu, smoke=smoke) if offline else {**os.environ, "NB_RUN_DIR": str(run_dir)}
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits the environment of the process that starts it
    sockets = Path(tempfile.mkdtemp(prefix="nbk-"))  # short: a Unix socket path has at most 107 bytes
    try:
        km = AsyncKernelManager(
            kernel_name="python3", transport="ipc", connection_file=str(sockets / "kernel.json")
        )
        client = NotebookClient(
            nb,
            km=km,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(run_dir)}},
            store_widget_state=True,
        )
        client.execute(cleanup_kc=True)  # shut the kernel down: nbclient keeps a kernel it did not create
    finally:
        finish_progress_bars(nb)
        out = run_dir / "executed" / path.name
        out.parent.mkdir(exist_ok=True)
        nbformat.write(nb, out)
        os.environ.clear()
        os.environ.update(old)
        shutil.rmtree(sockets, ignore_errors=True)
    return out


def read_params(path: Path) -> dict[str, dict[str, Any]]:
    """A parameters file: {"02": {"N_PROMPTS": 100}, ...}; a notebook number that does not exist fails."""
    params = json.loads(Path(path).read_text())
    stray = sorted(set(params) - {p.name[:2] for p in notebook_paths()})
    if stray:
        raise SystemExit(f"{path} names notebooks {stray}, which do not exist; use the two-digit numbers")
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("numbers", nargs="*", help="notebook numbers to run (default: all)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="offline model, tiny data, few steps")
    mode.add_argument(
        "--demo",
        action="store_true",
        help=f"offline model, the preset {DEMO_PARAMS.name} (~15 min on 2 cores)",
    )
    parser.add_argument(
        "--run-dir", help="run folder shared by the notebooks (default runs/smoke or runs/demo)"
    )
    parser.add_argument("--params", help='JSON file: {"02": {"N_PROMPTS": 100}, ...} per notebook number')
    parser.add_argument("--timeout", type=int, default=1200, help="seconds allowed per cell")
    parser.add_argument(
        "--gpu", action="store_true", help="smoke or demo mode on the GPU (default: CPU only)"
    )
    args = parser.parse_args(argv)
    if args.demo and args.params:
        raise SystemExit("--demo runs its own preset; pass --params without --demo to run yours")
    run_dir = Path(args.run_dir or ("runs/demo" if args.demo else "runs/smoke")).resolve()
    params = read_params(DEMO_PARAMS if args.demo else args.params) if (args.demo or args.params) else {}
    paths = notebook_paths(args.numbers or (sorted(params) if args.demo else None))
    started = time.perf_counter()
    for path in paths:
        print(f"running {path.name} -> {run_dir}", flush=True)
        began = time.perf_counter()
        out = run_notebook(
            path,
            run_dir,
            smoke=args.smoke,
            offline=args.smoke or args.demo,
            params=params.get(path.name[:2]),
            timeout=args.timeout,
            gpu=args.gpu,
        )
        print(f"  ok in {time.perf_counter() - began:.0f} s, executed copy: {out}", flush=True)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min: results in {run_dir}")
    if args.demo:
        print(f"  explorer: {run_dir / 'explorer' / 'index.html'} (open it in a browser; no server needed)")
        print(f"  Neuronpedia export: {run_dir / 'neuronpedia'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
