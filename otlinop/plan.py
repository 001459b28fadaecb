"""The entropic transport plan as a matrix-free operator.

``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` with the squared Euclidean
cost ``C_ij = c |x_i - y_j|^2`` (``c = cost_scale``). ``P`` is never stored:
every product streams over tiles of the cost through the kernels of
``otlinop.kernels`` (Triton on CUDA, torch elsewhere).

Two public entry points:

- ``plan_matmul``: the differentiable function ``P @ V`` (batched inputs
  allowed), with gradients w.r.t. ``V, f, g, x, y, a, b`` computed by the same
  streaming kernels;
- ``PlanOperator``: ``P`` as a ``LinearOperator`` of shape (n, m), with
  ``P.T``, cached marginals, ``to_dense()``, ``diagonal()``, ``squared()``
  (``P∘P``) and ``bilinear()``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from solvers import config

from ._base import Diag, LinearOperator
from ._checks import (Geometry, backend_name, finite, matrix, operand, points, positive_scalar, precision_name,
                      vector)
from .kernels._dispatch import check_backend
from .kernels.plan_apply import plan_apply
from .marginals import plan_marginals
from .kernels.plan_bilinear import plan_bilinear

__all__ = ["PlanOperator", "plan_matmul", "transport_gradient"]

#: ``to_dense`` refuses plans with more entries than this (400 MB in float64).
_DENSE_LIMIT = 50_000_000

#: ``to_dense`` builds row blocks whose ``(rows, m, d)`` difference tensor has at most this many entries.
_DENSE_BLOCK = 1 << 22


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
_UNDEFINED = "the plan would be undefined: check the solver of the potentials, or the point clouds"


def _validated(owner: str, x, y, f, g, V, a, b, eps, cost_scale, backend, precision, *, batched: bool,
               finite_potentials: bool, hint: str | None = None) -> tuple:
    """Check the data of a plan for the public function ``owner``; return
    ``(eps, cost_scale, backend, precision)``.

    x (n, d), y (m, d), f and a (n,), g and b (m,), V (m,) or (m, k); with
    ``batched`` a common leading batch dimension B on every tensor. Then the
    values, read back in one synchronisation (none when
    ``config.check_finite`` is off): finite data and weights ``>= 0``; the
    potentials may hold -inf (a zero row or column) unless ``finite_potentials``.
    """
    eps = positive_scalar(owner, "eps", eps)
    cost_scale = positive_scalar(owner, "cost_scale", cost_scale)
    backend = backend_name(owner, backend)
    precision = precision_name(owner, precision)
    geo = points(owner, x, y, batch="same" if batched else "none", hint=hint)
    vector(geo, "f", f, geo.n, what="one potential per point of x")
    vector(geo, "g", g, geo.m, what="one potential per point of y")
    vector(geo, "a", a, geo.n, what="one weight per point of x", optional=True)
    vector(geo, "b", b, geo.m, what="one weight per point of y", optional=True)
    operand(geo, "V", V, geo.m, what=f"y has {geo.m} points", transpose=f"{owner}(y, x, g, f, V, a=b, b=a, ...)")
    check_backend(owner, backend, x)
    finite(owner, {"x": x, "y": y, "f": f, "g": g, "V": V, "a": a, "b": b},
           allow_neg_inf=() if finite_potentials else ("f", "g"), nonnegative=("a", "b"), hint=_UNDEFINED)
    return eps, cost_scale, backend, precision


# --------------------------------------------------------------------------
# The differentiable product
# --------------------------------------------------------------------------
def _rowdot(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(..., n, k) x (..., n, k) -> (..., n): <U_i, V_i>."""
    return (U * V).sum(-1)


class _PlanMatmul(torch.autograd.Function):
    """``P @ V`` for the plan of (x, y, f, g, a, b); V=None means ``P 1``.

    Backward (W = grad_out, s_ij = <W_i, V_j>, L = sum_ij P_ij s_ij):
    dL/dV = P.T W; dL/df_i = rowdot(W, PV)_i / eps; dL/dg_j = rowdot(V, P.T W)_j / eps;
    dL/dx_i = -(2c/eps) [x_i rowdot(W, PV)_i - sum_j P_ij s_ij y_j];
    dL/dy_j = -(2c/eps) [y_j rowdot(V, P.T W)_j - sum_i P_ij s_ij x_i];
    dL/da_i = sum_j (P_ij / a_i) s_ij = rowdot(W, P' V)_i with P' the plan without the a
    factor (well defined at a_i = 0); dL/db likewise. Every term is one streaming pass.
    """

    @staticmethod
    def forward(ctx, x, y, f, g, V, a, b, eps, cost_scale, backend, precision):
        log_a = None if a is None else torch.log(a)
        log_b = None if b is None else torch.log(b)
        opts = dict(eps=eps, cost_scale=cost_scale, backend=backend, precision=precision)
        out = plan_apply(x, y, f, g, V, log_a=log_a, log_b=log_b, **opts)
        ctx.opts = opts
        ctx.save_for_backward(x, y, f, g, V, log_a, log_b, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, W):
        x, y, f, g, V, log_a, log_b, PV = ctx.saved_tensors
        nx, ny, nf, ng, nV, na, nb = ctx.needs_input_grad[:7]
        opts = ctx.opts
        eps, c2 = opts["eps"], 2.0 * opts["cost_scale"]
        vector = PV.ndim == x.ndim - 1
        col = (lambda t: t.unsqueeze(-1)) if vector else (lambda t: t)
        Wm = col(W)
        if V is None:
            Vm = x.new_ones(y.shape[:-1] + (1,))
        else:
            Vm = col(V)

        if nx or ny:
            # dx_i = -(2c/eps) sum_j P_ij s_ij (x_i - y_j) holds with both clouds shifted by any z;
            # a common centre keeps the two terms small, so that their difference cancels less.
            z = (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)) / 2
            xz, yz = x - z, y - z

        grad_x = grad_y = grad_f = grad_g = grad_V = grad_a = grad_b = None
        if nf or nx:
            rw = _rowdot(Wm, col(PV))                      # sum_j P_ij s_ij
            if nf:
                grad_f = rw / eps
            if nx:
                Py_s = plan_bilinear(x, y, f, g, Wm, Vm, yz, log_a=log_a, log_b=log_b, **opts)
                grad_x = (-c2 / eps) * (xz * rw.unsqueeze(-1) - Py_s)
        if nV or ng or ny:
            PTW = plan_apply(y, x, g, f, W, log_a=log_b, log_b=log_a, **opts)
            if nV:
                grad_V = PTW
            if ng or ny:
                rv = _rowdot(Vm, col(PTW))                 # sum_i P_ij s_ij
                if ng:
                    grad_g = rv / eps
                if ny:
                    PTx_s = plan_bilinear(y, x, g, f, Vm, Wm, xz, log_a=log_b, log_b=log_a, **opts)
                    grad_y = (-c2 / eps) * (yz * rv.unsqueeze(-1) - PTx_s)
        if na:
            grad_a = _rowdot(Wm, col(plan_apply(x, y, f, g, V, log_a=None, log_b=log_b, **opts)))
        if nb:
            grad_b = _rowdot(Vm, col(plan_apply(y, x, g, f, W, log_a=None, log_b=log_a, **opts)))
        return grad_x, grad_y, grad_f, grad_g, grad_V, grad_a, grad_b, None, None, None, None


def plan_matmul(x, y, f, g, V=None, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None):
    """The differentiable product ``P @ V`` with the entropic plan ``P``, never stored.

    Parameters
    ----------
    x : Tensor, shape (n, d) or (B, n, d)
        Source points.
    y : Tensor, shape (m, d) or (B, m, d)
        Target points.
    f : Tensor, shape (n,) or (B, n)
        Source potential.
    g : Tensor, shape (m,) or (B, m)
        Target potential.
    V : Tensor, shape (m,), (m, k), (B, m) or (B, m, k), or None
        The operand; None gives the row sums ``P 1``.
    eps : float
        Entropic regularisation, > 0.
    a : Tensor, shape (n,) or (B, n), optional
        Source weights (not logs), >= 0; None means ones.
    b : Tensor, shape (m,) or (B, m), optional
        Target weights, >= 0; None means ones.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2`` (GeomLoss' p=2 cost is ``c = 1/2``).
    backend : {None, "auto", "torch", "triton"}
        None or "auto" picks Triton for CUDA float16/bfloat16/float32 tensors, torch otherwise.
    precision : optional
        Passed to the kernel (see ``otlinop.kernels.plan_apply``).

    Returns
    -------
    Tensor, shape (n,), (n, k), (B, n) or (B, n, k)
        ``P V`` (or ``P 1``), with V's layout.

    Raises
    ------
    TypeError
        For non-tensor data, mismatched dtypes, or an ``eps`` that requires grad.
    ValueError
        For mismatched shapes or devices, ``eps <= 0``, ``cost_scale <= 0`` or an
        unknown backend.

    Notes
    -----
    ``P_ij = a_i b_j exp((f_i + g_j - c |x_i - y_j|^2) / eps)``; ``log 0 = -inf``,
    so zero weights give zero rows or columns. ``P.T @ U`` is
    ``plan_matmul(y, x, g, f, U, a=b, b=a, ...)``.

    Gradients w.r.t. ``V, f, g, x, y, a, b`` are computed by the same
    streaming kernels (``plan_apply``, ``plan_bilinear``), only for the inputs
    that need them: up to five plan passes, O(nm(d + k)) time, O((n + m)(d + k))
    memory. With ``W`` the output gradient and ``s_ij = <W_i, V_j>``::

        dV = P.T W,  df = rowdot(W, P V) / eps,  dg = rowdot(V, P.T W) / eps,
        dx_i = -(2c/eps) (x_i rowdot(W, P V)_i - sum_j P_ij s_ij y_j),
        dy_j = -(2c/eps) (y_j rowdot(V, P.T W)_j - sum_i P_ij s_ij x_i),
        da_i = sum_j P_ij s_ij / a_i (computed without dividing by a_i).

    The backward is ``once_differentiable``: double backward through this
    function raises. Second-order derivatives of the OT loss go through the
    analytic Hessian-vector products of ``otlinop.hvp`` instead.
    Gradients w.r.t. ``eps`` and ``cost_scale`` are not provided.

    Examples
    --------
    >>> import torch
    >>> from otlinop.plan import plan_matmul
    >>> x = torch.randn(5, 2, dtype=torch.float64); y = torch.randn(4, 2, dtype=torch.float64)
    >>> f = torch.zeros(5, dtype=torch.float64, requires_grad=True); g = torch.zeros(4, dtype=torch.float64)
    >>> out = plan_matmul(x, y, f, g, torch.ones(4, dtype=torch.float64), eps=1.0)
    >>> out.sum().backward(); f.grad.shape
    torch.Size([5])
    """
    opts = _validated("plan_matmul", x, y, f, g, V, a, b, eps, cost_scale, backend, precision, batched=True,
                      finite_potentials=False)
    return _checked_product(x, y, f, g, V, a, b, *opts)


def _checked_product(x, y, f, g, V, a, b, eps, cost_scale, backend, precision):
    """``P @ V`` on data that ``_validated`` checked: the kernels' own value checks
    of the forward pass would read the same values back a second time."""
    with config.override(check_finite=False):
        return _PlanMatmul.apply(x, y, f, g, V, a, b, eps, cost_scale, backend, precision)


def transport_gradient(x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None):
    """``sum_j P_ij dC_ij/dx_i = 2c ((P 1) * x - P y)``: the gradient of the OT loss w.r.t. x.

    Parameters
    ----------
    x, y, f, g, eps, a, b, cost_scale, backend, precision
        As in ``plan_matmul`` (batched inputs allowed).

    Returns
    -------
    Tensor, shape (n, d) or (B, n, d)

    Notes
    -----
    One streaming pass, ``P @ [y - z | 1]``, differentiable through
    ``plan_matmul``. Both clouds are shifted by the common centre
    ``z = (mean x + mean y) / 2`` first: the result is unchanged
    (``P 1 * z - P z = 0``) but the two terms stay small, so that their
    difference loses less in float32. With converged potentials this is the
    gradient of the entropic OT loss w.r.t. x; ``transport_gradient(y, x, g, f,
    a=b, b=a, ...)`` gives the one w.r.t. y.
    """
    return transport_gradient_for("transport_gradient", x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale,
                                  backend=backend, precision=precision)


def transport_gradient_for(owner: str, x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None,
                           precision=None, batched: bool = True, wrt: str = "x"):
    """:func:`transport_gradient` for the public function ``owner``, whose name
    its argument errors carry: the gradient w.r.t. x, or w.r.t. y with
    ``wrt="y"`` (the arguments keep their names in the messages either way);
    ``batched=False`` refuses batched clouds."""
    eps, cost_scale, backend, precision = _validated(owner, x, y, f, g, None, a, b, eps, cost_scale, backend,
                                                     precision, batched=batched, finite_potentials=False)
    if wrt == "y":
        x, y, f, g, a, b = y, x, g, f, b, a
    z = (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)) / 2
    xz, yz = x - z, y - z
    d = x.shape[-1]
    V = torch.cat([yz, yz.new_ones(yz.shape[:-1] + (1,))], dim=-1)
    PV = _checked_product(x, y, f, g, V, a, b, eps, cost_scale, backend, precision)
    return (2.0 * cost_scale) * (PV[..., d:] * xz - PV[..., :d])


# --------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------
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
        opts = _validated("PlanOperator", x, y, f, g, None, a, b, eps, cost_scale, backend, precision,
                          batched=False, finite_potentials=True, hint="use plan_matmul for batched point clouds")
        eps, cost_scale, backend, precision = opts
        self._setup(x, y, f, g, eps, a, b, cost_scale, backend, precision)

    def _setup(self, x, y, f, g, eps, a, b, cost_scale, backend, precision):
        symmetric = x is y and f is g and a is b
        super().__init__((x.shape[0], y.shape[0]), x.dtype, x.device, is_symmetric=symmetric, is_psd=symmetric)
        self.x, self.y, self.f, self.g = x, y, f, g
        self.eps, self.cost_scale = eps, cost_scale
        self.backend, self.precision = backend, precision
        self._a, self._b = a, b
        self._row_sums: torch.Tensor | None = None

    @classmethod
    def _unchecked(cls, x, y, f, g, eps, a, b, cost_scale, backend, precision) -> "PlanOperator":
        """Build from data already validated (transposes, squares)."""
        op = cls.__new__(cls)
        op._setup(x, y, f, g, eps, a, b, cost_scale, backend, precision)
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

    def _kernel_options(self) -> dict:
        return dict(eps=self.eps, cost_scale=self.cost_scale, backend=self.backend, precision=self.precision)

    # ----------------------------------------------------------------- hooks
    def _apply(self, V):
        """(m,) or (m, k) -> (n,) or (n, k); V=None gives P 1."""
        return _PlanMatmul.apply(self.x, self.y, self.f, self.g, V, self._a, self._b, self.eps,
                                 self.cost_scale, self.backend, self.precision)

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
        T = PlanOperator._unchecked(self.y, self.x, self.g, self.f, self.eps, self._b, self._a,
                                    self.cost_scale, self.backend, self.precision)
        T._adjoint_cache = self   # so that P.T.T is P
        return T

    def _diagonal(self):
        k = min(self.shape)
        logits = (self.f[:k] + self.g[:k] - self.cost_scale * (self.x[:k] - self.y[:k]).pow(2).sum(-1)) / self.eps
        P_ii = torch.exp(logits)
        if self._a is not None:
            P_ii = self._a[:k] * P_ii
        if self._b is not None:
            P_ii = P_ii * self._b[:k]
        return P_ii

    # ---------------------------------------------------------------- public
    def row_sums(self) -> torch.Tensor:
        """``P 1``, shape (n,): the first marginal (cached when it carries no autograd graph)."""
        if self._row_sums is not None:
            return self._row_sums
        r = self._apply(None)
        if not r.requires_grad:
            self._row_sums = r
        return r

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
    eps, cost_scale, backend, precision = _validated(owner, x, y, f, g, None, a, b, eps, cost_scale, backend,
                                                     precision, batched=False, finite_potentials=True)
    return PlanOperator._unchecked(x, y, f, g, eps, a, b, cost_scale, backend, precision)
