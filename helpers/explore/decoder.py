"""Features seen through their decoder rows: what each one writes into the vocabulary (logit effects)
and which other features write nearly the same direction (nearest decoder rows by cosine).

Logit effects (SAEDashboard's "logit effects", Bricken et al. 2023's "logit weights"): for feature f
with unit decoder row d = W_dec[f], the direct effect on the logits is d read through the final norm
and the unembedding, W_U · norm(d). The final norm is treated as TransformerLens's `fold_ln` does:
- its elementwise weight (RMSNorm, LayerNorm) multiplies d (folded into W_U);
- a LayerNorm also subtracts d's mean over dimensions (linear, so applied exactly);
- the division by the residual's RMS / std is left out: it is one positive number per token position,
  the same for every vocabulary entry, so it scales a feature's logit effects but never reorders them.
Only the direct path is counted: the layers after the SAE's are skipped. A final logit soft-cap
(nanochat's 15·tanh(x/15)) is monotone and left out for the same reason. Values are logits per unit of
normalised residual along d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm")
"""Where each architecture keeps the norm before its unembedding (NanoChat/Llama/Qwen, GPT-2, GPT-NeoX)."""
_FUNCTIONAL_RMS_NORM = ("nanochat_gpt",)
"""Model types whose final norm is a parameter-free RMSNorm applied as a function (no module to find):
our class for nanochat's 2026 layouts (helpers.model.nanochat_gpt)."""


@dataclass
class Unembedding:
    """The read-out a decoder direction goes through: W_U [vocab, d_model] with the final norm folded."""

    W_U: torch.Tensor
    centre: bool
    """Subtract the direction's mean first (LayerNorm)."""
    note: str
    """How the final norm was treated, in words, for the explorer's pages."""


def unembedding_of(model: nn.Module) -> Unembedding:
    """The model's unembedding with its final norm's weight folded in (module doc)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise TypeError(f"{type(model).__name__} has no output embedding (lm_head): no logit effects")
    norm = None
    for path in _FINAL_NORMS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.Module):
            norm = obj
            break
    functional = (
        norm is None and getattr(getattr(model, "config", None), "model_type", None) in _FUNCTIONAL_RMS_NORM
    )
    if norm is None and not functional:
        raise TypeError(
            f"don't know where {type(model).__name__} keeps its final norm (looked for "
            f"{', '.join(_FINAL_NORMS)}): add its path to helpers.explore.decoder._FINAL_NORMS"
        )
    W_U = head.weight.detach().float()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and 0 < vocab < len(W_U):
        W_U = W_U[:vocab]  # rows padded for speed (nanochat pads to a multiple of 64) are no tokens
    weight = getattr(norm, "weight", None)
    centre = isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__
    kind = "RMSNorm (parameter-free)" if functional else "LayerNorm" if centre else type(norm).__name__
    if weight is not None:
        W_U = W_U * weight.detach().float()[None, :]
    note = (
        f"direct path through the final {kind}"
        + (" (its weight folded into the unembedding" if weight is not None else " (it has no weight")
        + (", mean subtracted" if centre else "")
        + "); the division by the residual's norm is left out: it scales, never reorders, a feature's logits"
    )
    return Unembedding(W_U, centre, note)


@dataclass
class LogitSummary:
    """What each feature's unit decoder row writes into the vocabulary (module doc), for all features."""

    top_ids: torch.Tensor  # [d_sae, k] the entries raised most
    top_values: torch.Tensor  # [d_sae, k]
    bottom_ids: torch.Tensor  # [d_sae, k] the entries lowered most
    bottom_values: torch.Tensor  # [d_sae, k]
    hist_lo: torch.Tensor  # [d_sae] the smallest logit weight over the vocabulary
    hist_hi: torch.Tensor  # [d_sae] the largest
    hist_counts: torch.Tensor  # [d_sae, hist_bins] int64 vocabulary entries per equal-width bin of [lo, hi]


@torch.no_grad()
def logit_summary(
    W_dec: torch.Tensor, unembedding: Unembedding, k: int = 10, hist_bins: int = 32, batch: int = 256
) -> LogitSummary:
    """The vocabulary entries each feature's unit decoder row raises and lowers most, and the
    distribution of its logit weights over the whole vocabulary (SAEDashboard's / Neuronpedia's logit
    histogram: `hist_bins` equal-width bins from the smallest to the largest weight), from one product
    with the unembedding, `batch` features at a time ([batch, vocab] at most in memory) on W_U's device."""
    W_U = unembedding.W_U
    if W_dec.shape[1] != W_U.shape[1]:
        raise ValueError(
            f"the SAE writes d_in={W_dec.shape[1]} vectors but the model's unembedding reads d_model="
            f"{W_U.shape[1]}: use the model the SAE was trained on"
        )
    if hist_bins < 1:
        raise ValueError(f"hist_bins must be at least 1, got {hist_bins}")
    k = min(k, W_U.shape[0])
    outs: list[list[torch.Tensor]] = [[], [], [], [], [], [], []]
    for s in range(0, len(W_dec), batch):
        d = W_dec[s : s + batch].to(W_U.device, torch.float32)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if unembedding.centre:
            d = d - d.mean(1, keepdim=True)
        logits = d @ W_U.T  # [batch, vocab]
        hi, lo = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        w_lo, w_hi = logits.amin(1), logits.amax(1)
        span = (w_hi - w_lo).clamp_min(1e-12)
        b = ((logits - w_lo[:, None]) / span[:, None] * hist_bins).long().clamp_(0, hist_bins - 1)
        b += torch.arange(len(logits), device=b.device)[:, None] * hist_bins
        counts = torch.zeros(len(logits) * hist_bins, dtype=torch.int64, device=b.device)
        counts.index_add_(0, b.view(-1), torch.ones(b.numel(), dtype=torch.int64, device=b.device))
        parts = (
            hi.indices,
            hi.values,
            lo.indices,
            lo.values,
            w_lo,
            w_hi,
            counts.view(len(logits), hist_bins),
        )
        for out, t in zip(outs, parts, strict=True):
            out.append(t.cpu())
    return LogitSummary(*(torch.cat(o) for o in outs))


def logit_effects(
    W_dec: torch.Tensor, unembedding: Unembedding, k: int = 10, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top ids, top values, bottom ids, bottom values), each [d_sae, k]: `logit_summary`'s ranking."""
    s = logit_summary(W_dec, unembedding, k, hist_bins=1, batch=batch)
    return s.top_ids, s.top_values, s.bottom_ids, s.bottom_values


@torch.no_grad()
def nearest_rows(
    W_a: torch.Tensor, W_b: torch.Tensor | None = None, k: int = 6, batch: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, cosines) [n_a, k]: for each row of W_a the k rows of W_b (W_a itself, excluding the row,
    when W_b is None) with the largest cosine similarity."""
    same = W_b is None
    A = W_a.float()
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if same:
        B = A
    else:
        B = W_b.float().to(A.device)
        B = B / B.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"decoder rows of width {A.shape[1]} and {B.shape[1]} cannot be compared")
    k = min(k, len(B) - (1 if same else 0))
    idx, val = [], []
    for s in range(0, len(A), batch):
        sims = A[s : s + batch] @ B.T  # [batch, n_b]
        if same:
            rows = torch.arange(len(sims), device=sims.device)
            sims[rows, rows + s] = -float("inf")
        top = sims.topk(k, dim=1)
        idx.append(top.indices.cpu())
        val.append(top.values.cpu())
    if not idx:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(idx), torch.cat(val)
