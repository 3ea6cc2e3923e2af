"""Our residual hooks against transformers' own output_hidden_states, on real and tiny models."""

from __future__ import annotations

import pytest
import torch

import helpers
from helpers.model.hooks import (
    add_to_residual,
    capture,
    decoder_layers,
    edit_residual,
    hook_points,
    layer_of,
    run_with_capture,
)
from tests.conftest import final_norm, tiny_model


def assert_matches_hidden_states(model, ids: torch.Tensor, atol: float) -> None:
    names = hook_points(model)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states  # [emb-ish, layer0, ..., final-normed]
        with capture(model, names) as cache:
            model(ids)
    assert len(cache) == len(names) == len(ref) - 1
    for i, name in enumerate(names[:-1]):
        assert cache[name].shape == (*ids.shape, ref[i + 1].shape[-1])
        torch.testing.assert_close(cache[name], ref[i + 1], atol=atol, rtol=0)
    # transformers applies the final norm to the last entry; our hook is the raw residual before it.
    torch.testing.assert_close(final_norm(model)(cache[names[-1]]), ref[-1], atol=atol, rtol=1e-5)
    assert not torch.allclose(cache[names[-1]], ref[-1]), (
        "last hook must be the residual, not the normed output"
    )


def test_capture_equals_hidden_states_on_smollm2(offline_lm):
    ids = torch.tensor([helpers.encode_chat(offline_lm.tokenizer, "Did you break the vase?")])
    assert_matches_hidden_states(offline_lm.model, ids, atol=1e-5)
    assert offline_lm.info.n_layers == 30 and offline_lm.info.d_model == 576


@pytest.mark.parametrize("family", ["nanochat", "llama", "gpt2", "gpt_neox"])
def test_capture_equals_hidden_states_on_tiny_models(family):
    model = tiny_model(family)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    assert_matches_hidden_states(model, ids, atol=1e-6)


def test_run_with_capture_stops_early_and_matches():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    calls = []
    last = decoder_layers(model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = run_with_capture(model, ["blocks.1.hook_resid_post"], input_ids=ids)
    finally:
        last.remove()
    assert calls == [], "layer 2 ran although only layer 1 was requested"
    ref = model(ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(got["blocks.1.hook_resid_post"], ref)


def test_add_to_residual_changes_only_that_layer_and_after():
    model = tiny_model("nanochat")
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(3))
    names = hook_points(model)
    vec = torch.randn(64, generator=torch.Generator().manual_seed(4))
    with capture(model, names) as clean:
        model(ids)
    clean = dict(clean)
    with capture(model, names) as steered, add_to_residual(model, {names[1]: vec}):
        model(ids)
    torch.testing.assert_close(steered[names[0]], clean[names[0]])  # before: untouched
    torch.testing.assert_close(
        steered[names[1]] - clean[names[1]], vec.expand(2, 5, 64)
    )  # exactly the vector
    assert not torch.allclose(steered[names[2]], clean[names[2]])  # after: it propagates
    with capture(model, names) as again:
        model(ids)
    torch.testing.assert_close(again[names[1]], clean[names[1]])  # hook removed on exit


def test_edit_residual_replaces_only_the_chosen_positions():
    model = tiny_model("nanochat")
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(3))
    names = hook_points(model)
    where = torch.zeros(2, 5, dtype=torch.bool)
    where[0, 1], where[1, 3] = True, True
    seen = []

    def fn(rows: torch.Tensor) -> torch.Tensor:
        seen.append((rows.shape, rows.dtype))
        return torch.full_like(rows, 2.0)

    with capture(model, names) as clean:
        model(ids)
    clean = dict(clean)
    # the capture is entered first: the edit's hook is prepended, so the capture still sees the edit
    with capture(model, names) as got, edit_residual(model, names[1], fn, where):
        model(ids)
    assert seen == [((2, 64), torch.float32)]
    torch.testing.assert_close(got[names[1]][where], torch.full((2, 64), 2.0))
    torch.testing.assert_close(got[names[1]][~where], clean[names[1]][~where])
    torch.testing.assert_close(got[names[0]], clean[names[0]])
    with capture(model, names) as again:
        model(ids)
    torch.testing.assert_close(again[names[1]], clean[names[1]])  # hook removed on exit


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hooks_removed_after_exception(family):
    model = tiny_model(family)
    layer = decoder_layers(model)[0]
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture(model, ["blocks.0.hook_resid_post"]),
        add_to_residual(model, {"blocks.0.hook_resid_post": torch.ones(64)}),
    ):
        assert len(layer._forward_hooks) == 2
        raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


def test_layer_out_of_range_lists_valid_range():
    model = tiny_model("gpt2")
    with pytest.raises(IndexError, match=r"layers 0\.\.2"), capture(model, ["blocks.3.hook_resid_post"]):
        pass
    with pytest.raises(IndexError, match=r"layers 0\.\.2"):
        helpers.check_layers(model, [0, 5])
    assert helpers.check_layers(model, [0, -1]) == [0, 2]


def test_hook_name_variants():
    assert layer_of("blocks.12.hook_resid_post") == 12
    assert layer_of("transformer.h.12") == 12
    assert layer_of("model.layers.7") == 7
    with pytest.raises(ValueError, match="blocks.<layer>.hook_resid_post"):
        layer_of("blocks.3.hook_mlp_out")


def test_hook_table_rows():
    model = tiny_model("gpt2")
    rows = helpers.hook_table(model, torch.zeros(1, 4, dtype=torch.long))
    assert [r["hook"] for r in rows] == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert [r["module"] for r in rows] == [f"transformer.h.{i}" for i in range(3)]
    assert all(r["shape"] == (1, 4, 64) and r["dtype"] == "float32" and r["mean_norm"] > 0 for r in rows)
