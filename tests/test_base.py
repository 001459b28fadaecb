"""The operator algebra, concrete operators and interop, through the shared battery."""

import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch

import otlinop
from otlinop import BlockOperator, Dense, Diag, Identity, LinearOperator, Zero, aslinearoperator

from operator_battery import OperatorBattery

F64 = torch.float64
C128 = torch.complex128


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def crand(*shape, seed=0):
    return torch.complex(rand(*shape, seed=seed), rand(*shape, seed=seed + 1000))


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


# ------------------------------------------------- complex and mixed dtypes
class TestComplexDenseSquare(OperatorBattery):
    def make(self):
        M = crand(5, 5)
        return Dense(M), M


class TestComplexDenseRect(OperatorBattery):
    def make(self):
        M = crand(4, 6, seed=1)
        return Dense(M), M


class TestHermitianDense(OperatorBattery):
    def make(self):
        X = crand(5, 5, seed=2)
        M = X @ X.mH + torch.eye(5, dtype=C128)
        op = Dense(M)
        assert op.is_symmetric and not op.is_psd and op.H is op
        return op, M


class TestComplexDiag(OperatorBattery):
    def make(self):
        d = crand(6, seed=3)
        op = Diag(d)
        assert not op.is_symmetric and op.T is op
        return op, torch.diag(d)


class TestRealDiagInComplexSum(OperatorBattery):
    def make(self):
        d, M = rand(4, seed=4).abs(), crand(4, 4, seed=5)
        return Diag(d) + Dense(M), torch.diag(d).to(C128) + M


class TestComplexScaleOfRealOperator(OperatorBattery):
    def make(self):
        A = rand(3, 5, seed=6)
        op = (1 - 2j) * Dense(A)
        assert op.dtype == C128
        return op, (1 - 2j) * A.to(C128)


class TestComplexTensorScale(OperatorBattery):
    def make(self):
        A, c = crand(4, 4, seed=7), torch.tensor(0.5 + 1.5j, dtype=C128)
        return c * Dense(A), c * A


class TestComplexProduct(OperatorBattery):
    has_diagonal = False

    def make(self):
        A, B = crand(4, 5, seed=8), rand(5, 3, seed=9)
        return Dense(A) @ Dense(B), A @ B.to(C128)


class TestComplexCongruence(OperatorBattery):
    has_diagonal = False

    def make(self):
        X, w = Dense(crand(5, 3, seed=10)), rand(5, seed=11).abs()
        op = X.H @ Diag(w) @ X
        assert op.is_symmetric and op.is_psd
        return op, X.M.mH @ torch.diag(w).to(C128) @ X.M


class TestComplexPower(OperatorBattery):
    has_diagonal = False

    def make(self):
        A = crand(4, 4, seed=12) / 2
        return Dense(A) ** 3, torch.linalg.matrix_power(A, 3)


class TestComplexTranspose(OperatorBattery):
    def make(self):
        A = crand(3, 5, seed=13)
        return Dense(A).T, A.T


class TestComplexAdjoint(OperatorBattery):
    def make(self):
        A = crand(3, 5, seed=14)
        return Dense(A).H, A.mH


class TestTransposeOfComplexSum(OperatorBattery):
    def make(self):
        A, d = crand(4, 4, seed=15), crand(4, seed=16)
        return (Dense(A) - 1j * Diag(d)).T, (A - 1j * torch.diag(d)).T


class TestComplexBlock(OperatorBattery):
    def make(self):
        d, X = rand(3, seed=17).abs(), Dense(crand(3, 4, seed=18))
        op = BlockOperator([[Diag(d), X], [X.H, Identity(4)]])
        assert op.is_symmetric and op.dtype == C128
        dense = torch.zeros(7, 7, dtype=C128)
        dense[:3, :3], dense[:3, 3:], dense[3:, :3], dense[3:, 3:] = torch.diag(d), X.M, X.M.mH, torch.eye(4)
        return op, dense


class TestComplexNumpy(OperatorBattery):
    def make(self):
        M = crand(4, 3, seed=19)
        return aslinearoperator(M.numpy()), M


class TestComplexScipySparse(OperatorBattery):
    def make(self):
        M = sp.random(5, 4, density=0.6, random_state=4, format="csr")
        M = M + 1j * sp.random(5, 4, density=0.6, random_state=5, format="csr")
        return aslinearoperator(M), torch.from_numpy(M.toarray())


class TestComplexScipyLinearOperator(OperatorBattery):
    has_diagonal = False

    def make(self):
        M = crand(4, 5, seed=20).numpy()
        return aslinearoperator(sla.aslinearoperator(M)), torch.from_numpy(M)


class TestComplexSparseCOO(OperatorBattery):
    def make(self):
        M = crand(5, 5, seed=21) * (rand(5, 5, seed=22) > 0.3)
        return aslinearoperator(M.to_sparse_coo()), M


class TestShiftByAdaptingIdentity(OperatorBattery):
    def make(self):
        M = rand(6, 6, seed=23)
        op = Dense(M) + Identity(6) - 0.5 * Zero(6)
        assert op.dtype == F64
        return op, M + torch.eye(6, dtype=F64)


class TestDiagWidenedExactly(OperatorBattery):
    def make(self):
        M, d = rand(4, 4, seed=24), rand(4, seed=25).float()
        op = Dense(M) + Diag(d)
        assert op.dtype == F64
        return op, M + torch.diag(d.double())


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


def test_scipy_operator_products_come_back_as_columns():
    """scipy 1.18 returns (n, k, 1) from a LinearOperator whose matvec is written for its batches
    (``A @ x[..., None]``, as its own test_precond_inverse does): otlinop takes it as (n, k)."""
    import scipy.sparse.linalg as sla
    M = np.arange(12.0).reshape(4, 3)

    class Batched(sla.LinearOperator):
        def __init__(self):
            super().__init__(np.dtype(np.float64), M.shape)

        def _matmat(self, X):
            return (M @ X)[..., None]

        def _rmatmat(self, X):
            return (M.T @ X)[..., None]

    A = aslinearoperator(Batched())
    v, V, u = torch.arange(3.0, dtype=F64), torch.ones(3, 2, dtype=F64), torch.ones(4, dtype=F64)
    torch.testing.assert_close(A @ v, torch.as_tensor(M) @ v)
    torch.testing.assert_close(A @ V, torch.as_tensor(M) @ V)
    torch.testing.assert_close(A.T @ u, torch.as_tensor(M).T @ u)


def test_aslinearoperator_refuses_a_batch_of_scipy_operators():
    """scipy >= 1.18 has batched LinearOperators (shape (..., n, m)): refused with scipy's own words,
    "expected 2-D" (its solvers' tests check them), not taken for an (n, m) operator."""
    import scipy.sparse.linalg as sla

    class Batched(sla.LinearOperator):  # built by hand: scipy < 1.18 refuses such a shape itself
        def __init__(self):
            self.shape, self.dtype = (2, 2, 2), np.dtype(np.float64)

        def _matvec(self, x):
            return x

    with pytest.raises(ValueError, match=r"expected 2-D Batched, got shape \(2, 2, 2\)"):
        aslinearoperator(Batched())


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


# ------------------------------------------------ dtypes: promotion, adaptation
@pytest.mark.parametrize("left, right, expected", [
    (torch.float32, torch.float64, torch.float64),
    (torch.float32, torch.complex64, torch.complex64),
    (torch.float64, torch.complex64, torch.complex128),
    (torch.bfloat16, torch.float16, torch.float32),
    (torch.complex64, torch.complex128, torch.complex128),
])
def test_algebra_promotes_dtypes_as_torch(left, right, expected):
    A, B = Dense(rand(3, 3).to(left)), Dense(rand(3, 3, seed=1).to(right))
    for op in (A + B, B - A, A @ B, BlockOperator([[A, B]])):
        assert op.dtype == expected
    v = rand(3, seed=2).to(expected)
    wide = torch.complex128 if expected.is_complex else F64
    half = torch.float16 in (left, right) or torch.bfloat16 in (left, right)
    torch.testing.assert_close(((A + B) @ v).to(wide), (A.M.to(wide) + B.M.to(wide)) @ v.to(wide),
                               rtol=3e-2 if half else 1e-5, atol=3e-2 if half else 1e-5)


def test_a_narrower_operand_computes_in_its_own_dtype():
    M32, M64 = rand(4, 4).float(), rand(4, 4, seed=1)
    op = Dense(M32) + Dense(M64)
    v = rand(4, seed=2)
    expected = (M32 @ v.float()).double() + M64 @ v
    torch.testing.assert_close(op @ v, expected, rtol=0, atol=0)


def test_scaling_by_a_complex_scalar_promotes():
    A = Dense(rand(3, 3).float())
    assert (2j * A).dtype == torch.complex64 and (A * 2j).dtype == torch.complex64
    assert (A / 2j).dtype == torch.complex64
    assert (Dense(rand(2, 2)) * np.complex64(1j)).dtype == C128
    assert (A * torch.tensor(2.0, dtype=F64)).dtype == torch.float32     # a 0-d tensor is a scalar, as in torch
    assert (Dense(rand(2, 2).half()) * 1j).dtype == torch.complex64      # no complex32 operators


def test_identity_and_zero_adapt_their_dtype_and_device():
    I = Identity(3)
    assert I.adapts_dtype and I.adapts_device and I.dtype == torch.get_default_dtype()
    for dtype in (torch.float32, F64, C128):
        v = torch.ones(3, dtype=dtype)
        assert (I @ v) is v and (Zero(3) @ v).dtype == dtype
    assert (Dense(rand(3, 3)) + I).dtype == F64
    assert (Dense(crand(3, 3)) - 2 * I).dtype == C128
    assert (Dense(rand(3, 3)) + 2j * I).dtype == C128                 # an adapting complex operand stays complex
    assert (Dense(rand(3, 3)) @ (I + Zero(3))).dtype == F64
    shifted = Dense(rand(3, 3)) - torch.tensor(0.5, dtype=F64) * I
    torch.testing.assert_close(shifted.to_dense(), rand(3, 3) - 0.5 * torch.eye(3, dtype=F64), rtol=0, atol=0)
    assert not shifted.adapts_dtype and I.T is I and repr(I).startswith("<Identity 3x3 torch.float32 (adapts)")


def test_an_explicit_dtype_stays():
    I = Identity(3, dtype=torch.float32)
    assert not I.adapts_dtype and I.adapts_device
    with pytest.raises(TypeError, match="v has dtype torch.float64, expected torch.float32"):
        I @ torch.ones(3, dtype=F64)
    assert (Dense(rand(3, 3)) + I).dtype == F64     # promoted, and the identity is widened exactly
    assert Zero((2, 3), dtype=F64).T.shape == (3, 2)


# ----------------------------------------------------------- complex algebra
def test_adjoint_conjugates_and_transpose_does_not():
    M = crand(3, 4)
    A = Dense(M)
    u = crand(3, seed=1)
    torch.testing.assert_close(A.H @ u, M.mH @ u)
    torch.testing.assert_close(A.rmatvec(u), M.mH @ u)
    torch.testing.assert_close(A.T @ u, M.T @ u)
    torch.testing.assert_close(A.transpose() @ u, M.T @ u)
    assert A.T.T is A and A.H.H is A and A.T is A.T and A.H is A.adjoint()
    B = 1j * Dense(rand(3, 3))
    torch.testing.assert_close(B.T.to_dense(), 1j * rand(3, 3).T.to(C128))
    torch.testing.assert_close(B.H.to_dense(), -1j * rand(3, 3).T.to(C128))
    R = Dense(rand(3, 4))
    assert R.T is R.H          # real: one operator


def test_hermitian_flags():
    X = crand(4, 4)
    H = Dense(X + X.mH)
    assert H.is_symmetric and not Dense(X).is_symmetric
    assert (2 * H).is_symmetric and not (2j * H).is_symmetric
    assert Diag(torch.tensor([1 + 0j, 2 + 0j])).is_psd
    assert Diag(torch.tensor([1 + 0j, -2 + 0j])).is_symmetric and not Diag(torch.tensor([1 + 0j, -2 + 0j])).is_psd
    assert not Diag(torch.tensor([1 + 1j, 2 + 0j])).is_symmetric
    assert repr(H).endswith("hermitian>")


def test_complex_autograd_flows_to_the_data():
    M = crand(3, 3).requires_grad_()
    v = crand(3, seed=1)
    (((1 - 1j) * Dense(M)).H @ v).abs().pow(2).sum().backward()
    M2 = M.detach().clone().requires_grad_()
    ((1 + 1j) * M2.mH @ v).abs().pow(2).sum().backward()
    torch.testing.assert_close(M.grad, M2.grad)
    W = rand(3, 3).requires_grad_()
    ((2j * Dense(W)) @ v).abs().pow(2).sum().backward()     # through the real operand's cast
    W2 = W.detach().clone().requires_grad_()
    ((2j * W2.to(C128)) @ v).abs().pow(2).sum().backward()
    torch.testing.assert_close(W.grad, W2.grad)


def test_ot_operators_refuse_complex():
    from otlinop.plan import PlanOperator
    from otlinop.truncated import TruncatedPlanOperator
    x = torch.randn(4, 2, dtype=C128)
    with pytest.raises(TypeError, match="x has dtype torch.complex128, but points, plans and their Hessians are real"):
        PlanOperator(x, x, torch.zeros(4), torch.zeros(4), eps=1.0)
    with pytest.raises(TypeError, match="TruncatedPlanOperator is a real operator"):
        TruncatedPlanOperator(torch.zeros(2, 3, dtype=C128), torch.zeros(2, 3, dtype=torch.int32),
                              torch.zeros(3, dtype=torch.int32), (3, 3), tol=1e-8)


# ------------------------------------------------------------ NumPy operands
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_operands_follow_scipy():
    M = rand(2, 3)
    A = Dense(M)
    x = np.array([1, 2, 3])
    for out in (A @ x, A.matvec(x), A.dot(x), A @ [1, 2, 3], A.matvec(x.tolist())):
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
        np.testing.assert_allclose(out, M.numpy() @ x)
    assert A.matvec(x[:, None]).shape == (2, 1) and A.matvec(np.matrix(x).T).shape == (2, 1)
    np.testing.assert_allclose(np.ones(2) @ A, np.ones(2) @ M.numpy())
    np.testing.assert_allclose(np.ones((4, 2)) @ A, np.ones((4, 2)) @ M.numpy())
    np.testing.assert_allclose(A.rmatmat(np.eye(2)), M.numpy().T)
    z = np.array([1, 1j, 0])
    out = A @ z
    assert out.dtype == np.complex128
    np.testing.assert_allclose(out, M.numpy() @ z)
    assert (Dense(rand(2, 2).float()) @ np.ones(2)).dtype == np.float32       # the operator's precision
    assert (Identity(2) @ np.ones(2, dtype=np.float32)).dtype == np.float32    # an adapting one takes x's
    assert (Identity(2) @ np.array([1, 2])).dtype == np.float64
    assert A.ndim == 2


def test_torch_columns():
    A = Dense(rand(2, 3))
    v = rand(3, 1, seed=1)
    assert A.matvec(v).shape == (2, 1) and A.rmatvec(rand(2, 1)).shape == (3, 1)
    with pytest.raises(ValueError, match=r"v must be 1-D \(m,\) or a column \(m, 1\), got shape \(3, 2\); "
                                         "use matmat"):
        A.matvec(rand(3, 2))


def test_errors_follow_scipy():
    A = Dense(rand(2, 3))
    with pytest.raises(ValueError, match="Dense @ c: Scalar operands are not allowed, use '\\*' instead"):
        A @ 2
    with pytest.raises(ValueError, match="c @ Dense: Scalar operands are not allowed"):
        2 @ A
    with pytest.raises(ValueError, match="Can only divide a linear operator by a scalar. c is ndarray of shape"):
        A / np.array([1, 2])
    with pytest.raises(ValueError, match="Can only divide a linear operator by a scalar. c is Tensor"):
        A / torch.ones(2)
    with pytest.raises(TypeError, match="'\\*' takes a scalar, got ndarray; use '@'"):
        A * np.ones(3)
    with pytest.raises(TypeError, match="'\\*' takes a scalar, got Dense; use '@'"):
        A * A
    with pytest.raises(TypeError, match="Dense @ B: Unable to multiply a LinearOperator with a sparse matrix"):
        A @ sp.eye(3, format="csr")
    with pytest.raises(TypeError, match="B @ Dense: Unable to multiply a LinearOperator with a sparse matrix"):
        sp.eye(2, format="csr") @ A
    with pytest.raises(ValueError, match=r"v has shape \(4,\), expected \(3,\)"):
        A @ np.ones(4)
    with pytest.raises(ValueError, match=r"U.T has shape \(3, 4\), expected \(2, k\)"):
        np.ones((4, 3)) @ A
    with pytest.raises(TypeError, match="v must be a torch.Tensor or a NumPy array of numbers, got str"):
        A.matvec("abc")
    with pytest.raises(TypeError):
        np.add(np.ones((2, 3)), A)          # NumPy defers instead of broadcasting an object array


def test_args_and_scipy_style_scaling():
    A, B = Dense(rand(3, 3)), Dense(rand(3, 3, seed=1))
    assert (A + B).args == (A, B) and (A @ B).args == (A, B) and (2 * A).args == (A, 2)
    assert (A ** 3).args == (A, 3) and A.args == () and A.H.args in ((), (A,))
    assert ((A * 3) / 3).args[0] is A        # a scaled operator scaled again keeps one factor
    assert (-(-A)).args == (A, 1.0)
    c = torch.tensor(2.0, dtype=F64, requires_grad=True)
    ((c * (3 * A)) @ rand(3, seed=2)).sum().backward()
    assert c.grad is not None


def test_operators_pickle():
    ops = [Dense(rand(3, 3)) + Identity(3), 2j * Dense(crand(3, 2)).T, Diag(rand(3)) @ Dense(rand(3, 3)) ** 2,
           BlockOperator([[Dense(rand(2, 2)), None], [None, Identity(1)]])]
    for op in ops:
        copy = pickle.loads(pickle.dumps(op))
        v = torch.ones(op.shape[1], dtype=op.dtype)
        torch.testing.assert_close(copy @ v, op @ v)


# ------------------------------------------------------------ scipy bridge
def test_to_scipy_view_is_picklable_and_keeps_complex_vectors():
    A = Dense(rand(3, 3))
    S = A.to_scipy()
    assert S.args == () and S.operator is A and S.dtype == np.float64
    z = np.array([1, 2j, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no ComplexWarning: nothing is dropped
        out = S @ z
    np.testing.assert_allclose(out, A.M.numpy() @ z)
    S2 = pickle.loads(pickle.dumps(S))
    np.testing.assert_allclose(S2 @ z, out)
    assert aslinearoperator(S) is A
    assert Dense(crand(2, 2)).to_scipy().dtype == np.complex128
    assert Dense(rand(2, 2).bfloat16()).to_scipy().dtype == np.float32
    np.testing.assert_allclose((A.to_scipy().T @ z), A.M.numpy().T @ z)
    np.testing.assert_allclose(((1j * A).to_scipy().H @ z), (1j * A.M.numpy()).conj().T @ z)


def test_to_scipy_names_a_wrong_length():
    S = Dense(rand(2, 3)).to_scipy()
    with pytest.raises(ValueError, match=r"Dense.to_scipy\(\).matvec: x has shape \(2,\), expected \(3,\) "
                                         r"\(the operator has shape \(2, 3\), 3 columns\); did you mean A.T @ x"):
        S.matvec(np.ones(2))
    with pytest.raises(ValueError, match=r"rmatvec: x has shape \(3,\), expected \(2,\)"):
        S.rmatvec(np.ones(3))
    with pytest.raises(ValueError, match=r"matmat: x has shape \(2, 2\), expected \(3, k\)"):
        S.matmat(np.ones((2, 2)))


def test_scipy_aslinearoperator_cannot_read_a_torch_dtype():
    """scipy.sparse.linalg.aslinearoperator(op) passes op.dtype (a torch dtype) to
    np.dtype, which refuses it; to_scipy() is the door (docs/operators.md)."""
    with pytest.raises(TypeError, match="Cannot interpret 'torch.float64' as a data type"):
        sla.aslinearoperator(Dense(rand(2, 2)))


def test_scipy_solvers_on_complex_operators():
    X = crand(20, 20, seed=3)
    H = X @ X.mH + 20 * torch.eye(20, dtype=C128)
    b = crand(20, seed=4).numpy()
    expected = np.linalg.solve(H.numpy(), b)
    for solver in (sla.cg, sla.gmres, sla.bicgstab):   # scipy's minres is real-only (its inner product does not conjugate)
        x, info = solver(Dense(H).to_scipy(), b, rtol=1e-12, maxiter=500)
        assert info == 0
        np.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-10)
    R = crand(30, 8, seed=5)
    rhs = crand(30, seed=6).numpy()
    x = sla.lsmr(Dense(R).to_scipy(), rhs, atol=1e-14, btol=1e-14)[0]
    np.testing.assert_allclose(x, np.linalg.lstsq(R.numpy(), rhs, rcond=None)[0], rtol=1e-8, atol=1e-10)


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
