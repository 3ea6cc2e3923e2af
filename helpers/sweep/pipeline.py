"""Run the study of notebooks 01–04 over many models, one at a time, each in its own run folder.

For every model of the plan, in turn: load (01), sample, label and collect (02), train SAEs (03), probe and
test features (04) — the same stage functions, in the same order and with the same arguments, that the
notebooks' cells call, so a sweep's run folder is one a researcher could have made by hand (and can open
in notebooks 04–06 with `RUN_NAME` = the folder's name). Feature explanations (Gemini autointerp) are
not part of the sweep: the comparison does not read them, and the free tier's 20 requests a day are
better spent on one model in notebook 04.

Resuming: a stage is done when its run folder's `run.json` says so (`run.mark_stage`, the notebooks'
own markers), so a rerun after a disconnect skips finished models and stages, and a model cut off
mid-stage restarts that stage, which resumes itself (completions are appended per batch, shards and
SAEs whose files exist are skipped). `sweep.json` in the sweep folder records the study (a rerun with
different study parameters is refused: results would mix), and per model its stages, timings, memory
and, for a model that failed, the stage and the error; the sweep then goes on with the next model.

Memory: one model is in memory at a time. After each model its references are dropped, `gc` runs, the
CUDA cache is emptied, and the memory in use is recorded beside the baseline taken before the first
model; GPU memory still allocated after a model (a leak) is reported in its row.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from helpers import gemini
from helpers.analysis.features import TooFewCompletions
from helpers.analysis.pipeline import feature_table, probe_table
from helpers.collect.capture import collect_activations
from helpers.collect.corpus import collect_corpus, default_corpus
from helpers.collect.datasets import write_datasets
from helpers.collect.pipeline import (
    add_transcripts,
    check_collection,
    collection_settings,
    label_run,
    load_datasets,
    sample_into_run,
)
from helpers.collect.sampling import SamplingSettings
from helpers.env import NotebookError, get_secret
from helpers.model.chat import chat
from helpers.model.hooks import check_layers, hook_points
from helpers.model.load import load_model
from helpers.run import (
    atomic_write_json,
    mark_stage,
    model_record,
    read_json_record,
    read_run_json,
    remove_stale_temps,
    stage_done,
    update_run_json,
)
from helpers.saes.evals import evaluate_lm, leaderboard
from helpers.saes.pipeline import run_saes, train_grid
from helpers.saes.train import TrainConfig
from helpers.sweep.plan import ModelSpec, PlanRow, StudySize, layers_at, memory_now, model_keys

SMOKE_STUDY = dict(
    corpus_seq_len=64,
    sae_batch_size=64,
    checkpoint_every=4,
    lm_eval_completions=2,
    sweep_bootstrap=10,
    top_k=4,
    feature_permutations=99,
)
"""What notebook 07's smoke mode sets beyond its form's parameters: few steps and draws (as 03's and 04's)."""

# The smallest study that runs every stage of notebooks 01-04 on helpers.sweep.tiny's models in seconds
# (a few prompts, 512 training tokens, 9 permutations): the sweep's tests and bench/sweep.py start from it.
TINY_STUDY = dict(
    SMOKE_STUDY,
    depths=[0.25, 0.5],
    n_prompts=16,
    n_per_prompt=2,
    max_new_tokens=8,
    batch_size=16,
    use_gemini=False,
    corpus="builtin:corpus",
    corpus_tokens=1024,
    conditions=["mixed"],
    expansion=2,
    l0=8,
    train_tokens=512,
    min_completions=8,
    min_tokens=64,
    n_folds=2,
    n_permutations=9,
    n_bootstrap=20,
)

STAGES = ("01_load_checkpoint", "02_collect_activations", "03_train_saes", "04_autolabel_features")
SWEEP_JSON = "sweep.json"


@dataclass
class Study:
    """The study every model of a sweep runs: notebook 02's, 03's and 04's parameters, with layers as
    relative depths. Defaults are the notebooks' own."""

    datasets: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"data": "builtin:contrast", "role": "train", "label_by": "instruction"},
            {"data": "builtin:scenarios", "role": "eval", "label_by": "judge"},
            {"data": "builtin:benign", "role": "control"},
        ]
    )
    """Notebook 02's `DATASETS`: train / eval / control sets (REFERENCE.md "Deception detection")."""
    depths: list[float] = field(default_factory=lambda: [0.25, 0.4, 0.5, 0.75])
    """Relative depths in [0, 1): layer floor(r · n_layers) of each model (0.4: the study's peak, 39%)."""
    n_prompts: int = 0
    """0: every prompt of each dataset (each dataset's own `limit` still applies)."""
    n_per_prompt: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 32
    seed: int = 0
    include_prompt_tokens: bool = False
    use_gemini: bool = True
    """Label `judge` datasets with Gemini when a key exists (else the offline rules, marked as such)."""
    gemini_model: str = "gemini-3.5-flash-lite"
    judge_batch: int = 25
    max_judge_requests: int = 20
    """Per model: a sweep of 5 models can spend 5 × this; the free tier allows about 20 a day."""
    corpus: str = "auto"
    corpus_tokens: int = 500_000
    corpus_seq_len: int = 256
    architectures: list[str] = field(
        default_factory=lambda: ["batchtopk", "matryoshka_batchtopk", "jumprelu"]
    )
    conditions: list[str] = field(default_factory=lambda: ["corpus", "mixed"])
    expansion: int = 8
    l0: int = 32
    train_tokens: int = 4_000_000
    sae_batch_size: int = 1024
    lr: float = 1e-3
    checkpoint_every: int = 200
    min_completions: int = 20
    min_tokens: int = 20_000
    lm_eval_completions: int = 32
    pooling: str = "mean"
    n_folds: int = 5
    n_permutations: int = 200
    n_bootstrap: int = 200
    control_fpr: float = 0.01
    sweep_bootstrap: int = 50
    random_sae: str = "frozen_encoder"
    top_k: int = 20
    feature_permutations: int = 2000

    def __post_init__(self) -> None:
        layers_at(self.depths, 1000)  # depths in [0, 1), or the message that says so
        if not self.depths:
            raise ValueError("depths is empty: give at least one relative depth, e.g. [0.4]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def size(self) -> StudySize:
        """The work per model for the plan's time estimate (all prompts counted as 250 when n_prompts = 0)."""
        completions = (self.n_prompts or 250) * self.n_per_prompt
        forward = (
            completions * (self.max_new_tokens + 64) + self.corpus_tokens + self.lm_eval_completions * 128
        )
        n_saes = len(self.depths) * len(self.architectures) * len(self.conditions)
        return StudySize(
            completions,
            self.max_new_tokens,
            self.batch_size,
            forward,
            n_saes,
            self.train_tokens,
            self.expansion,
            len(self.depths),
        )


@dataclass
class SweepFolders:
    """Where a sweep writes: `sweeps/<name>/` (sweep.json, the table, figures) beside `runs/`, which holds
    one run folder per model, `runs/<name>__<model key>/`."""

    root: Path
    name: str

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweeps" / self.name

    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / f"{self.name}__{key}"

    @classmethod
    def for_env(cls, runs_root: Path, name: str) -> SweepFolders:
        """Beside the notebooks' runs (`<project>/runs` -> `<project>/sweeps`); under `NB_RUN_DIR` when set
        (the tests and the Colab rehearsal point every notebook at one folder)."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"the sweep name must be a plain folder name like 'colab_t4', got {name!r}")
        override = os.environ.get("NB_RUN_DIR")
        return cls(Path(override).expanduser().resolve() if override else Path(runs_root).parent, name)


def read_sweep(path: Path) -> dict[str, Any]:
    """A sweep folder's sweep.json ({} when new); a corrupt file is an error, never overwritten."""
    path = Path(path)
    return read_json_record(path / SWEEP_JSON if path.is_dir() else path)


class _Lazy:
    """The model of the current run, loaded when a stage first needs it and dropped by `free`."""

    def __init__(self, run_dir: Path, device: str, cache_dir: Path | None):
        self.run_dir, self.device, self.cache_dir, self.lm = run_dir, device, cache_dir, None

    def get(self, spec: ModelSpec | None = None) -> Any:
        if self.lm is None:
            model = model_record(self.run_dir, required=spec is None)
            self.lm = load_model(
                spec.spec if spec else model["spec"],
                revision=spec.revision if spec else model.get("revision"),
                device=self.device,
                cache_dir=self.cache_dir,
            )
        return self.lm

    def free(self) -> None:
        self.lm = None


def stage_load(run_dir: Path, spec: ModelSpec, study: Study, lm: _Lazy) -> dict[str, Any]:
    """Notebook 01: load, one greedy reply, the hook points, `run.json`."""
    loaded = lm.get(spec)
    layers = spec.layers if spec.layers is not None else layers_at(study.depths, loaded.info.n_layers)
    layers = check_layers(loaded.model, layers)  # out of range: an IndexError naming the valid range
    reply = chat(loaded, "Is it ever acceptable to lie to protect someone's feelings?", max_new_tokens=24)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    update_run_json(
        run_dir, model={**loaded.info.to_dict(), "n_params": n_params}, run_name=run_dir.name, layers=layers
    )
    mark_stage(run_dir, STAGES[0], sample_reply=reply, hook_points=len(hook_points(loaded.model)), by="sweep")
    return {"layers": layers, "n_params": n_params}


def _sampling(study: Study) -> SamplingSettings:
    """The study's sampling settings, as notebook 02 passes them to sampling and records them in run.json."""
    return SamplingSettings(
        temperature=study.temperature,
        top_p=study.top_p,
        max_new_tokens=study.max_new_tokens,
        seed=study.seed,
        batch_size=study.batch_size,
    )


def stage_collect(run_dir: Path, study: Study, lm: _Lazy) -> dict[str, Any]:
    """Notebook 02: datasets, sampling, labels, activations, the reference corpus."""
    loaded = lm.get()
    layers = read_run_json(run_dir)["layers"]
    datasets = load_datasets(study.datasets, limit=study.n_prompts or None)
    # As notebook 02: the settings that make the completions, checked against the run folder's before writing.
    sampling = _sampling(study)
    settings = collection_settings(
        loaded.info.spec,
        datasets,
        layers,
        n_per_prompt=study.n_per_prompt,
        include_prompt=study.include_prompt_tokens,
        sampling=sampling,
    )
    check_collection(run_dir, settings)
    write_datasets(run_dir, datasets)
    prompts = [p for d in datasets for p in d.prompts]
    sample_into_run(loaded, prompts, run_dir, n_per_prompt=study.n_per_prompt, sampling=sampling)
    add_transcripts(
        loaded.tokenizer,
        datasets,
        run_dir,
        max_context=getattr(loaded.model.config, "max_position_embeddings", None),
    )
    client = (
        gemini.client_for(
            run_dir,
            use_gemini=study.use_gemini,
            model=study.gemini_model,
            max_requests=study.max_judge_requests,
            purpose="judge",
        )
        if any(d.label_by == "judge" for d in datasets)
        else None
    )
    records = label_run(run_dir, prompts, client=client, batch_size=study.judge_batch, label_by="judge")
    summary = collect_activations(
        loaded,
        records,
        layers,
        run_dir,
        batch_size=max(1, study.batch_size // 2),
        include_prompt=study.include_prompt_tokens,
    )
    corpus_spec = default_corpus(loaded.info.to_dict()) if study.corpus == "auto" else study.corpus
    corpus_tokens = {}
    if study.corpus_tokens > 0:
        corpus_tokens = collect_corpus(
            loaded,
            corpus_spec,
            layers,
            run_dir,
            max_tokens=study.corpus_tokens,
            seq_len=study.corpus_seq_len,
            batch_size=max(1, study.batch_size // 2),
            token=get_secret("HF_TOKEN"),
        )["tokens_per_layer"]
    update_run_json(
        run_dir,
        data={
            "spec": "datasets.json",
            "datasets": [d.name for d in datasets],
            "n_prompts": len(prompts),
            **settings["sampling"],
        },
        corpus={"spec": corpus_spec, "seq_len": study.corpus_seq_len, "text_column": None},
    )
    labels = {k: sum(r.get("label") == k for r in records) for k in ("honest", "deceptive", "ambiguous")}
    mark_stage(
        run_dir,
        STAGES[1],
        n_completions=len(records),
        labels=labels,
        tokens=summary["tokens_stored"],
        corpus_tokens=corpus_tokens,
        by="sweep",
    )
    return {"n_completions": len(records), "labels": labels}


def stage_train(run_dir: Path, study: Study, lm: _Lazy, device: str) -> dict[str, Any]:
    """Notebook 03: the SAE grid, then the LM loss with each SAE spliced in."""
    layers = read_run_json(run_dir)["layers"]
    cfg = TrainConfig(
        expansion=study.expansion,
        l0=study.l0,
        train_tokens=study.train_tokens,
        batch_size=study.sae_batch_size,
        lr=study.lr,
        checkpoint_every=study.checkpoint_every,
        seed=study.seed,
    )
    status = train_grid(
        run_dir,
        layers=layers,
        architectures=study.architectures,
        conditions=study.conditions,
        cfg=cfg,
        device=device,
        min_completions=study.min_completions,
        min_tokens=study.min_tokens,
    )
    evaluate_lm(run_dir, lm.get(), n_completions=study.lm_eval_completions, seed=study.seed)
    board = leaderboard(run_dir)
    mark_stage(
        run_dir,
        STAGES[2],
        saes=[r["sae_id"] for r in board],
        skipped=[r["sae_id"] for r in status if r["status"] == "skipped"],
        by="sweep",
    )
    return {"saes": len(board)}


def stage_analyse(run_dir: Path, study: Study) -> dict[str, Any]:
    """Notebook 04 without autointerp: probes.json (raw, SAE, random-SAE, ensembles, transfer, layer
    sweep) and each SAE's feature table."""
    layers = read_run_json(run_dir)["layers"]
    sae_folders = run_saes(run_dir)
    probe_table(
        run_dir,
        layers,
        sae_folders,
        pooling=study.pooling,
        n_folds=study.n_folds,
        n_permutations=study.n_permutations,
        n_bootstrap=study.n_bootstrap,
        seed=study.seed,
        control_fpr=study.control_fpr,
        random_variant=study.random_sae,
        sweep_bootstrap=None if study.sweep_bootstrap < 0 else study.sweep_bootstrap,
    )
    skipped = {}
    for folder in sae_folders:
        try:
            feature_table(
                run_dir,
                folder,
                k=study.top_k,
                seed=study.seed,
                tokenizer=None,
                n_permutations=study.feature_permutations,
            )
        except (
            TooFewCompletions
        ) as err:  # one SAE's feature statistics, not the model's probes: say so, go on
            print(f"no feature table for {folder.name}: {err}")
            skipped[folder.name] = str(err)
    mark_stage(
        run_dir,
        STAGES[3],
        saes=[f.name for f in sae_folders],
        layers=layers,
        gemini=False,
        by="sweep",
        autointerp="not run by the sweep: open notebook 04 with this RUN_NAME to label features",
        feature_tables_skipped=skipped,
    )
    return {"saes": len(sae_folders), "feature_tables_skipped": skipped}


def free_memory(device: str) -> dict[str, float]:
    """Drop what the last model left: garbage-collect, empty the CUDA cache; the memory in use after."""
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return memory_now(device)


def status_table(state: dict[str, Any]) -> list[dict[str, Any]]:
    """sweep.json's models as printable rows: status, the stage reached, minutes, memory after, the error."""
    return [
        {
            "model": k,
            "status": v.get("status"),
            "stage": v.get("stage") if v.get("status") != "done" else "",
            "minutes": (v.get("seconds") or 0) / 60,
            "rss_gb_after": (v.get("memory_after") or {}).get("rss_gb"),
            "gpu_gib_after": (v.get("memory_after") or {}).get("cuda_allocated_gib"),
            "error": (v.get("error") or v.get("memory_warning") or "")[:160],
        }
        for k, v in state["models"].items()
    ]


def too_big(row: PlanRow | None, free: dict[str, float]) -> str | None:
    """Why a model would not fit in the memory free now (its plan estimate against `memory_now`), or None."""
    if row is None or row.ram_gb is None:
        return None
    if row.ram_gb > free["ram_available_gb"] + free["rss_gb"]:
        return (
            f"needs ≈ {row.ram_gb:.1f} GB of RAM, {free['ram_available_gb']:.1f} GB available: drop it from "
            "the plan or use a machine with more memory"
        )
    if row.gpu_gib is not None and "cuda_free_gib" in free and row.gpu_gib > free["cuda_free_gib"]:
        return (
            f"needs ≈ {row.gpu_gib:.1f} GiB of GPU memory, {free['cuda_free_gib']:.1f} GiB free: drop it or "
            "use a bigger GPU"
        )
    return None


def run_model(
    run_dir: Path,
    spec: ModelSpec,
    study: Study,
    *,
    device: str,
    cache_dir: Path | None,
    record: dict[str, Any],
    save: Callable[[], Any] = lambda: None,
) -> None:
    """Every stage of one model that its run folder does not mark done, in order; `record` (the model's
    entry of sweep.json) gets each stage's summary and seconds, and `save` writes it as each stage starts
    and ends. A stage that starts removes the temp files and folders killed writes left in its folders
    (`run.remove_stale_temps`, which the notebooks' settings checks call; notebook 04's check itself is not
    made here: its settings include autointerp's, which the sweep does not run, so recording them would
    stop notebook 04 on this run folder). An exception propagates to `run_sweep`."""
    lm = _Lazy(run_dir, device, cache_dir)
    steps = {
        STAGES[0]: lambda: stage_load(run_dir, spec, study, lm),
        STAGES[1]: lambda: stage_collect(run_dir, study, lm),
        STAGES[2]: lambda: stage_train(run_dir, study, lm, device),
        STAGES[3]: lambda: stage_analyse(run_dir, study),
    }
    try:
        for stage, step in steps.items():
            if stage_done(run_dir, stage):
                record["stages"].setdefault(stage, {"status": "done", "note": "done earlier"})
                continue
            record["stage"] = stage
            save()
            # As the notebooks' settings checks do when a stage starts: what killed writes left goes first.
            remove_stale_temps(run_dir, stage)
            t0 = time.perf_counter()
            out = step()
            record["stages"][stage] = {"status": "done", "seconds": round(time.perf_counter() - t0, 2), **out}
            save()
            if stage == STAGES[2]:  # notebook 04 reads the run folder only: the model leaves memory first
                # no gc here: a full collection costs ~1 s with transformers loaded (once per model)
                lm.free()
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        lm.free()


def run_sweep(
    models: list[str | dict[str, Any] | ModelSpec],
    study: Study,
    folders: SweepFolders,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    skip: list[str] = (),
    plan: list[PlanRow] | None = None,
) -> dict[str, Any]:
    """Run every model (keys in `skip` are left out), one at a time; a failure is recorded and the sweep
    goes on. With the `plan`, a model whose estimated memory exceeds what is free now is not loaded: its
    row says so. Returns sweep.json's content (also written after every model)."""
    sizes = {row.key: row for row in plan or []}
    specs = [ModelSpec.of(m) for m in models]
    keys = model_keys(specs)
    folders.sweep_dir.mkdir(parents=True, exist_ok=True)
    path = folders.sweep_dir / SWEEP_JSON
    state = read_sweep(path)
    if state and state.get("study") != study.to_dict():
        changed = sorted(k for k, v in study.to_dict().items() if state["study"].get(k) != v)
        raise NotebookError(
            f"sweep {folders.name!r} was run with other study parameters ({', '.join(changed)} differ): its "
            "runs would mix two studies. Use a new SWEEP_NAME, or set the parameters back."
        )
    state = {
        "name": folders.name,
        "study": study.to_dict(),
        "models": state.get("models", {}),
        "baseline_memory": state.get("baseline_memory") or free_memory(device),
    }
    # What is alive now (imports, the notebook's objects) is moved out of the collector's way: the full
    # collection between models then looks at the models' objects only (~1 s less per model with
    # transformers loaded; bench/sweep.py). Unfrozen when the sweep ends, however it ends.
    free_memory(device)
    gc.freeze()
    try:
        for spec, key in zip(specs, keys, strict=True):
            run_dir = folders.run_dir(key)
            entry = state["models"].get(key) or {}
            if entry.get("spec") not in (None, spec.spec):
                raise NotebookError(
                    f"model key {key!r} of sweep {folders.name!r} was {entry['spec']!r}, now {spec.spec!r}: "
                    "give the new model another 'name', or use a new SWEEP_NAME"
                )
            if key in skip:
                state["models"][key] = {
                    **entry,
                    "spec": spec.spec,
                    "status": "dropped",
                    "run_dir": str(run_dir),
                }
                continue
            if entry.get("status") == "done" and all(stage_done(run_dir, s) for s in STAGES):
                print(f"{key}: done earlier ({run_dir})")
                continue
            record = {
                "spec": spec.spec,
                "revision": spec.revision,
                "run_dir": str(run_dir),
                "status": "running",
                "stages": {},
                "memory_before": memory_now(device),
            }
            state["models"][key] = record
            if why := too_big(sizes.get(key), record["memory_before"]):
                record.update(status="too big", error=why)
                print(f"{key}: not loaded: {why}", flush=True)
                atomic_write_json(path, state)
                continue
            atomic_write_json(path, state)
            print(f"=== {key}: {spec.spec} -> {run_dir}", flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            try:
                run_model(
                    run_dir,
                    spec,
                    study,
                    device=device,
                    cache_dir=cache_dir,
                    record=record,
                    save=lambda: atomic_write_json(path, state),
                )
                record["status"] = "done"
                record.pop("stage", None)
            # one model's failure (OOM, unknown layout, ...) is its row, not the end of the sweep
            except Exception as err:  # noqa: BLE001
                record.update(
                    status="failed",
                    error=f"{type(err).__name__}: {err}",
                    traceback=traceback.format_exc(limit=-3),
                )
                print(f"{key} failed at {record.get('stage')}: {record['error']}", flush=True)
                if (run_dir / "run.json").exists():
                    mark_stage(run_dir, record["stage"], "failed", error=record["error"], by="sweep")
            record["seconds"] = round(time.perf_counter() - t0, 2)
            record["memory_after"] = after = free_memory(device)
            leak = after.get("cuda_allocated_gib", 0.0) - state["baseline_memory"].get(
                "cuda_allocated_gib", 0.0
            )
            if leak > 0.05:
                record["memory_warning"] = f"{leak:.2f} GiB of GPU memory still allocated after {key}"
                print("WARNING:", record["memory_warning"])
            atomic_write_json(path, state)
    finally:
        gc.unfreeze()
    return state
