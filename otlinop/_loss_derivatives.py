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
  :class:`SecondOrder`;
- :func:`refine` and :func:`converged`: the potentials of :func:`solve`
  iterated further at the final eps, until their marginal errors reach a
  tolerance (what the second derivatives differentiate; docs/second-order.md).

The autograd Functions that call them are in ``otlinop._loss_functions``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch

import solvers
from solvers import config

from ._checks import Inputs
from ._operators.plan_product import softmin_gradient
from ._sinkhorn_loops import Monitor, alternating_loop, damping, row_error, stack_debias_problems, symmetric_loop
from .hvp import hvp, hvp_self, hvp_x, hvp_y, inner_rtol
from .kernels.softmin_pair import softmin_self_unchecked

__all__ = ["CONVERGE", "REFINE_MAX_ITER", "Spec", "SecondOrder", "Solution", "Refinement", "solve", "refine",
           "converged", "loss_value", "weight_grad", "point_grad", "sinkhorn_grad", "sinkhorn_hvp"]

#: The values of ``converge`` (``SamplesLoss``, ``sinkhorn_loss``): when the
#: potentials are iterated to convergence at the final eps (docs/second-order.md).
CONVERGE = ("create_graph", "always", "never")

#: The most iterations of one converging solve (:func:`refine`), per problem:
#: alternating iterations of OT(a, b), averaged steps of each debiasing problem.
REFINE_MAX_ITER = 10_000

# Iterations between two reads of the marginal error in :func:`refine`: each read
# is a host synchronisation on a GPU, and overshooting costs at most this many
# iterations beyond the tolerance.
_REFINE_CHECK_EVERY = 5
# Checks without a new smallest marginal error after which a converging run stops:
# the error has reached the floor of the arithmetic (float32 at a small eps).
_STALL_CHECKS = 5

# The converging solves' tolerance on the L1 marginal error (relative to the mass),
# as a fraction of the inner solves' rtol: a marginal error delta moves the HVP by
# up to about 100 delta, an inner rtol by about its own size (measured, float32,
# n = 600, d = 3, blur 0.3, inner rtol 1e-5: the double backward 7.7e-4 off the
# float64 one at delta = 1e-5, 8.2e-5 at 1e-6, 3.5e-5 where float32 stalls, 1.1e-7).
_REFINE_FRACTION = 0.1


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
    #: Whether the solve also computes the input value checks (``measures_ok``), which
    #: the loss reads back after it: a call with ``diameter`` given reads the flags once,
    #: and a cached CUDA graph of the solve holds their kernels.
    check: bool = False

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
    """How a double backward solves its Schur systems, who receives the ``SolveResult``s,
    and at which potentials the derivatives are taken.

    ``converge`` (one of :data:`CONVERGE`): "create_graph" iterates the
    potentials to convergence (:func:`converged`) when a backward records a
    graph; "always" in the forward already; "never" differentiates the
    schedule's potentials. ``report`` receives each :class:`Refinement`;
    ``refine_max_iter`` bounds its iterations (a test shortens it);
    ``weight_tangents`` is set by the loss call.
    """

    owner: str = "SamplesLoss"
    solver: Callable = solvers.cg
    M: object = None
    rtol: float | None = None
    maxiter: int | None = None
    record: Callable | None = None
    converge: str = "create_graph"
    report: Callable | None = None
    refine_max_iter: int = REFINE_MAX_ITER
    #: Whether the weights (a, b) may carry forward-mode tangents, as the call read them
    #: (None: not read; inside a Function a torch.func.jvp level hides it).
    weight_tangents: tuple | None = None

    @property
    def solve_options(self) -> dict:
        return dict(solver=self.solver, M=self.M, rtol=self.rtol, atol=0.0, maxiter=self.maxiter)

    def tolerance(self, dtype: torch.dtype) -> float:
        """The marginal tolerance of a converging solve in ``dtype``: a tenth of the inner solves' ``rtol``."""
        return _REFINE_FRACTION * (inner_rtol(dtype) if self.rtol is None else self.rtol)


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
    # Nothing reads the errors back (kept=False): the final one is computed only for the bar.
    monitor = Monitor(check_every=1 << 30, callback=None, bar=bar, method="symmetric", inp=inp, kept=False)
    with torch.no_grad(), config.override(check_finite=False):
        # Eager steps (no graphs): a schedule without refinement has no run of GRAPH_MIN_RUN steps at one eps.
        pots, pre, _ = symmetric_loop(inp, list(spec.eps_list), spec.rho_x, spec.rho_y, debias=spec.debias,
                                      f0=None, g0=None, monitor=monitor, **spec.kernel_options)
    if bar is not None:
        # Not monitor.finish(): it reads the recorded errors back, which nothing here uses.
        bar.close()
    sol = Solution(pots[0], pots[1], pre[0], pre[1])
    if spec.debias:
        sol.f_aa, sol.g_bb, sol.f_aa_pre, sol.g_bb_pre = pots[2], pots[3], pre[2], pre[3]
    return sol


@dataclass(frozen=True)
class Refinement:
    """The iterations :func:`refine` ran at the final eps for one loss evaluation.

    Attributes
    ----------
    n_iter : int
        Alternating iterations of OT(a, b) (two soft-min passes each).
    n_iter_self : tuple of int
        Averaged steps of OT(a, a) and OT(b, b) (one soft-min pass of a cloud
        against itself each); () without debiasing.
    marginal_error : float
        The largest L1 marginal error at the end, relative to the mass (the
        largest over the problems and the batch).
    threshold : float
        The tolerance on it.
    status : str
        "converged" (every problem reached the tolerance), "stalled" (one
        stopped improving above it: the floor of the arithmetic's precision
        at this eps), "max_iter" (one ran ``refine_max_iter`` iterations) or
        "diverged" (a non-finite error).
    """

    n_iter: int
    n_iter_self: tuple
    marginal_error: float
    threshold: float
    status: str

    @property
    def converged(self) -> bool:
        return self.status == "converged"


class _Progress:
    """The stopping test of a converging run, one error per check: below the threshold,
    non-finite, or no new smallest error in ``_STALL_CHECKS`` checks (the error then
    wanders at the precision's floor; in the linear regime every check lowers it)."""

    def __init__(self, threshold: float):
        self.threshold, self.error, self.best, self.since = threshold, math.inf, math.inf, 0
        self.status = None

    def check(self, error: float) -> bool:
        """Record one error; True when the run should stop (``status`` says why)."""
        self.error = error
        if error <= self.threshold:
            self.status = "converged"
        elif not math.isfinite(error):
            self.status = "diverged"
        else:
            self.since = 0 if error < self.best else self.since + 1
            self.best = min(self.best, error)
            if self.since >= _STALL_CHECKS:
                self.status = "stalled"
        return self.status is not None


def _refine_self(x, f, log_a, a, eps: float, rho, opts: dict, threshold: float, max_iter: int):
    """Averaged steps ``f <- (f + lam T(f)) / 2`` of the debiasing problem of the cloud
    x (batched) from ``f``, until its L1 marginal error is <= ``threshold``.

    GeomLoss' update of the self problems: the plan of a cloud with itself is
    positive semi-definite (a Gaussian kernel), so the linearised step
    contracts by at most 1/2 whatever eps, and the potential stays symmetric.
    Returns ``(f, steps, _Progress)``.
    """
    lam = damping(eps, rho)
    progress = _Progress(threshold)
    for step in range(1, max_iter + 1):
        s = softmin_self_unchecked(x, f, log_a, eps=eps, **opts).to(f.dtype)
        if (step % _REFINE_CHECK_EVERY == 0 or step == max_iter) and \
                progress.check(float(row_error(f, s, a, eps, rho).max())):
            return f, step, progress
        f = torch.lerp(f, s if lam == 1.0 else lam * s, 0.5)
    progress.status = "max_iter"
    return f, max_iter, progress


def _translation(f, g, log_a, log_b, rho_x, rho_y) -> torch.Tensor:
    """The shift t (B, 1) maximising the dual along ``(f + t, g - t)``, which leaves the
    plan unchanged (Séjourné et al. 2022, translation-invariant Sinkhorn).

    With ``A = <a, e^{-f/rho_x}>`` and ``B = <b, e^{-g/rho_y}>`` (the mass on a hard
    side, whose ``1/rho`` is 0), ``t = (log A - log B) / (1/rho_x + 1/rho_y)``: the
    mode that damped updates contract only by ``rho / (rho + eps)`` per step, removed at once.
    """
    ix = 0.0 if rho_x is None else 1.0 / rho_x
    iy = 0.0 if rho_y is None else 1.0 / rho_y
    log_A = torch.logsumexp(log_a - f * ix, dim=-1, keepdim=True)
    log_B = torch.logsumexp(log_b - g * iy, dim=-1, keepdim=True)
    return (log_A - log_B) / (ix + iy)


def refine(inp: Inputs, sol: Solution, spec: Spec, tol: float, *,
           max_iter: int = REFINE_MAX_ITER) -> tuple[Solution, Refinement]:
    """The potentials at ``spec.eps`` iterated from ``sol`` until their L1 marginal
    errors are <= ``tol`` times the mass (per problem, every batch entry), or
    stop improving.

    OT(a, b): OTT's alternating iterations (``alternating_loop``, g then f),
    warm-started at ``sol.f``, in runs of ``_REFINE_CHECK_EVERY`` iterations;
    with a relaxed side each run starts with the exact dual ascent step
    along the translation (:func:`_translation`), the mode that damped
    updates leave nearly unchanged at small eps. OT(a, a), OT(b, b) with
    ``debias``: averaged steps (:func:`_refine_self`) from ``sol.f_aa``,
    ``sol.g_bb``. The result has no extrapolation step: its ``f_pre``,
    ``g_pre`` are ``f``, ``g`` (at convergence it changes nothing).
    """
    eps, opts = spec.eps, spec.kernel_options
    with torch.no_grad(), config.override(check_finite=False):
        mass_a = float(inp.a.sum(-1, dtype=torch.float64).min())
        mass_b = float(inp.b.sum(-1, dtype=torch.float64).min())
        monitor = Monitor(check_every=_REFINE_CHECK_EVERY, callback=None, bar=None, method="alternating", inp=inp)
        progress = _Progress(tol * mass_a)
        f, g, n_iter = sol.f, sol.g, 0
        while progress.status is None:
            if n_iter >= max_iter:
                progress.status = "max_iter"
                break
            if spec.relaxed:
                f = f + _translation(f, g, inp.log_a, inp.log_b, spec.rho_x, spec.rho_y)
            f, g, its, _ = alternating_loop(inp, eps, spec.rho_x, spec.rho_y, f0=f, g0=None,
                                            max_iter=min(_REFINE_CHECK_EVERY, max_iter - n_iter),
                                            threshold=0.0, monitor=monitor, graphs=None, **opts)
            n_iter += its
            progress.check(float(monitor.errors[-1]))
        monitor.finish()
        out = Solution(f, g, f, g)
        runs, steps = [(progress, mass_a)], ()
        if spec.debias:
            f_aa, n_aa, p_aa = _refine_self(inp.x, sol.f_aa, inp.log_a, inp.a, eps, spec.rho_x, opts,
                                            tol * mass_a, max_iter)
            g_bb, n_bb, p_bb = _refine_self(inp.y, sol.g_bb, inp.log_b, inp.b, eps, spec.rho_y, opts,
                                            tol * mass_b, max_iter)
            out = replace(out, f_aa=f_aa, g_bb=g_bb, f_aa_pre=f_aa, g_bb_pre=g_bb)
            runs, steps = runs + [(p_aa, mass_a), (p_bb, mass_b)], (n_aa, n_bb)
    statuses = [p.status for p, _ in runs]
    status = next((s for s in ("diverged", "max_iter", "stalled") if s in statuses), "converged")
    return out, Refinement(n_iter, steps, max(p.error / mass for p, mass in runs), tol, status)


def converged(inp: Inputs, sol: Solution, spec: Spec, second: SecondOrder) -> Solution:
    """:func:`refine` to ``second``'s tolerance; the :class:`Refinement` goes to
    ``second.report``, and a warning says when the tolerance was not reached."""
    out, info = refine(inp, sol, spec, second.tolerance(sol.f.dtype), max_iter=second.refine_max_iter)
    if second.report is not None:
        second.report(info)
    if not info.converged:
        why = {"stalled": f"stopped improving at an L1 marginal error of {info.marginal_error:.1e} (relative to "
                          f"the mass), above the tolerance {info.threshold:.1e}: the floor of "
                          f"{str(sol.f.dtype).replace('torch.', '')} at this eps",
               "max_iter": f"did not reach the tolerance {info.threshold:.1e} on the L1 marginal error within "
                           f"{second.refine_max_iter} iterations (error {info.marginal_error:.1e}, relative to "
                           "the mass)",
               "diverged": "diverged (non-finite marginal error)"}[info.status]
        warnings.warn(
            f"{second.owner}: the potentials at the final eps (blur^2 = {spec.eps:.3g}) {why}. The second "
            "derivatives agree with the gradient only up to that error; float64 inputs and a larger blur "
            "converge further, a larger hvp_rtol asks for less, and converge='never' differentiates the eps "
            "schedule's potentials instead", RuntimeWarning, stacklevel=2)
    return out


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


def weight_grad(h, h_self, eps: float, rho, relaxed: bool) -> torch.Tensor:
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


_LOCAL_POINT_GRAD = point_grad


def sinkhorn_grad(x, y, a, b, sol: Solution, spec: Spec, needs, *, point_grad=point_grad) -> tuple:
    """Gradients of the per-entry loss (B,) w.r.t. x, y, a, b (None where not needed).

    All tensors are batched and in the potentials' dtype. Implements the
    formulas of ``otlinop.loss``'s module docstring with ``plan_matmul``
    passes: one per point cloud, two with debiasing, each a ``point_grad``
    call (an argument so that a test can count them); where the forward ran
    the debiased problems as one batch (``stack_debias_problems``), all the
    passes are one batched call.
    """
    need_x, need_y, need_a, need_b = needs
    gx = gy = ga = gb = None
    if (need_x or need_y) and spec.debias and not spec.relaxed and point_grad is _LOCAL_POINT_GRAD and \
            stack_debias_problems(x.shape[1], y.shape[1], spec.backend, x):
        # As the forward (symmetric_loop): the passes of the debiased gradients as one batch (not
        # for another point_grad, such as the distributed loss's rings, which tell the clouds apart).
        parts = []
        if need_x:
            parts += [(x, y, sol.f, sol.g_pre, a, b), (x, x, sol.f_aa, sol.f_aa_pre, a, a)]
        if need_y:
            parts += [(y, x, sol.g, sol.f_pre, b, a), (y, y, sol.g_bb, sol.g_bb_pre, b, b)]
        G = point_grad(*(torch.cat(ts) for ts in zip(*parts)), spec).split(x.shape[0])
        if need_x:
            gx = G[0] - G[1]
        if need_y:
            gy = G[-2] - G[-1]
        need_x = need_y = False
    if need_x:
        gx = point_grad(x, y, sol.f, sol.g_pre, a, b, spec, rho=spec.rho_x)
        if spec.debias:
            gx = gx - point_grad(x, x, sol.f_aa, sol.f_aa_pre, a, a, spec, rho=spec.rho_x)
    if need_y:
        gy = point_grad(y, x, sol.g, sol.f_pre, b, a, spec, rho=spec.rho_y)
        if spec.debias:
            gy = gy - point_grad(y, y, sol.g_bb, sol.g_bb_pre, b, b, spec, rho=spec.rho_y)
    if need_a:
        ga = weight_grad(sol.f, sol.f_aa, spec.eps, spec.rho_x, spec.relaxed)
    if need_b:
        gb = weight_grad(sol.g, sol.g_bb, spec.eps, spec.rho_y, spec.relaxed)
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
    (None where ``needs`` is False). A (B, n, d) and B (B, m, d), or with a trailing k
    for k directions per entry (the products then have it too); None for a zero part.

    A loop over the batch: every entry with a direction is one ``otlinop.hvp``
    call (one Schur solve) at the final potentials, plus one ``hvp_self`` per
    debiased side with a direction. Each inner ``SolveResult`` goes to
    ``second.record``.
    """
    need_x, need_y = needs
    # k directions per entry (A (B, n, d, k)): one solve with k right-hand sides each.
    cols = (A if A is not None else B).shape[x.ndim:]
    Hx = x.new_zeros(x.shape + cols) if need_x else None
    Hy = y.new_zeros(y.shape + cols) if need_y else None
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
