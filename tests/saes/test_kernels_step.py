"""The sparse step's kernels against plain references: `stable_argsort_small` is torch's stable argsort
whatever path it takes (numpy's radix sort of int16 keys, torch's comparison sort, its padded radix sort),
`Pattern.csr_t` is the dense transpose (also of a TopK pattern, whose latents are unsorted within a row
on a CPU), and `sparse_recon_loss` is autograd of the plain decode and MSE."""

from __future__ import annotations

import pytest
import torch

from helpers.saes import kernels


@pytest.mark.parametrize(
    "m, bound",
    [
        (100, 512),  # numpy's radix sort (int16 keys)
        (kernels.RADIX_SORT_FROM - 1, 7),  # numpy's, many ties
        (kernels.RADIX_SORT_FROM // 2, 2**15),  # numpy's, the largest bound that fits int16
        (100, 2**15 + 1),  # torch's comparison sort
        (kernels.RADIX_SORT_FROM // 4, 2**15 + 1),  # torch's radix sort, padded int32 keys
        (kernels.RADIX_SORT_FROM + 5, 4608 * 8),  # torch's radix sort, no padding
    ],
)
def test_stable_argsort_small_is_the_stable_argsort(m, bound):
    """Ties keep their order (the latent-major permutation is unique only with it) and the padding is gone."""
    keys = torch.randint(0, bound, (m,), generator=torch.Generator().manual_seed(m))
    keys[-3:] = bound - 1  # the largest key, next to the padding
    order = kernels.stable_argsort_small(keys, bound)
    assert order.dtype == torch.int64 and torch.equal(order, torch.sort(keys, stable=True).indices)


def test_topk_pattern_unsorted_within_rows_gives_the_dense_products():
    """A TopK step's pattern at its size (1,024 tokens, k 7 of 512: fewer keys than the radix path takes)
    keeps each row's latents in torch.topk's order on a CPU; the CSR matrix, its transpose and the sampled
    product read through them are still the dense ones, and so are the sparse step's gradients."""
    g = torch.Generator().manual_seed(5)
    n, d_sae, d_in, k = 1024, 512, 16, 7
    idx = torch.randn(n, d_sae, generator=g).topk(k, sorted=False).indices
    p = kernels.Pattern.from_indices(idx, d_sae)
    assert torch.equal(p.col, idx.reshape(-1)) and not bool((idx.diff(dim=1) > 0).all())
    values = torch.randn(n * k, generator=g)
    dense = p.dense(values)
    assert torch.equal(p.csr(values).to_dense(), dense)
    assert torch.equal(p.csr_t(values).to_dense(), dense.t())
    x = torch.randn(n, d_in, generator=g)
    leaves = [values, torch.randn(d_sae, d_in, generator=g), torch.randn(d_in)]
    ours = [t.clone().requires_grad_() for t in leaves]
    plain = [t.clone().requires_grad_() for t in leaves]
    kernels.sparse_recon_loss(*ours, x, p)[0].backward()
    (p.dense(plain[0]) @ plain[1] + plain[2] - x).pow(2).sum(-1).mean().backward()
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_csr_and_csr_t_are_the_dense_values():
    """A JumpReLU-like mask (some rows empty) dense enough to take the padded radix sort: csr(values) is the
    dense [n_rows, n_cols] matrix of the values at the pattern's pairs, csr_t(values) its transpose."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(512, 96, generator=g) < 0.3
    mask[[0, 7, 8, 511]] = False
    p, _ = kernels.PositivePairs(mask.float()).pattern()
    assert len(p.col) >= kernels.RADIX_SORT_FROM // 4
    values = torch.randn(len(p.col), generator=g)
    assert torch.equal(p.csr(values).to_dense(), p.dense(values))
    assert torch.equal(p.csr_t(values).to_dense(), p.dense(values).t())


@pytest.mark.parametrize("density", [0.05, 0.5])  # the sparse kernels and, above DENSE_ABOVE, dense maths
def test_sparse_recon_loss_is_autograd_of_the_plain_loss(density):
    """MSE, x_hat and the gradients to the values, W_dec and b_dec are those of autograd through the dense
    decode `dense(values) @ W_dec + b_dec` and the plain MSE (a frozen decoder gets none)."""
    g = torch.Generator().manual_seed(4)
    n, d_sae, d_in = 64, 96, 16
    p, _ = kernels.PositivePairs((torch.rand(n, d_sae, generator=g) < density).float()).pattern()
    assert p.is_dense == (density > kernels.DENSE_ABOVE["cpu"])
    x = torch.randn(n, d_in, generator=g)
    leaves = [torch.randn(len(p.col), generator=g), torch.randn(d_sae, d_in, generator=g), torch.randn(d_in)]
    ours = [t.clone().requires_grad_() for t in leaves]
    plain = [t.clone().requires_grad_() for t in leaves]
    mse, x_hat = kernels.sparse_recon_loss(*ours, x, p)
    (3 * mse).backward()
    want_x_hat = p.dense(plain[0]) @ plain[1] + plain[2]
    want = (want_x_hat - x).pow(2).sum(-1).mean()
    (3 * want).backward()
    torch.testing.assert_close(mse, want)
    torch.testing.assert_close(x_hat, want_x_hat.detach())
    assert not x_hat.requires_grad
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    values, W_dec, b_dec = (t.detach().requires_grad_() for t in leaves)
    kernels.sparse_recon_loss(values, W_dec.detach(), b_dec.detach(), x, p)[0].backward()
    assert values.grad is not None and W_dec.grad is None and b_dec.grad is None
