"""Gated's low start: its gates start open at `init_l0_mult` times the target L0 on the init sample (not at
~d_sae / 2 from b_gate at 0, which kept ~60% of a synthetic run's steps dense), with λ starting where the L1
penalty balances the gate reconstruction's push at the target L0 (`balanced_coef`, checked against
autograd's gradient of the same two terms)."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import GatedSAE
from helpers.saes.train import TrainConfig, Trainer

D_IN, D_SAE, L0 = 16, 128, 4


def sample(n: int = 1024) -> torch.Tensor:
    """[n, D_IN]: a few random directions per token with uniform magnitudes, plus an offset."""
    dictionary = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    magnitudes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.1)
    return magnitudes @ dictionary + 0.5


def gated(**options) -> GatedSAE:
    sae = GatedSAE(D_IN, D_SAE, l0=L0, seed=0, **options)
    with torch.no_grad():
        sae.b_dec.copy_(sample().mean(0))  # as the trainer sets it before init_from_sample
    return sae


def open_gates(sae: GatedSAE, x: torch.Tensor) -> torch.Tensor:
    """[d_sae]: on how many tokens of x each gate is open (π_gate > 0)."""
    with torch.no_grad():
        return ((x - sae.b_dec) @ sae.W_enc + sae.b_gate > 0).sum(0)


def test_every_gate_starts_open_on_its_share_of_init_l0_mult_times_the_target():
    x = sample()
    sae = gated()  # init_l0_mult 8: an L0 of 32 of 128 latents
    before = float(open_gates(sae, x).sum()) / len(x)
    assert before > 50, "from b_gate at 0 about half the gates are open"
    sae.init_from_sample(x, total_steps=1000)
    assert open_gates(sae, x).tolist() == [len(x) * 8 * L0 // D_SAE] * D_SAE  # 256 tokens each: L0 32


def test_lambda_starts_where_the_penalty_balances_the_gate_reconstruction_at_the_target():
    x = sample()
    sae = gated()
    coef = sae.balanced_coef(x)
    # autograd on gate_aux + λ l1 with every gate open on its share L0 / d_sae of x: the push on the open
    # gates' pre-activations sums to 0 at λ = coef (b_gate's gradient summed over latents)
    offset = torch.quantile((x - sae.b_dec) @ sae.W_enc, 1 - L0 / D_SAE, dim=0, interpolation="lower")
    b_gate = (-offset).detach().requires_grad_()
    gate = ((x - sae.b_dec) @ sae.W_enc + b_gate).relu()
    x_gate = gate @ sae.W_dec + sae.b_dec
    loss = (x_gate - x).pow(2).sum(1).mean() + coef * gate.sum(1).mean()
    (grad,) = torch.autograd.grad(loss, b_gate)
    assert coef > 0
    assert abs(float(grad.sum())) < 1e-4 * coef * float((gate > 0).sum()) / len(x)
    sae.init_from_sample(x, total_steps=1000)
    assert float(sae.sparsity_coef) == pytest.approx(coef)


def test_a_given_lambda_or_init_l0_mult_none_is_kept():
    x = sample()
    given = gated(sparsity_coef=0.3)
    given.init_from_sample(x, total_steps=1000)
    assert float(given.sparsity_coef) == pytest.approx(0.3)
    assert open_gates(given, x).tolist() == [256] * D_SAE, "the low start still applies"
    old = gated(init_l0_mult=None)
    old.init_from_sample(x, total_steps=1000)
    assert float(old.sparsity_coef) == pytest.approx(0.1) and not old.b_gate.any(), "b_gate at 0, λ 0.1"
    high = gated(init_l0_mult=16)  # 64 of 128 latents: at d_sae / 2, the old start
    high.init_from_sample(x, total_steps=1000)
    assert not high.b_gate.any() and float(high.sparsity_coef) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="init_l0_mult must be > 0"):
        GatedSAE(D_IN, D_SAE, l0=L0, init_l0_mult=0)


def test_the_trainer_starts_gated_at_the_low_start():
    x = sample(2048)
    run = Trainer(TrainConfig(architecture="gated", expansion=D_SAE // D_IN, l0=L0, train_tokens=4096), D_IN)
    run.init_from_data(x)
    l0 = float(open_gates(run.sae, x * run.scale).sum()) / len(x)
    assert l0 == pytest.approx(8 * L0, rel=0.05)
    assert float(run.sae.sparsity_coef) != pytest.approx(0.1)


@pytest.mark.parametrize("balanced", [-0.2, float("nan")])
def test_no_balancing_lambda_warns_and_starts_at_the_dense_start_lambda(monkeypatch, balanced):
    """Data whose gate reconstruction shuts the open gates has no balancing λ: the run still starts (at the
    low start, λ 0.1) and says what to pass instead, rather than training with a negative or NaN λ."""
    x = sample()
    sae = gated()
    monkeypatch.setattr(GatedSAE, "balanced_coef", lambda self, x: balanced)
    with pytest.warns(UserWarning, match="sparsity_coef"):
        sae.init_from_sample(x, total_steps=1000)
    assert float(sae.sparsity_coef) == pytest.approx(GatedSAE.DENSE_START_COEF)
    assert open_gates(sae, x).tolist() == [256] * D_SAE, "the low start still applies"
