"""The batched logistic fit on every path it runs on: numpy on the CPU, and torch on a device (here
the CPU, named "cpu": the code a GPU runs, without a GPU). Both solve scikit-learn's objective (balanced
class weights, bootstrap row weights, an unpenalised intercept) and agree with each other; chunking
within the memory budget and a CUDA out-of-memory error change nothing; and whole probes and feature
tests on the calibration worlds (tests/null_worlds.py) give the same numbers on both paths."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from helpers.analysis import features, logistic, probes
from helpers.stats import group_bootstrap_weights
from tests import null_worlds

PATHS = [None, "cpu"]  # numpy, torch
PATH_IDS = ["numpy", "torch"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads only contend with other jobs on a shared CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_path(monkeypatch):
    """Run every fit and design of the test in torch on the CPU (the module setting notebooks leave at
    None, which is CUDA when there is one)."""
    monkeypatch.setattr(logistic, "DEVICE", "cpu")


def problems(n, d, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d)) * np.linspace(3, 0.1, d)
    Y = rng.integers(0, 2, (5, n))
    Y[:, :2] = [0, 1]
    Y[3] = np.maximum(Y[3], Z[:, 0] > 0)  # one problem with signal
    counts = rng.integers(0, 3, Y.shape).astype(float)
    counts[:, :2] = 1
    return Z, Y, counts


@pytest.mark.parametrize("device", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(12, 16), (160, 16), (300, 400)], ids=["tiny", "d<n", "d>n"])
def test_batched_solver_matches_sklearn(shape, device):
    """The same predictions as one scikit-learn fit per problem, on either path."""
    Z, Y, counts = problems(*shape)
    W, c = logistic.fit(Z, Y, logistic.balanced_weights(Y, counts), 0.3, tol=1e-10, device=device)
    got = logistic.predict_proba(Z, W, c)
    for b in range(len(Y)):
        keep = counts[b] > 0
        ref = LogisticRegression(C=0.3, class_weight="balanced", max_iter=10_000, tol=1e-10)
        # sklearn's balanced weights count rows, not bootstrap copies: pass them as sample weights
        S = logistic.balanced_weights(Y[b], counts[b])[0]
        ref.fit(Z[keep], Y[b, keep], sample_weight=S[keep])
        np.testing.assert_allclose(got[b], ref.predict_proba(Z)[:, 1], atol=2e-5)
    zero = np.zeros((1, len(Z)))
    one_class = logistic.fit(Z, zero, logistic.balanced_weights(zero), 1.0, device=device)
    assert np.all(logistic.predict_proba(Z, *one_class) == 0.5), "a one-class problem predicts 0.5"


def test_torch_path_equals_numpy_path():
    """Same solver, same float64: the two paths differ by summation order only."""
    Z, Y, counts = problems(200, 150, seed=1)
    S = logistic.balanced_weights(Y, counts)
    W0, c0 = logistic.fit(Z, Y, S)
    W1, c1 = logistic.fit(Z, Y, S, device="cpu")
    assert logistic.pick_device() is None and logistic.pick_device("cpu") == torch.device("cpu")
    np.testing.assert_allclose(
        logistic.predict_proba(Z, W1, c1), logistic.predict_proba(Z, W0, c0), atol=1e-7
    )
    np.testing.assert_allclose(W1, W0, atol=1e-6)


def test_chunks_and_out_of_memory_change_nothing(monkeypatch):
    """A budget of a few problems per chunk gives the fits of one chunk; an out-of-memory error halves
    the chunk and keeps going, and one on a single problem is raised (nothing smaller to try)."""
    Z, Y, counts = problems(60, 10, seed=2)
    S = logistic.balanced_weights(Y, counts)
    W0, c0 = logistic.fit(Z, Y, S, device="cpu")
    monkeypatch.setattr(logistic, "MEMORY_BUDGET", 8 * (13 * 60 + 16 * 10) * 2)  # 2 problems a chunk
    W1, c1 = logistic.fit(Z, Y, S, device="cpu")
    np.testing.assert_allclose(W1, W0, atol=1e-9)

    solve, sizes = logistic._fit, []

    def short_of_memory(Z, Y, *args):
        sizes.append(len(Y))
        if len(Y) > 1 or len(sizes) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return solve(Z, Y, *args)

    monkeypatch.setattr(logistic, "_fit", short_of_memory)
    W2, c2 = logistic.fit(Z, Y, S, device="cpu")
    assert sizes[:3] == [2, 1, 1] and len(sizes) == 6  # halved once, then one problem at a time
    np.testing.assert_allclose(W2, W0, atol=1e-9)
    sizes.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        logistic.fit(Z, Y[:1], S[:1], device="cpu")  # short of memory even for one problem
    assert sizes == [1]


def steep_problems(n=120, r=100, B=6, seed=4, spread=4.0):
    """Problems in SVD coordinates (orthogonal columns) whose singular values fall as 1 / rank, as raw
    residual streams' do, with a signal along a few top directions: the spectrum where the
    preconditioner's exact block engages (15 directions stand out here)."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, r)))[0]
    Z = U * (60 / np.arange(1, r + 1))
    Y = (rng.random((B, n)) < 1 / (1 + np.exp(-Z[:, :4].sum(1) / spread))).astype(float)
    counts = rng.integers(0, 3, Y.shape).astype(float)
    counts[:, :2], Y[:, :2] = 1, [0, 1]
    return Z, Y, counts


def newton_steps(monkeypatch) -> list[int]:
    """The number of problems in each Newton step's batch, appended as `logistic.fit` runs."""
    made, steps = logistic._newton_direction, []
    monkeypatch.setattr(logistic, "_newton_direction", lambda *a: steps.append(len(a[4])) or made(*a))
    return steps


def test_block_columns_only_on_steep_spectra():
    """The exact block takes the directions that stand out (largest first, at most 2 sqrt(r) and what the
    memory budget allows), and none on a flat spectrum such as SAE features' or when fewer than 8 stand
    out."""
    Z = steep_problems()[0]
    np.testing.assert_array_equal(logistic._block_columns((Z * Z).sum(0), len(Z)), np.arange(15))
    assert logistic._block_columns(np.linspace(2.0, 1.0, 500), 500) is None  # flat
    assert logistic._block_columns(np.r_[[100.0] * 7, np.ones(300)], 400) is None  # 7 stand out
    capped = logistic._block_columns(np.r_[np.ones(100), np.arange(60.0, 100)], 150)  # 40 of 140 stand out
    np.testing.assert_array_equal(capped, np.arange(139, 116, -1))  # 2 sqrt(140) = 23.7, the largest first
    many_rows = logistic._block_columns(np.r_[np.ones(100), np.arange(60.0, 100)], 100_000)
    assert len(many_rows) == 12  # its [n, k^2 / 2] products within MEMORY_BUDGET / 16


@pytest.mark.parametrize("device", PATHS, ids=PATH_IDS)
def test_block_preconditioner_is_the_hessians_block(device):
    """M^-1 r for M = the Hessian's exact block on the top directions and the intercept, its diagonal
    elsewhere: against M built from the explicit Hessian and solved densely, on either path; for the
    problems still iterating after some leave."""
    n, r = 80, 64
    Z, Y, counts = steep_problems(n, r, B=3)
    rng = np.random.default_rng(5)
    D, C = rng.random((3, n)) * 0.25 * counts, 0.7
    rw, rc = rng.standard_normal((3, r)), rng.standard_normal(3)
    cols = logistic._block_columns((Z * Z).sum(0), n)
    assert cols is not None and len(cols) == 10
    want = []
    for b in range(3):
        Zc = np.c_[Z, np.ones(n)]
        H = np.diag(np.r_[np.ones(r), 1e-12]) + C * (Zc.T * D[b]) @ Zc
        inner = np.r_[cols, r]
        M = np.diag(np.diag(H))
        M[np.ix_(inner, inner)] = H[np.ix_(inner, inner)]
        want.append(np.linalg.solve(M, np.r_[rw[b], rc[b]]))
    want = np.array(want)
    dev = logistic.pick_device(device)
    ops = logistic._NUMPY if dev is None else logistic._torch_ops(dev)
    put = partial(logistic.to_device, dev=dev)
    block = logistic._block(put(Z), put(Z * Z), ops)
    apply, select = logistic._preconditioner(put(Z * Z), put(D), C, block, ops)
    zw, zc = apply(put(rw), put(rc))
    np.testing.assert_allclose(
        np.c_[logistic.to_numpy(zw), logistic.to_numpy(zc)], want, rtol=1e-9, atol=1e-12
    )
    keep = np.array([True, False, True])
    select(ops.asarray(keep))
    zw, zc = apply(put(rw[keep]), put(rc[keep]))
    np.testing.assert_allclose(
        np.c_[logistic.to_numpy(zw), logistic.to_numpy(zc)], want[keep], rtol=1e-9, atol=1e-12
    )


def test_block_preconditioner_cuts_cg_steps(monkeypatch):
    """On a steep spectrum the block preconditioner reaches scikit-learn's solution in far fewer CG
    steps than the diagonal alone (counted per problem, not timed)."""
    Z, Y, counts = steep_problems(300, 299, spread=1.0)
    S = logistic.balanced_weights(Y, counts)
    made, applied = logistic._preconditioner, []

    def counting(*args):
        apply, select = made(*args)
        return (lambda rw, rc: applied.append(len(rw)) or apply(rw, rc)), select

    monkeypatch.setattr(logistic, "_preconditioner", counting)
    steps = {}
    for with_block in (True, False):
        if not with_block:
            monkeypatch.setattr(logistic, "_block_columns", lambda s2, n: None)
        applied.clear()
        W, c = logistic.fit(Z, Y, S, 1.0, tol=1e-10)
        steps[with_block] = sum(applied)  # problem-steps of CG, one per problem per preconditioning
        for b in range(len(Y)):
            keep = counts[b] > 0
            ref = LogisticRegression(C=1.0, class_weight="balanced", max_iter=10_000, tol=1e-10)
            ref.fit(Z[keep], Y[b, keep], sample_weight=S[b, keep])
            np.testing.assert_allclose(
                logistic.predict_proba(Z, W, c)[b], ref.predict_proba(Z)[:, 1], atol=2e-5
            )
    assert steps[True] * 1.5 < steps[False], steps  # 98 vs 174


@pytest.mark.parametrize("device", PATHS, ids=PATH_IDS)
def test_fit_meets_its_tolerance_where_rounding_hides_the_decrease(device):
    """Near the optimum a Newton step promises a decrease below the rounding of the objective; the line
    search lets such a step through, so every problem ends within the gradient tolerance (without the
    slack one problem here stalled 100 Newton steps at |g| ~ 9e-8, its step halved to nothing)."""
    Z, Y, counts = steep_problems(spread=2.0)
    S, C, tol = logistic.balanced_weights(Y, counts), 1.0, 1e-10
    W, c = logistic.fit(Z, Y, S, C, tol=tol, device=device)
    gz = S * (logistic.predict_proba(Z, W, c) - Y)
    gmax = np.maximum(np.abs(W + C * gz @ Z).max(1), np.abs(C * gz.sum(1)))
    assert np.all(gmax <= tol * (1 + C * S.sum(1))), gmax


@pytest.mark.parametrize("device", PATHS, ids=PATH_IDS)
def test_a_fit_started_nearby_reaches_the_same_optimum_sooner(device, monkeypatch):
    """Group-bootstrap draws of a probe's design (more columns than rows, as SAE features) started at
    the fit of all rows, as the probe's refitted bootstrap starts them: the same fits as from the
    default start, in fewer Newton steps (counted per problem); a draw that cannot be fitted still
    keeps W = 0, c = 0."""
    rng = np.random.default_rng(6)
    X, y = rng.standard_normal((120, 400)), rng.integers(0, 2, 120)
    y[:2] = [0, 1]
    X[:, :5] += 0.5 * y[:, None]
    Z = probes.standardised_design(X, np.arange(120), np.arange(0))[0]
    counts = group_bootstrap_weights(np.arange(120) // 5, 20, np.random.default_rng(0)).astype(float)
    counts[3] = 0  # a draw of nothing
    Y = np.broadcast_to(y, counts.shape)
    S = logistic.balanced_weights(Y, counts)
    full = logistic.fit(Z, y[None], logistic.balanced_weights(y), device=device)
    steps = newton_steps(monkeypatch)
    cold = logistic.fit(Z, Y, S, tol=1e-10, device=device)
    n_cold = sum(steps)
    warm = logistic.fit(Z, Y, S, tol=1e-10, device=device, start=full)
    assert sum(steps) - n_cold < 0.8 * n_cold, (sum(steps) - n_cold, n_cold)
    np.testing.assert_allclose(warm[0], cold[0], atol=1e-7)
    np.testing.assert_allclose(warm[1], cold[1], atol=1e-7)
    assert not warm[0][3].any() and warm[1][3] == 0


def test_inner_solves_scale_with_the_problem(monkeypatch):
    """The CG solves' tolerance follows the gradient relative to its scale (1 + C x total weight), so
    Newton converges quadratically once that is small: 33 problem-steps here, where a tolerance on the
    gradient's raw norm (which starts ~ the row count) took 44."""
    Z, Y, counts = steep_problems(300, 299, spread=4.0)
    steps = newton_steps(monkeypatch)
    logistic.fit(Z, Y, logistic.balanced_weights(Y, counts), 1.0)
    assert sum(steps) <= 36, sum(steps)


@pytest.mark.parametrize("shape", [(40, 8), (40, 120)], ids=["d<n", "d>n"])
def test_design_on_the_device_and_in_blocks(shape, monkeypatch):
    """The probes' SVD coordinates from the torch path, in blocks of a few rows or columns, span the
    same space as numpy's (signs and order of directions may differ): same Gram matrices."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, shape[1]))
    tr, te = np.arange(40), np.arange(40, 60)
    A, B = probes.standardised_design(X, tr, te)
    monkeypatch.setattr(logistic, "DEVICE", "cpu")
    monkeypatch.setattr(logistic, "MEMORY_BUDGET", 8 * 200 * 7)  # blocks of 7 rows or columns
    A1, B1 = probes.standardised_design(X, tr, te)
    assert A1.shape == A.shape and B1.shape == B.shape
    np.testing.assert_allclose(A1 @ A1.T, A @ A.T, atol=1e-9)
    np.testing.assert_allclose(B1 @ A1.T, B @ A.T, atol=1e-9)
    np.testing.assert_allclose(A1.T @ A1, np.diag(np.diag(A1.T @ A1)), atol=1e-8)  # diagonal


@pytest.mark.parametrize("design", null_worlds.DESIGNS)
def test_probes_and_feature_tests_agree_on_the_calibration_worlds(design, monkeypatch):
    """A whole probe (grouped CV, permutations, refitted bootstrap) and a feature table on a null world
    and on one with a planted signal give the same numbers on both paths: p-values and CIs exactly
    unless a refit lands on a tie, out-of-fold probabilities to 1e-6 (the solver's tolerance moves
    them ~1e-5)."""
    for w, signal in enumerate((0.0, 1.5)):
        W = null_worlds.dense_world(
            np.random.default_rng([7, w]), design, signal=signal, **null_worlds.PROBE_SIZE
        )
        S = null_worlds.sparse_world(
            np.random.default_rng([8, w]), design, n_groups=24, d=60, signal=signal, n_signal=3
        )
        runs = []
        for device in PATHS:
            monkeypatch.setattr(logistic, "DEVICE", device)
            r = probes.probe(W.X, W.y, W.groups, prompts=W.prompts, n_permutations=19, n_bootstrap=20, seed=w)
            f = features.select_and_report(S.X, S.y, S.groups, prompts=S.prompts, k=5, n_permutations=199)
            runs.append((r, f))
        (a, fa), (b, fb) = runs
        np.testing.assert_allclose(b.oof_proba, a.oof_proba, atol=1e-6)
        assert [b.p_value, *b.ba_ci, *b.auroc_ci] == pytest.approx(
            [a.p_value, *a.ba_ci, *a.auroc_ci], abs=1e-9
        )
        np.testing.assert_allclose(b.boot_auroc, a.boot_auroc, atol=1e-9)
        assert [(r["feature"], r["p_value"]) for r in fb] == [(r["feature"], r["p_value"]) for r in fa]
        np.testing.assert_allclose([r["cohens_d"] for r in fb], [r["cohens_d"] for r in fa], rtol=1e-12)
