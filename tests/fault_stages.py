"""The notebooks' work, stage by stage, in one process that a test can kill (tests/test_faults.py).

    python -m tests.fault_stages RUN_DIR                 # run every stage (resuming what is there)
    python -m tests.fault_stages RUN_DIR count           # the same, printing the write points per stage
    python -m tests.fault_stages RUN_DIR kill:STAGE:N    # SIGKILL itself in the middle of its N-th write
    python -m tests.fault_stages RUN_DIR enospc:STAGE:N  # the N-th write of STAGE finds the disk full
    python -m tests.fault_stages RUN_DIR count:STAGE     # count, and stop before STAGE

The stages call the functions the notebooks call, in the notebooks' order, with tiny settings (the
offline SmolLM2 model): `load` (notebook 01: its settings check and run.json records), `collect` (notebook
02: datasets, sampling, labels, activations), `corpus` (02's reference corpus), `train` (03's SAE grid),
`analysis` (04 with its smoke settings, offline: probes.json, the feature tables, their offline
explanations, the stage record), `steer` (05's steering experiment with the offline judge, its two
figures and the stage record) and `explore` (06's explorer pass). A write point is one call of
`helpers.run.atomic_write_bytes` (every shard, index, checkpoint, metrics, probes, feature, figure and
explorer file, run.json) or `helpers.run.append_jsonl` (sampled batches, steering conditions). A kill
leaves what a real one leaves mid-write: a partly written temporary file, or a torn last line of
completions.jsonl or steering.jsonl. A full disk fails inside the write
(`os.fsync` raises ENOSPC), so the writer's own clean-up and message run; the process then exits 28
with the message on stderr.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

STAGES = ("load", "collect", "corpus", "train", "analysis", "steer", "explore")
LAYER = 3
ANALYSIS = dict(
    POOLING="mean",
    N_FOLDS=2,
    N_PERMUTATIONS=9,
    N_BOOTSTRAP=20,
    TOP_K=4,
    FEATURE_PERMUTATIONS=99,
    N_LABEL=2,
    GEMINI_MODEL="gemini-3.5-flash-lite",
    CONTROL_FPR=0.01,
    SWEEP_BOOTSTRAP=10,
    RANDOM_SAE="frozen_encoder",
    SEED=0,
)
"""Notebook 04's parameters in smoke mode (its form values with the smoke cell's overrides), so that
tests/test_faults.py can run notebook 04 itself on this run folder and compare."""
SAE_FILTER = "mixed"


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
        fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # as the writer
        with os.fdopen(fd, "wb") as f:
            f.write(payload[: len(payload) // 2])


CURRENT = ["start"]


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
    from helpers.saes.pipeline import train_grid

    counts = install(fault)
    stop = fault.split(":", 1)[1] if fault.startswith("count:") else None
    lm = helpers.load_model(helpers.OFFLINE_MODEL, device="cpu")

    CURRENT[0] = "load"
    load_checkpoint(run_dir, lm)

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
    helpers.update_run_json(run_dir, layers=[LAYER])
    helpers.mark_stage(run_dir, "02_collect_activations", n_completions=len(records))

    CURRENT[0] = "train"
    cfg = TrainConfig(
        expansion=1, l0=8, train_tokens=768, batch_size=32, checkpoint_every=5, seed=0, init_tokens=256
    )
    train_grid(run_dir, [LAYER], ["topk"], ["mixed", "corpus"], cfg, min_completions=4, min_tokens=32)
    helpers.mark_stage(run_dir, "03_train_saes")

    for stage, work in (("analysis", autolabel_features), ("steer", plot_and_steer)):
        if stop == stage:
            print("COUNTS " + json.dumps({s: counts[s] for s in STAGES}))
            return
        CURRENT[0] = stage
        work(run_dir, lm)

    CURRENT[0] = "explore"
    build_explorer(run_dir, tokenizer=lm.tokenizer, config=ExplorerConfig(batch_tokens=256))
    CURRENT[0] = "done"
    if fault.startswith("count"):
        print("COUNTS " + json.dumps({s: counts[s] for s in STAGES}))


def load_checkpoint(run_dir: Path, lm: Any) -> None:
    """Notebook 01's writes: its settings check, the model record, the stage record."""
    import helpers
    from helpers.run import check_stage_settings

    reply = helpers.chat(lm, "Did you take the last cookie?", max_new_tokens=4)
    recorded = helpers.read_run_json(run_dir).get("model") or {}
    check_stage_settings(
        run_dir,
        "01_load_checkpoint",
        {"model": lm.info.spec, "revision": lm.info.revision},
        has_outputs=bool(recorded),
        legacy={"model": recorded.get("spec"), "revision": recorded.get("revision")},
    )
    helpers.update_run_json(run_dir, model=lm.info.to_dict(), run_name=run_dir.name)
    helpers.mark_stage(run_dir, "01_load_checkpoint", sample_reply=reply, hook_points=1)


def autolabel_features(run_dir: Path, lm: Any) -> None:
    """Notebook 04's writes, offline (no Gemini key), with its smoke settings (`ANALYSIS`)."""
    import helpers
    from helpers import analysis
    from helpers.analysis.pipeline import analysis_settings, check_analysis, feature_tables
    from helpers.saes import run_saes

    p = ANALYSIS
    layers = helpers.read_run_json(run_dir).get("layers") or []
    sae_folders = run_saes(run_dir, SAE_FILTER)
    recompute = check_analysis(run_dir, analysis_settings(run_dir, sae_folders, dict(p)))
    analysis.probe_table(
        run_dir,
        layers,
        sae_folders,
        pooling=p["POOLING"],
        n_folds=p["N_FOLDS"],
        n_permutations=p["N_PERMUTATIONS"],
        n_bootstrap=p["N_BOOTSTRAP"],
        seed=p["SEED"],
        control_fpr=p["CONTROL_FPR"],
        random_variant=p["RANDOM_SAE"],
        sweep_bootstrap=p["SWEEP_BOOTSTRAP"],
    )
    tables, status = feature_tables(
        run_dir,
        sae_folders,
        k=p["TOP_K"],
        seed=p["SEED"],
        tokenizer=None,
        n_permutations=p["FEATURE_PERMUTATIONS"],
        overwrite=recompute,
    )
    for name in tables:
        analysis.label_features(run_dir, name, None, n_label=p["N_LABEL"], seed=p["SEED"])
    helpers.mark_stage(
        run_dir,
        "04_autolabel_features",
        saes=list(tables),
        skipped={r["sae_id"]: r["reason"][:200] for r in status if r["status"] == "skipped"},
        layers=layers,
        gemini=False,
    )


def plot_and_steer(run_dir: Path, lm: Any) -> None:
    """Notebook 05's writes with its smoke settings, offline (the rules judge): the settings check,
    steering.jsonl (one appended row per condition), the two steering figures, the stage record."""
    import helpers
    from helpers import plots, steer
    from helpers.collect.prompts import load_scenarios
    from helpers.run import check_stage_settings

    sae, top = steer.steering_targets(run_dir, lm, "", 1, device="cpu")
    strengths = [0.25]  # five conditions: none, the feature, two random controls, difference of means
    conditions = steer.build_conditions(
        sae,
        [r["feature"] for r in top],
        strengths,
        residual_norm=steer.residual_norm(run_dir, sae.layer),
        n_random=1,
        diff_of_means=steer.diff_of_means_direction(run_dir, sae.layer),
        seed=0,
    )
    prompts = steer.held_out_prompts(run_dir, load_scenarios(), 1)
    settings = dict(
        sae_id=sae.path.name,
        features=[r["feature"] for r in top],
        strengths=strengths,
        n_random=1,
        prompts=[q.id for q in prompts],
        n_per_prompt=1,
        max_new_tokens=4,
        judge="offline",
        seed=0,
    )
    check_stage_settings(run_dir, "05_plot_and_steer", settings)
    rows = steer.run_steering_experiment(
        lm, prompts, conditions, run_dir=run_dir, n_per_prompt=1, max_new_tokens=4, seed=0
    )
    results = steer.compare_to_controls(rows)
    plots.save_figure(plots.control_comparison_figure(results), run_dir, "steering_vs_controls")
    plots.save_figure(plots.steering_figure(rows), run_dir, "steering")
    helpers.mark_stage(run_dir, "05_plot_and_steer", sae_id=sae.path.name, n_conditions=len(conditions))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"DISK FULL in stage {CURRENT[0]}: {err}", file=sys.stderr)
        sys.exit(28)
