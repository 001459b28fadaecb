"""The Sinkhorn dual Hessian and its Schur complement, as compositions of
``PlanOperator`` and ``Diag``.

With ``ah = P 1`` and ``bh = P.T 1`` (the plan's marginals) and the relaxation
factors ``kx``, ``ky`` (``(rho + eps) / rho`` on a relaxed side, ``rho =
reach**2``; 1 on a hard one), minus ``eps`` times the Hessian of the dual
objective in ``(f, g)`` is

    K = [[kx Diag(ah), P     ],
         [P.T,         ky Diag(bh)]]

and its Schur complement on the target potential ``g`` is

    S = ky Diag(bh) - P.T @ Diag(1 / (kx ah)) @ P   (+ a small ridge).

``K z = r`` is solved through ``S`` (one Krylov solve of size m). See
``docs/hessian.md`` and ``docs/math.md`` section 5.
"""

from __future__ import annotations

import torch

from solvers import cg

from ._base import LinearOperator
from ._checks import nonnegative_scalar, positive_scalar, reach_or_none
from ._operators.concrete import BlockOperator, Diag
from ._operators.plan_product import recorded
from .kernels.plan_apply import plan_apply_prepared, plan_apply_validated
from .plan import PlanOperator, plan_operator_for

__all__ = ["HessianOperator", "DualHessianOperator", "dual_hessian", "DEFAULT_RIDGE"]

#: Default relative ridge: ``S`` gets ``DEFAULT_RIDGE * mean(P.T 1)`` on its diagonal.
#: It moves an HVP by about ``DEFAULT_RIDGE / gap`` (relative), where ``gap`` is
#: the spectral gap of the normalised plan (``lambda_2(S) / mean(bh)``), which is
#: above 1e-3 on the problems the tests and benchmarks cover: well under 1e-6.
DEFAULT_RIDGE = 1e-9


def schur_diagonal(D: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """``diag(S) = D - N`` with ``N_jj = sum_i P_ij^2 / (kx ah_i)``, as the arithmetic resolves it.

    ``N_jj <= D_j`` in exact arithmetic, and ``D_j - N_jj`` can be ~0 (a column whose mass one
    row holds): rounding, a few ``u (D_j + N_jj)``, may then make it negative (float32: -1e-6 D_j
    on a near-permutation plan; -2.6e-10 at n = 10k, eps = 0.5), which Jacobi refuses. An entry
    below ``u (D_j + N_jj)`` is not resolved: it is returned as that bound, positive.
    """
    return torch.maximum(D - N, torch.finfo(N.dtype).eps * (D + N))


def row_weight(row_scale: torch.Tensor) -> torch.Tensor:
    """``1 / row_scale`` where ``row_scale = kx ah`` is positive, 0 where it is 0.

    A point of zero weight (``a_i = 0``, documented as allowed) has a zero row in
    P, hence ``ah_i = 0``: it carries no plan mass and its row of K is zero. Its
    term ``P_i.T P_i / (kx ah_i)`` in the Schur complement is then exactly 0 (so
    is the back-substituted ``z1_i``, the minimum-norm choice for a zero row), not
    ``0 * inf``. The denominator is made safe first so that autograd through
    ``to_linear_operator`` sees no infinite branch either."""
    positive = row_scale > 0
    return positive.to(row_scale.dtype) / torch.where(positive, row_scale, torch.ones_like(row_scale))


def hessian_options(owner: str, eps, reach_x, reach_y, ridge, *,
                    reach_names: tuple = ("reach_x", "reach_y")) -> tuple:
    """``(eps, kx, ky, ridge)`` from the arguments of a dual Hessian, checked
    for the public function ``owner`` (``reach_names``: what it calls the two
    relaxations).

    ``k = (rho + eps) / rho`` (``rho = reach**2``) on a relaxed side, 1 on a
    hard one (``reach`` None or inf); ``ridge`` None is ``DEFAULT_RIDGE``.

    Raises
    ------
    TypeError, ValueError
        If ``eps`` or a reach is not a positive number, or ``ridge`` not a
        non-negative one.
    """
    eps = positive_scalar(owner, "eps", eps)
    ks = []
    for name, reach in zip(reach_names, (reach_x, reach_y)):
        reach = reach_or_none(owner, name, reach)
        rho = None if reach is None else reach ** 2
        ks.append(1.0 if rho is None else (rho + eps) / rho)
    ridge = DEFAULT_RIDGE if ridge is None else nonnegative_scalar(owner, "ridge", ridge)
    return eps, ks[0], ks[1], ridge


class HessianOperator(LinearOperator):
    r"""The Schur complement of the Sinkhorn dual Hessian on the potential g.

    ``S = ky Diag(P.T 1) - P.T @ Diag(1 / (kx P 1)) @ P + ridge * mean(P.T 1) * I``

    Parameters
    ----------
    x : Tensor, shape (n, d)
    y : Tensor, shape (m, d)
    f : Tensor, shape (n,)
    g : Tensor, shape (m,)
        Converged dual potentials (GeomLoss convention) of the problem.
    eps : float
        The entropic regularisation (``blur**2`` in GeomLoss).
    a : Tensor, shape (n,), optional
    b : Tensor, shape (m,), optional
        Weights, as in ``PlanOperator`` (None means ones: OTT-convention
        potentials); pass ``result.a``, ``result.b`` of ``otlinop.sinkhorn``.
    cost_scale : float, default 1.0
        ``C = cost_scale * |x - y|^2`` (GeomLoss' ``p=2`` uses 0.5).
    reach_x, reach_y : float, optional
        Marginal relaxation of each side (``rho = reach**2``); None for a hard
        constraint.
    ridge : float, optional
        Relative ridge ``tau``: ``tau * mean(P.T 1)`` is added to the
        diagonal, so the ridge scales with the problem. Default
        ``DEFAULT_RIDGE`` (1e-9), which biases HVPs by about ``tau / gap``
        relative (``gap = lambda_2(S) / mean(bh)``); 0 disables it.
    backend, precision : optional
        Passed to ``PlanOperator``.

    Notes
    -----
    * Shape (m, m). Symmetric positive semi-definite (``is_symmetric``,
      ``is_psd``); its own adjoint.
    * Null space: the constants when both marginals are hard and
      ``ridge == 0`` (``S 1 = 0``: ``bh - P.T 1 = 0``); none (PD) when a side
      is relaxed or ``ridge > 0``. For balanced problems a right-hand side
      orthogonal to 1 (as in ``DualHessianOperator.solve``) keeps CG in
      ``range(S)``.
    * One matvec costs 2 streaming plan passes (``P``, then ``P.T``): O(nm(d +
      k)) time for k columns, O((n + m)(d + k)) memory.
    * ``splitting()`` returns ``D = ky P.T 1 + ridge`` and ``N = P.T
      Diag(1/(kx P 1)) P`` (``S = Diag(D) - N``, ``rho(D^-1 N) <= 1``) for
      ``solvers.neumann``; ``diagonal()`` is the exact diagonal ``D_j -
      sum_i P_ij^2 / (kx ah_i)`` (one pass over ``P∘P``) for ``solvers.jacobi``.

    Examples
    --------
    >>> import torch, solvers
    >>> from otlinop.sinkhorn import sinkhorn
    >>> from otlinop.hessian import HessianOperator
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    >>> res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-10)
    >>> S = HessianOperator(x, y, res.f, res.g, eps=res.eps, a=res.a, b=res.b)
    >>> rhs = torch.randn(20, dtype=torch.float64); rhs -= rhs.mean()   # balanced: rhs orthogonal to 1
    >>> out = solvers.cg(S, rhs, M=solvers.neumann(3), rtol=1e-10)
    >>> out.converged, torch.allclose(S @ out.x, rhs, atol=1e-8)
    (True, True)
    """

    is_symmetric = True
    is_psd = True

    def __init__(self, x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None,
                 reach_y=None, ridge=None, backend=None, precision=None):
        owner = "HessianOperator"
        options = hessian_options(owner, eps, reach_x, reach_y, ridge)
        P = plan_operator_for(owner, x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale, backend=backend,
                              precision=precision)
        self._build(P, *options)

    @classmethod
    def from_plan(cls, P: PlanOperator, *, eps, reach_x=None, reach_y=None, ridge=None) -> "HessianOperator":
        """The same operator built on an existing plan (reusing its cached marginals)."""
        return cls._on_plan(P, hessian_options("HessianOperator.from_plan", eps, reach_x, reach_y, ridge))

    @classmethod
    def _on_plan(cls, P, options: tuple) -> "HessianOperator":
        self = cls.__new__(cls)
        self._build(P, *options)
        return self

    def _build(self, P, eps: float, kx: float, ky: float, ridge: float):
        ah, bh = P.row_sums(), P.col_sums()
        self.P, self.eps, self.kx, self.ky = P, eps, kx, ky
        self._options = (eps, kx, ky, ridge)
        self.shift = ridge * bh.mean()
        self.D = ky * bh + self.shift
        # 1 / (kx ah), and 0 on the rows of zero mass (row_weight says why).
        self._row_weight = row_weight(kx * ah)
        # Both diagonals are non-negative by construction (plan marginals, kx, ky > 0):
        # saying so spares the host a read-back each.
        self.N = P.T @ Diag(self._row_weight, psd=True) @ P
        self._S = Diag(self.D, psd=True) - self.N
        # A plan that offers the fused product (TruncatedPlanOperator) applies S in two
        # launches instead of five; a streaming plan in two passes and one multiply-subtract
        # (_DenseSchur), and so does its N (_SchurRemainder). The compositions above serve the
        # products that autograd, forward AD or torch.func record.
        self._fused = getattr(P, "schur_product", None)
        if self._fused is None and type(P) is PlanOperator:
            self._fused = _DenseSchur(P, self._row_weight)
            # N as neumann() applies it (terms times per preconditioning), in the same two passes.
            self.N = _SchurRemainder(self.N, self._fused)
        super().__init__((P.shape[1], P.shape[1]), P.dtype, P.device, is_symmetric=True, is_psd=True)

    def _matmat(self, V):
        out = None if self._fused is None else self._fused(V, self._row_weight, self.D)
        return self._S._matmat(V) if out is None else out

    def _matvec(self, v):
        out = None if self._fused is None else self._fused(v, self._row_weight, self.D)
        return self._S._matvec(v) if out is None else out

    def _diagonal(self):
        return schur_diagonal(self.D, self.P.squared().T @ self._row_weight)

    def splitting(self):
        return self.D, self.N

    # What to_linear_operator rebuilds on other tensors (otlinop._interop_linop).
    def _parts(self):
        return (self.P,)

    def _from_parts(self, parts, *, dtype, device):
        return HessianOperator._on_plan(parts[0], self._options)


class _DenseSchur:
    """``diag * V - P.T @ (w * (P @ V))`` on a streaming ``PlanOperator``: two plan passes
    and one multiply-subtract, where the composition ``Diag(D) - P.T @ Diag(w) @ P``
    launches the two passes, two logarithms of the weights per pass and three elementwise
    products. The row weights ``w`` join the first pass's log-weights (``log a + log w``:
    ``w_i (P V)_i`` is the product of the plan whose weights are ``a w``), and the
    logarithms are taken once, here, when ``HessianOperator`` is built: a snapshot, as its
    ``D`` and ``w`` are. A product that autograd, forward-mode AD or torch.func must record
    takes the composition (``None`` is returned)."""

    def __init__(self, P: PlanOperator, row_weight: torch.Tensor):
        self.P, self.row_weight = P, row_weight
        a, b = P.weights
        with torch.no_grad():
            log_w = torch.log(row_weight)       # -inf on rows of zero mass: zero rows of w * P
            self.log_a = None if a is None else torch.log(a)
            self.log_b = None if b is None else torch.log(b)
            self.log_rows = log_w if a is None else self.log_a + log_w
        # The two passes' checks of the plan's data, once (the operand is checked by the operator's
        # matvec: its shape, dtype and device are those of the plan's columns).
        self._rows = plan_apply_prepared(P.x, P.y, P.f, P.g, eps=P.eps, log_a=self.log_rows, log_b=self.log_b,
                                         cost_scale=P.cost_scale)
        self._cols = plan_apply_prepared(P.y, P.x, P.g, P.f, eps=P.eps, log_a=self.log_b, log_b=self.log_a,
                                         cost_scale=P.cost_scale)

    def _recorded(self, *tensors) -> bool:
        P = self.P
        return recorded(P.x, P.y, P.f, P.g, P.weights[0], P.weights[1], self.row_weight, *tensors)

    def _passes(self, V):
        """``P.T @ (w * (P @ V))``: the two plan passes."""
        P = self.P
        kernel = dict(backend=P.backend, precision=P.precision)
        geo, eps, cost_scale = self._rows
        U = plan_apply_validated(geo, P.x, P.y, P.f, P.g, V, log_a=self.log_rows, log_b=self.log_b, eps=eps,
                                 cost_scale=cost_scale, **kernel)
        geo, eps, cost_scale = self._cols
        return plan_apply_validated(geo, P.y, P.x, P.g, P.f, U, log_a=self.log_b, log_b=self.log_a, eps=eps,
                                    cost_scale=cost_scale, **kernel)

    def congruence(self, V):
        """``N V = P.T @ (w * (P @ V))`` (the splitting's remainder), or None where it must be recorded."""
        return None if self._recorded(V) else self._passes(V)

    def __call__(self, V, row_weight, diag):
        if self._recorded(V, row_weight, diag):
            return None
        return (diag if V.ndim == 1 else diag[:, None]).mul(V).sub_(self._passes(V))


class _SchurRemainder(LinearOperator):
    """``N = P.T @ Diag(w) @ P`` of ``HessianOperator.splitting()`` on a streaming plan: its
    products are ``_DenseSchur``'s two passes, the composition ``composed`` where autograd,
    forward AD or torch.func must record them. Symmetric PSD (a congruence)."""

    def __init__(self, composed: LinearOperator, fused: _DenseSchur):
        super().__init__(composed.shape, composed.dtype, composed.device, is_symmetric=True, is_psd=True)
        self._composed, self._fused = composed, fused

    def _matvec(self, v):
        out = self._fused.congruence(v)
        return self._composed._matvec(v) if out is None else out

    def _matmat(self, V):
        out = self._fused.congruence(V)
        return self._composed._matmat(V) if out is None else out

    # What to_linear_operator rebuilds on other tensors: the composition.
    def _parts(self):
        return (self._composed,)

    def _from_parts(self, parts, *, dtype, device):
        return parts[0]


class DualHessianOperator(BlockOperator):
    r"""``K = [[kx Diag(P 1), P], [P.T, ky Diag(P.T 1)]]``: minus ``eps`` times
    the Hessian of the Sinkhorn dual in ``(f, g)``.

    Built with ``dual_hessian(...)`` or ``DualHessianOperator(P, eps=...)``
    from a ``PlanOperator``.

    Notes
    -----
    * Shape (n + m, n + m); symmetric PSD.
    * Null space: ``(1, -1)`` when both marginals are hard; none otherwise.
    * One matvec: 2 plan passes. ``solve`` goes through the Schur complement
      ``schur`` (a ``HessianOperator``, which carries the ridge).
    """

    def __init__(self, P: PlanOperator, *, eps, reach_x=None, reach_y=None, ridge=None):
        self._setup(P, hessian_options("DualHessianOperator", eps, reach_x, reach_y, ridge))

    def _setup(self, P, options: tuple):
        self.schur = HessianOperator._on_plan(P, options)
        kx, ky = self.schur.kx, self.schur.ky
        self.P, self.eps = P, self.schur.eps
        self._row_scale = kx * P.row_sums()          # kx ah: the (1, 1) block
        # Dividing by kx ah row by row (as before, bit for bit) on the rows of positive
        # mass; a row of zero mass gives 0 (row_weight says why).
        self._has_mass = (self._row_scale > 0).to(self._row_scale.dtype)
        self._safe_scale = torch.where(self._row_scale > 0, self._row_scale, torch.ones_like(self._row_scale))
        super().__init__([[Diag(self._row_scale, psd=True), P], [P.T, Diag(ky * P.col_sums(), psd=True)]],
                         is_symmetric=True)
        self.is_psd = True

    # What to_linear_operator rebuilds on other tensors (otlinop._interop_linop): the plan, not
    # the blocks, whose diagonals are derived from it (and must be derived again, with a graph).
    def _parts(self):
        return (self.P,)

    def _from_parts(self, parts, *, dtype, device):
        rebuilt = DualHessianOperator.__new__(DualHessianOperator)
        rebuilt._setup(parts[0], self.schur._options)
        return rebuilt

    def solve(self, r: torch.Tensor, *, solver=cg, M=None, **options):
        r"""A solution of ``K z = r`` through the Schur complement.

        ``S z2 = r2 - P.T (r1 / (kx ah))``, then ``z1 = (r1 - P z2) / (kx ah)``;
        on a row of zero mass (``a_i = 0``: ``ah_i = 0``, a zero row of P and K)
        the division is replaced by 0, so ``z1_i = 0``.

        Parameters
        ----------
        r : Tensor, shape (n + m,) or (n + m, k)
        solver : callable, default ``solvers.cg``
            ``solver(S, rhs, M=M, **options)`` returning a ``SolveResult``.
        M : preconditioner for S, optional
            An operator or a factory such as ``solvers.neumann(3)``.
        **options
            ``rtol``, ``atol``, ``maxiter``, ``x0``, ``callback``, passed on.

        Returns
        -------
        z : Tensor, shape of r
        result : SolveResult of the inner solve on S

        Notes
        -----
        With hard marginals K is singular; a consistent r (``sum r1 == sum
        r2``, true of ``R A`` in the HVP) has solutions ``z + c (1, -1)``, all
        equally good where ``(1, -1)`` is in the null space of what follows.
        Costs 2 plan passes plus the solve (2 per iteration, plus the
        preconditioner's).
        """
        n = self.P.shape[0]
        if not isinstance(r, torch.Tensor) or r.ndim not in (1, 2) or r.shape[0] != self.shape[0]:
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"DualHessianOperator.solve: r must have shape ({self.shape[0]},) or "
                             f"({self.shape[0]}, k) (n + m rows), got {got}")
        r1, r2 = r[:n], r[n:]
        scale, mass = self._safe_scale, self._has_mass
        if r.ndim == 2:
            scale, mass = scale[:, None], mass[:, None]
        result = solver(self.schur, r2 - self.P.T @ (r1 / scale * mass), M=M, **options)
        z2 = result.x
        z1 = (r1 - self.P @ z2) / scale * mass
        return torch.cat([z1, z2]), result


def dual_hessian(x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, reach_x=None, reach_y=None,
                 ridge=None, backend=None, precision=None) -> DualHessianOperator:
    """The dual Hessian ``K`` (a ``DualHessianOperator``) of the problem with
    potentials ``(f, g)``; the arguments are those of ``HessianOperator``.

    Examples
    --------
    >>> import torch, solvers
    >>> from otlinop.sinkhorn import sinkhorn
    >>> from otlinop.hessian import dual_hessian
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    >>> res = sinkhorn(x, y, eps=0.5, reach=1.0, method="alternating", threshold=1e-10)
    >>> K = dual_hessian(x, y, res.f, res.g, eps=res.eps, a=res.a, b=res.b, reach_x=1.0, reach_y=1.0)
    >>> r = torch.randn(50, dtype=torch.float64)
    >>> z, info = K.solve(r, M=solvers.jacobi(), rtol=1e-10)
    >>> info.converged, torch.allclose(K @ z, r, atol=1e-8)
    (True, True)
    """
    owner = "dual_hessian"
    options = hessian_options(owner, eps, reach_x, reach_y, ridge)
    P = plan_operator_for(owner, x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale, backend=backend,
                          precision=precision)
    K = DualHessianOperator.__new__(DualHessianOperator)
    K._setup(P, options)
    return K
