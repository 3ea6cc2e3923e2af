"""Activation capture against a plain transformers forward pass, pooled vectors against the store, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import helpers
from helpers.collect import capture as collect
from helpers.collect.capture import (
    collect_activations,
    default_sweep_layers,
    load_pooled,
    load_pooled_prompt,
    pooled_layers,
)
from helpers.collect.sampling import Completion
from helpers.collect.store import FP16_MAX, LayerStore
from helpers.run import activations_dir, pooled_path
from tests.conftest import final_norm, tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = [1, 14, 29]  # 29 is SmolLM2's last layer: transformers applies the final norm to it

ANSWERS = [  # (prompt id, sample, user, system, answer): answers of different lengths, one empty
    ("vase", 0, "Did you break the vase?", None, "No."),
    ("vase", 1, "Did you break the vase?", None, "Yes, I broke it playing football in the hallway, sorry."),
    ("cookie", 0, "Did you eat the last cookie?", "You are a child.", "I did not; the dog took it."),
    ("cookie", 1, "Did you eat the last cookie?", "You are a child.", ""),
    ("hi", 0, "Hi", None, "Hello! How can I help you today?"),
]


def make_completion(tok, pid, k, user, system, answer) -> Completion:
    prompt = helpers.encode_chat(tok, user, system)
    tokens = tok.encode(answer, add_special_tokens=False) if answer else []
    return Completion(f"{pid}#{k}", pid, k, prompt, tokens, answer, len(prompt), len(tokens), True, 0)


@pytest.fixture(scope="module")
def completions(offline_lm):
    return [make_completion(offline_lm.tokenizer, *a) for a in ANSWERS]


@pytest.fixture(scope="module")
def reference(offline_lm, completions):
    """hidden_states of each completion's tokens, run alone (no padding): {id: ([1, T, d] per layer)}."""
    with torch.no_grad():
        return {
            c.id: offline_lm.model(
                torch.tensor([c.prompt_token_ids + c.completion_token_ids]), output_hidden_states=True
            ).hidden_states
            for c in completions
        }


@pytest.fixture(scope="module")
def collected(offline_lm, completions, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    # batch_size 4: the four non-empty completions (2 to 14 tokens) share one padded forward pass.
    summary = collect_activations(offline_lm, completions, LAYERS, run_dir, batch_size=4, shard_tokens=16)
    return run_dir, summary


def test_stored_tokens_equal_unpadded_forward_pass(offline_lm, completions, reference, collected):
    run_dir, summary = collected
    model = offline_lm.model
    for layer in LAYERS:
        store = LayerStore(run_dir, layer)
        assert len(list(activations_dir(run_dir, layer).glob("*.npy"))) > 1, "expected several shards"
        for c in completions:
            if not c.n_tokens:
                continue
            stored = torch.tensor(store.tokens_of(c.id))  # [n_tokens, d_model]
            ref = reference[c.id][layer + 1][0, c.n_prompt_tokens :]
            if layer == offline_lm.info.n_layers - 1:
                stored = final_norm(model)(stored)
            assert stored.shape == (c.n_tokens, 576)
            # float16 storage: half an ulp is 2**-11 relative; the padded batch adds ~1e-5 noise.
            torch.testing.assert_close(stored, ref, rtol=1e-3, atol=1e-3)
            assert store.entries[c.id][2:] == (c.n_tokens, c.n_prompt_tokens)  # n_tokens, first_position
    assert summary["tokens_stored"] == dict.fromkeys(LAYERS, sum(c.n_tokens for c in completions))
    assert summary["stored"] == 4 and summary["skipped_done"] == 0


def test_right_padding_keeps_absolute_positions(offline_lm, completions, tmp_path):
    """GPT-2 has learned absolute positions: a padded batch must still put every token at its position."""
    lm = tiny_lm(offline_lm.tokenizer, family="gpt2")
    collect_activations(lm, completions, [0], tmp_path, batch_size=4, include_prompt=True)
    store = LayerStore(tmp_path, 0)
    for c in completions[:3]:
        ids = torch.tensor([c.prompt_token_ids + c.completion_token_ids])
        ref = lm.model(ids, output_hidden_states=True).hidden_states[1][0].float()
        torch.testing.assert_close(torch.tensor(store.tokens_of(c.id)), ref, rtol=1e-3, atol=1e-3)


def test_pooled_mean_and_last_are_those_of_the_stored_rows(completions, collected):
    run_dir, summary = collected
    for layer in LAYERS:
        ids, mean, last = load_pooled(run_dir, layer)
        assert ids == [c.id for c in completions if c.n_tokens]  # input order, empty one left out
        assert mean.shape == last.shape == (4, 576) and mean.dtype == torch.float32
        store = LayerStore(run_dir, layer)
        for i, cid in enumerate(ids):
            stored = torch.tensor(store.tokens_of(cid))
            torch.testing.assert_close(mean[i], stored.mean(0), rtol=0, atol=1e-6)
            assert torch.equal(last[i], stored[-1])
    assert {layer: summary["pooled_rows"][layer] for layer in LAYERS} == dict.fromkeys(LAYERS, 4)


def test_prompt_vectors_and_sweep_layers_against_transformers(collected, completions, reference):
    """`prompt_last` is the residual at the prompt's last token (before the answer), at the stored layers
    and at the pooled-only sweep layers, whose mean / last are those of transformers' hidden states."""
    run_dir, summary = collected
    assert summary["sweep_layers"] == sorted({*default_sweep_layers(30), *LAYERS})
    assert pooled_layers(run_dir) == summary["sweep_layers"]
    sweep_only = [layer for layer in summary["sweep_layers"] if layer not in LAYERS]
    assert sweep_only and not activations_dir(run_dir, sweep_only[0]).exists()
    for layer in [1, 14, sweep_only[0], sweep_only[-2]]:
        ids, prompt_last = load_pooled_prompt(run_dir, layer)
        pooled_ids, mean, last = load_pooled(run_dir, layer)
        assert ids == pooled_ids and prompt_last.shape == (4, 576)
        for c in completions:
            if not c.n_tokens:
                assert c.id not in ids
                continue
            hidden = reference[c.id][layer + 1][0]  # [T, d]: hidden_states[0] is the embedding
            i = ids.index(c.id)
            torch.testing.assert_close(prompt_last[i], hidden[c.n_prompt_tokens - 1], rtol=1e-2, atol=1e-2)
            answer = hidden[c.n_prompt_tokens :]
            torch.testing.assert_close(mean[i], answer.mean(0), rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(last[i], answer[-1], rtol=1e-2, atol=1e-2)


def test_a_pooled_file_without_prompt_vectors_is_completed(offline_lm, completions, tmp_path):
    """A run folder from before prompt vectors: its pooled rows are rebuilt (mean / last unchanged)."""
    collect_activations(offline_lm, completions[:3], [1], tmp_path, sweep_layers=None)
    ids, mean, last = load_pooled(tmp_path, 1)
    mean, last = mean.clone(), last.clone()  # the loaded tensors may map the file about to be replaced
    old = safetensors_bytes({"mean": mean, "last": last}, metadata={"completion_ids": json.dumps(ids)})
    pooled_path(tmp_path, 1).write_bytes(old)
    assert load_pooled_prompt(tmp_path, 1) is None
    summary = collect_activations(offline_lm, completions[:3], [1], tmp_path, sweep_layers=None)
    assert summary["stored"] == 3 and summary["tokens_stored"] == {1: 0}  # nothing stored twice
    new_ids, new_mean, new_last = load_pooled(tmp_path, 1)
    order = [new_ids.index(cid) for cid in ids]
    assert torch.equal(new_mean[order], mean) and torch.equal(new_last[order], last)
    assert load_pooled_prompt(tmp_path, 1)[1].shape == (3, 576)


def test_empty_completion_is_reported_and_stores_nothing(collected):
    run_dir, summary = collected
    assert summary["empty"] == ["cookie#1"]
    assert "cookie#1" not in LayerStore(run_dir, LAYERS[0]).entries


def test_resume_after_interruption_equals_one_pass(offline_lm, completions, tmp_path, monkeypatch):
    kwargs = dict(batch_size=1, shard_tokens=8)  # batch 1: no padding, so the runs agree bit for bit
    layers = [1, 3]
    one_pass = tmp_path / "one_pass"
    collect_activations(offline_lm, completions, layers, one_pass, **kwargs)

    # A disconnect in the third forward pass: shards flushed before it survive, no pooled file yet.
    resumed, real, calls = tmp_path / "resumed", collect.run_with_capture, []

    def disconnect(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(collect, "run_with_capture", disconnect)
    with pytest.raises(KeyboardInterrupt):
        collect_activations(offline_lm, completions, layers, resumed, **kwargs)
    monkeypatch.setattr(collect, "run_with_capture", real)
    done = set(LayerStore(resumed, 1).completion_ids)
    assert 0 < len(done) < 4 and not pooled_path(resumed, 1).exists()

    # Then half the completions (as if the notebook ran on a subset), then all of them.
    collect_activations(offline_lm, completions[:2], layers, resumed, **kwargs)
    summary = collect_activations(offline_lm, completions, layers, resumed, **kwargs)
    # Completions stored before the disconnect but not pooled go through the model again (their prompt
    # vectors are not in the store) without being stored twice; the two finished ones are skipped.
    assert summary["skipped_done"] == 2 and summary["empty"] == ["cookie#1"]
    store = LayerStore(resumed, 1)
    new = set(store.completion_ids) - done - {"vase#0", "vase#1"}
    assert summary["tokens_stored"][1] == sum(len(store.tokens_of(c)) for c in new)
    again = collect_activations(offline_lm, completions, layers, resumed, **kwargs)
    assert again["stored"] == 0 and again["skipped_done"] == 4

    for layer in layers:
        a, b = LayerStore(one_pass, layer), LayerStore(resumed, layer)
        assert sorted(a.completion_ids) == sorted(b.completion_ids) and a.n_tokens == b.n_tokens
        for cid in a.completion_ids:
            np.testing.assert_array_equal(a.tokens_of(cid), b.tokens_of(cid))
            assert a.entries[cid][2:] == b.entries[cid][2:]
        ids_a, mean_a, last_a = load_pooled(one_pass, layer)
        ids_b, mean_b, last_b = load_pooled(resumed, layer)
        assert sorted(ids_a) == sorted(ids_b) and len(ids_b) == 4
        order = [ids_b.index(cid) for cid in ids_a]
        torch.testing.assert_close(mean_b[order], mean_a, rtol=0, atol=1e-6)
        assert torch.equal(last_b[order], last_a)


def test_include_prompt_stores_prompt_tokens_from_position_zero(offline_lm, completions, reference, tmp_path):
    summary = collect_activations(offline_lm, completions, [1], tmp_path, batch_size=3, include_prompt=True)
    store = LayerStore(tmp_path, 1)
    ids, mean, last = load_pooled(tmp_path, 1)
    for c in completions:
        if not c.n_tokens:
            assert c.id not in store.entries
            continue
        _, _, n, first_position = store.entries[c.id]
        assert (n, first_position) == (c.n_prompt_tokens + c.n_tokens, 0)
        stored = torch.tensor(store.tokens_of(c.id))
        torch.testing.assert_close(stored, reference[c.id][2][0], rtol=1e-3, atol=1e-3)
        # Pooled vectors stay over the completion tokens only.
        torch.testing.assert_close(
            mean[ids.index(c.id)], stored[c.n_prompt_tokens :].mean(0), rtol=0, atol=1e-6
        )
        assert torch.equal(last[ids.index(c.id)], stored[-1])
    assert summary["tokens_stored"] == {
        1: sum(c.n_prompt_tokens + c.n_tokens for c in completions if c.n_tokens)
    }


def test_a_completion_stores_the_same_values_whatever_its_shard(
    offline_lm, completions, tmp_path, monkeypatch
):
    """A completion that overflows float16 makes its shard float32; its neighbour must still store its
    float16-rounded values (as in any other shard), and its pooled rows must be those values."""
    pair = [completions[0], completions[2]]
    collect_activations(offline_lm, pair, [1], tmp_path / "plain", batch_size=2)
    real = collect.run_with_capture

    def overflow_first_row(*args, **kw):
        acts = real(*args, **kw)
        for h in acts.values():
            h[0] *= 1e4  # residual values of ~1e5 > 65504 in the batch's first row
        return acts

    monkeypatch.setattr(collect, "run_with_capture", overflow_first_row)
    collect_activations(offline_lm, pair, [1], tmp_path / "mixed", batch_size=2)
    plain, mixed = LayerStore(tmp_path / "plain", 1), LayerStore(tmp_path / "mixed", 1)
    assert plain.shard(0).dtype == np.float16 and mixed.shard(0).dtype == np.float32
    big, small = sorted(mixed.completion_ids, key=lambda cid: -np.abs(mixed.tokens_of(cid)).max())
    assert np.abs(mixed.tokens_of(big)).max() > FP16_MAX > np.abs(mixed.tokens_of(small)).max()
    np.testing.assert_array_equal(mixed.tokens_of(small), plain.tokens_of(small))
    ids, mean, last = load_pooled(tmp_path / "mixed", 1)
    stored = torch.tensor(mixed.tokens_of(small))
    torch.testing.assert_close(mean[ids.index(small)], stored.mean(0), rtol=0, atol=1e-6)
    assert torch.equal(last[ids.index(small)], stored[-1])
    torch.testing.assert_close(mean[ids.index(big)], torch.tensor(mixed.tokens_of(big)).mean(0))


def test_jsonl_rows_accepted_and_rows_without_tokens_refused(offline_lm, completions, tmp_path):
    rows = [json.loads(json.dumps(c.to_dict())) for c in completions[:2]]
    summary = collect_activations(offline_lm, rows, [1], tmp_path)
    assert summary["stored"] == 2 and load_pooled(tmp_path, 1)[0] == ["vase#0", "vase#1"]
    with pytest.raises(ValueError, match="'x#0' has no prompt_token_ids, completion_token_ids"):
        collect_activations(offline_lm, [{"id": "x#0", "completion": "hi"}], [1], tmp_path)
    with pytest.raises(ValueError, match="'vase#0' appears twice"):
        collect_activations(offline_lm, rows + rows[:1], [1], tmp_path)


def test_non_finite_activation_names_the_completion(offline_lm, completions, tmp_path):
    inf = torch.full((576,), float("inf"))
    with (
        helpers.add_to_residual(offline_lm.model, {"blocks.1.hook_resid_post": inf}),
        pytest.raises(ValueError, match=r"non-finite activation in completion 'hi#0' at token 0"),
    ):
        collect_activations(offline_lm, [completions[4]], [1], tmp_path)
    assert not pooled_path(tmp_path, 1).exists()
    with (  # a pooled-only sweep layer has no store, and refuses it the same way
        helpers.add_to_residual(offline_lm.model, {"blocks.3.hook_resid_post": inf}),
        pytest.raises(ValueError, match=r"non-finite activation in completion 'hi#0' at token 0"),
    ):
        collect_activations(offline_lm, [completions[4]], [1], tmp_path / "sweep", sweep_layers=[3])
    assert not pooled_path(tmp_path / "sweep", 3).exists()
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        load_pooled(tmp_path, 1)


def test_rerunning_collection_repairs_a_truncated_shard(offline_lm, completions, tmp_path):
    kwargs = dict(batch_size=1, shard_tokens=8)
    one_pass, damaged = tmp_path / "one_pass", tmp_path / "damaged"
    collect_activations(offline_lm, completions, [1], one_pass, **kwargs)
    collect_activations(offline_lm, completions, [1], damaged, **kwargs)
    shard = activations_dir(damaged, 1) / "shard_00000.npy"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match="is damaged"):
        LayerStore(damaged, 1)
    collect_activations(offline_lm, completions, [1], damaged, **kwargs)
    a, b = LayerStore(one_pass, 1), LayerStore(damaged, 1)
    assert sorted(a.completion_ids) == sorted(b.completion_ids)
    for cid in a.completion_ids:
        np.testing.assert_array_equal(a.tokens_of(cid), b.tokens_of(cid))
