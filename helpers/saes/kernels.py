"""The sparse maths of an SAE training step, kept apart from the SAE contract (base.py).

The encoder's forward matmul is the only dense work: it is computed without autograd, each architecture
picks the (token, latent) pairs its loss touches (the active latents, plus e.g. JumpReLU's pairs within
the STE window) as a `Pattern`, and `gather_pre` / `sparse_decode` carry gradients through those pairs
only (sparse matmuls on CSR tensors, as in OpenAI's and EleutherAI sparsify's TopK kernels). For a TopK
SAE at 576 -> 4608, k = 32 this is ~5.4 GFLOP per 1024 tokens instead of ~27 for a dense step. When a
pattern is dense (a JumpReLU or Gated SAE early in training fires on a large fraction of latents) the
same functions switch to dense matmuls, which are faster there; the maths is identical.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_FP32 = torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)


_BWD = torch.amp.custom_bwd(device_type="cuda")


DENSE_ABOVE = {"cpu": 0.12, "cuda": 0.02}


def dense_enough(nnz: int, numel: int, device: torch.device) -> bool:
    """Whether a step touching `nnz` of `numel` (token, latent) pairs runs faster as dense maths: above
    DENSE_ABOVE's share for the device (0.02 on any other)."""
    return nnz > DENSE_ABOVE.get(device.type, 0.02) * numel


def count_true(mask: Tensor) -> int:
    """The number of True entries of a bool `mask` (fewer than 2^31): summed as int32, 0.055 ms at [1024, 512]
    on one CPU thread where torch.count_nonzero takes 0.11."""
    return int(mask.sum(dtype=torch.int32))


class Pattern:
    """The (token, latent) pairs a step touches, in CSR order: row-major; within a row the latents are sorted
    on CUDA (cuSPARSE's CSR) and in any order on a CPU, whose CSR kernels (MKL's product, the sampled
    product, embedding_bag) do not need them sorted (test_kernels_step.py checks them unsorted)."""

    def __init__(self, row: Tensor, col: Tensor, n_rows: int, n_cols: int, crow: Tensor | None = None):
        self.row, self.col, self.n_rows, self.n_cols = row, col, n_rows, n_cols  # [nnz] each
        if crow is None:  # [n_rows + 1]: where each row's pairs start (row is sorted: one binary search each;
            # 0.015 ms for 30k pairs of 1,024 rows on a CPU, bincount-cumsum-pad ~0.06)
            crow = torch.searchsorted(row, torch.arange(n_rows + 1, device=row.device))
        self.crow = crow
        self.is_dense = dense_enough(len(col), n_rows * n_cols, col.device)
        self._transpose: tuple[Tensor, Tensor, Tensor] | None = None
        self._latent_major: tuple[Tensor, Tensor] | None = None
        self._same_latents: Pattern | None = None

    @classmethod
    def from_indices(cls, idx: Tensor, n_cols: int) -> Pattern:
        """`idx` [n_rows, k]: the same number of latents per token (TopK, AuxK)."""
        n_rows, k = idx.shape
        row = torch.arange(n_rows, device=idx.device).repeat_interleave(k)
        crow = torch.arange(0, n_rows * k + 1, k, device=idx.device)
        if idx.device.type != "cpu":  # the row sort: 0.07 ms of a CPU TopK step at [1024, 7]
            idx = idx.sort(dim=-1).values
        return cls(row, idx.reshape(-1), n_rows, n_cols, crow)

    @classmethod
    def from_pairs(cls, row: Tensor, col: Tensor, n_rows: int, n_cols: int) -> Pattern:
        """Unique (row, col) pairs in any order (BatchTopK's selection), sorted into CSR order."""
        order = torch.argsort(row * n_cols + col)
        return cls(row[order], col[order], n_rows, n_cols)

    def with_rows(self, row: Tensor, n_rows: int) -> Pattern:
        """These pairs' latents, in this order, under other rows (ascending, so still CSR order), e.g.
        Matryoshka's (token, group) bags: both patterns share one latent-major permutation (`csr_t`)."""
        out = Pattern(row, self.col, n_rows, self.n_cols)
        out._same_latents = self
        return out

    def latent_major(self) -> tuple[Tensor, Tensor]:
        """(the permutation of the pairs into latent-major order, the transpose's crow [n_cols + 1])."""
        if self._same_latents is not None:
            return self._same_latents.latent_major()
        if self._latent_major is None:
            # The pairs are row-major, so a stable sort by latent gives the latent-major, token-sorted
            # order (the same permutation as sorting the unique keys col * n_rows + row).
            order = stable_argsort_small(self.col, self.n_cols)
            crow_t = F.pad(torch.bincount(self.col, minlength=self.n_cols).cumsum(0), (1, 0))
            self._latent_major = (order, crow_t)
        return self._latent_major

    def dense(self, values: Tensor) -> Tensor:
        out = values.new_zeros(self.n_rows, self.n_cols)
        return out.index_put_((self.row, self.col), values)

    def per_latent(self, values: Tensor, alpha: float = 1.0) -> Tensor:
        """[n_cols]: alpha times the sum of `values` [nnz] over each latent's pairs, in values' dtype (the
        column sums of the sparse matrix; index_add_, deterministic on a CPU)."""
        out = torch.zeros(self.n_cols, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.col, values, alpha=alpha)

    def csr(self, values: Tensor) -> Tensor:
        return _csr(self.crow, self.col, values, (self.n_rows, self.n_cols))

    def csr_t(self, values: Tensor) -> Tensor:
        """The transpose [n_cols, n_rows] as CSR (latent-major), for the weight gradients. (index_select, not
        `values[order]`: advanced indexing took 0.07-0.10 ms of a JumpReLU step's 30k pairs, ~4x as long.)"""
        if self._transpose is None:
            order, crow_t = self.latent_major()
            self._transpose = (order, crow_t, self.row.index_select(0, order))
        order, crow_t, col_t = self._transpose
        return _csr(crow_t, col_t, values.index_select(0, order), (self.n_cols, self.n_rows))


# A float's bits read as the signed integer of its width order every non-negative float as its value (sign
# bit 0, then exponent, then mantissa) and above every negative one (sign bit 1; among those the order is
# reversed). For a selection that is ReLU'd afterwards that is the float order wherever it matters.
_BITS_AS_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def relu_order(pre: Tensor) -> Tensor:
    """pre [...] viewed (no copy) as integers in the order of ReLU(pre): the larger of two entries whose
    ReLU differs is the larger integer; entries <= 0 (ReLU 0, tied) come in some order below all positive
    ones. torch.topk on these integers picks the same positive entries as on the floats and runs ~1.4x
    faster on a CPU (integer compares, no NaN checks: 1.30 vs 1.85 ms for [1024, 512], k = 8, one thread;
    4,608 latents, k = 32: 11.4 vs 14.9 ms)."""
    return pre.view(_BITS_AS_INT[pre.dtype]) if pre.dtype in _BITS_AS_INT else pre


def relu_topk(pre: Tensor, k: int) -> Tensor:
    """Indices [n, k], in no order, of each row's k largest entries of ReLU(pre) [n, d] (TopK's and AuxK's
    selection, whose values are ReLU'd): pre.topk(k)'s positive entries wherever a row has at least k of
    them; a row with fewer gets all its positive ones and some of its others (their ReLU is 0 either way).
    A float32 `pre` on a CPU is selected by numpy: by group maxima where `group_width` finds a width
    (`topk_by_groups`: d 512, k 7 0.57 vs 0.78 ms for the partition below), else by numpy's partition
    (`topk_by_partition`: 1.3-1.8x faster than torch.topk); a row with a tie at its k-th value takes
    torch.topk's answer instead."""
    cpu_float = pre.device.type == "cpu" and pre.dtype == torch.float32 and pre.dim() == 2
    if NUMPY_SIMD_PARTITION and cpu_float and 0 < k < pre.shape[1] and k <= PARTITION_WIDTH // 2:
        width = group_width(pre.shape[1], k)
        idx = topk_by_groups(pre, k, width) if width else None
        if idx is None:
            idx = topk_by_partition(pre, k)
        if idx is not None:
            return idx
    return relu_order(pre).topk(k, dim=-1, sorted=False).indices


# numpy's partition is vectorised (x86-simd-sort, Highway on Arm) from numpy 2.0 on; before it, a scalar
# introselect slower than torch.topk
NUMPY_SIMD_PARTITION = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
# numpy's partition of int32 rows of up to this many entries takes its vectorised small-array path: ~0.42 us a
# row of 512 on one thread (numpy 2.4, AVX-512), ~4 us a row of 1,024 (above it the pass is not vectorised)
PARTITION_WIDTH = 512
# a block of rows partitioned at once holds about this many entries (1 MB of int32, this CPU's L2 cache): at
# 8,192 latents, k 32, 13.0 ms instead of 20.2 for all 1,024 rows at once
PARTITION_BLOCK = 1 << 18


def topk_by_partition(pre: Tensor, k: int) -> Tensor | None:
    """`relu_topk` of a float32 pre [n, d] on a CPU (0 < k < d) by numpy: each row's k-th largest of
    `relu_order`'s integers (`kth_largest`), then the entries at or above it (one comparison; their flat
    indices are ascending, so each row's latents come sorted). None if some row has a tie at its k-th value
    (more than k entries at or above it). One thread: [1024, 512], k 7 (the synthetic world's TopK) 0.67 ms
    where torch.topk of the same integers took 1.19-1.23; [1024, 4608], k 32 7.4 vs 11.3-12.0; [1024, 16384],
    k 64 28.4 vs 36.7."""
    n, d = pre.shape
    a = pre.detach().numpy().view(np.int32)  # relu_order's integers
    numel, rows = n * d, max(1, PARTITION_BLOCK // d)
    mask = flat_true_buffer(numel)
    at_or_above = mask[:numel].reshape(n, d)
    for i in range(0, n, rows):  # a block of rows at a time, still in cache for its comparison
        block = a[i : i + rows]
        np.greater_equal(block, kth_largest(block, k)[:, None], out=at_or_above[i : i + rows])
    flat = flat_true(mask, numel, n * k)  # every row has at least k: n * k in all unless a row ties
    if len(flat) != n * k:
        return None
    return torch.from_numpy((flat % d).astype(np.int64, copy=False)).view(n, k)


def group_width(d: int, k: int) -> int | None:
    """The group width `topk_by_groups` takes for rows of d latents and k of them: near max(128, d / 8, 4k)
    (at most PARTITION_WIDTH), dividing d, with at most PARTITION_WIDTH candidates a row (so both of its
    partitions stay vectorised) and more than 2k groups; None where no width fits (e.g. 16,384 latents at
    k 32: 512 groups leave 1,024 candidates). Measured on one thread, [1024, d], against `topk_by_partition`:
    d 512, k 7 (width 128) 0.57 vs 0.78 ms; d 1,024, k 8 0.85 vs 1.44; d 2,048, k 16 (256) 1.89 vs 3.19;
    d 4,608, k 32 (512) 6.2 vs 6.8."""
    target = min(PARTITION_WIDTH, max(128, d // 8, 4 * k))
    for s in range(max(2, -(-d // target)), PARTITION_WIDTH // k + 1):  # s members a group, s * k candidates
        if d % s == 0:
            return d // s if d // s > 2 * k else None
    return None


def topk_by_groups(pre: Tensor, k: int, width: int) -> Tensor | None:
    """`relu_topk` of a float32 pre [n, d] on a CPU by group maxima, d = s * width (s >= 2, k < width): each
    row's latents fall into `width` groups {j, j + width, ..., j + (s - 1) width}; the k groups of largest
    maxima hold the row's k largest entries (each of those lies in a group whose maximum is at least the
    k-th largest entry, and at most k groups have such a maximum), so the row's k-th largest entry is the
    k-th largest of those groups' s * k entries, and the k entries at or above it are the answer, in no
    order. Compared as `relu_order`'s integers, a block of rows at a time. None if a row ties (among its
    groups' maxima or at its k-th value). Numpy's partition then runs on width + s * k entries a row
    instead of d."""
    n, d = pre.shape
    s = d // width
    a = pre.detach().numpy().view(np.int32)  # relu_order's integers
    rows = max(1, PARTITION_BLOCK // d)
    out = np.empty((n, k), dtype=np.int64)
    group_mask, pick_mask = flat_true_buffer(rows * width), flat_true_buffer(rows * s * k)
    offsets = (np.arange(s) * width).reshape(1, s, 1)  # a group's members, from its first
    for i in range(0, n, rows):
        block = a[i : i + rows].reshape(-1, s, width)  # [m, s, width]: block[r, j, g] is latent j * width + g
        m = len(block)
        top = block[:, 0].copy()  # [m, width]: each group's maximum
        for j in range(1, s):
            np.maximum(top, block[:, j], out=top)
        cut = np.partition(top, width - k, axis=1)[:, width - k]  # [m]: the k-th largest group maximum
        np.greater_equal(top, cut[:, None], out=group_mask[: m * width].reshape(m, width))
        groups = flat_true(group_mask, m * width, m * k)  # r * width + g, k a row unless groups tie
        if len(groups) != m * k:
            return None
        first = groups + groups // width * (d - width)  # r * d + g: each chosen group's first member
        members = (first.reshape(m, 1, k) + offsets).reshape(m, s * k)  # flat positions in the block
        values = np.take(block.reshape(-1), members)  # [m, s * k]
        kth = np.partition(values, s * k - k, axis=1)[:, s * k - k]  # [m]: each row's k-th largest
        np.greater_equal(values, kth[:, None], out=pick_mask[: m * s * k].reshape(m, s * k))
        picked = flat_true(pick_mask, m * s * k, m * k)
        if len(picked) != m * k:  # a tie at some row's k-th value
            return None
        out[i : i + m] = (members.reshape(-1)[picked] % d).reshape(m, k)
    return torch.from_numpy(out)


def kth_largest(a: np.ndarray, k: int) -> np.ndarray:
    """[n]: each row's k-th largest entry of a [n, d] (an integer array, k <= PARTITION_WIDTH // 2). Rows
    wider than PARTITION_WIDTH are cut into pieces of that width (the last padded with the dtype's minimum,
    below or equal to every entry) and each piece's k largest kept, until the candidates fit one piece: the
    row's k largest are among its pieces' k largest."""
    n, d = a.shape
    while d > PARTITION_WIDTH:
        pieces = -(-d // PARTITION_WIDTH)
        if pieces * PARTITION_WIDTH != d:
            fill = np.full((n, pieces * PARTITION_WIDTH - d), np.iinfo(a.dtype).min, a.dtype)
            a = np.concatenate([a, fill], axis=1)
        a = np.partition(a.reshape(n * pieces, PARTITION_WIDTH), PARTITION_WIDTH - k, axis=1)
        a, d = a[:, PARTITION_WIDTH - k :].reshape(n, pieces * k), pieces * k
    return np.partition(a, d - k, axis=1)[:, d - k]


def few_nonzero(mask: Tensor) -> Tensor:
    """The flat indices [m], ascending, of the True entries of a mostly-False bool `mask`. torch.nonzero
    costs about 1 ns per entry scanned on a CPU; here it scans the mask as int64 words (8 entries each),
    then only the words that hold a True (BatchTopK's candidates, ~2% of [1024, 512]: 0.46 vs 0.59 ms)."""
    flat = mask.reshape(-1)
    if flat.numel() % 8 or flat.storage_offset() % 8:
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64).nonzero().squeeze(1)  # [w] the 8-entry blocks holding a True
    hit = flat.view(-1, 8).index_select(0, words).nonzero()  # [m, 2]: (which of those blocks, offset)
    return words.index_select(0, hit[:, 0]) * 8 + hit[:, 1]


def batch_topk(pre: Tensor, n_select: int, sample_rows: int = 64) -> Pattern:
    """The `n_select` largest entries of ReLU(pre) [n, d_sae] over the whole batch (BatchTopK, Bussmann et
    al. 2024; the caller ReLUs the values), ties broken arbitrarily, compared as `relu_order`'s integers
    (so a batch with fewer than n_select positive entries gets all of them and some others, all ReLU'd to
    0). A top-k over all n·d_sae entries is slow on a CPU (~4x a per-row top-k), so a threshold a little
    below the answer is estimated from the top 1.5·n_select/n of `sample_rows` evenly spaced rows; the
    entries above it (about 1.5·n_select, found by one comparison, in row-major order) hold the exact
    answer: those at or above their n_select-th largest, kept in that order, so the pattern needs no sort (a
    tie at that cut is broken by a top-k and sorted). Should the estimate be too high (fewer than n_select
    entries above it), the full top-k runs instead: the result is exact either way."""
    n, d = pre.shape
    flat = relu_order(pre).reshape(-1)
    n_select = min(n_select, flat.numel())
    sample = flat.view(n, d)[:: max(1, n // sample_rows)].reshape(-1)
    k_sample = min(sample.numel(), int(sample.numel() * n_select / flat.numel() * 1.5) + 16)
    threshold = sample.topk(k_sample, sorted=False).values.min()
    idx = few_nonzero(flat >= threshold)  # row-major candidates
    if len(idx) >= n_select > 0:
        values = flat.index_select(0, idx)
        keep = values >= values.topk(n_select, sorted=False).values.min()  # at least the n_select largest
        if int(keep.sum()) == n_select:  # no tie at the cut: these are the answer, still in row-major order
            top = idx[keep]
            return Pattern(torch.div(top, d, rounding_mode="floor"), top % d, n, d)
        top = idx[values.topk(n_select, sorted=False).indices]  # a tie at the cut: break it arbitrarily
    else:
        top = flat.topk(n_select, sorted=False).indices
    return Pattern.from_pairs(torch.div(top, d, rounding_mode="floor"), top % d, n, d)


# torch's CPU stable sort of a 1-D integer tensor is a radix sort (fbgemm's, one pass per key byte) from
# this many entries on (at::internal::GRAIN_SIZE), a comparison sort below it.
RADIX_SORT_FROM = 32768


def stable_argsort_small(keys: Tensor, bound: int) -> Tensor:
    """`torch.sort(keys, stable=True).indices` of integer keys [m] in [0, bound). On a CPU with bound <= 2^15,
    numpy's stable sort of the keys as int16, which is a radix sort: one thread, 512 latents, 7,168 keys (a
    TopK step's at k 7) 0.032 ms where torch's unstable comparison sort took 0.075 and its stable one 0.17;
    30,729 (a JumpReLU step's) 0.13 vs 0.18 for torch's radix sort below. Otherwise (wider SAEs, CUDA), from
    a quarter of `RADIX_SORT_FROM` keys on, the keys are sorted as int32 and padded up to it with `bound`
    (sorted after every key, then dropped), so torch takes its radix sort: 32,768 keys in 0.15 ms instead of
    0.41 as int64; below that torch's comparison sort is as fast or faster."""
    m = len(keys)
    if keys.device.type == "cpu" and bound <= 2**15:
        return torch.from_numpy(np.argsort(keys.numpy().astype(np.int16), kind="stable").astype(np.int64))
    if keys.device.type != "cpu" or m < RADIX_SORT_FROM // 4:
        return torch.sort(keys, stable=True).indices
    small = keys.to(torch.int32)
    if m < RADIX_SORT_FROM:
        small = torch.cat([small, small.new_full((RADIX_SORT_FROM - m,), bound)])
    return torch.sort(small, stable=True).indices[:m]


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch's one-time "CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _GatherPre(torch.autograd.Function):
    """pre[row, col] of pre = (x - b_dec) @ W_enc_T.T + bias, read from the product computed without
    autograd. Backward through those pairs only, with Z the sparse upstream gradient [n_tokens, d_sae]:
    d W_enc_T = Z^T @ (x - b_dec), d bias = column sums of Z, d b_dec = -(column sums of Z) @ W_enc_T
    (b_dec is shared by all tokens, so its gradient needs Z's column sums, not a sparse matmul)."""

    @staticmethod
    @_FP32
    def forward(ctx, x, b_dec, W_enc_T, bias, pre: Tensor, p: Pattern) -> Tensor:
        ctx.save_for_backward(x, b_dec, W_enc_T)
        ctx.p, ctx.has_bias = p, bias is not None
        flat = p.row * pre.shape[1] + p.col  # index_select on the flat view: ~5x faster than pre[row, col]
        return pre.reshape(-1).index_select(0, flat).float()

    @staticmethod
    @_BWD
    def backward(ctx, grad: Tensor):
        x, b_dec, W_enc_T = ctx.saved_tensors
        p: Pattern = ctx.p
        _, need_b_dec, need_w, need_bias = ctx.needs_input_grad[:4]
        d_b_dec = d_w = d_bias = None
        col_sums = p.per_latent(grad)
        if need_w:
            x_c = x - b_dec
            d_w = p.dense(grad).t() @ x_c if p.is_dense else spmm(p.csr_t(grad), x_c)
        if need_b_dec:
            d_b_dec = -(col_sums @ W_enc_T)
        if need_bias and ctx.has_bias:
            d_bias = col_sums
        return None, d_b_dec, d_w, d_bias, None, None


def decode_pairs(values: Tensor, W_dec: Tensor, p: Pattern) -> Tensor:
    """values [nnz] at the pattern's pairs @ W_dec [d_sae, d_in] -> [n_tokens, d_in], no autograd (the
    written-out steps' decode; `sparse_decode` is the autograd one)."""
    if p.is_dense:
        return p.dense(values) @ W_dec
    return F.embedding_bag(
        p.col, W_dec, p.crow, mode="sum", per_sample_weights=values, include_last_offset=True
    )


def decode_pairs_backward(
    values: Tensor, W_dec: Tensor, p: Pattern, g: Tensor, need_values: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of `decode_pairs` from g [n_tokens, d_in]: d values = (g @ W_dec^T) sampled at the pairs
    (SDDMM) [nnz]; d W_dec = A^T @ g [d_sae, d_in]."""
    g = g.contiguous()
    dv = dw = None
    if p.is_dense:
        dv = (g @ W_dec.t())[p.row, p.col] if need_values else None
        dw = p.dense(values).t() @ g if need_w else None
    else:
        if need_values:
            dv = torch.sparse.sampled_addmm(p.csr(torch.zeros_like(values)), g, W_dec.t()).values()
        dw = spmm(p.csr_t(values), g) if need_w else None
    return dv, dw


class _SparseDecode(torch.autograd.Function):
    """values [nnz] at pattern pairs @ W_dec [d_sae, d_in] -> [n_tokens, d_in], without bias."""

    @staticmethod
    @_FP32
    def forward(ctx, values: Tensor, W_dec: Tensor, p: Pattern) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.p = p
        return decode_pairs(values, W_dec, p)

    @staticmethod
    @_BWD
    def backward(ctx, g: Tensor):
        values, W_dec = ctx.saved_tensors
        return *decode_pairs_backward(values, W_dec, ctx.p, g, *ctx.needs_input_grad[:2]), None


class _SparseRecon(torch.autograd.Function):
    """(MSE of x_hat against x, x_hat) for x_hat = values [nnz] at the pattern's pairs @ W_dec + b_dec
    [n_tokens, d_in], the loss's chain written out: autograd's graph of `sparse_decode(...) + b_dec` and
    `recon_loss` takes five nodes (add, sub, pow, sum, mean: ~0.2 ms forward and backward at [1024, 64] on
    one thread), this one pass each way. Backward: d x_hat = 2 r g / n with r = x_hat - x, then
    `decode_pairs_backward`, and d b_dec = column sums of d x_hat. x_hat is returned without gradient."""

    @staticmethod
    @_FP32
    def forward(ctx, values: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor, p: Pattern):
        x_hat = decode_pairs(values, W_dec, p).add_(b_dec)
        r = x_hat - x  # [n, d_in]
        mse = residual_mse(r)
        ctx.save_for_backward(values, W_dec, r)
        ctx.p = p
        ctx.mark_non_differentiable(x_hat)
        return mse, x_hat

    @staticmethod
    @_BWD
    def backward(ctx, g_mse: Tensor, _):
        values, W_dec, r = ctx.saved_tensors
        d_x_hat = r * (2 * g_mse / len(r))
        need_values, need_w, need_b_dec = ctx.needs_input_grad[:3]
        dv, dw = decode_pairs_backward(values, W_dec, ctx.p, d_x_hat, need_values, need_w)
        return dv, dw, d_x_hat.sum(0) if need_b_dec else None, None, None


def spmm(csr: Tensor, dense: Tensor) -> Tensor:
    """CSR @ dense into a fresh tensor; `addmm(..., beta=0, out=)` skips the zero-fill-and-copy that
    `torch.sparse.mm` does (measured ~1.5x faster on CPU)."""
    out = dense.new_empty(csr.shape[0], dense.shape[1])
    return torch.addmm(out, csr, dense, beta=0, out=out)


class _RowNorms(torch.autograd.Function):
    """The norm of each row of W [d_sae, d_in] -> [d_sae]; backward W_j * (g_j / ||W_j||) in one pass over
    W (autograd's norm backward takes three: multiply, divide, and a fill where a norm is 0)."""

    @staticmethod
    @_FP32
    def forward(ctx, w: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(w, dim=1)
        ctx.save_for_backward(w, norms)
        return norms

    @staticmethod
    @_BWD
    def backward(ctx, g: Tensor):
        w, norms = ctx.saved_tensors
        scale = torch.where(norms > 0, g / norms, 0.0)  # a zero row's subgradient is 0, as autograd's
        return w * scale.unsqueeze(1)


def row_norms(w: Tensor) -> Tensor:
    """`w.norm(dim=1)` (float32) with a cheaper backward (a penalty weighted by decoder rows' norms)."""
    return _RowNorms.apply(w)


def gather_pre(
    x: Tensor, b_dec: Tensor, W_enc_T: Tensor, bias: Tensor | None, pre: Tensor, p: Pattern
) -> Tensor:
    """The pre-activations `pre[p.row, p.col]` [nnz] (float32) with gradients to b_dec, W_enc_T and bias.
    `pre` must be `(x - b_dec) @ W_enc_T.T (+ bias)` computed under no_grad (maybe in autocast precision);
    `x` is data (no gradient)."""
    return _GatherPre.apply(x, b_dec, W_enc_T, bias, pre, p)


def sparse_decode(values: Tensor, W_dec: Tensor, p: Pattern) -> Tensor:
    """`sum_j values_j * W_dec[col_j]` per token [n_tokens, d_in] (no b_dec), gradients to both."""
    return _SparseDecode.apply(values, W_dec, p)


def sparse_recon_loss(
    values: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor, p: Pattern
) -> tuple[Tensor, Tensor]:
    """(`recon_loss(sparse_decode(values, W_dec, p) + b_dec, x)`, that x_hat [n_tokens, d_in] detached) with
    gradients to values, W_dec and b_dec (not to x) through one autograd node."""
    return _SparseRecon.apply(values, W_dec, b_dec, x, p)


def firing_counts(acts: Tensor, p: Pattern) -> Tensor:
    """[p.n_cols] int64: on how many tokens each latent is active, from the activations [nnz] at the
    pattern's pairs (a latent is at most once in a token's pairs). index_add_ of the 0/1 flags, not bincount
    of the active pairs' latents, which a boolean index would first gather (~3x slower)."""
    return p.per_latent((acts > 0).long())


def recon_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared reconstruction error summed over d_in, averaged over tokens (the MSE of the SAE papers)."""
    return residual_mse(x_hat - x)


def residual_mse(r: Tensor) -> Tensor:
    """`recon_loss` of the residual r = x_hat - x [n, d_in], for the steps whose backward keeps r: one
    reduction (a dot product) where the per-token sums and their mean took three."""
    flat = r.reshape(-1)
    return torch.dot(flat, flat) / len(r)


def dense_weight_grads(
    x: Tensor,
    b_dec: Tensor,
    W_enc_T: Tensor,
    acts: Tensor,
    d_pre: Tensor,
    d_x_hat: Tensor,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d b_dec, d W_enc_T, d b_enc, d W_dec) in `dtype` of a dense step whose pre-activations are
    (x - b_dec) @ W_enc + b_enc and whose x_hat is acts [n, d_sae] @ W_dec + b_dec, from the gradients of the
    pre-activations d_pre [n, d_sae] and of x_hat d_x_hat [n, d_in] (the written-out backward of the
    standard and JumpReLU dense steps): b_dec's gradient through the encoder needs only d_pre's column sums,
    not an [n, d_in] product."""
    d_W_enc_T = d_pre.t() @ (x - b_dec)
    d_b_enc = d_pre.sum(0, dtype=torch.float32)
    with torch.autocast(x.device.type, enabled=False):  # a column sum's scale overflows float16
        d_b_dec = d_x_hat.sum(0) - d_b_enc @ W_enc_T.float()
    d_W_dec = acts.t() @ d_x_hat
    return tuple(g.to(dtype) for g in (d_b_dec, d_W_enc_T, d_b_enc, d_W_dec))


# --- The pairs of a thresholded step (JumpReLU, Gated, standard), found on a CPU by numpy ---

BRANCHLESS_FROM = 0.035  # the density from which numpy's padded, branchless nonzero is faster (`flat_true`)


def flat_true_buffer(numel: int) -> np.ndarray:
    """An uninitialised bool buffer for a mask of `numel` entries and the padding `flat_true` appends."""
    return np.empty(numel + numel // 9 + 1, dtype=bool)


def flat_true(buf: np.ndarray, numel: int, nnz: int) -> np.ndarray:
    """The flat indices [m], ascending, of the True entries of the bool mask buf[:numel], of which about `nnz`
    are expected (the exact count, or a lower bound). buf must have room for numel // 9 + 1 entries after
    the mask (`flat_true_buffer`), which this overwrites. numpy's 1-D nonzero skips runs of zeros with
    memchr up to 10% density (~13 ns a pair: 0.07-0.08 ms at 1-2% of [1024, 512], 0.36 at 5%) and above
    that runs a branchless loop (~0.45 ns an entry: 0.24 ms for [1024, 512]): from `BRANCHLESS_FROM` on,
    True entries are appended after the mask until more than 10% of the entries are True, so numpy takes
    the branchless loop, and dropped from the answer."""
    # (nnz + pad) / (numel + pad) > 0.1
    pad = max(0, (numel - 10 * nnz) // 9 + 1) if nnz >= BRANCHLESS_FROM * numel else 0
    buf[numel : numel + pad] = True
    flat = np.flatnonzero(buf[: numel + pad])
    return flat[: len(flat) - pad]


class PositivePairs:
    """The (row, col) pairs where `values` [n, d] (any sign, e.g. JumpReLU's pre - (θ - ε/2), or ReLU'd, e.g.
    ReLU(π_gate)) are > 0: `count` at once (whether the step is dense), `pattern()` when it is not.

    On a CPU the mask is written by numpy's comparison `values > 0` (float32 or float64, contiguous: 0.05 ms
    at [1024, 512], one thread, where torch's comparison to bool takes 0.24 and its bool cast of ReLU'd values
    0.04 after the ReLU's 0.04; other dtypes and layouts by torch's comparison). The pairs are found by
    numpy's 1-D nonzero of the bool mask (`flat_true`: flat indices, row-major, so already in CSR order);
    torch.nonzero of a [1024, 512] mask took 0.66-0.70 ms on one thread at 5% density (0.87 at 10%: a scalar
    pass per entry, then one per pair). The count (numpy's count_nonzero) takes 0.02 ms where torch's int32
    sum of the bool mask took 0.055-0.1."""

    def __init__(self, values: Tensor):
        self.n_rows, self.n_cols = values.shape
        self.device = values.device
        if values.device.type == "cpu":
            numel = values.numel()
            # [numel + room for flat_true's padding]: the mask first (True where values > 0)
            self.mask = torch.from_numpy(flat_true_buffer(numel))
            if values.dtype in (torch.float32, torch.float64) and values.is_contiguous():
                np.greater(values.numpy(), 0, out=self.mask[:numel].numpy().reshape(values.shape))
            else:  # torch's comparison (slower: ~0.24 ms at [1024, 512])
                torch.gt(values, 0, out=self.mask[:numel].view_as(values))
            self.count = int(np.count_nonzero(self.mask[:numel].numpy()))
        else:
            self.mask = values > 0
            self.count = count_true(self.mask)

    def active(self) -> Tensor:
        """The mask [n, d] (bool, True where the values are > 0), for a dense step."""
        if self.device.type == "cpu":
            return self.mask[: self.n_rows * self.n_cols].view(self.n_rows, self.n_cols)
        return self.mask

    def pattern(self) -> tuple[Pattern, Tensor]:
        """(the Pattern of the pairs, their flat indices row * n_cols + col [nnz])."""
        n, d = self.n_rows, self.n_cols
        if self.device.type != "cpu":
            row, col = self.mask.nonzero(as_tuple=True)
            return Pattern(row, col, n, d), row * d + col
        flat = flat_true(self.mask.numpy(), n * d, self.count)  # ascending: CSR order
        crow = np.searchsorted(flat, np.arange(0, n * d + 1, d))  # [n + 1]: where each row starts
        row = np.repeat(np.arange(n), np.diff(crow))
        col = flat - row * d
        to_torch = lambda a: torch.from_numpy(a.astype(np.int64, copy=False))  # noqa: E731 - intp is int64
        return Pattern(to_torch(row), to_torch(col), n, d, to_torch(crow)), to_torch(flat)
