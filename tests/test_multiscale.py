"""Multiscale Sinkhorn (issue 21): the clustering, the kept pattern and its certificate, the block-sparse plan
operator, ``sinkhorn(multiscale=...)``, ``plan_hvp`` and ``SamplesLoss(backend="multiscale")``, against the
dense path in float64 on the CPU (torch references), a few runs in Triton's interpreter, and the GPU check
of the issue's target (skipped without CUDA)."""

import math
import time
import warnings

import pytest
import torch

import otlinop
import solvers
from otlinop import Multiscale, PlanOperator, SamplesLoss, plan_hvp, sinkhorn
from otlinop.multiscale import (BlockSparsePlanOperator, Pattern, cluster_grid, coarse_pattern,
                                default_cluster_scale, prune_pattern, truncation_bound)
from operator_battery import OperatorBattery

F64 = torch.float64


def _clouds(n=80, m=60, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=F64), torch.rand(m, d, generator=g, dtype=F64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3])
def test_cluster_grid_against_brute_force(d):
    x, _ = _clouds(200, 10, d)
    a = torch.rand(200, dtype=F64)
    a[:7] = 0          # zero weights stay in their cells
    scale = 0.23
    origin = torch.full((d,), -0.1, dtype=F64)
    c = cluster_grid("test", x, a, origin=origin, scale=scale)
    cells = torch.floor((x - origin) / scale).long()
    # Clusters are contiguous in the permuted cloud, one per occupied cell.
    assert torch.equal(c.points, x[c.perm]) and torch.equal(c.weights, a[c.perm])
    assert torch.equal(c.perm[c.inverse], torch.arange(200))
    assert c.starts[0] == 0 and c.starts[-1] == 200 and bool((c.starts.diff() > 0).all())
    occupied = {tuple(v) for v in cells.tolist()}
    assert c.size == len(occupied)
    for I in range(c.size):
        members = c.perm[c.starts[I]:c.starts[I + 1]]
        assert len({tuple(v) for v in cells[members].tolist()}) == 1          # one cell each
        assert bool((c.labels[members] == I).all())
        w = a[members]
        torch.testing.assert_close(c.weight[I], w.sum())
        expected = (w[:, None] * x[members]).sum(0) / w.sum() if w.sum() > 0 else x[members].mean(0)
        torch.testing.assert_close(c.centroid[I], expected)
        torch.testing.assert_close(c.lo[I], x[members].min(0).values)
        torch.testing.assert_close(c.hi[I], x[members].max(0).values)
    # Z order: the cells' Morton keys increase along the clusters (neighbours near in memory).
    first = cells[c.perm[c.starts[:-1]]]
    keys = [sum(((int(v[k]) >> b) & 1) << (b * d + k) for b in range(62 // d) for k in range(d)) for v in first]
    assert keys == sorted(keys)


def test_cluster_grid_refuses_a_grid_too_fine_for_the_key():
    x, _ = _clouds(20, 1, 3)
    with pytest.raises(ValueError, match="sinkhorn: cluster_scale=1e-09 makes a grid of .* cells per axis"):
        cluster_grid("sinkhorn", x, torch.ones(20, dtype=F64), origin=torch.zeros(3, dtype=F64), scale=1e-9)


def test_default_cluster_scale_is_geomloss():
    assert default_cluster_scale(2.0, 3) == pytest.approx(2.0 / (math.sqrt(3) * 2000 ** (1 / 3)))


# --------------------------------------------------------------------------
# Pattern and certificate
# --------------------------------------------------------------------------
def test_coarse_pattern_is_geomloss_rule_plus_best_pairs():
    g = torch.Generator().manual_seed(3)
    X, Y = torch.rand(30, 2, generator=g, dtype=F64), torch.rand(25, 2, generator=g, dtype=F64)
    F, G = torch.randn(30, generator=g, dtype=F64) * 0.1, torch.randn(25, generator=g, dtype=F64) * 0.1
    eps, c, t = 0.01, 0.5, 3.0
    p = coarse_pattern(X, Y, F, G, eps=eps, cost_scale=c, truncate=t)
    logit = F[:, None] + G[None] - c * torch.cdist(X, Y) ** 2
    expected = logit > -t * eps
    expected[torch.arange(30), logit.argmax(1)] = True
    expected[logit.argmax(0), torch.arange(25)] = True
    assert torch.equal(p.mask(), expected)
    for I in range(30):
        row = p.idx[p.ptr[I]:p.ptr[I + 1]]
        assert torch.equal(row, row.sort().values)
    assert torch.equal(p.T.mask(), expected.T) and p.T.T is p


def test_prune_pattern_rule_subset_and_dropped_mass():
    """The re-pruning keeps a subset of the base pattern, by the rule of its docstring (brute force), and
    what it drops holds at most tol of every row's and column's weight in the dense plan (float64)."""
    P, _, (x, y, f, g, a, b, _) = _random_plan(seed=7, n=90, m=80)
    cx, cy, base = P.cx, P.cy, P.pattern
    eps, tol, margin = 0.01, 1e-3, 0.005
    pruned = prune_pattern(cx, cy, base, P.f_s, P.g_s, eps=eps, cost_scale=1.0, tol=tol, margin=margin)
    kept, allowed = pruned.mask(), base.mask()
    assert bool((kept <= allowed).all()) and 0 < pruned.nnz < base.nnz
    # Brute force: s_IJ = max_I f + max_J g + margin - gap2(box_I, box_J) over the base's pairs.
    fmax = torch.stack([P.f_s[cx.starts[I]:cx.starts[I + 1]].max() for I in range(cx.size)])
    gmax = torch.stack([P.g_s[cy.starts[J]:cy.starts[J + 1]].max() for J in range(cy.size)])
    gap = torch.clamp_min(torch.maximum(cy.lo[None] - cx.hi[:, None], cx.lo[:, None] - cy.hi[None]), 0)
    s = fmax[:, None] + gmax[None] + margin - gap.square().sum(-1)
    s = s.masked_fill(~allowed, -math.inf)
    n_I, m_J = allowed.sum(1, keepdim=True), allowed.sum(0, keepdim=True)
    heavy = ((s / eps + cy.weight.log()[None] + n_I.log() >= math.log(tol))
             | (s / eps + cx.weight.log()[:, None] + m_J.log() >= math.log(tol)))
    best = (s == s.max(1, keepdim=True).values) | (s == s.max(0, keepdim=True).values)
    assert torch.equal(kept, allowed & (heavy | best))
    full = PlanOperator(x, y, f, g, eps=eps, a=a, b=b).to_dense()
    lost = full * (allowed & ~kept)[cx.labels[:, None], cy.labels[None, :]]
    assert (lost.sum(1) / a).max() <= tol and (lost.sum(0) / b).max() <= tol


# --------------------------------------------------------------------------
# The block-sparse plan operator against its dense matrix
# --------------------------------------------------------------------------
def _random_plan(seed=0, n=70, m=50, d=2, weights=True):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, d, generator=g, dtype=F64), torch.rand(m, d, generator=g, dtype=F64)
    f, gg = torch.randn(n, generator=g, dtype=F64) * 0.05, torch.randn(m, generator=g, dtype=F64) * 0.05
    a = torch.rand(n, generator=g, dtype=F64) if weights else torch.ones(n, dtype=F64)
    b = torch.rand(m, generator=g, dtype=F64) if weights else torch.ones(m, dtype=F64)
    origin = torch.zeros(d, dtype=F64)
    cx = cluster_grid("test", x, a, origin=origin, scale=0.3)
    cy = cluster_grid("test", y, b, origin=origin, scale=0.3)
    keep = torch.rand(cx.size, cy.size, generator=g) < 0.5
    rows, cols = keep.nonzero(as_tuple=True)
    pattern = Pattern.from_mask_rows(rows, cols, cx.size, cy.size)
    eps = 0.2
    P = BlockSparsePlanOperator(cx, cy, pattern, f[cx.perm], gg[cy.perm], eps=eps, a_s=a[cx.perm], b_s=b[cy.perm])
    full = PlanOperator(x, y, f, gg, eps=eps, a=a, b=b).to_dense()
    dense = full * keep[cx.labels[:, None], cy.labels[None, :]]
    return P, dense, (x, y, f, gg, a, b, eps)


class TestBlockSparsePlanOperator(OperatorBattery):
    def make(self):
        P, dense, _ = _random_plan()
        return P, dense


class TestBlockSparsePlanOperatorSquare(OperatorBattery):
    def make(self):
        P, dense, _ = _random_plan(seed=1, n=60, m=60, d=3)
        return P, dense


def test_plan_interface_against_dense():
    P, dense, (x, y, f, g, a, b, eps) = _random_plan(seed=2)
    assert P.T.T is P and P.T.shape == (50, 70)
    torch.testing.assert_close(P.row_sums(), dense.sum(1))
    torch.testing.assert_close(P.col_sums(), dense.sum(0))
    Dr, Dc = P.marginals()
    torch.testing.assert_close(Dr.diagonal(), dense.sum(1))
    torch.testing.assert_close(Dc.diagonal(), dense.sum(0))
    torch.testing.assert_close(P.squared().to_dense(), dense ** 2)
    W, V, Y = torch.randn(70, 3, dtype=F64), torch.randn(50, 3, dtype=F64), torch.randn(50, 2, dtype=F64)
    torch.testing.assert_close(P.bilinear(W, V, Y), torch.einsum("ij,ik,jk,je->ie", dense, W, V, Y))
    torch.testing.assert_close(P.to_dense(), dense)
    assert torch.equal(P.f, f) and torch.equal(P.x, x) and 0 < P.fill < 1
    with pytest.raises(NotImplementedError, match="already block-sparse"):
        P.truncated(1e-8)


def test_plan_products_differentiate_in_the_operand():
    P, dense, _ = _random_plan(seed=4)
    V = torch.randn(50, 2, dtype=F64, requires_grad=True)
    U = torch.randn(70, 2, dtype=F64)
    (gV,) = torch.autograd.grad(((P @ V) * U).sum(), V)
    torch.testing.assert_close(gV, dense.T @ U)
    v = torch.randn(70, dtype=F64, requires_grad=True)
    (gv,) = torch.autograd.grad((P.T @ v).square().sum(), v)
    torch.testing.assert_close(gv, 2 * dense @ (dense.T @ v.detach()))


def test_hessian_from_block_sparse_plan():
    P, dense, (x, y, f, g, a, b, eps) = _random_plan(seed=5)
    S = otlinop.HessianOperator.from_plan(P, eps=eps, ridge=0.0)
    ah, bh = dense.sum(1), dense.sum(0)
    expected = torch.diag(bh) - dense.T @ torch.diag(1 / ah) @ dense
    torch.testing.assert_close(S.to_dense(), expected)
    torch.testing.assert_close(S.diagonal(), expected.diagonal())


# --------------------------------------------------------------------------
# sinkhorn(multiscale=...) against the dense solver
# --------------------------------------------------------------------------
def test_one_cluster_equals_dense():
    x, y = _clouds(50, 40)
    ms = sinkhorn(x, y, blur=0.3, threshold=1e-13, multiscale=Multiscale(cluster_scale=10.0))
    dense = sinkhorn(x, y, blur=0.3, threshold=1e-13)
    cx, cy, pattern = ms.multiscale_layout
    assert cx.size == cy.size == 1 and pattern.nnz == 1 and ms.truncation_bound == (0.0, 0.0)
    # The coarse start differs, so the potentials may differ by the dual's constant (f + t, g - t).
    t = (ms.f - dense.f).mean()
    torch.testing.assert_close(ms.f - t, dense.f, rtol=0, atol=1e-12)
    torch.testing.assert_close(ms.g + t, dense.g, rtol=0, atol=1e-12)
    torch.testing.assert_close(ms.cost, dense.cost, rtol=1e-12, atol=0)
    torch.testing.assert_close(ms.plan.to_dense(), dense.plan.to_dense(), rtol=0, atol=1e-12)


def test_large_truncate_keeps_the_plan_and_matches_dense():
    x, y = _clouds()
    ms = sinkhorn(x, y, blur=0.4, threshold=1e-11, multiscale=Multiscale(cluster_scale=0.25, truncate=40.0))
    dense = sinkhorn(x, y, blur=0.4, threshold=1e-11)
    assert ms.converged and ms.plan.fill == 1.0
    torch.testing.assert_close(ms.cost, dense.cost, rtol=1e-10, atol=0)
    torch.testing.assert_close(ms.plan.to_dense(), dense.plan.to_dense(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("blur, scale", [(0.4, 0.25), (0.25, 0.2)])
def test_certificate_holds_and_is_not_loose(blur, scale):
    x, y = _clouds()
    ms = sinkhorn(x, y, blur=blur, threshold=1e-10, multiscale=Multiscale(cluster_scale=scale))
    dense = sinkhorn(x, y, blur=blur, threshold=1e-10)
    P = ms.plan
    full = PlanOperator(x, y, ms.f, ms.g, eps=ms.eps, a=ms.a, b=ms.b).to_dense()
    kept = P.pattern.mask()[P.cx.labels[:, None], P.cy.labels[None, :]]
    assert P.fill < 1.0
    dropped_rows = ((full * ~kept).sum(1) / ms.a).max().item()
    dropped_cols = ((full * ~kept).sum(0) / ms.b).max().item()
    rows, cols = ms.truncation_bound
    assert 0 < dropped_rows <= rows <= 100 * dropped_rows
    assert 0 < dropped_cols <= cols <= 100 * dropped_cols
    # What the truncation moves is of the order of the certified mass.
    assert abs(float(ms.cost - dense.cost)) <= 10 * max(rows, cols) * float(dense.cost.abs())


def test_truncation_bound_function_on_given_potentials():
    P, dense, (x, y, f, g, a, b, eps) = _random_plan(seed=6)
    full = PlanOperator(x, y, f, g, eps=eps, a=a, b=b).to_dense()
    rows, cols = truncation_bound(P.cx, P.cy, P.pattern, P.f_s, P.g_s, eps=eps, cost_scale=1.0)
    assert ((full - dense).sum(1) / a).max() <= rows * (1 + 1e-12)
    assert ((full - dense).sum(0) / b).max() <= cols * (1 + 1e-12)


def test_result_operators_and_hvp_within_the_bound():
    x, y = _clouds()
    ms = sinkhorn(x, y, blur=0.4, threshold=1e-11, multiscale=Multiscale(cluster_scale=0.25))
    dense = sinkhorn(x, y, blur=0.4, threshold=1e-11)
    bound = max(ms.truncation_bound)
    assert 0 < bound < 0.05
    A, B = torch.randn_like(x), torch.randn_like(y)
    Hx, Hy, info = plan_hvp(ms.plan, A, B, eps=ms.eps, M=solvers.jacobi())
    Hxd, Hyd, _ = otlinop.hvp(x, y, dense.f, dense.g, A, B, eps=dense.eps, a=dense.a, b=dense.b)
    assert info.converged
    assert _rel(Hx, Hxd) < 2 * bound and _rel(Hy, Hyd) < 2 * bound
    # The result's operators are the block-sparse ones.
    H = ms.loss_hessian(wrt="x")
    HxA, _, _ = plan_hvp(ms.plan, A, eps=ms.eps)
    torch.testing.assert_close(H @ A.reshape(-1), HxA.reshape(-1), rtol=1e-8, atol=1e-12)
    S = ms.hessian(ridge=0.0)
    expected = otlinop.HessianOperator.from_plan(ms.plan, eps=ms.eps, ridge=0.0)
    v = torch.randn(60, dtype=F64)
    torch.testing.assert_close(S @ v, expected @ v)
    assert ms.dual_hessian().shape == (140, 140)
    torch.testing.assert_close(ms.transport_cost(), (ms.plan.to_dense() * torch.cdist(x, y) ** 2).sum())


def test_large_truncate_hvp_equals_dense():
    x, y = _clouds(40, 30)
    ms = sinkhorn(x, y, blur=0.4, threshold=1e-12, multiscale=Multiscale(cluster_scale=0.3, truncate=60.0))
    A = torch.randn_like(x)
    Hx, Hy, _ = plan_hvp(ms.plan, A, eps=ms.eps)
    Hxd, Hyd, _ = otlinop.hvp(x, y, ms.f, ms.g, A, eps=ms.eps, a=ms.a, b=ms.b)
    assert _rel(Hx, Hxd) < 1e-9 and _rel(Hy, Hyd) < 1e-9


def test_multiscale_schedule_and_status():
    x, y = _clouds()
    seen = []
    res = sinkhorn(x, y, blur=0.4, threshold=float("inf"), multiscale=True, callback=seen.append)
    dense = sinkhorn(x, y, blur=0.4, threshold=float("inf"))
    assert res.eps_schedule == dense.eps_schedule and res.n_iter == len(res.eps_schedule)
    assert res.converged and len(seen) == 1 and seen[0]["f"].shape == (80,)
    with pytest.warns(otlinop.ConvergenceWarning, match="not converged"):
        short = sinkhorn(x, y, blur=0.1, threshold=1e-12, max_iter=40, multiscale=True)
    with pytest.warns(otlinop.ConvergenceWarning, match="not converged"):
        short_dense = sinkhorn(x, y, blur=0.1, threshold=1e-12, max_iter=40)
    assert not short.converged and short.n_iter == short_dense.n_iter == 40


# --------------------------------------------------------------------------
# Re-pruning the kept pairs below the jump (Multiscale.prune_tol)
# --------------------------------------------------------------------------
def _dropped_by_dense(res):
    """The plan mass that ``res.plan`` misses per row and column (relative), from the dense plan."""
    P = res.plan
    full = PlanOperator(res.x, res.y, res.f, res.g, eps=res.eps, a=res.a, b=res.b).to_dense()
    lost = full * ~P.pattern.mask()[P.cx.labels[:, None], P.cy.labels[None, :]]
    return float((lost.sum(1) / res.a).max()), float((lost.sum(0) / res.b).max())


def test_repruning_shrinks_the_work_at_the_schedule():
    """GeomLoss' schedule alone at a blur well below the cells: the blocks of the fine steps shrink
    several-fold, the potentials do not move, and the certificate (which holds against the dense plan)
    exceeds the jump pattern's by at most prune_tol."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(400, 2, generator=g, dtype=F64), torch.rand(380, 2, generator=g, dtype=F64)
    opts = dict(blur=0.02, threshold=float("inf"))
    wide = sinkhorn(x, y, multiscale=Multiscale(cluster_scale=0.1, prune_tol=None), **opts)
    res = sinkhorn(x, y, multiscale=Multiscale(cluster_scale=0.1), **opts)
    assert wide.kept_entries >= 1.8 * res.kept_entries   # the first fine step runs on the jump's pattern
    assert res.plan.fill <= wide.plan.fill / 3
    torch.testing.assert_close(res.f, wide.f, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.g, wide.g, rtol=1e-12, atol=1e-14)
    for bound, widest, true in zip(res.truncation_bound, wide.truncation_bound, _dropped_by_dense(res)):
        assert true <= bound <= widest + 1e-12


def test_repruning_converged_matches_the_wide_pattern_and_dense():
    """Converged solves (re-pruned at each check of the refinement too) equal the un-re-pruned and the
    dense ones; fewer entries visited."""
    x, y = _clouds(200, 180, seed=0)
    opts = dict(blur=0.1, threshold=1e-11, max_iter=3000)
    wide = sinkhorn(x, y, multiscale=Multiscale(cluster_scale=0.2, prune_tol=None), **opts)
    res = sinkhorn(x, y, multiscale=Multiscale(cluster_scale=0.2), **opts)
    dense = sinkhorn(x, y, **opts)
    assert res.converged and wide.converged and res.kept_entries < wide.kept_entries
    assert res.multiscale_layout[2].nnz < wide.multiscale_layout[2].nnz
    torch.testing.assert_close(res.cost, wide.cost, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.f, wide.f, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.cost, dense.cost, rtol=1e-10, atol=0)
    assert max(_dropped_by_dense(res)) <= max(res.truncation_bound) <= 1e-12


def test_three_dimensional_converged_matches_dense_within_the_bound():
    """d = 3 (the issue's case; the other tests run mostly in 2-D): converged multiscale and dense
    solves on a unit cube agree within the certificate: the cost, the potentials (up to the
    constant shared by f and -g), and the HVP in x on the block-sparse plan."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(300, 3, generator=g, dtype=F64), torch.rand(260, 3, generator=g, dtype=F64)
    opts = dict(blur=0.08, threshold=1e-10, max_iter=5000)
    ms = sinkhorn(x, y, multiscale=Multiscale(cluster_scale=0.15), **opts)
    dense = sinkhorn(x, y, **opts)
    bound = max(ms.truncation_bound)
    assert ms.converged and dense.converged and ms.plan.fill < 0.5 and 0 < bound < 1e-5
    assert abs(float(ms.cost - dense.cost)) <= bound * abs(float(dense.cost))
    shift = (ms.f - dense.f).mean()
    # A dropped mass of at most `bound` per row or column moves a potential by about eps * bound,
    # on top of the two solves' own tolerance.
    tol = 10 * ms.eps * bound + 1e-9
    assert float((ms.f - dense.f - shift).abs().max()) < tol and float((ms.g - dense.g + shift).abs().max()) < tol
    A = torch.randn(x.shape, generator=g, dtype=F64)
    Hx, _, info = plan_hvp(ms.plan, A, eps=ms.eps, M=solvers.jacobi())
    Hxd, _ = otlinop.hvp_x(x, y, dense.f, dense.g, A, eps=dense.eps, a=dense.a, b=dense.b)
    assert info.converged and _rel(Hx, Hxd) < 2 * bound


def test_repruning_falls_back_when_the_certificate_grows(monkeypatch):
    """A re-pruning that drops what the final plan needs (here: a tolerance of 0.9, rows and columns
    left with little more than their best pair) is caught by the final certificate: the solve returns
    to the jump's pattern and ends as without re-pruning."""
    import otlinop._sinkhorn_multiscale as loop
    careless = lambda *args, **kw: prune_pattern(*args, **{**kw, "tol": 0.9})  # noqa: E731
    monkeypatch.setattr(loop, "prune_pattern", careless)
    x, y = _clouds(200, 180, seed=0)
    opts = dict(blur=0.1, threshold=1e-11, max_iter=3000)
    res = sinkhorn(x, y, multiscale=Multiscale(cluster_scale=0.2), **opts)
    wide = sinkhorn(x, y, multiscale=Multiscale(cluster_scale=0.2, prune_tol=None), **opts)
    assert res.converged and res.multiscale_layout[2].nnz == wide.multiscale_layout[2].nnz
    torch.testing.assert_close(res.cost, wide.cost, rtol=1e-12, atol=0)
    assert res.truncation_bound == pytest.approx(wide.truncation_bound, rel=1e-6, abs=1e-30)


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------
def test_invalid_options_raise():
    x, y = _clouds()
    with pytest.raises(ValueError, match="Multiscale: truncate must be positive"):
        Multiscale(truncate=0)
    with pytest.raises(ValueError, match="Multiscale: cluster_scale must be positive"):
        Multiscale(cluster_scale=-1.0)
    with pytest.raises(ValueError, match=r"Multiscale: prune_tol must be in \(0, 1\), got 0.0"):
        Multiscale(prune_tol=0)
    assert "prune_tol=None" in repr(Multiscale(prune_tol=None)) and Multiscale() != Multiscale(prune_tol=None)
    with pytest.raises(TypeError, match="sinkhorn: multiscale must be None, True or an otlinop.Multiscale"):
        sinkhorn(x, y, multiscale="yes")
    x4, y4 = torch.rand(10, 4, dtype=F64), torch.rand(10, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"sinkhorn: multiscale serves points of dimension d <= 3, got d = 4: "
                                         r"its grid has about \(diameter / cluster_scale\)\^d cells"):
        sinkhorn(x4, y4, multiscale=True)
    with pytest.raises(ValueError, match="method='alternating' is not available"):
        sinkhorn(x, y, eps=0.1, method="alternating", multiscale=True)
    with pytest.raises(NotImplementedError, match="balanced problems only"):
        sinkhorn(x, y, reach=1.0, multiscale=True)
    with pytest.raises(NotImplementedError, match="no warm start"):
        sinkhorn(x, y, f0=torch.zeros(80, dtype=F64), multiscale=True)
    with pytest.raises(NotImplementedError, match="not a batch"):
        sinkhorn(x[None], y[None], multiscale=True)
    with pytest.raises(TypeError, match="plan_hvp: P must be a plan operator"):
        plan_hvp(otlinop.Dense(torch.eye(3, dtype=F64)), torch.zeros(3, 2, dtype=F64), eps=0.1)
    with pytest.raises(ValueError, match="SamplesLoss: truncate must be positive"):
        SamplesLoss(backend="multiscale", truncate=-1)
    with pytest.raises(ValueError, match="SamplesLoss: cluster_scale must be positive"):
        SamplesLoss(backend="multiscale", cluster_scale=0)
    L = SamplesLoss(backend="multiscale", blur=0.3)
    with pytest.raises(ValueError, match="SamplesLoss: multiscale serves points of dimension d <= 3, got d = 4"):
        L(x4, y4)
    with pytest.raises(NotImplementedError, match="not a batch"):
        L(x[None], y[None])
    with pytest.raises(NotImplementedError, match="balanced losses only"):
        SamplesLoss(backend="multiscale", reach=1.0)(x, y)
    with pytest.raises(ValueError, match="sinkhorn_loss: truncate must be positive"):
        otlinop.sinkhorn_loss(x, y, backend="multiscale", truncate=0)


# --------------------------------------------------------------------------
# SamplesLoss(backend="multiscale")
# --------------------------------------------------------------------------
def _loss_case():
    x, y = _clouds(90, 70)
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(90, generator=g, dtype=F64) + 0.5, torch.rand(70, generator=g, dtype=F64) + 0.5
    return a / a.sum(), x, b / b.sum(), 0.7 * y + 0.2


def _value_and_grads(L, data):
    args = [t.clone().requires_grad_() for t in data]
    value = L(*args)
    grads = torch.autograd.grad(value, args)
    # GeomLoss' gauge of the weight gradients: compare them up to their constant.
    return value.detach(), [g - g.mean() if i in (0, 2) else g for i, g in enumerate(grads)]


@pytest.mark.parametrize("debias", [True, False])
def test_loss_one_cluster_equals_dense(debias):
    """GeomLoss' schedule alone (no convergence): with one cluster the coarse part is the first two steps
    at eps = diameter^2 on one centroid, then the dense loop on the points; a fine schedule (scaling 0.95,
    ~90 steps) contracts the different start away (scaling 0.5 leaves ~5e-4)."""
    data = _loss_case()
    opts = dict(blur=0.1, scaling=0.95, debias=debias)
    v, grads = _value_and_grads(SamplesLoss(backend="multiscale", cluster_scale=10.0, **opts), data)
    vd, grads_d = _value_and_grads(SamplesLoss(**opts), data)
    assert abs(float(v - vd)) <= 1e-10 * abs(float(vd))
    for name, g, gd in zip("axby", grads, grads_d):
        assert _rel(g, gd) < 1e-8, name


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("truncate, tol", [(20.0, 1e-8), (4.0, 1e-2)])
def test_loss_and_gradients_against_dense(debias, truncate, tol):
    """Converged potentials (converge="always") on both paths: what remains is the truncation, none at
    truncate 20 on this problem, about the dropped mass at truncate 4."""
    data = _loss_case()
    opts = dict(blur=0.1, debias=debias, converge="always")
    L = SamplesLoss(backend="multiscale", cluster_scale=0.15, truncate=truncate, **opts)
    v, grads = _value_and_grads(L, data)
    vd, grads_d = _value_and_grads(SamplesLoss(**opts), data)
    assert abs(float(v - vd)) <= tol * abs(float(vd))
    for name, g, gd in zip("axby", grads, grads_d):
        assert _rel(g, gd) < tol, name
    if truncate == 4.0:
        res = sinkhorn(data[1], data[3], data[0], data[2], blur=0.1, cost_scale=0.5, threshold=1e-10,
                       multiscale=Multiscale(cluster_scale=0.15, truncate=truncate))
        assert res.plan.fill < 0.9 and 1e-4 < max(res.truncation_bound) < tol


def test_loss_gradient_is_block_sparse_formula():
    """The point gradient is c2 a (x - P y / P 1) on the block-sparse plan P(f, g_pre) of the final step."""
    x, y = _clouds(60, 50)
    xr = x.clone().requires_grad_()
    L = SamplesLoss(backend="multiscale", blur=0.2, cluster_scale=0.2, debias=False)
    (gx,) = torch.autograd.grad(L(xr, y), xr)
    res = sinkhorn(x, y, blur=0.2, cost_scale=0.5, threshold=float("inf"), multiscale=Multiscale(cluster_scale=0.2))
    cx, cy, pattern = res.multiscale_layout
    P = BlockSparsePlanOperator(cx, cy, pattern, res.f[cx.perm], res.g_pre[cy.perm], eps=res.eps,
                                a_s=res.a[cx.perm], b_s=res.b[cy.perm], cost_scale=0.5)
    Pd = P.to_dense()
    expected = res.a[:, None] * (x - (Pd @ y) / Pd.sum(1, keepdim=True))
    torch.testing.assert_close(gx, expected, rtol=1e-10, atol=1e-14)


def test_loss_potentials_and_value():
    x, y = _clouds(60, 50)
    L = SamplesLoss(backend="multiscale", blur=0.2, cluster_scale=0.2, potentials=True)
    F, G = L(x, y)
    value = SamplesLoss(backend="multiscale", blur=0.2, cluster_scale=0.2)(x, y)
    torch.testing.assert_close(value, F.mean() + G.mean())
    assert F.shape == (60,) and not F.requires_grad


def test_loss_double_backward_refused():
    x, y = _clouds(30, 20)
    x.requires_grad_()
    value = SamplesLoss(backend="multiscale", blur=0.3)(x, y)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        torch.autograd.grad(value, x, create_graph=True)


# --------------------------------------------------------------------------
# Triton's interpreter (tiny n) and the GPU
# --------------------------------------------------------------------------
def test_triton_interpreter_matches_torch():
    from otlinop.kernels._triton import HAS_TRITON
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    x, y = _clouds(24, 20)
    x, y = x.float(), y.float()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU
    opts = dict(blur=0.3, threshold=float("inf"), multiscale=Multiscale(cluster_scale=0.4))
    t = sinkhorn(x.to(device), y.to(device), backend="triton", **opts)
    r = sinkhorn(x, y, backend="torch", **opts)
    torch.testing.assert_close(t.f.cpu(), r.f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t.g.cpu(), r.g, rtol=1e-4, atol=1e-5)
    v = torch.randn(20)
    torch.testing.assert_close((t.plan @ v.to(device)).cpu(), r.plan @ v, rtol=1e-4, atol=1e-6)


def test_triton_interpreter_repruned_matches_torch():
    """The Triton path runs on the re-pruned patterns: the same pattern and potentials as the torch
    reference (float32, Triton's interpreter on the CPU)."""
    from otlinop.kernels._triton import HAS_TRITON
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    x, y = _clouds(40, 36, seed=2)
    x, y = x.float(), y.float()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU
    opts = dict(blur=0.05, threshold=float("inf"), multiscale=Multiscale(cluster_scale=0.25))
    t = sinkhorn(x.to(device), y.to(device), backend="triton", **opts)
    r = sinkhorn(x, y, backend="torch", **opts)
    wide = sinkhorn(x, y, backend="torch", blur=0.05, threshold=float("inf"),
                    multiscale=Multiscale(cluster_scale=0.25, prune_tol=None))
    assert r.kept_entries < wide.kept_entries and t.kept_entries == r.kept_entries
    assert torch.equal(t.multiscale_layout[2].idx.cpu(), r.multiscale_layout[2].idx)
    torch.testing.assert_close(t.f.cpu(), r.f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t.g.cpu(), r.g, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the issue's 200k-point target needs a GPU (minutes on "
                                                          "CPU); run by scripts/gpu_check.sh")
@pytest.mark.xfail(strict=True, reason=(
    "issue 21's converged accuracy target is not met: on an H100 (2026-12-07) neither path reached the 1e-3 "
    "marginal threshold in 2010 steps in float32 at blur 0.01 (multiscale 1.45e-3, dense 1.53e-3: a float32 "
    "stall), and their OT gradients were 2.7e-2 apart (target 1e-2; costs 8.1e-6 apart)"))
def test_gpu_200k_cube_converged_matches_dense():
    """Issue 21's accuracy target on converged solves: n = m = 200k uniform in the unit cube, d = 3,
    blur 0.01, float32, default cluster_scale and truncate, ``sinkhorn`` run to its default marginal
    threshold (1e-3) on both paths: costs within 1e-4 (relative), the OT gradients ``a x - P y`` within
    1e-2 (relative, in norm).

    Not at GeomLoss' schedule alone: there neither path is converged at the final eps, and the two
    truncated iterations differ by more than either's distance to the solution says about the
    method (CPU, float64, n = 1000, blur 0.01: the dense schedule's loss 22% off its converged value,
    the multiscale one 14%; converged, 5e-5 apart)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 200_000
    x = torch.rand(n, 3, device="cuda", generator=g)
    y = torch.rand(n, 3, device="cuda", generator=g)

    def run(**options):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = sinkhorn(x, y, blur=0.01, scaling=0.5, **options)
        grad = x / n - res.plan @ y
        torch.cuda.synchronize()
        return res, grad, time.perf_counter() - t0

    ms, gms, elapsed = run(multiscale=True)         # the times are reported, not asserted: no warm-up
    de, gde, elapsed_d = run()
    errors = (abs(float(ms.cost - de.cost)) / abs(float(de.cost)), _rel(gms, gde))
    message = (f"multiscale {elapsed:.3f} s ({ms.n_iter} steps), dense {elapsed_d:.3f} s ({de.n_iter} steps); "
               f"relative errors cost {errors[0]:.2e}, grad {errors[1]:.2e}; certificate {ms.truncation_bound}, "
               f"kept fraction {ms.plan.fill:.3g}")
    warnings.warn(message)
    assert ms.converged and de.converged, message
    assert errors[0] <= 1e-4 and errors[1] <= 1e-2, message
