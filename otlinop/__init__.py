"""otlinop: matrix-free linear operators and Krylov solvers for entropic optimal
transport (squared Euclidean cost) in PyTorch + Triton."""

from ._base import (BlockOperator, Dense, Diag, Identity, LinearOperator, Zero,
                    aslinearoperator)

__version__ = "0.1.0"

__all__ = [
    "LinearOperator", "Dense", "Diag", "Identity", "Zero", "BlockOperator", "aslinearoperator",
]
