"""The GPU check's parts that can break without a GPU: the carried wheels cover what its steps import on
the device image (scripts/gpu_wheels.py), and the runner keeps its deadline, skips and kills steps and
leaves a readable JSON after each (scripts/gpu_check.py)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import sys
from pathlib import Path

from packaging.requirements import Requirement

from scripts import gpu_check, gpu_wheels

ROOT = Path(__file__).resolve().parents[2]
OURS = ("helpers", "bench", "tests", "scripts")
CARRIED_OR_THERE = gpu_wheels.DEVICE_IMAGE | {gpu_wheels.canonical(w) for w in gpu_wheels.WHEELS}


def module_path(name: str) -> Path | None:
    """The file of one of our modules (`helpers.analysis.probes`), a package's __init__.py included."""
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def import_time_imports(path: Path, name: str) -> set[str]:
    """Modules `path` imports when it is imported: statements outside function bodies and outside
    `if TYPE_CHECKING:` (imports inside functions run later, if at all: the rehearsal covers those)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                walk(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)  # submodules imported by name
            walk(ast.iter_child_nodes(node))

    walk(ast.parse(path.read_text()).body)
    return found


def third_party_of(entries: list[str]) -> set[str]:
    """Top-level third-party modules that importing `entries` (our modules) imports, our packages'
    __init__ files and whatever they import followed through."""
    seen, todo, outside = set(), list(entries), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            mod = ".".join(parts[:i])
            if mod in seen:
                continue
            seen.add(mod)
            if parts[0] not in OURS:
                if parts[0] not in sys.stdlib_module_names and parts[0] != "__future__":
                    outside.add(parts[0])
                break
            path = module_path(mod)
            if path is not None:
                todo.extend(import_time_imports(path, mod))
    return outside


def device_step_entries() -> list[str]:
    """Our modules the GPU plan's steps start from, for the steps that can run on the device image."""
    entries = ["tests.conftest"]  # pytest imports it before the test file
    for step in gpu_check.STEPS:
        if not step.gpu or step.needs in ("offline_model", "sae_lens"):
            continue
        script = next(a for a in step.cmd.split() if a.endswith(".py"))
        entries.append(script.removesuffix(".py").replace("/", "."))
    return entries


def test_the_carried_wheels_cover_what_the_device_steps_import():
    entries = device_step_entries()
    assert {"bench.probe_cost", "bench.explorer", "bench.device_stats"} <= set(entries)
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for top in sorted(third_party_of(entries)):
        names = {gpu_wheels.canonical(d) for d in dists.get(top, [])}
        assert names, f"{top} is imported by the GPU check's steps but installed by no distribution here"
        if not names & CARRIED_OR_THERE:
            missing[top] = sorted(names)
    assert not missing, (
        f"the device image lacks {missing}: add the distributions to scripts/gpu_wheels.py WHEELS"
    )


def test_the_walk_sees_pydantic_through_the_package():
    # the one package the device lacks reaches the steps only through helpers' own modules
    assert "pydantic" in third_party_of(["bench.probe_cost"])
    assert "pydantic" not in gpu_wheels.DEVICE_IMAGE


def test_each_carried_wheel_finds_its_requirements_on_the_device():
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "extra": ""}
    for name in gpu_wheels.WHEELS:
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            assert gpu_wheels.canonical(req.name) in CARRIED_OR_THERE, (
                f"{name} requires {req.name}, which neither the device image nor WHEELS holds"
            )


def test_the_runner_records_ok_skipped_and_timed_out_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESERVE_S", 0)
    started = gpu_check.time.time()
    check = gpu_check.Check(tmp_path / "out", tmp_path / "work", tmp_path, budget_s=30, started=started)
    (tmp_path / "out").mkdir()
    steps = [
        gpu_check.Step(
            "fine", 1, "-c 'import json; print(json.dumps(dict(x=1)))'", estimate_s=0, timeout_s=20
        ),
        gpu_check.Step("slow", 1, "-c 'import time; time.sleep(60)'", estimate_s=0, timeout_s=0.3),
        gpu_check.Step("broken", 1, "-c 'raise SystemExit(3)'", estimate_s=0, timeout_s=20),
        gpu_check.Step("too_big", 2, "-c pass", estimate_s=10_000, timeout_s=20),
        gpu_check.Step("no_model", 5, "-c pass", estimate_s=0, timeout_s=20, needs="smollm2_random"),
    ]
    for step in steps:
        check.run(step, "cpu")
        # after every step the JSON on disk is whole and holds it
        assert step.name in json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    check.finish()
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    got = report["steps"]
    assert got["fine"]["status"] == "ok" and got["fine"]["result"] == {"x": 1}
    assert got["slow"]["status"] == "timed out" and got["slow"]["seconds"] < 5
    assert got["broken"]["status"] == "failed (3)"
    assert got["too_big"]["status"] == "skipped" and "needs about 10000 s" in got["too_big"]["reason"]
    assert got["no_model"]["status"] == "skipped" and "smollm2_random" in got["no_model"]["reason"]
    assert report["finished"] and not report["ok"]
    assert report["summary"] == {"failed (3)": 1, "ok": 1, "skipped": 2, "timed out": 1}
    assert (tmp_path / "out" / "gpu_check_logs.tar.gz").stat().st_size > 0
