"""Diagnosis: where our JumpReLU's ground-truth F1 goes, latent by latent, on synthetic_quality.py's world.

    python bench/jumprelu_diagnose.py --lr 3e-3 --l0 8.73 --tokens 1000000 --pool 200000
    python bench/jumprelu_diagnose.py --lr 3e-3 --l0 8.73 --option bandwidth=0.01 --saelens

SAELens's evaluator (`eval_sae_on_synthetic_data`) averages each latent's F1 as a detector of its
best-matching feature (by decoder cosine) over all d_sae latents, a dead latent counting 0. This bench
trains our JumpReLU (and with `--saelens` SAELens's, set up as synthetic_quality.py's `--saelens-careful`
sets it) on the same batches, scores both with that evaluator, and splits the F1 into: latents dead on the
held-out samples; live latents sharing their best feature with another live latent (a split or duplicated
feature, at most one of them can be a good detector); features no live latent matches; the live latents'
precision, recall and firing rate against their feature's; and, for ours, the trajectory of L0, dead
fraction, λ and θ during training. `--option NAME=VALUE` sets a constructor argument of our JumpReLUSAE
(repeatable, JSON values). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from helpers.saes.base import geometric_median
from helpers.saes.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.*
synthetic_quality = importlib.import_module("bench.synthetic_quality")
saelens_setup = importlib.import_module("bench.saelens_setup")


@torch.no_grad()
def breakdown(folder: Path, world, args, scale: float | None) -> dict:
    """Per-latent figures of the SAE saved at `folder`, on the evaluator's held-out samples (same seed)."""
    import sae_lens

    sae = sae_lens.SAE.load_from_disk(folder)
    with torch.random.fork_rng():
        torch.manual_seed(10**9 + args.seed)
        feats = world.activation_generator.sample(args.eval_samples)
    hidden = world.feature_dict(feats)
    lat = sae.encode(hidden * (scale or 1.0))
    fires, gt = lat != 0, feats > 0
    dec = torch.nn.functional.normalize(sae.W_dec, dim=1)
    true = torch.nn.functional.normalize(world.feature_dict.feature_vectors, dim=1)
    cos = (dec @ true.t()).abs()
    best_cos, best = cos.max(1)
    g = gt[:, best]
    tp, fp, fn = (fires & g).sum(0).float(), (fires & ~g).sum(0).float(), (~fires & g).sum(0).float()
    prec = torch.where(tp + fp > 0, tp / (tp + fp), 0.0)
    rec = torch.where(tp + fn > 0, tp / (tp + fn), 0.0)
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    live = fires.any(0)
    count = torch.bincount(best[live], minlength=true.shape[0])
    shared = live & (count[best] > 1)
    rate_ratio = fires.float().mean(0)[live] / gt.float().mean(0)[best[live]]
    feat_rate = gt.float().mean(0)
    # each feature's best detector among all latents (a feature-centric F1)
    return {
        "f1": round(float(f1.mean()), 4),
        "dead": int((~live).sum()),
        "live_f1": round(float(f1[live].mean()), 4),
        "live_precision": round(float(prec[live].mean()), 4),
        "live_recall": round(float(rec[live].mean()), 4),
        "live_best_cos_mean": round(float(best_cos[live].mean()), 4),
        "dead_best_cos_mean": round(float(best_cos[~live].mean()), 4) if (~live).any() else None,
        "live_sharing_a_feature": int(shared.sum()),
        "f1_of_sharing": round(float(f1[shared].mean()), 4) if shared.any() else None,
        "f1_of_unique": round(float(f1[live & ~shared].mean()), 4),
        "features_matched_by_a_live_latent": int((count > 0).sum()),
        "rate_ratio_median": round(float(rate_ratio.median()), 3),
        "rate_ratio_q10_q90": [round(float(v), 3) for v in rate_ratio.quantile(torch.tensor([0.1, 0.9]))],
        "live_f1_below_0.2": int((live & (f1 < 0.2)).sum()),
        "matched_feature_rate_live_vs_dead": [
            round(float(feat_rate[best[live]].mean()), 4),
            round(float(feat_rate[best[~live]].mean()), 4) if (~live).any() else None,
        ],
        "l0": round(float(fires.sum(1).float().mean()), 2),
    }


def train_ours(world, data, args, tmp: Path) -> tuple[dict, dict, list]:
    cfg = TrainConfig(
        architecture="jumprelu",
        expansion=args.features // args.hidden,
        l0=args.l0,
        train_tokens=args.tokens,
        batch_size=1024,
        lr=args.lr,
        log_every=50,
        seed=args.seed,
        sae_options=dict(args.option),
        dead_tokens=args.dead_tokens,
    )
    run = Trainer(cfg, args.hidden)
    run.init_from_data(torch.cat([data.batch(i) for i in range(16)]))  # as synthetic_quality.py
    trajectory = []
    every = max(1, cfg.total_steps // 10)
    for i in range(cfg.total_steps):
        out = run.train_step(data.batch(i))
        if (i + 1) % every == 0 or i + 1 == cfg.total_steps:
            sae = run.sae
            trajectory.append(
                {
                    "step": i + 1,
                    "l0": round(out.l0, 2),
                    "dead_fraction": round(float(sae.dead_mask(cfg.dead_after).float().mean()), 3),
                    "lambda": round(float(sae.sparsity_coef), 4),
                    "theta_median": round(float(sae.threshold.median()), 4),
                    "dec_norm_median": round(float(sae.W_dec.norm(dim=1).median()), 4),
                    **{k: round(float(v), 5) for k, v in out.terms.items()},
                }
            )
    scores = synthetic_quality.score_ours(run, tmp / "ours", world, args)
    return scores, breakdown(tmp / "ours", world, args, None), trajectory


def train_saelens(world, data, args, tmp: Path) -> tuple[dict, dict]:
    cfg = TrainConfig(
        architecture="jumprelu",
        expansion=args.features // args.hidden,
        l0=args.l0,
        train_tokens=args.tokens,
        batch_size=1024,
        lr=args.lr,
        seed=args.seed,
    )
    init = torch.cat([data.batch(i) for i in range(16)])
    scale = saelens_setup.saelens_scale(init)
    lens = SimpleNamespace(
        saelens_jumprelu_ste_to_input=0,
        saelens_jumprelu_pre_act_coef=None,
        saelens_jumprelu_init_threshold="0.01",
    )
    sae = saelens_setup.training_sae(
        "jumprelu",
        args.hidden,
        args.features,
        args.true_l0,
        l1=0.3,
        jumprelu=saelens_setup.jumprelu_settings(lens),
    )
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(init * scale))
    trainer = saelens_setup.trainer(sae, cfg, dead_window_steps=max(1, cfg.dead_after // cfg.batch_size))
    for i in range(cfg.total_steps):
        saelens_setup.step(trainer, data.batch(i) * scale)
    sae.save_inference_model(tmp / "saelens")
    return (
        synthetic_quality.score(tmp / "saelens", world, args, scale),
        breakdown(tmp / "saelens", world, args, scale),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--l0", type=float, default=8.73, help="our L0 target (SAELens's reached L0 at that lr)")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--pool", type=int, default=200_000)
    p.add_argument(
        "--option", type=synthetic_quality.sae_option, action="append", default=[], metavar="NAME=VALUE"
    )
    p.add_argument(
        "--dead-tokens",
        type=int,
        default=None,
        help="our TrainConfig.dead_tokens (the pre-activation loss's window; default: train tokens / 20)",
    )
    p.add_argument("--saelens", action="store_true", help="also train and break down SAELens's JumpReLU")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    world_args = SimpleNamespace(
        features=512,
        hidden=64,
        max_prob=0.2,
        min_prob=0.01,
        orthogonalize=0,
        seed=args.seed,
        eval_samples=20_000,
    )
    for k in ("features", "hidden", "eval_samples"):
        setattr(args, k, getattr(world_args, k))
    world = synthetic_quality.synthetic_world(world_args)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        args.true_l0 = round(float((world.activation_generator.sample(20_000) > 0).float().sum(1).mean()), 1)
    data = synthetic_quality.Samples(world, args.pool, 1024, args.seed)
    result = {"command": shlex.join(["python", "bench/jumprelu_diagnose.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory() as tmp:
        scores, parts, trajectory = train_ours(world, data, args, Path(tmp))
        result["ours"] = {"scores": scores, "breakdown": parts, "trajectory": trajectory}
        print(json.dumps({"ours": result["ours"]["breakdown"]}), file=sys.stderr, flush=True)
        if args.saelens:
            scores, parts = train_saelens(world, data, args, Path(tmp))
            result["saelens"] = {"scores": scores, "breakdown": parts}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
