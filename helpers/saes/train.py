"""Train one SAE on the activation store: one loop for every architecture, resumable.

`train_sae` streams batches from `store.LayerStore` (never the whole store in RAM; or from any
`TrainingData`: the reference corpus streamed through forward passes, or a mix of sources), scales them
(`TrainConfig.input_norm`: mean norm sqrt(d_in) for TopK, the BatchTopK family and the standard SAE, as
SAELens does; unit mean squared norm for JumpReLU and Gated, whose ε and thresholds assume it), starts
b_dec at the geometric median, and runs Adam with a warm-up clamped to 5% of the run (a warm-up longer than
the run is a known anchor bug), a linear decay at the end, gradient clipping, decoder rows free from norm
0.1 as SAELens's (`SAE.free_decoder`; held at unit norm for Gated), and mixed precision (fp16 + grad
scaler on a T4, bf16 from compute capability 8, fp32 on CPU). Checkpoints hold the full state and are
written atomically; a rerun resumes from the last one and ends bitwise identical to an uninterrupted run on
CPU. Inference-only parameters are then set from the first tokens (BatchTopK's θ: `Trainer.calibrate`), the
scale folded into the weights, the SAE saved in SAELens format, and `metrics.json` (held-out metrics,
training history), written last, marks it complete.
`grid.train_grid` runs it for every layer × condition × architecture of a run.
"""

from __future__ import annotations

import inspect
import io
import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from tqdm.auto import tqdm

from helpers.collect.store import LayerStore
from helpers.model import hooks
from helpers.run import SAE_METRICS, atomic_write_bytes, atomic_write_json, override_fields, stable_hash
from helpers.saes.base import SAE, StepOutput, geometric_median
from helpers.saes.evals import activation_metrics, check_finite, evaluate_folder
from helpers.saes.io import load_sae, save_sae
from helpers.saes.registry import make_sae, sae_class


@dataclass
class TrainConfig:
    """Settings of one SAE's training run (the same for every architecture)."""

    architecture: Literal["standard", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated"] = (
        "topk"
    )
    """Registered name in `helpers.saes.ARCHITECTURES` (cfg.json gets the name SAELens loads it by)."""
    expansion: int = 8
    """d_sae = expansion * d_in."""
    l0: int = 32
    """Sparsity: TopK's and BatchTopK's k; the target L0 the others steer their sparsity coefficient to."""
    train_tokens: int = 2_000_000
    """Tokens to train on (the data repeats in new shuffles when a condition has fewer)."""
    batch_size: int = 1024
    """Tokens per step."""
    lr: float = 1e-3
    """Adam learning rate after warm-up. 1e-3, above SAELens's default 3e-4: better held-out explained
    variance for every architecture on short runs (README, Measured: bench/train_defaults.py). Runs much
    longer than a few thousand steps, or much wider SAEs, may want less (Gao et al. 2024 scale it down with
    the number of latents)."""
    warmup_steps: int = 100
    """Linear warm-up; clamped to 5% of the run."""
    decay_fraction: float = 0.2
    """The last fraction of steps decays the learning rate linearly to 0."""
    grad_clip: float = 1.0
    """Maximum gradient norm."""
    dead_tokens: int | None = None
    """A latent that has not fired for this many tokens is dead (AuxK revives them); None: train_tokens // 20,
    at most 10M (Gao et al. use 10M at scale)."""
    seed: int = 0
    """Seeds initialisation and data order."""
    checkpoint_every: int = 200
    """Steps between atomic checkpoints."""
    buffer_bytes: int = 1 << 29
    """RAM for the store's shuffle buffer (float32); the process peaks at a few times this (0.96 GB at 128 MiB
    when training from a 3 GB store in bench/sae_train.py --memory)."""
    init_tokens: int = 16_384
    """Tokens used to estimate the normalisation scale and the geometric median for b_dec."""
    input_norm: Literal["auto", "unit", "sqrt_d_in"] = "auto"
    """The input scale training sees (folded into the saved weights, so the saved SAE takes raw activations):
    "unit" scales to unit mean squared norm, "sqrt_d_in" to mean norm sqrt(d_in) (SAELens's
    `expected_average_only_in`), "auto" the architecture's `SAE.input_norm` (sqrt_d_in for TopK, the
    BatchTopK family and standard; unit for JumpReLU and Gated, whose sparsity settings are in unit-scale
    units). At sqrt(d_in)
    the biases move by a smaller share of the data's scale per Adam step (the ablations: README, Measured)."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto: fp32 on CPU, fp16 (grad scaler) below compute capability 8 (T4), bf16 from 8 (A100, L4, H100)."""
    sae_options: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments of the architecture, e.g. {"bandwidth": 0.002} for JumpReLU or
    {"matryoshka_widths": [72, 288, 1152, 4608]}; an option the architecture does not take is an error."""
    log_every: int = 10
    """Steps between progress-bar updates and history rows."""

    def __post_init__(self):
        cls = sae_class(self.architecture)  # an unknown name raises, listing the known architectures
        if self.train_tokens < self.batch_size:
            raise ValueError(
                f"train_tokens ({self.train_tokens}) must be at least batch_size ({self.batch_size})"
            )
        if not 0 <= self.decay_fraction < 1:
            raise ValueError(f"decay_fraction must be in [0, 1), got {self.decay_fraction}")
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "d_in", "d_sae", "l0", "seed"}
        if unknown := set(self.sae_options) - allowed:
            raise ValueError(
                f"sae_options {sorted(unknown)} are not arguments of {self.architecture}: "
                f"use {sorted(allowed)}"
            )

    @property
    def total_steps(self) -> int:
        return self.train_tokens // self.batch_size

    @property
    def dead_after(self) -> int:
        return self.dead_tokens or min(10_000_000, max(self.batch_size, self.train_tokens // 20))

    def lr_at(self, step: int) -> float:
        warmup = min(self.warmup_steps, math.ceil(0.05 * self.total_steps))
        decay_start = self.total_steps * (1 - self.decay_fraction)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if step >= decay_start:
            return self.lr * max(0.0, (self.total_steps - step) / (self.total_steps - decay_start))
        return self.lr


class TooFewSamples(ValueError):
    """A training condition has too few completions or tokens."""


def amp_settings(device: str, precision: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a grad scaler): DESIGN.md §5's dtype rule for SAE training."""
    if precision == "auto":
        major = torch.cuda.get_device_capability()[0] if device == "cuda" else 0
        precision = "fp32" if device == "cpu" else ("bf16" if major >= 8 else "fp16")
    if precision != "fp32" and device == "cpu":
        raise ValueError(f"precision {precision!r} needs a GPU; use 'fp32' (or 'auto') on CPU")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision], precision == "fp16"


def batches(
    store: LayerStore, ids: list[str] | None, cfg: TrainConfig, start: int = 0
) -> Iterator[torch.Tensor]:
    """Full batches [batch_size, d_in] from step `start` on: epoch e is a fresh shuffle seeded by
    (seed, e) and drops its last partial batch, so resuming at step `start` re-reads only its epoch."""
    per_epoch = store.count(ids) // cfg.batch_size
    if per_epoch == 0:
        raise TooFewSamples(f"{store.count(ids)} tokens is less than one batch of {cfg.batch_size}")
    epoch, skip = divmod(start, per_epoch)
    while True:
        seed = stable_hash(cfg.seed, epoch)
        it = store.iter_batches(cfg.batch_size, completion_ids=ids, seed=seed, buffer_bytes=cfg.buffer_bytes)
        yield from itertools.islice(it, skip, per_epoch)
        epoch, skip = epoch + 1, 0


class TrainingData(Protocol):
    """Where training batches come from: a stored layer (`StoreData`), a mix (`MixedData`), or
    `collect.corpus.CorpusStream` (activations made by forward passes as training goes)."""

    d_model: int

    def count(self) -> int | None:
        """Tokens available (one epoch), or None for an endless stream."""

    def batches(self, cfg: TrainConfig, start: int) -> Iterator[torch.Tensor]:
        """Endless batches [cfg.batch_size, d_model], deterministic in cfg.seed, from step `start` on."""


@dataclass
class StoreData:
    """The tokens of completions (or corpus sequences) `ids` of a store; all of them when None."""

    store: LayerStore
    ids: list[str] | None = None

    @property
    def d_model(self) -> int:
        return self.store.d_model

    def count(self) -> int:
        return self.store.count(self.ids)

    def batches(self, cfg: TrainConfig, start: int) -> Iterator[torch.Tensor]:
        return batches(self.store, self.ids, cfg, start)


@dataclass
class StreamData:
    """An endless stream with `batches(batch_size, seed, start)`, e.g. `collect.corpus.CorpusStream`."""

    stream: Any

    @property
    def d_model(self) -> int:
        return self.stream.d_model

    def count(self) -> None:
        return None

    def batches(self, cfg: TrainConfig, start: int) -> Iterator[torch.Tensor]:
        return self.stream.batches(cfg.batch_size, seed=cfg.seed, start=start)


@dataclass
class MixedData:
    """Every batch made of fixed shares of several sources (the `corpus+behaviour` condition): source i
    gives round(share_i × batch_size) rows of each batch (largest remainders), from its own batches."""

    parts: list[tuple[Any, float]]

    def __post_init__(self):
        if not self.parts or any(w < 0 for _, w in self.parts) or sum(w for _, w in self.parts) <= 0:
            raise ValueError(
                f"MixedData needs sources with non-negative shares summing above 0, got {self.parts}"
            )
        if len({d.d_model for d, _ in self.parts}) != 1:
            raise ValueError(
                "the mixed sources have different d_model: they come from different models or layers"
            )

    @property
    def d_model(self) -> int:
        return self.parts[0][0].d_model

    def count(self) -> int | None:
        counts = [d.count() for d, _ in self.parts]
        return None if None in counts else sum(counts)

    def sizes(self, batch_size: int) -> list[int]:
        total = sum(w for _, w in self.parts)
        exact = [batch_size * w / total for _, w in self.parts]
        sizes = [int(e) for e in exact]
        for i in sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])[: batch_size - sum(sizes)]:
            sizes[i] += 1
        return sizes

    def batches(self, cfg: TrainConfig, start: int) -> Iterator[torch.Tensor]:
        its = [
            d.batches(replace(cfg, batch_size=n, seed=stable_hash(cfg.seed, i) % 2**31), start)
            for i, ((d, _), n) in enumerate(zip(self.parts, self.sizes(cfg.batch_size), strict=True))
            if n
        ]
        while True:
            yield torch.cat([next(it) for it in its])


def as_training_data(data: LayerStore | TrainingData) -> TrainingData:
    """A bare store is all of its tokens (`StoreData(store)`); any other `TrainingData` as it is."""
    return StoreData(data) if isinstance(data, LayerStore) else data


HeldOut = StoreData | list[torch.Tensor]
"""Held-out activations for an SAE's metrics: tokens of a store (`StoreData`) or raw batches."""


@dataclass(frozen=True)
class TrainRunSettings:
    """How `train_sae` runs (not what SAE it makes: that is `TrainConfig`). A whole
    `settings=TrainRunSettings(...)` or single fields as keywords (`progress=False`), which win over it."""

    device: str = "cpu"
    """Where the SAE trains and is evaluated."""
    until_step: int | None = None
    """Stop (checkpointed) after this step, e.g. to split a run across sessions; None: run to the end."""
    progress: bool = True
    """Show a progress bar."""
    metadata: dict[str, Any] | None = None
    """Extra keys for metrics.json and the saved cfg.json (the grid's SAE id, layer, condition, ...)."""

    def with_overrides(self, overrides: dict[str, Any]) -> TrainRunSettings:
        """These settings with the fields named in `overrides` replaced (unknown names are refused)."""
        return override_fields(self, overrides, "training run settings")


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for the parameters of one device and dtype (an SAE's): the same total
    2-norm and factor min(1, max_norm / (norm + 1e-6)), bitwise the same gradients, in four calls without
    torch's grouping by device and dtype (0.07 ms of a ~5 ms step at 64 x 512, one thread). The norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


class Trainer:
    """The live state of one SAE's training: SAE, Adam, grad scaler, step, input scale, history.
    `train_step` is the one loop body for every architecture; `state_dict` is what a checkpoint holds."""

    def __init__(self, cfg: TrainConfig, d_in: int, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        self.amp_dtype, use_scaler = amp_settings(device, cfg.precision)
        sae = make_sae(
            cfg.architecture, d_in, cfg.expansion * d_in, l0=cfg.l0, seed=cfg.seed, **cfg.sae_options
        )
        self.sae: SAE = sae.to(device)
        self.params = list(self.sae.parameters())
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, fused=True)
        self.scaler = torch.amp.GradScaler(device, enabled=use_scaler)
        self.step, self.scale, self.seconds, self.history = 0, 1.0, 0.0, []

    @property
    def input_norm(self) -> str:
        """The input scale in use: cfg.input_norm, or the architecture's when "auto"."""
        return self.sae.input_norm if self.cfg.input_norm == "auto" else self.cfg.input_norm

    @torch.no_grad()
    def init_from_data(self, x0: torch.Tensor) -> None:
        """Scale to unit mean squared norm, or to mean norm sqrt(d_in) (`input_norm`); b_dec at the geometric
        median of the scaled sample; then the architecture's own `init_from_sample` (JumpReLU's θ)."""
        check_finite(x0, "the initialisation sample")
        if self.input_norm == "sqrt_d_in":
            self.scale = float(x0.shape[1] ** 0.5 / x0.norm(dim=1).mean())
        else:
            self.scale = float(1 / x0.pow(2).sum(1).mean().sqrt())
        self.sae.b_dec.copy_(geometric_median(x0.to(self.device) * self.scale))
        self.sae.init_from_sample(x0.to(self.device) * self.scale, self.cfg.total_steps)

    def train_step(self, x: torch.Tensor) -> StepOutput:
        """One optimiser step on a raw batch [batch_size, d_in]."""
        sae, cfg = self.sae, self.cfg
        # the batch, at the training scale (folded into the weights when saved)
        x = x.to(self.device, non_blocking=True) * self.scale
        # determine and set the learning rate for this step (warm-up, constant, linear decay)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        # forward pass: reconstruction + the architecture's auxiliary terms, under mixed precision on a GPU
        amp = torch.autocast(
            self.device, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )
        with amp:
            out = sae.losses(x, sae.dead_mask(cfg.dead_after))
        # backward pass, with the loss scaled when training in fp16
        self.scaler.scale(out.loss).backward()
        # unscale the gradients, keep decoder norms fixed (when held), then clip
        self.scaler.unscale_(self.opt)
        sae.project_decoder_grad()  # before clipping, so the clipped step keeps decoder norms
        clip_grad_norm(self.params, cfg.grad_clip)
        # step the optimizer and the grad scaler (a step with inf/NaN gradients in fp16 is skipped)
        self.scaler.step(self.opt)
        self.scaler.update()
        # flush the gradients as soon as we can, no need for this memory anymore
        self.opt.zero_grad(set_to_none=True)
        # after the step: decoder rows back to their norm, the architecture's controllers, dead-latent counts
        sae.normalize_decoder()
        sae.after_step(out)
        sae.record_firing(out.fired, len(x))
        self.step += 1
        # logging: one history row every log_every steps and at the last step
        if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
            ev = 1 - (x - out.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()  # this batch, scaled units
            self.history.append(
                {
                    "step": self.step,
                    "tokens": self.step * cfg.batch_size,
                    "lr": cfg.lr_at(self.step - 1),
                    "loss": float(out.loss.detach()),
                    **{k: float(v) for k, v in out.terms.items()},
                    "l0": out.l0,
                    "explained_variance": float(ev),
                    "dead_fraction": float(sae.dead_mask(cfg.dead_after).float().mean()),
                }
            )
        return out

    def calibrate(self, batches: Iterable[torch.Tensor]) -> dict | None:
        """After training: the SAE's inference-only parameters (BatchTopK's θ) from raw batches, scaled
        here as in training; what changed, or None."""
        return self.sae.calibrate(x.to(self.device) * self.scale for x in batches)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.cfg),
            "step": self.step,
            "scale": self.scale,
            "seconds": self.seconds,
            "history": self.history,
            "sae": self.sae.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = json.loads(json.dumps(asdict(self.cfg)))
        if "input_norm" not in state["config"]:  # from before input_norm: the scale it used is restored below
            now.pop("input_norm")
        if state["config"] != now:
            diff = ", ".join(
                f"{k}: checkpoint {state['config'].get(k)!r}, now {now.get(k)!r}"
                for k in sorted(set(state["config"]) | set(now))
                if state["config"].get(k) != now.get(k)
            )
            raise ValueError(
                f"the checkpoint was made with other settings ({diff}): set them back to resume it, "
                "or delete it to start over"
            )
        for obj, key in ((self.sae, "sae"), (self.opt, "optimizer"), (self.scaler, "scaler")):
            obj.load_state_dict(state[key])
        self.step, self.scale, self.seconds, self.history = (
            state[k] for k in ("step", "scale", "seconds", "history")
        )


def train_sae(
    data: LayerStore | TrainingData,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    hook_name: str,
    model_name: str,
    held_out: HeldOut | None = None,
    settings: TrainRunSettings | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train one SAE on `data` (a `TrainingData`: `StoreData(store, ids)`, a stream, a mix; a bare store
    is all its tokens), resuming from `out_dir/checkpoint.pt` if there. Held-out metrics come from
    `held_out` (`StoreData` or raw batches; default: the training `StoreData` itself). How it runs (device,
    `until_step`, progress bar, metadata): `TrainRunSettings`, whole or as keywords. Returns the metrics
    (also written to `out_dir/metrics.json`) or, when stopped at `until_step`, {"status": "paused", ...}."""
    run = (settings or TrainRunSettings()).with_overrides(overrides)
    device, metadata = run.device, run.metadata
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint.pt"
    hooks.layer_of(hook_name)  # a bad hook name fails now, not after training
    source = as_training_data(data)
    held_out = source if held_out is None else held_out
    if not isinstance(held_out, (StoreData, list)):
        raise ValueError(
            "training from a stream or a mix needs held_out: StoreData(store, ids) or a list of batches"
        )
    trainer = Trainer(cfg, source.d_model, device)
    n_init = -(-cfg.init_tokens // cfg.batch_size)  # batches of the init (and calibration) sample
    if (count := source.count()) is not None:
        n_init = max(1, min(n_init, count // cfg.batch_size))  # at most one epoch
    saved = None  # the step of the checkpoint on disk
    if ckpt.exists():
        trainer.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
        print(f"resuming {out_dir.name} at step {trainer.step}/{cfg.total_steps}")
        saved = trainer.step
    else:  # the first batches of the training stream itself; a non-finite one is named as a training batch
        init = list(itertools.islice(source.batches(cfg, 0), n_init))
        for i, x in enumerate(init):
            check_finite(x, f"training batch {i} (tokens {i * cfg.batch_size}..)")
        trainer.init_from_data(torch.cat(init))
    end = min(cfg.total_steps, run.until_step or cfg.total_steps)
    bar = tqdm(
        total=cfg.total_steps, initial=trainer.step, desc=out_dir.name, disable=not run.progress, unit="step"
    )
    start, data = time.perf_counter(), source.batches(cfg, trainer.step)
    while trainer.step < end:
        x = next(data)
        check_finite(x, f"training batch {trainer.step} (tokens {trainer.step * cfg.batch_size}..)")
        try:
            trainer.train_step(x)
        except torch.cuda.OutOfMemoryError as e:
            raise torch.cuda.OutOfMemoryError(_out_of_memory(cfg, trainer, out_dir, saved, str(e))) from e
        if trainer.step % cfg.log_every == 0:
            row = trainer.history[-1]
            bar.set_postfix(
                loss=f"{row['loss']:.4g}",
                L0=f"{row['l0']:.1f}",
                EV=f"{row['explained_variance']:.3f}",
                dead=f"{100 * row['dead_fraction']:.1f}%",
            )
        bar.update(1)
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == end:
            trainer.seconds, start = trainer.seconds + time.perf_counter() - start, time.perf_counter()
            buf = io.BytesIO()
            torch.save(trainer.state_dict(), buf)
            atomic_write_bytes(ckpt, buf.getvalue())
            saved = trainer.step
    bar.close()
    if trainer.step < cfg.total_steps:
        return {"status": "paused", "step": trainer.step, "checkpoint": str(ckpt)}
    # Inference-only parameters from the same first tokens (BatchTopK's θ): deterministic, so a rerun after
    # a crash between here and metrics.json calibrates the checkpoint's SAE to the same values.
    calibration = trainer.calibrate(itertools.islice(source.batches(cfg, 0), n_init))
    # Fold the scale, save in SAELens format, evaluate what was saved on held-out raw activations, and
    # write metrics.json last: its presence marks the SAE complete.
    meta = {**(metadata or {}), "training": asdict(cfg)}
    save_sae(
        trainer.sae, out_dir, hook_name=hook_name, model_name=model_name, scale=trainer.scale, metadata=meta
    )
    tokens = cfg.total_steps * cfg.batch_size
    training = {
        "tokens": tokens,
        "seconds": trainer.seconds,
        "tokens_per_second": tokens / max(trainer.seconds, 1e-9),
        "normalization_scale": trainer.scale,
        **({"calibration": calibration} if calibration else {}),
        "config": asdict(cfg),
        "history": trainer.history,
    }
    if isinstance(held_out, StoreData):
        evaluation = evaluate_folder(out_dir, held_out.store, held_out.ids, device=device)
    else:
        loaded = load_sae(out_dir, device=device)
        activations = activation_metrics(loaded.sae, held_out, device=device)
        evaluation = {"hook_name": hook_name, "layer": loaded.layer, "activations": activations}
    metrics = {**(metadata or {}), "architecture": cfg.architecture, **evaluation, "training": training}
    atomic_write_json(out_dir / SAE_METRICS, metrics)
    ckpt.unlink(missing_ok=True)
    return metrics


def _out_of_memory(cfg: TrainConfig, trainer: Trainer, out_dir: Path, saved: int | None, error: str) -> str:
    """What to lower when a training step does not fit the GPU: a smaller batch changes the training (so it
    is not shrunk behind the user's back, as the encoding passes are), and what is kept."""
    kept = (
        f"its checkpoint at step {saved} is kept: a rerun with the same settings resumes there (a smaller "
        f"BATCH_SIZE or EXPANSION trains this SAE again from the start: delete {out_dir / 'checkpoint.pt'})"
        if saved is not None
        else "no checkpoint was written yet"
    )
    return (
        f"CUDA ran out of memory training {out_dir.name} at step {trainer.step} of {cfg.total_steps} "
        f"({cfg.batch_size} tokens a step, {trainer.sae.d_sae} latents): lower BATCH_SIZE or EXPANSION in "
        f"notebook 03 (TrainConfig.batch_size / expansion), or free GPU memory (another model or SAE held in "
        f"this session); {kept}. CUDA said: {error}"
    )
