"""The k-sparse selections of kernels.py: `relu_topk` (TopK, AuxK) picks what torch.topk picks wherever the
ReLU tells entries apart, ties and all; `few_nonzero` (BatchTopK's candidates) is torch.nonzero's answer."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import kernels


def relu_acts(pre: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[n, d]: the ReLU'd values at the chosen indices [n, k], zeros elsewhere (what TopK trains on)."""
    return torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_relu_topk_trains_on_what_torch_topk_picks(dtype):
    """Rows with many, few (< k) and no positive entries, and -0.0: the same ReLU'd activations as
    pre.topk(k), exactly k distinct latents per row."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 96, generator=g) - torch.linspace(-1, 4, 64).unsqueeze(1)  # fewer positives below
    pre[5] = -pre[5].abs()  # no positive entry
    pre[6, :10] = -0.0
    pre = pre.to(dtype)
    assert int((pre > 0).sum(1).min()) == 0 and int((pre > 0).sum(1).max()) > 40
    for k in (1, 6, 40):
        idx = kernels.relu_topk(pre, k)
        assert idx.shape == (64, k) and bool((idx.sort(1).values.diff(dim=1) > 0).all()), "k distinct latents"
        want = relu_acts(pre, pre.topk(k, dim=-1).indices)
        assert torch.equal(relu_acts(pre, idx), want)


def test_relu_topk_on_ties_keeps_the_k_largest():
    """Values on a coarse grid tie at the cut: the chosen ReLU'd values are torch.topk's (as multisets) and
    none is below an entry left out."""
    pre = (2 * torch.randn(128, 64, generator=torch.Generator().manual_seed(1))).round()
    for k in (3, 8, 32):
        idx = kernels.relu_topk(pre, k)
        chosen = pre.gather(1, idx).relu()
        assert torch.equal(chosen.sort(1).values, pre.topk(k, dim=-1).values.relu().sort(1).values)
        left_out = pre.relu().scatter(1, idx, -1.0)  # the chosen marked below every ReLU'd value
        assert bool((chosen.min(1).values >= left_out.max(1).values).all())


@pytest.mark.parametrize("n", [8 * 1000, 8 * 1000 + 3])
def test_few_nonzero_is_nonzero(n):
    """Sparse and dense masks, a length that is not a multiple of 8 and a view at an odd offset (both
    take torch.nonzero's path) all give torch.nonzero's flat indices."""
    g = torch.Generator().manual_seed(2)
    for density in (0.0, 0.002, 0.02, 0.5, 1.0):
        mask = torch.rand(n, generator=g) < density
        for m in (mask, mask.view(-1, 8) if n % 8 == 0 else mask, mask[1:]):
            assert torch.equal(kernels.few_nonzero(m), m.reshape(-1).nonzero().squeeze(1))
