"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs", arXiv 2404.16014).

Which latents fire and how strongly are estimated by two paths that share the encoder (§3.1, eq. 6):

    z      = (x - b_dec) @ W_enc                     [n, d_sae], one matmul for both paths
    π_gate = z + b_gate                              f_gate = H(π_gate)
    π_mag  = z · exp(r_mag) + b_mag                  (W_mag = W_enc ⊙ exp(r_mag), r_mag weight sharing)
    f      = H(π_gate) · ReLU(π_mag)

H has no gradient, so the gate learns only from the auxiliary terms (§3.2, eq. 8): an L1 penalty on
ReLU(π_gate) (our decoder rows are unit-norm, so no norm factor is needed) and the reconstruction of x from
ReLU(π_gate) through the decoder. The paper freezes the decoder in that term (W_dec, b_dec detached); by
default it is trainable here, as SAELens has it (`frozen_gate_decoder=False`): on real activations (SmolLM2
layer 15, d_sae 4608, 150 steps) the frozen form left 7.3% of the latents dead and the trainable one 0.2%,
with a better held-out explained variance at low L0 (bench/gated_ablations.py). The encoder starts as 0.1
times the decoder's transpose (`encoder_init_scale`; SAELens starts both at norm 0.1): its columns then turn
~10x faster relative to their size under Adam's steps, which lifted the explained variance at high L0 in that
run. Every term is supported on the active set {π_gate > 0}, so the step is sparse apart from the encoder's
forward matmul (`_SparseStep`: the open gates' pairs found by `kernels.PositivePairs`, one written-out
autograd node). Above kernels.DENSE_ABOVE of the pairs (from b_gate at 0 about half the gates are open early
in training; the low start, below, avoids it) the step is dense maths with its backward written out instead
(`_DenseStep`); both give the same gradients within float rounding (tests/saes/test_gated_step.py).

The L1 coefficient λ is steered toward the target L0 `l0` (base.adapt_coefficient), as for JumpReLU, from 0.1
(`sparsity_coef`; from the data with the low start, below), with the standard SAE's trend hold
(`coef_trend_horizon` 50: λ is held while the L0 falls toward the target from about half the latents) and lead
term (`coef_lead_steps` 40), and "far" counting from 4x the target (`COEF_FAR`; within it, a fall too slow to
arrive in 50 steps raises λ). Before, λ from 0.05 integrated the error all through that fall, rose to 0.17 and
left the L0 at 47 of its target 62 after 150 steps (dead 0.3%); now 66 of 62, dead 0.07%, explained variance
at the held-out L0s 62 / 48 / 40 / 24 / 16 0.904 / 0.894 / 0.882 / 0.825 / 0.756 against 0.881 / 0.885 / 0.881
/ 0.844 / 0.786 (bench/results/gated_ablations_cpu_controller_screen.json); beside SAELens in one run
(bench/sae_train.py --archs gated --tokens 153600 --threads 1): 0.904 vs 0.871 at L0 62 and 0.756 vs 0.741 at
16, dead 0.07% vs 0%, 4.99x its tokens/s load-corrected
(sae_train_cpu_gated_controller_default_matched_l0.json). Starting λ higher from b_gate at 0 lands nearer the
target but kills latents (0.12: L0 62, 0.63% dead; 0.15: 4.7%; 0.2: 36%); with the hold from 0.05 the L0
stalls at ~200, and with "far" at 2x from 0.1 at 72 (λ held while the L0 creeps down from 2.7x the target).

The low start (`init_l0_mult` 8, as the standard SAE's): each b_gate_j starts lowered by latent j's quantile
of its gate pre-activation on the trainer's init sample, so every gate opens on its share of the tokens and
the L0 starts at 8x the target instead of near d_sae / 2, and λ starts where the L1 penalty balances, over the
open gates, the gate reconstruction's push at the target L0 (`balanced_coef`: 0.61 on
bench/synthetic_quality.py's world, where the controller's λ ends at 0.60-0.67; 0.14 at target 62 and 0.16 at
20 on sae_train's data, where it moves within 0.09-0.22). From b_gate at 0 and λ 0.1 the synthetic world's L0
fell from 255 only to 12.6 (target 7) in 976 steps, 610 of them dense (6.0-6.4 ms a step at 64 x 512). Ours
only, seed 0 (gated_low_start_synthetic_screen_s12_g.json): no dense step at 1x / 2x / 4x / 6x / 8x, MCC / F1
0.786 / 0.482, 0.788 / 0.484, 0.795 / 0.488, 0.801 / 0.494, 0.803 / 0.492, all at L0 6.9-7.0; with λ from 0.1
instead the L0 rose to 101 by step 50 at 1x (155 dense steps, 0.705 / 0.388), from 0.3 to 47 (0.766 / 0.458).
Beside SAELens at seeds 0 / 1 / 2 (synthetic_quality_cpu_gated_low_start_seeds_s12_g.json): MCC 0.803 / 0.807
/ 0.808 vs 0.432 / 0.430 / 0.433 (b_gate at 0: 0.556 / 0.546 / 0.565), F1 0.492 / 0.500 / 0.502 vs 0.078 /
0.080 / 0.081 (0.263 / 0.252 / 0.270), 3.17x / 3.23x / 3.25x SAELens's tokens per CPU second (1.95x / 1.90x /
1.94x). On sae_train's data (gated_ablations_cpu_low_start_s12_g.json, 150 steps, target 62) the held-out EV
at L0 62 was 0.9076 at 8x, 0.9063 at 4x and, with λ from 0.1, 0.9016 / 0.9023 / 0.9046 at 1x / 2x / 8x,
against 0.9035 from b_gate at 0; beside SAELens (sae_train_cpu_gated_150_steps_low_start_s12_g.json) 0.9076 vs
0.8712 at L0 62 and 0.791 vs 0.739 at 16 (b_gate at 0: 0.9035 / 0.756), ending at L0 59 rather than 66. At 400
steps (target 20) 0.9214 / 0.9218 / 0.9217 at L0 16 / 20 / 24 against 0.9172 / 0.9191 / 0.9189 from b_gate at
0, ending at L0 17.3 (λ comes down late), 5 latents firing on no held-out token against 3 (none silent on the
training tokens in either); beside SAELens (sae_train_cpu_gated_400_steps_low_start_s12_g.json) 0.9214 /
0.9218 / 0.9217 vs 0.9162 / 0.9180 / 0.9187, 8.6x its tokens/s load-corrected (6.6x from b_gate at 0), but
held-out dead 0.11% vs its 0.07% (from b_gate at 0: 0.02% vs 0.04%).

Dead latents (none fired for the trainer's `dead_after` tokens) and rare ones (silent for d_sae / (r · l0)
tokens, i.e. firing at under r = `revive_below` 0.1 times the mean rate l0 / d_sae) get a pre-activation loss
on their gates (`revive_coef` 0.002, `revival_loss`: JumpReLU's, with the gate's threshold 0); without it a
closed gate gets no gradient at all. At 400 steps (target L0 20) the latents that died closed late (steps
180-380, as λ peaked and the L0 fell from 40 to 20), with encoder columns a third of the median's norm, just
under their gates (max π_gate -0.0002 to -0.005 on held-out tokens). The held-out dead count (latents firing
on none of 7k tokens) is a count of rare latents: with the dead ones only revived (revive_coef 0.01, as from
1491067) 20 latents fired on no held-out token, 83 on at most 2, but 1 on no training token. Reviving the
rare ones too took it to 1 (0.02%; SAELens 3, 0.07%) at explained variance 0.9172 / 0.9191 / 0.9189 at
held-out L0 16 / 20 / 24 (0.9176 / 0.9195 / 0.9190 before; SAELens 0.9162 / 0.9181 / 0.9189); on another seed
14 -> 2 (0.9194 at L0 20, was 0.9199) (bench/results/gated_ablations_cpu_rare_revival_400_steps.json). Beside
SAELens in one run: dead 0.02% vs 0.04%, 0.9172 / 0.9191 / 0.9189 vs 0.9162 / 0.9182 / 0.9190, 6.59x its speed
load-corrected (sae_train_cpu_gated_400_steps_rare_revival.json). At 150 steps (target L0 62: a latent silent
for one batch is revived) unchanged: dead 0% vs 0%, 0.9035 vs 0.8713 at L0 62
(sae_train_cpu_gated_150_steps_rare_revival.json); the synthetic world revives none. The window and the
coefficient trade the dead count against explained variance: a latent silent for 1 batch at 0.003 left 1 dead
at 0.9136 at L0 20, 3 batches at 0.01 2 dead at 0.9169, 5 batches at 0.003 10 dead at 0.9192. The revival's
gradient on b_dec detached changed little (8 dead vs 6, 5 batches at 0.01); raising only b_gate (W_enc
detached in it) kept the explained variance (0.9202 at L0 20) but left 80 dead: turning the encoder column is
what reopens a gate, and what costs; AuxK on the dead latents' magnitude path (their ReLU(π_mag) fitted to the
residual through their decoder rows, as TopK's AuxK) did not help (coefficient 1: 16 dead vs 20, 1/32: 23;
with the 5-batch revival: 23 vs 6). With the dead latents alone revived (1491067) a stronger term killed
more latents (0.1: 0.61% dead, 1: 0.54% and 0.910 at L0 20), as did an encoder at the decoder's norm
(`encoder_init_scale` 1: 3.4% dead) and a slower λ (`coef_rate` 0.01: 0.76%); `coef_lead_steps` 80 (0.46%)
lands above the target (L0 22 of 20 at 400 steps, 83 of 62 at 150; gated_ablations_cpu_levers_400_steps.json).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.amp import custom_bwd, custom_fwd

from helpers.saes.base import PenaltySAE, StepOutput, init_sample, latent_quantiles, low_start, pre_act_loss
from helpers.saes.kernels import (
    Pattern,
    PositivePairs,
    decode_pairs,
    decode_pairs_backward,
    dense_enough,
    residual_mse,
    spmm,
)


class GatedSAE(PenaltySAE):
    architecture = "gated"
    latent_biases = ("b_gate", "b_mag")
    saelens_tensors = ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag")
    encoder_init_scale = 0.1  # SAE.encoder_init_scale (see the module docstring)
    coef_trend_horizon = 50.0  # PenaltySAE's trend hold and reach (the module docstring)
    COEF_FAR = 4.0
    COEF_LEAD_UNSTORED = 40.0  # its lead since the trend hold (40e9d92); an older checkpoint resumes with it
    REVIVE_COEF_UNSTORED = 0.01
    DENSE_START_COEF = 0.1  # λ's start from b_gate at 0 (`init_l0_mult=None`), or before init_from_sample

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0: int = 32,
        sparsity_coef: float | None = None,
        coef_rate: float = 0.02,
        coef_lead_steps: float = 40.0,
        frozen_gate_decoder: bool = False,
        revive_coef: float = 0.002,
        revive_below: float = 0.1,
        init_l0_mult: float | None = 8.0,
        seed: int = 0,
    ):
        """`l0`: target L0; `sparsity_coef`: initial L1 coefficient λ, None for λ from the data at the low
        start (`balanced_coef`) and `DENSE_START_COEF` (0.1) without it; `coef_rate`: how fast log λ
        follows the L0 error per step (0 keeps λ fixed); `coef_lead_steps`: the controller's lead term
        (PenaltySAE's; the module docstring); `frozen_gate_decoder`: whether the gate's
        reconstruction term decodes through a frozen copy of W_dec and b_dec (the paper's form) or through
        the trainable decoder (SAELens's, the default); `revive_coef`: the pre-activation loss on the gates of
        dead and rare latents (`revival_loss`; 0: off); `revive_below`: rare is firing at under this share of
        the mean rate (`revival_mask`; 0: the trainer's dead latents only), both buffers; `init_l0_mult`:
        start at an L0 of this multiple of `l0` through b_gate's offsets set from the trainer's init sample
        (`init_from_sample`, the low start), None for b_gate at 0 (an initial L0 near d_sae / 2, SAELens's
        start), which is also what a multiple at or above d_sae / 2 gives."""
        if revive_coef < 0:
            raise ValueError(f"revive_coef must be >= 0 (0 turns it off), got {revive_coef}")
        if revive_below < 0:
            raise ValueError(
                f"revive_below must be >= 0 (0: the trainer's dead latents only), got {revive_below}"
            )
        # whether init_from_sample lowers b_gate (base.low_start, as the standard SAE's b_enc)
        self.low_start = low_start(init_l0_mult, l0, d_sae, "b_gate")
        super().__init__(
            d_in,
            d_sae,
            l0=l0,
            sparsity_coef=self.DENSE_START_COEF if sparsity_coef is None else sparsity_coef,
            coef_rate=coef_rate,
            coef_lead_steps=coef_lead_steps,
            seed=seed,
        )
        self.frozen_gate_decoder = frozen_gate_decoder
        self.init_l0_mult = init_l0_mult
        # λ from the data at the low start unless given (init_from_sample); DENSE_START_COEF until then
        self.coef_from_data = sparsity_coef is None and self.low_start
        # buffers, so a checkpoint resumes with the revival it trained with whatever a later default is
        self.register_buffer("revive_coef", torch.tensor(float(revive_coef)))
        self.register_buffer("revive_below", torch.tensor(float(revive_below)))
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before both were stored revived the trainer's dead latents only, at 0.01 (the
        # default from 1491067; one from before that trained without the term and resumes with it)
        state_dict.setdefault(prefix + "revive_coef", torch.tensor(self.REVIVE_COEF_UNSTORED))
        state_dict.setdefault(prefix + "revive_below", torch.tensor(0.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, total_steps: int) -> None:
        """With the low start (`init_l0_mult` m, m · l0 under d_sae / 2): λ from the data unless given
        (`balanced_coef`), then each b_gate_j lowered by latent j's (1 - m · l0 / d_sae) quantile of its gate
        pre-activation on x [n, d_in] (the trainer's init sample, scaled, b_dec set), so that every gate
        starts open on its share of the tokens and the L0 starts near m · l0 instead of near d_sae / 2."""
        if not self.low_start:
            return
        if self.coef_from_data:
            coef = self.balanced_coef(x)
            if not coef > 0:  # NaN too: no λ holds the gates open at the target, the gate term shuts them
                warnings.warn(
                    f"Gated SAE: the gate reconstruction shuts the open gates at the start (balanced λ "
                    f"{coef:.3g}), so λ starts at {self.DENSE_START_COEF} instead of from the data (pass "
                    "sparsity_coef to set it, or init_l0_mult=None for b_gate at 0)",
                    stacklevel=2,
                )
                coef = self.DENSE_START_COEF
            self.sparsity_coef.fill_(coef)
        self.b_gate.sub_(latent_quantiles(self, x, self.init_l0_mult * self.target_l0, self.b_gate))

    @torch.no_grad()
    def balanced_coef(self, x: Tensor) -> float:
        """The λ at which the L1 penalty balances, on average over the open gates, the gate reconstruction's
        push on them when every gate is open on its share l0 / d_sae of the first tokens of x [n, d_in] (the
        target L0): only gate_aux and λ · l1 reach π_gate, per open pair (2 / n) (x_gate - x) · W_dec_j and
        λ / n, so λ = -2 · mean over the open pairs of (x_gate - x) · W_dec_j. The controller's λ settles near
        it (module docstring)."""
        x = init_sample(x, self.d_sae)
        offset = latent_quantiles(self, x, self.target_l0, self.b_gate)  # [d_sae]
        gate = torch.addmm(self.b_gate - offset, x - self.b_dec, self.W_enc).relu_()  # [n, d_sae]
        r = torch.addmm(self.b_dec, gate, self.W_dec).sub_(x)  # x_gate - x [n, d_in]
        push = torch.ops.aten.threshold_backward(r @ self.W_dec.t(), gate, 0)  # 0 where the gate is shut
        return float(-2 * push.sum() / gate.bool().sum())  # <= 0 (or NaN): see init_from_sample

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        z = (x - self.b_dec) @ self.W_enc
        pi_mag = z * self.r_mag.exp() + self.b_mag
        return (z + self.b_gate > 0) * pi_mag.relu(), pi_mag

    def losses(self, x: Tensor, dead: Tensor) -> StepOutput:
        with torch.no_grad():
            x_c = x - self.b_dec
            z = x_c @ self.W_enc  # [n, d_sae]: the only dense matmul of the sparse path
            gate = (z + self.b_gate).relu_()  # ReLU(π_gate) [n, d_sae] float32
            pairs = PositivePairs(gate)  # the open gates, H(π_gate) = 1
            dense = dense_enough(pairs.count, gate.numel(), x.device)
        frozen = self.frozen_gate_decoder  # the paper's form: the gate term does not train the decoder
        if dense:  # from b_gate at 0 about half the gates open early on: dense maths beats building a Pattern
            mse, l1, gate_aux, x_hat, fired = _DenseStep.apply(
                x, self.b_dec, self.W_enc_T, self.b_gate, self.b_mag, self.r_mag, self.W_dec, z, gate, frozen
            )
            return self._output(x, dead, mse, l1, gate_aux, x_hat, fired)
        p, flat = pairs.pattern()
        mse, l1, gate_aux, x_hat, fired = _SparseStep.apply(
            x,
            x_c,
            self.b_dec,
            self.W_enc_T,
            self.b_gate,
            self.b_mag,
            self.r_mag,
            self.W_dec,
            z,
            gate,
            p,
            flat,
            frozen,
        )
        return self._output(x, dead, mse, l1, gate_aux, x_hat, fired)

    def _output(
        self, x: Tensor, dead: Tensor, mse: Tensor, l1: Tensor, gate_aux: Tensor, x_hat: Tensor, fired: Tensor
    ) -> StepOutput:
        """The step's loss mse + λ·l1 + gate_aux (+ the revival term on the `dead` latents), its terms,
        either path's."""
        loss = mse + self.sparsity_coef * l1 + gate_aux
        terms = {"mse": mse.detach(), "l1": l1.detach(), "gate_aux": gate_aux.detach()}
        if float(self.revive_coef):  # a history column whenever it is on, 0 (not added) while none is dead
            dead = self.revival_mask(dead)
            if bool(dead.any()):
                revive = self.revival_loss(x, dead)
                loss, terms["revive"] = loss + revive, revive.detach()
            else:
                terms["revive"] = mse.new_zeros(())
        return StepOutput(loss, terms, x_hat.detach(), fired)

    def revival_mask(self, dead: Tensor) -> Tensor:
        """[d_sae] bool: the latents whose gates get the revival term: the trainer's `dead` ones and, with
        `revive_below` r, those that have not fired for d_sae / (r · l0) tokens, i.e. that fire at under r
        times the mean rate l0 / d_sae of the target L0."""
        r = float(self.revive_below)
        return dead | (self.tokens_since_fired >= self.d_sae / (r * self.target_l0)) if r else dead

    def revival_loss(self, x: Tensor, dead: Tensor) -> Tensor:
        """Anthropic's pre-activation loss (`base.pre_act_loss`, as JumpReLU's) on the dead latents' gates:
        `revive_coef` · mean over tokens of Σ_dead relu(-π_gate) (the gate's threshold is 0; decoder rows are
        unit-norm, so no norm factor). Every other term lives on the active set, so a latent whose gate
        closes on every token gets no gradient at all; this one raises its b_gate and turns its encoder
        column toward the tokens until it opens again. x [n, d_in], dead [d_sae] bool."""
        return self.revive_coef * pre_act_loss(x, self.b_dec, self.W_enc_T, self.b_gate, dead)


class _SparseStep(torch.autograd.Function):
    """(mse, l1, gate_aux, x_hat, fired) of the Gated SAE on the open gates' pairs `p` (flat indices `flat`
    [nnz]), from z = (x - b_dec) @ W_enc and gate = ReLU(π_gate) [n, d_sae] computed without autograd, with
    the backward written out (`_DenseStep`'s maths on the pairs only): ReLU(π_gate) read at the pairs,
    f = ReLU(π_mag) (H(π_gate) = 1 there), both decoded by `kernels.decode_pairs`, their gradients at the
    pairs by its backward's sampled products, each latent's sums by index_add_ (deterministic on a CPU)
    and the weight gradients by the latent-major CSR products; x_c = x - b_dec. One autograd node where the
    gather, the pairs' nine elementwise ops, the two decodes with their losses and the firing counts took
    four and ~15 more ops."""

    @staticmethod
    @custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x, x_c, b_dec, W_enc_T, b_gate, b_mag, r_mag, W_dec, z, gate, p: Pattern, flat, frozen):
        n = len(x)
        z_p, gate_p = z.reshape(-1).index_select(0, flat), gate.reshape(-1).index_select(0, flat)  # [nnz]
        scale = r_mag.exp()  # [d_sae]: W_mag = W_enc ⊙ exp(r_mag)
        scale_p = scale.index_select(0, p.col)
        acts = torch.addcmul(b_mag.index_select(0, p.col), z_p, scale_p).relu_()  # f = ReLU(π_mag)
        x_hat, x_gate = (decode_pairs(v, W_dec, p).add_(b_dec) for v in (acts, gate_p))  # [n, d_in] each
        r, r_gate = x_hat - x, x_gate - x
        mse = residual_mse(r)
        gate_aux = residual_mse(r_gate)
        l1 = gate_p.sum() / n
        fired = p.per_latent(acts.bool().to(acts.dtype)).long()
        ctx.save_for_backward(x_c, W_enc_T, W_dec, z_p, scale, scale_p, acts, gate_p, r, r_gate)
        ctx.p, ctx.frozen = p, frozen
        ctx.mark_non_differentiable(x_hat, fired)
        return mse, l1, gate_aux, x_hat, fired

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, g_mse, g_l1, g_aux, _, __):
        x_c, W_enc_T, W_dec, z_p, scale, scale_p, acts, gate_p, r, r_gate = ctx.saved_tensors
        p: Pattern = ctx.p
        n = len(r)
        d_x_hat, d_x_gate = r * (g_mse * (2 / n)), r_gate * (g_aux * (2 / n))  # [n, d_in]
        d_acts, d_W_dec = decode_pairs_backward(acts, W_dec, p, d_x_hat, True, True)  # [nnz], [d_sae, d_in]
        # d π_mag where f > 0; d π_gate = d_x_gate @ W_dec^T + λ/n on every pair (the gates are open there)
        d_mag = torch.ops.aten.threshold_backward(d_acts, acts, 0)
        d_gate = decode_pairs_backward(gate_p, W_dec, p, d_x_gate, True, False)[0].add_(g_l1 / n)
        d_b_mag, d_b_gate = p.per_latent(d_mag), p.per_latent(d_gate)  # [d_sae]
        d_r_mag = p.per_latent(d_mag * z_p).mul_(scale)  # d exp(r_mag) = exp(r_mag)
        d_z = d_gate.addcmul_(d_mag, scale_p)  # z feeds π_gate and, scaled, π_mag (in place)
        d_W_enc_T = spmm(p.csr_t(d_z), x_c)
        # b_dec: through x_hat (and x_gate unless frozen), and through the encoder's input x - b_dec
        d_b_dec = d_x_hat.sum(0) - (d_b_gate + scale * d_b_mag) @ W_enc_T
        if not ctx.frozen:  # the gate's reconstruction trains the decoder too
            d_b_dec += d_x_gate.sum(0)
            d_W_dec = torch.addmm(d_W_dec, p.csr_t(gate_p), d_x_gate)
        grads = (d_b_dec, d_W_enc_T, d_b_gate, d_b_mag, d_r_mag, d_W_dec)
        return None, None, *grads, None, None, None, None, None


class _DenseStep(torch.autograd.Function):
    """(mse, l1, gate_aux, x_hat, fired) of the Gated SAE from z = (x - b_dec) @ W_enc and gate = ReLU(π_gate)
    [n, d_sae], both computed without autograd, with the backward written out: with the encoder's, eight
    dense products where autograd's graph of the dense loss takes nine (b_dec's gradient through the
    encoder needs only the column sums of z's gradient, not an [n, d_in] product), the masks applied
    by `threshold_backward` (0 where its second argument is 0: one pass, no bool tensor). With `frozen`, the
    gate's reconstruction sends no gradient to W_dec and b_dec (the paper's form). Under autocast the
    products run in its precision, the elementwise maths in float32, and the gradients return in the
    parameters' dtype."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, b_dec, W_enc_T, b_gate, b_mag, r_mag, W_dec, z, gate, frozen):
        n = len(x)
        scale = r_mag.exp()  # [d_sae]: W_mag = W_enc ⊙ exp(r_mag)
        # f = H(π_gate) ReLU(π_mag) [n, d_sae] float32: ReLU(π_mag) kept where the gate is open
        mag = torch.addcmul(b_mag, z, scale).relu_()
        f = torch.ops.aten.threshold_backward.grad_input(mag, gate, 0, grad_input=mag)
        x_hat = (f @ W_dec).float().add_(b_dec)  # [n, d_in]
        x_gate = (gate @ W_dec).float().add_(b_dec)
        r, r_gate = x_hat - x, x_gate - x
        mse, gate_aux = residual_mse(r), residual_mse(r_gate)
        l1 = gate.sum() / n
        fired = f.bool().sum(0, dtype=torch.int32).long()  # [d_sae]: int32 sums are ~3x faster on a CPU
        ctx.save_for_backward(x, b_dec, W_enc_T, W_dec, z, scale, f, gate, r, r_gate)
        ctx.frozen, ctx.param_dtype = frozen, W_dec.dtype
        ctx.mark_non_differentiable(x_hat, fired)
        return mse, l1, gate_aux, x_hat, fired

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, g_mse, g_l1, g_aux, _, __):
        x, b_dec, W_enc_T, W_dec, z, scale, f, gate, r, r_gate = ctx.saved_tensors
        n = len(x)
        d_x_hat, d_x_gate = r * (2 * g_mse / n), r_gate * (2 * g_aux / n)  # [n, d_in]
        # d π_mag = d_x_hat @ W_dec^T where f > 0; d π_gate = d_x_gate @ W_dec^T + λ/n where the gate is open
        d_mag = (d_x_hat @ W_dec.t()).float()
        d_mag = torch.ops.aten.threshold_backward.grad_input(d_mag, f, 0, grad_input=d_mag)
        d_gate = torch.addmm((g_l1 / n).expand(gate.shape[1]), d_x_gate, W_dec.t()).float()
        d_gate = torch.ops.aten.threshold_backward.grad_input(d_gate, gate, 0, grad_input=d_gate)
        d_b_mag, d_b_gate = d_mag.sum(0), d_gate.sum(0)  # [d_sae]
        d_z = d_gate.addcmul_(d_mag, scale)  # [n, d_sae]: z feeds π_gate and, scaled, π_mag (in place)
        d_W_enc_T = d_z.t() @ (x - b_dec)
        d_r_mag = d_mag.mul_(z).sum(0) * scale  # d exp(r_mag) = exp(r_mag)
        d_W_dec = f.t() @ d_x_hat
        if not ctx.frozen:  # the gate's reconstruction trains the decoder too
            d_W_dec = torch.addmm(d_W_dec, gate.t(), d_x_gate)  # not addmm_: autocast skips in-place ops
        with torch.autocast(x.device.type, enabled=False):  # a column sum's scale overflows float16
            # b_dec: through x_hat (and x_gate unless frozen), and through the encoder's input x - b_dec,
            # whose gradient's column sums are those of d_z = d_b_gate + scale ⊙ d_b_mag
            d_b_dec = d_x_hat.sum(0) - (d_b_gate + scale * d_b_mag) @ W_enc_T.float()
            if not ctx.frozen:
                d_b_dec = d_b_dec + d_x_gate.sum(0)
        w = ctx.param_dtype
        grads = (d_b_dec, d_W_enc_T, d_b_gate, d_b_mag, d_r_mag, d_W_dec)
        return None, *(g.to(w) for g in grads), None, None, None
