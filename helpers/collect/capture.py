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
  completion tokens, row order in the metadata (`completion_ids`, a JSON list). They are computed from
  the values *as stored* (after the float16 rounding), so a pooled row equals the mean / last of that
  completion's rows in the store: probes on pooled vectors and SAEs on stored tokens see the same
  numbers.

Resume: completions already in every layer's store are skipped; pooled rows of completions that were
stored but not yet pooled (a disconnect between a shard and the pooled file) are read back from the
store, so a run that was interrupted ends with the same files as one that was not.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from helpers.collect.sampling import Completion
from helpers.collect.store import FP16_MAX, ActivationWriter, LayerStore
from helpers.model.chat import pad_token_id
from helpers.model.hooks import check_layers, hook_name, run_with_capture
from helpers.run import atomic_write_bytes, pooled_path


class _Row(NamedTuple):
    id: str
    prompt: list[int]
    completion: list[int]


def collect_activations(
    lm: Any,
    completions: list[Completion | dict],
    layers: list[int],
    run_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    include_prompt: bool = False,
    shard_tokens: int = 65_536,
) -> dict[str, Any]:
    """Store per-token and pooled residual activations of `completions` at `layers`; returns a summary.

    `completions` are `Completion`s or their `to_dict()` rows (from completions.jsonl). Completions with
    no tokens are listed under "empty" and store nothing. Non-finite activations raise the store's
    error, which names the completion, token and dimension.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model = lm.model
    layers = sorted(set(check_layers(model, layers)))
    rows = _rows(completions)
    names = [hook_name(layer) for layer in layers]
    pad_id = pad_token_id(lm.tokenizer)
    # Per layer: completion id -> (mean, last) [d_model] of the completion rows as stored.
    fresh: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {layer: {} for layer in layers}
    tokens_stored = dict.fromkeys(layers, 0)
    with ExitStack() as stack:
        writers = {
            layer: stack.enter_context(ActivationWriter(run_dir, layer, shard_tokens=shard_tokens))
            for layer in layers
        }
        empty = [r.id for r in rows if not r.completion]
        todo = [r for r in rows if r.completion and any(r.id not in w.done_ids for w in writers.values())]
        skipped = sum(1 for r in rows if r.completion) - len(todo)
        # Similar lengths share a batch, so little of each forward pass is spent on padding.
        todo.sort(key=lambda r: len(r.prompt) + len(r.completion))
        with tqdm(total=len(todo), desc="collecting activations", unit="completion") as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                ids, mask = _right_pad([r.prompt + r.completion for r in batch], pad_id, model.device)
                # Right padding keeps every real token at its unpadded position (0, 1, ...), and causal
                # attention never lets a real token see the pads after it. {name: [b, width, d_model]}
                acts = run_with_capture(model, names, stop_early=True, input_ids=ids, attention_mask=mask)
                for layer, name in zip(layers, names, strict=True):
                    stored = _as_stored(acts[name], batch, include_prompt)
                    for row, (first, vectors) in zip(batch, stored, strict=True):
                        if row.id in writers[layer].done_ids:
                            continue  # stored in this layer by an earlier run, not yet in another one
                        writers[layer].add(row.id, vectors, first_position=first)
                        completion = vectors[len(row.prompt) - first :]  # [n_tokens, d_model]
                        fresh[layer][row.id] = (completion.mean(0), completion[-1].clone())
                        tokens_stored[layer] += len(vectors)
                bar.update(len(batch))
    pooled = {layer: _write_pooled(run_dir, layer, rows, fresh[layer]) for layer in layers}
    return {
        "layers": layers,
        "completions": len(rows),
        "stored": len(todo),
        "skipped_done": skipped,
        "empty": empty,
        "tokens_stored": tokens_stored,
        "pooled_rows": pooled,
        "include_prompt": include_prompt,
    }


def load_pooled(run_dir: str | os.PathLike, layer: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """`(completion_ids, mean [n, d_model], last [n, d_model])` of one layer, rows in id order."""
    path = pooled_path(run_dir, layer)
    if not path.exists():
        raise FileNotFoundError(
            f"no pooled activations at {path}: run collect_activations (notebook 02) for layer {layer} first"
        )
    with safe_open(str(path), framework="pt") as f:
        ids = json.loads(f.metadata()["completion_ids"])
        return ids, f.get_tensor("mean"), f.get_tensor("last")


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


def _write_pooled(run_dir: str | os.PathLike, layer: int, rows: list[_Row], fresh: dict) -> int:
    """Append pooled rows for every stored completion of `rows` not yet in the pooled file; returns its rows."""
    path = pooled_path(run_dir, layer)
    ids, mean, last = load_pooled(run_dir, layer) if path.exists() else ([], None, None)
    have = set(ids)
    need = [r for r in rows if r.completion and r.id not in have]
    if not need:
        return len(ids)
    store = LayerStore(run_dir, layer)
    new_mean, new_last = [], []
    for row in need:
        if row.id not in store.entries:
            raise RuntimeError(
                f"completion {row.id!r} should be in {store.dir} but is not: rerun collect_activations"
            )
        if row.id in fresh:
            m, lst = fresh[row.id]
        else:  # stored by an earlier run that was interrupted before it wrote the pooled file
            first_position = store.entries[row.id][3]
            completion = torch.tensor(store.tokens_of(row.id))[len(row.prompt) - first_position :]
            m, lst = completion.mean(0), completion[-1]
        new_mean.append(m)
        new_last.append(lst)
    ids += [r.id for r in need]
    mean = torch.cat([t for t in (mean, torch.stack(new_mean)) if t is not None])  # [n, d_model]
    last = torch.cat([t for t in (last, torch.stack(new_last)) if t is not None])
    data = safetensors_bytes(
        {"mean": mean.contiguous(), "last": last.contiguous()}, metadata={"completion_ids": json.dumps(ids)}
    )
    atomic_write_bytes(path, data)
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


def _right_pad(seqs: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n, width]` token ids and attention mask, padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
