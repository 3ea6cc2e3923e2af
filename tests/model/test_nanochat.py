"""Tests for helpers.nanochat: native nanochat checkpoint -> transformers NanoChatForCausalLM folder.

A tiny random NanoChat is written in nanochat's own layout (renamed weights, meta json, a pickled tiktoken
Encoding), converted, and compared with the model it came from. CPU-only, offline, seeded.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import tiktoken
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, NanoChatConfig, NanoChatForCausalLM

from helpers.model import nanochat
from helpers.model.chat import chat_format_of, encode_chat
from helpers.model.protocols import Tokenizer
from tests.model.nanochat_oracle import tiny_encoding

SPECIALS = list(nanochat.SPECIAL_TOKENS)
SAMPLE = "hello world, the other thing in 2025!\n  \u00fcn\u00efcode \U0001f600 ok"

# transformers key -> native nanochat key (the reverse of the converter's table, written out independently)
HF_TO_NATIVE = {"model.embed_tokens.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}
LAYER_HF_TO_NATIVE = {
    "self_attn.q_proj": "attn.c_q",
    "self_attn.k_proj": "attn.c_k",
    "self_attn.v_proj": "attn.c_v",
    "self_attn.o_proj": "attn.c_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def build_native_checkpoint(
    folder, *, dtype=torch.float32, compile_prefix=False, extra=None, drop=(), step=10
):
    """Write a tiny random NanoChat in nanochat's native layout into `folder`; return (hf_model, encoding)."""
    enc = tiny_encoding()
    torch.manual_seed(0)
    config = NanoChatConfig(
        vocab_size=enc.n_vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=128,
        rms_norm_eps=torch.finfo(torch.float32).eps,  # nanochat's F.rms_norm(eps=None)
    )
    model = NanoChatForCausalLM(config).eval()
    for param in model.parameters():  # not model.to(dtype): that would also cast the fp32 rotary buffer
        param.data = param.data.to(dtype)
    native = {}
    for key, tensor in model.state_dict().items():
        if key in HF_TO_NATIVE:
            new = HF_TO_NATIVE[key]
        else:
            _, _, i, *rest = key.split(".")  # model.layers.{i}.<module>.<proj>.weight
            new = f"transformer.h.{i}.{LAYER_HF_TO_NATIVE['.'.join(rest[:-1])]}.weight"
        native[new] = tensor.clone()
    native.update(extra or {})
    for key in drop:
        del native[key]
    if compile_prefix:
        native = {f"_orig_mod.{k}": v for k, v in native.items()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(native, folder / f"model_{step:06d}.pt")
    meta = {
        "model_config": {
            "vocab_size": enc.n_vocab,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_kv_head": 2,
            "sequence_len": 128,
        },
        "step": step,
    }
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    with open(folder / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    torch.save(torch.ones(enc.n_vocab, dtype=torch.int32), folder / "token_bytes.pt")
    return model, enc


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("nc")
    model, enc = build_native_checkpoint(root / "native", compile_prefix=True)
    out = nanochat.convert_native_checkpoint(root / "native", root / "hf")
    return model, enc, out


def test_is_native_and_find_step(tmp_path):
    assert not nanochat.is_native_checkpoint(tmp_path)
    (tmp_path / "model_000010.pt").touch()
    assert not nanochat.is_native_checkpoint(tmp_path)  # no matching meta yet
    (tmp_path / "meta_000010.json").touch()
    (tmp_path / "model_000030.pt").touch()  # no meta_000030.json: not a usable step
    for step in (5, 20):
        (tmp_path / f"model_{step:06d}.pt").touch()
        (tmp_path / f"meta_{step:06d}.json").touch()
    assert nanochat.is_native_checkpoint(tmp_path)
    assert nanochat.find_step(tmp_path) == 20
    assert nanochat.find_step(tmp_path, 10) == 10
    with pytest.raises(FileNotFoundError, match=r"step 30 .*\[5, 10, 20\]"):
        nanochat.find_step(tmp_path, 30)
    with pytest.raises(FileNotFoundError, match="model_<step>.pt"):
        nanochat.find_step(tmp_path / "nowhere")


def test_logits_match_fp32(converted):
    model, enc, out = converted
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.float32
    ids = torch.tensor([[enc._special_tokens["<|bos|>"], *enc.encode_ordinary(SAMPLE)]])
    with torch.no_grad():
        want, got = model(ids).logits, hf(ids).logits
    assert got.shape == (1, ids.shape[1], enc.n_vocab)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_checkpoint_stays_bf16(tmp_path):
    model, enc = build_native_checkpoint(tmp_path / "native", dtype=torch.bfloat16)
    out = nanochat.convert_native_checkpoint(tmp_path / "native", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([enc.encode_ordinary(SAMPLE)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_config_inferred_from_weights(converted):
    _, _, out = converted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nanochat"
    assert cfg["num_key_value_heads"] == 2  # c_k rows 32 / head_dim 16
    assert cfg["intermediate_size"] == 256  # from c_fc, not the 8192 default
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (64, 2, 4)
    assert cfg["max_position_embeddings"] == 128
    assert cfg["tie_word_embeddings"] is False
    assert cfg["final_logit_softcapping"] == 15.0
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["rms_norm_eps"] == pytest.approx(torch.finfo(torch.float32).eps)


def test_special_token_ids_in_configs(converted):
    _, enc, out = converted
    bos, eos = enc._special_tokens["<|bos|>"], enc._special_tokens["<|assistant_end|>"]
    assert (bos, eos) == (268, 272)  # not transformers' defaults 0 / 1
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((out / name).read_text())
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (bos, eos, bos), name


def test_tokenizer_round_trip(converted):
    _, enc, out = converted
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, Tokenizer)  # what the package types tokenizers with
    assert tok.encode(SAMPLE, add_special_tokens=False) == enc.encode_ordinary(SAMPLE)
    with_specials = "<|bos|><|user_start|>hello world<|user_end|><|assistant_start|>"
    assert tok.encode(with_specials, add_special_tokens=False) == enc.encode(
        with_specials, allowed_special="all"
    )
    for name, idx in enc._special_tokens.items():
        assert tok.convert_tokens_to_ids(name) == idx, name
        assert name in tok.all_special_tokens, name
    assert (tok.bos_token, tok.bos_token_id) == ("<|bos|>", enc._special_tokens["<|bos|>"])
    assert tok.decode(enc.encode_ordinary(SAMPLE)) == SAMPLE
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|bos|><|user_start|>hello<|user_end|><|assistant_start|>"
    assert chat_format_of(tok) == "nanochat"
    ids = encode_chat(tok, "hello", system="Be brief.")
    assert tok.decode(ids) == "<|bos|><|user_start|>Be brief.\n\nhello<|user_end|><|assistant_start|>"


def test_chat_format_of_other_tokenizers(offline_lm):
    """A chat template without nanochat's tokens -> "template"; no template -> "plain" (unknown tokens
    map to the tokenizer's unk id, or to None when it has none)."""
    tok = offline_lm.tokenizer
    assert chat_format_of(tok) == "template"
    template, tok.chat_template = tok.chat_template, None
    try:
        assert chat_format_of(tok) == "plain"
    finally:
        tok.chat_template = template


class _Exploit:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize(
    "fn, refused", [(os.system, f"{os.system.__module__}.system"), (eval, "builtins.eval")]
)
def test_restricted_unpickler_refuses_code(tmp_path, fn, refused):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(_Exploit(fn, arg)))
    with pytest.raises(pickle.UnpicklingError, match=rf"{refused}.*trust_pickle=True"):
        nanochat.load_tokenizer_pickle(path)
    assert not marker.exists()


def test_restricted_unpickler_refuses_string_state(tmp_path):
    # Encoding.__setstate__("cl100k_base") would fetch a registered encoding: not what nanochat writes.
    path = tmp_path / "tokenizer.pkl"
    # protocol 4: STACK_GLOBAL tiktoken.core.Encoding, NEWOBJ (), BUILD with the string "cl100k_base"
    path.write_bytes(b"\x80\x04\x8c\x0dtiktoken.core\x8c\x08Encoding\x93)\x81\x8c\x0bcl100k_baseb.")
    with pytest.raises(pickle.UnpicklingError, match="expected a dict"):
        nanochat.load_tokenizer_pickle(path)


def test_restricted_unpickler_refuses_reduce_of_encoding(tmp_path):
    # protocol 4: STACK_GLOBAL tiktoken.core.Encoding, ("x",), REDUCE: a call pickle never writes for it
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(b"\x80\x04\x8c\x0dtiktoken.core\x8c\x08Encoding\x93\x8c\x01x\x85R.")
    with pytest.raises(pickle.UnpicklingError, match=r"with arguments \('x',\)"):
        nanochat.load_tokenizer_pickle(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_loads_real_encoding(tmp_path, protocol):
    enc = tiny_encoding()
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(enc, protocol=protocol))
    loaded = nanochat.load_tokenizer_pickle(path)
    assert isinstance(loaded, tiktoken.Encoding)
    assert loaded.encode(SAMPLE + "<|bos|>", allowed_special="all") == enc.encode(
        SAMPLE + "<|bos|>", allowed_special="all"
    )
    assert loaded._special_tokens == enc._special_tokens


def test_trust_pickle_uses_plain_pickle_and_says_so(tmp_path, capsys):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(tiny_encoding()))
    enc = nanochat.load_tokenizer_pickle(path, trust_pickle=True)
    assert enc.encode_ordinary(SAMPLE) == tiny_encoding().encode_ordinary(SAMPLE)
    assert "trust_pickle=True" in capsys.readouterr().out


def test_unknown_key_is_refused(tmp_path):
    extra = {"transformer.value_embeds.0.weight": torch.zeros(4, 64)}
    build_native_checkpoint(tmp_path / "native", extra=extra)
    with pytest.raises(
        ValueError,
        match=r"none of the nanochat layouts.*unexpected keys \['transformer\.value_embeds\.0\.weight'\]",
    ):
        nanochat.convert_native_checkpoint(tmp_path / "native", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_missing_key_is_refused(tmp_path):
    build_native_checkpoint(tmp_path / "native", drop=["transformer.h.1.mlp.c_fc.weight"])
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        nanochat.convert_native_checkpoint(tmp_path / "native", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    build_native_checkpoint(tmp_path / "native")

    def boom(enc):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(nanochat, "_fast_tokenizer", boom)
    with pytest.raises(OSError, match="simulated"):
        nanochat.convert_native_checkpoint(tmp_path / "native", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]  # no hf/, no temp sibling


def test_token_bytes_is_not_a_tokenizer(tmp_path):
    build_native_checkpoint(tmp_path / "native")
    (tmp_path / "native" / "tokenizer.pkl").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"token_bytes\.pt is not a tokenizer.*tokenizer\.pkl is needed"
    ):
        nanochat.convert_native_checkpoint(tmp_path / "native", tmp_path / "hf")


def test_existing_out_dir_is_not_overwritten(tmp_path):
    build_native_checkpoint(tmp_path / "native")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        nanochat.convert_native_checkpoint(tmp_path / "native", tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_load_model_converts_native_folder_once_and_formats_chat(tmp_path, capsys):
    import helpers

    model, enc = build_native_checkpoint(tmp_path / "native")
    lm = helpers.load_model(str(tmp_path / "native"), device="cpu", cache_dir=tmp_path / "cache")
    info = lm.info
    assert (info.source, info.family, info.chat_format, info.n_layers, info.d_model) == (
        "nanochat-native",
        "nanochat",
        "nanochat",
        2,
        64,
    )
    converted_dir = Path(info.path)
    assert converted_dir.parent == tmp_path / "cache" / "converted"
    stamp = (converted_dir / "config.json").stat().st_mtime_ns
    again = helpers.load_model(str(tmp_path / "native"), device="cpu", cache_dir=tmp_path / "cache")
    assert (converted_dir / "config.json").stat().st_mtime_ns == stamp and again.info.path == info.path

    ids = helpers.encode_chat(lm.tokenizer, "Is the car safe?", system="Be brief.")
    special = {s: enc.encode_single_token(s) for s in SPECIALS}
    assert ids[:2] == [special["<|bos|>"], special["<|user_start|>"]]
    assert ids[-2:] == [special["<|user_end|>"], special["<|assistant_start|>"]]
    assert enc.decode(ids[2:-2]) == "Be brief.\n\nIs the car safe?"
    assert helpers.stop_token_ids(lm.tokenizer)[0] == special["<|assistant_end|>"]
    x = torch.tensor([ids])
    torch.testing.assert_close(lm.model(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    assert isinstance(helpers.chat(lm, "hello", max_new_tokens=5), str)


def test_native_hub_files_picks_latest_step_and_tokenizer():
    from helpers.model.load import native_hub_files

    flat = [
        "README.md",
        "model_000650.pt",
        "meta_000650.json",
        "model_000100.pt",
        "meta_000100.json",
        "tokenizer.pkl",
        "token_bytes.pt",
    ]
    assert native_hub_files(flat) == ["model_000650.pt", "meta_000650.json", "tokenizer.pkl"]
    nested = ["chatsft/d32/model_000650.pt", "chatsft/d32/meta_000650.json", "tokenizer/tokenizer.pkl"]
    assert native_hub_files(nested) == nested
    assert native_hub_files(["config.json", "model.safetensors", "model_000001.pt"]) is None
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.pkl"):
        native_hub_files(["model_000650.pt", "meta_000650.json"])


def test_hub_repo_with_native_files_is_downloaded_converted_and_cached(tmp_path, monkeypatch):
    """The Hub is unreachable here, so huggingface_hub's two calls serve a local folder laid out as the
    repo."""
    import huggingface_hub

    import helpers

    repo_dir = tmp_path / "repo"
    model, _ = build_native_checkpoint(repo_dir / "sft")
    (repo_dir / "sft" / "tokenizer.pkl").rename(repo_dir / "tokenizer.pkl")
    calls = []

    def list_repo_files(repo, revision=None):
        calls.append(("list", repo, revision))
        return [str(p.relative_to(repo_dir)) for p in repo_dir.rglob("*") if p.is_file()]

    def hf_hub_download(repo, filename, revision=None):
        calls.append(("download", filename))
        return str(repo_dir / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    lm = helpers.load_model("someone/nanochat-tiny", device="cpu", cache_dir=tmp_path / "cache")
    assert lm.info.source == "nanochat-native" and lm.info.chat_format == "nanochat"
    assert [c[1] for c in calls if c[0] == "download"] == [
        "sft/model_000010.pt",
        "sft/meta_000010.json",
        "tokenizer.pkl",
    ]
    x = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(lm.model(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    calls.clear()
    again = helpers.load_model("someone/nanochat-tiny", device="cpu", cache_dir=tmp_path / "cache")
    assert calls == [] and again.info.path == lm.info.path, (
        "second load must come from the cache, no Hub calls"
    )
