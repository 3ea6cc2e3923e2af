"""completions.jsonl: append survives a torn write, atomic rewrite, label tables, training conditions."""

from __future__ import annotations

import pytest

from helpers.collect import completions as C
from helpers.run import completions_path


def rec(i: int, label: str | None, group: str = "g1") -> dict:
    return {"id": f"p{i}#0", "prompt_id": f"p{i}", "group": group, "completion": f"text {i}", "label": label}


def test_append_read_and_torn_tail(tmp_path, capsys):
    C.append_completions(tmp_path, [rec(0, None), rec(1, None)])
    with open(completions_path(tmp_path), "a") as f:
        f.write('{"id": "p2#0", "comp')  # a disconnect in the middle of a line
    assert [r["id"] for r in C.read_completions(tmp_path)] == ["p0#0", "p1#0"]
    assert "torn last line" in capsys.readouterr().out
    C.append_completions(tmp_path, [rec(2, None)])
    assert [r["id"] for r in C.read_completions(tmp_path)] == ["p0#0", "p1#0", "p2#0"]


def test_a_whole_last_record_killed_before_its_newline_is_kept_by_the_next_append(tmp_path):
    C.append_completions(tmp_path, [rec(0, None)])
    with open(completions_path(tmp_path), "a") as f:
        f.write('{"id": "p1#0", "completion": "whole"}')  # killed between the `}` and the newline
    assert [r["id"] for r in C.read_completions(tmp_path)] == ["p0#0", "p1#0"]  # read as done...
    C.append_completions(tmp_path, [rec(2, None)])
    assert [r["id"] for r in C.read_completions(tmp_path)] == ["p0#0", "p1#0", "p2#0"]  # ...and kept


def test_corrupt_middle_line_and_duplicates_are_errors(tmp_path):
    completions_path(tmp_path).write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        C.read_completions(tmp_path)
    completions_path(tmp_path).write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(ValueError, match="duplicate completion ids"):
        C.read_completions(tmp_path)


def test_rewrite_and_label_table(tmp_path):
    records = [rec(0, "honest"), rec(1, "deceptive"), rec(2, "ambiguous", "g2"), rec(3, None, "g2")]
    C.write_completions(tmp_path, records)
    assert C.read_completions(tmp_path) == records
    table = C.label_table(records)
    assert table[0] == {
        "group": "g1",
        "honest": 1,
        "deceptive": 1,
        "ambiguous": 0,
        "unlabelled": 0,
        "total": 2,
    }
    assert table[-1] == {
        "group": "ALL",
        "honest": 1,
        "deceptive": 1,
        "ambiguous": 1,
        "unlabelled": 1,
        "total": 4,
    }


def test_conditions():
    records = [rec(0, "honest"), rec(1, "deceptive"), rec(2, "ambiguous"), rec(3, None)]
    assert C.ids_for_condition(records, "mixed") == ["p0#0", "p1#0"]
    assert C.ids_for_condition(records, "deceptive_only") == ["p1#0"]
    assert C.ids_for_condition(records, "honest_only") == ["p0#0"]
    with pytest.raises(ValueError, match="deceptive_only"):
        C.ids_for_condition(records, "lies")


def test_label_balance_shows_the_one_sided_groups_and_counts_the_rest():
    from helpers.collect.pipeline import label_balance

    records = [rec(i, "honest" if i % 2 else "deceptive", f"g{i // 2:02d}") for i in range(80)]
    records += [rec(100 + i, "honest", "g99") for i in range(3)]  # one group with no deceptive answer
    lines = label_balance(records, max_rows=5).splitlines()
    assert len(lines) == 1 + 5 + 2, "header, 5 groups, the '(more)' line and ALL"
    assert any(line.startswith("g99 ") for line in lines), "the one-sided group is among those shown"
    more = lines[-2].split()
    assert more[:2] == ["(36", "more)"] and more[-1] == str(83 - 3 - 4 * 2)
    assert lines[-1].split()[:3] == ["ALL", "43", "40"]
    assert len(label_balance(records, max_rows=41).splitlines()) == 1 + 41 + 1, "all shown when they fit"
