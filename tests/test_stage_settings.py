"""check_stage_settings on a run folder from before settings were recorded (`legacy`): the same values
resume (was: a NotebookError listing no difference), others stop naming each difference."""

from __future__ import annotations

import pytest

from helpers.env import NotebookError
from helpers.run import check_stage_settings, read_run_json


def test_legacy_settings_equal_resume_and_get_recorded(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert check_stage_settings(run, "06_explore_features", {"n_top": 8}, legacy={"n_top": 8}) == "same"
    assert read_run_json(run)["settings"]["06_explore_features"]["values"] == {"n_top": 8}
    assert check_stage_settings(run, "06_explore_features", {"n_top": 8}) == "same"


def test_legacy_settings_that_differ_stop_naming_the_difference(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(NotebookError, match="n_top: 8 → 3"):
        check_stage_settings(run, "06_explore_features", {"n_top": 3}, legacy={"n_top": 8})
    assert not (run / "run.json").exists(), "nothing written"
