"""Benchmark: what the pre-activation loss on dead latents costs in one JumpReLU training step.

    python bench/jumprelu_pre_act_cost.py --threads 1

Forward and backward of `JumpReLUSAE.losses` at the real bench's shape (d_in 576, d_sae 4608, batch 1024),
thresholds set so that about 32 latents fire per token, with `pre_act_coef` 0 and 0.01 timed alternately on
the same batch, for several fractions of latents marked dead (the term's extra work is one [batch, n_dead]
product and its backward). Prints one JSON object: median milliseconds per step and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from helpers.saes import JumpReLUSAE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dead", default="0.01,0.1,0.25", help="fractions of latents marked dead")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1024, 576) / 576**0.5  # unit mean squared norm, as the trainer scales
    result = {"threads": torch.get_num_threads(), "shape": "batch 1024, d_in 576, d_sae 4608", "dead": {}}
    for frac in (float(v) for v in args.dead.split(",")):
        dead = torch.rand(4608) < frac
        saes = {c: JumpReLUSAE(576, 4608, l0=32, pre_act_coef=c, seed=0) for c in (0.0, 0.01)}
        for sae in saes.values():
            with torch.no_grad():
                sae.threshold.fill_(0.0103)  # about 32 latents per token on this x
        times: dict[float, list[float]] = {c: [] for c in saes}
        for _ in range(args.repeats):
            for c, sae in saes.items():
                t0 = time.perf_counter()
                out = sae.losses(x, dead)
                out.loss.backward()
                times[c].append(time.perf_counter() - t0)
                sae.zero_grad()
        ms = {c: 1e3 * statistics.median(v[2:]) for c, v in times.items()}  # the first two warm up
        result["dead"][str(frac)] = {
            "ms_without": round(ms[0.0], 1),
            "ms_with": round(ms[0.01], 1),
            "ratio": round(ms[0.01] / ms[0.0], 3),
            "l0": round(out.l0, 1),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
