"""Reference-corpus activations: ordinary text through the model, for SAEs that see millions of tokens.

Behaviour completions give ~10^5 tokens per layer, too few for a dictionary worth interpreting; everyone
who trains good SAEs trains them on a large general corpus (DESIGN.md §6). This module turns a corpus into
residual activations, either stored in the run folder or streamed straight into training:

    source      `hf:<dataset id>[/<glob>]` (a Hugging Face dataset's parquet / JSON-lines files, read a row
                group at a time through `huggingface_hub.HfFileSystem`: nothing is downloaded whole),
                `builtin:corpus` (data/corpus_sample.parquet, a tiny offline corpus in the layout of
                nanochat's pretraining shards), or a local .parquet / .jsonl / .json / .txt file or folder
                (e.g. on Drive). Hub and local files go through the same reader (`iter_documents`).
    documents   a `text` column (or `text_column`), or a chat column of `[{"role", "content"}]` messages,
                rendered in the model's chat format (nanochat's special tokens or the chat template).
    sequences   documents tokenised and packed into fixed-length sequences, each starting with a
                separator token (nanochat's <|bos|>, else the tokenizer's BOS/end-of-text), as SAELens and
                nanochat's own loader do.
    positions   the first `SKIP_FIRST` positions of every sequence and every special token are left out:
                their residuals can carry norms ~100x the others and would dominate a dictionary's
                reconstruction loss. SmolLM2 layer 15 on the shipped corpus: 22,664 at position 0 (the
                separator) and, in 43 of 269 sequences, up to 23,653 at position 1 too (the attention
                sink settles on the first text token), against a median of 168 and a maximum of 236 at
                every later position. Collection prints a warning if a stored row still has a norm over
                `MASSIVE_RATIO` times its batch's median.

`collect_corpus` stores the kept positions of `max_tokens` tokens under `corpus/layer_{L}/` in the
activation store's shard format (one entry per sequence, with the token id and position of every row,
so the explorer can show corpus text), resumes after a disconnect (stored sequences
are skipped without a forward pass), estimates the disk it needs before starting, and records its
settings in run.json. `CorpusStream` instead feeds training from a bounded in-RAM shuffle buffer filled
by forward passes (as SAELens's activation store does), for budgets beyond a free Drive: 2M tokens ×
2048 dims × 3 layers is 24 GB in float16. A fixed ~5% of sequences (`is_heldout`) is held out from
training on either path, for evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from helpers.collect.store import FP16_MAX, ActivationWriter, LayerStore
from helpers.model.chat import NANOCHAT_TOKENS, chat_format_of
from helpers.model.hooks import check_layers, hook_name, run_with_capture
from helpers.run import (
    SETTINGS,
    check_stage_settings,
    corpus_dir,
    read_run_json,
    settings_conflict,
    settings_diff,
    stable_hash,
    update_run_json,
)

BUILTIN_CORPUS = "builtin:corpus"
BUILTIN_PATH = Path(__file__).parent / "data" / "corpus_sample.parquet"
FINEWEB_EDU = "hf:karpathy/fineweb-edu-100b-shuffle"
"""nanochat's pretraining data for models trained before 2026-03-04 (the official d20/d32/d34)."""
CLIMBMIX = "hf:karpathy/climbmix-400b-shuffle"
"""nanochat's pretraining data since 2026-03-04."""
CLIMBMIX_SINCE = "2026-03-04"
SMOLTALK = "hf:HuggingFaceTB/smol-smoltalk"
"""Chat conversations (part of nanochat's SFT mix), for a dictionary of chat-formatted text."""
TEXT_COLUMNS = ("text", "content", "document")
CHAT_COLUMNS = ("messages", "conversations", "conversation")
SUFFIXES = (".parquet", ".jsonl", ".json", ".txt")
EVAL_FRACTION = 0.05
SKIP_FIRST = 2
"""Positions never stored at the start of each sequence: the separator and the attention sink after it."""
MASSIVE_RATIO = 20.0


def default_corpus(model_info: dict[str, Any]) -> str:
    """The model's own pretraining data for nanochat: climbmix for a checkpoint layout that appeared on or
    after 2026-03-04 (run.json's `model.layout`), fineweb-edu before (a checkpoint of an older layout
    trained after that date needs CORPUS set by hand); fineweb-edu for other models."""
    if model_info.get("family") == "nanochat" and str(model_info.get("layout") or "2025") >= CLIMBMIX_SINCE:
        return CLIMBMIX
    return FINEWEB_EDU


# --- where the text comes from -----------------------------------------------------------------------
@dataclass
class CorpusFiles:
    """The files of a corpus, in reading order, and the filesystem that opens them."""

    spec: str
    paths: list[str]
    fs: Any


def hub_filesystem(token: str | None = None) -> Any:
    """The filesystem Hugging Face datasets are read through (a seam for offline tests)."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem(token=token)


def resolve_corpus(spec: str, *, token: str | None = None) -> CorpusFiles:
    """The files of `spec` (see the module docstring), failing with a message that names the fix."""
    import fsspec

    if spec == BUILTIN_CORPUS:
        return CorpusFiles(spec, [str(BUILTIN_PATH)], fsspec.filesystem("file"))
    if spec.startswith("hf:"):
        return _resolve_hub(spec, token)
    if spec.startswith("builtin:"):
        raise ValueError(f"unknown built-in corpus {spec!r}: the only one is {BUILTIN_CORPUS!r}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {spec!r} is neither a local file or folder nor 'hf:<dataset id>' (e.g. {FINEWEB_EDU!r}) "
            f"nor {BUILTIN_CORPUS!r}"
        )
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
    if not files or any(p.suffix not in SUFFIXES for p in files):
        raise ValueError(
            f"{spec}: a corpus is {', '.join(SUFFIXES)} files; found {[p.name for p in files][:8]}"
        )
    return CorpusFiles(spec, [str(p) for p in files], fsspec.filesystem("file"))


def _resolve_hub(spec: str, token: str | None) -> CorpusFiles:
    parts = spec.removeprefix("hf:").strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"{spec!r}: write a Hugging Face dataset as 'hf:<org>/<name>[/<glob>]'")
    repo, pattern = "/".join(parts[:2]), "/".join(parts[2:])
    fs = hub_filesystem(token)
    try:
        if pattern:
            found = fs.glob(f"datasets/{repo}/{pattern}")
        else:
            found = [p for suffix in SUFFIXES for p in fs.glob(f"datasets/{repo}/**/*{suffix}")]
    except Exception as err:  # noqa: BLE001 - offline, gated, missing and network errors all need the same fix
        raise FileNotFoundError(
            f"could not list the files of dataset {repo!r} on the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err)[:200]}). If it is gated, accept its terms on the Hub and set an HF_TOKEN secret; "
            f"offline, use a local file (your own text, JSONL or parquet) or {BUILTIN_CORPUS!r}."
        ) from err
    found = sorted(p for p in found if p.endswith(SUFFIXES))
    if not pattern and any("train" in Path(p).name for p in found):
        found = [p for p in found if "train" in Path(p).name]  # e.g. data/train-00000-of-00004.parquet
    if not found:
        raise FileNotFoundError(
            f"dataset {repo!r} has no {'/'.join(SUFFIXES)} files{' matching ' + pattern if pattern else ''}: "
            "only parquet and JSON datasets can be streamed (datasets 4 dropped loading scripts)"
        )
    return CorpusFiles(spec, found, fs)


def iter_documents(files: CorpusFiles, text_column: str | None = None) -> Iterator[str | list[dict]]:
    """Each document of the corpus, in order: a string, or a list of chat messages. Parquet files are
    read a row group at a time and JSON lines a line at a time, through `files.fs` (local or Hub alike)."""
    for path in files.paths:
        with files.fs.open(path, "rb") as f:
            if path.endswith(".parquet"):
                yield from _parquet_documents(f, path, text_column)
            elif path.endswith(".txt"):
                # A plain text file: paragraphs (separated by blank lines) are the documents.
                text = f.read().decode("utf-8", errors="replace")
                yield from (p.strip() for p in text.split("\n\n") if p.strip())
            else:
                yield from _json_documents(f, path, text_column)


def _column(names: list[str], text_column: str | None, path: str) -> str:
    if text_column:
        if text_column not in names:
            raise KeyError(f"{path} has no column {text_column!r}; its columns are {names}")
        return text_column
    for name in (*TEXT_COLUMNS, *CHAT_COLUMNS):
        if name in names:
            return name
    raise KeyError(
        f"{path} has no text column (looked for {', '.join(TEXT_COLUMNS + CHAT_COLUMNS)}); its columns are "
        f"{names}: pass text_column= (CORPUS_TEXT_COLUMN in notebook 02) with the one holding the text"
    )


def _parquet_documents(f: Any, path: str, text_column: str | None) -> Iterator[str | list[dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow (Colab has it)") from err
    pf = pq.ParquetFile(f)
    column = _column(pf.schema_arrow.names, text_column, path)
    for group in range(pf.num_row_groups):
        yield from (d for d in pf.read_row_group(group, columns=[column]).column(0).to_pylist() if d)


def _json_documents(f: Any, path: str, text_column: str | None) -> Iterator[str | list[dict]]:
    first = f.read(1)
    f.seek(0)
    if first == b"[":  # one JSON array
        rows: Iterable = json.load(f)
    else:  # JSON lines
        rows = (json.loads(line) for line in f if line.strip())
    column = None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f'{path} row {i} is not a JSON object: each line must be like {{"text": ...}}')
        column = column or _column(list(row), text_column, path)
        if row.get(column):
            yield row[column]


# --- tokens ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Packing:
    """How documents become fixed-length sequences for one tokenizer."""

    seq_len: int
    separator: int
    """Starts every sequence and separates documents."""
    special_ids: frozenset[int]
    """Tokens whose positions are not stored (with the first `skip_first` positions)."""
    skip_first: int = SKIP_FIRST
    """Positions 0 .. skip_first - 1 of every sequence are never stored (the separator and the attention
    sink after it; see the module doc)."""

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, seq_len: int) -> Packing:
        if seq_len <= SKIP_FIRST:
            raise ValueError(
                f"seq_len must be above {SKIP_FIRST} (positions 0-{SKIP_FIRST - 1} are never stored), got {seq_len}"
            )
        special = {int(i) for i in tokenizer.all_special_ids}
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
        if chat_format_of(tokenizer) == "nanochat":
            nanochat = [tokenizer.convert_tokens_to_ids(t) for t in NANOCHAT_TOKENS]
            special |= set(nanochat)
            sep = nanochat[0]  # <|bos|> starts every document in nanochat's pretraining
        else:  # the BOS a tokenizer prepends itself, else GPT-2 style <|endoftext|>, else EOS or BOS
            first = tokenizer("a")["input_ids"][:1]
            adds_bos = tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id]
            eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
            eot = eot if eot is not None and tokenizer.convert_ids_to_tokens(eot) == "<|endoftext|>" else None
            candidates = (
                tokenizer.bos_token_id if adds_bos else None,
                eot,
                tokenizer.eos_token_id,
                tokenizer.bos_token_id,
            )
            sep = next((t for t in candidates if t is not None), None)
            if sep is None:
                raise ValueError("the tokenizer has no BOS, end-of-text or EOS token to separate documents")
        return cls(seq_len, int(sep), frozenset(special | {int(sep)}))

    def keep(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] bool: the positions whose residuals are stored."""
        mask = ~torch.isin(ids, torch.tensor(sorted(self.special_ids), device=ids.device))
        mask[:, : self.skip_first] = False
        return mask


def encode_document(tokenizer: Any, doc: str | list[dict]) -> list[int]:
    """Token ids of a document: plain text, or chat messages in the model's own chat format."""
    if isinstance(doc, str):
        return tokenizer.encode(doc, add_special_tokens=False)
    if not isinstance(doc, list) or not all(isinstance(m, dict) and "content" in m for m in doc):
        raise ValueError(
            f"a chat document must be a list of {{'role', 'content'}} messages, got {str(doc)[:80]}"
        )
    if chat_format_of(tokenizer) == "nanochat":
        return _nanochat_conversation(tokenizer, doc)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(doc, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(
        "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in doc), add_special_tokens=False
    )


def _nanochat_conversation(tokenizer: Any, messages: list[dict]) -> list[int]:
    """nanochat's rendering of a conversation (its tokenizer's `render_conversation`), without the leading
    <|bos|> (the packing's separator): a system message joins the first user message, and an assistant
    message may be a list of parts (`text`, `python` tool calls, `python_output`) in their special tokens."""
    sp = lambda name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")  # noqa: E731
    enc = lambda text: tokenizer.encode(str(text), add_special_tokens=False)  # noqa: E731
    wrap = {"python": ("python_start", "python_end"), "python_output": ("output_start", "output_end")}
    if messages and messages[0].get("role") == "system" and len(messages) > 1:
        messages = [
            {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"},
            *messages[2:],
        ]
    ids: list[int] = []
    for m in messages:
        if m.get("role") == "user":
            ids += [sp("user_start"), *enc(m["content"]), sp("user_end")]
            continue
        ids.append(sp("assistant_start"))
        for part in (
            m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        ):
            start, end = wrap.get(part.get("type"), (None, None))
            ids += [sp(start)] * bool(start) + enc(part["text"]) + [sp(end)] * bool(end)
        ids.append(sp("assistant_end"))
    return ids


def iter_sequences(tokenizer: Any, docs: Iterable[str | list[dict]], packing: Packing) -> Iterator[list[int]]:
    """Sequences of `packing.seq_len` tokens: the separator, then the next seq_len - 1 tokens of the
    documents joined by separators. The last one may be shorter."""
    buf: list[int] = []
    width = packing.seq_len - 1
    for doc in docs:
        buf += encode_document(tokenizer, doc)
        buf.append(packing.separator)
        while len(buf) >= width:
            yield [packing.separator, *buf[:width]]
            del buf[:width]
    if len(buf) > 1:
        yield [packing.separator, *buf[:-1]]  # without the trailing separator


def sequence_id(index: int) -> str:
    return f"seq{index:09d}"


def is_heldout(index: int, seed: int = 0, fraction: float = EVAL_FRACTION) -> bool:
    """The fixed ~5% of sequences kept out of training (the same on the stored and streamed paths)."""
    return stable_hash(seed, "corpus-eval", index) % 10_000 < fraction * 10_000


def split_corpus(ids: Iterable[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out) sequence ids of a stored corpus."""
    ids = list(ids)
    held = [i for i in ids if is_heldout(int(i.removeprefix("seq")), seed)]
    held_set = set(held)
    return [i for i in ids if i not in held_set], held


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
    lm: Any,
    corpus: str,
    layers: list[int],
    run_dir: str | os.PathLike,
    *,
    max_tokens: int | None,
    seq_len: int = 256,
    batch_size: int = 16,
    text_column: str | None = None,
    token: str | None = None,
    shard_tokens: int = 65_536,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Store the residuals of `max_tokens` corpus tokens (kept positions, per layer) at `layers` under
    `corpus/layer_{L}/`; returns a summary. A shorter corpus is stored whole, with a message; `max_tokens`
    None stores the whole corpus (a local one: no disk estimate is possible up front). A stored corpus made
    with other settings stops this before anything is written, unless `overwrite` (which deletes it); more
    tokens or more layers add to it."""
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
    files = resolve_corpus(corpus, token=token)
    plan = (
        "all of it"
        if max_tokens is None
        else f"{max_tokens:,} tokens per layer (~{estimate_bytes(max_tokens, d_model, len(layers)) / 2**30:.2f} GiB)"
    )
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
        index, batch, exhausted = 0, [], True
        warned: set[int] = set()  # layers already warned of a massive activation in this collection
        for ids in seqs:
            if have >= budget:
                exhausted = False
                break
            index += 1
            if sequence_id(index - 1) in done:
                continue
            batch.append((sequence_id(index - 1), ids))
            if len(batch) == batch_size:
                have = _store_batch(model, names, layers, writers, batch, packing, stored, warned)
                bar.update(min(have, budget) - bar.n)
                batch = []
        if batch and have < budget:
            have = _store_batch(model, names, layers, writers, batch, packing, stored, warned)
            bar.update(min(have, budget) - bar.n)
    if exhausted and max_tokens is not None and have < max_tokens:
        print(
            f"the corpus ran out: {have:,} of the {max_tokens:,} tokens asked for were collected; continuing with those"
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


def _store_batch(
    model, names, layers, writers, batch, packing: Packing, stored: dict[int, int], warned: set[int]
) -> int:
    """One forward pass over `batch` [(id, token ids)]; kept positions go to each layer's writer.
    Returns the smallest per-layer token count stored so far."""
    ids, mask = _right_pad([s for _, s in batch], packing.separator, model.device)
    keep = packing.keep(ids) & mask.bool()
    acts = run_with_capture(model, names, stop_early=True, input_ids=ids, attention_mask=mask)
    keep_cpu = keep.cpu()
    kept = [(s, keep_cpu[i].nonzero()[:, 0]) for i, (_, s) in enumerate(batch)]  # positions kept per sequence
    for layer, name in zip(layers, names, strict=True):
        h = acts[name][keep]  # [n_kept, d_model], rows in (sequence, position) order
        _warn_if_massive(h, layer, warned)
        h = (h.half() if h.abs().max() < FP16_MAX else h.float()).cpu()  # the store's float16, made on device
        counts = [len(pos) for _, pos in kept]
        for (sid, _), rows, (seq, pos) in zip(batch, h.split(counts), kept, strict=True):
            if rows.shape[0] and sid not in writers[layer].done_ids:
                writers[layer].add(sid, rows, token_ids=[seq[p] for p in pos.tolist()], positions=pos)
                stored[layer] += rows.shape[0]
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
            f"warning: layer {layer}: a stored corpus token has {ratio:.0f}x the median residual norm (massive "
            "activation); such tokens dominate an SAE's loss. If this recurs, find the position or token "
            "(corpus/ keeps token ids and positions) and leave it out."
        )


def _right_pad(seqs: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


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
    choices, unless `overwrite`, which deletes corpus/. A run folder from before settings were recorded
    is compared with run.json's `corpus`."""
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
    overwrite_does = f"delete {folder} and collect the corpus again with the new settings"
    legacy_diff = []
    if has and not (run.get(SETTINGS) or {}).get(CORPUS_STAGE) and run.get("corpus"):
        before = {k: run["corpus"].get(k) for k in values}
        if (legacy_diff := settings_diff(before, values)) and not overwrite:
            raise settings_conflict(f"{folder}", legacy_diff, can_add=False, overwrite_does=overwrite_does)
    decision = check_stage_settings(
        run_dir, CORPUS_STAGE, values, overwrite=overwrite, has_outputs=has, overwrite_does=overwrite_does
    )
    if decision == "overwrite" or (legacy_diff and overwrite):
        shutil.rmtree(folder)
        print(f"OVERWRITE: removed {folder} (made with other settings)")


# --- streamed -----------------------------------------------------------------------------------------
class CorpusStream:
    """Residuals of one layer made on the fly from a corpus, served through a bounded shuffle buffer.

    The buffer holds `buffer_tokens` vectors (float32): it is filled by forward passes, shuffled, and
    its first half served as batches while the second half stays to mix with the next fill (SAELens's
    mixing buffer), so RAM stays at the buffer plus one forward batch for any corpus size. The corpus
    restarts when it runs out (announced once). Held-out sequences (`is_heldout`) are never trained on.
    The stream is deterministic given `seed`; a resumed run (`batches(start=...)`) skips the text earlier
    steps consumed, counted in kept tokens, without forward passes, but refills its buffer: it is not
    bitwise identical to an uninterrupted run, unlike training from a stored corpus.
    """

    def __init__(
        self,
        lm: Any,
        corpus: str,
        layer: int,
        *,
        seq_len: int = 256,
        batch_size: int = 16,
        buffer_tokens: int = 1 << 16,
        text_column: str | None = None,
        token: str | None = None,
        seed: int = 0,
    ):
        self.lm, self.corpus, self.layer, self.text_column, self.seed = lm, corpus, layer, text_column, seed
        check_layers(lm.model, [layer])
        self.packing = Packing.for_tokenizer(lm.tokenizer, seq_len)
        self.files = resolve_corpus(corpus, token=token)
        self.forward_batch, self.buffer_tokens = batch_size, buffer_tokens
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
        """[n_kept, d_model] float32 CPU per forward batch."""
        name = hook_name(self.layer)
        model = self.lm.model
        while True:
            batch = [next(seqs)[1] for _ in range(self.forward_batch)]
            ids, mask = _right_pad(batch, self.packing.separator, model.device)
            keep = self.packing.keep(ids) & mask.bool()
            yield (
                run_with_capture(model, [name], stop_early=True, input_ids=ids, attention_mask=mask)[name][
                    keep
                ]
                .float()
                .cpu()
            )

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
    lm: Any,
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
    print(
        f"streaming {spec} into training: sequences of {seq_len} tokens, a shuffle buffer of "
        f"{buffer_tokens:,} vectors (~{buffer_tokens * int(lm.model.config.hidden_size) * 4 / 2**30:.2f} GiB)"
    )
    return lambda layer: CorpusStream(
        lm,
        spec,
        layer,
        seq_len=seq_len,
        batch_size=batch_size,
        buffer_tokens=buffer_tokens,
        text_column=column,
        token=token,
        seed=seed,
    )
