"""Benchmark: do notebook 04's statistics give the same numbers on every device path?

`logistic.DEVICE` picks where the batched logistic fits, the probes' design products and the feature
permutation tests run: numpy on the CPU (None, without a GPU), torch on a named device ("cpu", "cuda").
This runs whole probes (grouped CV, permutations, refitted bootstrap) and feature tables on the
calibration worlds of tests/null_worlds.py (each design, null and planted) on every path available
and reports the largest difference from the numpy path, with the time each path took.

    python bench/device_stats.py                 # numpy and torch on the CPU (+ cuda when there is one)
    python bench/device_stats.py --worlds 4 --paths numpy,cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers.analysis import features, logistic, probes  # noqa: E402
from tests import null_worlds  # noqa: E402

TOLERANCE = {"oof_proba": 1e-6, "p_value": 1e-9, "ci": 1e-6, "cohens_d": 1e-9, "feature_p": 1e-9}
"""Largest difference from the numpy path that counts as the same number (the solver's own tolerance
moves out-of-fold probabilities ~1e-5; a p-value or interval moves only when a refit lands on a tie)."""


def run_path(path: str, worlds: int, n_permutations: int, n_bootstrap: int) -> tuple[list, float]:
    logistic.DEVICE = None if path == "numpy" else path
    out, start = [], time.perf_counter()
    for design in null_worlds.DESIGNS:
        for w in range(worlds):
            signal = 0.0 if w % 2 == 0 else 1.5
            W = null_worlds.dense_world(
                np.random.default_rng([7, w]), design, signal=signal, **null_worlds.PROBE_SIZE
            )
            S = null_worlds.sparse_world(
                np.random.default_rng([8, w]), design, n_groups=24, d=60, signal=signal, n_signal=3
            )
            r = probes.probe(
                W.X,
                W.y,
                W.groups,
                prompts=W.prompts,
                n_permutations=n_permutations,
                n_bootstrap=n_bootstrap,
                seed=w,
            )
            f = features.select_and_report(
                S.X, S.y, S.groups, prompts=S.prompts, k=5, n_permutations=999, seed=w
            )
            out.append((r, f))
    if path.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def differences(ref: list, got: list) -> dict[str, float]:
    diff = dict.fromkeys(TOLERANCE, 0.0)
    for (a, fa), (b, fb) in zip(ref, got, strict=True):
        diff["oof_proba"] = max(diff["oof_proba"], float(np.abs(a.oof_proba - b.oof_proba).max()))
        diff["p_value"] = max(diff["p_value"], abs(a.p_value - b.p_value))
        ci = np.abs(np.r_[a.ba_ci, a.auroc_ci, a.boot_auroc] - np.r_[b.ba_ci, b.auroc_ci, b.boot_auroc])
        diff["ci"] = max(diff["ci"], float(ci.max()))
        if [r["feature"] for r in fa] != [r["feature"] for r in fb]:
            diff["cohens_d"] = diff["feature_p"] = float("inf")  # other features chosen
            continue
        for key, col in (("cohens_d", "cohens_d"), ("feature_p", "p_value")):
            diff[key] = max(diff[key], max(abs(x[col] - y[col]) for x, y in zip(fa, fb, strict=True)))
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = "numpy,cpu,cuda" if torch.cuda.is_available() else "numpy,cpu"
    ap.add_argument("--paths", default=default, help="numpy (the CPU path) first, then torch devices")
    ap.add_argument("--worlds", type=int, default=2, help="worlds per design (even: null, odd: planted)")
    ap.add_argument("--permutations", type=int, default=99)
    ap.add_argument("--bootstrap", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    paths = args.paths.split(",")
    if paths[0] != "numpy":
        ap.error("--paths must start with numpy: the others are compared with it")
    torch.set_num_threads(args.threads)
    results, seconds = {}, {}
    with threadpool_limits(limits=args.threads):
        for path in paths:
            results[path], seconds[path] = run_path(path, args.worlds, args.permutations, args.bootstrap)
    diffs = {p: differences(results["numpy"], results[p]) for p in paths[1:]}
    print(
        json.dumps(
            {
                "benchmark": (
                    "statistics on each device path against numpy, calibration worlds (bench/device_stats.py)"
                ),
                "command": " ".join(["python", "bench/device_stats.py", *sys.argv[1:]]),
                "machine": f"{platform.machine()}, {args.threads} threads",
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "worlds": args.worlds * len(null_worlds.DESIGNS),
                "permutations": args.permutations,
                "bootstrap": args.bootstrap,
                "seconds": {p: round(s, 2) for p, s in seconds.items()},
                "max_abs_difference_from_numpy": diffs,
                "tolerance": TOLERANCE,
                "same_numbers": all(d[k] <= TOLERANCE[k] for d in diffs.values() for k in TOLERANCE),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
