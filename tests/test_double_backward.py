"""Double backward through SamplesLoss and sinkhorn_loss: Hessian-vector
products in the points (otlinop.loss, issue 6).

Three references: the same products from ``otlinop.hvp.hvp`` / ``hvp_self``
called directly at the same potentials (the schedule's with
``converge="never"``, converged ones by default), central finite
differences of the loss' own analytic gradient, and ``gradgradcheck``. Plus
the symmetry of H, the injection points (solver, preconditioner,
tolerances), the logs of the inner solves, and the errors (weights, third
order). CPU, float64. The ``converge`` modes themselves (issue 18, item 4)
are tested in tests/test_converge.py.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import solvers  # noqa: E402
from otlinop._loss_derivatives import SecondOrder, Spec  # noqa: E402
from otlinop._loss_functions import SinkhornLoss  # noqa: E402
from otlinop.hvp import hvp, hvp_self  # noqa: E402
from otlinop.loss import SamplesLoss, sinkhorn_loss  # noqa: E402
from otlinop.sinkhorn import epsilon_schedule, sinkhorn  # noqa: E402

F64 = torch.float64
grad = torch.autograd.grad

#: A schedule that converges: it starts at blur * 1.0001, so its ~100 averaged
#: steps all run at (nearly) the final eps. There, central differences of the
#: loss' gradient match the HVP to 5e-8..3e-7 (measured; 2e-6 asserted). GeomLoss'
#: usual schedules stop far from convergence: see
#: test_accuracy_follows_the_schedule.
CONVERGED = dict(blur=0.5, diameter=0.5 * 1.0001, scaling=0.999999)
#: A short schedule for the tests against hvp at the same potentials (exact whatever the convergence).
SHORT = dict(blur=0.3, diameter=1.5, scaling=0.7)



def rel(u, v):
    return float((u - v).norm() / v.norm())


def flat(*ts):
    return torch.cat([t.reshape(-1) for t in ts])


def clouds(n=14, m=11, d=2, *, batch=None, seed=0, mass_b=1.0, weights="random"):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    x = torch.rand(lead + (n, d), generator=gen, dtype=F64)
    y = torch.rand(lead + (m, d), generator=gen, dtype=F64) * 0.8 + 0.3
    if weights == "lognormal":   # about 3 decades: preconditioners matter
        a = torch.exp(1.3 * torch.randn(lead + (n,), generator=gen, dtype=F64))
        b = torch.exp(1.3 * torch.randn(lead + (m,), generator=gen, dtype=F64))
    else:
        a = torch.rand(lead + (n,), generator=gen, dtype=F64) + 0.2
        b = torch.rand(lead + (m,), generator=gen, dtype=F64) + 0.2
    return x, y, a / a.sum(-1, keepdim=True), mass_b * b / b.sum(-1, keepdim=True)


def directions(x, y, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=F64), torch.randn(y.shape, generator=gen, dtype=F64)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def first_grads(L, x, y, a, b):
    """(x, y) leaves and the gradients of the loss, with a graph for a second backward."""
    xi, yi = leaves(x, y)
    gx, gy = grad(L(a, xi, b, yi), (xi, yi), create_graph=True)
    return xi, yi, gx, gy


def double_backward(L, x, y, a, b, A, B):
    """``(H_x, H_y)`` along the joint direction (A, B) of (x, y)."""
    xi, yi, gx, gy = first_grads(L, x, y, a, b)
    return grad((gx * A).sum() + (gy * B).sum(), (xi, yi))


class Reference:
    """The same products from otlinop.hvp, at potentials from otlinop.sinkhorn on the same
    schedule, or (``converged``) from its alternating loop converged at the final eps."""

    def __init__(self, x, y, a, b, *, blur, diameter, scaling, debias=True, reach=None, cost_scale=0.5,
                 converged=False, **solve):
        # threshold=inf: the schedule alone, the loss' potentials.
        opts = dict(blur=blur, diameter=diameter, scaling=scaling, reach=reach, cost_scale=cost_scale,
                    threshold=math.inf)
        if converged:
            opts = dict(eps=blur ** 2, reach=reach, cost_scale=cost_scale, method="alternating", threshold=1e-14,
                        max_iter=20_000)
        self.x, self.y, self.a, self.b, self.debias, self.solve = x, y, a, b, debias, solve
        self.res = sinkhorn(x, y, a, b, **opts)
        self.kw = dict(eps=blur ** 2, cost_scale=cost_scale)
        self.reach = reach
        if debias:
            # The symmetric potential of OT(a, a): (f + g) / 2 (the alternating loop's f and g
            # may differ by a constant; the symmetric loop's f is symmetric already).
            self_aa, self_bb = sinkhorn(x, x, a, a, **opts), sinkhorn(y, y, b, b, **opts)
            self.f_aa = (self_aa.f + self_aa.g) / 2
            self.g_bb = (self_bb.f + self_bb.g) / 2

    def __call__(self, A, B):
        r = self.res
        Hx, Hy, _ = hvp(self.x, self.y, r.f, r.g, A, B, a=self.a, b=self.b, reach_x=self.reach,
                        reach_y=self.reach, **self.kw, **self.solve)
        if self.debias and A is not None:
            Hx = Hx - hvp_self(self.x, self.f_aa, A, a=self.a, reach=self.reach, **self.kw, **self.solve)[0]
        if self.debias and B is not None:
            Hy = Hy - hvp_self(self.y, self.g_bb, B, a=self.b, reach=self.reach, **self.kw, **self.solve)[0]
        return Hx, Hy


def fd_hvp(L, x, y, a, b, A, B, h=1e-4):
    """Central differences of the loss' analytic gradient along (A, B)."""
    def gradient(s):
        xi, yi = leaves(x + s * h * A, y + s * h * B)
        return flat(*grad(L(a, xi, b, yi), (xi, yi)))
    return (gradient(1.0) - gradient(-1.0)) / (2 * h)


# --------------------------------------------------------------------------
# Against otlinop.hvp at the same potentials
# --------------------------------------------------------------------------
@pytest.mark.parametrize("converge", ["never", "create_graph"])
@pytest.mark.parametrize("cost_scale", [0.5, 1.0])
@pytest.mark.parametrize("reach", [None, 0.7])
@pytest.mark.parametrize("debias", [True, False])
def test_matches_hvp_at_the_same_potentials(debias, reach, cost_scale, converge):
    """"never": at the schedule's potentials, bit for bit the same formulas (1e-10);
    "create_graph" (the default): at potentials converged to an L1 marginal error of
    1e-11, against the reference's at 1e-14 (measured 1e-13 to 1e-11; 1e-9 asserted)."""
    x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.3)
    opts = dict(SHORT, debias=debias, reach=reach, cost_scale=cost_scale)
    L = SamplesLoss(**opts, converge=converge)
    ref = Reference(x, y, a, b, **opts, converged=converge != "never")
    tol = 1e-10 if converge == "never" else 1e-9
    A, B = directions(x, y)
    xi, yi, gx, gy = first_grads(L, x, y, a, b)
    # Joint direction (A, B) over (x, y).
    Hx, Hy = grad((gx * A).sum() + (gy * B).sum(), (xi, yi), retain_graph=True)
    assert rel(flat(Hx, Hy), flat(*ref(A, B))) < tol
    # H_xx A and the mixed block H_yx A.
    Hxx, Hyx = grad((gx * A).sum(), (xi, yi), retain_graph=True)
    ex, ey = ref(A, None)
    assert rel(Hxx, ex) < tol and rel(Hyx, ey) < tol
    # H_xy B and H_yy B.
    Hxy, Hyy = grad((gy * B).sum(), (xi, yi))
    ex, ey = ref(None, B)
    assert rel(Hxy, ex) < tol and rel(Hyy, ey) < tol
    assert rel(flat(Hxx + Hxy, Hyx + Hyy), flat(Hx, Hy)) < 1e-10
    # Only x requires grad (the hvp_x path), then only y (hvp_y).
    (xi,) = leaves(x)
    (gx,) = grad(L(a, xi, b, y), xi, create_graph=True)
    assert rel(grad((gx * A).sum(), xi)[0], ref(A, None)[0]) < tol
    (yi,) = leaves(y)
    (gy,) = grad(L(a, x, b, yi), yi, create_graph=True)
    assert rel(grad((gy * B).sum(), yi)[0], ref(None, B)[1]) < tol


def test_sinkhorn_result_loss_hessian_agrees():
    """Without debias, the x block is SinkhornResult.loss_hessian at the same potentials."""
    x, y, a, b = clouds()
    L = SamplesLoss(**SHORT, debias=False, converge="never")
    A, _ = directions(x, y)
    xi, _, gx, _ = first_grads(L, x, y, a, b)
    (Hx,) = grad((gx * A).sum(), xi)
    H = sinkhorn(x, y, a, b, **SHORT, cost_scale=0.5, threshold=math.inf).loss_hessian(wrt="x")
    assert rel(Hx.reshape(-1), H @ A.reshape(-1)) < 1e-10


# --------------------------------------------------------------------------
# Against finite differences of the loss' gradient
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cost_scale", [0.5, 1.0])
@pytest.mark.parametrize("reach", [None, 0.5])
@pytest.mark.parametrize("debias", [True, False])
def test_matches_finite_differences(debias, reach, cost_scale):
    x, y, a, b = clouds(12, 10, mass_b=1.0 if reach is None else 1.3)
    L = SamplesLoss(**CONVERGED, debias=debias, reach=reach, cost_scale=cost_scale)
    A, B = directions(x, y)
    H = flat(*double_backward(L, x, y, a, b, A, B))
    assert rel(H, fd_hvp(L, x, y, a, b, A, B)) < 2e-6     # measured 5e-8 to 3e-7


@pytest.mark.parametrize("debias", [True, False])
def test_semi_unbalanced_sides_are_not_swapped(debias):
    """SamplesLoss has one reach; its machinery has one per side. A hard x and a
    relaxed y side must reach otlinop.hvp as reach_x=None, reach_y=reach."""
    x, y, a, b = clouds(12, 10, mass_b=1.3)
    blur, reach = CONVERGED["blur"], 0.5
    spec = Spec(tuple(epsilon_schedule(CONVERGED["diameter"], blur, CONVERGED["scaling"])), blur ** 2,
                None, reach ** 2, debias, 0.5, None, None)

    def loss(x, y):
        return SinkhornLoss.apply(x[None], y[None], a[None], b[None], spec, SecondOrder(), False)[0]

    A, B = directions(x, y)
    xi, yi = leaves(x, y)
    gx, gy = grad(loss(xi, yi), (xi, yi), create_graph=True)
    H = flat(*grad((gx * A).sum() + (gy * B).sum(), (xi, yi)))

    def gradient(s):
        xs, ys = leaves(x + s * 1e-4 * A, y + s * 1e-4 * B)
        return flat(*grad(loss(xs, ys), (xs, ys)))

    assert rel(H, (gradient(1.0) - gradient(-1.0)) / 2e-4) < 2e-6     # measured 8e-8 to 5e-7
    if not debias:
        # The sides swapped give a visibly different answer (measured: 20% off).
        res = sinkhorn(x, y, a, b, **CONVERGED, reach_y=reach, cost_scale=0.5)
        swapped = hvp(x, y, res.f, res.g, A, B, eps=blur ** 2, a=a, b=b, cost_scale=0.5, reach_x=reach)
        assert rel(flat(*swapped[:2]), H) > 1e-2


def test_gradgradcheck():
    x, y, a, b = clouds(6, 5, mass_b=1.3)
    L = SamplesLoss(**CONVERGED, reach=0.7)
    xi, yi = leaves(x, y)
    assert torch.autograd.gradgradcheck(lambda x, y: L(a, x, b, y), (xi, yi), atol=1e-6, rtol=1e-5)


def test_accuracy_follows_the_schedule():
    """With converge="never" (the schedule's potentials): the HVP is exact at convergence;
    GeomLoss' fixed schedule stops before it, and its error shrinks as scaling approaches 1
    (more steps near the final eps). The default converges instead (tests/test_converge.py)."""
    x, y, a, b = clouds(12, 10)
    A, B = directions(x, y)
    errors = []
    for scaling in (0.5, 0.9, 0.99):
        L = SamplesLoss(blur=0.5, diameter=1.5, scaling=scaling, converge="never")
        errors.append(rel(flat(*double_backward(L, x, y, a, b, A, B)), fd_hvp(L, x, y, a, b, A, B)))
    # Measured: 6.7e-3, 2.0e-3, 2.5e-4 (and 1.1e-3 at GeomLoss' scaling=0.95).
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3, errors


# --------------------------------------------------------------------------
# Structure: symmetry, batches, the functional form, float32
# --------------------------------------------------------------------------
@pytest.mark.parametrize("reach", [None, 0.7])
def test_symmetric(reach):
    x, y, a, b = clouds(mass_b=1.0 if reach is None else 1.3)
    L = SamplesLoss(**SHORT, reach=reach)
    U, V = directions(x, y, seed=1), directions(x, y, seed=2)
    xi, yi, gx, gy = first_grads(L, x, y, a, b)
    HU = flat(*grad((gx * U[0]).sum() + (gy * U[1]).sum(), (xi, yi), retain_graph=True))
    HV = flat(*grad((gx * V[0]).sum() + (gy * V[1]).sum(), (xi, yi)))
    lhs, rhs = float(flat(*U) @ HV), float(HU @ flat(*V))
    assert abs(lhs - rhs) <= 1e-10 * float(HU.norm() * flat(*V).norm())


def test_batched_and_functional_form():
    x, y, a, b = clouds(12, 10, batch=2)
    A, B = directions(x, y)
    log = []
    xi, yi = leaves(x, y)
    values = sinkhorn_loss(xi, yi, a, b, **SHORT, hvp_log=log)
    gx, gy = grad(values.sum(), (xi, yi), create_graph=True)
    assert log == []                                     # first order: no inner solve
    Hx, Hy = grad((gx * A).sum() + (gy * B).sum(), (xi, yi))
    # Per entry: the solves of OT(a, b), OT(a, a) and OT(b, b).
    assert len(log) == 6 and all(isinstance(r, solvers.SolveResult) and r.converged for r in log)
    L = SamplesLoss(**SHORT)
    for i in range(2):
        Hxi, Hyi = double_backward(L, x[i], y[i], a[i], b[i], A[i], B[i])
        assert rel(flat(Hx[i], Hy[i]), flat(Hxi, Hyi)) < 1e-10
    # An entry without a direction is skipped: no solve, a zero product.
    log.clear()
    xi, yi = leaves(x, y)
    gx, gy = grad(sinkhorn_loss(xi, yi, a, b, **SHORT, hvp_log=log).sum(), (xi, yi), create_graph=True)
    mask = torch.tensor([1.0, 0.0], dtype=F64)[:, None, None]
    Hx, Hy = grad((gx * A * mask).sum(), (xi, yi))
    assert len(log) == 2 and float(Hx[1].abs().max()) == 0 and float(Hy[1].abs().max()) == 0


def test_float32():
    x, y, a, b = clouds()
    A, B = directions(x, y)
    L = SamplesLoss(**SHORT, reach=0.7)
    exact = flat(*double_backward(L, x, y, a, b, A, B))
    single = flat(*double_backward(L, *(t.float() for t in (x, y, a, b, A, B))))
    assert single.dtype == torch.float32
    assert rel(single.double(), exact) < 1e-3
    assert L.last_hvp_solve.converged and L.last_hvp_solve.x.dtype == torch.float32


# --------------------------------------------------------------------------
# Injection points
# --------------------------------------------------------------------------
class _Recording:
    """Wraps a solver and records the options it is called with."""

    def __init__(self, solver):
        self.solver, self.calls = solver, []

    def __call__(self, S, rhs, **options):
        self.calls.append(options)
        return self.solver(S, rhs, **options)


def test_solver_and_preconditioner_injection():
    x, y, a, b = clouds(30, 25, weights="lognormal", seed=2)
    A, B = directions(x, y)
    opts = dict(blur=0.3, diameter=1.5, scaling=0.7, debias=False)
    L = SamplesLoss(**opts)
    assert L.last_hvp_solve is None
    plain = flat(*double_backward(L, x, y, a, b, A, B))
    base = L.last_hvp_solve
    assert base.converged
    iterations = {"cg": base.n_iter}
    for name, solver, M in (("jacobi", solvers.cg, solvers.jacobi()), ("neumann3", solvers.cg, solvers.neumann(3)),
                            ("minres", solvers.minres, None), ("minres-jacobi", solvers.minres, solvers.jacobi())):
        spy = _Recording(solver)
        L = SamplesLoss(**opts, hvp_solver=spy, hvp_preconditioner=M, hvp_rtol=1e-12, hvp_maxiter=400)
        H = flat(*double_backward(L, x, y, a, b, A, B))
        assert len(spy.calls) == 1
        assert spy.calls[0]["M"] is M and spy.calls[0]["rtol"] == 1e-12 and spy.calls[0]["maxiter"] == 400
        assert L.last_hvp_solve.converged, L.last_hvp_solve.status
        iterations[name] = L.last_hvp_solve.n_iter
        assert rel(H, plain) < 1e-8, name
    # Preconditioners change the iteration count (lognormal weights: they cut it).
    assert iterations["jacobi"] < iterations["cg"] and iterations["neumann3"] < iterations["cg"], iterations
    # hvp_maxiter reaches the solver: a capped solve reports non-convergence.
    L = SamplesLoss(**opts, hvp_maxiter=2)
    double_backward(L, x, y, a, b, A, B)
    assert not L.last_hvp_solve.converged and L.last_hvp_solve.n_iter == 2
    # Options can be changed on the module between calls, and the functional form takes them too.
    L.hvp_maxiter, L.hvp_preconditioner = None, solvers.neumann(3)
    assert rel(flat(*double_backward(L, x, y, a, b, A, B)), plain) < 1e-8
    assert L.last_hvp_solve.converged
    log = []
    xi, yi = leaves(x, y)
    gx, gy = grad(sinkhorn_loss(xi, yi, a, b, **opts, hvp_solver=solvers.minres, hvp_preconditioner=solvers.jacobi(),
                                hvp_log=log), (xi, yi), create_graph=True)
    H = flat(*grad((gx * A).sum() + (gy * B).sum(), (xi, yi)))
    assert len(log) == 1 and log[0].converged and rel(H, plain) < 1e-8


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def test_weights_second_derivatives_raise():
    x, y, a, b = clouds(10, 8)
    A, _ = directions(x, y)
    L = SamplesLoss(**SHORT)
    (xi,) = leaves(x)
    (gx,) = grad(L(a, xi, b, y), xi, create_graph=True)
    (expected,) = grad((gx * A).sum(), xi)
    # A direction on the weight gradient: d grad_a / dx is not implemented.
    xi, ai = leaves(x, a)
    gx, ga = grad(L(ai, xi, b, y), (xi, ai), create_graph=True)
    with pytest.raises(NotImplementedError, match="involve the weights.*depends on the gradient w.r.t. the "
                                                  "weights a"):
        grad((ga * torch.rand_like(ga)).sum(), xi, retain_graph=True)
    # d^2 S / da^2.
    with pytest.raises(NotImplementedError, match="involve the weights"):
        grad(ga.sum(), ai, retain_graph=True)
    # A zero direction on the weight gradient is none: the point derivative works.
    (H,) = grad((gx * A).sum() + 0 * ga.sum(), xi, retain_graph=True)
    assert rel(H, expected) < 1e-12
    # Weights that require grad: the point derivatives work, the mixed ones raise when requested.
    xi, bi = leaves(x, b)
    (gx,) = grad(L(a, xi, bi, y), xi, create_graph=True)
    (H,) = grad((gx * A).sum(), xi, retain_graph=True)
    assert rel(H, expected) < 1e-12
    with pytest.raises(NotImplementedError, match="derivative of the gradients w.r.t. the weights b was "
                                                  "requested"):
        grad((gx * A).sum(), (xi, bi), retain_graph=True)
    with pytest.raises(NotImplementedError, match="weights b was requested"):
        (gx * A).sum().backward()        # every leaf, bi included


def test_differentiable_in_the_direction_only():
    """H v is linear in v: its derivative w.r.t. v is H (symmetric), which the
    double-vjp trick of torch.autograd.functional.hvp uses; w.r.t. the points
    it would be a third derivative, which raises."""
    x, y, a, b = clouds(10, 8)
    L = SamplesLoss(**SHORT)
    U, V = directions(x, y, seed=1), directions(x, y, seed=2)
    xi, yi, gx, gy = first_grads(L, x, y, a, b)
    u, v = leaves(*U)
    Hu = grad((gx * u).sum() + (gy * v).sum(), (xi, yi), create_graph=True)
    assert all(t.requires_grad for t in Hu)
    dU = grad((Hu[0] * V[0]).sum() + (Hu[1] * V[1]).sum(), (u, v), retain_graph=True)
    HV = grad((gx * V[0]).sum() + (gy * V[1]).sum(), (xi, yi), retain_graph=True)
    assert rel(flat(*dU), flat(*HV)) < 1e-10
    with pytest.raises(NotImplementedError, match="third derivatives of the Sinkhorn loss"):
        grad(Hu[0].sum(), xi, retain_graph=True)
    with pytest.raises(NotImplementedError, match="third derivatives of the Sinkhorn loss"):
        Hu[0].sum().backward()
    # torch.autograd.functional: hvp (double-vjp trick), vhp and hessian.
    V0 = V[0]
    _, hv = torch.autograd.functional.hvp(lambda x: L(a, x, b, y), x, V0)
    _, vh = torch.autograd.functional.vhp(lambda x: L(a, x, b, y), x, V0)
    (Hx,) = grad((gx * V0).sum(), xi)
    assert rel(hv, Hx) < 1e-10 and rel(vh, Hx) < 1e-10
    H = torch.autograd.functional.hessian(lambda x: L(a, x, b, y), x).reshape(x.numel(), x.numel())
    assert rel(H @ V0.reshape(-1), Hx.reshape(-1)) < 1e-10 and rel(H, H.T) < 1e-10


def test_option_errors():
    with pytest.raises(TypeError, match="hvp_solver must be a solver function"):
        SamplesLoss(hvp_solver="cg")
    with pytest.raises(TypeError, match=r"hvp_preconditioner must be None, an operator, or a factory such as "
                                        r"solvers.jacobi\(\)"):
        SamplesLoss(hvp_preconditioner="jacobi")
    with pytest.raises(ValueError, match="hvp_rtol must be positive"):
        SamplesLoss(hvp_rtol=0.0)
    with pytest.raises(ValueError, match="hvp_maxiter must be a positive integer"):
        SamplesLoss(hvp_maxiter=0)
    x, y, _, _ = clouds(10, 8)
    with pytest.raises(TypeError, match="hvp_log must be a list"):
        sinkhorn_loss(x, y, hvp_log=())
    with pytest.raises(TypeError, match="sinkhorn_loss: hvp_solver"):
        sinkhorn_loss(x, y, hvp_solver=None)
    L = SamplesLoss()
    L.hvp_solver = "minres"           # checked again at the call
    with pytest.raises(TypeError, match="hvp_solver must be a solver function"):
        L(x, y)
