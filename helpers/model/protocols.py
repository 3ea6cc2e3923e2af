"""What the rest of the package asks of a model and of an SAE, as `typing.Protocol`s (structural types:
nothing needs to inherit from them, a value with the attributes fits).

- `HookableModel`: a chat model we can run, hook and decode with: a torch causal LM whose decoder
  layers `model.hooks` finds, and its tokenizer. `model.load.LoadedModel` is one; so is any object with
  these two attributes (the tests' tiny models).
- `EncodingSAE`: an SAE we can encode residual vectors with and read the decoder of: every SAE of
  `helpers.saes` (`saes.base.SAE`). `WrappedSAE` is one carried with where it belongs
  (`saes.io.LoadedSAE`); `AnySAE` accepts either, for the functions that unwrap it.

- `Tokenizer`: the model's tokenizer. Every model we load carries a Hugging Face tokenizer (nanochat's
  tiktoken file is converted to one), so it is transformers' `PreTrainedTokenizerBase`.

They live in `model/`, the lowest stage but the core, so every stage that takes a model or an SAE can
import them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase


@runtime_checkable
class HookableModel(Protocol):
    """A loaded chat model: `model` a torch causal LM (`.device`, `.config`, forward hooks on its decoder
    layers), `tokenizer` its Hugging Face tokenizer (a chat template for chat models)."""

    @property
    def model(self) -> Any: ...

    @property
    def tokenizer(self) -> Tokenizer: ...


Tokenizer = PreTrainedTokenizerBase
"""A loaded model's tokenizer (`LoadedModel.tokenizer`)."""

ModelOrModule = HookableModel | torch.nn.Module
"""A loaded model, or the bare torch module (functions that only hook the residual accept either)."""


@runtime_checkable
class EncodingSAE(Protocol):
    """An SAE: `encode(x [..., d_in])` returns `(latents [..., d_sae], pre-activations)`, `W_dec`
    [d_sae, d_in] is what each latent writes into the residual."""

    d_in: int
    d_sae: int
    W_dec: torch.Tensor

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class WrappedSAE(Protocol):
    """An SAE with where it belongs: the hook and layer it reads (`saes.io.LoadedSAE`)."""

    @property
    def sae(self) -> EncodingSAE: ...

    @property
    def layer(self) -> int: ...


AnySAE = EncodingSAE | WrappedSAE
"""A bare SAE, or one wrapped with its layer (functions that unwrap it with `getattr(sae, "sae", sae)`)."""
