"""Krylov solvers against scipy.sparse.linalg (float64), batching, status and errors."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch

try:  # a test dependency; where it is missing (or cannot load) only the property test is skipped
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

import solvers
from solvers import SolveResult, bicgstab, cg, gmres, jacobi, lsmr, minres

F64 = torch.float64
from conftest import FakeGraphs, requires_cuda  # noqa: E402



# ----------------------------------------------------------------- problems
def _rng(seed=0):
    return np.random.default_rng(seed)


def spd(n, cond, seed=0):
    """A random SPD matrix with eigenvalues geometrically spaced in [1, cond]."""
    Q, _ = np.linalg.qr(_rng(seed).standard_normal((n, n)))
    return (Q * np.geomspace(1.0, cond, n)) @ Q.T


def sym_indefinite(n, seed=0):
    Q, _ = np.linalg.qr(_rng(seed).standard_normal((n, n)))
    ev = np.concatenate([-np.geomspace(1, 100, n // 2), np.geomspace(1, 100, n - n // 2)])
    return (Q * ev) @ Q.T


def nonsym(n, seed=0):
    return _rng(seed).standard_normal((n, n)) / np.sqrt(n) + 2.0 * np.eye(n)


def t(a):
    return torch.as_tensor(a, dtype=F64)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def close_count(ours, theirs):
    """Iteration counts within 10% or 2 of scipy's."""
    assert abs(ours - theirs) <= max(2, 0.1 * theirs), (ours, theirs)


def scipy_count(fn, *args, **kwargs):
    calls = []
    x, info = fn(*args, callback=lambda *_: calls.append(1), **kwargs)
    return x, info, len(calls)


def first_reaching(A, b, rtol, fn, **kwargs):
    """Scipy's first iteration whose true residual meets ||r|| <= rtol ||b||."""
    hist = []
    fn(A, b, rtol=1e-15, callback=lambda x: hist.append(np.linalg.norm(b - A @ x)), **kwargs)
    return next(i + 1 for i, r in enumerate(hist) if r <= rtol * np.linalg.norm(b))


class Counting:
    """A dense operator that counts its applications (k columns count once)."""

    def __init__(self, A, symmetric=False):
        self.A = A
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device
        self.is_symmetric = symmetric
        self.calls = 0

    def __matmul__(self, V):
        self.calls += 1
        return self.A @ V

    @property
    def T(self):
        return Counting(self.A.T, self.is_symmetric)


# ------------------------------------------------------------------- scipy
@pytest.mark.parametrize("cond", [10.0, 1e3, 1e5])
def test_cg_matches_scipy(cond):
    A, b = spd(120, cond), _rng(1).standard_normal(120)
    xs, info, its = scipy_count(sla.cg, A, b, rtol=1e-10, maxiter=5000)
    res = cg(t(A), t(b), rtol=1e-10, maxiter=5000)
    assert res.converged and info == 0
    close_count(res.n_iter, its)
    assert rel(res.x, xs) < 1e-8
    assert rel(res.x, np.linalg.solve(A, b)) < 1e-9 * cond
    assert float(res.residual_norm) <= 1e-10 * np.linalg.norm(b)


def test_cg_x0_and_atol_match_scipy():
    A, b = spd(80, 1e3), _rng(2).standard_normal(80)
    x0 = _rng(3).standard_normal(80)
    xs, _, its = scipy_count(sla.cg, A, b, x0=x0, rtol=0.0, atol=1e-8)
    res = cg(t(A), t(b), t(x0), rtol=0.0, atol=1e-8)
    close_count(res.n_iter, its)
    assert rel(res.x, xs) < 1e-8


def test_cg_preconditioned_matches_scipy():
    A = spd(100, 1e2) * np.geomspace(1, 1e3, 100)[:, None] * np.geomspace(1, 1e3, 100)[None, :]
    b = _rng(4).standard_normal(100)
    Minv = np.diag(1 / np.diag(A))
    xs, _, its = scipy_count(sla.cg, A, b, rtol=1e-10, M=Minv, maxiter=5000)
    res = cg(t(A), t(b), rtol=1e-10, M=jacobi(), maxiter=5000)
    close_count(res.n_iter, its)
    assert rel(res.x, xs) < 1e-8


def test_minres_matches_scipy_indefinite():
    A, b = sym_indefinite(120), _rng(5).standard_normal(120)
    res = minres(t(A), t(b), rtol=1e-10)
    assert res.converged
    close_count(res.n_iter, first_reaching(A, b, 1e-10, sla.minres, maxiter=5000))
    assert rel(res.x, np.linalg.solve(A, b)) < 1e-8
    xs, _ = sla.minres(A, b, rtol=1e-13, maxiter=5000)
    assert rel(res.x, xs) < 1e-8


def test_minres_shift_matches_scipy():
    A, b = spd(80, 1e2), _rng(6).standard_normal(80)
    shift = 3.5  # inside the spectrum: A - shift I is indefinite
    res = minres(t(A), t(b), shift=shift, rtol=1e-11)
    xs, _ = sla.minres(A, b, shift=shift, rtol=1e-13, maxiter=5000)
    exact = np.linalg.solve(A - shift * np.eye(80), b)
    assert res.converged
    assert rel(res.x, exact) < 1e-8 and rel(xs, exact) < 1e-8


def test_minres_preconditioned():
    A = sym_indefinite(80) + np.diag(np.geomspace(1, 1e3, 80))
    b = _rng(7).standard_normal(80)
    res = minres(t(A), t(b), rtol=1e-12, M=torch.diag(t(1 / np.abs(np.diag(A)))))
    assert res.converged and rel(res.x, np.linalg.solve(A, b)) < 1e-8


@pytest.mark.parametrize("restart", [10, 20, 120])
def test_gmres_matches_scipy(restart):
    A, b = nonsym(120), _rng(8).standard_normal(120)
    calls = []
    xs, info = sla.gmres(A, b, rtol=1e-10, restart=restart, maxiter=1000, callback=lambda r: calls.append(r),
                         callback_type="pr_norm")
    res = gmres(t(A), t(b), rtol=1e-10, restart=restart)
    assert res.converged and info == 0
    close_count(res.n_iter, len(calls))
    assert rel(res.x, xs) < 1e-8
    assert rel(res.x, np.linalg.solve(A, b)) < 1e-8


def test_gmres_restart_cycles_on_hard_problem():
    A = nonsym(150, seed=9) - 0.9 * np.eye(150)  # eigenvalues near the origin: many restarts
    b = _rng(10).standard_normal(150)
    calls = []
    xs, info = sla.gmres(A, b, rtol=1e-8, restart=10, maxiter=200, callback=lambda r: calls.append(r),
                         callback_type="pr_norm")
    res = gmres(t(A), t(b), rtol=1e-8, restart=10, maxiter=2000)
    assert info == 0 and res.converged and len(calls) > 100
    close_count(res.n_iter, len(calls))


def test_gmres_preconditioned_right():
    A = nonsym(100) * np.geomspace(1, 1e3, 100)[:, None]
    b = _rng(11).standard_normal(100)
    plain = gmres(t(A), t(b), rtol=1e-10, restart=100)
    pre = gmres(t(A), t(b), rtol=1e-10, restart=100, M=jacobi())
    assert pre.converged and pre.n_iter < plain.n_iter
    # right preconditioning: the tested residual is the true one
    assert np.linalg.norm(b - A @ pre.x.numpy()) <= 1.01e-10 * np.linalg.norm(b)


def test_bicgstab_matches_scipy():
    A, b = nonsym(120), _rng(12).standard_normal(120)
    xs, info, its = scipy_count(sla.bicgstab, A, b, rtol=1e-10, maxiter=1000)
    res = bicgstab(t(A), t(b), rtol=1e-10)
    assert res.converged and info == 0
    close_count(res.n_iter, its)
    assert rel(res.x, xs) < 1e-8


@pytest.mark.parametrize("shape", [(150, 60), (60, 150)])
@pytest.mark.parametrize("damp", [0.0, 0.7])
def test_lsmr_matches_scipy(shape, damp):
    rng = _rng(13)
    A, b = rng.standard_normal(shape), rng.standard_normal(shape[0])
    xs, istop, itn, normr = sla.lsmr(A, b, damp=damp, atol=1e-12, btol=1e-12, maxiter=1000)[:4]
    res = lsmr(t(A), t(b), damp=damp, atol=1e-12, btol=1e-12, maxiter=1000)
    assert res.converged
    close_count(res.n_iter, itn)
    assert rel(res.x, xs) < 1e-8
    exact = np.linalg.lstsq(np.vstack([A, damp * np.eye(shape[1])]),
                            np.concatenate([b, np.zeros(shape[1])]), rcond=None)[0]
    assert rel(res.x, exact) < 1e-8
    assert abs(float(res.residual_norm) - normr) <= 1e-8 * max(1.0, normr)


def test_lsmr_x0_matches_scipy():
    rng = _rng(14)
    A, b, x0 = rng.standard_normal((90, 40)), rng.standard_normal(90), rng.standard_normal(40)
    xs, _, itn = sla.lsmr(A, b, x0=x0, atol=1e-12, btol=1e-12)[:3]
    res = lsmr(t(A), t(b), t(x0), atol=1e-12, btol=1e-12)
    close_count(res.n_iter, itn)
    assert rel(res.x, xs) < 1e-8


def test_lsmr_conlim_status():
    A = np.diag(np.geomspace(1, 1e-10, 30)) @ _rng(15).standard_normal((30, 30))
    b = _rng(16).standard_normal(30)
    res = lsmr(t(A), t(b), conlim=1e3, atol=0.0, btol=0.0)
    assert not res.converged
    assert "conlim" in res.status and "damp" in res.status


# ------------------------------------------------------------------ batching
METHODS = {
    "cg": (cg, lambda n, seed=0: spd(n, 1e2, seed)),
    "minres": (minres, sym_indefinite),
    "gmres": (gmres, nonsym),
    "bicgstab": (bicgstab, nonsym),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_batched_equals_columnwise(name):
    fn, make = METHODS[name]
    n = 60
    A = t(make(n))
    B = t(_rng(17).standard_normal((n, 4)))
    B[:, 2] = 0.0  # a zero column converges at once, without NaN
    B[:, 3] = A @ B[:, 1]  # a different scale and history
    op = Counting(A)
    res = fn(op, B, rtol=1e-10)
    assert op.calls <= res.n_iter * (2 if name == "bicgstab" else 1) + 2 + res.n_iter // 5
    assert res.column_converged.shape == (4,) and res.column_iterations.shape == (4,)
    assert res.converged and torch.isfinite(res.x).all()
    for j in range(4):
        col = fn(A, B[:, j], rtol=1e-10)
        # GEMM and GEMV round differently, so counts may differ by an iteration or two.
        close_count(int(res.column_iterations[j]), col.n_iter)
        if j != 2:
            assert rel(res.x[:, j], col.x) < 1e-8
        assert float(res.residual_norm[j]) <= 1e-10 * float(B[:, j].norm())
    assert torch.all(res.x[:, 2] == 0)


def test_lsmr_batched_equals_columnwise():
    rng = _rng(18)
    A, B = t(rng.standard_normal((70, 30))), t(rng.standard_normal((70, 3)))
    B[:, 1] = 0.0
    res = lsmr(A, B, damp=0.1, atol=1e-10, btol=1e-10)
    for j in range(3):
        col = lsmr(A, B[:, j], damp=0.1, atol=1e-10, btol=1e-10)
        close_count(int(res.column_iterations[j]), col.n_iter)
        torch.testing.assert_close(res.x[:, j], col.x, rtol=1e-8, atol=1e-12)


def _property_batched_equals_columnwise(n, k, name, seed):
    fn, make = METHODS[name]
    A = t(make(n, seed=seed))
    B = t(_rng(seed + 1).standard_normal((n, k)))
    res = fn(A, B, rtol=1e-9, maxiter=20 * n)
    for j in range(k):
        col = fn(A, B[:, j], rtol=1e-9, maxiter=20 * n)
        assert bool(res.column_converged[j]) == col.converged
        torch.testing.assert_close(res.x[:, j], col.x, rtol=1e-7, atol=1e-10)


if given is not None:
    test_property_batched_equals_columnwise = settings(max_examples=15, deadline=None)(
        given(n=st.integers(2, 24), k=st.integers(1, 4), name=st.sampled_from(sorted(METHODS)),
              seed=st.integers(0, 10_000))(_property_batched_equals_columnwise))
else:  # pragma: no cover
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_batched_equals_columnwise():
        pass


@pytest.mark.parametrize("name", list(METHODS))
def test_check_every_does_not_change_the_result(name):
    fn, make = METHODS[name]
    A, b = t(make(50)), t(_rng(19).standard_normal((50, 2)))
    one = fn(A, b, rtol=1e-9, check_every=1)
    seven = fn(A, b, rtol=1e-9, check_every=7)
    assert one.n_iter == seven.n_iter
    torch.testing.assert_close(one.x, seven.x, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(METHODS) + ["lsmr"])
def test_callback_sees_each_iterate(name):
    fn, make = (lsmr, nonsym) if name == "lsmr" else METHODS[name]
    A, b = t(make(30)), t(_rng(20).standard_normal(30))
    seen = []
    kwargs = dict(atol=1e-10, btol=1e-10) if name == "lsmr" else dict(rtol=1e-10)
    res = fn(A, b, callback=lambda x: seen.append(x.clone()), **kwargs)
    assert len(seen) >= res.n_iter and seen[0].shape == (30,)
    torch.testing.assert_close(seen[res.n_iter - 1], res.x)


# ----------------------------------------------------------- special cases
@pytest.mark.parametrize("fn", [cg, minres, gmres, bicgstab, lsmr])
def test_zero_rhs_gives_zero(fn):
    res = fn(t(spd(10, 10)), torch.zeros(10, dtype=F64))
    assert res.converged and res.n_iter == 0 and torch.all(res.x == 0)


@pytest.mark.parametrize("fn", [cg, minres, gmres, bicgstab])
def test_exact_x0_takes_no_iteration(fn):
    A = t(spd(10, 10))
    x = torch.randn(10, dtype=F64)
    res = fn(A, A @ x, x0=x, rtol=1e-8)
    assert res.converged and res.n_iter == 0
    torch.testing.assert_close(res.x, x)


def test_result_fields_and_repr():
    res = cg(t(spd(20, 10)), torch.ones(20, dtype=F64), rtol=1e-10)
    assert isinstance(res, SolveResult)
    assert isinstance(res.converged, bool) and isinstance(res.n_iter, int)
    assert res.residual_norm.shape == () and res.column_converged.shape == ()
    assert res.status.startswith("converged in")
    assert "converged=True" in repr(res)
    with pytest.raises(AttributeError):
        res.n_iter = 3  # frozen


def test_cg_nonconvergence_is_a_status():
    res = cg(t(spd(100, 1e4)), torch.ones(100, dtype=F64), maxiter=5, rtol=1e-8)
    assert not res.converged and res.n_iter == 5
    assert "maxiter=5 reached with relative residual" in res.status
    assert "> rtol=1.0e-08" in res.status and "neumann(3)" in res.status


def test_batched_nonconvergence_status_names_columns():
    A = t(spd(40, 1e4))
    B = torch.randn(40, 3, dtype=F64)
    B[:, 1] = A @ torch.ones(40, dtype=F64) * 0  # converges at once
    res = gmres(A, B, maxiter=4)
    assert not res.converged
    assert res.column_converged.tolist() == [False, True, False]
    assert res.status.startswith("2 of 3 right-hand sides did not converge; columns [0, 2]")
    assert "larger restart" in res.status


def test_cg_graph_cache_replays_later_solves():
    """A GraphCache keeps the first solve's captured iteration: later solves with the
    same A and M replay it on their own state (tolerance included), bitwise the eager loop."""
    A = t(spd(40, 1e3))
    M = jacobi()
    gen = torch.Generator().manual_seed(3)
    rhs = [torch.randn(40, dtype=F64, generator=gen) * scale for scale in (1.0, 1e3, 1e-2)]
    eager = [cg(A, b, M=M, rtol=1e-9, check_every=4) for b in rhs]
    limited = cg(A, rhs[0], M=M, rtol=1e-14, maxiter=7)
    graphs = FakeGraphs()
    cache = solvers.GraphCache(graphs=graphs)
    assert repr(cache) == "GraphCache(empty)"
    got = [cg(A, b, M=M, rtol=1e-9, check_every=4, graph=cache) for b in rhs]
    assert graphs.captures == 1 and graphs.replays > 0
    assert repr(cache) == "GraphCache(shape=(40,), dtype=torch.float64, device=cpu)"
    for e, r in zip(eager, got):
        assert r.converged and torch.equal(r.x, e.x) and r.n_iter == e.n_iter
    # The results do not alias the cache's buffers, which the next solve overwrote.
    assert torch.equal(got[0].x, eager[0].x) and got[0].x.data_ptr() != got[1].x.data_ptr()
    # An iteration limit is the host's business: the same graph serves it.
    short = cg(A, rhs[0], M=M, rtol=1e-14, maxiter=7, graph=cache)
    assert graphs.captures == 1 and short.n_iter == 7 and torch.equal(short.x, limited.x)
    # Another operator, or another right-hand-side shape, captures again and replaces the graph.
    A2 = A + torch.eye(40, dtype=F64)
    other = cg(A2, rhs[0], M=M, rtol=1e-9, graph=cache)
    assert graphs.captures == 2 and torch.equal(other.x, cg(A2, rhs[0], M=M, rtol=1e-9).x)
    B = torch.stack(rhs[:2], dim=1)
    block = cg(A2, B, M=M, rtol=1e-9, graph=cache)
    assert graphs.captures == 3 and torch.equal(block.x, cg(A2, B, M=M, rtol=1e-9).x)
    cache.clear()
    assert repr(cache) == "GraphCache(empty)"
    with pytest.raises(TypeError, match="graph must be a bool or a solvers.GraphCache, got str"):
        cg(A, rhs[0], graph="yes")


def test_graph_cache_takes_its_graph_machinery():
    """GraphCache(graphs=...) is how a loop gets another graph machinery; a callback keeps cg eager."""
    assert solvers.GraphCache().graphs is solvers.graphs.CUDA_GRAPHS
    assert not solvers.graphs.CUDA_GRAPHS.available(torch.device("cpu"))
    with pytest.raises(TypeError, match=r"GraphCache: graphs must have the methods available, side_stream, "
                                        r"synchronises, capture of solvers.graphs.CudaGraphs, got object without "
                                        r"available, side_stream, synchronises, capture"):
        solvers.GraphCache(graphs=object())
    A, b = t(spd(20, 1e2)), torch.randn(20, dtype=F64)
    graphs = FakeGraphs()
    seen = []
    res = cg(A, b, rtol=1e-9, graph=solvers.GraphCache(graphs=graphs), callback=seen.append)
    assert graphs.captures == 0 and len(seen) == res.n_iter and torch.equal(res.x, cg(A, b, rtol=1e-9).x)


def test_cg_on_indefinite_reports_not_positive_definite():
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=F64))
    res = cg(A, torch.ones(3, dtype=F64))
    assert not res.converged
    assert "A is not positive definite" in res.status and "use minres" in res.status
    assert torch.isfinite(res.x).all()


def test_minres_singular_inconsistent_gives_least_squares():
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=F64))
    res = minres(A, torch.ones(3, dtype=F64))
    assert not res.converged and "least-squares" in res.status
    torch.testing.assert_close(res.x[:2], torch.tensor([1.0, 0.5], dtype=F64))
    assert torch.isfinite(res.x).all()


def test_minres_singular_consistent_converges():
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0, 4.0], dtype=F64))
    res = minres(A, torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=F64), rtol=1e-12)
    assert res.converged
    torch.testing.assert_close(res.x, torch.tensor([1.0, 0.5, 0.0, 0.25], dtype=F64))


def test_bicgstab_breakdown_is_a_status():
    A = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    res = bicgstab(A, torch.tensor([1.0, 0.0], dtype=F64))
    assert not res.converged and "broke down" in res.status and "gmres" in res.status


@pytest.mark.parametrize("fn", [cg, minres, gmres, bicgstab])
def test_nonfinite_operator_is_a_status(fn):
    A = torch.eye(3, dtype=F64)
    A[0, 1] = float("nan")
    res = fn(A, torch.ones(3, dtype=F64))
    assert not res.converged and "NaN or inf" in res.status


@pytest.mark.parametrize("name", list(METHODS))
def test_float32(name):
    fn, make = METHODS[name]
    A = torch.as_tensor(make(40), dtype=torch.float32)
    b = torch.randn(40, 2)
    res = fn(A, b, rtol=1e-5)
    assert res.converged and res.x.dtype == torch.float32
    exact = torch.linalg.solve(A.double(), b.double())
    assert float((res.x.double() - exact).norm() / exact.norm()) < 1e-3


def test_lsmr_float32():
    A, b = torch.randn(50, 20), torch.randn(50)
    res = lsmr(A, b)
    exact = torch.linalg.lstsq(A.double(), b.double()[:, None]).solution[:, 0]
    assert res.converged and float((res.x.double() - exact).norm() / exact.norm()) < 1e-4


# --------------------------------------------------------------- operators
def test_accepts_numpy_scipy_and_operators():
    A = spd(30, 10)
    b = t(_rng(21).standard_normal(30))
    exact = np.linalg.solve(A, b.numpy())
    for obj in (A, sp.csr_matrix(A), sla.aslinearoperator(A)):
        assert rel(cg(obj, b, rtol=1e-12).x, exact) < 1e-9
    assert rel(cg(t(A).to_sparse(), b, rtol=1e-12).x, exact) < 1e-9


def test_accepts_otlinop_and_linear_operator():
    otlinop = pytest.importorskip("otlinop")
    from linear_operator.operators import DenseLinearOperator
    A = t(spd(30, 10))
    b = torch.randn(30, dtype=F64)
    exact = torch.linalg.solve(A, b)
    ops = (otlinop.Dense(A), otlinop.aslinearoperator(A),
           otlinop.Dense(A) + otlinop.Diag(torch.zeros(30, dtype=F64)), DenseLinearOperator(A))
    for op in ops:
        for fn in (cg, minres, gmres, bicgstab):
            torch.testing.assert_close(fn(op, b, rtol=1e-12).x, exact, rtol=1e-9, atol=1e-12)
    R = torch.randn(40, 30, dtype=F64)
    torch.testing.assert_close(lsmr(otlinop.Dense(R), R @ exact, atol=1e-12, btol=1e-12, maxiter=200).x, exact,
                               rtol=1e-8, atol=1e-10)


def test_callable_and_dense_preconditioners():
    A = t(spd(40, 1e3))
    b = torch.randn(40, dtype=F64)
    Ainv = torch.linalg.inv(A)
    seen = []

    def apply(r):
        seen.append(r.shape)
        return Ainv @ r

    for M in (Ainv, apply):
        res = cg(A, b, rtol=1e-10, M=M)
        assert res.converged and res.n_iter <= 2
    assert seen[0] == (40,)  # a 1-D b gives the callable 1-D vectors
    cg(A, torch.randn(40, 3, dtype=F64), M=apply)
    assert seen[-1] == (40, 3)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [cg, minres, gmres, bicgstab])
def test_nonsquare_rejected(fn):
    with pytest.raises(ValueError, match=rf"{fn.__name__}: A must be square, got shape \(3, 2\); use lsmr"):
        fn(torch.ones(3, 2, dtype=F64), torch.ones(3, dtype=F64))


@pytest.mark.parametrize("fn", [cg, minres, gmres, bicgstab, lsmr])
def test_argument_errors(fn):
    name = fn.__name__
    A, b = torch.eye(4, dtype=F64), torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=rf"{name}: b has shape \(3,\), expected \(4,\) or \(4, k\)"):
        fn(A, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=rf"{name}: x0 has shape \(4, 1\), expected \(4,\)"):
        fn(A, b, torch.ones(4, 1, dtype=F64))
    with pytest.raises(ValueError, match=rf"{name}: b contains NaN or inf"):
        fn(A, torch.tensor([1.0, float("inf"), 0.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match=rf"{name}: x0 contains NaN or inf"):
        fn(A, b, torch.full((4,), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match=rf"{name}: maxiter must be >= 1, got 0"):
        fn(A, b, maxiter=0)
    with pytest.raises(TypeError, match=rf"{name}: b has dtype torch.float32, but A has dtype torch.float64"):
        fn(A, torch.ones(4))
    with pytest.raises(TypeError, match=rf"{name}: b must be a torch.Tensor"):
        fn(A, np.ones(4))
    with pytest.raises(ValueError, match=rf"{name}: check_every must be a positive int"):
        fn(A, b, check_every=0)
    with pytest.raises(TypeError, match=rf"{name}: callback must be callable"):
        fn(A, b, callback=3)
    tol = "atol" if fn is lsmr else "rtol"
    with pytest.raises(ValueError, match=rf"{name}: {tol} must be a non-negative float \(inf stops at once\), got -1.0"):
        fn(A, b, **{tol: -1.0})


def test_more_argument_errors():
    A, b = torch.eye(4, dtype=F64), torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=r"cg: atol must be a non-negative float \(inf stops at once\), got -1e-08"):
        cg(A, b, atol=-1e-8)
    with pytest.raises(ValueError, match=r"gmres: restart must be a positive int, got 0"):
        gmres(A, b, restart=0)
    with pytest.raises(ValueError, match=r"lsmr: damp must be a non-negative float, got -1"):
        lsmr(A, b, damp=-1)
    with pytest.raises(ValueError, match=r"cg: M has shape \(3, 3\), expected \(4, 4\) like A"):
        cg(A, b, M=torch.eye(3, dtype=F64))
    with pytest.raises(TypeError, match=r"cg: M must be an operator, a 2-D tensor, a callable"):
        cg(A, b, M=torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match=r"cg: A must be a 2-D matrix or an operator, got a tensor of shape \(4,\)"):
        cg(torch.ones(4, dtype=F64), b)
    with pytest.raises(TypeError, match=r"minres: shift must be a real number"):
        minres(A, b, shift="1")
    with pytest.raises(TypeError, match=r"cg: A could not be used as a linear operator"):
        cg(object(), b)


# ------------------------------------------------------- scipy's semantics
ALL = [cg, minres, gmres, bicgstab, lsmr]


def _system(fn, n=12, dtype=F64):
    """A system fn solves, as tensors of ``dtype``."""
    if fn is lsmr:
        return torch.as_tensor(nonsym(n, 7), dtype=dtype)
    make = {cg: lambda: spd(n, 1e2, 7), minres: lambda: sym_indefinite(n, 7)}.get(fn, lambda: nonsym(n, 7))
    return torch.as_tensor(make(), dtype=dtype)


@pytest.mark.parametrize("fn", ALL)
def test_zero_rhs_ignores_x0(fn):
    # scipy returns x = 0 at once for b = 0, whatever x0: so do the solvers, column by column.
    A = _system(fn)
    res = fn(A, torch.zeros(12, dtype=F64), torch.ones(12, dtype=F64))
    assert res.converged and res.n_iter == 0 and torch.all(res.x == 0) and float(res.residual_norm) == 0
    B = torch.stack([torch.zeros(12, dtype=F64), torch.linspace(1, 2, 12, dtype=F64)], dim=1)
    X0 = torch.ones(12, 2, dtype=F64)
    kw = dict(atol=1e-10, btol=1e-10) if fn is lsmr else dict(rtol=1e-10, atol=0.0)
    res = fn(A, B, X0, maxiter=200, **kw)
    assert res.converged and torch.all(res.x[:, 0] == 0) and int(res.column_iterations[0]) == 0
    assert int(res.column_iterations[1]) > 0
    torch.testing.assert_close(res.x[:, 1], torch.linalg.solve(A, B[:, 1]), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("fn", ALL)
def test_infinite_tolerances_stop_at_once(fn):
    A, b = _system(fn), torch.linspace(-1, 1, 12, dtype=F64)
    x0 = torch.full((12,), 0.5, dtype=F64)
    names = ("atol", "btol") if fn is lsmr else ("rtol", "atol")
    for name in names:
        for start in (None, x0):
            res = fn(A, b, start, **{name: float("inf")})
            assert res.converged and res.n_iter == 0, (name, res.status)
            torch.testing.assert_close(res.x, torch.zeros(12, dtype=F64) if start is None else x0)
    # rtol * ||b|| = inf * 0 is no NaN: a zero column still stops at once, with x = 0.
    B = torch.stack([b, torch.zeros(12, dtype=F64)], dim=1)
    res = fn(A, B, torch.ones(12, 2, dtype=F64), **{names[0]: float("inf")})
    assert res.converged and res.n_iter == 0 and torch.all(res.x[:, 1] == 0)


@pytest.mark.parametrize("fn", ALL)
def test_invalid_tolerances(fn):
    A, b = _system(fn), torch.ones(12, dtype=F64)
    name = fn.__name__
    for tol in (("atol", "btol") if fn is lsmr else ("rtol", "atol")):
        # scipy refuses atol=None / 'legacy' / -1 with ValueError (test_invalid_atol): so does every solver.
        for bad, shown in ((-1, "-1.0"), (float("nan"), "nan"), (None, "None"), ("legacy", "'legacy'"),
                           ("1e-5", "'1e-5'")):
            with pytest.raises(ValueError, match=rf"{name}: {tol} must be a non-negative float.*got {shown}"):
                fn(A, b, **{tol: bad})
        for bad in ([1e-5], True, 1j):
            with pytest.raises(TypeError, match=rf"{name}: {tol} must be a non-negative float, got"):
                fn(A, b, **{tol: bad})
    ok = fn(A, b, **{"atol": np.float32(1e-3)})  # NumPy scalars are numbers
    assert ok.converged


@pytest.mark.parametrize("case", ["compatible", "overdetermined", "damped", "underdetermined", "x0"])
def test_lsmr_estimates_match_scipy(case):
    # (scipy's own TestLSMRReturns, on its bidiagonal matrix, runs in test_scipy_isolve_suite.py: there the
    # iterates are rounding-sensitive, and ours and scipy's each match their own x, not each other's.)
    rng = _rng(11)
    kw, x0 = dict(atol=1e-8, btol=1e-8, maxiter=200), None
    if case == "compatible":
        A = rng.standard_normal((30, 10))
        b = A @ np.arange(10, 0, -1.0)
    elif case == "overdetermined":
        A, b = rng.standard_normal((30, 10)), rng.standard_normal(30)
    elif case == "damped":
        A, b = rng.standard_normal((30, 10)), rng.standard_normal(30)
        kw["damp"] = 0.5
    elif case == "underdetermined":
        A, b = rng.standard_normal((8, 20)), rng.standard_normal(8)
    else:
        A, b, x0 = rng.standard_normal((25, 12)), rng.standard_normal(25), rng.standard_normal(12)
    x, istop, itn, normr, normar, normA, condA, normx = sla.lsmr(A, b, x0=x0, **kw)
    res = lsmr(t(A), t(b), None if x0 is None else t(x0), **kw)
    assert res.n_iter == itn and res.converged == (istop in (1, 2, 4, 5))
    assert rel(res.x, x) < 1e-8
    e = {k: float(v) for k, v in res.extras.items()}
    assert set(e) == {"normr", "normar", "normA", "condA", "normx"}
    np.testing.assert_allclose([e["normA"], e["condA"], e["normx"]], [normA, condA, normx], rtol=1e-8)
    # ||r|| and ||A^T r|| may be at rounding level: compare them on the scale of the stopping tests.
    bnorm = np.linalg.norm(b)
    assert abs(e["normr"] - normr) <= 1e-10 * bnorm
    assert abs(e["normar"] - normar) <= 1e-10 * normA * bnorm
    assert float(res.residual_norm) == e["normr"]
    # The estimates are those of the returned x.
    r = b - A @ res.x.numpy()
    if "damp" not in kw:
        assert abs(e["normr"] - np.linalg.norm(r)) <= 1e-6 * bnorm
        assert abs(e["normar"] - np.linalg.norm(A.T @ r)) <= 1e-6 * normA * bnorm


def test_lsmr_estimates_per_column():
    rng = _rng(12)
    A, B = t(rng.standard_normal((30, 10))), t(rng.standard_normal((30, 3)))
    res = lsmr(A, B, atol=1e-10, btol=1e-10)
    for j in range(3):
        one = lsmr(A, B[:, j], atol=1e-10, btol=1e-10)
        for name, value in res.extras.items():
            assert value.shape == (3,)
            torch.testing.assert_close(value[j], one.extras[name], rtol=1e-9, atol=1e-12)


def test_lsmr_scalar_b():
    # scipy's testScalarB: one equation, a Python number or a 0-d tensor as b.
    A = torch.tensor([[1.0, 2.0]], dtype=F64)
    for b in (3.0, 3, torch.tensor(3.0, dtype=F64)):
        res = lsmr(A, b)
        assert res.converged and res.x.shape == (2,)
        torch.testing.assert_close(A @ res.x, torch.tensor([3.0], dtype=F64))
    res = lsmr(A, 3 + 1j)
    assert res.x.dtype == torch.complex128
    torch.testing.assert_close(A.to(torch.complex128) @ res.x, torch.tensor([3 + 1j], dtype=torch.complex128))
    with pytest.raises(TypeError, match=r"lsmr: b must be a torch.Tensor of shape \(2,\)"):
        lsmr(torch.eye(2, dtype=F64), 3.0)
    with pytest.raises(TypeError, match=r"cg: b must be a torch.Tensor"):
        cg(torch.eye(1, dtype=F64), 3.0)


# ------------------------------------------------------------------ complex
C128, C64 = torch.complex128, torch.complex64


def _crandn(*shape, seed=0, dtype=C128):
    g = np.random.default_rng(seed)
    return torch.as_tensor(g.standard_normal(shape) + 1j * g.standard_normal(shape), dtype=dtype)


def _hermitian_pd(n, cond, seed=0, dtype=C128):
    Q, _ = torch.linalg.qr(_crandn(n, n, seed=seed))
    return ((Q * torch.as_tensor(np.geomspace(1, cond, n))) @ Q.mH).to(dtype)


def _hermitian_indefinite(n, seed=0, dtype=C128):
    Q, _ = torch.linalg.qr(_crandn(n, n, seed=seed))
    ev = np.concatenate([-np.geomspace(1, 50, n // 2), np.geomspace(1, 50, n - n // 2)])
    return ((Q * torch.as_tensor(ev)) @ Q.mH).to(dtype)


def _complex_general(n, seed=0, dtype=C128):
    return (_crandn(n, n, seed=seed) / np.sqrt(2 * n) + 2 * torch.eye(n, dtype=C128)).to(dtype)


def _rtol(dtype):
    return 1e-10 if dtype == C128 else 1e-5


def _close(x, A, b, dtype):
    ref = torch.linalg.solve(A.to(C128), b.to(C128))
    tol = 1e-8 if dtype == C128 else 2e-3
    assert float(torch.linalg.vector_norm(x.to(C128) - ref) / torch.linalg.vector_norm(ref)) < tol


@pytest.mark.parametrize("dtype", [C128, C64])
@pytest.mark.parametrize("precond", [None, "jacobi", "neumann"])
def test_complex_hermitian_cg(dtype, precond):
    A = _hermitian_pd(40, 1e2, seed=1, dtype=dtype)
    A = A * torch.as_tensor(np.geomspace(1, 10, 40)).sqrt()[:, None] * torch.as_tensor(np.geomspace(1, 10, 40)).sqrt()
    A = ((A + A.mH) / 2).to(dtype)
    b = _crandn(40, seed=2, dtype=dtype)
    M = {None: None, "jacobi": jacobi(), "neumann": solvers.neumann(2)}[precond]
    res = cg(A, b, rtol=_rtol(dtype), M=M, maxiter=500)
    assert res.converged and res.x.dtype == dtype and res.residual_norm.dtype == dtype.to_real()
    _close(res.x, A, b, dtype)
    # The same arithmetic as scipy's complex cg (np.vdot), to rounding.
    if dtype == C128 and precond is None:
        xs, info = sla.cg(A.numpy(), b.numpy(), rtol=1e-10, maxiter=500)
        assert info == 0 and rel(res.x.numpy(), xs) < 1e-8


@pytest.mark.parametrize("dtype", [C128, C64])
@pytest.mark.parametrize("precond", [None, "jacobi"])
def test_complex_hermitian_minres(dtype, precond):
    # scipy's minres is real-only (it skips its complex cases); MINRES on a Hermitian A is real Lanczos.
    A = _hermitian_indefinite(40, seed=3, dtype=dtype)
    b = _crandn(40, seed=4, dtype=dtype)
    M = None
    if precond == "jacobi":  # an SPD preconditioner for an indefinite A: |diag|^-1
        M = torch.diag(1 / A.diagonal().abs()).to(dtype)
    res = minres(A, b, rtol=_rtol(dtype), M=M, maxiter=1000)
    assert res.converged and res.x.dtype == dtype
    _close(res.x, A, b, dtype)


@pytest.mark.parametrize("dtype", [C128, C64])
@pytest.mark.parametrize("name", ["gmres", "bicgstab"])
def test_complex_general_gmres_bicgstab(dtype, name):
    fn = {"gmres": gmres, "bicgstab": bicgstab}[name]
    A = _complex_general(50, seed=5, dtype=dtype)
    B = _crandn(50, 3, seed=6, dtype=dtype)
    for M in (None, jacobi()):
        res = fn(A, B, rtol=_rtol(dtype), M=M, maxiter=500)
        assert res.converged and res.x.dtype == dtype, res.status
        for j in range(3):
            _close(res.x[:, j], A, B[:, j], dtype)
    if dtype == C128:  # one column: scipy's complex iteration count, to rounding
        calls = []
        xs, info = getattr(sla, name)(A.numpy(), B[:, 0].numpy(), rtol=1e-10, callback=lambda x: calls.append(1),
                                      **({"callback_type": "x", "restart": 50} if name == "gmres" else {}))
        res = fn(A, B[:, 0], rtol=1e-10, **({"restart": 50} if name == "gmres" else {}))
        assert info == 0 and rel(res.x.numpy(), xs) < 1e-8
        if name == "bicgstab":
            close_count(res.n_iter, len(calls))


@pytest.mark.parametrize("dtype", [C128, C64])
def test_complex_lsmr(dtype):
    A = _crandn(40, 15, seed=7, dtype=dtype)
    b = _crandn(40, seed=8, dtype=dtype)
    res = lsmr(A, b, atol=1e-12, btol=1e-12, maxiter=200)
    ref = torch.linalg.lstsq(A.to(C128), b.to(C128).unsqueeze(1)).solution[:, 0]
    tol = 1e-8 if dtype == C128 else 1e-3
    assert res.x.dtype == dtype
    assert float(torch.linalg.vector_norm(res.x.to(C128) - ref) / torch.linalg.vector_norm(ref)) < tol
    if dtype == C128:
        x, istop, itn, normr, normar, normA, condA, normx = sla.lsmr(A.numpy(), b.numpy(), atol=1e-12, btol=1e-12,
                                                                    maxiter=200)
        assert abs(res.n_iter - itn) <= 1 and rel(res.x.numpy(), x) < 1e-8
        np.testing.assert_allclose(float(res.extras["normr"]), normr, rtol=1e-8)


@pytest.mark.parametrize("fn", ALL)
def test_real_operator_with_complex_rhs(fn):
    # scipy's promotion: a real A with a complex b (or x0) is a complex solve; A sees real vectors only.
    A = _system(fn, 20)
    seen = []

    class Real:
        shape, dtype, device = tuple(A.shape), A.dtype, A.device
        is_symmetric = fn in (cg, minres)

        def __matmul__(self, V):
            seen.append(V.dtype)
            return A @ V

        @property
        def T(self):
            return A.T

    b = _crandn(20, seed=9)
    kw = dict(atol=1e-12, btol=1e-12, maxiter=100) if fn is lsmr else dict(rtol=1e-11, maxiter=500)
    res = fn(Real(), b, **kw)
    assert res.converged and res.x.dtype == C128 and set(seen) == {F64}
    _close(res.x, A, b, C128)
    # A complex x0 alone makes the solve complex too (scipy's lsmr: result_type(A, b, x0)).
    res = fn(A, b.real.clone(), torch.full((20,), 1j, dtype=C128), **kw)
    assert res.x.dtype == C128 and res.converged
    _close(res.x, A, b.real.to(C128), C128)


def test_complex_dtype_errors():
    A = _hermitian_pd(6, 10)
    with pytest.raises(TypeError, match=r"cg: b has dtype torch.complex64, but A has dtype torch.complex128; "
                                        r"convert with b.to\(torch.complex128\)"):
        cg(A, torch.ones(6, dtype=C64))
    with pytest.raises(TypeError, match=r"cg: b has dtype torch.float32, but A has dtype torch.complex128"):
        cg(A, torch.ones(6))
    with pytest.raises(TypeError, match=r"gmres: b has dtype torch.complex64, but A has dtype torch.float64; "
                                        r"convert with b.to\(torch.complex128\)"):
        gmres(torch.eye(6, dtype=F64), torch.ones(6, dtype=C64))
    with pytest.raises(TypeError, match=r"cg: x0 has dtype torch.complex64, but A has dtype torch.complex128"):
        cg(A, torch.ones(6, dtype=C128), torch.ones(6, dtype=C64))
    with pytest.raises(TypeError, match=r"cg: b has dtype torch.int64, expected a floating or complex dtype"):
        cg(A, torch.ones(6, dtype=torch.int64))
    # A real b is converted to A's complex dtype; a real M is applied to real and imaginary parts.
    res = cg(A, torch.ones(6, dtype=F64), M=torch.eye(6, dtype=F64), rtol=1e-12)
    assert res.converged and res.x.dtype == C128
    with pytest.raises(TypeError, match=r"cg: M has dtype torch.complex128, but A has dtype torch.float64"):
        cg(torch.eye(6, dtype=F64), torch.ones(6, dtype=F64), M=torch.eye(6, dtype=C128))


def test_complex_jacobi_needs_a_positive_real_diagonal_for_cg():
    A = _complex_general(8, seed=10)
    with pytest.raises(ValueError, match=r"cg: M=jacobi\(A\) is not positive definite \(diag\(A\) has an entry .* "
                                         r"that is not a positive real\)"):
        cg(A, torch.ones(8, dtype=C128), M=jacobi())
    res = gmres(A, torch.ones(8, dtype=C128), M=jacobi(), rtol=1e-12)
    assert res.converged


def test_gmres_drops_a_vanishing_pivot():
    # scipy's test_defective_precond_breakdown: A M singular; the rounding-sized third pivot is dropped, so x
    # solves the system outside M's null space instead of picking up an O(1) error.
    A = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=F64))
    M = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    b, x0 = torch.tensor([0.0, 1.0, 1.0], dtype=F64), torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    res = gmres(A, b, x0, M=M, rtol=1e-15, maxiter=30)
    assert not res.converged and torch.isfinite(res.x).all()
    torch.testing.assert_close(M @ (A @ res.x), M @ b, rtol=0, atol=1e-14)


# --------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("name", list(METHODS) + ["lsmr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(name, dtype):
    fn, make = (lsmr, nonsym) if name == "lsmr" else METHODS[name]
    A = torch.as_tensor(make(64), dtype=dtype)
    B = torch.randn(64, 3, dtype=dtype)
    kwargs = {} if name == "lsmr" else dict(rtol=1e-5 if dtype == torch.float32 else 1e-10)
    cpu = fn(A, B, M=None if name in ("lsmr", "minres") else jacobi(), **kwargs) if name != "lsmr" else fn(A, B)
    gpu = fn(A.cuda(), B.cuda(), M=None if name in ("lsmr", "minres") else jacobi(), **kwargs) \
        if name != "lsmr" else fn(A.cuda(), B.cuda())
    assert gpu.x.device.type == "cuda" and gpu.converged == cpu.converged
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, rtol=tol, atol=tol)
