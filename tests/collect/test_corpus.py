"""Reference-corpus activations: the corpus the package ships goes through the same reader as a Hub
dataset (a Hub filesystem stand-in serves it from a local folder), documents become fixed-length
sequences with BOS/special positions left out, stored vectors equal the model's residuals and keep their
token ids, collection resumes, the streamed path serves the same training vectors as the stored one, and
bad input is named."""

from __future__ import annotations

import json
import re
import shutil
from collections import namedtuple
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

import helpers
from helpers.collect import corpus, documents
from helpers.collect.corpus import (
    BUILTIN_CORPUS,
    BUILTIN_PATH,
    CorpusReading,
    CorpusStorage,
    CorpusStream,
    Packing,
    collect_corpus,
    corpus_ids,
    is_heldout,
    iter_documents,
    iter_sequences,
    resolve_corpus,
)
from helpers.collect.store import LayerStore
from helpers.env import NotebookError
from helpers.model.hooks import hook_name, run_with_capture
from tests.model import nanochat_oracle

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAYER = 3
HUB_ID = "karpathy/fineweb-edu-100b-shuffle"
SMALL_ID = "someone/small-corpus"
SMALL_DOCS = 12


def docs() -> list[str]:
    return pq.read_table(BUILTIN_PATH).column("text").to_pylist()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local folder laid out like the Hub (`datasets/<org>/<name>/...`) behind the same fsspec interface
    `HfFileSystem` has, holding the shipped corpus as nanochat's first pretraining shard."""
    root = tmp_path / "hub"
    shard = root / "datasets" / HUB_ID / "shard_00000.parquet"
    shard.parent.mkdir(parents=True)
    shutil.copy(BUILTIN_PATH, shard)
    small = root / "datasets" / SMALL_ID / "data" / "train-00000-of-00001.parquet"
    small.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": docs()[:SMALL_DOCS]}), small, row_group_size=3)
    pq.write_table(pa.table({"text": ["held back"]}), small.parent / "test-00000-of-00001.parquet")
    monkeypatch.setattr(
        documents, "hub_filesystem", lambda token=None: DirFileSystem(str(root), LocalFileSystem())
    )
    return root


def test_the_shipped_corpus_is_a_small_parquet_shard_in_the_hub_layout():
    table = pq.read_table(BUILTIN_PATH)
    assert table.column_names == ["text"], "nanochat's shards have one `text` column"
    assert BUILTIN_PATH.stat().st_size < 1 << 20 and table.num_rows > 100
    assert pq.ParquetFile(BUILTIN_PATH).num_row_groups > 1, (
        "several row groups: streaming reads one at a time"
    )
    assert list(iter_documents(resolve_corpus(BUILTIN_CORPUS))) == docs()


def test_a_hub_dataset_and_local_files_go_through_the_same_reader(fake_hub, tmp_path):
    hub = resolve_corpus(f"hf:{HUB_ID}")
    assert [p.rsplit("/", 1)[-1] for p in hub.paths] == ["shard_00000.parquet"]
    assert list(iter_documents(hub)) == docs()
    small = resolve_corpus(f"hf:{SMALL_ID}")
    assert [p.rsplit("/", 1)[-1] for p in small.paths] == ["train-00000-of-00001.parquet"], "the train split"
    assert list(iter_documents(small)) == docs()[:SMALL_DOCS]
    texts = docs()[:5]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in texts))
    assert list(iter_documents(resolve_corpus(str(tmp_path / "mine.jsonl")), "body")) == texts
    (tmp_path / "mine.txt").write_text("\n\n".join(texts))
    assert list(iter_documents(resolve_corpus(str(tmp_path / "mine.txt")))) == texts
    pq.write_table(pa.table({"id": [1, 2], "body": texts[:2]}), tmp_path / "nocol.parquet")
    with pytest.raises(KeyError, match=r"no text column .* its columns are \['id', 'body'\]"):
        list(iter_documents(resolve_corpus(str(tmp_path / "nocol.parquet"))))
    with pytest.raises(KeyError, match=r"no column 'txt'; its columns are \['body', 'n'\]"):
        list(iter_documents(resolve_corpus(str(tmp_path / "mine.jsonl")), "txt"))


def test_missing_or_unreachable_datasets_fail_with_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="OfflineModeIsEnabled.*gated.*HF_TOKEN.*builtin:corpus"):
        resolve_corpus(f"hf:{HUB_ID}")
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        resolve_corpus(str(tmp_path / "nope.parquet"))
    with pytest.raises(ValueError, match="only one is 'builtin:corpus'"):
        resolve_corpus("builtin:wiki")


def test_sequences_are_fixed_length_and_skip_bos_and_special_positions(offline_lm):
    tok = offline_lm.tokenizer
    packing = Packing.for_tokenizer(tok, 32)
    assert tok.convert_ids_to_tokens(packing.separator) == "<|endoftext|>", "SmolLM2's document separator"
    chat = [
        {"role": "user", "content": "Is it raining?"},
        {"role": "assistant", "content": "No, it is sunny."},
    ]
    seqs = list(iter_sequences(tok, [*docs()[:3], chat], packing))
    assert all(len(s) == 32 and s[0] == packing.separator for s in seqs[:-1]) and len(seqs[-1]) <= 32
    stream = [t for s in seqs for t in s[1:]]
    first = tok.encode(docs()[0], add_special_tokens=False)
    assert stream[: len(first) + 1] == [*first, packing.separator], "documents in order, then a separator"
    keep = packing.keep(torch.tensor([s for s in seqs if len(s) == 32]))
    ids = torch.tensor([s for s in seqs if len(s) == 32])
    assert not keep[:, :2].any(), "positions 0 (the separator) and 1 (the attention sink) are never kept"
    specials = torch.isin(ids, torch.tensor(sorted(packing.special_ids)))
    assert specials[:, 2:].any() and not (keep & specials).any() and bool((keep | specials)[:, 2:].all())
    assert tok.convert_tokens_to_ids("<|im_start|>") in stream, "chat rows use the model's chat template"


def test_collect_stores_the_models_residuals_and_resumes(offline_lm, tmp_path, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    kw = dict(max_tokens=1500, seq_len=64, batch_size=4, shard_tokens=400)
    summary = collect_corpus(offline_lm, BUILTIN_CORPUS, [LAYER, 5], full, **kw)
    store = LayerStore(full, LAYER, kind="corpus")
    assert summary["tokens_per_layer"][LAYER] == store.n_tokens >= 1500 and store.n_tokens < 1500 + 4 * 64
    # The stored rows of a sequence are the model's residuals at its kept positions (float16-rounded).
    packing = Packing.for_tokenizer(offline_lm.tokenizer, 64)
    seq = next(iter_sequences(offline_lm.tokenizer, docs(), packing))
    ids = torch.tensor([seq])
    want = run_with_capture(offline_lm.model, [hook_name(LAYER)], input_ids=ids)[hook_name(LAYER)][0]
    want = want[packing.keep(ids)[0]].half().float().numpy()
    got = store.tokens_of("seq000000000")
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert store.entries["seq000000000"][3] == packing.skip_first == 2, "first stored position"
    # Each row keeps its token id and position: the kept tokens of the packed sequence, in order.
    kept = packing.keep(ids)[0].nonzero()[:, 0]
    assert all(store.has_token_ids)
    np.testing.assert_array_equal(store.token_ids_of("seq000000000"), np.stack([ids[0, kept], kept], 1))
    seqs = iter_sequences(offline_lm.tokenizer, docs(), packing)
    for i, seq in enumerate(islice(seqs, len(store.completion_ids))):
        got_ids = store.token_ids_of(f"seq{i:09d}")
        assert got_ids[:, 0].tolist() == [seq[p] for p in got_ids[:, 1]]
        assert len(got_ids) == len(store.tokens_of(f"seq{i:09d}"))
    run = json.loads((full / "run.json").read_text())["corpus"]
    assert (run["spec"], run["seq_len"], run["tokens"]) == (BUILTIN_CORPUS, 64, store.n_tokens)

    # Interrupt after the third forward pass; the rerun skips what was stored and ends with the same data.
    calls, real = [0], corpus.run_with_capture

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(corpus, "run_with_capture", failing)
    with pytest.raises(KeyboardInterrupt):
        collect_corpus(offline_lm, BUILTIN_CORPUS, [LAYER, 5], part, **{**kw, "shard_tokens": 100})
    stored_before = LayerStore(part, LAYER, kind="corpus").n_tokens
    assert 0 < stored_before < 1500
    monkeypatch.setattr(corpus, "run_with_capture", real)
    capsys.readouterr()
    collect_corpus(offline_lm, BUILTIN_CORPUS, [LAYER, 5], part, **kw)
    said = capsys.readouterr().out
    stored_now = rf"(?<![\d,]){stored_before:,} already stored|layer {LAYER} {stored_before:,}"
    assert re.search(stored_now, said), said  # was: "0 already stored" after reusing the stored tokens
    for layer in (LAYER, 5):
        a, b = LayerStore(full, layer, kind="corpus"), LayerStore(part, layer, kind="corpus")
        assert sorted(a.completion_ids) == sorted(b.completion_ids) and all(b.has_token_ids)
        for sid in a.completion_ids:
            assert np.array_equal(a.tokens_of(sid), b.tokens_of(sid))
            assert np.array_equal(a.token_ids_of(sid), b.token_ids_of(sid)), "ids resume with their rows"

    before = {p: p.read_bytes() for p in full.rglob("*") if p.is_file()}
    with pytest.raises(NotebookError, match=r"(?s)other settings.*seq_len: 64 → 32.*OVERWRITE = True"):
        collect_corpus(offline_lm, BUILTIN_CORPUS, [LAYER], full, **{**kw, "seq_len": 32})
    assert {p: p.read_bytes() for p in full.rglob("*") if p.is_file()} == before, "nothing written"
    capsys.readouterr()
    (tmp_path / "three.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs()[:3]))
    total = sum(len(offline_lm.tokenizer.encode(d, add_special_tokens=False)) for d in docs()[:3])
    short = collect_corpus(
        offline_lm,
        str(tmp_path / "three.jsonl"),
        [LAYER],
        tmp_path / "short",
        max_tokens=10 * total,
        seq_len=64,
        batch_size=8,
    )
    assert "the corpus ran out: " in capsys.readouterr().out and short["exhausted"]
    seqs64 = list(
        iter_sequences(offline_lm.tokenizer, docs()[:3], Packing.for_tokenizer(offline_lm.tokenizer, 64))
    )
    # every document token is kept except the one right after each sequence's separator (the attention sink)
    sinks = sum(s[1] != packing.separator for s in seqs64 if len(s) > 1)
    assert short["tokens_per_layer"][LAYER] == total - sinks and 0 < sinks == len(seqs64)


def test_a_budget_beyond_the_free_disk_is_refused_before_any_work(offline_lm, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(corpus.shutil, "disk_usage", lambda _: usage(10 * 2**30, 9 * 2**30, 2**30))
    with pytest.raises(OSError, match=r"~2\.1 GiB but 1\.0 GiB is free.*stream the corpus"):
        collect_corpus(offline_lm, BUILTIN_CORPUS, [LAYER, 5], tmp_path, max_tokens=1_000_000)
    assert not list(tmp_path.rglob("shard_*")), "nothing written"


def test_corpus_settings_come_whole_or_as_keywords_and_unknown_names_are_refused(offline_lm, tmp_path):
    reading, storage = corpus.split_corpus_overrides(
        {"seq_len": 32, "overwrite": True}, CorpusReading(batch_size=4), CorpusStorage(shard_tokens=100)
    )
    assert reading == CorpusReading(seq_len=32, batch_size=4)
    assert storage == CorpusStorage(shard_tokens=100, overwrite=True)
    with pytest.raises(
        TypeError, match=r"\['shards'\]: the corpus reading settings are .* the storage settings"
    ):
        collect_corpus(offline_lm, BUILTIN_CORPUS, [LAYER], tmp_path, max_tokens=100, shards=10)
    assert not list(tmp_path.rglob("*")), "nothing written"


def test_the_stream_serves_the_stored_training_tokens_from_a_bounded_buffer(offline_lm, tmp_path, fake_hub):
    """One epoch of the stream (through the Hub reader) is the stored corpus's training split, shuffled."""
    collect_corpus(
        offline_lm, f"hf:{SMALL_ID}", [LAYER], tmp_path, max_tokens=10**7, seq_len=128, batch_size=8
    )
    store, train, held = corpus_ids(tmp_path, LAYER)
    assert held and set(held).isdisjoint(train)
    assert all(is_heldout(int(i.removeprefix("seq"))) for i in held)
    stored = np.concatenate([store.tokens_of(i) for i in train])
    stream = CorpusStream(offline_lm, f"hf:{SMALL_ID}", LAYER, seq_len=128, batch_size=8, buffer_tokens=1024)
    batches = stream.batches(256, seed=0)
    got = torch.cat([next(batches) for _ in range(len(stored) // 256)]).half().float().numpy()
    assert got.shape[1] == stream.d_model == 576
    # Each streamed vector is a stored training vector (to float16 rounding and batch-shape noise), and
    # one epoch's worth covers nearly all of them (the half-buffer kept for mixing spills into the next).
    idx, rel = nearest(got, stored)
    distinct = np.unique(stored, axis=0)
    assert rel.max() < 1e-2 and len(np.unique(stored[idx.numpy()], axis=0)) > 0.7 * len(distinct)
    assert not np.array_equal(got[:256], stored[:256]), "shuffled"
    held_vectors = torch.cat(stream.heldout_batches(300, batch_size=100)).half().float().numpy()
    _, rel = nearest(held_vectors, np.concatenate([store.tokens_of(i) for i in held]))
    assert len(held_vectors) == 300 and rel.max() < 1e-2, "held-out sequences, never trained on"


def nearest(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `a`: the index of the closest row of `b`, and that distance relative to its norm."""
    tb = torch.tensor(b)
    dist, idx = torch.cdist(torch.tensor(a), tb).min(1)
    return idx, dist / tb[idx].norm(dim=1)


def test_default_corpus_follows_the_model():
    assert corpus.default_corpus({"family": "nanochat"}) == corpus.FINEWEB_EDU
    assert corpus.default_corpus({"family": "nanochat", "layout": "2025-10"}) == corpus.FINEWEB_EDU
    assert corpus.default_corpus({"family": "nanochat", "layout": "2026-03-14"}) == corpus.CLIMBMIX
    assert corpus.default_corpus({"family": "llama"}) == corpus.FINEWEB_EDU


def test_chat_documents_render_as_upstream_nanochat_does(tmp_path):
    """A conversation through our packing equals upstream nanochat's own `render_conversation` (the
    tokenizer of the 2025-10 oracle commit), tool-call parts included; its special tokens are not kept."""
    commit = nanochat_oracle.COMMITS[0]
    model, config = nanochat_oracle.build_oracle(commit)
    lm = helpers.load_model(
        str(nanochat_oracle.save_native(model, config, tmp_path / "native")),
        device="cpu",
        cache_dir=tmp_path / "cache",
    )
    upstream = nanochat_oracle.import_oracle(commit, "tokenizer").RustBPETokenizer(
        nanochat_oracle.tiny_encoding(), "<|bos|>"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "the world?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "the "},
                {"type": "python", "text": "1+1"},
                {"type": "python_output", "text": "2"},
                {"type": "text", "text": "world"},
            ],
        },
    ]
    want, _ = upstream.render_conversation({"messages": conversation})
    packing = Packing.for_tokenizer(lm.tokenizer, 256)
    assert packing.separator == want[0] == lm.tokenizer.convert_tokens_to_ids("<|bos|>")
    (seq,) = iter_sequences(lm.tokenizer, [conversation], packing)
    assert seq == want
    kept = torch.tensor(seq)[packing.keep(torch.tensor([seq]))[0]].tolist()
    assert kept == [t for t in seq if t < 256 + len(nanochat_oracle.MERGES)], "only text tokens are stored"


def test_a_massive_activation_left_in_the_store_is_reported_once_per_layer_and_collection(capsys):
    h = torch.full((32, 8), 1.0)
    h[5] = 100.0  # a row with 100x the median norm
    warned: set[int] = set()
    corpus._warn_if_massive(h[:, :4].clone().fill_(1.0), 7, warned)
    assert capsys.readouterr().out == "" and not warned, "ordinary rows: no warning"
    corpus._warn_if_massive(h, 7, warned)
    corpus._warn_if_massive(h, 7, warned)
    assert capsys.readouterr().out.count("warning: layer 7") == 1 and warned == {7}
    corpus._warn_if_massive(h, 7, set())  # a new collection warns again
    assert "100x the median" in capsys.readouterr().out
