"""Every nanochat checkpoint layout since 2025-10: which one a state dict is, and how its code behaved.

nanochat's `meta_<step>.json` does not say which code version trained a checkpoint. The state-dict keys
do, for most changes: `detect_layout` matches the keys (and the value-embedding gate's width) against
`LAYOUTS`, and refuses anything else with the unexpected and missing keys and the layouts known, so a
checkpoint is never partly loaded. A few changes left no key (RoPE base, q/k scale, logit softcap, gate
scale, short-window size, rotary-table precision); each changed in the same upstream commit as a key or a
shape, so the layout implies it (`Layout.behaviour`), except where noted in `Layout.note`. The user can
override any of them (`resolve_behaviour(..., overrides)`, `load_model(..., nanochat_overrides=...)`).

Read from karpathy/nanochat's history of `nanochat/gpt.py` (dates are commit dates):

| layout | from (commit) | keys / shapes |
|---|---|---|
| 2025-10 | 2025-10-13 (3a5e0bc) | wte, lm_head, h.i.attn.c_q/k/v/proj, h.i.mlp.c_fc/c_proj |
| 2026-01-11 | aa530cd | + resid_lambdas, x0_lambdas (window_pattern in meta from fbc1484) |
| 2026-01-16a | 9a88194 | + value_embeds.{every layer}, v0_lambdas |
| 2026-01-16b | e85db6b | + value_embeds.{alternating}, h.i.attn.ve_gate [kv_heads, 32] |
| 2026-03-09 | 6ed7d1d | ve_gate [kv_heads, 12] |
| 2026-03-14 | a825e63 | + smear_gate [1, 24], smear_lambda, backout_lambda |

and the behaviour each layout implies:

| layout | RoPE base | q,k × | softcap | VE gate | short window |
|---|---|---|---|---|---|
| 2025-10 | 10000 | 1 | 15 | – | – |
| 2026-01-11 | 10000 | 1 | 15 | – | seq/2 |
| 2026-01-16a | 10000 | 1 | 15 | scalar | seq/2 |
| 2026-01-16b | 10000 | 1 | 15 (20: 03-02..03-09) | 2σ | seq/2 |
| 2026-03-09 | 100000 | 1.15 | 15 | 3σ | ⌈seq/3/128⌉·128 |
| 2026-03-14 | 100000 | 1.2 | 15 | 3σ | ⌈seq/4/128⌉·128 |

Also: the vocabulary is padded to a multiple of 64 from 2025-12-09 (f1bf69d; logits are cropped to the
tokenizer's size, which `meta` records as `vocab_size`); the rotary cos/sin tables are rounded to
bfloat16 on every device until 2026-03-04 (1076f97) and kept in the compute dtype after. Three same-day
experiments of 2026-01-16 (e3f58b8 `value_embed_A/B`, 0b58d70 one shared `value_embed`) are not supported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

BASE_LAYER_KEYS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def short_window_half(seq_len: int) -> int:
    return seq_len // 2


def short_window_third_tiled(seq_len: int) -> int:
    return math.ceil(seq_len / 3 / 128) * 128  # upstream: -(-seq_len // 3 // 128) * 128


def short_window_quarter_tiled(seq_len: int) -> int:
    return math.ceil(seq_len / 4 / 128) * 128


@dataclass(frozen=True)
class Layout:
    """One nanochat checkpoint layout: the keys that identify it and the behaviour its code had."""

    name: str
    since: str
    """First upstream commit (and date) that wrote this layout."""
    summary: str
    lambdas: bool = False
    """`resid_lambdas`, `x0_lambdas`."""
    value_embeds: str = "none"
    """Which layers have a value embedding: "none", "every" (every layer, scalar `v0_lambdas`) or
    "alternating" (layer i where i % 2 == (n-1) % 2)."""
    ve_gate_channels: int = 0
    """Width of `transformer.h.{i}.attn.ve_gate.weight` ([kv_heads, width]); 0 = no gate."""
    smear: bool = False
    """`smear_gate`, `smear_lambda`, `backout_lambda`."""
    behaviour: dict[str, Any] = field(default_factory=dict)
    """Behaviour that left no key, implied by this layout: see `BEHAVIOUR_FIELDS`."""
    note: str = ""
    """What the keys cannot tell (a gap where the user may need an override)."""

    def expected_keys(self, n_layer: int) -> set[str]:
        keys = {"transformer.wte.weight", "lm_head.weight"}
        keys |= {f"transformer.h.{i}.{k}.weight" for i in range(n_layer) for k in BASE_LAYER_KEYS}
        if self.lambdas:
            keys |= {"resid_lambdas", "x0_lambdas"}
        ve = self.value_embed_layers(n_layer)
        keys |= {f"value_embeds.{i}.weight" for i in ve}
        if self.value_embeds == "every":
            keys.add("v0_lambdas")
        if self.ve_gate_channels:
            keys |= {f"transformer.h.{i}.attn.ve_gate.weight" for i in ve}
        if self.smear:
            keys |= {"smear_gate.weight", "smear_lambda", "backout_lambda"}
        return keys

    def value_embed_layers(self, n_layer: int) -> list[int]:
        if self.value_embeds == "every":
            return list(range(n_layer))
        if self.value_embeds == "alternating":
            return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]
        return []


_OLD = {"rope_theta": 10000.0, "qk_scale": 1.0, "logit_softcap": 15.0, "rope_tables_bf16": True}
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "2025-10",
        "3a5e0bc, 2025-10-13",
        "the original GPT (official d20/d32/d34); loads as transformers' NanoChatForCausalLM",
        behaviour=dict(_OLD),
    ),
    Layout(
        "2026-01-11",
        "aa530cd, 2026-01-11",
        "per-layer resid_lambdas / x0_lambdas, sliding windows (window_pattern)",
        lambdas=True,
        behaviour={**_OLD, "short_window": short_window_half},
    ),
    Layout(
        "2026-01-16a",
        "9a88194, 2026-01-16",
        "value embeddings on every layer, mixed in by scalar v0_lambdas",
        lambdas=True,
        value_embeds="every",
        behaviour={**_OLD, "short_window": short_window_half},
    ),
    Layout(
        "2026-01-16b",
        "e85db6b, 2026-01-16",
        "value embeddings on alternating layers, gated per head (ve_gate over 32 channels, 2·sigmoid)",
        lambdas=True,
        value_embeds="alternating",
        ve_gate_channels=32,
        behaviour={**_OLD, "ve_gate_scale": 2.0, "short_window": short_window_half},
        note=(
            "checkpoints trained 2026-03-02 .. 03-09 (aba30cb) used logit_softcap=20 and, from 2026-03-04 "
            "(1076f97), rotary tables in the compute dtype (rope_tables_bf16=False); the keys cannot tell"
        ),
    ),
    Layout(
        "2026-03-09",
        "6ed7d1d, 2026-03-09",
        "ve_gate over 12 channels (3·sigmoid), q/k x1.15, RoPE base 100000, short window seq/3",
        lambdas=True,
        value_embeds="alternating",
        ve_gate_channels=12,
        behaviour={
            "rope_theta": 100000.0,
            "qk_scale": 1.15,
            "logit_softcap": 15.0,
            "rope_tables_bf16": False,
            "ve_gate_scale": 3.0,
            "short_window": short_window_third_tiled,
        },
    ),
    Layout(
        "2026-03-14",
        "a825e63, 2026-03-14",
        "+ smear (previous-token mix) and backout (mid-layer residual subtracted), q/k x1.2, "
        "short window seq/4",
        lambdas=True,
        value_embeds="alternating",
        ve_gate_channels=12,
        smear=True,
        behaviour={
            "rope_theta": 100000.0,
            "qk_scale": 1.2,
            "logit_softcap": 15.0,
            "rope_tables_bf16": False,
            "ve_gate_scale": 3.0,
            "short_window": short_window_quarter_tiled,
        },
    ),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)
ORIGINAL = LAYOUTS[0]

BEHAVIOUR_FIELDS = {
    "rope_theta": "RoPE base (10000 until 2026-03-09, then 100000)",
    "qk_scale": "q and k multiplied after QK-norm (1, 1.15, 1.2)",
    "logit_softcap": "softcap * tanh(logits / softcap) (15; 20 for 2026-03-02 .. 03-09)",
    "rope_tables_bf16": "rotary cos/sin rounded to bfloat16 (code before 2026-03-04)",
    "ve_gate_scale": "value-embedding gate = scale * sigmoid(...) (2, then 3 from 2026-03-09)",
    "short_window": "tokens an 'S' layer attends back (int; default from sequence_len and the layout)",
    "window_pattern": "the 'SSSL'-style pattern (default: meta's model_config, else 'L')",
}
"""What `nanochat_overrides` may set, with what each means."""

_HF_OVERRIDABLE = ("rope_theta", "logit_softcap")
"""The 2025-10 layout converts to transformers' NanoChatForCausalLM, which has only these two."""


def overrides_from_text(text: str) -> dict[str, Any] | None:
    """`nanochat_overrides` from notebook 01's NANOCHAT_OVERRIDES form field: a JSON object such as
    `{"logit_softcap": 20}`; empty (or `{}`) means none. Names and values are checked where the layout is
    known (`resolve_behaviour`)."""
    text = text.strip()
    if not text:
        return None
    example = '{"logit_softcap": 20}'
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"NANOCHAT_OVERRIDES is not JSON ({e.msg} at character {e.pos}): write an object with double "
            f"quotes, e.g. {example}, or leave it empty; names: {', '.join(BEHAVIOUR_FIELDS)}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"NANOCHAT_OVERRIDES must be a JSON object such as {example}, got {text!r}")
    return value or None


class UnknownLayoutError(ValueError):
    """A state dict that is none of `LAYOUTS`: nothing is loaded."""


def _few(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return f"{keys}" if len(keys) <= n else f"{keys[:n]} ... ({len(keys)} in all)"


def _gate_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    widths = {s[-1] for k, s in shapes.items() if k.endswith(".attn.ve_gate.weight")}
    return widths.pop() if len(widths) == 1 else None


BRANCHES = (
    (
        "a mixture-of-experts MLP (branch moe3, commit 3a76bb9: num_experts routed experts, top_k per token, "
        "a shared expert)",
        lambda s: any(".mlp.router." in k or ".mlp.experts." in k or ".mlp.shared_expert." in k for k in s),
    ),
    (
        "hyper-connections (PR #812, commit 83ba923: hc_rate parallel residual streams, a residual of shape "
        "(B, T, N, D) mixed by each block's attn_hc / mlp_hc)",
        lambda s: any("_hc." in k for k in s),
    ),
    (
        "widening (PR #807, commit 4197e95: token embeddings of n_token_embd channels and narrower first "
        "layers widened to n_embd)",
        lambda s: (
            "transformer.wte.weight" in s
            and "lm_head.weight" in s
            and s["transformer.wte.weight"][-1] != s["lm_head.weight"][-1]
        ),
    ),
)
"""nanochat features of unmerged or side branches (../shared/oracles/nanochat), each recognised from its
parameters, that this loader refuses by name: none has a hook point that means what
`blocks.{i}.hook_resid_post` means in the supported layouts (one residual stream of width n_embd after
every block), so activations, SAEs and steering would silently read something else."""


def refuse_branches(shapes: Mapping[str, tuple[int, ...]]) -> None:
    """`UnknownLayoutError` naming the feature and commit when the checkpoint comes from one of `BRANCHES`."""
    found = [name for name, test in BRANCHES if test(shapes)]
    if found:
        raise UnknownLayoutError(
            f"This checkpoint uses {' and '.join(found)}, which this loader does not support: nothing was "
            "converted. Supported are the layouts of nanochat's main branch up to 92d63d4 "
            f"({', '.join(lay.name for lay in LAYOUTS)}); train or export a dense checkpoint of one of them."
        )


def detect_layout(shapes: Mapping[str, tuple[int, ...]], n_layer: int) -> Layout:
    """The layout whose keys are exactly `shapes`' keys (state-dict key -> shape, `_orig_mod.` removed).

    A checkpoint of a branch in `BRANCHES` is refused by name; otherwise raises `UnknownLayoutError`
    listing the unexpected and missing keys against the closest layout, and every layout known, when
    none matches."""
    refuse_branches(shapes)
    keys = set(shapes)
    width = _gate_width(shapes)
    matches = [
        layout
        for layout in LAYOUTS
        if layout.expected_keys(n_layer) == keys and layout.ve_gate_channels in (0, width)
    ]
    if len(matches) == 1:
        return matches[0]

    def distance(layout: Layout) -> int:
        return len(layout.expected_keys(n_layer) ^ keys)

    closest = min(LAYOUTS, key=distance)
    expected = closest.expected_keys(n_layer)
    parts = [
        (f"unexpected keys {_few(keys - expected)}", keys - expected),
        (f"missing keys {_few(expected - keys)}", expected - keys),
    ]
    detail = "; ".join(text for text, found in parts if found)
    if keys == expected:  # same keys, other gate width
        detail = (
            f"transformer.h.*.attn.ve_gate.weight has {width} input channels, not {closest.ve_gate_channels}"
        )
    known = "; ".join(f"{lay.name} ({lay.since}): {lay.summary}" for lay in LAYOUTS)
    raise UnknownLayoutError(
        f"This checkpoint (n_layer={n_layer}) is none of the nanochat layouts this loader knows. Closest is "
        f"{closest.name}: {detail}. Known layouts: {known}. If n_layer in meta_<step>.json is right, the "
        "checkpoint comes from code this loader does not know: please report the key list."
    )


def attention_windows(pattern: str, seq_len: int, short_window: int, n_layer: int) -> list[int]:
    """Per-layer left window: the pattern tiled over the layers ('L' = seq_len, 'S' = short_window), the
    last layer always 'L' (as upstream's `_compute_window_sizes`)."""
    pattern = pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern {pattern!r} must be made of S and L, e.g. 'SSSL'")
    windows = [short_window if pattern[i % len(pattern)] == "S" else seq_len for i in range(n_layer)]
    windows[-1] = seq_len
    return windows


def resolve_behaviour(
    layout: Layout, model_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The behaviour to load `layout` with: what the layout implies, meta's `window_pattern`, then the
    user's `overrides` (names from `BEHAVIOUR_FIELDS`). Returns plain values, `attention_windows` included
    for 2026 layouts."""
    overrides = dict(overrides or {})
    allowed = _HF_OVERRIDABLE if layout is ORIGINAL else tuple(BEHAVIOUR_FIELDS)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"nanochat_overrides {unknown} do not apply to the {layout.name} layout; it accepts "
            + ", ".join(f"{k} ({BEHAVIOUR_FIELDS[k]})" for k in allowed)
        )
    seq_len = int(model_config["sequence_len"])
    out = {k: v for k, v in layout.behaviour.items() if k != "short_window"}
    if layout is not ORIGINAL:
        out["short_window"] = layout.behaviour["short_window"](seq_len)
        out["window_pattern"] = str(
            model_config.get("window_pattern") or "L"
        )  # upstream's default for old metas
    out.update(overrides)
    for name in ("rope_theta", "qk_scale", "logit_softcap", "ve_gate_scale"):
        if name in out and not (isinstance(out[name], int | float) and out[name] > 0):
            raise ValueError(f"nanochat_overrides: {name} must be a positive number, got {out[name]!r}")
    if layout is not ORIGINAL:
        out["attention_windows"] = attention_windows(
            out["window_pattern"], seq_len, int(out["short_window"]), int(model_config["n_layer"])
        )
    return out


def describe(layout: Layout, behaviour: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> str:
    """One line for the conversion log: the layout and what was inferred or overridden."""
    shown = {k: v for k, v in behaviour.items() if k in BEHAVIOUR_FIELDS}
    parts = [f"{k}={v}{' (yours)' if overrides and k in overrides else ''}" for k, v in shown.items()]
    line = f"layout {layout.name} ({layout.since}: {layout.summary}); " + ", ".join(parts)
    if layout.note:
        line += f". Note: {layout.note}; pass nanochat_overrides={{...}} if yours is one of those"
    return line


def state_dict_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}
