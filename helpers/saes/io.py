"""Save and load SAEs in the SAELens 6.x folder format, ours and anyone else's (DESIGN.md §6).

A folder holds `cfg.json` and `sae_weights.safetensors` with exactly the tensors `sae_lens.SAE.load_from_disk`
expects (REFERENCE.md): W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus b_enc (standard,
topk, jumprelu), threshold (jumprelu), b_gate, b_mag, r_mag (gated). BatchTopK and Matryoshka BatchTopK
are written as `jumprelu` with their inference threshold in every latent (`SAE.saved_architecture`, as
SAELens does; cfg.json's `trained_as` keeps the training name, and SAELens ignores it). Training normalises
inputs by a scalar s; `save_sae` folds s into the weights (`SAE.saelens_state`), so the saved SAE takes raw
residuals and writes `normalize_activations: "none"`. tests/saes/test_io.py loads our folders with
sae_lens itself.

`load_sae` also reads folders published by others: SAELens < 6 configs (top-level `hook_point`, an
`activation_fn` instead of an architecture), `apply_b_dec_to_input: false` and TopK's
`rescale_acts_by_decoder_norm` folded into the weights, and hook names written either as
`blocks.12.hook_resid_post` or as a module path like `transformer.h.12`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from helpers.model.hooks import layer_of
from helpers.run import (
    SAE_CFG,
    SAE_WEIGHTS,
    atomic_write_bytes,
    atomic_write_json,
)
from helpers.saes.base import SAE
from helpers.saes.registry import sae_class

SAELENS_FORMAT_VERSION = "6.54.12"
"""Written as metadata.sae_lens_version: the sae_lens release our round-trip test loads these folders with
(any value >= 6.0.0 skips SAELens's legacy conversion path)."""
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")


@dataclass
class LoadedSAE:
    """An SAE read from a SAELens folder, in raw-residual units, with where it belongs."""

    sae: SAE
    hook_name: str
    """As written in the folder's cfg.json."""
    layer: int
    """Decoder layer whose output (`blocks.{layer}.hook_resid_post`) the SAE reads."""
    model_name: str | None
    cfg: dict[str, Any]
    path: Path

    @property
    def sae_id(self) -> str:
        """Its id in the run (`run.sae_id_of`): cfg.json's `metadata.sae_id` (written by train_grid), else
        the folder name (a folder published by others)."""
        return str((self.cfg.get("metadata") or {}).get("sae_id") or self.path.name)


def save_sae(
    sae: SAE,
    folder: str | os.PathLike,
    *,
    hook_name: str,
    model_name: str,
    scale: float = 1.0,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `sae` (trained on inputs multiplied by `scale`) as a SAELens 6.x folder; returns it.
    Weights first, cfg.json last, both atomic, so a folder with a cfg.json is always complete."""
    folder = Path(folder)
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": None,
        **(metadata or {}),
    }
    cfg = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_cfg(),
        "metadata": meta,
    }
    atomic_write_bytes(folder / SAE_WEIGHTS, safetensors_bytes(sae.saelens_state(scale)))
    atomic_write_json(folder / SAE_CFG, cfg)
    return folder


def load_sae(source: str | os.PathLike, *, device: str = "cpu") -> LoadedSAE:
    """Load a SAELens folder (local path, or `org/repo/sub/folder` on the Hugging Face Hub) as one of
    our SAE classes in float32 on `device`, eval mode."""
    path = _resolve(source)
    cfg_path = path / SAE_CFG
    if not cfg_path.is_file():
        found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else []
        raise FileNotFoundError(f"{path} has no {SAE_CFG}: not a SAELens SAE folder (found {found})")
    cfg = json.loads(cfg_path.read_text())
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not hook:
        raise ValueError(f"{cfg_path} names no hook (metadata.hook_name / hook_point): cannot place the SAE")
    arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn") == "topk" else "standard")
    if arch == "topk" and "k" not in cfg:
        cfg["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(
            f"{path}: normalize_activations={norm!r} is applied at run time by SAELens and is not supported "
            "here; fold it into the weights first (sae_lens: sae.fold_activation_norm_scaling_factor)"
        )
    if norm == "expected_average_only_in":
        print(f"note: {path.name} expects inputs scaled to unit mean squared norm (unfolded normalisation)")
    tensors = {k: v.float() for k, v in load_file(str(path / SAE_WEIGHTS)).items()}
    tensors = _normalise_tensors(tensors, arch, cfg, path)
    cls = sae_class(arch)
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    if tensors["W_enc"].shape != (d_in, d_sae) or tensors["W_dec"].shape != (d_sae, d_in):
        raise ValueError(
            f"{path}: W_enc {tuple(tensors['W_enc'].shape)} / W_dec {tuple(tensors['W_dec'].shape)} do not "
            f"match d_in={d_in}, d_sae={d_sae} in cfg.json"
        )
    sae = cls(d_in, d_sae, **cls.kwargs_from_saelens_cfg(cfg))
    sae.load_saelens_state(tensors)
    return LoadedSAE(sae.to(device).eval(), hook, _layer(hook), meta.get("model_name"), cfg, path)


def _normalise_tensors(tensors: dict, arch: str, cfg: dict, path: Path) -> dict:
    """Map a foreign folder's tensors onto our conventions (b_dec subtracted before encoding, unit-norm
    TopK decoder rows), refusing unknown or missing tensors."""
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError(f"{path}: a fine-tuning scaling_factor other than 1 is not supported")
    if arch not in ("standard", "topk", "jumprelu", "gated"):
        raise ValueError(
            f"{path}: architecture {arch!r} is not one SAELens loads for inference (standard, topk, "
            "jumprelu, gated); a training-only architecture such as batchtopk must be saved as jumprelu"
        )
    expected = set(sae_class(arch).saelens_tensors)
    if set(tensors) != expected:
        raise ValueError(
            f"{path}: a {arch} SAE needs tensors {sorted(expected)}; missing "
            f"{sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)}"
        )
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens then encodes x @ W_enc + b; ours subtracts b_dec first, so add b_dec @ W_enc back.
        shift = tensors["b_dec"] @ tensors["W_enc"]
        for name in ("b_enc", "b_gate"):
            if name in tensors:
                tensors[name] = tensors[name] + shift
        if "b_mag" in tensors:
            tensors["b_mag"] = tensors["b_mag"] + shift * tensors["r_mag"].exp()
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # pre * ||W_dec_i|| then acts / ||W_dec_i|| @ W_dec == unit
        # rows with the norm folded into the encoder.
        norms = tensors["W_dec"].norm(dim=1).clamp_min(1e-8)
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
        tensors["W_enc"] = tensors["W_enc"] * norms
        tensors["b_enc"] = tensors["b_enc"] * norms
    return tensors


def _layer(hook: str) -> int:
    """`blocks.L.hook_resid_post` and module paths via hooks.layer_of; `blocks.L.hook_resid_pre` is the
    output of layer L-1."""
    if m := _RESID_PRE.match(hook):
        if int(m.group(1)) == 0:
            raise ValueError(f"{hook!r} reads the embeddings, which have no decoder layer to hook")
        return int(m.group(1)) - 1
    return layer_of(hook)


def _resolve(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    parts = str(source).split("/")
    if len(parts) < 2 or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source} does not exist (and is not an 'org/repo/folder' Hub path)")
    from huggingface_hub import snapshot_download

    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        local = snapshot_download(repo, allow_patterns=[f"{sub}/*" if sub else "*"])
    # hub errors vary (offline, gated, missing); all need the same fix
    except Exception as err:  # noqa: BLE001
        raise FileNotFoundError(
            f"could not download {source} from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err)[:200]}). Check the repo id and folder, "
            "HF_TOKEN for a private repo, or pass a local folder."
        ) from err
    return Path(local) / sub


def find_sae_folders(root: str | os.PathLike) -> list[Path]:
    """Every SAE folder (one holding cfg.json) at or under `root`: a published repo may hold many."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob(SAE_CFG) if (p.parent / SAE_WEIGHTS).exists())
