"""Preconditioned conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._cg_step import cg_direction, cg_update, check_state, fused_backend, real_inner
from ._common import (apply, bind_preconditioner, check_callback, check_every_for, check_maxiter,
                      check_tolerance, setup, tolerance)
from ._loop import run_loop
from ._result import CONVERGED, INDEFINITE_A, INDEFINITE_M, NONFINITE, default_describe, finish
from .graphs import CUDA_GRAPHS, GraphCache


class _State(NamedTuple):
    """The tensors CG carries from one iteration to the next (all on the device)."""

    X: torch.Tensor
    R: torch.Tensor
    P: torch.Tensor
    rho: torch.Tensor
    rnorm: torch.Tensor
    active: torch.Tensor
    iters: torch.Tensor
    failed_pq: torch.Tensor
    failed_rho: torch.Tensor
    rho_new: torch.Tensor
    tol: torch.Tensor      # read only: a field, so that a cached graph reads each solve's tolerance

__all__ = ["cg"]

# How often the host reads the stopping flag on an accelerator. A read costs the GPU an
# idle gap s (the copy's round trip and the host's way to the next launch, tens of us);
# a masked iteration costs a whole iteration t. Checking every c iterations costs about
# s N / c + t (c - 1) / 2 over N iterations, least at c = sqrt(2 N s / t): 2 to 4 for
# the 5 to 20 iterations of an HVP's inner solve with s / t ~ 0.1-0.3, and 8 or 16
# would waste more than they save there (docs/solvers.md, "Host synchronisation").
_CHECK_EVERY_ACCELERATOR = 4


@torch.no_grad()
def cg(A, b, x0=None, *, rtol=1e-5, atol=0.0, maxiter=None, M=None, callback=None, check_every=None,
       graph=False, _backend=None):
    """Solve ``A x = b`` for a symmetric (Hermitian) positive definite ``A`` by (preconditioned) CG.

    Parameters
    ----------
    A : operator or Tensor, shape (n, n)
        Symmetric positive definite, or Hermitian positive definite when
        complex. Anything ``as_operator`` accepts: an
        otlinop operator, a dense torch tensor, a NumPy array, a scipy sparse
        matrix or LinearOperator, a ``linear_operator`` object.
    b : Tensor, shape (n,) or (n, k)
        Real or complex, of A's precision (a complex b with a real A gives a
        complex solve). One right-hand side, or k of them solved together:
        each column has its own step sizes and stopping test, and one
        iteration costs one ``A @ P`` with P of shape (n, k).
    x0 : Tensor, shape like b, optional
        Initial guess (default zeros).
    rtol, atol : float
        Column j stops when ``||r_j|| <= max(rtol * ||b_j||, atol)``
        (scipy's rule), with r the recursively updated residual.
        ``rtol=inf`` or ``atol=inf`` stops at once; a column of b that is
        zero gets x = 0 at once, whatever x0 (scipy's rules).
    maxiter : int, optional
        Iteration limit (default ``10 n``, as scipy).
    M : operator, Tensor, callable or factory, optional
        An SPD preconditioner approximating ``A^-1``: ``jacobi()``,
        ``neumann(3)``, an operator, a dense tensor, or a callable
        ``r -> M r`` receiving tensors shaped like b. Factories are bound to A.
    callback : callable, optional
        Called as ``callback(xk)`` after each iteration, xk shaped like b.
        It is a host call per iteration, so it forces ``check_every=1``:
        it sees exactly the iterates of the solve, one per iteration.
    check_every : int, optional
        The stopping test runs on the device at every iteration (a column
        freezes at its own convergence: x, r and its iteration count stop
        changing); the host reads whether every column has stopped only
        every ``check_every`` iterations, and that read is the loop's one
        host synchronisation. Default: 1 on the CPU (a read is free there),
        4 on accelerators (docs/solvers.md, "Host synchronisation", gives
        the cost model). The result (x, ``n_iter``, the residuals, the
        status) does not depend on it; up to ``check_every - 1`` masked
        iterations (an operator product each, which changes nothing) may
        run after the last column stopped. Must be 1 or None with a
        ``callback``.
    graph : bool or GraphCache, default False
        On a CUDA device, run the loop as a CUDA graph: one iteration
        eagerly (it compiles and tunes the operator's kernels), then one
        iteration captured once and replayed until every column has
        stopped (the host looks every ``check_every`` replays). It removes
        the host's per-kernel launch cost, which bounds small and sparse
        problems; the result is bitwise that
        of the eager loop. The operator and ``M`` must not change shapes
        between calls. Whether they synchronise with the host is checked
        by one dry product under ``torch.cuda.set_sync_debug_mode("error")``;
        if they do (e.g. a ``PlanOperator``'s input checks, unless switched
        off), the loop stays eager. A ``solvers.GraphCache`` instead of
        True keeps the captured iteration for the next solve with the same
        ``A`` and ``M`` objects and right-hand-side shape, which then
        replays at once (repeated solves on one operator); the cache's
        ``graphs`` does the capture. Ignored on the CPU, with a
        ``callback`` and for an A sharded over a process group.

    Returns
    -------
    SolveResult
        ``x`` shaped like b, ``converged``, ``n_iter``, ``residual_norm``,
        ``status``, per-column ``column_converged`` and ``column_iterations``.

    Raises
    ------
    ValueError
        If A is not square, b or x0 has the wrong shape or non-finite
        entries, maxiter < 1, a tolerance is negative, NaN, None or a
        string, M is one of this
        package's preconditioners and known not to be positive definite,
        or a callback comes with ``check_every > 1``.
    TypeError
        If b, x0 or M have the wrong type, or a dtype of another precision
        than A's.

    Notes
    -----
    Hestenes-Stiefel CG: ``z = M r``, ``rho = r^T z``, ``p = z + (rho/rho_old) p``,
    ``alpha = rho / p^T A p``, ``x += alpha p``, ``r -= alpha A p``. If
    ``p^T A p <= 0`` the column stops and the status says that A is not
    positive definite (use ``minres``); if ``r^T M r <= 0`` it says so of M.
    For complex systems the inner products are ``r^H M r`` and ``p^H A p``
    (real for a Hermitian A and M) and the step sizes stay real.
    Non-convergence is reported in ``status``, never raised.

    The loop runs under ``torch.no_grad()``: ``x`` carries no gradient. Use
    ``solve(A, b, method="cg")`` to differentiate (implicit function
    theorem, one extra solve in the backward pass).

    Examples
    --------
    >>> import torch
    >>> from solvers import cg, jacobi
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> res = cg(A, b, rtol=1e-10, M=jacobi())
    >>> res.converged, torch.allclose(A @ res.x, b)
    (True, True)
    """
    pb = setup("cg", A, b, x0, square=True)
    rtol = check_tolerance("cg", "rtol", rtol)
    atol = check_tolerance("cg", "atol", atol)
    maxiter = check_maxiter("cg", maxiter, 10 * pb.n_total)
    check_callback("cg", callback)
    every = check_every_for("cg", check_every, pb.op.device, accelerator=_CHECK_EVERY_ACCELERATOR)
    if callback is not None:
        # The callback is a host call per iteration: it would see the masked iterations
        # between two reads (the iterate unchanged) as iterations of their own.
        if every > 1 and check_every is not None:
            raise ValueError(f"cg: a callback is called after each iteration, which needs check_every=1, got "
                             f"check_every={check_every}; drop one of them")
        every = 1
    if not isinstance(graph, (bool, GraphCache)):
        raise TypeError(f"cg: graph must be a bool or a solvers.GraphCache, got {type(graph).__name__}")
    Mop = bind_preconditioner("cg", M, pb.op, pb.vector, spd=True)
    op, B = pb.op, pb.B

    bnorm, tol = tolerance("cg", B, rtol, atol, norm=pb.space.norm)
    # One right-hand side runs on 1-D tensors with 0-d scalars: every view or reshape is a
    # dispatcher call, and on a GPU this loop is bound by such host-side overheads.
    flat = pb.k == 1
    if flat:
        B, tol = B[:, 0], tol[0]
    # The state lives in buffers of its own that every iteration updates in place (the
    # ops write through out=): a captured iteration then needs no copy-back (cg(graph=True)).
    if pb.X0 is None:
        X, R = torch.zeros_like(B), B.clone()
    else:
        X = pb.X0[:, 0] if flat else pb.X0
        R = B - op @ X
    # The scalars are real for complex systems too (A and M Hermitian): real_inner.
    one = torch.ones(() if flat else pb.k, dtype=pb.real_dtype, device=B.device)
    Z = R if Mop is None else Mop @ R
    # A sharded A (its inner_products over a process group): every dot and norm is reduced.
    sharded = pb.space if pb.space.sharded else None
    rho = real_inner(R, Z) if sharded is None else sharded.real_inner(R, Z)
    rnorm = pb.space.norm(R)
    # The loop keeps few per-column flags: the status codes are derived afterwards. A column
    # has converged iff rnorm <= tol (it froze there); failed_pq / failed_rho hold the
    # p^T A p or r^T M r that stopped a column (positive while none did).
    failed_pq = one.clone()
    failed_rho = torch.where(rho > 0, one, rho)
    active = (rnorm > tol) & (rho > 0)
    iters = torch.zeros_like(active, dtype=torch.int64)
    state = _State(X, R, Z.clone(), rho, rnorm, active, iters, failed_pq, failed_rho, rho.clone(), tol)
    # The vector work of an iteration (dots, axpys, flags): two fused single-program kernels
    # for one short right-hand side on a GPU, torch operations otherwise (_cg_step).
    # _backend ("torch" or "triton") overrides that choice: a test's way to run the fused
    # kernels under the Triton interpreter on the CPU.
    backend = (fused_backend(B) if sharded is None else "torch") if _backend is None else _backend
    precond = Mop is not None
    check_state("cg", dict(X=state.X, R=state.R, P=state.P),
                dict(rho=rho, rnorm=rnorm, active=active, iters=iters, failed_pq=failed_pq,
                     failed_rho=failed_rho, rho_new=state.rho_new, tol=tol), backend)

    def product(op, V, like):
        """``op @ V`` as the fused kernels read it (a contiguous tensor shaped and typed like ``like``)."""
        out = op @ V
        if out.shape != like.shape or out.dtype != like.dtype:
            raise ValueError(f"cg: the operator returned {tuple(out.shape)} {out.dtype} for a "
                             f"{tuple(like.shape)} {like.dtype} operand")
        return out.contiguous() if backend == "triton" else out

    def update(st):
        """x, r and the flags after one step along st.P (the matvec), in place."""
        Q = product(op, st.P, st.P)
        cg_update(st.P, Q, st.X, st.R, st.rho, st.rnorm, st.active, st.iters, st.failed_pq, st.rho_new, st.tol,
                  precond=precond, backend=backend, space=sharded)
        return st

    def direction(st):
        """The next search direction (the preconditioner's application), in place."""
        # Without M, z = r: r^T r > 0 unless NaN, which reaches p^T A p at the next step.
        Z = product(Mop, st.R, st.R) if precond else st.R
        cg_direction(st.R, Z, st.P, st.rho, st.rho_new, st.active, st.failed_rho, precond=precond,
                     backend=backend, space=sharded)
        return st

    def report(st):
        if callback is not None:
            X = st.X.clone()   # the loop goes on updating st.X in place
            callback(X if pb.vector or not flat else X[:, None])

    if bool(active.any()):
        cache = graph if isinstance(graph, GraphCache) else None
        if graph is False or callback is not None or sharded is not None:
            graphs = None
        else:
            graphs = CUDA_GRAPHS if cache is None else cache.graphs
        # The graph reads A and M as they were at capture, and the layout and backend
        # through the closures: the key names them, and the cache keeps them alive.
        key = (id(A), id(M), tuple(B.shape), B.dtype, B.device, pb.vector, backend)
        state = run_loop(update, direction, report, state, maxiter=maxiter, every=every,
                         graphs=graphs, device=B.device,
                         probe=lambda st: (op @ st.P, None if Mop is None else Mop @ st.R),
                         cache=cache, key=key, keep=(A, M))
    X, rnorm, iters = state.X, state.rnorm, state.iters
    failed_pq, failed_rho = state.failed_pq, state.failed_rho
    if isinstance(graph, GraphCache):
        # The graph's buffers stay with the cache, and the next solve overwrites them: x is
        # the one returned as is (finish copies rnorm and iters, the codes read the flags now).
        X = X.clone()

    if flat:
        X, rnorm, tol, iters = X[:, None], rnorm.reshape(1), tol.reshape(1), iters.reshape(1)
        failed_pq, failed_rho = failed_pq.reshape(1), failed_rho.reshape(1)
    codes = torch.zeros(pb.k, dtype=torch.int64, device=B.device)
    codes = torch.where(~(failed_pq > 0), torch.where(torch.isnan(failed_pq), NONFINITE, INDEFINITE_A),
                        codes)
    codes = torch.where(~(failed_rho > 0), torch.where(torch.isnan(failed_rho), NONFINITE, INDEFINITE_M),
                        codes)
    codes = torch.where(rnorm <= tol, CONVERGED, codes)
    return finish(X=X, vector=pb.vector, codes=codes, iters=iters, rnorm=rnorm, tol=tol, bnorm=bnorm,
                  rtol=rtol, atol=atol, maxiter=maxiter,
                  describe=default_describe("cg", "try M=jacobi() or M=neumann(3), or a larger maxiter"),
                  residual=lambda X: pb.space.norm(pb.B - apply(op, X, pb.vector)), out_dtype=pb.out_dtype)
