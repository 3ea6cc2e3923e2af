"""The Neuronpedia export: its layout, every record against the schema's required fields, agreement
with the explorer's pages (reference-corpus windows included), and the validator catching broken exports."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from safetensors.torch import load_file

from helpers.explore.dashboards import ExplorerConfig
from helpers.explore.neuronpedia import REQUIRED, export_neuronpedia, set_id_of, validate_export
from helpers.explore.pipeline import build_explorer
from helpers.explore.site import iter_pages, sae_info
from helpers.run import neuronpedia_dir, sae_dir
from tests.conftest import tiny_chat_llama
from tests.explore.fake_run import D_SAE, LAYER, OTHER_ID, SAE_ID, make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert exported[0]["features"] == D_SAE and exported[0]["explanations"] == 2
    assert (
        exported[1]["explanations"] == 0
        and not (
            neuronpedia_dir(run) / "tiny-llama" / exported[1]["source"].split("/")[1] / "explanations"
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
    expl = records(source / "explanations" / "batch-0.jsonl.gz")
    for kind, recs in (("feature", feats), ("activation", acts), ("explanation", expl)):
        for rec in recs:
            assert set(REQUIRED[kind]) <= set(rec), (kind, sorted(set(REQUIRED[kind]) - set(rec)))
    pages = {p["feature"]: p for p in iter_pages(run, SAE_ID)}
    for rec in feats:
        page = pages[int(rec["index"])]
        assert rec["maxActApprox"] == (page["max_activation"] or 0) and rec["frac_nonzero"] == (
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
        shown = page["top"] + [ex for g in page["quantiles"] for ex in g["examples"]] + page["corpus"]["top"]
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
    assert validate_export(good)["features"] == D_SAE
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
        and "'maxValue' is None" in text
        and "'99999' is not an exported feature" in text
    )


def test_an_sae_without_explorer_data_is_refused(run):
    with pytest.raises(FileNotFoundError, match="no complete explorer data for tiny-llama_topk_L2_mixed"):
        export_neuronpedia(run, ["tiny-llama_topk_L2_mixed"])
    with pytest.raises(ValueError, match="sae_ids is empty"):
        export_neuronpedia(run, [])
