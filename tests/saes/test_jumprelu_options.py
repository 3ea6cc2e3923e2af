"""JumpReLUSAE's `l0_penalty="token"` and `pre_act_coef` options are SAELens's JumpReLU training loss: the
same weights give SAELens 6.x's `JumpReLUTrainingSAE` ("quadratic" mode, `pre_act_loss_coefficient`) the same
loss and the same gradients. Bad option values fail naming the accepted ones."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import JumpReLUSAE, kernels

D_IN, D_SAE, TARGET, EPS = 16, 64, 6.0, 0.05


def twins(coef: float, pre_act: float | None):
    """Our SAE and SAELens's with the same non-trivial weights; SAELens's l0_coefficient c is our λ = 2c
    (its per-token penalty is c · 2/target · (L0 - target)², ours λ/target · (L0 - target)²)."""
    import sae_lens

    g = torch.Generator().manual_seed(0)
    ours = JumpReLUSAE(
        D_IN,
        D_SAE,
        l0=TARGET,
        bandwidth=EPS,
        sparsity_coef=2 * coef,
        l0_penalty="token",
        pre_act_coef=pre_act or 0.0,
        seed=3,
    )
    with torch.no_grad():
        ours.W_dec.mul_(
            0.5 + torch.rand(D_SAE, 1, generator=g)
        )  # unequal row norms: pre-act loss weighs them
        ours.W_enc_T.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.3)
        ours.b_enc.copy_(0.05 * torch.randn(D_SAE, generator=g))
        ours.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
        ours.threshold.copy_(0.3 * torch.rand(D_SAE, generator=g))
    theirs = sae_lens.JumpReLUTrainingSAE(
        sae_lens.JumpReLUTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=TARGET,
            l0_coefficient=coef,
            jumprelu_bandwidth=EPS,
            pre_act_loss_coefficient=pre_act,
            dtype="float32",
        )
    )
    with torch.no_grad():
        for name in ("W_dec", "b_enc", "b_dec", "threshold"):
            getattr(theirs, name).copy_(getattr(ours, name))
        theirs.W_enc.copy_(ours.W_enc_T.t())
    return ours, theirs


@pytest.mark.parametrize("pre_act", [None, 0.3], ids=["token-penalty", "token-penalty+pre-act"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse-path", "dense-path"])
def test_token_penalty_and_pre_act_loss_equal_saelens(pre_act, dense, monkeypatch):
    from sae_lens.saes.sae import TrainStepInput

    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0 if dense else 1.0)
    ours, theirs = twins(coef=0.7, pre_act=pre_act)
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(1)) + 0.2
    dead = torch.arange(D_SAE) % 3 == 0
    out = ours.losses(x, dead)
    out.loss.backward()
    step = TrainStepInput(
        sae_in=x, coefficients={"l0": 0.7}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    ref = theirs.training_forward_pass(step)
    ref.loss.backward()
    assert float(ref.losses["l0_loss"].detach()) > 0.1, "the L0 term is in play"
    if pre_act:
        assert float(ref.losses["pre_act_loss"].detach()) > 0.01, "the pre-activation term is in play"
        torch.testing.assert_close(
            out.terms["pre_act"], ref.losses["pre_act_loss"].detach(), rtol=1e-5, atol=0
        )
    torch.testing.assert_close(out.terms["sparsity"], ref.losses["l0_loss"].detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=0)
    grads = {
        "W_enc": ours.W_enc_T.grad.t(),
        **{n: getattr(ours, n).grad for n in ("W_dec", "b_enc", "b_dec")},
    }
    grads["threshold"] = ours.threshold.grad
    for name, grad in grads.items():
        torch.testing.assert_close(grad, getattr(theirs, name).grad, rtol=1e-4, atol=1e-6, msg=f"d/d {name}")


def test_batch_penalty_differs_from_token_penalty():
    """The default penalises the batch's mean L0 (our form), which is not the per-token mean (the control)."""
    x = torch.randn(128, D_IN, generator=torch.Generator().manual_seed(1))
    ours, _ = twins(coef=0.7, pre_act=None)
    token = float(ours.losses(x, torch.zeros(D_SAE, dtype=torch.bool)).terms["sparsity"])
    ours.l0_penalty = "batch"
    batch = float(ours.losses(x, torch.zeros(D_SAE, dtype=torch.bool)).terms["sparsity"])
    assert token > batch > 0, "per token, the spread of the L0 around its mean is penalised too"


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="l0_penalty must be 'batch' or 'token'"):
        JumpReLUSAE(8, 16, l0=4, l0_penalty="tokens")
    with pytest.raises(ValueError, match="pre_act_coef must be >= 0"):
        JumpReLUSAE(8, 16, l0=4, pre_act_coef=-1.0)
