"""Notebook 06 over a run folder: build every SAE's dashboards once, write the static explorer
(`explorer/`) and the Neuronpedia export (`neuronpedia/`), and summarise them (DESIGN.md §3).

`build_explorer` loads the run's SAEs (optionally filtered by a substring of their id), checks each
against the run's model and layers, makes its dashboards in one pass over the activation store
(dashboards.py; the reference corpus of its layer too, when notebook 02 stored one) and writes them
(site.py).

Settings, as at every stage (`run.check_stage_settings`): the explorer's settings (`stage_settings`:
the ExplorerConfig but its batch size, and whether logit effects are computed) are recorded in run.json;
a rerun with other settings stops before writing anything, naming each difference and the choices (a
new RUN_NAME, OVERWRITE, which moves the old explorer/ and neuronpedia/ to replaced/, or the old values).
With the same settings, an SAE whose data are complete with the same inputs (its weights file,
completions.jsonl, the stored corpus of its layer, notebook 04's file, the SAEs beside it at its layer
and the version of the pages' fields, `DATA_FORMAT`: data of an older release are rebuilt) is reused,
so Run all after a disconnect resumes with the next SAE; one whose inputs changed (notebook 03 or 04
redone, with their own settings checks) is rebuilt.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from helpers.explore.dashboards import (
    DATA_FORMAT,
    NO_ANALYSIS,
    ExplorerConfig,
    build_dashboards,
    check_sae_for_run,
    corpus_store_of,
)
from helpers.explore.decoder import unembedding_of
from helpers.explore.site import COMPLETE, DATA, is_complete, sae_info, write_sae_data, write_site
from helpers.model.load import load_tokenizer
from helpers.model.protocols import HookableModel, Tokenizer
from helpers.run import (
    SAE_WEIGHTS,
    check_stage_settings,
    completions_path,
    explorer_dir,
    features_path,
    neuronpedia_dir,
    saes_dir,
    set_aside,
)
from helpers.saes.io import LoadedSAE, find_sae_folders, load_sae


def run_saes(run_dir: str | os.PathLike, sae_filter: str = "", *, device: str = "cpu") -> list[LoadedSAE]:
    """The run's SAEs whose id contains `sae_filter` (all when empty), loaded; a clear error when none."""
    folders = find_sae_folders(saes_dir(run_dir))
    if not folders:
        raise FileNotFoundError(f"no SAEs under {saes_dir(run_dir)}: train some in notebook 03 first")
    chosen = [f for f in folders if sae_filter in f.name]
    if not chosen:
        raise ValueError(
            f"no SAE id contains {sae_filter!r}; the run has: {', '.join(f.name for f in folders)}"
        )
    return [load_sae(f, device=device) for f in chosen]


def _stamp(path: Path) -> list[Any]:
    """What changes when a file is rewritten (size and modification time), or None when it is absent."""
    return [path.stat().st_size, int(path.stat().st_mtime)] if path.exists() else None


def _corpus_stamp(run_dir: Path, layer: int) -> list[int] | None:
    """What changes when the stored corpus of `layer` grows or gains token ids; None when there is none."""
    corpus = corpus_store_of(run_dir, layer)
    return None if corpus is None else [corpus.n_tokens, len(corpus.has_token_ids), sum(corpus.has_token_ids)]


EXPLORE_STAGE = "06_explore_features"
NOT_SETTINGS = ("batch_tokens",)
"""ExplorerConfig fields that change only speed and memory, not the pages: left out of the settings."""


def stage_settings(config: ExplorerConfig, logit_effects: bool) -> dict[str, Any]:
    """What notebook 06's choices make of the explorer's data, as recorded in run.json and compared on a
    rerun: the ExplorerConfig (but NOT_SETTINGS) and whether logit effects are computed (a model given)."""
    values = {k: v for k, v in asdict(config).items() if k not in NOT_SETTINGS}
    return {"config": values, "logit_effects": bool(logit_effects)}


def _recorded_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings of explorer data written before run.json recorded them (their complete.json), to
    compare a rerun with; None when there are none."""
    for path in sorted((explorer_dir(run_dir) / DATA).glob(f"*/{COMPLETE}")):
        old = json.loads(path.read_text()).get("settings") or {}
        if isinstance(old.get("config"), dict) and "logit_effects" in old:
            config = {k: v for k, v in old["config"].items() if k not in NOT_SETTINGS}
            return {"config": config, "logit_effects": old["logit_effects"]}
    return None


def check_explorer(
    run_dir: str | os.PathLike,
    config: ExplorerConfig,
    logit_effects: bool,
    *,
    overwrite: bool = False,
    keep_replaced: bool | None = None,
) -> str:
    """Notebook 06's settings against those of the explorer already in the run folder (run.json, or the
    data's own record for a folder from before): the same resume; others stop before anything is written,
    naming each difference and the choices, unless `overwrite`, which moves explorer/ and neuronpedia/
    to replaced/ (`run.set_aside`; `keep_replaced` False deletes them). Returns check_stage_settings's
    decision."""
    run_dir = Path(run_dir)
    has_outputs = any((explorer_dir(run_dir) / DATA).glob(f"*/{COMPLETE}"))
    decision = check_stage_settings(
        run_dir,
        EXPLORE_STAGE,
        stage_settings(config, logit_effects),
        overwrite=overwrite,
        has_outputs=has_outputs,
        legacy=_recorded_settings(run_dir) if has_outputs else None,
        overwrite_does="move this run's explorer/ and neuronpedia/ to replaced/ and build them again "
        "with the new settings",
    )
    if decision == "overwrite":
        set_aside(
            run_dir, EXPLORE_STAGE, [explorer_dir(run_dir), neuronpedia_dir(run_dir)], keep=keep_replaced
        )
    return decision


def build_explorer(
    run_dir: str | os.PathLike,
    *,
    lm: HookableModel | None = None,
    tokenizer: Tokenizer = None,
    sae_filter: str = "",
    max_saes: int = 0,
    config: ExplorerConfig | None = None,
    overwrite: bool = False,
    keep_replaced: bool | None = None,
) -> list[dict[str, Any]]:
    """Dashboards of every feature of the run's SAEs (those matching `sae_filter`, the first `max_saes`
    of them in id order when > 0), written as the static explorer; returns one summary row per SAE.
    `lm` (the run's LoadedModel) gives logit effects and the tokenizer; without it the tokenizer is
    loaded from run.json's model and logit effects are left out. Settings other than those of the
    explorer on disk stop before anything is written unless `overwrite` (`check_explorer`)."""
    run_dir = Path(run_dir)
    cfg = config or ExplorerConfig()
    device = str(next(lm.model.parameters()).device) if lm is not None else "cpu"
    everything = run_saes(run_dir, device=device)  # all of them: neighbours in the other SAEs of a layer
    chosen = [s for s in everything if sae_filter in s.path.name][: max_saes if max_saes > 0 else None]
    if not chosen:
        raise ValueError(
            f"no SAE id contains {sae_filter!r}; the run has: {', '.join(s.path.name for s in everything)}"
        )
    for s in chosen:
        check_sae_for_run(s, run_dir)  # all refused before any work
    unembedding = unembedding_of(lm.model) if lm is not None else None
    check_explorer(run_dir, cfg, unembedding is not None, overwrite=overwrite, keep_replaced=keep_replaced)
    if tokenizer is None:
        tokenizer = lm.tokenizer if lm is not None else load_tokenizer(run_dir)
    rows = []
    for s in chosen:
        sid = s.sae_id
        same_layer = sorted(o.sae_id for o in everything if o.layer == s.layer and o is not s)
        settings = {
            "format": DATA_FORMAT,
            "config": stage_settings(cfg, unembedding is not None)["config"],
            "weights": _stamp(s.path / SAE_WEIGHTS),
            "completions": _stamp(completions_path(run_dir)),
            "notebook_04": _stamp(features_path(run_dir, sid)),
            "logit_effects": unembedding is not None,
            "same_layer": same_layer,
            "corpus": _corpus_stamp(run_dir, s.layer),
        }
        if is_complete(run_dir, sid, settings):
            print(f"{sid}: explorer data complete, reused")
        else:
            db = build_dashboards(
                run_dir, s, tokenizer=tokenizer, unembedding=unembedding, others=everything, config=cfg
            )
            write_sae_data(run_dir, db, settings)
        info = sae_info(run_dir, sid)
        for note in info["notes"]:
            print(f"{sid}: {note}")
        rows.append(
            {
                "sae_id": sid,
                "layer": info["layer"],
                "features": info["d_sae"],
                "fired": info["n_alive"],
                "tokens": sum(info["n_tokens"].values()),
                "completions": info["n_completions"],
                "corpus tokens": (info.get("corpus") or {}).get("n_tokens", 0),
                "notebook 04": "no" if NO_ANALYSIS in info["notes"] else "yes",
            }
        )
    index = write_site(run_dir)
    print(f"explorer: {index} (open it in a browser; it needs no server)")
    return rows
