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

Cost: time O(sum over kept pairs of |I| |J| d), memory O((n + m) d + nnz);
the torch references process the rows in chunks whose temporaries stay under
``config.torch_block_bytes``. Each row's sum runs over its kept column
clusters in ``idx`` order: the results do not depend on the chunking nor on
anything but the inputs (no atomics).
"""

from __future__ import annotations

import torch

from solvers import config

from .._checks import (block_pattern, cluster_layout, finite, nonnegative_int, operand, points, positive_scalar,
                       vector)
from ._dispatch import check_backend, resolve_precision
from ._reference import compute_dtype

__all__ = [
    "blocksparse_apply",
    "blocksparse_apply_torch",
    "blocksparse_lse",
    "blocksparse_lse_torch",
    "blocksparse_softmin",
    "blocksparse_softmin_torch",
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
    flags = cluster_layout(geo, x_starts, y_starts, ptr, idx)
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
    finite(fn, {}, flags=block_pattern(fn, ptr, idx, ptr.numel() - 1, ky, ptr.device))
    return transpose_pattern_torch(ptr, idx, ky)


def transpose_pattern_torch(ptr, idx, ky):
    """:func:`transpose_pattern` without the checks: (ptr_t (Ky + 1,), idx_t (nnz,))."""
    kx = ptr.numel() - 1
    nnz = idx.numel()
    rows = torch.repeat_interleave(torch.arange(kx, device=ptr.device), ptr[1:] - ptr[:-1], output_size=nnz)
    order = torch.argsort(idx * max(kx, 1) + rows)
    counts = torch.bincount(idx, minlength=ky)
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


def blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale):
    """:func:`blocksparse_lse_torch` without the checks: (n,) in ``compute_dtype(x.dtype)``."""
    dtype = compute_dtype(x.dtype)
    n, d = x.shape
    out = torch.full((n,), float("-inf"), device=x.device, dtype=dtype)
    h = h.to(dtype)
    for lo, hi, cols, valid in _row_chunks(x_starts, y_starts, ptr, idx, n, d + 3):
        logits = _costs(x, y, slice(lo, hi), cols, cost_scale, dtype).div_(-eps).add_(h[cols])
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
    for lo, hi, cols, valid in _row_chunks(x_starts, y_starts, ptr, idx, n, d + k + 3):
        logits = _costs(x, y, slice(lo, hi), cols, cost_scale, dtype).div_(-eps).add_(col[cols])
        logits.masked_fill_(~valid, float("-inf"))
        # The row's largest logit comes out of the exponential and back as exp(row + M), in
        # two halves as the dense kernels do: no intermediate overflow or underflow.
        M = logits.amax(dim=-1, keepdim=True)
        has = torch.isfinite(M)
        M = torch.where(has, M, torch.zeros_like(M))
        p = logits.sub_(M).exp_()
        S = p.sum(-1, keepdim=True) if V is None else torch.einsum("rl,rlk->rk", p, V2[cols])
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
# Public launchers
# --------------------------------------------------------------------------


def _backend(fn, backend, precision, x):
    """"torch" or "triton" for a call on ``x``, once ``backend`` and ``precision`` are valid."""
    resolve_precision(fn, precision)
    check_backend(fn, backend, x)
    return "torch"


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
        Precision of the Triton cost evaluation (None: ``DEFAULT_PRECISION``).

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

    Time O(sum over kept pairs of |I| |J| d), memory O((n + m) d + nnz).

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
    _backend(fn, backend, precision, x)
    return blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)


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
    _backend(fn, backend, precision, x)
    return -eps * blocksparse_lse_core(x, y, h, x_starts, y_starts, ptr, idx, eps, cost_scale)


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
        As in :func:`blocksparse_lse`.

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
    *transpose_pattern(ptr, idx, Ky), log_a=log_b, log_b=log_a)``.

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
    _backend(fn, backend, precision, x)
    out = blocksparse_apply_core(x, y, f, g, V, x_starts, y_starts, ptr, idx, log_a, log_b, eps, cost_scale)
    _check_apply(fn, x, y, f, g, V, log_a, log_b, flags, out)
    return out
