"""MINRES for symmetric (possibly indefinite) systems, after Paige and Saunders."""

from __future__ import annotations

import numbers

import torch

from ._common import (apply, as_output, bind_preconditioner, check_callback, check_every_for, check_maxiter,
                      check_tolerance, safe_div, setup, stop_tolerance)
from ._result import CONVERGED, INDEFINITE_M, LEAST_SQUARES, NONFINITE, RUNNING, default_describe, finish

__all__ = ["minres"]


@torch.no_grad()
def minres(A, b, x0=None, *, shift=0.0, rtol=1e-5, atol=0.0, maxiter=None, M=None, callback=None,
           check_every=None):
    """Solve ``(A - shift I) x = b`` for a symmetric (Hermitian), possibly indefinite ``A`` by MINRES.

    Parameters
    ----------
    A : operator or Tensor, shape (n, n)
        Symmetric, or Hermitian when complex (indefinite and singular are
        fine). Anything ``as_operator`` accepts.
    b : Tensor, shape (n,) or (n, k)
        Real or complex, of A's precision. One or k right-hand sides; the k
        Lanczos recurrences run side by side, one ``A @ V`` with V of shape
        (n, k) per iteration.
    x0 : Tensor, shape like b, optional
        Initial guess (default zeros).
    shift : float
        Solve with ``A - shift I`` (scipy's convention).
    rtol, atol : float
        Column j stops when ``||r_j|| <= max(rtol * ||b_j||, atol)``. With a
        preconditioner both norms are M-norms, ``||r||_M = sqrt(r^T M r)``, as
        in scipy; ``||r||`` is MINRES' own estimate, exact in exact arithmetic.
        ``rtol=inf`` or ``atol=inf`` stops at once; a column of b that is
        zero gets x = 0 at once, whatever x0 (scipy's rules).
    maxiter : int, optional
        Iteration limit (default ``5 n``, as scipy).
    M : operator, Tensor, callable or factory, optional
        A symmetric positive definite preconditioner (``jacobi()`` on a
        matrix with a positive diagonal, ``neumann(k)``, ...).
    callback : callable, optional
        ``callback(xk)`` after each iteration (forces a host sync if it reads xk).
    check_every : int, optional
        Host synchronisation period of the all-columns-stopped test (default
        1 on the CPU, 10 on accelerators); see ``cg``.

    Returns
    -------
    SolveResult
        ``residual_norm`` is the (M-norm) residual estimate per column.

    Raises
    ------
    ValueError
        Non-square A, wrong shapes, non-finite b or x0, maxiter < 1, negative,
        NaN, None or string tolerances, or a package preconditioner known to
        be indefinite.
    TypeError
        Wrong types, or dtypes of another precision than A's.

    Notes
    -----
    Lanczos on ``M^(1/2) (A - shift I) M^(1/2)`` (real coefficients
    ``alpha = v^H A v``, ``beta^2 = r^H M r`` for a Hermitian A) with a QR factorisation of the
    tridiagonal matrix updated by Givens rotations; ``x_k`` minimises
    ``||b - (A - shift I) x||_M`` over the Krylov space. A column also stops
    (not converged) when ``r^T M r < 0`` (M indefinite or A not symmetric) or
    when ``||A r|| / (||A|| ||r||)`` reaches machine precision or a pivot of
    the QR factorisation vanishes (singular A and b outside its range: x is
    then a least-squares solution, and the step that would divide by the
    vanishing pivot is skipped).

    Examples
    --------
    >>> import torch
    >>> from solvers import minres
    >>> A = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    >>> res = minres(A, torch.ones(3, dtype=torch.float64), rtol=1e-12)
    >>> res.converged, [round(v, 6) for v in res.x.tolist()]
    (True, [0.5, -1.0, 0.333333])
    """
    pb = setup("minres", A, b, x0, square=True)
    rtol = check_tolerance("minres", "rtol", rtol)
    atol = check_tolerance("minres", "atol", atol)
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real):
        raise TypeError(f"minres: shift must be a real number, got {type(shift).__name__}")
    shift = float(shift)
    maxiter = check_maxiter("minres", maxiter, 5 * pb.n_total)
    check_callback("minres", callback)
    every = check_every_for("minres", check_every, pb.op.device)
    Mop = bind_preconditioner("minres", M, pb.op, pb.vector, spd=True)
    op, B = pb.op, pb.B
    # Lanczos on a Hermitian A: every scalar of the recurrence is real, complex or not.
    dtype, device, k = pb.real_dtype, B.device, pb.k
    eps = torch.finfo(dtype).eps

    def apply_M(V):
        return V if Mop is None else apply(Mop, V, pb.vector)

    def apply_A(V):
        AV = apply(op, V, pb.vector)
        return AV - shift * V if shift != 0.0 else AV

    if pb.X0 is None:
        X = torch.zeros_like(B)
        R1 = B
    else:
        X = pb.X0
        R1 = B - apply_A(X)
    Y = apply_M(R1)
    beta1sq = pb.space.dot_real(R1, Y)
    if pb.X0 is None:
        bnormsq = beta1sq
    else:
        bnormsq = pb.space.dot_real(B, apply_M(B)) if Mop is not None else pb.space.dot_real(B, B)
    bnorm = torch.sqrt(torch.clamp(bnormsq, min=0))
    tol = stop_tolerance(bnorm, rtol, atol)
    beta1 = torch.sqrt(torch.clamp(beta1sq, min=0))

    codes = torch.zeros(k, dtype=torch.int64, device=device)
    codes = torch.where(beta1sq < 0, INDEFINITE_M, codes)
    codes = torch.where((codes == RUNNING) & (beta1 <= tol), CONVERGED, codes)
    codes = torch.where(~torch.isfinite(beta1sq) | ~torch.isfinite(bnormsq), NONFINITE, codes)
    active = codes == RUNNING
    iters = torch.zeros(k, dtype=torch.int64, device=device)

    zeros_k = torch.zeros(k, dtype=dtype, device=device)
    oldb = zeros_k
    beta = beta1
    dbar = zeros_k
    epsln = zeros_k
    phibar = beta1
    tnorm2 = zeros_k
    cs = torch.full_like(zeros_k, -1.0)
    sn = zeros_k
    W = torch.zeros_like(B)
    W2 = torch.zeros_like(B)
    R2 = R1

    if bool(active.any()):
        for it in range(maxiter):
            V = Y * safe_div(torch.ones_like(beta), beta)
            Yn = apply_A(V)
            if it > 0:
                Yn = torch.addcmul(Yn, R1, safe_div(beta, oldb), value=-1)
            alfa = pb.space.dot_real(V, Yn)
            Yn = torch.addcmul(Yn, R2, safe_div(alfa, beta), value=-1)
            R1, R2 = R2, Yn
            Y = apply_M(R2)
            oldb = beta
            beta2 = pb.space.dot_real(R2, Y)
            beta = torch.sqrt(torch.clamp(beta2, min=0))
            tnorm2 = tnorm2 + alfa * alfa + oldb * oldb + beta * beta

            # Apply the previous rotation, then build the next one (Paige-Saunders).
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            root = torch.hypot(gbar, dbar)
            gamma = torch.hypot(gbar, beta)
            Anorm = torch.sqrt(tnorm2)
            # A vanishing pivot means the Krylov space holds a null vector of A - shift I: the next
            # step would divide by ~0 (scipy's x blows up there). Keep x, a least-squares solution.
            singular = active & (gamma <= eps * Anorm)
            step = active & ~singular
            gamma = torch.clamp(gamma, min=eps)
            cs = gbar / gamma
            sn = beta / gamma
            phi = cs * phibar

            W1, W2 = W2, W
            W = (V - oldeps * W1 - delta * W2) / gamma
            # torch.where, not phi * W with phi = 0: W of a frozen column may overflow to inf.
            X = torch.where(step, torch.addcmul(X, W, phi), X)
            phibar = torch.where(step, sn * phibar, phibar)
            iters = iters + active

            test2 = safe_div(root, Anorm)
            codes = torch.where(active & (beta2 < 0), INDEFINITE_M, codes)
            codes = torch.where((codes == RUNNING) & singular, LEAST_SQUARES, codes)
            running = codes == RUNNING
            codes = torch.where(running & (phibar <= tol), CONVERGED, codes)
            running = codes == RUNNING
            # Scipy's "1 + test2 <= 1": ||A r|| / (||A|| ||r||) at machine precision.
            codes = torch.where(running & (1 + test2 <= 1), LEAST_SQUARES, codes)
            codes = torch.where(active & ~(torch.isfinite(phibar) & torch.isfinite(alfa) & torch.isfinite(beta2)),
                                NONFINITE, codes)
            active = codes == RUNNING
            if callback is not None:
                callback(as_output(X, pb.vector))
            if (it + 1) % every == 0 and not bool(active.any()):
                break

    return finish(X=X, vector=pb.vector, codes=codes, iters=iters, rnorm=phibar, tol=tol, bnorm=bnorm,
                  rtol=rtol, atol=atol, maxiter=maxiter,
                  describe=default_describe("minres", "try M=jacobi() or M=neumann(3), or a larger maxiter"),
                  # With M, the tolerance is on the M-norm: the 2-norm residual is no check of it.
                  residual=None if Mop is not None else lambda X: pb.space.norm(B - apply_A(X)),
                  out_dtype=pb.out_dtype)
