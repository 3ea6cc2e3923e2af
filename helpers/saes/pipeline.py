"""The SAE grid of a run: every layer × condition × architecture (× L0), trained with `train.train_sae`.

Conditions: `mixed` (honest + deceptive completions), `deceptive_only`, `honest_only`
(`completions.ids_for_condition`), `corpus` (the reference corpus of notebook 02: `corpus/layer_{L}/`, or
streamed through the model when a `corpus_stream` factory is given and nothing is stored) and
`corpus+behaviour` (every batch mixes corpus and `mixed` tokens, by default in proportion to their
counts, so each token is seen as often). Each SAE trains on the same token budget; behaviour data on the
training side of a split grouped by scenario or fact (`completions.split_completions`), the corpus on its
training sequences (`corpus.split_corpus`). A condition with too few completions or tokens is skipped
with a message naming the counts; an SAE whose `metrics.json` exists is done and skipped, so a rerun
after a disconnect continues where it stopped, but only when it was made with the same settings: each
SAE records what determines it (`sae_settings`: the training config, the model, layer, condition and a
fingerprint of its training data) with their hash and the release in `metrics.json`, and a rerun whose
settings differ for any finished or checkpointed SAE stops before training anything, naming each
difference (old → new) and the choices (a new RUN_NAME, OVERWRITE to retrain those SAEs).

Every SAE is evaluated on the held-out behaviour completions when the run has them (`activations` in
metrics.json: the same tokens for every condition, so a corpus dictionary and a behaviour-only one
compare on the text the probes read), and on the held-out corpus sequences when a corpus is stored
(`corpus_activations`). SAE ids are `{model}_{arch}_L{layer}_{condition}`; with an L0 sweep (`l0s`) the
architecture part carries the L0, `{model}_{arch}-l0-{L0}_L{layer}_{condition}`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from helpers.collect.completions import (
    ANALYSIS_FRACTION,
    analysis_split,
    ids_for_condition,
    read_completions,
    split_completions,
)
from helpers.collect.corpus import corpus_ids
from helpers.collect.store import LayerStore
from helpers.env import NotebookError
from helpers.model import hooks
from helpers.release import __version__
from helpers.run import (
    SAE_METRICS,
    atomic_write_json,
    describe_diff,
    id_part,
    jsonable,
    layer_of_dir,
    model_record,
    override_fields,
    read_run_json,
    remove_stale_temps,
    sae_dir,
    sae_id_of,
    sae_release_flag,
    saes_dir,
    set_aside,
    settings_diff,
    settings_hash,
)
from helpers.saes.evals import evaluate_folder
from helpers.saes.io import find_sae_folders, load_sae, save_sae
from helpers.saes.train import (
    HeldOut,
    MixedData,
    StoreData,
    StreamData,
    TooFewSamples,
    TrainConfig,
    train_sae,
)

BEHAVIOUR_CONDITIONS = ("mixed", "deceptive_only", "honest_only")
CORPUS_CONDITIONS = ("corpus", "corpus+behaviour")
CONDITIONS = BEHAVIOUR_CONDITIONS + CORPUS_CONDITIONS


def condition_ids(
    rows: list[dict],
    condition: str,
    train_ids: list[str],
    store: LayerStore,
    *,
    min_completions: int = 20,
    min_tokens: int = 20_000,
) -> list[str]:
    """Training completions of `condition` (completions.ids_for_condition: mixed = honest + deceptive)
    that have activations in `store`; TooFewSamples names the counts by label."""
    train = set(train_ids)
    ids = [i for i in ids_for_condition(rows, condition) if i in train and i in store.entries]
    n_tokens = store.count(ids) if ids else 0
    if len(ids) < min_completions or n_tokens < min_tokens:
        labels = Counter(r.get("label") or "unlabelled" for r in rows if r["id"] in train)
        raise TooFewSamples(
            f"condition {condition!r} at layer {store.dir.name.removeprefix('layer_')} has {len(ids)} "
            "completions "
            f"({n_tokens} tokens); it needs at least {min_completions} completions and {min_tokens} tokens. "
            f"Training completions by label: {dict(labels)}. Sample more (notebook 02) or lower the minimums."
        )
    return ids


@dataclass(frozen=True)
class GridSettings:
    """How `train_grid` chooses its data and runs. A whole `grid=GridSettings(...)` or single fields as
    keywords (`min_tokens=500`), which win over it (`with_overrides`)."""

    eval_fraction: float = 0.1
    """Share of the training split's prompt groups held out for the SAEs' metrics."""
    min_completions: int = 20
    """A behaviour condition with fewer training completions is skipped (with the reason)."""
    min_tokens: int = 20_000
    """A condition with fewer training tokens is skipped (with the reason)."""
    l0s: tuple[int, ...] | list[int] | None = None
    """An L0 sweep: one SAE per target L0 (None: `cfg.l0` only)."""
    behaviour_share: float | None = None
    """The behaviour fraction of `corpus+behaviour` batches (None: proportional to the sources)."""
    stream_eval_tokens: int = 32_768
    """Held-out corpus tokens drawn from a stream for the metrics of a streamed corpus SAE."""
    corpus_stream: Callable[[int], Any] | None = None
    """`corpus_stream(layer)` makes a `collect.corpus.CorpusStream` for layers with no stored corpus."""
    plan_only: bool = False
    """Only list the SAEs to train (status "to train")."""
    overwrite: bool = False
    """Move SAEs made with other settings to replaced/ and train them again."""

    def __post_init__(self) -> None:
        if self.behaviour_share is not None and not 0 < self.behaviour_share < 1:
            raise ValueError(f"behaviour_share must be in (0, 1), got {self.behaviour_share}")

    def with_overrides(self, overrides: dict[str, Any]) -> GridSettings:
        """These settings with the fields named in `overrides` replaced (unknown names are refused)."""
        return override_fields(self, overrides, "grid settings")


def train_grid(
    run_dir: str | os.PathLike,
    layers: list[int],
    architectures: list[str],
    conditions: list[str],
    cfg: TrainConfig,
    *,
    grid: GridSettings | None = None,
    device: str = "cpu",
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train every layer × condition × architecture (× L0 in `l0s`) SAE of the run that is not complete
    yet. Returns one row per SAE: status "trained", "done earlier", "skipped" (with the reason) or, with
    `plan_only`, "to train". Every SAE trains on `cfg.train_tokens` tokens, so conditions compare at equal
    budgets. `corpus_stream(layer)` makes a `collect.corpus.CorpusStream` for layers with no stored corpus;
    `behaviour_share` fixes the behaviour fraction of `corpus+behaviour` batches. An SAE finished (or
    checkpointed) with other settings stops the grid before it trains anything (module doc), unless
    `overwrite`, which moves it to replaced/ to train it again. The settings: `GridSettings`."""
    g = (grid or GridSettings()).with_overrides(overrides)
    run_dir = Path(run_dir)
    if unknown := [c for c in conditions if c not in CONDITIONS]:
        raise ValueError(f"unknown condition(s) {unknown}: choose from {list(CONDITIONS)}")
    spec = model_record(run_dir)["spec"]
    rows = read_completions(run_dir)
    if not rows and set(conditions) - {"corpus"}:
        raise FileNotFoundError(f"{run_dir}/completions.jsonl is missing or empty: run notebook 02 first")
    check_layers_collected(run_dir, layers, streamed=g.corpus_stream is not None)
    train_ids, eval_ids = split_completions(rows, g.eval_fraction, cfg.seed) if rows else ([], [])
    reserved = set(analysis_split(rows, ANALYSIS_FRACTION, cfg.seed)[1])  # notebook 04's rows: never
    train_ids = [i for i in train_ids if i not in reserved]  # trained on by any SAE (DESIGN.md §9)
    sweep = list(g.l0s) if g.l0s else [cfg.l0]
    plan = []
    by_layer: dict[int, _Sources] = {}
    for layer, condition in itertools.product(layers, conditions):
        if layer not in by_layer:
            by_layer[layer] = _Sources(run_dir, layer, rows, train_ids, cfg, g.corpus_stream)
        sources = by_layer[layer]
        try:
            data, n_items = sources.data(condition, g.min_completions, g.min_tokens, g.behaviour_share)
            reason = None
        except (TooFewSamples, FileNotFoundError) as err:
            print(f"skipping {condition} at layer {layer}: {err}")
            data, n_items, reason = None, 0, str(err)
        for arch, l0 in itertools.product(architectures, sweep):
            row = {
                "sae_id": sae_id_of(spec, arch, layer, condition, l0 if g.l0s else None),
                "layer": layer,
                "condition": condition,
                "architecture": arch,
                "l0_target": l0,
                "completions": n_items,
            }
            run_cfg = replace(cfg, architecture=arch, l0=l0)
            settings = None if reason else sae_settings(run_cfg, spec, layer, condition, data)
            plan.append((row, sources, data, reason, run_cfg, settings))
    _check_finished(
        run_dir, [(r["sae_id"], c, st) for r, _, _, reason, c, st in plan if not reason], g.overwrite
    )
    if not g.plan_only:
        remove_stale_temps(run_dir, TRAIN_STAGE)  # what killed writes left in saes/
    status = []
    for row, sources, data, reason, run_cfg, settings in plan:
        out, layer, condition = sae_dir(run_dir, row["sae_id"]), row["layer"], row["condition"]
        if reason or g.plan_only or (out / SAE_METRICS).exists():
            done = "done earlier" if (out / SAE_METRICS).exists() else "to train"
            status.append({**row, "status": "skipped" if reason else done, "reason": reason})
            continue
        meta = {
            **row,
            "model_spec": spec,
            "n_eval_completions": len(eval_ids),
            "analysis_split": {"fraction": ANALYSIS_FRACTION, "seed": cfg.seed},
            "dataset_path": sources.dataset_path(condition),
            "settings": settings,
            "settings_hash": settings_hash(settings),
            "package_version": __version__,
        }
        m = train_sae(
            data,
            run_cfg,
            out,
            hook_name=hooks.hook_name(layer),
            model_name=spec,
            held_out=sources.held_out(eval_ids, g.stream_eval_tokens),
            metadata=meta,
            device=device,
        )
        if sources.corpus_store is not None:  # the same SAE on held-out corpus text
            held = evaluate_folder(out, sources.corpus_store, sources.corpus_held, device=device)
            m["corpus_activations"] = held["activations"]
            atomic_write_json(out / SAE_METRICS, m)
        summary = {k: m["activations"][k] for k in ("explained_variance", "l0", "dead_fraction")}
        status.append({**row, "status": "trained", **summary})
    return status


RESUME_ONLY = ("checkpoint_every", "log_every")
"""TrainConfig fields that change how a run is checkpointed or logged, not the SAE it makes."""


def sae_settings(cfg: TrainConfig, spec: str, layer: int, condition: str, data: Any) -> dict[str, Any]:
    """What determines one SAE (compared on a rerun): its training config, the model, layer and condition,
    and its training data (which store and a hash of the completion / sequence ids it draws from)."""
    training = {k: v for k, v in asdict(cfg).items() if k not in RESUME_ONLY}
    return jsonable(
        {
            "training": training,
            "model": spec,
            "layer": layer,
            "condition": condition,
            "data": _data_settings(data),
        }
    )


def _data_settings(data: Any) -> Any:
    if isinstance(data, StoreData):
        ids = sorted(data.ids)
        return {
            "store": f"{data.store.dir.parent.name}/{data.store.dir.name}",
            "items": len(ids),
            "ids_hash": settings_hash(ids),
        }
    if isinstance(data, StreamData):
        stream = data.stream
        return {
            "stream": getattr(stream, "corpus", type(stream).__name__),
            "seq_len": getattr(getattr(stream, "packing", None), "seq_len", None),
        }
    if isinstance(data, MixedData):
        return [{"share": round(float(w), 6), **_data_settings(d)} for d, w in data.parts]
    raise TypeError(f"no settings for training data of type {type(data).__name__}")


def _recorded_settings(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(settings, where) of what is on disk in an SAE folder: metrics.json's `settings` (or, for an SAE from
    before they were recorded, its training config), else a checkpoint's config; (None, "") when empty."""
    if (folder / SAE_METRICS).exists():
        m = json.loads((folder / SAE_METRICS).read_text())
        if m.get("settings") is not None:
            return m["settings"], f"finished, release {m.get('package_version')}"
        config = (m.get("training") or {}).get("config") or {}
        return {
            "training": {k: v for k, v in config.items() if k not in RESUME_ONLY}
        }, "finished, release not recorded"
    if (folder / "checkpoint.pt").exists():
        config = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["config"]
        return {"training": {k: v for k, v in config.items() if k not in RESUME_ONLY}}, "checkpoint"
    return None, ""


def _check_finished(
    run_dir: Path, planned: list[tuple[str, TrainConfig, dict[str, Any]]], overwrite: bool
) -> None:
    """Stop before training anything when a finished or checkpointed SAE of the plan was made with other
    settings (naming each difference), or with `overwrite` delete those SAE folders to train them again.
    An SAE recorded before settings were, is compared on what it recorded (its training config)."""
    conflicts = []
    for sae_id, cfg, settings in planned:
        folder = sae_dir(run_dir, sae_id)
        old, where = _recorded_settings(folder)
        if old is None:
            continue
        new = settings if "model" in old else {"training": settings["training"]}
        if where == "checkpoint":  # train.py resumes a checkpoint only with its exact config
            new = {"training": {k: v for k, v in jsonable(asdict(cfg)).items() if k not in RESUME_ONLY}}
        if "model" not in old:  # fields added to TrainConfig since: compare what both know
            new = {"training": {k: v for k, v in new["training"].items() if k in old["training"]}}
        if diff := settings_diff(old, new):
            conflicts.append((sae_id, where, diff))
    if not conflicts:
        return
    if overwrite:  # kept in replaced/ (run.set_aside), trained again
        set_aside(run_dir, TRAIN_STAGE, [sae_dir(run_dir, sae_id) for sae_id, _, _ in conflicts])
        return
    text = "\n".join(f"{sae_id} ({where}):\n{describe_diff(diff)}" for sae_id, where, diff in conflicts)
    raise NotebookError(
        f"{len(conflicts)} SAE(s) in {saes_dir(run_dir)} were made with other settings than this run's; "
        f"nothing was trained. What differs (on disk → now):\n{text}\nChoose one:\n"
        "  - a new RUN_NAME: train the new settings in a new run folder (this one stays as it is)\n"
        "  - OVERWRITE = True: move these SAEs (and their checkpoints) to replaced/ and train them again "
        "with the new settings\n"
        "  - or set the parameters back to the values on the left to resume this run"
    )


def with_release_flags(run_dir: str | os.PathLike, board: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leaderboard rows with a `release` column (`sae_release_flag`), so results of an older release are
    seen as such beside new ones."""
    return [{**r, "release": sae_release_flag(run_dir, r["sae_id"])} for r in board]


def collected_layers(run_dir: str | os.PathLike) -> list[int]:
    """Layers with stored activations (behaviour completions or the reference corpus) in the run."""
    found = {
        layer_of_dir(d) for kind in ("activations", "corpus") for d in (Path(run_dir) / kind).glob("layer_*")
    }
    return sorted(
        layer
        for layer in found
        if _has_store(Path(run_dir), layer) or _has_store(Path(run_dir), layer, "corpus")
    )


def check_layers_collected(run_dir: str | os.PathLike, layers: list[int], *, streamed: bool = False) -> None:
    """Every layer asked for has activations stored by notebook 02 (a corpus stream makes its own): one
    error listing the collected layers, instead of a skip per SAE and no SAE at all."""
    if not layers:
        raise NotebookError(f"no layers to train on in {run_dir}: run notebook 02 first, or set LAYERS")
    collected = collected_layers(run_dir)
    if missing := [] if streamed else [layer for layer in layers if layer not in collected]:
        raise NotebookError(
            f"LAYERS names layer(s) {missing} that notebook 02 did not collect in {run_dir}; collected: "
            f"{collected or 'none'}. Set LAYERS to some of {collected} (or [] for all of them), or add the "
            "layers to notebook 02's LAYERS and rerun it (it collects only what is missing)."
        )


TRAIN_STAGE = "03_train_saes"
"""Notebook 03's stage in `run.json`."""


def run_saes(run_dir: str | os.PathLike, name_filter: str = "") -> list[Path]:
    """The run's SAE folders whose name contains `name_filter`, for the analyses of notebooks 04-05.

    No SAE is an error while notebook 03 has not finished (a later notebook would otherwise mark itself
    done with none); once 03 is done, none means it trained none on purpose (every condition skipped, or
    only probes wanted) and the later notebooks go on with the residual-stream probes, saying so. A
    `name_filter` that matches none of the SAEs present is an error listing them."""
    found = find_sae_folders(Path(run_dir) / "saes")
    folders = [f for f in found if name_filter in f.name]
    stage = (read_run_json(run_dir).get("stages") or {}).get(TRAIN_STAGE, {}).get("status")
    if found and not folders:
        raise NotebookError(
            f"SAE_FILTER {name_filter!r} matches none of the {len(found)} SAE(s) of {run_dir}: "
            f"{[f.name for f in found]}. Use part of one of these names, or '' for all."
        )
    if not folders and stage != "done":
        raise NotebookError(
            f"no SAE in {Path(run_dir) / 'saes'} and notebook 03 has not finished on this run (its stage is "
            f"{stage or 'not started'}): run notebook 03 with RUN_NAME {Path(run_dir).name!r} to the end "
            "first."
        )
    if not folders:
        print(
            f"notebook 03 finished without training an SAE in {run_dir}: only the residual-stream probes run"
        )
    elif stage != "done":
        print(
            f"note: notebook 03 has not finished on this run; analysing the {len(folders)} SAE(s) found "
            "so far"
        )
    return folders


class _Sources:
    """The stores of one layer (behaviour completions, reference corpus) and the data of each condition."""

    def __init__(
        self,
        run_dir: Path,
        layer: int,
        rows: list[dict],
        train_ids: list[str],
        cfg: TrainConfig,
        corpus_stream: Callable[[int], Any] | None,
    ):
        self.run_dir, self.layer, self.rows, self.train_ids, self.cfg = run_dir, layer, rows, train_ids, cfg
        self.behaviour = LayerStore(run_dir, layer) if rows and _has_store(run_dir, layer) else None
        self.corpus_store, self.corpus_train, self.corpus_held = None, [], []
        if _has_store(run_dir, layer, "corpus"):
            self.corpus_store, self.corpus_train, self.corpus_held = corpus_ids(run_dir, layer, cfg.seed)
        self.make_stream, self.stream, self.stream_heldout = corpus_stream, None, None

    def data(
        self, condition: str, min_completions: int, min_tokens: int, share: float | None
    ) -> tuple[Any, int]:
        """(training data, completions or sequences it draws from); TooFewSamples says what is missing."""
        if condition in BEHAVIOUR_CONDITIONS:
            ids = self._ids(condition, min_completions, min_tokens)
            return StoreData(self._behaviour(), ids), len(ids)
        corpus = self._corpus(min_tokens)
        if condition == "corpus":
            return corpus, len(self.corpus_train)
        mixed = StoreData(self._behaviour(), self._ids("mixed", min_completions, min_tokens))
        n_mixed = mixed.count()
        if share is None:  # every token as often: proportional to the counts (a stream is cfg.train_tokens)
            share = n_mixed / ((corpus.count() or self.cfg.train_tokens) + n_mixed)
        return MixedData([(corpus, 1 - share), (mixed, share)]), len(self.corpus_train) + len(mixed.ids)

    def _behaviour(self) -> LayerStore:
        if self.behaviour is None:
            raise FileNotFoundError(f"no behaviour activations at layer {self.layer}: run notebook 02 first")
        return self.behaviour

    def _ids(self, condition: str, min_completions: int, min_tokens: int) -> list[str]:
        # At least one batch of tokens, so an epoch is never empty.
        return condition_ids(
            self.rows,
            condition,
            self.train_ids,
            self._behaviour(),
            min_completions=min_completions,
            min_tokens=max(min_tokens, self.cfg.batch_size),
        )

    def _corpus(self, min_tokens: int) -> StoreData | StreamData:
        if self.corpus_store is None and self.make_stream is not None:
            self.stream = self.stream or self.make_stream(self.layer)  # made once per layer, when needed
            return StreamData(self.stream)
        if self.corpus_store is None:
            raise FileNotFoundError(
                f"no reference corpus at layer {self.layer}: collect one in notebook 02 (CORPUS_TOKENS > 0, "
                "for this layer) or stream it into training (CORPUS_STREAM in notebook 03)"
            )
        data = StoreData(self.corpus_store, self.corpus_train)
        if data.count() < min_tokens:
            raise TooFewSamples(
                f"the corpus at layer {self.layer} has {data.count()} training tokens; it needs at least "
                f"{min_tokens}. Raise CORPUS_TOKENS in notebook 02 or lower MIN_TOKENS."
            )
        return data

    def held_out(self, eval_ids: list[str], stream_tokens: int) -> HeldOut:
        """train_sae's held-out data: the behaviour completions `eval_ids` when there are any (all the
        behaviour tokens when none of them is stored), else the held-out corpus (stored, or `stream_tokens`
        of the stream's held-out sequences)."""
        if self.behaviour is not None and eval_ids:
            return StoreData(self.behaviour, [i for i in eval_ids if i in self.behaviour.entries] or None)
        if self.corpus_store is not None:
            return StoreData(self.corpus_store, self.corpus_held or None)
        if self.stream_heldout is None:
            self.stream_heldout = self.stream.heldout_batches(stream_tokens)
        return self.stream_heldout

    def dataset_path(self, condition: str) -> str:
        where = {"corpus": "corpus/", "corpus+behaviour": "corpus/ + completions.jsonl"}
        return f"{self.run_dir.name}/{where.get(condition, 'completions.jsonl')}"


def _has_store(run_dir: Path, layer: int, kind: str = "activations") -> bool:
    try:
        LayerStore(run_dir, layer, kind=kind)
    except FileNotFoundError:
        return False
    return True


def import_sae(
    source: str | os.PathLike, run_dir: str | os.PathLike, *, eval_fraction: float = 0.1, seed: int = 0
) -> str:
    """Copy a published SAELens SAE into `run_dir/saes/` (our normalised form of it) and evaluate it on
    the run's held-out activations at its layer, so it joins the leaderboard; returns its sae_id
    `{model}_{arch}_L{layer}_imported-{folder name}`. Skipped when already imported."""

    loaded = load_sae(source)
    name = id_part(Path(str(source)).name)
    sae_id = sae_id_of(
        loaded.model_name or "foreign", loaded.sae.architecture, loaded.layer, f"imported-{name}"
    )
    folder = sae_dir(run_dir, sae_id)
    if (folder / SAE_METRICS).exists():
        return sae_id
    meta = {
        "sae_id": sae_id,
        "layer": loaded.layer,
        "condition": f"imported-{name}",
        "imported_from": str(source),
    }
    save_sae(
        loaded.sae,
        folder,
        hook_name=f"blocks.{loaded.layer}.hook_resid_post",
        model_name=loaded.model_name or "unknown",
        metadata=meta,
    )
    held = split_completions(read_completions(run_dir), eval_fraction, seed)[1]
    store = LayerStore(run_dir, loaded.layer)
    evaluation = evaluate_folder(folder, store, [i for i in held if i in store.entries])
    atomic_write_json(folder / SAE_METRICS, {**meta, "architecture": loaded.sae.architecture, **evaluation})
    return sae_id
