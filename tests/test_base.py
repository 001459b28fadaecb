"""The operator algebra, concrete operators and interop, through the shared battery."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch

import otlinop
from otlinop import BlockOperator, Dense, Diag, Identity, LinearOperator, Zero, aslinearoperator

from operator_battery import OperatorBattery

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def spd(n, seed=0, cond=10.0):
    Q, _ = torch.linalg.qr(rand(n, n, seed=seed))
    evals = torch.logspace(0, np.log10(cond), n, dtype=F64)
    return (Q * evals) @ Q.T


# ------------------------------------------------------------- battery members
class TestDenseSquare(OperatorBattery):
    def make(self):
        M = rand(6, 6)
        return Dense(M), M


class TestDenseRect(OperatorBattery):
    def make(self):
        M = rand(5, 3)
        return Dense(M), M


class TestDiag(OperatorBattery):
    def make(self):
        d = rand(7)
        return Diag(d), torch.diag(d)


def test_diag_psd_given_or_checked():
    d = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    assert not Diag(d).is_psd and Diag(d.abs()).is_psd and Diag(torch.zeros(0, dtype=F64)).is_psd
    # Given by the caller: taken as said (no read-back), for d known to be >= 0.
    assert Diag(d.abs(), psd=True).is_psd and not Diag(d.abs(), psd=False).is_psd
    with pytest.raises(TypeError, match="Diag: psd must be a bool or None, got int"):
        Diag(d, psd=1)


class TestIdentity(OperatorBattery):
    def make(self):
        return Identity(4, dtype=F64), torch.eye(4, dtype=F64)


class TestZeroRect(OperatorBattery):
    def make(self):
        return Zero((3, 5), dtype=F64), torch.zeros(3, 5, dtype=F64)


class TestSum(OperatorBattery):
    def make(self):
        A, B = rand(4, 4, seed=1), rand(4, 4, seed=2)
        return Dense(A) + Diag(torch.diagonal(B).clone()), A + torch.diag(torch.diagonal(B))


class TestDifferenceAndNegation(OperatorBattery):
    def make(self):
        A, B = rand(4, 3, seed=1), rand(4, 3, seed=2)
        return -(Dense(A) - Dense(B)), B - A


class TestScaleAndDivide(OperatorBattery):
    def make(self):
        A = rand(3, 4, seed=3)
        return 2.5 * Dense(A) / 4.0, A * 2.5 / 4.0


class TestTensorScale(OperatorBattery):
    def make(self):
        A = rand(3, 3, seed=3)
        c = torch.tensor(-1.5, dtype=F64)
        return Dense(A) * c, A * c


class TestProduct(OperatorBattery):
    has_diagonal = False

    def make(self):
        A, B = rand(4, 5, seed=4), rand(5, 3, seed=5)
        return Dense(A) @ Dense(B), A @ B


class TestProductWithDiag(OperatorBattery):
    def make(self):
        d, A = rand(4, seed=6), rand(4, 4, seed=7)
        return Diag(d) @ Dense(A) @ Diag(d), torch.diag(d) @ A @ torch.diag(d)


class TestCongruence(OperatorBattery):
    has_diagonal = False

    def make(self):
        P, w = Dense(rand(5, 3, seed=8)), rand(5, seed=9).abs()
        op = P.T @ Diag(w) @ P
        assert op.is_symmetric and op.is_psd
        return op, P.M.T @ torch.diag(w) @ P.M


class TestPower(OperatorBattery):
    has_diagonal = False

    def make(self):
        A = rand(4, 4, seed=10) / 2
        return Dense(A) ** 3, torch.linalg.matrix_power(A, 3)


class TestPowerOfDiag(OperatorBattery):
    def make(self):
        d = rand(4, seed=11)
        return Diag(d) ** 2, torch.diag(d ** 2)


class TestTranspose(OperatorBattery):
    def make(self):
        A = rand(3, 6, seed=12)
        return Dense(A).T, A.T


class TestBlock(OperatorBattery):
    def make(self):
        A, B, C = rand(2, 2, seed=13), rand(2, 3, seed=14), rand(3, 2, seed=15)
        op = BlockOperator([[Dense(A), Dense(B)], [Dense(C), None]])
        dense = torch.zeros(5, 5, dtype=F64)
        dense[:2, :2], dense[:2, 2:], dense[2:, :2] = A, B, C
        return op, dense


class TestSymmetricBlock(OperatorBattery):
    def make(self):
        d, P = rand(3, seed=16).abs(), Dense(rand(3, 4, seed=17))
        op = BlockOperator([[Diag(d), P], [P.T, Identity(4, dtype=F64)]])
        assert op.is_symmetric
        dense = torch.zeros(7, 7, dtype=F64)
        dense[:3, :3], dense[:3, 3:], dense[3:, :3], dense[3:, 3:] = torch.diag(d), P.M, P.M.T, torch.eye(4, dtype=F64)
        return op, dense


class TestSparseCOO(OperatorBattery):
    def make(self):
        M = rand(5, 5, seed=18) * (rand(5, 5, seed=19) > 0.3)
        return aslinearoperator(M.to_sparse_coo()), M


class TestSparseCSR(OperatorBattery):
    def make(self):
        M = rand(4, 6, seed=20) * (rand(4, 6, seed=21) > 0.3)
        return aslinearoperator(M.to_sparse_csr()), M


class TestNumpy(OperatorBattery):
    def make(self):
        M = rand(4, 4, seed=22)
        return aslinearoperator(M.numpy()), M


class TestScipySparse(OperatorBattery):
    def make(self):
        M = sp.random(6, 4, density=0.5, random_state=3, format="csr")
        return aslinearoperator(M), torch.from_numpy(M.toarray())


class TestScipyLinearOperator(OperatorBattery):
    has_diagonal = False

    def make(self):
        M = rand(4, 5, seed=23).numpy()
        return aslinearoperator(sla.aslinearoperator(M)), torch.from_numpy(M)


class TestGPyTorchOperator(OperatorBattery):
    def make(self):
        linear_operator = pytest.importorskip("linear_operator")
        M = spd(5, seed=24)
        return aslinearoperator(linear_operator.to_linear_operator(M)), M


class TestLinearOperatorRoundTrip(OperatorBattery):
    # The linear_operator bridge (to_linear_operator) makes its own objects picklable.
    picklable = False

    def make(self):
        pytest.importorskip("linear_operator")
        M = rand(4, 4, seed=25)
        return aslinearoperator(Dense(M).to_linear_operator()), M


class _MatvecOnly(LinearOperator):
    """Implements only _matvec and _rmatvec: checks the defaults built on them."""

    def __init__(self, M):
        super().__init__(M.shape, M.dtype, M.device)
        self.M = M

    def _matvec(self, v):
        return self.M @ v

    def _rmatvec(self, u):
        return self.M.T @ u


class TestMatvecOnlySubclass(OperatorBattery):
    has_diagonal = False

    def make(self):
        M = rand(3, 5, seed=26)
        return _MatvecOnly(M), M


class _NoAdjoint(LinearOperator):
    def __init__(self, M):
        super().__init__(M.shape, M.dtype, M.device)
        self.M = M

    def _matmat(self, V):
        return self.M @ V


class TestNoAdjointSubclass(OperatorBattery):
    has_diagonal = False
    has_adjoint = False

    def make(self):
        M = rand(3, 4, seed=27)
        return _NoAdjoint(M), M


# ------------------------------------------------------------------ algebra
def test_transpose_is_cached_and_involutive():
    A = Dense(rand(3, 4))
    assert A.T is A.T
    assert A.T.T is A
    assert A.H is A.T and A.adjoint() is A.T


class _OwnTranspose(LinearOperator):
    """A subclass whose ``_adjoint`` builds an instance of its own class."""

    def __init__(self, M, transpose_of=None):
        super().__init__(M.shape, M.dtype, M.device, transpose_of=transpose_of)
        self.M = M

    def _matmat(self, V):
        return self.M @ V

    def _adjoint(self):
        return _OwnTranspose(self.M.T, transpose_of=self)


def test_transpose_of_pairs_a_subclass_with_its_adjoint():
    """``transpose_of`` makes the adjoint's adjoint the operator itself, so the
    algebra recognises ``A.T @ A`` as symmetric PSD."""
    A = _OwnTranspose(rand(5, 3))
    assert isinstance(A.T, _OwnTranspose) and A.T.T is A and A.T is A.T
    assert (A.T @ A).is_psd and (A @ A.T).is_psd
    torch.testing.assert_close((A.T @ A).to_dense(), A.M.T @ A.M)


def test_symmetric_operator_is_its_own_adjoint():
    D = Diag(rand(3))
    assert D.T is D


def test_flags_propagate():
    S = Dense(spd(4), is_psd=True)
    assert (S + S).is_psd and (2 * S).is_psd and not (-S).is_psd and (-S).is_symmetric
    assert (S ** 2).is_psd
    N = Dense(rand(4, 4, seed=3))
    assert not (S + N).is_symmetric
    assert (N.T @ N).is_psd


def test_dense_symmetry_detection():
    assert Dense(spd(3)).is_symmetric
    assert not Dense(rand(3, 3, seed=5)).is_symmetric


def test_composition_with_autograd():
    M = rand(3, 3).requires_grad_()
    v = rand(3, seed=1)
    out = ((2 * Dense(M)) @ Dense(M).T @ v).sum()
    out.backward()
    expected = torch.autograd.functional.jacobian(lambda M_: (2 * M_ @ M_.T @ v).sum(), M.detach())
    torch.testing.assert_close(M.grad, expected)


def test_power_zero_is_identity():
    A = Dense(rand(3, 3))
    assert isinstance(A ** 0, Identity)


def test_splitting_default_is_jacobi():
    M = spd(4)
    D, N = Dense(M).splitting()
    torch.testing.assert_close(torch.diag(D) - N.to_dense(), M)


def test_rmatmul_matrix():
    M = rand(3, 4)
    U = rand(2, 3, seed=2)
    torch.testing.assert_close(U @ Dense(M), U @ M)


# ------------------------------------------------------------------ errors
def test_subclass_without_hooks_is_rejected():
    class Broken(LinearOperator):
        pass

    with pytest.raises(TypeError, match="must implement _matvec or _matmat"):
        Broken((2, 2), F64, "cpu")


def test_error_messages():
    A = Dense(rand(4, 3))
    with pytest.raises(ValueError, match=r"v has shape \(4,\), expected \(3,\).*did you mean A.T @ v"):
        A @ torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match=r"V has shape \(2, 5\), expected \(3, k\)"):
        A.matmat(torch.zeros(2, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"u has shape \(3,\), expected \(4,\)"):
        A.rmatvec(torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="v must be a torch.Tensor or a NumPy array of numbers, got str"):
        A.matvec("abc")
    with pytest.raises(ValueError, match=r"v must be 1-D \(m,\) or 2-D \(m, k\), got shape \(3, 1, 1\)"):
        A @ torch.zeros(3, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"A \+ B: shapes differ, A is \(4, 3\) and B is \(3, 3\)"):
        A + Dense(rand(3, 3))
    with pytest.raises(ValueError, match=r"A @ B: inner dimensions differ"):
        A @ A
    with pytest.raises(ValueError, match="A \\*\\* k: A must be square"):
        A ** 2
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        Dense(rand(2, 2)) ** -1
    with pytest.raises(ZeroDivisionError, match="c is zero"):
        A / 0
    with pytest.raises(ValueError, match="symmetric operator must be square"):
        LinearOperator.__init__(Dense.__new__(Dense), (2, 3), F64, "cpu", is_symmetric=True)
    with pytest.raises(TypeError, match="dtype must be one of"):
        Identity(2, dtype=torch.int64)
    with pytest.raises(NotImplementedError, match="no cheap diagonal"):
        (Dense(rand(2, 3)) @ Dense(rand(3, 2))).diagonal()
    with pytest.raises(ValueError, match="d has zero entries"):
        Diag(torch.zeros(2, dtype=F64)).inverse()


def test_aslinearoperator_rejects_unknown_types():
    with pytest.raises(TypeError, match="cannot convert builtins.str; expected an otlinop LinearOperator"):
        aslinearoperator("matrix")
    with pytest.raises(ValueError, match="NumPy array must be 2-D"):
        aslinearoperator(np.zeros(3))


def test_block_operator_errors():
    A = Dense(rand(2, 2))
    with pytest.raises(ValueError, match="same, non-zero number of blocks"):
        BlockOperator([[A, A], [A]])
    with pytest.raises(ValueError, match="all blocks are None"):
        BlockOperator([[None]])
    with pytest.raises(ValueError, match=r"block \[0\]\[1\] has shape \(3, 3\), but its block row has 2 rows"):
        BlockOperator([[A, Dense(rand(3, 3))]])
    with pytest.raises(ValueError, match="block column 1 holds only None"):
        BlockOperator([[A, None], [A, None]])


# ------------------------------------------------------------ scipy bridge
@pytest.fixture
def spd_op():
    M = spd(30, seed=1, cond=50.0)
    return Dense(M), M


def test_scipy_cg_minres_gmres(spd_op):
    op, M = spd_op
    b = rand(30, seed=2).numpy()
    expected = np.linalg.solve(M.numpy(), b)
    for solver in (sla.cg, sla.minres, sla.gmres):
        x, info = solver(op.to_scipy(), b, rtol=1e-12, maxiter=1000)
        assert info == 0
        np.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-10)


def test_scipy_lsmr_rectangular():
    M = rand(40, 12, seed=3)
    b = rand(40, seed=4).numpy()
    x = sla.lsmr(Dense(M).to_scipy(), b, atol=1e-14, btol=1e-14)[0]
    expected = np.linalg.lstsq(M.numpy(), b, rcond=None)[0]
    np.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-10)


def test_scipy_eigsh_and_svds(spd_op):
    op, M = spd_op
    vals = sla.eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), np.sort(np.linalg.eigvalsh(M.numpy()))[-3:], rtol=1e-10)
    R = rand(15, 9, seed=5)
    s = sla.svds(Dense(R).to_scipy(), k=2, return_singular_vectors=False)
    np.testing.assert_allclose(np.sort(s), np.linalg.svd(R.numpy(), compute_uv=False)[:2][::-1], rtol=1e-10)


def test_scipy_bridge_on_composed_operator():
    P = Dense(rand(8, 6, seed=6))
    op = P.T @ P + Identity(6, dtype=F64)
    b = rand(6, seed=7).numpy()
    x, info = sla.cg(op.to_scipy(), b, rtol=1e-12)
    np.testing.assert_allclose(op.to_dense().numpy() @ x, b, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------- linear_operator bridge
def test_linear_operator_functions():
    linear_operator = pytest.importorskip("linear_operator")
    M = spd(6, seed=8)
    L = Dense(M).to_linear_operator()
    v = rand(6, seed=9)
    torch.testing.assert_close(L @ v, M @ v)
    torch.testing.assert_close(linear_operator.to_dense(L.mT), M.T)
    torch.testing.assert_close(L.to_dense(), M)
    rhs = rand(6, 2, seed=10)
    torch.testing.assert_close(L.solve(rhs), torch.linalg.solve(M, rhs), rtol=1e-6, atol=1e-8)


def test_public_surface():
    for name in ("LinearOperator", "Dense", "Diag", "Identity", "Zero", "BlockOperator", "aslinearoperator"):
        assert name in otlinop.__all__
        assert hasattr(otlinop, name)
