"""Shared helpers for the streaming kernels of ``otlinop.kernels``.

Host side: backend dispatch, precision and input validation, batching and
broadcasting of the inputs, the row-block schedule of the torch references and
the centring of the two point clouds. Device side: the ``@triton.jit`` pieces
that every kernel shares (loading a centred tile, the cross dot products
``x_i . y_j`` of a tile, one step of the online log-sum-exp).

The cost is ``C_ij = c * |x_i - y_j|^2``. It is translation invariant, so both
clouds are shifted by the same centre ``z = (mean(x) + mean(y)) / 2`` before
the expansion ``C_ij = c (|x_i|^2 + |y_j|^2 - 2 x_i . y_j)``: this keeps
``|x_i|^2`` and ``|y_j|^2`` as small as the clouds allow, which is what limits
the cancellation in the expansion. The centre is symmetric in ``(x, y)``, so the
transposed call (``y`` and ``x`` swapped) sees bitwise the same centred points.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from ._triton import HAS_TRITON, tl, triton

__all__ = [
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "BACKENDS",
    "TORCH_BLOCK_BYTES",
]

#: Default ``precision`` of the Triton dots, chosen for accuracy. "tf32x3"
#: splits each fp32 operand into a TF32 high part and a TF32 low part and sums
#: three tensor-core products: close to strict fp32 accuracy at a fraction of
#: the cost of "ieee" (fp32 FMAs on CUDA cores). "tf32" (one tensor-core
#: product) is faster but rounds the inputs of every dot to 10 mantissa bits:
#: a relative error ~5e-4 on each product, which the logits then multiply by
#: ``2c|x||y|/eps``. Half-precision operands ignore the setting.
DEFAULT_PRECISION = "tf32x3"

#: Accepted values of ``precision`` (``None`` means ``DEFAULT_PRECISION``).
PRECISIONS = ("ieee", "tf32", "tf32x3")

#: Accepted values of ``backend`` (``None`` means: Triton for CUDA tensors of a
#: Triton dtype, torch otherwise).
BACKENDS = ("triton", "torch")

#: Dtypes the Triton kernels accept for the points.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)

#: Memory budget of the (rows, m) temporaries of one row block of the torch
#: references. They never allocate n x m at once.
TORCH_BLOCK_BYTES = 64 * 2**20

#: When True, every public call checks its inputs for NaN / +inf with one
#: device-to-host synchronisation. Benchmarks set it to False.
_CHECK_FINITE = True

#: Whether the kernels were created by the Triton interpreter. ``triton.jit``
#: reads TRITON_INTERPRET when it decorates a function, i.e. when the kernel
#: modules are imported, so what matters is the value at import time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """True when the Triton kernels of this package run in the interpreter."""
    return _INTERPRETED


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def resolve_precision(fn: str, precision) -> str:
    """Return the dot precision to use; ValueError for an unknown value."""
    if precision is None:
        return DEFAULT_PRECISION
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"{fn}: precision must be None (default {DEFAULT_PRECISION!r}) or one of "
            f"{', '.join(repr(p) for p in PRECISIONS)}; got {precision!r}"
        )
    return precision


def resolve_backend(fn: str, backend, x: torch.Tensor) -> str:
    """Return "triton" or "torch" for a call on points ``x``.

    ``None`` picks Triton for CUDA tensors of dtype float32/float16/bfloat16 and
    the torch reference otherwise. "triton" on CPU tensors needs the Triton
    interpreter (TRITON_INTERPRET=1 set before this package is imported).
    """
    if backend is None:
        return "triton" if (HAS_TRITON and x.is_cuda and x.dtype in TRITON_DTYPES) else "torch"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"{fn}: backend must be None, 'triton' or 'torch'; got {backend!r}"
        )
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{fn}: backend='triton' needs the triton package, which is not installed; "
                             "use backend='torch' (or None)")
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"{fn}: backend='triton' supports float32, float16 and bfloat16 points; "
                f"x has dtype {x.dtype}. Use backend='torch' (or None) for {x.dtype}."
            )
        if not x.is_cuda:
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(
                    f"{fn}: backend='triton' needs CUDA tensors, but x is on {x.device}. "
                    "Move the inputs to a GPU, use backend='torch', or (for tests) set "
                    "TRITON_INTERPRET=1 before importing otlinop to run the Triton "
                    "interpreter on CPU."
                )
            if not _INTERPRETED:
                raise ValueError(
                    f"{fn}: TRITON_INTERPRET=1 was set after otlinop.kernels was "
                    "imported, so its kernels were compiled for a GPU; set it before "
                    "the import to run backend='triton' on CPU tensors."
                )
    return backend


def check_eps(fn: str, eps) -> float:
    """Return ``eps`` as a float; ValueError unless it is a positive finite number."""
    return _positive_scalar(fn, "eps", eps)


def check_cost_scale(fn: str, cost_scale) -> float:
    """Return ``cost_scale`` as a float; ValueError unless positive and finite."""
    return _positive_scalar(fn, "cost_scale", cost_scale)


def _positive_scalar(fn: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{fn}: {name} must be a positive finite number, got {value}")
    return value


# --------------------------------------------------------------------------
# Shapes, dtypes, devices
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Sizes of one call: ``x`` is (n, d) or (B, n, d), ``y`` is (m, d) or (B, m, d)."""

    fn: str
    batched: bool
    B: int
    n: int
    m: int
    d: int
    dtype: torch.dtype
    device: torch.device

    def shape(self, *dims) -> tuple:
        """The full shape of an output whose unbatched shape is ``dims``."""
        return ((self.B,) if self.batched else ()) + tuple(dims)


def check_points(fn: str, x, y) -> Geometry:
    """Validate the point clouds and return the sizes of the call."""
    for name, t, rows in (("x", x, "n"), ("y", y, "m")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim not in (2, 3):
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)}, expected ({rows}, d) or (B, {rows}, d)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must have a floating dtype, got {t.dtype}")
    if y.device != x.device:
        raise ValueError(f"{fn}: y is on {y.device}, but x is on {x.device}; put both on one device")
    if y.dtype != x.dtype:
        raise TypeError(
            f"{fn}: x and y must have the same dtype, got x {x.dtype} and y {y.dtype}"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"{fn}: x has shape {tuple(x.shape)} and y has shape {tuple(y.shape)}; "
            "their last dims (the dimension d of the points) must match"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"{fn}: the points have 0 coordinates (x has shape {tuple(x.shape)})")
    batched = x.ndim == 3 or y.ndim == 3
    B = 1
    if batched:
        bx = x.shape[0] if x.ndim == 3 else None
        by = y.shape[0] if y.ndim == 3 else None
        if bx is not None and by is not None and bx != by:
            raise ValueError(
                f"{fn}: x has shape {tuple(x.shape)} and y has shape {tuple(y.shape)}; "
                "their batch sizes (first dims) must match"
            )
        B = bx if bx is not None else by
        if B > 65535:
            raise ValueError(f"{fn}: batch size {B} exceeds the maximum of 65535")
    return Geometry(fn, batched, B, x.shape[-2], y.shape[-2], x.shape[-1], x.dtype, x.device)


def _check_tensor(geo: Geometry, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{geo.fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != geo.device:
        raise ValueError(
            f"{geo.fn}: {name} is on {t.device}, but x is on {geo.device}; put all inputs on one device"
        )
    allowed = (geo.dtype, torch.float32) if geo.dtype in _HALF_DTYPES else (geo.dtype,)
    if t.dtype not in allowed:
        expected = " or ".join(str(a) for a in allowed)
        raise TypeError(f"{geo.fn}: {name} has dtype {t.dtype}, expected {expected} (x has dtype {geo.dtype})")


def check_vector(geo: Geometry, name: str, t, length: int):
    """Validate a per-point vector: (length,), or (B, length) in a batched call.

    In a batched call an unbatched (length,) vector is shared by all the batch
    entries. ``None`` passes through.
    """
    if t is None:
        return None
    _check_tensor(geo, name, t)
    shape = tuple(t.shape)
    ok = shape == (length,) or (geo.batched and shape == (geo.B, length))
    if not ok:
        expected = f"({geo.B}, {length}) or ({length},)" if geo.batched else f"({length},)"
        raise ValueError(f"{geo.fn}: {name} has shape {shape}, expected {expected}")
    return t


def check_matrix(geo: Geometry, name: str, t, rows: int, cols, cols_name: str = "k"):
    """Validate a per-point matrix: (rows, cols), or (B, rows, cols) in a batched call.

    ``cols=None`` accepts any number of columns. In a batched call an
    unbatched matrix is shared by all the batch entries.
    """
    _check_tensor(geo, name, t)
    shape = tuple(t.shape)
    c = cols_name if cols is None else cols
    ok = t.ndim == 2 or (geo.batched and t.ndim == 3 and shape[0] == geo.B)
    ok = ok and shape[-2] == rows and (cols is None or shape[-1] == cols)
    if not ok:
        expected = f"({geo.B}, {rows}, {c}) or ({rows}, {c})" if geo.batched else f"({rows}, {c})"
        raise ValueError(f"{geo.fn}: {name} has shape {shape}, expected {expected}")
    return t


def check_finite(geo: Geometry, tensors: dict, allow_neg_inf=()) -> None:
    """Raise ValueError if an input holds NaN or +inf (or -inf where not allowed).

    One device-to-host synchronisation per call, whatever the number of
    inputs; switched off by ``_common._CHECK_FINITE = False``.
    """
    if not _CHECK_FINITE:
        return
    names, flags = [], []
    for name, t in tensors.items():
        if t is None or t.numel() == 0:
            continue
        if name in allow_neg_inf:
            flags.append((~(torch.isnan(t) | (t == math.inf))).all())
        else:
            flags.append(torch.isfinite(t).all())
        names.append(name)
    if not flags or bool(torch.stack(flags).all()):
        return
    for name, flag in zip(names, flags):
        if not bool(flag):
            what = "NaN or +inf (-inf is allowed: a zero weight)" if name in allow_neg_inf else "NaN or inf"
            raise ValueError(f"{geo.fn}: {name} contains {what} values")


def batch_stride(t: torch.Tensor, unbatched_ndim: int) -> int:
    """Stride of the batch dim of ``t``; 0 when ``t`` is shared by the batch."""
    return t.stride(0) if t.ndim == unbatched_ndim + 1 else 0


def device_guard(device: torch.device):
    """Launch on the inputs' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def unit_last(t):
    """``t`` with a unit stride on its last dim (copies only when needed)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


# --------------------------------------------------------------------------
# Centring (both backends)
# --------------------------------------------------------------------------


def centre(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Common centre of the two clouds, ``(mean(x) + mean(y)) / 2`` in ``dtype``.

    Shape (d,) for unbatched clouds, (B, d) if either is batched. Symmetric in
    (x, y), so a swapped call uses bitwise the same centre.
    """
    mx = x.mean(dim=-2, dtype=dtype)
    my = y.mean(dim=-2, dtype=dtype)
    return ((mx + my) * 0.5).contiguous()


# --------------------------------------------------------------------------
# Tiling helpers (host side)
# --------------------------------------------------------------------------


def bucket(size: int) -> int:
    """Power-of-two bucket of a size, at least 16 (the autotuning keys)."""
    return max(16, triton.next_power_of_2(max(int(size), 1)))


def pick_block(size: int, max_block: int, chunk_cost: int) -> int:
    """Chunk width in {16, ..., max_block} for a dimension of ``size``.

    Minimises the padded work ``chunks * block`` plus ``chunk_cost`` per chunk
    (the price of one more pass: a reload, or a recomputed probability tile);
    ties go to the wider block. tl.dot needs every dim >= 16.
    """
    best, best_cost = None, None
    b = max_block
    while b >= 16:
        chunks = triton.cdiv(size, b)
        cost = chunks * b + chunks * chunk_cost
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
        b //= 2
    return best


#: Below this many (bucketed) entries of the cost, a call is launch-bound:
#: take one config instead of compiling and timing several.
_SMALL_PROBLEM = 1 << 22


def config(block_m: int, block_n: int, warps: int, stages: int):
    """One autotuning candidate: a (BLOCK_M, BLOCK_N) tile, warps, pipeline stages."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def configs_or_interpreter(configs):
    """``configs`` for a GPU, a single small tile under the interpreter."""
    return [_interpreter_config()] if _INTERPRETED else list(configs)


def prune_configs(configs, args: dict, fits):
    """Shared pruning of the autotune configs (listed largest tile first).

    Drops tiles larger than the bucketed problem and those for which the
    kernel-specific ``fits(config, args)`` says no (register spills or shared
    memory overflow, measured offline with ptxas for sm_90). Problems below
    ``_SMALL_PROBLEM`` entries keep only the smallest remaining tile (no
    timing, one compilation). Always returns at least one config.
    """
    if _INTERPRETED:
        return [_interpreter_config()]
    n_bucket = args.get("N_BUCKET", 1 << 30)
    m_bucket = args.get("M_BUCKET", 1 << 30)
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(32, n_bucket) and c.kwargs["BLOCK_N"] <= max(32, m_bucket) and fits(c, args)
    ]
    if not kept:
        kept = [configs[-1]]
    if n_bucket * m_bucket <= _SMALL_PROBLEM:
        kept = [kept[-1]]
    return kept


def _interpreter_config():
    # The interpreter runs every program in Python: one small tile, no tuning.
    # BLOCK_N = 16 < BLOCK_M = 32 so that small tests cross several column tiles.
    return triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------
# Torch references: row blocks
# --------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the torch references: the input dtype, half inputs promoted to float32."""
    return torch.promote_types(dtype, torch.float32)


def row_blocks(n: int, m: int, batch: int, itemsize: int, temporaries: int):
    """Row slices whose (batch, rows, m) temporaries fit in TORCH_BLOCK_BYTES."""
    per_row = max(1, batch * m * itemsize * temporaries)
    rows = max(1, min(n, TORCH_BLOCK_BYTES // per_row))
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def as_batched(t, unbatched_ndim: int):
    """View ``t`` with a leading batch dim (size 1 when shared); None passes."""
    if t is None:
        return None
    return t if t.ndim == unbatched_ndim + 1 else t.unsqueeze(0)


def centred_points(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype):
    """Centred clouds as (Bx, n, d), (By, m, d) and their squared norms, in ``dtype``."""
    x3 = as_batched(x, 2).to(dtype)
    y3 = as_batched(y, 2).to(dtype)
    z = centre(x3, y3, dtype).unsqueeze(-2)
    xc, yc = x3 - z, y3 - z
    return xc, yc, (xc * xc).sum(-1), (yc * yc).sum(-1)


def cost_block(xc, yc, xn, yn, rows: slice, cost_scale: float):
    """C for the rows ``rows``: (B, r, m), clamped at 0 (it is a squared distance)."""
    cross = torch.matmul(xc[:, rows], yc.transpose(-1, -2))
    # In place: one (B, r, m) temporary.
    return cross.mul_(-2.0).add_(xn[:, rows, None]).add_(yn[:, None, :]).clamp_min_(0.0).mul_(cost_scale)


# --------------------------------------------------------------------------
# Device-side pieces shared by the kernels
# --------------------------------------------------------------------------


# The Triton interpreter (3.9) multiplies bfloat16 dot operands as their raw
# uint16 bits; under it, bf16 dots are computed in fp32 instead.
_INTERPRETER_BF16_DOT = tl.constexpr(_INTERPRETED)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b on tensor cores; PREC only means something for fp32 operands."""
    if _INTERPRETER_BF16_DOT and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _load_centred(base, rows, feats, n_rows, d, stride_r, stride_f, cen):
    """Tile (rows, feats) of a cloud minus the centre, in the storage dtype, and its
    row squared norms in fp32 (computed from the rounded tile, so that the
    expansion of |x - y|^2 is that of the points the dot product sees)."""
    mask = (rows[:, None] < n_rows) & (feats[None, :] < d)
    v = tl.load(base + rows[:, None] * stride_r + feats[None, :] * stride_f, mask=mask, other=0.0)
    vc = tl.where(mask, v.to(tl.float32) - cen[None, :], 0.0).to(v.dtype)
    vf = vc.to(tl.float32)
    return vc, tl.sum(vf * vf, axis=1)


@triton.jit
def _row_setup(X, CEN, rows, n, d, stride_xn, stride_xd, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr):
    """First feature chunk of the row tile (kept resident) and the full row norms."""
    feats = tl.arange(0, BLOCK_D)
    cen0 = tl.load(CEN + feats, mask=feats < d, other=0.0)
    xc0, xn = _load_centred(X, rows, feats, n, d, stride_xn, stride_xd, cen0)
    for c in range(1, D_CHUNKS):
        fc = c * BLOCK_D + feats
        cen = tl.load(CEN + fc, mask=fc < d, other=0.0)
        xc, xn_c = _load_centred(X, rows, fc, n, d, stride_xn, stride_xd, cen)
        xn += xn_c
    return xc0, xn, cen0


@triton.jit
def _cross_tile(xc0, cen0, X, Y, CEN, rows, cols, n, m, d,
                stride_xn, stride_xd, stride_ym, stride_yd,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                D_CHUNKS: tl.constexpr, PREC: tl.constexpr):
    """x_i . y_j for a (BLOCK_M, BLOCK_N) tile (fp32) and |y_j|^2 for its columns.

    The first feature chunk of x is resident (``xc0``); further chunks (d >
    BLOCK_D) are reloaded from L1/L2 for every column tile, which keeps the
    register footprint independent of d.
    """
    feats = tl.arange(0, BLOCK_D)
    yc, yn = _load_centred(Y, cols, feats, m, d, stride_ym, stride_yd, cen0)
    dot = _mma(xc0, tl.trans(yc), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC)
    for c in range(1, D_CHUNKS):
        fc = c * BLOCK_D + feats
        cen = tl.load(CEN + fc, mask=fc < d, other=0.0)
        xc, xn_c = _load_centred(X, rows, fc, n, d, stride_xn, stride_xd, cen)
        yc, yn_c = _load_centred(Y, cols, fc, m, d, stride_ym, stride_yd, cen)
        dot = _mma(xc, tl.trans(yc), dot, PREC)
        yn += yn_c
    return dot, yn


@triton.jit
def _online_step(M, t):
    """One step of the streaming log-sum-exp (base 2) over a tile of logits ``t``.

    Returns the new running max, the factor rescaling the old sums, and the
    tile of exp2(t - max). A row whose logits are all -inf so far keeps max =
    -inf but is shifted by 0 instead, so that exp2(-inf - shift) = 0 and no
    (-inf) - (-inf) = NaN appears (the FlashAttention guard).
    """
    m_new = tl.maximum(M, tl.max(t, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(M - shift)
    p = tl.exp2(t - shift[:, None])
    return m_new, alpha, p
