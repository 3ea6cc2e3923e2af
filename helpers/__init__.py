"""helpers: the library behind the deception-SAE notebooks.

A thin core and one subpackage per notebook stage; imports run one way, core <- model <- collect <- saes
<- analysis <- steer <- explore (tests/test_imports.py checks it):

    core       release (version, install URL), env (machine, Drive, secrets, smoke mode), run (THE run
               folder: paths, run.json, atomic writes, JSONL), stats, tables, gemini (the one client),
               plots, publish
    model/     01: loading any checkpoint, nanochat (every layout), chat formatting, hooks
    collect/   02: prompt sets, sampling, completions, the judge, activation store and capture, the
               reference corpus (streamed Hub or local text)
    saes/      03: the SAE contract, kernels, one file per architecture (topk, batchtopk,
               matryoshka_batchtopk, jumprelu, gated, standard), SAELens io, training, evals, grid, Hub
    analysis/  04: probes, feature statistics, token windows, autointerp, scoring
    steer/     05: directions and interventions, steering experiments with controls, the panel
    explore/   06: per-feature dashboards in one pass, notebook views, live tracking and the deception
               meter, the static HTML explorer, the Neuronpedia export

The names the notebooks use most are re-exported here (`helpers.setup`, `helpers.load_model`, ...).
"""

from helpers.env import Env, choose_dtype, get_secret, setup, smoke_overrides
from helpers.model.chat import chat, encode_chat, stop_token_ids
from helpers.model.hooks import (
    add_to_residual,
    capture,
    check_layers,
    default_layers,
    hook_name,
    hook_points,
    hook_table,
    run_with_capture,
)
from helpers.model.load import OFFLINE_MODEL, LoadedModel, ModelInfo, load_model, load_run_model
from helpers.release import GITHUB_REPO, __version__
from helpers.run import mark_stage, read_run_json, run_summary, update_run_json

__all__ = [
    "GITHUB_REPO",
    "OFFLINE_MODEL",
    "Env",
    "LoadedModel",
    "ModelInfo",
    "__version__",
    "add_to_residual",
    "capture",
    "chat",
    "check_layers",
    "choose_dtype",
    "default_layers",
    "encode_chat",
    "get_secret",
    "hook_name",
    "hook_points",
    "hook_table",
    "load_model",
    "load_run_model",
    "mark_stage",
    "read_run_json",
    "run_summary",
    "run_with_capture",
    "setup",
    "smoke_overrides",
    "stop_token_ids",
    "update_run_json",
]
