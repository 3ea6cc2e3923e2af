"""The explorer panel driven without a browser (its widget tree and callbacks), the notebook's views,
and the pipeline around them: build_explorer's choices, the zip and the Hub dry run carrying the
explorer and the export."""

from __future__ import annotations

import zipfile

import pytest

from helpers.explore.dashboards import ExplorerConfig
from helpers.explore.neuronpedia import export_neuronpedia
from helpers.explore.panel import explorer_panel, parse_features
from helpers.explore.pipeline import build_explorer
from helpers.explore.site import read_table
from helpers.explore.views import default_feature, select_features
from helpers.publish import zip_run
from helpers.saes.hub import publish_saes
from tests.explore.fake_run import SAE_ID, make_run
from tests.widgets import find, widgets_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# What ipywidgets 7.x (Colab) and 8.x both have; the panel must use no others.
COMMON_WIDGETS = {
    "Dropdown",
    "BoundedIntText",
    "IntSlider",
    "FloatSlider",
    "Text",
    "Textarea",
    "Checkbox",
    "Button",
    "HTML",
    "HBox",
    "VBox",
    "Tab",
}


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    root = make_run(tmp_path_factory.mktemp("panel_run"), tiny)
    build_explorer(root, lm=tiny, sae_filter="L1", config=ExplorerConfig(n_top=3, n_quantiles=2))
    return root


def one(box, cls: str, description: str | None = None):
    hits = find(box, cls, description)
    assert len(hits) == 1, (cls, description, len(hits))
    return hits[0]


def shown(panel) -> str:
    return "".join(w.value for w in widgets_of(panel) if type(w).__name__ == "HTML")


def test_panel_tabs_drive_the_explorer(run, tiny):
    panel = explorer_panel(tiny, run, sae_id=SAE_ID, prompt="Did you take it?", max_new_tokens=4)
    assert {type(w).__name__ for w in widgets_of(panel)} <= COMMON_WIDGETS
    status, search = panel.children[1], one(panel, "Text", "search")
    rows = next(w for w in widgets_of(panel) if type(w).__name__ == "HTML" and "<table" in w.value)
    search.value = "denial"
    assert "#5" in rows.value and rows.value.count("<tr>") == 2, "header + one matching row"
    search.value = ""
    one(panel, "Dropdown", "deception tag").value = "not deception"
    assert "#7" in rows.value and "#5" not in rows.value

    one(panel, "BoundedIntText", "feature").value = 5
    one(panel, "Button", "show feature").click()
    assert status.value == "" and "denials of having done something" in shown(panel)
    assert "Top activations in the reference corpus" in shown(panel) and "corpus tokens" in shown(panel)
    assert ">corpus</th>" in rows.value, "the table's corpus rate column"

    one(panel, "Button", "steer this feature").click()
    assert status.value == "" and "<b>unsteered</b>" in shown(panel)

    one(panel, "Text", "features").value = "5, 7"
    one(panel, "Button", "analyse").click()
    assert status.value == "" and "#5 (max" in shown(panel) and "#7 (max" in shown(panel)
    one(panel, "Dropdown", "mode").value = "let the model answer it"
    one(panel, "Button", "analyse").click()
    assert status.value == "", status.value

    one(panel, "Button", "generate and track").click()
    assert status.value == "" and "deception meter" in shown(panel) and "Calibration caveat" in shown(panel)
    # this run's probe is at chance (test_meter): grey bars, and the reason quoted with the probe's figure
    assert "no better than chance" in shown(
        panel
    ) and "Greyed out: this meter is no better than chance" in shown(panel)

    one(panel, "Text", "features").value = "5, seven"
    one(panel, "Button", "analyse").click()
    assert "ValueError" in status.value and "seven" in status.value, "a callback's error is shown, not lost"


def test_parse_and_select():
    assert parse_features(" 12, #40 7") == [12, 40, 7] and parse_features("") is None
    table = {
        "feature": [0, 1, 2],
        "firing_rate": [0.1, 0.0, 0.3],
        "rate_honest": [0.1, 0, 0.1],
        "rate_deceptive": [0.1, 0, 0.5],
        "max_activation": [1, 0, 2],
        "cohens_d": [None, None, -2.0],
        "q_value": [None, None, 0.01],
        "explanation": [None, "dead", "lies"],
        "tag": ["not analysed", "unclear", "deception"],
        "top_logit": ["a", "b", "c"],
    }
    assert [r["feature"] for r in select_features(table)] == [2, 0], "dead hidden, largest rate first"
    assert [r["feature"] for r in select_features(table, "#1")] == [1], "an id finds a dead feature too"
    assert [r["feature"] for r in select_features(table, tag="analysed", hide_dead=False)] == [2, 1]
    assert [r["feature"] for r in select_features(table, sort="deceptive - honest rate")] == [2, 0]
    assert default_feature(table) == 2
    corpus_only = {**table, "rate_corpus": [0.0, 0.2, 0.0]}  # feature 1 fires on the corpus alone
    assert [r["feature"] for r in select_features(corpus_only)] == [2, 0, 1], "a corpus-only feature is alive"
    with pytest.raises(ValueError, match="sort must be one of"):
        select_features(table, sort="nonsense")


def test_pipeline_choices_and_publishing_carry_the_explorer(run, tiny, capsys):
    with pytest.raises(ValueError, match=r"no SAE id contains 'nope'.*tiny-llama_topk_L1_mixed"):
        build_explorer(run, lm=tiny, sae_filter="nope")
    assert set(read_table(run, SAE_ID)) >= {"feature", "firing_rate", "tag", "explanation", "top_logit"}
    export_neuronpedia(run, [SAE_ID])
    capsys.readouterr()
    archive = zip_run(run)
    assert "feature explorer" in capsys.readouterr().out
    names = zipfile.ZipFile(archive).namelist()
    assert f"{run.name}/explorer/index.html" in names and any("/neuronpedia/tiny-llama/" in n for n in names)
    report = publish_saes(run, [SAE_ID], "me/saes", dry_run=True)
    assert "explorer/index.html" in report["files"] and "explorer/data/saes.js" in report["files"]
    assert any(f.startswith("neuronpedia/tiny-llama/") for f in report["files"])
    assert not any(f.startswith("neuronpedia/saelens/") for f in report["files"]), "weights go up once"
    assert "## Feature explorer" in (report["folder"] / "README.md").read_text()
    assert (report["folder"] / "explorer" / "index.html").exists()
