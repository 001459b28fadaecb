"""Pieces shared by the torch references, and the centring both backends use.

The cost is ``C_ij = c * |x_i - y_j|^2``. It is translation invariant, so both
clouds are shifted by the same centre ``z = (mean(x) + mean(y)) / 2`` before
the expansion ``C_ij = c (|x_i|^2 + |y_j|^2 - 2 x_i . y_j)``: this keeps
``|x_i|^2`` and ``|y_j|^2`` as small as the clouds allow, which is what limits
the cancellation in the expansion. The centre is symmetric in ``(x, y)``, so the
transposed call (``y`` and ``x`` swapped) sees bitwise the same centred points.
The Triton kernels' prepared clouds (``_layout``) use the same :func:`centre`.

The references process the rows in blocks whose temporaries fit in
``config.torch_block_bytes``: they never allocate n x m at once.
"""

from __future__ import annotations

import torch

from solvers import config

__all__ = ["as_batched", "centre", "centred_points", "compute_dtype", "cost_block", "row_blocks"]

config.declare("torch_block_bytes", 64 * 2**20, owner="otlinop.kernels", doc=(
    "memory budget in bytes of the (rows, m) temporaries of one row block of the torch references; "
    "they never allocate n x m at once"))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the torch references: the input dtype, half inputs promoted to float32."""
    # (float32 and float64 without torch.promote_types: a dispatched op, run per kernel launch)
    return dtype if dtype in (torch.float32, torch.float64) else torch.promote_types(dtype, torch.float32)


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


def centre(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Common centre of the two clouds, ``(mean(x) + mean(y)) / 2`` in ``dtype``.

    Shape (d,) for unbatched clouds, (B, d) if either is batched. Symmetric in
    (x, y), so a swapped call uses bitwise the same centre.
    """
    mx = x.mean(dim=-2, dtype=dtype)
    my = y.mean(dim=-2, dtype=dtype)
    return ((mx + my) * 0.5).contiguous()


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
