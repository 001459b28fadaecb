"""Tests of the block-sparse kernels (otlinop.kernels.blocksparse).

- the torch references against dense masked float64 formulas: the (n, m)
  mask is built here from the starts and the pattern, entry by entry, and the
  dense LSE / plan are computed by direct differences;
- the pattern transpose against the transposed dense mask, and the adjoint
  identity of the product through it;
- the argument checks.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from otlinop.kernels import (  # noqa: E402
    blocksparse_apply,
    blocksparse_apply_torch,
    blocksparse_lse,
    blocksparse_lse_torch,
    blocksparse_softmin,
    blocksparse_softmin_torch,
    transpose_pattern,
)

F64 = torch.float64
#: Float64 references against the dense formulas: reassociation only.
TOL64 = 1e-11


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def starts_of(sizes):
    return torch.tensor([0] + list(sizes), dtype=torch.int64).cumsum(0)


def pattern_of(rows):
    """CSR (ptr, idx) of a list of kept column-cluster lists (sorted here)."""
    ptr = starts_of([len(r) for r in rows])
    idx = torch.tensor([j for r in rows for j in sorted(r)], dtype=torch.int64)
    return ptr, idx


def dense_mask(x_starts, y_starts, ptr, idx):
    """The (n, m) bool mask of kept entries, entry by entry from the definition."""
    n, m = int(x_starts[-1]), int(y_starts[-1])
    mask = torch.zeros(n, m, dtype=torch.bool)
    for I in range(len(x_starts) - 1):
        for p in range(int(ptr[I]), int(ptr[I + 1])):
            J = int(idx[p])
            mask[int(x_starts[I]):int(x_starts[I + 1]), int(y_starts[J]):int(y_starts[J + 1])] = True
    return mask


def dense_cost(x, y, c):
    return c * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def dense_lse(x, y, h, mask, eps, c):
    logits = (h[None, :] - dense_cost(x, y, c) / eps).masked_fill(~mask, -math.inf)
    return torch.logsumexp(logits, dim=-1)


def dense_plan(x, y, f, g, mask, eps, c, log_a=None, log_b=None):
    logp = (f[:, None] + g[None, :] - dense_cost(x, y, c)) / eps
    if log_a is not None:
        logp = logp + log_a[:, None]
    if log_b is not None:
        logp = logp + log_b[None, :]
    return torch.exp(logp).masked_fill(~mask, 0.0)


def clustered_problem(x_sizes, y_sizes, rows, d=3, seed=0):
    """Clouds whose clusters sit around separate centres, the starts and the pattern."""
    gen = _gen(seed)
    xs, ys = starts_of(x_sizes), starts_of(y_sizes)
    cx = torch.randn(len(x_sizes), d, generator=gen, dtype=F64)
    cy = torch.randn(len(y_sizes), d, generator=gen, dtype=F64)
    x = torch.repeat_interleave(cx, torch.tensor(x_sizes), dim=0) + 0.3 * torch.randn(
        int(xs[-1]), d, generator=gen, dtype=F64)
    y = torch.repeat_interleave(cy, torch.tensor(y_sizes), dim=0) + 0.3 * torch.randn(
        int(ys[-1]), d, generator=gen, dtype=F64)
    ptr, idx = pattern_of(rows)
    return x, y, xs, ys, ptr, idx


# Row clusters: sizes with an empty one; row cluster 2 keeps nothing; column
# cluster 1 is empty but kept by some rows; the last row keeps everything.
CASES = {
    "mixed": ([3, 0, 4, 5, 2], [4, 0, 3, 6], [[0, 2], [1, 3], [], [0, 1, 2, 3], [3]]),
    "one_each": ([5, 6], [7, 4], [[1], [0]]),
    "full": ([4, 3], [2, 5], [[0, 1], [0, 1]]),
    "nothing": ([3, 3], [4], [[], []]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("eps,c", [(0.1, 1.0), (1.0, 0.5)])
def test_lse_and_softmin_torch_match_dense(case, eps, c):
    x, y, xs, ys, ptr, idx = clustered_problem(*CASES[case])
    h = 0.3 * torch.randn(y.shape[0], generator=_gen(5), dtype=F64)
    if h.numel() > 2:
        h[1] = -math.inf  # a zero weight
    mask = dense_mask(xs, ys, ptr, idx)
    want = dense_lse(x, y, h, mask, eps, c)
    got = blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=eps, cost_scale=c)
    assert got.dtype == F64 and got.shape == (x.shape[0],)
    # Rows that keep nothing are -inf in both, the rest agree.
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=TOL64, atol=TOL64)
    sm = blocksparse_softmin_torch(x, y, h, xs, ys, ptr, idx, eps=eps, cost_scale=c)
    assert torch.equal(sm[~fin], torch.full_like(sm[~fin], math.inf))
    torch.testing.assert_close(sm[fin], -eps * want[fin], rtol=TOL64, atol=TOL64)
    # The public functions take the reference for CPU float64.
    torch.testing.assert_close(blocksparse_lse(x, y, h, xs, ys, ptr, idx, eps=eps, cost_scale=c), got,
                               rtol=0, atol=0)
    torch.testing.assert_close(blocksparse_softmin(x, y, h, xs, ys, ptr, idx, eps=eps, cost_scale=c), sm,
                               rtol=0, atol=0)


def test_lse_row_with_only_zero_weights_is_minus_inf():
    x, y, xs, ys, ptr, idx = clustered_problem([2, 2], [3, 3], [[0], [0, 1]])
    h = torch.zeros(6, dtype=F64)
    h[:3] = -math.inf  # column cluster 0 has zero weight: row cluster 0 keeps only zeros
    out = blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=0.5)
    assert torch.isneginf(out[:2]).all() and torch.isfinite(out[2:]).all()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("operand", ["none", "vector", "matrix"])
@pytest.mark.parametrize("weights", [False, True])
def test_apply_torch_matches_dense(case, operand, weights):
    eps, c = 0.2, 1.0
    x, y, xs, ys, ptr, idx = clustered_problem(*CASES[case], seed=1)
    n, m = x.shape[0], y.shape[0]
    gen = _gen(7)
    f = 0.2 * torch.randn(n, generator=gen, dtype=F64)
    g = 0.2 * torch.randn(m, generator=gen, dtype=F64)
    if m > 3:
        g[3] = -math.inf
    log_a = torch.log(torch.rand(n, generator=gen, dtype=F64) + 0.1) if weights else None
    log_b = torch.log(torch.rand(m, generator=gen, dtype=F64) + 0.1) if weights else None
    V = {"none": None, "vector": torch.randn(m, generator=gen, dtype=F64),
         "matrix": torch.randn(m, 3, generator=gen, dtype=F64)}[operand]
    P = dense_plan(x, y, f, g, dense_mask(xs, ys, ptr, idx), eps, c, log_a, log_b)
    want = P.sum(1) if V is None else P @ V
    got = blocksparse_apply_torch(x, y, f, g, V, xs, ys, ptr, idx, eps=eps, log_a=log_a, log_b=log_b,
                                  cost_scale=c)
    assert got.shape == want.shape and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=TOL64, atol=TOL64)
    got_public = blocksparse_apply(x, y, f, g, V, xs, ys, ptr, idx, eps=eps, log_a=log_a, log_b=log_b,
                                   cost_scale=c)
    torch.testing.assert_close(got_public, got, rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_transpose_pattern_and_adjoint(case):
    x_sizes, y_sizes, rows = CASES[case]
    x, y, xs, ys, ptr, idx = clustered_problem(x_sizes, y_sizes, rows, seed=2)
    ptr_t, idx_t = transpose_pattern(ptr, idx, len(y_sizes))
    assert ptr_t.dtype == idx_t.dtype == torch.int64 and ptr_t.shape == (len(y_sizes) + 1,)
    for J in range(len(y_sizes)):
        ids = idx_t[ptr_t[J]:ptr_t[J + 1]]
        assert torch.all(ids[1:] > ids[:-1])  # ascending
    assert torch.equal(dense_mask(ys, xs, ptr_t, idx_t), dense_mask(xs, ys, ptr, idx).T)
    # <P v, u> = <v, P.T u> with P.T as the swapped call on the transposed pattern.
    gen = _gen(3)
    n, m = x.shape[0], y.shape[0]
    f, g = torch.randn(n, generator=gen, dtype=F64) * 0.1, torch.randn(m, generator=gen, dtype=F64) * 0.1
    v, u = torch.randn(m, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    Pv = blocksparse_apply_torch(x, y, f, g, v, xs, ys, ptr, idx, eps=0.3)
    PTu = blocksparse_apply_torch(y, x, g, f, u, ys, xs, ptr_t, idx_t, eps=0.3)
    lhs, rhs = torch.dot(Pv, u), torch.dot(v, PTu)
    assert abs(lhs - rhs) <= TOL64 * max(1.0, abs(lhs))


def test_transpose_pattern_is_an_involution_on_a_random_pattern():
    gen = _gen(11)
    kx, ky = 9, 7
    keep = torch.rand(kx, ky, generator=gen) < 0.4
    ptr, idx = pattern_of([torch.nonzero(r)[:, 0].tolist() for r in keep])
    ptr_t, idx_t = transpose_pattern(ptr, idx, ky)
    ptr_tt, idx_tt = transpose_pattern(ptr_t, idx_t, kx)
    assert torch.equal(ptr_tt, ptr) and torch.equal(idx_tt, idx)
    want_t = pattern_of([torch.nonzero(c)[:, 0].tolist() for c in keep.T])
    assert torch.equal(ptr_t, want_t[0]) and torch.equal(idx_t, want_t[1])


def test_chunking_does_not_change_the_result(override):
    """Tiny row chunks (a budget of a few entries, clusters split across chunks) give bitwise the same values."""
    x, y, xs, ys, ptr, idx = clustered_problem([7, 0, 9, 4], [5, 8, 0, 3], [[0, 1], [], [1, 3], [0, 2, 3]],
                                               seed=4)
    h = torch.randn(y.shape[0], generator=_gen(1), dtype=F64)
    V = torch.randn(y.shape[0], 2, generator=_gen(2), dtype=F64)
    f, g = torch.zeros(x.shape[0], dtype=F64), 0.1 * h
    big_lse = blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=0.4)
    big_apply = blocksparse_apply_torch(x, y, f, g, V, xs, ys, ptr, idx, eps=0.4)
    override(torch_block_bytes=8 * 8 * 20)
    assert torch.equal(blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=0.4), big_lse)
    assert torch.equal(blocksparse_apply_torch(x, y, f, g, V, xs, ys, ptr, idx, eps=0.4), big_apply)


def test_float32_reference_and_half_points():
    x, y, xs, ys, ptr, idx = clustered_problem(*CASES["mixed"], seed=5)
    h = torch.zeros(y.shape[0], dtype=F64)
    want = blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=0.5)
    got32 = blocksparse_lse_torch(x.float(), y.float(), h.float(), xs, ys, ptr, idx, eps=0.5)
    assert got32.dtype == torch.float32
    fin = torch.isfinite(want)
    torch.testing.assert_close(got32[fin].double(), want[fin], rtol=1e-5, atol=1e-5)
    got16 = blocksparse_lse_torch(x.half(), y.half(), h.float(), xs, ys, ptr, idx, eps=0.5)
    assert got16.dtype == torch.float32  # half points: float32 values


def test_empty_clouds():
    x = torch.zeros(0, 2, dtype=F64)
    y = torch.randn(3, 2, dtype=F64)
    xs, ys = torch.tensor([0]), torch.tensor([0, 3])
    ptr, idx = torch.tensor([0]), torch.tensor([], dtype=torch.int64)
    assert blocksparse_lse(x, y, torch.zeros(3, dtype=F64), xs, ys, ptr, idx, eps=1.0).shape == (0,)
    out = blocksparse_apply(y, x, torch.zeros(3, dtype=F64), torch.zeros(0, dtype=F64), None, ys, xs,
                            torch.tensor([0, 0]), idx, eps=1.0)
    assert torch.equal(out, torch.zeros(3, dtype=F64))


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _args():
    x, y, xs, ys, ptr, idx = clustered_problem([2, 2], [3, 2], [[0], [0, 1]])
    return x, y, torch.zeros(5, dtype=F64), xs, ys, ptr, idx


@pytest.mark.parametrize("fn", [blocksparse_lse, blocksparse_softmin, blocksparse_lse_torch])
@pytest.mark.parametrize("change,error,match", [
    (dict(xs=torch.tensor([0, 2, 4], dtype=torch.int32)), TypeError, "x_starts has dtype torch.int32"),
    (dict(xs=torch.tensor([0, 2, 3])), ValueError, "x_starts must start at 0, end at the number of points"),
    (dict(ys=torch.tensor([0, 3, 2, 4])), ValueError, "y_starts must start at 0"),
    (dict(ptr=torch.tensor([0, 1])), ValueError, r"ptr has shape \(2,\), expected \(3,\)"),
    (dict(ptr=torch.tensor([0, 2, 1])), ValueError, "ptr must start at 0, end at idx.numel"),
    (dict(idx=torch.tensor([0, 1, 0])), ValueError, "strictly ascending"),
    (dict(idx=torch.tensor([0, 0, 2])), ValueError, r"in \[0, 2\)"),
    (dict(idx=[0, 0, 1]), TypeError, "idx must be a torch.Tensor"),
    (dict(h=torch.zeros(3, dtype=F64)), ValueError, r"h has shape \(3,\), expected \(5,\)"),
    (dict(h=torch.full((5,), math.nan, dtype=F64)), ValueError, "h contains NaN"),
    (dict(eps=0.0), ValueError, "eps"),
])
def test_lse_checks(fn, change, error, match):
    x, y, h, xs, ys, ptr, idx = _args()
    if "idx" in change and isinstance(change["idx"], torch.Tensor) and change["idx"].numel() == 3:
        ptr = torch.tensor([0, 1, 3])
    args = dict(x=x, y=y, h=h, xs=xs, ys=ys, ptr=ptr, idx=idx, eps=0.5)
    args.update(change)
    with pytest.raises(error, match=f"^{fn.__name__}: .*{match}"):
        fn(args["x"], args["y"], args["h"], args["xs"], args["ys"], args["ptr"], args["idx"], eps=args["eps"])


def test_apply_checks():
    x, y, h, xs, ys, ptr, idx = _args()
    f = torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match=r"^blocksparse_apply: V has shape \(4,\).*did you mean the transpose"):
        blocksparse_apply(x, y, f, h, torch.zeros(4, dtype=F64), xs, ys, ptr, idx, eps=1.0)
    with pytest.raises(ValueError, match="^blocksparse_apply: P @ V overflowed float64"):
        blocksparse_apply(x, y, f + 800.0, h, None, xs, ys, ptr, idx, eps=1.0)
    with pytest.raises(ValueError, match="^blocksparse_apply: backend must be"):
        blocksparse_apply(x, y, f, h, None, xs, ys, ptr, idx, eps=1.0, backend="cuda")
    with pytest.raises(ValueError, match="^blocksparse_lse: precision must be"):
        blocksparse_lse(x, y, h, xs, ys, ptr, idx, eps=1.0, precision="fp8")
    with pytest.raises(ValueError, match="^blocksparse_lse: x has shape"):
        blocksparse_lse(x[None], y, h, xs, ys, ptr, idx, eps=1.0)


def test_transpose_pattern_checks():
    ptr, idx = torch.tensor([0, 1, 2]), torch.tensor([1, 0])
    with pytest.raises(ValueError, match=r"^transpose_pattern: idx must hold column cluster ids in \[0, 1\)"):
        transpose_pattern(ptr, idx, 1)
    with pytest.raises(TypeError, match="^transpose_pattern: ptr has dtype torch.float32"):
        transpose_pattern(ptr.float(), idx, 2)
    with pytest.raises(ValueError, match="^transpose_pattern: num_col_clusters"):
        transpose_pattern(ptr, idx, -1)
