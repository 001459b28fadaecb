"""``SinkhornResult``: the potentials of one ``sinkhorn`` call, their value and the operators built from them.

The classes are public: ``otlinop.SinkhornResult`` and
``otlinop.ConvergenceWarning`` (what ``sinkhorn`` warns when it returns a
result that is not converged) are these. :func:`convergence_status` writes
the sentence of a result's ``status``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

__all__ = ["SinkhornResult", "ConvergenceWarning", "convergence_status"]


class ConvergenceWarning(UserWarning):
    """Warned by ``otlinop.sinkhorn`` when it returns potentials whose marginal
    error is above the threshold (the result's ``status`` says why: the
    iteration budget, a stall at the dtype's resolution, or a divergence).

    A subclass of ``UserWarning``: filter it on its own with
    ``warnings.filterwarnings("ignore", category=otlinop.ConvergenceWarning)``,
    or turn it into an error with ``"error"`` in place of ``"ignore"``.
    """


def convergence_status(*, method: str, converged: bool, error: float, threshold: float, n_iter: int,
                       max_iter: int, stalled: bool, stall_span: int, floor: float, dtype: torch.dtype) -> str:
    """The sentence of ``SinkhornResult.status``: what happened, and what to try next.

    ``floor``: once ``stalled``, the resolution ``u (max|f| + max|g|) / eps`` of the
    potentials' arithmetic (``otlinop._sinkhorn_loops.resolution``).
    """
    name = str(dtype).replace("torch.", "")
    if converged:
        return f"converged: marginal error {error:.2e} <= threshold {threshold:.2e} after {n_iter} iterations"
    if not math.isfinite(error):
        return (f"diverged: the marginal error is {error} after {n_iter} iterations (the potentials overflowed "
                f"or became NaN in {name}); check the scale of the points against eps (docs/numerics.md), or "
                "pass float64 points")
    if stalled:
        return (f"stalled: the marginal error has not decreased for {stall_span} iterations and stays near "
                f"{error:.2e}, above threshold {threshold:.2e}: the threshold is below what {name} arithmetic "
                f"resolves on this problem (its resolution u (max|f| + max|g|) / eps is {floor:.1e} here; in exact "
                f"arithmetic Sinkhorn converges linearly); pass "
                f"{'float64 points' if dtype != torch.float64 else 'a larger eps'} or a threshold above {error:.1e}")
    skip = " and diameter=blur (no second annealing)" if method == "symmetric" else ""
    return (f"not converged: marginal error {error:.2e} > threshold {threshold:.2e} after {n_iter} iterations "
            f"(max_iter={max_iter}); raise max_iter, or continue from this result with f0=res.f, "
            f"g0=res.g{skip}")


@dataclass(repr=False)
class SinkhornResult:
    """Dual potentials of entropic OT and what is needed to reuse them.

    Attributes
    ----------
    f : Tensor, shape (n,) or (B, n)
        Potential on x (GeomLoss convention, see Notes).
    g : Tensor, shape (m,) or (B, m)
        Potential on y.
    eps : float
        The (final) entropic regularisation.
    n_iter : int
        Iterations run: averaged steps for "symmetric" (``len(eps_schedule)``,
        more with ``max_iter``; plus an initial and a final half-step each),
        full (g, f) iterations for "alternating".
    converged : bool
        Whether the final marginal error is <= ``threshold``.
    marginal_error : float
        The final marginal error ``||P 1 - a||_1 / sum(a)`` (against
        ``a exp(-f/rho)`` on a relaxed side; the maximum over a batch): that
        of the last check ("alternating"), of the potentials before the final
        extrapolation ("symmetric"). Relative to the mass, it is the L1 error
        for probability weights.
    marginal_error_history : list of float
        The marginal errors recorded at every check, the final one last.
        (Before version 0.2 this list was ``marginal_error``.)
    a, b, x, y : Tensor
        The weights and points (as given, or the uniform default weights).
    cost_scale : float
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    reach_x, reach_y : float or None
        Marginal relaxation per side (``rho = reach^2``); None = balanced side.
    method : str
        "symmetric" or "alternating".
    eps_schedule : list of float
        The values of eps used (a single value for "alternating").
    f_pre, g_pre : Tensor or None
        "symmetric" only: the potentials before the final extrapolation
        (``f = lam T_f(g_pre)``, ``g = lam T_g(f_pre)``); the loss gradients use
        the plans ``P(f, g_pre)`` and ``P(f_pre, g)``.
    backend, precision
        Kernel options, reused by ``plan`` and the Hessian methods.
    threshold : float
        The threshold the call was given.
    status : str
        One sentence: "converged: ...", "not converged: ..." (the iteration
        budget ran out), "stalled: ..." (no progress at the dtype's
        resolution) or "diverged: ..." (non-finite potentials), with what to
        try next. ``sinkhorn`` warns it (``ConvergenceWarning``) for every
        result that is not converged, and ``repr`` shows it.
    truncation_bound : tuple of float or None
        Multiscale results only (``sinkhorn(..., multiscale=...)``): certified
        bounds ``(rows, cols)`` on the plan mass that the block-sparse pattern
        drops, ``rows >= max_i sum_{j dropped} P_ij / a_i`` and likewise for
        the columns, at the final potentials (docs/multiscale.md); None for
        the dense solver, which drops nothing.
    multiscale_layout : tuple or None
        Multiscale results only: ``(cx, cy, pattern)``, the two clusterings and
        the kept cluster pairs that ``plan`` is built on
        (``otlinop.multiscale``).
    kept_entries : int or None
        Multiscale results only: the plan entries that the block-sparse
        soft-mins visited, one soft-min's worth per step (the g update visits
        as many), summed over the steps on the points: the measure of their
        work, which the re-pruning (``Multiscale.prune_tol``) shrinks.

    Notes
    -----
    Operators built from an unbatched result (``select(i)`` picks one
    problem of a batch): ``plan`` (the ``PlanOperator``), ``hessian()`` (the
    Schur complement ``S``), ``dual_hessian()`` (``K``) and
    ``loss_hessian(wrt)`` (the Hessian of the OT loss in the points). They
    are exact at converged potentials: check ``converged``, and solve to a
    small ``threshold`` when the second-order information must be accurate.

    ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``. OTT-JAX's potentials are
    ``f + eps log a`` and ``g + eps log b``; POT's ``log_u = (f + eps log a) / eps``.
    """

    f: torch.Tensor
    g: torch.Tensor
    eps: float
    n_iter: int
    converged: bool
    marginal_error: float
    a: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    cost_scale: float
    reach_x: float | None
    reach_y: float | None
    method: str
    eps_schedule: list
    f_pre: torch.Tensor | None = None
    g_pre: torch.Tensor | None = None
    backend: str | None = None
    precision: str | None = None
    marginal_error_history: list = field(default_factory=list)
    threshold: float = math.nan
    status: str = ""
    truncation_bound: tuple | None = None
    multiscale_layout: tuple | None = None
    kept_entries: int | None = None

    @property
    def rho_x(self):
        """``reach_x ** 2`` (None when balanced on x)."""
        return None if self.reach_x is None else self.reach_x ** 2

    @property
    def rho_y(self):
        """``reach_y ** 2`` (None when balanced on y)."""
        return None if self.reach_y is None else self.reach_y ** 2

    @property
    def batched(self) -> bool:
        return self.x.ndim == 3

    @property
    def cost(self) -> torch.Tensor:
        r"""The entropic OT value as GeomLoss computes it, a scalar tensor, or shape (B,) when batched.

        Balanced: the dual objective ``<a, f> + <b, g>``. A relaxed side
        contributes ``(rho + eps/2) <a, 1 - exp(-f/rho)>`` instead of
        ``<a, f>`` (GeomLoss' unbalanced formula, docs/math.md section 4).

        Notes
        -----
        With weights of total mass ``m = sum(a) = sum(b)`` and converged
        potentials (the plan ``P`` has marginals ``a`` and ``b``), the primal
        entropic objective is

            ``<P, C> + eps KL(P | a⊗b) = cost + eps (m^2 - m)``,

        ``KL(P | Q) = sum P log(P / Q) - sum P + sum Q``. The two agree for
        probability weights (m = 1, the default); for m = 2 the primal is
        ``cost + 2 eps``. (``cost`` omits the dual's term
        ``-eps <a⊗b, exp((f + g - C)/eps) - 1>``, which is ``-eps (m - m^2)``
        at convergence.) POT's ``ot.sinkhorn2`` returns the transport part
        ``<P, C>`` alone: :meth:`transport_cost`.

        Examples
        --------
        >>> import torch
        >>> from otlinop.sinkhorn import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> a, b = torch.full((30,), 2 / 30, dtype=torch.float64), torch.full((20,), 2 / 20, dtype=torch.float64)
        >>> res = sinkhorn(x, y, a, b, eps=0.5, method="alternating", threshold=1e-12)
        >>> P, C = res.plan.to_dense(), torch.cdist(x, y) ** 2
        >>> primal = (P * C).sum() + 0.5 * (P * (P / (a[:, None] * b)).log() - P + a[:, None] * b).sum()
        >>> bool(torch.isclose(primal, res.cost + 0.5 * (2 ** 2 - 2)))
        True
        """
        return _ot_value(self.f, self.g, self.a, self.b, self.eps, self.rho_x, self.rho_y)

    def transport_cost(self) -> torch.Tensor:
        r"""``<P, C> = sum_ij P_ij C_ij``, the transport part of the cost (POT's ``sinkhorn2`` value).

        Returns
        -------
        Tensor, shape () or (B,) when batched
            ``<P, C>`` for the plan of this result's potentials, in the
            potentials' dtype; one streaming pass over the plan (a product
            with ``d + 2`` columns), never an n x m buffer.

        Notes
        -----
        ``<P, C> = c sum_i [ (P 1)_i |x_i|^2 - 2 <x_i, (P y)_i> + (P |y|^2)_i ]``
        on points centred at their joint mean (the cost does not change, and
        the expansion does not cancel far from the origin). It is not
        :attr:`cost`: ``cost`` adds ``eps KL(P | a⊗b)`` (and, for weights of
        mass ``m != 1``, differs by ``eps (m^2 - m)``, see :attr:`cost`).

        Examples
        --------
        >>> import torch
        >>> from otlinop.sinkhorn import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
        >>> dense = (res.plan.to_dense() * torch.cdist(x, y) ** 2).sum()
        >>> bool(torch.isclose(res.transport_cost(), dense))
        True
        """
        dt = self.f.dtype
        x, y = self.x.to(dt), self.y.to(dt)
        centre = torch.cat([x, y], dim=-2).mean(-2, keepdim=True)
        x, y = x - centre, y - centre
        y2 = (y * y).sum(-1, keepdim=True)
        V = torch.cat([torch.ones_like(y2), y, y2], dim=-1)
        if self.multiscale_layout is not None:
            PV = self.plan @ V
        else:
            from .plan import plan_matmul
            PV = plan_matmul(x, y, self.f, self.g, V, eps=self.eps, a=self.a.to(dt), b=self.b.to(dt),
                             cost_scale=self.cost_scale, backend=self.backend, precision=self.precision)
        rows, Py, Py2 = PV[..., 0], PV[..., 1:-1], PV[..., -1]
        value = (rows * (x * x).sum(-1) - 2 * (x * Py).sum(-1) + Py2).sum(-1)
        return self.cost_scale * value

    def _unbatched(self, what: str, hint: str) -> None:
        """Raise the error of a per-problem operator asked of a batched result."""
        if self.batched:
            raise ValueError(f"SinkhornResult.{what}: this result holds a batch of {self.x.shape[0]} problems, "
                             f"but {hint}; use result.select(i).{what}")

    def _operator_arguments(self) -> tuple[tuple, dict]:
        """``(x, y, f, g)`` and the keywords shared by the plan and Hessian operators, in the
        potentials' dtype (points and weights may be half precision, the potentials are not)."""
        dt = self.f.dtype
        data = (self.x.to(dt), self.y.to(dt), self.f, self.g)
        return data, dict(eps=self.eps, a=self.a.to(dt), b=self.b.to(dt), cost_scale=self.cost_scale,
                          backend=self.backend, precision=self.precision)

    @property
    def plan(self):
        """The plan as a ``PlanOperator`` (n, m) built from (x, y, f, g, a, b).

        A multiscale result returns the block-sparse plan, a
        ``otlinop.multiscale.BlockSparsePlanOperator`` on its kept cluster pairs.

        Raises
        ------
        ValueError
            For a batched result: use ``result.select(i).plan`` or ``otlinop.plan.plan_matmul``.
        """
        if self.batched:
            raise ValueError(f"SinkhornResult.plan: this result holds a batch of {self.x.shape[0]} problems, "
                             "but a PlanOperator is one (n, m) plan; use result.select(i).plan, or "
                             "otlinop.plan.plan_matmul(x, y, f, g, V, eps=..., a=..., b=...) for a batch")
        if self.multiscale_layout is not None:
            from .multiscale import BlockSparsePlanOperator
            cx, cy, pattern = self.multiscale_layout
            dt = self.f.dtype
            return BlockSparsePlanOperator(cx, cy, pattern, self.f[cx.perm], self.g[cy.perm], eps=self.eps,
                                           a_s=self.a.to(dt)[cx.perm], b_s=self.b.to(dt)[cy.perm],
                                           cost_scale=self.cost_scale, backend=self.backend,
                                           precision=self.precision)
        from .plan import PlanOperator
        data, kw = self._operator_arguments()
        return PlanOperator(*data, **kw)

    def hessian(self, ridge=None):
        """The Schur complement ``S`` of the dual Hessian on ``g``, a ``HessianOperator`` (m, m).

        Parameters
        ----------
        ridge : float, optional
            Relative ridge ``tau`` (``tau * mean(P.T 1)`` on the diagonal);
            default ``otlinop.hessian.DEFAULT_RIDGE``, 0 disables it.

        Returns
        -------
        HessianOperator
            ``HessianOperator(x, y, f, g, eps=, a=, b=, cost_scale=, reach_x=,
            reach_y=, ridge=, backend=, precision=)`` with this result's data,
            in the potentials' dtype.

        Raises
        ------
        ValueError
            For a batched result: use ``result.select(i).hessian()``.

        Notes
        -----
        ``S = ky Diag(P.T 1) - P.T Diag(1 / (kx P 1)) P + ridge mean(P.T 1) I``
        (docs/math.md section 5). The operator is exact at converged potentials:
        ``status`` and ``marginal_error`` say how far from convergence they are
        (``threshold`` sets how far ``sinkhorn`` goes).

        Examples
        --------
        >>> import torch, solvers
        >>> from otlinop.sinkhorn import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-10)
        >>> S = res.hessian()
        >>> rhs = torch.randn(20, dtype=torch.float64); rhs -= rhs.mean()
        >>> S.shape, solvers.cg(S, rhs, M=solvers.jacobi(), rtol=1e-10).converged
        ((20, 20), True)
        """
        self._unbatched("hessian()", "a HessianOperator is the (m, m) Schur complement of one problem")
        from .hessian import HessianOperator
        if self.multiscale_layout is not None:
            return HessianOperator.from_plan(self.plan, eps=self.eps, reach_x=self.reach_x, reach_y=self.reach_y,
                                             ridge=ridge)
        data, kw = self._operator_arguments()
        return HessianOperator(*data, **kw, reach_x=self.reach_x, reach_y=self.reach_y, ridge=ridge)

    def dual_hessian(self, ridge=None):
        """The dual Hessian ``K`` (n + m, n + m), a ``DualHessianOperator``.

        Parameters
        ----------
        ridge : float, optional
            The relative ridge of its Schur complement (``K.schur``), used by
            ``K.solve``; as in :meth:`hessian`.

        Returns
        -------
        DualHessianOperator
            ``otlinop.hessian.dual_hessian(x, y, f, g, ...)`` with this
            result's data, in the potentials' dtype.

        Raises
        ------
        ValueError
            For a batched result: use ``result.select(i).dual_hessian()``.

        Notes
        -----
        ``K = [[kx Diag(P 1), P], [P.T, ky Diag(P.T 1)]]``: minus ``eps`` times
        the Hessian of the dual in ``(f, g)``, with ``k = (rho + eps) / rho`` on
        a relaxed side and 1 on a hard one (docs/math.md section 5).

        Examples
        --------
        >>> import torch, solvers
        >>> from otlinop.sinkhorn import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> res = sinkhorn(x, y, eps=0.5, reach=1.0, method="alternating", threshold=1e-10)
        >>> K = res.dual_hessian()
        >>> z, info = K.solve(torch.randn(50, dtype=torch.float64), M=solvers.neumann(3), rtol=1e-10)
        >>> K.shape, info.converged
        ((50, 50), True)
        """
        self._unbatched("dual_hessian()", "a DualHessianOperator is the (n + m, n + m) dual Hessian of "
                        "one problem")
        from .hessian import DualHessianOperator, dual_hessian
        if self.multiscale_layout is not None:
            return DualHessianOperator(self.plan, eps=self.eps, reach_x=self.reach_x, reach_y=self.reach_y,
                                       ridge=ridge)
        data, kw = self._operator_arguments()
        return dual_hessian(*data, **kw, reach_x=self.reach_x, reach_y=self.reach_y, ridge=ridge)

    def loss_hessian(self, wrt="x", **solver_options):
        """The Hessian of the OT loss in the points, a ``LossHessianOperator``.

        Parameters
        ----------
        wrt : {"x", "y", "xy"}, default "x"
            The variables: x (size n d), y (m d) or both ((n + m) d, x first).
        **solver_options
            Options of the inner Schur solve of each matvec, passed to
            ``otlinop.hvp.loss_hessian_operator``: ``solver`` (default
            ``solvers.cg``), ``M`` (e.g. ``solvers.jacobi()``,
            ``solvers.neumann(3)``), ``rtol``, ``atol``, ``maxiter``, ``ridge``.

        Returns
        -------
        LossHessianOperator
            Symmetric and indefinite (use MINRES for Newton systems); one
            matvec is one Hessian-vector product, ``.last_solve`` its inner
            ``SolveResult``.

        Raises
        ------
        ValueError
            For a batched result (use ``result.select(i).loss_hessian()``),
            or ``wrt`` not in {"x", "y", "xy"}.

        Notes
        -----
        ``H = E + R^T K^+ R / eps`` by implicit differentiation (docs/math.md
        section 6), exact at converged potentials. It is the Hessian of
        ``OT(a, b)`` only: for the debiased divergence of ``SamplesLoss``
        subtract ``otlinop.hvp.hvp_self`` terms, or differentiate the loss
        twice with autograd.

        Examples
        --------
        >>> import torch, solvers
        >>> from otlinop.sinkhorn import sinkhorn
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
        >>> H = res.loss_hessian(M=solvers.jacobi())
        >>> v = torch.randn(60, dtype=torch.float64)
        >>> (H @ v).shape, H.last_solve.converged
        (torch.Size([60]), True)
        """
        self._unbatched("loss_hessian()", "a LossHessianOperator is the Hessian of one problem")
        from .hvp import LossHessianOperator, loss_hessian_operator
        if self.multiscale_layout is not None:
            return LossHessianOperator.from_plan(self.plan, wrt=wrt, eps=self.eps, cost_scale=self.cost_scale,
                                                 reach_x=self.reach_x, reach_y=self.reach_y, **solver_options)
        data, kw = self._operator_arguments()
        return loss_hessian_operator(*data, **kw, reach_x=self.reach_x, reach_y=self.reach_y, wrt=wrt,
                                     **solver_options)

    def select(self, i: int) -> "SinkhornResult":
        """The i-th problem of a batched result, as an unbatched result.

        ``i`` is an int in ``[-B, B)`` for a batch of B problems (negative
        indices count from the end); IndexError outside it, TypeError for a
        non-integer.
        """
        if not self.batched:
            raise ValueError("SinkhornResult.select: this result is not batched")
        B = self.x.shape[0]
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"SinkhornResult.select: i must be an int (the index of a problem in the batch of "
                            f"{B}), got {type(i).__name__} {i!r}")
        if not -B <= i < B:
            raise IndexError(f"SinkhornResult.select: i={i} is out of range for a batch of {B} problems "
                             f"(valid: 0 to {B - 1}, or -{B} to -1 from the end)")
        i = int(i)
        pick = lambda t: None if t is None else t[i]  # noqa: E731
        return SinkhornResult(
            f=self.f[i], g=self.g[i], eps=self.eps, n_iter=self.n_iter, converged=self.converged,
            marginal_error=self.marginal_error, a=self.a[i], b=self.b[i], x=self.x[i], y=self.y[i],
            cost_scale=self.cost_scale, reach_x=self.reach_x, reach_y=self.reach_y, method=self.method,
            eps_schedule=list(self.eps_schedule), f_pre=pick(self.f_pre), g_pre=pick(self.g_pre),
            backend=self.backend, precision=self.precision,
            marginal_error_history=list(self.marginal_error_history), threshold=self.threshold,
            status=self.status)

    def __repr__(self) -> str:
        shape = f"batch={self.x.shape[0]}, " if self.batched else ""
        n, m = self.x.shape[-2], self.y.shape[-2]
        status = f", status={self.status!r}" if self.status else ""
        return (f"SinkhornResult({shape}n={n}, m={m}, method={self.method!r}, eps={self.eps:.4g}, "
                f"n_iter={self.n_iter}, converged={self.converged}, marginal_error={self.marginal_error:.2e}, "
                f"reach_x={self.reach_x}, reach_y={self.reach_y}, cost_scale={self.cost_scale}{status})")


def _side_value(w, h, eps: float, rho) -> torch.Tensor:
    """One side of GeomLoss' OT value: ``<w, h>`` or ``(rho + eps/2) <w, 1 - e^{-h/rho}>``."""
    if rho is None:
        return (w * h).sum(-1)
    return (rho + 0.5 * eps) * (w * (-torch.expm1(-h / rho))).sum(-1)


def _ot_value(f, g, a, b, eps: float, rho_x, rho_y) -> torch.Tensor:
    dt = f.dtype
    return _side_value(a.to(dt), f, eps, rho_x) + _side_value(b.to(dt), g, eps, rho_y)
