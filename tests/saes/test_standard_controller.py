"""The L0 controller of the penalty SAEs with a trend hold (`PenaltySAE.coef_trend_horizon`, the standard
SAE's): λ is held while the L0 falls toward its target on its own and integrated when the L0 stalls, and
the held state survives a checkpoint. Pure arithmetic on StepOutputs, well under a second."""

import math

import torch

from helpers.saes.base import StepOutput, adapt_coefficient
from helpers.saes.standard import StandardSAE


def step_with_l0(sae: StandardSAE, l0: float, n: int = 100) -> None:
    """One controller update as after a training step whose batch of n tokens had mean L0 `l0`."""
    fired = torch.zeros(sae.d_sae, dtype=torch.int64)
    fired[0] = round(l0 * n)
    sae.after_step(StepOutput(torch.tensor(0.0), {}, torch.zeros(n, sae.d_in), fired))


def test_lambda_is_held_while_the_l0_falls_toward_its_target_on_its_own():
    sae = StandardSAE(8, 64, sparsity_coef=5.0, l0=4)
    start = float(sae.sparsity_coef)
    for l0 in (60, 48, 38, 30, 24, 19, 15, 12, 10, 8.5, 7.2, 6.2):  # a fall of ~17% a step, as early on
        step_with_l0(sae, l0)
    assert float(sae.sparsity_coef) == start


def test_lambda_is_integrated_when_the_l0_stalls_above_its_target():
    sae, plain = StandardSAE(8, 64, sparsity_coef=5.0, l0=4), torch.tensor(5.0)
    for _ in range(30):
        step_with_l0(sae, 40)  # a plateau 10x the target: no trend
    for _ in range(29):  # the first step holds (no trend yet); the rest integrate as without the hold
        adapt_coefficient(plain, 40, 4, sae.coef_rate)
    assert float(sae.sparsity_coef) > 5.0 * math.exp(0.5)
    assert float(sae.sparsity_coef) == float(plain)


def test_lambda_comes_down_when_the_l0_keeps_falling_below_its_target():
    sae = StandardSAE(8, 64, sparsity_coef=5.0, l0=8)
    for l0 in (9.0, 8.5, 8.0, 7.5, 7.0, 6.5, *[6.0] * 20):
        step_with_l0(sae, l0)
    assert float(sae.sparsity_coef) < 5.0


def test_the_l0_average_is_checkpointed_and_old_checkpoints_load():
    sae = StandardSAE(8, 64, sparsity_coef=5.0, l0=4)
    for l0 in (60, 50, 40):
        step_with_l0(sae, l0)
    state = sae.state_dict()
    again = StandardSAE(8, 64, sparsity_coef=5.0, l0=4)
    again.load_state_dict(state)
    assert float(again.log_l0_average) == float(sae.log_l0_average)
    old = {k: v for k, v in state.items() if k != "log_l0_average"}  # from before the trend hold
    fresh = StandardSAE(8, 64, sparsity_coef=5.0, l0=4)
    fresh.load_state_dict(old)
    assert math.isinf(float(fresh.log_l0_average))


def test_the_lead_term_lowers_lambda_before_a_falling_l0_crosses_its_target():
    plain = StandardSAE(8, 64, sparsity_coef=5.0, l0=8)
    lead = StandardSAE(8, 64, sparsity_coef=5.0, l0=8, coef_lead_steps=20)
    for l0 in (14.0, 13.0, 12.2, 11.5, 11.0, 10.5, 10.1, 9.8, 9.5, 9.2):  # within 2x, falling ~4% a step
        step_with_l0(plain, l0)
        step_with_l0(lead, l0)
    assert float(plain.sparsity_coef) >= 5.0  # held (after a rise while the trend was still slow)
    assert float(lead.sparsity_coef) < 5.0  # projected 20 steps on, the L0 is below its target
    far = StandardSAE(8, 64, sparsity_coef=5.0, l0=4, coef_lead_steps=20)
    for l0 in (60, 48, 38, 30, 24, 19, 15, 12, 10):  # more than 2x above: the plain hold
        step_with_l0(far, l0)
    assert float(far.sparsity_coef) == 5.0
