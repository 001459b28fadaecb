"""The shape of a launch: its device, its batch strides, and how it fills the GPU.

A streaming launch gives one program to each tile of rows (times the batch).
When those programs alone leave SMs idle (n = 10k gives 79 tiles of 128 rows
for 132 SMs), :func:`column_splits` also splits the columns over the grid and
a light second pass merges the partial results (flash-decoding). The split
is a function of the sizes and of the GPU's SM count only, so results are
deterministic; on the CPU and under the interpreter there is no split.
"""

from __future__ import annotations

import contextlib

import torch

from ._dispatch import interpreting
from ._triton import cdiv

__all__ = [
    "MAX_BATCH",
    "MIN_SPLIT_COLS",
    "PROGRAMS_PER_SM",
    "SPLIT_ALIGN",
    "SPLIT_ROW_TILE",
    "batch_stride",
    "column_splits",
    "device_guard",
    "sm_count",
    "split_plan",
    "unit_last",
]

#: Largest batch of one call: the batch index is a grid dimension of the launches.
MAX_BATCH = 65535

#: Columns of one split are a multiple of this (>= the widest BLOCK_N).
SPLIT_ALIGN = 128
#: Rows per program assumed when counting a launch's row programs: the
#: largest BLOCK_M of the configs (the tile is chosen after the split).
SPLIT_ROW_TILE = 128
#: A split gets at least this many columns (below, the merge costs more than it saves).
#: 256 measured faster than 1024, 512 and 128 on whole training steps at n = 2048 (H100,
#: 2026-12-07: 2.50 against 3.26 ms at d = 3, 3.69 against 4.20 at d = 64; 16 row
#: tiles get 8 splits instead of 2); larger m is not affected (the grid fills first).
MIN_SPLIT_COLS = 256
#: The row grid is split over the columns until it has about this many
#: programs per SM.
PROGRAMS_PER_SM = 2


# --------------------------------------------------------------------------
# Device and strides
# --------------------------------------------------------------------------


def device_guard(device: torch.device):
    """Launch on the inputs' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def batch_stride(t: torch.Tensor, unbatched_ndim: int) -> int:
    """Stride of the batch dim of ``t``; 0 when ``t`` is shared by the batch."""
    return t.stride(0) if t.ndim == unbatched_ndim + 1 else 0


def unit_last(t):
    """``t`` with a unit stride on its last dim (copies only when needed)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int | None:
    """SMs of the GPU that runs compiled kernels on ``device``; None on the CPU and under the interpreter."""
    if device.type != "cuda" or interpreting():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# --------------------------------------------------------------------------
# Column splits (flash-decoding) for short row grids
# --------------------------------------------------------------------------


def split_plan(m: int, splits: int, *, align: int = SPLIT_ALIGN):
    """``(splits, cols_per_split)``: at most ``splits`` ranges of ``align``-aligned columns covering m."""
    splits = max(1, min(int(splits), cdiv(max(m, 1), align)))
    cols = cdiv(cdiv(max(m, 1), splits), align) * align
    return cdiv(max(m, 1), cols), cols


def column_splits(row_programs: int, m: int, sms: int | None, *, forced=None):
    """``(splits, cols_per_split)`` for a row grid of ``row_programs`` programs.

    ``sms``: the SM count of the GPU (:func:`sm_count`); None (the CPU, the
    interpreter) never splits. ``forced``: the launchers' ``_splits`` hook,
    for tests and profiling: a split count (``SPLIT_ALIGN``-aligned, see
    :func:`split_plan`), or a ready ``(splits, cols_per_split)`` plan, e.g.
    ``split_plan(m, 3, align=16)`` to split a small problem.
    """
    if forced is not None:
        return _forced_plan(m, forced)
    if sms is None:
        return 1, max(m, 1)
    target = PROGRAMS_PER_SM * sms
    if row_programs >= target:
        return 1, max(m, 1)
    return split_plan(m, min(cdiv(target, max(row_programs, 1)), max(1, m // MIN_SPLIT_COLS)))


def _forced_plan(m: int, forced):
    if isinstance(forced, tuple):
        splits, cols = forced
        if not (splits >= 1 and cols >= 1 and (splits - 1) * cols < max(m, 1) <= splits * cols):
            raise ValueError(f"_splits: the plan {forced} does not cover the {m} columns in {splits} ranges "
                             f"of {cols}; build it with split_plan(m, splits, align=...)")
        return splits, cols
    if isinstance(forced, bool) or not isinstance(forced, int) or forced < 1:
        raise ValueError(f"_splits must be a positive int or a (splits, cols_per_split) pair, got {forced!r}")
    return split_plan(m, forced)
