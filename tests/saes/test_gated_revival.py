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
    assert reopened(revive_coef=None) > 0, "on by default (0.002: 4 of the 5 in 10 steps)"


def test_rare_latents_are_revived_too():
    """With `revive_below` r (default 0.1) the term also reaches latents silent for d_sae / (r · l0) tokens
    (40 / (0.1 · 8) = 50 here), not only the trainer's dead ones: 0 marks none of them."""
    sae, x, _ = tiny(revive_coef=0.5)
    assert float(sae.revive_below) == pytest.approx(0.1), "on by default"
    with torch.no_grad():
        sae.tokens_since_fired[:CLOSED] = torch.tensor([0, 49, 50, 51, 10**6])  # 50 tokens: the window
    none_dead = torch.zeros(40, dtype=torch.bool)
    rare = torch.zeros(40, dtype=torch.bool)
    rare[2:CLOSED] = True
    assert sae.revival_mask(none_dead).tolist() == rare.tolist()
    pi_gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate  # [32, 40]
    expected = 0.5 * (-pi_gate[:, rare]).relu().sum(-1).mean()
    torch.testing.assert_close(sae.losses(x, none_dead).terms["revive"], expected.detach())
    trainer_dead = torch.zeros(40, dtype=torch.bool)
    trainer_dead[7] = True
    assert sae.revival_mask(trainer_dead).tolist() == (rare | trainer_dead).tolist(), "and the dead ones"
    sae.revive_below.fill_(0.0)
    assert not sae.revival_mask(none_dead).any(), "0: the trainer's dead latents only"


def test_a_checkpoint_from_before_revive_below_resumes_without_it():
    """A state dict without `revive_below` trained with the trainer's dead latents only: it resumes so,
    whatever today's default; a stored value wins over the constructor's."""
    trained = GatedSAE(12, 40, l0=8, revive_below=0.0)
    old = {k: v for k, v in trained.state_dict().items() if k != "revive_below"}
    resumed = GatedSAE(12, 40, l0=8)
    resumed.load_state_dict(old)
    assert float(resumed.revive_below) == 0.0
    stored = GatedSAE(12, 40, l0=8, revive_below=0.3)
    stored.load_state_dict(GatedSAE(12, 40, l0=8, revive_below=0.05).state_dict())
    assert float(stored.revive_below) == pytest.approx(0.05)


def test_a_checkpoint_from_before_the_revival_was_stored_resumes_at_0_01():
    """The default revive_coef 0.01 from 1491067 was not stored: its checkpoints go on at 0.01."""
    old = {
        k: v
        for k, v in GatedSAE(12, 40, l0=8).state_dict().items()
        if k not in ("revive_coef", "revive_below")
    }
    resumed = GatedSAE(12, 40, l0=8, revive_coef=0.5)
    resumed.load_state_dict(old)
    assert (float(resumed.revive_coef), float(resumed.revive_below)) == (pytest.approx(0.01), 0.0)
