"""Which windows become a feature's examples: the choice `build_contexts` (contexts.py) makes from its
first pass over the store, per feature and per side (explain / held-out scoring).

- ACTIVATING: up to `per_bin` random tokens from every quantile bin of the feature's nonzero activations
  (EleutherAI delphi: 10 bins), so an explanation must cover weak activations too, not only the top. The
  bins are cut from a uniform sample of the nonzero activations plus the largest ones (`Largest`).
- HARD NEGATIVES: the largest pre-activations where the feature did not fire (near misses), one per
  completion. They are text the encoder almost assigned to the feature, which an explanation has to rule
  out ("fires on 'no'" fails on a near-miss 'no' that is no denial). Windows from other samples of the
  same prompt were the other option; they are more often as easy as random text. For a Gated SAE the
  pre-activation is the magnitude path (what `encode` returns), whose gate stayed closed.
- NON-ACTIVATING: random tokens of completions where the feature never fires, else random tokens whose
  whole window turns out silent.

Candidates are drawn generously; `WindowSelection.accept` keeps those whose windows pass the second
pass's checks (an activating token still fires; a negative window is silent over its whole length) up to
the wanted counts. Examples of one feature never share a token.

Sides are split by prompt group (`split_sides`: `group`, else `prompt_id`): every completion of a
scenario, or of both prompts of a contrast pair, goes to one side, so near-duplicate text never sits on
both the explain and the scoring side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ContextConfig:
    """How many example windows of each kind, and how they are cut."""

    n_bins: int = 10
    """Quantile bins of a feature's nonzero activations that activating examples are spread over."""
    explain_per_bin: int = 2
    """Activating examples per bin in the explain set (up to n_bins * this)."""
    score_per_bin: int = 1
    """Activating examples per bin in the scoring set."""
    explain_non_activating: int = 3
    explain_hard_negatives: int = 3
    score_non_activating: int = 5
    score_hard_negatives: int = 5
    before: int = 24
    """Tokens shown before the example token."""
    after: int = 7
    """Tokens shown after it (before + 1 + after = 32, delphi's window)."""
    batch_tokens: int = 1024
    """Tokens per encoder batch: the [batch_tokens, d_sae] activations are the peak memory."""
    reservoir: int = 100_000
    """Nonzero activations kept per feature (a uniform sample) to cut the quantile bins from."""
    near_misses: int = 512
    """Highest non-firing pre-activations kept per feature as hard-negative candidates."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_bins", "batch_tokens", "reservoir"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("explain_per_bin", "score_per_bin", "before", "after", "near_misses"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Doc:
    """One completion's stored tokens: store rows `skip` .. `skip + n` of `id` are its completion tokens."""

    index: int
    record: dict[str, Any]
    skip: int
    n: int

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def n_prompt(self) -> int:
        return len(self.record.get("prompt_token_ids") or [])


Candidate = tuple[int, str, int, int, int | None]
"""(side, kind, doc index, position in the doc's completion tokens, quantile bin of an activating one)."""


def split_sides(docs: Sequence[Doc], seed: int = 0) -> np.ndarray:
    """[n_docs] 0 (explain) or 1 (scoring): prompt groups in a seeded hash order, alternately to each side."""

    def key(d: Doc) -> str:
        return str(d.record.get("group") or d.record.get("prompt_id") or d.id)

    order = sorted({key(d) for d in docs}, key=lambda k: hashlib.sha256(f"{seed}|{k}".encode()).hexdigest())
    side = {k: i % 2 for i, k in enumerate(order)}
    return np.array([side[key(d)] for d in docs], dtype=np.int64)


class Largest:
    """The k rows [g, value, score] with the largest score among all rows added (compacted lazily)."""

    def __init__(self, k: int):
        self.k, self.parts, self.n = k, [np.zeros((0, 3))], 0

    def add(self, g: np.ndarray, value: np.ndarray, score: np.ndarray) -> None:
        self.parts.append(np.c_[g, value, score])
        self.n += len(g)
        if self.n > 2 * self.k:
            self.parts = [self.result()]
            self.n = len(self.parts[0])

    def result(self) -> np.ndarray:
        rows = np.concatenate(self.parts)
        if len(rows) > self.k:
            rows = rows[np.argpartition(-rows[:, 2], self.k - 1)[: self.k]]
        return rows[np.argsort(-rows[:, 2], kind="stable")]


class WindowSelection:
    """Candidate examples of one feature, per side, then the ones whose windows pass the checks."""

    def __init__(
        self,
        cfg: ContextConfig,
        rng: np.random.Generator,
        offsets: np.ndarray,
        side: np.ndarray,
        docs: list[Doc],
    ):
        self.cfg, self.rng, self.offsets, self.side, self.docs = cfg, rng, offsets, side, docs
        self.candidates: list[Candidate] = []
        self.taken: dict[int, list[int]] = {}  # doc -> example positions (examples never share a token)

    def _locate(self, g: float) -> tuple[int, int]:
        d = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return d, int(g) - int(self.offsets[d])

    def _free(self, d: int, pos: int) -> bool:
        span = self.cfg.before + self.cfg.after + 1
        return all(abs(pos - q) >= span for q in self.taken.get(d, ()))

    def activating(self, s: int, nonzero: np.ndarray, edges: np.ndarray) -> None:
        """Up to per_bin random examples from each quantile bin, non-overlapping."""
        if not len(nonzero):
            return
        per_bin = self.cfg.explain_per_bin if s == 0 else self.cfg.score_per_bin
        bins = np.clip(np.searchsorted(edges, nonzero[:, 1], side="right") - 1, 0, self.cfg.n_bins - 1)
        for b in range(self.cfg.n_bins):
            got = 0
            for j in self.rng.permutation(np.flatnonzero(bins == b)):
                if got == per_bin:
                    break
                d, pos = self._locate(nonzero[j, 0])
                if self.side[d] == s and self._free(d, pos):
                    self.taken.setdefault(d, []).append(pos)
                    self.candidates.append((s, "activating", d, pos, b))
                    got += 1

    def non_activating(self, s: int, doc_max: np.ndarray) -> None:
        """Random tokens of silent completions first, then of others (their windows are checked later)."""
        n = self.cfg.explain_non_activating if s == 0 else self.cfg.score_non_activating
        silent = self.rng.permutation(np.flatnonzero((self.side == s) & (doc_max <= 0)))[: 2 * n]
        others = self.rng.permutation(np.flatnonzero((self.side == s) & (doc_max > 0)))[
            : 4 * n - 2 * len(silent)
        ]
        for d in [*silent, *others]:
            self.candidates.append(
                (s, "non_activating", int(d), int(self.rng.integers(self.docs[d].n)), None)
            )

    def hard_negatives(self, s: int, near: np.ndarray) -> None:
        """The highest non-firing pre-activations, one per completion."""
        n, seen = self.cfg.explain_hard_negatives if s == 0 else self.cfg.score_hard_negatives, set()
        for g in near[:, 0]:
            d, pos = self._locate(g)
            if self.side[d] == s and d not in seen and len(seen) < 3 * n:
                seen.add(d)
                self.candidates.append((s, "hard_negative", d, pos, None))

    def accept(self, window_acts: Callable[[int, int, int], np.ndarray]) -> Iterator[Candidate]:
        """The candidates kept: activating ones that fire at their token in the second pass, negatives
        whose whole window is silent and free, up to the wanted count per side and kind."""
        cfg, counts = self.cfg, {}
        wanted = {
            (0, "non_activating"): cfg.explain_non_activating,
            (0, "hard_negative"): cfg.explain_hard_negatives,
            (1, "non_activating"): cfg.score_non_activating,
            (1, "hard_negative"): cfg.score_hard_negatives,
        }
        for s, kind, d, pos, b in self.candidates:
            lo, hi = max(0, pos - cfg.before), min(self.docs[d].n, pos + cfg.after + 1)
            acts = window_acts(d, lo, hi)
            if kind == "activating":
                if acts[pos - lo] <= 0:
                    continue  # fired in pass 1 only through a rounding difference: no clear example
            elif counts.get((s, kind), 0) >= wanted[s, kind] or (acts > 0).any() or not self._free(d, pos):
                continue
            else:
                self.taken.setdefault(d, []).append(pos)
            counts[s, kind] = counts.get((s, kind), 0) + 1
            yield s, kind, d, pos, b
