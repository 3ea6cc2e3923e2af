"""Benchmark: screen starts and λ schedules of our standard (L1) SAE alone, before a side-by-side run.

    python bench/standard_start_screen.py --threads 1 \\
        --configs "default:;m20pl:init_l0_mult=20,init_l0_per_latent=1"     # -> one JSON on stdout

Ours only (no SAELens, so a 150-step run costs ~25 s of CPU), on bench/sae_train.py's data, split and batch
order (SmolLM2 layer 15, d_sae 4608, batch 1024), at target `--l0` (the L0 SAELens reaches at l1 5 there,
~52). Each config is `name:option=value,...`, the options being the standard SAE's constructor arguments
(`sae_options`: init_l0_mult, init_l0_per_latent, coef_warmup_steps, coef_rate, sparsity_coef). Per
config: held-out explained variance, L0 and dead fraction (bench/sae_train.py's `metrics`), how many steps ran
dense (L0 above `kernels.DENSE_ABOVE` of d_sae, the steps that cost the speed), the thread's CPU seconds
(init and steps; of them the init's), the steps' seconds modelled from their L0 (`modelled_step_s`: CPU
time under load is noisy), λ at the end, and every `--trace` steps the batch L0, λ and how many latents
had not fired within the trainer's dead window (`TrainConfig.dead_after`); with `--curve-l0s`, the held-out
explained variance at those L0s (bench/sae_train.py's `standard_l0_curve`: b_enc lowered by one offset), so
configs that land at different L0s compare at the same ones.
Candidates then go to bench/sae_train.py (`--ours-sae-option`) against SAELens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sae_train import build_data, load_split, metrics, our_run, standard_l0_curve, stream  # noqa: E402
from helpers.saes import kernels  # noqa: E402
from helpers.saes.train import TrainConfig  # noqa: E402

BOOLEAN = ("init_l0_per_latent",)


def parse_configs(text: str) -> dict[str, dict]:
    """'name:opt=v,opt=v;name2:' -> {name: {opt: number, bool, or None for 'null'}}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, rest = item.partition(":")
        options = {}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            if not value:
                raise SystemExit(f"--configs: {pair!r} in {item!r} is not option=value")
            if value.strip() == "null":  # e.g. init_l0_mult=null: b_enc at 0
                options[key.strip()] = None
                continue
            number = float(value)
            options[key.strip()] = bool(number) if key.strip() in BOOLEAN else number
            if key.strip() == "coef_warmup_steps":
                options[key.strip()] = int(number)
        out[name.strip()] = options
    return out


def modelled_step_s(l0: float, threshold: float) -> float:
    """A step's seconds at 1 thread on a quiet machine from its batch L0, for comparing starts without the
    noise of a loaded CPU: a dense step 0.355 s, a sparse one 0.0995 + 0.00041 · L0 s (line through the
    measured 0.120 s at L0 ~50 and 0.314 s at L0 522: README, Measured, the standard SAE's step rows)."""
    return 0.355 if l0 > threshold else 0.0995 + 0.00041 * l0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/sae_bench_data", help="bench/sae_train.py's cached data")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--tokens", type=int, default=150 * 1024)
    p.add_argument("--l0", type=int, default=52, help="our target L0")
    p.add_argument("--configs", default="default:", help="name:option=value,...;name:... (see above)")
    p.add_argument("--trace", type=int, default=10, help="steps between the recorded batch L0s")
    p.add_argument("--out", default=None, help="also write the JSON here after each config")
    p.add_argument("--curve-l0s", default="", help="comma-separated held-out L0s to measure each config at")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = parse_configs(args.configs)
    data_dir = Path(args.data_dir)
    train, held = load_split(data_dir, build_data(data_dir, args.layer, args.seed))
    data = stream(train, 1024, args.seed)
    result = {"command": " ".join(["python", *sys.argv]), "l0_target": args.l0, "runs": {}}
    for name, options in configs.items():
        cfg = TrainConfig(
            architecture="standard",
            l0=args.l0,
            train_tokens=args.tokens,
            precision="fp32",
            log_every=10**9,
            seed=args.seed,
            sae_options=options,
        )
        if name == next(iter(configs)):
            batches = [next(data) for _ in range(cfg.total_steps)]
            x0 = train[: cfg.init_tokens]
            threshold = kernels.DENSE_ABOVE["cpu"] * cfg.expansion * train.shape[1]
            result |= {"steps": cfg.total_steps, "d_sae": cfg.expansion * train.shape[1]}
        print(f"{name} {options} ...", file=sys.stderr, flush=True)
        c0 = time.thread_time()
        run = our_run(cfg, x0, "cpu")
        init_cpu = time.thread_time() - c0
        dense, trace, l0s = 0, [], []
        for i, x in enumerate(batches):
            out = run.train_step(x)
            dense += out.l0 > threshold
            l0s.append(out.l0)
            if i % args.trace == 0 or i == len(batches) - 1:
                silent = int(run.sae.dead_mask(cfg.dead_after).sum())
                trace.append([i, round(out.l0, 1), round(float(run.sae.sparsity_coef), 3), silent])
        cpu = time.thread_time() - c0
        row = {
            "options": options,
            **metrics(run.sae, held * run.scale, "cpu"),
            "dense_steps": int(dense),
            "cpu_s": round(cpu, 1),
            "init_cpu_s": round(init_cpu, 1),
            "modelled_step_s": round(sum(modelled_step_s(l0, threshold) for l0 in l0s), 1),
            "final_coef": round(float(run.sae.sparsity_coef), 3),
            "trace_step_l0_coef": trace,
        }
        if args.curve_l0s:
            l0s = [float(v) for v in args.curve_l0s.split(",")]
            curve = standard_l0_curve(run.sae, held * run.scale, "cpu", l0s)
            row["l0_curve"] = {str(r["l0_target"]): r["explained_variance"] for r in curve}
        result["runs"][name] = row
        keys = ("explained_variance", "l0", "dead_fraction", "dense_steps", "cpu_s", "modelled_step_s")
        summary = {k: row[k] for k in keys}
        print(f"  {summary} L0 every {args.trace * 3} steps {trace[::3]}", file=sys.stderr, flush=True)
        if args.out:  # written after every config, so a stopped screen keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
