"""Chat formatting that is right for nanochat's special tokens and for models with a chat template.

nanochat renders a conversation as `<|bos|><|user_start|>…<|user_end|><|assistant_start|>` and ends the
answer with `<|assistant_end|>`. transformers' NanoChatConfig defaults (bos 0, eos 1) are not those
tokens' ids in real checkpoints, so ids are always looked up by token text here, never taken from
config defaults. Other models use their tokenizer's chat template; a model with neither gets a plain
"User:/Assistant:" prompt (announced by `chat_format_of` returning "plain").
"""

from __future__ import annotations

from typing import Any

import torch

NANOCHAT_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")


def chat_format_of(tokenizer: Any) -> str:
    """ "nanochat" when the tokenizer has nanochat's special tokens, "template" when it has a chat
    template, else "plain". Looks the special tokens up one by one: `get_vocab()` builds a dict of the
    whole vocabulary (~25 ms for 49k tokens), too slow to call per prompt."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in NANOCHAT_TOKENS]
    if all(i is not None and i != tokenizer.unk_token_id for i in ids):
        return "nanochat"
    if getattr(tokenizer, "chat_template", None):
        return "template"
    return "plain"


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {token!r} token; it is not a nanochat tokenizer")
    return int(tid)


def encode_chat(tokenizer: Any, user: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn conversation, ending where the assistant's answer starts."""
    fmt = chat_format_of(tokenizer)
    if fmt == "nanochat":
        # nanochat has no system role: its own renderer prepends a system message to the first user turn.
        text = f"{system}\n\n{user}" if system else user
        ids = tokenizer.encode(text, add_special_tokens=False)
        t = {tok: _token_id(tokenizer, tok) for tok in NANOCHAT_TOKENS}
        return [t["<|bos|>"], t["<|user_start|>"], *ids, t["<|user_end|>"], t["<|assistant_start|>"]]
    if fmt == "template":
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        # Render to text, then tokenise: same ids as tokenize=True (the template writes its own special
        # tokens, hence add_special_tokens=False) and ~300x faster, which matters for thousands of prompts.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    prefix = f"{system}\n\n" if system else ""
    return tokenizer.encode(f"{prefix}User: {user}\nAssistant:", add_special_tokens=True)


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
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


def pad_token_id(tokenizer: Any) -> int:
    """A pad id for batching: the tokenizer's own, else bos (nanochat has none), else the first stop id.

    Padded positions are masked out of attention, so any valid id works."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if chat_format_of(tokenizer) == "nanochat":
        return _token_id(tokenizer, "<|bos|>")
    return stop_token_ids(tokenizer)[0]


def chat(
    lm: Any,
    user: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """One assistant reply (greedy when temperature is 0). Batched sampling lives in `sampling`."""
    model, tokenizer = lm.model, lm.tokenizer
    ids = torch.tensor([encode_chat(tokenizer, user, system)], device=model.device)
    stops = stop_token_ids(tokenizer, model.generation_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=pad_token_id(tokenizer),
        )
    new = out[0, ids.shape[1] :].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
