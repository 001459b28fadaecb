"""Both clouds sharded: ``RingPlanOperator``, ``otlinop.distributed.sinkhorn`` and
``sinkhorn_loss`` (and DTensors through ``otlinop.sinkhorn`` / ``SamplesLoss``)
against the single-process code.

As in tests/test_distributed.py, each world size is one spawned run of gloo
processes on the CPU: every rank runs all the cases below on its blocks of
the clouds and checks them against the single-process results on the whole
clouds in float64 to 1e-12 (unequal blocks, empty blocks of x, of y, of both);
rank 0 writes the names of the checks done, which the test then requires.
One float32 case runs the Triton kernels (the interpreter here).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import spawn_gloo
import otlinop
from otlinop import PlanOperator

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TOL = 1e-12
D, K = 3, 2

#: (row blocks, column blocks) per world size: unequal, with empty blocks of x, of y and of both on one rank.
SHARDS = {
    2: [((5, 4), (0, 6)), ((0, 7), (3, 3))],
    3: [((4, 0, 3), (0, 5, 2)), ((2, 3, 0), (4, 0, 0)), ((3, 2, 2), (2, 2, 3))],
}


def _close(got, want, what, tol=TOL):
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _same_everywhere(t, world, what):
    """``t`` (replicated) bitwise equal on every rank."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    assert all(torch.equal(p, t) for p in parts), f"{what} differs between ranks"


def _problem(n, m, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(dtype=torch.float64, generator=gen)
    x, y = torch.randn(n, D, **kw), 0.8 * torch.randn(m, D, **kw) + 0.4
    a, b = torch.rand(n, **kw) + 0.2, torch.rand(m, **kw) + 0.2
    a, b = a / a.sum(), b / b.sum()
    return tuple(t.to(dtype) for t in (x, y, a, b))


def _blocks(rank, rows, cols):
    ro, co = sum(rows[:rank]), sum(cols[:rank])
    return slice(ro, ro + rows[rank]), slice(co, co + cols[rank])


# --------------------------------------------------------------------------
# The ring plan operator
# --------------------------------------------------------------------------
def _check_ring_operator(rank, world, rows, cols, done):
    from otlinop.distributed import RingPlanOperator
    from otlinop.distributed.plan import ordered_sum
    n, m = sum(rows), sum(cols)
    R, C = _blocks(rank, rows, cols)
    x, y, a, b = _problem(n, m, 1)
    b[m // 2] = 0.0      # a zero weight: a -inf column log-weight
    gen = torch.Generator().manual_seed(2)
    f, g = 0.5 * torch.randn(n, dtype=torch.float64, generator=gen), 0.5 * torch.randn(m, dtype=torch.float64,
                                                                                        generator=gen)
    V, U = torch.randn(m, K, dtype=torch.float64, generator=gen), torch.randn(n, K, dtype=torch.float64, generator=gen)
    tag = f"world {world} rows {rows} cols {cols}"
    P = PlanOperator(x, y, f, g, eps=0.6, a=a, b=b, cost_scale=0.5)
    S = RingPlanOperator(x[R], y[C], f[R], g[C], eps=0.6, a=a[R], b=b[C], cost_scale=0.5)
    assert S.shape == (rows[rank], cols[rank]) and S.global_shape == (n, m)
    assert S.row_sizes == tuple(rows) and S.col_sizes == tuple(cols)
    assert (S.row_offset, S.col_offset) == (R.start, C.start)
    _close(S @ V[C], (P @ V)[R], f"{tag}: P @ V")
    _close(S @ V[C, 0], (P @ V[:, 0])[R], f"{tag}: P @ v")
    _close(S.T @ U[R], (P.T @ U)[C], f"{tag}: P.T @ U")
    _close(S.T @ U[R, 1], (P.T @ U[:, 1])[C], f"{tag}: P.T @ u")
    _close(S.row_sums(), P.row_sums()[R], f"{tag}: row sums")
    _close(S.col_sums(), P.col_sums()[C], f"{tag}: col sums")
    # The adjoint identity, both sides summed over the ranks in rank order.
    lhs = ordered_sum((U[R] * (S @ V[C])).sum())
    rhs = ordered_sum(((S.T @ U[R]) * V[C]).sum())
    _close(lhs, rhs, f"{tag}: adjoint identity")
    _close(lhs, (U * (P @ V)).sum(), f"{tag}: <U, P V>")
    _same_everywhere(lhs, world, "ordered_sum")
    Cm = 0.5 * torch.cdist(x, y).pow(2)
    _close(S.row_softmin(), (-0.6 * torch.logsumexp(torch.log(b) + g / 0.6 - Cm / 0.6, 1))[R], f"{tag}: row soft-min")
    _close(S.col_softmin(), (-0.6 * torch.logsumexp(torch.log(a)[:, None] + f[:, None] / 0.6 - Cm / 0.6, 0))[C],
           f"{tag}: column soft-min")
    h = torch.linspace(-1.0, 1.0, m, dtype=torch.float64)
    _close(S.row_lse(h[C]), torch.logsumexp(h - Cm / 0.6, 1)[R], f"{tag}: row lse with h")
    done.update({"ring P @ V", "ring P.T @ U", "ring sums", "ring adjoint identity", "ring lse"})


# --------------------------------------------------------------------------
# Sinkhorn
# --------------------------------------------------------------------------
SINKHORN_CASES = [
    ("symmetric", dict(blur=0.5)),
    ("symmetric schedule only", dict(blur=0.3, threshold=float("inf"))),
    ("symmetric unbalanced", dict(blur=0.5, reach=1.0, threshold=1e-4)),
    ("alternating", dict(eps=0.4, method="alternating", threshold=1e-9)),
    ("alternating semi-relaxed", dict(eps=0.4, method="alternating", reach_y=0.8, threshold=1e-6)),
]


def _check_sinkhorn(rank, world, rows, cols, weighted, done):
    from otlinop.distributed import sinkhorn as sharded_sinkhorn
    n, m = sum(rows), sum(cols)
    R, C = _blocks(rank, rows, cols)
    x, y, a, b = _problem(n, m, 3 + weighted)
    for name, opts in SINKHORN_CASES:
        tag = f"world {world} rows {rows} cols {cols} weighted {weighted} {name}"
        args = (a, b) if weighted else ()
        local = (a[R], b[C]) if weighted else ()
        ref = otlinop.sinkhorn(x, y, *args, cost_scale=0.5, **opts)
        res = sharded_sinkhorn(x[R], y[C], *local, cost_scale=0.5, **opts)
        _close(res.f, ref.f[R], f"{tag}: f")
        _close(res.g, ref.g[C], f"{tag}: g")
        if ref.f_pre is not None:
            _close(res.f_pre, ref.f_pre[R], f"{tag}: f_pre")
            _close(res.g_pre, ref.g_pre[C], f"{tag}: g_pre")
        _close(res.cost, ref.cost, f"{tag}: cost")
        assert (res.n_iter, res.converged, res.eps_schedule, res.eps) == \
            (ref.n_iter, ref.converged, ref.eps_schedule, ref.eps), tag
        assert len(res.marginal_error_history) == len(ref.marginal_error_history), tag
        _close(torch.tensor(res.marginal_error_history), torch.tensor(ref.marginal_error_history),
               f"{tag}: marginal errors")
        assert res.status.split(":")[0] == ref.status.split(":")[0], tag
        for what, value in (("cost", res.cost), ("marginal error", res.marginal_error)):
            _same_everywhere(value, world, f"{tag}: {what}")
        if name == "symmetric":
            # The result's plan against the single-process one.
            V = torch.ones(m, 1, dtype=torch.float64)
            _close(res.plan @ V[C], (ref.plan @ V)[R], f"{tag}: plan row sums")
    done.update({f"sinkhorn {name}" for name, _ in SINKHORN_CASES})
    done.add("sinkhorn weighted" if weighted else "sinkhorn uniform")
    # Warm start and a callback (every rank at every check, its own blocks).
    ref = otlinop.sinkhorn(x, y, eps=0.4, method="alternating", threshold=1e-9)
    seen = []
    res = sharded_sinkhorn(x[R], y[C], eps=0.4, method="alternating", threshold=1e-9, f0=ref.f[R],
                           callback=lambda info: seen.append(info["f"].shape))
    assert res.n_iter <= 10 and res.converged and seen and all(s == (rows[rank],) for s in seen)
    done.add("sinkhorn warm start and callback")


# --------------------------------------------------------------------------
# The loss and its gradients
# --------------------------------------------------------------------------
def _check_loss(rank, world, rows, cols, done, combos=((True, None), (True, 1.5), (False, None), (False, 1.5))):
    from otlinop.distributed import sinkhorn_loss as sharded_loss
    n, m = sum(rows), sum(cols)
    R, C = _blocks(rank, rows, cols)
    x, y, a, b = _problem(n, m, 5)
    for debias, reach in combos:
        if True:
            tag = f"world {world} rows {rows} cols {cols} debias {debias} reach {reach}"
            opts = dict(blur=0.4, debias=debias, reach=reach)
            full = [t.clone().requires_grad_() for t in (x, y, a, b)]
            ref = otlinop.sinkhorn_loss(full[0], full[1], full[2], full[3], **opts)
            want = torch.autograd.grad(ref, full)
            part = [t[s].clone().requires_grad_() for t, s in zip((x, y, a, b), (R, C, R, C))]
            value = sharded_loss(part[0], part[1], part[2], part[3], **opts)
            _close(value.detach(), ref.detach(), f"{tag}: value")
            _same_everywhere(value.detach(), world, f"{tag}: value")
            (value * 2.0).backward()
            for name, p, w, s in zip("xyab", part, want, (R, C, R, C)):
                _close(p.grad, 2.0 * w[s], f"{tag}: gradient w.r.t. {name}")
    # Only the points require grad (the weights' gradients are not computed), default weights.
    xr, yr = x[R].clone().requires_grad_(), y[C].clone()
    value = sharded_loss(xr, yr, blur=0.4)
    (gx,) = torch.autograd.grad(value, xr)
    xf = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(otlinop.sinkhorn_loss(xf, y, blur=0.4), xf)
    _close(gx, want[R], f"world {world}: gradient w.r.t. x alone")
    with pytest.raises(NotImplementedError, match="second derivatives of the sharded Sinkhorn loss"):
        _double_backward(sharded_loss, x[R], y[C])
    done.update({"loss debias", "loss no debias", "loss unbalanced", "loss gradients", "loss double backward refused"})


def _double_backward(loss, x, y):
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(xr, y, blur=0.4), xr, create_graph=True)
    return g


# --------------------------------------------------------------------------
# DTensors through the public entry points
# --------------------------------------------------------------------------
def _check_dtensor(rank, world, done):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    # n = 7 and m = 1 over 2 ranks (torch.chunk's blocks): uneven blocks of x, and an empty block of y.
    x, y, a, b = _problem(7, 1, 7)
    X, Y = distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(y, mesh, [Shard(0)])
    A, B = distribute_tensor(a, mesh, [Shard(0)]), distribute_tensor(b, mesh, [Shard(0)])
    res = otlinop.sinkhorn(X, Y, A, B, blur=0.5)
    ref = otlinop.sinkhorn(x, y, a, b, blur=0.5)
    assert isinstance(res.f, DTensor) and isinstance(res.g, DTensor) and res.f.shape == (7,)
    assert Y.to_local().shape[0] == (1 if rank == 0 else 0)
    _close(res.f.full_tensor(), ref.f, "DTensor sinkhorn: f")
    _close(res.g.full_tensor(), ref.g, "DTensor sinkhorn: g")
    _close(res.cost, ref.cost, "DTensor sinkhorn: cost")
    Xg = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    value = otlinop.SamplesLoss(blur=0.5)(A, Xg, B, Y)
    value.backward()
    xf = x.clone().requires_grad_()
    want = otlinop.SamplesLoss(blur=0.5)(a, xf, b, y)
    (gx,) = torch.autograd.grad(want, xf)
    _close(value.detach(), want.detach(), "DTensor SamplesLoss: value")
    assert isinstance(Xg.grad, DTensor)
    _close(Xg.grad.full_tensor(), gx, "DTensor SamplesLoss: gradient")
    _close(otlinop.sinkhorn_loss(X, Y, blur=0.5), otlinop.sinkhorn_loss(x, y, blur=0.5), "DTensor sinkhorn_loss")
    with pytest.raises(ValueError, match="sinkhorn: a is a Tensor, but the points are DTensors"):
        otlinop.sinkhorn(X, Y, a, b, blur=0.5)
    with pytest.raises(NotImplementedError, match="SamplesLoss: potentials=True is not implemented for DTensor"):
        otlinop.SamplesLoss(blur=0.5, potentials=True)(X, Y)
    done.update({"DTensor sinkhorn", "DTensor SamplesLoss", "DTensor sinkhorn_loss"})


# --------------------------------------------------------------------------
# Triton (interpreted) in float32, and refusals
# --------------------------------------------------------------------------
def _check_triton(rank, world, rows, cols, done):
    from otlinop.distributed import sinkhorn as sharded_sinkhorn
    n, m = sum(rows), sum(cols)
    R, C = _blocks(rank, rows, cols)
    x, y, a, b = _problem(n, m, 9, torch.float32)
    # A short schedule (diameter 1): every interpreted launch costs.
    opts = dict(blur=0.7, diameter=1.0, threshold=float("inf"), backend="triton")
    ref = otlinop.sinkhorn(x, y, a, b, **opts)
    res = sharded_sinkhorn(x[R], y[C], a[R], b[C], **opts)
    close32 = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.f, ref.f[R], **close32)
    torch.testing.assert_close(res.g, ref.g[C], **close32)
    done.add("triton backend")


def _check_refusals(rank, world, done):
    from otlinop.distributed import RingPlanOperator, sinkhorn as sharded_sinkhorn
    x = torch.randn(3, 2 + (rank == 1), dtype=torch.float64)
    with pytest.raises(ValueError, match="sinkhorn: the points must have the same dimension d on every rank"):
        sharded_sinkhorn(x, x, blur=0.5)
    with pytest.raises(ValueError, match="RingPlanOperator: the points must have the same dimension d"):
        RingPlanOperator(x, x, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), eps=1.0)
    # Unequal masses over the group (each rank's own masses are fine): refused on every rank.
    x = torch.randn(3, 2, dtype=torch.float64)
    w = torch.full((3,), 1.0 + (rank == 0), dtype=torch.float64)
    with pytest.raises(ValueError, match="sinkhorn: balanced OT needs equal total masses"):
        sharded_sinkhorn(x, x, w, torch.ones(3, dtype=torch.float64), blur=0.5)
    # Empty clouds over the whole group.
    with pytest.raises(ValueError, match="sinkhorn: the point clouds must not be empty over the group"):
        sharded_sinkhorn(x, x[:0], blur=0.5)
    with pytest.raises(ValueError, match="sinkhorn: x has shape"):
        sharded_sinkhorn(x[None], x[None], blur=0.5)
    # A bad shape on one rank only: that rank raises its error, the others one that names it.
    b1 = torch.ones(3 + (rank == 1), dtype=torch.float64) / 3
    match = "sinkhorn: b has shape" if rank == 1 else "sinkhorn: the inputs of rank 1 were refused .*b has shape"
    with pytest.raises(ValueError, match=match):
        sharded_sinkhorn(x, x, torch.ones(3, dtype=torch.float64) / 3, b1, blur=0.5)
    done.add("refusals")


def _worker(rank, world, store, report):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        done = set()
        warnings.simplefilter("ignore", otlinop.ConvergenceWarning)
        for rows, cols in SHARDS[world]:
            _check_ring_operator(rank, world, rows, cols, done)
        rows, cols = SHARDS[world][0]
        _check_sinkhorn(rank, world, rows, cols, False, done)
        _check_sinkhorn(rank, world, *SHARDS[world][-1], True, done)
        _check_loss(rank, world, rows, cols, done)
        _check_loss(rank, world, *SHARDS[world][1], done, combos=((True, 1.5),))
        if world == 2:      # DTensor's first use costs seconds per process: one world size (with an empty shard)
            _check_dtensor(rank, world, done)
        _check_triton(rank, world, rows, cols, done)
        _check_refusals(rank, world, done)
        if rank == 0:
            with open(report, "w") as fh:
                json.dump(sorted(done), fh)
    finally:
        dist.destroy_process_group()


EXPECTED = ({"ring P @ V", "ring P.T @ U", "ring sums", "ring adjoint identity", "ring lse"}
            | {f"sinkhorn {name}" for name, _ in SINKHORN_CASES}
            | {"sinkhorn weighted", "sinkhorn uniform", "sinkhorn warm start and callback"}
            | {"loss debias", "loss no debias", "loss unbalanced", "loss gradients", "loss double backward refused"}
            | {"DTensor sinkhorn", "DTensor SamplesLoss", "DTensor sinkhorn_loss", "triton backend", "refusals"})


@pytest.mark.parametrize("world", [2, 3])
def test_both_clouds_sharded_match_single_process(world, tmp_path, monkeypatch):
    """The ring operator's products and log-sum-exps, sinkhorn's potentials and
    scalars, the loss and its gradients (debias on and off, balanced and
    unbalanced) equal the single-process ones to 1e-12 on every rank with unequal
    and empty blocks; replicated scalars are bitwise the same on every rank."""
    done = spawn_gloo(_worker, world, tmp_path, monkeypatch)
    dtensor = {"DTensor sinkhorn", "DTensor SamplesLoss", "DTensor sinkhorn_loss"}
    expected = EXPECTED if world == 2 else EXPECTED - dtensor
    assert done == expected


def test_refused_without_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from otlinop.distributed import RingPlanOperator, sinkhorn as sharded_sinkhorn, sinkhorn_loss
    x = torch.randn(3, 2, dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="RingPlanOperator: torch.distributed is not initialised"):
        RingPlanOperator(x, x, z, z, eps=1.0)
    with pytest.raises(RuntimeError, match="sinkhorn: torch.distributed is not initialised"):
        sharded_sinkhorn(x, x)
    with pytest.raises(RuntimeError, match="sinkhorn_loss: torch.distributed is not initialised"):
        sinkhorn_loss(x, x)


def _nccl_worker(rank, store):
    torch.cuda.set_device(0)        # before the group: NCCL binds the current device
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        from otlinop.distributed import RingPlanOperator, sinkhorn as sharded_sinkhorn, sinkhorn_loss
        gen = torch.Generator(device="cuda").manual_seed(0)
        kw = dict(device="cuda", dtype=torch.float32, generator=gen)
        x, y = torch.randn(3000, 16, **kw), torch.randn(2000, 16, **kw)
        zeros = dict(device="cuda", dtype=torch.float32)          # torch.zeros takes no generator
        f, g, V = torch.zeros(3000, **zeros), torch.zeros(2000, **zeros), torch.randn(2000, 4, **kw)
        S = RingPlanOperator(x, y, f, g, eps=2.0)
        P = PlanOperator(x, y, f, g, eps=2.0)
        torch.testing.assert_close(S @ V, P @ V, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S.T @ torch.ones(3000, 2, device="cuda"), P.T @ torch.ones(3000, 2, device="cuda"),
                                   rtol=1e-5, atol=1e-5)
        # The schedule alone (no stopping test that float32 rounding could move by a check).
        opts = dict(blur=1.0, threshold=float("inf"))
        res, ref = sharded_sinkhorn(x, y, **opts), otlinop.sinkhorn(x, y, **opts)
        assert res.n_iter == ref.n_iter
        torch.testing.assert_close(res.f, ref.f, rtol=1e-4, atol=1e-4)
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(sinkhorn_loss(xr, y, blur=1.0), xr)
        xf = x.clone().requires_grad_()
        (want,) = torch.autograd.grad(otlinop.sinkhorn_loss(xf, y, blur=1.0), xf)
        torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the NCCL path needs a CUDA GPU")
@pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="NCCL is not available")
def test_nccl_world_size_one_smoke(tmp_path):
    """The NCCL path on one GPU (world size 1; a ring of one rank sends nothing): RingPlanOperator's
    products, sharded sinkhorn and the loss gradient match the single-process Triton results in float32."""
    mp.spawn(_nccl_worker, args=(str(tmp_path / "store"),), nprocs=1, join=True)
