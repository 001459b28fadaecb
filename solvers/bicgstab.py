"""BiCGSTAB (van der Vorst) for general square systems."""

from __future__ import annotations

import torch

from ._common import (apply, as_output, bind_preconditioner, check_callback, check_every_for, check_maxiter,
                      check_tolerance, setup, tolerance)
from ._result import BREAKDOWN, CONVERGED, NONFINITE, RUNNING, default_describe, finish

__all__ = ["bicgstab"]


@torch.no_grad()
def bicgstab(A, b, x0=None, *, rtol=1e-5, atol=0.0, maxiter=None, M=None, callback=None, check_every=None):
    """Solve ``A x = b`` for a general square ``A`` by (right-preconditioned) BiCGSTAB.

    Parameters
    ----------
    A : operator or Tensor, shape (n, n)
        Any square operator, real or complex; no adjoint needed.
    b : Tensor, shape (n,) or (n, k)
        Real or complex, of A's precision. One or k right-hand sides,
        advanced together: two ``A @ V`` products with V of shape (n, k) per
        iteration.
    x0 : Tensor, shape like b, optional
        Initial guess (default zeros).
    rtol, atol : float
        Column j stops when ``||r_j|| <= max(rtol ||b_j||, atol)``, tested
        after each half step, as scipy. ``rtol=inf`` or ``atol=inf`` stops at once; a column of b that is
        zero gets x = 0 at once, whatever x0 (scipy's rules).
    maxiter : int, optional
        Iteration limit (default ``10 n``); an iteration costs two matvecs.
    M : operator, Tensor, callable or factory, optional
        A preconditioner approximating ``A^-1``.
    callback : callable, optional
        ``callback(xk)`` after each iteration.
    check_every : int, optional
        Host synchronisation period of the all-columns-stopped test (default
        1 on the CPU, 10 on accelerators); see ``cg``.

    Returns
    -------
    SolveResult
        ``n_iter`` counts iterations begun, including one that converged at
        its half step (scipy's callback misses that last one).

    Raises
    ------
    ValueError
        Non-square A, wrong shapes, non-finite b or x0, maxiter < 1, negative,
        NaN, None or string tolerances.
    TypeError
        Wrong types, or dtypes of another precision than A's.

    Notes
    -----
    With shadow residual ``r~ = r_0`` (``^T`` reads ``^H`` for complex
    systems, whose scalars are complex): ``rho = r~^T r``,
    ``p = r + (rho/rho_old)(alpha/omega)(p - omega v)``, ``v = A M p``,
    ``alpha = rho / r~^T v``, ``s = r - alpha v``, ``t = A M s``,
    ``omega = t^T s / t^T t``, ``x += alpha M p + omega M s``,
    ``r = s - omega t``. A column whose ``rho``, ``r~^T v`` or ``omega``
    vanishes stops with a breakdown status (try ``gmres``).

    Examples
    --------
    >>> import torch
    >>> from solvers import bicgstab
    >>> A = torch.tensor([[4.0, 1.0], [-2.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    >>> res = bicgstab(A, b, rtol=1e-12)
    >>> res.converged, torch.allclose(A @ res.x, b)
    (True, True)
    """
    pb = setup("bicgstab", A, b, x0, square=True)
    rtol = check_tolerance("bicgstab", "rtol", rtol)
    atol = check_tolerance("bicgstab", "atol", atol)
    maxiter = check_maxiter("bicgstab", maxiter, 10 * pb.n_total)
    check_callback("bicgstab", callback)
    every = check_every_for("bicgstab", check_every, pb.op.device)
    Mop = bind_preconditioner("bicgstab", M, pb.op, pb.vector, spd=False)
    op, B = pb.op, pb.B
    # rho, alpha and omega are complex for a complex system (non-Hermitian A): col_dot conjugates.
    k, dtype, device = pb.k, B.dtype, B.device
    tiny = torch.finfo(dtype).eps ** 2

    def apply_M(V):
        return V if Mop is None else apply(Mop, V, pb.vector)

    bnorm, tol = tolerance("bicgstab", B, rtol, atol, norm=pb.space.norm)
    X = torch.zeros_like(B) if pb.X0 is None else pb.X0
    R = B if pb.X0 is None else B - apply(op, X, pb.vector)
    Rt = R
    rtnorm = pb.space.norm(Rt)
    rnorm = pb.space.norm(R)
    codes = torch.zeros(k, dtype=torch.int64, device=device)
    codes = torch.where(rnorm <= tol, CONVERGED, codes)
    codes = torch.where(~torch.isfinite(rnorm), NONFINITE, codes)
    active = codes == RUNNING
    iters = torch.zeros(k, dtype=torch.int64, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    ones = torch.ones(k, dtype=dtype, device=device)
    rho_prev, alpha, omega = ones, ones, ones
    P = torch.zeros_like(B)
    V = torch.zeros_like(B)

    if bool(active.any()):
        for it in range(maxiter):
            rho = pb.space.dot(Rt, R)
            # Scipy tests |rho| < eps^2 in absolute terms; scaling by the norms makes it unit-free.
            dead = (rho.abs() <= tiny * rtnorm * rnorm) | (omega == 0)
            codes = torch.where(active & dead, BREAKDOWN, codes)
            active = codes == RUNNING
            if it == 0:
                P = R
            else:
                beta = torch.where(active, (rho / rho_prev) * (alpha / omega), zero)
                P = R + beta * torch.addcmul(P, V, omega, value=-1)
            Phat = apply_M(P)
            V = apply(op, Phat, pb.vector)
            rv = pb.space.dot(Rt, V)
            codes = torch.where(active & (rv == 0), BREAKDOWN, codes)
            active = codes == RUNNING
            alpha = torch.where(active, rho / torch.where(active, rv, 1), zero)
            S = torch.addcmul(R, V, alpha, value=-1)
            X = torch.addcmul(X, Phat, alpha)
            half = active & (pb.space.norm(S) <= tol)
            Shat = apply_M(S)
            T = apply(op, Shat, pb.vector)
            tt = pb.space.dot(T, T).real
            full = active & ~half & (tt > 0)
            omega = torch.where(full, pb.space.dot(T, S) / torch.where(full, tt, 1), zero)
            X = torch.addcmul(X, Shat, omega)
            R = torch.addcmul(S, T, omega, value=-1)
            rho_prev = torch.where(active, rho, rho_prev)
            iters = iters + active
            rnorm = pb.space.norm(R)
            codes = torch.where(active & (rnorm <= tol), CONVERGED, codes)
            codes = torch.where(active & ~(torch.isfinite(rnorm) & torch.isfinite(rho)), NONFINITE, codes)
            active = codes == RUNNING
            if callback is not None:
                callback(as_output(X, pb.vector))
            if (it + 1) % every == 0 and not bool(active.any()):
                break

    return finish(X=X, vector=pb.vector, codes=codes, iters=iters, rnorm=rnorm, tol=tol, bnorm=bnorm,
                  rtol=rtol, atol=atol, maxiter=maxiter,
                  describe=default_describe("bicgstab", "try gmres, a preconditioner M=jacobi() or "
                                               "M=neumann(3), or a larger maxiter"),
                  residual=lambda X: pb.space.norm(B - apply(op, X, pb.vector)), out_dtype=pb.out_dtype)
