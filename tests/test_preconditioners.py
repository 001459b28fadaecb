"""jacobi and neumann: their algebra, their effect on iteration counts, their errors."""

import numpy as np
import pytest
import torch

from solvers import PreconditionerFactory, bicgstab, cg, gmres, jacobi, minres, neumann

F64 = torch.float64



def spd(n, cond=100.0, seed=0):
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return torch.as_tensor((Q * np.geomspace(1.0, cond, n)) @ Q.T, dtype=F64)


def badly_scaled_spd(n=120, seed=0):
    s = torch.logspace(0, 3, n, dtype=F64)
    return s[:, None] * spd(n, 10.0, seed) * s[None, :]


def diagonally_dominant(n=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = torch.rand(n, n, generator=g, dtype=F64)
    N = (N + N.T) / 2
    N.fill_diagonal_(0)
    D = N.sum(1) * (1.05 + 2 * torch.rand(n, generator=g, dtype=F64))
    return torch.diag(D) - N, D, N


class Counting:
    """A symmetric dense operator with a splitting, counting matvecs."""

    is_symmetric = True

    def __init__(self, A, split=None):
        self.A, self._split = A, split
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device
        self.calls = 0

    def __matmul__(self, V):
        self.calls += 1
        return self.A @ V

    @property
    def T(self):
        return self

    def diagonal(self):
        return self.A.diagonal()

    def splitting(self):
        if self._split is None:
            raise NotImplementedError
        return self._split


def dense_of(M, n):
    return M @ torch.eye(n, dtype=F64)


# ------------------------------------------------------------------ jacobi
def test_jacobi_cuts_iterations_on_badly_scaled_spd():
    A = badly_scaled_spd()
    b = torch.randn(120, dtype=F64)
    plain = cg(A, b, rtol=1e-8, maxiter=5000)
    pre = cg(A, b, rtol=1e-8, M=jacobi())
    assert pre.converged and pre.n_iter < plain.n_iter / 4, (pre.n_iter, plain.n_iter)
    assert float((A @ pre.x - b).norm() / b.norm()) < 1e-7


def test_jacobi_bound_equals_factory():
    A = badly_scaled_spd(40)
    b = torch.randn(40, dtype=F64)
    M = jacobi(A)
    torch.testing.assert_close(M @ b, b / A.diagonal())
    torch.testing.assert_close(M @ torch.stack([b, 2 * b], 1), torch.stack([b, 2 * b], 1) / A.diagonal()[:, None])
    assert M.T is M and M.is_symmetric and M.is_psd
    a, f = cg(A, b, M=M, rtol=1e-10), cg(A, b, M=jacobi(), rtol=1e-10)
    assert a.n_iter == f.n_iter
    torch.testing.assert_close(a.x, f.x)
    assert repr(jacobi()) == "jacobi()"


def test_jacobi_errors():
    A = torch.eye(3, dtype=F64)
    A[1, 1] = 0.0
    with pytest.raises(ValueError, match=r"jacobi: diag\(A\) has a zero entry at index 1"):
        jacobi(A)
    with pytest.raises(ValueError, match=r"jacobi: diag\(A\) has a zero entry at index 1"):
        cg(A, torch.ones(3, dtype=F64), M=jacobi())
    with pytest.raises(ValueError, match=r"jacobi: A must be square, got shape \(3, 2\)"):
        jacobi(torch.ones(3, 2, dtype=F64))

    class NoDiagonal(Counting):
        def diagonal(self):
            raise NotImplementedError("no cheap diagonal")

    with pytest.raises(TypeError, match=r"jacobi: A \(NoDiagonal\) provides no cheap diagonal"):
        cg(NoDiagonal(torch.eye(3, dtype=F64)), torch.ones(3, dtype=F64), M=jacobi())


def test_jacobi_negative_diagonal_refused_by_spd_solvers_only():
    A = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=F64)) + 0.1
    b = torch.ones(3, dtype=F64)
    for fn in (cg, minres):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: M=jacobi\(A\) is not positive definite "
                                             r"\(diag\(A\) has a negative entry -0.9 at index 1\)"):
            fn(A, b, M=jacobi())
    for fn in (gmres, bicgstab):
        res = fn(A, b, M=jacobi(), rtol=1e-12)
        assert res.converged
        torch.testing.assert_close(A @ res.x, b)


# ----------------------------------------------------------------- neumann
def test_neumann_cuts_iterations_on_diagonally_dominant():
    A, _, _ = diagonally_dominant()
    b = torch.randn(150, dtype=F64)
    counts = {name: cg(A, b, rtol=1e-10, M=M).n_iter
              for name, M in [("none", None), ("jacobi", jacobi()), ("neumann3", neumann(3))]}
    assert counts["neumann3"] < counts["jacobi"] <= counts["none"], counts
    assert counts["neumann3"] <= counts["none"] / 3, counts
    res = cg(A, b, rtol=1e-10, M=neumann(3))
    assert res.converged and float((A @ res.x - b).norm() / b.norm()) < 1e-9


@pytest.mark.parametrize("terms", [0, 1, 2, 3])
def test_neumann_is_the_series_and_symmetric(terms):
    A, D, N = diagonally_dominant(40)
    M = neumann(terms, A)
    dense = dense_of(M, 40)
    Dinv = torch.diag(1 / D)
    series = sum(torch.linalg.matrix_power(Dinv @ N, k) @ Dinv for k in range(terms + 1))
    torch.testing.assert_close(dense, series, rtol=1e-12, atol=1e-14)
    u, v = torch.randn(40, dtype=F64), torch.randn(40, dtype=F64)
    assert abs(float(u @ (M @ v) - (M @ u) @ v)) <= 1e-12 * float(u.norm() * v.norm() * dense.norm())
    assert float(torch.linalg.eigvalsh((dense + dense.T) / 2).min()) > 0  # SPD
    assert M.is_symmetric and M.is_psd == (terms % 2 == 0) and M.T is M


def test_neumann_even_terms_spd_even_outside_the_unit_interval():
    # spec(T) reaches beyond -1: odd terms give an indefinite M, even terms an SPD one.
    A = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)
    ev = {K: torch.linalg.eigvalsh(dense_of(neumann(K, A), 2)) for K in (1, 2)}
    assert float(ev[1].min()) < 0 < float(ev[2].min())


def test_neumann_accepts_vectors_and_blocks_with_terms_matvecs():
    A, D, N = diagonally_dominant(30)
    op = Counting(N)
    M = neumann(3, (D, op))
    v = torch.randn(30, dtype=F64)
    V = torch.stack([v, -2 * v, v + 1], 1)
    op.calls = 0
    y = M @ v
    assert op.calls == 3 and y.shape == (30,)
    op.calls = 0
    Y = M @ V
    assert op.calls == 3 and Y.shape == (30, 3)
    torch.testing.assert_close(Y[:, 0], y)
    torch.testing.assert_close(Y[:, 1], -2 * y)


def test_neumann_uses_the_operators_splitting():
    A, D, N = diagonally_dominant(30)
    custom = (2 * D, torch.diag(D) + N)  # A = 2D - (D + N): a different, valid splitting
    op = Counting(A, split=custom)
    dense = dense_of(neumann(2, op), 30)
    Dinv = torch.diag(1 / custom[0])
    series = sum(torch.linalg.matrix_power(Dinv @ custom[1], k) @ Dinv for k in range(3))
    torch.testing.assert_close(dense, series, rtol=1e-12, atol=1e-14)
    fallback = dense_of(neumann(2, Counting(A)), 30)  # splitting() raises: the Jacobi splitting
    Dinv = torch.diag(1 / D)
    torch.testing.assert_close(fallback, sum(torch.linalg.matrix_power(Dinv @ N, k) @ Dinv for k in range(3)),
                               rtol=1e-12, atol=1e-14)


def test_neumann_with_otlinop_splitting():
    otlinop = pytest.importorskip("otlinop")
    A, D, N = diagonally_dominant(30)
    op = otlinop.Diag(D) - otlinop.Dense(N)
    b = torch.randn(30, dtype=F64)
    res = cg(op, b, rtol=1e-10, M=neumann(3))
    assert res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b))
    torch.testing.assert_close(dense_of(neumann(1, op), 30), dense_of(neumann(1, A), 30))


def test_neumann_zero_terms_is_jacobi():
    A, _, _ = diagonally_dominant(20)
    torch.testing.assert_close(dense_of(neumann(0, A), 20), dense_of(jacobi(A), 20))


def test_neumann_negative_diagonal():
    A = torch.tensor([[-4.0, 1.0], [1.0, 3.0]], dtype=F64)
    M = neumann(2, A)
    Dinv = torch.diag(1 / A.diagonal())
    N = torch.diag(A.diagonal()) - A
    series = sum(torch.linalg.matrix_power(Dinv @ N, k) @ Dinv for k in range(3))
    torch.testing.assert_close(dense_of(M, 2), series)
    b = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match=r"cg: M=neumann\(2\) is not positive definite"):
        cg(A, b, M=neumann(2))
    assert gmres(A, b, M=neumann(2), rtol=1e-12).converged


def test_neumann_nonsymmetric_transpose():
    A = torch.tensor([[4.0, 1.0, 0.5], [0.2, 5.0, 1.0], [1.0, 0.3, 6.0]], dtype=F64)
    M = neumann(3, A)
    assert not M.is_symmetric
    torch.testing.assert_close(dense_of(M.T, 3), dense_of(M, 3).T)


def test_neumann_errors():
    with pytest.raises(ValueError, match=r"neumann: terms must be a non-negative int, got -1"):
        neumann(-1)
    with pytest.raises(ValueError, match=r"neumann: terms must be a non-negative int, got 1.5"):
        neumann(1.5)
    A = torch.eye(3, dtype=F64)
    A[2, 2] = 0
    with pytest.raises(ValueError, match=r"neumann: diag\(A\) has a zero entry at index 2"):
        neumann(3, A)
    with pytest.raises(ValueError, match=r"neumann: D has a zero entry at index 2"):
        neumann(3, (A.diagonal(), torch.eye(3, dtype=F64)))
    with pytest.raises(ValueError, match=r"neumann: D must be a tensor of shape \(3,\), got \(2,\)"):
        neumann(3, (torch.ones(2, dtype=F64), torch.eye(3, dtype=F64)))
    with pytest.raises(ValueError, match=r"neumann: a splitting must be a pair \(D, N\)"):
        neumann(3, (1, 2, 3))


# -------------------------------------------------------- exact and custom
# ------------------------------------------------------------------ complex
C128 = torch.complex128


def _complex(n, seed=0):
    g = np.random.default_rng(seed)
    return torch.as_tensor(g.standard_normal((n, n)) + 1j * g.standard_normal((n, n)), dtype=C128)


def test_jacobi_on_a_complex_operator():
    A = _complex(6, 1) + 6 * torch.eye(6, dtype=C128)
    M = jacobi(A)
    assert M.dtype == C128
    torch.testing.assert_close(M @ torch.ones(6, dtype=C128), 1 / A.diagonal())
    torch.testing.assert_close(dense_of_c(M.H, 6), dense_of_c(M, 6).mH)
    assert isinstance(M.why_not_definite, str)  # a non-real diagonal: not for cg / minres
    H = A + A.mH  # Hermitian with a real, positive diagonal
    assert jacobi(H).why_not_definite is None


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("real_diagonal", [True, False])
def test_neumann_on_a_complex_splitting_is_the_series(terms, real_diagonal):
    n = 8
    N = 0.1 * _complex(n, 2)
    if real_diagonal:
        D = torch.linspace(2, 5, n, dtype=F64).to(C128)
    else:  # the signed form, with the complex phase of D
        D = torch.as_tensor(np.linspace(2, 5, n) * np.exp(1j * np.linspace(-2, 2, n)), dtype=C128)
    M = neumann(terms, (D, N))
    Dinv = torch.diag(1 / D)
    series = sum(torch.linalg.matrix_power(Dinv @ N, k) @ Dinv for k in range(terms + 1))
    torch.testing.assert_close(dense_of_c(M, n), series, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dense_of_c(M.T, n), series.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dense_of_c(M.H, n), series.mH, rtol=1e-12, atol=1e-14)
    assert (M.why_not_definite is None) == real_diagonal
    # The adjoint solve of solve(..., "gmres") with this M goes through M.H.
    A = torch.diag(D) - N
    res = gmres(A, torch.ones(n, dtype=C128), M=M, rtol=1e-12)
    assert res.converged and res.n_iter < n


def test_neumann_on_a_complex_hermitian_operator_for_cg():
    A = _complex(30, 3)
    A = (A + A.mH) / 2 / 30 ** 0.5 + 3 * torch.eye(30, dtype=C128)  # Hermitian, diagonally dominant enough
    b = torch.ones(30, dtype=C128)
    plain = cg(A, b, rtol=1e-10)
    pre = cg(A, b, rtol=1e-10, M=neumann(2))
    assert plain.converged and pre.converged and pre.n_iter < plain.n_iter
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, b))


def dense_of_c(M, n):
    return M @ torch.eye(n, dtype=C128)


@pytest.mark.parametrize("fn", [cg, minres, gmres, bicgstab])
def test_exact_preconditioner_converges_in_one_or_two_iterations(fn):
    A = spd(60, 1e4) if fn in (cg, minres) else spd(60, 1e4) + torch.triu(torch.ones(60, 60, dtype=F64), 1)
    b = torch.randn(60, dtype=F64)
    op = Counting(A)
    op.is_symmetric = fn in (cg, minres)
    res = fn(op, b, rtol=1e-10, M=torch.linalg.inv(A))
    assert res.converged and res.n_iter <= 2, res.status
    assert op.calls <= 2 * res.n_iter + 1  # counted matvecs: bicgstab takes two per iteration
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)


def test_custom_factory_is_bound_to_the_solvers_operator():
    seen = []

    def build(A):
        seen.append(A)
        return torch.diag(1 / A.diagonal())

    factory = PreconditionerFactory(build, "mine")
    A = badly_scaled_spd(30)
    res = cg(A, torch.ones(30, dtype=F64), M=factory, rtol=1e-10)
    assert res.converged and len(seen) == 1 and seen[0].shape == (30, 30)
    assert repr(factory) == "mine"
    with pytest.raises(TypeError, match=r"PreconditionerFactory: build must be callable"):
        PreconditionerFactory(3, "bad")


def _sinkhorn_schur(n=60, m=50, eps=0.1):
    """The Sinkhorn Schur complement of docs/math.md section 5, log-normal weights."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 2, generator=g, dtype=F64), torch.randn(m, 2, generator=g, dtype=F64) + 0.5
    a = torch.exp(1.5 * torch.randn(n, generator=g, dtype=F64))
    b = torch.exp(1.5 * torch.randn(m, generator=g, dtype=F64))
    a, b = a / a.sum(), b / b.sum()
    C = torch.cdist(x, y) ** 2
    f, h = torch.zeros(n, dtype=F64), torch.zeros(m, dtype=F64)
    for _ in range(200):
        f = -eps * torch.logsumexp(b.log()[None, :] + (h[None, :] - C) / eps, dim=1)
        h = -eps * torch.logsumexp(a.log()[:, None] + (f[:, None] - C) / eps, dim=0)
    P = a[:, None] * b[None, :] * torch.exp((f[:, None] + h[None, :] - C) / eps)
    ah, bh = P.sum(1), P.sum(0)
    D = bh + 1e-5 * eps * bh.mean()
    N = P.T @ (P / ah[:, None])
    return torch.diag(D) - N, D, N


def test_neumann_on_the_sinkhorn_schur_complement():
    S, D, N = _sinkhorn_schur()
    T = N / D.sqrt()[:, None] / D.sqrt()[None, :]
    ev = torch.linalg.eigvalsh(T)
    assert float(ev.min()) > -1e-12 and float(ev.max()) < 1  # spec(T) in [0, 1)
    r = torch.randn(S.shape[0], dtype=F64)
    r -= r.mean()
    counts = {K: cg(S, r, rtol=1e-8, M=neumann(K, (D, N))).n_iter for K in (0, 1, 3)}
    none = cg(S, r, rtol=1e-8, maxiter=5000).n_iter
    assert counts[3] < counts[1] < counts[0] < none, (counts, none)
    assert counts[3] <= counts[0] * 0.6, counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_preconditioners_on_cuda(dtype):
    A, D, N = diagonally_dominant(200)
    A, D, N = A.to("cuda", dtype), D.to("cuda", dtype), N.to("cuda", dtype)
    B = torch.randn(200, 3, dtype=dtype, device="cuda")
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    for M in (jacobi(), neumann(3), neumann(2, (D, N))):
        res = cg(A, B, rtol=rtol, M=M)
        assert res.converged and res.x.device.type == "cuda"
        err = (A.double() @ res.x.double() - B.double()).norm() / B.double().norm()
        assert float(err) < 10 * rtol
