"""Benchmark: the training step of this checkout against another commit's, interleaved in one process.

    python bench/step_ab.py --base 5a67786 --archs topk,batchtopk,matryoshka_batchtopk --threads 1
    python bench/step_ab.py --base 5a67786 --archs topk --d-in 576 --d-sae 4608 --l0 32 --steps 16
    python bench/step_ab.py --base 5a67786 --archs topk --dead 20      # 20 latents held dead: AuxK's cost

On a shared machine the load changes from one run to the next, so two runs of a benchmark made minutes apart
compare the load as much as the code. Here the `helpers` package of commit `--base` (`git archive`, renamed
`helpers_base`) and this checkout's train two identical SAEs side by side on the same batches, one step of
each in turn (which goes first alternates), and each step's thread CPU time is recorded: the median per step
of each, their ratio, and the mean reconstruction MSE of the last 20 steps of each (equal when the change
does not change what trains). Data: bench/step_breakdown.py's worlds, `--world sparse` (64 x 512, batch
1024, true L0 7.5 by default; 40 batches in turn) or `--world synthetic` (bench/synthetic_quality.py's).
`--dead N` holds latents 0..N-1 dead before every step (AuxK runs on them). The mean per step is reported
too: with `--warmup 0 --steps 976` on the synthetic world it approximates the cost of
bench/synthetic_quality.py's 1M-sample run (fresh samples, a 1,000-step schedule), whose early steps
(JumpReLU's and Gated's dense phase) cost more than the median's. One JSON on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.step_breakdown import batches_for, world  # noqa: E402


def base_package(commit: str, into: Path) -> str:
    """Unpack `helpers/` of `commit` into `into` as the package `helpers_base`; its module name."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "helpers"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "helpers").rename(into / "helpers_base")
    for path in (into / "helpers_base").rglob("*.py"):
        text = path.read_text()
        for word in ("from helpers.", "import helpers.", "from helpers import"):
            text = text.replace(word, word.replace("helpers", "helpers_base"))
        path.write_text(text)
    sys.path.insert(0, str(into))
    return "helpers_base"


def compare(arch: str, train_modules: dict, args: argparse.Namespace) -> dict:
    if args.world == "synthetic":  # bench/synthetic_quality.py's world, a fresh batch every step
        init, batches = batches_for(args)
    else:  # 40 batches of the sparse world, in turn
        g = torch.Generator().manual_seed(args.seed)
        init = world(4 * args.batch, args.d_in, args.d_sae, args.true_l0, g)
        batches = [world(args.batch, args.d_in, args.d_sae, args.true_l0, g) for _ in range(40)]
    runs = {}
    for name, train in train_modules.items():
        cfg = train.TrainConfig(
            architecture=arch,
            expansion=args.d_sae // args.d_in,
            l0=args.l0,
            **({"lr": args.lr} if args.lr else {}),
            train_tokens=args.batch * 1000,
            batch_size=args.batch,
            precision="fp32",
            seed=args.seed,
        )
        runs[name] = train.Trainer(cfg, args.d_in)
        runs[name].init_from_data(init)
    seconds = {name: [] for name in runs}
    mse = {name: [] for name in runs}
    order = list(runs)
    for step in range(args.warmup + args.steps):
        for name in order if step % 2 else order[::-1]:
            run = runs[name]
            if args.dead:
                run.sae.tokens_since_fired[: args.dead] = 10**12
            start = time.thread_time()
            out = run.train_step(batches[step % len(batches)])
            if step >= args.warmup:
                seconds[name].append(time.thread_time() - start)
            mse[name].append(float(out.terms["mse"]))
    ms = {name: round(statistics.median(s) * 1000, 3) for name, s in seconds.items()}
    mean = {name: round(statistics.fmean(s) * 1000, 3) for name, s in seconds.items()}
    return {
        "step_ms_median": ms,
        "base_over_this": round(ms["base"] / ms["this"], 3),
        # with --warmup 0, a whole run's cost: its early (dense) and late (sparse) steps in their proportions
        "step_ms_mean": mean,
        "base_over_this_mean": round(mean["base"] / mean["this"], 3),
        "mse_last_20": {name: round(sum(m[-20:]) / len(m[-20:]), 6) for name, m in mse.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare this checkout with")
    p.add_argument("--archs", default="topk,batchtopk,matryoshka_batchtopk")
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--true-l0", type=float, default=7.5, help="active directions per token in the world")
    p.add_argument("--world", choices=("sparse", "synthetic"), default="sparse", help="the data (docstring)")
    p.add_argument("--l0", type=float, default=8, help="the SAE's k (TopK: an integer) or target L0")
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default: TrainConfig's)")
    p.add_argument("--dead", type=int, default=0, help="latents held dead before every step")
    p.add_argument("--warmup", type=int, default=10, help="steps of each, untimed, before the timed ones")
    p.add_argument("--steps", type=int, default=150, help="timed steps of each")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = base_package(args.base, Path(tmp))
        modules = {
            "base": importlib.import_module(f"{base}.saes.train"),
            "this": importlib.import_module("helpers.saes.train"),
        }
        result = {
            "command": " ".join(["python", *sys.argv]),
            "base_commit": subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", args.base], check=True, capture_output=True, text=True
            ).stdout.strip(),
            "this_commit": subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
            ).stdout.strip(),
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
            "load_average": [round(v, 2) for v in os.getloadavg()],
        }
        for arch in args.archs.split(","):
            result[arch] = compare(arch, modules, args)
            print(arch, json.dumps(result[arch]), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
