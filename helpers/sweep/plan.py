"""The sweep's plan: which models, where each one's run folder is, how big each is, and whether it fits.

Before a sweep spends hours, notebook 07 prints one row per model: parameter count, layers × width, the
dtype the load rule will pick, estimated GPU and system memory, a rough time on this machine, and whether
it fits a free Colab T4 (≈ 14.6 GiB usable VRAM, 12.7 GB RAM; REFERENCE.md "Colab"). Sizes come from
the model's config alone (instantiated on the `meta` device: no weights are read or downloaded), or
from a native nanochat `meta_<step>.json`; a model whose size cannot be read gets a row saying why.

Layers are given as relative depths in [0, 1): depth `r` is layer `floor(r · n_layers)`, the rule of
`hooks.default_layers` (1/4, 1/2, 3/4), so one setting fits a 20-layer and a 32-layer model alike.
The time estimate is a cost model, not a measurement: decoding reads every weight once per step
(memory-bound), forward passes and SAE training cost their FLOPs, at the rates `machine_rates` measures
here (or a T4's published rates at half their peak). Probes and feature statistics are left out of it
(they take seconds to minutes at notebook sizes, independent of the model's size).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from helpers.env import choose_dtype
from helpers.model import nanochat
from helpers.model.load import OFFLINE_MODEL, offline_gguf_path

# The estimates' shared parts have one home, helpers/plan.py; machine_rates and memory_now are re-exported
# for helpers.sweep and its runner.
from helpers.plan import (
    OVERHEAD_GIB,
    RUNTIME_RAM_GB,
    T4_HOURS,
    T4_RAM_GB,
    T4_VRAM_GIB,
    Rates,
    t4_rates,
)
from helpers.plan import (
    machine_rates as machine_rates,
)
from helpers.plan import (
    memory_now as memory_now,
)
from helpers.run import id_part, model_short

KNOWN_SIZES = {
    # Checked facts (REFERENCE.md "nanochat"): native files on the Hub have no transformers config to read.
    "karpathy/nanochat-d32": {
        "n_params": 1_880_000_000,
        "n_layers": 32,
        "d_model": 2048,
        "family": "nanochat",
    },
    "nanochat-students/nanochat-d20": {
        "n_params": 561_000_000,
        "n_layers": 20,
        "d_model": 1280,
        "family": "nanochat",
    },
}

COLAB_T4_MODELS = [
    "nanochat-students/nanochat-d20",
    "karpathy/nanochat-d32",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "allenai/OLMo-2-0425-1B-Instruct",
]
"""One model at a time on a free T4: nanochat d20 and d32 (the study's own models; d32 in fp32 is ≈ 7.5 GB
on the GPU), and three small open instruct models of other families whose architectures transformers 5.x
ships natively (no `trust_remote_code`), ungated (no licence click, no token), Apache-2.0, with a chat
template that answers directly: Qwen2.5 (qwen2, 1.5B, 28 layers), SmolLM2 (llama, 1.7B, 24 layers) and
OLMo 2 (olmo2, 1.5B, 16 layers, fully open data). Qwen3 is left out: its chat template thinks first by
default, so a 64-token answer would be mostly `<think>` text, not the answer the judge labels. With d20
(0.56B) and d32 (1.9B), sizes from 0.5B to 1.9B give the parameter-count trend some spread."""
CPU_MODELS = [OFFLINE_MODEL, "HuggingFaceTB/SmolLM2-360M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"]
"""A CPU sweep in hours, not days: the offline SmolLM2-135M and two models below 1B."""


@dataclass
class ModelSpec:
    """One model of a sweep: anything `load_model` accepts, with an optional name and layers."""

    spec: str
    """A Hub id, a folder (transformers or native nanochat), a .gguf file, or `OFFLINE_MODEL`."""
    name: str = ""
    """The model's key in the sweep and the suffix of its run folder; default: the short name of `spec`
    (`model_short`), made unique with a hash of the spec when two models share it."""
    revision: str | None = None
    layers: list[int] | None = None
    """Absolute layers for this model instead of the study's relative depths (checked when it loads)."""

    @classmethod
    def of(cls, item: str | dict[str, Any] | ModelSpec) -> ModelSpec:
        if isinstance(item, ModelSpec):
            return item
        if isinstance(item, str):
            return cls(item)
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"spec", "name", "revision", "layers"})
            if unknown or "spec" not in item:
                raise ValueError(
                    "a model entry is a spec string or a dict with 'spec' (and optionally 'name', "
                    f"'revision', 'layers'); got {item!r}"
                    + (f" with unknown keys {unknown}" if unknown else "")
                )
            return cls(**item)
        raise TypeError(f"a model entry is a string or a dict, got {type(item).__name__}: {item!r}")


def model_keys(models: list[ModelSpec]) -> list[str]:
    """One key per model, unique within the sweep: the name, else the short name; a short name two specs
    share gets 6 hex digits of each full spec's hash (`d32-3fa2c1`), so their run folders cannot collide."""
    shorts = [id_part(m.name) if m.name else model_short(m.spec) for m in models]
    keys = []
    for m, short in zip(models, shorts, strict=True):
        if shorts.count(short) > 1 and not m.name:
            digest = hashlib.sha256(f"{m.spec}@{m.revision or ''}".encode()).hexdigest()[:6]
            short = f"{short}-{digest}"
        keys.append(short)
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"two models of the sweep have the same name {dupes}: give each a different 'name'")
    return keys


def layers_at(depths: list[float], n_layers: int) -> list[int]:
    """Relative depths -> this model's layers (`floor(r · n_layers)`, deduplicated, sorted)."""
    bad = [d for d in depths if not 0 <= d < 1]
    if bad:
        raise ValueError(f"relative depths must be in [0, 1) (0 = first layer's output), got {bad}")
    return sorted({math.floor(d * n_layers) for d in depths})


def relative_depth(layer: int, n_layers: int) -> float:
    """Where `layer`'s output sits in the stack: (layer + 1) / n_layers (the last layer is 1.0)."""
    return (layer + 1) / n_layers


@dataclass
class ModelSize:
    n_params: int | None
    n_layers: int | None
    d_model: int | None
    family: str | None
    how: str
    """Where the numbers came from ("config on the meta device", "nanochat meta json", "checked facts")
    or why there are none."""


def _count_from_config(cfg: Any) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no weights
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _size_of_config(cfg: Any, how: str) -> ModelSize:
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    return ModelSize(_count_from_config(cfg), n_layers, d_model, cfg.model_type, how)


def _nanochat_meta_size(meta: dict[str, Any]) -> ModelSize:
    """nanochat's GPT: untied embedding and head (2·V·d) and 12·d² per layer (attention 4d², relu² MLP 8d²);
    the 2026 layouts' value embeddings and gates add a little (not counted)."""
    c = meta["model_config"]
    v, d, n = c["vocab_size"], c["n_embd"], c["n_layer"]
    return ModelSize(2 * v * d + 12 * d * d * n, n, d, "nanochat", "nanochat meta json (2·V·d + 12·d²·L)")


def model_size(m: ModelSpec) -> ModelSize:
    """The model's size without loading it; a spec that cannot be read says why in `how`."""
    from transformers import AutoConfig

    try:
        if m.spec in KNOWN_SIZES:
            return ModelSize(**KNOWN_SIZES[m.spec], how="checked facts (REFERENCE.md)")
        if m.spec == OFFLINE_MODEL:
            gguf = offline_gguf_path()
            return _size_of_config(
                AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name), "GGUF header"
            )
        path = Path(m.spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return _size_of_config(
                AutoConfig.from_pretrained(path.parent, gguf_file=path.name), "GGUF header"
            )
        if path.is_dir() and nanochat.is_native_checkpoint(path):
            step = nanochat.find_step(path)
            meta = json.loads(next(path.glob(f"meta_{step:06d}.json")).read_text())
            return _nanochat_meta_size(meta)
        if path.exists() or path.is_absolute() or m.spec.startswith((".", "~")):
            if not (path / "config.json").is_file():
                return ModelSize(None, None, None, None, f"no config.json in {path}")
            return _size_of_config(AutoConfig.from_pretrained(path), "config on the meta device")
        return _size_of_config(
            AutoConfig.from_pretrained(m.spec, revision=m.revision), "config on the meta device"
        )
    except Exception as err:  # noqa: BLE001 - any reason the size is unreadable becomes the plan row's note
        return ModelSize(None, None, None, None, f"size unknown: {type(err).__name__}: {str(err)[:200]}")


@dataclass
class StudySize:
    """The work one model does in a sweep, in the units the time model needs (from `Study.size`)."""

    completions: int
    new_tokens: int
    batch_size: int
    forward_tokens: int
    """Tokens read without sampling: completions' activations, the corpus, the LM-loss evaluation."""
    n_saes: int
    sae_train_tokens: int
    expansion: int
    n_layers_collected: int


def estimate(
    size: ModelSize, work: StudySize, *, device: str, rates: Rates, capability=None
) -> dict[str, Any]:
    """Memory and time for one model (see the module doc for the cost model)."""
    if size.n_params is None:
        return {}
    dtype = (
        choose_dtype(device, size.family or "", capability)
        if device != "t4"
        else (torch.float32 if size.family == "nanochat" else torch.float16)
    )
    width = torch.finfo(dtype).bits // 8
    weights = size.n_params * width
    flops = rates.flops_fp32 if width == 4 else rates.flops_fp16
    steps = math.ceil(work.completions / max(work.batch_size, 1)) * work.new_tokens
    decode = steps * (weights / rates.bytes_per_s + 2 * size.n_params * work.batch_size / flops)
    forward = 2 * size.n_params * work.forward_tokens / flops
    d = size.d_model or 0
    sae = work.n_saes * 6 * d * d * work.expansion * work.sae_train_tokens / rates.flops_fp32
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "weights_gib": weights / 2**30,
        "gpu_gib": weights / 2**30 + OVERHEAD_GIB,
        "ram_gb": weights / 1e9 + RUNTIME_RAM_GB,
        "hours": (decode + forward + sae) / 3600,
    }


@dataclass
class PlanRow:
    key: str
    spec: str
    n_params: int | None = None
    layers: str = ""
    dtype: str = ""
    gpu_gib: float | None = None
    ram_gb: float | None = None
    hours_here: float | None = None
    hours_t4: float | None = None
    fits_t4: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_rows(
    models: list[ModelSpec], work: StudySize, depths: list[float], *, device: str, rates: Rates
) -> list[PlanRow]:
    """One row per model: size, layers, dtype, memory and time here and on a T4; whether a free T4
    holds it."""
    t4 = t4_rates()
    rows = []
    for m, key in zip(models, model_keys(models), strict=True):
        size = model_size(m)
        if size.n_params is None:
            rows.append(PlanRow(key, m.spec, note=size.how))
            continue
        here, on_t4 = (
            estimate(size, work, device=device, rates=rates),
            estimate(size, work, device="t4", rates=t4),
        )
        layers = m.layers if m.layers is not None else layers_at(depths, size.n_layers)
        bad = [x for x in layers if not -size.n_layers <= x < size.n_layers]
        fits = on_t4["gpu_gib"] <= T4_VRAM_GIB and on_t4["ram_gb"] <= T4_RAM_GB
        note = f"{size.n_layers} layers × {size.d_model} ({size.family}); {size.how}"
        if bad:
            note = f"layers {bad} out of range: this model has layers 0..{size.n_layers - 1}; " + note
        if not fits:
            note = f"a free T4 would not hold it: leave it out (DROP = [{key!r}]); " + note
        elif on_t4["hours"] > T4_HOURS:
            note = (
                f"~{on_t4['hours']:.0f} h on a T4, over a free session's {T4_HOURS:g} h: lower TRAIN_TOKENS, "
                "N_PER_PROMPT or CORPUS_TOKENS (the study resumes per model and stage); " + note
            )
        rows.append(
            PlanRow(
                key,
                m.spec,
                size.n_params,
                ",".join(map(str, layers)),
                here["dtype"],
                here["gpu_gib"] if device == "cuda" else None,
                here["ram_gb"],
                here["hours"],
                on_t4["hours"],
                fits,
                note,
                {"n_layers": size.n_layers, "d_model": size.d_model, "family": size.family},
            )
        )
    return rows


def params_text(n: int | None) -> str:
    """1_880_000_000 -> '1.88B'; 134_515_008 -> '135M'; None -> '?'."""
    if not n:
        return "?"
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def plan_table(rows: list[PlanRow], drop: list[str] = ()) -> list[dict[str, Any]]:
    """The plan as printable rows; `drop` (model keys) marks the models the sweep will leave out."""
    unknown = sorted(set(drop) - {r.key for r in rows})
    if unknown:
        raise ValueError(
            f"DROP names {unknown}, which are not in the plan; its models are {[r.key for r in rows]}"
        )
    return [
        {
            "model": r.key,
            "params": params_text(r.n_params),
            "layers": r.layers,
            "dtype": r.dtype,
            "gpu_gib": r.gpu_gib,
            "ram_gb": r.ram_gb,
            "hours_here": r.hours_here,
            "hours_t4": r.hours_t4,
            "fits_t4": r.fits_t4,
            "run": "dropped" if r.key in drop else "yes",
            "note": r.note,
        }
        for r in rows
    ]
