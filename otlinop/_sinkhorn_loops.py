"""The Sinkhorn loops: GeomLoss' symmetric loop and OTT-JAX's alternating loop.

``sinkhorn`` (``otlinop.sinkhorn``) and the loss (``otlinop.loss``) validate
their arguments, then run one of these loops on batched, checked data
(``otlinop._checks.Inputs``) under ``torch.no_grad()``:

- :func:`symmetric_loop`: averaged (Jacobi) updates of both potentials on an
  eps schedule, then the final extrapolation; with ``debias``, the two
  debiasing problems in a second bank (:class:`SelfBank`).
- :func:`alternating_loop`: Gauss-Seidel updates (g then f) at one eps until
  the marginal error falls below a threshold.
- :class:`Monitor`: the marginal errors at the checks, the callback, the
  progress bar and the detection of a stalled loop; :func:`row_error`
  computes the error from an update, without an extra pass over the data.
- :class:`StepGraph`: a run of steps at one eps replayed as a CUDA graph,
  through the ``graphs`` object the loops take (``solvers.graphs.CudaGraphs``
  or a stand-in; None runs every step eagerly).

Every update is one streaming soft-min (``otlinop.kernels``); the formulas
are docs/math.md section 3's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from solvers import config

from ._checks import Inputs
from .kernels._dispatch import resolve_backend
from .kernels.softmin import reciprocal, softmin
from .kernels.softmin_pair import softmin_pair_unchecked, softmin_self_unchecked

__all__ = ["GRAPH_MIN_RUN", "STALL_DROP", "STALL_ITERATIONS", "STALL_CHECKS", "STALL_FLOOR", "damping", "row_error",
           "resolution", "Monitor", "SelfBank", "StepGraph", "LocalOps", "LOCAL", "symmetric_loop", "alternating_loop"]


# --------------------------------------------------------------------------
# The soft-mins and sums of the loops (one process, or a hook for sharded data)
# --------------------------------------------------------------------------
class LocalOps:
    """What the loops compute over the points, on one process: the default ``ops`` of the loops.

    ``otlinop.distributed.sinkhorn`` passes an object with the same methods
    whose soft-mins run over the blocks of every rank and whose sums and
    maxima are reduced over the ranks; the loops are otherwise unchanged.
    """

    #: Whether the debiasing bank may stack the two clouds along the batch (n = m).
    stack_self = True

    def pair(self, x, y, f, g, log_a, log_b, *, eps, average=None, **opts):
        """``[smin_C(log b + g/eps) | smin_C^T(log a + f/eps)]``, (B, n + m), undamped.

        With ``average`` (the potentials ``[f | g]``), the averaged step
        ``torch.lerp(average, S, 0.5)`` instead, in ``average``'s dtype (the
        Triton kernels write it from their merge: no separate launch).
        """
        return softmin_pair_unchecked(x, y, f, g, log_a, log_b, eps=eps, average=average, **opts)

    def rows(self, x, y, h, *, eps, **opts):
        """The update of f from the column log-weights h (B, m): (B, n)."""
        return softmin(x, y, h, eps=eps, **opts)

    def cols(self, x, y, h, *, eps, **opts):
        """The update of g from the row log-weights h (B, n): (B, m)."""
        return softmin(y, x, h, eps=eps, **opts)

    def self_smin(self, side: int, c, f, log_w, *, eps, average=None, **opts):
        """The update of a debiasing potential of the cloud ``c`` (side 0: x, 1: y, or both stacked);
        ``average`` as in :meth:`pair` (``f`` itself)."""
        return softmin_self_unchecked(c, f, log_w, eps=eps, average=average, **opts)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """Sums over the points (..., B) completed over every part of the clouds: here, already whole."""
        return t

    def extent(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``max|f| + max|g|`` over the whole potentials, a 0-d tensor."""
        return f.abs().amax() + g.abs().amax()


LOCAL = LocalOps()


# --------------------------------------------------------------------------
# Damping and the marginal error of an update
# --------------------------------------------------------------------------
def damping(eps, rho):
    """GeomLoss' dampening ``lam = rho / (rho + eps)`` (1 on a balanced side); a 0-d
    tensor for a tensor ``eps`` (an eps schedule on the device)."""
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


def row_error(f, s, a, eps: float, rho, ops: LocalOps = LOCAL) -> torch.Tensor:
    """L1 row-marginal error of the plan P(f, g) relative to the mass of ``a``, per batch entry (B,).

    ``s = smin(log b + g / eps)`` (undamped), so ``(P 1)_i = a_i exp((f_i - s_i) / eps)``;
    the target is ``a`` on a balanced side, ``a exp(-f / rho)`` (the fixed point)
    on a relaxed one. Relative, so that a threshold means the same for weights of
    any mass (an absolute 1e-3 is met at once by weights of mass 1e-300, and never
    by weights of mass 1e10); for probability weights it is the L1 error. Costs no
    extra pass over the data.
    """
    # A balanced side's target is the constant exp(0) = 1: a Python number (a tensor made from it on
    # the device would be a host-to-device copy, and a synchronisation, at every check).
    target = 1.0 if rho is None else torch.exp(-f / rho)
    # A product with 1 / eps: the same numbers for a float eps and a device one (see reciprocal).
    ratio = torch.exp((f - s) * reciprocal(eps)) - target
    num = torch.where(a > 0, a * ratio.abs(), torch.zeros_like(ratio)).sum(-1)
    sums = ops.total(torch.stack([num, a.sum(-1).to(num.dtype)]))     # one reduction for both when sharded
    return sums[0] / sums[1]


# --------------------------------------------------------------------------
# Checks: errors, callback, progress bar, stagnation
# --------------------------------------------------------------------------
#: A loop at one eps has stalled when its best marginal error has not dropped
#: by the relative amount STALL_DROP over the last max(STALL_ITERATIONS,
#: STALL_CHECKS * check_every) iterations, and that error is within
#: STALL_FLOOR times the resolution of the potentials' arithmetic,
#: ``u (max|f| + max|g|) / eps`` (u: the unit roundoff; an error of u |f| in a
#: potential is one of u |f| / eps in each plan entry). In exact arithmetic
#: Sinkhorn converges linearly, so a plateau at that level is rounding: float32
#: potentials of ~2700 stop near 1e-4 at eps = 1, where float64 goes on. A
#: plateau far above it is the iteration's own: at small eps the error can drop
#: by less than 0.1% per 100 iterations for thousands of iterations before it
#: falls (Gaussian clouds, eps = 0.0025, float64: 2.57e-2 to 2.54e-2 over 600
#: iterations, converged 3400 later), and the loop goes on.
STALL_DROP = 1e-3
STALL_ITERATIONS = 100
STALL_CHECKS = 10
STALL_FLOOR = 100.0


def resolution(f: torch.Tensor, g: torch.Tensor, eps: float, precision, ops: LocalOps = LOCAL) -> float:
    """``u (max|f| + max|g|) / eps``: the marginal error that rounding alone leaves (one sync).
    ``precision="tf32"`` rounds the points' dot products to 11 bits, so its u is 2^-11."""
    u = 2.0 ** -11 if precision == "tf32" else torch.finfo(f.dtype).eps
    scale = ops.extent(f, g).item()
    return u * scale / eps


@dataclass
class Monitor:
    """Marginal errors at the checks, the callback, the progress bar and stagnation."""

    check_every: int
    callback: Callable | None
    bar: object | None
    method: str
    inp: Inputs
    errors: list = field(default_factory=list)   # tensors (B,) until finish()
    best: float = math.inf          # best error read at one eps (stagnation)
    best_at: int = 0                # iteration of its last drop by STALL_DROP
    stalled: bool = False
    stall_span: int = 0             # once stalled: iterations without progress
    floor: float = math.nan         # once stalled: the arithmetic's resolution (see resolution())
    #: Whether the errors are read afterwards (finish()); False: only a callback or bar reads them
    #: (the loss's solve), so the error after the final extrapolation need not be computed.
    kept: bool = True

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

    def stagnant(self, iteration: int, value: float, resolution: Callable[[], float]) -> bool:
        """Whether the error ``value`` read at ``iteration`` (a check at the final,
        fixed eps) ends a stall (see STALL_DROP). ``value`` is a host float the loop
        read for its stopping test already; ``resolution()`` (one sync) is asked only
        once a window passes without progress, at most once per window."""
        if value < self.best * (1.0 - STALL_DROP):
            self.best, self.best_at = value, iteration
            return False
        span = iteration - self.best_at
        if span < max(STALL_ITERATIONS, STALL_CHECKS * self.check_every):
            return False
        floor = resolution()
        if self.best > STALL_FLOOR * floor:
            self.best_at = iteration     # a transient, far above rounding: wait another window
            return False
        self.stalled, self.stall_span, self.floor = True, span, floor
        return True

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


# --------------------------------------------------------------------------
# The debiasing problems (x, x) and (y, y)
# --------------------------------------------------------------------------
config.declare("stack_self_problems", True, owner="otlinop.sinkhorn", doc=(
    "with n = m the two debiasing problems (x, x) and (y, y) advance in one launch per step, and "
    "(balanced, Triton soft-mins, n m <= STACK_DEBIAS_MAX_ENTRIES) with (x, y) in that same launch; "
    "False runs them as separate calls"))


class SelfBank:
    """The debiasing potentials f_aa (problem (x, x)) and g_bb (problem (y, y)).

    Their updates are soft-mins of a cloud against itself (softmin_self: the
    upper triangle of the symmetric cost only). With n = m both clouds are
    stacked along the batch once, here: one launch per update. Created at
    the first eps from zero potentials.
    """

    def __init__(self, x, y, log_a, log_b, eps0: float, rho_x, rho_y, opts, pot_dtype, ops: LocalOps = LOCAL):
        self._opts = opts
        self._ops = ops
        self._pot_dtype = pot_dtype
        self._rhos = [rho_x, rho_y]
        self._B = x.shape[0]
        self._stacked = config.stack_self_problems and ops.stack_self and x.shape[1] == y.shape[1]
        if self._stacked:
            self._clouds, self._logs = [torch.cat([x, y])], [torch.cat([log_a, log_b])]
        else:
            self._clouds, self._logs = [x, y], [log_a, log_b]
        self._pots = self._smins([torch.zeros_like(lw) for lw in self._logs], eps0)

    def _smins(self, pots, eps: float) -> list:
        out = [self._ops.self_smin(side, c, p, lw, eps=eps, **self._opts).to(self._pot_dtype)
               for side, (c, p, lw) in enumerate(zip(self._clouds, pots, self._logs))]
        sides = [out[0][:self._B], out[0][self._B:]] if self._stacked else out
        for side, rho in zip(sides, self._rhos):
            if rho is not None:     # (not lam != 1: eps may be a device tensor, never read back)
                side.mul_(damping(eps, rho))
        return out

    def smins(self, eps: float) -> list:
        """The damped updates [T(f_aa), T(g_bb)] of the current potentials."""
        out = self._smins(self._pots, eps)
        return [out[0][:self._B], out[0][self._B:]] if self._stacked else out

    def step(self, eps: float) -> None:
        """One averaged update (undamped: written by the soft-min's merge kernel)."""
        if any(rho is not None for rho in self._rhos):
            self._pots = [torch.lerp(p, s, 0.5) for p, s in zip(self._pots, self._smins(self._pots, eps))]
            return
        self._pots = [self._ops.self_smin(side, c, p, lw, eps=eps, average=p, **self._opts)
                      for side, (c, p, lw) in enumerate(zip(self._clouds, self._pots, self._logs))]

    def potentials(self) -> list:
        return [self._pots[0][:self._B], self._pots[0][self._B:]] if self._stacked else list(self._pots)


#: The debiased loss stacks its three problems into one batch of pair problems (one launch
#: per step, _stack_debias) up to this many cost entries n m per problem. The stacked self
#: problems run every entry of their symmetric costs, where softmin_self runs the upper
#: triangle: n m more exponentials per step in all, which costs less than a second launch
#: and its merge while the launches are latency-bound (n = m = 2048: about 4e6
#: exponentials, a microsecond on an H100, against the ~20 us pair launches of its
#: profile). Chosen from that arithmetic, not from a measured crossover.
STACK_DEBIAS_MAX_ENTRIES = 1 << 24


def stack_debias_problems(n: int, m: int, backend, x: torch.Tensor) -> bool:
    """Whether a balanced debiased loss on clouds of n and m points runs its problems as one batch
    (the forward's three soft-mins per step, the backward's gradient passes): n = m, Triton
    soft-mins, n m <= STACK_DEBIAS_MAX_ENTRIES (the torch reference would compute twice
    the self problems' work on a compute-bound CPU)."""
    return (config.stack_self_problems and n == m and n * m <= STACK_DEBIAS_MAX_ENTRIES
            and resolve_backend("softmin_pair", backend, x) == "triton")


def _stack_debias(inp: Inputs, rho_x, rho_y, backend, ops: LocalOps) -> bool:
    """Whether the debiased loop runs its three problems as one batch (:func:`symmetric_loop`):
    balanced, one process, and :func:`stack_debias_problems`."""
    if rho_x is not None or rho_y is not None or not ops.stack_self:
        return False
    return stack_debias_problems(inp.x.shape[1], inp.y.shape[1], backend, inp.x)


# --------------------------------------------------------------------------
# A run of steps replayed as a CUDA graph
# --------------------------------------------------------------------------
#: A run of at least this many averaged steps at one eps replays one captured
#: step as a CUDA graph between two checks (in a loop given a ``graphs``
#: machinery, which ``sinkhorn`` passes for CUDA tensors and Triton kernels,
#: and without a debiasing bank): a step is three launches (the fused pass,
#: its merge, the averaging) whose host cost, not the GPU, bounds small problems. The
#: capture costs the host about ten steps (H100, n = m = 10k, d = 64: 2.2
#: against 1.9 ms for 8 steps, 2.8 against 3.3 ms for 16, 7.1 against 10.5 ms
#: for 64). A run is captured after at least one eager step of the call (which
#: compiles and tunes the kernels), and replays run that step's kernels on the
#: same values: bitwise the same potentials.
GRAPH_MIN_RUN = 16


class StepGraph:
    """One step ``state <- step(state)`` of a loop, captured once, replayed on copies of the loop's tensors.

    ``graphs``: the graph machinery (``solvers.graphs.CUDA_GRAPHS``, or a
    stand-in with its ``capture``). ``key``: what the step was captured for
    (the eps of a run). The static buffers stay the graph's: ``run`` copies
    the state in and returns fresh tensors, which a later replay never
    overwrites (callbacks and results may keep them).
    """

    def __init__(self, graphs, step, state: tuple, device, key=None):
        self.key = key
        self.graph, self.static = graphs.capture(step, state, device)

    def run(self, state: tuple, times: int) -> list:
        for dst, src in zip(self.static, state):
            dst.copy_(src)
        for _ in range(times):
            self.graph.replay()
        return [t.clone() for t in self.static]


# --------------------------------------------------------------------------
# The two loops
# --------------------------------------------------------------------------
def symmetric_loop(inp: Inputs, eps_list, rho_x, rho_y, *, debias: bool, f0, g0, monitor: Monitor,
                   cost_scale: float, backend, precision, refine: int = 0, threshold: float = 0.0, graphs=None,
                   ops: LocalOps = LOCAL, start: int = 0, extrapolate: bool = True):
    """GeomLoss' symmetric Sinkhorn loop (docs/math.md section 3).

    Returns ``(pots, pre, steps)``: the final (extrapolated) potentials and
    those before the extrapolation, each the list ``[f, g]`` or, with
    ``debias``, ``[f, g, f_aa, g_bb]`` (the last two for OT(a, a) and
    OT(b, b)), and the number of averaged steps run.

    (f, g) live in one tensor FG = [f | g] (B, n + m), and both of their
    soft-min updates come from one pass over the cost (softmin_pair: each
    dot x_i . y_j computed once for both), so a step costs that launch, its
    merge (which also writes the averaged state on balanced sides). The
    debiasing potentials, if any, are a second, stacked bank (SelfBank), or,
    for small balanced problems with n = m on Triton soft-mins
    (:func:`_stack_debias`), more rows of FG itself: then one launch serves
    all three problems. After the schedule, up to ``refine``
    more steps at its last eps, until a check (the first one at the end of
    the schedule) finds the marginal error <= ``threshold``, a non-finite
    error, or a stall (``Monitor.stagnant``). With ``graphs`` (None: every
    step eager), runs of equal eps replay a captured step (GRAPH_MIN_RUN).
    ``ops`` computes the soft-mins and the sums over the points (:class:`LocalOps`).
    The schedule's entries before the last may be 0-d tensors on the points'
    device (without ``graphs`` or refinement: the cached solves of the loss and
    of ``sinkhorn``, whose kernels then read eps from memory); the last is a float.

    ``start > 0`` resumes a loop after ``start`` averaged steps, from the state
    ``(f0, g0)`` (both given, no debiasing): ``sinkhorn`` runs the schedule as
    one cached graph, then the rest from there. ``extrapolate=False`` stops
    after the loop and returns ``(FG, steps)``, the state ``[f | g]`` (B, n + m).
    """
    if start > 0 and (f0 is None or g0 is None or debias):
        raise ValueError("symmetric_loop: a resumed loop (start > 0) takes both f0 and g0 and no debiasing")
    x, y = inp.x, inp.y
    log_a, log_b = inp.log_a, inp.log_b
    n = x.shape[1]
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision)
    # xy: the rows of the state FG that hold (f, g); the others, if any, the stacked debiasing problems.
    B = x.shape[0]
    xy = slice(0, B)
    stacked = debias and f0 is None and g0 is None and extrapolate and _stack_debias(inp, rho_x, rho_y, backend, ops)
    if stacked:
        # (x, y), (x, x), (y, y) as one batch of 3B pair problems: one launch (and one merge) per step
        # for all three. The self problems' states are [f_aa | f_aa] and [g_bb | g_bb], the two
        # halves (the row and column updates of a symmetric problem) equal up to rounding.
        x, y = torch.cat([x, x, y]), torch.cat([y, x, y])
        log_a, log_b = torch.cat([log_a, log_a, log_b]), torch.cat([log_b, log_a, log_b])

    def smins(FG, eps):
        """Damped soft-min updates [T_f(g) | T_g(f)] of FG = [f | g]."""
        S = ops.pair(x, y, FG[:, :n], FG[:, n:], log_a, log_b, eps=eps, **opts).to(inp.pot_dtype)
        # Tested on rho, not on lam != 1: eps may be a 0-d device tensor (never read back).
        if rho_x is not None:
            S[:, :n].mul_(damping(eps, rho_x))
        if rho_y is not None:
            S[:, n:].mul_(damping(eps, rho_y))
        return S

    def averaged(FG, eps):
        """The averaged step ``lerp(FG, smins(FG), 1/2)``; undamped, from the soft-mins' merge kernel."""
        if rho_x is None and rho_y is None:
            return ops.pair(x, y, FG[:, :n], FG[:, n:], log_a, log_b, eps=eps, average=FG, **opts)
        return torch.lerp(FG, smins(FG, eps), 0.5)

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
    selves = SelfBank(x, y, log_a, log_b, eps0, rho_x, rho_y, opts, inp.pot_dtype, ops) \
        if debias and not stacked else None

    total = len(eps_list) + refine

    def eps_at(i):
        return eps_list[min(i, len(eps_list) - 1)]

    def checks(i):
        # A check at step i measures the state after i averaged steps. A refining call also
        # checks at the end of the schedule: converged there, it stops there (threshold=inf
        # runs exactly the schedule, as GeomLoss).
        return i > 0 and (i % monitor.check_every == 0 or (refine > 0 and i == len(eps_list)))

    graphed = graphs is not None and not debias
    # A soft-min ran already (kernels compiled and tuned), here or before a resumed loop.
    warm = f0 is None or g0 is None or start > 0
    replay = None       # the StepGraph of the current run of equal eps
    S = None            # the soft-mins of the current FG, when a check stopped the loop
    i = start
    while i < total:
        eps = eps_at(i)
        if graphed and warm and not checks(i):
            run = next((k for k in range(i, total) if eps_at(k) != eps), total) - i
            if (replay is None or replay.key != eps) and run >= GRAPH_MIN_RUN:
                # The state is FG alone: every other input is fixed for the run.
                replay = StepGraph(graphs, lambda st: (averaged(st[0], eps),), (FG,),
                                   x.device, key=eps)
            if replay is not None and replay.key == eps:
                span = next((k for k in range(i, i + run) if checks(k)), i + run) - i
                (FG,) = replay.run((FG,), span)
                monitor.advance(span)
                i += span
                continue
        warm = True
        if checks(i):
            S = smins(FG, eps)
            err = row_error(FG[xy, :n], S[xy, :n] * reciprocal(damping(eps, rho_x)), inp.a, eps, rho_x, ops)
            refining = refine > 0 and i >= len(eps_list)
            value = monitor.record(i, eps, err, FG[xy, :n], FG[xy, n:], read=refining)
            if refining and (value <= threshold or not math.isfinite(value) or monitor.stagnant(
                    i, value, lambda: resolution(FG[xy, :n], FG[xy, n:], eps, precision, ops))):
                # Stop before this step's averaging: the state whose error was read is the one
                # returned, and its soft-mins S are the final extrapolation.
                break
            # Averaged (Jacobi) updates: plain simultaneous updates oscillate.
            FG = torch.lerp(FG, S, 0.5)
            S = None
        else:
            FG = averaged(FG, eps)
        if selves is not None:
            selves.step(eps)
        monitor.advance()
        i += 1
    del replay
    if not extrapolate:
        return FG, i

    # Final extrapolation: one unaveraged step at the last eps from the
    # pre-last potentials. GeomLoss differentiates only this step.
    eps = eps_list[-1]
    stopped = S is not None
    if not stopped:
        S = smins(FG, eps)
    pre = [FG[xy, :n], FG[xy, n:]]
    pots = [S[xy, :n], S[xy, n:]]
    if stacked:
        # The row halves: f_aa of (x, x), g_bb of (y, y).
        pre += [FG[B:2 * B, :n], FG[2 * B:, :n]]
        pots += [S[B:2 * B, :n], S[2 * B:, :n]]
    if selves is not None:
        pre += selves.potentials()
        pots += selves.smins(eps)
    if not stopped and (monitor.kept or monitor.syncs):     # (a stopping check recorded this very error)
        monitor.record(i, eps, row_error(pre[0], pots[0] / damping(eps, rho_x), inp.a, eps, rho_x, ops),
                       pots[0], pots[1])
    return pots, pre, i


def alternating_loop(inp: Inputs, eps: float, rho_x, rho_y, *, f0, g0, max_iter: int, threshold: float,
                     monitor: Monitor, cost_scale: float, backend, precision, graphs=None, ops: LocalOps = LOCAL):
    """OTT-JAX's alternating loop: g then f, checks every ``check_every`` iterations.

    Returns ``(f, g, n_iter, converged)``; it stops at ``max_iter``, at a
    check whose error is <= ``threshold`` or not finite, or at a stall
    (``Monitor.stagnant``). With ``graphs`` (None: every iteration eager),
    the iterations between two checks replay a captured one. ``ops``: as in :func:`symmetric_loop`.
    """
    x, y = inp.x, inp.y
    log_a, log_b = inp.log_a, inp.log_b
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision)

    def rows(h, eps):          # update of f from the column log-weights h = log b + g / eps
        return ops.rows(x, y, h, eps=eps, **opts).to(inp.pot_dtype)

    def cols(h, eps):          # update of g from h = log a + f / eps
        return ops.cols(x, y, h, eps=eps, **opts).to(inp.pot_dtype)
    lam_x, lam_y = damping(eps, rho_x), damping(eps, rho_y)

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
    graphed = graphs is not None and max_iter >= GRAPH_MIN_RUN
    replay = None
    it = 1
    while it <= max_iter:
        span = next(k for k in range(it, max_iter + 1) if checks(k)) - it
        if graphed and span and n_iter:       # after one eager iteration (compiled, tuned)
            if replay is None:
                def iteration(state):
                    g, s = half_steps(state[0])
                    return damped(lam_x, s), g
                replay = StepGraph(graphs, iteration, (f, g), x.device)
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
            err = row_error(f_prev, s, inp.a, eps, rho_x, ops)
            value = monitor.record(n_iter, eps, err, f, g, read=True)
            monitor.advance_to(n_iter)
            if value <= threshold:
                converged = True
                break
            if not math.isfinite(value):   # diverged (as OTT, stop rather than iterate on NaNs)
                break
            if monitor.stagnant(n_iter, value, lambda: resolution(f, g, eps, precision, ops)):
                break
    return f, g, n_iter, converged

