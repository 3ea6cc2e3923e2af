"""Tiny random checkpoints of four architectures, written the way users hold them, for sweep tests:
nanochat's 2025 and 2026 native layouts (as nanochat's own checkpoint manager writes them), and Llama- and
GPT-NeoX-family models as transformers folders (config.json + safetensors + the offline SmolLM2
tokenizer with its chat template). Seeded; built in a few seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from helpers.model.load import offline_gguf_path
from tests.model.nanochat_oracle import WORDS, write_tiny_2026_checkpoint
from tests.model.test_nanochat import build_native_checkpoint

_TOKENIZER: list = []


def offline_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from the offline GGUF (no download)."""
    if not _TOKENIZER:
        gguf = offline_gguf_path()
        _TOKENIZER.append(tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    return _TOKENIZER[0]


def hf_folder(folder: Path, family: str, *, n_layers: int = 4, seed: int = 0) -> Path:
    """A tiny random transformers model of `family` ("llama" or "gpt_neox") saved in `folder`."""
    tok = offline_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    elif family == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))
    else:
        raise ValueError(f"family must be 'llama' or 'gpt_neox', got {family!r}")
    # Random weights babble random sub-words, which leave a bag-of-words control no word to count: the head
    # favours a few whole English words and the end-of-turn token, so the model babbles words (and stops).
    words = sorted({tok.encode(w, add_special_tokens=False)[0] for w in WORDS} | {tok.eos_token_id})
    head = model.get_output_embeddings()
    with torch.no_grad():
        weight = torch.zeros_like(head.weight)
        weight[words] = torch.randn(len(words), weight.shape[1]) * 2.0
        head.weight.copy_(weight)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def nanochat_2025(folder: Path) -> Path:
    """nanochat's 2025 layout (2 layers × 64), native files."""
    build_native_checkpoint(folder)
    return folder


def nanochat_2026(folder: Path) -> Path:
    """nanochat's newest layout (4 layers × 64), native files; babbles English words."""
    return write_tiny_2026_checkpoint(folder, n_layer=4, seq_len=512)
