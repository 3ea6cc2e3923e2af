"""The latent-major side of kernels.Pattern: `stable_argsort_small` is torch's stable argsort whatever path it
takes (comparison sort, padded radix sort, int16 or int32 keys), and `csr_t` is the dense transpose."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import kernels


@pytest.mark.parametrize(
    "m, bound",
    [
        (100, 512),  # the comparison sort
        (kernels.RADIX_SORT_FROM // 4, 512),  # padded, int16 keys
        (kernels.RADIX_SORT_FROM - 1, 7),  # padded, many ties
        (kernels.RADIX_SORT_FROM + 5, 512),  # radix, no padding
        (kernels.RADIX_SORT_FROM // 2, 2**15),  # int32 keys (the pad `bound` does not fit int16)
    ],
)
def test_stable_argsort_small_is_the_stable_argsort(m, bound):
    """Ties keep their order (the latent-major permutation is unique only with it) and the padding is gone."""
    keys = torch.randint(0, bound, (m,), generator=torch.Generator().manual_seed(m))
    keys[-3:] = bound - 1  # the largest key, next to the padding
    assert torch.equal(kernels.stable_argsort_small(keys, bound), torch.sort(keys, stable=True).indices)


def test_csr_t_is_the_transpose():
    """A JumpReLU-like mask dense enough to take the padded radix sort: csr_t(values) is the dense [n_cols,
    n_rows] transpose of the values at the pattern's pairs."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(512, 96, generator=g) < 0.3
    p = kernels.Pattern.from_mask(mask)
    assert len(p.col) >= kernels.RADIX_SORT_FROM // 4
    values = torch.randn(len(p.col), generator=g)
    assert torch.equal(p.csr_t(values).to_dense(), p.dense(values).t())
