"""The operator protocol the solvers rely on, and the adaptor ``as_operator``.

An operator has ``shape`` (n, m), ``dtype`` (a real or complex torch dtype),
``device`` and ``A @ v`` for v of shape (m,) or (m, k); optionally ``.T`` (the
transpose, never conjugated), ``.H`` (the conjugate transpose), ``diagonal()``,
``splitting()`` and the flags ``is_symmetric`` / ``is_psd``. The solvers never
import OT code: a package that converts more kinds of objects (NumPy arrays,
scipy matrices, foreign LinearOperators) registers its converter with
:func:`register_conversion` when it is imported, as ``otlinop`` does.

A real operator serves complex vectors through :class:`ComplexifiedOperator`
(``A (u + iv) = A u + i A v``), which is how the solvers promote a real ``A``
when ``b`` or ``x0`` is complex, as scipy does.
"""

from __future__ import annotations

import torch

__all__ = ["as_operator", "register_conversion", "adjoint"]

REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
# Dtypes whose solves run their recurrences in float32 (see WidenedOperator).
HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = REAL_DTYPES + COMPLEX_DTYPES
# The real dtypes with a complex counterpart the solvers take (torch's own
# to_complex() maps float16 to complex32 and bfloat16 to complex64).
_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def complex_of(dtype: torch.dtype) -> torch.dtype | None:
    """The complex dtype of a real dtype's precision (itself if complex), or None."""
    return dtype if dtype in COMPLEX_DTYPES else _COMPLEX_OF.get(dtype)

# The converters registered by packages above the solvers, tried in order by
# as_operator for objects that are neither operators nor dense torch tensors.
CONVERSIONS: list = []


def register_conversion(convert) -> None:
    """Let :func:`as_operator` convert more kinds of objects with ``convert(obj)``.

    ``convert`` returns an operator or raises TypeError. Registering the same
    function twice keeps one copy. ``otlinop`` registers
    ``otlinop.aslinearoperator`` when it is imported.
    """
    if not callable(convert):
        raise TypeError(f"register_conversion: convert must be callable, got {type(convert).__name__}")
    if convert not in CONVERSIONS:
        CONVERSIONS.append(convert)


def fmt_shape(shape) -> str:
    shape = tuple(int(s) for s in shape)
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def is_operator(obj) -> bool:
    """Whether ``obj`` already follows the operator protocol (tensors excluded)."""
    if isinstance(obj, torch.Tensor):
        return False
    return (hasattr(obj, "shape") and isinstance(getattr(obj, "dtype", None), torch.dtype)
            and hasattr(obj, "device") and hasattr(type(obj), "__matmul__"))


class DenseOperator:
    """A strided (n, m) torch tensor seen through the operator protocol.

    Adjoint: the transposed view. Diagonal: ``M.diagonal()``. One matvec costs
    O(nm). ``is_symmetric`` is an exact ``M == M.T`` test, made on first use.
    """

    is_psd = False

    def __init__(self, M: torch.Tensor):
        self.M = M
        self.shape = (int(M.shape[0]), int(M.shape[1]))
        self.dtype = M.dtype
        self.device = M.device
        self._T = None
        self._symmetric = None

    @property
    def is_symmetric(self) -> bool:
        if self._symmetric is None:
            # One pass over M and one host sync, outside any solver loop.
            self._symmetric = self.shape[0] == self.shape[1] and bool(torch.equal(self.M, self.M.mT))
        return self._symmetric

    def __matmul__(self, v):
        return self.M @ v

    @property
    def T(self) -> "DenseOperator":
        if self._T is None:
            self._T = DenseOperator(self.M.mT)
            self._T._T = self
        return self._T

    @property
    def H(self) -> "DenseOperator":
        """The conjugate transpose (``T`` for a real matrix)."""
        if not self.M.is_complex():
            return self.T
        return DenseOperator(self.M.mH)

    def diagonal(self) -> torch.Tensor:
        return self.M.diagonal()

    def _differentiable_tensors(self) -> tuple:
        return (self.M,) if self.M.requires_grad else ()

    def to_dense(self) -> torch.Tensor:
        return self.M

    def __repr__(self) -> str:
        return f"<dense {self.shape[0]}x{self.shape[1]} {self.dtype} on {self.device}>"


class ComplexifiedOperator:
    """A real (n, m) operator applied to complex vectors: ``A (u + iv) = A u + i A v``.

    One product of the real operator with 2k columns (the real and imaginary
    parts side by side) per product with k complex columns. Its dtype is the
    complex dtype of A's precision; ``T``, ``H`` and ``diagonal()`` follow A's.
    """

    def __init__(self, A):
        self.operator = A
        self.shape = tuple(int(s) for s in A.shape)
        self.dtype = complex_of(A.dtype)
        self.device = A.device
        self.is_symmetric = bool(getattr(A, "is_symmetric", False))
        self.is_psd = bool(getattr(A, "is_psd", False))

    def __matmul__(self, V):
        if V.ndim == 1:
            W = self.operator @ torch.stack([V.real, V.imag], dim=1)
            return torch.complex(W[:, 0], W[:, 1])
        k = V.shape[1]
        W = self.operator @ torch.cat([V.real, V.imag], dim=1)
        return torch.complex(W[:, :k], W[:, k:])

    @property
    def T(self) -> "ComplexifiedOperator":
        return ComplexifiedOperator(self.operator.T)

    @property
    def H(self) -> "ComplexifiedOperator":
        # A is real: its adjoint is its transpose.
        return self.T

    def diagonal(self) -> torch.Tensor:
        return self.operator.diagonal().to(self.dtype)

    def _differentiable_tensors(self) -> tuple:
        fn = getattr(self.operator, "_differentiable_tensors", None)
        return tuple(fn()) if callable(fn) else ()

    def __repr__(self) -> str:
        return f"<complex view of {self.operator!r}>"


class _ConjugateTranspose:
    """``A^H v = conj(A^T conj(v))`` for a complex operator with a (non-conjugating) ``.T`` only."""

    def __init__(self, A):
        self._AT = A.T
        self.shape = tuple(int(s) for s in self._AT.shape)
        self.dtype, self.device = A.dtype, A.device

    def __matmul__(self, V):
        return (self._AT @ V.conj()).conj()

    def __repr__(self) -> str:
        return f"<conjugate transpose of {self._AT!r}.T>"


def adjoint(A):
    """The adjoint ``A^H`` of an operator: ``A.H`` if it has one, else ``A.T`` for
    a real operator, else ``conj(A.T conj(v))``.

    Raises AttributeError or NotImplementedError (from the operator) when A
    has neither.
    """
    H = getattr(type(A), "H", None)
    if H is not None:
        return A.H
    if A.dtype in COMPLEX_DTYPES:
        return _ConjugateTranspose(A)
    return A.T


class WidenedOperator:
    """A float16 or bfloat16 operator applied to float32 vectors.

    The solvers run their recurrences in float32 for half inputs (half
    precision cannot hold their scalars, and torch lacks some half kernels):
    each product casts the vector to A's dtype, applies A in its own
    arithmetic and returns the result in float32. ``T``, ``H`` and
    ``diagonal()`` follow A's.
    """

    def __init__(self, A):
        self.operator = A
        self.shape = tuple(int(s) for s in A.shape)
        self.dtype = torch.float32
        self.device = A.device
        self.is_symmetric = bool(getattr(A, "is_symmetric", False))
        self.is_psd = bool(getattr(A, "is_psd", False))

    def __matmul__(self, V):
        return (self.operator @ V.to(self.operator.dtype)).to(torch.float32)

    @property
    def T(self) -> "WidenedOperator":
        return WidenedOperator(self.operator.T)

    @property
    def H(self) -> "WidenedOperator":
        return WidenedOperator(adjoint(self.operator))

    def diagonal(self) -> torch.Tensor:
        return self.operator.diagonal().to(torch.float32)

    def __repr__(self) -> str:
        return f"<float32 view of {self.operator!r}>"


def promote(A, dtype: torch.dtype):
    """``A`` for vectors of ``dtype``: A itself, its complex view when A is
    real and ``dtype`` the complex dtype of the same precision, or its float32
    view when A is float16 or bfloat16 and ``dtype`` float32 (the only
    promotions the solvers make)."""
    if A.dtype == dtype:
        return A
    if A.dtype in HALF_DTYPES and dtype == torch.float32:
        return WidenedOperator(A)
    if A.dtype in REAL_DTYPES and dtype == complex_of(A.dtype):
        return ComplexifiedOperator(A)
    raise TypeError(f"cannot apply an operator of dtype {A.dtype} to vectors of dtype {dtype}")


class CallableOperator:
    """A user function ``r -> M r`` seen as an (n, n) operator.

    ``vector_input`` says whether the solver was given a 1-D right-hand side;
    the function then receives 1-D vectors, as the user would expect.
    """

    is_symmetric = False
    is_psd = False

    def __init__(self, fn, n: int, dtype, device, vector_input: bool):
        self._fn = fn
        self.shape = (n, n)
        self.dtype = dtype
        self.device = device
        self._vector_input = vector_input

    def __matmul__(self, V):
        if self._vector_input and V.ndim == 2 and V.shape[1] == 1:
            return self._fn(V[:, 0]).reshape(-1, 1)
        return self._fn(V)

    def __repr__(self) -> str:
        return f"<callable preconditioner {self._fn!r}>"


def as_operator(A, *, name: str = "A", caller: str = "as_operator"):
    """Return ``A`` as an object following the solvers' operator protocol.

    Parameters
    ----------
    A : operator, torch.Tensor, numpy.ndarray, scipy sparse matrix, scipy or
        linear_operator LinearOperator
        Objects that already have ``shape``, a torch ``dtype``, ``device`` and
        ``@`` are returned unchanged. A dense 2-D torch tensor is wrapped in a
        small private class; everything else goes through the converters
        registered with :func:`register_conversion` (``otlinop`` registers
        ``otlinop.aslinearoperator``: import it first).
    name, caller : str
        Used in error messages ("cg: A must be ...").

    Returns
    -------
    operator

    Raises
    ------
    TypeError
        If ``A`` cannot be converted.
    ValueError
        If a tensor is not 2-D.

    Examples
    --------
    >>> import torch
    >>> from solvers._operator import as_operator
    >>> A = as_operator(torch.eye(3, dtype=torch.float64))
    >>> A.shape, (A @ torch.ones(3, dtype=torch.float64)).tolist()
    ((3, 3), [1.0, 1.0, 1.0])
    """
    if is_operator(A):
        if len(tuple(A.shape)) != 2:
            raise ValueError(f"{caller}: {name} must be 2-D, got shape {fmt_shape(A.shape)}")
        return A
    if isinstance(A, torch.Tensor):
        if A.ndim != 2:
            raise ValueError(f"{caller}: {name} must be a 2-D matrix or an operator, got a tensor of shape "
                             f"{fmt_shape(A.shape)}")
        if A.dtype not in DTYPES:
            raise TypeError(f"{caller}: {name} has dtype {A.dtype}, expected a floating or complex dtype "
                            f"(float32, float64, complex64 or complex128); convert with {name}.to(torch.float64)")
        if A.layout == torch.strided:
            return DenseOperator(A)
    if not CONVERSIONS:
        raise TypeError(
            f"{caller}: {name} must be an operator (shape, dtype, device, @) or a dense 2-D torch tensor, "
            f"got {type(A).__name__}; `import otlinop` first to pass NumPy arrays, scipy matrices or "
            "foreign LinearOperators")
    errors = []
    for convert in CONVERSIONS:
        try:
            return convert(A)
        except TypeError as err:
            errors.append(str(err))
    raise TypeError(f"{caller}: {name} could not be used as a linear operator: {'; '.join(errors)}")
