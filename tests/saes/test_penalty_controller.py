"""A penalty SAE's L0 controller near its target (base.PenaltySAE): the rate's gain there
(`coef_near_gain`), and resuming from a checkpoint as it trained: its lead term (`coef_lead_steps`) and gain
are in the SAE's state, so a resumed run keeps them whatever today's defaults are, and a checkpoint from
before they were stored (a hand-made old-style state dict) goes on with the values it trained with. Pure
arithmetic on StepOutputs, well under a second."""

import math

import pytest
import torch

from helpers.saes.base import StepOutput
from helpers.saes.gated import GatedSAE
from helpers.saes.standard import StandardSAE

# a falling L0 within 2x of the target 8, where the lead term acts (test_standard_controller.py)
FALL = (14.0, 13.0, 12.2, 11.5, 11.0, 10.5, 10.1, 9.8, 9.5, 9.2, 9.0, 8.8)


def step_with_l0(sae, l0: float, n: int = 100) -> None:
    fired = torch.zeros(sae.d_sae, dtype=torch.int64)
    fired[0] = round(l0 * n)
    sae.after_step(StepOutput(torch.tensor(0.0), {}, torch.zeros(n, sae.d_in), fired))


def lambdas_after(sae, l0s) -> list[float]:
    out = []
    for l0 in l0s:
        step_with_l0(sae, l0)
        out.append(float(sae.sparsity_coef))
    return out


def test_near_the_target_lambda_moves_at_the_gain_times_the_rate_unless_a_crossing_is_ahead():
    """While the lead acts (within COEF_FAR of the target) and the L0 and its projection are above the target,
    each step moves log λ by gain · rate · error; with the projection below the target (the L0 falling fast
    onto it), or far from the target, by rate · error whatever the gain."""

    def move(gain: float, l0s) -> float:
        sae = StandardSAE(8, 512, l0=8, coef_near_gain=gain)
        lambdas_after(sae, l0s[:-1])
        before = float(sae.sparsity_coef)
        return math.log(lambdas_after(sae, l0s[-1:])[0] / before)

    stalled = [12.0] * 6  # 1.5x the target, no trend: nothing ahead but the target's far side
    assert move(1.0, stalled) > 0 and move(4.0, stalled) == pytest.approx(4 * move(1.0, stalled), rel=1e-3)
    assert move(4.0, FALL) == pytest.approx(move(1.0, FALL), rel=1e-4)  # 40 steps on, the L0 is below 8
    assert move(1.0, FALL) < 0
    plateau = [40.0] * 10  # 5x the target: no lead, the plain rate
    assert move(4.0, plateau) == pytest.approx(move(1.0, plateau), rel=1e-4) and move(1.0, plateau) > 0


def test_the_standard_sae_s_low_start_without_descent_defaults_to_gain_4_and_the_rest_to_1():
    assert float(StandardSAE(8, 512, l0=8, l0_descent=0).coef_near_gain) == 4.0  # 10 · 8 < 512 / 2: low start
    assert float(StandardSAE(8, 512, l0=8).coef_near_gain) == 1.0  # the descent (default) moves the target
    assert float(StandardSAE(8, 64, l0=8).coef_near_gain) == 1.0  # 10 · 8 >= 64 / 2: b_enc at 0
    assert float(StandardSAE(8, 512, l0=8, init_l0_mult=None).coef_near_gain) == 1.0


def test_a_checkpoint_from_before_the_lead_resumes_without_it():
    """The standard SAE's low start (d_sae 512 > 2 · 10 · l0) without the descent leads by 40 steps at gain
    4; an old-style state dict (neither stored) must go on as its run did, with no lead and gain 1."""
    trained = StandardSAE(8, 512, l0=8, coef_lead_steps=0.0, coef_near_gain=1.0)  # before the lead existed
    lambdas_after(trained, FALL[:6])
    stored = ("coef_lead_steps", "coef_near_gain")
    old = {k: v for k, v in trained.state_dict().items() if k not in stored}
    resumed = StandardSAE(8, 512, l0=8, l0_descent=0)
    assert (float(resumed.coef_lead_steps), float(resumed.coef_near_gain)) == (40.0, 4.0), "today's default"
    resumed.load_state_dict(old)
    assert (float(resumed.coef_lead_steps), float(resumed.coef_near_gain)) == (0.0, 1.0)
    assert lambdas_after(resumed, FALL[6:]) == lambdas_after(trained, FALL[6:])


def test_a_stored_lead_and_gain_win_over_the_constructor_defaults():
    trained = StandardSAE(8, 512, l0=8, l0_descent=0)  # lead 40, gain 4
    lambdas_after(trained, FALL[:6])
    resumed = StandardSAE(8, 512, l0=8, coef_lead_steps=0.0, coef_near_gain=2.0)  # as if defaults changed
    resumed.load_state_dict(trained.state_dict())
    assert (float(resumed.coef_lead_steps), float(resumed.coef_near_gain)) == (40.0, 4.0)
    assert lambdas_after(resumed, FALL[6:]) == lambdas_after(trained, FALL[6:])


@pytest.mark.parametrize("cls, lead", [(StandardSAE, 0.0), (GatedSAE, 40.0)])
def test_an_unstored_lead_is_the_one_each_class_trained_with(cls, lead):
    """Gated's lead (40) came with its trend hold, so its old checkpoints had it; the standard SAE's
    came after its checkpoints had the trend hold (none)."""
    sae = cls(8, 64, l0=4)
    old = {k: v for k, v in sae.state_dict().items() if k != "coef_lead_steps"}
    again = cls(8, 64, l0=4, coef_lead_steps=7.0)
    again.load_state_dict(old)
    assert float(again.coef_lead_steps) == lead
