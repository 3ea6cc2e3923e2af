"""Convert a native nanochat checkpoint folder into a transformers ``NanoChatForCausalLM`` folder.

nanochat saves checkpoints in its own layout (``NATIVE_FILES``); everything here loads through
transformers, so a native folder is converted once: weights renamed as transformers' own
``convert_nanochat_checkpoints.py`` does, the config read from ``meta_<step>.json`` and the weight
shapes, the pickled tiktoken tokenizer turned into a fast tokenizer with nanochat's special-token ids.

``tokenizer.pkl`` is a pickle, and unpickling a downloaded file can run arbitrary code: by default a
restricted unpickler admits only the globals a pickled ``tiktoken.Encoding`` uses; ``trust_pickle=True``
switches to plain ``pickle.load`` for files you trust.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import uuid
from pathlib import Path

import torch

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
            f"step {step} is not in {folder}; steps found: {steps}. Pass one of these, or step=None for the latest."
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
                f"{sorted('.'.join(g) for g in ALLOWED_PICKLE_GLOBALS)}. If you trust this file, load it with "
                "trust_pickle=True (plain pickle.load, which can run arbitrary code)."
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
                    f"{sorted(state) if isinstance(state, dict) else state!r}, expected a dict with keys from "
                    f"{sorted(_ENCODING_KEYS)}. Use trust_pickle=True only for a file you trust."
                )
            obj = tiktoken.Encoding(**state)
    if not isinstance(obj, tiktoken.Encoding):
        raise TypeError(
            f"{path} holds a {type(obj).__name__}, not a tiktoken.Encoding; pass nanochat's tokenizer.pkl."
        )
    return obj


def _fast_tokenizer(enc):
    """tiktoken Encoding -> transformers fast tokenizer with nanochat's special tokens at their ids."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # transformers.integrations.tiktoken.convert_tiktoken_to_fast wraps this same converter, but it first
    # writes the ranks with tiktoken's dump_tiktoken_bpe, which needs the extra package `blobfile`, and
    # re-reads them through tiktoken's path-keyed file cache. Handing the ranks over directly avoids both.
    class _RanksConverter(TikTokenConverter):
        def load_tiktoken_bpe(self, _url):
            return enc._mergeable_ranks

    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])  # [(token, id)], id order
    backend = _RanksConverter(pattern=enc._pat_str, extra_special_tokens=[t for t, _ in specials]).converted()
    # The converter appends special tokens after the BPE vocab in the order given; check they land on the
    # ids tiktoken uses (true for nanochat, whose specials directly follow the ranks).
    wrong = {t: (i, backend.token_to_id(t)) for t, i in specials if backend.token_to_id(t) != i}
    if wrong:
        raise ValueError(
            f"special tokens got different ids in the fast tokenizer ({{token: (tiktoken id, fast id)}}: {wrong}); "
            "this converter expects them right after the BPE ranks, as nanochat writes them."
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
    pairs = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
             "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    for i in range(n_layer):
        for old, new in pairs.items():
            out[f"transformer.h.{i}.{old}.weight"] = f"model.layers.{i}.{new}.weight"
    return out


def _few(keys) -> str:
    keys = sorted(keys)
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"


def convert_native_checkpoint(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Convert a native nanochat folder to a transformers NanoChatForCausalLM folder at ``out_dir``.

    Writes config.json, model.safetensors, generation_config.json and the tokenizer files into a temporary
    sibling folder, then renames it to ``out_dir`` (a failure leaves no ``out_dir``). Returns ``out_dir``.
    """
    from transformers import GenerationConfig, NanoChatConfig, NanoChatForCausalLM

    folder, out_dir = Path(folder), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or pass a new out_dir.")
    step = find_step(folder, step)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[nanochat {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    model_path, meta_path = _checkpoints(folder)[step]
    tok_path = folder / "tokenizer.pkl"
    if not tok_path.is_file():
        hint = ""
        if (folder / "token_bytes.pt").is_file():
            hint = " token_bytes.pt is not a tokenizer (it only holds each token's byte length);"
        raise FileNotFoundError(
            f"{tok_path} is missing.{hint} tokenizer.pkl is needed: copy it from the same nanochat run "
            "(nanochat keeps it in ~/.cache/nanochat/tokenizer/) into the folder."
        )
    say(f"1/4 tokenizer {tok_path.name}")
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

    key_map = _key_map(int(mc["n_layer"]))
    unknown, missing = set(sd) - set(key_map), set(key_map) - set(sd)
    if unknown:
        raise ValueError(
            f"{model_path} has keys this converter does not know: {_few(unknown)}. It supports the original "
            "nanochat layout (as in the official d20/d32/d34 checkpoints); newer nanochat adds weights such as "
            "value embeddings, resid_lambdas, x0_lambdas and ve_gate that NanoChatForCausalLM cannot hold."
        )
    if missing:
        raise ValueError(
            f"{model_path} lacks expected keys {_few(missing)} for n_layer={mc['n_layer']} in {meta_path}."
        )

    # Shapes (nn.Linear weights are [out, in]): wte [vocab, n_embd], c_k [n_kv_head*head_dim, n_embd],
    # c_fc [intermediate, n_embd]. intermediate is read, not assumed (4*n_embd: d20 5120, d32 8192).
    n_embd, n_head = int(mc["n_embd"]), int(mc["n_head"])
    vocab, hidden = sd["transformer.wte.weight"].shape
    head_dim = n_embd // n_head
    k_rows = sd["transformer.h.0.attn.c_k.weight"].shape[0]
    if hidden != n_embd or n_embd % n_head or k_rows % head_dim or n_head % (k_rows // head_dim):
        raise ValueError(
            f"shapes in {model_path} (wte {tuple(sd['transformer.wte.weight'].shape)}, c_k rows {k_rows}) do not "
            f"fit n_embd={n_embd}, n_head={n_head} from {meta_path}; check that both files come from one run."
        )
    n_kv = k_rows // head_dim
    if "n_kv_head" in mc and int(mc["n_kv_head"]) != n_kv:
        say(f"   note: meta says n_kv_head={mc['n_kv_head']}, weights say {n_kv}; using {n_kv}")
    if enc.n_vocab > vocab:
        raise ValueError(
            f"tokenizer has {enc.n_vocab} tokens but the model only {vocab}; they are from different runs."
        )
    dtypes = {v.dtype for v in sd.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed -> upcast, which loses nothing

    bos = specials["<|bos|>"]
    eos = specials.get("<|assistant_end|>", bos)  # the chat stop token (base-only tokenizers: bos)
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos}
    config = NanoChatConfig(
        vocab_size=vocab,
        hidden_size=n_embd,
        intermediate_size=sd["transformer.h.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=int(mc["n_layer"]),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        max_position_embeddings=int(mc["sequence_len"]),
        hidden_act="relu2",
        final_logit_softcapping=15.0,  # nanochat: softcap * tanh(logits / softcap), softcap = 15
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # nanochat's rotary base
        # nanochat's norm() is F.rms_norm with eps=None, i.e. float32's eps even for bf16 inputs; the
        # transformers default (1e-6) is 8x larger. Tiny effect, but we match the reference exactly.
        rms_norm_eps=torch.finfo(torch.float32).eps,
        tie_word_embeddings=False,
        dtype=dtype,
        **ids,
    )

    say("3/4 building NanoChatForCausalLM")
    with torch.device("meta"):  # no random init of ~2B params; assign=True swaps in the loaded tensors
        model = NanoChatForCausalLM(config)
    new_sd = {key_map[k]: v.to(dtype) for k, v in sd.items()}
    try:
        model.load_state_dict(new_sd, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{model_path} does not fit the config built from {meta_path}: {err}") from err
    model.generation_config = GenerationConfig(**ids)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so os.replace is a rename on one filesystem; mkdir (not mkdtemp) keeps umask permissions.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        say(f"4/4 writing {out_dir} (model.safetensors, config, tokenizer)")
        model.save_pretrained(tmp)
        _fast_tokenizer(enc).save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace onto a directory needs it gone
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"done: {out_dir}")
    return out_dir
