"""The Gated SAE's λ controller: its defaults (λ from 0.1, the trend hold with horizon 50, the lead term 40
steps, "far" beyond 4x the target; bench/results/gated_ablations_cpu_controller_screen.json) and what they do
on a scripted L0 sequence: λ held while the L0 falls fast toward the target from far above, raised once the
fall slows within 4x of it (with "far" at 2x it would stay held), lowered when the L0 sits below it. No
training: after_step on fixed counts."""

from __future__ import annotations

import torch

from helpers.saes import GatedSAE
from helpers.saes.base import StepOutput

N_TOKENS = 10


def step(sae: GatedSAE, l0: float) -> float:
    """One controller update at this batch L0; λ afterwards."""
    fired = torch.zeros(sae.d_sae, dtype=torch.int64)
    fired[0] = round(l0 * N_TOKENS)
    out = StepOutput(torch.tensor(0.0), {}, torch.zeros(N_TOKENS, sae.d_in), fired)
    sae.after_step(out)
    return float(sae.sparsity_coef)


def test_the_defaults_are_the_screened_controller():
    sae = GatedSAE(8, 64, l0=4)
    assert (sae.coef_trend_horizon, sae.coef_lead_steps, sae.COEF_FAR) == (50.0, 40.0, 4.0)
    assert float(sae.sparsity_coef) == torch.tensor(0.1).item()
    assert sae.coef_rate == 0.02


def test_lambda_is_held_in_the_fall_raised_when_it_stalls_and_lowered_below_the_target():
    sae = GatedSAE(8, 4096, l0=10)
    start = float(sae.sparsity_coef)
    fall = [2000 * 0.8**t for t in range(25)]  # 2000 -> ~9.4: fast, toward the target
    held = [step(sae, l0) for l0 in fall if l0 > 40]  # far (beyond 4x) or fast enough: held
    assert held == [start] * len(held)
    sae = GatedSAE(8, 4096, l0=10)
    stalled = [step(sae, 30 * 0.995**t) for t in range(40)]  # 3x the target, falling slowly: integrate
    assert stalled[-1] > start * 1.2 and stalled == sorted(stalled)
    below = [step(sae, 5.0) for _ in range(80)]  # half the target, flat: λ comes down
    assert below[-1] < stalled[-1] and below[-1] < below[0]
