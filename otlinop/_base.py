"""The linear-operator algebra: ``LinearOperator``, its compositions and the
concrete operators ``Dense``, ``Diag``, ``Identity``, ``Zero`` and
``BlockOperator``, plus ``aslinearoperator``.

This module knows nothing about optimal transport. Operators are torch-native:
a matvec takes and returns torch tensors on the operator's device, so autograd
flows through every composition.

Only real dtypes are supported (float16, bfloat16, float32, float64); ``.T``
and ``.H`` are therefore the same operator.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch

from solvers import register_conversion

from ._checks import REAL_DTYPES, fmt_shape

__all__ = [
    "LinearOperator",
    "Dense",
    "Diag",
    "Identity",
    "Zero",
    "BlockOperator",
    "aslinearoperator",
]

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
                 is_psd: bool | None = None):
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
        self._adjoint_cache: LinearOperator | None = None

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
        return _AdjointOperator(self)

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

    # ------------------------------------------------------------ validation
    def _check_operand(self, name: str, method: str, t, ndim: tuple[int, ...], length: int,
                       what: str) -> None:
        owner = type(self).__name__
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{owner}.{method}: {name} must be a torch.Tensor, got {type(t).__name__}; "
                "convert with torch.as_tensor(...)")
        if t.ndim not in ndim:
            want = " or ".join(f"{d}-D" for d in ndim)
            raise ValueError(f"{owner}.{method}: {name} must be {want}, got shape {fmt_shape(t.shape)}")
        if t.shape[0] != length:
            expected = f"({length},)" if t.ndim == 1 else f"({length}, k)"
            hint = ""
            if self.shape[0] != self.shape[1] and t.shape[0] == (self.shape[0] if what == "columns" else self.shape[1]):
                hint = "; did you mean A.T @ " + name + "?" if what == "columns" else "; did you mean A @ " + name + "?"
            raise ValueError(
                f"{owner}.{method}: {name} has shape {fmt_shape(t.shape)}, expected {expected} "
                f"(the operator has shape {fmt_shape(self.shape)}, {length} {what}){hint}")
        if t.dtype != self.dtype:
            raise TypeError(
                f"{owner}.{method}: {name} has dtype {t.dtype}, expected {self.dtype}; "
                f"convert with {name}.to({self.dtype})")
        if t.device != self.device and not (t.device.type == self.device.type and self.device.index is None):
            raise ValueError(
                f"{owner}.{method}: {name} is on device {t.device}, expected {self.device}; "
                f"move it with {name}.to('{self.device}')")

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
        self._check_operand("v", "matvec", v, (1,), self.shape[1], "columns")
        return self._matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A V`` for V of shape (m, k), as an (n, k) tensor."""
        self._check_operand("V", "matmat", V, (2,), self.shape[1], "columns")
        return self._matmat(V)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """Return ``A.T u`` for u of shape (n,), as an (m,) tensor."""
        self._check_operand("u", "rmatvec", u, (1,), self.shape[0], "rows")
        return self._rmatvec(u)

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """Return ``A.T U`` for U of shape (n, k), as an (m, k) tensor."""
        self._check_operand("U", "rmatmat", U, (2,), self.shape[0], "rows")
        return self._rmatmat(U)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return _ProductOperator(self, other)
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
                self._check_operand("U.T", "__rmatmul__", other.T, (2,), self.shape[0], "rows")
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
                self._adjoint_cache = _AdjointOperator(self)
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

        Usable with that package's functions (``matmul``, ``solve``,
        ``transpose``). Gradients do not flow through it to this operator's
        tensors; use otlinop's own ``solve`` for that.
        """
        from ._interop import to_linear_operator
        return to_linear_operator(self)

    # ------------------------------------------------------------- algebra
    def _check_same_space(self, other: "LinearOperator", op: str) -> None:
        if other.shape != self.shape:
            raise ValueError(f"A {op} B: shapes differ, A is {fmt_shape(self.shape)} and B is "
                             f"{fmt_shape(other.shape)}")
        if other.dtype != self.dtype:
            raise TypeError(f"A {op} B: dtypes differ, A is {self.dtype} and B is {other.dtype}")
        if other.device != self.device:
            raise ValueError(f"A {op} B: devices differ, A is on {self.device} and B on {other.device}")

    def __add__(self, other):
        if isinstance(other, LinearOperator):
            self._check_same_space(other, "+")
            return _SumOperator(self, other)
        return NotImplemented

    def __sub__(self, other):
        if isinstance(other, LinearOperator):
            self._check_same_space(other, "-")
            return _SumOperator(self, _ScaledOperator(other, -1.0))
        return NotImplemented

    def __neg__(self):
        return _ScaledOperator(self, -1.0)

    def __pos__(self):
        return self

    def __mul__(self, c):
        if _is_scalar(c):
            return _ScaledOperator(self, c)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c):
        if _is_scalar(c):
            if (isinstance(c, torch.Tensor) and bool(c == 0)) or (not isinstance(c, torch.Tensor) and c == 0):
                raise ZeroDivisionError(f"{type(self).__name__} / c: c is zero")
            return _ScaledOperator(self, 1.0 / c)
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
        return _PowerOperator(self, int(k))

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


# --------------------------------------------------------------------------
# Compositions (private: users write A + B, c * A, A @ B, A.T, A ** k)
# --------------------------------------------------------------------------
class _AdjointOperator(LinearOperator):
    """A.T for an operator with _rmatvec/_rmatmat."""

    def __init__(self, A: LinearOperator):
        super().__init__((A.shape[1], A.shape[0]), A.dtype, A.device,
                         is_symmetric=A.is_symmetric, is_psd=A.is_psd)
        self._op = A
        self._adjoint_cache = A

    def _matvec(self, v):
        return self._op._rmatvec(v)

    def _matmat(self, V):
        return self._op._rmatmat(V)

    def _rmatvec(self, u):
        return self._op._matvec(u)

    def _rmatmat(self, U):
        return self._op._matmat(U)

    def _adjoint(self):
        return self._op

    def _diagonal(self):
        return self._op._diagonal()


def _is_adjoint_pair(L: LinearOperator, R: LinearOperator) -> bool:
    """Whether L is known to be R.T (by identity of the cached adjoint)."""
    return L is R._adjoint_cache or R is L._adjoint_cache or (L is R and R.is_symmetric)


class _ProductOperator(LinearOperator):
    """A @ B."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"A @ B: inner dimensions differ, A is {fmt_shape(A.shape)} and B is "
                             f"{fmt_shape(B.shape)}")
        if A.dtype != B.dtype:
            raise TypeError(f"A @ B: dtypes differ, A is {A.dtype} and B is {B.dtype}")
        if A.device != B.device:
            raise ValueError(f"A @ B: devices differ, A is on {A.device} and B on {B.device}")
        # Congruences X.T @ X and X.T @ D @ X with D symmetric (PSD) are symmetric (PSD).
        sym = psd = False
        if _is_adjoint_pair(A, B):
            sym = psd = True
        elif isinstance(A, _ProductOperator) and A._B.is_symmetric and _is_adjoint_pair(A._A, B):
            sym, psd = True, A._B.is_psd
        super().__init__((A.shape[0], B.shape[1]), A.dtype, A.device, is_symmetric=sym, is_psd=psd)
        self._A, self._B = A, B

    def _matvec(self, v):
        return self._A._matvec(self._B._matvec(v))

    def _matmat(self, V):
        return self._A._matmat(self._B._matmat(V))

    def _rmatvec(self, u):
        return self._B._rmatvec(self._A._rmatvec(u))

    def _rmatmat(self, U):
        return self._B._rmatmat(self._A._rmatmat(U))

    @property
    def has_adjoint(self):
        return self.is_symmetric or (self._A.has_adjoint and self._B.has_adjoint)

    def _adjoint(self):
        if not self.has_adjoint:
            raise NotImplementedError(self._no_adjoint_message())
        return _ProductOperator(self._B.adjoint(), self._A.adjoint())

    def _diagonal(self):
        # diag(D A) = d * diag(A) and diag(A D) = diag(A) * d: cheap only next to a diagonal.
        if isinstance(self._A, Diag):
            return self._A.d[: min(self.shape)] * self._B._diagonal()[: min(self.shape)]
        if isinstance(self._B, Diag):
            return self._A._diagonal()[: min(self.shape)] * self._B.d[: min(self.shape)]
        return super()._diagonal()


class _SumOperator(LinearOperator):
    """A + B."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        super().__init__(A.shape, A.dtype, A.device, is_symmetric=A.is_symmetric and B.is_symmetric,
                         is_psd=A.is_psd and B.is_psd)
        self._A, self._B = A, B

    def _matvec(self, v):
        return self._A._matvec(v) + self._B._matvec(v)

    def _matmat(self, V):
        return self._A._matmat(V) + self._B._matmat(V)

    def _rmatvec(self, u):
        return self._A._rmatvec(u) + self._B._rmatvec(u)

    def _rmatmat(self, U):
        return self._A._rmatmat(U) + self._B._rmatmat(U)

    @property
    def has_adjoint(self):
        return self.is_symmetric or (self._A.has_adjoint and self._B.has_adjoint)

    def _adjoint(self):
        if not self.has_adjoint:
            raise NotImplementedError(self._no_adjoint_message())
        return _SumOperator(self._A.adjoint(), self._B.adjoint())

    def _diagonal(self):
        return self._A._diagonal() + self._B._diagonal()


class _ScaledOperator(LinearOperator):
    """c * A with c a real scalar (number or 0-d tensor, differentiable)."""

    def __init__(self, A: LinearOperator, c):
        nonneg = bool(c >= 0)
        super().__init__(A.shape, A.dtype, A.device, is_symmetric=A.is_symmetric,
                         is_psd=A.is_psd and nonneg)
        self._op, self._c = A, c

    def _matvec(self, v):
        return self._c * self._op._matvec(v)

    def _matmat(self, V):
        return self._c * self._op._matmat(V)

    def _rmatvec(self, u):
        return self._c * self._op._rmatvec(u)

    def _rmatmat(self, U):
        return self._c * self._op._rmatmat(U)

    @property
    def has_adjoint(self):
        return self._op.has_adjoint

    def _adjoint(self):
        return _ScaledOperator(self._op.adjoint(), self._c)

    def _diagonal(self):
        return self._c * self._op._diagonal()


class _PowerOperator(LinearOperator):
    """A ** k, k >= 2, A square: k matvecs per application."""

    def __init__(self, A: LinearOperator, k: int):
        super().__init__(A.shape, A.dtype, A.device, is_symmetric=A.is_symmetric,
                         is_psd=A.is_symmetric and (k % 2 == 0 or A.is_psd))
        self._op, self._k = A, k

    def _matmat(self, V):
        for _ in range(self._k):
            V = self._op._matmat(V)
        return V

    def _rmatmat(self, U):
        for _ in range(self._k):
            U = self._op._rmatmat(U)
        return U

    @property
    def has_adjoint(self):
        return self._op.has_adjoint

    def _adjoint(self):
        return _PowerOperator(self._op.adjoint(), self._k)

    def _diagonal(self):
        if isinstance(self._op, (Diag, Identity, Zero)):
            return self._op._diagonal() ** self._k
        return super()._diagonal()


# --------------------------------------------------------------------------
# Concrete operators
# --------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int, owner: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{owner}: {name} must be {ndim}-D, got shape {fmt_shape(t.shape)}")
    if t.dtype not in REAL_DTYPES:
        raise TypeError(f"{owner}: {name} must have a real floating dtype, got {t.dtype}; "
                        f"convert with {name}.to(torch.float64)")
    return t


class Dense(LinearOperator):
    """A dense (n, m) matrix held as a torch tensor.

    Parameters
    ----------
    M : Tensor, shape (n, m)
    is_symmetric : bool, optional
        Declare symmetry. When omitted, a square M is checked once with
        ``torch.allclose(M, M.T)``.
    is_psd : bool, optional
        Declare M symmetric positive semi-definite (not checked).

    Notes
    -----
    Adjoint: ``M.T``. Diagonal: ``M.diagonal()``. One matvec costs O(nm) time
    and no extra memory. Gradients flow to M.

    Examples
    --------
    >>> import torch, otlinop
    >>> A = otlinop.Dense(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    >>> A.is_symmetric, (A @ torch.ones(2)).tolist()
    (True, [3.0, 4.0])
    """

    def __init__(self, M: torch.Tensor, *, is_symmetric: bool | None = None, is_psd: bool = False):
        _check_tensor("M", M, 2, "Dense")
        if M.layout != torch.strided:
            raise TypeError("Dense: M must be a strided (dense) tensor; use aslinearoperator for sparse tensors")
        if is_symmetric is None:
            is_symmetric = bool(M.shape[0] == M.shape[1] and torch.allclose(M, M.T))
        super().__init__(M.shape, M.dtype, M.device, is_symmetric=is_symmetric or is_psd, is_psd=is_psd)
        self.M = M

    def _matvec(self, v):
        return self.M @ v

    def _matmat(self, V):
        return self.M @ V

    def _rmatvec(self, u):
        return self.M.T @ u

    def _rmatmat(self, U):
        return self.M.T @ U

    def _diagonal(self):
        return self.M.diagonal()

    def to_dense(self):
        return self.M


class Diag(LinearOperator):
    """The diagonal operator ``Diag(d)``, shape (n, n).

    Parameters
    ----------
    d : Tensor, shape (n,)
    psd : bool, optional
        Whether every ``d_i >= 0``, when the caller knows it (e.g. a
        marginal of a plan). None (default): checked at construction,
        which reads one flag back from the device.

    Notes
    -----
    Symmetric; PSD when every ``d_i >= 0``. One matvec costs O(n).
    ``inverse()`` gives ``Diag(1 / d)``.

    Examples
    --------
    >>> import torch, otlinop
    >>> D = otlinop.Diag(torch.tensor([1.0, 2.0]))
    >>> (D @ torch.ones(2)).tolist(), D.inverse().diagonal().tolist()
    ([1.0, 2.0], [1.0, 0.5])
    """

    def __init__(self, d: torch.Tensor, *, psd: bool | None = None):
        _check_tensor("d", d, 1, "Diag")
        if psd is None:
            psd = bool((d >= 0).all()) if d.numel() else True
        elif not isinstance(psd, bool):
            raise TypeError(f"Diag: psd must be a bool or None, got {type(psd).__name__}")
        super().__init__((d.shape[0], d.shape[0]), d.dtype, d.device, is_symmetric=True, is_psd=psd)
        self.d = d

    def _matvec(self, v):
        return self.d * v

    def _matmat(self, V):
        return self.d.unsqueeze(1) * V

    def _diagonal(self):
        return self.d

    def splitting(self):
        return self.d, Zero((self.shape[0], self.shape[0]), dtype=self.dtype, device=self.device)

    def inverse(self) -> "Diag":
        """``Diag(1 / d)``; raises ValueError if some entry is zero."""
        if bool((self.d == 0).any()):
            raise ValueError("Diag.inverse: d has zero entries; the operator is singular")
        return Diag(1.0 / self.d)

    def to_dense(self):
        return torch.diag(self.d)


class Identity(LinearOperator):
    """The identity of size n: symmetric PSD, O(n) matvec (a copy-free return).

    Parameters
    ----------
    n : int
    dtype : torch.dtype, default float32
    device : torch.device or str, default "cpu"
    """

    def __init__(self, n: int, *, dtype=torch.float32, device="cpu"):
        super().__init__((n, n), dtype, device, is_symmetric=True, is_psd=True)

    def _matvec(self, v):
        return v

    def _matmat(self, V):
        return V

    def _diagonal(self):
        return torch.ones(self.shape[0], dtype=self.dtype, device=self.device)


class Zero(LinearOperator):
    """The zero operator of shape (n, m); symmetric PSD when square.

    Parameters
    ----------
    shape : (int, int) or int (square)
    dtype : torch.dtype, default float32
    device : torch.device or str, default "cpu"
    """

    def __init__(self, shape, *, dtype=torch.float32, device="cpu"):
        if isinstance(shape, numbers.Integral):
            shape = (shape, shape)
        shape = tuple(shape)
        square = len(shape) == 2 and shape[0] == shape[1]
        super().__init__(shape, dtype, device, is_symmetric=square, is_psd=square)

    def _matvec(self, v):
        return v.new_zeros(self.shape[0])

    def _matmat(self, V):
        return V.new_zeros((self.shape[0], V.shape[1]))

    def _rmatvec(self, u):
        return u.new_zeros(self.shape[1])

    def _rmatmat(self, U):
        return U.new_zeros((self.shape[1], U.shape[1]))

    def _adjoint(self):
        return Zero((self.shape[1], self.shape[0]), dtype=self.dtype, device=self.device)

    def _diagonal(self):
        return torch.zeros(min(self.shape), dtype=self.dtype, device=self.device)


class BlockOperator(LinearOperator):
    """A block matrix of operators, ``BlockOperator([[A, B], [C, None]])``.

    Parameters
    ----------
    blocks : list of lists
        A rectangular grid of operators (anything ``aslinearoperator`` takes)
        or ``None`` for a zero block. Every block row needs at least one
        operator to fix its height, every block column one to fix its width.
    is_symmetric : bool, optional
        Declare symmetry; by default it is inferred when the diagonal blocks
        are symmetric and each off-diagonal pair is known to be an adjoint pair
        (``blocks[j][i] is blocks[i][j].T``) or both are None.

    Notes
    -----
    Adjoint: the transposed grid of adjoints. Diagonal: when every diagonal
    block is square, the concatenation of their diagonals. One matvec costs
    one matvec of each block.

    Examples
    --------
    >>> import torch, otlinop
    >>> A = otlinop.Diag(torch.ones(2)); B = otlinop.Dense(torch.ones(2, 3))
    >>> K = otlinop.BlockOperator([[A, B], [B.T, None]])
    >>> K.shape, K.is_symmetric
    ((5, 5), True)
    """

    def __init__(self, blocks: Sequence[Sequence[Any]], *, is_symmetric: bool | None = None):
        if not isinstance(blocks, (list, tuple)) or not blocks or not all(
                isinstance(row, (list, tuple)) for row in blocks):
            raise TypeError("BlockOperator: blocks must be a non-empty list of lists, e.g. [[A, B], [C, None]]")
        ncols = len(blocks[0])
        if ncols == 0 or any(len(row) != ncols for row in blocks):
            raise ValueError("BlockOperator: every block row must have the same, non-zero number of blocks; "
                             f"got row lengths {[len(r) for r in blocks]}")
        grid = [[None if b is None else aslinearoperator(b) for b in row] for row in blocks]
        ops = [b for row in grid for b in row if b is not None]
        if not ops:
            raise ValueError("BlockOperator: all blocks are None; the sizes cannot be inferred")
        dtype, device = ops[0].dtype, ops[0].device
        heights: list[int | None] = [None] * len(grid)
        widths: list[int | None] = [None] * ncols
        for i, row in enumerate(grid):
            for j, b in enumerate(row):
                if b is None:
                    continue
                if b.dtype != dtype or b.device != device:
                    raise TypeError(f"BlockOperator: block [{i}][{j}] is {b.dtype} on {b.device}, expected "
                                    f"{dtype} on {device} like the first block")
                for sizes, idx, size, what in ((heights, i, b.shape[0], "rows"), (widths, j, b.shape[1], "columns")):
                    if sizes[idx] is None:
                        sizes[idx] = size
                    elif sizes[idx] != size:
                        raise ValueError(f"BlockOperator: block [{i}][{j}] has shape {fmt_shape(b.shape)}, "
                                         f"but its block {'row' if what == 'rows' else 'column'} has "
                                         f"{sizes[idx]} {what}")
        for name, sizes in (("row", heights), ("column", widths)):
            empty = [k for k, s in enumerate(sizes) if s is None]
            if empty:
                raise ValueError(f"BlockOperator: block {name} {empty[0]} holds only None; its size is unknown")
        self._grid, self._heights, self._widths = grid, heights, widths
        if is_symmetric is None:
            is_symmetric = heights == widths and all(
                (grid[i][i] is None or grid[i][i].is_symmetric) and all(
                    (grid[i][j] is None and grid[j][i] is None)
                    or (grid[i][j] is not None and grid[j][i] is not None
                        and _is_adjoint_pair(grid[j][i], grid[i][j]))
                    for j in range(i + 1, ncols))
                for i in range(len(grid)))
        super().__init__((sum(heights), sum(widths)), dtype, device, is_symmetric=is_symmetric)

    def _apply(self, grid, heights, widths, V):
        parts = torch.split(V, widths, dim=0)
        rows = []
        for i, row in enumerate(grid):
            acc = None
            for j, b in enumerate(row):
                if b is not None:
                    y = b._matmat(parts[j])
                    acc = y if acc is None else acc + y
            rows.append(acc if acc is not None else V.new_zeros((heights[i], V.shape[1])))
        return torch.cat(rows, dim=0)

    def _matmat(self, V):
        return self._apply(self._grid, self._heights, self._widths, V)

    @property
    def has_adjoint(self):
        return self.is_symmetric or all(b is None or b.has_adjoint for row in self._grid for b in row)

    def _adjoint(self):
        if not self.has_adjoint:
            raise NotImplementedError(self._no_adjoint_message())
        transposed = [[None if self._grid[i][j] is None else self._grid[i][j].adjoint()
                       for i in range(len(self._grid))] for j in range(len(self._widths))]
        return BlockOperator(transposed, is_symmetric=self.is_symmetric)

    def _rmatmat(self, U):
        return self._adjoint()._matmat(U)

    def _diagonal(self):
        if self._heights != self._widths:
            return super()._diagonal()
        return torch.cat([
            torch.zeros(self._heights[i], dtype=self.dtype, device=self.device) if self._grid[i][i] is None
            else self._grid[i][i]._diagonal() for i in range(len(self._grid))])

    def block(self, i: int, j: int):
        """The operator in block row i, block column j (None for a zero block)."""
        return self._grid[i][j]


# --------------------------------------------------------------------------
# aslinearoperator
# --------------------------------------------------------------------------
def aslinearoperator(obj, *, dtype: torch.dtype | None = None, device=None) -> LinearOperator:
    """Turn ``obj`` into an otlinop ``LinearOperator``.

    Parameters
    ----------
    obj : LinearOperator, torch.Tensor, numpy.ndarray, scipy sparse matrix/array,
        scipy.sparse.linalg.LinearOperator or linear_operator.LinearOperator
        Dense tensors become ``Dense``; sparse COO/CSR tensors, scipy sparse
        matrices and foreign operators are wrapped.
    dtype, device : optional
        For NumPy and scipy inputs: the torch dtype and device to use
        (default: float64, or float32 for float32 inputs; CPU).

    Returns
    -------
    LinearOperator

    Raises
    ------
    TypeError
        For anything else, naming the type received and the types accepted.

    Examples
    --------
    >>> import numpy as np, otlinop
    >>> A = otlinop.aslinearoperator(np.eye(2))
    >>> A.shape, A.dtype
    ((2, 2), torch.float64)
    """
    if isinstance(obj, LinearOperator):
        return obj
    from ._interop import convert   # at call time: the interop module imports this one
    return convert(obj, dtype=dtype, device=device)


# The solvers convert NumPy arrays, scipy matrices and foreign operators through it.
register_conversion(aslinearoperator)
