"""``SolveResult`` and the status sentences shared by every solver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["SolveResult"]


@dataclass(frozen=True, eq=False)
class SolveResult:
    """What a solver returns.

    Attributes
    ----------
    x : Tensor, shape (n,) or (n, k)
        The approximate solution, shaped like ``b`` (``(m,)`` or ``(m, k)``
        for ``lsmr``).
    converged : bool
        True when every column of ``b`` met its stopping test.
    n_iter : int
        Iterations taken, the largest over the columns. Iterations of a
        column stop counting once it is frozen, so ``n_iter`` does not depend
        on ``check_every``; the number of operator applications may exceed it
        by up to ``check_every - 1``.
    residual_norm : Tensor, shape () or (k,)
        The residual norm per column as the solver tracks it: ``||b - A x||``
        from the recurrence for ``cg``, ``bicgstab`` and ``gmres`` (the
        latter recomputed explicitly at each restart), the preconditioned
        norm ``sqrt(r^T M r)`` for ``minres`` (plain ``||r||`` without M), and
        LSMR's estimate of ``||b - A x||`` (with ``damp``, of the damped
        residual) for ``lsmr``.
    status : str
        A sentence saying why the solver stopped and, when it failed, what to
        try next.
    column_converged : Tensor of bool, shape () or (k,)
        Per-column convergence flags; ``converged == bool(column_converged.all())``.
    column_iterations : Tensor of int64, shape () or (k,)
        Per-column iteration counts.
    extras : dict
        A method's own estimates, each a tensor of shape () or (k,); empty
        for most methods. ``lsmr`` gives scipy's ``normr`` (``||b - A x||``,
        of the damped residual with ``damp``), ``normar`` (``||A^H r||``),
        ``normA`` (Frobenius norm of A, damped), ``condA`` (condition number
        of A, damped) and ``normx`` (``||x||``), in scipy's order after
        ``itn``.

    Examples
    --------
    >>> import torch
    >>> from solvers import cg
    >>> res = cg(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    >>> res.converged, res.n_iter, res.x.tolist()
    (True, 1, [1.0, 1.0])
    """

    x: torch.Tensor
    converged: bool
    n_iter: int
    residual_norm: torch.Tensor
    status: str
    column_converged: torch.Tensor = field(repr=False)
    column_iterations: torch.Tensor = field(repr=False)
    extras: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (f"SolveResult(x=<{tuple(self.x.shape)} {self.x.dtype}>, converged={self.converged}, "
                f"n_iter={self.n_iter}, status={self.status!r})")


# Per-column stop codes, kept on the device as an int64 tensor during the loop.
RUNNING = 0
CONVERGED = 1           # the residual test passed
CONVERGED_LSQ = 2       # lsmr: a least-squares solution, ||A^T r|| small
MAXITER = 3
INDEFINITE_A = 4        # cg: p^T A p <= 0
INDEFINITE_M = 5        # cg / minres: r^T M r < 0 (or <= 0 for cg)
BREAKDOWN = 6           # bicgstab: rho or omega vanished
NONFINITE = 7           # NaN or inf appeared
ILL_CONDITIONED = 8     # lsmr: cond(A) estimate above conlim
LEAST_SQUARES = 9       # minres: singular A, b outside its range
_CONVERGED_CODES = (CONVERGED, CONVERGED_LSQ)


def residual_phrase(r: float, tol: float, bnorm: float, rtol: float, atol: float, *, ok: bool) -> str:
    """'relative residual 3.0e-03 > rtol=1.0e-05' or its absolute version."""
    cmp = "<=" if ok else ">"
    if bnorm > 0 and rtol * bnorm >= atol:
        return f"relative residual {r / bnorm:.1e} {cmp} rtol={rtol:.1e}"
    return f"residual {r:.1e} {cmp} atol={atol:.1e}"


def default_describe(method: str, hint: str) -> Callable[[int, dict], str]:
    """The sentence for one column with a given stop code (``info`` holds its numbers)."""

    def describe(code: int, info: dict) -> str:
        it, r = info["iterations"], info["residual"]
        phrase = residual_phrase(r, info["tol"], info["bnorm"], info["rtol"], info["atol"],
                                 ok=code in _CONVERGED_CODES)
        if code in _CONVERGED_CODES:
            return f"converged in {it} iterations: {phrase}"
        if code == MAXITER:
            return f"maxiter={info['maxiter']} reached with {phrase}; {hint}"
        if code == INDEFINITE_A:
            return (f"stopped after {it} iterations: A is not positive definite (p^T A p <= 0); use minres "
                    "for a symmetric indefinite A, or gmres if A is not symmetric")
        if code == INDEFINITE_M:
            return (f"stopped after {it} iterations: the preconditioner M is not positive definite "
                    f"(r^T M r <= 0) or A is not symmetric; {method} needs a symmetric A and an SPD M: "
                    "try M=jacobi() on an SPD A, or an even number of neumann terms")
        if code == BREAKDOWN:
            return (f"stopped after {it} iterations: {method} broke down (rho or omega vanished) with {phrase}; "
                    "try gmres")
        if code == NONFINITE:
            return (f"stopped after {it} iterations: NaN or inf appeared; check A, M, b and x0 for non-finite "
                    "values, or overflow in float16/float32")
        if code == LEAST_SQUARES:
            return (f"stopped after {it} iterations: A is singular and b is not in its range; x is a "
                    f"least-squares solution (||A r|| ~ 0) with {phrase}")
        if code == ILL_CONDITIONED:
            return f"stopped after {it} iterations: the problem is too ill-conditioned with {phrase}; {hint}"
        return f"stopped after {it} iterations with {phrase}"  # pragma: no cover

    return describe


def finish(*, X: torch.Tensor, vector: bool, codes: torch.Tensor, iters: torch.Tensor,
           rnorm: torch.Tensor, tol: torch.Tensor, bnorm: torch.Tensor, rtol: float, atol: float,
           maxiter: int, describe: Callable[[int, dict], str], extras: dict | None = None) -> SolveResult:
    """Build the SolveResult after the loop, with a single device-to-host transfer.

    ``X`` (n, k); ``codes`` int64, ``iters`` int64, ``rnorm``/``tol``/``bnorm``
    float, all (k,). Columns still RUNNING are marked MAXITER. ``extras``:
    name -> (k,) tensor, shaped like ``residual_norm`` in the result.
    """
    codes = torch.where(codes == RUNNING, torch.full_like(codes, MAXITER), codes)
    host = torch.stack([codes.double(), iters.double(), rnorm.double(), tol.double(),
                        bnorm.double()]).cpu().tolist()
    k = X.shape[1]
    cols = [dict(code=int(host[0][j]), iterations=int(host[1][j]), residual=host[2][j], tol=host[3][j],
                 bnorm=host[4][j], rtol=rtol, atol=atol, maxiter=maxiter) for j in range(k)]
    ok = [c["code"] in _CONVERGED_CODES for c in cols]
    converged = all(ok)
    n_iter = max((c["iterations"] for c in cols), default=0)
    column_converged = torch.tensor(ok, dtype=torch.bool, device=X.device)
    if vector:
        status = describe(cols[0]["code"], cols[0]) if k == 1 else ""
    elif converged:
        worst = max(range(k), key=lambda j: _ratio(cols[j])) if k else None
        status = (f"all {k} right-hand sides converged within {n_iter} iterations"
                  + (f" (worst, column {worst}: {describe(cols[worst]['code'], cols[worst])})" if k else ""))
    else:
        groups: dict[int, list[int]] = {}
        for j, c in enumerate(cols):
            if not ok[j]:
                groups.setdefault(c["code"], []).append(j)
        parts = []
        for code, js in groups.items():
            worst = max(js, key=lambda j: _ratio(cols[j]))
            shown = ", ".join(str(j) for j in js[:8]) + (", ..." if len(js) > 8 else "")
            parts.append(f"columns [{shown}]: {describe(code, cols[worst])}")
        nfail = sum(1 for o in ok if not o)
        status = f"{nfail} of {k} right-hand sides did not converge; " + " | ".join(parts)
    residual_norm = rnorm.clone()
    extras = {name: value.clone() for name, value in (extras or {}).items()}
    if vector:
        X, residual_norm = X[:, 0], residual_norm[0]
        column_converged, iters = column_converged[0], iters[0]
        extras = {name: value[0] for name, value in extras.items()}
    return SolveResult(x=X, converged=converged, n_iter=n_iter, residual_norm=residual_norm, status=status,
                       column_converged=column_converged, column_iterations=iters.clone(), extras=extras)


def _ratio(col: dict) -> float:
    tol = col["tol"]
    if tol != tol:  # lsmr has no single tolerance: rank by relative residual
        return col["residual"] / col["bnorm"] if col["bnorm"] > 0 else col["residual"]
    return col["residual"] / tol if tol > 0 else float("inf") if col["residual"] > 0 else 0.0
