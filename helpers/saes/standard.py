"""Standard SAE: ReLU latents with an L1 penalty weighted by decoder norms (Bricken et al. 2023, "Towards
Monosemanticity"; Anthropic's April 2024 update, "Training Sparse Autoencoders"; SAELens's `standard`).

    f     = ReLU((x - b_dec) @ W_enc + b_enc)
    loss  = ||x - x_hat||^2 + λ · Σ_j f_j ||W_dec_j||

The decoder rows are not held at unit norm here: the penalty is on f_j ||W_dec_j||, which is what latent j
writes into the residual, so the SAE cannot cheat the L1 term by shrinking f and growing the row (the
reason the older recipe fixed the norms). The rows' norms are free (`free_decoder`) and start at 0.1 with the
encoder as the decoder's transpose (SAELens's `decoder_init_norm`), and the inputs are scaled to mean norm
sqrt(d_in) (`input_norm`, SAELens's `expected_average_only_in`), so λ is in SAELens's `l1_coefficient`
units (SAELens recommends 5, Anthropic's April 2024 update; the start below). With unit rows, or at unit mean
squared norm, the first steps overshoot the reconstruction and Adam's bias steps (about lr each) then
silence most latents (L0 near 0 within 20 steps, then a slow recovery; the README's Measured table).

λ is steered toward the target L0 `l0` (base.adapt_coefficient), as for Gated and JumpReLU, so one knob
sets the sparsity of every architecture; it is held while the L0 already falls toward the target on its own
(`coef_trend_horizon`: integrating during that fall only builds an overshoot, and each step of a larger λ
costs explained variance through shrinkage). The step is sparse apart from the encoder's forward matmul: every
term lives on the active set {pre > 0}. Early in training that set is half the latents; above
kernels.DENSE_ABOVE the step is then dense maths with its backward written out (`_DenseStep`: five dense
products instead of autograd's six; the same gradients within float rounding: test_standard_step.py).

Without the L0 descent below (`l0_descent=0`), near the target, once the L0 has nothing but the target's far
side ahead, λ moves at `coef_near_gain` 4 times its rate (PenaltySAE): under a fixed λ the L0 keeps falling
through training, and at the plain rate it ended 13% under its target at 400 steps (L0 14.8 of 17) and 7% at
150 (48.2 of 52); with the gain 0.2% and 1.9% under, dead 0.65% / 0.15% as before
(bench/results/standard_controller_screen_cpu.json), and at the same held-out L0s a higher EV (0.8937 vs
0.8876 at 17: standard_controller_matched_l0_cpu.json). Beside SAELens (bench/sae_train.py): EV at matched L0
0.8937 vs 0.8493 at 17 (400 steps), 0.8120 vs 0.7380 at 52 (150 steps).

With b_enc at 0 the L0 starts near d_sae / 2, so the first ~30 of a short run's steps are dense. By default
the SAE starts lower (`low_start`): each b_enc_j is lowered by its own quantile of the trainer's init sample
(`init_l0_per_latent`) so that every latent fires on the same share of it and the L0 starts at
`init_l0_mult` 10 times the target, with λ from 3.5 (`LOW_START_COEF`; the controller lifts it to ~4.8 in
the early rise of the L0) and `coef_lead_steps` 40 (`LOW_START_LEAD`). On bench/sae_train.py (SmolLM2
layer 15, d_sae 4608, 1 thread), 150 steps: EV 0.806 at L0 48.2 (target 52) against the old start's 0.740
at 50.8 and SAELens's 0.739 at 52.3, dead 0.15% vs 0.22% / 0.35%, 2.85x SAELens's speed load-corrected
(the old start 2.44-2.74x); 400 steps: 0.883 at 14.8 (target 17) vs 0.834 at 16.2 and SAELens's 0.852 at
17.4, dead 0.69% vs 1.1% / 0.76%, 3.71x (bench/results/standard_start_screen_cpu.json,
sae_train_cpu_standard_start_*; as the default with no options, sae_train_cpu_standard_default_low_start*:
the same EV, L0 and dead, 3.06x and 4.06x load-corrected in those runs). Where 10 times the target is at
or above d_sae / 2 (a small SAE with a high target, e.g. bench/synthetic_quality.py's 157 of 512) the old
start is kept: b_enc at 0, λ from 5, no lead. `init_l0_mult=None` selects the old start everywhere (the
benches: `--ours-sae-option init_l0_mult=null`); `init_l0_per_latent=False` one common offset.

The L0 descent (`l0_descent` 0.6, the default): λ is steered toward a target that falls log-linearly from
the starting L0 to `l0` over the first 60% of the run, not toward `l0` from the first step. Reaching the
target early is what cost the ground truth on bench/synthetic_quality.py's world at higher sparsity
(512 latents, 1M samples, issue 25): under SAELens's fixed λ the L0 falls slowly through the whole run
(256 -> 97 at step 50 -> 21.5 at step ~900 of 977, at l1 4), and ours with λ fixed at 4 from b_enc at 0
matches it (MCC/F1 0.602/0.459 vs 0.620/0.466); steered at 21.5 from the first step, ours reached it by
step 50-300, and the old start lost 9-19 latents and the low start, whose lead and gain 4 then swung the
L0 between 12 and 36, 160 (0.541/0.399 and 0.485/0.332). With the descent (and gain 1: the gain 4 swung the
L0 7.7-30 after it) 0.737/0.478 vs SAELens's 0.612/0.461 at L0 21.2 vs 21.5, and at SAELens's l1 2 (L0
36, b_enc at 0, λ from 2: from 5 the L0 fell to 50 by step 50) 0.776/0.354 vs 0.776/0.352 at L0 35.0 vs
36.4 (bench/results/synthetic_quality_cpu_standard_descent_*.json; the screens with traces:
standard_descent_synthetic_screen.json). On sae_train's data, ours alone, EV at matched L0 52 0.819 vs
0.812 at 150 steps (L0 54.5 of 52 vs 51.0) and 0.8934 vs 0.8937 at 17 at 400 (L0 16.99 vs 16.97): the
descent costs some sparsity early in the run there (15 dense steps of 150 vs 6), not EV
(standard_descent_real_screen.json; beside SAELens: sae_train_cpu_standard_descent_*.json).

What the lower start took: one common offset (x20: 1.9-2.2% dead vs SAELens's 0.2-0.3%) and a strong λ at
a low start (x10 per latent, λ fixed at 3.5 / 4 / 4.5: 0.11% / 0.98% / 3.9% dead; they fall silent
mid-run, not in the first steps, and keeping silent latents' Adam moments did not save them) kill latents;
a weak λ lets the L0 climb back into the dense range first. A λ warm-up from 0 (`coef_warmup_steps`,
SAELens's form) makes it worse: the L0 rises while λ is small, EV 0.686 at L0 44.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.amp import custom_bwd, custom_fwd

from helpers.saes.base import PenaltySAE, StepOutput, init_sample, latent_quantiles, low_start
from helpers.saes.kernels import (
    PositivePairs,
    dense_enough,
    dense_weight_grads,
    gather_pre,
    residual_mse,
    row_norms,
    sparse_recon_loss,
)


class StandardSAE(PenaltySAE):
    architecture = "standard"
    latent_biases = ("b_enc",)
    saelens_tensors = ("W_enc", "b_enc", "W_dec", "b_dec")
    input_norm = "sqrt_d_in"
    decoder_norm = 0.1
    free_decoder = True
    coef_trend_horizon = 50.0
    LOW_START_COEF = 3.5  # λ's start with the low start (`low_start`)
    DENSE_START_COEF = 5.0  # ... from b_enc at 0 without the descent (SAELens's recommended l1_coefficient)
    DESCENT_DENSE_START_COEF = 2.0  # ... and from b_enc at 0 with the descent (`l0_descent`)
    LOW_START_LEAD = 40.0  # coef_lead_steps with the low start (0 from b_enc at 0)
    LOW_START_NEAR_GAIN = 4.0  # coef_near_gain with the low start (1 from b_enc at 0)

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0: float = 32,
        sparsity_coef: float | None = None,
        coef_rate: float = 0.02,
        init_l0_mult: float | None = 10.0,
        init_l0_per_latent: bool = True,
        coef_warmup_steps: int = 0,
        coef_lead_steps: float | None = None,
        coef_near_gain: float | None = None,
        l0_descent: float = 0.6,
        seed: int = 0,
    ):
        """`l0`: target L0; `sparsity_coef`: initial L1 coefficient λ, None for `LOW_START_COEF` (3.5) with
        the low start and, without it, `DESCENT_DENSE_START_COEF` (2) with the descent or `DENSE_START_COEF`
        (5, SAELens's) without; `coef_rate`: how fast log λ follows the
        L0 error per step (0 keeps λ fixed, as in SAELens); `init_l0_mult`: start at an L0 of this multiple of
        `l0` through b_enc's offsets set from the trainer's init sample (`init_from_sample`); None for b_enc
        at 0 (an initial L0 near d_sae / 2, SAELens's start), which is also what a multiple of `l0` at or
        above d_sae / 2 gives (`low_start` false); `init_l0_per_latent`: each b_enc_j its own offset, so that
        every latent starts firing on the same share of the sample's tokens (as JumpReLU's θ; the default),
        instead of one common offset; `coef_warmup_steps` W: the loss weighs the penalty by
        λ · min(1, (t + 1) / W) at step t (SAELens's `l1_warm_up_steps`), 0 for none; `coef_lead_steps`:
        the controller's derivative term (PenaltySAE's, a buffer that checkpoints keep), None for
        `LOW_START_LEAD` (40) with the low start and 0 without; `coef_near_gain`: the rate's factor near the
        target while leading (PenaltySAE's), None for `LOW_START_NEAR_GAIN` (4) with the low start and no
        descent, else 1; `l0_descent`: over this share of the run λ is steered toward a target that falls
        log-linearly from the L0 at the start to `l0` (`steering_l0`), 0 to steer at `l0` from the first
        step. The controller without the descent: l0_descent=0; the old default start: init_l0_mult=None,
        l0_descent=0 (λ 5, no lead, gain 1)."""
        self.init_l0_mult, self.init_l0_per_latent = init_l0_mult, init_l0_per_latent
        self.low_start = low_start(init_l0_mult, l0, d_sae, "b_enc")  # whether init_from_sample lowers b_enc
        if sparsity_coef is None:
            dense_coef = self.DESCENT_DENSE_START_COEF if l0_descent else self.DENSE_START_COEF
            sparsity_coef = self.LOW_START_COEF if self.low_start else dense_coef
        if coef_lead_steps is None:
            coef_lead_steps = self.LOW_START_LEAD if self.low_start else 0.0
        if coef_near_gain is None:  # the descent's moving target leaves no ramp for the gain to follow
            coef_near_gain = self.LOW_START_NEAR_GAIN if self.low_start and not l0_descent else 1.0
        super().__init__(
            d_in,
            d_sae,
            l0=l0,
            sparsity_coef=sparsity_coef,
            coef_rate=coef_rate,
            coef_lead_steps=coef_lead_steps,
            coef_near_gain=coef_near_gain,
            seed=seed,
        )
        if coef_warmup_steps < 0:
            raise ValueError(f"coef_warmup_steps must be >= 0 (0: no warm-up), got {coef_warmup_steps}")
        self.coef_warmup_steps = int(coef_warmup_steps)
        if not 0 <= l0_descent <= 1:
            raise ValueError(f"l0_descent must be in [0, 1] (a share of the run; 0: none), got {l0_descent}")
        self.l0_descent = float(l0_descent)
        # the descent's schedule, set by init_from_sample (buffers: a resumed run goes on along it): the L0
        # it starts from and the steps it takes; 0 steps (and old checkpoints) steer at the target throughout
        self.register_buffer("descent_from_l0", torch.tensor(float(l0)))
        self.register_buffer("descent_steps", torch.tensor(0, dtype=torch.int64))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self._pre_buffer: Tensor | None = None  # _pre_activations' reused output (not state)

    def penalty_coef(self) -> Tensor:
        """λ as the loss weighs it this step: `sparsity_coef`, ramped during `coef_warmup_steps`."""
        w = self.coef_warmup_steps
        if not w or int(self.steps_trained) >= w:
            return self.sparsity_coef
        return self.sparsity_coef * ((int(self.steps_trained) + 1) / w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before the descent: no descent
        state_dict.setdefault(prefix + "descent_from_l0", torch.tensor(self.target_l0))
        state_dict.setdefault(prefix + "descent_steps", torch.tensor(0, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def steering_l0(self) -> float:
        """The target during the descent: log-linear from `descent_from_l0` down to `l0` over `descent_steps`,
        then `l0`."""
        t, steps = int(self.steps_trained), int(self.descent_steps)
        if t >= steps:
            return self.target_l0
        start = float(self.descent_from_l0)
        return start * (self.target_l0 / start) ** (t / steps)

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, total_steps: int) -> None:
        """With `low_start`: lower every b_enc_j by one common offset, the quantile of the pre-activations
        on (the first tokens of) x [n, d_in] (the trainer's init sample, scaled, b_dec set) above which lie
        init_l0_mult · l0 per token on average. The L0 then starts there rather than near
        d_sae / 2, so fewer of the first steps are dense (`_DenseStep`). With `init_l0_per_latent`, b_enc_j
        is lowered by latent j's own quantile of the whole sample instead (512 latents at a time).
        With `l0_descent`, the descent starts from the L0 the SAE then has on x."""
        self._lower_start(x)
        if self.l0_descent:
            sample = init_sample(x, self.d_sae)  # [n, d_in]
            pre = torch.addmm(self.b_enc, sample - self.b_dec, self.W_enc)  # [n, d_sae]
            self.descent_from_l0.fill_(max(self.target_l0, float((pre > 0).sum(1).float().mean())))
            self.descent_steps.fill_(round(self.l0_descent * total_steps))

    def _lower_start(self, x: Tensor) -> None:
        if not self.low_start:
            return
        l0 = self.init_l0_mult * self.target_l0
        if self.init_l0_per_latent:
            self.b_enc.sub_(latent_quantiles(self, x, l0))
            return
        x = init_sample(x, self.d_sae)
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc).flatten()
        above = round(len(pre) * l0 / self.d_sae)  # values that stay above the offset
        self.b_enc.sub_(pre.kthvalue(max(1, len(pre) - above)).values)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return pre.relu(), pre

    def _pre_activations(self, x: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc + b_enc [n, d_sae] without autograd. Outside autocast into a buffer kept from
        the last step of the same shape: a fresh 19 MB tensor (1024 x 4608) costs ~4 ms of page faults
        on a CPU each step. A step's backward that still needs the last one's values (its `_DenseStep`
        saved them) fails on the in-place change rather than reading new ones."""
        if torch.is_autocast_enabled(x.device.type):  # out= would skip autocast's low precision
            return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
        shape = (len(x), self.d_sae)
        buf = self._pre_buffer
        if buf is None or buf.shape != shape or buf.device != x.device or buf.dtype != self.W_enc_T.dtype:
            buf = self._pre_buffer = torch.empty(shape, device=x.device, dtype=self.W_enc_T.dtype)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc, out=buf)

    def losses(self, x: Tensor, dead: Tensor) -> StepOutput:
        norms = row_norms(self.W_dec)  # [d_sae], differentiable: the penalty pulls on the rows' norms too
        with torch.no_grad():  # the only dense matmul of the sparse path, once; both paths read it detached
            # ReLU in place: the sparse path reads only the active pairs, where pre = ReLU(pre)
            acts = self._pre_activations(x).relu_()  # [n, d_sae]
            # the active pairs (kernels.PositivePairs: a bool copy of acts, counted now; found by numpy only
            # for a sparse step, ~2x faster than torch.nonzero on a CPU)
            pairs = PositivePairs(acts)
            dense = dense_enough(pairs.count, acts.numel(), x.device)
        if dense:  # early in training half the latents fire: dense maths beats building a Pattern
            fired = pairs.active().sum(0, dtype=torch.int32)  # [d_sae]; int32 sums: ~3x faster than int64
            mse, l1, x_hat = _DenseStep.apply(
                x, self.b_dec, self.W_enc_T, self.b_enc, self.W_dec, norms, acts
            )
        else:
            p, _ = pairs.pattern()
            fired = torch.bincount(p.col, minlength=p.n_cols)  # [d_sae]: a latent is once in a token's pairs
            acts = gather_pre(x, self.b_dec, self.W_enc_T, self.b_enc, acts, p)  # [nnz], all > 0
            mse, x_hat = sparse_recon_loss(acts, self.W_dec, self.b_dec, x, p)
            l1 = (acts * norms.index_select(0, p.col)).sum() / len(x)
        terms = {"mse": mse.detach(), "l1": l1.detach()}
        return StepOutput(mse + self.penalty_coef() * l1, terms, x_hat.detach(), fired.long())


class _DenseStep(torch.autograd.Function):
    """(mse, l1, x_hat) of the standard SAE from acts = ReLU((x - b_dec) @ W_enc + b_enc) computed without
    autograd, with the backward written out: five dense products where autograd's graph takes six (b_dec's
    gradient through the encoder needs only the column sums of the pre-activations' gradient, not the full
    [n, d_in] product), and the penalty's gradient folded into the decoder product's bias. `norms` [d_sae]
    are the decoder rows' norms (their gradient flows on through `row_norms`); l1 = sum_ij f_ij norms_j / n.
    Under autocast the products run in its precision and the gradients return in the parameters' dtype."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, b_dec, W_enc_T, b_enc, W_dec, norms, acts):
        n = len(x)
        x_hat = (acts @ W_dec).float().add_(b_dec)  # [n, d_in] float32, as recon_loss's input
        sums = acts.sum(0, dtype=torch.float32)  # [d_sae]: the penalty is linear in them
        l1 = (sums * norms).sum() / n  # elementwise: a 1-D matmul would autocast to float16 and overflow
        r = x_hat - x
        mse = residual_mse(r)
        ctx.save_for_backward(x, b_dec, W_enc_T, W_dec, norms, acts, r, sums)
        ctx.mark_non_differentiable(x_hat)
        ctx.param_dtype = W_dec.dtype
        return mse, l1, x_hat

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, g_mse, g_l1, _):
        x, b_dec, W_enc_T, W_dec, norms, acts, r, sums = ctx.saved_tensors
        n = len(x)
        d_x_hat = r * (2 * g_mse / n)  # [n, d_in]
        d_acts = torch.addmm(norms * (g_l1 / n), d_x_hat, W_dec.t())  # [n, d_sae]: reconstruction + penalty
        acts = acts.to(d_acts.dtype)  # a no-op unless forward ran under autocast and backward outside it
        # ReLU's gradient, 0 where f = 0, in place (an elementwise op may write over its input)
        d_pre = torch.ops.aten.threshold_backward.grad_input(d_acts, acts, 0, grad_input=d_acts)
        grads = dense_weight_grads(x, b_dec, W_enc_T, acts, d_pre, d_x_hat, ctx.param_dtype)
        return None, *grads, sums * (g_l1 / n), None
