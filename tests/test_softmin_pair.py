"""Tests of softmin_pair: both soft-min updates of (f, g) from one pass.

The Triton kernel (interpreter on CPU, compiled on a GPU) against dense
float64 formulas, with several (row range x column range) blocks forced so
that the partials and their merge are exercised at small sizes; the torch
reference against the same formulas; determinism, infinities, half inputs,
batching, errors; GPU-only tests at realistic sizes.
"""

import importlib
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from otlinop.kernels import PRECISIONS, softmin, softmin_pair, softmin_pair_torch, softmin_self  # noqa: E402
from otlinop.kernels._grid import SPLIT_ALIGN  # noqa: E402

# The package re-exports the function under the module's name: fetch the module itself.
sp = importlib.import_module("otlinop.kernels.softmin_pair")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

# Relative to max |output| (float32 kernels), see tests/test_kernels.py.
TOL = {"ieee": 3e-5, "tf32x3": 3e-5, "tf32": 3e-2}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_case(n, m, d, B=None, zeros=0, seed=0):
    gen = _gen(seed)
    lead = () if B is None else (B,)
    x = torch.randn(lead + (n, d), generator=gen, dtype=torch.float64) / math.sqrt(d)
    y = torch.randn(lead + (m, d), generator=gen, dtype=torch.float64) / math.sqrt(d) + 0.5 / math.sqrt(d)
    f = 0.3 * torch.randn(lead + (n,), generator=gen, dtype=torch.float64)
    g = 0.3 * torch.randn(lead + (m,), generator=gen, dtype=torch.float64)
    la = torch.log(torch.rand(lead + (n,), generator=gen, dtype=torch.float64) + 0.1)
    lb = torch.log(torch.rand(lead + (m,), generator=gen, dtype=torch.float64) + 0.1)
    if zeros:
        la[..., :zeros] = -math.inf
        lb[..., -zeros:] = -math.inf
    return x, y, f, g, la, lb


def dense_pair(x, y, f, g, la, lb, eps, c):
    """sf_i = -eps LSE_j(lb_j + (g_j - C_ij)/eps), sg_j = -eps LSE_i(la_i + (f_i - C_ij)/eps)."""
    C = c * ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)
    la = torch.zeros_like(f) if la is None else la
    lb = torch.zeros_like(g) if lb is None else lb
    sf = -eps * torch.logsumexp(lb[..., None, :] + (g[..., None, :] - C) / eps, dim=-1)
    sg = -eps * torch.logsumexp(la[..., :, None] + (f[..., :, None] - C) / eps, dim=-2)
    return sf, sg


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out)), "infinite entries differ"
    assert torch.equal(out[~fin], ref[~fin])
    if not fin.any():
        return 0.0
    return ((out - ref)[fin].abs().max() / ref[fin].abs().max().clamp_min(1e-30)).item()


CASES = [
    # n, m, d, B, ranges (R, S), eps, cost_scale, weights, zeros
    (37, 53, 3, None, (1, 1), 0.3, 1.0, True, 0),
    (300, 270, 5, None, (2, 3), 0.1, 0.5, True, 2),
    (270, 300, 2, None, (3, 2), 1.0, 1.0, False, 0),
    (70, 90, 20, 2, (2, 1), 0.5, 1.0, True, 1),
    (257, 150, 64, None, (3, 2), 0.5, 0.5, True, 0),
    (1, 9, 1, None, (1, 1), 0.05, 1.0, True, 0),
    (70, 50, 100, None, (1, 2), 0.5, 0.5, True, 1),     # several feature chunks
]


@pytest.mark.parametrize("n,m,d,B,rs,eps,c,weights,zeros", CASES)
def test_triton_matches_dense_float64(n, m, d, B, rs, eps, c, weights, zeros):
    hook = dict(_ranges=rs)
    x, y, f, g, la, lb = make_case(n, m, d, B, zeros)
    if not weights:
        la = lb = None
    ref_f, ref_g = dense_pair(x, y, f, g, la, lb, eps, c)
    f32 = [None if t is None else t.to(DEVICE, torch.float32) for t in (x, y, f, g, la, lb)]
    precisions = ["ieee", "tf32x3"] if d <= 20 else ["tf32x3"]
    for precision in precisions:
        sf, sg = softmin_pair(*f32, eps=eps, cost_scale=c, backend="triton", precision=precision, **hook)
        assert sf.shape == ref_f.shape and sg.shape == ref_g.shape
        assert sf.dtype == torch.float32
        assert rel_err(sf, ref_f) < TOL[precision], precision
        assert rel_err(sg, ref_g) < TOL[precision], precision


@pytest.mark.parametrize("n,m,d,B,rs,eps,c,weights,zeros", CASES[:4])
def test_torch_reference_matches_dense_float64(n, m, d, B, rs, eps, c, weights, zeros):
    x, y, f, g, la, lb = make_case(n, m, d, B, zeros)
    ref_f, ref_g = dense_pair(x, y, f, g, la, lb, eps, c)
    for fn in (softmin_pair_torch, lambda *a, **k: softmin_pair(*a, backend="torch", **k)):
        sf, sg = fn(x, y, f, g, la, lb, eps=eps, cost_scale=c)
        assert sf.dtype == torch.float64
        assert rel_err(sf, ref_f) < 1e-12
        assert rel_err(sg, ref_g) < 1e-12


def test_equals_two_softmin_calls():
    """The pair is the two soft-min updates of docs/math.md section 3, up to fp32 rounding."""
    hook = dict(_ranges=(2, 2))
    x, y, f, g, la, lb = (t.to(DEVICE, torch.float32) for t in make_case(300, 280, 4))
    eps = 0.2
    sf, sg = softmin_pair(x, y, f, g, la, lb, eps=eps, backend="triton", **hook)
    rf = softmin(x, y, lb + g / eps, eps=eps, backend="triton")
    rg = softmin(y, x, la + f / eps, eps=eps, backend="triton")
    assert rel_err(sf, rf) < 3e-6
    assert rel_err(sg, rg) < 3e-6


def test_views_of_one_buffer():
    x, y, f, g, la, lb = (t.to(DEVICE, torch.float32) for t in make_case(40, 30, 3))
    sf, sg = softmin_pair(x, y, f, g, la, lb, eps=0.5)
    out = sp.softmin_pair_cat(x, y, f, g, la, lb, eps=0.5)
    assert out.shape == (70,)
    assert torch.equal(out[:40], sf) and torch.equal(out[40:], sg)


def test_deterministic():
    hook = dict(_ranges=(3, 2))
    x, y, f, g, la, lb = (t.to(DEVICE, torch.float32) for t in make_case(300, 260, 6, zeros=1))
    first = sp.softmin_pair_cat(x, y, f, g, la, lb, eps=0.1, backend="triton", **hook)
    for _ in range(2):
        assert torch.equal(sp.softmin_pair_cat(x, y, f, g, la, lb, eps=0.1, backend="triton", **hook), first)


def test_ranges_do_not_change_the_result_beyond_rounding():
    x, y, f, g, la, lb = (t.to(DEVICE, torch.float32) for t in make_case(300, 400, 3))
    outs = []
    for rs in [(1, 1), (2, 3), (3, 4)]:
        hook = dict(_ranges=rs)
        outs.append(sp.softmin_pair_cat(x, y, f, g, la, lb, eps=0.05, backend="triton", **hook))
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-6


def test_all_zero_weights_give_inf_not_nan():
    hook = dict(_ranges=(2, 2))
    x, y, f, g, la, lb = (t.to(DEVICE, torch.float32) for t in make_case(200, 150, 3))
    la = torch.full_like(la, -math.inf)
    sf, sg = softmin_pair(x, y, f, g, la, lb, eps=0.3, backend="triton", **hook)
    assert torch.isfinite(sf).all()
    assert torch.isinf(sg).all() and (sg > 0).all()


def test_tiny_eps_no_underflow():
    """Logits far below 2^-126 in every entry: the shifted sums keep them."""
    hook = dict(_ranges=(2, 2))
    x, y, f, g, la, lb = make_case(150, 140, 3, seed=3)
    y = y + 4.0
    eps = 1e-3
    ref_f, ref_g = dense_pair(x, y, f, g, la, lb, eps, 1.0)
    sf, sg = softmin_pair(*(t.to(DEVICE, torch.float32) for t in (x, y, f, g, la, lb)), eps=eps,
                          backend="triton", precision="ieee", **hook)
    assert rel_err(sf, ref_f) < 3e-5 and rel_err(sg, ref_g) < 3e-5


def test_underflowing_columns_are_recomputed_exactly():
    """Columns with almost no mass under the plan (an outlier y_j, a zero weight).

    Their entries lie far below the column tile's shared shift: the fix-up
    merge kernel recomputes them with a per-column max. With that switched
    off those columns are not finite.
    """
    hook = dict(_ranges=(2, 2))
    x, y, f, g, la, lb = make_case(150, 140, 3, seed=4)
    y[7] += 10.0                      # C/eps ~ 2000 above its neighbours' entries
    lb[11] = -math.inf                # a zero weight: g is still defined there
    eps = 0.05
    ref_f, ref_g = dense_pair(x, y, f, g, la, lb, eps, 1.0)
    args = [t.to(DEVICE, torch.float32) for t in (x, y, f, g, la, lb)]
    sf, sg = softmin_pair(*args, eps=eps, backend="triton", precision="ieee", **hook)
    assert torch.isfinite(sg).all()
    assert rel_err(sf, ref_f) < 3e-5 and rel_err(sg, ref_g) < 3e-5
    _, sg_off = softmin_pair(*args, eps=eps, backend="triton", precision="ieee", _fixup=False, **hook)
    assert not torch.isfinite(sg_off[7]) and not torch.isfinite(sg_off[11])


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_eps_read_from_memory_gives_the_same_bits(precision):
    """eps as a 0-d float64 tensor (the loss's cached solve: the kernels read it from
    memory) against the same eps as a float: bitwise the same soft-mins, pair and self,
    the exact recomputation of underflowing columns included."""
    x, y, f, g, la, lb = make_case(150, 140, 3, seed=4)
    y[7] += 10.0
    lb[11] = -math.inf
    args = [t.to(DEVICE, torch.float32) for t in (x, y, f, g, la, lb)]
    opts = dict(cost_scale=0.5, backend="triton", precision=precision)
    for eps in (0.05, 0.3, 1e-3):
        e = torch.tensor(eps, dtype=torch.float64, device=DEVICE)
        pair = sp.softmin_pair_unchecked(*args, eps=eps, **opts)
        assert torch.equal(sp.softmin_pair_unchecked(*args, eps=e, **opts), pair)
        # A float eps that rounds to another float32 gives other bits: the value is read.
        assert not torch.equal(sp.softmin_pair_unchecked(*args, eps=eps * 1.001, **opts), pair)
        self_ = sp.softmin_self_unchecked(args[0], args[2], args[4], eps=eps, **opts)
        assert torch.equal(sp.softmin_self_unchecked(args[0], args[2], args[4], eps=e, **opts), self_)
    # And both are the soft-mins (the float path is tested against float64 above).
    ref_f, ref_g = dense_pair(x, y, f, g, la, lb, 0.05, 0.5)
    out = sp.softmin_pair_unchecked(*args, eps=torch.tensor(0.05, dtype=torch.float64, device=DEVICE), **opts)
    assert rel_err(out[:150], ref_f) < 3e-5 and rel_err(out[150:], ref_g) < 3e-5


def test_typical_data_flags_no_column():
    """On well-spread data no column is flagged: switching the exact
    recomputation off changes no bit."""
    hook = dict(_ranges=(2, 3))
    args = [t.to(DEVICE, torch.float32) for t in make_case(300, 260, 5, seed=5)]
    for eps in (1.0, 0.05):
        on = sp.softmin_pair_cat(*args, eps=eps, backend="triton", **hook)
        off = sp.softmin_pair_cat(*args, eps=eps, backend="triton", _fixup=False, **hook)
        assert torch.equal(on, off)


def test_batched_with_shared_inputs():
    """A cloud, potential or weight without the batch dim is shared by the batch."""
    hook = dict(_ranges=(2, 1))
    x, y, f, g, la, lb = make_case(130, 70, 3, B=2)
    x0, la0 = x[0], la[0]
    ref_f, ref_g = dense_pair(x0.expand_as(x), y, f, g, la0.expand_as(la), lb, 0.4, 1.0)
    args = [t.to(DEVICE, torch.float32) for t in (x0, y, f, g, la0, lb)]
    sf, sg = softmin_pair(*args, eps=0.4, backend="triton", **hook)
    assert sf.shape == (2, 130) and sg.shape == (2, 70)
    assert rel_err(sf, ref_f) < 3e-5 and rel_err(sg, ref_g) < 3e-5
    for k in range(2):
        uf, ug = softmin_pair(args[0], args[1][k], args[2][k], args[3][k], args[4], args[5][k], eps=0.4,
                              backend="triton", **hook)
        assert rel_err(uf, sf[k]) < 1e-6 and rel_err(ug, sg[k]) < 1e-6


# Half points are prepared as float32 copies of their values: their soft-mins are as accurate as
# float32 ones against the exact values of the rounded points (half operands once cost 1e-2 and 8e-2).
@pytest.mark.parametrize("dtype,budget", [(torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
def test_half_inputs(dtype, budget):
    x, y, f, g, la, lb = make_case(64, 48, 8)
    ref_f, ref_g = dense_pair(x.to(dtype).double(), y.to(dtype).double(), f, g, la, lb, 0.5, 1.0)
    sf, sg = softmin_pair(x.to(DEVICE, dtype), y.to(DEVICE, dtype), f.to(DEVICE, torch.float32),
                          g.to(DEVICE, torch.float32), la.to(DEVICE, torch.float32),
                          lb.to(DEVICE, torch.float32), eps=0.5, backend="triton")
    assert sf.dtype == sg.dtype == torch.float32     # potentials of half points are float32
    assert rel_err(sf, ref_f) < budget and rel_err(sg, ref_g) < budget


def test_non_contiguous_inputs():
    x, y, f, g, la, lb = (t.to(DEVICE, torch.float32) for t in make_case(50, 40, 3))
    fg = torch.stack([torch.cat([f, g]), torch.cat([f, g])], dim=1)     # (n + m, 2)
    sf, sg = softmin_pair(x, y, fg[:50, 0], fg[50:, 0], la, lb, eps=0.5, backend="triton")
    rf, rg = softmin_pair(x, y, f, g, la, lb, eps=0.5, backend="triton")
    assert torch.equal(sf, rf) and torch.equal(sg, rg)


def test_empty_sizes():
    x = torch.zeros(0, 3, device=DEVICE)
    y = torch.randn(5, 3, device=DEVICE)
    for backend in ("triton", "torch"):
        sf, sg = softmin_pair(x, y, torch.zeros(0, device=DEVICE), torch.zeros(5, device=DEVICE), eps=1.0,
                              backend=backend)
        assert sf.shape == (0,) and sg.shape == (5,)
        assert torch.isinf(sg).all() and (sg > 0).all()


def test_range_plan_fills_the_gpu():
    """On a GPU of 132 SMs; without one (None: the CPU, the interpreter), one block."""
    for n, m, B in [(10_000, 10_000, 1), (50_000, 50_000, 1), (10_000, 40_000, 1), (10_000, 10_000, 4),
                    (1_000_000, 1_000_000, 1), (300, 300, 1)]:
        (R, rows), (S, cols) = sp.range_plan(n, m, B, 132)
        assert rows % SPLIT_ALIGN == 0 and cols % SPLIT_ALIGN == 0
        assert (R - 1) * rows < n <= R * rows and (S - 1) * cols < m <= S * cols
        if n >= 10_000:
            assert R * S * B >= 132, (n, m, B, R, S)
            assert R * S * B <= 4 * 264
            assert min(rows, cols) >= sp.MIN_RANGE
    assert sp.range_plan(10_000, 10_000, 1, None) == ((1, 10_112), (1, 10_112))
    assert sp.range_plan(10_000, 10_000, 1, 132, forced=(2, 3)) == ((2, 5_120), (3, 3_456))


ERRORS = [
    (dict(f=torch.zeros(4)), ValueError, r"f has shape \(4,\), expected \(5,\)"),
    (dict(g=torch.zeros(5)), ValueError, r"g has shape \(5,\), expected \(6,\)"),
    (dict(log_a=torch.zeros(6)), ValueError, r"log_a has shape"),
    (dict(eps=-1.0), ValueError, "eps must be positive and finite"),
    (dict(f=torch.full((5,), math.nan)), ValueError, "f contains NaN"),
    (dict(log_b=torch.full((6,), math.inf)), ValueError, "log_b contains NaN or \\+inf"),
    (dict(g=None), TypeError, "g must be a torch.Tensor"),
    (dict(precision="fp8"), ValueError, "precision must be"),
]


@pytest.mark.parametrize("change,exc,match", ERRORS)
def test_errors(change, exc, match):
    args = dict(x=torch.randn(5, 3), y=torch.randn(6, 3), f=torch.zeros(5), g=torch.zeros(6),
                log_a=None, log_b=None, eps=0.5, precision=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        softmin_pair(args.pop("x"), args.pop("y"), args.pop("f"), args.pop("g"), args.pop("log_a"),
                     args.pop("log_b"), backend="torch", **args)


# --------------------------------------------------------------------------
# softmin_self: the problem (x, x), upper-triangle blocks only
# --------------------------------------------------------------------------


def dense_self(x, f, la, eps, c):
    """-eps LSE_j(la_j + (f_j - C_ij)/eps), float64."""
    C = c * ((x[..., :, None, :] - x[..., None, :, :]) ** 2).sum(-1)
    la = torch.zeros_like(f) if la is None else la
    return -eps * torch.logsumexp(la[..., None, :] + (f[..., None, :] - C) / eps, dim=-1)


SELF_CASES = [
    # n, d, B, T ranges, eps, cost_scale, weights, zeros
    (37, 3, None, 1, 0.3, 1.0, True, 0),
    (300, 5, None, 3, 0.1, 0.5, True, 2),
    (270, 2, 2, 2, 1.0, 1.0, False, 0),
    (257, 64, None, 3, 0.5, 0.5, True, 1),
    (70, 100, None, 2, 0.5, 1.0, True, 0),      # several feature chunks
]


@pytest.mark.parametrize("n,d,B,T,eps,c,weights,zeros", SELF_CASES)
def test_self_matches_dense_float64(n, d, B, T, eps, c, weights, zeros):
    hook = dict(_ranges=T)
    x, _, f, _, la, _ = make_case(n, 5, d, B, zeros)
    if not weights:
        la = None
    ref = dense_self(x, f, la, eps, c)
    args = [None if t is None else t.to(DEVICE, torch.float32) for t in (x, f, la)]
    for precision in (["ieee", "tf32x3"] if d <= 20 else ["tf32x3"]):
        out = softmin_self(*args, eps=eps, cost_scale=c, backend="triton", precision=precision, **hook)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert rel_err(out, ref) < TOL[precision], precision
    torch_out = softmin_self(x, f, la, eps=eps, cost_scale=c, backend="torch")
    assert rel_err(torch_out, ref) < 1e-12


def test_self_equals_softmin_and_is_deterministic():
    hook = dict(_ranges=3)
    x, _, f, _, la, _ = (t.to(DEVICE, torch.float32) for t in make_case(300, 5, 4, seed=6))
    out = softmin_self(x, f, la, eps=0.2, backend="triton", **hook)
    ref = softmin(x, x, la + f / 0.2, eps=0.2, backend="triton")
    assert rel_err(out, ref) < 3e-6
    for _ in range(2):
        assert torch.equal(softmin_self(x, f, la, eps=0.2, backend="triton", **hook), out)


def test_self_underflowing_columns_are_recomputed():
    """Points of the second range get their sums over the first range from column
    partials: an outlier (no mass there) and a zero weight (u = -inf) are
    flagged and recomputed exactly; switched off, the zero weight is not finite."""
    hook = dict(_ranges=2)         # ranges [0, 128) and [128, 150)
    x, _, f, _, la, _ = make_case(150, 5, 3, seed=7)
    x[140] += 10.0
    la[141] = -math.inf
    eps = 0.05
    ref = dense_self(x, f, la, eps, 1.0)
    args = [t.to(DEVICE, torch.float32) for t in (x, f, la)]
    out = softmin_self(*args, eps=eps, backend="triton", precision="ieee", **hook)
    # The outlier's cost to itself, |x|^2 + |x|^2 - 2 x.x with |x|^2 ~ 300, loses
    # ~1e-5 to fp32 cancellation (/ eps = 0.05): softmin has the same error.
    plain = softmin(args[0], args[0], args[2] + args[1] / eps, eps=eps, backend="triton", precision="ieee")
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 2 * rel_err(plain, ref) + 1e-6 and rel_err(out, ref) < 3e-4
    off = softmin_self(*args, eps=eps, backend="triton", precision="ieee", _fixup=False, **hook)
    assert not torch.isfinite(off[141])
    assert torch.equal(off[:128], out[:128])    # the first range: row partials only, exact


def test_self_errors():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"f has shape \(4,\), expected \(5,\)"):
        softmin_self(x, torch.zeros(4), eps=0.5)
    with pytest.raises(ValueError, match="eps must be positive and finite"):
        softmin_self(x, torch.zeros(5), eps=0.0)
    with pytest.raises(ValueError, match="log_a has shape"):
        softmin_self(x, torch.zeros(5), torch.zeros(3), eps=0.5)


def test_self_range_plan_fills_the_gpu():
    for n, B in [(10_000, 1), (50_000, 1), (1_000_000, 1), (10_000, 2), (300, 1)]:
        T, rows = sp.self_range_plan(n, B, 132)
        assert rows % SPLIT_ALIGN == 0 and (T - 1) * rows < n <= T * rows
        if n >= 10_000:
            assert 132 <= T * (T + 1) // 2 * B <= 264, (n, B, T)
    assert sp.self_range_plan(10_000, 1, None) == (1, 10_112)
    assert sp.self_range_plan(10_000, 1, 132, forced=3) == (3, 3_456)
    blocks = sp._upper_blocks(4, torch.device("cpu"))
    assert blocks.tolist() == [[r, s] for r in range(4) for s in range(r, 4)]


# --------------------------------------------------------------------------
# GPU: realistic sizes (the default range plan), memory
# --------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("n,m,d", [(50_000, 40_000, 3), (20_000, 30_000, 64), (10_000, 10_000, 256)])
def test_gpu_large_against_float64(n, m, d, precision):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen) / math.sqrt(d)
    y = torch.randn(m, d, device="cuda", generator=gen) / math.sqrt(d) + 0.5 / math.sqrt(d)
    f = 0.3 * torch.randn(n, device="cuda", generator=gen)
    g = 0.3 * torch.randn(m, device="cuda", generator=gen)
    la = torch.full((n,), -math.log(n), device="cuda")
    lb = torch.full((m,), -math.log(m), device="cuda")
    eps = 0.1
    sf, sg = softmin_pair(x, y, f, g, la, lb, eps=eps, precision=precision)
    rf, rg = softmin_pair_torch(x.double(), y.double(), f.double(), g.double(), la.double(), lb.double(), eps=eps)
    ef, eg = rel_err(sf, rf), rel_err(sg, rg)
    print(f"softmin_pair n={n} m={m} d={d} {precision}: err f {ef:.2e} g {eg:.2e}")
    assert ef < TOL[precision] and eg < TOL[precision]


@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_self_large_against_float64(precision):
    gen = torch.Generator(device="cuda").manual_seed(1)
    n, d = 30_000, 64
    x = torch.randn(n, d, device="cuda", generator=gen) / math.sqrt(d)
    f = 0.3 * torch.randn(n, device="cuda", generator=gen)
    la = torch.full((n,), -math.log(n), device="cuda")
    out = softmin_self(x, f, la, eps=0.1, precision=precision)
    ref = softmin_self(x.double(), f.double(), la.double(), eps=0.1, backend="torch")
    err = rel_err(out, ref)
    print(f"softmin_self n={n} d={d} {precision}: err {err:.2e}")
    assert err < TOL[precision]


@requires_cuda
def test_gpu_memory_n_200k():
    n = m = 200_000
    x, y = torch.randn(n, 3, device="cuda"), torch.randn(m, 3, device="cuda")
    f, g = torch.zeros(n, device="cuda"), torch.zeros(m, device="cuda")
    softmin_pair(x, y, f, g, eps=0.5)       # tune first (the autotuner allocates)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sf, sg = softmin_pair(x, y, f, g, eps=0.5)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(sf).all() and torch.isfinite(sg).all()
    assert extra < 100 * 2**20, f"peak extra allocation {extra / 2**20:.1f} MiB"


# --------------------------------------------------------------------------
# The averaged step written by the merge kernel (the Sinkhorn loop's lerp)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("B", [None, 2])
def test_averaged_step_is_the_loops_lerp_bit_for_bit(backend, B):
    """``average=FG`` gives ``torch.lerp(FG, S, 0.5)`` with the same bits (pair and self problems), with
    the column splits forced (the merge's row and column branches both average)."""
    device = DEVICE if backend == "triton" else "cpu"
    x, y, f, g, la, lb = (t.to(device, torch.float32) for t in make_case(37, 29, 3, B=B, seed=3))
    lead = (B,) if B is not None else ()
    opts = dict(eps=0.2, cost_scale=1.0, backend=backend, precision="ieee")
    FG = torch.cat([f, g], -1)
    if backend == "triton":
        # Compare with the same (forced) ranges: the averaging alone differs.
        geo = sp.Geometry(sp._FN, B is not None, B or 1, 37, 29, 3, torch.float32, x.device)
        S = sp._pair_triton(geo, x, y, f, g, la, lb, 0.2, 1.0, "ieee", forced_ranges=(2, 2))
        avg = sp._pair_triton(geo, x, y, f, g, la, lb, 0.2, 1.0, "ieee", forced_ranges=(2, 2), average=FG)
    else:
        S = sp.softmin_pair_unchecked(x, y, f, g, la, lb, **opts)
        avg = sp.softmin_pair_unchecked(x, y, f, g, la, lb, average=FG, **opts)
    assert avg.shape == lead + (66,)
    assert torch.equal(avg, torch.lerp(FG, S, 0.5))
    # The self problem (x, x) through its unchecked entry point.
    s = sp.softmin_self_unchecked(x, f, la, **opts)
    s_avg = sp.softmin_self_unchecked(x, f, la, average=f, **opts)
    assert torch.equal(s_avg, torch.lerp(f, s, 0.5))
    # float64 potentials of float32 points: averaged in float64, after the kernel.
    f64 = torch.cat([f, g], -1).double()
    out = sp.softmin_pair_unchecked(x, y, f, g, la, lb, average=f64, **opts)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.lerp(f64, sp.softmin_pair_unchecked(x, y, f, g, la, lb, **opts).double(), 0.5))


def test_averaged_step_refuses_a_misshapen_state():
    x, y, f, g, la, lb = (t.to(DEVICE, torch.float32) for t in make_case(5, 4, 2))
    with pytest.raises(ValueError, match="potentials to average have shape"):
        sp.softmin_pair_unchecked(x, y, f, g, la, lb, eps=0.5, cost_scale=1.0, backend="triton", precision=None,
                                  average=f)
