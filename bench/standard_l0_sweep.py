"""Benchmark: the standard (L1) SAE against SAELens at truly matched L0, on real activations.

    python bench/standard_l0_sweep.py --threads 1     # ours now, and with its former settings

`bench/sae_train.py --archs standard` has ours target the L0 SAELens reached, but in a 150-step run the L0
controller does not land on its target (the L0 still falls when the learning rate decays), so the two SAEs
it compares differ in sparsity, and explained variance moves by about 0.008 per unit of L0 there. Here
SAELens trains once (`--l1`); ours trains at each target of `--targets` on the same batches (bench/
sae_train.py's data, split and batch order), and its held-out explained variance is interpolated linearly
at the L0 SAELens reached between the two runs whose L0 bracket it. `--former` also runs ours with the
standard SAE's settings before the SAELens-settings change (unit mean squared norm, unit decoder rows,
λ from 0.05, no trend hold). Speed is not measured here (bench/sae_train.py does). Prints one JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import saelens_setup  # noqa: E402
from bench.sae_train import build_data, load_split, metrics, our_run, stream  # noqa: E402
from helpers.saes.base import geometric_median  # noqa: E402
from helpers.saes.io import load_sae  # noqa: E402
from helpers.saes.standard import StandardSAE  # noqa: E402
from helpers.saes.train import TrainConfig  # noqa: E402

FORMER = {"input_norm": "unit", "decoder_norm": 1.0, "coef_trend_horizon": None, "sparsity_coef": 0.05}
"""The standard SAE's settings before it trained at SAELens's (the class attributes and λ's start)."""


def interpolate(runs: list[dict], l0: float) -> float | None:
    """Explained variance at `l0`, linear between the two runs whose L0 bracket it (None if none do)."""
    pts = sorted((r["l0"], r["explained_variance"]) for r in runs)
    for (l0_a, ev_a), (l0_b, ev_b) in itertools.pairwise(pts):
        if l0_a <= l0 <= l0_b:
            return round(ev_a + (ev_b - ev_a) * (l0 - l0_a) / max(l0_b - l0_a, 1e-9), 4)
    return None


def sweep(cfg: TrainConfig, targets: list[int], batches, x0, held, former: bool) -> list[dict]:
    """Ours at each target L0 on `batches`; with `former`, at the settings of `FORMER`."""
    saved = {k: getattr(StandardSAE, k) for k in ("decoder_norm", "coef_trend_horizon")}
    if former:
        StandardSAE.decoder_norm, StandardSAE.coef_trend_horizon = FORMER["decoder_norm"], None
        options = {"sparsity_coef": FORMER["sparsity_coef"]}
        cfg = dataclasses.replace(cfg, input_norm=FORMER["input_norm"], sae_options=options)
    try:
        runs = []
        for target in targets:
            print(
                f"ours{' (former)' if former else ''} at target L0 {target} ...", file=sys.stderr, flush=True
            )
            run = our_run(dataclasses.replace(cfg, l0=target), x0, "cpu")
            for x in batches:
                run.train_step(x)
            runs.append({"l0_target": target, **metrics(run.sae, held * run.scale, "cpu")})
        return runs
    finally:
        for k, v in saved.items():
            setattr(StandardSAE, k, v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir", default="/tmp/sae_bench_data", help="bench/sae_train.py's cached activations"
    )
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--tokens", type=int, default=150 * 1024, help="training tokens per SAE")
    p.add_argument("--l1", type=float, default=5.0, help="SAELens's l1_coefficient (as bench/sae_train.py)")
    p.add_argument("--targets", default="52,60,65,70,80", help="our target L0s (comma-separated)")
    p.add_argument("--former", action="store_true", help="also sweep ours at its former settings")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    train, held = load_split(data_dir, build_data(data_dir, args.layer))
    cfg = TrainConfig(
        architecture="standard", l0=32, train_tokens=args.tokens, precision="fp32", log_every=50
    )
    data = stream(train, cfg.batch_size, cfg.seed)
    batches = [next(data) for _ in range(cfg.total_steps)]
    x0 = train[: cfg.init_tokens]
    lens_scale = saelens_setup.saelens_scale(x0)
    # SAELens's standard SAE and trainer as bench/sae_train.py sets them up (b_dec at the geometric median,
    # its dead-latent window at ours)
    sae = saelens_setup.training_sae("standard", train.shape[1], 8 * train.shape[1], cfg.l0, l1=args.l1)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(x0 * lens_scale))
    lens = saelens_setup.trainer(sae, cfg, dead_window_steps=max(1, cfg.dead_after // cfg.batch_size))
    print("SAELens ...", file=sys.stderr, flush=True)
    for x in batches:
        saelens_setup.step(lens, x * lens_scale)
    with tempfile.TemporaryDirectory() as tmp:
        lens.sae.save_inference_model(Path(tmp))
        saelens = metrics(load_sae(Path(tmp)).sae, held * lens_scale, "cpu")
    targets = [int(t) for t in args.targets.split(",")]
    result = {
        "data": {"layer": args.layer, "d_sae": 8 * train.shape[1], "steps": cfg.total_steps, "lr": cfg.lr},
        "threads": torch.get_num_threads(),
        "saelens": {"l1_coefficient": args.l1, **saelens},
    }
    for name, former in (("ours", False), ("ours_former", True))[: 1 + args.former]:
        runs = sweep(cfg, targets, batches, x0, held, former)
        result[name] = {
            **({"settings": FORMER} if former else {}),
            "runs": runs,
            "explained_variance_at_saelens_l0": interpolate(runs, saelens["l0"]),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
