"""Both soft-min updates of a pair of potentials in one streaming pass.

For ``C_ij = c |x_i - y_j|^2`` and potentials ``(f, g)`` this computes

    sf_i = -eps LSE_j (log b_j + g_j / eps - C_ij / eps)     (the update of f)
    sg_j = -eps LSE_i (log a_i + f_i / eps - C_ij / eps)     (the update of g)

the two soft c-transforms of a symmetric Sinkhorn step (docs/math.md section 3),
from ONE evaluation of every dot ``x_i . y_j`` and ONE exponential per
entry, where two calls of :func:`otlinop.kernels.softmin` spend two of each.

Both reductions see the entries of the same plan: with the base-2 plan
logits ``s_ij = r_i + u_j + 2 k2 x_i . y_j`` (``r`` from f and log a, ``u``
from g and log b), ``sf_i`` is the LSE over j of ``s_ij - r_i`` and ``sg_j``
the LSE over i of ``s_ij - u_j``. Schedule: the (n, m) index space is cut
into R x S blocks (row ranges x column ranges, multiples of 128), one
program per block and batch entry; a program takes the column tiles of its
block in turn and, for each, streams the row tiles of its block:

- rows: each tile's row max ``mt_i`` and ``p_ij = exp2(s_ij - r_i - mt_i)``
  (the one exponential) give the tile's exact row (max, sum), merged into
  the block's running pair of each row (a small scratch buffer owned by the
  program, L2-resident);
- columns: ``p_ij * exp2(mt_i + r_i - Q_i) = exp2(s_ij - Q_i)``, with Q_i
  the largest plan logit met so far at row position i of the tile, is
  summed element-wise in registers over the row tiles, then brought to the
  common shift Q = max Q_i and reduced over the rows once per column tile
  (the only cross-thread column reduction). This shift is shared by the
  columns of the tile: an entry below ``2^(Q - 126)`` underflows. The merge kernel bounds the
  mass so lost for every column; a column where it could exceed 2^-30 of
  the column's total (a column with almost no mass under the current plan,
  a zero weight) is recomputed exactly there, with a per-column max; a
  block of columns with no such column skips that work. Potentials of a
  Sinkhorn loop (c-transforms) flag no column in practice; arbitrary
  potentials at large d can flag many, and then cost up to a second pass.

The partials of the R row ranges and S column ranges are merged by one
light kernel in a fixed order: results are deterministic. Memory:
O((R + S)(n + m)) floats of partials, R x S about 2 programs per SM; never
an n x m buffer.
"""

from __future__ import annotations

import functools
import math

import torch

from .._checks import Geometry, finite, points, positive_scalar, vector
from ._dispatch import interpreting, resolve_backend, resolve_precision
from ._grid import MAX_BATCH, PROGRAMS_PER_SM, batch_stride, device_guard, sm_count, split_plan, unit_last
from ._layout import PreparedPair, prepare_pair
from ._reference import compute_dtype
from ._tiles import LN2, LOG2E, mma, online_step, plan_bias, row_setup, store_in_place, tile_logits
from ._triton import cdiv, tl, triton
from ._tuning import AUTOTUNE_DISK_CACHE, TunedLaunch, bucket, pruner
from .softmin import LSE_CONFIGS, lse_fits, lse_torch, reciprocal

__all__ = ["softmin_pair", "softmin_pair_cat", "softmin_pair_torch", "softmin_self"]

_FN = "softmin_pair"
_FN_SELF = "softmin_self"

#: A range (rows or columns of one program) holds at least this many points:
#: smaller ranges cost more in partials and merging than they add in occupancy.
MIN_RANGE = 256
#: Column ranges per row range (about): fewer, longer row ranges amortise the
#: one cross-thread reduction of each column tile over more row tiles.
COLUMN_RANGES_PER_ROW_RANGE = 4
#: A column is recomputed exactly when the mass its partial sums may have
#: lost to underflow can exceed 2^-LOSS_BITS of its total.
LOSS_BITS = 30
#: Rows of at most this many stored features (d <= 16; d <= 5 for a split
#: "tf32x3" pair) issue the next tile's dot before the current tile's
#: exponentials. H100, n = m = 50k, per pass: 1.57 ms against 1.78 ms at
#: d = 3, but 2.66 against 2.54 ms at d = 64 (tf32), hence the bound.
PIPELINE_MAX_DP = 16
_PIPELINE_MAX_DP = tl.constexpr(PIPELINE_MAX_DP)


# --------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------

# The candidate tiles are softmin's (LSE_CONFIGS: the same stream of exp-bound tiles);
# this pruning adds the registers of the column accumulator.


def _pair_fits(cfg, args):
    # The column accumulator stays in registers beside the tile: a 128 x 128
    # tile needs 8 warps.
    if cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] > 128 * 64 and cfg.num_warps < 8:
        return False
    return lse_fits(cfg, args)


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.autotune(
    configs=LSE_CONFIGS,
    # Bucketed sizes and the layout only: eps is a runtime float.
    key=["N_BUCKET", "M_BUCKET", "DP", "DOT", "CPREC", "SELF"],
    prune_configs_by={"early_config_prune": pruner(_pair_fits)},
    **AUTOTUNE_DISK_CACHE,
)
@triton.jit(do_not_specialize=["n", "m", "rows_per_range", "cols_per_range"])
def _pair_kernel(
    X, Y, XN, YN, F, G, LOG_A, LOG_B,
    RM, RS, CM, CS, BLOCKS,
    n, m, rows_per_range, cols_per_range,
    stride_xb, stride_yb, stride_xnb, stride_ynb, stride_fb, stride_gb, stride_lab, stride_lbb,
    stride_rp, stride_rb, stride_cp, stride_cb,
    k2,          # numerator of cost_scale * log2(e) / eps (over the stored points' scale^2)
    inv_eps2,    # numerator of log2(e) / eps: log2(e)
    eps,         # eps (float), or EPS_IN_MEMORY: read from the 0-d tensor EPS (any tensor otherwise)
    EPS,
    N_BUCKET, M_BUCKET,  # autotuning keys only
    D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    DOT: tl.constexpr, CPREC: tl.constexpr,
    HAS_LOG_A: tl.constexpr, HAS_LOG_B: tl.constexpr,
    # eps from device memory: one compiled launch serves every eps of a schedule
    # (a captured CUDA graph replays with new values copied into EPS).
    EPS_IN_MEMORY: tl.constexpr,
    # SELF: the problem (x, x) of softmin_self; program i takes the block
    # BLOCKS[i] = (r, s), r <= s, of the upper triangle.
    SELF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Tensor-core dots over one feature chunk: the column tile's points are
    # loaded once per column tile (else tile_logits reloads them at every tile).
    RESIDENT_Y: tl.constexpr = DOT == 0 and D_CHUNKS == 1
    PIPE: tl.constexpr = RESIDENT_Y and DP <= _PIPELINE_MAX_DP
    if SELF:
        pid_r = tl.load(BLOCKS + 2 * tl.program_id(0))
        pid_s = tl.load(BLOCKS + 2 * tl.program_id(0) + 1)
    else:
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
    # A diagonal block of the self problem gives its rows only (its columns
    # are the same points: they would count the block twice).
    with_cols = (not SELF) or (pid_r != pid_s)
    b = tl.program_id(2).to(tl.int64)
    X += b * stride_xb
    Y += b * stride_yb
    XN += b * stride_xnb
    YN += b * stride_ynb
    F += b * stride_fb
    G += b * stride_gb
    LOG_A += b * stride_lab
    LOG_B += b * stride_lbb
    # This program's partials: rows over its column range s, columns over its row range r.
    RM += b * stride_rb + pid_s * stride_rp
    RS += b * stride_rb + pid_s * stride_rp
    CM += b * stride_cb + pid_r * stride_cp
    CS += b * stride_cb + pid_r * stride_cp

    k2, inv_eps2, eps_used = _over_eps(k2, inv_eps2, eps, EPS, EPS_IN_MEMORY)
    two_k2 = 2.0 * k2
    row_lo = pid_r * rows_per_range
    row_hi = tl.minimum(row_lo + rows_per_range, n)
    col_lo = pid_s * cols_per_range
    col_hi = tl.minimum(col_lo + cols_per_range, m)
    zero_u = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for col_start in range(col_lo, col_hi, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_ok = cols < col_hi
        # Column bias (from g, log b): -inf past the range.
        u = plan_bias(G, LOG_B, YN, cols, col_ok, inv_eps2, k2, HAS_LOG_B)
        u = tl.where(col_ok, u, float("-inf"))
        first_col = col_start == col_lo
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Running column shift per row position of the tile (no cross-warp
        # reduction in the loop; merged once per column tile below).
        qv = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        if RESIDENT_Y:
            # The column tile's points stay in registers for the whole row stream.
            feats = tl.arange(0, BLOCK_D)
            yT = tl.trans(tl.load(Y + cols[:, None] * DP + feats[None, :], mask=col_ok[:, None], other=0.0))
            if PIPE:
                rows0 = row_lo + tl.arange(0, BLOCK_M)
                xt0 = tl.load(X + rows0[:, None] * DP + feats[None, :], mask=(rows0 < row_hi)[:, None], other=0.0)
                w_next = mma(xt0, yT, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), CPREC)
        for row_start in range(row_lo, row_hi, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_hi
            # The running row pair of this column range, loaded early (used last).
            mo = tl.load(RM + rows, mask=row_ok & (not first_col), other=float("-inf"))
            so = tl.load(RS + rows, mask=row_ok & (not first_col), other=0.0)
            r = plan_bias(F, LOG_A, XN, rows, row_ok, inv_eps2, k2, HAS_LOG_A)
            r = tl.where(row_ok, r, float("-inf"))
            if PIPE:
                # The next tile's dot is issued before this tile's exponentials.
                w = two_k2 * w_next
                rows_n = rows + BLOCK_M
                xt = tl.load(X + rows_n[:, None] * DP + feats[None, :], mask=(rows_n < row_hi)[:, None], other=0.0)
                w_next = mma(xt, yT, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), CPREC)
            elif RESIDENT_Y:
                xt = tl.load(X + rows[:, None] * DP + feats[None, :], mask=row_ok[:, None], other=0.0)
                w = two_k2 * mma(xt, yT, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), CPREC)
            else:
                xc0, x0, x1, x2, x3, x4, x5, x6, x7 = row_setup(X, rows, row_hi, two_k2, D, DP, BLOCK_D, DOT)
                w = tile_logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, X, Y, rows, cols, zero_u, row_hi, col_hi,
                            two_k2, D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
            # Rows: this tile's exact (max, sum), the one exp2 per entry.
            mt, _, p = online_step(tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32), w + u[None, :])
            st = tl.sum(p, axis=1)
            mn = tl.maximum(mo, mt)
            sh = tl.where(mn == float("-inf"), 0.0, mn)
            sn = so * tl.exp2(mo - sh) + st * tl.exp2(mt - sh)
            if PIPE:
                # Every thread has read this tile's old pair (in the layout of
                # the loads) before any thread writes the new one (in the
                # layout of the tile's rows): one barrier, where tl.store
                # re-lays the vectors out through shared memory behind two
                # barriers each. H100, 50k, 64 x 128 tiles: 1.35 against
                # 1.50 ms at d = 3, but 2.23 against 2.01 ms at d = 64
                # (tf32), hence only on the pipelined path.
                tl.debug_barrier()
                store_in_place(RM + rows, mn, row_ok)
                store_in_place(RS + rows, sn, row_ok)
            else:
                tl.store(RM + rows, mn, mask=row_ok)
                tl.store(RS + rows, sn, mask=row_ok)
            # Columns: p_ij exp2(mt_i + r_i - q_i) = exp2(s_ij - q_i), q_i the
            # largest plan logit met at this row position (rescaled when it grows).
            # (-inf everywhere so far: shift by 0, add zeros, never NaN.)
            if with_cols:
                top = mt + r
                qn = tl.maximum(qv, top)
                qs = tl.where(qn == float("-inf"), 0.0, qn)
                acc = acc * tl.exp2(qv - qs)[:, None] + p * tl.exp2(top - qs)[:, None]
                qv = qn
        # One cross-thread reduction per column tile, to the common shift q.
        # The column's partial log2-sum is CM + log2(CS), CM = q - u_j (+inf
        # for u_j = -inf: flagged by the merge).
        q = tl.max(qv, axis=0)
        colsum = tl.sum(acc * tl.exp2(qv - tl.where(q == float("-inf"), 0.0, q))[:, None], axis=0)
        if with_cols:
            tl.store(CM + cols, tl.where(u == float("-inf"), float("inf"), q - u), mask=col_ok)
            tl.store(CS + cols, colsum, mask=col_ok)
        # The next column tile reads the row partials stored above, possibly
        # by other threads of this program.
        tl.debug_barrier()


@triton.jit(do_not_specialize=["n_rows", "n", "m", "row_parts", "col_parts"])
def _pair_merge_kernel(
    RM, RS, CM, CS, X, Y, XN, YN, F, LOG_A, OUT, PREV,
    n_rows, n, m, row_parts, col_parts,
    stride_rp, stride_rb, stride_cp, stride_cb,
    stride_xb, stride_yb, stride_xnb, stride_ynb, stride_fb, stride_lab, stride_ob, stride_pb,
    k2, inv_eps2, out_scale, max_loss, eps, EPS,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    DOT: tl.constexpr, CPREC: tl.constexpr, HAS_LOG_A: tl.constexpr,
    FIXUP: tl.constexpr, EPS_IN_MEMORY: tl.constexpr, AVERAGE: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Merge the partial (max, sum) pairs, in a fixed order, into OUT = [sf | sg].

    With AVERAGE, OUT receives the averaged step ``PREV + (S - PREV) / 2``
    instead of the soft-mins S (PREV laid out as OUT: the potentials
    ``[f | g]`` that the soft-mins update), which saves the loop an
    elementwise launch per step.

    A column whose partial sums may have lost more than 2^-LOSS_BITS of its
    mass to underflow (or whose weight is zero) is recomputed here exactly:
    a streaming LSE over all the points x with a per-column max (the roles
    of the soft-min kernel swapped). A block of columns without such a
    column skips that loop.
    """
    # As in _pair_kernel; out_scale arrives as -ln 2.
    k2, inv_eps2, eps = _over_eps(k2, inv_eps2, eps, EPS, EPS_IN_MEMORY)
    out_scale = out_scale * eps
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    # OUT = [rows (n_rows: n, or 0 for softmin_self) | columns (m)].
    row_programs = tl.cdiv(n_rows, BLOCK)
    is_row = pid < row_programs
    if is_row:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        ok = idx < n_rows
        PM = RM + b * stride_rb
        PS = RS + b * stride_rb
        stride_p = stride_rp
        parts = row_parts
        NORM = XN + b * stride_xnb
        dst = OUT + b * stride_ob + idx
        src = PREV + b * stride_pb + idx
    else:
        idx = (pid - row_programs) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < m
        PM = CM + b * stride_cb
        PS = CS + b * stride_cb
        stride_p = stride_cp
        parts = col_parts
        NORM = YN + b * stride_ynb
        dst = OUT + b * stride_ob + n_rows + idx
        src = PREV + b * stride_pb + n_rows + idx
    mx = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for p in range(0, parts):
        mx = tl.maximum(mx, tl.load(PM + p * stride_p + idx, mask=ok, other=float("-inf")))
    finite = mx < float("inf")
    shift = tl.where((mx == float("-inf")) | (~finite), 0.0, mx)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(0, parts):
        pm = tl.load(PM + p * stride_p + idx, mask=ok, other=float("-inf"))
        total += tl.load(PS + p * stride_p + idx, mask=ok, other=0.0) * tl.exp2(pm - shift)
    norm = tl.load(NORM + idx, mask=ok, other=0.0)
    lse = mx + tl.log2(total)
    if FIXUP and not is_row:
        # Entries lost to underflow are each below 2^(mx - 126): at most
        # n 2^(mx - 126) in all, against a total of 2^mx * total.
        flag = ok & ((~finite) | ((mx > float("-inf")) & (tl.log2(total) < max_loss)))
        if tl.max(flag.to(tl.int32), axis=0) > 0:
            lse = tl.where(flag, _column_lse(Y + b * stride_yb, X + b * stride_xb, XN + b * stride_xnb,
                                             F + b * stride_fb, LOG_A + b * stride_lab, idx, n, m, k2,
                                             inv_eps2, D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, HAS_LOG_A,
                                             BLOCK, BLOCK_N), lse)
    # No finite term: lse = -inf, out = +inf (soft-min), never NaN.
    out = out_scale * (lse - k2 * norm)
    if AVERAGE:
        # torch.lerp's formula at weight 1/2: the same numbers as the loop's torch.lerp.
        prev = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        out = out - (out - prev) * 0.5
    tl.store(dst, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _over_eps(k2_num, log2e, eps_value, EPS, EPS_IN_MEMORY: tl.constexpr):
    """(k2, inv_eps2, eps) from the numerators and eps, the float argument or (EPS_IN_MEMORY)
    the value in ``EPS``: the same fp32 eps either way, and correctly rounded divisions,
    so that both ways give the same scalars, hence the same soft-mins bitwise (a cached
    CUDA graph of a schedule in memory replays what an eager call computes)."""
    if EPS_IN_MEMORY:
        eps = tl.load(EPS).to(tl.float32)
    else:
        eps = eps_value
    return tl.math.div_rn(k2_num, eps), tl.math.div_rn(log2e, eps), eps


@triton.jit
def _column_lse(Y, X, XN, F, LOG_A, js, n, m, k2, inv_eps2,
                D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                DOT: tl.constexpr, CPREC: tl.constexpr, HAS_LOG_A: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Exact base-2 LSE over all i of r_i + 2 k2 x_i . y_j for the columns ``js``.

    (The soft-min kernel with the roles swapped: per-column running max.)
    """
    two_k2 = 2.0 * k2
    yc0, y0, y1, y2, y3, y4, y5, y6, y7 = row_setup(Y, js, m, two_k2, D, DP, BLOCK_D, DOT)
    M = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    S = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        ii = start + tl.arange(0, BLOCK_N)
        i_ok = ii < n
        r = plan_bias(F, LOG_A, XN, ii, i_ok, inv_eps2, k2, HAS_LOG_A)
        r = tl.where(i_ok, r, float("-inf"))
        t = tile_logits(yc0, y0, y1, y2, y3, y4, y5, y6, y7, Y, X, js, ii, r, m, n, two_k2,
                    D, DP, BLOCK_D, D_CHUNKS, DOT, CPREC, BLOCK_M, BLOCK_N)
        M, alpha, p = online_step(M, t)
        S = S * alpha + tl.sum(p, axis=1)
    return M + tl.log2(S)


# --------------------------------------------------------------------------
# Block grid
# --------------------------------------------------------------------------


def range_plan(n: int, m: int, batch: int, sms: int | None, *, forced=None):
    """``((R, rows_per_range), (S, cols_per_range))`` of the block grid (see _gpu_range_plan).

    ``sms``: the SM count of the GPU (``_grid.sm_count``); None (the CPU, the
    interpreter) gives one block. ``forced``: ``(R, S)`` range counts, the
    launchers' ``_ranges`` hook (tests exercise several ranges at small sizes).
    """
    if forced is not None:
        r, s = forced
        return split_plan(n, r), split_plan(m, s)
    if sms is None:
        return split_plan(n, 1), split_plan(m, 1)
    return _gpu_range_plan(n, m, batch, sms)


@functools.lru_cache(maxsize=256)
def _gpu_range_plan(n: int, m: int, batch: int, sms: int):
    """The block grid on a GPU of ``sms`` SMs.

    R x S x batch is at most ``PROGRAMS_PER_SM`` programs per SM (a second,
    nearly empty wave would double the time) and as close to it as the
    128-aligned ranges allow, with about ``COLUMN_RANGES_PER_ROW_RANGE``
    column ranges per row range (scaled by m / n). A function of the sizes
    only, so results are deterministic.
    """
    target = max(1, (PROGRAMS_PER_SM * sms) // batch)
    ratio = COLUMN_RANGES_PER_ROW_RANGE * m / max(n, 1)
    best = None
    for r in range(1, max(1, n // MIN_RANGE) + 1):
        rows = split_plan(n, r)
        if rows[0] > target:
            break
        cols = split_plan(m, min(target // rows[0], max(1, m // MIN_RANGE)))
        programs = rows[0] * cols[0]
        # Most programs first, then the aspect closest to the wanted ratio.
        score = (programs, -abs(math.log(max(cols[0], 1) / (rows[0] * ratio))))
        if best is None or score > best[0]:
            best = (score, rows, cols)
    return best[1], best[2]


def self_range_plan(n: int, batch: int, sms: int | None, *, forced=None):
    """``(T, rows_per_range)`` of the self problem: T ranges, T (T + 1) / 2 blocks.

    ``sms`` as in :func:`range_plan`; ``forced``: T, the ``_ranges`` hook of :func:`softmin_self`.
    """
    if forced is not None:
        return split_plan(n, forced)
    if sms is None:
        return split_plan(n, 1)
    return _gpu_self_range_plan(n, batch, sms)


@functools.lru_cache(maxsize=256)
def _gpu_self_range_plan(n: int, batch: int, sms: int):
    """The most ranges T whose T (T + 1) / 2 blocks x batch fit the programs of one wave."""
    target = max(1, (PROGRAMS_PER_SM * sms) // batch)
    best = split_plan(n, 1)
    for t in range(2, max(1, n // MIN_RANGE) + 1):
        plan = split_plan(n, t)
        if plan[0] * (plan[0] + 1) // 2 > target:
            break
        best = plan
    return best


_BLOCK_TABLES: dict = {}


def _upper_blocks(t: int, device: torch.device) -> torch.Tensor:
    """The (r, s) pairs with r <= s < t, as an int32 (T (T + 1) / 2, 2) tensor on ``device``."""
    key = (t, str(device))
    table = _BLOCK_TABLES.get(key)
    if table is None:
        pairs = [(r, s) for r in range(t) for s in range(r, t)]
        table = torch.tensor(pairs, dtype=torch.int32, device=device).contiguous()
        _BLOCK_TABLES[key] = table
    return table


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------

_PAIR_LAUNCH = TunedLaunch(_pair_kernel)


def _validate(fn, x, y, f, g, log_a, log_b, eps, cost_scale):
    geo = points(fn, x, y, batch="broadcast", max_batch=MAX_BATCH)
    vector(geo, "f", f, geo.n, shared=True, wide=True)
    vector(geo, "g", g, geo.m, shared=True, wide=True)
    vector(geo, "log_a", log_a, geo.n, optional=True, shared=True, wide=True)
    vector(geo, "log_b", log_b, geo.m, optional=True, shared=True, wide=True)
    eps = positive_scalar(fn, "eps", eps)
    cost_scale = positive_scalar(fn, "cost_scale", cost_scale)
    finite(fn, {"x": x, "y": y, "f": f, "g": g, "log_a": log_a, "log_b": log_b}, allow_neg_inf=("log_a", "log_b"))
    return geo, eps, cost_scale


def _pair_triton(geo, x, y, f, g, log_a, log_b, eps, cost_scale, precision, forced_ranges=None, fixup=True,
                 average=None):
    # float32 potentials for half points, as softmin.
    out = torch.empty(geo.shape(geo.n + geo.m), device=geo.device, dtype=compute_dtype(geo.dtype))
    _check_average(average, out)
    if geo.n == 0 or geo.m == 0:
        return averaged_step(out.fill_(float("inf")), average)
    pair = prepare_pair(x, y, precision)
    f, g, log_a, log_b = (unit_last(t) for t in (f, g, log_a, log_b))
    (R, rows), (S, cols) = range_plan(geo.n, geo.m, geo.B, sm_count(geo.device), forced=forced_ranges)
    # Partial (max, sum) pairs of the rows (S per row) and of the columns (R
    # per column): one allocation, [maxima | sums] x batch x [rows | columns].
    part = torch.empty((2, geo.B, S * geo.n + R * geo.m), device=geo.device, dtype=torch.float32)
    rm, rs = part[0], part[1]
    cm, cs = part[0, :, S * geo.n:], part[1, :, S * geo.n:]
    part_strides = (geo.n, part.stride(1), geo.m, part.stride(1))   # (partial, batch) rows, columns
    la = log_a if log_a is not None else f
    lb = log_b if log_b is not None else g
    _launch(geo, pair, f, g, la, lb, log_a is not None, log_b is not None, eps, cost_scale, out,
            grid=(R, S, geo.B), blocks=part, ranges=(rows, cols), partials=(rm, rs, cm, cs),
            strides=part_strides, n_rows=geo.n, parts=(S, R), self_=False, fixup=fixup, average=average)
    return out


def averaged_step(s, average):
    """``lerp(average, s, 1/2)`` (the merge kernel's AVERAGE), ``s`` without ``average``: the
    averaged step of loops whose soft-mins come from elsewhere (torch references, rings)."""
    return s if average is None else torch.lerp(average, s.to(average.dtype), 0.5)


def _check_average(average, out) -> None:
    if average is not None and average.shape != out.shape:
        raise ValueError(f"softmin: the potentials to average have shape {tuple(average.shape)}, "
                         f"the soft-mins {tuple(out.shape)}")


def _launch(geo, pair, f, g, la, lb, has_log_a, has_log_b, eps, cost_scale, out, *, grid, blocks, ranges,
            partials, strides, n_rows, parts, self_, fixup, average=None):
    """Launch the fused kernel on ``grid`` and the merge into ``out`` (both problems).

    ``partials`` = (row maxima, row sums, column maxima, column sums) and
    ``strides`` their (partial, batch) strides; ``parts`` = (row partials,
    column partials) per point; ``n_rows``: the size of the row section of
    ``out`` (0 for the self problem, whose points all merge as columns);
    ``blocks``: the block table of the self problem (any tensor otherwise);
    ``fixup``: whether the merge recomputes flagged columns exactly (tests
    switch it off to see them); ``average``: None, or the potentials that
    ``out`` updates (its shape and dtype, unit last stride), when ``out``
    is to hold the averaged step ``lerp(average, S, 1/2)``.
    """
    P = PreparedPair
    bs = batch_stride
    n_b, m_b = bucket(geo.n), bucket(geo.m)
    # The kernels divide by eps (_over_eps): its numerators go in, and eps as a float or,
    # for a tensor eps (a schedule on the device), as a pointer.
    in_memory = isinstance(eps, torch.Tensor)
    k2 = pair.k2(cost_scale, 1.0)
    eps_args = (1.0, eps) if in_memory else (eps, out)
    layout = dict(D=pair.D, DP=pair.DP, BLOCK_D=pair.BLOCK_D, D_CHUNKS=pair.D_CHUNKS, DOT=pair.DOT,
                  CPREC=pair.PREC)
    prepared_strides = (P.bstride(pair.x), P.bstride(pair.y), P.bstride(pair.xn), P.bstride(pair.yn))
    with device_guard(geo.device):
        key = (n_b, m_b, pair.DP, pair.D, pair.DOT, pair.PREC, geo.dtype, f.dtype, g.dtype,
               has_log_a and la.dtype, has_log_b and lb.dtype, self_)
        _PAIR_LAUNCH(
            key, grid,
            pair.x, pair.y, pair.xn, pair.yn, f, g, la, lb,
            *partials, blocks,
            geo.n, geo.m, *ranges,
            *prepared_strides,
            bs(f, 1), bs(g, 1), bs(la, 1), bs(lb, 1),
            *strides,
            k2, LOG2E, *eps_args,
            n_b, m_b,
            **layout, HAS_LOG_A=has_log_a, HAS_LOG_B=has_log_b, SELF=self_, EPS_IN_MEMORY=in_memory,
        )
        # 64 columns per merge program: the width of an exact recomputation.
        block, block_n = (32, 16) if interpreting() else (64, 64)
        programs = cdiv(n_rows, block) + cdiv(geo.m, block)
        prev = out if average is None else average
        _pair_merge_kernel[(programs, geo.B)](
            *partials, pair.x, pair.y, pair.xn, pair.yn, f, la, out, prev,
            n_rows, geo.n, geo.m, *parts,
            *strides,
            *prepared_strides,
            bs(f, 1), bs(la, 1), bs(out, 1), bs(prev, 1),
            k2, LOG2E, -LN2, math.log2(geo.n) - 126.0 + LOSS_BITS, *eps_args,
            **layout, HAS_LOG_A=has_log_a,
            FIXUP=fixup, EPS_IN_MEMORY=in_memory, AVERAGE=average is not None, BLOCK=block, BLOCK_N=block_n,
            num_warps=4,
        )


def _self_triton(geo, x, f, log_a, eps, cost_scale, precision, forced_ranges=None, fixup=True, average=None):
    out = torch.empty(geo.shape(geo.n), device=geo.device, dtype=compute_dtype(geo.dtype))
    _check_average(average, out)
    if geo.n == 0:
        return averaged_step(out, average)
    pair = prepare_pair(x, x, precision)
    f, log_a = unit_last(f), unit_last(log_a)
    la = log_a if log_a is not None else f
    T, rows = self_range_plan(geo.n, geo.B, sm_count(geo.device), forced=forced_ranges)
    blocks = _upper_blocks(T, geo.device)
    # Slot k of point i: its partial (max, sum) against range k, from the block
    # (range of i, k) as a row when k >= range of i, else as a column.
    part = torch.empty((2, geo.B, T * geo.n), device=geo.device, dtype=torch.float32)
    pm, ps = part[0], part[1]
    _launch(geo, pair, f, f, la, la, log_a is not None, log_a is not None, eps, cost_scale, out,
            grid=(blocks.shape[0], 1, geo.B), blocks=blocks, ranges=(rows, rows), partials=(pm, ps, pm, ps),
            strides=(geo.n, part.stride(1), geo.n, part.stride(1)), n_rows=0, parts=(0, T), self_=True,
            fixup=fixup, average=average)
    return out


def softmin_pair(x, y, f, g, log_a=None, log_b=None, *, eps, cost_scale=1.0, backend=None, precision=None,
                 _ranges=None, _fixup=True):
    r"""Both soft-min updates of ``(f, g)``, from one pass over the cost.

    Parameters
    ----------
    x : Tensor, shape (n, d) or (B, n, d)
        Source points.
    y : Tensor, shape (m, d) or (B, m, d)
        Target points (same dtype and device as ``x``).
    f : Tensor, shape (n,) or (B, n)
        Potential on the source points.
    g : Tensor, shape (m,) or (B, m)
        Potential on the target points.
    log_a, log_b : Tensor, shapes (n,) and (m,) (or batched), optional
        Log-weights; ``-inf`` marks a zero weight; None means 0 (weights 1).
    eps : float
        Entropic regularisation, positive; a runtime argument of the kernel
        (changing it neither recompiles nor re-tunes).
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    backend : {None, "auto", "triton", "torch"}
        As in :func:`otlinop.kernels.softmin`.
    precision : {None, "ieee", "tf32", "tf32x3"}
        As in :func:`otlinop.kernels.softmin`.

    Returns
    -------
    (sf, sg) : Tensors, shapes (n,) and (m,) (or (B, n), (B, m)), dtype of ``x`` (float32 for half ``x``)
        ``sf = softmin(x, y, log_b + g / eps)`` and ``sg = softmin(y, x, log_a
        + f / eps)``. Both are views of one (…, n + m) buffer ``[sf | sg]``.
        ``+inf`` where every term is ``-inf``.

    Other Parameters
    ----------------
    _ranges : (int, int), optional
        Test and profiling hook: the block grid of the Triton launch, forced
        to R row ranges and S column ranges (see :func:`range_plan`).
    _fixup : bool, default True
        Test hook: False skips the exact recomputation of the columns that
        may have lost mass to underflow (to show that it is needed).
        The torch backend ignores both.

    Raises
    ------
    ValueError, TypeError
        Invalid shapes, devices, dtypes, options, or non-finite inputs
        (``log_a`` and ``log_b`` may hold ``-inf``).

    Notes
    -----
    .. math::
        \mathrm{sf}_i = -\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon}, \qquad
        \mathrm{sg}_j = -\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon}

    The Triton kernel computes every dot ``x_i . y_j`` once for both
    reductions (two calls of :func:`softmin` compute it twice); the torch
    reference is the two soft-mins. Time O(n m d), memory O(n + m) beyond
    the prepared clouds.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import softmin_pair
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    >>> sf, sg = softmin_pair(x, y, torch.zeros(5, dtype=torch.float64),
    ...                       torch.zeros(4, dtype=torch.float64), eps=0.5)
    >>> sf.shape, sg.shape
    (torch.Size([5]), torch.Size([4]))
    """
    out = softmin_pair_cat(x, y, f, g, log_a, log_b, eps=eps, cost_scale=cost_scale, backend=backend,
                           precision=precision, _ranges=_ranges, _fixup=_fixup)
    n = x.shape[-2]
    return out[..., :n], out[..., n:]


def softmin_pair_cat(x, y, f, g, log_a=None, log_b=None, *, eps, cost_scale=1.0, backend=None,
                     precision=None, _ranges=None, _fixup=True):
    """:func:`softmin_pair` as the one buffer ``[sf | sg]`` of shape (n + m,) or (B, n + m).

    For loops that keep ``[f | g]`` in one tensor (one averaging op per step);
    ``_ranges`` and ``_fixup`` as in :func:`softmin_pair`.
    """
    geo, eps, cost_scale = _validate(_FN, x, y, f, g, log_a, log_b, eps, cost_scale)
    precision = resolve_precision(_FN, precision)
    if resolve_backend(_FN, backend, x) == "torch":
        return _pair_torch(x, y, f, g, log_a, log_b, eps, cost_scale)
    return _pair_triton(geo, x, y, f, g, log_a, log_b, eps, cost_scale, precision, _ranges, _fixup)


def softmin_pair_unchecked(x, y, f, g, log_a, log_b, *, eps: float, cost_scale: float, backend, precision,
                           average=None):
    """:func:`softmin_pair_cat` without the input checks, for loops that ran them once.

    The inputs must be valid (as :func:`softmin_pair` checks them); ``eps``
    and ``cost_scale`` positive floats. No host synchronisation.
    ``average``: None, or the potentials ``[f | g]`` (the output's shape):
    then the result is the averaged step ``torch.lerp(average, S, 0.5)`` of
    the soft-mins S, which the Triton path writes from its merge kernel (no
    separate launch) when ``average`` has the output's dtype.
    """
    batched = x.ndim == 3 or y.ndim == 3
    B = x.shape[0] if x.ndim == 3 else (y.shape[0] if y.ndim == 3 else 1)
    geo = Geometry(_FN, batched, B, x.shape[-2], y.shape[-2], x.shape[-1], x.dtype, x.device)
    precision = resolve_precision(_FN, precision)
    if resolve_backend(_FN, backend, x) == "torch":
        return averaged_step(_pair_torch(x, y, f, g, log_a, log_b, eps, cost_scale), average)
    if average is not None and average.dtype != compute_dtype(geo.dtype):
        return averaged_step(_pair_triton(geo, x, y, f, g, log_a, log_b, eps, cost_scale, precision), average)
    return _pair_triton(geo, x, y, f, g, log_a, log_b, eps, cost_scale, precision, average=unit_last(average))


def softmin_self(x, f, log_a=None, *, eps, cost_scale=1.0, backend=None, precision=None, _ranges=None,
                 _fixup=True):
    r"""The soft-min update of a potential on one cloud: ``softmin(x, x, log a + f / eps)``.

    The update of the debiasing potentials ``f_aa`` (and ``g_bb``) of a
    Sinkhorn divergence. The cost matrix of (x, x) is symmetric: the Triton
    kernel runs the blocks of the upper triangle only, each feeding its rows
    and (off the diagonal) its columns, from one dot and one exponential per
    entry: about half the work of :func:`otlinop.kernels.softmin`.

    Parameters
    ----------
    x : Tensor, shape (n, d) or (B, n, d)
        The points.
    f : Tensor, shape (n,) or (B, n)
        The potential.
    log_a : Tensor, shape (n,) or (B, n), optional
        Log-weights (``-inf``: a zero weight); None means 0.
    eps, cost_scale, backend, precision
        As in :func:`softmin_pair`.

    Returns
    -------
    Tensor, shape (n,) or (B, n), dtype of ``x`` (float32 for half ``x``)
        ``-eps LSE_j(log a_j + f_j / eps - C_ij / eps)``; ``+inf`` where every
        term is ``-inf``.

    Other Parameters
    ----------------
    _ranges : int, optional
        Test and profiling hook: the Triton launch's T ranges of points,
        forced (T (T + 1) / 2 blocks; see :func:`self_range_plan`).
    _fixup : bool, default True
        As in :func:`softmin_pair`.

    Raises
    ------
    ValueError, TypeError
        As in :func:`softmin_pair`.

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import softmin_self
    >>> x = torch.randn(6, 2, dtype=torch.float64)
    >>> softmin_self(x, torch.zeros(6, dtype=torch.float64), eps=0.5).shape
    torch.Size([6])
    """
    geo, eps, cost_scale = _validate(_FN_SELF, x, x, f, f, log_a, log_a, eps, cost_scale)
    precision = resolve_precision(_FN_SELF, precision)
    if resolve_backend(_FN_SELF, backend, x) == "torch":
        return _self_torch(x, f, log_a, eps, cost_scale)
    return _self_triton(geo, x, f, log_a, eps, cost_scale, precision, _ranges, _fixup)


def softmin_self_unchecked(x, f, log_a, *, eps: float, cost_scale: float, backend, precision, average=None):
    """:func:`softmin_self` without the input checks, for loops that ran them once.

    ``average``: as in :func:`softmin_pair_unchecked` (the potential ``f``'s shape).
    """
    geo = Geometry(_FN_SELF, x.ndim == 3, x.shape[0] if x.ndim == 3 else 1, x.shape[-2], x.shape[-2],
                           x.shape[-1], x.dtype, x.device)
    precision = resolve_precision(_FN_SELF, precision)
    if resolve_backend(_FN_SELF, backend, x) == "torch":
        return averaged_step(_self_torch(x, f, log_a, eps, cost_scale), average)
    if average is not None and average.dtype != compute_dtype(geo.dtype):
        return averaged_step(_self_triton(geo, x, f, log_a, eps, cost_scale, precision), average)
    return _self_triton(geo, x, f, log_a, eps, cost_scale, precision, average=unit_last(average))


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------


def _pair_torch(x, y, f, g, log_a, log_b, eps, cost_scale):
    # In the compute dtype: g / eps of half potentials would overflow.
    f, g, log_a, log_b = _promoted(x, f, g, log_a, log_b)
    inv = reciprocal(eps)     # (a product: see lse_torch)
    hb = g * inv if log_b is None else log_b + g * inv
    ha = f * inv if log_a is None else log_a + f * inv
    sf = -eps * lse_torch(x, y, hb, eps, cost_scale)
    sg = -eps * lse_torch(y, x, ha, eps, cost_scale)
    # Both are (B, .) in a batched call (x or y batched), 1-D otherwise.
    return torch.cat([sf, sg], dim=-1)


def softmin_pair_torch(x, y, f, g, log_a=None, log_b=None, *, eps, cost_scale=1.0):
    """Torch reference of :func:`softmin_pair` (same arguments but backend/precision).

    Any device, float64 included; the two soft-mins in row blocks, never an
    n x m buffer at once.
    """
    geo, eps, cost_scale = _validate("softmin_pair_torch", x, y, f, g, log_a, log_b, eps, cost_scale)
    out = _pair_torch(x, y, f, g, log_a, log_b, eps, cost_scale)
    return out[..., :geo.n], out[..., geo.n:]


def _promoted(x, *ts):
    """``ts`` in ``compute_dtype(x.dtype)`` (None passes)."""
    dtype = compute_dtype(x.dtype)
    return [None if t is None else t.to(dtype) for t in ts]


def _self_torch(x, f, log_a, eps, cost_scale):
    f, log_a = _promoted(x, f, log_a)
    inv = reciprocal(eps)
    h = f * inv if log_a is None else log_a + f * inv
    return -eps * lse_torch(x, x, h, eps, cost_scale)
