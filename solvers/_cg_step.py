"""The vector work of one conjugate-gradient iteration, fused.

``solvers.cg`` spends an iteration on the operator's product and, around it,
some twenty small operations on vectors and on per-column scalars: two dot
products, two axpys, a norm, the step size, the new direction and the flags
that freeze a column at its own convergence. On a GPU each is a kernel
launch of a microsecond or two; with a product that costs tens of
microseconds (a truncated plan at n = 10k) they take as long as the product.
This module does that work in two launches per iteration:

- :func:`cg_update` after ``Q = A P``: ``pq = <P, Q>``, the step
  ``alpha = rho / pq`` of the columns still active, ``X += alpha P``,
  ``R -= alpha Q``, ``||R||`` (and ``rho_new = <R, R>`` without a
  preconditioner), the iteration count and the flags;
- :func:`cg_direction` after ``Z = M R``: ``rho_new = <R, Z>`` (with a
  preconditioner), ``beta = rho_new / rho``, ``P = Z + beta P``,
  ``rho = rho_new``.

Both update their arguments in place, which is what a captured CUDA graph
of the iteration needs (``cg(graph=True)``). Every scalar is a device
tensor: nothing is read back by the host.

The Triton kernels take one right-hand side (1-D vectors, 0-d scalars) of
float32 or float64 and run as a single program: a dot product's sum needs
every element before the axpys can start, and one program orders that
without atomics or a second launch, sums in a fixed order (identical inputs
give bitwise identical results) and cannot race on the scalars it reads and
writes. One program streams the vectors at a fraction of the GPU's
bandwidth, so it is used up to ``config.cg_fused_max_n`` rows, and only while
``config.cg_fused`` is set (off by default until measured on a GPU;
:func:`fused_backend`); longer vectors, several right-hand sides, other
dtypes (complex included) and the CPU take the torch reference, which is the
same arithmetic as separate torch operations (dots by ``torch.dot`` /
``torch.linalg.vecdot``; for complex vectors the real part of ``torch.vdot``,
the scalars staying real).
The two backends agree to rounding, not bitwise (their sums run in
different orders).
"""

from __future__ import annotations

import os

import torch

from ._config import config

# The solvers depend on torch alone: Triton is optional here (a Linux-only
# dependency of the package), and the kernels below exist only where it imports.
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    HAS_TRITON = False

#: Whether the kernels were created by the Triton interpreter (TRITON_INTERPRET=1
#: when this module was imported: ``triton.jit`` reads it then).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["cg_update", "cg_direction", "check_state", "fused_backend", "real_inner"]

# At 2^15 float32 rows a pass streams 128 KiB per vector, estimated (not
# measured) at a few microseconds for one program. Not yet tuned on a GPU:
# ``python -m otlinop.bench hvp`` times the iteration with and without the
# kernels at n = 10k.
config.declare("cg_fused_max_n", 1 << 15, owner="solvers.cg", doc=(
    "longest right-hand side (rows) that cg's single-program fused kernels take; longer ones use torch ops"))

# Off until measured on a GPU: tested against the torch branch in the
# interpreter; ``python -m otlinop.bench hvp`` times its truncated rows with
# them on and off, side by side.
config.declare("cg_fused", False, owner="solvers.cg", doc=(
    "cg does its vector work in two fused Triton launches per iteration (one CUDA right-hand side of "
    "float32/float64, up to cg_fused_max_n rows)"))

#: Elements per loop step of the kernels, and their warps (16 warps, 8 elements
#: per thread: a loop step's loads are one round trip to L2, and n = 10k takes
#: three). Not yet tuned on a GPU.
_BLOCK = 4096
_NUM_WARPS = 16

_DTYPES = (torch.float32, torch.float64)


def fused_backend(B: torch.Tensor) -> str:
    """The backend the CG iteration takes for right-hand side(s) ``B``:
    "triton" for one CUDA right-hand side (1-D) of float32 or float64 with at
    most ``config.cg_fused_max_n`` rows, when Triton is installed and
    ``config.cg_fused`` is set; "torch" otherwise (complex dtypes always:
    the kernels are real-only)."""
    ok = (config.cg_fused and HAS_TRITON and B.is_cuda and B.ndim == 1 and B.dtype in _DTYPES
          and B.shape[0] <= config.cg_fused_max_n)
    return "triton" if ok else "torch"


if HAS_TRITON:
    @triton.jit
    def _dot(U, V, n, BLOCK: tl.constexpr):
        """``<U, V>`` of two length-n vectors, summed in a fixed order."""
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=U.dtype.element_ty)
        for start in range(0, n, BLOCK):
            idx = start + offs
            ok = idx < n
            acc += tl.load(U + idx, mask=ok, other=0.0) * tl.load(V + idx, mask=ok, other=0.0)
        return tl.sum(acc, axis=0)

    @triton.jit(do_not_specialize=["n"])
    def _update_kernel(P, Q, X, R, RHO, RNORM, ACTIVE, ITERS, FAILED_PQ, RHO_NEW, TOL, n,
                       PRECOND: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        pq = _dot(P, Q, n, BLOCK)
        act = tl.load(ACTIVE) != 0
        step = act & (pq > 0)
        tl.store(FAILED_PQ, tl.where(act != step, pq, tl.load(FAILED_PQ)))
        # Frozen columns take alpha = 0: x and r stay put.
        alpha = tl.where(step, tl.load(RHO) / pq, 0.0)
        acc = tl.zeros((BLOCK,), dtype=P.dtype.element_ty)
        for start in range(0, n, BLOCK):
            idx = start + offs
            ok = idx < n
            p = tl.load(P + idx, mask=ok, other=0.0)
            q = tl.load(Q + idx, mask=ok, other=0.0)
            x = tl.load(X + idx, mask=ok, other=0.0) + alpha * p
            r = tl.load(R + idx, mask=ok, other=0.0) - alpha * q
            tl.store(X + idx, x, mask=ok)
            tl.store(R + idx, r, mask=ok)
            acc += r * r
        rr = tl.sum(acc, axis=0)
        if F64:
            rnorm = tl.sqrt(rr)          # IEEE in float64
        else:
            rnorm = tl.sqrt_rn(rr)       # tl.sqrt would be the approximate fp32 square root
        if not PRECOND:
            tl.store(RHO_NEW, rr)
        tl.store(RNORM, rnorm)
        tl.store(ITERS, tl.load(ITERS) + step.to(tl.int64))
        tl.store(ACTIVE, step & (rnorm > tl.load(TOL)))

    @triton.jit(do_not_specialize=["n"])
    def _direction_kernel(R, Z, P, RHO, RHO_NEW, ACTIVE, FAILED_RHO, n,
                          PRECOND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        act = tl.load(ACTIVE) != 0
        if PRECOND:
            rho_new = _dot(R, Z, n, BLOCK)
            still = act & (rho_new > 0)
            tl.store(FAILED_RHO, tl.where(act != still, rho_new, tl.load(FAILED_RHO)))
            act = still
            tl.store(ACTIVE, act)
            tl.store(RHO_NEW, rho_new)
        else:
            rho_new = tl.load(RHO_NEW)
        # Masked beta keeps p finite in frozen columns (r = 0 would give 0/0).
        beta = tl.where(act, rho_new / tl.load(RHO), 0.0)
        for start in range(0, n, BLOCK):
            idx = start + offs
            ok = idx < n
            p = tl.load(Z + idx, mask=ok, other=0.0) + beta * tl.load(P + idx, mask=ok, other=0.0)
            # A frozen column steps along p = 0: its x stays put even where z is not finite.
            tl.store(P + idx, tl.where(act, p, 0.0), mask=ok)
        tl.store(RHO, rho_new)


def real_inner(U, V, out=None):
    """``<U, V>`` (into ``out``, if given): 0-d for vectors, per column for (n, k).

    For complex vectors, the real part of ``U^H V``: CG's inner products
    (``r^H M r``, ``p^H A p``) are real for a Hermitian A and M, and its
    scalars stay real tensors.
    """
    if U.is_complex():
        d = (torch.vdot(U, V) if U.ndim == 1 else torch.linalg.vecdot(U, V, dim=0)).real
        return d if out is None else out.copy_(d)
    return torch.dot(U, V, out=out) if U.ndim == 1 else torch.linalg.vecdot(U, V, dim=0, out=out)



def check_state(fn: str, vectors: dict, scalars: dict, backend: str) -> None:
    """ValueError unless ``vectors`` (name -> tensor) share one shape, dtype
    and device, ``scalars`` have one entry per column on that device, and
    ``backend`` can run them. :func:`cg_update` and :func:`cg_direction` do
    not check (they run every iteration): their caller does, once."""
    first = next(iter(vectors.values()))
    cols = () if first.ndim == 1 else (first.shape[1],)
    for name, t in vectors.items():
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{fn}: {name} must match the first vector ({tuple(first.shape)}, {first.dtype} on "
                             f"{first.device}), got {tuple(t.shape)}, {t.dtype} on {t.device}")
    for name, t in scalars.items():
        if tuple(t.shape) != cols or t.device != first.device:
            raise ValueError(f"{fn}: {name} must have shape {cols} on {first.device}, got {tuple(t.shape)} "
                             f"on {t.device}")
    if backend not in ("triton", "torch"):
        raise ValueError(f"{fn}: backend must be 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        if first.ndim != 1 or first.dtype not in _DTYPES:
            raise ValueError(f"{fn}: backend='triton' takes 1-D float32 or float64 vectors, got "
                             f"{tuple(first.shape)} {first.dtype}")
        if not all(t.is_contiguous() for t in vectors.values()):
            raise ValueError(f"{fn}: backend='triton' needs contiguous vectors")
        if not HAS_TRITON:
            raise ValueError(f"{fn}: backend='triton' needs the triton package, which is not installed")
        if not first.is_cuda and not _INTERPRETED:
            raise ValueError(f"{fn}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                             "solvers is imported)")


def cg_update(P, Q, X, R, rho, rnorm, active, iters, failed_pq, rho_new, tol, *, precond: bool,
              backend: str = "torch", space=None) -> None:
    """One CG step along the direction ``P``, given ``Q = A P``; in place.

    Parameters
    ----------
    P, Q, X, R : Tensor, shape (n,) or (n, k)
        The direction, its product, the iterate and the residual (X and R
        are updated).
    rho : Tensor, shape () or (k,)
        ``<R, M R>`` of the current residual (read).
    rnorm : Tensor
        Receives ``||R||`` of the new residual.
    active : bool Tensor
        The columns still iterating; receives ``step & (rnorm > tol)``.
    iters : int64 Tensor
        Incremented where a step was taken.
    failed_pq : Tensor
        Receives ``pq = <P, Q>`` where an active column found ``pq <= 0``
        or NaN (A not positive definite, or non-finite values).
    rho_new : Tensor
        Receives ``<R, R>`` of the new residual when ``precond`` is False.
    tol : Tensor
        The stopping tolerance of each column (read).
    precond : bool
        Whether a preconditioner follows (then ``rho_new`` is left to
        :func:`cg_direction`).
    backend : {"torch", "triton"}
        "triton": the fused single-program kernel (one right-hand side,
        float32 or float64, on CUDA or under the interpreter), where Triton
        is installed.
    space : ShardedInnerProduct, optional
        The inner product of vectors split over a process group (the
        operator's ``inner_products``): the dots and the norm are its
        reduced ones (torch backend only). None: the local ones.

    Notes
    -----
    No checks (it runs every iteration): the caller checks the layout once
    with :func:`check_state`.
    """
    if backend == "triton":
        _update_kernel[(1,)](P, Q, X, R, rho, rnorm, active, iters, failed_pq, rho_new, tol, P.shape[0],
                             PRECOND=precond, F64=P.dtype == torch.float64, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        return
    inner = real_inner if space is None else space.real_inner
    pq = inner(P, Q)
    step = active & (pq > 0)
    torch.where(active ^ step, pq, failed_pq, out=failed_pq)
    alpha = torch.where(step, rho / pq, 0.0)
    X.addcmul_(P, alpha)
    R.addcmul_(Q, alpha, value=-1)
    if precond and space is not None:
        rnorm.copy_(space.norm(R))
    elif precond:
        torch.linalg.vector_norm(R, dim=0, out=rnorm)
    else:
        inner(R, R, rho_new)
        torch.sqrt(rho_new, out=rnorm)
    iters.add_(step)
    torch.logical_and(step, rnorm > tol, out=active)


def cg_direction(R, Z, P, rho, rho_new, active, failed_rho, *, precond: bool, backend: str = "torch",
                 space=None) -> None:
    """The next CG direction ``P = Z + beta P``; in place.

    Parameters
    ----------
    R, Z, P : Tensor, shape (n,) or (n, k)
        The residual, ``Z = M R`` (``R`` itself without a preconditioner)
        and the direction (updated; 0 in the columns no longer active, so
        that a masked step leaves their x as it is).
    rho : Tensor, shape () or (k,)
        ``<R, M R>`` of the previous residual; receives ``rho_new``.
    rho_new : Tensor
        With ``precond``: receives ``<R, Z>``. Without: holds ``<R, R>``
        (from :func:`cg_update`).
    active : bool Tensor
        With ``precond``: columns whose ``<R, Z>`` is not positive (M not
        positive definite, or NaN) stop here.
    failed_rho : Tensor
        Receives the ``<R, Z>`` that stopped a column.
    precond, backend, space
        As :func:`cg_update`.
    """
    if backend == "triton":
        _direction_kernel[(1,)](R, Z, P, rho, rho_new, active, failed_rho, P.shape[0], PRECOND=precond,
                                BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        return
    if precond:
        (real_inner if space is None else space.real_inner)(R, Z, rho_new)
        still = active & (rho_new > 0)
        torch.where(active ^ still, rho_new, failed_rho, out=failed_rho)
        active.copy_(still)
    beta = torch.where(active, rho_new / rho, 0.0)
    torch.addcmul(Z, P, beta, out=P)
    # A frozen column steps along p = 0 in the (masked) iterations that follow: its x
    # stays put bitwise, even where r, and so z, is no longer finite (alpha = 0 alone
    # would give x + 0 * nan). Active columns are untouched.
    P.masked_fill_(active.logical_not(), 0.0)
    rho.copy_(rho_new)
