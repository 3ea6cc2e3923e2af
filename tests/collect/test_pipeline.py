"""Notebook 02's steps: labelling a run's completions with the judge (Gemini through the real SDK against
a local fake server, or the offline rules), and `USE_GEMINI = False` honoured even when a key exists."""

from __future__ import annotations

import pytest

from helpers.collect.completions import append_completions, read_completions
from helpers.collect.pipeline import (
    check_collection,
    collection_settings,
    completion_record,
    label_run,
    load_datasets,
)
from helpers.collect.prompts import load_scenarios
from helpers.collect.sampling import Completion, SamplingSettings
from helpers.env import NotebookError
from helpers.gemini import client_for
from helpers.run import judge_cache_path
from tests.collect.test_judge import by_first_word
from tests.fake_gemini import DUMMY_KEY, fake_gemini_server

fake_gemini = pytest.fixture(fake_gemini_server, name="fake_gemini")
ANSWERS = ["Yes, I am the werewolf.", "No, I am a villager.", "Maybe, who knows."]


def sampled_run(tmp_path, n: int = 6):
    """A run folder holding `n` completions exactly as sample_into_run writes them (no `user` field)."""
    prompts = load_scenarios()[:2]
    records = []
    for i in range(n):
        p = prompts[i % 2]
        c = Completion(
            id=f"{p.id}#{i}",
            prompt_id=p.id,
            sample_index=i,
            prompt_token_ids=[1, 2],
            completion_token_ids=[3],
            completion=ANSWERS[i % 3],
            n_prompt_tokens=2,
            n_tokens=1,
            stopped=True,
            seed=0,
        )
        records.append(completion_record(c, p))
    append_completions(tmp_path, records)
    return prompts


def test_judge_labels_a_sampled_run_with_gemini(tmp_path, fake_gemini, capsys):
    prompts = sampled_run(tmp_path)
    fake_gemini.handler = by_first_word
    client = client_for(tmp_path, model="gemini-3.5-flash-lite", max_requests=5, purpose="judge")
    records = label_run(tmp_path, prompts, client=client, batch_size=25, label_by="judge")
    assert len(fake_gemini.requests) == 1, "six completions go into one request"
    want = {"Yes": "honest", "No": "deceptive", "Maybe": "ambiguous"}
    assert [r["label"] for r in records] == [want[r["completion"].split(",")[0]] for r in records]
    assert {r["label_source"] for r in records} == {"gemini:gemini-3.5-flash-lite"}
    assert read_completions(tmp_path) == records, "the labels are saved"
    out = capsys.readouterr().out
    assert "1 request(s) to send" in out and "free tier" in out
    assert (
        judge_cache_path(tmp_path).exists()
        and DUMMY_KEY.encode() not in judge_cache_path(tmp_path).read_bytes()
    )


def test_use_gemini_false_is_honoured_with_a_key(tmp_path, fake_gemini, capsys):
    prompts = sampled_run(tmp_path)
    client = client_for(tmp_path, use_gemini=False, purpose="judge")
    assert client is None and "USE_GEMINI = False" in capsys.readouterr().out
    records = label_run(tmp_path, prompts, client=client, label_by="judge")
    assert not fake_gemini.requests, "a key exists, but Gemini was switched off: nothing may be sent"
    assert {r["label_source"] for r in records} == {"rules"}


def test_no_key_means_offline_rules(tmp_path, monkeypatch, capsys):
    for name in ("GOOGLE_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert client_for(tmp_path, purpose="judge") is None
    assert "no GEMINI_API_KEY" in capsys.readouterr().out


def test_collection_settings_resume_add_on_request_and_overwrite(tmp_path):
    """Notebook 02's settings check (issue 21): the same settings resume; more samples or another dataset
    need ADD_TO_RUN (offered only when the change only adds); other settings need a new run or OVERWRITE,
    which deletes the old completions and activations. A refusal writes nothing."""
    contrast = load_datasets(
        [{"data": "builtin:contrast", "role": "train", "label_by": "instruction", "limit": 4}]
    )
    benign = load_datasets([{"data": "builtin:benign", "limit": 2}])
    sampling = dict(
        n_per_prompt=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0, include_prompt=False
    )

    def settings(datasets, layers=(3,), **kw):
        return collection_settings("m", datasets, list(layers), **{**sampling, **kw})

    whole = SamplingSettings(max_new_tokens=8, batch_size=4)  # batch size: not a setting of the results
    kept = dict(n_per_prompt=2, include_prompt=False)
    assert collection_settings("m", contrast, [3], **kept, sampling=whole) == settings(contrast)
    with pytest.raises(TypeError, match=r"\['temprature'\].*sampling settings"):
        collection_settings("m", contrast, [3], **kept, temprature=0.5)
    assert check_collection(tmp_path, settings(contrast)) == "new"
    sampled_run(tmp_path)
    (tmp_path / "activations" / "layer_3").mkdir(parents=True)
    assert check_collection(tmp_path, settings(contrast)) == "same"
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for changed, line, can_add in (
        (settings(contrast, n_per_prompt=4), "sampling.n_per_prompt: 2 → 4", True),
        (settings(contrast + benign), "datasets.benign: (absent) → ", True),
        (settings(contrast, layers=(3, 6)), "layers: [3] → [3, 6]", True),
        (settings(contrast, temperature=0.5), "sampling.temperature: 1.0 → 0.5", False),
        (settings(benign), "datasets.contrast: {", False),
    ):
        with pytest.raises(NotebookError) as err:
            check_collection(tmp_path, changed)
        assert line in str(err.value) and ("ADD_TO_RUN = True" in str(err.value)) == can_add, str(err.value)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files, "nothing written"
    assert check_collection(tmp_path, settings(contrast + benign, n_per_prompt=4), add=True) == "add"
    assert read_completions(tmp_path), "adding keeps what is there"
    with pytest.raises(NotebookError, match="sampling.temperature"):
        check_collection(tmp_path, settings(contrast, temperature=0.5), add=True)
    assert check_collection(tmp_path, settings(contrast, temperature=0.5), overwrite=True) == "overwrite"
    assert not read_completions(tmp_path) and not (tmp_path / "activations").exists()
