"""The activation store: per-token residual vectors on disk, in shards, read back memory-mapped.

Layout under the run folder (DESIGN.md §3):

    activations/layer_{L}/shard_00000.npy    [n_tokens, d_model] float16 (float32 if a value overflows fp16)
    activations/layer_{L}/shard_00000.json   which completions the shard holds:
        {"dtype": "float16", "n_tokens": N, "d_model": D,
         "entries": [[completion_id, first_row, n_tokens, first_position], ...]}

The reference corpus (`collect/corpus.py`) uses the same format under `corpus/layer_{L}/` (`kind="corpus"`):
an entry is then one fixed-length text sequence, and its rows are the positions kept. Its text is not in
completions.jsonl, so each of its shards also holds the token of every row:

    corpus/layer_{L}/shard_00000.tokens.npy    [n_tokens, 2] int32: (token id, position in its sequence)

and the shard's `.json` says `"token_ids": true`. Positions need not be consecutive (special tokens are
not stored), so a reader rebuilds a window from the rows of one sequence whose positions follow each
other. Stores written before this (no `.tokens.npy`) still load; `LayerStore.token_ids_of` is then None.

A completion's tokens are contiguous inside one shard. The `.npy` (and `.tokens.npy`) are written first
and the `.json` last, all atomically, so a shard without its `.json` is incomplete and is ignored (and
rewritten) by a resumed run: a disconnect or a full disk never leaves a shard that a reader would trust.
Each reader and writer checks every shard's `.npy` against its `.json` on open (header and file size; no
data read): a damaged shard (truncated by a Drive sync cut short) stops a reader with the completions it
holds, and a writer removes it and collects them again, so rerunning notebook 02 repairs the store.
`.npy` files memory-map, so the SAE trainer streams a store larger than RAM (`iter_batches` holds at
most `buffer_bytes` of activations at a time). `LayerStore.stream_rows` reads groups of entries in a
background thread (`prefetched`), a few groups ahead of the consumer, so disk reads overlap the compute;
into pinned memory when the consumer copies them to a GPU (`non_blocking` copies).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from helpers.run import activations_dir, atomic_write_bytes, atomic_write_json, corpus_dir

FP16_MAX = float(np.finfo(np.float16).max)
FOLDERS = {"activations": activations_dir, "corpus": corpus_dir}
"""Where a store of each kind lives in the run folder: behaviour completions, or the reference corpus."""
TOKENS_SUFFIX = ".tokens.npy"
"""A shard's token ids and positions beside its `.npy` (module doc)."""
T = TypeVar("T")


def check_finite_tokens(arr: np.ndarray, completion_id: str) -> None:
    """Refuse a completion's activations [n_tokens, d_model] holding NaN or inf, naming token and dim."""
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"non-finite activation in completion {completion_id!r} at token {bad[0]}, dim {bad[1]}: "
            "the model overflowed (on a T4 load nanochat in float32) and nothing of it was stored"
        )


class ActivationWriter:
    """Accumulates per-completion activations of one layer and writes them as shards of ~`shard_tokens`.

    Use as a context manager (the last partial shard is written on exit). `done_ids` lists completions
    already stored by an earlier run, so the caller can skip them. Entries added with `token_ids` get
    them stored beside their rows (module doc); a writer takes all its entries with ids or all without.
    """

    def __init__(
        self, run_dir: str | os.PathLike, layer: int, *, shard_tokens: int = 65_536, kind: str = "activations"
    ):
        self.dir = FOLDERS[kind](run_dir, layer)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        self._pending: list[tuple[str, np.ndarray, int, np.ndarray | None]] = []
        self._pending_tokens = 0
        self._with_ids: bool | None = None
        complete = _complete_shards(self.dir)
        for k, problem in _broken_shards(self.dir, complete).items():
            _remove_broken(self.dir, k, complete.pop(k), problem)
        self.done_ids = {e[0] for meta in complete.values() for e in meta["entries"]}
        self._next = max(complete, default=-1) + 1

    def add(
        self,
        completion_id: str,
        acts: torch.Tensor | np.ndarray,
        first_position: int = 0,
        *,
        token_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        positions: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Queue `acts` ([n_tokens, d_model]) of one completion; flushes a shard when enough are queued.
        `token_ids` [n_tokens]: the token of each row, stored with `positions` [n_tokens] (each row's
        position in its sequence; default `first_position`, `first_position + 1`, ...)."""
        if completion_id in self.done_ids:
            return
        arr = (
            acts.detach().float().cpu().numpy()
            if isinstance(acts, torch.Tensor)
            else np.asarray(acts, np.float32)
        )
        if arr.ndim != 2:
            raise ValueError(
                f"activations of {completion_id!r} must be [n_tokens, d_model], got shape {arr.shape}"
            )
        check_finite_tokens(arr, completion_id)
        ids = None
        if token_ids is not None:
            ids = _ids_and_positions(completion_id, len(arr), token_ids, positions, first_position)
        if self._with_ids is None:
            self._with_ids = ids is not None
        if self._with_ids != (ids is not None):
            raise ValueError(
                f"{completion_id!r} was added {'without' if ids is None else 'with'} token ids but earlier "
                f"entries of this writer were not: pass token_ids for every entry of {self.dir}, or for none"
            )
        if ids is not None:
            first_position = int(ids[0, 1]) if len(ids) else first_position
        self._pending.append((completion_id, arr, first_position, ids))
        self._pending_tokens += len(arr)
        self.done_ids.add(completion_id)
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = np.concatenate([a for _, a, _, _ in self._pending])
        dtype = "float16" if np.abs(data).max(initial=0) < FP16_MAX else "float32"
        entries, row = [], 0
        for cid, arr, pos, _ in self._pending:
            entries.append([cid, row, len(arr), pos])
            row += len(arr)
        name = f"shard_{self._next:05d}"
        try:
            atomic_write_bytes(self.dir / f"{name}.npy", _npy_bytes(data.astype(dtype)))
            meta = {"dtype": dtype, "n_tokens": len(data), "d_model": data.shape[1], "entries": entries}
            if self._with_ids:
                ids = np.concatenate([i for _, _, _, i in self._pending])
                atomic_write_bytes(self.dir / f"{name}{TOKENS_SUFFIX}", _npy_bytes(ids))
                meta["token_ids"] = True
            atomic_write_json(self.dir / f"{name}.json", meta)
        except OSError as err:
            for suffix in (".npy", TOKENS_SUFFIX):  # no shard without its index
                (self.dir / f"{name}{suffix}").unlink(missing_ok=True)
            for cid, *_ in self._pending:
                self.done_ids.discard(cid)
            raise OSError(
                err.errno,
                f"writing {name} in {self.dir} failed ({err.strerror or err}). Earlier shards are intact; "
                "free disk space (or Drive quota) and rerun: collection resumes after the last complete "
                "shard.",
            ) from err
        self._next += 1
        self._pending, self._pending_tokens = [], 0

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.flush()


class LayerStore:
    """Read access to one layer's shards. Rows are tokens, numbered across shards in shard order."""

    def __init__(self, run_dir: str | os.PathLike, layer: int, *, kind: str = "activations"):
        self.dir = FOLDERS[kind](run_dir, layer)
        shards = _complete_shards(self.dir)
        what = "reference-corpus step" if kind == "corpus" else "(collect activations)"
        if not shards:
            raise FileNotFoundError(
                f"no activations in {self.dir}: run notebook 02 {what} for layer {layer} first"
            )
        if broken := _broken_shards(self.dir, shards):
            k, problem = next(iter(broken.items()))
            ids = [e[0] for j in broken for e in shards[j]["entries"]]
            more = f" and {len(broken) - 1} other shard(s)" if len(broken) > 1 else ""
            raise ValueError(
                f"{self.dir / f'shard_{k:05d}.npy'} is damaged ({problem}){more}; it holds {len(ids)} "
                f"{'sequence' if kind == 'corpus' else 'completion'}(s) {ids[:5]}"
                f"{'...' if len(ids) > 5 else ''}. "
                f"Rerun notebook 02 {what} for layer {layer}: it removes the damaged shard(s) and collects "
                "those again, leaving every other shard as it is (a Drive sync cut short or a full disk "
                "leaves such a file)."
            )
        self._paths = [self.dir / f"shard_{k:05d}.npy" for k in sorted(shards)]
        self._metas = [shards[k] for k in sorted(shards)]
        self.d_model = self._metas[0]["d_model"]
        self._starts = np.cumsum([0] + [m["n_tokens"] for m in self._metas])
        self.n_tokens = int(self._starts[-1])
        # completion id -> (shard, first row in shard, n_tokens, first position)
        self.entries = {e[0]: (s, e[1], e[2], e[3]) for s, m in enumerate(self._metas) for e in m["entries"]}
        self._mmaps: dict[int, np.ndarray] = {}
        # per shard: whether it holds its rows' token ids (stores written before they were kept do not)
        self.has_token_ids = [
            bool(m.get("token_ids")) and (self.dir / f"shard_{k:05d}{TOKENS_SUFFIX}").exists()
            for k, m in zip(sorted(shards), self._metas, strict=True)
        ]
        self._ids: dict[int, np.ndarray] = {}

    @property
    def completion_ids(self) -> list[str]:
        return list(self.entries)

    def shard(self, s: int) -> np.ndarray:
        if s not in self._mmaps:
            self._mmaps[s] = np.load(self._paths[s], mmap_mode="r")
        return self._mmaps[s]

    def tokens_of(self, completion_id: str) -> np.ndarray:
        """[n_tokens, d_model] float32 of one completion."""
        s, row, n, _ = self.entries[completion_id]
        return np.asarray(self.shard(s)[row : row + n], dtype=np.float32)

    def shard_token_ids(self, s: int) -> np.ndarray | None:
        """[n_tokens, 2] int32 (token id, position) of shard `s`'s rows, or None when it has none."""
        if not self.has_token_ids[s]:
            return None
        if s not in self._ids:
            self._ids[s] = np.load(self._paths[s].with_suffix(TOKENS_SUFFIX), mmap_mode="r")
        return self._ids[s]

    def token_ids_of(self, completion_id: str) -> np.ndarray | None:
        """[n_tokens, 2] int32 (token id, position in its sequence) of one entry's rows, or None when
        its shard was written without them."""
        s, row, n, _ = self.entries[completion_id]
        ids = self.shard_token_ids(s)
        return None if ids is None else np.asarray(ids[row : row + n])

    def stream_rows(
        self, groups: Iterable[Sequence[tuple[str, int]]], *, pin_memory: bool = False, depth: int = 2
    ) -> Iterator[torch.Tensor]:
        """Per group of (entry id, rows to skip), the rows of those entries after the skipped ones,
        concatenated in the group's order: one [rows, d_model] tensor per group, in the shards' dtype
        (float16, or float32 when a shard is), read in a background thread up to `depth` groups ahead
        (`prefetched`). `pin_memory`: in page-locked memory, for `.to("cuda", non_blocking=True)`
        (needs CUDA). Stop early by closing the iterator (or dropping it): the reader thread ends."""
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (torch.cuda.is_available() is False): pass False")

        def read(group: Sequence[tuple[str, int]]) -> torch.Tensor:
            parts = []
            for cid, skip in group:
                s, row, n, _ = self.entries[cid]
                parts.append(self.shard(s)[row + skip : row + n])
            x = torch.from_numpy(np.concatenate(parts) if len(parts) != 1 else np.array(parts[0]))
            return x.pin_memory() if pin_memory else x

        return prefetched((read(g) for g in groups), depth)

    def _shard_rows(self, completion_ids: Iterable[str] | None) -> dict[int, np.ndarray]:
        """Rows (within each shard) belonging to `completion_ids` (all when None)."""
        if completion_ids is None:
            return {s: np.arange(m["n_tokens"]) for s, m in enumerate(self._metas)}
        rows: dict[int, list[np.ndarray]] = {}
        for cid in completion_ids:
            if cid not in self.entries:
                raise KeyError(f"completion {cid!r} has no activations in {self.dir}")
            s, row, n, _ = self.entries[cid]
            rows.setdefault(s, []).append(np.arange(row, row + n))
        return {s: np.sort(np.concatenate(r)) for s, r in rows.items()}

    def count(self, completion_ids: Iterable[str] | None = None) -> int:
        return int(sum(len(r) for r in self._shard_rows(completion_ids).values()))

    def iter_batches(
        self,
        batch_size: int,
        *,
        completion_ids: Iterable[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_bytes: int = 1 << 30,
    ) -> Iterator[torch.Tensor]:
        """Yield float32 batches `[batch_size, d_model]` (the last one may be smaller), one pass.

        Shuffling: shards are visited in a random order and rows are shuffled inside a buffer of whole
        shards holding at most `buffer_bytes` of float32, so RAM stays bounded for any store size.
        """
        rows = self._shard_rows(completion_ids)
        rng = np.random.default_rng(seed)
        order = list(rows)
        if shuffle:
            rng.shuffle(order)
        buffer: list[np.ndarray] = []
        held = 0
        for i, s in enumerate(order):
            buffer.append(np.asarray(self.shard(s)[rows[s]], dtype=np.float32))
            held += buffer[-1].nbytes
            last = i == len(order) - 1
            if held < buffer_bytes and not last:
                continue
            data = np.concatenate(buffer)
            if shuffle:
                data = data[rng.permutation(len(data))]
            buffer, held = [], 0
            full = len(data) - len(data) % batch_size
            for start in range(0, full, batch_size):
                yield torch.from_numpy(data[start : start + batch_size])
            if full < len(data):  # carry the remainder into the next buffer so batches stay full
                buffer, held = [data[full:]], data[full:].nbytes
                if last:
                    yield torch.from_numpy(data[full:])


class _Failed:
    """An exception raised in `prefetched`'s reader thread, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of `items`, in order, produced by a background thread at most `depth` ahead of the
    consumer (a bounded queue), so producing the next ones (disk reads) overlaps the consumer's work.
    An exception in the thread is raised in the consumer at the item where it happened; closing the
    returned iterator (or dropping it, or a `break` out of its loop) stops the thread and waits for it."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:  # re-raised in the consumer
            put(_Failed(e))
            return
        put(_END)

    def consume() -> Iterator[T]:
        thread = threading.Thread(target=produce, name="store-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()

    return consume()


def _complete_shards(folder: Path) -> dict[int, dict]:
    """Shards whose `.json` exists (and therefore whose `.npy` was fully written before it)."""
    shards = {}
    for meta_path in sorted(folder.glob("shard_*.json")):
        if (folder / f"{meta_path.stem}.npy").exists():
            shards[int(meta_path.stem.split("_")[1])] = json.loads(meta_path.read_text())
    return shards


def _broken_shards(folder: Path, shards: dict[int, dict]) -> dict[int, str]:
    """Shards whose `.npy` (or `.tokens.npy`) does not hold what their `.json` index says: the problem
    of each, e.g. a file truncated by a sync cut short, which would fail later as a bare mmap error."""
    broken = {}
    for k, meta in shards.items():
        expected = [(f"shard_{k:05d}.npy", (meta["n_tokens"], meta["d_model"]))]
        if meta.get("token_ids") and (folder / f"shard_{k:05d}{TOKENS_SUFFIX}").exists():
            expected.append((f"shard_{k:05d}{TOKENS_SUFFIX}", (meta["n_tokens"], 2)))
        for name, shape in expected:
            if problem := _npy_problem(folder / name, shape):
                broken[k] = f"{name}: {problem}"
                break
    return broken


def _npy_problem(path: Path, shape: tuple[int, int]) -> str | None:
    """Why the `.npy` at `path` is not a complete array of `shape` (None when it is), from its header
    and its size; the data is not read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            found, _, dtype = read(f)
        except (ValueError, OSError, SyntaxError) as err:
            return f"unreadable header ({err}), {size} bytes"
        offset = f.tell()
    if tuple(found) != tuple(shape):
        return f"shape {tuple(found)}, the index says {tuple(shape)}"
    want = offset + int(np.prod(shape)) * dtype.itemsize
    return None if size == want else f"{size} bytes, a complete shard has {want}"


def _remove_broken(folder: Path, k: int, meta: dict, problem: str) -> None:
    """Remove a damaged shard, index first (so it is never half-trusted), announcing the completions
    it held: the writer's caller collects them again."""
    (folder / f"shard_{k:05d}.json").unlink()
    for suffix in (".npy", TOKENS_SUFFIX):
        (folder / f"shard_{k:05d}{suffix}").unlink(missing_ok=True)
    ids = [e[0] for e in meta["entries"]]
    print(
        f"removed damaged shard_{k:05d} of {folder} ({problem}); its {len(ids)} entries "
        f"{ids[:5]}{'...' if len(ids) > 5 else ''} are collected again"
    )


def _ids_and_positions(cid: str, n: int, token_ids, positions, first_position: int) -> np.ndarray:
    """[n, 2] int32 (token id, position) of one entry, checked against its `n` rows."""
    ids = np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids, np.int64).ravel()
    pos = (
        np.arange(first_position, first_position + n)
        if positions is None
        else np.asarray(
            positions.cpu() if isinstance(positions, torch.Tensor) else positions, np.int64
        ).ravel()
    )
    if len(ids) != n or len(pos) != n:
        raise ValueError(
            f"{cid!r} has {n} rows but {len(ids)} token ids and {len(pos)} positions: one of each per row"
        )
    if n > 1 and (np.diff(pos) <= 0).any():
        raise ValueError(f"the positions of {cid!r} must increase, got {pos[:8].tolist()}...")
    return np.stack([ids, pos], axis=1).astype(np.int32)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
