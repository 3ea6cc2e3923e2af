"""Benchmark: the planner's predictions (helpers/plan.py) against measured time and memory, over the
notebooks run at two sizes on this machine.

Each size runs notebooks 01-04 and 06 headless in one run folder, exactly as `scripts/run_notebooks.py`
does (offline model, no Hub, no Gemini key); every plan cell prints its plan before its step and records
predicted and measured in the run's `run.json` (`plans.<step>`).

The plans are never scored on the runs they were fitted on. First the `--fit` sizes run, one after the
other, sharing one calibration file (a fresh one unless `--calibration` names one): their measured runs
are what each step's line (fixed seconds + slope x counted seconds, helpers/plan.py `fit_line`) is fitted
on. Then each `--score` size runs in a new run folder with its own copy of that fitted file, so a scored
run's plans come from the fit runs alone (never from the scored run, nor another scored size; but for a
fitted load rate, which is fitted over every step's runs and so also over the scored run's earlier steps:
`--replay` predicts from the fit runs alone). One JSON row per scored size and step: predicted and measured
wall time, process CPU time (all threads of the notebook's kernel: the fairer figure on a machine shared
with other processes, whose load stretches wall time, not CPU time), peak RSS (and peak CUDA memory with
`--gpu`), their ratios, whether each is within the issue's bounds (time ±30%, memory ±15%), the other
processes' running threads when the step was planned and while it ran (helpers/plan.py `others_running`),
the slow-down the plan put on them, how long the step's most delayed thread waited for a core (`waited_s`),
and the load average when the step began and ended. A size whose run folder (under `--runs`) has finished
the last of `--notebooks` is read, not run again.

Machine load: a size written `mid@3` runs with 3 busy processes beside it (`--background-load` for every
size), each a Python loop that never sleeps, started before the size's first notebook and stopped after its
last: the plans see them as other running threads like any other load. Fitting at one load and scoring at
another checks the planner's load rate (fitted on the fit runs, see helpers/plan.py `fit_load_rate`); the
fit needs runs of one step at different loads for a rate (e.g. `smoke smoke@2`).

Sizes: `smoke` (notebooks' smoke mode), `mid` (`MID`), `large` (`LARGE`: 3-4x mid's sampling, collection
and SAE training work, so that fit runs of smoke and large are far enough apart in counted work for a fixed
part) and `demo` (scripts/demo_params.json).

    python bench/planner.py --fit smoke large smoke@2 --score mid mid@3 --runs /tmp/planner \
        --out bench/results/planner_cpu_load.json     # fit at two loads and sizes, score at others
    python bench/planner.py                          # fit on smoke and mid, score a second smoke and mid run
    python bench/planner.py --fit smoke mid --score smoke mid --runs /tmp/planner \
        --out bench/results/planner_cpu.json
    python bench/planner.py --gpu --out bench/results/planner_gpu.json    # on a GPU machine
    python bench/planner.py --replay bench/results/planner_cpu_load.json  # its plans by this tree's planner
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import plan, run  # noqa: E402 - after the path that makes the repo importable
from scripts.run_notebooks import DEMO_PARAMS, notebook_paths, read_params, run_notebook  # noqa: E402

NOTEBOOKS = ["01", "02", "03", "04", "06"]
MID = {
    "02": {"CORPUS_TOKENS": 8192},
    "03": {"TRAIN_TOKENS": 16384, "BATCH_SIZE": 128, "CHECKPOINT_EVERY": 16, "LM_EVAL_COMPLETIONS": 4}
    | {"MIN_TOKENS": 64},
    "04": {"N_PERMUTATIONS": 19, "N_BOOTSTRAP": 50, "FEATURE_PERMUTATIONS": 99, "SWEEP_BOOTSTRAP": 10},
}
"""`mid`: the demo preset with a third of each dataset's prompts (`mid_params`), a quarter of its corpus and
training tokens and fewer permutations: about four times the smoke run's work."""
LARGE = {
    "02": {"CORPUS_TOKENS": 16384},
    "03": {"TRAIN_TOKENS": 65536, "BATCH_SIZE": 128, "CHECKPOINT_EVERY": 64, "LM_EVAL_COMPLETIONS": 4}
    | {"MIN_TOKENS": 64},
    "04": MID["04"],
}
"""`large`: the demo preset's datasets (three times mid's prompts) and four times mid's SAE training steps,
with mid's corpus doubled and mid's statistics."""
TIME_BOUND, MEMORY_BOUND = 0.30, 0.15
SIZES = ["smoke", "mid", "large", "demo"]


def size_spec(text: str) -> tuple[str, int | None]:
    """`mid` or `mid@3` (3 busy background processes while it runs) -> ("mid", 3); no @: None, which
    means `--background-load`."""
    size, _, load = text.partition("@")
    if size not in SIZES or (load and not load.isdigit()):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a size ({', '.join(SIZES)}), optionally @N busy processes"
        )
    return size, int(load) if load else None


def spin() -> None:
    """A busy background process: never sleeps, so it is always one running thread."""
    while True:
        pass


def busy_processes(n: int) -> list[multiprocessing.Process]:
    procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    return procs


def stop(procs: list[multiprocessing.Process]) -> None:
    for proc in procs:
        proc.terminate()
        proc.join()


def mid_params(preset: dict[str, dict]) -> dict[str, dict]:
    """The demo preset at the `mid` size: `MID`'s values, each of notebook 02's datasets cut to a third."""
    params = {nb: {**values, **MID.get(nb, {})} for nb, values in preset.items()}
    params["02"]["DATASETS"] = [
        {**d, "limit": max(2, d["limit"] // 3)} if "limit" in d else d for d in preset["02"]["DATASETS"]
    ]
    return params


def run_size(size: str, run_dir: Path, gpu: bool, timeout: int, notebooks: list[str], load: int = 0) -> float:
    params = read_params(DEMO_PARAMS) if size != "smoke" else {}
    if size == "mid":
        params = mid_params(params)
    if size == "large":
        params = {nb: {**values, **LARGE.get(nb, {})} for nb, values in params.items()}
    last = notebook_paths(notebooks)[-1].stem  # the run folder is read once its last notebook has run
    done = (run.read_run_json(run_dir).get("stages") or {}).get(last, {}).get("status")
    if done == "done":
        print(f"[{size}] {run_dir} has run already: its records are read", file=sys.stderr, flush=True)
        return 0.0
    began = time.perf_counter()
    background = busy_processes(load)
    try:
        for path in notebook_paths(notebooks):
            print(f"[{size}@{load}] running {path.name}", file=sys.stderr, flush=True)
            run_notebook(
                path,
                run_dir,
                smoke=size == "smoke",
                offline=True,
                params=params.get(path.name[:2]),
                timeout=timeout,
                gpu=gpu,
            )
    finally:
        stop(background)
    return time.perf_counter() - began


def within(ratio: float | None, bound: float) -> bool | None:
    return None if ratio is None else abs(ratio - 1) <= bound


def fitted_calibration(path: Path) -> plan.Calibration:
    """The one hardware entry of a calibration file the bench wrote, as the plans read it."""
    ((key, entry),) = json.loads(path.read_text()).items()
    return plan.Calibration(plan.Rates(**entry["rates"]), key, path, entry.get("runs") or {})


def rows_of(size: str, run_dir: Path, background: int = 0, frozen: Path | None = None) -> list[dict]:
    """One row a step of a scored run; with `frozen` (the fit runs' file its plans came from, not the scored
    run's copy, which has learned the scored run too) also two ratios to compare with: hindsight, measured
    over the same line times the slow-down of the other running threads measured while the step ran (the
    plan sees them only when it is made: this tells the load model's error from the error of taking the
    load at the start for the whole step); and without the load model, measured over the line fitted on the
    fit runs' times as they were measured."""
    fitted = fitted_calibration(frozen) if frozen else None
    rows = []
    for step, rec in (run.read_run_json(run_dir).get("plans") or {}).items():
        if step == "model":
            continue
        predicted, measured, ratio = rec["predicted"], rec["measured"], rec["ratio"]
        cpu_ratio = ratio.get("cpu_seconds")
        others = rec.get("others_running") or {}
        row = {
            "size": size,
            "background_load": background,
            "step": step,
            "counted_s": round(rec["counted_seconds"], 3),
            "predicted_s": round(predicted["seconds"], 2),
            "measured_s": round(measured["seconds"], 2),
            "time_ratio": round(ratio["seconds"], 3),
            "predicted_cpu_s": predicted.get("cpu_seconds") and round(predicted["cpu_seconds"], 2),
            "measured_cpu_s": measured.get("cpu_seconds") and round(measured["cpu_seconds"], 2),
            "cpu_time_ratio": cpu_ratio and round(cpu_ratio, 3),
            "predicted_ram_gb": round(predicted["ram_gb"], 3),
            "measured_ram_gb": round(measured["ram_gb"], 3),
            "ram_ratio": round(ratio["ram_gb"], 3),
            "load_average": rec.get("load_average"),
            "others_running_planned": others.get("planned") and round(others["planned"], 2),
            "others_running_measured": others.get("measured") and round(others["measured"], 2),
            "planned_slowdown": rec.get("slowdown") and round(rec["slowdown"], 3),
            "waited_s": rec.get("waited_seconds") and round(rec["waited_seconds"], 2),
            "threads": rec.get("threads"),
            "time_within_30pct": within(ratio["seconds"], TIME_BOUND),
            "cpu_time_within_30pct": within(cpu_ratio, TIME_BOUND),
            "ram_within_15pct": within(ratio["ram_gb"], MEMORY_BOUND),
        }
        line = fitted.line(step, threads=rec.get("threads")) if fitted else None
        seen = others.get("measured")
        if line and seen is not None:
            hindsight = measured["seconds"] / line(
                rec["counted_seconds"], plan.crowding(seen, rec.get("threads"))
            )
            row["hindsight_time_ratio"] = round(hindsight, 3)
            row["hindsight_within_30pct"] = within(hindsight, TIME_BOUND)
        runs = fitted.runs.get(step) if fitted else None
        if runs:
            unloaded = measured["seconds"] / plan.fit_line([(r["counted"], r["seconds"]) for r in runs])(
                rec["counted_seconds"]
            )
            row["no_load_model_time_ratio"] = round(unloaded, 3)
            row["no_load_model_within_30pct"] = within(unloaded, TIME_BOUND)
        if "gpu_gib" in ratio:
            row |= {
                "gpu_ratio": round(ratio["gpu_gib"], 3),
                "gpu_within_15pct": within(ratio["gpu_gib"], 0.15),
            }
        rows.append(row)
    return rows


def fitted_lines(calibration: Path) -> dict[str, dict]:
    """Each step's fitted wall-time and CPU-time lines (with the load rate fitted over all steps) in the
    calibration file (the fit runs' record), and the runs they were fitted on."""
    out = {}
    fitted = fitted_calibration(calibration)
    for step, runs in fitted.runs.items():
        lines = {m: fitted.line(step, m) for m in ("seconds", "cpu_seconds")}
        out[step] = {m: asdict(line) for m, line in lines.items() if line} | {"runs": runs}
    return out


def replay(earlier: dict) -> dict:
    """An earlier bench JSON's scored steps predicted again by this tree's helpers/plan.py from the same fit
    runs (its `lines[step]["runs"]`) and the other running threads each plan saw: what a change to the
    fitting or the load model would have predicted, without running the notebooks again. Time only (the
    counted work and RAM are as recorded)."""
    runs = {step: entry["runs"] for step, entry in earlier["lines"].items()}
    calibration = plan.Calibration(plan.Rates(1.0, 1.0, 1.0, "replayed"), "replay", Path(os.devnull), runs)
    rows = []
    for row in earlier["rows"]:
        # the scored step's thread count (rows since matched threads keep it), else its first fit run's
        threads = row.get("threads") or next((r.get("threads") for r in runs.get(row["step"], [])), None)
        crowded = plan.crowding(row.get("others_running_planned"), threads and int(threads))
        out = {k: row.get(k) for k in ("size", "background_load", "step", "others_running_planned")}
        for measured, key in (("seconds", "measured_s"), ("cpu_seconds", "measured_cpu_s")):
            line = calibration.line(row["step"], measured, row.get("threads"))
            if line is None or row.get(key) is None:
                continue
            ratio = row[key] / line(row["counted_s"], crowded)
            name = "time" if measured == "seconds" else "cpu_time"
            out[f"{name}_ratio_then"] = row.get(f"{name}_ratio")
            out |= {f"{name}_ratio": round(ratio, 3), f"{name}_within_30pct": within(ratio, TIME_BOUND)}
        rows.append(out)
    counts = {key: count(rows, key) for key in ("time_within_30pct", "cpu_time_within_30pct")}
    then = {f"{key}_then": earlier.get(key) for key in counts}
    return {"replayed": earlier.get("command"), "commit": git_commit(), **counts, **then, "rows": rows}


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def count(rows: list[dict], key: str) -> str:
    judged = [r[key] for r in rows if r.get(key) is not None]
    return f"{sum(judged)}/{len(judged)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--fit",
        nargs="+",
        default=[("smoke", None), ("mid", None)],
        type=size_spec,
        help="sizes fitted on (mid@3: with load)",
    )
    parser.add_argument(
        "--score", nargs="+", default=[("smoke", None), ("mid", None)], type=size_spec, help="sizes scored"
    )
    parser.add_argument(
        "--background-load", type=int, default=0, help="busy processes beside every size without its own @N"
    )
    parser.add_argument("--runs", default=None, help="folder for the run folders (default: a temporary one)")
    parser.add_argument("--calibration", default=None, help="calibration file fitted (default: a fresh one)")
    parser.add_argument("--gpu", action="store_true", help="run the notebooks on the GPU")
    parser.add_argument(
        "--notebooks", nargs="+", default=NOTEBOOKS, help="which notebooks to run (01-02 must have run first)"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument(
        "--replay", default=None, help="predict an earlier JSON's scored steps again with this tree's planner"
    )
    args = parser.parse_args(argv)
    if args.replay:
        text = json.dumps(replay(json.loads(Path(args.replay).read_text())), indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    runs = Path(args.runs or tempfile.mkdtemp(prefix="planner-bench-"))
    fitted = Path(args.calibration or runs / "plan_calibration.json").resolve()

    def named(size: str, load: int | None) -> tuple[str, int]:
        load = args.background_load if load is None else load
        return (f"{size}@{load}" if load else size), load

    out = {
        "command": "python bench/planner.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start",
        "fit_sizes": [named(*s)[0] for s in args.fit],
        "score_sizes": [named(*s)[0] for s in args.score],
        "commit": git_commit(),
    }
    os.environ["NB_PLAN_CALIBRATION"] = str(fitted)
    # The notebooks' kernels import this tree's helpers package, not the one pip installed (an editable
    # install points at the main checkout: a worktree's bench would otherwise plan with main's planner).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out["helpers"] = str(ROOT / "helpers")
    for size, load in args.fit:
        name, load = named(size, load)
        seconds = run_size(size, runs / f"fit-{name}", args.gpu, args.timeout, args.notebooks, load)
        out[f"fit_{name}_minutes"] = round(seconds / 60, 1)
    out["lines"] = fitted_lines(fitted)
    out["rows"] = []
    for size, load in args.score:
        name, load = named(size, load)
        run_dir = runs / f"score-{name}"
        frozen = runs / f"score-{name}-calibration.json"
        if not frozen.exists():  # the fit runs' file as it was: the scored run learns into its own copy
            shutil.copyfile(fitted, frozen)
        os.environ["NB_PLAN_CALIBRATION"] = str(frozen.resolve())
        seconds = run_size(size, run_dir, args.gpu, args.timeout, args.notebooks, load)
        out["rows"] += rows_of(name, run_dir, load, fitted)
        out[f"score_{name}_minutes"] = round(seconds / 60, 1)
    out["load_average_end"] = round(os.getloadavg()[0], 1)
    keys = ("time_within_30pct", "cpu_time_within_30pct", "ram_within_15pct", "gpu_within_15pct")
    for key in (*keys, "hindsight_within_30pct", "no_load_model_within_30pct"):
        out[key] = count(out["rows"], key)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
