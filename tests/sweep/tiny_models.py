"""Tiny random nanochat checkpoints in nanochat's 2025 and 2026 native layouts (as nanochat's own checkpoint
manager writes them), for the sweep tests; the Llama- and GPT-NeoX-family folders come from
`helpers.sweep.tiny`, which notebook 07's smoke mode uses too."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.model.nanochat_oracle import tiny_encoding, write_tiny_2026_checkpoint
from tests.model.test_nanochat import build_native_checkpoint


def nanochat_2025(folder: Path) -> Path:
    """nanochat's 2025 layout (2 layers × 64), native files. Its head favours the encoding's whole words
    ("hello", " world", " the"): random bytes would leave the bag-of-words control no word to count."""
    enc = tiny_encoding()
    favoured = [enc.encode_single_token(w) for w in (b"hello", b" world", b" the")]
    g = torch.Generator().manual_seed(1)
    head = torch.zeros(enc.n_vocab, 64)
    head[favoured] = torch.randn(len(favoured), 64, generator=g) * 2.0
    build_native_checkpoint(folder, extra={"lm_head.weight": head})
    return folder


def nanochat_2026(folder: Path) -> Path:
    """nanochat's newest layout (4 layers × 64), native files; babbles English words."""
    return write_tiny_2026_checkpoint(folder, n_layer=4, seq_len=512)
