"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

Training keeps the n·k largest ReLU'd pre-activations of a batch of n tokens, wherever they fall, instead of
k per token (TopK): a token with much to say gets more latents, an easy one fewer, at the same mean L0.
That choice depends on the other tokens of the batch, so inference uses a threshold instead (§3.2):

    training:   f = the batch's n·k largest of ReLU(pre)                     (kernels.batch_topk)
    inference:  f = pre · H(pre - θ)    θ = running mean of the smallest selected activation per batch

so the SAE is saved as a `jumprelu` with θ in every latent's threshold, as SAELens does, and `encode`
here is that JumpReLU (what SAELens loads is exactly what evaluation measures). During training θ is an
exponential moving average with rate `threshold_rate` (SAELens's `topk_threshold_lr`), bias-corrected so
that a short run's θ is the mean of the batches it saw rather than dragged toward its initial 0. A batch's
smallest selected activation is heavy-tailed when batches are small (64-token batches left a quarter of
tokens with no latent firing), so after training `calibrate` sets θ once from a pool of tokens: the
smallest of the pool's n·k largest activations, the batch rule over one large batch, so the pool's mean
L0 is k.

Dead latents are revived with TopK's AuxK (base.auxk_loss, Gao et al. 2024 §A.2), as in the paper and
SAELens: the step is base.KSparseSAE's, shared with TopK (decoder rows from norm 0.1, free; AuxK
coefficient 1; encoder at the decoder's transpose); Matryoshka changes its `reconstruction_loss`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from helpers.saes.base import KSparseSAE, StepOutput
from helpers.saes.kernels import Pattern, batch_topk


class BatchTopKSAE(KSparseSAE):
    architecture = "batchtopk"
    saved_architecture = "jumprelu"
    latent_biases = ("b_enc", "threshold")
    saelens_tensors = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0: float = 32,
        k_aux: int | None = None,
        auxk_coef: float = 1.0,
        threshold_rate: float = 0.01,
        seed: int = 0,
    ):
        """`l0` is k, the mean number of active latents per token; `k_aux` defaults to min(d_in // 2, d_sae);
        `threshold_rate` is the moving average's rate for the inference threshold θ."""
        super().__init__(d_in, d_sae, l0=l0, k_aux=k_aux, auxk_coef=auxk_coef, seed=seed)
        self.k = float(l0)
        self.threshold_rate = threshold_rate
        # θ for every latent (the saved JumpReLU's `threshold`); one value here, as in the paper.
        self.register_buffer("threshold", torch.zeros(d_sae))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64))
        self._min_selected: float | None = None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return pre * (pre > self.threshold), pre

    def pick(self, pre: Tensor) -> Pattern:
        """The batch's n·k largest pre-activations."""
        return batch_topk(pre, round(self.k * len(pre)))

    def select(self, x: Tensor) -> tuple[Tensor, Pattern, Tensor]:
        """base.KSparseSAE.select, recording the smallest positive selected activation for θ's update."""
        pre, p, acts = super().select(x)
        positive = acts.detach()[acts.detach() > 0]
        self._min_selected = float(positive.min()) if len(positive) else None
        return pre, p, acts

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        """θ ← EMA of the smallest selected activation, bias-corrected (Adam-style) for short runs."""
        if self._min_selected is None:
            return
        rate, t = self.threshold_rate, int(self.threshold_steps) + 1
        decay = (1 - rate) ** t
        raw = self.threshold * (1 - (1 - rate) ** (t - 1)) * (1 - rate) + rate * self._min_selected
        self.threshold.copy_(raw / (1 - decay))
        self.threshold_steps.fill_(t)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor]) -> dict:
        """θ ← the smallest of the n·k largest ReLU'd pre-activations over all n tokens of `batches` (scaled
        as in training), so that inference fires k latents per token on average over that pool. Kept as a
        running top-(n·k) over the batches, so the pool's [n, d_sae] pre-activations never sit in memory."""
        batches = list(batches)
        n = sum(len(x) for x in batches)
        if not n:
            raise ValueError("calibrating BatchTopK's threshold needs at least one batch of tokens")
        want, top = round(self.k * n), torch.empty(0)
        for x in batches:
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc).relu_().flatten()
            top = torch.cat([top.to(pre), pre.topk(min(want, len(pre)), sorted=False).values])
            top = top.topk(min(want, len(top)), sorted=False).values
        running = float(self.threshold[0])
        self.threshold.fill_(float(top.min()))
        return {"threshold_running_mean": running, "threshold": float(self.threshold[0]), "tokens": n}

    def saelens_cfg(self) -> dict:
        return {"l0_target": self.target_l0, "trained_as": self.architecture}
