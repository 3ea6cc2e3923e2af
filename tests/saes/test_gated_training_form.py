"""The Gated SAE's training loss, pinned against a hand-written dense form of it (Rajamanoharan et al. 2024,
eq. 8), with the gate's reconstruction term through the trainable decoder (SAELens's form) or a frozen copy
(the paper's), on a tiny SAE: every parameter's gradient must match."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import GatedSAE


def tiny(frozen: bool) -> tuple[GatedSAE, torch.Tensor]:
    """A 12 -> 40 Gated SAE with non-trivial biases (about half its gates open) and 32 inputs."""
    g = torch.Generator().manual_seed(0)
    sae = GatedSAE(12, 40, l0=8, sparsity_coef=0.3, frozen_gate_decoder=frozen, seed=1)
    with torch.no_grad():
        for name in ("b_dec", "b_gate", "b_mag", "r_mag"):
            p = getattr(sae, name)
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return sae, torch.randn(32, 12, generator=g) * 0.3


def dense_loss(sae: GatedSAE, x: torch.Tensor, frozen: bool) -> torch.Tensor:
    """||x - f W_dec - b_dec||² + λ Σ ReLU(π_gate) + ||x - ReLU(π_gate) W_dec' - b_dec'||², token means,
    f = H(π_gate) ReLU(π_mag); W_dec', b_dec' detached when `frozen`."""
    z = (x - sae.b_dec) @ sae.W_enc
    pi_gate, pi_mag = z + sae.b_gate, z * sae.r_mag.exp() + sae.b_mag
    f = (pi_gate > 0) * pi_mag.relu()
    mse = (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    l1 = pi_gate.relu().sum(-1).mean()
    W, b = (sae.W_dec.detach(), sae.b_dec.detach()) if frozen else (sae.W_dec, sae.b_dec)
    aux = (pi_gate.relu() @ W + b - x).pow(2).sum(-1).mean()
    return mse + sae.sparsity_coef * l1 + aux


@pytest.mark.parametrize("frozen", [False, True])
def test_gated_gradients_match_the_dense_loss(frozen):
    sae, x = tiny(frozen)
    out = sae.losses(x, torch.zeros(40, dtype=torch.bool))
    assert 0.2 < out.l0 / 40 < 0.8, "about half the gates open: every term is exercised"
    ours = torch.autograd.grad(out.loss, list(sae.parameters()))
    ref_loss = dense_loss(sae, x, frozen)
    ref = torch.autograd.grad(ref_loss, list(sae.parameters()))
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(sae.named_parameters(), ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_the_gate_term_trains_the_decoder_only_when_not_frozen():
    grads = {}
    for frozen in (False, True):
        sae, x = tiny(frozen)
        sae.losses(x, torch.zeros(40, dtype=torch.bool)).loss.backward()
        grads[frozen] = sae.W_dec.grad.clone()
    assert (grads[False] - grads[True]).abs().max() > 1e-3, "the gate's reconstruction reaches W_dec"
