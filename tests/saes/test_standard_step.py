"""The standard SAE's training step (its written-out dense backward, its sparse path, `kernels.row_norms`)
trains to the same weights as the paper's loss through plain autograd, step after step, including under
autocast. Tiny SAEs on a synthetic sparse world, no model: about a second in all."""

from __future__ import annotations

import types

import pytest
import torch

from helpers.saes import kernels
from helpers.saes.base import StepOutput
from helpers.saes.standard import StandardSAE
from helpers.saes.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN, D_SAE = 16, 64


def world(n: int, seed: int = 0) -> torch.Tensor:
    """[n, D_IN]: 4 of 48 random unit directions per token with positive magnitudes, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(48, D_IN, generator=g), dim=1)
    codes = torch.zeros(n, 48)
    codes.scatter_(
        1, torch.rand(n, 48, generator=g).topk(4, dim=1).indices, 1 + torch.rand(n, 4, generator=g)
    )
    return codes @ dictionary + 0.5 + 0.05 * torch.randn(n, D_IN, generator=g)


def autograd_losses(sae: StandardSAE, x: torch.Tensor, dead: torch.Tensor) -> StepOutput:
    """SAELens's standard loss as written, every gradient from autograd."""
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    terms = {"mse": mse.detach(), "l1": l1.detach()}
    return StepOutput(mse + sae.sparsity_coef * l1, terms, x_hat.detach(), (f > 0).sum(0))


def recorded_gradients(run: Trainer) -> list[torch.Tensor]:
    """A list that holds the gradients Adam steps on (after clipping) at the trainer's latest step."""
    grads: list[torch.Tensor] = []

    def record(*_):
        grads[:] = [p.grad.clone() for p in run.sae.parameters()]

    run.opt.register_step_pre_hook(record)
    return grads


def train_beside_autograd(
    cfg: TrainConfig, x: torch.Tensor, autograd, each_step=None
) -> tuple[Trainer, Trainer]:
    """Two trainers of `cfg` on the batches of x (the first 1024 tokens to initialise), `plain`'s losses by
    `autograd` (sae, x, dead) -> StepOutput: the same firing counts, loss and clipped gradients at every
    step (`each_step(ours' gradients)` checks more) and the same weights at the end. (ours, plain)."""
    ours, plain = Trainer(cfg, D_IN), Trainer(cfg, D_IN)
    plain.sae.losses = types.MethodType(autograd, plain.sae)
    for run in (ours, plain):
        run.init_from_data(x[:1024])
    grads = {run: recorded_gradients(run) for run in (ours, plain)}
    for batch in x.split(cfg.batch_size):
        a, b = ours.train_step(batch), plain.train_step(batch)
        assert torch.equal(a.fired, b.fired)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        for g, ref, (name, _) in zip(grads[ours], grads[plain], ours.sae.named_parameters(), strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=f"step {ours.step}: d {name}")
        if each_step is not None:
            each_step(grads[ours])
    for name, p in plain.sae.named_parameters():
        torch.testing.assert_close(getattr(ours.sae, name), p, rtol=1e-4, atol=1e-5, msg=name)
    return ours, plain


def step_beside_autograd_under_autocast(
    sae, x: torch.Tensor, autograd, dtype: torch.dtype
) -> list[StepOutput]:
    """One step of `sae`'s own losses and one of `autograd` (sae, x, dead) -> StepOutput, forward and backward
    under CPU autocast in `dtype` (as custom_bwd runs the backward on a GPU), no latent dead: the same loss
    within its rounding and float32 gradients close to autograd's. [ours, autograd's] outputs."""
    grads, outs = [], []
    for step in (type(sae).losses, autograd):
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            out = step(sae, x, torch.zeros(sae.d_sae, dtype=torch.bool))
            out.loss.backward()
        grads.append({n: p.grad for n, p in sae.named_parameters()})
        outs.append(out)
    torch.testing.assert_close(outs[0].loss.detach(), outs[1].loss.detach(), rtol=0.02, atol=0.0)
    for name, g in grads[0].items():
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, grads[1][name], rtol=0.05, atol=0.02 * float(g.abs().max()), msg=name)
    return outs


@pytest.mark.parametrize("dense", [True, False], ids=["dense-step", "sparse-step"])
def test_training_ends_where_autograd_of_the_plain_loss_ends(dense, monkeypatch):
    """Ten steps of the real trainer (Adam, clipping, the λ controller): the same weights within float
    tolerance, the same L0 at every step, whichever path the step takes."""
    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0 if dense else 1.0)
    x = world(2560)
    cfg = TrainConfig(
        architecture="standard", expansion=D_SAE // D_IN, l0=4, train_tokens=2560, batch_size=256
    )
    ours, plain = train_beside_autograd(cfg, x, autograd_losses)
    assert 0.02 < ours.history[-1]["l0"] / D_SAE < 0.5  # both paths had real work: neither empty nor full
    assert float(ours.sae.sparsity_coef) == pytest.approx(float(plain.sae.sparsity_coef), rel=1e-6)


@pytest.mark.parametrize("dense", [True, False], ids=["dense-step", "sparse-step"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_under_autocast_gives_float32_gradients_close_to_autograds(dtype, dense, monkeypatch):
    """Autocast (a T4 trains in float16, newer GPUs in bfloat16; CPU autocast takes the same code): the
    products in low precision, the gradients back in the parameters' float32, within its rounding of
    autograd's; inputs large enough that the batch's penalty sum overflows float16 (65504) unless it is
    summed in float32."""
    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0 if dense else 1.0)
    x = world(256, seed=1) * 40
    sae = StandardSAE(D_IN, D_SAE, l0=4, seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        sae.W_dec.mul_(10)  # rows of norm 1 (not 0.1): the penalty sum grows 100x
        sae.W_enc_T.mul_(10)
    grads, terms = [], []
    for losses in (StandardSAE.losses, autograd_losses):
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            out = losses(sae, x, torch.zeros(D_SAE, dtype=torch.bool))
        out.loss.backward()
        grads.append({n: p.grad for n, p in sae.named_parameters()})
        terms.append(out.terms)
    assert float(terms[1]["l1"]) * len(x) > 65504  # the overflow this guards against would happen
    for name in ("mse", "l1"):
        torch.testing.assert_close(terms[0][name], terms[1][name], rtol=0.02, atol=0.0, msg=name)
    for name, g in grads[0].items():
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, grads[1][name], rtol=0.05, atol=0.02 * float(g.abs().max()), msg=name)


def test_row_norms_gradient_is_autograds_and_zero_for_a_zero_row():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    w[2] = 0
    g = torch.randn(6, generator=torch.Generator().manual_seed(1))
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    (kernels.row_norms(ours) * g).sum().backward()
    (ref.norm(dim=1) * g).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad)
    assert not ours.grad[2].any()


def test_a_second_forward_before_the_first_backward_fails_rather_than_mixing_the_batches(monkeypatch):
    """The pre-activations go into a buffer reused from step to step: the first loss's backward, after a
    second forward overwrote it, raises autograd's in-place error instead of using the second batch."""
    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0)
    sae, x = StandardSAE(D_IN, D_SAE, l0=4), world(64)
    first = sae.losses(x, torch.zeros(D_SAE, dtype=torch.bool))
    sae.losses(x * 2, torch.zeros(D_SAE, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.loss.backward()
