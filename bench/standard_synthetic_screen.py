"""Benchmark: screen our standard (L1) SAE's settings on bench/synthetic_quality.py's world, with traces.

    python bench/standard_synthetic_screen.py --threads 1 --l0 21.5 \\
        --configs "default:;former:init_l0_mult=null"          # ours alone -> one JSON on stdout
    python bench/standard_synthetic_screen.py --threads 1 --saelens-l1 4 --configs "default:"
                                                               # SAELens first, ours at the L0 it reached

The same world, pool, batch order, schedule and scoring (sae_lens's ground-truth evaluator) as
bench/synthetic_quality.py's `standard` runs (`--saelens-careful`: SAELens's b_dec at the geometric median,
its dead window ours), without the timing. Every `--trace` steps each SAE's L0 on a fixed probe of 8,192
training samples, the latents that fire on none of them (`silent`), and for ours λ, so how λ and the L0
move over the run and when latents die can be read side by side. Configs as bench/standard_start_screen.py's
(`name:option=value,...`, the standard SAE's constructor arguments; `null` for None).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import saelens_setup  # noqa: E402
from bench.standard_start_screen import parse_configs  # noqa: E402
from bench.synthetic_quality import SAELensRun, Samples, score, score_ours, synthetic_world  # noqa: E402
from helpers.saes.base import geometric_median  # noqa: E402
from helpers.saes.train import TrainConfig, Trainer  # noqa: E402


@torch.no_grad()
def probe_stats(encode, probe: torch.Tensor) -> dict:
    """L0 and silent latents of one SAE on the probe [n, d_in] (at the SAE's own input scale)."""
    f = encode(probe) > 0  # [n, d_sae]
    return {"l0": round(float(f.sum(1).float().mean()), 2), "silent": int((~f.any(0)).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="default:")
    p.add_argument("--l0", type=float, default=None, help="our target L0 (without --saelens-l1)")
    p.add_argument(
        "--saelens-l1",
        type=float,
        default=None,
        help="run SAELens first at this l1; ours at the L0 it reaches",
    )
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--pool", type=int, default=200_000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--trace", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if (args.l0 is None) == (args.saelens_l1 is None):
        raise SystemExit("give exactly one of --l0 (ours alone) and --saelens-l1 (SAELens first)")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    # bench/synthetic_quality.py's defaults, so its world and evaluator are the same
    world_args = SimpleNamespace(
        features=512, hidden=64, max_prob=0.2, min_prob=0.01, orthogonalize=0, seed=args.seed,
        eval_samples=20_000, l1=args.saelens_l1, saelens_careful=True, saelens_jumprelu_ste_to_input=0,
        saelens_jumprelu_pre_act_coef=None, saelens_jumprelu_init_threshold="0.01",  # unused by standard
    )  # fmt: skip
    world = synthetic_world(world_args)
    data = Samples(world, args.pool, 1024, args.seed)
    init = torch.cat([data.batch(i) for i in range(16)])
    probe = data.pool[-8192:]
    base = TrainConfig(
        architecture="standard", expansion=8, l0=args.l0 or 1.0, train_tokens=args.tokens, batch_size=1024,
        lr=args.lr, log_every=50, seed=args.seed,
    )  # fmt: skip
    steps = base.total_steps
    result = {"command": shlex.join(["python", "bench/standard_synthetic_screen.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory() as tmp:
        if args.saelens_l1 is not None:
            scale = saelens_setup.saelens_scale(init)
            world_args.saelens_bdec = geometric_median(init * scale)
            theirs = SAELensRun("standard", 64, 512, 0, base, world_args, [])
            trace = []
            for i in range(steps):
                theirs.train_step(data.batch(i) * scale)
                if (i + 1) % args.trace == 0 or i + 1 == steps:
                    trace.append({"step": i + 1, **probe_stats(theirs.sae.encode, probe * scale)})
            theirs.sae.save_inference_model(Path(tmp) / "saelens")
            result["saelens"] = {**score(Path(tmp) / "saelens", world, world_args, scale), "trace": trace}
            args.l0 = max(1.0, result["saelens"]["l0"])
            print(json.dumps({k: v for k, v in result["saelens"].items() if k != "trace"}), file=sys.stderr)
        result["target_l0"] = args.l0
        for name, options in parse_configs(args.configs).items():
            cfg = dataclasses.replace(base, l0=args.l0, sae_options=options)
            ours = Trainer(cfg, 64)
            ours.init_from_data(init)
            encode = ours.sae.encode  # [n, d_in] -> (f, pre)
            trace = [{"step": 0, **probe_stats(lambda x, e=encode: e(x)[0], probe * ours.scale)}]
            for i in range(steps):
                ours.train_step(data.batch(i))
                if (i + 1) % args.trace == 0 or i + 1 == steps:
                    stats = probe_stats(lambda x, e=encode: e(x)[0], probe * ours.scale)
                    trace.append({"step": i + 1, **stats, "coef": round(float(ours.sae.sparsity_coef), 3)})
            scores = score_ours(ours, Path(tmp) / name, world, world_args)
            result[name] = {"options": options, **scores, "trace": trace}
            print(json.dumps({name: scores}), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
