"""Benchmark: where one training step of our trainer spends its time, phase by phase (issue 25).

    python bench/step_breakdown.py --archs topk,standard --d-in 64 --d-sae 512 --batch 1024 --threads 1

The loop body of `Trainer.train_step`, run phase by phase with the thread's CPU time after each: the
forward (`losses`, the encoder's product included), the backward, clipping, Adam, and the rest (zeroing the
gradients, the architecture's controllers, the firing counts). Beside them, timed alone on the same shapes,
the operations SAELens's step runs too: the encoder's dense product and, for TopK, `torch.topk` of each
token's k largest pre-activations. Data: a synthetic sparse world (`--true-l0` of `--d-sae` random unit
directions per token, magnitudes uniform in [0, 1)), the SAE's size and batch as SAELens's synthetic
benchmark's (bench/synthetic_quality.py: 64 x 512, batch 1024). The SAE first trains `--warmup` steps, then
`--steps` are timed. One JSON on stdout, milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from helpers.saes.train import TrainConfig, Trainer


def world(n: int, d_in: int, n_features: int, true_l0: float, g: torch.Generator) -> torch.Tensor:
    """[n, d_in]: about `true_l0` of `n_features` fixed random unit directions per token."""
    dictionary = torch.nn.functional.normalize(
        torch.randn(n_features, d_in, generator=torch.Generator().manual_seed(0)), dim=1
    )
    on = torch.rand(n, n_features, generator=g) < true_l0 / n_features
    return (on * torch.rand(n, n_features, generator=g)) @ dictionary


def per_call_ms(fn, repeats: int) -> float:
    """The fastest of 5 rounds of `repeats` calls, CPU time per call in ms."""
    fn()
    best = float("inf")
    for _ in range(5):
        c = time.thread_time()
        for _ in range(repeats):
            fn()
        best = min(best, (time.thread_time() - c) / repeats)
    return round(best * 1000, 3)


def breakdown(arch: str, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    l0 = args.l0 if args.l0 is not None else round(args.true_l0)
    cfg = TrainConfig(
        architecture=arch,
        expansion=args.d_sae // args.d_in,
        l0=l0,
        train_tokens=args.batch * 1000,
        batch_size=args.batch,
        precision="fp32",
        seed=args.seed,
    )
    run = Trainer(cfg, args.d_in)
    run.init_from_data(world(4 * args.batch, args.d_in, args.d_sae, args.true_l0, g))
    n_batches = args.warmup + args.steps
    batches = [world(args.batch, args.d_in, args.d_sae, args.true_l0, g) for _ in range(n_batches)]
    for x in batches[: args.warmup]:
        run.train_step(x)
    sae, phases = run.sae, dict.fromkeys(("forward", "backward", "clip", "adam", "rest"), 0.0)
    start = time.thread_time()
    for x in batches[args.warmup :]:  # Trainer.train_step's body (fp32 on CPU: no scaler), phase by phase
        t = [time.thread_time()]
        x = x * run.scale
        for group in run.opt.param_groups:
            group["lr"] = cfg.lr_at(run.step)
        out = sae.losses(x, sae.dead_mask(cfg.dead_after))
        t.append(time.thread_time())
        out.loss.backward()
        t.append(time.thread_time())
        sae.project_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        t.append(time.thread_time())
        run.opt.step()
        t.append(time.thread_time())
        run.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        sae.after_step(out)
        sae.record_firing(out.fired, len(x))
        run.step += 1
        t.append(time.thread_time())
        for name, a, b in zip(phases, t[:-1], t[1:], strict=True):
            phases[name] += (b - a) * 1000 / args.steps
    total = (time.thread_time() - start) * 1000 / args.steps
    x = batches[-1] * run.scale
    with torch.no_grad():
        x_c = x - sae.b_dec
        pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)
        shared = {"encoder_product": per_call_ms(lambda: torch.addmm(sae.b_enc, x_c, sae.W_enc), 20)}
        if arch == "topk":
            shared["topk"] = per_call_ms(lambda: pre.topk(l0, dim=-1, sorted=False), 20)
    return {
        "step_ms": round(total, 3),
        "phases_ms": {k: round(v, 3) for k, v in phases.items()},
        "shared_with_saelens_ms": shared,
        "l0": round(out.l0, 1),
        "dead": int(sae.dead_mask(cfg.dead_after).sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="topk,standard")
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--true-l0", type=float, default=7.5, help="active directions per token in the world")
    p.add_argument("--l0", type=int, default=None, help="the SAE's k / target L0 (default: true L0)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    for arch in args.archs.split(","):
        result[arch] = breakdown(arch, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
