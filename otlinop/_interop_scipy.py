"""``ScipyView``: an otlinop operator seen as a ``scipy.sparse.linalg.LinearOperator``
(what ``A.to_scipy()`` returns).

A module of its own because it subclasses scipy's class and so imports scipy:
``otlinop._interop`` imports it only when a view is asked for, which keeps
``import otlinop`` free of scipy. The class is defined at module level so that
views pickle (with the operator they wrap).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla

from ._base import LinearOperator
from ._checks import operator_operand_shape

__all__ = ["ScipyView"]

#: scipy's dtype of a view (NumPy has no bfloat16: its products come back in float32).
_NUMPY_DTYPE = {"float16": np.float16, "bfloat16": np.float32, "float32": np.float32, "float64": np.float64,
                "complex64": np.complex64, "complex128": np.complex128}


class ScipyView(sla.LinearOperator):
    """A ``scipy.sparse.linalg.LinearOperator`` that applies an otlinop operator.

    NumPy vectors go to the operator's device in its dtype (a complex vector on
    a real operator in the complex counterpart: the imaginary part is kept),
    are multiplied there and come back as NumPy arrays.

    Parameters
    ----------
    operator : otlinop.LinearOperator

    Attributes
    ----------
    operator : otlinop.LinearOperator
        The operator this view applies.
    args : tuple
        ``()``: the view is a leaf of scipy's operator algebra (like an
        operator built by ``scipy.sparse.linalg.LinearOperator(shape, matvec)``).
    dtype : numpy.dtype
        The operator's dtype in NumPy (float32 for bfloat16).

    Notes
    -----
    ``H`` / ``adjoint()`` and ``T`` / ``transpose()`` are views of the
    operator's own adjoint and transpose. A vector of the wrong length raises a
    ValueError that names the shapes (scipy's own says "dimension mismatch").
    Pickling pickles the operator.
    """

    def __init__(self, operator: LinearOperator):
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"ScipyView: operator must be an otlinop LinearOperator, got "
                            f"{type(operator).__name__}; use otlinop.aslinearoperator first")
        super().__init__(dtype=_NUMPY_DTYPE[str(operator.dtype).replace("torch.", "")], shape=operator.shape)
        self.operator = operator
        self.args = ()

    def __reduce__(self):
        return (ScipyView, (self.operator,))

    # scipy's public methods check shapes with a bare "dimension mismatch":
    # check first, naming the shapes, then let scipy do the rest.
    def _check(self, method: str, x, form: str, what: str):
        x = np.asanyarray(x)
        length = self.shape[0] if what == "rows" else self.shape[1]
        operator_operand_shape(self.operator, f"to_scipy().{method}", "x", x.shape, form, length, what)
        return x

    def matvec(self, x):
        return super().matvec(self._check("matvec", x, "vector", "columns"))

    def dot(self, x):
        # scipy >= 1.18 checks an array's shape in dot (so in A @ x) before matvec / matmat
        # see it: send 1-D and 2-D arrays to them here, so that the check is this view's.
        if not (isinstance(x, sla.LinearOperator) or np.isscalar(x) or hasattr(x, "tocsr")):
            arr = np.asanyarray(x)
            if arr.ndim == 1:
                return self.matvec(arr)
            if arr.ndim == 2:
                return self.matmat(arr)
        return super().dot(x)

    def rmatvec(self, x):
        return super().rmatvec(self._check("rmatvec", x, "vector", "rows"))

    def matmat(self, X):
        if not hasattr(X, "tocsr"):   # scipy refuses sparse operands with its own message
            X = self._check("matmat", X, "matrix", "columns")
        return super().matmat(X)

    def rmatmat(self, X):
        if not hasattr(X, "tocsr"):
            X = self._check("rmatmat", X, "matrix", "rows")
        return super().rmatmat(X)

    def _matvec(self, x):
        return self.operator.matvec(x)

    def _matmat(self, X):
        return self.operator.matmat(X)

    def _rmatvec(self, x):
        return self.operator.rmatvec(x)

    def _rmatmat(self, X):
        return self.operator.rmatmat(X)

    def _adjoint(self):
        if self.operator.has_adjoint:
            return ScipyView(self.operator.adjoint())
        return super()._adjoint()

    def _transpose(self):
        if self.operator.has_adjoint:
            return ScipyView(self.operator.transpose())
        return super()._transpose()
