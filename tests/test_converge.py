"""The potentials a loss evaluation differentiates (issue 18, item 4): ``converge``
of SamplesLoss and sinkhorn_loss.

GeomLoss' eps schedule stops before the potentials converge; the HVP of a
double backward is an implicit-function derivative at a fixed point. By
default (``converge="create_graph"``) a backward that records a graph first
converges the potentials at the final eps, so the double backward is the
derivative of the gradient it returned: it matches central differences of
gradients computed the same way (create_graph=True). Plain first-order calls
keep GeomLoss' value and gradient bit for bit; ``"always"`` converges in the
forward (value, gradient and HVP of one function); ``"never"`` keeps the
schedule's potentials (the old behaviour, far off). CPU, float64.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from conftest import requires_cuda  # noqa: E402
from otlinop._loss_derivatives import REFINE_MAX_ITER, Refinement, SecondOrder, Spec  # noqa: E402
from otlinop._loss_functions import SinkhornLoss  # noqa: E402
from otlinop.loss import SamplesLoss, sinkhorn_loss  # noqa: E402
from otlinop.plan import PlanOperator  # noqa: E402
from otlinop.sinkhorn import epsilon_schedule  # noqa: E402

F64 = torch.float64
grad = torch.autograd.grad

#: The issue's case: n = 25, m = 20, d = 2, blur = 0.3, GeomLoss' default schedule.
ISSUE = dict(blur=0.3)


def rel(u, v):
    return float((u - v).norm() / v.norm())


def flat(*ts):
    return torch.cat([t.reshape(-1) for t in ts])


def clouds(n=25, m=20, d=2, *, mass_b=1.0, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=F64)
    y = torch.rand(m, d, generator=gen, dtype=F64) * 0.8 + 0.3
    a = torch.rand(n, generator=gen, dtype=F64) + 0.2
    b = torch.rand(m, generator=gen, dtype=F64) + 0.2
    out = x, y, a / a.sum(), mass_b * b / b.sum()
    return tuple(t.to(dtype) for t in out)


def directions(x, y, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(x.shape, generator=gen, dtype=F64).to(x),
            torch.randn(y.shape, generator=gen, dtype=F64).to(y))


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def gradients(L, x, y, a, b, *, create_graph):
    xi, yi = leaves(x, y)
    return flat(*grad(L(a, xi, b, yi), (xi, yi), create_graph=create_graph)).detach()


def double_backward(L, x, y, a, b, A, B):
    xi, yi = leaves(x, y)
    gx, gy = grad(L(a, xi, b, yi), (xi, yi), create_graph=True)
    return flat(*grad((gx * A).sum() + (gy * B).sum(), (xi, yi)))


def fd_gradients(L, x, y, a, b, A, B, *, create_graph, h=1e-4):
    """Central differences along (A, B) of the gradients computed with or without a graph."""
    plus = gradients(L, x + h * A, y + h * B, a, b, create_graph=create_graph)
    minus = gradients(L, x - h * A, y - h * B, a, b, create_graph=create_graph)
    return (plus - minus) / (2 * h)


CASES = [(debias, reach, cost_scale) for debias in (True, False) for reach in (None, 1.0) for cost_scale in (0.5, 1.0)]


@pytest.mark.parametrize("debias,reach,cost_scale", CASES)
def test_double_backward_is_the_derivative_of_its_gradient(debias, reach, cost_scale):
    """The acceptance of issue 18, item 4, on its case: default options but for blur. Measured
    (rel. error of the double backward against central differences of the create_graph
    gradients): 1.5e-7 to 6.1e-7 by default (central-difference truncation at h = 1e-4), and
    6.5e-2 to 2.0e-1 with the schedule's potentials (converge="never", the behaviour before)."""
    x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.3)
    A, B = directions(x, y)
    L = SamplesLoss(**ISSUE, debias=debias, reach=reach, cost_scale=cost_scale)
    H = double_backward(L, x, y, a, b, A, B)
    assert L.last_refinement.converged and L.last_hvp_solve.converged
    assert rel(H, fd_gradients(L, x, y, a, b, A, B, create_graph=True)) < 1e-5
    schedule = SamplesLoss(**ISSUE, debias=debias, reach=reach, cost_scale=cost_scale, converge="never")
    H = double_backward(schedule, x, y, a, b, A, B)
    assert rel(H, fd_gradients(schedule, x, y, a, b, A, B, create_graph=True)) > 3e-2
    assert schedule.last_refinement is None


@pytest.mark.parametrize("reach", [None, 1.0])
def test_first_order_calls_keep_geomloss_values(reach):
    """A plain backward runs no extra iteration: the value and the gradient are bit for bit
    those of the schedule (converge="never", GeomLoss' semantics). The gradient under
    create_graph=True is the converged one, that of converge="always"."""
    x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.3)
    default, never = SamplesLoss(**ISSUE, reach=reach), SamplesLoss(**ISSUE, reach=reach, converge="never")
    always = SamplesLoss(**ISSUE, reach=reach, converge="always")
    xi, yi = leaves(x, y)
    value = default(a, xi, b, yi)
    assert torch.equal(value, never(a, x, b, y))
    plain = flat(*grad(value, (xi, yi), retain_graph=True))
    assert default.last_refinement is None
    assert torch.equal(plain, gradients(never, x, y, a, b, create_graph=False))
    recorded = flat(*grad(value, (xi, yi), create_graph=True)).detach()
    assert isinstance(default.last_refinement, Refinement) and default.last_refinement.converged
    converged = gradients(always, x, y, a, b, create_graph=False)
    assert rel(recorded, converged) < 1e-10
    # The schedule's gradient is visibly another one (measured 1.8% balanced, 11% relaxed).
    assert 1e-3 < rel(plain, converged) < 0.5, rel(plain, converged)
    # One converging solve per forward: a second create_graph backward reuses it.
    default.last_refinement = None
    grad(value, (xi, yi), create_graph=True)
    assert default.last_refinement is None


@pytest.mark.parametrize("debias,reach", [(True, None), (False, 1.0)])
def test_always_value_gradient_and_hvp_are_one_function(debias, reach):
    """converge="always": the value, its gradient (plain backward) and the HVP all come from
    converged potentials: central differences of the value give the gradient, those of the
    plain gradient the HVP (measured 3e-9 to 2e-8, and 2e-7 to 3e-7)."""
    x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.3)
    A, B = directions(x, y)
    L = SamplesLoss(**ISSUE, debias=debias, reach=reach, converge="always")
    assert "converge='always'" in repr(L)
    h = 1e-4
    dvalue = (L(a, x + h * A, b, y + h * B) - L(a, x - h * A, b, y - h * B)) / (2 * h)
    G = gradients(L, x, y, a, b, create_graph=False)
    assert abs(float(dvalue) - float(G @ flat(A, B))) < 1e-6 * float(G.norm() * flat(A, B).norm())
    H = double_backward(L, x, y, a, b, A, B)
    assert rel(H, fd_gradients(L, x, y, a, b, A, B, create_graph=False)) < 1e-5
    # The value moved off the schedule's, by the schedule's convergence error (measured 0.2-0.4%).
    schedule = SamplesLoss(**ISSUE, debias=debias, reach=reach, converge="never")(a, x, b, y)
    assert 0 < abs(float(L(a, x, b, y) - schedule)) < 1e-2 * abs(float(schedule))


def test_always_returns_converged_potentials():
    x, y, a, b = clouds(mass_b=1.3)
    blur, reach = 0.3, 1.0
    F, G = SamplesLoss(blur=blur, reach=reach, debias=False, potentials=True, converge="always")(a, x, b, y)
    F0, _ = SamplesLoss(blur=blur, reach=reach, debias=False, potentials=True)(a, x, b, y)
    P = PlanOperator(x, y, F, G, eps=blur ** 2, a=a, b=b, cost_scale=0.5)
    rho = reach ** 2
    # The fixed point of the relaxed problem: P 1 = a e^{-f/rho}, P.T 1 = b e^{-g/rho}.
    assert float((P.row_sums() - a * torch.exp(-F / rho)).abs().sum()) < 2e-11
    assert float((P.col_sums() - b * torch.exp(-G / rho)).abs().sum()) < 2e-11
    assert rel(F, F0) > 1e-6      # not the schedule's


def test_functional_form_and_batches():
    """sinkhorn_loss takes converge too; a batch converges every entry (the largest error
    is the one tested), and each entry then matches the same problem alone."""
    x, y, a, b = (torch.stack(t) for t in zip(clouds(seed=0), clouds(seed=1)))
    A, B = directions(x, y)
    xi, yi = leaves(x, y)
    gx, gy = grad(sinkhorn_loss(xi, yi, a, b, blur=0.3, diameter=2.0).sum(), (xi, yi), create_graph=True)
    Hx, Hy = grad((gx * A).sum() + (gy * B).sum(), (xi, yi))
    L = SamplesLoss(blur=0.3, diameter=2.0)
    for i in range(2):
        assert rel(flat(Hx[i], Hy[i]), double_backward(L, x[i], y[i], a[i], b[i], A[i], B[i])) < 1e-8
    for converge in ("never", "always"):
        value = sinkhorn_loss(x, y, a, b, blur=0.3, diameter=2.0, converge=converge)
        same = torch.stack([SamplesLoss(blur=0.3, diameter=2.0, converge=converge)(a[i], x[i], b[i], y[i])
                            for i in range(2)])
        assert float((value - same).abs().max()) < 1e-12


def test_tolerance_follows_hvp_rtol_and_dtype():
    """The converging solve's tolerance is a tenth of the inner solves' rtol (hvp_rtol)."""
    x, y, a, b = clouds()
    A, B = directions(x, y)
    L = SamplesLoss(**ISSUE)
    double_backward(L, x, y, a, b, A, B)
    tight = L.last_refinement
    assert tight.threshold == pytest.approx(1e-12) and tight.marginal_error <= tight.threshold
    L = SamplesLoss(**ISSUE, hvp_rtol=1e-6)
    double_backward(L, x, y, a, b, A, B)
    loose = L.last_refinement
    assert loose.threshold == pytest.approx(1e-7) and loose.marginal_error <= 1e-7 and loose.n_iter < tight.n_iter
    # float32: the inner solves' 1e-5, the potentials to 1e-6.
    x32, y32, a32, b32 = clouds(dtype=torch.float32)
    L = SamplesLoss(**ISSUE)
    H32 = double_backward(L, x32, y32, a32, b32, A.float(), B.float())
    assert L.last_refinement.threshold == pytest.approx(1e-6) and L.last_refinement.status == "converged"
    exact = double_backward(SamplesLoss(**ISSUE), x, y, a, b, A, B)
    assert rel(H32.double(), exact) < 1e-4      # measured 5.4e-6


def test_float32_floor_stops_the_iterations():
    """A tolerance below what float32 can reach: the run stops once the error no longer
    improves (status "stalled", a warning naming the floor), not after REFINE_MAX_ITER."""
    x, y, a, b = clouds(dtype=torch.float32)
    A, B = directions(x, y)
    L = SamplesLoss(**ISSUE, hvp_rtol=1e-10)
    with pytest.warns(RuntimeWarning, match=r"stopped improving at an L1 marginal error of .* above the tolerance "
                                            r"1.0e-11: the floor of float32 at this eps"):
        H = double_backward(L, x, y, a, b, A, B)
    info = L.last_refinement
    assert info.status == "stalled" and not info.converged and info.n_iter < 200     # measured 35
    assert 1e-11 < info.marginal_error < 1e-5 and torch.isfinite(H).all()


def test_translation_step_speeds_up_unbalanced_problems():
    """With a relaxed side, every run of iterations starts with the exact dual step along the
    translation (f + t, g - t): without it the damped updates contract that mode only by
    rho / (rho + eps) per half-step (at blur 0.1, reach 1: measured 1110 iterations, 160 with it)."""
    counts = {}
    for reach in (None, 1.0):
        x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.3)
        A, B = directions(x, y)
        L = SamplesLoss(blur=0.1, reach=reach)
        H = double_backward(L, x, y, a, b, A, B)
        counts[reach] = L.last_refinement.n_iter
        assert rel(H, fd_gradients(L, x, y, a, b, A, B, create_graph=True)) < 1e-5
    assert counts[1.0] < 2 * counts[None], counts


def test_stopping_short_warns():
    """A converging solve that runs out of iterations says so (a RuntimeWarning naming the
    way out), reports converged=False, and the derivatives still come back."""
    x, y, a, b = clouds()
    eps = ISSUE["blur"] ** 2
    spec = Spec(tuple(epsilon_schedule(1.5, ISSUE["blur"], 0.5)), eps, None, None, True, 0.5, None, None)
    reports = []
    second = SecondOrder(owner="SamplesLoss", report=reports.append, refine_max_iter=3)
    xi = leaves(x)[0]
    value = SinkhornLoss.apply(xi[None], y[None], a[None], b[None], spec, second, False)[0]
    with pytest.warns(RuntimeWarning, match=r"SamplesLoss: the potentials at the final eps \(blur\^2 = 0.09\) did "
                                            r"not reach the tolerance 1.0e-12 .* within 3 iterations .*"
                                            r"converge='never'"):
        (gx,) = grad(value, xi, create_graph=True)
    assert len(reports) == 1 and reports[0].status == "max_iter" and reports[0].n_iter == 3
    assert reports[0].n_iter_self == (3, 3) and reports[0].marginal_error > reports[0].threshold
    assert torch.isfinite(grad(gx.sum(), xi)[0]).all()
    assert REFINE_MAX_ITER == SecondOrder().refine_max_iter


def test_converge_option_errors():
    with pytest.raises(ValueError, match=r"SamplesLoss: converge must be one of 'create_graph', 'always', "
                                         r"'never', got 'sometimes'"):
        SamplesLoss(converge="sometimes")
    x, y, _, _ = clouds()
    with pytest.raises(ValueError, match=r"sinkhorn_loss: converge must be one of .* got True"):
        sinkhorn_loss(x, y, converge=True)
    L = SamplesLoss()
    L.converge = "later"             # checked again at the call
    with pytest.raises(ValueError, match="converge must be one of"):
        L(x, y)


def test_triton_kernels_in_the_converging_solve():
    """backend="triton" (the interpreter without a GPU): the converging solve's soft-mins
    (both loops) through the kernels, float32, against the torch backend."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, y, a, b = (t.to(dev) for t in clouds(12, 10, mass_b=1.3, dtype=torch.float32))
    A, B = directions(x, y)
    out = {}
    for backend in ("triton", "torch"):
        L = SamplesLoss(blur=0.5, reach=1.0, backend=backend)
        out[backend] = double_backward(L, x, y, a, b, A, B)
        assert L.last_refinement.converged
    assert rel(out["triton"], out["torch"]) < 1e-4


@requires_cuda
def test_gpu_double_backward_is_the_derivative_of_its_gradient():
    """On the GPU (Triton kernels, float32), n = m = 4000, d = 3, blur = 0.3: the default
    double backward against the same computation in float64 (torch kernels), and the
    converging solve's iterations (a few seconds in all)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d = 4000, 3
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    A, B = torch.randn(n, d, device="cuda", generator=gen), torch.randn(n, d, device="cuda", generator=gen)
    out = {}
    for dtype in (torch.float32, F64):
        for reach in (None, 1.0):
            L = SamplesLoss(blur=0.3, reach=reach)
            H = double_backward(L, *(t.to(dtype) for t in (x, y)), None, None, *(t.to(dtype) for t in (A, B)))
            assert L.last_refinement.converged and L.last_hvp_solve.converged
            out[dtype, reach] = H.double()
    for reach in (None, 1.0):
        assert rel(out[torch.float32, reach], out[F64, reach]) < 1e-3
