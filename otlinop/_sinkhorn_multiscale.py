"""The coarse-to-fine (multiscale) Sinkhorn loop of ``sinkhorn(..., multiscale=...)`` and of
``SamplesLoss(backend="multiscale")``.

GeomLoss' ``sinkhorn_multiscale`` schedule, on otlinop's kernels:

1. both clouds are clustered on one grid of cell width ``cluster_scale``
   (``otlinop.multiscale.cluster_grid``);
2. the symmetric loop (``otlinop._sinkhorn_loops.symmetric_loop``, dense) runs
   on the centroids and cluster weights for the eps of the schedule down to
   the last one above ``cluster_scale**2`` (GeomLoss' jump index);
3. the jump: each coarse potential is extrapolated to the points by one
   soft-min against the other side's coarse potentials (dense kernel, n x Ky),
   and the kept cluster pairs are chosen by GeomLoss' ``truncate`` rule at the
   coarse potentials (``coarse_pattern``);
4. the rest of the schedule runs on the points with block-sparse soft-mins
   (averaged updates, as the dense loop), then, with a finite ``threshold``,
   averaged steps at the final eps until the marginal error is below it, then
   the final extrapolation; the certificate ``truncation_bound`` is evaluated
   at the final potentials;
5. with ``prune_tol``, the pattern is recomputed from the jump's after each
   fine step and at each check of the refinement (``prune_pattern``), and the
   solve returns to the jump's pattern when the final certificate exceeds
   that pattern's by more than ``prune_tol``.

Everything here is on permuted points (cluster-contiguous); callers map back
with ``Clustering.inverse``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from solvers import config

from ._checks import Inputs
from ._sinkhorn_loops import Monitor, resolution, row_error, symmetric_loop
from .kernels.blocksparse import blocksparse_softmin_unchecked
from .kernels.softmin import softmin
from .multiscale import (MAX_DIMENSION, Clustering, Multiscale, Pattern, cluster_grid, coarse_pattern,
                         default_cluster_scale, kept_entries, prune_pattern, truncation_bound)

__all__ = ["multiscale_options", "check_dimension", "jump_index", "Clouds", "cluster_clouds", "MultiscaleSolution",
           "multiscale_loop"]


def multiscale_options(owner: str, value) -> Multiscale | None:
    """``sinkhorn``'s ``multiscale`` argument: None/False (dense), True (defaults) or a ``Multiscale``."""
    if value is None or value is False:
        return None
    if value is True:
        return Multiscale()
    if isinstance(value, Multiscale):
        return value
    raise TypeError(f"{owner}: multiscale must be None, True or an otlinop.Multiscale(cluster_scale=..., "
                    f"truncate=...), got {type(value).__name__} {value!r}")


def check_dimension(owner: str, d: int) -> None:
    """Refuse ``d > MAX_DIMENSION`` with the reason."""
    if d > MAX_DIMENSION:
        raise ValueError(f"{owner}: multiscale serves points of dimension d <= {MAX_DIMENSION}, got d = {d}: its grid "
                         f"has about (diameter / cluster_scale)^d cells and a cell 3^d - 1 neighbours, so beyond "
                         f"d = {MAX_DIMENSION} the coarse problem and the kept blocks are no longer small against "
                         "the points (and the plan is not block-sparse); use the dense path (no multiscale)")


def jump_index(schedule: list, cluster_scale: float) -> int:
    """GeomLoss' jump: the index of the last coarse step, the step before the first eps of
    ``schedule[2:]`` below ``cluster_scale**2`` (the last step when none is)."""
    for i, eps in enumerate(schedule[2:]):
        if cluster_scale ** 2 > eps:
            return i + 1
    return len(schedule) - 1


@dataclass
class Clouds:
    """Both clouds clustered on one grid (``cx``, ``cy``) and the cell width."""

    cx: Clustering
    cy: Clustering
    scale: float


def cluster_clouds(owner: str, x, y, a, b, *, options: Multiscale, diameter: float) -> Clouds:
    """Cluster x (n, d) and y (m, d) with weights a, b on one grid (corner: their joint minimum)."""
    d = x.shape[1]
    scale = options.cluster_scale or default_cluster_scale(diameter, d)
    origin = torch.minimum(x.min(0).values, y.min(0).values)
    return Clouds(cluster_grid(owner, x, a, origin=origin, scale=scale),
                  cluster_grid(owner, y, b, origin=origin, scale=scale), scale)


@dataclass
class MultiscaleSolution:
    """Potentials on permuted points: final ``f``, ``g``; ``f_pre``, ``g_pre`` before the final
    extrapolation; the final pattern and the jump's (``base``, the widest); the averaged steps; the
    errors read; the certificate; the plan entries visited by the block-sparse steps (``work``, summed
    over the steps, one soft-min's worth each); whether the re-pruned pattern was given up (``fallback``)."""

    f: torch.Tensor
    g: torch.Tensor
    f_pre: torch.Tensor
    g_pre: torch.Tensor
    pattern: Pattern
    base: Pattern
    n_iter: int
    jump: int
    bound: tuple
    work: int
    fallback: bool = False
    errors: list = field(default_factory=list)


def _extrapolate(points, coarse, coarse_log_w, coarse_pot, eps, opts):
    """One soft-min of the fine ``points`` against the other side's coarse potentials (dense, n x K)."""
    h = coarse_log_w + coarse_pot / eps
    return softmin(points[None], coarse[None], h[None], eps=eps, **opts)[0]


def _rise(new, old, weights):
    """The largest rise ``max_i (new_i - old_i)`` over the points of positive weight, at least 0: a 0-d tensor."""
    rise = torch.where(weights > 0, new - old, torch.zeros_like(new))
    return rise.max().clamp_min(0) if rise.numel() else rise.new_zeros(())


def multiscale_loop(cx: Clustering, cy: Clustering, schedule: list, *, truncate: float, cluster_scale: float,
                    cost_scale: float, backend, precision, pot_dtype, prune_tol: float | None = None,
                    refine: int = 0, threshold: float = math.inf, monitor: Monitor | None = None,
                    check_every: int = 10) -> MultiscaleSolution:
    """GeomLoss' multiscale symmetric loop on the clustered clouds ``cx``, ``cy`` (balanced).

    ``prune_tol``: re-prune the kept pairs after each fine step of the schedule
    (``prune_pattern`` at that step's eps, potentials raised by their last
    change) and fall back to the jump's pattern when the final certificate
    exceeds the jump pattern's by more than ``prune_tol``; None keeps the jump's
    pattern. ``refine``: the most averaged steps at the final eps after the
    schedule, until a check finds the marginal error ``<= threshold`` (the first
    check at the end of the schedule; ``threshold = inf`` runs the schedule
    alone); ``monitor`` records each check (errors of the plan in the caller's order).
    """
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision)
    jump = jump_index(schedule, cluster_scale)
    # The coarse problem: the dense symmetric loop on centroids and cluster weights
    # (its pre-extrapolation potentials are the averaged state after the last coarse step).
    Xc, Yc = cx.centroid.to(pot_dtype), cy.centroid.to(pot_dtype)
    A, B = cx.weight.to(pot_dtype), cy.weight.to(pot_dtype)
    coarse = Inputs(Xc[None], Yc[None], A[None], B[None], False)
    quiet = Monitor(check_every=1 << 30, callback=None, bar=None, method="symmetric", inp=coarse, kept=False)
    with torch.no_grad(), config.override(check_finite=False):
        _, pre, _ = symmetric_loop(coarse, schedule[:jump + 1], None, None, debias=False, f0=None, g0=None,
                                   monitor=quiet, **opts)
        F, G = pre[0][0], pre[1][0]
        eps = schedule[jump]
        x, y = cx.points.to(pot_dtype), cy.points.to(pot_dtype)
        a, b = cx.weights.to(pot_dtype), cy.weights.to(pot_dtype)
        log_a, log_b = torch.log(a), torch.log(b)
        f = _extrapolate(x, Yc, torch.log(B), G, eps, opts).to(pot_dtype)
        g = _extrapolate(y, Xc, torch.log(A), F, eps, opts).to(pot_dtype)
        base = coarse_pattern(Xc, Yc, F, G, eps=eps, cost_scale=cost_scale, truncate=truncate)
        pattern = base
        runs = []          # [pattern, soft-min passes on it]: the work, summed at the end

        # The points were checked on entry and the layout is built here: the unchecked kernels
        # spare a host synchronisation per update on the Triton path.
        def smins(f, g, eps, pattern):
            if runs and runs[-1][0] is pattern:
                runs[-1][1] += 1
            else:
                runs.append([pattern, 1])
            cols = pattern.T
            sf = blocksparse_softmin_unchecked(x, y, log_b + g / eps, cx.starts, cy.starts, pattern.ptr, pattern.idx,
                                               eps=eps, **opts)
            sg = blocksparse_softmin_unchecked(y, x, log_a + f / eps, cy.starts, cx.starts, cols.ptr, cols.idx,
                                               eps=eps, **opts)
            return sf.to(pot_dtype), sg.to(pot_dtype)

        fine = schedule[jump + 1:]
        for e, following in zip(fine, fine[1:] + fine[-1:]):
            sf, sg = smins(f, g, e, pattern)
            f_new, g_new = 0.5 * (f + sf), 0.5 * (g + sg)
            if prune_tol is not None:
                # The pattern serves the next step: bound the masses at its eps (the final eps after the
                # schedule). The averaged (Jacobi) potentials lag behind the eps: allow them to rise again
                # by as much as they just did (the half of the soft-min's step that averaging held back).
                margin = _rise(f_new, f, a) + _rise(g_new, g, b)
                pattern = prune_pattern(cx, cy, base, f_new, g_new, eps=following, cost_scale=cost_scale,
                                        tol=prune_tol, margin=margin)
            f, g = f_new, g_new
        eps = schedule[-1]
        errors = []

        def read_error(f, g, sf, step):
            err = row_error(f, sf, a, eps, None)
            if monitor is None:
                return float(err)
            return monitor.record(step, eps, err[None], f[cx.inverse][None], g[cy.inverse][None], read=True)

        def finish(f, g, pattern, done, prune):
            """From the averaged state (f, g) after ``done`` steps at the final eps: averaged steps until a
            check passes or the budget ends, re-pruning at each check when ``prune``, then the final
            extrapolation; ``(f_pre, g_pre, f, g, done, pattern)``."""
            if not (math.isfinite(threshold) or refine > 0):
                return (f, g, *smins(f, g, eps, pattern), done, pattern)
            check, since = True, (f, g)
            while True:
                sf, sg = smins(f, g, eps, pattern)
                if check or done % check_every == 0:
                    value = read_error(f, g, sf, len(schedule) + done)
                    errors.append(value)
                    if not value > threshold or done >= refine:
                        break
                    if monitor is not None and monitor.stagnant(len(schedule) + done, value,
                                                                lambda: resolution(f, g, eps, precision)):
                        break
                    if prune and done > 0:
                        # The potentials still move at the final eps: re-prune at each check, allowing
                        # for as much rise as since the previous re-pruning.
                        margin = _rise(f, since[0], a) + _rise(g, since[1], b)
                        pattern = prune_pattern(cx, cy, base, f, g, eps=eps, cost_scale=cost_scale, tol=prune_tol,
                                                margin=margin)
                        since = (f, g)
                f, g = 0.5 * (f + sf), 0.5 * (g + sg)
                done += 1
                # The budget ends between two checks: read the error of the last state once more.
                check = done >= refine
            return f, g, sf, sg, done, pattern

        f_pre, g_pre, f, g, extra, pattern = finish(f, g, pattern, 0, prune_tol is not None)
        bound = truncation_bound(cx, cy, pattern, f, g, eps=eps, cost_scale=cost_scale)
        fallback = False
        if pattern is not base:
            # The certificate of the re-pruned pattern may exceed the jump pattern's at the same
            # potentials by prune_tol (what the pruning dropped); beyond that, finish on the jump's.
            widest = truncation_bound(cx, cy, base, f, g, eps=eps, cost_scale=cost_scale)
            if any(not mine <= theirs + prune_tol for mine, theirs in zip(bound, widest)):
                fallback, pattern = True, base
                f_pre, g_pre, f, g, extra, _ = finish(f_pre, g_pre, base, extra, False)
                bound = truncation_bound(cx, cy, base, f, g, eps=eps, cost_scale=cost_scale)
        work = int(sum(kept_entries(cx, cy, p) * k for p, k in runs)) if runs else 0
    return MultiscaleSolution(f=f, g=g, f_pre=f_pre, g_pre=g_pre, pattern=pattern, base=base,
                              n_iter=len(schedule) + extra, jump=jump, bound=bound, work=work,
                              fallback=fallback, errors=errors)
