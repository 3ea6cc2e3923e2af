"""What OVERWRITE replaces is kept (`run.set_aside`: moved to `replaced/`, read by nothing), and the temp
files of killed atomic writes are removed when their stage starts again (`run.remove_stale_temps`, called
by `check_stage_settings`), without touching anything else; no reader of the package globs them (issue 21).
Notebook 06's OVERWRITE through the runner is in tests/test_resume.py."""

from __future__ import annotations

import ast
import fnmatch
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import helpers.run as run_module
from helpers.collect.corpus import CorpusSettings, _check_settings
from helpers.collect.store import ActivationWriter
from helpers.env import NotebookError
from helpers.publish import zip_run
from helpers.run import (
    REPLACED,
    SHARED_TEMP_AGE_S,
    check_stage_settings,
    is_temp_name,
    read_run_json,
    remove_stale_temps,
    set_aside,
)

ROOT = Path(__file__).resolve().parents[1]
FILTERED = {
    ("documents.py", "*"): "a user's corpus folder, kept only for known text suffixes",
    ("publish.py", "*"): "zip_run leaves out names ending in .tmp",
    ("hub.py", "*"): "folders holding cfg.json; explorer_files leaves out names ending in .tmp",
    ("run.py", "*"): "remove_stale_temps: only the times of what a temp folder holds",
}
"""Broad globs that filter what they find so that no temp file gets through (checked by reading them)."""


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_set_aside_moves_what_overwrite_replaces_and_nothing_reads_it(tmp_path, capsys):
    run = tmp_path / "run"
    for rel, text in {
        "completions.jsonl": "{}\n",
        "activations/layer_3/shard_00000.npy": "a",
        "pooled/layer_3.safetensors": "p",
        "saes/x/cfg.json": "{}",
    }.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    before = _files(run)
    dest = set_aside(
        run, "02_collect_activations", [run / "completions.jsonl", run / "activations", run / "nope"]
    )
    assert dest.parent == run / REPLACED and dest.name.startswith("02_collect_activations-")
    assert str(dest) in capsys.readouterr().out
    assert _files(dest) == {k: v for k, v in before.items() if k.startswith(("completions", "activations"))}
    assert not (run / "activations").exists() and (run / "pooled/layer_3.safetensors").exists()
    (run / "completions.jsonl").write_text("new\n")
    again = set_aside(run, "02_collect_activations", [run / "completions.jsonl"])  # same second: a new folder
    assert again != dest and (again / "completions.jsonl").read_text() == "new\n"
    assert (dest / "completions.jsonl").read_text() == "{}\n", "an earlier backup is never overwritten"
    events = [e for e in read_run_json(run)["history"] if e.get("event") == "replaced"]
    assert [e["to"] for e in events] == [f"{REPLACED}/{dest.name}", f"{REPLACED}/{again.name}"]
    # readers: the zip leaves replaced/ out; nothing else looks outside its own folders
    archive = zip_run(run, out=tmp_path / "run.zip")
    with zipfile.ZipFile(archive) as zf:
        assert (
            not [n for n in zf.namelist() if f"/{REPLACED}/" in n] and "run/saes/x/cfg.json" in zf.namelist()
        )
    assert set_aside(run, "02_collect_activations", [run / "activations"]) is None, "nothing there: no folder"
    with pytest.raises(ValueError):
        set_aside(run, "05", [tmp_path / "elsewhere.txt"])
    with pytest.raises(ValueError, match="replaced/"):
        set_aside(run, "05", [dest])


def test_opting_out_deletes_instead(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    (run / "explorer").mkdir(parents=True)
    (run / "explorer" / "index.html").write_text("x")
    (run / "steering.jsonl").write_text("{}\n")
    assert set_aside(run, "06_explore_features", [run / "explorer"], keep=False) is None
    monkeypatch.setenv("KEEP_REPLACED", "0")
    assert set_aside(run, "05_plot_and_steer", [run / "steering.jsonl"]) is None
    assert "deleted steering.jsonl" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["run.json"] and not (run / REPLACED).exists()


def _killed_write(target: Path) -> None:
    """atomic_write_bytes killed between its write and its rename: a forked child whose os.replace is
    os._exit (no cleanup runs, as after kill -9)."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            run_module.os.replace = lambda *a: os._exit(9)
            run_module.atomic_write_bytes(target, b"half")
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9


def test_stale_temps_go_when_their_stage_starts_again_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    page = run / "explorer" / "data" / "sae_a" / "pages_0000.js"
    _killed_write(page)
    (left,) = page.parent.iterdir()
    assert is_temp_name(left.name) and left.name.startswith(".pages_0000.js.")
    own = [left]
    (run / "neuronpedia").mkdir()
    own.append(run / "neuronpedia" / ".batch.jsonl.k2j3h4g5.tmp")
    shared_old, shared_new = run / ".run.json.a_b4c9z1.tmp", run / ".probes.json.0a1b2c3d.tmp"
    figure_old = run / "figures" / ".f.png.abcdefgh.tmp"
    (run / "figures").mkdir()
    keep = [
        shared_new,  # another stage may be writing it now
        run / "saes" / "x" / ".sae_weights.safetensors.abcdefgh.tmp",  # another stage's folder
        run / "explorer" / ".notes.tmp",  # not our pattern
        run / "explorer" / "data.tmp",
        run / "explorer" / ".index.html.TOOLONG99.tmp",
        run / "explorer" / "keep.js",
    ]
    for path in [*own[1:], shared_old, figure_old, *keep]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (run / "explorer" / ".dir.abcdefgh.tmp").mkdir()  # a folder named like one: not a temp file
    old = time.time() - SHARED_TEMP_AGE_S - 5
    for path in (shared_old, figure_old):
        os.utime(path, (old, old))
    assert check_stage_settings(run, "06_explore_features", {"n_top": 8}) == "new"
    for path in [*own, shared_old, figure_old]:
        assert not path.exists(), path
    for path in [*keep, run / "explorer" / ".dir.abcdefgh.tmp"]:
        assert path.exists(), path
    _killed_write(page)  # killed again, then resumed with the same settings: removed again
    assert check_stage_settings(run, "06_explore_features", {"n_top": 8}) == "same"
    assert sorted(p.name for p in page.parent.iterdir()) == []
    assert remove_stale_temps(run, "02_collect_activations") == [], "none in that stage's folders"


def _killed_directory_write(target: Path) -> Path:
    """run.atomic_directory killed while its folder is filled (os._exit: no cleanup runs, as after
    kill -9); returns the temp folder it left."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            with run_module.atomic_directory(target) as tmp:
                (tmp / "sub").mkdir()
                (tmp / "sub" / "half.json").write_text("{")
                os._exit(9)
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9
    (left,) = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-")]
    return left


def test_killed_atomic_directories_go_with_the_same_age_rule(tmp_path):
    """An interrupted atomic_directory leaves `.{name}.tmp-XXXXXXXX`: removed at once in a folder only
    the stage writes, in the run folder itself only once nothing in it changed for SHARED_TEMP_AGE_S."""
    run = tmp_path / "run"
    own = _killed_directory_write(run / "explorer" / "data")
    shared_new = _killed_directory_write(run / "hub_dry_run")
    shared_old = _killed_directory_write(run / "old_dry_run")
    old = time.time() - SHARED_TEMP_AGE_S - 5
    for path in (shared_old, *shared_old.rglob("*")):
        os.utime(path, (old, old))
    os.utime(shared_new, (old, old))  # the folder is old, what is in it is new: someone is filling it
    keep = [run / "explorer" / ".data.tmp-NOTHEX99", run / ".notes.tmp-abcdef12"]
    keep[0].mkdir()
    keep[1].write_text("a file named like a temp folder")
    os.utime(keep[1], (old, old))
    removed = remove_stale_temps(run, "06_explore_features")
    assert sorted(removed) == sorted([own, shared_old])
    assert not own.exists() and not shared_old.exists()
    assert shared_new.is_dir() and all(p.exists() for p in keep)
    assert remove_stale_temps(run, "02_collect_activations") == [], "young shared ones stay for any stage"
    assert not (run / "explorer" / "data").exists() and not (run / "hub_dry_run").exists()


def _glob_patterns() -> list[tuple[str, str]]:
    """(file, pattern) of every .glob / .rglob / fnmatch call with a literal (or f-string) pattern in
    helpers/ (an f-string's fields read as 'x')."""
    found = []
    for path in sorted((ROOT / "helpers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                continue
            if node.func.attr not in ("glob", "rglob", "iglob"):
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((path.name, arg.value))
            elif isinstance(arg, ast.JoinedStr):
                parts = [v.value if isinstance(v, ast.Constant) else "x" for v in arg.values]
                found.append((path.name, "".join(parts)))
    return found


def test_no_reader_globs_temp_files():
    """A pattern that matches a file would also match that file's temp (`.{name}.XXXXXXXX.tmp`) only if
    it could start with '.' and end in '.tmp': none of the package's does."""
    patterns = _glob_patterns()
    assert len(patterns) > 20, "the scan finds the package's globs"
    offending = []
    for where, pattern in patterns:
        last = pattern.rsplit("/", 1)[-1]
        name = last.replace("*", "a").replace("?", "a")
        if last in (".*.tmp", ".*.tmp-*") or (where, pattern) in FILTERED:  # remove_stale_temps' searches
            continue
        if fnmatch.fnmatchcase(f".{name}.abcdefgh.tmp", last):
            offending.append((where, pattern))
    assert not offending, (
        f"these globs would read a killed write's temp file: {offending}; make them name what they read, or "
        "filter temp names (run.is_temp_name) and add them to FILTERED"
    )


def test_corpus_overwrite_keeps_the_old_corpus(tmp_path, capsys):
    """Notebook 02's corpus step with OVERWRITE: the corpus of the old settings goes to replaced/ (was:
    deleted); without OVERWRITE the run folder is left as it was."""
    run = tmp_path / "run"
    with ActivationWriter(run, 3, shard_tokens=8, kind="corpus") as w:
        w.add("doc0", np.ones((5, 4), np.float32))
    stored = _files(run / "corpus")
    old = CorpusSettings("builtin:wiki", None, 128, 0, 1000)
    _check_settings(run, old, [3], overwrite=False)  # recorded
    before = _files(run)
    new = CorpusSettings("builtin:wiki", None, 256, 0, 1000)
    with pytest.raises(NotebookError, match="seq_len: 128 → 256"):
        _check_settings(run, new, [3], overwrite=False)
    assert _files(run) == before
    _check_settings(run, new, [3], overwrite=True)
    (kept,) = (run / REPLACED).iterdir()
    assert _files(kept / "corpus") == stored
    assert not (run / "corpus").exists() and str(kept) in capsys.readouterr().out
