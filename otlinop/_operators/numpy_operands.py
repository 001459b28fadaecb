"""What an operator does with a NumPy operand: ``A @ x``, ``A.matvec(x)``,
``x @ A`` ... for an ndarray (or a list) x, as ``scipy.sparse.linalg``
operators do, so that code written for those runs on otlinop's.

The operand goes to the operator's device in the operator's dtype (in the
operand's own for an operator whose dtype adapts, such as ``Identity(n)``),
or in its complex counterpart for a complex operand on a real operator: the
real operator then applies to the real and imaginary parts, and nothing is
dropped. The product runs without autograd and comes back as a NumPy array.
"""

from __future__ import annotations

import numbers
import sys

import numpy as np
import torch

from .._base import LinearOperator, complex_dtype_of
from .._checks import operator_operand_shape
from .algebra import CastOperator

__all__ = ["is_scalar", "is_sparse_matrix", "numeric_array", "numpy_product"]

#: The NumPy dtype a product in each torch dtype comes back in (NumPy has no bfloat16).
NUMPY_OF = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32,
            torch.float64: np.float64, torch.complex64: np.complex64, torch.complex128: np.complex128}


def is_scalar(c) -> bool:
    """A number (Python or NumPy, complex included) or a 0-d tensor; not a bool."""
    if type(c) in (int, float):
        return True
    if isinstance(c, (bool, np.bool_)):
        return False
    if isinstance(c, numbers.Number):
        return True
    return isinstance(c, torch.Tensor) and c.ndim == 0 and c.dtype != torch.bool


def is_sparse_matrix(obj) -> bool:
    """A scipy sparse matrix or array (without importing scipy when nobody has)."""
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and sparse.issparse(obj)


def numeric_array(obj):
    """``obj`` as a NumPy array of numbers (bools, integers, floats, complex), or None."""
    if isinstance(obj, (torch.Tensor, LinearOperator)) or is_sparse_matrix(obj):
        return None
    try:
        arr = np.asarray(obj)
    except Exception:   # an object NumPy cannot read is not an operand of ours
        return None
    return arr if arr.dtype.kind in "biufc" else None


def _compute_dtype(A: LinearOperator, np_dtype) -> torch.dtype:
    kind = np_dtype.kind
    if A.adapts_dtype:
        if kind == "c":
            return torch.complex64 if np_dtype == np.complex64 else torch.complex128
        if kind == "f":
            return {2: torch.float16, 4: torch.float32}.get(np_dtype.itemsize, torch.float64)
        return torch.float64   # integers and bools, as NumPy's own products of them with floats
    return complex_dtype_of(A.dtype) if kind == "c" else A.dtype


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.to("cpu").resolve_conj().resolve_neg().numpy()


def numpy_product(A: LinearOperator, method: str, name: str, x, form: str, what: str, *, adjoint: bool = False,
                  arr=None) -> np.ndarray:
    """``A x`` (``A.H x`` with ``adjoint``) for the NumPy operand ``x`` (or ``arr``, already read).

    ``method``, ``name``, ``form`` and ``what`` are those of
    ``otlinop._checks.operator_operand_shape``, which checks the shape.
    """
    if arr is None:
        arr = numeric_array(x)
        if arr is None:
            raise TypeError(f"{type(A).__name__}.{method}: {name} must be a torch.Tensor or a NumPy array "
                            f"of numbers, got {type(x).__name__}")
    length = A.shape[0] if what == "rows" else A.shape[1]
    operator_operand_shape(A, method, name, arr.shape, form, length, what)
    dtype = _compute_dtype(A, arr.dtype)
    op = A if (dtype == A.dtype or A.adapts_dtype) else CastOperator(A, dtype)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=NUMPY_OF[dtype])).to(A.device, dtype)
    with torch.no_grad():
        if t.ndim == 1:
            y = op._rmatvec(t) if adjoint else op._matvec(t)
        else:
            y = op._rmatmat(t) if adjoint else op._matmat(t)
    return _to_numpy(y)
