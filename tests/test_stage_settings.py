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


def test_the_stage_rules_shape_the_refusal_and_an_unknown_rule_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rules = dict(addable=("layers",), overwrite_does="move the layers to replaced/")
    assert check_stage_settings(run, "02_x", {"layers": [3]}, **rules) == "new"
    assert check_stage_settings(run, "02_x", {"layers": [3, 6]}, add=True, **rules) == "add"
    with pytest.raises(NotebookError, match="OVERWRITE = True: move the layers to replaced/") as err:
        check_stage_settings(run, "02_x", {"layers": [9]}, **rules)
    assert "ADD_TO_RUN" not in str(err.value), "[3, 6] -> [9] drops layers: not an addition"
    with pytest.raises(TypeError, match=r"\['adable'\]: the stage rules are \['addable', 'overwrite_does'\]"):
        check_stage_settings(run, "02_x", {"layers": [9]}, adable=("layers",))
    assert read_run_json(run)["settings"]["02_x"]["values"] == {"layers": [3, 6]}, "nothing written"
