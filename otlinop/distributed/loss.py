"""The Sinkhorn loss on point clouds sharded over a process group, with its gradients.

Rank ``r`` holds blocks of x (with a) and of y (with b), as for
``otlinop.distributed.sinkhorn``. The potentials come from GeomLoss' symmetric
loop (``otlinop._sinkhorn_loops``, run with ``ShardedOps``: the same schedule
and extrapolation as ``otlinop.SamplesLoss``); the value is the sum of the
ranks' parts in rank order, replicated; the gradients w.r.t. each rank's
points and weights are the formulas of ``otlinop.loss`` (``sinkhorn_grad`` of
``otlinop._loss_derivatives``) with the plan products made by rings over the
other cloud's blocks (:func:`ring_point_grad`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from solvers._function import Function

from .._checks import backend_name, flag, fraction, positive_scalar, precision_name, reach_or_none
from .._loss_derivatives import Solution, Spec, loss_value, sinkhorn_grad
from .._sinkhorn_loops import Monitor, symmetric_loop
from .._sinkhorn_schedule import resolve_eps
from ..kernels import plan_apply_scaled
from ..kernels._dispatch import check_backend
from .plan import Ring, ordered_sum
from .sinkhorn import ShardedOps, dtensor_shards, is_dtensor, global_diameter, sharded_measures

__all__ = ["sinkhorn_loss", "sinkhorn_loss_dtensor", "ring_point_grad", "is_dtensor"]


def ring_point_grad(x, y, g, w, ring: Ring, *, eps: float, b=None, cost_scale: float, backend, precision):
    r"""``2c w_i (x_i - ybar_i)`` for this rank's rows ``x`` (n, d) against the columns of every rank.

    ``ybar_i = sum_j pi_ij y_j``, ``pi_ij`` the soft-max weights of
    ``log b_j + (g_j - C_ij) / eps`` over all columns (the rows of the plan
    normalised to 1; ``otlinop._operators.plan_product.softmin_gradient``'s
    quantity). ``y`` (m_local, d), ``g`` and ``b`` (m_local,): this rank's
    block of the columns; ``ring`` their sizes. Each block ``s`` gives
    ``plan_apply_scaled``'s pair ``(S_s, L_s)`` for ``V = [y_s - z | 1]``
    (``z`` the mean of the local rows); the pairs are merged in rank order,
    ``sum_s exp(L_s - max L) S_s``, whose ratio is ``ybar - z``. Returns (n, d).
    """
    d, n = x.shape[-1], x.shape[0]
    log_b = torch.zeros_like(g) if b is None else torch.log(b.to(g.dtype))
    payload = torch.cat([y.to(g.dtype), g.unsqueeze(-1), log_b.unsqueeze(-1)], -1)
    z = x.mean(0, keepdim=True) if n else x.new_zeros((1, d))
    xz = x - z

    def compute(s, blk):
        if n == 0:
            return None
        ys = blk[:, :d].to(x.dtype)
        V = torch.cat([ys - z, ys.new_ones((ys.shape[0], 1))], -1)
        return plan_apply_scaled(x, ys, g.new_zeros(n), blk[:, d], V, eps=eps, log_b=blk[:, d + 1],
                                 cost_scale=cost_scale, backend=backend, precision=precision)

    parts = [p for p in ring.map(payload, compute) if p is not None]
    if n == 0 or not parts:
        return torch.zeros_like(x)
    M = parts[0][1]
    for _, L in parts[1:]:
        M = torch.maximum(M, L)
    shift = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    S = None
    for Sp, L in parts:
        term = torch.exp(L - shift).unsqueeze(-1) * Sp
        S = term if S is None else S + term
    mass = S[:, d:]
    ybar = torch.where(mass > 0, S[:, :d] / mass, torch.zeros_like(S[:, :d]))
    return ((2.0 * cost_scale) * w.unsqueeze(-1) * (xz - ybar.to(xz.dtype))).to(x.dtype)


class _State:
    """What the backward of one sharded loss evaluation needs."""

    def __init__(self, inp, sol, spec, ops, group, owner):
        self.inp, self.sol, self.spec, self.ops, self.group, self.owner = inp, sol, spec, ops, group, owner
        self.x_cloud = None     # the x that the backward passes to sinkhorn_grad: tells the rings apart

    def point_grad(self, x, y, f, g_pre, a, b, spec, *, rho=None):
        """``otlinop._loss_derivatives.point_grad`` with the columns ``y`` passed around their ring."""
        ring = self.ops.row_ring if y is self.x_cloud else self.ops.col_ring
        ah = a if rho is None else a * torch.exp(-f / rho)
        return ring_point_grad(x[0], y[0], g_pre[0], ah[0], ring, eps=spec.eps, b=b[0],
                               **spec.kernel_options).unsqueeze(0)


class _ShardedLoss(Function):
    """The loss (replicated) of this rank's blocks ``(x, y, a, b)``; backward: their gradients."""

    @staticmethod
    def forward(ctx, x, y, a, b, state: _State):
        ctx.state = state
        sol, inp, spec = state.sol, state.inp, state.spec
        return ordered_sum(loss_value(inp.a.to(sol.f.dtype), inp.b.to(sol.f.dtype), sol, spec), state.group)[0]

    @staticmethod
    def backward(ctx, grad):
        state = ctx.state
        if torch.is_grad_enabled():
            raise NotImplementedError(f"{state.owner}: second derivatives of the sharded Sinkhorn loss are not "
                                      "implemented; call backward without create_graph=True")
        # The gradients are collectives (rings): every rank must compute the same ones,
        # whichever of its blocks require grad.
        needs = torch.tensor([float(v) for v in ctx.needs_input_grad[:4]], dtype=torch.float64,
                             device=state.inp.x.device)
        dist.all_reduce(needs, op=dist.ReduceOp.MAX, group=state.group)
        needs = tuple(bool(v) for v in needs.tolist())
        inp, sol, spec = state.inp, state.sol, state.spec
        dt = sol.f.dtype
        x, y, a, b = (t.detach().to(dt) for t in (inp.x, inp.y, inp.a, inp.b))
        state.x_cloud = x
        with torch.no_grad():
            grads = sinkhorn_grad(x, y, a, b, sol, spec, needs, point_grad=state.point_grad)
        out = []
        for G, given in zip(grads, (inp.x, inp.y, inp.a, inp.b)):
            out.append(None if G is None else (grad * G).to(given.dtype))
        return out[0], out[1], out[2], out[3], None


def sinkhorn_loss(x, y, a=None, b=None, *, p=2, blur=0.05, reach=None, diameter=None, scaling=0.5, debias=True,
                  cost_scale=None, backend="auto", precision=None, group=None, _owner="sinkhorn_loss"):
    r"""``otlinop.sinkhorn_loss`` on point clouds sharded over the ranks of a process group.

    Every rank of ``group`` calls it with its blocks of the clouds (and weights)
    and the same options; it returns the whole loss on every rank,
    differentiable w.r.t. that rank's blocks.

    Parameters
    ----------
    x : Tensor, shape (n_local, d)
        This rank's block of the source points (may be empty).
    y : Tensor, shape (m_local, d)
        This rank's block of the target points (may be empty).
    a, b : Tensor, shapes (n_local,) and (m_local,), optional
        This rank's blocks of the weights; default uniform over the whole clouds.
    p, blur, reach, diameter, scaling, debias, cost_scale, backend, precision
        As ``otlinop.sinkhorn_loss`` (``cost_scale`` default 0.5; the default
        diameter is that of every rank's points).
    group : ProcessGroup, optional
        The process group; None means the default group.

    Returns
    -------
    Tensor, shape ()
        The loss, bitwise the same on every rank.

    Raises
    ------
    RuntimeError
        When ``torch.distributed`` is not initialised.
    NotImplementedError
        For ``p`` other than 2; in a backward with ``create_graph=True``
        (second derivatives are not implemented here).
    ValueError, TypeError
        As ``otlinop.sinkhorn_loss``; batched clouds are refused.

    Notes
    -----
    The value and gradients are those of ``otlinop.sinkhorn_loss`` (its
    Notes give the formulas), balanced or unbalanced (``reach``), with or
    without ``debias``: the potentials come from the same symmetric loop,
    whose soft-mins are rings over the ranks' blocks
    (``otlinop.distributed.sinkhorn``); the value is the ranks' parts
    ``<a_r, f_r - f_aa,r> + <b_r, g_r - g_bb,r>`` (balanced) added in rank
    order. The backward is a collective: every rank must run it (each with
    the gradient of its own copy of the loss); it returns the gradient w.r.t.
    the rank's own blocks of x, y, a, b: ``c2 (ah x - P y)`` from one ring of
    ``plan_apply_scaled`` passes per cloud and side (two with ``debias``),
    the weights' gradients from the local potentials. Absent: second
    derivatives, batches, ``potentials=True``, ``converge`` (the potentials
    are the schedule's, GeomLoss' semantics).

    Examples
    --------
    >>> import os, tempfile, torch, torch.distributed as dist
    >>> import otlinop, otlinop.distributed
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    >>> x = torch.randn(30, 2, dtype=torch.float64, requires_grad=True)
    >>> y = torch.randn(20, 2, dtype=torch.float64)
    >>> value = otlinop.distributed.sinkhorn_loss(x, y, blur=0.3)
    >>> value.backward()
    >>> (gx,) = torch.autograd.grad(otlinop.sinkhorn_loss(x, y, blur=0.3), x)
    >>> torch.allclose(x.grad, gx, rtol=1e-12, atol=1e-12)
    True
    >>> dist.destroy_process_group()
    """
    owner = _owner
    if isinstance(p, bool) or p != 2:
        raise NotImplementedError(f"{owner}: only p=2 (the cost |x-y|^2/2, or cost_scale*|x-y|^2) is implemented, "
                                  f"got p={p!r}")
    blur = positive_scalar(owner, "blur", blur)
    reach = reach_or_none(owner, "reach", reach)
    scaling = fraction(owner, "scaling", scaling)
    cost_scale = 0.5 if cost_scale is None else positive_scalar(owner, "cost_scale", cost_scale)
    flag(owner, "debias", debias)
    backend = None if backend in ("auto", "tensorized", "online") else backend_name(owner, backend)
    precision = precision_name(owner, precision)
    rho = None if reach is None else reach * reach
    inp, rows, cols = sharded_measures(owner, x, y, a, b, balanced=rho is None, group=group)
    check_backend(owner, backend, x)
    if diameter is None:
        diameter = global_diameter(x.detach(), y.detach(), group)
        if diameter <= 0:
            diameter = blur
    else:
        diameter = positive_scalar(owner, "diameter", diameter)
    eps, schedule, _ = resolve_eps(owner, "symmetric", blur, None, scaling, diameter, inp)
    spec = Spec(eps_list=tuple(schedule), eps=eps, rho_x=rho, rho_y=rho, debias=debias, cost_scale=cost_scale,
                backend=backend, precision=precision)
    ops = ShardedOps(rows, cols, x.shape[-1], group)
    data = type(inp)(inp.x.detach(), inp.y.detach(), inp.a.detach(), inp.b.detach(), False)
    monitor = Monitor(check_every=1 << 30, callback=None, bar=None, method="symmetric", inp=data, kept=False)
    with torch.no_grad():
        pots, pre, _ = symmetric_loop(data, list(schedule), rho, rho, debias=debias, f0=None, g0=None,
                                      monitor=monitor, cost_scale=cost_scale, backend=backend, precision=precision,
                                      ops=ops)
    sol = Solution(pots[0], pots[1], pre[0], pre[1])
    if debias:
        sol.f_aa, sol.g_bb, sol.f_aa_pre, sol.g_bb_pre = pots[2], pots[3], pre[2], pre[3]
    state = _State(inp, sol, spec, ops, group, owner)
    value = _ShardedLoss.apply(inp.x, inp.y, inp.a, inp.b, state)
    return value.to(x.dtype)


def sinkhorn_loss_dtensor(x, y, a=None, b=None, **options):
    """:func:`sinkhorn_loss` on DTensors sharded on the point dimension (their local shards over the
    mesh's group); the loss is a plain tensor, the same on every rank, whose gradients reach the DTensors."""
    owner = options.pop("_owner", "sinkhorn_loss")
    shards, mesh = dtensor_shards(owner, dict(x=x, y=y, a=a, b=b))
    return sinkhorn_loss(shards["x"], shards["y"], shards["a"], shards["b"], group=mesh.get_group(), _owner=owner,
                         **options)
