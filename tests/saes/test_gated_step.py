"""The Gated SAE's training step, dense (`gated._DenseStep`, its backward written out) or sparse (a `Pattern`
of the open gates), trains to the same weights as the paper's loss through plain autograd
(test_gated_training_form.dense_loss), step after step, and under autocast gives float32 gradients within
its rounding of autograd's. Tiny SAEs on a synthetic sparse world, no model."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import GatedSAE, gated, kernels
from helpers.saes.base import StepOutput
from helpers.saes.train import TrainConfig
from tests.saes.test_gated_training_form import dense_loss
from tests.saes.test_standard_step import step_beside_autograd_under_autocast, train_beside_autograd, world

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN, D_SAE = 16, 64  # as test_standard_step's world


def autograd_losses(sae: GatedSAE, x: torch.Tensor, dead: torch.Tensor) -> StepOutput:
    """The paper's loss as written (dense_loss), every gradient from autograd."""
    with torch.no_grad():
        z = (x - sae.b_dec) @ sae.W_enc
        f = (z + sae.b_gate > 0) * (z * sae.r_mag.exp() + sae.b_mag).relu()
        x_hat = f @ sae.W_dec + sae.b_dec
    loss = dense_loss(sae, x, sae.frozen_gate_decoder)
    return StepOutput(loss, {}, x_hat, (f > 0).sum(0))


@pytest.fixture
def dense_steps(monkeypatch):
    """Counts the steps that take the dense path (`_DenseStep`)."""
    calls = []
    apply = gated._DenseStep.apply
    monkeypatch.setattr(gated._DenseStep, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-gate-decoder", "frozen-gate-decoder"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense-step", "sparse-step"])
def test_training_ends_where_autograd_of_the_plain_loss_ends(dense, frozen, dense_steps, monkeypatch):
    """Ten steps of the real trainer (Adam, clipping, the λ controller): the same loss, firing counts and
    gradients at every step and the same weights at the end, whichever path the steps take."""
    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0 if dense else 1.0)
    x = world(2560)
    cfg = TrainConfig(
        architecture="gated",
        expansion=D_SAE // D_IN,
        l0=4,
        train_tokens=2560,
        batch_size=256,
        sae_options={"frozen_gate_decoder": frozen},
    )
    ours, _ = train_beside_autograd(cfg, x, autograd_losses)
    assert len(dense_steps) == (10 if dense else 0)
    assert 0.02 < ours.history[-1]["l0"] / D_SAE < 0.6  # both paths had real work: neither empty nor full


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_step_under_autocast_gives_float32_gradients_close_to_autograds(
    dtype, dense_steps, monkeypatch
):
    """Autocast (a T4 trains in float16, newer GPUs in bfloat16; CPU autocast takes the same code): the
    products in low precision, the gradients back in the parameters' float32, within its rounding."""
    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0)
    x = world(256, seed=1)
    sae = GatedSAE(D_IN, D_SAE, l0=4, sparsity_coef=0.3, seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        sae.W_enc_T.mul_(10)  # about half the gates open
    _, plain = step_beside_autograd_under_autocast(sae, x, autograd_losses, dtype)
    assert dense_steps == [1]
    assert 0.2 < float(plain.fired.sum()) / x.numel() * D_IN / D_SAE < 0.8
