"""The shared operator test battery.

An operator joins it by subclassing ``OperatorBattery`` in a ``Test*`` class
and defining ``make(self)``, returning ``(op, dense)``: the operator and its
dense float64 equivalent. Every check runs against ``dense``.

    class TestMyOperator(OperatorBattery):
        def make(self):
            return MyOperator(...), dense_matrix
"""

import pytest
import torch

RTOL = 1e-10
ATOL = 1e-12


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


class OperatorBattery:
    """Mixin: matvec, matmat, rmatvec, rmatmat, ``@``, to_dense, diagonal,
    adjoint identity, symmetry flags and the scipy bridge, in float64."""

    #: whether the operator is expected to offer a cheap diagonal
    has_diagonal = True
    #: whether the operator is expected to offer an adjoint
    has_adjoint = True

    def make(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @pytest.fixture
    def case(self):
        op, dense = self.make()
        assert dense.dtype == torch.float64, "the battery compares against float64"
        return op, dense.to(op.device)

    def _gen(self, op):
        return torch.Generator(device="cpu").manual_seed(1234)

    def _rand(self, op, *shape):
        return torch.randn(*shape, generator=self._gen(op), dtype=op.dtype).to(op.device)

    def test_shape_dtype_device(self, case):
        op, dense = case
        assert tuple(op.shape) == tuple(dense.shape)
        assert op.dtype == torch.float64

    def test_matvec(self, case):
        op, dense = case
        v = self._rand(op, op.shape[1])
        _close(op.matvec(v), dense @ v)
        _close(op @ v, dense @ v)

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
        _close(op.rmatvec(u), dense.T @ u)
        _close(op.rmatmat(U), dense.T @ U)
        _close(op.T @ u, dense.T @ u)
        _close(u @ op, u @ dense)
        _close(op.T.to_dense(), dense.T)
        assert op.T.T.shape == op.shape

    def test_adjoint_identity(self, case):
        op, _ = case
        if not self.has_adjoint:
            pytest.skip("this operator declares no adjoint")
        u = self._rand(op, op.shape[0])
        v = torch.randn(op.shape[1], dtype=op.dtype, generator=torch.Generator().manual_seed(99)).to(op.device)
        lhs = torch.dot(u, op @ v)
        rhs = torch.dot(op.T @ u, v)
        scale = float(u.norm() * v.norm() * max(1.0, float(op.to_dense().abs().max())))
        assert abs(float(lhs - rhs)) <= 1e-12 * scale

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
            _close(dense, dense.T)
        if op.is_psd:
            evals = torch.linalg.eigvalsh((dense + dense.T) / 2)
            assert float(evals.min()) >= -1e-10 * max(1.0, float(evals.abs().max()))

    def test_scipy_bridge(self, case):
        op, dense = case
        S = op.to_scipy()
        v = self._rand(op, op.shape[1]).cpu().numpy()
        expected = (dense.cpu() @ torch.from_numpy(v)).numpy()
        assert S.shape == tuple(op.shape)
        torch.testing.assert_close(torch.from_numpy(S @ v), torch.from_numpy(expected), rtol=RTOL, atol=1e-10)
        if self.has_adjoint:
            u = self._rand(op, op.shape[0]).cpu().numpy()
            torch.testing.assert_close(torch.from_numpy(S.rmatvec(u)),
                                       (dense.cpu().T @ torch.from_numpy(u)), rtol=RTOL, atol=1e-10)

    def test_shape_error_names_argument(self, case):
        op, _ = case
        bad = torch.zeros(op.shape[1] + 1, dtype=op.dtype, device=op.device)
        with pytest.raises(ValueError, match=rf"v has shape \({op.shape[1] + 1},\), expected \({op.shape[1]},\)"):
            op.matvec(bad)

    def test_dtype_error(self, case):
        op, _ = case
        bad = torch.zeros(op.shape[1], dtype=torch.float32, device=op.device)
        with pytest.raises(TypeError, match="dtype torch.float32, expected torch.float64"):
            op @ bad
