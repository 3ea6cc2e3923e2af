"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).

f = ReLU(TopK_k(pre)): exactly k latents per token, so L0 is set, not tuned. Dead latents (no firing
for `dead_tokens` tokens, counted by the training loop) are revived by the AuxK loss (§A.2): the
top-k_aux dead pre-activations reconstruct the detached residual error e = x - x_hat, normalised by
e's variance as in OpenAI's reference, with k_aux = d_in/2 (capped by d_sae) and coefficient 1 (SAELens's
`aux_loss_coefficient`; 1/32 left many latents dead with free rows); the step is `base.KSparseSAE`'s,
shared with the BatchTopK family.
Decoder rows start at norm 0.1 and their norms are free, as SAELens trains its TopK SAEs (its
`decoder_init_norm` and its sparse path's `rescale_acts_by_decoder_norm=False`); the encoder starts as the
decoder's transpose (base.KSparseSAE). Both recovered more of a known dictionary than unit-norm rows held
fixed (the ablations: README, Measured).
The saved rows keep their trained norms (`fold_row_norms`), so the saved TopK selects as training did.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.saes.base import KSparseSAE
from helpers.saes.kernels import Pattern, relu_topk


class TopKSAE(KSparseSAE):
    architecture = "topk"
    fold_row_norms = False  # the top-k selection compares latents: free rows are saved as they are
    saelens_tensors = ("W_enc", "b_enc", "W_dec", "b_dec")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0: int = 32,
        k_aux: int | None = None,
        auxk_coef: float = 1.0,
        seed: int = 0,
    ):
        """`l0` is k, the number of active latents per token; `k_aux` defaults to min(d_in // 2, d_sae)."""
        super().__init__(d_in, d_sae, l0=int(l0), k_aux=k_aux, auxk_coef=auxk_coef, seed=seed)
        self.k = int(l0)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu()), pre

    def pick(self, pre: Tensor) -> Pattern:
        """Each token's k largest ReLU'd pre-activations (kernels.relu_topk)."""
        return Pattern.from_indices(relu_topk(pre, self.k), self.d_sae)

    def saelens_cfg(self) -> dict:
        # The rows' norms are free and not folded (base.SAE.saelens_state): SAELens must select on the
        # pre-activations as they are, as training did.
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def kwargs_from_saelens_cfg(cls, cfg: dict) -> dict:
        return {"l0": int(cfg["k"])}
