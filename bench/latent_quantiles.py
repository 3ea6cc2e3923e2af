"""Benchmark: the init sample's per-latent quantiles (`base.latent_quantiles`), the start of a JumpReLU,
standard or Gated SAE, in the layout before (d506342: [n, 512] pre-activations, a column-wise kthvalue) and
now ([512, n], each latent's tokens contiguous).

    python bench/latent_quantiles.py --threads 1

At the real bench's shape (d_in 576, d_sae 4608, 16,384 init tokens, target L0 32), the two alternately,
`--repeats` times each, thread CPU seconds. Prints one JSON object with both lists and the largest difference
between their answers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from helpers.saes import JumpReLUSAE
from helpers.saes.base import latent_quantiles


def before(sae, x: torch.Tensor, l0: float) -> torch.Tensor:
    """`latent_quantiles` as it was at d506342 (default bias)."""
    below = len(x) - max(1, round(len(x) * l0 / sae.d_sae))
    out = torch.empty(sae.d_sae, dtype=x.dtype, device=x.device)
    for cols in torch.arange(sae.d_sae, device=x.device).split(512):
        pre = torch.addmm(sae.b_enc[cols], x - sae.b_dec, sae.W_enc_T[cols].t())
        out[cols] = pre.kthvalue(max(1, below), dim=0).values
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--l0", type=float, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sae = JumpReLUSAE(args.d_in, args.d_sae, l0=args.l0)
    x = torch.randn(args.tokens, args.d_in, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {"before": [], "now": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, f in (("before", before), ("now", latent_quantiles)):
                t = time.thread_time()
                f(sae, x, args.l0)
                seconds[name].append(round(time.thread_time() - t, 3))
        diff = float((before(sae, x, args.l0) - latent_quantiles(sae, x, args.l0)).abs().max())
    print(
        json.dumps(
            {
                "command": shlex.join(["python", "bench/latent_quantiles.py", *sys.argv[1:]]),
                "threads": torch.get_num_threads(),
                "thread_cpu_s": seconds,
                "max_abs_diff": diff,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
