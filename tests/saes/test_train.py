"""The training loop: resume is bitwise identical, warm-up is clamped, conditions and the grid, bad input.

Activations are real: SmolLM2's residuals (layer 2) on chat prompts answered with English prose, written
through the activation store exactly as notebook 02 writes them. `shared_run` and `residuals` are
imported by the other SAE test files.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from helpers.collect.completions import split_completions
from helpers.collect.store import ActivationWriter, LayerStore
from helpers.model.hooks import hook_name, run_with_capture
from helpers.run import activations_dir
from helpers.saes.pipeline import condition_ids, train_grid
from helpers.saes.train import StoreData, StreamData, TooFewSamples, TrainConfig, Trainer, train_sae

LAYER = 2
QUESTIONS = ["Did you take the money?", "Is the car in good condition?", "Were you home last night?"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prose() -> list[str]:
    """Real English text that ships with Python: the docstrings of a few stdlib modules' functions."""
    out = []
    for mod in (json, textwrap, itertools, inspect, Path, np.random):
        for name in sorted(dir(mod)):
            doc = None if name.startswith("_") else inspect.getdoc(getattr(mod, name, None))
            if doc and len(doc) > 300:
                out.append(" ".join(doc.split()))
    return out


def build_run(run_dir: Path, lm, labels: list[str], tokens_each: int = 48, layer: int = LAYER) -> Path:
    """A run folder as notebooks 01-02 leave it: run.json, completions.jsonl (two completions per prompt)
    and the completion tokens' residuals at `layer` in the store."""
    run_dir.mkdir(parents=True, exist_ok=True)
    helpers.update_run_json(run_dir, model=lm.info.to_dict(), run_name=run_dir.name)
    texts, rows = prose(), []
    with ActivationWriter(run_dir, layer, shard_tokens=512) as writer:
        for i, label in enumerate(labels):
            prompt = helpers.encode_chat(lm.tokenizer, QUESTIONS[i % len(QUESTIONS)])
            completion = lm.tokenizer.encode(texts[i % len(texts)], add_special_tokens=False)[:tokens_each]
            ids = torch.tensor([prompt + completion])
            acts = run_with_capture(lm.model, [hook_name(layer)], input_ids=ids)[hook_name(layer)]
            writer.add(f"p{i // 2}#{i % 2}", acts[0, len(prompt) :], first_position=len(prompt))
            rows.append(
                {
                    "id": f"p{i // 2}#{i % 2}",
                    "prompt_id": f"p{i // 2}",
                    "label": label,
                    "prompt_token_ids": prompt,
                    "completion_token_ids": completion,
                }
            )
    (run_dir / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


_SHARED: dict[str, Path] = {}


def shared_run(lm, tmp_path_factory) -> Path:
    """One run folder for the whole session (the SAE test files import this): 18 honest, 14 deceptive and
    2 ambiguous completions of 48 tokens, 17 prompts."""
    if "run" not in _SHARED:
        labels = ["honest", "deceptive"] * 12 + ["honest"] * 6 + ["deceptive", "ambiguous"] * 2
        _SHARED["run"] = build_run(tmp_path_factory.mktemp("shared_run"), lm, labels)
    return _SHARED["run"]


def residuals(lm, tmp_path_factory) -> torch.Tensor:
    """All stored residuals of the shared run, [n_tokens, 576] float32."""
    store = LayerStore(shared_run(lm, tmp_path_factory), LAYER)
    return torch.cat(list(store.iter_batches(4096, shuffle=False)))


@pytest.fixture(scope="module")
def run_dir(offline_lm, tmp_path_factory):
    return shared_run(offline_lm, tmp_path_factory)


def small_cfg(arch: str = "topk", **kw) -> TrainConfig:
    base = dict(
        architecture=arch,
        expansion=2,
        l0=8,
        train_tokens=40 * 64,
        batch_size=64,
        checkpoint_every=10,
        log_every=5,
        init_tokens=256,
        buffer_bytes=40_000,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated", "batchtopk"])
def test_resume_after_interruption_is_bitwise_identical(run_dir, tmp_path, monkeypatch, arch):
    store = LayerStore(run_dir, LAYER)
    ids = store.completion_ids[:12]  # ~570 tokens: 40 steps of 64 cross several epochs and shuffle buffers
    cfg = small_cfg(arch)
    kw = dict(hook_name=hook_name(LAYER), model_name="smollm2", progress=False)
    full = train_sae(StoreData(store, ids), cfg, tmp_path / "full", **kw)

    real_step = Trainer.train_step

    def disconnect_at_27(self, x):
        if self.step == 27:
            raise KeyboardInterrupt("Colab disconnected")
        return real_step(self, x)

    monkeypatch.setattr(Trainer, "train_step", disconnect_at_27)
    with pytest.raises(KeyboardInterrupt):
        train_sae(StoreData(store, ids), cfg, tmp_path / "resumed", **kw)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 20
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = train_sae(StoreData(store, ids), cfg, tmp_path / "resumed", **kw)

    weights = "sae_weights.safetensors"
    assert (tmp_path / "full" / weights).read_bytes() == (tmp_path / "resumed" / weights).read_bytes()
    assert full["training"]["history"] == resumed["training"]["history"]
    assert full["activations"] == resumed["activations"]
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists(), "checkpoint removed once complete"
    if arch == "batchtopk":  # θ calibrated once after training on the first tokens, the same on resume
        assert full["training"]["calibration"] == resumed["training"]["calibration"]
        assert full["training"]["calibration"]["tokens"] == cfg.batch_size * min(
            -(-cfg.init_tokens // cfg.batch_size), store.count(ids) // cfg.batch_size
        )
    else:
        assert "calibration" not in full["training"]


def test_cuda_out_of_memory_in_a_step_names_what_to_lower_and_keeps_the_checkpoint(
    run_dir, tmp_path, monkeypatch
):
    store = LayerStore(run_dir, LAYER)
    data, cfg = StoreData(store, store.completion_ids[:12]), small_cfg()
    kw = dict(hook_name=hook_name(LAYER), model_name="smollm2", progress=False)
    real_step = Trainer.train_step

    def out_of_memory_at_27(self, x):
        if self.step == 27:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_step(self, x)

    monkeypatch.setattr(Trainer, "train_step", out_of_memory_at_27)
    message = r"at step 27 of 40 \(64 tokens a step, 1152 latents\): lower BATCH_SIZE or EXPANSION"
    with pytest.raises(torch.cuda.OutOfMemoryError, match=message) as caught:
        train_sae(data, cfg, tmp_path / "sae", **kw)
    assert "checkpoint at step 20 is kept" in str(caught.value) and "(injected)" in str(caught.value)
    assert torch.load(tmp_path / "sae" / "checkpoint.pt", weights_only=True)["step"] == 20
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert train_sae(data, cfg, tmp_path / "sae", **kw)["training"]["tokens"] == 40 * 64  # resumed


def test_until_step_pauses_and_a_changed_config_is_refused(run_dir, tmp_path):
    store = LayerStore(run_dir, LAYER)
    kw = dict(hook_name=hook_name(LAYER), model_name="m", progress=False)
    paused = train_sae(StoreData(store, store.completion_ids), small_cfg(), tmp_path, until_step=15, **kw)
    assert paused == {"status": "paused", "step": 15, "checkpoint": str(tmp_path / "checkpoint.pt")}
    with pytest.raises(ValueError, match=r"other settings \(lr: checkpoint 0.001, now 0.0003\).*delete it"):
        train_sae(StoreData(store, store.completion_ids), small_cfg(lr=3e-4), tmp_path, **kw)


@pytest.mark.parametrize(
    ("arch", "input_norm", "want"),
    [
        ("topk", "auto", "sqrt_d_in"),
        ("batchtopk", "auto", "sqrt_d_in"),
        ("matryoshka_batchtopk", "auto", "sqrt_d_in"),
        ("jumprelu", "auto", "unit"),
        ("standard", "auto", "sqrt_d_in"),
        ("topk", "unit", "unit"),
        ("jumprelu", "sqrt_d_in", "sqrt_d_in"),
    ],
)
def test_input_norm_sets_the_training_scale(arch, input_norm, want):
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)) * 7 + 3
    run = Trainer(TrainConfig(architecture=arch, l0=4, input_norm=input_norm), d_in=16)
    run.init_from_data(x)
    assert run.input_norm == want
    scaled = x * run.scale
    if want == "sqrt_d_in":  # SAELens's expected_average_only_in: mean norm sqrt(d_in)
        assert float(scaled.norm(dim=1).mean()) == pytest.approx(4.0, rel=1e-5)
    else:
        assert float(scaled.pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-5)


def test_a_checkpoint_from_before_input_norm_resumes_at_its_own_scale():
    run = Trainer(TrainConfig(architecture="topk", l0=4), d_in=16)
    run.init_from_data(torch.randn(256, 16, generator=torch.Generator().manual_seed(1)) * 5)
    state = run.state_dict()
    state["config"] = {k: v for k, v in state["config"].items() if k != "input_norm"}
    state["scale"] = 0.123  # the unit-scale factor an older run used
    resumed = Trainer(TrainConfig(architecture="topk", l0=4), d_in=16)
    resumed.load_state_dict(state)
    assert resumed.scale == 0.123
    with pytest.raises(ValueError, match=r"input_norm: checkpoint 'unit', now 'auto'"):
        Trainer(TrainConfig(architecture="topk", l0=4), d_in=16).load_state_dict(
            {**state, "config": {**state["config"], "input_norm": "unit"}}
        )


def test_warmup_longer_than_the_run_is_clamped():
    cfg = TrainConfig(
        train_tokens=100 * 1024, batch_size=1024, warmup_steps=10_000, lr=1e-3, decay_fraction=0.2
    )
    lrs = [cfg.lr_at(s) for s in range(cfg.total_steps)]
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[4] == pytest.approx(1e-3), "5% of 100 steps"
    assert max(lrs) == pytest.approx(1e-3) and lrs[50] == 1e-3
    assert lrs[-1] == pytest.approx(1e-3 / 20) and all(
        a >= b for a, b in zip(lrs[80:], lrs[81:], strict=False)
    )


def test_config_errors_name_the_fix():
    with pytest.raises(
        KeyError, match="known ones are standard, topk, batchtopk, matryoshka_batchtopk, jumprelu"
    ):
        TrainConfig(architecture="relu")
    with pytest.raises(ValueError, match="bandwidth"):
        TrainConfig(architecture="topk", sae_options={"bandwidth": 0.1})
    with pytest.raises(ValueError, match="GPU"):
        Trainer(TrainConfig(precision="fp16"), d_in=8)


def test_non_finite_activations_stop_with_their_location(run_dir, tmp_path):
    bad = tmp_path / "bad"
    for p in activations_dir(run_dir, LAYER).glob("shard_*"):
        (activations_dir(bad, LAYER) / p.name).parent.mkdir(parents=True, exist_ok=True)
        (activations_dir(bad, LAYER) / p.name).write_bytes(p.read_bytes())
    shard = np.load(activations_dir(bad, LAYER) / "shard_00000.npy", mmap_mode="r+")
    shard[:] = np.nan  # a corrupt shard: every row of it is NaN
    shard.flush()
    store = LayerStore(bad, LAYER)
    with pytest.raises(
        ValueError, match=r"non-finite activation \(nan\) in training batch \d+ .*row \d+, dim 0"
    ):
        train_sae(
            StoreData(store, store.completion_ids),
            small_cfg(),
            tmp_path / "sae",
            hook_name=hook_name(LAYER),
            model_name="m",
        )


def test_split_holds_out_whole_groups():
    rows = [
        {"id": f"p{i}/{v}#{j}", "prompt_id": f"p{i}/{v}", "group": f"p{i}"}
        for i in range(40)
        for v in ("honest", "dishonest")
        for j in range(2)
    ]
    train, held = split_completions(rows, eval_fraction=0.2, seed=0)
    groups = lambda ids: {i.split("/")[0] for i in ids}  # noqa: E731
    assert groups(train).isdisjoint(groups(held)) and len(train) + len(held) == 160
    assert 3 <= len(groups(held)) <= 16, "about 20% of the groups"
    more = rows + [{"id": "new/honest#0", "prompt_id": "new/honest", "group": "new"}]
    assert set(held) <= set(split_completions(more, 0.2, 0)[1]), "adding completions never moves old ones"
    no_group = [{"id": f"q{i}#0", "prompt_id": f"q{i}"} for i in range(30)]
    assert 0 < len(split_completions(no_group, 0.2, 0)[1]) < 30, "prompt_id when there is no group"


def test_too_few_samples_names_the_counts(run_dir):
    store = LayerStore(run_dir, LAYER)
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(condition_ids(rows, "mixed", ids, store, min_completions=5, min_tokens=100)) == 32, (
        "no ambiguous"
    )
    with pytest.raises(
        TooFewSamples,
        match=r"'deceptive_only' at layer 2 has 14 completions \(\d+ tokens\).*"
        r"at least 20 completions.*'honest': 18, 'deceptive': 14, 'ambiguous': 2",
    ):
        condition_ids(rows, "deceptive_only", ids, store, min_completions=20, min_tokens=100)
    with pytest.raises(ValueError, match="unknown condition 'liars'"):
        condition_ids(rows, "liars", ids, store)


def test_grid_trains_skips_and_resumes(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "completions.jsonl", "activations"):
        (run / name).symlink_to(run_dir / name)
    cfg = small_cfg(train_tokens=10 * 64, checkpoint_every=5)
    grid = dict(
        layers=[LAYER], architectures=["topk", "gated"], conditions=["mixed", "deceptive_only"], cfg=cfg
    )
    status = train_grid(run, **grid, min_completions=8, min_tokens=200)
    assert [s["status"] for s in status] == ["trained", "trained", "skipped", "skipped"]
    assert "skipping deceptive_only at layer 2" in capsys.readouterr().out
    sid = "smollm2-135m-instruct_gated_L2_mixed"
    assert status[1]["sae_id"] == sid
    folder = run / "saes" / sid
    assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors", "metrics.json"}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (
        metrics["condition"] == "mixed" and metrics["layer"] == LAYER and metrics["architecture"] == "gated"
    )
    assert 0 < metrics["activations"]["l0"] < 2 * 576 and metrics["training"]["tokens"] == 640
    again = train_grid(run, **grid, min_completions=8, min_tokens=200)
    assert [s["status"] for s in again[:2]] == ["done earlier"] * 2


def test_a_full_disk_names_the_folder_free_space_and_fix_and_keeps_the_checkpoint(
    run_dir, tmp_path, monkeypatch
):
    store = LayerStore(run_dir, LAYER)
    kw = dict(hook_name=hook_name(LAYER), model_name="m", progress=False)
    train_sae(StoreData(store, store.completion_ids), small_cfg(), tmp_path, until_step=10, **kw)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the disk fills while the step-20 checkpoint is written
    with pytest.raises(
        OSError, match=rf"{tmp_path} is full.*checkpoint\.pt.* GB free there.*Free space"
    ) as err:
        train_sae(StoreData(store, store.completion_ids), small_cfg(), tmp_path, **kw)
    assert err.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # step 10 kept, no temp file
    monkeypatch.undo()
    assert (
        train_sae(StoreData(store, store.completion_ids), small_cfg(), tmp_path, **kw)["training"]["tokens"]
        == 40 * 64
    )


def test_train_sae_refuses_unknown_settings_and_a_stream_without_held_out_data(tmp_path):
    stream = StreamData(type("Stream", (), {"d_model": 8})())
    kw = dict(hook_name=hook_name(LAYER), model_name="m")
    with pytest.raises(TypeError, match=r"\['eval_ids'\]: the training run settings are \['device'"):
        train_sae(stream, small_cfg(), tmp_path, eval_ids=["p0#0"], **kw)
    with pytest.raises(ValueError, match=r"needs held_out: StoreData\(store, ids\) or a list of batches"):
        train_sae(stream, small_cfg(), tmp_path, progress=False, **kw)
    assert not any(tmp_path.iterdir()), "refused before anything is written"
