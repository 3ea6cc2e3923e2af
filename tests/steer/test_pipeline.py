"""Notebook 05's choice of features to steer (replicated ones first) and its comparison with controls
as a table and a figure instead of one near-identical sentence per (condition, control)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import plots
from helpers.model.hooks import hook_name
from helpers.saes import TopKSAE
from helpers.saes.io import save_sae
from helpers.steer.pipeline import compare_to_controls, comparison_table, steering_targets
from helpers.tables import format_table
from tests.steer.test_directions import control_rows, fake_row

SAE_ID = "tiny_topk_L1_mixed"


def run_with_features(root, q_values):
    """A run folder with one SAE and notebook 04's feature rows: rank r has held-out q q_values[r]."""
    save_sae(
        TopKSAE(32, 48, l0=4, seed=2), root / "saes" / SAE_ID, hook_name=hook_name(1), model_name="tiny-llama"
    )
    rows = [
        {"feature": 40 - r, "rank": r + 1, "cohens_d": 1.0 - 0.1 * r, **({} if q is None else {"q_value": q})}
        for r, q in enumerate(q_values)
    ]
    (root / "features").mkdir()
    (root / "features" / f"{SAE_ID}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_replicated_features_are_steered_first(tiny, tmp_path, capsys):
    run = run_with_features(tmp_path, [0.3, 0.02, 0.6, 0.01, 0.07])
    _, top = steering_targets(run, tiny, n_features=3)
    assert [r["rank"] for r in top] == [2, 4, 1], (
        "the replicated (q < 0.05) by rank, then the best of the rest"
    )
    assert [r["replicated"] for r in top] == [True, True, False]
    out = capsys.readouterr().out
    assert "2 of 5 analysed features replicated on the held-out half (q < 0.05)" in out
    assert "steering 2 of them first, then 1 that did not" in out
    _, top = steering_targets(run, tiny, n_features=2, alpha=0.015)
    assert [r["rank"] for r in top] == [4, 1]


def test_steering_says_so_when_no_feature_replicated(tiny, tmp_path, capsys):
    run = run_with_features(tmp_path, [0.3, 0.2, 0.6])
    _, top = steering_targets(run, tiny, n_features=2)
    assert [r["rank"] for r in top] == [1, 2] and not any(r["replicated"] for r in top)
    assert "no feature replicated on the held-out half (every q >= 0.05)" in capsys.readouterr().out
    old = run_with_features(tmp_path / "old", [None, None])
    steering_targets(old, tiny, n_features=2)
    assert "no held-out q-values (an older run: rerun notebook 04)" in capsys.readouterr().out


def results():
    return compare_to_controls([*control_rows(), fake_row("mixed", "feature", [1] * 8, ambiguous=1)])


def test_comparison_table_has_a_row_per_condition_and_says_shared_things_once():
    res = results()
    rows, notes = comparison_table(res)
    assert [r["condition"] for r in rows] == ["strong", "null", "mixed"]
    strong, null, mixed = rows
    by = {(o["condition"], o["control"]): o for o in res}
    o = by["strong", "none"]
    lo, hi = (100 * x for x in o["difference_ci"])
    assert strong["vs no steering"] == f"+100 [{lo:+.0f}, {hi:+.0f}] q={o['q_value']:.2g}*"
    assert (
        strong["verdict"] == "raises the rate beyond every control" and strong["flags"] == "much less fluent"
    )
    assert null["verdict"] == "no detectable effect" and "*" not in null["vs random features"]
    n_mixed = sum(by["mixed", c]["q_value"] < 0.05 for c in ("none", "random_feature", "random_direction"))
    assert 0 < n_mixed < 3 and mixed["verdict"] == f"raises the rate vs {n_mixed} of 3 controls only"
    assert mixed["flags"] == "ambiguous answers +25 pts (not honest)"
    n_sig = sum(o["q_value"] < 0.05 for o in res)
    assert notes[0].startswith(f"{n_sig} of 9 comparisons at q < 0.05")
    assert notes[1] == "sample: 8 scenarios x 4 samples per prompt" and "offline rules" in notes[-1]
    text = format_table(rows) + "\n" + "\n".join(notes)
    assert len(text) < 0.6 * len("\n".join(o["verdict"] for o in res)), (
        "shorter than the sentences it replaces"
    )
    few = compare_to_controls([fake_row("none", "none", [0, 0, 0]), fake_row("f", "feature", [4, 4, 4])])
    assert any("with 3 scenarios no test can reach p < 0.05" in n for n in comparison_table(few)[1])
    assert comparison_table([]) == ([], [])


def test_control_comparison_figure(tmp_path):
    res = results()
    fig = plots.control_comparison_figure(res)
    assert [t.name for t in fig.data] == ["vs none", "vs random feature", "vs random direction"]
    first = fig.data[0]
    assert list(first.y) == ["strong", "null", "mixed"] and list(first.x) == [
        100 * o["difference"] for o in res[::3]
    ]
    assert np.allclose(first.x + first.error_x.array, [100 * o["difference_ci"][1] for o in res[::3]])
    assert list(first.marker.symbol) == ["circle" if o["q_value"] < 0.05 else "circle-open" for o in res[::3]]
    static = plots.static_figure(fig)
    assert [t.get_text() for t in static.axes[0].get_yticklabels()] == ["mixed", "null", "strong"]
    with pytest.raises(plots.MissingInput, match="notebook 05"):
        plots.control_comparison_figure([])
