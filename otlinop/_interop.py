"""Bridges between otlinop operators and torch sparse tensors, NumPy, scipy and
GPyTorch's ``linear_operator`` package: ``aslinearoperator`` in, ``to_scipy``
(``A.to_scipy()``) out; ``A.to_linear_operator()`` is in ``_interop_linop``.

scipy and linear_operator are imported lazily so that ``import otlinop`` stays
cheap and works without the optional ``linear_operator`` package.
"""

from __future__ import annotations

import numpy as np
import torch

from solvers import register_conversion

from ._base import LinearOperator
from ._checks import fmt_shape
from ._operators.concrete import Dense
from ._operators.sparse import SparseOperator

__all__ = ["aslinearoperator", "to_scipy"]

_NUMPY_TO_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                   np.dtype(np.float64): torch.float64, np.dtype(np.complex64): torch.complex64,
                   np.dtype(np.complex128): torch.complex128}
_TORCH_TO_NUMPY = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32,
                   torch.float64: np.float64, torch.complex64: np.complex64, torch.complex128: np.complex128}


def _torch_dtype_for(np_dtype, dtype):
    """The torch dtype of a NumPy or scipy input: ``dtype`` when given; else its own,
    float64 for integers and extended precision, complex128 for extended complex."""
    if dtype is not None:
        return dtype
    np_dtype = np.dtype(np_dtype)
    return _NUMPY_TO_TORCH.get(np_dtype, torch.complex128 if np_dtype.kind == "c" else torch.float64)


class _ScipyOperator(LinearOperator):
    """Wraps a scipy sparse matrix/array or scipy LinearOperator (host memory).

    Vectors are moved to the host, multiplied by scipy and moved back.
    """

    def __init__(self, A, dtype, device):
        super().__init__(A.shape, dtype, device)
        self.A = A
        self._AH = None   # the adjoint, built on first use

    def _host(self, V):
        return V.detach().cpu().resolve_conj().resolve_neg().numpy().astype(self._np_dtype(), copy=False)

    def _np_dtype(self):
        return _TORCH_TO_NUMPY[self.dtype]

    def _back(self, arr):
        return torch.as_tensor(np.ascontiguousarray(arr), dtype=self.dtype, device=self.device)

    def _matmat(self, V):
        return self._back(self._columns(self.A @ self._host(V), self.shape[0], V.shape[1]))

    def _rmatmat(self, U):
        if self._AH is None:
            import scipy.sparse as sp
            self._AH = self.A.conj().T if sp.issparse(self.A) else self.A.H
        return self._back(self._columns(self._AH @ self._host(U), self.shape[1], U.shape[1]))

    @staticmethod
    def _columns(out, rows: int, k: int):
        """scipy's product as (rows, k). scipy <= 1.17 reshapes what a user's matvec returns, (n,) or
        (n, 1), itself; 1.18 hands back (n, k, 1) for a matvec written for its batches, returning
        ``A @ x[..., None]``. Anything else keeps its shape (and the operator check names it)."""
        out = np.asarray(out)
        return out.reshape(rows, k) if out.ndim != 2 and out.size == rows * k else out

    def _diagonal(self):
        import scipy.sparse as sp
        if sp.issparse(self.A):
            return self._back(self.A.diagonal())
        return super()._diagonal()


class _GPyTorchOperator(LinearOperator):
    """Wraps a ``linear_operator.LinearOperator`` of shape (n, m) (no batch dims)."""

    def __init__(self, L):
        if len(L.shape) != 2:
            raise ValueError(f"aslinearoperator: a linear_operator object must be 2-D (no batch dims), "
                             f"got shape {fmt_shape(L.shape)}")
        super().__init__(tuple(L.shape), L.dtype, L.device)
        self.L = L

    def _matmat(self, V):
        return self.L @ V

    def _rmatmat(self, U):
        if self.dtype.is_complex:
            return (self.L.mT @ U.conj()).conj()
        return self.L.mT @ U

    def _diagonal(self):
        if self.shape[0] == self.shape[1]:
            return self.L.diagonal()
        return super()._diagonal()

    def to_dense(self):
        return self.L.to_dense()


def aslinearoperator(obj, *, dtype: torch.dtype | None = None, device=None) -> LinearOperator:
    """Turn ``obj`` into an otlinop ``LinearOperator``.

    Parameters
    ----------
    obj : LinearOperator, torch.Tensor, numpy.ndarray, scipy sparse matrix/array,
        scipy.sparse.linalg.LinearOperator or linear_operator.LinearOperator
        Dense tensors become ``Dense``, sparse COO/CSR tensors (2-D or
        batched 3-D) ``SparseOperator``; scipy sparse matrices and foreign
        operators are wrapped.
    dtype, device : optional
        For NumPy and scipy inputs: the torch dtype and device to use
        (default: the input's own float16, float32, float64, complex64 or
        complex128; float64 for integers and extended precision, complex128
        for extended complex; CPU). The ``to_scipy()`` view of an otlinop
        operator gives that operator back.

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
    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.strided:
            return Dense(obj if dtype is None else obj.to(dtype))
        if obj.layout in (torch.sparse_coo, torch.sparse_csr):
            return SparseOperator(obj if dtype is None else obj.to(dtype))
        raise TypeError(f"aslinearoperator: torch layout {obj.layout} is not supported; "
                        "use a dense, sparse COO or sparse CSR tensor")
    if isinstance(obj, np.ndarray):
        if obj.ndim != 2:
            raise ValueError(f"aslinearoperator: a NumPy array must be 2-D, got shape {fmt_shape(obj.shape)}")
        if obj.dtype.kind not in "iufc":
            raise TypeError(f"aslinearoperator: NumPy dtype {obj.dtype} is not supported; use a real or complex "
                            "floating dtype (integers become float64)")
        t = torch.as_tensor(np.ascontiguousarray(obj), dtype=_torch_dtype_for(obj.dtype, dtype),
                            device=device or "cpu")
        return Dense(t)
    import scipy.sparse as sp
    import scipy.sparse.linalg as sla

    from ._interop_scipy import ScipyView
    if isinstance(obj, ScipyView) and dtype is None and device is None:
        return obj.operator
    if sp.issparse(obj) or isinstance(obj, sla.LinearOperator):
        if len(obj.shape) != 2:
            raise ValueError(f"aslinearoperator: expected 2-D {type(obj).__name__}, got shape {fmt_shape(obj.shape)}; "
                             "a batch of operators (scipy >= 1.18 has them) is not an otlinop operator: convert "
                             "each matrix of the batch")
        tdtype = _torch_dtype_for(obj.dtype if obj.dtype is not None else np.float64, dtype)
        return _ScipyOperator(obj, tdtype, device or "cpu")
    try:
        import linear_operator
    except ImportError:  # optional dependency
        linear_operator = None
    if linear_operator is not None and isinstance(obj, linear_operator.LinearOperator):
        return _GPyTorchOperator(obj)
    raise TypeError(
        f"aslinearoperator: cannot convert {type(obj).__module__}.{type(obj).__name__}; expected an otlinop "
        "LinearOperator, a torch tensor (dense, sparse COO or CSR), a NumPy array, a scipy sparse matrix, "
        "a scipy.sparse.linalg.LinearOperator or a linear_operator.LinearOperator")


# The solvers convert NumPy arrays, scipy matrices and foreign operators through it.
register_conversion(aslinearoperator)


# --------------------------------------------------------------------------
# Outgoing
# --------------------------------------------------------------------------
def to_scipy(A: LinearOperator):
    """``A.to_scipy()``: see ``LinearOperator.to_scipy``."""
    from ._interop_scipy import ScipyView   # imports scipy: only when asked for
    return ScipyView(A)
