"""Marginals of a transport plan, composed from the plan operator and ``Diag``.

``P 1`` and ``P.T 1`` are the plan's marginals (``ah``, ``bh`` in docs/math.md section 1);
their diagonal operators are the diagonal blocks of the dual Hessian, and their
distance to the weights ``a``, ``b`` is Sinkhorn's stopping criterion.

Any ``LinearOperator`` with an adjoint is accepted as a plan (a ``Dense`` one
included); a ``PlanOperator``'s cached ``row_sums()``/``col_sums()`` are reused.
"""

from __future__ import annotations

import torch

from ._base import LinearOperator
from ._checks import Geometry, finite, fmt_shape, vector
from ._operators.concrete import Diag

__all__ = ["plan_marginals", "marginal_error"]


def _check_plan(owner: str, P) -> None:
    if not isinstance(P, LinearOperator):
        raise TypeError(f"{owner}: P must be an otlinop LinearOperator (e.g. a PlanOperator), got "
                        f"{type(P).__name__}; wrap a dense matrix with otlinop.Dense(P)")


def _row_sums(P: LinearOperator) -> torch.Tensor:
    if hasattr(P, "row_sums"):
        return P.row_sums()
    return P @ torch.ones(P.shape[1], dtype=P.dtype, device=P.device)


def _col_sums(P: LinearOperator) -> torch.Tensor:
    if hasattr(P, "col_sums"):
        return P.col_sums()
    return P.T @ torch.ones(P.shape[0], dtype=P.dtype, device=P.device)


def plan_marginals(P: LinearOperator) -> tuple[Diag, Diag]:
    """The marginal operators ``(Diag(P 1), Diag(P.T 1))``.

    Parameters
    ----------
    P : LinearOperator, shape (n, m)
        A plan with an adjoint.

    Returns
    -------
    (Diag, Diag)
        Of shapes (n, n) and (m, m), both PSD for a non-negative plan.

    Raises
    ------
    TypeError
        If P is not a LinearOperator.

    Notes
    -----
    Two plan passes (none when a ``PlanOperator`` has cached them). They are
    the diagonal blocks of ``K = [[Diag(P 1), P], [P.T, Diag(P.T 1)]]``.

    Examples
    --------
    >>> import torch, otlinop
    >>> from otlinop.marginals import plan_marginals
    >>> A, B = plan_marginals(otlinop.Dense(torch.tensor([[0.25, 0.25], [0.0, 0.5]])))
    >>> A.diagonal().tolist(), B.diagonal().tolist()
    ([0.5, 0.5], [0.25, 0.75])
    """
    _check_plan("plan_marginals", P)
    return Diag(_row_sums(P)), Diag(_col_sums(P))


def marginal_error(P: LinearOperator, a: torch.Tensor | None, b: torch.Tensor | None):
    """The L1 marginal violations ``(||P 1 - a||_1, ||P.T 1 - b||_1)``.

    Parameters
    ----------
    P : LinearOperator, shape (n, m)
        A plan with an adjoint.
    a : Tensor, shape (n,), or None
        Target first marginal; None skips that side (and its plan pass).
    b : Tensor, shape (m,), or None
        Target second marginal; None skips that side.

    Returns
    -------
    (Tensor or None, Tensor or None)
        0-d tensors on P's device (None for a skipped side).

    Raises
    ------
    TypeError
        If P is not a LinearOperator, or a, b are not tensors of P's dtype.
    ValueError
        If a, b have the wrong shape or device, or NaN or inf entries (one
        synchronisation, skipped with ``config.check_finite`` off).

    Notes
    -----
    One plan pass per side asked for. Sinkhorn's stopping rule: after an
    update of g the second marginal is exact, so pass ``b=None``.

    Examples
    --------
    >>> import torch, otlinop
    >>> from otlinop.marginals import marginal_error
    >>> P = otlinop.Dense(torch.tensor([[0.25, 0.25], [0.0, 0.5]]))
    >>> [float(e) for e in marginal_error(P, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))]
    [0.0, 0.5]
    """
    _check_plan("marginal_error", P)
    n, m = P.shape
    geo = Geometry("marginal_error", False, 1, n, m, 0, P.dtype, P.device, ref="P")
    for name, t, size, side in (("a", a, n, "rows"), ("b", b, m, "columns")):
        vector(geo, name, t, size, optional=True, what=f"P has shape {fmt_shape(P.shape)}, {size} {side}")
    # A NaN target would make the error NaN, which no threshold test ever passes or fails clearly.
    finite("marginal_error", {"a": a, "b": b}, hint="the target marginals must be finite")
    err_a = None if a is None else (_row_sums(P) - a).abs().sum()
    err_b = None if b is None else (_col_sums(P) - b).abs().sum()
    return err_a, err_b
