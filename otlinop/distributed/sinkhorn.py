"""``sinkhorn`` on point clouds sharded over a process group: each rank a block of x and of y.

Rank ``r`` holds the blocks ``x_r, a_r`` (rows) and ``y_r, b_r`` (columns); the
blocks in rank order make up the two clouds. The loops are those of
``otlinop.sinkhorn`` (``otlinop._sinkhorn_loops``: the same eps schedule,
averaged updates, extrapolation, checks, stall detection and statuses), given
:class:`ShardedOps`: their soft-mins run a ring over the other ranks' blocks
(``otlinop.distributed.plan.Ring``), their sums over the points (marginal
errors, masses) are completed over the ranks in rank order, so every rank
takes the same decisions and returns the same scalars.

:func:`sinkhorn` takes local shards and a group; ``otlinop.sinkhorn`` given
DTensors sharded on the point dimension routes them to :func:`sinkhorn_dtensor`.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .._checks import Inputs, points, potential, vector
from .._sinkhorn_loops import LocalOps, Monitor, alternating_loop, symmetric_loop
from .._sinkhorn_result import ConvergenceWarning, convergence_status
from .._sinkhorn_schedule import DEFAULT_BLUR, DEFAULT_MAX_ITER, loop_options, resolve_eps
from ..kernels import lse_cost
from ..kernels._dispatch import check_backend
from ..kernels.softmin_pair import averaged_step
from .plan import (Ring, RingPlanOperator, checked_over_group, merge_lse_or_empty, ordered_max, ordered_sum,
                   require_group, ring_lse, same_dimension)

__all__ = ["sinkhorn", "sinkhorn_dtensor", "ShardedSinkhornResult", "ShardedOps", "sharded_measures",
           "global_diameter", "is_dtensor", "dtensor_shards", "as_dtensor"]


# --------------------------------------------------------------------------
# The soft-mins and sums of the loops over a process group
# --------------------------------------------------------------------------
class ShardedOps(LocalOps):
    """:class:`otlinop._sinkhorn_loops.LocalOps` over the ranks of a group (one problem, B = 1).

    ``row_ring`` / ``col_ring``: the :class:`Ring` of the x and y blocks; ``pair_ring``: that of
    both blocks of a rank together (the symmetric step's two soft-mins share one
    ring: one message per step carries ``[x_s, log a_s + f_s/eps, y_s, log b_s + g_s/eps]``).
    """

    stack_self = False      # the ranks' blocks of x and y differ in size: no stacking

    def __init__(self, rows: Ring, cols: Ring, d: int, group=None):
        self.row_ring, self.col_ring, self.d, self.group = rows, cols, d, group
        self.pair_ring = Ring([(n + m) * (d + 1) for n, m in zip(rows.sizes, cols.sizes)], group)

    def pair(self, x, y, f, g, log_a, log_b, *, eps, average=None, **opts):
        d = self.d
        x0, y0 = x[0], y[0]
        ha = log_a[0] + f[0] / eps
        hb = log_b[0] + g[0] / eps
        dt = ha.dtype
        payload = torch.cat([torch.cat([x0.to(dt), ha.unsqueeze(-1)], -1).reshape(-1),
                             torch.cat([y0.to(dt), hb.unsqueeze(-1)], -1).reshape(-1)])

        def compute(s, blk):
            ns = self.row_ring.sizes[s]
            xs = blk[:ns * (d + 1)].reshape(ns, d + 1)
            ys = blk[ns * (d + 1):].reshape(-1, d + 1)
            row = col = None
            if x0.shape[0] and ys.shape[0]:        # this rank's rows against the columns of rank s
                row = lse_part(x0, ys[:, :d].to(x0.dtype), ys[:, d], eps, opts)
            if y0.shape[0] and xs.shape[0]:        # this rank's columns against the rows of rank s
                col = lse_part(y0, xs[:, :d].to(y0.dtype), xs[:, d], eps, opts)
            return row, col

        parts = [p if p is not None else (None, None) for p in self.pair_ring.map(payload, compute)]
        sf = -eps * merge_lse_or_empty([p[0] for p in parts], x0.shape[0], ha)
        sg = -eps * merge_lse_or_empty([p[1] for p in parts], y0.shape[0], hb)
        return averaged_step(torch.cat([sf, sg]).unsqueeze(0), average)

    def rows(self, x, y, h, *, eps, **opts):
        return (-eps * ring_lse(x[0], y[0], h[0], self.col_ring, eps=eps, **opts)).unsqueeze(0)

    def cols(self, x, y, h, *, eps, **opts):
        return (-eps * ring_lse(y[0], x[0], h[0], self.row_ring, eps=eps, **opts)).unsqueeze(0)

    def self_smin(self, side: int, c, f, log_w, *, eps, average=None, **opts):
        ring = self.row_ring if side == 0 else self.col_ring
        out = -eps * ring_lse(c[0], c[0], log_w[0] + f[0] / eps, ring, eps=eps, **opts)
        return averaged_step(out.unsqueeze(0), average)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return ordered_sum(t, self.group)

    def extent(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        def amax(t):
            return t.abs().amax() if t.numel() else t.new_zeros(())
        return ordered_max(torch.stack([amax(f), amax(g)]), self.group).sum()


def lse_part(x, y, h, eps: float, opts: dict) -> torch.Tensor:
    """One block's log-sum-exp ``log sum_j exp(h_j - C_ij / eps)`` (the kernel's ``lse_cost``)."""
    return lse_cost(x, y, h, eps=eps, **opts)


# --------------------------------------------------------------------------
# Checked inputs over the ranks
# --------------------------------------------------------------------------
def _raise_collective(owner: str, flags: list, group, device) -> None:
    """Raise the first failed check on every rank (one all-reduce of the flags, so that
    no rank goes on to a collective that the others left)."""
    if not flags:
        return
    # On the points' device: NCCL reduces CUDA tensors only.
    ok = torch.tensor([float(bool(f)) for f, _ in flags], dtype=torch.float64, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    for value, (_, message) in zip(ok.tolist(), flags):
        if not value:
            raise ValueError(f"{owner}: {message}")


def sharded_measures(owner: str, x, y, a, b, *, balanced: bool, group=None) -> tuple[Inputs, Ring, Ring]:
    """This rank's blocks of two weighted clouds, checked over the group; ``(Inputs (B = 1), rows, cols)``.

    Shapes, dtypes and devices locally (``otlinop._checks``), then an
    all-gather of their outcome and the sizes (a refusal on one rank raises on
    every rank: the refused rank its own error, the others one that names it);
    then, with one all-reduce of the flags, on every rank:
    the same d, non-empty clouds, finite points, finite weights >= 0, positive
    total masses, equal ones when ``balanced``. Default weights are uniform
    over the whole cloud (``1 / n``, n the total number of points).
    """
    require_group(owner)

    def check():
        geo = points(owner, x, y, batch="none", hint="sharded inputs are one problem: shard each problem of a "
                                                     "batch in its own call")
        wa = None if a is None else vector(geo, "a", a, geo.n, what="one weight per point of this rank's block of x")
        wb = None if b is None else vector(geo, "b", b, geo.m, what="one weight per point of this rank's block of y")
        return (geo, wa, wb), (geo.n, geo.m, geo.d)

    (geo, a, b), everyone = checked_over_group(owner, check, group)
    same_dimension(owner, [info[2] for info in everyone])
    rows = Ring([info[0] for info in everyone], group)
    cols = Ring([info[1] for info in everyone], group)
    n, m = sum(rows.sizes), sum(cols.sizes)
    if n == 0 or m == 0:
        raise ValueError(f"{owner}: the point clouds must not be empty over the group, got n={n} points of x and "
                         f"m={m} of y over {rows.world_size} ranks")
    wdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    a = torch.full((geo.n,), 1.0 / n, dtype=wdt, device=x.device) if a is None else a
    b = torch.full((geo.m,), 1.0 / m, dtype=wdt, device=x.device) if b is None else b
    with torch.no_grad():
        finite = torch.isfinite(x).all() & torch.isfinite(y).all()
        wok = torch.isfinite(a).all() & torch.isfinite(b).all() & (a >= 0).all() & (b >= 0).all()
        masses = ordered_sum(torch.stack([a.sum(dtype=torch.float64), b.sum(dtype=torch.float64)]), group)
        ma, mb = masses.tolist()
    flags = [(bool(finite), "the points x and y must be finite (a rank holds inf or nan)"),
             (bool(wok), "the weights a and b must be finite and >= 0 (a rank holds a negative or non-finite one)"),
             (ma > 0, "the weights a have zero total mass; each measure needs a positive mass"),
             (mb > 0, "the weights b have zero total mass; each measure needs a positive mass")]
    if balanced:
        tol = max(1e-3, 8 * torch.finfo(a.dtype).eps)
        flags.append((abs(ma - mb) <= tol * max(ma, mb),
                      "balanced OT needs equal total masses, but sum(a) != sum(b) over the ranks (relative "
                      "difference above 1e-3); normalise the weights, or pass reach=... for unbalanced OT"))
    _raise_collective(owner, flags, group, x.device)
    return Inputs(x.unsqueeze(0), y.unsqueeze(0), a.unsqueeze(0), b.unsqueeze(0), False), rows, cols


def global_diameter(x: torch.Tensor, y: torch.Tensor, group=None) -> float:
    """The diagonal of the bounding box of every rank's points (an all-reduce of the min and max corners)."""
    d = x.shape[-1]
    with torch.no_grad():
        pts = torch.cat([x.reshape(-1, d), y.reshape(-1, d)]).double()
        lo = pts.min(0).values if pts.shape[0] else pts.new_full((d,), math.inf)
        hi = pts.max(0).values if pts.shape[0] else pts.new_full((d,), -math.inf)
        corners = torch.cat([-lo, hi])
        dist.all_reduce(corners, op=dist.ReduceOp.MAX, group=group)
        return float((corners[d:] + corners[:d]).norm())


# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------
@dataclass(repr=False)
class ShardedSinkhornResult:
    """The result of a sharded :func:`sinkhorn`: this rank's blocks of the potentials, replicated scalars.

    Attributes
    ----------
    f, g : Tensor, shapes (n_local,) and (m_local,)
        This rank's blocks of the potentials (DTensors sharded like the
        inputs when the inputs were DTensors).
    f_pre, g_pre : Tensor or None
        "symmetric": this rank's blocks of the potentials before the final
        extrapolation.
    cost : Tensor, shape ()
        GeomLoss' OT value (``<a, f> + <b, g>`` balanced), summed over the ranks
        in rank order: bitwise the same on every rank.
    eps, n_iter, converged, marginal_error, marginal_error_history, status, threshold, method, eps_schedule
        As ``otlinop.SinkhornResult``, the same on every rank.
    a, b, x, y : Tensor
        This rank's blocks of the weights (the uniform ``1 / n`` ones when not
        given) and points, as given.
    cost_scale, reach_x, reach_y, backend, precision, group
        The options of the call.

    Notes
    -----
    ``plan`` builds the :class:`RingPlanOperator` of the potentials: a
    collective (one all-gather), to call on every rank of ``group``.
    """

    f: torch.Tensor
    g: torch.Tensor
    eps: float
    n_iter: int
    converged: bool
    marginal_error: float
    cost: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    cost_scale: float
    reach_x: float | None
    reach_y: float | None
    method: str
    eps_schedule: list
    f_pre: torch.Tensor | None = None
    g_pre: torch.Tensor | None = None
    backend: str | None = None
    precision: str | None = None
    marginal_error_history: list = field(default_factory=list)
    threshold: float = math.nan
    status: str = ""
    group: object = None

    @property
    def plan(self) -> RingPlanOperator:
        """The plan of the potentials as a :class:`RingPlanOperator` (collective: every rank calls it)."""
        loc = local_tensor
        dt = loc(self.f).dtype
        return RingPlanOperator(loc(self.x).to(dt), loc(self.y).to(dt), loc(self.f), loc(self.g), eps=self.eps,
                                a=loc(self.a).to(dt), b=loc(self.b).to(dt), cost_scale=self.cost_scale,
                                backend=self.backend, precision=self.precision, group=self.group)

    def __repr__(self) -> str:
        return (f"ShardedSinkhornResult(n_local={local_tensor(self.f).shape[0]}, "
                f"m_local={local_tensor(self.g).shape[0]}, method={self.method!r}, eps={self.eps:.4g}, "
                f"n_iter={self.n_iter}, converged={self.converged}, marginal_error={self.marginal_error:.2e}, "
                f"status={self.status!r})")


def _side_value(w, h, eps: float, rho) -> torch.Tensor:
    if rho is None:
        return (w * h).sum(-1)
    return (rho + 0.5 * eps) * (w * (-torch.expm1(-h / rho))).sum(-1)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------
def sinkhorn(x, y, a=None, b=None, *, blur=None, eps=None, scaling=0.5, diameter=None, cost_scale=1.0,
             reach=None, reach_x=None, reach_y=None, method="symmetric", max_iter=None, threshold=None,
             check_every=10, f0=None, g0=None, callback=None, verbose=False, backend=None, precision=None,
             group=None, _owner="sinkhorn") -> ShardedSinkhornResult:
    r"""``otlinop.sinkhorn`` on point clouds sharded over the ranks of a process group.

    Every rank of ``group`` calls it with its blocks of the two clouds (and of
    their weights and warm starts) and the same options; the blocks in rank
    order make up the clouds. Sizes may differ between ranks, and a block may
    be empty.

    Parameters
    ----------
    x : Tensor, shape (n_local, d)
        This rank's block of the source points.
    y : Tensor, shape (m_local, d)
        This rank's block of the target points.
    a, b : Tensor, shapes (n_local,) and (m_local,), optional
        This rank's blocks of the weights; default uniform over the whole
        clouds (``1 / n``, ``1 / m``).
    blur, eps, scaling, diameter, cost_scale, reach, reach_x, reach_y, method, max_iter, threshold, check_every
        As ``otlinop.sinkhorn``, the same on every rank. The default diameter
        is that of the bounding box of all the ranks' points.
    f0, g0 : Tensor, optional
        This rank's blocks of a warm start.
    callback : callable, optional
        Called on every rank at each check, with this rank's blocks ``f``, ``g``.
    verbose : bool
        A progress bar on every rank.
    backend, precision
        As ``otlinop.sinkhorn`` (for the kernels on each pair of blocks).
    group : ProcessGroup, optional
        The process group; None means the default group.

    Returns
    -------
    ShardedSinkhornResult
        This rank's blocks of the potentials; the scalars (``cost``,
        ``marginal_error``, ``n_iter``, ``converged``, ``status``) the same on
        every rank.

    Raises
    ------
    RuntimeError
        When ``torch.distributed`` is not initialised.
    TypeError, ValueError
        As ``otlinop.sinkhorn``, on every rank together for the checks of the
        values (finite points, weights, masses); batched clouds are refused.

    Warns
    -----
    ConvergenceWarning
        As ``otlinop.sinkhorn``, on every rank.

    Notes
    -----
    The loops, updates, schedule and checks are ``otlinop.sinkhorn``'s
    (docs/math.md section 3). Each update of both potentials is one ring
    over the ranks: rank ``r`` computes the soft-mins of its rows against the
    column blocks and of its columns against the row blocks of every rank,
    one block at a time, while the next block arrives (``isend`` /
    ``irecv``); the partial log-sum-exps are merged in rank order. The sums of
    a check (the marginal error ``||P 1 - a||_1 / sum(a)``) and of ``cost`` are
    gathered and added in rank order. Per symmetric step and rank: W - 1
    messages of about ``(n + m)(d + 1) / W`` values, and kernels over
    ``(n_local m + m_local n)`` entries. Equal to the single-process result up
    to rounding (the log-sum-exps are merged from blocks).

    Examples
    --------
    >>> import os, tempfile, torch, torch.distributed as dist
    >>> import otlinop, otlinop.distributed
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    >>> res = otlinop.distributed.sinkhorn(x, y, blur=0.3)
    >>> torch.allclose(res.f, otlinop.sinkhorn(x, y, blur=0.3).f, rtol=1e-12, atol=1e-12)
    True
    >>> dist.destroy_process_group()
    """
    owner = _owner
    cost_scale, rho_x, rho_y, backend, precision, check_every, threshold, max_iter = loop_options(
        owner, method=method, cost_scale=cost_scale, reach=reach, reach_x=reach_x, reach_y=reach_y, backend=backend,
        precision=precision, check_every=check_every, threshold=threshold, callback=callback, verbose=verbose,
        max_iter=max_iter)

    inp, rows, cols = sharded_measures(owner, x, y, a, b, balanced=(rho_x is None and rho_y is None), group=group)
    check_backend(owner, backend, x)
    f0 = potential(owner, "f0", f0, inp.a, batched=False, dtype=inp.pot_dtype)
    g0 = potential(owner, "g0", g0, inp.b, batched=False, dtype=inp.pot_dtype)
    if method == "symmetric" and diameter is None:
        diameter = global_diameter(x, y, group)
        if diameter <= 0:       # every point at the same place: any positive scale works
            diameter = math.sqrt(eps) if eps is not None else (DEFAULT_BLUR if blur is None else blur)
    eps, schedule, _ = resolve_eps(owner, method, blur, eps, scaling, diameter, inp)
    if method == "symmetric":
        if max_iter is None:
            max_iter = len(schedule) + DEFAULT_MAX_ITER
        elif max_iter < len(schedule):
            raise ValueError(f"{owner}: max_iter={max_iter} is shorter than the eps schedule ({len(schedule)} "
                             "steps); method='symmetric' runs the whole schedule, then up to max_iter steps "
                             "in all at the final eps")
    refine = max_iter - len(schedule) if method == "symmetric" else 0
    bar = None
    if verbose:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_iter, desc=f"sinkhorn ({method}, rank {rows.rank})", leave=False)
    monitor = Monitor(check_every=check_every, callback=callback, bar=bar, method=method, inp=inp)
    ops = ShardedOps(rows, cols, x.shape[-1], group)
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision, graphs=None, ops=ops)
    f_pre = g_pre = None
    with torch.no_grad():
        if method == "symmetric":
            pots, pre, n_iter = symmetric_loop(inp, schedule, rho_x, rho_y, debias=False, f0=f0, g0=g0,
                                               monitor=monitor, refine=refine, threshold=threshold, **opts)
            (f, g), (f_pre, g_pre) = pots, pre
        else:
            f, g, n_iter, _ = alternating_loop(inp, eps, rho_x, rho_y, f0=f0, g0=g0, max_iter=max_iter,
                                               threshold=threshold, monitor=monitor, **opts)
        dt = f.dtype
        cost = ordered_sum(_side_value(inp.a.to(dt), f, eps, rho_x) + _side_value(inp.b.to(dt), g, eps, rho_y),
                           group)[0]
    errors = monitor.finish()
    error = errors[-1] if errors else math.nan
    converged = error <= threshold
    status = convergence_status(method=method, converged=converged, error=error, threshold=threshold, n_iter=n_iter,
                                max_iter=max_iter, stalled=monitor.stalled, stall_span=monitor.stall_span,
                                floor=monitor.floor, dtype=inp.pot_dtype)
    if not converged:
        warnings.warn(f"{owner}: {status}", ConvergenceWarning, stacklevel=2)

    def u(t):
        return None if t is None else t[0]
    return ShardedSinkhornResult(
        f=u(f), g=u(g), eps=eps, n_iter=n_iter, converged=converged, marginal_error=error, cost=cost,
        a=u(inp.a) if a is None else a, b=u(inp.b) if b is None else b, x=x, y=y, cost_scale=cost_scale,
        reach_x=None if rho_x is None else math.sqrt(rho_x), reach_y=None if rho_y is None else math.sqrt(rho_y),
        method=method, eps_schedule=schedule, f_pre=u(f_pre), g_pre=u(g_pre), backend=backend,
        precision=precision, marginal_error_history=errors, threshold=threshold, status=status, group=group)


# --------------------------------------------------------------------------
# DTensors
# --------------------------------------------------------------------------
def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False where this torch has none)."""
    if "torch.distributed.tensor" not in sys.modules:    # never imported: no DTensor exists (and no import cost)
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:         # a torch without DTensor: nothing can be one
        return False
    return isinstance(t, DTensor)


def dtensor_shards(owner: str, tensors: dict):
    """The local shards of DTensors sharded on their first (point) dimension over one 1-D mesh.

    ``tensors``: name -> DTensor or None. Returns ``(locals by name, mesh)``;
    raises ValueError for another placement, another mesh, or a plain tensor
    among DTensors.
    """
    from torch.distributed.tensor import Shard
    mesh, out = None, {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        if not is_dtensor(t):
            raise ValueError(f"{owner}: {name} is a {type(t).__name__}, but the points are DTensors; pass every "
                             "tensor argument as a DTensor sharded on its first dimension (Shard(0)), or every "
                             "one as a plain tensor")
        if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
            raise ValueError(f"{owner}: {name} must be a DTensor sharded on its first (point) dimension over a 1-D "
                             f"mesh, placements (Shard(0),), got placements {tuple(t.placements)} on a mesh of "
                             f"{t.device_mesh.ndim} dimensions; redistribute it with "
                             f"{name}.redistribute(mesh, [Shard(0)])")
        if mesh is None:
            mesh = t.device_mesh
        elif t.device_mesh != mesh:
            raise ValueError(f"{owner}: {name} lives on another device mesh than x; every DTensor argument must "
                             "share one mesh")
        out[name] = t.to_local()
    return out, mesh


def as_dtensor(t, mesh, length: int):
    """This rank's block ``t`` as a DTensor of ``length`` points sharded on the mesh (None passes)."""
    if t is None:
        return None
    from torch.distributed.tensor import DTensor, Shard
    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=(length,) + tuple(t.shape[1:]),
                              stride=tuple(torch.empty((length,) + tuple(t.shape[1:]), device="meta").stride()))


def local_tensor(t):
    """The local block of a DTensor; a plain tensor (or None) as it is."""
    return t.to_local() if is_dtensor(t) else t


def sinkhorn_dtensor(x, y, a=None, b=None, *, f0=None, g0=None, **options) -> ShardedSinkhornResult:
    """``otlinop.sinkhorn`` on DTensors sharded on the point dimension: :func:`sinkhorn` on their local
    shards over the mesh's group; the potentials come back as DTensors sharded the same way."""
    owner = options.pop("_owner", "sinkhorn")
    shards, mesh = dtensor_shards(owner, dict(x=x, y=y, a=a, b=b, f0=f0, g0=g0))
    res = sinkhorn(shards["x"], shards["y"], shards["a"], shards["b"], f0=shards["f0"], g0=shards["g0"],
                   group=mesh.get_group(), _owner=owner, **options)
    n, m = x.shape[0], y.shape[0]
    res.f, res.g = as_dtensor(res.f, mesh, n), as_dtensor(res.g, mesh, m)
    res.f_pre, res.g_pre = as_dtensor(res.f_pre, mesh, n), as_dtensor(res.g_pre, mesh, m)
    res.x, res.y = x, y
    res.a = a if a is not None else as_dtensor(res.a, mesh, n)
    res.b = b if b is not None else as_dtensor(res.b, mesh, m)
    return res
