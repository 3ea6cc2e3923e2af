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


def distinct_ranks(n: int, d: int, seed: int) -> torch.Tensor:
    """[n, d] float32: distinct values in each row, fewer positive ones further down, row 7 all negative."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(d, generator=g) for _ in range(n)]).float()
    pre = (ranks - torch.linspace(-d / 4, 1.2 * d, n).round().unsqueeze(1)) / d
    pre[7] = -(ranks[7] + 1) / d
    return pre


@pytest.mark.parametrize("d", [96, 512, 1100, 1536])
def test_topk_by_partition_is_torch_topk(d):
    """numpy's partition (a float32 batch on a CPU): rows of one piece, of several (1,100 pads its last one),
    in several blocks of rows; each row's k latents sorted; the same ReLU'd activations as torch.topk,
    and `relu_topk` returns this answer."""
    n = kernels.PARTITION_BLOCK // d * 2 + 5 if d > 512 else 300  # three blocks of rows for the wide ones
    pre = distinct_ranks(n, d, seed=3)  # (a tie takes torch's path: the next test)
    for k in (1, 7, 32, 256)[: 3 if d < 256 else 4]:
        idx = kernels.topk_by_partition(pre, k)
        assert idx is not None and idx.shape == (n, k) and idx.dtype == torch.int64
        assert bool((idx.diff(dim=1) > 0).all()), "each row's latents ascending, distinct"
        assert torch.equal(relu_acts(pre, idx), relu_acts(pre, pre.topk(k, dim=-1).indices))
        if kernels.NUMPY_SIMD_PARTITION:  # numpy >= 2 (before it relu_topk keeps torch.topk)
            assert torch.equal(kernels.relu_topk(pre, k).sort(1).values, idx)  # by groups: in no order


@pytest.mark.parametrize(
    ("d", "k", "width"), [(512, 7, 128), (512, 32, 128), (96, 7, 48), (1100, 7, 110), (96, 1, 3)]
)
def test_topk_by_groups_is_torch_topk(d, k, width):
    """Group maxima (a float32 batch on a CPU), over several blocks of rows: k distinct latents a row, the
    same ReLU'd activations as torch.topk, whichever groups the row's largest entries share (a width of 3
    with k 1: each group's maximum is the answer); `relu_topk` returns this answer where `group_width`
    picks this width."""
    n = kernels.PARTITION_BLOCK // d * 2 + 5
    pre = distinct_ranks(n, d, seed=5)
    pre[9, :k] = 2.0 + torch.arange(k) / d  # row 9's k largest in the first groups, each in its own
    s = min(k, d // width)  # row 10's s largest all in group 0
    pre[10, ::width][:s] = 2.0 + torch.arange(s) / d
    idx = kernels.topk_by_groups(pre, k, width)
    assert idx is not None and idx.shape == (n, k) and idx.dtype == torch.int64
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all()), "k distinct latents a row"
    assert torch.equal(relu_acts(pre, idx), relu_acts(pre, pre.topk(k, dim=-1).indices))
    if kernels.NUMPY_SIMD_PARTITION and kernels.group_width(d, k) == width:
        assert torch.equal(kernels.relu_topk(pre, k), idx)


def test_topk_by_groups_gives_up_on_a_tie():
    """A tie among the groups' maxima at the k-th one, or at a row's k-th value: None, and `relu_topk` still
    answers (by numpy's partition, or torch.topk)."""
    pre = distinct_ranks(32, 512, seed=6)
    k, width = 7, 128
    assert kernels.topk_by_groups(pre, k, width) is not None
    top = pre[3].view(4, width).amax(0)  # row 3's group maxima
    for where in ("groups", "k-th value"):
        tied = pre.clone()
        if where == "groups":  # a group outside the k largest gets the k-th largest maximum
            g = int(top.argsort()[0])
            tied[3, g] = top.topk(k).values[-1]
        else:  # a second entry at row 3's k-th value, inside one of its k largest groups
            kth = pre[3].topk(k).values[-1]
            g = int(top.argmax())
            tied[3, g + width * int(pre[3].view(4, width)[:, g].argmin())] = kth
        assert kernels.topk_by_groups(tied, k, width) is None, where
        idx = kernels.relu_topk(tied, k)
        assert torch.equal(
            relu_acts(tied, idx).sort(1).values, relu_acts(tied, tied.topk(k, dim=-1).indices).sort(1).values
        )


def test_topk_by_partition_gives_up_on_a_tie():
    """A row whose k-th value ties with another entry: None, and `relu_topk` answers by torch.topk."""
    pre = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    k = 5
    pre[3, 40] = pre[3].topk(k).values[-1]  # a second entry at row 3's k-th value
    assert kernels.topk_by_partition(pre, k) is None
    assert kernels.topk_by_partition(pre, k + 1) is not None  # the tie is now inside the top k + 1
    idx = kernels.relu_topk(pre, k)
    assert torch.equal(relu_acts(pre, idx), relu_acts(pre, pre.topk(k, dim=-1).indices))


@pytest.mark.parametrize("n", [8 * 1000, 8 * 1000 + 3])
def test_few_nonzero_is_nonzero(n):
    """Sparse and dense masks, a length that is not a multiple of 8 and a view at an odd offset (both
    take torch.nonzero's path) all give torch.nonzero's flat indices."""
    g = torch.Generator().manual_seed(2)
    for density in (0.0, 0.002, 0.02, 0.5, 1.0):
        mask = torch.rand(n, generator=g) < density
        for m in (mask, mask.view(-1, 8) if n % 8 == 0 else mask, mask[1:]):
            assert torch.equal(kernels.few_nonzero(m), m.reshape(-1).nonzero().squeeze(1))
