"""The value checks of two weighted clouds in one Triton launch (``otlinop._checks``).

:func:`otlinop._checks.measures_and_read` checks, before a Sinkhorn loss or
solve, that the points are finite and their costs stay finite, that the
weights are finite and >= 0 with positive masses whose product is finite (and
equal masses for balanced OT), and reads the default diameter. In torch these
are about forty small launches (reductions over the clouds, then a few
elementwise ops on each result), all before the first soft-min. On CUDA
:func:`measure_flags` computes the same flags, in the same order, from one
single-program pass over the data (the clouds' per-coordinate extremes, the
weights' signs and masses), and returns the extremes too: the default
diameter is theirs.

A single program streams everything: O((n + m) d) reads, which is what the
torch reductions read too, without their launches. It is used for CUDA tensors
of float32, float16 or bfloat16 points in contiguous memory (the torch path
serves the rest: CPU tensors, float64, strided views), and tested against the
torch flags in Triton's interpreter.
"""
from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton ships with CUDA torch
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "measure_flags", "usable"]

_POINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Entries of a cloud's tile per loop step (rows x padded d), of a weights' block, the
#: largest d served, and the one program's warps.
_TILE = 4096
_BLOCK = 1024
MAX_D = 1024
_NUM_WARPS = 4


def usable(x, y, a, b) -> bool:
    """Whether :func:`measure_flags` serves these (batched) data: CUDA, Triton, half or single
    precision points, float32 or float64 weights, every tensor contiguous, plain (not a
    torch.func wrapper: a vmap batch stays wrapped in the checks' values), and no
    torch.compile trace (whose fake tensors have no memory to read)."""
    ts = (x, y, a, b)
    if torch.compiler.is_compiling() or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts):
        return False
    return (HAS_TRITON and x.is_cuda and x.dtype in _POINT_DTYPES and y.dtype == x.dtype and x.shape[-1] <= MAX_D
            and all(t.is_contiguous() and t.device == x.device for t in ts)
            and a.dtype in (torch.float32, torch.float64, *_POINT_DTYPES) and b.dtype == a.dtype)


if HAS_TRITON:
    @triton.jit
    def _cloud(P, rows, d, lo, hi, cols, colok, BLOCK: tl.constexpr):
        """Fold the cloud P (rows x d, contiguous; BLOCK rows of the padded width at a time) into
        the per-coordinate extremes (lo, hi) of its finite entries; returns them and the count
        of its non-finite entries."""
        offs = tl.arange(0, BLOCK)
        bad = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, rows, BLOCK):
            r = start + offs
            ok = (r < rows)[:, None] & colok[None, :]
            v = tl.load(P + r[:, None].to(tl.int64) * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            nonfinite = ok & ((v != v) | (tl.abs(v) == float("inf")))
            bad += tl.sum(nonfinite.to(tl.int32), axis=1)
            good = ok & (nonfinite == 0)
            lo = tl.minimum(lo, tl.min(tl.where(good, v, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(good, v, -float("inf")), axis=0))
        return lo, hi, tl.sum(bad, axis=0)

    @triton.jit
    def _weights(W, total, BLOCK: tl.constexpr):
        """Counts of the non-finite, the NaN and the negative entries of W (``total`` entries)."""
        offs = tl.arange(0, BLOCK)
        bad = tl.zeros((BLOCK,), dtype=tl.int32)
        nan = tl.zeros((BLOCK,), dtype=tl.int32)
        neg = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, total, BLOCK):
            i = start + offs
            ok = i < total
            w = tl.load(W + i, mask=ok, other=0.0).to(tl.float64)
            bad += (ok & ((w != w) | (tl.abs(w) == float("inf")))).to(tl.int32)
            nan += (ok & (w != w)).to(tl.int32)
            neg += (ok & (w < 0)).to(tl.int32)
        return tl.sum(bad, axis=0), tl.sum(nan, axis=0), tl.sum(neg, axis=0)

    @triton.jit
    def _mass(W, row, length, BLOCK: tl.constexpr):
        """The float64 sum of row ``row`` of W (rows of ``length``)."""
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
        for start in range(0, length, BLOCK):
            i = start + offs
            acc += tl.load(W + row * length + i, mask=i < length, other=0.0).to(tl.float64)
        return tl.sum(acc, axis=0)

    @triton.jit
    def _measure_flags_kernel(X, Y, A, B, OUT, nx, ny, d, na, nb, Ba, Bb, four_c, limit, tol,
                              DP: tl.constexpr, ROWS: tl.constexpr, BALANCED: tl.constexpr, BLOCK: tl.constexpr):
        # four_c = 4 c, limit = the compute dtype's max, tol = the balanced tolerance: float32
        # scalars (limit, float32's max, is exact; the others round at 6e-8, which moves only a
        # comparison that sits at its boundary), compared in float64.
        cols = tl.arange(0, DP)
        colok = cols < d
        lo = tl.full((DP,), float("inf"), dtype=tl.float32)
        hi = tl.full((DP,), -float("inf"), dtype=tl.float32)
        lo, hi, bad_x = _cloud(X, nx, d, lo, hi, cols, colok, ROWS)
        lo, hi, bad_y = _cloud(Y, ny, d, lo, hi, cols, colok, ROWS)
        bad_a, nan_a, neg_a = _weights(A, na, BLOCK)
        bad_b, nan_b, neg_b = _weights(B, nb, BLOCK)
        span = tl.where(colok, hi.to(tl.float64) - lo.to(tl.float64), 0.0)
        reach = tl.sum(span * span, axis=0) * four_c      # (float64 operands promote the scalars)
        # Masses per batch entry (a weight vector shared by the batch counts once per entry).
        la = na // Ba
        lb = nb // Bb
        pos_a = 1
        pos_b = 1
        prod_ok = 1
        equal = 1
        for k in range(0, tl.maximum(Ba, Bb)):
            ma = _mass(A, k % Ba, la, BLOCK)
            mb = _mass(B, k % Bb, lb, BLOCK)
            pos_a = pos_a & (ma > 0).to(tl.int32)
            pos_b = pos_b & (mb > 0).to(tl.int32)
            prod_ok = prod_ok & (ma * mb <= limit).to(tl.int32)
            if BALANCED:
                equal = equal & (tl.abs(ma - mb) <= tol * tl.maximum(ma, mb)).to(tl.int32)
        # The flags in the torch path's order and meaning (otlinop._checks._mass_flags: a NaN
        # fails ">= 0"; a non-finite point makes the extent non-finite), then lo and hi.
        tl.store(OUT + 0, (bad_x == 0).to(tl.float64))
        tl.store(OUT + 1, (bad_y == 0).to(tl.float64))
        tl.store(OUT + 2, (bad_a == 0).to(tl.float64))
        tl.store(OUT + 3, ((neg_a == 0) & (nan_a == 0)).to(tl.float64))
        tl.store(OUT + 4, (bad_b == 0).to(tl.float64))
        tl.store(OUT + 5, ((neg_b == 0) & (nan_b == 0)).to(tl.float64))
        tl.store(OUT + 6, ((reach <= limit) & (bad_x == 0) & (bad_y == 0)).to(tl.float64))
        tl.store(OUT + 7, pos_a.to(tl.float64))
        tl.store(OUT + 8, pos_b.to(tl.float64))
        tl.store(OUT + 9, prod_ok.to(tl.float64))
        tl.store(OUT + 10, equal.to(tl.float64))
        tl.store(OUT + 11 + cols, lo.to(tl.float64), mask=colok)
        tl.store(OUT + 11 + d + cols, hi.to(tl.float64), mask=colok)


def measure_flags(x, y, a, b, *, balanced: bool, cost_scale: float, limit: float, tol: float):
    """``(flags, lo, hi)``: float64 tensors on the data's device, from one launch.

    ``flags`` (11,): x finite, y finite, a finite, a >= 0, b finite, b >= 0, the extent's
    costs finite (``4 c sum (hi - lo)^2 <= limit``), masses of a > 0, of b > 0, their
    product <= ``limit``, equal masses (``|ma - mb| <= tol max(ma, mb)``, 1 unless
    ``balanced``), each 1.0 or 0.0 for every batch entry; ``lo``, ``hi`` (d,): the
    extremes of each coordinate over both clouds' finite entries (exact: float32 values).
    For data that :func:`usable` accepts: x (B or 1, n, d), y (B or 1, m, d), a and b
    (B, n) / (B, m) or shared (n,) / (m,).
    """
    d = x.shape[-1]
    # Scalars as arguments, not a tensor copied to the device: a CUDA graph may capture the call
    # (measures_ok inside a cached loss graph), where a copy from host memory would be replayed.
    out = torch.empty(11 + 2 * d, dtype=torch.float64, device=x.device)
    Ba = a.shape[0] if a.ndim == 2 else 1
    Bb = b.shape[0] if b.ndim == 2 else 1
    dp = max(2, triton.next_power_of_2(d))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _measure_flags_kernel[(1,)](x, y, a, b, out, x.numel() // d, y.numel() // d, d, a.numel(), b.numel(),
                                    Ba, Bb, 4.0 * cost_scale, limit, tol, DP=dp, ROWS=max(1, _TILE // dp),
                                    BALANCED=balanced, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out[:11], out[11:11 + d], out[11 + d:]



def box_diameter_from(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The diagonal of the box [lo, hi] as a 0-d float64 tensor (what ``diameter_tensor`` computes
    from the same extremes, with the same operations)."""
    return (hi.double() - lo.double()).norm()

