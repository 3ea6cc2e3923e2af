"""Random-weight SAE controls: an SAE of the same class, width and L0 as a trained one, with random
directions, so that an SAE-probe number can be set beside what random sparse features
give (DESIGN.md §9, issue 19).

Korznikov et al. 2026, "Sanity Checks for Sparse Autoencoders: Do SAEs Beat Random Baselines?" (arXiv
2602.14111) introduce three baselines that "constrain SAE feature directions or their activation patterns to
random values" and find they match trained SAEs in interpretability (0.87 vs 0.90), sparse probing (0.69 vs
0.72) and causal editing (0.73 vs 0.72) (abstract). Each freezes part of an SAE at its random initialisation
and trains the rest (their Fig. 1): Frozen Decoder (decoder weights fixed at random initialisation),
Soft-Frozen Decoder (decoder kept at cosine similarity >= 0.8 to its random initialisation) and Frozen Encoder
(encoder weights fixed at random initialisation). A probe reads only `encode`, and the Frozen Encoder's
activation patterns are random by construction, so that control needs no training run. `random_sae_like`
builds it from a calibration sample alone (the tokens being probed), without labels:

    W_enc     random unit-norm rows [d_sae, d_in], seeded (the paper's frozen random initialisation)
    b_dec     the calibration tokens' geometric median (how train.py initialises b_dec)
    sparsity  set through the class's own `encode`, so the mean L0 on the calibration tokens is the target:
              TopK: the integer k whose L0 is nearest; BatchTopK (and Matryoshka): its one threshold θ;
              JumpReLU (incl. BatchTopK folders loaded as jumprelu), Gated, standard: one threshold per
              latent (JumpReLU's θ, Gated's b_gate, standard's -b_enc) chosen so that each random latent
              fires on as many calibration tokens as one of the trained SAE's latents (the trained firing
              counts, shuffled across latents and scaled to the target), so dead fraction and the spread
              of firing frequencies match as well as the mean
    W_dec     "frozen_encoder": each latent's row is the activation-weighted mean of the centred calibration
              tokens it fires on, and one overall scale (folded into the encoder) is fitted by least
              squares: a closed-form stand-in for the decoder the paper trains; "random_init": the
              encoder's transpose, untrained

Frozen Decoder and Soft-Frozen Decoder train the encoder, so they are not offered here.

A per-latent threshold sits halfway between the m-th and (m+1)-th largest calibration pre-activation, so
exactly m calibration tokens fire; on new tokens from the same distribution each live latent fires
(m + 1/2)/(n + 1) of the time, so held-out L0 runs about n_live / (2 n) above the calibration L0 (0.4 for
16k latents on 20k tokens): calibrate on many more tokens than d_sae / L0.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from helpers.run import stable_hash
from helpers.saes.base import SAE, geometric_median
from helpers.saes.batchtopk import BatchTopKSAE
from helpers.saes.evals import check_finite
from helpers.saes.gated import GatedSAE
from helpers.saes.jumprelu import JumpReLUSAE
from helpers.saes.standard import StandardSAE
from helpers.saes.topk import TopKSAE

VARIANTS: dict[str, str] = {
    "frozen_encoder": (
        "Frozen Encoder (arXiv 2602.14111, Fig. 1): encoder weights fixed at random initialization; the "
        "decoder, which the paper trains, is fitted here in closed form on the calibration tokens"
    ),
    "random_init": (
        "the random initialization all three of the paper's baselines start from: random unit-norm encoder "
        "rows and the decoder its transpose, untrained"
    ),
}
"""The random-weight controls `random_sae_like` builds, by name."""

TRAINED_VARIANTS = ("frozen_decoder", "soft_frozen_decoder")
"""The paper's other two baselines: they train the encoder, so they need a training run, not a calibration
sample (train.py could run them with a frozen decoder; not built)."""

L0_TOLERANCE = 0.05
"""Largest relative gap between the random SAE's calibration L0 and the target (TopK: k is an integer)."""

_CELLS = 1 << 24
"""Pre-activations held at once when ranking a chunk of latents over all calibration tokens (64 MiB)."""


@torch.no_grad()
def firing_counts(sae: SAE, x: Tensor, batch: int = 4096) -> Tensor:
    """[d_sae] int64: on how many of the tokens x [n, d_in] each latent is active (act > 0, as in
    evals.activation_metrics)."""
    device = sae.W_dec.device
    counts = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    for xb in x.split(batch):
        counts += (sae.encode(xb.to(device, torch.float32))[0] > 0).sum(0)
    return counts


def l0_on(sae: SAE, x: Tensor, batch: int = 4096) -> float:
    """Mean number of active latents per token of x [n, d_in] (the `l0` of evals.activation_metrics, without
    the decode)."""
    if len(x) == 0:
        raise ValueError("l0_on needs at least one token, got an empty tensor")
    return float(firing_counts(sae, x, batch).sum()) / len(x)


@torch.no_grad()
def random_sae_like(
    sae: SAE,
    calibration: Tensor,
    *,
    variant: str = "frozen_encoder",
    seed: int = 0,
    target_l0: float | None = None,
    batch: int = 4096,
) -> SAE:
    """An SAE of `sae`'s class, d_in and d_sae with random directions (`VARIANTS[variant]`), whose mean L0 on
    `calibration` [n_tokens, d_in] (the tokens being probed) is `target_l0` (default: `sae`'s own mean L0 on
    them) within 5%, or for TopK the nearest an integer k allows (a note is printed when that is over 5%).
    Deterministic given `seed`; `encode(x) -> (acts, pre_acts)` runs the class's own code; in eval mode on
    `sae`'s device. `batch` tokens are encoded at a time."""
    if variant not in VARIANTS:
        hint = (
            " (it trains the encoder: not a calibration-only control)" if variant in TRAINED_VARIANTS else ""
        )
        raise ValueError(f"unknown random-SAE variant {variant!r}{hint}: use one of {', '.join(VARIANTS)}")
    if calibration.ndim != 2 or len(calibration) < 2:
        raise ValueError(f"calibration must be [n_tokens >= 2, d_in], got shape {tuple(calibration.shape)}")
    sae.check_input(calibration)
    x = calibration.to(sae.W_dec.device, torch.float32)
    check_finite(x, "the calibration tokens")
    n = len(x)
    counts = firing_counts(sae, x, batch)
    target = float(counts.sum()) / n if target_l0 is None else float(target_l0)
    if not 0 < target < sae.d_sae or round(target * n) < 1:
        raise ValueError(
            f"target L0 {target:.4g} must be in (0, d_sae={sae.d_sae}) and fire at least once on the {n} "
            "calibration tokens" + (": the trained SAE is silent on them" if target_l0 is None else "")
        )

    # A stream of its own: with the trainer's seed, randn would redraw the trained SAE's own initialisation,
    # which a short or lazy run (the paper's point) barely leaves.
    g = torch.Generator().manual_seed(stable_hash("random_sae_like", seed))
    w = torch.randn(sae.d_sae, sae.d_in, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    new = copy.deepcopy(sae).eval()
    new.W_enc_T.copy_(w)
    new.W_dec.copy_(w)
    new.b_dec.copy_(geometric_median(x))
    for name in (*new.latent_biases, "r_mag"):
        if hasattr(new, name):
            getattr(new, name).zero_()
    new.tokens_since_fired.zero_()

    _set_sparsity(new, x, target, counts, g, batch)
    if variant == "frozen_encoder":
        _fit_decoder(new, x, batch)

    achieved = l0_on(new, x, batch)
    if abs(achieved - target) > L0_TOLERANCE * target:
        if not isinstance(new, TopKSAE):
            raise RuntimeError(
                f"the random {new.architecture} SAE's calibration L0 is {achieved:.3f}, not {target:.3f}: "
                "tied pre-activations? Pass more (or less repetitive) calibration tokens"
            )
        print(
            f"note: random TopK control: k={new.k} gives L0 {achieved:.3f} "
            f"for target {target:.3f} (k is an integer)"
        )
    return new


def _projections(new: SAE, x: Tensor, batch: int):
    """Yield (x_b - b_dec) @ W_enc [b, d_sae]: the pre-activations before any latent bias."""
    for xb in x.split(batch):
        yield (xb - new.b_dec) @ new.W_enc


def _set_sparsity(new: SAE, x: Tensor, target: float, counts: Tensor, g: torch.Generator, batch: int) -> None:
    """Give `new` (latent biases at 0) the sparsity that makes its calibration L0 `target`."""
    n = len(x)
    if isinstance(new, TopKSAE):
        # acts = ReLU(top-k): a token with fewer than k positive projections fires fewer than k latents.
        positive = torch.cat([(z > 0).sum(1) for z in _projections(new, x, batch)])  # [n]

        def l0_of(k: int) -> float:  # nondecreasing in k
            return float(positive.clamp(max=k).double().mean())

        k = min(max(1, round(target)), new.d_sae)
        while k < new.d_sae and abs(l0_of(k + 1) - target) < abs(l0_of(k) - target):
            k += 1
        while k > 1 and abs(l0_of(k - 1) - target) < abs(l0_of(k) - target):
            k -= 1
        new.k, new.target_l0 = k, float(k)
    elif isinstance(new, BatchTopKSAE):  # Matryoshka too: one θ for every latent, as trained (§3.2)
        m = round(target * n)
        top = torch.empty(0, device=x.device)
        for z in _projections(new, x, batch):
            both = torch.cat([top, z.flatten()])
            top = both.topk(min(m + 1, len(both))).values  # the m + 1 largest pairs so far, descending
        theta = (top[m - 1] + top[min(m, len(top) - 1)]) / 2
        _set_thresholds(new, new.threshold, theta.expand(new.d_sae))
        new.k, new.target_l0 = target, target
    elif isinstance(new, (JumpReLUSAE, GatedSAE, StandardSAE)):
        theta = _latent_thresholds(new, x, _firing_budget(counts, target, n, g))
        if isinstance(new, JumpReLUSAE):
            _set_thresholds(new, new.threshold, theta)
        elif isinstance(new, GatedSAE):
            # Gate open iff z > θ; b_mag keeps the magnitude z - min(θ, 0) positive wherever the gate is open.
            new.b_gate.copy_(-theta)
            new.b_mag.copy_((-theta).clamp(min=0))
        else:  # standard: ReLU(z - θ)
            new.b_enc.copy_(-theta)
        new.target_l0 = target
    else:
        raise TypeError(
            f"no random control for {type(new).__name__}: add its sparsity "
            "parameter to random_control._set_sparsity"
        )


def _set_thresholds(new: SAE, threshold: Tensor, theta: Tensor) -> None:
    """A JumpReLU-style f = pre · H(pre - threshold) that fires iff z > θ: a negative θ would let negative
    pre-activations through, so it moves into b_enc (pre = z - θ, threshold 0)."""
    threshold.copy_(theta.clamp(min=0))
    new.b_enc.copy_((-theta).clamp(min=0))


def _firing_budget(counts: Tensor, target: float, n: int, g: torch.Generator) -> Tensor:
    """[d_sae] int64: calibration tokens each random latent fires on, summing to round(target · n): the
    trained latents' counts scaled to the target (largest remainders round), shuffled across latents."""
    total = round(target * n)
    share = (counts.double() * total / counts.sum()).clamp(max=n)
    m = share.floor()
    short = int(total - m.sum())
    if short > 0:
        room = torch.where(m < n, share - m, -1.0)
        m[room.topk(short).indices] += 1
    perm = torch.randperm(len(m), generator=g).to(m.device)
    return m.long()[perm]


def _latent_thresholds(new: SAE, x: Tensor, m: Tensor) -> Tensor:
    """[d_sae] θ with exactly m[i] calibration tokens having projection z_i > θ_i: halfway between the
    m-th and (m+1)-th largest z_i; beyond the extremes (by their span) for m = 0 and m = n."""
    n, theta = len(x), torch.empty(new.d_sae, device=x.device)
    cols = max(1, _CELLS // n)
    centred = x - new.b_dec
    for start in range(0, new.d_sae, cols):
        z = centred @ new.W_enc[:, start : start + cols]  # [n, c]
        mc = m[start : start + cols]
        top = z.topk(min(int(mc.max()) + 1, n), dim=0).values  # [≤ max m + 1, c], descending
        hi = top.gather(0, (mc - 1).clamp(min=0, max=len(top) - 1)[None])[0]
        lo = top.gather(0, mc.clamp(max=len(top) - 1)[None])[0]
        low = z.min(0).values
        span = (top[0] - low).clamp(min=1e-6)
        theta[start : start + cols] = torch.where(
            mc == 0, top[0] + span, torch.where(mc >= n, low - span, (hi + lo) / 2)
        )
    return theta


def _fit_decoder(new: SAE, x: Tensor, batch: int) -> None:
    """Frozen Encoder's decoder in closed form: row i = the unit-norm activation-weighted mean of the centred
    tokens latent i fires on (unchanged for a latent that never fires); then the least-squares scale c of
    acts @ W_dec onto x - b_dec, folded into the encoder and latent biases (same active set, acts · c)."""
    num = torch.zeros_like(new.W_dec)
    for xb in x.split(batch):
        num += new.encode(xb)[0].t() @ (xb - new.b_dec)
    norms = num.norm(dim=1, keepdim=True)
    new.W_dec.copy_(torch.where(norms > 0, num / norms.clamp(min=1e-12), new.W_dec))
    dot = sq = 0.0
    for xb in x.split(batch):
        y = new.encode(xb)[0] @ new.W_dec
        dot += float((y * (xb - new.b_dec)).sum())
        sq += float(y.pow(2).sum())
    if not (sq > 0 and dot > 0):
        raise RuntimeError(
            f"frozen_encoder: no positive decoder scale (<y, x> = {dot:.3g}, |y|^2 = {sq:.3g})"
        )
    c = dot / sq
    new.W_enc_T.mul_(c)
    for name in new.latent_biases:
        getattr(new, name).mul_(c)
