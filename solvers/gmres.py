"""Restarted GMRES with right preconditioning."""

from __future__ import annotations

import numbers

import torch

from ._common import (apply, as_output, bind_preconditioner, check_callback, check_every_for, check_maxiter,
                      check_tolerance, safe_div, setup, tolerance)
from ._result import CONVERGED, NONFINITE, RUNNING, default_describe, finish

__all__ = ["gmres"]


def _givens(a: torch.Tensor, b: torch.Tensor):
    """Vectorised rotation with ``[c s; -conj(s) c] [a; b] = [r; 0]``, b real >= 0.

    Real a: r = hypot(a, b) >= 0, c = a / r, s = b / r. Complex a (LAPACK's
    convention, c real): r = sgn(a) hypot(|a|, b), c = |a| / |r|,
    s = sgn(a) b / |r|. (0, 0) -> c = s = r = 0.
    """
    if not a.is_complex():
        r = torch.hypot(a, b)
        return safe_div(a, r), safe_div(b, r), r
    size = torch.hypot(a.abs(), b)
    phase = torch.where(a == 0, torch.ones_like(a), torch.sgn(a))
    return safe_div(a.abs(), size), phase * safe_div(b, size), phase * size


def _combine(Vb: torch.Tensor, H: torch.Tensor, g: torch.Tensor, used: torch.Tensor, size: int) -> torch.Tensor:
    """``sum_j V_j y_j`` per column, with ``H[:u, :u] y = g[:u]`` for each column's own ``u = used``.

    Vb (size+1, n, k) basis, H (size+1, size, k) rotated Hessenberg, g (size+1, k),
    used (k,) int64. Returns (n, k).
    """
    if size == 0:
        return torch.zeros_like(Vb[0])
    Hs = H[:size, :size].permute(2, 0, 1)  # (k, size, size)
    gs = g[:size].T  # (k, size)
    idx = torch.arange(size, device=used.device)
    live = idx[None, :] < used[:, None]  # (k, size)
    # Unused rows/columns become the identity so one batched triangular solve serves all columns.
    eye = torch.eye(size, dtype=Hs.dtype, device=Hs.device)
    both = live[:, :, None] & live[:, None, :]
    Hs = torch.where(both, Hs, eye)
    diag = Hs.diagonal(dim1=1, dim2=2)
    singular = diag == 0
    # A zero pivot (exact breakdown of a singular system): drop that component, as scipy does.
    Hs = Hs + torch.diag_embed(singular.to(Hs.dtype))
    gs = torch.where(live & ~singular, gs, torch.zeros_like(gs))
    y = torch.linalg.solve_triangular(Hs, gs.unsqueeze(-1), upper=True).squeeze(-1)  # (k, size)
    return torch.einsum("jnk,kj->nk", Vb[:size], y)


@torch.no_grad()
def gmres(A, b, x0=None, *, rtol=1e-5, atol=0.0, restart=20, maxiter=None, M=None, callback=None,
          check_every=None):
    """Solve ``A x = b`` for a general square ``A`` by restarted GMRES(restart).

    Parameters
    ----------
    A : operator or Tensor, shape (n, n)
        Any square operator, real or complex (no adjoint needed).
    b : Tensor, shape (n,) or (n, k)
        Real or complex, of A's precision. One or k right-hand sides; k
        Arnoldi processes run side by side, one ``A @ V`` with V of shape
        (n, k) per iteration.
    x0 : Tensor, shape like b, optional
        Initial guess (default zeros).
    rtol, atol : float
        Column j stops when ``||b_j - A x_j|| <= max(rtol ||b_j||, atol)``:
        the Arnoldi estimate inside a cycle, confirmed by the explicit
        residual at the restart. ``rtol=inf`` or ``atol=inf`` stops at once; a column of b that is
        zero gets x = 0 at once, whatever x0 (scipy's rules).
    restart : int
        Krylov dimension per cycle (default 20, capped at n). Memory:
        ``(restart + 1) n k`` entries.
    maxiter : int, optional
        Limit on the total number of inner iterations (= matvecs, not
        counting one per restart), default ``10 n``. Scipy counts restart
        cycles instead.
    M : operator, Tensor, callable or factory, optional
        A preconditioner approximating ``A^-1``, applied on the right
        (``A M u = b``, ``x = M u``), so the residual tested is the true one.
    callback : callable, optional
        ``callback(xk)`` after each inner iteration; xk is then formed
        explicitly (a small triangular solve and a combination of the basis).
    check_every : int, optional
        Host synchronisation period of the all-columns-stopped test (default
        1 on the CPU, 10 on accelerators); GMRES also tests at each restart.

    Returns
    -------
    SolveResult
        ``residual_norm`` is the explicit ``||b - A x||`` after the last
        restart.

    Raises
    ------
    ValueError
        Non-square A, wrong shapes, non-finite b or x0, maxiter or restart
        < 1, negative, NaN, None or string tolerances.
    TypeError
        Wrong types, or dtypes of another precision than A's.

    Notes
    -----
    Arnoldi with classical Gram-Schmidt applied twice (as stable as the
    modified version, and two batched products instead of a loop), Givens
    rotations on the Hessenberg matrix (complex ones, with a real cosine,
    for complex systems); at each restart ``x += M V_j y_j`` with
    ``min_y ||beta e_1 - H y||``. A pivot that vanishes to rounding (A M
    singular on the Krylov space) drops its direction, as an exact zero
    does, instead of dividing by it.

    Examples
    --------
    >>> import torch
    >>> from solvers import gmres
    >>> A = torch.tensor([[3.0, 2.0, 0.0], [1.0, -1.0, 0.0], [0.0, 5.0, 1.0]], dtype=torch.float64)
    >>> b = torch.tensor([2.0, 4.0, -1.0], dtype=torch.float64)
    >>> res = gmres(A, b, rtol=1e-12)
    >>> res.converged, torch.allclose(A @ res.x, b)
    (True, True)
    """
    pb = setup("gmres", A, b, x0, square=True)
    rtol = check_tolerance("gmres", "rtol", rtol)
    atol = check_tolerance("gmres", "atol", atol)
    if isinstance(restart, bool) or not isinstance(restart, numbers.Integral) or restart < 1:
        raise ValueError(f"gmres: restart must be a positive int, got {restart!r}")
    maxiter = check_maxiter("gmres", maxiter, 10 * pb.n_total)
    check_callback("gmres", callback)
    every = check_every_for("gmres", check_every, pb.op.device)
    Mop = bind_preconditioner("gmres", M, pb.op, pb.vector, spd=False)
    op, B, space = pb.op, pb.B, pb.space
    n, k, dtype, device = pb.n, pb.k, B.dtype, B.device
    m = max(min(int(restart), pb.n_total), 1)
    eps = torch.finfo(dtype).eps

    def apply_M(V):
        return V if Mop is None else apply(Mop, V, pb.vector)

    bnorm, tol = tolerance("gmres", B, rtol, atol, norm=pb.space.norm)
    X = torch.zeros_like(B) if pb.X0 is None else pb.X0
    Rv = B if pb.X0 is None else B - apply(op, X, pb.vector)
    rnorm = space.norm(Rv)
    codes = torch.zeros(k, dtype=torch.int64, device=device)
    codes = torch.where(rnorm <= tol, CONVERGED, codes)
    codes = torch.where(~torch.isfinite(rnorm), NONFINITE, codes)
    active = codes == RUNNING
    iters = torch.zeros(k, dtype=torch.int64, device=device)
    total = 0
    going = bool(active.any())

    while going and total < maxiter:
        Vb = torch.empty((m + 1, n, k), dtype=dtype, device=device)
        Vb[0] = Rv * safe_div(torch.ones_like(rnorm), rnorm)
        beta = rnorm
        H = torch.zeros((m + 1, m, k), dtype=dtype, device=device)
        # Q accumulates the Givens rotations (rows 0..i+1 in use), so rotating a new Hessenberg
        # column is one batched product instead of a Python loop over the previous rotations.
        Q = torch.eye(m + 1, dtype=dtype, device=device).unsqueeze(-1).repeat(1, 1, k)
        used = torch.zeros(k, dtype=torch.int64, device=device)
        size = 0
        for i in range(min(m, maxiter - total)):
            W = apply(op, apply_M(Vb[i]), pb.vector)
            h0 = space.norm(W)
            basis, own = Vb[: i + 1], space.rows
            # The projections are basis^H W (conj() is a no-op on real tensors), summed over the
            # ranks for a sharded A (space.rows: the rows this rank counts).
            h = space.reduce(torch.einsum("jnk,nk->jk", basis[:, own].conj(), W[own]))
            W = W - torch.einsum("jnk,jk->nk", basis, h)
            h2 = space.reduce(torch.einsum("jnk,nk->jk", basis[:, own].conj(), W[own]))
            W = W - torch.einsum("jnk,jk->nk", basis, h2)
            h = h + h2
            hn = space.norm(W)
            # Happy breakdown (scipy's test): the Krylov space is invariant, the estimate is exact.
            hn = torch.where(hn <= eps * h0, torch.zeros_like(hn), hn)
            Vb[i + 1] = W * safe_div(torch.ones_like(hn), hn)
            top = torch.einsum("abk,bk->ak", Q[: i + 1, : i + 1], h)  # previous rotations applied
            c, s, r = _givens(top[i], hn)
            # A vanishing pivot: A M v_i lies (to rounding) in the span of the previous columns,
            # as when A M is singular. Its component is dropped (H[i, i] = 0, see _combine); the
            # rotation that swaps rows i and i+1 keeps Q unitary and the residual estimate true.
            # Solving with the rounding-sized pivot instead would add an O(1) error to x.
            dead = r.abs() <= eps * h0
            c = torch.where(dead, torch.zeros_like(c), c)
            s = torch.where(dead, torch.ones_like(s), s)
            r = torch.where(dead, torch.zeros_like(r), r)
            H[:i, i] = top[:i]
            H[i, i] = r
            qi, qn = Q[i, : i + 2].clone(), Q[i + 1, : i + 2].clone()
            Q[i, : i + 2] = torch.where(active, c * qi + s * qn, qi)
            Q[i + 1, : i + 2] = torch.where(active, c * qn - s.conj() * qi, qn)
            used = used + active
            iters = iters + active
            rnorm = torch.where(active, (beta * Q[i + 1, 0]).abs(), rnorm)
            codes = torch.where(active & (rnorm <= tol), CONVERGED, codes)
            codes = torch.where(active & ~torch.isfinite(rnorm), NONFINITE, codes)
            active = codes == RUNNING
            total += 1
            size = i + 1
            if callback is not None:
                callback(as_output(X + apply_M(_combine(Vb, H, beta * Q[:, 0], used, size)), pb.vector))
            if (total % every == 0 and not bool(active.any())) or total >= maxiter:
                break
        X = X + apply_M(_combine(Vb, H, beta * Q[:, 0], used, size))
        # Restart from the explicit residual: it also confirms the Arnoldi estimate.
        Rv = B - apply(op, X, pb.vector)
        true_rnorm = space.norm(Rv)
        cycled = used > 0
        rnorm = torch.where(cycled, true_rnorm, rnorm)
        ok = rnorm <= tol
        codes = torch.where(cycled & (codes == CONVERGED) & ~ok, RUNNING, codes)
        codes = torch.where(cycled & ~torch.isfinite(true_rnorm), NONFINITE, codes)
        codes = torch.where(cycled & (codes == RUNNING) & ok, CONVERGED, codes)
        active = codes == RUNNING
        going = bool(active.any())

    hint = f"try a larger restart (now {m}), M=jacobi() or M=neumann(3), or a larger maxiter"
    return finish(X=X, vector=pb.vector, codes=codes, iters=iters, rnorm=rnorm, tol=tol, bnorm=bnorm,
                  rtol=rtol, atol=atol, maxiter=maxiter, describe=default_describe("gmres", hint),
                  residual=lambda X: space.norm(B - apply(op, X, pb.vector)), out_dtype=pb.out_dtype)
