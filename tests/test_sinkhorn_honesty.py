"""``sinkhorn`` says when its result is not converged (issue 19, items 5 and 7).

- The symmetric default continues at the final eps until its threshold (with a
  cap), and ``threshold=inf`` keeps GeomLoss' fixed count.
- A result that is not converged warns (``ConvergenceWarning``) and says why in
  ``status`` and ``repr``: the budget, a stall at the dtype's resolution, or a
  divergence.
- ``marginal_error`` is the final error, ``marginal_error_history`` every check.
- ``cost`` against ``<P, C> + eps KL(P | a x b)`` for weights of any mass, and
  ``transport_cost()`` against POT's ``sinkhorn2``.
- A schedule of thousands of steps warns.
"""

import math
import os
import warnings

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import otlinop  # noqa: E402
from otlinop import ConvergenceWarning, SamplesLoss  # noqa: E402
from otlinop._sinkhorn_loops import STALL_ITERATIONS, Monitor  # noqa: E402
from otlinop.sinkhorn import DEFAULT_MAX_ITER, sinkhorn  # noqa: E402

from conftest import requires_cuda  # noqa: E402

F64 = torch.float64


def _clouds(n=60, m=50, d=2, seed=0, shift=0.3, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=F64)
    y = torch.rand(m, d, generator=gen, dtype=F64) * 0.8 + shift
    return x.to(dtype), y.to(dtype)


def _l1(u, v):
    return float((u - v).abs().sum())


@pytest.fixture
def no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------ item 5a: the symmetric default
def test_symmetric_default_converges_to_its_threshold(no_warning):
    x, y = _clouds()
    res = sinkhorn(x, y, blur=0.1)
    n_schedule = len(res.eps_schedule)
    # It went past the schedule (GeomLoss' count stops at 0.1 or more here) and stopped at the threshold.
    assert res.converged and res.marginal_error <= 1e-3 and res.status.startswith("converged: marginal error")
    assert n_schedule < res.n_iter < n_schedule + DEFAULT_MAX_ITER
    assert sinkhorn(x, y, blur=0.1, threshold=math.inf).marginal_error > 1e-2
    # The plan returned, P(f, g) after the final extrapolation, has its marginals to the same order.
    P = res.plan
    assert _l1(P.row_sums(), res.a) < 2e-3 and _l1(P.col_sums(), res.b) < 2e-3
    # The fixed point is the alternating one (potentials up to the constant f + t, g - t).
    alt = sinkhorn(x, y, eps=res.eps, method="alternating", threshold=1e-12)
    t = float((alt.f - res.f).mean())
    scale = float(alt.f.abs().max())
    assert float((res.f + t - alt.f).abs().max()) < 1e-2 * scale


def test_threshold_inf_runs_geomloss_schedule_and_values(no_warning):
    """SamplesLoss keeps GeomLoss' values: its potentials are sinkhorn's with threshold=inf."""
    x, y = _clouds()
    a, b = torch.full((60,), 1 / 60, dtype=F64), torch.full((50,), 1 / 50, dtype=F64)
    res = sinkhorn(x, y, blur=0.1, cost_scale=0.5, threshold=math.inf)
    assert res.n_iter == len(res.eps_schedule) and res.converged
    F, G = SamplesLoss(blur=0.1, debias=False, potentials=True)(a, x, b, y)
    assert torch.equal(res.f, F) and torch.equal(res.g, G)
    # The former "schedule only" call (max_iter = the schedule) is still the same.
    fixed = sinkhorn(x, y, blur=0.1, cost_scale=0.5, threshold=math.inf, max_iter=len(res.eps_schedule))
    assert torch.equal(fixed.f, res.f)


def test_issue_case_is_not_silent():
    """Issue 19: sinkhorn(x, y, blur=0.05) on Gaussian clouds returned a plan 40% off its
    marginals with converged=False and no word. It now refines (the error drops by an order of
    magnitude here) and, short of the threshold, warns and says so in status and repr."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=gen, dtype=F64)
    y = torch.randn(40, 2, generator=gen, dtype=F64) + 0.5
    schedule_only = sinkhorn(x, y, blur=0.05, threshold=math.inf)
    with pytest.warns(ConvergenceWarning, match=r"^sinkhorn: not converged: marginal error \S+ > threshold "
                                                r"1.00e-03 after \d+ iterations \(max_iter=\d+\); raise max_iter, "
                                                r"or continue from this result with f0=res.f, g0=res.g and "
                                                r"diameter=blur"):
        res = sinkhorn(x, y, blur=0.05)
    assert not res.converged and res.n_iter == len(res.eps_schedule) + DEFAULT_MAX_ITER
    assert res.marginal_error < 0.2 * schedule_only.marginal_error
    assert "status='not converged: marginal error" in repr(res)
    # Continuing as the status says: the error sits on a plateau of the iteration itself (from
    # step ~450 on it drops by less than 0.1% per 100 steps, and falls ~3000 steps later), far
    # above float64's resolution: not a stall (a rule without the resolution stopped at 550).
    with pytest.warns(ConvergenceWarning, match="not converged"):
        more = sinkhorn(x, y, blur=0.05, f0=res.f, g0=res.g, diameter=0.05, max_iter=802)
    assert more.n_iter == 802 and more.status.startswith("not converged")
    assert more.marginal_error > 0.95 * res.marginal_error


def test_converged_results_do_not_warn(no_warning):
    x, y = _clouds(20, 15)
    assert sinkhorn(x, y, eps=0.5, method="alternating").converged
    assert sinkhorn(x, y, blur=0.5).converged
    assert "status='converged" in repr(sinkhorn(x, y, blur=0.5))


def test_status_of_a_batch_is_that_of_its_worst_problem():
    x, y = _clouds(20, 15)
    X, Y = torch.stack([x, x * 0.1]), torch.stack([y, y * 0.1])
    with pytest.warns(ConvergenceWarning, match="not converged"):
        res = sinkhorn(X, Y, eps=0.005, method="alternating", max_iter=20)
        slow = sinkhorn(X[0], Y[0], eps=0.005, method="alternating", max_iter=20)
    fast = sinkhorn(X[1], Y[1], eps=0.005, method="alternating", max_iter=20)
    assert fast.converged and not slow.converged
    assert res.marginal_error == pytest.approx(slow.marginal_error, rel=1e-10)
    assert res.select(1).status == res.status and res.select(1).marginal_error == res.marginal_error


# ------------------------------------------------------------------ item 5b: stalls
def _far_apart(seed, dtype):
    """Clouds 30 apart: potentials of ~2700, whose float32 spacing (2.4e-4) over eps = 1 bounds
    the marginal error near 1e-4; in float64 the same problem converges in ~40 iterations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(80, 3, generator=gen, dtype=F64)
    y = torch.randn(60, 3, generator=gen, dtype=F64) + 30
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_stall_stops_and_says_the_threshold_is_out_of_reach(seed):
    x, y = _far_apart(seed, torch.float32)
    with pytest.warns(ConvergenceWarning, match=r"sinkhorn: stalled: the marginal error has not decreased for "
                                                r"\d+ iterations and stays near \S+, above threshold 1.00e-06: the "
                                                r"threshold is below what float32 arithmetic resolves on this "
                                                r"problem \(its resolution u \(max\|f\| \+ max\|g\|\) / eps is "
                                                r"\S+ here; .*pass float64 points or a threshold above"):
        res = sinkhorn(x, y, eps=1.0, method="alternating", threshold=1e-6)
    # Stopped one window after its last progress, not after max_iter = 2000.
    assert res.n_iter <= 4 * STALL_ITERATIONS and not res.converged
    assert 1e-6 < res.marginal_error < 1e-2 and res.status.startswith("stalled")
    # The same problem in float64 converges: the stall is float32's.
    assert sinkhorn(x.double(), y.double(), eps=1.0, method="alternating", threshold=1e-6).converged


def test_symmetric_refinement_stalls_too():
    x, y = _far_apart(0, torch.float32)
    with pytest.warns(ConvergenceWarning, match="sinkhorn: stalled: .* float32"):
        res = sinkhorn(x, y, blur=1.0, threshold=1e-7)
    assert res.n_iter < len(res.eps_schedule) + 4 * STALL_ITERATIONS


def test_float64_slow_convergence_is_not_a_stall():
    """A genuine, slow convergence (Gaussian clouds, small eps) keeps making progress: it
    runs to max_iter and says "not converged", not "stalled"."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, generator=gen, dtype=F64), torch.randn(50, 3, generator=gen, dtype=F64) + 0.5
    with pytest.warns(ConvergenceWarning, match="not converged"):
        res = sinkhorn(x, y, eps=0.03, method="alternating", threshold=1e-12, max_iter=600)
    assert res.n_iter == 600 and res.status.startswith("not converged")


def _monitor(check_every=10):
    return Monitor(check_every=check_every, callback=None, bar=None, method="alternating", inp=None)


def test_monitor_stagnation_rules():
    asked = []

    def floor(value):
        def resolution():
            asked.append(value)
            return value
        return resolution

    # A constant error (a float32 cycle) near the resolution stalls once STALL_ITERATIONS
    # pass without progress.
    m = _monitor()
    assert [m.stagnant(it, 1e-5, floor(1e-6)) for it in range(10, 120, 10)] == [False] * 10 + [True]
    assert m.stalled and m.stall_span == 100 and m.floor == 1e-6 and asked == [1e-6]
    # A slow but steady decrease (0.2% per check, 2% per 100 iterations) never stalls, and never
    # asks for the resolution (a synchronisation).
    m, asked[:] = _monitor(), []
    assert not any(m.stagnant(it, 1e-3 * 0.998 ** k, floor(1.0)) for k, it in enumerate(range(10, 5000, 10)))
    assert asked == []
    # Noise around a plateau stalls: its occasional new lows are below the 0.1% drop.
    m = _monitor()
    gen = torch.Generator().manual_seed(0)
    noise = (1 + 1e-4 * torch.randn(1000, generator=gen, dtype=F64)).tolist()
    stops = [it for k, it in enumerate(range(10, 10010, 10)) if m.stagnant(it, 4e-5 * noise[k], floor(1e-6))]
    assert stops and stops[0] <= 300
    # A plateau far above the resolution is a transient: no stall, and the resolution is asked
    # once per window, not at every check.
    m, asked[:] = _monitor(), []
    assert not any(m.stagnant(it, 2.5e-2, floor(1e-12)) for it in range(10, 1010, 10))
    assert len(asked) == 9
    # The window is at least 10 checks: check_every=50 waits 500 iterations.
    m = _monitor(check_every=50)
    assert [m.stagnant(it, 1.0, floor(1.0)) for it in range(50, 600, 50)] == [False] * 10 + [True]


def test_divergence_is_reported():
    x, y = _clouds(20, 15, dtype=torch.float32)
    with pytest.warns(ConvergenceWarning, match=r"sinkhorn: diverged: the marginal error is nan after \d+ "
                                                r"iterations .*float32"):
        res = sinkhorn(x, y, eps=1e-3, method="alternating", f0=torch.full((20,), 3e38))
    assert not res.converged and math.isnan(res.marginal_error) and res.status.startswith("diverged")


# ------------------------------------------------------------------ item 7: marginal_error, cost, schedule
def test_marginal_error_is_the_final_value_and_the_history_is_kept():
    x, y = _clouds(20, 15)
    seen = []
    res = sinkhorn(x, y, eps=0.1, method="alternating", threshold=1e-9, check_every=3, callback=seen.append)
    assert isinstance(res.marginal_error, float) and res.marginal_error <= 1e-9
    assert res.marginal_error_history == [s["marginal_error"] for s in seen]
    assert res.marginal_error == res.marginal_error_history[-1] and len(res.marginal_error_history) > 3
    assert res.threshold == 1e-9


@pytest.mark.parametrize("mass", [1.0, 2.0, 0.3])
def test_cost_against_the_primal_objective_for_any_mass(mass):
    x, y = _clouds(25, 20)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(25, generator=gen, dtype=F64) + 0.1, torch.rand(20, generator=gen, dtype=F64) + 0.1
    a, b = mass * a / a.sum(), mass * b / b.sum()
    eps = 0.2
    res = sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-13, max_iter=20000)
    P, C = res.plan.to_dense(), torch.cdist(x, y) ** 2
    Q = a[:, None] * b[None, :]
    primal = (P * C).sum() + eps * (P * torch.log(P / Q) - P + Q).sum()
    torch.testing.assert_close(primal, res.cost + eps * (mass ** 2 - mass), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(res.transport_cost(), (P * C).sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("cost_scale", [1.0, 0.5])
def test_transport_cost_is_pots_sinkhorn2(cost_scale):
    ot = pytest.importorskip("ot")
    x, y = _clouds(30, 25)
    a, b = torch.full((30,), 1 / 30, dtype=F64), torch.full((25,), 1 / 25, dtype=F64)
    eps = 0.1
    res = sinkhorn(x, y, eps=eps, method="alternating", threshold=1e-13, max_iter=20000, cost_scale=cost_scale)
    M = (cost_scale * torch.cdist(x, y) ** 2).numpy()
    pot = float(ot.sinkhorn2(a.numpy(), b.numpy(), M, eps, method="sinkhorn_log", stopThr=1e-14,
                             numItermax=20000))
    assert res.transport_cost().item() == pytest.approx(pot, rel=1e-9)


def test_transport_cost_of_a_batch_and_far_from_the_origin():
    x, y = _clouds(20, 15)
    res = sinkhorn(torch.stack([x, x + 1e4]), torch.stack([y, y + 1e4]), eps=0.1, method="alternating",
                   threshold=1e-12)
    one = sinkhorn(x, y, eps=0.1, method="alternating", threshold=1e-12).transport_cost()
    # The cost is invariant under translation, and the centred expansion keeps it accurate at 1e4.
    torch.testing.assert_close(res.transport_cost(), torch.stack([one, one]), rtol=1e-8, atol=0)


def test_a_long_schedule_warns():
    x, y = _clouds(10, 8)
    # max_iter below the schedule refuses the call after the warning: nothing runs 25k steps here.
    with pytest.warns(UserWarning, match=r"sinkhorn: scaling=0.9999 gives an eps schedule of \d{5} steps "
                                         r"\(diameter .* down to blur 0.05\), one pass over the cost each; "
                                         r"scaling=0.5 gives \d+\. Pass a smaller scaling"):
        with pytest.raises(ValueError, match=r"max_iter=100 is shorter than the eps schedule"):
            sinkhorn(x, y, blur=0.05, scaling=0.9999, max_iter=100)
    # Just above the limit: ln(diameter / blur) = 1.1 at scaling 0.9995 is ~2200 steps.
    with pytest.warns(UserWarning, match=r"SamplesLoss: scaling=0.9995 gives an eps schedule of 22\d\d steps"):
        SamplesLoss(blur=0.05, diameter=0.05 * math.exp(1.1), scaling=0.9995, debias=False)(x[:4], y[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(x, y, blur=0.05, scaling=0.99, threshold=math.inf)     # ~600 steps: no warning


@requires_cuda
def test_gpu_stall_detection_costs_no_extra_synchronisation():
    """The stall test reads the error the loop reads for its threshold test anyway: two runs
    differing by 10 checks differ by 10 synchronisations (torch's sync debug mode counts them
    as warnings), plus at most one read of the resolution per 100 iterations without progress.
    About a second on an H100."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    # A slow, steady convergence: neither a stall nor an exact zero error stops it early.
    x = torch.randn(2000, 3, device="cuda", generator=gen)
    y = torch.randn(2000, 3, device="cuda", generator=gen) + 0.5

    def syncs(max_iter):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                res = sinkhorn(x, y, eps=0.01, method="alternating", threshold=0.0, max_iter=max_iter,
                               check_every=10, backend="triton")
                assert res.n_iter == max_iter
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    sinkhorn(x, y, eps=1.0, method="alternating", max_iter=20)     # compile and tune first
    assert 10 <= syncs(200) - syncs(100) <= 11
