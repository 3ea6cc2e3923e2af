"""Settings-aware resume as users hit it (issue 21): notebooks 01-03 run through the runner
(`scripts/run_notebooks.run_notebook`, smoke mode, parameters injected), then rerun on the same run
folder with a setting changed. Each rerun must stop with a NotebookError naming what differs and the
choices, before anything is written: the run folder hashes the same before and after (the runner's
executed copies aside). Before issue 21 each of these reruns went on: notebook 02 appended the new
dataset's (or temperature's) completions to the old ones, and notebook 03 reused SAEs trained at another
learning rate. Also: run.json's provenance (history, created_with) and the release flag of old results.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from nbclient.exceptions import CellExecutionError

import helpers
from helpers.run import read_run_json, release_flag, run_summary, update_run_json
from helpers.saes.evals import leaderboard
from helpers.saes.pipeline import with_release_flags
from scripts.run_notebooks import NOTEBOOK_DIR, run_notebook

pytestmark = pytest.mark.notebook

BASE_02 = dict(
    DATA="builtin:contrast",
    LABEL_BY="instruction",
    N_PROMPTS=16,
    N_PER_PROMPT=2,
    MAX_NEW_TOKENS=8,
    BATCH_SIZE=16,
    LAYERS=[3],
    CORPUS_TOKENS=0,
    USE_GEMINI=False,
)
"""Notebook 02 as a small study: 8 contrast facts (both labels, so notebook 03 trains), one layer, no
corpus. Run outside smoke mode so that every injected value counts (the smoke cell would replace DATA)."""
GRID_03 = {"ARCHITECTURES": ["topk"], "CONDITIONS": ["mixed"]}
"""One SAE per run of notebook 03: enough to show the resume, at a fraction of the smoke grid's cost."""


def notebook(number: str) -> Path:
    return next(NOTEBOOK_DIR.glob(f"{number}_*.ipynb"))


def digest(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the run folder but the runner's executed copies."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "executed" not in p.relative_to(run_dir).parts
    }


def stops(number: str, run_dir: Path, params: dict, *, smoke: bool = True) -> str:
    """Run a notebook expected to stop with a NotebookError; its message."""
    with pytest.raises(CellExecutionError) as err:
        run_notebook(notebook(number), run_dir, smoke=smoke, params=params, offline=True)
    assert err.value.ename == "NotebookError", err.value
    return err.value.evalue


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Notebooks 01, 02 and 03 (one SAE) run once, as a researcher would."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    run_notebook(notebook("01"), run_dir, smoke=True)
    run_notebook(notebook("02"), run_dir, smoke=False, params=BASE_02, offline=True)
    run_notebook(notebook("03"), run_dir, smoke=True, params=GRID_03)
    return run_dir


@pytest.fixture
def copy(base, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def test_02_with_another_dataset_or_temperature_stops_before_writing(copy):
    """The issue's case: DATA changed on an existing run folder (was: the new completions appended)."""
    before = digest(copy)
    msg = stops("02", copy, {**BASE_02, "DATA": "builtin:scenarios", "LABEL_BY": "judge"}, smoke=False)
    assert "nothing was written" in msg and "datasets.contrast:" in msg and "→ (absent)" in msg, msg
    assert "datasets.scenarios: (absent) → " in msg and "RUN_NAME" in msg and "OVERWRITE = True" in msg, msg
    assert "ADD_TO_RUN" not in msg, "a dataset replaced by another is not an addition"
    assert digest(copy) == before, "the run folder must not change"
    msg = stops("02", copy, {**BASE_02, "TEMPERATURE": 0.7}, smoke=False)
    assert "sampling.temperature: 1.0 → 0.7" in msg and "ADD_TO_RUN" not in msg, msg
    assert digest(copy) == before


def test_02_rerun_with_the_same_settings_resumes_without_change(copy):
    completions = (copy / "completions.jsonl").read_bytes()
    run_notebook(notebook("02"), copy, smoke=False, params=BASE_02, offline=True)
    assert (copy / "completions.jsonl").read_bytes() == completions
    run = read_run_json(copy)
    collect = [e for e in run["history"] if e.get("stage") == "02_collect_activations"]
    assert [e.get("settings") or e.get("status") for e in collect] == ["new", "done", "done"]
    assert len({e.get("settings_hash") for e in collect}) == 1, "the same settings both times"


def test_03_with_another_learning_rate_stops_before_training(copy):
    before = digest(copy)
    msg = stops("03", copy, {**GRID_03, "LR": 3e-4})
    assert "_topk_L3_mixed (finished, release " in msg and "training.lr: 0.001 → 0.0003" in msg, msg
    assert "OVERWRITE = True" in msg
    assert digest(copy) == before, "no SAE trained, nothing rewritten"


def test_run_json_keeps_its_provenance_and_old_results_are_flagged(copy):
    run = read_run_json(copy)
    assert run["created_with"] == helpers.__version__
    stages = [e["stage"] for e in run["history"] if e.get("status") == "done"]
    assert stages == ["01_load_checkpoint", "02_collect_activations", "03_train_saes"]
    assert all(e["package_version"] == helpers.__version__ for e in run["history"])
    # A run folder that an older release started: the release that wrote it is kept, never overwritten.
    raw = json.loads((copy / "run.json").read_text())
    raw.update(package_version="0.1.0", created_with="0.1.0")
    (copy / "run.json").write_text(json.dumps(raw))
    update_run_json(copy, note="x")
    run = read_run_json(copy)
    assert run["created_with"] == "0.1.0" and run["history"][-1]["event"] == "release changed"
    assert "started with release 0.1.0, since written by " + helpers.__version__ in run_summary(copy)
    summary = run_summary(copy)
    assert "labels: honest " in summary and "deceptive " in summary, summary  # values, not key counts
    # An SAE from before releases were recorded is flagged on the leaderboard.
    (metrics,) = copy.glob("saes/*/metrics.json")
    m = json.loads(metrics.read_text())
    board = with_release_flags(copy, leaderboard(copy))
    assert [r["release"] for r in board] == [""]
    m.pop("package_version")
    metrics.write_text(json.dumps(m))
    assert [r["release"] for r in with_release_flags(copy, leaderboard(copy))] == ["release not recorded"]
    assert release_flag("0.1.0") == "older release 0.1.0"


def test_02_rerun_repairs_a_truncated_shard(copy, base):
    """A shard cut short (a Drive sync interrupted): readers name it with its completions; rerunning
    notebook 02 with the same settings removes it and collects those completions again."""
    from helpers.collect.store import LayerStore
    from helpers.run import activations_dir

    shard = activations_dir(copy, 3) / "shard_00000.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard_00000\.npy is damaged .* Rerun notebook 02"):
        LayerStore(copy, 3)
    run_notebook(notebook("02"), copy, smoke=False, params=BASE_02, offline=True)
    fixed, want = LayerStore(copy, 3), LayerStore(base, 3)
    assert sorted(fixed.completion_ids) == sorted(want.completion_ids)
    assert all((fixed.tokens_of(c) == want.tokens_of(c)).all() for c in want.completion_ids)


@pytest.fixture(scope="module")
def explored(base, tmp_path_factory) -> Path:
    """The base run with notebook 06 run on it (smoke mode: the one SAE)."""
    run_dir = tmp_path_factory.mktemp("explored") / "run"
    shutil.copytree(base, run_dir)
    run_notebook(notebook("06"), run_dir, smoke=True)
    return run_dir


def test_06_with_other_explorer_settings_stops_before_writing(explored, tmp_path):
    """Notebook 06 rerun with another N_TOP: before issue 21 the SAE's explorer data were silently rebuilt.
    Now it stops before writing anything (a killed write's temp file included: it goes only when the stage
    goes on), naming the difference and the choices. OVERWRITE (the old explorer moved to replaced/, which
    nothing reads) is tested on build_explorer in tests/explore/test_site.py, set_aside in
    tests/test_replaced_and_temps.py."""
    copy = tmp_path / "run"
    shutil.copytree(explored, copy)
    (done,) = copy.glob("explorer/data/*/complete.json")
    (done.parent / ".table.js.k2j3h4g5.tmp").write_bytes(b"half")
    before = digest(copy)
    msg = stops("06", copy, {"N_TOP": 3})
    assert "stage 06_explore_features of " in msg and "config.n_top: 8 → 3" in msg, msg
    assert "nothing was written" in msg and "RUN_NAME" in msg and "OVERWRITE = True" in msg, msg
    assert "replaced/" in msg and "ADD_TO_RUN" not in msg, msg
    assert digest(copy) == before, "the run folder must not change"
