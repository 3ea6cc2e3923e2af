"""Reference-corpus documents: where the text comes from and how it is read, one document at a time.

    source      `hf:<dataset id>[/<glob>]` (a Hugging Face dataset's parquet / JSON-lines files, read a row
                group at a time through `huggingface_hub.HfFileSystem`: nothing is downloaded whole),
                `builtin:corpus` (data/corpus_sample.parquet, a tiny offline corpus in the layout of
                nanochat's pretraining shards), or a local .parquet / .jsonl / .json / .txt file or folder
                (e.g. on Drive). Hub and local files go through the same reader (`iter_documents`).
    documents   a `text` column (or `text_column`), or a chat column of `[{"role", "content"}]` messages
                (rendered in the model's chat format by `packing.encode_document`).

`packing.py` turns documents into fixed-length token sequences; `corpus.py` turns those into activations.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def default_corpus(model_info: dict[str, Any]) -> str:
    """The model's own pretraining data for nanochat: climbmix for a checkpoint layout that appeared on or
    after 2026-03-04 (run.json's `model.layout`), fineweb-edu before (a checkpoint of an older layout
    trained after that date needs CORPUS set by hand); fineweb-edu for other models."""
    if model_info.get("family") == "nanochat" and str(model_info.get("layout") or "2025") >= CLIMBMIX_SINCE:
        return CLIMBMIX
    return FINEWEB_EDU


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
