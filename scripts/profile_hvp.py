"""Developer probe (GPU): where the time of a truncated HVP goes.

python scripts/profile_hvp.py --cache REF.pt  -- the problem of
``python -m otlinop.bench hvp`` (n = m = 10k, d = 64, eps = 0.5; REF.pt is
that command's ``--cache`` file, which holds the converged potentials), then
``hvp_x(..., truncate=1e-8, M=jacobi(), solver=cg(graph=True))`` with a
synchronisation around each of its parts (the truncation, its marginals, its
pass, the transpose, the two sides, the CG loop and its capture), and the
wall time of cg alone for a few iteration limits (eager and graph). The
synchronisations add to the total. Not a benchmark of record.

The parts are library functions (some private, so their names may move):
each is wrapped by a timer for the run and restored on exit; one that is not
found is named and left out. The kernels' finiteness checks are off while it
runs (``config.check_finite``, restored on exit).
"""
import argparse
import contextlib
import functools
import importlib
import time
from unittest import mock

import torch

from otlinop import config
from otlinop.bench import timing
from otlinop.bench.hvp_bench import problem
from otlinop.hessian import HessianOperator
from otlinop.hvp import hvp_x
from otlinop.plan import PlanOperator
from solvers import cg, jacobi

#: (label, module, function) of the parts timed.
PARTS = (("truncation", "otlinop.truncated", "truncate_plan"), ("  marginals", "otlinop.truncated", "_marginals"),
         ("  plan_truncate", "otlinop.truncated", "plan_truncate"),
         ("  transpose", "otlinop.truncated", "_transpose_layout"), ("the two sides", "otlinop.hvp", "_Side"),
         ("cg loop", "solvers.cg", "run_loop"), ("  capture", "solvers.graphs", "capture"))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", required=True, help="the --cache file of python -m otlinop.bench hvp")
    parser.add_argument("--tol", type=float, default=1e-8)
    args = parser.parse_args()
    with config.override(check_finite=False), contextlib.ExitStack() as probes:
        run_probe(args, probes)


def run_probe(args, probes):
    # The bench's cache holds one entry per case: the d = 64 one.
    c = next(v for v in torch.load(args.cache).values() if v["key"][1] == 64)
    n, d, eps = c["key"][0], c["key"][1], c["key"][2]
    x, y, a, b, A = problem(n, d, "cuda", c["key"][3], c["key"][4])
    f, g = (c[k].cuda() for k in ("f", "g"))
    x, y, a, b, A, f, g = (t.float() for t in (x, y, a, b, A, f, g))

    acc = {}

    def timed(name, module, attr):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            mod = None
        fn = getattr(mod, attr, None)
        if fn is None:
            print(f"{name}: {module}.{attr} not found (renamed?), not timed")
            return

        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
            return out
        probes.enter_context(mock.patch.object(mod, attr, wrapper))   # restored when the probe ends

    for name, module, attr in PARTS:
        timed(name, module, attr)
    graphed = functools.partial(cg, graph=True)

    def run():
        return hvp_x(x, y, f, g, A, eps=eps, a=a, b=b, M=jacobi(), rtol=1e-5, truncate=args.tol, solver=graphed)
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
