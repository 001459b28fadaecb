"""Every mapping of docs/conventions.md, checked against the peer it names.

Each test computes a peer's number (GeomLoss, POT, OTT-JAX) and reproduces it
with otlinop as the page says, in float64 on the CPU, at converged solutions.
A test skips, with the reason, when its peer is not installed (they are in the
``test`` extra). flash-sinkhorn needs CUDA: its test runs on a GPU only.
"""

import math

import numpy as np
import pytest
import torch

import otlinop

F64 = torch.float64
#: Relative tolerance of float64 parity at converged solutions (observed ~1e-13; the
#: solvers' own stopping thresholds, 1e-12 and below, set the floor).
RTOL = 1e-8


def _f64(u):
    if isinstance(u, torch.Tensor):
        return u.detach().to(F64)
    return torch.from_numpy(np.array(u, dtype=np.float64))   # a copy: jax's arrays are read-only


def rel(u, v):
    u, v = _f64(u), _f64(v)
    return float((u - v).norm() / v.norm().clamp_min(1e-300))


def clouds(n=40, m=30, d=2, *, seed=0, mass_b=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=F64)
    y = torch.rand(m, d, generator=gen, dtype=F64) * 0.8 + 0.3
    a = torch.rand(n, generator=gen, dtype=F64) + 0.2
    b = torch.rand(m, generator=gen, dtype=F64) + 0.2
    return x, y, a / a.sum(), mass_b * b / b.sum()


def transport_cost(res):
    """``<P, C>``, the transport cost of the plan alone (docs/conventions.md), in two streaming passes."""
    P, x, y = res.plan, res.x, res.y
    return res.cost_scale * (P.row_sums() @ (x * x).sum(1) + P.col_sums() @ (y * y).sum(1)
                             - 2 * (x * (P @ y)).sum())


def converged(x, y, a, b, eps, **kw):
    """otlinop's converged solution at a fixed eps (the page's recipe for POT and OTT)."""
    res = otlinop.sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-13, max_iter=100_000, **kw)
    assert res.converged, res.marginal_error[-1]
    return res


# --------------------------------------------------------------------------
# GeomLoss
# --------------------------------------------------------------------------
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("reach", [None, 0.7])
def test_geomloss_samplesloss_same_arguments_same_value_and_gradient(debias, reach):
    geomloss = pytest.importorskip("geomloss")
    x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.2)
    kw = dict(p=2, blur=0.1, scaling=0.7, debias=debias, reach=reach)
    xo = x.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    ours = otlinop.SamplesLoss("sinkhorn", **kw)(a, xo, b, y)
    theirs = geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kw)(a, xg, b, y)
    assert rel(ours.detach(), theirs.detach()) < RTOL
    (go,), (gg,) = torch.autograd.grad(ours, xo), torch.autograd.grad(theirs, xg)
    if reach is None:
        assert rel(go, gg) < RTOL
    else:
        # docs/conventions.md: GeomLoss' unbalanced point gradients carry (rho + eps/2)/(rho + eps).
        rho, eps = reach ** 2, 0.1 ** 2
        assert rel(go * (rho + eps / 2) / (rho + eps), gg) < RTOL


@pytest.mark.parametrize("debias", [True, False])
def test_geomloss_potentials(debias):
    geomloss = pytest.importorskip("geomloss")
    x, y, a, b = clouds()
    kw = dict(p=2, blur=0.1, debias=debias, potentials=True)
    F, G = otlinop.SamplesLoss("sinkhorn", **kw)(a, x, b, y)
    Fg, Gg = geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kw)(a, x, b, y)
    assert rel(F, Fg.reshape(F.shape)) < RTOL and rel(G, Gg.reshape(G.shape)) < RTOL


def test_geomloss_custom_full_cost_is_cost_scale_one():
    geomloss = pytest.importorskip("geomloss")
    x, y, a, b = clouds()

    def full_cost(u, v):   # |x - y|^2, batched as GeomLoss' tensorized backend calls it
        return ((u[:, :, None, :] - v[:, None, :, :]) ** 2).sum(-1)

    theirs = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.1, cost=full_cost, backend="tensorized")(a, x, b, y)
    ours = otlinop.SamplesLoss("sinkhorn", p=2, blur=0.1, cost_scale=1.0)(a, x, b, y)
    assert rel(ours, theirs) < RTOL


def test_samplesloss_without_debias_is_sinkhorn_cost():
    """``SamplesLoss(debias=False)`` is ``sinkhorn(..., threshold=inf).cost``: the same schedule
    alone (``sinkhorn`` would continue at the final eps until its threshold) and cost."""
    x, y, a, b = clouds()
    value = otlinop.SamplesLoss("sinkhorn", p=2, blur=0.1, debias=False)(a, x, b, y)
    res = otlinop.sinkhorn(x, y, a, b, blur=0.1, cost_scale=0.5, threshold=math.inf)
    assert rel(value, res.cost) < 1e-12


def test_blur_and_cost_scale_rescale_one_problem():
    """OT_eps for c|x-y|^2 is c times OT_{eps/c} for |x-y|^2: the page's cost conversion."""
    x, y, a, b = clouds()
    half = converged(x, y, a, b, 0.01, cost_scale=0.5)
    full = converged(x, y, a, b, 0.02, cost_scale=1.0)
    assert rel(half.cost, 0.5 * full.cost) < RTOL
    assert rel(half.plan.to_dense(), full.plan.to_dense()) < RTOL


# --------------------------------------------------------------------------
# POT
# --------------------------------------------------------------------------
def test_pot_sinkhorn_plan_and_scalings():
    ot = pytest.importorskip("ot")
    x, y, a, b = clouds()
    eps = 0.02
    M = ot.dist(x.numpy(), y.numpy())      # 'sqeuclidean': |x - y|^2, otlinop's cost_scale=1
    P, log = ot.sinkhorn(a.numpy(), b.numpy(), M, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-14,
                         log=True)
    res = converged(x, y, a, b, eps)
    assert rel(res.plan.to_dense(), P) < RTOL
    # log_u = (f + eps log a) / eps, log_v = (g + eps log b) / eps, up to the gauge (f + t, g - t).
    f = eps * torch.from_numpy(log["log_u"]) - eps * torch.log(a)
    g = eps * torch.from_numpy(log["log_v"]) - eps * torch.log(b)
    t = float((f - res.f).mean())
    assert rel(res.f + t, f) < RTOL and rel(res.g - t, g) < RTOL


def test_pot_sinkhorn2_is_the_transport_cost_not_res_cost():
    ot = pytest.importorskip("ot")
    x, y, a, b = clouds()
    eps = 0.02
    M = ot.dist(x.numpy(), y.numpy())
    value = float(ot.sinkhorn2(a.numpy(), b.numpy(), M, eps, method="sinkhorn_log", numItermax=100_000,
                               stopThr=1e-14))
    res = converged(x, y, a, b, eps)
    assert rel(transport_cost(res), value) < RTOL
    # res.cost adds the entropic term eps KL(P | a x b): the two differ by far more than the tolerance.
    P = res.plan.to_dense()
    kl = (P * torch.log(P / (a[:, None] * b[None, :]))).sum()
    assert rel(res.cost, value + eps * kl) < RTOL and rel(res.cost, value) > 0.1


@pytest.mark.parametrize("lazy", [False, True])
def test_pot_empirical_sinkhorn2(lazy):
    ot = pytest.importorskip("ot")
    x, y, a, b = clouds()
    eps = 0.05
    value = ot.bregman.empirical_sinkhorn2(x.numpy(), y.numpy(), eps, a=a.numpy(), b=b.numpy(), numIterMax=100_000,
                                           stopThr=1e-13, isLazy=lazy, batchSize=16)
    res = converged(x, y, a, b, eps)
    assert rel(transport_cost(res), float(np.sum(value))) < RTOL


def test_pot_empirical_sinkhorn_divergence_combines_transport_costs():
    """POT's divergence debiases <P, C>; otlinop's SamplesLoss debiases the entropic values: two numbers."""
    ot = pytest.importorskip("ot")
    x, y, a, b = clouds()
    eps = 0.05
    value = ot.bregman.empirical_sinkhorn_divergence(x.numpy(), y.numpy(), eps, a=a.numpy(), b=b.numpy(),
                                                     numIterMax=100_000, stopThr=1e-13)
    xy, xx, yy = converged(x, y, a, b, eps), converged(x, x, a, a, eps), converged(y, y, b, b, eps)
    assert rel(transport_cost(xy) - (transport_cost(xx) + transport_cost(yy)) / 2, float(value)) < 1e-7
    assert rel(xy.cost - (xx.cost + yy.cost) / 2, float(value)) > 1e-2


@pytest.mark.parametrize("reach_x, reach_y", [(0.7, 0.7), (None, 0.6), (0.5, None)])
def test_pot_unbalanced_kl(reach_x, reach_y):
    ot = pytest.importorskip("ot")
    x, y, a, b = clouds(mass_b=1.3)
    eps = 0.03
    rho = lambda r: math.inf if r is None else r * r  # noqa: E731
    M = ot.dist(x.numpy(), y.numpy())
    opts = dict(reg_type="kl", numItermax=200_000, stopThr=1e-15)
    P = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), M, eps, (rho(reach_x), rho(reach_y)), **opts)
    linear = ot.unbalanced.sinkhorn_unbalanced2(a.numpy(), b.numpy(), M, eps, (rho(reach_x), rho(reach_y)),
                                                returnCost="linear", **opts)
    res = converged(x, y, a, b, eps, reach_x=reach_x, reach_y=reach_y)
    assert rel(res.plan.to_dense(), P) < 1e-7
    assert rel(transport_cost(res), float(linear)) < 1e-7
    # res.cost is GeomLoss' unbalanced value: the primal objective plus eps ((m_a + m_b)/2 - m_a m_b).
    Pt = torch.from_numpy(P)

    def kl(p, q):
        return (p * torch.log(p / q) - p + q).sum()

    primal = float(linear) + eps * kl(Pt, a[:, None] * b[None, :])
    for r, marginal, w in ((reach_x, Pt.sum(1), a), (reach_y, Pt.sum(0), b)):
        if r is not None:
            primal = primal + r * r * kl(marginal, w)
    ma, mb = a.sum(), b.sum()
    assert rel(res.cost, primal + eps * ((ma + mb) / 2 - ma * mb)) < 1e-7


# --------------------------------------------------------------------------
# OTT-JAX
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ott():
    jax = pytest.importorskip("jax", reason="OTT-JAX needs jax (pip install ott-jax)")
    jax.config.update("jax_enable_x64", True)
    pytest.importorskip("ott", reason="pip install ott-jax")
    import jax.numpy as jnp
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn
    return jnp, pointcloud, linear_problem, sinkhorn


def test_ott_balanced_sinkhorn(ott):
    jnp, pointcloud, linear_problem, sinkhorn = ott
    x, y, a, b = clouds()
    eps = 0.05
    geom = pointcloud.PointCloud(jnp.asarray(x.numpy()), jnp.asarray(y.numpy()), epsilon=eps)  # |x - y|^2
    out = sinkhorn.Sinkhorn(threshold=1e-12, max_iterations=100_000)(
        linear_problem.LinearProblem(geom, a=jnp.asarray(a.numpy()), b=jnp.asarray(b.numpy())))
    assert bool(out.converged)
    res = converged(x, y, a, b, eps)
    assert rel(res.plan.to_dense(), np.asarray(out.matrix)) < RTOL
    # OTT's potentials fold the weights in: f_ott = f + eps log a (up to the gauge).
    f_ott = res.f + eps * torch.log(a)
    g_ott = res.g + eps * torch.log(b)
    t = float((_f64(out.f) - f_ott).mean())
    assert rel(f_ott + t, np.asarray(out.f)) < RTOL and rel(g_ott - t, np.asarray(out.g)) < RTOL
    assert rel(res.cost, float(out.reg_ot_cost)) < RTOL           # <P, C> + eps KL(P | a x b)
    assert rel(transport_cost(res), float(out.primal_cost)) < RTOL  # <P, C>
    # ent_reg_cost = <P, C> - eps H(P) = reg_ot_cost - eps (H(a) + H(b)), H(a) = -sum a log a.
    entropy = -(a * torch.log(a)).sum() - (b * torch.log(b)).sum()
    assert rel(res.cost - eps * entropy, float(out.ent_reg_cost)) < RTOL


def test_ott_default_epsilon(ott):
    """PointCloud's default epsilon is 0.05 times the standard deviation of the cost matrix."""
    jnp, pointcloud, _, _ = ott
    x, y, _, _ = clouds()
    geom = pointcloud.PointCloud(jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    assert rel(0.05 * C.std(unbiased=False), float(geom.epsilon)) < 1e-10


# POT says that reg_type="entropy" replaces the reference measure by ones: that is the point here.
@pytest.mark.filterwarnings("ignore:If reg_type = entropy:UserWarning")
def test_ott_unbalanced_is_another_problem(ott):
    """OTT's tau_a, tau_b regularise with the entropy of P (POT's reg_type="entropy"); otlinop, GeomLoss
    and POT's reg_type="kl" with KL(P | a x b). The page says otlinop cannot reproduce it: check both claims."""
    jnp, pointcloud, linear_problem, sinkhorn = ott
    ot = pytest.importorskip("ot")
    x, y, a, b = clouds(mass_b=1.3)
    eps, reach = 0.05, 0.7
    rho = reach ** 2
    tau = rho / (rho + eps)
    geom = pointcloud.PointCloud(jnp.asarray(x.numpy()), jnp.asarray(y.numpy()), epsilon=eps)
    out = sinkhorn.Sinkhorn(threshold=1e-12, max_iterations=100_000)(linear_problem.LinearProblem(
        geom, a=jnp.asarray(a.numpy()), b=jnp.asarray(b.numpy()), tau_a=tau, tau_b=tau))
    M = ot.dist(x.numpy(), y.numpy())
    P_entropy = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), M, eps, rho, reg_type="entropy",
                                                  numItermax=200_000, stopThr=1e-15)
    assert rel(np.asarray(out.matrix), P_entropy) < 1e-7
    ours = converged(x, y, a, b, eps, reach=reach).plan.to_dense()
    assert rel(ours, np.asarray(out.matrix)) > 1e-2


# --------------------------------------------------------------------------
# flash-sinkhorn (CUDA only)
# --------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-sinkhorn runs on CUDA only")
@pytest.mark.parametrize("debias", [False, True])
def test_gpu_flash_sinkhorn_samplesloss(debias):
    flash = pytest.importorskip("flash_sinkhorn", reason="pip install flash-sinkhorn")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, generator=gen).cuda()
    y = (torch.randn(1500, 3, generator=gen) + 0.5).cuda()
    # flash-sinkhorn's defaults: cost |x - y|^2 (half_cost=False), debias=False, TF32 dots (allow_tf32=True).
    theirs = flash.SamplesLoss("sinkhorn", blur=0.1, scaling=0.7, debias=debias, allow_tf32=False)(x, y)
    ours = otlinop.SamplesLoss("sinkhorn", blur=0.1, scaling=0.7, debias=debias, cost_scale=1.0,
                               precision="ieee")(x, y)
    reference = otlinop.SamplesLoss("sinkhorn", blur=0.1, scaling=0.7, debias=debias, cost_scale=1.0)(
        x.double(), y.double())
    # float32 against float32, each about 1e-6 from the float64 value at this size.
    assert rel(ours.double().cpu(), reference.cpu()) < 1e-4
    assert rel(theirs.double().cpu(), reference.cpu()) < 1e-4
    F, G = flash.SamplesLoss("sinkhorn", blur=0.1, scaling=0.7, potentials=True, allow_tf32=False)(x, y)
    Fo, Go = otlinop.SamplesLoss("sinkhorn", blur=0.1, scaling=0.7, debias=False, potentials=True,
                                 cost_scale=1.0, precision="ieee")(x, y)
    assert rel(F.double().cpu().flatten(), Fo.double().cpu()) < 1e-4
    assert rel(G.double().cpu().flatten(), Go.double().cpu()) < 1e-4
