"""The Neuronpedia export: its layout, every record against the schema's required fields, agreement
with the explorer's pages (reference-corpus windows included), and the validator catching broken exports."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers.explore.dashboards import ExplorerConfig
from helpers.explore.neuronpedia import (
    SCHEMA,
    SCHEMA_SOURCE,
    UPLOAD_SCHEMA,
    UPLOAD_SOURCE,
    ExportSettings,
    export_neuronpedia,
    release_name_of,
    set_id_of,
    validate_export,
    validate_upload_batch,
    write_upload_batches,
)
from helpers.explore.pipeline import build_explorer
from helpers.explore.site import iter_pages, sae_info
from helpers.run import neuronpedia_dir, sae_dir
from tests.conftest import tiny_chat_llama
from tests.explore.fake_run import D_SAE, LAYER, OTHER_ID, SAE_ID, make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIXTURE = json.loads((Path(__file__).parent / "neuronpedia_schema.json").read_text())
"""Neuronpedia's schema as derived from its schema.prisma; the file names the commit."""


@pytest.fixture(scope="module")
def run(offline_lm, tmp_path_factory):
    tiny = tiny_chat_llama(offline_lm.tokenizer)
    root = make_run(tmp_path_factory.mktemp("np_run"), tiny)
    build_explorer(
        root, lm=tiny, sae_filter="L1", config=ExplorerConfig(n_top=3, n_quantiles=2, per_quantile=1)
    )
    return root


@pytest.fixture(scope="module")
def exported(run):
    return export_neuronpedia(run, [SAE_ID, OTHER_ID], creator_name="tester", hf_repo_id="me/saes")


def records(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_layout_and_counts(run, exported):
    source = neuronpedia_dir(run) / "tiny-llama" / f"{LAYER}-dsl-topk-mixed-{D_SAE}"
    assert exported[0]["source"] == f"tiny-llama/{source.name}" and all(r["valid"] for r in exported)
    for name in ("release", "model", "sourceset", "source"):
        assert len((source / f"{name}.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in (source / "features").iterdir()) == ["batch-0.jsonl.gz"]
    firing = sum(1 for p in iter_pages(run, SAE_ID) if p["n_firing"] or p["corpus"]["n_firing"])
    assert exported[0]["features"] == firing and exported[0]["explanations"] == 2
    assert (
        exported[1]["explanations"] == 0
        and not (
            neuronpedia_dir(run) / "tiny-llama" / exported[1]["source"].split("/")[1] / "explanations-pending"
        ).exists()
    )
    readme = (neuronpedia_dir(run) / "README.md").read_text()
    assert "Submitting it" in readme and source.name in readme and "LlamaRMSNorm" in readme
    weights = neuronpedia_dir(run) / "saelens" / SAE_ID
    assert (
        load_file(str(weights / "sae_weights.safetensors")).keys()
        == load_file(str(sae_dir(run, SAE_ID) / "sae_weights.safetensors")).keys()
    )
    src = json.loads((source / "source.jsonl").read_text())
    assert src["hfRepoId"] == "me/saes" and src["setName"] == set_id_of(sae_info(run, SAE_ID))


def test_every_record_has_the_required_fields_and_matches_the_pages(run, exported):
    source = neuronpedia_dir(run) / exported[0]["source"]
    feats = records(source / "features" / "batch-0.jsonl.gz")
    acts = records(source / "activations" / "batch-0.jsonl.gz")
    expl = records(source / "explanations-pending" / "batch-0.jsonl.gz")
    pages = {p["feature"]: p for p in iter_pages(run, SAE_ID)}
    for rec in feats:
        page = pages[int(rec["index"])]
        assert rec["maxActApprox"] >= (page["max_activation"] or 0) and rec["frac_nonzero"] == (
            page["firing_rate"] or 0
        )
        assert rec["freq_hist_data_bar_heights"] == page["histogram"]["counts"]
        assert rec["pos_str"] == [t for t, _ in page["logits"]["positive"]]
        assert rec["topkCosSimIndices"] == [j for j, _ in page["similar"]]
    by_feature = {}
    for rec in acts:
        by_feature.setdefault(int(rec["index"]), []).append(rec)
        assert rec["values"][rec["maxValueTokenIndex"]] == rec["maxValue"] == max(rec["values"])
    n_corpus = 0
    for f, page in pages.items():
        if f not in by_feature:
            continue
        shown = page["top"] + page["corpus"]["top"] + [ex for g in page["quantiles"] for ex in g["examples"]]
        assert [r["tokens"] for r in by_feature.get(f, [])] == [ex["tokens"] for ex in shown]
        corpus = [r for r in by_feature.get(f, []) if r["dataSource"].startswith("corpus:")]
        assert [(r["dataSource"], r["dataIndex"]) for r in corpus] == [
            (f"corpus:{ex['sequence_id']}", str(ex["position"])) for ex in page["corpus"]["top"]
        ]
        n_corpus += len(corpus)
    assert n_corpus > 0, "the reference corpus's top windows are exported"
    assert {r["description"] for r in expl} == {
        "denials of having done something",
        "the word 'vase' and household objects",
    }
    assert len({r["id"] for r in acts}) == len(acts), "activation ids are unique"


def test_validator_names_what_is_broken(run, exported, tmp_path):
    good = neuronpedia_dir(run) / exported[0]["source"]
    assert validate_export(good)["features"] == exported[0]["features"]
    broken = tmp_path / good.name
    shutil.copytree(good, broken)
    acts = broken / "activations" / "batch-0.jsonl.gz"
    rows = records(acts)
    del rows[0]["maxValue"]
    rows[1]["index"] = "99999"
    acts.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    (broken / "model.jsonl").unlink()
    with pytest.raises(ValueError) as err:
        validate_export(broken)
    text = str(err.value)
    assert (
        "model.jsonl is missing" in text
        and "lacks the required column 'maxValue'" in text
        and "'99999' is not an exported feature" in text
    )


def test_an_sae_without_explorer_data_is_refused(run):
    with pytest.raises(FileNotFoundError, match="no complete explorer data for tiny-llama_topk_L2_mixed"):
        export_neuronpedia(run, ["tiny-llama_topk_L2_mixed"])
    with pytest.raises(ValueError, match="sae_ids is empty"):
        export_neuronpedia(run, [])


# Against the schema fixture derived from Neuronpedia's schema.prisma (tests/explore/neuronpedia_schema.json).


def meta(run, exported, name):
    return json.loads((neuronpedia_dir(run) / exported[0]["source"] / f"{name}.jsonl").read_text())


def test_the_fixture_names_its_source_and_the_module_follows_it():
    assert FIXTURE["_source"]["repo"] + "@" + FIXTURE["_source"]["commit"] == SCHEMA_SOURCE
    assert FIXTURE["enums"]["Visibility"] == ["PUBLIC", "UNLISTED", "PRIVATE"]
    for table, model in SCHEMA["models"].items():
        full = FIXTURE["models"][table]["columns"]
        for col, spec in model["columns"].items():
            assert full[col] == spec, (table, col)
        required = {
            c for c, v in full.items() if not v["nullable"] and v["default"] is None and not v["list"]
        }
        assert required <= set(model["columns"]), (table, required - set(model["columns"]))


def test_every_source_validates_against_the_fixture(run, exported):
    for row in exported:
        counts = validate_export(neuronpedia_dir(run) / row["source"], FIXTURE)
        assert counts["features"] == row["features"] > 0


def old_style(run, exported, tmp_path, edit):
    """A copy of the first source with one record edited back to what the old export wrote."""
    good = neuronpedia_dir(run) / exported[0]["source"]
    broken = tmp_path / good.name
    shutil.copytree(good, broken)
    edit(broken)
    with pytest.raises(ValueError) as err:
        validate_export(broken, FIXTURE)
    return str(err.value)


def rewrite(path, change):
    if path.suffix == ".gz":
        rows = [change(r) or r for r in records(path)]
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    else:
        rec = json.loads(path.read_text())
        change(rec)
        path.write_text(json.dumps(rec) + "\n")


def test_model_has_an_owner(run, exported, tmp_path):
    assert (
        meta(run, exported, "model")["owner"] == "tester"
    )  # no Hub organisation: the creator, in the README
    text = old_style(run, exported, tmp_path, lambda d: rewrite(d / "model.jsonl", lambda r: r.pop("owner")))
    assert "lacks the required column 'owner'" in text


@pytest.mark.parametrize("name", ["release", "model", "sourceset", "source"])
def test_visibility_is_public(run, exported, name):
    assert meta(run, exported, name)["visibility"] == "PUBLIC"


def test_a_visibility_outside_the_enum_is_refused(run, exported, tmp_path):
    text = old_style(
        run,
        exported,
        tmp_path,
        lambda d: rewrite(d / "source.jsonl", lambda r: r.update(visibility="public")),
    )
    assert "'visibility' is 'public', needs one of ['PUBLIC', 'UNLISTED', 'PRIVATE']" in text
    with pytest.raises(ValueError, match="visibility='open'"):
        export_neuronpedia(run, [SAE_ID], visibility="open", include_weights=False)


def test_export_settings_come_whole_or_as_keywords_and_unknown_names_are_refused(run, exported):
    settings = ExportSettings(creator_name="tester").with_overrides({"include_dead": True})
    assert (settings.creator_name, settings.include_dead, settings.visibility) == ("tester", True, "PUBLIC")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TypeError, match=r"\['creator'\]: the export settings are \['creator_name', "):
        export_neuronpedia(run, [SAE_ID], creator="tester")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before, "nothing written"


def test_release_name_is_unique_per_user_and_run(run, exported):
    name = meta(run, exported, "release")["name"]
    assert name != "deception-sae-lab" and name == release_name_of(run, [SAE_ID, OTHER_ID], "tester")
    assert name.startswith(f"dsl-{run.name.lower().replace('_', '-')}-tiny-llama-")
    assert release_name_of(run, [SAE_ID, OTHER_ID], "someone else") != name
    assert release_name_of(run, [SAE_ID], "tester") != name
    assert meta(run, exported, "sourceset")["releaseName"] == name


def test_top_windows_carry_the_top_marker_and_quantile_windows_a_share_of_all_tokens(run, exported, tmp_path):
    source = neuronpedia_dir(run) / exported[0]["source"]
    feats = {r["index"]: r for r in records(source / "features" / "batch-0.jsonl.gz")}
    acts = records(source / "activations" / "batch-0.jsonl.gz")
    pages = {str(p["feature"]): p for p in iter_pages(run, SAE_ID)}
    n_top = sum(len(p["top"]) + len(p["corpus"]["top"]) for i, p in pages.items() if i in feats)
    top = [r for r in acts if r["binMin"] == -1]
    assert len(top) == n_top > 0
    assert all(r["binContains"] == -1 and r["binMax"] == feats[r["index"]]["maxActApprox"] for r in top)
    binned = [r for r in acts if r["binMin"] != -1]
    assert binned, "the fake run has quantile windows"
    for r in binned:
        page = pages[r["index"]]
        group = next(g for g in page["quantiles"] if (g["lo"], g["hi"]) == (r["binMin"], r["binMax"]))
        share = group["count"] / page["n_firing"]  # the group's share of the firings, exact
        assert (
            r["binContains"] == pytest.approx(page["firing_rate"] * share)
            and r["binContains"] <= page["firing_rate"]
        )
    text = old_style(
        run,
        exported,
        tmp_path,
        lambda d: rewrite(
            d / "activations" / "batch-0.jsonl.gz",
            lambda r: r.update(binMin=None, binMax=None, binContains=None) if r["binMin"] == -1 else None,
        ),
    )
    assert "a top window has -1" in text


def test_max_act_approx_bounds_every_exported_window(run, exported, tmp_path):
    source = neuronpedia_dir(run) / exported[0]["source"]
    feats = {r["index"]: r["maxActApprox"] for r in records(source / "features" / "batch-0.jsonl.gz")}
    acts = records(source / "activations" / "batch-0.jsonl.gz")
    pages = {str(p["feature"]): p for p in iter_pages(run, SAE_ID)}
    for i, m in feats.items():
        windows = max(r["maxValue"] for r in acts if r["index"] == i)
        assert m == max(windows, pages[i]["max_activation"])
    # the old export: maxActApprox = the completions' maximum, below a corpus window's
    text = old_style(
        run,
        exported,
        tmp_path,
        lambda d: rewrite(
            d / "features" / "batch-0.jsonl.gz", lambda r: r.update(maxActApprox=r["maxActApprox"] / 2)
        ),
    )
    assert "exceeds the feature's maxActApprox" in text


def test_never_firing_features_are_left_out_by_default(run, exported, monkeypatch):
    from helpers.explore import neuronpedia

    pages = list(iter_pages(run, OTHER_ID))
    dead = {0, 5}
    for p in pages:  # the fake run has no dead feature: make two, as a smoke run's SAE has hundreds
        if p["feature"] in dead:
            p.update(n_firing=0, corpus={**p["corpus"], "n_firing": 0, "top": []}, top=[], quantiles=[])
    monkeypatch.setattr(neuronpedia, "iter_pages", lambda *_: iter(pages))
    folder = neuronpedia.export_sae(run, OTHER_ID, release="r", creator_name="t", include_weights=False)
    indices = {r["index"] for r in records(folder / "features" / "batch-0.jsonl.gz")}
    assert len(indices) == D_SAE - 2 and not indices & {"0", "5"}
    folder = neuronpedia.export_sae(
        run, OTHER_ID, release="r", creator_name="t", include_weights=False, include_dead=True
    )
    assert len(records(folder / "features" / "batch-0.jsonl.gz")) == D_SAE
    monkeypatch.undo()
    export_neuronpedia(run, [SAE_ID, OTHER_ID], creator_name="tester", hf_repo_id="me/saes")


def test_explanations_wait_outside_the_import_with_what_to_ask(run, exported):
    source = neuronpedia_dir(run) / exported[0]["source"]
    assert not (source / "explanations").exists(), "the import would refuse foreign keys Neuronpedia lacks"
    expl = records(source / "explanations-pending" / "batch-0.jsonl.gz")
    readme = (neuronpedia_dir(run) / "README.md").read_text()
    assert expl and all(r["typeName"] in readme for r in expl)
    assert all(f"`{r['explanationModelName']}`" in readme for r in expl)
    assert "explanations-pending/" in readme and SCHEMA_SOURCE in readme


def test_an_unknown_column_or_a_ragged_batch_is_refused(run, exported, tmp_path):
    def edit(d):
        rewrite(d / "release.jsonl", lambda r: r.update(title="x"))
        path = d / "features" / "batch-0.jsonl.gz"
        rows = records(path)
        del rows[1]["frac_nonzero"]
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))

    text = old_style(run, exported, tmp_path, edit)
    assert (
        "column 'title' is not in Neuronpedia's SourceRelease" in text and "keys differ from line 1's" in text
    )


UPLOAD_FIXTURE = json.loads((Path(__file__).parent / "neuronpedia_upload_batch_schema.json").read_text())
"""The self-serve upload route's request schema as derived from its route.tsx; the file names the commit."""


def test_logit_and_frequency_histograms_are_exported(run, exported):
    source = neuronpedia_dir(run) / exported[0]["source"]
    feats = records(source / "features" / "batch-0.jsonl.gz")
    pages = {str(p["feature"]): p for p in iter_pages(run, SAE_ID)}
    for r in feats:
        page = pages[r["index"]]
        lh, h = page["logit_histogram"], page["histogram"]
        assert (
            r["logits_hist_data_bar_heights"] == [float(c) for c in lh["counts"]] and sum(lh["counts"]) > 1000
        )
        assert len(r["logits_hist_data_bar_values"]) == len(lh["counts"])
        assert (
            lh["min"] < r["logits_hist_data_bar_values"][0] < r["logits_hist_data_bar_values"][-1] < lh["max"]
        )
        if page["n_firing"]:  # the frequency histogram starts at the smallest nonzero activation, not at 0
            assert (
                h["min"]
                <= r["freq_hist_data_bar_values"][0]
                <= h["min"] + (h["max"] - h["min"]) / len(h["counts"])
            )


def test_the_upload_fixture_names_its_source_and_the_module_follows_it():
    src = UPLOAD_FIXTURE["_source"]
    assert f"{src['repo']}@{src['commit']}" == UPLOAD_SOURCE
    assert "apps/webapp/app/api/feature/upload-batch/route.tsx" in src["paths"]
    assert {k: UPLOAD_FIXTURE[k] for k in ("route", "body", "prerequisites")} == UPLOAD_SCHEMA
    assert (
        UPLOAD_FIXTURE["body"]["fields"]["features"]["max"] == UPLOAD_FIXTURE["route"]["max_features"] == 128
    )


def test_upload_batches_follow_the_route(run, exported, monkeypatch):
    """Every batch passes the route's schema and checks as the fixture states them, and holds the features
    the bulk export holds that have a window, with the pages' numbers."""
    source = neuronpedia_dir(run) / exported[0]["source"]
    folder = neuronpedia_dir(run) / "upload-batch" / source.parent.name / source.name
    batches = sorted(folder.glob("batch-*.json"))
    assert batches and exported[0]["upload batches"] == len(batches)
    bodies = [json.loads(b.read_text()) for b in batches]
    for body in bodies:
        assert validate_upload_batch(body, UPLOAD_FIXTURE) == []
        assert body["source"] == source.name and body["modelId"] == source.parent.name
    sent = [f for body in bodies for f in body["features"]]
    bulk = records(source / "features" / "batch-0.jsonl.gz")
    pages = {p["feature"]: p for p in iter_pages(run, SAE_ID)}
    with_window = [
        int(r["index"])
        for r in bulk
        if pages[int(r["index"])]["top"] or pages[int(r["index"])]["corpus"]["top"]
    ]
    assert [f["index"] for f in sent] == with_window
    for f in sent:
        page = pages[f["index"]]
        assert f["density"] == page["firing_rate"]
        assert [x["token"] for x in f["topLogits"]] == [t or "\u200b" for t, _ in page["logits"]["positive"]]
        tops = [a for a in f["activations"] if a["quantileMin"] == -1]
        assert len(tops) == len(page["top"]) + len(page["corpus"]["top"])
        assert len(f["activations"]) - len(tops) == sum(len(g["examples"]) for g in page["quantiles"])
        if (page.get("analysis") or {}).get("explanation"):
            assert f["explanations"] == [
                {"text": page["analysis"]["explanation"], "methodName": None, "modelName": None}
            ]
    readme = (neuronpedia_dir(run) / "README.md").read_text()
    assert "POST /api/feature/upload-batch" in readme and UPLOAD_SOURCE in readme and source.name in readme
    # at most the route's limit per call: with a limit of 10 the same features go in several files
    monkeypatch.setitem(UPLOAD_SCHEMA["route"], "max_features", 10)
    folder, n, left_out = write_upload_batches(
        run, SAE_ID, model_id=source.parent.name, source_id=source.name
    )
    small = [json.loads(b.read_text())["features"] for b in sorted(folder.glob("batch-*.json"))]
    assert len(small) == -(-len(with_window) // 10) and all(len(b) <= 10 for b in small)
    assert [f["index"] for b in small for f in b] == with_window and n == len(with_window)
    assert n + left_out == D_SAE


@pytest.mark.parametrize(
    "break_it, says",
    [
        (lambda b: b["features"].extend(b["features"][:1] * 129), "maximum is 128"),
        (lambda b: b["features"][0]["activations"][0]["tokens"].__setitem__(0, ""), "non-empty string"),
        (lambda b: b["features"][0]["activations"][0]["values"].pop(), "tokens"),
        (lambda b: b["features"].append(dict(b["features"][0])), "indexes repeat"),
        (
            lambda b: b["features"][0].__setitem__(
                "explanations", [{"text": "x", "methodName": "ours", "modelName": None}]
            ),
            "already has",
        ),
        (lambda b: b["features"][0]["activations"][0].__setitem__("quantileFraction", -1), "minimum is 0"),
        (lambda b: b["features"][0].__setitem__("activations", []), "minimum is 1"),
        (lambda b: b.__setitem__("source", "1-dsl--x"), "set name"),
        (
            lambda b: b["features"][0].__setitem__("freq_hist_data_bar_heights", [1.0]),
            "not a field of the route",
        ),
        (lambda b: b["features"][0].__setitem__("index", 1.5), "needs an integer"),
        (
            lambda b: b["features"][0].__setitem__("topLogits", [{"token": "a", "value": 1.0}] * 21),
            "maximum is 20",
        ),
    ],
)
def test_the_upload_validator_names_what_the_route_would_refuse(run, exported, break_it, says):
    source = neuronpedia_dir(run) / exported[0]["source"]
    path = sorted(
        (neuronpedia_dir(run) / "upload-batch" / source.parent.name / source.name).glob("batch-*.json")
    )[0]
    body = json.loads(path.read_text())
    break_it(body)
    problems = validate_upload_batch(body, UPLOAD_FIXTURE)
    assert any(says in p for p in problems), problems


def test_explorer_data_of_an_older_release_still_export(run, tmp_path):
    """Pages written before the logit histogram, group counts and histogram minimum (DATA_FORMAT 1): the
    export still validates, with empty logit histograms and equal group shares."""
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    shutil.rmtree(neuronpedia_dir(old), ignore_errors=True)
    folder = old / "explorer" / "data" / SAE_ID
    for path in folder.glob("pages_*.js"):
        head, body, tail = path.read_text().split("\n", 2)
        pages = json.loads(body)
        for p in pages.values():
            for key in ("logit_histogram", "coactive", "min_activation"):
                p.pop(key)
            p["histogram"].pop("min")
            for g in p["quantiles"]:
                g.pop("count")
        path.write_text(head + "\n" + json.dumps(pages) + "\n" + tail)
    rows = export_neuronpedia(old, [SAE_ID], creator_name="tester")
    source = neuronpedia_dir(old) / rows[0]["source"]
    assert validate_export(source, FIXTURE)["features"] == rows[0]["features"] > 0
    feats = records(source / "features" / "batch-0.jsonl.gz")
    assert all(r["logits_hist_data_bar_heights"] == [] == r["logits_hist_data_bar_values"] for r in feats)
    for b in sorted((neuronpedia_dir(old) / "upload-batch").rglob("batch-*.json")):
        assert validate_upload_batch(json.loads(b.read_text()), UPLOAD_FIXTURE) == []


def test_an_sae_where_nothing_fires_gets_a_row_not_a_traceback(run, monkeypatch, capsys):
    from helpers.explore import neuronpedia

    real = neuronpedia.sae_info
    monkeypatch.setattr(
        neuronpedia,
        "sae_info",
        lambda r, sid: {**real(r, sid), "n_alive": 0} if sid == OTHER_ID else real(r, sid),
    )
    rows = export_neuronpedia(run, [SAE_ID, OTHER_ID], creator_name="tester", include_weights=False)
    assert (
        rows[0]["valid"] is True and rows[1]["source"] is None and "no feature fires" in rows[1]["left out"]
    )
    assert "left out of the Neuronpedia export" in capsys.readouterr().out
    assert f"`{OTHER_ID}`: left out, no feature fires" in (neuronpedia_dir(run) / "README.md").read_text()
    monkeypatch.undo()
    export_neuronpedia(run, [SAE_ID, OTHER_ID], creator_name="tester", hf_repo_id="me/saes")
