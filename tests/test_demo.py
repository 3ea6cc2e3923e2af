"""README command 1 shows a real result: the demo preset, reduced, run through the
same runner, is not degenerate.

`scripts/demo_params.json` is what `python3 scripts/run_notebooks.py --demo` runs (about a quarter of an hour
on a 2-core CPU). This test runs the same preset with fewer prompts and training tokens (`REDUCE` below
changes values only, never the preset's structure) and reads the run folder's files for what a newcomer
must see:

- the trained SAE fires: most stored behaviour tokens activate at least one feature (read back through
  sae_lens, the format's own reader, from the saved folder);
- the raw-residual probe at the SAE's layer reads the label, its 95% CI above chance (probes.json);
- the top features' pages in the explorer have quantile groups with distinct edges and examples in each;
- no Gemini key: every explanation is marked unavailable, none invented;
- every progress bar in the executed notebooks shows where it ended, not its first frame.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nbformat
import pytest

from scripts.run_notebooks import DEMO_PARAMS, WIDGET_VIEW, notebook_paths, read_params, run_notebook

REDUCE = {
    "02": {
        "DATASETS": [
            {"data": "builtin:contrast", "role": "train", "label_by": "instruction", "limit": 40},
            {"data": "builtin:scenarios", "role": "eval", "label_by": "judge", "limit": 2},
            {"data": "builtin:benign", "role": "control", "limit": 2},
        ],
        "MAX_NEW_TOKENS": 16,
        "CORPUS_TOKENS": 16384,
    },
    "03": {"TRAIN_TOKENS": 32768, "BATCH_SIZE": 128, "MIN_TOKENS": 32, "LM_EVAL_COMPLETIONS": 4},
    "04": {"N_BOOTSTRAP": 100, "FEATURE_PERMUTATIONS": 199},
    "05": {"N_HELD_OUT_PROMPTS": 2, "MAX_NEW_TOKENS": 8},
    "06": {"MAX_NEW_TOKENS": 8},
}
"""Values of the demo preset made smaller for CI; every key must already be in the preset."""


DEMO_NOTEBOOKS = notebook_paths(sorted(read_params(DEMO_PARAMS)))


def reduced_preset() -> dict[str, dict]:
    preset = copy.deepcopy(read_params(DEMO_PARAMS))
    for number, values in REDUCE.items():
        unknown = sorted(set(values) - set(preset.get(number, {})))
        assert not unknown, f"REDUCE sets {unknown} of notebook {number}, which the demo preset does not set"
        preset[number].update(values)
    return preset


def test_reduced_preset_keeps_the_demo_structure():
    demo, reduced = read_params(DEMO_PARAMS), reduced_preset()
    assert {n: sorted(p) for n, p in demo.items()} == {n: sorted(p) for n, p in reduced.items()}
    assert sorted(demo) == ["01", "02", "03", "04", "05", "06"], "the demo runs the single-model notebooks"
    datasets = {d["data"]: d for d in reduced["02"]["DATASETS"]}
    assert [d["role"] for d in datasets.values()] == ["train", "eval", "control"]
    assert [d["data"] for d in demo["02"]["DATASETS"]] == list(datasets)
    assert demo["03"]["LAYERS"] == demo["02"]["LAYERS"], "the SAEs read a layer notebook 02 stored"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo_run")
    preset = reduced_preset()
    for path in notebook_paths(sorted(preset)):
        run_notebook(path, run_dir, smoke=False, offline=True, params=preset[path.name[:2]])
    return run_dir


def _sae_id(run_dir: Path) -> str:
    from helpers.saes import find_sae_folders

    folders = find_sae_folders(run_dir / "saes")
    assert len(folders) == 1, f"the demo trains one SAE, found {[f.name for f in folders]}"
    return folders[0].name


@pytest.mark.notebook
def test_demo_runs_without_smoke_overrides_on_the_offline_model(demo_run):
    import helpers

    run = json.loads((demo_run / "run.json").read_text())
    assert run["model"]["spec"] == helpers.OFFLINE_MODEL
    assert all(s["status"] == "done" for s in run["stages"].values()), run["stages"]
    assert len(run["stages"]) == len(DEMO_NOTEBOOKS)
    for path in DEMO_NOTEBOOKS:
        executed = nbformat.read(demo_run / "executed" / path.name, as_version=4)
        text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
        assert "NB_SMOKE=1" not in text, f"{path.name} ran in smoke mode"


@pytest.mark.notebook
def test_most_stored_tokens_fire_a_feature_of_the_trained_sae(demo_run):
    import numpy as np
    import torch
    from sae_lens import SAE

    from helpers.collect.store import LayerStore

    sae_id = _sae_id(demo_run)
    sae = SAE.load_from_disk(str(demo_run / "saes" / sae_id), device="cpu")
    layer = json.loads((demo_run / "saes" / sae_id / "metrics.json").read_text())["layer"]
    store = LayerStore(demo_run, layer)
    x = torch.from_numpy(np.concatenate([store.tokens_of(c) for c in store.completion_ids])).float()
    with torch.no_grad():
        acts = sae.encode(x)
    firing = (acts > 0).any(1).float().mean().item()
    l0 = (acts > 0).sum(1).float().mean().item()
    assert firing >= 0.9, (
        f"only {firing:.0%} of {len(x)} stored tokens fire a feature of {sae_id} (L0 {l0:.1f})"
    )
    assert 4 <= l0 <= 4 * sae.cfg.d_sae, l0


@pytest.mark.notebook
def test_raw_probe_at_the_sae_layer_reads_the_label_above_chance(demo_run):
    probes = json.loads((demo_run / "probes.json").read_text())
    layer = json.loads((demo_run / "saes" / _sae_id(demo_run) / "metrics.json").read_text())["layer"]
    (row,) = [r for r in probes["rows"] if r["kind"] == "raw" and r["layer"] == layer]
    assert row["auroc_ci"][0] > 0.5 and row["ba_ci"][0] > 0.5, (row["auroc_ci"], row["ba_ci"])
    assert row["p_value"] < 0.05


@pytest.mark.notebook
def test_top_features_have_full_distinct_quantile_groups(demo_run):
    from helpers.explore import site

    sae_id = _sae_id(demo_run)
    rows = [json.loads(line) for line in (demo_run / "features" / f"{sae_id}.jsonl").read_text().splitlines()]
    top = [r["feature"] for r in sorted(rows, key=lambda r: r["rank"])[:5]]
    assert top, "notebook 04 selected no features"
    for f in top:
        page = site.read_page(demo_run, sae_id, f)
        groups = page["quantiles"]
        assert page["n_firing"] > 0 and len(groups) >= 2, (f, page["n_firing"], groups)
        edges = [(g["lo"], g["hi"]) for g in groups]
        assert all(lo < hi for lo, hi in edges), f"feature {f}: an empty interval in {edges}"
        assert all(a[1] <= b[0] for a, b in zip(edges, edges[1:], strict=False)), edges
        assert all(g["examples"] for g in groups), f"feature {f}: a quantile group without examples: {edges}"


@pytest.mark.notebook
def test_without_a_key_explanations_are_marked_unavailable(demo_run):
    from helpers.gemini import OFFLINE

    sae_id = _sae_id(demo_run)
    rows = [json.loads(line) for line in (demo_run / "features" / f"{sae_id}.jsonl").read_text().splitlines()]
    assert rows and all(r["explanation"] is None for r in rows), "an explanation appeared without a key"
    n_label = read_params(DEMO_PARAMS)["04"]["N_LABEL"]
    for r in rows:  # the top N_LABEL were sent for labelling and say why they have none; the rest say so
        why = r["explanation_source"]
        if r["rank"] <= n_label:
            assert why in (OFFLINE, "unavailable (no activating windows in the explain split)"), why
        else:
            assert why.startswith("not labelled"), why


@pytest.mark.notebook
def test_progress_bars_are_saved_where_they_ended(demo_run):
    bars = 0
    for path in DEMO_NOTEBOOKS:
        executed = nbformat.read(demo_run / "executed" / path.name, as_version=4)
        for cell in executed.cells:
            for out in cell.get("outputs", []):
                if WIDGET_VIEW in out.get("data", {}) and "|" in out["data"].get("text/plain", ""):
                    bars += 1
                    assert " 0%|" not in out["data"]["text/plain"], (path.name, out["data"]["text/plain"])
    assert bars, "no progress bar in any executed notebook"
