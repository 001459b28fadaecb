"""The shared operator test battery.

An operator joins it by subclassing ``OperatorBattery`` in a ``Test*`` class
and defining ``make(self)``, returning ``(op, dense)``: the operator and its
dense float64 (or complex128, for a complex operator) equivalent. Every check
runs against ``dense``.

    class TestMyOperator(OperatorBattery):
        def make(self):
            return MyOperator(...), dense_matrix
"""

import pickle

import numpy as np
import pytest
import torch

RTOL = 1e-10
ATOL = 1e-12


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    if isinstance(actual, np.ndarray):
        actual = torch.from_numpy(actual)
    expected = expected.cpu() if actual.device.type == "cpu" else expected
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


class OperatorBattery:
    """Mixin: matvec, matmat, rmatvec, rmatmat, ``@``, ``.H``, ``.T``, to_dense,
    diagonal, adjoint identity, symmetry flags, NumPy operands, pickling and the
    scipy bridge, in float64 (or complex128)."""

    #: whether the operator is expected to offer a cheap diagonal
    has_diagonal = True
    #: whether the operator is expected to offer an adjoint
    has_adjoint = True
    #: whether the operator is expected to survive a pickle round trip
    picklable = True

    def make(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @pytest.fixture
    def case(self):
        op, dense = self.make()
        assert dense.dtype in (torch.float64, torch.complex128), "the battery compares in float64 or complex128"
        return op, dense.to(op.device)

    def _gen(self, op, seed=1234):
        return torch.Generator(device="cpu").manual_seed(seed)

    def _rand(self, op, *shape, seed=1234):
        g = self._gen(op, seed)
        if op.dtype.is_complex:
            real = op.dtype.to_real()
            t = torch.complex(torch.randn(*shape, generator=g, dtype=real), torch.randn(*shape, generator=g, dtype=real))
        else:
            t = torch.randn(*shape, generator=g, dtype=op.dtype)
        return t.to(op.device)

    def test_shape_dtype_device(self, case):
        op, dense = case
        assert tuple(op.shape) == tuple(dense.shape)
        assert op.dtype == dense.dtype
        assert op.ndim == 2 and isinstance(op.args, tuple)

    def test_matvec(self, case):
        op, dense = case
        v = self._rand(op, op.shape[1])
        _close(op.matvec(v), dense @ v)
        _close(op @ v, dense @ v)
        _close(op.dot(v), dense @ v)

    def test_matvec_column(self, case):
        op, dense = case
        v = self._rand(op, op.shape[1], 1)
        out = op.matvec(v)
        assert out.shape == (op.shape[0], 1)
        _close(out, dense @ v)

    def test_matmat(self, case):
        op, dense = case
        V = self._rand(op, op.shape[1], 3)
        _close(op.matmat(V), dense @ V)
        _close(op @ V, dense @ V)

    def test_matmat_single_column_equals_matvec(self, case):
        op, _ = case
        v = self._rand(op, op.shape[1])
        _close(op.matmat(v[:, None])[:, 0], op.matvec(v))

    def test_to_dense(self, case):
        op, dense = case
        _close(op.to_dense(), dense)

    def test_rmatvec_rmatmat(self, case):
        op, dense = case
        if not self.has_adjoint:
            with pytest.raises(NotImplementedError, match="adjoint"):
                op.rmatvec(self._rand(op, op.shape[0]))
            return
        u = self._rand(op, op.shape[0])
        U = self._rand(op, op.shape[0], 2)
        _close(op.rmatvec(u), dense.mH @ u)
        _close(op.rmatmat(U), dense.mH @ U)
        _close(op.H @ u, dense.mH @ u)
        _close(op.T @ u, dense.T @ u)
        _close(u @ op, u @ dense)
        _close(U.T @ op, U.T @ dense)
        _close(op.T.to_dense(), dense.T)
        _close(op.H.to_dense(), dense.mH)
        assert op.T.T.shape == op.shape and op.H.H.shape == op.shape

    def test_adjoint_identity(self, case):
        op, _ = case
        if not self.has_adjoint:
            pytest.skip("this operator declares no adjoint")
        u = self._rand(op, op.shape[0])
        v = self._rand(op, op.shape[1], seed=99)
        lhs = torch.vdot(u, op @ v)
        rhs = torch.vdot(op.H @ u, v)
        scale = float(u.norm() * v.norm() * max(1.0, float(op.to_dense().abs().max())))
        assert abs(complex(lhs - rhs)) <= 1e-12 * scale

    def test_diagonal(self, case):
        op, dense = case
        if not self.has_diagonal:
            with pytest.raises(NotImplementedError, match="diagonal"):
                op.diagonal()
            return
        _close(op.diagonal(), torch.diagonal(dense))

    def test_symmetry_flags(self, case):
        op, dense = case
        if op.is_symmetric:
            _close(dense, dense.mH)
        if op.is_psd:
            evals = torch.linalg.eigvalsh((dense + dense.mH) / 2)
            assert float(evals.min()) >= -1e-10 * max(1.0, float(evals.abs().max()))

    def test_numpy_operands(self, case):
        op, dense = case
        dense = dense.cpu()
        v, V = self._rand(op, op.shape[1]).cpu(), self._rand(op, op.shape[1], 2).cpu()
        for out, expected in ((op @ v.numpy(), dense @ v), (op.matvec(v.numpy()), dense @ v),
                              (op.dot(v.numpy()), dense @ v), (op.matmat(V.numpy()), dense @ V),
                              (op.matvec(v[:, None].numpy()), dense @ v[:, None])):
            assert isinstance(out, np.ndarray) and out.shape == tuple(expected.shape)
            _close(out, expected)
        if self.has_adjoint:
            u = self._rand(op, op.shape[0]).cpu()
            _close(op.rmatvec(u.numpy()), dense.mH @ u)
            _close(u.numpy() @ op, u @ dense)

    def test_complex_numpy_vector_keeps_its_imaginary_part(self, case):
        op, dense = case
        z = self._rand(op, op.shape[1]).cpu().numpy() + 1j * self._rand(op, op.shape[1], seed=7).cpu().numpy()
        out = op @ z
        assert np.iscomplexobj(out)
        _close(out, dense.cpu().to(torch.complex128) @ torch.from_numpy(z))

    def test_pickle_round_trip(self, case):
        op, _ = case
        if not self.picklable:
            pytest.skip("this operator holds objects that do not pickle")
        copy = pickle.loads(pickle.dumps(op))
        assert type(copy) is type(op) and copy.shape == op.shape and copy.dtype == op.dtype
        v = self._rand(op, op.shape[1])
        _close(copy @ v, op @ v)

    def test_scipy_bridge(self, case):
        op, dense = case
        S = op.to_scipy()
        v = self._rand(op, op.shape[1]).cpu().numpy()
        expected = (dense.cpu() @ torch.from_numpy(v)).numpy()
        assert S.shape == tuple(op.shape) and S.args == () and S.operator is op
        torch.testing.assert_close(torch.from_numpy(S @ v), torch.from_numpy(expected), rtol=RTOL, atol=1e-10)
        z = v + 1j * self._rand(op, op.shape[1], seed=5).cpu().numpy()
        torch.testing.assert_close(torch.from_numpy(S @ z), dense.cpu().to(torch.complex128) @ torch.from_numpy(z),
                                   rtol=RTOL, atol=1e-10)
        if self.has_adjoint:
            u = self._rand(op, op.shape[0]).cpu().numpy()
            torch.testing.assert_close(torch.from_numpy(S.rmatvec(u)),
                                       (dense.cpu().mH @ torch.from_numpy(u)), rtol=RTOL, atol=1e-10)

    def test_shape_error_names_argument(self, case):
        op, _ = case
        bad = torch.zeros(op.shape[1] + 1, dtype=op.dtype, device=op.device)
        with pytest.raises(ValueError, match=rf"v has shape \({op.shape[1] + 1},\), expected \({op.shape[1]},\)"):
            op.matvec(bad)
        with pytest.raises(ValueError, match=rf"x has shape \({op.shape[1] + 1},\), expected \({op.shape[1]},\)"):
            op.to_scipy().matvec(np.zeros(op.shape[1] + 1))

    def test_dtype_error(self, case):
        op, _ = case
        bad = torch.zeros(op.shape[1], dtype=torch.float32, device=op.device)
        with pytest.raises(TypeError, match=f"dtype torch.float32, expected {op.dtype}"):
            op @ bad
