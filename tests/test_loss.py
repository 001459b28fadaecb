"""Tests of otlinop.loss: SamplesLoss against GeomLoss (values, potentials,
gradients), gradients against finite differences, batching, backends, errors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from otlinop._checks import Inputs  # noqa: E402
from otlinop._loss_derivatives import Solution, Spec, point_grad, sinkhorn_grad, solve  # noqa: E402
from otlinop.loss import SamplesLoss, sinkhorn_loss  # noqa: E402
from otlinop.sinkhorn import epsilon_schedule, sinkhorn  # noqa: E402



class _Lazy:
    """A module imported on first use: tests that need it skip when it is missing
    (the GPU machine has no GeomLoss)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("_"):   # pytest's collection probes module globals
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self._name), attr)


geomloss = _Lazy("geomloss")

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from conftest import requires_cuda  # noqa: E402
RTOL64 = 1e-6



def rel(u, v):
    u, v = (torch.as_tensor(t).detach().to(F64) for t in (u, v))
    return float((u - v).norm() / v.norm().clamp_min(1e-300))


def clouds(n=50, m=40, d=2, *, batch=None, dtype=F64, seed=0, mass_b=1.0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    x = torch.rand(lead + (n, d), generator=gen, dtype=dtype)
    y = torch.rand(lead + (m, d), generator=gen, dtype=dtype) * 0.8 + 0.3
    a = torch.rand(lead + (n,), generator=gen, dtype=dtype) + 0.2
    b = torch.rand(lead + (m,), generator=gen, dtype=dtype) + 0.2
    return x, y, a / a.sum(-1, keepdim=True), mass_b * b / b.sum(-1, keepdim=True)


def geomloss_loss(cost_scale=0.5, **kw):
    cost = None
    if cost_scale != 0.5:
        def cost(u, v):
            return cost_scale * ((u[:, :, None, :] - v[:, None, :, :]) ** 2).sum(-1)
    return geomloss.SamplesLoss("sinkhorn", p=2, backend="tensorized", cost=cost, **kw)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# --------------------------------------------------------------------------
# Parity with GeomLoss
# --------------------------------------------------------------------------
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("reach", [None, 0.5])
@pytest.mark.parametrize("cost_scale", [0.5, 1.0])
def test_value_and_gradients_match_geomloss(debias, reach, cost_scale):
    x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.3)
    blur = 0.08
    ours_in, theirs_in = leaves(a, x, b, y), leaves(a, x, b, y)
    ours = SamplesLoss("sinkhorn", p=2, blur=blur, reach=reach, debias=debias,
                       cost_scale=None if cost_scale == 0.5 else cost_scale)(*ours_in)
    theirs = geomloss_loss(cost_scale, blur=blur, reach=reach, debias=debias)(*theirs_in)
    assert ours.shape == theirs.shape == ()
    assert rel(ours, theirs) < RTOL64
    ours.backward()
    theirs.backward()
    # GeomLoss 0.3.1's autograd scales the unbalanced point gradients by its forward factor
    # rho + eps/2 (its UnbalancedWeight.backward is never called by autograd); ours are the
    # derivatives of the value, with rho + eps (checked against finite differences below).
    eps = blur ** 2
    k = 1.0 if reach is None else (reach ** 2 + eps / 2) / (reach ** 2 + eps)
    for name, o, t in (("x", ours_in[1], theirs_in[1]), ("y", ours_in[3], theirs_in[3])):
        assert rel(k * o.grad, t.grad) < RTOL64, name
    if reach is None:
        for name, o, t in (("a", ours_in[0], theirs_in[0]), ("b", ours_in[2], theirs_in[2])):
            assert rel(o.grad, t.grad) < RTOL64, name


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("reach", [None, 0.5])
def test_potentials_match_geomloss(debias, reach):
    x, y, a, b = clouds()
    kw = dict(blur=0.1, reach=reach, debias=debias, potentials=True)
    F, G = SamplesLoss(**kw)(a[:, None], x, b[:, None], y)
    Fg, Gg = geomloss_loss(**kw)(a[:, None], x, b[:, None], y)
    # Shaped like the weights (GeomLoss' documented behaviour; its tensorized
    # backend returns (1, N) for unbatched inputs).
    assert F.shape == (50, 1) and G.shape == (40, 1)
    assert rel(F, Fg.reshape(F.shape)) < RTOL64 and rel(G, Gg.reshape(G.shape)) < RTOL64
    assert not F.requires_grad


def test_batched_matches_geomloss_and_per_item():
    x, y, a, b = clouds(30, 25, batch=3)
    L = SamplesLoss(blur=0.1, diameter=2.0)
    xs = leaves(x)[0]
    values = L(a, xs, b[..., None], y)
    assert values.shape == (3,)
    values.sum().backward()
    xg = leaves(x)[0]
    ref = geomloss_loss(blur=0.1, diameter=2.0)(a, xg, b, y)
    ref.sum().backward()
    assert rel(values, ref) < RTOL64 and rel(xs.grad, xg.grad) < RTOL64
    for i in range(3):
        xi = leaves(x[i])[0]
        vi = L(a[i], xi, b[i], y[i])
        vi.backward()
        assert rel(vi, values[i]) < 1e-12 and rel(xi.grad, xs.grad[i]) < 1e-12


def test_uniform_weights_and_functional_form():
    x, y, _, _ = clouds()
    v1 = SamplesLoss(blur=0.1)(x, y)
    v2 = sinkhorn_loss(x, y, blur=0.1)
    v3 = geomloss_loss(blur=0.1)(x, y)
    assert rel(v1, v3) < RTOL64 and rel(v2, v3) < RTOL64
    F, G = sinkhorn_loss(x, y, blur=0.1, potentials=True)
    assert F.shape == (50,) and G.shape == (40,)


def test_float32_matches_geomloss():
    x, y, a, b = (t.float() for t in clouds(80, 70))
    xo, xg = leaves(x, x)
    ours = SamplesLoss(blur=0.1)(a, xo, b, y)
    theirs = geomloss_loss(blur=0.1)(a, xg, b, y)
    ours.backward()
    theirs.backward()
    assert ours.dtype == torch.float32
    assert rel(ours, theirs) < 1e-4 and rel(xo.grad, xg.grad) < 1e-4


# --------------------------------------------------------------------------
# Gradients against finite differences of the converged value
# --------------------------------------------------------------------------
def _converged(x, y, a, b, eps, reach_x, reach_y):
    return sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-14, max_iter=100_000,
                    reach_x=reach_x, reach_y=reach_y, cost_scale=0.5, check_every=5)


@pytest.mark.parametrize("reach_x, reach_y, debias", [
    (None, None, False), (None, None, True), (0.6, 0.6, False), (0.6, 0.6, True), (None, 0.6, False),
])
def test_gradient_formulas_against_finite_differences(reach_x, reach_y, debias):
    """The gradient map at converged potentials is the derivative of the converged value."""
    x, y, a, b = clouds(20, 16, mass_b=1.0 if reach_y is None else 1.3)
    eps = 0.05

    def value(x, y, a, b):
        v = _converged(x, y, a, b, eps, reach_x, reach_y).cost
        if debias:
            v = v - _converged(x, x, a, a, eps, reach_x, reach_x).cost / 2
            v = v - _converged(y, y, b, b, eps, reach_y, reach_y).cost / 2
        return float(v)

    r = _converged(x, y, a, b, eps, reach_x, reach_y)
    sol = Solution(r.f[None], r.g[None], r.f[None], r.g[None])
    if debias:
        raa = _converged(x, x, a, a, eps, reach_x, reach_x)
        rbb = _converged(y, y, b, b, eps, reach_y, reach_y)
        sol.f_aa, sol.f_aa_pre, sol.g_bb, sol.g_bb_pre = raa.f[None], raa.g[None], rbb.f[None], rbb.g[None]
    rho = lambda t: None if t is None else t * t  # noqa: E731
    spec = Spec((eps,), eps, rho(reach_x), rho(reach_y), debias, 0.5, None, None)
    grads = sinkhorn_grad(x[None], y[None], a[None], b[None], sol, spec, (True, True, True, True))

    h = 1e-5
    gen = torch.Generator().manual_seed(1)
    balanced = reach_x is None and reach_y is None
    for k, G in enumerate(grads):
        args = [x, y, a, b]
        direction = torch.randn(args[k].shape, generator=gen, dtype=F64)
        if balanced and k >= 2:
            direction -= direction.mean()      # balanced: mass-preserving weight perturbations only
        plus = [t + h * direction if i == k else t for i, t in enumerate(args)]
        minus = [t - h * direction if i == k else t for i, t in enumerate(args)]
        fd = (value(*plus) - value(*minus)) / (2 * h)
        analytic = float((G[0] * direction).sum())
        assert abs(fd - analytic) <= 1e-7 * max(1.0, abs(analytic)), (k, fd, analytic)


# --------------------------------------------------------------------------
# Autograd plumbing
# --------------------------------------------------------------------------
def test_only_requested_gradients_are_computed():
    x, y, a, b = clouds()
    ai, xi = leaves(a, x)
    value = SamplesLoss(blur=0.1)(ai, xi, b, y)
    value.backward()
    assert xi.grad is not None and ai.grad is not None
    (ai,) = leaves(a)
    SamplesLoss(blur=0.1)(ai, x, b, y).backward()
    assert ai.grad.shape == (50,)
    # The gradient map at the loss's solution, its plan passes counted through its point_grad argument.
    calls = []

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return point_grad(*args, **kw)

    spec = Spec(tuple(epsilon_schedule(1.0, 0.1, 0.5)), 0.01, None, None, True, 0.5, None, None)
    sol = solve(Inputs(x[None], y[None], a[None], b[None], batched=True), spec)
    data = (x[None], y[None], a[None], b[None])
    # x and its debiasing term: two passes, none for y.
    grads = sinkhorn_grad(*data, sol, spec, (True, False, True, False), point_grad=counting)
    assert calls == [(1, 50, 2), (1, 50, 2)] and grads[1] is None and grads[3] is None
    calls.clear()
    grads = sinkhorn_grad(*data, sol, spec, (False, False, True, False), point_grad=counting)
    assert calls == [] and grads[2].shape == (1, 50)
    grads = sinkhorn_grad(*data, sol, spec, (False, True, False, False), point_grad=counting)
    assert calls == [(1, 40, 2), (1, 40, 2)] and grads[0] is None


def test_double_backward():
    """Second derivatives in the points work (their values: tests/test_double_backward.py);
    those that involve the weights raise rather than return a wrong answer."""
    x, y, a, b = clouds()
    v = torch.randn_like(x)
    (xi,) = leaves(x)
    L = SamplesLoss(blur=0.1)
    value = L(a, xi, b, y)
    (g,) = torch.autograd.grad(value, xi, create_graph=True)
    (H,) = torch.autograd.grad((g * v).sum(), xi)
    assert H.shape == x.shape and bool(torch.isfinite(H).all()) and not H.requires_grad
    assert L.last_hvp_solve is not None and L.last_hvp_solve.converged
    # Weights that require grad: fine w.r.t. the points, the mixed derivatives raise when requested.
    ai, xi = leaves(a, x)
    (g,) = torch.autograd.grad(SamplesLoss(blur=0.1)(ai, xi, b, y), xi, create_graph=True)
    (H2,) = torch.autograd.grad((g * v).sum(), xi, retain_graph=True)
    assert rel(H2, H) < 1e-12
    with pytest.raises(NotImplementedError, match="second derivatives of the Sinkhorn loss that involve the "
                                                  "weights"):
        torch.autograd.grad((g * v).sum(), (xi, ai))
    # Without create_graph the gradient carries no graph.
    (xi,) = leaves(x)
    (g,) = torch.autograd.grad(SamplesLoss(blur=0.1)(a, xi, b, y), xi)
    assert not g.requires_grad


@pytest.mark.parametrize("m", [20, 24])   # n = m stacks the debiasing problems
def test_triton_interpreter_matches_torch(m):
    # On a GPU machine the same small problem runs compiled.
    x, y, a, b = (t.to(DEVICE) for t in clouds(24, m, d=3, batch=2, dtype=torch.float32))
    results = {}
    for backend in ("torch", "triton"):
        xi, bi = leaves(x, b)
        v = SamplesLoss(blur=0.5, reach=1.0, backend=backend)(a, xi, bi, y)
        v.sum().backward()
        results[backend] = (v.detach(), xi.grad, bi.grad)
    for u, t in zip(results["triton"], results["torch"]):
        assert rel(u, t) < 1e-5


@requires_cuda
def test_gpu_triton_matches_torch_large():
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d = 50_000, 64
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    out = {}
    for backend in ("triton", "torch"):
        xi = x.clone().requires_grad_()
        v = SamplesLoss(blur=1.0, backend=backend)(xi, y)
        v.backward()
        F, G = SamplesLoss(blur=1.0, backend=backend, potentials=True)(x, y)
        out[backend] = (v.detach(), xi.grad, F, G)
    for u, t in zip(out["triton"], out["torch"]):
        assert rel(u, t) < 1e-4


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def test_errors():
    x, y, a, b = clouds(10, 8)
    with pytest.raises(NotImplementedError, match="only loss='sinkhorn'"):
        SamplesLoss("energy")
    with pytest.raises(NotImplementedError, match="only p=2"):
        SamplesLoss(p=1)
    with pytest.raises(NotImplementedError, match="pass cost_scale=c"):
        SamplesLoss(cost=lambda u, v: u)
    with pytest.raises(ValueError, match="blur must be positive"):
        SamplesLoss(blur=0)
    with pytest.raises(ValueError, match=r"scaling must be in \(0, 1\)"):
        SamplesLoss(scaling=1.0)
    with pytest.raises(ValueError, match="backend must be None or 'auto'"):
        SamplesLoss(backend="keops")
    with pytest.raises(TypeError, match="debias must be True or False"):
        SamplesLoss(debias="yes")
    with pytest.warns(UserWarning, match="cluster_scale is ignored without backend='multiscale'"):
        SamplesLoss(blur=0.3, cluster_scale=0.1)
    L = SamplesLoss(blur=0.3)
    with pytest.raises(NotImplementedError, match="cluster labels"):
        L(None, a, x, None, b, y)
    with pytest.raises(TypeError, match="expected loss"):
        L(a, x, y)
    with pytest.raises(ValueError, match="equal total masses"):
        L(a, x, 2 * b, y)
    with pytest.raises(ValueError, match="same dimension d"):
        L(x, torch.rand(8, 3, dtype=F64))
    with pytest.raises(TypeError, match="b has dtype torch.float32"):
        L(a, x, b.float(), y)
    with pytest.raises(ValueError, match="empty point cloud"):
        L(x, y[:0])
    with pytest.raises(ValueError, match="negative entries"):
        L(a, x, -b, y)
    with pytest.raises(NotImplementedError, match="only p=2"):
        sinkhorn_loss(x, y, p=1)
