"""Example windows of SAE features: where a feature fires over its whole activation range, and where it
does not. This is the material auto-interpretation explains and is scored on (autointerp.py, scoring.py;
REFERENCE.md "Auto-interpretability practice").

`build_contexts` makes one streamed pass over the activation store (whole completions per encoder batch
of ~`batch_tokens` tokens; only the chosen features' bookkeeping is kept, never the store or the
[n_tokens, d_sae] activations) and collects per feature: a uniform sample of its nonzero activations
(`reservoir` per feature: the rows with the smallest random keys) plus its largest ones, its largest
pre-activations where it did not fire (near misses), and per completion its maximum activation. From
these windows.py picks ACTIVATING examples over the activation quantiles, NON-ACTIVATING windows and
HARD NEGATIVES, split by prompt group into an EXPLAIN set and a held-out SCORING set. A second pass
re-encodes only the completions that supply examples, to give every window token its activation.

A window is up to `before` tokens, the token, and up to `after` tokens (32 in all, as delphi), inside the
completion's own tokens: the prompt's activations are not always stored, and an unmarked token whose
activation is unknown would mislead. Firing tokens are marked <<like this>> (a run of firing tokens is
one span); `tokens` and `acts` keep every token's activation for plots. Non-activating and hard-negative
windows are silent over their whole length. Each example records its completion's label for display
only: the label never chooses an example and is never shown to the explainer (DESIGN.md §8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from helpers.analysis.windows import ContextConfig, Doc, Largest, WindowSelection, split_sides
from helpers.collect.oom import BatchSize
from helpers.collect.store import LayerStore
from helpers.model.hooks import hook_name, run_with_capture
from helpers.model.protocols import EncodingSAE, HookableModel, Tokenizer

OPEN, CLOSE = "<<", ">>"
KINDS = ("activating", "non_activating", "hard_negative")
T = TypeVar("T")


@dataclass
class FeatureContexts:
    """One feature's example windows (records made by `window_record`)."""

    feature: int
    n_tokens: int
    """Completion tokens scanned."""
    n_firing: int
    """Of those, tokens where the feature is > 0."""
    max_activation: float
    quantile_edges: list[float]
    """n_bins + 1 edges over the nonzero activations; an example's `quantile` indexes these bins."""
    explain: list[dict[str, Any]] = field(default_factory=list)
    score: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureContexts:
        return cls(**d)


def check_sae_fits(sae: EncodingSAE, d_model: int) -> None:
    if int(sae.d_in) != int(d_model):
        raise ValueError(
            f"the SAE reads vectors of d_in={sae.d_in} but these activations have d_model={d_model}: "
            "use the SAE trained on this model and layer (its sae_id names them)"
        )


def docs_for(store: LayerStore, records: Sequence[dict[str, Any]]) -> list[Doc]:
    """The completions of `records` that have completion tokens in `store`, in store order (sequential
    reads). A store that disagrees with completions.jsonl about a completion's length is refused."""
    docs = []
    for r in records:
        if r["id"] not in store.entries:
            continue
        shard, row, n_stored, first = store.entries[r["id"]]
        n_prompt, n_comp = len(r.get("prompt_token_ids") or []), len(r.get("completion_token_ids") or [])
        skip = n_prompt - first
        if skip < 0 or n_stored - skip != n_comp:
            raise ValueError(
                f"{store.dir} holds {n_stored} rows from position {first} for {r['id']!r}, but "
                f"completions.jsonl gives it {n_prompt} prompt + {n_comp} completion tokens: the store was "
                "collected from another completions.jsonl; rerun collect_activations into a fresh folder"
            )
        if n_comp:
            docs.append((shard, row, Doc(0, r, skip, n_comp)))
    docs.sort(key=lambda t: t[:2])
    for i, (_, _, d) in enumerate(docs):
        d.index = i
    return [d for _, _, d in docs]


MIN_BATCH_TOKENS = 16
"""The smallest encoder batch a pass halves down to after CUDA runs out of memory (`EncodedChunks`)."""
OOM_FIX = (
    "encode with a smaller SAE (fewer latents: the [batch, d_sae] float32 activations are the peak), or "
    "free GPU memory (del the models and SAEs no longer needed, then torch.cuda.empty_cache()), "
    "or move the SAE to the CPU (sae.to('cpu'))"
)


def doc_chunks(docs: Sequence[Doc], batch_tokens: int) -> list[list[Doc]]:
    """`docs` cut into runs of whole documents of at most `batch_tokens` tokens (a longer document is a
    run of its own, encoded `batch_tokens` rows at a time)."""
    chunks: list[list[Doc]] = []
    chunk: list[Doc] = []
    total = 0
    for d in docs:
        if chunk and total + d.n > batch_tokens:
            chunks.append(chunk)
            chunk, total = [], 0
        chunk.append(d)
        total += d.n
    if chunk:
        chunks.append(chunk)
    return chunks


class EncodedChunks:
    """The SAE's activations over the stored tokens of `docs`: iterating gives (docs, acts, pre) per run of
    whole documents (`doc_chunks`), in `docs` order, acts and pre-activations [sum of the docs' n, d_sae]
    float32 on the SAE's device (pre is None unless `pre`).

    The store's rows are read ahead in a background thread (`LayerStore.stream_rows`), in the shards'
    dtype (half the bytes of float32) and, when the SAE is on CUDA, in pinned memory copied without
    blocking, so reading and copying overlap the encoding.

    CUDA out of memory: when encoding a run fails, the batch halves (`oom.BatchSize`, down to
    `MIN_BATCH_TOKENS`, then an error naming `setting`) and the stream goes on from that run's first
    document, cut at the new size. A consumer does its own device work on a run through `attempt`,
    all of it before it keeps anything of the run: when that runs out of memory, the batch halves too,
    the consumer keeps nothing and asks for the next run, which is that run's documents again. A
    document's activations do not depend on the batch size (exactly so on the CPU, where the tests
    check it; a GPU's matmul kernels may round one ulp differently per size), so a consumer that
    keeps nothing of a failed run gets the results of a pass that never failed."""

    def __init__(
        self,
        store: LayerStore,
        sae: EncodingSAE,
        docs: Sequence[Doc],
        batch_tokens: int,
        *,
        pre: bool = True,
        setting: str = "batch_tokens",
    ):
        check_sae_fits(sae, store.d_model)
        self.store, self.sae, self.docs, self.pre = store, sae, list(docs), pre
        self.size = BatchSize(
            batch_tokens, floor=MIN_BATCH_TOKENS, what="tokens per batch", setting=setting, fix=OOM_FIX
        )
        params = list(sae.parameters()) if isinstance(sae, torch.nn.Module) else []
        self.device = params[0].device if params else torch.device("cpu")
        self.dtype = params[0].dtype if params else torch.float32
        self._done = 0  # documents whose run the consumer has finished with
        self._redo = False

    @property
    def batch_tokens(self) -> int:
        """The encoder batch now: halved after each CUDA out-of-memory error."""
        return self.size.size

    def attempt(self, work: Callable[..., T], *args: Any) -> T | None:
        """`work(*args)`: the consumer's device work on the run just given, all of it before anything of
        the run is kept (`work` must not return None). When CUDA runs out of memory in it: the batch
        halves (`BatchSize.attempt`) and None is returned: the consumer keeps nothing of the run, undoes
        what it drew for it (random keys) and goes on to the next run, which gives this run's documents
        again."""
        got = self.size.attempt(work, *args)
        if got is None:
            self._redo = True
        return got

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.to(self.device, non_blocking=self.device.type == "cuda")
        acts, pre = [], []
        with torch.no_grad():
            for s in range(0, len(x), self.batch_tokens):
                a, p = self.sae.encode(x[s : s + self.batch_tokens].to(self.dtype))
                acts.append(a.float())
                if self.pre:
                    pre.append(p.float())
                del p
        if len(acts) == 1:  # the usual case: no copy
            return acts[0], pre[0] if self.pre else None
        return torch.cat(acts), torch.cat(pre) if self.pre else None

    def __iter__(self) -> Iterator[tuple[list[Doc], torch.Tensor, torch.Tensor | None]]:
        self._done = 0
        cuda = self.device.type == "cuda"
        while self._done < len(self.docs):
            chunks = doc_chunks(self.docs[self._done :], self.batch_tokens)
            rows = self.store.stream_rows(([(d.id, d.skip) for d in c] for c in chunks), pin_memory=cuda)
            try:
                for chunk, x in zip(chunks, rows, strict=True):
                    out = self.size.attempt(self._encode, x)
                    del x
                    if out is None:  # the next run starts at this run's first document, cut smaller
                        break
                    self._redo = False
                    yield chunk, *out
                    del out
                    if self._redo:
                        break
                    self._done += len(chunk)
            finally:
                rows.close()


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int], context: int = 8) -> list[str]:
    """The text each token adds, decoded with up to `context` tokens before it: byte-level tokens that
    split a character decode to "" until the token that completes it."""

    def text(part: Sequence[int]) -> str:
        out = tokenizer.decode(list(part), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return out.rstrip("\ufffd")  # an incomplete UTF-8 character so far

    pieces = []
    for i, t in enumerate(ids):
        start = max(0, i - context)
        prev, cur = text(ids[start:i]), text(ids[start : i + 1])
        pieces.append(cur[len(prev) :] if cur.startswith(prev) else text([t]))
    return pieces


def marked_text(tokens: Sequence[str], acts: Sequence[float]) -> str:
    """tokens joined, each run of firing tokens (act > 0) wrapped in <<...>>."""
    out, inside = [], False
    for t, a in zip(tokens, acts, strict=True):
        if (a > 0) != inside:
            out.append(OPEN if a > 0 else CLOSE)
            inside = a > 0
        out.append(t)
    return "".join(out) + (CLOSE if inside else "")


def window_record(
    tokens: Sequence[str],
    acts: Sequence[float],
    center: int,
    *,
    kind: str,
    completion_id: str,
    label: str | None,
    window_start: int,
    quantile: int | None = None,
) -> dict[str, Any]:
    """One example: the window's tokens and activations; `center` indexes the example token in it and
    `window_start` is the position of its first token in prompt + completion."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    acts = [float(a) + 0.0 for a in acts]  # + 0.0: no -0.0 from a ReLU in the JSON
    return {
        "kind": kind,
        "completion_id": completion_id,
        "label": label,  # for display only, never shown to the explainer
        "position": window_start + center,
        "window_start": window_start,
        "center": center,
        "activation": acts[center],
        "max_activation": max(acts),
        "quantile": quantile,
        "tokens": list(tokens),
        "acts": acts,
        "text": "".join(tokens),
        "marked": marked_text(tokens, acts),
    }


def build_contexts(
    store: LayerStore,
    sae: EncodingSAE,
    records: Sequence[dict[str, Any]],
    features: Sequence[int],
    tokenizer: Tokenizer,
    config: ContextConfig | None = None,
) -> dict[int, FeatureContexts]:
    """Example windows of `features` over the completions of `records` stored in `store` (module doc)."""
    cfg = config or ContextConfig()
    feats = [int(f) for f in features]
    if len(set(feats)) != len(feats) or not all(0 <= f < int(sae.d_sae) for f in feats):
        raise ValueError(f"features must be distinct indices in [0, d_sae={sae.d_sae}), got {feats}")
    docs = docs_for(store, records)
    if not docs:
        raise ValueError(f"none of the {len(records)} completions has completion tokens in {store.dir}")
    offsets = np.r_[0, np.cumsum([d.n for d in docs])]  # global token index of each doc's first token
    F = len(feats)
    doc_max = np.zeros((len(docs), F), np.float32)
    n_firing = np.zeros(F, np.int64)
    sample = [Largest(cfg.reservoir) for _ in feats]  # random keys as scores: a uniform sample
    top = [Largest(4 * cfg.n_bins * max(cfg.explain_per_bin, cfg.score_per_bin, 1)) for _ in feats]
    near = [Largest(cfg.near_misses) for _ in feats]
    # Per-feature generators: a feature's examples depend on (seed, feature, data) only, not on the
    # other features asked for or the batch size.
    keys = [np.random.default_rng([cfg.seed, 7, f]) for f in feats]
    setting = "ContextConfig.batch_tokens"
    stream = EncodedChunks(store, sae, docs, cfg.batch_tokens, setting=setting)
    for chunk, acts, pre in stream:
        got = stream.attempt(_columns_on_host, feats, acts, pre)  # [b, F] each
        acts = pre = None  # freed before the next batch is encoded
        if got is None:  # CUDA ran out of memory: nothing of the batch kept, its documents come again
            continue
        a, p = got
        g0 = offsets[chunk[0].index]
        doc_max[[d.index for d in chunk]] = np.maximum.reduceat(
            a, np.r_[0, np.cumsum([d.n for d in chunk])[:-1]]
        )
        n_firing += (a > 0).sum(0)
        for i in range(F):
            on = a[:, i] > 0
            nz, z = np.flatnonzero(on), np.flatnonzero(~on)
            sample[i].add(g0 + nz, a[nz, i], keys[i].random(len(nz)))
            top[i].add(g0 + nz, a[nz, i], a[nz, i])
            near[i].add(g0 + z, p[z, i], p[z, i])

    side = split_sides(docs, cfg.seed)
    out, plans = {}, {}
    for i, f in enumerate(feats):
        nonzero = np.concatenate([sample[i].result(), top[i].result()])
        nonzero = nonzero[np.unique(nonzero[:, 0], return_index=True)[1]]  # [m, (g, act, _)]
        edges = np.quantile(nonzero[:, 1], np.linspace(0, 1, cfg.n_bins + 1)) if len(nonzero) else np.zeros(0)
        out[f] = FeatureContexts(
            f, int(offsets[-1]), int(n_firing[i]), float(doc_max[:, i].max()) + 0.0, edges.tolist()
        )
        sel = WindowSelection(cfg, np.random.default_rng([cfg.seed, 8, f]), offsets, side, docs)
        for s in (0, 1):
            sel.activating(s, nonzero, edges)
            sel.non_activating(s, doc_max[:, i])
            sel.hard_negatives(s, near[i].result())
        plans[f] = sel

    # Second pass: every window token's activation, re-encoding only the completions that supply a
    # candidate example of a feature that fires somewhere in them (elsewhere it is 0 at every token).
    needed = sorted({c[2] for i, f in enumerate(feats) for c in plans[f].candidates if doc_max[c[2], i] > 0})
    doc_acts, pieces = {}, {}
    stream = EncodedChunks(
        store, sae, [docs[d] for d in needed], cfg.batch_tokens, pre=False, setting=setting
    )
    for chunk, acts, _ in stream:
        got = stream.attempt(_columns_on_host, feats, acts)
        acts = None
        if got is None:
            continue
        (a,) = got
        for d, part in zip(chunk, np.split(a, np.cumsum([c.n for c in chunk])[:-1]), strict=True):
            doc_acts[d.index] = part  # [n, F]
    for i, f in enumerate(feats):

        def window_acts(d: int, lo: int, hi: int, i: int = i) -> np.ndarray:
            return doc_acts[d][lo:hi, i] if d in doc_acts else np.zeros(hi - lo, np.float32)

        for s, kind, d, pos, b in plans[f].accept(window_acts):
            lo, hi = max(0, pos - cfg.before), min(docs[d].n, pos + cfg.after + 1)
            if d not in pieces:
                pieces[d] = token_pieces(tokenizer, docs[d].record["completion_token_ids"])
            rec = docs[d].record
            ex = window_record(
                pieces[d][lo:hi],
                window_acts(d, lo, hi),
                pos - lo,
                kind=kind,
                completion_id=rec["id"],
                label=rec.get("label"),
                window_start=docs[d].n_prompt + lo,
                quantile=b,
            )
            (out[f].explain if s == 0 else out[f].score).append(ex)
    return out


def _columns_on_host(feats: list[int], *acts: torch.Tensor) -> tuple[np.ndarray, ...]:
    """The columns `feats` of each of `acts` [b, d_sae], as numpy arrays on the host ([b, len(feats)]
    each): `build_contexts`'s device work on a batch (`EncodedChunks.attempt`)."""
    return tuple(x[:, feats].cpu().numpy() for x in acts)


def feature_activation_over_text(
    lm: HookableModel, sae: EncodingSAE, layer: int, text: str, *, features: Sequence[int] | None = None
) -> tuple[list[str], np.ndarray]:
    """(token pieces, acts [n_tokens, d_sae] or [n_tokens, len(features)]) of `text` run through
    `lm` (a LoadedModel) and encoded by `sae` at `blocks.{layer}.hook_resid_post`: a token heatmap."""
    name = hook_name(layer)
    ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.model.device)  # [1, n]
    resid = run_with_capture(lm.model, [name], input_ids=ids)[name][0]  # [n, d_model]
    check_sae_fits(sae, resid.shape[-1])
    param = next(iter(sae.parameters()), None) if isinstance(sae, torch.nn.Module) else None
    with torch.no_grad():
        acts = sae.encode(resid.to(param.device if param is not None else "cpu", torch.float32))[0]
    acts = acts if features is None else acts[:, list(features)]
    return token_pieces(lm.tokenizer, ids[0].tolist()), acts.float().cpu().numpy()
