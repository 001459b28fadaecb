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
``P.bilinear`` after it (and the same on ``P.T`` for the y part); for small d
the bilinear pass becomes d^2 more columns of the first one (``_Side``).
k directions at once (A of shape (n, d, k)) are one solve with k right-hand
sides and the same passes with k times the columns.

The potentials must be converged (``P 1`` and ``P.T 1`` satisfy the optimality
conditions); the functions take them as given.
"""

from __future__ import annotations

import torch

from solvers import cg, config

from ._base import LinearOperator
from ._checks import (directions, finite, fraction, nonnegative_scalar, points, positive_int, positive_scalar,
                      preconditioner, solver_function, vector)
from ._operators.plan_product import transport_gradient_for
from .hessian import DualHessianOperator, hessian_options
from .kernels.plan_apply import OVERFLOW_HINT
from .plan import plan_operator_for

__all__ = ["hvp", "plan_hvp", "hvp_x", "hvp_y", "hvp_self", "grad_x", "grad_y", "loss_hessian_operator",
           "LossHessianOperator", "inner_rtol", "solve_options"]

# Inner-solve tolerances that the float64 tests and the float32 benchmark need
# (the CG residual, relative to the right-hand side, of the Schur system).
_DEFAULT_RTOL = {torch.float64: 1e-11}
_DEFAULT_RTOL_LOW = 1e-5


def inner_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance of the inner (Schur) solve of an HVP in
    ``dtype``: 1e-11 in float64, 1e-5 otherwise. The loss's converging solves
    (``otlinop.loss``, ``converge``) use it too."""
    return _DEFAULT_RTOL.get(dtype, _DEFAULT_RTOL_LOW)


#: Columns per direction that the moments of the ``Q y`` term (below) may add to
#: a plan pass instead of one bilinear pass per direction. A streaming pass takes
#: up to 64 columns at the price of one (``kernels.plan_apply`` recomputes the
#: plan once per chunk of 64), and on a truncated plan a column costs O(nnz), as
#: a bilinear pass does per direction. ``_MOMENT_COLUMNS_MAX`` bounds them in all
#: (an (m, 8192) operand: 330 MB at m = 10k in float32).
_MOMENT_COLUMNS = 64
_MOMENT_COLUMNS_MAX = 8192


def _products(P, blocks):
    """``{name: P @ V}`` for the named (m, c_name) blocks, in one plan pass."""
    names = [name for name, V in blocks if V is not None]
    mats = [V for _, V in blocks if V is not None]
    if not mats:
        return {}
    out = P @ torch.cat(mats, dim=1)
    return dict(zip(names, torch.split(out, [V.shape[1] for V in mats], dim=1)))


class _Side:
    """One side of the HVP: the x side on ``P`` or, with every role swapped, the
    y side on ``P.T``. Holds the points, the k directions of both sides (A:
    (n, d, k), B: (m, d, k), or None for zero), one streaming pass of the plan,
    ``P @ [y | B | <y, B> | moments]`` (parts not needed are skipped), and
    ``r = (P∘s) 1``, shape (n, k), the right-hand sides of the dual solve on this side.

    ``wanted``: this side's HVP will be asked for (``gradient_derivative``).
    The term ``sum_j P_ij (<A_i, y_j> + <x_i, B_j>) y_j`` of it is either k
    bilinear passes or, for small d, the moments ``sum_j P_ij y_j y_j^T`` (d^2
    columns) and ``sum_j P_ij y_j B_j^T`` (d^2 k) contracted with A and x: extra
    columns of the first pass, chosen when they fit in ``_MOMENT_COLUMNS`` per
    direction (and ``_MOMENT_COLUMNS_MAX`` in all).
    """

    def __init__(self, P, x, y, A, B, *, c2, wanted):
        self.P, self.x, self.y, self.A, self.B, self.c2 = P, x, y, A, B, c2
        n, d = x.shape
        m = y.shape[0]
        k = (A if A is not None else B).shape[2]
        self.u = None if A is None else torch.einsum("nd,ndk->nk", x, A)
        self.w = None if B is None else torch.einsum("md,mdk->mk", y, B)
        self.ah = P.row_sums()
        moment_columns = d * d * ((A is not None) + (B is not None) * k)
        self.moments = wanted and moment_columns <= min(_MOMENT_COLUMNS * k, _MOMENT_COLUMNS_MAX)
        yy = yB = None
        if self.moments and A is not None:
            yy = (y[:, :, None] * y[:, None, :]).reshape(m, d * d)
        if self.moments and B is not None:
            yB = (y[:, :, None, None] * B[:, None, :, :]).reshape(m, d * d * k)
        out = _products(P, [("Py", y if (A is not None or wanted) else None),
                            ("PB", None if B is None else B.reshape(m, d * k)),
                            ("Pw", self.w), ("Pyy", yy), ("PyB", yB)])
        self.Py = out.get("Py")
        self.PB = None if B is None else out["PB"].reshape(n, d, k)
        self.Pw = out.get("Pw")
        self.Pyy = None if yy is None else out["Pyy"].reshape(n, d, d)
        self.PyB = None if yB is None else out["PyB"].reshape(n, d, d, k)
        # (P∘s) 1 with s_ij = c2 <x_i - y_j, A_i - B_j>, shape (n, k).
        r = torch.zeros(n, k, dtype=x.dtype, device=x.device)
        if A is not None:
            r = r + self.ah[:, None] * self.u - torch.einsum("ndk,nd->nk", A, self.Py)
        if B is not None:
            r = r + self.Pw - torch.einsum("nd,ndk->nk", x, self.PB)
        self.r = c2 * r

    def _bilinear_term(self):
        """``sum_j P_ij (<A_i, y_j> + <x_i, B_j>) y_j``, shape (n, d, k)."""
        x, y, A, B = self.x, self.y, self.A, self.B
        if self.moments:
            T = 0
            if A is not None:
                T = T + torch.einsum("nce,nck->nek", self.Pyy, A)
            if B is not None:
                T = T + torch.einsum("nc,neck->nek", x, self.PyB)
            return T
        columns = []
        for j in range((A if A is not None else B).shape[2]):
            W = torch.cat([t for t in (None if A is None else A[:, :, j], None if B is None else x)
                           if t is not None], dim=1)
            V = torch.cat([t for t in (None if A is None else y, None if B is None else B[:, :, j])
                           if t is not None], dim=1)
            columns.append(self.P.bilinear(W, V, y))
        return torch.stack(columns, dim=2)

    def gradient_derivative(self, df, dg, *, eps):
        """``sum_j G_ij`` (module docstring) from this side's potential derivatives
        ``df`` (n, k) and the other side's ``dg`` (m, k): shape (n, d, k)."""
        P, x, y, A, B, ah, c2, r = self.P, self.x, self.y, self.A, self.B, self.ah, self.c2, self.r
        n, d = x.shape
        m, k = y.shape[0], df.shape[1]
        # s_ij = c2 (u_i - <y_j, A_i> - <x_i, B_j> + w_j): sum_j dP_ij (x_i - y_j) needs
        # P dg and P (y dg) (with the w_j part folded into dg), one pass for the k
        # directions, and the bilinear term sum_j P_ij (<A_i, y_j> + <x_i, B_j>) y_j.
        dg_w = dg if B is None else dg - c2 * self.w
        df_u = df if A is None else df - c2 * self.u
        out = P @ torch.cat([dg_w, (y[:, :, None] * dg_w[:, None, :]).reshape(m, d * k)], dim=1)
        P_dg = out[:, :k] if B is None else out[:, :k] + c2 * self.Pw
        P_ydg = out[:, k:].reshape(n, d, k)
        replan = (x[:, :, None] * (ah[:, None] * df + P_dg - r)[:, None, :] - self.Py[:, :, None] * df_u[:, None, :]
                  - P_ydg - c2 * self._bilinear_term())
        transport = torch.zeros_like(replan)
        if A is not None:
            transport = transport + ah[:, None, None] * A
        if B is not None:
            transport = transport - self.PB
        return c2 * (transport + replan / eps)


def check_results(owner: str, results: dict, hint: str) -> None:
    """ValueError naming ``owner`` if a tensor of ``results`` (name -> tensor or None) holds NaN or inf
    (one host read; ``hint`` says why it can overflow and what to do)."""
    finite(owner, {}, results=results, result_hint=hint)


def _hvp(K, x, y, A, B, *, cost_scale, solve, sides, owner="hvp", check=None):
    """``(H_x [A; B], H_y [A; B], SolveResult)`` for the dual Hessian K of the
    problem (its plan ``K.P``); ``sides`` in {"x", "y", "xy"} picks the parts computed.

    A, B: (n, d), (m, d) for one direction, or (n, d, k), (m, d, k) for k of
    them (one solve with k right-hand sides); None for a zero part. The
    products have the directions' shape.

    Two host reads for the values: the plan passes before and after the solve
    run with their value checks off (each read its operand and result back:
    seven reads per call), and their results are checked for an overflow
    twice, the solve's right-hand side and the products at the end. Their
    inputs were checked before (the plan's data when it was built, the
    directions by the caller); every operand of a pass is computed from them,
    so a non-finite product can only come from an overflow. ``check(owner,
    results, hint)`` runs those two checks (default :func:`check_results`; a
    sharded operator's raises on every rank of its group).
    """
    check = check_results if check is None else check
    c2 = 2.0 * cost_scale
    single = (A if A is not None else B).ndim == 2
    if single:
        A, B = (None if D is None else D[:, :, None] for D in (A, B))
    with config.override(check_finite=False):
        X = _Side(K.P, x, y, A, B, c2=c2, wanted="x" in sides)
        Y = _Side(K.P.T, y, x, B, A, c2=c2, wanted="y" in sides)
        rhs = torch.cat([X.r, Y.r])
    # The passes that built it overflow for directions near the dtype's range: say so here (the solver
    # would only see a non-finite b).
    check(owner, {"the Schur solve's right-hand side": rhs},
          "the directions A, B, times the points, are too large for the dtype (scale them down: the HVP is "
          "linear in them), or " + OVERFLOW_HINT)
    with config.override(check_finite=False):
        # One direction goes to the solver as a vector (what a user's solver or M expects).
        dphi, result = K.solve(rhs[:, 0] if single else rhs, **solve)
        dphi = dphi.reshape(rhs.shape)
        df, dg = dphi[:x.shape[0]], dphi[x.shape[0]:]
        dx = X.gradient_derivative(df, dg, eps=K.eps) if "x" in sides else None
        dy = Y.gradient_derivative(dg, df, eps=K.eps) if "y" in sides else None
    check(owner, {"H_x A": dx, "H_y B": dy}, OVERFLOW_HINT)
    if single:
        dx, dy = (None if H is None else H[:, :, 0] for H in (dx, dy))
    return dx, dy, result


# ------------------------------------------------------------------ validation
def solve_options(owner, dtype, solver, M, rtol, atol, maxiter) -> dict:
    """The inner solve's options of an HVP, checked for ``owner``: ``dict(solver, M, rtol, atol, maxiter)``
    (``rtol`` None: :func:`inner_rtol` of ``dtype``)."""
    solver_function(owner, "solver", solver)
    preconditioner(owner, "M", M)
    rtol = inner_rtol(dtype) if rtol is None else nonnegative_scalar(owner, "rtol", rtol)
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
        A = directions(geo, "A", A, geo.n, what="one direction for x, or k of them")
    if B is not None or "B" in need:
        k = None if A is None else (0 if A.ndim == 2 else A.shape[2])
        B = directions(geo, "B", B, geo.m, k=k, what="shaped like A, one row per point of y")
    eps, _, _, _ = hessian_options(owner, eps, reach_x, reach_y, ridge, reach_names=reach_names)
    cost_scale = positive_scalar(owner, "cost_scale", cost_scale)
    solve = solve_options(owner, x.dtype, solver, M, rtol, atol, maxiter)
    if truncate is not None:
        truncate = fraction(owner, "truncate", truncate)
    P = plan_operator_for(owner, x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale, backend=backend,
                          precision=precision)
    if truncate is not None:
        P = P.truncated(truncate)
    with config.override(check_finite=False):
        K = DualHessianOperator(P, eps=eps, reach_x=reach_x, reach_y=reach_y, ridge=ridge)
    # One read for the directions (which enter the plan kernels: they would name themselves,
    # "plan_apply: V ...") and the marginals that K was built on (an overflow).
    finite(owner, {"A": A, "B": B}, hint="the directions must be finite",
           results={"P 1": K.P.row_sums(), "P.T 1": K.P.col_sums()}, result_hint=OVERFLOW_HINT)
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
    A : Tensor, shape (n, d) or (n, d, k), optional
    B : Tensor, shape (m, d) or (m, d, k), optional
        The direction, or k directions stacked along the last axis (both
        parts with the same k); a missing part is zero (at least one is
        needed). k directions cost one solve with k right-hand sides (one
        ``S @ Z`` plan pass per CG iteration for all of them) and the same
        number of plan passes as one, each with k times the columns.
    eps : float
    a, b : Tensor, shapes (n,), (m,), optional
        Weights (uniform by default).
    cost_scale : float, default 1.0
        ``C = cost_scale |x - y|^2``.
    reach_x, reach_y : float, optional
        Unbalanced relaxation of each side (None: hard marginal).
    solver : callable, default ``solvers.cg``
        Solves the Schur system: ``solver(S, rhs, M=M, rtol=, atol=, maxiter=)``
        returning a ``SolveResult`` (``solvers.minres`` works too). It runs
        with the plan products' value checks off (``config.check_finite``):
        the inner solve reads nothing back to the host but ``cg``'s stopping
        flag, every ``check_every`` iterations (4 on a GPU, 1 on the CPU;
        ``functools.partial(solvers.cg, check_every=8)`` changes it,
        ``graph=True`` replays the iterations as a CUDA graph).
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
    Hx : Tensor, shape (n, d) or (n, d, k)
        ``H_xx A + H_xy B`` (shaped like the directions).
    Hy : Tensor, shape (m, d) or (m, d, k)
        ``H_yx A + H_yy B``.
    result : SolveResult
        The inner solve's result (check ``result.converged``; with k
        directions, ``column_converged`` and ``column_iterations`` per direction).

    Raises
    ------
    ValueError, TypeError
        For a missing direction, or shapes, dtypes, devices that do not match.
    NotImplementedError
        For ``truncate`` with DTensor inputs.

    Notes
    -----
    ``Hx = sum_j G_ij``, ``Hy = -sum_i G_ij`` with ``G_ij = c2 [P_ij (A_i - B_j) +
    dP_ij (x_i - y_j)]`` and ``dP_ij = P_ij (df_i + dg_j - s_ij) / eps``,
    ``s_ij = c2 <x_i - y_j, A_i - B_j>``, ``(df, dg) = K^+ [(P∘s) 1; (P∘s).T 1]``
    (module docstring). Cost: one Schur solve (2 plan passes per iteration
    plus the preconditioner's) and 6 plan passes (4 with one of A, B); the
    term ``sum_j P_ij (<A_i, y_j> + <x_i, B_j>) y_j`` is one pass per
    direction when d is large, or, when d^2 (plus d^2 k with both parts)
    columns fit in 64 per direction, the moments ``P (y y^T)`` and ``P (y B^T)``
    computed in the first pass (no pass of its own).
    For a double backward, ``(Hx, Hy)`` are the second-order contributions to
    ``x`` and ``y`` of grad-of-grad directions ``(A, B)`` (H is symmetric).

    **DTensors.** Given points that are DTensors sharded on the point
    dimension (``placements == (Shard(0),)`` on a 1-D mesh; then ``f``,
    ``g``, ``a``, ``b``, ``A``, ``B`` must be so too), every rank of the mesh
    calls it and it runs ``otlinop.distributed.hvp`` with ``sharded="xy"`` on
    the local shards over the mesh's group: ``Hx`` and ``Hy`` come back as
    DTensors sharded like x and y, ``result`` the same on every rank. So do
    ``hvp_x``, ``hvp_y`` and ``loss_hessian_operator`` (``hvp_self`` raises
    NotImplementedError).

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

    Four directions in one solve with four right-hand sides:

    >>> A4, B4 = torch.randn(30, 2, 4, dtype=torch.float64), torch.randn(20, 2, 4, dtype=torch.float64)
    >>> Hx4, Hy4, info4 = hvp(x, y, res.f, res.g, A4, B4, eps=res.eps, a=res.a, b=res.b)
    >>> Hx4.shape, info4.x.shape
    (torch.Size([30, 2, 4]), torch.Size([20, 4]))
    >>> one = hvp(x, y, res.f, res.g, A4[..., 1], B4[..., 1], eps=res.eps, a=res.a, b=res.b)[0]
    >>> torch.allclose(Hx4[..., 1], one, rtol=1e-9, atol=1e-12)
    True
    """
    if A is None and B is None:
        raise ValueError("hvp: give a direction A (for x), B (for y) or both; got neither")
    return _checked_hvp("hvp", x, y, f, g, A, B, "xy", eps=eps, a=a, b=b, cost_scale=cost_scale, reach_x=reach_x,
                        reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge,
                        backend=backend, precision=precision, truncate=truncate)


def _plan_points(owner: str, P):
    """``(x, y)`` of a plan operator given to ``owner`` (a ``PlanOperator``, ``BlockSparsePlanOperator``, ...)."""
    if not isinstance(P, LinearOperator) or not all(hasattr(P, name) for name in ("x", "y", "row_sums", "col_sums")):
        raise TypeError(f"{owner}: P must be a plan operator with points x, y and row_sums()/col_sums() (a "
                        "PlanOperator, or the plan of a sinkhorn result such as a BlockSparsePlanOperator), got "
                        f"{type(P).__name__}")
    return P.x, P.y


def _plan_dual(owner, P, *, eps, cost_scale, reach_x, reach_y, solver, M, rtol, atol, maxiter, ridge):
    """``(K, x, y, cost_scale, solve options)`` for an HVP on the given plan ``P``."""
    x, y = _plan_points(owner, P)
    eps, _, _, _ = hessian_options(owner, eps, reach_x, reach_y, ridge)
    cost_scale = positive_scalar(owner, "cost_scale", cost_scale)
    solve = solve_options(owner, P.dtype, solver, M, rtol, atol, maxiter)
    K = DualHessianOperator(P, eps=eps, reach_x=reach_x, reach_y=reach_y, ridge=ridge)
    return K, x, y, cost_scale, solve


def plan_hvp(P, A=None, B=None, *, eps, cost_scale=1.0, reach_x=None, reach_y=None, solver=cg, M=None, rtol=None,
             atol=0.0, maxiter=None, ridge=None):
    r"""The Hessian-vector product of the OT loss along ``(A, B)`` on a given plan operator.

    :func:`hvp` builds the streaming ``PlanOperator`` from potentials; this
    takes the plan itself, e.g. the block-sparse plan of
    ``sinkhorn(..., multiscale=...)``, whose products skip the dropped
    cluster pairs.

    Parameters
    ----------
    P : PlanOperator or BlockSparsePlanOperator, shape (n, m)
        The plan at converged potentials; it gives the points ``P.x`` (n, d)
        and ``P.y`` (m, d).
    A : Tensor, shape (n, d) or (n, d, k), optional
    B : Tensor, shape (m, d) or (m, d, k), optional
        The direction(s), as in :func:`hvp` (at least one).
    eps : float
    cost_scale, reach_x, reach_y, solver, M, rtol, atol, maxiter, ridge
        As in :func:`hvp`.

    Returns
    -------
    Hx : Tensor, shape of A's (n, d[, k])
    Hy : Tensor, shape (m, d[, k])
    result : SolveResult
        The inner solve's.

    Raises
    ------
    TypeError
        If ``P`` is not a plan operator.
    ValueError
        For a missing direction or mismatched shapes.

    Notes
    -----
    The formulas of :func:`hvp` with ``K = DualHessianOperator(P)``: every
    plan pass is a product with ``P`` or ``P.T``. On a block-sparse plan the
    result is the HVP of the loss restricted to the kept pairs; the dropped
    mass (``SinkhornResult.truncation_bound``) bounds the difference.

    Examples
    --------
    >>> import torch, solvers, otlinop
    >>> from otlinop.hvp import plan_hvp
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.rand(60, 2, dtype=torch.float64), torch.rand(50, 2, dtype=torch.float64)
    >>> res = otlinop.sinkhorn(x, y, blur=0.2, threshold=1e-10, multiscale=otlinop.Multiscale(cluster_scale=0.3))
    >>> Hx, Hy, info = plan_hvp(res.plan, torch.randn_like(x), eps=res.eps, M=solvers.jacobi())
    >>> Hx.shape, info.converged
    (torch.Size([60, 2]), True)
    """
    owner = "plan_hvp"
    if A is None and B is None:
        raise ValueError(f"{owner}: give a direction A (for x), B (for y) or both; got neither")
    K, x, y, cost_scale, solve = _plan_dual(owner, P, eps=eps, cost_scale=cost_scale, reach_x=reach_x,
                                            reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol,
                                            maxiter=maxiter, ridge=ridge)
    geo = points(owner, x, y, batch="none")
    if A is not None:
        A = directions(geo, "A", A, geo.n, what="one direction for x, or k of them")
    if B is not None:
        k = None if A is None else (0 if A.ndim == 2 else A.shape[2])
        B = directions(geo, "B", B, geo.m, k=k, what="shaped like A, one row per point of y")
    finite(owner, {"A": A, "B": B}, hint="the directions must be finite")
    return _hvp(K, x, y, A, B, cost_scale=cost_scale, solve=solve, sides="xy", owner=owner)


def _sharded_points(x, y) -> bool:
    """Whether the points are DTensors (sharded on the point dimension): ``otlinop.distributed`` runs the call."""
    # Imported here: otlinop.distributed builds on this layer's modules.
    from .distributed.hvp import is_dtensor
    return is_dtensor(x) or is_dtensor(y)


def _checked_hvp(owner, x, y, f, g, A, B, sides, **options):
    """Validate, build the dual Hessian and run ``_hvp`` on the requested ``sides``
    (DTensor points: ``otlinop.distributed.hvp.hvp_dtensor``, with the same result layout)."""
    if _sharded_points(x, y):
        from .distributed.hvp import hvp_dtensor
        options.pop("need", None)
        return hvp_dtensor(owner, x, y, f, g, A, B, **options)
    K, A, B, cost_scale, solve = _checked_dual(owner, x, y, f, g, A, B, **options)
    return _hvp(K, x, y, A, B, cost_scale=cost_scale, solve=solve, sides=sides, owner=owner)


def hvp_x(x, y, f, g, A, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
          solver=cg, M=None, rtol=None, atol=0.0, maxiter=None, ridge=None, backend=None, precision=None,
          truncate=None):
    """``H_xx A``, the HVP of ``L`` in ``x`` alone; returns ``(HA, SolveResult)``.

    A is (n, d), or (n, d, k) for k directions in one solve (HA then has
    A's shape). Arguments as in ``hvp``; DTensors as there (HA a DTensor). Cost: the Schur solve and 4 plan
    passes (``P @ y``, ``P.T @ [A | <x, A>]``, ``P @ [dg | y dg]``, one
    bilinear per direction), 3 when d^2 <= 64 k (the bilinear term from
    the moments ``P (y y^T)``, d^2 more columns of the first pass).

    Examples
    --------
    >>> import torch, solvers
    >>> from otlinop.sinkhorn import sinkhorn
    >>> from otlinop.hvp import hvp_x
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
    >>> A = torch.randn(30, 3, 16, dtype=torch.float64)           # 16 directions, one solve
    >>> HA, info = hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b, M=solvers.jacobi())
    >>> HA.shape, info.converged, len(info.column_iterations)
    (torch.Size([30, 3, 16]), True, 16)
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

    B is (m, d) or (m, d, k). Arguments as in ``hvp`` (DTensors too); the cost mirrors ``hvp_x``.
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
    A : Tensor, shape (n, d) or (n, d, k)
        One direction, or k in one solve.
    reach : float, optional
        The relaxation of both sides (None: balanced).
    Other arguments as in ``hvp``.

    Returns
    -------
    HA : Tensor, shaped like A
    result : SolveResult

    Notes
    -----
    ``d^2/dx^2 [OT(x, x) / 2] A = (H_xx + H_xy + H_yx + H_yy) A / 2`` with ``H``
    the joint Hessian of ``OT(x, y)`` at ``y = x``: one ``hvp`` call with
    ``(A, A)``. The debiased loss ``OT(a,b) - OT(a,a)/2 - OT(b,b)/2`` has
    ``H_xx = hvp_x(...) - hvp_self(x, f_aa, ...)`` (and no cross term from
    the self terms).
    """
    if _sharded_points(x, x):
        raise NotImplementedError("hvp_self: DTensor inputs are not implemented; otlinop.hvp(x, x, f, f, A, A, "
                                  "a=a, b=a, reach_x=reach, reach_y=reach) gives (Hx + Hy) / 2 on them")
    K, A, _, cost_scale, solve = _checked_dual(
        "hvp_self", x, x, f, f, A, None, need="A", eps=eps, a=a, b=a, cost_scale=cost_scale, reach_x=reach,
        reach_y=reach, solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, backend=backend,
        precision=precision, truncate=truncate, reach_names=("reach", "reach"))
    dx, dy, result = _hvp(K, x, x, A, A, cost_scale=cost_scale, solve=solve, sides="xy", owner="hvp_self")
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
    * One matvec is one HVP: a Schur solve plus 3 to 6 plan passes. A
      matmat ``H @ V`` with V of shape (size, k) is one batched HVP: one
      solve with k right-hand sides (``hvp``'s A of shape (n, d, k)), not k
      matvecs; block eigensolvers (``scipy.sparse.linalg.lobpcg`` on
      ``to_scipy()``), block Lanczos and Newton-Krylov with several
      directions use it. The dual Hessian ``K`` and a preconditioner factory
      bound to its Schur complement are built once and shared by all
      products. ``last_solve`` holds the last inner ``SolveResult``.
    * On a GPU, ``solver=functools.partial(cg, graph=solvers.GraphCache())``
      also keeps the inner CG's captured iteration from one matvec to the
      next (``cg(graph=True)`` captures it again at every matvec).
    """

    @classmethod
    def from_plan(cls, P, *, wrt="x", eps, cost_scale=1.0, reach_x=None, reach_y=None, solver=cg, M=None,
                  rtol=None, atol=0.0, maxiter=None, ridge=None) -> "LossHessianOperator":
        """The loss Hessian on a given plan operator (e.g. the block-sparse plan of a multiscale
        ``sinkhorn`` result); arguments as in :func:`plan_hvp`, ``wrt`` as in
        :func:`loss_hessian_operator`."""
        owner = "LossHessianOperator.from_plan"
        if not (isinstance(wrt, str) and wrt in ("x", "y", "xy")):
            raise ValueError(f"{owner}: wrt must be 'x', 'y' or 'xy', got {wrt!r}")
        K, x, y, cost_scale, solve = _plan_dual(owner, P, eps=eps, cost_scale=cost_scale, reach_x=reach_x,
                                                reach_y=reach_y, solver=solver, M=M, rtol=rtol, atol=atol,
                                                maxiter=maxiter, ridge=ridge)
        return cls(K, x, y, wrt=wrt, cost_scale=cost_scale, solve=solve)

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

    def _apply(self, V):
        """(size,) -> (size,) or (size, k) -> (size, k): one HVP, with k directions in one solve."""
        x, y = self.x, self.y
        cols = V.shape[1:]
        A = V[:x.numel()].reshape(x.shape + cols) if "x" in self.wrt else None
        B = V[V.shape[0] - y.numel():].reshape(y.shape + cols) if "y" in self.wrt else None
        dx, dy, self.last_solve = _hvp(self.K, x, y, A, B, cost_scale=self._cost_scale, solve=self._solve,
                                       sides=self.wrt, owner=type(self).__name__, check=self._check_results)
        return torch.cat([t.reshape((-1,) + cols) for t in (dx, dy) if t is not None])

    def _check_results(self, owner: str, results: dict, hint: str) -> None:
        """The overflow checks of one product (:func:`check_results`)."""
        check_results(owner, results, hint)

    def _matvec(self, v):
        return self._apply(v)

    def _matmat(self, V):
        if V.shape[1] == 0:
            return V.new_zeros((self.shape[0], 0))
        return self._apply(V)


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
        ``SolveResult``. For DTensor points (``hvp``'s Notes) an
        ``otlinop.distributed.ShardedLossHessianOperator`` with both clouds
        sharded, acting on this rank's flattened blocks (``V.to_local()``;
        x part first), its inner products reduced over the mesh's group.

    Raises
    ------
    ValueError
        If ``wrt`` is not one of "x", "y", "xy".
    NotImplementedError
        For ``truncate`` with DTensor inputs.

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
    if _sharded_points(x, y):
        from .distributed.hvp import loss_hessian_operator_dtensor
        return loss_hessian_operator_dtensor(x, y, f, g, wrt=wrt, eps=eps, a=a, b=b, cost_scale=cost_scale,
                                             reach_x=reach_x, reach_y=reach_y, solver=solver, M=M, rtol=rtol,
                                             atol=atol, maxiter=maxiter, ridge=ridge, backend=backend,
                                             precision=precision, truncate=truncate)
    if not (isinstance(wrt, str) and wrt in ("x", "y", "xy")):
        raise ValueError(f"{owner}: wrt must be 'x', 'y' or 'xy', got {wrt!r}")
    K, _, _, cost_scale, solve = _checked_dual(
        owner, x, y, f, g, None, None, eps=eps, a=a, b=b, cost_scale=cost_scale, reach_x=reach_x, reach_y=reach_y,
        solver=solver, M=M, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, backend=backend,
        precision=precision, truncate=truncate)
    return LossHessianOperator(K, x, y, wrt=wrt, cost_scale=cost_scale, solve=solve)
