"""bench/planner.py --replay: an earlier bench JSON's scored steps predicted again from its fit runs by this
tree's planner (lines fitted on the runs as measured while no load rate is fitted)."""

from __future__ import annotations

import pytest

from bench.planner import replay


def test_replay_predicts_the_scored_steps_again_from_the_fit_runs():
    fit_runs = [
        {"counted": 1.0, "seconds": 5.0, "cpu_seconds": 6.0, "others": 0.3, "threads": 2.0},
        {"counted": 4.0, "seconds": 11.0, "cpu_seconds": 12.0, "others": 0.5, "threads": 2.0},
    ]
    row = {"size": "smoke", "step": "probes", "counted_s": 2.0, "measured_s": 8.4, "measured_cpu_s": 8.0}
    earlier = {
        "command": "python bench/planner.py",
        "lines": {"probes": {"runs": fit_runs}},
        "rows": [row | {"others_running_planned": 0.4, "time_ratio": 1.5, "cpu_time_ratio": 1.4}],
        "time_within_30pct": "0/1",
    }
    out = replay(earlier)
    (got,) = out["rows"]
    # The lines through the fit runs as measured: 3 + 2 x counted (wall), 4 + 2 x counted (CPU time).
    assert got["time_ratio"] == pytest.approx(8.4 / 7.0, abs=1e-3) and got["time_within_30pct"]
    assert got["cpu_time_ratio"] == pytest.approx(1.0, abs=1e-3) and got["time_ratio_then"] == 1.5
    assert out["time_within_30pct"] == "1/1" and out["time_within_30pct_then"] == "0/1"
    assert out["replayed"] == "python bench/planner.py"
