"""The steering panel: its generation function, and the widget tree driven without a browser."""

from __future__ import annotations

import json
import sys

import pytest

from helpers.model.hooks import hook_name
from helpers.saes import TopKSAE
from helpers.saes.io import load_sae, save_sae
from helpers.steer.panel import PairSettings, feature_options, generate_pair, steering_panel
from tests.widgets import find, widgets_of

# The widgets and traits that ipywidgets 7.x (Colab) and 8.x both have; the panel must use no others.
COMMON_WIDGETS = {"Dropdown", "BoundedIntText", "FloatSlider", "Textarea", "Button", "HTML", "HBox", "VBox"}
SAE_ID = "tiny_topk_L1_mixed"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def run(tmp_path):
    save_sae(
        TopKSAE(32, 48, l0=4, seed=2),
        tmp_path / "saes" / SAE_ID,
        hook_name=hook_name(1),
        model_name="tiny-llama",
    )
    save_sae(
        TopKSAE(32, 24, l0=4, seed=3),
        tmp_path / "saes" / "other",
        hook_name=hook_name(2),
        model_name="tiny-llama",
    )
    rows = [
        {"feature": 9, "rank": 2, "cohens_d": -0.5, "explanation": None},
        {"feature": 30, "rank": 1, "cohens_d": 1.25, "explanation": "denies <the> secret", "x": [1]},
    ]
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / f"{SAE_ID}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_feature_options_show_explanations_in_rank_order(run):
    assert feature_options(run, SAE_ID) == [
        ("#30  d=+1.25  denies <the> secret", 30),
        ("#9  d=-0.50  not explained yet", 9),
    ]
    assert feature_options(run, "other") == []


def test_generate_pair_same_seed_and_steering_changes_text(tiny, run):
    sae = load_sae(run / "saes" / SAE_ID)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=4)
    zero = generate_pair(tiny, sae, 30, 0.0, "Did you take the money?", **kw)
    assert zero["steered"] == zero["unsteered"] and zero["layer"] == 1
    pushed = generate_pair(tiny, sae, 30, 20.0, "Did you take the money?", unit=3.0, **kw)
    assert pushed["unsteered"] == zero["unsteered"] and pushed["steered"] != pushed["unsteered"]
    clamped = generate_pair(tiny, sae, 30, 50.0, "Did you take the money?", mode="clamp", **kw)
    assert clamped["steered"] != clamped["unsteered"]
    with pytest.raises(ValueError, match="mode must be one of"):
        generate_pair(tiny, sae, 30, 1.0, "hi", mode="replace")
    with pytest.raises(TypeError, match=r"\['modes'\]: the pair settings are \['system', 'mode', 'unit'\]"):
        generate_pair(tiny, sae, 30, 1.0, "hi", modes="clamp")
    with pytest.raises(ValueError, match="mode must be one of"):
        generate_pair(tiny, sae, 30, 1.0, "hi", pair=PairSettings(mode="clamp"), mode="replace")
    with pytest.raises(IndexError, match="d_sae=48"):
        generate_pair(tiny, sae, 48, 1.0, "hi")
    wrong = load_sae(
        save_sae(TopKSAE(32, 8, l0=2), run / "w", hook_name=hook_name(1), model_name="karpathy/nanochat-d32")
    )
    with pytest.raises(ValueError, match="nanochat-d32.*tiny-llama"):
        generate_pair(tiny, wrong, 0, 1.0, "hi")


def test_panel_builds_common_widgets_and_its_button_generates(tiny, run, monkeypatch):
    # Colab cannot show plotly figures from widget callbacks (colabtools#5889): the panel must work with
    # plotly unimportable, so every callback below runs with `import plotly` failing.
    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)
    panel = steering_panel(tiny, run, prompt="Did you take the money?", max_new_tokens=5, temperature=1.0)
    assert {type(w).__name__ for w in widgets_of(panel)} <= COMMON_WIDGETS
    (sae_box,) = find(panel, "Dropdown", "SAE")
    (feat_box,) = find(panel, "Dropdown", "feature")
    (latent,) = find(panel, "BoundedIntText")
    (slider,) = find(panel, "FloatSlider")
    (button,) = find(panel, "Button")
    status, left, right = find(panel, "HTML")
    assert sae_box.label == "other" or sae_box.label == SAE_ID
    sae_box.value = str(run / "saes" / SAE_ID)
    assert feat_box.options[0][0].startswith("#30  d=+1.25  denies <the> secret") and latent.value == 30
    assert latent.max == 47
    feat_box.value = 9
    assert latent.value == 9
    slider.value = 0.0
    button.click()
    assert (
        "Error" not in status.value
        and "same seed" in status.value
        and "measured on this prompt" in status.value
    )
    assert left.value.split("<br>")[1] == right.value.split("<br>")[1], "strength 0 must not change the text"
    slider.value = 3.0
    button.click()
    assert left.value.split("<br>")[1] != right.value.split("<br>")[1]
    assert "latent 9 at layer 1" in right.value
    latent.value = 0
    (prompt_box,) = find(panel, "Textarea", "prompt")
    prompt_box.value = "  "
    button.click()
    assert "ValueError" in status.value and "prompt is empty" in status.value
    sae_box.value = str(run / "saes" / "other")
    assert feat_box.options == (("(no features file for this SAE: type a latent)", -1),) and latent.max == 23


def test_panel_without_saes_names_the_notebook(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook 03"):
        steering_panel(tiny, tmp_path)
