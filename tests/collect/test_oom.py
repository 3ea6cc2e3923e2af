"""CUDA running out of memory mid-step in sampling, activation capture and the corpus pass: the batch
halves and the step goes on with what an uninterrupted run gives, or stops naming the setting to lower,
with nothing lost. The error is raised inside the real model's forward pass (a hook on a decoder layer),
as a GPU with too little memory left would, after the layers before it have run."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from helpers.collect.capture import collect_activations, load_pooled, load_pooled_prompt
from helpers.collect.corpus import BUILTIN_CORPUS, CorpusStream, collect_corpus
from helpers.collect.oom import BatchSize, ShrinkingBatches
from helpers.collect.sampling import sample_completions
from helpers.collect.store import LayerStore
from helpers.model.hooks import decoder_layers
from tests.collect.test_capture import ANSWERS, make_completion
from tests.collect.test_sampling import PROMPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def injected(*_: object) -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


class Injected:
    """What `out_of_memory_when` did: `failed`, the (batch, seq) of each pass it failed; `alive`, for each
    pass after a failure, how many of the failed passes' hidden states were still alive then: held by a
    failed try's traceback, they would keep its GPU memory from the retry."""

    def __init__(self):
        self.failed: list[tuple[int, int]] = []
        self.alive: list[int] = []
        self.refs: list[weakref.ref] = []


@contextmanager
def out_of_memory_when(model: torch.nn.Module, fails, layer: int = 1):
    """Decoder layer `layer` raises CUDA's out-of-memory error after its forward pass whenever
    `fails(hidden)` ([batch, seq, d_model]) is true; yields an `Injected`."""
    seen = Injected()

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if seen.refs:
            seen.alive.append(sum(ref() is not None for ref in seen.refs))
        if fails(hidden):
            seen.failed.append(tuple(hidden.shape[:2]))
            seen.refs.append(weakref.ref(hidden))
            raise injected()

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_batches_halve_and_redo_the_failed_items_once(capsys):
    pulled = []

    def items():
        for i in range(7):
            pulled.append(i)
            yield i

    def work(batch):
        if len(batch) > 2 or batch == [5]:
            raise injected()
        return sum(batch)

    batches = ShrinkingBatches(4, what="items per batch", setting="ITEMS", fix="use fewer items")
    run = batches.run(items(), work)
    assert next(run) == ([0, 1], 1) and pulled == [0, 1, 2, 3], "read lazily, a batch at a time"
    assert list(run) == [([2, 3], 5), ([4, 5], 9), ([6], 6)] and batches.size == 2
    assert "CUDA ran out of memory at 4 items per batch: going on at 2" in capsys.readouterr().out
    with pytest.raises(
        torch.cuda.OutOfMemoryError, match=r"even at 1 items per batch.*ITEMS sets.*use fewer items.*injected"
    ):
        list(
            ShrinkingBatches(2, what="items per batch", setting="ITEMS", fix="use fewer items").run([5], work)
        )
    with pytest.raises(ValueError, match="ITEMS must be at least 1, got 0"):
        ShrinkingBatches(0, what="items per batch", setting="ITEMS", fix="")


def test_batch_size_halves_to_its_floor_then_names_the_setting(capsys):
    """The one retry primitive the encoding passes and the probes' chunks share: halved, never below the
    floor, then an error naming the setting; the work's own result passes through; a work that returns
    None (what a failed try gives) is refused."""

    def out_of_memory():
        raise injected()

    size = BatchSize(40, floor=16, what="tokens per batch", setting="TOKENS", fix="use a smaller SAE")
    assert size.attempt(lambda a, b: (a, b), 1, 2) == (1, 2) and size.size == 40
    assert size.attempt(out_of_memory) is None and size.size == 20
    assert size.attempt(out_of_memory) is None and size.size == 16
    assert "at 40 tokens per batch: going on at 20" in capsys.readouterr().out
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"even at 16 tokens per batch.*down to 16; TOKENS"):
        size.attempt(out_of_memory)
    with pytest.raises(TypeError, match="returned None"):
        size.attempt(lambda: None)


def test_sampling_halves_the_batch_mid_generation_and_draws_the_same_completions(offline_lm, capsys):
    kwargs = dict(n_per_prompt=2, max_new_tokens=3, seed=5)  # temperature 1: each row's own generator draws
    in_fours = [c.to_dict() for c in sample_completions(offline_lm, PROMPTS[:2], batch_size=4, **kwargs)]
    capsys.readouterr()
    batches: list[list[str]] = []
    # A decode step (one new token per row) of more than 2 rows fails: the first batch has drawn its
    # first token from each generator, so the redone batch must start from fresh generators. What it
    # draws in batches of 2 equals what it drew in batches of 4 (on the CPU).
    with out_of_memory_when(offline_lm.model, lambda h: h.shape[0] > 2 and h.shape[1] == 1) as oom:
        got = sample_completions(
            offline_lm,
            PROMPTS[:2],
            batch_size=4,
            on_batch=lambda cs: batches.append([c.id for c in cs]),
            **kwargs,
        )
    assert oom.failed == [(4, 1)] and [c.to_dict() for c in got] == in_fours
    assert oom.alive and not any(oom.alive), "the failed try's tensors are freed before the retry"
    assert batches == [["short#0", "short#1"], ["vase#0", "vase#1"]]
    assert "CUDA ran out of memory at 4 completions per batch: going on at 2" in capsys.readouterr().out

    # The 33-token prompt's prefill fails even alone (the 31-token one fits): the error names the
    # setting; the batch before it was handed over, nothing of the failed one was.
    batches.clear()
    with (
        out_of_memory_when(offline_lm.model, lambda h: h.shape[1] > 32),
        pytest.raises(
            torch.cuda.OutOfMemoryError,
            match=r"even at 1 completions per batch.*SamplingSettings\.batch_size.*MAX_NEW_TOKENS",
        ),
    ):
        sample_completions(
            offline_lm,
            PROMPTS[:2],
            batch_size=2,
            on_batch=lambda cs: batches.append([c.id for c in cs]),
            **{**kwargs, "max_new_tokens": 1},
        )
    assert batches == [["short#0", "short#1"]]


def test_capture_halves_the_batch_and_stores_what_a_run_at_that_size_stores(offline_lm, tmp_path, capsys):
    completions = [make_completion(offline_lm.tokenizer, *a) for a in ANSWERS]  # 4 with tokens, 1 empty
    layers, pooled_only = [1, 3], [0, 2]
    kwargs = dict(shard_tokens=16, sweep_layers=pooled_only)
    twos = collect_activations(offline_lm, completions, layers, tmp_path / "twos", batch_size=2, **kwargs)
    capsys.readouterr()
    with out_of_memory_when(offline_lm.model, lambda h: h.shape[0] > 2, layer=2) as oom:
        got = collect_activations(offline_lm, completions, layers, tmp_path / "oom", batch_size=4, **kwargs)
    assert [rows for rows, _ in oom.failed] == [4] and got == twos and oom.alive and not any(oom.alive)
    assert (
        "CUDA ran out of memory at 4 completions per forward pass: going on at 2" in capsys.readouterr().out
    )
    for layer in layers:
        a, b = LayerStore(tmp_path / "twos", layer), LayerStore(tmp_path / "oom", layer)
        assert a.completion_ids == b.completion_ids and len(a.completion_ids) == 4
        for cid in a.completion_ids:
            np.testing.assert_array_equal(a.tokens_of(cid), b.tokens_of(cid))
    for layer in layers + pooled_only:
        for load in (load_pooled, load_pooled_prompt):  # the same rows in the same order
            for x, y in zip(load(tmp_path / "twos", layer), load(tmp_path / "oom", layer), strict=True):
                assert x == y if isinstance(x, list) else torch.equal(x, y)

    # Completions longer than the shortest two fail even alone: the error names the setting, and what the
    # first batch gave is kept (stored and pooled), so the rerun goes on after it and ends as one pass.
    lengths = sorted(len(c.prompt_token_ids) + c.n_tokens for c in completions if c.n_tokens)
    floor = tmp_path / "floor"
    with (
        out_of_memory_when(offline_lm.model, lambda h: h.shape[1] > lengths[1]),
        pytest.raises(
            torch.cuda.OutOfMemoryError,
            match=r"even at 1 completions per forward pass.*collect_activations' batch_size",
        ),
    ):
        collect_activations(offline_lm, completions, layers, floor, batch_size=2, **kwargs)
    assert len(LayerStore(floor, 1).completion_ids) == 2 and len(load_pooled(floor, 0)[0]) == 2
    again = collect_activations(offline_lm, completions, layers, floor, batch_size=2, **kwargs)
    assert again["skipped_done"] == 2 and again["stored"] == 2
    for layer in layers + pooled_only:
        want, have = pooled_by_id(tmp_path / "twos", layer), pooled_by_id(floor, layer)
        assert want.keys() == have.keys()
        assert all(torch.equal(x, y) for cid in want for x, y in zip(want[cid], have[cid], strict=True))


def pooled_by_id(run_dir, layer: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """{completion id: (mean, last, prompt_last)} of a layer's pooled file, whatever its row order."""
    (ids, mean, last), (_, prompt_last) = load_pooled(run_dir, layer), load_pooled_prompt(run_dir, layer)
    return {cid: (mean[i], last[i], prompt_last[i]) for i, cid in enumerate(ids)}


def test_corpus_halves_the_batch_and_stores_what_a_run_at_that_size_stores(offline_lm, tmp_path, capsys):
    kwargs = dict(max_tokens=600, seq_len=64, shard_tokens=256)
    twos = collect_corpus(offline_lm, BUILTIN_CORPUS, [1, 3], tmp_path / "twos", batch_size=2, **kwargs)
    capsys.readouterr()
    with out_of_memory_when(offline_lm.model, lambda h: h.shape[0] > 2) as oom:
        got = collect_corpus(offline_lm, BUILTIN_CORPUS, [1, 3], tmp_path / "oom", batch_size=4, **kwargs)
    assert oom.failed == [(4, 64)] and got == twos and oom.alive and not any(oom.alive)
    assert "CUDA ran out of memory at 4 sequences per forward pass: going on at 2" in capsys.readouterr().out
    for layer in (1, 3):
        a, b = (
            LayerStore(tmp_path / "twos", layer, kind="corpus"),
            LayerStore(tmp_path / "oom", layer, kind="corpus"),
        )
        assert a.completion_ids == b.completion_ids and a.n_tokens == b.n_tokens >= 600
        for sid in a.completion_ids:
            np.testing.assert_array_equal(a.tokens_of(sid), b.tokens_of(sid))
            np.testing.assert_array_equal(a.token_ids_of(sid), b.token_ids_of(sid))

    # Every pass after the second fails even at one sequence: the two passes' sequences stay stored.
    passes = []
    with (
        out_of_memory_when(offline_lm.model, lambda h: passes.append(1) or len(passes) > 2),
        pytest.raises(
            torch.cuda.OutOfMemoryError,
            match=r"even at 1 sequences per forward pass.*CorpusReading\.batch_size.*CORPUS_SEQ_LEN",
        ),
    ):
        collect_corpus(offline_lm, BUILTIN_CORPUS, [1], tmp_path / "floor", batch_size=2, **kwargs)
    kept = LayerStore(tmp_path / "floor", 1, kind="corpus").completion_ids
    assert kept == LayerStore(tmp_path / "twos", 1, kind="corpus").completion_ids[:4]


def test_the_stream_halves_its_forward_passes_and_fills_the_same_buffer(offline_lm, capsys):
    def first_batches(stream: CorpusStream) -> torch.Tensor:
        batches = stream.batches(128, seed=0)
        return torch.cat([next(batches) for _ in range(3)])

    kwargs = dict(seq_len=64, batch_size=4, buffer_tokens=512)
    want = first_batches(CorpusStream(offline_lm, BUILTIN_CORPUS, 1, **kwargs))
    stream = CorpusStream(offline_lm, BUILTIN_CORPUS, 1, **kwargs)
    with out_of_memory_when(offline_lm.model, lambda h: h.shape[0] > 2, layer=0) as oom:
        got = first_batches(stream)
    assert (
        oom.failed == [(4, 64)]
        and oom.alive
        and not any(oom.alive)
        and stream.passes.size == 2
        and stream.forward_batch == 4
    )
    assert "at 4 sequences per forward pass: going on at 2" in capsys.readouterr().out
    # The same vectors in the same order: only the forward passes' batch shape differs.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
