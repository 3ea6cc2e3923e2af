"""bench/saelens_setup.py's JumpReLU settings for SAELens: the flags reach its config, and the 'l0'
threshold start makes SAELens's own initial encoder fire the target L0."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench import saelens_setup


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    saelens_setup.add_jumprelu_flags(p, ste_to_input=1, init_threshold="l0")
    return p.parse_args(list(argv))


def test_threshold_at_l0_fires_the_target_on_the_init_tokens():
    torch.manual_seed(0)
    args = parse()
    sae = saelens_setup.training_sae(
        "jumprelu", 16, 64, 4.0, l1=1.0, jumprelu=saelens_setup.jumprelu_settings(args)
    )
    assert sae.cfg.jumprelu_ste_to_input is True
    x = torch.randn(512, 16) * 3 + 1
    theta = saelens_setup.set_jumprelu_threshold(sae, args, x)
    assert theta > 0.01, "starts above SAELens's default, where about half the latents fire"
    assert sae.cfg.jumprelu_init_threshold == pytest.approx(theta)
    with torch.no_grad():
        l0 = (sae.encode(x) > 0).float().sum(1).mean()
    assert l0 == pytest.approx(4.0, abs=0.01)


def test_numeric_threshold_and_its_defaults_pass_through():
    args = parse("--saelens-jumprelu-ste-to-input", "0", "--saelens-jumprelu-init-threshold", "0.01")
    sae = saelens_setup.training_sae(
        "jumprelu", 16, 64, 4.0, l1=1.0, jumprelu=saelens_setup.jumprelu_settings(args)
    )
    assert sae.cfg.jumprelu_ste_to_input is False
    assert saelens_setup.set_jumprelu_threshold(sae, args, torch.randn(64, 16)) == pytest.approx(0.01)
    assert (sae.threshold == 0.01).all(), "a number is SAELens's own jumprelu_init_threshold, left as set"


def test_pre_act_coefficient_reaches_saelens_and_is_off_by_default():
    off = saelens_setup.training_sae(
        "jumprelu", 16, 64, 4.0, l1=1.0, jumprelu=saelens_setup.jumprelu_settings(parse())
    )
    assert off.cfg.pre_act_loss_coefficient is None, "its default: no pre-activation loss"
    args = parse("--saelens-jumprelu-pre-act-coef", "0.08")
    on = saelens_setup.training_sae(
        "jumprelu", 16, 64, 4.0, l1=1.0, jumprelu=saelens_setup.jumprelu_settings(args)
    )
    assert on.cfg.pre_act_loss_coefficient == pytest.approx(0.08)
