"""Standard SAE: ReLU latents with an L1 penalty weighted by decoder norms (Bricken et al. 2023, "Towards
Monosemanticity"; Anthropic's April 2024 update, "Training Sparse Autoencoders"; SAELens's `standard`).

    f     = ReLU((x - b_dec) @ W_enc + b_enc)
    loss  = ||x - x_hat||^2 + λ · Σ_j f_j ||W_dec_j||

The decoder rows are not held at unit norm here: the penalty is on f_j ||W_dec_j||, which is what latent j
writes into the residual, so the SAE cannot cheat the L1 term by shrinking f and growing the row (the
reason the older recipe fixed the norms). The rows' norms are free (`free_decoder`) and start at 0.1 with the
encoder as the decoder's transpose (SAELens's `decoder_init_norm`), and the inputs are scaled to mean norm
sqrt(d_in) (`input_norm`, SAELens's `expected_average_only_in`), so λ is in SAELens's `l1_coefficient`
units and starts at its recommended 5 (Anthropic's April 2024 update). With unit rows, or at unit mean
squared norm, the first steps overshoot the reconstruction and Adam's bias steps (about lr each) then
silence most latents (L0 near 0 within 20 steps, then a slow recovery; the README's Measured table).

λ is steered toward the target L0 `l0` (base.adapt_coefficient), as for Gated and JumpReLU, so one knob
sets the sparsity of every architecture; it is held while the L0 already falls toward the target on its own
(`coef_trend_horizon`: integrating during that fall only builds an overshoot, and each step of a larger λ
costs explained variance through shrinkage). The step is sparse apart from the encoder's forward matmul: every
term lives on the active set {pre > 0}. Early in training that set is half the latents; above
kernels.DENSE_ABOVE the step is then plain dense maths (identical results, cheaper than sparse bookkeeping).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from helpers.saes.base import PenaltySAE, StepOutput
from helpers.saes.kernels import DENSE_ABOVE, Pattern, gather_pre, recon_loss, sparse_decode


class StandardSAE(PenaltySAE):
    architecture = "standard"
    latent_biases = ("b_enc",)
    saelens_tensors = ("W_enc", "b_enc", "W_dec", "b_dec")
    input_norm = "sqrt_d_in"
    decoder_norm = 0.1
    free_decoder = True
    coef_trend_horizon = 50.0

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0: float = 32,
        sparsity_coef: float = 5.0,
        coef_rate: float = 0.02,
        seed: int = 0,
    ):
        """`l0`: target L0; `sparsity_coef`: initial L1 coefficient λ; `coef_rate`: how fast log λ follows
        the L0 error per step (0 keeps λ fixed, as in SAELens)."""
        super().__init__(d_in, d_sae, l0=l0, sparsity_coef=sparsity_coef, coef_rate=coef_rate, seed=seed)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return pre.relu(), pre

    def losses(self, x: Tensor, dead: Tensor) -> StepOutput:
        norms = self.W_dec.norm(dim=1)  # [d_sae], differentiable: the penalty pulls on the rows' norms too
        # The only dense matmul, once: with gradients for the dense path; the sparse path reads it detached
        # and gathers its active entries with their own gradients.
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)  # [n, d_sae]
        with torch.no_grad():
            active = pre > 0
            dense = active.sum() > DENSE_ABOVE.get(x.device.type, 0.02) * active.numel()
        if dense:  # early in training half the latents fire: plain dense maths beats building a Pattern
            acts_dense = pre.relu()
            x_hat = acts_dense @ self.W_dec + self.b_dec
            l1 = (acts_dense * norms).sum() / len(x)
            fired = active.sum(0)
        else:
            p = Pattern.from_mask(active)
            acts = gather_pre(x, self.b_dec, self.W_enc_T, self.b_enc, pre.detach(), p)  # [nnz], all > 0
            x_hat = sparse_decode(acts, self.W_dec, p) + self.b_dec
            l1 = (acts * norms.index_select(0, p.col)).sum() / len(x)
            fired = torch.bincount(p.col, minlength=self.d_sae)
        mse = recon_loss(x_hat, x)
        terms = {"mse": mse.detach(), "l1": l1.detach()}
        return StepOutput(mse + self.sparsity_coef * l1, terms, x_hat.detach(), fired)
