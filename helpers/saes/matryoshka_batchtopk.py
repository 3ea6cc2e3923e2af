"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders", arXiv 2503.17547; Nabeshima 2024).

The latents are ordered, and every prefix of widths w_1 < w_2 < ... < w_G = d_sae must reconstruct x on
its own (§3):

    loss = Σ_g c_g ||x - (b_dec + Σ_{j < w_g} f_j W_dec_j)||^2  (+ AuxK)

(c_g = `inner_weight`, 0.5, for the inner prefixes and 1 for the full width; the paper and SAELens sum
them plainly, c_g = 1: see below)

with f chosen by BatchTopK over all latents (batchtopk.py). Early latents then carry the general, frequent
features and later ones refine them, which resists feature absorption and splitting: on SynthSAEBench's
ground truth it recovers the most features (REFERENCE.md). Each active pair is decoded once: the groups'
partial reconstructions are summed cumulatively, so the step costs one sparse decode, not G. Saved, like
BatchTopK, as a `jumprelu` with the inference threshold θ in every latent.

`matryoshka_widths` defaults to four nested prefixes, d_sae/64, d_sae/16, d_sae/4 and d_sae.

AuxK here is SAELens's (and Bussmann et al.'s reference code's) form, unlike TopK's and BatchTopK's
(OpenAI's, divided by the residual error's variance): ||e - e_hat||^2 on the same unnormalised footing as
the prefix MSEs, times min(n_dead / k_aux, 1). Divided by Var(e) (~22 late in training at the sqrt(d_in)
input scale) and set beside G prefix MSEs, AuxK barely acted: on SmolLM2 layer 15 (400 steps, d_sae 4608)
23% of the latents stayed dead and held-out EV at L0 32 was 0.9142 against SAELens's 0.9155; in this form
0.9155 with 14.6% dead (SAELens 15.3-15.6%). Ground truth (bench/synthetic_quality.py, 5M samples): MCC
0.8728 vs SAELens 0.8715, F1 0.5475 vs 0.5504 (was 0.878 / 0.551 vs 0.869 / 0.543).

With that, the plain sum (`inner_weight` 1) is SAELens's step (tests/saes/test_matryoshka_auxk.py: the same
loss and gradients on the same weights) and tied with it. The inner prefixes weighted 0.5 is what puts it
ahead. The inner losses pull only on the early latents; at weight 1 the three of them outweigh the full
width's, and half the dead latents come back at 0.5 (our reading of the figures below). Ours alone, 400 steps
on SmolLM2 layer 15 (d_sae 4608, held-out EV at L0 32 / dead there): weight 1 0.9155 / 15.4%, 0.5 0.9216 /
7.9%, 0.25 0.9277 / 2.2%; each inner prefix (72 / 288 / 1152 latents) then reconstructs a little worse, EV
0.550 / 0.749 / 0.870 at 1, 0.540 / 0.740 / 0.865 at 0.5, 0.526 / 0.724 / 0.855 at 0.25; k_aux 576 instead of
d_in // 2: 0.9146 / 19.3%. Ground truth 1M samples (MCC / F1, SAELens in the same run): weight 1 0.726 / 0.370
vs 0.730 / 0.377, 0.5 0.755 / 0.397 vs 0.738 / 0.382, 0.25 0.780 / 0.419 vs 0.728 / 0.375. Against SAELens
side by side at 0.5 (bench/sae_train.py, 400 steps): EV at L0 32 0.9216 vs 0.9153, ahead by 0.0045-0.0088
along L0 16-48 (SAELens 0.9153-0.9161 in four runs), dead 7.9% vs 14.0%, 4.04x its tokens/s; ground truth 5M
samples (bench/synthetic_quality.py, lr 3e-3) MCC / F1 0.8872 / 0.5616 vs 0.8745 / 0.5499 (SAELens
0.8666-0.8745 / 0.5436-0.5504 in four runs), 22 dead latents of 512 vs 15 (14-21 in four runs; at 0.25: 0.8926
/ 0.5665 vs 0.8716 / 0.5451, 22 vs 21 dead), 2.69x its tokens/s (2.96-3.08x since the k-sparse step's
integer-bits top-k and dense AuxK block, on a loaded machine). The README's Measured table has the commands.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.saes.batchtopk import BatchTopKSAE
from helpers.saes.kernels import Pattern, recon_loss, sparse_decode


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"
    auxk_normalised = False  # KSparseSAE.auxk_normalised: SAELens's form (module docstring)

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        l0: float = 32,
        matryoshka_widths: list[int] | None = None,
        k_aux: int | None = None,
        auxk_coef: float = 1.0,
        threshold_rate: float = 0.01,
        inner_weight: float = 0.5,
        seed: int = 0,
    ):
        """`matryoshka_widths`: the prefix sizes, strictly increasing; d_sae is appended when missing.
        `inner_weight`: the weight of each inner prefix's MSE in the loss (the full width's is 1; 1 is the
        paper's and SAELens's plain sum)."""
        super().__init__(
            d_in, d_sae, l0=l0, k_aux=k_aux, auxk_coef=auxk_coef, threshold_rate=threshold_rate, seed=seed
        )
        widths = list(matryoshka_widths or sorted({max(1, d_sae // f) for f in (64, 16, 4)} | {d_sae}))
        if widths[-1] != d_sae:
            widths.append(d_sae)
        if (
            any(b <= a for a, b in zip(widths, widths[1:], strict=False))
            or widths[0] < 1
            or widths[-1] > d_sae
        ):
            raise ValueError(
                f"matryoshka_widths must increase strictly within 1..d_sae={d_sae}, got {matryoshka_widths}"
            )
        self.widths = widths
        if not 0 <= inner_weight <= 1:
            raise ValueError(
                f"inner_weight must be in [0, 1] (1: the plain sum of prefix MSEs), got {inner_weight}"
            )
        self.inner_weight = float(inner_weight)
        # each latent's group g (latents widths[g-1] .. widths[g] - 1); a buffer, so it moves with the SAE
        group = torch.bucketize(torch.arange(d_sae), torch.tensor(widths), right=True)
        self.register_buffer("latent_group", group, persistent=False)

    def reconstruction_loss(self, x: Tensor, acts: Tensor, p: Pattern) -> tuple[Tensor, Tensor, dict]:
        """Σ over prefixes of the prefix's MSE, the inner ones times `inner_weight`; x_hat is the full width's
        reconstruction. One sparse decode of every (token, group) bag (a row's pairs are sorted by latent, so
        a group's are contiguous) gives each group's part; the prefixes add them up in order."""
        n, groups = len(x), len(self.widths)
        group = self.latent_group.index_select(0, p.col)
        bags = p.with_rows(p.row * groups + group, n * groups)
        parts = sparse_decode(acts, self.W_dec, bags).view(n, groups, -1).unbind(1)
        x_hat, loss, terms = self.b_dec.expand_as(x), 0.0, {}
        for width, part in zip(self.widths, parts, strict=True):
            x_hat = x_hat + part
            mse = recon_loss(x_hat, x)
            loss = loss + (mse if width == self.d_sae else self.inner_weight * mse)
            terms[f"mse_{width}"] = mse.detach()
        terms["mse"] = terms.pop(f"mse_{self.d_sae}")
        return loss, x_hat, terms

    def saelens_cfg(self) -> dict:
        return {**super().saelens_cfg(), "matryoshka_widths": self.widths}

    @classmethod
    def kwargs_from_saelens_cfg(cls, cfg: dict) -> dict:
        return {**super().kwargs_from_saelens_cfg(cfg), "matryoshka_widths": cfg.get("matryoshka_widths")}
