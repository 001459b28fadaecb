"""Hessian-vector products of the OT loss with the target cloud sharded over a process group.

The formulas are those of ``otlinop.hvp`` (docs/math.md section 6), run on
the column-sharded plan: every sum over the targets ``j`` is a local
streaming pass plus an all-reduce of the (n, c) result, every sum over the
sources ``i`` is local to the rank that holds ``j``, and the dual solve is a
Krylov solve on the sharded Schur complement whose inner products are
reduced over the group (``otlinop.distributed.hessian``). So the x side of
an HVP (``H_xx A``, ``H_xy B``) comes out the same on every rank, and the y
side as this rank's block.
"""

from __future__ import annotations

import torch

from solvers import ShardedInnerProduct, cg

from .._checks import (directions, finite, nonnegative_scalar, points, positive_int, positive_scalar, preconditioner,
                       solver_function, vector)
from ..hessian import hessian_options
from ..hvp import LossHessianOperator, inner_rtol
from .hessian import ColumnShardedPlan, ShardedDualHessianOperator
from .plan import ShardedPlanOperator

__all__ = ["hvp", "hvp_x", "hvp_y", "loss_hessian_operator", "ShardedLossHessianOperator"]


class ShardedLossHessianOperator(LossHessianOperator):
    """The Hessian of the OT loss with ``y`` sharded over a process group.

    Built with :func:`loss_hessian_operator`. A ``LossHessianOperator`` on the
    sharded dual Hessian: seen from one rank, a vector is the flattened
    ``(A, B_r)`` (``A`` over x, the same on every rank; ``B_r`` this rank's
    block over y), of shape (n d,) for ``wrt="x"``, (m_local d,) for ``"y"``,
    ((n + m_local) d,) for ``"xy"``.

    Notes
    -----
    * Its ``inner_products`` count the x part once (rank 0) and every rank's
      y block, so ``solvers.minres(H, rhs)`` runs on the whole Hessian (for
      ``wrt="x"`` the vectors are replicated: the plain inner product).
    * Symmetric (up to the inner solve's tolerance) and indefinite.
    * One product: one HVP (``hvp``'s cost per rank, over m_local columns,
      with an all-reduce per pass over the targets and per inner product of
      the Schur solve).
    """

    def __init__(self, K, x, y, *, wrt, cost_scale, solve):
        super().__init__(K, x, y, wrt=wrt, cost_scale=cost_scale, solve=solve)
        rows, n_rows = self.shape[0], x.numel()
        if wrt != "x":
            self.inner_products = ShardedInnerProduct(rows, group=K.group, replicated=n_rows if wrt == "xy" else 0,
                                                      device=x.device)


def _checked(owner, x, y, f, g, A, B, *, eps, a, b, cost_scale, reach_x, reach_y, solver, M, rtol, atol,
             maxiter, ridge, backend, precision, group, wrt):
    """The checks of ``otlinop.hvp`` on this rank's data, then the sharded dual
    Hessian (which runs the collectives); returns the loss Hessian operator."""
    geo = points(owner, x, y, batch="none")
    vector(geo, "f", f, geo.n, what="one potential per point of x")
    vector(geo, "g", g, geo.m, what="one potential per point of this rank's block of y")
    if A is not None:
        A = directions(geo, "A", A, geo.n, what="one direction for x, or k of them")
    if B is not None:
        k = None if A is None else (0 if A.ndim == 2 else A.shape[2])
        B = directions(geo, "B", B, geo.m, k=k, what="shaped like A, one row per point of this rank's block of y")
    eps, _, _, _ = hessian_options(owner, eps, reach_x, reach_y, ridge)
    cost_scale = positive_scalar(owner, "cost_scale", cost_scale)
    solver_function(owner, "solver", solver)
    preconditioner(owner, "M", M)
    rtol = inner_rtol(x.dtype) if rtol is None else nonnegative_scalar(owner, "rtol", rtol)
    atol = nonnegative_scalar(owner, "atol", atol)
    maxiter = None if maxiter is None else positive_int(owner, "maxiter", maxiter)
    finite(owner, {"A": A, "B": B}, hint="the directions must be finite")
    P = ColumnShardedPlan(ShardedPlanOperator(x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale,
                                              backend=backend, precision=precision, group=group))
    K = ShardedDualHessianOperator(P, eps=eps, reach_x=reach_x, reach_y=reach_y, ridge=ridge)
    solve = dict(solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter)
    return ShardedLossHessianOperator(K, x, y, wrt=wrt, cost_scale=cost_scale, solve=solve), A, B


def _flat(D):
    """(rows, d) -> (rows d,); (rows, d, k) -> (rows d, k)."""
    return D.reshape((-1,) + tuple(D.shape[2:]))


def hvp(x, y, f, g, A=None, B=None, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
        solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None,
        group=None):
    r"""The Hessian-vector product of the OT loss along ``(A, B)``, with ``y`` sharded over a group.

    Every rank of ``group`` calls it with the same ``x, f, a, A`` and its own
    block ``y, g, b, B`` of the target side (blocks in rank order, of any
    sizes, possibly empty), as for ``ShardedPlanOperator``.

    Parameters
    ----------
    x : Tensor, shape (n, d)
        Source points, the same on every rank.
    y : Tensor, shape (m_local, d)
        This rank's block of the target points.
    f : Tensor, shape (n,)
    g : Tensor, shape (m_local,)
        Converged potentials (GeomLoss convention): ``f`` whole, ``g`` this
        rank's block.
    A : Tensor, shape (n, d) or (n, d, k), optional
        The direction for x (the same on every rank), or k of them.
    B : Tensor, shape (m_local, d) or (m_local, d, k), optional
        This rank's block of the direction for y. A missing part is zero
        (at least one is needed, and the same one on every rank).
    eps : float
    a : Tensor, shape (n,), optional
    b : Tensor, shape (m_local,), optional
        Weights (None: ones), ``b`` this rank's block.
    cost_scale, reach_x, reach_y, rtol, atol, maxiter, ridge, backend, precision
        As ``otlinop.hvp``.
    solver : callable, default ``solvers.cg``
        Solves the sharded Schur system; any solver of ``solvers`` (they take
        their inner products from the operator, reduced over the group).
    M : operator or preconditioner factory, optional
        For the sharded Schur complement: ``solvers.jacobi()`` or
        ``solvers.neumann(3)``.
    group : ProcessGroup, optional
        The process group (None: the default group).

    Returns
    -------
    Hx : Tensor, shape (n, d) or (n, d, k)
        ``H_xx A + H_xy B``, the same on every rank.
    Hy : Tensor, shape (m_local, d) or (m_local, d, k)
        This rank's block of ``H_yx A + H_yy B``.
    result : SolveResult
        The inner solve's (the same iterations and status on every rank).

    Raises
    ------
    RuntimeError
        When ``torch.distributed`` is not initialised.
    ValueError, TypeError
        As ``otlinop.hvp``, for this rank's arguments. The checks are local:
        a rank that raises leaves the others waiting in a collective.

    Notes
    -----
    The formulas of ``otlinop.hvp``: ``(df, dg) = K^+ [(P∘s) 1; (P∘s).T 1]``
    with the dual Hessian K of :class:`ShardedDualHessianOperator`, then
    ``Hx = sum_j G_ij`` and ``Hy = -sum_i G_ij``. Per rank: the passes of
    ``otlinop.hvp`` over its n x m_local block; each pass over the targets
    (``P @ V``, and the bilinear term for large d) adds an all-reduce of its
    (n, c) result, and each CG iteration two all-reduces (the product's, n k
    values) and two or three all-gathers of k values (its dots).
    A missing part is passed as zeros (the passes of both directions run).
    ``truncate`` is not available on sharded plans.

    Examples
    --------
    See ``tests/test_distributed_hvp.py`` (2 and 3 gloo processes); on one
    process it is ``otlinop.hvp``:

    >>> import os, tempfile, torch, torch.distributed as dist
    >>> import otlinop, otlinop.distributed as otd
    >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "s"),
    ...                         rank=0, world_size=1)
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(12, 2, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    >>> res = otlinop.sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
    >>> A, B = torch.randn_like(x), torch.randn_like(y)
    >>> Hx, Hy, info = otd.hvp(x, y, res.f, res.g, A, B, eps=res.eps, a=res.a, b=res.b)
    >>> Hx1, Hy1, _ = otlinop.hvp(x, y, res.f, res.g, A, B, eps=res.eps, a=res.a, b=res.b)
    >>> info.converged, torch.allclose(Hx, Hx1), torch.allclose(Hy, Hy1)
    (True, True, True)
    >>> dist.destroy_process_group()
    """
    owner = "hvp"
    if A is None and B is None:
        raise ValueError("hvp: give a direction A (for x), B (for y) or both; got neither")
    H, A, B = _checked(owner, x, y, f, g, A, B, eps=eps, a=a, b=b, cost_scale=cost_scale, reach_x=reach_x,
                       reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge,
                       backend=backend, precision=precision, group=group, wrt="xy")
    # A missing part enters as zeros: both sides of the product are wanted.
    cols = tuple((A if A is not None else B).shape[2:])
    A = A if A is not None else x.new_zeros(x.shape + cols)
    B = B if B is not None else y.new_zeros(y.shape + cols)
    out = H @ torch.cat([_flat(A), _flat(B)])
    nd = x.numel()
    return out[:nd].reshape(x.shape + cols), out[nd:].reshape(y.shape + cols), H.last_solve


def hvp_x(x, y, f, g, A, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None, solver=cg, M=None,
          rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None, group=None):
    """``H_xx A`` with ``y`` sharded over a group; returns ``(HA, SolveResult)``.

    Parameters as :func:`hvp` (``A`` of shape (n, d) or (n, d, k), the same on
    every rank). ``HA`` has A's shape and is the same on every rank.

    Notes
    -----
    The passes of ``otlinop.hvp_x`` on each rank's n x m_local block, each
    pass over the targets followed by an all-reduce of its (n, c) result; the
    Schur solve on :class:`ShardedHessianOperator`.

    Examples
    --------
    >>> import os, tempfile, torch, torch.distributed as dist
    >>> import otlinop, otlinop.distributed as otd, solvers
    >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "s"),
    ...                         rank=0, world_size=1)
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    >>> res = otlinop.sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
    >>> A = torch.randn(12, 3, 4, dtype=torch.float64)
    >>> HA, info = otd.hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b, M=solvers.jacobi())
    >>> HA.shape, info.converged
    (torch.Size([12, 3, 4]), True)
    >>> dist.destroy_process_group()
    """
    H, A, _ = _checked("hvp_x", x, y, f, g, _required("hvp_x", "A", A), None, eps=eps, a=a, b=b,
                       cost_scale=cost_scale, reach_x=reach_x, reach_y=reach_y, solver=solver, M=M, rtol=rtol,
                       atol=atol, maxiter=maxiter, ridge=ridge, backend=backend, precision=precision, group=group,
                       wrt="x")
    return (H @ _flat(A)).reshape(A.shape), H.last_solve


def hvp_y(x, y, f, g, B, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None, solver=cg, M=None,
          rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None, group=None):
    """``H_yy B`` with ``y`` sharded over a group; returns ``(HB_r, SolveResult)``.

    Parameters as :func:`hvp`: ``B`` is this rank's block, (m_local, d) or
    (m_local, d, k); ``HB_r`` is this rank's block of ``H_yy B``, B's shape.
    """
    H, _, B = _checked("hvp_y", x, y, f, g, None, _required("hvp_y", "B", B), eps=eps, a=a, b=b,
                       cost_scale=cost_scale, reach_x=reach_x, reach_y=reach_y, solver=solver, M=M, rtol=rtol,
                       atol=atol, maxiter=maxiter, ridge=ridge, backend=backend, precision=precision, group=group,
                       wrt="y")
    return (H @ _flat(B)).reshape(B.shape), H.last_solve


def _required(owner, name, D):
    if D is None:
        raise ValueError(f"{owner}: the direction {name} is required, got None")
    return D


def loss_hessian_operator(x, y, f, g, *, wrt="x", eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
                          solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None,
                          precision=None, group=None) -> ShardedLossHessianOperator:
    """The Hessian of the OT loss as an operator, with ``y`` sharded over a group.

    Parameters
    ----------
    wrt : {"x", "y", "xy"}, default "x"
        The variables: ``x`` (vectors of n d, the same on every rank), ``y``
        (this rank's m_local d), or both (x first, then this rank's y block).
    Other parameters as :func:`hvp`.

    Returns
    -------
    ShardedLossHessianOperator
        Seen from one rank; its ``inner_products`` make the solvers of
        ``solvers`` (``minres`` for the indefinite Hessian) solve the whole
        system.

    Raises
    ------
    ValueError
        If ``wrt`` is not one of "x", "y", "xy"; as :func:`hvp` otherwise.

    Examples
    --------
    >>> import os, tempfile, torch, torch.distributed as dist
    >>> import otlinop, otlinop.distributed as otd, solvers
    >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "s"),
    ...                         rank=0, world_size=1)
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(12, 2, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    >>> res = otlinop.sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
    >>> H = otd.loss_hessian_operator(x, y, res.f, res.g, wrt="y", eps=res.eps, a=res.a, b=res.b)
    >>> step = solvers.minres(H, torch.randn(18, dtype=torch.float64), shift=-1.0, rtol=1e-8)
    >>> step.converged, H.last_solve.converged
    (True, True)
    >>> dist.destroy_process_group()
    """
    owner = "loss_hessian_operator"
    if not (isinstance(wrt, str) and wrt in ("x", "y", "xy")):
        raise ValueError(f"{owner}: wrt must be 'x', 'y' or 'xy', got {wrt!r}")
    H, _, _ = _checked(owner, x, y, f, g, None, None, eps=eps, a=a, b=b, cost_scale=cost_scale, reach_x=reach_x,
                       reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge,
                       backend=backend, precision=precision, group=group, wrt=wrt)
    return H
