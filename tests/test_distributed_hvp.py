"""The Krylov solvers, the dual Hessian and the HVPs over a process group, against one process.

Each world size is one spawned run of gloo processes on the CPU (starting a
process group costs seconds): every rank runs all the cases below on its
block of the target side (``sharded="y"``) or its blocks of both clouds
(``sharded="xy"``) and checks its results against the single-process
functions on the whole problem in float64 (1e-12 relative to the largest
entry), and rank 0 writes the names of the checks done, which the test then
requires.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import spawn_gloo
import otlinop
import solvers
from otlinop import LinearOperator
from otlinop.distributed import (RingPlanOperator, ShardedDualHessianOperator, ShardedHessianOperator,
                                 ShardedPlanOperator, hvp, hvp_x, hvp_y, loss_hessian_operator)
from solvers import ShardedInnerProduct

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TOL = 1e-12
#: Results through an inner solve at rtol 1e-14: each run is within about 1e-14 cond(S) of the exact
#: solution, and cond(S) reaches ~2e4 here (d = 9, weighted, shards (3, 0, 8): 2e-11 apart on one CPU,
#: bitwise on another), so a comparison of two runs sits above that, not at it.
SOLVED_TOL = 1e-9
F64 = dict(dtype=torch.float64)

#: Block sizes of the target side per world size: unequal, and with empty blocks.
SHARDS = {
    2: [(6, 5), (0, 11), (11, 0)],
    3: [(3, 0, 8), (4, 4, 3), (1, 7, 3)],
}

#: Both clouds sharded (n = 7, m = 11): (rows of x, columns of y) per rank. World 2: one rank holds
#: only points of x, the other only points of y (every plan block is another rank's); world 3: unequal
#: blocks and a rank that holds neither.
RING_SHARDS = {2: ((7, 0), (0, 11)), 3: ((4, 0, 3), (5, 0, 6))}


def _close(got, want, what, tol=TOL):
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _same_on_every_rank(t, what):
    t = torch.as_tensor(t).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    assert all(torch.equal(t, p) for p in parts), f"{what} differs between ranks"


def _block(sizes, rank):
    o = sum(sizes[:rank])
    return slice(o, o + sizes[rank])


class _ColumnBlock(LinearOperator):
    """Rank r's view of a dense (p, m) matrix G whose inputs are split in column
    blocks: ``v_r -> (sum_s G[:, s] v_s)[out]``, with ``out`` this rank's block of
    the outputs (square) or all of them (``replicated_out``, as the plan's rows)."""

    def __init__(self, G, blk, *, replicated_out=False, symmetric=False):
        self.G, self.blk, self.replicated_out = G, blk, replicated_out
        rows = G.shape[0] if replicated_out else blk.stop - blk.start
        space = ShardedInnerProduct(blk.stop - blk.start)
        self.inner_products = (None, space) if replicated_out else space
        super().__init__((rows, blk.stop - blk.start), G.dtype, G.device, is_symmetric=symmetric)

    def _matmat(self, V):
        out = (self.G[:, self.blk] @ V).contiguous()
        dist.all_reduce(out)
        return out if self.replicated_out else out[self.blk]

    def _rmatmat(self, U):
        if self.replicated_out:
            return self.G[:, self.blk].T @ U
        full = torch.zeros(self.G.shape[0], U.shape[1], **F64)
        full[self.blk] = U
        dist.all_reduce(full)
        return self.G[:, self.blk].T @ full

    def _diagonal(self):
        return self.G.diagonal()[self.blk]


def _solver_cases(rank, world, sizes, done):
    m = sum(sizes)
    blk = _block(sizes, rank)
    gen = torch.Generator().manual_seed(m)
    Q = torch.randn(m, m, generator=gen, **F64)
    spd = Q @ Q.T / m + torch.diag(torch.linspace(0.5, 3.0, m, **F64))
    nonsym = spd + 0.3 * torch.triu(torch.randn(m, m, generator=gen, **F64), 1)
    rect = torch.randn(m + 4, m, generator=gen, **F64)
    rhs = torch.randn(m, 2, generator=gen, **F64)
    rhs[:, 1] *= 1e-3
    tag = f"world {world} shards {sizes}"
    cases = [("cg", solvers.cg, spd, True), ("minres", solvers.minres, spd, True),
             ("gmres", solvers.gmres, nonsym, False), ("bicgstab", solvers.bicgstab, nonsym, False)]
    for name, solve, G, sym in cases:
        A = _ColumnBlock(G, blk, symmetric=sym)
        for M in (None, solvers.jacobi(), solvers.neumann(2)):
            opts = dict(rtol=1e-11, M=M)
            if name == "gmres":
                # Restarts: the cycle length min(restart, size) must be the whole system's on
                # every rank (an empty block's own size would cut its cycles to one step).
                opts["restart"] = 5
            for b in (rhs[:, 0], rhs):
                want = solve(G, b, **opts)
                got = solve(A, b[blk], **opts)
                what = f"{tag}: {name} M={M} b {tuple(b.shape)}"
                assert got.converged and want.converged, what
                assert got.n_iter == want.n_iter, f"{what}: {got.n_iter} iterations, one process {want.n_iter}"
                _close(got.x, want.x[blk], what, tol=SOLVED_TOL)
                _close(torch.as_tensor(got.residual_norm), torch.as_tensor(want.residual_norm),
                       f"{what}: residual norm", tol=1e-6)
                _same_on_every_rank(torch.as_tensor(got.residual_norm), f"{what}: residual norm")
        done.add(f"solver {name}")
    if 0 in sizes:
        done.add("gmres restarts with an empty block")
    # lsmr: outputs replicated (the plan's rows), inputs sharded.
    A = _ColumnBlock(rect, blk, replicated_out=True)
    b = rhs[:, 0].repeat(2)[: m + 4]
    want = solvers.lsmr(rect, b, atol=1e-12, btol=1e-12, maxiter=200)
    got = solvers.lsmr(A, b, atol=1e-12, btol=1e-12, maxiter=200)
    assert got.n_iter == want.n_iter and got.converged, f"{tag}: lsmr {got} {want}"
    _close(got.x, want.x[blk], f"{tag}: lsmr", tol=SOLVED_TOL)
    done.add("solver lsmr")
    # An inner product with a replicated block of rows (counted once) before the sharded rows.
    U = torch.randn(4 + m, 3, generator=gen, **F64)
    V = torch.randn(4 + m, 3, generator=gen, **F64)
    rows = torch.cat([torch.arange(4), 4 + torch.arange(blk.start, blk.stop)])
    ip = ShardedInnerProduct(4 + (blk.stop - blk.start), replicated=4)
    assert ip.size == 4 + m
    _close(ip.dot(U[rows], V[rows]), (U * V).sum(0), f"{tag}: replicated rows counted once")
    _close(ip.norm(U[rows]), U.norm(dim=0), f"{tag}: norm with replicated rows")
    done.add("replicated rows")


def _error_cases(rank, done):
    """Refusals raise on every rank (the same arguments everywhere, or a check after a gather)."""
    with pytest.raises(ValueError, match="ShardedInnerProduct: need 0 <= replicated <= rows"):
        ShardedInnerProduct(2, replicated=3)
    with pytest.raises(ValueError, match="ShardedInnerProduct: replicated must be the same on every rank"):
        ShardedInnerProduct(5, replicated=rank)
    x, y = torch.randn(4, 2, **F64), torch.randn(3, 2, **F64)
    f, g = torch.zeros(4, **F64), torch.zeros(3, **F64)
    with pytest.raises(ValueError, match="hvp: give a direction A"):
        hvp(x, y, f, g, eps=1.0)
    with pytest.raises(ValueError, match="hvp_x: the direction A is required"):
        hvp_x(x, y, f, g, None, eps=1.0)
    with pytest.raises(ValueError, match="loss_hessian_operator: wrt must be"):
        loss_hessian_operator(x, y, f, g, wrt="z", eps=1.0)
    with pytest.raises(TypeError, match="ShardedHessianOperator: P must be a ShardedPlanOperator"):
        ShardedHessianOperator(otlinop.PlanOperator(x, y, f, g, eps=1.0), eps=1.0)
    with pytest.raises(ValueError, match="ShardedDualHessianOperator.solve: r must have shape"):
        K = ShardedDualHessianOperator(ShardedPlanOperator(x, y, f, g, eps=1.0), eps=1.0)
        K.solve(torch.zeros(2, **F64))
    done.add("refusals")


def _problem(m, d, weighted, reach, seed):
    """A converged problem, the same on every rank (a fixed seed, float64 on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    n = 7
    x, y = torch.randn(n, d, generator=gen, **F64), torch.randn(m, d, generator=gen, **F64) + 0.3
    a = b = None
    if weighted:
        a, b = torch.rand(n, generator=gen, **F64) + 0.1, torch.rand(m, generator=gen, **F64) + 0.1
        a[2] = 0.0             # a point of zero weight: a zero row of P
        a, b = a / a.sum(), b / b.sum()
    res = otlinop.sinkhorn(x, y, a, b, eps=0.6, reach=reach, method="alternating", threshold=1e-13,
                           max_iter=5000)
    A = torch.randn(n, d, 3, generator=gen, **F64)
    B = torch.randn(m, d, 3, generator=gen, **F64)
    return x, y, res, A, B


def _hvp_cases(rank, world, sizes, done, memo, *, problems, full):
    """``memo`` keeps the single-process results between block layouts of one
    whole problem (every layout of a world size splits the same m)."""
    m = sum(sizes)
    blk = _block(sizes, rank)

    def ref(key, compute):
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    for d, weighted, reach, seed in problems:
        x, y, res, A, B = ref((m, seed), lambda: _problem(m, d, weighted, reach, seed))
        b_r = None if res.b is None else res.b[blk]
        tag = f"world {world} shards {sizes} d {d} weighted {weighted} reach {reach}"
        common = dict(eps=res.eps, a=res.a, reach_x=reach, reach_y=reach, cost_scale=0.5)
        loc = (x, y[blk], res.f, res.g[blk])
        whole = (x, y, res.f, res.g)

        # The operators against the single-process ones (dense products, blocks).
        P = ShardedPlanOperator(x, y[blk], res.f, res.g[blk], eps=res.eps, a=res.a, b=b_r, cost_scale=0.5)
        Pw = otlinop.PlanOperator(*whole, eps=res.eps, a=res.a, b=res.b, cost_scale=0.5)
        S = ShardedHessianOperator(P, eps=res.eps, reach_x=reach, reach_y=reach)
        Sw = otlinop.HessianOperator.from_plan(Pw, eps=res.eps, reach_x=reach, reach_y=reach)
        V = torch.randn(m, 2, generator=torch.Generator().manual_seed(seed), **F64)
        _close(S @ V[blk], (Sw @ V)[blk], f"{tag}: S @ V")
        _close(S.diagonal(), Sw.diagonal()[blk], f"{tag}: diag(S)")
        K = ShardedDualHessianOperator(P, eps=res.eps, reach_x=reach, reach_y=reach)
        Kw = otlinop.DualHessianOperator(Pw, eps=res.eps, reach_x=reach, reach_y=reach)
        Z = torch.randn(7 + m, 2, generator=torch.Generator().manual_seed(seed + 1), **F64)
        rows = torch.cat([torch.arange(7), 7 + torch.arange(blk.start, blk.stop)])
        _close(K @ Z[rows], (Kw @ Z)[rows], f"{tag}: K @ Z")
        # Symmetry over the group: <U, S V> = <S U, V>, the sums reduced.
        ip = S.inner_products
        _close(ip.dot(V[blk, :1], S @ V[blk, 1:]), ip.dot(S @ V[blk, :1], V[blk, 1:]), f"{tag}: S symmetric")
        done.update({"S @ V", "diag(S)", "K @ Z", "S symmetric"})

        # hvp_x, hvp_y, hvp: one direction and three, with and without M, cg and minres.
        # (Every combination on the first problem of the first layout; one elsewhere.)
        first = seed == 1 and full
        combos = ((solvers.cg, None), (solvers.cg, solvers.jacobi()), (solvers.minres, solvers.neumann(2)))
        for solver, M in combos if first else combos[1:2]:
            opts = dict(common, solver=solver, M=M, rtol=1e-14)
            for cols in (slice(0, 1), slice(0, 3)) if first else (slice(0, 3),):
                Ak, Bk = (A[..., 0], B[..., 0]) if cols.stop == 1 else (A, B)
                what = f"{tag}: {solver.__name__} M={M} k={cols.stop}"
                got, info = hvp_x(*loc, Ak, b=b_r, **opts)
                key = (m, seed, solver.__name__, repr(M), cols.stop)
                want, info1 = ref(key + ("x",), lambda: otlinop.hvp_x(*whole, Ak, b=res.b, **opts))
                # At rtol = 1e-14 the last iteration may fall either side of the test: both converge
                # (so both are within ~1e-14 cond(S) of the solution), in as many iterations give or take one.
                assert info.converged and info1.converged and abs(info.n_iter - info1.n_iter) <= 1, \
                    f"{what}: hvp_x inner solve {info}, one process {info1}"
                _close(got, want, f"{what}: hvp_x", tol=SOLVED_TOL)
                _same_on_every_rank(got, f"{what}: hvp_x")
                got, _ = hvp_y(*loc, Bk[blk], b=b_r, **opts)
                want, _ = ref(key + ("y",), lambda: otlinop.hvp_y(*whole, Bk, b=res.b, **opts))
                _close(got, want[blk], f"{what}: hvp_y", tol=SOLVED_TOL)
                gx, gy, _ = hvp(*loc, Ak, Bk[blk], b=b_r, **opts)
                wx, wy, _ = ref(key + ("xy",), lambda: otlinop.hvp(*whole, Ak, Bk, b=res.b, **opts))
                _close(gx, wx, f"{what}: hvp x part", tol=SOLVED_TOL)
                _close(gy, wy[blk], f"{what}: hvp y part", tol=SOLVED_TOL)
                _, gy, _ = hvp(*loc, None, Bk[blk], b=b_r, **opts)
                wy = ref(key + ("B",), lambda: otlinop.hvp(*whole, None, Bk, b=res.b, **opts)[1])
                _close(gy, wy[blk], f"{what}: hvp, B alone", tol=SOLVED_TOL)
        done.update({"hvp_x", "hvp_y", "hvp", "hvp_x same on every rank", "minres inner solve", "jacobi",
                     "neumann", "k directions"})

        # The loss Hessian operator: products, and an outer MINRES on the whole Hessian.
        for wrt in ("x", "y", "xy"):
            H = loss_hessian_operator(*loc, wrt=wrt, b=b_r, rtol=1e-14, **common)
            Hw = otlinop.loss_hessian_operator(*whole, wrt=wrt, b=res.b, rtol=1e-14, **common)
            nd, md = 7 * d, m * d
            mine = torch.cat([torch.arange(nd) if "x" in wrt else torch.arange(0),
                              (nd if "x" in wrt else 0) + torch.arange(blk.start * d, blk.stop * d)
                              if "y" in wrt else torch.arange(0)])
            size = (nd if "x" in wrt else 0) + (md if "y" in wrt else 0)
            v = torch.randn(size, generator=torch.Generator().manual_seed(seed + 2), **F64)
            _close(H @ v[mine], ref((m, seed, wrt), lambda: Hw @ v)[mine], f"{tag}: loss Hessian {wrt} @ v",
                   tol=SOLVED_TOL)
            if not first or wrt == "x":    # (x: replicated vectors, the plain inner product)
                continue
            got = solvers.minres(H, v[mine], shift=-1.0, rtol=1e-9)
            want = ref((m, seed, wrt, "minres"), lambda: solvers.minres(Hw, v, shift=-1.0, rtol=1e-9))
            assert got.converged and want.converged and abs(got.n_iter - want.n_iter) <= 1, \
                f"{tag}: minres on the loss Hessian {wrt}: {got}, one process {want}"
            _close(got.x, want.x[mine], f"{tag}: minres on the loss Hessian {wrt}", tol=1e-10)
        done.update({"loss Hessian x", "loss Hessian y", "loss Hessian xy", "minres on the loss Hessian"})
        if 0 in sizes:
            done.add("empty shard")
        if len(set(sizes)) > 1:
            done.add("unequal shards")
        if weighted:
            done.add("zero weight")
        if reach is not None:
            done.add("unbalanced")
        if d * d > 64:
            done.add("bilinear pass")


def _ring_cases(rank, world, done, memo):
    """``sharded="xy"``: the ring plan's new products, the Schur complement and dual Hessian on it, the
    HVPs and the loss Hessian operator, each rank its blocks of both clouds (``memo``: as in
    ``_hvp_cases``, whose keys it shares: the same whole problems)."""
    rows, cols = RING_SHARDS[world]
    R, C = _block(rows, rank), _block(cols, rank)
    m, d, seed = sum(cols), 2, 1
    x, y, res, A, B = memo.setdefault((m, seed), _problem(m, d, False, None, seed))
    tag = f"world {world} rows {rows} cols {cols}"
    common = dict(eps=res.eps, a=res.a[R], b=res.b[C], cost_scale=0.5, sharded="xy")
    whole_opts = dict(eps=res.eps, a=res.a, b=res.b, cost_scale=0.5, reach_x=None, reach_y=None)
    loc = (x[R], y[C], res.f[R], res.g[C])
    whole = (x, y, res.f, res.g)

    def ref(key, compute):
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    # The operators: the ring plan's transpose, squares and bilinear term, S and K on it.
    P = RingPlanOperator(*loc, eps=res.eps, a=res.a[R], b=res.b[C], cost_scale=0.5)
    Pw = otlinop.PlanOperator(*whole, eps=res.eps, a=res.a, b=res.b, cost_scale=0.5)
    gen = torch.Generator().manual_seed(5)
    W, V, Y = (torch.randn(k, c, generator=gen, **F64) for k, c in ((7, 3), (m, 3), (m, 2)))
    _close(P.bilinear(W[R], V[C], Y[C]), Pw.bilinear(W, V, Y)[R], f"{tag}: bilinear")
    _close(P.T.bilinear(V[C], W[R], W[R, :2]), Pw.T.bilinear(V, W, W[:, :2])[C], f"{tag}: P.T bilinear")
    _close(P.squared().T @ W[R, 0], (Pw.squared().T @ W[:, 0])[C], f"{tag}: (P∘P).T w")
    _close(P.col_sums(), Pw.col_sums()[C], f"{tag}: col_sums")
    assert P.T.T is P and P.T.row_sums() is P.col_sums(), f"{tag}: P.T is cached with its sums"
    S = ShardedHessianOperator(P, eps=res.eps)
    Sw = otlinop.HessianOperator.from_plan(Pw, eps=res.eps)
    _close(S @ V[C], (Sw @ V)[C], f"{tag}: S @ V")
    _close(S.diagonal(), Sw.diagonal()[C], f"{tag}: diag(S)")
    K = ShardedDualHessianOperator(P, eps=res.eps)
    Kw = otlinop.DualHessianOperator(Pw, eps=res.eps)
    Z = torch.randn(7 + m, 2, generator=gen, **F64)
    both = torch.cat([torch.arange(R.start, R.stop), 7 + torch.arange(C.start, C.stop)])
    _close(K @ Z[both], (Kw @ Z)[both], f"{tag}: K @ Z")
    done.update({"ring bilinear", "ring squared", "ring S and K"})

    # The HVPs: cg with jacobi (k = 3) for hvp_x and hvp, minres with neumann (k = 1) for hvp_y (keys
    # of _hvp_cases: the single-process results are computed once).
    cg3 = dict(solver=solvers.cg, M=solvers.jacobi(), rtol=1e-14)
    minres1 = dict(solver=solvers.minres, M=solvers.neumann(2), rtol=1e-14)

    def key(opts, k, side):
        return (m, seed, opts["solver"].__name__, repr(opts["M"]), k, side)

    got, info = hvp_x(*loc, A[R], **common, **cg3)
    want, info1 = ref(key(cg3, 3, "x"), lambda: otlinop.hvp_x(*whole, A, **whole_opts, **cg3))
    assert info.converged and abs(info.n_iter - info1.n_iter) <= 1, f"{tag}: hvp_x {info}, one process {info1}"
    _same_on_every_rank(info.n_iter, f"{tag}: inner iterations")
    _close(got, want[R], f"{tag}: hvp_x", tol=SOLVED_TOL)
    got, info = hvp_y(*loc, B[C, :, 0], **common, **minres1)
    want, _ = ref(key(minres1, 1, "y"), lambda: otlinop.hvp_y(*whole, B[..., 0], **whole_opts, **minres1))
    assert info.converged, f"{tag}: hvp_y with minres {info}"
    _close(got, want[C], f"{tag}: hvp_y", tol=SOLVED_TOL)
    gx, gy, _ = hvp(*loc, A[R], B[C], **common, **cg3)
    wx, wy, _ = ref(key(cg3, 3, "xy"), lambda: otlinop.hvp(*whole, A, B, **whole_opts, **cg3))
    _close(gx, wx[R], f"{tag}: hvp x part", tol=SOLVED_TOL)
    _close(gy, wy[C], f"{tag}: hvp y part", tol=SOLVED_TOL)
    done.update({"ring hvp_x", "ring hvp_y", "ring hvp", "ring cg jacobi", "ring minres"})

    # The loss Hessian operator on both blocks, and an outer MINRES on H_xx (the x blocks' inner products).
    for wrt in ("x", "xy"):
        H = loss_hessian_operator(*loc, wrt=wrt, rtol=1e-14, **common)
        Hw = otlinop.loss_hessian_operator(*whole, wrt=wrt, rtol=1e-14, **whole_opts)
        xs = torch.arange(R.start * d, R.stop * d) if "x" in wrt else torch.arange(0)
        ys = (7 * d if "x" in wrt else 0) + torch.arange(C.start * d, C.stop * d) if "y" in wrt else torch.arange(0)
        mine = torch.cat([xs, ys])
        v = torch.randn(Hw.shape[0], generator=torch.Generator().manual_seed(seed + 2), **F64)
        _close(H @ v[mine], ref((m, seed, wrt), lambda: Hw @ v)[mine], f"{tag}: loss Hessian {wrt} @ v", tol=SOLVED_TOL)
        if wrt == "x":
            # Three iterations (three HVPs) run the reduced dots over the x blocks; to convergence took 3 s.
            got = solvers.minres(H, v[mine], shift=-1.0, maxiter=3)
            want = ref((m, seed, wrt, "minres 3"), lambda: solvers.minres(Hw, v, shift=-1.0, maxiter=3))
            assert got.n_iter == want.n_iter == 3, f"{tag}: outer minres {got}, {want}"
            _close(got.x, want.x[mine], f"{tag}: minres on the loss Hessian x, x sharded", tol=1e-10)
    done.update({"ring loss Hessian", "ring minres on the loss Hessian"})
    if 0 in rows and 0 in cols:
        done.add("ring empty blocks")


def _layout_errors(rank, world, done):
    """Inconsistent layouts raise on every rank (no rank left in a collective)."""
    n = 4
    x, y = torch.randn(n, 2, **F64) + rank, torch.randn(3, 2, **F64)
    f, g, A = torch.zeros(n, **F64), torch.zeros(3, **F64), torch.randn(n, 2, **F64)
    with pytest.raises(ValueError, match=r"hvp_x: sharded must be the same on every rank, got 'y' on rank 0, 'xy' "
                                         r"on rank 1"):
        hvp_x(x, y, f, g, A, eps=1.0, sharded="y" if rank == 0 else "xy")
    xn = torch.randn(n + (rank == 1), 2, **F64)
    with pytest.raises(ValueError, match="hvp_x: with sharded='y' x is replicated .* n = 4 on rank 0, 5 on rank 1"):
        hvp_x(xn, y, torch.zeros(xn.shape[0], **F64), g, torch.zeros_like(xn), eps=1.0)
    # Equal block sizes, different blocks: the checksums tell the layout 'y' was wrong.
    with pytest.raises(ValueError, match="hvp_x: with sharded='y' x, f, a and A must be the same on every rank, "
                                         "but rank 1's differ"):
        hvp_x(x, y, f, g, A, eps=1.0)
    with pytest.raises(ValueError, match="hvp: sharded must be 'y' .* or 'xy' .*, got 'x'"):
        hvp(x, y, f, g, A, eps=1.0, sharded="x")
    # One rank's bad direction: its own error there, one that names it elsewhere.
    bad = torch.randn(n + (rank == 1), 2, **F64)
    match = "hvp_x: A has shape" if rank == 1 else "hvp_x: the inputs of rank 1 were refused .*A has shape"
    with pytest.raises(ValueError, match=match):
        hvp_x(x, y, f, g, bad, eps=1.0, sharded="xy")
    with pytest.raises(ValueError, match="loss_hessian_operator: the options .* must be the same on every rank"):
        loss_hessian_operator(x, y, f, g, eps=1.0 + rank, sharded="xy")
    done.add("layout refusals")
    # The value checks of a product (the solve's right-hand side, the HVP) share their outcome: an
    # overflow on one rank raises on every rank.
    H = loss_hessian_operator(x, y, f, g, eps=1.0, sharded="xy")
    H._check_results("hvp", {"H_x A": torch.ones(2, **F64)}, "")
    overflowed = {"H_x A": torch.full((2,), float("inf") if rank == 1 else 1.0, **F64)}
    match = "hvp: .*H_x A" if rank == 1 else r"hvp: the HVP values of rank 1 were refused \(ValueError: .*H_x A"
    with pytest.raises(ValueError, match=match):
        H._check_results("hvp", overflowed, "")
    done.add("overflow on one rank")


def _dtensor_case(rank, world, done, memo):
    """``otlinop.hvp_x``, ``hvp`` and ``loss_hessian_operator`` given DTensors return DTensors (world 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    m, seed = 11, 1
    x, y, res, A, B = memo.setdefault((m, seed), _problem(m, 2, False, None, seed))
    X, Y, F, G, Aw, Bw, AD, BD = (distribute_tensor(t, mesh, [Shard(0)]) for t in
                                  (x, y, res.f, res.g, res.a, res.b, A, B))
    opts = dict(eps=res.eps, cost_scale=0.5, M=solvers.jacobi(), rtol=1e-14)
    HA, info = otlinop.hvp_x(X, Y, F, G, AD, a=Aw, b=Bw, **opts)
    want, _ = otlinop.hvp_x(x, y, res.f, res.g, A, a=res.a, b=res.b, **opts)
    assert isinstance(HA, DTensor) and HA.shape == A.shape and info.converged
    _close(HA.full_tensor(), want, "DTensor hvp_x", tol=SOLVED_TOL)
    Hx, Hy, _ = otlinop.hvp(X, Y, F, G, AD, BD, a=Aw, b=Bw, **opts)
    wx, wy, _ = otlinop.hvp(x, y, res.f, res.g, A, B, a=res.a, b=res.b, **opts)
    _close(Hx.full_tensor(), wx, "DTensor hvp: x part", tol=SOLVED_TOL)
    _close(Hy.full_tensor(), wy, "DTensor hvp: y part", tol=SOLVED_TOL)
    H = otlinop.loss_hessian_operator(X, Y, F, G, wrt="y", a=Aw, b=Bw, **opts)
    Hw = otlinop.loss_hessian_operator(x, y, res.f, res.g, wrt="y", a=res.a, b=res.b, **opts)
    v = B[..., 0]
    got = H @ distribute_tensor(v, mesh, [Shard(0)]).to_local().reshape(-1)
    C = _block(_sizes(Y), rank)
    _close(got, (Hw @ v.reshape(-1)).reshape(v.shape)[C].reshape(-1), "DTensor loss Hessian operator", tol=SOLVED_TOL)
    with pytest.raises(NotImplementedError, match="hvp_x: truncate is not implemented for DTensor inputs"):
        otlinop.hvp_x(X, Y, F, G, AD, a=Aw, b=Bw, truncate=1e-8, **opts)
    with pytest.raises(ValueError, match="hvp: a is a Tensor, but the points are DTensors"):
        otlinop.hvp(X, Y, F, G, AD, a=res.a, b=Bw, **opts)
    done.update({"DTensor hvp_x", "DTensor hvp", "DTensor loss Hessian operator"})


def _sizes(D) -> list:
    """Every rank's number of rows of the DTensor D's local shard (one all-gather)."""
    mine = torch.tensor([D.to_local().shape[0]])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [int(p) for p in parts]


def _worker(rank, world, store, report):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        done, memo = set(), {}
        _error_cases(rank, done)
        _layout_errors(rank, world, done)
        _ring_cases(rank, world, done, memo)
        if world == 2:      # DTensor's first use costs seconds per process: one world size
            _dtensor_case(rank, world, done, memo)
        # (d, weighted, reach, seed): the first problem on every block layout (every solver, M
        # and k, and an outer MINRES, on the first layout only); the others on one layout each.
        plain, wide, relaxed = (2, False, None, 1), (9, True, None, 2), (2, True, 1.5, 3)
        for i, sizes in enumerate(SHARDS[world]):
            _solver_cases(rank, world, sizes, done)
            problems = [plain] + [[wide], [relaxed], []][i]
            _hvp_cases(rank, world, sizes, done, memo, problems=problems, full=i == 0)
        if rank == 0:
            with open(report, "w") as fh:
                json.dump(sorted(done), fh)
    finally:
        dist.destroy_process_group()


EXPECTED = {"solver cg", "solver minres", "solver gmres", "solver bicgstab", "solver lsmr",
            "gmres restarts with an empty block", "replicated rows", "S @ V", "diag(S)", "K @ Z", "S symmetric",
            "hvp_x", "hvp_y", "hvp", "hvp_x same on every rank", "minres inner solve", "jacobi", "neumann",
            "k directions", "loss Hessian x", "loss Hessian y", "loss Hessian xy", "minres on the loss Hessian",
            "empty shard", "unequal shards", "zero weight", "unbalanced", "bilinear pass", "refusals",
            "layout refusals", "ring bilinear", "ring squared", "ring S and K", "ring hvp_x", "ring hvp_y", "ring hvp",
            "ring cg jacobi", "ring minres", "ring loss Hessian", "ring minres on the loss Hessian", "ring empty blocks",
            "overflow on one rank"}
DTENSOR = {"DTensor hvp_x", "DTensor hvp", "DTensor loss Hessian operator"}


@pytest.mark.parametrize("world", [2, 3])
def test_solvers_and_hvps_match_single_process(world, tmp_path, monkeypatch):
    """The solvers on sharded operators (with M, several right-hand sides, lsmr's
    two spaces), the sharded Schur complement and dual Hessian, hvp_x, hvp_y, hvp
    and the loss Hessian operator equal the single-process results to 1e-12 on
    every rank, with unequal and empty shards, with the same iteration counts; so do the
    HVPs and the loss Hessian with both clouds sharded (``sharded="xy"``) and, on two ranks,
    through otlinop's functions given DTensors; inconsistent layouts raise on every rank."""
    assert spawn_gloo(_worker, world, tmp_path, monkeypatch) == (EXPECTED | DTENSOR if world == 2 else EXPECTED)


def test_sharded_inner_product_refused_without_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="ShardedInnerProduct: torch.distributed is not initialised"):
        ShardedInnerProduct(3)


def _nccl_worker(rank, store):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        kw = dict(device="cuda", dtype=torch.float32, generator=gen)
        x, y = torch.randn(400, 8, **kw), torch.randn(300, 8, **kw)
        res = otlinop.sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-6)
        A = torch.randn(400, 8, 4, **kw)
        want, info1 = otlinop.hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b, M=solvers.jacobi())
        assert info1.converged
        # Both layouts: x replicated (the columns plan) and both clouds sharded (the ring plan).
        for sharded in ("y", "xy"):
            got, info = hvp_x(x, y, res.f, res.g, A, eps=res.eps, a=res.a, b=res.b, M=solvers.jacobi(),
                              sharded=sharded)
            assert info.converged, sharded
            # float32 inner solves to rtol 1e-5 whose dots differ in rounding (reduced vs local): a smoke test.
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the NCCL path needs a CUDA GPU")
@pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="NCCL is not available")
def test_nccl_world_size_one_hvp_smoke(tmp_path):
    """hvp_x over NCCL with one rank on one GPU (the Triton kernels, float32), x replicated and both clouds
    sharded, matches otlinop.hvp_x."""
    mp.spawn(_nccl_worker, args=(str(tmp_path / "store"),), nprocs=1, join=True)
