"""LSMR (Fong and Saunders) for rectangular and damped least squares."""

from __future__ import annotations

import math
import numbers

import torch

from ._common import (apply, as_output, check_callback, check_every_for, check_maxiter, check_tolerance,
                      safe_div, setup)
from ._operator import adjoint
from ._result import CONVERGED, CONVERGED_LSQ, ILL_CONDITIONED, MAXITER, NONFINITE, RUNNING, finish

__all__ = ["lsmr"]


def _sym_ortho(a: torch.Tensor, b: torch.Tensor):
    """Stable Givens rotation per column: c, s, r with r = hypot(a, b) >= 0 (scipy's convention)."""
    r = torch.hypot(a, b)
    return safe_div(a, r), safe_div(b, r), r


def _lsmr_describe(damp: float, atol: float, btol: float, conlim: float):
    def describe(code: int, info: dict) -> str:
        it, r, bnorm = info["iterations"], info["residual"], info["bnorm"]
        rel = f"||b - A x|| = {r:.1e}" + (f" ({r / bnorm:.1e} relative)" if bnorm > 0 else "")
        if damp:
            rel = rel.replace("||b - A x||", "the damped residual")
        if code == CONVERGED:
            return (f"converged in {it} iterations: A x = b is solved to {rel} "
                    f"(<= btol*||b|| + atol*||A||*||x||, btol={btol:.1e}, atol={atol:.1e})")
        if code == CONVERGED_LSQ:
            return (f"converged in {it} iterations to a least-squares solution: "
                    f"||A^T r|| <= atol*||A||*||r|| (atol={atol:.1e}); {rel}")
        if code == ILL_CONDITIONED:
            return (f"stopped after {it} iterations: the estimate of cond(A) exceeded conlim={conlim:.1e}, "
                    f"with {rel}; add damp > 0 to regularise, or raise conlim")
        if code == MAXITER:
            return (f"maxiter={info['maxiter']} reached with {rel}; try a larger maxiter, damp > 0, or looser "
                    "atol/btol")
        if code == NONFINITE:
            return f"stopped after {it} iterations: NaN or inf appeared; check A and b for non-finite values"
        return f"stopped after {it} iterations with {rel}"  # pragma: no cover

    return describe


@torch.no_grad()
def lsmr(A, b, x0=None, *, damp=0.0, atol=1e-6, btol=1e-6, conlim=1e8, maxiter=None, callback=None,
         check_every=None):
    """Solve ``min ||A x - b||^2 + damp^2 ||x||^2`` for a rectangular ``A`` by LSMR.

    Parameters
    ----------
    A : operator or Tensor, shape (n, m)
        Any shape, real or complex; needs its adjoint: ``A.H``, or ``A.T``
        (conjugated for a complex A; dense tensors and otlinop operators
        with an adjoint have them).
    b : Tensor, number, shape (n,) or (n, k)
        Real or complex, of A's precision. One or k right-hand sides; per
        iteration one ``A @ V`` and one ``A^H @ U`` with k columns. When A
        has one row, a number or a 0-d tensor (scipy's scalar b).
    x0 : Tensor, shape (m,) or (m, k), optional
        Initial guess (default zeros).
    damp : float
        Tikhonov damping (scipy's ``damp``).
    atol, btol : float
        Scipy's stopping tolerances: stop when ``||r|| <= btol ||b|| + atol
        ||A|| ||x||`` (a compatible system) or ``||A^T r|| <= atol ||A||
        ||r||`` (a least-squares solution), with ``r = b - A x`` (the damped
        residual when ``damp > 0``) and LSMR's estimates of the norms.
        ``atol=inf`` or ``btol=inf`` stops at once; a column of b that is
        zero gets x = 0 at once.
    conlim : float
        Stop (not converged) when the estimate of ``cond(A)`` exceeds it;
        0 disables the test.
    maxiter : int, optional
        Iteration limit (default ``min(n, m)``, as scipy).
    callback : callable, optional
        ``callback(xk)`` after each iteration, xk of shape (m,) or (m, k).
    check_every : int, optional
        Host synchronisation period of the all-columns-stopped test (default
        1 on the CPU, 10 on accelerators); see ``cg``.

    Returns
    -------
    SolveResult
        ``x`` of shape (m,) or (m, k); ``residual_norm`` is LSMR's estimate
        of ``||r||``; ``extras`` holds scipy's estimates ``normr``,
        ``normar`` (``||A^H r||``), ``normA``, ``condA`` and ``normx``, each
        of shape () or (k,), taken at each column's last iteration.

    Raises
    ------
    ValueError
        Wrong shapes, non-finite b or x0, maxiter < 1, negative, NaN, None
        or string tolerances, negative damp.
    TypeError
        Wrong types, dtypes of another precision than A's, or an A without
        an adjoint.

    Notes
    -----
    Golub-Kahan bidiagonalisation ``beta u = A v - alpha u``,
    ``alpha v = A^H u - beta v`` (alpha and beta are norms: every scalar
    of the recurrences is real, also for complex A); LSMR is MINRES on the
    normal equations ``(A^H A + damp^2 I) x = A^H b``, so ``||A^H r||`` decreases
    monotonically. The stopping tests are scipy's (istop 1-6): codes 1 and 4
    are reported as converged, 2 and 5 as converged to a least-squares
    solution, 3 and 6 (conlim) as not converged. There is no preconditioner
    argument: to precondition on the right, pass ``A @ P`` and map back
    ``x = P y``.

    Examples
    --------
    >>> import torch
    >>> from solvers import lsmr
    >>> A = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    >>> res = lsmr(A, b, atol=1e-12, btol=1e-12)
    >>> res.converged, [round(v, 8) for v in res.x.tolist()]
    (True, [1.0, 1.0])
    """
    pb = setup("lsmr", A, b, x0, square=False, scalar_b=True)
    for name, value in (("damp", damp), ("conlim", conlim)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ValueError(f"lsmr: {name} must be a non-negative float, got {value!r}")
    damp, conlim = float(damp), float(conlim)
    atol = check_tolerance("lsmr", "atol", atol)
    btol = check_tolerance("lsmr", "btol", btol)
    maxiter = check_maxiter("lsmr", maxiter, min(pb.n_total, pb.m_total))
    check_callback("lsmr", callback)
    every = check_every_for("lsmr", check_every, pb.op.device)
    op, B = pb.op, pb.B
    try:
        AT = adjoint(op)
    except (AttributeError, NotImplementedError) as err:
        raise TypeError(f"lsmr: A must provide its adjoint A.T ({err}); use an operator with _rmatvec, "
                        "or cg/gmres on a square system") from None
    # Golub-Kahan's alpha and beta are norms: every scalar is real, complex system or not.
    k, dtype, device = pb.k, pb.real_dtype, B.device
    ones = torch.ones(k, dtype=dtype, device=device)
    zeros = torch.zeros(k, dtype=dtype, device=device)
    damp_t = torch.full((k,), damp, dtype=dtype, device=device)
    ctol = 1.0 / conlim if conlim > 0 else 0.0

    normb = pb.space_out.norm(B)
    if pb.X0 is None:
        X = torch.zeros((pb.m, k), dtype=pb.dtype, device=device)
        U = B
    else:
        X = pb.X0
        U = B - apply(op, X, pb.vector)
    beta = pb.space_out.norm(U)
    U = U * safe_div(ones, beta)
    V = apply(AT, U, pb.vector)
    alpha = pb.space.norm(V)
    V = V * safe_div(ones, alpha)

    zetabar = alpha * beta
    alphabar = alpha
    rho, rhobar, cbar, sbar = ones, ones, ones, zeros
    Hh = V
    Hbar = torch.zeros_like(X)
    betadd, betad, rhodold, tautildeold, thetatilde, zeta, d = beta, zeros, ones, zeros, zeros, zeros, zeros
    normA2 = alpha * alpha
    maxrbar = zeros
    minrbar = torch.full((k,), torch.finfo(dtype).max, dtype=dtype, device=device)
    normr = beta
    normar = alpha * beta

    normA_out, condA_out = torch.sqrt(normA2), ones
    codes = torch.zeros(k, dtype=torch.int64, device=device)
    # Scipy's istop = 0: A^T r = 0 (x0 already solves the normal equations) or b = 0 (x = 0,
    # setup zeroed x0 there). An infinite atol or btol accepts any x: stop at once too.
    done0 = (normar == 0) | (normb == 0) | (math.isinf(atol) or math.isinf(btol))
    codes = torch.where(done0, CONVERGED, codes)
    codes = torch.where(~torch.isfinite(normar), NONFINITE, codes)
    active = codes == RUNNING
    iters = torch.zeros(k, dtype=torch.int64, device=device)

    if bool(active.any()):
        for it in range(maxiter):
            # Golub-Kahan step: beta u = A v - alpha u, alpha v = A^T u - beta v.
            U = torch.addcmul(apply(op, V, pb.vector), U, alpha, value=-1)
            beta = pb.space_out.norm(U)
            U = U * safe_div(ones, beta)
            moved = beta > 0  # scipy keeps v and alpha when beta vanishes
            Vn = torch.addcmul(apply(AT, U, pb.vector), V, beta, value=-1)
            alpha_n = pb.space.norm(Vn)
            V = torch.where(moved, Vn * safe_div(ones, alpha_n), V)
            alpha = torch.where(moved, alpha_n, alpha)

            chat, shat, alphahat = _sym_ortho(alphabar, damp_t)
            rhoold = rho
            c, s, rho = _sym_ortho(alphahat, beta)
            thetanew = s * alpha
            alphabar = c * alpha
            rhobarold = rhobar
            zetaold = zeta
            thetabar = sbar * rho
            rhotemp = cbar * rho
            cbar, sbar, rhobar = _sym_ortho(cbar * rho, thetanew)
            zeta = cbar * zetabar
            zetabar = -sbar * zetabar

            Hbar = torch.addcmul(Hh, Hbar, -safe_div(thetabar * rho, rhoold * rhobarold))
            # torch.where keeps frozen columns exactly, even if their recurrences degenerate.
            X = torch.where(active, torch.addcmul(X, Hbar, safe_div(zeta, rho * rhobar)), X)
            Hh = torch.addcmul(V, Hh, -safe_div(thetanew, rho))

            # Estimate ||r|| (Fong and Saunders, section 4.3).
            betaacute = chat * betadd
            betacheck = -shat * betadd
            betahat = c * betaacute
            betadd = -s * betaacute
            thetatildeold = thetatilde
            ctildeold, stildeold, rhotildeold = _sym_ortho(rhodold, thetabar)
            thetatilde = stildeold * rhobar
            rhodold = ctildeold * rhobar
            betad = -stildeold * betad + ctildeold * betahat
            tautildeold = safe_div(zetaold - thetatildeold * tautildeold, rhotildeold)
            taud = safe_div(zeta - thetatilde * tautildeold, rhodold)
            d = d + betacheck * betacheck
            normr_n = torch.sqrt(d + (betad - taud) ** 2 + betadd * betadd)

            # Estimate ||A|| and cond(A).
            normA2 = normA2 + beta * beta
            normA = torch.sqrt(normA2)
            normA2 = normA2 + alpha * alpha
            maxrbar = torch.maximum(maxrbar, rhobarold)
            if it > 0:
                minrbar = torch.minimum(minrbar, rhobarold)
            condA = safe_div(torch.maximum(maxrbar, rhotemp), torch.minimum(minrbar, rhotemp))

            normar_n = zetabar.abs()
            normx = pb.space.norm(X)
            normr = torch.where(active, normr_n, normr)
            normar = torch.where(active, normar_n, normar)
            normA_out = torch.where(active, normA, normA_out)
            condA_out = torch.where(active, condA, condA_out)
            iters = iters + active

            test1 = safe_div(normr, normb)
            nAr = normA * normr
            test2 = torch.where(nAr != 0, safe_div(normar, nAr), torch.full_like(nAr, float("inf")))
            test3 = safe_div(ones, condA)
            t1 = safe_div(test1, 1 + safe_div(normA * normx, normb))
            rtol = btol + atol * safe_div(normA * normx, normb)
            # Scipy's order: a later test overrides an earlier one.
            new = torch.zeros_like(codes)
            new = torch.where(1 + test3 <= 1, ILL_CONDITIONED, new)
            new = torch.where(1 + test2 <= 1, CONVERGED_LSQ, new)
            new = torch.where(1 + t1 <= 1, CONVERGED, new)
            new = torch.where(test3 <= ctol, ILL_CONDITIONED, new)
            new = torch.where(test2 <= atol, CONVERGED_LSQ, new)
            new = torch.where(test1 <= rtol, CONVERGED, new)
            new = torch.where(torch.isfinite(normr_n) & torch.isfinite(normar_n), new, NONFINITE)
            codes = torch.where(active, new, codes)
            active = codes == RUNNING
            if callback is not None:
                callback(as_output(X, pb.vector))
            if (it + 1) % every == 0 and not bool(active.any()):
                break

    extras = dict(normr=normr, normar=normar, normA=normA_out, condA=condA_out, normx=pb.space.norm(X))
    return finish(X=X, vector=pb.vector, codes=codes, iters=iters, rnorm=normr,
                  tol=torch.full((k,), float("nan"), dtype=dtype, device=device), bnorm=normb,
                  rtol=btol, atol=atol, maxiter=maxiter, describe=_lsmr_describe(damp, atol, btol, conlim),
                  extras=extras, out_dtype=pb.out_dtype)
