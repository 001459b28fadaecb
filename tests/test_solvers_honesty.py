"""Solvers never claim a convergence they did not reach (issue 19, item 4).

Half-precision inputs run their recurrences in float32 and return x in the
input dtype; a converged status is checked against the true residual
``||b - A x||`` where the recursion can no longer be trusted; a singular
inconsistent system stops with a status naming it and a finite x.
"""

import pytest
import torch

from solvers import bicgstab, cg, gmres, jacobi, lsmr, minres

F64 = torch.float64
HALF = [torch.float16, torch.bfloat16]


def _spd(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    S = Q @ torch.diag(torch.linspace(1, 10, n, dtype=F64)) @ Q.T
    G = S + 0.3 * torch.randn(n, n, generator=g, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    return Q, S, G, b


def _true(A, x, b):
    """||b - A x|| in float64, of the x returned (A and b as the solver saw them)."""
    return float(torch.linalg.vector_norm(b.double() - A.double() @ x.double()))


SQUARE = [("cg", cg, "spd"), ("minres", minres, "spd"), ("gmres", gmres, "general"),
          ("bicgstab", bicgstab, "general")]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name, solve, kind", SQUARE)
@pytest.mark.parametrize("rtol", [1e-5, 3e-2])
def test_half_precision_status_matches_the_true_residual(dtype, name, solve, kind, rtol):
    _, S, G, b = _spd()
    A, b = (S if kind == "spd" else G).to(dtype), b.to(dtype)
    res = solve(A, b, rtol=rtol)
    assert res.x.dtype == dtype and res.x.shape == b.shape and bool(torch.isfinite(res.x).all())
    true = _true(A, res.x, b)
    bnorm = float(torch.linalg.vector_norm(b.double()))
    # The residual reported is the true one, computed with A applied in its own dtype: at
    # this resolution the product's own rounding moves it by up to ~20% from float64's.
    reported = float(res.residual_norm)
    assert reported == pytest.approx(true, rel=0.3)
    if res.converged:
        assert reported <= rtol * bnorm and true <= 1.3 * rtol * bnorm, res.status
    else:
        assert reported > rtol * bnorm, res.status
    if rtol == 3e-2:   # within the dtype's reach: it converges
        assert res.converged, res.status
    elif name != "gmres":
        # rtol=1e-5 is below what half precision resolves: said so, with a way out.
        assert not res.converged
        assert "true relative residual" in res.status and "resolves" in res.status, res.status


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_lsmr_runs_in_float32_and_returns_the_input_dtype(dtype):
    _, _, G, b = _spd()
    A, b = G.to(dtype), b.to(dtype)
    res = lsmr(A, b, atol=1e-2, btol=1e-2, maxiter=200)
    assert res.x.dtype == dtype and bool(torch.isfinite(res.x).all())
    true = _true(A, res.x, b)
    assert float(res.residual_norm) == pytest.approx(true, rel=0.2)
    assert res.converged, res.status


def test_half_precision_with_a_preconditioner_and_several_columns():
    _, S, _, b = _spd()
    B = torch.stack([b, 2 * b.flip(0)], dim=1).half()
    res = cg(S.half(), B, rtol=1e-2, M=jacobi())
    assert res.x.dtype == torch.float16 and res.x.shape == B.shape and res.converged, res.status
    for j in range(2):
        assert _true(S.half(), res.x[:, j], B[:, j]) <= 1e-2 * float(B[:, j].double().norm()) * 1.05


def test_float16_gmres_no_longer_raises_torchs_half_error():
    _, _, G, b = _spd()
    res = gmres(G.half(), b.half(), rtol=1e-2)
    assert res.converged and res.x.dtype == torch.float16
    # Below float16's resolution it cannot converge: the status says why, not "try M".
    res = gmres(G.half(), b.half(), rtol=1e-5, maxiter=40)
    assert not res.converged and "below what float16 resolves" in res.status, res.status


def _singular_inconsistent(dtype, n=50):
    Q, _, _, b = _spd(n)
    d = torch.linspace(0, 1, n, dtype=F64)
    A = Q @ torch.diag(d) @ Q.T          # PSD, one zero eigenvalue
    assert abs(float(Q[:, 0] @ b)) > 0.1  # b has a component in the null space
    return A.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name, solve", [("cg", cg), ("minres", minres), ("bicgstab", bicgstab)])
def test_singular_inconsistent_system_is_named_and_x_is_finite(dtype, name, solve):
    A, b = _singular_inconsistent(dtype)
    res = solve(A, b)
    assert not res.converged
    assert "singular or inconsistent" in res.status, res.status
    assert bool(torch.isfinite(res.x).all())
    # The true residual, to the rounding of a product with a huge x.
    assert float(res.residual_norm) == pytest.approx(_true(A, res.x, b), rel=0.2)


class _Overflowing:
    """An operator whose products overflow to inf after a few calls (finite A, b and x0 otherwise)."""

    def __init__(self, A, after):
        self.A, self.after, self.calls = A, after, 0
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device

    def __matmul__(self, v):
        self.calls += 1
        out = self.A @ v
        return out * float("inf") if self.calls > self.after else out


@pytest.mark.parametrize("name, solve", [("cg", cg), ("minres", minres), ("bicgstab", bicgstab),
                                         ("gmres", gmres)])
def test_non_finite_iterates_give_a_finite_x_and_a_status(name, solve):
    _, S, G, b = _spd()
    op = _Overflowing(S if name in ("cg", "minres") else G, after=3)
    res = solve(op, b, rtol=1e-12)
    assert not res.converged
    assert bool(torch.isfinite(res.x).all())
    assert "NaN or inf" in res.status and "singular or inconsistent" in res.status, res.status


def test_float64_behaviour_is_unchanged_where_the_recursion_is_trusted():
    _, S, G, b = _spd()
    res = cg(S, b, rtol=1e-10)
    assert res.converged and res.x.dtype == F64
    assert _true(S, res.x, b) <= 1e-10 * float(b.norm())
    # A column of b = 0 still stops at once with x = 0 (scipy's rule).
    B = torch.stack([b, torch.zeros_like(b)], dim=1)
    for solve, A in ((cg, S), (minres, S), (gmres, G), (bicgstab, G)):
        r = solve(A.half(), B.half(), rtol=1e-2)
        assert bool((r.x[:, 1] == 0).all()) and bool(r.column_converged[1]) and r.x.dtype == torch.float16
