"""Benchmark: ablations of our Gated SAE's training on real activations, ours only (issue 25).

    python bench/gated_ablations.py --threads 1 --variants base "dec0.1:decoder_norm=0.1"

The same data, batches, width, schedule and held-out evaluation as `bench/sae_train.py --archs gated`
(SmolLM2 layer 15, d_sae 4608, 150 steps x 1024 by default), without training SAELens again: each variant
of ours targets `--l0` (default 62, the L0 SAELens's Gated reached there) and is measured at the same
held-out L0s by lowering all its gate biases by one offset (`gated_l0_curve`), beside SAELens's curve read
from `--reference` (a JSON of `bench/sae_train.py --archs gated`). Screening only: a variant worth adopting
is then checked against SAELens trained in the same run by `bench/sae_train.py`.

A variant is `name` or `name:key=value,key=value`. Keys: `lr`, `input_norm` (unit, sqrt_d_in),
`sparsity_coef`, `coef_rate`, `coef_lead_steps`, `frozen_gate_decoder` (0/1), `revive_coef`, `revive_below`,
`init_l0_mult` (the constructor's; `none` for None), and the class settings `decoder_norm`, `free_decoder`,
`encoder_init_scale`, and PenaltySAE's controller settings `coef_trend_horizon` (steps, or `none`) and
`COEF_FAR`, set for that variant only.
`dead_tokens` (TrainConfig's: how long a latent must not fire to count as dead) is a config key too. `base` is
our default. Beside the held-out metrics: how many latents fire on at most 0 / 2 / 5 held-out and training
tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sae_train import CURVE_L0S, build_data, gated_l0_curve, load_split, metrics, stream  # noqa: E402
from helpers.saes.gated import GatedSAE  # noqa: E402
from helpers.saes.train import TrainConfig, Trainer  # noqa: E402

CLASS_SETTINGS = {
    "decoder_norm": float,
    "free_decoder": lambda v: bool(int(v)),
    "encoder_init_scale": float,
    "coef_trend_horizon": lambda v: None if v.lower() == "none" else float(v),
    "COEF_FAR": float,
}
OPTIONS = {
    "sparsity_coef": lambda v: None if v.lower() == "none" else float(v),
    "coef_rate": float,
    "coef_lead_steps": float,
    "frozen_gate_decoder": lambda v: bool(int(v)),
    "revive_coef": float,
    "revive_below": float,
    "init_l0_mult": lambda v: None if v.lower() == "none" else float(v),
}
CONFIG = {"lr": float, "input_norm": str, "dead_tokens": int}


def parse_variant(spec: str) -> tuple[str, dict, dict, dict]:
    """(name, class settings, constructor options, TrainConfig fields) of `name:key=value,...`."""
    name, _, rest = spec.partition(":")
    found: tuple[dict, dict, dict] = ({}, {}, {})
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        for kinds, out in zip((CLASS_SETTINGS, OPTIONS, CONFIG), found, strict=True):
            if key in kinds and eq:
                out[key] = kinds[key](value)
                break
        else:
            known = sorted({*CLASS_SETTINGS, *OPTIONS, *CONFIG})
            raise SystemExit(f"variant {spec!r}: {item!r} is not key=value with a key among {known}")
    return (name, *found)


@torch.no_grad()
def firing_counts(sae, x: torch.Tensor) -> dict[str, int]:
    """How many latents fire on at most 0 / 2 / 5 of the tokens x [n, d_in] (training scale): the held-out
    dead count (0) is a count of rare latents on 7k tokens, so the near-dead counts beside it show whether a
    change moved the tail or only its noise."""
    fired = sum(sae.encode(b)[0].gt(0).sum(0) for b in x.split(4096))  # [d_sae]
    return {str(k): int((fired <= k).sum()) for k in (0, 2, 5)}


def run_variant(spec: str, train, held, args) -> dict:
    """Train one variant of ours and measure it (the class settings are restored afterwards)."""
    name, settings, options, config = parse_variant(spec)
    saved = {k: getattr(GatedSAE, k) for k in settings}
    for k, v in settings.items():
        setattr(GatedSAE, k, v)
    try:
        cfg = TrainConfig(
            architecture="gated",
            expansion=args.expansion,
            l0=args.l0,
            train_tokens=args.tokens,
            batch_size=args.batch_size,
            log_every=50,
            precision="fp32",
            seed=args.seed,
            sae_options=options,
        )
        cfg = dataclasses.replace(cfg, **config)
        run = Trainer(cfg, train.shape[1], "cpu")
        run.init_from_data(train[: cfg.init_tokens])
        data = stream(train, cfg.batch_size, args.seed)
        t0, l0s = time.perf_counter(), []
        for step in range(cfg.total_steps):
            out = run.train_step(next(data))
            if step % 25 == 0 or step == cfg.total_steps - 1:
                l0s.append((step, round(out.l0, 1), round(float(run.sae.sparsity_coef), 4)))
        seconds = time.perf_counter() - t0
        result = metrics(run.sae, held * run.scale, "cpu")
        rare = {
            "held_out": firing_counts(run.sae, held * run.scale),
            "train": firing_counts(run.sae, train * run.scale),
        }
        # an L0 out of reach (a collapsed SAE: too few activations can fire) is a row of nulls and the reason
        curve = gated_l0_curve(run.sae, held * run.scale, "cpu", args.curve_l0s)
    finally:
        for k, v in saved.items():
            setattr(GatedSAE, k, v)
    return {
        "variant": spec,
        "name": name,
        "tokens_per_s": round(cfg.total_steps * cfg.batch_size / seconds),
        "input_scale": round(run.scale, 5),
        **result,
        "latents_firing_on_at_most": rare,
        "dead_in_training_at_end": int(run.sae.dead_mask(cfg.dead_after).sum()),
        "train_l0_and_coef": l0s,
        "l0_curve": {str(r["l0_target"]): [r["explained_variance"], r["dead_fraction"]] for r in curve},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["base"])
    p.add_argument("--data-dir", default="/tmp/sae_bench_data")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--tokens", type=int, default=150 * 1024)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--l0", type=int, default=62, help="the L0 our Gated targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--reference",
        default=str(ROOT / "bench/results/sae_train_cpu_gated_saelens_best_matched_l0.json"),
        help="a bench/sae_train.py --archs gated JSON: SAELens's l0_curve is printed beside ours",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.curve_l0s = sorted({args.l0, *CURVE_L0S})
    meta = build_data(Path(args.data_dir), args.layer, args.seed)
    train, held = load_split(Path(args.data_dir), meta)
    ref = json.loads(Path(args.reference).read_text())
    ref = ref.get("output", ref)["gated"]["saelens"]  # a saved bench JSON wraps it in "output", or not
    out = {
        "reference_saelens": {
            "file": Path(args.reference).name,
            "l0": ref["l0"],
            "dead_fraction": ref["dead_fraction"],
            "tokens_per_s": ref["tokens_per_s"],
            "l0_curve": {str(r["l0_target"]): r["explained_variance"] for r in ref["l0_curve"]},
        },
        "variants": [],
    }
    for spec in args.variants:
        print(f"variant {spec} ...", file=sys.stderr, flush=True)
        out["variants"].append(run_variant(spec, train, held, args))
        print(json.dumps(out["variants"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
