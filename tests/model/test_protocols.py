"""The protocols the package types its models and SAEs with fit what it really passes: every SAE
architecture (encode, W_dec, d_in, d_sae), a LoadedSAE, a LoadedModel and the offline model's tokenizer
(a converted nanochat tokenizer: tests/model/test_nanochat.py); a bare module is no
HookableModel (the functions that accept one take `ModelOrModule`)."""

from __future__ import annotations

import torch

from helpers.model.load import LoadedModel
from helpers.model.protocols import EncodingSAE, HookableModel, Tokenizer
from helpers.saes import ARCHITECTURES, make_sae
from helpers.saes.io import load_sae, save_sae


def test_every_sae_architecture_and_a_loaded_model_fit_the_protocols(tmp_path):
    for arch in ARCHITECTURES:
        sae = make_sae(arch, 8, 16, l0=2, seed=0)
        assert isinstance(sae, EncodingSAE), arch
        acts, _ = sae.encode(torch.zeros(3, 8))
        assert acts.shape == (3, 16) and sae.W_dec.shape == (16, 8)
    loaded = load_sae(
        save_sae(
            make_sae("topk", 8, 16, l0=2),
            tmp_path / "sae",
            hook_name="blocks.1.hook_resid_post",
            model_name="m",
        )
    )
    assert isinstance(loaded.sae, EncodingSAE) and loaded.layer == 1
    assert isinstance(LoadedModel(torch.nn.Linear(2, 2), tokenizer=None, info=None), HookableModel)
    assert not isinstance(torch.nn.Linear(2, 2), HookableModel)


def test_the_offline_models_tokenizer_is_a_tokenizer(offline_lm):
    assert isinstance(offline_lm, HookableModel) and isinstance(offline_lm.tokenizer, Tokenizer)
