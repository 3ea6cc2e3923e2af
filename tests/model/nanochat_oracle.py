"""Upstream nanochat as an oracle: import its `GPT` at one of the commits in ../shared/oracles, build a small
random model, and save it exactly as nanochat saves a checkpoint (state dict, `meta_<step>.json`, a pickled
tiktoken tokenizer). Shared by the nanochat tests; the oracle is imported, never copied.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import tiktoken
import torch

from helpers.model.nanochat import SPECIAL_TOKENS
from helpers.sweep.tiny import WORDS

ORACLES = Path(__file__).resolve().parents[2].parent / "shared" / "oracles" / "nanochat"
COMMITS = ("2025-10-21-a088b7a", "2026-01-30-2e17723", "2026-07-03-92d63d4")
LAYOUT_OF = {
    "2025-10-21-a088b7a": "2025-10",
    "2026-01-30-2e17723": "2026-01-16b",
    "2026-07-03-92d63d4": "2026-03-14",
}
"""The layout each oracle commit writes (nanochat_layouts.LAYOUTS)."""

# Small models that exercise every feature: GQA, sliding windows that bite (sequences longer than the short
# window), value embeddings, smear and backout. The 2026-07 short window is ceil(seq/4/128)*128 = 128.
CONFIGS = {
    "2025-10-21-a088b7a": dict(sequence_len=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=64),
    "2026-01-30-2e17723": dict(
        sequence_len=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL"
    ),
    "2026-07-03-92d63d4": dict(
        sequence_len=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL"
    ),
}
LONG = {"2025-10-21-a088b7a": 40, "2026-01-30-2e17723": 48, "2026-07-03-92d63d4": 160}
"""A test sequence length past each commit's short window (32, 32 and 128 tokens)."""

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"th", b"the", b" the"]


def tiny_encoding() -> tiktoken.Encoding:
    """256 byte tokens + a few merges, then nanochat's special tokens right after (as nanochat does)."""
    ranks = {bytes([i]): i for i in range(256)}
    for m in MERGES:
        ranks[m] = len(ranks)
    special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )


def oracle_dir(commit: str) -> Path:
    path = ORACLES / commit
    if not (path / "nanochat" / "gpt.py").is_file():
        pytest.skip(
            f"upstream nanochat oracle {commit} is not at {path}: ../shared/oracles is absent on this "
            "machine (CI has it), so the comparison with upstream's own code cannot run"
        )
    return path


def import_oracle(commit: str, module: str = "gpt", compute_dtype: str | None = None) -> types.ModuleType:
    """`nanochat.<module>` of that commit, freshly imported (a previous commit's modules are dropped).
    `compute_dtype` sets NANOCHAT_DTYPE, read at import by the 2026-03+ code."""
    path = oracle_dir(commit)
    for name in [n for n in sys.modules if n == "nanochat" or n.startswith("nanochat.")]:
        del sys.modules[name]
    # tokenizer.py imports rustbpe (a training-only extension) at module level; it is never called here.
    sys.modules.setdefault("rustbpe", types.ModuleType("rustbpe"))
    old_env = os.environ.get("NANOCHAT_DTYPE")
    if compute_dtype:
        os.environ["NANOCHAT_DTYPE"] = compute_dtype
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module(f"nanochat.{module}")
    finally:
        sys.path.remove(str(path))
        for name in [n for n in sys.modules if n == "nanochat" or n.startswith("nanochat.")]:
            del sys.modules[name]
        if compute_dtype:
            if old_env is None:
                os.environ.pop("NANOCHAT_DTYPE")
            else:
                os.environ["NANOCHAT_DTYPE"] = old_env


def build_oracle(commit: str, *, seed: int = 0, compute_dtype: str | None = None):
    """(upstream GPT in eval mode with perturbed weights, its model_config dict). Upstream's init zeroes the
    output projections and starts the gates neutral, which would hide most of the architecture: every
    weight gets seeded noise (matrices ~ 1/sqrt(fan_in), scalars ~ 0.3)."""
    gpt = import_oracle(commit, compute_dtype=compute_dtype)
    model_config = dict(CONFIGS[commit], vocab_size=tiny_encoding().n_vocab)
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**model_config))
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            scale = p.shape[1] ** -0.5 if p.ndim == 2 else 0.3
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return model.eval().requires_grad_(False), model_config


def save_native(
    model,
    model_config: dict,
    folder: Path,
    *,
    step: int = 10,
    compile_prefix: bool = False,
    state_dict: dict | None = None,
    encoding: tiktoken.Encoding | None = None,
) -> Path:
    """Write `model` as nanochat's checkpoint_manager.save_checkpoint does, plus tokenizer.pkl."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    if compile_prefix:
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    torch.save(sd, folder / f"model_{step:06d}.pt")
    meta = {"step": step, "val_bpb": 1.0, "model_config": model_config, "user_config": {}}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    with open(folder / "tokenizer.pkl", "wb") as f:
        pickle.dump(encoding or tiny_encoding(), f)
    return folder


def sample_ids(n: int, *, seed: int = 1) -> list[int]:
    """A bos followed by n - 1 random token ids (specials excluded)."""
    g = torch.Generator().manual_seed(seed)
    enc = tiny_encoding()
    return [enc._special_tokens["<|bos|>"], *torch.randint(0, 268, (n - 1,), generator=g).tolist()]


def block_outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, the output of every upstream Block): the residual stream after each block."""
    outs: list[torch.Tensor] = []
    handles = [
        b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach())) for b in model.transformer.h
    ]
    try:
        with torch.no_grad():
            logits = model(ids)
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def word_encoding() -> tiktoken.Encoding:
    """Bytes, then every prefix of a few English words (so each is one token, with valid BPE merges), then
    nanochat's special tokens."""
    ranks = {bytes([i]): i for i in range(256)}
    for word in WORDS:
        for end in range(2, len(word) + 1):
            ranks.setdefault(word[:end].encode(), len(ranks))
    special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name="words", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )


def write_tiny_2026_checkpoint(
    folder: Path, *, n_layer: int = 8, n_embd: int = 64, seq_len: int = 2048
) -> Path:
    """A tiny random checkpoint of the newest layout (2026-03-14), written as nanochat writes one, for runs
    that must not depend on ../shared/oracles (the notebook smoke test): built with our own class, whose
    parameter names are upstream's (`detect_layout` checks the keys when it loads). Random weights would
    babble random bytes, which leaves a bag-of-words control nothing to count: the lm_head favours the
    whole-word tokens of `word_encoding`, so the model babbles English words (and still stops at times)."""
    from helpers.model import nanochat_layouts as layouts
    from helpers.model.nanochat_gpt import NanoChatGPTConfig, NanoChatGPTForCausalLM

    enc, layout = word_encoding(), layouts.LAYOUTS[-1]
    model_config = dict(
        sequence_len=seq_len,
        vocab_size=enc.n_vocab,
        n_layer=n_layer,
        n_head=4,
        n_kv_head=2,
        n_embd=n_embd,
        window_pattern="SSSL",
    )
    b = layouts.resolve_behaviour(layout, model_config)
    config = NanoChatGPTConfig(
        vocab_size=enc.n_vocab,
        padded_vocab_size=-(-enc.n_vocab // 64) * 64,
        hidden_size=n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        attention_windows=b["attention_windows"],
        value_embed_layers=layout.value_embed_layers(n_layer),
        ve_gate_channels=layout.ve_gate_channels,
        smear_channels=24,
        backout_layer=n_layer // 2,
    )
    torch.manual_seed(0)
    model = NanoChatGPTForCausalLM(config)
    words = [enc.encode_single_token(w.encode()) for w in WORDS] + [
        enc.encode_single_token("<|assistant_end|>")
    ]
    with torch.no_grad():
        head = torch.zeros_like(model.lm_head.weight)
        head[words] = torch.randn(len(words), n_embd) * 2.0
        model.lm_head.weight.copy_(head)
    return save_native(model, model_config, folder, encoding=enc)
