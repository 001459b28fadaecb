"""The Sinkhorn loss between point clouds: a drop-in for ``geomloss.SamplesLoss``.

``SamplesLoss("sinkhorn", p=2, blur=..., reach=..., debias=...)`` computes
GeomLoss' (debiased) Sinkhorn divergence with the cost ``|x - y|^2 / 2``
(``cost_scale`` changes the factor), with the same algorithm (eps-scaling,
averaged updates, final extrapolation; ``otlinop.sinkhorn``) and gradients
w.r.t. the points and the weights from custom autograd Functions: the
iterations are never backpropagated through. A batch of problems runs in one
kernel launch per Sinkhorn step.

Gradients (docs/math.md section 4), with ``c2 = 2 cost_scale`` and the plans of the
final extrapolation step, ``P = P(f, g_pre)`` for x and ``P(f_pre, g)`` for y:

    grad_x OT = c2 (ah * x - P y),   ah = P 1,
    grad_x S  = grad_x OT - c2 (ah_aa * x - P_aa x)      (debias, P_aa = P(f_aa, f_aa_pre) on (x, x)),
    grad_a OT = f (balanced), (rho + eps)(1 - e^{-f/rho}) - eps/2 (relaxed side).

They are computed by ``_sinkhorn_grad`` from streaming plan products.

Second order (double backward, e.g. ``torch.autograd.grad(g @ v, x)`` with
``g = torch.autograd.grad(loss, x, create_graph=True)``): the grad-of-grad
directions ``(A, B)`` of ``(x, y)`` give, per batch entry, the Hessian-vector
products by implicit differentiation (``otlinop.hvp``, docs/math.md section 6) at
the final potentials ``(f, g)``,

    H_x = hvp(x, y, f, g, A, B).Hx - hvp_self(x, f_aa, A)     (the last term with debias only),
    H_y = hvp(x, y, f, g, A, B).Hy - hvp_self(y, g_bb, B),

one Schur-complement solve each (``hvp_solver``, ``hvp_preconditioner``,
``hvp_rtol``, ``hvp_maxiter``). They are exact at converged potentials.
Derivatives that are not implemented (second ones involving the weights,
third ones) raise NotImplementedError when autograd needs them, and only
then: ``_NotImplementedDerivative`` nodes carry those dependencies.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

import solvers
from solvers import config

from .hvp import hvp, hvp_self, hvp_x, hvp_y
from .plan import transport_gradient
from ._checks import (Inputs, backend_name, flag, fraction, measures, positive_int, positive_scalar, precision_name,
                      preconditioner, reach_or_none, solver_function)
from .kernels._dispatch import check_backend
from .sinkhorn import _Monitor, _resolve_eps, _symmetric_loop

__all__ = ["SamplesLoss", "sinkhorn_loss"]

_GEOMLOSS_BACKENDS = ("tensorized", "online", "multiscale")

_WEIGHT_SECOND_ORDER_MESSAGE = (
    "{owner}: second derivatives of the Sinkhorn loss that involve the weights (d^2 S / da^2, d^2 S / da dx, "
    "...) are not implemented, but {why}. Second derivatives w.r.t. the points x and y are implemented: "
    "differentiate the point gradients w.r.t. the points only (torch.autograd.grad(..., inputs=(x, y))), "
    "pass the weights detached (a.detach(), b.detach()), and leave the weight gradients out of the function "
    "you differentiate twice. No approximate answer is returned (autograd through the Sinkhorn iterations "
    "would give a different, unrolled, one).")

_THIRD_ORDER_MESSAGE = (
    "{owner}: third derivatives of the Sinkhorn loss are not implemented: the Hessian-vector "
    "product of a double backward can be differentiated w.r.t. the direction (it is linear in it), not "
    "w.r.t. the points or the weights. Call the second torch.autograd.grad without create_graph, or with "
    "inputs= that exclude the points and weights.")


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
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
class _SecondOrder:
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
class _Solution:
    """Potentials of a loss evaluation (batched): final and pre-extrapolation ones."""

    f: torch.Tensor
    g: torch.Tensor
    f_pre: torch.Tensor
    g_pre: torch.Tensor
    f_aa: torch.Tensor | None = None
    g_bb: torch.Tensor | None = None
    f_aa_pre: torch.Tensor | None = None
    g_bb_pre: torch.Tensor | None = None


def _solve(inp: Inputs, spec: _Spec, verbose: bool = False) -> _Solution:
    bar = None
    if verbose:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(spec.eps_list), desc="SamplesLoss", leave=False)
    monitor = _Monitor(check_every=1 << 30, callback=None, bar=bar, method="symmetric", inp=inp)
    with torch.no_grad(), config.override(check_finite=False):
        pots, pre, _ = _symmetric_loop(inp, list(spec.eps_list), spec.rho_x, spec.rho_y, debias=spec.debias,
                                       f0=None, g0=None, monitor=monitor, **spec.kernel_options)
    monitor.finish()
    sol = _Solution(pots[0], pots[1], pre[0], pre[1])
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


def _loss_value(a, b, sol: _Solution, spec: _Spec) -> torch.Tensor:
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


def _point_grad(x, y, f, g_pre, a, b, spec: _Spec) -> torch.Tensor:
    """``c2 (ah * x - P y)`` for ``P = P(f, g_pre)`` on (x, y), batched: one plan pass."""
    return transport_gradient(x, y, f, g_pre, eps=spec.eps, a=a, b=b, **spec.kernel_options)


def _sinkhorn_grad(x, y, a, b, sol: _Solution, spec: _Spec, needs) -> tuple:
    """Gradients of the per-entry loss (B,) w.r.t. x, y, a, b (None where not needed).

    All tensors are batched and in the potentials' dtype. Implements the
    formulas of the module docstring with ``plan_matmul`` passes: one per
    point cloud, two with debiasing.
    """
    need_x, need_y, need_a, need_b = needs
    gx = gy = ga = gb = None
    if need_x:
        gx = _point_grad(x, y, sol.f, sol.g_pre, a, b, spec)
        if spec.debias:
            gx = gx - _point_grad(x, x, sol.f_aa, sol.f_aa_pre, a, a, spec)
    if need_y:
        gy = _point_grad(y, x, sol.g, sol.f_pre, b, a, spec)
        if spec.debias:
            gy = gy - _point_grad(y, y, sol.g_bb, sol.g_bb_pre, b, b, spec)
    if need_a:
        ga = _weight_grad(sol.f, sol.f_aa, spec.eps, spec.rho_x, spec.relaxed)
    if need_b:
        gb = _weight_grad(sol.g, sol.g_bb, spec.eps, spec.rho_y, spec.relaxed)
    return gx, gy, ga, gb


def _direction(D, i):
    """Entry i of a grad-of-grad direction, or None when absent or zero (nothing to propagate)."""
    if D is None:
        return None
    Di = D[i]
    return Di.contiguous() if bool(Di.any()) else None


def _sinkhorn_hvp(x, y, a, b, A, B, sol: _Solution, spec: _Spec, second: _SecondOrder, needs) -> tuple:
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


class _NotImplementedDerivative(torch.autograd.Function):
    """Zeros that depend on some tensors, with a backward that raises.

    Added to a result whose derivative w.r.t. those tensors is not
    implemented: autograd runs this node (and raises) only when a requested
    gradient needs that derivative, so the implemented ones keep working.
    """

    @staticmethod
    def forward(ctx, message, like, *deps):
        ctx.message = message
        return torch.zeros_like(like)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(ctx.message)


def _guard(t, message: str, *deps):
    """``t``, made to depend on ``deps`` through a ``_NotImplementedDerivative`` when
    recording a graph (differentiating ``t`` w.r.t. ``deps`` then raises ``message``)."""
    if t is None or not torch.is_grad_enabled():
        return t
    deps = [u for u in deps if u.requires_grad]
    if not deps:
        return t
    return t + _NotImplementedDerivative.apply(message, t.detach(), *deps)


def _hessian_product(A, B, data, sol, spec, second, needs) -> tuple:
    """``H [A; B]`` (``_sinkhorn_hvp``) for ``data = (x, y, a, b)``: differentiable
    w.r.t. the directions, and raising if differentiated w.r.t. the data (third order)."""
    Hx, Hy = _SinkhornHvp.apply(A, B, data, sol, spec, second, needs)
    message = _THIRD_ORDER_MESSAGE.format(owner=second.owner)
    return _guard(Hx, message, *data), _guard(Hy, message, *data)


class _SinkhornHvp(torch.autograd.Function):
    """``(A, B) -> H [A; B]`` with the data ``(x, y, a, b)`` held fixed.

    Linear in the directions, with a symmetric H: its backward is the same
    product applied to the incoming gradients (what
    ``torch.autograd.functional.hvp``'s double-vjp trick differentiates).
    """

    @staticmethod
    def forward(ctx, A, B, data, sol, spec, second, needs):
        ctx.set_materialize_grads(False)
        ctx.data, ctx.sol, ctx.spec, ctx.second = data, sol, spec, second
        x, y, a, b = (t.detach() for t in data)
        return _sinkhorn_hvp(x, y, a, b, A, B, sol, spec, second, needs)

    @staticmethod
    def backward(ctx, gx, gy):
        needs = tuple(ctx.needs_input_grad[:2])
        if not any(needs) or (gx is None and gy is None):
            return None, None, None, None, None, None, None
        dA, dB = _hessian_product(gx, gy, ctx.data, ctx.sol, ctx.spec, ctx.second, needs)
        return dA, dB, None, None, None, None, None


class _SinkhornGrad(torch.autograd.Function):
    """The gradient map (x, y) -> (grad_x, grad_y, grad_a, grad_b) at a solution.

    The weights come in detached: derivatives w.r.t. them are guarded by the
    caller (``_SinkhornLoss.backward``), so that differentiating the point
    gradients w.r.t. the points works whether the weights require grad or
    not. ``backward`` (the double backward of the loss) returns the
    Hessian-vector products ``H [A; B]`` in x and y; a direction on the
    weight gradients raises (their derivatives are not implemented).
    ``weights`` are the caller's weights (for the third-order guard).
    """

    @staticmethod
    def forward(ctx, x, y, a, b, sol, spec, needs, second, weights):
        ctx.set_materialize_grads(False)   # an unused gradient arrives as None: no HVP for it
        ctx.sol, ctx.spec, ctx.second, ctx.weights = sol, spec, second, weights
        ctx.save_for_backward(x, y, a, b)
        return _sinkhorn_grad(x, y, a, b, sol, spec, needs)

    @staticmethod
    def backward(ctx, A, B, dA, dB):
        x, y, a, b = ctx.saved_tensors
        for name, D in (("a", dA), ("b", dB)):
            if D is not None and bool(D.any()):
                why = f"the function differentiated twice depends on the gradient w.r.t. the weights {name}"
                raise NotImplementedError(_WEIGHT_SECOND_ORDER_MESSAGE.format(owner=ctx.second.owner, why=why))
        needs = tuple(ctx.needs_input_grad[:2])
        if A is None and B is None:
            return (None,) * 9
        Hx, Hy = _hessian_product(A, B, (x, y, *ctx.weights), ctx.sol, ctx.spec, ctx.second, needs)
        return Hx, Hy, None, None, None, None, None, None, None


class _SinkhornLoss(torch.autograd.Function):
    """Per-entry Sinkhorn loss (B,) of batched (x, y, a, b); gradients by ``_SinkhornGrad``."""

    @staticmethod
    def forward(ctx, x, y, a, b, spec, second, verbose):
        inp = Inputs(x.detach(), y.detach(), a.detach(), b.detach(), batched=True)
        sol = _solve(inp, spec, verbose)
        dt = inp.pot_dtype
        value = _loss_value(inp.a.to(dt), inp.b.to(dt), sol, spec)
        ctx.spec, ctx.sol, ctx.second = spec, sol, second
        ctx.save_for_backward(x, y, a, b)
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_value):
        inputs = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if not any(needs):
            return None, None, None, None, None, None, None
        sol, spec, second = ctx.sol, ctx.spec, ctx.second
        dt = sol.f.dtype
        x, y, a, b = (t.to(dt) for t in inputs)
        grads = _SinkhornGrad.apply(x, y, a.detach(), b.detach(), sol, spec, needs, second, (a, b))
        names = " and ".join(n for n, t in (("a", a), ("b", b)) if t.requires_grad)
        if names and torch.is_grad_enabled():
            # The gradients' derivatives w.r.t. the weights (d^2 S / da dx, d^2 S / da^2) are not implemented.
            why = f"a derivative of the gradients w.r.t. the weights {names} was requested"
            message = _WEIGHT_SECOND_ORDER_MESSAGE.format(owner=second.owner, why=why)
            grads = [_guard(gt, message, a, b) for gt in grads]
        w = grad_value.to(dt)
        out = []
        for t, gt in zip(inputs, grads):
            if gt is None:
                out.append(None)
                continue
            scale = w.view(-1, *([1] * (gt.ndim - 1)))
            out.append((scale * gt).to(t.dtype))
        return (*out, None, None, None)


# --------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------
def _squeeze_weights(w, pts):
    """GeomLoss accepts (N, 1) and (B, N, 1) weights: drop the trailing 1."""
    if isinstance(w, torch.Tensor) and isinstance(pts, torch.Tensor) and w.ndim == pts.ndim and w.shape[-1] == 1:
        return w.squeeze(-1)
    return w


def _resolve_backend(owner: str, backend):
    if isinstance(backend, str) and backend in ("tensorized", "online"):
        # Both compute the exact loss in GeomLoss; here one streaming
        # implementation serves both (Triton on CUDA, torch otherwise).
        return None
    if isinstance(backend, str) and backend == "multiscale":
        warnings.warn(f"{owner}: backend='multiscale' (GeomLoss' kernel truncation) is not implemented; "
                      "computing the exact loss with backend='auto' instead", stacklevel=3)
        return None
    # GeomLoss' three names are mapped above; the rest are the package's.
    return backend_name(owner, backend)


def _check_options(owner: str, loss, p, blur, reach, diameter, scaling, cost, kernel, cluster_scale,
                   cost_scale, debias, potentials, precision):
    if loss != "sinkhorn":
        raise NotImplementedError(
            f"{owner}: only loss='sinkhorn' is implemented, got loss={loss!r}; for 'hausdorff', "
            "'energy', 'gaussian' or 'laplacian' use geomloss.SamplesLoss")
    if isinstance(p, bool) or p != 2:
        raise NotImplementedError(
            f"{owner}: only p=2 (the cost |x-y|^2/2, or cost_scale*|x-y|^2) is implemented, got p={p!r}")
    if cost is not None:
        raise NotImplementedError(
            f"{owner}: custom cost functions are not supported (the kernels stream the squared Euclidean "
            "cost); for C = c|x-y|^2 pass cost_scale=c instead of cost=...")
    if kernel is not None:
        raise NotImplementedError(f"{owner}: kernel= is only used by GeomLoss' kernel losses, which are not "
                                  "implemented here")
    if cluster_scale is not None:
        warnings.warn(f"{owner}: cluster_scale is ignored (no multiscale backend: the loss is exact)",
                      stacklevel=3)
    blur = positive_scalar(owner, "blur", blur)
    reach = reach_or_none(owner, "reach", reach)
    if diameter is not None:
        diameter = positive_scalar(owner, "diameter", diameter)
    scaling = fraction(owner, "scaling", scaling)
    # GeomLoss' p=2 cost is |x-y|^2/2: cost_scale None means 0.5 here (1.0 elsewhere in the package).
    cost_scale = 0.5 if cost_scale is None else positive_scalar(owner, "cost_scale", cost_scale)
    flag(owner, "debias", debias)
    flag(owner, "potentials", potentials)
    precision_name(owner, precision)
    return blur, reach, diameter, scaling, cost_scale


def _check_second_order(owner: str, solver, M, rtol, maxiter) -> dict:
    """The options of the double backward's inner solves; returns ``_SecondOrder`` keywords."""
    solver_function(owner, "hvp_solver", solver)
    preconditioner(owner, "hvp_preconditioner", M)
    if rtol is not None:
        rtol = positive_scalar(owner, "hvp_rtol", rtol)
    if maxiter is not None:
        maxiter = positive_int(owner, "hvp_maxiter", maxiter)
    return dict(owner=owner, solver=solver, M=M, rtol=rtol, maxiter=maxiter)


def _samples_loss(owner: str, a, x, b, y, *, blur, reach, diameter, scaling, cost_scale, debias,
                  potentials, backend, precision, verbose, second: _SecondOrder):
    shape_a = a.shape if isinstance(a, torch.Tensor) else None
    shape_b = b.shape if isinstance(b, torch.Tensor) else None
    a = _squeeze_weights(a, x)
    b = _squeeze_weights(b, y)
    rho = None if reach is None else reach * reach
    inp = measures(owner, x, y, a, b, balanced=rho is None)
    check_backend(owner, backend, x)
    eps, schedule, _ = _resolve_eps(owner, "symmetric", blur, None, scaling, diameter, inp)
    spec = _Spec(eps_list=tuple(schedule), eps=eps, rho_x=rho, rho_y=rho, debias=debias,
                 cost_scale=cost_scale, backend=backend, precision=precision)
    if potentials:
        sol = _solve(Inputs(inp.x.detach(), inp.y.detach(), inp.a.detach(), inp.b.detach(), True),
                     spec, verbose)
        F = sol.f if sol.f_aa is None else sol.f - sol.f_aa
        G = sol.g if sol.g_bb is None else sol.g - sol.g_bb
        F, G = inp.unbatch(F).to(x.dtype), inp.unbatch(G).to(x.dtype)
        # Shaped like the weights, as GeomLoss (view_as).
        return F.reshape(shape_a or F.shape), G.reshape(shape_b or G.shape)
    value = _SinkhornLoss.apply(inp.x, inp.y, inp.a, inp.b, spec, second, verbose)
    return value if inp.batched else value[0]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
class SamplesLoss(torch.nn.Module):
    r"""Sinkhorn divergence between sampled measures; a drop-in for ``geomloss.SamplesLoss``.

    Parameters
    ----------
    loss : str, default "sinkhorn"
        Only "sinkhorn" is implemented (NotImplementedError otherwise).
    p : int, default 2
        Only 2 is implemented: the cost is ``|x - y|^2 / 2``.
    blur : float, default 0.05
        Final length scale; ``eps = blur**2``.
    reach : float, optional
        Unbalanced OT with marginal penalties ``rho = reach**2``; None: balanced
        (equal total masses required).
    diameter : float, optional
        First scale of the eps schedule; default the bounding-box diagonal.
    scaling : float, default 0.5
        Ratio of consecutive blur scales in the schedule, in (0, 1).
    truncate : float, default 5
        Accepted for compatibility; only GeomLoss' multiscale backend uses it.
    cost : None
        Custom costs are not supported (NotImplementedError); use ``cost_scale``.
    kernel, cluster_scale : None
        Accepted for compatibility (kernel losses and multiscale only).
    debias : bool, default True
        Return the Sinkhorn divergence ``S = OT(a,b) - OT(a,a)/2 - OT(b,b)/2``
        rather than ``OT(a,b)``.
    potentials : bool, default False
        Return the dual potentials ``(F, G)`` (debiased ones ``f - f_aa``,
        ``g - g_bb`` with ``debias=True``, as GeomLoss), shaped like the weights
        ((N,) or (B, N) for uniform weights; GeomLoss 0.3.1's tensorized backend
        returns (1, N) for unbatched inputs), detached from autograd.
    verbose : bool, default False
        Show a progress bar over the eps schedule.
    backend : {"auto", None, "torch", "triton"}, default "auto"
        "auto" (or None): Triton for CUDA float32/16/bf16 inputs, torch otherwise.
        GeomLoss' "tensorized" and "online" map to "auto" (both exact);
        "multiscale" too, with a warning (no kernel truncation here).
    cost_scale : float, optional
        ``c`` in ``C = c |x - y|^2``; default 0.5 (GeomLoss' ``p = 2``).
    precision : {None, "ieee", "tf32", "tf32x3"}
        Precision of the Triton dot products (None: accurate to fp32).
    hvp_solver : callable, default ``solvers.cg``
        Second order only: the solver of the Schur system of each
        Hessian-vector product, ``hvp_solver(S, rhs, M=, rtol=, atol=,
        maxiter=)`` returning a ``SolveResult`` (``solvers.minres`` works too).
    hvp_preconditioner : operator or preconditioner factory, optional
        Second order only: ``M`` for that solve, e.g. ``solvers.jacobi()``
        (helps with skewed weights) or ``solvers.neumann(3)``.
    hvp_rtol : float, optional
        Second order only: the inner solve's relative residual; default
        ``otlinop.hvp``'s (1e-11 in float64, 1e-5 otherwise).
    hvp_maxiter : int, optional
        Second order only: the inner solve's iteration limit (default the
        solver's).

    Attributes
    ----------
    last_hvp_solve : SolveResult or None
        The ``SolveResult`` of the last inner solve of the last double
        backward (None before any). Per batch entry the solves are that of
        ``OT(a, b)``, then, with ``debias``, those of ``OT(a, a)`` and
        ``OT(b, b)``; check ``converged`` and ``n_iter`` here.

    Raises
    ------
    NotImplementedError
        For ``loss`` other than "sinkhorn", ``p`` other than 2, a custom
        ``cost`` or ``kernel``, cluster labels (the six-argument call); in a
        double backward, for second derivatives involving the weights, and
        for third derivatives.
    ValueError, TypeError
        For invalid options (at construction) or inputs (at the call).

    Notes
    -----
    Call as ``loss(x, y)`` (uniform weights) or ``loss(a, x, b, y)``; x is
    (N, D) or (B, N, D), a is (N,), (N, 1), (B, N) or (B, N, 1). Returns a
    scalar, or a (B,) vector for a batch (solved in one launch per step). As
    in GeomLoss, the default ``diameter`` of a batch is that of all its
    entries together, so one entry may differ slightly from the same problem
    solved alone; pass ``diameter`` to make them identical.

    With the final potentials ``(f, g)`` (and ``f_aa``, ``g_bb`` of OT(a,a),
    OT(b,b)), the value is ``<a, f - f_aa> + <b, g - g_bb>`` when balanced and
    ``(rho + eps/2)(<a, e^{-f_aa/rho} - e^{-f/rho}> + <b, e^{-g_bb/rho} - e^{-g/rho}>)``
    when not (drop the ``_aa``, ``_bb`` terms without debias).

    Gradients w.r.t. x, y, a, b come from the final extrapolation step only
    (GeomLoss' semantics), never through the iterations; they equal GeomLoss'
    autograd gradients in the balanced case. In the unbalanced case they are
    the derivatives of the returned value (``(rho + eps)`` factor, Séjourné et
    al. 2019, Prop. 12), whereas GeomLoss 0.3.1's autograd applies its forward
    factor ``rho + eps/2``: its point gradients are ``(rho + eps/2)/(rho + eps)``
    times these.

    **Second order.** The point gradients can be differentiated again
    (double backward): with ``g = torch.autograd.grad(value, x,
    create_graph=True)``, ``torch.autograd.grad((g * v).sum(), (x, y))``
    returns ``(H_xx v, H_yx v)``, Hessian-vector products by implicit
    differentiation (``otlinop.hvp``; docs/math.md section 6), never by
    autograd through the iterations. For grad-of-grad directions ``(A, B)``
    of ``(x, y)``, each batch entry costs one ``otlinop.hvp.hvp`` call (one
    Schur solve, ``hvp_solver`` preconditioned by ``hvp_preconditioner``) at
    the final potentials ``(f, g)``; with ``debias``, ``otlinop.hvp.hvp_self``
    at ``f_aa`` (resp. ``g_bb``) is subtracted on each side that has a
    direction:

        H_x = Hx(x, y, f, g; A, B) - H_self(x, f_aa; A),
        H_y = Hy(x, y, f, g; A, B) - H_self(y, g_bb; B).

    The batch entries run one after the other (the Schur solves differ).
    The products are exact at converged potentials. GeomLoss' schedule
    (``scaling``, ``diameter``, ``blur``) fixes the number of iterations, so
    the final potentials are converged only as far as the schedule takes
    them: their accuracy, and the HVP's, improve with ``scaling`` closer to 1
    (more steps near the final eps) and with a larger ``blur`` relative to
    the diameter. The inner solves' status is in ``last_hvp_solve``
    (``hvp_log`` for ``sinkhorn_loss``).
    Second derivatives that involve the weights raise NotImplementedError
    (a direction on the weight gradients, or a requested derivative of the
    gradients w.r.t. weights that require grad, e.g. ``.backward()`` on a
    function of the gradients); those w.r.t. the points work whether the
    weights require grad or not. The HVP is linear in its direction and can
    be differentiated w.r.t. it (``torch.autograd.functional.hvp`` and
    ``hessian`` work), but not w.r.t. the points: third derivatives raise.

    Examples
    --------
    >>> import torch
    >>> from otlinop.loss import SamplesLoss
    >>> x = torch.randn(200, 3, requires_grad=True); y = torch.randn(150, 3) + 1
    >>> L = SamplesLoss("sinkhorn", p=2, blur=0.05)
    >>> value = L(x, y)
    >>> value.backward()
    >>> x.grad.shape
    torch.Size([200, 3])

    A Hessian-vector product by double backward, with a preconditioned inner
    solve:

    >>> import solvers
    >>> x = torch.randn(40, 2, dtype=torch.float64, requires_grad=True)
    >>> y = torch.randn(30, 2, dtype=torch.float64)
    >>> L = SamplesLoss(blur=0.5, hvp_preconditioner=solvers.jacobi())
    >>> (g,) = torch.autograd.grad(L(x, y), x, create_graph=True)
    >>> v = torch.randn_like(x)
    >>> (Hv,) = torch.autograd.grad((g * v).sum(), x)
    >>> Hv.shape, L.last_hvp_solve.converged
    (torch.Size([40, 2]), True)
    """

    def __init__(self, loss="sinkhorn", p=2, blur=0.05, reach=None, diameter=None, scaling=0.5, truncate=5,
                 cost=None, kernel=None, cluster_scale=None, debias=True, potentials=False, verbose=False,
                 backend="auto", cost_scale=None, precision=None, hvp_solver=solvers.cg, hvp_preconditioner=None,
                 hvp_rtol=None, hvp_maxiter=None):
        super().__init__()
        owner = "SamplesLoss"
        blur, reach, diameter, scaling, cost_scale = _check_options(
            owner, loss, p, blur, reach, diameter, scaling, cost, kernel, cluster_scale, cost_scale,
            debias, potentials, precision)
        second = _check_second_order(owner, hvp_solver, hvp_preconditioner, hvp_rtol, hvp_maxiter)
        self.hvp_solver, self.hvp_preconditioner = second["solver"], second["M"]
        self.hvp_rtol, self.hvp_maxiter = second["rtol"], second["maxiter"]
        self.last_hvp_solve = None
        self.loss, self.p = loss, p
        self.blur, self.reach, self.diameter, self.scaling = blur, reach, diameter, scaling
        self.truncate, self.cluster_scale = truncate, cluster_scale
        self.debias, self.potentials, self.verbose = debias, potentials, bool(verbose)
        self.backend = backend
        self._backend = _resolve_backend(owner, backend)
        self.cost_scale, self.precision = cost_scale, precision

    def forward(self, *args):
        """``loss(x, y)`` or ``loss(a, x, b, y)``; see the class docstring."""
        owner = "SamplesLoss"
        if len(args) == 2:
            x, y = args
            a = b = None
        elif len(args) == 4:
            a, x, b, y = args
        elif len(args) == 6:
            raise NotImplementedError(f"{owner}: cluster labels (the six-argument call l_x, a, x, l_y, b, y) "
                                      "belong to GeomLoss' multiscale backend and are not implemented; "
                                      "call loss(a, x, b, y)")
        else:
            raise TypeError(f"{owner}: expected loss(x, y) or loss(a, x, b, y), got {len(args)} arguments")
        second = _SecondOrder(**_check_second_order(owner, self.hvp_solver, self.hvp_preconditioner,
                                                    self.hvp_rtol, self.hvp_maxiter),
                              record=self._record_hvp_solve)
        return _samples_loss(owner, a, x, b, y, blur=self.blur, reach=self.reach, diameter=self.diameter,
                             scaling=self.scaling, cost_scale=self.cost_scale, debias=self.debias,
                             potentials=self.potentials, backend=self._backend, precision=self.precision,
                             verbose=self.verbose, second=second)

    def _record_hvp_solve(self, result) -> None:
        self.last_hvp_solve = result

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, p={self.p}, blur={self.blur}, reach={self.reach}, "
                f"diameter={self.diameter}, scaling={self.scaling}, debias={self.debias}, "
                f"potentials={self.potentials}, cost_scale={self.cost_scale}, backend={self.backend!r}, "
                f"precision={self.precision!r}")


def sinkhorn_loss(x, y, a=None, b=None, *, p=2, blur=0.05, reach=None, diameter=None, scaling=0.5,
                  debias=True, potentials=False, cost_scale=None, backend="auto", precision=None,
                  verbose=False, hvp_solver=solvers.cg, hvp_preconditioner=None, hvp_rtol=None,
                  hvp_maxiter=None, hvp_log=None):
    """Functional form of :class:`SamplesLoss` (loss="sinkhorn").

    Parameters
    ----------
    x : Tensor, shape (N, D) or (B, N, D)
    y : Tensor, shape (M, D) or (B, M, D)
    a : Tensor, shape (N,), (N, 1), (B, N) or (B, N, 1), optional
        Weights of x; default uniform.
    b : Tensor, shape like a for y, optional
    p, blur, reach, diameter, scaling, debias, potentials, cost_scale, backend, precision, verbose
        As in :class:`SamplesLoss`.
    hvp_solver, hvp_preconditioner, hvp_rtol, hvp_maxiter
        The inner solves of a double backward, as in :class:`SamplesLoss`.
    hvp_log : list, optional
        Receives (``append``) the ``SolveResult`` of every inner solve of
        the double backwards through the returned value: per batch entry,
        that of ``OT(a, b)``, then with ``debias`` those of ``OT(a, a)`` and
        ``OT(b, b)`` (for the sides that have a direction). This is the
        functional counterpart of ``SamplesLoss.last_hvp_solve``.

    Returns
    -------
    Tensor
        A scalar, (B,) for a batch, or the pair ``(F, G)`` with ``potentials=True``.

    Raises
    ------
    NotImplementedError, ValueError, TypeError
        As :class:`SamplesLoss`; TypeError if ``hvp_log`` is not a list.

    Notes
    -----
    Double backward gives Hessian-vector products in the points (see
    :class:`SamplesLoss`, Notes, "Second order").

    Examples
    --------
    >>> import torch
    >>> from otlinop.loss import sinkhorn_loss
    >>> x = torch.randn(4, 50, 2); y = torch.randn(4, 60, 2)
    >>> sinkhorn_loss(x, y, blur=0.1).shape
    torch.Size([4])

    Second order, with the inner solves logged:

    >>> x = torch.randn(30, 2, dtype=torch.float64, requires_grad=True)
    >>> y = torch.randn(20, 2, dtype=torch.float64)
    >>> log = []
    >>> (g,) = torch.autograd.grad(sinkhorn_loss(x, y, blur=0.5, hvp_log=log), x, create_graph=True)
    >>> (Hv,) = torch.autograd.grad(g.sum(), x)
    >>> len(log), all(r.converged for r in log)     # OT(a, b) and the debiasing OT(a, a)
    (2, True)
    """
    owner = "sinkhorn_loss"
    blur, reach, diameter, scaling, cost_scale = _check_options(
        owner, "sinkhorn", p, blur, reach, diameter, scaling, None, None, None, cost_scale, debias, potentials,
        precision)
    if hvp_log is not None and not isinstance(hvp_log, list):
        raise TypeError(f"{owner}: hvp_log must be a list (it receives the SolveResult of every inner solve "
                        f"of a double backward) or None, got {type(hvp_log).__name__}")
    second = _SecondOrder(**_check_second_order(owner, hvp_solver, hvp_preconditioner, hvp_rtol, hvp_maxiter),
                          record=None if hvp_log is None else hvp_log.append)
    return _samples_loss(owner, a, x, b, y, blur=blur, reach=reach, diameter=diameter, scaling=scaling,
                         cost_scale=cost_scale, debias=debias, potentials=potentials,
                         backend=_resolve_backend(owner, backend), precision=precision, verbose=verbose,
                         second=second)
