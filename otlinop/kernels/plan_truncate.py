"""The significant entries of the entropic plan, and products with them.

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
capacity`` means "call again with more slots".

``ell_matmat`` applies such a layout to a vector or a matrix, one program
per tile of rows, summing the slots in order (deterministic).

Cost: ``plan_truncate`` is one streaming pass (O(n m d) time, n m
exponentials); ``ell_matmat`` is O(nnz k) time. Memory: O(capacity n) for
the layout, never an n x m buffer. Unbatched inputs only.
"""

from __future__ import annotations

import torch

from solvers import config

from .._checks import finite, nonnegative_int, points, positive_scalar, vector
from ._dispatch import interpreting, resolve_backend, resolve_precision
from ._grid import device_guard, unit_last
from ._layout import prepare_pair
from ._reference import centred_points, compute_dtype, cost_block, row_blocks
from ._tiles import LOG2E, TL_LOG2E, plan_bias, row_setup, tile_logits
from ._triton import cdiv, tl, triton
from ._tuning import AUTOTUNE_DISK_CACHE, TunedLaunch, bucket, configs_or_interpreter, pruner, tile_config

__all__ = ["plan_truncate", "plan_truncate_torch", "ell_matmat", "ell_matmat_torch", "ell_bilinear",
           "live_slots"]

_FN = "plan_truncate"

_CONFIGS = configs_or_interpreter([
    tile_config(64, 64, 4, 2),
    tile_config(32, 64, 4, 2),
    tile_config(16, 64, 4, 2),
])

#: Widest chunk of columns of V per program of ``ell_matmat``.
_ELL_MAX_BLOCK_K = 64


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


@triton.jit(do_not_specialize=["n", "k"])
def _ell_kernel(VALS, COLS, COUNT, V, OUT, ROW_SCALE, ADD, ADD_SCALE, n, k, sign,
                stride_vm, stride_vk, stride_on, stride_ok, stride_an, stride_ak,
                HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # A (slots, rows, columns of V) tile per step: BLOCK_S slots of BLOCK_M rows are
    # gathered at once, so that many independent loads are in flight (a loop over
    # single slots is bound by the latency of its dependent gathers).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n
    k_ok = kk < k
    cnt = tl.load(COUNT + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for s0 in range(0, tl.max(cnt, axis=0), BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        live = slots[:, None] < cnt[None, :]                                  # (S, M)
        where = slots[:, None].to(tl.int64) * n + rows[None, :]
        w = tl.load(VALS + where, mask=live, other=0.0).to(tl.float32)
        j = tl.load(COLS + where, mask=live, other=0).to(tl.int64)
        vt = tl.load(V + j[:, :, None] * stride_vm + kk[None, None, :] * stride_vk,
                     mask=live[:, :, None] & k_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, :, None] * vt, axis=0)
    # Epilogue: sign * row_scale_i * acc + add_scale_i * add (the fused Schur product).
    if HAS_SCALE:
        acc *= tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    acc *= sign
    mask = row_ok[:, None] & k_ok[None, :]
    if HAS_ADD:
        add = tl.load(ADD + rows[:, None] * stride_an + kk[None, :] * stride_ak, mask=mask, other=0.0)
        acc += tl.load(ADD_SCALE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None] * add.to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_on + kk[None, :] * stride_ok, acc.to(OUT.dtype.element_ty), mask=mask)


def _ell_blocks(k: int):
    """(BLOCK_S, BLOCK_M, BLOCK_K) of ``_ell_kernel``, from an H100 sweep at 10k
    rows, 43 entries per row: a vector takes 32 slots of 16 rows per step (8.7
    us against 22 us for one slot of 128 rows); a matrix takes whole rows of V
    (up to 64 columns) of 16 rows, 128 / BLOCK_K slots per step."""
    if k == 1:
        return 32, 16, 1
    block_k = min(_ELL_MAX_BLOCK_K, triton.next_power_of_2(k))
    return max(1, 128 // block_k), 16, block_k


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
# Truncation
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


def plan_truncate_torch(x, y, f, g, *, eps, row_threshold, col_threshold, capacity, log_a=None, log_b=None,
                        cost_scale=1.0):
    """Torch reference of :func:`plan_truncate` (same arguments but backend and
    precision; any device, float64 included, in row blocks of bounded memory)."""
    _, eps, cost_scale, capacity = _validate("plan_truncate_torch", x, y, f, g, log_a, log_b, row_threshold,
                                             col_threshold, capacity, eps, cost_scale)
    return _truncate_torch(x, y, f, g, log_a, log_b, row_threshold, col_threshold, capacity, eps, cost_scale)


# --------------------------------------------------------------------------
# Products with the padded layout
# --------------------------------------------------------------------------


def live_slots(counts, capacity: int) -> torch.Tensor:
    """The (capacity, n) mask of a layout's live slots: ``s < counts[i]``."""
    return torch.arange(capacity, device=counts.device)[:, None] < counts[None, :].to(torch.int64)


def _check_layout(fn, values, columns, counts, V, m):
    for name, t in (("values", values), ("columns", columns), ("counts", counts), ("V", V)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if values.ndim != 2 or columns.shape != values.shape or counts.shape != (values.shape[1],):
        raise ValueError(f"{fn}: values and columns must be (capacity, n) and counts (n,), got "
                         f"{tuple(values.shape)}, {tuple(columns.shape)} and {tuple(counts.shape)}")
    if columns.dtype != torch.int32 or counts.dtype != torch.int32:
        raise TypeError(f"{fn}: columns and counts must be int32, got {columns.dtype} and {counts.dtype}")
    if V.ndim not in (1, 2) or V.shape[0] != m:
        raise ValueError(f"{fn}: V has shape {tuple(V.shape)}, expected ({m},) or ({m}, k)")
    if V.dtype != values.dtype:
        raise TypeError(f"{fn}: V has dtype {V.dtype}, expected {values.dtype} like values")
    devices = {t.device for t in (values, columns, counts, V)}
    if len(devices) != 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def _epilogue(out, row_scale, sign, add, add_scale):
    """``sign * row_scale * out + add_scale * add`` (each part optional), rows first."""
    if row_scale is not None:
        out = out * row_scale.to(out.dtype)[:, None]
    if sign != 1.0:
        out = out * sign
    if add is not None:
        add2 = add[:, None] if add.ndim == 1 else add
        out = out + add_scale.to(out.dtype)[:, None] * add2.to(out.dtype)
    return out


def _ell_torch(values, columns, counts, V, row_scale=None, sign=1.0, add=None, add_scale=None):
    vector = V.ndim == 1
    V2 = V[:, None] if vector else V
    cap, n = values.shape
    dtype = compute_dtype(values.dtype)
    out = torch.zeros((n, V2.shape[1]), device=V.device, dtype=dtype)
    if cap and n and V2.shape[1]:
        # Padding slots hold value 0 and column 0; they are masked so that a
        # non-finite V_0 cannot leak into other rows.
        live = live_slots(counts, cap)
        per = max(1, config.torch_block_bytes // max(1, n * V2.shape[1] * out.element_size() * 2))
        for s0 in range(0, cap, per):
            s1 = min(cap, s0 + per)
            gathered = V2.to(dtype)[columns[s0:s1].to(torch.int64)]               # (s, n, k)
            w = torch.where(live[s0:s1], values[s0:s1].to(dtype), 0.0)
            gathered = torch.where(live[s0:s1, :, None], gathered, 0.0)
            out += (w[..., None] * gathered).sum(0)
    out = _epilogue(out, row_scale, sign, add, add_scale).to(values.dtype)
    return out[:, 0] if vector else out


def _ell_triton(values, columns, counts, V, row_scale=None, sign=1.0, add=None, add_scale=None):
    vector = V.ndim == 1
    V2 = V[:, None] if vector else V
    cap, n = values.shape
    k = V2.shape[1]
    out = torch.empty((n, k), device=V.device, dtype=values.dtype)
    if n == 0 or k == 0:
        out.zero_()
        out = _epilogue(out, row_scale, sign, add, add_scale).to(values.dtype)
        return out[:, 0] if vector else out
    if k > 1 and (V2.stride(1) != 1 or V2.stride(0) % 16):
        # Rows of V gathered from a row stride that is a multiple of 16 entries load
        # as wide vectors; with k = 65 columns they did not, and the product took 10x
        # longer (H100). One padded copy of V costs far less.
        padded = torch.zeros((V2.shape[0], cdiv(k, 16) * 16), device=V.device, dtype=V.dtype)
        padded[:, :k] = V2
        V2 = padded
    add2 = None if add is None else (add[:, None] if add.ndim == 1 else add)
    block_s, block_m, block_k = _ell_blocks(k)
    if interpreting():
        block_s = min(block_s, 4)    # the interpreter: small steps
    grid = (cdiv(n, block_m), cdiv(k, block_k))
    with device_guard(V.device):
        _ell_kernel[grid](values, columns, counts, V2, out,
                          values if row_scale is None else row_scale, V2 if add2 is None else add2,
                          values if add_scale is None else add_scale, n, k, float(sign),
                          V2.stride(0), V2.stride(1), out.stride(0), out.stride(1),
                          0 if add2 is None else add2.stride(0), 0 if add2 is None else add2.stride(1),
                          HAS_SCALE=row_scale is not None, HAS_ADD=add2 is not None,
                          BLOCK_S=block_s, BLOCK_M=block_m, BLOCK_K=block_k)
    return out[:, 0] if vector else out


def ell_matmat(values, columns, counts, V, *, m, row_scale=None, sign=1.0, add=None, add_scale=None,
               backend=None):
    """``out_i = sum_{s < counts_i} values[s, i] V[columns[s, i]]``: the product of
    a padded layout (from :func:`plan_truncate`) with V, with an optional
    epilogue ``sign * row_scale_i * out_i + add_scale_i * add_i``.

    Parameters
    ----------
    values : Tensor, shape (capacity, n)
    columns, counts : int32 Tensors, shapes (capacity, n) and (n,)
        Every ``counts[i]`` must be at most ``capacity`` (the product reads
        only the live slots).
    V : Tensor, shape (m,) or (m, k), dtype of values
    m : int
        The number of columns of the layout (rows of V).
    row_scale : Tensor, shape (n,), optional
    sign : float, default 1.0
    add : Tensor, shape like the output, optional
    add_scale : Tensor, shape (n,); required with ``add``
        The epilogue, applied in the same kernel: two products and a
        diagonal make the Schur complement ``Diag(D) - P.T Diag(w) P`` in two
        launches (``TruncatedPlanOperator``).
    backend : {None, "auto", "triton", "torch"}
        None or "auto": Triton for CUDA float32/float16/bfloat16, torch otherwise.

    Returns
    -------
    Tensor, shape (n,) or (n, k)

    Notes
    -----
    O(nnz k) time, no temporary of size n x m. Slots are summed in order:
    the result is deterministic. Accumulates in fp32 (float64 for float64).

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import ell_matmat
    >>> vals = torch.tensor([[2.0, 3.0]]); cols = torch.tensor([[1, 0]], dtype=torch.int32)
    >>> ell_matmat(vals, cols, torch.ones(2, dtype=torch.int32), torch.tensor([10.0, 20.0]), m=2).tolist()
    [40.0, 30.0]
    """
    _check_layout("ell_matmat", values, columns, counts, V, m)
    n = values.shape[1]
    out_shape = (n,) if V.ndim == 1 else (n, V.shape[1])
    for name, t, shape in (("row_scale", row_scale, (n,)), ("add_scale", add_scale, (n,)), ("add", add, out_shape)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.device != V.device):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"ell_matmat: {name} must be a tensor of shape {shape} on {V.device}, got {got}")
    if (add is None) != (add_scale is None):
        raise ValueError("ell_matmat: add and add_scale go together (add_scale_i * add_i)")
    if resolve_backend("ell_matmat", backend, values) == "torch":
        return _ell_torch(values, columns, counts, V, row_scale, sign, add, add_scale)
    return _ell_triton(values, columns, counts, V, row_scale, sign, add, add_scale)


def ell_matmat_torch(values, columns, counts, V, *, m):
    """Torch reference of :func:`ell_matmat` (any device and dtype)."""
    _check_layout("ell_matmat_torch", values, columns, counts, V, m)
    return _ell_torch(values, columns, counts, V)


@triton.jit(do_not_specialize=["n", "k", "e"])
def _ell_bilinear_kernel(VALS, COLS, COUNT, W, V, Y, OUT, n, k, e,
                         stride_wn, stride_wk, stride_vm, stride_vk, stride_ym, stride_ye, stride_on, stride_oe,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    ee = tl.arange(0, BLOCK_E)
    row_ok = rows < n
    k_ok = kk < k
    e_ok = ee < e
    cnt = tl.load(COUNT + rows, mask=row_ok, other=0)
    w_i = tl.load(W + rows[:, None] * stride_wn + kk[None, :] * stride_wk, mask=row_ok[:, None] & k_ok[None, :],
                  other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for s in range(0, tl.max(cnt, axis=0)):
        live = s < cnt
        where = s * n + rows.to(tl.int64)
        p = tl.load(VALS + where, mask=live, other=0.0).to(tl.float32)
        j = tl.load(COLS + where, mask=live, other=0).to(tl.int64)
        v_j = tl.load(V + j[:, None] * stride_vm + kk[None, :] * stride_vk, mask=live[:, None] & k_ok[None, :],
                      other=0.0).to(tl.float32)
        y_j = tl.load(Y + j[:, None] * stride_ym + ee[None, :] * stride_ye, mask=live[:, None] & e_ok[None, :],
                      other=0.0).to(tl.float32)
        acc += (p * tl.sum(w_i * v_j, axis=1))[:, None] * y_j
    tl.store(OUT + rows[:, None] * stride_on + ee[None, :] * stride_oe, acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & e_ok[None, :])


#: Widest W / V (k) and Y (e) that the Triton ``ell_bilinear`` keeps in registers;
#: wider operands take the torch path.
_ELL_BILINEAR_MAX = 256
_ELL_BILINEAR_BLOCK_M = 32


def _ell_bilinear_torch(values, columns, counts, W, V, Y):
    cap, n = values.shape
    dtype = compute_dtype(values.dtype)
    out = torch.zeros((n, Y.shape[1]), device=Y.device, dtype=dtype)
    if cap and n and Y.shape[1]:
        W, V, Y = W.to(dtype), V.to(dtype), Y.to(dtype)
        live = live_slots(counts, cap)
        per_slot = n * (V.shape[1] + Y.shape[1] + 1) * out.element_size()
        per = max(1, config.torch_block_bytes // max(1, per_slot))
        for s0 in range(0, cap, per):
            s1 = min(cap, s0 + per)
            j = columns[s0:s1].to(torch.int64)
            w = (V[j] * W[None]).sum(-1) * values[s0:s1].to(dtype)          # (s, n)
            w = torch.where(live[s0:s1], w, 0.0)
            out += (w[..., None] * torch.where(live[s0:s1, :, None], Y[j], 0.0)).sum(0)
    return out.to(values.dtype)


def ell_bilinear(values, columns, counts, W, V, Y, *, m, backend=None):
    """``out_i = sum_{s < counts_i} values[s, i] <W_i, V_j> Y_j`` with ``j = columns[s, i]``:
    the ``bilinear`` product of a padded layout (see :func:`ell_matmat`).

    Parameters
    ----------
    values, columns, counts
        A layout from :func:`plan_truncate` (every count at most the capacity).
    W : Tensor, shape (n, k)
    V : Tensor, shape (m, k)
    Y : Tensor, shape (m, e)
    m : int
    backend : {None, "auto", "triton", "torch"}

    Returns
    -------
    Tensor, shape (n, e)

    Notes
    -----
    O(nnz (k + e)) time; slots summed in order (deterministic). Operands
    wider than 256 columns take the torch path.
    """
    _check_layout("ell_bilinear", values, columns, counts, V, m)
    n = values.shape[1]
    for name, t, rows in (("W", W, n), ("Y", Y, m)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != rows or t.dtype != values.dtype:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"ell_bilinear: {name} must be a ({rows}, ...) tensor of dtype {values.dtype}, got {got}")
    if V.ndim != 2 or W.shape[1] != V.shape[1]:
        raise ValueError(f"ell_bilinear: W {tuple(W.shape)} and V {tuple(V.shape)} need the same number of columns")
    backend = resolve_backend("ell_bilinear", backend, values)
    k, e = V.shape[1], Y.shape[1]
    if backend == "torch" or max(k, e) > _ELL_BILINEAR_MAX:
        return _ell_bilinear_torch(values, columns, counts, W, V, Y)
    out = torch.empty((n, e), device=Y.device, dtype=values.dtype)
    if n == 0 or e == 0:
        return out.zero_()
    bk = max(1, triton.next_power_of_2(max(k, 1)))
    be = max(1, triton.next_power_of_2(e))
    with device_guard(Y.device):
        _ell_bilinear_kernel[(cdiv(n, _ELL_BILINEAR_BLOCK_M),)](
            values, columns, counts, W, V, Y, out, n, k, e,
            W.stride(0), W.stride(1), V.stride(0), V.stride(1), Y.stride(0), Y.stride(1),
            out.stride(0), out.stride(1), BLOCK_M=_ELL_BILINEAR_BLOCK_M, BLOCK_K=bk, BLOCK_E=be)
    return out
