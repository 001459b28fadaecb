"""Streaming product of the entropic transport plan with a vector or a matrix.

Computes ``(P V)_i = sum_j P_ij V_j`` for

    P_ij = exp(log_a_i + log_b_j + (f_i + g_j - C_ij) / eps),  C_ij = c |x_i - y_j|^2,

without storing P (docs/math.md section 2): each program owns a tile of rows of x
and streams the columns of y. With ``l_ij = log_b_j + (g_j - C_ij) / eps`` it
keeps a running maximum ``M_i`` (rescaling the partial sums when it grows) and
``S_i = sum_j exp(l_ij - M_i) V_j``, where the probability tile times the V
tile is a tensor-core dot; at the end ``(P V)_i = exp(L_i) S_i`` with
``L_i = log_a_i + f_i/eps + M_i``, the log of the row's largest entry of P.
That factor is applied in two equal halves (``_tiles.scale_rows``): a product
inside the output's range never overflows or underflows on the way, and one
outside it is refused by the launcher (inf there, read back with the inputs).
:func:`plan_apply_scaled` (the ``LOG_SCALE`` variant of the same kernel)
returns ``(S, L)`` instead, for products beyond the range and for
row-normalised sums, in which ``f`` cancels. Everything runs in base 2
(``exp2``), with the constants folded into per-row and per-column biases.

``P.T @ U`` is the same call with the roles swapped:
``plan_apply(y, x, g, f, U, log_a=log_b, log_b=log_a)``.

Cost: time O(n m (d + k)) (n m exponentials per chunk of at most 64 columns
of V, 2 n m (d + k) dot FLOPs); memory O((n + m)(d + k)), never an n x m
buffer.
"""

from __future__ import annotations

import torch

from .._checks import finite, operand, points, positive_scalar, vector
from ._dispatch import resolve_backend, resolve_precision
from ._grid import MAX_BATCH, SPLIT_ROW_TILE, batch_stride, column_splits, device_guard, sm_count, unit_last
from ._layout import PreparedPair, prepare_pair
from ._reference import as_batched, centred_points, compute_dtype, cost_block, row_blocks
from ._tiles import LN2, LOG2E, mma, online_step, plan_bias, row_setup, scale_rows, tile_logits
from ._triton import cdiv, tl, triton
from ._tuning import (AUTOTUNE_DISK_CACHE, TunedLaunch, bucket, configs_or_interpreter, pick_block, pruner,
                      tile_config)

__all__ = ["OVERFLOW_HINT", "plan_apply", "plan_apply_scaled", "plan_apply_torch"]

_FN = "plan_apply"

# --------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------

# Largest tile first; the last one is the safe fallback.
_CONFIGS = configs_or_interpreter([
    # One warpgroup per program, two programs per SM (see softmin.LSE_CONFIGS),
    # for vectors on tensor cores only. H100, P @ v, device ms per call
    # against the best of the other tiles: 1.07 against 1.66 (50k, d = 3,
    # tf32x3), 1.68 against 2.88 (50k, d = 64, tf32), 0.095 against 0.139
    # (10k, d = 64, tf32).
    tile_config(64, 128, 4, 3),
    tile_config(128, 64, 4, 3),
    tile_config(128, 64, 8, 3),
    tile_config(128, 64, 8, 2),
    tile_config(64, 64, 4, 2),
    tile_config(64, 32, 4, 1),
])

# Widest chunk of the columns of V per program. Wider V is split over the
# second grid axis; every chunk recomputes the probability tiles (exp-bound),
# hence the large per-chunk price given to pick_block.
_MAX_BLOCK_K = 64


def _fits(cfg, args):
    bm, bn, w = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps
    if args["D_CHUNKS"] > 1 and cfg.num_stages > 2:
        return False   # shared memory, see softmin.lse_fits
    if bm < bn and (args["DOT"] == 1 or args["V_MODE"] == 2):
        # ptxas (Triton 3.6): 64 x 128 on 4 warps spills 400-800 bytes on the
        # FMA path and beside a (BLOCK_M, BLOCK_K) accumulator.
        return False
    if args["DOT"] == 1 and args["V_MODE"] < 2:
        return True
    # ptxas (sm_90, tf32x3): with a (BLOCK_M, BLOCK_K) accumulator or a feature
    # chunk over 16, a 128-row tile needs 8 warps not to spill.
    small = args["V_MODE"] < 2 and args["BLOCK_D"] <= 16
    return not (bm == 128 and w == 4 and not small)


# --------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------


@triton.autotune(
    configs=_CONFIGS,
    # Bucketed sizes only; eps and cost_scale are runtime floats (no re-tune
    # when eps changes). Tensor dtypes are added to the key by Triton.
    key=["N_BUCKET", "M_BUCKET", "DP", "K_PAD", "DOT", "CPREC", "PREC", "SPLITS_KEY"],
    prune_configs_by={"early_config_prune": pruner(_fits)},
    **AUTOTUNE_DISK_CACHE,
)
# Sizes are loop bounds and masks only: specialising on them (== 1, % 16)
# would compile a new variant for every parity of n or m.
@triton.jit(do_not_specialize=["n", "m", "k", "cols_per_split"])
def _plan_apply_kernel(
    X, Y, XN, YN, F, G, LOG_A, LOG_B, V, OUT, LSC,
    n, m, k, cols_per_split,
    stride_xb, stride_yb, stride_xnb, stride_ynb,
    stride_fb, stride_gb, stride_lab, stride_lbb,
    stride_vb, stride_vm, stride_vk,
    stride_os, stride_ob, stride_on, stride_ok,
    stride_ls, stride_lb,
    k2,        # cost_scale * log2(e) / eps (runtime: eps changes never recompile)
    inv_eps2,  # log2(e) / eps
    N_BUCKET, M_BUCKET, K_PAD, SPLITS_KEY,  # autotuning keys only
    # Optional log-weights: absent ones cost neither a load nor an add.
    HAS_LOG_A: tl.constexpr, HAS_LOG_B: tl.constexpr,
    # 0: V = ones (row sums, a plain reduction); 1: a vector (elementwise
    # product and reduction: a tl.dot would pad k = 1 to 16); 2: a matrix
    # (tensor-core dot of the probability tile with the V tile).
    V_MODE: tl.constexpr,
    # True: store the row sums unscaled in OUT and the base-2 log of each
    # row's factor in LSC (plan_apply_scaled); False: store P V itself.
    LOG_SCALE: tl.constexpr,
    # The prepared layout and the dot path (see softmin._lse_kernel).
    D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    DOT: tl.constexpr,
    # tl.dot precision of the cost dot (plain "tf32" for a split pair, see
    # _layout.SPLIT_MAX_K); PREC is that of every other dot.
    CPREC: tl.constexpr,
    # Columns of V handled by one program (>= 16 for tl.dot).
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # Axis 1 enumerates (column split, chunk of V's columns) pairs.
    k_chunks = tl.cdiv(k, BLOCK_K)
    pid_s = tl.program_id(1) // k_chunks
    pid_k = tl.program_id(1) % k_chunks
    b = tl.program_id(2).to(tl.int64)
    X += b * stride_xb
    Y += b * stride_yb
    XN += b * stride_xnb
    YN += b * stride_ynb
    F += b * stride_fb
    G += b * stride_gb
    LOG_A += b * stride_lab
    LOG_B += b * stride_lbb
    V += b * stride_vb
    OUT += b * stride_ob + pid_s * stride_os
    LSC += b * stride_lb + pid_s * stride_ls

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    two_k2 = 2.0 * k2
    xc0, x0, x1, x2, x3, x4, x5, x6, x7 = row_setup(X, rows, n, two_k2, D, DP, BLOCK_D, DOT)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

    lo = pid_s * cols_per_split
    hi = tl.minimum(lo + cols_per_split, m)
    M = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    if V_MODE == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        # Column bias of l_ij in base 2: log2(e) (log_b_j + g_j / eps) - k2 |y_j|^2.
        u = tl.where(col_ok, plan_bias(G, LOG_B, YN, cols, col_ok, inv_eps2, k2, HAS_LOG_B), float("-inf"))
        t = tile_logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, X, Y, rows, cols, u, n, hi, two_k2,
                    D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
        M, alpha, p = online_step(M, t)
        if V_MODE == 0:
            acc = acc * alpha + tl.sum(p, axis=1)
        elif V_MODE == 1:
            # other=0: p = 0 past m, but 0 * (garbage NaN) would still be NaN.
            v = tl.load(V + cols * stride_vm, mask=col_ok, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p * v[None, :], axis=1)
        else:
            vt = tl.load(V + cols[:, None] * stride_vm + kk[None, :] * stride_vk,
                         mask=col_ok[:, None] & (kk[None, :] < k), other=0.0)
            # p is in [0, 1]: casting it to a half V is safe.
            acc = mma(p.to(vt.dtype), vt, acc * alpha[:, None], PREC)

    # Row factor exp(log_a_i + f_i/eps + M_i - c|x_i|^2/eps), in base 2: lsc
    # is the log2 of the row's largest entry of P (-inf for a row with no
    # finite logit, whose acc is 0: the product is 0, never NaN). With column
    # splits each split stores its own partial (scaled, or with its own lsc);
    # the launcher merges them.
    row_ok = rows < n
    lsc = plan_bias(F, LOG_A, XN, rows, row_ok, inv_eps2, k2, HAS_LOG_A) + M
    if LOG_SCALE:
        tl.store(LSC + rows, lsc, mask=row_ok)
        out = acc
    else:
        out = scale_rows(acc, lsc, V_MODE == 2)
    if V_MODE == 2:
        tl.store(OUT + rows[:, None] * stride_on + kk[None, :] * stride_ok,
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (kk[None, :] < k))
    else:
        tl.store(OUT + rows * stride_on, out.to(OUT.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------

_PLAN_LAUNCH = TunedLaunch(_plan_apply_kernel)


def _validate(fn, x, y, f, g, V, log_a, log_b, eps, cost_scale):
    """Shapes, dtypes, devices and scalars; the values are read back after the
    product, with it (:func:`_check_values`): one synchronisation for both."""
    geo = points(fn, x, y, batch="broadcast", max_batch=MAX_BATCH)
    vector(geo, "f", f, geo.n, shared=True, wide=True)
    vector(geo, "g", g, geo.m, shared=True, wide=True)
    vector(geo, "log_a", log_a, geo.n, optional=True, shared=True, wide=True)
    vector(geo, "log_b", log_b, geo.m, optional=True, shared=True, wide=True)
    operand(geo, "V", V, geo.m, wide=True, transpose=f"{fn}(y, x, g, f, V, log_a=log_b, log_b=log_a, ...)")
    eps = positive_scalar(fn, "eps", eps)
    cost_scale = positive_scalar(fn, "cost_scale", cost_scale)
    return geo, eps, cost_scale


#: Why a plan product can overflow, and what to do, for the message that refuses one.
OVERFLOW_HINT = (
    "the plan's entries a_i b_j exp((f_i + g_j - C_ij) / eps), or their sums, exceed the dtype's range in some "
    "rows. The potentials of this problem at this eps keep f_i + g_j - C_ij near or below 0; far above it, f and g "
    "belong to another problem or another eps, or eps is too small for the dtype to resolve them (|f| / eps "
    "above about 1e6 in float32: use float64 or a larger eps)")


def _check_values(fn, x, y, f, g, V, log_a, log_b, results: dict) -> None:
    """The inputs' values, then the results' (an overflow), in one read-back."""
    finite(fn, {"x": x, "y": y, "f": f, "g": g, "V": V, "log_a": log_a, "log_b": log_b},
           allow_neg_inf=("f", "g", "log_a", "log_b", "L"), results=results,
           result_hint=OVERFLOW_HINT + "; plan_apply_scaled returns such a product as exp(L) * S")


def _plan_apply_triton(geo, x, y, f, g, V, log_a, log_b, eps, cost_scale, precision, forced_splits=None,
                       log_scale=False):
    """P @ V, or with ``log_scale`` the pair (S, L) of :func:`plan_apply_scaled` (S in fp32)."""
    vec_ndim = 2 if geo.batched else 1  # ndim of a V vector in this call
    if V is None:
        mode, k, out_shape = 0, 1, geo.shape(geo.n)
    elif V.ndim == vec_ndim:
        mode, k, out_shape = 1, 1, geo.shape(geo.n)
    else:
        k = V.shape[-1]
        mode, out_shape = (1 if k == 1 else 2), geo.shape(geo.n, k)
    # Unscaled row sums reach m max|V|: fp32 even for half points.
    out = torch.empty(out_shape, device=geo.device, dtype=torch.float32 if log_scale else geo.dtype)
    lsc = torch.full(geo.shape(geo.n), float("-inf"), device=geo.device, dtype=torch.float32) if log_scale else None
    if out.numel() == 0 or geo.m == 0:
        out.zero_()
        return (out, lsc) if log_scale else out
    pair = prepare_pair(x, y, precision)
    f, g = unit_last(f), unit_last(g)
    log_a, log_b = unit_last(log_a), unit_last(log_b)
    block_k = pick_block(k, _MAX_BLOCK_K, chunk_cost=64) if mode == 2 else 16
    k_chunks = cdiv(k, block_k)
    row_programs = cdiv(geo.n, SPLIT_ROW_TILE) * geo.B * k_chunks
    splits, cols = column_splits(row_programs, geo.m, sm_count(geo.device), forced=forced_splits)
    # Partial products of the splits are merged in fp32 after the launch.
    target = out if splits == 1 else torch.empty((splits,) + out_shape, device=geo.device, dtype=torch.float32)
    t_out = target if splits == 1 else target[0]
    # The row scales (log_scale): one (B, n) slice per split.
    l_target = None
    if log_scale:
        l_target = lsc.view((1,) + tuple(lsc.shape)) if splits == 1 else \
            torch.empty((splits,) + tuple(lsc.shape), device=geo.device, dtype=torch.float32)
        l_strides = (l_target.stride(0) if splits > 1 else 0, l_target.stride(1) if geo.batched else 0)
    else:
        l_strides = (0, 0)

    # Strides of V and OUT as (batch, row, column) whatever the mode.
    if V is None:
        V_arg, v_strides = f, (0, 0, 0)  # never read
    else:
        V_arg = V
        vb = V.stride(0) if geo.batched else 0
        vk = V.stride(-1) if V.ndim == vec_ndim + 1 else 0
        v_strides = (vb, V.stride(-2) if V.ndim == vec_ndim + 1 else V.stride(-1), vk)
    ob = t_out.stride(0) if geo.batched else 0
    if t_out.ndim == (3 if geo.batched else 2):
        o_strides = (ob, t_out.stride(-2), t_out.stride(-1))
    else:
        o_strides = (ob, t_out.stride(-1), 0)
    s_stride = target.stride(0) if splits > 1 else 0

    P = PreparedPair
    grid = lambda meta: (cdiv(geo.n, meta["BLOCK_M"]), splits * k_chunks, geo.B)  # noqa: E731
    n_b, m_b, k_b = bucket(geo.n), bucket(geo.m), (bucket(k) if mode == 2 else mode)
    key = (n_b, m_b, k_b, pair.DP, pair.DOT, pair.PREC, precision, min(splits, 2), block_k,
           log_a is not None, log_b is not None, x.dtype, f.dtype, None if V is None else V.dtype)
    with device_guard(geo.device):
        _PLAN_LAUNCH(
            key, grid,
            pair.x, pair.y, pair.xn, pair.yn, f, g,
            log_a if log_a is not None else f, log_b if log_b is not None else g,
            V_arg, target, l_target if log_scale else target,
            geo.n, geo.m, k, cols,
            P.bstride(pair.x), P.bstride(pair.y), P.bstride(pair.xn), P.bstride(pair.yn),
            batch_stride(f, 1), batch_stride(g, 1),
            batch_stride(log_a, 1) if log_a is not None else 0,
            batch_stride(log_b, 1) if log_b is not None else 0,
            *v_strides, s_stride, *o_strides, *l_strides,
            pair.k2(cost_scale, eps), LOG2E / eps,
            n_b, m_b, k_b, min(splits, 2),
            HAS_LOG_A=log_a is not None, HAS_LOG_B=log_b is not None, V_MODE=mode, LOG_SCALE=log_scale,
            D=pair.D, DP=pair.DP, BLOCK_D=pair.BLOCK_D, D_CHUNKS=pair.D_CHUNKS,
            DOT=pair.DOT, CPREC=pair.PREC, BLOCK_K=block_k, PREC=precision,
        )
    if not log_scale:
        if splits > 1:
            if out.dtype == target.dtype:
                torch.sum(target, 0, out=out)     # one launch: the same reduction, written in place
            else:
                out.copy_(target.sum(0))
        return out
    if splits > 1:
        # Each split's sums carry their own shift: bring them to the largest one.
        top = l_target.amax(0)
        shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
        w = torch.exp2(l_target - shift)
        out.copy_((target * (w if mode < 2 else w.unsqueeze(-1))).sum(0))
        lsc.copy_(top)
    return out, lsc.mul_(LN2)


def plan_apply(x, y, f, g, V=None, *, eps, log_a=None, log_b=None, cost_scale=1.0,
               backend=None, precision=None, _splits=None):
    r"""Streaming product ``P @ V`` of the entropic plan with a vector or a matrix.

    Parameters
    ----------
    x : Tensor, shape (n, d) or (B, n, d)
        Row points.
    y : Tensor, shape (m, d) or (B, m, d)
        Column points (same dtype and device as ``x``).
    f : Tensor, shape (n,) or (B, n)
        Row potential.
    g : Tensor, shape (m,) or (B, m)
        Column potential.
    V : Tensor or None, shape (m,), (m, k), (B, m) or (B, m, k)
        The operand; ``None`` means ones (the row sums ``P 1``). A batched
        call needs a batched ``V``. Any k (columns are processed in chunks of
        at most 64 per program).
    eps : float
        Entropic regularisation, positive (a runtime kernel argument).
    log_a : Tensor or None, shape (n,) or (B, n)
        Row log-weights; None means zeros (the OTT convention, unit weights).
        ``-inf`` marks a zero weight.
    log_b : Tensor or None, shape (m,) or (B, m)
        Column log-weights; None means zeros. ``-inf`` marks a zero weight.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    backend : {None, "auto", "triton", "torch"}
        As in :func:`otlinop.kernels.lse_cost`.
    precision : {None, "ieee", "tf32", "tf32x3"}
        Tensor-core precision of the fp32 dots (the cost dots and P @ V);
        None means ``DEFAULT_PRECISION`` ("tf32x3").

    In a batched call the vectors f, g, log_a, log_b may be unbatched (shared
    by the batch). f, g, log_a, log_b and V have the dtype of ``x`` (float32
    is also accepted when ``x`` is float16/bfloat16).

    Returns
    -------
    Tensor, dtype of ``x``
        Shape (n,) for V None or a vector, (n, k) for a matrix; with a leading
        B when batched. A row with no nonzero weight gives 0.

    Other Parameters
    ----------------
    _splits : int or (int, int), optional
        Test and profiling hook: the column split of the Triton launch, forced
        (as in :func:`otlinop.kernels.lse_cost`). The torch backend ignores it.

    Raises
    ------
    ValueError
        Inconsistent shapes or devices, invalid eps, cost_scale, backend or
        precision, non-finite inputs (f, g, log_a, log_b may hold -inf); a
        product that overflows the output dtype (inputs and result are read
        back together, one synchronisation, when ``config.check_finite`` is
        on; :func:`plan_apply_scaled` gives such a product in log scale).
    TypeError
        Non-tensor inputs or inconsistent dtypes.

    Notes
    -----
    .. math:: (PV)_i = \sum_j \exp\big(\log a_i + \log b_j
              + (f_i + g_j - c\|x_i - y_j\|^2)/\varepsilon\big) V_j

    Each row is summed relative to its largest entry of P (the running max
    of the online log-sum-exp), and that entry's factor is applied at the
    end in two halves: any result inside the output's range is returned
    without an intermediate overflow or underflow.

    ``P.T @ U = plan_apply(y, x, g, f, U, log_a=log_b, log_b=log_a)``. Time
    O(n m (d + k)), memory O((n + m)(d + k)).

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import plan_apply
    >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> f, g = torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    >>> plan_apply(x, y, f, g, torch.ones(4, 3, dtype=torch.float64), eps=1.0).shape
    torch.Size([5, 3])
    """
    geo, eps, cost_scale = _validate(_FN, x, y, f, g, V, log_a, log_b, eps, cost_scale)
    return plan_apply_validated(geo, x, y, f, g, V, log_a=log_a, log_b=log_b, eps=eps, cost_scale=cost_scale,
                                backend=backend, precision=precision, _splits=_splits)


def plan_apply_prepared(x, y, f, g, *, eps, log_a=None, log_b=None, cost_scale=1.0):
    """``(geometry, eps, cost_scale)`` of :func:`plan_apply`'s checks on the plan's data
    (everything but the operand), for a caller that applies one plan many times (a Krylov
    solve) through :func:`plan_apply_validated`."""
    return _validate(_FN, x, y, f, g, None, log_a, log_b, eps, cost_scale)


def plan_apply_validated(geo, x, y, f, g, V=None, *, eps, log_a=None, log_b=None, cost_scale=1.0, backend=None,
                         precision=None, _splits=None):
    """:func:`plan_apply` without its shape and scalar checks, on data that
    :func:`plan_apply_prepared` (``geo, eps, cost_scale``) checked; ``V`` must be
    an operand that ``plan_apply`` would accept (an (m,) or (m, k) tensor of the
    data's dtype and device). The value checks (``config.check_finite``) still run.
    About 40 us of host time less per call."""
    precision = resolve_precision(_FN, precision)
    if resolve_backend(_FN, backend, x) == "torch":
        out = _plan_apply_torch(x, y, f, g, V, log_a, log_b, eps, cost_scale)
    else:
        out = _plan_apply_triton(geo, x, y, f, g, V, log_a, log_b, eps, cost_scale, precision, _splits)
    _check_values(_FN, x, y, f, g, V, log_a, log_b, {"P @ V": out})
    return out


def plan_apply_scaled(x, y, f, g, V=None, *, eps, log_a=None, log_b=None, cost_scale=1.0,
                      backend=None, precision=None, _splits=None):
    r"""``P @ V`` as a row scale and a normalised sum: ``P V = exp(L)[:, None] * S``.

    The same pass as :func:`plan_apply`, which stores the product itself;
    here the factor of each row stays in log scale. ``L_i`` is the log of the
    row's largest entry of P and ``S_i`` the row's sum relative to it, so
    ``S`` never overflows (for ``V = 1``, ``1 <= S_i <= m``) whatever the
    size of the entries, and the ratio of two columns of ``S`` is a sum
    normalised by the row's mass in which the potential ``f`` cancels
    exactly: ``S_i[:k] / S_i[k]`` for ``V = [W | 1]`` is
    ``sum_j pi_ij W_j`` with ``pi_ij = P_ij / (P 1)_i`` (what a soft-min
    differentiates, and what GeomLoss' gradients are made of).

    Parameters
    ----------
    x, y, f, g, V, eps, log_a, log_b, cost_scale, backend, precision
        As in :func:`plan_apply`.

    Returns
    -------
    S : Tensor, shape of ``plan_apply``'s result
        float32 for float32 and half points (float64 for float64 ones):
        unscaled sums reach ``m max|V|``. A row with no nonzero weight gives 0.
    L : Tensor, shape (n,) or (B, n)
        Same dtype as S; ``-inf`` for a row with no nonzero weight.

    Other Parameters
    ----------------
    _splits
        As in :func:`plan_apply`.

    Raises
    ------
    ValueError, TypeError
        As :func:`plan_apply`; ``L`` is +inf (raised as an overflow) only
        where ``f / eps`` itself exceeds the dtype's range.

    Notes
    -----
    .. math:: L_i = \log a_i + f_i / \varepsilon + \max_j l_{ij},\quad
              S_i = \sum_j e^{l_{ij} - \max_k l_{ik}} V_j,\quad
              l_{ij} = \log b_j + (g_j - c\|x_i - y_j\|^2)/\varepsilon

    ``log (P 1)_i = L_i + log S_i`` for ``V = None`` (a marginal in log
    scale). Same cost as :func:`plan_apply`.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import plan_apply, plan_apply_scaled
    >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> f, g = torch.full((5,), 100.0, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    >>> S, L = plan_apply_scaled(x, y, f, g, eps=1e-2)      # P 1 = exp(1e4 + ...): no float holds it
    >>> bool(torch.isfinite(S).all() and torch.isfinite(L).all())
    True
    >>> S, L = plan_apply_scaled(x, y, f - 100.0, g, eps=1.0)
    >>> torch.allclose(torch.exp(L) * S, plan_apply(x, y, f - 100.0, g, eps=1.0))
    True
    """
    fn = "plan_apply_scaled"
    geo, eps, cost_scale = _validate(fn, x, y, f, g, V, log_a, log_b, eps, cost_scale)
    precision = resolve_precision(fn, precision)
    if resolve_backend(fn, backend, x) == "torch":
        S, L = _plan_apply_torch(x, y, f, g, V, log_a, log_b, eps, cost_scale, log_scale=True)
    else:
        S, L = _plan_apply_triton(geo, x, y, f, g, V, log_a, log_b, eps, cost_scale, precision, _splits,
                                  log_scale=True)
    _check_values(fn, x, y, f, g, V, log_a, log_b, {"S": S, "L": L})
    return S, L


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------


def _plan_apply_torch(x, y, f, g, V, log_a, log_b, eps, cost_scale, log_scale=False):
    """P @ V (dtype of x), or with ``log_scale`` the pair (S, L) of :func:`plan_apply_scaled`."""
    dtype = compute_dtype(x.dtype)
    batched = x.ndim == 3 or y.ndim == 3
    xc, yc, xn, yn = centred_points(x, y, dtype)
    f3, g3 = as_batched(f, 1).to(dtype), as_batched(g, 1).to(dtype)
    col = g3 / eps
    if log_b is not None:
        col = col + as_batched(log_b, 1).to(dtype)
    row = f3 / eps
    if log_a is not None:
        row = row + as_batched(log_a, 1).to(dtype)
    vector = V is None or V.ndim == (2 if batched else 1)
    if V is not None:
        V3 = as_batched(V, 2 if batched else 1).to(dtype)
        V3 = V3.unsqueeze(-1) if vector else V3  # (Bv, m, k)
    B = max(xc.shape[0], yc.shape[0], f3.shape[0], g3.shape[0])
    n, m = xc.shape[1], yc.shape[1]
    k = 1 if vector else V.shape[-1]
    out = torch.zeros((B, n, k), device=x.device, dtype=dtype)
    lsc = torch.full((B, n), float("-inf"), device=x.device, dtype=dtype)
    for rows in (row_blocks(n, m, B, out.element_size(), temporaries=2) if m else ()):
        # l_ij = log_b_j + (g_j - C_ij) / eps, built in place in the cost block.
        logits = cost_block(xc, yc, xn, yn, rows, cost_scale).div_(-eps).add_(col[:, None, :])
        M = logits.amax(dim=-1, keepdim=True)
        # A row without a finite logit shifts by 0: exp(-inf) = 0, no NaN; its scale is -inf.
        has = torch.isfinite(M)
        M = torch.where(has, M, torch.zeros_like(M))
        p = logits.sub_(M).exp_()
        out[:, rows] = p.sum(-1, keepdim=True) if V is None else torch.matmul(p, V3)
        lsc[:, rows] = torch.where(has[..., 0], row[:, rows] + M[..., 0], float("-inf"))
    if log_scale:
        S = out[..., 0] if vector else out
        return (S, lsc) if batched else (S[0], lsc[0])
    # The row factor in two halves, as the kernel (_tiles.scale_rows): no intermediate inf or 0.
    half = torch.exp(0.5 * lsc)[..., None]
    return _finish(out.mul_(half).mul_(half), batched, vector, x.dtype)


def _finish(out, batched, vector, dtype):
    if vector:
        out = out[..., 0]
    if not batched:
        out = out[0]
    return out.to(dtype)


def plan_apply_torch(x, y, f, g, V=None, *, eps, log_a=None, log_b=None, cost_scale=1.0):
    """Torch reference of :func:`plan_apply` (same arguments but backend/precision).

    Works on any device in float64 and float32 (half inputs are computed in
    float32). Row blocks keep the (B, rows, m) temporaries under
    ``config.torch_block_bytes``: n x m is never allocated at once for large inputs.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import plan_apply_torch
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> z = torch.zeros(5, dtype=torch.float64)
    >>> plan_apply_torch(x, x, z, z, eps=1.0).shape
    torch.Size([5])
    """
    _, eps, cost_scale = _validate("plan_apply_torch", x, y, f, g, V, log_a, log_b, eps, cost_scale)
    out = _plan_apply_torch(x, y, f, g, V, log_a, log_b, eps, cost_scale)
    _check_values("plan_apply_torch", x, y, f, g, V, log_a, log_b, {"P @ V": out})
    return out
