"""The standard SAE's λ warm-up (`coef_warmup_steps`, SAELens's `l1_warm_up_steps`): the loss weighs the
penalty by λ · (t + 1) / W at step t of the first W, then by λ; the step count travels in checkpoints.
A tiny SAE on one thread, well under a second."""

import pytest
import torch

from helpers.saes.standard import StandardSAE
from helpers.saes.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny products: two threads spin under load


def penalty_weights(warmup: int, steps: int) -> tuple[list[float], Trainer]:
    """The penalty's weight in each step's loss, (loss - mse) / l1, with λ held (coef_rate 0)."""
    cfg = TrainConfig(
        architecture="standard",
        expansion=4,
        l0=4,
        train_tokens=64 * steps,
        batch_size=64,
        init_tokens=256,
        sae_options={"coef_warmup_steps": warmup, "coef_rate": 0.0, "sparsity_coef": 2.0},
    )
    run = Trainer(cfg, 16)
    x = torch.randn(256 + 64 * steps, 16, generator=torch.Generator().manual_seed(0)) + 1.0
    run.init_from_data(x[:256])
    weights = []
    for batch in x[256:].split(64):
        out = run.train_step(batch)
        weights.append(float((out.loss.detach() - out.terms["mse"]) / out.terms["l1"]))
    return weights, run


def test_the_penalty_ramps_linearly_then_stays_at_lambda():
    weights, run = penalty_weights(warmup=4, steps=6)
    assert weights == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0], rel=1e-5)
    assert int(run.sae.steps_trained) == 6
    assert penalty_weights(warmup=0, steps=2)[0] == pytest.approx([2.0, 2.0], rel=1e-5)


def test_the_step_count_survives_a_checkpoint_and_a_bad_warmup_is_refused():
    _, run = penalty_weights(warmup=4, steps=2)
    state = run.sae.state_dict()
    fresh = StandardSAE(16, 64, l0=4, sparsity_coef=2.0, coef_warmup_steps=4)
    fresh.load_state_dict(state)
    assert int(fresh.steps_trained) == 2 and float(fresh.penalty_coef()) == pytest.approx(1.5)
    del state["steps_trained"]  # a checkpoint from before the counter: it starts afresh
    fresh.load_state_dict(state)
    assert int(fresh.steps_trained) == 0
    with pytest.raises(ValueError, match="coef_warmup_steps must be >= 0"):
        StandardSAE(16, 64, l0=4, coef_warmup_steps=-1)
