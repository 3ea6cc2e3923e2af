"""SAELens format, both ways: sae_lens itself loads our folders (with the normalisation folded in) and
reproduces our encode/decode; folders written by sae_lens (and older SAELens versions) load through
`load_sae`, whatever their hook-name spelling."""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch
from safetensors.torch import load_file, save_file

from helpers.saes import ARCHITECTURES, GatedSAE, JumpReLUSAE, TopKSAE
from helpers.saes.evals import leaderboard
from helpers.saes.io import SAELENS_FORMAT_VERSION, find_sae_folders, load_sae, save_sae
from helpers.saes.pipeline import import_sae
from helpers.saes.standard import StandardSAE
from helpers.saes.train import TrainConfig, Trainer
from tests.saes.test_train import residuals, shared_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def acts(offline_lm, tmp_path_factory) -> torch.Tensor:
    return residuals(offline_lm, tmp_path_factory)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sae_lens_reproduces_our_encode_and_decode(arch, acts, tmp_path):
    run = Trainer(
        TrainConfig(architecture=arch, expansion=2, l0=16, train_tokens=40 * 64, batch_size=64), d_in=576
    )
    run.init_from_data(acts[:512])
    for i in range(40):  # trained weights, not the init
        run.train_step(acts[i * 37 % (len(acts) - 64) :][:64])
    assert abs(run.scale - 1) > 0.1, "a real normalisation scale to fold"
    save_sae(run.sae, tmp_path, hook_name="blocks.2.hook_resid_post", model_name="smollm2", scale=run.scale)

    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    saved = run.sae.saelens_architecture  # batchtopk and matryoshka_batchtopk are saved as jumprelu
    assert saved == ("jumprelu" if "batchtopk" in arch else arch)
    assert theirs.cfg.architecture() == saved and theirs.cfg.normalize_activations == "none"
    x = acts[:200]  # raw residuals: the folded SAE must not need our scale
    with torch.no_grad():
        want_acts = run.sae.encode(x * run.scale)[0] * run.sae.folded_norms() / run.scale
        want_x_hat = run.sae(x * run.scale) / run.scale
        got_acts = theirs.encode(x)
        torch.testing.assert_close(got_acts, want_acts, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs.decode(got_acts), want_x_hat, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] == SAELENS_FORMAT_VERSION >= "6.0.0"
    assert (cfg["d_in"], cfg["d_sae"], cfg["metadata"]["hook_name"]) == (
        576,
        1152,
        "blocks.2.hook_resid_post",
    )
    expected = {
        "standard": {"b_enc"},
        "topk": {"b_enc"},
        "jumprelu": {"b_enc", "threshold"},
        "gated": {"b_gate", "b_mag", "r_mag"},
    }
    assert (
        set(load_file(tmp_path / "sae_weights.safetensors")) == {"W_enc", "W_dec", "b_dec"} | expected[saved]
    )
    if saved != arch:
        assert cfg["trained_as"] == arch and (got_acts > 0).any(), "a threshold that lets latents fire"


def sae_lens_sae(arch: str, hook: str, **cfg_kw):
    """An SAE built and perturbed with sae_lens's own classes (as a published folder would be)."""
    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
    }
    cls, cfg_cls = classes[arch]
    meta = sae_lens.saes.sae.SAEMetadata(hook_name=hook, model_name="nanochat-d32")
    sae = cls(cfg_cls(d_in=576, d_sae=256, metadata=meta, **cfg_kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            if name == "W_dec":
                p.mul_(1 + torch.rand(p.shape[0], 1, generator=g))  # rows of unequal norms
            if name == "threshold":
                p.copy_(0.2 * torch.rand(p.shape, generator=g))
    return sae


FOREIGN = [  # (architecture, hook name as published, config extras, layer it reads)
    ("standard", "transformer.h.12", {}, 12),
    ("topk", "blocks.3.hook_resid_post", {"k": 20, "rescale_acts_by_decoder_norm": True}, 3),
    ("jumprelu", "blocks.4.hook_resid_pre", {}, 3),
    ("gated", "model.layers.7", {"apply_b_dec_to_input": False}, 7),
]


@pytest.mark.parametrize(("arch", "hook", "extra", "layer"), FOREIGN, ids=[f[0] for f in FOREIGN])
def test_folders_written_by_sae_lens_load_through_the_same_function(arch, hook, extra, layer, acts, tmp_path):
    theirs = sae_lens_sae(arch, hook, **extra)
    theirs.save_model(tmp_path / "sub" / arch)
    assert find_sae_folders(tmp_path) == [tmp_path / "sub" / arch]
    loaded = load_sae(tmp_path / "sub" / arch)
    assert (loaded.layer, loaded.hook_name, loaded.model_name) == (layer, hook, "nanochat-d32")
    assert isinstance(
        loaded.sae,
        {"standard": StandardSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE, "gated": GatedSAE}[arch],
    )
    x = acts[:100]
    with torch.no_grad():
        want = theirs.encode(x)
        got = loaded.sae.encode(x)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.sae.decode(got), theirs.decode(want), rtol=1e-4, atol=1e-4)
    assert (want > 0).float().mean() > 0.01, "a non-trivial comparison"


def test_legacy_config_and_strict_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "W_enc": torch.randn(8, 16, generator=g),
        "W_dec": torch.randn(16, 8, generator=g),
        "b_enc": torch.randn(16, generator=g),
        "b_dec": torch.randn(8, generator=g),
    }
    legacy = {
        "d_in": 8,
        "d_sae": 16,
        "dtype": "float32",
        "hook_point": "blocks.2.hook_resid_post",
        "activation_fn_str": "relu",
        "sae_lens_version": "3.5.0",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(legacy))
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    loaded = load_sae(tmp_path)
    x = torch.randn(5, 8, generator=g)
    relu = ((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]).relu()
    assert loaded.layer == 2 and isinstance(loaded.sae, StandardSAE)
    torch.testing.assert_close(loaded.sae.encode(x)[0], relu)

    save_file({**tensors, "extra": torch.zeros(1)}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**legacy, "architecture": "jumprelu", "hook_point": "x"}))
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"missing \['threshold'\]"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**legacy, "architecture": "batchtopk"}))
    with pytest.raises(ValueError, match="'batchtopk' is not one SAELens loads.*saved as jumprelu"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a SAELens SAE folder.*sae_weights.safetensors"):
        load_sae(tmp_path)


def test_a_published_sae_joins_the_run(offline_lm, tmp_path_factory, tmp_path):
    """A foreign folder (module-path hook name) is copied into saes/ and evaluated on the run's held-out
    activations at its layer, so it shows up on the leaderboard next to the SAEs trained here."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "completions.jsonl", "activations"):
        (run / name).symlink_to(shared_run(offline_lm, tmp_path_factory) / name)
    sae_lens_sae("topk", "model.layers.2", k=8).save_model(tmp_path / "hub" / "deception_L2")
    sae_id = import_sae(tmp_path / "hub" / "deception_L2", run)
    assert sae_id == "d32_topk_L2_imported-deception-L2", (
        "model 'nanochat-d32' -> d32; '_' is the id separator"
    )
    metrics = json.loads((run / "saes" / sae_id / "metrics.json").read_text())
    assert (
        metrics["layer"] == 2 and metrics["activations"]["l0"] == 8 and metrics["activations"]["n_tokens"] > 0
    )
    assert load_sae(run / "saes" / sae_id).hook_name == "blocks.2.hook_resid_post"
    assert [r["sae_id"] for r in leaderboard(run)] == [sae_id]
    assert import_sae(tmp_path / "hub" / "deception_L2", run) == sae_id, "a second import is a no-op"
