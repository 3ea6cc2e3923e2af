"""Benchmark: are the suite's p-values and CIs calibrated? The larger version of
tests/analysis/test_calibration.py, measuring this checkout ("after") and, when an older checkout is
given, the code it replaced ("before") on the very same simulated worlds (tests/null_worlds.py).

Prints one JSON object: per statistic, its false-positive rate at alpha or its CI coverage, before ->
after, with the number of worlds. Null worlds have group- and prompt-level random effects and no
label signal; the probe CI is also checked in worlds with a planted signal, whose true balanced
accuracy (of a probe trained on 4/5 of the groups, on new groups) is found by Monte Carlo.

    git worktree add /tmp/oldmain 2d3aafb      # the code before issue 11
    python bench/calibration.py --old-checkout /tmp/oldmain > bench/results/calibration.json
    python bench/calibration.py --scale 0.2    # a quick look, this checkout only
    python bench/calibration.py --scale 0.2 --only "rare,CI of d,one-label,80/20"   # issue 19's designs

The "before" side runs in a child process whose `helpers` is the old checkout's (same worlds, same
seeds); a statistic the old code did not have is reported as null there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent


def old_impl(checkout: str) -> SimpleNamespace:
    """The statistics of the pre-issue-11 layout (flat helpers/: probes, features, steering_eval,
    scoring, contexts), in the shape of tests.null_worlds.current()."""
    sys.path.insert(0, checkout)
    for name in [m for m in sys.modules if m == "helpers" or m.startswith("helpers.")]:
        del sys.modules[name]
    from helpers import contexts, features, probes, scoring, steering_eval

    assert str(Path(probes.__file__).resolve()).startswith(str(Path(checkout).resolve())), probes.__file__

    def probe(X, y, groups, prompts, *, n_permutations, n_bootstrap, seed):
        r = probes.probe(
            X, y, groups, n_permutations=n_permutations, n_bootstrap=max(n_bootstrap, 1), seed=seed
        )
        return r.p_value, r.ba_ci, r.auroc_ci, r

    def compare(a, b):
        c = probes.compare_paired(a, b, n_bootstrap=200)
        return c["p_value"], c["ba_difference_ci"], c["auroc_difference_ci"]

    def feature_tests(acts, y, groups, prompts, *, k, n_permutations, seed):
        rows = features.select_and_report(acts, y, groups, k=k, n_bootstrap=200, seed=seed)
        groups = np.asarray([str(g) for g in groups])
        _, held = features.split_by_group(groups, 0.5, seed, y=np.asarray(y))
        q_all = [r["q_value"] for r in features.feature_stats(acts[held], np.asarray(y)[held], n_bootstrap=0)]
        return [(r["u_p_value"], r["q_value_selected"], r["d_ci"]) for r in rows], q_all

    def steering(rows):
        return [(o["p_value"], o["difference_ci"]) for o in steering_eval.compare_to_controls(rows)]

    return SimpleNamespace(
        name="before",
        probe=probe,
        compare=compare,
        feature_tests=feature_tests,
        steering=steering,
        rate_ci=lambda s: steering_eval.condition_stats(s)["rate_ci"],
        reserved=lambda records, seed: None,
        fuzzing_windows=scoring.fuzzing_windows,
        window_record=contexts.window_record,
        FeatureContexts=contexts.FeatureContexts,
    )


def probe_truth(signal: float, n_rep: int, size: dict) -> float:
    """True balanced accuracy of a probe trained on 4/5 of a world's groups, on fresh groups."""
    from helpers.analysis import logistic, probes
    from helpers.stats import balanced_accuracy
    from tests.null_worlds import dense_world

    out = []
    for i in range(n_rep):
        rng = np.random.default_rng([99, i])
        train = dense_world(
            rng, "contrast", **{**size, "n_groups": size["n_groups"] * 4 // 5, "signal": signal}
        )
        test = dense_world(rng, "contrast", **{**size, "n_groups": 300, "signal": 0.0})
        test.X += signal * 0.5 * np.outer(test.y, train.direction)  # the same planted direction
        X = np.r_[train.X, test.X]
        Z_tr, Z_te = probes.standardised_design(X, np.arange(len(train.y)), np.arange(len(train.y), len(X)))
        W, c = logistic.fit(Z_tr, train.y[None], logistic.balanced_weights(train.y), 1.0)
        out.append(balanced_accuracy(logistic.predict_proba(Z_te, W, c)[0], test.y))
    return float(np.mean(out))


W1 = dict(n_groups=40, n_prompts=4, n_samples=4, d=16)  # the referee's W1 world (contrast: 2 prompts)
SIGNALS = (3.0, 8.0, 20.0)


def signal_coverage(impl, signal: float, truth: float, n_worlds: int, size: dict, n_bootstrap: int) -> dict:
    from tests.null_worlds import dense_world

    cov = []
    for w in range(n_worlds):
        W = dense_world(np.random.default_rng([12, w]), "contrast", **{**size, "signal": signal})
        _, (lo, hi), _, r = impl.probe(
            W.X, W.y, W.groups, W.prompts, n_permutations=0, n_bootstrap=n_bootstrap, seed=w
        )
        cov.append(lo <= truth <= hi)
    return {"n_worlds": n_worlds, "true_balanced_accuracy": truth, "ba_ci_coverage": float(np.mean(cov))}


def measure(impl, scale: float, which: set[str] | None, truths: dict[str, float], cache: Path | None) -> dict:
    """Every statistic of `impl` on the bench's worlds (counts scaled by `scale`); `truths`: the signal
    worlds' true balanced accuracy by signal; results already in `cache` (same impl and scale) are reused."""
    from tests import null_worlds as nw

    def n(count: int) -> int:
        return max(10, int(count * scale))

    w1 = W1
    w3 = dict(n_groups=226, n_prompts=4, n_samples=4, d=2000, prompt_share=0.5)  # W3: the README's run
    jobs = {
        **{
            f"probe permutation p ({d})": (
                lambda d=d: nw.probe_calibration(impl, d, n(300), size=w1, n_bootstrap=0)
            )
            for d in nw.DESIGNS
        },
        **{
            f"probe CIs, null ({d})": (
                lambda d=d: nw.probe_calibration(
                    impl, d, n(150), size=w1, n_permutations=0, n_bootstrap=100, seed=1
                )
            )
            for d in nw.DESIGNS
        },
        **{
            f"probe BA CI, signal {s}": (
                lambda s=s: signal_coverage(impl, s, truths[str(s)], n(150), w1, 100)
            )
            for s in SIGNALS
        },
        **{
            f"paired raw-vs-SAE test ({d})": (lambda d=d: nw.paired_calibration(impl, d, n(300), size=w1))
            for d in nw.DESIGNS
        },
        "paired difference CIs (contrast)": lambda: nw.paired_calibration(
            impl, "contrast", n(150), size=w1, n_bootstrap=100
        ),
        **{
            f"held-out feature tests ({d})": (
                lambda d=d: nw.feature_calibration(impl, d, n(150), n_permutations=999)
            )
            for d in nw.DESIGNS
        },
        "held-out feature tests, W3 scale (contrast, 226 facts, 2000 features)": lambda: (
            nw.feature_calibration(impl, "contrast", n(20), n_permutations=999, size=w3)
        ),
        "steering test over scenarios (10 scenarios x 3 paraphrases x 4)": lambda: nw.steering_calibration(
            impl, n(3000)
        ),
        "fuzzing readers without the explanation": lambda: nw.fuzzing_calibration(impl, n(1000)),
        "label-conditioned dictionary vs mixed (null worlds)": lambda: nw.conditioned_sae_calibration(
            impl, n(200)
        ),
    }
    few = dict(n_groups=12, n_prompts=4, n_samples=4, d=20)  # DESIGN §9: few groups, 80/20, rare outcomes
    small = dict(n_groups=12, n_prompts=3, n_samples=2, d=6)
    jobs |= {
        **{
            f"steering CIs, rare deception ({r} -> {s}, ICC {icc})": (
                lambda r=r, s=s, icc=icc: nw.rare_steering_calibration(impl, n(1000), r, s, icc=icc)
            )
            for r, s in ((0.02, 0.05), (0.05, 0.10), (0.10, 0.10))
            for icc in (0.05, 0.3)
        },
        "probe permutation p (12 one-label groups)": lambda: nw.probe_calibration(
            impl, "grouped", n(300), size=small, n_bootstrap=0
        ),
        "probe CIs, null (12 one-label groups)": lambda: nw.probe_calibration(
            impl, "grouped", n(150), size=small, n_permutations=0, n_bootstrap=100, seed=1
        ),
        "probe permutation p (paraphrase, 80/20)": lambda: nw.probe_calibration(
            impl, "paraphrase", n(300), size={**small, "n_groups": 20, "deceptive_share": 0.2}, n_bootstrap=0
        ),
    }
    if hasattr(impl, "d_cis"):  # feature_stats' CI of d on its own (the pre-issue-11 code had another shape)
        jobs |= {
            "CI of d (12 groups, 2 deceptive)": lambda: nw.d_ci_calibration(
                impl, "grouped", n(500), world="dense", size={**few, "deceptive_share": 0.2}
            ),
            "CI of d (6 groups, 3 per label)": lambda: nw.d_ci_calibration(
                impl, "grouped", n(500), world="dense", size={**few, "n_groups": 6}
            ),
            "CI of d (paraphrase 80/20, sparse)": lambda: nw.d_ci_calibration(
                impl, "paraphrase", n(500), size={**few, "d": 100, "deceptive_share": 0.2}
            ),
        }
    if impl.name != "before":  # the old code printed no LM-loss CI
        for g in (10, 24, 40, 64):
            jobs[f"LM-loss CIs ({g} groups)"] = lambda g=g: nw.lm_loss_calibration(n(5000), n_groups=g)
    out = {}
    key = f"{impl.name} scale={scale}"
    saved = json.loads(cache.read_text()) if cache and cache.exists() else {}
    for name, job in jobs.items():
        if which and not any(w in name for w in which):
            continue
        if name in saved.get(key, {}):
            out[name] = saved[key][name]
            continue
        start = time.perf_counter()
        with threadpool_limits(limits=1):
            out[name] = {**job(), "seconds": round(time.perf_counter() - start, 1)}
        print(f"{impl.name}: {name}: {out[name]}", file=sys.stderr, flush=True)
        if cache:  # an interrupted run continues where it stopped
            saved = json.loads(cache.read_text()) if cache.exists() else {}
            saved.setdefault(key, {})[name] = out[name]
            cache.write_text(json.dumps(saved))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--old-checkout", help="a checkout of the code before issue 11 (commit 2d3aafb) for 'before'"
    )
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every world count (0.2: a quick look)")
    ap.add_argument("--only", default="", help="comma-separated substrings of the statistics to run")
    ap.add_argument("--cache", type=Path, help="a JSON file of finished measurements to reuse (resume)")
    ap.add_argument("--impl", choices=["current", "old"], default="current", help=argparse.SUPPRESS)
    ap.add_argument("--truths", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    which = {w for w in args.only.split(",") if w} or None
    sys.path.insert(0, str(ROOT))
    if args.impl == "old":  # the child process: print the old code's measurements
        impl = old_impl(args.old_checkout)
        print(json.dumps(measure(impl, args.scale, which, json.loads(args.truths), args.cache)))
        return
    from tests import null_worlds as nw

    with threadpool_limits(limits=1):  # the signal worlds' truth, computed once for both sides
        truths = {
            str(s): probe_truth(s, max(10, int(100 * args.scale)), W1)
            for s in SIGNALS
            if not which or any(w in f"probe BA CI, signal {s}" for w in which)
        }
    before = {}
    if args.old_checkout:
        cmd = [
            sys.executable,
            __file__,
            "--impl",
            "old",
            "--old-checkout",
            args.old_checkout,
            "--scale",
            str(args.scale),
            "--truths",
            json.dumps(truths),
        ]
        if args.only:
            cmd += ["--only", args.only]
        if args.cache:
            cmd += ["--cache", str(args.cache)]
        child = subprocess.run(
            cmd, check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""}
        )
        before = json.loads(child.stdout.strip().splitlines()[-1])
    after = measure(nw.current(), args.scale, which, truths, args.cache)
    print(
        json.dumps(
            {
                "benchmark": "calibration of p-values and CIs on simulated worlds (tests/null_worlds.py)",
                "command": " ".join(["python", "bench/calibration.py", *sys.argv[1:]]),
                "machine": (
                    f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
                ),
                "targets": (
                    "false-positive rates within ±0.03 of alpha; CI coverage >= 0.93; fuzzing readers 0.5"
                ),
                "statistics": {name: {"before": before.get(name), "after": after[name]} for name in after},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
