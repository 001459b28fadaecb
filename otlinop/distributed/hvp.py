"""Hessian-vector products of the OT loss on point clouds sharded over a process group.

Two layouts, named by the argument ``sharded`` (the same on every rank, checked):

- ``sharded="y"`` (the default): every rank holds the whole source side ``x, f,
  a`` (and the direction ``A``) and its block of the target side ``y, g, b``
  (and ``B``); the plan is a ``ShardedPlanOperator``.
- ``sharded="xy"``: every rank holds a block of each cloud, as for
  ``otlinop.distributed.sinkhorn``; the plan is a ``RingPlanOperator``.

The formulas are those of ``otlinop.hvp`` (docs/math.md section 6), run on
the sharded plan. Columns sharded: every sum over the targets ``j`` is a local
streaming pass plus an all-reduce of the (n, c) result, every sum over the
sources is local, and the x side of an HVP (``H_xx A``, ``H_xy B``) comes out
the same on every rank. Both sharded: every sum over the other cloud is a ring
(``RingPlanOperator``), and each rank gets its block of both sides. In both,
the dual solve is a Krylov solve on the sharded Schur complement whose inner
products are reduced over the group (``otlinop.distributed.hessian``).
``otlinop.hvp``, ``hvp_x``, ``hvp_y`` and ``loss_hessian_operator`` given
DTensors sharded on the point dimension come here (:func:`hvp_dtensor`).
"""

from __future__ import annotations

import torch

from solvers import ShardedInnerProduct, cg

from .._checks import directions, finite, points, positive_scalar, vector
from ..hessian import hessian_options
from ..hvp import LossHessianOperator, check_results, solve_options
from ..plan import plan_operator_for
from .hessian import ColumnShardedPlan, ShardedDualHessianOperator, replicated_rows
from .plan import checked_over_group, require_group, ring_plan_on, same_dimension, sharded_plan_on
from .sinkhorn import as_dtensor, dtensor_shards, is_dtensor

__all__ = ["hvp", "hvp_x", "hvp_y", "loss_hessian_operator", "ShardedLossHessianOperator", "hvp_dtensor",
           "loss_hessian_operator_dtensor", "is_dtensor", "LAYOUTS"]

#: The values of ``sharded``: the target cloud alone, or both clouds.
LAYOUTS = ("y", "xy")

#: Relative tolerance between the ranks' checksums of the replicated side (``sharded="y"``): the
#: same data summed in another order (another device) differs by ~n u, a different block by O(1).
_CHECKSUM_RTOL = 1e-8


class ShardedLossHessianOperator(LossHessianOperator):
    """The Hessian of the OT loss on point clouds sharded over a process group.

    Built with :func:`loss_hessian_operator`. A ``LossHessianOperator`` on the
    sharded dual Hessian: seen from one rank, a vector is the flattened
    ``(A, B_r)``: ``B_r`` this rank's block over y, ``A`` over x, the same on
    every rank (``sharded="y"``) or this rank's block (``"xy"``). Shape
    (n d,) or (n_local d,) for ``wrt="x"``, (m_local d,) for ``"y"``, their
    sum for ``"xy"`` (x part first).

    Notes
    -----
    * Its ``inner_products`` count a replicated x part once (rank 0) and every
      rank's blocks, so ``solvers.minres(H, rhs)`` runs on the whole Hessian
      (for ``wrt="x"`` with x replicated the vectors are replicated: the
      plain inner product).
    * Symmetric (up to the inner solve's tolerance) and indefinite.
    * One product: one HVP (``hvp``'s cost per rank: its plan passes are
      local passes and all-reduces, or rings; each inner solve iteration
      reduces its dots over the group).
    * Its two overflow checks (the solve's right-hand side, the products)
      share their outcome over the group (one ``all_gather_object`` each):
      an overflow on one rank raises on every rank, none waits in a
      collective that another left.
    """

    def __init__(self, K, x, y, *, wrt, cost_scale, solve):
        super().__init__(K, x, y, wrt=wrt, cost_scale=cost_scale, solve=solve)
        replicated = replicated_rows(K.P) * x.shape[1] if "x" in wrt else 0
        # x replicated and alone: every rank holds the whole vector, the plain inner product.
        if not (wrt == "x" and replicated):
            self.inner_products = ShardedInnerProduct(self.shape[0], group=K.group, replicated=replicated,
                                                      device=x.device)

    def _check_results(self, owner: str, results: dict, hint: str) -> None:
        """:func:`otlinop.hvp.check_results` on this rank, its outcome shared over the group."""
        def check():
            check_results(owner, results, hint)
            return None, None

        checked_over_group(owner, check, self.K.group, what="HVP values")


def _checksum(tensors) -> list:
    """Per tensor (None: zeros), float64 sums of ``|t|`` and of ``|t|`` weighted by the row index: the
    same on ranks that hold the same tensors, up to the order of the additions (no cancellation)."""
    parts = []
    for t in tensors:
        if t is None:
            parts.append(torch.zeros(2, dtype=torch.float64, device=tensors[0].device))
            continue
        rows = t.detach().abs().to(torch.float64).reshape(t.shape[0], -1).sum(1)
        index = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
        parts.append(torch.stack([rows.sum(), (index * rows).sum()]))
    return torch.cat(parts).tolist()


def _name(obj) -> str:
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def _consistent(owner: str, everyone: list) -> None:
    """Refuse, on every rank alike (from the gathered summaries), inputs that disagree between ranks."""
    def differ(key):
        return len({repr(s[key]) for s in everyone}) > 1

    def listing(key, show=repr):
        return ", ".join(f"{show(s[key])} on rank {r}" for r, s in enumerate(everyone))

    if differ("sharded"):
        raise ValueError(f"{owner}: sharded must be the same on every rank, got {listing('sharded')}; 'y' if every "
                         "rank passes the whole x, 'xy' if each passes its block of x")
    same_dimension(owner, [s["d"] for s in everyone])
    if differ("directions"):
        raise ValueError(f"{owner}: every rank must pass the same directions, got (A given, B given, k) = "
                         f"{listing('directions')}")
    if differ("options"):
        raise ValueError(f"{owner}: the options (eps, cost_scale, reach_x, reach_y, ridge, rtol, atol, maxiter, wrt, "
                         f"solver, M) must be the same on every rank, got {listing('options')}")
    layout = everyone[0]["sharded"]
    if layout == "y":
        if differ("n"):
            raise ValueError(f"{owner}: with sharded='y' x is replicated (every rank passes the whole x), but its "
                             f"number of points differs: n = {listing('n', str)}; pass sharded='xy' if each rank "
                             "holds its block of x")
        reference = torch.tensor(everyone[0]["checksum"], dtype=torch.float64)
        for r, s in enumerate(everyone):
            if not torch.allclose(torch.tensor(s["checksum"], dtype=torch.float64), reference,
                                  rtol=_CHECKSUM_RTOL, atol=0.0):
                raise ValueError(f"{owner}: with sharded='y' x, f, a and A must be the same on every rank, but "
                                 f"rank {r}'s differ from rank 0's (compared by float64 checksums); pass "
                                 "sharded='xy' if each rank holds its block of x")
    n = everyone[0]["n"] if layout == "y" else sum(s["n"] for s in everyone)
    m = sum(s["m"] for s in everyone)
    if n == 0 or m == 0:
        raise ValueError(f"{owner}: the point clouds must not be empty over the group, got n={n} points of x and "
                         f"m={m} of y over {len(everyone)} ranks")


def _checked(owner, x, y, f, g, A, B, *, need, eps, a, b, cost_scale, reach_x, reach_y, solver, M, rtol, atol,
             maxiter, ridge, backend, precision, sharded, group, wrt):
    """The checks of ``otlinop.hvp`` on this rank's data, and of their agreement over the group (one
    all-gather: a refusal on one rank raises on every rank); then the sharded dual Hessian (which runs
    the collectives). ``need``: "A", "B", "A or B" (``hvp``) or None. Returns ``(H, A, B)``."""
    require_group(owner)

    def check():
        if not (isinstance(sharded, str) and sharded in LAYOUTS):
            raise ValueError(f"{owner}: sharded must be 'y' (x replicated, y split over the ranks) or 'xy' (both "
                             f"clouds split), got {sharded!r}")
        if not (isinstance(wrt, str) and wrt in ("x", "y", "xy")):
            raise ValueError(f"{owner}: wrt must be 'x', 'y' or 'xy', got {wrt!r}")
        if need == "A or B" and A is None and B is None:
            raise ValueError(f"{owner}: give a direction A (for x), B (for y) or both; got neither")
        for name, D in (("A", A), ("B", B)):
            if need == name and D is None:
                raise ValueError(f"{owner}: the direction {name} is required, got None")
        x_block = "x" if sharded == "y" else "this rank's block of x"
        geo = points(owner, x, y, batch="none")
        vector(geo, "f", f, geo.n, what=f"one potential per point of {x_block}")
        vector(geo, "g", g, geo.m, what="one potential per point of this rank's block of y")
        dA = dB = None
        if A is not None:
            dA = directions(geo, "A", A, geo.n, what=f"one direction per point of {x_block}, or k of them")
        if B is not None:
            k = None if dA is None else (0 if dA.ndim == 2 else dA.shape[2])
            dB = directions(geo, "B", B, geo.m, k=k, what="shaped like A, one row per point of this rank's block "
                                                           "of y")
        options = hessian_options(owner, eps, reach_x, reach_y, ridge)
        scale = positive_scalar(owner, "cost_scale", cost_scale)
        solve = solve_options(owner, x.dtype, solver, M, rtol, atol, maxiter)
        finite(owner, {"A": dA, "B": dB}, hint="the directions must be finite")
        local = plan_operator_for(owner, x, y, f, g, eps=options[0], a=a, b=b, cost_scale=scale, backend=backend,
                                  precision=precision)
        given = next((D for D in (dA, dB) if D is not None), None)
        summary = dict(
            sharded=sharded, n=geo.n, m=geo.m, d=geo.d,
            directions=(dA is not None, dB is not None, 0 if given is None or given.ndim == 2 else given.shape[2]),
            options=options + (scale, solve["rtol"], solve["atol"], solve["maxiter"], wrt, _name(solver), _name(M)),
            checksum=_checksum([x, f, a, dA]) if sharded == "y" else None)
        return (dA, dB, local, options, scale, solve), summary

    (A, B, local, options, scale, solve), everyone = checked_over_group(owner, check, group)
    _consistent(owner, everyone)
    if sharded == "y":
        P = ColumnShardedPlan(sharded_plan_on(local, [s["m"] for s in everyone], group))
    else:
        P = ring_plan_on(local, [s["n"] for s in everyone], [s["m"] for s in everyone], group)
    eps, _, _, ridge_ = options
    K = ShardedDualHessianOperator(P, eps=eps, reach_x=reach_x, reach_y=reach_y, ridge=ridge_)
    return ShardedLossHessianOperator(K, x, y, wrt=wrt, cost_scale=scale, solve=solve), A, B


def _flat(D):
    """(rows, d) -> (rows d,); (rows, d, k) -> (rows d, k)."""
    return D.reshape((-1,) + tuple(D.shape[2:]))


def hvp(x, y, f, g, A=None, B=None, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
        solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None,
        sharded="y", group=None):
    r"""The Hessian-vector product of the OT loss along ``(A, B)``, on clouds sharded over a group.

    Every rank of ``group`` calls it with its block ``y, g, b, B`` of the
    target side and, by ``sharded``, the whole source side ``x, f, a, A``
    (the same on every rank) or its block of it. Blocks are in rank order, of
    any sizes, possibly empty.

    Parameters
    ----------
    x : Tensor, shape (n, d) or (n_local, d)
        The source points: all of them (``sharded="y"``) or this rank's block
        (``"xy"``).
    y : Tensor, shape (m_local, d)
        This rank's block of the target points.
    f : Tensor, shape (n,) or (n_local,)
    g : Tensor, shape (m_local,)
        Converged potentials (GeomLoss convention), laid out as x and y.
    A : Tensor, shape (n, d) or (n, d, k), optional
        The direction for x, or k of them (rows laid out as x: (n_local, ...)
        with ``sharded="xy"``).
    B : Tensor, shape (m_local, d) or (m_local, d, k), optional
        This rank's block of the direction for y. A missing part is zero
        (at least one is needed, and the same one on every rank).
    eps : float
    a : Tensor, shape (n,) or (n_local,), optional
    b : Tensor, shape (m_local,), optional
        Weights (None: ones), laid out as x and y.
    cost_scale, reach_x, reach_y, rtol, atol, maxiter, ridge, backend, precision
        As ``otlinop.hvp``, the same on every rank.
    solver : callable, default ``solvers.cg``
        Solves the sharded Schur system; any solver of ``solvers`` (they take
        their inner products from the operator, reduced over the group).
    M : operator or preconditioner factory, optional
        For the sharded Schur complement: ``solvers.jacobi()`` or
        ``solvers.neumann(3)``.
    sharded : {"y", "xy"}, default "y"
        Which clouds are split over the ranks: the target cloud alone (every
        rank passes the whole ``x, f, a, A``), or both (each rank its block of
        each, as ``otlinop.distributed.sinkhorn`` takes and returns them). The
        same on every rank. Explicit because the sizes cannot tell: blocks of
        x may all have the same size.
    group : ProcessGroup, optional
        The process group (None: the default group).

    Returns
    -------
    Hx : Tensor, shaped like A
        ``H_xx A + H_xy B``: the same on every rank (``sharded="y"``), or this
        rank's block of it (``"xy"``).
    Hy : Tensor, shape (m_local, d) or (m_local, d, k)
        This rank's block of ``H_yx A + H_yy B``.
    result : SolveResult
        The inner solve's (the same iterations and status on every rank).

    Raises
    ------
    RuntimeError
        When ``torch.distributed`` is not initialised.
    ValueError, TypeError
        As ``otlinop.hvp``, for this rank's arguments, on every rank: the
        checks' outcomes are all-gathered before any other collective, so a
        refusal on one rank raises on every rank (that rank its own error,
        the others one that names it). Also, on every rank, when the ranks
        disagree: ``sharded``, d, the directions given (and k), the options;
        with ``sharded="y"``, n or the replicated ``x, f, a, A`` (compared
        by float64 checksums); and for clouds empty over the whole group.

    Notes
    -----
    The formulas of ``otlinop.hvp``: ``(df, dg) = K^+ [(P∘s) 1; (P∘s).T 1]``
    with the dual Hessian K of :class:`ShardedDualHessianOperator`, then
    ``Hx = sum_j G_ij`` and ``Hy = -sum_i G_ij``. Per rank, with
    ``sharded="y"``: the passes of ``otlinop.hvp`` over its n x m_local block;
    each pass over the targets (``P @ V``, and the bilinear term for large d)
    adds an all-reduce of its (n, c) result, and each CG iteration two
    all-reduces (the product's, n k values) and two or three all-gathers of k
    values (its dots). With ``sharded="xy"``: each of those passes is a ring
    over the other cloud's blocks (``RingPlanOperator``: W - 1 messages of a
    block of points with its potential, log-weight and operand columns), a
    CG iteration two rings (``P v``, then ``P.T``) and the same all-gathers
    of k values. A missing part is passed as zeros (the passes of both
    directions run). ``truncate`` is not available on sharded plans. The
    construction runs one ``all_gather_object`` (the checks and sizes) and the
    sharded dual Hessian's collectives (marginals, sizes).

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
    >>> Hx2, Hy2, _ = otd.hvp(x, y, res.f, res.g, A, B, eps=res.eps, a=res.a, b=res.b, sharded="xy")
    >>> torch.allclose(Hx2, Hx1), torch.allclose(Hy2, Hy1)
    (True, True)
    >>> dist.destroy_process_group()
    """
    H, A, B = _checked("hvp", x, y, f, g, A, B, need="A or B", eps=eps, a=a, b=b, cost_scale=cost_scale,
                       reach_x=reach_x, reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter,
                       ridge=ridge, backend=backend, precision=precision, sharded=sharded, group=group, wrt="xy")
    # A missing part enters as zeros: both sides of the product are wanted.
    cols = tuple((A if A is not None else B).shape[2:])
    A = A if A is not None else x.new_zeros(x.shape + cols)
    B = B if B is not None else y.new_zeros(y.shape + cols)
    out = H @ torch.cat([_flat(A), _flat(B)])
    nd = x.numel()
    return out[:nd].reshape(x.shape + cols), out[nd:].reshape(y.shape + cols), H.last_solve


def hvp_x(x, y, f, g, A, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None, solver=cg, M=None,
          rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None, sharded="y", group=None):
    """``H_xx A`` on clouds sharded over a group; returns ``(HA, SolveResult)``.

    Parameters as :func:`hvp`: ``A`` of shape (n, d) or (n, d, k), the same on
    every rank (``sharded="y"``), or this rank's block (n_local, d[, k])
    (``"xy"``). ``HA`` has A's shape: the same on every rank, or this rank's
    block.

    Notes
    -----
    The passes of ``otlinop.hvp_x``: with ``sharded="y"`` on each rank's
    n x m_local block, each pass over the targets followed by an all-reduce
    of its (n, c) result; with ``"xy"`` each pass a ring. The Schur solve on
    :class:`ShardedHessianOperator`.

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
    H, A, _ = _checked("hvp_x", x, y, f, g, A, None, need="A", eps=eps, a=a, b=b, cost_scale=cost_scale,
                       reach_x=reach_x, reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter,
                       ridge=ridge, backend=backend, precision=precision, sharded=sharded, group=group, wrt="x")
    return (H @ _flat(A)).reshape(A.shape), H.last_solve


def hvp_y(x, y, f, g, B, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None, solver=cg, M=None,
          rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None, sharded="y", group=None):
    """``H_yy B`` on clouds sharded over a group; returns ``(HB_r, SolveResult)``.

    Parameters as :func:`hvp`: ``B`` is this rank's block, (m_local, d) or
    (m_local, d, k); ``HB_r`` is this rank's block of ``H_yy B``, B's shape.
    """
    H, _, B = _checked("hvp_y", x, y, f, g, None, B, need="B", eps=eps, a=a, b=b, cost_scale=cost_scale,
                       reach_x=reach_x, reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter,
                       ridge=ridge, backend=backend, precision=precision, sharded=sharded, group=group, wrt="y")
    return (H @ _flat(B)).reshape(B.shape), H.last_solve


def loss_hessian_operator(x, y, f, g, *, wrt="x", eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
                          solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None,
                          precision=None, sharded="y", group=None) -> ShardedLossHessianOperator:
    """The Hessian of the OT loss as an operator, on clouds sharded over a group.

    Parameters
    ----------
    wrt : {"x", "y", "xy"}, default "x"
        The variables: ``x`` (vectors of n d, the same on every rank, with
        ``sharded="y"``; this rank's n_local d with ``"xy"``), ``y`` (this
        rank's m_local d), or both (the x part first, then this rank's y
        block).
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
    >>> H = otd.loss_hessian_operator(x, y, res.f, res.g, wrt="y", eps=res.eps, a=res.a, b=res.b, sharded="xy")
    >>> step = solvers.minres(H, torch.randn(18, dtype=torch.float64), shift=-1.0, rtol=1e-8)
    >>> step.converged, H.last_solve.converged
    (True, True)
    >>> dist.destroy_process_group()
    """
    H, _, _ = _checked("loss_hessian_operator", x, y, f, g, None, None, need=None, eps=eps, a=a, b=b,
                       cost_scale=cost_scale, reach_x=reach_x, reach_y=reach_y, solver=solver, M=M, rtol=rtol,
                       atol=atol, maxiter=maxiter, ridge=ridge, backend=backend, precision=precision,
                       sharded=sharded, group=group, wrt=wrt)
    return H


# --------------------------------------------------------------------------
# DTensors
# --------------------------------------------------------------------------
def _dtensor_arguments(owner, x, y, f, g, A, B, options):
    """``(local shards of x, y, f, g, A, B, options with this rank's a, b and the mesh's group), mesh)``."""
    truncate = options.pop("truncate", None)
    if truncate is not None:
        raise NotImplementedError(f"{owner}: truncate is not implemented for DTensor inputs (the sharded plans "
                                  f"stream every entry), got truncate={truncate!r}; pass truncate=None")
    shards, mesh = dtensor_shards(owner, dict(x=x, y=y, f=f, g=g, a=options.pop("a", None),
                                              b=options.pop("b", None), A=A, B=B))
    options = dict(options, a=shards["a"], b=shards["b"], sharded="xy", group=mesh.get_group())
    return [shards[name] for name in ("x", "y", "f", "g", "A", "B")], options, mesh


def hvp_dtensor(owner, x, y, f, g, A=None, B=None, **options):
    """``otlinop.hvp`` (``owner`` "hvp"), ``hvp_x`` or ``hvp_y`` on DTensors sharded on the point dimension.

    :func:`hvp`, :func:`hvp_x` or :func:`hvp_y` with ``sharded="xy"`` on the
    local shards of ``x, y, f, g, a, b, A, B`` (every one a DTensor with
    placements ``(Shard(0),)`` on one 1-D mesh; ``dtensor_shards`` refuses
    others) over the mesh's group. Returns ``(Hx, Hy, SolveResult)``: the
    products as DTensors sharded like x and y (None for a side that ``owner``
    does not compute). ``truncate`` (not None) raises NotImplementedError.
    """
    (xs, ys, fs, gs, As, Bs), options, mesh = _dtensor_arguments(owner, x, y, f, g, A, B, options)
    Hx = Hy = None
    if owner == "hvp_x":
        Hx, info = hvp_x(xs, ys, fs, gs, As, **options)
    elif owner == "hvp_y":
        Hy, info = hvp_y(xs, ys, fs, gs, Bs, **options)
    else:
        Hx, Hy, info = hvp(xs, ys, fs, gs, As, Bs, **options)
    return as_dtensor(Hx, mesh, x.shape[0]), as_dtensor(Hy, mesh, y.shape[0]), info


def loss_hessian_operator_dtensor(x, y, f, g, **options) -> ShardedLossHessianOperator:
    """``otlinop.loss_hessian_operator`` on DTensors sharded on the point dimension: :func:`loss_hessian_operator`
    with ``sharded="xy"`` on their local shards over the mesh's group. The operator acts on this rank's
    flattened blocks (``V.to_local()`` of a DTensor direction, flattened; the x part first)."""
    (xs, ys, fs, gs, _, _), options, _ = _dtensor_arguments("loss_hessian_operator", x, y, f, g, None, None,
                                                            options)
    return loss_hessian_operator(xs, ys, fs, gs, **options)
