"""``python -m otlinop.bench hvp``: Hessian-vector products at converged potentials.

At n = m = 10k, d = 64 (GPU; tiny sizes on a CPU), x ~ N(0, I), y ~ N(0.5, I),
random positive weights, eps = 0.5: potentials converged in float64, a float64
reference HVP ``H_xx A`` (checked against central finite differences of the
gradient), then otlinop's float32 HVP for M = None, jacobi(), neumann(3), with the CG
loop as a CUDA graph (``cg(graph=True)``), and on the truncated plan
(``truncate=``, ``PlanOperator.truncated``), one call each, and the Hessian
as an operator built once (``loss_hessian_operator``, truncated plan, the
inner CG as a graph captured per product or kept in a ``solvers.GraphCache``):
time (median), inner CG iterations and relative error against the reference.
The truncated rows with a CUDA graph are also run with the inner CG's vector
work in the fused kernels of ``solvers.cg`` (``config.cg_fused``, off by
default; "fused CG vector ops" in the table) instead of separate torch
operations, side by side; a fused row that fails is reported under the table
and the run goes on.

When flash-sinkhorn is importable (``flash_sinkhorn`` or ``ot_triton``), the same
run measures it in a subprocess of its own: its HVP from the same converged
potentials (``hvp_x_sqeuclid_from_potentials``, each preconditioner mode), and
its double backward through ``SamplesLoss`` after 50 Sinkhorn iterations (as in
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


def problem(n, d, device, seed, weights):
    """The suite's problem in float64: ``(x, y, a, b, A)``, A the direction of the HVP."""
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
    parser.add_argument("--d", type=int, default=None, help="dimension (default 64 on a GPU, 8 on a CPU)")
    parser.add_argument("--eps", type=float, default=0.5,
                        help="entropic regularisation of the problem (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="inner CG tolerance of the float32 HVPs (default: %(default)s)")
    parser.add_argument("--precision", default=None, help="kernel precision (default: the kernels' default)")
    parser.add_argument("--maxiter", type=int, default=2000, help="inner CG iteration limit (default: %(default)s)")
    parser.add_argument("--fd", action="store_true",
                        help="check the float64 reference against central finite differences (2 more solves)")
    parser.add_argument("--fd-step", type=float, default=1e-4,
                        help="relative step of the finite differences (default: %(default)s)")
    parser.add_argument("--cache", default=None, help="file to keep the float64 reference in between runs")
    parser.add_argument("--no-peer", action="store_true", help="skip flash-sinkhorn")
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

    from otlinop.hvp import grad_x, hvp_x, loss_hessian_operator
    from otlinop.plan import PlanOperator
    from solvers import GraphCache, jacobi, neumann
    from solvers import cg as default_cg

    cg = default_cg if cg is None else cg

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n = args.n or (10_000 if cuda else 300)
    d = args.d or (64 if cuda else 8)
    eps = args.eps
    print(f"device: {timing.device_name()}; n = m = {n}, d = {d}, eps = {eps}, {args.weights} weights, "
          f"inner rtol {args.rtol:g} (float32)")

    # ---- float64 reference: converged potentials, HVP, finite differences
    x, y, a, b, A = problem(n, d, device, args.seed, args.weights)
    key = (n, d, eps, args.seed, args.weights)
    cached = torch.load(args.cache) if args.cache and os.path.exists(args.cache) else None
    t0 = time.perf_counter()
    if cached is not None and cached["key"] == key:
        f, g, ref = (cached[k].to(device) for k in ("f", "g", "ref"))
        print(f"float64 reference read from {args.cache}")
    else:
        f, g, its = _converged(x, y, a, b, eps)
        print(f"float64 Sinkhorn: {its} alternating iterations to a potential change <= 1e-13 "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        ref, ref_info = hvp_x(x, y, f, g, A, eps=eps, a=a, b=b, rtol=1e-12, ridge=0.0)
        print(f"float64 reference HVP: {ref_info.n_iter} CG iterations ({time.perf_counter() - t0:.1f} s in all)",
              flush=True)
        if args.cache:
            torch.save({"key": key, "f": f.cpu(), "g": g.cpu(), "ref": ref.cpu()}, args.cache)
    if args.fd:
        h = args.fd_step * float(x.norm() / A.norm())
        grads = []
        for sign in (1.0, -1.0):
            xs = x + sign * h * A
            fs, gs, _ = _converged(xs, y, a, b, eps, f=f)
            grads.append(grad_x(xs, y, fs, gs, eps=eps, a=a, b=b))
        fd = (grads[0] - grads[1]) / (2 * h)
        print(f"float64 reference HVP vs central finite differences: {_rel(fd, ref):.1e} relative", flush=True)

    # ---- otlinop in float32
    x32, y32, a32, b32, A32, f32, g32 = (t.float() for t in (x, y, a, b, A, f, g))
    graphed = functools.partial(cg, graph=True)
    calls = [_Row("M = None", None, cg), _Row("M = jacobi()", jacobi(), cg), _Row("M = neumann(3)", neumann(3), cg),
             _Row("M = jacobi(), cg graph", jacobi(), graphed)]
    for tol in args.truncate:
        calls += [_Row(f"M = jacobi(), truncate={tol:g}", jacobi(), cg, truncate=tol),
                  _Row(f"M = jacobi(), truncate={tol:g}, cg graph", jacobi(), graphed, truncate=tol),
                  _Row(f"M = jacobi(), truncate={tol:g}, cg graph, {FUSED_LABEL}", jacobi(), graphed,
                       truncate=tol, fused=True)]
    rows = []     # (row, ms, inner CG iterations, relative error)
    failed = []   # (row, error) of fused-kernel rows that raised: the rest of the run goes on

    def measure(row, product, timed):
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
        rows.append((row, ms, solve.n_iter, _rel(H, ref)))
        converged = "" if row.operator else f", converged {solve.converged}"
        print(f"otlinop {row.label}: {ms:.2f} ms, {solve.n_iter} iterations{converged}, error {rows[-1][3]:.1e}",
              flush=True)

    with config.override(check_finite=False):    # restored on exit, errors included
        for row in calls:
            extra = {} if row.truncate is None else {"truncate": row.truncate}

            def run():
                return hvp_x(x32, y32, f32, g32, A32, eps=eps, a=a32, b=b32, M=row.M, rtol=args.rtol,
                             maxiter=args.maxiter, precision=args.precision, solver=row.solver, **extra)
            measure(row, run, run)
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
                measure(row, product, lambda: Hop @ flat)

    # ---- flash-sinkhorn, in its own process
    peer = None
    if cuda and not args.no_peer:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "problem.pt")
            torch.save({"x": x32.cpu(), "y": y32.cpu(), "a": a32.cpu(), "b": b32.cpu(), "f": f32.cpu(),
                        "g": g32.cpu(), "A": A32.cpu(), "eps": eps, "ref": ref.cpu()}, path)
            try:
                proc = subprocess.run([sys.executable, "-c", _PEER, path], capture_output=True, text=True,
                                      timeout=args.peer_timeout)
            except subprocess.TimeoutExpired:
                proc = subprocess.CompletedProcess([], 1, "", f"timed out after {args.peer_timeout} s")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        peer = json.loads(lines[-1]) if lines else {"error": (proc.stderr or proc.stdout)[-500:]}

    print()
    print("| library | HVP | ms | inner CG iterations | rel. error vs float64 |")
    print("|---|---|---|---|---|")
    for row, ms, its, err in rows:
        print(f"| otlinop | {row.label} | {ms:.2f} | {its} | {err:.1e} |")
    for row, err in failed:
        print(f"| otlinop | {row.label} | failed: {err} | - | - |")
    if peer is not None and "error" not in peer:
        label = f"{peer['module']} {peer['version']}"
        for mode, r in peer["from_potentials"].items():
            print(f"| {label} | from potentials, {mode} | {r['ms']:.2f} | {r['iters']}"
                  f"{'' if r['converged'] else ' (not converged)'} | {r['rel_err']:.1e} |")
        for mode, r in peer["double_backward"].items():
            print(f"| {label} | double backward (50 its), {mode} | {r['ms']:.2f} | - | {r['rel_err']:.1e} |")
        best_peer = min(r["ms"] for r in peer["double_backward"].values())
        exact = min(ms for row, ms, _, _ in rows if row.truncate is None)
        print(f"\nfastest otlinop HVP on the exact plan vs fastest flash-sinkhorn double backward: "
              f"{best_peer / exact:.1f}x")
        for label, operator in (("one call, truncation included", False), ("operator built once", True)):
            trunc = [r for r in rows if r[0].truncate is not None and r[0].operator == operator and r[3] <= 1e-4]
            if trunc:
                row, ms, _, err = min(trunc, key=lambda r: r[1])
                print(f"fastest otlinop HVP on a truncated plan, {label} ({row.label}, error {err:.1e}) vs "
                      f"fastest flash-sinkhorn double backward: {best_peer / ms:.1f}x")
    elif peer is not None:
        print(f"\nflash-sinkhorn: not measured ({peer['error'].strip()})")
    elif not cuda:
        print("\n(no GPU: tiny CPU sizes, not benchmark figures; flash-sinkhorn needs CUDA)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
