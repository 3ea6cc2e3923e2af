"""L2-penalised logistic regression for many label or weight vectors on ONE design at once, on the CPU in
numpy or on the device the model is on in torch.

A probe's permutation test refits the same training rows with B permuted label vectors, and its
bootstrap refits them with B vectors of row weights: B problems that share the design Z. Fitting them
together turns each Newton step into a few matrix products [B, r] @ [r, n] instead of B separate
solver runs (scikit-learn's lbfgs spends most of its time in per-fit overhead on small problems and in
matrix-vector products on large ones).

Objective, per problem b (scikit-learn's `LogisticRegression(C=C, penalty="l2")` with sample weights;
the intercept is not penalised, as in its lbfgs solver):

    0.5 |w_b|^2 + C sum_i s_bi [log(1 + exp(z_bi)) - y_bi z_bi],   z_bi = Z_i . w_b + c_b

solved by Newton's method with a preconditioned conjugate-gradient inner solve (Nocedal & Wright 2006,
§7.1, "Newton-CG") and a backtracking line search. The preconditioner is the Hessian's diagonal; in the
SVD coordinates that `probes._design` produces Z^T Z is diagonal, so it is close to the whole Hessian
and CG needs few steps, except where the spectrum is steep (raw residual streams: a few directions
carry most of the variance): there the rows' Hessian weights couple the top directions, and late Newton
steps took ~40-100 CG steps each. So where the spectrum is steep (`_block_columns`) the preconditioner
inverts the exact Hessian block of the top directions and the intercept, and the diagonal elsewhere
(block Jacobi): at nanochat-d32 scale a raw probe's refits took 1.6-1.8x fewer seconds. Tested against
scikit-learn on the same problems (tests/analysis/test_logistic.py).

Where it runs (`DEVICE`, or a call's `device`): None is CUDA when torch sees a GPU and numpy on the CPU
otherwise; a torch device name ("cuda", "cpu") runs the same solver in torch there ("cpu" is how the
tests check the torch path without a GPU). numpy stays the CPU path because its BLAS ran this solver
1.4x faster than torch's on one thread here. Both compute in float64: the problems are small ([B, n],
n the training rows), so float64 costs little even on a T4 (1/32 of its float32 rate), and the two
paths agree to ~1e-12 in out-of-fold probabilities (summation order; the solver's own tolerance moves
them ~1e-5). The B problems go to the device in chunks sized to `MEMORY_BUDGET`; a CUDA out-of-memory
error halves the chunk and carries on, keeping the problems already solved (`collect.oom`).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from scipy.special import expit

from helpers.collect.oom import ShrinkingBatches

DEVICE: str | torch.device | None = None
"""Where the statistics run when a call names no device (module doc): None, "cuda", "cpu", ..."""

MEMORY_BUDGET = 1 << 30
"""Bytes of device memory one chunk of problems may take (about 13 [chunk, n] and 16 [chunk, r] float64
work arrays, the preconditioner's blocks included): 1 GiB fits beside a model on a 15 GB T4."""
OOM_FIX = "fit on the CPU (logistic.DEVICE = 'cpu'), or free GPU memory (del models no longer needed)"
"""What to change when one problem does not fit in the GPU's memory."""

_NUMPY = SimpleNamespace(
    xp=np,
    sigmoid=expit,
    softplus=lambda z: np.logaddexp(0.0, z),
    rowmax=lambda a: a.max(1, initial=0.0),
    flatnonzero=np.flatnonzero,
    arange=np.arange,
    asarray=np.asarray,
    numpy=np.asarray,
    zeros=lambda shape, like: np.zeros(shape),
)


def _torch_ops(dev: torch.device) -> SimpleNamespace:
    return SimpleNamespace(
        xp=torch,
        sigmoid=torch.sigmoid,
        softplus=torch.nn.functional.softplus,
        rowmax=lambda a: a.amax(1) if a.shape[1] else a.new_zeros(len(a)),
        flatnonzero=lambda a: torch.nonzero(a).ravel(),
        arange=lambda n: torch.arange(n, device=dev),
        asarray=lambda a: torch.as_tensor(a, device=dev),
        numpy=lambda a: a.cpu().numpy(),
        zeros=lambda shape, like: like.new_zeros(shape),
    )


def pick_device(device: str | torch.device | None = None) -> torch.device | None:
    """The torch device the statistics run on, or None for numpy on the CPU: `device`, else `DEVICE`,
    else CUDA when torch sees a GPU."""
    device = device if device is not None else DEVICE
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(device)


def to_device(a, dev: torch.device | None):
    """a as float64 on `dev` (a tensor), or as a numpy float64 array when dev is None."""
    if dev is None:
        return a.cpu().numpy().astype(np.float64) if torch.is_tensor(a) else np.asarray(a, np.float64)
    return torch.as_tensor(np.asarray(a, np.float64) if not torch.is_tensor(a) else a, device=dev).double()


def to_numpy(a) -> np.ndarray:
    return a.cpu().numpy() if torch.is_tensor(a) else np.asarray(a)


def balanced_weights(y: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Row weights [B, n] that give both classes equal total weight (scikit-learn's
    class_weight="balanced": n / (2 n_c)), times bootstrap `counts` [B, n] when given. A problem whose
    rows hold one class only gets all-zero weights (it cannot be fitted; see `fit`)."""
    y = np.atleast_2d(y).astype(np.float64)
    counts = np.ones_like(y) if counts is None else np.broadcast_to(counts, y.shape).astype(np.float64)
    n1, n0 = (counts * y).sum(1, keepdims=True), (counts * (1 - y)).sum(1, keepdims=True)
    total = n1 + n0
    with np.errstate(divide="ignore", invalid="ignore"):
        w1 = np.where(n1 > 0, total / (2 * n1), 0.0)
        w0 = np.where(n0 > 0, total / (2 * n0), 0.0)
    both = (n1 > 0) & (n0 > 0)
    return np.where(both, counts * (y * w1 + (1 - y) * w0), 0.0)


def fit(
    Z: np.ndarray,
    Y: np.ndarray,
    S: np.ndarray,
    C: float = 1.0,
    *,
    tol: float = 1e-8,
    max_iter: int = 100,
    device: str | torch.device | None = None,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights W [B, r] and intercepts c [B] (numpy float64) of B problems on the design Z [n, r], with
    labels Y [B, n] (0/1) and row weights S [B, n] >= 0. Stops when every problem's gradient has max
    norm <= tol * (1 + C * total weight). A problem with zero total weight keeps W = 0, c = 0. `start`
    (W [r] or [B, r], c [] or [B]): where the solver starts (default W = 0, c = the weighted log-odds),
    such as a fit of a nearby problem; the same optimum, within the tolerance. Runs where `device` says
    (module doc)."""
    dev = pick_device(device)
    Y, S = np.atleast_2d(Y).astype(np.float64), np.atleast_2d(S).astype(np.float64)
    n, r = np.shape(Z)
    if start is not None:
        start = (np.broadcast_to(start[0], (len(Y), r)).copy(), np.broadcast_to(start[1], (len(Y),)).copy())
    if dev is None:
        return _fit(np.ascontiguousarray(Z, dtype=np.float64), Y, S, C, tol, max_iter, _NUMPY, start)
    Zt, ops = to_device(Z, dev), _torch_ops(dev)
    W, c = np.zeros((len(Y), r)), np.zeros(len(Y))
    chunk = max(1, min(len(Y), MEMORY_BUDGET // (8 * (13 * n + 16 * r))))  # + 2 blocks ~ (2 sqrt(r))^2
    chunks = ShrinkingBatches(chunk, what="problems per chunk", setting="logistic.MEMORY_BUDGET", fix=OOM_FIX)

    def solve(problems: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        part = slice(problems[0], problems[-1] + 1)
        begin = None if start is None else tuple(to_device(a[part], dev) for a in start)
        return _fit(Zt, to_device(Y[part], dev), to_device(S[part], dev), C, tol, max_iter, ops, begin)

    for problems, (Wp, cp) in chunks.run(range(len(Y)), solve):
        part = slice(problems[0], problems[-1] + 1)
        W[part], c[part] = to_numpy(Wp), to_numpy(cp)
    return W, c


def _objective(W, z, Y, S, C, ops):
    """The objective of problems with weights W [b, r] at their rows' logits z = W Z^T + c [b, n]."""
    loss = ops.softplus(z) - Y * z  # log(1 + e^z) - y z, the logistic loss, overflow-free
    return 0.5 * (W * W).sum(1) + C * (S * loss).sum(1)


def _fit(Z, Y, S, C, tol, max_iter, ops, start=None):
    """`fit` on arrays of one kind (numpy, or torch on one device; `ops` names the functions whose
    names differ): Z [n, r], Y and S [B, n], `start` None or (W [B, r], c [B]); returns W [B, r], c [B]
    of that kind."""
    xp = ops.xp
    total = S.sum(1)
    live = total > 0
    # Start the intercept at the weighted log-odds: the optimum when w = 0, often close to it.
    rate = (S * Y).sum(1) / xp.where(live, total, 1.0)
    rate = xp.where(rate < 1e-6, 1e-6, xp.where(rate > 1 - 1e-6, 1 - 1e-6, rate))
    c = xp.where(live, xp.log(rate / (1 - rate)), 0.0)
    W = xp.zeros_like(Y[:, :1] * Z[:1])  # [B, r]
    # The logits W Z^T + c [B, n], carried from step to step: a Newton step moves them by step x dz,
    # dz = dw Z^T + dc, so each step takes one product with Z for them, the line search's trials none
    # (recomputing them took one for the probabilities and one per trial).
    if start is None:
        z = xp.zeros_like(Y) + c[:, None]
    else:  # live problems only: one that cannot be fitted keeps W = 0, c = 0
        W, c = xp.where(live[:, None], start[0], 0.0), xp.where(live, start[1], 0.0)
        z = W @ Z.T + c[:, None]
    Z2 = Z * Z
    block = _block(Z, Z2, ops)
    size = 1 + C * total  # the gradient's scale: its norm at w = 0 grows with the total row weight
    scale = tol * size
    todo = ops.flatnonzero(live)
    f = xp.zeros_like(total) + float("nan")  # objective at the current point, from the line search
    for _ in range(max_iter):
        if not len(todo):
            break
        Wt, ct, Yt, St, zt = W[todo], c[todo], Y[todo], S[todo], z[todo]
        p = ops.sigmoid(zt)
        gz = St * (p - Yt)
        gw, gc = Wt + C * (gz @ Z), C * gz.sum(1)
        gmax = xp.maximum(ops.rowmax(abs(gw)), abs(gc))
        keep = gmax > scale[todo]
        if not keep.any():
            break
        todo, Wt, ct, Yt, St, zt = todo[keep], Wt[keep], ct[keep], Yt[keep], St[keep], zt[keep]
        gw, gc, p = gw[keep], gc[keep], p[keep]
        D = St * p * (1 - p)  # [b, n] Hessian row weights
        dw, dc = _newton_direction(Z, Z2, D, C, gw, gc, ops, block, size[todo])
        dz = dw @ Z.T + dc[:, None]
        # Backtracking (Armijo) line search, all problems at once.
        f0 = f[todo]
        if xp.isnan(f0).any():
            f0 = _objective(Wt, zt, Yt, St, C, ops)
        slope = (gw * dw).sum(1) + gc * dc
        step = xp.zeros_like(ct) + 1.0
        for _ in range(30):
            f1 = _objective(Wt + step[:, None] * dw, zt + step[:, None] * dz, Yt, St, C, ops)
            # Near the optimum the decrease a step promises (~|g|^2) falls below the rounding of f (a sum
            # of n terms): a test without slack then halves the step 30 times and the fit stalls there,
            # 100 Newton steps later, with the gradient above the tolerance. Rounding-sized rises pass.
            bad = f1 > f0 + 1e-4 * step * slope + 1e-13 * (1 + abs(f0))
            if not bad.any():
                break
            step = xp.where(bad, 0.5 * step, step)
        W[todo] = Wt + step[:, None] * dw
        c[todo] = ct + step * dc
        z[todo] = zt + step[:, None] * dz
        f[todo] = f1
    return W, c


BLOCK_STEEPNESS = 10.0
"""A direction joins the preconditioner's exact block when its squared singular value is at least this
many times the median one (`_block_columns`)."""


def _block_columns(s2: np.ndarray, n: int) -> np.ndarray | None:
    """Columns of the preconditioner's exact block, given each column's squared norm s2 [r] (in SVD
    coordinates its squared singular value) over n rows: those above BLOCK_STEEPNESS x the median, the
    largest first, at most 2 sqrt(r) of them (building the block costs ~ n k^2 a Newton step, a CG step
    ~ n r: k ~ sqrt(r) balances them; the best k measured was 24-32 at r 335 and 48 at r 671) and at
    most what keeps the block's [n, k^2 / 2] products within MEMORY_BUDGET / 16; None when fewer than 8
    stand out (flat spectra, such as SAE features': the diagonal already serves)."""
    if not len(s2):
        return None
    cap = min(2 * np.sqrt(len(s2)), np.sqrt(2 * MEMORY_BUDGET / 16 / 8 / max(n, 1)))
    k = min(int(np.sum(s2 >= BLOCK_STEEPNESS * np.median(s2))), int(cap))
    return np.argsort(-s2, kind="stable")[:k] if k >= 8 else None


def _block(Z, Z2, ops) -> SimpleNamespace | None:
    """What the preconditioner's exact block needs, once per fit (`_block_columns` chooses its columns):
    the pairwise products of the chosen columns of Z [n, r] and a ones column (the intercept), [n,
    (k + 1)(k + 2) / 2], whose D-weighted sums are the block's upper triangle; None without a block.
    Z2 = Z * Z."""
    cols = _block_columns(ops.numpy(Z2.sum(0)), len(Z))
    if cols is None:
        return None
    k, xp = len(cols), ops.xp
    top = xp.concatenate([Z[:, ops.asarray(cols)], xp.ones_like(Z[:, :1])], 1)  # [n, k + 1]
    i, j = (ops.asarray(a) for a in np.triu_indices(k + 1))
    return SimpleNamespace(
        cols=ops.asarray(cols),
        i=i,
        j=j,
        pairs=top[:, i] * top[:, j],
        diag=ops.arange(k + 1),
        eye=ops.asarray(np.r_[np.ones(k), 1e-12]),  # + I on the weights, 1e-12 on the intercept (as Mc)
    )


def _preconditioner(Z2, D, C, block, ops):
    """M^-1 as a function of a residual (rw [b, r], rc [b]), M the block-Jacobi approximation of the
    Hessian H = [[I + C Z^T D Z, C Z^T D 1], [., C 1^T D 1]] of each problem: H's diagonal, except on
    `block`'s columns and the intercept, where M is H's exact [k + 1, k + 1] block (inverted here, once
    per Newton step). Returns (apply, select): select(mask) keeps the problems still iterating."""
    xp = ops.xp
    Mw, Mc = 1.0 + C * (D @ Z2), C * D.sum(1) + 1e-12  # the diagonal (Jacobi)
    inv = None
    if block is not None:
        k = len(block.cols)
        upper = C * (D @ block.pairs)  # [b, (k + 1)(k + 2) / 2]: the block's upper triangle
        H = ops.zeros((len(D), k + 1, k + 1), upper)
        H[:, block.i, block.j] = upper
        H[:, block.j, block.i] = upper
        H[:, block.diag, block.diag] += block.eye
        inv = xp.linalg.inv(H)
    state = SimpleNamespace(Mw=Mw, Mc=Mc, inv=inv)

    def apply(rw, rc):
        zw, zc = rw / state.Mw, rc / state.Mc
        if state.inv is not None:
            r_top = xp.concatenate([rw[:, block.cols], rc[:, None]], 1)
            z_top = (state.inv @ r_top[:, :, None])[:, :, 0]
            zw[:, block.cols] = z_top[:, :-1]
            zc = z_top[:, -1]
        return zw, zc

    def select(keep):
        state.Mw, state.Mc = state.Mw[keep], state.Mc[keep]
        if state.inv is not None:
            state.inv = state.inv[keep]

    return apply, select


def _newton_direction(Z, Z2, D, C, gw, gc, ops, block, size, max_cg: int = 200):
    """Solve H d = -g for each problem by preconditioned conjugate gradients to a residual of
    min(0.5, sqrt(|g| / size)) |g| (Eisenstat & Walker's forcing term 1996, on the gradient relative to
    its scale `size` [b] = 1 + C x total weight, as the stopping test measures it: on |g| itself, which
    starts ~ the row count, the solves stayed at half the gradient until its last steps and a raw probe
    at d32 scale took 15-17 Newton steps where this takes 9-12, 12% less time),
    H = [[I + C Z^T D Z, C Z^T D 1], [., C 1^T D 1]], preconditioned by `_preconditioner`. A problem
    leaves the batch once its residual meets its target: late Newton steps need many CG steps for a few
    problems, and carrying the finished ones along (as this did before) cost 30% of the time of a
    refitted bootstrap (bench/probe_cost.py)."""
    xp = ops.xp
    precondition, select = _preconditioner(Z2, D, C, block, ops)
    xw, xc = xp.zeros_like(gw), xp.zeros_like(gc)  # the directions, written as problems finish
    gnorm = xp.sqrt((gw * gw).sum(1) + gc * gc)
    rel = gnorm / size
    target = xp.sqrt(xp.where(rel < 0.25, rel, 0.25)) * gnorm  # min(sqrt(rel), 0.5) |g|
    idx = ops.arange(len(gw))  # the problems still iterating, and their state below
    aw, ac = xp.zeros_like(gw), xp.zeros_like(gc)
    rw, rc = -gw, -gc
    pw, pc = precondition(rw, rc)
    rz = (rw * pw).sum(1) + rc * pc
    for _ in range(max_cg):
        u = D * (pw @ Z.T + pc[:, None])
        hw, hc = pw + C * (u @ Z), C * u.sum(1)
        curv = (pw * hw).sum(1) + pc * hc
        alpha = rz / xp.where(curv > 0, curv, 1.0)
        aw += alpha[:, None] * pw
        ac += alpha * pc
        rw = rw - alpha[:, None] * hw
        rc = rc - alpha * hc
        going = xp.sqrt((rw * rw).sum(1) + rc * rc) > target
        if not going.all():
            xw[idx], xc[idx] = aw, ac
            if not going.any():
                return xw, xc
            idx, aw, ac, D, rw, rc, pw, pc, rz, target = (
                a[going] for a in (idx, aw, ac, D, rw, rc, pw, pc, rz, target)
            )
            select(going)
        zw, zc = precondition(rw, rc)
        rz_new = (rw * zw).sum(1) + rc * zc
        beta = rz_new / xp.where(rz > 0, rz, 1.0)
        pw = zw + beta[:, None] * pw
        pc = zc + beta * pc
        rz = rz_new
    xw[idx], xc[idx] = aw, ac
    return xw, xc


def predict_proba(Z: np.ndarray, W: np.ndarray, c: np.ndarray) -> np.ndarray:
    """P(y = 1) [B, m] of rows Z [m, r] under each of the B fits."""
    return expit(np.atleast_2d(W) @ np.asarray(Z, np.float64).T + np.atleast_1d(c)[:, None])
