"""Matryoshka BatchTopK's `inner_weight`: each inner prefix's MSE enters the loss times it, the full width's
once. Checked against SAELens's own `MatryoshkaBatchTopKTrainingSAE` on the same weights: its loss is the
full width's MSE + its `inner_mse_loss_<width>` terms + AuxK, so ours at weight w must equal its full MSE +
w × its inner terms + its AuxK, in value and in gradients (w = 1: SAELens's loss itself). The default is
0.5 (the module docstring has the ablation)."""

from __future__ import annotations

import pytest
import torch

from helpers.saes.matryoshka_batchtopk import MatryoshkaBatchTopKSAE
from tests.saes.test_matryoshka_auxk import D_IN, D_SAE, WIDTHS, K, twins

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("weight", [None, 1.0, 0.25, 0.0], ids=["default", "1", "0.25", "0"])
def test_inner_prefixes_weighted_against_saelens(weight):
    from sae_lens.saes.sae import TrainStepInput

    dead = torch.arange(D_SAE) % 7 == 0
    ours, theirs = twins(dead)
    if weight is None:  # the default, built as train_sae builds it
        ours.inner_weight = MatryoshkaBatchTopKSAE(D_IN, D_SAE, l0=K, matryoshka_widths=WIDTHS).inner_weight
        weight = 0.5
    else:
        ours.inner_weight = weight
    x = torch.randn(128, D_IN, generator=torch.Generator().manual_seed(1)) + 0.2
    out = ours.losses(x, dead)
    out.loss.backward()
    step = TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    ref = theirs.training_forward_pass(step)
    inner = sum(v for name, v in ref.losses.items() if name.startswith("inner_mse_loss_"))
    assert len([n for n in ref.losses if n.startswith("inner_mse_loss_")]) == len(WIDTHS) - 1
    expected = ref.losses["mse_loss"] + weight * inner + ref.losses["auxiliary_reconstruction_loss"]
    expected.backward()
    torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=1e-5, atol=0)
    for name in ("W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(
            getattr(ours, name).grad, getattr(theirs, name).grad, rtol=1e-4, atol=1e-6, msg=name
        )
    torch.testing.assert_close(ours.W_enc_T.grad, theirs.W_enc.grad.t(), rtol=1e-4, atol=1e-6)


def test_inner_weight_out_of_range_is_refused():
    with pytest.raises(ValueError, match="inner_weight must be in"):
        MatryoshkaBatchTopKSAE(D_IN, D_SAE, l0=K, matryoshka_widths=WIDTHS, inner_weight=1.5)
