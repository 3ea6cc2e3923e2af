"""The SAE grid of a run: every layer × condition × architecture, trained with `train.train_sae`.

Conditions (`completions.ids_for_condition`): `mixed` (honest + deceptive), `deceptive_only`,
`honest_only`. Each SAE trains on the same token budget, on the training side of a split grouped by
scenario or fact (`completions.split_completions`); a condition with too few completions or tokens is
skipped with a message naming the counts; an SAE whose `metrics.json` exists is done and skipped, so
a rerun after a disconnect continues where it stopped. SAE ids are `{model}_{arch}_L{layer}_{condition}`.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from helpers.collect.completions import ids_for_condition, read_completions, split_completions
from helpers.collect.store import LayerStore
from helpers.model import hooks
from helpers.run import SAE_METRICS, atomic_write_json, id_part, model_short, read_run_json, sae_dir
from helpers.saes.evals import evaluate_folder
from helpers.saes.io import load_sae, save_sae
from helpers.saes.train import TooFewSamples, TrainConfig, train_sae


def condition_ids(rows: list[dict], condition: str, train_ids: list[str], store: LayerStore, *,
                  min_completions: int = 20, min_tokens: int = 20_000) -> list[str]:  # fmt: skip
    """Training completions of `condition` (completions.ids_for_condition: mixed = honest + deceptive)
    that have activations in `store`; TooFewSamples names the counts by label."""
    train = set(train_ids)
    ids = [i for i in ids_for_condition(rows, condition) if i in train and i in store.entries]
    n_tokens = store.count(ids) if ids else 0
    if len(ids) < min_completions or n_tokens < min_tokens:
        labels = Counter(r.get("label") or "unlabelled" for r in rows if r["id"] in train)
        raise TooFewSamples(
            f"condition {condition!r} at layer {store.dir.name.removeprefix('layer_')} has {len(ids)} completions "
            f"({n_tokens} tokens); it needs at least {min_completions} completions and {min_tokens} tokens. "
            f"Training completions by label: {dict(labels)}. Sample more (notebook 02) or lower the minimums."
        )
    return ids


def train_grid(
    run_dir: str | os.PathLike,
    layers: list[int],
    architectures: list[str],
    conditions: list[str],
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    eval_fraction: float = 0.1,
    min_completions: int = 20,
    min_tokens: int = 20_000,
    plan_only: bool = False,
) -> list[dict[str, Any]]:
    """Train every layer × condition × architecture SAE of the run that is not complete yet. Returns one
    row per SAE: status "trained", "done earlier", "skipped" (with the reason) or, with `plan_only`,
    "to train". Every SAE trains on `cfg.train_tokens` tokens, so conditions compare at equal budgets."""
    run_dir = Path(run_dir)
    spec = (read_run_json(run_dir).get("model") or {}).get("spec")
    if not spec:
        raise FileNotFoundError(f"{run_dir}/run.json has no model: run notebook 01 with this RUN_NAME first")
    rows = read_completions(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}/completions.jsonl is missing or empty: run notebook 02 first")
    train_ids, eval_ids = split_completions(rows, eval_fraction, cfg.seed)
    status = []
    for layer, condition in itertools.product(layers, conditions):
        store, reason = LayerStore(run_dir, layer), None
        try:
            ids = condition_ids(rows, condition, train_ids, store, min_completions=min_completions, min_tokens=min_tokens)  # fmt: skip
        except TooFewSamples as err:
            print(f"skipping {condition} at layer {layer}: {err}")
            ids, reason = [], str(err)
        for arch in architectures:
            row = {"sae_id": f"{model_short(spec)}_{arch}_L{layer}_{condition}", "layer": layer,
                   "condition": condition, "architecture": arch, "completions": len(ids)}  # fmt: skip
            out = sae_dir(run_dir, row["sae_id"])
            if reason or plan_only or (out / SAE_METRICS).exists():
                done = "done earlier" if (out / SAE_METRICS).exists() else "to train"
                status.append({**row, "status": "skipped" if reason else done, "reason": reason})
                continue
            meta = {**row, "model_spec": spec, "n_eval_completions": len(eval_ids),
                    "dataset_path": f"{run_dir.name}/completions.jsonl"}  # fmt: skip
            m = train_sae(store, ids, replace(cfg, architecture=arch), out, hook_name=hooks.hook_name(layer),
                          model_name=spec, eval_ids=eval_ids, metadata=meta, device=device)  # fmt: skip
            summary = {k: m["activations"][k] for k in ("explained_variance", "l0", "dead_fraction")}
            status.append({**row, "status": "trained", **summary})
    return status


def import_sae(
    source: str | os.PathLike, run_dir: str | os.PathLike, *, eval_fraction: float = 0.1, seed: int = 0
) -> str:
    """Copy a published SAELens SAE into `run_dir/saes/` (our normalised form of it) and evaluate it on
    the run's held-out activations at its layer, so it joins the leaderboard; returns its sae_id
    `{model}_{arch}_L{layer}_imported-{folder name}`. Skipped when already imported."""

    loaded = load_sae(source)
    name = id_part(Path(str(source)).name)
    sae_id = f"{model_short(loaded.model_name or 'foreign')}_{loaded.sae.architecture}_L{loaded.layer}_imported-{name}"
    folder = sae_dir(run_dir, sae_id)
    if (folder / SAE_METRICS).exists():
        return sae_id
    meta = {
        "sae_id": sae_id,
        "layer": loaded.layer,
        "condition": f"imported-{name}",
        "imported_from": str(source),
    }
    save_sae(loaded.sae, folder, hook_name=f"blocks.{loaded.layer}.hook_resid_post",
             model_name=loaded.model_name or "unknown", metadata=meta)  # fmt: skip
    held = split_completions(read_completions(run_dir), eval_fraction, seed)[1]
    store = LayerStore(run_dir, loaded.layer)
    evaluation = evaluate_folder(folder, store, [i for i in held if i in store.entries])
    atomic_write_json(folder / SAE_METRICS, {**meta, "architecture": loaded.sae.architecture, **evaluation})
    return sae_id
