"""The Sinkhorn loss at a solution: its potentials, value, gradients and Hessian-vector products.

``otlinop.loss`` checks the options and builds a :class:`Spec` (the eps
schedule, the reaches, debiasing, kernel options); :func:`solve` runs GeomLoss'
symmetric loop (``otlinop._sinkhorn_loops``) into a :class:`Solution`. The
functions below are the formulas of ``otlinop.loss``'s module docstring
(docs/math.md sections 4 and 6) on batched tensors:

- :func:`loss_value`: the per-entry value (B,);
- :func:`sinkhorn_grad`: the gradients w.r.t. the points and the weights,
  one streaming plan pass (:func:`point_grad`) per point cloud and side;
- :func:`sinkhorn_hvp`: Hessian-vector products in the points, one
  ``otlinop.hvp`` call per batch entry, with the inner solves of
  :class:`SecondOrder`.

The autograd Functions that call them are in ``otlinop._loss_functions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import solvers
from solvers import config

from ._checks import Inputs
from ._operators.plan_product import softmin_gradient
from ._sinkhorn_loops import Monitor, symmetric_loop
from .hvp import hvp, hvp_self, hvp_x, hvp_y

__all__ = ["Spec", "SecondOrder", "Solution", "solve", "loss_value", "point_grad", "sinkhorn_grad",
           "sinkhorn_hvp"]


# --------------------------------------------------------------------------
# What defines one evaluation, and its solution
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """Everything but the data that defines one loss evaluation."""

    eps_list: tuple
    eps: float
    rho_x: float | None
    rho_y: float | None
    debias: bool
    cost_scale: float
    backend: str | None
    precision: str | None

    @property
    def relaxed(self) -> bool:
        return self.rho_x is not None or self.rho_y is not None

    @property
    def kernel_options(self) -> dict:
        return dict(cost_scale=self.cost_scale, backend=self.backend, precision=self.precision)

    @property
    def reach_x(self):
        """``sqrt(rho_x)``, the ``reach_x`` of ``otlinop.hvp`` (None when balanced)."""
        return None if self.rho_x is None else math.sqrt(self.rho_x)

    @property
    def reach_y(self):
        """``sqrt(rho_y)`` (None when balanced)."""
        return None if self.rho_y is None else math.sqrt(self.rho_y)


@dataclass(frozen=True)
class SecondOrder:
    """How a double backward solves its Schur systems, and who receives the ``SolveResult``s."""

    owner: str = "SamplesLoss"
    solver: Callable = solvers.cg
    M: object = None
    rtol: float | None = None
    maxiter: int | None = None
    record: Callable | None = None

    @property
    def solve_options(self) -> dict:
        return dict(solver=self.solver, M=self.M, rtol=self.rtol, atol=0.0, maxiter=self.maxiter)


@dataclass
class Solution:
    """Potentials of a loss evaluation (batched): final and pre-extrapolation ones."""

    f: torch.Tensor
    g: torch.Tensor
    f_pre: torch.Tensor
    g_pre: torch.Tensor
    f_aa: torch.Tensor | None = None
    g_bb: torch.Tensor | None = None
    f_aa_pre: torch.Tensor | None = None
    g_bb_pre: torch.Tensor | None = None


def solve(inp: Inputs, spec: Spec, verbose: bool = False) -> Solution:
    """The potentials of the loss on batched, checked data: GeomLoss' symmetric loop on ``spec``'s schedule."""
    bar = None
    if verbose:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(spec.eps_list), desc="SamplesLoss", leave=False)
    monitor = Monitor(check_every=1 << 30, callback=None, bar=bar, method="symmetric", inp=inp)
    with torch.no_grad(), config.override(check_finite=False):
        # Eager steps (no graphs): a schedule without refinement has no run of GRAPH_MIN_RUN steps at one eps.
        pots, pre, _ = symmetric_loop(inp, list(spec.eps_list), spec.rho_x, spec.rho_y, debias=spec.debias,
                                      f0=None, g0=None, monitor=monitor, **spec.kernel_options)
    monitor.finish()
    sol = Solution(pots[0], pots[1], pre[0], pre[1])
    if spec.debias:
        sol.f_aa, sol.g_bb, sol.f_aa_pre, sol.g_bb_pre = pots[2], pots[3], pre[2], pre[3]
    return sol


# --------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------
def _side(w, h, h_self, eps: float, rho) -> torch.Tensor:
    """One side of the loss, per batch entry (B,).

    ``<w, h - h_self>`` (balanced) or ``(rho + eps/2) <w, e^{-h_self/rho} - e^{-h/rho}>``
    (relaxed, GeomLoss' formula), with ``h_self = 0`` when not debiased.
    """
    if rho is None:
        return (w * (h if h_self is None else h - h_self)).sum(-1)
    if h_self is None:
        diff = -torch.expm1(-h / rho)
    else:
        diff = torch.exp(-h_self / rho) - torch.exp(-h / rho)
    return (rho + 0.5 * eps) * (w * diff).sum(-1)


def loss_value(a, b, sol: Solution, spec: Spec) -> torch.Tensor:
    """The loss per batch entry (B,) at ``sol`` (``otlinop.loss``'s module docstring)."""
    return (_side(a, sol.f, sol.f_aa, spec.eps, spec.rho_x)
            + _side(b, sol.g, sol.g_bb, spec.eps, spec.rho_y))


def _weight_grad(h, h_self, eps: float, rho, relaxed: bool) -> torch.Tensor:
    """d loss / d weights on one side (B, n): the derivative of the returned value.

    Balanced: ``h - h_self`` (GeomLoss' gauge). Relaxed:
    ``(rho + eps)(e^{-h_self/rho} - e^{-h/rho})``, i.e. without debiasing
    ``(rho + eps)(1 - e^{-h/rho}) - eps/2`` (the ``-eps/2`` also applies to a
    balanced side of a semi-relaxed problem; docs/math.md section 4).
    """
    def dpsi(t):
        return t if rho is None else (rho + eps) * (-torch.expm1(-t / rho))

    if h_self is not None:
        return dpsi(h) - dpsi(h_self)
    out = dpsi(h)
    return out - 0.5 * eps if relaxed else out


def point_grad(x, y, f, g_pre, a, b, spec: Spec, *, rho=None) -> torch.Tensor:
    """``c2 (ah * x - P y) = c2 ah (x - ybar)`` for ``P = P(f, g_pre)`` on (x, y), batched: one plan pass.

    ``f`` is the damped soft-min of ``g_pre`` (the final extrapolation), so the
    rows of P are the soft-min's weights times the masses ``ah = P 1``: ``a``
    on a balanced side, ``a e^{-f/rho}`` on a relaxed one (``f = lam smin``,
    ``(f - smin) / eps = -f / rho``). ``ybar`` is their normalised average of
    y (``softmin_gradient``): ``f`` never enters a plan exponent, where
    float32 would know ``f / eps`` only to ``|f| / eps * 2^-24``.
    """
    ah = a if rho is None else a * torch.exp(-f / rho)
    return softmin_gradient(x, y, g_pre, ah, eps=spec.eps, b=b, **spec.kernel_options)


def sinkhorn_grad(x, y, a, b, sol: Solution, spec: Spec, needs, *, point_grad=point_grad) -> tuple:
    """Gradients of the per-entry loss (B,) w.r.t. x, y, a, b (None where not needed).

    All tensors are batched and in the potentials' dtype. Implements the
    formulas of ``otlinop.loss``'s module docstring with ``plan_matmul``
    passes: one per point cloud, two with debiasing, each a ``point_grad``
    call (an argument so that a test can count them).
    """
    need_x, need_y, need_a, need_b = needs
    gx = gy = ga = gb = None
    if need_x:
        gx = point_grad(x, y, sol.f, sol.g_pre, a, b, spec, rho=spec.rho_x)
        if spec.debias:
            gx = gx - point_grad(x, x, sol.f_aa, sol.f_aa_pre, a, a, spec, rho=spec.rho_x)
    if need_y:
        gy = point_grad(y, x, sol.g, sol.f_pre, b, a, spec, rho=spec.rho_y)
        if spec.debias:
            gy = gy - point_grad(y, y, sol.g_bb, sol.g_bb_pre, b, b, spec, rho=spec.rho_y)
    if need_a:
        ga = _weight_grad(sol.f, sol.f_aa, spec.eps, spec.rho_x, spec.relaxed)
    if need_b:
        gb = _weight_grad(sol.g, sol.g_bb, spec.eps, spec.rho_y, spec.relaxed)
    return gx, gy, ga, gb


# --------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------
def _direction(D, i):
    """Entry i of a grad-of-grad direction, or None when absent or zero (nothing to propagate)."""
    if D is None:
        return None
    Di = D[i]
    return Di.contiguous() if bool(Di.any()) else None


def sinkhorn_hvp(x, y, a, b, A, B, sol: Solution, spec: Spec, second: SecondOrder, needs) -> tuple:
    """``(H_x, H_y) = H [A; B]`` for the Hessian H of the per-entry loss in (x, y), batched
    (None where ``needs`` is False).

    A loop over the batch: every entry with a direction is one ``otlinop.hvp``
    call (one Schur solve) at the final potentials, plus one ``hvp_self`` per
    debiased side with a direction. Each inner ``SolveResult`` goes to
    ``second.record``.
    """
    need_x, need_y = needs
    Hx = torch.zeros_like(x) if need_x else None
    Hy = torch.zeros_like(y) if need_y else None
    common = dict(eps=spec.eps, cost_scale=spec.cost_scale, backend=spec.backend, precision=spec.precision,
                  **second.solve_options)

    def record(result):
        if second.record is not None:
            second.record(result)

    for i in range(x.shape[0]):
        Ai, Bi = _direction(A, i), _direction(B, i)
        if Ai is None and Bi is None:
            continue
        args = (x[i], y[i], sol.f[i], sol.g[i])
        kw = dict(common, a=a[i], b=b[i], reach_x=spec.reach_x, reach_y=spec.reach_y)
        hx = hy = None
        if need_x and not need_y and Bi is None:
            hx, result = hvp_x(*args, Ai, **kw)
        elif need_y and not need_x and Ai is None:
            hy, result = hvp_y(*args, Bi, **kw)
        else:
            hx, hy, result = hvp(*args, Ai, Bi, **kw)
        record(result)
        if need_x:
            Hx[i] = hx
        if need_y:
            Hy[i] = hy
        # The self terms OT(a, a)/2 and OT(b, b)/2 depend on one cloud each: no cross blocks.
        if spec.debias and need_x and Ai is not None:
            h, result = hvp_self(x[i], sol.f_aa[i], Ai, a=a[i], reach=spec.reach_x, **common)
            record(result)
            Hx[i] -= h
        if spec.debias and need_y and Bi is not None:
            h, result = hvp_self(y[i], sol.g_bb[i], Bi, a=b[i], reach=spec.reach_y, **common)
            record(result)
            Hy[i] -= h
    return Hx, Hy
