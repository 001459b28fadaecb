"""solve(): gradients by the implicit function theorem, checked against finite differences."""

import sys
import warnings

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from solvers import jacobi, neumann, solve

F64 = torch.float64
TIGHT = dict(rtol=1e-13)



def _P(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=F64).requires_grad_(True)


def _b(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(True)


def _sym(P):
    """An SPD matrix built from P, so that finite differences keep it symmetric."""
    n = P.shape[0]
    return (P + P.T) / 2 + n * torch.eye(n, dtype=F64)


class MatrixOperator:
    """A user operator: x -> (W + c I) x, declaring its tensors."""

    def __init__(self, W, c, symmetric=False):
        self.W, self.c = W, c
        self.shape, self.dtype, self.device = tuple(W.shape), W.dtype, W.device
        self.is_symmetric = symmetric

    def __matmul__(self, V):
        return self.W @ V + self.c * V

    @property
    def T(self):
        return MatrixOperator(self.W.T, self.c, self.is_symmetric)

    def _differentiable_tensors(self):
        return (self.W, self.c)


class SquareOperator:
    """x -> (W W^T + I) x: twice differentiable in W, symmetric, no declared tensors."""

    is_symmetric = True

    def __init__(self, W):
        self.W = W
        self.shape, self.dtype, self.device = (W.shape[0], W.shape[0]), W.dtype, W.device

    def __matmul__(self, V):
        return self.W @ (self.W.T @ V) + V


# ---------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_gradcheck_symmetric_methods(method):
    P, b = _P(), _b(6)
    assert gradcheck(lambda P, b: solve(_sym(P), b, method, **TIGHT).x, (P, b))


@pytest.mark.parametrize("method", ["gmres", "bicgstab"])
def test_gradcheck_nonsymmetric_methods(method):
    P, b = _P(), _b(6)
    assert gradcheck(lambda P, b: solve(P + 6 * torch.eye(6, dtype=F64), b, method, **TIGHT).x, (P, b))


def test_gradcheck_dense_leaf_matrix_and_batched_rhs():
    A = (torch.randn(5, 5, dtype=F64) + 5 * torch.eye(5, dtype=F64)).requires_grad_(True)
    B = _b(5, 3)
    assert gradcheck(lambda A, B: solve(A, B, "gmres", **TIGHT).x, (A, B))


def test_gradgradcheck_small_spd_system():
    P, b = _P(5), _b(5)
    f = lambda P, b: solve(_sym(P), b, "cg", **TIGHT).x  # noqa: E731
    assert gradgradcheck(f, (P, b))


def test_gradgradcheck_nonsymmetric_and_minres_shift():
    P, b = _P(5), _b(5, 2)
    assert gradgradcheck(lambda P, b: solve(P + 5 * torch.eye(5, dtype=F64), b, "gmres", **TIGHT).x, (P, b))
    assert gradgradcheck(lambda P, b: solve((P + P.T) / 2, b, "minres", shift=-9.0, **TIGHT).x, (P, b))


def test_gradgradcheck_nonlinear_parametrisation():
    W, b = _P(5).detach()[:, :3].clone().requires_grad_(True), _b(5)
    assert gradcheck(lambda W, b: solve(SquareOperator(W), b, "cg", **TIGHT).x, (W, b))
    assert gradgradcheck(lambda W, b: solve(SquareOperator(W), b, "cg", **TIGHT).x, (W, b))


# --------------------------------------------------------- closed forms
def test_gradients_match_the_closed_form():
    A = (torch.randn(6, 6, dtype=F64) + 6 * torch.eye(6, dtype=F64)).requires_grad_(True)
    b = _b(6)
    g = torch.randn(6, dtype=F64)
    x = solve(A, b, "gmres", **TIGHT).x
    (x * g).sum().backward()
    lam = torch.linalg.solve(A.detach().T, g)
    torch.testing.assert_close(b.grad, lam)
    torch.testing.assert_close(A.grad, -torch.outer(lam, x.detach()))


def test_params_discovered_declared_or_explicit():
    otlinop = pytest.importorskip("otlinop")
    W = torch.randn(6, 6, dtype=F64).requires_grad_(True)
    c = torch.tensor(8.0, dtype=F64, requires_grad=True)
    b = torch.randn(6, dtype=F64)
    want = torch.autograd.grad(torch.linalg.solve(W + c * torch.eye(6, dtype=F64), b).sum(), (W, c))
    # declared by _differentiable_tensors
    got = torch.autograd.grad(solve(MatrixOperator(W, c), b, "gmres", **TIGHT).x.sum(), (W, c))
    # explicit params=
    got2 = torch.autograd.grad(
        solve(lambda_free_operator(W, c), b, "gmres", params=(W, c), **TIGHT).x.sum(), (W, c))
    # found by the probe matvec (an otlinop operator built from leaves)
    op = otlinop.Dense(W) + c * otlinop.Identity(6, dtype=F64)
    got3 = torch.autograd.grad(solve(op, b, "gmres", **TIGHT).x.sum(), (W, c))
    for g in (got, got2, got3):
        for a, e in zip(g, want):
            torch.testing.assert_close(a, e)


def lambda_free_operator(W, c):
    """MatrixOperator without declared tensors (and without a probe: params= given)."""

    class Plain(MatrixOperator):
        _differentiable_tensors = None

    return Plain(W, c)


def test_probe_keeps_the_callers_graph_usable():
    otlinop = pytest.importorskip("otlinop")
    B = torch.randn(5, 5, dtype=F64).requires_grad_(True)
    A = B @ B.T + 5 * torch.eye(5, dtype=F64)  # non-leaf: the probe finds B
    b = torch.randn(5, dtype=F64)
    loss = solve(otlinop.Dense(A, is_psd=True), b, "cg", **TIGHT).x.sum() + A.sum()
    loss.backward()  # A's graph is reached twice: it must not have been freed
    B2 = B.detach().clone().requires_grad_(True)
    A2 = B2 @ B2.T + 5 * torch.eye(5, dtype=F64)
    (torch.linalg.solve(A2, b).sum() + A2.sum()).backward()
    torch.testing.assert_close(B.grad, B2.grad)


# ------------------------------------------------------ backward mechanics
def test_backward_does_one_adjoint_solve(monkeypatch):
    calls = []
    methods = sys.modules["solvers.solve"]._METHODS
    original = methods["gmres"]

    def counting(*args, **kwargs):
        calls.append(kwargs.get("x0"))
        return original(*args, **kwargs)

    monkeypatch.setitem(methods, "gmres", counting)
    A = (torch.randn(6, 6, dtype=F64) + 6 * torch.eye(6, dtype=F64)).requires_grad_(True)
    b = _b(6)
    x = solve(A, b, "gmres", x0=torch.ones(6, dtype=F64), **TIGHT).x
    assert len(calls) == 1
    x.sum().backward()
    assert len(calls) == 2 and calls[1] is None  # x0 is not reused for the adjoint


def test_nonsymmetric_backward_uses_the_transpose_and_rebinds_the_preconditioner():
    A = (torch.randn(6, 6, dtype=F64) * torch.logspace(0, 2, 6, dtype=F64)[:, None]
         + 50 * torch.diag(torch.logspace(0, 2, 6, dtype=F64))).requires_grad_(True)
    b = _b(6)
    for M in (jacobi(), neumann(2)):
        x = solve(A, b, "bicgstab", M=M, **TIGHT).x
        gA, gb = torch.autograd.grad(x.sum(), (A, b))
        lam = torch.linalg.solve(A.detach().T, torch.ones(6, dtype=F64))
        torch.testing.assert_close(gb, lam)
        torch.testing.assert_close(gA, -torch.outer(lam, x.detach()))


# ------------------------------------------------------------------ complex
C128 = torch.complex128


def _cplx(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64))


@pytest.mark.parametrize("method", ["gmres", "bicgstab"])
def test_complex_gradients_match_torch_linalg_solve(method):
    """Complex A and b: the backward pass solves with A^H (torch's convention for complex
    gradients), as torch.linalg.solve's autograd does."""
    A0 = _cplx(6, 6, seed=2) / 3 + 3 * torch.eye(6, dtype=C128)
    b0 = _cplx(6, seed=3)
    for M in (None, jacobi()):
        A, b = A0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        x = solve(A, b, method, M=M, **TIGHT).x
        (x.abs() ** 2).sum().backward()
        Ar, br = A0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        (torch.linalg.solve(Ar, br).abs() ** 2).sum().backward()
        torch.testing.assert_close(b.grad, br.grad)
        torch.testing.assert_close(A.grad, Ar.grad)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_complex_hermitian_gradient(method):
    P = _cplx(5, 5, seed=4)
    b0 = _cplx(5, seed=5)

    def herm(P):
        return P @ P.mH / 5 + torch.eye(5, dtype=C128)

    P1, b1 = P.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    (solve(herm(P1), b1, method, **TIGHT).x.abs() ** 2).sum().backward()
    P2, b2 = P.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    (torch.linalg.solve(herm(P2), b2).abs() ** 2).sum().backward()
    torch.testing.assert_close(b1.grad, b2.grad)
    torch.testing.assert_close(P1.grad, P2.grad)


def test_real_operator_complex_rhs_gradient():
    """A real A with a complex b: a complex solve whose gradient reaches A's real tensor."""
    A0 = torch.randn(6, 6, dtype=F64) / 3 + 3 * torch.eye(6, dtype=F64)
    b0 = _cplx(6, seed=6)
    A, b = A0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    x = solve(A, b, "gmres", **TIGHT).x
    assert x.dtype == C128
    (x.abs() ** 2).sum().backward()
    Ar, br = A0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    (torch.linalg.solve(Ar.to(C128), br).abs() ** 2).sum().backward()
    torch.testing.assert_close(b.grad, br.grad)
    torch.testing.assert_close(A.grad, Ar.grad)


def test_no_grad_needed_returns_the_plain_result():
    A, b = torch.eye(3, dtype=F64) * 2, torch.ones(3, dtype=F64)
    res = solve(A, b)
    assert res.converged and not res.x.requires_grad
    with torch.no_grad():
        assert not solve(A, b.requires_grad_(True)).x.requires_grad


def test_result_keeps_status_with_differentiable_x():
    A, b = torch.eye(3, dtype=F64) * 2, _b(3)
    res = solve(A, b, "minres", rtol=1e-12)
    assert res.x.requires_grad and res.converged and res.status.startswith("converged")


def test_unconverged_backward_warns():
    A = _sym(_P(20)).detach() + torch.diag(torch.logspace(0, 4, 20, dtype=F64))
    b = _b(20)
    x = solve(A, b, "cg", maxiter=2).x
    with pytest.warns(RuntimeWarning, match=r"solve: the adjoint solve of the backward pass did not converge"):
        x.sum().backward()


def test_solve_errors():
    A, b = torch.eye(3, dtype=F64), torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=r"solve: unknown method 'lu'; expected one of 'cg', 'minres'"):
        solve(A, b, "lu")
    with pytest.raises(ValueError, match=r"solve: method='lsmr' is not supported"):
        solve(A, b, "lsmr")

    class NoAdjoint:
        shape, dtype, device = (3, 3), F64, torch.device("cpu")

        def __init__(self, W):
            self.W = W

        def __matmul__(self, v):
            return self.W @ v

        def _differentiable_tensors(self):
            return (self.W,)

    W = torch.eye(3, dtype=F64, requires_grad=True)
    with pytest.raises(TypeError, match=r"solve: method='gmres' needs A.T for the backward pass"):
        solve(NoAdjoint(W), b, "gmres")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(NoAdjoint(W.detach()), b, "gmres")  # nothing to differentiate: no adjoint needed
    with pytest.raises(TypeError, match=r"solve: params\[0\] must be a torch.Tensor, got int"):
        solve(A, b.requires_grad_(True), params=(3,))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'tol'"):
        solve(A, b, tol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["cg", "gmres"])
def test_gradcheck_on_cuda(method):
    P = _P(5).detach().cuda().requires_grad_(True)
    b = _b(5, 2).detach().cuda().requires_grad_(True)
    eye = 5 * torch.eye(5, dtype=F64, device="cuda")
    assert gradcheck(lambda P, b: solve((P + P.T) / 2 + eye, b, method, **TIGHT).x, (P, b))
