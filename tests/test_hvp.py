"""Hessian-vector products of the OT loss (otlinop.hvp) against dense float64
references: the Hessian of max Dual by autograd, central finite differences of
the analytic gradient at potentials converged to 1e-14, and double backward
through 1000 unrolled Sinkhorn iterations."""

import os

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse.linalg as sla  # noqa: E402

import _hessian_reference as ref  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from operator_battery import OperatorBattery  # noqa: E402
from otlinop.hvp import (LossHessianOperator, grad_x, grad_y, hvp, hvp_self, hvp_x, hvp_y,  # noqa: E402
                         loss_hessian_operator)
from solvers import cg, jacobi, minres, neumann  # noqa: E402

F64 = torch.float64

CASES = {
    "balanced": dict(),
    "balanced-c0.5": dict(c=0.5, eps=0.3),
    "balanced-eps0.1": dict(eps=0.1, d=3),
    "unbalanced": dict(reach_x=1.0, reach_y=2.0, eps=0.3),
    "semi-y": dict(reach_y=1.5, c=0.5),
    "semi-x": dict(reach_x=0.8),
}
SELF_CASES = {"balanced": dict(), "balanced-c0.5": dict(c=0.5, eps=0.2), "unbalanced": dict(reach=1.0)}


def _directions(p, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p.x.shape, dtype=F64, generator=gen), torch.randn(p.y.shape, dtype=F64, generator=gen)


def _dense_hessian(p):
    return ref.loss_hessian(p.x, p.y, p.f, p.g, p.a, p.b, p.eps, p.c, p.reach_x, p.reach_y)


def _flat(*ts):
    return torch.cat([t.reshape(-1) for t in ts])


# ---------------------------------------------------------------- references
@pytest.mark.parametrize("case", CASES)
def test_matches_hessian_of_the_dual(case):
    p = ref.problem(**CASES[case])
    H = _dense_hessian(p)
    A, B = _directions(p)
    nd = A.numel()
    Hx, Hy, info = hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs(), ridge=0.0)
    assert info.converged, info.status
    assert ref.rel(_flat(Hx, Hy), H @ _flat(A, B)) < 1e-10
    HA, _ = hvp_x(p.x, p.y, p.f, p.g, A, **p.kwargs(), ridge=0.0)
    assert ref.rel(HA.reshape(-1), H[:nd, :nd] @ A.reshape(-1)) < 1e-10
    HB, _ = hvp_y(p.x, p.y, p.f, p.g, B, **p.kwargs(), ridge=0.0)
    assert ref.rel(HB.reshape(-1), H[nd:, nd:] @ B.reshape(-1)) < 1e-10
    # The mixed blocks alone: direction B only, read on x (H_xy B), and A only, read on y.
    Hx_B, Hy_B, _ = hvp(p.x, p.y, p.f, p.g, None, B, **p.kwargs(), ridge=0.0)
    assert ref.rel(Hx_B.reshape(-1), H[:nd, nd:] @ B.reshape(-1)) < 1e-10
    Hx_A, Hy_A, _ = hvp(p.x, p.y, p.f, p.g, A, None, **p.kwargs(), ridge=0.0)
    assert ref.rel(Hy_A.reshape(-1), H[nd:, :nd] @ A.reshape(-1)) < 1e-10


@pytest.mark.parametrize("case", CASES)
def test_matches_finite_differences(case):
    p = ref.problem(**CASES[case])
    A, B = _directions(p)
    fx, fy = ref.fd_hvp(p, A, B)
    Hx, Hy, _ = hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs())
    assert ref.rel(_flat(Hx, Hy), _flat(fx, fy)) < 1e-6
    zero_A, zero_B = torch.zeros_like(A), torch.zeros_like(B)
    HA, _ = hvp_x(p.x, p.y, p.f, p.g, A, **p.kwargs())
    assert ref.rel(HA, ref.fd_hvp(p, A, zero_B)[0]) < 1e-6
    HB, _ = hvp_y(p.x, p.y, p.f, p.g, B, **p.kwargs())
    assert ref.rel(HB, ref.fd_hvp(p, zero_A, B)[1]) < 1e-6


@pytest.mark.parametrize("case", ["balanced-c0.5", "unbalanced", "semi-y", "semi-x"])
def test_matches_unrolled_autograd(case):
    p = ref.problem(**CASES[case])
    A, B = _directions(p)
    ux, uy = ref.unrolled_hvp(p.x, p.y, p.a, p.b, A, B, p.eps, p.c, p.reach_x, p.reach_y, iters=1000)
    Hx, Hy, _ = hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs(), ridge=0.0)
    assert ref.rel(_flat(Hx, Hy), _flat(ux, uy)) < 1e-9


@pytest.mark.parametrize("case", ["balanced", "unbalanced"])
def test_symmetric_and_translation_invariant(case):
    p = ref.problem(**CASES[case])
    U, V = _directions(p, seed=1), _directions(p, seed=2)
    HU, HV = hvp(p.x, p.y, p.f, p.g, *U, **p.kwargs())[:2], hvp(p.x, p.y, p.f, p.g, *V, **p.kwargs())[:2]
    lhs, rhs = float(_flat(*U) @ _flat(*HV)), float(_flat(*HU) @ _flat(*V))
    assert abs(lhs - rhs) <= 1e-10 * _flat(*HU).norm() * _flat(*V).norm()
    # L(x + t, y + t) = L(x, y): a common translation is in the null space, and H's image sums to 0.
    t = torch.tensor([0.3, -1.2], dtype=F64)
    Tx, Ty, _ = hvp(p.x, p.y, p.f, p.g, t.expand_as(p.x), t.expand_as(p.y), **p.kwargs())
    assert float(_flat(Tx, Ty).abs().max()) < 1e-10
    assert float((HU[0].sum(0) + HU[1].sum(0)).abs().max()) < 1e-10


def test_default_ridge_bias_below_1e6():
    for case in ("balanced-eps0.1", "unbalanced"):
        p = ref.problem(**CASES[case])
        A, B = _directions(p)
        exact = _flat(*hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs(), ridge=0.0)[:2])
        assert ref.rel(_flat(*hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs())[:2]), exact) < 1e-6
        # A large ridge biases visibly: the default is the small one.
        assert ref.rel(_flat(*hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs(), ridge=1e-2)[:2]), exact) > 1e-4


# ---------------------------------------------------------------- debiasing
@pytest.mark.parametrize("case", SELF_CASES)
def test_self_term(case):
    p = ref.self_problem(**SELF_CASES[case])
    A = torch.randn(p.x.shape, dtype=F64, generator=torch.Generator().manual_seed(11))
    HA, info = hvp_self(p.x, p.f, A, eps=p.eps, a=p.a, cost_scale=p.c, reach=p.reach)
    assert info.converged
    assert ref.rel(HA, ref.fd_hvp_self(p, A)) < 1e-6
    H = ref.loss_hessian(p.x, p.x, p.f, p.f, p.a, p.a, p.eps, p.c, p.reach, p.reach)
    nd = A.numel()
    H_self = (H[:nd, :nd] + H[:nd, nd:] + H[nd:, :nd] + H[nd:, nd:]) / 2
    assert ref.rel(HA.reshape(-1), H_self @ A.reshape(-1)) < 1e-7


# ---------------------------------------------------------------- injection
class _Recording:
    """Wraps a solver and records the calls, to check that it is really used."""

    def __init__(self, solver):
        self.solver, self.calls = solver, []

    def __call__(self, S, rhs, **options):
        self.calls.append(options)
        return self.solver(S, rhs, **options)


@pytest.mark.parametrize("solver,M", [(cg, None), (cg, jacobi()), (cg, neumann(3)), (minres, None),
                                      (minres, neumann(2))],
                         ids=["cg", "cg-jacobi", "cg-neumann3", "minres", "minres-neumann2"])
def test_solver_and_preconditioner_injection(solver, M):
    p = ref.problem(**CASES["balanced-eps0.1"])
    A, B = _directions(p)
    expected = _dense_hessian(p) @ _flat(A, B)
    spy = _Recording(solver)
    Hx, Hy, info = hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs(), solver=spy, M=M, rtol=1e-12, maxiter=500)
    assert len(spy.calls) == 1 and spy.calls[0]["M"] is M and spy.calls[0]["rtol"] == 1e-12
    assert info.converged, info.status
    assert ref.rel(_flat(Hx, Hy), expected) < 1e-7


def test_preconditioners_cut_hvp_iterations_on_lognormal_weights():
    p = ref.problem(n=60, m=50, eps=0.1, weights="lognormal", seed=2)
    A, _ = _directions(p)
    its = {name: hvp_x(p.x, p.y, p.f, p.g, A, **p.kwargs(), M=M, rtol=1e-10)[1].n_iter
           for name, M in (("none", None), ("jacobi", jacobi()), ("neumann3", neumann(3)))}
    assert its["jacobi"] < its["none"] and its["neumann3"] < 0.6 * its["none"], its


# ---------------------------------------------------------------- operator
class TestLossHessianOperator(OperatorBattery):
    has_diagonal = False

    def make(self):
        p = ref.problem(**CASES["unbalanced"])
        op = loss_hessian_operator(p.x, p.y, p.f, p.g, wrt="xy", **p.kwargs(), ridge=0.0, rtol=1e-14)
        return op, _dense_hessian(p)


@pytest.mark.parametrize("wrt", ["x", "y", "xy"])
def test_loss_hessian_operator(wrt):
    p = ref.problem(**CASES["semi-y"])
    H = _dense_hessian(p)
    nd = p.x.numel()
    block = {"x": H[:nd, :nd], "y": H[nd:, nd:], "xy": H}[wrt]
    op = loss_hessian_operator(p.x, p.y, p.f, p.g, wrt=wrt, **p.kwargs(), M=neumann(3))
    assert isinstance(op, LossHessianOperator) and op.is_symmetric and op.shape == block.shape
    assert op.last_solve is None
    torch.testing.assert_close(op.to_dense(), block, rtol=1e-7, atol=1e-9)
    assert op.last_solve is not None and op.last_solve.converged
    # Indefinite: eigsh through the scipy bridge finds both signs, as the dense spectrum does.
    lo = sla.eigsh(op.to_scipy(), k=1, which="SA", tol=1e-8)[0][0]
    hi = sla.eigsh(op.to_scipy(), k=1, which="LA", tol=1e-8)[0][0]
    evals = torch.linalg.eigvalsh(block)
    assert lo < 0 < hi
    np.testing.assert_allclose([lo, hi], [float(evals[0]), float(evals[-1])], rtol=1e-6)


def test_newton_step_with_minres():
    p = ref.problem(**CASES["balanced"])
    op = loss_hessian_operator(p.x, p.y, p.f, p.g, **p.kwargs())
    rhs = grad_x(p.x, p.y, p.f, p.g, eps=p.eps, a=p.a, b=p.b).reshape(-1)
    res = minres(op, rhs, shift=-1.0, rtol=1e-10)   # (H + I) s = grad
    assert res.converged, res.status
    torch.testing.assert_close(op @ res.x + res.x, rhs, rtol=0, atol=1e-8 * float(rhs.norm()))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("case", ["balanced-c0.5", "unbalanced"])
def test_gradients(case):
    p = ref.problem(**CASES[case])
    gx, gy = ref.grad(p.x, p.y, p.f, p.g, p.a, p.b, p.eps, p.c)
    kw = dict(eps=p.eps, a=p.a, b=p.b, cost_scale=p.c)
    torch.testing.assert_close(grad_x(p.x, p.y, p.f, p.g, **kw), gx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_y(p.x, p.y, p.f, p.g, **kw), gy, rtol=1e-12, atol=1e-14)
    # The envelope gradient of max Dual, by autograd with the potentials held fixed.
    x, y = p.x.clone().requires_grad_(), p.y.clone().requires_grad_()
    L = ref.dual(p.f, p.g, x, y, p.a, p.b, p.eps, p.c, p.reach_x, p.reach_y)
    ax, ay = torch.autograd.grad(L, (x, y))
    torch.testing.assert_close(gx, ax, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gy, ay, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- zero weights in a
def _zero_weight_problem(reach_x=None):
    """A problem with two points of zero weight in x (allowed by the docs), and the same
    problem with those points removed; potentials converged to 1e-14 on the full one."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(14, 2, dtype=F64, generator=gen), torch.randn(11, 2, dtype=F64, generator=gen) + 0.5
    a, b = 0.5 + torch.rand(14, dtype=F64, generator=gen), 0.5 + torch.rand(11, dtype=F64, generator=gen)
    a[[3, 9]] = 0.0
    a, b = a / a.sum(), b / b.sum()
    f, g = ref.sinkhorn(x, y, a, b, 0.5, 1.0, reach_x, None)
    keep = a > 0
    full = ref.Problem(x=x, y=y, a=a, b=b, f=f, g=g, eps=0.5, c=1.0, reach_x=reach_x, reach_y=None)
    kept = ref.Problem(x=x[keep], y=y, a=a[keep], b=b, f=f[keep], g=g, eps=0.5, c=1.0, reach_x=reach_x,
                       reach_y=None)
    return full, kept, keep


@pytest.mark.parametrize("reach_x", [None, 1.0])
def test_zero_weights_in_a(reach_x):
    """A point of zero weight carries no plan mass: the loss does not depend on it, so its
    rows of every HVP are 0 and the other rows are those of the problem without it (issue 19,
    item 3: 1/(kx ah) made NaN here)."""
    p, q, keep = _zero_weight_problem(reach_x)
    A, B = _directions(p)
    H = _dense_hessian(q)
    nd = q.x.numel()
    Hx, Hy, info = hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs(), ridge=0.0)
    assert info.converged, info.status
    assert float(Hx[~keep].abs().max()) == 0.0
    assert ref.rel(_flat(Hx[keep], Hy), H @ _flat(A[keep], B)) < 1e-10
    HA, _ = hvp_x(p.x, p.y, p.f, p.g, A, **p.kwargs(), ridge=0.0)
    assert float(HA[~keep].abs().max()) == 0.0
    assert ref.rel(HA[keep].reshape(-1), H[:nd, :nd] @ A[keep].reshape(-1)) < 1e-10
    # A direction on the zero-weight points alone moves nothing.
    lone = torch.zeros_like(A)
    lone[~keep] = A[~keep]
    Lx, Ly, _ = hvp(p.x, p.y, p.f, p.g, lone, None, **p.kwargs())
    assert float(_flat(Lx, Ly).abs().max()) == 0.0
    # Finite differences of the analytic gradient on the full problem.
    fx, fy = ref.fd_hvp(p, A, B)
    Hx, Hy, _ = hvp(p.x, p.y, p.f, p.g, A, B, **p.kwargs())
    assert ref.rel(_flat(Hx, Hy), _flat(fx, fy)) < 1e-6


def test_zero_weights_in_a_double_backward():
    """SamplesLoss' double backward with zero weights in a: finite, 0 on those points, and
    equal to the problem without them."""
    from otlinop.loss import SamplesLoss
    p, q, keep = _zero_weight_problem()
    A = _directions(p)[0]
    loss = SamplesLoss(blur=0.5, debias=False)

    def hessian_along(a, x, A):
        x = x.clone().requires_grad_()
        gx, = torch.autograd.grad(loss(a, x, p.b, p.y), x, create_graph=True)
        return torch.autograd.grad((gx * A).sum(), x)[0]

    full, kept = hessian_along(p.a, p.x, A), hessian_along(q.a, q.x, A[keep])
    assert torch.isfinite(full).all()
    assert float(full[~keep].abs().max()) == 0.0
    torch.testing.assert_close(full[keep], kept, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- errors
def test_errors():
    p = ref.problem()
    A, B = _directions(p)
    kw = p.kwargs()
    with pytest.raises(ValueError, match="give a direction A"):
        hvp(p.x, p.y, p.f, p.g, **kw)
    with pytest.raises(ValueError, match=r"A has shape \(18, 2\), expected \(24, 2\)"):
        hvp(p.x, p.y, p.f, p.g, B, **kw)
    with pytest.raises(TypeError, match="B has dtype torch.float32, expected torch.float64"):
        hvp(p.x, p.y, p.f, p.g, A, B.float(), **kw)
    with pytest.raises(ValueError, match=r"g has shape \(24,\), expected \(18,\)"):
        hvp_x(p.x, p.y, p.f, p.f, A, **kw)
    with pytest.raises(ValueError, match="x and y must have the same dimension"):
        hvp_x(p.x, p.y[:, :1], p.f, p.g, A, **kw)
    with pytest.raises(TypeError, match=r"hvp_x: A must be a torch.Tensor of shape \(24, 2\) or \(24, 2, k\), k >= 1, got None"):
        hvp_x(p.x, p.y, p.f, p.g, None, **kw)
    with pytest.raises(TypeError, match="solver must be a solver function"):
        hvp_y(p.x, p.y, p.f, p.g, B, **kw, solver="cg")
    with pytest.raises(ValueError, match="wrt must be 'x', 'y' or 'xy', got 'z'"):
        loss_hessian_operator(p.x, p.y, p.f, p.g, wrt="z", **kw)
    with pytest.raises(ValueError, match="eps must be positive"):
        hvp_self(p.x, p.f, A, eps=0.0)
    with pytest.raises(ValueError, match="reach_x must be positive"):
        hvp(p.x, p.y, p.f, p.g, A, B, **{**kw, "reach_x": -1.0})


# ---------------------------------------------------------------- Triton
def test_triton_path_matches_torch():
    """backend="triton" (Triton's interpreter without a GPU) against the torch path, float32."""
    p = ref.problem(n=10, m=8, d=2, reach_y=1.0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, y, f, g, a, b = (t.float().to(dev) for t in (p.x, p.y, p.f, p.g, p.a, p.b))
    A, B = (t.float().to(dev) for t in _directions(p))
    out = {be: hvp(x, y, f, g, A, B, eps=p.eps, a=a, b=b, reach_y=1.0, backend=be, rtol=1e-6)
           for be in ("triton", "torch")}
    assert out["triton"][2].converged and out["torch"][2].converged
    assert ref.rel(_flat(*out["triton"][:2]), _flat(*out["torch"][:2])) < 1e-4


@requires_cuda
def test_gpu_triton_vs_torch_at_10k():
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d, eps = 10_000, 64, 0.5 * 64
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    # Potentials from a few dense log-domain Sinkhorn iterations in float64: S is
    # PSD for any potentials, and Triton and torch evaluate the same formula.
    C = torch.cdist(x.double(), y.double()) ** 2
    g = torch.zeros(n, device="cuda", dtype=F64)
    lw = -np.log(n)
    for _ in range(100):
        f = -eps * torch.logsumexp(lw + (g[None, :] - C) / eps, dim=1)
        g = -eps * torch.logsumexp(lw + (f[:, None] - C) / eps, dim=0)
    del C
    a = torch.full((n,), 1.0 / n, device="cuda")
    A = torch.randn(n, d, device="cuda", generator=gen)
    B = torch.randn(n, d, device="cuda", generator=gen)
    args = (x, y, f.float(), g.float(), A, B)
    tri = hvp(*args, eps=eps, a=a, b=a, backend="triton", rtol=1e-5)
    tor = hvp(*args, eps=eps, a=a, b=a, backend="torch", rtol=1e-5)
    exact = hvp(*(t.double() for t in args), eps=eps, a=a.double(), b=a.double(), rtol=1e-10)
    ref64 = _flat(*exact[:2])
    assert ref.rel(_flat(*tri[:2]).double(), ref64) < 1e-4
    assert ref.rel(_flat(*tor[:2]).double(), ref64) < 1e-4


def test_newton_registration_example(capsys, monkeypatch):
    """examples/newton_registration.py runs, converges and reports an indefinite OT Hessian."""
    import pathlib
    import runpy
    import sys

    # The example parses sys.argv: give it its own, not pytest's command line.
    monkeypatch.setattr(sys, "argv", ["newton_registration.py"])
    threads = torch.get_num_threads()
    try:
        path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "newton_registration.py"
        runpy.run_path(str(path), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "(a local minimum)" in out and "|grad E| = " in out
    smallest = float(out.split("OT Hessian eigenvalues: smallest ")[1].split(",")[0])
    assert smallest < 0
