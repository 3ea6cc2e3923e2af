"""Ablation screen (Matryoshka and the k-sparse family): one of our k-sparse SAEs alone (`--arch`, Matryoshka
BatchTopK by default) on bench/sae_train.py's real activations, one run per setting of its constructor
options (`--options`, JSON objects separated by ';', e.g. '{"auxk_coef": 4}'), on the same batches, seed and
schedule as `python bench/sae_train.py --archs <arch>` (400 steps × 1024 of SmolLM2 layer 15, d_sae 4608,
k 32). SAELens is not trained here (its own step is ~4x slower): its figures come from that bench's JSONs
(Matryoshka: EV 0.9155 at held-out L0 32 twice, 0.9161 once; dead 14.5-15.6%), so a setting found here is
then confirmed by sae_train.py itself.

    python bench/matryoshka_auxk.py --threads 1 --options '{};{"auxk_coef": 4}'
    python bench/matryoshka_auxk.py --threads 1 --arch batchtopk --saelens-auxk   # TopK/BatchTopK's AuxK
                                                     # in Matryoshka's (SAELens's) form, for this run only

    python bench/matryoshka_auxk.py --threads 1 --options '{"inner_weight": 0.5}' \
        --config '{"grad_clip": 1e9}' --out bench/results/NAME.json     # TrainConfig fields too

Each run reports held-out explained variance (at matched L0s for the thresholded ones: sae_train.py's
`l0_curve`, θ scaled so exactly round(L0 · n) activations fire), the dead fraction, and tokens/s; for
Matryoshka also each inner prefix's held-out explained variance (latents beyond the prefix zeroed, at the
calibrated θ), what its nested losses are there for. `--out` writes the JSON with the command and commit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import sae_train  # noqa: E402
from helpers.saes import base  # noqa: E402
from helpers.saes.matryoshka_batchtopk import MatryoshkaBatchTopKSAE  # noqa: E402
from helpers.saes.train import TrainConfig  # noqa: E402


def use_saelens_auxk() -> None:
    """For this process: TopK's and BatchTopK's AuxK in SAELens's form, as Matryoshka's is by default
    (base.KSparseSAE.auxk_normalised)."""
    base.KSparseSAE.auxk_normalised = False


@torch.no_grad()
def prefix_ev(sae: MatryoshkaBatchTopKSAE, held: torch.Tensor) -> dict[str, float]:
    """Held-out explained variance of each nested prefix (its latents only, the rest zeroed) at the SAE's
    inference θ; held [n, d_in] at the training scale."""
    sse = dict.fromkeys(sae.widths, 0.0)
    centred = (held.double() - held.double().mean(0)).pow(2).sum().item()
    for x in held.split(4096):
        acts = sae.encode(x)[0]
        for w in sae.widths:
            x_hat = acts[:, :w] @ sae.W_dec[:w] + sae.b_dec
            sse[w] += (x.double() - x_hat.double()).pow(2).sum().item()
    return {str(w): round(1 - v / centred, 4) for w, v in sse.items()}


def run(options: dict, train: torch.Tensor, held: torch.Tensor, args) -> dict:
    """One of our Matryoshka SAEs trained as sae_train.compare trains ours, then measured as it is."""
    cfg = TrainConfig(
        architecture=args.arch,
        expansion=args.expansion,
        l0=args.k,
        train_tokens=args.tokens,
        lr=args.lr,
        batch_size=args.batch_size,
        log_every=50,
        precision="fp32",
        seed=args.seed,
        sae_options=options,
        **args.config,
    )
    ours = sae_train.our_run(cfg, train[: cfg.init_tokens], "cpu")
    data = sae_train.stream(train, cfg.batch_size, args.seed)
    batches = [next(data) for _ in range(cfg.total_steps)]
    t0 = time.perf_counter()
    for x in batches:
        ours.train_step(x)
    seconds = time.perf_counter() - t0
    ours.calibrate(batches[: -(-cfg.init_tokens // cfg.batch_size)])
    held_scaled = held * ours.scale
    out = {"options": options, "tokens_per_s": round(len(batches) * cfg.batch_size / seconds)}
    out.update(sae_train.metrics(ours.sae, held_scaled, "cpu"))
    if args.arch in sae_train.THRESHOLDED:
        l0s = {args.k, out["l0"], *sae_train.CURVE_L0S}
        curve = sae_train.l0_curve(ours.sae, held_scaled, "cpu", l0s)
        out["ev_at_l0"] = {str(r["l0_target"]): r["explained_variance"] for r in curve}
        out["dead_at_l0"] = {str(r["l0_target"]): r["dead_fraction"] for r in curve}
    if isinstance(ours.sae, MatryoshkaBatchTopKSAE):
        out["prefix_ev"] = prefix_ev(ours.sae, held_scaled)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/sae_bench_data", help="sae_train.py's cached activations")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--arch", default="matryoshka_batchtopk", choices=sae_train.K_SPARSE)
    p.add_argument(
        "--saelens-auxk",
        action="store_true",
        help="TopK/BatchTopK: AuxK in SAELens's form (unnormalised, times min(n_dead / k_aux, 1))",
    )
    p.add_argument("--options", default="{}", help="';'-separated JSON objects of constructor options")
    p.add_argument("--config", default="{}", help="a JSON object of TrainConfig fields for every run")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--tokens", type=int, default=400 * 1024)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.saelens_auxk:
        if args.arch == "matryoshka_batchtopk":
            raise SystemExit("--saelens-auxk: Matryoshka's AuxK is in SAELens's form already; drop the flag")
        use_saelens_auxk()
    try:
        settings = [json.loads(s) for s in args.options.split(";") if s.strip()]
    except json.JSONDecodeError as e:
        raise SystemExit(f"--options: each ';'-separated part must be a JSON object ({e})") from e
    try:
        args.config = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--config: must be a JSON object of TrainConfig fields ({e})") from e
    meta = sae_train.build_data(Path(args.data_dir), args.layer, args.seed)
    train, held = sae_train.load_split(Path(args.data_dir), meta)
    results = []
    for options in settings:
        print(f"training with {options} ...", file=sys.stderr, flush=True)
        results.append(run(options, train, held, args))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    summary = {"arch": args.arch, "saelens_auxk": args.saelens_auxk, "tokens": args.tokens, "k": args.k}
    summary.update(threads=args.threads, config=args.config, runs=results)
    summary["command"] = shlex.join(["python", *sys.argv])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    summary["commit"] = commit.stdout.strip()
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
