"""The notebooks' work, stage by stage, in one process that a test can kill (tests/test_faults.py).

    python -m tests.fault_stages RUN_DIR                 # run every stage (resuming what is there)
    python -m tests.fault_stages RUN_DIR count           # the same, printing the write points per stage
    python -m tests.fault_stages RUN_DIR kill:STAGE:N    # SIGKILL itself in the middle of its N-th write
    python -m tests.fault_stages RUN_DIR enospc:STAGE:N  # the N-th write of STAGE finds the disk full

The stages call the functions the notebooks call, in the notebooks' order, with tiny settings (the
offline SmolLM2 model): `collect` (notebook 02: datasets, sampling, labels, activations), `corpus` (02's
reference corpus), `train` (03's SAE grid) and `explore` (06's explorer pass). A write point is one call of
`helpers.run.atomic_write_bytes` (every shard, index, checkpoint, metrics and explorer file) or
`helpers.run.append_jsonl` (sampled batches). A kill leaves what a real one leaves mid-write: a partly
written temporary file, or a torn last line of completions.jsonl. A full disk fails inside the write
(`os.fsync` raises ENOSPC), so the writer's own clean-up and message run; the process then exits 28
with the message on stderr.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

STAGES = ("collect", "corpus", "train", "explore")
LAYER = 3


def install(fault: str) -> Counter:
    """Wrap the write functions in every loaded helpers module; returns the per-stage call counts."""
    import helpers.run as run_mod

    kind, target, n = (fault.split(":") + ["", "", "0"])[:3] if ":" in fault else ("", "", "0")
    counts: Counter = Counter()
    real = {"atomic_write_bytes": run_mod.atomic_write_bytes, "append_jsonl": run_mod.append_jsonl}
    real_fsync = os.fsync
    full = [False]

    def fsync(fd: int) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    os.fsync = fsync

    def wrap(name: str, fn: Any) -> Any:
        def write(path: Any, payload: Any, *args: Any, **kwargs: Any) -> Any:
            counts[CURRENT[0]] += 1
            if kind and CURRENT[0] == target and counts[CURRENT[0]] == int(n):
                if kind == "kill":
                    torn(name, Path(path), payload)
                    os.kill(os.getpid(), signal.SIGKILL)
                full[0] = True
            try:
                return fn(path, payload, *args, **kwargs)
            finally:
                full[0] = False

        return write

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("helpers"):
            for name, fn in real.items():
                if getattr(mod, name, None) is fn:
                    setattr(mod, name, wrap(name, fn))
    return counts


def torn(name: str, path: Path, payload: Any) -> None:
    """What a kill in the middle of this write leaves on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "append_jsonl":
        text = "".join(json.dumps(r) + "\n" for r in payload)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
    else:
        (path.parent / f".{path.name}.killed.tmp").write_bytes(payload[: len(payload) // 2])


CURRENT = ["setup"]


def main(run_dir: Path, fault: str) -> None:
    import helpers
    from helpers.collect import corpus as corpus_mod
    from helpers.collect.capture import collect_activations
    from helpers.collect.datasets import write_datasets
    from helpers.collect.pipeline import (
        check_collection,
        collection_settings,
        label_run,
        load_datasets,
        sample_into_run,
    )
    from helpers.explore.dashboards import ExplorerConfig
    from helpers.explore.pipeline import build_explorer
    from helpers.saes import TrainConfig
    from helpers.saes.grid import train_grid

    counts = install(fault)
    lm = helpers.load_model(helpers.OFFLINE_MODEL, device="cpu")
    if not (run_dir / "run.json").exists():
        helpers.update_run_json(run_dir, model=lm.info.to_dict())

    CURRENT[0] = "collect"
    datasets = load_datasets(
        [{"data": "builtin:contrast", "role": "train", "label_by": "instruction", "limit": 12}]
    )
    settings = collection_settings(
        lm.info.spec,
        datasets,
        [LAYER],
        n_per_prompt=2,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=8,
        seed=0,
        include_prompt=False,
    )
    check_collection(run_dir, settings)
    write_datasets(run_dir, datasets)
    prompts = [p for d in datasets for p in d.prompts]
    sample_into_run(lm, prompts, run_dir, n_per_prompt=2, max_new_tokens=8, seed=0, batch_size=6)
    records = label_run(run_dir, prompts, client=None)
    collect_activations(lm, records, [LAYER], run_dir, batch_size=8, shard_tokens=96, sweep_layers=None)

    CURRENT[0] = "corpus"
    corpus_mod.collect_corpus(
        lm,
        corpus_mod.BUILTIN_CORPUS,
        [LAYER],
        run_dir,
        max_tokens=768,
        seq_len=64,
        batch_size=4,
        shard_tokens=192,
    )

    CURRENT[0] = "train"
    cfg = TrainConfig(
        expansion=1, l0=8, train_tokens=768, batch_size=32, checkpoint_every=5, seed=0, init_tokens=256
    )
    train_grid(run_dir, [LAYER], ["topk"], ["mixed", "corpus"], cfg, min_completions=4, min_tokens=32)

    CURRENT[0] = "explore"
    build_explorer(run_dir, tokenizer=lm.tokenizer, config=ExplorerConfig(batch_tokens=256))
    CURRENT[0] = "done"
    if fault == "count":
        print("COUNTS " + json.dumps({s: counts[s] for s in STAGES}))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"DISK FULL in stage {CURRENT[0]}: {err}", file=sys.stderr)
        sys.exit(28)
