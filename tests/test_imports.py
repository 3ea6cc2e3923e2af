"""The package's import graph: one way (core <- model <- collect <- saes <- analysis <- steer), no cycles,
no function-level imports of our own modules (the usual way of hiding a cycle). Read from the source with
`ast`, so the check sees every import, including those inside functions and `TYPE_CHECKING` blocks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "helpers"
STAGES = ("core", "model", "collect", "saes", "analysis", "steer", "explore", "sweep")
CORE_ORDER = ("release", "env", "run", "plan", "stats", "tables", "gemini", "plots", "publish")
"""Within the core, a module may import only those before it."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def stage_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else "core"


def imports_of(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported helpers module, line, at module level) for every import of our own modules."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks count as function-level: a hidden edge
        if isinstance(node, ast.If):
            top -= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "helpers":
            assert node.level == 0
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append((full if full in known else node.module, node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}:{node.lineno}: relative import; write `from helpers.... import ...`")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "helpers":
                    out.append((alias.name, node.lineno, id(node) in top))
    return out


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) for m, p in mods.items()}


STEP_MODULES = {
    "collect": "helpers.collect.pipeline",  # notebook 02
    "saes": "helpers.saes.pipeline",  # notebook 03
    "analysis": "helpers.analysis.pipeline",  # notebook 04
    "steer": "helpers.steer.pipeline",  # notebook 05
    "explore": "helpers.explore.pipeline",  # notebook 06
    "sweep": "helpers.sweep.pipeline",  # notebook 07
}
"""The module holding each stage's notebook steps. Notebook 01 has none: its loader, model/load.py, is a
library every later stage uses."""
RUN_EVERY_STAGE = {"helpers", "helpers.sweep.pipeline"}
"""The package (it re-exports the notebooks' names) and the sweep, which runs notebooks 02-04 per model."""


def rank(mod: str) -> tuple[int, int]:
    stage = stage_of(mod)
    if stage != "core":
        return (STAGES.index(stage), 0)
    name = mod.split(".")[1] if "." in mod else "release"
    return (0, CORE_ORDER.index(name) if name in CORE_ORDER else -1)


def test_every_core_module_is_placed():
    core = sorted(m for m in modules() if stage_of(m) == "core" and m != "helpers")
    assert core == sorted(f"helpers.{n}" for n in CORE_ORDER), (
        "a new core module must be given its place in CORE_ORDER (or belong to a stage subpackage)"
    )


def test_imports_run_one_way():
    wrong = []
    for mod, edges in graph().items():
        if mod == "helpers":  # the package re-exports the notebooks' names: it sits on top of everything
            continue
        for target, line, _ in edges:
            same_package = target.rsplit(".", 1)[0] == mod.rsplit(".", 1)[0] and stage_of(mod) != "core"
            if target == "helpers" or (not same_package and rank(target) > rank(mod)):
                wrong.append(f"{mod} (line {line}) imports {target}")
    assert not wrong, (
        "imports against the direction core <- model <- collect <- saes <- analysis <- steer <- explore:\n"
        + "\n".join(wrong)
    )


def test_step_modules_are_imported_only_by_their_own_stage():
    """A stage's step module is what its notebook runs, never a library of another stage: what another
    stage needs (a reader, an id, a tokenizer) lives in a library module it can import instead."""
    assert set(STEP_MODULES.values()) <= set(modules())
    wrong = [
        f"{mod} (line {line}) imports {target}, the step module of {stage}"
        for mod, edges in graph().items()
        for target, line, _ in edges
        for stage, step in STEP_MODULES.items()
        if (target == step or target.startswith(step + "."))
        and stage_of(mod) != stage
        and mod not in RUN_EVERY_STAGE
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    full = graph()
    g = {m: {t for t, _, _ in edges if t in full} for m, edges in full.items() if m != "helpers"}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t) :] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_no_function_level_imports_of_our_modules():
    hidden = [
        f"{m} line {line} imports {t}" for m, edges in graph().items() for t, line, top in edges if not top
    ]
    assert not hidden, "imports of our own modules inside functions or TYPE_CHECKING blocks:\n" + "\n".join(
        hidden
    )
