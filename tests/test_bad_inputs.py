"""Bad inputs that each get a clear error (issue 19, item 6: unchecked operator
contracts): the message names the function or class, the argument, what was
expected and what came."""

import os

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import otlinop  # noqa: E402
from otlinop import Dense, Identity, LinearOperator, Zero  # noqa: E402
from otlinop.plan import PlanOperator  # noqa: E402
from otlinop.sinkhorn import sinkhorn  # noqa: E402

F64 = torch.float64


def _clouds(n=6, m=5, d=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=F64, generator=gen), torch.randn(m, d, dtype=F64, generator=gen)


def _plan():
    x, y = _clouds()
    return PlanOperator(x, y, torch.zeros(6, dtype=F64), torch.zeros(5, dtype=F64), eps=1.0)


# ------------------------------------------------------------------ scaling
@pytest.mark.parametrize("c", [math.nan, math.inf, -math.inf, complex(1.0, math.nan), np.float64(np.nan),
                               torch.tensor(math.nan, dtype=F64), torch.tensor(math.inf)])
def test_scaling_by_a_non_finite_factor_is_refused(c):
    P = _plan()
    with pytest.raises(ValueError, match=r"PlanOperator \* c: c .*(nan|inf|NaN).*finite"):
        P * c
    with pytest.raises(ValueError, match=r"PlanOperator \* c: .*finite"):
        c * P


@pytest.mark.parametrize("c", [math.nan, math.inf, torch.tensor(math.inf, dtype=F64)])
def test_dividing_by_a_non_finite_number_is_refused(c):
    # A / inf would silently be the zero operator, A / nan NaN everywhere.
    with pytest.raises(ValueError, match=r"PlanOperator / c: .*finite"):
        _plan() / c


def test_finite_scaling_still_works():
    P = _plan()
    v = torch.randn(5, dtype=F64)
    torch.testing.assert_close((2.5 * P) @ v, 2.5 * (P @ v))
    torch.testing.assert_close((P / torch.tensor(4.0, dtype=F64)) @ v, (P @ v) / 4)


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize("n", [2.5, 2.0, "3", True, None])
def test_identity_refuses_a_non_integer_size(n):
    with pytest.raises(TypeError, match=r"Identity: n must be a non-negative integer, got"):
        Identity(n)


def test_identity_refuses_a_negative_size_and_takes_integer_types():
    with pytest.raises(ValueError, match=r"Identity: n must be a non-negative integer, got -1"):
        Identity(-1)
    assert Identity(np.int64(3)).shape == (3, 3)
    assert Identity(torch.tensor(4)).shape == (4, 4)


def test_zero_and_user_operators_refuse_non_integer_shapes():
    with pytest.raises(TypeError, match=r"Zero: shape must be a non-negative integer, got float 2.5"):
        Zero(2.5)
    with pytest.raises(ValueError, match=r"Zero: shape must be a pair of ints, got \(2, 3.5\) \(float 3.5 is not"):
        Zero((2, 3.5))

    class Op(LinearOperator):
        def __init__(self, shape):
            super().__init__(shape, F64, "cpu")

        def _matvec(self, v):
            return v[:self.shape[0]]

    with pytest.raises(ValueError, match=r"Op: shape must be a pair of ints, got \(3.7, 2\)"):
        Op((3.7, 2))
    assert Op((np.int64(2), torch.tensor(2))).shape == (2, 2)


# ------------------------------------------------------------------ a user operator's wrong output
class _WrongShape(LinearOperator):
    """Declares (3, 2) but its matvec returns 2 entries (and its adjoint 4)."""

    def __init__(self):
        super().__init__((3, 2), F64, "cpu")

    def _matvec(self, v):
        return torch.cat([v, v])[:2]

    def _rmatvec(self, u):
        return torch.cat([u, u])[:4]


class _WrongDtype(LinearOperator):
    def __init__(self):
        super().__init__((2, 2), F64, "cpu")

    def _matvec(self, v):
        return v.float()


class _NotATensor(LinearOperator):
    def __init__(self):
        super().__init__((2, 2), F64, "cpu")

    def _matvec(self, v):
        return v.tolist()


def test_a_wrong_output_shape_names_the_class_and_the_hook():
    A, v, V = _WrongShape(), torch.ones(2, dtype=F64), torch.ones(2, 4, dtype=F64)
    expected = r"_WrongShape._matvec returned shape \(2,\), expected \(3,\) \(the operator has shape \(3, 2\)\)"
    with pytest.raises(ValueError, match=expected):
        A @ v
    with pytest.raises(ValueError, match=expected):
        A.matvec(v)
    with pytest.raises(ValueError, match=r"_WrongShape._matvec \(through the default _matmat\) returned shape "
                                         r"\(2, 4\), expected \(3, 4\)"):
        A @ V
    with pytest.raises(ValueError, match=r"_WrongShape._rmatvec returned shape \(4,\), expected \(2,\)"):
        A.rmatvec(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"_WrongShape._rmatvec \(through the default _rmatmat\) returned shape"):
        A.rmatmat(torch.ones(3, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"_WrongShape.transpose\(\)._matvec returned shape \(4,\), expected "
                                         r"\(2,\)"):
        torch.ones(3, dtype=F64) @ A


def test_a_wrong_output_dtype_or_type_names_the_class_and_the_hook():
    with pytest.raises(TypeError, match=r"_WrongDtype._matvec returned dtype torch.float32, expected torch.float64"):
        _WrongDtype() @ torch.ones(2, dtype=F64)
    with pytest.raises(TypeError, match=r"_NotATensor._matvec returned list .*expected a torch.Tensor of shape "
                                        r"\(2,\)"):
        _NotATensor() @ torch.ones(2, dtype=F64)


# ------------------------------------------------------------------ sinkhorn
def test_sinkhorn_warns_that_its_results_are_not_differentiable():
    x, y = _clouds()
    with pytest.warns(UserWarning, match=r"sinkhorn: x requires grad, but the results of sinkhorn .* not "
                                         r"differentiable; for a differentiable loss use otlinop.SamplesLoss or "
                                         r"otlinop.sinkhorn_loss"):
        res = sinkhorn(x.clone().requires_grad_(), y, eps=1.0)
    assert not res.cost.requires_grad
    with pytest.warns(UserWarning, match=r"sinkhorn: y, b require grad"):
        sinkhorn(x, y.clone().requires_grad_(), b=torch.full((5,), 0.2, dtype=F64, requires_grad=True), eps=1.0)
    # No warning for detached inputs, nor under no_grad.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(x, y, eps=1.0)
        with torch.no_grad():
            sinkhorn(x.clone().requires_grad_(), y, eps=1.0)


def test_the_differentiable_entry_point_named_by_the_warning_differentiates():
    x, y = _clouds()
    x = x.clone().requires_grad_()
    otlinop.sinkhorn_loss(x, y, blur=1.0).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("i", [2, 5, -3])
def test_select_out_of_range_names_the_batch_size(i):
    x, y = _clouds()
    res = sinkhorn(torch.stack([x, x + 1]), torch.stack([y, y]), eps=1.0)
    with pytest.raises(IndexError, match=rf"SinkhornResult.select: i={i} is out of range for a batch of 2 problems"):
        res.select(i)
    torch.testing.assert_close(res.select(-1).f, res.select(1).f)


@pytest.mark.parametrize("i", [1.0, "0", None, True])
def test_select_refuses_a_non_integer(i):
    x, y = _clouds()
    res = sinkhorn(torch.stack([x, x]), torch.stack([y, y]), eps=1.0)
    with pytest.raises(TypeError, match=r"SinkhornResult.select: i must be an int \(the index of a problem in the "
                                        r"batch of 2\)"):
        res.select(i)


# ------------------------------------------------------------------ meta device
@pytest.mark.parametrize("entry", ["sinkhorn", "PlanOperator", "SamplesLoss", "sinkhorn_loss", "hvp_x"])
def test_meta_device_is_refused(entry):
    x, y = (t.to("meta") for t in _clouds())
    f, g = torch.zeros(6, dtype=F64, device="meta"), torch.zeros(5, dtype=F64, device="meta")
    call = {
        "sinkhorn": lambda: sinkhorn(x, y, eps=1.0),
        "PlanOperator": lambda: PlanOperator(x, y, f, g, eps=1.0),
        "SamplesLoss": lambda: otlinop.SamplesLoss()(x, y),
        "sinkhorn_loss": lambda: otlinop.sinkhorn_loss(x, y),
        "hvp_x": lambda: otlinop.hvp_x(x, y, f, g, torch.zeros_like(x), eps=1.0),
    }[entry]
    with pytest.raises(ValueError, match=rf"{entry}: x and y are on the meta device, which holds shapes but no "
                                         "values"):
        call()


# ------------------------------------------------------------------ scipy view
def test_scipy_view_wrong_length_names_the_operator_and_the_shape():
    view = _plan().to_scipy()
    with pytest.raises(ValueError, match=r"PlanOperator.to_scipy\(\).matvec: x has shape \(7,\), expected \(5,\) "
                                         r"\(the operator has shape \(6, 5\), 5 columns\)"):
        view.matvec(np.ones(7))
    with pytest.raises(ValueError, match=r"PlanOperator.to_scipy\(\).matvec: x has shape \(7,\), expected \(5,\)"):
        view @ np.ones(7)
    with pytest.raises(ValueError, match=r"PlanOperator.to_scipy\(\).rmatvec: x has shape \(5,\), expected \(6,\) "
                                         r".*did you mean A @ x\?"):
        view.rmatvec(np.ones(5))
