"""The operator layer's private modules, built on ``LinearOperator``
(``otlinop._base``):

- ``algebra``: what ``A.H``, ``A.T``, ``A @ B``, ``A + B``, ``c * A``, ``A ** k``
  return, and how their dtypes promote;
- ``concrete``: ``Dense``, ``Diag``, ``Identity``, ``Zero``, ``BlockOperator``;
- ``numpy_operands``: products with NumPy operands (``A @ ndarray``);
- ``plan_product``: the differentiable product with the entropic plan, under
  ``PlanOperator`` and ``plan_matmul`` (``otlinop.plan``).

Users import these names from ``otlinop`` (and ``otlinop.plan``).
"""

# ``otlinop._base`` imports ``algebra`` and ``concrete`` at its end, once
# ``LinearOperator`` exists; importing it first here keeps that order whichever
# module of the package is imported first.
from .._base import LinearOperator  # noqa: F401
