"""Sinkhorn solvers for entropic optimal transport with the squared Euclidean cost.

``sinkhorn(x, y, a, b, ...)`` returns the dual potentials ``(f, g)`` of

    OT_eps(a, b) = min_P <P, C> + eps KL(P | a⊗b) [+ rho_x KL(P1 | a) + rho_y KL(P^T1 | b)]

with ``C_ij = c |x_i - y_j|^2`` (``c = cost_scale``), as a ``SinkhornResult``.
Potentials follow GeomLoss' convention: ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``.

Two methods (docs/math.md section 3):

- ``"symmetric"``: GeomLoss' algorithm. An eps-scaling schedule from the
  diameter of the data down to ``blur^2``, one averaged (Jacobi) update of both
  potentials per value of eps, then (unlike GeomLoss, whose count is fixed)
  more averaged updates at ``blur^2`` until the marginal error falls below
  ``threshold``, then a final unaveraged "extrapolation" step.
- ``"alternating"``: OTT-JAX's algorithm. Fixed eps, Gauss-Seidel updates (g
  then f), stopped when the L1 marginal error falls below ``threshold``.

Every update is one streaming soft-min (``otlinop.kernels.softmin``): the cost
matrix is never stored, and a batch of problems runs in one launch per step.

This module is the entry point: it checks the options and runs a loop. The
eps schedule lives in ``otlinop._sinkhorn_schedule``, the loops in
``otlinop._sinkhorn_loops``, the result class in ``otlinop._sinkhorn_result``.
"""

from __future__ import annotations

import math
import warnings

import torch

from solvers import config
from solvers.graphs import CUDA_GRAPHS

from ._call_graphs import CallGraphCache
from ._checks import Inputs, measures, potential
from ._sinkhorn_loops import GRAPH_MIN_RUN, Monitor, alternating_loop, symmetric_loop
from ._sinkhorn_multiscale import check_dimension, cluster_clouds, multiscale_loop, multiscale_options
from ._sinkhorn_result import ConvergenceWarning, SinkhornResult, convergence_status
from ._sinkhorn_schedule import DEFAULT_MAX_ITER, epsilon_schedule, loop_options, resolve_eps, schedule_tensor
from .kernels._dispatch import check_backend, resolve_backend

__all__ = ["sinkhorn", "SinkhornResult", "ConvergenceWarning", "epsilon_schedule", "DEFAULT_MAX_ITER",
           "SINKHORN_GRAPHS"]


# --------------------------------------------------------------------------
# Options (the checks live in otlinop._checks)
# --------------------------------------------------------------------------
def _warn_not_differentiable(owner: str, **tensors) -> None:
    """Warn when an input requires grad: the loops run without autograd, so a later
    ``res.cost.backward()`` would only meet torch's generic "does not require grad".
    A warning, not an error: reading potentials of a model's points is legitimate."""
    names = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if names and torch.is_grad_enabled():
        which = ", ".join(names)
        warnings.warn(f"{owner}: {which} {'requires' if len(names) == 1 else 'require'} grad, but the results of "
                      f"{owner} (potentials, cost, plan) are computed without autograd and are not "
                      "differentiable; for a differentiable loss use otlinop.SamplesLoss or otlinop.sinkhorn_loss "
                      f"(pass {names[0]}.detach() to silence this warning)", UserWarning, stacklevel=3)


config.declare("sinkhorn_graphs", True, owner="otlinop.sinkhorn", doc=(
    f"CUDA graphs: runs of at least GRAPH_MIN_RUN ({GRAPH_MIN_RUN}) Sinkhorn steps at one eps replay one "
    "captured step, a sinkhorn call whose shapes, options and schedule length were seen before replays its "
    "whole eps schedule, and a SamplesLoss call its whole solve and gradient passes (otlinop._call_graphs); "
    "False runs everything eagerly"))


def _default_graphs(x: torch.Tensor, backend):
    """The graph machinery of the loops on points ``x``: ``CUDA_GRAPHS`` where steps can be captured
    (``config.sinkhorn_graphs``, CUDA, Triton kernels: no host sync, no capture running), else None (eager)."""
    graphable = (config.sinkhorn_graphs and x.is_cuda and resolve_backend("sinkhorn", backend, x) == "triton"
                 and not torch.cuda.is_current_stream_capturing())
    return CUDA_GRAPHS if graphable else None


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------
#: Cached CUDA graphs of ``sinkhorn``'s eps-scaling schedule (``otlinop._call_graphs``):
#: ``SINKHORN_GRAPHS.clear()`` frees them.
SINKHORN_GRAPHS = CallGraphCache()


def _schedule_phase(options, x, y, a, b, E) -> tuple:
    """The symmetric loop's cold start and its averaged steps over the schedule ``E`` (all
    but the final eps, in memory), as a pure function for :data:`SINKHORN_GRAPHS`:
    ``(FG, *errors)``, the state ``[f | g]`` after the schedule and the largest marginal
    error of each check inside it (read later, with the others)."""
    rho_x, rho_y, final, check_every, kernel_options = options
    inp = Inputs(x, y, a, b, True)
    monitor = Monitor(check_every=check_every, callback=None, bar=None, method="symmetric", inp=inp)
    steps = [E[k] for k in range(E.shape[0])] + [final]
    FG, _ = symmetric_loop(inp, steps, rho_x, rho_y, debias=False, f0=None, g0=None, monitor=monitor,
                           extrapolate=False, **dict(kernel_options))
    return (FG, *monitor.errors)


def sinkhorn(x, y, a=None, b=None, *, blur=None, eps=None, scaling=0.5, diameter=None, cost_scale=1.0,
             reach=None, reach_x=None, reach_y=None, method="symmetric", max_iter=None, threshold=None,
             check_every=10, f0=None, g0=None, callback=None, verbose=False, backend=None,
             precision=None, multiscale=None, _graphs=None) -> SinkhornResult:
    r"""Entropic OT potentials between two weighted point clouds (squared Euclidean cost).

    Parameters
    ----------
    x : Tensor, shape (n, d) or (B, n, d)
        Source points; a batch of B problems is solved in one launch per step.
    y : Tensor, shape (m, d) or (B, m, d)
        Target points (same dtype, device, d and B).
    a : Tensor, shape (n,) or (B, n), optional
        Source weights, finite, >= 0, positive total mass; default uniform ``1/n``.
    b : Tensor, shape (m,) or (B, m), optional
        Target weights; default uniform ``1/m``. Balanced problems need
        ``sum(a) == sum(b)``.
    blur : float, optional
        Final length scale, ``eps = blur**2`` whatever ``cost_scale`` (GeomLoss'
        p = 2 convention). Default 0.05 when ``eps`` is not given either.
    eps : float, optional
        The entropic regularisation; the same as ``blur = sqrt(eps)``. Give
        ``blur`` or ``eps``, not both.
    scaling : float, default 0.5
        "symmetric" only: ratio between consecutive blur scales, in (0, 1).
    diameter : float, optional
        "symmetric" only: first blur scale of the schedule; default the
        diagonal of the joint bounding box of x and y (as GeomLoss; of all the
        entries of a batch together).
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2`` (0.5 is GeomLoss' p = 2 cost).
    reach, reach_x, reach_y : float, optional
        Unbalanced OT: a KL marginal penalty of strength ``rho = reach**2`` on
        both sides (``reach``) or on one side (``reach_x`` on ``P 1``,
        ``reach_y`` on ``P^T 1``); None keeps that side a hard constraint.
    method : {"symmetric", "alternating"}
        "symmetric": GeomLoss' eps-scaling with averaged updates, continued at
        the final eps until the marginal error is <= ``threshold``, and a
        final extrapolation. "alternating": OTT-JAX's fixed-eps Gauss-Seidel
        updates (g then f) until the marginal error is <= ``threshold``.
    max_iter : int, optional
        The most iterations. "alternating": default 2000. "symmetric": the
        whole schedule runs, then averaged steps at the final eps until a
        check (the first one at the end of the schedule) finds the marginal
        error <= ``threshold``; an int (at least the schedule's length) is the
        most steps in all, default the schedule's length + 2000. On a GPU,
        runs of one eps replay a CUDA graph between checks, and a call from a
        cold start whose shapes, options and schedule length were seen before
        replays its whole schedule from a cached graph (:data:`SINKHORN_GRAPHS`;
        the eps are data, so a diameter that moves with the points changes
        nothing but their values).
    threshold : float, optional
        Convergence threshold on the marginal error ``||P 1 - a||_1 / sum(a)``
        (the L1 error for probability weights; relative, so that it means the
        same for weights of any mass), default 1e-3 (OTT's).
        ``float("inf")`` asks for no convergence: "symmetric" then runs its
        schedule alone, GeomLoss' fixed count and values (``SamplesLoss``
        does so always).
    check_every : int, default 10
        Iterations between two checks of the marginal error. The loops
        synchronise with the host only at checks. A loop also stops when its
        error stalls at the final eps: it has not dropped by 0.1% over the
        last max(100, 10 * check_every) iterations and is within 100 times
        the arithmetic's resolution ``u (max|f| + max|g|) / eps`` (u: the
        unit roundoff of the potentials' dtype), the level where rounding,
        not the iteration, sets the error.
    f0, g0 : Tensor, optional
        Warm start (GeomLoss convention, shapes of a and b). "symmetric":
        replace the initialisation (pass ``diameter=blur`` to skip the
        annealing). "alternating": starts from ``f0`` (g is updated first, so
        ``g0`` only matters without ``f0``).
    callback : callable, optional
        Called at each check with a dict: ``method``, ``iteration``, ``eps``,
        ``marginal_error``, ``f``, ``g``.
    verbose : bool, default False
        Show a tqdm progress bar.
    backend : {None, "auto", "torch", "triton"}
        Kernel backend; None/"auto": Triton for CUDA float32/16/bf16 tensors,
        torch otherwise.
    precision : {None, "ieee", "tf32", "tf32x3"}
        Precision of the Triton dot products (None: the kernels' default,
        accurate to fp32).
    multiscale : bool or Multiscale, optional
        Solve coarse-to-fine on a block-sparse plan (GeomLoss' multiscale
        backend; docs/multiscale.md): True for the defaults, or
        ``otlinop.Multiscale(cluster_scale=..., truncate=...)``. Points of
        dimension d <= 3, one balanced problem (no batch, no reach), method
        "symmetric", no warm start. The result's ``plan`` is then a
        ``BlockSparsePlanOperator`` and ``truncation_bound`` certifies the
        plan mass its pattern drops.

    Returns
    -------
    SinkhornResult
        ``f``, ``g``, ``eps``, ``n_iter``, ``converged``, ``status``,
        ``marginal_error`` (the final one; ``marginal_error_history``: every
        check), ``plan`` (a PlanOperator), ``cost`` (GeomLoss' value,
        ``<a, f> + <b, g>`` balanced), ``transport_cost()`` (``<P, C>``) and
        the data.

    Raises
    ------
    TypeError
        Non-tensor inputs, non-floating or mismatched dtypes.
    ValueError
        Mismatched shapes or devices, empty clouds, non-finite points, points
        whose costs overflow the compute dtype, negative weights, zero mass or
        masses whose product overflows, unequal masses in a balanced problem,
        non-positive blur/eps/reach/cost_scale, scaling outside (0, 1), an
        unknown method or backend; with ``multiscale``: d > 3, a batch, a
        reach, method "alternating" or a warm start.

    Warns
    -----
    ConvergenceWarning
        When the returned result is not converged (its ``status``: the
        budget ran out, the error stalled at the dtype's resolution, or the
        potentials diverged).
    UserWarning
        If an input requires grad: the results are not differentiable (the
        loops run without autograd); ``SamplesLoss`` and ``sinkhorn_loss`` are
        the differentiable entry points. If the eps schedule has more than
        2000 steps (a ``scaling`` very close to 1).

    Notes
    -----
    With ``T_f(g) = smin_C(log b + g/eps)``, ``T_g(f) = smin_{C^T}(log a + f/eps)``,
    ``smin_C(h)_i = -eps log sum_j exp(h_j - C_ij/eps)`` and the damping
    ``lam = rho / (rho + eps)`` (1 on a balanced side):

    - symmetric: ``eps_list = [diam^2] + [exp(e) for e in arange(2 ln diam,
      2 ln blur, 2 ln scaling)] + [blur^2]``; init ``f = lam T_f(0)``,
      ``g = lam T_g(0)`` at ``eps_list[0]``; for each eps,
      ``(f, g) <- ((f + lam T_f(g)) / 2, (g + lam T_g(f)) / 2)``; finally
      ``f = lam T_f(g_pre)``, ``g = lam T_g(f_pre)`` at ``blur^2``.
    - alternating: ``g <- lam T_g(f)``, then ``f <- lam T_f(g)``. The error at
      a check is ``|P(f_prev, g) 1 - a|_1`` (against ``a e^{-f/rho}`` on a
      relaxed side), read from the update just made; OTT measures
      ``|P^T 1 - b|_1`` after the f update, half an iteration later. The
      unbalanced update is GeomLoss' (it damps only the soft-min); OTT's also
      damps ``eps log b``, which solves a different (``-eps H(P)``) problem.

    The result's ``cost`` is ``<a, f> + <b, g>`` (balanced) or GeomLoss'
    unbalanced value; with weights of total mass ``m`` it is the primal
    ``<P, C> + eps KL(P | a⊗b)`` minus ``eps (m^2 - m)`` (see
    ``SinkhornResult.cost``). POT's ``sinkhorn2`` returns ``<P, C>``:
    ``res.transport_cost()``.

    Examples
    --------
    >>> import torch
    >>> from otlinop.sinkhorn import sinkhorn
    >>> x = torch.randn(100, 2, dtype=torch.float64); y = torch.randn(80, 2, dtype=torch.float64) + 1
    >>> res = sinkhorn(x, y, blur=0.3)
    >>> res.f.shape, res.g.shape, round(res.eps, 6), res.converged
    (torch.Size([100]), torch.Size([80]), 0.09, True)
    >>> geomloss_like = sinkhorn(x, y, blur=0.3, threshold=float("inf"))   # the schedule alone
    >>> geomloss_like.n_iter == len(geomloss_like.eps_schedule)
    True
    >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-9)
    >>> bool(res.converged), torch.allclose(res.plan.row_sums(), res.a)
    (True, True)
    """
    owner = "sinkhorn"
    # Imported here: otlinop.distributed builds on this layer's private modules.
    from .distributed.sinkhorn import is_dtensor, sinkhorn_dtensor
    if is_dtensor(x) or is_dtensor(y):
        # Sharded on the point dimension: the same loops over the mesh's process group.
        if multiscale is not None and multiscale is not False:
            raise NotImplementedError(f"{owner}: multiscale is not implemented for DTensor inputs")
        return sinkhorn_dtensor(x, y, a, b, blur=blur, eps=eps, scaling=scaling, diameter=diameter,
                                cost_scale=cost_scale, reach=reach, reach_x=reach_x, reach_y=reach_y, method=method,
                                max_iter=max_iter, threshold=threshold, check_every=check_every, f0=f0, g0=g0,
                                callback=callback, verbose=verbose, backend=backend, precision=precision)
    cost_scale, rho_x, rho_y, backend, precision, check_every, threshold, max_iter = loop_options(
        owner, method=method, cost_scale=cost_scale, reach=reach, reach_x=reach_x, reach_y=reach_y, backend=backend,
        precision=precision, check_every=check_every, threshold=threshold, callback=callback, verbose=verbose,
        max_iter=max_iter)
    if method == "alternating" and diameter is not None:
        warnings.warn(f"{owner}: diameter is ignored by method='alternating' (fixed eps)", stacklevel=2)

    ms = multiscale_options(owner, multiscale)
    if ms is not None:
        _refuse_for_multiscale(owner, x, method=method, rho=(rho_x, rho_y), warm=(f0, g0))
    inp = measures(owner, x, y, a, b, balanced=(rho_x is None and rho_y is None), cost_scale=cost_scale)
    _warn_not_differentiable(owner, x=x, y=y, a=a, b=b, f0=f0, g0=g0)
    check_backend(owner, backend, x)
    f0 = potential(owner, "f0", f0, inp.a, batched=inp.batched, dtype=inp.pot_dtype)
    g0 = potential(owner, "g0", g0, inp.b, batched=inp.batched, dtype=inp.pot_dtype)
    eps, schedule, _ = resolve_eps(owner, method, blur, eps, scaling, diameter, inp)
    if method == "symmetric":
        if max_iter is None:
            max_iter = len(schedule) + DEFAULT_MAX_ITER
        elif max_iter < len(schedule):
            raise ValueError(f"{owner}: max_iter={max_iter} is shorter than the eps schedule ({len(schedule)} "
                             "steps); method='symmetric' runs the whole schedule, then up to max_iter steps "
                             "in all at the final eps")
    refine = max_iter - len(schedule) if method == "symmetric" else 0

    if ms is not None:
        return _multiscale(owner, inp, ms, schedule, eps, a=a, b=b, max_iter=max_iter, refine=refine,
                           threshold=threshold, check_every=check_every, callback=callback, verbose=verbose,
                           cost_scale=cost_scale, backend=backend, precision=precision)

    bar = None
    if verbose:
        from tqdm.auto import tqdm
        total = max_iter
        bar = tqdm(total=total, desc=f"sinkhorn ({method})", leave=False)
    monitor = Monitor(check_every=check_every, callback=callback, bar=bar, method=method, inp=inp)
    # _graphs: the tests' stand-in for the CUDA-graph machinery (conftest's FakeGraphs), used as given.
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision,
                graphs=_default_graphs(inp.x, backend) if _graphs is None else _graphs)

    f_pre = g_pre = None
    # The kernels' per-call NaN checks (one host sync each) are off inside the loop:
    # the inputs were checked once on entry, and a sync per update would stall the GPU.
    with torch.no_grad(), config.override(check_finite=False):
        start = 0
        if method == "symmetric" and f0 is None and g0 is None and not monitor.syncs and \
                SINKHORN_GRAPHS.eligible((inp.x, inp.y, inp.a, inp.b)):
            # The schedule (from a cold start) as one cached graph, keyed on its length: its
            # eps are data, read by the kernels from memory. Then the rest, eagerly or in runs.
            options = (rho_x, rho_y, eps, check_every,
                       tuple(sorted(dict(cost_scale=cost_scale, backend=backend, precision=precision).items())))
            FG, *errors = SINKHORN_GRAPHS(_schedule_phase, options, (inp.x, inp.y, inp.a, inp.b,
                                                                      schedule_tensor(schedule, inp.x.device)))
            monitor.errors.extend(errors)
            n = inp.x.shape[1]
            f0, g0, start = FG[:, :n], FG[:, n:], len(schedule)
        if method == "symmetric":
            pots, pre, n_iter = symmetric_loop(inp, schedule, rho_x, rho_y, debias=False, f0=f0, g0=g0,
                                               monitor=monitor, refine=refine, threshold=threshold, start=start,
                                               **opts)
            f, g = pots
            f_pre, g_pre = pre
        else:
            f, g, n_iter, _ = alternating_loop(inp, eps, rho_x, rho_y, f0=f0, g0=g0, max_iter=max_iter,
                                               threshold=threshold, monitor=monitor, **opts)
    errors = monitor.finish()
    error = errors[-1] if errors else math.nan
    converged = error <= threshold
    status = convergence_status(method=method, converged=converged, error=error, threshold=threshold, n_iter=n_iter,
                                max_iter=max_iter, stalled=monitor.stalled, stall_span=monitor.stall_span,
                                floor=monitor.floor, dtype=inp.pot_dtype)
    if not converged:
        warnings.warn(f"{owner}: {status}", ConvergenceWarning, stacklevel=2)

    u = inp.unbatch
    return SinkhornResult(
        f=u(f), g=u(g), eps=eps, n_iter=n_iter, converged=converged, marginal_error=error,
        a=u(inp.a) if a is None else a, b=u(inp.b) if b is None else b, x=x, y=y, cost_scale=cost_scale,
        reach_x=None if rho_x is None else math.sqrt(rho_x),
        reach_y=None if rho_y is None else math.sqrt(rho_y),
        method=method, eps_schedule=schedule, f_pre=u(f_pre), g_pre=u(g_pre),
        backend=backend, precision=precision, marginal_error_history=errors, threshold=threshold,
        status=status)


# --------------------------------------------------------------------------
# The multiscale solver (otlinop._sinkhorn_multiscale)
# --------------------------------------------------------------------------
def _refuse_for_multiscale(owner: str, x, *, method, rho, warm) -> None:
    """What the multiscale solver does not serve, refused before any work."""
    if method != "symmetric":
        raise ValueError(f"{owner}: multiscale runs GeomLoss' symmetric eps-scaling loop; method={method!r} is "
                         "not available with it (pass method='symmetric' or no multiscale)")
    if any(r is not None for r in rho):
        raise NotImplementedError(f"{owner}: multiscale solves balanced problems only; pass reach=None, or no "
                                  "multiscale for unbalanced OT")
    if any(w is not None for w in warm):
        raise NotImplementedError(f"{owner}: multiscale takes no warm start (f0, g0): it starts from its coarse "
                                  "solve; pass f0=g0=None")
    if isinstance(x, torch.Tensor) and x.ndim == 3:
        raise NotImplementedError(f"{owner}: multiscale solves one problem, not a batch (x has shape "
                                  f"{tuple(x.shape)}); loop over the batch or drop multiscale")
    if isinstance(x, torch.Tensor) and x.ndim == 2:
        check_dimension(owner, x.shape[1])


def _multiscale(owner, inp, ms, schedule, eps, *, a, b, max_iter, refine, threshold, check_every, callback,
                verbose, cost_scale, backend, precision) -> SinkhornResult:
    bar = None
    if verbose:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_iter, desc="sinkhorn (multiscale)", leave=False)
    monitor = Monitor(check_every=check_every, callback=callback, bar=bar, method="symmetric", inp=inp)
    x, y = inp.x[0], inp.y[0]
    with torch.no_grad(), config.override(check_finite=False):
        clouds = cluster_clouds(owner, x, y, inp.a[0], inp.b[0], options=ms, diameter=math.sqrt(schedule[0]))
        sol = multiscale_loop(clouds.cx, clouds.cy, schedule, truncate=ms.truncate, prune_tol=ms.prune_tol,
                              cluster_scale=clouds.scale, cost_scale=cost_scale, backend=backend, precision=precision, pot_dtype=inp.pot_dtype,
                              refine=refine, threshold=threshold, monitor=monitor, check_every=check_every)
    errors = monitor.finish()
    error = errors[-1] if errors else math.nan
    converged = error <= threshold
    status = convergence_status(method="symmetric", converged=converged, error=error, threshold=threshold,
                                n_iter=sol.n_iter, max_iter=max_iter, stalled=monitor.stalled,
                                stall_span=monitor.stall_span, floor=monitor.floor, dtype=inp.pot_dtype)
    if not converged:
        warnings.warn(f"{owner}: {status}", ConvergenceWarning, stacklevel=3)
    cx, cy = clouds.cx, clouds.cy
    return SinkhornResult(
        f=sol.f[cx.inverse], g=sol.g[cy.inverse], eps=eps, n_iter=sol.n_iter, converged=converged,
        marginal_error=error, a=inp.a[0] if a is None else a, b=inp.b[0] if b is None else b, x=x, y=y,
        cost_scale=cost_scale, reach_x=None, reach_y=None, method="symmetric", eps_schedule=schedule,
        f_pre=sol.f_pre[cx.inverse], g_pre=sol.g_pre[cy.inverse], backend=backend, precision=precision,
        marginal_error_history=errors, threshold=threshold, status=status, truncation_bound=sol.bound,
        multiscale_layout=(cx, cy, sol.pattern), kept_entries=sol.work)
