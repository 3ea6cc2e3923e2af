"""Reference-corpus activations: ordinary text through the model, for SAEs that see millions of tokens.

Behaviour completions give ~10^5 tokens per layer, too few for a dictionary worth interpreting; everyone
who trains good SAEs trains them on a large general corpus (DESIGN.md §6). This module turns a corpus into
residual activations, either stored in the run folder or streamed straight into training:

    documents   `documents.py`: a Hugging Face dataset, the built-in sample or local files, read a row
                group or a line at a time (`resolve_corpus`, `iter_documents`).
    sequences   `packing.py`: documents tokenised in the model's format and packed into fixed-length
                sequences, each starting with a separator token (`Packing`, `iter_sequences`).
    positions   the first `SKIP_FIRST` positions of every sequence and every special token are left out:
                their residuals can carry norms ~100x the others and would dominate a dictionary's
                reconstruction loss. SmolLM2 layer 15 on the shipped corpus: 22,664 at position 0 (the
                separator) and, in 43 of 269 sequences, up to 23,653 at position 1 too (the attention
                sink settles on the first text token), against a median of 168 and a maximum of 236 at
                every later position. Collection prints a warning if a stored row still has a norm over
                `MASSIVE_RATIO` times its batch's median.
    activations this module: the kept positions' residuals, stored or streamed.

`collect_corpus` stores the kept positions of `max_tokens` tokens under `corpus/layer_{L}/` in the
activation store's shard format (one entry per sequence, with the token id and position of every row,
so the explorer can show corpus text), resumes after a disconnect (stored sequences
are skipped without a forward pass), estimates the disk it needs before starting, and records its
settings in run.json. When CUDA runs out of memory in a forward pass (or the copies to the host, all
done before anything of the batch is written), the batch halves (`oom.ShrinkingBatches`, down to one
sequence, then an error naming `CorpusReading.batch_size`) and its sequences go through the model again
at the smaller size, as do all after them: the store then holds what a run started at that size would
(on the CPU exactly, tested; on a GPU a batch shape may round a vector differently in the last bit).
`CorpusStream` instead feeds training from a bounded in-RAM shuffle buffer filled by forward passes (as
SAELens's activation store does), for budgets beyond a free Drive: 2M tokens × 2048 dims × 3 layers is
24 GB in float16. A fixed ~5% of sequences (`is_heldout`) is held out from
training on either path, for evaluation.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from helpers.collect.documents import (
    BUILTIN_CORPUS,
    BUILTIN_PATH,
    CLIMBMIX,
    FINEWEB_EDU,
    SMOLTALK,
    CorpusFiles,
    default_corpus,
    hub_filesystem,
    iter_documents,
    resolve_corpus,
)
from helpers.collect.oom import ShrinkingBatches
from helpers.collect.packing import (
    SKIP_FIRST,
    Packing,
    encode_document,
    is_heldout,
    iter_sequences,
    pad_batch,
    sequence_id,
    split_corpus,
)
from helpers.collect.store import FP16_MAX, ActivationWriter, LayerStore
from helpers.model.hooks import check_layers, hook_name, run_with_capture
from helpers.model.load import LoadedModel
from helpers.model.protocols import HookableModel
from helpers.run import (
    SETTINGS,
    check_stage_settings,
    corpus_dir,
    override_fields,
    read_run_json,
    set_aside,
    settings_conflict,
    settings_diff,
    split_overrides,
    stable_hash,
    update_run_json,
)

__all__ = [  # the documents and packing names stay importable from here, where callers import them
    "BUILTIN_CORPUS",
    "BUILTIN_PATH",
    "CLIMBMIX",
    "FINEWEB_EDU",
    "SKIP_FIRST",
    "SMOLTALK",
    "CorpusFiles",
    "CorpusReading",
    "CorpusStorage",
    "CorpusSettings",
    "CorpusStream",
    "Packing",
    "collect_corpus",
    "corpus_ids",
    "corpus_tokens",
    "default_corpus",
    "encode_document",
    "estimate_bytes",
    "hub_filesystem",
    "is_heldout",
    "iter_documents",
    "iter_sequences",
    "resolve_corpus",
    "sequence_id",
    "split_corpus",
    "stream_factory",
]
MASSIVE_RATIO = 20.0
CORPUS_OOM_FIX = (
    "lower CorpusReading.seq_len (notebook 02: CORPUS_SEQ_LEN), store fewer layers, or use a GPU with "
    "more memory"
)


# --- reading ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusReading:
    """How a corpus is read and run through the model: the settings `collect_corpus` and `CorpusStream`
    share. Both take one as `reading=`, or any of its fields as keywords (`seq_len=128`)."""

    seq_len: int = 256
    """Tokens per packed sequence (`packing.Packing`)."""
    batch_size: int = 16
    """Sequences per forward pass; halved when CUDA runs out of memory (notebook 02: BATCH_SIZE, halved)."""
    text_column: str | None = None
    """The column holding the text; None finds one (`documents.TEXT_COLUMNS`, `CHAT_COLUMNS`)."""
    token: str | None = None
    """A Hugging Face token, for gated datasets."""

    def with_overrides(self, overrides: dict[str, Any]) -> CorpusReading:
        """These settings with the fields named in `overrides` replaced (unknown names are refused)."""
        return override_fields(self, overrides, "corpus reading settings")


@dataclass(frozen=True)
class CorpusStorage:
    """How `collect_corpus` writes what it reads: given whole (`storage=CorpusStorage(...)`) or as
    single fields (`overwrite=True`)."""

    shard_tokens: int = 65_536
    """Tokens per stored shard file."""
    overwrite: bool = False
    """Delete a stored corpus made with other settings instead of stopping."""


def split_corpus_overrides(
    overrides: dict[str, Any], reading: CorpusReading, storage: CorpusStorage
) -> tuple[CorpusReading, CorpusStorage]:
    """`reading` and `storage` with the fields named in `overrides` replaced, each name going to the
    settings that has it; an unknown name is an error listing both sets of names."""
    return split_overrides(overrides, {"corpus reading settings": reading, "storage settings": storage})


# --- stored -------------------------------------------------------------------------------------------
@dataclass
class CorpusSettings:
    """What defines a stored corpus; a rerun with other settings would mix two corpora, so it is refused."""

    spec: str
    text_column: str | None
    seq_len: int
    separator: int
    vocab_size: int


def estimate_bytes(n_tokens: int, d_model: int, n_layers: int) -> int:
    """Disk for `n_tokens` per layer in float16 shards (plus their small indexes)."""
    return n_tokens * d_model * 2 * n_layers + n_tokens // 50 * n_layers


def collect_corpus(
    lm: HookableModel,
    corpus: str,
    layers: list[int],
    run_dir: str | os.PathLike,
    *,
    max_tokens: int | None,
    reading: CorpusReading | None = None,
    storage: CorpusStorage | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Store the residuals of `max_tokens` corpus tokens (kept positions, per layer) at `layers` under
    `corpus/layer_{L}/`; returns a summary. A shorter corpus is stored whole, with a message; `max_tokens`
    None stores the whole corpus (a local one: no disk estimate is possible up front). A stored corpus made
    with other settings stops this before anything is written, unless `overwrite` (which deletes it); more
    tokens or more layers add to it. `reading` (default `CorpusReading()`) and `storage` (default
    `CorpusStorage()`: shards of 65,536 tokens, no overwrite), or their fields as keywords."""
    reading, storage = split_corpus_overrides(
        overrides, reading or CorpusReading(), storage or CorpusStorage()
    )
    shard_tokens, overwrite = storage.shard_tokens, storage.overwrite
    seq_len, batch_size, text_column = reading.seq_len, reading.batch_size, reading.text_column
    if (max_tokens is not None and max_tokens < 1) or batch_size < 1:
        raise ValueError(f"max_tokens and batch_size must be positive, got {max_tokens}, {batch_size}")
    budget = sys.maxsize if max_tokens is None else max_tokens
    model, tokenizer = lm.model, lm.tokenizer
    layers = sorted(set(check_layers(model, layers)))
    names = [hook_name(layer) for layer in layers]
    packing = Packing.for_tokenizer(tokenizer, seq_len)
    settings = CorpusSettings(corpus, text_column, seq_len, packing.separator, len(tokenizer))
    _check_settings(run_dir, settings, layers, overwrite)
    stored = {layer: _stored_tokens(run_dir, layer) for layer in layers}
    have = min(stored.values())
    already = (
        f"{have:,} already stored"
        if len(set(stored.values())) == 1
        else "already stored: " + ", ".join(f"layer {layer} {n:,}" for layer, n in stored.items())
    )
    d_model = int(model.config.hidden_size)
    need = estimate_bytes(max(0, budget - have), d_model, len(layers)) if max_tokens else 0
    corpus_dir(run_dir, layers[0]).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(corpus_dir(run_dir, layers[0])).free
    if need > 0.95 * free:
        raise OSError(
            f"storing {budget - have:,} more corpus tokens at {len(layers)} layer(s) × {d_model} dims needs "
            f"~{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free where the run folder is: lower "
            "CORPUS_TOKENS or the number of layers, or stream the corpus into training instead of storing it"
        )
    files = resolve_corpus(corpus, token=reading.token)
    if max_tokens is None:
        plan = "all of it"
    else:
        gib = estimate_bytes(max_tokens, d_model, len(layers)) / 2**30
        plan = f"{max_tokens:,} tokens per layer (~{gib:.2f} GiB)"
    print(f"corpus {corpus}: {len(files.paths)} file(s); storing {plan}, {already}")
    seqs = iter_sequences(tokenizer, iter_documents(files, text_column), packing)
    with ExitStack() as stack:
        writers = {
            layer: stack.enter_context(
                ActivationWriter(run_dir, layer, shard_tokens=shard_tokens, kind="corpus")
            )
            for layer in layers
        }
        done = set.intersection(*(w.done_ids for w in writers.values()))
        bar = stack.enter_context(
            tqdm(total=max_tokens, initial=min(have, budget), desc="corpus", unit="tok")
        )
        warned: set[int] = set()  # layers already warned of a massive activation in this collection
        index, exhausted = 0, True

        def todo() -> Iterator[tuple[str, list[int]]]:
            """The sequences not stored yet, read as the batches need them, until the budget is met."""
            nonlocal index, exhausted
            for ids in seqs:
                if have >= budget:
                    exhausted = False
                    return
                index += 1
                if sequence_id(index - 1) not in done:
                    yield sequence_id(index - 1), ids

        def forward(batch: list[tuple[str, list[int]]]) -> tuple[list[torch.Tensor], dict]:
            return _batch_vectors(model, names, layers, batch, packing, warned)

        batches = ShrinkingBatches(
            batch_size,
            what="sequences per forward pass",
            setting="CorpusReading.batch_size (notebook 02: BATCH_SIZE, halved)",
            fix=CORPUS_OOM_FIX,
        )
        try:
            for batch, (positions, rows) in batches.run(todo(), forward):
                have = _write_batch(writers, batch, positions, rows, stored)
                bar.update(min(have, budget) - bar.n)
        except torch.cuda.OutOfMemoryError:
            # Even one sequence did not fit. Keep what the finished batches gave (nothing of the failed
            # one was written), so that a rerun with other settings goes on after them.
            for writer in writers.values():
                writer.flush()
            raise
    if exhausted and max_tokens is not None and have < max_tokens:
        print(
            f"the corpus ran out: {have:,} of the {max_tokens:,} tokens asked for were collected; "
            "continuing with those"
        )
    update_run_json(
        run_dir, corpus={**asdict(settings), "layers": layers, "tokens": have, "max_tokens": max_tokens}
    )
    return {
        "corpus": corpus,
        "layers": layers,
        "tokens_per_layer": {layer: stored[layer] for layer in layers},
        "sequences": index,
        "seq_len": seq_len,
        "exhausted": exhausted and have < budget,
        "gib_on_disk": round(sum(_bytes(run_dir, layer) for layer in layers) / 2**30, 3),
    }


def _batch_vectors(
    model, names, layers, batch, packing: Packing, warned: set[int]
) -> tuple[list[torch.Tensor], dict[int, tuple[torch.Tensor, ...]]]:
    """All of a batch's device work, nothing written: one forward pass over `batch` [(id, token ids)];
    returns the kept positions of each sequence and, per layer, each sequence's kept rows as the store
    keeps them, on the host. The device tensors are this frame's, so they are freed with it when CUDA
    runs out of memory."""
    ids, mask = pad_batch([s for _, s in batch], packing.separator, model.device)
    keep = packing.keep(ids) & mask.bool()
    acts = run_with_capture(model, names, stop_early=True, input_ids=ids, attention_mask=mask)
    keep_cpu = keep.cpu()
    positions = [keep_cpu[i].nonzero()[:, 0] for i in range(len(batch))]  # positions kept per sequence
    counts = [len(pos) for pos in positions]
    rows = {}
    for layer, name in zip(layers, names, strict=True):
        h = acts[name][keep]  # [n_kept, d_model], rows in (sequence, position) order
        _warn_if_massive(h, layer, warned)
        h = (h.half() if h.abs().max() < FP16_MAX else h.float()).cpu()  # the store's float16, made on device
        rows[layer] = h.split(counts)
    return positions, rows


def _write_batch(writers, batch, positions, rows, stored: dict[int, int]) -> int:
    """Each layer's kept rows of `batch` (`_batch_vectors`) to its writer, the sequences it lacks;
    returns the smallest per-layer token count stored so far."""
    for layer, per_sequence in rows.items():
        for (sid, seq), vectors, pos in zip(batch, per_sequence, positions, strict=True):
            if vectors.shape[0] and sid not in writers[layer].done_ids:
                writers[layer].add(sid, vectors, token_ids=[seq[p] for p in pos.tolist()], positions=pos)
                stored[layer] += vectors.shape[0]
    return min(stored.values())


def _warn_if_massive(h: torch.Tensor, layer: int, warned: set[int]) -> None:
    """Print once per layer (per collection: `warned`) if a stored row's norm is over MASSIVE_RATIO x the
    batch's median."""
    if layer in warned or len(h) < 16:
        return
    norms = h.float().norm(dim=1)
    ratio = float(norms.max() / norms.median().clamp_min(1e-12))
    if ratio > MASSIVE_RATIO:
        warned.add(layer)
        print(
            f"warning: layer {layer}: a stored corpus token has {ratio:.0f}x the median residual norm "
            "(massive activation); such tokens dominate an SAE's loss. If this recurs, find the position "
            "or token (corpus/ keeps token ids and positions) and leave it out."
        )


def _stored_tokens(run_dir: str | os.PathLike, layer: int) -> int:
    try:
        return LayerStore(run_dir, layer, kind="corpus").n_tokens
    except FileNotFoundError:
        return 0


def _bytes(run_dir: str | os.PathLike, layer: int) -> int:
    folder = corpus_dir(run_dir, layer)
    return sum(p.stat().st_size for p in folder.glob("shard_*")) if folder.exists() else 0


CORPUS_STAGE = "02_corpus"
"""The reference corpus's settings in run.json (`CorpusSettings`; more tokens or layers only add)."""


def _check_settings(
    run_dir: str | os.PathLike, settings: CorpusSettings, layers: list[int], overwrite: bool
) -> None:
    """The corpus settings against those of the corpus already stored (any layer): the same resume (more
    tokens and layers add); others stop before anything is written, naming each difference and the
    choices, unless `overwrite`, which moves corpus/ to replaced/ (run.set_aside). A run folder from
    before settings were recorded is compared with run.json's `corpus`."""
    folder = corpus_dir(run_dir, 0).parent
    stored = sorted(
        {
            *layers,
            *(int(d.name.removeprefix("layer_")) for d in folder.glob("layer_*") if d.name[6:].isdigit()),
        }
    )
    has = any(_stored_tokens(run_dir, layer) for layer in stored)
    values = asdict(settings)
    run = read_run_json(run_dir)
    overwrite_does = f"move {folder} to replaced/ and collect the corpus again with the new settings"
    legacy_diff = []
    if has and not (run.get(SETTINGS) or {}).get(CORPUS_STAGE) and run.get("corpus"):
        before = {k: run["corpus"].get(k) for k in values}
        if (legacy_diff := settings_diff(before, values)) and not overwrite:
            raise settings_conflict(f"{folder}", legacy_diff, can_add=False, overwrite_does=overwrite_does)
    decision = check_stage_settings(
        run_dir, CORPUS_STAGE, values, overwrite=overwrite, has_outputs=has, overwrite_does=overwrite_does
    )
    if decision == "overwrite" or (legacy_diff and overwrite):
        set_aside(run_dir, CORPUS_STAGE, [folder])  # kept in replaced/, collected again


# --- streamed -----------------------------------------------------------------------------------------
class CorpusStream:
    """Residuals of one layer made on the fly from a corpus, served through a bounded shuffle buffer.

    The buffer holds `buffer_tokens` vectors (float32): it is filled by forward passes, shuffled, and
    its first half served as batches while the second half stays to mix with the next fill (SAELens's
    mixing buffer), so RAM stays at the buffer plus one forward batch for any corpus size. The corpus
    restarts when it runs out (announced once). Held-out sequences (`is_heldout`) are never trained on.
    The stream is deterministic given `seed`; a resumed run (`batches(start=...)`) skips the text earlier
    steps consumed, counted in kept tokens, without forward passes, but refills its buffer: it is not
    bitwise identical to an uninterrupted run, unlike training from a stored corpus. `reading` (default
    `CorpusReading()`), or its fields as keywords, says how the corpus is read. CUDA out of memory in a
    forward pass halves the passes (down to one sequence, then an error naming `batch_size`) and redoes
    the failed one's sequences; the buffer fills with the same vectors (on a GPU, to the rounding another
    batch shape may bring).
    """

    def __init__(
        self,
        lm: HookableModel,
        corpus: str,
        layer: int,
        *,
        reading: CorpusReading | None = None,
        buffer_tokens: int = 1 << 16,
        seed: int = 0,
        **overrides: Any,
    ):
        reading = (reading or CorpusReading()).with_overrides(overrides)
        self.lm, self.corpus, self.layer, self.seed = lm, corpus, layer, seed
        self.text_column = reading.text_column
        check_layers(lm.model, [layer])
        self.packing = Packing.for_tokenizer(lm.tokenizer, reading.seq_len)
        self.files = resolve_corpus(corpus, token=reading.token)
        self.forward_batch, self.buffer_tokens = reading.batch_size, buffer_tokens
        self.passes = ShrinkingBatches(
            reading.batch_size,
            what="sequences per forward pass",
            setting="CorpusReading.batch_size (stream_factory's batch_size)",
            fix=CORPUS_OOM_FIX,
        )
        """The forward passes' size: `forward_batch` until CUDA runs out of memory, then halved."""
        self.d_model = int(lm.model.config.hidden_size)

    def _sequences(self, heldout: bool) -> Iterator[tuple[int, list[int]]]:
        epoch = 0
        while True:
            seqs = iter_sequences(
                self.lm.tokenizer, iter_documents(self.files, self.text_column), self.packing
            )
            n = 0
            for i, ids in enumerate(seqs):
                if is_heldout(i, self.seed) == heldout:
                    n += 1
                    yield i, ids
            if n == 0:
                raise ValueError(
                    f"corpus {self.corpus} has no {'held-out' if heldout else 'training'} sequences"
                )
            epoch += 1
            if epoch == 1 and not heldout:
                print(f"corpus {self.corpus} ran out after {n} training sequences: starting it again")

    def _vectors(self, seqs: Iterator[tuple[int, list[int]]]) -> Iterator[torch.Tensor]:
        """[n_kept, d_model] float32 CPU per `forward_batch` sequences, whatever the forward passes'
        size (`passes`, halved after CUDA runs out of memory): the buffer fills as it would without."""
        name = hook_name(self.layer)
        model = self.lm.model

        def forward(batch: list[list[int]]) -> torch.Tensor:
            ids, mask = pad_batch(batch, self.packing.separator, model.device)
            keep = self.packing.keep(ids) & mask.bool()
            acts = run_with_capture(model, [name], stop_early=True, input_ids=ids, attention_mask=mask)
            return acts[name][keep].float().cpu()

        while True:
            group = [next(seqs)[1] for _ in range(self.forward_batch)]
            parts = [vectors for _, vectors in self.passes.run(group, forward)]
            yield parts[0] if len(parts) == 1 else torch.cat(parts)

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        """Endless shuffled training batches [batch_size, d_model], from step `start` on."""
        if self.buffer_tokens < 2 * batch_size:
            raise ValueError(
                f"buffer_tokens ({self.buffer_tokens}) must hold at least two batches of {batch_size}"
            )
        seqs = self._sequences(heldout=False)
        skip = start * batch_size
        while skip > 0:  # resume: pass over the text already consumed, without forward passes
            skip -= int(self.packing.keep(torch.tensor([next(seqs)[1]])).sum())
        g = torch.Generator().manual_seed(stable_hash(self.seed, seed, start) % 2**63)
        buffer = torch.empty(0, self.d_model)
        source = self._vectors(seqs)
        while True:
            while len(buffer) < self.buffer_tokens:
                buffer = torch.cat([buffer, next(source)])
            buffer = buffer[torch.randperm(len(buffer), generator=g)]
            half = (len(buffer) // 2) // batch_size * batch_size
            yield from buffer[:half].split(batch_size)
            buffer = buffer[half:].clone()

    def heldout_batches(self, n_tokens: int, batch_size: int = 4096) -> list[torch.Tensor]:
        """About `n_tokens` vectors of held-out sequences, for evaluation."""
        out, have, source = [], 0, self._vectors(self._sequences(heldout=True))
        while have < n_tokens:
            out.append(next(source))
            have += len(out[-1])
        return list(torch.cat(out)[:n_tokens].split(batch_size))


def corpus_tokens(run_dir: str | os.PathLike, layer: int) -> int:
    """Tokens of the stored corpus at `layer` (0 when none)."""
    return _stored_tokens(run_dir, layer)


def corpus_ids(
    run_dir: str | os.PathLike, layer: int, seed: int = 0
) -> tuple[LayerStore, list[str], list[str]]:
    """(the stored corpus of `layer`, training sequence ids, held-out sequence ids)."""
    store = LayerStore(run_dir, layer, kind="corpus")
    train, held = split_corpus(store.completion_ids, seed)
    return store, train, held


def stream_factory(
    lm: LoadedModel,
    run_dir: str | os.PathLike,
    *,
    corpus: str | None = None,
    buffer_tokens: int = 1 << 17,
    batch_size: int = 16,
    token: str | None = None,
    seed: int = 0,
) -> Callable[[int], CorpusStream]:
    """`layer -> CorpusStream` with the corpus notebook 02 recorded in run.json (`corpus` overrides the
    source; without either, the model's default corpus), for `saes.train_grid(corpus_stream=...)`."""
    recorded = read_run_json(run_dir).get("corpus") or {}
    spec = corpus or recorded.get("spec") or default_corpus(lm.info.to_dict())
    seq_len, column = int(recorded.get("seq_len") or 256), recorded.get("text_column")
    gib = buffer_tokens * int(lm.model.config.hidden_size) * 4 / 2**30
    print(
        f"streaming {spec} into training: sequences of {seq_len} tokens, a shuffle buffer of "
        f"{buffer_tokens:,} vectors (~{gib:.2f} GiB)"
    )
    reading = CorpusReading(seq_len=seq_len, batch_size=batch_size, text_column=column, token=token)
    return lambda layer: CorpusStream(
        lm, spec, layer, reading=reading, buffer_tokens=buffer_tokens, seed=seed
    )
