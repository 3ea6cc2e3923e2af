"""An ipywidgets tree driven without a browser: every widget under a box, and the ones of a class."""

from __future__ import annotations


def widgets_of(box) -> list:
    """`box` and every widget below it, depth first."""
    out = [box]
    for child in getattr(box, "children", ()):
        out += widgets_of(child)
    return out


def find(box, cls: str, description: str | None = None) -> list:
    """The widgets under `box` of class name `cls` (and `description`, when given), in tree order."""
    return [
        w
        for w in widgets_of(box)
        if type(w).__name__ == cls and description in (None, getattr(w, "description", None))
    ]
