"""The truncated plan: plan_truncate, the padded-layout products and
TruncatedPlanOperator (with its certified bound), the HVP on it, and
solvers.cg(graph=True)."""

import functools
import math

import pytest
import torch

import solvers
from otlinop.hessian import HessianOperator
from otlinop.hvp import hvp
from otlinop.kernels import ell_bilinear, ell_matmat, ell_matmat_torch, plan_truncate, plan_truncate_torch
from otlinop.kernels.ell import live_slots
from otlinop.plan import PlanOperator
from otlinop.sinkhorn import sinkhorn
from otlinop.truncated import TruncatedPlanOperator, truncate_plan

from operator_battery import OperatorBattery
from conftest import counting_graphs, requires_cuda

F64 = torch.float64
# Triton runs on the GPU when there is one, else in the interpreter on CPU tensors.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(*ts):
    return [t.to(DEV) for t in ts]


def _cpu(*ts):
    return [t.cpu() for t in ts]


def _data(n, m, d, *, dtype=F64, device="cpu", seed=0, shift=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    y = torch.randn(m, d, generator=gen, dtype=F64) + shift
    f = torch.randn(n, generator=gen, dtype=F64)
    g = torch.randn(m, generator=gen, dtype=F64)
    a = torch.rand(n, generator=gen, dtype=F64) + 0.5
    b = torch.rand(m, generator=gen, dtype=F64) + 0.5
    return [t.to(device=device, dtype=dtype) for t in (x, y, f, g, a / a.sum(), b / b.sum())]


def _log_plan(x, y, f, g, a, b, eps):
    C = torch.cdist(x.double(), y.double()).square()
    return (f.double()[:, None] + g.double()[None, :] - C) / eps + a.double().log()[:, None] + b.double().log()[None, :]


@functools.lru_cache(maxsize=None)
def _converged(n, m, d, eps, seed=0):
    """Converged float64 potentials: a plan that truncation makes sparse for d >= 16."""
    x, y, _, _, a, b = _data(n, m, d, seed=seed)
    res = sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-13, max_iter=50_000)
    return x, y, res.f, res.g, res.a, res.b, res.eps


# --------------------------------------------------------------------------
# plan_truncate
# --------------------------------------------------------------------------


def _thresholds(n, m, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rt = torch.randn(n, generator=gen, dtype=F64) - 6.0
    ct = torch.randn(m, generator=gen, dtype=F64)
    return rt, ct


def test_truncate_torch_keeps_exactly_the_rule():
    x, y, f, g, a, b = _data(40, 30, 3)
    rt, ct = _thresholds(40, 30)
    ct[4] = math.inf                       # keep nothing in column 4
    vals, cols, counts = plan_truncate_torch(x, y, f, g, eps=0.3, row_threshold=rt, col_threshold=ct, capacity=30,
                                             log_a=a.log(), log_b=b.log())
    L = _log_plan(x, y, f, g, a, b, 0.3)
    keep = L >= rt[:, None] + ct[None, :]
    assert keep.any() and not keep.all()
    assert torch.equal(counts.long(), keep.sum(1))
    for i in range(40):
        c = int(counts[i])
        expect = keep[i].nonzero()[:, 0]
        assert torch.equal(cols[:c, i].long(), expect)                      # ascending columns
        torch.testing.assert_close(vals[:c, i], L[i, expect].exp(), rtol=1e-12, atol=0)
        assert (vals[c:, i] == 0).all() and (cols[c:, i] == 0).all()         # padding
    assert not (cols == 4).logical_and(vals != 0).any()


def test_truncate_overflow_reports_full_counts():
    x, y, f, g, a, b = _data(20, 25, 2)
    rt = torch.full((20,), -1e9, dtype=F64)          # keep everything
    ct = torch.zeros(25, dtype=F64)
    vals, cols, counts = plan_truncate_torch(x, y, f, g, eps=1.0, row_threshold=rt, col_threshold=ct, capacity=7)
    assert (counts == 25).all() and vals.shape == (7, 20)
    assert torch.equal(cols[:, 0].long(), torch.arange(7))


@pytest.mark.parametrize("d,precision", [(3, "tf32x3"), (24, "tf32x3"), (5, "ieee"), (70, "tf32x3")])
def test_truncate_triton_matches_torch(d, precision):
    x, y, f, g, a, b = _data(70, 50, d, dtype=torch.float32)
    L = _log_plan(x, y, f, g, a, b, 0.7 * d)
    rt = torch.quantile(L, 0.8, dim=1).float() - 0.1          # about a fifth of each row
    ct = torch.zeros(50)
    ct[3] = math.inf
    a[5] = 0.0                                                # a zero weight keeps nothing
    la = a.log()
    args = dict(eps=0.7 * d, row_threshold=rt, col_threshold=ct, capacity=64, log_a=la, log_b=b.log())
    dargs = {**args, **dict(zip(("row_threshold", "col_threshold", "log_a", "log_b"),
                                _dev(rt, ct, la, b.log())))}
    tv, tc, tn = _cpu(*plan_truncate(*_dev(x, y, f, g), backend="triton", precision=precision, **dargs))
    rv, rc, rn = plan_truncate_torch(x.double(), y.double(), f.double(), g.double(),
                                     **{**args, "row_threshold": rt.double(), "col_threshold": ct.double(),
                                        "log_a": la.double(), "log_b": b.log().double()})
    assert tn[5] == 0 and (tn > 0).sum() > 60
    # Entries within rounding of the threshold may go either way: compare the kept sets
    # away from it, and the values where both kept an entry.
    keep = (L >= rt.double()[:, None] + ct.double()[None, :])
    keep[5] = False
    near = (L - rt.double()[:, None] - ct.double()[None, :]).abs() < 1e-3
    for s_vals, s_cols, s_counts in ((tv, tc, tn), (rv, rc, rn)):
        got = torch.zeros_like(keep)
        for i in range(70):
            got[i, s_cols[:int(s_counts[i]), i].long()] = True
        assert torch.equal(got & ~near, keep & ~near)
    dense_t = torch.zeros(70, 50, dtype=F64)
    dense_r = torch.zeros(70, 50, dtype=F64)
    for dense, vals, cols, counts in ((dense_t, tv, tc, tn), (dense_r, rv, rc, rn)):
        for i in range(70):
            c = int(counts[i])
            dense[i, cols[:c, i].long()] = vals[:c, i].double()
    both = (dense_t > 0) & (dense_r > 0)
    torch.testing.assert_close(dense_t[both], dense_r[both], rtol=2e-5, atol=0)


def test_truncate_is_deterministic_and_validates():
    x, y, f, g, a, b = _data(50, 40, 4, dtype=torch.float32, device=DEV)
    rt, ct = (t.float().to(DEV) for t in _thresholds(50, 40))
    first = plan_truncate(x, y, f, g, eps=0.5, row_threshold=rt, col_threshold=ct, capacity=16, backend="triton")
    again = plan_truncate(x, y, f, g, eps=0.5, row_threshold=rt, col_threshold=ct, capacity=16, backend="triton")
    for u, v in zip(first, again):
        assert torch.equal(u, v)
    bad = rt.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="row_threshold contains NaN or -inf"):
        plan_truncate(x, y, f, g, eps=0.5, row_threshold=bad, col_threshold=ct, capacity=4)
    with pytest.raises(ValueError, match="capacity must be a non-negative int"):
        plan_truncate(x, y, f, g, eps=0.5, row_threshold=rt, col_threshold=ct, capacity=-1)
    with pytest.raises(ValueError, match="batched inputs are not supported"):
        plan_truncate(x[None], y, f, g, eps=0.5, row_threshold=rt, col_threshold=ct, capacity=4)
    with pytest.raises(ValueError, match=r"col_threshold has shape \(39,\)"):
        plan_truncate(x, y, f, g, eps=0.5, row_threshold=rt, col_threshold=ct[:-1], capacity=4)


# --------------------------------------------------------------------------
# Products with the layout
# --------------------------------------------------------------------------


def _layout(n=90, m=60, cap=24, dtype=torch.float32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, cap + 1, (n,), generator=gen, dtype=torch.int32)
    vals = torch.rand(cap, n, generator=gen, dtype=F64).to(dtype)
    cols = torch.randint(0, m, (cap, n), generator=gen, dtype=torch.int32)
    live = torch.arange(cap)[:, None] < counts[None, :]
    vals, cols = torch.where(live, vals, 0).to(dtype), torch.where(live, cols, 0)
    dense = torch.zeros(n, m, dtype=F64)
    for i in range(n):
        for s in range(int(counts[i])):
            dense[i, cols[s, i]] += vals[s, i].double()
    return vals, cols, counts, dense


@pytest.mark.parametrize("k", [None, 1, 5, 37])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ell_matmat_against_dense(k, backend):
    vals, cols, counts, dense = _layout()
    V = torch.randn(60) if k is None else torch.randn(60, k)
    dev = DEV if backend == "triton" else "cpu"
    out = ell_matmat(*[t.to(dev) for t in (vals, cols, counts, V)], m=60, backend=backend).cpu()
    assert out.shape == ((90,) if k is None else (90, k))
    torch.testing.assert_close(out.double(), dense @ V.double(), rtol=1e-5, atol=1e-5)


def test_ell_products_skip_the_padding():
    vals, cols, counts, dense = _layout()
    V = torch.randn(60, 3)
    V[0] = float("nan")                                   # the padding points at column 0
    used = (dense[:, 0] != 0)
    for backend, dev in (("torch", "cpu"), ("triton", DEV)):
        out = ell_matmat(*[t.to(dev) for t in (vals, cols, counts, V)], m=60, backend=backend).cpu()
        assert torch.isnan(out[used]).all() and torch.isfinite(out[~used]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ell_bilinear_against_dense(backend):
    vals, cols, counts, dense = _layout()
    W, V, Y = torch.randn(90, 6), torch.randn(60, 6), torch.randn(60, 5)
    dev = DEV if backend == "triton" else "cpu"
    out = ell_bilinear(*[t.to(dev) for t in (vals, cols, counts, W, V, Y)], m=60, backend=backend).cpu()
    ref = torch.einsum("ij,ik,jk,je->ie", dense, W.double(), V.double(), Y.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_ell_checks():
    vals, cols, counts, _ = _layout()
    with pytest.raises(TypeError, match="columns and counts must be int32"):
        ell_matmat(vals, cols.long(), counts, torch.randn(60), m=60)
    with pytest.raises(ValueError, match=r"V has shape \(59,\)"):
        ell_matmat(vals, cols, counts, torch.randn(59), m=60)
    with pytest.raises(TypeError, match="V has dtype torch.float64"):
        ell_matmat_torch(vals, cols, counts, torch.randn(60, dtype=F64), m=60)


# --------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------


def _sparse_problem():
    x, y, f, g, a, b, eps = _converged(160, 120, 32, 0.25)
    P = PlanOperator(x, y, f, g, eps=eps, a=a, b=b)
    return P, P.truncated(1e-8)


class TestTruncatedPlanBattery(OperatorBattery):
    has_diagonal = True

    def make(self):
        P, Pt = _sparse_problem()
        assert isinstance(Pt, TruncatedPlanOperator)
        return Pt, Pt.to_dense()


class TestTruncatedSquareBattery(OperatorBattery):
    """Square (n = m), so that the diagonal is meaningful; transposed layout."""

    def make(self):
        x, y, f, g, a, b, eps = _converged(100, 100, 32, 0.25, seed=2)
        Pt = truncate_plan(PlanOperator(x, y, f, g, eps=eps, a=a, b=b), 1e-8, max_fill=1.0).T
        assert isinstance(Pt, TruncatedPlanOperator)
        return Pt, Pt.to_dense()


def test_truncated_certified_bound_and_masses():
    P, Pt = _sparse_problem()
    assert isinstance(Pt, TruncatedPlanOperator) and Pt.fill < 0.2 and Pt.T.T is Pt
    D, Dt = P.to_dense(), Pt.to_dense()
    kept = Dt > 0
    torch.testing.assert_close(Dt[kept], D[kept], rtol=1e-12, atol=0)     # kept entries are P's
    ah, bh = P.row_sums(), P.col_sums()
    n, m = P.shape
    E = (D - Dt) / (ah.sqrt()[:, None] * bh.sqrt()[None, :])
    assert float(torch.linalg.matrix_norm(E, 2)) <= 1e-8
    # The rule itself: everything dropped is below tol sqrt(ah_i bh_j / (n m)).
    bound = 1e-8 * (ah[:, None] * bh[None, :] / (n * m)).sqrt()
    assert bool((D[~kept] < bound[~kept]).all()) and bool((D[kept] >= bound[kept]).all())
    # Dropped row mass <= tol sqrt(ah_i sum(ah) / n).
    assert bool((ah - Pt.row_sums() <= 1e-8 * (ah * ah.sum() / n).sqrt() * (1 + 1e-9)).all())
    torch.testing.assert_close(Pt.col_sums(), Dt.sum(0), rtol=1e-12, atol=0)
    u = torch.randn(n, dtype=F64)
    torch.testing.assert_close(Pt.squared().T @ u, (Dt * Dt).T @ u, rtol=1e-12, atol=0)
    W, V, Y = torch.randn(n, 4, dtype=F64), torch.randn(m, 4, dtype=F64), torch.randn(m, 3, dtype=F64)
    torch.testing.assert_close(Pt.bilinear(W, V, Y), torch.einsum("ij,ik,jk,je->ie", Dt, W, V, Y),
                               rtol=1e-12, atol=1e-30)
    assert "nnz=" in repr(Pt)


def test_truncated_gradient_flows_to_the_operand():
    _, Pt = _sparse_problem()
    V = torch.randn(Pt.shape[1], 2, dtype=F64, requires_grad=True)
    W = torch.randn(Pt.shape[0], 2, dtype=F64)
    (W * (Pt @ V)).sum().backward()
    torch.testing.assert_close(V.grad, Pt.T @ W, rtol=1e-12, atol=0)


def test_truncated_falls_back_when_dense_and_checks_arguments():
    x, y, f, g, a, b = _data(60, 50, 2)
    P = PlanOperator(x, y, f, g, eps=5.0, a=a, b=b)
    assert P.truncated(1e-8) is P                       # nearly every entry matters at d = 2
    with pytest.raises(ValueError, match=r"tol must be in \(0, 1\)"):
        P.truncated(0.0)
    with pytest.raises(TypeError, match=r"PlanOperator.truncated: tol must be a number in \(0, 1\), got str"):
        P.truncated("1e-8")
    with pytest.raises(ValueError, match="max_fill must be in"):
        P.truncated(1e-8, max_fill=0)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        P.truncated(1e-8, capacity=0)


def test_truncated_second_pass_when_capacity_is_short():
    x, y, f, g, a, b, eps = _converged(160, 120, 32, 0.25)
    P = PlanOperator(x, y, f, g, eps=eps, a=a, b=b)
    small = truncate_plan(P, 1e-8, capacity=2)
    full = truncate_plan(P, 1e-8)
    assert int(small.counts.max()) > 2
    assert torch.equal(small.to_dense(), full.to_dense())


def test_truncated_triton_interpreter_matches_torch():
    x, y, f, g, a, b, eps = _converged(120, 90, 32, 0.25)
    args = [t.float().to(DEV) for t in (x, y, f, g)]
    Pt = PlanOperator(*args, eps=eps, a=a.float().to(DEV), b=b.float().to(DEV), backend="triton").truncated(1e-6)
    Pr = PlanOperator(x, y, f, g, eps=eps, a=a, b=b).truncated(1e-6)
    assert isinstance(Pt, TruncatedPlanOperator)
    # Entries near the threshold may be kept by one backend only: they weigh at most
    # about tol of a row's mass.
    v = torch.rand(90, dtype=F64)
    torch.testing.assert_close((Pt @ v.float().to(DEV)).double().cpu(), Pr @ v, rtol=1e-4,
                               atol=1e-6 * float(Pr.row_sums().max()))
    u = torch.rand(120, dtype=F64)
    torch.testing.assert_close((Pt.T @ u.float().to(DEV)).double().cpu(), Pr.T @ u, rtol=1e-4,
                               atol=1e-6 * float(Pr.col_sums().max()))


# --------------------------------------------------------------------------
# HVP and the Hessian on the truncated plan
# --------------------------------------------------------------------------


def test_hvp_on_truncated_plan_matches_the_exact_hvp():
    x, y, f, g, a, b, eps = _converged(160, 120, 32, 0.25)
    A, B = torch.randn_like(x), torch.randn_like(y)
    exact = hvp(x, y, f, g, A, B, eps=eps, a=a, b=b, M=solvers.jacobi())
    trunc = hvp(x, y, f, g, A, B, eps=eps, a=a, b=b, M=solvers.jacobi(), truncate=1e-8)
    assert exact[2].converged and trunc[2].converged
    for e, t in zip(exact[:2], trunc[:2]):
        assert float((t - e).norm() / e.norm()) < 1e-7
    # and a truncation coarse enough to show: the error follows tol
    coarse = hvp(x, y, f, g, A, B, eps=eps, a=a, b=b, M=solvers.jacobi(), truncate=1e-2)
    assert float((coarse[0] - exact[0]).norm() / exact[0].norm()) > 1e-7


def test_hessian_on_truncated_plan_is_psd_with_null_vector():
    _, Pt = _sparse_problem()
    S = HessianOperator.from_plan(Pt, eps=0.25, ridge=0.0)
    Sd = S.to_dense()
    torch.testing.assert_close(Sd, Sd.T, rtol=0, atol=1e-15)
    assert float(torch.linalg.eigvalsh(Sd).min()) > -1e-14
    one = torch.ones(Pt.shape[1], dtype=F64)
    assert float((S @ one).abs().max()) < 1e-15
    torch.testing.assert_close(S.diagonal(), Sd.diagonal(), rtol=1e-12, atol=1e-18)


# --------------------------------------------------------------------------
# cg(graph=True)
# --------------------------------------------------------------------------


def test_cg_graph_is_ignored_on_the_cpu():
    _, Pt = _sparse_problem()
    S = HessianOperator.from_plan(Pt, eps=0.25)
    rhs = torch.randn(Pt.shape[1], dtype=F64)
    rhs -= rhs.mean()
    eager = solvers.cg(S, rhs, M=solvers.jacobi(), rtol=1e-10)
    graphed = solvers.cg(S, rhs, M=solvers.jacobi(), rtol=1e-10, graph=True)
    assert eager.converged and torch.equal(eager.x, graphed.x) and eager.n_iter == graphed.n_iter


@requires_cuda
@pytest.mark.parametrize("truncate", [None, 1e-8])
@pytest.mark.parametrize("M", [None, "jacobi", "neumann"])
def test_gpu_cg_graph_is_bitwise_the_eager_loop(truncate, M):
    x, y, f, g, a, b, eps = (t.cuda().float() if isinstance(t, torch.Tensor) else t
                             for t in _converged(160, 120, 32, 0.25))
    P = PlanOperator(x, y, f, g, eps=eps, a=a, b=b)
    if truncate is not None:
        P = P.truncated(truncate)
        assert isinstance(P, TruncatedPlanOperator)
    S = HessianOperator.from_plan(P, eps=eps)
    rhs = torch.randn(120, device="cuda")
    rhs -= rhs.mean()
    pre = {None: None, "jacobi": solvers.jacobi(), "neumann": solvers.neumann(2)}[M]
    eager = solvers.cg(S, rhs, M=pre, rtol=1e-5, maxiter=500)
    graphed = solvers.cg(S, rhs, M=pre, rtol=1e-5, maxiter=500, graph=True)
    assert eager.converged and graphed.converged
    assert torch.equal(eager.x, graphed.x) and eager.n_iter == graphed.n_iter
    limited = solvers.cg(S, rhs, M=pre, rtol=1e-12, maxiter=23, graph=True)
    assert limited.n_iter == 23 and not limited.converged


@requires_cuda
@pytest.mark.parametrize("truncate", [None, 1e-8])
def test_gpu_cg_graph_cache_is_bitwise_the_eager_loop(override, truncate):
    """Solves sharing a GraphCache capture once and replay: bitwise the eager loop."""
    x, y, f, g, a, b, eps = (t.cuda().float() if isinstance(t, torch.Tensor) else t
                             for t in _converged(160, 120, 32, 0.25))
    override(check_finite=False)   # the exact plan's checks read the host
    P = PlanOperator(x, y, f, g, eps=eps, a=a, b=b)
    if truncate is not None:
        P = P.truncated(truncate)
    S = HessianOperator.from_plan(P, eps=eps)
    M = solvers.jacobi().bind(S)
    graphs = counting_graphs()
    cache = solvers.GraphCache(graphs=graphs)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for scale in (1.0, 1e3, 1e-2):
        rhs = torch.randn(120, device="cuda", generator=gen) * scale
        rhs -= rhs.mean()
        eager = solvers.cg(S, rhs, M=M, rtol=1e-5, maxiter=500)
        cached = solvers.cg(S, rhs, M=M, rtol=1e-5, maxiter=500, graph=cache)
        assert eager.converged and torch.equal(eager.x, cached.x) and eager.n_iter == cached.n_iter
    assert graphs.captures == 1


@requires_cuda
def test_gpu_truncated_plan_matches_torch_at_scale():
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d, eps = 4000, 64, 0.5
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    res = sinkhorn(x, y, eps=eps, method="alternating", threshold=1e-6, max_iter=5000)
    P = PlanOperator(x, y, res.f, res.g, eps=res.eps, a=res.a, b=res.b)
    Pt = P.truncated(1e-8)
    assert isinstance(Pt, TruncatedPlanOperator) and Pt.fill < 0.05
    Pr = PlanOperator(x, y, res.f, res.g, eps=res.eps, a=res.a, b=res.b, backend="torch").truncated(1e-8)
    v = torch.rand(n, device="cuda")
    torch.testing.assert_close(Pt @ v, Pr @ v, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(Pt @ v, P @ v, rtol=1e-4, atol=1e-9)
    again = P.truncated(1e-8)
    assert torch.equal(again.values, Pt.values) and torch.equal(again.T.values, Pt.T.values)


# --------------------------------------------------------------------------
# The fused Schur product
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("k", [None, 3])
def test_ell_matmat_epilogue(backend, k):
    vals, cols, counts, dense = _layout()
    V = torch.randn(60) if k is None else torch.randn(60, k)
    scale, add_scale = torch.rand(90), torch.rand(90)
    add = torch.randn(90) if k is None else torch.randn(90, k)
    dev = DEV if backend == "triton" else "cpu"
    out = ell_matmat(*_dev(vals, cols, counts, V) if dev != "cpu" else (vals, cols, counts, V), m=60,
                     row_scale=scale.to(dev), sign=-1.0, add=add.to(dev), add_scale=add_scale.to(dev),
                     backend=backend).cpu()
    P = dense @ V.double()
    S2 = scale.double() if k is None else scale.double()[:, None]
    A2 = add_scale.double() if k is None else add_scale.double()[:, None]
    torch.testing.assert_close(out.double(), -S2 * P + A2 * add.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="add and add_scale go together"):
        ell_matmat(vals, cols, counts, V, m=60, add=add)
    with pytest.raises(ValueError, match=r"row_scale must be a tensor of shape \(90,\)"):
        ell_matmat(vals, cols, counts, V, m=60, row_scale=scale[:5])


def test_hessian_on_truncated_plan_uses_the_fused_product():
    _, Pt = _sparse_problem()
    S = HessianOperator.from_plan(Pt, eps=0.25)
    assert S._fused is not None
    v, V = torch.randn(Pt.shape[1], dtype=F64), torch.randn(Pt.shape[1], 3, dtype=F64)
    torch.testing.assert_close(S @ v, S._S @ v, rtol=1e-12, atol=1e-18)
    torch.testing.assert_close(S @ V, S._S @ V, rtol=1e-12, atol=1e-18)
    # the Triton kernels (interpreter on the CPU) agree with the composition too
    x, y, f, g, a, b, eps = _converged(160, 120, 32, 0.25)
    Pf = PlanOperator(*[t.float().to(DEV) for t in (x, y, f, g)], eps=eps, a=a.float().to(DEV),
                      b=b.float().to(DEV), backend="triton").truncated(1e-8)
    Sf = HessianOperator.from_plan(Pf, eps=eps)
    vf = v.float().to(DEV)
    torch.testing.assert_close(Sf @ vf, Sf._S @ vf, rtol=1e-4, atol=1e-6 * float((Sf._S @ vf).abs().max()))


@requires_cuda
def test_gpu_cg_graph_falls_back_when_the_operator_synchronises():
    from otlinop import Dense, LinearOperator

    gen = torch.Generator().manual_seed(5)
    Q = torch.randn(60, 60, generator=gen)
    A = (Q @ Q.T + 60 * torch.eye(60)).cuda()

    class Syncing(LinearOperator):
        """An SPD operator whose matvec reads a value on the host (not capturable)."""

        def __init__(self):
            super().__init__((60, 60), torch.float32, "cuda", is_symmetric=True)
            self.host_reads = 0

        def _matvec(self, v):
            self.host_reads += float(v.abs().max()) >= 0.0
            return A @ v

    op = Syncing()
    b = torch.randn(60, device="cuda")
    graphed = solvers.cg(op, b, rtol=1e-6, graph=True)
    eager = solvers.cg(Dense(A), b, rtol=1e-6)
    assert graphed.converged and graphed.n_iter == eager.n_iter
    torch.testing.assert_close(graphed.x, eager.x, rtol=1e-5, atol=1e-6)
    assert op.host_reads >= graphed.n_iter        # every product ran eagerly
    # nothing was left in capture mode: random numbers and allocations still work
    assert torch.rand(3, device="cuda").shape == (3,)
    assert float((A @ graphed.x - b).norm() / b.norm()) < 1e-5
    assert torch.cuda.get_sync_debug_mode() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_truncated_half_inputs(dtype):
    x, y, f, g, a, b, eps = _converged(120, 90, 32, 0.25)
    P = PlanOperator(*[t.to(dtype).to(DEV) for t in (x, y, f, g)], eps=eps, a=a.to(dtype).to(DEV),
                     b=b.to(dtype).to(DEV), backend="triton")
    Pt = P.truncated(1e-6)
    assert isinstance(Pt, TruncatedPlanOperator) and Pt.dtype == dtype
    v = torch.rand(90, dtype=dtype, device=DEV)
    # against the streaming plan of the same (rounded) inputs: half-precision storage of the values
    dense = (P @ v).double()
    err = float(((Pt @ v).double() - dense).abs().max() / dense.abs().max())
    assert err < (5e-3 if dtype == torch.float16 else 2e-2)


def test_truncated_keeps_streaming_when_the_layout_would_be_too_large():
    from otlinop.truncated import MAX_LAYOUT_ENTRIES, truncate_plan_for

    P, Pt = _sparse_problem()
    assert isinstance(Pt, TruncatedPlanOperator)
    need = int(Pt.counts.max())
    opts = dict(max_fill=0.25, capacity=None)
    assert isinstance(truncate_plan_for("truncated", P, 1e-8, max_entries=need * P.shape[0], **opts),
                      TruncatedPlanOperator)
    assert truncate_plan_for("truncated", P, 1e-8, max_entries=(need - 1) * P.shape[0], **opts) is P
    assert need * P.shape[0] <= MAX_LAYOUT_ENTRIES


def test_loss_hessian_operator_on_truncated_plan():
    from otlinop.hvp import loss_hessian_operator

    x, y, f, g, a, b, eps = _converged(160, 120, 32, 0.25)
    exact = loss_hessian_operator(x, y, f, g, wrt="xy", eps=eps, a=a, b=b, M=solvers.jacobi(), rtol=1e-11)
    trunc = loss_hessian_operator(x, y, f, g, wrt="xy", eps=eps, a=a, b=b, M=solvers.jacobi(), rtol=1e-11,
                                  truncate=1e-8)
    assert isinstance(trunc.K.P, TruncatedPlanOperator)
    v = torch.randn(exact.shape[1], dtype=F64)
    he, ht = exact @ v, trunc @ v
    assert float((ht - he).norm() / he.norm()) < 1e-7
    # symmetric, as the exact Hessian
    w = torch.randn(exact.shape[1], dtype=F64)
    assert abs(float(w @ (trunc @ v) - v @ (trunc @ w))) < 1e-9 * float(he.norm() * w.norm())


@pytest.mark.parametrize("known_nnz", [False, True])
def test_transposed_layout_from_the_row_counts(known_nnz):
    """The transpose enumerates the live entries from the running sum of the counts (empty
    rows, full rows, the padding ignored): each column's entries in ascending row order,
    with or without the entry count given."""
    from otlinop.truncated import _transpose_layout
    g = torch.Generator().manual_seed(3)
    n, m, cap = 9, 7, 4
    counts = torch.tensor([0, 4, 1, 0, 0, 3, 4, 2, 0], dtype=torch.int32)
    values = torch.zeros(cap, n, dtype=F64)
    columns = torch.zeros(cap, n, dtype=torch.int32)
    dense = torch.zeros(n, m, dtype=F64)
    for i in range(n):
        cols = torch.randperm(m, generator=g)[:int(counts[i])].sort().values
        for s, j in enumerate(cols.tolist()):
            values[s, i] = float(torch.rand((), generator=g, dtype=F64)) + 0.1
            columns[s, i] = j
            dense[i, j] = values[s, i]
    values[:, counts == 0] = 9.0          # padding: never read
    vT, cT, kT, _ = _transpose_layout(values, columns, counts, m, int(counts.sum()) if known_nnz else None)
    assert kT.tolist() == (dense != 0).sum(0).tolist()
    assert vT.shape == (int(kT.max()), m)
    for j in range(m):
        rows = dense[:, j].nonzero().flatten()
        assert cT[:int(kT[j]), j].tolist() == rows.tolist()
        assert torch.equal(vT[:int(kT[j]), j], dense[rows, j])


def test_squared_transpose_reuses_the_transposed_layout():
    """Once P.T is built, P.squared().T squares its layout (no second sort); before,
    it transposes the squared layout on first use: the same operator either way."""
    P, cold = _sparse_problem()
    sq = cold.squared()                                 # no transpose yet: sorted on first use
    assert torch.equal(sq.T.values, cold.T.values ** 2) and torch.equal(sq.T.columns, cold.T.columns)
    assert sq.T.T is sq and cold.T.T is cold
    warm = P.truncated(1e-8)
    T = warm.T
    sq = warm.squared()                                 # the transpose exists: reused
    assert sq.T.columns is T.columns and torch.equal(sq.T.values, T.values ** 2)
    assert sq.T.T is sq and T.T is warm
    sqT = T.squared()                                   # and from the transposed side
    assert sqT.T.columns is warm.columns and sqT.T.T is sqT


def test_truncation_knows_its_entry_count():
    """The truncation reads the entry count with the fullest row's: the transpose and nnz
    need no read-back of their own."""
    _, Pt = _sparse_problem()
    assert isinstance(Pt, TruncatedPlanOperator)
    assert Pt._nnz == int(Pt.counts.sum()) == Pt.T._nnz == int(Pt.T.counts.sum())
    assert torch.equal(Pt.T.to_dense(), Pt.to_dense().T)


def _dense_of_layout(values, Pt):
    """The (n, m) matrix of a layout's values, differentiably (index_put of the live slots)."""
    n, m = Pt.shape
    live = live_slots(Pt.counts, values.shape[0])
    s, i = live.nonzero(as_tuple=True)
    return torch.zeros((n, m), dtype=values.dtype).index_put((i, Pt.columns[s, i].long()), values[s, i])


def test_truncated_values_gradient_stays_on_the_layout():
    """Issue 22 item 2: with values requiring grad, products give dL/dvalues of the layout's
    shape (zero on padding), equal to dense autograd read on the kept entries; P.T reaches them too."""
    _, Pt = _sparse_problem()
    values = Pt.values.detach().clone().requires_grad_(True)
    P = TruncatedPlanOperator(values, Pt.columns, Pt.counts, Pt.shape, tol=Pt.tol)
    n, m = P.shape
    V = torch.randn(m, 3, dtype=F64, requires_grad=True)
    U = torch.randn(n, 2, dtype=F64, requires_grad=True)
    W, Z = torch.randn(n, 3, dtype=F64), torch.randn(m, 2, dtype=F64)
    loss = (W * (P @ V)).sum() + (Z * (P.T @ U)).sum() + (P @ V[:, 0]).square().sum()
    grads = torch.autograd.grad(loss, (values, V, U))
    vd = values.detach().clone().requires_grad_(True)
    Vd, Ud = V.detach().clone().requires_grad_(True), U.detach().clone().requires_grad_(True)
    D = _dense_of_layout(vd, Pt)
    loss_d = (W * (D @ Vd)).sum() + (Z * (D.T @ Ud)).sum() + (D @ Vd[:, 0]).square().sum()
    expected = torch.autograd.grad(loss_d, (vd, Vd, Ud))
    assert grads[0].shape == values.shape
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    padding = ~live_slots(Pt.counts, values.shape[0])
    assert bool((grads[0][padding] == 0).all())
    # A second backward through the cached transpose (no graph freed by the first).
    (Z * (P.T @ U)).sum().backward()
    assert values.grad is not None


def test_truncated_values_gradient_through_the_schur_product():
    _, Pt = _sparse_problem()
    values = Pt.values.detach().clone().requires_grad_(True)
    P = TruncatedPlanOperator(values, Pt.columns, Pt.counts, Pt.shape, tol=Pt.tol)
    n, m = P.shape
    V, w, d, R = (torch.randn(m, 2, dtype=F64), torch.rand(n, dtype=F64), torch.rand(m, dtype=F64),
                  torch.randn(m, 2, dtype=F64))
    (P.schur_product(V, w, d) * R).sum().backward()
    vd = values.detach().clone().requires_grad_(True)
    D = _dense_of_layout(vd, Pt)
    ((d[:, None] * V - D.T @ (w[:, None] * (D @ V))) * R).sum().backward()
    torch.testing.assert_close(values.grad, vd.grad, rtol=1e-10, atol=1e-14)
