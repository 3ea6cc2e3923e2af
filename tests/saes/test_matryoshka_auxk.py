"""Matryoshka BatchTopK's training loss is SAELens's: the same weights, batch and dead latents give SAELens
6.x's `MatryoshkaBatchTopKTrainingSAE` (its sparse path, as the benches train it; `aux_loss_coefficient`
1, its default) the same prefix losses, the same AuxK term (unnormalised, times min(n_dead / k_aux, 1))
and the same gradients. One difference is left out by giving the dead latents positive pre-activations:
SAELens feeds the top k_aux dead pre-activations to AuxK as they are, negative ones included; ours ReLUs
them, as OpenAI's reference does. TopK's and BatchTopK's AuxK keep OpenAI's form, divided by the residual
error's variance."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import kernels
from helpers.saes.base import auxk_loss
from helpers.saes.batchtopk import BatchTopKSAE
from helpers.saes.matryoshka_batchtopk import MatryoshkaBatchTopKSAE

D_IN, D_SAE, K, WIDTHS = 16, 64, 4, [4, 16, 64]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def twins(dead: torch.Tensor):
    """Our SAE (default AuxK coefficient; inner prefixes at weight 1, SAELens's plain sum) and SAELens's
    with the same non-trivial weights; the `dead` latents' encoder biases raised so their pre-activations
    are positive."""
    import sae_lens

    g = torch.Generator().manual_seed(0)
    ours = MatryoshkaBatchTopKSAE(D_IN, D_SAE, l0=K, matryoshka_widths=WIDTHS, inner_weight=1.0, seed=3)
    with torch.no_grad():
        ours.W_dec.mul_(0.5 + torch.rand(D_SAE, 1, generator=g))
        # the dead latents: small encoder rows and a bias of 1, so their pre-activations stay positive
        ours.W_enc_T.copy_(torch.randn(D_SAE, D_IN, generator=g) * torch.where(dead, 0.03, 0.3)[:, None])
        ours.b_enc.copy_(0.05 * torch.randn(D_SAE, generator=g) + 1.0 * dead)
        ours.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
    theirs = sae_lens.MatryoshkaBatchTopKTrainingSAE(
        sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=K,
            matryoshka_widths=WIDTHS,
            use_sparse_activations=True,  # its sparse path, as bench/saelens_setup.py trains it, which
            rescale_acts_by_decoder_norm=False,  # needs this off (ours selects by the raw activations)
            dtype="float32",
        )
    )
    with torch.no_grad():
        for name in ("W_dec", "b_enc", "b_dec"):
            getattr(theirs, name).copy_(getattr(ours, name))
        theirs.W_enc.copy_(ours.W_enc_T.t())
    return ours, theirs


@pytest.mark.parametrize(
    "n_dead",
    [5, 24, 40],  # k_aux 8: every dead latent; the top 8 of a dense block (<= 3 k_aux); the sparse kernels
    ids=["fewer-dead-than-k_aux", "more-dead-than-k_aux", "many-more-dead-than-k_aux"],
)
@pytest.mark.parametrize("dense", [False, True], ids=["sparse-path", "dense-path"])
def test_loss_and_gradients_equal_saelens(n_dead, dense, monkeypatch):
    from sae_lens.saes.sae import TrainStepInput

    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0 if dense else 1.0)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    ours, theirs = twins(dead)
    assert ours.auxk_coef == 1.0 and ours.k_aux == D_IN // 2
    x = torch.randn(128, D_IN, generator=torch.Generator().manual_seed(1)) + 0.2
    out = ours.losses(x, dead)
    out.loss.backward()
    step = TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    ref = theirs.training_forward_pass(step)
    ref.loss.backward()
    aux = ref.losses["auxiliary_reconstruction_loss"].detach()
    assert float(aux) > 0.01 * float(ref.loss.detach()), "the AuxK term is in play"
    torch.testing.assert_close(out.terms["auxk"], aux, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=0)
    for name in ("W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(
            getattr(ours, name).grad, getattr(theirs, name).grad, rtol=1e-4, atol=1e-6, msg=name
        )
    torch.testing.assert_close(ours.W_enc_T.grad, theirs.W_enc.grad.t(), rtol=1e-4, atol=1e-6)


def test_batchtopk_keeps_the_variance_normalised_auxk():
    """The control: BatchTopK's AuxK term is auxk_loss (OpenAI's form), which Matryoshka's differs from by
    the residual's variance times min(n_dead / k_aux, 1)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(128, D_IN, generator=g) * 2 + 0.2
    dead = torch.arange(D_SAE) % 8 == 0  # 8 dead = k_aux: the factor is the variance alone
    plain = BatchTopKSAE(D_IN, D_SAE, l0=K, seed=3)
    nested = MatryoshkaBatchTopKSAE(D_IN, D_SAE, l0=K, matryoshka_widths=WIDTHS, seed=3)
    out_plain, out_nested = plain.losses(x, dead), nested.losses(x, dead)
    with torch.no_grad():
        pre = (x - plain.b_dec) @ plain.W_enc + plain.b_enc
        e = x - out_plain.x_hat
        expected = auxk_loss(plain, x, pre, dead, e, plain.k_aux)
        variance = (e - e.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out_plain.terms["auxk"], expected, rtol=1e-5, atol=0)
    # same weights and selection, so the same residual: Matryoshka's term is BatchTopK's times Var(e)
    torch.testing.assert_close(out_nested.x_hat, out_plain.x_hat, rtol=1e-5, atol=1e-6)
    assert float(variance) > 10, "the residual's variance is far from 1 here, so the two forms differ"
    torch.testing.assert_close(
        out_nested.terms["auxk"], out_plain.terms["auxk"] * variance, rtol=1e-4, atol=0
    )
