"""JumpReLU's thresholds start from the data at the target L0, and a short run lands near its target: the
32-step smoke-size run of notebook 03 used to end with its L0 ~28x the target (443.7 of 1,152 latents,
target 16) and features firing in every window."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import JumpReLUSAE
from helpers.saes.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny steps: two threads spin under load


def sparse_world(n: int, d_in: int = 64, n_features: int = 256) -> torch.Tensor:
    """[n, d_in] activations: ~3% of 256 random directions per token with uniform magnitudes, plus an
    offset (the tiny stand-in for a residual stream: sparse structure, a non-zero mean)."""
    dictionary = torch.randn(n_features, d_in, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    magnitudes = torch.rand(n, n_features, generator=g) * (torch.rand(n, n_features, generator=g) < 0.03)
    return magnitudes @ dictionary + 0.5


def test_each_threshold_starts_at_its_latents_share_of_the_init_sample():
    sae = JumpReLUSAE(16, 64, l0=6, seed=0)
    with torch.no_grad():  # a non-trivial encoder and b_dec, as training would have them
        sae.W_enc_T.copy_(torch.randn(64, 16, generator=torch.Generator().manual_seed(2)))
        sae.b_enc.copy_(0.1 * torch.randn(64, generator=torch.Generator().manual_seed(3)))
        sae.b_dec.fill_(0.2)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(4))
    sae.init_from_sample(x, total_steps=1000)
    fired = (sae.encode(x)[0] > 0).sum(0)
    assert fired.tolist() == [48] * 64, "each latent fires on 512 * 6 / 64 tokens of the sample"
    assert float(sae.threshold_speedup) == 1.0, "a 1,000-step run gets no speed-up"
    sae.init_from_sample(x, total_steps=64)
    assert float(sae.threshold_speedup) == 4.0, "256 / 64"
    fixed = JumpReLUSAE(16, 64, l0=6, init_threshold=0.01)
    fixed.init_from_sample(x, total_steps=1000)
    assert torch.equal(fixed.threshold, torch.full((64,), 0.01)), "an explicit init_threshold is kept"


def test_speedup_is_kept_in_checkpoints_and_absent_from_old_ones():
    sae = JumpReLUSAE(16, 64, l0=6)
    sae.init_from_sample(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)), total_steps=16)
    state = sae.state_dict()
    assert float(state["threshold_speedup"]) == JumpReLUSAE.MAX_SPEEDUP, "256 / 16 capped"
    resumed = JumpReLUSAE(16, 64, l0=6)
    resumed.load_state_dict(state)
    assert float(resumed.threshold_speedup) == JumpReLUSAE.MAX_SPEEDUP
    del state["threshold_speedup"]  # a checkpoint from before it existed trained without it
    resumed.load_state_dict(state)
    assert float(resumed.threshold_speedup) == 1.0


def short_run_l0(**sae_options) -> float:
    """Held-out L0 after 32 steps of 64 tokens (d_in 64, 256 latents, target 8), as notebook 03's smoke
    run trains (its 2,048 tokens at batch 64)."""
    x = sparse_world(32 * 64 + 2048)
    cfg = TrainConfig(
        architecture="jumprelu",
        expansion=4,
        l0=8,
        train_tokens=32 * 64,
        batch_size=64,
        sae_options=sae_options,
    )
    trainer = Trainer(cfg, 64)
    trainer.init_from_data(x[:1024])
    for i in range(cfg.total_steps):
        trainer.train_step(x[i * 64 : (i + 1) * 64])
    with torch.no_grad():
        return float((trainer.sae.encode(x[-2048:] * trainer.scale)[0] > 0).sum(1).float().mean())


def test_a_short_run_lands_within_2x_of_its_target_l0():
    """~1.5 s (one thread, loaded machine). Before (θ from 0.001, no speed-up) the same run ended at L0 ~140
    of 256, 18x its target."""
    assert 4 <= short_run_l0() <= 16
    assert short_run_l0(init_threshold=0.001, threshold_speedup_steps=0) > 64, "the old start is still far"
