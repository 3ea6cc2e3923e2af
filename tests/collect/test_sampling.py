"""Batched sampling against transformers' own generate, plus reproducibility, resume and stopping."""

from __future__ import annotations

import json

import pytest
import torch

import helpers
from helpers.collect.packing import pad_batch
from helpers.collect.sampling import (
    Completion,
    SamplingSettings,
    completion_seed,
    generate_batch,
    sample_completions,
    sample_next,
)
from helpers.model.chat import pad_token_id
from tests.conftest import tiny_lm, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    ("short", "Hi", None),
    ("vase", "Did you break the vase in the hallway? Tell me honestly.", "You are a teenager."),
    ("cookie", "Be honest: did you eat the last cookie?", None),
]


@pytest.fixture(scope="module")
def tiny(offline_lm):
    return tiny_lm(offline_lm.tokenizer)


def ids_of(completions: list[Completion]) -> list[str]:
    return [c.id for c in completions]


def generate_alone(lm, user: str, system: str | None, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """transformers' greedy generate on one unpadded prompt: (prompt ids, new tokens up to the stop)."""
    model, tok = lm.model, lm.tokenizer
    stops = helpers.stop_token_ids(tok, model.generation_config)
    ids = torch.tensor([helpers.encode_chat(tok, user, system)])
    new = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=stops,
        pad_token_id=pad_token_id(tok),
    )[0, ids.shape[1] :].tolist()
    return ids[0].tolist(), new


def test_left_padding_matches_unpadded_generate(offline_lm):
    """Greedy batched (left-padded, shared prefill) == transformers' generate on each prompt alone."""
    tok = offline_lm.tokenizer
    stops = helpers.stop_token_ids(tok, offline_lm.model.generation_config)
    prompts = PROMPTS[:2]  # 20 and 31 tokens: the shorter one is padded
    got = sample_completions(offline_lm, prompts, n_per_prompt=2, temperature=0, max_new_tokens=6)
    assert ids_of(got) == ["short#0", "short#1", "vase#0", "vase#1"]
    for (_, user, system), pair in zip(prompts, zip(got[::2], got[1::2], strict=True), strict=True):
        prompt, ref = generate_alone(offline_lm, user, system, 6)
        cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
        for c in pair:  # both greedy samples of a prompt: its shared prefill copied to two rows
            assert c.completion_token_ids == ref[:cut], c.id
            assert c.stopped == (cut < len(ref)) and c.n_tokens == cut
            assert c.prompt_token_ids == prompt and c.n_prompt_tokens == len(prompt)
            assert c.completion == tok.decode(ref[:cut], skip_special_tokens=True).strip()


def test_left_padding_keeps_absolute_positions(offline_lm):
    """On GPT-2 (learned absolute positions) a padded row must still count positions from its first token."""
    lm = tiny_lm(offline_lm.tokenizer, family="gpt2")
    got = sample_completions(lm, PROMPTS, n_per_prompt=1, temperature=0, max_new_tokens=6, stop_ids=[])
    for (_, user, system), c in zip(PROMPTS, got, strict=True):
        assert c.completion_token_ids == generate_alone(lm, user, system, 6)[1], c.id


@pytest.mark.parametrize("family", ["nanochat", "llama", "gpt2", "gpt_neox"])
def test_generate_batch_matches_generate_on_every_architecture(family):
    """Left padding, shared prefill and rows leaving the batch, on each architecture our hooks support."""
    model = tiny_model(family).to(torch.float64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 9, 6)]
    prompts.insert(1, prompts[0])  # a repeated prompt shares its prefill
    greedy = [torch.Generator() for _ in prompts]  # unused at temperature 0
    got = generate_batch(
        model, prompts, greedy, temperature=0, top_p=1.0, max_new_tokens=6, stop_ids=[], pad_id=0
    )
    for prompt, (tokens, stopped) in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert tokens == ref and not stopped
    # Stop the second distinct prompt at its third token: it leaves the batch, the others carry on.
    stop = got[2][0][2]
    cut = generate_batch(
        model, prompts, greedy, temperature=0, top_p=1.0, max_new_tokens=6, stop_ids=[stop], pad_id=0
    )
    for (full, _), (tokens, stopped) in zip(got, cut, strict=True):
        n = full.index(stop) if stop in full else len(full)
        assert tokens == full[:n] and stopped == (n < len(full))


def test_same_seed_same_completions_and_global_rng_untouched(offline_lm):
    rng = torch.random.get_rng_state()
    kwargs = dict(n_per_prompt=2, max_new_tokens=4)
    a = sample_completions(offline_lm, PROMPTS[1:2], seed=7, **kwargs)
    b = sample_completions(offline_lm, PROMPTS[1:2], seed=7, **kwargs)
    c = sample_completions(offline_lm, PROMPTS[1:2], seed=8, **kwargs)
    assert [x.completion_token_ids for x in a] == [x.completion_token_ids for x in b]
    assert [x.completion_token_ids for x in a] != [x.completion_token_ids for x in c]
    # Two samples of one prompt share a prefill but not their random numbers.
    assert a[0].completion_token_ids != a[1].completion_token_ids
    assert all(x.seed == 7 for x in a) and all(x.seed == 8 for x in c)
    assert torch.equal(torch.random.get_rng_state(), rng), "sampling must not touch the global RNG"


def test_randomness_is_per_completion_so_batching_and_resume_do_not_matter(tiny):
    kwargs = dict(n_per_prompt=3, max_new_tokens=6, seed=3)
    whole = sample_completions(tiny, PROMPTS, batch_size=9, **kwargs)
    one_by_one = sample_completions(tiny, PROMPTS, batch_size=1, **kwargs)
    assert [c.to_dict() for c in whole] == [c.to_dict() for c in one_by_one]
    assert len({tuple(c.completion_token_ids) for c in whole}) == 9

    done = {"short#0", "vase#1", "cookie#2"}
    batches: list[list[str]] = []
    resumed = sample_completions(
        tiny, PROMPTS, batch_size=4, done_ids=done, on_batch=lambda cs: batches.append(ids_of(cs)), **kwargs
    )
    assert [len(b) for b in batches] == [4, 2] and sum(batches, []) == ids_of(resumed)
    assert ids_of(resumed) == [c.id for c in whole if c.id not in done]
    assert [c.to_dict() for c in resumed] == [c.to_dict() for c in whole if c.id not in done]


def test_stop_token_ends_completion_and_empty_completions_are_kept(tiny):
    free = sample_completions(tiny, PROMPTS[:1], n_per_prompt=1, temperature=0, max_new_tokens=8, stop_ids=[])
    tokens = free[0].completion_token_ids
    assert len(tokens) == 8 and not free[0].stopped
    k = next(i for i in range(1, 8) if tokens[i] not in tokens[:i])  # first step with a new token
    cut = sample_completions(
        tiny, PROMPTS[:1], n_per_prompt=1, temperature=0, max_new_tokens=8, stop_ids=[tokens[k]]
    )[0]
    assert cut.completion_token_ids == tokens[:k] and cut.stopped and cut.n_tokens == k
    empty = sample_completions(
        tiny, PROMPTS[:1], n_per_prompt=2, temperature=0, max_new_tokens=8, stop_ids=[tokens[0]]
    )
    assert [(c.completion, c.n_tokens, c.completion_token_ids, c.stopped) for c in empty] == [
        ("", 0, [], True)
    ] * 2
    row = json.loads(json.dumps(empty[0].to_dict()))
    assert row["id"] == "short#0" and row["prompt_id"] == "short" and row["sample_index"] == 0


def test_rows_stop_independently_in_one_batch(tiny):
    """A row that stops early leaves the batch; the others continue exactly as if alone."""
    kwargs = dict(temperature=0, max_new_tokens=8)
    alone = [sample_completions(tiny, [p], n_per_prompt=1, stop_ids=[], **kwargs)[0] for p in PROMPTS]
    stop = alone[0].completion_token_ids[2]  # "short" stops after 2 tokens
    batched = sample_completions(tiny, PROMPTS, n_per_prompt=1, stop_ids=[stop], **kwargs)
    for a, b in zip(alone, batched, strict=True):
        toks = a.completion_token_ids
        cut = toks.index(stop) if stop in toks else len(toks)
        assert b.completion_token_ids == toks[:cut] and b.stopped == (cut < len(toks))
    assert batched[0].n_tokens == 2 and batched[0].stopped


def test_prompt_longer_than_context_names_id_and_length(offline_lm):
    small = tiny_lm(offline_lm.tokenizer, max_positions=64)
    long_prompt = ("essay", "word " * 80, None)
    n = len(helpers.encode_chat(offline_lm.tokenizer, long_prompt[1]))
    with pytest.raises(ValueError, match=rf"prompt 'essay' has {n} tokens.*context of 64"):
        sample_completions(small, [PROMPTS[0], long_prompt], n_per_prompt=1, max_new_tokens=4)
    with pytest.raises(ValueError, match="'short' appears twice"):
        sample_completions(small, [PROMPTS[0], PROMPTS[0]], n_per_prompt=1, max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_completions(small, PROMPTS, n_per_prompt=1, top_p=0)


def test_sample_next_follows_softmax_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    n = 4000
    gens = [torch.Generator().manual_seed(completion_seed(0, "p", i)) for i in range(n)]
    batch = logits.expand(n, -1)
    for temperature in (1.0, 0.5):
        draws = sample_next(batch, gens, temperature, 1.0)
        freq = torch.bincount(draws, minlength=6).double() / n
        want = torch.softmax(logits.double() / temperature, -1)
        assert (freq - want).abs().max() < 0.03, (temperature, freq, want)
    # top_p = 0.6: the nucleus is the two most likely tokens (mass 0.56 before the 2nd, 0.77 before the 3rd).
    draws = sample_next(batch, gens, 1.0, 0.6)
    freq = torch.bincount(draws, minlength=6).double() / n
    p = torch.softmax(logits.double(), -1)[:2]
    assert freq[2:].sum() == 0 and (freq[:2] - p / p.sum()).abs().max() < 0.03
    assert sample_next(batch[:3], gens[:3], 0, 1.0).tolist() == [0, 0, 0]
    assert sample_next(batch[:50], gens[:50], 1.0, 1e-6).tolist() == [0] * 50


def test_sampling_settings_or_their_fields_as_keywords_draw_the_same_and_unknown_names_are_refused(tiny):
    settings = SamplingSettings(temperature=0.8, max_new_tokens=5, seed=4, batch_size=2)
    whole = sample_completions(tiny, PROMPTS, n_per_prompt=2, sampling=settings)
    fields = sample_completions(tiny, PROMPTS, n_per_prompt=2, temperature=0.8, max_new_tokens=5, seed=4)
    overridden = sample_completions(
        tiny,
        PROMPTS,
        n_per_prompt=2,
        sampling=SamplingSettings(seed=9),
        seed=4,
        temperature=0.8,
        max_new_tokens=5,
    )
    assert [c.to_dict() for c in whole] == [c.to_dict() for c in fields] == [c.to_dict() for c in overridden]
    with pytest.raises(TypeError, match=r"\['temprature'\].*the sampling settings are \['temperature'"):
        sample_completions(tiny, PROMPTS, n_per_prompt=1, temprature=0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        SamplingSettings(max_new_tokens=0)


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], 0, "cpu", side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        pad_batch([[1]], 0, "cpu", side="middle")
