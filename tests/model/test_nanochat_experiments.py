"""nanochat's experiment refactor (PR #800, oracle commit e4286f8): checkpoints in
`experiments/<name>/<model_tag>/<base|mid|sft|rl>/` and the tokenizer in `experiments/<name>/tokenizer/`.
The folders are made by upstream's own `checkpoint_manager.get_checkpoint_dir` / `save_checkpoint` and
`tokenizer.get_tokenizer_dir` at that commit (its model code is 92d63d4's, checked byte for byte), and
the stage folder, the model-tag folder and the experiment folder load with `load_model`, giving upstream's
logits."""

from __future__ import annotations

import filecmp
import pickle
import sys
from pathlib import Path

import pytest
import torch

import helpers
from tests.model.nanochat_oracle import (
    LONG,
    build_oracle,
    import_oracle,
    oracle_dir,
    sample_ids,
    tiny_encoding,
)

EXPERIMENTS = "2026-07-04-e4286f8-experiments"
MODEL = "2026-07-03-92d63d4"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """experiments/deception/d4/{base,sft} written by upstream's code (sft with other weights), and the
    upstream models that wrote them."""
    root = tmp_path_factory.mktemp("nanochat_experiments")
    assert filecmp.cmp(
        oracle_dir(EXPERIMENTS) / "nanochat" / "gpt.py",
        oracle_dir(MODEL) / "nanochat" / "gpt.py",
        shallow=False,
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(root))
    mp.setenv("NANOCHAT_EXPERIMENT", "deception")
    try:
        ckpt = import_oracle(EXPERIMENTS, "checkpoint_manager")
        tok = import_oracle(EXPERIMENTS, "tokenizer")
        models = {}
        for stage, seed in (("base", 0), ("sft", 1)):
            model, config = build_oracle(MODEL, seed=seed)
            folder = ckpt.get_checkpoint_dir("d4", stage)
            ckpt.save_checkpoint(folder, 10, model.state_dict(), None, {"step": 10, "model_config": config})
            models[stage] = model
        mp.syspath_prepend(
            str(oracle_dir(EXPERIMENTS))
        )  # get_tokenizer_dir imports nanochat.common when called
        tok_dir = tok.get_tokenizer_dir()
    finally:
        mp.undo()
        for name in [n for n in sys.modules if n == "nanochat" or n.startswith("nanochat.")]:
            del sys.modules[name]
    Path(tok_dir).mkdir(parents=True)
    with open(f"{tok_dir}/tokenizer.pkl", "wb") as f:  # where upstream's get_tokenizer() reads it
        pickle.dump(tiny_encoding(), f)
    return root / "experiments" / "deception", models


def test_a_stage_folder_loads_with_the_experiments_tokenizer_and_upstreams_logits(experiment, tmp_path):
    exp, models = experiment
    assert (
        not (exp / "d4" / "sft" / "tokenizer.pkl").exists() and (exp / "tokenizer" / "tokenizer.pkl").exists()
    )
    ids = torch.tensor([sample_ids(LONG[MODEL])])
    for stage in ("base", "sft"):
        lm = helpers.load_model(str(exp / "d4" / stage), device="cpu", cache_dir=tmp_path)
        with torch.no_grad():
            want = models[stage](ids)
            got = lm.model(ids).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert lm.tokenizer.encode("hello world", add_special_tokens=False) == tiny_encoding().encode(
        "hello world"
    )


def test_an_experiment_folder_names_its_checkpoints_and_one_with_a_single_one_loads(experiment, tmp_path):
    exp, models = experiment
    with pytest.raises(
        FileNotFoundError, match=r"nanochat experiment with several checkpoints.*d4/base.*d4/sft"
    ):
        helpers.load_model(str(exp), device="cpu", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"several checkpoints.*base.*sft"):
        helpers.load_model(str(exp / "d4"), device="cpu", cache_dir=tmp_path)
    single = tmp_path / "experiments" / "one"
    (single / "d4").mkdir(parents=True)
    (single / "d4" / "sft").symlink_to(exp / "d4" / "sft")
    (single / "tokenizer").symlink_to(exp / "tokenizer")
    lm = helpers.load_model(str(single), device="cpu", cache_dir=tmp_path / "cache")
    ids = torch.tensor([sample_ids(24)])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, models["sft"](ids), atol=2e-5, rtol=1e-5)


def test_a_checkpoint_without_any_tokenizer_names_both_places(experiment, tmp_path):
    exp, _ = experiment
    lone = tmp_path / "a" / "b" / "sft"
    lone.mkdir(parents=True)
    for p in (exp / "d4" / "sft").iterdir():
        (lone / p.name).symlink_to(p)
    with pytest.raises(
        FileNotFoundError, match=r"tokenizer.pkl is missing, and so is .*a/tokenizer/tokenizer.pkl"
    ):
        helpers.load_model(str(lone), device="cpu", cache_dir=tmp_path / "cache")


def test_a_hub_repo_with_several_stages_is_loaded_one_folder_at_a_time():
    """A community repo holding base, SFT and RL checkpoints (as Bevisy/nanochat-d24 says it does: its file
    list is not reachable offline, so the layouts here are the two nanochat writes) never mixes stages."""
    from helpers.model.load import native_hub_files

    stages = [
        "base/model_021400.pt",
        "base/meta_021400.json",
        "sft/model_000700.pt",
        "sft/meta_000700.json",
        "rl/model_000300.pt",
        "rl/meta_000300.json",
        "tokenizer/tokenizer.pkl",
        "README.md",
    ]
    with pytest.raises(
        FileNotFoundError, match=r"several folders.*'org/d24/base', 'org/d24/rl', 'org/d24/sft'"
    ):
        native_hub_files(stages, repo="org/d24")
    assert native_hub_files(stages, "sft") == [
        "sft/model_000700.pt",
        "sft/meta_000700.json",
        "tokenizer/tokenizer.pkl",
    ]
    assert native_hub_files(stages, "rl")[0] == "rl/model_000300.pt"
    assert native_hub_files(stages, "mid") is None
    experiment = [
        "experiments/e/d24/sft/model_000700.pt",
        "experiments/e/d24/sft/meta_000700.json",
        "experiments/e/tokenizer/tokenizer.pkl",
        "experiments/e/d24/base/model_021400.pt",
        "experiments/e/d24/base/meta_021400.json",
    ]
    assert native_hub_files(experiment, "experiments/e/d24/sft") == experiment[:3]
