"""Streaming Triton kernels of otlinop, with their torch references.

One file per primitive; each computes on the squared Euclidean cost
``C_ij = cost_scale * |x_i - y_j|^2`` without ever storing an n x m matrix:

- :func:`lse_cost`, :func:`softmin` (``softmin.py``): the Sinkhorn update
  ``-eps LSE_j(h_j - C_ij / eps)``.
- :func:`plan_apply` (``plan_apply.py``): ``P @ V`` for the entropic plan;
  ``P.T @ U`` is the same call with the roles of (x, f, log_a) and
  (y, g, log_b) swapped. :func:`plan_apply_scaled`: the same product with
  each row's factor kept in log scale (``P V = exp(L) S``), for products
  beyond the dtype's range and for row-normalised sums.
- :func:`plan_bilinear` (``plan_bilinear.py``): ``sum_j P_ij <W_i, V_j> Y_j``.
- :func:`blocksparse_lse`, :func:`blocksparse_softmin`, :func:`blocksparse_apply`
  (``blocksparse.py``): the same soft-min and plan product restricted to the
  kept (row cluster, column cluster) pairs of clustered clouds (the
  multiscale solver's kernels); :func:`transpose_pattern` transposes a pattern.
- :func:`plan_truncate` (``plan_truncate.py``): the entries of P above a
  threshold, in a padded sparse layout; :func:`ell_matmat` /
  :func:`ell_bilinear` (``ell.py``): the products with that layout.

Every primitive accepts a ``backend`` (None, "triton", "torch"), unbatched
inputs and, but for the truncation, a leading batch dim B (one kernel
launch); the streaming ones take a ``precision`` (None, "ieee", "tf32",
"tf32x3"; None means :data:`DEFAULT_PRECISION`). The
``*_torch`` functions are the float64-capable references and the CPU fallback.
Only the operators import this package.

What the kernel files share lives in private modules, one idea each:

- ``_dispatch.py``: the backend and the precision of a call (Triton or the
  torch reference; ``DEFAULT_PRECISION``; whether the interpreter runs).
- ``_layout.py``: the prepared pair of clouds the kernels read (centred,
  padded, split or scaled) and its cache; the dot path of each dimension.
- ``_grid.py``: the shape of a launch: device, batch strides, SM count and
  the column splits (flash-decoding) of short row grids.
- ``_tuning.py``: autotuning candidates, their pruning, the tuning keys and
  launches through the chosen config.
- ``_tiles.py``: the ``@triton.jit`` helpers every kernel calls (logits of a
  tile, plan biases, the online log-sum-exp step).
- ``_reference.py``: the centring and the row blocks of the torch references.
- ``_triton.py``: ``triton`` and ``triton.language``, or stand-ins without Triton.
"""

from ._dispatch import BACKENDS, DEFAULT_PRECISION, PRECISIONS
from .blocksparse import (
    blocksparse_apply,
    blocksparse_apply_torch,
    blocksparse_lse,
    blocksparse_lse_torch,
    blocksparse_softmin,
    blocksparse_softmin_torch,
    transpose_pattern,
)
from .ell import ell_bilinear, ell_matmat, ell_matmat_torch
from .plan_apply import plan_apply, plan_apply_scaled, plan_apply_torch
from .plan_bilinear import plan_bilinear, plan_bilinear_torch
from .plan_truncate import plan_truncate, plan_truncate_torch
from .softmin import lse_cost, lse_cost_torch, softmin, softmin_torch
from .softmin_pair import softmin_pair, softmin_pair_torch, softmin_self

__all__ = [
    "BACKENDS",
    "blocksparse_apply",
    "blocksparse_apply_torch",
    "blocksparse_lse",
    "blocksparse_lse_torch",
    "blocksparse_softmin",
    "blocksparse_softmin_torch",
    "DEFAULT_PRECISION",
    "ell_bilinear",
    "ell_matmat",
    "ell_matmat_torch",
    "PRECISIONS",
    "lse_cost",
    "lse_cost_torch",
    "plan_apply",
    "plan_apply_scaled",
    "plan_apply_torch",
    "plan_bilinear",
    "plan_bilinear_torch",
    "plan_truncate",
    "plan_truncate_torch",
    "softmin",
    "softmin_pair",
    "softmin_pair_torch",
    "softmin_self",
    "softmin_torch",
    "transpose_pattern",
]
