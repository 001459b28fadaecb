"""``otlinop.distributed.ShardedPlanOperator`` against the single-process plan.

Each world size is one spawned run of gloo processes on the CPU (starting a
process group costs seconds): every rank runs all the cases below and checks its
results against ``PlanOperator`` on the whole cloud in float64 to 1e-12, and
rank 0 writes the names of the checks done, which the test then requires. One
float32 case runs the Triton kernels (the interpreter here) on every rank.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import spawn_gloo
from otlinop import PlanOperator
from otlinop.distributed import ShardedPlanOperator, merge_lse
from otlinop.kernels import softmin

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TOL = 1e-12
N, D, K = 7, 3, 2

#: Block sizes of the target cloud per world size: unequal, and with empty blocks (first, middle, last).
SHARDS = {
    2: [(5, 6), (0, 9), (9, 0)],
    3: [(3, 0, 8), (4, 4, 3), (1, 7, 2), (0, 0, 5)],
}


def _close(got, want, what):
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL * scale, msg=lambda m: f"{what}: {m}")


def _problem(m, weighted, seed):
    """The whole problem (the same on every rank: a fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(dtype=torch.float64, generator=gen)
    x, y = torch.randn(N, D, **kw), torch.randn(m, D, **kw) + 0.3
    f, g = 0.5 * torch.randn(N, **kw), 0.5 * torch.randn(m, **kw)
    a = b = None
    if weighted:
        a, b = torch.rand(N, **kw) + 0.1, torch.rand(m, **kw) + 0.1
        b[m // 2] = 0.0         # a zero weight: a -inf column log-weight
    V, U = torch.randn(m, K, **kw), torch.randn(N, K, **kw)
    return x, y, f, g, a, b, V, U


def _check_case(rank, world, sizes, weighted, eps, seed, done):
    m = sum(sizes)
    x, y, f, g, a, b, V, U = _problem(m, weighted, seed)
    o = sum(sizes[:rank])
    blk = slice(o, o + sizes[rank])
    P = PlanOperator(x, y, f, g, eps=eps, a=a, b=b, cost_scale=0.5)
    S = ShardedPlanOperator(x, y[blk], f, g[blk], eps=eps, a=a, b=None if b is None else b[blk], cost_scale=0.5)
    tag = f"world {world} shards {sizes} weighted {weighted}"
    assert S.shape == (N, sizes[rank]) and S.global_shape == (N, m)
    assert S.shard_sizes == tuple(sizes) and S.column_offset == o

    _close(S @ V[blk], P @ V, f"{tag}: P @ V")
    _close(S @ V[blk, 0], P @ V[:, 0], f"{tag}: P @ v")
    _close(S.T @ U, (P.T @ U)[blk], f"{tag}: P.T @ U")
    _close(S.T @ U[:, 0], (P.T @ U[:, 0])[blk], f"{tag}: P.T @ u")
    _close(S.row_sums(), P.row_sums(), f"{tag}: row sums")
    _close(S.col_sums(), P.col_sums()[blk], f"{tag}: col sums")

    # The adjoint identity: <U, P V> = sum_r <P_r.T U, V_r>, the column side all-reduced.
    lhs = (U * (S @ V[blk])).sum()
    rhs = (S.T @ U * V[blk]).sum().clone()
    dist.all_reduce(rhs)
    _close(lhs, rhs, f"{tag}: adjoint identity")

    # The row soft-min (the Sinkhorn update of f) against the single-process kernel
    # and the dense formula; then with a given h.
    h = g / eps if b is None else torch.log(b) + g / eps
    C = 0.5 * torch.cdist(x, y).pow(2)
    smin = S.row_softmin()
    _close(smin, softmin(x, y, h, eps=eps, cost_scale=0.5), f"{tag}: row soft-min vs the kernel")
    _close(smin, -eps * torch.logsumexp(h - C / eps, 1), f"{tag}: row soft-min vs dense")
    h2 = torch.linspace(-1.0, 1.0, m, dtype=torch.float64)
    _close(S.row_lse(h2[blk]), torch.logsumexp(h2 - C / eps, 1), f"{tag}: row lse with h")

    # Bitwise the same on every rank.
    for name, t in (("row soft-min", smin), ("P @ V", S @ V[blk])):
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t)
        assert all(torch.equal(t, s) for s in gathered), f"{tag}: {name} differs between ranks"
    done.update({"P @ V", "P @ v", "P.T @ U", "P.T @ u", "row sums", "col sums", "adjoint identity",
                 "row soft-min", "row lse", "same on every rank"})
    if 0 in sizes:
        done.add("empty shard")
    if len(set(sizes)) > 1:
        done.add("unequal shards")


def _worker(rank, world, store, report):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        done = set()
        for i, sizes in enumerate(SHARDS[world]):
            for weighted in (False, True):
                _check_case(rank, world, sizes, weighted, eps=0.7, seed=10 * i + weighted, done=done)
        # The local work is the Triton kernel (the interpreter here, compiled on a GPU): float32.
        sizes = SHARDS[world][1]
        x, y, f, g, a, b, V, U = (t.float() for t in _problem(sum(sizes), True, 5))
        o = sum(sizes[:rank])
        blk = slice(o, o + sizes[rank])
        opts = dict(eps=0.7, a=a, cost_scale=0.5, backend="triton")
        P = PlanOperator(x, y, f, g, b=b, **opts)
        S = ShardedPlanOperator(x, y[blk], f, g[blk], b=b[blk], **opts)
        close32 = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S @ V[blk], P @ V, **close32)
        torch.testing.assert_close(S.T @ U, (P.T @ U)[blk], **close32)
        h = torch.log(b) + g / 0.7
        torch.testing.assert_close(S.row_softmin(), softmin(x, y, h, eps=0.7, cost_scale=0.5, backend="triton"),
                                   **close32)
        done.add("triton backend")
        # A row with no term anywhere: every column weight is zero.
        x, y, f, g, *_ = _problem(sum(SHARDS[world][0]), False, 0)
        sizes = SHARDS[world][0]
        o = sum(sizes[:rank])
        blk = slice(o, o + sizes[rank])
        S = ShardedPlanOperator(x, y[blk], f, g[blk], eps=0.7, b=torch.zeros(sizes[rank], dtype=torch.float64))
        assert torch.equal(S.row_softmin(), torch.full((N,), float("inf"), dtype=torch.float64))
        done.add("all weights zero")
        # n differs between ranks: refused on every rank, before any product.
        xr = torch.randn(N + rank, D, dtype=torch.float64)
        with pytest.raises(ValueError, match="ShardedPlanOperator: x must have the same shape"):
            ShardedPlanOperator(xr, y[blk], torch.zeros(N + rank, dtype=torch.float64), g[blk], eps=0.7)
        done.add("n mismatch refused")
        if rank == 0:
            with open(report, "w") as fh:
                json.dump(sorted(done), fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_plan_matches_single_process(world, tmp_path, monkeypatch):
    """P @ V, P.T @ U, row sums, column sums, the adjoint identity and the row
    soft-min equal the single-process ones to 1e-12 on every rank, with unequal
    and empty shards; the row soft-min and P @ V are bitwise the same on every rank."""
    done = spawn_gloo(_worker, world, tmp_path, monkeypatch)
    assert done == {"P @ V", "P @ v", "P.T @ U", "P.T @ u", "row sums", "col sums", "adjoint identity",
                    "row soft-min", "row lse", "same on every rank", "empty shard", "unequal shards",
                    "all weights zero", "n mismatch refused", "triton backend"}


def test_merge_lse_is_the_lse_of_the_union():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 10, dtype=torch.float64, generator=gen)
    z[1] = float("-inf")                     # a row with no term
    z[2, 3:] = float("-inf")                 # a row whose later blocks have no term
    cuts = [0, 3, 3, 8, 10]                  # an empty block in the middle
    parts = [torch.logsumexp(z[:, i:j], 1) for i, j in zip(cuts, cuts[1:])]
    want = torch.logsumexp(z, 1)
    got = merge_lse(parts)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    _close(got[torch.isfinite(want)], want[torch.isfinite(want)], "merge_lse")


def test_refused_without_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="ShardedPlanOperator: torch.distributed is not initialised"):
        ShardedPlanOperator(x, x, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), eps=1.0)


def _nccl_worker(rank, store):
    torch.cuda.set_device(0)        # before the group: NCCL binds the current device
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        kw = dict(device="cuda", dtype=torch.float32, generator=gen)
        x, y = torch.randn(300, 16, **kw), torch.randn(200, 16, **kw)
        zeros = dict(device="cuda", dtype=torch.float32)          # torch.zeros takes no generator
        f, g, V = torch.zeros(300, **zeros), torch.zeros(200, **zeros), torch.randn(200, 4, **kw)
        S = ShardedPlanOperator(x, y, f, g, eps=2.0)
        P = PlanOperator(x, y, f, g, eps=2.0)
        # The same Triton kernels on one rank: equal up to the all-reduce (a copy for one rank).
        torch.testing.assert_close(S @ V, P @ V, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(S.row_softmin(), softmin(x, y, g / 2.0, eps=2.0), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(S.T @ torch.ones(300, 2, device="cuda"), P.T @ torch.ones(300, 2, device="cuda"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the NCCL path needs a CUDA GPU")
@pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="NCCL is not available")
def test_nccl_world_size_one_smoke(tmp_path):
    """The NCCL path on one GPU (world size 1): products and the soft-min match PlanOperator's."""
    mp.spawn(_nccl_worker, args=(str(tmp_path / "store"),), nprocs=1, join=True)
