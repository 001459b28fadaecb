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

from ._inner_products import EUCLIDEAN, inner_products_of
from ._operator import (COMPLEX_DTYPES, DTYPES, HALF_DTYPES, REAL_DTYPES, CallableOperator, ComplexifiedOperator,
                        DenseOperator, WidenedOperator, as_operator, complex_of, fmt_shape, is_operator, promote)

# On the CPU a host sync costs nothing, so test every iteration; on an
# accelerator each sync stalls the launch queue, so test every 10.
_CHECK_EVERY_ACCELERATOR = 10


@dataclass
class Problem:
    """A validated linear system: ``op`` (n, m), ``B`` (n, k), ``X0`` (m, k) or None.

    ``dtype`` is the dtype the solve runs in (``B``'s and ``X0``'s; ``op`` is
    promoted to it), ``real_dtype`` that of its norms and of the scalars of
    Hermitian methods. ``base_op`` is the operator before promotion.
    ``out_dtype`` is the dtype of the returned x: ``dtype``, except for
    float16 and bfloat16 inputs, whose solve runs in float32 (``op`` then
    applies A in its own dtype to float32 vectors).
    ``space`` and ``space_out`` are the inner products of A's input and output
    vectors (``EUCLIDEAN``, or a ``ShardedInnerProduct`` the operator declares:
    the solvers take every dot and norm from them); ``n_total``, ``m_total``
    the rows and columns of the whole A (``n``, ``m`` are this process's).
    """

    op: object
    B: torch.Tensor
    X0: torch.Tensor | None
    vector: bool
    n: int
    m: int
    k: int
    dtype: torch.dtype
    real_dtype: torch.dtype
    base_op: object
    out_dtype: torch.dtype = None
    space: object = EUCLIDEAN
    space_out: object = EUCLIDEAN
    n_total: int = None
    m_total: int = None


def _same_device(t: torch.device, dev: torch.device) -> bool:
    dev = torch.device(dev)
    return t.type == dev.type and (dev.index is None or t.index is None or t.index == dev.index)


def _solve_dtype(caller: str, op_dtype: torch.dtype, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a solve of A (``op_dtype``) with a vector of ``dtype``.

    scipy's rule restricted to one precision: the solve is complex when A or
    the vector is, and A, b and x0 must share their precision (a float32
    operator cannot be applied in float64, nor the reverse without loss).
    """
    if dtype not in DTYPES:
        raise TypeError(f"{caller}: {name} has dtype {dtype}, expected a floating or complex dtype like A "
                        f"({op_dtype}); convert with {name}.to({op_dtype})")
    if dtype in COMPLEX_DTYPES:
        want = complex_of(op_dtype)
    else:
        want = op_dtype.to_real()
    if dtype != want:
        if want is None:
            raise TypeError(f"{caller}: {name} has dtype {dtype}, but A has dtype {op_dtype}, which has no "
                            "complex counterpart; use a float32 or float64 operator for complex systems")
        raise TypeError(f"{caller}: {name} has dtype {dtype}, but A has dtype {op_dtype}; "
                        f"convert with {name}.to({want})")
    return dtype if dtype in COMPLEX_DTYPES else op_dtype


def setup(caller: str, A, b, x0, *, square: bool, scalar_b: bool = False) -> Problem:
    """Validate ``A``, ``b`` and ``x0``; return them as 2-D tensors of the solve's dtype.

    The solve runs in the complex dtype when any of A, b and x0 is complex (a
    real A is then applied to the real and imaginary parts); columns of b that
    are zero get x0 = 0, so that they stop at once with x = 0 (scipy's
    ``b = 0`` rule). With ``scalar_b`` (lsmr), a number or a 0-d tensor is
    accepted as b when A has one row.
    """
    op = as_operator(A, caller=caller)
    n, m = (int(s) for s in op.shape)
    space_out, space = inner_products_of(op)
    if square and n != m:
        raise ValueError(f"{caller}: A must be square, got shape {fmt_shape(op.shape)}; "
                         "use lsmr for rectangular least-squares problems")
    if op.dtype not in DTYPES:
        raise TypeError(f"{caller}: A has dtype {op.dtype}, expected float32, float64, complex64 or complex128")
    if scalar_b and n == 1:
        if isinstance(b, numbers.Number) and not isinstance(b, bool):
            b = torch.tensor([b], dtype=complex_of(op.dtype) if isinstance(b, complex) else op.dtype,
                             device=op.device)
        elif isinstance(b, torch.Tensor) and b.ndim == 0:
            b = b.reshape(1)
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{caller}: b must be a torch.Tensor of shape ({n},) or ({n}, k), got "
                        f"{type(b).__name__}; convert with torch.as_tensor(b, dtype={op.dtype})")
    if b.ndim not in (1, 2) or b.shape[0] != n:
        raise ValueError(f"{caller}: b has shape {fmt_shape(b.shape)}, expected ({n},) or ({n}, k) "
                         f"since A has shape {fmt_shape(op.shape)}")
    dtype = _solve_dtype(caller, op.dtype, "b", b.dtype)
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
        x_dtype = _solve_dtype(caller, op.dtype, "x0", x0.dtype)
        if x_dtype in COMPLEX_DTYPES:
            dtype = x_dtype
        if not _same_device(x0.device, op.device):
            raise ValueError(f"{caller}: x0 is on {x0.device}, but A is on {op.device}; "
                             f"move it with x0.to('{op.device}')")
        if not bool(torch.isfinite(x0).all()):
            raise ValueError(f"{caller}: x0 contains NaN or inf; pass a finite initial guess or None")
        # A copy, so that a result returned without iterating never aliases the caller's x0.
        X0 = (x0.unsqueeze(1) if vector else x0).to(dtype, copy=True)
        # scipy returns x = 0 for b = 0 whatever x0: such columns start (and stop) at 0.
        nonzero = (B != 0).any(dim=0)
        if space_out.sharded:   # a column of b is zero only if it is on every rank
            nonzero = space_out.reduce(nonzero.to(torch.int64)) > 0
        X0 = torch.where(nonzero, X0, torch.zeros((), dtype=dtype, device=X0.device))
    # Half precision cannot carry a Krylov recurrence (its scalars underflow and its
    # residuals stall at ~1e-3): the vectors and scalars run in float32, A in its own dtype.
    out_dtype = dtype
    if dtype in HALF_DTYPES:
        dtype = torch.float32
        if X0 is not None:
            X0 = X0.to(dtype)
    B = B.to(dtype)
    base = op
    op = promote(op, dtype)
    return Problem(op=op, B=B, X0=X0, vector=vector, n=n, m=m, k=k, dtype=dtype, real_dtype=dtype.to_real(),
                   base_op=base, out_dtype=out_dtype, space=space, space_out=space_out,
                   n_total=space_out.total(n), m_total=space.total(m))


def check_tolerance(caller: str, name: str, value) -> float:
    """A stopping tolerance: a non-negative float, ``inf`` included (it stops at once).

    ValueError for a negative or NaN value, and for None or a string (scipy's
    former ``atol=None`` / ``'legacy'`` settings, which scipy refuses with a
    ValueError too); TypeError for other non-numbers.
    """
    if value is None or isinstance(value, str):
        raise ValueError(f"{caller}: {name} must be a non-negative float, got {value!r}; "
                         f"scipy's former {name}=None and 'legacy' settings are gone, pass a number")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a non-negative float, got {type(value).__name__}")
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{caller}: {name} must be a non-negative float (inf stops at once), got {value!r}")
    return value


def check_maxiter(caller: str, maxiter, default: int) -> int:
    if maxiter is None:
        return max(int(default), 1)
    if isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral):
        raise TypeError(f"{caller}: maxiter must be a positive int or None, got {type(maxiter).__name__}")
    if maxiter < 1:
        raise ValueError(f"{caller}: maxiter must be >= 1, got {maxiter}")
    return int(maxiter)


def check_every_for(caller: str, check_every, device, *, accelerator: int = _CHECK_EVERY_ACCELERATOR) -> int:
    """``check_every`` checked; None gives 1 on the CPU and ``accelerator`` elsewhere."""
    if check_every is None:
        return 1 if torch.device(device).type == "cpu" else accelerator
    if isinstance(check_every, bool) or not isinstance(check_every, numbers.Integral) or check_every < 1:
        raise ValueError(f"{caller}: check_every must be a positive int or None, got {check_every!r}")
    return int(check_every)


def check_callback(caller: str, callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"{caller}: callback must be callable as callback(xk), got {type(callback).__name__}")


def bind_preconditioner(caller: str, M, op, vector: bool, *, spd: bool):
    """Turn ``M`` into an (n, n) operator of ``op``'s dtype, or None for no preconditioner.

    ``M`` may be a factory (``jacobi()``, ``neumann(3)``, any object with
    ``bind``), an operator, a dense tensor or a callable ``r -> M r``. With
    ``spd=True`` (cg, minres), the preconditioners of this package that know
    they are not positive definite are refused. In a complex solve a real M
    of the same precision is applied to real and imaginary parts; a factory
    is bound to the real operator itself when ``op`` is its complex view.
    """
    if M is None:
        return None
    n = int(op.shape[0])
    # A half solve runs in float32: M is taken in A's own dtype and widened like A.
    m_dtype = op.operator.dtype if isinstance(op, WidenedOperator) else op.dtype
    if hasattr(M, "bind") and not is_operator(M):
        M = M.bind(op.operator if isinstance(op, ComplexifiedOperator) else op)
    elif isinstance(M, torch.Tensor):
        if M.ndim != 2:
            raise TypeError(f"{caller}: M must be an operator, a 2-D tensor, a callable r -> M r or a "
                            f"factory such as jacobi(), got a tensor of shape {fmt_shape(M.shape)}; "
                            "for a diagonal preconditioner use jacobi() or otlinop.Diag(1 / d)")
        M = DenseOperator(M)
    elif not is_operator(M):
        if callable(M):
            return promote(CallableOperator(M, n, m_dtype, op.device, vector), op.dtype)
        M = as_operator(M, name="M", caller=caller)
    if tuple(int(s) for s in M.shape) != (n, n):
        raise ValueError(f"{caller}: M has shape {fmt_shape(M.shape)}, expected ({n}, {n}) like A")
    if M.dtype not in (op.dtype, m_dtype) and not (M.dtype in REAL_DTYPES and complex_of(M.dtype) == op.dtype):
        raise TypeError(f"{caller}: M has dtype {M.dtype}, but A has dtype {m_dtype}")
    if not _same_device(torch.device(M.device), op.device):
        raise ValueError(f"{caller}: M is on {M.device}, but A is on {op.device}")
    # This package's preconditioners say why they are not positive definite when they know it.
    why_not = getattr(M, "why_not_definite", None) if spd else None
    if isinstance(why_not, str):
        raise ValueError(f"{caller}: M={M!r} is not positive definite ({why_not}); "
                         f"{caller} needs an SPD preconditioner: use gmres or bicgstab, or fix the diagonal")
    return promote(M, op.dtype)


def col_dot(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Column-wise inner products ``U_j^H V_j`` of (n, k) tensors, shape (k,).

    The first argument is conjugated (``torch.linalg.vecdot``), as in
    ``numpy.vdot``: for complex vectors ``col_dot(U, U)`` is ``||U_j||^2``.
    """
    return torch.linalg.vecdot(U, V, dim=0)


def col_dot_real(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The real part of :func:`col_dot`: the inner products of the Hermitian
    methods (``r^H M r``, ``v^H A v``), real in exact arithmetic; the same
    tensor for real inputs."""
    return torch.linalg.vecdot(U, V, dim=0).real


def col_norm(U: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(U, dim=0)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0``, so frozen columns stay finite."""
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


def stop_tolerance(bnorm: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """``max(rtol ||b_j||, atol)`` per column; ``rtol = inf`` gives inf where b_j != 0
    and ``atol`` where b_j = 0 (not NaN: such a column has x = 0 and stops at once)."""
    rel = rtol * bnorm
    if math.isinf(rtol):
        rel = torch.where(bnorm > 0, rel, torch.zeros_like(rel))
    return torch.clamp(rel, min=atol)


def tolerance(caller: str, B: torch.Tensor, rtol: float, atol: float, norm=col_norm):
    """(||b_j||, max(rtol ||b_j||, atol)) per column; ``norm``: the problem's (``Problem.space``)."""
    bnorm = norm(B)
    return bnorm, stop_tolerance(bnorm, rtol, atol)


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
