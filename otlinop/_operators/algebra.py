"""The operator algebra: the operators that ``A.T``, ``A @ B``, ``A + B``,
``c * A`` and ``A ** k`` return.

Users never name these classes; ``LinearOperator``'s methods build them
(``otlinop._base``). Each propagates what its operands offer: an adjoint, a
cheap diagonal, symmetry and definiteness. Applying one applies its operands'
hooks (``_matvec``, ``_rmatmat``, ...) directly: the public method of the
outer operator has checked the operand once.
"""

from __future__ import annotations

from .._base import LinearOperator, is_adjoint_pair
from .._checks import composable
from .concrete import Diag, Identity, Zero

__all__ = ["AdjointOperator", "ProductOperator", "SumOperator", "ScaledOperator", "PowerOperator"]


class AdjointOperator(LinearOperator):
    """A.T for an operator with _rmatvec/_rmatmat."""

    def __init__(self, A: LinearOperator):
        super().__init__((A.shape[1], A.shape[0]), A.dtype, A.device,
                         is_symmetric=A.is_symmetric, is_psd=A.is_psd, transpose_of=A)
        self._op = A

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

    # What to_linear_operator rebuilds on other tensors (otlinop._interop_linop).
    def _parts(self):
        return (self._op,)

    def _from_parts(self, parts, *, dtype, device):
        return parts[0].adjoint()


class ProductOperator(LinearOperator):
    """A @ B."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        composable(A, B)
        # Congruences X.T @ X and X.T @ D @ X with D symmetric (PSD) are symmetric (PSD).
        sym = psd = False
        if is_adjoint_pair(A, B):
            sym = psd = True
        elif isinstance(A, ProductOperator) and A._B.is_symmetric and is_adjoint_pair(A._A, B):
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
        return ProductOperator(self._B.adjoint(), self._A.adjoint())

    def _diagonal(self):
        # diag(D A) = d * diag(A) and diag(A D) = diag(A) * d: cheap only next to a diagonal.
        if isinstance(self._A, Diag):
            return self._A.d[: min(self.shape)] * self._B._diagonal()[: min(self.shape)]
        if isinstance(self._B, Diag):
            return self._A._diagonal()[: min(self.shape)] * self._B.d[: min(self.shape)]
        return super()._diagonal()

    def _parts(self):
        return (self._A, self._B)

    def _from_parts(self, parts, *, dtype, device):
        return ProductOperator(*parts)


class SumOperator(LinearOperator):
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
        return SumOperator(self._A.adjoint(), self._B.adjoint())

    def _diagonal(self):
        return self._A._diagonal() + self._B._diagonal()

    def _parts(self):
        return (self._A, self._B)

    def _from_parts(self, parts, *, dtype, device):
        return SumOperator(*parts)


class ScaledOperator(LinearOperator):
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
        return ScaledOperator(self._op.adjoint(), self._c)

    def _diagonal(self):
        return self._c * self._op._diagonal()

    def _parts(self):
        return (self._op, self._c)

    def _from_parts(self, parts, *, dtype, device):
        return ScaledOperator(*parts)


class PowerOperator(LinearOperator):
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
        return PowerOperator(self._op.adjoint(), self._k)

    def _diagonal(self):
        if isinstance(self._op, (Diag, Identity, Zero)):
            return self._op._diagonal() ** self._k
        return super()._diagonal()

    def _parts(self):
        return (self._op, self._k)

    def _from_parts(self, parts, *, dtype, device):
        return PowerOperator(*parts)
