"""Property tests (hypothesis): invariants that hold for every small float64 problem.

- the adjoint identity ``<u, P v> = <P^T u, v>`` of the plan and of composed operators;
- the symmetry of the Hessian operators (``HessianOperator``, ``DualHessianOperator``)
  and their agreement with their dense form;
- the marginals of converged plans;
- invariance of the plan and the value under a common translation of the points;
- equivariance under a permutation of the points;
- gradients equal to finite differences: ``grad_x`` of the converged value, and the
  autograd gradient of ``SamplesLoss``.

Deterministic: ``derandomize=True`` (examples derived from each test's source),
no example database. Sizes 1 to 6 points, d 1 to 3, eps 0.1 to 2 on points in
[-1, 1]: the whole file runs in about 20 s on one core.
"""

import os

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from otlinop import (Dense, Diag, DualHessianOperator, HessianOperator, PlanOperator, SamplesLoss,  # noqa: E402
                     dual_hessian, grad_x, sinkhorn)

F64 = torch.float64

PROFILE = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

COORD = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
WEIGHT = st.floats(0.1, 1.0, allow_nan=False, allow_infinity=False)


@st.composite
def problems(draw, max_points=6):
    """(x, y, a, b, eps): clouds of 1 to ``max_points`` points in [-1, 1]^d, positive
    probability weights, eps in [0.1, 2]."""
    n = draw(st.integers(1, max_points))
    m = draw(st.integers(1, max_points))
    d = draw(st.integers(1, 3))
    x = torch.tensor(draw(st.lists(COORD, min_size=n * d, max_size=n * d)), dtype=F64).reshape(n, d)
    y = torch.tensor(draw(st.lists(COORD, min_size=m * d, max_size=m * d)), dtype=F64).reshape(m, d)
    a = torch.tensor(draw(st.lists(WEIGHT, min_size=n, max_size=n)), dtype=F64)
    b = torch.tensor(draw(st.lists(WEIGHT, min_size=m, max_size=m)), dtype=F64)
    eps = draw(st.floats(0.1, 2.0))
    return x, y, a / a.sum(), b / b.sum(), eps


def _vector(draw, size, low=-1.0, high=1.0):
    return torch.tensor(draw(st.lists(st.floats(low, high), min_size=size, max_size=size)), dtype=F64)


def _solve(x, y, a, b, eps, **kw):
    return sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-13, max_iter=20000, **kw)


def _close(u, v, tol):
    """|u - v| <= tol (|u| + |v|) entrywise in norm, with a floor for zero values."""
    u, v = torch.as_tensor(u, dtype=F64), torch.as_tensor(v, dtype=F64)
    return float((u - v).norm()) <= tol * (float(u.norm()) + float(v.norm())) + 1e-300


# ---------------------------------------------------------------------- adjoints
@PROFILE
@given(problems(), st.data())
def test_plan_adjoint_identity_and_dense_form(problem, data):
    x, y, a, b, eps = problem
    n, m = len(x), len(y)
    f, g = _vector(data.draw, n), _vector(data.draw, m)
    u, v = _vector(data.draw, n), _vector(data.draw, m)
    P = PlanOperator(x, y, f, g, eps=eps, a=a, b=b)
    left, right = torch.dot(u, P @ v), torch.dot(P.T @ u, v)
    scale = float(u.abs() @ (P.to_dense().abs() @ v.abs()))
    assert abs(float(left - right)) <= 1e-13 * scale + 1e-300
    C = ((x[:, None] - y[None]) ** 2).sum(-1)
    dense = a[:, None] * b[None] * torch.exp((f[:, None] + g[None] - C) / eps)
    torch.testing.assert_close(P.to_dense(), dense, rtol=1e-12, atol=1e-300)


@PROFILE
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.data())
def test_composed_operators_keep_the_adjoint_identity(n, k, m, data):
    A = _vector(data.draw, n * k).reshape(n, k)
    B = _vector(data.draw, k * m).reshape(k, m)
    c = data.draw(st.floats(-3, 3))
    d = _vector(data.draw, n, 0.5, 2.0)
    op = Diag(d) @ (c * Dense(A) @ Dense(B)) - Dense(A @ B)
    dense = torch.diag(d) @ (c * A @ B) - A @ B
    u, v = _vector(data.draw, n), _vector(data.draw, m)
    torch.testing.assert_close(op @ v, dense @ v, rtol=1e-12, atol=1e-13)
    assert abs(float(torch.dot(u, op @ v) - torch.dot(op.T @ u, v))) <= 1e-12 * (
        float(u.abs() @ dense.abs() @ v.abs()) + 1e-300)


# ---------------------------------------------------------------------- Hessians
@PROFILE
@given(problems(), st.data())
def test_hessian_operators_are_symmetric_and_match_their_formula(problem, data):
    x, y, a, b, eps = problem
    n, m = len(x), len(y)
    f, g = _vector(data.draw, n), _vector(data.draw, m)
    reach = data.draw(st.sampled_from([None, 0.7]))
    K = dual_hessian(x, y, f, g, eps=eps, a=a, b=b, reach_x=reach, reach_y=reach, ridge=0.0)
    S = HessianOperator(x, y, f, g, eps=eps, a=a, b=b, reach_x=reach, reach_y=reach, ridge=0.0)
    assert isinstance(K, DualHessianOperator)
    Kd, Sd = K.to_dense(), S.to_dense()
    torch.testing.assert_close(Kd, Kd.T, rtol=0, atol=1e-13 * float(Kd.abs().max()))
    torch.testing.assert_close(Sd, Sd.T, rtol=0, atol=1e-13 * float(Kd.abs().max()))
    # S is the Schur complement of K on g: S = K_gg - K_gf K_ff^-1 K_fg.
    Kff, Kfg, Kgg = Kd[:n, :n], Kd[:n, n:], Kd[n:, n:]
    torch.testing.assert_close(Sd, Kgg - Kfg.T @ torch.linalg.solve(Kff, Kfg), rtol=1e-9,
                               atol=1e-12 * float(Kd.abs().max()))


# ---------------------------------------------------------------------- converged plans
@PROFILE
@given(problems())
def test_converged_plans_have_the_marginals(problem):
    x, y, a, b, eps = problem
    res = _solve(x, y, a, b, eps)
    assert res.converged, res.status
    P = res.plan
    # Rows exactly after the last f update, columns to the threshold (relative to the mass 1).
    assert float((P.row_sums() - a).abs().sum()) <= 1e-12
    assert float((P.col_sums() - b).abs().sum()) <= 1e-11


@PROFILE
@given(problems(), st.lists(st.floats(-100, 100), min_size=3, max_size=3))
def test_translation_leaves_the_plan_and_the_value(problem, shift):
    x, y, a, b, eps = problem
    t = torch.tensor(shift[:x.shape[1]], dtype=F64)
    ref, moved = _solve(x, y, a, b, eps), _solve(x + t, y + t, a, b, eps)
    # The points carry about 1e-14 of 100 of rounding after the shift, 1e-14 / eps in the plan.
    torch.testing.assert_close(moved.plan.to_dense(), ref.plan.to_dense(), rtol=1e-9, atol=1e-12)
    assert _close(moved.cost, ref.cost, 1e-9)
    assert _close(moved.transport_cost(), ref.transport_cost(), 1e-9)


@PROFILE
@given(problems(), st.randoms(use_true_random=False))
def test_permuting_the_points_permutes_the_potentials(problem, rng):
    x, y, a, b, eps = problem
    pi = list(range(len(x)))
    rng.shuffle(pi)
    sigma = list(range(len(y)))
    rng.shuffle(sigma)
    ref = _solve(x, y, a, b, eps)
    res = _solve(x[pi], y[sigma], a[pi], b[sigma], eps)
    # Potentials are defined up to f + t, g - t: fix the gauge by the mean of g.
    t = float(res.g.mean() - ref.g[sigma].mean())
    torch.testing.assert_close(res.f + t, ref.f[pi], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(res.g - t, ref.g[sigma], rtol=1e-8, atol=1e-10)
    assert _close(res.cost, ref.cost, 1e-10)


# ---------------------------------------------------------------------- gradients
@PROFILE
@given(problems(max_points=5), st.data())
def test_grad_x_is_the_derivative_of_the_converged_value(problem, data):
    x, y, a, b, eps = problem
    D = _vector(data.draw, x.numel()).reshape(x.shape)
    res = _solve(x, y, a, b, eps)
    analytic = float((grad_x(x, y, res.f, res.g, eps=eps, a=a, b=b) * D).sum())
    h = 1e-5
    fd = (_solve(x + h * D, y, a, b, eps, f0=res.f).cost - _solve(x - h * D, y, a, b, eps, f0=res.f).cost) / (2 * h)
    # Central differences: O(h^2) ~ 1e-10 and rounding ~ 1e-16 / h of the values.
    assert abs(analytic - float(fd)) <= 1e-7 * (1 + abs(analytic))


@settings(PROFILE, max_examples=8)
@given(problems(max_points=4), st.data())
def test_samples_loss_gradient_is_its_finite_difference(problem, data):
    x, y, a, b, eps = problem
    blur = math.sqrt(eps)
    # A schedule that ends converged (~100 steps all at about the final eps): GeomLoss'
    # gradient is the loss' derivative at converged potentials.
    loss = SamplesLoss(blur=blur, diameter=blur * 1.0001, scaling=0.999999)
    D = _vector(data.draw, x.numel()).reshape(x.shape)
    xi = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(loss(a, xi, b, y), xi)
    h = 1e-5
    fd = (loss(a, x + h * D, b, y) - loss(a, x - h * D, b, y)) / (2 * h)
    analytic = float((gx * D).sum())
    assert abs(analytic - float(fd)) <= 1e-5 * (1 + abs(analytic))
