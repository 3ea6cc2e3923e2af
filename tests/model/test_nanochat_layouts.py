"""Layout detection, inferred behaviour, windows and the unknown-layout error
(helpers.model.nanochat_layouts).

Every layout of the table is recognised from a synthetic state dict (the three that have an oracle are also
loaded end to end in test_nanochat_gpt.py); sliding-window sizes are checked against upstream's own
`GPT._compute_window_sizes` at the two 2026 oracle commits.
"""

from __future__ import annotations

import pytest
import torch

from helpers.model import nanochat_layouts as L
from tests.model.nanochat_oracle import COMMITS, import_oracle

N_LAYER, KV_HEADS = 5, 2


def shapes_of(
    layout: L.Layout, n_layer: int = N_LAYER, gate: int | None = None
) -> dict[str, tuple[int, ...]]:
    """A state dict's key -> shape for `layout` (only the gate's width matters to detection)."""
    return {
        k: (KV_HEADS, gate or layout.ve_gate_channels) if k.endswith("ve_gate.weight") else (8, 8)
        for k in layout.expected_keys(n_layer)
    }


@pytest.mark.parametrize("layout", L.LAYOUTS, ids=L.LAYOUT_NAMES)
def test_every_layout_is_recognised_from_its_keys(layout):
    assert L.detect_layout(shapes_of(layout), N_LAYER) is layout
    assert L.detect_layout(shapes_of(layout, 6), 6) is layout


def test_layouts_differ_in_keys_or_gate_width():
    """No two layouts may be confused: distinct key sets, or (2026-01-16b vs 2026-03-09) distinct gate
    widths."""
    seen = {}
    for layout in L.LAYOUTS:
        sig = (frozenset(layout.expected_keys(N_LAYER)), layout.ve_gate_channels)
        assert sig not in seen, (layout.name, seen.get(sig))
        seen[sig] = layout.name


def test_value_embeddings_alternate_ending_on_the_last_layer():
    alternating = L.LAYOUTS[L.LAYOUT_NAMES.index("2026-03-14")]
    assert alternating.value_embed_layers(5) == [0, 2, 4] and alternating.value_embed_layers(4) == [1, 3]
    assert L.LAYOUTS[L.LAYOUT_NAMES.index("2026-01-16a")].value_embed_layers(3) == [0, 1, 2]


def test_behaviour_implied_by_each_layout():
    """The table of upstream's history (module docstring): what each layout's code did without a key."""
    seq = 2048
    want = {  # rope_theta, qk_scale, logit_softcap, rope_tables_bf16, ve_gate_scale, short window
        "2026-01-11": (10000, 1.0, 15, True, None, 1024),
        "2026-01-16a": (10000, 1.0, 15, True, None, 1024),
        "2026-01-16b": (10000, 1.0, 15, True, 2.0, 1024),
        "2026-03-09": (100000, 1.15, 15, False, 3.0, 768),
        "2026-03-14": (100000, 1.2, 15, False, 3.0, 512),
    }
    for name, expected in want.items():
        b = L.resolve_behaviour(L.LAYOUTS[L.LAYOUT_NAMES.index(name)], {"sequence_len": seq, "n_layer": 4})
        got = (
            b["rope_theta"],
            b["qk_scale"],
            b["logit_softcap"],
            b["rope_tables_bf16"],
            b.get("ve_gate_scale"),
            b["short_window"],
        )
        assert got == expected, name
    original = L.resolve_behaviour(L.ORIGINAL, {"sequence_len": seq, "n_layer": 4})
    assert (original["rope_theta"], original["logit_softcap"]) == (
        10000,
        15,
    ) and "attention_windows" not in original


@pytest.mark.parametrize("commit", COMMITS[1:])
@pytest.mark.parametrize(
    "seq_len, pattern, n_layer", [(2048, "SSSL", 12), (512, "SL", 5), (64, "L", 3), (1000, "SSL", 7)]
)
def test_windows_match_upstreams_compute_window_sizes(commit, seq_len, pattern, n_layer):
    gpt = import_oracle(commit)
    with torch.device("meta"):
        model = gpt.GPT(
            gpt.GPTConfig(
                sequence_len=seq_len,
                vocab_size=64,
                n_layer=n_layer,
                n_head=2,
                n_kv_head=2,
                n_embd=32,
                window_pattern=pattern,
            )
        )
    layout = {"2026-01-30-2e17723": "2026-01-16b", "2026-07-03-92d63d4": "2026-03-14"}[commit]
    b = L.resolve_behaviour(
        L.LAYOUTS[L.LAYOUT_NAMES.index(layout)],
        {"sequence_len": seq_len, "n_layer": n_layer, "window_pattern": pattern},
    )
    assert b["attention_windows"] == [left for left, _right in model.window_sizes]


def test_meta_without_window_pattern_means_full_context():
    """Checkpoints from before fbc1484 have no window_pattern; upstream's loader patches in "L"."""
    b = L.resolve_behaviour(L.LAYOUTS[1], {"sequence_len": 256, "n_layer": 3})
    assert b["window_pattern"] == "L" and b["attention_windows"] == [256, 256, 256]


def test_overrides_win_and_are_validated():
    layout = L.LAYOUTS[L.LAYOUT_NAMES.index("2026-01-16b")]
    mc = {"sequence_len": 512, "n_layer": 4, "window_pattern": "SL"}
    b = L.resolve_behaviour(layout, mc, {"logit_softcap": 20, "rope_tables_bf16": False, "short_window": 100})
    assert (b["logit_softcap"], b["rope_tables_bf16"], b["attention_windows"]) == (
        20,
        False,
        [100, 512, 100, 512],
    )
    with pytest.raises(ValueError, match=r"\['softcap'\] do not apply.*logit_softcap"):
        L.resolve_behaviour(layout, mc, {"softcap": 20})
    with pytest.raises(ValueError, match="rope_theta must be a positive number"):
        L.resolve_behaviour(layout, mc, {"rope_theta": 0})
    with pytest.raises(ValueError, match="window_pattern 'SX'"):
        L.resolve_behaviour(layout, mc, {"window_pattern": "SX"})
    line = L.describe(layout, b, {"logit_softcap": 20})
    assert "logit_softcap=20 (yours)" in line and "2026-03-02" in line, "the gap is announced"


def test_overrides_from_the_notebook_form_field():
    """Notebook 01's NANOCHAT_OVERRIDES text: JSON object -> dict, empty or {} -> none; Python's quoting or
    a list is refused with the field's name and an example."""
    assert L.overrides_from_text(' {"logit_softcap": 20, "qk_scale": 1.0} ') == {
        "logit_softcap": 20,
        "qk_scale": 1.0,
    }
    assert L.overrides_from_text("") is None and L.overrides_from_text("  {} ") is None
    with pytest.raises(ValueError, match=r"NANOCHAT_OVERRIDES is not JSON.*double quotes.*logit_softcap"):
        L.overrides_from_text("{'logit_softcap': 20}")
    with pytest.raises(ValueError, match="NANOCHAT_OVERRIDES must be a JSON object"):
        L.overrides_from_text("[20]")


def test_unknown_layout_lists_unexpected_and_missing_keys_and_every_layout():
    shapes = shapes_of(L.LAYOUTS[-1])
    del shapes["backout_lambda"]
    shapes["engram.weight"] = (3, 4)
    with pytest.raises(L.UnknownLayoutError) as err:
        L.detect_layout(shapes, N_LAYER)
    msg = str(err.value)
    assert "Closest is 2026-03-14: unexpected keys ['engram.weight']; missing keys ['backout_lambda']" in msg
    assert all(f"{name} (" in msg for name in L.LAYOUT_NAMES)


def test_a_gate_width_no_layout_had_is_refused():
    with pytest.raises(L.UnknownLayoutError, match="ve_gate.weight has 16 input channels"):
        L.detect_layout(shapes_of(L.LAYOUTS[-1], gate=16), N_LAYER)


def test_wrong_layer_count_is_refused_not_partly_loaded():
    """meta saying 4 layers for a 5-layer state dict: block 4's keys are unexpected."""
    with pytest.raises(
        L.UnknownLayoutError, match=r"unexpected keys \['transformer\.h\.4\.attn\.c_k\.weight'"
    ):
        L.detect_layout(shapes_of(L.ORIGINAL), 4)
