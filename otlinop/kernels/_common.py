"""Shared helpers for the streaming kernels of ``otlinop.kernels``.

Host side: backend dispatch (the argument checks live in ``otlinop._checks``),
batching and broadcasting of the inputs, the row-block schedule of the torch references and
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
import inspect
import math
import os
from dataclasses import dataclass

import torch

from solvers import config

from .._checks import BACKENDS, PRECISIONS, backend_name, precision_name, triton_ready
from ._triton import HAS_TRITON, cdiv, next_power_of_2, tl, triton

__all__ = [
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "BACKENDS",
]

#: Default ``precision`` of the Triton dots, chosen for accuracy. "tf32x3"
#: splits each fp32 operand into a TF32 high part and a TF32 low part and sums
#: three tensor-core products: close to strict fp32 accuracy at a fraction of
#: the cost of "ieee" (fp32 FMAs on CUDA cores). For 3d <= SPLIT_MAX_K the
#: cost dot's split is done once per pair of clouds and its three products are
#: one TF32 dot of width 3d (see SPLIT_MAX_K). "tf32" (one tensor-core
#: product with 11 significant bits per input: TF32, or fp16 from d =
#: HALF_TF32_MIN_D on) is faster but rounds the inputs of every dot: a
#: relative error 2^-11 to 2^-10 on each product, which the logits then
#: multiply by ``2c|x||y|/eps``.
#: Half-precision operands ignore the setting.
DEFAULT_PRECISION = "tf32x3"

#: Dtypes the Triton kernels accept for the points.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

config.declare("torch_block_bytes", 64 * 2**20, owner="otlinop.kernels", doc=(
    "memory budget in bytes of the (rows, m) temporaries of one row block of the torch references; "
    "they never allocate n x m at once"))

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
# Dispatch (the checks themselves live in otlinop._checks)
# --------------------------------------------------------------------------

#: Largest batch of one call: the batch index is a grid dimension of the launches.
MAX_BATCH = 65535


def resolve_precision(owner: str, precision) -> str:
    """The dot precision to use: ``precision``, or ``DEFAULT_PRECISION`` for None."""
    return precision_name(owner, precision) or DEFAULT_PRECISION


def check_backend(owner: str, backend, x: torch.Tensor) -> str | None:
    """The backend asked for (None for None and "auto"), once it is known to run on points ``x``.

    "triton" on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1
    set before this package is imported).
    """
    backend = backend_name(owner, backend)
    if backend == "triton":
        triton_ready(owner, x, installed=HAS_TRITON, interpreted=_INTERPRETED, dtypes=TRITON_DTYPES)
    return backend


def resolve_backend(owner: str, backend, x: torch.Tensor) -> str:
    """Return "triton" or "torch" for a call on points ``x``.

    None and "auto" pick Triton for CUDA tensors of dtype
    float32/float16/bfloat16 and the torch reference otherwise.
    """
    backend = check_backend(owner, backend, x)
    if backend is None:
        return "triton" if (HAS_TRITON and x.is_cuda and x.dtype in TRITON_DTYPES) else "torch"
    return backend


# --------------------------------------------------------------------------
# Strides and devices
# --------------------------------------------------------------------------


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
# Prepared clouds (Triton backend)
# --------------------------------------------------------------------------

#: Dimensions d up to this one compute the cost tile of every precision with
#: fp32 FMAs on the CUDA cores; "ieee" takes the FMA path at every d. 0 (the
#: default): on an H100 the FMA tile measured 3.3x slower than the tensor-core
#: tile at n = m = 50k, d = 3 (4.28 ms against 1.31 ms per pass). A tuning
#: knob of the kernels, at most 8.
config.declare("fma_max_d", 0, owner="otlinop.kernels", doc=(
    "dimensions d up to this one (at most 8) compute the cost tile with fp32 FMAs instead of tensor cores"))

#: "tf32x3" with 3 d <= SPLIT_MAX_K (d <= 21) stores each fp32 coordinate as a
#: TF32 high part plus a low part, x' = [x_hi, x_lo, x_hi] and
#: y' = [y_hi, y_hi, y_lo], so that ONE TF32 dot of width 3d gives
#: x_hi.y_hi + x_lo.y_hi + x_hi.y_lo: the three products of the split-precision
#: scheme, with the splitting done once per pair of clouds instead of at every
#: tile. At d = 3 this costs a plain TF32 dot (3d pads to 16 either way).
SPLIT_MAX_K = 64

#: Widest feature chunk of the tensor-core path held in registers (wider d
#: loops over chunks).
MAX_BLOCK_D = 64

#: "tf32" on fp32 points stores the centred points as float16 after scaling
#: both clouds by one power of two 2^k (largest |coordinate| in [2^13, 2^14)),
#: and the kernels take ``k2 / 4^k`` for ``k2``: fp16 keeps TF32's 11
#: significant bits, rounded to nearest where the tensor cores truncate fp32
#: operands to TF32, and multiplies at twice TF32's rate from half the bytes.
#: Products of fp16 values are exact in the fp32 accumulator, and the squared
#: norms are those of the rounded points, so ``C_ii = 0`` for x = y up to fp32
#: summation. Only coordinates below 2^-28 of the largest lose relative
#: precision (fp16 subnormals), which moves a dot by at most 2^-39 |x||y|.
#: H100, n = m = 50k, d = 64, one symmetric Sinkhorn step: 1.56 ms against
#: 2.03 ms with fp32 operands on TF32 tensor cores (same call). Choosing k costs one
#: device-to-host synchronisation per prepared pair (none inside a CUDA-graph
#: capture: a pair first prepared there keeps fp32 operands and TF32).
config.declare("half_tf32", True, owner="otlinop.kernels", doc=(
    'precision="tf32" on float32 points with d >= 64 multiplies scaled fp16 copies of the points '
    "(11 significant bits like TF32, rounded to nearest, twice the rate); False keeps TF32 operands"))
#: ... from this dimension on. Measured on the H100: faster at d = 64 (above);
#: slower at d = 3, where the dot is a small part of a tile's work: 1.84 ms
#: per symmetric step at n = m = 50k, against 1.36 ms for the tf32x3 pair,
#: whose fp32 TF32 dot has the same width (16). Dimensions in between are not
#: measured yet (scripts/profile_half_tf32.py): they keep fp32 operands.
HALF_TF32_MIN_D = 64


def dot_mode(d: int, precision: str) -> int:
    """0: tensor-core dots; 1: FMAs (``d <= config.fma_max_d`` or precision "ieee")."""
    return 1 if (d <= config.fma_max_d or precision == "ieee") else 0


def feature_layout(k: int, fma: bool):
    """``(DP, BLOCK_D)``: row length of the prepared points and the tensor-core chunk.

    ``k`` features as the kernel sees them (3d for a split pair). FMA path
    with k <= 8: rows of exactly k entries. Otherwise k is padded with zeros
    to ``D_CHUNKS * BLOCK_D`` so that every chunk load is unmasked and aligned.
    """
    if fma and k <= 8:
        return k, 16
    block_d = pick_block(k, MAX_BLOCK_D, chunk_cost=16)
    return cdiv(k, block_d) * block_d, block_d


def _uses_split(d: int, dtype: torch.dtype, precision: str) -> bool:
    return precision == "tf32x3" and dtype == torch.float32 and 3 * d <= SPLIT_MAX_K and dot_mode(d, precision) == 0


@dataclass(frozen=True, eq=False)
class PreparedPair:
    """Two clouds as the Triton kernels read them (built by :func:`prepare_pair`).

    ``x`` (Bx, n, DP) and ``y`` (By, m, DP): the points minus the common
    centre, times ``scale`` (a power of two: 1 but for config.half_tf32),
    contiguous, each row padded with zeros to DP entries (see
    :func:`feature_layout`), in the storage dtype; for a split pair the rows
    hold ``[x_hi, x_lo, x_hi]`` and ``[y_hi, y_hi, y_lo]`` (see
    ``SPLIT_MAX_K``). ``xn`` (Bx, n) and ``yn`` (By, m): the squared norms of
    the centred points in fp32 (of the rounded points for half inputs, so
    that the expansion ``|x|^2 + |y|^2 - 2 x.y`` is that of the points the
    dots see). A batch dim of 1 is shared by a batched call. The kernel
    constants: ``D`` features per row as the dot sees them, ``DOT`` (0 tensor
    cores, 1 FMAs) and ``PREC``, the tl.dot precision to use; ``k2()`` gives
    the kernels' cost factor in the units of the stored points.
    """

    x: torch.Tensor
    y: torch.Tensor
    xn: torch.Tensor
    yn: torch.Tensor
    D: int
    DP: int
    BLOCK_D: int
    DOT: int
    PREC: str
    scale: float = 1.0

    @property
    def D_CHUNKS(self) -> int:
        return self.DP // self.BLOCK_D if self.DOT == 0 else 1

    def k2(self, cost_scale: float, eps: float) -> float:
        """The kernels' ``k2``: ``cost_scale log2(e) / eps`` in the units of the stored points."""
        return cost_scale * LOG2E / eps / (self.scale * self.scale)

    def swapped(self) -> "PreparedPair":
        """The pair for the transposed call: the centre is symmetric in (x, y), and
        the three products of a split pair are the same with the roles swapped."""
        return PreparedPair(self.y, self.x, self.yn, self.xn, self.D, self.DP, self.BLOCK_D, self.DOT, self.PREC,
                            self.scale)

    @staticmethod
    def bstride(t: torch.Tensor) -> int:
        """Batch stride for a kernel: 0 when the batch dim is shared (size 1)."""
        return t.stride(0) if t.shape[0] > 1 else 0


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``t`` rounded to the nearest TF32 value (10 mantissa bits), as fp32."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _layout_of(d: int, dtype: torch.dtype, precision: str):
    split = _uses_split(d, dtype, precision)
    dot = dot_mode(d, precision)
    D = 3 * d if split else d
    DP, block_d = feature_layout(D, dot == 1)
    prec = "tf32" if split else precision
    half = config.half_tf32 and precision == "tf32" and dtype == torch.float32 and dot == 0 and d >= HALF_TF32_MIN_D
    return split, D, DP, block_d, dot, prec, half


def _half_scale(cx: torch.Tensor, cy: torch.Tensor) -> float:
    """The power of two taking the largest |coordinate| of both clouds into [2^13, 2^14) (1 if none)."""
    amax = float(torch.maximum(cx.abs().amax(), cy.abs().amax()).item()) if cx.numel() and cy.numel() else 0.0
    if not (amax > 0 and math.isfinite(amax)):
        return 1.0
    return math.ldexp(1.0, 14 - math.frexp(amax)[1])


def _prepare(x: torch.Tensor, y: torch.Tensor, layout) -> PreparedPair:
    d = x.shape[-1]
    split, D, DP, block_d, dot, prec, half = layout
    with torch.no_grad():
        x3, y3 = as_batched(x.detach(), 2), as_batched(y.detach(), 2)
        z = centre(x3, y3, torch.float32).unsqueeze(-2)          # (B or 1, 1, d)
        centred = [t.float() - z for t in (x3, y3)]              # (batch, rows, d) each
        # The scale needs the largest coordinate on the host: not inside a capture.
        half = half and not (x3.is_cuda and torch.cuda.is_current_stream_capturing())
        scale = _half_scale(*centred) if half else 1.0
        out, norms = [], []
        for side, t in enumerate((x3, y3)):
            # A cloud shared by a batch whose entries have different centres is
            # materialised per entry.
            store = torch.float16 if half else t.dtype
            batch = max(t.shape[0], z.shape[0])
            buf = torch.zeros((batch,) + tuple(t.shape[1:-1]) + (DP,), device=t.device, dtype=store)
            c = (centred[side] * scale if half else centred[side]).to(store)
            norms.append(c.float().square().sum(-1))
            if split:
                hi = round_to_tf32(c)
                lo = c - hi
                parts = (hi, lo, hi) if side == 0 else (hi, hi, lo)
                for i, part in enumerate(parts):
                    buf[..., i * d:(i + 1) * d] = part
            else:
                buf[..., :d] = c
            out.append(buf)
    return PreparedPair(out[0], out[1], norms[0], norms[1], D, DP, block_d, dot, prec, scale)


# A few prepared pairs, keyed by the identity of the input tensors: a solver
# or an operator that calls the kernels again on the same clouds reuses the
# centred copies instead of rebuilding them (three launches and two copies per
# call). An entry is checked against a weak reference to each input (a freed
# tensor whose id is reused never hits) and its version counter (an in-place
# change never hits), and is dropped when either input is freed.
_CACHE_SIZE = 4
_cache: dict = {}


def prepare_pair(x: torch.Tensor, y: torch.Tensor, precision: str) -> PreparedPair:
    """The prepared pair of two clouds for ``precision``, reused while they are alive and unchanged.

    ``(y, x)`` is served from the entry of ``(x, y)`` (swapped). Memory: a
    copy of each cloud, O((n + m) d) (three times d for a split pair); at most
    ``_CACHE_SIZE`` pairs are kept.
    """
    import weakref

    # x and y share d and dtype (checked by the launchers): one layout for both orders.
    layout = _layout_of(x.shape[-1], x.dtype, precision)
    if x.is_inference() or y.is_inference():
        # Inference tensors carry no version counter: an in-place change could
        # not be detected, so they are prepared afresh at every call.
        return _prepare(x, y, layout)
    key = (id(x), id(y), layout)
    for lookup, swap in ((key, False), ((id(y), id(x), layout), True)):
        entry = _cache.get(lookup)
        if entry is None:
            continue
        rx, ry, vx, vy, pair = entry
        a, b = (y, x) if swap else (x, y)
        if rx() is a and ry() is b and a._version == vx and b._version == vy:
            _cache[lookup] = _cache.pop(lookup)    # most recently used last
            return pair.swapped() if swap else pair
        _cache.pop(lookup, None)
    pair = _prepare(x, y, layout)
    if layout[-1] and pair.x.dtype != torch.float16:
        # Prepared inside a CUDA-graph capture without HALF_TF32's scale (no
        # host sync there): not kept, so that later calls get the fp16 operands.
        return pair
    try:
        rx, ry = weakref.ref(x), weakref.ref(y)
    except TypeError:  # pragma: no cover - tensors support weak references
        return pair
    _cache[key] = (rx, ry, x._version, y._version, pair)
    for t in (x, y):
        weakref.finalize(t, _cache.pop, key, None)
    while len(_cache) > _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))
    return pair


def clear_cache() -> None:
    """Drop the prepared pairs kept by :func:`prepare_pair`."""
    _cache.clear()


# --------------------------------------------------------------------------
# Column splits (flash-decoding) for short row grids
# --------------------------------------------------------------------------

#: Columns of one split are a multiple of this (>= the widest BLOCK_N).
SPLIT_ALIGN = 128
#: Rows per program assumed when counting a launch's row programs: the
#: largest BLOCK_M of the configs (the tile is chosen after the split).
SPLIT_ROW_TILE = 128
#: A split gets at least this many columns (below, the merge costs more than it saves).
MIN_SPLIT_COLS = 1024
#: The row grid is split over the columns until it has about this many
#: programs per SM.
PROGRAMS_PER_SM = 2
#: Tests set a split count here to exercise the split path at small sizes.
_FORCE_SPLITS = None

_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def column_splits(row_programs: int, m: int, device: torch.device):
    """``(splits, cols_per_split)`` for a row grid of ``row_programs`` programs.

    When the row tiles alone leave SMs idle (n = 10k gives 79 tiles of 128
    rows for 132 SMs), the columns are split over the grid and the partial
    results merged by a light second pass (flash-decoding). The split is a
    function of the sizes only, so results are deterministic.
    """
    if _FORCE_SPLITS is not None:
        return split_plan(m, _FORCE_SPLITS)
    if device.type != "cuda" or _INTERPRETED:
        return 1, max(m, 1)
    target = PROGRAMS_PER_SM * _sm_count(device)
    if row_programs >= target:
        return 1, max(m, 1)
    return split_plan(m, min(cdiv(target, max(row_programs, 1)), max(1, m // MIN_SPLIT_COLS)))


def split_plan(m: int, splits: int):
    """``(splits, cols_per_split)``: at most ``splits`` ranges of SPLIT_ALIGN-aligned columns covering m."""
    splits = max(1, min(int(splits), cdiv(max(m, 1), SPLIT_ALIGN)))
    cols = cdiv(cdiv(max(m, 1), splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return cdiv(max(m, 1), cols), cols


# --------------------------------------------------------------------------
# Tiling helpers (host side)
# --------------------------------------------------------------------------


def bucket(size: int) -> int:
    """Power-of-two bucket of a size, at least 16 (the autotuning keys)."""
    return max(16, next_power_of_2(max(int(size), 1)))


def pick_block(size: int, max_block: int, chunk_cost: int) -> int:
    """Chunk width in {16, ..., max_block} for a dimension of ``size``.

    Minimises the padded work ``chunks * block`` plus ``chunk_cost`` per chunk
    (the price of one more pass: a reload, or a recomputed probability tile);
    ties go to the wider block. tl.dot needs every dim >= 16.
    """
    best, best_cost = None, None
    b = max_block
    while b >= 16:
        chunks = cdiv(size, b)
        cost = chunks * b + chunks * chunk_cost
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
        b //= 2
    return best


#: Below this many (bucketed) entries of the cost, a call is launch-bound:
#: take one config instead of compiling and timing several.
_SMALL_PROBLEM = 1 << 22


def _autotune_disk_cache() -> dict:
    """``{"cache_results": True}`` when this Triton's autotuner can keep its timings on disk."""
    try:
        params = inspect.signature(triton.autotune).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return {}
    return {"cache_results": True} if "cache_results" in params else {}


#: Extra keywords of every ``triton.autotune`` here: the timings of each tuning
#: key are kept on disk (Triton's cache directory, TRITON_CACHE_DIR; keyed by
#: the kernel's source, the GPU, the key and the candidate configs), so that a
#: new process reuses the config chosen before instead of timing them all
#: again; it also keeps the chosen config, hence the results, the same from
#: one run to the next. Empty on a Triton without the option (before 3.2).
AUTOTUNE_DISK_CACHE = _autotune_disk_cache()


def tile_config(block_m: int, block_n: int, warps: int, stages: int):
    """One autotuning candidate: a (BLOCK_M, BLOCK_N) tile, warps, pipeline stages."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def configs_or_interpreter(configs):
    """``configs`` for a GPU, a single small tile under the interpreter."""
    return [_interpreter_config()] if _INTERPRETED else list(configs)


def pruner(fits):
    """The ``early_config_prune`` hook of a kernel: :func:`prune_configs` with its ``fits``."""
    def prune(configs, named_args, **kwargs):
        return prune_configs(configs, {**named_args, **kwargs}, fits)
    return prune


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


class TunedLaunch:
    """Launch an autotuned kernel through the config it chose, on the hot path.

    Triton's autotuner rebuilds its key from every argument at each call
    (tens of microseconds for our 25-40 arguments), which bounds the
    iteration time of small problems. The launchers here know their key:
    the first call with a key goes through the autotuner (tuning it once);
    later calls launch the underlying kernel with the cached config.
    """

    def __init__(self, kernel):
        self._kernel = kernel
        self._configs: dict = {}

    def __call__(self, key, grid, *args, **kwargs):
        cfg = self._configs.get(key)
        if cfg is None:
            self._kernel[grid](*args, **kwargs)
            best = getattr(self._kernel, "best_config", None)
            if best is not None:
                self._configs[key] = best
            return
        self._kernel.fn[grid](*args, **kwargs, **cfg.all_kwargs())


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
    """Row slices whose (batch, rows, m) temporaries fit in ``config.torch_block_bytes``."""
    per_row = max(1, batch * m * itemsize * temporaries)
    rows = max(1, min(n, config.torch_block_bytes // per_row))
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
_INTERPRETED_C = tl.constexpr(_INTERPRETED)
_INTERPRETER_BF16_DOT = _INTERPRETED_C


@triton.jit
def _store_in_place(ptrs, val, mask):
    """``tl.store(ptrs, val, mask)`` of fp32 values in the layout they are in.

    ``tl.store`` re-lays a row vector of an MMA tile out for coalescing,
    through shared memory behind two CTA-wide barriers; this element-wise
    inline store writes each thread's own values (threads holding the same
    row write the same value). Without those barriers nothing orders the
    store after other threads' loads of the same addresses: the caller
    places a ``tl.debug_barrier()`` where that matters. Plain ``tl.store``
    under the interpreter.
    """
    if _INTERPRETED_C:
        tl.store(ptrs, val, mask=mask)
    else:
        # Integer operands only: older Tritons refuse a pointer beside a float here.
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r,r", [ptrs.to(tl.int64), val.to(tl.float32).to(tl.int32, bitcast=True), mask.to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)


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
def _xcol(X, rows, n, scale, k: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Feature k of the prepared row points times ``scale`` (fp32), 0 past d."""
    if k < D:
        v = scale * tl.load(X + rows * DP + k, mask=rows < n, other=0.0).to(tl.float32)
    else:
        v = 0.0
    return v


@triton.jit
def _row_setup(X, rows, n, two_k2, D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT: tl.constexpr):
    """What a row tile keeps resident for the whole column stream.

    Tensor cores (DOT = 0): the first feature chunk ``xc0`` of the prepared
    points. FMAs with d <= 8 (DOT = 1): the d feature columns ``x0..x7``,
    pre-multiplied by ``2 k2`` so that a logit costs d FMAs. Unused outputs
    are the scalar 0.
    """
    if DOT == 0:
        feats = tl.arange(0, BLOCK_D)
        xc0 = tl.load(X + rows[:, None] * DP + feats[None, :], mask=(rows < n)[:, None], other=0.0)
    else:
        xc0 = 0.0
    if DOT == 1 and D <= 8:
        x0 = _xcol(X, rows, n, two_k2, 0, D, DP)
        x1 = _xcol(X, rows, n, two_k2, 1, D, DP)
        x2 = _xcol(X, rows, n, two_k2, 2, D, DP)
        x3 = _xcol(X, rows, n, two_k2, 3, D, DP)
        x4 = _xcol(X, rows, n, two_k2, 4, D, DP)
        x5 = _xcol(X, rows, n, two_k2, 5, D, DP)
        x6 = _xcol(X, rows, n, two_k2, 6, D, DP)
        x7 = _xcol(X, rows, n, two_k2, 7, D, DP)
    else:
        x0 = 0.0
        x1 = 0.0
        x2 = 0.0
        x3 = 0.0
        x4 = 0.0
        x5 = 0.0
        x6 = 0.0
        x7 = 0.0
    return xc0, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _fma_term(t, xk, Y, cols, m, k: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    if k < D:
        yk = tl.load(Y + cols * DP + k, mask=cols < m, other=0.0).to(tl.float32)
        t += xk[:, None] * yk[None, :]
    return t


@triton.jit
def _logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, X, Y, rows, cols, u, n, m, two_k2,
            D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
            DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Base-2 logits ``u_j + 2 k2 x_i . y_j`` of a (BLOCK_M, BLOCK_N) tile, fp32.

    ``u`` is the column bias (it holds -inf past m). The points are the
    prepared ones (centred, rows of DP entries, zero padding). DOT = 0: the
    dot on tensor cores at precision PREC, over D_CHUNKS chunks of BLOCK_D
    features (chunks past the first are reloaded from L1/L2). DOT = 1: fp32
    FMAs on the CUDA cores, exact to fp32 rounding, unrolled for d <= 8 with
    the row features resident, else a loop over the d features.
    """
    if DOT == 0:
        feats = tl.arange(0, BLOCK_D)
        col_ok = (cols < m)[:, None]
        yc = tl.load(Y + cols[:, None] * DP + feats[None, :], mask=col_ok, other=0.0)
        dot = _mma(xc0, tl.trans(yc), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC)
        for c in range(1, D_CHUNKS):
            fc = c * BLOCK_D + feats
            xc = tl.load(X + rows[:, None] * DP + fc[None, :], mask=(rows < n)[:, None], other=0.0)
            yc = tl.load(Y + cols[:, None] * DP + fc[None, :], mask=col_ok, other=0.0)
            dot = _mma(xc, tl.trans(yc), dot, PREC)
        t = u[None, :] + two_k2 * dot
    elif D <= 8:
        t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + u[None, :]
        t = _fma_term(t, x0, Y, cols, m, 0, D, DP)
        t = _fma_term(t, x1, Y, cols, m, 1, D, DP)
        t = _fma_term(t, x2, Y, cols, m, 2, D, DP)
        t = _fma_term(t, x3, Y, cols, m, 3, D, DP)
        t = _fma_term(t, x4, Y, cols, m, 4, D, DP)
        t = _fma_term(t, x5, Y, cols, m, 5, D, DP)
        t = _fma_term(t, x6, Y, cols, m, 6, D, DP)
        t = _fma_term(t, x7, Y, cols, m, 7, D, DP)
    else:
        dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, D):
            xk = tl.load(X + rows * DP + k, mask=rows < n, other=0.0).to(tl.float32)
            yk = tl.load(Y + cols * DP + k, mask=cols < m, other=0.0).to(tl.float32)
            dot += xk[:, None] * yk[None, :]
        t = u[None, :] + two_k2 * dot
    return t


@triton.jit
def _plan_bias(POT, LOG_W, NORM, idx, ok, inv_eps2, k2, HAS_LOG_W: tl.constexpr):
    """Base-2 bias of a plan's logits along one side: log2(e) (log w + pot / eps) - k2 |z|^2.

    The columns' ``u_j`` (from g, log_b, |y_j|^2) and the rows' ``r_i`` (from f,
    log_a, |x_i|^2) of ``P_ij = exp2(r_i + u_j + 2 k2 x_i.y_j)``. Entries past
    ``ok`` read 0; absent log-weights (HAS_LOG_W False) cost no load.
    """
    bias = inv_eps2 * tl.load(POT + idx, mask=ok, other=0.0).to(tl.float32) \
        - k2 * tl.load(NORM + idx, mask=ok, other=0.0)
    if HAS_LOG_W:
        bias += _LOG2E * tl.load(LOG_W + idx, mask=ok, other=0.0).to(tl.float32)
    return bias


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
