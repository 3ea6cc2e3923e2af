"""Live tracking and the prompt analyser against peers: transformers' own greedy `generate` for the
tokens, and a plain forward pass over prompt + answer (no cache) for every token's features."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers.explore.live import NO_FEATURE_FIRES, analyse_text, answer_acts, track_generation
from helpers.explore.meter import fit_meter
from helpers.explore.views import analyser_html
from helpers.model.chat import encode_chat
from helpers.model.hooks import hook_name, run_with_capture
from helpers.run import sae_dir
from helpers.saes.io import load_sae
from helpers.steer.directions import feature_direction, steer
from tests.explore.fake_run import LAYER, SAE_ID, make_run

# FutureWarning as an error: transformers' deprecations (e.g. the KV cache's keyword) once reached notebook
# 06's output from our own decoding loop
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("error::FutureWarning")]
PROMPT = "Did you take the money from the drawer?"


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("live_run"), tiny)


@pytest.fixture(scope="module")
def sae(run):
    return load_sae(sae_dir(run, SAE_ID))


def full_pass_acts(tiny, sae, ids):
    """SAE activations [n, d_sae] and residuals at every position of ids, from one uncached forward."""
    name = hook_name(sae.layer)
    resid = run_with_capture(tiny.model, [name], input_ids=torch.tensor([ids]))[name][0]
    with torch.no_grad():
        return sae.sae.encode(resid)[0].numpy(), resid


def test_tracked_tokens_and_features_match_generate_and_a_full_forward(tiny, sae, run):
    meter = fit_meter(run, LAYER)
    steps = list(track_generation(tiny, sae, PROMPT, meter=meter, max_new_tokens=7, top_n=4))
    ids = encode_chat(tiny.tokenizer, PROMPT)
    with torch.no_grad():
        ref = tiny.model.generate(
            torch.tensor([ids]), max_new_tokens=7, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    assert [s.token_id for s in steps] == ref[: len(steps)] and len(steps) == 7
    acts, resid = full_pass_acts(tiny, sae, ids + ref)
    for s in steps:
        want = acts[len(ids) + s.index]
        assert np.allclose(s.acts, want, atol=1e-4)
        assert [f for f, _ in s.features] == [
            int(f) for f in np.argsort(-want, kind="stable")[:4] if want[f] > 0
        ]
        assert s.n_firing == int((want > 0).sum())
        r = resid[len(ids) + s.index]
        assert s.meter == pytest.approx(meter.score(r)[0], abs=1e-6)
        run_mean = resid[len(ids) : len(ids) + s.index + 1].mean(0)
        assert s.meter_running == pytest.approx(meter.score(run_mean)[0], abs=1e-5)
    assert "".join(s.text for s in steps) == tiny.tokenizer.decode(ref[: len(steps)])
    tokens, features, sub = answer_acts(steps, top_n=3)
    assert tokens == [s.text for s in steps] and sub.shape == (7, 3)


def test_tracking_under_steering_sees_the_steered_model(tiny, sae):
    direction = feature_direction(sae, 5)
    with steer(tiny.model, sae.layer, direction, 3.0):
        steered_ref = list(track_generation(tiny, sae, PROMPT, max_new_tokens=4))
    ctx = steer(tiny.model, sae.layer, direction, 3.0)
    steps = list(track_generation(tiny, sae, PROMPT, max_new_tokens=4, steering=ctx))
    assert [s.token_id for s in steps] == [s.token_id for s in steered_ref]
    assert np.allclose(np.stack([s.acts for s in steps]), np.stack([s.acts for s in steered_ref]), atol=1e-5)
    plain = list(track_generation(tiny, sae, PROMPT, max_new_tokens=4))
    assert not np.allclose(np.stack([s.acts for s in steps]), np.stack([s.acts for s in plain]), atol=1e-3)


def test_analyser_reads_the_text_after_bos(tiny, sae):
    text = "I never took the money."
    tokens, features, acts = analyse_text(tiny, sae, text, features=[5, 7])
    ids = tiny.tokenizer.encode(text, add_special_tokens=False)
    want, _ = full_pass_acts(tiny, sae, [tiny.tokenizer.bos_token_id, *ids])
    assert "".join(tokens) == text and features == [5, 7]
    assert np.allclose(acts, want[1:, [5, 7]], atol=1e-5)
    _, top, top_acts = analyse_text(tiny, sae, text, top_n=3)
    assert top == [int(f) for f in np.argsort(-want[1:].max(0), kind="stable")[:3]]
    with pytest.raises(IndexError, match=r"\[96\] out of range.*d_sae=96"):
        analyse_text(tiny, sae, text, features=[96])
    with pytest.raises(ValueError, match="text is empty"):
        analyse_text(tiny, sae, "  ")
    with pytest.raises(ValueError, match="prompt is empty"):
        next(track_generation(tiny, sae, ""))
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        next(track_generation(tiny, sae, PROMPT, max_new_tokens=0))
    with pytest.raises(TypeError, match=r"\['temprature'\].*sampling settings"):
        next(track_generation(tiny, sae, PROMPT, temprature=0.5))


def test_analyser_shows_only_features_that_fire_and_says_when_none_does(tiny, sae):
    text = "I never took the money."
    _, top, acts = analyse_text(tiny, sae, text, top_n=96)
    ids = tiny.tokenizer.encode(text, add_special_tokens=False)
    want, _ = full_pass_acts(tiny, sae, [tiny.tokenizer.bos_token_id, *ids])
    firing = want[1:].max(0) > 0
    assert 0 < firing.sum() < 96 and top == [
        int(f) for f in np.argsort(-want[1:].max(0), kind="stable")[: firing.sum()]
    ]
    assert (acts.max(0) > 0).all()
    dead = copy.deepcopy(sae)
    with torch.no_grad():
        dead.sae.b_enc.fill_(-1e6)  # every pre-activation negative: no feature fires anywhere
    tokens, none, empty = analyse_text(tiny, dead, text)
    assert none == [] and empty.shape == (len(tokens), 0)
    page = analyser_html(tokens, none, empty)
    assert NO_FEATURE_FIRES in page and "max 0" not in page and "#0" not in page
    steps = list(track_generation(tiny, dead, PROMPT, max_new_tokens=3))
    assert all(s.features == [] and s.n_firing == 0 for s in steps)
    assert answer_acts(steps)[1] == []
    # features asked for by number are shown even at 0: the user chose them
    assert analyse_text(tiny, dead, text, features=[0, 5])[1] == [0, 5]
