"""JumpReLU's thresholds learn at the trainer's learning rate for their first `threshold_slow_after` steps
(400), then at `threshold_lr_scale` times it (1/3): θ's Adam step is scaled and nothing else changes; a
short run's speed-up replaces the scale while it acts; runs of up to 400 steps train as before; the step
count survives a checkpoint. Bad values fail naming the fix."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import JumpReLUSAE
from helpers.saes.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny steps: two threads spin under load


def one_step(steps: int, taken: int = 0, **sae_options) -> tuple[dict, dict]:
    """The SAE's parameters after `init_from_data` and after one training step (d_in 16, 64 latents, target
    L0 6, a run of `steps` steps of 64 tokens), counted as its step `taken` + 1."""
    x = torch.randn(1024, 16, generator=torch.Generator().manual_seed(0)) + 0.3
    cfg = TrainConfig(
        architecture="jumprelu",
        expansion=4,
        l0=6,
        train_tokens=steps * 64,
        batch_size=64,
        sae_options=sae_options,
    )
    trainer = Trainer(cfg, 16)
    trainer.init_from_data(x)
    trainer.sae.steps_trained.fill_(taken)
    before = {k: v.detach().clone() for k, v in trainer.sae.named_parameters()}
    trainer.train_step(x[:64])
    return before, {k: v.detach().clone() for k, v in trainer.sae.named_parameters()}


def test_after_the_slow_down_only_the_threshold_step_is_scaled():
    """~0.1 s. A 1,000-step run (no speed-up) at its step 401: θ's step is exactly 1/3 of Adam's."""
    before, full = one_step(1000, 400, threshold_lr_scale=1.0)
    before_slow, slow = one_step(1000, 400)
    assert JumpReLUSAE(16, 64).threshold_lr_scale == pytest.approx(1 / 3)
    for name in full:
        assert torch.equal(before[name], before_slow[name]), "the same start"
        if name != "threshold":
            assert torch.equal(full[name], slow[name]), f"{name} moves as at the full rate"
    step_full, step_slow = full["threshold"] - before["threshold"], slow["threshold"] - before["threshold"]
    moved = (step_full.abs() > 1e-5).float().mean()  # by Adam's first step, lr 2e-5 (the warm-up's first)
    assert moved > 0.5, "most θ moved in one step"
    torch.testing.assert_close(step_slow, step_full / 3, rtol=1e-4, atol=1e-7)


def test_before_the_slow_down_thresholds_train_at_the_trainer_rate():
    """~0.1 s. The default's step 400 is bitwise that of θ at the trainer's rate (runs of up to 400 steps,
    such as bench/sae_train.py's, are unchanged)."""
    _, default = one_step(1000, 399)
    _, full = one_step(1000, 399, threshold_lr_scale=1.0)
    assert all(torch.equal(default[name], full[name]) for name in full)


def test_the_short_run_speed_up_replaces_the_scale_while_far_off_target():
    """~0.1 s. 16 steps: speed-up 8 (256 / 16, capped); θ from 0.001 puts the first batch's L0 far above 6."""
    before, fast = one_step(16, 400, init_threshold=0.001, threshold_lr_scale=0.5)
    before_full, full = one_step(16, init_threshold=0.001, threshold_lr_scale=1.0)
    assert torch.equal(before["threshold"], before_full["threshold"])
    torch.testing.assert_close(fast["threshold"], full["threshold"], rtol=1e-5, atol=1e-7)


def test_the_step_count_is_kept_in_checkpoints_and_absent_from_old_ones():
    sae = JumpReLUSAE(16, 64, l0=6)
    sae.steps_trained.fill_(1234)
    state = sae.state_dict()
    resumed = JumpReLUSAE(16, 64, l0=6)
    resumed.load_state_dict(state)
    assert int(resumed.steps_trained) == 1234
    del state["steps_trained"]  # a checkpoint from before it existed counts from its resumption
    resumed.load_state_dict(state)
    assert int(resumed.steps_trained) == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"threshold_lr_scale": 0.0}, "threshold_lr_scale must be a number > 0"),
        ({"threshold_lr_scale": float("nan")}, "threshold_lr_scale must be a number > 0"),
        ({"threshold_slow_after": -1}, "threshold_slow_after must be >= 0"),
    ],
)
def test_bad_values_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        JumpReLUSAE(16, 64, **bad)
