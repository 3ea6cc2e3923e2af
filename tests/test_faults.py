"""Fault injection (issue 21): the notebooks' work (tests/fault_stages.py: notebook 02's sampling, labels,
capture and corpus, 03's SAE grid, 06's explorer pass) killed with SIGKILL at a seeded write point of
every stage, given a full disk, or left with a truncated shard, then rerun as Run all would: the run
folder must end as an uninterrupted run's does (the same completions, the same files with the same
bytes, SAE weights equal). Each run is a fresh process, as after a Colab disconnect.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from helpers.analysis.pipeline import ANALYSIS_STAGE
from helpers.collect.completions import read_completions
from helpers.collect.store import LayerStore
from helpers.run import activations_dir, read_run_json
from tests.fault_stages import LAYER, STAGES

ROOT = Path(__file__).resolve().parent.parent
SEED = 21
RUN = "run"
"""Every run folder of these tests has this name: records name their run folder (e.g. an SAE's
dataset_path)."""
VOLATILE = {"seconds", "tokens_per_second", "at", "updated_at", "built_at", "generated_at"}
"""Fields that hold wall-clock times: they differ between any two runs."""
TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")
"""The name of `run.atomic_write_bytes`'s temporary file (mkstemp's 8 characters): what a kill leaves."""
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def drive(run_dir: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "tests.fault_stages", str(run_dir), fault],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def counted(out: str) -> dict[str, int]:
    return json.loads(out.split("COUNTS ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, int], Path]:
    """An uninterrupted run, how many write points each stage has, and a copy of the run folder as it
    was before notebook 04 (for the notebook-level test). The run stops before 04, is copied, and goes
    on: the stages up to 03 are counted in the first part, the others in the second."""
    run_dir = tmp_path_factory.mktemp("reference") / RUN
    first = counted(ok(drive(run_dir, "count:analysis")))
    before_04 = tmp_path_factory.mktemp("before_04") / RUN
    shutil.copytree(run_dir, before_04)
    rest = counted(ok(drive(run_dir, "count")))
    counts = {s: first[s] if STAGES.index(s) < STAGES.index("analysis") else rest[s] for s in STAGES}
    assert all(counts[s] > 1 for s in STAGES), counts
    return run_dir, counts, before_04


def without_times(v):
    if isinstance(v, dict):
        return {k: without_times(x) for k, x in v.items() if k not in VOLATILE}
    if isinstance(v, list):
        return [without_times(x) for x in v]
    return v


def contents(run_dir: Path, *, skip_shards: bool = False) -> dict[str, str]:
    """Every file of the run folder: its sha256, or for a JSON file recording times its content without
    them (run.json: the stages and the settings; its history differs by design: it records the kills).
    Hidden temporaries of a killed write are left out (no reader opens them; listed by `temporaries`)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = str(p.relative_to(run_dir))
        if not p.is_file() or p.name.startswith(".") and p.name.endswith(".tmp"):
            continue
        if skip_shards and rel.startswith(("activations/", "pooled/")):
            continue
        if p.name == "run.json":
            run = json.loads(p.read_text())
            out[rel] = json.dumps(without_times({k: run.get(k) for k in ("stages", "settings", "layers")}))
        elif p.name == "complete.json":  # the explorer's resume record: file stamps hold modification times
            done = json.loads(p.read_text())
            out[rel] = json.dumps(
                without_times({k: v for k, v in done.items() if k != "settings"}), sort_keys=True
            )
        elif p.suffix == ".html" and rel.startswith("figures/"):  # plotly names its <div> with a uuid4
            out[rel] = hashlib.sha256(UUID.sub("UUID", p.read_text()).encode()).hexdigest()
        elif p.suffix == ".json" and ("saes/" in rel or "explorer/" in rel):
            out[rel] = json.dumps(without_times(json.loads(p.read_text())), sort_keys=True)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp"))


def assert_same_run(got: Path, want: Path, *, skip_shards: bool = False) -> None:
    assert read_completions(got) == read_completions(want), "the same completions, labels included"
    a, b = contents(got, skip_shards=skip_shards), contents(want, skip_shards=skip_shards)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, differ
    for weights in sorted(want.glob("saes/*/sae_weights.safetensors")):
        mine = load_file(got / weights.relative_to(want))
        theirs = load_file(weights)
        assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in theirs)


def test_a_kill_at_a_seeded_point_of_every_stage_resumes_to_the_uninterrupted_run(reference, tmp_path):
    want, counts, _ = reference
    rng = random.Random(SEED)
    points = {stage: rng.randint(1, counts[stage]) for stage in STAGES}
    got = tmp_path / RUN
    for stage in STAGES:  # each rerun resumes the stages before and is killed inside the next one
        proc = drive(got, f"kill:{stage}:{points[stage]}")
        assert proc.returncode == -9, (stage, points[stage], proc.stderr[-3000:])
    ok(drive(got))
    assert_same_run(got, want)
    left = temporaries(got)  # at most one per kill inside an atomic write; the reruns add none
    assert len(left) <= len(STAGES) and all(TEMP.fullmatch(Path(t).name) for t in left), left


def test_a_full_disk_stops_with_the_fix_and_the_rerun_completes_the_same_run(reference, tmp_path):
    want, counts, _ = reference
    rng = random.Random(SEED + 1)
    got = tmp_path / RUN
    for stage in ("collect", "train"):
        point = rng.randint(1, counts[stage])
        proc = drive(got, f"enospc:{stage}:{point}")
        assert proc.returncode == 28, (stage, point, proc.stderr[-3000:])
        said = proc.stderr.splitlines()[-1]
        assert "is full" in said and "GB free there" in said and "rerun this cell" in said, said
    ok(drive(got))
    assert_same_run(got, want)
    assert temporaries(got) == [], "a failed write removes its temporary file"


def test_a_truncated_shard_is_named_and_recollected_by_the_rerun(reference, tmp_path):
    want, _, _ = reference
    got = tmp_path / RUN
    shutil.copytree(want, got)
    shard = activations_dir(got, LAYER) / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a Drive sync cut short
    held = [e[0] for e in json.loads(shard.with_suffix(".json").read_text())["entries"]]
    with pytest.raises(ValueError, match=rf"shard_00001\.npy is damaged .*{held[0]}.*Rerun notebook 02"):
        LayerStore(got, LAYER)
    out = ok(drive(got))
    assert f"removed damaged shard_00001 of {activations_dir(got, LAYER)}" in out, out[-3000:]
    fixed, ref = LayerStore(got, LAYER), LayerStore(want, LAYER)
    assert sorted(fixed.completion_ids) == sorted(ref.completion_ids)
    for cid in ref.completion_ids:
        assert np.array_equal(fixed.tokens_of(cid), ref.tokens_of(cid)), cid
    assert_same_run(got, want, skip_shards=True)  # the re-collected shard is written under a new number


def kernels() -> list[psutil.Process]:
    """The IPython kernels this process started (the runner starts one per notebook)."""
    return [p for p in psutil.Process().children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]


def kill_kernel_when(seen: Any, done: threading.Event) -> threading.Thread:
    """A watcher that SIGKILLs the notebook's kernel as soon as `seen()` is true (polled every 10 ms),
    as a Colab disconnect or an out-of-memory kill ends it: no clean-up runs."""

    def watch() -> None:
        while not done.is_set():
            if seen():
                for kernel in kernels():
                    kernel.send_signal(signal.SIGKILL)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.notebook
def test_notebook_04_killed_at_a_seeded_write_then_rerun_ends_as_the_uninterrupted_run(
    reference, tmp_path, monkeypatch
):
    """Notebook 04 through the runner (smoke mode, as the notebook tests run it) on the run folder as
    it was before 04; its kernel is SIGKILLed at a seeded one of its writes (its settings recorded in
    run.json: probe_table follows; probes.json: the feature tables follow), then the notebook is rerun.
    Its results must equal those of the uninterrupted run (tests/fault_stages.py calls 04's functions
    with 04's smoke settings)."""
    from nbclient.exceptions import DeadKernelError

    from scripts.run_notebooks import NOTEBOOK_DIR, run_notebook

    want, _, before = reference
    got = tmp_path / RUN
    shutil.copytree(before, got)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the stages ran: the same float sums
    monkeypatch.setenv("TQDM_DISABLE", "1")
    triggers = {
        "04's settings in run.json": lambda: ANALYSIS_STAGE in (got / "run.json").read_text(),
        "probes.json": lambda: (got / "probes.json").exists(),
    }
    point = random.Random(SEED).choice(sorted(triggers))
    nb = next(NOTEBOOK_DIR.glob("04_*.ipynb"))
    done = threading.Event()
    watcher = kill_kernel_when(triggers[point], done)
    try:
        with pytest.raises(DeadKernelError):
            run_notebook(nb, got, smoke=True)
    finally:
        done.set()
        watcher.join()
    assert ANALYSIS_STAGE not in (read_run_json(got).get("stages") or {}), f"killed at {point}: not done"
    run_notebook(nb, got, smoke=True)

    def mine(run_dir: Path) -> dict[str, str]:
        """The files up to notebook 04's and its stage record (notebooks 05 and 06 ran after it in `want`)."""
        out = {k: v for k, v in contents(run_dir).items() if k.split("/")[0] not in ("executed", "run.json")}
        out = {k: v for k, v in out.items() if k in kept or k == "probes.json" or k.startswith("features/")}
        run = read_run_json(run_dir)
        for key in ("stages", "settings"):
            out[key] = json.dumps(without_times({s: v for s, v in run[key].items() if s <= ANALYSIS_STAGE}))
        return out

    kept = set(contents(before))
    a, b = mine(got), mine(want)
    assert sorted(a) == sorted(b) and "probes.json" in a, (sorted(set(a) ^ set(b)), point)
    assert not [k for k in a if a[k] != b[k]], ([k for k in a if a[k] != b[k]], point)
    left = temporaries(got)  # the kill's, if it fell inside a write: the rerun neither reads nor adds one
    assert len(left) <= 1 and all(TEMP.fullmatch(Path(t).name) for t in left), left
