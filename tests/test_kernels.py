"""Tests of the streaming kernels (otlinop.kernels).

Three layers:
- the torch references against dense float64 formulas (C and P materialised
  from direct differences, no centring) at tiny sizes;
- the Triton kernels against the references: on CPU with the Triton
  interpreter (TRITON_INTERPRET=1, every tl.dot in full fp32), on CUDA tensors
  when a GPU is present (same small cases, compiled kernels);
- GPU-only tests at realistic sizes, per precision, and a memory test.

Error metrics are relative to the natural scale of each output (see
``_err_*``); the tolerances live in ``TOL`` only.
"""

import math
import os

import torch

# Must precede the first import of the kernel modules (triton.jit reads it when
# it decorates them); tests/conftest.py does the same before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from otlinop.kernels import (  # noqa: E402
    DEFAULT_PRECISION,
    PRECISIONS,
    lse_cost,
    lse_cost_torch,
    plan_apply,
    plan_apply_torch,
    plan_bilinear,
    plan_bilinear_torch,
    softmin,
    softmin_torch,
)
from otlinop import config  # noqa: E402
from otlinop.kernels._dispatch import resolve_backend  # noqa: E402
from otlinop.kernels._grid import SPLIT_ALIGN, column_splits, sm_count, split_plan  # noqa: E402
from otlinop.kernels._layout import (  # noqa: E402
    CACHE_SIZE, cached_pairs, clear_cache, dot_mode, prepare_pair, scoped_cache)
from otlinop.kernels._reference import row_blocks  # noqa: E402
from otlinop.kernels._tiles import LOG2E  # noqa: E402
from otlinop.kernels._tuning import AUTOTUNE_DISK_CACHE  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# log2(0) of an empty row in the interpreter (numpy) warns; the result is -inf by design.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

# --------------------------------------------------------------------------
# Tolerances: the one place. Keys: (dtype of the points, precision); the
# float64 entry is for the references against the dense formulas. Under the
# interpreter every fp32 dot is exact fp32 whatever the precision, so the
# "tf32" entry is the GPU's. Half inputs: the centred points are rounded to
# the input dtype and the output is stored in it.
# --------------------------------------------------------------------------
TOL = {
    (torch.float64, None): 1e-11,
    (torch.float32, "ieee"): 3e-5,
    (torch.float32, "tf32x3"): 3e-5,
    (torch.float32, "tf32"): 3e-2,
    (torch.float16, None): 1e-2,
    (torch.bfloat16, None): 8e-2,
}


def tol(dtype, precision=None):
    if dtype in (torch.float16, torch.bfloat16, torch.float64):
        return TOL[(dtype, None)]
    return TOL[(dtype, precision or DEFAULT_PRECISION)]


# --------------------------------------------------------------------------
# Data and dense float64 formulas
# --------------------------------------------------------------------------


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_points(n, m, d, B=None, offset=0.0, seed=0):
    """Clouds with O(1) costs whatever d (so that eps in {0.05, 1} is meaningful)."""
    gen = _gen(seed)
    lead = () if B is None else (B,)
    x = torch.randn(lead + (n, d), generator=gen, dtype=torch.float64) / math.sqrt(d)
    y = torch.randn(lead + (m, d), generator=gen, dtype=torch.float64) / math.sqrt(d) + 0.5 / math.sqrt(d)
    return x + offset, y + offset


def make_vec(shape, scale=0.3, seed=1):
    return scale * torch.randn(shape, generator=_gen(seed), dtype=torch.float64)


def make_log_weights(shape, seed=2, zeros=0):
    """log of random positive weights summing to 1, with ``zeros`` entries at -inf."""
    w = torch.rand(shape, generator=_gen(seed), dtype=torch.float64) + 0.1
    lw = torch.log(w / w.sum(-1, keepdim=True))
    if zeros:
        lw[..., :zeros] = -math.inf
    return lw


def dense_cost(x, y, c):
    """c |x_i - y_j|^2 by direct differences, float64."""
    return c * ((x.double()[..., :, None, :] - y.double()[..., None, :, :]) ** 2).sum(-1)


def dense_plan(x, y, f, g, eps, c, log_a=None, log_b=None):
    C = dense_cost(x, y, c)
    logp = (f.double()[..., :, None] + g.double()[..., None, :] - C) / eps
    if log_a is not None:
        logp = logp + log_a.double()[..., :, None]
    if log_b is not None:
        logp = logp + log_b.double()[..., None, :]
    return torch.exp(logp)


def dense_lse(x, y, h, eps, c):
    return torch.logsumexp(h.double()[..., None, :] - dense_cost(x, y, c) / eps, dim=-1)


def to(t, dtype, device=DEVICE):
    return None if t is None else t.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------
# Error metrics (max-norm, relative to the natural scale of the output)
# --------------------------------------------------------------------------


def _err_lse(out, ref):
    """Max |out - ref| / max |ref| over finite entries; infinities must match exactly."""
    out, ref = out.double().cpu(), ref.double().cpu()
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out)), "infinite entries differ"
    assert torch.equal(out[~fin], ref[~fin])
    if not fin.any():
        return 0.0
    return ((out - ref)[fin].abs().max() / ref[fin].abs().max().clamp_min(1e-30)).item()


def _err_scaled(out, ref, scale):
    """Max |out - ref| / max(scale): scale = |P| |V| (no cancellation in it)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any()
    return ((out - ref).abs().max() / scale.double().cpu().abs().max().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------
# 1. Torch references against dense float64 formulas
# --------------------------------------------------------------------------

REF_CASES = [
    # n, m, d, B, eps, c, log weights
    (1, 7, 1, None, 0.05, 1.0, False),
    (7, 33, 2, None, 1.0, 0.5, True),
    (33, 50, 3, 3, 0.05, 0.5, True),
    (50, 1, 17, None, 1.0, 1.0, True),
    (50, 33, 130, 2, 0.05, 1.0, False),
]


@pytest.mark.parametrize("n,m,d,B,eps,c,weights", REF_CASES)
def test_references_match_dense_float64(override, n, m, d, B, eps, c, weights, monkeypatch):
    # A tiny block budget forces several row blocks.
    override(torch_block_bytes=4096)
    x, y = make_points(n, m, d, B)
    lead = () if B is None else (B,)
    f, g = make_vec(lead + (n,), seed=3), make_vec(lead + (m,), seed=4)
    log_a = make_log_weights(lead + (n,), seed=5) if weights else None
    log_b = make_log_weights(lead + (m,), seed=6, zeros=1 if m > 1 else 0) if weights else None
    t = tol(torch.float64)

    h = make_vec(lead + (m,), seed=7)
    assert _err_lse(lse_cost_torch(x, y, h, eps=eps, cost_scale=c), dense_lse(x, y, h, eps, c)) < t
    assert _err_lse(softmin_torch(x, y, h, eps=eps, cost_scale=c), -eps * dense_lse(x, y, h, eps, c)) < t

    P = dense_plan(x, y, f, g, eps, c, log_a, log_b)
    for k in (None, 0, 1, 5, 65):  # 0 means a vector V
        V = None if k is None else make_vec(lead + ((m,) if k == 0 else (m, k)), seed=8)
        Vm = torch.ones(lead + (m, 1), dtype=torch.float64) if V is None else (V[..., None] if k == 0 else V)
        ref = P @ Vm
        ref = ref[..., 0] if k in (None, 0) else ref
        out = plan_apply_torch(x, y, f, g, V, eps=eps, log_a=log_a, log_b=log_b, cost_scale=c)
        assert out.shape == ref.shape
        assert _err_scaled(out, ref, P @ Vm.abs()) < t

    for k, e in ((1, 1), (5, 3), (65, 130)):
        W = make_vec(lead + (n, k), seed=9)
        V = make_vec(lead + (m, k), seed=10)
        Y = make_vec(lead + (m, e), seed=11)
        S = W @ V.transpose(-1, -2)
        out = plan_bilinear_torch(x, y, f, g, W, V, Y, eps=eps, log_a=log_a, log_b=log_b, cost_scale=c)
        assert out.shape == lead + (n, e)
        assert _err_scaled(out, (P * S) @ Y, (P * S.abs()) @ Y.abs()) < t


def test_reference_float32_is_computed_in_float32():
    x, y = make_points(9, 11, 3)
    h = make_vec((11,))
    out = lse_cost_torch(x.float(), y.float(), h.float(), eps=0.1)
    assert out.dtype == torch.float32
    assert _err_lse(out, dense_lse(x, y, h, 0.1, 1.0)) < 1e-5


# --------------------------------------------------------------------------
# 2. Triton against the references (interpreter on CPU, compiled on CUDA)
# --------------------------------------------------------------------------

LSE_CASES = [
    # n, m, d, B, eps, c, precision
    (1, 1, 1, None, 1.0, 1.0, "ieee"),
    (7, 50, 2, None, 0.05, 0.5, "tf32x3"),
    (50, 7, 3, None, 0.05, 1.0, None),
    (33, 33, 17, 3, 1.0, 0.5, "tf32x3"),
    (50, 33, 64, None, 0.05, 1.0, "tf32"),
    (33, 50, 130, 2, 0.05, 0.5, "ieee"),
]


@pytest.mark.parametrize("n,m,d,B,eps,c,precision", LSE_CASES)
def test_lse_cost_triton(n, m, d, B, eps, c, precision):
    x, y = make_points(n, m, d, B)
    h = make_log_weights((() if B is None else (B,)) + (m,), seed=3, zeros=1 if m > 2 else 0)
    h = h + make_vec(h.shape, seed=4)
    x32, y32, h32 = to(x, torch.float32), to(y, torch.float32), to(h, torch.float32)
    out = lse_cost(x32, y32, h32, eps=eps, cost_scale=c, backend="triton", precision=precision)
    assert out.shape == h.shape[:-1] + (n,) and out.dtype == torch.float32
    ref = lse_cost_torch(x, y, h, eps=eps, cost_scale=c)
    assert _err_lse(out, ref) < tol(torch.float32, precision)
    sm = softmin(x32, y32, h32, eps=eps, cost_scale=c, backend="triton", precision=precision)
    assert _err_lse(sm, -eps * ref) < tol(torch.float32, precision)


PLAN_CASES = [
    # n, m, d, B, k, eps, c, log weights, precision   (k: None = ones, 0 = vector)
    (1, 7, 1, None, None, 1.0, 1.0, False, "ieee"),
    (7, 33, 3, None, 0, 0.05, 0.5, True, "tf32x3"),
    (50, 33, 2, None, 1, 1.0, 1.0, True, None),
    (33, 50, 17, 2, 5, 0.05, 1.0, True, "tf32"),
    (50, 50, 64, None, 65, 1.0, 0.5, False, "tf32x3"),
    (33, 7, 130, 3, None, 0.05, 1.0, True, "ieee"),
    (7, 50, 3, 2, 0, 1.0, 0.5, False, None),
    (33, 33, 3, None, 256, 1.0, 1.0, True, "tf32x3"),
]


def _plan_inputs(n, m, d, B, k, weights, seed=0):
    lead = () if B is None else (B,)
    x, y = make_points(n, m, d, B, seed=seed)
    f, g = make_vec(lead + (n,), seed=3), make_vec(lead + (m,), seed=4)
    log_a = make_log_weights(lead + (n,), seed=5, zeros=1 if n > 2 else 0) if weights else None
    log_b = make_log_weights(lead + (m,), seed=6, zeros=2 if m > 2 else 0) if weights else None
    V = None if k is None else make_vec(lead + ((m,) if k == 0 else (m, k)), seed=8)
    return x, y, f, g, V, log_a, log_b


def _plan_scale(x, y, f, g, V, eps, c, log_a, log_b):
    """|P| |V| by the reference (all terms nonnegative: no cancellation)."""
    return plan_apply_torch(x, y, f, g, None if V is None else V.abs(), eps=eps, cost_scale=c,
                            log_a=log_a, log_b=log_b)


@pytest.mark.parametrize("n,m,d,B,k,eps,c,weights,precision", PLAN_CASES)
def test_plan_apply_triton(n, m, d, B, k, eps, c, weights, precision):
    x, y, f, g, V, log_a, log_b = _plan_inputs(n, m, d, B, k, weights)
    args32 = [to(t, torch.float32) for t in (x, y, f, g, V)]
    out = plan_apply(*args32, eps=eps, cost_scale=c, log_a=to(log_a, torch.float32),
                     log_b=to(log_b, torch.float32), backend="triton", precision=precision)
    ref = plan_apply_torch(x, y, f, g, V, eps=eps, cost_scale=c, log_a=log_a, log_b=log_b)
    assert out.shape == ref.shape and out.dtype == torch.float32
    scale = _plan_scale(x, y, f, g, V, eps, c, log_a, log_b)
    assert _err_scaled(out, ref, scale) < tol(torch.float32, precision)


BILINEAR_CASES = [
    # n, m, d, B, k, e, eps, c, log weights, precision
    (1, 7, 2, None, 1, 1, 1.0, 1.0, False, "ieee"),
    (33, 50, 3, None, 5, 3, 0.05, 0.5, True, None),
    (50, 33, 17, 2, 65, 2, 1.0, 1.0, True, "tf32"),
    (7, 33, 130, None, 130, 130, 0.05, 1.0, False, "tf32x3"),
    (50, 7, 3, 3, 3, 65, 1.0, 0.5, True, "tf32x3"),
]


@pytest.mark.parametrize("n,m,d,B,k,e,eps,c,weights,precision", BILINEAR_CASES)
def test_plan_bilinear_triton(n, m, d, B, k, e, eps, c, weights, precision):
    lead = () if B is None else (B,)
    x, y, f, g, _, log_a, log_b = _plan_inputs(n, m, d, B, None, weights)
    W, V, Y = make_vec(lead + (n, k), seed=9), make_vec(lead + (m, k), seed=10), make_vec(lead + (m, e), seed=11)
    out = plan_bilinear(*(to(t, torch.float32) for t in (x, y, f, g, W, V, Y)), eps=eps, cost_scale=c,
                        log_a=to(log_a, torch.float32), log_b=to(log_b, torch.float32),
                        backend="triton", precision=precision)
    ref = plan_bilinear_torch(x, y, f, g, W, V, Y, eps=eps, cost_scale=c, log_a=log_a, log_b=log_b)
    assert out.shape == ref.shape == lead + (n, e) and out.dtype == torch.float32
    P = dense_plan(x, y, f, g, eps, c, log_a, log_b)
    scale = (P * (W @ V.transpose(-1, -2)).abs()) @ Y.abs()
    assert _err_scaled(out, ref, scale) < tol(torch.float32, precision)


def test_transpose_is_the_swapped_call_and_adjoint_holds():
    n, m, d, k = 33, 50, 3, 5
    x, y, f, g, _, log_a, log_b = _plan_inputs(n, m, d, None, None, True)
    U = make_vec((n, k), seed=12)
    V = make_vec((m, k), seed=13)
    x32, y32, f32, g32, U32, V32, la32, lb32 = (to(t, torch.float32) for t in (x, y, f, g, U, V, log_a, log_b))
    PtU = plan_apply(y32, x32, g32, f32, U32, eps=0.1, log_a=lb32, log_b=la32, backend="triton")
    P = dense_plan(x, y, f, g, 0.1, 1.0, log_a, log_b)
    assert _err_scaled(PtU, P.T @ U, P.T @ U.abs()) < tol(torch.float32)
    PV = plan_apply(x32, y32, f32, g32, V32, eps=0.1, log_a=la32, log_b=lb32, backend="triton")
    lhs = (U * PV.double().cpu()).sum()
    rhs = (PtU.double().cpu() * V).sum()
    assert abs(lhs - rhs) <= 1e-5 * (U.abs() * (P @ V.abs())).sum()


def test_triton_half_inputs():
    n, m, d, k = 33, 50, 17, 5
    x, y, f, g, V, log_a, log_b = _plan_inputs(n, m, d, None, k, True)
    h = make_vec((m,), seed=7)
    for dtype in (torch.float16, torch.bfloat16):
        # Compare against the reference on the same rounded points.
        xh, yh = to(x, dtype), to(y, dtype)
        xr, yr = xh.double().cpu(), yh.double().cpu()
        # Vectors may be float32 or the half dtype.
        out = lse_cost(xh, yh, to(h, torch.float32), eps=0.5, backend="triton")
        assert out.dtype == torch.float32     # log-sum-exps and potentials of half points are float32
        assert _err_lse(out, lse_cost_torch(xr, yr, h, eps=0.5)) < tol(dtype)
        out = plan_apply(xh, yh, to(f, dtype), to(g, torch.float32), to(V, dtype), eps=0.5,
                         log_a=to(log_a, torch.float32), log_b=to(log_b, dtype), backend="triton")
        ref = plan_apply_torch(xr, yr, f, g, V, eps=0.5, log_a=log_a, log_b=log_b)
        scale = _plan_scale(xr, yr, f, g, V, 0.5, 1.0, log_a, log_b)
        assert out.dtype == dtype and _err_scaled(out, ref, scale) < tol(dtype)
        W = make_vec((n, 3), seed=9)
        out = plan_bilinear(xh, yh, to(f, dtype), to(g, dtype), to(W, torch.float32), to(V[:, :3], dtype),
                            to(V, dtype), eps=0.5, backend="triton")
        ref = plan_bilinear_torch(xr, yr, f, g, W, V[:, :3], V, eps=0.5)
        P = dense_plan(xr, yr, f, g, 0.5, 1.0)
        scale = (P * (W @ V[:, :3].T).abs()) @ V.abs()
        assert out.dtype == dtype and _err_scaled(out, ref, scale) < tol(dtype)


def test_centring_far_from_origin():
    # |x|^2 ~ 3e6 while |x - y|^2 ~ 1: without the centring, fp32 would lose everything.
    n, m, d = 33, 50, 3
    x, y, f, g, V, _, _ = _plan_inputs(n, m, d, None, 4, False)
    x, y = x + 1000.0, y + 1000.0
    h = make_vec((m,), seed=7)
    # The reference on the fp32-rounded points (rounding moved them by ~6e-5).
    xr, yr = x.float().double(), y.float().double()
    out = lse_cost(to(x, torch.float32), to(y, torch.float32), to(h, torch.float32), eps=0.05,
                   backend="triton", precision="ieee")
    assert _err_lse(out, dense_lse(xr, yr, h, 0.05, 1.0)) < tol(torch.float32, "ieee")
    out = plan_apply(*(to(t, torch.float32) for t in (x, y, f, g, V)), eps=0.05, backend="triton")
    P = dense_plan(xr, yr, f, g, 0.05, 1.0)
    assert _err_scaled(out, P @ V, P @ V.abs()) < tol(torch.float32)


def test_neg_inf_weights_and_empty_rows():
    n, m, d = 33, 20, 3
    x, y = (to(t, torch.float32) for t in make_points(n, m, d))
    h = torch.full((m,), -math.inf, device=DEVICE)
    for backend in ("triton", "torch"):
        out = lse_cost(x, y, h, eps=0.1, backend=backend)
        assert torch.all(out == -math.inf), backend
        assert torch.all(softmin(x, y, h, eps=0.1, backend=backend) == math.inf)
        f, g = torch.zeros(n, device=DEVICE), torch.zeros(m, device=DEVICE)
        V = torch.randn(m, 3, device=DEVICE)
        out = plan_apply(x, y, f, g, V, eps=0.1, log_b=h, backend=backend)
        assert torch.all(out == 0), backend
        # Zero row weights give zero rows, the others are untouched.
        log_a = torch.zeros(n, device=DEVICE)
        log_a[::3] = -math.inf
        out = plan_apply(x, y, f, g, V, eps=0.1, log_a=log_a, backend=backend)
        ref = plan_apply_torch(x.double(), y.double(), f.double(), g.double(), V.double(), eps=0.1)
        assert torch.all(out[::3] == 0) and not torch.isnan(out).any()
        keep = log_a == 0
        assert _err_scaled(out[keep], ref[keep], ref[keep].abs()) < 1e-4
        W = torch.randn(n, d, device=DEVICE)
        out = plan_bilinear(x, y, f, g, W, y, y, eps=0.1, log_b=h, backend=backend)
        assert torch.all(out == 0)


def test_tiny_eps_does_not_underflow():
    # eps so small that every exp(-C/eps) underflows: the running max keeps the result finite.
    x, y = (to(t, torch.float32) for t in make_points(7, 33, 2))
    h = torch.zeros(33, device=DEVICE)
    out = softmin(x, y, h, eps=1e-4, backend="triton", precision="ieee")
    ref = dense_cost(x, y, 1.0).min(dim=-1).values
    assert torch.isfinite(out).all()
    assert (out.double().cpu() - ref.cpu()).abs().max() < 1e-3


def test_batched_matches_unbatched_and_broadcasts():
    B, n, m, d, k = 3, 20, 33, 3, 4
    x, y, f, g, V, log_a, log_b = (to(t, torch.float32) if t is not None else None
                                   for t in _plan_inputs(n, m, d, B, k, True))
    out = plan_apply(x, y, f, g, V, eps=0.3, log_a=log_a, log_b=log_b, backend="triton")
    for i in range(B):
        one = plan_apply(x[i], y[i], f[i], g[i], V[i], eps=0.3, log_a=log_a[i], log_b=log_b[i], backend="triton")
        assert _err_scaled(out[i], one, one.abs()) < tol(torch.float32)
    # Unbatched y and vectors are shared by the batch.
    out = lse_cost(x, y[0], g[0], eps=0.3, backend="triton")
    ref = lse_cost(x, y[0].expand(B, m, d), g[0].expand(B, m), eps=0.3, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    W, Y = torch.randn(n, 2, device=DEVICE), torch.randn(m, 5, device=DEVICE)
    out = plan_bilinear(x, y, f[0], g, W, y[0][:, :2], Y, eps=0.3, backend="triton")
    ref = plan_bilinear_torch(x.double(), y.double(), f[0].double(), g.double(), W.double(),
                              y[0][:, :2].double(), Y.double(), eps=0.3)
    assert out.shape == (B, n, 5)
    assert _err_scaled(out, ref, ref.abs()) < 10 * tol(torch.float32)


def test_non_contiguous_inputs():
    n, m, d = 20, 33, 3
    x, y = make_points(n, m, d)
    xt = to(x, torch.float32).t().contiguous().t()  # column-major
    yt = to(torch.stack([y, y], dim=-1), torch.float32)[..., 0]  # feature stride 2
    V = to(make_vec((5, m)), torch.float32).t()  # (m, 5), stride (1, m)
    g = to(make_vec((2 * m,)), torch.float32)[::2]
    f = torch.zeros(n, device=DEVICE)
    assert not (xt.is_contiguous() or yt.is_contiguous() or V.is_contiguous() or g.is_contiguous())
    out = plan_apply(xt, yt, f, g, V, eps=0.3, backend="triton")
    f, g, V = f.double().cpu(), g.double().cpu(), V.double().cpu()
    ref = plan_apply_torch(x, y, f, g, V, eps=0.3)
    assert _err_scaled(out, ref, plan_apply_torch(x, y, f, g, V.abs(), eps=0.3)) < tol(torch.float32)


def test_deterministic():
    x, y, f, g, V, log_a, log_b = (to(t, torch.float32) for t in _plan_inputs(50, 33, 17, None, 5, True))
    for _ in range(2):
        a = plan_apply(x, y, f, g, V, eps=0.1, log_a=log_a, log_b=log_b, backend="triton")
        b = plan_apply(x, y, f, g, V, eps=0.1, log_a=log_a, log_b=log_b, backend="triton")
        assert torch.equal(a, b)
        a = lse_cost(x, y, g, eps=0.1, backend="triton")
        assert torch.equal(a, lse_cost(x, y, g, eps=0.1, backend="triton"))


def test_bilinear_deterministic():
    x, y, f, g, V, _, _ = (to(t, torch.float32) if t is not None else None
                           for t in _plan_inputs(20, 33, 3, None, 5, False))
    W = torch.randn(20, 5, device=DEVICE)
    a = plan_bilinear(x, y, f, g, W, V, V, eps=0.1, backend="triton")
    assert torch.equal(a, plan_bilinear(x, y, f, g, W, V, V, eps=0.1, backend="triton"))


# --------------------------------------------------------------------------
# Column splits, the two dot paths, the prepared-pair cache
# --------------------------------------------------------------------------


def forced_splits(m, splits):
    """The launchers' ``_splits`` hook: ``splits`` ranges of 16-aligned columns, at any size."""
    plan = split_plan(m, splits, align=16)
    assert column_splits(1, m, None, forced=plan) == plan and plan[0] == splits
    return plan


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("d,B", [(3, None), (20, 2)])
def test_column_splits_match_reference_and_unsplit(splits, d, B):
    n, m = 37, 70
    lead = () if B is None else (B,)
    x, y, f, g, V, log_a, log_b = _plan_inputs(n, m, d, B, 5, True)
    h = make_log_weights(lead + (m,), seed=3, zeros=3) + make_vec(lead + (m,), seed=4)
    a32 = [to(t, torch.float32) for t in (x, y, f, g, V, log_a, log_b, h)]
    x32, y32, f32, g32, V32, la32, lb32, h32 = a32

    def run(**hook):
        return (lse_cost(x32, y32, h32, eps=0.1, backend="triton", **hook),
                softmin(x32, y32, h32, eps=0.1, backend="triton", **hook),
                plan_apply(x32, y32, f32, g32, None, eps=0.1, log_a=la32, log_b=lb32, backend="triton", **hook),
                plan_apply(x32, y32, f32, g32, V32[..., 0], eps=0.1, log_a=la32, log_b=lb32, backend="triton",
                           **hook),
                plan_apply(x32, y32, f32, g32, V32, eps=0.1, log_a=la32, log_b=lb32, backend="triton", **hook))

    whole = run()
    parts = run(_splits=forced_splits(m, splits))
    ref_lse = lse_cost_torch(x, y, h, eps=0.1)
    assert _err_lse(parts[0], ref_lse) < tol(torch.float32)
    assert _err_lse(parts[1], -0.1 * ref_lse) < tol(torch.float32)
    assert _err_lse(parts[0], whole[0]) < 1e-6
    for out, full, VV in zip(parts[2:], whole[2:], (None, V[..., 0], V)):
        ref = plan_apply_torch(x, y, f, g, VV, eps=0.1, log_a=log_a, log_b=log_b)
        scale = plan_apply_torch(x, y, f, g, None if VV is None else VV.abs(), eps=0.1, log_a=log_a, log_b=log_b)
        assert out.shape == full.shape == ref.shape
        assert _err_scaled(out, ref, scale) < tol(torch.float32)
        assert _err_scaled(out, full, scale) < 1e-6


def test_split_plan_covers_the_columns():
    for m in (1, 100, 129, 10_000, 50_001):
        for want in (1, 2, 5, 64):
            splits, cols = split_plan(m, want)
            assert 1 <= splits <= want and cols % SPLIT_ALIGN == 0
            assert (splits - 1) * cols < m <= splits * cols


def test_split_rule_fills_the_gpu():
    """On a GPU (here one of 132 SMs) the split count follows the row grid: none for a full grid."""
    assert column_splits(400, 50_000, 132) == (1, 50_000)
    splits, cols = column_splits(79, 10_000, 132)     # n = 10k in 128-row tiles
    assert splits == 4 and splits * 79 >= 264
    assert column_splits(10, 200, 132)[0] == 1        # too few columns to split
    assert column_splits(16, 2048, 132)[0] == 8       # n = m = 2048: 16 row tiles, splits of 256 columns
    assert sm_count(torch.device("cpu")) is None      # the CPU (and the interpreter): no split
    assert column_splits(79, 10_000, None) == (1, 10_000)
    # The launchers' _splits hook: a count, or a plan that must cover the columns.
    assert column_splits(79, 10_000, None, forced=3) == split_plan(10_000, 3)
    with pytest.raises(ValueError, match="does not cover the 70 columns"):
        column_splits(1, 70, None, forced=(2, 16))
    with pytest.raises(ValueError, match="_splits must be a positive int"):
        column_splits(1, 70, None, forced=0)


@pytest.mark.parametrize("d", [1, 3, 8])
def test_fma_and_tensor_core_paths_agree(d):
    """d <= config.fma_max_d uses FMAs; the tensor-core path must give the same results."""
    x, y, f, g, V, log_a, log_b = (to(t, torch.float32) for t in _plan_inputs(37, 45, d, None, 3, True))
    out = {}
    for fma_max in (8, 0):
        with config.override(fma_max_d=fma_max):
            assert dot_mode(d, "tf32x3") == (1 if fma_max else 0)
            out[fma_max] = (lse_cost(x, y, g, eps=0.2, backend="triton"),
                            plan_apply(x, y, f, g, V, eps=0.2, log_a=log_a, log_b=log_b, backend="triton"))
    assert _err_lse(out[0][0], out[8][0]) < tol(torch.float32)
    assert _err_scaled(out[0][1], out[8][1], out[8][1].abs()) < tol(torch.float32)


def test_prepared_pair_cache_reuse_and_invalidation():
    x, y = (to(t, torch.float32) for t in make_points(20, 30, 3))
    g = torch.zeros(30, device=DEVICE)
    clear_cache()
    p1 = prepare_pair(x, y, "tf32x3")
    assert prepare_pair(x, y, "tf32x3") is p1                        # reused
    assert prepare_pair(y, x, "tf32x3").x is p1.y                    # the transposed call shares it
    before = lse_cost(x, y, g, eps=0.5, backend="triton")
    x.add_(1.0)                                                    # in place: the entry is stale
    assert prepare_pair(x, y, "tf32x3") is not p1
    after = lse_cost(x, y, g, eps=0.5, backend="triton")
    ref = lse_cost_torch(x.double().cpu(), y.double().cpu(), g.double().cpu(), eps=0.5)
    assert _err_lse(after, ref) < tol(torch.float32)
    assert not torch.allclose(before, after)
    size = cached_pairs()
    del x                                                          # a freed input drops its entry
    import gc
    gc.collect()
    assert cached_pairs() < size
    for _ in range(2 * CACHE_SIZE):                                # the cache is bounded
        prepare_pair(torch.randn(5, 3, device=DEVICE), y, "tf32x3")
    assert cached_pairs() <= CACHE_SIZE


def test_scoped_cache_keeps_nothing_past_its_block():
    """Inside scoped_cache pairs are reused, the process-wide cache is untouched, and on exit nothing is
    kept (the compiled loss ops run in one: a pair kept past a CUDA-graph op is refused by inductor)."""
    import weakref

    x, y = (to(t, torch.float32) for t in make_points(20, 30, 3))
    clear_cache()
    outside = prepare_pair(x, y, "tf32x3")
    with scoped_cache():
        inner = prepare_pair(x, y, "tf32x3")
        assert inner is not outside and prepare_pair(x, y, "tf32x3") is inner
        with scoped_cache():
            assert prepare_pair(x, y, "tf32x3") is not inner          # nested: its own
        assert prepare_pair(x, y, "tf32x3") is inner
        assert cached_pairs() == 1                                     # the process-wide one only
        ref = weakref.ref(inner.x)
        del inner
    import gc
    gc.collect()
    assert ref() is None                                               # freed on exit
    assert prepare_pair(x, y, "tf32x3") is outside and cached_pairs() == 1


def test_inference_mode_inputs():
    """Inference tensors have no version counter: they are prepared afresh, never cached."""
    with torch.inference_mode():
        x, y = (to(t, torch.float32) for t in make_points(20, 30, 3))
        h = torch.zeros(30, device=DEVICE)
        out = lse_cost(x, y, h, eps=0.5, backend="triton")
        before = cached_pairs()
        x.add_(1.0)
        moved = lse_cost(x, y, h, eps=0.5, backend="triton")
        assert cached_pairs() == before
    ref = lse_cost_torch(x.double().cpu(), y.double().cpu(), h.double().cpu(), eps=0.5)
    assert _err_lse(moved, ref) < tol(torch.float32)
    assert not torch.allclose(out, moved)


def test_split_precision_layout():
    """tf32x3 at small d: [x_hi, x_lo, x_hi] . [y_hi, y_hi, y_lo] in one TF32 dot."""
    x, y = (to(t, torch.float32) for t in make_points(20, 30, 3))
    pair = prepare_pair(x, y, "tf32x3")
    assert (pair.D, pair.DP, pair.PREC, pair.DOT) == (9, 16, "tf32", 0)
    hi, lo, hi2 = pair.x[0, :, 0:3], pair.x[0, :, 3:6], pair.x[0, :, 6:9]
    assert torch.equal(hi, hi2) and torch.equal(pair.y[0, :, 0:3], pair.y[0, :, 3:6])
    # hi is a TF32 value (13 low bits clear) and hi + lo is the centred point.
    assert (hi.contiguous().view(torch.int32) & 0x1FFF).eq(0).all()
    z = (x.mean(0) + y.mean(0)) / 2
    assert torch.equal(hi + lo, x - z)
    assert lo.abs().max() <= 2.0 ** -11 * (x - z).abs().max()
    assert torch.equal(pair.xn[0], ((x - z) ** 2).sum(-1))
    # The swapped pair holds the same three products.
    xs, ys = pair.x[0, :, :9], pair.y[0, :, :9]
    sw = prepare_pair(y, x, "tf32x3")
    assert torch.allclose(xs @ ys.T, (sw.y[0, :, :9] @ sw.x[0, :, :9].T), rtol=0, atol=1e-6)
    # Only float32 tf32x3 at 3d <= SPLIT_MAX_K is split.
    assert prepare_pair(x, y, "tf32").D == 3
    big = torch.randn(20, 30, device=DEVICE)
    assert prepare_pair(big, big, "tf32x3").PREC == "tf32x3"
    # Half points are prepared as the float32 copies of their values: split too, bitwise that pair.
    xh, yh = x.half(), y.half()
    half_pair, copy_pair = prepare_pair(xh, yh, "tf32x3"), prepare_pair(xh.float(), yh.float(), "tf32x3")
    assert half_pair.D == 9 and half_pair.x.dtype == torch.float32
    assert torch.equal(half_pair.x, copy_pair.x) and torch.equal(half_pair.yn, copy_pair.yn)


def test_half_tf32_layout(override):
    """"tf32" on fp32 points: fp16 copies scaled by a power of two, k2 rescaled to match."""
    d = config.half_tf32_min_d
    x, y = (to(t, torch.float32) for t in make_points(20, 30, d))
    pair = prepare_pair(x, y, "tf32")
    assert pair.x.dtype == pair.y.dtype == torch.float16 and pair.PREC == "tf32"
    mant, exp = math.frexp(pair.scale)
    assert mant == 0.5 and pair.scale > 1
    z = (x.mean(0) + y.mean(0)) / 2
    c = torch.cat([x - z, y - z])
    # The largest scaled coordinate is in [2^13, 2^14): no overflow, 11 significant bits.
    assert 2.0 ** 13 <= (c * pair.scale).abs().max() < 2.0 ** 14
    assert torch.equal(pair.x[0, :, :d], ((x - z) * pair.scale).half())
    # Norms of the rounded points (the expansion is that of the points the dots see).
    assert torch.equal(pair.xn[0], pair.x[0, :, :d].float().square().sum(-1))
    assert pair.k2(2.0, 0.5) == pytest.approx(2.0 * LOG2E / 0.5 / pair.scale ** 2, rel=1e-15)
    assert prepare_pair(y, x, "tf32").scale == pair.scale          # the transposed call
    # Only fp32 "tf32" pairs are scaled; the knob off keeps fp32 operands on TF32.
    assert prepare_pair(x, y, "tf32x3").scale == 1.0
    assert prepare_pair(x.half(), y.half(), "tf32").scale == prepare_pair(x.half().float(), y.half().float(),
                                                                         "tf32").scale   # half points as fp32
    assert prepare_pair(x[:, :d - 1], y[:, :d - 1], "tf32").x.dtype == torch.float32   # low d
    with config.override(half_tf32_min_d=d - 1):                           # the smallest d is a switch
        assert prepare_pair(x[:, :d - 1], y[:, :d - 1], "tf32").x.dtype == torch.float16
    override(half_tf32=False)
    clear_cache()
    plain = prepare_pair(x, y, "tf32")
    assert plain.x.dtype == torch.float32 and plain.scale == 1.0
    clear_cache()


@pytest.mark.parametrize("spread", [1e-7, 1e6])
def test_half_tf32_extreme_coordinates(spread):
    """Coordinates far below and far above fp16's range keep "tf32" accuracy (the scale absorbs them)."""
    xd, yd = make_points(40, 30, config.half_tf32_min_d, offset=3.0)
    xd, yd = xd * spread, yd * spread
    h = make_vec((30,))
    eps = 0.3 * spread ** 2
    out = lse_cost(to(xd, torch.float32), to(yd, torch.float32), to(h, torch.float32), eps=eps,
                   backend="triton", precision="tf32")
    ref = lse_cost_torch(xd, yd, h, eps=eps)
    assert torch.isfinite(out).all()
    assert _err_lse(out, ref) < tol(torch.float32, "tf32")


def test_tuned_launch_reuses_the_chosen_config():
    """After the first call of a key, launches skip the autotuner and give the same result."""
    import importlib

    softmin_module = importlib.import_module("otlinop.kernels.softmin")
    x, y = (to(t, torch.float32) for t in make_points(33, 21, 5, seed=7))
    h = to(make_vec((21,), seed=8), torch.float32)
    launch = softmin_module._LSE_LAUNCH
    launch._configs.clear()
    first = lse_cost(x, y, h, eps=0.3, backend="triton")
    assert len(launch._configs) == 1
    (cfg,) = launch._configs.values()
    assert "BLOCK_M" in cfg.all_kwargs()
    assert torch.equal(first, lse_cost(x, y, h, eps=0.3, backend="triton"))
    assert len(launch._configs) == 1


def test_deterministic_with_splits():
    hook = dict(_splits=forced_splits(70, 3))
    x, y, f, g, V, log_a, log_b = (to(t, torch.float32) for t in _plan_inputs(40, 70, 5, None, 5, True))
    a = plan_apply(x, y, f, g, V, eps=0.1, log_a=log_a, log_b=log_b, backend="triton", **hook)
    assert torch.equal(a, plan_apply(x, y, f, g, V, eps=0.1, log_a=log_a, log_b=log_b, backend="triton", **hook))
    a = lse_cost(x, y, g, eps=0.1, backend="triton", **hook)
    assert torch.equal(a, lse_cost(x, y, g, eps=0.1, backend="triton", **hook))


@pytest.mark.parametrize("precision", [None, *PRECISIONS])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_precision_modes_accepted(precision, backend):
    x, y = (to(t, torch.float32) for t in make_points(7, 9, 2))
    h = torch.zeros(9, device=DEVICE)
    out = lse_cost(x, y, h, eps=0.5, backend=backend, precision=precision)
    assert _err_lse(out, dense_lse(x, y, h, 0.5, 1.0)) < tol(torch.float32, precision)


def test_default_precision_is_accurate():
    assert DEFAULT_PRECISION == "tf32x3"


def test_backend_dispatch(monkeypatch):
    x, y = make_points(7, 9, 2)
    h = torch.zeros(9, dtype=torch.float64)
    # float64 on CPU: the reference, bitwise.
    assert torch.equal(lse_cost(x, y, h, eps=0.5), lse_cost_torch(x, y, h, eps=0.5))
    assert resolve_backend("f", None, x) == "torch"
    assert resolve_backend("f", None, x.float()) == ("torch" if x.device.type == "cpu" else "triton")
    if CUDA:
        assert resolve_backend("f", None, x.float().cuda()) == "triton"
        assert resolve_backend("f", None, x.cuda()) == "torch"  # float64
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
            lse_cost(x.float(), y.float(), h.float(), eps=0.5, backend="triton")


def test_torch_reference_row_blocks(override):
    x, y, f, g, V, log_a, log_b = _plan_inputs(50, 33, 3, 2, 5, True)
    full = plan_apply_torch(x, y, f, g, V, eps=0.2, log_a=log_a, log_b=log_b)
    override(torch_block_bytes=2 * 33 * 8 * 2 * 7)
    # The blocks of this call: batch 2, 33 columns, float64, 2 temporaries per entry.
    blocks = list(row_blocks(50, 33, 2, 8, temporaries=2))
    assert len(blocks) >= 7  # 50 rows in blocks of 7 rows or fewer
    assert [b.start for b in blocks[1:]] == [b.stop for b in blocks[:-1]] and blocks[-1].stop == 50
    blocked = plan_apply_torch(x, y, f, g, V, eps=0.2, log_a=log_a, log_b=log_b)
    # Other row blocks run other matmul shapes: the float64 sums of 33 terms (and the
    # exponentials of logits of size ~|C|/eps) reassociate, which moved results by
    # 1.9e-14 on a fresh machine. 1e-12 sits above that and far below any wrong block.
    torch.testing.assert_close(blocked, full, rtol=1e-12, atol=1e-300)


def test_empty_sizes():
    x, y = make_points(5, 4, 2)
    h = torch.zeros(4, dtype=torch.float64)
    assert lse_cost(x[:0], y, h, eps=1.0).shape == (0,)
    assert torch.all(lse_cost(x, y[:0], h[:0], eps=1.0) == -math.inf)
    assert torch.all(plan_apply(x, y[:0], torch.zeros(5, dtype=torch.float64), h[:0], eps=1.0) == 0)


def test_finite_check(override, monkeypatch):
    x, y = (to(t, torch.float32) for t in make_points(7, 9, 2))
    h = torch.zeros(9, device=DEVICE)
    bad = x.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="lse_cost: x contains NaN or inf"):
        lse_cost(bad, y, h, eps=1.0)
    hb = h.clone()
    hb[2] = math.inf
    with pytest.raises(ValueError, match=r"softmin: h contains NaN or \+inf"):
        softmin(x, y, hb, eps=1.0)
    V = torch.ones(9, 2, device=DEVICE)
    V[0, 0] = -math.inf
    with pytest.raises(ValueError, match="plan_apply: V contains NaN or inf"):
        plan_apply(x, y, torch.zeros(7, device=DEVICE), h, V, eps=1.0)
    override(check_finite=False)
    lse_cost(bad, y, h, eps=1.0)  # no check, no error


# --------------------------------------------------------------------------
# 3. Error messages
# --------------------------------------------------------------------------


def _ok_args(n=512, m=512, d=3):
    x, y = torch.zeros(n, d), torch.zeros(m, d)
    return x, y, torch.zeros(n), torch.zeros(m)


ERROR_CASES = [
    # (callable, exception, message pattern)
    (lambda: plan_apply(*_ok_args(), torch.zeros(511, 3), eps=1.0),
     ValueError, r"plan_apply: V has shape \(511, 3\), expected \(512,\) or \(512, k\)"),
    (lambda: plan_apply(torch.zeros(2, 512, 3), torch.zeros(2, 512, 3), torch.zeros(512), torch.zeros(512),
                        torch.zeros(512, 3), eps=1.0),
     ValueError, r"plan_apply: V has shape \(512, 3\), expected \(2, 512\) or \(2, 512, k\)"),
    (lambda: lse_cost(torch.zeros(5, 3), torch.zeros(4, 2), torch.zeros(4), eps=1.0),
     ValueError, r"lse_cost: x and y must have the same dimension d, got x \(5, 3\) and y \(4, 2\)"),
    (lambda: lse_cost(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(5), eps=1.0),
     ValueError, r"lse_cost: h has shape \(5,\), expected \(4,\)"),
    (lambda: lse_cost(torch.zeros(2, 5, 3), torch.zeros(3, 4, 3), torch.zeros(4), eps=1.0),
     ValueError, r"batch sizes"),
    (lambda: softmin(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(4), eps=0.0),
     ValueError, r"softmin: eps must be positive and finite, got 0.0"),
    (lambda: softmin(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(4), eps=math.inf),
     ValueError, r"eps must be positive and finite, got inf"),
    (lambda: softmin(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(4), eps=1.0, cost_scale=-1),
     ValueError, r"cost_scale must be positive and finite"),
    (lambda: lse_cost(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(4), eps=1.0, backend="cuda"),
     ValueError, r"lse_cost: backend must be None or 'auto' \(.*\), 'torch' or 'triton', got 'cuda'"),
    (lambda: lse_cost(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(4), eps=1.0, precision="fp64"),
     ValueError, r"lse_cost: precision must be None \(.*\) or one of 'ieee', 'tf32', 'tf32x3', got 'fp64'"),
    (lambda: lse_cost(torch.zeros(5, 3), torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4), eps=1.0),
     TypeError, r"lse_cost: y has dtype torch.float64, expected torch.float32 like x"),
    (lambda: lse_cost(torch.zeros(5, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64),
                      torch.zeros(4), eps=1.0),
     TypeError, r"lse_cost: h has dtype torch.float32, expected torch.float64"),
    (lambda: lse_cost(torch.zeros(5, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64),
                      torch.zeros(4, dtype=torch.float64), eps=1.0, backend="triton"),
     TypeError, r"backend='triton' supports float32, float16 and bfloat16 points; x has dtype torch.float64"),
    (lambda: lse_cost(torch.zeros(5), torch.zeros(4, 3), torch.zeros(4), eps=1.0),
     ValueError, r"lse_cost: x has shape \(5,\), expected \(n, d\) or \(B, n, d\)"),
    (lambda: lse_cost([[0.0]], torch.zeros(4, 1), torch.zeros(4), eps=1.0),
     TypeError, r"lse_cost: x must be a torch.Tensor, got list"),
    (lambda: plan_apply(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(4), torch.zeros(4), eps=1.0),
     ValueError, r"plan_apply: f has shape \(4,\), expected \(5,\)"),
    (lambda: plan_apply(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(5), torch.zeros(4), eps=1.0,
                        log_b=torch.zeros(5)),
     ValueError, r"plan_apply: log_b has shape \(5,\), expected \(4,\)"),
    (lambda: plan_apply(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(5), None, eps=1.0),
     TypeError, r"plan_apply: g must be a torch.Tensor of shape \(4,\), got None"),
    (lambda: plan_bilinear(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(5), torch.zeros(4),
                           torch.zeros(5, 2), torch.zeros(4, 3), torch.zeros(4, 1), eps=1.0),
     ValueError, r"plan_bilinear: V has shape \(4, 3\), expected \(4, 2\)"),
    (lambda: plan_bilinear(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(5), torch.zeros(4),
                           torch.zeros(5, 2), torch.zeros(4, 2), torch.zeros(3, 1), eps=1.0),
     ValueError, r"plan_bilinear: Y has shape \(3, 1\), expected \(4, e\)"),
    (lambda: plan_bilinear(torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(5), torch.zeros(4),
                           torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 1), eps=1.0),
     ValueError, r"plan_bilinear: W has shape \(4, 2\), expected \(5, k\)"),
    (lambda: lse_cost(torch.zeros(5, 0), torch.zeros(4, 0), torch.zeros(4), eps=1.0),
     ValueError, r"0 coordinates"),
]


@pytest.mark.parametrize("call,exc,match", ERROR_CASES)
def test_error_messages(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@requires_cuda
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"lse_cost: h is on device cpu, but x is on cuda"):
        lse_cost(torch.zeros(5, 3, device="cuda"), torch.zeros(4, 3, device="cuda"), torch.zeros(4), eps=1.0)


# --------------------------------------------------------------------------
# 4. GPU: realistic sizes, memory, recompilation
# --------------------------------------------------------------------------

GPU_CASES = [
    # kernel, n, m, d
    ("lse", 50_000, 50_000, 3),
    ("lse", 20_000, 30_000, 64),
    ("lse", 10_000, 10_000, 256),
    ("plan", 50_000, 40_000, 3),
    ("plan", 10_000, 20_000, 64),
    ("plan", 8_000, 8_000, 256),
    ("bilinear", 10_000, 10_000, 64),
]


@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kernel,n,m,d", GPU_CASES)
def test_gpu_large_against_float64_reference(kernel, n, m, d, precision):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen) / math.sqrt(d)
    y = torch.randn(m, d, device="cuda", generator=gen) / math.sqrt(d) + 0.5 / math.sqrt(d)
    eps = 0.1
    g = 0.3 * torch.randn(m, device="cuda", generator=gen)
    f = 0.3 * torch.randn(n, device="cuda", generator=gen)
    x64, y64, f64, g64 = x.double(), y.double(), f.double(), g.double()
    if kernel == "lse":
        out = lse_cost(x, y, g, eps=eps, precision=precision)
        err = _err_lse(out, lse_cost_torch(x64, y64, g64, eps=eps))
    elif kernel == "plan":
        V = torch.randn(m, 8, device="cuda", generator=gen)
        out = plan_apply(x, y, f, g, V, eps=eps, precision=precision)
        ref = plan_apply_torch(x64, y64, f64, g64, V.double(), eps=eps)
        err = _err_scaled(out, ref, plan_apply_torch(x64, y64, f64, g64, V.double().abs(), eps=eps))
    else:
        W = torch.randn(n, d + 1, device="cuda", generator=gen)
        out = plan_bilinear(x, y, f, g, W, y[:, :1].expand(m, d + 1).contiguous(), y, eps=eps, precision=precision)
        ref = plan_bilinear_torch(x64, y64, f64, g64, W.double(), y64[:, :1].expand(m, d + 1), y64, eps=eps)
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    print(f"{kernel} n={n} m={m} d={d} {precision}: err {err:.2e}")
    # The metric above is relative to the output scale; tf32 (and the
    # bilinear max-norm, which sees cancellation) get the tf32 budget.
    budget = tol(torch.float32, precision)
    if kernel == "bilinear" and precision != "tf32":
        budget = 10 * budget
    assert err < budget


@requires_cuda
def test_gpu_memory_n_200k():
    n = m = 200_000
    d = 3
    x = torch.randn(n, d, device="cuda")
    y = torch.randn(m, d, device="cuda")
    f, g = torch.zeros(n, device="cuda"), torch.zeros(m, device="cuda")
    # Tune first: the autotuner's benchmark allocates an L2-flush buffer.
    lse_cost(x, y, g, eps=0.5)
    plan_apply(x, y, f, g, eps=0.5)
    torch.cuda.synchronize()
    for call in (lambda: lse_cost(x, y, g, eps=0.5), lambda: plan_apply(x, y, f, g, eps=0.5)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert torch.isfinite(out).all()
        assert extra < 100 * 2**20, f"peak extra allocation {extra / 2**20:.1f} MiB"


_TUNE_TWICE = """
import torch
from otlinop.kernels import lse_cost
from otlinop.kernels.softmin import _lse_kernel

timed = []
bench = _lse_kernel._bench
_lse_kernel._bench = lambda *args, **kwargs: (timed.append(1), bench(*args, **kwargs))[1]
x, y = torch.randn(3000, 8, device="cuda"), torch.randn(5000, 8, device="cuda")
lse_cost(x, y, torch.zeros(5000, device="cuda"), eps=0.5)
print("CONFIGS TIMED", len(timed))
"""


@requires_cuda
def test_gpu_autotune_timings_kept_across_processes(tmp_path):
    """A second process with the same Triton cache reuses the tuning: no config is timed again."""
    import subprocess
    import sys

    if not AUTOTUNE_DISK_CACHE:
        pytest.skip("this Triton's autotuner cannot keep its timings on disk (cache_results)")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    counts = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _TUNE_TWICE], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        counts.append(int(run.stdout.split("CONFIGS TIMED")[1].split()[0]))
    assert counts[0] > 1 and counts[1] == 0, counts


@requires_cuda
def test_gpu_eps_change_does_not_recompile():
    from otlinop.kernels.softmin import _lse_kernel

    x, y = torch.randn(3000, 16, device="cuda"), torch.randn(2000, 16, device="cuda")
    h = torch.zeros(2000, device="cuda")
    lse_cost(x, y, h, eps=1.0)

    def compiled():
        caches = getattr(_lse_kernel.fn, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton has no JITFunction.device_caches")
        return sum(len(c[0]) for c in caches.values()), len(_lse_kernel.cache)

    before = compiled()
    for eps in (0.5, 0.1, 0.01):
        lse_cost(x, y, h, eps=eps, cost_scale=0.5)
    assert compiled() == before


def test_package_works_without_triton():
    """Triton is a Linux-only dependency: without it otlinop imports, runs on the
    torch references, and backend='triton' says what is missing."""
    import subprocess
    import sys

    code = r'''
import sys
sys.modules["triton"] = None          # makes "import triton" raise ImportError
sys.modules["triton.language"] = None
import torch, otlinop
from otlinop.kernels import _triton
assert not _triton.HAS_TRITON
torch.manual_seed(0)
x, y = torch.randn(30, 2), torch.randn(20, 2)
res = otlinop.sinkhorn(x, y, blur=0.5)
x.requires_grad_(True)
value = otlinop.SamplesLoss(blur=0.5)(x, y)
value.backward()
assert torch.isfinite(x.grad).all()
import solvers
A = torch.eye(5) * 2
assert torch.allclose(solvers.cg(A, torch.ones(5)).x, torch.full((5,), 0.5))
try:
    otlinop.kernels.softmin(x.detach(), y, torch.zeros(20), eps=1.0, backend="triton")
except ValueError as err:
    assert "needs the triton package" in str(err), err
else:
    raise AssertionError("backend='triton' without triton did not raise")
print("ok")
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_interpreter_defect_is_named(monkeypatch):
    """Triton < 3.7 with numpy >= 2.4: the interpreter cannot run the kernels; a CPU call
    with backend="triton" says so instead of failing inside a kernel."""
    import numpy
    import triton

    from otlinop import PlanOperator
    from otlinop.kernels import _dispatch

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    assert "triton>=3.7" in _dispatch.interpreter_defect()
    if _dispatch.interpreting():
        x = torch.randn(5, 2)
        with pytest.raises(ValueError, match="interpreter of triton 3.6.0 cannot run with numpy 2.4.0"):
            PlanOperator(x, x, torch.zeros(5), torch.zeros(5), eps=1.0, backend="triton") @ torch.ones(5)
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert _dispatch.interpreter_defect() is None
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    monkeypatch.setattr(numpy, "__version__", "2.5.2")
    assert _dispatch.interpreter_defect() is None
