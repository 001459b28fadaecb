"""PlanOperator, plan_matmul and the marginal helpers against dense float64 plans."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (conftest.py does the same).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from operator_battery import OperatorBattery  # noqa: E402
from otlinop import Dense, Diag  # noqa: E402
from otlinop.marginals import marginal_error, plan_marginals  # noqa: E402
from otlinop.plan import PlanOperator, plan_matmul  # noqa: E402

F64 = torch.float64
#: Where the Triton path runs: the GPU when there is one, else the interpreter on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
from conftest import requires_cuda  # noqa: E402

#: float32 tolerances of the Triton path against the torch path, in one place. The absolute
#: part is relative to the largest entry of the expected tensor (plans with weights 1/n have
#: tiny entries: an absolute tolerance would make the comparison vacuous).
F32_RTOL, F32_ATOL = 2e-4, 1e-5
#: The same at n = m = 20000 (sums of 20000 float32 terms).
GPU_RTOL, GPU_ATOL = 1e-3, 5e-5


def _data(n, m, d, *, weights=False, zero=False, dtype=F64, seed=0, scale=0.3, device="cpu"):
    """Points in [0, 1]^d, moderate potentials, optional weights (with a zero on each side)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=F64)
    y = torch.rand(m, d, generator=gen, dtype=F64)
    f = scale * torch.randn(n, generator=gen, dtype=F64)
    g = scale * torch.randn(m, generator=gen, dtype=F64)
    a = b = None
    if weights:
        a = torch.rand(n, generator=gen, dtype=F64) + 0.1
        b = torch.rand(m, generator=gen, dtype=F64) + 0.1
        if zero:
            a[1] = 0.0
            b[-2] = 0.0
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(y), cast(f), cast(g), cast(a), cast(b)


def _dense(x, y, f, g, eps, a=None, b=None, cost_scale=1.0):
    """The plan straight from its formula, P_ij = a_i b_j exp((f_i + g_j - c|x_i - y_j|^2)/eps)."""
    C = cost_scale * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    P = torch.exp((f[:, None] + g[None, :] - C) / eps)
    if a is not None:
        P = a[:, None] * P
    if b is not None:
        P = P * b[None, :]
    return P


def _close(actual, expected, rtol=1e-10, atol=1e-12):
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


# --------------------------------------------------------------------------
# The shared battery
# --------------------------------------------------------------------------
class TestPlanBattery(OperatorBattery):
    def make(self):
        x, y, f, g, _, _ = _data(13, 9, 3)
        return PlanOperator(x, y, f, g, eps=1.0), _dense(x, y, f, g, 1.0)


class TestWeightedPlanBattery(OperatorBattery):
    def make(self):
        x, y, f, g, a, b = _data(11, 17, 2, weights=True, zero=True)
        P = PlanOperator(x, y, f, g, eps=0.1, a=a, b=b, cost_scale=0.5)
        return P, _dense(x, y, f, g, 0.1, a, b, 0.5)


class TestTransposedPlanBattery(OperatorBattery):
    def make(self):
        x, y, f, g, a, b = _data(8, 14, 4, weights=True)
        P = PlanOperator(x, y, f, g, eps=0.5, a=a, b=b)
        return P.T, _dense(x, y, f, g, 0.5, a, b).T


class TestSymmetricPlanBattery(OperatorBattery):
    """x is y, f is g, a is b: the debiasing plan, declared symmetric PSD."""

    def make(self):
        x, _, f, _, a, _ = _data(12, 12, 2, weights=True)
        P = PlanOperator(x, x, f, f, eps=0.3, a=a, b=a)
        assert P.is_symmetric and P.is_psd and P.T is P
        return P, _dense(x, x, f, f, 0.3, a, a)


class TestCongruenceBattery(OperatorBattery):
    """P.T @ Diag(w) @ P with w > 0 is recognised as symmetric PSD."""

    has_diagonal = False

    def make(self):
        x, y, f, g, a, b = _data(10, 7, 3, weights=True)
        P = PlanOperator(x, y, f, g, eps=1.0, a=a, b=b)
        w = torch.rand(10, dtype=F64) + 0.5
        S = P.T @ Diag(w) @ P
        assert S.is_symmetric and S.is_psd
        Pd = _dense(x, y, f, g, 1.0, a, b)
        return S, Pd.T @ torch.diag(w) @ Pd


# --------------------------------------------------------------------------
# Dense equivalence over the grid weights x cost_scale x eps
# --------------------------------------------------------------------------
GRID = [(w, c, e) for w in ("none", "weights", "zero") for c in (1.0, 0.5) for e in (0.1, 1.0)]


@pytest.mark.parametrize("weights,cost_scale,eps", GRID)
@pytest.mark.parametrize("n,m,d", [(7, 23, 2), (40, 40, 5)])
def test_plan_operator_against_dense(weights, cost_scale, eps, n, m, d):
    x, y, f, g, a, b = _data(n, m, d, weights=weights != "none", zero=weights == "zero")
    P = PlanOperator(x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale)
    D = _dense(x, y, f, g, eps, a, b, cost_scale)
    gen = torch.Generator().manual_seed(1)
    v, V = torch.randn(m, generator=gen, dtype=F64), torch.randn(m, 3, generator=gen, dtype=F64)
    u, U = torch.randn(n, generator=gen, dtype=F64), torch.randn(n, 2, generator=gen, dtype=F64)
    _close(P.matvec(v), D @ v)
    _close(P.matmat(V), D @ V)
    _close(P.rmatvec(u), D.T @ u)
    _close(P.rmatmat(U), D.T @ U)
    _close(P.T @ U, D.T @ U)
    _close(P.to_dense(), D)
    _close(P.T.to_dense(), D.T)
    _close(P.diagonal(), torch.diagonal(D))
    _close(P.T.diagonal(), torch.diagonal(D))
    lhs, rhs = torch.dot(u, P @ v), torch.dot(P.T @ u, v)
    assert abs(float(lhs - rhs)) <= 1e-12 * float(u.norm() * v.norm() * max(1.0, float(D.abs().max())))
    if weights == "zero":
        assert float((P @ V)[1].abs().max()) == 0.0
        assert float((P.T @ U)[-2].abs().max()) == 0.0


def test_attributes():
    x, y, f, g, a, b = _data(6, 5, 2, weights=True, zero=True)
    P = PlanOperator(x, y, f, g, eps=0.2, a=a, b=b, cost_scale=0.5)
    assert (P.x, P.y, P.f, P.g, P.a, P.b) == (x, y, f, g, a, b)
    assert P.eps == 0.2 and P.cost_scale == 0.5
    assert P.log_a[1] == -float("inf")
    _close(P.log_b, torch.log(b))
    Q = PlanOperator(x, y, f, g, eps=1)
    assert torch.equal(Q.a, torch.ones(6, dtype=F64)) and torch.equal(Q.log_b, torch.zeros(5, dtype=F64))
    assert isinstance(Q.eps, float)


def test_transpose_structure():
    x, y, f, g, a, b = _data(9, 6, 3, weights=True)
    P = PlanOperator(x, y, f, g, eps=0.5, a=a, b=b)
    assert P.T.T is P and P.T is P.T
    assert isinstance(P.T, PlanOperator) and P.T.shape == (6, 9)
    assert P.T.x is y and P.T.f is g and P.T.a is b
    assert not P.is_symmetric
    # x == y by value but not by identity: no symmetry is claimed.
    assert not PlanOperator(x, x.clone(), f, f, eps=1.0).is_symmetric


def test_congruence_is_symmetric():
    x, y, f, g, a, b = _data(12, 8, 2, weights=True, zero=True)
    P = PlanOperator(x, y, f, g, eps=0.3, a=a, b=b)
    S = P.T @ Diag(1.0 / (P.row_sums() + 1.0)) @ P
    assert S.is_symmetric and S.is_psd
    Sd = S.to_dense()
    _close(Sd, Sd.T)
    Pd = _dense(x, y, f, g, 0.3, a, b)
    _close(Sd, Pd.T @ torch.diag(1.0 / (Pd.sum(1) + 1.0)) @ Pd)


def test_row_col_sums_and_marginals():
    x, y, f, g, a, b = _data(15, 11, 3, weights=True, zero=True)
    P = PlanOperator(x, y, f, g, eps=0.5, a=a, b=b, cost_scale=0.5)
    D = _dense(x, y, f, g, 0.5, a, b, 0.5)
    _close(P.row_sums(), D.sum(1))
    _close(P.col_sums(), D.sum(0))
    assert P.row_sums() is P.row_sums()          # cached
    assert P.col_sums() is P.T.row_sums()        # cached on the transpose
    A, B = P.marginals()
    assert isinstance(A, Diag) and isinstance(B, Diag)
    _close(A.diagonal(), D.sum(1))
    _close(B.diagonal(), D.sum(0))


def test_weights_as_given_and_cached_row_sums():
    x, y, f, g, a, b = _data(7, 5, 2, weights=True)
    P = PlanOperator(x, y, f, g, eps=0.5, a=a, b=b)
    assert P.weights[0] is a and P.weights[1] is b and P.T.weights[0] is b
    assert PlanOperator(x, y, f, g, eps=0.5).weights == (None, None)
    assert P.cached_row_sums() is None and P.T.cached_row_sums() is None     # no pass of its own
    assert P.row_sums() is P.cached_row_sums() and P.T.cached_row_sums() is None
    assert P.col_sums() is P.T.cached_row_sums()


def test_row_sums_with_grad_are_not_cached():
    x, y, f, g, _, _ = _data(6, 5, 2)
    f = f.clone().requires_grad_()
    P = PlanOperator(x, y, f, g, eps=1.0)
    r1, r2 = P.row_sums(), P.row_sums()
    assert r1 is not r2 and r1.requires_grad
    assert P.cached_row_sums() is None
    (gf,) = torch.autograd.grad(r1.sum(), f)
    _close(gf, _dense(x, y, f.detach(), g, 1.0).sum(1))   # d/df_i sum_ij P_ij = (P1)_i / eps


@pytest.mark.parametrize("weights", ["none", "zero"])
@pytest.mark.parametrize("eps,cost_scale", [(0.1, 1.0), (1.0, 0.5)])
def test_squared(weights, eps, cost_scale):
    x, y, f, g, a, b = _data(13, 10, 2, weights=weights != "none", zero=weights == "zero")
    P = PlanOperator(x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale)
    D = _dense(x, y, f, g, eps, a, b, cost_scale)
    Q = P.squared()
    assert isinstance(Q, PlanOperator) and Q.eps == eps / 2
    _close(Q.to_dense(), D * D)
    w = torch.rand(13, dtype=F64)
    # The Jacobi identity: sum_i P_ij^2 w_i = P.squared().T @ w.
    _close(Q.T @ w, ((D ** 2) * w[:, None]).sum(0))


@pytest.mark.parametrize("weights", ["none", "zero"])
def test_bilinear(weights):
    x, y, f, g, a, b = _data(9, 12, 3, weights=weights != "none", zero=weights == "zero")
    P = PlanOperator(x, y, f, g, eps=0.4, a=a, b=b, cost_scale=0.5)
    D = _dense(x, y, f, g, 0.4, a, b, 0.5)
    W, V, Y = torch.randn(9, 2, dtype=F64), torch.randn(12, 2, dtype=F64), torch.randn(12, 4, dtype=F64)
    _close(P.bilinear(W, V, Y), (D * (W @ V.T)) @ Y)
    # The adjoint's bilinear swaps the roles: sum_i P_ij <V_j, W_i> X_i.
    X = torch.randn(9, 3, dtype=F64)
    _close(P.T.bilinear(V, W, X), (D * (W @ V.T)).T @ X)
    with pytest.raises(ValueError, match=r"V has shape \(12, 3\), expected \(12, 2\) \(as many columns as W"):
        P.bilinear(W, torch.randn(12, 3, dtype=F64), Y)
    with pytest.raises(ValueError, match=r"Y has shape \(9, 4\), expected \(12, e\)"):
        P.bilinear(W, V, torch.randn(9, 4, dtype=F64))


def test_to_dense_refuses_large_plans():
    x = torch.zeros(8000, 1, dtype=F64)
    P = PlanOperator(x, x.clone(), torch.zeros(8000, dtype=F64), torch.zeros(8000, dtype=F64), eps=1.0)
    with pytest.raises(ValueError, match=r"6\.4e\+07 entries.*use matvecs"):
        P.to_dense()


def test_rectangular_diagonal():
    x, y, f, g, a, b = _data(5, 8, 2, weights=True)
    P = PlanOperator(x, y, f, g, eps=0.7, a=a, b=b)
    _close(P.diagonal(), torch.diagonal(_dense(x, y, f, g, 0.7, a, b)))


# --------------------------------------------------------------------------
# plan_matmul: gradients
# --------------------------------------------------------------------------
NAMES = ("x", "y", "f", "g", "V", "a", "b")


def _gradcheck_inputs(n=6, m=5, d=3, k=2, seed=0):
    x, y, f, g, a, b = _data(n, m, d, weights=True, seed=seed)
    V = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return dict(x=x, y=y, f=f, g=g, V=V, a=a, b=b)


@pytest.mark.parametrize("wrt", [(name,) for name in NAMES] + [NAMES])
@pytest.mark.parametrize("eps,cost_scale", [(0.5, 1.0), (1.0, 0.5)])
def test_plan_matmul_gradcheck(wrt, eps, cost_scale):
    data = _gradcheck_inputs()
    leaves = {name: data[name].clone().requires_grad_() for name in wrt}

    def fn(*args):
        inputs = {**data, **dict(zip(wrt, args))}
        return plan_matmul(inputs["x"], inputs["y"], inputs["f"], inputs["g"], inputs["V"], eps=eps,
                           a=inputs["a"], b=inputs["b"], cost_scale=cost_scale, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(leaves[name] for name in wrt))


@pytest.mark.parametrize("operand", ["vector", "none"])
def test_plan_matmul_gradcheck_vector_and_row_sums(operand):
    data = _gradcheck_inputs()
    V = data["V"][:, 0].clone().requires_grad_() if operand == "vector" else None
    leaves = [data[k].clone().requires_grad_() for k in ("x", "y", "f", "g", "a", "b")]

    def fn(x, y, f, g, a, b, *rest):
        return plan_matmul(x, y, f, g, rest[0] if rest else None, eps=0.7, a=a, b=b, cost_scale=0.5)

    assert torch.autograd.gradcheck(fn, tuple(leaves) + ((V,) if V is not None else ()))


def test_plan_matmul_gradcheck_batched():
    gen = torch.Generator().manual_seed(3)
    B, n, m, d, k = 2, 5, 4, 2, 3
    args = [torch.rand(B, n, d, generator=gen, dtype=F64), torch.rand(B, m, d, generator=gen, dtype=F64),
            0.3 * torch.randn(B, n, generator=gen, dtype=F64), 0.3 * torch.randn(B, m, generator=gen, dtype=F64),
            torch.randn(B, m, k, generator=gen, dtype=F64),
            torch.rand(B, n, generator=gen, dtype=F64) + 0.1, torch.rand(B, m, generator=gen, dtype=F64) + 0.1]
    args = tuple(t.requires_grad_() for t in args)
    assert torch.autograd.gradcheck(
        lambda x, y, f, g, V, a, b: plan_matmul(x, y, f, g, V, eps=0.5, a=a, b=b, cost_scale=0.5), args)


def test_plan_matmul_gradient_at_zero_weights():
    """Zero weights: the gradient w.r.t. a_i = 0 is sum_j P'_ij s_ij, finite (the dense product rule)."""
    data = _gradcheck_inputs(n=7, m=6)
    data["a"][2] = 0.0
    data["b"][0] = 0.0
    W = torch.randn(7, 2, dtype=F64)
    leaves = {k: v.clone().requires_grad_() for k, v in data.items()}
    out = plan_matmul(leaves["x"], leaves["y"], leaves["f"], leaves["g"], leaves["V"], eps=0.3,
                      a=leaves["a"], b=leaves["b"])
    got = torch.autograd.grad((out * W).sum(), [leaves[k] for k in NAMES])
    ref_leaves = {k: v.clone().requires_grad_() for k, v in data.items()}
    r = ref_leaves
    ref_out = _dense(r["x"], r["y"], r["f"], r["g"], 0.3, r["a"], r["b"]) @ r["V"]
    expected = torch.autograd.grad((ref_out * W).sum(), [r[k] for k in NAMES])
    _close(out.detach(), ref_out.detach())
    for name, gv, ev in zip(NAMES, got, expected):
        assert torch.isfinite(gv).all(), name
        _close(gv, ev)
    assert float(got[5][2]) != 0.0  # the zero weight still gets a (non-trivial) gradient


def test_plan_operator_is_differentiable():
    data = _gradcheck_inputs()
    args = tuple(data[k].clone().requires_grad_() for k in ("x", "y", "f", "g", "a", "b"))
    U = torch.randn(6, 2, dtype=F64)

    def fn(x, y, f, g, a, b):
        P = PlanOperator(x, y, f, g, eps=0.8, a=a, b=b, cost_scale=0.5)
        return P @ data["V"], P.T @ U, P.row_sums(), P.col_sums()

    assert torch.autograd.gradcheck(fn, args)


def test_double_backward_raises():
    data = _gradcheck_inputs()
    x = data["x"].clone().requires_grad_()
    out = plan_matmul(x, data["y"], data["f"], data["g"], data["V"], eps=1.0)
    W = torch.randn_like(out, requires_grad=True)
    (gx,) = torch.autograd.grad(out, x, grad_outputs=W, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_only_needed_gradients_are_computed(count_calls):
    import otlinop._operators.plan_product as plan_module   # the home of plan_matmul's autograd Function

    calls = count_calls(plan_module, "plan_apply", "plan_bilinear")
    data = _gradcheck_inputs()
    f = data["f"].clone().requires_grad_()
    out = plan_matmul(data["x"], data["y"], f, data["g"], data["V"], eps=1.0, a=data["a"], b=data["b"])
    out.sum().backward()
    assert calls == {"plan_apply": 1, "plan_bilinear": 0}      # df reuses the forward's output: no extra pass
    x = data["x"].clone().requires_grad_()
    calls.update(plan_apply=0, plan_bilinear=0)
    plan_matmul(x, data["y"], data["f"], data["g"], data["V"], eps=1.0).sum().backward()
    assert calls == {"plan_apply": 1, "plan_bilinear": 1}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_point_gradients_in_float32_far_from_the_origin(backend):
    """dx and dy are differences of two sums (x_i sum_j P s - sum_j P s y_j): the backward
    centres the clouds first, so clouds far from the origin lose no extra float32 digits."""
    x, y, f, g, _, _ = _data(37, 23, 3)
    x, y = x + 50.0, y + 50.0
    V, W = torch.randn(23, 2, dtype=F64), torch.randn(37, 2, dtype=F64)

    def point_grads(dtype, backend):
        to = dict(dtype=dtype, device=DEVICE if backend == "triton" else "cpu")
        leaves = [x.to(**to).requires_grad_(), y.to(**to).requires_grad_()]
        out = plan_matmul(*leaves, f.to(**to), g.to(**to), V.to(**to), eps=0.1, backend=backend)
        return torch.autograd.grad((out * W.to(**to)).sum(), leaves)

    for got, expected in zip(point_grads(torch.float32, backend), point_grads(F64, "torch")):
        err = float((got.cpu().double() - expected).abs().max() / expected.abs().max())
        assert err < 3e-5, err   # about 5e-5 without the centring


def test_batched_plan_matmul_equals_per_item():
    gen = torch.Generator().manual_seed(5)
    B, n, m, d = 3, 9, 7, 2
    x, y = torch.rand(B, n, d, generator=gen, dtype=F64), torch.rand(B, m, d, generator=gen, dtype=F64)
    f, g = torch.randn(B, n, generator=gen, dtype=F64), torch.randn(B, m, generator=gen, dtype=F64)
    a, b = torch.rand(B, n, generator=gen, dtype=F64), torch.rand(B, m, generator=gen, dtype=F64)
    for V in (torch.randn(B, m, generator=gen, dtype=F64), torch.randn(B, m, 4, generator=gen, dtype=F64), None):
        out = plan_matmul(x, y, f, g, V, eps=0.5, a=a, b=b, cost_scale=0.5)
        for i in range(B):
            Vi = None if V is None else V[i]
            _close(out[i], plan_matmul(x[i], y[i], f[i], g[i], Vi, eps=0.5, a=a[i], b=b[i], cost_scale=0.5))


# --------------------------------------------------------------------------
# The Triton path (interpreter on CPU) against the torch path
# --------------------------------------------------------------------------
def _f32_close(actual, expected, rtol=F32_RTOL, atol=F32_ATOL, name=""):
    scale = float(expected.abs().max())
    assert scale > 0, f"{name}: the expected tensor is zero, the comparison would be vacuous"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("d", [1, 3, 17])
@pytest.mark.parametrize("weights", ["none", "zero"])
def test_triton_matches_torch_values_and_gradients(d, weights):
    n, m = 37, 23
    x, y, f, g, a, b = _data(n, m, d, weights=weights != "none", zero=weights == "zero", dtype=torch.float32,
                             device=DEVICE)
    V = torch.randn(m, 2).to(DEVICE)
    W = torch.randn(n, 2).to(DEVICE)
    eps, c = 0.5, 0.5
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, y, f, g, V, a, b)]
        out = plan_matmul(*leaves[:5], eps=eps, a=leaves[5], b=leaves[6], cost_scale=c, backend=backend)
        grads = torch.autograd.grad((out * W).sum(), [t for t in leaves if t is not None])
        results[backend] = (out.detach(),) + grads
    for got, expected in zip(results["triton"], results["torch"]):
        _f32_close(got, expected)


def test_triton_operator_matches_torch():
    x, y, f, g, a, b = _data(21, 30, 3, weights=True, zero=True, dtype=torch.float32, device=DEVICE)
    P = PlanOperator(x, y, f, g, eps=0.3, a=a, b=b, backend="triton")
    R = PlanOperator(x, y, f, g, eps=0.3, a=a, b=b, backend="torch")
    U, V, W = torch.randn(21, 3).to(DEVICE), torch.randn(30, 3).to(DEVICE), torch.randn(21, 2).to(DEVICE)
    _f32_close(P @ V, R @ V)
    _f32_close(P.T @ U, R.T @ U)
    _f32_close(P.row_sums(), R.row_sums())
    _f32_close(P.squared().T @ U[:, 0], R.squared().T @ U[:, 0])
    _f32_close(P.bilinear(W, V[:, :2], y), R.bilinear(W, V[:, :2], y))


def test_triton_batched_matches_torch():
    gen = torch.Generator().manual_seed(2)
    B, n, m, d = 2, 19, 13, 3
    args = [torch.rand(B, n, d, generator=gen), torch.rand(B, m, d, generator=gen),
            0.3 * torch.randn(B, n, generator=gen), 0.3 * torch.randn(B, m, generator=gen),
            torch.randn(B, m, 2, generator=gen)]
    w = dict(a=torch.rand(B, n, generator=gen) + 0.1, b=torch.rand(B, m, generator=gen) + 0.1)
    args, w = [t.to(DEVICE) for t in args], {k: t.to(DEVICE) for k, t in w.items()}
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in args]
        out = plan_matmul(*leaves, eps=0.5, **w, backend=backend)
        results[backend] = (out.detach(),) + torch.autograd.grad(out.square().sum(), leaves)
    for got, expected in zip(results["triton"], results["torch"]):
        _f32_close(got, expected)


@requires_cuda
@pytest.mark.parametrize("precision", ["ieee", None])
def test_gpu_triton_matches_torch_large(precision):
    n = m = 20000
    d = 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen) / d ** 0.5
    y = torch.randn(m, d, device="cuda", generator=gen) / d ** 0.5
    f = 0.1 * torch.randn(n, device="cuda", generator=gen)
    g = 0.1 * torch.randn(m, device="cuda", generator=gen)
    a = torch.rand(n, device="cuda", generator=gen) / n
    b = torch.rand(m, device="cuda", generator=gen) / m
    V = torch.randn(m, 4, device="cuda", generator=gen)
    W = torch.randn(n, 4, device="cuda", generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, y, f, g, V, a, b)]
        out = plan_matmul(*leaves[:5], eps=0.5, a=leaves[5], b=leaves[6], cost_scale=0.5, backend=backend,
                          precision=precision)
        results[backend] = (out.detach(),) + torch.autograd.grad((out * W).sum(), leaves)
    for name, got, expected in zip(("out",) + NAMES, results["triton"], results["torch"]):
        err = float((got - expected).abs().max() / expected.abs().max())
        print(f"precision={precision} d{name}: max error / max entry {err:.2e}")
        _f32_close(got, expected, GPU_RTOL, GPU_ATOL, name)


# --------------------------------------------------------------------------
# Marginal helpers
# --------------------------------------------------------------------------
def test_marginal_error():
    x, y, f, g, a, b = _data(10, 8, 2, weights=True, zero=True)
    P = PlanOperator(x, y, f, g, eps=0.5, a=a, b=b)
    D = _dense(x, y, f, g, 0.5, a, b)
    ea, eb = marginal_error(P, a, b)
    _close(ea, (D.sum(1) - a).abs().sum())
    _close(eb, (D.sum(0) - b).abs().sum())
    assert marginal_error(P, a, None)[1] is None and marginal_error(P, None, b)[0] is None
    # Any LinearOperator is a plan: a dense one gives the same numbers.
    ea2, eb2 = marginal_error(Dense(D), a, b)
    _close(ea2, ea)
    _close(eb2, eb)
    A, B = plan_marginals(Dense(D))
    _close(A.diagonal(), D.sum(1))
    _close(B.diagonal(), D.sum(0))


def test_marginal_error_validation():
    x, y, f, g, a, b = _data(10, 8, 2, weights=True)
    P = PlanOperator(x, y, f, g, eps=0.5, a=a, b=b)
    with pytest.raises(ValueError, match=r"marginal_error: a has shape \(8,\), expected \(10,\)"):
        marginal_error(P, b, b)
    with pytest.raises(TypeError, match=r"b has dtype torch.float32, expected torch.float64"):
        marginal_error(P, a, b.float())
    with pytest.raises(TypeError, match=r"P must be an otlinop LinearOperator.*Dense"):
        marginal_error(torch.ones(10, 8, dtype=F64), a, b)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def _valid():
    x, y, f, g, a, b = _data(6, 5, 2, weights=True)
    return dict(x=x, y=y, f=f, g=g, a=a, b=b)


@pytest.mark.parametrize("change,error,pattern", [
    (dict(x=torch.zeros(6, dtype=F64)), ValueError, r"x has shape \(6,\), expected \(n, d\)"),
    (dict(x=torch.zeros(2, 6, 2, dtype=F64)), ValueError, r"x has shape \(2, 6, 2\), expected \(n, d\); use plan_matmul for batched"),
    (dict(y=torch.zeros(5, 3, dtype=F64)), ValueError, r"x and y must have the same dimension d, got x \(6, 2\) and y \(5, 3\)"),
    (dict(f=torch.zeros(5, dtype=F64)), ValueError, r"f has shape \(5,\), expected \(6,\)"),
    (dict(g=torch.zeros(6, dtype=F64)), ValueError, r"g has shape \(6,\), expected \(5,\)"),
    (dict(a=torch.ones(5, dtype=F64)), ValueError, r"a has shape \(5,\), expected \(6,\)"),
    (dict(b=torch.ones(6, 1, dtype=F64)), ValueError, r"b has shape \(6, 1\), expected \(5,\)"),
    (dict(f=torch.zeros(6, dtype=torch.float32)), TypeError, r"f has dtype torch.float32, expected torch.float64 like x"),
    (dict(x=torch.zeros(6, 2, dtype=torch.int64), y=torch.zeros(5, 2, dtype=torch.int64)), TypeError,
     r"x must have a real floating dtype, got torch.int64"),
    (dict(g=[0.0] * 5), TypeError, r"g must be a torch.Tensor, got list"),
    (dict(f=torch.tensor([0.0, 1, 2, float("nan"), 4, 5], dtype=F64)), ValueError, r"PlanOperator: f contains NaN or inf values; the plan would be undefined"),
    (dict(y=torch.full((5, 2), float("inf"), dtype=F64)), ValueError, r"y contains NaN or inf values"),
    (dict(a=torch.tensor([1.0, -1, 1, 1, 1, 1], dtype=F64)), ValueError, r"weights a have negative entries"),
    (dict(b=torch.tensor([1.0, 1, float("inf"), 1, 1], dtype=F64)), ValueError, r"b contains NaN or inf values"),
    (dict(a=torch.tensor([1.0, float("nan"), 1, 1, 1, 1], dtype=F64)), ValueError, r"a contains NaN or inf values"),
    (dict(x=torch.tensor([[0.0, 1]] * 5 + [[float("-inf"), 0]], dtype=F64)), ValueError, r"x contains NaN or inf"),
])
def test_plan_operator_validation(change, error, pattern):
    kwargs = {**_valid(), **change}
    with pytest.raises(error, match=pattern):
        PlanOperator(kwargs.pop("x"), kwargs.pop("y"), kwargs.pop("f"), kwargs.pop("g"), eps=1.0, **kwargs)


def test_value_checks_follow_the_kernels_switch(override, monkeypatch):
    """_CHECK_FINITE = False (the benchmarks') skips the construction's read-back too."""
    kwargs = {**_valid(), "f": torch.tensor([0.0, 1, 2, float("nan"), 4, 5], dtype=F64)}
    override(check_finite=False)
    P = PlanOperator(kwargs.pop("x"), kwargs.pop("y"), kwargs.pop("f"), kwargs.pop("g"), eps=1.0, **kwargs)
    assert P.shape == (6, 5)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(eps=0.0), ValueError, r"eps must be positive and finite, got 0.0"),
    (dict(eps=-1.0), ValueError, r"eps must be positive and finite, got -1.0"),
    (dict(eps=float("inf")), ValueError, r"eps must be positive and finite, got inf"),
    (dict(eps="0.1"), TypeError, r"eps must be a positive number, got str"),
    (dict(eps=torch.tensor(0.1, requires_grad=True)), TypeError, r"eps is a tensor that requires grad"),
    (dict(eps=1.0, cost_scale=0.0), ValueError, r"cost_scale must be positive and finite, got 0.0"),
    (dict(eps=1.0, backend="cuda"), ValueError, r"backend must be None or 'auto' \(.*\), 'torch' or 'triton', got 'cuda'"),
])
def test_scalar_validation(kwargs, error, pattern):
    data = _valid()
    with pytest.raises(error, match=pattern):
        PlanOperator(data["x"], data["y"], data["f"], data["g"], **kwargs)
    with pytest.raises(error, match=pattern):
        plan_matmul(data["x"], data["y"], data["f"], data["g"], None, **kwargs)


def test_plan_matmul_validation():
    d = _valid()
    x, y, f, g = d["x"], d["y"], d["f"], d["g"]
    with pytest.raises(ValueError, match=r"V has shape \(6,\), expected \(5,\) or \(5, k\).*transpose"):
        plan_matmul(x, y, f, g, torch.ones(6, dtype=F64), eps=1.0)
    with pytest.raises(TypeError, match=r"V has dtype torch.float32, expected torch.float64 like x"):
        plan_matmul(x, y, f, g, torch.ones(5), eps=1.0)
    with pytest.raises(ValueError, match=r"V has shape \(5, 2\), expected \(3, 5\) or \(3, 5, k\)"):
        plan_matmul(x.expand(3, 6, 2), y.expand(3, 5, 2), f.expand(3, 6), g.expand(3, 5),
                    torch.ones(5, 2, dtype=F64), eps=1.0)
    with pytest.raises(ValueError, match=r"f has shape \(6,\), expected \(3, 6\)"):
        plan_matmul(x.expand(3, 6, 2), y.expand(3, 5, 2), f, g.expand(3, 5), None, eps=1.0)


def test_operator_shape_error_suggests_transpose():
    d = _valid()
    P = PlanOperator(d["x"], d["y"], d["f"], d["g"], eps=1.0)
    with pytest.raises(ValueError, match=r"v has shape \(6,\), expected \(5,\).*did you mean A.T @ v"):
        P @ torch.ones(6, dtype=F64)


def test_transport_gradient_matches_dense_and_is_accurate_far_from_origin():
    from otlinop.plan import transport_gradient

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64) + 50.0
    y = torch.randn(30, 3, generator=gen, dtype=torch.float64) + 50.5
    f = torch.randn(40, generator=gen, dtype=torch.float64) * 0.1
    g = torch.randn(30, generator=gen, dtype=torch.float64) * 0.1
    a = torch.rand(40, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(30, generator=gen, dtype=torch.float64) + 0.1
    opts = dict(eps=2.0, a=a, b=b, cost_scale=0.5)
    P = PlanOperator(x, y, f, g, **opts).to_dense()
    expected = 2 * 0.5 * (P.sum(1, keepdim=True) * x - P @ y)
    torch.testing.assert_close(transport_gradient(x, y, f, g, **opts), expected, rtol=1e-10, atol=1e-12)
    # transposed roles give the gradient w.r.t. y
    expected_y = 2 * 0.5 * (P.sum(0)[:, None] * y - P.T @ x)
    torch.testing.assert_close(transport_gradient(y, x, g, f, eps=2.0, a=b, b=a, cost_scale=0.5), expected_y,
                               rtol=1e-10, atol=1e-12)
    # float32: the centring keeps the error at float32 level although |x| ~ 87
    got32 = transport_gradient(x.float(), y.float(), f.float(), g.float(), eps=2.0, a=a.float(), b=b.float(),
                               cost_scale=0.5)
    err = float((got32.double() - expected).norm() / expected.norm())
    assert err < 5e-6, err  # the uncentred formula gives 1.2e-5 here


def test_products_take_the_weights_logarithms_once_and_follow_in_place_changes(count_calls):
    """A product that nothing records reuses the logarithms of the plan's weights; an in-place
    change of a weight is seen by the next product (the plan of the new weights)."""
    import otlinop.plan as plan_module

    x, y, f, g, a, b = _data(9, 7, 2, weights=True)
    P = PlanOperator(x, y, f, g, eps=0.5, a=a, b=b)
    v = torch.randn(7, dtype=F64)
    first = P @ v
    calls = count_calls(plan_module.torch, "log")
    assert torch.equal(P @ v, first) and calls["log"] == 0
    with torch.no_grad():
        a.mul_(2.0)
    dense = torch.exp((f[:, None] + g[None, :] - ((x[:, None] - y[None]) ** 2).sum(-1)) / 0.5) * a[:, None] * b
    torch.testing.assert_close(P @ v, dense @ v, rtol=1e-12, atol=0)
    assert calls["log"] == 2
