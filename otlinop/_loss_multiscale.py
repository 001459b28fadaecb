"""``SamplesLoss(backend="multiscale")``: the Sinkhorn loss on block-sparse plans (GeomLoss' multiscale backend).

The potentials come from the coarse-to-fine loop of
``otlinop._sinkhorn_multiscale`` (GeomLoss' schedule alone, as the dense
loss: no convergence loop), one run for OT(a, b) and, with ``debias``, one
each for OT(a, a) and OT(b, b) on the same clusterings. The value and the
gradients are the dense loss's formulas (``otlinop.loss``'s module
docstring) with the block-sparse plans of the final extrapolation step:

    grad_x OT = c2 a (x - ybar),   ybar = P y / P 1,   P = P(f, g_pre) on the kept pairs,

minus the same on (x, x) with debiasing; ``grad_a = f - f_aa``. Balanced
problems, unbatched, d <= 3; first derivatives only. With ``converge="always"``
each run continues at the final eps until its marginal error is below the
converging solves' tolerance, as the dense loss does.
"""

from __future__ import annotations

import math
import warnings

import torch

from solvers import config
from solvers._function import Function

from ._sinkhorn_multiscale import check_dimension, cluster_clouds, multiscale_loop
from .kernels._reference import compute_dtype
from .kernels.blocksparse import blocksparse_apply_unchecked

__all__ = ["refuse_for_multiscale", "MultiscaleLoss", "multiscale_potentials"]


def refuse_for_multiscale(owner: str, x, *, reach, potentials: bool = False) -> None:
    """What ``backend="multiscale"`` does not serve, refused with the reason."""
    if reach is not None:
        raise NotImplementedError(f"{owner}: backend='multiscale' computes balanced losses only (reach=None); "
                                  f"got reach={reach}; use backend='auto' for unbalanced OT")
    if torch.compiler.is_compiling():
        raise NotImplementedError(f"{owner}: backend='multiscale' is not available under torch.compile (its "
                                  "clustering reads the number of clusters back); use backend='auto' there")
    if isinstance(x, torch.Tensor) and x.ndim == 3:
        raise NotImplementedError(f"{owner}: backend='multiscale' takes one problem, not a batch (x has shape "
                                  f"{tuple(x.shape)}); loop over the batch or use backend='auto'")
    if isinstance(x, torch.Tensor) and x.ndim == 2:
        check_dimension(owner, x.shape[1])


def _solve(owner, x, y, a, b, setup):
    """Clusterings and the multiscale solutions of OT(a, b) [, OT(a, a), OT(b, b)], detached."""
    ms, schedule, cost_scale, debias, backend, precision, converge = setup
    dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    with torch.no_grad(), config.override(check_finite=False):
        clouds = cluster_clouds(owner, x, y, a, b, options=ms, diameter=math.sqrt(schedule[0]))
        run = dict(truncate=ms.truncate, prune_tol=ms.prune_tol, cluster_scale=clouds.scale, cost_scale=cost_scale,
                   backend=backend, precision=precision, pot_dtype=dt)
        if converge is not None:
            # converge="always": averaged steps at the final eps until the marginal error is below
            # the tolerance (converge[0]), at most converge[1] of them.
            run.update(threshold=converge[0], refine=converge[1])
        sols = [multiscale_loop(clouds.cx, clouds.cy, schedule, **run)]
        if debias:
            sols += [multiscale_loop(clouds.cx, clouds.cx, schedule, **run),
                     multiscale_loop(clouds.cy, clouds.cy, schedule, **run)]
    if converge is not None:
        worst = max((sol.errors[-1] if sol.errors else math.nan) for sol in sols)
        if not worst <= converge[0]:
            warnings.warn(f"{owner}: the converging multiscale solve stopped after {converge[1]} steps at the final "
                          f"eps with marginal error {worst:.2e} > {converge[0]:.2e}; the value and gradients are "
                          "those of these potentials", RuntimeWarning, stacklevel=5)
    return clouds, sols


def _point_grad(cx, cy, pattern, f, g_pre, eps, cost_scale, backend, precision):
    """``c2 a (x - P y / P 1)`` on permuted points for ``P = P(f, g_pre)`` on the pattern: (n, d)."""
    x, y = cx.points.to(f.dtype), cy.points.to(f.dtype)
    V = torch.cat([torch.ones_like(y[:, :1]), y], dim=1)
    log = lambda w: torch.log(w.to(f.dtype))  # noqa: E731
    PV = blocksparse_apply_unchecked(x, y, f, g_pre, V, cx.starts, cy.starts, pattern.ptr, pattern.idx, eps=eps,
                                     log_a=log(cx.weights), log_b=log(cy.weights), cost_scale=cost_scale,
                                     backend=backend, precision=precision)
    rows = PV[:, :1]
    ybar = PV[:, 1:] / torch.where(rows > 0, rows, torch.ones_like(rows))
    a = cx.weights.to(f.dtype)[:, None]
    return 2.0 * cost_scale * torch.where(rows > 0, a * (x - ybar), torch.zeros_like(x))


class MultiscaleLoss(Function):
    """The (debiased) multiscale Sinkhorn loss of one balanced problem, a scalar; analytic first derivatives."""

    @staticmethod
    def forward(ctx, x, y, a, b, owner, setup):
        clouds, sols = _solve(owner, x.detach(), y.detach(), a.detach(), b.detach(), setup)
        F, G = _debiased(sols)
        ctx.state = (clouds, sols, setup)
        ctx.dtypes = (x.dtype, y.dtype, a.dtype, b.dtype)
        value = (clouds.cx.weights.to(F.dtype) * F).sum() + (clouds.cy.weights.to(G.dtype) * G).sum()
        return value.to(compute_dtype(x.dtype))

    @staticmethod
    def backward(ctx, grad_value):
        if torch.is_grad_enabled():
            raise NotImplementedError("SamplesLoss: backend='multiscale' has first derivatives only (no double "
                                      "backward / create_graph=True); use backend='auto' for Hessian-vector "
                                      "products, or otlinop.hvp.plan_hvp on sinkhorn(..., multiscale=...).plan")
        clouds, sols, setup = ctx.state
        _, schedule, cost_scale, debias, backend, precision, _ = setup
        eps = schedule[-1]
        cx, cy = clouds.cx, clouds.cy
        need_x, need_y, need_a, need_b = ctx.needs_input_grad[:4]
        gx = gy = ga = gb = None
        with torch.no_grad():
            if need_x:
                gx = _point_grad(cx, cy, sols[0].pattern, sols[0].f, sols[0].g_pre, eps, cost_scale, backend,
                                 precision)
                if debias:
                    gx = gx - _point_grad(cx, cx, sols[1].pattern, sols[1].f, sols[1].g_pre, eps, cost_scale,
                                          backend, precision)
                gx = (grad_value * gx)[cx.inverse].to(ctx.dtypes[0])
            if need_y:
                gy = _point_grad(cy, cx, sols[0].pattern.T, sols[0].g, sols[0].f_pre, eps, cost_scale, backend,
                                 precision)
                if debias:
                    gy = gy - _point_grad(cy, cy, sols[2].pattern, sols[2].f, sols[2].g_pre, eps, cost_scale,
                                          backend, precision)
                gy = (grad_value * gy)[cy.inverse].to(ctx.dtypes[1])
            F, G = _debiased(sols)
            if need_a:
                ga = (grad_value * F)[cx.inverse].to(ctx.dtypes[2])
            if need_b:
                gb = (grad_value * G)[cy.inverse].to(ctx.dtypes[3])
        return gx, gy, ga, gb, None, None


def _debiased(sols):
    """``(f - f_aa, g - g_bb)`` (permuted), or ``(f, g)`` without debiasing."""
    if len(sols) == 1:
        return sols[0].f, sols[0].g
    return sols[0].f - sols[1].f, sols[0].g - sols[2].f


def multiscale_potentials(owner, x, y, a, b, setup):
    """The (debiased) potentials ``(F, G)`` in the caller's order, detached (``potentials=True``)."""
    clouds, sols = _solve(owner, x.detach(), y.detach(), a.detach(), b.detach(), setup)
    F, G = _debiased(sols)
    return F[clouds.cx.inverse], G[clouds.cy.inverse]
