"""Krylov solvers and preconditioners for matrix-free operators.

Every solver takes an operator (anything with ``shape``, ``dtype``,
``device`` and ``@``; dense torch tensors, NumPy arrays and scipy matrices
are converted), one right-hand side of shape (n,) or k of shape (n, k), and
scipy's keyword names (``x0``, ``rtol``, ``atol``, ``maxiter``, ``M``,
``callback``); it returns a ``SolveResult``. ``solve`` adds gradients by the
implicit function theorem. See docs/solvers.md for choosing among them.

``solvers.graphs`` holds the CUDA-graph machinery of ``cg(graph=...)``
(``GraphCache``, ``capture``, ``CudaGraphs``). The package depends on torch
alone (Triton optionally) and knows nothing of optimal transport. otlinop
exposes it as ``otlinop.solvers`` too (the same objects), a name that says
which of the packages called ``solvers`` is meant.
"""

from ._config import Config, config
from ._inner_products import ShardedInnerProduct
from ._operator import register_conversion
from ._result import SolveResult
from .bicgstab import bicgstab
from .cg import cg
from .gmres import gmres
from .graphs import GraphCache
from .incomplete import ichol0, ilu0
from .lsmr import lsmr
from .lstsq import lstsq
from .minres import minres
from .preconditioners import PreconditionerFactory, jacobi, neumann
from .solve import solve
from .triangular import spsolve_triangular

__all__ = [
    "cg",
    "minres",
    "gmres",
    "bicgstab",
    "lsmr",
    "lstsq",
    "solve",
    "SolveResult",
    "GraphCache",
    "jacobi",
    "neumann",
    "ichol0",
    "ilu0",
    "spsolve_triangular",
    "PreconditionerFactory",
    "config",
    "Config",
    "register_conversion",
    "ShardedInnerProduct",
]
