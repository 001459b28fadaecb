"""Issue 22: SparseOperator, sparsity-preserving gradients, sparse triangular solves, IC(0)/ILU(0),
the implicit gradient of solve and lstsq on sparse operators.

Everything in float64 (complex128 where it says so) against dense autograd (gradients to 1e-10),
scipy.sparse (values) and, where installed, torchsparsegradutils (values and gradients).
"""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch

import otlinop
from otlinop import Dense, Diag, SparseOperator, aslinearoperator
from otlinop.bench.sparse_bench import poisson_2d
from solvers import cg, gmres, ichol0, ilu0, jacobi, lstsq, solve, spsolve_triangular
from solvers.sparse import CSRPattern, csr_matmul, csr_sampled
from solvers.triangular import TriangularSolver

from conftest import requires_cuda
from operator_battery import OperatorBattery

F64, C128 = torch.float64, torch.complex128
METHODS = ("native", "levels")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand_sparse(n, m, density=0.4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, m, generator=g) < density
    if dtype.is_complex:
        M = torch.complex(torch.randn(n, m, generator=g, dtype=F64), torch.randn(n, m, generator=g, dtype=F64))
    else:
        M = torch.randn(n, m, generator=g, dtype=dtype)
    return M * mask


def spd_sparse(n, seed=0):
    """A sparse symmetric M-matrix (diagonally dominant, nonpositive off-diagonal)."""
    R = rand_sparse(n, n, 0.15, seed).abs()
    A = -(R + R.T)
    A.diagonal().copy_(A.abs().sum(1) + 1.0)
    return A


def rows_cols(S):
    crow, col = S.crow_indices(), S.col_indices()
    return torch.repeat_interleave(torch.arange(S.shape[0]), crow.diff()), col


# --------------------------------------------------------------------------
# SparseOperator against its dense matrix (the shared battery)
# --------------------------------------------------------------------------
class TestSparseOperatorCOO(OperatorBattery):
    def make(self):
        M = rand_sparse(6, 5, seed=1)
        return SparseOperator(M.to_sparse_coo()), M


class TestSparseOperatorCSR(OperatorBattery):
    def make(self):
        M = rand_sparse(5, 7, seed=2)
        return SparseOperator(M.to_sparse_csr()), M


class TestSparseOperatorSymmetric(OperatorBattery):
    def make(self):
        M = spd_sparse(6, seed=3)
        op = SparseOperator(M.to_sparse_csr(), is_psd=True)
        assert op.H is op
        return op, M


class TestSparseOperatorComplex(OperatorBattery):
    def make(self):
        M = rand_sparse(5, 4, seed=4, dtype=C128)
        return SparseOperator(M.to_sparse_coo()), M


class TestSparseOperatorBatchedCOO(OperatorBattery):
    """A batch of three matrices with their own patterns (and numbers of entries): block diagonal."""

    def make(self):
        Ms = [rand_sparse(4, 3, 0.3 + 0.2 * b, seed=10 + b) for b in range(3)]
        op = SparseOperator(torch.stack(Ms).to_sparse_coo())
        assert op.batch == 3 and op.block_shape == (4, 3)
        return op, torch.block_diag(*Ms)


class TestSparseOperatorBatchedCSR(OperatorBattery):
    def make(self):
        g = torch.Generator().manual_seed(5)
        Ms = []
        for b in range(2):   # torch's batched CSR: the same number of entries, different places
            M = torch.zeros(4, 4, dtype=F64)
            M.view(-1)[torch.randperm(16, generator=g)[:7]] = torch.randn(7, generator=g, dtype=F64)
            Ms.append(M)
        return SparseOperator(torch.stack(Ms).to_sparse_csr()), torch.block_diag(*Ms)


def test_aslinearoperator_of_a_sparse_tensor_is_a_sparse_operator():
    M = rand_sparse(4, 4, seed=6)
    for S in (M.to_sparse_coo(), M.to_sparse_csr()):
        op = aslinearoperator(S)
        assert isinstance(op, SparseOperator) and op.nnz == int((M != 0).sum())
    assert isinstance(aslinearoperator(M.to_sparse_csr(), dtype=torch.float32), SparseOperator)
    assert otlinop.SparseOperator is SparseOperator


def test_sparse_operator_matches_scipy():
    M = sp.random(40, 30, density=0.1, random_state=0, format="csr")
    op = SparseOperator(torch.sparse_csr_tensor(torch.from_numpy(M.indptr), torch.from_numpy(M.indices),
                                                torch.from_numpy(M.data), M.shape))
    V = np.random.default_rng(0).standard_normal((30, 3))
    U = np.random.default_rng(1).standard_normal((40, 2))
    np.testing.assert_allclose((op @ torch.from_numpy(V)).numpy(), M @ V, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose((op.T @ torch.from_numpy(U)).numpy(), M.T @ U, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(op.diagonal().numpy(), M.diagonal(), rtol=0, atol=0)


def test_unsorted_csr_and_duplicate_coo_are_read_correctly():
    # Columns out of order within a row (torch does not forbid it) and a duplicated COO entry.
    S = torch.sparse_csr_tensor(torch.tensor([0, 2, 3]), torch.tensor([1, 0, 1]),
                                torch.tensor([2.0, 3.0, 4.0], dtype=F64), (2, 2))
    dense = torch.tensor([[3.0, 2.0], [0.0, 4.0]], dtype=F64)
    torch.testing.assert_close(SparseOperator(S).to_dense(), dense)
    C = torch.sparse_coo_tensor(torch.tensor([[0, 0, 1], [1, 1, 0]]), torch.tensor([1.0, 2.0, 5.0], dtype=F64),
                                (2, 2))
    op = SparseOperator(C)
    assert op.nnz == 2
    torch.testing.assert_close(op.to_dense(), torch.tensor([[0.0, 3.0], [5.0, 0.0]], dtype=F64))


def test_batched_products_take_three_dimensional_operands():
    Ms = torch.stack([rand_sparse(4, 3, seed=20 + b) for b in range(2)])
    op = SparseOperator(Ms.to_sparse_coo())
    X = torch.randn(2, 3, 5, dtype=F64)
    torch.testing.assert_close(op @ X, torch.bmm(Ms, X), rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match=r"SparseOperator.bmm: X must have shape \(2, 3, k\)"):
        op.bmm(torch.randn(3, 3, 5, dtype=F64))


def test_composition_with_other_operators():
    M = rand_sparse(5, 5, seed=7)
    d = torch.rand(5, dtype=F64) + 1
    op = SparseOperator(M.to_sparse_csr())
    composed = 2.0 * op @ Diag(d) + Dense(M.T) - op.T
    v = torch.randn(5, dtype=F64)
    torch.testing.assert_close(composed @ v, (2 * M @ torch.diag(d) + M.T - M.T) @ v, rtol=1e-13, atol=1e-14)
    # Promotion of a float32 operator in a float64 sum widens its values exactly.
    wide = SparseOperator(M.float().to_sparse_csr()) + Dense(torch.eye(5, dtype=F64))
    torch.testing.assert_close(wide @ v, (M.float().double() + torch.eye(5, dtype=F64)) @ v)


def test_constructor_errors():
    with pytest.raises(TypeError, match="SparseOperator: A must be a torch sparse COO or CSR tensor"):
        SparseOperator(torch.eye(3))
    with pytest.raises(TypeError, match="SparseOperator: A has dtype torch.float16"):
        SparseOperator(torch.eye(3, dtype=torch.float16).to_sparse_coo())
    with pytest.raises(ValueError, match=r"SparseOperator: A must be 2-D \(n, m\) or batched"):
        SparseOperator(torch.zeros(2, 2, 2, 2).to_sparse_coo())
    P = CSRPattern(torch.tensor([0, 1]), torch.tensor([0]), (1, 1))
    with pytest.raises(ValueError, match=r"values must have shape \(1,\), got \(2,\)"):
        SparseOperator.from_pattern(P, torch.ones(2, dtype=F64))


def test_pickle_keeps_values_and_pattern():
    M = rand_sparse(4, 4, seed=8)
    op = SparseOperator(M.to_sparse_csr())
    op.T @ torch.ones(4, dtype=F64)       # caches a transposed pattern: not pickled
    copy = pickle.loads(pickle.dumps(op))
    torch.testing.assert_close(copy.T.to_dense(), M.T)


# --------------------------------------------------------------------------
# Gradients on the pattern
# --------------------------------------------------------------------------
def _dense_grads(M, loss_of_dense, *tensors):
    """Dense autograd's gradients of a loss of M, read on M's pattern, and of the other tensors."""
    Md = M.detach().clone().requires_grad_(True)
    others = [t.detach().clone().requires_grad_(True) for t in tensors]
    grads = torch.autograd.grad(loss_of_dense(Md, *others), (Md, *others))
    rows, cols = torch.nonzero(M, as_tuple=True)
    return (grads[0][rows, cols], *grads[1:])


@pytest.mark.parametrize("dtype", [F64, C128])
def test_product_gradients_are_on_the_pattern(dtype):
    M = rand_sparse(7, 5, seed=9, dtype=dtype)
    P = SparseOperator(M.to_sparse_coo()).pattern
    values = SparseOperator(M.to_sparse_coo()).values.clone().requires_grad_(True)
    X = rand_sparse(5, 3, 1.0, seed=10, dtype=dtype).requires_grad_(True)
    U = rand_sparse(7, 2, 1.0, seed=11, dtype=dtype).requires_grad_(True)
    W, Z = rand_sparse(7, 3, 1.0, seed=12, dtype=dtype), rand_sparse(5, 2, 1.0, seed=13, dtype=dtype)

    def loss(A, X, U):
        return ((W.conj() * (A @ X)).real.sum() + (Z.conj() * (A.T @ U)).real.sum()
                + (A.H @ U).abs().square().sum())

    op = SparseOperator.from_pattern(P, values)
    got = torch.autograd.grad(loss(op, X, U), (values, X, U))
    expected = _dense_grads(M, loss, X, U)
    assert got[0].shape == (P.nnz,)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_leaf_sparse_tensor_gets_a_sparse_gradient_over_several_backward_passes():
    M = rand_sparse(6, 6, seed=14)
    A = M.to_sparse_csr().requires_grad_(True)
    op = SparseOperator(A)
    X = torch.randn(6, 2, dtype=F64)
    for _ in range(2):                       # the operator serves several backward passes
        (op @ X).sum().backward()
        (op.T @ X).sum().backward()
    assert A.grad.layout == torch.sparse_csr
    expected = _dense_grads(M, lambda D: 2 * ((D @ X).sum() + (D.T @ X).sum()))[0]
    torch.testing.assert_close(A.grad.values(), expected, rtol=1e-12, atol=1e-12)
    # Built from leaf values: torch's constructor is bypassed (its backward densifies).
    values = A.detach().values().clone().requires_grad_(True)
    built = torch.sparse_csr_tensor(A.crow_indices(), A.col_indices(), values, A.shape)
    (SparseOperator(built) @ X).sum().backward()
    torch.testing.assert_close(values.grad, _dense_grads(M, lambda D: (D @ X).sum())[0])


def test_second_order_gradients_of_the_products():
    torch.manual_seed(0)
    M = rand_sparse(5, 4, seed=15)
    P = SparseOperator(M.to_sparse_csr()).pattern
    values = SparseOperator(M.to_sparse_csr()).values.clone().requires_grad_(True)
    X = torch.randn(4, 2, dtype=F64, requires_grad=True)
    G = torch.randn(5, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, x: csr_matmul(P, v, x), (values, X))
    assert torch.autograd.gradgradcheck(lambda v, x: csr_matmul(P, v, x), (values, X))
    assert torch.autograd.gradgradcheck(lambda g, x: csr_sampled(P, g, x), (G, X))


def test_gradient_of_a_large_product_needs_no_dense_buffer():
    """Issue 22 item 2: y = A @ x for a 1M x 1M matrix with 10M entries, forward and backward
    (values and x) on the CPU, in a fresh process: the peak resident memory stays within a few
    times the matrix's storage (a dense buffer would need 8 TB). About 15 s on 2 cores."""
    code = textwrap.dedent("""
        import json, torch, otlinop
        from solvers.sparse import CSRPattern
        n, per = 1_000_000, 10
        crow = torch.arange(0, n * per + 1, per)
        col = ((torch.arange(n)[:, None] * 7919 + torch.arange(per)[None, :] * 99991) % n).sort(1).values.reshape(-1)
        values = torch.rand(n * per, dtype=torch.float64, requires_grad=True)
        storage = (crow.numel() + col.numel() + values.numel()) * 8
        A = otlinop.SparseOperator.from_pattern(CSRPattern(crow, col, (n, n)), values)
        x = torch.rand(n, dtype=torch.float64, requires_grad=True)
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")
        base = status("VmRSS")
        ((A @ x).square().sum() + (A.T @ x).sum()).backward()
        print(json.dumps(dict(peak=status("VmHWM") - base, storage=storage, gshape=list(values.grad.shape),
                              xnorm=float(x.grad.norm()))))
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["gshape"] == [10_000_000] and row["xnorm"] > 0
    # What it holds: the transposed pattern and its permutation (1.5 nnz + n numbers, for A.T), the
    # transposed values (nnz), the gradient of the values (nnz) and its part through A.T (2 nnz, gathered
    # and scattered back), a few length-n vectors and row-block temporaries: about 4 x the storage.
    assert row["peak"] < 5 * row["storage"], row


# --------------------------------------------------------------------------
# Sparse triangular solves
# --------------------------------------------------------------------------
def _triangular(n, lower, seed, dtype=F64):
    M = rand_sparse(n, n, 0.3, seed, dtype) + 4 * torch.eye(n, dtype=dtype)
    return torch.tril(M) if lower else torch.triu(M)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("dtype", [F64, C128])
def test_spsolve_triangular_values_and_gradients(method, lower, unit, dtype):
    n = 15
    T = _triangular(n, lower, seed=30, dtype=dtype)
    full = T + (torch.triu(rand_sparse(n, n, 0.2, 31, dtype), 1) if lower else
                torch.tril(rand_sparse(n, n, 0.2, 31, dtype), -1))   # an ignored other triangle
    op = SparseOperator(full.to_sparse_csr())
    values = op.values.clone().requires_grad_(True)
    A = SparseOperator.from_pattern(op.pattern, values)
    B = rand_sparse(n, 3, 1.0, 32, dtype).requires_grad_(True)
    W = rand_sparse(n, 3, 1.0, 33, dtype)
    X = spsolve_triangular(A, B, lower=lower, unit_diagonal=unit, method=method)
    got = torch.autograd.grad((W.conj() * X).real.sum(), (values, B))

    def dense_solve(F, B):
        D = torch.tril(F) if lower else torch.triu(F)
        if unit:
            D = D - torch.diag(D.diagonal()) + torch.eye(n, dtype=dtype)
        return torch.linalg.solve_triangular(D, B, upper=not lower, unitriangular=unit)

    torch.testing.assert_close(X, dense_solve(full, B), rtol=1e-12, atol=1e-13)
    expected = _dense_grads(full, lambda F, B: (W.conj() * dense_solve(F, B)).real.sum(), B)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_spsolve_triangular_double_backward():
    T = _triangular(8, True, seed=34)
    op = SparseOperator(T.to_sparse_csr())
    values = op.values.clone().requires_grad_(True)
    B = torch.randn(8, 2, dtype=F64, requires_grad=True)
    for method in METHODS:
        def f(v, b):
            return spsolve_triangular(SparseOperator.from_pattern(op.pattern, v), b, method=method)
        assert torch.autograd.gradgradcheck(f, (values, B))


def test_spsolve_triangular_matches_scipy_and_batches():
    L = sp.tril(sp.random(50, 50, density=0.1, random_state=1) + 3 * sp.eye(50)).tocsr()
    b = np.random.default_rng(2).standard_normal(50)
    A = torch.sparse_csr_tensor(torch.from_numpy(L.indptr), torch.from_numpy(L.indices), torch.from_numpy(L.data),
                                L.shape)
    for method in METHODS:
        np.testing.assert_allclose(spsolve_triangular(A, torch.from_numpy(b), method=method).numpy(),
                                   sla.spsolve_triangular(L, b, lower=True), rtol=1e-12, atol=1e-12)
    mask = _triangular(6, True, seed=40) != 0          # torch's batched CSR: one number of entries per matrix
    Ts = torch.stack([torch.randn(6, 6, dtype=F64) * mask + 4 * torch.eye(6, dtype=F64) for _ in range(3)])
    Bs = torch.randn(3, 6, 2, dtype=F64)
    for S in (Ts.to_sparse_coo(), Ts.to_sparse_csr()):
        X = spsolve_triangular(S, Bs)
        torch.testing.assert_close(X, torch.linalg.solve_triangular(Ts, Bs, upper=False), rtol=1e-12, atol=1e-13)
        assert spsolve_triangular(S, Bs[:, :, 0]).shape == (3, 6)


def test_spsolve_triangular_errors():
    T = _triangular(4, True, seed=41)
    T[2, 2] = 0.0
    A = T.to_sparse_csr()
    with pytest.raises(ValueError, match="spsolve_triangular: A is singular: row 2 has no nonzero diagonal entry"):
        spsolve_triangular(A, torch.ones(4, dtype=F64))
    spsolve_triangular(A, torch.ones(4, dtype=F64), unit_diagonal=True)          # the diagonal is not read
    with pytest.raises(ValueError, match=r"B has shape \(5,\), expected \(4,\) or \(4, k\)"):
        spsolve_triangular(A, torch.ones(5, dtype=F64), unit_diagonal=True)
    with pytest.raises(TypeError, match="B has dtype torch.float32, but A has dtype torch.float64"):
        spsolve_triangular(A, torch.ones(4), unit_diagonal=True)
    with pytest.raises(ValueError, match=r"A must be square, got shape \(2, 3\)"):
        spsolve_triangular(torch.ones(2, 3, dtype=F64).to_sparse_csr(), torch.ones(2, dtype=F64))
    with pytest.raises(TypeError, match="spsolve_triangular: A must be a torch sparse COO or CSR tensor"):
        spsolve_triangular(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64))


def test_level_schedule_of_the_poisson_factor():
    """The lower triangle of the g x g five-point Laplacian has 2 g - 1 levels."""
    g = 12
    A = poisson_2d(g)
    L = torch.tril(A.to_dense()).to_sparse_csr()
    solver = TriangularSolver(CSRPattern(L.crow_indices(), L.col_indices(), L.shape), lower=True, method="levels")
    assert solver.levels == 2 * g - 1


# --------------------------------------------------------------------------
# IC(0) and ILU(0)
# --------------------------------------------------------------------------
def _reference_ic0(A):
    n = A.shape[0]
    S = A != 0
    L = np.zeros_like(A)
    for i in range(n):
        for j in range(i + 1):
            if S[i, j]:
                s = A[i, j] - sum(L[i, k] * L[j, k] for k in range(j) if S[i, k] and S[j, k])
                L[i, j] = np.sqrt(s) if i == j else s / L[j, j]
    return L


def _reference_ilu0(A):
    n = A.shape[0]
    S = A != 0
    F = A.copy()
    for i in range(1, n):
        for k in range(i):
            if S[i, k]:
                F[i, k] /= F[k, k]
                for j in range(k + 1, n):
                    if S[i, j] and S[k, j]:
                        F[i, j] -= F[i, k] * F[k, j]
    return F * S


@pytest.mark.parametrize("method", METHODS)
def test_ichol0_is_the_textbook_factor(method):
    A = spd_sparse(30, seed=50)
    M = ichol0(SparseOperator(A.to_sparse_csr()), method=method)
    L = _reference_ic0(A.numpy())
    np.testing.assert_allclose(M.L.to_dense().numpy(), L, rtol=1e-12, atol=1e-13)
    R = torch.randn(30, 2, dtype=F64)
    np.testing.assert_allclose((M @ R).numpy(), np.linalg.solve(L @ L.T, R.numpy()), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((M @ R[:, 0]).numpy(), np.linalg.solve(L @ L.T, R[:, 0].numpy()), rtol=1e-10)
    assert M.is_psd and M.H is M and M.method == method


@pytest.mark.parametrize("method", METHODS)
def test_ilu0_is_the_textbook_factor(method):
    A = spd_sparse(30, seed=51)
    A = A + torch.triu(rand_sparse(30, 30, 0.1, seed=52).abs(), 1) * (A != 0)     # not symmetric
    M = ilu0(A, method=method)
    F = _reference_ilu0(A.numpy())
    np.testing.assert_allclose(M.LU.to_dense().numpy(), F, rtol=1e-12, atol=1e-13)
    LU = (np.tril(F, -1) + np.eye(30)) @ np.triu(F)
    R = torch.randn(30, 2, dtype=F64)
    np.testing.assert_allclose((M @ R).numpy(), np.linalg.solve(LU, R.numpy()), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((M.H @ R).numpy(), np.linalg.solve(LU.T, R.numpy()), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((M.T @ R).numpy(), np.linalg.solve(LU.T, R.numpy()), rtol=1e-10, atol=1e-12)


def test_incomplete_factorisations_of_the_poisson_matrix():
    """The five-point Laplacian: IC(0) has no intra-row step beyond the diagonal, and on a
    tridiagonal matrix IC(0) and ILU(0) are exact, so the preconditioned solve takes one step."""
    A = poisson_2d(20)
    M = ichol0(A)
    L = _reference_ic0(A.to_dense().numpy())
    np.testing.assert_allclose(M.L.to_dense().numpy(), L, rtol=1e-12, atol=1e-14)
    T = (torch.diag(torch.full((30,), 4.0, dtype=F64)) - torch.diag(torch.ones(29, dtype=F64), 1)
         - torch.diag(torch.ones(29, dtype=F64), -1))
    b = torch.randn(30, dtype=F64)
    assert cg(T, b, M=ichol0(T.to_sparse_csr()), rtol=1e-12).n_iter == 1
    assert gmres(T, b, M=ilu0(), rtol=1e-12).n_iter == 1


def test_incomplete_factorisation_errors():
    A = spd_sparse(6, seed=53)
    B = A.clone()
    B[3, 3] = 0.0
    with pytest.raises(ValueError, match="ichol0: A has no diagonal entry in row 3"):
        ichol0(B.to_sparse_csr())
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"ichol0: the incomplete factorisation broke down \(a non-positive pivot "
                                         r"at row 1\).*pass shift > 0"):
        ichol0(indefinite)
    M = ichol0(indefinite, shift=3.0)             # factors A + 3 Diag(diag(A)) = [[4, 2], [2, 4]]
    np.testing.assert_allclose(M.L.to_dense().numpy(), np.linalg.cholesky([[4.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="ilu0: the incomplete factorisation broke down"):
        ilu0(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match="shift must be a non-negative float"):
        ichol0(A, shift=-1.0)
    with pytest.raises(TypeError, match=r"ichol0: A \(Diag\) has no sparse form"):
        ichol0(Diag(torch.ones(3, dtype=F64)))
    with pytest.raises(ValueError, match=r"ilu0: A must be square, got shape \(2, 3\)"):
        ilu0(torch.ones(2, 3, dtype=F64))


def test_preconditioners_reduce_iterations_and_bind_as_factories():
    A = poisson_2d(30)
    op = SparseOperator(A, is_psd=True)
    b = torch.rand(900, dtype=F64, generator=torch.Generator().manual_seed(0))
    plain = cg(op, b, rtol=1e-10)
    ic = cg(op, b, rtol=1e-10, M=ichol0())
    jac = cg(op, b, rtol=1e-10, M=jacobi())
    assert plain.converged and ic.converged and jac.converged
    assert ic.n_iter < 0.5 * plain.n_iter
    torch.testing.assert_close(ic.x, plain.x, rtol=1e-8, atol=1e-10)
    assert gmres(op, b, rtol=1e-10, M=ilu0(), restart=50).n_iter < plain.n_iter
    # jacobi reads the stored diagonal
    torch.testing.assert_close(jacobi(op).diagonal(), torch.full((900,), 0.25, dtype=F64))


# --------------------------------------------------------------------------
# The implicit gradient of solve and lstsq
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method,M", [("cg", None), ("cg", "ichol0"), ("minres", "jacobi"), ("gmres", "ilu0"),
                                      ("bicgstab", None)])
def test_solve_gradient_wrt_the_values_matches_dense_autograd(method, M):
    symmetric = method in ("cg", "minres")
    A = spd_sparse(25, seed=60)
    if not symmetric:
        A = A + torch.triu(rand_sparse(25, 25, 0.2, seed=61).abs(), 1) * (A != 0)
    op0 = SparseOperator(A.to_sparse_csr(), is_psd=symmetric)
    values = op0.values.clone().requires_grad_(True)
    op = SparseOperator.from_pattern(op0.pattern, values, is_psd=symmetric)
    B = torch.randn(25, 3, dtype=F64, requires_grad=True)          # batched right-hand sides
    W = torch.randn(25, 3, dtype=F64)
    Mop = {"ichol0": ichol0, "jacobi": jacobi, "ilu0": ilu0, None: lambda: None}[M]()
    X = solve(op, B, method, rtol=1e-13, M=Mop, maxiter=500).x
    got = torch.autograd.grad((W * X).sum(), (values, B))
    expected = _dense_grads(A, lambda D, B: (W * torch.linalg.solve(D, B)).sum(), B)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-11)


def test_solve_on_a_sparse_tensor_gives_a_sparse_gradient():
    A = spd_sparse(12, seed=62)
    S = A.to_sparse_csr().requires_grad_(True)
    b = torch.randn(12, dtype=F64)
    x = solve(S, b, "minres", rtol=1e-13).x
    x.sum().backward()
    assert S.grad.layout == torch.sparse_csr
    expected = _dense_grads(A, lambda D: torch.linalg.solve(D, b).sum())[0]
    torch.testing.assert_close(S.grad.values(), expected, rtol=1e-10, atol=1e-11)


def test_poisson_solve_gradient_against_a_direct_solve():
    """The acceptance's run at 100 x 100: cg + IC(0), gradient of <c, x> w.r.t. the values by the
    implicit solve, against dL/dA_ij = -lam_i x_j with x and lam from scipy's direct solver."""
    g = 100
    A = poisson_2d(g)
    values = A.values().clone().requires_grad_(True)
    op = SparseOperator.from_pattern(SparseOperator(A).pattern, values, is_psd=True)
    gen = torch.Generator().manual_seed(0)
    b, c = torch.rand(g * g, dtype=F64, generator=gen), torch.rand(g * g, dtype=F64, generator=gen)
    res = solve(op, b, "cg", M=ichol0(op), rtol=1e-12, maxiter=2000)
    (c * res.x).sum().backward()
    As = sp.csr_matrix((A.values().numpy(), A.col_indices().numpy(), A.crow_indices().numpy()), shape=A.shape)
    x = sla.spsolve(As.tocsc(), b.numpy())
    lam = sla.spsolve(As.T.tocsc(), c.numpy())
    rows, cols = rows_cols(A)
    np.testing.assert_allclose(res.x.detach().numpy(), x, rtol=1e-9, atol=1e-12)
    expected = -lam[rows.numpy()] * x[cols.numpy()]
    np.testing.assert_allclose(values.grad.numpy(), expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    assert res.n_iter < 0.5 * cg(op, b, rtol=1e-12, maxiter=2000).n_iter


@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("damp", [0.0, 0.5])
def test_lstsq_gradients_match_dense_autograd(dtype, damp):
    M = rand_sparse(12, 6, 0.5, seed=70, dtype=dtype) + torch.eye(12, 6, dtype=dtype)
    op0 = SparseOperator(M.to_sparse_coo())
    values = op0.values.clone().requires_grad_(True)
    op = SparseOperator.from_pattern(op0.pattern, values)
    B = rand_sparse(12, 2, 1.0, seed=71, dtype=dtype).requires_grad_(True)
    W = rand_sparse(6, 2, 1.0, seed=72, dtype=dtype)
    X = lstsq(op, B, damp=damp, atol=1e-14, btol=1e-14, adjoint_rtol=1e-14).x

    def dense(D, B):
        N = D.mH @ D + damp ** 2 * torch.eye(6, dtype=dtype)
        return torch.linalg.solve(N, D.mH @ B)

    torch.testing.assert_close(X, dense(M, B), rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad((W.conj() * X).real.sum(), (values, B))
    expected = _dense_grads(M, lambda D, B: (W.conj() * dense(D, B)).real.sum(), B)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-11)


def test_lstsq_on_dense_tensors_and_its_errors():
    A = torch.randn(8, 3, dtype=F64, requires_grad=True)
    b = torch.randn(8, dtype=F64)
    x = lstsq(A, b, atol=1e-14, btol=1e-14).x
    x.sum().backward()
    Ad = A.detach().clone().requires_grad_(True)
    torch.linalg.lstsq(Ad, b[:, None]).solution.sum().backward()
    torch.testing.assert_close(A.grad, Ad.grad, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="lstsq: damp must be a non-negative float"):
        lstsq(A, b, damp=-1.0)
    assert not lstsq(A.detach(), b).x.requires_grad
    with pytest.raises(ValueError, match=r"solve: method='lsmr' is not supported here.*solvers.lstsq"):
        solve(A, b, "lsmr")


# --------------------------------------------------------------------------
# Against torchsparsegradutils (test-only dependency)
# --------------------------------------------------------------------------
try:
    import torchsparsegradutils as tsgu
except ImportError:   # pragma: no cover - depends on the environment
    tsgu = None
requires_tsgu = pytest.mark.skipif(tsgu is None, reason="torchsparsegradutils is not installed (pip install "
                                   "torchsparsegradutils: the test extra has it); these compare against it")


@requires_tsgu
def test_products_agree_with_torchsparsegradutils():
    M = rand_sparse(9, 7, seed=80)
    C = M.to_sparse_csr()
    ours_v = C.values().clone().requires_grad_(True)
    theirs_v = C.values().clone().requires_grad_(True)
    X1 = torch.randn(7, 3, dtype=F64, requires_grad=True)
    X2 = X1.detach().clone().requires_grad_(True)
    W = torch.randn(9, 3, dtype=F64)
    y1 = SparseOperator.from_pattern(SparseOperator(C).pattern, ours_v) @ X1
    y2 = tsgu.sparse_mm(torch.sparse_csr_tensor(C.crow_indices(), C.col_indices(), theirs_v, C.shape), X2)
    torch.testing.assert_close(y1, y2, rtol=1e-13, atol=1e-14)
    (W * y1).sum().backward()
    (W * y2).sum().backward()
    torch.testing.assert_close(ours_v.grad, theirs_v.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(X1.grad, X2.grad, rtol=1e-12, atol=1e-14)


@requires_tsgu
@pytest.mark.parametrize("lower", [True, False])
def test_triangular_solve_agrees_with_torchsparsegradutils(lower):
    T = _triangular(12, lower, seed=81)
    C = T.to_sparse_csr()
    ours_v = C.values().clone().requires_grad_(True)
    theirs_v = C.values().clone().requires_grad_(True)
    B1 = torch.randn(12, 2, dtype=F64, requires_grad=True)
    B2 = B1.detach().clone().requires_grad_(True)
    W = torch.randn(12, 2, dtype=F64)
    x1 = spsolve_triangular(SparseOperator.from_pattern(SparseOperator(C).pattern, ours_v), B1, lower=lower)
    x2 = tsgu.sparse_triangular_solve(torch.sparse_csr_tensor(C.crow_indices(), C.col_indices(), theirs_v, C.shape),
                                      B2, upper=not lower)
    torch.testing.assert_close(x1, x2, rtol=1e-12, atol=1e-13)
    (W * x1).sum().backward()
    (W * x2).sum().backward()
    torch.testing.assert_close(ours_v.grad, theirs_v.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B1.grad, B2.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cuda_products_and_triangular_solves_match_the_cpu(dtype):
    """On CUDA: the product (cuSPARSE), its gradients, both triangular-solve paths (cuSPARSE and the
    level schedule) and IC(0) against the CPU in the same dtype. A few seconds."""
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    A = poisson_2d(64, dtype=dtype)
    Ag = A.to("cuda")
    values = Ag.values().clone().requires_grad_(True)
    op = SparseOperator.from_pattern(SparseOperator(Ag).pattern, values)
    X = torch.randn(64 * 64, 4, dtype=dtype)
    Xg = X.cuda().requires_grad_(True)
    y = op @ Xg
    torch.testing.assert_close(y.cpu(), A @ X, **tol)
    (y.square().sum()).backward()
    vc = A.values().clone().requires_grad_(True)
    yc = SparseOperator.from_pattern(SparseOperator(A).pattern, vc) @ X
    yc.square().sum().backward()
    torch.testing.assert_close(values.grad.cpu(), vc.grad, **tol)
    L = ichol0(A).L
    Lg = ichol0(Ag).L
    torch.testing.assert_close(Lg.values().cpu(), L.values(), **tol)
    B = torch.randn(64 * 64, 2, dtype=dtype)
    expected = spsolve_triangular(L, B)
    for method in METHODS:
        torch.testing.assert_close(spsolve_triangular(Lg, B.cuda(), method=method).cpu(), expected, **tol)
    res = cg(SparseOperator(Ag, is_psd=True), B[:, 0].cuda(), M=ichol0(), rtol=1e-6)
    assert res.converged
    # A full matrix: each solve reads one triangle (and not a diagonal taken as unit), as on the CPU.
    # Off-diagonal entries of size 1/4 against a diagonal in [2, 3]: the unit-diagonal solves stay
    # well conditioned too (with the Laplacian's -1 they grow to 1e18 over 4096 rows, where float32
    # solves in a different order agree to 3e-4 only).
    D = A.to_dense()
    n = D.shape[0]
    F = (0.25 * (D - torch.diag(D.diagonal())) + torch.diag(2 + torch.rand(n, dtype=dtype))
         + 0.25 * torch.triu(torch.rand(n, n, dtype=dtype), 1) * (D != 0))
    Fs = F.to_sparse_csr()
    for lower in (True, False):
        for unit in (False, True):
            want = spsolve_triangular(Fs, B, lower=lower, unit_diagonal=unit)
            for method in METHODS:
                got = spsolve_triangular(Fs.cuda(), B.cuda(), lower=lower, unit_diagonal=unit, method=method)
                torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close((ilu0(Fs.cuda()) @ B.cuda()).cpu(), ilu0(Fs) @ B, **tol)


def test_benchmark_suite_runs_at_tiny_sizes(capsys):
    """``python -m otlinop.bench sparse`` on the CPU, shrunk: every table prints a row."""
    from otlinop.bench import sparse_bench

    assert sparse_bench.main(["--grid", "8", "--ks", "1", "--tri-grids", "6", "--poisson-grid", "12"]) == 0
    out = capsys.readouterr().out
    assert "| float64 | 1 |" in out and "| float64 | 6 | 36 | 11 |" in out
    row = [line for line in out.splitlines() if line.startswith("| 144 |")]
    assert row and "not converged" not in row[0], out
