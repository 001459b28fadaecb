"""The operator algebra: the operators that ``A.H``, ``A.T``, ``A @ B``,
``A + B``, ``c * A`` and ``A ** k`` return, and the dtype promotion they share.

Users never name these classes; ``LinearOperator``'s methods build them
(``otlinop._base``). Each propagates what its operands offer: an adjoint, a
cheap diagonal, symmetry and definiteness. Applying one applies its operands'
hooks (``_matvec``, ``_rmatmat``, ...) directly: the public method of the
outer operator has checked the operand once.

Dtypes promote as torch's do (``torch.promote_types``): the operands of a sum,
a product or a block operator are brought to one dtype by ``conform``. An
operand whose dtype adapts (``Identity(n)``) is rebuilt in it; any other keeps
its own and is wrapped in a ``CastOperator``, which rounds its input to the
operand's dtype and widens its output (a real operand applies to the real and
imaginary parts of a complex input at once).
"""

from __future__ import annotations

import numbers

import torch

from .._base import LinearOperator, complex_dtype_of, is_adjoint_pair
from .._checks import composable
from .concrete import Diag, Identity, Zero

__all__ = ["AdjointOperator", "TransposeOperator", "CastOperator", "ProductOperator", "SumOperator",
           "ScaledOperator", "PowerOperator", "promoted", "conform"]


# ----------------------------------------------------------------- promotion
def promoted(ops) -> tuple:
    """``(dtype, device)`` that the operators ``ops`` combine in.

    The dtype promotes those of the operators whose dtype does not adapt (all
    of them when every one adapts); an adapting complex operand makes it
    complex. The device is that of the operators whose device does not adapt
    (the caller has checked they agree).
    """
    fixed = [op.dtype for op in ops if not op.adapts_dtype] or [op.dtype for op in ops]
    dtype = fixed[0]
    for other in fixed[1:]:
        dtype = torch.promote_types(dtype, other)
    if not dtype.is_complex and any(op.adapts_dtype and op.dtype.is_complex for op in ops):
        dtype = complex_dtype_of(dtype)
    devices = [op.device for op in ops if not op.adapts_device]
    return dtype, (devices[0] if devices else ops[0].device)


def conform(op: LinearOperator, dtype: torch.dtype, device: torch.device) -> LinearOperator:
    """``op`` as an operator of ``dtype`` (at least as wide as its own) on ``device``."""
    if op.dtype == dtype and op.device == device:
        return op
    out = op._astype(dtype, device)
    return out if out.dtype == dtype else CastOperator(out, dtype)


def _conform_pair(A, B):
    if A.dtype == B.dtype and A.device == B.device:
        return A, B
    dtype, device = promoted((A, B))
    return conform(A, dtype, device), conform(B, dtype, device)


def _conj(c):
    """The complex conjugate of a scalar (number or 0-d tensor)."""
    if type(c) in (int, float):
        return c
    if isinstance(c, torch.Tensor):
        return c.conj() if c.is_complex() else c
    return c.conjugate() if isinstance(c, complex) else c


def _real_part_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


# ------------------------------------------------------------------ adjoints
class AdjointOperator(LinearOperator):
    """A.H for an operator with _rmatvec/_rmatmat."""

    def __init__(self, A: LinearOperator):
        super().__init__((A.shape[1], A.shape[0]), A.dtype, A.device,
                         is_symmetric=A.is_symmetric, is_psd=A.is_psd, transpose_of=A)
        self._op = A
        self.args = (A,)
        self.adapts_dtype, self.adapts_device = A.adapts_dtype, A.adapts_device

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

    def _astype(self, dtype, device):
        if self.adapts_dtype or self.adapts_device:
            return conform(self._op, dtype, device).adjoint()
        return super()._astype(dtype, device)

    def _diagonal(self):
        d = self._op._diagonal()
        return d.conj() if d.is_complex() else d

    # What to_linear_operator rebuilds on other tensors (otlinop._interop_linop): the
    # algebra's operators are built from their operands as written (``args``), and
    # rebuilt through the methods that built them, which promote dtypes again.
    def _parts(self):
        return (self._op,)

    def _from_parts(self, parts, *, dtype, device):
        return parts[0].adjoint()


class TransposeOperator(LinearOperator):
    """A.T (no conjugation) of a complex operator: ``A.T v = conj(A.H conj(v))``."""

    def __init__(self, A: LinearOperator):
        # The transpose of a Hermitian (PSD) matrix is Hermitian (PSD): it is its conjugate.
        super().__init__((A.shape[1], A.shape[0]), A.dtype, A.device, is_symmetric=A.is_symmetric,
                         is_psd=A.is_psd)
        self._op = A
        self.args = (A,)
        self.adapts_dtype, self.adapts_device = A.adapts_dtype, A.adapts_device

    def _matvec(self, v):
        return self._op._rmatvec(v.conj()).conj()

    def _matmat(self, V):
        return self._op._rmatmat(V.conj()).conj()

    def _rmatvec(self, u):
        return self._op._matvec(u.conj()).conj()

    def _rmatmat(self, U):
        return self._op._matmat(U.conj()).conj()

    @property
    def has_adjoint(self):
        return self._op.has_adjoint

    def _transpose(self):
        return self._op

    def _diagonal(self):
        return self._op._diagonal()

    def _parts(self):
        return (self._op,)

    def _from_parts(self, parts, *, dtype, device):
        return parts[0].transpose()


class CastOperator(LinearOperator):
    """An operator presented in a wider dtype: it computes in its own.

    The input is rounded to the operand's dtype and the output widened; a real
    operand applies to a complex input's real and imaginary parts as 2k real
    columns (exact: a real matrix maps real and imaginary parts separately).
    """

    def __init__(self, A: LinearOperator, dtype: torch.dtype, *, transpose_of: LinearOperator | None = None):
        super().__init__(A.shape, dtype, A.device, is_symmetric=A.is_symmetric, is_psd=A.is_psd,
                         transpose_of=transpose_of)
        self._op = A
        self.args = (A,)

    def _apply(self, V, vec, mat):
        A = self._op
        if V.is_complex() and not A.dtype.is_complex:
            rows = V.shape[0]
            parts = torch.view_as_real(V.resolve_conj().resolve_neg()).reshape(rows, -1)   # (m, 2k), or (m, 2) for a vector
            Y = mat(parts.to(A.dtype)).to(_real_part_dtype(self.dtype))
            return torch.view_as_complex(Y.reshape(Y.shape[0], *V.shape[1:], 2).contiguous())
        X = V.to(A.dtype)
        return (vec(X) if V.ndim == 1 else mat(X)).to(self.dtype)

    def _matvec(self, v):
        return self._apply(v, self._op._matvec, self._op._matmat)

    def _matmat(self, V):
        return self._apply(V, self._op._matvec, self._op._matmat)

    def _rmatvec(self, u):
        return self._apply(u, self._op._rmatvec, self._op._rmatmat)

    def _rmatmat(self, U):
        return self._apply(U, self._op._rmatvec, self._op._rmatmat)

    @property
    def has_adjoint(self):
        return self._op.has_adjoint

    def _adjoint(self):
        return CastOperator(self._op.adjoint(), self.dtype, transpose_of=self)

    def _transpose(self):
        return CastOperator(self._op.transpose(), self.dtype)

    def _astype(self, dtype, device):
        return CastOperator(self._op, dtype)

    def _diagonal(self):
        return self._op._diagonal().to(self.dtype)

    def _parts(self):
        return (self._op,)

    def _from_parts(self, parts, *, dtype, device):
        # ``dtype`` is this operator's dtype as the bridge converts it; never narrower than the operand.
        A = parts[0]
        return conform(A, torch.promote_types(A.dtype, dtype), A.device)


# -------------------------------------------------------------- combinations
class ProductOperator(LinearOperator):
    """A @ B."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        composable(A, B)
        # Congruences X.H @ X and X.H @ D @ X with D self-adjoint (PSD) are self-adjoint (PSD).
        sym = psd = False
        if is_adjoint_pair(A, B):
            sym = psd = True
        elif isinstance(A, ProductOperator) and A._B.is_symmetric and is_adjoint_pair(A._A, B):
            sym, psd = True, A._B.is_psd
        self.args = (A, B)   # the operands as written; _A and _B are them in the product's dtype
        A, B = _conform_pair(A, B)
        super().__init__((A.shape[0], B.shape[1]), A.dtype, A.device, is_symmetric=sym, is_psd=psd)
        self._A, self._B = A, B
        self.adapts_dtype = A.adapts_dtype and B.adapts_dtype
        self.adapts_device = A.adapts_device and B.adapts_device

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
        return ProductOperator(self._B.adjoint(), self._A.adjoint())

    def _transpose(self):
        return ProductOperator(self._B.transpose(), self._A.transpose())

    def _astype(self, dtype, device):
        if self.adapts_dtype or self.adapts_device:
            return ProductOperator(conform(self._A, dtype, device), conform(self._B, dtype, device))
        return super()._astype(dtype, device)

    def _diagonal(self):
        # diag(D A) = d * diag(A) and diag(A D) = diag(A) * d: cheap only next to a diagonal.
        if isinstance(self._A, Diag):
            return self._A.d[: min(self.shape)] * self._B._diagonal()[: min(self.shape)]
        if isinstance(self._B, Diag):
            return self._A._diagonal()[: min(self.shape)] * self._B.d[: min(self.shape)]
        return super()._diagonal()

    def _parts(self):
        return self.args

    def _from_parts(self, parts, *, dtype, device):
        return ProductOperator(*parts)


class SumOperator(LinearOperator):
    """A + B."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        self.args = (A, B)   # the operands as written; _A and _B are them in the sum's dtype
        A, B = _conform_pair(A, B)
        super().__init__(A.shape, A.dtype, A.device, is_symmetric=A.is_symmetric and B.is_symmetric,
                         is_psd=A.is_psd and B.is_psd)
        self._A, self._B = A, B
        self.adapts_dtype = A.adapts_dtype and B.adapts_dtype
        self.adapts_device = A.adapts_device and B.adapts_device

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
        return SumOperator(self._A.adjoint(), self._B.adjoint())

    def _transpose(self):
        return SumOperator(self._A.transpose(), self._B.transpose())

    def _astype(self, dtype, device):
        if self.adapts_dtype or self.adapts_device:
            return SumOperator(conform(self._A, dtype, device), conform(self._B, dtype, device))
        return super()._astype(dtype, device)

    def _diagonal(self):
        return self._A._diagonal() + self._B._diagonal()

    def _parts(self):
        return self.args

    def _from_parts(self, parts, *, dtype, device):
        return SumOperator(*parts)


def _is_real_scalar(c) -> bool:
    if type(c) in (int, float):
        return True
    if isinstance(c, torch.Tensor):
        return not c.is_complex() or bool(c.imag == 0)
    return isinstance(c, numbers.Real) or c.imag == 0


class ScaledOperator(LinearOperator):
    """c * A with c a real or complex scalar (number or 0-d tensor, differentiable).

    A scaled operator scaled again keeps one factor (``(3 * A) / 3`` has
    ``args == (A, 1.0)``), as scipy's does.
    """

    def __init__(self, A: LinearOperator, c):
        if type(c) not in (int, float) and isinstance(c, numbers.Number) and hasattr(c, "item"):
            c = c.item()   # a NumPy scalar: torch wants Python's
        if isinstance(A, ScaledOperator):
            A, c = A.args[0], A._c * c
        if type(c) in (int, float) or isinstance(c, numbers.Real):   # the common case, without torch's promotion
            dtype = A.dtype
        else:
            dtype = torch.result_type(torch.empty(0, dtype=A.dtype), c)
            if dtype == torch.complex32:   # float16 * 1j: complex32 is not an operator dtype
                dtype = torch.complex64
        sym = A.is_symmetric and _is_real_scalar(c)
        psd = A.is_psd and sym and bool(c.real >= 0)
        self.args = (A, c)
        if dtype != A.dtype and not A.adapts_dtype:   # an adapting A takes any dtype as it is
            A = conform(A, dtype, A.device)
        super().__init__(A.shape, dtype, A.device, is_symmetric=sym, is_psd=psd)
        self._op, self._c, self._c_conj = A, c, _conj(c)
        self.adapts_dtype = A.adapts_dtype
        # A 0-d tensor on an accelerator ties the operator to that device.
        self.adapts_device = A.adapts_device and not (isinstance(c, torch.Tensor) and c.device.type != "cpu")

    def _matvec(self, v):
        return self._c * self._op._matvec(v)

    def _matmat(self, V):
        return self._c * self._op._matmat(V)

    def _rmatvec(self, u):
        return self._c_conj * self._op._rmatvec(u)

    def _rmatmat(self, U):
        return self._c_conj * self._op._rmatmat(U)

    @property
    def has_adjoint(self):
        return self._op.has_adjoint

    def _adjoint(self):
        return ScaledOperator(self._op.adjoint(), self._c_conj)

    def _transpose(self):
        return ScaledOperator(self._op.transpose(), self._c)

    def _astype(self, dtype, device):
        if self.adapts_dtype or self.adapts_device:
            return ScaledOperator(conform(self._op, dtype, device), self._c)
        return super()._astype(dtype, device)

    def _diagonal(self):
        return self._c * self._op._diagonal()

    def _parts(self):
        return self.args

    def _from_parts(self, parts, *, dtype, device):
        return ScaledOperator(*parts)


class PowerOperator(LinearOperator):
    """A ** k, k >= 2, A square: k matvecs per application."""

    def __init__(self, A: LinearOperator, k: int):
        super().__init__(A.shape, A.dtype, A.device, is_symmetric=A.is_symmetric,
                         is_psd=A.is_symmetric and (k % 2 == 0 or A.is_psd))
        self._op, self._k = A, k
        self.args = (A, k)
        self.adapts_dtype, self.adapts_device = A.adapts_dtype, A.adapts_device

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
        return PowerOperator(self._op.adjoint(), self._k)

    def _transpose(self):
        return PowerOperator(self._op.transpose(), self._k)

    def _astype(self, dtype, device):
        if self.adapts_dtype or self.adapts_device:
            return PowerOperator(conform(self._op, dtype, device), self._k)
        return super()._astype(dtype, device)

    def _diagonal(self):
        if isinstance(self._op, (Diag, Identity, Zero)):
            return self._op._diagonal() ** self._k
        return super()._diagonal()

    def _parts(self):
        return self.args

    def _from_parts(self, parts, *, dtype, device):
        return PowerOperator(*parts)
