"""Benchmark: what notebook 07's sweep costs over running the same stages one model at a time by hand, and
whether memory returns to its baseline between models.

Both arms run the same models through the same stage functions (`helpers.sweep.pipeline.stage_load`,
`stage_collect`, `stage_train`, `stage_analyse`: what notebooks 01–04's cells call) with the same study,
each model into a fresh run folder:
- `direct`: the four stages called in a row per model, nothing else (the notebooks run one by one);
- `sweep`: `run_sweep` (sweep.json written per stage, markers checked, memory freed and measured between
  models, failures caught).
The sweep's fixed cost per model is mostly one full `gc.collect()` between models (about 1 s with
transformers loaded on a busy 2-core machine), so the ratio shrinks as models get real: the JSON also gives
the seconds per model. Running notebooks 01–04 by hand costs more than `direct`: each notebook is a fresh
kernel that imports everything again, and 01, 02 and 03 each load the model.
The arms alternate (direct, sweep, direct, sweep, ...) in this one process so that a machine shared with
other jobs slows both alike; the overhead is the median sweep time over the median direct time, minus 1
(target ≤ 5%). Memory: the process's RSS before the first model (the baseline) and after each model of
the last sweep (sweep.json's `memory_after`), and the peak RSS sampled every 50 ms during it; on CUDA
also the allocated GPU memory. The models are tiny random checkpoints (helpers.sweep.tiny) and, with
`--offline`, the offline SmolLM2-135M between them (540 MB of fp32 weights: a leak would show).

    python bench/sweep.py                       # 3 tiny models, 2 repetitions of each arm, 1 thread
    python bench/sweep.py --offline --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

import helpers
from helpers.sweep import pipeline as runner
from helpers.sweep.pipeline import TINY_STUDY, Study, SweepFolders, free_memory, run_sweep
from helpers.sweep.plan import ModelSpec, model_keys
from helpers.sweep.tiny import tiny_random_model

STUDY = dict(
    TINY_STUDY,
    datasets=[
        {"data": "builtin:contrast", "role": "train", "label_by": "instruction"},
        {"data": "builtin:scenarios", "role": "eval", "label_by": "judge", "limit": 3},
        {"data": "builtin:benign", "role": "control", "limit": 3},
    ],
    architectures=["topk"],
)


def direct(models: list[str], study: Study, root: Path, cache: Path) -> float:
    """The stages one model at a time, nothing around them; seconds."""
    specs = [ModelSpec.of(m) for m in models]
    t0 = time.perf_counter()
    for spec, key in zip(specs, model_keys(specs), strict=True):
        run_dir = root / key
        run_dir.mkdir(parents=True)
        lm = runner._Lazy(run_dir, "cpu", cache)
        runner.stage_load(run_dir, spec, study, lm)
        runner.stage_collect(run_dir, study, lm)
        runner.stage_train(run_dir, study, lm, "cpu")
        lm.free()
        runner.stage_analyse(run_dir, study)
    return time.perf_counter() - t0


class PeakRSS:
    """The process's largest RSS, sampled every 50 ms on a thread while the block runs."""

    def __enter__(self):
        self.peak, self.stop = 0, threading.Event()
        proc = psutil.Process()

        def poll():
            while not self.stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.05)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--offline", action="store_true", help="add the offline SmolLM2-135M between tiny models"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # the stages' progress lines; stdout carries the JSON only
        out = measure(args)
    print(json.dumps(out, indent=1))


def measure(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    cache = work / "cache"
    models = [
        str(tiny_random_model(work / "models" / "llama", "llama")),
        str(tiny_random_model(work / "models" / "gpt_neox", "gpt_neox", n_layers=3)),
    ]
    if args.offline:
        models.insert(1, helpers.OFFLINE_MODEL)
    study = Study(**STUDY)
    direct(
        models, study, work / "warmup", cache
    )  # imports, conversions and dataset reads, once, for both arms
    baseline = free_memory("cpu")
    times = {"direct": [], "sweep": []}
    state = {}
    for rep in range(args.reps):
        times["direct"].append(direct(models, study, work / f"direct{rep}", cache))
        folders = SweepFolders(work / f"sweep{rep}", "bench")
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            state = run_sweep(models, study, folders, device="cpu", cache_dir=cache)
            times["sweep"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    after = {k: v["memory_after"]["rss_gb"] for k, v in state["models"].items()}
    out = {
        "models": models,
        "threads": args.threads,
        "reps": args.reps,
        "seconds": times,
        "median_seconds": med,
        "overhead": med["sweep"] / med["direct"] - 1,
        "status": {k: v["status"] for k, v in state["models"].items()},
        "rss_gb_baseline": baseline["rss_gb"],
        "rss_gb_after_each_model": after,
        "rss_gb_peak_last_sweep": peak.peak / 1e9,
        "rss_gb_after_minus_baseline_max": max(after.values()) - baseline["rss_gb"],
        "cuda": torch.cuda.is_available(),
        "seconds_per_model_over_direct": (med["sweep"] - med["direct"]) / len(models),
    }
    return out


if __name__ == "__main__":
    main()
