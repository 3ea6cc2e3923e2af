"""Benchmark: the init sample's per-latent quantiles (`base.latent_quantiles`), the start of a JumpReLU,
standard or Gated SAE, of this checkout against another commit's.

    python bench/latent_quantiles.py --base d506342 --threads 1

At the real bench's shape (d_in 576, d_sae 4608, 16,384 init tokens, target L0 32), the two alternately on
one SAE, `--repeats` times each, thread CPU seconds (the base's `helpers` unpacked as bench/step_ab.py
does). Prints one JSON object with both lists and the largest difference between their answers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.step_ab import base_package  # noqa: E402
from helpers.saes import JumpReLUSAE  # noqa: E402
from helpers.saes.base import latent_quantiles  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare this checkout with")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--l0", type=float, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    before = importlib.import_module(f"{base_package(args.base, Path(tmp.name))}.saes.base").latent_quantiles
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
                "base_commit": args.base,
                "threads": torch.get_num_threads(),
                "thread_cpu_s": seconds,
                "max_abs_diff": diff,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
