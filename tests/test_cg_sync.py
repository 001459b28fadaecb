"""cg's stopping test on the device, read by the host every ``check_every`` iterations
(issue 18, item 2).

Every iteration updates a device flag per column (a column freezes at its own
convergence: x, r and its iteration count stop changing); the host reads the flags
only every ``check_every`` iterations. The result must not depend on it: these tests
compare ``check_every`` = 4 and 16 with 1 (the per-iteration loop, which on the CPU is
the default) bitwise, and ``check_every=1`` with a plain host loop written here (a
read of the residual at every iteration, scipy's way). Host synchronisations are
counted as tests/test_syncs.py counts them (tensor read-backs on the CPU).
"""
import dataclasses
import functools
import math
import time

import pytest
import torch

import solvers
from conftest import FakeGraphs, requires_cuda
from solvers import cg, jacobi
from test_syncs import READS, reads  # noqa: F401  (the read-back counting fixture)

F64 = torch.float64
EVERY = (1, 4, 16)


# ------------------------------------------------------------------ problems
def _orthogonal(n, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(n, n, dtype=dtype, generator=gen)
    return torch.linalg.qr(G)[0]


def _spd(n, cond, seed=0):
    """A dense SPD matrix with eigenvalues spread log-uniformly over [1, cond]."""
    Q = _orthogonal(n, seed)
    lam = torch.logspace(0, math.log10(cond), n, dtype=F64)
    return (Q * lam) @ Q.T


def _distinct(n, m, seed=0):
    """(A, Q): an SPD A = Q diag(lam) Q^T with m distinct eigenvalues (1 .. m), so that CG
    converges at iteration m exactly (in exact arithmetic; to ~1e-14 in float64)."""
    Q = _orthogonal(n, seed)
    lam = (torch.arange(n, dtype=F64) % m) + 1.0
    return (Q * lam) @ Q.T, Q


def _rhs(n, k=None, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (n, k)
    return torch.randn(shape, dtype=dtype, generator=gen)


def _inverse_diagonal(A):
    """A Jacobi preconditioner as a callable, the same function for cg and the host loop."""
    dinv = 1.0 / torch.diagonal(A).real
    return lambda r: r * (dinv if r.ndim == 1 else dinv[:, None])


def _same(r, s):
    """Two SolveResults bitwise equal: x, iterations, residuals, flags and status."""
    assert torch.equal(r.x, s.x)
    assert r.n_iter == s.n_iter and r.converged == s.converged and r.status == s.status
    assert torch.equal(r.residual_norm, s.residual_norm)
    assert torch.equal(r.column_iterations, s.column_iterations)
    assert torch.equal(r.column_converged, s.column_converged)


# ----------------------------------------------- the per-iteration host loop
def _inner(U, V):
    return torch.vdot(U, V).real if U.is_complex() else torch.dot(U, V)


def _host_loop(A, b, *, rtol, M=None, maxiter):
    """Textbook preconditioned CG on one right-hand side, reading the residual on the host
    at every iteration (the loop every cg had before the device-side test), with the
    torch operations of solvers.cg's torch path. Returns (x, iterations, ||r||)."""
    B = b
    bnorm = torch.linalg.vector_norm(B[:, None], dim=0)[0]
    tol = torch.clamp(rtol * bnorm, min=0.0)
    X, R = torch.zeros_like(B), B.clone()
    Z = R if M is None else M(R)
    rho = _inner(R, Z)
    rnorm = torch.linalg.vector_norm(R, dim=0)
    P = Z.clone()
    its = 0
    if not rnorm > tol:
        return X, its, rnorm
    for _ in range(maxiter):
        Q = A @ P
        pq = _inner(P, Q)
        alpha = rho / pq
        X.addcmul_(P, alpha)
        R.addcmul_(Q, alpha, value=-1)
        if M is None:
            rho_new = _inner(R, R)
            rnorm = torch.sqrt(rho_new)
        else:
            rnorm = torch.linalg.vector_norm(R, dim=0)
        its += 1
        if rnorm <= tol:              # the host read, every iteration
            break
        Z = R if M is None else M(R)
        if M is not None:
            rho_new = _inner(R, Z)
        P = torch.addcmul(Z, P, rho_new / rho)
        rho = rho_new
    return X, its, rnorm


PROBLEMS = {
    # name: (A, b, options); n_iter is checked where it is known in advance
    "spd": lambda: (_spd(60, 1e3), _rhs(60), dict(rtol=1e-10)),
    "spd-jacobi": lambda: (_spd(60, 1e3) + torch.diag(torch.linspace(1, 50, 60, dtype=F64)), _rhs(60),
                           dict(rtol=1e-10, M="jacobi")),
    "at-multiple-of-4": lambda: (_distinct(40, 8)[0], _rhs(40), dict(rtol=1e-10)),
    "between-multiples": lambda: (_distinct(40, 7)[0], _rhs(40), dict(rtol=1e-10)),
    "maxiter": lambda: (_spd(60, 1e5), _rhs(60), dict(rtol=1e-12, maxiter=13)),
    "complex": lambda: _hermitian(),
}
KNOWN_ITERATIONS = {"at-multiple-of-4": 8, "between-multiples": 7, "maxiter": 13}


def _hermitian():
    n = 40
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(n, n, dtype=torch.complex128, generator=gen)
    A = G @ G.mH + n * torch.eye(n, dtype=torch.complex128)
    return A, _rhs(n, dtype=torch.complex128), dict(rtol=1e-10)


def _problem(name):
    A, b, opts = PROBLEMS[name]()
    if opts.get("M") == "jacobi":
        opts = dict(opts, M=_inverse_diagonal(A))
    return A, b, opts


@pytest.mark.parametrize("name", PROBLEMS)
def test_per_iteration_loop_is_the_host_loop(name):
    """check_every=1 is bitwise the loop that reads the residual at every iteration."""
    A, b, opts = _problem(name)
    res = cg(A, b, check_every=1, **opts)
    X, its, rnorm = _host_loop(A, b, rtol=opts["rtol"], M=opts.get("M"), maxiter=opts.get("maxiter", 10 * len(b)))
    assert torch.equal(res.x, X) and res.n_iter == its
    if name in KNOWN_ITERATIONS:
        assert res.n_iter == KNOWN_ITERATIONS[name]
    assert res.converged == (name != "maxiter"), res.status
    if name in ("spd", "spd-jacobi", "complex"):
        # (Where the recursive residual is within a few ulps of ||b||, the solvers report
        # the true one instead: the exact-convergence problems end there.)
        assert torch.equal(res.residual_norm, rnorm)


@pytest.mark.parametrize("every", EVERY[1:])
@pytest.mark.parametrize("name", PROBLEMS)
def test_checking_every_few_iterations_changes_nothing(name, every):
    A, b, opts = _problem(name)
    _same(cg(A, b, check_every=every, **opts), cg(A, b, check_every=1, **opts))


@pytest.mark.parametrize("every", EVERY[1:])
@pytest.mark.parametrize("name", ["spd", "spd-jacobi", "complex"])
def test_residual_history_is_the_same(name, every):
    """The history, as the solves stopped after 1, 2, ... iterations see it: each is bitwise
    the per-iteration loop's (x, residual, status), with masked iterations or not after it."""
    A, b, opts = _problem(name)
    full = cg(A, b, check_every=1, **opts)
    history = []
    for m in range(1, full.n_iter + 1):
        r = cg(A, b, check_every=every, **dict(opts, maxiter=m))
        _same(r, cg(A, b, check_every=1, **dict(opts, maxiter=m)))
        history.append(float(r.residual_norm))
    assert history[-1] <= opts["rtol"] * float(torch.linalg.vector_norm(b)) < history[-2]


@pytest.mark.parametrize("every", EVERY[1:])
def test_iteration_count_is_the_first_that_met_the_tolerance(every):
    """n_iter is the true one, not the next multiple of check_every: one iteration fewer
    does not converge, for each column of a block converging at 3, 6 and 9 iterations."""
    A, Q = _distinct(30, 10)
    gen = torch.Generator().manual_seed(2)
    B = torch.stack([Q[:, :m] @ torch.randn(m, dtype=F64, generator=gen) for m in (3, 6, 9)], dim=1)
    res = cg(A, B, rtol=1e-10, check_every=every)
    assert res.column_iterations.tolist() == [3, 6, 9] and res.converged
    _same(res, cg(A, B, rtol=1e-10, check_every=1))
    for j, m in enumerate((3, 6, 9)):
        short = cg(A, B, rtol=1e-10, check_every=every, maxiter=m - 1)
        assert not bool(short.column_converged[j])
        assert bool(cg(A, B, rtol=1e-10, check_every=every, maxiter=m).column_converged[j])


@pytest.mark.parametrize("every", EVERY)
def test_block_with_breakdown_and_zero_columns(every):
    """Columns that converge, break down (p^T A p = 0: b in A's null space) or are zero,
    in one block: each stops at its own iteration with its own status, whatever check_every."""
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=F64))
    B = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    res = cg(A, B, rtol=1e-12, check_every=every)
    _same(res, cg(A, B, rtol=1e-12, check_every=1))
    assert res.column_iterations.tolist() == [3, 0, 0]
    assert res.column_converged.tolist() == [True, False, True]
    assert "A is not positive definite" in res.status
    assert torch.equal(res.x[:, 2], torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("every", EVERY)
def test_breakdown_and_zero_rhs_alone(every):
    zero = torch.zeros(3, 3, dtype=F64)
    res = cg(zero, torch.ones(3, dtype=F64), check_every=every)
    _same(res, cg(zero, torch.ones(3, dtype=F64), check_every=1))
    assert not res.converged and res.n_iter == 0 and "A is not positive definite" in res.status
    res = cg(_spd(10, 10), torch.zeros(10, dtype=F64), check_every=every)
    assert res.converged and res.n_iter == 0 and torch.equal(res.x, torch.zeros(10, dtype=F64))


class _Overflowing:
    """An operator whose products overflow to inf after ``after`` calls."""

    def __init__(self, A, after):
        self.A, self.after, self.calls = A, after, 0
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device

    def __matmul__(self, v):
        self.calls += 1
        out = self.A @ v
        return out * float("inf") if self.calls > self.after else out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("every", EVERY[1:])
def test_masked_iterations_leave_x_alone_after_a_non_finite_step(every, backend):
    """A column stopped by a non-finite product keeps its last x through the masked
    iterations that follow (it steps along p = 0, not alpha = 0 times a NaN direction),
    in the torch iteration and in the fused kernels (Triton's interpreter on the CPU)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    A, b = _spd(30, 1e2).to(device), _rhs(30).to(device)
    one = cg(_Overflowing(A, after=4), b, rtol=1e-12, check_every=1, _backend=backend)
    many = cg(_Overflowing(A, after=4), b, rtol=1e-12, check_every=every, _backend=backend)
    _same(many, one)
    assert "NaN or inf" in many.status and bool(torch.isfinite(many.x).all()) and bool((many.x != 0).any())


@pytest.mark.parametrize("every", EVERY[1:])
def test_fused_kernels_check_every(every):
    """The fused Triton iteration (interpreter on the CPU) with device-side stopping."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    A, b = _distinct(40, 7)[0].to(device), _rhs(40).to(device)
    for M in (None, jacobi()):
        _same(cg(A, b, M=M, rtol=1e-10, check_every=every, _backend="triton"),
              cg(A, b, M=M, rtol=1e-10, check_every=1, _backend="triton"))


# ----------------------------------------------------------------- callbacks
def test_callback_forces_one_check_per_iteration():
    """A callback sees each iterate once, never a masked iteration's; an explicit
    check_every > 1 beside a callback is refused, not ignored."""
    A, b = _distinct(40, 7)[0], _rhs(40)
    seen = []
    res = cg(A, b, rtol=1e-10, callback=lambda x: seen.append(x.clone()))
    assert len(seen) == res.n_iter == 7 and torch.equal(seen[-1], res.x)
    again = []
    cg(A, b, rtol=1e-10, callback=again.append, check_every=1)
    assert len(again) == 7
    with pytest.raises(ValueError, match=r"cg: a callback is called after each iteration, which needs "
                                         r"check_every=1, got check_every=4; drop one of them"):
        cg(A, b, rtol=1e-10, callback=seen.append, check_every=4)


# ------------------------------------------------------ host synchronisations
@pytest.mark.parametrize("name", ["spd", "spd-jacobi", "at-multiple-of-4", "between-multiples", "complex"])
def test_reads_are_one_per_check(reads, name):
    """A solve reads ceil(n_iter / check_every) flags, plus a constant: b's finiteness, the
    first flag, the final verification and the result's one transfer."""
    A, b, opts = _problem(name)
    extra = None
    for every in EVERY:
        reads.clear()
        res = cg(A, b, check_every=every, **opts)
        loop = math.ceil(res.n_iter / every)
        if extra is None:
            extra = len(reads) - loop
        assert len(reads) - loop == extra, (every, res.n_iter, reads)
    assert extra == 4


def test_reads_at_maxiter(reads):
    """At maxiter the last iteration is not followed by a read: floor((maxiter - 1) / c) reads."""
    A, b, opts = _problem("maxiter")
    for every in EVERY:
        reads.clear()
        cg(A, b, check_every=every, **opts)
        assert len(reads) == (opts["maxiter"] - 1) // every + 4, (every, reads)


# ------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("every", EVERY)
@pytest.mark.parametrize("name", ["spd-jacobi", "between-multiples", "maxiter"])
def test_graph_replays_compose_with_check_every(reads, name, every):
    """cg(graph=...) replays its captured iteration check_every times between two reads of
    the flag (the CPU stand-in of tests/conftest.py replays the captured step): bitwise
    the eager loop, with one read per check_every replays."""
    A, b, opts = _problem(name)
    eager = cg(A, b, check_every=1, **opts)
    graphs = FakeGraphs()
    reads.clear()
    got = cg(A, b, check_every=every, graph=solvers.GraphCache(graphs=graphs), **opts)
    _same(got, eager)
    assert graphs.captures == 1
    # One eager iteration before the capture, then replays in runs of check_every (the
    # last run may hold masked iterations); at maxiter the last iteration runs eagerly.
    if name == "maxiter":
        assert graphs.replays == opts["maxiter"] - 2
    else:
        assert graphs.replays == math.ceil((eager.n_iter - 1) / every) * every
    assert len(reads) == math.ceil((min(eager.n_iter, opts.get("maxiter", 10 ** 9) - 1) - 1) / every) + 4


# -------------------------------------------------------------------- hvp
def _ot_problem(n=40, m=30, d=3, seed=0):
    from otlinop.sinkhorn import sinkhorn

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=F64, generator=gen)
    y = torch.randn(m, d, dtype=F64, generator=gen) + 0.3
    res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
    A = torch.randn(n, d, dtype=F64, generator=gen)
    return x, y, res, A


@pytest.mark.parametrize("M", [None, "jacobi"])
def test_hvp_inner_solve_reads_once_per_check(reads, M):
    """The HVP's Schur solve reads nothing back but cg's flag: ceil(n_iter / check_every)
    reads plus a constant (the checks of the passes around the solve), and the product
    is bitwise the same for every check_every."""
    from otlinop.hvp import hvp_x

    x, y, res, A = _ot_problem()
    out, extra = None, None
    for every in EVERY:
        reads.clear()
        H, info = hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b,
                        M=jacobi() if M else None, solver=functools.partial(cg, check_every=every))
        assert info.converged and info.n_iter > 4
        loop = math.ceil(info.n_iter / every)
        extra = len(reads) - loop if extra is None else extra
        assert len(reads) - loop == extra, (every, info.n_iter, reads)
        if out is None:
            out = (H, info)
        else:
            assert torch.equal(H, out[0]) and info.n_iter == out[1].n_iter
    # The constant does not grow with the iterations: fewer than the per-iteration loop's.
    assert extra < out[1].n_iter


def test_hvp_reads_its_values_four_times_around_the_solve(reads):
    """Around the solve, an HVP reads values back four times: the plan's data when it is built, the
    directions with the marginals K is built on, the solve's right-hand side, the products at the end
    (it was nine: every plan pass checked its operand and result). Then jacobi's diagonal check and
    the solver's own reads: setup, flag, verify, finish."""
    from otlinop.hvp import hvp_x

    x, y, res, A = _ot_problem()
    reads.clear()
    H, info = hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b, M=jacobi(),
                    solver=functools.partial(cg, check_every=10_000))
    assert info.converged and len(reads) == 4 + 1 + 4, reads


def _inflating(factor):
    """cg, whose solution comes back multiplied by ``factor`` (a solve gone wrong)."""
    def solve(S, b, **options):
        res = cg(S, b, **options)
        return dataclasses.replace(res, x=res.x * factor)
    return solve


@pytest.mark.parametrize("where", ["marginals", "right-hand side", "products"])
def test_hvp_overflow_is_caught_by_its_checks(where):
    """A plan or products that overflow float32 raise a ValueError that names the HVP and what
    overflowed, not inf or NaN: the marginals K is built on (potentials far too large), the solve's
    right-hand side (directions near float32's range), the products after the solve (a solution
    of 1e38, from a solver of the user's)."""
    from otlinop.hvp import hvp_x

    x, y, res, A = _ot_problem()
    x, y, f, g, A = (t.float() for t in (x, y, res.f, res.g, A))
    kw = dict(eps=res.eps, a=res.a.float(), b=res.b.float())
    if where == "marginals":
        with pytest.raises(ValueError, match=r"hvp_x: P 1 overflowed float32"):
            hvp_x(x, y, f + 100 * res.eps, g, A, **kw)   # P 1 = e^100 a: past float32's 3.4e38
    elif where == "right-hand side":
        with pytest.raises(ValueError, match=r"hvp_x: the Schur solve's right-hand side overflowed float32"):
            hvp_x(x, y, f, g, A / A.abs().max() * 3e38, **kw)
    else:
        with pytest.raises(ValueError, match=r"hvp_x: H_x A overflowed float32"):
            hvp_x(x, y, f, g, A, solver=_inflating(1e38), **kw)


class _ReadDetectingGraphs(FakeGraphs):
    """FakeGraphs whose ``synchronises`` runs the probe (the loop's operator and
    preconditioner products) and says whether it read a value back, as
    ``CudaGraphs.synchronises`` does on a GPU under torch's sync debug mode."""

    def synchronises(self, probe, state):
        log = []
        saved = {name: getattr(torch.Tensor, name) for name in READS}
        try:
            for name, real in saved.items():
                setattr(torch.Tensor, name,
                        lambda self, *args, _real=real: log.append(1) or _real(self, *args))
            probe(state)
        finally:
            for name, real in saved.items():
                setattr(torch.Tensor, name, real)
        self.probed = getattr(self, "probed", 0) + 1
        return bool(log)


def test_hvp_inner_solve_can_be_captured():
    """The Schur products inside the HVP's solve read nothing back, so cg(graph=...) captures
    the iteration (before, the plan products' value checks kept it eager); bitwise eager."""
    from otlinop.hvp import hvp_x

    x, y, res, A = _ot_problem()
    eager, info = hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b, M=jacobi())
    graphs = _ReadDetectingGraphs()
    solver = functools.partial(cg, graph=solvers.GraphCache(graphs=graphs), check_every=4)
    got, ginfo = hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b, M=jacobi(), solver=solver)
    assert graphs.probed == 1 and graphs.captures == 1 and graphs.replays > 0
    assert torch.equal(got, eager) and ginfo.n_iter == info.n_iter
    # The probe does see a product that reads back: the checks outside the solve still run.
    from otlinop.plan import PlanOperator

    P = PlanOperator(x, y, res.f, res.g, eps=res.eps, a=res.a, b=res.b)
    assert graphs.synchronises(lambda st: P @ st, torch.ones(30, dtype=F64))


def test_hvp_checks_still_run_outside_the_solve(override):
    """Outside the inner solve the products check their values as before; inside, the
    switch is only turned off for the solve and restored (errors included)."""
    from otlinop.hvp import hvp_x
    from solvers import config

    x, y, res, A = _ot_problem()
    bad = A.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hvp_x"):
        hvp_x(x, y, res.f, res.g, bad, eps=res.eps, a=res.a, b=res.b)
    assert config.check_finite

    def failing(S, rhs, **options):
        assert not config.check_finite
        raise RuntimeError("solver failed")
    with pytest.raises(RuntimeError, match="solver failed"):
        hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b, solver=failing)
    assert config.check_finite


# ------------------------------------------------------------------- GPU
@requires_cuda
def test_gpu_hvp_reads_and_time_by_check_every():
    """GPU: hvp_x at n = 10k, d = 3, eps = 0.5 (a dense plan), float32. Counts the host
    read-backs of one call with check_every = 1 and the default (4), and prints the wall
    time of each (best of 5, after a warm-up) with 2, 8 and 16 beside them, for tuning the
    default. Asserts the reads (ceil(n_iter / c) plus the same constant) and that the
    products agree; speed is printed, not asserted. About 10 s on an H100 after the
    kernels' compilation and autotuning (up to a minute on a fresh machine)."""
    from otlinop.hvp import hvp_x
    from otlinop.sinkhorn import sinkhorn

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d = 10_000, 3
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    sol = sinkhorn(x.double(), y.double(), eps=0.5, method="alternating", threshold=1e-10)
    f, g = sol.f.float(), sol.g.float()
    A = torch.randn(n, d, device="cuda", generator=gen)

    def call(every):
        solver = cg if every is None else functools.partial(cg, check_every=every)
        return hvp_x(x, y, f, g, A, eps=0.5, M=jacobi(), solver=solver)

    log = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(every):
        log.clear()
        for name, real in saved.items():
            setattr(torch.Tensor, name, lambda self, *args, _real=real: log.append(1) or _real(self, *args))
        try:
            H, info = call(every)
        finally:
            for name, real in saved.items():
                setattr(torch.Tensor, name, real)
        return H, info, len(log)

    call(1)
    call(None)       # warm-up: compilation and autotuning
    H1, info1, reads1 = counted(1)
    Hd, infod, readsd = counted(None)
    assert info1.converged and infod.converged and info1.n_iter == infod.n_iter
    assert reads1 - info1.n_iter == readsd - math.ceil(infod.n_iter / 4)
    torch.testing.assert_close(Hd, H1, rtol=1e-5, atol=1e-5 * float(H1.abs().max()))
    times = {}
    for every in (1, 2, None, 8, 16):
        best = math.inf
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(every)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        times["default (4)" if every is None else every] = best
    print(f"\nhvp_x n={n} d={d} eps=0.5 jacobi: {info1.n_iter} CG iterations; reads per call "
          f"check_every=1: {reads1}, default: {readsd}; best of 5 (ms): "
          + ", ".join(f"check_every={k}: {1e3 * v:.2f}" for k, v in times.items()))


@requires_cuda
def test_gpu_hvp_inner_solve_is_captured():
    """GPU: the HVP's Schur solve on the exact (streaming) plan, with its value checks on
    outside the solve, is captured as a CUDA graph (its products no longer read back):
    a loss Hessian operator with a GraphCache captures once for two products, and the
    products match the eager ones (float32, n = 2000, d = 3). A few seconds after
    compilation."""
    from conftest import counting_graphs
    from otlinop.hvp import loss_hessian_operator
    from otlinop.sinkhorn import sinkhorn

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d = 2000, 3
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    sol = sinkhorn(x.double(), y.double(), eps=0.5, method="alternating", threshold=1e-10)
    f, g = sol.f.float(), sol.g.float()
    graphs = counting_graphs()
    cache = solvers.GraphCache(graphs=graphs)
    eager = loss_hessian_operator(x, y, f, g, eps=0.5, M=jacobi())
    graphed = loss_hessian_operator(x, y, f, g, eps=0.5, M=jacobi(), solver=functools.partial(cg, graph=cache))
    for seed in (1, 2):
        v = torch.randn(n * d, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        want, got = eager @ v, graphed @ v
        assert graphed.last_solve.converged and graphed.last_solve.n_iter == eager.last_solve.n_iter
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert graphs.captures == 1
    assert torch.rand(3, device="cuda").shape == (3,)     # nothing left in capture mode
