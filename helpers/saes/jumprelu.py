"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435).

f = pre · H(pre - θ) with a learned per-latent threshold θ, trained with an L0 penalty. H has zero
gradient almost everywhere, so θ learns through straight-through estimators with a rectangle kernel
K of bandwidth ε (§3, eq. 11-12):

    ∂/∂θ JumpReLU(z; θ) := -(θ/ε) K((z - θ)/ε)        ∂/∂θ H(z - θ) := -(1/ε) K((z - θ)/ε)

and ∂/∂z JumpReLU = H(z - θ) (no STE to the encoder, as in the paper). θ is stored raw (not its log:
Adam moves a log-threshold too slowly, SAELens issue #494) in float32, and kept ≥ 0 after each step.
The published nanochat JumpReLU SAEs kept θ = 0 and behaved as ReLU; here θ starts > 0 and every training
step touches the pairs inside the window |z - θ| < ε/2, so θ always receives gradient from both the
reconstruction and the L0 term (tests/saes/test_architectures.py checks that it moves).

Where θ starts, and how fast it moves in short runs. Adam moves θ_j by about lr a step, but a latent's
pre-activation by up to about lr · ‖x‖₁ (~0.8 sqrt(d_in) lr at unit scale, every encoder weight moving
at once), so θ lags the encoder: from a small θ (0.001, as before) the L0 starts near d_sae / 2 and took
~150 of 400 steps to reach its target, and a 32-step smoke run ended at L0 ~440 of 1,152 (target 16),
firing on every window. θ_j now starts at the (1 - l0 / d_sae) quantile of latent j's initial
pre-activations on the trainer's init sample (`init_from_sample`; SAELens's careful setup in
bench/saelens_setup.py starts one common θ that way), and in runs shorter than `threshold_speedup_steps`
(256) θ's steps are taken up to 8x larger while the L0 is more than 2x off its target (`after_step`),
so a 32-step smoke-size run ends within 2x of its target L0 (tests/saes/test_jumprelu_init.py). Longer
runs get no speed-up: in a screen of the 400-step real run it cost held-out EV (0.9314 vs 0.9379 from the
initial θ alone, two seeds alike): there the early dense phase helps. bench/jumprelu_init.py measures the
short runs and the ground truth against the old start, bench/sae_train.py the 400-step run.

θ's learning rate: the trainer's for the first `threshold_slow_after` (400) steps, then `threshold_lr_scale`
(1/3) times it (Adam's step on θ, taken at the trainer's rate, is scaled in `after_step`: Adam's step is
linear in the learning rate). At the trainer's rate throughout, θ moved up to lr a step against a median θ
of ~0.15 and ε 0.005, and on the ground truth at lr 3e-3 (bench/jumprelu_diagnose.py, 5M samples) the
thresholds wandered: 141 live latents shared their feature with another, 80 fired less than once in 20k
samples (too often for the trainer's dead rule, so the pre-activation loss never reached them; the
evaluator scores them F1 0) and the live ones fired 1.26x as often as their features (precision 0.39):
MCC / F1 0.731 / 0.366, below SAELens's F1 (0.396). θ at 1/3 from the start: 0.865 / 0.523, and at lr 1e-3
0.913 / 0.586 (was 0.877 / 0.539), but the 400-step real run lost held-out EV (0.9318 vs 0.9377): early on
θ must follow the fast-moving encoder. Slowing θ after 400 steps keeps runs of up to 400 steps as they
were and gives 0.837 / 0.488 at lr 3e-3 (after 1,000 steps: 0.781 / 0.426, the damage is early). A θ rate
of ~3e-4 was best at both learning rates (scale 0.1 from the start at lr 3e-3: 0.910 / 0.577).

Sparsity targets an L0 (`l0`, one knob for TopK, JumpReLU and Gated alike): the penalty is quadratic
around the target, λ (L0 - target)² / target with L0 the batch mean through the STE (Gemma Scope 2's
form, SAELens's "quadratic" mode, on the batch mean rather than per token), and λ itself is steered
toward the target by `adapt_coefficient`, which removes the steady-state offset the reconstruction's
pull would leave. (The paper's plain λ·L0 with a controller on λ overshot and reconstructed worse in
short runs.) ε and θ's scale assume inputs with unit mean squared norm (the trainer normalises; the
scale is folded into the saved weights).

The decoder's rows start at norm 0.1 and move freely (SAELens's `decoder_init_norm`, as the k-sparse
family trains; the encoder starts as their transpose; the saved SAE folds the norms in), with ε = 0.005:
against unit rows held and ε = 0.001, better ground-truth recovery at the same held-out explained variance
(README, Measured).

The step is sparse apart from the encoder's forward matmul (a `Pattern` of the active pairs and the lower
half of the STE window); above kernels.DENSE_ABOVE of those pairs (early in training) it is dense maths
with its backward written out instead (`_DenseStep`: the same gradients within float rounding,
tests/saes/test_jumprelu_step.py).

Dead latents (none fired for the trainer's `dead_after` tokens) get Anthropic's pre-activation loss,
`pre_act_coef` · Σ_dead relu(θ - pre) ‖W_dec row‖ averaged over tokens (SAELens's `pre_act_loss_coefficient`,
off by default there), which lowers their θ and raises their pre-activations until they fire again: on the
synthetic world (bench/jumprelu_ablations.py) it left 9 of 512 latents dead instead of 137, and raised the
ground-truth MCC and F1 above SAELens's at the same L0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.amp import custom_bwd, custom_fwd

from helpers.saes.base import PenaltySAE, StepOutput, latent_quantiles, pre_act_loss
from helpers.saes.kernels import (
    Pattern,
    PositivePairs,
    decode_pairs,
    decode_pairs_backward,
    dense_enough,
    dense_weight_grads,
    residual_mse,
    spmm,
)


def _l0_penalty(l0: Tensor, target: float, coef: Tensor) -> Tensor:
    """The quadratic L0 penalty λ (L0 - target)² / target (module docstring) of the batch's mean L0 (a scalar)
    or of each token's [n], averaged."""
    error = (l0 - target).pow(2)
    return coef * (error.mean() if error.dim() else error) / target


def _l0_penalty_grad(g_loss: Tensor, l0: Tensor, target: float, coef: Tensor) -> Tensor:
    """d `_l0_penalty` / d l0 times the loss's gradient g_loss, l0's shape: 2 λ (L0 - target) / target, over n
    for the per-token mean (written out in the steps' backward: the penalty's five autograd nodes took
    ~0.1-0.2 ms of a ~4.5 ms step at 64 x 512 on a CPU)."""
    scale = g_loss * coef * (2 / target)
    return (l0 - target).mul_(scale / len(l0) if l0.dim() else scale)


class _SparseStep(torch.autograd.Function):
    """(loss, mse, sparsity, x_hat, fired) of the JumpReLU SAE on the sparse step's pairs `p` (the active ones
    and those in the lower half of the STE window), from g = pre - (θ - ε/2) [n, d_sae] computed without
    autograd (`JumpReLUSAE.losses`) and read at the pairs' flat indices `flat` [nnz], with the backward
    written out: θ gathered at each pair's latent, the pre-activations z = g + (θ - ε/2) [nnz], acts =
    z · H(z - θ) decoded by `kernels.decode_pairs`, the paper's pseudo-gradients (eq. 11-12: to θ,
    -(1/ε) K · (θ · d acts + d l0) per pair, K computed once), and the weight gradients as
    `kernels.gather_pre` and `kernels.sparse_recon_loss` take them (the latent-major CSR products, b_dec's
    encoder term from column sums), each latent's sums by index_add_ (deterministic on a CPU). The loss is
    mse + `_l0_penalty` (λ `coef`, the L0 `target`) of the batch's mean L0 or, with `per_token`, of each
    token's; mse and sparsity come back detached, for the history. One autograd node where the gather, the
    pairs' steps, the decode, its loss and the penalty took eight, and l0's per-token sums, fired's 0/1 flags
    and the residual's three reductions 12 more ops (each ~5-20 us on a CPU)."""

    @staticmethod
    @custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(
        ctx,
        x,
        x_c,
        b_dec,
        W_enc_T,
        b_enc,
        W_dec,
        threshold,
        g,
        p: Pattern,
        flat,
        eps,
        per_token,
        coef,
        target,
    ):
        n = len(x)
        theta = threshold.index_select(0, p.col)  # [nnz]
        # z = g + (θ - ε/2) at the pairs (the same θ - ε/2 as the product's bias), pre within its rounding
        z = g.reshape(-1).index_select(0, flat).add_(theta - eps / 2)
        gap = z - theta
        active = gap > 0
        acts = torch.where(active, z, 0.0)
        x_hat = decode_pairs(acts, W_dec, p).add_(b_dec)  # [n, d_in]
        r = x_hat - x
        mse = residual_mse(r)
        steps = active.to(z.dtype)  # H(z - θ) [nnz]
        l0 = z.new_zeros(n).index_add_(0, p.row, steps) if per_token else steps.sum() / n
        fired = p.per_latent(steps).long()
        sparsity = _l0_penalty(l0, target, coef)
        ctx.save_for_backward(x_c, W_enc_T, W_dec, theta, gap, active, acts, r, l0, coef)
        ctx.p, ctx.eps, ctx.per_token, ctx.target = p, eps, per_token, target
        ctx.mark_non_differentiable(mse, sparsity, x_hat, fired)
        return mse + sparsity, mse, sparsity, x_hat, fired

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, g_loss, *_):
        x_c, W_enc_T, W_dec, theta, gap, active, acts, r, l0, coef = ctx.saved_tensors
        p: Pattern = ctx.p
        n = len(r)
        d_x_hat = r * (g_loss * (2 / n))  # [n, d_in]
        g_l0 = _l0_penalty_grad(g_loss, l0, ctx.target, coef)
        d_acts, d_W_dec = decode_pairs_backward(acts, W_dec, p, d_x_hat, True, True)
        # θ, eq. 11-12: -(1/ε) K · (θ · d acts + d l0) per pair, K = 1 inside the window |z - θ| < ε/2
        d_step = g_l0.index_select(0, p.row) if ctx.per_token else g_l0 / n
        in_window = torch.addcmul(d_step, theta, d_acts).mul_(gap.abs_() < ctx.eps / 2)
        d_threshold = p.per_latent(in_window, alpha=-1.0 / ctx.eps)
        d_z = d_acts.mul_(active)  # to the pre-activations: H(z - θ) (no STE to the encoder), in place
        d_b_enc = p.per_latent(d_z)
        d_W_enc_T = spmm(p.csr_t(d_z), x_c)
        d_b_dec = d_x_hat.sum(0) - d_b_enc @ W_enc_T  # through x_hat, and the encoder's input x - b_dec
        return None, None, d_b_dec, d_W_enc_T, d_b_enc, d_W_dec, d_threshold, *[None] * 7


class _DenseStep(torch.autograd.Function):
    """(loss, mse, sparsity, x_hat) of the JumpReLU SAE on every (token, latent) pair, from acts =
    pre · H(pre - θ), `active` = H(pre - θ) (bool) and the window w = ε/2 - |pre - θ| [n, d_sae] (K = 1 where
    w > 0), computed without autograd; the L0 is each token's [n] with `per_token`, else the batch's mean from
    the firing counts `fired` [d_sae] (no pass over `active`); the loss and its penalty as `_SparseStep`'s.
    The backward is written out: five dense products where autograd's graph takes six (b_dec's gradient
    through the encoder needs only column sums), the STEs of the JumpReLU (to θ: -(θ/ε) K · d acts) and of
    the step function (to θ: -(1/ε) K · d l0) summed in one pass over the window, and the masks applied by
    `threshold_backward` (0 where its second argument is not > 0). Under autocast the products run in its
    precision and the gradients return in the parameters' dtype."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(
        ctx,
        x,
        b_dec,
        W_enc_T,
        b_enc,
        W_dec,
        threshold,
        acts,
        active,
        fired,
        window,
        eps,
        per_token,
        coef,
        target,
    ):
        x_hat = (acts @ W_dec).float().add_(b_dec)  # [n, d_in]
        r = x_hat - x
        mse = residual_mse(r)
        # [n]: active latents per token, or their mean
        l0 = active.sum(1, dtype=torch.int32).to(r.dtype) if per_token else fired.sum().to(r.dtype) / len(x)
        sparsity = _l0_penalty(l0, target, coef)
        ctx.save_for_backward(x, b_dec, W_enc_T, W_dec, threshold, acts, window, r, l0, coef)
        ctx.eps, ctx.param_dtype, ctx.target = eps, W_dec.dtype, target
        ctx.mark_non_differentiable(mse, sparsity, x_hat)
        return mse + sparsity, mse, sparsity, x_hat

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, g_loss, *_):
        x, b_dec, W_enc_T, W_dec, threshold, acts, window, r, l0, coef = ctx.saved_tensors
        n = len(x)
        d_x_hat = r * (2 * g_loss / n)  # [n, d_in]
        g_l0 = _l0_penalty_grad(g_loss, l0, ctx.target, coef)
        d_acts = (d_x_hat @ W_dec.t()).float()  # [n, d_sae]
        # θ's pseudo-gradient, eq. 11-12: -(1/ε) Σ_tokens K · (θ · d acts + d l0), over the window's pairs
        d_l0 = g_l0.unsqueeze(1) if g_l0.dim() else g_l0 / n  # per token [n, 1], or the mean's share
        in_window = torch.addcmul(d_l0, d_acts, threshold)
        in_window = torch.ops.aten.threshold_backward.grad_input(in_window, window, 0, grad_input=in_window)
        d_threshold = in_window.sum(0) * (-1.0 / ctx.eps)
        # to pre: H(pre - θ), i.e. 0 where acts = 0 (θ >= 0: an active pair's act is > 0), in place
        d_pre = torch.ops.aten.threshold_backward.grad_input(d_acts, acts, 0, grad_input=d_acts)
        grads = dense_weight_grads(x, b_dec, W_enc_T, acts, d_pre, d_x_hat, ctx.param_dtype)
        return None, *grads, d_threshold.to(threshold.dtype), *[None] * 8


class JumpReLUSAE(PenaltySAE):
    architecture = "jumprelu"
    coef_hold_beyond = 2.0  # base.adapt_coefficient's anti-windup (module docstring)
    decoder_norm = 0.1  # SAE.decoder_norm: rows start at 0.1 and move freely (module docstring)
    free_decoder = True
    latent_biases = ("b_enc", "threshold")
    FALLBACK_THRESHOLD = 0.001  # θ before `init_from_sample` sets it from the data, and θ's floor there
    MAX_SPEEDUP = 8.0  # of θ's steps in short runs: 24 (~sqrt(d_in)) left 68% of a smoke SAE's latents unused
    saelens_tensors = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0: int = 32,
        bandwidth: float = 0.005,
        init_threshold: float | None = None,
        sparsity_coef: float = 1e-2,
        coef_rate: float = 0.02,
        l0_penalty: str = "batch",
        pre_act_coef: float = 1e-2,
        threshold_speedup_steps: int = 256,
        threshold_lr_scale: float = 1 / 3,
        threshold_slow_after: int = 400,
        seed: int = 0,
    ):
        """`l0`: target L0; `bandwidth`: ε of the STE; `sparsity_coef`: initial λ; `coef_rate`: how fast
        log λ follows the L0 error per step (0 keeps λ fixed); `l0_penalty`: "batch", the quadratic penalty
        on the batch's mean L0, or "token", on each token's L0, averaged (SAELens's "quadratic" mode);
        `pre_act_coef`: Anthropic's pre-activation loss on the dead latents, as SAELens's
        `pre_act_loss_coefficient` (0: off); `init_threshold`: every θ's initial value, or None for θ from the
        data (`init_from_sample`: each latent starts firing on its share l0 / d_sae of the tokens; θ is
        `FALLBACK_THRESHOLD` until then); `threshold_speedup_steps`: in a run of fewer steps, θ's optimizer
        steps are taken `threshold_speedup_steps / total_steps` times larger (at most `MAX_SPEEDUP`) while
        the batch's L0 is more than `coef_hold_beyond` times off its target (0: never);
        `threshold_lr_scale`: θ's learning rate over the trainer's after the first `threshold_slow_after`
        steps (the trainer's before; the speed-up replaces either while it acts); all in the module
        docstring."""
        super().__init__(d_in, d_sae, l0=l0, sparsity_coef=sparsity_coef, coef_rate=coef_rate, seed=seed)
        if init_threshold is None:
            init_threshold, self.threshold_from_data = self.FALLBACK_THRESHOLD, True
        else:
            self.threshold_from_data = False
        if bandwidth <= 0 or init_threshold <= 0:
            raise ValueError(
                f"bandwidth and init_threshold must be > 0 (got {bandwidth}, {init_threshold}): a zero "
                "threshold with no gradient is the ReLU-in-disguise bug this class exists to prevent"
            )
        if l0_penalty not in ("batch", "token"):
            raise ValueError(f"l0_penalty must be 'batch' or 'token', got {l0_penalty!r}")
        if pre_act_coef < 0:
            raise ValueError(f"pre_act_coef must be >= 0 (0 turns it off), got {pre_act_coef}")
        if threshold_speedup_steps < 0:
            raise ValueError(
                f"threshold_speedup_steps must be >= 0 (0 turns it off), got {threshold_speedup_steps}"
            )
        self.bandwidth, self.l0_penalty, self.pre_act_coef = bandwidth, l0_penalty, pre_act_coef
        self.threshold_speedup_steps = threshold_speedup_steps
        if not threshold_lr_scale > 0:  # NaN too
            raise ValueError(
                f"threshold_lr_scale must be a number > 0 (θ's learning rate over the trainer's; 1 gives θ "
                f"the trainer's), got {threshold_lr_scale}"
            )
        if threshold_slow_after < 0:
            raise ValueError(f"threshold_slow_after must be >= 0 steps, got {threshold_slow_after}")
        self.threshold_lr_scale, self.threshold_slow_after = threshold_lr_scale, threshold_slow_after
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.threshold = nn.Parameter(torch.full((d_sae,), init_threshold, dtype=torch.float32))
        # θ as the last forward pass saw it: after_step reads the optimizer's step on θ off it
        self.register_buffer("threshold_before_step", self.threshold.detach().clone(), persistent=False)
        # how much larger θ's steps are while the L0 is far off (set for the run by init_from_sample; kept
        # in checkpoints, so a resumed run goes on as it started)
        self.register_buffer("threshold_speedup", torch.tensor(1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before threshold_speedup existed trained without it
        state_dict.setdefault(prefix + "threshold_speedup", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, total_steps: int) -> None:
        """With `init_threshold=None`: θ_j at the (1 - l0 / d_sae) quantile of latent j's initial
        pre-activations on x [n, d_in] (the trainer's init sample, scaled, b_dec set), so every latent starts
        firing on its share of the tokens and the L0 starts at the target instead of at ~d_sae / 2. A run of
        fewer than `threshold_speedup_steps` steps gets the speed-up of θ (module docstring)."""
        if self.threshold_speedup_steps:
            self.threshold_speedup.fill_(
                min(self.MAX_SPEEDUP, max(1.0, self.threshold_speedup_steps / total_steps))
            )
        if not self.threshold_from_data:
            return
        self.threshold.copy_(latent_quantiles(self, x, self.target_l0).clamp_min(self.FALLBACK_THRESHOLD))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return pre * (pre > self.threshold), pre

    def losses(self, x: Tensor, dead: Tensor) -> StepOutput:
        eps = self.bandwidth
        with torch.no_grad():
            x_c = x - self.b_dec
            # g = pre - (θ - ε/2) [n, d_sae] from the only dense matmul. In float32, θ - ε/2 is folded into
            # its bias (one pass over [n, d_sae] less than subtracting it from pre: ~0.1-0.2 ms of a ~4.5 ms
            # step at 64 x 512; pre = g + (θ - ε/2) within float rounding). Under autocast the product is
            # rounded to its precision, so pre is, then shifted in float32: folded, g's rounding would move
            # pairs across θ that pre's does not. Active pairs plus those in the lower half of the STE window
            # (the upper half is active) are those with g > 0 (`PositivePairs`).
            shift = self.threshold - eps / 2  # [d_sae]
            if torch.is_autocast_enabled(x.device.type):
                g = torch.addmm(self.b_enc, x_c, self.W_enc) - shift
            else:
                g = torch.addmm(self.b_enc - shift, x_c, self.W_enc)
            pairs = PositivePairs(g)
            dense = dense_enough(pairs.count, g.numel(), x.device)
        self.threshold_before_step.copy_(self.threshold.detach())
        per_token = self.l0_penalty == "token"  # the penalty on each token's L0, or on the batch's mean
        if dense:  # early in training many latents fire: dense maths beats building a Pattern
            with torch.no_grad():
                pre = g + shift  # [n, d_sae]
                gap = g.sub_(eps / 2)  # pre - θ, in place (float32: shifted in float32 under autocast too)
                # acts = pre · H(pre - θ), 0 where gap <= 0 (one pass), and whether each pair fires (a cast
                # to bool: ~7x faster than a comparison on a CPU; θ >= 0, so an active pair's act is > 0)
                acts = torch.ops.aten.threshold_backward(pre, gap, 0)  # float32
                active = acts.bool()
                fired = active.sum(0, dtype=torch.int32).long()  # [d_sae]
                window = torch.rsub(gap.abs_(), eps / 2)  # STE window: K = 1 where ε/2 - |gap| > 0
            loss, mse, sparsity, x_hat = _DenseStep.apply(
                x,
                self.b_dec,
                self.W_enc_T,
                self.b_enc,
                self.W_dec,
                self.threshold,
                acts,
                active,
                fired,
                window,
                eps,
                per_token,
                self.sparsity_coef,
                self.target_l0,
            )
        else:
            p, flat = pairs.pattern()
            loss, mse, sparsity, x_hat, fired = _SparseStep.apply(
                x,
                x_c,
                self.b_dec,
                self.W_enc_T,
                self.b_enc,
                self.W_dec,
                self.threshold,
                g,
                p,
                flat,
                eps,
                per_token,
                self.sparsity_coef,
                self.target_l0,
            )
        parts = {"mse": mse, "sparsity": sparsity}
        if self.pre_act_coef:  # a history column whenever it is on, 0 (and nothing to add) while none is dead
            if bool(dead.any()):
                pre_act = self.pre_act_loss(x, dead)
                loss, parts["pre_act"] = loss + pre_act, pre_act.detach()
            else:
                parts["pre_act"] = mse.new_zeros(())
        return StepOutput(loss, parts, x_hat.detach(), fired)

    def pre_act_loss(self, x: Tensor, dead: Tensor) -> Tensor:
        """Anthropic's pre-activation loss on the dead latents (SAELens's `calculate_pre_act_loss`):
        `pre_act_coef` · mean over tokens of Σ_dead relu(θ - pre) ‖W_dec row‖, which raises a dead latent's
        pre-activations (and lowers its θ) toward firing."""
        loss = pre_act_loss(x, self.b_dec, self.W_enc_T, self.b_enc, dead, self.threshold, self.W_dec)
        return self.pre_act_coef * loss

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        # θ's learning rate: Adam's step (~lr) on θ times `threshold_lr_scale`, or, far off the target in
        # a short run, times the speed-up (Adam's step is linear in the learning rate, so scaling the step
        # taken is θ's own learning rate)
        factor = self.threshold_lr_scale if int(self.steps_trained) >= self.threshold_slow_after else 1.0
        speedup = float(self.threshold_speedup)
        if speedup != 1 and abs(math.log(max(out.l0, 1e-3) / self.target_l0)) > math.log(
            self.coef_hold_beyond
        ):
            factor = speedup
        if factor != 1:
            self.threshold.add_(self.threshold - self.threshold_before_step, alpha=factor - 1)
        self.threshold.clamp_(min=0.0)  # a negative θ would pass negative pre-activations
        super().after_step(out)
