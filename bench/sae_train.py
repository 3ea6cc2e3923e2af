"""Benchmark: our SAE trainer against SAELens 6.x's own trainer, side by side on real activations.

    python bench/sae_train.py --threads 1             # CPU: TopK, BatchTopK, JumpReLU, standard; one JSON
    python bench/sae_train.py --memory                # also train from a ~3 GB store under a small buffer
    python bench/sae_train.py --device cuda --dtype fp16   # a GPU run (SAELens: fp32, or bf16 autocast)

Data: the residuals at one layer (default 15 of 30) of SmolLM2-135M-Instruct (the offline model) on the
reference corpus the package ships (`builtin:corpus`, ~67k tokens), collected once through the notebooks'
corpus path (`helpers.collect.corpus.collect_corpus`: one batched forward pass, 4.3 min on this shared
2-core CPU under load, instead of sampling completions for over 13) under `--data-dir` and reused. 10% of
the sequences are held out for evaluation.

Both trainers see the same batches in the same order, each at its own input scale: ours at its
`TrainConfig.input_norm` (mean norm sqrt(d_in) for TopK, BatchTopK and standard, unit mean squared norm for
JumpReLU and Gated), SAELens's at mean norm sqrt(d_in), which is what
its `normalize_activations="expected_average_only_in"` does (sae_lens 6.54.12,
`training/activation_scaler.py` line 90: `scaling_factor = (d_in**0.5) / mean_norm`, estimated from
`n_batches_for_norm_estimate` batches by `training/sae_trainer.py` lines 169-177; here from the same
first `TrainConfig.init_tokens` tokens ours uses; 24x the unit-mean-squared-norm scale for d_in = 576).
d_sae = 8 x 576 = 4608, the same batch size, token budget, learning rate and schedule. SAELens runs as
its most careful user would set it up for a run this short: TopK and BatchTopK on its sparse path
(`use_sparse_activations=True`, which
needs `rescale_acts_by_decoder_norm=False`: with the default True it fails in backward on torch 2.13),
Matryoshka BatchTopK with our nested widths as its `matryoshka_widths` (its `use_matryoshka_aux_loss`
at its default, off: plain AuxK over all latents, as ours),
fp32 without autocast as its docstring asks for that path; its dead-latent window
(`dead_feature_window`, default 1000 steps, longer than the run, so its AuxK never acted) set to the
tokens ours uses (`TrainConfig.dead_after`, 1/20 of the run); b_dec starting at the geometric median of
the same first tokens (at its scale) instead of zeros; JumpReLU in its L0-targeting ("quadratic") mode
with its bandwidth default (0.05), the L0 term's gradient reaching its encoder (Anthropic's setup) and its
thresholds starting at the target L0 (`bench/saelens_setup.py`: with its defaults its L0 does not settle
in a run this short; `--saelens-jumprelu-ste-to-input 0 --saelens-jumprelu-init-threshold 0.01` gives them
back); the standard SAE
with `--l1` (SAELens's `l1_coefficient`). Steps are timed in alternating chunks (SAELens, ours, a plain
matmul of the encoder's shape), so a machine whose load changes (other jobs on a shared CPU) slows all
alike. SAELens is driven through its `SAETrainer.step` exactly as its `fit()` does, on an iterator of
our batches. For the k-sparse family both get k; for JumpReLU and standard SAELens runs first and ours
then targets the L0 SAELens reached, so quality is compared at matched sparsity. Evaluation (explained
variance, L0, dead fraction on held-out tokens, each SAE on the held-out tokens at its own input scale:
the metrics do not depend on it) uses `helpers.saes.evals.activation_metrics` for both, and
`explained_variance_typical` is the explained variance without the held-out massive activations (a
handful of tokens whose norm is ~140x the median and which carry 97% of the variance, so the plain
figure mostly says how well those few are rebuilt). `--ours-input-norm`, `--ours-lr` and `--auxk-coef`
change ours only (ablations). BatchTopK's inference θ is set apart from training (ours: calibrated after
training on the first batches of the training stream, as `train_sae` does; SAELens's: its running mean), so
the two land at different L0s; `l0_curve` then also measures each at the same L0s (k, each one's own, a few
more) by scaling its threshold (Gated and standard: lowering every gate bias or b_enc by one offset),
`ev_at_matched_l0` sets them side by side, and `calibrations_of_ours` says what each pool for our θ gives on
held-out tokens. `--expansion` sets the width (d_sae = expansion × d_in).
SAELens's SAE is saved with its own `save_inference_model` and read back with `helpers.saes.io.load_sae`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import helpers  # noqa: E402
from bench import saelens_setup  # noqa: E402
from bench.peak_memory import PeakMemory, rss  # noqa: E402
from bench.synthetic_quality import add_sae_option_flag  # noqa: E402
from helpers.collect.corpus import SKIP_FIRST, collect_corpus  # noqa: E402
from helpers.collect.store import LayerStore  # noqa: E402
from helpers.run import activations_dir, corpus_dir, stable_hash  # noqa: E402
from helpers.saes.base import geometric_median  # noqa: E402
from helpers.saes.evals import activation_metrics  # noqa: E402
from helpers.saes.io import load_sae  # noqa: E402
from helpers.saes.matryoshka_batchtopk import MatryoshkaBatchTopKSAE  # noqa: E402
from helpers.saes.train import TrainConfig, Trainer, batches  # noqa: E402

BENCH_CORPUS = "builtin:corpus"


def build_data(data_dir: Path, layer: int, seed: int = 0, max_tokens: int | None = None) -> dict:
    """Store the shipped corpus's residuals at `layer` once (cached under `data_dir`; an interrupted
    collection resumes), and hold out 10% of its sequences by a seeded hash."""
    meta_path = data_dir / "bench_meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta.get("layer"), meta.get("source"), meta.get("skip_first"), meta.get("max_tokens")) == (
            layer,
            BENCH_CORPUS,
            SKIP_FIRST,
            max_tokens,
        ):
            return meta
        shutil.rmtree(data_dir)  # captured by other code or settings (e.g. before position 1 was left out)
    elif data_dir.exists() and any(data_dir.iterdir()) and not (data_dir / "corpus").exists():
        raise SystemExit(f"--data-dir {data_dir} holds other files: pass an empty or new folder")
    lm = helpers.load_model(helpers.OFFLINE_MODEL, device="cpu")
    collect_corpus(lm, BENCH_CORPUS, [layer], data_dir, max_tokens=max_tokens, seq_len=128, batch_size=16)
    ids = LayerStore(data_dir, layer, kind="corpus").completion_ids
    held = {i for i in ids if stable_hash(seed, "bench-heldout", i) % 10 == 0}
    meta = {
        "layer": layer,
        "source": BENCH_CORPUS,
        "skip_first": SKIP_FIRST,
        "max_tokens": max_tokens,
        "train_ids": [i for i in ids if i not in held],
        "heldout_ids": [i for i in ids if i in held],
    }
    meta_path.write_text(json.dumps(meta))
    return meta


def load_split(data_dir: Path, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [n, d_in], held-out [m, d_in]) float32 in RAM: small enough here, and both trainers then
    read batches at the same (negligible) cost."""
    store = LayerStore(data_dir, meta["layer"], kind="corpus")
    read = lambda ids: torch.cat(list(store.iter_batches(8192, completion_ids=ids, shuffle=False)))  # noqa: E731
    return read(meta["train_ids"]), read(meta["heldout_ids"])


def stream(train: torch.Tensor, batch_size: int, seed: int):
    """Endless batches: a fresh permutation each epoch, last partial batch dropped."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield train[perm[i : i + batch_size]]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class SAELensTrainer:
    """SAELens 6.x's `SAETrainer`, fed our batches (already at its input scale) and stepped exactly as its
    `fit()` loop does, configured as its most careful user would (see the module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        b_dec: torch.Tensor,
        x0: torch.Tensor,
        args,
        *,
        autocast: bool,
        widths: list[int] | None = None,
    ):
        """SAELens's SAE for `cfg`'s architecture, k (or target L0) and width, b_dec starting at `b_dec`
        (at its input scale), its dead-latent window at ours (`cfg.dead_after` tokens, in steps); JumpReLU
        as `saelens_setup.add_jumprelu_flags` says (`x0`: the init tokens at its scale); Matryoshka with
        the nested `widths` (ours)."""
        d_in, device = len(b_dec), args.device
        # TopK/BatchTopK: its sparse path where it applies (fp32, no autocast); bench/saelens_setup.py
        sae = saelens_setup.training_sae(
            cfg.architecture,
            d_in,
            cfg.expansion * d_in,
            cfg.l0,
            l1=args.l1,
            device=device,
            sparse=not autocast,
            widths=widths,
            jumprelu=saelens_setup.jumprelu_settings(args),
            seed=args.seed,
        )
        with torch.no_grad():  # start where ours starts (its own default is zeros)
            sae.b_dec.copy_(b_dec)
        if cfg.architecture == "jumprelu":
            saelens_setup.set_jumprelu_threshold(sae, args, x0.to(device))
        self.dead_window = max(1, cfg.dead_after // cfg.batch_size)
        self.trainer = saelens_setup.trainer(
            sae, cfg, device=device, autocast=autocast, dead_window_steps=self.dead_window
        )

    def train_step(self, x: torch.Tensor) -> None:
        saelens_setup.step(self.trainer, x)

    def inference_sae(self, folder: Path):
        """Save with SAELens's own writer, read back with ours (exercises the foreign-folder loader)."""
        self.trainer.sae.save_inference_model(folder)
        return load_sae(folder, device=str(self.trainer.sae.device)).sae


def our_run(cfg: TrainConfig, x0: torch.Tensor, device: str) -> Trainer:
    """Our trainer, initialised on x0 (at the input scale `cfg.input_norm` picks)."""
    run = Trainer(cfg, x0.shape[1], device)
    run.init_from_data(x0)
    return run


MASSIVE = 10.0
"""A held-out token whose norm exceeds this multiple of the median is a massive activation (Sun et al.
2024): on this corpus, 0.1% of the tokens (the first stored position of some sequences, ~140x the median
norm) carry 97% of the variance, so `explained_variance` mostly measures them."""


def massive(x: torch.Tensor) -> torch.Tensor:
    """[n] bool: the tokens of x [n, d_in] whose norm is over MASSIVE times the median norm."""
    norms = x.norm(dim=1)
    return norms > MASSIVE * norms.median()


def variance_share(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The share of x's total variance (about its mean) that the `rows` [n] bool contribute."""
    v = (x - x.mean(0)).pow(2).sum(1)
    return v[rows].sum() / v.sum()


def metrics(sae, held: torch.Tensor, device: str) -> dict:
    """Held-out metrics, and the explained variance of the tokens that are not massive activations."""
    m = activation_metrics(sae, held.split(4096), device=device)
    typical = activation_metrics(sae, held[~massive(held)].split(4096), device=device)
    return {
        **{k: round(m[k], 4) for k in ("explained_variance", "l0", "dead_fraction", "dense_fraction")},
        "explained_variance_typical": round(typical["explained_variance"], 4),
    }


K_SPARSE = ("topk", "batchtopk", "matryoshka_batchtopk")
"""Architectures trained at a fixed k: SAELens's and ours alternate chunk by chunk on the same batches."""

THRESHOLDED = ("batchtopk", "matryoshka_batchtopk")
"""Architectures whose inference rule is f = pre · H(pre - θ) with one global θ set apart from training
(BatchTopK and Matryoshka BatchTopK: ours and SAELens's both save it as a JumpReLU with θ in every
latent)."""


def nested_widths(ours: Trainer) -> list[int] | None:
    """Our Matryoshka SAE's nested prefix widths (SAELens's `matryoshka_widths` gets the same); None for
    the other architectures."""
    return list(ours.sae.widths) if isinstance(ours.sae, MatryoshkaBatchTopKSAE) else None


CURVE_L0S = (16, 24, 40, 48)
"""Further mean L0s at which `l0_curve` measures each thresholded SAE (besides k and both SAEs' own)."""


@torch.no_grad()
def ratio_top(sae, held: torch.Tensor, device: str, want: int) -> torch.Tensor:
    """The `want` largest pre / θ over every held-out token and latent (θ: the SAE's threshold vector),
    descending; kept as a running top-`want`, so the [n, d_sae] pre-activations never sit in memory."""
    theta = sae.threshold.detach().to(device)
    if not bool((theta > 0).all()):
        raise ValueError("l0_curve needs a positive threshold in every latent")
    top = torch.empty(0, device=device)
    for x in held.split(4096):
        ratio = (sae.encode(x.to(device))[1] / theta).flatten()
        top = torch.cat([top, ratio.topk(min(want, len(ratio)), sorted=False).values])
        top = top.topk(min(want, len(top)), sorted=False).values
    return top.sort(descending=True).values


@torch.no_grad()
def matched_curve(sae, held: torch.Tensor, device: str, l0s, top, knob, at, key: str) -> list[dict]:
    """Held-out explained variance of `sae` at each mean L0 in `l0s`, exactly: `knob` (a parameter of the
    SAE) is set to `at(knob, v)`, with v midway between the round(L0 · n)-th and next of `top` (descending:
    the values v at which each held-out activation starts to fire); `knob` is restored afterwards. Each
    row records v under `key`. An L0 the knob cannot reach (fewer than round(L0 · n) + 1 activations can
    fire at any v: a Gated SAE whose magnitude ReLU(π_mag) is 0 for most latents) gets a row of nulls and
    the reason under "out_of_reach", announced on stderr, and the curve goes on."""
    n, saved = len(held), knob.detach().clone()
    rows = []
    try:
        for l0 in sorted(set(l0s)):
            m = round(l0 * n)
            can_fire = int(torch.isfinite(top).sum())  # top is descending: its finite values come first
            if m >= can_fire:
                reason = f"only {can_fire} held-out activations can fire ({can_fire / n:.4g} per token)"
                print(f"l0_curve: L0 {l0} is out of reach: {reason}; recorded as null", file=sys.stderr)
                nulls = dict.fromkeys((key, "explained_variance", "l0", "dead_fraction"))
                rows.append({"l0_target": round(l0, 4), **nulls, "out_of_reach": reason})
                continue
            v = float((top[m - 1] + top[m]) / 2)
            knob.copy_(at(saved, v))
            r = activation_metrics(sae, held.split(4096), device=device)
            rows.append(
                {
                    "l0_target": round(l0, 4),
                    key: round(v, 5),
                    **{k: round(r[k], 4) for k in ("explained_variance", "l0", "dead_fraction")},
                }
            )
    finally:
        knob.copy_(saved)
    return rows


@torch.no_grad()
def l0_curve(sae, held: torch.Tensor, device: str, l0s) -> list[dict]:
    """Held-out explained variance of `sae` at each mean L0 in `l0s`, exactly: its threshold vector θ
    scaled by the s that lets exactly round(L0 · n) of the held-out tokens' activations through (s midway
    between two consecutive sorted pre / θ). Scaling θ is a global threshold in training units for ours
    (one θ everywhere) and SAELens's (the same value in every latent: its `process_state_dict_for_saving_
    inference`), so both get the same treatment; θ is restored afterwards."""
    top = ratio_top(sae, held, device, round(max(l0s) * len(held)) + 1)
    return matched_curve(sae, held, device, l0s, top, sae.threshold, lambda t, s: t * s, "threshold_scale")


@torch.no_grad()
def gate_top(sae, held: torch.Tensor, device: str, want: int) -> torch.Tensor:
    """The `want` largest gate pre-activations π_gate = (x - b_dec) W_enc + b_gate of a Gated SAE over every
    held-out token and latent whose magnitude ReLU(π_mag) is positive (only those fire when the gate
    opens), descending; a running top-`want`, as `ratio_top`."""
    top = torch.empty(0, device=device)
    for x in held.split(4096):
        z = (x.to(device) - sae.b_dec) @ sae.W_enc
        gate = z + sae.b_gate
        mag = z * sae.r_mag.exp() + sae.b_mag
        v = gate.masked_fill(mag <= 0, -torch.inf).flatten()
        top = torch.cat([top, v.topk(min(want, len(v)), sorted=False).values])
        top = top.topk(min(want, len(top)), sorted=False).values
    return top.sort(descending=True).values


@torch.no_grad()
def gated_l0_curve(sae, held: torch.Tensor, device: str, l0s) -> list[dict]:
    """`l0_curve` for a Gated SAE: every gate bias b_gate lowered by one common offset c, so that exactly
    round(L0 · n) of the held-out tokens' activations fire (c midway between two consecutive sorted π_gate
    of `gate_top`); the magnitudes are untouched. The same treatment for ours and SAELens's (read back by
    our loader, as a Gated SAE of ours); b_gate is restored afterwards."""
    top = gate_top(sae, held, device, round(max(l0s) * len(held)) + 1)
    return matched_curve(sae, held, device, l0s, top, sae.b_gate, lambda b, c: b - c, "gate_offset")


@torch.no_grad()
def pre_top(sae, held: torch.Tensor, device: str, want: int) -> torch.Tensor:
    """The `want` largest pre-activations (x - b_dec) W_enc + b_enc of a standard SAE over every held-out
    token and latent, descending; a running top-`want`, as `ratio_top`."""
    top = torch.empty(0, device=device)
    for x in held.split(4096):
        pre = sae.encode(x.to(device))[1].flatten()
        top = torch.cat([top, pre.topk(min(want, len(pre)), sorted=False).values])
        top = top.topk(min(want, len(top)), sorted=False).values
    return top.sort(descending=True).values


@torch.no_grad()
def standard_l0_curve(sae, held: torch.Tensor, device: str, l0s) -> list[dict]:
    """`l0_curve` for a standard SAE, f = ReLU(pre): every b_enc_j lowered by one common offset c, so that
    exactly round(L0 · n) of the held-out tokens' pre-activations are above it (c midway between two
    consecutive sorted pre-activations of `pre_top`), the active ones each smaller by c. Ours in training
    units, SAELens's as its saved SAE (read back by our loader) has it; b_enc is restored afterwards."""
    top = pre_top(sae, held, device, round(max(l0s) * len(held)) + 1)
    return matched_curve(sae, held, device, l0s, top, sae.b_enc, lambda b, c: b - c, "bias_offset")


BIAS_CURVES = {"gated": gated_l0_curve, "standard": standard_l0_curve}
"""The penalty architectures measured at matched L0s by lowering an encoder bias (no threshold to scale)."""


@torch.no_grad()
def calibrations(ours: Trainer, batches: list[torch.Tensor], train: torch.Tensor, held, device) -> dict:
    """Our BatchTopK's θ from each candidate pool, and the held-out L0 and explained variance it gives:
    the running mean at the end of training; the first `init_tokens` tokens in store order (the first
    sequences of the corpus); the first batches of the shuffled training stream (what `train_sae` uses);
    the last batches of training; every training token. Leaves θ at the running mean."""
    sae, n_init = ours.sae, -(-ours.cfg.init_tokens // ours.cfg.batch_size)
    running = sae.threshold.detach().clone()
    pools = {
        "first_tokens_store_order": train[: ours.cfg.init_tokens].split(ours.cfg.batch_size),
        "first_batches_of_stream": batches[:n_init],
        "last_batches_of_training": batches[-n_init:],
        "all_training_tokens": train.split(ours.cfg.batch_size),
    }
    out = {}
    for name, pool in [("running_mean", None), *pools.items()]:
        sae.threshold.copy_(running)
        if pool is not None:
            ours.calibrate(pool)
        r = activation_metrics(sae, (held * ours.scale).split(4096), device=device)
        out[name] = {
            "threshold": round(float(sae.threshold[0]), 5),
            **{k: round(r[k], 4) for k in ("explained_variance", "l0")},
        }
    sae.threshold.copy_(running)
    return out


def matched_l0(t: dict) -> dict:
    """Both SAEs' held-out EV at L0 = k (Gated, standard: ours's target, SAELens's L0 rounded) and at each
    one's own inference L0, from their `l0_curve`s (null where that L0 is out of one's reach:
    `matched_curve`)."""
    at = lambda who, l0: next(r for r in t[who]["l0_curve"] if r["l0_target"] == round(l0, 4))  # noqa: E731
    points = {"k": t["ours"]["l0_target"], "ours_l0": t["ours"]["l0"], "saelens_l0": t["saelens"]["l0"]}
    return {
        name: {"l0": round(l0, 4), **{w: at(w, l0)["explained_variance"] for w in ("ours", "saelens")}}
        for name, l0 in points.items()
    }


def compare(arch: str, train: torch.Tensor, held: torch.Tensor, args, tmp: Path) -> dict:
    """Train SAELens and ours on the same batches; time each chunk of steps, and a plain matmul of the
    encoder's shape after it (the machine's dense rate at that moment)."""
    d_in, device = train.shape[1], args.device
    precision = "fp32" if device == "cpu" else args.dtype
    options = {"auxk_coef": args.auxk_coef} if args.auxk_coef is not None and arch in K_SPARSE else {}
    if args.ours_coef_rate is not None and arch in ("standard", "gated", "jumprelu"):
        options["coef_rate"] = args.ours_coef_rate
    if args.ours_init_l0_mult is not None and arch == "standard":
        options["init_l0_mult"] = args.ours_init_l0_mult
        options["init_l0_per_latent"] = args.ours_init_l0_per_latent
    options |= dict(args.ours_sae_option)
    cfg = TrainConfig(
        architecture=arch,
        expansion=args.expansion,
        l0=args.k,
        train_tokens=args.tokens,
        lr=args.lr,
        batch_size=args.batch_size,
        log_every=50,
        precision=precision,
        seed=args.seed,
        sae_options=options,
    )
    ours_cfg = dataclasses.replace(cfg, lr=args.ours_lr or args.lr, input_norm=args.ours_input_norm)
    x0 = train[: cfg.init_tokens]
    ours = our_run(ours_cfg, x0, device)
    scale, lens_scale = ours.scale, saelens_setup.saelens_scale(x0)
    b_dec = geometric_median(x0.to(device) * lens_scale)
    widths = nested_widths(ours)
    lens = SAELensTrainer(cfg, b_dec, x0 * lens_scale, args, autocast=precision == "bf16", widths=widths)
    W = torch.randn(d_in, cfg.expansion * d_in, device=device) / d_in**0.5
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    data = stream(train, cfg.batch_size, args.seed)
    batches = [next(data) for _ in range(cfg.total_steps)]
    chunks = [batches[i : i + args.chunk] for i in range(0, len(batches), args.chunk)]
    # The k-sparse family: k is fixed, so the two alternate chunk by chunk. JumpReLU/standard/Gated: SAELens
    # runs first and ours then targets the L0 SAELens reached (matched sparsity); the matmul timed beside
    # each chunk corrects for load changes between the two phases.
    sequential = arch not in K_SPARSE
    who_all = ("saelens", "ours")
    plan = (
        [(w, c) for w in who_all for c in chunks] if sequential else [(w, c) for c in chunks for w in who_all]
    )
    seconds = dict.fromkeys(who_all, 0.0)
    matmul_seconds = dict.fromkeys(who_all, 0.0)
    evals: dict[str, dict] = {}
    for who, chunk in plan:
        if who == "ours" and sequential and ours.step == 0:
            evals["saelens"] = metrics(lens.inference_sae(tmp / f"saelens_{arch}"), held * lens_scale, device)
            ours_cfg = dataclasses.replace(ours_cfg, l0=max(1, round(evals["saelens"]["l0"])))
            ours = our_run(ours_cfg, x0, device)
        step = ours.train_step if who == "ours" else (lambda x: lens.train_step(x.to(device) * lens_scale))
        sync(device)
        t0 = time.perf_counter()
        for x in chunk:
            step(x)
        sync(device)
        seconds[who] += time.perf_counter() - t0
        xs = [x.to(device, dtype) * scale for x in chunk]
        sync(device)
        t0 = time.perf_counter()
        for x in xs:
            x @ W
        sync(device)
        matmul_seconds[who] += time.perf_counter() - t0
    lens_sae = lens.inference_sae(tmp / f"saelens_{arch}")
    if "saelens" not in evals:
        evals["saelens"] = metrics(lens_sae, held * lens_scale, device)
    studied = calibrations(ours, batches, train, held, device) if arch in THRESHOLDED else None
    # BatchTopK's θ, as train_sae sets it: from the first batches of the (shuffled) training stream
    calibration = ours.calibrate(batches[: -(-cfg.init_tokens // cfg.batch_size)])
    tokens, flops = cfg.total_steps * cfg.batch_size, 2 * cfg.batch_size * d_in * cfg.expansion * d_in
    rate = {w: flops * cfg.total_steps / matmul_seconds[w] for w in seconds}  # dense FLOP/s during each
    out = {
        "steps": cfg.total_steps,
        "tokens": tokens,
        "schedule": "SAELens, then ours at its L0" if sequential else "alternating chunks",
        "ours": {
            "tokens_per_s": round(tokens / seconds["ours"]),
            "l0_target": ours_cfg.l0,
            "lr": ours_cfg.lr,
            "input_norm": ours.input_norm,
            "input_scale": round(scale, 5),
            **({"calibration": calibration} if calibration else {}),
            **({"matryoshka_widths": widths} if widths else {}),
            **metrics(ours.sae, held * scale, device),
        },
        "saelens": {
            "tokens_per_s": round(tokens / seconds["saelens"]),
            "lr": cfg.lr,
            "input_scale": round(lens_scale, 5),
            **({"use_sparse_activations": precision != "bf16"} if not sequential else {}),
            **({"matryoshka_widths": list(lens.trainer.sae.cfg.matryoshka_widths)} if widths else {}),
            **({"use_matryoshka_aux_loss": lens.trainer.sae.cfg.use_matryoshka_aux_loss} if widths else {}),
            **evals["saelens"],
        },
        "saelens_settings": {
            "dead_feature_window_steps": lens.dead_window,
            "normalize": "mean norm sqrt(d_in)",
            "b_dec_init": "geometric median of the first tokens (as ours)",
            **(jumprelu_record(lens.trainer.sae.cfg) if arch == "jumprelu" else {}),
        },
        "matmul_gflop_per_s": {w: round(r / 1e9, 1) for w, r in rate.items()},
        "speedup": round(seconds["saelens"] / seconds["ours"], 2),
        # tokens per dense-matmul-equivalent: insensitive to the machine's load changing between phases
        "speedup_load_corrected": round(
            seconds["saelens"] * rate["saelens"] / (seconds["ours"] * rate["ours"]), 2
        ),
    }
    if arch in (*THRESHOLDED, *BIAS_CURVES):  # both at the same mean L0s on held-out tokens (l0_curve)
        if arch in THRESHOLDED:
            out["calibrations_of_ours"] = studied
        curve = BIAS_CURVES.get(arch, l0_curve)
        l0s = {ours_cfg.l0, out["ours"]["l0"], out["saelens"]["l0"], *CURVE_L0S}
        out["ours"]["l0_curve"] = curve(ours.sae, held * scale, device, l0s)
        out["saelens"]["l0_curve"] = curve(lens_sae, held * lens_scale, device, l0s)
        out["ev_at_matched_l0"] = matched_l0(out)
    if arch == "topk":  # the encoder's forward matmul is all the dense work a sparse TopK step must do
        out["ours"]["step_gflop_per_s"] = round(flops * cfg.total_steps / seconds["ours"] / 1e9, 1)
        out["ours"]["fraction_of_matmul_rate"] = round(
            flops * cfg.total_steps / seconds["ours"] / rate["ours"], 3
        )
    return out


def jumprelu_record(sae_cfg) -> dict:
    """The settings SAELens's JumpReLU trained with (its config's names)."""
    names = ("jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_ste_to_input", "l0_coefficient")
    return {"jumprelu_sparsity_loss_mode": sae_cfg.jumprelu_sparsity_loss_mode} | {
        n: getattr(sae_cfg, n) for n in names
    }


def targets(results: dict) -> dict:
    """Issue 25's targets on the measured figures: quality >= SAELens configured at its best (same data,
    tokens, and L0), tokens/s >= 3x its in the same run."""
    checks = {}
    for arch in ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard", "gated"):
        if t := results.get(arch):
            best = t["saelens"]
            checks[f"{arch}_speed_3x"] = t["speedup_load_corrected"] >= 3
            checks[f"{arch}_ev_ge_saelens"] = t["ours"]["explained_variance"] >= best["explained_variance"]
            checks[f"{arch}_ev_typical_ge_saelens"] = (
                t["ours"]["explained_variance_typical"] >= best["explained_variance_typical"]
            )
            checks[f"{arch}_dead_le_saelens"] = t["ours"]["dead_fraction"] <= best["dead_fraction"]
            for point, ev in t.get("ev_at_matched_l0", {}).items():  # null: an L0 out of one's reach
                both = ev["ours"] is not None and ev["saelens"] is not None
                checks[f"{arch}_ev_ge_saelens_at_{point}"] = ev["ours"] >= ev["saelens"] if both else None
            if arch in ("jumprelu", "standard", "gated"):
                checks[f"{arch}_l0_matched_20pct"] = abs(t["ours"]["l0"] / best["l0"] - 1) <= 0.2
    return checks


def memory_run(data_dir: Path, layer: int, args) -> dict:
    """Train TopK for one pass over a store of `--memory-gb` (the real shards copied under new completion
    ids: distinct files, as a real large store has) with a `--buffer-mb` shuffle buffer. Runs in a fresh
    process (see main) so its memory is its own; a thread samples resident memory every 20 ms.
    Anonymous memory is what the process allocated; file-backed memory is the page cache of the
    memory-mapped shards, which the kernel reclaims under pressure."""
    src, big = corpus_dir(data_dir, layer), data_dir / "big"
    dst = activations_dir(big, layer)
    shards = sorted(src.glob("shard_*.json"))
    per_copy = sum((src / f"{m.stem}.npy").stat().st_size for m in shards)
    copies = max(1, round(args.memory_gb * 2**30 / per_copy))
    if len(list(dst.glob("shard_*.json"))) != copies * len(shards):
        dst.mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            for j, meta_path in enumerate(shards):
                name = f"shard_{c * len(shards) + j:05d}"
                (dst / f"{name}.npy").write_bytes((src / f"{meta_path.stem}.npy").read_bytes())
                meta = json.loads(meta_path.read_text())
                meta["entries"] = [[f"{e[0]}~{c}", *e[1:]] for e in meta["entries"]]
                (dst / f"{name}.json").write_text(json.dumps(meta))

    if args.threads:
        torch.set_num_threads(args.threads)
    start_mem = rss()
    store = LayerStore(big, layer)
    ids = store.completion_ids
    cfg = TrainConfig(
        architecture="topk",
        expansion=args.expansion,
        l0=args.k,
        batch_size=args.batch_size,
        train_tokens=store.count(ids),
        buffer_bytes=args.buffer_mb << 20,
        log_every=100,
    )
    run = Trainer(cfg, store.d_model)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        data = batches(store, ids, cfg)
        run.init_from_data(next(data))
        for _ in range(cfg.total_steps):
            run.train_step(next(data))
    peak = mem.peak
    gb = lambda b: round(b / 2**30, 3)  # noqa: E731
    return {
        "store_gb_on_disk": gb(sum(p.stat().st_size for p in dst.glob("*.npy"))),
        "store_gb_as_float32": gb(store.n_tokens * store.d_model * 4),
        "tokens": store.n_tokens,
        "steps": cfg.total_steps,
        "buffer_bytes": cfg.buffer_bytes,
        "rss_anon_gb_before_training": gb(start_mem["RssAnon"]),
        "peak_rss_anon_gb": gb(peak["RssAnon"]),
        "peak_rss_file_backed_gb": gb(peak["RssFile"]),
        "peak_rss_total_gb": gb(peak["total"]),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_batch_explained_variance": round(run.history[-1]["explained_variance"], 4),
    }


def parser() -> argparse.ArgumentParser:
    """The bench's command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir", default="/tmp/sae_bench_data", help="where the captured activations are cached"
    )
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--max-tokens", type=int, default=None, help="corpus tokens to store (default: all, ~67k)")
    p.add_argument("--archs", default="topk,batchtopk,jumprelu,standard")
    p.add_argument("--tokens", type=int, default=400 * 1024, help="training tokens per SAE (same for both)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32, help="TopK k, and the L0 SAELens's JumpReLU targets")
    p.add_argument(
        "--l1",
        type=float,
        default=5.0,
        help="SAELens's l1_coefficient for standard and Gated (5: Anthropic's April 2024 update, at "
        "sqrt(d_in) scale)",
    )
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="learning rate of both (same schedule)")
    p.add_argument("--ours-lr", type=float, default=None, help="ablation: our learning rate only")
    saelens_setup.add_input_norm_flag(p)
    p.add_argument(
        "--auxk-coef", type=float, default=None, help="ablation: our TopK/BatchTopK AuxK coefficient"
    )
    saelens_setup.add_class_ablation_flags(p)
    # its best here: with its defaults its L0 does not settle in a run this short (bench/saelens_setup.py)
    saelens_setup.add_jumprelu_flags(p, ste_to_input=1, init_threshold="l0")
    p.add_argument(
        "--ours-coef-rate",
        type=float,
        default=None,
        help="ablation: the coef_rate of our standard/Gated/JumpReLU (how fast λ follows the L0 error)",
    )
    p.add_argument(
        "--ours-init-l0-mult",
        type=float,
        default=None,
        help="ablation: our standard SAE's init_l0_mult (initial L0 as a multiple of the target)",
    )
    p.add_argument(
        "--ours-init-l0-per-latent",
        action="store_true",
        help="with --ours-init-l0-mult: each latent's b_enc its own offset (init_l0_per_latent)",
    )
    add_sae_option_flag(p, "for every arch in --archs, e.g. coef_warmup_steps=30 for standard")
    p.add_argument("--chunk", type=int, default=10, help="steps per timed chunk")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="GPU precision of ours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="also run the larger-than-buffer streaming test")
    p.add_argument("--memory-gb", type=float, default=3.0)
    p.add_argument("--buffer-mb", type=int, default=128)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    saelens_setup.apply_class_ablations(args)
    import sae_lens

    data_dir = Path(args.data_dir)
    meta = build_data(data_dir, args.layer, args.seed, args.max_tokens)
    train, held = load_split(data_dir, meta)
    result = {
        "machine": {
            "device": args.device,
            "torch": torch.__version__,
            "sae_lens": sae_lens.__version__,
            "threads": torch.get_num_threads(),
            "precision_ours": "fp32" if args.device == "cpu" else args.dtype,
        },
        "data": {
            "model": "SmolLM2-135M-Instruct",
            "corpus": BENCH_CORPUS,
            "layer": args.layer,
            "train_tokens_unique": len(train),
            "heldout_tokens": len(held),
            "d_in": train.shape[1],
            "d_sae": args.expansion * train.shape[1],
            "k": args.k,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "training_tokens": args.tokens,
            "heldout_massive_tokens": int(massive(held).sum()),
            "heldout_variance_share_of_massive_tokens": round(float(variance_share(held, massive(held))), 4),
        },
    }
    ablations = (
        "ours_encoder_init_scale",
        "ours_decoder_norm",
        "ours_free_decoder",
        "auxk_coef",
        "ours_lr",
        "ours_coef_rate",
        "ours_init_l0_mult",
    )
    result["ours_ablations"] = {k: getattr(args, k) for k in ablations if getattr(args, k) is not None}
    if args.ours_init_l0_per_latent:
        result["ours_ablations"]["ours_init_l0_per_latent"] = True
    if args.ours_sae_option:
        result["ours_ablations"]["ours_sae_options"] = dict(args.ours_sae_option)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in filter(None, args.archs.split(",")):
            print(f"training {arch} (SAELens and ours) ...", file=sys.stderr, flush=True)
            result[arch] = compare(arch, train, held, args, Path(tmp))
    result["targets"] = targets(result)
    if args.memory:  # in a fresh process, so the measured memory is the training's own
        print("memory run ...", file=sys.stderr, flush=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result["memory"] = pool.submit(memory_run, data_dir, args.layer, args).result()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
