"""Reference-corpus packing: documents tokenised into fixed-length sequences, the positions stored,
the held-out split, and padding a batch of token lists.

    sequences   documents tokenised and packed into fixed-length sequences, each starting with a
                separator token (nanochat's <|bos|>, else the tokenizer's BOS/end-of-text), as SAELens and
                nanochat's own loader do.
    positions   the first `SKIP_FIRST` positions of every sequence and every special token are left out:
                their residuals can carry norms ~100x the others and would dominate a dictionary's
                reconstruction loss (`corpus.py`'s docstring has the measured norms).
    split       a fixed ~5% of sequences (`is_heldout`, by a hash of the index) is held out from training
                on both the stored and the streamed path, for evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from helpers.model.chat import NANOCHAT_TOKENS, chat_format_of
from helpers.model.protocols import Tokenizer
from helpers.run import stable_hash

EVAL_FRACTION = 0.05
"""The share of sequences held out from training (`is_heldout`)."""
SKIP_FIRST = 2
"""Positions never stored at the start of each sequence: the separator and the attention sink after it."""


@dataclass(frozen=True)
class Packing:
    """How documents become fixed-length sequences for one tokenizer."""

    seq_len: int
    separator: int
    """Starts every sequence and separates documents."""
    special_ids: frozenset[int]
    """Tokens whose positions are not stored (with the first `skip_first` positions)."""
    skip_first: int = SKIP_FIRST
    """Positions 0 .. skip_first - 1 of every sequence are never stored (the separator and the attention
    sink after it; see the module doc)."""

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, seq_len: int) -> Packing:
        if seq_len <= SKIP_FIRST:
            raise ValueError(
                f"seq_len must be above {SKIP_FIRST} (positions 0-{SKIP_FIRST - 1} are never stored), "
                f"got {seq_len}"
            )
        special = {int(i) for i in tokenizer.all_special_ids}
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
        if chat_format_of(tokenizer) == "nanochat":
            nanochat = [tokenizer.convert_tokens_to_ids(t) for t in NANOCHAT_TOKENS]
            special |= set(nanochat)
            sep = nanochat[0]  # <|bos|> starts every document in nanochat's pretraining
        else:  # the BOS a tokenizer prepends itself, else GPT-2 style <|endoftext|>, else EOS or BOS
            first = tokenizer("a")["input_ids"][:1]
            adds_bos = tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id]
            eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
            eot = eot if eot is not None and tokenizer.convert_ids_to_tokens(eot) == "<|endoftext|>" else None
            candidates = (
                tokenizer.bos_token_id if adds_bos else None,
                eot,
                tokenizer.eos_token_id,
                tokenizer.bos_token_id,
            )
            sep = next((t for t in candidates if t is not None), None)
            if sep is None:
                raise ValueError("the tokenizer has no BOS, end-of-text or EOS token to separate documents")
        return cls(seq_len, int(sep), frozenset(special | {int(sep)}))

    def keep(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] bool: the positions whose residuals are stored."""
        mask = ~torch.isin(ids, torch.tensor(sorted(self.special_ids), device=ids.device))
        mask[:, : self.skip_first] = False
        return mask


def encode_document(tokenizer: Tokenizer, doc: str | list[dict]) -> list[int]:
    """Token ids of a document: plain text, or chat messages in the model's own chat format."""
    if isinstance(doc, str):
        return tokenizer.encode(doc, add_special_tokens=False)
    if not isinstance(doc, list) or not all(isinstance(m, dict) and "content" in m for m in doc):
        raise ValueError(
            f"a chat document must be a list of {{'role', 'content'}} messages, got {str(doc)[:80]}"
        )
    if chat_format_of(tokenizer) == "nanochat":
        return _nanochat_conversation(tokenizer, doc)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(doc, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(
        "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in doc), add_special_tokens=False
    )


def _nanochat_conversation(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """nanochat's rendering of a conversation (its tokenizer's `render_conversation`), without the leading
    <|bos|> (the packing's separator): a system message joins the first user message, and an assistant
    message may be a list of parts (`text`, `python` tool calls, `python_output`) in their special tokens."""
    sp = lambda name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")  # noqa: E731
    enc = lambda text: tokenizer.encode(str(text), add_special_tokens=False)  # noqa: E731
    wrap = {"python": ("python_start", "python_end"), "python_output": ("output_start", "output_end")}
    if messages and messages[0].get("role") == "system" and len(messages) > 1:
        messages = [
            {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"},
            *messages[2:],
        ]
    ids: list[int] = []
    for m in messages:
        if m.get("role") == "user":
            ids += [sp("user_start"), *enc(m["content"]), sp("user_end")]
            continue
        ids.append(sp("assistant_start"))
        for part in (
            m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        ):
            start, end = wrap.get(part.get("type"), (None, None))
            ids += [sp(start)] * bool(start) + enc(part["text"]) + [sp(end)] * bool(end)
        ids.append(sp("assistant_end"))
    return ids


def iter_sequences(
    tokenizer: Tokenizer, docs: Iterable[str | list[dict]], packing: Packing
) -> Iterator[list[int]]:
    """Sequences of `packing.seq_len` tokens: the separator, then the next seq_len - 1 tokens of the
    documents joined by separators. The last one may be shorter."""
    buf: list[int] = []
    width = packing.seq_len - 1
    for doc in docs:
        buf += encode_document(tokenizer, doc)
        buf.append(packing.separator)
        while len(buf) >= width:
            yield [packing.separator, *buf[:width]]
            del buf[:width]
    if len(buf) > 1:
        yield [packing.separator, *buf[:-1]]  # without the trailing separator


def sequence_id(index: int) -> str:
    return f"seq{index:09d}"


def is_heldout(index: int, seed: int = 0, fraction: float = EVAL_FRACTION) -> bool:
    """The fixed ~5% of sequences kept out of training (the same on the stored and streamed paths)."""
    return stable_hash(seed, "corpus-eval", index) % 10_000 < fraction * 10_000


def split_corpus(ids: Iterable[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out) sequence ids of a stored corpus."""
    ids = list(ids)
    held = [i for i in ids if is_heldout(int(i.removeprefix("seq")), seed)]
    held_set = set(held)
    return [i for i in ids if i not in held_set], held


def pad_batch(
    rows: list[list[int]], pad_id: int, device: Any, *, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n, width]` token ids and attention mask (1 on real tokens) of `rows`, padded on `side`.

    Right padding keeps every real token at its unpadded position (activation capture); left padding
    puts every row's next token in the same column (batched decoding)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)
