"""``python -m otlinop.bench hvp``: Hessian-vector products at converged potentials.

At n = m = 10k (GPU; tiny sizes on a CPU), for each dimension of ``--d``
(default d = 64, a numerically sparse plan, then d = 3, a dense one), x ~ N(0, I),
y ~ N(0.5, I), random positive weights, eps = 0.5: potentials converged in
float64, a float64 reference HVP ``H_xx A`` for k = 16 directions A (checked
against central finite differences of the gradient with ``--fd``), then
otlinop's float32 HVP of the first direction for M = None, jacobi(), neumann(3),
with the CG loop as a CUDA graph (``cg(graph=True)``), and on the truncated plan
(``truncate=``, ``PlanOperator.truncated``), one call each, and the Hessian
as an operator built once (``loss_hessian_operator``, truncated plan, the
inner CG as a graph captured per product or kept in a ``solvers.GraphCache``):
time (median), inner CG iterations and relative error against the reference.
The jacobi() rows (streaming plan, eager and with a CUDA graph; truncated plan
with a graph) are also run with the inner CG's vector
work in the fused kernels of ``solvers.cg`` (``config.cg_fused``, off by
default; "fused CG vector ops" in the table) instead of separate torch
operations, side by side; a fused row that fails is reported under the table
and the run goes on. Batched rows run the k directions in one call (``A`` of
shape (n, d, k): one solve with k right-hand sides) beside the one-direction
row they compare with. Double-backward rows differentiate ``SamplesLoss``
(debias off, ``cost_scale=1``, ``blur = sqrt(eps)``, GeomLoss' schedule) twice
after its forward and first backward (``create_graph=True``, whose converging
iterations are timed and counted in a row of their own; docs/second-order.md).
Two torch.func rows time ``torch.func.grad`` of that loss and the
forward-over-reverse HVP ``torch.func.jvp(torch.func.grad(loss))`` (M =
jacobi()); under the table, ``(jvp(grad) - grad) / hvp_x``, the HVP's share
against the analytic ``hvp_x`` row (docs/forward-mode.md).

When flash-sinkhorn is importable (``flash_sinkhorn`` or ``ot_triton``, from
``--peer-path`` folders or the environment), the same run measures it in a
subprocess of its own: its HVP from the same converged potentials
(``hvp_x_sqeuclid_from_potentials``, each preconditioner mode), and its double
backward through ``SamplesLoss`` after 50 Sinkhorn iterations (as in
docs/benchmark-method.md section 4). The tables are Markdown.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from solvers import config

from . import timing

# The peer runs in its own process (its own Triton kernels and caches); it
# reads the problem from a file and prints one JSON line.
_PEER = r"""
import importlib, json, math, sys, time, warnings
for path in sys.argv[2:]:
    sys.path.insert(0, path)
import torch
data = torch.load(sys.argv[1])
mod = None
for name in ("flash_sinkhorn", "ot_triton"):
    try:
        mod = importlib.import_module(name)
        break
    except ImportError:
        pass
if mod is None:
    print(json.dumps({"error": "flash_sinkhorn / ot_triton not importable"}))
    raise SystemExit(0)
import triton.testing
from importlib import import_module
hvp_mod = import_module(mod.__name__ + ".hvp")
x, y, a, b, f, g, A = (data[k].cuda() for k in ("x", "y", "a", "b", "f", "g", "A"))
eps, ref = data["eps"], data["ref"].cuda()
out = {"module": mod.__name__, "version": getattr(mod, "__version__", "?"), "from_potentials": {}, "double_backward": {}}
f_hat, g_hat = hvp_mod.geomloss_to_ott_potentials(f, g, a, b, eps=eps)
def rel(u):
    return float((u.double() - ref).norm() / ref.norm())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for mode in ("none", "jacobi", "neumann"):
        run = lambda: hvp_mod.hvp_x_sqeuclid_from_potentials(x, y, f_hat, g_hat, A, eps=eps, preconditioner=mode)
        H, info = run()
        ms = float(triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median"))
        out["from_potentials"][mode] = {"ms": ms, "iters": int(info.cg_iters), "converged": bool(info.cg_converged),
                                        "rel_err": rel(H)}
    for mode in ("none", "jacobi", "neumann"):
        loss = mod.SamplesLoss("sinkhorn", blur=math.sqrt(eps), eps=eps, n_iters=50, use_epsilon_scaling=False,
                               debias=False, normalize=False, hvp_preconditioner=mode)
        xr = x.clone().requires_grad_(True)
        val = loss(a, xr, b, y)
        gx = torch.autograd.grad(val, xr, create_graph=True)[0]
        run = lambda: torch.autograd.grad((gx * A).sum(), xr, retain_graph=True)[0]
        H = run()
        ms = float(triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median"))
        out["double_backward"][mode] = {"ms": ms, "rel_err": rel(H)}
print(json.dumps(out))
"""


#: What the table says of the rows whose inner CG runs its vector work in the
#: fused kernels (``config.cg_fused``; off by default) instead of separate
#: torch operations: the same run then measures what they change.
FUSED_LABEL = "fused CG vector ops"


@dataclass(frozen=True, eq=False)
class _Row:
    """One otlinop row of the table: what it runs, and with which switch."""

    label: str                      # as printed
    M: object                       # the inner CG's preconditioner
    solver: object                  # the inner solver (cg, or cg with a graph)
    truncate: float | None = None   # the plan's truncation tolerance; None: the exact plan
    operator: bool = False          # loss_hessian_operator built once, then @ A; else one hvp_x call
    fused: bool = False             # config.cg_fused on; a failure is reported, not raised
    k: int = 1                      # directions in the call (A of shape (n, d, k) when k > 1)
    single: "_Row | None" = None    # for k > 1: the one-direction row it is compared with


def problem(n, d, device, seed, weights, k=1):
    """The suite's problem in float64: ``(x, y, a, b, A)``, A the direction of the HVP,
    or with ``k > 1`` the (n, d, k) block of k directions whose first is that one."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, device=device, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d, device=device, generator=gen, dtype=torch.float64) + 0.5
    if weights == "lognormal":   # about 3 decades
        a = torch.exp(1.3 * torch.randn(n, device=device, generator=gen, dtype=torch.float64))
        b = torch.exp(1.3 * torch.randn(n, device=device, generator=gen, dtype=torch.float64))
    else:
        a = torch.rand(n, device=device, generator=gen, dtype=torch.float64) + 0.5
        b = torch.rand(n, device=device, generator=gen, dtype=torch.float64) + 0.5
    A = torch.randn(n, d, device=device, generator=gen, dtype=torch.float64)
    if k > 1:
        more = torch.randn(n, d, k - 1, device=device, generator=gen, dtype=torch.float64)
        A = torch.cat([A[:, :, None], more], dim=2)
    return x, y, a / a.sum(), b / b.sum(), A


def _converged(x, y, a, b, eps, f=None, tol=1e-13, max_iter=200_000):
    """Alternating log-domain Sinkhorn in float64 on dense (n, m) matrices, to a
    potential change <= tol; returns (f, g, iterations). A reference: at 10k
    points the dense float64 cost (800 MB) is much faster to iterate on than
    recomputing it each pass, and the thousands of iterations that 1e-13 takes
    at eps = 0.5, d = 64 fit in seconds."""
    C = torch.cdist(x, y).square_()
    la, lb = a.log(), b.log()
    g = torch.zeros(y.shape[0], dtype=x.dtype, device=x.device)
    if f is None:
        f = -eps * torch.logsumexp(lb[None, :] - C / eps, dim=1)
    for it in range(1, max_iter + 1):
        g = -eps * torch.logsumexp(la[:, None] + (f[:, None] - C) / eps, dim=0)
        f_new = -eps * torch.logsumexp(lb[None, :] + (g[None, :] - C) / eps, dim=1)
        if it % 50 == 0 and float((f_new - f).abs().max()) <= tol * max(1.0, float(f_new.abs().max())):
            return f_new, g, it
        f = f_new
    raise RuntimeError(f"float64 reference Sinkhorn: no convergence in {max_iter} iterations")


def _rel(u, ref):
    return float((u.double() - ref).norm() / ref.norm())


def build_parser() -> argparse.ArgumentParser:
    """The suite's command-line options (``python -m otlinop.bench hvp --help``)."""
    parser = argparse.ArgumentParser(prog="python -m otlinop.bench hvp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="n = m (default 10000 on a GPU, 300 on a CPU)")
    parser.add_argument("--d", type=int, nargs="+", default=None,
                        help="dimensions, one table each (default 64 3 on a GPU, 8 3 on a CPU)")
    parser.add_argument("--eps", type=float, default=0.5,
                        help="entropic regularisation of the problem (default: %(default)s)")
    parser.add_argument("--k", type=int, default=16,
                        help="directions of the batched rows (1: no batched rows; default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="inner CG tolerance of the float32 HVPs (default: %(default)s)")
    parser.add_argument("--precision", default=None, help="kernel precision (default: the kernels' default)")
    parser.add_argument("--maxiter", type=int, default=2000, help="inner CG iteration limit (default: %(default)s)")
    parser.add_argument("--fd", action="store_true",
                        help="check the float64 reference against central finite differences (2 more solves)")
    parser.add_argument("--fd-step", type=float, default=1e-4,
                        help="relative step of the finite differences (default: %(default)s)")
    parser.add_argument("--cache", default=None,
                        help="file to keep the float64 references in between runs (one per case)")
    parser.add_argument("--no-peer", action="store_true", help="skip flash-sinkhorn")
    parser.add_argument("--peer-path", nargs="*", default=None,
                        help="folders holding flash-sinkhorn (pip --target), put first on its sys.path")
    parser.add_argument("--peer-timeout", type=float, default=240.0,
                        help="seconds for the flash-sinkhorn process (default: %(default)s)")
    parser.add_argument("--weights", choices=("random", "lognormal"), default="random",
                        help="random: uniform in [0.5, 1.5); lognormal: about 3 decades (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the problem (default: %(default)s)")
    parser.add_argument("--truncate", type=float, nargs="*", default=[1e-8],
                        help="tolerances of the truncated-plan rows (none: skip them; default: 1e-8)")
    return parser


def main(argv=None, *, cg=None) -> int:
    """Run the suite (options: ``--help``); returns the exit status.

    ``cg`` is the CG solver of every otlinop row (default ``solvers.cg``); a
    test passes one that fails.
    """
    parser = build_parser()
    args = parser.parse_args(argv)

    from solvers import cg as default_cg

    cuda = torch.cuda.is_available()
    n = args.n or (10_000 if cuda else 300)
    dims = args.d or ([64, 3] if cuda else [8, 3])
    for i, d in enumerate(dims):
        if i:
            print()
        _case(args, n, d, cuda, default_cg if cg is None else cg)
    return 0


def _reference(args, n, d, device):
    """The float64 problem, its converged potentials and the reference HVPs of its
    ``args.k`` directions, read from ``args.cache`` when it holds this case."""
    from otlinop.hvp import grad_x, hvp_x

    eps = args.eps
    x, y, a, b, A = problem(n, d, device, args.seed, args.weights, args.k)
    case = (n, d, eps, args.seed, args.weights, args.k)
    key = repr(case)
    # The cache maps repr(case) to {"key": case, "f", "g", "ref"}, one entry per case.
    store = torch.load(args.cache) if args.cache and os.path.exists(args.cache) else {}
    if not (isinstance(store, dict) and all(isinstance(v, dict) and "key" in v for v in store.values())):
        store = {}   # a cache of another layout: recomputed
    t0 = time.perf_counter()
    if key in store:
        f, g, ref = (store[key][k].to(device) for k in ("f", "g", "ref"))
        print(f"float64 reference read from {args.cache}")
    else:
        f, g, its = _converged(x, y, a, b, eps)
        print(f"float64 Sinkhorn: {its} alternating iterations to a potential change <= 1e-13 "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        ref, ref_info = hvp_x(x, y, f, g, A, eps=eps, a=a, b=b, rtol=1e-12, ridge=0.0)
        print(f"float64 reference HVP ({args.k} direction{'s' if args.k > 1 else ''} in one solve): "
              f"{ref_info.n_iter} CG iterations ({time.perf_counter() - t0:.1f} s in all)", flush=True)
        if args.cache:
            store[key] = {"key": case, "f": f.cpu(), "g": g.cpu(), "ref": ref.cpu()}
            torch.save(store, args.cache)
    A1, ref1 = (A[..., 0], ref[..., 0]) if args.k > 1 else (A, ref)
    if args.fd:
        h = args.fd_step * float(x.norm() / A1.norm())
        grads = []
        for sign in (1.0, -1.0):
            xs = x + sign * h * A1
            fs, gs, _ = _converged(xs, y, a, b, eps, f=f)
            grads.append(grad_x(xs, y, fs, gs, eps=eps, a=a, b=b))
        fd = (grads[0] - grads[1]) / (2 * h)
        print(f"float64 reference HVP vs central finite differences: {_rel(fd, ref1):.1e} relative", flush=True)
    return (x, y, a, b, f, g), (A1, ref1), (A, ref)


def _double_backward(args, data32, A32, ref, measure, cg):
    """The SamplesLoss rows: its forward and first backward (create_graph=True, the
    converging iterations), then its double backward for each preconditioner
    (``measure(run) -> (run(), ms)``; ``cg`` the inner solver)."""
    from otlinop.loss import SamplesLoss
    from solvers import jacobi, neumann

    x32, y32, a32, b32 = data32
    rows = []

    def loss(M):
        return SamplesLoss(blur=args.eps ** 0.5, debias=False, cost_scale=1.0, precision=args.precision,
                           hvp_solver=cg, hvp_preconditioner=M, hvp_rtol=args.rtol, hvp_maxiter=args.maxiter)

    L = loss(jacobi())

    def first():
        xr = x32.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(L(a32, xr, b32, y32), xr, create_graph=True)
        return xr, gx

    first()
    ms = timing.bench(first, warmup_ms=1, rep_ms=200)
    info = L.last_refinement
    label = (f"SamplesLoss forward + backward(create_graph=True): {info.n_iter} converging iterations, "
             f"marginal error {info.marginal_error:.0e} ({info.status})")
    rows.append((label, ms, "-", None))
    print(f"otlinop {label}: {ms:.2f} ms", flush=True)
    for name, M in (("None", None), ("jacobi()", jacobi()), ("neumann(3)", neumann(3))):
        L = loss(M)
        xr, gx = first()

        def run():
            return torch.autograd.grad((gx * A32).sum(), xr, retain_graph=True)[0]
        label = f"SamplesLoss double backward, M = {name}"
        H, ms = measure(run)
        rows.append((label, ms, L.last_hvp_solve.n_iter, _rel(H, ref)))
        print(f"otlinop {label}: {ms:.2f} ms, {L.last_hvp_solve.n_iter} iterations, error {rows[-1][3]:.1e}",
              flush=True)
    # torch.func (issue 23): grad(loss), then the forward-over-reverse HVP jvp(grad(loss)), which
    # runs that gradient's work and one HVP; their difference is what the HVP adds.
    L = loss(jacobi())
    grad = torch.func.grad(lambda x: L(a32, x, b32, y32))
    _, ms = measure(lambda: grad(x32))
    rows.append((FUNC_GRAD_LABEL, ms, "-", None))
    print(f"otlinop {FUNC_GRAD_LABEL}: {ms:.2f} ms", flush=True)
    H, ms = measure(lambda: torch.func.jvp(grad, (x32,), (A32,))[1])
    rows.append((FUNC_JVP_LABEL, ms, L.last_hvp_solve.n_iter, _rel(H, ref)))
    print(f"otlinop {FUNC_JVP_LABEL}: {ms:.2f} ms, {L.last_hvp_solve.n_iter} iterations, error {rows[-1][3]:.1e}",
          flush=True)
    return rows


#: The torch.func rows of :func:`_double_backward` (SamplesLoss, M = jacobi()).
FUNC_GRAD_LABEL = "torch.func.grad(SamplesLoss)"
FUNC_JVP_LABEL = "torch.func.jvp(torch.func.grad(SamplesLoss)) (forward over reverse), M = jacobi()"


def _case(args, n, d, cuda, cg):
    """One table: the problem at dimension d, every otlinop row, the peer's."""
    from otlinop.hvp import hvp_x, loss_hessian_operator
    from otlinop.plan import PlanOperator
    from solvers import GraphCache, jacobi, neumann

    device = "cuda" if cuda else "cpu"
    eps = args.eps
    print(f"device: {timing.device_name()}; n = m = {n}, d = {d}, eps = {eps}, {args.weights} weights, "
          f"inner rtol {args.rtol:g} (float32)")

    # ---- float64 reference: converged potentials, HVPs, finite differences
    (x, y, a, b, f, g), (A, ref), (Ak, refk) = _reference(args, n, d, device)

    # ---- otlinop in float32
    x32, y32, a32, b32, A32, f32, g32 = (t.float() for t in (x, y, a, b, A, f, g))
    Ak32 = Ak.float()
    graphed = functools.partial(cg, graph=True)
    calls = [_Row("M = None", None, cg), _Row("M = jacobi()", jacobi(), cg), _Row("M = neumann(3)", neumann(3), cg),
             _Row("M = jacobi(), cg graph", jacobi(), graphed),
             # The streaming plan's solve with the fused CG kernels, eager and captured: whether
             # config.cg_fused should be on by default (issue 18, item 2).
             _Row(f"M = jacobi(), {FUSED_LABEL}", jacobi(), cg, fused=True),
             _Row(f"M = jacobi(), cg graph, {FUSED_LABEL}", jacobi(), graphed, fused=True)]
    if args.k > 1:
        calls.append(_Row(f"M = jacobi(), k = {args.k} directions in one call", jacobi(), cg, k=args.k,
                          single=calls[1]))
    for tol in args.truncate:
        calls += [_Row(f"M = jacobi(), truncate={tol:g}", jacobi(), cg, truncate=tol),
                  _Row(f"M = jacobi(), truncate={tol:g}, cg graph", jacobi(), graphed, truncate=tol)]
        if args.k > 1:
            calls.append(_Row(f"M = jacobi(), truncate={tol:g}, cg graph, k = {args.k} directions in one call",
                              jacobi(), graphed, truncate=tol, k=args.k, single=calls[-1]))
        calls.append(_Row(f"M = jacobi(), truncate={tol:g}, cg graph, {FUSED_LABEL}", jacobi(), graphed,
                          truncate=tol, fused=True))
    rows = []     # (row, ms, inner CG iterations, relative error)
    failed = []   # (row, error) of fused-kernel rows that raised: the rest of the run goes on

    def measure(row, product, timed, reference):
        """Run ``product()`` -> (H, the inner solve's result) once, then time ``timed``; print the row."""
        try:
            with config.override(cg_fused=row.fused):
                H, solve = product()
                ms = timing.bench(timed, warmup_ms=1, rep_ms=200)
        except Exception as err:   # noqa: BLE001 - reported below the table
            if not row.fused:
                raise
            failed.append((row, f"{type(err).__name__}: {err}"))
            print(f"otlinop {row.label}: failed ({failed[-1][1]})", flush=True)
            return
        rows.append((row, ms, solve.n_iter, _rel(H, reference)))
        converged = "" if row.operator else f", converged {solve.converged}"
        print(f"otlinop {row.label}: {ms:.2f} ms, {solve.n_iter} iterations{converged}, error {rows[-1][3]:.1e}",
              flush=True)

    with config.override(check_finite=False):    # restored on exit, errors included
        for row in calls:
            extra = {} if row.truncate is None else {"truncate": row.truncate}
            direction, reference = (Ak32, refk) if row.k > 1 else (A32, ref)

            def run():
                return hvp_x(x32, y32, f32, g32, direction, eps=eps, a=a32, b=b32, M=row.M, rtol=args.rtol,
                             maxiter=args.maxiter, precision=args.precision, solver=row.solver, **extra)
            measure(row, run, run, reference)
        for tol in args.truncate:
            Pt = PlanOperator(x32, y32, f32, g32, eps=eps, a=a32, b=b32, precision=args.precision).truncated(tol)
            print(f"truncate={tol:g}: {Pt!r}")
            # The Hessian as an operator: the plan is truncated (and M bound) once, then every
            # product reuses them, as a double backward reuses its forward graph; with a
            # GraphCache the inner CG's captured iteration is reused too.
            for what, solver, fused in (("cg graph", graphed, False),
                                        ("cg GraphCache", functools.partial(cg, graph=GraphCache()), False),
                                        (f"cg GraphCache, {FUSED_LABEL}", functools.partial(cg, graph=GraphCache()),
                                         True)):
                row = _Row(f"loss_hessian_operator(truncate={tol:g}, M = jacobi(), {what}) @ A, built once",
                           jacobi(), solver, truncate=tol, operator=True, fused=fused)
                Hop = loss_hessian_operator(x32, y32, f32, g32, eps=eps, a=a32, b=b32, M=row.M, rtol=args.rtol,
                                            maxiter=args.maxiter, precision=args.precision, truncate=tol,
                                            solver=solver)
                flat = A32.reshape(-1)

                def product():
                    H = (Hop @ flat).reshape(A32.shape)
                    return H, Hop.last_solve
                measure(row, product, lambda: Hop @ flat, ref)

        def timed(run):
            H = run()
            return H, timing.bench(run, warmup_ms=1, rep_ms=200)
        double = _double_backward(args, (x32, y32, a32, b32), A32, ref, timed, cg)

    # ---- flash-sinkhorn, in its own process
    peer = None
    if cuda and not args.no_peer:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "problem.pt")
            torch.save({"x": x32.cpu(), "y": y32.cpu(), "a": a32.cpu(), "b": b32.cpu(), "f": f32.cpu(),
                        "g": g32.cpu(), "A": A32.cpu(), "eps": eps, "ref": ref.cpu()}, path)
            try:
                proc = subprocess.run([sys.executable, "-c", _PEER, path, *(args.peer_path or [])],
                                      capture_output=True, text=True, timeout=args.peer_timeout)
            except subprocess.TimeoutExpired:
                proc = subprocess.CompletedProcess([], 1, "", f"timed out after {args.peer_timeout} s")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        peer = json.loads(lines[-1]) if lines else {"error": (proc.stderr or proc.stdout)[-500:]}

    print()
    print(f"d = {d}:")
    print()
    print("| library | HVP | ms | inner CG iterations | rel. error vs float64 |")
    print("|---|---|---|---|---|")
    for row, ms, its, err in rows:
        print(f"| otlinop | {row.label} | {ms:.2f} | {its} | {err:.1e} |")
    for row, err in failed:
        print(f"| otlinop | {row.label} | failed: {err} | - | - |")
    for label, ms, its, err in double:
        print(f"| otlinop | {label} | {ms:.2f} | {its} | {'-' if err is None else f'{err:.1e}'} |")
    if peer is not None and "error" not in peer:
        label = f"{peer['module']} {peer['version']}"
        for mode, r in peer["from_potentials"].items():
            print(f"| {label} | from potentials, {mode} | {r['ms']:.2f} | {r['iters']}"
                  f"{'' if r['converged'] else ' (not converged)'} | {r['rel_err']:.1e} |")
        for mode, r in peer["double_backward"].items():
            print(f"| {label} | double backward (50 its), {mode} | {r['ms']:.2f} | - | {r['rel_err']:.1e} |")
    print()
    analytic = next((r for r in rows if r[0].label == "M = jacobi()"), None)
    times = {label: ms for label, ms, _, _ in double}
    if analytic is not None and FUNC_GRAD_LABEL in times and FUNC_JVP_LABEL in times:
        added = times[FUNC_JVP_LABEL] - times[FUNC_GRAD_LABEL]
        print(f"forward over reverse: (jvp(grad) - grad) / hvp_x(M = jacobi()) = {added / analytic[1]:.2f} "
              f"({times[FUNC_JVP_LABEL]:.2f} - {times[FUNC_GRAD_LABEL]:.2f} against {analytic[1]:.2f} ms)")
    for row, ms, _, err in rows:
        one = next((r for r in rows if r[0] is row.single), None)
        if row.k > 1 and one is not None:
            print(f"{row.k} directions in one call ({row.label}): {ms / one[1]:.1f}x the time of one direction "
                  f"({ms:.2f} against {one[1]:.2f} ms; errors {err:.1e} and {one[3]:.1e})")
    if peer is not None and "error" not in peer:
        best_peer = min(r["ms"] for r in peer["double_backward"].values())
        exact = min(ms for row, ms, _, _ in rows if row.truncate is None and row.k == 1)
        print(f"fastest otlinop HVP on the exact plan vs fastest flash-sinkhorn double backward: "
              f"{best_peer / exact:.1f}x")
        for label, operator in (("one call, truncation included", False), ("operator built once", True)):
            trunc = [r for r in rows if r[0].truncate is not None and r[0].operator == operator and r[0].k == 1
                     and r[3] <= 1e-4]
            if trunc:
                row, ms, _, err = min(trunc, key=lambda r: r[1])
                print(f"fastest otlinop HVP on a truncated plan, {label} ({row.label}, error {err:.1e}) vs "
                      f"fastest flash-sinkhorn double backward: {best_peer / ms:.1f}x")
        ours = min((r for r in double if r[3] is not None), key=lambda r: r[1])
        print(f"fastest otlinop SamplesLoss double backward ({ours[0]}, error {ours[3]:.1e}) vs fastest "
              f"flash-sinkhorn double backward: {best_peer / ours[1]:.1f}x")
    elif peer is not None:
        print(f"flash-sinkhorn: not measured ({peer['error'].strip()})")
    elif not cuda:
        print("(no GPU: tiny CPU sizes, not benchmark figures; flash-sinkhorn needs CUDA)")


if __name__ == "__main__":
    raise SystemExit(main())
