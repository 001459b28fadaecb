"""The two clouds as the Triton kernels read them: centred, padded, split or scaled.

Every launch on a pair of clouds ``(x, y)`` takes a :class:`PreparedPair`:
the points minus their common centre (see ``_reference``), each row padded
to a whole number of tensor-core chunks, their squared norms in fp32, and
the kernel constants that follow from the dimension and the precision (the
dot path, the chunking, the ``tl.dot`` precision). For "tf32x3" at small d
the fp32 coordinates are split once into TF32 high and low parts
(``SPLIT_MAX_K``); for "tf32" at large d they are stored as scaled fp16
(``config.half_tf32``). Half points (float16, bfloat16) are stored as
float32, like float32 points: their costs are computed in fp32 from their
exact values. :func:`prepare_pair` builds a pair once and reuses it while
both clouds are alive and unchanged.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch

from solvers import config

from ._reference import as_batched, centre
from ._tiles import LOG2E
from ._triton import cdiv
from ._tuning import pick_block

__all__ = ["CACHE_SIZE", "MAX_BLOCK_D", "PreparedPair", "SPLIT_MAX_K", "cached_pairs", "clear_cache", "dot_mode",
           "feature_layout", "prepare_pair", "round_to_tf32"]

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
    'precision="tf32" on float32 points with d >= half_tf32_min_d multiplies scaled fp16 copies of the points '
    "(11 significant bits like TF32, rounded to nearest, twice the rate); False keeps TF32 operands"))
#: ... from this dimension on. Measured on the H100: faster at d = 64 (above);
#: slower at d = 3, where the dot is a small part of a tile's work: 1.84 ms
#: per symmetric step at n = m = 50k, against 1.36 ms for the tf32x3 pair,
#: whose fp32 TF32 dot has the same width (16). Dimensions in between are not
#: measured yet (scripts/profile_half_tf32.py sweeps them): they keep fp32 operands.
config.declare("half_tf32_min_d", 64, owner="otlinop.kernels", doc=(
    "smallest dimension d at which half_tf32 applies; below it \"tf32\" keeps fp32 operands on TF32"))


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
    :func:`feature_layout`), in fp32 (fp16 for config.half_tf32); for a split pair the rows
    hold ``[x_hi, x_lo, x_hi]`` and ``[y_hi, y_hi, y_lo]`` (see
    ``SPLIT_MAX_K``). ``xn`` (Bx, n) and ``yn`` (By, m): the squared norms of
    the centred points in fp32 (of the rounded points for config.half_tf32,
    so that the expansion ``|x|^2 + |y|^2 - 2 x.y`` is that of the points the
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
    half = config.half_tf32 and precision == "tf32" and dtype == torch.float32 and dot == 0 \
        and d >= config.half_tf32_min_d
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
        # The scale needs the largest coordinate on the host: not inside a capture, nor where
        # synchronisations raise (the dry run before one, otlinop._call_graphs).
        half = half and not (x3.is_cuda and (torch.cuda.is_current_stream_capturing()
                                             or torch.cuda.get_sync_debug_mode() == 2))
        scale = _half_scale(*centred) if half else 1.0
        out, norms = [], []
        for side, t in enumerate((x3, y3)):
            # A cloud shared by a batch whose entries have different centres is
            # materialised per entry.
            store = torch.float16 if half else torch.float32
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
CACHE_SIZE = 4
_cache: dict = {}
# Scopes of scoped_cache, per thread (innermost last).
_scopes = threading.local()


@contextlib.contextmanager
def scoped_cache():
    """Prepared pairs made inside the block are kept only until it exits.

    Calls inside the block still reuse each other's pairs (a Sinkhorn loop
    prepares its clouds once), but nothing prepared there outlives it, and
    the process-wide cache is neither read nor changed. The custom ops that
    ``torch.compile`` calls run in one: under ``mode="reduce-overhead"`` their
    allocations come from a CUDA-graph pool, and a pair kept past the op
    would be a live allocation the graph does not own (inductor refuses the
    graph).
    """
    stack = _scopes.__dict__.setdefault("stack", [])
    stack.append({})
    try:
        yield
    finally:
        stack.pop().clear()


def _current_cache() -> dict:
    stack = getattr(_scopes, "stack", None)
    return stack[-1] if stack else _cache


def prepare_pair(x: torch.Tensor, y: torch.Tensor, precision: str) -> PreparedPair:
    """The prepared pair of two clouds for ``precision``, reused while they are alive and unchanged.

    ``(y, x)`` is served from the entry of ``(x, y)`` (swapped). Memory: a
    copy of each cloud, O((n + m) d) (three times d for a split pair); at most
    ``CACHE_SIZE`` pairs are kept.
    """
    import weakref

    # x and y share d and dtype (checked by the launchers): one layout for both orders. Half points
    # are stored as float32 (exactly their values, centred in fp32): their costs and hence their
    # potentials are those of the given points and of their float32 copies (at which the loss
    # differentiates), and the precision applies to them as to float32 ones.
    layout = _layout_of(x.shape[-1], torch.float32, precision)
    if x.is_inference() or y.is_inference():
        # Inference tensors carry no version counter: an in-place change could
        # not be detected, so they are prepared afresh at every call.
        return _prepare(x, y, layout)
    cache = _current_cache()
    key = (id(x), id(y), layout)
    for lookup, swap in ((key, False), ((id(y), id(x), layout), True)):
        entry = cache.get(lookup)
        if entry is None:
            continue
        rx, ry, vx, vy, pair = entry
        a, b = (y, x) if swap else (x, y)
        if rx() is a and ry() is b and a._version == vx and b._version == vy:
            cache[lookup] = cache.pop(lookup)    # most recently used last
            return pair.swapped() if swap else pair
        cache.pop(lookup, None)
    pair = _prepare(x, y, layout)
    if layout[-1] and pair.x.dtype != torch.float16:
        # Prepared inside a CUDA-graph capture without config.half_tf32's scale (no
        # host sync there): not kept, so that later calls get the fp16 operands.
        return pair
    try:
        rx, ry = weakref.ref(x), weakref.ref(y)
    except TypeError:  # pragma: no cover - tensors support weak references
        return pair
    cache[key] = (rx, ry, x._version, y._version, pair)
    for t in (x, y):
        weakref.finalize(t, cache.pop, key, None)
    while len(cache) > CACHE_SIZE:
        cache.pop(next(iter(cache)))
    return pair


def clear_cache() -> None:
    """Drop the prepared pairs kept by :func:`prepare_pair`."""
    _cache.clear()


def cached_pairs() -> int:
    """How many prepared pairs :func:`prepare_pair` keeps now (at most ``CACHE_SIZE``)."""
    return len(_cache)
