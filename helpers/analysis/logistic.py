"""L2-penalised logistic regression for many label or weight vectors on ONE design at once.

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
and CG needs few steps. Tested against scikit-learn on the same problems (tests/analysis/test_logistic.py).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


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


def _objective(Z, Y, S, C, W, c):
    z = W @ Z.T + c[:, None]
    loss = np.logaddexp(0.0, z) - Y * z  # log(1 + e^z) - y z, the logistic loss, overflow-free
    return 0.5 * (W * W).sum(1) + C * (S * loss).sum(1)


def fit(
    Z: np.ndarray,
    Y: np.ndarray,
    S: np.ndarray,
    C: float = 1.0,
    *,
    tol: float = 1e-8,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights W [B, r] and intercepts c [B] of B problems on the design Z [n, r] (float64), with
    labels Y [B, n] (0/1) and row weights S [B, n] >= 0. Stops when every problem's gradient has max
    norm <= tol * (1 + C * total weight). A problem with zero total weight keeps W = 0, c = 0."""
    Z = np.ascontiguousarray(Z, dtype=np.float64)
    Y, S = np.atleast_2d(Y).astype(np.float64), np.atleast_2d(S).astype(np.float64)
    B, r = len(Y), Z.shape[1]
    W, c = np.zeros((B, r)), np.zeros(B)
    total = S.sum(1)
    live = total > 0
    # Start the intercept at the weighted log-odds: the optimum when w = 0, often close to it.
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.clip((S * Y).sum(1) / np.where(live, total, 1), 1e-6, 1 - 1e-6)
    c[live] = np.log(rate[live] / (1 - rate[live]))
    Z2 = Z * Z
    scale = tol * (1 + C * total)
    todo = np.flatnonzero(live)
    f = np.full(B, np.nan)  # objective at the current point, carried over from the line search
    for _ in range(max_iter):
        if not len(todo):
            break
        Wt, ct, Yt, St = W[todo], c[todo], Y[todo], S[todo]
        z = Wt @ Z.T + ct[:, None]
        p = expit(z)
        gz = St * (p - Yt)
        gw, gc = Wt + C * (gz @ Z), C * gz.sum(1)
        gmax = np.maximum(np.abs(gw).max(1, initial=0.0), np.abs(gc))
        done = gmax <= scale[todo]
        if done.all():
            break
        keep = ~done
        todo, Wt, ct, Yt, St = todo[keep], Wt[keep], ct[keep], Yt[keep], St[keep]
        gw, gc, p, gmax = gw[keep], gc[keep], p[keep], gmax[keep]
        D = St * p * (1 - p)  # [b, n] Hessian row weights
        dw, dc = _newton_direction(Z, Z2, D, C, gw, gc, gmax)
        # Backtracking (Armijo) line search, all problems at once.
        f0 = f[todo]
        if np.isnan(f0).any():
            f0 = _objective(Z, Yt, St, C, Wt, ct)
        slope = (gw * dw).sum(1) + gc * dc
        step = np.ones(len(todo))
        for _ in range(30):
            f1 = _objective(Z, Yt, St, C, Wt + step[:, None] * dw, ct + step * dc)
            bad = f1 > f0 + 1e-4 * step * slope
            if not bad.any():
                break
            step[bad] *= 0.5
        W[todo] = Wt + step[:, None] * dw
        c[todo] = ct + step * dc
        f[todo] = f1
    return W, c


def _newton_direction(Z, Z2, D, C, gw, gc, gmax, max_cg: int = 200):
    """Solve H d = -g for each problem by preconditioned conjugate gradients (forcing term
    min(0.5, sqrt(|g|)) |g|, Eisenstat & Walker 1996), H = [[I + C Z^T D Z, C Z^T D 1], [., C 1^T D 1]]."""
    Mw, Mc = 1.0 + C * (D @ Z2), C * D.sum(1) + 1e-12  # Jacobi preconditioner

    def hess(vw, vc):
        u = D * (vw @ Z.T + vc[:, None])
        return vw + C * (u @ Z), C * u.sum(1)

    xw, xc = np.zeros_like(gw), np.zeros_like(gc)
    rw, rc = -gw, -gc
    zw, zc = rw / Mw, rc / Mc
    pw, pc = zw.copy(), zc.copy()
    rz = (rw * zw).sum(1) + rc * zc
    gnorm = np.sqrt((gw * gw).sum(1) + gc * gc)
    target = np.minimum(0.5, np.sqrt(gnorm)) * gnorm
    active = np.ones(len(gw), bool)
    for _ in range(max_cg):
        hw, hc = hess(pw, pc)
        curv = (pw * hw).sum(1) + pc * hc
        alpha = np.where(active, rz / np.where(curv > 0, curv, 1.0), 0.0)
        xw += alpha[:, None] * pw
        xc += alpha * pc
        rw -= alpha[:, None] * hw
        rc -= alpha * hc
        active &= np.sqrt((rw * rw).sum(1) + rc * rc) > target
        if not active.any():
            break
        zw, zc = rw / Mw, rc / Mc
        rz_new = (rw * zw).sum(1) + rc * zc
        beta = np.where(active, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
        pw = zw + beta[:, None] * pw
        pc = zc + beta * pc
        rz = rz_new
    return xw, xc


def predict_proba(Z: np.ndarray, W: np.ndarray, c: np.ndarray) -> np.ndarray:
    """P(y = 1) [B, m] of rows Z [m, r] under each of the B fits."""
    return expit(np.atleast_2d(W) @ np.asarray(Z, np.float64).T + np.atleast_1d(c)[:, None])
