"""Streaming soft-minimum of the squared Euclidean cost (the Sinkhorn update).

Computes, for ``C_ij = c |x_i - y_j|^2``,

    lse_cost(x, y, h)_i = LSE_j (h_j - C_ij / eps)
    softmin(x, y, h)_i  = -eps * lse_cost(x, y, h)_i

without storing C: each program owns a tile of rows of x and streams the
columns of y in tiles, keeping a running maximum and a running sum of
exponentials (docs/math.md section 2). The dots x_i . y_j run on tensor cores
(``tl.dot``) or, for the "ieee" precision, as exact fp32 FMAs; the
exponentials run in base 2 (``exp2``), with every constant folded into
per-column biases so that the inner loop costs the dot, one max and one exp2
per entry. The clouds are centred, padded and their squared norms computed
once per pair of clouds (``_layout.prepare_pair``, reused across calls). When
the row tiles alone would leave SMs idle, the columns are split over the grid
and the partial sums merged by a second light kernel (flash-decoding).

The Sinkhorn update (docs/math.md section 3) is ``f <- softmin(x, y, log b + g / eps)``; the
update of g is the same call with (x, y) swapped (the cost is symmetric).

Cost: time O(n m d) (n m exponentials, 2 n m d dot FLOPs); memory
O((n + m) d): the output, the prepared clouds and O(n) partial sums, never an
n x m buffer.
"""

from __future__ import annotations

import torch

from .._checks import finite, points, positive_scalar, vector
from ._dispatch import interpreting, resolve_backend, resolve_precision
from ._grid import MAX_BATCH, SPLIT_ROW_TILE, batch_stride, column_splits, device_guard, sm_count, unit_last
from ._layout import PreparedPair, prepare_pair
from ._reference import as_batched, centred_points, compute_dtype, cost_block, row_blocks
from ._tiles import LN2, TL_LOG2E, online_step, row_setup, tile_logits
from ._triton import cdiv, tl, triton
from ._tuning import AUTOTUNE_DISK_CACHE, TunedLaunch, bucket, configs_or_interpreter, pruner, tile_config

__all__ = ["lse_cost", "softmin", "lse_cost_torch", "softmin_torch"]

_FN_LSE = "lse_cost"
_FN_SOFTMIN = "softmin"

# --------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------

# Largest tile first; the last one is the safe fallback. 128 x 64-128 tiles
# suit an exp-bound loop (FlashAttention's choice); 64 x 64 keeps every SM busy
# for smaller n.
LSE_CONFIGS = configs_or_interpreter([
    tile_config(128, 128, 8, 2),
    # One warpgroup per program, two programs per SM that do not wait on each
    # other's barriers. H100, n = m = 50k, device ms per call against the best
    # of the other tiles: softmin 1.05 against 1.31 (d = 3, tf32x3) and 1.88
    # against 2.15 (d = 64, tf32); softmin_pair 1.35 against 1.52 and 2.01
    # against 2.47 (128 x 128 on 8 warps).
    tile_config(64, 128, 4, 2),
    tile_config(128, 64, 4, 3),
    tile_config(128, 64, 8, 3),
    tile_config(128, 64, 4, 2),
    tile_config(64, 64, 4, 2),
    tile_config(64, 32, 4, 1),
])


def lse_fits(cfg, args):
    bm, bn, w = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps
    if args["DOT"] == 1:
        # FMA path: no operand staging in shared memory; a 128 x 128 fp32 tile
        # needs 8 warps not to spill, and so does 64 x 128 (ptxas, Triton 3.6:
        # 376 bytes of stack at d = 3).
        return not (bm * bn > 128 * 64 and w == 4) and not (bm < bn and w == 4)
    # Tensor cores. ptxas (sm_90, tf32x3): a 128-row tile on 4 warps spills
    # once the feature chunk exceeds 16. Several feature chunks (d > 64) are
    # reloaded inside the column loop: pipelining them over 3 stages with
    # 128-wide tiles overflows the 227 KB of shared memory (d = 256 asked for
    # 256 KB on an H100), so keep those to small tiles and 1-2 stages.
    if bm == 128 and w == 4 and args["BLOCK_D"] > 16:
        return False
    if args["D_CHUNKS"] > 1 and (bn > 64 or cfg.num_stages > 2):
        return False
    return True


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.autotune(
    configs=LSE_CONFIGS,
    # Bucketed sizes, never raw n or m (one tuning per power of two), and no
    # eps / cost_scale: they are runtime floats, so eps-scaling never re-tunes
    # nor recompiles. Tensor dtypes are added to the key by Triton.
    key=["N_BUCKET", "M_BUCKET", "DP", "DOT", "CPREC", "SPLITS_KEY"],
    prune_configs_by={"early_config_prune": pruner(lse_fits)},
    **AUTOTUNE_DISK_CACHE,
)
# Sizes are loop bounds and masks only: specialising on them (== 1, % 16)
# would compile a new variant for every parity of n or m.
@triton.jit(do_not_specialize=["n", "m", "cols_per_split"])
def _lse_kernel(
    X, Y, XN, YN, H, OUT,
    n, m, cols_per_split,
    stride_xb, stride_yb, stride_xnb, stride_ynb, stride_hb, stride_ob, stride_os,
    k2,          # cost_scale * log2(e) / eps: runtime, so eps changes never recompile
    out_scale,   # ln 2 for lse_cost, -eps ln 2 for softmin (fused final scaling)
    N_BUCKET, M_BUCKET, SPLITS_KEY,  # autotuning keys only
    # The prepared layout: d features, rows of DP entries, tensor-core chunks of
    # BLOCK_D features (D_CHUNKS of them); DOT 0 = tensor cores, 1 = FMAs.
    D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    DOT: tl.constexpr,
    # tl.dot precision of the cost dot, the only dot here: the user's precision,
    # or plain "tf32" for a split pair (see _layout.SPLIT_MAX_K).
    CPREC: tl.constexpr,
    # True: this program reduces one split of the columns and stores the
    # partial log2-sum-exp (merged by _lse_merge_kernel).
    SPLIT: tl.constexpr,
    # Tile shape, set by the autotuner.
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64 batch offsets: B * n * d may exceed 2^31.
    b = tl.program_id(2).to(tl.int64)
    X += b * stride_xb
    Y += b * stride_yb
    XN += b * stride_xnb
    YN += b * stride_ynb
    H += b * stride_hb
    OUT += b * stride_ob + pid_s * stride_os

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # In base 2: h_j log2(e) - k2 (|x_i|^2 + |y_j|^2 - 2 x_i.y_j). The row term
    # -k2 |x_i|^2 is constant along the stream and is added once at the end.
    two_k2 = 2.0 * k2
    xc0, x0, x1, x2, x3, x4, x5, x6, x7 = row_setup(X, rows, n, two_k2, D, DP, BLOCK_D, DOT)

    lo = pid_s * cols_per_split
    hi = tl.minimum(lo + cols_per_split, m)
    M = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    S = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        # Columns past the split load h = -inf: they drop out of the max and the sum.
        h = tl.load(H + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
        yn = tl.load(YN + cols, mask=col_ok, other=0.0)
        u = h * TL_LOG2E - k2 * yn
        t = tile_logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, X, Y, rows, cols, u, n, hi, two_k2,
                    D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
        M, alpha, p = online_step(M, t)
        S = S * alpha + tl.sum(p, axis=1)

    row_ok = rows < n
    if SPLIT:
        tl.store(OUT + rows, M + tl.log2(S), mask=row_ok)
    else:
        # A row with no finite term: M = -inf and log2(S) = -inf, so out = -inf
        # (or +inf for softmin), never NaN.
        xn = tl.load(XN + rows, mask=row_ok, other=0.0)
        out = out_scale * (M + tl.log2(S) - k2 * xn)
        tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["n", "splits"])
def _lse_merge_kernel(PART, XN, OUT, n, splits, stride_ps, stride_pb, stride_xnb, stride_ob,
                      k2, out_scale, BLOCK: tl.constexpr):
    """Merge the partial log2-sum-exps of the column splits, in a fixed order."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    PART += b * stride_pb
    M = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for s in range(0, splits):
        M = tl.maximum(M, tl.load(PART + s * stride_ps + rows, mask=row_ok, other=float("-inf")))
    shift = tl.where(M == float("-inf"), 0.0, M)
    S = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        S += tl.exp2(tl.load(PART + s * stride_ps + rows, mask=row_ok, other=float("-inf")) - shift)
    xn = tl.load(XN + b * stride_xnb + rows, mask=row_ok, other=0.0)
    out = out_scale * (M + tl.log2(S) - k2 * xn)
    tl.store(OUT + b * stride_ob + rows, out.to(OUT.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------

_LSE_LAUNCH = TunedLaunch(_lse_kernel)


def _validate(fn, x, y, h, eps, cost_scale):
    geo = points(fn, x, y, batch="broadcast", max_batch=MAX_BATCH)
    vector(geo, "h", h, geo.m, shared=True, wide=True)
    eps = positive_scalar(fn, "eps", eps)
    cost_scale = positive_scalar(fn, "cost_scale", cost_scale)
    finite(fn, {"x": x, "y": y, "h": h}, allow_neg_inf=("h",))
    return geo, eps, cost_scale


def _lse_triton(geo, x, y, h, eps, cost_scale, precision, out_scale, forced_splits=None):
    # Potentials of half points are float32: costs pass 65504 for points about 256 apart.
    out = torch.empty(geo.shape(geo.n), device=geo.device, dtype=compute_dtype(geo.dtype))
    if geo.n == 0 or geo.m == 0:
        return out.fill_(float("-inf") * (1.0 if out_scale > 0 else -1.0))
    pair = prepare_pair(x, y, precision)
    h = unit_last(h)
    k2 = pair.k2(cost_scale, eps)
    splits, cols = column_splits(cdiv(geo.n, SPLIT_ROW_TILE) * geo.B, geo.m, sm_count(geo.device),
                                 forced=forced_splits)
    if splits > 1:
        target = torch.empty((splits, geo.B, geo.n), device=geo.device, dtype=torch.float32)
        t_strides = (target.stride(1), target.stride(0))
    else:
        target = out
        t_strides = (batch_stride(out, 1), 0)
    grid = lambda meta: (cdiv(geo.n, meta["BLOCK_M"]), splits, geo.B)  # noqa: E731
    P = PreparedPair
    n_b, m_b = bucket(geo.n), bucket(geo.m)
    with device_guard(geo.device):
        key = (n_b, m_b, pair.DP, pair.D, pair.DOT, pair.PREC, min(splits, 2), x.dtype, h.dtype)
        _LSE_LAUNCH(
            key, grid,
            pair.x, pair.y, pair.xn, pair.yn, h, target,
            geo.n, geo.m, cols,
            P.bstride(pair.x), P.bstride(pair.y), P.bstride(pair.xn), P.bstride(pair.yn),
            batch_stride(h, 1), *t_strides,
            k2, out_scale,
            n_b, m_b, min(splits, 2),
            D=pair.D, DP=pair.DP, BLOCK_D=pair.BLOCK_D, D_CHUNKS=pair.D_CHUNKS,
            DOT=pair.DOT, CPREC=pair.PREC, SPLIT=splits > 1,
        )
        if splits > 1:
            block = 256 if not interpreting() else 32
            _lse_merge_kernel[(cdiv(geo.n, block), geo.B)](
                target, pair.xn, out, geo.n, splits,
                target.stride(0), target.stride(1), P.bstride(pair.xn), batch_stride(out, 1),
                k2, out_scale, BLOCK=block,
            )
    return out


def lse_cost(x, y, h, *, eps, cost_scale=1.0, backend=None, precision=None, _splits=None):
    r"""Streaming log-sum-exp of ``h_j - C_ij / eps`` over the columns.

    Parameters
    ----------
    x : Tensor, shape (n, d) or (B, n, d)
        Row points.
    y : Tensor, shape (m, d) or (B, m, d)
        Column points (same dtype and device as ``x``).
    h : Tensor, shape (m,) or (B, m)
        Column log-weights; ``-inf`` marks a zero weight. Same dtype as ``x``
        (float32 is also accepted when ``x`` is float16/bfloat16). An unbatched
        ``h`` is shared by all entries of a batched call.
    eps : float
        Entropic regularisation, positive. A runtime argument of the kernel:
        changing it neither recompiles nor re-tunes.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2`` (1/2 for GeomLoss' p = 2).
    backend : {None, "auto", "triton", "torch"}
        None or "auto": Triton for CUDA tensors of dtype float32/float16/bfloat16,
        the torch reference otherwise. "triton" on CPU needs TRITON_INTERPRET=1.
    precision : {None, "ieee", "tf32", "tf32x3"}
        Tensor-core precision of the fp32 dots (Triton only; None means
        ``DEFAULT_PRECISION`` = "tf32x3", accurate to fp32 level).

    Returns
    -------
    Tensor, shape (n,) or (B, n), dtype of ``x`` (float32 for float16 / bfloat16 ``x``)
        Computed in fp32 by the Triton kernels (float64 by the reference for
        float64 inputs); half points give float32 values, which the squared
        distances of a cloud of radius above a few hundred would overflow in
        half precision. A row whose terms are all ``-inf`` gives ``-inf``.

    Other Parameters
    ----------------
    _splits : int or (int, int), optional
        Test and profiling hook: the column split of the Triton launch, forced
        (a split count, or a ``(splits, cols_per_split)`` plan; see
        ``_grid.column_splits``). The torch backend ignores it.

    Raises
    ------
    ValueError
        Shapes, devices, ``eps``, ``cost_scale``, ``backend`` or ``precision``
        invalid, or non-finite inputs (``h`` may hold ``-inf``).
    TypeError
        Non-tensor inputs or inconsistent dtypes.

    Notes
    -----
    .. math:: \mathrm{out}_i = \log \sum_j \exp(h_j - c\|x_i - y_j\|^2/\varepsilon)

    Both clouds are shifted by ``(mean(x) + mean(y)) / 2`` (the cost is
    translation invariant) and ``C`` is expanded as
    ``c (|x|^2 + |y|^2 - 2 x.y)`` with fp32 norms. Time O(n m d), memory
    O((n + m) d).

    Examples
    --------
    >>> import math, torch
    >>> from otlinop.kernels import lse_cost
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    >>> h = torch.full((4,), -math.log(4.0), dtype=torch.float64)
    >>> lse_cost(x, y, h, eps=0.1).shape
    torch.Size([5])
    """
    geo, eps, cost_scale = _validate(_FN_LSE, x, y, h, eps, cost_scale)
    precision = resolve_precision(_FN_LSE, precision)
    if resolve_backend(_FN_LSE, backend, x) == "torch":
        return lse_torch(x, y, h, eps, cost_scale)
    return _lse_triton(geo, x, y, h, eps, cost_scale, precision, LN2, _splits)


def softmin(x, y, h, *, eps, cost_scale=1.0, backend=None, precision=None, _splits=None):
    r"""Entropic soft-minimum ``-eps * lse_cost(x, y, h)``: the Sinkhorn update.

    Parameters
    ----------
    x, y, h, eps, cost_scale, backend, precision
        As in :func:`lse_cost`.

    Returns
    -------
    Tensor, shape (n,) or (B, n), dtype of ``x`` (float32 for float16 / bfloat16 ``x``)
        ``+inf`` on a row whose terms are all ``-inf``.

    Other Parameters
    ----------------
    _splits
        As in :func:`lse_cost`.

    Raises
    ------
    ValueError, TypeError
        As in :func:`lse_cost`.

    Notes
    -----
    .. math:: \mathrm{smin}(h)_i = -\varepsilon \log \sum_j \exp(h_j - C_{ij}/\varepsilon)

    The balanced Sinkhorn updates are ``f = softmin(x, y, log_b + g / eps)``
    and ``g = softmin(y, x, log_a + f / eps)``. The factor ``-eps`` is fused
    into the kernel's final store.

    Examples
    --------
    >>> import math, torch
    >>> from otlinop.kernels import softmin
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    >>> log_b = torch.full((4,), -math.log(4.0), dtype=torch.float64)
    >>> f = softmin(x, y, log_b, eps=0.1)  # one half Sinkhorn step from g = 0
    """
    geo, eps, cost_scale = _validate(_FN_SOFTMIN, x, y, h, eps, cost_scale)
    precision = resolve_precision(_FN_SOFTMIN, precision)
    if resolve_backend(_FN_SOFTMIN, backend, x) == "torch":
        return -eps * lse_torch(x, y, h, eps, cost_scale)
    return _lse_triton(geo, x, y, h, eps, cost_scale, precision, -eps * LN2, _splits)


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------


def reciprocal(eps):
    """``1 / eps`` in float64: a float for a float, a 0-d float64 tensor for a tensor. The torch
    references multiply by it, so that an eps held on the device (a cached CUDA graph's
    schedule) gives the numbers of the same eps passed as a float: CUDA divides by a host
    scalar as a product with its reciprocal, and by a device tensor exactly."""
    return 1.0 / eps if not isinstance(eps, torch.Tensor) else 1.0 / eps.to(torch.float64)


def lse_torch(x, y, h, eps, cost_scale):
    """:func:`lse_cost_torch` without the checks: (n,) or (B, n) in ``compute_dtype(x.dtype)``
    (softmin_pair's reference too)."""
    dtype = compute_dtype(x.dtype)
    # A product with 1 / eps (computed in float64): the same numbers whether eps is a float
    # or a 0-d tensor (a schedule in device memory), on every device.
    inv_eps = reciprocal(eps)
    xc, yc, xn, yn = centred_points(x, y, dtype)
    h3 = as_batched(h, 1).to(dtype)
    B = max(xc.shape[0], yc.shape[0], h3.shape[0])
    n, m = xc.shape[1], yc.shape[1]
    out = torch.empty((B, n), device=x.device, dtype=dtype)
    if m == 0:
        out.fill_(float("-inf"))
    # logsumexp allocates about two more (B, rows, m) temporaries.
    for rows in row_blocks(n, m, B, out.element_size(), temporaries=3):
        logits = cost_block(xc, yc, xn, yn, rows, cost_scale).mul_(-inv_eps).add_(h3[:, None, :])
        out[:, rows] = torch.logsumexp(logits, dim=-1)
    if not (x.ndim == 3 or y.ndim == 3):
        out = out[0]
    return out


def lse_cost_torch(x, y, h, *, eps, cost_scale=1.0):
    """Torch reference of :func:`lse_cost` (same arguments but backend/precision).

    Works on any device in float64, float32 (and half inputs, computed and
    returned in float32). Processes row blocks whose (B, rows, m) temporaries stay under
    ``config.torch_block_bytes``; never allocates n x m at once for large inputs.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import lse_cost_torch
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> lse_cost_torch(x, x, torch.zeros(5, dtype=torch.float64), eps=1.0).shape
    torch.Size([5])
    """
    _, eps, cost_scale = _validate("lse_cost_torch", x, y, h, eps, cost_scale)
    return lse_torch(x, y, h, eps, cost_scale)


def softmin_torch(x, y, h, *, eps, cost_scale=1.0):
    """Torch reference of :func:`softmin`: ``-eps * lse_cost_torch(...)``."""
    _, eps, cost_scale = _validate("softmin_torch", x, y, h, eps, cost_scale)
    return -eps * lse_torch(x, y, h, eps, cost_scale)
