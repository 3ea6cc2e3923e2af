"""Convert a native nanochat checkpoint folder (any layout since 2025-10) into a folder transformers loads.

nanochat saves checkpoints in its own format (``NATIVE_FILES``); everything here loads through
transformers' Auto classes, so a native folder is converted once into the conversion cache:

- the layout is detected from the state-dict keys (``nanochat_layouts``; an unknown one is refused with
  the unexpected and missing keys, nothing is written);
- the 2025-10 layout becomes transformers' ``NanoChatForCausalLM`` (weights renamed as transformers' own
  ``convert_nanochat_checkpoints.py`` does; a vocabulary padded to a multiple of 64 is cropped to the
  tokenizer's size, which crops the logits exactly as nanochat does);
- every 2026 layout becomes our ``NanoChatGPTForCausalLM`` (``nanochat_gpt``), with upstream's own
  parameter names and the behaviour the layout implies (or the user's ``overrides``) in its config;
- the config is read from ``meta_<step>.json`` and the weight shapes, and the pickled tiktoken tokenizer
  is turned into a fast tokenizer with nanochat's special-token ids (the same special tokens in every
  layout).

``tokenizer.pkl`` is a pickle, and unpickling a downloaded file can run arbitrary code: by default a
restricted unpickler admits only the globals a pickled ``tiktoken.Encoding`` uses; ``trust_pickle=True``
switches to plain ``pickle.load`` for files you trust.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from helpers.model import nanochat_layouts as layouts
from helpers.model.nanochat_gpt import NanoChatGPTConfig, NanoChatGPTForCausalLM
from helpers.run import atomic_directory

NATIVE_FILES = {
    "model_<step>.pt": "torch state dict (bf16); keys may carry the `_orig_mod.` prefix of torch.compile",
    "meta_<step>.json": '{"model_config": {"vocab_size", "n_embd", "n_layer", "n_head", "n_kv_head", '
    '"sequence_len"}, ...}',
    "tokenizer.pkl": "a pickled tiktoken.core.Encoding (the tokenizer; required for conversion)",
    "token_bytes.pt": "byte length of every token id (for bits-per-byte); NOT a tokenizer",
}

# nanochat/tokenizer.py SPECIAL_TOKENS, in id order (appended right after the BPE ranks).
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

# nanochat's chat rendering (RustBPETokenizer.render_conversation / render_for_completion): a system
# message is merged into the first user message; generation starts after <|assistant_start|>.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}<|user_start|>{{ ns.system + m['content'] }}<|user_end|>"
    "{%- set ns.system = '' -%}"
    "{%- elif m['role'] == 'assistant' -%}<|assistant_start|>{{ m['content'] }}<|assistant_end|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)

_MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
_COMPILE_PREFIX = "_orig_mod."


def _checkpoints(folder: str | os.PathLike) -> dict[int, tuple[Path, Path]]:
    """step -> (model_<step>.pt, meta_<step>.json) for every step that has both files."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = _MODEL_RE.match(p.name)
        if m and (folder / f"meta_{m.group(1)}.json").is_file():
            found[int(m.group(1))] = (p, folder / f"meta_{m.group(1)}.json")
    return found


def tokenizer_path(folder: str | os.PathLike) -> Path:
    """The ``tokenizer.pkl`` of a checkpoint folder: in the folder itself, else two levels up in
    ``tokenizer/``, where nanochat keeps it: since the experiment refactor (PR #800, commit e4286f8)
    checkpoints sit in ``experiments/<name>/<model_tag>/<base|mid|sft|rl>/`` and the tokenizer in
    ``experiments/<name>/tokenizer/``; before it, in ``<base_dir>/<source>_checkpoints/<model_tag>/`` and
    ``<base_dir>/tokenizer/``. The other one is announced."""
    folder = Path(folder)
    here, shared = folder / "tokenizer.pkl", folder.resolve().parents[1] / "tokenizer" / "tokenizer.pkl"
    if here.is_file():
        return here
    if shared.is_file():
        print(f"using the tokenizer of this nanochat experiment: {shared}")
        return shared
    hint = ""
    if (folder / "token_bytes.pt").is_file():
        hint = " token_bytes.pt is not a tokenizer (it only holds each token's byte length);"
    raise FileNotFoundError(
        f"{here} is missing, and so is {shared}.{hint} tokenizer.pkl is needed: copy it from the same "
        "nanochat run into the folder (nanochat keeps it in experiments/<name>/tokenizer/, or "
        "~/.cache/nanochat/tokenizer/ before its experiment refactor)."
    )


def experiment_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under a nanochat experiment (``experiments/<name>``, PR #800) or one of its
    model tags (``experiments/<name>/<model_tag>``): every ``<model_tag>/<stage>/`` or ``<stage>/``
    holding a checkpoint, stages in training order. Empty when ``folder`` is neither."""
    folder = Path(folder)
    stages = ("base", "mid", "sft", "rl")
    found = [folder / s for s in stages if is_native_checkpoint(folder / s)]
    if not found and folder.is_dir() and (folder / "tokenizer").is_dir():
        for tag in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "tokenizer"):
            found += [tag / s for s in stages if is_native_checkpoint(tag / s)]
    return found


def is_native_checkpoint(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds at least one ``model_<step>.pt`` with a matching ``meta_<step>.json``."""
    return bool(_checkpoints(folder))


def find_step(folder: str | os.PathLike, step: int | None = None) -> int:
    """The checkpoint step to use: ``step`` if present, else (``step=None``) the latest one."""
    steps = sorted(_checkpoints(folder))
    if not steps:
        present = sorted(p.name for p in Path(folder).iterdir())[:10] if Path(folder).is_dir() else []
        raise FileNotFoundError(
            f"{folder} is not a native nanochat checkpoint folder (found {present}); it needs "
            "model_<step>.pt and meta_<step>.json with the same step. Point at the folder that holds them."
        )
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise FileNotFoundError(
            f"step {step} is not in {folder}; steps found: {steps}. Pass "
            "one of these, or step=None for the latest."
        )
    return int(step)


# --- tokenizer.pkl ---------------------------------------------------------------------------------
# What a pickled tiktoken.Encoding references (checked with pickletools on protocols 0-5):
#   protocol 3-5: only the global tiktoken.core.Encoding (NEWOBJ + BUILD -> Encoding.__setstate__(dict));
#   protocol 2:   additionally _codecs.encode, which is how protocol 2 spells a bytes object.
# Protocols 0/1 also need copyreg._reconstructor and builtins.object; nanochat never writes those (it uses
# pickle.dump's default), so they are refused rather than widening the list.
ALLOWED_PICKLE_GLOBALS = frozenset({("tiktoken.core", "Encoding"), ("_codecs", "encode")})
_ENCODING_KEYS = {"name", "pat_str", "mergeable_ranks", "special_tokens", "explicit_n_vocab"}


class _EncodingState:
    """Stand-in for ``tiktoken.core.Encoding`` while unpickling: it only records the state dict, so no
    tiktoken code runs (Encoding.__setstate__ given a string would fetch an encoding over the network);
    the real Encoding is built afterwards from the validated dict."""

    # Reached only by a REDUCE calling Encoding(...), which pickling an Encoding never writes.
    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError(
            f"tokenizer.pkl calls tiktoken.core.Encoding with arguments {args!r}, which a pickled Encoding "
            "never does; refusing. Use trust_pickle=True only for a file you trust."
        )

    def __setstate__(self, state):
        self.state = state


class _TiktokenUnpickler(pickle.Unpickler):
    """Unpickler that admits only ``ALLOWED_PICKLE_GLOBALS``; every other global raises."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name} in the tokenizer pickle: a tiktoken Encoding only needs "
                f"{sorted('.'.join(g) for g in ALLOWED_PICKLE_GLOBALS)}. If you trust this file, load it "
                "with trust_pickle=True (plain pickle.load, which can run arbitrary code)."
            )
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        return super().find_class(module, name)


def load_tokenizer_pickle(path: str | os.PathLike, *, trust_pickle: bool = False):
    """Load nanochat's ``tokenizer.pkl`` and return the ``tiktoken.Encoding``."""
    import tiktoken

    path = Path(path)
    with open(path, "rb") as f:
        if trust_pickle:
            print(f"[nanochat] unpickling {path} with plain pickle.load (trust_pickle=True)")
            obj = pickle.load(f)
        else:
            obj = _TiktokenUnpickler(f).load()
            state = getattr(obj, "state", None)
            if not isinstance(state, dict) or not set(state) <= _ENCODING_KEYS:
                raise pickle.UnpicklingError(
                    f"{path}: the Encoding state is {type(state).__name__} "
                    f"{sorted(state) if isinstance(state, dict) else state!r}, expected a dict with keys "
                    f"from {sorted(_ENCODING_KEYS)}. Use trust_pickle=True only for a file you trust."
                )
            obj = tiktoken.Encoding(**state)
    if not isinstance(obj, tiktoken.Encoding):
        raise TypeError(
            f"{path} holds a {type(obj).__name__}, not a tiktoken.Encoding; pass nanochat's tokenizer.pkl."
        )
    return obj


# --- transformers' NanoChatForCausalLM, as upstream computes it ---------------------------------------
class Bf16RotaryTables(nn.Module):
    """Wraps transformers' NanoChat rotary embedding so its cos/sin tables are rounded to bfloat16.

    nanochat's code of the 2025 layout keeps the tables in bfloat16 on every device (it asserts it), so
    an fp32 model multiplies q and k by bf16-rounded cos/sin; transformers computes them in fp32. With this
    wrapper an fp32 NanoChatForCausalLM gives exactly upstream's logits (without it they differ by ~1e-3);
    in bf16 it changes nothing."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, position_ids)
        return cos.bfloat16().to(cos.dtype), sin.bfloat16().to(sin.dtype)


def match_upstream_rotary(model: nn.Module) -> nn.Module:
    """Round a transformers NanoChatForCausalLM's rotary tables to bf16 as nanochat's code did
    (idempotent)."""
    inner = model.model
    if not isinstance(inner.rotary_emb, Bf16RotaryTables):
        inner.rotary_emb = Bf16RotaryTables(inner.rotary_emb)
    return model


def _fast_tokenizer(enc):
    """tiktoken Encoding -> transformers fast tokenizer with nanochat's special tokens at their ids."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    # transformers.integrations.tiktoken.convert_tiktoken_to_fast wraps this same converter, but it first
    # writes the ranks with tiktoken's dump_tiktoken_bpe, which needs the extra package `blobfile`, and
    # re-reads them through tiktoken's path-keyed file cache. So the vocabulary and merges are made here
    # from the ranks in memory (transformers <= 5.15, Colab's, reads the ranks only through that file).
    class _RanksConverter(TikTokenConverter):
        def extract_vocab_merges_from_model(self, _url):
            ranks = enc._mergeable_ranks  # {token bytes: rank}
            byte_char = bytes_to_unicode()  # byte -> the printable character byte-level BPE spells it with

            def spell(token: bytes) -> str:
                return "".join(byte_char[b] for b in token)

            # A token of rank r is made by merging any split (left, right) of it into two tokens; tiktoken
            # merges the pair whose result has the lowest rank first, so merges are ordered by r.
            merges = []
            for token, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
                splits = [(token[:i], token[i:]) for i in range(1, len(token))]
                splits = [(a, b) for a, b in splits if a in ranks and b in ranks]
                merges += sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
            return {spell(t): r for t, r in ranks.items()}, [(spell(a), spell(b)) for a, b in merges]

    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])  # [(token, id)], id order
    backend = _RanksConverter(pattern=enc._pat_str, extra_special_tokens=[t for t, _ in specials]).converted()
    # The converter appends special tokens after the BPE vocab in the order given; check they land on the
    # ids tiktoken uses (true for nanochat, whose specials directly follow the ranks).
    wrong = {t: (i, backend.token_to_id(t)) for t, i in specials if backend.token_to_id(t) != i}
    if wrong:
        raise ValueError(
            "special tokens got different ids in the fast tokenizer ({token: (tiktoken id, fast id)}: "
            f"{wrong}); this converter expects them right after the BPE ranks, as nanochat writes them."
        )
    eos = "<|assistant_end|>" if "<|assistant_end|>" in enc._special_tokens else "<|bos|>"
    named = {"<|bos|>", eos}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token=eos,
        pad_token="<|bos|>",  # nanochat has no pad token; attention masks exclude padding anyway
        extra_special_tokens=[t for t, _ in specials if t not in named],
        chat_template=CHAT_TEMPLATE,
    )


# --- weights -----------------------------------------------------------------------------------------
def _key_map(n_layer: int) -> dict[str, str]:
    """native key -> transformers key (same table as transformers' convert_nanochat_checkpoints.py)."""
    out = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    pairs = {
        "attn.c_q": "self_attn.q_proj",
        "attn.c_k": "self_attn.k_proj",
        "attn.c_v": "self_attn.v_proj",
        "attn.c_proj": "self_attn.o_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for i in range(n_layer):
        for old, new in pairs.items():
            out[f"transformer.h.{i}.{old}.weight"] = f"model.layers.{i}.{new}.weight"
    return out


def convert_native_checkpoint(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    trust_pickle: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Convert a native nanochat folder into a transformers folder at ``out_dir`` (see the module docstring).

    ``overrides`` set behaviour the checkpoint's keys cannot tell (``nanochat_layouts.BEHAVIOUR_FIELDS``).
    Writes config.json, model.safetensors and the tokenizer files into a temporary sibling folder, then
    renames it to ``out_dir`` (a failure leaves no ``out_dir``). Returns ``out_dir``.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or pass a new out_dir.")
    step = find_step(folder, step)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[nanochat {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    model_path, meta_path = _checkpoints(folder)[step]
    tok_path = tokenizer_path(folder)
    say(f"1/4 tokenizer {tok_path if tok_path.parent != folder else tok_path.name}")
    enc = load_tokenizer_pickle(tok_path, trust_pickle=trust_pickle)
    specials = enc._special_tokens  # {token: id}
    if "<|bos|>" not in specials:
        raise ValueError(f"{tok_path} has no <|bos|> (special tokens: {sorted(specials)}); is it nanochat's?")

    mc = json.loads(meta_path.read_text()).get("model_config")
    need = ("n_embd", "n_layer", "n_head", "sequence_len")
    if not isinstance(mc, dict) or any(k not in mc for k in need):
        raise ValueError(
            f"{meta_path} needs a 'model_config' with {need}; found {mc!r}. Is it nanochat's meta?"
        )

    say(f"2/4 loading {model_path.name} ({model_path.stat().st_size / 2**30:.2f} GiB)")
    # mmap: tensors stay on disk until save_pretrained reads them, so RAM holds one copy at most.
    raw = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    sd = {k.removeprefix(_COMPILE_PREFIX): v for k, v in raw.items()}
    n_layer = int(mc["n_layer"])
    try:
        layout = layouts.detect_layout(layouts.state_dict_shapes(sd), n_layer)
    except layouts.UnknownLayoutError as err:
        raise layouts.UnknownLayoutError(f"{model_path}: {err}") from None
    behaviour = layouts.resolve_behaviour(layout, mc, overrides)
    say("   " + layouts.describe(layout, behaviour, overrides))

    # Shapes (nn.Linear weights are [out, in]): wte [padded vocab, n_embd], c_k [n_kv_head*head_dim, n_embd],
    # c_fc [intermediate, n_embd]. intermediate is read, not assumed (4*n_embd: d20 5120, d32 8192).
    n_embd, n_head = int(mc["n_embd"]), int(mc["n_head"])
    rows, hidden = sd["transformer.wte.weight"].shape
    head_dim = n_embd // n_head
    k_rows = sd["transformer.h.0.attn.c_k.weight"].shape[0]
    if hidden != n_embd or n_embd % n_head or k_rows % head_dim or n_head % (k_rows // head_dim):
        raise ValueError(
            f"shapes in {model_path} (wte {tuple(sd['transformer.wte.weight'].shape)}, c_k "
            f"rows {k_rows}) do not fit n_embd={n_embd}, n_head={n_head} from {meta_path}; "
            "check that both files come from one run."
        )
    n_kv = k_rows // head_dim
    if "n_kv_head" in mc and int(mc["n_kv_head"]) != n_kv:
        say(f"   note: meta says n_kv_head={mc['n_kv_head']}, weights say {n_kv}; using {n_kv}")
    vocab = int(mc.get("vocab_size") or enc.n_vocab)
    if enc.n_vocab != vocab or rows < vocab:
        raise ValueError(
            f"tokenizer.pkl has {enc.n_vocab} tokens, {meta_path.name} says "
            f"vocab_size={mc.get('vocab_size')} and the embedding has {rows} rows: the tokenizer and the "
            "checkpoint come from different runs."
        )
    if rows != vocab:
        say(f"   vocabulary padded to {rows} rows; logits are cropped to the tokenizer's {vocab} tokens")

    bos = specials["<|bos|>"]
    eos = specials.get("<|assistant_end|>", bos)  # the chat stop token (base-only tokenizers: bos)
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos}
    shape = {
        "vocab": vocab,
        "n_embd": n_embd,
        "n_head": n_head,
        "n_kv": n_kv,
        "n_layer": n_layer,
        "seq_len": int(mc["sequence_len"]),
        "intermediate": sd["transformer.h.0.mlp.c_fc.weight"].shape[0],
    }
    build = _transformers_nanochat if layout is layouts.ORIGINAL else _nanochat_gpt
    say(f"3/4 building {build.__doc__.split(':')[0]}")
    try:
        model = build(sd, shape, behaviour, layout, ids)
    except RuntimeError as err:
        raise ValueError(f"{model_path} does not fit the config built from {meta_path}: {err}") from err

    with atomic_directory(out_dir) as tmp:  # an empty out_dir (checked above) is replaced
        say(f"4/4 writing {out_dir} (model.safetensors, config, tokenizer)")
        model.save_pretrained(tmp)
        _fast_tokenizer(enc).save_pretrained(tmp)
    say(f"done: {out_dir}")
    return out_dir


def _transformers_nanochat(sd, shape, behaviour, layout, ids):
    """NanoChatForCausalLM: the 2025-10 layout, renamed to transformers' keys, padded vocabulary cropped."""
    from transformers import GenerationConfig, NanoChatConfig, NanoChatForCausalLM

    dtypes = {v.dtype for v in sd.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed -> upcast, which loses nothing
    config = NanoChatConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["n_embd"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["n_layer"],
        num_attention_heads=shape["n_head"],
        num_key_value_heads=shape["n_kv"],
        max_position_embeddings=shape["seq_len"],
        hidden_act="relu2",
        final_logit_softcapping=float(behaviour["logit_softcap"]),  # softcap * tanh(logits / softcap)
        rope_parameters={"rope_type": "default", "rope_theta": float(behaviour["rope_theta"])},
        # nanochat's norm() is F.rms_norm with eps=None, i.e. float32's eps even for bf16 inputs; the
        # transformers default (1e-6) is 8x larger. Tiny effect, but we match the reference exactly.
        rms_norm_eps=torch.finfo(torch.float32).eps,
        tie_word_embeddings=False,
        dtype=dtype,
        **ids,
    )
    with torch.device("meta"):  # no random init of ~2B params; assign=True swaps in the loaded tensors
        model = NanoChatForCausalLM(config)
    key_map = _key_map(shape["n_layer"])
    vocab = shape["vocab"]
    # Rows past the tokenizer's vocabulary are padding (nanochat crops the logits to vocab_size): dropping
    # them from wte and lm_head gives the same logits for every real token.
    cropped = {"transformer.wte.weight", "lm_head.weight"}
    new_sd = {key_map[k]: (v[:vocab] if k in cropped else v).to(dtype) for k, v in sd.items()}
    model.load_state_dict(new_sd, strict=True, assign=True)
    model.generation_config = GenerationConfig(**ids)
    return model


def _nanochat_gpt(sd, shape, behaviour, layout, ids):
    """NanoChatGPTForCausalLM: a 2026 layout, upstream's own parameter names, each tensor in its saved
    dtype."""
    n_layer = shape["n_layer"]
    config = NanoChatGPTConfig(
        vocab_size=shape["vocab"],
        padded_vocab_size=sd["transformer.wte.weight"].shape[0],
        hidden_size=shape["n_embd"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=n_layer,
        num_attention_heads=shape["n_head"],
        num_key_value_heads=shape["n_kv"],
        max_position_embeddings=shape["seq_len"],
        attention_windows=behaviour["attention_windows"],
        window_pattern=behaviour["window_pattern"],
        rope_theta=behaviour["rope_theta"],
        rope_tables_bf16=behaviour["rope_tables_bf16"],
        qk_scale=behaviour["qk_scale"],
        logit_softcap=behaviour["logit_softcap"],
        value_embed_layers=layout.value_embed_layers(n_layer),
        ve_gate_channels=layout.ve_gate_channels,
        ve_gate_scale=behaviour.get("ve_gate_scale", 2.0),
        smear_channels=sd["smear_gate.weight"].shape[1] if layout.smear else 0,
        backout_layer=n_layer // 2 if layout.smear else None,
        layout=layout.name,
        **ids,
    )
    with torch.device("meta"):
        model = NanoChatGPTForCausalLM(config)
    # nanochat keeps embeddings in bf16 and matrices in fp32: each tensor keeps its dtype on disk (lossless,
    # smaller); load_model casts everything to the dtype it chooses.
    model.load_state_dict(dict(sd), strict=True, assign=True)
    return model
