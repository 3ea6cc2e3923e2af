"""Benchmark: the standard (L1) SAE's training speed before and after a change, against SAELens, in one run.

    python bench/standard_speed.py --threads 1 --before 4a6523f    # -> one JSON on stdout

Three trainers take the same batches of bench/sae_train.py's data (SmolLM2 layer 15, d_sae 4608, batch
1024): SAELens's standard SAE (`--l1`, its trainer stepped as its `fit()` does, set up as in
bench/sae_train.py), ours as committed now, and ours with `helpers/saes/standard.py` as it was at `--before`
(that one file from git; the rest of the package is today's). They run in alternating chunks of `--chunk`
steps, so a machine whose load changes (a shared CPU) slows all three alike, and after each chunk a plain
matmul of the encoder's shape is timed (the machine's dense rate at that moment). Reported per trainer:
tokens/s by wall clock, by the thread's CPU time (less sensitive to other processes), and ratios to
SAELens's (plain, load-corrected by the matmul rate as bench/sae_train.py does, and in CPU time); ours'
steps are split into dense and sparse ones (`kernels.DENSE_ABOVE`), and held-out explained variance and
L0 of all three come last. Ours targets `--l0` (SAELens's L0 at l1 5 here is ~52).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import saelens_setup  # noqa: E402
from bench.sae_train import build_data, load_split, metrics, our_run, stream  # noqa: E402
from helpers.saes import kernels  # noqa: E402
from helpers.saes.base import geometric_median  # noqa: E402
from helpers.saes.io import load_sae  # noqa: E402
from helpers.saes.train import TrainConfig  # noqa: E402


def standard_class_at(rev: str) -> type:
    """`StandardSAE` as `helpers/saes/standard.py` defined it at git revision `rev`."""
    path = "helpers/saes/standard.py"
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"standard_at_{rev}")
    exec(compile(src, f"{rev}:{path}", "exec"), module.__dict__)
    return module.StandardSAE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/sae_bench_data", help="bench/sae_train.py's cached data")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--tokens", type=int, default=150 * 1024)
    p.add_argument("--l0", type=int, default=52, help="our target L0")
    p.add_argument("--l1", type=float, default=5.0, help="SAELens's l1_coefficient")
    p.add_argument("--before", required=True, help="git revision of helpers/saes/standard.py to compare")
    p.add_argument("--chunk", type=int, default=10, help="steps per timed chunk")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    before_sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.before],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    now_sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    data_dir = Path(args.data_dir)
    meta = build_data(data_dir, args.layer, args.seed)
    train, held = load_split(data_dir, meta)
    d_in = train.shape[1]
    cfg = TrainConfig(
        architecture="standard", l0=args.l0, train_tokens=args.tokens, log_every=10, precision="fp32"
    )
    x0 = train[: cfg.init_tokens]
    lens_scale = saelens_setup.saelens_scale(x0)
    sae = saelens_setup.training_sae("standard", d_in, cfg.expansion * d_in, cfg.l0, l1=args.l1)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(x0 * lens_scale))
    dead_window = max(1, cfg.dead_after // cfg.batch_size)
    lens = saelens_setup.trainer(sae, cfg, dead_window_steps=dead_window)
    after = our_run(cfg, x0, "cpu")
    before = our_run(cfg, x0, "cpu")
    before.sae.__class__ = standard_class_at(args.before)
    W = torch.randn(d_in, cfg.expansion * d_in) / d_in**0.5
    data = stream(train, cfg.batch_size, args.seed)
    batches = [next(data) for _ in range(cfg.total_steps)]
    steps = {
        "saelens": lambda x: saelens_setup.step(lens, x * lens_scale),
        "before": before.train_step,
        "after": after.train_step,
    }
    wall, cpu, matmul = ({k: 0.0 for k in steps} for _ in range(3))
    phases = {k: {"dense": [0, 0.0], "sparse": [0, 0.0]} for k in ("before", "after")}
    threshold = kernels.DENSE_ABOVE["cpu"] * cfg.expansion * d_in
    for i in range(0, len(batches), args.chunk):
        chunk = batches[i : i + args.chunk]
        for who, step in steps.items():
            for x in chunk:
                t0, c0 = time.perf_counter(), time.thread_time()
                out = step(x)
                dt = time.perf_counter() - t0
                wall[who] += dt
                cpu[who] += time.thread_time() - c0
                if out is not None:  # ours: which path the step took (its L0 against the threshold)
                    phase = phases[who]["dense" if out.l0 > threshold else "sparse"]
                    phase[0], phase[1] = phase[0] + 1, phase[1] + dt
            xs = [x * after.scale for x in chunk]
            t0 = time.perf_counter()
            for x in xs:
                x @ W
            matmul[who] += time.perf_counter() - t0
    tokens = cfg.total_steps * cfg.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        lens.sae.save_inference_model(Path(tmp))
        evals = {"saelens": metrics(load_sae(Path(tmp)).sae, held * lens_scale, "cpu")}
    evals |= {
        who: metrics(run.sae, held * run.scale, "cpu") for who, run in (("before", before), ("after", after))
    }
    result = {
        "command": " ".join(["python", *sys.argv]) + f"  (at {now_sha})",
        "before_revision": before_sha,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        "steps": cfg.total_steps,
        "d_sae": cfg.expansion * d_in,
        "l0_target": cfg.l0,
        "l1_saelens": args.l1,
    }
    for who in steps:
        result[who] = {
            "tokens_per_s": round(tokens / wall[who]),
            "tokens_per_cpu_s": round(tokens / cpu[who]),
            "matmul_gflop_per_s": round(2 * tokens * d_in * cfg.expansion * d_in / matmul[who] / 1e9, 1),
            **evals[who],
        }
        if who in phases:
            result[who]["steps_dense_sparse"] = [phases[who][k][0] for k in ("dense", "sparse")]
            result[who]["seconds_dense_sparse"] = [round(phases[who][k][1], 2) for k in ("dense", "sparse")]
            result[who]["speedup_vs_saelens"] = round(wall["saelens"] / wall[who], 2)
            result[who]["speedup_vs_saelens_load_corrected"] = round(
                wall["saelens"] / matmul["saelens"] * matmul[who] / wall[who], 2
            )
            result[who]["speedup_vs_saelens_cpu_time"] = round(cpu["saelens"] / cpu[who], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
