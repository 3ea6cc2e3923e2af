"""The SAE contract: what every architecture shares (parameters, the decoder, the SAELens tensors, the
training step's interface) and the helpers they use (b_dec's initialisation, sparsity control).

An SAE maps a residual vector x [d_in] to latents f [d_sae] and back:

    pre   = (x - b_dec) @ W_enc + b_enc        W_enc [d_in, d_sae]   (SAELens: apply_b_dec_to_input)
    f     = nonlinearity(pre)                  one file per architecture (registry.py lists them)
    x_hat = f @ W_dec + b_dec                  W_dec [d_sae, d_in], rows kept unit-norm (except `standard`)

The sparse maths of a training step (`Pattern`, `gather_pre`, `sparse_decode`) is in kernels.py; the
training step that TopK and the BatchTopK family share (their selection aside), with its AuxK loss, is
`KSparseSAE` here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from helpers.saes.kernels import (
    Pattern,
    firing_counts,
    gather_pre,
    recon_loss,
    relu_topk,
    sparse_decode,
    sparse_recon_loss,
)

# Under CUDA autocast (fp16 on a T4, bf16 from compute capability 8) the sparse parts run in fp32: only
# the encoder's dense matmul uses the low precision.

# Above this fraction of active (token, latent) pairs, dense matmuls beat sparse ones. Measured on a
# 2-core CPU (sparse CSR ops cost as much as a dense matmul at ~20%); on CUDA cuBLAS wins much earlier.


@dataclass
class StepOutput:
    """What one training forward pass returns to the loop (the same for every architecture)."""

    loss: Tensor
    """Scalar to backpropagate: reconstruction + the architecture's auxiliary terms."""
    terms: dict[str, Tensor]
    """Each term of `loss`, detached, for the progress bar and the history."""
    x_hat: Tensor
    """[n_tokens, d_in] reconstruction, detached."""
    fired: Tensor
    """[d_sae] int64: on how many tokens of the batch each latent was active."""

    @property
    def l0(self) -> float:
        """Mean number of active latents per token in this batch."""
        return float(self.fired.sum()) / len(self.x_hat)


class SAE(nn.Module):
    """Parameters and maths shared by all architectures. A subclass sets `architecture` (the cfg.json
    name), `latent_biases` and `saelens_tensors`, and implements `encode`, `losses` and `saelens_cfg`."""

    architecture: ClassVar[str]
    saved_architecture: ClassVar[str | None] = None
    """The cfg.json architecture when it differs from the training one (BatchTopK is saved as `jumprelu`
    with per-latent thresholds, as SAELens does): `encode` then already computes the saved function."""
    encoder_init_scale: ClassVar[float] = 1.0
    """The encoder starts as this times the decoder's transpose (Gao et al. 2024, §A.1); 1 for every
    architecture shipped but Gated (0.1: gated.py; the README's Measured table has the ablations)."""
    decoder_norm: ClassVar[float] = 1.0
    """The norm the decoder rows start at and are held at during training (the encoder starts as
    `encoder_init_scale` times the decoder's transpose at this norm). Below 1, Adam's steps, which are about
    `lr` per element whatever the gradient's size, turn the rows faster (SAELens starts its rows at 0.1,
    `decoder_init_norm`). The saved SAE has unit rows: `saelens_state` folds the norm into the encoder and
    the latent biases (every row has the same norm, so the active set does not change). The norm in use is the
    buffer `decoder_row_norm`, kept in checkpoints (1 for a checkpoint from before it existed)."""
    free_decoder: ClassVar[bool] = False
    """Whether the decoder rows' norms are free in training (no gradient projection, no renormalisation),
    as SAELens's TopK family trains them, instead of held at `decoder_row_norm`."""
    fold_row_norms: ClassVar[bool] = True
    """Whether each row's norm can be folded into its latent's encoder column and biases when saving (true
    when a latent's activation is positively homogeneous in its own pre-activation: ReLU, JumpReLU; false
    for TopK, whose selection compares latents: free rows are then saved as they are)."""
    input_norm: ClassVar[str] = "unit"
    """The input scale the trainer uses for this architecture when `TrainConfig.input_norm` is "auto":
    "unit" (unit mean squared norm; the sparsity settings of JumpReLU and Gated are in its units) or
    "sqrt_d_in" (mean norm sqrt(d_in), SAELens's `expected_average_only_in`; the k-sparse family and standard,
    whose λ is then in SAELens's `l1_coefficient` units)."""
    latent_biases: ClassVar[tuple[str, ...]]
    """Parameters in the units of the pre-activations; divided by s when an input scale s is folded."""
    saelens_tensors: ClassVar[tuple[str, ...]]
    """Exactly the tensors SAELens loads for this architecture (REFERENCE.md), in our names."""

    def __init__(self, d_in: int, d_sae: int, *, l0: float, seed: int = 0):
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        if not 0 < l0 <= d_sae:
            raise ValueError(f"the L0 target (TopK's k) must be in (0, d_sae={d_sae}], got {l0}")
        self.d_in, self.d_sae, self.target_l0 = d_in, d_sae, float(l0)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_in, generator=g)
        w /= w.norm(dim=1, keepdim=True)  # unit-norm decoder rows (Gao et al. 2024, §2.1) ...
        if self.decoder_norm != 1:
            w *= self.decoder_norm  # ... times the architecture's initial norm
        self.W_dec = nn.Parameter(w)
        # Encoder initialised as the decoder's transpose (Gao et al. §A.1), times encoder_init_scale. Stored
        # latent-major as W_enc_T [d_sae, d_in] so a latent's gradient is one contiguous row (sparse updates,
        # fused Adam); `W_enc` [d_in, d_sae] is the SAELens-shaped view of it.
        self.W_enc_T = nn.Parameter(w * self.encoder_init_scale)
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("decoder_row_norm", torch.tensor(float(self.decoder_norm)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before decoder_row_norm existed was trained with unit rows
        state_dict.setdefault(prefix + "decoder_row_norm", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def W_enc(self) -> Tensor:
        return self.W_enc_T.t()

    @property
    def saelens_architecture(self) -> str:
        """The `architecture` written to cfg.json, which SAELens loads."""
        return self.saved_architecture or self.architecture

    # --- the interface every architecture implements -------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(acts [..., d_sae], pre-activations [..., d_sae]), dense, for inference."""
        raise NotImplementedError

    def losses(self, x: Tensor, dead: Tensor) -> StepOutput:
        """The training forward pass on a batch x [n_tokens, d_in]; `dead` [d_sae] bool marks latents
        that have not fired for the configured number of tokens (used by TopK's AuxK)."""
        raise NotImplementedError

    def saelens_cfg(self) -> dict:
        """Architecture-specific cfg.json keys (e.g. TopK's `k`); SAELens ignores keys it does not know."""
        return {"l0_target": self.target_l0}

    @classmethod
    def kwargs_from_saelens_cfg(cls, cfg: dict) -> dict:
        """Constructor arguments recovered from a cfg.json (the inverse of `saelens_cfg`)."""
        return {"l0": cfg.get("l0_target") or min(32, int(cfg["d_sae"]))}

    def init_from_sample(self, x: Tensor, total_steps: int) -> None:
        """Before training, once b_dec is set: initialise from the trainer's init sample x [n, d_in], at the
        training scale, for a run of `total_steps` steps (default: nothing; JumpReLU's thresholds)."""

    def after_step(self, out: StepOutput) -> None:
        """Parameter projections and controller updates after the optimizer step (default: none)."""

    def calibrate(self, batches: Iterable[Tensor]) -> dict | None:
        """After training: set inference-only parameters from a pool of (scaled) training batches, and say
        what changed (default: nothing to set, None)."""
        return None

    # --- shared maths ---------------------------------------------------------------------------
    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction decode(encode(x))."""
        return self.decode(self.encode(x)[0])

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"this {self.architecture} SAE has d_in={self.d_in} but got vectors of size {x.shape[-1]}: "
                "it was trained on another model or layer width"
            )

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row, so a step along it does not
        change the row's norm (Bricken et al. 2023; Gao et al. 2024, §A.2)."""
        g, w = self.W_dec.grad, self.W_dec
        if g is None or self.free_decoder:
            return
        dots = torch.linalg.vecdot(g, w, dim=1).unsqueeze(1)  # [d_sae, 1] row-wise g·w
        g.addcmul_(w, dots, value=-1.0 / float(self.decoder_row_norm) ** 2)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rows back to `decoder_row_norm` after the optimizer's step (none with `free_decoder`)."""
        if self.free_decoder:
            return
        self.W_dec.mul_(self.decoder_row_norm / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def record_firing(self, fired: Tensor, n_tokens: int) -> None:
        """Dead-latent bookkeeping in tokens (not steps), as Gao et al. count it."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired > 0, 0)

    def dead_mask(self, dead_tokens: int) -> Tensor:
        return self.tokens_since_fired >= dead_tokens

    @torch.no_grad()
    def folded_norms(self) -> Tensor:
        """[d_sae] float32 on the CPU: each decoder row's norm c_j as `saelens_state` folds it (the held
        `decoder_row_norm`, or the free rows' own norms; 1 when they cannot be folded). The saved SAE's
        latent j is this SAE's times c_j / scale."""
        if not self.free_decoder:
            return self.decoder_row_norm.float().cpu().expand(self.d_sae)
        if self.fold_row_norms:
            return self.W_dec.detach().float().norm(dim=1).clamp_min(1e-8).cpu()
        return torch.ones(self.d_sae)

    @torch.no_grad()
    def saelens_state(self, scale: float = 1.0) -> dict[str, Tensor]:
        """The SAELens tensors for raw (unnormalised) inputs, given that training saw x * `scale`.

        For x_n = s·x: (x_n - b_dec) = s·(x - b_dec/s), so dividing b_dec and every latent-unit bias or
        threshold by s gives pre-activations pre/s on raw inputs, the same active set, and
        x_hat = (f @ W_dec + b_dec)/s: the decoder rows stay unit-norm and f is in raw units.
        Rows of norm c_j (held at `decoder_row_norm`, or free) are saved as unit rows with c_j folded into
        latent j's encoder column and biases: its pre-activation times c_j, so f_j·c_j, the same active set
        (with equal norms, or when latents are selected independently: `fold_row_norms`), the same x_hat.
        Free rows that cannot be folded are saved as they are.
        """
        c = self.folded_norms()
        out = {}
        for name in self.saelens_tensors:
            t = getattr(self, name).detach().float().cpu()
            if name == "b_dec":
                t = t / scale
            elif name in self.latent_biases:
                t = t * (c / scale)
            elif name == "W_enc":
                t = t * c
            elif name == "W_dec":
                t = t / c[:, None]
            out[name] = t.contiguous()
        return out

    @torch.no_grad()
    def load_saelens_state(self, tensors: dict[str, Tensor]) -> None:
        """Saved tensors (unit-norm rows when the SAE was trained with fixed norms) into this SAE."""
        for name in self.saelens_tensors:
            getattr(self, name).copy_(tensors[name].to(getattr(self, name)))
        self.decoder_row_norm.fill_(1.0)


class KSparseSAE(SAE):
    """The training step of the k-sparse family (TopK, BatchTopK, Matryoshka BatchTopK): the encoder's one
    dense matmul, the architecture's choice of active (token, latent) pairs (`pick`), the reconstruction of
    the chosen activations (`reconstruction_loss`) and AuxK on the dead latents (`auxk_loss`, coefficient
    `auxk_coef`, the top `k_aux` dead latents of each token: min(d_in // 2, d_sae) by default). Its decoder
    rows start at norm 0.1 and move freely, AuxK's coefficient is 1 and the encoder starts as the decoder's
    transpose, as SAELens trains this family (the ablations are in the README's Measured table)."""

    input_norm = "sqrt_d_in"  # see TrainConfig.input_norm
    decoder_norm = 0.1  # SAE.decoder_norm: rows start at 0.1 and move freely, as SAELens trains this family
    free_decoder = True
    latent_biases: ClassVar[tuple[str, ...]] = ("b_enc",)
    auxk_normalised: ClassVar[bool] = True
    """AuxK's form (`auxk_loss`): divided by the residual error's variance (OpenAI's) or unnormalised and
    times min(n_dead / k_aux, 1) (SAELens's; Matryoshka's, whose module docstring says why)."""

    def __init__(
        self, d_in: int, d_sae: int, *, l0: float, k_aux: int | None, auxk_coef: float = 1.0, seed: int = 0
    ):
        super().__init__(d_in, d_sae, l0=l0, seed=seed)
        self.k_aux = min(k_aux or d_in // 2, d_sae)
        self.auxk_coef = auxk_coef
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def pick(self, pre: Tensor) -> Pattern:
        """The active pairs of a batch from its pre-activations [n, d_sae] (no autograd)."""
        raise NotImplementedError

    def select(self, x: Tensor) -> tuple[Tensor, Pattern, Tensor]:
        """(pre [n, d_sae] without autograd, the active pairs, their ReLU'd activations [nnz] with
        gradients)."""
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)  # [n, d_sae]: the only dense matmul
            p = self.pick(pre)
        acts = gather_pre(x, self.b_dec, self.W_enc_T, self.b_enc, pre, p).relu()  # [nnz]
        return pre, p, acts

    def reconstruction_loss(self, x: Tensor, acts: Tensor, p: Pattern) -> tuple[Tensor, Tensor, dict]:
        """(loss, x_hat, terms) of the selected activations: plain MSE here, nested prefixes in Matryoshka."""
        mse, x_hat = sparse_recon_loss(acts, self.W_dec, self.b_dec, x, p)
        return mse, x_hat, {"mse": mse.detach()}

    def losses(self, x: Tensor, dead: Tensor) -> StepOutput:
        pre, p, acts = self.select(x)
        loss, x_hat, terms = self.reconstruction_loss(x, acts, p)
        if int(dead.sum()) and self.auxk_coef:
            residual = (x - x_hat).detach()
            auxk = auxk_loss(self, x, pre, dead, residual, self.k_aux, normalised=self.auxk_normalised)
            terms["auxk"] = auxk.detach()
            loss = loss + self.auxk_coef * auxk
        fired = firing_counts(acts, p)  # [d_sae]
        return StepOutput(loss, terms, x_hat.detach(), fired)


class PenaltySAE(SAE):
    """The architectures whose sparsity is a penalty (standard, Gated, JumpReLU): its coefficient λ, an fp32
    buffer `sparsity_coef`, is steered toward the target L0 after every step (`adapt_coefficient` at rate
    `coef_rate`; 0 keeps λ fixed, as in SAELens; `coef_hold_beyond` its anti-windup factor)."""

    coef_hold_beyond: ClassVar[float | None] = None
    coef_trend_horizon: ClassVar[float | None] = None
    """With a horizon H (steps), λ is held while the L0 moves toward its target and is either more than
    `COEF_FAR` times away from it or fast enough to reach it within H steps (conditional integration, an
    anti-windup): under a fixed penalty the L0 falls on its own from about half the latents toward its
    settled value, and integrating the error during that fall only builds up an overshoot. The trend is
    that of an exponential average of log L0 (weight `L0_SMOOTHING` per step; the buffer `log_l0_average`,
    inf before the first step). None: always integrate."""

    COEF_FAR: ClassVar[float] = 2.0
    L0_SMOOTHING: ClassVar[float] = 0.1
    COEF_LEAD_UNSTORED: ClassVar[float] = 0.0
    """`coef_lead_steps` of a checkpoint that does not store it: one saved before the lead was stored, whose
    SAE trained without a lead (the standard SAE before its low start; Gated overrides it)."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0: float,
        sparsity_coef: float,
        coef_rate: float,
        coef_lead_steps: float = 0.0,
        coef_near_gain: float = 1.0,
        seed: int = 0,
    ):
        """`coef_lead_steps`: with the trend hold, within `COEF_FAR` of the target, integrate instead the
        error of this step's L0 projected this many steps ahead along the smoothed trend (a derivative term:
        λ comes down before a falling L0 overshoots its target, rather than after); 0 for the plain hold. A
        buffer, so a checkpoint resumes with the lead it trained with whatever a later default is.
        `coef_near_gain`: while the lead acts and the smoothed L0 and its projection lie on the same side of
        the target (no crossing ahead), λ moves at this times `coef_rate` (a buffer too; 1 in a checkpoint
        without it). Under a fixed λ the L0 of an L1 SAE keeps falling through training, a ramp that an
        integral controller follows only with an error of the ramp's rate over its gain: the standard SAE
        ended 13% under its target at 400 steps (L0 14.8 of 17) and 7% at 150 (48.2 of 52) at gain 1; at
        gain 4, 0.2% and 1.9% under (bench/results/standard_controller_screen_cpu.json). Applied also while
        a crossing is ahead, gain 4 overshot at 150 steps (L0 57.4 of 52: λ came down before the L0 did);
        far from the target the plain rate keeps λ from running up in the early rise of the L0 (`coef_rate`
        0.08 throughout: 1.7% dead at 400 steps)."""
        super().__init__(d_in, d_sae, l0=l0, seed=seed)
        self.coef_rate = coef_rate
        self.register_buffer("sparsity_coef", torch.tensor(sparsity_coef, dtype=torch.float32))
        self.register_buffer("coef_lead_steps", torch.tensor(float(coef_lead_steps), dtype=torch.float32))
        self.register_buffer("coef_near_gain", torch.tensor(float(coef_near_gain), dtype=torch.float32))
        self.register_buffer("log_l0_average", torch.tensor(math.inf))
        # training steps taken, for the schedules that read it (JumpReLU's θ rate, the standard SAE's λ
        # warm-up); a buffer, so a resumed run goes on where it stopped
        self.register_buffer("steps_trained", torch.tensor(0, dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before log_l0_average existed: the average starts afresh; one from before
        # steps_trained existed counts its steps from the resumption; one from before coef_lead_steps was
        # stored goes on with the lead it trained with (COEF_LEAD_UNSTORED), not with today's default
        state_dict.setdefault(prefix + "coef_lead_steps", torch.tensor(self.COEF_LEAD_UNSTORED))
        state_dict.setdefault(prefix + "coef_near_gain", torch.tensor(1.0))
        state_dict.setdefault(prefix + "log_l0_average", torch.tensor(math.inf))
        state_dict.setdefault(prefix + "steps_trained", torch.tensor(0, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        """Steer λ toward the target L0, then count the step (a subclass reading `steps_trained` before
        calling this sees the index of the step just taken)."""
        self.steer_coefficient(out)
        self.steps_trained.add_(1)

    def steer_coefficient(self, out: StepOutput) -> None:
        if not self.coef_rate:
            return
        l0, rate = out.l0, self.coef_rate
        if self.coef_trend_horizon is not None:
            before = float(self.log_l0_average)
            if self.approaching(l0) and (math.isinf(before) or not self.leading()):
                return
            if self.leading():  # this step's L0 projected along the smoothed trend
                average, target = float(self.log_l0_average), math.log(self.steering_l0())
                l0 *= math.exp(float(self.coef_lead_steps) * (average - before))
                if (math.log(max(l0, 1e-3)) - target) * (average - target) > 0:  # no crossing ahead
                    rate *= float(self.coef_near_gain)
        adapt_coefficient(self.sparsity_coef, l0, self.steering_l0(), rate, hold_beyond=self.coef_hold_beyond)

    def steering_l0(self) -> float:
        """The L0 that λ is steered toward at this step: the target (the standard SAE's `l0_descent` lowers a
        schedule onto it instead)."""
        return self.target_l0

    def leading(self) -> bool:
        """Whether the derivative term acts now (`coef_lead_steps`, within `COEF_FAR` of the target)."""
        average = float(self.log_l0_average)
        near = abs(average - math.log(self.steering_l0())) <= math.log(self.COEF_FAR)
        return bool(float(self.coef_lead_steps)) and near and not math.isinf(average)

    def approaching(self, l0: float) -> bool:
        """Update `log_l0_average` with this step's L0; whether λ should be held (`coef_trend_horizon`)."""
        before, now = float(self.log_l0_average), math.log(max(l0, 1e-3))
        if math.isinf(before):  # the first step: no trend yet, hold
            self.log_l0_average.fill_(now)
            return True
        self.log_l0_average.fill_(before + self.L0_SMOOTHING * (now - before))
        now = float(self.log_l0_average)  # as stored: an unchanged average is no trend
        error, trend = now - math.log(self.steering_l0()), now - before
        far = abs(error) > math.log(self.COEF_FAR)
        return error * trend < 0 and (far or abs(trend) * self.coef_trend_horizon >= abs(error))


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 50) -> Tensor:
    """Weiszfeld's algorithm started at the mean, x [n, d] -> [d]: b_dec's initial value (robust to the
    outlier tokens of a residual stream, as in Bricken et al. 2023)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-6 * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y


INIT_VALUES = 1 << 24
"""Pre-activations an initialisation from the trainer's init sample reads at most (64 MB in float32): the
standard SAE's common offset and L0, Gated's balanced λ (`init_sample`)."""


def init_sample(x: Tensor, d_sae: int) -> Tensor:
    """The first tokens of x [n, d_in] whose [n, d_sae] pre-activations fit in `INIT_VALUES`."""
    return x[: max(1, INIT_VALUES // d_sae)]


def low_start(init_l0_mult: float | None, l0: float, d_sae: int, bias: str) -> bool:
    """Whether an L1-type SAE (standard, Gated) starts low: its `bias` lowered per latent from the trainer's
    init sample so the L0 starts at `init_l0_mult` times the target `l0`; not when it is None or its L0 is
    at or above d_sae / 2, where the bias at 0 already starts (a ValueError for a multiple <= 0)."""
    if init_l0_mult is not None and not init_l0_mult > 0:
        raise ValueError(
            f"init_l0_mult must be > 0 (the initial L0 as a multiple of the target l0), or None for "
            f"{bias} at 0; got {init_l0_mult}"
        )
    return init_l0_mult is not None and init_l0_mult * l0 < d_sae / 2


@torch.no_grad()
def latent_quantiles(sae: SAE, x: Tensor, l0: float, bias: Tensor | None = None) -> Tensor:
    """[d_sae]: each latent's value of its pre-activation `(x - b_dec) @ W_enc + bias` on x [n, d_in] above
    which lie its share l0 / d_sae of the tokens (at least one): a threshold or bias offset there starts
    every latent firing on its share of an L0 of `l0` (JumpReLU's θ, the standard SAE's
    `init_l0_per_latent`, Gated's gate with `bias` b_gate; default `sae.b_enc`). 512 latents at a time, as
    [512, n] pre-activations (each latent's tokens contiguous: at 576 -> 4608 on 16,384 tokens, one CPU
    thread, 2.25 s where the [n, 512] layout's column-wise kthvalue took 3.15)."""
    bias = sae.b_enc if bias is None else bias
    below = len(x) - max(1, round(len(x) * l0 / sae.d_sae))  # tokens at or below the value
    out = torch.empty(sae.d_sae, dtype=x.dtype, device=x.device)
    x_c_t = (x - sae.b_dec).t()  # [d_in, n]
    for cols in torch.arange(sae.d_sae, device=x.device).split(512):
        pre_t = torch.addmm(bias[cols].unsqueeze(1), sae.W_enc_T[cols], x_c_t)  # [512, n]
        out[cols] = pre_t.kthvalue(max(1, below), dim=1).values
    return out


def pre_act_loss(
    x: Tensor,
    b_dec: Tensor,
    W_enc_T: Tensor,
    bias: Tensor,
    dead: Tensor,
    threshold: Tensor | None = None,
    W_dec: Tensor | None = None,
) -> Tensor:
    """Anthropic's pre-activation loss on the dead latents (SAELens's `calculate_pre_act_loss`): the mean
    over tokens of Σ_dead relu(θ_j - pre_j), each times ‖W_dec row j‖ when `W_dec` is given. Every other
    term of a JumpReLU or Gated step lives where a latent fires, so one that fires on no token gets no
    gradient; this raises its pre-activations toward firing. pre = (x - b_dec) @ W_enc_T[dead].T + bias[dead]
    [n, n_dead]; θ 0 when `threshold` is None (Gated's gate); `dead` [d_sae] bool. Uncoefficiented."""
    idx = dead.nonzero().squeeze(1)  # [n_dead]
    pre = (x - b_dec) @ W_enc_T.index_select(0, idx).t() + bias.index_select(0, idx)
    gap = (-pre if threshold is None else threshold.index_select(0, idx) - pre).relu()
    if W_dec is not None:
        gap = gap * W_dec.index_select(0, idx).norm(dim=1)
    return gap.sum(-1).mean()


AUXK_DENSE_UPTO = 3
"""AuxK takes the dead latents' dense [n, n_dead] block while n_dead <= this many times k_aux, the sparse
kernels beyond. One AuxK forward + backward, one thread (dense block vs sparse): 64 x 512, k_aux 32: 46 dead
1.7 vs 3.7 ms, 100 dead 2.8 vs 3.5, 200 dead 6.2 vs 4.2; 576 x 4608, k_aux 288: 400 dead 50 vs 113 ms,
576 dead 73 vs 117, 1,000 dead 117 vs 124 (k_aux >= n_dead took the block before: 20 dead at 64 x 512, a
TopK step 5.7 vs 8.0 ms; 200 at 576 x 4608, 122 vs 172)."""


def auxk_loss(
    sae: SAE, x: Tensor, pre: Tensor, dead: Tensor, residual: Tensor, k_aux: int, normalised: bool = True
) -> Tensor:
    """AuxK (Gao et al. 2024, §A.2): ||e - e_hat||^2 / ||e - mean(e)||^2, where e is the detached residual
    error x - x_hat and e_hat is decoded (without b_dec, through the trainable decoder) from the top-k_aux
    dead latents' ReLU'd pre-activations of each token. Normalised by e's variance as in OpenAI's
    reference; with `normalised=False` SAELens's form instead, ||e - e_hat||^2 times min(n_dead / k_aux, 1).
    `pre` [n, d_sae] is `(x - b_dec) @ W_enc + b_enc` computed under no_grad; `dead` [d_sae] bool."""
    dead_idx = dead.nonzero().squeeze(1)  # [n_dead]
    if len(dead_idx) <= AUXK_DENSE_UPTO * k_aux:
        # A dense [n, n_dead] block by plain autograd in fp32 (as the sparse kernels run): every dead latent
        # of every token when k_aux >= n_dead, else each token's top k_aux of the block (a mask, so only those
        # get gradients); the same sums as the sparse path without its sort and CSR kernels.
        with torch.autocast(x.device.type, enabled=False):
            block = torch.addmm(
                sae.b_enc.index_select(0, dead_idx),
                x.float() - sae.b_dec,
                sae.W_enc_T.index_select(0, dead_idx).t(),
            )
            acts = block.relu()
            if k_aux < len(dead_idx):
                with torch.no_grad():
                    keep = torch.zeros_like(block, dtype=torch.bool)
                    keep.scatter_(1, relu_topk(block.detach(), k_aux), True)
                acts = acts * keep
            e_hat = acts @ sae.W_dec.index_select(0, dead_idx)
    else:
        with torch.no_grad():
            p = Pattern.from_indices(dead_idx[relu_topk(pre.index_select(1, dead_idx), k_aux)], sae.d_sae)
        acts = gather_pre(x, sae.b_dec, sae.W_enc_T, sae.b_enc, pre, p).relu()
        e_hat = sparse_decode(acts, sae.W_dec, p)
    if not normalised:
        return recon_loss(e_hat, residual) * min(len(dead_idx) / k_aux, 1.0)
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return recon_loss(e_hat, residual) / variance


def adapt_coefficient(
    coef: Tensor, l0: float, target: float, rate: float, hold_beyond: float | None = None
) -> None:
    """Integral control of a sparsity coefficient toward a target L0 (fp32 buffer, in place): log(coef)
    moves by `rate` times log(L0 / target), clipped to ±1. With `hold_beyond`, coef is held while L0 is
    more than that factor away from the target (anti-windup for JumpReLU, whose L0 is then limited by how
    fast Adam moves the thresholds, so integrating would only build up an overshoot)."""
    error = math.log(max(l0, 1e-3) / target)
    if hold_beyond is None or abs(error) < math.log(hold_beyond):
        coef.mul_(math.exp(rate * max(-1.0, min(1.0, error))))
