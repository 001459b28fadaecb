"""otlinop: matrix-free linear operators and Krylov solvers for entropic optimal
transport (squared Euclidean cost) in PyTorch + Triton.

- Operators (``LinearOperator``, ``Dense``, ``Diag``, ``BlockOperator``, ...)
  and their algebra; ``aslinearoperator``, ``.to_scipy()``,
  ``.to_linear_operator()``.
- ``PlanOperator``: the entropic plan P, applied by streaming kernels;
  ``P.truncated(tol)``: a sparse ``TruncatedPlanOperator`` with a certified bound.
- ``sinkhorn``, ``SamplesLoss``, ``sinkhorn_loss``: potentials, the loss and
  its analytic gradients and Hessian-vector products.
- ``HessianOperator``: the Schur complement of the dual Hessian, with
  ``splitting()`` and ``diagonal()`` for ``neumann`` and ``jacobi``.
- Solvers (re-exported from the top-level package ``solvers``): ``cg``,
  ``minres``, ``gmres``, ``bicgstab``, ``lsmr``, ``solve``, ``jacobi``,
  ``neumann``. The whole package is also ``otlinop.solvers`` (the same
  objects): ``from otlinop.solvers import cg, jacobi`` cannot be confused
  with another package or folder named ``solvers``.
"""

# First: it checks that the top-level package 'solvers' is the one installed with
# otlinop (a folder named 'solvers' on sys.path can hide it) before the modules
# below import from it.
from . import solvers
from ._base import LinearOperator
from ._operators.concrete import BlockOperator, Dense, Diag, Identity, Zero
from ._operators.sparse import SparseOperator
from ._interop import aslinearoperator
from .plan import PlanOperator, plan_matmul
from .truncated import TruncatedPlanOperator
from .multiscale import BlockSparsePlanOperator, Multiscale
from .marginals import marginal_error, plan_marginals
from .sinkhorn import ConvergenceWarning, SinkhornResult, epsilon_schedule, sinkhorn
from .loss import SamplesLoss, sinkhorn_loss
from .hessian import DualHessianOperator, HessianOperator, dual_hessian
from .hvp import (LossHessianOperator, grad_x, grad_y, hvp, hvp_self, hvp_x, hvp_y,
                  loss_hessian_operator, plan_hvp)
# The subpackage, reached as otlinop.distributed (its names are not re-exported here).
from . import distributed
from solvers import (GraphCache, SolveResult, bicgstab, cg, config, gmres, jacobi, lsmr, minres, neumann,
                     solve)

__version__ = "0.1.0"

__all__ = [
    # operators
    "LinearOperator", "Dense", "Diag", "Identity", "Zero", "BlockOperator", "SparseOperator", "aslinearoperator",
    "PlanOperator", "TruncatedPlanOperator", "BlockSparsePlanOperator", "plan_matmul", "plan_marginals", "marginal_error",
    # Sinkhorn and the loss
    "sinkhorn", "Multiscale", "SinkhornResult", "ConvergenceWarning", "epsilon_schedule", "SamplesLoss", "sinkhorn_loss",
    # second order
    "HessianOperator", "DualHessianOperator", "dual_hessian", "hvp", "plan_hvp", "hvp_x", "hvp_y", "hvp_self",
    "grad_x", "grad_y", "loss_hessian_operator", "LossHessianOperator",
    # solvers
    "cg", "minres", "gmres", "bicgstab", "lsmr", "solve", "SolveResult", "jacobi", "neumann",
    "GraphCache",
    # process-wide switches
    "config",
]
