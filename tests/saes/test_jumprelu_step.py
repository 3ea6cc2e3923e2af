"""The JumpReLU SAE's training step, dense (`jumprelu._DenseStep`, its backward written out) or sparse (a
`Pattern` of the active pairs and the STE window), trains to the same weights as its loss through plain
autograd of the paper's pseudo-derivatives (`_JumpReLU`, `_Step` on every pair), step after step, with either
L0 penalty; under autocast the gradients come back float32 within its rounding. Tiny SAEs, no model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from helpers.saes import JumpReLUSAE, jumprelu, kernels
from helpers.saes.base import StepOutput
from helpers.saes.train import TrainConfig
from tests.saes.test_standard_step import step_beside_autograd_under_autocast, train_beside_autograd, world

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN, D_SAE = 16, 64  # as test_standard_step's world


# The paper's pseudo-derivatives written alone, each its own autograd node: the reference the steps' fused
# forms (`jumprelu._SparseStep`, `jumprelu._DenseStep`) are checked against.
def _rectangle(u: Tensor) -> Tensor:
    """The STE's kernel K(u) = 1 where |u| < 1/2 (§3)."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z · H(z - θ) on a flat [nnz] vector; θ gathered per pair. Pseudo-gradient of eq. 11."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        d_theta = -(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g
        return (z > theta) * g, d_theta, None


class _Step(torch.autograd.Function):
    """H(z - θ) with the pseudo-gradient of eq. 12 (to θ only)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        return None, -(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g, None


def autograd_losses(sae: JumpReLUSAE, x: torch.Tensor, dead: torch.Tensor) -> StepOutput:
    """The loss on every (token, latent) pair, every gradient from autograd (no dead latents here: the
    pre-activation loss is off)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    theta = sae.threshold.expand_as(pre)
    acts = _JumpReLU.apply(pre, theta, sae.bandwidth)
    x_hat = acts @ sae.W_dec + sae.b_dec
    l0 = _Step.apply(pre, theta, sae.bandwidth).sum(-1)  # [n]
    error = (
        (l0.mean() - sae.target_l0) ** 2 if sae.l0_penalty == "batch" else (l0 - sae.target_l0).pow(2).mean()
    )
    loss = (x_hat - x).pow(2).sum(-1).mean() + sae.sparsity_coef * error / sae.target_l0
    return StepOutput(loss, {}, x_hat.detach(), (acts > 0).sum(0))


@pytest.fixture
def dense_steps(monkeypatch):
    """Counts the steps that take the dense path (`_DenseStep`)."""
    calls = []
    apply = jumprelu._DenseStep.apply
    monkeypatch.setattr(jumprelu._DenseStep, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("penalty", ["batch", "token"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense-step", "sparse-step"])
def test_training_ends_where_autograd_of_the_plain_loss_ends(dense, penalty, dense_steps, monkeypatch):
    """Ten steps of the real trainer (Adam, clipping, θ's schedule, the λ controller) with a wide STE window
    (θ learns from both terms at every step): the same loss, firing counts and gradients at every step and
    the same weights at the end, whichever path the steps take."""
    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0 if dense else 1.0)
    x = world(2560)
    cfg = TrainConfig(
        architecture="jumprelu",
        expansion=D_SAE // D_IN,
        l0=8,
        train_tokens=2560,
        batch_size=256,
        sae_options={"l0_penalty": penalty, "bandwidth": 0.05, "pre_act_coef": 0.0},
    )

    def theta_learns(grads: list[torch.Tensor]) -> None:
        assert float(grads[-1].abs().sum()) > 0, "θ learns at every step (the window is not empty)"

    train_beside_autograd(cfg, x, autograd_losses, theta_learns)
    assert len(dense_steps) == (10 if dense else 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_step_under_autocast_gives_float32_gradients_close_to_autograds(
    dtype, dense_steps, monkeypatch
):
    """Autocast (a T4 trains in float16, newer GPUs in bfloat16; CPU autocast takes the same code): the
    products in low precision, the gradients back in the parameters' float32, within its rounding."""
    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0)
    x = world(256, seed=1)
    sae = JumpReLUSAE(D_IN, D_SAE, l0=8, bandwidth=0.5, init_threshold=0.05, pre_act_coef=0.0, seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    step_beside_autograd_under_autocast(sae, x, autograd_losses, dtype)
    assert dense_steps == [1]


@pytest.mark.parametrize("per_token", [False, True], ids=["batch-mean", "per-token"])
def test_l0_penalty_gradient_written_out_is_autograds(per_token):
    """The steps' written-out gradient of the L0 penalty (`jumprelu._l0_penalty_grad`) is autograd's of
    `_l0_penalty`, for the batch's mean L0 (a scalar) and for each token's [n] (the mean over tokens)."""
    l0 = torch.tensor([3.0, 9.5, 12.0, 0.0, 7.25]) if per_token else torch.tensor(11.5)
    l0.requires_grad_(True)
    coef, g_loss = torch.tensor(0.03), torch.tensor(1.7)
    (jumprelu._l0_penalty(l0, 8.0, coef) * g_loss).backward()
    written = jumprelu._l0_penalty_grad(g_loss, l0.detach(), 8.0, coef)
    torch.testing.assert_close(written, l0.grad, rtol=1e-6, atol=0.0)
