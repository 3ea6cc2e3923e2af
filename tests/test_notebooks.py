"""The notebook contract (DESIGN.md §4): static lint of every notebook, and Run all in smoke mode offline."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest

import helpers
from helpers.release import INSTALL_URL
from scripts.run_notebooks import NOTEBOOK_DIR, inject_parameters, notebook_paths, run_notebook

NOTEBOOKS = notebook_paths()
IDS = [p.name for p in NOTEBOOKS]


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_numbering_starts_at_01_without_gaps():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert not [p.name for p in NOTEBOOK_DIR.glob("*.ipynb") if p not in NOTEBOOKS], "unnumbered notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_static_contract(path: Path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    badge = f"https://colab.research.google.com/github/{helpers.GITHUB_REPO}/blob/main/notebooks/{path.name}"
    assert badge in first.source, "Colab badge must point at this file"
    assert nb.metadata.get("accelerator") == "GPU" and nb.metadata.get("colab", {}).get("gpuType") == "T4"
    for cell in code_cells(nb):
        assert not cell.get("outputs") and cell.get("execution_count") is None, "outputs must be stripped"
        for banned in ("input(", "getpass", "notebook_login"):
            assert banned not in cell.source, f"{banned} blocks Run all"

    install = code_cells(nb)[0].source
    assert '"google.colab" in sys.modules' in install and 'find_spec("helpers") is None' in install
    assert f'url = "{INSTALL_URL}"' in install and "-e" not in install.split(), (
        "a pinned, non-editable install of helpers.release.INSTALL_URL (the rehearsal substitutes it)"
    )
    assert f'helpers.setup(notebook_version="{helpers.__version__}")' in install

    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    params = nb.cells[tagged[0]]
    for node in ast.parse(params.source).body:
        assert (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        )
        ast.literal_eval(node.value)  # literals only: derived values belong after the smoke cell
    assert all("# @param" in line for line in params.source.splitlines() if "=" in line), "Colab @param forms"
    smoke_cell = nb.cells[tagged[0] + 1].source
    assert re.search(r"helpers\.smoke_overrides\(\s*globals\(\)", smoke_cell), "smoke cell follows parameters"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_valid_under_nbformat_as_stored_and_with_injected_parameters(path: Path):
    raw = json.loads(path.read_text())
    nbformat.validate(raw)  # e.g. cell ids are allowed from nbformat 4.5 only
    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, {})  # what the runner executes
    nbformat.validate(nb)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run all notebooks in order into one run folder, as a researcher would in Colab."""
    run_dir = tmp_path_factory.mktemp("smoke_run")
    for path in NOTEBOOKS:
        run_notebook(path, run_dir, smoke=True, params=INJECTED.get(path.name[:2]))
    return run_dir


INJECTED = {"01": {"PROMPT": "What is the capital of France?"}}


def test_injected_parameters_follow_the_form_and_reject_typos():
    nb = nbformat.read(NOTEBOOKS[1], as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    inject_parameters(nb, {"N_PROMPTS": 7, "LAYERS": [3, 6]})
    assert nb.cells[at + 1].source.splitlines()[1:] == ["N_PROMPTS = 7", "LAYERS = [3, 6]"]
    with pytest.raises(KeyError, match=r"\['N_PROMPT'\] are not parameters"):
        inject_parameters(nb, {"N_PROMPT": 7})


@pytest.mark.notebook
def test_01_writes_valid_run_json(smoke_run):
    run = json.loads((smoke_run / "run.json").read_text())
    assert run["model"]["spec"] == helpers.OFFLINE_MODEL
    assert (run["model"]["n_layers"], run["model"]["d_model"], run["model"]["dtype"]) == (30, 576, "float32")
    assert run["package_version"] == helpers.__version__
    stage = run["stages"]["01_load_checkpoint"]
    assert stage["status"] == "done" and stage["hook_points"] == 30
    assert re.search(r"[A-Za-z]{3,}", stage["sample_reply"]), "the smoke chat reply should be words"
    assert not list(smoke_run.glob("*.tmp"))
    executed = nbformat.read(smoke_run / "executed" / NOTEBOOKS[0].name, as_version=4)
    printed = "".join(o.get("text", "") for c in code_cells(executed) for o in c.get("outputs", []))
    assert "USER: What is the capital of France?" in printed, "an injected parameter reaches the run"


@pytest.mark.notebook
def test_02_writes_labelled_completions_and_activations(smoke_run):
    from helpers.collect.capture import load_pooled
    from helpers.collect.completions import read_completions
    from helpers.collect.datasets import read_datasets
    from helpers.collect.store import LayerStore

    records = read_completions(smoke_run)
    entries = read_datasets(smoke_run)
    assert [(e["name"], e["role"], e["label_by"], e["n_prompts"]) for e in entries] == [
        ("contrast", "train", "instruction", 16),
        ("scenarios", "eval", "judge", 3),
        ("benign", "control", "none", 3),
    ]
    by_set = {e["name"]: [r for r in records if r["dataset"] == e["name"]] for e in entries}
    assert len(records) == sum(map(len, by_set.values())) == (16 + 3 + 3) * 2
    assert {r["policy"] for r in records} == {"on-policy"}
    contrast = by_set["contrast"]
    assert len(contrast) == 16 * 2, "8 contrast facts x 2 instructions x 2 samples in smoke mode"
    assert len({r["group"] for r in contrast}) == 8, "contrast pairs stay whole"
    assert {r["label"] for r in contrast} == {"honest", "deceptive"}
    assert {r["label_source"] for r in contrast} == {"instruction"}, "instruction labels must say so"
    for r in contrast:
        assert r["label"] == ("honest" if r["prompt_id"].endswith("/honest") else "deceptive")
    assert {r["label_source"] for r in by_set["scenarios"]} == {"rules"}, "the offline judge, marked"
    assert {(r["label"], r["label_source"]) for r in by_set["benign"]} == {(None, "control")}, "never judged"
    run = json.loads((smoke_run / "run.json").read_text())
    assert run["layers"] == [3, 6] and run["stages"]["02_collect_activations"]["status"] == "done"
    for layer in (3, 6):
        store = LayerStore(smoke_run, layer)
        stored = [r for r in records if r["n_tokens"] > 0]
        assert sorted(store.completion_ids) == sorted(r["id"] for r in stored)
        assert store.n_tokens == sum(r["n_tokens"] for r in stored) and store.d_model == 576
        ids, mean, last = load_pooled(smoke_run, layer)
        row = ids.index(stored[0]["id"])
        tokens = store.tokens_of(stored[0]["id"])
        assert abs(mean[row].numpy() - tokens.mean(0)).max() < 1e-4
        assert abs(last[row].numpy() - tokens[-1]).max() < 1e-6


@pytest.mark.notebook
def test_03_saves_saelens_folders_with_metrics(smoke_run):
    from sae_lens import SAE

    folders = sorted((smoke_run / "saes").glob("*/cfg.json"))
    cfgs = [json.loads(p.read_text()) for p in folders]
    archs = {c.get("trained_as", c["architecture"]) for c in cfgs}
    # Smoke data is tiny: mixed always trains; the one-label conditions may be skipped for too few samples
    # (reported in run.json), which is the behaviour a researcher gets with too little data.
    assert archs == {"batchtopk", "matryoshka_batchtopk", "jumprelu"}
    assert any("_mixed" in str(p) for p in folders)
    assert {c["architecture"] for c in cfgs} == {"jumprelu"}, "the BatchTopK family is saved as jumprelu"
    corpus = [p for p in folders if p.parent.name.endswith(("_corpus", "_corpus+behaviour"))]
    assert len(corpus) == 6, "the corpus conditions train on the corpus notebook 02 stored"
    assert all("corpus_activations" in json.loads((p.parent / "metrics.json").read_text()) for p in corpus)
    assert (
        len(folders)
        + len(json.loads((smoke_run / "run.json").read_text())["stages"]["03_train_saes"].get("skipped", []))
        == 15
    )
    for cfg_path in folders:
        metrics = json.loads((cfg_path.parent / "metrics.json").read_text())
        assert {"explained_variance", "l0", "dead_fraction"} <= set(metrics["activations"])
        assert "ce_increase" in metrics["lm"] and "kl_sae" in metrics["lm"]
    sae = SAE.load_from_disk(str(folders[0].parent), device="cpu")
    assert sae.cfg.d_in == 576


@pytest.mark.notebook
def test_04_writes_probes_and_feature_tables(smoke_run):
    probes = json.loads((smoke_run / "probes.json").read_text())
    kinds = {(r["layer"], r["kind"]) for r in probes["rows"]}
    assert {(3, "raw"), (6, "raw"), (3, "sae"), (3, "random_sae"), (3, "prompt_only")} <= kinds
    assert {(None, "ensemble_mean"), (None, "ensemble_concat")} <= kinds
    for r in probes["rows"]:
        assert 0 <= r["balanced_accuracy"] <= 1 and len(r["ba_ci"]) == 2
        if r["kind"] in ("raw", "sae", "bag_of_words"):  # the rows with the full statistics
            assert 0 < r["p_value"] <= 1
    assert [(d["name"], d["role"]) for d in probes["datasets"]] == [
        ("contrast", "train"),
        ("scenarios", "eval"),
        ("benign", "control"),
    ]
    assert {r["rows"]["datasets"] == ["contrast"] for r in probes["rows"] if r["kind"] == "raw"} == {True}
    for t in probes["transfer"]:  # the smoke eval set is tiny: rows exist only where it has labels
        assert (
            t["train_sets"] == ["contrast"] and t["eval_set"] == "scenarios" and t["control_set"] == "benign"
        )
        assert t["threshold"]["too_small"], "6 control answers cannot express a 1% FPR: marked"
    sweep = probes["layer_sweep"]
    assert (
        len(sweep["rows"]) >= 10
        and {3, 6} <= set(sweep["layers"])
        and sweep["peak"]["layer"] in sweep["layers"]
    )
    assert (smoke_run / "probes.json").exists() and probes["transfer_matrix"]["3"]["train"][0] == "contrast"
    tables = sorted((smoke_run / "features").glob("*.jsonl"))
    assert len(tables) == 3 and all("mixed" in p.name for p in tables)
    rows = [json.loads(line) for line in tables[0].read_text().splitlines()]
    assert len(rows) == 4 and all(r.get("explanation") is None for r in rows), "no key: nothing invented"
    assert all("fuzzing" in r and r["fuzzing"] is None and r["detection"] is None for r in rows)


@pytest.mark.notebook
def test_05_writes_steering_figures_and_dry_run(smoke_run):
    rows = [json.loads(line) for line in (smoke_run / "steering.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"none", "feature", "random_feature", "random_direction"} <= kinds
    assert (smoke_run / "figures" / "steering.html").exists()
    assert (smoke_run / "figures" / "steering.png").exists(), "key figures are saved as .png too"
    assert (smoke_run / "figures" / "probes.html").exists()
    assert (smoke_run / "publish_dry_run" / "README.md").exists()
    assert json.loads((smoke_run / "run.json").read_text())["stages"]["05_plot_and_steer"]["status"] == "done"


@pytest.mark.notebook
def test_every_interactive_figure_has_a_static_image_after_it(smoke_run):
    # Plotly's JSON output is blank where its JavaScript does not run (GitHub, a downloaded notebook):
    # every one must be followed, in the same cell, by the PNG that plots.show draws beside it.
    plotly_json, counted = "application/vnd.plotly.v1+json", 0
    for path in sorted((smoke_run / "executed").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for index, cell in enumerate(nb.cells):
            outputs = [
                o
                for o in cell.get("outputs", [])
                if o.get("output_type") in ("display_data", "execute_result")
            ]
            for at, out in enumerate(outputs):
                if plotly_json in out.get("data", {}):
                    counted += 1
                    after = [o.get("data", {}) for o in outputs[at + 1 :]]
                    assert any("image/png" in d for d in after), (
                        f"{path.name} cell {index}: plotly output, no PNG"
                    )
    assert counted >= 5, f"only {counted} interactive figures in the executed smoke notebooks"


@pytest.mark.notebook
def test_06_writes_the_explorer_and_a_valid_neuronpedia_export(smoke_run):
    from helpers.explore.neuronpedia import validate_export
    from helpers.explore.site import iter_pages, read_table, sae_info

    stage = json.loads((smoke_run / "run.json").read_text())["stages"]["06_explore_features"]
    assert stage["status"] == "done" and len(stage["saes"]) == 1, "smoke mode explores one SAE"
    info = sae_info(smoke_run, stage["saes"][0])
    explorer = smoke_run / "explorer"
    assert (explorer / "index.html").exists() and (explorer / "data" / "saes.js").exists()
    assert len(read_table(smoke_run, info["sae_id"])["feature"]) == info["d_sae"] and info["n_alive"] > 0
    assert any(page["top"] for page in iter_pages(smoke_run, info["sae_id"]))
    assert len(stage["neuronpedia"]) == 1
    assert (
        0 < validate_export(smoke_run / "neuronpedia" / stage["neuronpedia"][0])["features"] <= info["d_sae"]
    )
    assert (smoke_run / "publish_dry_run" / "explorer" / "index.html").exists(), "the Hub upload carries it"


@pytest.mark.notebook
def test_01_to_05_run_on_a_tiny_2026_layout_nanochat_checkpoint(tmp_path, monkeypatch):
    """Notebooks 01-05 on a native nanochat checkpoint of the newest layout (2026-03-14: value embeddings,
    smear, backout, sliding windows), which loads as our NanoChatGPTForCausalLM. Smoke mode would replace
    MODEL by the offline model, so 01 runs without NB_SMOKE and gets MODEL and the smoke values through the
    runner's parameter injection (offline, CPU, no Gemini key, as smoke_env sets them); 02-05 run in smoke
    mode on the model 01 recorded in run.json."""
    from helpers.collect.store import LayerStore
    from tests.model.nanochat_oracle import write_tiny_2026_checkpoint

    native = write_tiny_2026_checkpoint(tmp_path / "native", n_layer=8, n_embd=64)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("NB_CACHE_DIR", str(tmp_path / "cache"))
    first, *rest = notebook_paths(["01", "02", "03", "04", "05"])
    run_notebook(
        first,
        run_dir,
        smoke=False,
        params={"MODEL": str(native), "RUN_NAME": "smoke", "MAX_NEW_TOKENS": 12},
        offline=True,
    )
    for path in rest:
        run_notebook(path, run_dir, smoke=True)

    run = json.loads((run_dir / "run.json").read_text())
    model = run["model"]
    assert (model["spec"], model["source"], model["layout"], model["family"]) == (
        str(native),
        "nanochat-native",
        "2026-03-14",
        "nanochat",
    )
    shape = (model["n_layers"], model["d_model"], model["dtype"], model["chat_format"])
    assert shape == (8, 64, "float32", "nanochat")
    assert all(run["stages"][p.stem]["status"] == "done" for p in [first, *rest])
    assert run["stages"]["01_load_checkpoint"]["hook_points"] == 8
    assert run["layers"] == [3, 6]
    records = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    contrast = [r for r in records if r["dataset"] == "contrast"]
    assert len(contrast) == 32 and {r["label"] for r in contrast} == {"honest", "deceptive"}
    assert {r["dataset"] for r in records} == {"contrast", "scenarios", "benign"}
    for layer in (3, 6):
        store = LayerStore(run_dir, layer)
        assert store.d_model == 64 and store.n_tokens == sum(r["n_tokens"] for r in records)
    cfgs = [json.loads(p.read_text()) for p in (run_dir / "saes").glob("*/cfg.json")]
    assert cfgs and all(
        c["d_in"] == 64 and c["metadata"]["hook_name"] == "blocks.3.hook_resid_post" for c in cfgs
    )
    metrics = [json.loads(p.read_text()) for p in (run_dir / "saes").glob("*/metrics.json")]
    assert all("ce_increase" in m["lm"] for m in metrics), "the LM-loss evaluation ran on the 2026 model"
    assert {"none", "feature", "random_direction"} <= {
        json.loads(line)["kind"] for line in (run_dir / "steering.jsonl").read_text().splitlines()
    }
    assert (run_dir / "figures" / "steering.png").exists() and (run_dir / "probes.json").exists()
