"""The eps schedule of the Sinkhorn loops: from ``blur``/``eps`` and the data to the list of eps.

- :func:`epsilon_schedule`: GeomLoss' eps-scaling schedule (public, re-exported
  by ``otlinop.sinkhorn`` and ``otlinop``).
- :func:`diameter`: the default first scale, the diagonal of the points' bounding box.
- :func:`resolve_eps`: the final eps and the schedule of one call from its
  ``blur``/``eps``/``scaling``/``diameter`` options, as ``sinkhorn`` and the
  loss (``otlinop.loss``) read them.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from ._checks import (Inputs, backend_name, box_diameter, flag, fraction, function, nonnegative_scalar,
                      positive_int, positive_scalar, precision_name, reach_or_none)

__all__ = ["DEFAULT_BLUR", "DEFAULT_MAX_ITER", "LONG_SCHEDULE", "METHODS", "LoopOptions", "diameter", "diameter_tensor",
           "epsilon_schedule", "loop_options", "resolve_eps", "resolve_reach", "schedule_tensor"]

#: Default blur when neither ``blur`` nor ``eps`` is given (GeomLoss' default).
DEFAULT_BLUR = 0.05

#: A schedule longer than this warns: GeomLoss' scaling=0.5 gives ~10-30 steps and
#: 0.9 ~100-200; thousands come from a scaling such as 0.9999 (50k steps, each a
#: pass over the cost), more likely a slip than a wish.
LONG_SCHEDULE = 2000


def diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    """Diagonal of the joint bounding box of all the points (all batch entries)."""
    return float(diameter_tensor(x, y).item())


def diameter_tensor(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`diameter` as a 0-d float64 tensor on the points' device (nothing read back)."""
    return box_diameter(Inputs(x, y, None, None, True))


def schedule_tensor(eps_list, device) -> torch.Tensor:
    """``eps_list`` but its last entry as a float64 tensor on ``device``, copied without a
    host synchronisation (from pinned memory on CUDA): the steps of a cached CUDA graph
    whose kernels read eps from memory, so that one graph serves every schedule of a length."""
    E = torch.tensor(list(eps_list[:-1]), dtype=torch.float64)
    if device.type == "cuda":
        return E.pin_memory().to(device, non_blocking=True)
    return E.to(device)


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


def resolve_eps(owner: str, method: str, blur, eps, scaling, diam, inp: Inputs):
    """Return (final eps, schedule, blur) for the public function ``owner``.

    ``blur``/``eps``: at most one (default ``blur = DEFAULT_BLUR``);
    ``method="alternating"`` runs at one eps, ``"symmetric"`` on the schedule
    from ``diam`` (default :func:`diameter` of the points) down to ``blur``.
    A schedule of more than ``LONG_SCHEDULE`` steps warns (UserWarning).
    """
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
    if diam is None:
        diam = diameter(inp.x, inp.y)
        if diam <= 0:   # every point at the same place: any positive scale works
            diam = blur
    else:
        diam = positive_scalar(owner, "diameter", diam)
    # The last eps is blur**2 exactly (not the schedule's rounding of it).
    schedule = epsilon_schedule(diam, blur, scaling)
    schedule[-1] = eps
    if len(schedule) > LONG_SCHEDULE:
        usual = len(epsilon_schedule(diam, blur, 0.5))
        warnings.warn(f"{owner}: scaling={scaling} gives an eps schedule of {len(schedule)} steps (diameter "
                      f"{diam:.3g} down to blur {blur:.3g}), one pass over the cost each; scaling=0.5 gives "
                      f"{usual}. Pass a smaller scaling (0.5 to 0.95 is usual), or a diameter closer to blur",
                      UserWarning, stacklevel=3)
    return eps, schedule, blur


# --------------------------------------------------------------------------
# The options of the Sinkhorn loops, checked once for every entry point
# (otlinop.sinkhorn and otlinop.distributed.sinkhorn)
# --------------------------------------------------------------------------
METHODS = ("symmetric", "alternating")

#: Default ``max_iter``: "alternating" iterations in all; "symmetric" steps at the
#: final eps after its schedule.
DEFAULT_MAX_ITER = 2000


def resolve_reach(owner: str, reach, reach_x, reach_y):
    """Return (rho_x, rho_y): ``reach**2`` per side, None for a balanced side."""
    if reach is not None and (reach_x is not None or reach_y is not None):
        raise ValueError(f"{owner}: give either reach (both sides) or reach_x / reach_y (one side each), "
                         f"not both; got reach={reach!r}, reach_x={reach_x!r}, reach_y={reach_y!r}")
    if reach is not None:
        r = reach_or_none(owner, "reach", reach)
        return (None, None) if r is None else (r * r, r * r)
    rx, ry = reach_or_none(owner, "reach_x", reach_x), reach_or_none(owner, "reach_y", reach_y)
    return (None if rx is None else rx * rx), (None if ry is None else ry * ry)


class LoopOptions(NamedTuple):
    """The checked scalar options of a Sinkhorn call (``max_iter`` is None for a
    symmetric call without one: its default depends on the schedule's length)."""
    cost_scale: float
    rho_x: float | None
    rho_y: float | None
    backend: str | None
    precision: str | None
    check_every: int
    threshold: float
    max_iter: int | None


def loop_options(owner: str, *, method, cost_scale, reach, reach_x, reach_y, backend, precision, check_every,
                 threshold, callback, verbose, max_iter) -> LoopOptions:
    """Check the options every Sinkhorn entry point shares; errors name ``owner``."""
    if method not in METHODS:
        raise ValueError(f"{owner}: method must be 'symmetric' (GeomLoss) or 'alternating' (OTT-JAX), "
                         f"got {method!r}")
    cost_scale = positive_scalar(owner, "cost_scale", cost_scale)
    rho_x, rho_y = resolve_reach(owner, reach, reach_x, reach_y)
    backend = backend_name(owner, backend)
    precision = precision_name(owner, precision)
    check_every = positive_int(owner, "check_every", check_every)
    threshold = 1e-3 if threshold is None else nonnegative_scalar(owner, "threshold", threshold, allow_inf=True)
    if callback is not None:
        function(owner, "callback", callback, "callable or None")
    flag(owner, "verbose", verbose)
    if method == "alternating":
        max_iter = DEFAULT_MAX_ITER if max_iter is None else positive_int(owner, "max_iter", max_iter)
    elif max_iter is not None:
        max_iter = positive_int(owner, "max_iter", max_iter)
    return LoopOptions(cost_scale, rho_x, rho_y, backend, precision, check_every, threshold, max_iter)
