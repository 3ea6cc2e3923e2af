"""The Colab rehearsal's parts (scripts/colab_rehearsal.py, scripts/colab/): the install-cell
substitution and parameter injection on the real notebooks, the google.colab stand-in seen through the
package, and the fake Gemini answering the package's real request schemas. The rehearsal itself (a
fresh venv, every notebook, two passes) runs in .ci/run after this suite; these catch a broken part in
seconds instead."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from helpers.release import COLAB_KEEP, INSTALL_URL

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "scripts" / "colab" / "stub"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


rehearsal = load("colab_rehearsal", ROOT / "scripts" / "colab_rehearsal.py")
fake_server = load("rehearsal_fake_gemini_server", ROOT / "scripts" / "colab" / "fake_gemini_server.py")
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_install_cell_gets_the_local_url(path: Path):
    nb = json.loads(path.read_text())
    local = "git+file:///somewhere@0123abcd"
    assert rehearsal.substitute_install_url(nb, INSTALL_URL, local, path.name) == INSTALL_URL
    install = next(rehearsal._source(c) for c in nb["cells"] if c["cell_type"] == "code")
    assert local in install and INSTALL_URL not in install
    with pytest.raises(rehearsal.RehearsalError, match="does not contain the release's install URL"):
        rehearsal.substitute_install_url(json.loads(path.read_text()), INSTALL_URL + "x", local, path.name)


def test_without_release_file_the_one_github_url_is_replaced():
    nb = json.loads(NOTEBOOKS[0].read_text())
    assert rehearsal.substitute_install_url(nb, None, "git+file:///x@1", "01") == INSTALL_URL


@pytest.mark.parametrize("number", sorted(rehearsal.GEMINI_PARAMS))
def test_gemini_pass_parameters_follow_the_smoke_cell(number: str):
    path = next(p for p in NOTEBOOKS if p.name.startswith(number))
    nb = json.loads(path.read_text())
    at, _ = rehearsal.parameter_names(nb)
    rehearsal.inject_after_smoke_cell(nb, rehearsal.GEMINI_PARAMS[number], path.name)
    assert "smoke_overrides" in rehearsal._source(nb["cells"][at + 1])
    injected = rehearsal._source(nb["cells"][at + 2])
    for name, value in rehearsal.GEMINI_PARAMS[number].items():
        assert f"{name} = {value!r}" in injected
    with pytest.raises(rehearsal.RehearsalError, match=r"\['NOT_A_PARAMETER'\] are not parameters"):
        rehearsal.inject_after_smoke_cell(nb, {"NOT_A_PARAMETER": 1}, path.name)


def test_preinstalled_pins_what_the_install_cell_keeps():
    pins = rehearsal.read_preinstalled()
    assert all(pins.get(rehearsal.canonical(p)) for p in COLAB_KEEP), pins
    assert {"ipykernel", "nbclient", "nbformat"} <= set(pins)


def test_colab_stand_in_through_the_package(tmp_path: Path):
    """In a fresh interpreter with the stand-in imported: secrets come from COLAB_SECRET_<NAME> through
    the package's Colab branch, Drive mounts under NB_DRIVE_ROOT, and `google` stays a namespace
    package (google.genai still imports)."""
    log = tmp_path / "stub.jsonl"
    env = {k: v for k, v in os.environ.items() if not rehearsal.DROPPED_ENV.match(k)}
    env.update(
        PYTHONPATH=str(STUB),
        NB_DRIVE_ROOT=str(tmp_path / "drive"),
        COLAB_STUB_LOG=str(log),
        COLAB_SECRET_GEMINI_API_KEY="secret-value-123",
    )
    code = """
import google.colab, sys
from google import genai
from google.colab import userdata
from helpers import env
assert env.in_colab()
assert env.get_secret("GEMINI_API_KEY") == "secret-value-123"
assert env.get_secret("HF_TOKEN") is None
try:
    userdata.get("HF_TOKEN")
except userdata.SecretNotFoundError as err:
    print("raised:", err)
print("mounted:", env.mount_drive())
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "raised: Secret HF_TOKEN does not exist." in out.stdout
    assert f"mounted: {tmp_path / 'drive' / 'MyDrive'}" in out.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"call": "userdata.get", "name": "GEMINI_API_KEY", "found": True} in records
    assert [r["path"] for r in records if r["call"] == "drive.mount"] == [str(tmp_path / "drive")]
    assert "secret-value-123" not in log.read_text()


@pytest.fixture
def gemini(monkeypatch):
    module = fake_server.load_fake_gemini(rehearsal.fake_gemini_path())
    server = fake_server.RehearsalGemini(module, {"gemini-3.5-flash-lite"}, "rehearsal-key").start()
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.url)
    monkeypatch.setenv("GEMINI_API_KEY", "rehearsal-key")
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    yield server
    server.stop()


def test_fake_gemini_answers_the_judge(gemini):
    from helpers.collect.judge import label_completions
    from helpers.gemini import GeminiClient

    items = [{"id": f"c{i}", "user": "Is it true?", "completion": "Yes."} for i in range(6)]
    labels = label_completions(items, client=GeminiClient("gemini-3.5-flash-lite"), batch_size=4)
    assert {i: lab.label for i, lab in labels.items()} == gemini.labels
    assert {lab.source for lab in labels.values()} == {"gemini:gemini-3.5-flash-lite"}
    assert gemini.kinds == {"judge": 2} and not gemini.unrecognised


def test_fake_gemini_answers_explanations_and_scores(gemini):
    from helpers.analysis.autointerp import EXPLAIN_SYSTEM, ExplainAnswer
    from helpers.analysis.scoring import FUZZING_SYSTEM, ScoreAnswer
    from helpers.gemini import GeminiClient, items_prompt

    client = GeminiClient("gemini-3.5-flash-lite")
    explain = [
        {
            "feature": 5,
            "activating": [{"max_activation": 1.5, "text": "I <<never>> saw it"}],
            "not_activating": [],
        }
    ]
    answer = client.generate_json(items_prompt("Explain", explain), ExplainAnswer, system=EXPLAIN_SYSTEM)
    assert {e.explanation for e in answer.features} == gemini.explanations[5]
    windows = [{"window": j, "text": f"window {j}"} for j in range(3)]
    score = [{"feature": 5, "explanation": "x", "windows": windows}]
    answer = client.generate_json(items_prompt("Judge", score), ScoreAnswer, system=FUZZING_SYSTEM)
    assert [[w.score for w in f.scores] for f in answer.features] == gemini.scores[5]
    assert gemini.kinds == {"explain": 1, "score": 1} and not gemini.unrecognised
    assert helpers.__version__  # the package under test is importable beside the stand-ins


def _sweep_tree(project: Path, models: list[str]) -> Path:
    """What notebook 07's smoke sweep leaves on Drive, written by hand in its formats."""
    sweep_dir = project / "sweeps" / rehearsal.SMOKE_RUN
    (sweep_dir / "figures").mkdir(parents=True)
    state = {"models": {k: {"status": "done"} for k in models}}
    (sweep_dir / "sweep.json").write_text(json.dumps(state))
    for key in models:
        run = project / "runs" / f"{rehearsal.SMOKE_RUN}__{key}"
        run.mkdir(parents=True)
        stages = {s: {"status": "done"} for s in rehearsal.SWEEP_STAGES}
        (run / "run.json").write_text(json.dumps({"stages": stages}))
    rows = [{"model": k, "layer": layer, "raw_auroc": 0.5} for k in models for layer in (1, 2)]
    (sweep_dir / "comparison.json").write_text(json.dumps({"rows": rows}))
    (sweep_dir / "comparison.csv").write_text(
        "model,layer,raw_auroc\n" + "".join(f"{r['model']},{r['layer']},0.5\n" for r in rows)
    )
    for name in ("sweep_depth", "sweep_sae_minus_raw", "sweep_scale"):
        (sweep_dir / "figures" / f"{name}.html").write_text("<html></html>")
    (sweep_dir / "summary.md").write_text("| " + " | ".join(models) + " |\n")
    return sweep_dir


def test_sweep_check_passes_a_complete_sweep_and_names_what_is_missing(tmp_path: Path):
    models = ["smollm2-135m-instruct", "tiny-1a2b3c", "tiny-4d5e6f"]
    sweep_dir = _sweep_tree(tmp_path, models)
    ok = rehearsal.PassResult("offline")
    rehearsal.check_sweep(ok, tmp_path)
    assert ok.failures == []
    state = json.loads((sweep_dir / "sweep.json").read_text())
    state["models"]["tiny-4d5e6f"] = {"status": "failed", "error": "IndexError: layer 9"}
    (sweep_dir / "sweep.json").write_text(json.dumps(state))
    (sweep_dir / "figures" / "sweep_scale.html").unlink()
    run = tmp_path / "runs" / f"{rehearsal.SMOKE_RUN}__tiny-1a2b3c" / "run.json"
    run.write_text(json.dumps({"stages": {"01_load_checkpoint": {"status": "done"}}}))
    bad = rehearsal.PassResult("offline")
    rehearsal.check_sweep(bad, tmp_path)
    text = "\n".join(bad.failures)
    assert "tiny-4d5e6f: failed IndexError: layer 9" in text and "sweep_scale.html" in text
    assert "tiny-1a2b3c: stages ['02_collect_activations', '03_train_saes', '04_autolabel_features']" in text
    assert len(bad.failures) == 3
