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
   at the final potentials.

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
                         default_cluster_scale, truncation_bound)

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
    extrapolation; the pattern; the averaged steps; the errors read; the certificate."""

    f: torch.Tensor
    g: torch.Tensor
    f_pre: torch.Tensor
    g_pre: torch.Tensor
    pattern: Pattern
    n_iter: int
    jump: int
    bound: tuple
    errors: list = field(default_factory=list)


def _extrapolate(points, coarse, coarse_log_w, coarse_pot, eps, opts):
    """One soft-min of the fine ``points`` against the other side's coarse potentials (dense, n x K)."""
    h = coarse_log_w + coarse_pot / eps
    return softmin(points[None], coarse[None], h[None], eps=eps, **opts)[0]


def multiscale_loop(cx: Clustering, cy: Clustering, schedule: list, *, truncate: float, cluster_scale: float,
                    cost_scale: float, backend, precision, pot_dtype, refine: int = 0, threshold: float = math.inf,
                    monitor: Monitor | None = None, check_every: int = 10) -> MultiscaleSolution:
    """GeomLoss' multiscale symmetric loop on the clustered clouds ``cx``, ``cy`` (balanced).

    ``refine``: the most averaged steps at the final eps after the schedule,
    until a check finds the marginal error ``<= threshold`` (the first check at
    the end of the schedule; ``threshold = inf`` runs the schedule alone);
    ``monitor`` records each check (errors of the plan in the caller's order).
    """
    opts = dict(cost_scale=cost_scale, backend=backend, precision=precision)
    jump = jump_index(schedule, cluster_scale)
    # The coarse problem: the dense symmetric loop on centroids and cluster weights
    # (its pre-extrapolation potentials are the averaged state after the last coarse step).
    Xc, Yc = cx.centroid.to(pot_dtype), cy.centroid.to(pot_dtype)
    A, B = cx.weight.to(pot_dtype), cy.weight.to(pot_dtype)
    coarse = Inputs(Xc[None], Yc[None], A[None], B[None], False)
    quiet = Monitor(check_every=1 << 30, callback=None, bar=None, method="symmetric", inp=coarse)
    with torch.no_grad(), config.override(check_finite=False):
        _, pre, _ = symmetric_loop(coarse, schedule[:jump + 1], None, None, debias=False, f0=None, g0=None,
                                   monitor=quiet, **opts)
        F, G = pre[0][0], pre[1][0]
        eps = schedule[jump]
        x, y = cx.points.to(pot_dtype), cy.points.to(pot_dtype)
        log_a, log_b = torch.log(cx.weights.to(pot_dtype)), torch.log(cy.weights.to(pot_dtype))
        f = _extrapolate(x, Yc, torch.log(B), G, eps, opts).to(pot_dtype)
        g = _extrapolate(y, Xc, torch.log(A), F, eps, opts).to(pot_dtype)
        pattern = coarse_pattern(Xc, Yc, F, G, eps=eps, cost_scale=cost_scale, truncate=truncate)
        rows, cols = pattern, pattern.T

        # The points were checked on entry and the layout is built here: the unchecked kernels
        # spare a host synchronisation per update on the Triton path.
        def smins(f, g, eps):
            sf = blocksparse_softmin_unchecked(x, y, log_b + g / eps, cx.starts, cy.starts, rows.ptr, rows.idx,
                                               eps=eps, **opts)
            sg = blocksparse_softmin_unchecked(y, x, log_a + f / eps, cy.starts, cx.starts, cols.ptr, cols.idx,
                                               eps=eps, **opts)
            return sf.to(pot_dtype), sg.to(pot_dtype)

        errors = []
        for e in schedule[jump + 1:]:
            sf, sg = smins(f, g, e)
            f, g = 0.5 * (f + sf), 0.5 * (g + sg)
        steps = len(schedule)
        eps = schedule[-1]
        if math.isfinite(threshold) or refine > 0:
            extra = 0
            while True:
                sf, sg = smins(f, g, eps)
                if extra % check_every == 0:
                    err = row_error(f, sf, cx.weights.to(pot_dtype), eps, None)
                    if monitor is not None:
                        value = monitor.record(steps + extra, eps, err[None], f[cx.inverse][None],
                                               g[cy.inverse][None], read=True)
                    else:
                        value = float(err)
                    errors.append(value)
                    if not value > threshold or extra >= refine:
                        break
                    if monitor is not None and monitor.stagnant(steps + extra, value,
                                                                lambda: resolution(f, g, eps, precision)):
                        break
                f, g = 0.5 * (f + sf), 0.5 * (g + sg)
                extra += 1
                if extra >= refine and extra % check_every != 0:
                    # The budget ends between two checks: read the error of the last state once more.
                    sf, sg = smins(f, g, eps)
                    err = row_error(f, sf, cx.weights.to(pot_dtype), eps, None)
                    value = (monitor.record(steps + extra, eps, err[None], f[cx.inverse][None], g[cy.inverse][None],
                                            read=True) if monitor is not None else float(err))
                    errors.append(value)
                    break
            steps += extra
            f_pre, g_pre = f, g
            f, g = sf, sg
        else:
            f_pre, g_pre = f, g
            f, g = smins(f_pre, g_pre, eps)
        bound = truncation_bound(cx, cy, pattern, f, g, eps=eps, cost_scale=cost_scale)
    return MultiscaleSolution(f=f, g=g, f_pre=f_pre, g_pre=g_pre, pattern=pattern, n_iter=steps, jump=jump,
                              bound=bound, errors=errors)
