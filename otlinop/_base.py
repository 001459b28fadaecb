"""``LinearOperator``: the protocol every otlinop operator follows, and its
public methods (checked products, adjoint, diagonal, splitting, algebra,
conversions).

This module knows nothing about optimal transport. Operators are torch-native:
a matvec takes and returns torch tensors on the operator's device, so autograd
flows through every composition. The operators that the algebra returns
(``A @ B``, ``A + B``, ``c * A``, ``A.T``, ``A ** k``) live in
``otlinop._operators.algebra``, the concrete ones (``Dense``, ``Diag``,
``Identity``, ``Zero``, ``BlockOperator``) in ``otlinop._operators.concrete``,
``aslinearoperator`` and the bridges to scipy and GPyTorch in
``otlinop._interop``.

Only real dtypes are supported (float16, bfloat16, float32, float64); ``.T``
and ``.H`` are therefore the same operator.
"""

from __future__ import annotations

import numbers

import torch

from ._checks import REAL_DTYPES, fmt_shape, operator_operand, same_space

__all__ = ["LinearOperator", "is_adjoint_pair"]


def _is_scalar(c) -> bool:
    if isinstance(c, bool):
        return False
    if isinstance(c, numbers.Real):
        return True
    return isinstance(c, torch.Tensor) and c.ndim == 0 and not c.is_complex()


def _overrides(obj, name: str) -> bool:
    """True when ``type(obj)`` overrides ``LinearOperator.<name>``."""
    return getattr(type(obj), name) is not getattr(LinearOperator, name)


class LinearOperator:
    """A matrix-free linear map ``A: R^m -> R^n`` acting on torch tensors.

    Subclasses call ``super().__init__(shape, dtype, device)`` and implement
    ``_matvec`` (v of shape (m,) -> (n,)) or ``_matmat`` (V of shape (m, k) ->
    (n, k)); each defaults from the other. The adjoint comes from
    ``_rmatvec``/``_rmatmat`` or from ``_adjoint`` (returning an operator);
    symmetric operators get it for free. A cheap diagonal is offered by
    overriding ``_diagonal``.

    The public methods (``matvec``, ``matmat``, ``rmatvec``, ``rmatmat``,
    ``@``) check the operand's type, shape, dtype and device once, so the
    hooks can trust their input.

    Parameters
    ----------
    shape : tuple of two ints
        ``(n, m)``: the operator maps vectors of length m to length n.
    dtype : torch.dtype
        A real floating dtype; operands must have it.
    device : torch.device or str
        Operands must live there.
    is_symmetric : bool, optional
        Declares ``A == A.T`` (square operators only).
    is_psd : bool, optional
        Declares ``A`` symmetric positive semi-definite.
    transpose_of : LinearOperator, optional
        For an operator built by another one's ``_adjoint``: that operator,
        which becomes this one's adjoint, so that ``A.T.T is A`` and
        ``A.T @ A`` is recognised as symmetric PSD (``is_adjoint_pair``).

    Raises
    ------
    TypeError
        If the subclass implements neither ``_matvec`` nor ``_matmat``, or the
        dtype is not a real floating dtype.
    ValueError
        If the shape is not two non-negative ints, or a non-square operator is
        declared symmetric.

    Notes
    -----
    Algebra: ``A + B``, ``A - B``, ``-A``, ``c * A``, ``A / c``, ``A @ B``
    (composition), ``A ** k`` (square A), ``A.T`` / ``A.H`` / ``A.adjoint()``.
    Compositions propagate adjoints, cheap diagonals and symmetry.

    Examples
    --------
    >>> import torch, otlinop
    >>> A = otlinop.Dense(torch.eye(3, dtype=torch.float64))
    >>> B = 2 * A + otlinop.Identity(3, dtype=torch.float64)
    >>> (B @ torch.ones(3, dtype=torch.float64)).tolist()
    [3.0, 3.0, 3.0]
    """

    is_symmetric: bool = False
    is_psd: bool = False

    def __init__(self, shape, dtype, device, *, is_symmetric: bool | None = None,
                 is_psd: bool | None = None, transpose_of: LinearOperator | None = None):
        if not _overrides(self, "_matvec") and not _overrides(self, "_matmat"):
            raise TypeError(
                f"{type(self).__name__} must implement _matvec or _matmat "
                "(each defaults from the other)")
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise ValueError(f"{type(self).__name__}: shape must be a pair of ints, got {shape!r}") from None
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(
                f"{type(self).__name__}: shape must be two non-negative ints (n, m), got {shape!r}")
        if dtype not in REAL_DTYPES:
            raise TypeError(
                f"{type(self).__name__}: dtype must be one of float16, bfloat16, float32, float64, "
                f"got {dtype}")
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device)
        if is_symmetric is not None:
            self.is_symmetric = bool(is_symmetric)
        if is_psd is not None:
            self.is_psd = bool(is_psd)
        if self.is_psd:
            self.is_symmetric = True
        if self.is_symmetric and shape[0] != shape[1]:
            raise ValueError(
                f"{type(self).__name__}: a symmetric operator must be square, got shape {fmt_shape(shape)}")
        self._adjoint_cache: LinearOperator | None = transpose_of

    # ------------------------------------------------------------------ hooks
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(m,) -> (n,)."""
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(m, k) -> (n, k)."""
        if V.shape[1] == 0:
            return V.new_zeros((self.shape[0], 0))
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """(n,) -> (m,): the adjoint applied to u."""
        if _overrides(self, "_rmatmat"):
            return self._rmatmat(u.unsqueeze(1)).squeeze(1)
        if _overrides(self, "_adjoint"):
            return self._adjoint()._matvec(u)
        if self.is_symmetric:
            return self._matvec(u)
        raise NotImplementedError(self._no_adjoint_message())

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """(n, k) -> (m, k)."""
        if _overrides(self, "_rmatvec"):
            if U.shape[1] == 0:
                return U.new_zeros((self.shape[1], 0))
            return torch.stack([self._rmatvec(U[:, j]) for j in range(U.shape[1])], dim=1)
        if _overrides(self, "_adjoint"):
            return self._adjoint()._matmat(U)
        if self.is_symmetric:
            return self._matmat(U)
        raise NotImplementedError(self._no_adjoint_message())

    def _adjoint(self) -> "LinearOperator":
        """The adjoint operator (m, n)."""
        return AdjointOperator(self)

    def _diagonal(self) -> torch.Tensor:
        """(min(n, m),) main diagonal, when cheap."""
        raise NotImplementedError(
            f"{type(self).__name__}.diagonal: no cheap diagonal is available for this operator; "
            "use to_dense().diagonal() on small problems, or a preconditioner that needs no diagonal")

    def _no_adjoint_message(self) -> str:
        return (f"{type(self).__name__}: no adjoint is available (implement _rmatvec, _rmatmat "
                "or _adjoint, or declare is_symmetric=True)")

    @property
    def has_adjoint(self) -> bool:
        """Whether ``rmatvec``/``.T`` are available."""
        return (self.is_symmetric or _overrides(self, "_rmatvec") or _overrides(self, "_rmatmat")
                or _overrides(self, "_adjoint"))

    # ---------------------------------------------------------------- public
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A v``.

        Parameters
        ----------
        v : Tensor, shape (m,)

        Returns
        -------
        Tensor, shape (n,)
        """
        operator_operand(self, "matvec", "v", v, (1,), self.shape[1], "columns")
        return self._matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A V`` for V of shape (m, k), as an (n, k) tensor."""
        operator_operand(self, "matmat", "V", V, (2,), self.shape[1], "columns")
        return self._matmat(V)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """Return ``A.T u`` for u of shape (n,), as an (m,) tensor."""
        operator_operand(self, "rmatvec", "u", u, (1,), self.shape[0], "rows")
        return self._rmatvec(u)

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """Return ``A.T U`` for U of shape (n, k), as an (m, k) tensor."""
        operator_operand(self, "rmatmat", "U", U, (2,), self.shape[0], "rows")
        return self._rmatmat(U)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        if isinstance(other, torch.Tensor):
            if other.ndim == 1:
                return self.matvec(other)
            if other.ndim == 2:
                return self.matmat(other)
            raise ValueError(
                f"{type(self).__name__} @ v: v must be 1-D (m,) or 2-D (m, k), got shape "
                f"{fmt_shape(other.shape)}")
        return NotImplemented

    def __rmatmul__(self, other):
        # u @ A == (A.T @ u.T).T
        if isinstance(other, torch.Tensor):
            if other.ndim == 1:
                return self.rmatvec(other)
            if other.ndim == 2:
                operator_operand(self, "__rmatmul__", "U.T", other.T, (2,), self.shape[0], "rows")
                return self._rmatmat(other.T).T
            raise ValueError(
                f"u @ {type(self).__name__}: u must be 1-D or 2-D, got shape {fmt_shape(other.shape)}")
        return NotImplemented

    def adjoint(self) -> "LinearOperator":
        """The adjoint operator ``A^T`` of shape (m, n) (real dtypes: ``.T == .H``)."""
        if self._adjoint_cache is None:
            if _overrides(self, "_adjoint"):
                self._adjoint_cache = self._adjoint()
            elif self.is_symmetric:
                return self
            elif self.has_adjoint:
                self._adjoint_cache = AdjointOperator(self)
            else:
                raise NotImplementedError(self._no_adjoint_message())
        return self._adjoint_cache

    @property
    def T(self) -> "LinearOperator":
        """The transpose ``A^T``, an operator of shape (m, n)."""
        return self.adjoint()

    @property
    def H(self) -> "LinearOperator":
        """The conjugate transpose; equal to ``.T`` for the real dtypes supported."""
        return self.adjoint()

    def diagonal(self) -> torch.Tensor:
        """The main diagonal, shape (min(n, m),).

        Raises
        ------
        NotImplementedError
            When the operator has no cheap diagonal.
        """
        return self._diagonal()

    def splitting(self):
        """A splitting ``A = Diag(D) - N`` with D a vector, used by ``neumann``.

        The default is the Jacobi splitting ``D = diag(A)``, ``N = Diag(D) - A``;
        operators with a better splitting override this.

        Returns
        -------
        D : Tensor, shape (n,)
        N : LinearOperator, shape (n, n)
        """
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"{type(self).__name__}.splitting: the operator must be square, "
                             f"got shape {fmt_shape(self.shape)}")
        D = self.diagonal()
        return D, Diag(D) - self

    def to_dense(self) -> torch.Tensor:
        """Materialise the (n, m) matrix (for small operators and tests)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self._matmat(eye)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on NumPy arrays.

        Vectors are moved to this operator's device and dtype, multiplied and
        moved back, so scipy's ``cg``, ``minres``, ``gmres``, ``lsmr``,
        ``eigsh`` and ``svds`` run on any otlinop operator, GPU ones included.

        Examples
        --------
        >>> import torch, numpy as np, scipy.sparse.linalg as sla, otlinop
        >>> A = otlinop.Diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> x, info = sla.cg(A.to_scipy(), np.ones(3))
        >>> np.round(x, 6).tolist()
        [1.0, 0.5, 0.25]
        """
        from ._interop import to_scipy
        return to_scipy(self)

    def to_linear_operator(self):
        """A GPyTorch ``linear_operator.LinearOperator`` that calls this operator.

        Its representation (what linear_operator differentiates) is the
        tensors this operator is built from, so ``requires_grad_`` on it and
        ``inv_quad_logdet``, ``solve``, ``matmul`` or ``to_dense`` give
        gradients to them (``Dense``, ``Diag``, the algebra, ``PlanOperator``,
        ``HessianOperator``; other operators are opaque: no gradient, fixed
        dtype). Batch dimensions (``expand``, ``unsqueeze``) are copies of
        this operator. Needs the optional ``linear_operator`` package.

        Examples
        --------
        >>> import torch, otlinop
        >>> d = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
        >>> L = otlinop.Diag(d).to_linear_operator()
        >>> _, logdet = L.inv_quad_logdet(logdet=True)     # sum(log d)
        >>> logdet.backward()
        >>> torch.allclose(d.grad, 1 / d)
        True
        """
        from ._interop_linop import to_linear_operator
        return to_linear_operator(self)

    # ------------------------------------------------------------- algebra
    def __add__(self, other):
        if isinstance(other, LinearOperator):
            same_space(self, other, "+")
            return SumOperator(self, other)
        return NotImplemented

    def __sub__(self, other):
        if isinstance(other, LinearOperator):
            same_space(self, other, "-")
            return SumOperator(self, ScaledOperator(other, -1.0))
        return NotImplemented

    def __neg__(self):
        return ScaledOperator(self, -1.0)

    def __pos__(self):
        return self

    def __mul__(self, c):
        if _is_scalar(c):
            return ScaledOperator(self, c)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c):
        if _is_scalar(c):
            if (isinstance(c, torch.Tensor) and bool(c == 0)) or (not isinstance(c, torch.Tensor) and c == 0):
                raise ZeroDivisionError(f"{type(self).__name__} / c: c is zero")
            return ScaledOperator(self, 1.0 / c)
        return NotImplemented

    def __pow__(self, k):
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
            raise ValueError(f"A ** k: k must be a non-negative int, got {k!r}")
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"A ** k: A must be square, got shape {fmt_shape(self.shape)}")
        if k == 0:
            return Identity(self.shape[0], dtype=self.dtype, device=self.device)
        if k == 1:
            return self
        return PowerOperator(self, int(k))

    def __repr__(self) -> str:
        flags = []
        if self.is_psd:
            flags.append("psd")
        elif self.is_symmetric:
            flags.append("symmetric")
        extra = (", " + ", ".join(flags)) if flags else ""
        return f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.dtype} on {self.device}{extra}>"

    # Keep numpy from broadcasting ``ndarray @ A`` elementwise.
    __array_priority__ = 1000


def is_adjoint_pair(L: LinearOperator, R: LinearOperator) -> bool:
    """Whether L is known to be ``R.T`` (the adjoint one of them caches is the other).

    How the algebra recognises ``X.T @ X`` as symmetric PSD without looking at
    the operators' data.
    """
    return L is R._adjoint_cache or R is L._adjoint_cache or (L is R and R.is_symmetric)


# LinearOperator's methods return these subclasses of it. They are imported
# once LinearOperator exists and found as globals when a method runs: an import
# inside each method would cost about 0.9 us per ``A @ B`` (Python 3.11), more
# than half of it. ``otlinop._operators`` imports this module first, so any
# import order ends here.
from ._operators.algebra import (AdjointOperator, PowerOperator, ProductOperator,  # noqa: E402
                                 ScaledOperator, SumOperator)
from ._operators.concrete import Diag, Identity  # noqa: E402
