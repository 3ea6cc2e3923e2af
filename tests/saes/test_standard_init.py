"""The standard SAE's initial L0 (`init_l0_mult`): the trainer's init sample sets one common offset of b_enc
so the L0 starts at the chosen multiple of the target, on the sample and on fresh tokens alike; without the
option b_enc stays 0. A tiny SAE on one thread, well under a second."""

import pytest
import torch

from helpers.saes.standard import StandardSAE
from helpers.saes.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny products: two threads spin under load


def tokens(n: int, seed: int) -> torch.Tensor:
    """Correlated, non-centred activations [n, 32] with a few large directions, as a residual stream."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, 32, generator=torch.Generator().manual_seed(7)) * torch.linspace(0.2, 3, 32)
    return torch.randn(n, 32, generator=g) @ mix + 2.0


def mean_l0(sae: StandardSAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae.encode(x)[0] > 0).sum(-1).float().mean())


@pytest.mark.parametrize("mult", [2.0, 8.0])
def test_the_initial_l0_lands_at_the_chosen_multiple_of_the_target(mult):
    cfg = TrainConfig(
        architecture="standard",
        expansion=8,
        l0=4,
        train_tokens=4096,
        init_tokens=2048,
        sae_options={"init_l0_mult": mult},
    )
    run = Trainer(cfg, 32)
    default = Trainer(TrainConfig(architecture="standard", expansion=8, l0=4, train_tokens=4096), 32)
    x0, fresh = tokens(2048, 0), tokens(4096, 1)
    run.init_from_data(x0)
    default.init_from_data(x0)
    assert mean_l0(run.sae, x0 * run.scale) == pytest.approx(4 * mult, abs=0.05)
    assert mean_l0(run.sae, fresh * run.scale) == pytest.approx(4 * mult, rel=0.1)
    assert run.sae.b_enc.unique().numel() == 1 and float(run.sae.b_enc.detach()[0]) < 0  # one common offset
    assert torch.equal(default.sae.b_enc, torch.zeros(256))
    assert mean_l0(default.sae, x0 * default.scale) > 64  # near d_sae / 2 without the option


def test_the_initial_l0_is_capped_at_half_the_latents_and_a_bad_multiple_is_refused():
    sae = StandardSAE(32, 64, l0=16, init_l0_mult=100.0)
    x = tokens(512, 2)
    sae.init_from_sample(x, total_steps=10)
    assert mean_l0(sae, x) == pytest.approx(32, abs=0.05)
    with pytest.raises(ValueError, match="init_l0_mult must be > 0"):
        StandardSAE(32, 64, l0=16, init_l0_mult=0.0)


def test_per_latent_offsets_start_every_latent_on_the_same_share_of_tokens():
    sae = StandardSAE(32, 256, l0=4, init_l0_mult=8.0, init_l0_per_latent=True)
    x = tokens(2048, 3)
    sae.init_from_sample(x, total_steps=10)
    with torch.no_grad():
        share = (sae.encode(x)[0] > 0).float().mean(0)  # [d_sae]: each latent's firing share
    assert share.min() > 0.1 and share.max() < 0.15  # all at 32 / 256 = 0.125 (one token's rounding)
    assert mean_l0(sae, x) == pytest.approx(32, abs=0.5)
