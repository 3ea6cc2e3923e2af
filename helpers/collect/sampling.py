"""Batched behavioural sampling: many completions per scenario prompt, KV-cached, resumable.

`sample_completions` runs its own KV-cached decoding loop rather than `model.generate`, for three
reasons (bench/sampling.py measures the speed side):

- every prompt is prefilled once per batch and its KV cache copied to its N sample rows, instead of
  N identical prefills;
- rows that hit a stop token leave the batch (their KV cache rows are dropped), so a batch costs what
  its live rows cost, not what its longest row costs;
- each completion draws its random numbers from its own generator, seeded from
  `(seed, prompt_id, sample_index)`. A completion's randomness therefore does not depend on batch
  size, on which other prompts share its batch, or on whether the run was resumed: the only thing
  that can change a sampled token is float rounding in the logits (different batch shapes use
  different matmul kernels), which matters only when a token sits on a sampling boundary. The same
  call with the same seed on the same machine gives identical completions. The global torch RNG is
  neither used nor touched.

When CUDA runs out of memory in a batch, the batch halves (`oom.ShrinkingBatches`, down to one
completion, then an error naming `SamplingSettings.batch_size`): the failed batch's completions are
sampled again from their first token at the smaller size, with fresh generators, and the run goes on at
that size. Nothing of the failed batch was handed to `on_batch`, and nothing handed before is redone.
By the notes above, the completions are those of a run that never failed, but for float rounding: on
the CPU they are identical (tested); on a GPU another batch shape may round a logit differently, which
changes a token only where it sits on a sampling boundary.

Prompts are left-padded so that every row's next token lands in the same column; positions count
real tokens only, so a padded row computes exactly what the unpadded prompt would (tested against
`model.generate` on single prompts).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from helpers.collect.oom import ShrinkingBatches
from helpers.collect.packing import pad_batch
from helpers.model.chat import cache_kwarg, encode_chat, pad_token_id, stop_token_ids
from helpers.model.protocols import HookableModel, Tokenizer
from helpers.run import override_fields

SAMPLING_OOM_FIX = (
    "lower max_new_tokens (notebook 02: MAX_NEW_TOKENS), use shorter prompts, or a GPU with more memory"
)


@dataclass
class Completion:
    """One sampled answer to one prompt; a row of completions.jsonl (labels are added by the judge)."""

    id: str
    """`f"{prompt_id}#{sample_index}"`: stable across runs, so a resumed run skips what it has."""
    prompt_id: str
    sample_index: int
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    """Exactly the tokens the model sampled, without the stop token: activations are recomputed on these."""
    completion: str
    """Decoded with special tokens skipped and stripped; may be empty (kept, never dropped)."""
    n_prompt_tokens: int
    n_tokens: int
    """Number of completion tokens."""
    stopped: bool
    """True when the model produced a stop token, False when it ran out of `max_new_tokens`."""
    seed: int
    """The `seed` argument of the call; the completion's own generator is seeded from it, `prompt_id`
    and `sample_index` (see `completion_seed`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def completion_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The 63-bit seed of one completion's generator (a hash, so neighbouring ids are unrelated)."""
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn: the settings sampling, steering and the panels share.

    Each entry point has its own defaults (a `SamplingSettings` constant) and accepts either a whole
    `sampling=SamplingSettings(...)` or single fields as keywords (`temperature=0`), which win over it
    (`with_overrides`). Invalid values are refused when the settings are made."""

    temperature: float = 1.0
    """0 is greedy; otherwise logits are divided by it before the softmax."""
    top_p: float = 1.0
    """Nucleus mass kept (1 = no cut)."""
    max_new_tokens: int = 128
    seed: int = 0
    """Each completion's generator is seeded from it, its prompt id and its sample index."""
    batch_size: int = 32
    """Completions decoded together (does not change which tokens are drawn; see the module notes).
    Halved when CUDA runs out of memory (notebook 02: BATCH_SIZE)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def with_overrides(self, overrides: dict[str, Any]) -> SamplingSettings:
        """These settings with the fields named in `overrides` replaced; an unknown name is an error
        listing the known ones."""
        return override_fields(self, overrides, "sampling settings")


def sample_completions(
    lm: HookableModel,
    prompts: Sequence[tuple[str, str, str | None]],
    *,
    n_per_prompt: int,
    sampling: SamplingSettings | None = None,
    done_ids: set[str] | frozenset[str] = frozenset(),
    on_batch: Callable[[list[Completion]], None] | None = None,
    stop_ids: Sequence[int] | None = None,
    **overrides: Any,
) -> list[Completion]:
    """Sample `n_per_prompt` completions for each `(prompt_id, user, system)` and return the new ones.

    `sampling` (default `SamplingSettings()`: temperature 1, no nucleus cut, 128 new tokens, seed 0,
    batches of 32) with any of its fields given as keywords instead (`temperature=0` is greedy).
    Completions whose id is in `done_ids` are skipped (resume); `on_batch(completions)` is called after
    every batch so the caller can append them to completions.jsonl as it goes. `stop_ids` overrides
    `chat.stop_token_ids` (`[]` never stops, which the benchmark uses to force a fixed token budget).
    Returned in prompt order, then sample index. CUDA out of memory in a batch halves the batch and
    samples that batch again (module notes).
    """
    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be at least 1, got {n_per_prompt}")
    settings = (sampling or SamplingSettings()).with_overrides(overrides)
    temperature, top_p, max_new_tokens = settings.temperature, settings.top_p, settings.max_new_tokens
    seed, batch_size = settings.seed, settings.batch_size
    model, tokenizer = lm.model, lm.tokenizer
    stops = list(stop_token_ids(tokenizer, model.generation_config) if stop_ids is None else stop_ids)
    encoded = _encode_prompts(model, tokenizer, prompts, max_new_tokens)
    pad_id = pad_token_id(tokenizer)
    todo = [(pid, k) for pid, _, _ in prompts for k in range(n_per_prompt) if f"{pid}#{k}" not in done_ids]
    out: list[Completion] = []
    batches = ShrinkingBatches(
        batch_size,
        what="completions per batch",
        setting="SamplingSettings.batch_size (notebook 02: BATCH_SIZE)",
        fix=SAMPLING_OOM_FIX,
    )

    def sample(batch: list[tuple[str, int]]) -> list[tuple[list[int], bool]]:
        # Fresh generators on every try: a failed try drew from the ones it had.
        generators = [torch.Generator().manual_seed(completion_seed(seed, pid, k)) for pid, k in batch]
        return generate_batch(
            model,
            [encoded[pid] for pid, _ in batch],
            generators,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_ids=stops,
            pad_id=pad_id,
        )

    with tqdm(total=len(todo), desc="sampling", unit="completion") as bar:
        for batch, results in batches.run(todo, sample):
            done = [
                Completion(
                    id=f"{pid}#{k}",
                    prompt_id=pid,
                    sample_index=k,
                    prompt_token_ids=list(encoded[pid]),
                    completion_token_ids=tokens,
                    completion=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    n_prompt_tokens=len(encoded[pid]),
                    n_tokens=len(tokens),
                    stopped=stopped,
                    seed=seed,
                )
                for (pid, k), (tokens, stopped) in zip(batch, results, strict=True)
            ]
            if on_batch is not None:
                on_batch(done)
            out.extend(done)
            bar.update(len(done))
    return out


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    generators: list[torch.Generator],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
) -> list[tuple[list[int], bool]]:
    """Decode one batch of prompt token lists (repeats allowed) → `(new tokens without stop, stopped)`
    per row."""
    device = model.device
    # Prefill each distinct prompt once; `row_of[i]` is row i's prompt among the distinct ones.
    distinct: dict[tuple[int, ...], int] = {}
    row_of = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)
    ids, mask = pad_batch([list(p) for p in distinct], pad_id, device, side="left")  # [U, width] each
    # Positions count real tokens only, so a padded row sees the positions of its unpadded prompt.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{cache_kwarg(model): cache},
        **extra,
    ).logits[:, -1]  # [U, vocab]
    # Copy each prompt's cache to its sample rows: batch goes from U distinct prompts to B rows.
    cache.batch_select_indices(row_of)
    logits, mask, next_pos = logits[row_of], mask[row_of], positions[row_of, -1] + 1  # [B, ...]

    n = len(prompts)
    active = list(range(n))  # original row index of each live row
    tokens: list[list[int]] = [[] for _ in range(n)]
    stopped = [False] * n
    stop_set = set(stop_ids)
    for step in range(max_new_tokens):
        new = sample_next(logits, [generators[i] for i in active], temperature, top_p).tolist()
        keep = []
        for j, (row, tok) in enumerate(zip(active, new, strict=True)):
            if tok in stop_set:
                stopped[row] = True
            else:
                tokens[row].append(tok)
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):  # drop finished rows from the cache and every per-row tensor
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask, next_pos = mask[idx], next_pos[idx]
            active = [active[j] for j in keep]
            new = [new[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # [b, width + step + 1]
        logits = model(
            input_ids=torch.tensor(new, device=device)[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_kwarg(model): cache},
        ).logits[:, -1]  # [b, vocab]
        next_pos = next_pos + 1
    return [(tokens[i], stopped[i]) for i in range(n)]


def sample_next(
    logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row of `logits` [b, vocab]: argmax when `temperature == 0`, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus, using row i's own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [b, vocab]
    if top_p < 1:
        # Nucleus (Holtzman et al. 2020): keep the most likely tokens until their mass reaches top_p
        # (the most likely token is always kept, its preceding mass being 0).
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # Inverse-CDF sampling: one uniform per row from that row's own (CPU) generator, so a row's draws
    # never depend on the other rows. The CDF is float64 so 50k-token vocabularies sum without drift.
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])  # [b]
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [b, vocab]
    cdf = cdf / cdf[:, -1:]
    # right=True picks the first token whose CDF exceeds u, which never is a zero-probability token.
    idx = torch.searchsorted(cdf, u.to(cdf.device)[:, None], right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def _encode_prompts(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[tuple[str, str, str | None]],
    max_new_tokens: int,
) -> dict[str, list[int]]:
    """Chat-encode every prompt once, refusing duplicate ids and prompts that leave no room to answer."""
    context = getattr(model.config, "max_position_embeddings", None)
    encoded: dict[str, list[int]] = {}
    for pid, user, system in prompts:
        if pid in encoded:
            raise ValueError(
                f"prompt id {pid!r} appears twice: ids must be unique (a duplicated prompt inflates the "
                "sample count); deduplicate the prompt list"
            )
        ids = encode_chat(tokenizer, user, system)
        if context is not None and len(ids) + max_new_tokens > context:
            raise ValueError(
                f"prompt {pid!r} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"model's context of {context} tokens. Shorten the prompt or lower max_new_tokens."
            )
        encoded[pid] = ids
    return encoded


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    # Prefill needs logits at the last position only; computing them for every prompt token would cost
    # a [tokens, vocab] matmul (the lm_head is ~20% of SmolLM2's weights).
    return "logits_to_keep" in inspect.signature(model.forward).parameters
