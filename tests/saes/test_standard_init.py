"""The standard SAE's initial L0 (`init_l0_mult`): the trainer's init sample sets b_enc's offsets so the L0
starts at the chosen multiple of the target, on the sample and on fresh tokens alike. By default each latent
has its own offset at 10 times the target, with λ from 3.5 and coef_lead_steps 40; at or above d_sae / 2,
or with init_l0_mult None, b_enc stays 0 with λ from 2 (5 without the L0 descent) and no lead. Tiny SAEs
on one thread, ~1 s."""

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
        sae_options={"init_l0_mult": mult, "init_l0_per_latent": False},
    )
    run = Trainer(cfg, 32)
    old = {"init_l0_mult": None}
    default = Trainer(
        TrainConfig(architecture="standard", expansion=8, l0=4, train_tokens=4096, sae_options=old), 32
    )
    x0, fresh = tokens(2048, 0), tokens(4096, 1)
    run.init_from_data(x0)
    default.init_from_data(x0)
    assert mean_l0(run.sae, x0 * run.scale) == pytest.approx(4 * mult, abs=0.05)
    assert mean_l0(run.sae, fresh * run.scale) == pytest.approx(4 * mult, rel=0.1)
    assert run.sae.b_enc.unique().numel() == 1 and float(run.sae.b_enc.detach()[0]) < 0  # one common offset
    assert torch.equal(default.sae.b_enc, torch.zeros(256))
    assert mean_l0(default.sae, x0 * default.scale) > 64  # near d_sae / 2 from the old start


@pytest.mark.parametrize("options", [{}, {"init_l0_mult": 100.0}, {"init_l0_mult": None}])
def test_a_multiple_at_or_above_half_the_latents_keeps_the_old_start_and_a_bad_one_is_refused(options):
    sae = StandardSAE(32, 64, l0=16, **options)  # 10 x 16 = 160 >= 32: a tiny SAE with a high target
    x = tokens(512, 2)
    sae.init_from_sample(x, total_steps=10)
    assert not sae.low_start and torch.equal(sae.b_enc.detach(), torch.zeros(64))
    assert float(sae.sparsity_coef) == 2.0 and sae.coef_lead_steps == 0.0  # λ from 2 with the descent
    assert float(StandardSAE(32, 64, l0=16, l0_descent=0, **options).sparsity_coef) == 5.0  # 5 without
    assert mean_l0(sae, x) > 16  # near d_sae / 2
    with pytest.raises(ValueError, match="init_l0_mult must be > 0"):
        StandardSAE(32, 64, l0=16, init_l0_mult=0.0)


@pytest.mark.parametrize("d_sae, l0", [(256, 4), (64, 3)])  # 40 of 256; 30 of 64, just under d_sae / 2
def test_the_default_starts_every_latent_at_ten_times_the_target_with_its_lambda_and_lead(d_sae, l0):
    sae = StandardSAE(32, d_sae, l0=l0)
    x = tokens(2048, 4)
    sae.init_from_sample(x, total_steps=10)
    with torch.no_grad():
        fired = (sae.encode(x)[0] > 0).sum(0)  # [d_sae]: on how many sample tokens each latent fires
    assert sae.low_start and float(sae.sparsity_coef) == 3.5 and sae.coef_lead_steps == 40.0
    assert fired.min() > 0  # no latent silent on the init sample
    assert mean_l0(sae, x) == pytest.approx(10 * l0, rel=0.02)
    given = StandardSAE(32, d_sae, l0=l0, sparsity_coef=2.0, coef_lead_steps=0.0)
    assert float(given.sparsity_coef) == 2.0 and given.coef_lead_steps == 0.0  # explicit values win


def test_a_short_run_from_the_default_start_trains_toward_its_target():
    steps = 120  # ~0.2 s of CPU
    cfg = TrainConfig(
        architecture="standard", expansion=8, l0=4, train_tokens=64 * steps, batch_size=64, init_tokens=2048
    )
    run = Trainer(cfg, 32)
    x = tokens(cfg.init_tokens + 64 * steps, 5)
    run.init_from_data(x[: cfg.init_tokens])
    outs = [run.train_step(batch) for batch in x[cfg.init_tokens :].split(64)]
    first, last = (sum(o.l0 for o in part) / 10 for part in (outs[:10], outs[-10:]))
    assert run.sae.low_start and first == pytest.approx(40, rel=0.1)  # from the old start: ~126
    assert all(torch.isfinite(o.loss) for o in outs)
    assert last < 0.6 * first  # measured: 38.2 -> 17.7 (the old start ends at 17.4)
