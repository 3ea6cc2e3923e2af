"""Per-feature dashboard data for every latent of an SAE, from ONE streamed pass over the activation
store (never one pass per feature), plus what the SAE's and the model's weights say, plus what
notebook 04 found (DESIGN.md §2, `explore/`).

`feature_pass` encodes the store's completion tokens in batches of whole completions and feeds the
nonzero activations of all latents to the vectorised accumulators of accumulate.py:
- firing counts per token class (honest / deceptive / other completions; a token's class is its
  completion's label, descriptive only: DESIGN.md §8) and the sum of activations (mean when firing);
- a log-binned histogram of the nonzero activations (display histogram, quantile edges);
- the top activating tokens, one per completion, each with its window of activations;
- a uniform sample of the nonzero activations with their windows, from which the quantile groups'
  examples are drawn (SAEDashboard shows top activations "plus quantile groups"; delphi explains from
  examples spread over quantiles).
Windows are cut while the batch is in memory, so no second pass is needed. A window is `before` tokens,
the token, `after` tokens, inside the completion's own tokens (as in analysis.contexts).

The pass runs on the SAE's device. The store is read ahead in a background thread
(`analysis.contexts.EncodedChunks`: pinned memory and non-blocking copies on CUDA), and the per-batch
bookkeeping stays there too: counts, sums and histograms, and the accumulators' threshold test, window
cutting and co-firing table are torch on the activations' device; only the entries that beat a
feature's current k-th score (few, after the first batches) come to the host, where `TopPerFeature`
keeps them. The results are the same as the earlier numpy bookkeeping's, array for array (`bench/
explorer.py --pass-only --before`), and the same on CUDA as on the CPU up to float rounding in the
encoder (`bench/explorer.py --pass-only --device cuda --compare-cpu`). When CUDA runs out of memory in
a batch, all of the batch's device work comes before anything of it is kept: the batch is dropped, the
encoder batch halves (`ExplorerConfig.batch_tokens`, announced; an error naming it at the floor) and
the pass redoes those documents, with the same random keys, so its results equal a pass that never ran
out (tests/explore/test_dashboards.py).

The same pass then streams the reference corpus of the SAE's layer (`corpus/layer_{L}/`, notebook 02)
when there is one, each shard once, with accumulators of its own: the corpus firing rate, a separate
histogram of the corpus activations and the top corpus windows, one per sequence. A corpus window stays
inside one document of its packed sequence (rows whose stored positions follow each other; separators
and other special tokens are not stored) and its text comes from the token ids the corpus store keeps.
A corpus stored before those ids were kept still gives rates and histograms; its windows are left out
and a note says so.

`build_dashboards` adds logit effects and nearest decoder rows (decoder.py, within the SAE and in the
run's other SAEs at the same layer), and notebook 04's rows (effect size with CI, q, explanation,
detection / fuzzing, deception tag) for the features it analysed. `SAEDashboards.table()` gives the
columns of the feature table, `page(f)` one feature's page: the same records feed the notebook, the
static explorer (site.py) and the Neuronpedia export (neuronpedia.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.analysis.contexts import Doc, EncodedChunks, docs_for, token_pieces
from helpers.collect.completions import read_completions
from helpers.collect.store import LayerStore
from helpers.explore.accumulate import (
    Kept,
    LogHistogram,
    TopPerFeature,
    distinct_groups,
    linear_histograms,
    quantile_edges,
)
from helpers.explore.decoder import Unembedding, logit_summary, nearest_rows
from helpers.model.protocols import EncodingSAE, Tokenizer
from helpers.run import corpus_dir, features_path, model_record, model_short, read_jsonl, read_run_json
from helpers.saes.io import LoadedSAE

CLASSES = ("honest", "deceptive", "other")
"""Token classes: the label of the token's completion; `other` = ambiguous or unlabelled."""
ANALYSIS_FIELDS = (
    "rank",
    "cohens_d",
    "d_ci",
    "q_value",
    "auroc",
    "mean_honest",
    "mean_deceptive",
    "firing_rate_honest",
    "firing_rate_deceptive",
    "explanation",
    "explanation_source",
    "deception_related",
    "kind",
    "detection",
    "detection_baseline",
    "fuzzing",
    "fuzzing_baseline",
)
"""What a page shows of notebook 04's row for a feature (features/{sae_id}.jsonl)."""
DATA_FORMAT = 2
"""The version of the pages' fields: 2 added the logit histogram, co-activation neighbours, histograms
from the smallest activation and quantile groups with their counts. The static page names what an
explorer built by an older release lacks; `build_explorer` rebuilds such data."""
BATCH_SETTING = "ExplorerConfig.batch_tokens"
"""What a CUDA out-of-memory error in the pass names as the batch size to lower."""
NO_ANALYSIS = "no notebook 04 results for this SAE: no effect sizes, explanations or deception tags"


@dataclass
class ExplorerConfig:
    """How much of each feature the explorer keeps (sizes are per feature; 16k features multiply them)."""

    n_top: int = 8
    """Top-activating windows, one per completion."""
    n_quantiles: int = 4
    """Quantile groups of the nonzero activations (each ~1/n_quantiles of the firings; groups whose edges
    would coincide are merged, so a page can show fewer, never an empty or zero-width one)."""
    per_quantile: int = 2
    """Windows shown per quantile group."""
    reservoir: int = 32
    """Uniform sample of nonzero activations kept per feature to draw the quantile groups' windows from."""
    before: int = 12
    """Tokens shown before the example token."""
    after: int = 4
    """Tokens shown after it."""
    hist_bins: int = 24
    """Bars of the activation histogram (equal width from the feature's smallest nonzero activation to its
    maximum)."""
    n_logits: int = 10
    """Tokens most raised and most lowered by the feature's decoder row."""
    logit_bins: int = 32
    """Bars of the logit-weight histogram (the decoder row's weights over the whole vocabulary)."""
    n_coactive: int = 6
    """Co-activation neighbours per feature: the features that fire on the same tokens most often."""
    coactive_width: int = 16
    """Per sampled token, how many of the strongest other features firing on it are recorded (the
    co-activation neighbours are counted from these)."""
    n_similar: int = 6
    """Nearest features by decoder cosine, within the SAE and per other SAE at the same layer."""
    batch_tokens: int = 2048
    """Tokens per encoder batch: [batch_tokens, d_sae] float32 activations are the peak memory."""
    corpus_tokens: int | None = None
    """Reference-corpus tokens scanned after the completions: the first sequences of the stored corpus
    of the SAE's layer, whole, until this many (None: all of it; 0: leave the corpus out)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_top", "n_quantiles", "reservoir", "hist_bins", "batch_tokens", "logit_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.corpus_tokens is not None and self.corpus_tokens < 0:
            raise ValueError(f"corpus_tokens must be >= 0 (or None: all), got {self.corpus_tokens}")
        for name in (
            "per_quantile",
            "before",
            "after",
            "n_logits",
            "n_similar",
            "n_coactive",
            "coactive_width",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def width(self) -> int:
        return self.before + 1 + self.after


@dataclass
class CorpusPass:
    """What the pass gives over the reference corpus, for every feature of the SAE."""

    docs: list[Doc]
    """The corpus sequences scanned, in store order (`top.doc` indexes them)."""
    n_tokens: int
    """Corpus tokens scanned."""
    n_without_text: int
    """Of those, tokens of shards stored without token ids (no windows are cut from them)."""
    fired: np.ndarray
    """[d_sae] corpus tokens on which each feature is > 0."""
    max_activation: np.ndarray
    """[d_sae] float32 largest corpus activation (0 when it never fired)."""
    min_activation: np.ndarray
    """[d_sae] float32 smallest nonzero corpus activation (0 when it never fired)."""
    top: Kept
    """Top corpus windows, one per sequence; `pos` is the token's position in its sequence."""
    log_counts: np.ndarray
    """[d_sae, n_log_bins] corpus activations in the same log2 bins as `FeaturePass.log_counts`."""


@dataclass
class FeaturePass:
    """What one pass over the store gives, for every feature of the SAE."""

    n_tokens: np.ndarray
    """[len(CLASSES)] completion tokens scanned per class."""
    fired: np.ndarray
    """[len(CLASSES), d_sae] tokens on which each feature is > 0, per class."""
    act_sum: np.ndarray
    """[d_sae] sum of each feature's activations (float64)."""
    min_activation: np.ndarray
    """[d_sae] float32 smallest nonzero activation (0 when it never fired)."""
    top: Kept
    sample: Kept
    """A uniform sample of each feature's firings; `extra` holds, per sampled token, the strongest other
    features firing on it (-1 padding)."""
    log_counts: np.ndarray
    """[d_sae, n_log_bins] counts of nonzero activations in log2 bins (`log_edges`)."""
    log_edges: np.ndarray
    corpus: CorpusPass | None = None
    """The reference corpus's part of the pass; None when the run has no corpus at this layer."""


def corpus_store_of(run_dir: str | os.PathLike, layer: int) -> LayerStore | None:
    """The stored reference corpus of `layer`, or None when notebook 02 stored none there."""
    if not corpus_dir(run_dir, layer).exists():
        return None
    try:
        return LayerStore(run_dir, layer, kind="corpus")
    except FileNotFoundError:
        return None


def corpus_docs(corpus: LayerStore, max_tokens: int | None) -> list[Doc]:
    """The corpus sequences to scan, in store order: all, or the first ones until `max_tokens` tokens."""
    docs, total = [], 0
    for sid, (_, _, n, _) in corpus.entries.items():
        if max_tokens is not None and total >= max_tokens:
            break
        docs.append(Doc(len(docs), {"id": sid}, 0, n))
        total += n
    return docs


def _window_cutter(
    acts: torch.Tensor,
    r: torch.Tensor,
    f: torch.Tensor,
    first: torch.Tensor,
    last: torch.Tensor,
    offsets: torch.Tensor,
):
    """`windows(idx)` for `TopPerFeature.select`: the activations of feature f[idx] on the rows around r[idx]
    ([len(idx), width] on the activations' device), nan outside rows first[r] .. last[r] - 1 (the token's
    document). Every argument is a tensor on the device of `acts`."""

    def windows(idx: torch.Tensor) -> torch.Tensor:
        at = r[idx]
        rows = at[:, None] + offsets[None, :]  # [m, width]
        inside = (rows >= first[at, None]) & (rows < last[at, None])
        w = acts[rows.clamp(0, len(acts) - 1), f[idx, None]].float()
        return w.masked_fill_(~inside, float("nan"))

    return windows


def _cofiring(n_rows: int, r: torch.Tensor, f: torch.Tensor, v: torch.Tensor, m: int):
    """`extra(idx)` for `TopPerFeature.select`: the `m` strongest features firing on row r[idx] ([len(idx), m]
    feature ids, -1 where fewer fire), from the batch's nonzero activations (r, f, v) in COO form on their
    device; the table of every row's top m is made once per batch, only when asked for (two stable sorts
    of the nonzeros, no pass over the dense activations; ties: the lower feature id first)."""
    found: list[torch.Tensor] = []

    def extra(idx: torch.Tensor) -> torch.Tensor:
        if not found:
            order = torch.sort(-v, stable=True).indices  # strongest first, ties in stream order
            order = order[torch.sort(r[order], stable=True).indices]  # then by row
            rows = r[order]
            rank = torch.arange(len(rows), device=r.device) - torch.searchsorted(rows, rows)
            keep = rank < m
            table = torch.full((n_rows, m), -1, dtype=torch.int32, device=r.device)
            table[rows[keep], rank[keep]] = f[order][keep].int()
            found.append(table)
        return found[0][r[idx]]

    return extra


def coactive_neighbours(
    sample: Kept, fired: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(neighbours [F, k] (-1 padding), Jaccard [F, k], P(g fires | f fires) [F, k], sample size [F]):
    per feature f, the features g that fire on the same tokens most, by the Jaccard index of their
    firing sets |f ∩ g| / |f ∪ g|, estimated from f's uniform sample of firings (`sample.extra`: the
    other features firing on each sampled token) and the firing counts `fired` [F]:
    |f ∩ g| ≈ fired[f] · P(g | f). Jaccard ranks a feature that fires everywhere below one that fires
    where f fires and rarely elsewhere. Vectorised over all features (no loop over features)."""
    n = len(fired)
    size = np.diff(sample.start)
    idx = np.full((n, k), -1, np.int64)
    jac, cond = np.zeros((n, k)), np.zeros((n, k))
    if sample.extra is None or not len(sample.feature) or k == 0:
        return idx, jac, cond, size
    f = np.repeat(sample.feature, sample.extra.shape[1])
    g = sample.extra.ravel().astype(np.int64)
    ok = (g >= 0) & (g != f)
    key, count = np.unique(f[ok] * n + g[ok], return_counts=True)
    f, g = key // n, key % n
    p = count / size[f]
    both = fired[f] * p
    j = both / np.maximum(fired[f] + fired[g] - both, 1e-12)
    order = np.lexsort((g, -j, f))
    f, g, j, p = f[order], g[order], j[order], p[order]
    rank = np.arange(len(f)) - np.searchsorted(f, f, side="left")
    keep = rank < k
    idx[f[keep], rank[keep]] = g[keep]
    jac[f[keep], rank[keep]] = j[keep]
    cond[f[keep], rank[keep]] = p[keep]
    return idx, jac, cond, size


def _nonzero(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, features, values) of the nonzero activations [rows, d_sae], in COO form."""
    rows_t, feats_t = acts.nonzero(as_tuple=True)
    return rows_t, feats_t, acts[rows_t, feats_t]


def feature_pass(
    store: LayerStore,
    sae: EncodingSAE,
    docs: Sequence[Doc],
    cfg: ExplorerConfig,
    *,
    desc: str = "",
    corpus: LayerStore | None = None,
) -> FeaturePass:
    """One streamed pass of `sae` over the completion tokens of `docs` in `store`, then over the
    reference corpus `corpus` when given (module doc)."""
    params = list(sae.parameters()) if isinstance(sae, torch.nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    n_feat, width = int(sae.d_sae), cfg.width
    klass = np.array(
        [CLASSES.index(d.record.get("label")) if d.record.get("label") in CLASSES[:2] else 2 for d in docs],
        np.int64,
    )
    top = TopPerFeature(n_feat, cfg.n_top, width, distinct_docs=True)
    m = min(cfg.coactive_width, n_feat)
    sample = TopPerFeature(n_feat, cfg.reservoir, width, distinct_docs=False, extra_width=m)
    hist = LogHistogram(n_feat, device)
    fired = torch.zeros(len(CLASSES) * n_feat, dtype=torch.int64, device=device)
    act_sum = torch.zeros(n_feat, dtype=torch.float64, device=device)
    min_act = torch.full((n_feat,), float("inf"), dtype=torch.float32, device=device)
    n_tokens = np.zeros(len(CLASSES), np.int64)
    offsets = torch.arange(-cfg.before, cfg.after + 1, device=device)
    keys = np.random.default_rng([cfg.seed, 11])
    c_docs = corpus_docs(corpus, cfg.corpus_tokens) if corpus is not None else []
    bar = tqdm(
        total=sum(d.n for d in docs) + sum(d.n for d in c_docs),
        unit="tok",
        unit_scale=True,
        desc=desc or "explorer pass",
    )

    def select(acts: torch.Tensor, *rows: np.ndarray) -> tuple[Any, ...]:
        """All of a batch's device work (`EncodedChunks.attempt`): what runs out of memory here leaves
        nothing kept. rows: per row, the first and the end row of its document, its document, its class."""
        first_t, last_t, doc_t, cls_t = (torch.from_numpy(a).to(device) for a in rows)
        r, f, v = _nonzero(acts)
        cells = cls_t[r] * n_feat + f
        ones, v64, bins = torch.ones_like(f), v.double(), hist.cells(f, v)
        doc, pos = doc_t[r], r - first_t[r]
        windows = _window_cutter(acts, r, f, first_t, last_t, offsets)
        best = top.select(f, v, v, doc, pos, windows)
        score = torch.from_numpy(keys.random(len(f), dtype=np.float32)).to(device)
        drawn = sample.select(f, score, v, doc, pos, windows, _cofiring(len(acts), r, f, v, m))
        return cells, ones, f, v64, v, bins, best, drawn

    stream = EncodedChunks(store, sae, docs, cfg.batch_tokens, pre=False, setting=BATCH_SETTING)
    for chunk, acts, _ in stream:
        lengths = np.array([d.n for d in chunk])
        first = np.repeat(np.r_[0, np.cumsum(lengths)[:-1]], lengths)  # [rows] first row of the row's doc
        last = first + np.repeat(lengths, lengths)
        doc_of_row = np.repeat(np.array([d.index for d in chunk]), lengths)
        class_of_row = klass[doc_of_row]
        state = keys.bit_generator.state
        got = stream.attempt(select, acts, first, last, doc_of_row, class_of_row)
        acts = None  # freed before the next batch is encoded
        if got is None:  # redo the batch's documents at half the size, with the same random keys
            keys.bit_generator.state = state
            continue
        cells, ones, f, v64, v, bins, best, drawn = got
        # keep it: in place on the device, and on the host
        fired.index_add_(0, cells, ones)
        act_sum.index_add_(0, f, v64)
        min_act.scatter_reduce_(0, f, v, "amin")
        hist.count(*bins)
        top.keep(best)
        sample.keep(drawn)
        n_tokens += np.bincount(class_of_row, minlength=len(CLASSES))
        bar.update(int(lengths.sum()))
    corpus_part = None
    if corpus is not None:  # at the batch size the completions ended with
        corpus_part = _corpus_pass(corpus, sae, device, c_docs, cfg, bar, stream.batch_tokens)
    bar.close()
    return FeaturePass(
        n_tokens=n_tokens,
        fired=fired.view(len(CLASSES), n_feat).cpu().numpy(),
        act_sum=act_sum.cpu().numpy(),
        min_activation=torch.where(min_act.isinf(), 0.0, min_act).cpu().numpy(),
        top=top.result(),
        sample=sample.result(),
        log_counts=hist.table(),
        log_edges=hist.edges(),
        corpus=corpus_part,
    )


def _corpus_pass(
    corpus: LayerStore,
    sae: EncodingSAE,
    device: torch.device,
    docs: list[Doc],
    cfg: ExplorerConfig,
    bar: Any,
    batch_tokens: int,
) -> CorpusPass:
    """The corpus part of `feature_pass`: each sequence of `docs` encoded once, in store order, starting
    at `batch_tokens` per batch."""
    n_feat = int(sae.d_sae)
    top = TopPerFeature(n_feat, cfg.n_top, cfg.width, distinct_docs=True)
    hist = LogHistogram(n_feat, device)
    fired = torch.zeros(n_feat, dtype=torch.int64, device=device)
    max_act = torch.zeros(n_feat, dtype=torch.float32, device=device)
    min_act = torch.full((n_feat,), float("inf"), dtype=torch.float32, device=device)
    n_tokens = n_without_text = 0
    offsets = torch.arange(-cfg.before, cfg.after + 1, device=device)

    def select(acts: torch.Tensor, index: list[int], *rows: np.ndarray) -> tuple[Any, ...]:
        """All of a batch's device work, as in `feature_pass`. index: the index of each sequence of the
        batch; rows: per row, the first and the end row of its document, its position, whether its
        token ids are stored, its sequence in the batch."""
        r, f, v = _nonzero(acts)
        ones, bins = torch.ones_like(f), hist.cells(f, v)
        first_t, last_t, pos_t, text_t, seq_t = (torch.from_numpy(a).to(device) for a in rows)
        text = text_t[r]  # windows only where the corpus kept its token ids
        rt, ft, vt = r[text], f[text], v[text]
        doc = torch.tensor(index, device=device)[seq_t[rt]]
        best = top.select(ft, vt, vt, doc, pos_t[rt], _window_cutter(acts, rt, ft, first_t, last_t, offsets))
        return f, ones, v, bins, best

    stream = EncodedChunks(corpus, sae, docs, batch_tokens, pre=False, setting=BATCH_SETTING)
    for chunk, acts, _ in stream:
        lengths = np.array([d.n for d in chunk])
        ids = [corpus.token_ids_of(d.id) for d in chunk]  # [n, 2] (token, position), or None
        has_text = np.repeat([i is not None for i in ids], lengths)  # [rows]
        # Documents inside the packed sequences: runs of rows of one sequence at consecutive positions.
        position = np.concatenate(
            [i[:, 1] if i is not None else np.arange(d.n) for i, d in zip(ids, chunk, strict=True)]
        )
        seq_of_row = np.repeat(np.arange(len(chunk)), lengths)
        starts = np.r_[True, (seq_of_row[1:] != seq_of_row[:-1]) | (position[1:] != position[:-1] + 1)]
        start_rows = np.flatnonzero(starts)
        segment = np.cumsum(starts) - 1
        first, last = start_rows[segment], np.r_[start_rows[1:], len(position)][segment]
        index = [d.index for d in chunk]
        got = stream.attempt(select, acts, index, first, last, position, has_text, seq_of_row)
        acts = None
        if got is None:
            continue
        f, ones, v, bins, best = got
        fired.index_add_(0, f, ones)
        max_act.scatter_reduce_(0, f, v, "amax")
        min_act.scatter_reduce_(0, f, v, "amin")
        hist.count(*bins)
        top.keep(best)
        n_tokens += len(position)
        n_without_text += int((~has_text).sum())
        bar.update(int(lengths.sum()))
    return CorpusPass(
        docs=docs,
        n_tokens=n_tokens,
        n_without_text=n_without_text,
        fired=fired.cpu().numpy(),
        max_activation=max_act.cpu().numpy(),
        min_activation=torch.where(min_act.isinf(), 0.0, min_act).cpu().numpy(),
        top=top.result(),
        log_counts=hist.table(),
    )


def check_sae_for_run(loaded: LoadedSAE, run_dir: str | os.PathLike, store: LayerStore | None = None) -> None:
    """Refuse an SAE trained on another model or layer than the run's activations, naming both."""
    spec = model_record(run_dir, required=False).get("spec")
    name = loaded.model_name
    if spec and name and model_short(name) != model_short(spec):
        raise ValueError(
            f"SAE {loaded.path.name} was trained on model {name!r} ({loaded.hook_name}) but this run's "
            f"activations come from {spec!r}: explore it in a run of {name!r}, or an SAE trained on {spec!r}"
        )
    layers = read_run_json(run_dir).get("layers") or []
    if store is None and layers and loaded.layer not in layers:
        raise ValueError(
            f"SAE {loaded.path.name} reads layer {loaded.layer} ({loaded.hook_name}) but this run stored "
            f"activations at layers {layers}: collect layer {loaded.layer} in notebook 02, or pick an SAE "
            "of one of those layers"
        )
    if store is not None and int(loaded.sae.d_in) != int(store.d_model):
        raise ValueError(
            f"SAE {loaded.path.name} ({loaded.hook_name}, model {name!r}) reads d_in={loaded.sae.d_in} "
            "vectors but "
            f"the run's layer-{loaded.layer} activations of {spec!r} have d_model={store.d_model}: "
            "use an SAE trained on this model and layer"
        )


def analysis_rows(run_dir: str | os.PathLike, sae_id: str) -> dict[int, dict[str, Any]] | None:
    """Notebook 04's rows of this SAE by feature, or None when it has not run for it."""
    path = features_path(run_dir, sae_id)
    if not path.exists():
        return None
    return {int(r["feature"]): {k: r.get(k) for k in ANALYSIS_FIELDS} for r in read_jsonl(path)}


def _round_array(x: np.ndarray, digits: int) -> np.ndarray:
    """x (any shape) rounded to `digits` significant figures, float64, nan kept. The rounded integer is
    divided by a power of ten, so each value prints in its shortest form in the pages' JSON."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x) & (x != 0)
    e = np.zeros(x.shape, np.int64)
    e[ok] = digits - 1 - np.floor(np.log10(np.abs(x[ok]))).astype(np.int64)
    up, down = 10.0 ** np.maximum(e, 0), 10.0 ** np.maximum(-e, 0)
    return np.round(x * up / down) * down / up + 0.0  # + 0.0: no -0.0


def _histogram(lo: np.ndarray, hi: np.ndarray, counts: np.ndarray, f: int) -> dict[str, Any]:
    """Feature f's activation histogram on its page: the bars span lo[f] .. hi[f], counts [F, bars]."""
    return {"min": lo[f].item(), "max": hi[f].item(), "counts": counts[f].tolist()}


def _rounded(x: np.ndarray, digits: int = 4) -> list[float | None]:
    """`_round_array` as a list of Python floats, None for nan."""
    return [None if v != v else v for v in _round_array(x, digits).tolist()]


def _r(x: float, digits: int = 4) -> float | None:
    return _rounded(np.array([x]), digits)[0]


@dataclass
class SAEDashboards:
    """Everything the explorer shows about one SAE's features (module doc)."""

    sae_id: str
    info: dict[str, Any]
    """SAE and run facts: layer, hook, architecture, d_in, d_sae, model, tokens scanned, notes."""
    cfg: ExplorerConfig
    fp: FeaturePass
    docs: list[Doc]
    tokenizer: Tokenizer
    hist: np.ndarray  # [d_sae, hist_bins], over the smallest nonzero activation .. the maximum
    quantiles: np.ndarray  # [d_sae, n_quantiles + 1] edges (accumulate.quantile_edges)
    logits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    similar: tuple[np.ndarray, np.ndarray]
    similar_other: dict[str, tuple[np.ndarray, np.ndarray]]
    analysis: dict[int, dict[str, Any]] | None
    corpus: LayerStore | None = None
    """The reference corpus the pass scanned (`fp.corpus`), for its windows' text."""
    corpus_hist: np.ndarray | None = None  # [d_sae, hist_bins], over the corpus minimum .. maximum
    quantile_below: np.ndarray | None = None
    """[d_sae, n_quantiles + 1] activations at or below each quantile edge (group counts)."""
    logit_hist: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    """(lo [d_sae], hi [d_sae], counts [d_sae, logit_bins]): the logit weights over the vocabulary."""
    coactive: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    """`coactive_neighbours`' (neighbours, Jaccard, P(g | f), sample size)."""
    _pieces: dict[int, list[str]] = field(default_factory=dict, repr=False)
    _corpus_pieces: dict[int, list[str]] = field(default_factory=dict, repr=False)
    _vocab: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def d_sae(self) -> int:
        return int(self.info["d_sae"])

    @cached_property
    def max_activation(self) -> np.ndarray:
        top = self.fp.top
        out = np.zeros(self.d_sae, np.float32)
        has = top.start[1:] > top.start[:-1]
        out[has] = top.value[top.start[:-1][has]]
        return out

    @cached_property
    def _shown(self) -> dict[str, np.ndarray]:
        """The per-feature numbers the pages print, rounded once for all features (4 significant figures)."""
        fired, n_tok = self.fp.fired, np.maximum(self.fp.n_tokens, 1)
        total = fired.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(total > 0, self.fp.act_sum / total, np.nan)
        shown = {
            "firing_rate": _round_array(total / max(int(self.fp.n_tokens.sum()), 1), 4),
            "rates": _round_array(fired / n_tok[:, None], 4),
            "mean": _round_array(mean, 4),
            "max": _round_array(self.max_activation, 4),
            "min": _round_array(self.fp.min_activation, 4),
            "quantiles": _round_array(self.quantiles, 4),
        }
        c = self.fp.corpus
        if c is not None:
            shown["corpus_rate"] = _round_array(c.fired / max(c.n_tokens, 1), 4)
            shown["corpus_max"] = _round_array(c.max_activation, 4)
            shown["corpus_min"] = _round_array(c.min_activation, 4)
        return shown

    def check_feature(self, f: int) -> int:
        if not 0 <= int(f) < self.d_sae:
            raise IndexError(
                f"feature {f} is out of range: {self.sae_id} has d_sae={self.d_sae} latents "
                f"(0..{self.d_sae - 1})"
            )
        return int(f)

    def _token_text(self, ids: np.ndarray) -> list[str]:
        missing = [int(i) for i in np.unique(ids) if int(i) not in self._vocab]
        if missing:
            texts = self.tokenizer.batch_decode(
                [[i] for i in missing], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            self._vocab.update(zip(missing, texts, strict=True))
        return [self._vocab[int(i)] for i in ids]

    def table(self) -> dict[str, list[Any]]:
        """Columns of the feature table, one entry per latent."""
        shown, a = self._shown, self.analysis or {}
        cols: dict[str, list[Any]] = {
            "feature": list(range(self.d_sae)),
            "firing_rate": shown["firing_rate"].tolist(),
            "rate_honest": shown["rates"][0].tolist(),
            "rate_deceptive": shown["rates"][1].tolist(),
            "max_activation": shown["max"].tolist(),
            "cohens_d": [
                _r(a[f]["cohens_d"]) if f in a and a[f].get("cohens_d") is not None else None
                for f in range(self.d_sae)
            ],
            "q_value": [
                _r(a[f]["q_value"], 3) if f in a and a[f].get("q_value") is not None else None
                for f in range(self.d_sae)
            ],
            "explanation": [a[f].get("explanation") if f in a else None for f in range(self.d_sae)],
            "tag": [_tag(a.get(f)) for f in range(self.d_sae)],
        }
        if self.fp.corpus is not None:
            cols["rate_corpus"] = shown["corpus_rate"].tolist()
        if self.logits is not None:
            cols["top_logit"] = self._token_text(self.logits[0][:, 0])
        return cols

    def _example(self, kept: Kept, i: int) -> dict[str, Any]:
        d = int(kept.doc[i])
        doc = self.docs[d]
        if d not in self._pieces:
            self._pieces[d] = token_pieces(self.tokenizer, doc.record["completion_token_ids"])
        w = kept.window[i]
        inside = np.flatnonzero(~np.isnan(w))
        lo, hi = int(inside[0]), int(inside[-1]) + 1
        pos = int(kept.pos[i])
        start = pos - self.cfg.before + lo  # first window token, in completion-token positions
        return {
            "completion_id": doc.id,
            "label": doc.record.get("label"),
            "position": doc.n_prompt + pos,
            "center": self.cfg.before - lo,
            "activation": float(w[self.cfg.before]),
            "tokens": self._pieces[d][start : start + hi - lo],
            "acts": w[lo:hi].tolist(),  # rounded to 3 significant figures by build_dashboards
        }

    def _corpus_example(self, kept: Kept, i: int) -> dict[str, Any]:
        """A top corpus window: its sequence, the token's position in it, the window's text and
        activations."""
        d = int(kept.doc[i])
        doc = self.fp.corpus.docs[d]
        ids = self.corpus.token_ids_of(doc.id)  # [n, 2] (token id, position); windows come only from these
        if d not in self._corpus_pieces:
            self._corpus_pieces[d] = token_pieces(self.tokenizer, ids[:, 0].tolist())
        w = kept.window[i]
        inside = np.flatnonzero(~np.isnan(w))
        lo, hi = int(inside[0]), int(inside[-1]) + 1
        pos = int(kept.pos[i])
        # The window's rows follow each other in one document of the sequence: its first row is lo rows
        # after `before` rows ahead of the token's own row.
        start = int(np.searchsorted(ids[:, 1], pos)) - self.cfg.before + lo
        return {
            "sequence_id": doc.id,
            "position": pos,
            "center": self.cfg.before - lo,
            "activation": float(w[self.cfg.before]),
            "tokens": self._corpus_pieces[d][start : start + hi - lo],
            "acts": w[lo:hi].tolist(),
        }

    def _corpus_page(self, f: int) -> dict[str, Any] | None:
        c = self.fp.corpus
        if c is None:
            return None
        s, shown = c.top.of(f), self._shown
        return {
            "n_tokens": c.n_tokens,
            "n_firing": int(c.fired[f]),
            "firing_rate": shown["corpus_rate"][f].item(),
            "max_activation": shown["corpus_max"][f].item(),
            "histogram": _histogram(shown["corpus_min"], shown["corpus_max"], self.corpus_hist, f),
            "top": [self._corpus_example(c.top, i) for i in range(s.start, s.stop)],
        }

    def page(self, f: int) -> dict[str, Any]:
        """One feature's page: statistics, histogram, examples, logit effects, similar features,
        notebook 04."""
        f = self.check_feature(f)
        fp, cfg = self.fp, self.cfg
        n_fire, shown = int(fp.fired[:, f].sum()), self._shown
        top_s = fp.top.of(f)
        top = [self._example(fp.top, i) for i in range(top_s.start, top_s.stop)]
        used = {(e["completion_id"], e["position"]) for e in top}
        groups = []
        below = (
            self.quantile_below[f]
            if self.quantile_below is not None
            else np.zeros(len(self.quantiles[f]), int)
        )
        samp = fp.sample.of(f)
        for j, (lo, hi, count) in enumerate(distinct_groups(self.quantiles[f], below)):
            picks, seen_above = [], None
            for i in range(samp.start, samp.stop):  # in random-key order: a uniform draw
                v = float(fp.sample.value[i])
                if len(picks) == cfg.per_quantile or not (lo < v <= hi or (j == 0 and v == lo)):
                    continue
                ex = self._example(fp.sample, i)
                if (ex["completion_id"], ex["position"]) not in used:
                    used.add((ex["completion_id"], ex["position"]))
                    picks.append(ex)
                elif seen_above is None:
                    seen_above = ex
            if seen_above is None:  # the sample missed the group: its top windows inside it, if any
                inside = [
                    k
                    for k in range(top_s.start, top_s.stop)
                    if lo < float(fp.top.value[k]) <= hi or (j == 0 and float(fp.top.value[k]) == lo)
                ]
                seen_above = top[inside[0] - top_s.start] if inside else None
            if not picks and seen_above is not None and cfg.per_quantile:
                # every sampled firing of the group is already shown above: show one again, marked so,
                # rather than an empty group (few firings: the top windows hold most of them)
                picks.append({**seen_above, "shown_above": True})
            groups.append({"lo": _r(lo), "hi": _r(hi), "count": count, "examples": picks})
        page: dict[str, Any] = {
            "feature": f,
            "sae_id": self.sae_id,
            "n_firing": n_fire,
            "firing_rate": shown["firing_rate"][f].item(),
            "rates": {c: shown["rates"][k, f].item() for k, c in enumerate(CLASSES)},
            "fired": {c: int(fp.fired[k, f]) for k, c in enumerate(CLASSES)},
            "mean_when_firing": shown["mean"][f].item() if n_fire else None,
            "max_activation": shown["max"][f].item(),
            "min_activation": shown["min"][f].item(),
            "histogram": _histogram(shown["min"], shown["max"], self.hist, f),
            "top": top,
            "quantiles": groups,
            "similar": [
                [int(j), c]
                for j, c in zip(self.similar[0][f].tolist(), self.similar[1][f].tolist(), strict=True)
            ],
            "similar_other": {
                sid: [[j, c] for j, c in zip(idx[f].tolist(), cos[f].tolist(), strict=True)]
                for sid, (idx, cos) in self.similar_other.items()
            },
            "analysis": (self.analysis or {}).get(f),
            "tag": _tag((self.analysis or {}).get(f)),
            "corpus": self._corpus_page(f),
        }
        if self.coactive is not None:
            idx, jac, cond, size = self.coactive
            page["coactive"] = {
                "sample": int(size[f]),
                "neighbours": [
                    [int(g), j, p]
                    for g, j, p in zip(idx[f].tolist(), jac[f].tolist(), cond[f].tolist(), strict=True)
                    if g >= 0
                ],
            }
        if self.logit_hist is not None:
            lo, hi, counts = self.logit_hist
            page["logit_histogram"] = {"min": lo[f].item(), "max": hi[f].item(), "counts": counts[f].tolist()}
        if self.logits is not None:
            ti, tv, bi, bv = (x[f] for x in self.logits)
            page["logits"] = {
                "positive": [[t, v] for t, v in zip(self._token_text(ti), tv.tolist(), strict=True)],
                "negative": [[t, v] for t, v in zip(self._token_text(bi), bv.tolist(), strict=True)],
            }
        return page


def _tag(row: dict[str, Any] | None) -> str:
    """The deception tag in one word: notebook 04's Gemini verdict, or why there is none."""
    if row is None:
        return "not analysed"
    verdict = row.get("deception_related")
    if verdict is None:
        return "top feature, not explained"
    return {"yes": "deception", "no": "not deception", "unclear": "unclear"}.get(verdict, str(verdict))


def build_dashboards(
    run_dir: str | os.PathLike,
    loaded: LoadedSAE,
    *,
    tokenizer: Tokenizer,
    unembedding: Unembedding | None = None,
    others: Sequence[LoadedSAE] = (),
    config: ExplorerConfig | None = None,
    store: LayerStore | None = None,
    corpus: LayerStore | None | bool = True,
) -> SAEDashboards:
    """The dashboards of every feature of `loaded` over the run's completions at its layer, and its
    reference corpus there (module doc). `others`: the run's other SAEs (those at the same layer give
    cross-SAE neighbours); `unembedding` (decoder.unembedding_of(lm.model)) gives logit effects, left out
    when None. `corpus`: True finds the run's stored corpus of the layer, False leaves it out, or a store."""
    cfg = config or ExplorerConfig()
    sae_id = loaded.sae_id
    check_sae_for_run(loaded, run_dir)
    store = store or LayerStore(run_dir, loaded.layer)
    check_sae_for_run(loaded, run_dir, store)
    records = read_completions(run_dir)
    docs = docs_for(store, records)
    if not docs:
        raise ValueError(f"none of the {len(records)} completions has completion tokens in {store.dir}")
    if corpus is True:
        corpus = corpus_store_of(run_dir, loaded.layer)
    corpus = corpus if isinstance(corpus, LayerStore) and cfg.corpus_tokens != 0 else None
    if corpus is not None and int(corpus.d_model) != int(loaded.sae.d_in):
        raise ValueError(
            f"the reference corpus in {corpus.dir} has d_model={corpus.d_model} but SAE {sae_id} reads "
            f"d_in={loaded.sae.d_in}: the corpus was collected from another model; delete corpus/ and rerun "
            "notebook 02's corpus step, or pass corpus=False"
        )
    fp = feature_pass(store, loaded.sae, docs, cfg, desc=f"{sae_id}: one pass", corpus=corpus)
    kepts = (fp.top, fp.sample) + ((fp.corpus.top,) if fp.corpus is not None else ())
    for kept in kepts:  # 3 significant figures, once for every window (pages print them)
        kept.window = _round_array(kept.window, 3)
    top_value = np.zeros(int(loaded.sae.d_sae))
    has = fp.top.start[1:] > fp.top.start[:-1]
    top_value[has] = fp.top.value[fp.top.start[:-1][has]]
    W_dec = loaded.sae.W_dec.detach()
    notes = []
    logits = logit_hist = None
    if unembedding is not None:
        ls = logit_summary(W_dec, unembedding, cfg.n_logits, hist_bins=cfg.logit_bins)
        logits = (
            ls.top_ids.numpy(),
            _round_array(ls.top_values.numpy(), 3),
            ls.bottom_ids.numpy(),
            _round_array(ls.bottom_values.numpy(), 3),
        )
        logit_hist = (
            _round_array(ls.hist_lo.numpy(), 4),
            _round_array(ls.hist_hi.numpy(), 4),
            ls.hist_counts.numpy(),
        )
    else:
        notes.append(
            "no logit effects or logit histograms: the explorer was built without the model (pass lm= "
            "to build_explorer, as notebook 06 does, to compute them)"
        )
    fired_total = fp.fired.sum(0)
    if not fired_total.any():
        notes.append(
            f"no feature of this SAE fired on any of the {int(fp.n_tokens.sum()):,} completion tokens "
            "scanned: every page is a dead feature's (no histograms, windows or co-activation). Check "
            "that the SAE was trained (notebook 03) on this model and layer, and that its threshold is not "
            "too high."
        )
    if not fp.n_tokens[2]:
        notes.append(
            "the run has no ambiguous, unlabelled or control completions: the 'other' rates are empty"
        )
    idx, cos = nearest_rows(W_dec, None, cfg.n_similar)
    similar_other = {}
    for other in others:
        if (
            other.layer == loaded.layer
            and other.sae_id != sae_id
            and int(other.sae.d_in) == int(loaded.sae.d_in)
        ):
            i2, c2 = nearest_rows(W_dec, other.sae.W_dec.detach().to(W_dec.device), cfg.n_similar)
            similar_other[other.sae_id] = (i2.numpy(), _round_array(c2.numpy(), 3))
    analysis = analysis_rows(run_dir, sae_id)
    if analysis is None:
        notes.append(NO_ANALYSIS)
    corpus_info = None
    if fp.corpus is not None:
        c = fp.corpus
        corpus_info = {
            "n_tokens": c.n_tokens,
            "n_sequences": len(c.docs),
            "n_without_text": c.n_without_text,
            "n_stored": corpus.n_tokens,
        }
        if c.n_without_text:
            notes.append(no_corpus_text_note(c.n_without_text, c.n_tokens))
    info = {
        "format": DATA_FORMAT,
        "sae_id": sae_id,
        "layer": loaded.layer,
        "hook_name": loaded.hook_name,
        "architecture": loaded.cfg.get("trained_as")
        or loaded.cfg.get("architecture"),  # batchtopk saves as jumprelu
        "d_in": int(loaded.sae.d_in),
        "d_sae": int(loaded.sae.d_sae),
        "model_name": loaded.model_name,
        "n_tokens": {c: int(n) for c, n in zip(CLASSES, fp.n_tokens, strict=True)},
        "corpus": corpus_info,
        "n_completions": len(docs),
        "n_alive": int(((fp.fired.sum(0) + (fp.corpus.fired if fp.corpus is not None else 0)) > 0).sum()),
        "logit_note": unembedding.note if unembedding is not None else None,
        "notes": notes,
        "config": asdict(cfg),
    }
    co_idx, co_jac, co_cond, co_size = coactive_neighbours(fp.sample, fired_total, cfg.n_coactive)
    q_edges, q_below = quantile_edges(
        fp.log_counts, fp.log_edges, top_value, cfg.n_quantiles, fp.min_activation
    )
    return SAEDashboards(
        sae_id=sae_id,
        info=info,
        cfg=cfg,
        fp=fp,
        docs=list(docs),
        tokenizer=tokenizer,
        hist=linear_histograms(fp.log_counts, fp.log_edges, top_value, cfg.hist_bins, fp.min_activation),
        quantiles=q_edges,
        quantile_below=q_below,
        logit_hist=logit_hist,
        coactive=(co_idx, _round_array(co_jac, 3), _round_array(co_cond, 3), co_size),
        logits=logits,
        similar=(idx.numpy(), _round_array(cos.numpy(), 3)),
        similar_other=similar_other,
        analysis=analysis,
        corpus=corpus if fp.corpus is not None else None,
        corpus_hist=None
        if fp.corpus is None
        else linear_histograms(
            fp.corpus.log_counts,
            fp.log_edges,
            fp.corpus.max_activation,
            cfg.hist_bins,
            fp.corpus.min_activation,
        ),
    )


def no_corpus_text_note(n_without_text: int, n_tokens: int) -> str:
    """What the pages say when (part of) the corpus was stored without its token ids."""
    part = (
        "the reference corpus was"
        if n_without_text == n_tokens
        else f"{n_without_text:,} of the {n_tokens:,} corpus tokens were"
    )
    return (
        f"{part} stored without token ids (collected before notebook 02 kept them), so the corpus has no "
        "text here: its firing rates and histograms are shown, its windows are not. Delete corpus/ and rerun "
        "notebook 02's corpus step for corpus windows."
    )
