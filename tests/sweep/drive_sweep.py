"""Run a sweep in this process, as notebook 07 does, optionally killing the process (SIGKILL, as a Colab
disconnect does: no cleanup runs) at the n-th call of one of the runner's functions, e.g. `run_model:2`
(between models: the second model is about to start) or `evaluate_lm:1` (mid-model: its SAEs are trained,
the LM evaluation and the stage marker are not). Used by test_sweep.py:

    python -m tests.sweep.drive_sweep config.json [function:n]
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from helpers.sweep import pipeline as runner
from helpers.sweep.pipeline import Study, SweepFolders, run_sweep


def kill_at(spec: str) -> None:
    name, n = spec.split(":")
    real, calls = getattr(runner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(n):
            print(f"killing the sweep at call {n} of {name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(runner, name, wrapped)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    cfg = json.loads(Path(argv[0]).read_text())
    if len(argv) > 1:
        kill_at(argv[1])
    folders = SweepFolders(Path(cfg["root"]), cfg["name"])
    run_sweep(cfg["models"], Study(**cfg["study"]), folders, device="cpu", cache_dir=Path(cfg["cache_dir"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
