"""Benchmark: notebook 04's feature table (`features.select_and_report`, once per SAE) before vs after,
in ONE process, on bench/probe_cost.py's d32 data (816 completions x 16,384 SAE features, ~6% non-zero),
in process CPU seconds on 1 thread, user and system time apart (resource.getrusage: system time is
mostly the page faults of fresh work arrays), the two versions called in turn.

Both versions of the `helpers` package live in this process: the baseline checkout's is imported first,
its modules moved out of sys.modules, then this checkout's is imported; each function keeps its own
module's globals. The bench asserts that every output field agrees: the rows of select_and_report, and
feature_stats over all 16,384 features on both splits (AUROC, firing rates, counts and the chosen
features bitwise; means, d and its CI within 1e-12 relative, or 1e-12 of the CI's width).

    git worktree add --detach /tmp/base <commit>   # the code before
    python bench/feature_table_cost.py --baseline /tmp/base --rounds 5 \\
        --out bench/results/feature_table_cost_cpu_s15.json
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parent.parent


def load_features(checkout: Path):
    """helpers.analysis.features of `checkout`, imported afresh (any other helpers in sys.modules moved
    out first, so its `from helpers... import` lines bind to the same checkout)."""
    for name in [m for m in sys.modules if m == "helpers" or m.startswith("helpers.")]:
        del sys.modules[name]
    sys.path.insert(0, str(checkout))
    try:
        module = importlib.import_module("helpers.analysis.features")
    finally:
        sys.path.remove(str(checkout))
    if not Path(module.__file__).resolve().is_relative_to(checkout.resolve()):
        raise RuntimeError(f"imported {module.__file__}, not from {checkout}")
    return module


def cost(fn) -> tuple[float, float, int, int, object]:
    """(user s, system s, minor page faults, full garbage collections, result) of one call."""
    g, a = gc.get_stats()[2]["collections"], resource.getrusage(resource.RUSAGE_SELF)
    out = fn()
    b = resource.getrusage(resource.RUSAGE_SELF)
    return (
        b.ru_utime - a.ru_utime,
        b.ru_stime - a.ru_stime,
        b.ru_minflt - a.ru_minflt,
        gc.get_stats()[2]["collections"] - g,
        out,
    )


def max_rel(a: np.ndarray, b: np.ndarray, width: np.ndarray | None = None) -> float:
    """Largest |a - b| / max(|a|, |b|, width) over finite entries; inf where nan/inf patterns differ."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if not np.array_equal(np.isfinite(a), np.isfinite(b)) or not same[~np.isfinite(a)].all():
        return float("inf")
    fin = np.isfinite(a)
    den = np.maximum(np.abs(a), np.abs(b))
    if width is not None:
        den = np.maximum(den, np.asarray(width, float))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(same, 0.0, np.abs(a - b) / den)
    return float(r[fin].max()) if fin.any() else 0.0


CLOSE = ("cohens_d", "select_cohens_d", "mean_honest", "mean_deceptive", "d_ci")  # to 1e-12; the rest bitwise


def compare(old: list[dict], new: list[dict]) -> dict:
    """Per field: 'equal' (bitwise, nan == nan) or the largest relative difference (`CLOSE` fields,
    the CI's relative to its width at least); raises past the tolerance."""
    if [sorted(r) for r in old] != [sorted(r) for r in new]:
        raise AssertionError("the rows differ in number or fields")
    out = {}
    for key in old[0]:
        a, b = [r[key] for r in old], [r[key] for r in new]
        if key in CLOSE:
            a, b = np.array(a, float), np.array(b, float)
            width = np.abs(np.diff(a, axis=1)) if key == "d_ci" else None
            diff = max_rel(a, b, None if width is None else np.nan_to_num(width, posinf=0.0))
            if diff > 1e-12:
                raise AssertionError(f"{key}: the versions differ by {diff:.3g} (relative)")
        else:
            same = [
                x == z or (isinstance(x, float) and np.isnan(x) and np.isnan(z))
                for x, z in zip(a, b, strict=True)
            ]
            if not all(same):
                raise AssertionError(
                    f"{key}: the versions differ at {same.index(False)}: {a[same.index(False)]}"
                )
            diff = 0.0
        out[key] = "equal" if diff == 0 else f"max relative difference {diff:.2g}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a checkout of the code before (git worktree)")
    ap.add_argument("--rounds", type=int, default=5, help="calls of each version, in turn")
    ap.add_argument("--n", type=int, default=816, help="completions (816: the analysis split of 1,632)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE / "bench"))
    from probe_cost import d32_data  # noqa: E402  (the data only; its helpers import is this checkout's)

    base = Path(args.baseline).resolve()
    versions = {"baseline": load_features(base), "current": load_features(HERE)}
    _raw, sae, y, groups, prompts = d32_data(args.n)
    del _raw
    runs: dict[str, dict[str, list]] = {
        v: {"user_s": [], "system_s": [], "minor_faults": [], "gen2_collections": []} for v in versions
    }
    rows = {}
    with threadpool_limits(limits=1):
        import torch

        torch.set_num_threads(1)
        for _ in range(args.rounds):
            for name, F in versions.items():
                u, s, f, g, rows[name] = cost(
                    lambda F=F: F.select_and_report(
                        sae, y, groups, prompts=prompts, k=20, n_permutations=2000
                    )
                )
                runs[name]["user_s"].append(round(u, 3))
                runs[name]["system_s"].append(round(s, 3))
                runs[name]["minor_faults"].append(f)
                runs[name]["gen2_collections"].append(g)
        # every feature on both splits, as select_and_report computes them
        F0, F1 = versions["baseline"], versions["current"]
        sel, held = F0.split_by_group(np.asarray(groups), 0.5, 0, y=y)
        agree = {
            "select_and_report_rows": compare(rows["baseline"], rows["current"]),
            "feature_stats_selection_split": compare(
                F0.feature_stats(sae[sel], y[sel], ci=False), F1.feature_stats(sae[sel], y[sel], ci=False)
            ),
            "feature_stats_heldout_split": compare(
                F0.feature_stats(sae[held], y[held], groups=groups[held]),
                F1.feature_stats(sae[held], y[held], groups=groups[held]),
            ),
        }

    def med(v):
        return round(statistics.median(v), 3)

    summary = {
        name: {
            "median_user_s": med(r["user_s"]),
            "median_system_s": med(r["system_s"]),
            "median_user_plus_system_s": med(
                [a + b for a, b in zip(r["user_s"], r["system_s"], strict=True)]
            ),
            **r,
        }
        for name, r in runs.items()
    }
    commit = subprocess.run(
        ["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    current = subprocess.run(
        ["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    out = {
        "benchmark": (
            "features.select_and_report at d32 scale, before vs after in one process "
            "(bench/feature_table_cost.py)"
        ),
        "command": " ".join(["python", "bench/feature_table_cost.py", *sys.argv[1:]]),
        "note": (
            "process CPU seconds (getrusage) of one select_and_report call (k=20, 2,000 permutations) on "
            "bench/probe_cost.py's d32_data, 1 BLAS/torch thread, the two versions called in turn "
            f"{args.rounds} times each; the machine is shared (2 cores), so compare medians. "
            "'agreement': every output field of the two versions, asserted by the bench."
        ),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, python {platform.python_version()}",
        "baseline_commit": commit,
        "current_commit": current,
        "n_completions": args.n,
        "d_sae": int(sae.shape[1]),
        "nonzero_fraction": round(float((sae != 0).mean()), 4),
        **summary,
        "current_over_baseline_user_plus_system": round(
            summary["current"]["median_user_plus_system_s"]
            / summary["baseline"]["median_user_plus_system_s"],
            3,
        ),
        "agreement": agree,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
