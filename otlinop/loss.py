"""The Sinkhorn loss between point clouds: a drop-in for ``geomloss.SamplesLoss``.

``SamplesLoss("sinkhorn", p=2, blur=..., reach=..., debias=...)`` computes
GeomLoss' (debiased) Sinkhorn divergence with the cost ``|x - y|^2 / 2``
(``cost_scale`` changes the factor), with the same algorithm (eps-scaling,
averaged updates, final extrapolation; ``otlinop.sinkhorn``) and gradients
w.r.t. the points and the weights from custom autograd Functions: the
iterations are never backpropagated through. A batch of problems runs in one
kernel launch per Sinkhorn step.

Gradients (MATH.md section 4), with ``c2 = 2 cost_scale`` and the plans of the
final extrapolation step, ``P = P(f, g_pre)`` for x and ``P(f_pre, g)`` for y:

    grad_x OT = c2 (ah * x - P y),   ah = P 1,
    grad_x S  = grad_x OT - c2 (ah_aa * x - P_aa x)      (debias, P_aa = P(f_aa, f_aa_pre) on (x, x)),
    grad_a OT = f (balanced), (rho + eps)(1 - e^{-f/rho}) - eps/2 (relaxed side).

They are computed by ``_sinkhorn_grad`` from streaming plan products; the
second derivative (double backward) is not implemented yet and raises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .plan import plan_matmul
from .sinkhorn import (_Inputs, _Monitor, _no_finite_checks, _positive_float, _prepare, _resolve_eps,
                       _symmetric_loop)

__all__ = ["SamplesLoss", "sinkhorn_loss"]

_GEOMLOSS_BACKENDS = ("tensorized", "online", "multiscale")

_DOUBLE_BACKWARD_MESSAGE = (
    "otlinop.SamplesLoss: second derivatives of the Sinkhorn loss (double backward, e.g. a "
    "Hessian-vector product through torch.autograd.grad(..., create_graph=True)) are not implemented "
    "yet. The first-order gradient is exact; the analytic Hessian will come from otlinop.hessian. "
    "Autograd through the Sinkhorn iterations would give a different (unrolled) answer, so none is "
    "returned.")


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


def _solve(inp: _Inputs, spec: _Spec, verbose: bool = False) -> _Solution:
    bar = None
    if verbose:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(spec.eps_list), desc="SamplesLoss", leave=False)
    monitor = _Monitor(check_every=1 << 30, callback=None, bar=bar, method="symmetric", inp=inp)
    with torch.no_grad(), _no_finite_checks():
        pots, pre = _symmetric_loop(inp, list(spec.eps_list), spec.rho_x, spec.rho_y, debias=spec.debias,
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
    balanced side of a semi-relaxed problem; MATH.md section 4).
    """
    def dpsi(t):
        return t if rho is None else (rho + eps) * (-torch.expm1(-t / rho))

    if h_self is not None:
        return dpsi(h) - dpsi(h_self)
    out = dpsi(h)
    return out - 0.5 * eps if relaxed else out


def _point_grad(x, y, f, g_pre, a, b, spec: _Spec) -> torch.Tensor:
    """``c2 (ah * x - P y)`` for ``P = P(f, g_pre)`` on (x, y), batched: one plan pass."""
    d = x.shape[-1]
    V = torch.cat([y, y.new_ones(y.shape[:-1] + (1,))], dim=-1)
    PV = plan_matmul(x, y, f, g_pre, V, eps=spec.eps, a=a, b=b, **spec.kernel_options)
    return (2.0 * spec.cost_scale) * (PV[..., d:] * x - PV[..., :d])


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


class _SinkhornGrad(torch.autograd.Function):
    """The gradient map (x, y, a, b) -> (grad_x, grad_y, grad_a, grad_b) at a solution.

    A Function of its own so that the gradient can itself be differentiated
    (double backward) once the analytic Hessian is available: that extension
    replaces ``backward`` here. Until then ``backward`` raises.
    """

    @staticmethod
    def forward(ctx, x, y, a, b, sol, spec, needs):
        return _sinkhorn_grad(x, y, a, b, sol, spec, needs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise NotImplementedError(_DOUBLE_BACKWARD_MESSAGE)


class _SinkhornLoss(torch.autograd.Function):
    """Per-entry Sinkhorn loss (B,) of batched (x, y, a, b); gradients by ``_SinkhornGrad``."""

    @staticmethod
    def forward(ctx, x, y, a, b, spec, verbose):
        inp = _Inputs(x.detach(), y.detach(), a.detach(), b.detach(), batched=True)
        sol = _solve(inp, spec, verbose)
        dt = inp.pot_dtype
        value = _loss_value(inp.a.to(dt), inp.b.to(dt), sol, spec)
        ctx.spec, ctx.sol = spec, sol
        ctx.save_for_backward(x, y, a, b)
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_value):
        x, y, a, b = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if not any(needs):
            return None, None, None, None, None, None
        sol, spec = ctx.sol, ctx.spec
        dt = sol.f.dtype
        grads = _SinkhornGrad.apply(x.to(dt), y.to(dt), a.to(dt), b.to(dt), sol, spec, needs)
        w = grad_value.to(dt)
        out = []
        for t, gt in zip((x, y, a, b), grads):
            if gt is None:
                out.append(None)
                continue
            scale = w.view(-1, *([1] * (gt.ndim - 1)))
            out.append((scale * gt).to(t.dtype))
        return (*out, None, None)


# --------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------
def _squeeze_weights(w, pts):
    """GeomLoss accepts (N, 1) and (B, N, 1) weights: drop the trailing 1."""
    if isinstance(w, torch.Tensor) and isinstance(pts, torch.Tensor) and w.ndim == pts.ndim and w.shape[-1] == 1:
        return w.squeeze(-1)
    return w


def _resolve_backend(owner: str, backend):
    if backend in ("auto", None):
        return None
    if backend in ("torch", "triton"):
        return backend
    if backend in ("tensorized", "online"):
        # Both compute the exact loss in GeomLoss; here one streaming
        # implementation serves both (Triton on CUDA, torch otherwise).
        return None
    if backend == "multiscale":
        warnings.warn(f"{owner}: backend='multiscale' (GeomLoss' kernel truncation) is not implemented; "
                      "computing the exact loss with backend='auto' instead", stacklevel=3)
        return None
    raise ValueError(f"{owner}: backend must be 'auto', 'torch' or 'triton' (GeomLoss' 'tensorized', "
                     f"'online' and 'multiscale' map to 'auto'), got {backend!r}")


def _check_options(owner: str, loss, p, blur, reach, diameter, scaling, cost, kernel, cluster_scale,
                   cost_scale, debias, potentials):
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
    blur = _positive_float(owner, "blur", blur, "blur is the final length scale, eps = blur**2")
    if reach is not None:
        reach = _positive_float(owner, "reach", reach, "None means balanced OT", allow_inf=True)
        if reach == math.inf:
            reach = None
    if diameter is not None:
        diameter = _positive_float(owner, "diameter", diameter)
    scaling = _positive_float(owner, "scaling", scaling)
    if not scaling < 1:
        raise ValueError(f"{owner}: scaling must be in (0, 1), got {scaling}")
    cost_scale = 0.5 if cost_scale is None else _positive_float(
        owner, "cost_scale", cost_scale, "use 0.5 for |x-y|^2/2 (GeomLoss' p=2) or 1.0 for |x-y|^2")
    for name, flag in (("debias", debias), ("potentials", potentials)):
        if not isinstance(flag, bool):
            raise TypeError(f"{owner}: {name} must be True or False, got {flag!r}")
    return blur, reach, diameter, scaling, cost_scale


def _samples_loss(owner: str, a, x, b, y, *, blur, reach, diameter, scaling, cost_scale, debias,
                  potentials, backend, precision, verbose):
    shape_a = a.shape if isinstance(a, torch.Tensor) else None
    shape_b = b.shape if isinstance(b, torch.Tensor) else None
    a = _squeeze_weights(a, x)
    b = _squeeze_weights(b, y)
    rho = None if reach is None else reach * reach
    inp = _prepare(owner, x, y, a, b, balanced=rho is None)
    eps, schedule, _ = _resolve_eps(owner, "symmetric", blur, None, scaling, diameter, inp)
    spec = _Spec(eps_list=tuple(schedule), eps=eps, rho_x=rho, rho_y=rho, debias=debias,
                 cost_scale=cost_scale, backend=backend, precision=precision)
    if potentials:
        sol = _solve(_Inputs(inp.x.detach(), inp.y.detach(), inp.a.detach(), inp.b.detach(), True),
                     spec, verbose)
        F = sol.f if sol.f_aa is None else sol.f - sol.f_aa
        G = sol.g if sol.g_bb is None else sol.g - sol.g_bb
        F, G = inp.unbatch(F).to(x.dtype), inp.unbatch(G).to(x.dtype)
        # Shaped like the weights, as GeomLoss (view_as).
        return F.reshape(shape_a or F.shape), G.reshape(shape_b or G.shape)
    value = _SinkhornLoss.apply(inp.x, inp.y, inp.a, inp.b, spec, verbose)
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
    backend : {"auto", "torch", "triton"}, default "auto"
        "auto": Triton for CUDA float32/16/bf16 inputs, torch otherwise.
        GeomLoss' "tensorized" and "online" map to "auto" (both exact);
        "multiscale" too, with a warning (no kernel truncation here).
    cost_scale : float, optional
        ``c`` in ``C = c |x - y|^2``; default 0.5 (GeomLoss' ``p = 2``).
    precision : {None, "ieee", "tf32", "tf32x3"}
        Precision of the Triton dot products (None: accurate to fp32).

    Raises
    ------
    NotImplementedError
        For ``loss`` other than "sinkhorn", ``p`` other than 2, a custom
        ``cost`` or ``kernel``, cluster labels (the six-argument call), and
        second derivatives.
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
    """

    def __init__(self, loss="sinkhorn", p=2, blur=0.05, reach=None, diameter=None, scaling=0.5, truncate=5,
                 cost=None, kernel=None, cluster_scale=None, debias=True, potentials=False, verbose=False,
                 backend="auto", cost_scale=None, precision=None):
        super().__init__()
        owner = "SamplesLoss"
        blur, reach, diameter, scaling, cost_scale = _check_options(
            owner, loss, p, blur, reach, diameter, scaling, cost, kernel, cluster_scale, cost_scale,
            debias, potentials)
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
        return _samples_loss(owner, a, x, b, y, blur=self.blur, reach=self.reach, diameter=self.diameter,
                             scaling=self.scaling, cost_scale=self.cost_scale, debias=self.debias,
                             potentials=self.potentials, backend=self._backend, precision=self.precision,
                             verbose=self.verbose)

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, p={self.p}, blur={self.blur}, reach={self.reach}, "
                f"diameter={self.diameter}, scaling={self.scaling}, debias={self.debias}, "
                f"potentials={self.potentials}, cost_scale={self.cost_scale}, backend={self.backend!r}, "
                f"precision={self.precision!r}")


def sinkhorn_loss(x, y, a=None, b=None, *, p=2, blur=0.05, reach=None, diameter=None, scaling=0.5,
                  debias=True, potentials=False, cost_scale=None, backend="auto", precision=None,
                  verbose=False):
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

    Returns
    -------
    Tensor
        A scalar, (B,) for a batch, or the pair ``(F, G)`` with ``potentials=True``.

    Raises
    ------
    NotImplementedError, ValueError, TypeError
        As :class:`SamplesLoss`.

    Examples
    --------
    >>> import torch
    >>> from otlinop.loss import sinkhorn_loss
    >>> x = torch.randn(4, 50, 2); y = torch.randn(4, 60, 2)
    >>> sinkhorn_loss(x, y, blur=0.1).shape
    torch.Size([4])
    """
    owner = "sinkhorn_loss"
    blur, reach, diameter, scaling, cost_scale = _check_options(
        owner, "sinkhorn", p, blur, reach, diameter, scaling, None, None, None, cost_scale, debias, potentials)
    return _samples_loss(owner, a, x, b, y, blur=blur, reach=reach, diameter=diameter, scaling=scaling,
                         cost_scale=cost_scale, debias=debias, potentials=potentials,
                         backend=_resolve_backend(owner, backend), precision=precision, verbose=verbose)
