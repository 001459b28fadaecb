"""Bad and extreme inputs at every public entry point (issue 19): 281 distinct inputs.

Each is one collected test (the last test of this file checks the count):
a bad input must raise an error whose message begins with the function or class
the user called and names the argument, what was expected and what came (the
``BAD`` table and the contract tests of item 6 above it); an extreme but valid
input must give a result checked against float64, POT, a closed form or finite
differences, or a status (and a ``ConvergenceWarning``) that says what happened.

Entry points: ``sinkhorn`` and ``SinkhornResult``, ``SamplesLoss``,
``sinkhorn_loss``, ``PlanOperator`` and its algebra, ``plan_matmul``,
``marginal_error``, ``plan_marginals``, ``HessianOperator``, ``dual_hessian``,
``hvp``/``hvp_x``/``hvp_y``/``hvp_self``, ``grad_x``/``grad_y``,
``loss_hessian_operator``, the solvers (``cg``, ``minres``, ``gmres``,
``bicgstab``, ``lsmr``, ``solve``), ``jacobi``, ``neumann``,
``aslinearoperator``, ``Dense``/``Diag``/``Identity``/``BlockOperator``,
``to_scipy`` and ``to_linear_operator``. Extreme float32 coordinates are
tested with the kernels' float32 range, not here.
"""

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


# ======================================================================================
# The battery (issue 19): bad or extreme inputs at every public entry point. Each BAD case
# must raise its exception with a message that begins with the function the user called
# and holds the fragments given (the argument, what was expected, what came); each case of
# the later sections computes a result checked against float64, POT, a closed form or
# finite differences, or a status that says what happened.
# ======================================================================================
import re  # noqa: E402

import scipy.sparse  # noqa: E402
import scipy.sparse.linalg  # noqa: E402

import solvers  # noqa: E402
from otlinop import (BlockOperator, ConvergenceWarning, Diag, DualHessianOperator, HessianOperator,  # noqa: E402
                     SamplesLoss, aslinearoperator, dual_hessian, grad_x, grad_y, hvp, hvp_self, hvp_x, hvp_y,
                     loss_hessian_operator, marginal_error, plan_marginals, plan_matmul, sinkhorn_loss)

X, Y = _clouds()
A_W, B_W = torch.full((6,), 1 / 6, dtype=F64), torch.full((5,), 1 / 5, dtype=F64)
F0, G0 = torch.zeros(6, dtype=F64), torch.zeros(5, dtype=F64)
DIR_X, DIR_Y = torch.ones(6, 2, dtype=F64), torch.ones(5, 2, dtype=F64)
M3 = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]], dtype=F64)
B3 = torch.ones(3, dtype=F64)
NAN6, INF5 = torch.full((6,), math.nan, dtype=F64), torch.full((5,), math.inf, dtype=F64)


def _s(**kw):
    return lambda: sinkhorn(X, Y, A_W, B_W, **{"eps": 0.5, **kw})


def _loss(*args, **kw):
    return lambda: SamplesLoss(**kw)(*(args or (X, Y)))


def _P(**kw):
    return PlanOperator(X, Y, F0, G0, **{"eps": 0.5, **kw})


def _hvp(fn=hvp, **kw):
    return lambda: fn(X, Y, F0, G0, **{"A": DIR_X, "B": None, "eps": 0.5, **kw})


class _NoAdjoint(LinearOperator):
    def __init__(self):
        super().__init__((3, 2), F64, "cpu")

    def _matvec(self, v):
        return torch.cat([v, v[:1]])


def _bad(id, call, exc, *fragments):
    """A case: ``call()`` raises ``exc``; its message starts with fragments[0] and holds the others in order."""
    pattern = "^" + ".*".join(re.escape(f) for f in fragments)
    return pytest.param(call, exc, pattern, id=id)


BAD = [
    # ---------------------------------------------------------------- sinkhorn: points
    _bad("sinkhorn-x-list", lambda: sinkhorn(X.tolist(), Y), TypeError,
         "sinkhorn: x must be a torch.Tensor, got list"),
    _bad("sinkhorn-x-int", lambda: sinkhorn(X.long(), Y.long()), TypeError,
         "sinkhorn: x must have a real floating dtype, got torch.int64", "float32 or float64 are accepted"),
    _bad("sinkhorn-x-bool", lambda: sinkhorn(X > 0, Y > 0), TypeError, "sinkhorn: x must have a real floating",
         "got torch.bool"),
    _bad("sinkhorn-x-complex", lambda: sinkhorn(X.to(torch.complex128), Y.to(torch.complex128)), TypeError,
         "sinkhorn: x has dtype torch.complex128, but points, plans and their Hessians are real"),
    _bad("sinkhorn-x-1d", lambda: sinkhorn(X[:, 0], Y), ValueError,
         "sinkhorn: x has shape (6,), expected (n, d) or (B, n, d)"),
    _bad("sinkhorn-x-4d", lambda: sinkhorn(X[None, None], Y[None, None]), ValueError,
         "sinkhorn: x has shape (1, 1, 6, 2), expected (n, d) or (B, n, d)"),
    _bad("sinkhorn-d-mismatch", lambda: sinkhorn(X, torch.ones(5, 3, dtype=F64)), ValueError,
         "sinkhorn: x and y must have the same dimension d, got x (6, 2) and y (5, 3)"),
    _bad("sinkhorn-d-zero", lambda: sinkhorn(X[:, :0], Y[:, :0]), ValueError,
         "sinkhorn: the points have 0 coordinates (x has shape (6, 0)); each point needs d >= 1"),
    _bad("sinkhorn-x-empty", lambda: sinkhorn(X[:0], Y), ValueError,
         "sinkhorn: x is an empty point cloud (shape (0, 2)); each measure needs at least one point"),
    _bad("sinkhorn-batch-empty", lambda: sinkhorn(X[None][:0], Y[None][:0]), ValueError,
         "sinkhorn: the batch is empty (x has shape (0, 6, 2))"),
    _bad("sinkhorn-batch-mismatch", lambda: sinkhorn(torch.stack([X, X]), torch.stack([Y] * 3)), ValueError,
         "sinkhorn: x has batch size 2 but y has 3"),
    _bad("sinkhorn-batched-and-not", lambda: sinkhorn(X[None], Y), ValueError,
         "sinkhorn: x has shape (1, 6, 2) and y has shape (5, 2); both must be unbatched"),
    _bad("sinkhorn-y-dtype", lambda: sinkhorn(X, Y.float()), TypeError,
         "sinkhorn: y has dtype torch.float32, expected torch.float64 like x"),
    _bad("sinkhorn-x-nan", lambda: sinkhorn(X.clone().fill_(math.nan), Y), ValueError,
         "sinkhorn: x contains NaN or inf values"),
    _bad("sinkhorn-y-inf", lambda: sinkhorn(X, Y.clone().fill_(math.inf)), ValueError,
         "sinkhorn: y contains NaN or inf values"),
    _bad("sinkhorn-points-overflow", lambda: sinkhorn(X * 1e200, Y * 1e200), ValueError,
         "sinkhorn: the points are too far apart: their costs c |x_i - y_j|^2 (c = cost_scale = 1) overflow "
         "float64", "rescale the points"),
    _bad("sinkhorn-points-overflow-alternating", lambda: sinkhorn(X * 1e160, Y * 1e160, eps=1.0,
                                                                    method="alternating"), ValueError,
         "sinkhorn: the points are too far apart", "overflow float64"),
    _bad("sinkhorn-cost-scale-overflow", _s(cost_scale=1e307), ValueError,
         "sinkhorn: the points are too far apart: their costs c |x_i - y_j|^2 (c = cost_scale = 1e+307)"),
    _bad("sinkhorn-points-overflow-float32", lambda: sinkhorn(X.float() * 1e19, Y.float() * 1e19), ValueError,
         "sinkhorn: the points are too far apart", "overflow float32 (4 c diam^2 exceeds 3.4e+38"),
    # ---------------------------------------------------------------- sinkhorn: weights
    _bad("sinkhorn-a-length", lambda: sinkhorn(X, Y, A_W[:5], B_W), ValueError,
         "sinkhorn: a has shape (5,), expected (6,) (one weight per point of x)"),
    _bad("sinkhorn-a-column", lambda: sinkhorn(X, Y, A_W[:, None], B_W), ValueError,
         "sinkhorn: a has shape (6, 1), expected (6,)"),
    _bad("sinkhorn-a-unbatched", lambda: sinkhorn(torch.stack([X, X]), torch.stack([Y, Y]), A_W,
                                                   torch.stack([B_W, B_W])), ValueError,
         "sinkhorn: a has shape (6,), expected (2, 6)", "a batched call needs a batched a, e.g. a.expand(2, 6)"),
    _bad("sinkhorn-a-int", lambda: sinkhorn(X, Y, torch.ones(6, dtype=torch.int64), B_W), TypeError,
         "sinkhorn: a has dtype torch.int64, expected torch.float64 like x; convert with a.to(torch.float64)"),
    _bad("sinkhorn-a-numpy", lambda: sinkhorn(X, Y, A_W.numpy(), B_W), TypeError,
         "sinkhorn: a must be a torch.Tensor or None, got ndarray"),
    _bad("sinkhorn-a-negative", lambda: sinkhorn(X, Y, -A_W, B_W), ValueError,
         "sinkhorn: the weights a have negative entries; weights must be >= 0"),
    _bad("sinkhorn-a-nan", lambda: sinkhorn(X, Y, NAN6, B_W), ValueError, "sinkhorn: a contains NaN or inf"),
    _bad("sinkhorn-b-inf", lambda: sinkhorn(X, Y, A_W, INF5), ValueError, "sinkhorn: b contains NaN or inf"),
    _bad("sinkhorn-a-zero-mass", lambda: sinkhorn(X, Y, A_W * 0, B_W, reach=1.0), ValueError,
         "sinkhorn: the weights a have zero total mass"),
    _bad("sinkhorn-unequal-masses", lambda: sinkhorn(X, Y, A_W, 2 * B_W), ValueError,
         "sinkhorn: balanced OT needs equal total masses, but sum(a) != sum(b)", "or pass reach=..."),
    _bad("sinkhorn-masses-overflow", lambda: sinkhorn(X, Y, A_W * 1e308, B_W * 1e308), ValueError,
         "sinkhorn: the weights' total masses are too large: their product sum(a) * sum(b)", "overflows float64",
         "rescale the weights"),
    _bad("sinkhorn-masses-overflow-float32", lambda: sinkhorn(X.float(), Y.float(), A_W.float() * 1e20,
                                                               B_W.float() * 1e20), ValueError,
         "sinkhorn: the weights' total masses are too large", "overflows float32 (above 3.4e+38)"),
    # ---------------------------------------------------------------- sinkhorn: options
    _bad("sinkhorn-blur-zero", lambda: sinkhorn(X, Y, blur=0.0), ValueError,
         "sinkhorn: blur must be positive and finite, got 0.0; blur is the final length scale"),
    _bad("sinkhorn-blur-and-eps", lambda: sinkhorn(X, Y, blur=0.1, eps=0.01), ValueError,
         "sinkhorn: give blur or eps, not both (eps = blur**2); got blur=0.1, eps=0.01"),
    _bad("sinkhorn-eps-nan", _s(eps=math.nan), ValueError, "sinkhorn: eps must be positive and finite, got nan"),
    _bad("sinkhorn-eps-inf", _s(eps=math.inf), ValueError, "sinkhorn: eps must be positive and finite, got inf"),
    _bad("sinkhorn-eps-complex", _s(eps=1j), TypeError, "sinkhorn: eps must be a positive number, got complex 1j"),
    _bad("sinkhorn-eps-requires-grad", _s(eps=torch.tensor(0.5, requires_grad=True)), TypeError,
         "sinkhorn: eps is a tensor that requires grad, but gradients w.r.t. eps are not implemented"),
    _bad("sinkhorn-blur-1d-tensor", lambda: sinkhorn(X, Y, blur=torch.tensor([0.5])), TypeError,
         "sinkhorn: blur must be a positive number, got a tensor of shape (1,); pass a Python number"),
    _bad("sinkhorn-scaling-zero", _s(eps=None, blur=0.5, scaling=0.0), ValueError,
         "sinkhorn: scaling must be in (0, 1), got 0.0"),
    _bad("sinkhorn-scaling-above-one", _s(eps=None, blur=0.5, scaling=1.5), ValueError,
         "sinkhorn: scaling must be in (0, 1), got 1.5"),
    _bad("sinkhorn-scaling-nan", _s(eps=None, blur=0.5, scaling=math.nan), ValueError,
         "sinkhorn: scaling must be in (0, 1), got nan"),
    _bad("sinkhorn-diameter-negative", _s(eps=None, blur=0.5, diameter=-1.0), ValueError,
         "sinkhorn: diameter must be positive and finite, got -1.0"),
    _bad("sinkhorn-cost-scale-zero", _s(cost_scale=0.0), ValueError,
         "sinkhorn: cost_scale must be positive and finite, got 0.0; use 1.0 for |x-y|^2"),
    _bad("sinkhorn-cost-scale-nan", _s(cost_scale=math.nan), ValueError,
         "sinkhorn: cost_scale must be positive and finite, got nan"),
    _bad("sinkhorn-reach-zero", _s(reach=0.0), ValueError,
         "sinkhorn: reach must be positive, got 0.0; None (or inf) means a balanced (hard) marginal constraint"),
    _bad("sinkhorn-reach-nan", _s(reach=math.nan), ValueError, "sinkhorn: reach must be positive, got nan"),
    _bad("sinkhorn-reach-and-reach-x", _s(reach=1.0, reach_x=1.0), ValueError,
         "sinkhorn: give either reach (both sides) or reach_x / reach_y (one side each), not both"),
    _bad("sinkhorn-reach-y-negative", _s(reach_y=-1.0), ValueError, "sinkhorn: reach_y must be positive, got -1.0"),
    _bad("sinkhorn-method", _s(method="newton"), ValueError,
         "sinkhorn: method must be 'symmetric' (GeomLoss) or 'alternating' (OTT-JAX), got 'newton'"),
    _bad("sinkhorn-max-iter-zero", _s(max_iter=0, method="alternating"), ValueError,
         "sinkhorn: max_iter must be a positive integer, got 0"),
    _bad("sinkhorn-max-iter-float", _s(max_iter=2.5), TypeError,
         "sinkhorn: max_iter must be a positive integer, got float 2.5"),
    _bad("sinkhorn-max-iter-bool", _s(max_iter=True, method="alternating"), TypeError,
         "sinkhorn: max_iter must be a positive integer, got bool True"),
    _bad("sinkhorn-max-iter-below-schedule", lambda: sinkhorn(X, Y, blur=0.05, max_iter=2), ValueError,
         "sinkhorn: max_iter=2 is shorter than the eps schedule"),
    _bad("sinkhorn-threshold-negative", _s(threshold=-1.0), ValueError,
         "sinkhorn: threshold must be non-negative, got -1.0; the L1 marginal error at which to stop"),
    _bad("sinkhorn-threshold-nan", _s(threshold=math.nan), ValueError,
         "sinkhorn: threshold must be non-negative, got nan"),
    _bad("sinkhorn-threshold-str", _s(threshold="1e-3"), TypeError,
         "sinkhorn: threshold must be a non-negative number, got str '1e-3'"),
    _bad("sinkhorn-check-every-zero", _s(check_every=0), ValueError,
         "sinkhorn: check_every must be a positive integer, got 0"),
    _bad("sinkhorn-check-every-float", _s(check_every=2.0), TypeError,
         "sinkhorn: check_every must be a positive integer, got float 2.0"),
    _bad("sinkhorn-f0-shape", _s(f0=G0), ValueError, "sinkhorn: f0 has shape (5,), expected (6,) (one value per point)"),
    _bad("sinkhorn-f0-nan", _s(f0=NAN6), ValueError, "sinkhorn: f0 contains NaN or inf values"),
    _bad("sinkhorn-f0-int", _s(f0=torch.zeros(6, dtype=torch.int64)), TypeError,
         "sinkhorn: f0 must have a real floating dtype, got torch.int64"),
    _bad("sinkhorn-f0-list", _s(f0=[0.0] * 6), TypeError, "sinkhorn: f0 must be a torch.Tensor or None, got list"),
    _bad("sinkhorn-g0-shape", _s(g0=F0), ValueError, "sinkhorn: g0 has shape (6,), expected (5,)"),
    _bad("sinkhorn-callback", _s(callback=3), TypeError, "sinkhorn: callback must be callable or None, got int 3"),
    _bad("sinkhorn-verbose-str", _s(verbose="no"), TypeError, "sinkhorn: verbose must be True or False, got str 'no'"),
    _bad("sinkhorn-backend", _s(backend="cuda"), ValueError,
         "sinkhorn: backend must be None or 'auto' (Triton for CUDA tensors of a Triton dtype, torch otherwise), "
         "'torch' or 'triton', got 'cuda'"),
    _bad("sinkhorn-precision", _s(precision="fp64"), ValueError,
         "sinkhorn: precision must be None (the kernels' default, accurate to fp32) or one of", "got 'fp64'"),
    _bad("sinkhorn-triton-float64", _s(backend="triton"), TypeError,
         "sinkhorn: backend='triton' supports float32, float16 and bfloat16 points; x has dtype torch.float64"),
    # ---------------------------------------------------------------- SamplesLoss
    _bad("SamplesLoss-loss", _loss(loss="energy"), NotImplementedError,
         "SamplesLoss: only loss='sinkhorn' is implemented, got loss='energy'; for 'hausdorff', 'energy'"),
    _bad("SamplesLoss-p", _loss(p=1), NotImplementedError, "SamplesLoss: only p=2", "got p=1"),
    _bad("SamplesLoss-cost", _loss(cost=lambda u, v: u), NotImplementedError,
         "SamplesLoss: custom cost functions are not supported", "pass cost_scale=c instead of cost=..."),
    _bad("SamplesLoss-kernel", _loss(kernel=lambda u, v: u), NotImplementedError,
         "SamplesLoss: kernel= is only used by GeomLoss' kernel losses"),
    _bad("SamplesLoss-three-arguments", _loss(A_W, X, Y), TypeError,
         "SamplesLoss: expected loss(x, y) or loss(a, x, b, y), got 3 arguments"),
    _bad("SamplesLoss-debias-str", _loss(debias="no"), TypeError, "SamplesLoss: debias must be True or False, got str"),
    _bad("SamplesLoss-potentials-int", _loss(potentials=1), TypeError,
         "SamplesLoss: potentials must be True or False, got int 1"),
    _bad("SamplesLoss-blur-zero", _loss(blur=0), ValueError, "SamplesLoss: blur must be positive and finite, got 0.0"),
    _bad("SamplesLoss-reach-zero", _loss(reach=0), ValueError, "SamplesLoss: reach must be positive, got 0.0"),
    _bad("SamplesLoss-scaling-one", _loss(scaling=1.0), ValueError, "SamplesLoss: scaling must be in (0, 1), got 1.0"),
    _bad("SamplesLoss-diameter-zero", _loss(diameter=0), ValueError,
         "SamplesLoss: diameter must be positive and finite, got 0.0"),
    _bad("SamplesLoss-weights-swapped", _loss(X, A_W, Y, B_W), ValueError,
         "SamplesLoss: x has shape (6,), expected (n, d) or (B, n, d)"),
    _bad("SamplesLoss-unequal-masses", _loss(3 * A_W, X, B_W, Y), ValueError,
         "SamplesLoss: balanced OT needs equal total masses"),
    _bad("SamplesLoss-x-nan", _loss(X.clone().fill_(math.nan), Y), ValueError, "SamplesLoss: x contains NaN or inf"),
    _bad("SamplesLoss-points-overflow", _loss(X * 1e200, Y * 1e200), ValueError,
         "SamplesLoss: the points are too far apart", "(c = cost_scale = 0.5) overflow float64"),
    _bad("SamplesLoss-masses-overflow", _loss(A_W * 1e308, X, B_W * 1e308, Y), ValueError,
         "SamplesLoss: the weights' total masses are too large"),
    _bad("SamplesLoss-backend", _loss(backend="keops"), ValueError, "SamplesLoss: backend must be None or 'auto'"),
    _bad("SamplesLoss-batch-mismatch", _loss(torch.stack([X, X]), Y[None]), ValueError,
         "SamplesLoss: x has batch size 2 but y has 1"),
    # ---------------------------------------------------------------- sinkhorn_loss
    _bad("sinkhorn_loss-x-list", lambda: sinkhorn_loss(X.tolist(), Y), TypeError,
         "sinkhorn_loss: x must be a torch.Tensor, got list"),
    _bad("sinkhorn_loss-debias-int", lambda: sinkhorn_loss(X, Y, debias=1), TypeError,
         "sinkhorn_loss: debias must be True or False, got int 1"),
    _bad("sinkhorn_loss-a-negative", lambda: sinkhorn_loss(X, Y, -A_W, B_W), ValueError,
         "sinkhorn_loss: the weights a have negative entries"),
    _bad("sinkhorn_loss-hvp-rtol", lambda: sinkhorn_loss(X, Y, hvp_rtol=-1.0), ValueError,
         "sinkhorn_loss: hvp_rtol must be positive and finite, got -1.0"),
    _bad("sinkhorn_loss-hvp-solver", lambda: sinkhorn_loss(X, Y, hvp_solver="cg"), TypeError,
         "sinkhorn_loss: hvp_solver must be a solver function such as solvers.cg"),
    _bad("sinkhorn_loss-hvp-preconditioner", lambda: sinkhorn_loss(X, Y, hvp_preconditioner="jacobi"), TypeError,
         "sinkhorn_loss: hvp_preconditioner must be None, an operator, or a factory such as solvers.jacobi()"),
    _bad("sinkhorn_loss-hvp-maxiter", lambda: sinkhorn_loss(X, Y, hvp_maxiter=0), ValueError,
         "sinkhorn_loss: hvp_maxiter must be a positive integer, got 0"),
    # ---------------------------------------------------------------- PlanOperator and plan_matmul
    _bad("PlanOperator-f-nan", lambda: PlanOperator(X, Y, NAN6, G0, eps=0.5), ValueError,
         "PlanOperator: f contains NaN or inf values; the plan would be undefined"),
    _bad("PlanOperator-f-minus-inf", lambda: PlanOperator(X, Y, F0 - math.inf, G0, eps=0.5), ValueError,
         "PlanOperator: f contains NaN or inf values"),
    _bad("PlanOperator-f-length", lambda: PlanOperator(X, Y, G0, G0, eps=0.5), ValueError,
         "PlanOperator: f has shape (5,), expected (6,) (one potential per point of x)"),
    _bad("PlanOperator-f-column", lambda: PlanOperator(X, Y, F0[:, None], G0, eps=0.5), ValueError,
         "PlanOperator: f has shape (6, 1), expected (6,)"),
    _bad("PlanOperator-eps-zero", lambda: PlanOperator(X, Y, F0, G0, eps=0), ValueError,
         "PlanOperator: eps must be positive and finite, got 0.0"),
    _bad("PlanOperator-a-negative", lambda: _P(a=-A_W), ValueError,
         "PlanOperator: the weights a have negative entries"),
    _bad("PlanOperator-batched", lambda: PlanOperator(X[None], Y[None], F0[None], G0[None], eps=0.5), ValueError,
         "PlanOperator: x has shape (1, 6, 2), expected (n, d); use plan_matmul for batched point clouds"),
    _bad("PlanOperator-points-overflow", lambda: PlanOperator(X * 1e160, Y * 1e160, F0, G0, eps=0.5), ValueError,
         "PlanOperator: the points are too far apart", "overflow float64"),
    _bad("PlanOperator-cost-scale-overflow", lambda: _P(cost_scale=1e307), ValueError,
         "PlanOperator: the points are too far apart", "(c = cost_scale = 1e+307)"),
    _bad("PlanOperator-triton-float64", lambda: _P(backend="triton"), TypeError,
         "PlanOperator: backend='triton' supports float32, float16 and bfloat16 points"),
    _bad("PlanOperator-matvec-length", lambda: _P() @ torch.ones(6, dtype=F64), ValueError,
         "PlanOperator.matvec: v has shape (6,), expected (5,) (the operator has shape (6, 5), 5 columns); "
         "did you mean A.T @ v?"),
    _bad("PlanOperator-matvec-float32", lambda: _P() @ torch.ones(5), TypeError,
         "PlanOperator.matvec: v has dtype torch.float32, expected torch.float64; convert with v.to(torch.float64)"),
    _bad("PlanOperator-matvec-int", lambda: _P() @ torch.ones(5, dtype=torch.int64), TypeError,
         "PlanOperator.matvec: v has dtype torch.int64, expected torch.float64"),
    _bad("PlanOperator-matvec-3d", lambda: _P() @ torch.ones(5, 2, 2, dtype=F64), ValueError,
         "PlanOperator @ v: v must be 1-D (m,) or 2-D (m, k), got shape (5, 2, 2)"),
    _bad("PlanOperator-matvec-0d", lambda: _P() @ torch.tensor(1.0, dtype=F64), ValueError,
         "PlanOperator @ v: v must be 1-D (m,) or 2-D (m, k), got shape ()"),
    _bad("PlanOperator-transpose-length", lambda: _P().T @ torch.ones(5, dtype=F64), ValueError,
         "PlanOperator.matvec: v has shape (5,), expected (6,)"),
    _bad("PlanOperator-times-vector", lambda: _P() * torch.ones(2), TypeError,
         "PlanOperator: '*' takes a scalar, got Tensor; use '@' for the product with a vector"),
    _bad("PlanOperator-divide-by-zero", lambda: _P() / 0, ZeroDivisionError, "PlanOperator / c: c is zero"),
    _bad("PlanOperator-power", lambda: _P() ** 2, ValueError, "A ** k: A must be square, got shape (6, 5)"),
    _bad("PlanOperator-product-shapes", lambda: _P() @ _P(), ValueError,
         "A @ B: inner dimensions differ, A is (6, 5) and B is (6, 5)"),
    _bad("PlanOperator-sum-shapes", lambda: _P() + _P().T, ValueError,
         "A + B: shapes differ, A is (6, 5) and B is (5, 6)"),
    _bad("PlanOperator-truncated-tol", lambda: _P().truncated(-1), ValueError,
         "PlanOperator.truncated: tol must be in (0, 1), got -1.0"),
    _bad("PlanOperator-truncated-max-fill", lambda: _P().truncated(1e-8, max_fill=2), ValueError,
         "PlanOperator.truncated: max_fill must be in (0, 1], got 2.0"),
    _bad("PlanOperator-bilinear-shapes", lambda: _P().bilinear(torch.ones(6, 2, dtype=F64), torch.ones(4, 2, dtype=F64),
                                                                torch.ones(5, 1, dtype=F64)), ValueError,
         "PlanOperator.bilinear: V has shape (4, 2), expected (5, 2)"),
    _bad("plan_matmul-transposed-operand", lambda: plan_matmul(X, Y, F0, G0, torch.ones(6, dtype=F64), eps=0.5),
         ValueError, "plan_matmul: V has shape (6,), expected (5,) or (5, k) (y has 5 points)",
         "did you mean the transpose, plan_matmul(y, x, g, f, V, a=b, b=a, ...)?"),
    _bad("plan_matmul-unbatched-operand", lambda: plan_matmul(torch.stack([X, X]), torch.stack([Y, Y]),
                                                               torch.stack([F0, F0]), torch.stack([G0, G0]),
                                                               torch.ones(5, dtype=F64), eps=0.5), ValueError,
         "plan_matmul: V has shape (5,), expected (2, 5) or (2, 5, k)"),
    _bad("marginal_error-a-nan", lambda: marginal_error(_P(), NAN6, B_W), ValueError,
         "marginal_error: a contains NaN or inf values; the target marginals must be finite"),
    _bad("marginal_error-a-shape", lambda: marginal_error(_P(), A_W[:3], B_W), ValueError,
         "marginal_error: a has shape (3,), expected (6,) (P has shape (6, 5), 6 rows)"),
    _bad("plan_marginals-tensor", lambda: plan_marginals(torch.ones(3, 3)), TypeError,
         "plan_marginals: P must be an otlinop LinearOperator (e.g. a PlanOperator), got Tensor"),
    # ---------------------------------------------------------------- Hessians and HVPs
    _bad("HessianOperator-ridge-negative", lambda: HessianOperator(X, Y, F0, G0, eps=0.5, ridge=-1), ValueError,
         "HessianOperator: ridge must be non-negative and finite, got -1.0"),
    _bad("HessianOperator-ridge-inf", lambda: HessianOperator(X, Y, F0, G0, eps=0.5, ridge=math.inf), ValueError,
         "HessianOperator: ridge must be non-negative and finite, got inf"),
    _bad("HessianOperator-reach-zero", lambda: HessianOperator(X, Y, F0, G0, eps=0.5, reach_x=0), ValueError,
         "HessianOperator: reach_x must be positive, got 0.0"),
    _bad("HessianOperator-f-nan", lambda: HessianOperator(X, Y, NAN6, G0, eps=0.5), ValueError,
         "HessianOperator: f contains NaN or inf values"),
    _bad("HessianOperator-matvec-length", lambda: HessianOperator(X, Y, F0, G0, eps=0.5) @ torch.ones(6, dtype=F64),
         ValueError, "HessianOperator.matvec: v has shape (6,), expected (5,) (the operator has shape (5, 5)"),
    _bad("DualHessianOperator-solve-rhs", lambda: dual_hessian(X, Y, F0, G0, eps=0.5).solve(torch.ones(10, dtype=F64)),
         ValueError, "DualHessianOperator.solve: r must have shape (11,) or (11, k) (n + m rows), got (10,)"),
    _bad("hvp-A-shape", _hvp(A=DIR_X[:5]), ValueError, "hvp: A has shape (5, 2), expected (6, 2) or (6, 2, k), k >= 1 (one direction for x, or k of them)"),
    _bad("hvp-A-nan", _hvp(A=DIR_X * math.nan), ValueError,
         "hvp: A contains NaN or inf values; the directions must be finite"),
    _bad("hvp-solver", _hvp(solver="cg"), TypeError, "hvp: solver must be a solver function such as solvers.cg"),
    _bad("hvp-M", _hvp(M="jacobi"), TypeError, "hvp: M must be None, an operator, or a factory"),
    _bad("hvp-rtol", _hvp(rtol=-1), ValueError, "hvp: rtol must be non-negative and finite, got -1.0"),
    _bad("hvp-maxiter", _hvp(maxiter=0), ValueError, "hvp: maxiter must be a positive integer, got 0"),
    _bad("hvp_x-A-float32", lambda: hvp_x(X, Y, F0, G0, DIR_X.float(), eps=0.5), TypeError,
         "hvp_x: A has dtype torch.float32, expected torch.float64 like x"),
    _bad("hvp_x-batched", lambda: hvp_x(X[None], Y[None], F0[None], G0[None], DIR_X[None], eps=0.5), ValueError,
         "hvp_x: x has shape (1, 6, 2), expected (n, d); batched point clouds are not supported here"),
    _bad("hvp_y-B-inf", lambda: hvp_y(X, Y, F0, G0, DIR_Y * math.inf, eps=0.5), ValueError,
         "hvp_y: B contains NaN or inf values"),
    _bad("hvp_self-f-shape", lambda: hvp_self(X, G0, DIR_X, eps=0.5), ValueError,
         "hvp_self: f has shape (5,), expected (6,)"),
    _bad("grad_y-f-nan", lambda: grad_y(X, Y, NAN6, G0, eps=0.5), ValueError, "grad_y: f contains NaN or +inf"),
    _bad("grad_x-points-overflow", lambda: grad_x(X * 1e200, Y * 1e200, F0, G0, eps=0.5), ValueError,
         "grad_x: the points are too far apart"),
    _bad("loss_hessian_operator-wrt", lambda: loss_hessian_operator(X, Y, F0, G0, eps=0.5, wrt="z"), ValueError,
         "loss_hessian_operator: wrt must be 'x', 'y' or 'xy', got 'z'"),
    _bad("loss_hessian_operator-solver", lambda: loss_hessian_operator(X, Y, F0, G0, eps=0.5, solver=3), TypeError,
         "loss_hessian_operator: solver must be a solver function"),
    _bad("SinkhornResult-plan-of-a-batch", lambda: sinkhorn(torch.stack([X, X]), torch.stack([Y, Y]), eps=1.0).plan,
         ValueError, "SinkhornResult.plan: this result holds a batch of 2 problems", "use result.select(i).plan"),
    _bad("SinkhornResult-select-unbatched", lambda: sinkhorn(X, Y, eps=1.0).select(0), ValueError,
         "SinkhornResult.select: this result is not batched"),
    # ---------------------------------------------------------------- solvers
    _bad("cg-A-list", lambda: solvers.cg([[1.0, 0.0], [0.0, 1.0]], B3[:2]), TypeError,
         "cg: A could not be used as a linear operator: aslinearoperator: cannot convert builtins.list"),
    _bad("cg-b-shape", lambda: solvers.cg(M3, torch.ones(4, dtype=F64)), ValueError,
         "cg: b has shape (4,), expected (3,) or (3, k) since A has shape (3, 3)"),
    _bad("minres-b-nan", lambda: solvers.minres(M3, B3 * math.nan), ValueError,
         "minres: b contains NaN or inf; the solution is undefined"),
    _bad("gmres-rtol-negative", lambda: solvers.gmres(M3, B3, rtol=-1), ValueError,
         "gmres: rtol must be a non-negative float (inf stops at once), got -1.0"),
    _bad("bicgstab-atol-nan", lambda: solvers.bicgstab(M3, B3, atol=math.nan), ValueError,
         "bicgstab: atol must be a non-negative float"),
    _bad("lsmr-maxiter-zero", lambda: solvers.lsmr(M3, B3, maxiter=0), ValueError, "lsmr: maxiter must be >= 1, got 0"),
    _bad("cg-maxiter-float", lambda: solvers.cg(M3, B3, maxiter=2.5), TypeError,
         "cg: maxiter must be a positive int or None, got float"),
    _bad("minres-x0-shape", lambda: solvers.minres(M3, B3, x0=B3[:2]), ValueError,
         "minres: x0 has shape (2,), expected (3,) (like b, with A's 3 columns)"),
    _bad("gmres-x0-nan", lambda: solvers.gmres(M3, B3, x0=B3 * math.nan), ValueError,
         "gmres: x0 contains NaN or inf; pass a finite initial guess or None"),
    _bad("bicgstab-M-str", lambda: solvers.bicgstab(M3, B3, M="jacobi"), TypeError,
         "bicgstab: M could not be used as a linear operator"),
    _bad("cg-M-shape", lambda: solvers.cg(M3, B3, M=torch.eye(2, dtype=F64)), ValueError,
         "cg: M has shape (2, 2), expected (3, 3) like A"),
    _bad("minres-callback", lambda: solvers.minres(M3, B3, callback=3), TypeError,
         "minres: callback must be callable as callback(xk), got int"),
    _bad("gmres-b-float32", lambda: solvers.gmres(M3, B3.float()), TypeError,
         "gmres: b has dtype torch.float32, but A has dtype torch.float64; convert with b.to(torch.float64)"),
    _bad("bicgstab-b-int", lambda: solvers.bicgstab(M3, torch.ones(3, dtype=torch.int64)), TypeError,
         "bicgstab: b has dtype torch.int64, expected a floating or complex dtype like A"),
    _bad("cg-not-square", lambda: solvers.cg(torch.ones(3, 2, dtype=F64), B3), ValueError,
         "cg: A must be square, got shape (3, 2); use lsmr for rectangular least-squares problems"),
    _bad("lsmr-b-numpy", lambda: solvers.lsmr(M3, B3.numpy()), TypeError, "lsmr: b must be a torch.Tensor"),
    _bad("gmres-restart-zero", lambda: solvers.gmres(M3, B3, restart=0), ValueError,
         "gmres: restart must be a positive int, got 0"),
    _bad("lsmr-damp-negative", lambda: solvers.lsmr(M3, B3, damp=-1), ValueError,
         "lsmr: damp must be a non-negative float, got -1"),
    _bad("cg-check-every-zero", lambda: solvers.cg(M3, B3, check_every=0), ValueError,
         "cg: check_every must be a positive int or None, got 0"),
    _bad("cg-graph-str", lambda: solvers.cg(M3, B3, graph="yes"), TypeError,
         "cg: graph must be a bool or a solvers.GraphCache, got str"),
    _bad("solve-method", lambda: solvers.solve(M3, B3, method="qr"), ValueError, "solve: unknown method 'qr'"),
    _bad("lsmr-no-adjoint", lambda: solvers.lsmr(_NoAdjoint(), B3), TypeError,
         "lsmr: A must provide its adjoint A.T"),
    _bad("jacobi-no-diagonal", lambda: solvers.cg(_P() @ _P().T, torch.ones(6, dtype=F64), M=solvers.jacobi()),
         TypeError, "jacobi: A (ProductOperator) provides no cheap diagonal"),
    _bad("jacobi-zero-diagonal", lambda: solvers.cg(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64), B3[:2],
                                                     M=solvers.jacobi()), ValueError,
         "jacobi: diag(A) has a zero entry at index 0"),
    _bad("jacobi-negative-diagonal-in-cg", lambda: solvers.cg(-torch.eye(2, dtype=F64), B3[:2], M=solvers.jacobi()),
         ValueError, "cg: M=jacobi(A) is not positive definite (diag(A) has a negative entry -1 at index 0)"),
    _bad("jacobi-str", lambda: solvers.jacobi("a"), TypeError, "jacobi: A could not be used as a linear operator"),
    _bad("neumann-negative", lambda: solvers.neumann(-1), ValueError,
         "neumann: terms must be a non-negative int, got -1"),
    _bad("neumann-float", lambda: solvers.neumann(2.5), ValueError,
         "neumann: terms must be a non-negative int, got 2.5"),
    # ---------------------------------------------------------------- aslinearoperator and the algebra
    _bad("aslinearoperator-list", lambda: aslinearoperator([[1.0, 2.0], [3.0, 4.0]]), TypeError,
         "aslinearoperator: cannot convert builtins.list; expected an otlinop LinearOperator, a torch tensor"),
    _bad("aslinearoperator-none", lambda: aslinearoperator(None), TypeError,
         "aslinearoperator: cannot convert builtins.NoneType"),
    _bad("aslinearoperator-1d", lambda: aslinearoperator(torch.ones(3)), ValueError,
         "Dense: M must be 2-D, got shape (3,)"),
    _bad("aslinearoperator-int-tensor", lambda: aslinearoperator(torch.ones(2, 2, dtype=torch.int64)), TypeError,
         "Dense: M must have a floating or complex dtype", "got torch.int64; convert with M.to(torch.float64)"),
    _bad("aslinearoperator-object-array", lambda: aslinearoperator(np.array([[1, "a"]], dtype=object)), TypeError,
         "aslinearoperator: NumPy dtype object is not supported"),
    _bad("aslinearoperator-duck", lambda: aslinearoperator(type("Duck", (), {"shape": (2, 2)})()), TypeError,
         "aslinearoperator: cannot convert", "Duck"),
    _bad("power-negative", lambda: Dense(M3) ** -1, ValueError, "A ** k: k must be a non-negative int, got -1"),
    _bad("power-float", lambda: Dense(M3) ** 2.5, ValueError, "A ** k: k must be a non-negative int, got 2.5"),
    _bad("power-bool", lambda: Dense(M3) ** True, ValueError, "A ** k: k must be a non-negative int, got True"),
    _bad("scalar-matmul", lambda: 2 @ Dense(M3), ValueError,
         "c @ Dense: Scalar operands are not allowed, use '*' instead (c is int 2)"),
    _bad("times-array", lambda: Dense(M3) * np.array([2.0]), TypeError,
         "Dense: '*' takes a scalar, got ndarray; use '@'"),
    _bad("times-inf", lambda: Dense(M3) * math.inf, ValueError, "Dense * c: c is inf; the factor must be finite"),
    _bad("sum-shapes", lambda: Dense(M3) + Dense(torch.eye(2, dtype=F64)), ValueError,
         "A + B: shapes differ, A is (3, 3) and B is (2, 2)"),
    _bad("matvec-dtype", lambda: Dense(M3) @ torch.ones(3), TypeError,
         "Dense.matvec: v has dtype torch.float32, expected torch.float64"),
    _bad("block-rows", lambda: BlockOperator([[Dense(M3), Dense(torch.ones(2, 2, dtype=F64))]]), ValueError,
         "BlockOperator: block [0][1] has shape (2, 2), but its block row has 3 rows"),
    _bad("block-empty", lambda: BlockOperator([]), TypeError,
         "BlockOperator: blocks must be a non-empty list of lists"),
    _bad("Diag-2d", lambda: Diag(torch.ones(2, 2)), ValueError, "Diag: d must be 1-D, got shape (2, 2)"),
    _bad("Diag-list", lambda: Diag([1.0, 2.0]), TypeError, "Diag: d must be a torch.Tensor, got list"),
    _bad("Identity-int-dtype", lambda: Identity(3, dtype=torch.int64), TypeError, "Identity: dtype must be one of"),
    _bad("no-adjoint", lambda: _NoAdjoint().T @ B3, NotImplementedError,
         "_NoAdjoint: no adjoint is available (implement _rmatvec, _rmatmat or _adjoint"),
    _bad("to_scipy-matmat-3d", lambda: Dense(M3).to_scipy().matmat(np.ones((3, 2, 2))), ValueError,
         "Dense.to_scipy().matmat: x must be 2-D, got shape (3, 2, 2)"),
    _bad("to_linear_operator-shape", lambda: Dense(M3).to_linear_operator() @ torch.ones(4, dtype=F64), ValueError,
         "to_linear_operator: A @ rhs: rhs has shape (4,), expected (3,) or (..., 3, k)"),
    _bad("to_linear_operator-dtype", lambda: Dense(M3).to_linear_operator() @ torch.ones(3), TypeError,
         "to_linear_operator: A @ rhs: rhs has dtype torch.float32, expected torch.float64"),
]


@pytest.mark.parametrize("call, exc, pattern", BAD)
def test_bad_input_gets_a_clear_error(call, exc, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # linear_operator's torch.jit use
        with pytest.raises(exc, match=pattern):
            call()


# ---------------------------------------------------------------------- extreme but valid: correct values
def _alt(x, y, a=None, b=None, **kw):
    return sinkhorn(x, y, a, b, **{"eps": 0.5, "method": "alternating", "threshold": 1e-13, "max_iter": 20000,
                                   **kw})


def _sqdist(x, y):
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("scale", [1e100, 1e-300, 3.0], ids=["mass-1e100", "mass-1e-300", "mass-3"])
def test_weights_of_any_representable_mass(scale):
    """Scaling both weights by s scales the plan by s and moves the value to s (cost - eps log s)."""
    ref = _alt(X, Y, A_W, B_W)
    res = _alt(X, Y, A_W * scale, B_W * scale)
    assert res.converged or res.marginal_error <= 1e-12 * scale
    torch.testing.assert_close(res.plan.to_dense(), scale * ref.plan.to_dense(), rtol=1e-9, atol=0)
    torch.testing.assert_close(res.cost, scale * (ref.cost - 0.5 * math.log(scale)), rtol=1e-9, atol=0)


def test_one_nonzero_weight_sends_everything_from_that_point():
    a = torch.zeros(6, dtype=F64)
    a[2] = 1.0
    P = _alt(X, Y, a, B_W).plan.to_dense()
    torch.testing.assert_close(P[2], B_W, rtol=1e-12, atol=0)
    assert float(P[[0, 1, 3, 4, 5]].abs().max()) == 0.0


def test_a_single_point_on_each_side():
    res = _alt(X[:1], Y[:1], torch.ones(1, dtype=F64), torch.ones(1, dtype=F64))
    C = float(_sqdist(X[:1], Y[:1]))
    assert res.plan.to_dense().item() == pytest.approx(1.0, rel=1e-14)
    assert res.cost.item() == pytest.approx(C, rel=1e-14) and res.transport_cost().item() == pytest.approx(C)


@pytest.mark.parametrize("case", ["identical-clouds", "duplicate-points", "d-300", "cost-scale-1e-10"])
def test_degenerate_clouds_against_pot(case):
    ot = pytest.importorskip("ot")
    x, y, c = X, Y, 1.0
    if case == "identical-clouds":
        y = X.clone()
    elif case == "duplicate-points":
        x = torch.cat([X[:3], X[:3]])
    elif case == "d-300":
        gen = torch.Generator().manual_seed(3)
        x, y = torch.randn(6, 300, generator=gen, dtype=F64), torch.randn(5, 300, generator=gen, dtype=F64)
        c = 1 / 300
    else:
        c = 1e-10
    a, b = torch.full((len(x),), 1 / len(x), dtype=F64), torch.full((len(y),), 1 / len(y), dtype=F64)
    res = _alt(x, y, a, b, cost_scale=c)
    M = (c * _sqdist(x, y)).numpy()
    P = torch.from_numpy(ot.sinkhorn(a.numpy(), b.numpy(), M, 0.5, method="sinkhorn_log", stopThr=1e-14,
                                     numItermax=20000))
    torch.testing.assert_close(res.plan.to_dense(), P, rtol=1e-8, atol=1e-15)
    if case == "duplicate-points":    # the two copies of a point share its mass equally
        torch.testing.assert_close(res.plan.to_dense()[:3], res.plan.to_dense()[3:], rtol=1e-10, atol=0)


def test_huge_eps_gives_the_independent_coupling():
    res = _alt(X, Y, A_W, B_W, eps=1e12)
    Q = A_W[:, None] * B_W[None, :]
    torch.testing.assert_close(res.plan.to_dense(), Q, rtol=1e-9, atol=0)
    assert res.transport_cost().item() == pytest.approx(float((Q * _sqdist(X, Y)).sum()), rel=1e-9)


@pytest.mark.parametrize("method", ["symmetric", "alternating"])
def test_tiny_eps_is_finite_and_loud(method):
    """eps = 1e-8 with costs of ~1: Sinkhorn needs far more than 300 iterations. The
    potentials stay finite (log-domain updates) and the result says it is not converged."""
    with pytest.warns(ConvergenceWarning, match=r"sinkhorn: (not converged|stalled): marginal error"):
        res = sinkhorn(X, Y, A_W, B_W, eps=1e-8, method=method, max_iter=300)
    assert not res.converged and bool(torch.isfinite(res.f).all() and torch.isfinite(res.g).all())
    assert math.isfinite(res.cost.item())


@pytest.mark.parametrize("layout", ["non-contiguous", "expanded", "translated-1e6"])
def test_layouts_and_translations_give_the_same_plan(layout):
    ref = _alt(X, Y)
    if layout == "non-contiguous":
        x, y = X.T.contiguous().T, Y.T.contiguous().T
        assert not x.is_contiguous()
    elif layout == "expanded":
        x, y = X[:1].expand(6, 2), Y[:1].expand(5, 2)
        ref = _alt(x.contiguous(), y.contiguous())
    else:
        x, y = X + 1e6, Y + 1e6
    res = _alt(x, y)
    # Far from the origin the points keep 1e-10 of their digits: the plan matches to that.
    tol = 1e-5 if layout == "translated-1e6" else 1e-12
    torch.testing.assert_close(res.plan.to_dense(), ref.plan.to_dense(), rtol=tol, atol=1e-14)


def test_half_precision_points_are_solved_in_float32():
    for dtype in (torch.float16, torch.bfloat16):
        # The same rounded points in float64 are the reference. Default weights: half points
        # get float32 ones (1/n rounded to half would give clouds of unequal mass, a balanced
        # problem without a solution).
        x, y = X.to(dtype), Y.to(dtype)
        res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-6)
        ref = sinkhorn(x.double(), y.double(), eps=0.5, method="alternating", threshold=1e-12)
        assert res.f.dtype == torch.float32 and res.converged
        assert res.cost.item() == pytest.approx(ref.cost.item(), rel=1e-5)


def test_an_unreachable_problem_says_so():
    """cost_scale = 1e300 at eps = 0.5: every plan entry but the nearest underflows, and the
    threshold cannot be met in float64. The result says "stalled", never "converged"."""
    with pytest.warns(ConvergenceWarning, match=r"sinkhorn: stalled: .* float64 arithmetic"):
        res = _alt(X, Y, cost_scale=1e300, threshold=1e-3)
    assert not res.converged and res.status.startswith("stalled")


# ---------------------------------------------------------------------- the loss, plans and HVPs
def test_loss_of_identical_clouds_is_zero_and_its_gradient_too():
    x = X.clone().requires_grad_()
    value = SamplesLoss(blur=0.5)(x, X)
    (g,) = torch.autograd.grad(value, x)
    assert abs(value.item()) < 1e-12 and float(g.abs().max()) < 1e-10


def test_loss_gradient_matches_finite_differences():
    # A schedule that converges (its ~100 steps all at about the final eps): GeomLoss'
    # gradient is that of the loss only at converged potentials.
    loss = SamplesLoss(blur=0.7, diameter=0.7 * 1.0001, scaling=0.999999)
    x = X.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x, Y), x)
    D = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    h = 1e-5
    fd = (loss(X + h * D, Y) - loss(X - h * D, Y)) / (2 * h)
    assert (g * D).sum().item() == pytest.approx(fd.item(), rel=1e-5)     # measured 1e-6


def test_loss_takes_geomloss_column_weights_and_batches():
    loss = SamplesLoss(blur=0.5)
    flat = loss(A_W, X, B_W, Y)
    assert loss(A_W[:, None], X, B_W[:, None], Y).item() == flat.item()
    torch.testing.assert_close(loss(torch.stack([X, X]), torch.stack([Y, Y])), flat.expand(2), rtol=1e-12, atol=0)


def test_loss_with_a_zero_weight_has_finite_second_derivatives():
    a = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.2], dtype=F64)
    x = X.clone().requires_grad_()
    (g,) = torch.autograd.grad(SamplesLoss(blur=0.5)(a, x, B_W, Y), x, create_graph=True)
    (H,) = torch.autograd.grad(g.sum(), x)
    assert float(g[0].detach().abs().max()) == 0.0 and bool(torch.isfinite(H).all())


def test_hvp_x_matches_finite_differences_of_grad_x():
    res = _alt(X, Y)
    D = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    Hd, info = hvp_x(X, Y, res.f, res.g, D, eps=0.5, rtol=1e-13)
    assert info.converged
    h = 1e-5

    def gx(x):
        r = _alt(x, Y, f0=res.f)
        return grad_x(x, Y, r.f, r.g, eps=0.5)
    torch.testing.assert_close(Hd, (gx(X + h * D) - gx(X - h * D)) / (2 * h), rtol=1e-6, atol=1e-8)


def test_hessian_operator_is_symmetric_psd_with_constants_in_its_null_space():
    res = _alt(X, Y)
    S = HessianOperator(X, Y, res.f, res.g, eps=0.5, ridge=0.0).to_dense()
    torch.testing.assert_close(S, S.T, rtol=0, atol=1e-13)
    assert float(torch.linalg.eigvalsh(S).min()) > -1e-13
    assert float((S @ torch.ones(5, dtype=F64)).abs().max()) < 1e-12


@pytest.mark.parametrize("case", ["eps-1e300", "zero-weights", "empty-operand", "numpy-operand", "truncated-1e-300"])
def test_plan_products_at_the_edges(case):
    if case == "eps-1e300":       # f = g = 0: P = a⊗b exactly
        P = PlanOperator(X, Y, F0, G0, eps=1e300, a=A_W, b=B_W)
        torch.testing.assert_close(P @ torch.ones(5, dtype=F64), A_W, rtol=1e-15, atol=0)
    elif case == "zero-weights":
        a = A_W.clone()
        a[:2] = 0
        rows = PlanOperator(X, Y, F0, G0, eps=0.5, a=a) @ torch.ones(5, dtype=F64)
        assert float(rows[:2].abs().max()) == 0.0 and bool((rows[2:] > 0).all())
    elif case == "empty-operand":
        assert (_P() @ torch.ones(5, 0, dtype=F64)).shape == (6, 0)
    elif case == "numpy-operand":
        v = np.linspace(0, 1, 5)
        out = _P() @ v
        assert isinstance(out, np.ndarray)
        np.testing.assert_allclose(out, (_P() @ torch.from_numpy(v)).numpy(), rtol=1e-15)
    else:
        v = torch.linspace(0, 1, 5, dtype=F64)
        torch.testing.assert_close(_P().truncated(1e-300) @ v, _P() @ v, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------- solvers: singular, indefinite, broken
SINGULAR = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=F64))


def test_singular_consistent_system_gets_the_minimum_norm_solution():
    b = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    for solve in (solvers.cg, solvers.minres, solvers.gmres):
        res = solve(SINGULAR, b, rtol=1e-12)
        assert res.converged, res.status
        torch.testing.assert_close(res.x, torch.linalg.pinv(SINGULAR) @ b, rtol=1e-10, atol=1e-12)


def test_singular_inconsistent_system_is_named_and_least_squares_is_offered():
    b = B3
    res = solvers.minres(SINGULAR, b)
    assert not res.converged and "A is singular and b is not in its range" in res.status
    lsq = solvers.lsmr(SINGULAR, b, atol=1e-12, btol=1e-12)
    torch.testing.assert_close(lsq.x, torch.linalg.pinv(SINGULAR) @ b, rtol=1e-8, atol=1e-10)
    cg = solvers.cg(SINGULAR, b)
    assert not cg.converged and bool(torch.isfinite(cg.x).all())
    assert "singular or inconsistent" in cg.status


def test_indefinite_system_cg_refuses_and_minres_solves():
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=F64))
    res = solvers.cg(A, B3)
    assert not res.converged and "A is not positive definite (p^T A p <= 0); use minres" in res.status
    torch.testing.assert_close(solvers.minres(A, B3, rtol=1e-12).x, torch.linalg.solve(A, B3), rtol=1e-10, atol=0)


class _Overflows(LinearOperator):
    """Symmetric, but its products overflow float64."""

    def __init__(self):
        super().__init__((3, 3), F64, "cpu", is_symmetric=True)

    def _matvec(self, v):
        return v * 1e308 * 10


class _ReturnsNaN(LinearOperator):
    def __init__(self):
        super().__init__((3, 3), F64, "cpu", is_symmetric=True)

    def _matvec(self, v):
        return torch.full_like(v, math.nan)


@pytest.mark.parametrize("solve", [solvers.cg, solvers.minres, solvers.gmres, solvers.bicgstab],
                         ids=["cg", "minres", "gmres", "bicgstab"])
@pytest.mark.parametrize("op", [_Overflows, _ReturnsNaN], ids=["overflowing-operator", "nan-operator"])
def test_an_operator_that_breaks_gets_a_nonfinite_status(solve, op):
    """cg used to say "maxiter=30 reached with relative residual nan" after 1 iteration."""
    res = solve(op(), B3)
    assert not res.converged and "NaN or inf appeared" in res.status and "maxiter" not in res.status
    assert bool(torch.isfinite(res.x).all())
    if op is _Overflows:     # the true residual of the x returned (0) is ||b||
        assert float(res.residual_norm) == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("case", ["zero-rhs", "empty", "complex-hermitian", "scipy-sparse", "numpy-int-matrix"])
def test_solvers_on_edge_systems(case):
    if case == "zero-rhs":
        res = solvers.cg(M3, B3 * 0)
        assert res.converged and res.n_iter == 0 and float(res.x.abs().max()) == 0.0
    elif case == "empty":
        res = solvers.minres(torch.ones(0, 0, dtype=F64), torch.ones(0, dtype=F64))
        assert res.converged and res.x.shape == (0,)
    elif case == "complex-hermitian":
        A = M3.to(torch.complex128) + 1j * torch.tensor([[0, 1, 0], [-1, 0, 0], [0, 0, 0]], dtype=torch.complex128)
        b = B3.to(torch.complex128)
        res = solvers.cg(A, b, rtol=1e-12)
        torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-10, atol=0)
    elif case == "scipy-sparse":
        A = scipy.sparse.csr_matrix(M3.numpy())
        res = solvers.cg(A, B3, rtol=1e-12)
        np.testing.assert_allclose(res.x.numpy(), scipy.sparse.linalg.spsolve(A.tocsc(), B3.numpy()), rtol=1e-10)
    else:
        A = aslinearoperator(np.eye(3, dtype=np.int64) * 2)
        assert A.dtype == F64
        torch.testing.assert_close(solvers.cg(A, B3).x, B3 / 2, rtol=1e-14, atol=0)


def test_operator_algebra_promotes_and_matches_dense():
    D = Dense(M3)
    Z = Dense(torch.eye(3, dtype=torch.complex128) * 1j)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.complex128)
    torch.testing.assert_close((D + Z) @ v, (M3.to(torch.complex128) + 1j * torch.eye(3)) @ v, rtol=1e-15, atol=0)
    torch.testing.assert_close((D ** 0) @ B3, B3, rtol=0, atol=0)
    torch.testing.assert_close((Dense(M3.float()) + D) @ B3, 2 * M3 @ B3, rtol=1e-7, atol=0)


@pytest.mark.parametrize("operand", [[1, 2, 3], np.array([1, 2, 3]), np.array([1, 2, 3]) * 1j,
                                     np.ones((3, 1)), np.ones(3, dtype=np.float32)],
                         ids=["list", "int-array", "complex-array", "column", "float32-array"])
def test_scipy_view_takes_what_scipy_takes(operand):
    view = Dense(M3).to_scipy()
    out = view.matvec(operand)
    expected = M3.numpy().astype(np.result_type(np.asarray(operand).dtype, np.float64)) @ np.asarray(operand)
    np.testing.assert_allclose(out, expected.reshape(out.shape), rtol=1e-15)


def test_scipy_view_runs_scipys_eigensolver():
    vals = scipy.sparse.linalg.eigsh(Dense(M3).to_scipy(), k=1, return_eigenvectors=False)
    assert vals[0] == pytest.approx(float(torch.linalg.eigvalsh(M3)[-1]), rel=1e-12)


# ---------------------------------------------------------------------- the count
def test_the_docstring_counts_the_battery():
    """The number in the module docstring is the number of tests collected here."""
    import sys

    module = sys.modules[__name__]
    count = 0
    for name, fn in vars(module).items():
        if name.startswith("test_") and callable(fn) and name != "test_the_docstring_counts_the_battery":
            size = 1
            for mark in getattr(fn, "pytestmark", []):
                if mark.name == "parametrize":
                    size *= len(mark.args[1])
            count += size
    stated = int(re.search(r"(\d+) distinct inputs", __doc__).group(1))
    assert stated == count
