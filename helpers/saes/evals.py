"""How good is an SAE: reconstruction and sparsity on activations, and the LM's loss with it spliced in.

- `activation_metrics`: MSE, explained variance (streamed in float64 with Chan's merge of batch means and
  sums of squares, so it equals the direct computation over all tokens), L0, dead and dense fractions,
  and a histogram of log10 firing frequencies.
- `lm_loss`: next-token cross-entropy on completion tokens with the residual at `blocks.{L}.hook_resid_post`
  replaced by the SAE's reconstruction (`hooks.edit_residual`, a forward hook that is always removed),
  against the clean model and against zero-ablation: the CE increase over the clean model, the KL to the
  clean next-token distribution, and SAEBench's scores (REFERENCE.md), CE-loss score = (CE_zero - CE_sae)
  / (CE_zero - CE_clean) (also called the fraction of loss recovered: against zero-ablation, a weak
  baseline, it flatters, so read it beside the CE and KL increases) and KL score = (KL_zero - KL_sae) /
  KL_zero. Each has a 95% t interval over prompt groups (`stats.ratio_ci`: completions of one group are
  not independent), and `evaluate_lm` spreads its completions over as many held-out groups as it can,
  honest and deceptive in turn, and reports the CE increase and KL of each label apart (`by_label`).
- `leaderboard`: one row per SAE from `saes/*/metrics.json` (plots.leaderboard_figure draws it).

Splicing replaces the residual with the reconstruction, dropping the SAE's error term: that is the
point of this measurement (for steering, add a direction instead: hooks.add_to_residual).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.collect.completions import analysis_split, read_completions, split_completions
from helpers.collect.store import LayerStore
from helpers.model.chat import pad_token_id
from helpers.model.hooks import edit_residual
from helpers.run import SAE_METRICS, atomic_write_json, read_sae_metrics, sae_dir, stable_hash
from helpers.saes.io import load_sae
from helpers.stats import group_index, ratio_ci

HIST_EDGES = [x / 4 for x in range(-28, 1)]  # log10 firing frequency bins, 1e-7 .. 1


def check_finite(x: Tensor, where: str) -> None:
    """Stop on NaN/inf activations, naming the batch, row and dimension."""
    if not torch.isfinite(x).all():
        row, dim = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(
            f"non-finite activation ({x[row, dim].item()}) in {where}, row {row}, dim {dim}: the stored "
            "activations are corrupt or the model overflowed; recollect this layer (notebook 02)"
        )


@torch.no_grad()
def activation_metrics(
    sae: nn.Module, batches: Iterable[Tensor], *, device: str = "cpu", dense_above: float = 0.1
) -> dict[str, Any]:
    """Metrics of `sae` (raw-unit inputs) over every batch [n, d_in]. Dead: never fired on these
    tokens; dense: fires on more than `dense_above` of them."""
    n, sse, mean, m2, l0_sum, fired = 0, 0.0, None, 0.0, 0.0, None
    for i, x in enumerate(batches):
        check_finite(x, f"evaluation batch {i}")
        x = x.to(device)
        sae.check_input(x)
        acts, _ = sae.encode(x)
        x_hat = sae.decode(acts).double()
        xd = x.double()
        b, batch_mean = len(xd), xd.mean(0)
        batch_m2 = (xd - batch_mean).pow(2).sum().item()  # sum over tokens and dims
        if mean is None:
            mean, m2 = batch_mean, batch_m2
        else:  # Chan et al.: merge (n, mean, M2) of two sets
            delta = batch_mean - mean
            m2 += batch_m2 + delta.pow(2).sum().item() * n * b / (n + b)
            mean = mean + delta * b / (n + b)
        sse += (xd - x_hat).pow(2).sum().item()
        active = acts > 0
        l0_sum += active.sum().item()
        counts = active.sum(0).to(torch.int64)
        fired = counts if fired is None else fired + counts
        n += b
    if n == 0:
        raise ValueError("no tokens to evaluate on: the evaluation split is empty")
    freq = fired.double().cpu() / n
    live = freq[freq > 0]
    hist = torch.histc(live.log10().clamp(HIST_EDGES[0], 0).float(), bins=len(HIST_EDGES) - 1, min=-7, max=0)
    return {
        "n_tokens": n,
        "mse": sse / (n * x.shape[-1]),
        "explained_variance": 1.0 - sse / m2,
        "l0": l0_sum / n,
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > dense_above).double().mean()),
        "firing_histogram": {
            "log10_edges": HIST_EDGES,
            "counts": hist.int().tolist(),
            "never": int((freq == 0).sum()),
        },
    }


@torch.no_grad()
def lm_loss(
    model: nn.Module,
    saes: dict[str, nn.Module],
    hook_name: str,
    batches: Iterable[dict[str, Tensor]],
    groups: Sequence[str] | None = None,
    labels: Sequence[str | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """CE/KL with each SAE of `saes` (name -> module whose forward reconstructs) spliced in at `hook_name`.

    Each batch has `input_ids`, `attention_mask`, `splice` (positions replaced: the tokens the SAE was
    trained on) and `score` (positions whose next-token prediction is scored), all [batch, seq].
    `groups` (one per sequence, in batch order; None: each sequence its own) are the clusters of the CIs.
    `labels` (one per sequence: "honest", "deceptive", other or None) add `by_label`: the CE increase and
    KL of the honest and of the deceptive sequences apart (an SAE may reconstruct lies worse)."""
    names = [*saes, "clean", "zero"]
    per_seq: dict[str, dict[str, list[float]]] = {n: {"ce": [], "kl": []} for n in names}
    n_tokens: list[int] = []
    for batch in batches:
        ids, mask, score = batch["input_ids"], batch["attention_mask"], batch["score"]
        targets = ids[:, 1:][score[:, :-1]]  # next tokens of the scored positions
        seq_of = torch.arange(len(ids), device=ids.device)[:, None].expand_as(score)[score]  # [n_scored]
        clean = _log_probs(model, ids, mask, score)
        runs = {"clean": clean}
        with edit_residual(model, hook_name, torch.zeros_like, batch["splice"]):
            runs["zero"] = _log_probs(model, ids, mask, score)
        for name, sae in saes.items():
            with edit_residual(model, hook_name, sae, batch["splice"]):
                runs[name] = _log_probs(model, ids, mask, score)
        for name, lp in runs.items():  # per-token losses summed per sequence
            ce = -lp.gather(1, targets[:, None])[:, 0]
            kl = F.kl_div(lp, clean, log_target=True, reduction="none").sum(-1)
            for key, values in (("ce", ce), ("kl", kl)):
                sums = torch.zeros(len(ids), dtype=torch.float64)
                per_seq[name][key] += sums.index_add_(0, seq_of.cpu(), values.double().cpu()).tolist()
        n_tokens += score.sum(1).tolist()
    if sum(n_tokens) == 0:
        raise ValueError("no scored tokens: the LM-loss batches were empty")
    keys = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(n_tokens))]
    if len(keys) != len(n_tokens):
        raise ValueError(f"{len(keys)} groups for {len(n_tokens)} sequences: pass one group per sequence")
    gidx, n_groups = group_index(keys)
    if labels is not None and len(labels) != len(n_tokens):
        raise ValueError(f"{len(labels)} labels for {len(n_tokens)} sequences: pass one label per sequence")
    subsets = {"all": np.ones(len(n_tokens), bool)}
    for label in ("honest", "deceptive"):
        if labels is not None and label in labels:
            subsets[label] = np.array([lab == label for lab in labels])

    def by_group(values: Sequence[float], keep: np.ndarray) -> np.ndarray:
        return np.bincount(gidx[keep], np.asarray(values, float)[keep], n_groups)[np.unique(gidx[keep])]

    sums = {
        part: {"tok": by_group(n_tokens, keep)}
        | {f"{key}_{n}": by_group(per_seq[n][key], keep) for n in names for key in ("ce", "kl")}
        for part, keep in subsets.items()
    }
    out = {}
    for name in saes:
        a = sums["all"]
        total = a["tok"].sum()
        ce_inc, kl_sae = (
            ratio_ci(a[f"ce_{name}"] - a["ce_clean"], a["tok"]),
            ratio_ci(a[f"kl_{name}"], a["tok"]),
        )
        ce_score = ratio_ci(a["ce_zero"] - a[f"ce_{name}"], a["ce_zero"] - a["ce_clean"])
        kl_score = ratio_ci(a["kl_zero"] - a[f"kl_{name}"], a["kl_zero"])
        by_label = {}
        for label in subsets.keys() - {"all"}:
            part, keep = sums[label], subsets[label]
            ce_l = ratio_ci(part[f"ce_{name}"] - part["ce_clean"], part["tok"])
            kl_l = ratio_ci(part[f"kl_{name}"], part["tok"])
            by_label[label] = {
                "n_tokens": int(part["tok"].sum()),
                "n_completions": int(keep.sum()),
                "n_groups": len(part["tok"]),
                "ce_increase": ce_l[0],
                "ce_increase_ci": ce_l[1:],
                "kl_sae": kl_l[0],
                "kl_sae_ci": kl_l[1:],
            }
        out[name] = {
            "n_tokens": int(total),
            "n_completions": len(n_tokens),
            "n_groups": n_groups,
            "ce_clean": a["ce_clean"].sum() / total,
            "ce_sae": a[f"ce_{name}"].sum() / total,
            "ce_zero_ablation": a["ce_zero"].sum() / total,
            "ce_increase": ce_inc[0],
            "ce_increase_ci": ce_inc[1:],
            "kl_sae": kl_sae[0],
            "kl_sae_ci": kl_sae[1:],
            "kl_zero_ablation": a["kl_zero"].sum() / total,
            "ce_loss_score": ce_score[0],
            "ce_loss_score_ci": ce_score[1:],
            "loss_recovered": ce_score[0],  # the same number under its older name
            "kl_div_score": kl_score[0],
            "kl_div_score_ci": kl_score[1:],
            "by_label": dict(sorted(by_label.items())),
            "ci_method": "95% t interval over prompt groups (cluster-robust, stats.ratio_ci)",
        }
    return out


def _log_probs(model: nn.Module, ids: Tensor, mask: Tensor, score: Tensor) -> Tensor:
    """Log-probabilities [n_scored, vocab] (float32) at the scored positions."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[score].float().log_softmax(-1)


def lm_batches(
    rows: list[dict],
    first_positions: dict[str, int],
    *,
    pad_id: int,
    batch_size: int = 8,
    device: str = "cpu",
) -> Iterator[dict[str, Tensor]]:
    """Batches for `lm_loss` from completions.jsonl rows (`prompt_token_ids` + `completion_token_ids`).
    Positions from `first_positions[id]` (where the store's rows start) to the end are spliced; those
    whose next token is still in the completion are scored."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        seqs = [list(r["prompt_token_ids"]) + list(r["completion_token_ids"]) for r in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask, splice, score = (torch.zeros(len(seqs), width, dtype=torch.bool) for _ in range(3))
        for b, (r, s) in enumerate(zip(chunk, seqs, strict=True)):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = True
            first = max(first_positions[r["id"]], 0)
            splice[b, first : len(s)] = True
            score[b, max(first, len(r["prompt_token_ids"]) - 1) : len(s) - 1] = True
        yield {
            k: v.to(device)
            for k, v in dict(input_ids=ids, attention_mask=mask.long(), splice=splice, score=score).items()
        }


def evaluate_folder(
    folder: str | os.PathLike,
    store: Any,
    ids: list[str] | None,
    *,
    device: str = "cpu",
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Activation metrics of the SAE in a SAELens `folder` (ours or published: io.load_sae) on the
    tokens of completions `ids` (all when None) of a `store.LayerStore`."""

    loaded = load_sae(folder, device=device)
    layer = int(store.dir.name.removeprefix("layer_"))
    if loaded.sae.d_in != store.d_model:
        raise ValueError(
            f"{loaded.path.name} has d_in={loaded.sae.d_in} but layer {layer} activations have d_model="
            f"{store.d_model}: it was trained on another model ({loaded.model_name})"
        )
    if loaded.layer != layer:
        raise ValueError(
            f"{loaded.path.name} reads {loaded.hook_name} (layer {loaded.layer}), not layer {layer}"
        )
    data = store.iter_batches(batch_size, completion_ids=ids, shuffle=False, buffer_bytes=1 << 28)
    return {
        "hook_name": loaded.hook_name,
        "layer": layer,
        "activations": activation_metrics(loaded.sae, data, device=device),
    }


def lm_eval_rows(rows: list[dict], held: set[str], n_completions: int, seed: int = 0) -> list[dict]:
    """Up to `n_completions` of the completions `held`, spread over their prompt groups and labels: one
    completion of every group (groups in a seeded hash order) before a second of any, so the loss
    averages over as many groups as the budget allows instead of the first few in file order; within a
    group the labels take turns, and alternate groups start with the other label, so the first round is
    half honest and half deceptive (in file order, where the honest prompt comes first, it was all
    honest)."""
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        if r["id"] in held:
            by_group.setdefault(str(r.get("group") or r["prompt_id"]), []).append(r)
    order = sorted(by_group, key=lambda g: stable_hash(seed, "lm-eval", g))
    for j, g in enumerate(order):
        first = ("honest", "deceptive")[j % 2]
        turn: dict[str, int] = {}  # each row's position among the rows of its label in the group
        keys = []
        for r in by_group[g]:
            label = str(r.get("label"))
            turn[label] = turn.get(label, 0) + 1
            keys.append((turn[label], label != first, label not in ("honest", "deceptive")))
        by_group[g] = [r for _, r in sorted(zip(keys, by_group[g], strict=True), key=lambda kr: kr[0])]
    depth = max((len(v) for v in by_group.values()), default=0)
    spread = [by_group[g][i] for i in range(depth) for g in order if i < len(by_group[g])]
    return spread[:n_completions]


def evaluate_lm(
    run_dir: str | os.PathLike,
    lm: Any,
    *,
    n_completions: int = 64,
    batch_size: int = 8,
    saes_per_pass: int = 3,
    eval_fraction: float = 0.1,
    seed: int = 0,
    redo: bool = False,
) -> dict[str, dict[str, Any]]:
    """Add the spliced-in LM loss (`lm` section) to every `saes/*/metrics.json` of the run that lacks it,
    on up to `n_completions` completions no SAE of the layer trained on, spread over prompt groups
    (`lm_eval_rows`): the held-out split of training, plus the analysis split when every SAE there
    records that it skipped it (completions.analysis_split), which gives many more groups."""

    run_dir = Path(run_dir)
    rows = [r for r in read_completions(run_dir) if "completion_token_ids" in r]
    held = set(split_completions(rows, eval_fraction, seed)[1])
    todo: dict[int, list[Path]] = {}
    for path in sorted(run_dir.glob("saes/*/metrics.json")):
        m = json.loads(path.read_text())
        if redo or "lm" not in m:
            todo.setdefault(m["layer"], []).append(path.parent)

    results = {}
    for layer, folders in todo.items():
        store = LayerStore(run_dir, layer)
        recorded = [(load_sae(f).cfg.get("metadata") or {}).get("analysis_split") for f in folders]
        splits = {json.dumps(split, sort_keys=True) for split in recorded}
        unseen = set(held)
        if len(splits) == 1 and (split := json.loads(splits.pop())):
            unseen |= set(analysis_split(rows, split["fraction"], split["seed"])[1])
        chosen = lm_eval_rows([r for r in rows if r["id"] in store.entries], unseen, n_completions, seed)
        first = {r["id"]: store.entries[r["id"]][3] for r in chosen}
        groups = [str(r.get("group") or r["prompt_id"]) for r in chosen]
        labels = [r.get("label") for r in chosen]
        data = list(
            lm_batches(
                chosen,
                first,
                pad_id=pad_token_id(lm.tokenizer),
                batch_size=batch_size,
                device=lm.model.device,
            )
        )
        for i in range(0, len(folders), saes_per_pass):
            saes = {f.name: load_sae(f, device=lm.model.device).sae for f in folders[i : i + saes_per_pass]}
            for name, res in lm_loss(
                lm.model, saes, f"blocks.{layer}.hook_resid_post", data, groups, labels
            ).items():
                m = json.loads((sae_dir(run_dir, name) / SAE_METRICS).read_text())
                atomic_write_json(sae_dir(run_dir, name) / SAE_METRICS, {**m, "lm": res})
                results[name] = res
    return results


LEADERBOARD_COLUMNS = (
    "sae_id",
    "architecture",
    "layer",
    "condition",
    "explained_variance",
    "corpus_ev",
    "l0",
    "dead_pct",
    "dense_pct",
    "mse",
    "loss_recovered",
    "ce_increase",
    "kl_sae",
    "kl_div_score",
    "ce_increase_honest",
    "ce_increase_deceptive",
    "kl_sae_honest",
    "kl_sae_deceptive",
    "train_tokens",
)


def leaderboard(run_dir: str | os.PathLike, sort_by: str = "explained_variance") -> list[dict[str, Any]]:
    """One row per SAE with a metrics.json under `run_dir/saes`, best first by `sort_by`."""
    rows = []
    for m in read_sae_metrics(run_dir):
        act, lm = m.get("activations", {}), m.get("lm", {})
        rows.append(
            {
                "sae_id": m["sae_id"],
                "architecture": m["architecture"],
                "layer": m["layer"],
                "condition": m["condition"],
                "explained_variance": act.get("explained_variance"),
                "corpus_ev": (m.get("corpus_activations") or {}).get("explained_variance"),
                "l0": act.get("l0"),
                "dead_pct": 100 * act.get("dead_fraction", math.nan),
                "dense_pct": 100 * act.get("dense_fraction", math.nan),
                "mse": act.get("mse"),
                "loss_recovered": lm.get("loss_recovered"),
                "ce_increase": lm.get("ce_increase"),
                "kl_sae": lm.get("kl_sae"),
                "kl_div_score": lm.get("kl_div_score"),
                **{
                    f"{key}_{label}": (lm.get("by_label") or {}).get(label, {}).get(key)
                    for key in ("ce_increase", "kl_sae")
                    for label in ("honest", "deceptive")
                },
                "train_tokens": m.get("training", {}).get("tokens"),
            }
        )
    if rows and sort_by not in rows[0]:
        raise KeyError(f"cannot sort by {sort_by!r}: columns are {', '.join(LEADERBOARD_COLUMNS)}")
    return sorted(rows, key=lambda r: -math.inf if r[sort_by] is None else r[sort_by], reverse=True)
