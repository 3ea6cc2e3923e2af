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

from helpers.model.load import offline_gguf_path

FAMILIES = ("llama", "gpt_neox")
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
    " never",
    " saw",
    " money",
    " report",
    " done",
    " sure",
    " we",
    " can",
)


def tiny_random_model(folder: str | os.PathLike, family: str, *, n_layers: int = 4, seed: int = 0) -> Path:
    """Write a random `family` model (n_layers × 64) with SmolLM2's tokenizer into
    `folder` (kept if there)."""
    import transformers as tf

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    gguf = offline_gguf_path()
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    else:
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))
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
