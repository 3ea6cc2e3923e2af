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
  set, so memory stays O(n_features * k) and each entry is sorted O(1) times on average. The stream may
  be torch tensors on a GPU: the threshold test and the cutting run there, and only the entries that
  pass are copied to the host.
- `LogHistogram` counts nonzero activations in log2 bins (8 per octave: a value's bin pins it to within
  ±4.4%), from which display histograms and quantile edges are read for all features at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    extra: np.ndarray | None = None
    """[m, extra_width] int32 per-entry columns the caller cut with the window (e.g. the other features
    firing on the entry's token), or None when the accumulator keeps none."""

    def of(self, f: int) -> slice:
        return slice(int(self.start[f]), int(self.start[f + 1]))


class TopPerFeature:
    """Per feature, the k entries with the largest score (ties: the earlier entry), optionally at most
    one per document (its best)."""

    def __init__(
        self,
        n_features: int,
        k: int,
        width: int,
        *,
        distinct_docs: bool,
        budget: int = 1 << 19,
        extra_width: int = 0,
    ):
        if k < 1 or width < 1:
            raise ValueError(f"k and width must be at least 1, got k={k}, width={width}")
        self.n, self.k, self.width, self.distinct = n_features, k, width, distinct_docs
        self.extra_width = extra_width
        self.threshold = np.full(n_features, -np.inf, np.float32)
        self.budget = budget
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._pending = 0
        self._kept = 0
        self._device_threshold: torch.Tensor | None = None

    def select(
        self,
        feature: np.ndarray | torch.Tensor,
        score: np.ndarray | torch.Tensor,
        value: np.ndarray | torch.Tensor,
        doc: np.ndarray | torch.Tensor,
        pos: np.ndarray | torch.Tensor,
        windows: Callable[[Any], Any],
        extra: Callable[[Any], Any] | None = None,
    ) -> tuple[np.ndarray, ...] | None:
        """Offer entries: the ones that pass their feature's current threshold, with their windows and
        extra columns, on the host (None when none does), without keeping them (`keep` keeps them).
        `windows(idx)` returns the [len(idx), width] windows of the entries `idx` that pass (only those
        are cut), `extra(idx)` their [len(idx), extra_width] extra columns (required when the accumulator
        was made with extra_width > 0).

        The entries are numpy arrays (idx is then a numpy array), or torch tensors on one device (idx is
        a tensor there, and the callables may return tensors there): the threshold test and the cutting
        run on that device and only the entries that pass come to the host. All the device work happens
        here, so a pass whose device runs out of memory in it keeps nothing of the batch and can redo
        it."""
        if self.extra_width and extra is None:
            raise ValueError(
                f"this accumulator keeps {self.extra_width} extra columns per entry: pass extra="
            )
        if isinstance(score, torch.Tensor):
            idx = torch.nonzero(score > self._threshold_on(score.device)[feature]).squeeze(1)
        else:
            idx = np.flatnonzero(score > self.threshold[feature])
        if not len(idx):
            return None
        if self.extra_width:
            ex = _host(extra(idx)).astype(np.int32, copy=False)
        else:
            ex = np.zeros((len(idx), 0), np.int32)
        part = tuple(_host(a[idx]) for a in (feature, score, value, doc, pos))
        return (*part, _host(windows(idx)), ex)

    def keep(self, part: tuple[np.ndarray, ...] | None) -> None:
        """Keep what `select` returned (host work only)."""
        if part is None:
            return
        self._parts.append(part)
        self._pending += len(part[0])
        if self._pending > max(self.budget, self._kept):
            self._compact()

    def _threshold_on(self, device: torch.device) -> torch.Tensor:
        """The thresholds as a tensor on `device` (on the CPU a view of `self.threshold`, elsewhere a copy
        made again after each compaction)."""
        if device.type == "cpu":
            return torch.from_numpy(self.threshold)
        if self._device_threshold is None or self._device_threshold.device != device:
            self._device_threshold = torch.from_numpy(self.threshold).to(device)
        return self._device_threshold

    def _compact(self) -> None:
        if len(self._parts) == 1 and self._pending == 0:
            return
        f, s, v, d, p, w, x = (np.concatenate(c) for c in zip(*self._parts, strict=True))
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
        f, s, v, d, p, w, x = f[sel], s[sel], v[sel], d[sel], p[sel], w[sel], x[sel]
        full = np.flatnonzero(rank[rank < self.k] == self.k - 1)  # the k-th entry of full features
        self.threshold[f[full]] = s[full]
        self._device_threshold = None
        self._parts = [(f, s, v, d, p, w, x)]
        self._pending, self._kept = 0, len(f)

    def result(self) -> Kept:
        if not self._parts:
            e = np.zeros(0, np.int64)
            return Kept(
                e,
                e.astype(np.float32),
                e.astype(np.float32),
                e,
                e,
                np.zeros((0, self.width), np.float32),
                np.zeros(self.n + 1, np.int64),
                np.zeros((0, self.extra_width), np.int32) if self.extra_width else None,
            )
        self._compact()
        f, s, v, d, p, w, x = self._parts[0]
        start = np.searchsorted(f, np.arange(self.n + 1), side="left")
        return Kept(f.astype(np.int64), s, v, d, p, w, start, x if self.extra_width else None)


def _host(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy array on the host: tensors are copied from their device."""
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


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
        self.count(*self.cells(feature, value))

    def cells(self, feature: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first half of `add` (all its new memory): (cell of each value in `counts`, ones)."""
        b = (
            ((torch.log2(value.float()) - self.LO) * self.PER_OCTAVE)
            .floor()
            .long()
            .clamp_(0, self.n_bins - 1)
        )
        return feature * self.n_bins + b, torch.ones_like(b)

    def count(self, cells: torch.Tensor, ones: torch.Tensor) -> None:
        """The second half of `add`: count them, in place."""
        self.counts.index_add_(0, cells, ones)

    def edges(self) -> np.ndarray:
        """[n_bins + 1] bin edges."""
        return 2.0 ** (self.LO + np.arange(self.n_bins + 1) / self.PER_OCTAVE)

    def table(self) -> np.ndarray:
        """[n_features, n_bins] counts."""
        return self.counts.view(self.n, self.n_bins).cpu().numpy()


def linear_histograms(
    counts: np.ndarray, edges: np.ndarray, top: np.ndarray, n_bins: int, bottom: np.ndarray | None = None
) -> np.ndarray:
    """Rebin log-binned counts [F, B] into `n_bins` equal-width bins over [bottom[f], top[f]] per feature
    ([F, n_bins]; bottom: the smallest nonzero activation, 0 when not given); each log bin goes whole to
    the display bin of its geometric centre (clipped into the range; the bins of the smallest and the
    largest activation to the first and the last bar), so a count can sit one display bin off near a bin
    boundary (the log bins are 9% wide)."""
    centre = np.sqrt(edges[:-1] * edges[1:])  # [B]
    low = np.zeros(len(counts)) if bottom is None else np.asarray(bottom, np.float64)
    span = np.asarray(top, np.float64) - low
    scale = np.where(span > 0, span, 1.0)[:, None]
    target = np.clip(((centre[None, :] - low[:, None]) / scale * n_bins).astype(np.int64), 0, n_bins - 1)
    # The log bins holding the smallest and the largest activation go to the first and the last bar (their
    # centres can lie a few % inside the range, one or more bars in when the range is narrow).
    rows = np.arange(len(counts))
    for value, bar in ((low, 0), (np.asarray(top, np.float64), n_bins - 1)):
        b = np.clip(np.searchsorted(edges, value, side="right") - 1, 0, len(centre) - 1)
        target[rows[value > 0], b[value > 0]] = bar
    flat = (np.arange(len(counts))[:, None] * n_bins + target).ravel()
    out = np.bincount(flat, weights=counts.ravel(), minlength=len(counts) * n_bins)
    return out.reshape(len(counts), n_bins).astype(np.int64)


def quantile_edges(
    counts: np.ndarray, edges: np.ndarray, top: np.ndarray, n_groups: int, bottom: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(edges, below), each [F, n_groups + 1]: activation values cutting each feature's nonzero
    activations into groups of equal count, and how many activations lie at or below each edge. The
    first edge is `bottom` (the smallest nonzero activation; 0 when not given), the last the maximum, the
    others the upper edge of the log bin where the cumulative count crosses j / n_groups (within 9% of
    the exact quantile), so a group's count (the difference of `below`) is exact. Edges can coincide
    (many equal activations); `distinct_groups` merges those groups."""
    cum = np.cumsum(counts, axis=1)  # [F, B]
    total = cum[:, -1]
    out = np.zeros((len(counts), n_groups + 1))
    below = np.zeros((len(counts), n_groups + 1), np.int64)
    if bottom is not None:
        out[:, 0] = bottom
    for j in range(1, n_groups):
        b = np.argmax(cum >= np.maximum(total, 1)[:, None] * j / n_groups, axis=1)
        out[:, j] = np.clip(edges[b + 1], out[:, 0], top)
        below[:, j] = np.where(edges[b + 1] >= top, total, cum[np.arange(len(cum)), b])
    out[:, -1] = top
    below[:, -1] = total
    return out, below


def distinct_groups(edges: np.ndarray, below: np.ndarray) -> list[tuple[float, float, int]]:
    """One feature's quantile groups as (lo, hi, count) with distinct edges and at least one activation
    each: groups whose edges coincide, or that hold no activation, are merged into their neighbour above
    (the first group includes its lower edge, the smallest activation). A feature whose activations all
    lie in one log bin gets one group; one that never fired, none."""
    if below[-1] == 0:
        return []
    groups: list[tuple[float, float, int]] = []
    lo, n_lo = float(edges[0]), 0
    for j in range(1, len(edges)):
        hi, n_hi = float(edges[j]), int(below[j])
        if j < len(edges) - 1 and (hi <= lo or n_hi == n_lo or hi >= float(edges[-1])):
            continue  # merged into the next group
        # The last group empty (float rounding at a bin edge): widen the one below instead.
        if n_hi == n_lo and groups:
            groups[-1] = (groups[-1][0], hi, groups[-1][2])
        else:
            groups.append((lo, hi, n_hi - n_lo))
        lo, n_lo = hi, n_hi
    return groups
