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

import math
import numbers

import torch
from torch.autograd.function import once_differentiable

from solvers import config

from ._base import Diag, LinearOperator, _fmt_shape, _REAL_DTYPES
from .kernels import _common as _kernel_common
from .kernels.plan_apply import plan_apply
from .marginals import plan_marginals
from .kernels.plan_bilinear import plan_bilinear

__all__ = ["PlanOperator", "plan_matmul", "transport_gradient"]

_BACKENDS = (None, "torch", "triton")

#: ``to_dense`` refuses plans with more entries than this (400 MB in float64).
_DENSE_LIMIT = 50_000_000

#: ``to_dense`` builds row blocks whose ``(rows, m, d)`` difference tensor has at most this many entries.
_DENSE_BLOCK = 1 << 22


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def _check_scalar(owner: str, name: str, value, *, hint: str) -> float:
    """A positive finite real number (Python number or 0-d tensor without grad)."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise TypeError(f"{owner}: {name} must be a positive number, got a tensor of shape "
                            f"{_fmt_shape(value.shape)}")
        if value.requires_grad:
            raise TypeError(f"{owner}: {name} is a tensor that requires grad, but gradients w.r.t. {name} "
                            f"are not implemented; pass float({name}) or {name}.detach()")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: {name} must be positive and finite, got {value}; {hint}")
    return value


def _check_backend(owner: str, backend) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"{owner}: backend must be None (automatic), 'torch' or 'triton', got {backend!r}")


def _check_data(owner: str, x, y, f, g, a, b, *, batched: bool) -> None:
    """Types, shapes, dtypes and devices of the data (no values: no device sync).

    x (n, d), y (m, d), f and a (n,), g and b (m,); with ``batched`` a common
    leading batch dimension B is also accepted on every tensor.
    """
    named = {"x": x, "y": y, "f": f, "g": g, "a": a, "b": b}
    for name, t in named.items():
        if t is None and name in "ab":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}; "
                            "convert with torch.as_tensor(...)")
    if x.ndim not in ((2, 3) if batched else (2,)):
        want = "(n, d) or (B, n, d)" if batched else "(n, d)"
        hint = "; use plan_matmul for batched point clouds" if (not batched and x.ndim == 3) else ""
        raise ValueError(f"{owner}: x must have shape {want}, got {_fmt_shape(x.shape)}{hint}")
    lead = tuple(x.shape[:-2])
    n, d = x.shape[-2:]
    if y.ndim != x.ndim or tuple(y.shape[:-2]) != lead or y.shape[-1] != d:
        want = "(" + ", ".join([str(s) for s in lead] + ["m", str(d)]) + ")"
        raise ValueError(f"{owner}: y must have shape {want} to match x of shape {_fmt_shape(x.shape)} "
                         f"(same dimension d = {d}), got {_fmt_shape(y.shape)}")
    m = y.shape[-2]
    expected = {"f": lead + (n,), "a": lead + (n,), "g": lead + (m,), "b": lead + (m,)}
    what = {"f": "one potential per point of x", "a": "one weight per point of x",
            "g": "one potential per point of y", "b": "one weight per point of y"}
    for name in ("f", "g", "a", "b"):
        t = named[name]
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(f"{owner}: {name} has shape {_fmt_shape(t.shape)}, expected "
                             f"{_fmt_shape(expected[name])} ({what[name]})")
    if x.dtype not in _REAL_DTYPES:
        raise TypeError(f"{owner}: x must have a real floating dtype, got {x.dtype}; convert with x.to(torch.float32)")
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{owner}: {name} has dtype {t.dtype}, but x has dtype {x.dtype}; "
                            f"convert with {name}.to({x.dtype})")
        if t.device != x.device:
            raise ValueError(f"{owner}: {name} is on device {t.device}, but x is on {x.device}; "
                             f"move it with {name}.to('{x.device}')")


def _check_values(owner: str, x, y, f, g, a, b) -> None:
    """Finite data and non-negative weights, read back in one device sync; skipped
    with the kernels' own input checks (``config.override(check_finite=False)``)."""
    if not config.check_finite:
        return
    named = [(n, t) for n, t in (("x", x), ("y", y), ("f", f), ("g", g), ("a", a), ("b", b)) if t is not None]
    weights = [(n, t) for n, t in named if n in "ab"]
    with torch.no_grad():
        # max |t| is NaN or inf iff t holds a NaN or an inf (amax propagates NaN): two
        # launches a tensor, where isfinite(t).all() takes five. All share x's dtype.
        peaks = [t.abs().amax() if t.numel() else t.new_zeros(()) for _, t in named]
        lows = [t.amin() if t.numel() else t.new_zeros(()) for _, t in weights]
        values = torch.stack(peaks + lows).tolist()
    for (name, _), peak in zip(named, values):
        if not math.isfinite(peak):
            raise ValueError(f"{owner}: {name} has non-finite entries (inf or nan); the plan would be "
                             "undefined. Check the potentials' solver or the point clouds")
    for (name, _), low in zip(weights, values[len(named):]):
        if low < 0:
            raise ValueError(f"{owner}: the weights {name} have negative entries; weights must be >= 0 "
                             "(zeros are allowed)")


def _check_V(owner: str, V, x, y) -> None:
    """V: (m,) or (m, k), with a leading B when x is batched."""
    if V is None:
        return
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"{owner}: V must be a torch.Tensor or None, got {type(V).__name__}")
    lead, m = tuple(y.shape[:-2]), y.shape[-2]
    ok = V.ndim in (len(lead) + 1, len(lead) + 2) and tuple(V.shape[:len(lead) + 1]) == lead + (m,)
    if not ok:
        want = _fmt_shape(lead + (m,)) + " or (" + ", ".join(str(s) for s in lead + (m,)) + ", k)"
        hint = ""
        if V.ndim >= 1 and V.shape[len(lead):len(lead) + 1] == (x.shape[-2],) and x.shape[-2] != m:
            hint = "; it matches the rows of P: did you mean the transpose, plan_matmul(y, x, g, f, V, ...)?"
        raise ValueError(f"{owner}: V has shape {_fmt_shape(V.shape)}, expected {want} "
                         f"(y has {m} points){hint}")
    if V.dtype != x.dtype:
        raise TypeError(f"{owner}: V has dtype {V.dtype}, but x has dtype {x.dtype}; convert with V.to({x.dtype})")
    if V.device != x.device:
        raise ValueError(f"{owner}: V is on device {V.device}, but x is on {x.device}; "
                         f"move it with V.to('{x.device}')")


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
    backend : {None, "torch", "triton"}
        None picks Triton for CUDA float16/bfloat16/float32 tensors, torch otherwise.
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
    owner = "plan_matmul"
    eps = _check_scalar(owner, "eps", eps, hint="eps is the entropic regularisation, e.g. eps=0.1")
    cost_scale = _check_scalar(owner, "cost_scale", cost_scale, hint="use 1.0 for |x-y|^2 or 0.5 for |x-y|^2/2")
    _check_backend(owner, backend)
    _check_data(owner, x, y, f, g, a, b, batched=True)
    _check_V(owner, V, x, y)
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
    z = (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)) / 2
    xz, yz = x - z, y - z
    d = x.shape[-1]
    V = torch.cat([yz, yz.new_ones(yz.shape[:-1] + (1,))], dim=-1)
    PV = plan_matmul(x, y, f, g, V, eps=eps, a=a, b=b, cost_scale=cost_scale, backend=backend,
                     precision=precision)
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
    backend : {None, "torch", "triton"}
        None picks Triton for CUDA float16/bfloat16/float32 tensors, torch otherwise.
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
        owner = "PlanOperator"
        eps = _check_scalar(owner, "eps", eps, hint="eps is the entropic regularisation, e.g. eps=0.1")
        cost_scale = _check_scalar(owner, "cost_scale", cost_scale,
                                   hint="use 1.0 for |x-y|^2 or 0.5 for |x-y|^2/2")
        _check_backend(owner, backend)
        _check_data(owner, x, y, f, g, a, b, batched=False)
        _check_values(owner, x, y, f, g, a, b)
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
        from .truncated import truncate_plan
        return truncate_plan(self, tol, max_fill=max_fill, capacity=capacity)

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
        for name, t, rows in (("W", W, n), ("V", V, m), ("Y", Y, m)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"PlanOperator.bilinear: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 2 or t.shape[0] != rows:
                raise ValueError(f"PlanOperator.bilinear: {name} has shape {_fmt_shape(t.shape)}, expected "
                                 f"({rows}, {'e' if name == 'Y' else 'k'}) for P of shape {_fmt_shape(self.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"PlanOperator.bilinear: {name} has dtype {t.dtype}, expected {self.dtype}; "
                                f"convert with {name}.to({self.dtype})")
            if t.device != self.device:
                raise ValueError(f"PlanOperator.bilinear: {name} is on device {t.device}, expected "
                                 f"{self.device}; move it with {name}.to('{self.device}')")
        if W.shape[1] != V.shape[1]:
            raise ValueError(f"PlanOperator.bilinear: W has {W.shape[1]} columns and V has {V.shape[1]}; "
                             "<W_i, V_j> needs the same number")
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
