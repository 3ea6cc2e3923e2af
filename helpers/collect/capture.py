"""Activation capture after sampling: per-token residuals into the store, one pooled vector per completion.

`collect_activations` re-runs the model on exactly the tokens each completion was sampled with
(`prompt_token_ids + completion_token_ids`, never a re-tokenisation of the text), one forward pass
per batch, and records `blocks.{L}.hook_resid_post` for every requested layer in that same pass; the
layers after the deepest requested one are skipped. The vector at a completion token is the residual
after the model has read that token.

Outputs in the run folder (DESIGN.md §3):
- `activations/layer_{L}/`: the completion tokens' vectors (and the prompt's with `include_prompt`),
  rounded to float16 (a completion that overflows float16 is kept in float32), through
  `store.ActivationWriter`.
- `pooled/layer_{L}.safetensors`: `mean` and `last` `[n_completions, d_model]` float32 over the
  completion tokens, and `prompt_last`: the residual at the prompt's last token (the chat template's
  assistant header), read before the model wrote anything: the prompt-only probe's input (if it reads
  the label as well as the answer does, a probe reads the instruction, not the answer). Row order in
  the metadata (`completion_ids`, a JSON list). They are computed from the values *as stored* (after
  the float16 rounding), so a pooled row equals the mean / last of that completion's rows in the store:
  probes on pooled vectors and SAEs on stored tokens see the same numbers.
- Pooled vectors (no per-token store) also at the `sweep_layers`, by default every layer of a model
  with up to 16 and an even stride over deeper ones (`default_sweep_layers`): the layer sweep of
  notebook 04 (signal against depth). They cost the forward pass to the deepest of them and
  3 x d_model float32 per completion and layer.

CUDA out of memory in a batch (the forward pass or the copies to the host, which all come before anything
of the batch is written) halves the batch (`oom.ShrinkingBatches`, down to one completion, then an error
naming `batch_size`); the batch's completions go through the model again at the smaller size, and the
run goes on at that size, so the batches from the failed one on are those of a run started at that
size: on the CPU the files equal that run's (tested). A completion is right-padded to the longest of its
batch, so against a run at the larger size a vector may round differently in the last bit (on a GPU
also from the kernels a batch shape picks), before the float16 rounding.

Resume: completions already in every layer's store and pooled file are skipped; pooled rows of
completions that were stored but not yet pooled (a disconnect between a shard and the pooled file) take
their mean and last from the store, so a run that was interrupted ends with the same files as one that
was not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from helpers.collect.oom import ShrinkingBatches
from helpers.collect.packing import pad_batch
from helpers.collect.sampling import Completion
from helpers.collect.store import FP16_MAX, ActivationWriter, LayerStore, check_finite_tokens
from helpers.model.chat import pad_token_id
from helpers.model.hooks import check_layers, decoder_layers, hook_name, run_with_capture
from helpers.model.protocols import HookableModel
from helpers.run import atomic_write_bytes, pooled_dir, pooled_path

POOLED = ("mean", "last", "prompt_last")
"""The vectors of a pooled file, each [n_completions, d_model] (module doc)."""
SWEEP_MAX_LAYERS = 16
"""`default_sweep_layers` pools every layer up to this depth, and about this many layers beyond it."""
CAPTURE_OOM_FIX = (
    "pool fewer sweep layers (sweep_layers=None pools only the stored layers), store fewer layers, or "
    "use a GPU with more memory"
)


def default_sweep_layers(n_layers: int) -> list[int]:
    """Every layer when there are at most SWEEP_MAX_LAYERS, else an even stride that keeps the last one
    (d32: 16 of 32 layers)."""
    stride = -(-n_layers // SWEEP_MAX_LAYERS)  # ceil
    return sorted({*range(n_layers - 1, -1, -stride)})


class _Row(NamedTuple):
    id: str
    prompt: list[int]
    completion: list[int]


def collect_activations(
    lm: HookableModel,
    completions: list[Completion | dict],
    layers: list[int],
    run_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    include_prompt: bool = False,
    shard_tokens: int = 65_536,
    sweep_layers: Sequence[int] | str | None = "auto",
) -> dict[str, Any]:
    """Store per-token and pooled residual activations of `completions` at `layers`, and pooled vectors
    alone at `sweep_layers` ("auto": `default_sweep_layers`; None or []: none); returns a summary.

    `completions` are `Completion`s or their `to_dict()` rows (from completions.jsonl). Completions with
    no tokens are listed under "empty" and store nothing. Non-finite activations raise the store's
    error, which names the completion, token and dimension. CUDA out of memory in a batch halves
    `batch_size` and redoes the batch (module notes).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model = lm.model
    layers = sorted(set(check_layers(model, layers)))
    if sweep_layers == "auto":
        sweep_layers = default_sweep_layers(len(decoder_layers(model)))
    pooled_only = sorted(set(check_layers(model, sweep_layers or [])) - set(layers))
    all_layers = sorted({*layers, *pooled_only})
    rows = _rows(completions)
    names = {layer: hook_name(layer) for layer in all_layers}
    pad_id = pad_token_id(lm.tokenizer)
    pooled_ids = {layer: _pooled_ids(run_dir, layer) for layer in all_layers}
    # Per layer: completion id -> {"mean", "last", "prompt_last"} [d_model] (mean / last as stored).
    fresh: dict[int, dict[str, dict[str, torch.Tensor]]] = {layer: {} for layer in all_layers}
    tokens_stored = dict.fromkeys(layers, 0)
    with ExitStack() as stack:
        writers = {
            layer: stack.enter_context(ActivationWriter(run_dir, layer, shard_tokens=shard_tokens))
            for layer in layers
        }

        def complete(r: _Row) -> bool:
            return all(r.id in w.done_ids for w in writers.values()) and all(
                r.id in pooled_ids[layer] for layer in all_layers
            )

        empty = [r.id for r in rows if not r.completion]
        todo = [r for r in rows if r.completion and not complete(r)]
        skipped = sum(1 for r in rows if r.completion) - len(todo)
        # Similar lengths share a batch, so little of each forward pass is spent on padding.
        todo.sort(key=lambda r: len(r.prompt) + len(r.completion))
        batches = ShrinkingBatches(
            batch_size,
            what="completions per forward pass",
            setting="collect_activations' batch_size (notebook 02: BATCH_SIZE, halved)",
            fix=CAPTURE_OOM_FIX,
        )

        def forward(batch: list[_Row]) -> dict:
            return _batch_vectors(model, names, batch, pad_id, include_prompt, set(writers))

        with tqdm(total=len(todo), desc="collecting activations", unit="completion") as bar:
            try:
                for batch, host in batches.run(todo, forward):
                    _keep(batch, host, writers, fresh, tokens_stored)
                    bar.update(len(batch))
            except torch.cuda.OutOfMemoryError:
                # Even one completion did not fit. Keep what the finished batches gave (nothing of the
                # failed one was written), so that a rerun with other settings goes on after them.
                for writer in writers.values():
                    writer.flush()
                for layer in all_layers:
                    _write_pooled(run_dir, layer, [r for r in rows if r.id in fresh[layer]], fresh[layer])
                raise
    pooled = {layer: _write_pooled(run_dir, layer, rows, fresh[layer]) for layer in all_layers}
    return {
        "layers": layers,
        "sweep_layers": all_layers,
        "completions": len(rows),
        "stored": len(todo),
        "skipped_done": skipped,
        "empty": empty,
        "tokens_stored": tokens_stored,
        "pooled_rows": pooled,
        "include_prompt": include_prompt,
    }


def _batch_vectors(
    model: torch.nn.Module,
    names: dict[int, str],
    batch: list[_Row],
    pad_id: int,
    include_prompt: bool,
    stored_layers: set[int],
) -> dict[int, tuple[list[tuple[int, torch.Tensor]], list[dict[str, torch.Tensor]]]]:
    """All of a batch's device work, nothing written: one forward pass, then per layer of `names`
    `(stored, pooled)` on the host. `stored`: per row, (first stored position, its vectors as the store
    will keep them) at `stored_layers`, [] elsewhere. `pooled`: per row, {"prompt_last"}, and at the
    layers not stored its "mean" and "last" too (stored layers pool when they store, unless an earlier
    run stored the completion: then mean and last come from the store). The device tensors are this
    frame's, so they are freed with it when CUDA runs out of memory."""
    ids, mask = pad_batch([r.prompt + r.completion for r in batch], pad_id, model.device)
    # Right padding keeps every real token at its unpadded position (0, 1, ...), and causal attention
    # never lets a real token see the pads after it. {name: [b, width, d_model]}
    acts = run_with_capture(model, list(names.values()), stop_early=True, input_ids=ids, attention_mask=mask)
    out = {}
    for layer, name in names.items():
        stored = _as_stored(acts[name], batch, include_prompt)
        pooled = [{"prompt_last": v} for v in _prompt_last(acts[name], batch)]
        if layer not in stored_layers:
            for row, (first, vectors), pool in zip(batch, stored, pooled, strict=True):
                completion = vectors[len(row.prompt) - first :]  # [n_tokens, d_model]
                check_finite_tokens(completion.numpy(), row.id)  # no store to refuse it
                pool |= {"mean": completion.mean(0), "last": completion[-1].clone()}
            stored = []  # pooled only: its per-token vectors are not kept
        out[layer] = (stored, pooled)
    return out


def _keep(
    batch: list[_Row],
    host: dict[int, tuple[list[tuple[int, torch.Tensor]], list[dict[str, torch.Tensor]]]],
    writers: dict[int, ActivationWriter],
    fresh: dict[int, dict[str, dict[str, torch.Tensor]]],
    tokens_stored: dict[int, int],
) -> None:
    """A batch's vectors (`_batch_vectors`) into the writers of the stored layers (the completions they
    lack, pooled as stored) and every layer's pooled rows in `fresh`."""
    for layer, (stored, pooled) in host.items():
        writer = writers.get(layer)
        for b, row in enumerate(batch):
            if writer is not None and row.id not in writer.done_ids:
                first, vectors = stored[b]
                completion = vectors[len(row.prompt) - first :]  # [n_tokens, d_model]
                pooled[b] |= {"mean": completion.mean(0), "last": completion[-1].clone()}
                writer.add(row.id, vectors, first_position=first)
                tokens_stored[layer] += len(vectors)
            fresh[layer][row.id] = pooled[b]


def _pooled_ids(run_dir: str | os.PathLike, layer: int) -> set[str]:
    """Completion ids already in a layer's pooled file with every pooled vector (an older file without
    `prompt_last` counts as empty for it: those rows are recomputed)."""
    pooled = load_pooled_prompt(run_dir, layer)
    return set(pooled[0]) if pooled else set()


def pooled_layers(run_dir: str | os.PathLike) -> list[int]:
    """The layers with a pooled file (the stored layers and the sweep layers), in order."""
    folder = pooled_dir(run_dir)
    found = (
        [p.stem.removeprefix("layer_") for p in folder.glob("layer_*.safetensors")] if folder.exists() else []
    )
    return sorted(int(x) for x in found if x.isdigit())


def _read_pooled(
    run_dir: str | os.PathLike, layer: int, keys: Sequence[str] = POOLED
) -> tuple[list[str], dict[str, torch.Tensor]] | None:
    """`(completion_ids, {key: [n, d_model]})` of one layer's pooled file, for those of `keys` it holds
    (a file from before prompt vectors lacks `prompt_last`); None when there is no file."""
    path = pooled_path(run_dir, layer)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        present = set(f.keys())
        return json.loads(f.metadata()["completion_ids"]), {k: f.get_tensor(k) for k in keys if k in present}


def load_pooled_prompt(run_dir: str | os.PathLike, layer: int) -> tuple[list[str], torch.Tensor] | None:
    """`(completion_ids, prompt_last [n, d_model])` of one layer, or None for a pooled file written
    before prompt vectors were kept (rerun notebook 02's collection to add them)."""
    pooled = _read_pooled(run_dir, layer, ("prompt_last",))
    return (pooled[0], pooled[1]["prompt_last"]) if pooled and pooled[1] else None


def load_pooled(run_dir: str | os.PathLike, layer: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """`(completion_ids, mean [n, d_model], last [n, d_model])` of one layer, rows in id order."""
    pooled = _read_pooled(run_dir, layer, ("mean", "last"))
    if pooled is None:
        raise FileNotFoundError(
            f"no pooled activations at {pooled_path(run_dir, layer)}: run collect_activations (notebook 02) "
            f"for layer {layer} first"
        )
    ids, tensors = pooled
    return ids, tensors["mean"], tensors["last"]


def _as_stored(
    hidden: torch.Tensor, batch: list[_Row], include_prompt: bool
) -> list[tuple[int, torch.Tensor]]:
    """Per row of `hidden` [b, width, d_model]: (first stored position, float32 CPU copy of its stored rows).

    A completion whose values fit float16 is rounded to float16 here, before it reaches the store. The
    store keeps float16 shards unchanged, and a shard that turned float32 because another completion
    overflowed keeps these already-rounded values: so what a completion stores, and its pooled
    vectors, never depend on which shard it lands in (a resumed run cuts shards elsewhere). A
    completion that overflows (or is not finite: the store then raises) is passed unrounded."""
    token_max = hidden.abs().amax(-1).float().cpu()  # [b, width]: the largest magnitude per token
    rounded = hidden.half().cpu().float()  # one device->host copy per layer and batch, in float16
    exact = None
    out = []
    for b, row in enumerate(batch):
        first = 0 if include_prompt else len(row.prompt)
        end = len(row.prompt) + len(row.completion)
        if token_max[b, first:end].max() < FP16_MAX:  # False for NaN too
            vectors = rounded[b, first:end].clone()  # own memory: don't keep the batch alive in the writer
        else:
            exact = hidden.float().cpu() if exact is None else exact
            vectors = exact[b, first:end].clone()
        out.append((first, vectors))
    return out


def _prompt_last(hidden: torch.Tensor, batch: list[_Row]) -> list[torch.Tensor]:
    """Per row of `hidden` [b, width, d_model]: the vector at its prompt's last token, float32 on the CPU,
    rounded through float16 as stored vectors are (kept exact where it would overflow)."""
    at = torch.tensor([len(r.prompt) - 1 for r in batch], device=hidden.device)
    vectors = hidden[torch.arange(len(batch), device=hidden.device), at].float().cpu()  # [b, d_model]
    fits = vectors.abs().amax(-1) < FP16_MAX
    return [v.half().float() if ok else v.clone() for v, ok in zip(vectors, fits.tolist(), strict=True)]


def _write_pooled(run_dir: str | os.PathLike, layer: int, rows: list[_Row], fresh: dict) -> int:
    """Rewrite the layer's pooled file with a row for every completion of `rows` that has one now or
    had one before; returns its rows. Mean and last of a completion stored by an earlier, interrupted
    run come from the store (exactly what it holds); `prompt_last` always from this run's pass."""
    old: dict[str, dict[str, torch.Tensor]] = {}
    pooled = _read_pooled(run_dir, layer)
    if pooled is not None and len(pooled[1]) == len(POOLED):  # an older file without prompt_last is rebuilt
        ids, tensors = pooled
        old = {cid: {k: t[i] for k, t in tensors.items()} for i, cid in enumerate(ids)}
    need = [r for r in rows if r.completion and r.id not in old]
    if not need:
        return len(old)
    store = LayerStore(run_dir, layer) if any("mean" not in fresh.get(r.id, {}) for r in need) else None
    for row in need:
        if row.id not in fresh:
            raise RuntimeError(
                f"completion {row.id!r} has no pooled vectors at layer {layer}: rerun collect_activations"
            )
        vectors = dict(fresh[row.id])
        if "mean" not in vectors:  # stored by an earlier run that was interrupted before pooling
            if row.id not in store.entries:
                raise RuntimeError(
                    f"completion {row.id!r} should be in {store.dir} but is not: rerun collect_activations"
                )
            first_position = store.entries[row.id][3]
            completion = torch.tensor(store.tokens_of(row.id))[len(row.prompt) - first_position :]
            vectors |= {"mean": completion.mean(0), "last": completion[-1]}
        old[row.id] = vectors
    ids = list(old)
    data = safetensors_bytes(
        {k: torch.stack([old[cid][k] for cid in ids]).contiguous() for k in POOLED},
        metadata={"completion_ids": json.dumps(ids)},
    )
    atomic_write_bytes(pooled_path(run_dir, layer), data)
    return len(ids)


def _rows(completions: list[Completion | dict]) -> list[_Row]:
    """The ids and exact token ids of each completion, refusing duplicates and rows without token ids."""
    rows, seen = [], set()
    for c in completions:
        d = c.to_dict() if isinstance(c, Completion) else c
        missing = [k for k in ("id", "prompt_token_ids", "completion_token_ids") if k not in d]
        if missing:
            raise ValueError(
                f"completion {d.get('id', '?')!r} has no {', '.join(missing)}: activations are recomputed on "
                "the exact sampled tokens, so pass Completion objects or their to_dict() rows"
            )
        if d["id"] in seen:
            raise ValueError(f"completion id {d['id']!r} appears twice: deduplicate the completions first")
        seen.add(d["id"])
        rows.append(_Row(d["id"], list(d["prompt_token_ids"]), list(d["completion_token_ids"])))
    return rows
