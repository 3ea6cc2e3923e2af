"""The standard SAE's L0 descent (`l0_descent`): λ is steered toward a target that falls log-linearly from
the L0 the SAE starts at (on the trainer's init sample) to `l0` over that share of the run, then stays at
`l0`; a checkpoint from before the descent resumes without one. Pure arithmetic on StepOutputs and one
init on 2,048 tokens, well under a second."""

import math

import pytest
import torch

from helpers.saes.base import StepOutput
from helpers.saes.standard import StandardSAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def step_with_l0(sae: StandardSAE, l0: float, n: int = 100) -> None:
    """One controller update as after a training step whose batch of n tokens had mean L0 `l0`."""
    fired = torch.zeros(sae.d_sae, dtype=torch.int64)
    fired[0] = round(l0 * n)
    sae.after_step(StepOutput(torch.tensor(0.0), {}, torch.zeros(n, sae.d_in), fired))


def started(l0_descent: float, total_steps: int = 100) -> StandardSAE:
    """d_sae 256, target 4: the low start, every latent at 10 x 4 = 40 on the sample."""
    sae = StandardSAE(32, 256, l0=4, l0_descent=l0_descent)
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(0)) + 1.0
    sae.init_from_sample(x, total_steps=total_steps)
    return sae


def test_the_steered_l0_falls_from_the_start_to_the_target_over_the_descent_then_stays():
    sae = started(0.5)
    start = float(sae.descent_from_l0)
    assert start == pytest.approx(40, rel=0.05) and int(sae.descent_steps) == 50
    seen = {}
    for t in range(60):
        seen[t] = sae.steering_l0()
        step_with_l0(sae, 20)
    assert seen[0] == pytest.approx(start)
    assert seen[25] == pytest.approx(math.sqrt(start * 4), rel=1e-5)  # halfway in log
    assert seen[50] == seen[59] == 4.0


def test_lambda_follows_the_descent_not_the_final_target():
    """An L0 of 20 held flat from the start: under the falling target (40 -> 4 over 100 steps) it is too
    low for the first ~30 steps, so λ comes down; steered at 4 from the start, λ rises."""
    with_descent, without = started(1.0), started(0.0)
    for _ in range(20):
        step_with_l0(with_descent, 20)
        step_with_l0(without, 20)
    assert float(with_descent.sparsity_coef) < 3.5 < float(without.sparsity_coef)


def test_a_checkpoint_from_before_the_descent_resumes_without_one():
    sae = started(0.5)
    old = {k: v for k, v in sae.state_dict().items() if not k.startswith("descent_")}
    again = StandardSAE(32, 256, l0=4)
    again.load_state_dict(old)
    assert again.steering_l0() == 4.0 and int(again.descent_steps) == 0
    resumed = StandardSAE(32, 256, l0=4)
    resumed.load_state_dict(sae.state_dict())  # a run with the descent goes on along it
    assert resumed.steering_l0() == pytest.approx(float(sae.descent_from_l0))
