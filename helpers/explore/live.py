"""Live tracking during generation and the prompt analyser: which SAE features fire at each token as
the model writes (nanochat-SAE's "runtime interpretation"), with the deception meter (meter.py) beside
them, and per-token activations of chosen or top features over any text.

`track_generation` decodes one token at a time with the KV cache and a capture hook at the SAE's layer
(and the meter's): feeding the token just sampled gives both its residual (what the features read) and
the logits of the next one, so tracking costs no extra forward pass. Sampling is `sampling.sample_next`
(greedy at temperature 0, else a draw from a seeded CPU generator), so a seed reproduces an answer. A
steering context (steer.directions.steer / clamp_feature) may wrap it: the capture then sees the steered
residual, so the features shown are those of the steered model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from helpers.analysis.contexts import token_pieces
from helpers.collect.sampling import SamplingSettings, sample_next
from helpers.explore.meter import DeceptionMeter
from helpers.model.chat import cache_kwarg, encode_chat, stop_token_ids
from helpers.model.hooks import capture, hook_name, run_with_capture
from helpers.model.protocols import HookableModel, Tokenizer
from helpers.saes.io import LoadedSAE
from helpers.steer.directions import check_sae_matches

NO_FEATURE_FIRES = "no feature fires on this text: every feature of this SAE is 0 on all of its tokens"
LIVE_SAMPLING = SamplingSettings(temperature=0.0, max_new_tokens=48, seed=0, batch_size=1)
"""The explorer's sampling defaults (`track_generation`, and `panel.explorer_panel` for all its tabs):
greedy, short answers, one at a time."""


@dataclass
class TokenStep:
    """One generated token and what fired on it."""

    index: int
    token_id: int
    text: str
    features: list[tuple[int, float]]
    """The `top_n` most active features at this token, (feature, activation), strongest first."""
    n_firing: int
    """How many features are > 0 at this token."""
    meter: float | None = None
    """The deception meter on this token's residual alone (see meter.CAVEAT)."""
    meter_running: float | None = None
    """The deception meter on the mean residual of the answer's tokens so far."""
    acts: np.ndarray | None = field(default=None, repr=False)
    """[d_sae] every feature's activation at this token (for the analyser)."""


def _piece(tokenizer: Tokenizer, ids: list[int], context: int = 8) -> str:
    """The text the last of `ids` adds (as contexts.token_pieces, for one token at a time)."""

    def text(part: list[int]) -> str:
        out = tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return out.rstrip("\ufffd")

    prev, cur = text(ids[-context - 1 : -1]), text(ids[-context - 1 :])
    return cur[len(prev) :] if cur.startswith(prev) else text(ids[-1:])


@torch.no_grad()
def track_generation(
    lm: HookableModel,
    sae: LoadedSAE,
    prompt: str,
    *,
    system: str | None = None,
    meter: DeceptionMeter | None = None,
    top_n: int = 5,
    steering: AbstractContextManager | None = None,
    **sampling: Any,
) -> Iterator[TokenStep]:
    """Generate an answer to `prompt` token by token, yielding each token with the features that fire
    on it and the deception meter's readings (module doc). Stops at the model's end-of-turn token.
    `sampling`: fields of `LIVE_SAMPLING` (greedy, 48 new tokens, seed 0) to change, e.g. `seed=1,
    temperature=0.7` (one answer at a time: `batch_size` does not apply)."""
    settings = LIVE_SAMPLING.with_overrides(sampling)
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: type a question for the model")
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}")
    check_sae_matches(sae, lm, sae.layer)
    model, tok = lm.model, lm.tokenizer
    names = sorted({hook_name(sae.layer)} | ({hook_name(meter.layer)} if meter is not None else set()))
    stops = set(stop_token_ids(tok, getattr(model, "generation_config", None)))
    device = next(model.parameters()).device
    param = next(sae.sae.parameters())
    ids = encode_chat(tok, prompt, system)
    generator = torch.Generator().manual_seed(settings.seed)
    answer: list[int] = []
    running, n = None, 0
    kv = {cache_kwarg(model): DynamicCache(config=model.config)}  # filled in place by every forward
    with steering or nullcontext(), capture(model, names) as cache:
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=True, **kv).logits[:, -1]
        for i in range(settings.max_new_tokens):
            nxt = sample_next(logits.float(), [generator], settings.temperature, settings.top_p)  # [1]
            t = int(nxt[0])
            if t in stops:
                return
            answer.append(t)
            logits = model(input_ids=nxt.view(1, 1).to(device), use_cache=True, **kv).logits[:, -1]
            resid = cache[hook_name(sae.layer)][0, -1]  # [d_model] the residual after reading token t
            acts = sae.sae.encode(resid[None].to(param.device, torch.float32))[0][0].float().cpu()
            k = min(top_n, len(acts))
            top = acts.topk(k)
            step = TokenStep(
                i,
                t,
                _piece(tok, ids + answer),
                [(int(f), float(a)) for f, a in zip(top.indices, top.values, strict=True) if a > 0],
                int((acts > 0).sum()),
                acts=acts.numpy(),
            )
            if meter is not None:
                r = cache[hook_name(meter.layer)][0, -1].float().cpu()
                running = r.clone() if running is None else running + r
                n += 1
                step.meter = float(meter.score(r)[0])
                step.meter_running = float(meter.score(running / n)[0])
            yield step


def analyse_text(
    lm: HookableModel, sae: LoadedSAE, text: str, *, features: Sequence[int] | None = None, top_n: int = 6
) -> tuple[list[str], list[int], np.ndarray]:
    """(tokens, features, acts [n_tokens, len(features)]) of `text` through the model and the SAE: the
    given features, or up to `top_n` with the largest activation anywhere in the text among those that
    fire on it (none when no feature does: `NO_FEATURE_FIRES`, never features 0..5 at 0).

    The text is read after the tokenizer's BOS token when it has one (as the model reads every prompt):
    the first position of a sequence is an attention sink whose residual norm is far above every other
    token's, which SAEs trained on answer tokens never saw; without a BOS the text's first token would
    take that role and dominate the top features."""
    if not text or not text.strip():
        raise ValueError("the text is empty: type the text to analyse")
    check_sae_matches(sae, lm, sae.layer)
    d_sae = int(sae.sae.d_sae)
    bad = [f for f in features or () if not 0 <= int(f) < d_sae]
    if bad:
        raise IndexError(
            f"feature(s) {bad} out of range: this SAE has d_sae={d_sae} latents (0..{d_sae - 1})"
        )
    tok = lm.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    device = next(lm.model.parameters()).device
    name = hook_name(sae.layer)
    resid = run_with_capture(lm.model, [name], input_ids=torch.tensor([bos + ids], device=device))[name][
        0, len(bos) :
    ]
    param = next(sae.sae.parameters())
    with torch.no_grad():
        acts = sae.sae.encode(resid.to(param.device, torch.float32))[0].float().cpu().numpy()  # [n, d_sae]
    chosen = [int(f) for f in features] if features else _top_firing(acts, top_n)
    return token_pieces(tok, ids), chosen, acts[:, chosen]


def _top_firing(acts: np.ndarray, top_n: int) -> list[int]:
    """The (up to) `top_n` features of acts [n_tokens, d_sae] with the largest maximum, among those > 0."""
    peak = acts.max(0) if len(acts) else np.zeros(acts.shape[1])
    return [int(f) for f in np.argsort(-peak, kind="stable")[:top_n] if peak[f] > 0]


def answer_acts(
    steps: Sequence[TokenStep], features: Sequence[int] | None = None, top_n: int = 6
) -> tuple[list[str], list[int], np.ndarray]:
    """The analyser's view of a tracked answer: (tokens, features, acts [n_tokens, len(features)]), the
    features chosen as in `analyse_text`."""
    if not steps:
        return [], [], np.zeros((0, 0), np.float32)
    full = np.stack([s.acts for s in steps])  # [n, d_sae]
    chosen = [int(f) for f in features] if features else _top_firing(full, top_n)
    return [s.text for s in steps], chosen, full[:, chosen]
