"""Argument checks and small numerical helpers shared by the solvers.

Every check here runs once, before the iteration loop; the only host
synchronisations they cause (``isfinite(...).all()``, the preconditioner's
diagonal checks) happen there.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ._operator import REAL_DTYPES, CallableOperator, DenseOperator, as_operator, fmt_shape, is_operator

# On the CPU a host sync costs nothing, so test every iteration; on an
# accelerator each sync stalls the launch queue, so test every 10.
_CHECK_EVERY_ACCELERATOR = 10


@dataclass
class Problem:
    """A validated linear system: ``op`` (n, m), ``B`` (n, k), ``X0`` (m, k) or None."""

    op: object
    B: torch.Tensor
    X0: torch.Tensor | None
    vector: bool
    n: int
    m: int
    k: int


def _same_device(t: torch.device, dev: torch.device) -> bool:
    dev = torch.device(dev)
    return t.type == dev.type and (dev.index is None or t.index is None or t.index == dev.index)


def setup(caller: str, A, b, x0, *, square: bool) -> Problem:
    """Validate ``A``, ``b`` and ``x0``; return them as 2-D tensors."""
    op = as_operator(A, caller=caller)
    n, m = (int(s) for s in op.shape)
    if square and n != m:
        raise ValueError(f"{caller}: A must be square, got shape {fmt_shape(op.shape)}; "
                         "use lsmr for rectangular least-squares problems")
    if op.dtype not in REAL_DTYPES:
        raise TypeError(f"{caller}: A has dtype {op.dtype}, expected float32 or float64")
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{caller}: b must be a torch.Tensor of shape ({n},) or ({n}, k), got "
                        f"{type(b).__name__}; convert with torch.as_tensor(b, dtype={op.dtype})")
    if b.ndim not in (1, 2) or b.shape[0] != n:
        raise ValueError(f"{caller}: b has shape {fmt_shape(b.shape)}, expected ({n},) or ({n}, k) "
                         f"since A has shape {fmt_shape(op.shape)}")
    if b.dtype != op.dtype:
        raise TypeError(f"{caller}: b has dtype {b.dtype}, but A has dtype {op.dtype}; "
                        f"convert with b.to({op.dtype})")
    if not _same_device(b.device, op.device):
        raise ValueError(f"{caller}: b is on {b.device}, but A is on {op.device}; "
                         f"move it with b.to('{op.device}')")
    vector = b.ndim == 1
    B = b.unsqueeze(1) if vector else b
    k = B.shape[1]
    if not bool(torch.isfinite(B).all()):
        raise ValueError(f"{caller}: b contains NaN or inf; the solution is undefined")
    X0 = None
    if x0 is not None:
        want = (m,) if vector else (m, k)
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"{caller}: x0 must be a torch.Tensor of shape {fmt_shape(want)}, got "
                            f"{type(x0).__name__}")
        if tuple(x0.shape) != want:
            raise ValueError(f"{caller}: x0 has shape {fmt_shape(x0.shape)}, expected {fmt_shape(want)} "
                             f"(like b, with A's {m} columns)")
        if x0.dtype != op.dtype:
            raise TypeError(f"{caller}: x0 has dtype {x0.dtype}, but A has dtype {op.dtype}; "
                            f"convert with x0.to({op.dtype})")
        if not _same_device(x0.device, op.device):
            raise ValueError(f"{caller}: x0 is on {x0.device}, but A is on {op.device}; "
                             f"move it with x0.to('{op.device}')")
        if not bool(torch.isfinite(x0).all()):
            raise ValueError(f"{caller}: x0 contains NaN or inf; pass a finite initial guess or None")
        # A copy, so that a result returned without iterating never aliases the caller's x0.
        X0 = (x0.unsqueeze(1) if vector else x0).clone()
    return Problem(op=op, B=B, X0=X0, vector=vector, n=n, m=m, k=k)


def check_tolerance(caller: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a non-negative float, got {type(value).__name__}")
    value = float(value)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{caller}: {name} must be a finite non-negative float, got {value!r}")
    return value


def check_maxiter(caller: str, maxiter, default: int) -> int:
    if maxiter is None:
        return max(int(default), 1)
    if isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral):
        raise TypeError(f"{caller}: maxiter must be a positive int or None, got {type(maxiter).__name__}")
    if maxiter < 1:
        raise ValueError(f"{caller}: maxiter must be >= 1, got {maxiter}")
    return int(maxiter)


def check_every_for(caller: str, check_every, device) -> int:
    if check_every is None:
        return 1 if torch.device(device).type == "cpu" else _CHECK_EVERY_ACCELERATOR
    if isinstance(check_every, bool) or not isinstance(check_every, numbers.Integral) or check_every < 1:
        raise ValueError(f"{caller}: check_every must be a positive int or None, got {check_every!r}")
    return int(check_every)


def check_callback(caller: str, callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"{caller}: callback must be callable as callback(xk), got {type(callback).__name__}")


def bind_preconditioner(caller: str, M, op, vector: bool, *, spd: bool):
    """Turn ``M`` into an (n, n) operator, or None for no preconditioner.

    ``M`` may be a factory (``jacobi()``, ``neumann(3)``, any object with
    ``bind``), an operator, a dense tensor or a callable ``r -> M r``. With
    ``spd=True`` (cg, minres), the preconditioners of this package that know
    they are not positive definite are refused.
    """
    if M is None:
        return None
    n = int(op.shape[0])
    if hasattr(M, "bind") and not is_operator(M):
        M = M.bind(op)
    elif isinstance(M, torch.Tensor):
        if M.ndim != 2:
            raise TypeError(f"{caller}: M must be an operator, a 2-D tensor, a callable r -> M r or a "
                            f"factory such as jacobi(), got a tensor of shape {fmt_shape(M.shape)}; "
                            "for a diagonal preconditioner use jacobi() or otlinop.Diag(1 / d)")
        M = DenseOperator(M)
    elif not is_operator(M):
        if callable(M):
            return CallableOperator(M, n, op.dtype, op.device, vector)
        M = as_operator(M, name="M", caller=caller)
    if tuple(int(s) for s in M.shape) != (n, n):
        raise ValueError(f"{caller}: M has shape {fmt_shape(M.shape)}, expected ({n}, {n}) like A")
    if M.dtype != op.dtype:
        raise TypeError(f"{caller}: M has dtype {M.dtype}, but A has dtype {op.dtype}")
    if not _same_device(torch.device(M.device), op.device):
        raise ValueError(f"{caller}: M is on {M.device}, but A is on {op.device}")
    # This package's preconditioners say why they are not positive definite when they know it.
    why_not = getattr(M, "why_not_definite", None) if spd else None
    if isinstance(why_not, str):
        raise ValueError(f"{caller}: M={M!r} is not positive definite ({why_not}); "
                         f"{caller} needs an SPD preconditioner: use gmres or bicgstab, or fix the diagonal")
    return M


def col_dot(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Column-wise inner products of (n, k) tensors, shape (k,)."""
    return torch.linalg.vecdot(U, V, dim=0)


def col_norm(U: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(U, dim=0)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0``, so frozen columns stay finite."""
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


def tolerance(caller: str, B: torch.Tensor, rtol: float, atol: float):
    """(||b_j||, max(rtol ||b_j||, atol)) per column."""
    bnorm = col_norm(B)
    return bnorm, torch.clamp(rtol * bnorm, min=atol)


def as_output(X: torch.Tensor, vector: bool) -> torch.Tensor:
    return X[:, 0] if vector else X


def apply(op, V: torch.Tensor, vector: bool) -> torch.Tensor:
    """``op @ V`` for V of shape (m, k).

    When the caller's b was 1-D the operator gets a 1-D vector: that is what
    a user's operator expects, and a dense (n, n) @ (n, 1) product can take a
    much slower GEMM path than GEMV.
    """
    if vector:
        return (op @ V[:, 0]).unsqueeze(1)
    return op @ V
