"""linear_operator's own test cases on ``A.to_linear_operator()``.

linear_operator ships ``LinearOperatorTestCase`` (square, symmetric positive
definite operators) and ``RectangularLinearOperatorTestCase`` in
``linear_operator.test.linear_operator_test_case``. Each class below
subclasses one of them with ``create_linear_op()`` returning the bridge of an
otlinop operator and ``evaluate_linear_op()`` the dense matrix, computed with
torch from the bridge's representation tensors (so the gradient checks of the
shipped tests compare the bridge's gradients with dense autograd).

The shipped tests draw their random tensors in torch's default dtype: every
test runs with float64 as the default, the operators' dtype.

Every exclusion is in ``EXCLUDED`` (test pattern -> reason), the one place.
"""

from __future__ import annotations

import fnmatch
import unittest

import pytest
import torch

from otlinop import BlockOperator, Dense, Diag
from otlinop.hessian import HessianOperator

import _hessian_reference as ref

pytest.importorskip("linear_operator")
try:
    from linear_operator.test.linear_operator_test_case import (LinearOperatorTestCase,
                                                                 RectangularLinearOperatorTestCase)
except ImportError as err:  # a linear_operator release without its test cases must not pass silently
    raise ImportError("tests/test_linear_operator_suite.py runs the test cases that linear_operator ships in "
                      "linear_operator.test.linear_operator_test_case (LinearOperatorTestCase, "
                      f"RectangularLinearOperatorTestCase); this installation has none: {err}") from err

F64 = torch.float64

# linear_operator's interpolation (behind slice indexing) builds sparse tensors without invariant checks.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning")

#: ``Class.test_name`` pattern (fnmatch) -> why the shipped test is not run.
EXCLUDED: dict[str, str] = {}


def _excluding(cls):
    """Replace the excluded tests of ``cls`` by skips that give the reason."""
    for name in dir(cls):
        if not name.startswith("test"):
            continue
        for pattern, reason in EXCLUDED.items():
            if fnmatch.fnmatchcase(f"{cls.__name__}.{name}", pattern):
                setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
                break
    return cls


def _rand(*shape, seed):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _spd(n, seed):
    Q, _ = torch.linalg.qr(_rand(n, n, seed=seed))
    return (Q * torch.linspace(1.0, 10.0, n, dtype=F64)) @ Q.T


class _Bridge:
    """Runs each shipped test with float64 as torch's default dtype."""

    seed = 0

    def setUp(self):
        self._default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(F64)
        super().setUp()

    def tearDown(self):
        super().tearDown()
        torch.set_default_dtype(self._default_dtype)

    @staticmethod
    def tensors(linear_op):
        """The bridge's representation without its dtype anchor: the otlinop operator's tensors."""
        return linear_op.representation()[1:]


@_excluding
class TestDenseRectangular(_Bridge, RectangularLinearOperatorTestCase, unittest.TestCase):
    def create_linear_op(self):
        return Dense(_rand(7, 5, seed=1)).to_linear_operator()

    def evaluate_linear_op(self, linear_op):
        (M,) = self.tensors(linear_op)
        return M


@_excluding
class TestProductRectangular(_Bridge, RectangularLinearOperatorTestCase, unittest.TestCase):
    def create_linear_op(self):
        return (Dense(_rand(6, 5, seed=2)) @ Diag(_rand(5, seed=3).exp())).to_linear_operator()

    def evaluate_linear_op(self, linear_op):
        M, d = self.tensors(linear_op)
        return M * d


@_excluding
class TestDenseSPD(_Bridge, LinearOperatorTestCase, unittest.TestCase):
    def create_linear_op(self):
        return Dense(_spd(8, seed=4), is_psd=True).to_linear_operator()

    def evaluate_linear_op(self, linear_op):
        (M,) = self.tensors(linear_op)
        return M


@_excluding
class TestDiag(_Bridge, LinearOperatorTestCase, unittest.TestCase):
    def create_linear_op(self):
        return Diag(torch.linspace(0.5, 3.0, 8, dtype=F64)).to_linear_operator()

    def evaluate_linear_op(self, linear_op):
        (d,) = self.tensors(linear_op)
        return torch.diag(d)


@_excluding
class TestSum(_Bridge, LinearOperatorTestCase, unittest.TestCase):
    """``X.T @ X + Diag(d)``: no cheap diagonal, so ``torch.diagonal`` takes the generic one."""

    def create_linear_op(self):
        X = Dense(_rand(10, 8, seed=5))
        return (X.T @ X + Diag(torch.linspace(0.5, 2.0, 8, dtype=F64))).to_linear_operator()

    def evaluate_linear_op(self, linear_op):
        X, d = self.tensors(linear_op)
        return X.T @ X + torch.diag(d)


@_excluding
class TestProduct(_Bridge, LinearOperatorTestCase, unittest.TestCase):
    """``X.T @ Diag(d) @ X``, a congruence (symmetric positive definite)."""

    def create_linear_op(self):
        X = Dense(_rand(10, 8, seed=6))
        return (X.T @ Diag(torch.linspace(0.5, 2.0, 10, dtype=F64)) @ X).to_linear_operator()

    def evaluate_linear_op(self, linear_op):
        X, d = self.tensors(linear_op)
        return X.T @ (d[:, None] * X)


@_excluding
class TestBlock(_Bridge, LinearOperatorTestCase, unittest.TestCase):
    """``[[A, B], [B.T, C]]`` with A, C symmetric positive definite and B small: positive definite,
    represented by its blocks' tensors."""

    def create_linear_op(self):
        B = Dense(0.3 * _rand(5, 3, seed=8))
        return BlockOperator([[Dense(_spd(5, seed=9), is_psd=True), B],
                              [B.T, Diag(torch.linspace(2.0, 4.0, 3, dtype=F64))]]).to_linear_operator()

    def evaluate_linear_op(self, linear_op):
        A, B, c = self.tensors(linear_op)
        return torch.cat([torch.cat([A, B], 1), torch.cat([B.T, torch.diag(c)], 1)])


_HESSIAN = dict(n=14, m=12, eps=0.5, reach_x=1.0, reach_y=1.0, seed=7)
#: Total mass of each measure: the Hessian scales with it; 6 puts its spectrum in about [0.9, 3.8], where
#: the shipped absolute tolerances (atol=1e-5 on solves by CG to a relative 1e-4) suit it.
_MASS = 6.0


@_excluding
class TestHessian(_Bridge, LinearOperatorTestCase, unittest.TestCase):
    """The Schur complement of the dual Hessian of a small unbalanced problem.

    Relaxed marginals (``reach = 1``) make it positive definite without a
    ridge (condition number about 4); its representation is ``(x, y, f, g,
    a, b)``, so the shipped gradient checks compare the plan's streaming
    gradients with dense autograd on ``_hessian_reference.schur``.
    """

    def create_linear_op(self):
        p = ref.problem(**_HESSIAN)
        return HessianOperator(p.x, p.y, p.f, p.g, eps=p.eps, a=_MASS * p.a, b=_MASS * p.b, cost_scale=p.c,
                               reach_x=p.reach_x, reach_y=p.reach_y, ridge=0.0).to_linear_operator()

    def evaluate_linear_op(self, linear_op):
        p = ref.problem(**_HESSIAN)
        x, y, f, g, a, b = self.tensors(linear_op)
        return ref.schur(x, y, f, g, a, b, p.eps, p.c, p.reach_x, p.reach_y)
