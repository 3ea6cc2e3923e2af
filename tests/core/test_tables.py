"""The one text formatter of a value with its confidence interval, and the missing-value glyph it shares
with the table cells."""

from __future__ import annotations

import numpy as np

from helpers.tables import MISSING, cell, format_table, value_ci


def test_value_ci_writes_the_interval_in_the_values_format():
    assert value_ci(0.8312, (0.7049, 0.9151)) == "0.83 [0.70, 0.92]"
    assert value_ci(np.float32(0.25), [np.float64(-0.5), 1], "+.2f") == "+0.25 [-0.50, +1.00]"


def test_a_missing_value_or_interval_end_reads_the_same_everywhere():
    assert MISSING == cell(None) == "-"
    assert value_ci(None, (0.1, 0.2)) == value_ci(float("nan")) == value_ci(np.float32("nan")) == MISSING
    for ci in (None, (), (None, 0.9), [0.1, float("nan")], (0.1,)):
        assert value_ci(0.5, ci) == "0.50", ci
    assert format_table([{"a": None, "b": 1.0}]).splitlines()[1].split() == [MISSING, "1"]
