"""Tests of otlinop.sinkhorn: parity with GeomLoss and POT, batching, options, errors.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (set before triton is
imported: here and in conftest.py).
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from otlinop import ConvergenceWarning, config  # noqa: E402
from otlinop.sinkhorn import SinkhornResult, epsilon_schedule, sinkhorn  # noqa: E402



class _Lazy:
    """A module imported on first use: tests that need it skip when it is missing
    (the GPU machine has neither GeomLoss nor POT)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("_"):   # pytest's collection probes module globals
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self._name), attr)


geomloss = _Lazy("geomloss")
ot = _Lazy("ot")

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from conftest import FakeGraphs, requires_cuda  # noqa: E402

#: Relative tolerance of the float64 parity tests (the algorithms are identical,
#: observed errors are ~1e-14).
RTOL64 = 1e-6
#: float32 against a float64 reference.
RTOL32 = 2e-4
#: No convergence target: "symmetric" runs its schedule alone, GeomLoss' fixed count.
GEOMLOSS = dict(threshold=math.inf)



def rel(u, v):
    u, v = torch.as_tensor(u, dtype=F64), torch.as_tensor(v, dtype=F64)
    return float((u - v).norm() / v.norm().clamp_min(1e-300))


def clouds(n=60, m=50, d=2, *, batch=None, dtype=F64, seed=0, weights=True, mass_b=1.0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    x = torch.rand(lead + (n, d), generator=gen, dtype=dtype)
    y = torch.rand(lead + (m, d), generator=gen, dtype=dtype) * 0.8 + 0.3
    if not weights:
        return x, y, None, None
    a = torch.rand(lead + (n,), generator=gen, dtype=dtype) + 0.2
    b = torch.rand(lead + (m,), generator=gen, dtype=dtype) + 0.2
    a = a / a.sum(-1, keepdim=True)
    b = mass_b * b / b.sum(-1, keepdim=True)
    return x, y, a, b


def sqdist(x, y):
    return ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)


def geomloss_potentials(x, y, a, b, *, blur, reach=None, scaling=0.5, cost_scale=0.5, diameter=None):
    cost = None if cost_scale == 0.5 else (lambda u, v: cost_scale * sqdist(u, v))
    L = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, reach=reach, scaling=scaling, debias=False,
                             potentials=True, backend="tensorized", cost=cost, diameter=diameter)
    return L(a, x, b, y)


def geomloss_value(x, y, a, b, *, blur, reach=None, scaling=0.5, cost_scale=0.5):
    cost = None if cost_scale == 0.5 else (lambda u, v: cost_scale * sqdist(u, v))
    L = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, reach=reach, scaling=scaling, debias=False,
                             backend="tensorized", cost=cost)
    return L(a, x, b, y)


# --------------------------------------------------------------------------
# Symmetric method against GeomLoss
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cost_scale", [0.5, 1.0])
@pytest.mark.parametrize("reach", [None, 0.4])
@pytest.mark.parametrize("scaling", [0.5, 0.8])
def test_symmetric_matches_geomloss(cost_scale, reach, scaling):
    x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.4)
    res = sinkhorn(x, y, a, b, blur=0.07, scaling=scaling, cost_scale=cost_scale, reach=reach, **GEOMLOSS)
    F, G = geomloss_potentials(x, y, a, b, blur=0.07, reach=reach, scaling=scaling, cost_scale=cost_scale)
    value = geomloss_value(x, y, a, b, blur=0.07, reach=reach, scaling=scaling, cost_scale=cost_scale)
    assert rel(res.f, F) < RTOL64 and rel(res.g, G) < RTOL64
    assert rel(res.cost, value) < RTOL64
    assert res.eps == pytest.approx(0.07 ** 2, rel=1e-15)
    assert res.n_iter == len(epsilon_schedule(res.eps_schedule[0] ** 0.5, 0.07, scaling))


def test_symmetric_default_weights_and_eps_argument():
    x, y, _, _ = clouds(weights=False)
    res = sinkhorn(x, y, eps=0.01, **GEOMLOSS)     # blur = sqrt(eps) = 0.1
    F, G = geomloss_potentials(x, y, torch.full((60,), 1 / 60, dtype=F64), torch.full((50,), 1 / 50, dtype=F64),
                               blur=0.1)
    assert res.cost_scale == 1.0
    res_half = sinkhorn(x, y, eps=0.01, cost_scale=0.5, **GEOMLOSS)
    assert rel(res_half.f, F) < RTOL64 and rel(res_half.g, G) < RTOL64
    assert torch.allclose(res.a, torch.full((60,), 1 / 60, dtype=F64))
    assert res.f.shape == (60,) and res.g.shape == (50,)


def test_epsilon_schedule_matches_geomloss():
    pytest.importorskip("geomloss")
    from geomloss._legacy.sinkhorn_divergence import epsilon_schedule as gl_schedule
    for diameter, blur, scaling in [(3.0, 0.05, 0.5), (1.3, 0.1, 0.9), (0.05, 0.05, 0.5), (0.02, 0.05, 0.5)]:
        ours = epsilon_schedule(diameter, blur, scaling)
        theirs = gl_schedule(2, diameter, blur, scaling)
        assert len(ours) == len(theirs)
        np.testing.assert_allclose(ours, theirs, rtol=1e-13)


def test_symmetric_records_errors_and_calls_back():
    x, y, a, b = clouds()
    seen = []
    res = sinkhorn(x, y, a, b, blur=0.05, check_every=2, callback=seen.append, verbose=True, **GEOMLOSS)
    n = len(res.eps_schedule)
    assert res.n_iter == n
    # Every second step, then the end of the schedule (a refining call checks there), whose
    # record is the final one (the loop stopped there: threshold=inf).
    assert [s["iteration"] for s in seen] == list(range(2, n, 2)) + [n]
    assert len(res.marginal_error_history) == len(seen)
    assert all(isinstance(e, float) for e in res.marginal_error_history)
    assert res.marginal_error_history == [s["marginal_error"] for s in seen]
    assert isinstance(res.marginal_error, float) and res.marginal_error == res.marginal_error_history[-1]
    assert set(seen[0]) == {"method", "iteration", "eps", "marginal_error", "f", "g"}
    assert seen[-1]["eps"] == res.eps
    assert res.f_pre is not None and res.g_pre is not None
    # The last error is that of the pre-extrapolation state: far from converged after the
    # schedule alone, which threshold=inf accepts.
    assert res.converged and res.marginal_error > 1e-2 and res.status.startswith("converged")
    slow = sinkhorn(x, y, a, b, blur=0.5, scaling=0.95, threshold=1e-2, max_iter=len(
        sinkhorn(x, y, a, b, blur=0.5, scaling=0.95, **GEOMLOSS).eps_schedule))
    assert slow.converged and slow.marginal_error < 1e-2
    assert "SinkhornResult(" in repr(slow)


def test_symmetric_warm_start():
    x, y, a, b = clouds()
    ref = sinkhorn(x, y, a, b, eps=0.01, method="alternating", threshold=1e-12)
    # diameter = blur: no annealing; starting at the solution keeps it.
    res = sinkhorn(x, y, a, b, eps=0.01, diameter=0.1, f0=ref.f, g0=ref.g)
    assert res.eps_schedule == pytest.approx([0.01, 0.01], rel=1e-12)
    assert rel(res.f, ref.f) < 1e-9 and rel(res.g, ref.g) < 1e-9
    res_f = sinkhorn(x, y, a, b, eps=0.01, diameter=0.1, f0=ref.f)
    assert rel(res_f.g, ref.g) < 1e-9


# --------------------------------------------------------------------------
# Alternating method against POT
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cost_scale", [0.5, 1.0])
def test_alternating_matches_pot_balanced(cost_scale):
    x, y, a, b = clouds()
    eps = 0.02
    res = sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-12, cost_scale=cost_scale,
                   max_iter=20000)
    assert res.converged and res.marginal_error <= 1e-12
    M = (cost_scale * sqdist(x, y)).numpy()
    P_pot, log = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), M, eps, numItermax=20000, stopThr=1e-13,
                                         log=True)
    P = res.plan.to_dense()
    assert rel(P, torch.from_numpy(P_pot)) < RTOL64
    # OTT/POT convention fh = eps log u; GeomLoss f = fh - eps log a (up to the gauge f + t, g - t).
    f_pot = eps * torch.from_numpy(log["log_u"]) - eps * torch.log(a)
    g_pot = eps * torch.from_numpy(log["log_v"]) - eps * torch.log(b)
    t = (f_pot - res.f).mean()
    assert rel(res.f + t, f_pot) < RTOL64 and rel(res.g - t, g_pot) < RTOL64
    # The entropic value <a,f> + <b,g> = <P,C> + eps KL(P | a⊗b).
    Pn = torch.from_numpy(P_pot)
    kl = (Pn * torch.log(Pn / (a[:, None] * b[None, :]))).sum() - Pn.sum() + 1.0
    assert rel(res.cost, (Pn * torch.from_numpy(M)).sum() + eps * kl) < RTOL64
    linear = ot.sinkhorn2(a.numpy(), b.numpy(), M, eps, method="sinkhorn_log", stopThr=1e-13,
                          numItermax=20000)
    assert rel((P * torch.from_numpy(M)).sum(), torch.as_tensor(float(linear))) < RTOL64
    # Exact row marginals after the f update (OTT's order: g, then f).
    assert rel(res.plan.row_sums(), a) < 1e-12


@pytest.mark.parametrize("reach_x, reach_y", [(0.5, 0.5), (None, 0.5), (0.6, None)])
def test_alternating_matches_pot_unbalanced(reach_x, reach_y):
    x, y, a, b = clouds(mass_b=1.3)
    eps = 0.03
    res = sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-13, reach_x=reach_x,
                   reach_y=reach_y, cost_scale=0.5, max_iter=50000)
    assert res.converged
    rho = lambda r: float("inf") if r is None else r * r  # noqa: E731
    M = (0.5 * sqdist(x, y)).numpy()
    P_pot, log = ot.unbalanced.sinkhorn_knopp_unbalanced(
        a.numpy(), b.numpy(), M, eps, (rho(reach_x), rho(reach_y)), reg_type="kl", numItermax=50000,
        stopThr=1e-15, log=True)
    # With c = a⊗b, POT's scalings are u = exp(f/eps): GeomLoss' potentials directly.
    assert rel(res.f, eps * torch.from_numpy(log["logu"])) < RTOL64
    assert rel(res.g, eps * torch.from_numpy(log["logv"])) < RTOL64
    assert rel(res.plan.to_dense(), torch.from_numpy(P_pot)) < RTOL64
    # GeomLoss' value = primal value + eps((m_a + m_b)/2 - m_a m_b) (docs/math.md section 4),
    # with generalised KL divergences (POT's log["total_cost"] drops their mass terms).
    P = torch.from_numpy(P_pot)

    def kl(p, q):
        return (p * torch.log(p / q) - p + q).sum()

    primal = (P * torch.from_numpy(M)).sum() + eps * kl(P, a[:, None] * b[None, :])
    for r, marginal, w in ((reach_x, P.sum(1), a), (reach_y, P.sum(0), b)):
        if r is not None:
            primal = primal + r * r * kl(marginal, w)
    ma, mb = a.sum(), b.sum()
    assert rel(res.cost, primal + eps * ((ma + mb) / 2 - ma * mb)) < RTOL64


def test_semi_unbalanced_fixed_point():
    x, y, a, b = clouds(mass_b=2.0)
    res = sinkhorn(x, y, a, b, eps=0.02, method="alternating", reach_y=0.5, threshold=1e-12)
    P = res.plan
    assert rel(P.row_sums(), a) < 1e-10                            # hard side
    assert rel(P.col_sums(), b * torch.exp(-res.g / 0.25)) < 1e-8   # relaxed side: b e^{-g/rho}
    assert res.reach_x is None and res.reach_y == 0.5


def test_alternating_warm_start_and_callback():
    x, y, a, b = clouds()
    ref = sinkhorn(x, y, a, b, eps=0.01, method="alternating", threshold=1e-10)
    seen = []
    res = sinkhorn(x, y, a, b, eps=0.01, method="alternating", threshold=1e-9, f0=ref.f, callback=seen.append,
                   check_every=5, verbose=True)
    assert res.converged and res.n_iter == 5 and len(seen) == 1
    assert seen[0]["iteration"] == 5 and seen[0]["marginal_error"] <= 1e-9
    with pytest.warns(ConvergenceWarning, match=r"sinkhorn: not converged: marginal error .* > threshold "
                                                r"1.00e-03 after 7 iterations \(max_iter=7\); raise max_iter"):
        capped = sinkhorn(x, y, a, b, eps=0.001, method="alternating", max_iter=7, check_every=5)
    assert not capped.converged and capped.n_iter == 7 and len(capped.marginal_error_history) == 2
    assert capped.status.startswith("not converged") and "not converged" in repr(capped)


def test_zero_weights_are_ignored():
    x, y, a, b = clouds()
    a0 = a.clone()
    a0[:10] = 0
    a0 = a0 / a0.sum()
    full = sinkhorn(x, y, a0, b, eps=0.02, method="alternating", threshold=1e-12)
    sub = sinkhorn(x[10:], y, a0[10:], b, eps=0.02, method="alternating", threshold=1e-12)
    t = (sub.f - full.f[10:]).mean()
    assert rel(full.f[10:] + t, sub.f) < 1e-9 and rel(full.g - t, sub.g) < 1e-9
    assert torch.isfinite(full.f).all()
    sym = sinkhorn(x, y, a0, b, blur=0.1)
    sym_sub = sinkhorn(x[10:], y, a0[10:], b, blur=0.1, diameter=sym.eps_schedule[0] ** 0.5)
    assert rel(sym.g, sym_sub.g) < 1e-12


# --------------------------------------------------------------------------
# Batches, dtypes, backends
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["symmetric", "alternating"])
def test_batched_equals_per_item(method):
    x, y, a, b = clouds(40, 30, batch=3)
    # threshold=inf: a batch refines until its worst problem converges, one problem alone
    # until it does; the schedule alone is the same count for both.
    opts = dict(blur=0.1, reach=0.5 if method == "symmetric" else None, method=method, diameter=2.0, **GEOMLOSS)
    if method == "alternating":
        opts.pop("diameter")
        opts["threshold"] = 1e-11
    res = sinkhorn(x, y, a, b, **opts)
    assert res.f.shape == (3, 40) and res.cost.shape == (3,)
    for i in range(3):
        one = sinkhorn(x[i], y[i], a[i], b[i], **opts)
        assert rel(res.f[i], one.f) < 1e-10 and rel(res.g[i], one.g) < 1e-10
        assert rel(res.cost[i], one.cost) < 1e-10
    sel = res.select(1)
    assert sel.f.shape == (40,) and sel.plan.shape == (40, 30)
    with pytest.raises(ValueError, match="batch of 3 problems"):
        res.plan


def test_batched_matches_geomloss():
    x, y, a, b = clouds(40, 30, batch=2)
    res = sinkhorn(x, y, a, b, blur=0.1, cost_scale=0.5, **GEOMLOSS)
    F, G = geomloss_potentials(x, y, a, b, blur=0.1)
    assert rel(res.f, F) < RTOL64 and rel(res.g, G) < RTOL64


@pytest.mark.parametrize("method", ["symmetric", "alternating"])
def test_float32_against_float64(method):
    x, y, a, b = clouds(80, 70)
    # The same count of steps in both dtypes (a threshold could stop them at different ones).
    opts = dict(blur=0.2, method=method, **(GEOMLOSS if method == "symmetric" else {}))
    ref = sinkhorn(x, y, a, b, **opts)
    res = sinkhorn(x.float(), y.float(), a.float(), b.float(), **opts)
    assert res.f.dtype == torch.float32
    t = (ref.f - res.f.double()).mean() if method == "alternating" else 0.0
    assert rel(res.f.double() + t, ref.f) < RTOL32 and rel(res.cost, ref.cost) < RTOL32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    x, y, _, _ = clouds(30, 20, weights=False)
    ref = sinkhorn(x, y, blur=0.3)
    res = sinkhorn(x.to(dtype), y.to(dtype), blur=0.3)
    assert res.f.dtype == torch.float32      # potentials are kept in float32
    assert rel(res.cost, ref.cost) < 0.02


@pytest.mark.parametrize("method", ["symmetric", "alternating"])
def test_triton_interpreter_matches_torch(method):
    # Few eps steps: a large blur. float32 (the Triton kernels' dtype). On a GPU
    # machine the same small problem runs compiled.
    x, y, a, b = (t.to(DEVICE) for t in clouds(24, 20, d=3, batch=2, dtype=torch.float32))
    opts = dict(blur=0.5, method=method, reach=0.7 if method == "symmetric" else None,
                threshold=1e-4 if method == "alternating" else math.inf,
                max_iter=40 if method == "alternating" else None)
    res_t = sinkhorn(x, y, a, b, backend="triton", **opts)
    res_c = sinkhorn(x, y, a, b, backend="torch", **opts)
    assert rel(res_t.f, res_c.f) < 1e-5 and rel(res_t.g, res_c.g) < 1e-5
    assert rel(res_t.cost, res_c.cost) < 1e-5


@requires_cuda
@pytest.mark.parametrize("method", ["symmetric", "alternating"])
def test_gpu_triton_matches_torch_large(method):
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d = 50_000, 64
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    opts = dict(method=method)
    if method == "symmetric":
        opts.update(blur=1.0, scaling=0.5, **GEOMLOSS)
    else:
        opts.update(eps=5.0, max_iter=20, threshold=0.0)
    res_t = sinkhorn(x, y, backend="triton", **opts)
    res_c = sinkhorn(x, y, backend="torch", **opts)
    scale = res_c.f.abs().max()
    assert float((res_t.f - res_c.f).abs().max() / scale) < 1e-4
    assert float((res_t.g - res_c.g).abs().max() / scale) < 1e-4
    assert rel(res_t.cost, res_c.cost) < 1e-4


def test_symmetric_refinement_reaches_the_threshold():
    """max_iter continues the averaged steps at the final eps until the marginal error <= threshold."""
    x, y, a, b = clouds(40, 30)
    plain = sinkhorn(x, y, a, b, blur=0.3, backend="torch", **GEOMLOSS)
    res = sinkhorn(x, y, a, b, blur=0.3, max_iter=400, threshold=1e-9, check_every=5, backend="torch")
    n_schedule = len(plain.eps_schedule)
    assert plain.n_iter == n_schedule and plain.marginal_error > 1e-3
    assert n_schedule < res.n_iter < 400 and res.n_iter % 5 == 0 and res.converged
    assert res.marginal_error <= 1e-9
    # Its fixed point is that of the alternating updates at the same eps.
    alt = sinkhorn(x, y, a, b, eps=res.eps, method="alternating", threshold=1e-12, backend="torch")
    shift = (res.f - alt.f).mean()
    assert rel(res.f - shift, alt.f) < 1e-6 and rel(res.g + shift, alt.g) < 1e-6
    # A budget the threshold does not reach: max_iter steps in all, not converged.
    with pytest.warns(ConvergenceWarning, match=r"sinkhorn: not converged: .* after \d+ iterations"):
        short = sinkhorn(x, y, a, b, blur=0.3, max_iter=n_schedule + 3, threshold=0.0, backend="torch")
    assert short.n_iter == n_schedule + 3 and not short.converged


@pytest.mark.filterwarnings("ignore::otlinop.ConvergenceWarning")   # budgets below the thresholds, on purpose
@pytest.mark.parametrize("check_every", [1, 7, 1000])
@pytest.mark.parametrize("options", [
    dict(blur=0.3, max_iter=60, threshold=1e-7),
    dict(eps=0.2, method="alternating", max_iter=50, threshold=1e-9, reach_x=0.9),
], ids=["symmetric", "alternating"])
def test_graph_runs_match_the_eager_loop(options, check_every):
    """Runs of one eps replay a captured step between checks: the same potentials, checks and count."""
    x, y, a, b = clouds(30, 20)
    opts = dict(options, check_every=check_every, backend="torch")
    eager = sinkhorn(x, y, a, b, **opts)
    fake = FakeGraphs()     # the loops' graph machinery on the CPU: a replay runs the captured step
    seen = []
    graphed = sinkhorn(x, y, a, b, callback=lambda info: seen.append(info["iteration"]), _graphs=fake, **opts)
    assert torch.equal(graphed.f, eager.f) and torch.equal(graphed.g, eager.g)
    assert graphed.marginal_error_history == eager.marginal_error_history and graphed.n_iter == eager.n_iter
    assert graphed.converged == eager.converged
    # The checks, then the last iteration (symmetric: a check at the end of the schedule, which
    # a refining call makes, and the record of the final state, unless a check stopped there).
    checks = set(range(check_every, graphed.n_iter + 1, check_every))
    if "method" not in options:
        checks = {k for k in checks | {len(graphed.eps_schedule)} if k < graphed.n_iter}
    last = [graphed.n_iter] if "method" not in options else [graphed.n_iter][:graphed.n_iter % check_every != 0]
    assert seen == sorted(checks) + last
    # Replays between checks (none when every step is a check).
    assert (fake.replays > 0) == (check_every > 1)


@requires_cuda
@pytest.mark.filterwarnings("ignore::otlinop.ConvergenceWarning")   # threshold=0.0: a fixed count
def test_gpu_graph_loops_are_bitwise_the_eager_loops():
    """On a GPU the captured step replays the eager step's kernels: bitwise the same potentials."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3000, 16, device="cuda", generator=gen)
    y = torch.randn(2000, 16, device="cuda", generator=gen) + 0.5
    for opts in (dict(blur=0.5, max_iter=80, threshold=0.0, check_every=25, precision="tf32"),
                 dict(eps=0.25, method="alternating", max_iter=80, threshold=0.0, check_every=25)):
        with config.override(sinkhorn_graphs=True):
            graphed = sinkhorn(x, y, **opts)
        with config.override(sinkhorn_graphs=False):
            eager = sinkhorn(x, y, **opts)
        assert torch.equal(graphed.f, eager.f) and torch.equal(graphed.g, eager.g)
        assert graphed.marginal_error_history == eager.marginal_error_history


# --------------------------------------------------------------------------
# Operators built from a result
# --------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    dict(method="alternating", eps=0.3, threshold=1e-10, reach_y=0.8, cost_scale=0.5),
    dict(blur=0.4, reach=1.0, scaling=0.7),
    dict(blur=0.5),
], ids=["alternating-semi", "symmetric-unbalanced", "symmetric-balanced"])
def test_hessian_methods_build_the_operators(options):
    from otlinop.hessian import DualHessianOperator, HessianOperator, dual_hessian
    from otlinop.hvp import LossHessianOperator, loss_hessian_operator
    from solvers import jacobi, minres

    x, y, a, b = clouds(12, 10, mass_b=1.0 if "reach" not in options and "reach_y" not in options else 1.2)
    res = sinkhorn(x, y, a, b, **options)
    data = (x, y, res.f, res.g)
    kw = dict(eps=res.eps, a=a, b=b, cost_scale=res.cost_scale, reach_x=res.reach_x, reach_y=res.reach_y)
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(10, generator=gen, dtype=F64), torch.randn(22, generator=gen, dtype=F64)

    S = res.hessian()
    assert isinstance(S, HessianOperator) and S.shape == (10, 10)
    torch.testing.assert_close(S @ u, HessianOperator(*data, **kw) @ u, rtol=1e-14, atol=0)
    S = res.hessian(ridge=0.1)      # the argument reaches the operator: a large ridge shows
    torch.testing.assert_close(S @ u, HessianOperator(*data, **kw, ridge=0.1) @ u, rtol=1e-14, atol=0)
    assert rel(S @ u, res.hessian(ridge=0.0) @ u) > 1e-3

    K = res.dual_hessian(ridge=0.0)
    assert isinstance(K, DualHessianOperator) and K.shape == (22, 22)
    torch.testing.assert_close(K @ v, dual_hessian(*data, **kw, ridge=0.0) @ v, rtol=1e-14, atol=0)
    assert K.schur.shift == 0

    for wrt, size in (("x", 24), ("y", 20), ("xy", 44)):
        w = torch.randn(size, generator=gen, dtype=F64)
        H = res.loss_hessian(wrt, M=jacobi(), rtol=1e-12, ridge=0.0)
        assert isinstance(H, LossHessianOperator) and H.shape == (size, size) and H.wrt == wrt
        direct = loss_hessian_operator(*data, **kw, wrt=wrt, M=jacobi(), rtol=1e-12, ridge=0.0)
        torch.testing.assert_close(H @ w, direct @ w, rtol=1e-12, atol=0)
        assert H.last_solve.converged
    # The solver options reach the inner solves.
    H = res.loss_hessian("y", solver=minres, maxiter=1)
    H @ torch.randn(20, generator=gen, dtype=F64)
    assert H.last_solve.n_iter == 1 and not H.last_solve.converged


def test_hessian_methods_on_batches_and_half_precision():
    x, y, a, b = clouds(12, 10, batch=2)
    res = sinkhorn(x, y, a, b, blur=0.5, **GEOMLOSS)   # the same count for the batch and one problem
    for call, what in ((lambda r: r.hessian(), "hessian"), (lambda r: r.dual_hessian(), "dual_hessian"),
                       (lambda r: r.loss_hessian(), "loss_hessian")):
        with pytest.raises(ValueError, match=rf"SinkhornResult.{what}\(\): this result holds a batch of 2 "
                                             rf"problems.*use result.select\(i\).{what}\(\)"):
            call(res)
        one = call(res.select(1))
        solo = call(sinkhorn(x[1], y[1], a[1], b[1], blur=0.5, diameter=res.eps_schedule[0] ** 0.5, **GEOMLOSS))
        w = torch.randn(one.shape[1], dtype=F64)
        torch.testing.assert_close(one @ w, solo @ w, rtol=1e-10, atol=1e-14)
    # Half-precision points: the operators work in the potentials' dtype (float32).
    x, y, _, _ = clouds(12, 10, weights=False)
    res = sinkhorn(x.to(torch.bfloat16), y.to(torch.bfloat16), blur=0.5)
    S, H = res.hessian(), res.loss_hessian()
    assert S.dtype == H.dtype == torch.float32
    assert torch.isfinite(H @ torch.randn(24)).all()


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def test_errors():
    x, y, a, b = clouds(10, 8)
    with pytest.raises(ValueError, match="method must be 'symmetric'"):
        sinkhorn(x, y, method="newton")
    with pytest.raises(ValueError, match="same dimension d"):
        sinkhorn(x, torch.rand(8, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"x has shape \(2,\), expected \(n, d\)"):
        sinkhorn(x[0], y)
    with pytest.raises(ValueError, match="empty point cloud"):
        sinkhorn(x[:0], y)
    with pytest.raises(ValueError, match="batch size 2 but y has 3"):
        sinkhorn(torch.rand(2, 5, 2, dtype=F64), torch.rand(3, 5, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"a has shape \(9,\), expected \(10,\)"):
        sinkhorn(x, y, a[:9], b)
    with pytest.raises(ValueError, match=r"a batched call needs a batched a, e.g. a.expand\(2, 10\)"):
        sinkhorn(x.expand(2, 10, 2), y.expand(2, 8, 2), a, b.expand(2, 8))
    with pytest.raises(ValueError, match="negative entries"):
        sinkhorn(x, y, -a, b)
    with pytest.raises(ValueError, match="zero total mass"):
        sinkhorn(x, y, a * 0, b, reach=1.0)
    with pytest.raises(ValueError, match="a contains NaN or inf"):
        sinkhorn(x, y, a.clone().fill_(float("nan")), b)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        sinkhorn(x.clone().fill_(float("inf")), y)
    with pytest.raises(ValueError, match="equal total masses"):
        sinkhorn(x, y, a, 2 * b)
    with pytest.raises(ValueError, match="blur must be positive"):
        sinkhorn(x, y, blur=0.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        sinkhorn(x, y, eps=-1.0, method="alternating")
    with pytest.raises(ValueError, match="give blur or eps, not both"):
        sinkhorn(x, y, blur=0.1, eps=0.01)
    with pytest.raises(ValueError, match=r"scaling must be in \(0, 1\)"):
        sinkhorn(x, y, scaling=1.5)
    with pytest.raises(ValueError, match="reach must be positive"):
        sinkhorn(x, y, reach=-1.0)
    with pytest.raises(ValueError, match="either reach"):
        sinkhorn(x, y, reach=1.0, reach_x=1.0)
    with pytest.raises(ValueError, match="backend must be"):
        sinkhorn(x, y, backend="keops")
    with pytest.raises(ValueError, match="cost_scale must be positive"):
        sinkhorn(x, y, cost_scale=0.0)
    with pytest.raises(ValueError, match="check_every must be a positive integer"):
        sinkhorn(x, y, check_every=0)
    with pytest.raises(TypeError, match="y has dtype torch.float32"):
        sinkhorn(x, y.float())
    with pytest.raises(TypeError, match="a has dtype torch.float32"):
        sinkhorn(x, y, a.float(), b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sinkhorn(x.numpy(), y)
    with pytest.raises(TypeError, match="floating dtype"):
        sinkhorn(torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"f0 has shape \(8,\), expected \(10,\)"):
        sinkhorn(x, y, f0=torch.zeros(8, dtype=F64))
    with pytest.raises(TypeError, match="callback must be callable"):
        sinkhorn(x, y, callback=3)
    with pytest.raises(ValueError, match="max_iter=2 is shorter than the eps schedule"):
        sinkhorn(x, y, max_iter=2)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        sinkhorn(x, y, max_iter=0)


def test_result_is_a_dataclass():
    x, y, a, b = clouds(10, 8)
    res = sinkhorn(x, y, a, b, blur=0.3)
    assert isinstance(res, SinkhornResult)
    assert res.x is x and res.a is a and res.rho_x is None
    assert res.cost.ndim == 0 and math.isfinite(float(res.cost))
    with pytest.raises(ValueError, match="not batched"):
        res.select(0)


@pytest.mark.parametrize("reach", [None, 0.7])
def test_stacked_debias_problems_match_separate_calls(reach):
    """n == m stacks the problems (x, x) and (y, y) into one soft-min call; it must
    give what two separate calls (used when the sizes differ) give."""
    from otlinop.loss import SamplesLoss

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 40, 3, generator=gen, dtype=torch.float64) + 0.4
    a = torch.rand(2, 40, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(2, 40, generator=gen, dtype=torch.float64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    loss = SamplesLoss("sinkhorn", blur=0.1, scaling=0.7, debias=True, reach=reach, potentials=True)
    stacked = loss(a, x, b, y)
    with config.override(stack_self_problems=False):
        separate = loss(a, x, b, y)
    for s, l in zip(stacked, separate):
        torch.testing.assert_close(s, l, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [None, 2])
def test_debiased_loss_runs_its_three_problems_in_one_launch(batch, count_calls):
    """Balanced, n == m, Triton soft-mins: (x, y), (x, x) and (y, y) are one batch of pair
    problems, one soft-min launch per step (softmin_self never runs), and the backward's two
    gradient passes one batched pass, with the loss, its gradients and the potentials of
    separate launches (float32: to rounding)."""
    import otlinop._sinkhorn_loops as loops
    from otlinop.loss import SamplesLoss

    gen = torch.Generator().manual_seed(7)
    lead = () if batch is None else (batch,)
    x = torch.randn(lead + (48, 3), generator=gen).to(DEVICE)
    y = (torch.randn(lead + (48, 3), generator=gen) + 0.4).to(DEVICE)
    a = torch.rand(lead + (48,), generator=gen).to(DEVICE) + 0.1
    b = torch.rand(lead + (48,), generator=gen).to(DEVICE) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    import otlinop._loss_derivatives as derivatives

    calls = count_calls(loops, "softmin_pair_unchecked", "softmin_self_unchecked")
    passes = count_calls(derivatives, "softmin_gradient")     # the backward's plan passes
    loss = SamplesLoss("sinkhorn", blur=0.1, scaling=0.5, backend="triton")
    results = {}
    for stack in (True, False):
        calls.update(softmin_pair_unchecked=0, softmin_self_unchecked=0)
        with config.override(stack_self_problems=stack):
            xr = x.clone().requires_grad_()
            value = loss(a, xr, b, y)
            passes["softmin_gradient"] = 0
            (grad,) = torch.autograd.grad(value.sum(), xr)
            # The gradient in x and its debiasing term: one batched pass, or two.
            assert passes["softmin_gradient"] == (1 if stack else 2)
            yr = y.clone().requires_grad_()
            passes["softmin_gradient"] = 0
            grads_xy = torch.autograd.grad(loss(a, xr, b, yr).sum(), (xr, yr))
            assert passes["softmin_gradient"] == (1 if stack else 4)
            pots = SamplesLoss("sinkhorn", blur=0.1, scaling=0.5, backend="triton", potentials=True)(a, x, b, y)
        results[stack] = (value.detach(), grad, *grads_xy, *pots)
        pair, self_ = calls["softmin_pair_unchecked"], calls["softmin_self_unchecked"]
        if stack:
            assert self_ == 0 and pair > 0
            steps = pair
        else:
            # (x, x) and (y, y) as two calls each step (stack_self_problems=False), beside (x, y).
            assert pair == steps and self_ == 2 * steps, (calls, steps)
    for got, expected in zip(results[True], results[False]):
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= 2e-5 * scale


def test_gradient_passes_stack_only_with_the_local_point_grad():
    """sinkhorn_grad batches the debiased passes only with its own point_grad: another one (the
    distributed loss's rings, which tell the clouds apart by identity) gets one call per pass."""
    from otlinop._checks import Inputs
    from otlinop._loss_derivatives import Spec, point_grad, sinkhorn_grad, solve
    from otlinop.sinkhorn import epsilon_schedule

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 24, 2, generator=gen), torch.randn(1, 24, 2, generator=gen) + 0.3
    a = b = torch.full((1, 24), 1 / 24)
    spec = Spec(tuple(epsilon_schedule(4.0, 0.3, 0.5)), 0.09, None, None, True, 0.5, "triton", None)
    sol = solve(Inputs(x, y, a, b, batched=True), spec)
    calls = []

    def counting(*args, **kw):
        calls.append((args[0] is x, args[1] is y or args[1] is x))
        return point_grad(*args, **kw)

    gx, *_ = sinkhorn_grad(x, y, a, b, sol, spec, (True, False, False, False), point_grad=counting)
    assert calls == [(True, True), (True, True)]
    stacked, *_ = sinkhorn_grad(x, y, a, b, sol, spec, (True, False, False, False))
    torch.testing.assert_close(stacked, gx, rtol=1e-5, atol=1e-6)
