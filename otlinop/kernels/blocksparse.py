"""Block-sparse streaming kernels: the soft-min and the plan product on kept cluster pairs.

Both clouds are *clustered*: their points are permuted so that cluster I of x
holds the rows ``x_starts[I]:x_starts[I + 1]`` (and likewise for y; empty
clusters repeat a start). A *pattern* in CSR form over the row clusters,
``ptr`` (Kx + 1,) and ``idx`` (nnz,), lists the column clusters kept for each
row cluster, ascending: entry (i, j) is present iff the pair
(cluster(i), cluster(j)) is kept; every other entry is exactly zero. For
``C_ij = c |x_i - y_j|^2`` and ``K(i)`` the columns kept for row i:

    blocksparse_lse(...)_i     = log sum_{j in K(i)} exp(h_j - C_ij / eps)
    blocksparse_softmin(...)_i = -eps * blocksparse_lse(...)_i
    blocksparse_apply(...)_i   = sum_{j in K(i)} a_i b_j exp((f_i + g_j - C_ij) / eps) V_j

the restrictions of :func:`~otlinop.kernels.lse_cost`, :func:`~otlinop.kernels.softmin`
and :func:`~otlinop.kernels.plan_apply` to the kept blocks. The transposed
product ``P.T @ U`` is :func:`blocksparse_apply` with the roles of (x, f,
log_a, x_starts) and (y, g, log_b, y_starts) swapped and the pattern
transposed (:func:`transpose_pattern`, computed once per pattern).

The Triton kernels (CUDA float32 / float16 / bfloat16) give one program to
each row tile: up to ``BLOCK_M`` consecutive rows inside one row cluster. It
walks the cluster's kept column clusters in ``idx`` order (runs of
consecutive ids as one range of y) and streams them by ``BLOCK_N`` columns
through the online log-sum-exp of the dense kernels (``_tiles``), in fp32.
At d <= ``LOCAL_MAX_D`` the cost tile is d FMAs per entry on points centred
per tile; above, the dense kernels' prepared pair and ``tile_logits``
(tensor cores, ``precision``). The grid, ``cdiv(n, BLOCK_M) + Kx`` programs,
and the tile -> cluster map (device ops) follow from the shapes: a launch
reads nothing back to the host (the argument checks read once, as every
kernel's, unless ``config.check_finite`` is off).

Cost: time O(sum over kept pairs of |I| |J| d), memory O((n + m) d + nnz + Kx)
(never a kept block: the plan is streamed); the torch references process the
rows in chunks whose temporaries stay under ``config.torch_block_bytes``, in
one of two forms: the kept columns of each row gathered (padded lists), or,
where the kept entries are a quarter of n m or more and the rounding allows it,
dense row blocks with the dropped cluster pairs masked (``_masked_dense``).
Each row's sum runs over its kept column clusters in ``idx`` order, in a fixed
order without atomics: the results are deterministic (the torch reference's
do not depend on its chunking either).
"""

from __future__ import annotations

import torch

from solvers import config

from .._checks import (Geometry, block_pattern, cluster_layout, finite, nonnegative_int, operand, points,
                       positive_scalar, vector)
from ._dispatch import interpreting, resolve_backend, resolve_precision
from ._grid import device_guard, unit_last
from ._layout import prepare_pair
from ._reference import centred_points, compute_dtype, row_blocks
from ._tiles import LN2, LOG2E, TL_LOG2E, mma, online_step, row_setup, scale_rows, tile_logits
from ._triton import cdiv, tl, triton
from ._tuning import AUTOTUNE_DISK_CACHE, TunedLaunch, bucket, configs_or_interpreter, pick_block, pruner, tile_config

__all__ = [
    "blocksparse_apply",
    "blocksparse_apply_torch",
    "blocksparse_apply_unchecked",
    "blocksparse_lse",
    "blocksparse_lse_torch",
    "blocksparse_softmin",
    "blocksparse_softmin_torch",
    "blocksparse_softmin_unchecked",
    "transpose_pattern",
]

#: Why a block-sparse plan product can overflow, for the message that refuses one.
OVERFLOW_HINT = (
    "the kept entries a_i b_j exp((f_i + g_j - C_ij) / eps), or their sums, exceed the dtype's range in some rows; "
    "the potentials of this problem keep f_i + g_j - C_ij near or below 0")


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _geometry(fn, x, y, x_starts, y_starts, ptr, idx, eps, cost_scale):
    geo = points(fn, x, y, batch="none", hint="block-sparse kernels take one clustered pair of clouds per call")
    # The layout's values are read back with the finiteness check: not computed when that is off.
    flags = cluster_layout(geo, x_starts, y_starts, ptr, idx, values=config.check_finite)
    return geo, flags, positive_scalar(fn, "eps", eps), positive_scalar(fn, "cost_scale", cost_scale)


def _validate_lse(fn, x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale):
    """Shapes, dtypes, scalars, then the values (one read-back)."""
    geo, flags, eps, cost_scale = _geometry(fn, x, y, x_starts, y_starts, ptr, idx, eps, cost_scale)
    vector(geo, "h", h, geo.m, what="one log-weight per point of y", wide=True)
    finite(fn, {"x": x, "y": y, "h": h}, allow_neg_inf=("h",), flags=flags)
    return geo, eps, cost_scale


def _validate_apply(fn, x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b, eps, cost_scale):
    """Shapes, dtypes and scalars; the values are read back with the product's (:func:`_check_apply`)."""
    geo, flags, eps, cost_scale = _geometry(fn, x, y, x_starts, y_starts, ptr, idx, eps, cost_scale)
    vector(geo, "f", f, geo.n, wide=True)
    vector(geo, "g", g, geo.m, wide=True)
    vector(geo, "log_a", log_a, geo.n, optional=True, wide=True)
    vector(geo, "log_b", log_b, geo.m, optional=True, wide=True)
    operand(geo, "V", V, geo.m, wide=True,
            transpose=f"{fn}(y, x, g, f, U, y_starts, x_starts, *transpose_pattern(ptr, idx, Kx), "
                      "log_a=log_b, log_b=log_a, ...)")
    return geo, flags, eps, cost_scale


def _check_apply(fn, x, y, f, g, V, log_a, log_b, flags, out):
    finite(fn, {"x": x, "y": y, "f": f, "g": g, "V": V, "log_a": log_a, "log_b": log_b},
           allow_neg_inf=("f", "g", "log_a", "log_b"), flags=flags, results={"P @ V": out},
           result_hint=OVERFLOW_HINT)


# --------------------------------------------------------------------------
# Pattern algebra
# --------------------------------------------------------------------------


def transpose_pattern(ptr, idx, num_col_clusters):
    """The CSR pattern of the transpose: kept row clusters per column cluster.

    Parameters
    ----------
    ptr : Tensor, shape (Kx + 1,), int64
        Row pointers of the pattern: row cluster I keeps ``idx[ptr[I]:ptr[I + 1]]``.
    idx : Tensor, shape (nnz,), int64
        Kept column cluster ids, ascending inside each row cluster.
    num_col_clusters : int
        Ky, the number of column clusters.

    Returns
    -------
    ptr_t : Tensor, shape (Ky + 1,), int64
    idx_t : Tensor, shape (nnz,), int64
        Column cluster J keeps the row clusters ``idx_t[ptr_t[J]:ptr_t[J + 1]]``,
        ascending.

    Raises
    ------
    TypeError, ValueError
        Non-int64 tensors, wrong shapes, devices that differ, ``num_col_clusters`` not a
        non-negative integer, or (read back once) ids out of range or not ascending.

    Notes
    -----
    Pair p = (I, J) moves to row J of the transpose; sorting the pairs by the
    key ``J Kx + I`` (unique) orders the rows of the transpose and, inside each,
    the row clusters. Torch ops on the pattern's device, no host loop: the same
    pattern gives bitwise the same transpose.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import transpose_pattern
    >>> ptr, idx = torch.tensor([0, 2, 3]), torch.tensor([0, 2, 1])
    >>> transpose_pattern(ptr, idx, 3)
    (tensor([0, 1, 2, 3]), tensor([0, 1, 0]))
    """
    fn = "transpose_pattern"
    ky = nonnegative_int(fn, "num_col_clusters", num_col_clusters)
    if not isinstance(ptr, torch.Tensor):
        raise TypeError(f"{fn}: ptr must be a torch.Tensor of dtype int64, got {type(ptr).__name__}")
    finite(fn, {}, flags=block_pattern(fn, ptr, idx, ptr.numel() - 1, ky, ptr.device, values=config.check_finite))
    return transpose_pattern_torch(ptr, idx, ky)


def transpose_pattern_torch(ptr, idx, ky):
    """:func:`transpose_pattern` without the checks: (ptr_t (Ky + 1,), idx_t (nnz,))."""
    kx = ptr.numel() - 1
    nnz = idx.numel()
    rows = torch.repeat_interleave(torch.arange(kx, device=ptr.device), ptr[1:] - ptr[:-1], output_size=nnz)
    order = torch.argsort(idx * max(kx, 1) + rows)
    # index_add_ rather than bincount, which reads the largest id back on CUDA.
    counts = torch.zeros(ky, dtype=torch.int64, device=ptr.device).index_add_(0, idx, torch.ones_like(idx))
    ptr_t = torch.zeros(ky + 1, dtype=torch.int64, device=ptr.device)
    torch.cumsum(counts, 0, out=ptr_t[1:])
    return ptr_t, rows[order]


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------


def _row_chunks(x_starts, y_starts, ptr, idx, n, width):
    """The rows in chunks with their kept columns, padded.

    Yields ``(lo, hi, cols, valid)``: ``cols`` (hi - lo, L) int64, the kept
    columns of each row in ``idx`` order (cluster after cluster, each in
    ascending order), ``valid`` (hi - lo, L) bool marks the real ones (the
    padding holds column 0). A chunk keeps ``(hi - lo) * L * width`` elements
    under ``config.torch_block_bytes / 8`` (``width``: temporaries per entry).
    """
    if n == 0:
        return
    sizes = y_starts[1:] - y_starts[:-1]
    # cum[p]: the kept columns of the pairs before pair p, pattern-wide.
    cum = torch.zeros(idx.numel() + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(sizes[idx], 0, out=cum[1:])
    per_cluster = cum[ptr[1:]] - cum[ptr[:-1]]           # kept columns of each row cluster
    first = cum[ptr[:-1]]                                # where they begin in the pattern-wide list
    row_counts = x_starts[1:] - x_starts[:-1]
    # The chunking is the reference's business: plan it on the host from the per-cluster counts.
    lengths = per_cluster.tolist()
    counts = row_counts.tolist()
    budget = max(1, config.torch_block_bytes // (8 * width))
    plan, lo, rows, wide = [], 0, 0, 0
    for count, length in zip(counts, lengths):
        while count:
            room = budget // max(length, wide, 1) - rows
            if room <= 0 and rows:
                plan.append((lo, lo + rows, wide))
                lo, rows, wide = lo + rows, 0, 0
                continue
            # At least one row per chunk, however long its list.
            take = min(count, max(room, 1))
            rows, count, wide = rows + take, count - take, max(wide, length)
    if rows:
        plan.append((lo, lo + rows, wide))
    cluster = torch.repeat_interleave(torch.arange(len(counts), device=idx.device), row_counts, output_size=n)
    for lo, hi, wide in plan:
        if wide == 0:
            continue  # no row here keeps a column: the callers' defaults (-inf, 0) stand
        cl = cluster[lo:hi]
        t = torch.arange(wide, device=idx.device)
        valid = t < per_cluster[cl, None]
        pos = torch.where(valid, first[cl, None] + t, 0)
        # Pair of each position: the last p with cum[p] <= pos (right=True skips empty clusters).
        pair = (torch.searchsorted(cum, pos, right=True) - 1).clamp_(0, max(idx.numel() - 1, 0))
        if idx.numel():
            cols = torch.where(valid, y_starts[idx[pair]] + (pos - cum[pair]), 0)
        else:
            cols = torch.zeros_like(pos)
        yield lo, hi, cols, valid


def _costs(x, y, rows, cols, cost_scale, dtype):
    """``c |x_i - y_j|^2`` for the rows ``rows`` and their columns ``cols``: (r, L)."""
    diff = x[rows].to(dtype)[:, None, :] - y[cols].to(dtype)
    return diff.square_().sum(-1).mul_(cost_scale)


#: The masked dense form's bound on the absolute error of a logit, u c (max|x'|^2 + max|y'|^2) / eps
#: (u the unit roundoff, x', y' the centred clouds): above it the references take the gathered form,
#: whose differences x_i - y_j keep the error near u C_ij / eps.
_MASKED_LOGIT_ERROR = 1e-6


def _masked_dense(x, y, x_starts, y_starts, ptr, idx, eps, cost_scale, dtype):
    """The masked dense form of the references, or None where the gathered form is the better one.

    Where the kept entries are at least a quarter of ``n m`` (early eps steps, large truncation
    radii, few clusters), the gathered form spends most of its time locating columns (a search
    per kept entry) and forming differences; a dense row block ``|x'|^2 + |y'|^2 - 2 x'.y'`` (on the
    centred points, a multiply-add per coordinate) with the dropped blocks masked to ``-inf``
    costs ``n m`` and is several times faster there. Its rounding differs (the expansion on
    centred points), so it is taken only where its logit error bound stays under
    ``_MASKED_LOGIT_ERROR`` and the cluster-pair mask (Kx, Ky) fits ``config.torch_block_bytes``.
    Returns ``(cx, cy, mask, points)``: the cluster of each row and column, the (Kx, Ky) kept
    pairs, and :func:`~otlinop.kernels._reference.centred_points`' tuple. One host read (the
    kept count and the norms together).
    """
    n, m = x.shape[0], y.shape[0]
    kx, ky = x_starts.numel() - 1, y_starts.numel() - 1
    if n == 0 or m == 0 or idx.numel() == 0 or kx * ky > config.torch_block_bytes:
        return None
    rows = x_starts[1:] - x_starts[:-1]
    cols = y_starts[1:] - y_starts[:-1]
    pair_row = torch.repeat_interleave(torch.arange(kx, device=idx.device), ptr[1:] - ptr[:-1],
                                       output_size=idx.numel())
    kept = (rows[pair_row] * cols[idx]).sum()
    points = centred_points(x, y, dtype)
    radius = points[2].amax() + points[3].amax()
    kept, radius = torch.stack([kept.to(dtype), radius]).tolist()
    if 4 * kept < n * m or torch.finfo(dtype).eps / 2 * cost_scale * radius / eps > _MASKED_LOGIT_ERROR:
        return None
    mask = torch.zeros((kx, ky), dtype=torch.bool, device=idx.device)
    mask[pair_row, idx] = True
    cx = torch.repeat_interleave(torch.arange(kx, device=idx.device), rows, output_size=n)
    cy = torch.repeat_interleave(torch.arange(ky, device=idx.device), cols, output_size=m)
    return cx, cy, mask, points


def _kept_blocks(x, y, x_starts, y_starts, ptr, idx, eps, cost_scale, dtype, width):
    """The kept entries of the references, by row blocks.

    Yields ``(lo, hi, C, cols, valid)``: the costs ``C`` (hi - lo, L) of rows ``lo:hi``
    against their columns ``cols`` (hi - lo, L), or against all m columns in order when
    ``cols`` is None (the masked dense form), with ``valid`` marking the kept ones.
    """
    n, m = x.shape[0], y.shape[0]
    dense = _masked_dense(x, y, x_starts, y_starts, ptr, idx, eps, cost_scale, dtype)
    if dense is not None:
        cx, cy, mask, (xc, yc, xn, yn) = dense
        xc, yc, xn, yn = xc[0], yc[0], xn[0], yn[0]
        for block in row_blocks(n, m, 1, torch.finfo(dtype).bits // 8, width):
            # |x'|^2 + |y'|^2 - 2 x'.y' one coordinate at a time: each entry's rounding is its own,
            # whatever the block (a matrix product's depends on the block's shape).
            C = xn[block, None] + yn
            for k in range(xc.shape[1]):
                C.addcmul_(xc[block, k, None], yc[:, k], value=-2.0)
            yield block.start, block.stop, C.clamp_min_(0.0).mul_(cost_scale), None, mask[cx[block]][:, cy]
        return
    for lo, hi, cols, valid in _row_chunks(x_starts, y_starts, ptr, idx, n, width):
        yield lo, hi, _costs(x, y, slice(lo, hi), cols, cost_scale, dtype), cols, valid


def blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale):
    """:func:`blocksparse_lse_torch` without the checks: (n,) in ``compute_dtype(x.dtype)``."""
    dtype = compute_dtype(x.dtype)
    n, d = x.shape
    out = torch.full((n,), float("-inf"), device=x.device, dtype=dtype)
    h = h.to(dtype)
    for lo, hi, C, cols, valid in _kept_blocks(x, y, x_starts, y_starts, ptr, idx, eps, cost_scale, dtype, d + 3):
        logits = C.div_(-eps).add_(h if cols is None else h[cols])
        out[lo:hi] = torch.logsumexp(logits.masked_fill_(~valid, float("-inf")), dim=-1)
    return out


def blocksparse_apply_core(x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b, eps, cost_scale):
    """:func:`blocksparse_apply_torch` without the checks: (n,) or (n, k) in the dtype of x."""
    dtype = compute_dtype(x.dtype)
    n, d = x.shape
    row = f.to(dtype) / eps
    if log_a is not None:
        row = row + log_a.to(dtype)
    col = g.to(dtype) / eps
    if log_b is not None:
        col = col + log_b.to(dtype)
    vector_out = V is None or V.ndim == 1
    k = 1 if vector_out else V.shape[1]
    if V is not None:
        V2 = (V[:, None] if vector_out else V).to(dtype)
    out = torch.zeros((n, k), device=x.device, dtype=dtype)
    for lo, hi, C, cols, valid in _kept_blocks(x, y, x_starts, y_starts, ptr, idx, eps, cost_scale, dtype,
                                               d + k + 3):
        logits = C.div_(-eps).add_(col if cols is None else col[cols])
        logits.masked_fill_(~valid, float("-inf"))
        # The row's largest logit comes out of the exponential and back as exp(row + M), in
        # two halves as the dense kernels do: no intermediate overflow or underflow.
        M = logits.amax(dim=-1, keepdim=True)
        has = torch.isfinite(M)
        M = torch.where(has, M, torch.zeros_like(M))
        p = logits.sub_(M).exp_()
        if V is None:
            S = p.sum(-1, keepdim=True)
        elif cols is None:
            S = p @ V2
        else:
            S = torch.einsum("rl,rlk->rk", p, V2[cols])
        L = torch.where(has[:, 0], row[lo:hi] + M[:, 0], float("-inf"))
        half = torch.exp(0.5 * L)[:, None]
        out[lo:hi] = S.mul_(half).mul_(half)
    if vector_out:
        out = out[:, 0]
    return out.to(x.dtype)


def blocksparse_lse_torch(x, y, h, x_starts, y_starts, ptr, idx, *, eps, cost_scale=1.0):
    """Torch reference of :func:`blocksparse_lse` (same arguments but backend/precision).

    Any device; float64, float32 (half inputs computed and returned in
    float32). Rows are processed in chunks whose (rows, kept columns, d)
    temporaries stay under ``config.torch_block_bytes``.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import blocksparse_lse_torch
    >>> x = torch.randn(4, 2, dtype=torch.float64)
    >>> starts, ptr, idx = torch.tensor([0, 2, 4]), torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    >>> blocksparse_lse_torch(x, x, torch.zeros(4, dtype=torch.float64), starts, starts, ptr, idx, eps=1.0).shape
    torch.Size([4])
    """
    fn = "blocksparse_lse_torch"
    _, eps, cost_scale = _validate_lse(fn, x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)
    return blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)


def blocksparse_softmin_torch(x, y, h, x_starts, y_starts, ptr, idx, *, eps, cost_scale=1.0):
    """Torch reference of :func:`blocksparse_softmin`: ``-eps * blocksparse_lse_torch(...)``."""
    fn = "blocksparse_softmin_torch"
    _, eps, cost_scale = _validate_lse(fn, x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)
    return -eps * blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)


def blocksparse_apply_torch(x, y, f, g, V, x_starts, y_starts, ptr, idx, *, eps, log_a=None, log_b=None,
                            cost_scale=1.0):
    """Torch reference of :func:`blocksparse_apply` (same arguments but backend/precision).

    Any device; float64, float32 (half inputs computed in float32). Rows are
    processed in chunks whose temporaries stay under ``config.torch_block_bytes``.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import blocksparse_apply_torch
    >>> x = torch.randn(4, 2, dtype=torch.float64)
    >>> z = torch.zeros(4, dtype=torch.float64)
    >>> starts, ptr, idx = torch.tensor([0, 2, 4]), torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    >>> blocksparse_apply_torch(x, x, z, z, None, starts, starts, ptr, idx, eps=1.0).shape
    torch.Size([4])
    """
    fn = "blocksparse_apply_torch"
    _, flags, eps, cost_scale = _validate_apply(fn, x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b,
                                                eps, cost_scale)
    out = blocksparse_apply_core(x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b, eps, cost_scale)
    _check_apply(fn, x, y, f, g, V, log_a, log_b, flags, out)
    return out



# --------------------------------------------------------------------------
# Triton: tiles, autotuning
# --------------------------------------------------------------------------
#
# One program per row tile: up to BLOCK_M consecutive rows inside ONE row
# cluster, so that the whole tile shares one list of kept column clusters.
# Cluster I has cdiv(|I|, BLOCK_M) tiles; the tile -> cluster map is built on
# the device (cumsum + searchsorted, no host loop over clusters) and the grid
# has cdiv(n, BLOCK_M) + Kx programs, an upper bound on the number of tiles
# known from the shapes alone (each cluster adds at most one partial tile):
# no host synchronisation. Programs past the last tile find no cluster and
# store nothing. BLOCK_M is therefore fixed on the host (the map depends on
# it); the autotuner picks BLOCK_N, the warps and the stages.
#
# A program walks its cluster's kept column clusters in idx order. Runs of
# consecutive ids (J, J + 1, ...) are contiguous rows of y and are streamed as
# one range (fewer partial BLOCK_N chunks when clusters are small); each range
# goes by BLOCK_N columns through the online log-sum-exp of the dense kernels.
# Fixed order, no atomics, no column split: deterministic.

#: Rows per program. Multiscale clusters hold ~100-300 points at d = 3: 64-row
#: tiles waste less on a cluster's last partial tile than 128-row ones. The
#: interpreter's single config has 32 rows (``_tuning``).
BLOCK_M = 32 if interpreting() else 64

#: Dimensions up to this one compute the cost tile with fp32 FMAs on the points
#: centred *per tile* (on the first row of the tile) instead of the prepared,
#: globally centred layout and its tensor-core dot. At d <= 4 the dot costs d
#: FMAs per entry (against one FMA after a tensor-core dot), but (1) the
#: expansion |x'|^2 + |y'|^2 - 2 x'.y' is evaluated on coordinates of the size of
#: the kept neighbourhood (a few cluster widths) instead of the cloud's radius,
#: which at the small eps the multiscale solver reaches (blur 0.01: eps = 1e-4)
#: divides the cancellation error of the logits by (radius / neighbourhood)^2,
#: 25-100x; (2) the kernel reads the d coordinates as given (12 bytes per point at
#: d = 3 in fp32) instead of 64-byte padded split rows, and the column chunks are
#: short (one cluster) so the load of each Y tile weighs more than in the dense
#: stream. The exp2 per entry stays the bound at d <= 4: d + 4 FP32 operations
#: per MUFU exp2 (8 FP32 slots per exp2 on sm_90). Not measured on a GPU yet.
#: Larger d take the dense kernels' prepared pair and ``tile_logits`` (tensor
#: cores with the ``precision`` setting, or the FMA path of config.fma_max_d).
LOCAL_MAX_D = 4

_CONFIGS = configs_or_interpreter([
    tile_config(BLOCK_M, 64, 4, 2),
    tile_config(BLOCK_M, 128, 8, 2),
    tile_config(BLOCK_M, 64, 4, 3),
    tile_config(BLOCK_M, 32, 4, 2),
    tile_config(BLOCK_M, 32, 2, 1),
])

#: Widest chunk of the columns of V per program (wider V: more programs on axis 1).
_MAX_BLOCK_K = 64


def _fits(cfg, args):
    if args["LOCAL"]:
        return True
    # Tensor-core path with several feature chunks: see softmin.lse_fits (shared memory).
    return not (args["D_CHUNKS"] > 1 and (cfg.kwargs["BLOCK_N"] > 64 or cfg.num_stages > 2))


# --------------------------------------------------------------------------
# Triton: @triton.jit helpers
# --------------------------------------------------------------------------


@triton.jit
def _tile_of(TILE_CL, TILE_PTR, XS, num_clusters, BLOCK_M: tl.constexpr):
    """This program's row cluster and rows: ``(c, live, r0, end, rows, row_ok)``.

    ``c`` the cluster (0 when not ``live``: a program past the last tile),
    ``rows = r0 + arange(BLOCK_M)``, ``end`` the cluster's last row + 1 and
    ``row_ok = rows < end``; a program past the last tile gets no rows.
    """
    pid = tl.program_id(0)
    c = tl.load(TILE_CL + pid)
    live = c < num_clusters
    c = tl.where(live, c, 0)
    first = tl.load(TILE_PTR + c, mask=live, other=0)
    lo = tl.load(XS + c, mask=live, other=0)
    end = tl.load(XS + c + 1, mask=live, other=0)
    r0 = lo + (pid - first) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    return c, live, r0, end, rows, rows < end


@triton.jit
def _run(IDX, YS, p, p1):
    """The run of consecutive column cluster ids starting at pattern entry p:
    ``(lo, hi, q)``: its columns ``lo:hi`` of y and the entry after it."""
    j1 = tl.load(IDX + p)
    lo = tl.load(YS + j1)
    q = p + 1
    nxt = tl.load(IDX + q, mask=q < p1, other=-1)
    while nxt == j1 + 1:
        j1 = nxt
        q += 1
        nxt = tl.load(IDX + q, mask=q < p1, other=-1)
    hi = tl.load(YS + j1 + 1)
    return lo, hi, q


@triton.jit
def _coord(P, i, ok, stride, k: tl.constexpr, D: tl.constexpr):
    """Coordinate k of point i (a scalar), fp32; 0 past d or when not ok."""
    if k < D:
        v = tl.load(P + i * stride + k, mask=ok, other=0.0).to(tl.float32)
    else:
        v = 0.0
    return v


@triton.jit
def _centred(P, idx, ok, stride, zk, k: tl.constexpr, D: tl.constexpr):
    """Coordinate k of the points ``idx`` minus ``zk``, fp32; 0 where not ok; scalar 0 past d."""
    if k < D:
        v = tl.load(P + idx * stride + k, mask=ok, other=0.0).to(tl.float32) - zk
        v = tl.where(ok, v, 0.0)
    else:
        v = 0.0
    return v


@triton.jit
def _fma(t, a, b, k: tl.constexpr, D: tl.constexpr):
    if k < D:
        t += a[:, None] * b[None, :]
    return t


@triton.jit
def _rows(X, XN, stride_x, rows, row_ok, r0, live, end, two_k2,
          LOCAL: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """What a row tile keeps for the whole stream.

    LOCAL: the centre z (the tile's first row), the centred rows times
    ``2 k2`` in ``x0..x3`` and their squared norms. Else the prepared pair's
    ``row_setup`` and its norms. Returns ``(xc0, x0..x7, z0..z3, xn)``.
    """
    if LOCAL:
        z0 = _coord(X, r0, live, stride_x, 0, D)
        z1 = _coord(X, r0, live, stride_x, 1, D)
        z2 = _coord(X, r0, live, stride_x, 2, D)
        z3 = _coord(X, r0, live, stride_x, 3, D)
        c0 = _centred(X, rows, row_ok, stride_x, z0, 0, D)
        c1 = _centred(X, rows, row_ok, stride_x, z1, 1, D)
        c2 = _centred(X, rows, row_ok, stride_x, z2, 2, D)
        c3 = _centred(X, rows, row_ok, stride_x, z3, 3, D)
        xn = c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3
        xc0 = 0.0
        x0 = two_k2 * c0
        x1 = two_k2 * c1
        x2 = two_k2 * c2
        x3 = two_k2 * c3
        x4 = 0.0
        x5 = 0.0
        x6 = 0.0
        x7 = 0.0
    else:
        xc0, x0, x1, x2, x3, x4, x5, x6, x7 = row_setup(X, rows, end, two_k2, D, DP, BLOCK_D, DOT)
        xn = tl.load(XN + rows, mask=row_ok, other=0.0)
        z0 = 0.0
        z1 = 0.0
        z2 = 0.0
        z3 = 0.0
    return xc0, x0, x1, x2, x3, x4, x5, x6, x7, z0, z1, z2, z3, xn


@triton.jit
def _logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, z0, z1, z2, z3, X, Y, YN, stride_y, rows, cols, col_ok,
            ubase, end, hi, k2, two_k2,
            LOCAL: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr,
            D_CHUNKS: tl.constexpr, DOT: tl.constexpr, CPREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Base-2 logits ``ubase_j - k2 |y_j|^2 + 2 k2 x_i . y_j`` of a tile (``ubase``: -inf past the run);
    the row term ``-k2 |x_i|^2`` is the caller's. Points centred on the tile's z (LOCAL) or prepared."""
    if LOCAL:
        y0 = _centred(Y, cols, col_ok, stride_y, z0, 0, D)
        y1 = _centred(Y, cols, col_ok, stride_y, z1, 1, D)
        y2 = _centred(Y, cols, col_ok, stride_y, z2, 2, D)
        y3 = _centred(Y, cols, col_ok, stride_y, z3, 3, D)
        u = ubase - k2 * (y0 * y0 + y1 * y1 + y2 * y2 + y3 * y3)
        t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + u[None, :]
        t = _fma(t, x0, y0, 0, D)
        t = _fma(t, x1, y1, 1, D)
        t = _fma(t, x2, y2, 2, D)
        t = _fma(t, x3, y3, 3, D)
    else:
        u = ubase - k2 * tl.load(YN + cols, mask=col_ok, other=0.0)
        t = tile_logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, X, Y, rows, cols, u, end, hi, two_k2,
                        D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
    return t


@triton.jit
def _local_bias(POT, LOG_W, idx, ok, inv_eps2, HAS_LOG_W: tl.constexpr):
    """log2(e) (log w + pot / eps) of the points ``idx`` (0 where not ok)."""
    bias = inv_eps2 * tl.load(POT + idx, mask=ok, other=0.0).to(tl.float32)
    if HAS_LOG_W:
        bias += TL_LOG2E * tl.load(LOG_W + idx, mask=ok, other=0.0).to(tl.float32)
    return bias


# --------------------------------------------------------------------------
# Triton: kernels
# --------------------------------------------------------------------------


@triton.autotune(
    configs=_CONFIGS,
    # Bucketed sizes, never raw n or m, and no eps: runtime floats (eps-scaling never re-tunes).
    key=["N_BUCKET", "M_BUCKET", "LOCAL", "D", "DP", "DOT", "CPREC"],
    prune_configs_by={"early_config_prune": pruner(_fits)},
    **AUTOTUNE_DISK_CACHE,
)
@triton.jit(do_not_specialize=["num_clusters", "stride_x", "stride_y"])
def _bs_lse_kernel(
    X, Y, XN, YN, H, XS, YS, PTR, IDX, TILE_CL, TILE_PTR, OUT,
    num_clusters, stride_x, stride_y,
    k2,         # cost_scale log2(e) / eps, in the units of the points read
    out_scale,  # ln 2 for the LSE, -eps ln 2 for the soft-min
    N_BUCKET, M_BUCKET,  # autotuning keys only
    # LOCAL: X, Y are the given points (d <= LOCAL_MAX_D), centred per tile in
    # the kernel, costs on FMAs. Else the prepared pair (see softmin._lse_kernel).
    LOCAL: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, DOT: tl.constexpr,
    CPREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    c, live, r0, end, rows, row_ok = _tile_of(TILE_CL, TILE_PTR, XS, num_clusters, BLOCK_M)
    two_k2 = 2.0 * k2
    xc0, x0, x1, x2, x3, x4, x5, x6, x7, z0, z1, z2, z3, xn = _rows(
        X, XN, stride_x, rows, row_ok, r0, live, end, two_k2, LOCAL, D, DP, BLOCK_D, DOT)
    M = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    S = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p = tl.load(PTR + c, mask=live, other=0)
    p1 = tl.load(PTR + c + 1, mask=live, other=0)
    while p < p1:
        lo, hi, p = _run(IDX, YS, p, p1)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            ubase = tl.load(H + cols, mask=col_ok, other=float("-inf")).to(tl.float32) * TL_LOG2E
            t = _logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, z0, z1, z2, z3, X, Y, YN, stride_y, rows, cols,
                        col_ok, ubase, end, hi, k2, two_k2,
                        LOCAL, D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
            M, alpha, e = online_step(M, t)
            S = S * alpha + tl.sum(e, axis=1)
    # A row with no finite term: M = -inf, log2(S) = -inf: -inf (+inf for the soft-min), never NaN.
    out = out_scale * (M + tl.log2(S) - k2 * xn)
    tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=row_ok)


@triton.autotune(
    configs=_CONFIGS,
    key=["N_BUCKET", "M_BUCKET", "K_PAD", "LOCAL", "D", "DP", "DOT", "CPREC", "PREC"],
    prune_configs_by={"early_config_prune": pruner(_fits)},
    **AUTOTUNE_DISK_CACHE,
)
@triton.jit(do_not_specialize=["num_clusters", "stride_x", "stride_y", "k"])
def _bs_apply_kernel(
    X, Y, XN, YN, F, G, LOG_A, LOG_B, V, XS, YS, PTR, IDX, TILE_CL, TILE_PTR, OUT,
    num_clusters, stride_x, stride_y, k, stride_vm, stride_vk, stride_on, stride_ok,
    k2, inv_eps2,   # cost_scale log2(e) / eps (units of the points read) and log2(e) / eps
    N_BUCKET, M_BUCKET, K_PAD,  # autotuning keys only
    HAS_LOG_A: tl.constexpr, HAS_LOG_B: tl.constexpr,
    # 0: V = ones; 1: a vector (elementwise, a dot would pad it to 16); 2: a matrix (tensor-core dot).
    V_MODE: tl.constexpr,
    LOCAL: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, DOT: tl.constexpr,
    CPREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,   # precision of the probability-times-V dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    c, live, r0, end, rows, row_ok = _tile_of(TILE_CL, TILE_PTR, XS, num_clusters, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    two_k2 = 2.0 * k2
    xc0, x0, x1, x2, x3, x4, x5, x6, x7, z0, z1, z2, z3, xn = _rows(
        X, XN, stride_x, rows, row_ok, r0, live, end, two_k2, LOCAL, D, DP, BLOCK_D, DOT)
    M = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    if V_MODE == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p = tl.load(PTR + c, mask=live, other=0)
    p1 = tl.load(PTR + c + 1, mask=live, other=0)
    while p < p1:
        lo, hi, p = _run(IDX, YS, p, p1)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            ubase = tl.where(col_ok, _local_bias(G, LOG_B, cols, col_ok, inv_eps2, HAS_LOG_B), float("-inf"))
            t = _logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, z0, z1, z2, z3, X, Y, YN, stride_y, rows, cols,
                        col_ok, ubase, end, hi, k2, two_k2,
                        LOCAL, D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
            M, alpha, e = online_step(M, t)
            if V_MODE == 0:
                acc = acc * alpha + tl.sum(e, axis=1)
            elif V_MODE == 1:
                v = tl.load(V + cols * stride_vm, mask=col_ok, other=0.0).to(tl.float32)
                acc = acc * alpha + tl.sum(e * v[None, :], axis=1)
            else:
                vt = tl.load(V + cols[:, None] * stride_vm + kk[None, :] * stride_vk,
                             mask=col_ok[:, None] & (kk[None, :] < k), other=0.0)
                acc = mma(e.to(vt.dtype), vt, acc * alpha[:, None], PREC)
    # Row factor in base 2, the log2 of the row's largest kept entry (see plan_apply).
    lsc = _local_bias(F, LOG_A, rows, row_ok, inv_eps2, HAS_LOG_A) - k2 * xn + M
    out = scale_rows(acc, lsc, V_MODE == 2)
    if V_MODE == 2:
        tl.store(OUT + rows[:, None] * stride_on + kk[None, :] * stride_ok, out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (kk[None, :] < k))
    else:
        tl.store(OUT + rows * stride_on, out.to(OUT.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------
# Triton: launchers
# --------------------------------------------------------------------------

_LSE_LAUNCH = TunedLaunch(_bs_lse_kernel)
_APPLY_LAUNCH = TunedLaunch(_bs_apply_kernel)


def tile_map(x_starts, n):
    """``(tile_cl, tile_ptr)`` of the row tiles: ``tile_ptr`` (Kx + 1,) the first tile of each
    cluster, ``tile_cl`` (cdiv(n, BLOCK_M) + Kx,) each program's cluster (Kx past the last tile).
    Torch ops on the device, sized from the shapes: no synchronisation."""
    kx = x_starts.numel() - 1
    tiles = torch.div(x_starts[1:] - x_starts[:-1] + (BLOCK_M - 1), BLOCK_M, rounding_mode="floor")
    tile_ptr = torch.zeros(kx + 1, dtype=torch.int64, device=x_starts.device)
    torch.cumsum(tiles, 0, out=tile_ptr[1:])
    programs = torch.arange(cdiv(n, BLOCK_M) + kx, device=x_starts.device)
    return torch.searchsorted(tile_ptr, programs, right=True) - 1, tile_ptr


def _layout(x, y, precision):
    """The points the kernels read and the layout constants: ``(X, Y, XN, YN, scale, consts)``."""
    d = x.shape[1]
    if d <= LOCAL_MAX_D:
        X, Y = unit_last(x), unit_last(y)
        consts = dict(LOCAL=True, D=d, DP=d, BLOCK_D=16, D_CHUNKS=1, DOT=1, CPREC="ieee")
        return X, Y, X, Y, 1.0, consts
    pair = prepare_pair(x, y, precision)
    consts = dict(LOCAL=False, D=pair.D, DP=pair.DP, BLOCK_D=pair.BLOCK_D, D_CHUNKS=pair.D_CHUNKS,
                  DOT=pair.DOT, CPREC=pair.PREC)
    return pair.x[0], pair.y[0], pair.xn[0], pair.yn[0], pair.scale, consts


def _lse_triton(geo, x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale, precision, out_scale):
    out = torch.full((geo.n,), float("-inf") * (1.0 if out_scale > 0 else -1.0), device=geo.device,
                     dtype=compute_dtype(geo.dtype))
    if geo.n == 0 or geo.m == 0:
        return out
    X, Y, XN, YN, scale, consts = _layout(x, y, precision)
    tile_cl, tile_ptr = tile_map(x_starts, geo.n)
    k2 = cost_scale * LOG2E / eps / (scale * scale)
    n_b, m_b = bucket(geo.n), bucket(geo.m)
    h = unit_last(h)
    key = (n_b, m_b, tuple(consts.values()), x.dtype, h.dtype)
    with device_guard(geo.device):
        _LSE_LAUNCH(
            key, (tile_cl.numel(),),
            X, Y, XN, YN, h, x_starts, y_starts, ptr, idx, tile_cl, tile_ptr, out,
            x_starts.numel() - 1, X.stride(0), Y.stride(0),
            k2, out_scale, n_b, m_b, **consts,
        )
    return out


def _apply_triton(geo, x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b, eps, cost_scale, precision):
    if V is None:
        mode, k, out_shape = 0, 1, (geo.n,)
    elif V.ndim == 1:
        mode, k, out_shape = 1, 1, (geo.n,)
    else:
        k = V.shape[1]
        mode, out_shape = (1 if k == 1 else 2), (geo.n, k)
    out = torch.zeros(out_shape, device=geo.device, dtype=geo.dtype)
    if out.numel() == 0 or geo.m == 0:
        return out
    X, Y, XN, YN, scale, consts = _layout(x, y, precision)
    tile_cl, tile_ptr = tile_map(x_starts, geo.n)
    f, g, log_a, log_b = unit_last(f), unit_last(g), unit_last(log_a), unit_last(log_b)
    block_k = pick_block(k, _MAX_BLOCK_K, chunk_cost=64) if mode == 2 else 16
    if V is None:
        V_arg, v_strides = f, (0, 0)  # never read
    else:
        V_arg = V
        v_strides = (V.stride(0), V.stride(1) if V.ndim == 2 else 0)
    o_strides = (out.stride(0), out.stride(1) if out.ndim == 2 else 0)
    n_b, m_b, k_b = bucket(geo.n), bucket(geo.m), (bucket(k) if mode == 2 else mode)
    key = (n_b, m_b, k_b, tuple(consts.values()), precision, block_k, log_a is not None, log_b is not None,
           x.dtype, f.dtype, None if V is None else V.dtype)
    with device_guard(geo.device):
        _APPLY_LAUNCH(
            key, (tile_cl.numel(), cdiv(k, block_k)),
            X, Y, XN, YN, f, g, log_a if log_a is not None else f, log_b if log_b is not None else g,
            V_arg, x_starts, y_starts, ptr, idx, tile_cl, tile_ptr, out,
            x_starts.numel() - 1, X.stride(0), Y.stride(0), k, *v_strides, *o_strides,
            cost_scale * LOG2E / eps / (scale * scale), LOG2E / eps, n_b, m_b, k_b,
            HAS_LOG_A=log_a is not None, HAS_LOG_B=log_b is not None, V_MODE=mode, BLOCK_K=block_k,
            PREC=precision, **consts,
        )
    return out

# --------------------------------------------------------------------------
# Public launchers
# --------------------------------------------------------------------------


def _backend(fn, backend, precision, x):
    """``(backend, precision)`` of a call on ``x``: "torch" or "triton", and the resolved precision."""
    precision = resolve_precision(fn, precision)
    return resolve_backend(fn, backend, x), precision


def blocksparse_lse(x, y, h, x_starts, y_starts, ptr, idx, *, eps, cost_scale=1.0, backend=None, precision=None):
    r"""Log-sum-exp of ``h_j - C_ij / eps`` over the kept columns of each row.

    Parameters
    ----------
    x : Tensor, shape (n, d)
        Row points, clustered: cluster I holds the rows ``x_starts[I]:x_starts[I + 1]``.
    y : Tensor, shape (m, d)
        Column points, clustered likewise (same dtype and device as ``x``).
    h : Tensor, shape (m,)
        Column log-weights (``g / eps + log b`` in a Sinkhorn update); ``-inf``
        is a zero weight. Dtype of ``x`` (float32 also beside half points).
    x_starts : Tensor, shape (Kx + 1,), int64
        First row of each cluster of x, then n; non-decreasing from 0 (an
        empty cluster repeats a value).
    y_starts : Tensor, shape (Ky + 1,), int64
        The same for y, ending at m.
    ptr : Tensor, shape (Kx + 1,), int64
        CSR row pointers of the pattern: row cluster I keeps the column
        clusters ``idx[ptr[I]:ptr[I + 1]]``.
    idx : Tensor, shape (nnz,), int64
        Kept column cluster ids, strictly ascending inside each row cluster
        (this fixes the order of the sums).
    eps : float
        Entropic regularisation, positive.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    backend : {None, "auto", "triton", "torch"}
        None or "auto": Triton for CUDA float32/float16/bfloat16 points, the
        torch reference otherwise.
    precision : {None, "ieee", "tf32", "tf32x3"}
        Precision of the Triton cost dots above ``LOCAL_MAX_D`` = 4 dimensions
        (None: ``DEFAULT_PRECISION``); for d <= 4 the Triton costs are fp32
        FMAs on locally centred points, exact to fp32 rounding whatever the
        setting (as the dense kernels' FMA path).

    Returns
    -------
    Tensor, shape (n,), dtype of ``x`` (float32 for half ``x``)
        ``-inf`` on a row that keeps no column (or only ``h = -inf`` ones).

    Raises
    ------
    ValueError
        Shapes, devices, scalars, names, non-finite inputs (``h`` may hold
        ``-inf``), or cluster starts / pattern values out of their rules (read
        back once, with the finiteness check).
    TypeError
        Non-tensor inputs, wrong dtypes (the index tensors are int64).

    Notes
    -----
    .. math:: \mathrm{out}_i = \log \sum_{j:\ (\mathrm{cl}(i), \mathrm{cl}(j)) \in \mathcal{P}}
              \exp(h_j - c\|x_i - y_j\|^2 / \varepsilon)

    Time O(sum over kept pairs of |I| |J| d), memory O((n + m) d + nnz). No
    host synchronisation on the Triton path but the argument checks' one
    (none with ``config.check_finite`` off).

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import blocksparse_lse
    >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.1]], dtype=torch.float64)
    >>> starts = torch.tensor([0, 2, 4])               # two clusters of two points
    >>> ptr, idx = torch.tensor([0, 1, 2]), torch.tensor([0, 1])  # each keeps itself only
    >>> out = blocksparse_lse(x, x, torch.zeros(4, dtype=torch.float64), starts, starts, ptr, idx, eps=0.1)
    >>> out.shape
    torch.Size([4])
    """
    fn = "blocksparse_lse"
    geo, eps, cost_scale = _validate_lse(fn, x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)
    backend, precision = _backend(fn, backend, precision, x)
    if backend == "torch":
        return blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)
    return _lse_triton(geo, x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale, precision, LN2)


def blocksparse_softmin(x, y, h, x_starts, y_starts, ptr, idx, *, eps, cost_scale=1.0, backend=None,
                        precision=None):
    r"""Block-sparse soft-minimum ``-eps * blocksparse_lse(...)``: the Sinkhorn update on kept blocks.

    Parameters
    ----------
    x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale, backend, precision
        As in :func:`blocksparse_lse`.

    Returns
    -------
    Tensor, shape (n,), dtype of ``x`` (float32 for half ``x``)
        ``+inf`` on a row that keeps no column (or only ``h = -inf`` ones).

    Raises
    ------
    ValueError, TypeError
        As in :func:`blocksparse_lse`.

    Notes
    -----
    .. math:: \mathrm{out}_i = -\varepsilon \log \sum_{j \text{ kept for } i} \exp(h_j - C_{ij}/\varepsilon)

    The update of f is ``blocksparse_softmin(x, y, log_b + g / eps, x_starts,
    y_starts, ptr, idx)``; that of g swaps the clouds and transposes the
    pattern (:func:`transpose_pattern`).

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import blocksparse_softmin
    >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.1]], dtype=torch.float64)
    >>> starts, ptr, idx = torch.tensor([0, 2, 4]), torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1])
    >>> f = blocksparse_softmin(x, x, torch.zeros(4, dtype=torch.float64), starts, starts, ptr, idx, eps=0.1)
    """
    fn = "blocksparse_softmin"
    geo, eps, cost_scale = _validate_lse(fn, x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)
    backend, precision = _backend(fn, backend, precision, x)
    if backend == "torch":
        return -eps * blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)
    return _lse_triton(geo, x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale, precision, -eps * LN2)


def blocksparse_apply(x, y, f, g, V, x_starts, y_starts, ptr, idx, *, eps, log_a=None, log_b=None,
                      cost_scale=1.0, backend=None, precision=None):
    r"""Product of the block-sparse entropic plan with a vector, a matrix, or ones.

    Parameters
    ----------
    x, y : Tensor, shapes (n, d) and (m, d)
        Clustered points, as in :func:`blocksparse_lse`.
    f : Tensor, shape (n,)
        Row potential (``-inf`` allowed: a row of zeros).
    g : Tensor, shape (m,)
        Column potential (``-inf`` allowed).
    V : Tensor of shape (m,) or (m, k), or None
        The operand; None gives the row sums (the first marginal of the
        block-sparse plan). Positional (it precedes the layout arguments).
    x_starts, y_starts, ptr, idx
        The clusters and the pattern, as in :func:`blocksparse_lse`.
    eps : float
        Entropic regularisation, positive.
    log_a, log_b : Tensor, shapes (n,) and (m,), optional
        Log-weights of the points (None: weights 1).
    cost_scale, backend, precision
        As in :func:`blocksparse_lse`; ``precision`` also applies to the
        tensor-core dot of the probability tiles with a matrix V.

    Returns
    -------
    Tensor, dtype of ``x``
        Shape (n,) for V None or a vector, (n, k) for a matrix. A row that
        keeps nothing gives 0.

    Raises
    ------
    ValueError
        As in :func:`blocksparse_lse`, and when the product overflows its
        dtype (read back with the inputs' values).
    TypeError
        As in :func:`blocksparse_lse`.

    Notes
    -----
    .. math:: (PV)_i = \sum_{j \text{ kept for } i} a_i b_j
              \exp\big((f_i + g_j - c\|x_i - y_j\|^2)/\varepsilon\big) V_j

    ``P.T @ U`` is ``blocksparse_apply(y, x, g, f, U, y_starts, x_starts,
    *transpose_pattern(ptr, idx, Ky), log_a=log_b, log_b=log_a)``. Each row is
    summed relative to its largest kept entry and that factor applied at the
    end in two halves (as :func:`~otlinop.kernels.plan_apply`).

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import blocksparse_apply
    >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.1]], dtype=torch.float64)
    >>> z = torch.zeros(4, dtype=torch.float64)
    >>> starts, ptr, idx = torch.tensor([0, 2, 4]), torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    >>> blocksparse_apply(x, x, z, z, None, starts, starts, ptr, idx, eps=1.0).shape
    torch.Size([4])
    """
    fn = "blocksparse_apply"
    geo, flags, eps, cost_scale = _validate_apply(fn, x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b,
                                                  eps, cost_scale)
    backend, precision = _backend(fn, backend, precision, x)
    if backend == "torch":
        out = blocksparse_apply_core(x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b, eps, cost_scale)
    else:
        out = _apply_triton(geo, x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b, eps, cost_scale,
                            precision)
    _check_apply(fn, x, y, f, g, V, log_a, log_b, flags, out)
    return out


# --------------------------------------------------------------------------
# Entry points for loops that checked their inputs once
# --------------------------------------------------------------------------


def _geometry_unchecked(fn, x, y):
    return Geometry(fn, False, 1, x.shape[0], y.shape[0], x.shape[1], x.dtype, x.device)


def blocksparse_softmin_unchecked(x, y, h, x_starts, y_starts, ptr, idx, *, eps: float, cost_scale: float,
                                  backend, precision):
    """:func:`blocksparse_softmin` without the input checks, for loops that ran them once.

    The inputs must be valid (as :func:`blocksparse_softmin` checks them, the
    layout's values included); ``eps`` and ``cost_scale`` positive floats. No
    host synchronisation on the Triton path (the torch reference plans its
    chunks on the host).
    """
    fn = "blocksparse_softmin"
    backend, precision = _backend(fn, backend, precision, x)
    if backend == "torch":
        return -eps * blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)
    return _lse_triton(_geometry_unchecked(fn, x, y), x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale,
                       precision, -eps * LN2)


def blocksparse_apply_unchecked(x, y, f, g, V, x_starts, y_starts, ptr, idx, *, eps: float, log_a, log_b,
                                cost_scale: float, backend, precision):
    """:func:`blocksparse_apply` without the input checks nor the overflow check of its result,
    for loops and operators that ran them once; no host synchronisation on the Triton path."""
    fn = "blocksparse_apply"
    backend, precision = _backend(fn, backend, precision, x)
    if backend == "torch":
        return blocksparse_apply_core(x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b, eps, cost_scale)
    return _apply_triton(_geometry_unchecked(fn, x, y), x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b,
                         eps, cost_scale, precision)
