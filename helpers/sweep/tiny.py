"""Tiny random checkpoints for smoke runs of notebook 07 (`NB_SMOKE=1`), where nothing can be downloaded.

A sweep's machinery (plan, one model after another, resume, the comparison across architectures) needs
models of several architectures; offline there is one real model (`OFFLINE_MODEL`). These are Llama- and
GPT-NeoX-family models of a few layers × 64, random weights, saved as transformers folders with the
offline model's tokenizer and chat template, exactly as a user's own folder would be. Their numbers say
nothing about deception: even a random network carries the prompt's honest / dishonest instruction into
the answer's residuals, so an instructed train set is separable (smoke AUROCs of 1.0 are that, and the
prompt-only probe row shows it). A smoke run checks that the sweep runs, never what it finds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import transformers as tf

from helpers.model.load import offline_gguf_path

FAMILIES = ("llama", "gpt_neox")
# The whole English words the random heads favour (see below); the tests' tiny nanochat checkpoints too.
WORDS = (
    " the",
    " car",
    " is",
    " safe",
    " not",
    " yes",
    " no",
    " I",
    " was",
    " there",
    " it",
    " fine",
    " broken",
    " honest",
    " never",
    " saw",
    " money",
    " wallet",
    " report",
    " done",
    " sure",
    " we",
    " can",
    " sell",
)


def tiny_config(
    family: str, tokenizer, *, width: int, n_layers: int, max_positions: int
) -> tf.PretrainedConfig:
    """The transformers config of a tiny `family` model over `tokenizer`'s vocabulary and special tokens:
    `width` wide, 4 heads (Llama: 2 key-value heads), an MLP twice as wide, an untied head."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=2 * width,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    return tf.GPTNeoXConfig(**common)


def tiny_random_model(folder: str | os.PathLike, family: str, *, n_layers: int = 4, seed: int = 0) -> Path:
    """Write a random `family` model (n_layers × 64) with SmolLM2's tokenizer into
    `folder` (kept if there)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    gguf = offline_gguf_path()
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = tiny_config(family, tok, width=64, n_layers=n_layers, max_positions=512)
    torch.manual_seed(seed)
    model = (tf.LlamaForCausalLM if family == "llama" else tf.GPTNeoXForCausalLM)(config)
    # Random weights babble random sub-words, which leave the bag-of-words control no word to count: the
    # head favours a few whole English words and the end-of-turn token, so the model babbles words and stops.
    words = sorted({tok.encode(w, add_special_tokens=False)[0] for w in WORDS} | {tok.eos_token_id})
    head = model.get_output_embeddings()
    with torch.no_grad():
        weight = torch.zeros_like(head.weight)
        weight[words] = torch.randn(len(words), weight.shape[1]) * 2.0
        head.weight.copy_(weight)
    # Written beside the folder and renamed into place: a second process building the same model at the
    # same time (two smoke runs sharing a cache) never reads a half-written folder.
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp)
        if not (folder / "config.json").is_file():
            raise
    return folder
