"""The ``@triton.jit`` pieces that every streaming kernel shares.

Loading a row tile of the prepared points (:func:`row_setup`), the base-2
logits ``u_j + 2 k2 x_i . y_j`` of a tile on tensor cores or FMAs
(:func:`tile_logits`, :func:`mma`), a plan's per-row or per-column bias
(:func:`plan_bias`), one step of the online log-sum-exp (:func:`online_step`),
the final scaling of a plan product by its row factor (:func:`scale_rows`)
and a store in the tile's own layout (:func:`store_in_place`). Everything
runs in base 2 (``exp2``): ``LOG2E`` and ``LN2`` convert on the host,
``TL_LOG2E`` on the device.
"""

from __future__ import annotations

from ._dispatch import interpreting
from ._triton import tl, triton

__all__ = ["LN2", "LOG2E", "TL_LOG2E", "mma", "online_step", "plan_bias", "row_setup", "scale_rows",
           "store_in_place", "tile_logits"]

#: log2(e) and ln(2), for the host side of the base-2 exponentials.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: log2(e) as a compile-time constant of the kernels.
TL_LOG2E = tl.constexpr(1.4426950408889634)

# The Triton interpreter (3.9) multiplies bfloat16 dot operands as their raw
# uint16 bits; under it, bf16 dots are computed in fp32 instead.
_INTERPRETED_C = tl.constexpr(interpreting())
_INTERPRETER_BF16_DOT = _INTERPRETED_C


@triton.jit
def store_in_place(ptrs, val, mask):
    """``tl.store(ptrs, val, mask)`` of fp32 values in the layout they are in.

    ``tl.store`` re-lays a row vector of an MMA tile out for coalescing,
    through shared memory behind two CTA-wide barriers; this element-wise
    inline store writes each thread's own values (threads holding the same
    row write the same value). Without those barriers nothing orders the
    store after other threads' loads of the same addresses: the caller
    places a ``tl.debug_barrier()`` where that matters. Plain ``tl.store``
    under the interpreter.
    """
    if _INTERPRETED_C:
        tl.store(ptrs, val, mask=mask)
    else:
        # Integer operands only: older Tritons refuse a pointer beside a float here.
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r,r", [ptrs.to(tl.int64), val.to(tl.float32).to(tl.int32, bitcast=True), mask.to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b on tensor cores; PREC only means something for fp32 operands."""
    if _INTERPRETER_BF16_DOT and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _xcol(X, rows, n, scale, k: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Feature k of the prepared row points times ``scale`` (fp32), 0 past d."""
    if k < D:
        v = scale * tl.load(X + rows * DP + k, mask=rows < n, other=0.0).to(tl.float32)
    else:
        v = 0.0
    return v


@triton.jit
def row_setup(X, rows, n, two_k2, D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT: tl.constexpr):
    """What a row tile keeps resident for the whole column stream.

    Tensor cores (DOT = 0): the first feature chunk ``xc0`` of the prepared
    points. FMAs with d <= 8 (DOT = 1): the d feature columns ``x0..x7``,
    pre-multiplied by ``2 k2`` so that a logit costs d FMAs. Unused outputs
    are the scalar 0.
    """
    if DOT == 0:
        feats = tl.arange(0, BLOCK_D)
        xc0 = tl.load(X + rows[:, None] * DP + feats[None, :], mask=(rows < n)[:, None], other=0.0)
    else:
        xc0 = 0.0
    if DOT == 1 and D <= 8:
        x0 = _xcol(X, rows, n, two_k2, 0, D, DP)
        x1 = _xcol(X, rows, n, two_k2, 1, D, DP)
        x2 = _xcol(X, rows, n, two_k2, 2, D, DP)
        x3 = _xcol(X, rows, n, two_k2, 3, D, DP)
        x4 = _xcol(X, rows, n, two_k2, 4, D, DP)
        x5 = _xcol(X, rows, n, two_k2, 5, D, DP)
        x6 = _xcol(X, rows, n, two_k2, 6, D, DP)
        x7 = _xcol(X, rows, n, two_k2, 7, D, DP)
    else:
        x0 = 0.0
        x1 = 0.0
        x2 = 0.0
        x3 = 0.0
        x4 = 0.0
        x5 = 0.0
        x6 = 0.0
        x7 = 0.0
    return xc0, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _fma_term(t, xk, Y, cols, m, k: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    if k < D:
        yk = tl.load(Y + cols * DP + k, mask=cols < m, other=0.0).to(tl.float32)
        t += xk[:, None] * yk[None, :]
    return t


@triton.jit
def tile_logits(xc0, x0, x1, x2, x3, x4, x5, x6, x7, X, Y, rows, cols, u, n, m, two_k2,
            D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
            DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Base-2 logits ``u_j + 2 k2 x_i . y_j`` of a (BLOCK_M, BLOCK_N) tile, fp32.

    ``u`` is the column bias (it holds -inf past m). The points are the
    prepared ones (centred, rows of DP entries, zero padding). DOT = 0: the
    dot on tensor cores at precision PREC, over D_CHUNKS chunks of BLOCK_D
    features (chunks past the first are reloaded from L1/L2). DOT = 1: fp32
    FMAs on the CUDA cores, exact to fp32 rounding, unrolled for d <= 8 with
    the row features resident, else a loop over the d features.
    """
    if DOT == 0:
        feats = tl.arange(0, BLOCK_D)
        col_ok = (cols < m)[:, None]
        yc = tl.load(Y + cols[:, None] * DP + feats[None, :], mask=col_ok, other=0.0)
        dot = mma(xc0, tl.trans(yc), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC)
        for c in range(1, D_CHUNKS):
            fc = c * BLOCK_D + feats
            xc = tl.load(X + rows[:, None] * DP + fc[None, :], mask=(rows < n)[:, None], other=0.0)
            yc = tl.load(Y + cols[:, None] * DP + fc[None, :], mask=col_ok, other=0.0)
            dot = mma(xc, tl.trans(yc), dot, PREC)
        t = u[None, :] + two_k2 * dot
    elif D <= 8:
        t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + u[None, :]
        t = _fma_term(t, x0, Y, cols, m, 0, D, DP)
        t = _fma_term(t, x1, Y, cols, m, 1, D, DP)
        t = _fma_term(t, x2, Y, cols, m, 2, D, DP)
        t = _fma_term(t, x3, Y, cols, m, 3, D, DP)
        t = _fma_term(t, x4, Y, cols, m, 4, D, DP)
        t = _fma_term(t, x5, Y, cols, m, 5, D, DP)
        t = _fma_term(t, x6, Y, cols, m, 6, D, DP)
        t = _fma_term(t, x7, Y, cols, m, 7, D, DP)
    else:
        dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, D):
            xk = tl.load(X + rows * DP + k, mask=rows < n, other=0.0).to(tl.float32)
            yk = tl.load(Y + cols * DP + k, mask=cols < m, other=0.0).to(tl.float32)
            dot += xk[:, None] * yk[None, :]
        t = u[None, :] + two_k2 * dot
    return t


@triton.jit
def plan_bias(POT, LOG_W, NORM, idx, ok, inv_eps2, k2, HAS_LOG_W: tl.constexpr):
    """Base-2 bias of a plan's logits along one side: log2(e) (log w + pot / eps) - k2 |z|^2.

    The columns' ``u_j`` (from g, log_b, |y_j|^2) and the rows' ``r_i`` (from f,
    log_a, |x_i|^2) of ``P_ij = exp2(r_i + u_j + 2 k2 x_i.y_j)``. Entries past
    ``ok`` read 0; absent log-weights (HAS_LOG_W False) cost no load.
    """
    bias = inv_eps2 * tl.load(POT + idx, mask=ok, other=0.0).to(tl.float32) \
        - k2 * tl.load(NORM + idx, mask=ok, other=0.0)
    if HAS_LOG_W:
        bias += TL_LOG2E * tl.load(LOG_W + idx, mask=ok, other=0.0).to(tl.float32)
    return bias


@triton.jit
def online_step(M, t):
    """One step of the streaming log-sum-exp (base 2) over a tile of logits ``t``.

    Returns the new running max, the factor rescaling the old sums, and the
    tile of exp2(t - max). A row whose logits are all -inf so far keeps max =
    -inf but is shifted by 0 instead, so that exp2(-inf - shift) = 0 and no
    (-inf) - (-inf) = NaN appears (the FlashAttention guard).
    """
    m_new = tl.maximum(M, tl.max(t, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(M - shift)
    p = tl.exp2(t - shift[:, None])
    return m_new, alpha, p


@triton.jit
def scale_rows(acc, lsc, TWO_D: tl.constexpr):
    """``acc * exp2(lsc)`` per row (``acc`` (BLOCK_M,) or, with TWO_D, (BLOCK_M, BLOCK_K)).

    ``lsc`` is the base-2 log of a plan row's largest entry and ``acc`` that
    row's sum normalised by it, so ``|acc|`` lies between the largest term of
    the operand and m times it. The factor is applied in two equal halves
    ``exp2(lsc / 2)`` (``lsc / 2`` is exact): a result inside the fp32 range
    never goes through an intermediate inf or 0, which ``exp2(lsc)`` alone
    gives for ``|lsc| > 126`` however small or large ``acc`` is. A row
    without a finite logit (``lsc = -inf``, ``acc = 0``) gives 0.
    """
    half = tl.exp2(0.5 * lsc)
    if TWO_D:
        out = (acc * half[:, None]) * half[:, None]
    else:
        out = (acc * half) * half
    return out
