"""Chat formatting that is right for nanochat's special tokens and for models with a chat template.

nanochat renders a conversation as `<|bos|><|user_start|>…<|user_end|><|assistant_start|>` and ends the
answer with `<|assistant_end|>`. transformers' NanoChatConfig defaults (bos 0, eos 1) are not those
tokens' ids in real checkpoints, so ids are always looked up by token text here, never taken from
config defaults. Other models use their tokenizer's chat template; a model with neither gets a plain
"User:/Assistant:" prompt (announced by `chat_format_of` returning "plain").
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from helpers.model.protocols import HookableModel, Tokenizer

NANOCHAT_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
NANOCHAT_ANSWER = ("<|assistant_start|>", "<|assistant_end|>")


def chat_format_of(tokenizer: Tokenizer) -> str:
    """ "nanochat" when the tokenizer has nanochat's special tokens, "template" when it has a chat
    template, else "plain". Looks the special tokens up one by one: `get_vocab()` builds a dict of the
    whole vocabulary (~25 ms for 49k tokens), too slow to call per prompt."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in NANOCHAT_TOKENS]
    if all(i is not None and i != tokenizer.unk_token_id for i in ids):
        return "nanochat"
    if getattr(tokenizer, "chat_template", None):
        return "template"
    return "plain"


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {token!r} token; it is not a nanochat tokenizer")
    return int(tid)


def encode_chat(tokenizer: Tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn conversation, ending where the assistant's answer starts."""
    system_turn = [{"role": "system", "content": system}] if system else []
    return encode_conversation(tokenizer, [*system_turn, {"role": "user", "content": user}])


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation (`[{"role": "system" | "user" | "assistant", "content": ...}]`),
    ending where the next assistant answer starts: what sampling feeds the model, and the prompt of a
    transcript read through it."""
    fmt = chat_format_of(tokenizer)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if fmt == "nanochat":
        # nanochat has no system role: its own renderer prepends a system message to the first user turn.
        t = {tok: _token_id(tokenizer, tok) for tok in NANOCHAT_TOKENS}
        ids = [t["<|bos|>"]]
        for m in turns:
            text = m["content"]
            if m["role"] == "user":
                text, system = (f"{system}\n\n{text}" if system else text), ""
            start, end = ("<|user_start|>", "<|user_end|>") if m["role"] == "user" else NANOCHAT_ANSWER
            ids += [t[start], *tokenizer.encode(text, add_special_tokens=False), t[end]]
        return [*ids, t["<|assistant_start|>"]]
    if fmt == "template":
        # Render to text, then tokenise: same ids as tokenize=True (the template writes its own special
        # tokens, hence add_special_tokens=False) and ~300x faster, which matters for thousands of prompts.
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    prefix = f"{system}\n\n" if system else ""
    lines = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in turns)
    return tokenizer.encode(f"{prefix}{lines}Assistant:", add_special_tokens=True)


def stop_token_ids(tokenizer: Tokenizer, generation_config: Any = None) -> list[int]:
    """Token ids that end an assistant turn."""
    if chat_format_of(tokenizer) == "nanochat":
        return [_token_id(tokenizer, "<|assistant_end|>"), _token_id(tokenizer, "<|bos|>")]
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    if not ids:
        raise ValueError("the tokenizer defines no end-of-sequence token: pass stop ids explicitly")
    return sorted(ids)


def pad_token_id(tokenizer: Tokenizer) -> int:
    """A pad id for batching: the tokenizer's own, else bos (nanochat has none), else the first stop id.

    Padded positions are masked out of attention, so any valid id works."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if chat_format_of(tokenizer) == "nanochat":
        return _token_id(tokenizer, "<|bos|>")
    return stop_token_ids(tokenizer)[0]


def chat(
    lm: HookableModel,
    user: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """One assistant reply (greedy when temperature is 0). Batched sampling lives in `collect.sampling`.

    A plain KV-cached loop rather than `model.generate`, so it runs the same on every model this package
    loads (our nanochat 2026 class has no `generate`); the random draws come from a generator seeded
    with `seed`, not from the global RNG."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    model, tokenizer = lm.model, lm.tokenizer
    stops = set(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([encode_chat(tokenizer, user, system)], device=model.device)
    cache = DynamicCache(config=model.config)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits[0, -1].float()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token in stops:
                break
            new.append(token)
            ids = torch.tensor([[token]], device=model.device)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed forward's `past_key_values` to `cache` (5.2x, the old name warns); Colab's 5.15
    and our nanochat class accept the names their signatures show."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
