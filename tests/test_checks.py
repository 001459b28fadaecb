"""One odd input, one answer: every public entry point that takes an argument
accepts or refuses the same values of it, with the same exception type, and
a message that begins with the function the user called and names the
argument (``otlinop._checks``)."""

import math
import os
import re

import numpy as np
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (conftest.py does the same).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from otlinop import (HessianOperator, PlanOperator, SamplesLoss, dual_hessian, epsilon_schedule, grad_x,  # noqa: E402
                     grad_y, hvp, hvp_self, hvp_x, hvp_y, loss_hessian_operator, plan_matmul, sinkhorn,
                     sinkhorn_loss)
from otlinop.kernels import (lse_cost, plan_apply, plan_bilinear, plan_truncate, softmin,  # noqa: E402
                             softmin_pair)
from otlinop.plan import transport_gradient  # noqa: E402
from otlinop.truncated import truncate_plan  # noqa: E402

F64 = torch.float64
N, M, D = 6, 5, 2


def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, D, generator=gen, dtype=F64)
    y = torch.rand(M, D, generator=gen, dtype=F64)
    res = sinkhorn(x, y, eps=0.5, method="alternating", threshold=1e-12)
    return dict(x=x, y=y, a=res.a, b=res.b, f=res.f, g=res.g,
                A=torch.randn(N, D, generator=gen, dtype=F64), B=torch.randn(M, D, generator=gen, dtype=F64))


P_ = _problem()
X, Y, A_W, B_W, F, G, DA, DB = (P_[k] for k in ("x", "y", "a", "b", "f", "g", "A", "B"))
TORCH = dict(backend="torch")


def _merge(base, kw):
    return {**base, **kw}


# --------------------------------------------------------------------------
# The entry points: name (the message prefix), a call taking the entry's own
# keywords, and the names the entry gives to each role.
# --------------------------------------------------------------------------
def _sinkhorn(x=X, y=Y, a=A_W, b=B_W, **kw):
    return sinkhorn(x, y, a, b, **_merge(dict(eps=0.5, **TORCH), kw))


def _samples_loss(x=X, y=Y, a=A_W, b=B_W, **kw):
    return SamplesLoss(**_merge(dict(blur=0.7, **TORCH), kw))(a, x, b, y)


def _sinkhorn_loss(x=X, y=Y, a=A_W, b=B_W, **kw):
    return sinkhorn_loss(x, y, a, b, **_merge(dict(blur=0.7, **TORCH), kw))


def _epsilon_schedule(**kw):
    return epsilon_schedule(**_merge(dict(diameter=2.0, blur=0.5, scaling=0.5), kw))


def _plan(x=X, y=Y, f=F, g=G, **kw):
    P = PlanOperator(x, y, f, g, **_merge(dict(eps=0.5, a=A_W, b=B_W, **TORCH), kw))
    return P @ torch.ones(M, dtype=F64)


def _plan_matmul(x=X, y=Y, f=F, g=G, **kw):
    return plan_matmul(x, y, f, g, torch.ones(M, 2, dtype=F64), **_merge(dict(eps=0.5, a=A_W, b=B_W, **TORCH), kw))


def _transport_gradient(x=X, y=Y, f=F, g=G, **kw):
    return transport_gradient(x, y, f, g, **_merge(dict(eps=0.5, a=A_W, b=B_W, **TORCH), kw))


def _hessian(x=X, y=Y, f=F, g=G, **kw):
    S = HessianOperator(x, y, f, g, **_merge(dict(eps=0.5, a=A_W, b=B_W, **TORCH), kw))
    return S @ torch.ones(M, dtype=F64)


def _dual_hessian(x=X, y=Y, f=F, g=G, **kw):
    K = dual_hessian(x, y, f, g, **_merge(dict(eps=0.5, a=A_W, b=B_W, **TORCH), kw))
    return K @ torch.ones(N + M, dtype=F64)


def _hvp_kw(kw):
    return _merge(dict(eps=0.5, a=A_W, b=B_W, **TORCH), kw)


def _hvp(x=X, y=Y, f=F, g=G, **kw):
    return hvp(x, y, f, g, DA, DB, **_hvp_kw(kw))


def _hvp_x(x=X, y=Y, f=F, g=G, **kw):
    return hvp_x(x, y, f, g, DA, **_hvp_kw(kw))


def _hvp_y(x=X, y=Y, f=F, g=G, **kw):
    return hvp_y(x, y, f, g, DB, **_hvp_kw(kw))


def _hvp_self(x=X, f=F, a=A_W, **kw):
    return hvp_self(x, f, DA, **_merge(dict(eps=0.5, a=a, **TORCH), kw))


def _grad_x(x=X, y=Y, f=F, g=G, **kw):
    return grad_x(x, y, f, g, **_hvp_kw(kw))


def _grad_y(x=X, y=Y, f=F, g=G, **kw):
    return grad_y(x, y, f, g, **_hvp_kw(kw))


def _loss_hessian(x=X, y=Y, f=F, g=G, **kw):
    H = loss_hessian_operator(x, y, f, g, **_hvp_kw(kw))
    return H @ torch.ones(N * D, dtype=F64)


def _truncated(**kw):
    P = PlanOperator(X, Y, F, G, eps=0.5, a=A_W, b=B_W, **TORCH)
    return P.truncated(**_merge(dict(tol=1e-8), kw))


def _truncate_plan(**kw):
    P = PlanOperator(X, Y, F, G, eps=0.5, a=A_W, b=B_W, **TORCH)
    return truncate_plan(P, **_merge(dict(tol=1e-8), kw))


def _lse_cost(x=X, y=Y, h=G, **kw):
    return lse_cost(x, y, h, **_merge(dict(eps=0.5, **TORCH), kw))


def _softmin(x=X, y=Y, h=G, **kw):
    return softmin(x, y, h, **_merge(dict(eps=0.5, **TORCH), kw))


def _softmin_pair(x=X, y=Y, f=F, g=G, **kw):
    return softmin_pair(x, y, f, g, **_merge(dict(eps=0.5, **TORCH), kw))


def _plan_apply(x=X, y=Y, f=F, g=G, **kw):
    return plan_apply(x, y, f, g, torch.ones(M, dtype=F64), **_merge(dict(eps=0.5, **TORCH), kw))


def _plan_bilinear(x=X, y=Y, f=F, g=G, **kw):
    return plan_bilinear(x, y, f, g, torch.ones(N, 2, dtype=F64), torch.ones(M, 2, dtype=F64),
                         torch.ones(M, 3, dtype=F64), **_merge(dict(eps=0.5, **TORCH), kw))


def _plan_truncate(x=X, y=Y, f=F, g=G, **kw):
    return plan_truncate(x, y, f, g, **_merge(dict(eps=0.5, row_threshold=torch.full((N,), -3.0, dtype=F64),
                                                   col_threshold=torch.zeros(M, dtype=F64), capacity=M, **TORCH),
                                              kw))


_PLAN_LIKE = dict(eps="eps", cost_scale="cost_scale", backend="backend", precision="precision", x="x",
                  potential="f", weights="a")
_HVP_LIKE = dict(_PLAN_LIKE, reach="reach_x", fraction="truncate", ridge="ridge", count="maxiter")
_KERNEL = dict(eps="eps", cost_scale="cost_scale", backend="backend", precision="precision", x="x", potential="f")
_LOSS = dict(eps="blur", cost_scale="cost_scale", backend="backend", precision="precision", x="x", weights="a",
             reach="reach", fraction="scaling", count="hvp_maxiter")

ENTRIES = [
    ("sinkhorn", _sinkhorn, dict(eps="eps", cost_scale="cost_scale", backend="backend", precision="precision",
                                 x="x", weights="a", reach="reach", fraction="scaling", count="check_every")),
    ("SamplesLoss", _samples_loss, _LOSS),
    ("sinkhorn_loss", _sinkhorn_loss, _LOSS),
    ("epsilon_schedule", _epsilon_schedule, dict(eps="blur", fraction="scaling")),
    ("PlanOperator", _plan, _PLAN_LIKE),
    ("plan_matmul", _plan_matmul, _PLAN_LIKE),
    ("transport_gradient", _transport_gradient, _PLAN_LIKE),
    ("HessianOperator", _hessian, dict(_PLAN_LIKE, reach="reach_x", ridge="ridge")),
    ("dual_hessian", _dual_hessian, dict(_PLAN_LIKE, reach="reach_y", ridge="ridge")),
    ("hvp", _hvp, _HVP_LIKE),
    ("hvp_x", _hvp_x, _HVP_LIKE),
    ("hvp_y", _hvp_y, dict(_HVP_LIKE, reach="reach_y")),
    ("hvp_self", _hvp_self, dict(_HVP_LIKE, reach="reach")),
    ("grad_x", _grad_x, _PLAN_LIKE),
    ("grad_y", _grad_y, dict(_PLAN_LIKE, potential="g", weights="b")),
    ("loss_hessian_operator", _loss_hessian, _HVP_LIKE),
    ("PlanOperator.truncated", _truncated, dict(fraction="tol", count="capacity")),
    ("truncate_plan", _truncate_plan, dict(fraction="tol", count="capacity")),
    ("lse_cost", _lse_cost, dict(_KERNEL, potential="h")),
    ("softmin", _softmin, dict(_KERNEL, potential="h")),
    ("softmin_pair", _softmin_pair, _KERNEL),
    ("plan_apply", _plan_apply, _KERNEL),
    ("plan_bilinear", _plan_bilinear, _KERNEL),
    ("plan_truncate", _plan_truncate, _KERNEL),
]


# --------------------------------------------------------------------------
# The odd inputs, per role, each with the answer every entry point must give.
# A value may depend on the entry's data: a callable of the role's tensor.
# --------------------------------------------------------------------------
OK = "ok"


class Change:
    """A tensor argument derived from the entry's valid one (``label`` names the test case)."""

    def __init__(self, label, fn):
        self.label, self.fn = label, fn

    def __repr__(self):
        return self.label


def _with(index, value):
    def change(t):
        t = t.clone()
        t[index] = value
        return t
    return change


def _meta(t):
    return torch.zeros_like(t, device="meta")


POSITIVE = [
    (0.5, OK), (1, OK), (np.float32(0.5), OK), (np.float64(0.5), OK), (np.int64(1), OK),
    (torch.tensor(0.5), OK), (torch.tensor(0.5, dtype=F64), OK), (torch.tensor(1), OK),
    ("0.5", TypeError), (True, TypeError), (1j, TypeError), ([0.5], TypeError), (torch.tensor([0.5]), TypeError),
    (torch.tensor(0.5, requires_grad=True), TypeError), (np.bool_(True), TypeError),
    (math.nan, ValueError), (np.float32("nan"), ValueError), (math.inf, ValueError), (0, ValueError),
    (0.0, ValueError), (-1.0, ValueError), (torch.tensor(-0.5), ValueError),
]

CASES = {
    "eps": POSITIVE,
    "cost_scale": POSITIVE,
    "reach": [
        (None, OK), (1.0, OK), (np.float32(2.0), OK), (torch.tensor(2.0), OK), (math.inf, OK),
        ("1", TypeError), (True, TypeError), (torch.tensor([1.0]), TypeError),
        (math.nan, ValueError), (0.0, ValueError), (-1.0, ValueError),
    ],
    "fraction": [
        (0.5, OK), (np.float32(0.25), OK), (torch.tensor(0.5), OK),
        ("0.5", TypeError), (True, TypeError), (torch.tensor([0.5]), TypeError),
        (0.0, ValueError), (1.5, ValueError), (-0.5, ValueError), (math.nan, ValueError), (math.inf, ValueError),
    ],
    "ridge": [
        (None, OK), (0, OK), (1e-6, OK), (np.float32(1e-6), OK), (torch.tensor(1e-6), OK),
        ("small", TypeError), (True, TypeError),
        (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
    ],
    "count": [
        (5, OK), (np.int64(5), OK), (torch.tensor(5), OK),
        (5.0, TypeError), ("5", TypeError), (True, TypeError), (torch.tensor(5.0), TypeError),
        (0, ValueError), (-1, ValueError),
    ],
    "backend": [
        (None, OK), ("auto", OK), ("torch", OK),
        ("cuda", ValueError), ("Torch", ValueError), ("", ValueError), (3, ValueError),
        ("triton", TypeError),                   # float64 points: the Triton kernels take float32 and half
    ],
    "precision": [
        (None, OK), ("ieee", OK), ("tf32", OK), ("tf32x3", OK),
        ("fp64", ValueError), ("TF32", ValueError), (3, ValueError),
    ],
    "x": [
        ([[0.0, 1.0]] * N, TypeError), (Change("numpy", lambda t: t.numpy()), TypeError),
        (Change("int64", lambda t: t.long()), TypeError), (Change("float32", lambda t: t.float()), TypeError),
        (Change("1-D", lambda t: t[:, 0]), ValueError), (Change("d=0", lambda t: t[:, :0]), ValueError),
        (Change("d=3", lambda t: torch.cat([t, t[:, :1]], 1)), ValueError),
        (Change("nan", _with((1, 0), math.nan)), ValueError), (Change("-inf", _with((1, 0), -math.inf)), ValueError),
        (Change("meta", _meta), ValueError),
    ],
    "potential": [
        (Change("list", lambda t: t.tolist()), TypeError), (None, TypeError),
        (Change("float32", lambda t: t.float()), TypeError), (Change("int64", lambda t: t.long()), TypeError),
        (Change("short", lambda t: t[:-1]), ValueError), (Change("column", lambda t: t[:, None]), ValueError),
        (Change("nan", _with(1, math.nan)), ValueError), (Change("inf", _with(1, math.inf)), ValueError),
        (Change("meta", _meta), ValueError),
    ],
    "weights": [
        (None, OK),
        (Change("list", lambda t: t.tolist()), TypeError), (Change("float32", lambda t: t.float()), TypeError),
        (Change("short", lambda t: t[:-1]), ValueError), (Change("nan", _with(1, math.nan)), ValueError),
        (Change("inf", _with(1, math.inf)), ValueError), (Change("negative", _with(1, -0.1)), ValueError),
        (Change("meta", _meta), ValueError),
    ],
}

# The data each tensor role changes, per entry keyword.
_DATA = {"x": X, "f": F, "g": G, "h": G, "a": A_W, "b": B_W}


def _outcome(name, call, keyword, value):
    if isinstance(value, Change):
        value = value.fn(_DATA[keyword])
    try:
        call(**{keyword: value})
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return OK, ""


def _cases():
    for role, cases in CASES.items():
        for i, (value, expected) in enumerate(cases):
            yield pytest.param(role, value, expected, id=f"{role}-{i}-{repr(value)[:24]}")


@pytest.mark.parametrize("role,value,expected", list(_cases()))
def test_every_entry_point_gives_the_same_answer(role, value, expected):
    entries = [(name, call, roles[role]) for name, call, roles in ENTRIES if role in roles]
    assert len(entries) >= 2, role
    answers = {name: _outcome(name, call, keyword, value) for name, call, keyword in entries}
    kinds = {name: kind for name, (kind, _) in answers.items()}
    wrong = {name: (kind.__name__ if kind is not OK else OK, msg) for name, (kind, msg) in answers.items()
             if kind is not expected}
    assert not wrong, f"expected {getattr(expected, '__name__', expected)} from all of {sorted(kinds)}; got {wrong}"
    if expected is OK:
        return
    for (name, _, keyword), (_, message) in zip(entries, answers.values()):
        assert message.startswith(f"{name}: "), (name, message)
        assert re.search(rf"\b{re.escape(keyword)}\b", message), (name, keyword, message)


def test_the_roles_cover_the_entry_points():
    """Every entry point takes part in at least two roles, and every role has
    at least two entry points (else there is nothing to be consistent with)."""
    for name, _, roles in ENTRIES:
        assert len(roles) >= 2, name
    for role in CASES:
        assert sum(role in roles for _, _, roles in ENTRIES) >= 2, role


def test_value_checks_follow_the_switch(override):
    """config.check_finite=False (the benchmarks') skips the value read-back of
    the operators and kernels; Sinkhorn's checks of its measures (masses
    included) are preconditions of its iterations and stay."""
    nan_x = X.clone()
    nan_x[1, 0] = math.nan
    nan_f = F.clone()
    nan_f[1] = math.nan
    override(check_finite=False)
    PlanOperator(X, Y, nan_f, G, eps=0.5, **TORCH)
    plan_matmul(nan_x, Y, F, G, eps=0.5, **TORCH)
    lse_cost(nan_x, Y, G, eps=0.5, **TORCH)
    with pytest.raises(ValueError, match="sinkhorn: x contains NaN or inf"):
        sinkhorn(nan_x, Y, eps=0.5, **TORCH)


def test_checks_sit_below_the_kernels():
    """otlinop._checks imports torch, the standard library and solvers.config only, and its one
    sibling otlinop._measure_flags (the checks' own kernel), which imports torch and triton only."""
    import ast

    import otlinop._checks as checks
    import otlinop._measure_flags as kernel

    def imports(module, siblings=()):
        tree = ast.parse(open(module.__file__).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 or node.module in siblings, f"relative import from {node.module}"
                imported.add(node.module.split(".")[0] if node.level == 0 else "." + node.module)
        return imported

    assert imports(checks, siblings=("_measure_flags",)) <= {"__future__", "math", "numbers", "os", "dataclasses",
                                                             "torch", "solvers", "._measure_flags"}
    assert imports(kernel) <= {"__future__", "contextlib", "torch", "triton"}


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_flags_every_nan_and_infinity(device, dtype):
    """The checks' one-reduction finiteness flag (a max-abs norm) against torch.isfinite, a bad entry
    anywhere in a long tensor (the GPU reduction's blocks and lanes), finite extremes of the dtype."""
    from otlinop._checks import all_finite
    n = 100_003
    for bad in (math.nan, math.inf, -math.inf):
        for pos in (0, 1, 4097, n // 2, n - 1):
            t = torch.randn(n, device=device).to(dtype)
            t[pos] = bad
            assert not bool(all_finite(t)), (bad, pos)
    top = torch.finfo(dtype).max
    assert bool(all_finite(torch.tensor([top, -top, 0.0], device=device, dtype=dtype)))
    assert bool(all_finite(torch.randn(3, 5, device=device).to(dtype)[:, ::2]))
    assert bool(all_finite(torch.empty(0, device=device, dtype=dtype)))
    assert not bool(all_finite(torch.tensor([[1.0, math.nan]], device=device, dtype=dtype).t()))


def _measure_cases():
    gen = torch.Generator().manual_seed(11)

    def data(B=None, n=37, m=29, d=3, shared=False, dtype=torch.float32, scale=1.0):
        lead = () if B is None else (B,)
        x = (scale * torch.randn(lead + (n, d), generator=gen)).to(dtype)
        y = (scale * torch.randn(lead + (m, d), generator=gen) + 0.5).to(dtype)
        wl = () if (B is None or shared) else (B,)
        a = torch.rand(wl + (n,), generator=gen, dtype=torch.float64) + 0.1
        b = torch.rand(wl + (m,), generator=gen, dtype=torch.float64) + 0.1
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
        return [x, y, a.float(), b.float()]

    cases = {"plain": data(), "batched": data(B=3), "shared weights": data(B=2, shared=True),
             "d = 1": data(d=1), "d = 64": data(d=64, n=300), "d = 100": data(d=100, m=7),
             "float16": data(dtype=torch.float16), "bfloat16": data(B=2, dtype=torch.bfloat16),
             "long clouds": data(n=3000, m=2100)}
    for where in (0, 17, -1):
        for bad in (math.nan, math.inf, -math.inf):
            # x and a in a batch of 2, y and b unbatched.
            for k, name in enumerate("xyab"):
                c = data(B=2 if name in "xa" else None)
                c[k].view(-1)[where] = bad
                cases[f"{name}[{where}] = {bad}"] = c
    c = data(B=2)
    c[2][1, 3] = -0.01
    cases["a negative"] = c
    c = data()
    c[3][:] = 0.0
    cases["b zero mass"] = c
    c = data(B=3)
    c[2][1] *= 1.5
    cases["unequal masses in one entry"] = c
    c = data()
    c[2], c[3] = c[2] * 1e20, c[3] * 1e20
    cases["masses' product overflows float32"] = c
    cases["extent overflows float32"] = data(scale=3e18)
    cases["extent just fits"] = data(scale=1e18)
    return cases


MEASURE_CASES = _measure_cases()


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("case", sorted(MEASURE_CASES))
def test_one_launch_measure_checks_match_the_torch_flags(case, balanced):
    """otlinop._measure_flags (one Triton program: the CUDA path of measures_and_read) gives the torch
    checks' flags, in their order, for good data and for every class of bad value, and the exact
    per-coordinate extremes the default diameter is taken from (interpreter here, compiled on a GPU)."""
    from otlinop import _checks
    from otlinop._measure_flags import measure_flags
    from otlinop.kernels._dispatch import interpreter_defect

    if not torch.cuda.is_available() and interpreter_defect() is not None:
        pytest.skip(f"the interpreter cannot run the kernels: {interpreter_defect()}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y, a, b = (t.to(device) for t in MEASURE_CASES[case])
    x3, y3 = (t if t.ndim == 3 else t.unsqueeze(0) for t in (x, y))
    a2, b2 = (t if (t.ndim == 2 or x.ndim == 3) else t.unsqueeze(0) for t in (a, b))
    cost_scale = 0.5
    expected, _ = _checks._mass_flags_and_box(x3.cpu(), y3.cpu(), a2.cpu(), b2.cpu(), balanced, cost_scale)
    limit = torch.finfo(_checks.compute_dtype(x.dtype)).max
    tol = max(1e-3, 8 * torch.finfo(a.dtype).eps)
    flags, lo, hi = measure_flags(x3, y3, a2, b2, balanced=balanced, cost_scale=cost_scale, limit=limit, tol=tol)
    want = [bool(f) for f, _ in expected]
    got = [bool(v) for v in flags.tolist()[:len(want)]]
    assert got == want, [m[:40] for (f, m), g in zip(expected, got) if bool(f) != g]
    if balanced is False:
        assert float(flags[10]) == 1.0
    if all(want[:2]):
        d = x.shape[-1]
        pts = torch.cat([x3.reshape(-1, d), y3.reshape(-1, d)]).cpu().double()
        assert torch.equal(lo.cpu(), pts.amin(0)) and torch.equal(hi.cpu(), pts.amax(0))
        assert torch.equal(_checks.box_diameter_from(lo, hi).cpu(),
                           _checks.box_diameter(_checks.Inputs(x3.cpu(), y3.cpu(), None, None, True)))
