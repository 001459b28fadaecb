"""Sinkhorn solvers for entropic optimal transport with the squared Euclidean cost.

``sinkhorn(x, y, a, b, ...)`` returns the dual potentials ``(f, g)`` of

    OT_eps(a, b) = min_P <P, C> + eps KL(P | a⊗b) [+ rho_x KL(P1 | a) + rho_y KL(P^T1 | b)]

with ``C_ij = c |x_i - y_j|^2`` (``c = cost_scale``), as a ``SinkhornResult``.
Potentials follow GeomLoss' convention: ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``.

Two methods (docs/math.md section 3):

- ``"symmetric"``: GeomLoss' algorithm. An eps-scaling schedule from the
  diameter of the data down to ``blur^2``, one averaged (Jacobi) update of both
  potentials per value of eps, then a final unaveraged "extrapolation" step.
- ``"alternating"``: OTT-JAX's algorithm. Fixed eps, Gauss-Seidel updates (g
  then f), stopped when the L1 marginal error falls below ``threshold``.

Every update is one streaming soft-min (``otlinop.kernels.softmin``): the cost
matrix is never stored, and a batch of problems runs in one launch per step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from solvers import config

from ._checks import (Inputs, backend_name, fraction, function, measures, nonnegative_scalar, positive_int,
                      positive_scalar, potential, precision_name, reach_or_none)
from .kernels._dispatch import check_backend, resolve_backend
from .kernels.softmin import softmin as _softmin
from .kernels.softmin_pair import softmin_pair_unchecked as _softmin_pair
from .kernels.softmin_pair import softmin_self_unchecked as _softmin_self

__all__ = ["sinkhorn", "SinkhornResult", "epsilon_schedule"]

_METHODS = ("symmetric", "alternating")

#: Default blur when neither ``blur`` nor ``eps`` is given (GeomLoss' default).
DEFAULT_BLUR = 0.05


# --------------------------------------------------------------------------
# Options (the checks live in otlinop._checks)
# --------------------------------------------------------------------------
def _resolve_reach(owner: str, reach, reach_x, reach_y):
    """Return (rho_x, rho_y): ``reach**2`` per side, None for a balanced side."""
    if reach is not None and (reach_x is not None or reach_y is not None):
        raise ValueError(f"{owner}: give either reach (both sides) or reach_x / reach_y (one side each), "
                         f"not both; got reach={reach!r}, reach_x={reach_x!r}, reach_y={reach_y!r}")
    if reach is not None:
        r = reach_or_none(owner, "reach", reach)
        return (None, None) if r is None else (r * r, r * r)
    rx, ry = reach_or_none(owner, "reach_x", reach_x), reach_or_none(owner, "reach_y", reach_y)
    return (None if rx is None else rx * rx), (None if ry is None else ry * ry)


def _damping(eps: float, rho) -> float:
    """GeomLoss' dampening ``lam = rho / (rho + eps)`` (1 on a balanced side)."""
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


# --------------------------------------------------------------------------
# The eps schedule
# --------------------------------------------------------------------------
def _diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    """Diagonal of the joint bounding box of all the points (all batch entries)."""
    d = x.shape[-1]
    with torch.no_grad():
        pts = (x.reshape(-1, d), y.reshape(-1, d))
        lo = torch.minimum(pts[0].min(0).values, pts[1].min(0).values)
        hi = torch.maximum(pts[0].max(0).values, pts[1].max(0).values)
        return float((hi - lo).to(torch.float64).norm().item())


def epsilon_schedule(diameter: float, blur: float, scaling: float) -> list[float]:
    """GeomLoss' eps-scaling schedule for the squared Euclidean cost (p = 2).

    Parameters
    ----------
    diameter : float
        Largest distance between points (the first blur scale), > 0.
    blur : float
        Final blur; the last eps is ``blur**2``, > 0.
    scaling : float
        Ratio between consecutive blur scales, in (0, 1).

    Returns
    -------
    list of float
        ``[diameter^2] + [exp(e) for e in arange(2 ln diameter, 2 ln blur, 2 ln scaling)] + [blur^2]``
        (``diameter^2`` appears twice when ``diameter > blur``).

    Raises
    ------
    ValueError
        For a non-positive diameter or blur, or scaling outside (0, 1).

    Examples
    --------
    >>> from otlinop.sinkhorn import epsilon_schedule
    >>> [round(e, 4) for e in epsilon_schedule(1.0, 0.25, 0.5)]
    [1.0, 1.0, 0.25, 0.0625]
    """
    owner = "epsilon_schedule"
    diameter = positive_scalar(owner, "diameter", diameter, "")
    blur = positive_scalar(owner, "blur", blur)
    scaling = fraction(owner, "scaling", scaling)
    # The log-spaced middle part is taken from numpy's arange, as GeomLoss does,
    # so that both libraries run the same number of steps at the same eps.
    middle = np.arange(2 * math.log(diameter), 2 * math.log(blur), 2 * math.log(scaling))
    return [diameter ** 2] + [float(np.exp(e)) for e in middle] + [blur ** 2]


# --------------------------------------------------------------------------
# Batched soft-min with as few launches as possible
# --------------------------------------------------------------------------
def _row_error(f, s, a, eps: float, rho) -> torch.Tensor:
    """L1 row-marginal error of the plan P(f, g), per batch entry (B,).

    ``s = smin(log b + g / eps)`` (undamped), so ``(P 1)_i = a_i exp((f_i - s_i) / eps)``;
    the target is ``a`` on a balanced side, ``a exp(-f / rho)`` (the fixed point)
    on a relaxed one. Costs no extra pass over the data.
    """
    target = 0.0 if rho is None else -f / rho
    ratio = torch.exp((f - s) / eps) - torch.exp(torch.as_tensor(target, dtype=f.dtype, device=f.device))
    return torch.where(a > 0, a * ratio.abs(), torch.zeros_like(ratio)).sum(-1)


# --------------------------------------------------------------------------
# The two loops
# --------------------------------------------------------------------------
@dataclass
class _Monitor:
    """Marginal errors at the checks, the callback and the progress bar."""

    check_every: int
    callback: Callable | None
    bar: object | None
    method: str
    inp: Inputs
    errors: list = field(default_factory=list)   # tensors (B,) until finish()

    @property
    def syncs(self) -> bool:
        return self.callback is not None or self.bar is not None

    def record(self, iteration: int, eps: float, err: torch.Tensor, f, g, *, read: bool = False) -> float | None:
        """Store the error of one check; returns it as a float when synced or
        when the caller must ``read`` it (a stopping test), else None."""
        self.errors.append(err.max())
        if not self.syncs:
            return float(self.errors[-1].item()) if read else None
        value = float(self.errors[-1].item())
        if self.bar is not None:
            self.bar.set_postfix(marginal_error=f"{value:.2e}", eps=f"{eps:.3g}", refresh=False)
        if self.callback is not None:
            self.callback({"method": self.method, "iteration": iteration, "eps": eps,
                           "marginal_error": value, "f": self.inp.unbatch(f), "g": self.inp.unbatch(g)})
        return value

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def advance_to(self, position: int) -> None:
        if self.bar is not None:
            self.bar.update(position - self.bar.n)

    def finish(self) -> list[float]:
        if self.bar is not None:
            self.bar.close()
        if not self.errors:
            return []
        return [float(e) for e in torch.stack(self.errors).tolist()]


config.declare("stack_self_problems", True, owner="otlinop.sinkhorn", doc=(
    "with n = m the two debiasing problems (x, x) and (y, y) advance in one launch per step; "
    "False runs them as separate calls"))


class _SelfBank:
    """The debiasing potentials f_aa (problem (x, x)) and g_bb (problem (y, y)).

    Their updates are soft-mins of a cloud against itself (softmin_self: the
    upper triangle of the symmetric cost only). With n = m both clouds are
    stacked along the batch once, here: one launch per update. Created at
    the first eps from zero potentials.
    """

    def __init__(self, x, y, log_a, log_b, eps0: float, rho_x, rho_y, opts, pot_dtype):
        self._opts = opts
        self._pot_dtype = pot_dtype
        self._rhos = [rho_x, rho_y]
        self._B = x.shape[0]
        self._stacked = config.stack_self_problems and x.shape[1] == y.shape[1]
        if self._stacked:
            self._clouds, self._logs = [torch.cat([x, y])], [torch.cat([log_a, log_b])]
        else:
            self._clouds, self._logs = [x, y], [log_a, log_b]
        self._pots = self._smins([torch.zeros_like(lw) for lw in self._logs], eps0)

    def _smins(self, pots, eps: float) -> list:
        out = [_softmin_self(c, p, lw, eps=eps, **self._opts).to(self._pot_dtype)
               for c, p, lw in zip(self._clouds, pots, self._logs)]
        sides = [out[0][:self._B], out[0][self._B:]] if self._stacked else out
        for side, rho in zip(sides, self._rhos):
            lam = _damping(eps, rho)
            if lam != 1.0:
                side.mul_(lam)
        return out

    def smins(self, eps: float) -> list:
        """The damped updates [T(f_aa), T(g_bb)] of the current potentials."""
        out = self._smins(self._pots, eps)
        return [out[0][:self._B], out[0][self._B:]] if self._stacked else out

    def step(self, eps: float) -> None:
        """One averaged update."""
        self._pots = [torch.lerp(p, s, 0.5) for p, s in zip(self._pots, self._smins(self._pots, eps))]

    def potentials(self) -> list:
        return [self._pots[0][:self._B], self._pots[0][self._B:]] if self._stacked else list(self._pots)


#: A run of at least this many averaged steps at one eps (CUDA tensors, Triton
#: kernels, no debiasing bank) replays one captured step as a CUDA graph
#: between two checks: a step is three launches (the fused pass, its merge,
#: the averaging) whose host cost, not the GPU, bounds small problems. The
#: capture costs the host about ten steps (H100, n = m = 10k, d = 64: 2.2
#: against 1.9 ms for 8 steps, 2.8 against 3.3 ms for 16, 7.1 against 10.5 ms
#: for 64). A run is captured after at least one eager step of the call (which
#: compiles and tunes the kernels), and replays run that step's kernels on the
#: same values: bitwise the same potentials.
GRAPH_MIN_RUN = 16
config.declare("sinkhorn_graphs", True, owner="otlinop.sinkhorn", doc=(
    "runs of at least GRAPH_MIN_RUN Sinkhorn steps at one eps on CUDA replay one captured step "
    "as a CUDA graph; False runs every step eagerly"))


def _graphable(x: torch.Tensor, backend) -> bool:
    """Whether steps on points ``x`` can be captured: CUDA, Triton kernels (no host sync), no capture running."""
    return (config.sinkhorn_graphs and x.is_cuda and resolve_backend("sinkhorn", backend, x) == "triton"
            and not torch.cuda.is_current_stream_capturing())


class _StepGraph:
    """One step ``state <- step(state)`` of a loop, captured once, replayed on copies of the loop's tensors.

    ``key``: what the step was captured for (the eps of a run). The static
    buffers stay the graph's: ``run`` copies the state in and returns fresh
    tensors, which a later replay never overwrites (callbacks and results
    may keep them).
    """

    def __init__(self, step, state: tuple, device, key=None):
        from solvers.graphs import capture   # at call time: tests replace it

        self.key = key
        self.graph, self.static = capture(step, state, device)

    def run(self, state: tuple, times: int) -> list:
        for dst, src in zip(self.static, state):
            dst.copy_(src)
        for _ in range(times):
            self.graph.replay()
        return [t.clone() for t in self.static]


def _symmetric_loop(inp: Inputs, eps_list, rho_x, rho_y, *, debias: bool, f0, g0, monitor: _Monitor,
                    cost_scale: float, backend, precision, refine: int = 0, threshold: float = 0.0):
    """GeomLoss' symmetric Sinkhorn loop (docs/math.md section 3).

    Returns ``(pots, pre, steps)``: the final (extrapolated) potentials and
    those before the extrapolation, each the list ``[f, g]`` or, with
    ``debias``, ``[f, g, f_aa, g_bb]`` (the last two for OT(a, a) and
    OT(b, b)), and the number of averaged steps run.

    (f, g) live in one tensor FG = [f | g] (B, n + m), and both of their
    soft-min updates come from one pass over the cost (softmin_pair: each
    dot x_i . y_j computed once for both), so a step costs that launch, its
    merge and one averaging op. The debiasing potentials, if any, are a
    second, stacked bank (_SelfBank). After the schedule, up to ``refine``
    more steps at its last eps, until a check finds the marginal error
    <= ``threshold``. Runs of equal eps replay a CUDA graph (GRAPH_MIN_RUN).
    """
    x, y = inp.x, inp.y
    log_a, log_b = inp.log_a, inp.log_b
    n = x.shape[1]
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision)

    def smins(FG, eps):
        """Damped soft-min updates [T_f(g) | T_g(f)] of FG = [f | g]."""
        S = _softmin_pair(x, y, FG[:, :n], FG[:, n:], log_a, log_b, eps=eps, **opts).to(inp.pot_dtype)
        lam_x, lam_y = _damping(eps, rho_x), _damping(eps, rho_y)
        if lam_x != 1.0:
            S[:, :n].mul_(lam_x)
        if lam_y != 1.0:
            S[:, n:].mul_(lam_y)
        return S

    # Initialisation at the first (largest) eps, the other potential being 0:
    # the soft-min is then nearly a convolution of the cost with the weights.
    # A warm start replaces it; a missing half is the update of the given one
    # (the update of g depends on f only, and that of f on g only).
    eps0 = eps_list[0]
    FG = torch.zeros(log_a.shape[:-1] + (n + y.shape[1],), dtype=inp.pot_dtype, device=x.device)
    if f0 is not None and g0 is not None:
        FG = torch.cat([f0, g0], dim=-1)
    elif f0 is not None:
        FG[:, :n] = f0
        FG[:, n:] = smins(FG, eps0)[:, n:]
    elif g0 is not None:
        FG[:, n:] = g0
        FG[:, :n] = smins(FG, eps0)[:, :n]
    else:
        FG = smins(FG, eps0)
    selves = _SelfBank(x, y, log_a, log_b, eps0, rho_x, rho_y, opts, inp.pot_dtype) if debias else None

    total = len(eps_list) + refine

    def eps_at(i):
        return eps_list[min(i, len(eps_list) - 1)]

    def checks(i):
        return (i + 1) % monitor.check_every == 0

    graphs = selves is None and _graphable(x, backend)
    warm = f0 is None or g0 is None     # a soft-min ran already: kernels compiled and tuned
    replay = None       # the _StepGraph of the current run of equal eps
    i = 0
    while i < total:
        eps = eps_at(i)
        if graphs and warm and not checks(i):
            run = next((k for k in range(i, total) if eps_at(k) != eps), total) - i
            if (replay is None or replay.key != eps) and run >= GRAPH_MIN_RUN:
                # The state is FG alone: every other input is fixed for the run.
                replay = _StepGraph(lambda st: (torch.lerp(st[0], smins(st[0], eps), 0.5),), (FG,), x.device,
                                    key=eps)
            if replay is not None and replay.key == eps:
                span = next((k for k in range(i, i + run) if checks(k)), i + run) - i
                (FG,) = replay.run((FG,), span)
                monitor.advance(span)
                i += span
                continue
        S = smins(FG, eps)
        warm = True
        stop = False
        if checks(i):
            lam_x = _damping(eps, rho_x)
            err = _row_error(FG[:, :n], S[:, :n] / lam_x, inp.a, eps, rho_x)
            refining = refine > 0 and i + 1 >= len(eps_list)
            value = monitor.record(i + 1, eps, err, FG[:, :n], FG[:, n:], read=refining)
            if refining:
                stop = value <= threshold or not math.isfinite(value)
        # Averaged (Jacobi) updates: plain simultaneous updates oscillate.
        FG = torch.lerp(FG, S, 0.5)
        if selves is not None:
            selves.step(eps)
        monitor.advance()
        i += 1
        if stop:
            break
    del replay

    # Final extrapolation: one unaveraged step at the last eps from the
    # pre-last potentials. GeomLoss differentiates only this step.
    eps = eps_list[-1]
    S = smins(FG, eps)
    pre = [FG[:, :n], FG[:, n:]]
    pots = [S[:, :n], S[:, n:]]
    if selves is not None:
        pre += selves.potentials()
        pots += selves.smins(eps)
    monitor.record(i, eps, _row_error(pre[0], pots[0] / _damping(eps, rho_x), inp.a, eps, rho_x),
                   pots[0], pots[1])
    return pots, pre, i


def _alternating_loop(inp: Inputs, eps: float, rho_x, rho_y, *, f0, g0, max_iter: int, threshold: float,
                      monitor: _Monitor, cost_scale: float, backend, precision):
    """OTT-JAX's alternating loop: g then f, checks every ``check_every`` iterations.

    Returns ``(f, g, n_iter, converged)``.
    """
    x, y = inp.x, inp.y
    log_a, log_b = inp.log_a, inp.log_b
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision)

    def rows(h, eps):          # update of f from the column log-weights h = log b + g / eps
        return _softmin(x, y, h, eps=eps, **opts).to(inp.pot_dtype)

    def cols(h, eps):          # update of g from h = log a + f / eps
        return _softmin(y, x, h, eps=eps, **opts).to(inp.pot_dtype)
    lam_x, lam_y = _damping(eps, rho_x), _damping(eps, rho_y)

    if f0 is not None:
        f = f0
    elif g0 is not None:
        f = lam_x * rows(log_b + g0 / eps, eps)
    else:
        f = torch.zeros_like(log_a)
    g = None
    converged = False
    n_iter = 0
    def damped(lam, t):
        return t if lam == 1.0 else lam * t

    def half_steps(f):
        """g <- T_g(f), then the undamped update s = T_f(g) of f."""
        # One fused add per half-step (alpha = 1/eps) and no scaling on a
        # balanced side: the launches of the small ops bound small problems.
        g = damped(lam_y, cols(torch.add(log_a, f, alpha=1.0 / eps), eps))
        return g, rows(torch.add(log_b, g, alpha=1.0 / eps), eps)

    def checks(it):
        return it % monitor.check_every == 0 or it == max_iter

    # Between two checks, iterations replay one captured iteration (GRAPH_MIN_RUN).
    graphs = max_iter >= GRAPH_MIN_RUN and _graphable(x, backend)
    replay = None
    it = 1
    while it <= max_iter:
        span = next(k for k in range(it, max_iter + 1) if checks(k)) - it
        if graphs and span and n_iter:       # after one eager iteration (compiled, tuned)
            if replay is None:
                def iteration(state):
                    g, s = half_steps(state[0])
                    return damped(lam_x, s), g
                replay = _StepGraph(iteration, (f, g), x.device)
            f, g = replay.run((f, g), span)
            it += span
            continue
        g, s = half_steps(f)
        f_prev, f = f, damped(lam_x, s)
        n_iter = it
        it += 1
        if checks(n_iter):
            # Row error of P(f_prev, g): free, from the update just made. The
            # returned (f, g) has exact row marginals (balanced side).
            err = _row_error(f_prev, s, inp.a, eps, rho_x)
            value = monitor.record(n_iter, eps, err, f, g, read=True)
            monitor.advance_to(n_iter)
            if value <= threshold:
                converged = True
                break
            if not math.isfinite(value):   # diverged (as OTT, stop rather than iterate on NaNs)
                break
    return f, g, n_iter, converged


# --------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------
@dataclass(repr=False)
class SinkhornResult:
    """Dual potentials of entropic OT and what is needed to reuse them.

    Attributes
    ----------
    f : Tensor, shape (n,) or (B, n)
        Potential on x (GeomLoss convention, see Notes).
    g : Tensor, shape (m,) or (B, m)
        Potential on y.
    eps : float
        The (final) entropic regularisation.
    n_iter : int
        Iterations run: averaged steps for "symmetric" (``len(eps_schedule)``,
        more with ``max_iter``; plus an initial and a final half-step each),
        full (g, f) iterations for "alternating".
    converged : bool
        Whether the last recorded marginal error is <= ``threshold`` (for
        "symmetric", informative only: its iteration count is fixed).
    marginal_error : list of float
        L1 marginal errors recorded at each check (the maximum over a batch).
    a, b, x, y : Tensor
        The weights and points (as given, or the uniform default weights).
    cost_scale : float
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    reach_x, reach_y : float or None
        Marginal relaxation per side (``rho = reach^2``); None = balanced side.
    method : str
        "symmetric" or "alternating".
    eps_schedule : list of float
        The values of eps used (a single value for "alternating").
    f_pre, g_pre : Tensor or None
        "symmetric" only: the potentials before the final extrapolation
        (``f = lam T_f(g_pre)``, ``g = lam T_g(f_pre)``); the loss gradients use
        the plans ``P(f, g_pre)`` and ``P(f_pre, g)``.
    backend, precision
        Kernel options, reused by ``plan`` and the Hessian methods.

    Notes
    -----
    Operators built from an unbatched result (``select(i)`` picks one
    problem of a batch): ``plan`` (the ``PlanOperator``), ``hessian()`` (the
    Schur complement ``S``), ``dual_hessian()`` (``K``) and
    ``loss_hessian(wrt)`` (the Hessian of the OT loss in the points). They
    are exact at converged potentials: ``method="symmetric"`` runs a fixed
    schedule, so check ``marginal_error``, or solve with ``"alternating"``
    to a small ``threshold`` when the second-order information must be
    accurate.

    ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``. OTT-JAX's potentials are
    ``f + eps log a`` and ``g + eps log b``; POT's ``log_u = (f + eps log a) / eps``.
    """

    f: torch.Tensor
    g: torch.Tensor
    eps: float
    n_iter: int
    converged: bool
    marginal_error: list
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

    @property
    def rho_x(self):
        """``reach_x ** 2`` (None when balanced on x)."""
        return None if self.reach_x is None else self.reach_x ** 2

    @property
    def rho_y(self):
        """``reach_y ** 2`` (None when balanced on y)."""
        return None if self.reach_y is None else self.reach_y ** 2

    @property
    def batched(self) -> bool:
        return self.x.ndim == 3

    @property
    def cost(self) -> torch.Tensor:
        """The entropic OT value, a scalar tensor, or shape (B,) when batched.

        Balanced: ``<a, f> + <b, g>``. A relaxed side contributes
        ``(rho + eps/2) <a, 1 - exp(-f/rho)>`` instead of ``<a, f>`` (GeomLoss'
        unbalanced formula, docs/math.md section 4).
        """
        return _ot_value(self.f, self.g, self.a, self.b, self.eps, self.rho_x, self.rho_y)

    def _unbatched(self, what: str, hint: str) -> None:
        """Raise the error of a per-problem operator asked of a batched result."""
        if self.batched:
            raise ValueError(f"SinkhornResult.{what}: this result holds a batch of {self.x.shape[0]} problems, "
                             f"but {hint}; use result.select(i).{what}")

    def _operator_arguments(self) -> tuple[tuple, dict]:
        """``(x, y, f, g)`` and the keywords shared by the plan and Hessian operators, in the
        potentials' dtype (points and weights may be half precision, the potentials are not)."""
        dt = self.f.dtype
        data = (self.x.to(dt), self.y.to(dt), self.f, self.g)
        return data, dict(eps=self.eps, a=self.a.to(dt), b=self.b.to(dt), cost_scale=self.cost_scale,
                          backend=self.backend, precision=self.precision)

    @property
    def plan(self):
        """The plan as a ``PlanOperator`` (n, m) built from (x, y, f, g, a, b).

        Raises
        ------
        ValueError
            For a batched result: use ``result.select(i).plan`` or ``otlinop.plan.plan_matmul``.
        """
        if self.batched:
            raise ValueError(f"SinkhornResult.plan: this result holds a batch of {self.x.shape[0]} problems, "
                             "but a PlanOperator is one (n, m) plan; use result.select(i).plan, or "
                             "otlinop.plan.plan_matmul(x, y, f, g, V, eps=..., a=..., b=...) for a batch")
        from .plan import PlanOperator
        data, kw = self._operator_arguments()
        return PlanOperator(*data, **kw)

    def hessian(self, ridge=None):
        """The Schur complement ``S`` of the dual Hessian on ``g``, a ``HessianOperator`` (m, m).

        Parameters
        ----------
        ridge : float, optional
            Relative ridge ``tau`` (``tau * mean(P.T 1)`` on the diagonal);
            default ``otlinop.hessian.DEFAULT_RIDGE``, 0 disables it.

        Returns
        -------
        HessianOperator
            ``HessianOperator(x, y, f, g, eps=, a=, b=, cost_scale=, reach_x=,
            reach_y=, ridge=, backend=, precision=)`` with this result's data,
            in the potentials' dtype.

        Raises
        ------
        ValueError
            For a batched result: use ``result.select(i).hessian()``.

        Notes
        -----
        ``S = ky Diag(P.T 1) - P.T Diag(1 / (kx P 1)) P + ridge mean(P.T 1) I``
        (docs/math.md section 5). The operator is exact at converged potentials;
        ``method="symmetric"`` stops after a fixed eps schedule (its
        ``marginal_error`` says how far from convergence it is).

        Examples
        --------
        >>> import torch, solvers
        >>> from otlinop.sinkhorn import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-10)
        >>> S = res.hessian()
        >>> rhs = torch.randn(20, dtype=torch.float64); rhs -= rhs.mean()
        >>> S.shape, solvers.cg(S, rhs, M=solvers.jacobi(), rtol=1e-10).converged
        ((20, 20), True)
        """
        self._unbatched("hessian()", "a HessianOperator is the (m, m) Schur complement of one problem")
        from .hessian import HessianOperator
        data, kw = self._operator_arguments()
        return HessianOperator(*data, **kw, reach_x=self.reach_x, reach_y=self.reach_y, ridge=ridge)

    def dual_hessian(self, ridge=None):
        """The dual Hessian ``K`` (n + m, n + m), a ``DualHessianOperator``.

        Parameters
        ----------
        ridge : float, optional
            The relative ridge of its Schur complement (``K.schur``), used by
            ``K.solve``; as in :meth:`hessian`.

        Returns
        -------
        DualHessianOperator
            ``otlinop.hessian.dual_hessian(x, y, f, g, ...)`` with this
            result's data, in the potentials' dtype.

        Raises
        ------
        ValueError
            For a batched result: use ``result.select(i).dual_hessian()``.

        Notes
        -----
        ``K = [[kx Diag(P 1), P], [P.T, ky Diag(P.T 1)]]``: minus ``eps`` times
        the Hessian of the dual in ``(f, g)``, with ``k = (rho + eps) / rho`` on
        a relaxed side and 1 on a hard one (docs/math.md section 5).

        Examples
        --------
        >>> import torch, solvers
        >>> from otlinop.sinkhorn import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> res = sinkhorn(x, y, eps=0.5, reach=1.0, method="alternating", threshold=1e-10)
        >>> K = res.dual_hessian()
        >>> z, info = K.solve(torch.randn(50, dtype=torch.float64), M=solvers.neumann(3), rtol=1e-10)
        >>> K.shape, info.converged
        ((50, 50), True)
        """
        self._unbatched("dual_hessian()", "a DualHessianOperator is the (n + m, n + m) dual Hessian of "
                        "one problem")
        from .hessian import dual_hessian
        data, kw = self._operator_arguments()
        return dual_hessian(*data, **kw, reach_x=self.reach_x, reach_y=self.reach_y, ridge=ridge)

    def loss_hessian(self, wrt="x", **solver_options):
        """The Hessian of the OT loss in the points, a ``LossHessianOperator``.

        Parameters
        ----------
        wrt : {"x", "y", "xy"}, default "x"
            The variables: x (size n d), y (m d) or both ((n + m) d, x first).
        **solver_options
            Options of the inner Schur solve of each matvec, passed to
            ``otlinop.hvp.loss_hessian_operator``: ``solver`` (default
            ``solvers.cg``), ``M`` (e.g. ``solvers.jacobi()``,
            ``solvers.neumann(3)``), ``rtol``, ``atol``, ``maxiter``, ``ridge``.

        Returns
        -------
        LossHessianOperator
            Symmetric and indefinite (use MINRES for Newton systems); one
            matvec is one Hessian-vector product, ``.last_solve`` its inner
            ``SolveResult``.

        Raises
        ------
        ValueError
            For a batched result (use ``result.select(i).loss_hessian()``),
            or ``wrt`` not in {"x", "y", "xy"}.

        Notes
        -----
        ``H = E + R^T K^+ R / eps`` by implicit differentiation (docs/math.md
        section 6), exact at converged potentials. It is the Hessian of
        ``OT(a, b)`` only: for the debiased divergence of ``SamplesLoss``
        subtract ``otlinop.hvp.hvp_self`` terms, or differentiate the loss
        twice with autograd.

        Examples
        --------
        >>> import torch, solvers
        >>> from otlinop.sinkhorn import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
        >>> H = res.loss_hessian(M=solvers.jacobi())
        >>> v = torch.randn(60, dtype=torch.float64)
        >>> (H @ v).shape, H.last_solve.converged
        (torch.Size([60]), True)
        """
        self._unbatched("loss_hessian()", "a LossHessianOperator is the Hessian of one problem")
        from .hvp import loss_hessian_operator
        data, kw = self._operator_arguments()
        return loss_hessian_operator(*data, **kw, reach_x=self.reach_x, reach_y=self.reach_y, wrt=wrt,
                                     **solver_options)

    def select(self, i: int) -> "SinkhornResult":
        """The i-th problem of a batched result, as an unbatched result."""
        if not self.batched:
            raise ValueError("SinkhornResult.select: this result is not batched")
        pick = lambda t: None if t is None else t[i]  # noqa: E731
        return SinkhornResult(
            f=self.f[i], g=self.g[i], eps=self.eps, n_iter=self.n_iter, converged=self.converged,
            marginal_error=list(self.marginal_error), a=self.a[i], b=self.b[i], x=self.x[i], y=self.y[i],
            cost_scale=self.cost_scale, reach_x=self.reach_x, reach_y=self.reach_y, method=self.method,
            eps_schedule=list(self.eps_schedule), f_pre=pick(self.f_pre), g_pre=pick(self.g_pre),
            backend=self.backend, precision=self.precision)

    def __repr__(self) -> str:
        shape = f"batch={self.x.shape[0]}, " if self.batched else ""
        n, m = self.x.shape[-2], self.y.shape[-2]
        err = f"{self.marginal_error[-1]:.2e}" if self.marginal_error else "n/a"
        return (f"SinkhornResult({shape}n={n}, m={m}, method={self.method!r}, eps={self.eps:.4g}, "
                f"n_iter={self.n_iter}, converged={self.converged}, marginal_error={err}, "
                f"reach_x={self.reach_x}, reach_y={self.reach_y}, cost_scale={self.cost_scale})")


def _side_value(w, h, eps: float, rho) -> torch.Tensor:
    """One side of GeomLoss' OT value: ``<w, h>`` or ``(rho + eps/2) <w, 1 - e^{-h/rho}>``."""
    if rho is None:
        return (w * h).sum(-1)
    return (rho + 0.5 * eps) * (w * (-torch.expm1(-h / rho))).sum(-1)


def _ot_value(f, g, a, b, eps: float, rho_x, rho_y) -> torch.Tensor:
    dt = f.dtype
    return _side_value(a.to(dt), f, eps, rho_x) + _side_value(b.to(dt), g, eps, rho_y)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------
def _resolve_eps(owner: str, method: str, blur, eps, scaling, diameter, inp: Inputs):
    """Return (final eps, schedule, blur)."""
    if blur is not None and eps is not None:
        raise ValueError(f"{owner}: give blur or eps, not both (eps = blur**2); got blur={blur!r}, eps={eps!r}")
    if eps is not None:
        eps = positive_scalar(owner, "eps", eps)
        blur = math.sqrt(eps)
    else:
        blur = positive_scalar(owner, "blur", DEFAULT_BLUR if blur is None else blur)
        eps = blur * blur
    if method == "alternating":
        return eps, [eps], blur
    scaling = fraction(owner, "scaling", scaling)
    if diameter is None:
        diameter = _diameter(inp.x, inp.y)
        if diameter <= 0:   # every point at the same place: any positive scale works
            diameter = blur
    else:
        diameter = positive_scalar(owner, "diameter", diameter)
    # The last eps is blur**2 exactly (not the schedule's rounding of it).
    schedule = epsilon_schedule(diameter, blur, scaling)
    schedule[-1] = eps
    return eps, schedule, blur


def sinkhorn(x, y, a=None, b=None, *, blur=None, eps=None, scaling=0.5, diameter=None, cost_scale=1.0,
             reach=None, reach_x=None, reach_y=None, method="symmetric", max_iter=None, threshold=None,
             check_every=10, f0=None, g0=None, callback=None, verbose=False, backend=None,
             precision=None) -> SinkhornResult:
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
        "symmetric": GeomLoss' eps-scaling with averaged updates and a final
        extrapolation; its iteration count is fixed by the schedule.
        "alternating": OTT-JAX's fixed-eps Gauss-Seidel updates (g then f)
        until the marginal error is <= ``threshold``.
    max_iter : int, optional
        "alternating": the most iterations (default 2000). "symmetric": None
        (default) runs the schedule only; an int, at least the schedule's
        length, continues the averaged steps at the final eps until a check
        finds the marginal error <= ``threshold``, ``max_iter`` steps in all
        (runs of one eps replay a CUDA graph between checks on a GPU).
    threshold : float, optional
        Convergence threshold on the L1 marginal error, default 1e-3 (OTT's).
    check_every : int, default 10
        Iterations between two checks of the marginal error. "alternating"
        synchronises with the host only at checks.
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

    Returns
    -------
    SinkhornResult
        ``f``, ``g``, ``eps``, ``n_iter``, ``converged``, ``marginal_error``,
        ``plan`` (a PlanOperator), ``cost`` and the data.

    Raises
    ------
    TypeError
        Non-tensor inputs, non-floating or mismatched dtypes.
    ValueError
        Mismatched shapes or devices, empty clouds, non-finite points, negative
        weights or zero mass, unequal masses in a balanced problem,
        non-positive blur/eps/reach/cost_scale, scaling outside (0, 1), an
        unknown method or backend.

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
    unbalanced value (see ``SinkhornResult.cost``).

    Examples
    --------
    >>> import torch
    >>> from otlinop.sinkhorn import sinkhorn
    >>> x = torch.randn(100, 2, dtype=torch.float64); y = torch.randn(80, 2, dtype=torch.float64) + 1
    >>> res = sinkhorn(x, y, blur=0.1)
    >>> res.f.shape, res.g.shape, round(res.eps, 6)
    (torch.Size([100]), torch.Size([80]), 0.01)
    >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-9)
    >>> bool(res.converged), torch.allclose(res.plan.row_sums(), res.a)
    (True, True)
    """
    owner = "sinkhorn"
    if method not in _METHODS:
        raise ValueError(f"{owner}: method must be 'symmetric' (GeomLoss) or 'alternating' (OTT-JAX), "
                         f"got {method!r}")
    cost_scale = positive_scalar(owner, "cost_scale", cost_scale)
    rho_x, rho_y = _resolve_reach(owner, reach, reach_x, reach_y)
    backend = backend_name(owner, backend)
    precision = precision_name(owner, precision)
    check_every = positive_int(owner, "check_every", check_every)
    threshold = 1e-3 if threshold is None else nonnegative_scalar(owner, "threshold", threshold, allow_inf=True)
    if callback is not None:
        function(owner, "callback", callback, "callable or None")
    if method == "alternating":
        max_iter = 2000 if max_iter is None else positive_int(owner, "max_iter", max_iter)
        if diameter is not None:
            warnings.warn(f"{owner}: diameter is ignored by method='alternating' (fixed eps)", stacklevel=2)
    elif max_iter is not None:
        max_iter = positive_int(owner, "max_iter", max_iter)

    inp = measures(owner, x, y, a, b, balanced=(rho_x is None and rho_y is None))
    check_backend(owner, backend, x)
    f0 = potential(owner, "f0", f0, inp.a, batched=inp.batched, dtype=inp.pot_dtype)
    g0 = potential(owner, "g0", g0, inp.b, batched=inp.batched, dtype=inp.pot_dtype)
    eps, schedule, _ = _resolve_eps(owner, method, blur, eps, scaling, diameter, inp)
    refine = 0
    if method == "symmetric" and max_iter is not None:
        if max_iter < len(schedule):
            raise ValueError(f"{owner}: max_iter={max_iter} is shorter than the eps schedule ({len(schedule)} "
                             "steps); method='symmetric' runs the whole schedule, then up to max_iter steps "
                             "in all at the final eps")
        refine = max_iter - len(schedule)

    bar = None
    if verbose:
        from tqdm.auto import tqdm
        total = len(schedule) + refine if method == "symmetric" else max_iter
        bar = tqdm(total=total, desc=f"sinkhorn ({method})", leave=False)
    monitor = _Monitor(check_every=check_every, callback=callback, bar=bar, method=method, inp=inp)
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision)

    f_pre = g_pre = None
    # The kernels' per-call NaN checks (one host sync each) are off inside the loop:
    # the inputs were checked once on entry, and a sync per update would stall the GPU.
    with torch.no_grad(), config.override(check_finite=False):
        if method == "symmetric":
            pots, pre, n_iter = _symmetric_loop(inp, schedule, rho_x, rho_y, debias=False, f0=f0, g0=g0,
                                                monitor=monitor, refine=refine, threshold=threshold, **opts)
            f, g = pots
            f_pre, g_pre = pre
        else:
            f, g, n_iter, _ = _alternating_loop(inp, eps, rho_x, rho_y, f0=f0, g0=g0, max_iter=max_iter,
                                                threshold=threshold, monitor=monitor, **opts)
    errors = monitor.finish()
    converged = bool(errors) and errors[-1] <= threshold

    u = inp.unbatch
    return SinkhornResult(
        f=u(f), g=u(g), eps=eps, n_iter=n_iter, converged=converged, marginal_error=errors,
        a=u(inp.a) if a is None else a, b=u(inp.b) if b is None else b, x=x, y=y, cost_scale=cost_scale,
        reach_x=None if rho_x is None else math.sqrt(rho_x),
        reach_y=None if rho_y is None else math.sqrt(rho_y),
        method=method, eps_schedule=schedule, f_pre=u(f_pre), g_pre=u(g_pre),
        backend=backend, precision=precision)
