"""EleutherAI sparsify's command line, able to load this package's nanochat checkpoints and run on a T4.

    python -m helpers.saes.sparsify_main <model> <tokens.bin> --ctx_len 256 --hookpoints h.6 ...   # 1 GPU
    torchrun --nproc_per_node 8 -m helpers.saes.sparsify_main <model> <tokens.bin> ...           # 8 GPUs

The arguments are sparsify's own (`python -m sparsify --help`; `handoff.sparsify_command` writes them).
Two things happen before sparsify's `run()`:

- our nanochat class (`model.nanochat_gpt`, the 2026 layouts transformers cannot hold) is registered
  with `AutoModel` as well, since sparsify loads `AutoModel.from_pretrained(model)` for its default
  `fvu` loss and hooks `model.base_model` (our `transformer`, so layer i is hookpoint `h.{i}`);
- on a GPU without native bf16 (compute capability below 8: T4, V100) `torch.cuda.is_bf16_supported`
  is made to answer False, announced: sparsify asks it to pick the model's dtype and to autocast its
  SAE forward to bf16, which such a GPU only emulates, slowly (the flag must be set before sparsify is
  imported, as its decorator reads it then).
"""

from __future__ import annotations

import torch
from transformers import AutoModel

from helpers.model.nanochat_gpt import NanoChatGPTConfig, NanoChatGPTForCausalLM


def register() -> None:
    """Let `AutoModel.from_pretrained` load our nanochat folders (AutoModelForCausalLM already can)."""
    AutoModel.register(NanoChatGPTConfig, NanoChatGPTForCausalLM, exist_ok=True)


def main() -> None:
    register()
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
        name = torch.cuda.get_device_name()
        print(
            f"{name} has no native bf16: sparsify runs without bf16 (model in its saved dtype, SAE in fp32)"
        )
        torch.cuda.is_bf16_supported = lambda *args, **kwargs: False
    from sparsify.__main__ import run  # after the flag above: sparsify reads it at import

    run()


if __name__ == "__main__":
    main()
