"""``LinearOperator``: the protocol every otlinop operator follows, and its
public methods (checked products, adjoint, transpose, diagonal, splitting,
algebra, conversions).

This module knows nothing about optimal transport. Operators are torch-native:
a matvec takes and returns torch tensors on the operator's device, so autograd
flows through every composition. They also take NumPy operands (and return
NumPy arrays), so that code written for ``scipy.sparse.linalg`` operators runs
on them. The operators that the algebra returns (``A @ B``, ``A + B``,
``c * A``, ``A.H``, ``A.T``, ``A ** k``) live in ``otlinop._operators.algebra``,
the concrete ones (``Dense``, ``Diag``, ``Identity``, ``Zero``,
``BlockOperator``) in ``otlinop._operators.concrete``, the products with NumPy
operands in ``otlinop._operators.numpy_operands``, ``aslinearoperator`` in
``otlinop._interop``, the scipy view (``to_scipy``) in
``otlinop._interop_scipy`` and the GPyTorch bridge (``to_linear_operator``) in
``otlinop._interop_linop``.

Dtypes: the real floating ones (float16, bfloat16, float32, float64) and
complex64, complex128. ``A.H`` is the adjoint (conjugate transpose) and
``A.T`` the transpose; for real operators they are the same operator.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ._checks import (OPERATOR_DTYPES, fmt_shape, operator_dtype, operator_operand, operator_operand_shape,
                      operator_output, operator_scalar, operator_shape, same_space)

__all__ = ["LinearOperator", "is_adjoint_pair", "known_adjoint"]

def complex_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype a real operator of ``dtype`` computes in on complex operands."""
    if dtype.is_complex:
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _overrides(obj, name: str) -> bool:
    """True when ``type(obj)`` overrides ``LinearOperator.<name>``."""
    return getattr(type(obj), name) is not getattr(LinearOperator, name)


class LinearOperator:
    """A matrix-free linear map ``A: K^m -> K^n`` (K real or complex) acting on torch tensors.

    Subclasses call ``super().__init__(shape, dtype, device)`` and implement
    ``_matvec`` (v of shape (m,) -> (n,)) or ``_matmat`` (V of shape (m, k) ->
    (n, k)); each defaults from the other. The adjoint (conjugate transpose)
    comes from ``_rmatvec``/``_rmatmat`` or from ``_adjoint`` (returning an
    operator); self-adjoint operators get it for free. A cheap diagonal is
    offered by overriding ``_diagonal``.

    The public methods (``matvec``, ``matmat``, ``rmatvec``, ``rmatmat``,
    ``@``) check the operand's type, shape, dtype and device once, so the
    hooks can trust their input. They also take NumPy arrays (and array-likes
    such as lists), which are moved to the operator's device and dtype, and
    then return NumPy arrays, as ``scipy.sparse.linalg`` operators do.

    Parameters
    ----------
    shape : tuple of two ints
        ``(n, m)``: the operator maps vectors of length m to length n.
    dtype : torch.dtype
        float16, bfloat16, float32, float64, complex64 or complex128; tensor
        operands must have it.
    device : torch.device or str
        Operands must live there.
    is_symmetric : bool, optional
        Declares ``A == A.H``: symmetric for real dtypes, Hermitian for
        complex ones (square operators only).
    is_psd : bool, optional
        Declares ``A`` self-adjoint positive semi-definite.
    transpose_of : LinearOperator, optional
        For an operator built by another one's ``_adjoint``: that operator,
        which becomes this one's adjoint, so that ``A.H.H is A`` and
        ``A.H @ A`` is recognised as self-adjoint PSD (``is_adjoint_pair``).

    Attributes
    ----------
    shape, dtype, device, is_symmetric, is_psd
        As above.
    ndim : int
        Always 2 (as for scipy's operators).
    args : tuple
        The operands of an operator the algebra built (``(A, B)`` for
        ``A + B`` and ``A @ B``, ``(A, c)`` for ``c * A``, ``(A, k)`` for
        ``A ** k``); ``()`` for the others.
    adapts_dtype, adapts_device : bool
        Whether the dtype (device) adapts to the operators this one is
        combined with: true for ``Identity(n)`` and ``Zero(shape)`` built
        without a dtype (device), and for their scaled sums and products.

    Raises
    ------
    TypeError
        If the subclass implements neither ``_matvec`` nor ``_matmat``, or the
        dtype is not one of the above.
    ValueError
        If the shape is not two non-negative ints, or a non-square operator is
        declared symmetric.

    Notes
    -----
    Algebra: ``A + B``, ``A - B``, ``-A``, ``c * A`` (c real or complex),
    ``A / c``, ``A @ B`` (composition), ``A ** k`` (square A), ``A.H`` /
    ``A.adjoint()`` (conjugate transpose), ``A.T`` / ``A.transpose()``
    (transpose). Compositions propagate adjoints, cheap diagonals and
    symmetry, and promote dtypes as torch does (``float32`` and ``float64``
    give ``float64``, ``float32`` and ``complex64`` give ``complex64``); an
    operand of a narrower dtype computes in its own (its input rounded to it,
    its output widened), except ``Identity``, ``Zero`` and ``Diag``, which
    are widened exactly.

    Examples
    --------
    >>> import torch, otlinop
    >>> A = otlinop.Dense(torch.eye(3, dtype=torch.float64))
    >>> B = 2 * A + otlinop.Identity(3)
    >>> B.dtype, (B @ torch.ones(3, dtype=torch.float64)).tolist()
    (torch.float64, [3.0, 3.0, 3.0])
    """

    is_symmetric: bool = False
    is_psd: bool = False
    ndim = 2
    args: tuple = ()
    adapts_dtype: bool = False
    adapts_device: bool = False

    # NumPy defers to the operator in ``ndarray @ A`` (and refuses ``np.add(A, x)``
    # and the like) instead of broadcasting the operator as an object array.
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, shape, dtype, device, *, is_symmetric: bool | None = None,
                 is_psd: bool | None = None, transpose_of: LinearOperator | None = None):
        if not _overrides(self, "_matvec") and not _overrides(self, "_matmat"):
            raise TypeError(
                f"{type(self).__name__} must implement _matvec or _matmat "
                "(each defaults from the other)")
        shape = operator_shape(type(self).__name__, shape)
        if dtype not in OPERATOR_DTYPES:
            operator_dtype(type(self).__name__, dtype)
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
        self._transpose_cache: LinearOperator | None = None

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
        """(n,) -> (m,): the adjoint (conjugate transpose) applied to u."""
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

    def _transpose(self) -> "LinearOperator":
        """The transpose (m, n) of a complex operator (``conj(A.H conj(u))`` by default)."""
        return TransposeOperator(self)

    def _astype(self, dtype: torch.dtype, device: torch.device) -> "LinearOperator":
        """This operator as one of the wider ``dtype`` (on ``device``, which
        differs from its own only when it adapts its device), for the algebra.
        By default it computes in its own dtype (``CastOperator``)."""
        return CastOperator(self, dtype)

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
        """Whether ``rmatvec``/``.H``/``.T`` are available."""
        return (self.is_symmetric or _overrides(self, "_rmatvec") or _overrides(self, "_rmatmat")
                or _overrides(self, "_adjoint"))

    # ---------------------------------------------------------------- public
    def matvec(self, v):
        """Return ``A v``.

        Parameters
        ----------
        v : Tensor or ndarray, shape (m,) or (m, 1)
            A NumPy array (or list) is moved to the operator's device and
            dtype (its complex counterpart for a complex v: nothing is
            dropped), and the product comes back as a NumPy array.

        Returns
        -------
        Tensor or ndarray, shape (n,) or (n, 1) (like v)
        """
        if not isinstance(v, torch.Tensor):
            return numpy_product(self, "matvec", "v", v, "vector", "columns")
        operator_operand(self, "matvec", "v", v, "vector", self.shape[1], "columns")
        if v.ndim == 1:
            return self._checked_output("_matvec", self._matvec(v), self.shape[0], v)
        return self._checked_output("_matmat", self._matmat(v), self.shape[0], v)

    def matmat(self, V):
        """Return ``A V`` for V of shape (m, k), as an (n, k) tensor (NumPy array for a NumPy V)."""
        if not isinstance(V, torch.Tensor):
            return numpy_product(self, "matmat", "V", V, "matrix", "columns")
        operator_operand(self, "matmat", "V", V, "matrix", self.shape[1], "columns")
        return self._checked_output("_matmat", self._matmat(V), self.shape[0], V)

    def rmatvec(self, u):
        """Return ``A.H u`` (the adjoint, as scipy's ``rmatvec``) for u of shape (n,)
        or (n, 1), as an (m,) or (m, 1) tensor (NumPy array for a NumPy u)."""
        if not isinstance(u, torch.Tensor):
            return numpy_product(self, "rmatvec", "u", u, "vector", "rows", adjoint=True)
        operator_operand(self, "rmatvec", "u", u, "vector", self.shape[0], "rows")
        if u.ndim == 1:
            return self._checked_output("_rmatvec", self._rmatvec(u), self.shape[1], u)
        return self._checked_output("_rmatmat", self._rmatmat(u), self.shape[1], u)

    def rmatmat(self, U):
        """Return ``A.H U`` for U of shape (n, k), as an (m, k) tensor (NumPy array for a NumPy U)."""
        if not isinstance(U, torch.Tensor):
            return numpy_product(self, "rmatmat", "U", U, "matrix", "rows", adjoint=True)
        operator_operand(self, "rmatmat", "U", U, "matrix", self.shape[0], "rows")
        return self._checked_output("_rmatmat", self._rmatmat(U), self.shape[1], U)

    def _checked_output(self, hook: str, out, rows: int, operand: torch.Tensor):
        """``out``, what ``hook`` returned for ``operand``, once its shape and dtype are
        checked: the hooks trust their input, the public methods do not trust their output
        (a user operator's wrong shape would otherwise travel on, or broadcast)."""
        shape = (rows,) if operand.ndim == 1 else (rows, operand.shape[1])
        if not (isinstance(out, torch.Tensor) and out.shape == shape
                and (out.dtype == self.dtype or self.adapts_dtype)):
            if hook in ("_matmat", "_rmatmat") and not _overrides(self, hook):   # the default loops over the vector hook
                hook = f"{hook[:-3]}vec (through the default {hook})"
            operator_output(self, hook, out, shape, None if self.adapts_dtype else self.dtype)
        return out

    def dot(self, x):
        """``A @ x`` (scipy's name for it)."""
        return self @ x

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
        self._refuse_operand(other, left=False)
        arr = numeric_array(other)
        if arr is None:
            return NotImplemented
        return numpy_product(self, "__matmul__", "v", other, "either", "columns", arr=arr)

    def __rmatmul__(self, other):
        # u @ A == (A.T @ u.T).T
        if isinstance(other, torch.Tensor):
            if other.ndim not in (1, 2):
                raise ValueError(
                    f"u @ {type(self).__name__}: u must be 1-D or 2-D, got shape {fmt_shape(other.shape)}")
            U = other if other.ndim == 1 else other.T
            name = "u" if other.ndim == 1 else "U.T"
            operator_operand(self, "__rmatmul__", name, U, "either", self.shape[0], "rows")
            T = self.transpose()
            # Checked as this operator's (a real one's transpose is a wrapper of its _rmatvec).
            if U.ndim == 1:
                return self._checked_output("transpose()._matvec", T._matvec(U), self.shape[1], U)
            return self._checked_output("transpose()._matmat", T._matmat(U), self.shape[1], U).T
        self._refuse_operand(other, left=True)
        arr = numeric_array(other)
        if arr is None:
            return NotImplemented
        if arr.ndim not in (1, 2):
            raise ValueError(
                f"u @ {type(self).__name__}: u must be 1-D or 2-D, got shape {fmt_shape(arr.shape)}")
        operator_operand_shape(self, "__rmatmul__", "u" if arr.ndim == 1 else "U.T", arr.T.shape, "either",
                               self.shape[0], "rows")
        # The transpose's columns are this operator's rows (checked above).
        return numpy_product(self.transpose(), "__rmatmul__", "u", None, "either", "columns", arr=arr.T).T

    def _refuse_operand(self, other, *, left: bool) -> None:
        """scipy's refusals of a scalar and of a sparse matrix in ``A @ x`` (``x @ A`` when ``left``)."""
        name = type(self).__name__
        if is_scalar(other):
            written = f"c @ {name}" if left else f"{name} @ c"
            raise ValueError(f"{written}: Scalar operands are not allowed, use '*' instead "
                             f"(c is {type(other).__name__} {other!r})")
        if is_sparse_matrix(other):
            written = f"B @ {name}" if left else f"{name} @ B"
            raise TypeError(f"{written}: Unable to multiply a LinearOperator with a sparse matrix (B is "
                            f"{type(other).__name__}); compose with otlinop.aslinearoperator(B), or densify B "
                            "with B.toarray()")

    def adjoint(self) -> "LinearOperator":
        """The adjoint (conjugate transpose) ``A^H``, shape (m, n); for real dtypes the transpose."""
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
    def H(self) -> "LinearOperator":
        """The adjoint (conjugate transpose) ``A^H``, an operator of shape (m, n)."""
        return self.adjoint()

    def transpose(self) -> "LinearOperator":
        """The transpose ``A^T`` (no conjugation), shape (m, n).

        For real dtypes it is the adjoint itself (``A.T is A.H``); for complex
        ones ``A.T.T is A``.
        """
        if not self.dtype.is_complex:
            return self.adjoint()
        if self._transpose_cache is None:
            T = self._transpose()
            if T is not self and T._transpose_cache is None:
                T._transpose_cache = self
            self._transpose_cache = T
        return self._transpose_cache

    @property
    def T(self) -> "LinearOperator":
        """The transpose ``A^T`` (no conjugation), an operator of shape (m, n)."""
        return self.transpose()

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
        moved back (a complex vector on a real operator stays complex), so
        scipy's ``cg``, ``minres``, ``gmres``, ``lsmr``, ``eigsh`` and
        ``svds`` run on any otlinop operator, GPU ones included. The result
        is picklable when this operator is, and its ``operator`` attribute
        is this operator.

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
        gradients to them (``Dense``, ``Diag``, ``BlockOperator``, the
        algebra, ``PlanOperator``, ``HessianOperator``,
        ``DualHessianOperator``; other operators are opaque: no gradient,
        fixed dtype). Batch dimensions (``expand``, ``unsqueeze``) are copies
        of this operator. Complex operators multiply, transpose and index;
        gradients w.r.t. their complex tensors flow through ``matmul`` and
        ``to_dense`` only. Needs the optional ``linear_operator`` package.

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
        if is_scalar(c):
            operator_scalar(f"{type(self).__name__} * c", c)
            return ScaledOperator(self, c)
        if isinstance(c, (LinearOperator, torch.Tensor, np.ndarray, list, tuple)) or is_sparse_matrix(c):
            raise TypeError(f"{type(self).__name__}: '*' takes a scalar, got {type(c).__name__}; use '@' for the "
                            "product with a vector, a matrix or an operator")
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c):
        if is_scalar(c):
            if (isinstance(c, torch.Tensor) and bool(c == 0)) or (not isinstance(c, torch.Tensor) and c == 0):
                raise ZeroDivisionError(f"{type(self).__name__} / c: c is zero")
            if isinstance(c, np.generic):
                c = c.item()
            operator_scalar(f"{type(self).__name__} / c", c)
            return ScaledOperator(self, 1.0 / c)
        raise ValueError(f"{type(self).__name__} / c: Can only divide a linear operator by a scalar. c is "
                         f"{type(c).__name__}{' of shape ' + fmt_shape(c.shape) if hasattr(c, 'shape') else ''}; "
                         "to scale rows or columns, compose with Diag(1 / d)")

    def __pow__(self, k):
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
            raise ValueError(f"A ** k: k must be a non-negative int, got {k!r}")
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"A ** k: A must be square, got shape {fmt_shape(self.shape)}")
        if k == 0:
            return Identity(self.shape[0], dtype=None if self.adapts_dtype else self.dtype,
                            device=None if self.adapts_device else self.device)
        if k == 1:
            return self
        return PowerOperator(self, int(k))

    def __repr__(self) -> str:
        flags = []
        if self.is_psd:
            flags.append("psd")
        elif self.is_symmetric:
            flags.append("hermitian" if self.dtype.is_complex else "symmetric")
        extra = (", " + ", ".join(flags)) if flags else ""
        dtype = f"{self.dtype}{' (adapts)' if self.adapts_dtype else ''}"
        return f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {dtype} on {self.device}{extra}>"


def is_adjoint_pair(L: LinearOperator, R: LinearOperator) -> bool:
    """Whether L is known to be ``R.H`` (the adjoint one of them caches is the other).

    How the algebra recognises ``X.H @ X`` as self-adjoint PSD without looking
    at the operators' data.
    """
    return L is R._adjoint_cache or R is L._adjoint_cache or (L is R and R.is_symmetric)


def known_adjoint(A: LinearOperator) -> LinearOperator | None:
    """The adjoint that ``A`` holds (built by ``A.H``, or given as ``transpose_of``), or None.

    Computes nothing; what ``is_adjoint_pair`` looks at, so that code which
    rebuilds operators (``otlinop._interop_linop``) can keep adjoint pairs.
    """
    return A._adjoint_cache


# LinearOperator's methods return these subclasses of it. They are imported
# once LinearOperator exists and found as globals when a method runs: an import
# inside each method would cost about 0.9 us per ``A @ B`` (Python 3.11), more
# than half of it. ``otlinop._operators`` imports this module first, so any
# import order ends here.
from ._operators.algebra import (AdjointOperator, CastOperator, PowerOperator,  # noqa: E402
                                 ProductOperator, ScaledOperator, SumOperator, TransposeOperator)
from ._operators.concrete import Diag, Identity  # noqa: E402
from ._operators.numpy_operands import is_scalar, is_sparse_matrix, numeric_array, numpy_product  # noqa: E402
