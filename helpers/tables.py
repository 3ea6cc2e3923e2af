"""Plain-text tables for notebook output: the one formatter every stage's summary goes through.

Colab shows a cell's printed text in a monospace font, so an aligned text table reads well there, in a
downloaded notebook and in a terminal alike. Floats get 3 significant figures, None shows as "-",
and list/dict values (CIs, nested stats) are left out unless `columns` names them. `value_ci` writes a
value with its interval wherever one is shown (tables, the model card, the explorer's pages).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MISSING = "-"
"""How a missing value reads, in a table cell and in `value_ci`."""


def _missing(v: Any) -> bool:
    return v is None or v != v  # NaN is the one value not equal to itself


def value_ci(value: Any, ci: Sequence[Any] | None = None, spec: str = ".2f") -> str:
    """'0.83 [0.71, 0.92]': `value` and its interval `ci` (lo, hi), both in format `spec`. A missing value
    (None or NaN) reads as MISSING; a missing interval, or one with a missing end, is left out."""
    if _missing(value):
        return MISSING
    if not ci or len(ci) != 2 or any(_missing(b) for b in ci):
        return format(value, spec)
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def cell(v: Any, digits: int = 3) -> str:
    """How one value reads in a table: floats to `digits` significant figures, None as MISSING."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(x, float | int) for x in v):
        return f"[{cell(v[0], digits)}, {cell(v[1], digits)}]"
    return str(v)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, digits: int = 3
) -> str:
    """An aligned text table of dict rows. `columns` picks and orders the keys (default: the first
    row's keys with scalar values); a missing value shows as '-'."""
    if not rows:
        return "(empty)"
    keys = list(columns) if columns else [k for k, v in rows[0].items() if not isinstance(v, dict | list)]
    text = [[cell(r.get(k), digits) for k in keys] for r in rows]
    widths = [max(len(str(k)), *(len(t[i]) for t in text)) for i, k in enumerate(keys)]
    lines = ["  ".join(str(k).ljust(w) for k, w in zip(keys, widths, strict=True)).rstrip()]
    lines += ["  ".join(t.ljust(w) for t, w in zip(ts, widths, strict=True)).rstrip() for ts in text]
    return "\n".join(lines)
