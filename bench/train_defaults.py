"""Benchmark: our trainer's quality on real activations across learning rates and initial encoder scales.

    python bench/train_defaults.py                                   # 4 architectures x old and new defaults
    python bench/train_defaults.py --archs batchtopk --variants 3e-4:1,1e-3:0.1,3e-3:0.1

The evidence behind `TrainConfig.lr` and `SAE.encoder_init_scale`: each variant `lr:scale` trains one SAE
(d_sae 8 x 576, L0 32, `--steps` x 1024 tokens, seed 0) on the shipped corpus's layer-15 residuals of the
offline model, the same data and held-out split as bench/sae_train.py (cached under `--data-dir`), with
the encoder set to `scale` x the decoder's transpose after initialisation, and reports held-out explained
variance, L0 and the fraction of latents that never fired on the held-out tokens. One JSON line per SAE.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import sae_train  # noqa: E402  (bench/sae_train.py: the data, its held-out split and the metrics)

from helpers.saes.train import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="topk,batchtopk,jumprelu,standard")
    p.add_argument(
        "--variants", default="3e-4:1,1e-3:default", help="lr:encoder scale ('default': the class's)"
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/sae_bench_data"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = sae_train.build_data(args.data_dir, 15)
    train, held = sae_train.load_split(args.data_dir, meta)
    print(json.dumps({"train_tokens_unique": len(train), "heldout_tokens": len(held)}), flush=True)
    for arch in args.archs.split(","):
        for variant in args.variants.split(","):
            lr, enc = variant.split(":")
            cfg = TrainConfig(
                architecture=arch,
                expansion=8,
                l0=args.k,
                train_tokens=args.steps * 1024,
                batch_size=1024,
                lr=float(lr),
                log_every=100,
                seed=0,
            )
            run = Trainer(cfg, train.shape[1])
            run.init_from_data(train[: cfg.init_tokens])
            scale = run.sae.encoder_init_scale if enc == "default" else float(enc)
            with torch.no_grad():
                run.sae.W_enc_T.copy_(run.sae.W_dec * scale)
            data, t0 = sae_train.stream(train, cfg.batch_size, 0), time.perf_counter()
            for _ in range(cfg.total_steps):
                run.train_step(next(data))
            seconds = round(time.perf_counter() - t0)
            m = sae_train.metrics(run.sae, held * run.scale, "cpu")  # the SAE works in scaled units
            print(
                json.dumps(
                    {
                        "arch": arch,
                        "lr": float(lr),
                        "encoder_init_scale": scale,
                        "steps": cfg.total_steps,
                        **m,
                        "seconds": seconds,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
