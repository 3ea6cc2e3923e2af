"""A penalty SAE's L0 controller resumes from a checkpoint as it trained: its lead term (`coef_lead_steps`) is
in the SAE's state, so a resumed run keeps it whatever today's default is, and a checkpoint from before it
was stored (a hand-made old-style state dict) goes on with the lead it trained with. Pure arithmetic on
StepOutputs, well under a second."""

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


def test_a_checkpoint_from_before_the_lead_resumes_without_it():
    """The standard SAE's default (low start: d_sae 512 > 2 · 10 · l0) now leads by 40 steps; an old-style
    state dict (no coef_lead_steps) must go on as its run did, with no lead."""
    trained = StandardSAE(8, 512, l0=8, coef_lead_steps=0.0)  # the run as it was before the lead existed
    lambdas_after(trained, FALL[:6])
    old = {k: v for k, v in trained.state_dict().items() if k != "coef_lead_steps"}
    resumed = StandardSAE(8, 512, l0=8)
    assert float(resumed.coef_lead_steps) == 40.0, "today's default, for a fresh run"
    resumed.load_state_dict(old)
    assert float(resumed.coef_lead_steps) == 0.0
    assert lambdas_after(resumed, FALL[6:]) == lambdas_after(trained, FALL[6:])


def test_a_stored_lead_wins_over_the_constructor_default():
    trained = StandardSAE(8, 512, l0=8)  # lead 40
    lambdas_after(trained, FALL[:6])
    resumed = StandardSAE(8, 512, l0=8, coef_lead_steps=0.0)  # as if the default had changed since
    resumed.load_state_dict(trained.state_dict())
    assert float(resumed.coef_lead_steps) == 40.0
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
