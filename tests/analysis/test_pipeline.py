"""Notebook 04's orchestration on a synthetic run folder (test_contexts.make_run: a planted deception
latent in a saved SAE): probes.json with raw, bag-of-words and SAE rows, the planted latent first in
features/{sae_id}.jsonl, resume, Gemini labelling (offline and through the fake server), clear errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits

from helpers.analysis.autointerp import EXPLAIN_SYSTEM
from helpers.analysis.contexts import docs_for
from helpers.analysis.pipeline import (
    NOT_LABELLED,
    analysis_settings,
    check_analysis,
    feature_table,
    feature_tables,
    label_features,
    probe_summary,
    probe_table,
    sae_completion_acts,
    sae_pair_summary,
    sweep_summary,
    transfer_summary,
)
from helpers.collect.capture import load_pooled
from helpers.collect.completions import analysis_split, read_completions, write_completions
from helpers.collect.store import LayerStore
from helpers.gemini import OFFLINE, GeminiClient
from helpers.run import atomic_write_json, datasets_path, pooled_path, read_probes
from helpers.run import read_jsonl as read_features_jsonl
from helpers.saes import JumpReLUSAE
from helpers.saes.io import load_sae, save_sae
from tests.analysis.test_contexts import LAYER, PLANTED, OutOfMemoryOnCopy, make_run
from tests.fake_gemini import fake_gemini_server, json_reply

fake_gemini = pytest.fixture(fake_gemini_server, name="fake_gemini")
FAST = dict(n_folds=4, n_permutations=19, n_bootstrap=50)


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def run(offline_lm, tmp_path_factory):
    return make_run(
        tmp_path_factory.mktemp("analysis") / "run", offline_lm.tokenizer, model_path=offline_lm.info.path
    )


@pytest.fixture(scope="module")
def probe_rows(run):
    return probe_table(run.dir, [LAYER], [run.sae_folder], n_directions=5, **FAST)


def test_probes_json_has_raw_and_sae_rows_with_cis_p_values_and_controls(run, probe_rows):
    saved = json.loads((run.dir / "probes.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(probe_rows))
    assert saved["sae_features"].startswith("mean over the completion's tokens")
    kinds = [r["kind"] for r in saved["rows"]]
    assert kinds == ["raw", "bag_of_words", "prompt_only", "sae", "random_sae"]
    raw, bow, prompt_only, sae, random_sae = saved["rows"]
    assert "predate prompt vectors" in prompt_only["why"]  # this synthetic run has no prompt vectors
    assert random_sae["sae_id"] == sae["sae_id"] and random_sae["vs_trained"]["a"] == run.sae_id
    assert random_sae["l0_probed_tokens"] == pytest.approx(sae["l0_probed_tokens"], rel=0.05)
    assert saved["transfer"] == [] and saved["sae_vs_sae"] == []  # one dataset, one SAE
    for r in (raw, bow, sae):
        assert r["layer"] == LAYER and r["n"] == 96 and r["n_groups"] == 12 and r["n_folds"] == 4
        lo, hi = r["ba_ci"]
        assert lo <= r["balanced_accuracy"] <= hi and r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1]
        assert 0 < r["p_value"] <= 1 and r["n_permutations"] == 19 and r["n_prompts"] == 24
        assert "completion labels within 24 two-label prompts" in r["permutation_scheme"]
    assert raw["balanced_accuracy"] > 0.8 and raw["p_value"] == pytest.approx(1 / 20)
    assert (
        sae["balanced_accuracy"] > 0.7
        and sae["p_value"] == pytest.approx(1 / 20)
        and sae["sae_id"] == run.sae_id
        and sae["architecture"] == "jumprelu"
    )
    assert 0.3 < raw["random_direction"]["ba_mean"] < 0.8 and sae["random_direction"]["n_directions"] == 5
    vs = sae["vs_raw"]
    assert (vs["a"], vs["b"]) == (run.sae_id, f"raw L{LAYER}") and 0 <= vs["p_value"] <= vs["p_holm"] <= 1
    assert vs["multiplicity"] == "Holm over the 1 SAE-vs-raw tests"
    assert raw["rows"]["rows"].startswith("all labelled completions") and raw["rows"]["n"] == 96
    assert sae["verdict"] in ("SAE beats raw", "raw beats SAE", "no significant difference")
    assert bow["vs_raw"]["b"] == f"raw L{LAYER}" and "top_terms" in bow["details"]


def test_sae_features_are_the_mean_of_per_token_activations(run):
    store = LayerStore(run.dir, LAYER)
    docs = docs_for(store, run.records)
    sae = load_sae(run.sae_folder).sae
    got = sae_completion_acts(store, sae, docs, batch_tokens=50)
    import torch

    with torch.no_grad():
        want = np.stack([sae.encode(torch.from_numpy(run.vectors[d.id]))[0].mean(0).numpy() for d in docs])
        last = np.stack([sae.encode(torch.from_numpy(run.vectors[d.id]))[0][-1].numpy() for d in docs])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(sae_completion_acts(store, sae, docs, pooling="last"), last, atol=1e-6)
    # top_m (SAEs compared at one L0): each token cut to its m largest activations, then the mean.
    with torch.no_grad():
        cut = []
        for d in docs:
            acts = sae.encode(torch.from_numpy(run.vectors[d.id]))[0]
            top = torch.topk(acts, 1, dim=1)
            cut.append(torch.zeros_like(acts).scatter_(1, top.indices, top.values).mean(0).numpy())
    np.testing.assert_allclose(
        sae_completion_acts(store, sae, docs, batch_tokens=50, top_m=1), np.stack(cut), atol=1e-6
    )


def test_out_of_memory_in_the_pooling_halves_the_batch_and_changes_no_feature(run, capsys):
    """CUDA runs out of memory copying a batch's pooled features to the host (the encode succeeded): the
    batch keeps nothing, its completions come again at half the size, and the features equal a pass that
    never failed."""
    store = LayerStore(run.dir, LAYER)
    docs = docs_for(store, run.records)
    sae = load_sae(run.sae_folder).sae
    flaky = OutOfMemoryOnCopy(sae, fail={3, 8})
    want = sae_completion_acts(store, sae, docs, batch_tokens=200, top_m=2)
    got = sae_completion_acts(store, flaky, docs, batch_tokens=200, top_m=2)
    np.testing.assert_array_equal(got, want)
    assert len(flaky.copies) > 8 and capsys.readouterr().out.count("going on at") == 2


def test_the_planted_feature_ranks_first_and_the_file_is_resumed(run, offline_lm, capsys):
    rows = feature_table(run.dir, run.sae_folder, k=5, tokenizer=offline_lm.tokenizer, n_permutations=999)
    path = run.dir / "features" / f"{run.sae_id}.jsonl"
    assert read_features_jsonl(path) == json.loads(json.dumps(rows)) and len(rows) == 5
    top = rows[0]
    assert top["feature"] == PLANTED and top["rank"] == 1
    assert top["cohens_d"] > 1 and top["d_ci"][0] > 0 and top["q_value"] < 0.01 and top["auroc"] > 0.8
    assert top["direction"] == "deceptive higher" and top["p_value"] == pytest.approx(1 / 1000)
    assert top["token_firing_rate_deceptive"] > 2 * top["token_firing_rate_honest"] > 0
    assert top["firing_rate_deceptive"] > top["firing_rate_honest"]
    assert top["sae_id"] == run.sae_id and top["layer"] == LAYER and top["selection"]["k"] == 5
    act = [e for e in top["contexts"]["explain"] if e["kind"] == "activating"]
    assert len({e["quantile"] for e in act}) >= 6 and all("<<" in e["marked"] for e in act)
    assert all(r["explanation"] is None and r["explanation_source"] == NOT_LABELLED for r in rows)

    capsys.readouterr()
    assert feature_table(run.dir, run.sae_folder, k=5, tokenizer=offline_lm.tokenizer) == rows
    assert "complete, reused" in capsys.readouterr().out
    # overwrite=True recomputes; without a tokenizer it is loaded from the folder run.json names.
    again = feature_table(run.dir, run.sae_folder, k=5, n_permutations=999, overwrite=True)
    assert "loading the tokenizer" in capsys.readouterr().out and again == rows


def test_label_features_offline_then_with_gemini(run, offline_lm, fake_gemini, monkeypatch):
    feature_table(run.dir, run.sae_folder, k=5, tokenizer=offline_lm.tokenizer, n_permutations=999)
    rows = label_features(run.dir, run.sae_id, None, n_label=3)
    assert [r["explanation_source"] for r in rows[:3]] == [OFFLINE] * 3
    assert all(r["explanation"] is None and r["detection"] is None and r["fuzzing"] is None for r in rows)
    assert rows[3]["explanation_source"].startswith("not labelled (outside the top n_label=3)")

    def handler(request):
        body = json.loads(request.prompt.split("ITEMS:\n", 1)[1])
        if request.system == EXPLAIN_SYSTEM:
            out = []
            for it in body:
                word = re.search(r"<<\s*([^<>]+?)>>", it["activating"][-1]["text"]).group(1)
                out.append(
                    {
                        "feature": it["feature"],
                        "explanation": f"the token {word}",
                        "deception_related": "unclear",
                        "kind": "other",
                    }
                )
            return json_reply({"features": out})
        return json_reply(
            {
                "features": [
                    {
                        "feature": it["feature"],
                        "scores": [{"window": w["window"], "score": 0.9} for w in it["windows"]],
                    }
                    for it in body
                ]
            }
        )

    fake_gemini.handler = handler
    client = GeminiClient(cache_path=run.dir / "judge_cache.sqlite", sleep=lambda s: None)
    rows = label_features(run.dir, run.sae_id, client, n_label=3)
    assert (
        len(fake_gemini.requests) == 5
        and read_features_jsonl(run.dir / "features" / f"{run.sae_id}.jsonl") == rows
    )
    for r in rows[:3]:
        assert r["explanation"].startswith("the token ") and r["explanation_source"].startswith("gemini:")
        for method in ("detection", "fuzzing"):  # a reader that says 0.9 to everything: at chance
            assert r[method]["verdict"] == "at chance" and r[method]["balanced_accuracy"] == 0.5
            assert r[f"{method}_baseline"] is not None and r["contexts"]["explain"]
        assert r["fuzzing"]["n_windows"] == 2 * r["fuzzing"]["n_correct"] > 0
        # the baseline is a random live feature's explanation, never one of the top features'
        assert r["baseline_kind"] == "random feature" and r["baseline_explanation_of"] not in [
            x["feature"] for x in rows
        ]
        assert r["baseline_explanation"].startswith("the token ")


@pytest.fixture
def copy_run(run, tmp_path):
    def make(relabel=None):
        dst = tmp_path / "copy"
        shutil.copytree(run.dir, dst)
        if relabel is not None:
            write_completions(dst, [{**r, "label": relabel(r)} for r in read_completions(dst)])
        return dst

    return make


def test_bad_input_fails_clearly(run, copy_run, offline_lm, tmp_path):
    one_class = copy_run(lambda r: "honest" if r["label"] == "deceptive" else r["label"])
    # probe_table: a row saying why, written to probes.json; the notebook goes on (was: a ValueError)
    (row,) = probe_table(one_class, [LAYER], [run.sae_folder], **FAST)
    assert row["kind"] == "raw" and "balanced_accuracy" not in row, row
    assert f"layer {LAYER} skipped: " in row["why"] and "0 deceptive completions: sample more" in row["why"]
    saved = read_probes(one_class)["rows"]
    assert "so are its SAEs" in row["why"] and [r.get("why") for r in saved] == [row["why"]]
    with pytest.raises(ValueError, match="0 deceptive completions: sample more"):
        feature_table(one_class, run.sae_folder, tokenizer=offline_lm.tokenizer)
    shutil.rmtree(one_class)

    few_groups = copy_run(lambda r: r["label"] if r["group"] in ("s0", "s1", "s2") else "ambiguous")
    with pytest.raises(ValueError, match="at least 4 prompt groups.* got 3 groups"):
        probe_table(few_groups, [LAYER], [], **FAST)
    shutil.rmtree(few_groups)
    one_group = copy_run(lambda r: r["label"] if r["group"] == "s0" else "ambiguous")
    with pytest.raises(ValueError, match="1 prompt groups cannot be split"):
        feature_table(one_group, run.sae_folder, tokenizer=offline_lm.tokenizer)
    shutil.rmtree(one_group)

    narrow = save_sae(
        JumpReLUSAE(8, 20, l0=2),
        tmp_path / "narrow",
        hook_name=f"blocks.{LAYER}.hook_resid_post",
        model_name="other",
    )
    with pytest.raises(ValueError, match=r"d_in=8 .*d_model=16"):
        probe_table(run.dir, [LAYER], [narrow], **FAST)
    with pytest.raises(ValueError, match=r"d_in=8 .*d_model=16"):
        feature_table(run.dir, narrow, tokenizer=offline_lm.tokenizer)
    elsewhere = save_sae(
        JumpReLUSAE(16, 20, l0=2), tmp_path / "L5", hook_name="blocks.5.hook_resid_post", model_name="other"
    )
    with pytest.raises(ValueError, match=r"reads layer 5, which is not in layers=\[2\]"):
        probe_table(run.dir, [LAYER], [elsewhere], **FAST)
    with pytest.raises(ValueError, match="pooling must be one of"):
        probe_table(run.dir, [LAYER], [], pooling="max", **FAST)
    with pytest.raises(FileNotFoundError, match="run feature_table"):
        label_features(run.dir, "no_such_sae", None)


def resave_sae(sae, run_dir, sae_id: str, **metadata):
    """A loaded SAE saved again as `run_dir`/saes/`sae_id` with its id and `metadata` in the metadata."""
    return save_sae(
        sae.sae,
        run_dir / "saes" / sae_id,
        hook_name=sae.hook_name,
        model_name=sae.model_name,
        metadata={"sae_id": sae_id, **metadata},
    )


def test_probes_and_features_use_only_the_rows_no_sae_trained_on(run, copy_run, offline_lm, capsys):
    """An SAE whose metadata records notebook 03's analysis split is probed, with the raw and
    bag-of-words probes of its layer, on exactly the reserved groups; a label-conditioned SAE trained
    before the split existed is announced as tested on rows it saw."""
    dst = copy_run()
    split = {"fraction": 0.5, "seed": 0}
    reserved = set(analysis_split(read_completions(dst), **split)[1])
    sae = load_sae(run.sae_folder)
    with_split = resave_sae(
        sae, dst, "test_jumprelu_L2_deceptive_only", condition="deceptive_only", analysis_split=split
    )
    rows = probe_table(dst, [LAYER], [with_split], n_directions=2, **FAST)
    labelled = [
        r for r in read_completions(dst) if r["id"] in reserved and r["label"] in ("honest", "deceptive")
    ]
    for r in (r for r in rows if "why" not in r):
        assert r["n"] == len(labelled) < 96 and r["rows"]["analysis_split"] == split
        assert r["n_groups"] == len({x["group"] for x in labelled})
    feats = feature_table(dst, with_split, k=3, tokenizer=offline_lm.tokenizer, n_permutations=99)
    assert feats[0]["selection"]["n"] == len(labelled) and feats[0]["selection"]["rows"].startswith(
        "analysis split"
    )
    controls = json.loads((dst / "features" / "test_jumprelu_L2_deceptive_only.controls.json").read_text())
    assert len(controls["contexts"]) == 2 and not {c["feature"] for c in controls["contexts"]} & {
        f["feature"] for f in feats
    }

    leaky = resave_sae(sae, dst, "old_deceptive_only", condition="deceptive_only")
    capsys.readouterr()
    probe_table(dst, [LAYER], [leaky], n_directions=2, **FAST)
    assert (
        "WARNING: old_deceptive_only was trained before notebook 03 reserved analysis rows"
        in capsys.readouterr().out
    )
    other = resave_sae(sae, dst, "other_split", analysis_split={"fraction": 0.3, "seed": 0})
    with pytest.raises(ValueError, match="reserved different analysis splits"):
        probe_table(dst, [LAYER], [with_split, other], **FAST)


def test_answers_without_words_get_a_bag_of_words_row_saying_why(run, copy_run):
    # Answers of a random tiny model can hold no word: scikit-learn's vectoriser raised "no terms remain" and
    # stopped the whole table; now that one row says why and the raw probe is still there.
    dst = copy_run()
    records = read_completions(dst)
    write_completions(dst, [{**r, "completion": "..." if i % 2 else "?!"} for i, r in enumerate(records)])
    rows = probe_table(dst, [LAYER], [], **FAST)
    bow = next(r for r in rows if r["kind"] == "bag_of_words")
    assert "share no word" in bow["why"] and "balanced_accuracy" not in bow
    assert next(r for r in rows if r["kind"] == "raw")["balanced_accuracy"] > 0.5


def test_the_fields_protocol_train_on_one_dataset_evaluate_on_another(run, copy_run, offline_lm):
    """Groups s0-s5 as the training set, s6-s11 as the evaluation set, the unlabelled answers as the
    control set: probes.json gets transfer rows for every reader, a transfer matrix, the layer sweep, the
    SAE-vs-SAE test at matched L0; the planted signal transfers; a control set under 100 answers is marked."""
    dst = copy_run()
    records = read_completions(dst)
    for r in records:
        g = int(r["group"][1:])
        r["dataset"] = "benign" if r["label"] is None else ("facts" if g < 6 else "scenes")
    write_completions(dst, records)
    roles = {"facts": "train", "scenes": "eval", "benign": "control"}
    atomic_write_json(datasets_path(dst), {"datasets": [{"name": n, "role": r} for n, r in roles.items()]})
    ids, mean, last = load_pooled(dst, LAYER)
    prompt_last = torch.randn(len(ids), mean.shape[1], generator=torch.Generator().manual_seed(0))
    save_file(
        {"mean": mean.clone(), "last": last.clone(), "prompt_last": prompt_last},
        str(pooled_path(dst, LAYER)),
        metadata={"completion_ids": json.dumps(ids)},
    )
    sae = load_sae(run.sae_folder)
    twin = resave_sae(sae, dst, "twin")
    rows = probe_table(dst, [LAYER], [run.sae_folder, twin], n_directions=2, **FAST)
    saved = read_probes(dst)
    n_train = sum(r["dataset"] == "facts" and r["label"] in ("honest", "deceptive") for r in records)
    raw = rows[0]
    assert raw["kind"] == "raw" and raw["n"] == n_train == 48 and raw["rows"]["datasets"] == ["facts"]
    prompt = next(r for r in rows if r["kind"] == "prompt_only")
    assert prompt["balanced_accuracy"] < raw["balanced_accuracy"] - 0.2  # noise: reads no instruction
    kinds = {(t["kind"], t.get("sae_id")) for t in saved["transfer"]}
    assert kinds >= {
        ("raw", None),
        ("bag_of_words", None),
        ("prompt_only", None),
        ("sae", run.sae_id),
        ("random_sae", run.sae_id),
        ("sae", "twin"),
    }
    for t in saved["transfer"]:
        assert t["train_sets"] == ["facts"] and t["eval_set"] == "scenes" and t["control_set"] == "benign"
        assert t["n"] == 48 and t["n_groups"] == 6 and t["threshold"]["n_control"] == 24
        assert t["threshold"]["too_small"] and any("too few to express 1% FPR" in w for w in t["why"])
    raw_t = next(t for t in saved["transfer"] if t["kind"] == "raw")
    assert raw_t["auroc"] > 0.8 and raw_t["auroc_ci"][0] <= raw_t["auroc"] <= raw_t["auroc_ci"][1]
    assert 0 <= raw_t["recall_ci"][0] <= raw_t["recall"] <= raw_t["recall_ci"][1] <= 1
    matrix = saved["transfer_matrix"][str(LAYER)]
    assert matrix["train"] == ["facts", "scenes"] and all(
        v is not None for row in matrix["auroc"] for v in row
    )
    (pair,) = saved["sae_vs_sae"]
    assert {pair["a"], pair["b"]} == {run.sae_id, "twin"} and pair["mean_difference"] == 0
    sweep = saved["layer_sweep"]
    assert sweep["layers"] == [LAYER] and sweep["peak"]["layer"] == LAYER
    assert sweep["rows"][0]["transfer"][0]["eval_set"] == "scenes"
    feats = feature_table(dst, run.sae_folder, k=3, tokenizer=offline_lm.tokenizer, n_permutations=99)
    assert feats[0]["selection"]["datasets"] == ["facts"] and feats[0]["selection"]["n"] == 48  # train only
    for table in (
        probe_summary(rows),
        transfer_summary(saved),
        sweep_summary(saved),
        sae_pair_summary(saved),
    ):
        assert table and all(isinstance(v, str) for row in table for v in row.values())


def test_too_few_completions_of_a_label_in_a_split_names_the_sae_split_and_fix(run, copy_run, offline_lm):
    rows = read_completions(run.dir)
    firsts = {}  # one deceptive completion in each of two groups: a split holds at most 1 deceptive
    for r in rows:
        if r["label"] == "deceptive" and len(firsts) < 2:
            firsts.setdefault(r["group"], r["id"])
    keep = set(firsts.values())
    few = copy_run(lambda r: r["label"] if r["label"] != "deceptive" or r["id"] in keep else "ambiguous")
    before = {p.relative_to(few): p.read_bytes() for p in few.rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError, match=rf"SAE {run.sae_id} .*split .* 1 deceptive completions.*test_fraction"
    ):
        feature_table(few, run.sae_folder, tokenizer=offline_lm.tokenizer)  # was: Cohen's d needs >= 2 ...
    assert {p.relative_to(few): p.read_bytes() for p in few.rglob("*") if p.is_file()} == before


def test_feature_tables_skip_an_sae_lacking_data_with_the_reason_and_go_on(run, copy_run, offline_lm):
    rows = read_completions(run.dir)
    first = next(r["id"] for r in rows if r["label"] == "deceptive")
    few = copy_run(lambda r: r["label"] if r["label"] != "deceptive" or r["id"] == first else "ambiguous")
    before = {p.relative_to(few): p.read_bytes() for p in few.rglob("*") if p.is_file()}
    tables, status = feature_tables(
        few, [run.sae_folder], tokenizer=offline_lm.tokenizer, k=3, n_permutations=9
    )
    assert tables == {}
    assert [(s["sae_id"], s["status"]) for s in status] == [(run.sae_id, "skipped")]
    reason = status[0]["reason"]
    assert re.search(r"split .* 0 deceptive completions.*Add prompts", reason), reason
    assert {p.relative_to(few): p.read_bytes() for p in few.rglob("*") if p.is_file()} == before
    tables, status = feature_tables(
        run.dir, [run.sae_folder], tokenizer=offline_lm.tokenizer, k=3, n_permutations=9
    )
    assert list(tables) == [run.sae_id] and status[0]["status"] == "done" and status[0]["features"] == 3


def test_notebook_04_settings_resume_add_saes_and_stop_on_a_change(run, copy_run):
    from helpers.env import NotebookError

    folder = copy_run(lambda r: r["label"])
    params = {"TOP_K": 20, "SEED": 0}
    settings = analysis_settings(folder, [run.sae_folder], params)
    assert not check_analysis(folder, settings)  # first time: recorded
    assert not check_analysis(folder, settings)  # same: resume
    atomic_write_json(folder / "probes.json", {"rows": []})  # outputs exist from now on
    with pytest.raises(NotebookError, match=r"(?s)params.TOP_K: 20 → 5.*OVERWRITE = True"):
        check_analysis(folder, analysis_settings(folder, [run.sae_folder], {**params, "TOP_K": 5}))
    assert check_analysis(
        folder, analysis_settings(folder, [run.sae_folder], {**params, "TOP_K": 5}), overwrite=True
    )
    (kept,) = (folder / "replaced").glob("04_*/probes.json")  # the replaced probes are kept, not lost
    assert json.loads(kept.read_text()) == {"rows": []} and not (folder / "probes.json").exists()
    assert not check_analysis(folder, analysis_settings(folder, [], {**params, "TOP_K": 5})), (
        "SAE_FILTER narrower"
    )


def test_sae_features_are_converted_once_on_the_cpu_path(monkeypatch):
    """Sparse SAE features become CSR once for the probe, its control and the transfer fit (each would
    convert them again), with the same entries; dense ones and the device path keep the array itself
    (a float64 copy would double what is held)."""
    from helpers.analysis import logistic, pipeline

    rng = np.random.default_rng(0)
    sparse = (rng.random((40, 300)) < 0.05) * rng.random((40, 300)).astype(np.float32)
    once = pipeline._converted_once(sparse)
    assert sp.issparse(once) and once.dtype == np.float64
    np.testing.assert_array_equal(once.toarray(), sparse)
    dense = rng.random((40, 300)).astype(np.float32)
    assert pipeline._converted_once(dense) is dense
    monkeypatch.setattr(logistic, "DEVICE", "cpu")  # torch's path, as on a GPU
    assert pipeline._converted_once(sparse) is sparse
