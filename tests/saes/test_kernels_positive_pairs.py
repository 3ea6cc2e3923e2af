"""`kernels.PositivePairs`: its count, pattern and mask are torch's count, nonzero and `values > 0` whichever
way numpy finds the pairs on a CPU (memchr below `BRANCHLESS_FROM`, the padded branchless loop from there, the
plain branchless loop above 10% density), with empty rows, an empty mask and a non-power-of-two width."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import kernels


@pytest.mark.parametrize(
    "n, d, density",
    [
        (200, 96, 0.01),  # memchr
        (200, 96, 0.05),  # padded: True entries appended past the mask, then dropped
        (200, 96, 0.3),  # above 10%: branchless without padding
        (37, 100, 0.0),  # no pair at all
    ],
)
def test_count_and_pattern_are_torchs_nonzero(n, d, density):
    g = torch.Generator().manual_seed(n + d)
    values = (torch.rand(n, d, generator=g) - (1 - density)).relu_()  # >= 0, about `density` of them > 0
    values[[0, 5, n - 1]] = 0.0  # empty rows, the last one too (crow ends at nnz)
    row, col = values.nonzero(as_tuple=True)
    pairs = kernels.PositivePairs(values)
    assert pairs.count == len(row)
    p, flat = pairs.pattern()
    assert torch.equal(p.row, row) and torch.equal(p.col, col)
    assert torch.equal(p.crow, torch.searchsorted(row, torch.arange(n + 1)))
    assert torch.equal(flat, row * d + col)
    assert (p.n_rows, p.n_cols) == (n, d)
    # the dense step's mask (the standard SAE's firing counts): values > 0, the padding past it not read
    assert pairs.active().shape == (n, d) and torch.equal(pairs.active(), values > 0)


@pytest.mark.parametrize("layout", ["float32", "float64", "bfloat16", "float32-transposed"])
def test_values_of_any_sign_give_the_positive_ones(layout):
    """JumpReLU passes pre - (θ - ε/2) un-ReLU'd: the negative entries (and zeros) are not pairs, by numpy's
    comparison (float32, float64, contiguous) or torch's (other dtypes and layouts)."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(64, 40, generator=g) - 1.5  # ~7% > 0, most < 0
    if layout == "float32-transposed":
        values = values.t().contiguous().t()
    else:
        values = values.to(getattr(torch, layout))
    values[3, :5] = 0.0
    row, col = (values > 0).nonzero(as_tuple=True)
    pairs = kernels.PositivePairs(values)
    assert pairs.count == len(row)
    p, _ = pairs.pattern()
    assert torch.equal(p.row, row) and torch.equal(p.col, col)
    assert torch.equal(pairs.active(), values > 0)
