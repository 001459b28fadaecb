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
from otlinop.kernels import blocksparse as blocksparse_module  # noqa: E402
from otlinop.kernels.blocksparse import blocksparse_apply_unchecked, blocksparse_softmin_unchecked  # noqa: E402

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


@pytest.fixture(params=["auto", "gathered"])
def form(request, monkeypatch):
    """The references' form: as chosen (masked dense on these small, dense patterns), or gathered."""
    if request.param == "gathered":
        monkeypatch.setattr(blocksparse_module, "_MASKED_LOGIT_ERROR", -1.0)
    return request.param


def test_form_choice():
    """Masked dense where a quarter of n m or more is kept and the rounding allows it; gathered otherwise."""
    x, y, xs, ys, ptr, idx = clustered_problem(*CASES["full"])
    choose = blocksparse_module._masked_dense
    assert choose(x, y, xs, ys, ptr, idx, 0.1, 1.0, F64) is not None
    # float32: the expansion's logit error u c max(|x'|^2 + |y'|^2) / eps is above the bound at eps = 0.1.
    assert choose(x.float(), y.float(), xs, ys, ptr, idx, 0.1, 1.0, torch.float32) is None
    assert choose(x.float(), y.float(), xs, ys, ptr, idx, 1e3, 1.0, torch.float32) is not None
    # 16 clusters of 4 points each side, each row cluster keeping 3 of 16: 3/16 of n m.
    sizes = [4] * 16
    x, y, xs, ys, ptr, idx = clustered_problem(sizes, sizes, [[i, (i + 1) % 16, (i + 5) % 16] for i in range(16)])
    assert choose(x, y, xs, ys, ptr, idx, 0.1, 1.0, F64) is None
    x, y, xs, ys, ptr, idx = clustered_problem(sizes, sizes, [[i, (i + 1) % 16, (i + 5) % 16, (i + 9) % 16]
                                                              for i in range(16)])
    assert choose(x, y, xs, ys, ptr, idx, 0.1, 1.0, F64) is not None


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("eps,c", [(0.1, 1.0), (1.0, 0.5)])
def test_lse_and_softmin_torch_match_dense(case, eps, c, form):
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
def test_apply_torch_matches_dense(case, operand, weights, form):
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


def test_chunking_does_not_change_the_result(override, form):
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


# --------------------------------------------------------------------------
# Triton against the references (interpreter on CPU, compiled on CUDA)
# --------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

#: Triton (fp32 accumulation) against the float64 reference, relative to the
#: natural scale of each output; the one place for these tolerances.
TOL_TRITON = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
#: tf32 on the tensor-core path (d > LOCAL_MAX_D on a GPU): 11-bit products.
TOL_TF32 = 3e-2
#: tf32 in the plan product's P V (any d): both operands of each product rounded to 11 bits, a
#: relative error up to 2 * 2^-11 per term of a row's positive sum (measured on an H100: 6.8e-4).
TOL_TF32_PRODUCT = 2e-3

# Row clusters longer than the interpreter's 32-row tile (several tiles per
# cluster, a partial last one), empty clusters, a row cluster keeping nothing,
# runs of consecutive column ids (streamed as one range) beside isolated ones.
TRITON_CASE = ([40, 0, 7, 33, 3], [20, 5, 0, 18, 9], [[0, 1, 2, 4], [3], [], [1, 3], [0, 2, 3, 4]])


def _scale_err(got, want):
    """max |got - want| over the finite entries, relative to max(1, max |want|); -inf / +inf must match."""
    want = want.double()
    got = got.double().cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                             want[torch.isinf(want)])
    fin = torch.isfinite(want)
    if not fin.any():
        return 0.0
    return ((got[fin] - want[fin]).abs().max() / max(1.0, want[fin].abs().max())).item()


def _on(t, dtype):
    return None if t is None else t.to(device=DEVICE, dtype=dtype)


def _layout_on(xs, ys, ptr, idx):
    return [t.to(DEVICE) for t in (xs, ys, ptr, idx)]


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize("d", [1, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_lse_matches_reference(d, dtype):
    x, y, xs, ys, ptr, idx = clustered_problem(*TRITON_CASE, d=d, seed=6)
    x, y = x.to(dtype).double(), y.to(dtype).double()  # points exactly representable in dtype
    h = 0.5 * torch.randn(y.shape[0], generator=_gen(8), dtype=F64)
    h[4] = -math.inf
    eps = 0.2
    want = blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=eps, cost_scale=0.5)
    lay = _layout_on(xs, ys, ptr, idx)
    hh = _on(h, torch.float32 if dtype != torch.float32 else dtype)
    got = blocksparse_lse(_on(x, dtype), _on(y, dtype), hh, *lay, eps=eps, cost_scale=0.5, backend="triton")
    assert got.dtype == torch.float32 and got.device.type == DEVICE
    assert _scale_err(got, want) < TOL_TRITON[dtype]
    sm = blocksparse_softmin(_on(x, dtype), _on(y, dtype), hh, *lay, eps=eps, cost_scale=0.5, backend="triton")
    assert _scale_err(sm, -eps * want) < TOL_TRITON[dtype]
    # Fixed order, no atomics: bitwise the same on a second call.
    again = blocksparse_lse(_on(x, dtype), _on(y, dtype), hh, *lay, eps=eps, cost_scale=0.5, backend="triton")
    assert torch.equal(again, got)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize("d", [3, 6])
@pytest.mark.parametrize("operand", ["none", "vector", "matrix", "wide"])
def test_triton_apply_matches_reference(d, operand):
    x, y, xs, ys, ptr, idx = clustered_problem(*TRITON_CASE, d=d, seed=9)
    n, m = x.shape[0], y.shape[0]
    gen = _gen(10)
    f = 0.2 * torch.randn(n, generator=gen, dtype=F64)
    g = 0.2 * torch.randn(m, generator=gen, dtype=F64)
    g[2] = -math.inf
    log_a = torch.log(torch.rand(n, generator=gen, dtype=F64) + 0.1)
    log_b = torch.log(torch.rand(m, generator=gen, dtype=F64) + 0.1)
    V = {"none": None, "vector": torch.randn(m, generator=gen, dtype=F64),
         "matrix": torch.randn(m, 5, generator=gen, dtype=F64),
         "wide": torch.randn(m, 70, generator=gen, dtype=F64)}[operand]  # two chunks of V's columns
    want = blocksparse_apply_torch(x, y, f, g, V, xs, ys, ptr, idx, eps=0.3, log_a=log_a, log_b=log_b)
    f32 = torch.float32
    got = blocksparse_apply(_on(x, f32), _on(y, f32), _on(f, f32), _on(g, f32), _on(V, f32),
                            *_layout_on(xs, ys, ptr, idx), eps=0.3, log_a=_on(log_a, f32), log_b=_on(log_b, f32),
                            backend="triton")
    assert got.shape == want.shape and got.dtype == f32
    scale = want.abs().max().item()
    assert (got.double().cpu() - want).abs().max().item() <= TOL_TRITON[f32] * scale
    rows_without = dense_mask(xs, ys, ptr, idx).sum(1) == 0
    assert (got.cpu()[rows_without] == 0).all()


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_triton_empty_pattern_and_grid_past_last_tile():
    # Many empty row clusters: the grid (cdiv(n, BLOCK_M) + Kx programs) runs past the last tile.
    x, y, xs, ys, ptr, idx = clustered_problem([0, 5, 0, 0, 3, 0], [4, 4], [[], [1], [], [], [], []], d=2)
    h = torch.zeros(8, dtype=F64)
    lay = _layout_on(xs, ys, ptr, idx)
    got = blocksparse_lse(_on(x, torch.float32), _on(y, torch.float32), _on(h, torch.float32), *lay, eps=0.5,
                          backend="triton")
    want = blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=0.5)
    assert _scale_err(got, want) < TOL_TRITON[torch.float32]
    assert torch.isneginf(got[5:]).all()


# --------------------------------------------------------------------------
# GPU at realistic sizes (the multiscale solver's regime)
# --------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: compiled Triton kernels at realistic "
                                                    "sizes (n = 50k-200k; the interpreter would take hours)")


def grid_clusters(x, cells):
    """Points of the unit cube sorted by grid cell (``cells`` per axis): ``(x sorted, starts, cell coords)``."""
    d = x.shape[1]
    coord = (x * cells).long().clamp_(0, cells - 1)
    weights = cells ** torch.arange(d, device=x.device)
    cid = (coord * weights).sum(1)
    order = torch.argsort(cid, stable=True)
    counts = torch.bincount(cid, minlength=cells ** d)
    starts = torch.zeros(cells ** d + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return x[order], starts


def neighbour_pattern(cells, d, reach, device):
    """Each cell keeps the cells within ``reach`` along every axis ((2 reach + 1)^d, fewer at the border)."""
    K = cells ** d
    ids = torch.arange(K, device=device)
    coord = torch.stack([(ids // cells ** k) % cells for k in range(d)], 1)           # (K, d)
    span = torch.arange(-reach, reach + 1, device=device)
    offsets = torch.cartesian_prod(*([span] * d)).reshape(-1, d)                        # ((2r+1)^d, d)
    nb = coord[:, None, :] + offsets[None]
    ok = ((nb >= 0) & (nb < cells)).all(-1)
    nid = (nb.clamp(0, cells - 1) * (cells ** torch.arange(d, device=device))).sum(-1)
    nid = torch.where(ok, nid, K).sort(dim=1).values
    ptr = torch.zeros(K + 1, dtype=torch.int64, device=device)
    torch.cumsum(ok.sum(1), 0, out=ptr[1:])
    return ptr, nid[nid < K]


@requires_cuda
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_gpu_realistic_d3(precision):
    """n = m = 200k uniform in the unit cube, 16^3 cells (~49 points), 27 kept cells per row cluster."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, cells, eps = 200_000, 16, 1e-3
    x, xs = grid_clusters(torch.rand(n, 3, device="cuda", generator=gen), cells)
    y, ys = grid_clusters(torch.rand(n, 3, device="cuda", generator=gen), cells)
    ptr, idx = neighbour_pattern(cells, 3, 1, "cuda")
    log_b = torch.full((n,), -math.log(n), device="cuda")
    want = blocksparse_lse_torch(x.double(), y.double(), log_b.double(), xs, ys, ptr, idx, eps=eps)
    got = blocksparse_lse(x, y, log_b, xs, ys, ptr, idx, eps=eps, precision=precision)
    assert _scale_err(got, want.cpu()) < TOL_TRITON[torch.float32]
    # A plan with O(1) rows: f from one soft-min step, V with three columns.
    f = blocksparse_softmin(x, y, log_b, xs, ys, ptr, idx, eps=eps)
    ptr_t, idx_t = transpose_pattern(ptr, idx, cells ** 3)
    V = torch.randn(n, 3, device="cuda", generator=gen)
    for (a, b, fa, fb, sa, sb, pp, ii) in ((x, y, f, torch.zeros_like(f), xs, ys, ptr, idx),
                                           (y, x, torch.zeros_like(f), f, ys, xs, ptr_t, idx_t)):
        want = blocksparse_apply_torch(a.double(), b.double(), fa.double(), fb.double(), V.double(), sa, sb, pp,
                                       ii, eps=eps, log_b=log_b.double())
        got = blocksparse_apply(a, b, fa, fb, V, sa, sb, pp, ii, eps=eps, log_b=log_b, precision=precision)
        tol = TOL_TF32_PRODUCT if precision == "tf32" else TOL_TRITON[torch.float32]
        assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()


@requires_cuda
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_gpu_realistic_tensor_core_path(precision):
    """d = 8 (above LOCAL_MAX_D: the prepared pair and tensor-core dots), 64 slabs along x_0, 3 kept per slab."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    n, K, eps = 50_000, 64, 0.05
    pts = []
    for _ in range(2):
        p = torch.rand(n, 8, device="cuda", generator=gen)
        slab = (p[:, 0] * K).long().clamp_(0, K - 1)
        order = torch.argsort(slab, stable=True)
        starts = torch.zeros(K + 1, dtype=torch.int64, device="cuda")
        torch.cumsum(torch.bincount(slab, minlength=K), 0, out=starts[1:])
        pts.append((p[order], starts))
    (x, xs), (y, ys) = pts
    rows = [[J for J in (I - 1, I, I + 1) if 0 <= J < K] for I in range(K)]
    ptr, idx = (t.cuda() for t in pattern_of(rows))
    h = torch.randn(n, device="cuda", generator=gen)
    want = blocksparse_lse_torch(x.double(), y.double(), h.double(), xs, ys, ptr, idx, eps=eps)
    got = blocksparse_lse(x, y, h, xs, ys, ptr, idx, eps=eps, precision=precision)
    tol = TOL_TF32 if precision == "tf32" else TOL_TRITON[torch.float32]
    assert _scale_err(got, want.cpu()) < tol


READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_triton_launch_reads_nothing_back(monkeypatch, override):
    """With check_finite off the Triton path reads no device value on the host: the tile map and
    the grid come from the shapes (cdiv(n, BLOCK_M) + Kx programs), the tiles from device ops."""
    x, y, xs, ys, ptr, idx = clustered_problem(*TRITON_CASE, d=3, seed=12)
    args = [_on(x, torch.float32), _on(y, torch.float32)]
    lay = _layout_on(xs, ys, ptr, idx)
    h = torch.zeros(y.shape[0], device=DEVICE)
    blocksparse_lse(*args, h, *lay, eps=0.5, backend="triton")  # warm: compile / tune outside the count
    blocksparse_apply(*args, torch.zeros(x.shape[0], device=DEVICE), h, None, *lay, eps=0.5, backend="triton")
    log = []
    for name in READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _real=real, _name=name: log.append(_name) or _real(self, *a))
    override(check_finite=False)
    blocksparse_lse(*args, h, *lay, eps=0.5, backend="triton")
    blocksparse_apply(*args, torch.zeros(x.shape[0], device=DEVICE), h, None, *lay, eps=0.5, backend="triton")
    monkeypatch.undo()
    assert log == []


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.set_sync_debug_mode sees device syncs only")
def test_gpu_call_synchronises_nothing(override):
    x, y, xs, ys, ptr, idx = clustered_problem(*TRITON_CASE, d=3, seed=13)
    args = [_on(x, torch.float32), _on(y, torch.float32), torch.zeros(y.shape[0], device="cuda")]
    lay = _layout_on(xs, ys, ptr, idx)
    blocksparse_lse(*args, *lay, eps=0.5)  # compile outside the check
    override(check_finite=False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        blocksparse_lse(*args, *lay, eps=0.5)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
def test_triton_precisions_above_local_max_d(precision):
    """d = 6 takes the prepared pair: the tensor-core path, or FMAs for "ieee" (exact fp32 dots in the interpreter)."""
    x, y, xs, ys, ptr, idx = clustered_problem(*TRITON_CASE, d=6, seed=14)
    h = 0.3 * torch.randn(y.shape[0], generator=_gen(15), dtype=F64)
    want = blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=0.25)
    got = blocksparse_lse(_on(x, torch.float32), _on(y, torch.float32), _on(h, torch.float32),
                          *_layout_on(xs, ys, ptr, idx), eps=0.25, backend="triton", precision=precision)
    tol = TOL_TF32 if (CUDA and precision == "tf32") else TOL_TRITON[torch.float32]
    assert _scale_err(got, want) < tol


def test_backend_choice():
    x, y, h, xs, ys, ptr, idx = _args()
    ref = blocksparse_lse_torch(x, y, h, xs, ys, ptr, idx, eps=0.5)
    assert torch.equal(blocksparse_lse(x, y, h, xs, ys, ptr, idx, eps=0.5, backend="torch"), ref)
    assert torch.equal(blocksparse_lse(x, y, h, xs, ys, ptr, idx, eps=0.5, backend="auto"), ref)
    with pytest.raises(TypeError, match="^blocksparse_lse: backend='triton' supports float32, float16 and "
                                        "bfloat16 points; x has dtype torch.float64"):
        blocksparse_lse(x, y, h, xs, ys, ptr, idx, eps=0.5, backend="triton")


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_entry_points_match_and_read_nothing_on_triton(backend, monkeypatch):
    x, y, xs, ys, ptr, idx = clustered_problem(*TRITON_CASE, d=3, seed=16)
    dtype = torch.float32
    args = (_on(x, dtype), _on(y, dtype))
    lay = _layout_on(xs, ys, ptr, idx)
    h = _on(0.2 * torch.randn(y.shape[0], generator=_gen(17), dtype=F64), dtype)
    f = torch.zeros(x.shape[0], device=DEVICE)
    V = _on(torch.randn(y.shape[0], 2, generator=_gen(18), dtype=F64), dtype)
    want_s = blocksparse_softmin(*args, h, *lay, eps=0.4, backend=backend)
    want_a = blocksparse_apply(*args, f, h, V, *lay, eps=0.4, backend=backend)
    log = []
    if backend == "triton":
        for name in READS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name,
                                lambda self, *a, _real=real, _name=name: log.append(_name) or _real(self, *a))
    got_s = blocksparse_softmin_unchecked(*args, h, *lay, eps=0.4, cost_scale=1.0, backend=backend, precision=None)
    got_a = blocksparse_apply_unchecked(*args, f, h, V, *lay, eps=0.4, log_a=None, log_b=None, cost_scale=1.0,
                                        backend=backend, precision=None)
    monkeypatch.undo()
    assert log == []
    assert torch.equal(got_s, want_s) and torch.equal(got_a, want_a)


def test_layout_values_are_checked_with_the_finite_check_only(override):
    """The layout's values join the finiteness read-back; with config.check_finite off the shapes and
    dtypes are still checked."""
    x, y, h, xs, ys, ptr, idx = _args()
    bad = torch.tensor([0, 3, 2, 5])  # decreasing
    with pytest.raises(ValueError, match="y_starts must start at 0"):
        blocksparse_lse(x, y, h, xs, bad, ptr, idx, eps=1.0)
    override(check_finite=False)
    with pytest.raises(TypeError, match="y_starts has dtype torch.int32"):
        blocksparse_lse(x, y, h, xs, ys.int(), ptr, idx, eps=1.0)
