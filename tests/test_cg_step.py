"""The fused CG iteration (solvers._cg_step): Triton kernels against the
torch reference (interpreter on CPU, compiled on CUDA), and cg on either.

Every test here can fail: the kernels are compared with the reference on
states that take a step, freeze a column (A or M not positive definite),
carry NaN, or are already frozen; cg's results on the fused path are
compared with the torch path's, and a graph replay with the eager loop.
"""

import pytest
import torch

from conftest import FakeGraphs, requires_cuda
from solvers import _cg_step as cg_step
from solvers import cg, config, jacobi

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
F64 = torch.float64

#: Relative agreement of the two backends (their sums run in different orders).
RTOL = {torch.float32: 2e-6, torch.float64: 1e-13}

SCALARS = ("rho", "rnorm", "active", "iters", "failed_pq", "failed_rho", "rho_new")


def _state(n, dtype, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    P, X, R = (torch.randn(n, generator=g, dtype=F64) for _ in range(3))
    Q = P * (1.0 + torch.rand(n, generator=g, dtype=F64))       # <P, Q> > 0
    Z = R * (0.5 + torch.rand(n, generator=g, dtype=F64))       # <R, Z> > 0
    if case == "A indefinite":
        Q = -Q
    elif case == "M indefinite":
        Z = -Z
    elif case == "nan":
        Q[n // 2] = float("nan")
    s = dict(P=P, Q=Q, X=X, R=R, Z=Z)
    s = {k: v.to(dtype=dtype, device=DEVICE) for k, v in s.items()}

    def scalar(v, dt=dtype):
        return torch.tensor(v, dtype=dt, device=DEVICE)
    s.update(rho=scalar(2.0), rnorm=scalar(1.0), active=scalar(case != "frozen", torch.bool),
             iters=scalar(3, torch.int64), failed_pq=scalar(1.0), failed_rho=scalar(1.0), rho_new=scalar(5.0),
             tol=scalar(1e-3 if case != "converges" else 1e3))
    return s


def _iteration(s, precond, backend):
    cg_step.cg_update(s["P"], s["Q"], s["X"], s["R"], s["rho"], s["rnorm"], s["active"], s["iters"], s["failed_pq"],
                      s["rho_new"], s["tol"], precond=precond, backend=backend)
    cg_step.cg_direction(s["R"], s["Z"] if precond else s["R"], s["P"], s["rho"], s["rho_new"], s["active"],
                         s["failed_rho"], precond=precond, backend=backend)
    return s


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("precond", [False, True])
@pytest.mark.parametrize("n", [1, 7, 2 * cg_step._BLOCK + 809])   # the last: three loop steps, a masked tail
@pytest.mark.parametrize("case", ["step", "converges", "A indefinite", "M indefinite", "nan", "frozen"])
def test_kernels_match_the_reference(dtype, precond, n, case):
    ref = _iteration(_state(n, dtype, case), precond, "torch")
    got = _iteration(_state(n, dtype, case), precond, "triton")
    for k in ("active", "iters"):
        assert torch.equal(got[k], ref[k]), k
    for k in ("P", "X", "R") + SCALARS:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL[dtype], atol=0, equal_nan=True, msg=k)
    # The cases do what they say (the reference is cg's own arithmetic).
    stepped = case in ("step", "converges", "M indefinite")
    assert int(ref["iters"]) == 3 + stepped
    assert bool(ref["active"]) == (case == "step" or (case == "M indefinite" and not precond))
    if case == "A indefinite":
        assert float(ref["failed_pq"]) < 0
    if case == "nan":
        assert torch.isnan(ref["failed_pq"])
    if case == "M indefinite":
        assert (float(ref["failed_rho"]) < 0) == precond


def test_kernels_are_deterministic():
    a = _iteration(_state(2 * cg_step._BLOCK + 809, torch.float32, "step"), True, "triton")
    b = _iteration(_state(2 * cg_step._BLOCK + 809, torch.float32, "step"), True, "triton")
    assert all(torch.equal(a[k], b[k]) for k in a)


_COMPILE = r"""
import os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from solvers import _cg_step as C
vectors = {"update": ("P", "Q", "X", "R", "RHO", "RNORM", "FAILED_PQ", "RHO_NEW", "TOL"),
           "direction": ("R", "Z", "P", "RHO", "RHO_NEW", "FAILED_RHO")}
for dt in ("fp32", "fp64"):
    for precond in (False, True):
        for name, fn in (("update", C._update_kernel), ("direction", C._direction_kernel)):
            sig = {a: ("*i1" if a == "ACTIVE" else "*i64" if a == "ITERS" else "i32" if a == "n" else
                       "constexpr" if a in ("PRECOND", "F64", "BLOCK") else "*" + dt) for a in fn.arg_names}
            consts = {"PRECOND": precond, "BLOCK": C._BLOCK}
            if "F64" in sig:
                consts["F64"] = dt == "fp64"
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": C._NUM_WARPS})
            assert "cubin" in k.asm and ("sqrt.rn.f32" in k.asm["ptx"]) == (name == "update" and dt == "fp32")
print("compiled 8")
"""


def test_kernels_compile_for_hopper():
    """The interpreter runs the kernels' arithmetic, not Triton's compiler: compile both
    kernels, every variant, to sm_90 machine code (Triton's bundled ptxas; no GPU needed),
    in a process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    if not cg_step.HAS_TRITON:
        pytest.skip("Triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=600, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's ptxas is not available here: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("compiled 8"), proc.stdout + proc.stderr


def test_check_state_names_what_is_wrong():
    s = _state(8, torch.float32, "step")
    vectors = dict(X=s["X"], R=s["R"], P=s["P"])
    scalars = {k: s[k] for k in SCALARS}
    cg_step.check_state("cg", vectors, scalars, "triton")
    with pytest.raises(ValueError, match=r"cg: R must match the first vector \(\(8,\), torch.float32"):
        cg_step.check_state("cg", dict(vectors, R=s["R"].double()), scalars, "torch")
    with pytest.raises(ValueError, match=r"cg: rho must have shape \(\) on"):
        cg_step.check_state("cg", vectors, dict(scalars, rho=s["rho"][None]), "torch")
    with pytest.raises(ValueError, match="backend='triton' takes 1-D float32 or float64 vectors"):
        cg_step.check_state("cg", {k: v[:, None] for k, v in vectors.items()},
                            {k: v[None] for k, v in scalars.items()}, "triton")
    with pytest.raises(ValueError, match="needs contiguous vectors"):
        strided = torch.zeros(16, device=DEVICE)[::2]
        cg_step.check_state("cg", dict(vectors, P=strided), scalars, "triton")
    with pytest.raises(ValueError, match="backend must be 'triton' or 'torch', got 'cuda'"):
        cg_step.check_state("cg", vectors, scalars, "cuda")


def test_fused_backend_is_chosen_for_one_short_cuda_rhs():
    """Off by default (until measured on a GPU); when on, one short CUDA right-hand side."""
    assert not config.cg_fused
    if CUDA:
        assert cg_step.fused_backend(torch.zeros(10, device="cuda")) == "torch"
    with config.override(cg_fused=True):
        assert cg_step.fused_backend(torch.zeros(10)) == "torch"           # CPU
        if CUDA:
            assert cg_step.fused_backend(torch.zeros(10, device="cuda")) == "triton"
            assert cg_step.fused_backend(torch.zeros(10, 2, device="cuda")) == "torch"
            assert cg_step.fused_backend(torch.zeros(10, device="cuda", dtype=torch.float16)) == "torch"
            n = config.cg_fused_max_n
            assert cg_step.fused_backend(torch.zeros(n, device="cuda")) == "triton"
            assert cg_step.fused_backend(torch.zeros(n + 1, device="cuda")) == "torch"
            # The kernels are real-only: complex systems take the torch branch.
            for dtype in (torch.complex64, torch.complex128):
                assert cg_step.fused_backend(torch.zeros(10, device="cuda", dtype=dtype)) == "torch"
        assert cg_step.fused_backend(torch.zeros(10, dtype=torch.complex64)) == "torch"
    if CUDA:
        assert cg_step.fused_backend(torch.zeros(10, device="cuda")) == "torch"


def test_fused_switch_is_restored_on_exit():
    saved = config.cg_fused, config.cg_fused_max_n
    with pytest.raises(RuntimeError, match="inside"):
        with config.override(cg_fused=True, cg_fused_max_n=4 * saved[1]):
            assert config.cg_fused and config.cg_fused_max_n == 4 * saved[1]
            raise RuntimeError("inside")
    assert (config.cg_fused, config.cg_fused_max_n) == saved


def _spd(n, dtype, seed=0, cond=1e2):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = (Q * torch.logspace(0, float(torch.log10(torch.tensor(cond))), n, dtype=F64)) @ Q.T
    return A.to(dtype=dtype, device=DEVICE), torch.randn(n, generator=g, dtype=F64).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("M", [None, "jacobi"])
def test_cg_on_the_fused_kernels_matches_the_torch_path(dtype, M):
    A, b = _spd(60, dtype)
    opts = dict(rtol=1e-5 if dtype == torch.float32 else 1e-10, M=jacobi() if M else None, check_every=3)
    ref = cg(A, b, _backend="torch", **opts)
    got = cg(A, b, _backend="triton", **opts)
    assert ref.converged and got.converged
    # Rounding in another order can move the iteration where the residual crosses rtol.
    assert abs(got.n_iter - ref.n_iter) <= max(1, ref.n_iter // 10)
    exact = torch.linalg.solve(A.double(), b.double())
    for res in (ref, got):
        assert ((A.double() @ res.x.double() - b.double()).norm() / b.double().norm()) <= 2 * opts["rtol"]
    assert (got.x.double() - exact).norm() / exact.norm() < (1e-3 if dtype == torch.float32 else 1e-7)
    # Identical inputs, identical outputs.
    again = cg(A, b, _backend="triton", **opts)
    assert torch.equal(again.x, got.x) and again.n_iter == got.n_iter


@pytest.mark.parametrize("M", [None, "jacobi"])
def test_fused_iterations_replayed_as_a_graph_are_the_eager_loop(M):
    """The captured iteration (here replayed on the CPU by conftest's FakeGraphs)
    runs the fused kernels on the graph's buffers: bitwise the eager loop, for
    a first solve and for later solves from a GraphCache."""
    import solvers
    A, b = _spd(40, torch.float32)
    opts = dict(rtol=1e-6, M=jacobi() if M else None, check_every=4, _backend="triton")
    rhs = [b, 2 * b.flip(0)]
    eager = [cg(A, v, **opts) for v in rhs]
    graphs = FakeGraphs()
    cache = solvers.GraphCache(graphs=graphs)
    got = [cg(A, v, graph=cache, **opts) for v in rhs]
    assert graphs.captures == 1 and graphs.replays > 0
    for e, r in zip(eager, got):
        assert torch.equal(r.x, e.x) and r.n_iter == e.n_iter and r.converged


@pytest.mark.parametrize("case", ["A indefinite", "M indefinite", "nan"])
def test_cg_on_the_fused_kernels_reports_what_stopped_it(case):
    A, b = _spd(20, F64)
    M = None
    if case == "A indefinite":
        A = -A
    elif case == "M indefinite":
        M = -torch.eye(20, dtype=F64, device=DEVICE)
    statuses = []
    for backend in ("torch", "triton"):
        res = cg(_NanOperator(A) if case == "nan" else A, b, M=M, rtol=1e-10, _backend=backend)
        assert not res.converged
        statuses.append(res.status)
    assert statuses[0] == statuses[1]
    word = {"A indefinite": "A is not positive definite", "M indefinite": "M is not positive definite",
            "nan": "non-finite"}[case]
    assert word in statuses[0], statuses[0]


def _hermitian(n, dtype=torch.complex128, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.complex(torch.randn(n, n, generator=g, dtype=F64), torch.randn(n, n, generator=g, dtype=F64))
    b = torch.complex(torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64))
    return (G @ G.mH / n + torch.eye(n, dtype=torch.complex128)).to(dtype), b.to(dtype)


def test_complex_step_is_the_real_step_of_the_embedding():
    """CG on a Hermitian A is CG on its real embedding [[Re A, -Im A], [Im A, Re A]] with
    [Re b; Im b]: Re(u^H v) is the real inner product of the embedded vectors. The complex
    state keeps real scalars, and the Triton branch refuses complex vectors."""
    A, b = _hermitian(12)
    E = torch.cat([torch.cat([A.real, -A.imag], 1), torch.cat([A.imag, A.real], 1)], 0)
    e = torch.cat([b.real, b.imag])
    for M in (None, "jacobi"):
        for steps in (1, 3, 8):
            z = cg(A, b, rtol=0.0, maxiter=steps, M=jacobi() if M else None)
            r = cg(E, e, rtol=0.0, maxiter=steps, M=jacobi() if M else None)
            assert z.x.dtype == torch.complex128 and z.residual_norm.dtype == F64
            torch.testing.assert_close(torch.cat([z.x.real, z.x.imag]), r.x, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(z.residual_norm, r.residual_norm, rtol=1e-10, atol=1e-14)
    vectors = dict(X=b.clone(), R=b.clone(), P=b.clone())
    real = torch.tensor(1.0, dtype=F64)
    scalars = dict(rho=real, rnorm=real, active=torch.tensor(True), iters=torch.tensor(0), failed_pq=real,
                   failed_rho=real, rho_new=real)
    cg_step.check_state("cg", vectors, scalars, "torch")
    with pytest.raises(ValueError, match="backend='triton' takes 1-D float32 or float64 vectors, got \\(12,\\) "
                                         "torch.complex128"):
        cg_step.check_state("cg", vectors, scalars, "triton")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_iterations_replayed_as_a_graph_are_the_eager_loop(dtype):
    """The complex torch branch also updates its state in place: a captured iteration
    (conftest's FakeGraphs) replays bitwise the eager loop."""
    import solvers
    A, b = _hermitian(30, dtype)
    opts = dict(rtol=1e-5 if dtype == torch.complex64 else 1e-10, M=jacobi(), check_every=4)
    eager = cg(A, b, **opts)
    graphs = FakeGraphs()
    got = cg(A, b, graph=solvers.GraphCache(graphs=graphs), **opts)
    assert graphs.captures == 1 and graphs.replays > 0 and eager.converged
    assert torch.equal(got.x, eager.x) and got.n_iter == eager.n_iter


class _NanOperator:
    """An operator whose products are NaN: what a broken matvec gives."""

    def __init__(self, A):
        self.A, self.shape, self.dtype, self.device = A, A.shape, A.dtype, A.device
        self.is_symmetric, self.is_psd = True, True

    def __matmul__(self, v):
        return (self.A @ v) * float("nan")


@requires_cuda
@pytest.mark.parametrize("M", [None, "jacobi"])
def test_gpu_cg_takes_the_fused_kernels_and_graphs_replay_them_bitwise(override, M):
    override(cg_fused=True)
    A, b = _spd(500, torch.float32)
    opts = dict(rtol=1e-6, M=jacobi() if M else None)
    # With the switch on, cg's own choice is the fused kernels: bitwise what forcing them gives.
    assert cg_step.fused_backend(b) == "triton"
    eager = cg(A, b, **opts)
    forced = cg(A, b, _backend="triton", **opts)
    assert torch.equal(eager.x, forced.x) and eager.n_iter == forced.n_iter
    graphed = cg(A, b, graph=True, **opts)
    assert torch.equal(graphed.x, eager.x) and graphed.n_iter == eager.n_iter
    ref = cg(A, b, _backend="torch", **opts)
    assert abs(ref.n_iter - eager.n_iter) <= 1
    assert (ref.x - eager.x).norm() / ref.x.norm() < 1e-4
