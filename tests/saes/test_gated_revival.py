"""The Gated SAE's revival term (`revive_coef`): the pre-activation loss on the gates of dead latents,
pinned against a dense form of it, and shown to reopen gates that are closed on every token (no other term
reaches them: every other term lives on the active set)."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import GatedSAE
from tests.saes.test_gated_training_form import dense_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny steps: one thread (tests/conftest.py)

CLOSED = 5  # latents 0..4: gate bias -0.2, closed on every token of the tiny batch (|z| <= 0.12 there)


def tiny(revive_coef: float | None) -> tuple[GatedSAE, torch.Tensor, torch.Tensor]:
    """A 12 -> 40 Gated SAE (`revive_coef` None: the default), 32 inputs, and its `dead` mask [40]: the
    first CLOSED latents' gates shut."""
    g = torch.Generator().manual_seed(0)
    options = {} if revive_coef is None else {"revive_coef": revive_coef}
    sae = GatedSAE(12, 40, l0=8, sparsity_coef=0.3, seed=1, **options)
    with torch.no_grad():
        for name in ("b_dec", "b_gate", "b_mag", "r_mag"):
            p = getattr(sae, name)
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        sae.b_gate[:CLOSED] = -0.2
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:CLOSED] = True
    return sae, torch.randn(32, 12, generator=g) * 0.3, dead


def test_revival_loss_matches_the_dense_form():
    sae, x, dead = tiny(revive_coef=0.5)
    out = sae.losses(x, dead)
    pi_gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate  # [32, 40]
    ref_loss = dense_loss(sae, x, frozen=False) + 0.5 * (-pi_gate[:, dead]).relu().sum(-1).mean()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    ours = torch.autograd.grad(out.loss, list(sae.parameters()))
    ref = torch.autograd.grad(ref_loss, list(sae.parameters()))
    for (name, _), a, b in zip(sae.named_parameters(), ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    assert float(out.terms["revive"]) > 0


def reopened(revive_coef: float | None, steps: int = 10) -> int:
    """How many of the closed gates open on some token of the batch after `steps` Adam steps with them
    marked dead."""
    sae, x, dead = tiny(revive_coef)
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for _ in range(steps):
        sae.losses(x, dead).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        pi_gate = (x - sae.b_dec) @ sae.W_enc[:, :CLOSED] + sae.b_gate[:CLOSED]  # [32, CLOSED]
        return int((pi_gate > 0).any(0).sum())


def test_closed_gates_reopen_only_with_the_revival_term():
    assert reopened(revive_coef=0.0) == 0, "without it a closed gate gets no gradient and stays shut"
    assert reopened(revive_coef=0.1) == CLOSED
    assert reopened(revive_coef=None) == CLOSED, "on by default"
