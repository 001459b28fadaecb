"""Forward mode (torch.func.jvp, jacfwd, vmap, torch.autograd.forward_ad) through the plan
product, against the dense plan built from plain torch ops in float64."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (conftest.py does the same).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402

from otlinop.plan import PlanOperator, plan_matmul  # noqa: E402

F64 = torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS, C = 0.6, 0.7
NAMES = ("x", "y", "f", "g", "V", "a", "b")


def _data(n=6, m=5, d=2, k=3, *, batch=None, zero=False, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    x = torch.rand(*lead, n, d, generator=gen, dtype=F64)
    y = torch.rand(*lead, m, d, generator=gen, dtype=F64)
    f = 0.3 * torch.randn(*lead, n, generator=gen, dtype=F64)
    g = 0.3 * torch.randn(*lead, m, generator=gen, dtype=F64)
    V = torch.randn(*lead, m, *((k,) if k else ()), generator=gen, dtype=F64)
    a = torch.rand(*lead, n, generator=gen, dtype=F64) + 0.1
    b = torch.rand(*lead, m, generator=gen, dtype=F64) + 0.1
    if zero:
        # A zero weight: its row (column) of P vanishes; the tangent must stay finite.
        a[..., 1] = 0.0
        b[..., 2] = 0.0
    return tuple(t.to(dtype) for t in (x, y, f, g, V, a, b))


def _dense(x, y, f, g, V, a, b):
    """P V with P built entry by entry from plain torch ops (differentiable in every mode)."""
    C_ = C * ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)
    P = a.unsqueeze(-1) * b.unsqueeze(-2) * torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C_) / EPS)
    vector = V.ndim == x.ndim - 1
    out = P @ (V.unsqueeze(-1) if vector else V)
    return out.squeeze(-1) if vector else out


def _fast(x, y, f, g, V, a, b):
    return plan_matmul(x, y, f, g, V, a=a, b=b, eps=EPS, cost_scale=C)


def _tangents(primals, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(p.shape, generator=gen, dtype=F64).to(p.device, p.dtype) for p in primals)


def _close(actual, expected, name, tol=1e-10):
    scale = float(expected.abs().max())
    assert scale > 0, f"{name}: the expected tensor is zero, the comparison would be vacuous"
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("batch", [None, 2])
def test_jvp_matches_dense_plan_in_each_input(k, zero, batch):
    primals = _data(k=k, zero=zero, batch=batch)
    tangents = _tangents(primals)
    for i, name in enumerate(NAMES):
        # One input at a time (the others held fixed): each term of the rule is checked alone.
        def fast(t, i=i):
            return _fast(*primals[:i], t, *primals[i + 1:])

        def dense(t, i=i):
            return _dense(*primals[:i], t, *primals[i + 1:])

        out, tan = torch.func.jvp(fast, (primals[i],), (tangents[i],))
        ref_out, ref_tan = torch.func.jvp(dense, (primals[i],), (tangents[i],))
        _close(out, ref_out, f"P V ({name})")
        _close(tan, ref_tan, f"d(P V) along {name}")
    out, tan = torch.func.jvp(_fast, primals, tangents)
    _close(tan, torch.func.jvp(_dense, primals, tangents)[1], "d(P V) along all inputs")


def test_jvp_matches_finite_differences():
    primals = _data()
    tangents = _tangents(primals)
    _, tan = torch.func.jvp(_fast, primals, tangents)
    h = 1e-5
    plus = _fast(*(p + h * t for p, t in zip(primals, tangents)))
    minus = _fast(*(p - h * t for p, t in zip(primals, tangents)))
    # Central differences: error O(h^2) ~ 1e-10 relative, plus roundoff ~ 1e-16 / h.
    _close(tan, (plus - minus) / (2 * h), "d(P V) against central differences", tol=1e-8)


def test_row_sums_jvp_without_operand():
    x, y, f, g, V, a, b = _data()
    ones = torch.ones(y.shape[0], dtype=F64)
    tangents = _tangents((x, y, f, g))

    def fast(x, y, f, g):
        return plan_matmul(x, y, f, g, None, a=a, b=b, eps=EPS, cost_scale=C)

    def dense(x, y, f, g):
        return _dense(x, y, f, g, ones, a, b)

    _close(torch.func.jvp(fast, (x, y, f, g), tangents)[1], torch.func.jvp(dense, (x, y, f, g), tangents)[1],
           "d(P 1)")


def test_forward_ad_dual_tensors():
    primals = _data()
    tangents = _tangents(primals)
    with fwAD.dual_level():
        out = _fast(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        tan = fwAD.unpack_dual(out).tangent
    _close(tan, torch.autograd.functional.jvp(_dense, primals, tangents)[1], "forward_ad d(P V)")


def test_operator_products_jvp():
    """``PlanOperator(...) @ v`` and ``.T @ u``, differentiated in the data of the operator."""
    x, y, f, g, V, a, b = _data()
    u = torch.randn(x.shape[0], 2, dtype=F64)
    primals = (x, y, f, g, V, a, b)
    tangents = _tangents(primals)

    def fast(x, y, f, g, V, a, b):
        P = PlanOperator(x, y, f, g, eps=EPS, a=a, b=b, cost_scale=C)
        return P @ V, P.T @ u

    def dense(x, y, f, g, V, a, b):
        ones = torch.eye(y.shape[0], dtype=F64)
        P = _dense(x, y, f, g, ones, a, b)
        return P @ V, P.T @ u

    got = torch.func.jvp(fast, primals, tangents)[1]
    expected = torch.func.jvp(dense, primals, tangents)[1]
    _close(got[0], expected[0], "d(P @ V)")
    _close(got[1], expected[1], "d(P.T @ u)")


def test_jacfwd_matches_reverse_jacobians():
    primals = _data(n=4, m=3, k=2)
    argnums = tuple(range(7))
    fwd = torch.func.jacfwd(_fast, argnums=argnums)(*primals)
    dense = torch.func.jacrev(_dense, argnums=argnums)(*primals)
    # The plan's own backward, one vector-Jacobian product per output entry.
    rev = torch.autograd.functional.jacobian(_fast, primals)
    for name, j_fwd, j_dense, j_rev in zip(NAMES, fwd, dense, rev):
        _close(j_fwd, j_dense, f"jacfwd in {name} against the dense plan")
        _close(j_fwd, j_rev, f"jacfwd in {name} against the plan's backward")


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_over_a_batch_of_operands(batch, in_dim):
    x, y, f, g, _, a, b = _data(batch=batch)
    lead = () if batch is None else (batch,)
    Vs = torch.randn(4, *lead, y.shape[-2], 2, dtype=F64).movedim(0, in_dim)
    got = torch.func.vmap(lambda V: _fast(x, y, f, g, V, a, b), in_dims=in_dim)(Vs)
    expected = torch.stack([_dense(x, y, f, g, V, a, b) for V in Vs.movedim(in_dim, 0)])
    _close(got, expected, "vmap over V")


def test_vmap_over_clouds_and_potentials():
    data = [_data(seed=s) for s in range(3)]
    stacked = [torch.stack(ts) for ts in zip(*data)]
    got = torch.func.vmap(_fast)(*stacked)
    expected = torch.stack([_dense(*d) for d in data])
    _close(got, expected, "vmap over every input")


def test_triton_jvp_matches_torch():
    """The Triton kernels (the interpreter without a GPU) carry the same rule: float32."""
    primals = tuple(t.to(DEVICE) for t in _data(n=9, m=7, d=3, k=2, zero=True, dtype=torch.float32))
    tangents = _tangents(primals)
    results = {}
    for backend in ("torch", "triton"):
        def fn(*args, backend=backend):
            return plan_matmul(*args[:5], a=args[5], b=args[6], eps=EPS, cost_scale=C, backend=backend)

        results[backend] = torch.func.jvp(fn, primals, tangents)
    for got, expected, name in zip(results["triton"], results["torch"], ("P V", "d(P V)")):
        _close(got, expected, f"triton {name}", tol=2e-4)


def test_triton_vmap_and_jacfwd_match_torch():
    x, y, f, g, V, a, b = (t.to(DEVICE) for t in _data(n=9, m=7, d=3, k=2, dtype=torch.float32))
    Vs = torch.randn(3, *V.shape).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        def fn(x, V, backend=backend):
            return plan_matmul(x, y, f, g, V, a=a, b=b, eps=EPS, cost_scale=C, backend=backend)

        results[backend] = (torch.func.vmap(fn, in_dims=(None, 0))(x, Vs), torch.func.jacfwd(fn)(x, V))
    for got, expected, name in zip(results["triton"], results["torch"], ("vmap", "jacfwd")):
        _close(got, expected, f"triton {name}", tol=2e-4)


def test_vmap_still_checks_values():
    x, y, f, g, _, a, b = _data()
    Vs = torch.randn(3, y.shape[0], dtype=F64)
    Vs[1, 2] = float("nan")
    with pytest.raises(ValueError, match="V"):
        torch.func.vmap(lambda V: _fast(x, y, f, g, V, a, b))(Vs)


# --------------------------------------------------------------------------
# solvers.solve under torch.autograd.forward_ad
# --------------------------------------------------------------------------
def _system(n=7, k=None, symmetric=True, seed=3):
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(n, n, generator=gen, dtype=F64)
    A = R @ R.T + n * torch.eye(n, dtype=F64) if symmetric else R + 2 * n ** 0.5 * torch.eye(n, dtype=F64)
    dA = torch.randn(n, n, generator=gen, dtype=F64)
    if symmetric:
        dA = dA + dA.T
    shape = (n,) if k is None else (n, k)
    return A, torch.randn(shape, generator=gen, dtype=F64), dA, torch.randn(shape, generator=gen, dtype=F64)


@pytest.mark.parametrize("method,symmetric", [("cg", True), ("minres", True), ("gmres", False),
                                              ("bicgstab", False)])
@pytest.mark.parametrize("k", [None, 2])
def test_solve_forward_ad_matches_linalg_solve(method, symmetric, k):
    from solvers import solve

    A, b, dA, db = _system(k=k, symmetric=symmetric)
    expected = torch.func.jvp(torch.linalg.solve, (A, b), (dA, db))[1]
    with fwAD.dual_level():
        for dual_A, dual_b, want in ((fwAD.make_dual(A, dA), fwAD.make_dual(b, db), expected),
                                     (A, fwAD.make_dual(b, db), torch.linalg.solve(A, db)),
                                     (fwAD.make_dual(A, dA), b, expected - torch.linalg.solve(A, db))):
            x = solve(dual_A, dual_b, method, rtol=1e-13, maxiter=200).x
            primal, tangent = fwAD.unpack_dual(x)
            _close(primal, torch.linalg.solve(A, b), f"{method}: x", tol=1e-10)
            _close(tangent, want, f"{method}: dx", tol=1e-10)


class _ShiftedPlan:
    """``I + P(x, x)`` with the symmetric Gaussian-kernel plan: SPD, matrix-free."""

    def __init__(self, x, f):
        self.P = PlanOperator(x, x, f, f, eps=EPS, cost_scale=C)
        self.shape, self.dtype, self.device = self.P.shape, x.dtype, x.device

    def __matmul__(self, v):
        return v + self.P @ v


def test_solve_forward_ad_through_a_plan_operator():
    """The operator's own tangent (points and potentials) enters through PlanMatmul's jvp."""
    from solvers import solve

    x, _, f, _, _, _, _ = _data(n=8)
    b = torch.randn(8, dtype=F64)
    tx, tf = _tangents((x, f))

    def dense(x, f):
        P = _dense(x, x, f, f, torch.eye(8, dtype=F64), torch.ones(8, dtype=F64), torch.ones(8, dtype=F64))
        return torch.linalg.solve(torch.eye(8, dtype=F64) + P, b)

    expected = torch.func.jvp(dense, (x, f), (tx, tf))[1]
    with fwAD.dual_level():
        out = solve(_ShiftedPlan(fwAD.make_dual(x, tx), fwAD.make_dual(f, tf)), b, "cg", rtol=1e-13).x
        _close(fwAD.unpack_dual(out).tangent, expected, "dx through I + P", tol=1e-10)


@pytest.mark.parametrize("method,symmetric", [("cg", True), ("gmres", False)])
def test_solve_torch_func_jvp(method, symmetric):
    from solvers import solve

    A, b, dA, db = _system(symmetric=symmetric)
    got = torch.func.jvp(lambda A, b: solve(A, b, method, rtol=1e-13).x, (A, b), (dA, db))
    expected = torch.func.jvp(torch.linalg.solve, (A, b), (dA, db))
    _close(got[0], expected[0], f"{method}: x", tol=1e-10)
    _close(got[1], expected[1], f"{method}: dx", tol=1e-10)


# --------------------------------------------------------------------------
# Second order: mixed modes work, forward over forward refuses
# --------------------------------------------------------------------------
def test_forward_over_reverse_and_reverse_over_forward():
    primals = _data()
    w = torch.randn(primals[0].shape[0], primals[4].shape[-1], dtype=F64)
    tx, tf = _tangents((primals[0], primals[2]))

    def loss(fn):
        return lambda x, f: (fn(x, primals[1], f, *primals[3:]) * w).sum()

    fwd_rev = [torch.func.jvp(torch.func.grad(loss(fn), argnums=(0, 1)), (primals[0], primals[2]), (tx, tf))[1]
               for fn in (_fast, _dense)]
    for got, expected, name in zip(fwd_rev[0], fwd_rev[1], ("x", "f")):
        _close(got, expected, f"jvp(grad) in {name}")

    def rev_fwd(fn):
        def directional(x, f):
            return torch.func.jvp(loss(fn), (x, f), (tx, tf))[1]
        return torch.func.grad(directional, argnums=(0, 1))(primals[0], primals[2])

    for got, expected, name in zip(rev_fwd(_fast), rev_fwd(_dense), ("x", "f")):
        _close(got, expected, f"grad(jvp) in {name}")


def test_forward_over_forward_refuses():
    """torch drops a jvp rule's own dependence on the primals under an outer jvp: refused."""
    from solvers import solve

    primals = _data()
    tangents = _tangents(primals)
    with pytest.raises(NotImplementedError, match="plan_matmul: forward mode over forward mode"):
        torch.func.jvp(lambda *p: torch.func.jvp(_fast, p, tangents)[1], primals, tangents)
    A, b, dA, db = _system()
    with pytest.raises(NotImplementedError, match="solve: forward mode over forward mode"):
        torch.func.jvp(lambda b: torch.func.jvp(lambda b: solve(A, b, "cg").x, (b,), (db,))[1], (b,), (db,))


# --------------------------------------------------------------------------
# Reverse-mode transforms through the plan product (jacrev, hessian): its backward
# goes through PlanMatmul itself under torch.func
# --------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 2])
def test_jacrev_and_hessian_match_dense_plan(k):
    primals = _data(n=4, m=3, k=k, zero=True)
    argnums = tuple(range(7))
    rev = torch.func.jacrev(_fast, argnums=argnums)(*primals)
    dense = torch.func.jacrev(_dense, argnums=argnums)(*primals)
    for name, got, expected in zip(NAMES, rev, dense):
        _close(got, expected, f"jacrev in {name}")
    w = torch.randn(primals[0].shape[0], *((k,) if k else ()), generator=torch.Generator().manual_seed(9),
                    dtype=F64)

    def scalar(fn):
        return lambda *p: (fn(*p) * w).sum()

    for argnums in ((0, 1), (2, 3), (0, 4), (5, 6)):
        got = torch.func.hessian(scalar(_fast), argnums=argnums)(*primals)
        expected = torch.func.hessian(scalar(_dense), argnums=argnums)(*primals)
        for i in range(len(argnums)):
            for j in range(len(argnums)):
                name = f"hessian block ({NAMES[argnums[i]]}, {NAMES[argnums[j]]})"
                if float(expected[i][j].abs().max()) == 0.0:     # P V is linear in V, in a: zero blocks
                    assert float(expected[i][j].abs().max()) == 0.0 and float(got[i][j].abs().max()) < 1e-12, name
                    continue
                _close(got[i][j], expected[i][j], name)
    _close(torch.func.jacrev(torch.func.grad(scalar(_fast)))(*primals),
           torch.func.jacrev(torch.func.grad(scalar(_dense)))(*primals), "jacrev of grad in x")


def test_vmap_of_grad_over_batched_data():
    """Per-sample gradients: the backward of a vmapped product."""
    data = [_data(seed=s) for s in range(3)]
    stacked = [torch.stack(ts) for ts in zip(*data)]

    def scalar(fn):
        return lambda *p: fn(*p).square().sum()

    got = torch.func.vmap(torch.func.grad(scalar(_fast), argnums=(0, 2, 4)))(*stacked)
    expected = torch.func.vmap(torch.func.grad(scalar(_dense), argnums=(0, 2, 4)))(*stacked)
    for g, e, name in zip(got, expected, ("x", "f", "V")):
        _close(g, e, f"vmap(grad) in {name}")


def test_plan_bilinear_reference_under_vmap(override):
    """The torch reference of plan_bilinear builds its blocks out of place on torch.func's
    tensors (in-place updates of unbatched temporaries by batched operands are refused)."""
    from otlinop.kernels import plan_bilinear_torch

    override(check_finite=False)        # values cannot be read back from vmap's tensors
    x, y, f, g, V, _, _ = _data(k=3)
    Ws = torch.randn(4, x.shape[0], 3, dtype=F64)
    gs = torch.randn(4, y.shape[0], dtype=F64)

    def fn(W, g):
        return plan_bilinear_torch(x, y, f, g, W, V, y, eps=EPS, cost_scale=C)

    got = torch.func.vmap(fn)(Ws, gs)
    expected = torch.stack([fn(W, g_) for W, g_ in zip(Ws, gs)])
    _close(got, expected, "vmap of plan_bilinear_torch")


def test_triton_jacrev_and_hessian_match_torch():
    x, y, f, g, V, a, b = (t.to(DEVICE) for t in _data(n=7, m=6, d=3, k=2, dtype=torch.float32))
    w = torch.randn(x.shape[0], 2).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        def fn(x, f, backend=backend):
            return (plan_matmul(x, y, f, g, V, a=a, b=b, eps=EPS, cost_scale=C, backend=backend) * w).sum()

        results[backend] = (torch.func.jacrev(torch.func.grad(fn))(x, f), torch.func.hessian(fn)(x, f))
    for got, expected, name in zip(results["triton"], results["torch"], ("jacrev(grad)", "hessian")):
        _close(got, expected, f"triton {name}", tol=2e-4)


# --------------------------------------------------------------------------
# HessianOperator @ v under the transforms, against the dense Schur complement
# --------------------------------------------------------------------------
def _schur_dense(x, y, f, g, a, b, reach_x=None, ridge=1e-9):
    """S = ky Diag(bh) - P.T Diag(1 / (kx ah)) P + ridge mean(bh) I from the dense plan."""
    from otlinop.hessian import row_weight

    P = _dense(x, y, f, g, torch.eye(y.shape[-2], dtype=F64), a, b)
    kx = 1.0 if reach_x is None else (reach_x ** 2 + EPS) / reach_x ** 2
    ah, bh = P.sum(-1), P.sum(-2)
    return torch.diag(bh + ridge * bh.mean()) - P.T @ (row_weight(kx * ah)[:, None] * P)


@pytest.mark.parametrize("reach_x", [None, 0.8])
def test_hessian_operator_transforms(reach_x):
    from otlinop.hessian import HessianOperator

    x, y, f, g, _, a, b = _data(n=6, m=5)
    v = torch.randn(y.shape[0], dtype=F64, generator=torch.Generator().manual_seed(4))

    def fast(x, f, v):
        return HessianOperator(x, y, f, g, eps=EPS, a=a, b=b, cost_scale=C, reach_x=reach_x) @ v

    def dense(x, f, v):
        return _schur_dense(x, y, f, g, a, b, reach_x) @ v

    tangents = _tangents((x, f, v))
    for name, transform in (("jvp", lambda fn: torch.func.jvp(fn, (x, f, v), tangents)[1]),
                            ("jacfwd", lambda fn: torch.func.jacfwd(fn, argnums=(0, 1))(x, f, v)),
                            ("jacrev", lambda fn: torch.func.jacrev(fn, argnums=(0, 1))(x, f, v)),
                            ("grad", lambda fn: torch.func.grad(lambda *p: fn(*p).square().sum(),
                                                                argnums=(0, 1, 2))(x, f, v)),
                            ("jvp(grad)", lambda fn: torch.func.jvp(
                                torch.func.grad(lambda x: fn(x, f, v).square().sum()), (x,), (tangents[0],))[1]),
                            ("hessian", lambda fn: torch.func.hessian(lambda x: (v * fn(x, f, v)).sum())(x))):
        got, expected = transform(fast), transform(dense)
        for i, (gt, et) in enumerate(zip(*(t if isinstance(t, tuple) else (t,) for t in (got, expected)))):
            _close(gt, et, f"HessianOperator @ v: {name} [{i}]")
    Vs = torch.randn(3, y.shape[0], dtype=F64)
    _close(torch.func.vmap(lambda v: fast(x, f, v))(Vs), Vs @ _schur_dense(x, y, f, g, a, b, reach_x).T,
           "vmap over v")


def test_hessian_operator_and_solve_triton_match_torch():
    """HessianOperator @ v (jacrev, jvp, vmap) and a solve with a plan operator (vmap over b,
    jacfwd) through the Triton kernels (the interpreter without a GPU), float32."""
    from otlinop.hessian import HessianOperator
    from solvers import solve

    x, y, f, g, _, a, b = (t.to(DEVICE) for t in _data(n=7, m=6, d=3, dtype=torch.float32))
    v = torch.randn(y.shape[0]).to(DEVICE)
    Vs = torch.randn(3, y.shape[0]).to(DEVICE)
    rhs = torch.randn(3, x.shape[0]).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        def S_v(x, v, backend=backend):
            return HessianOperator(x, y, f, g, eps=EPS, a=a, b=b, cost_scale=C, backend=backend) @ v

        def shifted(r, backend=backend):
            P = PlanOperator(x, x, f, f, eps=EPS, cost_scale=C, backend=backend)
            op = type("Shifted", (), {"shape": P.shape, "dtype": P.dtype, "device": P.device,
                                      "__matmul__": lambda self, u: u + P @ u})()
            return solve(op, r, "cg", rtol=1e-6).x

        results[backend] = [torch.func.jacrev(S_v)(x, v), torch.func.jvp(S_v, (x, v), (x, v))[1],
                            torch.func.vmap(lambda v: S_v(x, v))(Vs), torch.func.vmap(shifted)(rhs),
                            torch.func.jacfwd(shifted)(rhs[0])]
    for name, got, expected in zip(("jacrev S v", "jvp S v", "vmap S v", "vmap solve", "jacfwd solve"),
                                   results["triton"], results["torch"]):
        _close(got, expected, f"triton {name}", tol=2e-4)


# --------------------------------------------------------------------------
# solvers.solve under the transforms (in b) and vmap (k right-hand sides, one solve)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method,symmetric", [("cg", True), ("minres", True), ("gmres", False),
                                              ("bicgstab", False)])
def test_solve_transforms_in_b(method, symmetric):
    from solvers import solve

    A, b, _, db = _system(symmetric=symmetric)
    Ainv = torch.linalg.inv(A)

    def x_of(b):
        return solve(A, b, method, rtol=1e-13, maxiter=200).x

    _close(torch.func.jacrev(x_of)(b), Ainv, f"{method}: jacrev")
    _close(torch.func.jacfwd(x_of)(b), Ainv, f"{method}: jacfwd")
    _close(torch.func.grad(lambda b: x_of(b).square().sum())(b), 2 * Ainv.T @ Ainv @ b, f"{method}: grad")
    hessian = 2 * Ainv.T @ Ainv
    _close(torch.func.hessian(lambda b: x_of(b).square().sum())(b), hessian, f"{method}: hessian")
    _close(torch.func.jvp(torch.func.grad(lambda b: x_of(b).square().sum()), (b,), (db,))[1], hessian @ db,
           f"{method}: jvp(grad)")
    # Central differences of the solution: exact for a linear map, up to the solves' tolerance.
    h = 1e-3
    _close(torch.func.jvp(x_of, (b,), (db,))[1], (x_of(b + h * db) - x_of(b - h * db)) / (2 * h),
           f"{method}: jvp against finite differences", tol=1e-9)


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("in_dim", [0, -1])
def test_solve_vmap_is_one_solve_with_more_columns(k, in_dim):
    from solvers import solve

    A, _, _, _ = _system()
    shape = (7,) if k is None else (7, k)
    Bs = torch.randn(4, *shape, dtype=F64).movedim(0, in_dim)
    calls = []

    class Counting:
        shape, dtype, device = A.shape, A.dtype, A.device

        def __matmul__(self, v):
            calls.append(tuple(v.shape))
            return A @ v

    x0 = torch.zeros(shape, dtype=F64)
    got = torch.func.vmap(lambda b: solve(Counting(), b, "cg", rtol=1e-13, x0=x0).x, in_dims=in_dim)(Bs)
    expected = torch.linalg.solve(A, Bs.movedim(in_dim, 0).reshape(4, 7, -1).movedim(0, -1).reshape(7, -1))
    _close(got.reshape(4, -1) if k is None else got, expected.reshape(7, -1, 4).movedim(-1, 0).reshape(
        (4, 7) if k is None else (4, 7, k)), "vmap of solve")
    # Every product but one probe of the operator (a vector: which tensors does it depend
    # on?) saw all 4 (times k) columns at once: one solve, not a loop.
    products = [shape_ for shape_ in calls if shape_ != (7,)]
    assert len(calls) - len(products) <= 1 and products, calls
    assert all(shape_[-1] == 4 * (k or 1) for shape_ in products), calls


def test_solve_vmap_through_a_plan_operator():
    from solvers import solve

    x, _, f, _, _, _, _ = _data(n=8)
    Bs = torch.randn(3, 8, dtype=F64)
    P = _dense(x, x, f, f, torch.eye(8, dtype=F64), torch.ones(8, dtype=F64), torch.ones(8, dtype=F64))
    got = torch.func.vmap(lambda b: solve(_ShiftedPlan(x, f), b, "cg", rtol=1e-13).x)(Bs)
    _close(got, torch.linalg.solve(torch.eye(8, dtype=F64) + P, Bs.T).T, "vmap of solve with I + P")


def test_solve_unsupported_transforms_raise():
    from solvers import solve

    A, b, _, _ = _system()
    with pytest.raises(NotImplementedError, match="solve: torch.func.vmap over the operator A"):
        torch.func.vmap(lambda A: solve(A, b, "cg").x)(torch.stack([A, A]))
    with pytest.raises(NotImplementedError, match="solve: reverse mode under torch.func"):
        torch.func.grad(lambda A: solve(A, b, "cg", rtol=1e-12).x.sum())(A)
    # Forward mode in A's tensors works (through _Tangent), and so does autograd's reverse mode.
    expected = torch.func.jacrev(lambda A: torch.linalg.solve(A, b))(A)
    _close(torch.func.jacfwd(lambda A: solve(A, b, "cg", rtol=1e-13).x)(A), expected, "jacfwd in A")
    Ai = A.clone().requires_grad_()
    rows = [torch.autograd.grad(solve(Ai, b, "cg", rtol=1e-13).x[i], Ai)[0] for i in range(A.shape[0])]
    _close(torch.stack(rows), expected, "torch.autograd reverse mode in A")
