"""Streaming per-feature statistics for every latent of an SAE at once, vectorised over latents (no
Python loop over features, so 16k latents cost little more than 16).

The stream is the SAE's nonzero activations in COO form, one encoder batch at a time: parallel arrays
(feature, value, document, position). Two accumulators:

- `TopPerFeature` keeps, per feature, the k entries with the largest *score* seen so far, each with the
  window of that feature's activations around it (cut while the batch is in memory, so no second pass
  over the store is needed). Score = the activation gives the top-activating examples (one per document
  with `distinct_docs`); score = a uniform random key gives a uniform sample of the feature's nonzero
  activations (keeping the k largest of i.i.d. uniform keys is reservoir sampling; Efraimidis &
  Spirakis 2006, with equal weights). New entries below a feature's current k-th score are dropped on
  arrival; the rest are appended and compacted (sorted, cut to k per feature) when they outgrow the kept
  set, so memory stays O(n_features * k) and each entry is sorted O(1) times on average.
- `LogHistogram` counts nonzero activations in log2 bins (8 per octave: a value's bin pins it to within
  ±4.4%), from which display histograms and quantile edges are read for all features at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Kept:
    """What a `TopPerFeature` holds: entries sorted by (feature, score descending); `start[f]:start[f+1]`
    are feature f's."""

    feature: np.ndarray  # [m] int64
    score: np.ndarray  # [m] float32
    value: np.ndarray  # [m] float32 activation
    doc: np.ndarray  # [m] int64 document index
    pos: np.ndarray  # [m] int64 position of the token in its document
    window: np.ndarray  # [m, width] float32 activations around it; nan outside the document
    start: np.ndarray  # [n_features + 1] int64

    def of(self, f: int) -> slice:
        return slice(int(self.start[f]), int(self.start[f + 1]))


class TopPerFeature:
    """Per feature, the k entries with the largest score (ties: the earlier entry), optionally at most
    one per document (its best)."""

    def __init__(self, n_features: int, k: int, width: int, *, distinct_docs: bool, budget: int = 1 << 19):
        if k < 1 or width < 1:
            raise ValueError(f"k and width must be at least 1, got k={k}, width={width}")
        self.n, self.k, self.width, self.distinct = n_features, k, width, distinct_docs
        self.threshold = np.full(n_features, -np.inf, np.float32)
        self.budget = budget
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._pending = 0
        self._kept = 0

    def add(
        self,
        feature: np.ndarray,
        score: np.ndarray,
        value: np.ndarray,
        doc: np.ndarray,
        pos: np.ndarray,
        windows: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        """Offer entries; `windows(idx)` returns the [len(idx), width] windows of the entries `idx` that
        pass the feature's current threshold (only those are cut)."""
        idx = np.flatnonzero(score > self.threshold[feature])
        if not len(idx):
            return
        self._parts.append((feature[idx], score[idx], value[idx], doc[idx], pos[idx], windows(idx)))
        self._pending += len(idx)
        if self._pending > max(self.budget, self._kept):
            self._compact()

    def _compact(self) -> None:
        if len(self._parts) == 1 and self._pending == 0:
            return
        f, s, v, d, p, w = (np.concatenate(x) for x in zip(*self._parts, strict=True))
        if self.distinct:  # the best entry of each (feature, document)
            order = np.lexsort((-s, d, f))
            first = np.r_[True, (f[order][1:] != f[order][:-1]) | (d[order][1:] != d[order][:-1])]
            sel = order[first]
        else:
            sel = np.arange(len(f))
        sel = sel[np.lexsort((-s[sel], f[sel]))]
        fs = f[sel]
        group_start = np.searchsorted(fs, fs, side="left")
        rank = np.arange(len(fs)) - group_start
        sel = sel[rank < self.k]
        f, s, v, d, p, w = f[sel], s[sel], v[sel], d[sel], p[sel], w[sel]
        full = np.flatnonzero(rank[rank < self.k] == self.k - 1)  # the k-th entry of full features
        self.threshold[f[full]] = s[full]
        self._parts = [(f, s, v, d, p, w)]
        self._pending, self._kept = 0, len(f)

    def result(self) -> Kept:
        if not self._parts:
            e = np.zeros(0, np.int64)
            return Kept(e, e.astype(np.float32), e.astype(np.float32), e, e,
                        np.zeros((0, self.width), np.float32), np.zeros(self.n + 1, np.int64))  # fmt: skip
        self._compact()
        f, s, v, d, p, w = self._parts[0]
        start = np.searchsorted(f, np.arange(self.n + 1), side="left")
        return Kept(f.astype(np.int64), s, v, d, p, w, start)


class LogHistogram:
    """Counts of nonzero activations per feature in log2 bins from 2**LO to 2**HI (values outside go
    to the end bins)."""

    PER_OCTAVE = 8
    LO, HI = -24, 24

    def __init__(self, n_features: int, device: torch.device | str = "cpu"):
        self.n_bins = (self.HI - self.LO) * self.PER_OCTAVE
        self.n = n_features
        self.counts = torch.zeros(n_features * self.n_bins, dtype=torch.int64, device=device)

    def add(self, feature: torch.Tensor, value: torch.Tensor) -> None:
        """feature [m] int64, value [m] > 0, on the histogram's device."""
        b = (
            ((torch.log2(value.float()) - self.LO) * self.PER_OCTAVE)
            .floor()
            .long()
            .clamp_(0, self.n_bins - 1)
        )
        self.counts.index_add_(0, feature * self.n_bins + b, torch.ones_like(b))

    def edges(self) -> np.ndarray:
        """[n_bins + 1] bin edges."""
        return 2.0 ** (self.LO + np.arange(self.n_bins + 1) / self.PER_OCTAVE)

    def table(self) -> np.ndarray:
        """[n_features, n_bins] counts."""
        return self.counts.view(self.n, self.n_bins).cpu().numpy()


def linear_histograms(counts: np.ndarray, edges: np.ndarray, top: np.ndarray, n_bins: int) -> np.ndarray:
    """Rebin log-binned counts [F, B] into `n_bins` equal-width bins over [0, top[f]] per feature
    ([F, n_bins]); each log bin goes whole to the display bin of its geometric centre, so a count can
    sit one display bin off near a bin boundary (the log bins are 9% wide)."""
    centre = np.sqrt(edges[:-1] * edges[1:])  # [B]
    scale = np.where(top > 0, top, 1.0)[:, None]
    target = np.clip((centre[None, :] / scale * n_bins).astype(np.int64), 0, n_bins - 1)  # [F, B]
    flat = (np.arange(len(counts))[:, None] * n_bins + target).ravel()
    out = np.bincount(flat, weights=counts.ravel(), minlength=len(counts) * n_bins)
    return out.reshape(len(counts), n_bins).astype(np.int64)


def quantile_edges(counts: np.ndarray, edges: np.ndarray, top: np.ndarray, n_groups: int) -> np.ndarray:
    """[F, n_groups + 1] activation values cutting each feature's nonzero activations into groups of
    equal count: the first edge 0, the last the maximum, the others the upper edge of the log bin where
    the cumulative count crosses j / n_groups (within 9% of the exact quantile)."""
    cum = np.cumsum(counts, axis=1)  # [F, B]
    total = np.maximum(cum[:, -1:], 1)
    out = np.zeros((len(counts), n_groups + 1))
    for j in range(1, n_groups):
        b = np.argmax(cum >= total * j / n_groups, axis=1)
        out[:, j] = np.minimum(edges[b + 1], top)
    out[:, -1] = top
    return out
