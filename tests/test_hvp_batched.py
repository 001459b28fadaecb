"""Batched directions (issue 18, item 3): ``hvp``, ``hvp_x``, ``hvp_y``, ``hvp_self``
with directions of shape (n, d, k), k of them in one solve with k right-hand
sides, and the loss Hessian operator applied to a matrix (``_matmat``), which
block eigensolvers use. References: k single-direction calls (float64, 1e-10)
and the dense float64 Hessian. The ``Q y`` term takes the moments route (extra
columns of the first plan pass) when d^2 (+ d^2 k with both parts) columns fit
in 64 per direction, else a bilinear pass per direction: at d = 2 always the
moments; at d = 9 single directions and ``hvp`` with both parts take the
bilinear passes, ``hvp_x`` / ``hvp_y`` with k = 5 the moments (81 <= 320)."""

import os

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse.linalg as sla  # noqa: E402

import _hessian_reference as ref  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from otlinop.hvp import hvp, hvp_self, hvp_x, hvp_y, loss_hessian_operator  # noqa: E402
from otlinop.plan import PlanOperator  # noqa: E402
from solvers import cg, jacobi, minres  # noqa: E402

F64 = torch.float64
K = 5

CASES = {
    "balanced-d2": dict(),
    "balanced-d9": dict(d=9, eps=2.0),
    "unbalanced-d2": dict(reach_x=1.0, reach_y=2.0, eps=0.3),
    "semi-y-d9": dict(d=9, reach_y=1.5, c=0.5, eps=2.0),
}


def _blocks(p, k=K, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(p.x.shape + (k,), dtype=F64, generator=gen),
            torch.randn(p.y.shape + (k,), dtype=F64, generator=gen))


def _flat_cols(*ts):
    """(n, d, k), (m, d, k) -> ((n + m) d, k), x rows first (the operator's layout)."""
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in ts])


def _stack(calls):
    """[(Hx_j, Hy_j, ...)] -> (Hx (n, d, k), Hy (m, d, k))."""
    return tuple(torch.stack([c[i] for c in calls], dim=-1) for i in range(2))


@pytest.mark.parametrize("case", CASES)
def test_batched_equals_single_calls_and_the_dense_hessian(case):
    p = ref.problem(**CASES[case])
    A, B = _blocks(p)
    kw = dict(p.kwargs(), ridge=0.0)
    H = ref.loss_hessian(p.x, p.y, p.f, p.g, p.a, p.b, p.eps, p.c, p.reach_x, p.reach_y)
    nd = p.x.numel()

    Hx, Hy, info = hvp(p.x, p.y, p.f, p.g, A, B, **kw)
    assert Hx.shape == A.shape and Hy.shape == B.shape
    assert info.converged and info.x.shape == (p.y.shape[0], K) and info.column_iterations.shape == (K,)
    single = _stack([hvp(p.x, p.y, p.f, p.g, A[..., j], B[..., j], **kw) for j in range(K)])
    assert ref.rel(_flat_cols(Hx, Hy), _flat_cols(*single)) < 1e-10
    assert ref.rel(_flat_cols(Hx, Hy), H @ _flat_cols(A, B)) < 1e-10

    # One side's directions only (the mixed blocks), and hvp_x / hvp_y.
    Hx_A, Hy_A, _ = hvp(p.x, p.y, p.f, p.g, A, None, **kw)
    assert ref.rel(_flat_cols(Hx_A, Hy_A), H[:, :nd] @ A.reshape(nd, K)) < 1e-10
    Hx_B, Hy_B, _ = hvp(p.x, p.y, p.f, p.g, None, B, **kw)
    assert ref.rel(_flat_cols(Hx_B, Hy_B), H[:, nd:] @ B.reshape(-1, K)) < 1e-10
    HA, info = hvp_x(p.x, p.y, p.f, p.g, A, **kw)
    single = torch.stack([hvp_x(p.x, p.y, p.f, p.g, A[..., j], **kw)[0] for j in range(K)], dim=-1)
    assert info.converged and ref.rel(HA, single) < 1e-10
    assert ref.rel(HA.reshape(nd, K), H[:nd, :nd] @ A.reshape(nd, K)) < 1e-10
    HB, _ = hvp_y(p.x, p.y, p.f, p.g, B, **kw)
    single = torch.stack([hvp_y(p.x, p.y, p.f, p.g, B[..., j], **kw)[0] for j in range(K)], dim=-1)
    assert ref.rel(HB, single) < 1e-10
    assert ref.rel(HB.reshape(-1, K), H[nd:, nd:] @ B.reshape(-1, K)) < 1e-10


@pytest.mark.parametrize("d", [2, 9])
def test_batched_self_term(d):
    p = ref.self_problem(d=d, eps=0.5 if d == 2 else 2.0, reach=1.0)
    A = torch.randn(p.x.shape + (K,), dtype=F64, generator=torch.Generator().manual_seed(4))
    HA, info = hvp_self(p.x, p.f, A, eps=p.eps, a=p.a, cost_scale=p.c, reach=p.reach)
    assert info.converged and HA.shape == A.shape
    single = torch.stack([hvp_self(p.x, p.f, A[..., j], eps=p.eps, a=p.a, cost_scale=p.c, reach=p.reach)[0]
                          for j in range(K)], dim=-1)
    assert ref.rel(HA, single) < 1e-10


def test_one_solve_with_k_right_hand_sides():
    """k directions are one call of the solver, with a (m, k) right-hand side; one direction
    reaches the solver as a vector, as before."""
    p = ref.problem(**CASES["balanced-d2"])
    A, B = _blocks(p)
    shapes = []

    def spy(S, rhs, **options):
        shapes.append(tuple(rhs.shape))
        return cg(S, rhs, **options)

    hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs(), solver=spy, M=jacobi())
    hvp_x(p.x, p.y, p.f, p.g, A[..., 0], **p.kwargs(), solver=spy)
    assert shapes == [(p.y.shape[0], K), (p.y.shape[0],)]


def test_batched_with_minres_and_a_preconditioner():
    p = ref.problem(**CASES["unbalanced-d2"])
    A, B = _blocks(p)
    kw = dict(p.kwargs(), ridge=0.0, rtol=1e-12, maxiter=500)
    Hx, Hy, info = hvp(p.x, p.y, p.f, p.g, A, B, **kw, solver=minres, M=jacobi())
    assert info.converged, info.status
    exact = _flat_cols(*hvp(p.x, p.y, p.f, p.g, A, B, **kw)[:2])
    assert ref.rel(_flat_cols(Hx, Hy), exact) < 1e-9


def test_batched_on_a_truncated_plan():
    """``truncate=``: the sparse plan's products and bilinear passes with k columns."""
    p = ref.problem(n=80, m=60, d=32, eps=0.25)
    assert type(PlanOperator(p.x, p.y, p.f, p.g, eps=p.eps, a=p.a, b=p.b).truncated(1e-8)).__name__ == \
        "TruncatedPlanOperator"
    A, B = _blocks(p, k=3)
    kw = dict(p.kwargs(), truncate=1e-8, M=jacobi())
    Hx, Hy, info = hvp(p.x, p.y, p.f, p.g, A, B, **kw)
    assert info.converged
    single = _stack([hvp(p.x, p.y, p.f, p.g, A[..., j], B[..., j], **kw) for j in range(3)])
    assert ref.rel(_flat_cols(Hx, Hy), _flat_cols(*single)) < 1e-10
    exact = _flat_cols(*hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs())[:2])
    assert ref.rel(_flat_cols(Hx, Hy), exact) < 1e-6


@pytest.mark.parametrize("wrt", ["x", "y", "xy"])
@pytest.mark.parametrize("case", ["unbalanced-d2", "semi-y-d9"])
def test_operator_matmat_is_one_batched_hvp(wrt, case):
    p = ref.problem(**CASES[case])
    op = loss_hessian_operator(p.x, p.y, p.f, p.g, wrt=wrt, **p.kwargs(), ridge=0.0)
    V = torch.randn(op.shape[1], K, dtype=F64, generator=torch.Generator().manual_seed(5))
    HV = op @ V
    assert HV.shape == V.shape
    assert op.last_solve.converged and op.last_solve.x.shape == (p.y.shape[0], K)
    columns = torch.stack([op @ V[:, j] for j in range(K)], dim=1)
    assert ref.rel(HV, columns) < 1e-10
    H = ref.loss_hessian(p.x, p.y, p.f, p.g, p.a, p.b, p.eps, p.c, p.reach_x, p.reach_y)
    nd = p.x.numel()
    block = {"x": H[:nd, :nd], "y": H[nd:, nd:], "xy": H}[wrt]
    assert ref.rel(HV, block @ V) < 1e-10
    # NumPy operands and zero columns go through the same path.
    np.testing.assert_allclose(op.matmat(V.numpy()), HV.numpy(), rtol=1e-9, atol=1e-12)
    assert op.matmat(V[:, :0]).shape == (op.shape[0], 0)


def test_eigsh_on_the_scipy_view_finds_the_top_eigenvalues():
    """What eigensolvers need: ARPACK's eigsh (matvecs) and LOBPCG (blocks, through
    the operator's matmat) on ``to_scipy()`` find the dense float64 Hessian's top
    eigenvalues."""
    p = ref.problem(**CASES["unbalanced-d2"])
    H = ref.loss_hessian(p.x, p.y, p.f, p.g, p.a, p.b, p.eps, p.c, p.reach_x, p.reach_y)
    top = torch.linalg.eigvalsh(H).flip(0)[:3].numpy()
    op = loss_hessian_operator(p.x, p.y, p.f, p.g, wrt="xy", **p.kwargs(), ridge=0.0)
    view = op.to_scipy()
    found = np.sort(sla.eigsh(view, k=3, which="LA", tol=1e-10, return_eigenvectors=False))[::-1]
    np.testing.assert_allclose(found, top, rtol=1e-8)
    X0 = np.random.default_rng(0).standard_normal((op.shape[0], 3))
    lam, _ = sla.lobpcg(view, X0, largest=True, tol=1e-9, maxiter=500)
    np.testing.assert_allclose(np.sort(lam)[::-1], top, rtol=1e-7)
    assert op.last_solve.x.ndim == 2     # the last product was a block of directions


def test_direction_shape_errors():
    p = ref.problem(**CASES["balanced-d2"])
    A, B = _blocks(p)
    kw = p.kwargs()
    n, m, d = p.x.shape[0], p.y.shape[0], p.x.shape[1]
    with pytest.raises(ValueError, match=rf"hvp: B has shape \({m}, {d}, 4\), expected \({m}, {d}, {K}\) "
                                         r"\(shaped like A"):
        hvp(p.x, p.y, p.f, p.g, A, B[..., :4], **kw)
    with pytest.raises(ValueError, match=rf"hvp: B has shape \({m}, {d}\), expected \({m}, {d}, {K}\)"):
        hvp(p.x, p.y, p.f, p.g, A, B[..., 0], **kw)
    with pytest.raises(ValueError, match=rf"hvp: B has shape \({m}, {d}, {K}\), expected \({m}, {d}\)"):
        hvp(p.x, p.y, p.f, p.g, A[..., 0], B, **kw)
    with pytest.raises(ValueError, match=rf"hvp_x: A has shape \({n}, {d}, 0\), expected \({n}, {d}\) or "
                                         rf"\({n}, {d}, k\), k >= 1"):
        hvp_x(p.x, p.y, p.f, p.g, A[..., :0], **kw)
    with pytest.raises(ValueError, match=rf"hvp_x: A has shape \({n}, {d}, {K}, 1\)"):
        hvp_x(p.x, p.y, p.f, p.g, A[..., None], **kw)
    with pytest.raises(TypeError, match="hvp_y: B has dtype torch.float32, expected torch.float64"):
        hvp_y(p.x, p.y, p.f, p.g, B.float(), **kw)


@requires_cuda
def test_gpu_batched_at_10k():
    """On the GPU (Triton kernels, float32), n = m = 10k, d = 3, eps = 0.5 (a dense plan) and
    d = 64 (the moments route and the bilinear passes): 16 directions in one call against
    the float64 batched product (torch kernels) and against 16 one-direction calls. About
    a minute (the float64 reference)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, k, eps = 10_000, 16, 0.5
    for d in (3, 64):
        x = torch.randn(n, d, device="cuda", generator=gen, dtype=F64)
        y = torch.randn(n, d, device="cuda", generator=gen, dtype=F64) + 0.5
        C = torch.cdist(x, y) ** 2
        g = torch.zeros(n, device="cuda", dtype=F64)
        lw = -np.log(n)
        for _ in range(300):
            f = -eps * torch.logsumexp(lw + (g[None, :] - C) / eps, dim=1)
            g = -eps * torch.logsumexp(lw + (f[:, None] - C) / eps, dim=0)
        del C
        a = torch.full((n,), 1.0 / n, device="cuda", dtype=F64)
        A = torch.randn(n, d, k, device="cuda", generator=gen, dtype=F64)
        exact, info = hvp_x(x, y, f, g, A, eps=eps, a=a, b=a, rtol=1e-10, backend="torch")
        assert info.converged
        args = [t.float() for t in (x, y, f, g)]
        kw = dict(eps=eps, a=a.float(), b=a.float(), M=jacobi(), rtol=1e-5)
        batched, info = hvp_x(*args, A.float(), **kw)
        assert info.converged and ref.rel(batched.double(), exact) < 1e-4
        single = torch.stack([hvp_x(*args, A[..., j].float(), **kw)[0] for j in range(k)], dim=-1)
        assert ref.rel(batched, single) < 1e-4
