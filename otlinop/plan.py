"""The entropic transport plan as a matrix-free operator.

``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` with the squared Euclidean
cost ``C_ij = c |x_i - y_j|^2`` (``c = cost_scale``). ``P`` is never stored:
every product streams over tiles of the cost through the kernels of
``otlinop.kernels`` (Triton on CUDA, torch elsewhere).

Two public entry points:

- ``plan_matmul``: the differentiable function ``P @ V`` (batched inputs
  allowed), with gradients w.r.t. ``V, f, g, x, y, a, b`` computed by the same
  streaming kernels (it lives in ``otlinop._operators.plan_product``, with
  ``transport_gradient``; both are exported here);
- ``PlanOperator``: ``P`` as a ``LinearOperator`` of shape (n, m), with
  ``P.T``, cached marginals, ``to_dense()``, ``diagonal()``, ``squared()``
  (``P∘P``), ``bilinear()`` and ``truncated()``.
"""

from __future__ import annotations

import torch

from ._base import LinearOperator
from ._checks import Geometry, matrix
from ._operators.concrete import Diag
from ._operators.plan_product import PlanMatmul, plan_matmul, recorded, transport_gradient, validated_plan_data
from .kernels.plan_apply import plan_apply
from .kernels.plan_bilinear import plan_bilinear
from .marginals import plan_marginals

__all__ = ["PlanOperator", "plan_matmul", "transport_gradient"]

#: ``to_dense`` refuses plans with more entries than this (400 MB in float64).
_DENSE_LIMIT = 50_000_000

#: ``to_dense`` builds row blocks whose ``(rows, m, d)`` difference tensor has at most this many entries.
_DENSE_BLOCK = 1 << 22



class PlanOperator(LinearOperator):
    """The entropic transport plan ``P`` as a matrix-free operator, shape (n, m).

    Parameters
    ----------
    x : Tensor, shape (n, d)
        Source points.
    y : Tensor, shape (m, d)
        Target points (same d, dtype and device as x).
    f : Tensor, shape (n,)
        Source potential.
    g : Tensor, shape (m,)
        Target potential.
    eps : float
        Entropic regularisation, > 0.
    a : Tensor, shape (n,), optional
        Source weights (not logs), >= 0, zeros allowed; None means ones.
    b : Tensor, shape (m,), optional
        Target weights, likewise.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    backend : {None, "auto", "torch", "triton"}
        None or "auto" picks Triton for CUDA float16/bfloat16/float32 tensors, torch otherwise.
    precision : optional
        Passed to the kernels.

    Raises
    ------
    TypeError
        For non-tensor data, mismatched dtypes, or an ``eps`` that requires grad.
    ValueError
        For mismatched shapes or devices, non-finite data, negative weights,
        ``eps <= 0``, ``cost_scale <= 0`` or an unknown backend.

    Notes
    -----
    ``P_ij = a_i b_j exp((f_i + g_j - c |x_i - y_j|^2) / eps)``. With ``a, b``
    given, ``(f, g)`` are GeomLoss-convention potentials; with ``a = b = None``
    they are OTT-convention ones (``f + eps log a``).

    - Adjoint: yes. ``P.T`` is a ``PlanOperator`` with ``(x, f, a)`` and
      ``(y, g, b)`` swapped (the same kernel), and ``P.T.T is P``, so
      ``P.T @ Diag(w) @ P`` is recognised as symmetric PSD.
    - Symmetry: none in general. When ``x is y``, ``f is g`` and ``a is b``
      (the debiasing plan ``P_aa``), ``P`` is declared symmetric PSD: it is
      ``Diag(a e^{f/eps}) K Diag(a e^{f/eps})`` with ``K`` a Gaussian kernel.
    - Null space: ``P = Diag(a e^{f/eps}) K Diag(b e^{g/eps})`` with ``K`` the
      Gaussian kernel matrix, so it contains ``e_j`` for every ``b_j = 0`` and
      has dimension at least ``m - n``; for generic distinct points and positive
      weights it is nothing more. Numerically, P is ill-conditioned for small eps.
    - Cost of one matvec: O(nm(d + k)) time for k right-hand sides,
      O((n + m)(d + k)) memory (one streaming pass over the cost tiles).
    - Gradients flow through ``P @ V`` to ``V, x, y, f, g, a, b`` (see
      ``plan_matmul``).
    - ``row_sums()`` and ``col_sums()`` are cached when they carry no autograd
      graph; the operator assumes its tensors are not modified in place.

    Examples
    --------
    >>> import torch
    >>> from otlinop.plan import PlanOperator
    >>> x = torch.randn(6, 2, dtype=torch.float64); y = torch.randn(5, 2, dtype=torch.float64)
    >>> P = PlanOperator(x, y, torch.zeros(6, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), eps=1.0)
    >>> P.shape, P.T.shape, P.T.T is P
    ((6, 5), (5, 6), True)
    >>> torch.allclose(P @ torch.ones(5, dtype=torch.float64), P.row_sums())
    True
    """

    def __init__(self, x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None):
        opts = validated_plan_data("PlanOperator", x, y, f, g, None, a, b, eps, cost_scale, backend, precision,
                                   batched=False, finite_potentials=True,
                                   hint="use plan_matmul for batched point clouds")
        eps, cost_scale, backend, precision = opts
        self._setup(x, y, f, g, eps, a, b, cost_scale, backend, precision)

    def _setup(self, x, y, f, g, eps, a, b, cost_scale, backend, precision, transpose_of=None):
        symmetric = x is y and f is g and a is b
        super().__init__((x.shape[0], y.shape[0]), x.dtype, x.device, is_symmetric=symmetric, is_psd=symmetric,
                         transpose_of=transpose_of)
        self.x, self.y, self.f, self.g = x, y, f, g
        self.eps, self.cost_scale = eps, cost_scale
        self.backend, self.precision = backend, precision
        self._a, self._b = a, b
        self._row_sums: torch.Tensor | None = None

    @classmethod
    def _unchecked(cls, x, y, f, g, eps, a, b, cost_scale, backend, precision,
                   transpose_of=None) -> "PlanOperator":
        """Build from data already validated (transposes, squares)."""
        op = cls.__new__(cls)
        op._setup(x, y, f, g, eps, a, b, cost_scale, backend, precision, transpose_of)
        return op

    # ------------------------------------------------------------ attributes
    @property
    def a(self) -> torch.Tensor:
        """Source weights, shape (n,) (ones when none were given)."""
        return self._a if self._a is not None else self.x.new_ones(self.shape[0])

    @property
    def b(self) -> torch.Tensor:
        """Target weights, shape (m,) (ones when none were given)."""
        return self._b if self._b is not None else self.y.new_ones(self.shape[1])

    @property
    def log_a(self) -> torch.Tensor:
        """``log a``, shape (n,), ``-inf`` where ``a = 0``."""
        return torch.log(self._a) if self._a is not None else self.x.new_zeros(self.shape[0])

    @property
    def log_b(self) -> torch.Tensor:
        """``log b``, shape (m,), ``-inf`` where ``b = 0``."""
        return torch.log(self._b) if self._b is not None else self.y.new_zeros(self.shape[1])

    @property
    def weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(a, b)`` as given to the constructor: None for a side without weights
        (where ``a``, ``b`` give ones); the kernels skip a None weight."""
        return self._a, self._b

    def _kernel_options(self) -> dict:
        return dict(eps=self.eps, cost_scale=self.cost_scale, backend=self.backend, precision=self.precision)

    # ----------------------------------------------------------------- hooks
    def _apply(self, V):
        """(m,) or (m, k) -> (n,) or (n, k); V=None gives P 1."""
        if not recorded(self.x, self.y, self.f, self.g, V, self._a, self._b):
            # Nothing to differentiate: the Function's computation, with the weights' logarithms
            # taken once per operator (two launches a product less).
            log_a, log_b = self._log_weights()
            return plan_apply(self.x, self.y, self.f, self.g, V, log_a=log_a, log_b=log_b, **self._kernel_options())
        return PlanMatmul.apply(self.x, self.y, self.f, self.g, V, self._a, self._b, self.eps, self.cost_scale,
                                self.backend, self.precision)

    def _log_weights(self) -> tuple:
        """``(log a, log b)`` (None where a weight is absent), kept while the weights (tensors the
        operator holds) keep their version: an in-place change recomputes them."""
        weights = (self._a, self._b)
        if any(w is not None and w.is_inference() for w in weights):     # (no version counter)
            return tuple(None if w is None else torch.log(w) for w in weights)
        key = tuple(None if w is None else (id(w), w._version) for w in weights)
        cached = getattr(self, "_logs", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, tuple(None if w is None else torch.log(w) for w in weights))
            self._logs = cached
        return cached[1]

    def _matvec(self, v):
        return self._apply(v)

    def _matmat(self, V):
        return self._apply(V)

    def _rmatvec(self, u):
        return self.adjoint()._matvec(u)

    def _rmatmat(self, U):
        return self.adjoint()._matmat(U)

    def _adjoint(self) -> "PlanOperator":
        if self.is_symmetric:
            return self
        return PlanOperator._unchecked(self.y, self.x, self.g, self.f, self.eps, self._b, self._a,
                                       self.cost_scale, self.backend, self.precision, transpose_of=self)

    def _diagonal(self):
        k = min(self.shape)
        logits = (self.f[:k] + self.g[:k] - self.cost_scale * (self.x[:k] - self.y[:k]).pow(2).sum(-1)) / self.eps
        P_ii = torch.exp(logits)
        if self._a is not None:
            P_ii = self._a[:k] * P_ii
        if self._b is not None:
            P_ii = P_ii * self._b[:k]
        return P_ii

    # What to_linear_operator rebuilds on other tensors (otlinop._interop_linop).
    def _parts(self):
        return (self.x, self.y, self.f, self.g, self._a, self._b)

    def _from_parts(self, parts, *, dtype, device):
        x, y, f, g, a, b = parts
        return PlanOperator._unchecked(x, y, f, g, self.eps, a, b, self.cost_scale, self.backend, self.precision)

    # ---------------------------------------------------------------- public
    def row_sums(self) -> torch.Tensor:
        """``P 1``, shape (n,): the first marginal (cached when it carries no autograd graph)."""
        if self._row_sums is not None:
            return self._row_sums
        r = self._apply(None)
        if not r.requires_grad:
            self._row_sums = r
        return r

    def cached_row_sums(self) -> torch.Tensor | None:
        """``P 1`` if ``row_sums()`` has computed and cached it, else None (no plan pass)."""
        return self._row_sums

    def col_sums(self) -> torch.Tensor:
        """``P.T 1``, shape (m,): the second marginal (cached on ``P.T``)."""
        return self.adjoint().row_sums()

    def marginals(self) -> tuple[Diag, Diag]:
        """``(Diag(P 1), Diag(P.T 1))``, the diagonal blocks of the dual Hessian."""
        return plan_marginals(self)

    def truncated(self, tol: float = 1e-8, *, max_fill: float = 0.25, capacity: int | None = None):
        """P without its negligible entries: a sparse ``TruncatedPlanOperator``.

        Parameters
        ----------
        tol : float in (0, 1), default 1e-8
            Entries with ``P_ij < tol * sqrt(ah_i bh_j / (n m))`` are dropped
            (``ah = P 1``, ``bh = P.T 1``): the dropped part ``E`` has
            ``||Diag(ah)^-1/2 E Diag(bh)^-1/2||_2 <= tol``, where the same
            scaling of P has norm 1 (``otlinop.truncated``).
        max_fill : float in (0, 1], default 0.25
            When a row would keep more than this fraction of its m entries, the
            sparse layout would not pay: P itself is returned. So it is when
            the padded layout (rows x the fullest row's entries) would exceed
            ``otlinop.truncated.MAX_LAYOUT_ENTRIES`` (2^28) slots.
        capacity : int, optional
            Slots per row of the first pass (default 256); a fuller row costs
            one more pass.

        Returns
        -------
        TruncatedPlanOperator or PlanOperator
            The sparse operator, or ``self`` when the plan is too dense.

        Notes
        -----
        Costs the two marginals (the cached ones, else one fused pass of
        ``softmin_pair``), one or two streaming passes of ``plan_truncate``
        and a sort (the transpose, on first use); the result's products cost
        O(nnz k). The layout is a snapshot: it carries
        no gradient to the points or potentials. Pays when eps is small
        against the spread of the costs (e.g. d = 64, eps = 0.5: about 1% of
        the entries kept at tol = 1e-8); at d = 3, eps = 0.5 most entries are
        significant and P itself comes back.

        Examples
        --------
        >>> import torch
        >>> from otlinop.plan import PlanOperator
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(300, 32, dtype=torch.float64), torch.randn(200, 32, dtype=torch.float64)
        >>> P = PlanOperator(x, y, torch.zeros(300, dtype=torch.float64), torch.zeros(200, dtype=torch.float64),
        ...                  eps=0.5)
        >>> Pt = P.truncated(1e-8)
        >>> Pt.fill < 0.05, torch.allclose(Pt @ torch.ones(200, dtype=torch.float64), P.row_sums(), rtol=1e-7)
        (True, True)
        """
        from .truncated import truncate_plan_for
        return truncate_plan_for("PlanOperator.truncated", self, tol, max_fill=max_fill, capacity=capacity)

    def squared(self) -> "PlanOperator":
        """The plan of ``P∘P`` (entrywise square), shape (n, m).

        ``P_ij^2 = a_i^2 b_j^2 exp((f_i + g_j - C_ij) / (eps/2))``: the same
        points and potentials with ``eps/2`` and squared weights. Used for exact
        Jacobi diagonals, e.g. ``sum_i P_ij^2 w_i = P.squared().T @ w``.
        """
        sq = lambda w: None if w is None else w * w  # noqa: E731
        return PlanOperator._unchecked(self.x, self.y, self.f, self.g, self.eps / 2, sq(self._a), sq(self._b),
                                       self.cost_scale, self.backend, self.precision)

    def bilinear(self, W: torch.Tensor, V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``out_i = sum_j P_ij <W_i, V_j> Y_j``, one streaming pass.

        Parameters
        ----------
        W : Tensor, shape (n, k)
        V : Tensor, shape (m, k)
        Y : Tensor, shape (m, e)

        Returns
        -------
        Tensor, shape (n, e)
            Computed under ``torch.no_grad()``: the result carries no autograd
            graph (it serves analytic Hessian-vector products, such as the
            ``Q y`` term with ``Q_ij = P_ij <A_i, y_j>``).

        Notes
        -----
        O(nm(k + e)) time, O((n + m)(k + e)) memory.
        """
        n, m = self.shape
        geo = Geometry("PlanOperator.bilinear", False, 1, n, m, self.x.shape[1], self.dtype, self.device, ref="P")
        matrix(geo, "W", W, n)
        matrix(geo, "V", V, m, W.shape[1], what="as many columns as W: <W_i, V_j>")
        matrix(geo, "Y", Y, m, cols_name="e")
        with torch.no_grad():
            log_a = None if self._a is None else torch.log(self._a)
            log_b = None if self._b is None else torch.log(self._b)
            return plan_bilinear(self.x, self.y, self.f, self.g, W, V, Y, log_a=log_a, log_b=log_b,
                                 **self._kernel_options())

    def to_dense(self) -> torch.Tensor:
        """The (n, m) matrix, built in row blocks with torch ops (differentiable).

        Raises
        ------
        ValueError
            When ``n * m`` exceeds 5e7 entries.
        """
        n, m = self.shape
        if n * m > _DENSE_LIMIT:
            raise ValueError(f"PlanOperator.to_dense: the plan has {n} x {m} = {n * m:.3g} entries, more "
                             f"than the limit {_DENSE_LIMIT:.0e}; use matvecs (P @ v, P.T @ u) instead")
        d = max(1, self.x.shape[1])
        rows = max(1, _DENSE_BLOCK // max(1, m * d))
        blocks = []
        for start in range(0, n, rows):
            x, f = self.x[start:start + rows], self.f[start:start + rows]
            C = self.cost_scale * (x.unsqueeze(1) - self.y.unsqueeze(0)).pow(2).sum(-1)
            # Weights multiply rather than enter as logs: the gradient of log at a zero weight is inf.
            block = torch.exp((f.unsqueeze(1) + self.g.unsqueeze(0) - C) / self.eps)
            if self._a is not None:
                block = self._a[start:start + rows].unsqueeze(1) * block
            if self._b is not None:
                block = block * self._b.unsqueeze(0)
            blocks.append(block)
        if not blocks:
            return self.x.new_zeros((n, m))
        return torch.cat(blocks, dim=0)


def plan_operator_for(owner: str, x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None,
                      precision=None) -> PlanOperator:
    """``PlanOperator(x, y, f, g, ...)`` built for the public function ``owner``
    (``hvp_x``, ``HessianOperator``, ...): the same checks, with errors that
    name ``owner``."""
    eps, cost_scale, backend, precision = validated_plan_data(owner, x, y, f, g, None, a, b, eps, cost_scale,
                                                              backend, precision, batched=False,
                                                              finite_potentials=True)
    return PlanOperator._unchecked(x, y, f, g, eps, a, b, cost_scale, backend, precision)
