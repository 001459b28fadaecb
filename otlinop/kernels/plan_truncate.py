"""The significant entries of the entropic plan, in a padded sparse layout.

``plan_truncate`` streams the cost tiles once (the same tiles as
``plan_apply``) and keeps, for each row ``i``, the entries with

    log P_ij >= row_threshold_i + col_threshold_j,
    P_ij = exp(log_a_i + log_b_j + (f_i + g_j - C_ij) / eps),

in ascending column order, as a padded ("ELL") layout stored slot-major:
``values[s, i]`` and ``columns[s, i]`` for the slots ``s < counts[i]`` (the
padding holds 0 and column 0). A program owns a tile of rows and walks the
column tiles in order; a kept entry's slot is its row's running count plus a
prefix sum over the tile, so the layout is the same from run to run (no
atomics). ``counts[i]`` is the number of entries that met the threshold,
including those that did not fit in ``capacity`` slots: ``counts.max() >
capacity`` means "call again with more slots". The products with such a
layout are in ``ell.py``.

Cost: one streaming pass, O(n m d) time and n m exponentials. Memory:
O(capacity n) for the layout, never an n x m buffer. Unbatched inputs only.
"""

from __future__ import annotations

import torch

from .._checks import finite, nonnegative_int, points, positive_scalar, vector
from ._dispatch import resolve_backend, resolve_precision
from ._grid import device_guard, unit_last
from ._layout import prepare_pair
from ._reference import centred_points, compute_dtype, cost_block, row_blocks
from ._tiles import LOG2E, TL_LOG2E, plan_bias, row_setup, tile_logits
from ._triton import cdiv, tl, triton
from ._tuning import AUTOTUNE_DISK_CACHE, TunedLaunch, bucket, configs_or_interpreter, pruner, tile_config

__all__ = ["plan_truncate", "plan_truncate_torch"]

_FN = "plan_truncate"

_CONFIGS = configs_or_interpreter([
    tile_config(64, 64, 4, 2),
    tile_config(32, 64, 4, 2),
    tile_config(16, 64, 4, 2),
])


def _fits(cfg, args):
    return not (args["D_CHUNKS"] > 1 and cfg.num_stages > 2)


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.autotune(
    configs=_CONFIGS,
    key=["N_BUCKET", "M_BUCKET", "DP", "DOT", "CPREC"],
    prune_configs_by={"early_config_prune": pruner(_fits)},
    **AUTOTUNE_DISK_CACHE,
)
@triton.jit(do_not_specialize=["n", "m", "cap"])
def _truncate_kernel(
    X, Y, XN, YN, F, G, LOG_A, LOG_B, RT, CT, VALS, COLS, COUNT,
    n, m, cap,
    k2, inv_eps2,
    N_BUCKET, M_BUCKET,
    HAS_LOG_A: tl.constexpr, HAS_LOG_B: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    DOT: tl.constexpr, CPREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    two_k2 = 2.0 * k2
    xc0, x0, x1, x2, x3, x4, x5, x6, x7 = row_setup(X, rows, n, two_k2, D, DP, BLOCK_D, DOT)
    # log2 P_ij = r_i + t_ij with t_ij = u_j + 2 k2 x_i.y_j (the logits of the tile).
    r = plan_bias(F, LOG_A, XN, rows, row_ok, inv_eps2, k2, HAS_LOG_A)
    # Kept iff t_ij - log2(e) ct_j >= log2(e) rt_i - r_i. A zero weight (r = -inf)
    # or a padded row gives +inf: nothing kept.
    thr = TL_LOG2E * tl.load(RT + rows, mask=row_ok, other=float("inf")) - r
    thr = tl.where(row_ok, thr, float("inf"))
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    base = rows.to(tl.int64)
    for start in range(0, m, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < m
        u = tl.where(col_ok, plan_bias(G, LOG_B, YN, cols, col_ok, inv_eps2, k2, HAS_LOG_B), float("-inf"))
        t = tile_logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, X, Y, rows, cols, u, n, m, two_k2,
                    D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
        ct = TL_LOG2E * tl.load(CT + cols, mask=col_ok, other=float("inf"))
        keep = (t - ct[None, :]) >= thr[:, None]
        kept = keep.to(tl.int32)
        slot = count[:, None] + tl.cumsum(kept, axis=1) - 1
        ok = keep & (slot < cap)
        where = slot.to(tl.int64) * n + base[:, None]
        val = tl.exp2(r[:, None] + t)
        tl.store(VALS + where, val.to(VALS.dtype.element_ty), mask=ok)
        tl.store(COLS + where, cols[None, :] + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), mask=ok)
        count += tl.sum(kept, axis=1)
    tl.store(COUNT + rows, count, mask=row_ok)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _validate(fn, x, y, f, g, log_a, log_b, row_threshold, col_threshold, capacity, eps, cost_scale):
    geo = points(fn, x, y, batch="none", hint="batched inputs are not supported; call once per problem")
    for name, t, length in (("f", f, geo.n), ("g", g, geo.m), ("row_threshold", row_threshold, geo.n),
                            ("col_threshold", col_threshold, geo.m)):
        vector(geo, name, t, length, wide=True)
    vector(geo, "log_a", log_a, geo.n, optional=True, wide=True)
    vector(geo, "log_b", log_b, geo.m, optional=True, wide=True)
    capacity = nonnegative_int(fn, "capacity", capacity, "the slots per row of the output")
    eps = positive_scalar(fn, "eps", eps)
    cost_scale = positive_scalar(fn, "cost_scale", cost_scale)
    # Thresholds may be +inf (keep nothing in that row or column), never NaN or -inf.
    finite(fn, {"row_threshold": row_threshold, "col_threshold": col_threshold, "x": x, "y": y, "f": f, "g": g,
                "log_a": log_a, "log_b": log_b},
           allow_pos_inf=("row_threshold", "col_threshold"), allow_neg_inf=("f", "g", "log_a", "log_b"))
    return geo, eps, cost_scale, capacity


# --------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------

_TRUNCATE_LAUNCH = TunedLaunch(_truncate_kernel)


def _truncate_triton(geo, x, y, f, g, log_a, log_b, rt, ct, capacity, eps, cost_scale, precision):
    n, m = geo.n, geo.m
    vals = torch.zeros((capacity, n), device=geo.device, dtype=geo.dtype)
    cols = torch.zeros((capacity, n), device=geo.device, dtype=torch.int32)
    count = torch.zeros(n, device=geo.device, dtype=torch.int32)
    if n == 0 or m == 0:
        return vals, cols, count
    pair = prepare_pair(x, y, precision)
    f, g = unit_last(f), unit_last(g)
    log_a, log_b = unit_last(log_a), unit_last(log_b)
    rt = unit_last(rt.to(torch.float32))
    ct = unit_last(ct.to(torch.float32))
    n_b, m_b = bucket(n), bucket(m)
    key = (n_b, m_b, pair.DP, pair.DOT, pair.PREC, precision, log_a is not None, log_b is not None,
           x.dtype, f.dtype)
    grid = lambda meta: (cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
    with device_guard(geo.device):
        _TRUNCATE_LAUNCH(
            key, grid,
            pair.x, pair.y, pair.xn, pair.yn, f, g,
            log_a if log_a is not None else f, log_b if log_b is not None else g,
            rt, ct, vals, cols, count,
            n, m, capacity,
            pair.k2(cost_scale, eps), LOG2E / eps,
            n_b, m_b,
            HAS_LOG_A=log_a is not None, HAS_LOG_B=log_b is not None,
            D=pair.D, DP=pair.DP, BLOCK_D=pair.BLOCK_D, D_CHUNKS=pair.D_CHUNKS,
            DOT=pair.DOT, CPREC=pair.PREC,
        )
    return vals, cols, count


def plan_truncate(x, y, f, g, *, eps, row_threshold, col_threshold, capacity, log_a=None, log_b=None,
                  cost_scale=1.0, backend=None, precision=None):
    r"""The entries of the plan above a separable threshold, in a padded layout.

    Parameters
    ----------
    x : Tensor, shape (n, d)
    y : Tensor, shape (m, d)
    f : Tensor, shape (n,)
    g : Tensor, shape (m,)
        Points and potentials, as in :func:`plan_apply` (unbatched).
    eps : float
    row_threshold : Tensor, shape (n,)
    col_threshold : Tensor, shape (m,)
        Entry (i, j) is kept iff ``log P_ij >= row_threshold_i +
        col_threshold_j``. Finite, or ``+inf`` to keep nothing in a row or
        column (never NaN or -inf).
    capacity : int
        Slots per row of the output.
    log_a, log_b : Tensor, optional
        Log-weights, as in :func:`plan_apply` (``-inf`` for a zero weight,
        whose entries are never kept).
    cost_scale, backend, precision
        As in :func:`plan_apply`; ``precision`` is that of the cost dots.

    Returns
    -------
    values : Tensor, shape (capacity, n), dtype of x
        ``values[s, i] = P_ij`` for the s-th kept column j of row i (in
        ascending order of j), 0 in the padding.
    columns : Tensor, shape (capacity, n), int32
        The column j of each slot, 0 in the padding.
    counts : Tensor, shape (n,), int32
        Entries of each row that met the threshold. Where ``counts[i] >
        capacity`` only the first ``capacity`` were stored.

    Raises
    ------
    ValueError, TypeError
        As :func:`plan_apply`, and for batched inputs, NaN or -inf
        thresholds, or a negative capacity.

    Notes
    -----
    One streaming pass: O(n m d) time, O(capacity n) memory. The layout is
    deterministic (slots follow the column order, without atomics). An entry
    within rounding of its threshold may be kept by one backend and not by
    the other.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import plan_truncate
    >>> x = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
    >>> z = torch.zeros(2, dtype=torch.float64)
    >>> vals, cols, counts = plan_truncate(x, x, z, z, eps=1.0, row_threshold=torch.full((2,), -1.0,
    ...     dtype=torch.float64), col_threshold=z, capacity=2)
    >>> counts.tolist(), cols[0].tolist()     # only the diagonal has log P >= -1
    ([1, 1], [0, 1])
    """
    geo, eps, cost_scale, capacity = _validate(_FN, x, y, f, g, log_a, log_b, row_threshold, col_threshold,
                                               capacity, eps, cost_scale)
    precision = resolve_precision(_FN, precision)
    if resolve_backend(_FN, backend, x) == "torch":
        return _truncate_torch(x, y, f, g, log_a, log_b, row_threshold, col_threshold, capacity, eps, cost_scale)
    return _truncate_triton(geo, x, y, f, g, log_a, log_b, row_threshold, col_threshold, capacity, eps,
                            cost_scale, precision)


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------


def _truncate_torch(x, y, f, g, log_a, log_b, rt, ct, capacity, eps, cost_scale):
    dtype = compute_dtype(x.dtype)
    n, m = x.shape[0], y.shape[0]
    vals = torch.zeros((capacity, n), device=x.device, dtype=x.dtype)
    cols = torch.zeros((capacity, n), device=x.device, dtype=torch.int32)
    count = torch.zeros(n, device=x.device, dtype=torch.int32)
    if n == 0 or m == 0:
        return vals, cols, count
    xc, yc, xn, yn = centred_points(x, y, dtype)
    row = f.to(dtype) / eps + (0.0 if log_a is None else log_a.to(dtype))
    col = g.to(dtype) / eps + (0.0 if log_b is None else log_b.to(dtype))
    rt, ct = rt.to(dtype), ct.to(dtype)
    for rows in row_blocks(n, m, 1, torch.finfo(dtype).bits // 8, temporaries=4):
        logp = cost_block(xc, yc, xn, yn, rows, cost_scale)[0].div_(-eps)
        logp += row[rows, None]
        logp += col[None, :]
        keep = logp >= rt[rows, None] + ct[None, :]
        slot = keep.to(torch.int64).cumsum(1) - 1
        count[rows] = keep.sum(1).to(torch.int32)
        r, c = (keep & (slot < capacity)).nonzero(as_tuple=True)
        s = slot[r, c]
        vals[s, r + rows.start] = torch.exp(logp[r, c]).to(x.dtype)
        cols[s, r + rows.start] = c.to(torch.int32)
    return vals, cols, count


def plan_truncate_torch(x, y, f, g, *, eps, row_threshold, col_threshold, capacity, log_a=None, log_b=None,
                        cost_scale=1.0):
    """Torch reference of :func:`plan_truncate` (same arguments but backend and
    precision; any device, float64 included, in row blocks of bounded memory)."""
    _, eps, cost_scale, capacity = _validate("plan_truncate_torch", x, y, f, g, log_a, log_b, row_threshold,
                                             col_threshold, capacity, eps, cost_scale)
    return _truncate_torch(x, y, f, g, log_a, log_b, row_threshold, col_threshold, capacity, eps, cost_scale)
