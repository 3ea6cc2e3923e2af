"""Hook names ↔ modules, residual capture, and additive interventions.

The public vocabulary is TransformerLens's: `blocks.{i}.hook_resid_post` is the output of decoder
layer i (the residual stream after block i). `decoder_layers` is the one place that knows where each
architecture keeps its layers. Hooks are registered inside context managers and removed in `finally`,
so an exception in the middle of a forward pass never leaves a hook behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Where each architecture keeps its decoder layers, as attribute paths on the *ForCausalLM model.
# NanoChat/Llama/Qwen/Mistral/Gemma/SmolLM: model.layers; GPT-2 and our nanochat 2026 class
# (nanochat_gpt.NanoChatGPTForCausalLM, upstream's names): transformer.h; GPT-NeoX: gpt_neox.layers.
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers")
_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
# Module paths that foreign SAEs sometimes use as their hook_name (e.g. published nanochat SAEs).
_MODULE_NAME = re.compile(r"^(?:model\.)?(?:model\.layers|transformer\.h|gpt_neox\.layers|layers)\.(\d+)$")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a causal LM."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(
        f"Don't know where {type(model).__name__} keeps its decoder layers "
        f"(looked for {', '.join(_LAYER_PATHS)}). "
        "Add its attribute path to helpers.model.hooks._LAYER_PATHS."
    )


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def layer_of(name: str, n_layers: int | None = None) -> int:
    """Layer index of a hook name. Accepts `blocks.{i}.hook_resid_post` and module paths like
    `transformer.h.12` or `model.layers.12` (as written by some published SAEs)."""
    m = _HOOK_NAME.match(name) or _MODULE_NAME.match(name)
    if m is None:
        raise ValueError(
            f"Unknown hook name {name!r}: use 'blocks.<layer>.hook_resid_post' "
            "(residual stream after that layer)"
        )
    layer = int(m.group(1))
    if n_layers is not None and not 0 <= layer < n_layers:
        raise IndexError(
            f"Layer {layer} (from {name!r}) is out of range: this model has layers 0..{n_layers - 1}"
        )
    return layer


def check_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Validate layer indices (negative counts from the end); an out-of-range one names the valid range."""
    n = len(decoder_layers(model))
    out = []
    for layer in layers:
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise IndexError(f"Layer {layer} is out of range: this model has layers 0..{n - 1} (or -{n}..-1)")
        out.append(idx)
    return out


def hook_points(model: nn.Module) -> list[str]:
    return [hook_name(i) for i in range(len(decoder_layers(model)))]


def hook_module(model: nn.Module, name: str) -> nn.Module:
    layers = decoder_layers(model)
    return layers[layer_of(name, len(layers))]


def _hidden(output: Any) -> torch.Tensor:
    # NanoChat layers return a tensor; Llama/GPT-2 layers may return a tuple whose first item is the residual.
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    """Raised after the last hook of interest to skip the rest of the forward pass."""


@contextmanager
def capture(
    model: nn.Module,
    names: Sequence[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the residual stream at `names` during forward passes inside the block.

    Yields a dict filled as the model runs: `cache[name]` is `[batch, seq, d_model]` from the most
    recent forward pass, detached, optionally cast to `dtype` and moved to `device`.
    """
    cache: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            h = _hidden(output).detach()
            cache[name] = h.to(device=device or h.device, dtype=dtype or h.dtype)

        return hook

    try:
        for name in names:
            handles.append(hook_module(model, name).register_forward_hook(make_hook(name)))
        yield cache
    finally:
        for handle in handles:
            handle.remove()


def run_with_capture(model: nn.Module, names: Sequence[str], stop_early: bool = True, **inputs: Any) -> dict:
    """One forward pass that returns `{name: [batch, seq, d_model]}`; with `stop_early` the layers after
    the deepest requested hook are skipped (activation collection does not need the logits)."""
    deepest = max(layer_of(n) for n in names)
    with capture(model, names) as cache:
        stop = (
            hook_module(model, hook_name(deepest)).register_forward_hook(_raise_stop) if stop_early else None
        )
        try:
            with torch.no_grad():
                model(**inputs)
        except _StopForward:
            pass
        finally:
            if stop is not None:
                stop.remove()
    return dict(cache)


def _raise_stop(*_: Any) -> None:
    raise _StopForward


@contextmanager
def add_to_residual(model: nn.Module, additions: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Add a vector to the residual stream at each named hook for every forward pass inside the block.

    `additions[name]` is `[d_model]` (added at every position) or broadcastable to `[batch, seq, d_model]`.
    Additive, so everything else in the residual (e.g. an SAE's reconstruction error) is kept.
    The hooks are prepended, so a `capture` at the same layer sees the residual after the addition
    whichever context was entered first.
    """
    handles = []

    def make_hook(vec: torch.Tensor) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            h = _hidden(output)
            return _replace_hidden(output, h + vec.to(device=h.device, dtype=h.dtype))

        return hook

    try:
        for name, vec in additions.items():
            handles.append(hook_module(model, name).register_forward_hook(make_hook(vec), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edit_residual(
    model: nn.Module,
    name: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    positions: torch.Tensor | None = None,
) -> Iterator[None]:
    """Replace the residual stream at hook `name` by `fn(rows)` for every forward pass inside the block:
    `rows` are its vectors at `positions` ([batch, seq] bool; every position when None) as float32
    [n, d_model], and fn's result goes back in the residual's dtype and device (the other positions are
    kept). Prepended like add_to_residual's hooks, so a `capture` at the same layer sees the edit; removed
    even if the pass fails. An SAE splice (fn = the SAE) and a clamped latent both go through here."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        h = _hidden(output)
        new = h.clone()
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if positions is None else positions
        new[mask] = fn(h[mask].float()).to(device=h.device, dtype=h.dtype)
        return _replace_hidden(output, new)

    handle = hook_module(model, name).register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def hook_table(model: nn.Module, input_ids: torch.Tensor) -> list[dict[str, Any]]:
    """One row per hook point from one forward pass: name, module, shape, dtype and the mean L2 norm
    of the residual per token (it grows with depth; a sudden jump or an inf is worth a look)."""
    names = hook_points(model)
    layers = decoder_layers(model)
    paths = {id(m): p for p, m in model.named_modules()}
    with capture(model, names) as cache, torch.no_grad():
        model(input_ids)
    return [
        {
            "hook": name,
            "module": paths[id(layers[i])],
            "shape": tuple(cache[name].shape),
            "dtype": str(cache[name].dtype).replace("torch.", ""),
            "mean_norm": round(float(cache[name].float().norm(dim=-1).mean()), 2),
        }
        for i, name in enumerate(names)
    ]


def default_layers(n_layers: int) -> list[int]:
    """Layers at 1/4, 1/2 and 3/4 of the depth: early, middle and late residual streams."""
    return sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
