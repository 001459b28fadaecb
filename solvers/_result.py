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
        residual) for ``lsmr``. The square methods replace it by the true
        ``||b - A x||`` of the returned x (one extra product) where the
        recursion cannot be trusted: for float16/bfloat16 inputs, when it
        fell within a few ulps of ``||b||``, and when a column failed and its
        true residual is 10 times larger (minres with ``M`` excepted: its
        tolerance is on the M-norm).
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
SINGULAR = 10           # finite iterates worse than x = 0: A singular and b inconsistent, or worse
RESOLUTION = 11         # the recursive residual met the tolerance, the true residual does not
# The true residual is recomputed for a converged column whose recursive residual is
# below this many ulps of ||b|| (below that, recursive and true residuals part ways).
_RESOLUTION_ULPS = 2
_DIVERGED = 100
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
            # A tolerance the dtype cannot resolve explains the failure better than any hint.
            if "eps" in info and info["tol"] < _RESOLUTION_ULPS * info["eps"] * info["bnorm"] * 5:
                return (f"maxiter={info['maxiter']} reached with {phrase}; the tolerance is below what "
                        f"{info['dtype']} resolves (eps = {info['eps']:.1e}): use rtol >= "
                        f"{10 * info['eps']:.0e} or solve in a wider dtype")
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
                    "values, or overflow (of A's or M's products, or of squared norms); with finite inputs this is "
                    "a breakdown: the system is "
                    "singular or inconsistent (b not in A's range), or too ill-conditioned. Where x was not "
                    "finite it is returned as 0; for a least-squares solution use lsmr")
        if code == SINGULAR:
            return (f"stopped after {it} iterations: the iterates diverged (true {phrase}, "
                    f"||b|| = {info['bnorm']:.1e}): the system is singular or inconsistent (b not "
                    "in A's range), or too ill-conditioned; for a least-squares solution use lsmr (or minres on a "
                    "symmetric A), or project b onto A's range")
        if code == RESOLUTION:
            eps = info["eps"]
            return (f"stopped after {it} iterations: the recursive residual reached the tolerance but the "
                    f"true {phrase}; the tolerance is below what {info['dtype']} resolves (eps = {eps:.1e}): "
                    f"use rtol >= {10 * eps:.0e} or solve in a wider dtype")
        if code == LEAST_SQUARES:
            return (f"stopped after {it} iterations: A is singular and b is not in its range; x is a "
                    f"least-squares solution (||A r|| ~ 0) with {phrase}")
        if code == ILL_CONDITIONED:
            return f"stopped after {it} iterations: the problem is too ill-conditioned with {phrase}; {hint}"
        return f"stopped after {it} iterations with {phrase}"  # pragma: no cover

    return describe


def verify(X: torch.Tensor, codes: torch.Tensor, rnorm: torch.Tensor, tol: torch.Tensor, bnorm: torch.Tensor,
           residual: Callable[[torch.Tensor], torch.Tensor], out_dtype: torch.dtype):
    """x in ``out_dtype``, and the codes and residuals checked against the true residual.

    ``residual(X)`` is ``||b_j - A x_j||`` per column (one product). It is
    computed, for the x returned, when a column stopped without converging,
    when the solve ran wider than ``out_dtype`` (half inputs), or when a
    converged column's recursive residual is within a few ulps of ``||b||``:
    there the recursion no longer tracks ``b - A x``. A converged column whose
    true residual misses the tolerance becomes RESOLUTION; a failed column
    whose iterates diverged becomes SINGULAR, a non-finite x is replaced by 0
    (NONFINITE). Where the true residual is computed for a converged column,
    or is 10 times the recursive one, it is the residual reported.
    """
    Xo = X.to(out_dtype)
    finite = torch.isfinite(Xo).all(dim=0)
    Xo = torch.where(finite, Xo, torch.zeros((), dtype=out_dtype, device=X.device))
    conv = (codes == CONVERGED) | (codes == CONVERGED_LSQ)
    eps = torch.finfo(out_dtype).eps
    check_conv = conv & ((out_dtype != X.dtype) | (rnorm <= _RESOLUTION_ULPS * eps * bnorm))
    check_fail = ~conv & (codes != RUNNING) | ~finite
    need = check_conv | check_fail
    if not bool(need.any()):
        return Xo, codes, rnorm
    true = residual(Xo.to(X.dtype)).to(rnorm.dtype)
    missed = check_conv & ~(true <= tol)
    # Diverged: far worse than x = 0 (CG's residual may exceed ||b|| on its way, not 100-fold),
    # or the recursion lost track of b - A x while x is still far from a solution.
    diverged = check_fail & ((true > _DIVERGED * bnorm) | ((true > 10 * rnorm) & (true > 1e-2 * bnorm)))
    codes = torch.where(missed, RESOLUTION, codes)
    codes = torch.where(diverged, SINGULAR, codes)
    # A failed column whose tracked residual is NaN or inf broke down (an operator's product
    # overflowed, say), whatever its code; its x is finite, and its true residual is reported.
    lost = check_fail & ~torch.isfinite(rnorm)
    codes = torch.where(~finite | lost | (need & ~torch.isfinite(true)), NONFINITE, codes)
    honest = check_conv | (check_fail & ((true > 10 * rnorm) | ~finite | diverged | lost))
    rnorm = torch.where(honest, true, rnorm)
    return Xo, codes, rnorm


def finish(*, X: torch.Tensor, vector: bool, codes: torch.Tensor, iters: torch.Tensor,
           rnorm: torch.Tensor, tol: torch.Tensor, bnorm: torch.Tensor, rtol: float, atol: float,
           maxiter: int, describe: Callable[[int, dict], str], extras: dict | None = None,
           residual: Callable[[torch.Tensor], torch.Tensor] | None = None,
           out_dtype: torch.dtype | None = None) -> SolveResult:
    """Build the SolveResult after the loop, with a single device-to-host transfer.

    ``X`` (n, k); ``codes`` int64, ``iters`` int64, ``rnorm``/``tol``/``bnorm``
    float, all (k,). Columns still RUNNING are marked MAXITER. ``extras``:
    name -> (k,) tensor, shaped like ``residual_norm`` in the result.
    ``out_dtype``: the dtype of the returned x (default X's). ``residual``:
    ``X -> ||B - A X||`` per column, for :func:`verify`.
    """
    codes = torch.where(codes == RUNNING, torch.full_like(codes, MAXITER), codes)
    # A column stopped without a reason but with a NaN residual broke down: NONFINITE, not MAXITER.
    codes = torch.where((codes == MAXITER) & torch.isnan(rnorm), torch.full_like(codes, NONFINITE), codes)
    out_dtype = X.dtype if out_dtype is None else out_dtype
    if residual is not None:
        X, codes, rnorm = verify(X, codes, rnorm, tol, bnorm, residual, out_dtype)
    else:
        X = X.to(out_dtype)
    host = torch.stack([codes.double(), iters.double(), rnorm.double(), tol.double(),
                        bnorm.double()]).cpu().tolist()
    k = X.shape[1]
    eps = torch.finfo(out_dtype).eps
    cols = [dict(code=int(host[0][j]), iterations=int(host[1][j]), residual=host[2][j], tol=host[3][j],
                 bnorm=host[4][j], rtol=rtol, atol=atol, maxiter=maxiter, dtype=str(out_dtype).replace("torch.", ""),
                 eps=eps) for j in range(k)]
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
