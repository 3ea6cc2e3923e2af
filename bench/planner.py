"""Benchmark: the planner's predictions (helpers/plan.py) against measured time and memory, over the
notebooks run at two sizes on this machine.

Each size runs notebooks 01-04 and 06 headless in one run folder, exactly as `scripts/run_notebooks.py`
does (offline model, no Hub, no Gemini key); every plan cell prints its plan before its step and records
predicted and measured in the run's `run.json` (`plans.<step>`). This script reads those records and prints
one JSON row per size and step: predicted and measured wall time, peak RSS (and peak CUDA memory with
`--gpu`), their ratios, and whether each is within the issue's bounds (time ±30%, memory ±15%).

One calibration file is shared by the sizes (a fresh one unless `--calibration` names one): the first
size's plans come from the calibrated FLOP and copy rates alone (no earlier run of a step on this
hardware), its measured/counted ratios are kept, and the second size's plans use them, as a user's second
run on the same hardware would. So the second size is the test of how the plans scale. A size whose run
folder (under `--runs`) has finished notebook 06 is read, not run again.

    python bench/planner.py                          # smoke, then the demo preset (scripts/demo_params.json)
    python bench/planner.py --sizes smoke mid --runs /tmp/planner --out bench/results/planner_cpu.json
    python bench/planner.py --gpu --out bench/results/planner_gpu.json    # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.run import read_run_json  # noqa: E402 - after the path that makes the repo importable
from scripts.run_notebooks import DEMO_PARAMS, notebook_paths, read_params, run_notebook  # noqa: E402

NOTEBOOKS = ["01", "02", "03", "04", "06"]
MID = {
    "02": {
        "DATASETS": [
            {"data": "builtin:contrast", "role": "train", "label_by": "instruction", "limit": 32},
            {"data": "builtin:scenarios", "role": "eval", "label_by": "judge", "limit": 6},
            {"data": "builtin:benign", "role": "control", "limit": 6},
        ],
        "CORPUS_TOKENS": 8192,
    },
    "03": {"TRAIN_TOKENS": 16384, "BATCH_SIZE": 128, "CHECKPOINT_EVERY": 16, "LM_EVAL_COMPLETIONS": 4}
    | {"MIN_TOKENS": 64},
    "04": {"N_PERMUTATIONS": 19, "N_BOOTSTRAP": 50, "FEATURE_PERMUTATIONS": 99, "SWEEP_BOOTSTRAP": 10},
}
"""`mid`: the demo preset with a third of its prompts, a quarter of its corpus and training tokens and fewer
permutations: about four times the smoke run's work, for a machine too busy for the demo."""
TIME_BOUND, MEMORY_BOUND = 0.30, 0.15


def run_size(size: str, run_dir: Path, gpu: bool, timeout: int, notebooks: list[str]) -> float:
    params = read_params(DEMO_PARAMS) if size != "smoke" else {}
    if size == "mid":
        params = {nb: {**values, **MID.get(nb, {})} for nb, values in params.items()}
    done = (read_run_json(run_dir).get("stages") or {}).get("06_explore_features", {}).get("status")
    if done == "done":
        print(f"[{size}] {run_dir} has run already: its records are read", file=sys.stderr, flush=True)
        return 0.0
    began = time.perf_counter()
    for path in notebook_paths(notebooks):
        print(f"[{size}] running {path.name}", file=sys.stderr, flush=True)
        run_notebook(
            path,
            run_dir,
            smoke=size == "smoke",
            offline=True,
            params=params.get(path.name[:2]),
            timeout=timeout,
            gpu=gpu,
        )
    return time.perf_counter() - began


def rows_of(size: str, run_dir: Path) -> list[dict]:
    rows = []
    for step, rec in (read_run_json(run_dir).get("plans") or {}).items():
        if step == "model":
            continue
        ratio = rec["ratio"]
        row = {
            "size": size,
            "step": step,
            "predicted_s": round(rec["predicted"]["seconds"], 2),
            "measured_s": round(rec["measured"]["seconds"], 2),
            "counted_s": round(rec["counted_seconds"], 3),
            "time_ratio": round(ratio["seconds"], 3),
            "predicted_ram_gb": round(rec["predicted"]["ram_gb"], 3),
            "measured_ram_gb": round(rec["measured"]["ram_gb"], 3),
            "ram_ratio": round(ratio["ram_gb"], 3),
            "time_within_30pct": abs(ratio["seconds"] - 1) <= TIME_BOUND,
            "ram_within_15pct": abs(ratio["ram_gb"] - 1) <= MEMORY_BOUND,
        }
        if "gpu_gib" in ratio:
            row |= {
                "gpu_ratio": round(ratio["gpu_gib"], 3),
                "gpu_within_15pct": abs(ratio["gpu_gib"] - 1) <= 0.15,
            }
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["smoke", "demo"], choices=["smoke", "mid", "demo"])
    parser.add_argument("--runs", default=None, help="folder for the run folders (default: a temporary one)")
    parser.add_argument("--calibration", default=None, help="calibration file (default: a fresh one)")
    parser.add_argument("--gpu", action="store_true", help="run the notebooks on the GPU")
    parser.add_argument(
        "--notebooks", nargs="+", default=NOTEBOOKS, help="which notebooks to run (01-02 must have run first)"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="planner-bench-"))
    os.environ["NB_PLAN_CALIBRATION"] = str(
        Path(args.calibration or runs / "plan_calibration.json").resolve()
    )
    out = {
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start",
        "rows": [],
    }
    for size in args.sizes:
        run_dir = runs / size
        seconds = run_size(size, run_dir, args.gpu, args.timeout, args.notebooks)
        out["rows"] += rows_of(size, run_dir)
        out[f"{size}_minutes"] = round(seconds / 60, 1)
    out["load_average_end"] = round(os.getloadavg()[0], 1)
    rows = out["rows"]
    out["time_within_30pct"] = f"{sum(r['time_within_30pct'] for r in rows)}/{len(rows)}"
    out["ram_within_15pct"] = f"{sum(r['ram_within_15pct'] for r in rows)}/{len(rows)}"
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
