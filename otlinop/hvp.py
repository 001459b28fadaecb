r"""Hessian-vector products of the entropic OT loss by implicit differentiation.

The loss is ``L(x, y) = max_{f, g} Dual(f, g; x, y)`` (squared Euclidean
cost ``C_ij = c |x_i - y_j|^2``, ``c2 = 2c``); its gradient is
``grad_x = c2 sum_j P_ij (x_i - y_j)`` and ``grad_y = -c2 sum_i P_ij (x_i - y_j)``.
Differentiating the gradient along a direction ``(A, B)`` of ``(x, y)``:

1. the cost moves by ``s_ij = c2 <x_i - y_j, A_i - B_j>``;
2. the potentials move by ``(df, dg) = K^+ [(P∘s) 1; (P∘s).T 1]``, where ``K`` is
   the dual Hessian of ``otlinop.hessian`` (one Schur-complement solve);
3. the plan moves by ``dP_ij = P_ij (df_i + dg_j - s_ij) / eps``;
4. so, with ``G_ij = c2 [P_ij (A_i - B_j) + dP_ij (x_i - y_j)]``,

       H [A; B] = [sum_j G_ij ; -sum_i G_ij].

This is docs/math.md section 6's ``H = E + R^T K^+ R / eps`` over the joint variables (the
``P (A - B)`` and ``-s`` terms are ``E``, the ``df, dg`` terms ``R^T K^+ R``),
for balanced and unbalanced problems alike (only ``kx``, ``ky`` in ``K``
change). Every sum over ``j`` is a streaming plan pass: ``P @ [y | B | <y, B>]``
and ``P.T @ [x | A | <x, A>]`` before the solve, ``P @ [dg' | y dg']`` and one
``P.bilinear`` after it (and the same on ``P.T`` for the y part).

The potentials must be converged (``P 1`` and ``P.T 1`` satisfy the optimality
conditions); the functions take them as given.
"""

from __future__ import annotations

import torch

from solvers import cg

from ._base import LinearOperator
from ._checks import (finite, fraction, matrix, nonnegative_scalar, points, positive_int, positive_scalar,
                      preconditioner, solver_function, vector)
from ._operators.plan_product import transport_gradient_for
from .hessian import DualHessianOperator, hessian_options
from .plan import plan_operator_for

__all__ = ["hvp", "hvp_x", "hvp_y", "hvp_self", "grad_x", "grad_y", "loss_hessian_operator",
           "LossHessianOperator"]

# Inner-solve tolerances that the float64 tests and the float32 benchmark need
# (the CG residual, relative to the right-hand side, of the Schur system).
_DEFAULT_RTOL = {torch.float64: 1e-11}
_DEFAULT_RTOL_LOW = 1e-5


def _rowdot(U, V):
    return (U * V).sum(-1)


class _Side:
    """One side of the HVP: the x side on ``P`` or, with every role swapped, the
    y side on ``P.T``. Holds the points and directions of both sides and one
    streaming pass of the plan, ``P @ [y | B | <y, B>]`` (parts not needed are skipped),
    and ``r = (P∘s) 1``, the right-hand side of the dual solve on this side."""

    def __init__(self, P, x, y, A, B, *, c2, need_Py):
        self.P, self.x, self.y, self.A, self.B, self.c2 = P, x, y, A, B, c2
        self.u = None if A is None else _rowdot(x, A)
        self.w = None if B is None else _rowdot(y, B)
        self.ah = P.row_sums()
        d = y.shape[1]
        cols = ([y] if need_Py else []) + ([] if B is None else [B, self.w[:, None]])
        out = P @ torch.cat(cols, dim=1) if cols else None
        self.Py = out[:, :d] if need_Py else None
        k = d if need_Py else 0
        self.PB, self.Pw = (None, None) if B is None else (out[:, k:k + d], out[:, k + d])
        # (P∘s) 1 with s_ij = c2 <x_i - y_j, A_i - B_j>, shape (n,).
        r = torch.zeros_like(self.ah)
        if A is not None:
            r = r + self.ah * self.u - _rowdot(A, self.Py)
        if B is not None:
            r = r + self.Pw - _rowdot(x, self.PB)
        self.r = c2 * r

    def gradient_derivative(self, df, dg, *, eps):
        """``sum_j G_ij`` (module docstring) from this side's potential derivative
        ``df`` and the other side's ``dg``: shape (n, d)."""
        P, x, y, A, B, ah, c2, r = self.P, self.x, self.y, self.A, self.B, self.ah, self.c2, self.r
        # s_ij = c2 (u_i - <y_j, A_i> - <x_i, B_j> + w_j): sum_j dP_ij (x_i - y_j) needs
        # P dg and P (y dg) (with the w_j part folded into dg), and one bilinear pass
        # for sum_j P_ij (<A_i, y_j> + <x_i, B_j>) y_j.
        dg_w = dg if B is None else dg - c2 * self.w
        df_u = df if A is None else df - c2 * self.u
        out = P @ torch.cat([dg_w[:, None], y * dg_w[:, None]], dim=1)
        P_dg = out[:, 0] if B is None else out[:, 0] + c2 * self.Pw
        W = torch.cat([t for t in (A, None if B is None else x) if t is not None], dim=1)
        V = torch.cat([t for t in (None if A is None else y, B) if t is not None], dim=1)
        replan = (x * (ah * df + P_dg - r)[:, None] - self.Py * df_u[:, None] - out[:, 1:]
                  - c2 * P.bilinear(W, V, y))
        transport = torch.zeros_like(x)
        if A is not None:
            transport = transport + ah[:, None] * A
        if B is not None:
            transport = transport - self.PB
        return c2 * (transport + replan / eps)


def _hvp(K, x, y, A, B, *, cost_scale, solve, sides):
    """``(H_x [A; B], H_y [A; B], SolveResult)`` for the dual Hessian K of the
    problem (its plan ``K.P``); ``sides`` in {"x", "y", "xy"} picks the parts computed."""
    c2 = 2.0 * cost_scale
    X = _Side(K.P, x, y, A, B, c2=c2, need_Py=A is not None or "x" in sides)
    Y = _Side(K.P.T, y, x, B, A, c2=c2, need_Py=B is not None or "y" in sides)
    dphi, result = K.solve(torch.cat([X.r, Y.r]), **solve)
    df, dg = dphi[:x.shape[0]], dphi[x.shape[0]:]
    dx = X.gradient_derivative(df, dg, eps=K.eps) if "x" in sides else None
    dy = Y.gradient_derivative(dg, df, eps=K.eps) if "y" in sides else None
    return dx, dy, result


# ------------------------------------------------------------------ validation
def _solve_options(owner, dtype, solver, M, rtol, atol, maxiter):
    solver_function(owner, "solver", solver)
    preconditioner(owner, "M", M)
    rtol = _DEFAULT_RTOL.get(dtype, _DEFAULT_RTOL_LOW) if rtol is None else nonnegative_scalar(owner, "rtol", rtol)
    atol = nonnegative_scalar(owner, "atol", atol)
    maxiter = None if maxiter is None else positive_int(owner, "maxiter", maxiter)
    return dict(solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter)


def _checked_dual(owner, x, y, f, g, A, B, *, eps, a, b, cost_scale, reach_x, reach_y, solver, M, rtol, atol,
                  maxiter, ridge, backend, precision, truncate, need=(), reach_names=("reach_x", "reach_y")):
    """Check the arguments of an HVP for the public function ``owner`` (the
    cheap checks first, then the plan's values in one synchronisation);
    return ``(K, A, B, cost_scale, solve options)`` with the dual Hessian K.

    A direction named in ``need`` is required; the others may be None (zero).
    """
    geo = points(owner, x, y, batch="none")
    vector(geo, "f", f, geo.n, what="one potential per point of x")
    vector(geo, "g", g, geo.m, what="one potential per point of y")
    if A is not None or "A" in need:
        A = matrix(geo, "A", A, geo.n, geo.d, what="a direction for x")
    if B is not None or "B" in need:
        B = matrix(geo, "B", B, geo.m, geo.d, what="a direction for y")
    eps, _, _, _ = hessian_options(owner, eps, reach_x, reach_y, ridge, reach_names=reach_names)
    cost_scale = positive_scalar(owner, "cost_scale", cost_scale)
    solve = _solve_options(owner, x.dtype, solver, M, rtol, atol, maxiter)
    if truncate is not None:
        truncate = fraction(owner, "truncate", truncate)
    P = plan_operator_for(owner, x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale, backend=backend,
                          precision=precision)
    # The directions enter the plan kernels, which would name themselves ("plan_apply: V ...").
    finite(owner, {"A": A, "B": B}, hint="the directions must be finite")
    if truncate is not None:
        P = P.truncated(truncate)
    K = DualHessianOperator(P, eps=eps, reach_x=reach_x, reach_y=reach_y, ridge=ridge)
    return K, A, B, cost_scale, solve


# ---------------------------------------------------------------------- public
def hvp(x, y, f, g, A=None, B=None, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
        solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None,
        truncate=None):
    r"""The Hessian-vector product of the OT loss ``L(x, y)`` along ``(A, B)``.

    Parameters
    ----------
    x : Tensor, shape (n, d)
    y : Tensor, shape (m, d)
    f : Tensor, shape (n,)
    g : Tensor, shape (m,)
        Converged potentials (GeomLoss convention).
    A : Tensor, shape (n, d), optional
    B : Tensor, shape (m, d), optional
        The direction; a missing part is zero (at least one is needed).
    eps : float
    a, b : Tensor, shapes (n,), (m,), optional
        Weights (uniform by default).
    cost_scale : float, default 1.0
        ``C = cost_scale |x - y|^2``.
    reach_x, reach_y : float, optional
        Unbalanced relaxation of each side (None: hard marginal).
    solver : callable, default ``solvers.cg``
        Solves the Schur system: ``solver(S, rhs, M=M, rtol=, atol=, maxiter=)``
        returning a ``SolveResult`` (``solvers.minres`` works too).
    M : operator or preconditioner factory, optional
        For S: ``solvers.jacobi()``, ``solvers.neumann(3)``, or any operator.
    rtol, atol, maxiter : optional
        Inner-solve tolerances; ``rtol`` defaults to 1e-11 in float64 and 1e-5
        otherwise.
    ridge : float, optional
        Relative ridge of the Schur complement (``HessianOperator``).
    backend, precision : optional
        Passed to ``PlanOperator``.
    truncate : float, optional
        Run on ``P.truncated(truncate)`` (``otlinop.truncated``): the plan
        without its entries below the certified bound, a sparse operator
        whose products cost O(nnz) instead of a streaming pass. Pays when
        eps is small against the spread of the costs (at 10k points, d = 64,
        eps = 0.5 about 1% of the entries are kept for 1e-8); when the plan
        is too dense the streaming plan is used. 1e-8 moves the HVP by
        about 1e-8 over the Schur complement's spectral gap (relative).
        None (default): the exact streaming plan.

    Returns
    -------
    Hx : Tensor, shape (n, d)
        ``H_xx A + H_xy B``.
    Hy : Tensor, shape (m, d)
        ``H_yx A + H_yy B``.
    result : SolveResult
        The inner solve's result (check ``result.converged``).

    Raises
    ------
    ValueError, TypeError
        For a missing direction, or shapes, dtypes, devices that do not match.

    Notes
    -----
    ``Hx = sum_j G_ij``, ``Hy = -sum_i G_ij`` with ``G_ij = c2 [P_ij (A_i - B_j) +
    dP_ij (x_i - y_j)]`` and ``dP_ij = P_ij (df_i + dg_j - s_ij) / eps``,
    ``s_ij = c2 <x_i - y_j, A_i - B_j>``, ``(df, dg) = K^+ [(P∘s) 1; (P∘s).T 1]``
    (module docstring). Cost: one Schur solve (2 plan passes per iteration
    plus the preconditioner's) and 6 plan passes (4 with one of A, B).
    For a double backward, ``(Hx, Hy)`` are the second-order contributions to
    ``x`` and ``y`` of grad-of-grad directions ``(A, B)`` (H is symmetric).

    Examples
    --------
    >>> import torch, solvers
    >>> from otlinop.sinkhorn import sinkhorn
    >>> from otlinop.hvp import hvp
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
    >>> A, B = torch.randn_like(x), torch.randn_like(y)
    >>> Hx, Hy, info = hvp(x, y, res.f, res.g, A, B, eps=res.eps, a=res.a, b=res.b, M=solvers.jacobi())
    >>> info.converged, Hx.shape, Hy.shape
    (True, torch.Size([30, 2]), torch.Size([20, 2]))
    """
    if A is None and B is None:
        raise ValueError("hvp: give a direction A (for x), B (for y) or both; got neither")
    return _checked_hvp("hvp", x, y, f, g, A, B, "xy", eps=eps, a=a, b=b, cost_scale=cost_scale, reach_x=reach_x,
                        reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge,
                        backend=backend, precision=precision, truncate=truncate)


def _checked_hvp(owner, x, y, f, g, A, B, sides, **options):
    """Validate, build the dual Hessian and run ``_hvp`` on the requested ``sides``."""
    K, A, B, cost_scale, solve = _checked_dual(owner, x, y, f, g, A, B, **options)
    return _hvp(K, x, y, A, B, cost_scale=cost_scale, solve=solve, sides=sides)


def hvp_x(x, y, f, g, A, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
          solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None,
          truncate=None):
    """``H_xx A``, the HVP of ``L`` in ``x`` alone; returns ``(HA, SolveResult)``.

    Arguments as in ``hvp``. Cost: the Schur solve and 4 plan passes
    (``P @ y``, ``P.T @ [A | <x, A>]``, ``P @ [dg | y dg]``, one bilinear).
    """
    dx, _, result = _checked_hvp("hvp_x", x, y, f, g, A, None, "x", need="A", eps=eps, a=a, b=b,
                                 cost_scale=cost_scale, reach_x=reach_x, reach_y=reach_y, solver=solver, M=M,
                                 rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, backend=backend,
                                 precision=precision, truncate=truncate)
    return dx, result


def hvp_y(x, y, f, g, B, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
          solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None,
          truncate=None):
    """``H_yy B``, the HVP of ``L`` in ``y`` alone; returns ``(HB, SolveResult)``.

    Arguments as in ``hvp``; the cost mirrors ``hvp_x``.
    """
    _, dy, result = _checked_hvp("hvp_y", x, y, f, g, None, B, "y", need="B", eps=eps, a=a, b=b,
                                 cost_scale=cost_scale, reach_x=reach_x, reach_y=reach_y, solver=solver, M=M,
                                 rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, backend=backend,
                                 precision=precision, truncate=truncate)
    return dy, result


def hvp_self(x, f, A, *, eps, a=None, cost_scale=1.0, reach=None, solver=cg, M=None, rtol=None,
             atol=0.0, maxiter=None, ridge=None, backend=None, precision=None, truncate=None):
    """The HVP of the debiasing term ``OT(a, a) / 2`` as a function of ``x``
    (both arguments of the self-transport moving together).

    Parameters
    ----------
    x : Tensor, shape (n, d)
    f : Tensor, shape (n,)
        The converged symmetric potential ``f_aa`` of ``OT(a, a)``.
    A : Tensor, shape (n, d)
    reach : float, optional
        The relaxation of both sides (None: balanced).
    Other arguments as in ``hvp``.

    Returns
    -------
    HA : Tensor, shape (n, d)
    result : SolveResult

    Notes
    -----
    ``d^2/dx^2 [OT(x, x) / 2] A = (H_xx + H_xy + H_yx + H_yy) A / 2`` with ``H``
    the joint Hessian of ``OT(x, y)`` at ``y = x``: one ``hvp`` call with
    ``(A, A)``. The debiased loss ``OT(a,b) - OT(a,a)/2 - OT(b,b)/2`` has
    ``H_xx = hvp_x(...) - hvp_self(x, f_aa, ...)`` (and no cross term from
    the self terms).
    """
    K, A, _, cost_scale, solve = _checked_dual(
        "hvp_self", x, x, f, f, A, None, need="A", eps=eps, a=a, b=a, cost_scale=cost_scale, reach_x=reach,
        reach_y=reach, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, backend=backend,
        precision=precision, truncate=truncate, reach_names=("reach", "reach"))
    dx, dy, result = _hvp(K, x, x, A, A, cost_scale=cost_scale, solve=solve, sides="xy")
    return (dx + dy) / 2, result


def grad_x(x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None):
    """``grad_x L = c2 (ah * x - P y)`` with ``ah = P 1``, shape (n, d), at converged potentials
    (one plan pass). Arguments as in ``hvp``."""
    return transport_gradient_for("grad_x", x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale, backend=backend,
                                  precision=precision, batched=False)


def grad_y(x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None):
    """``grad_y L = c2 (bh * y - P.T x)`` with ``bh = P.T 1``, shape (m, d), at converged potentials
    (one plan pass). Arguments as in ``hvp``."""
    return transport_gradient_for("grad_y", x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale, backend=backend,
                                  precision=precision, batched=False, wrt="y")


class LossHessianOperator(LinearOperator):
    """The Hessian of the OT loss in ``x``, ``y`` or both, as an operator on
    flattened directions. Build it with ``loss_hessian_operator``.

    Notes
    -----
    * Shape (n d, n d) for ``wrt="x"``, (m d, m d) for ``"y"``, ((n + m) d,
      (n + m) d) for ``"xy"`` (``x`` rows first, then ``y``, each row-major).
    * Symmetric (up to the inner-solve tolerance) and indefinite: use MINRES,
      not CG, for Newton systems; ``to_scipy()`` works with ``eigsh``.
    * One matvec is one HVP: a Schur solve plus 4 to 6 plan passes. The dual
      Hessian ``K`` and a preconditioner factory bound to its Schur complement
      are built once and shared by all matvecs. ``last_solve`` holds the last
      inner ``SolveResult``.
    * On a GPU, ``solver=functools.partial(cg, graph=solvers.GraphCache())``
      also keeps the inner CG's captured iteration from one matvec to the
      next (``cg(graph=True)`` captures it again at every matvec).
    """

    def __init__(self, K, x, y, *, wrt, cost_scale, solve):
        n, m, d = x.shape[0], y.shape[0], x.shape[1]
        size = {"x": n * d, "y": m * d, "xy": (n + m) * d}[wrt]
        super().__init__((size, size), x.dtype, x.device, is_symmetric=True)
        M = solve["M"]
        if hasattr(M, "bind") and not isinstance(M, LinearOperator):
            M = M.bind(K.schur)   # e.g. jacobi(): one pass over P∘P here, not one per matvec
        self.wrt, self.K, self.x, self.y = wrt, K, x, y
        self._cost_scale, self._solve = cost_scale, {**solve, "M": M}
        self.last_solve = None

    def _matvec(self, v):
        x, y = self.x, self.y
        A = v[:x.numel()].reshape(x.shape) if "x" in self.wrt else None
        B = v[v.numel() - y.numel():].reshape(y.shape) if "y" in self.wrt else None
        dx, dy, self.last_solve = _hvp(self.K, x, y, A, B, cost_scale=self._cost_scale, solve=self._solve,
                                       sides=self.wrt)
        return torch.cat([t.reshape(-1) for t in (dx, dy) if t is not None])


def loss_hessian_operator(x, y, f, g, *, wrt="x", eps, a=None, b=None, cost_scale=1.0, reach_x=None,
                          reach_y=None, solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None,
                          backend=None, precision=None, truncate=None) -> LossHessianOperator:
    """The Hessian of the OT loss as a symmetric, indefinite ``LinearOperator``.

    Parameters
    ----------
    wrt : {"x", "y", "xy"}, default "x"
        The variables: ``x`` (operator of size n d), ``y`` (m d), or both
        (``(n + m) d``, x first).
    Other arguments as in ``hvp``.

    Returns
    -------
    LossHessianOperator
        Its matvec reshapes the flat vector to ``(n, d)`` (and/or ``(m, d)``)
        and returns the flattened HVP; ``.last_solve`` is the last inner
        ``SolveResult``.

    Raises
    ------
    ValueError
        If ``wrt`` is not one of "x", "y", "xy".

    Examples
    --------
    >>> import torch, solvers, scipy.sparse.linalg as sla
    >>> from otlinop.sinkhorn import sinkhorn
    >>> from otlinop.hvp import grad_x, loss_hessian_operator
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
    >>> H = loss_hessian_operator(x, y, res.f, res.g, eps=res.eps, a=res.a, b=res.b)
    >>> G = grad_x(x, y, res.f, res.g, eps=res.eps, a=res.a, b=res.b).reshape(-1)
    >>> step = solvers.minres(H, -G, shift=-1.0, rtol=1e-8)      # (H + I) s = -G
    >>> step.converged, H.last_solve.converged
    (True, True)
    >>> lo, hi = sla.eigsh(H.to_scipy(), k=2, which="BE", return_eigenvectors=False)
    >>> bool(lo < 0 < hi)   # the OT Hessian is indefinite
    True
    """
    owner = "loss_hessian_operator"
    if not (isinstance(wrt, str) and wrt in ("x", "y", "xy")):
        raise ValueError(f"{owner}: wrt must be 'x', 'y' or 'xy', got {wrt!r}")
    K, _, _, cost_scale, solve = _checked_dual(
        owner, x, y, f, g, None, None, eps=eps, a=a, b=b, cost_scale=cost_scale, reach_x=reach_x, reach_y=reach_y,
        solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, backend=backend,
        precision=precision, truncate=truncate)
    return LossHessianOperator(K, x, y, wrt=wrt, cost_scale=cost_scale, solve=solve)
