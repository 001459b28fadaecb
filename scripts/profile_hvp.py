"""Developer probe (GPU): where the time of a truncated HVP goes.

python scripts/profile_hvp.py --cache REF.pt  -- the problem of
``python -m otlinop.bench hvp`` (n = m = 10k, d = 64, eps = 0.5; REF.pt is
that command's ``--cache`` file, which holds the converged potentials), then
``hvp_x(..., truncate=1e-8, M=jacobi(), solver=cg(graph=True))`` with a
synchronisation around each of its parts (the truncation, its marginals, its
pass, the transpose, the two sides, the CG loop and its capture), and the
wall time of cg alone for a few iteration limits (eager and graph). The
synchronisations add to the total. Not a benchmark of record.
"""
import argparse
import functools
import importlib
import time

import torch

from otlinop.bench import timing
from otlinop.bench.hvp_bench import _problem
from otlinop.hessian import HessianOperator
from otlinop.kernels import _common
from otlinop.plan import PlanOperator
from solvers import cg, jacobi

H = importlib.import_module("otlinop.hvp")
TR = importlib.import_module("otlinop.truncated")
L = importlib.import_module("solvers._loop")
CGM = importlib.import_module("solvers.cg")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", required=True, help="the --cache file of python -m otlinop.bench hvp")
    parser.add_argument("--tol", type=float, default=1e-8)
    args = parser.parse_args()
    _common._CHECK_FINITE = False
    c = torch.load(args.cache)
    n, d, eps = c["key"][0], c["key"][1], c["key"][2]
    x, y, a, b, A = _problem(n, d, "cuda", c["key"][3], c["key"][4])
    f, g = (c[k].cuda() for k in ("f", "g"))
    x, y, a, b, A, f, g = (t.float() for t in (x, y, a, b, A, f, g))

    acc = {}

    def timed(name, mod, attr):
        fn = getattr(mod, attr)

        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
            return out
        setattr(mod, attr, wrapper)

    for name, mod, attr in (("truncation", TR, "truncate_plan"), ("  marginals", TR, "_marginals"),
                            ("  plan_truncate", TR, "plan_truncate"), ("  transpose", TR, "_transpose_layout"),
                            ("the two sides", H, "_Side"), ("cg loop", CGM, "run_loop"),
                            ("  capture", L, "_capture")):
        timed(name, mod, attr)
    graphed = functools.partial(cg, graph=True)

    def run():
        return H.hvp_x(x, y, f, g, A, eps=eps, a=a, b=b, M=jacobi(), rtol=1e-5, truncate=args.tol, solver=graphed)
    for _ in range(3):
        run()
    acc.clear()
    reps = 5
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        run()
    torch.cuda.synchronize()
    print(f"hvp_x, truncate={args.tol:g}, cg graph (with the probe's synchronisations): "
          f"{(time.perf_counter() - t) / reps * 1e3:.2f} ms")
    for k, v in acc.items():
        print(f"{k}: {v / reps * 1e3:.2f} ms")
    Pt = PlanOperator(x, y, f, g, eps=eps, a=a, b=b).truncated(args.tol)
    S = HessianOperator.from_plan(Pt, eps=eps)
    rhs = torch.randn(n, device="cuda")
    rhs -= rhs.mean()
    print(f"{Pt!r}; S @ v device time {timing.graph_replay_ms(lambda: S @ rhs) * 1e3:.1f} us")
    for maxiter in (2, 3, 12, 64):
        for graph in (False, True):
            ms = timing.bench(lambda: cg(S, rhs, M=jacobi(), rtol=1e-12, maxiter=maxiter, graph=graph),
                               warmup_ms=1, rep_ms=200)
            print(f"cg maxiter={maxiter} graph={graph}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
