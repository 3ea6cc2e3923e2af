"""Steering: add a direction to the residual stream or clamp one SAE feature, and measure what it does.

Interventions at `blocks.{layer}.hook_resid_post`, both ADDITIVE, so whatever the SAE does not
reconstruct (its error term x - x̂) stays in the residual (DESIGN.md §8: replacing x by x̂ deletes it):
- `steer`: x' = x + strength · scale · d/|d| at every position (through `hooks.add_to_residual`);
- `clamp_feature`: x' = x + (value - f_i(x)) · W_dec[i] per token, i.e. x̂ with latent i set to `value`
  plus the unchanged error (the clamping of Templeton et al. 2024, "Scaling Monosemanticity").

Units: a condition's `strength` is in units of `residual_norm`, the mean L2 norm of one completion
token's residual at that layer (from the activation store), so strength 1 adds a vector as long as a
typical residual, whatever the model's scale. Random controls use the same norm (matched-norm).

`Condition` / `build_conditions` describe an experiment (feature, random latent, random direction,
difference of means, none); `pipeline.py` runs it (`run_steering_experiment`) and tests it against
the controls (`compare_to_controls`). Both are importable from here too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from helpers.collect.capture import load_pooled
from helpers.collect.completions import read_completions
from helpers.collect.store import LayerStore
from helpers.model.chat import encode_chat
from helpers.model.hooks import (
    add_to_residual,
    check_layers,
    edit_residual,
    hook_name,
    run_with_capture,
)
from helpers.model.protocols import AnySAE, HookableModel, ModelOrModule
from helpers.saes.io import LoadedSAE

KINDS = ("feature", "random_feature", "random_direction", "diff_of_means", "none")


# --- directions ----------------------------------------------------------------------------------
def _unit(v: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v).detach().float().cpu().flatten()
    norm = float(v.norm())
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"a steering direction must be finite and nonzero, got norm {norm}")
    return v / norm


def feature_direction(sae: AnySAE, feature: int) -> torch.Tensor:
    """The unit decoder row W_dec[feature] [d_in]: what latent `feature` writes into the residual."""
    inner = getattr(sae, "sae", sae)
    d_sae = int(inner.d_sae)
    if not 0 <= int(feature) < d_sae:
        raise IndexError(
            f"feature {feature} is out of range: this SAE has d_sae={d_sae} latents (0..{d_sae - 1})"
        )
    return _unit(inner.W_dec[int(feature)])


def random_direction(d: int, norm: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A direction drawn uniformly on the sphere of radius `norm` in R^d (the matched-norm control)."""
    return _unit(torch.randn(d, generator=torch.Generator().manual_seed(seed))) * norm


def random_feature(sae: AnySAE, exclude: Iterable[int] = (), seed: int = 0) -> int:
    """A latent index drawn uniformly from the SAE's latents, none of `exclude` (the random-latent
    control)."""
    banned = {int(f) for f in exclude}
    pool = np.setdiff1d(np.arange(int(getattr(sae, "sae", sae).d_sae)), list(banned))
    if len(pool) == 0:
        raise ValueError("every latent is excluded: there is no random latent left to draw")
    return int(np.random.default_rng([seed, 6]).choice(pool))


def diff_of_means_direction(run_dir: str | os.PathLike, layer: int, pooling: str = "mean") -> torch.Tensor:
    """Unit vector mean(deceptive) - mean(honest) of the pooled per-completion residuals at `layer`
    (labels from completions.jsonl; ambiguous and unlabelled completions left out). The baseline that
    AxBench found hard to beat (REFERENCE.md)."""

    ids, mean, last = load_pooled(run_dir, layer)
    label = {r["id"]: r.get("label") for r in read_completions(run_dir)}
    X = mean if pooling == "mean" else last
    rows = {c: [i for i, cid in enumerate(ids) if label.get(cid) == c] for c in ("honest", "deceptive")}
    if min(len(v) for v in rows.values()) == 0:
        raise ValueError(
            f"layer {layer} has {len(rows['honest'])} honest and {len(rows['deceptive'])} deceptive pooled "
            "completions: both are needed for a difference of means (label more in notebook 02)"
        )
    return _unit(X[rows["deceptive"]].mean(0) - X[rows["honest"]].mean(0))


def residual_norm(run_dir: str | os.PathLike, layer: int, max_tokens: int = 50_000) -> float:
    """Mean L2 norm of a completion token's residual at `layer`: the unit of steering strength.

    From the activation store (per-token, what the SAEs were trained on; its first `max_tokens` tokens);
    without a store, from the pooled `last` vectors (one completion token each), announced."""

    try:
        store = LayerStore(run_dir, layer)
    except FileNotFoundError:
        print(f"no activation store for layer {layer}: residual norm from the pooled last-token vectors")
        return float(load_pooled(run_dir, layer)[2].norm(dim=-1).mean())
    norms, seen = [], 0
    for batch in store.iter_batches(4096, shuffle=False):
        norms.append(batch.norm(dim=-1).double())
        seen += len(batch)
        if seen >= max_tokens:
            break
    return float(torch.cat(norms).mean())


def measure_residual_norm(lm: HookableModel, layer: int, texts: Sequence[str]) -> float:
    """Mean L2 norm per token at `layer` over chat-encoded `texts`, position 0 left out (BOS often
    carries a huge "attention sink" norm). For a model with no run folder (e.g. the panel)."""

    norms = []
    for text in texts:
        ids = torch.tensor([encode_chat(lm.tokenizer, text)], device=lm.model.device)
        h = run_with_capture(lm.model, [hook_name(layer)], input_ids=ids)[hook_name(layer)]
        norms.append(h[0, 1:].float().norm(dim=-1).cpu())
    return float(torch.cat(norms).mean())


# --- checks --------------------------------------------------------------------------------------
def _module(model: ModelOrModule) -> torch.nn.Module:
    """The nn.Module of a LoadedModel, or the module itself (a CausalLM's own `.model` is its trunk)."""
    return model if isinstance(model, torch.nn.Module) else model.model


def _short(name: str) -> str:
    return re.split(r"[/:]", name.rstrip("/"))[-1].lower().removeprefix("nanochat-")


def check_sae_matches(sae: AnySAE, lm: ModelOrModule, layer: int | None = None) -> None:
    """Refuse an SAE trained on another model, hook or width than the one it is about to steer.

    `sae`: a LoadedSAE (hook and model name checked too) or a bare SAE (width only); `lm`: a
    LoadedModel (its spec is compared with the SAE's model_name) or a bare model (no name to compare)."""
    model = _module(lm)
    info = getattr(lm, "info", None)
    spec = info.spec if info is not None else type(model).__name__
    d_model = info.d_model if info is not None else int(model.get_input_embeddings().weight.shape[1])
    inner = getattr(sae, "sae", sae)
    what = f"SAE {sae.path.name}" if isinstance(sae, LoadedSAE) else "this SAE"
    trained_on = f" (trained on {sae.model_name}, {sae.hook_name})" if isinstance(sae, LoadedSAE) else ""
    if int(inner.d_in) != int(d_model):
        raise ValueError(
            f"{what}{trained_on} reads d_in={inner.d_in} vectors but {spec} has d_model={d_model}: "
            f"load an SAE trained on {spec}"
        )
    if not isinstance(sae, LoadedSAE):
        return
    if info is not None and sae.model_name and _short(sae.model_name) != _short(spec):
        raise ValueError(
            f"{what} was trained on model {sae.model_name!r} but the loaded model is {spec!r}: load the "
            f"model it was trained on, or an SAE trained on {spec}"
        )
    if layer is not None and sae.layer != layer:
        raise ValueError(
            f"{what} was trained on hook {sae.hook_name!r} (layer {sae.layer}) but you asked for "
            f"{hook_name(layer)!r}: steer at layer {sae.layer}, or load an SAE trained on layer {layer}"
        )
    check_layers(model, [sae.layer])


# --- interventions -------------------------------------------------------------------------------
@contextmanager
def steer(
    model: ModelOrModule, layer: int, direction: torch.Tensor, strength: float, *, scale: float = 1.0
) -> Iterator[torch.Tensor]:
    """Add strength · scale · direction/|direction| to the residual after `layer`, at every position,
    for every forward pass inside the block (yields the added vector [d_model]). Pass
    `scale=residual_norm(...)` to give `strength` in units of the typical residual norm."""
    model = _module(model)
    (layer,) = check_layers(model, [layer])
    vec = _unit(direction) * (float(strength) * float(scale))
    d_model = int(model.get_input_embeddings().weight.shape[1])
    if len(vec) != d_model:
        raise ValueError(f"the direction has {len(vec)} dims but the model's residual has d_model={d_model}")
    with add_to_residual(model, {hook_name(layer): vec}):
        yield vec


@contextmanager
def clamp_feature(
    model: ModelOrModule, sae: AnySAE, layer: int, feature: int, value: float
) -> Iterator[None]:
    """Set SAE latent `feature` to `value` at every position after `layer`, keeping the SAE's error:
    x' = x + (value - f(x)) · W_dec[feature], computed per token in a forward hook (removed in
    `finally`). value=0 ablates the feature; the error term x - x̂ is never touched."""
    lm, model = model, _module(model)
    check_sae_matches(sae, lm, layer)
    (layer,) = check_layers(model, [layer])
    inner = getattr(sae, "sae", sae)
    feature_direction(inner, feature)  # range check with the d_sae in the message
    w_dec = inner.W_dec[feature].detach()  # [d_in], not normalised: that is what the latent writes

    def clamp(x: torch.Tensor) -> torch.Tensor:  # [n, d_model] float32
        with torch.no_grad():
            x = x.to(w_dec.device)
            return x + (float(value) - inner.encode(x)[0][..., feature])[..., None] * w_dec

    with edit_residual(model, hook_name(layer), clamp):
        yield


# --- conditions ----------------------------------------------------------------------------------
@dataclass
class Condition:
    """One steering condition of an experiment;
    `vector = direction/|direction| · strength · residual_norm`."""

    name: str
    """Unique within steering.jsonl: a resumed run skips names it has."""
    kind: str
    """One of KINDS: feature, random_feature, random_direction, diff_of_means, none."""
    layer: int
    strength: float = 0.0
    """In units of `residual_norm` (signed: negative pushes the other way)."""
    direction: torch.Tensor | None = field(default=None, repr=False)
    residual_norm: float = 1.0
    feature: int | None = None
    sae_id: str | None = None
    control_seed: int | None = None

    def __post_init__(self) -> None:
        self.layer = int(self.layer)
        self.strength, self.residual_norm = float(self.strength), float(self.residual_norm)
        if self.kind not in KINDS:
            raise ValueError(f"condition {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "none":
            self.direction, self.strength = None, 0.0
        elif self.direction is None:
            raise ValueError(f"condition {self.name!r} of kind {self.kind!r} needs a direction")
        else:
            self.direction = _unit(self.direction)
        if not self.residual_norm > 0:
            raise ValueError(f"condition {self.name!r}: residual_norm must be > 0, got {self.residual_norm}")

    def context(self, model: ModelOrModule) -> Any:
        if self.kind == "none":
            return nullcontext()
        return steer(model, self.layer, self.direction, self.strength, scale=self.residual_norm)

    def describe(self) -> dict[str, Any]:
        """JSON fields of steering.jsonl (the direction as a hash: it is recomputable from its source)."""
        sha = None
        if self.direction is not None:
            sha = hashlib.sha256(np.round(self.direction.numpy(), 5).astype(np.float32).tobytes()).hexdigest()
        return {
            "name": self.name,
            "kind": self.kind,
            "layer": self.layer,
            "strength": self.strength,
            "residual_norm": self.residual_norm,
            "vector_norm": abs(self.strength) * self.residual_norm,
            "feature": self.feature,
            "sae_id": self.sae_id,
            "control_seed": self.control_seed,
            "direction_sha256": sha,
        }


def build_conditions(
    sae: LoadedSAE,
    features: Sequence[int],
    strengths: Sequence[float],
    *,
    residual_norm: float,
    n_random: int = 2,
    diff_of_means: torch.Tensor | None = None,
    seed: int = 0,
) -> list[Condition]:
    """The standard design (REFERENCE.md, steering practice): no steering; each feature at each strength;
    per strength `n_random` random latents of the same SAE and `n_random` random directions of the same
    norm; and the difference-of-means baseline when given. Use strengths of both signs and start small:
    on SmolLM2-135M (layer 10, norm ~140) ±0.25 already changes the text and ±1 turns it to noise, which
    the perplexity column shows."""
    sid = sae.sae_id
    layer, d = sae.layer, sae.sae.d_in
    out = [Condition("none", "none", layer)]
    for s in strengths:
        common = dict(layer=layer, strength=float(s), residual_norm=residual_norm)
        for f in features:
            out.append(
                Condition(
                    f"L{layer} feature {sid}/{f} @ {s:+g}",
                    "feature",
                    direction=feature_direction(sae, f),
                    feature=int(f),
                    sae_id=sid,
                    **common,
                )
            )
        for r in range(n_random):
            latent = random_feature(sae, exclude=features, seed=seed + r)
            out.append(
                Condition(
                    f"L{layer} random_feature {sid}/{latent} @ {s:+g}",
                    "random_feature",
                    direction=feature_direction(sae, latent),
                    feature=latent,
                    sae_id=sid,
                    control_seed=seed + r,
                    **common,
                )
            )
            out.append(
                Condition(
                    f"L{layer} random_direction seed {seed + r} @ {s:+g}",
                    "random_direction",
                    direction=random_direction(d, 1.0, seed + r),
                    control_seed=seed + r,
                    **common,
                )
            )
        if diff_of_means is not None:
            out.append(
                Condition(
                    f"L{layer} diff_of_means @ {s:+g}", "diff_of_means", direction=diff_of_means, **common
                )
            )
    return out
