"""HessianOperator (the Schur complement S) and the dual Hessian K, against
dense float64 matrices built with torch ops; preconditioned CG on S."""

import pytest
import torch

import _hessian_reference as ref
from conftest import requires_cuda
from operator_battery import OperatorBattery
from otlinop.hessian import DEFAULT_RIDGE, DualHessianOperator, HessianOperator, dual_hessian
from otlinop.plan import PlanOperator
from solvers import cg, jacobi, minres, neumann

F64 = torch.float64

CASES = {
    "balanced": dict(),
    "balanced-c0.5": dict(c=0.5, eps=0.3),
    "unbalanced": dict(reach_x=1.0, reach_y=2.0),
    "semi": dict(reach_y=1.5),
}


def _schur(p, ridge=None):
    shift = (DEFAULT_RIDGE if ridge is None else ridge) * ref.plan(p.x, p.y, p.f, p.g, p.a, p.b, p.eps, p.c).sum(0).mean()
    return ref.schur(p.x, p.y, p.f, p.g, p.a, p.b, p.eps, p.c, p.reach_x, p.reach_y, shift=shift)


def _dual(p):
    P = ref.plan(p.x, p.y, p.f, p.g, p.a, p.b, p.eps, p.c)
    kx, ky = ref.k(p.reach_x, p.eps), ref.k(p.reach_y, p.eps)
    return torch.cat([torch.cat([torch.diag(kx * P.sum(1)), P], 1), torch.cat([P.T, torch.diag(ky * P.sum(0))], 1)])


def _S(p, **kw):
    return HessianOperator(p.x, p.y, p.f, p.g, **p.kwargs(), **kw)


# ------------------------------------------------------------------ battery
class TestHessianBalanced(OperatorBattery):
    def make(self):
        p = ref.problem(**CASES["balanced"])
        return _S(p), _schur(p)


class TestHessianUnbalancedNoRidge(OperatorBattery):
    def make(self):
        p = ref.problem(**CASES["unbalanced"])
        return _S(p, ridge=0.0), _schur(p, ridge=0.0)


class TestDualHessian(OperatorBattery):
    def make(self):
        p = ref.problem(**CASES["semi"])
        return dual_hessian(p.x, p.y, p.f, p.g, **p.kwargs()), _dual(p)


# ------------------------------------------------------------------ structure
def test_float32_diagonal_of_a_near_permutation_plan_stays_positive():
    """diag(S)_j = D_j - sum_i P_ij^2 / ah_i is ~0 where one row holds a column's mass: float32's
    rounding made it negative (-1e-6 D_j here; -2.6e-10 at n = 10k on the GPU), and Jacobi refused
    it. Entries the subtraction cannot resolve are its error bound: positive, tiny against D."""
    from otlinop import sinkhorn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen)
    y = x + 0.01 * torch.randn(200, 3, generator=gen)
    res = sinkhorn(x, y, blur=0.02, backend="torch")
    S = HessianOperator(x, y, res.f, res.g, eps=0.02 ** 2, backend="torch")
    d = S.diagonal()
    assert bool((d > 0).all()) and float((d / S.D).min()) < 1e-5   # the near-zero entries are there
    M = jacobi(S)   # refused a negative entry before
    assert bool(torch.isfinite(M @ torch.ones(200)).all())


@pytest.mark.parametrize("case", CASES)
def test_matches_dense_schur_splitting_and_diagonal(case):
    p = ref.problem(**CASES[case])
    S = _S(p)
    dense = _schur(p)
    torch.testing.assert_close(S.to_dense(), dense, rtol=1e-12, atol=1e-14)
    assert S.is_symmetric and S.is_psd
    D, N = S.splitting()
    torch.testing.assert_close(torch.diag(D) - N.to_dense(), dense, rtol=1e-12, atol=1e-14)
    assert N.is_symmetric and N.is_psd  # P.T @ Diag(w) @ P, a congruence
    torch.testing.assert_close(S.diagonal(), dense.diagonal(), rtol=1e-12, atol=1e-15)
    # The true diagonal, not the splitting's D: they differ by sum_i P_ij^2 / (kx ah_i).
    assert float((D - S.diagonal()).min()) > 0


def test_null_space():
    p = ref.problem(**CASES["balanced"])
    ones = torch.ones(p.y.shape[0], dtype=F64)
    S0 = _S(p, ridge=0.0)
    assert float((S0 @ ones).abs().max()) <= 1e-15
    evals = torch.linalg.eigvalsh(S0.to_dense())
    assert abs(float(evals[0])) <= 1e-15 and float(evals[1]) > 1e-3 * float(evals[-1])
    S = _S(p, ridge=1e-3)
    torch.testing.assert_close(S @ ones, S.shift * ones)
    assert float(S.shift) == pytest.approx(1e-3 * float(S.P.col_sums().mean()))
    for case in ("unbalanced", "semi"):
        q = ref.problem(**CASES[case])
        assert float(torch.linalg.eigvalsh(_S(q, ridge=0.0).to_dense())[0]) > 1e-6


def test_from_plan_shares_the_plan():
    p = ref.problem()
    P = PlanOperator(p.x, p.y, p.f, p.g, eps=p.eps, a=p.a, b=p.b)
    S = HessianOperator.from_plan(P, eps=p.eps)
    assert S.P is P
    torch.testing.assert_close(S.to_dense(), _schur(p), rtol=1e-12, atol=1e-14)


def test_building_from_a_plan_reads_nothing_back(monkeypatch):
    """With the plan's marginals cached, building S and K launches device work only:
    their diagonals are known to be non-negative, so no PSD check reads a flag back."""
    p = ref.problem(**CASES["unbalanced"])
    P = PlanOperator(p.x, p.y, p.f, p.g, eps=p.eps, a=p.a, b=p.b)
    P.row_sums(), P.col_sums()
    reads = []
    for name in ("__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *args, _real=real, _name=name: reads.append(_name) or _real(self, *args))
    S = HessianOperator.from_plan(P, eps=p.eps, reach_x=1.0, reach_y=2.0)
    K = DualHessianOperator(P, eps=p.eps, reach_x=1.0, reach_y=2.0)
    assert reads == []
    monkeypatch.undo()
    assert S.is_psd and K.is_psd and S._S.is_symmetric
    torch.testing.assert_close(S.to_dense(), _schur(p), rtol=1e-12, atol=1e-14)


def test_streaming_schur_product_is_two_plan_passes_and_differentiable(monkeypatch):
    """S @ V and the splitting's N @ V on a streaming plan are two plan passes (the row
    weights in the first pass's log-weights), equal to the dense ones; with potentials that
    require grad they take the composition, whose gradient is the dense one's."""
    import otlinop.hessian as hessian_module
    p = ref.problem(**CASES["unbalanced"])
    S = _S(p)
    V = torch.randn(S.shape[1], 3, dtype=F64)
    calls = []
    real = hessian_module.plan_apply_validated
    monkeypatch.setattr(hessian_module, "plan_apply_validated", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = S @ V
    assert len(calls) == 2
    torch.testing.assert_close(out, _schur(p) @ V, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(S @ V[:, 0], _schur(p) @ V[:, 0], rtol=1e-12, atol=1e-14)
    # The splitting's N (what neumann() applies) is the same two passes.
    D, N = S.splitting()
    calls.clear()
    torch.testing.assert_close(N @ V, (torch.diag(D) - _schur(p)) @ V, rtol=1e-10, atol=1e-13)
    assert len(calls) == 2
    f = p.f.clone().requires_grad_()
    Sg = HessianOperator(p.x, p.y, f, p.g, **p.kwargs())
    calls.clear()
    (grad,) = torch.autograd.grad((Sg @ V).square().sum(), [f], retain_graph=True)
    (grad_n,) = torch.autograd.grad((Sg.splitting()[1] @ V).sum(), [f])
    assert calls == []   # the composition, through the plan's autograd Function
    f_ref = p.f.clone().requires_grad_()
    shift = DEFAULT_RIDGE * ref.plan(p.x, p.y, f_ref, p.g, p.a, p.b, p.eps, p.c).sum(0).mean()
    dense = ref.schur(p.x, p.y, f_ref, p.g, p.a, p.b, p.eps, p.c, p.reach_x, p.reach_y, shift=shift)
    (expected,) = torch.autograd.grad((dense @ V).square().sum(), [f_ref], retain_graph=True)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    D_ref = ref.k(p.reach_y, p.eps) * ref.plan(p.x, p.y, f_ref, p.g, p.a, p.b, p.eps, p.c).sum(0) + shift
    (expected_n,) = torch.autograd.grad(((torch.diag(D_ref) - dense) @ V).sum(), [f_ref])
    torch.testing.assert_close(grad_n, expected_n, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_dual_solve_through_schur(case):
    p = ref.problem(**CASES[case])
    K = dual_hessian(p.x, p.y, p.f, p.g, **p.kwargs(), ridge=0.0)
    assert isinstance(K, DualHessianOperator) and K.is_symmetric and K.is_psd
    torch.testing.assert_close(K.to_dense(), _dual(p), rtol=1e-12, atol=1e-14)
    n = p.x.shape[0]
    r = torch.randn(K.shape[0], dtype=F64)
    if p.reach_x is None and p.reach_y is None:
        r[n:] += (r[:n].sum() - r[n:].sum()) / (K.shape[0] - n)   # consistent: sum r1 == sum r2
    z, info = K.solve(r, rtol=1e-12)
    assert info.converged
    torch.testing.assert_close(K @ z, r, rtol=0, atol=1e-10 * float(r.norm()))
    # Several right-hand sides at once, and an injected solver.
    Z, info = K.solve(torch.stack([r, 2 * r], 1), solver=minres, M=jacobi(), rtol=1e-12)
    torch.testing.assert_close(K @ Z, torch.stack([r, 2 * r], 1), rtol=0, atol=1e-9 * float(r.norm()))


@pytest.mark.parametrize("reach_x", [None, 1.0])
def test_zero_weights_in_a(reach_x):
    """Points of zero weight in a (allowed) have zero rows in P: S, its diagonal and the
    dual solve are those of the problem without them (z1 = 0 on their rows), with no NaN
    from 1 / (kx ah) (issue 19, item 3)."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 2, dtype=F64, generator=gen), torch.randn(9, 2, dtype=F64, generator=gen)
    a, b = 0.5 + torch.rand(12, dtype=F64, generator=gen), 0.5 + torch.rand(9, dtype=F64, generator=gen)
    a[[0, 7]] = 0.0
    a, b = a / a.sum(), b / b.sum()
    f, g = ref.sinkhorn(x, y, a, b, 0.5, 1.0, reach_x, None)
    keep = a > 0
    kept = ref.Problem(x=x[keep], y=y, a=a[keep], b=b, f=f[keep], g=g, eps=0.5, c=1.0, reach_x=reach_x,
                       reach_y=None)
    S = HessianOperator(x, y, f, g, eps=0.5, a=a, b=b, reach_x=reach_x)
    dense = _schur(kept)
    torch.testing.assert_close(S.to_dense(), dense, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(S.diagonal(), dense.diagonal(), rtol=1e-12, atol=1e-15)
    K = dual_hessian(x, y, f, g, eps=0.5, a=a, b=b, reach_x=reach_x, ridge=0.0)
    r = torch.randn(K.shape[0], dtype=F64, generator=gen)
    r[:12][~keep] = 0.0                        # K's rows there are zero: only such r are consistent
    if reach_x is None:
        r[12:] += (r[:12].sum() - r[12:].sum()) / 9
    z, info = K.solve(r, rtol=1e-12)
    assert info.converged and torch.isfinite(z).all()
    assert float(z[:12][~keep].abs().max()) == 0.0
    torch.testing.assert_close(K @ z, r, rtol=0, atol=1e-10 * float(r.norm()))


# ------------------------------------------------------------------ solvers
@pytest.mark.parametrize("case", ["balanced", "unbalanced"])
def test_cg_neumann_converges(case):
    p = ref.problem(**CASES[case])
    S = _S(p)
    rhs = torch.randn(p.y.shape[0], dtype=F64)
    rhs -= rhs.mean()
    res = cg(S, rhs, M=neumann(3), rtol=1e-10)
    assert res.converged, res.status
    torch.testing.assert_close(S @ res.x, rhs, rtol=0, atol=1e-9 * float(rhs.norm()))
    exact = torch.linalg.lstsq(_schur(p), rhs).solution
    torch.testing.assert_close(res.x - res.x.mean(), exact - exact.mean(), rtol=0, atol=1e-8 * float(exact.norm()))


def _iterations(weights, M):
    p = ref.problem(n=100, m=80, d=2, eps=0.1, weights=weights, seed=1)
    S = _S(p)
    rhs = torch.randn(S.shape[0], dtype=F64, generator=torch.Generator().manual_seed(5))
    rhs -= rhs.mean()
    res = cg(S, rhs, M=M, rtol=1e-8, maxiter=2000)
    assert res.converged, res.status
    return res.n_iter


def test_preconditioners_cut_iterations_on_lognormal_weights():
    # docs/math.md section 5 (n=300, m=250): none 150, Jacobi 35, Neumann(3) 20.
    none, jac, neu = (_iterations("lognormal", M) for M in (None, jacobi(), neumann(3)))
    assert jac < 0.6 * none and neu < 0.5 * none, (none, jac, neu)


def test_neumann_helps_and_jacobi_does_not_hurt_much_on_uniform_weights():
    # Uniform weights: bh is flat, so Jacobi gains nothing; Neumann(3) still halves.
    none, jac, neu = (_iterations("uniform", M) for M in (None, jacobi(), neumann(3)))
    assert neu < 0.7 * none and jac <= 1.5 * none, (none, jac, neu)


def test_exact_preconditioner_converges_at_once():
    p = ref.problem(**CASES["unbalanced"])
    S = _S(p)
    rhs = torch.randn(S.shape[0], dtype=F64)
    res = cg(S, rhs, M=torch.linalg.inv(S.to_dense()), rtol=1e-10)
    assert res.converged and res.n_iter <= 2


# ------------------------------------------------------------------ errors
def test_errors():
    p = ref.problem()
    with pytest.raises(ValueError, match="eps must be positive"):
        HessianOperator(p.x, p.y, p.f, p.g, eps=-1.0)
    with pytest.raises(ValueError, match="reach_x must be positive"):
        HessianOperator(p.x, p.y, p.f, p.g, eps=0.5, a=p.a, b=p.b, reach_x=0.0)
    with pytest.raises(ValueError, match="ridge must be non-negative and finite"):
        HessianOperator(p.x, p.y, p.f, p.g, eps=0.5, a=p.a, b=p.b, ridge=-1e-3)
    with pytest.raises(TypeError, match="ridge must be a non-negative number"):
        HessianOperator(p.x, p.y, p.f, p.g, eps=0.5, a=p.a, b=p.b, ridge="small")
    K = dual_hessian(p.x, p.y, p.f, p.g, **p.kwargs())
    with pytest.raises(ValueError, match=r"r must have shape \(42,\)"):
        K.solve(torch.zeros(41, dtype=F64))
    S = _S(p)
    with pytest.raises(ValueError, match=r"v has shape \(24,\), expected \(18,\)"):
        S @ torch.zeros(24, dtype=F64)


# ------------------------------------------------------------------ Triton
def test_triton_path_matches_torch():
    """backend="triton" (interpreter without a GPU) against the torch path, float32, tiny sizes."""
    p = ref.problem(n=12, m=10, d=2, reach_y=1.0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    data = [t.float().to(dev) for t in (p.x, p.y, p.f, p.g, p.a, p.b)]
    x, y, f, g, a, b = data
    ops = [HessianOperator(x, y, f, g, eps=p.eps, a=a, b=b, reach_y=1.0, backend=be) for be in ("triton", "torch")]
    v = torch.randn(10, 3, device=dev)
    torch.testing.assert_close(ops[0] @ v, ops[1] @ v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ops[0].diagonal(), ops[1].diagonal(), rtol=1e-4, atol=1e-7)


@requires_cuda
def test_gpu_schur_matvec_triton_vs_float64():
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d = 10_000, 64
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    f = torch.zeros(n, device="cuda")
    g = torch.zeros(n, device="cuda")
    eps = 64.0
    S32 = HessianOperator(x, y, f, g, eps=eps)
    S64 = HessianOperator(x.double(), y.double(), f.double(), g.double(), eps=eps)
    v = torch.randn(n, device="cuda", generator=gen)
    ref64 = S64 @ v.double()
    err = float((S32 @ v - ref64).norm() / ref64.norm())
    assert err < 1e-4, err
