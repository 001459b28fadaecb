"""Streaming plan-weighted bilinear product ``sum_j P_ij <W_i, V_j> Y_j``.

Computes, for the entropic plan

    P_ij = exp(log_a_i + log_b_j + (f_i + g_j - C_ij) / eps),  C_ij = c |x_i - y_j|^2,

the product ``out_i = sum_j P_ij <W_i, V_j> Y_j``, i.e. ``(P o (W V^T)) Y``,
without storing P or W V^T. This is what the gradient of ``P V`` with
respect to the points and the Hessian term ``Q y`` (``Q_ij = P_ij <A_i, y_j>``,
docs/math.md section 6) need.

Per tile of rows and stream of column tiles: the logits tile (tensor-core
``x.y``), the probability tile with a running max (docs/math.md section 2), the tile
``S = W_tile @ V_tile^T`` (tensor-core dot, looped over chunks of k), and
``(p * S) @ Y_tile`` accumulated with the rescale on growth of the max. The
columns of Y are split over the second grid axis in chunks of at most 64.

Cost: time O(n m (d + k + e)) (n m exponentials per chunk of Y, 2 n m
(d + k + e) dot FLOPs); memory O((n + m)(d + k + e)), never an n x m buffer.
"""

from __future__ import annotations

import torch

from .._checks import finite, matrix, points, positive_scalar, vector
from ._dispatch import resolve_backend, resolve_precision
from ._grid import MAX_BATCH, batch_stride, device_guard, unit_last
from ._layout import PreparedPair, prepare_pair
from ._reference import as_batched, centred_points, compute_dtype, cost_block, row_blocks
from .plan_apply import OVERFLOW_HINT
from ._tiles import LOG2E, mma, online_step, plan_bias, row_setup, scale_rows, tile_logits
from ._triton import cdiv, tl, triton
from ._tuning import (AUTOTUNE_DISK_CACHE, TunedLaunch, bucket, configs_or_interpreter, pick_block, pruner,
                      tile_config)

__all__ = ["plan_bilinear", "plan_bilinear_torch"]

_FN = "plan_bilinear"

# --------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------

# Largest tile first; the last one is the safe fallback. The kernel keeps
# more tiles alive than the others (logits, S = W V^T, accumulator), hence
# smaller tiles.
_CONFIGS = configs_or_interpreter([
    tile_config(128, 64, 8, 2),
    tile_config(64, 64, 4, 2),
    tile_config(64, 32, 4, 2),
])

_MAX_BLOCK_K = 64   # chunk of the k columns of W and V (looped in the kernel)
_MAX_BLOCK_E = 64   # columns of Y per program (split over the grid)


def _fits(cfg, args):
    # ptxas (sm_90, tf32x3): at BLOCK_D = BLOCK_K = BLOCK_E = 64 a 128-row
    # tile needs ~213 KB of shared memory and spills; keep it for narrow chunks.
    d_chunk = args["BLOCK_D"] if args["DOT"] == 0 else 0
    wide = d_chunk + args["BLOCK_K"] + args["BLOCK_E"] > 96
    return not (cfg.kwargs["BLOCK_M"] == 128 and wide)


# --------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------


@triton.autotune(
    configs=_CONFIGS,
    # Bucketed sizes only; eps and cost_scale are runtime floats.
    key=["N_BUCKET", "M_BUCKET", "DP", "K_PAD", "E_PAD", "DOT", "CPREC", "PREC"],
    prune_configs_by={"early_config_prune": pruner(_fits)},
    **AUTOTUNE_DISK_CACHE,
)
# Sizes are loop bounds and masks only: specialising on them (== 1, % 16)
# would compile a new variant for every parity of n or m.
@triton.jit(do_not_specialize=["n", "m", "k", "e"])
def _plan_bilinear_kernel(
    X, Y, XN, YN, F, G, LOG_A, LOG_B, W, V, Z, OUT,
    n, m, k, e,
    stride_xb, stride_yb, stride_xnb, stride_ynb,
    stride_fb, stride_gb, stride_lab, stride_lbb,
    stride_wb, stride_wn, stride_wk,
    stride_vb, stride_vm, stride_vk,
    stride_zb, stride_zm, stride_ze,
    stride_ob, stride_on, stride_oe,
    k2,        # cost_scale * log2(e) / eps (runtime: eps changes never recompile)
    inv_eps2,  # log2(e) / eps
    N_BUCKET, M_BUCKET, K_PAD, E_PAD,  # autotuning keys only
    HAS_LOG_A: tl.constexpr, HAS_LOG_B: tl.constexpr,
    # The prepared layout and the dot path (see softmin._lse_kernel).
    D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    DOT: tl.constexpr,
    # tl.dot precision of the cost dot (plain "tf32" for a split pair, see
    # _layout.SPLIT_MAX_K); PREC is that of every other dot.
    CPREC: tl.constexpr,
    # Chunks of k and e (>= 16 for tl.dot, powers of two) and trip counts.
    BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_e = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    X += b * stride_xb
    Y += b * stride_yb
    XN += b * stride_xnb
    YN += b * stride_ynb
    F += b * stride_fb
    G += b * stride_gb
    LOG_A += b * stride_lab
    LOG_B += b * stride_lbb
    W += b * stride_wb
    V += b * stride_vb
    Z += b * stride_zb
    OUT += b * stride_ob

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    two_k2 = 2.0 * k2
    xc0, x0, x1, x2, x3, x4, x5, x6, x7 = row_setup(X, rows, n, two_k2, D, DP, BLOCK_D, DOT)
    kk = tl.arange(0, BLOCK_K)
    ee = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    # First chunk of W stays resident, like the first chunk of x.
    w0 = tl.load(W + rows[:, None] * stride_wn + kk[None, :] * stride_wk,
                 mask=row_ok[:, None] & (kk[None, :] < k), other=0.0)

    M = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for start in range(0, m, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < m
        u = tl.where(col_ok, plan_bias(G, LOG_B, YN, cols, col_ok, inv_eps2, k2, HAS_LOG_B), float("-inf"))
        t = tile_logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, X, Y, rows, cols, u, n, m, two_k2,
                    D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
        M, alpha, p = online_step(M, t)

        # S_ij = <W_i, V_j>; masked rows/columns load 0 (never garbage: 0 * NaN).
        v0 = tl.load(V + cols[:, None] * stride_vm + kk[None, :] * stride_vk,
                     mask=col_ok[:, None] & (kk[None, :] < k), other=0.0)
        s = mma(w0, tl.trans(v0), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC)
        for c in range(1, K_CHUNKS):
            kc = c * BLOCK_K + kk
            wc = tl.load(W + rows[:, None] * stride_wn + kc[None, :] * stride_wk,
                         mask=row_ok[:, None] & (kc[None, :] < k), other=0.0)
            vc = tl.load(V + cols[:, None] * stride_vm + kc[None, :] * stride_vk,
                         mask=col_ok[:, None] & (kc[None, :] < k), other=0.0)
            s = mma(wc, tl.trans(vc), s, PREC)

        # p * S is signed and unbounded: keep it (and the Z tile) in fp32.
        zt = tl.load(Z + cols[:, None] * stride_zm + ee[None, :] * stride_ze,
                     mask=col_ok[:, None] & (ee[None, :] < e), other=0.0).to(tl.float32)
        acc = mma(p * s, zt, acc * alpha[:, None], PREC)

    # The row factor (log2 of the row's largest entry of P) in two halves: no intermediate inf or 0.
    out = scale_rows(acc, plan_bias(F, LOG_A, XN, rows, row_ok, inv_eps2, k2, HAS_LOG_A) + M, True)
    tl.store(OUT + rows[:, None] * stride_on + ee[None, :] * stride_oe,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (ee[None, :] < e))


# --------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------

_BILINEAR_LAUNCH = TunedLaunch(_plan_bilinear_kernel)


def _validate(fn, x, y, f, g, W, V, Y, log_a, log_b, eps, cost_scale):
    geo = points(fn, x, y, batch="broadcast", max_batch=MAX_BATCH)
    vector(geo, "f", f, geo.n, shared=True, wide=True)
    vector(geo, "g", g, geo.m, shared=True, wide=True)
    vector(geo, "log_a", log_a, geo.n, optional=True, shared=True, wide=True)
    vector(geo, "log_b", log_b, geo.m, optional=True, shared=True, wide=True)
    matrix(geo, "W", W, geo.n, shared=True, wide=True)
    matrix(geo, "V", V, geo.m, W.shape[-1], what="as many columns as W", shared=True, wide=True)
    matrix(geo, "Y", Y, geo.m, cols_name="e", shared=True, wide=True)
    eps = positive_scalar(fn, "eps", eps)
    cost_scale = positive_scalar(fn, "cost_scale", cost_scale)
    return geo, eps, cost_scale


def _check_values(fn, x, y, f, g, W, V, Y, log_a, log_b, out) -> None:
    """The inputs' values, then the result's (an overflow), in one read-back."""
    finite(fn, {"x": x, "y": y, "f": f, "g": g, "W": W, "V": V, "Y": Y, "log_a": log_a, "log_b": log_b},
           allow_neg_inf=("f", "g", "log_a", "log_b"), results={"the product": out}, result_hint=OVERFLOW_HINT)


def _plan_bilinear_triton(geo, x, y, f, g, W, V, Y, log_a, log_b, eps, cost_scale, precision):
    k, e = W.shape[-1], Y.shape[-1]
    out = torch.empty(geo.shape(geo.n, e), device=geo.device, dtype=geo.dtype)
    if out.numel() == 0 or geo.m == 0 or k == 0:
        return out.zero_()
    if W.dtype != V.dtype:
        # One dot operand dtype: promote the half one (an O((n + m) k) copy).
        W, V = W.float(), V.float()
    pair = prepare_pair(x, y, precision)
    f, g = unit_last(f), unit_last(g)
    log_a, log_b = unit_last(log_a), unit_last(log_b)
    block_k = pick_block(k, _MAX_BLOCK_K, chunk_cost=16)
    block_e = pick_block(e, _MAX_BLOCK_E, chunk_cost=64)
    ob = out.stride(0) if geo.batched else 0

    P = PreparedPair
    grid = lambda meta: (cdiv(geo.n, meta["BLOCK_M"]), cdiv(e, block_e), geo.B)  # noqa: E731
    n_b, m_b, k_b, e_b = bucket(geo.n), bucket(geo.m), bucket(k), bucket(e)
    key = (n_b, m_b, k_b, e_b, pair.DP, pair.DOT, pair.PREC, precision, block_k, block_e,
           log_a is not None, log_b is not None, x.dtype, f.dtype, W.dtype, Y.dtype)
    with device_guard(geo.device):
        _BILINEAR_LAUNCH(
            key, grid,
            pair.x, pair.y, pair.xn, pair.yn, f, g,
            log_a if log_a is not None else f, log_b if log_b is not None else g,
            W, V, Y, out,
            geo.n, geo.m, k, e,
            P.bstride(pair.x), P.bstride(pair.y), P.bstride(pair.xn), P.bstride(pair.yn),
            batch_stride(f, 1), batch_stride(g, 1),
            batch_stride(log_a, 1) if log_a is not None else 0,
            batch_stride(log_b, 1) if log_b is not None else 0,
            batch_stride(W, 2), W.stride(-2), W.stride(-1),
            batch_stride(V, 2), V.stride(-2), V.stride(-1),
            batch_stride(Y, 2), Y.stride(-2), Y.stride(-1),
            ob, out.stride(-2), out.stride(-1),
            pair.k2(cost_scale, eps), LOG2E / eps,
            n_b, m_b, k_b, e_b,
            HAS_LOG_A=log_a is not None, HAS_LOG_B=log_b is not None,
            D=pair.D, DP=pair.DP, BLOCK_D=pair.BLOCK_D, D_CHUNKS=pair.D_CHUNKS,
            DOT=pair.DOT, CPREC=pair.PREC,
            BLOCK_K=block_k, K_CHUNKS=cdiv(k, block_k), BLOCK_E=block_e,
            PREC=precision,
        )
    return out


def plan_bilinear(x, y, f, g, W, V, Y, *, eps, log_a=None, log_b=None, cost_scale=1.0,
                  backend=None, precision=None):
    r"""Streaming ``out_i = sum_j P_ij <W_i, V_j> Y_j``, i.e. ``(P o (W V^T)) Y``.

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
    W : Tensor, shape (n, k) or (B, n, k)
        Row factors of the bilinear weight.
    V : Tensor, shape (m, k) or (B, m, k)
        Column factors of the bilinear weight.
    Y : Tensor, shape (m, e) or (B, m, e)
        The operand.
    eps : float
        Entropic regularisation, positive (a runtime kernel argument).
    log_a, log_b : Tensor or None, shapes (n,) / (m,) (or batched)
        Log-weights; None means zeros. ``-inf`` marks a zero weight.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    backend : {None, "auto", "triton", "torch"}
        As in :func:`otlinop.kernels.lse_cost`.
    precision : {None, "ieee", "tf32", "tf32x3"}
        Tensor-core precision of the fp32 dots; None means
        ``DEFAULT_PRECISION`` ("tf32x3").

    In a batched call every argument but x, y may be unbatched (shared by the
    batch). f, g, log_a, log_b, W, V, Y have the dtype of ``x`` (float32 is
    also accepted when ``x`` is float16/bfloat16).

    Returns
    -------
    Tensor, shape (n, e) or (B, n, e), dtype of ``x``

    Raises
    ------
    ValueError
        Inconsistent shapes (W and V must share k) or devices, invalid eps,
        cost_scale, backend or precision, non-finite inputs; a product that
        overflows the output dtype (read back with the inputs, as in
        :func:`otlinop.kernels.plan_apply`).
    TypeError
        Non-tensor inputs or inconsistent dtypes.

    Notes
    -----
    .. math:: \mathrm{out}_i = \sum_j P_{ij} \langle W_i, V_j\rangle Y_j,\quad
              P_{ij} = \exp\big(\log a_i + \log b_j + (f_i + g_j - C_{ij})/\varepsilon\big)

    With ``W = A`` (n, d), ``V = Y = y``: ``Q y`` with ``Q_ij = P_ij <A_i, y_j>``.
    Any k and e (k is looped in chunks of 64, e split over programs). Time
    O(n m (d + k + e)), memory O((n + m)(d + k + e)).

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import plan_bilinear
    >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> f, g = torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    >>> A = torch.randn(5, 2, dtype=torch.float64)
    >>> plan_bilinear(x, y, f, g, A, y, y, eps=1.0).shape  # Q y
    torch.Size([5, 2])
    """
    geo, eps, cost_scale = _validate(_FN, x, y, f, g, W, V, Y, log_a, log_b, eps, cost_scale)
    precision = resolve_precision(_FN, precision)
    if resolve_backend(_FN, backend, x) == "torch":
        out = _plan_bilinear_torch(x, y, f, g, W, V, Y, log_a, log_b, eps, cost_scale)
    else:
        out = _plan_bilinear_triton(geo, x, y, f, g, W, V, Y, log_a, log_b, eps, cost_scale, precision)
    _check_values(_FN, x, y, f, g, W, V, Y, log_a, log_b, out)
    return out


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------


def _plan_bilinear_torch(x, y, f, g, W, V, Y, log_a, log_b, eps, cost_scale):
    dtype = compute_dtype(x.dtype)
    batched = x.ndim == 3 or y.ndim == 3
    xc, yc, xn, yn = centred_points(x, y, dtype)
    col = as_batched(g, 1).to(dtype) / eps
    if log_b is not None:
        col = col + as_batched(log_b, 1).to(dtype)
    row = as_batched(f, 1).to(dtype) / eps
    if log_a is not None:
        row = row + as_batched(log_a, 1).to(dtype)
    W3, V3, Y3 = (as_batched(t, 2).to(dtype) for t in (W, V, Y))
    B = max(xc.shape[0], yc.shape[0])
    n, m, e = xc.shape[1], yc.shape[1], Y.shape[-1]
    out = torch.zeros((B, n, e), device=x.device, dtype=dtype)
    if m == 0:
        return (out if batched else out[0]).to(x.dtype)
    # Under torch.func (vmap, jacrev: a backward applied to a batch of cotangents) an operand
    # may carry a batch that the temporaries lack: in-place updates of them and the row-block
    # writes into out would be refused, so those calls build each block out of place.
    functional = any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
                     for t in (x, y, f, g, W, V, Y, log_a, log_b))
    blocks = []
    for rows in row_blocks(n, m, B, out.element_size(), temporaries=3):
        WV = torch.matmul(W3[:, rows], V3.transpose(-1, -2))
        logits = cost_block(xc, yc, xn, yn, rows, cost_scale)
        if functional:
            logits = logits / -eps + col[:, None, :]
        else:
            logits = logits.div_(-eps).add_(col[:, None, :])
        M = logits.amax(dim=-1, keepdim=True)
        M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
        q = (logits - M).exp() * WV if functional else logits.sub_(M).exp_().mul_(WV)
        # The row factor in two halves, as the kernel (_tiles.scale_rows): no intermediate inf or 0.
        half = torch.exp(0.5 * (row[:, rows, None] + M))
        if functional:
            blocks.append(torch.matmul(q, Y3) * half * half)
        else:
            out[:, rows] = torch.matmul(q, Y3).mul_(half).mul_(half)
    if functional:
        out = torch.cat(blocks, dim=1)
    out = out if batched else out[0]
    return out.to(x.dtype)


def plan_bilinear_torch(x, y, f, g, W, V, Y, *, eps, log_a=None, log_b=None, cost_scale=1.0):
    """Torch reference of :func:`plan_bilinear` (same arguments but backend/precision).

    Works on any device in float64 and float32 (half inputs are computed in
    float32); row blocks keep the (B, rows, m) temporaries under
    ``config.torch_block_bytes``.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import plan_bilinear_torch
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> z = torch.zeros(5, dtype=torch.float64)
    >>> plan_bilinear_torch(x, x, z, z, x, x, x, eps=1.0).shape
    torch.Size([5, 2])
    """
    _, eps, cost_scale = _validate("plan_bilinear_torch", x, y, f, g, W, V, Y, log_a, log_b, eps, cost_scale)
    out = _plan_bilinear_torch(x, y, f, g, W, V, Y, log_a, log_b, eps, cost_scale)
    _check_values("plan_bilinear_torch", x, y, f, g, W, V, Y, log_a, log_b, out)
    return out
