"""``python -m otlinop.bench sinkhorn``: time per Sinkhorn iteration, with the peers.

Protocol (docs/benchmark-method.md section 1): n = m, x ~ N(0, I), y ~ N(0.5, I), random positive
weights, eps = 0.5, float32, cost |x - y|^2. "Per iteration" is one full
iteration (both potentials updated), measured as
(T(70 iterations) - T(20 iterations)) / 50 with CUDA events, the median of 5;
the difference cancels the set-up, the first and last half-steps and the
final synchronisation. The peers' reference protocol takes T(60) - T(10); both runs are
shifted by 10 iterations so that otlinop's short run also replays its CUDA
graph (a run of at least ``sinkhorn.GRAPH_MIN_RUN`` = 16 steps at one eps is
captured once, a set-up cost that the difference cancels). A peer's time is
linear in the iterations either way. Peak memory is the extra device memory of a
20-iteration run, inputs excluded.

otlinop is timed through its public ``otlinop.sinkhorn``, one call per run
of k iterations, as a user calls it (:func:`ours_runner`): the call's
constant costs (argument checks with their one host synchronisation, the
result) are in both T(70) and T(20) and cancel in the difference.

Rows: otlinop's two methods ("symmetric": GeomLoss' averaged updates, both
potentials in one launch; "alternating": OTT's Gauss-Seidel updates) at
precision "tf32" and the strict default ("tf32x3", fp32 accuracy), then
flash-sinkhorn (TF32 and strict fp32) and OTT-JAX (online point cloud, default
and "highest" matmul precision) when they are importable, each library in its
own subprocess. A second table times the default GeomLoss-style call
(``SamplesLoss(blur=0.05)``, eps-scaling, with and without debiasing).

Peers can be installed from wheels without an index, e.g.
``pip install --no-index --no-deps --target /tmp/peers .whl/*.whl`` and
``--peer-path /tmp/peers`` (or PYTHONPATH). On a machine without a GPU a tiny
size runs, on the CPU: not a GPU figure.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings

import torch

from . import timing

EPS = 0.5
LO, HI, REPEATS, MEMORY_ITERS = 20, 70, 5, 20


# --------------------------------------------------------------------------
# Timing (also pasted into the peers' subprocesses, see _CHILD_COMMON)
# --------------------------------------------------------------------------
def _elapsed_ms(fn) -> float:
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def per_iteration_ms(run, lo: int = LO, hi: int = HI, repeats: int = REPEATS, *, clock=_elapsed_ms) -> float:
    """Median over ``repeats`` of ``(T(hi) - T(lo)) / (hi - lo)``; ``run(k)`` runs k iterations.

    Where ``hi - lo`` iterations take less than the timing noise of a call
    (tiny problems, whose per-call set-up varies more than 50 iterations
    cost), the median can come out <= 0; the span is then widened eightfold,
    twice at most, and a non-positive result after that raises RuntimeError
    rather than reporting a meaningless time. ``clock(fn)`` runs ``fn()`` and
    returns its time in ms (default: CUDA events on a GPU, the wall clock
    otherwise); a test passes a fake one.
    """
    run(lo)   # warm-up: compilation and autotuning
    span = hi - lo
    for attempt in range(3):
        if attempt:
            span *= 8
        values = []
        for _ in range(repeats):
            t_hi = clock(lambda: run(lo + span))
            t_lo = clock(lambda: run(lo))
            values.append((t_hi - t_lo) / span)
        ms = statistics.median(values)
        if ms > 0:
            return ms
    raise RuntimeError(f"time per iteration below the timing noise even over {span} iterations")


def peak_mb(run, iters: int = MEMORY_ITERS):
    if not torch.cuda.is_available():
        return None
    return timing.peak_memory(lambda: run(iters)) / 2 ** 20


# --------------------------------------------------------------------------
# otlinop
# --------------------------------------------------------------------------
def inputs(n, d, device, seed=0):
    """The protocol's problem: ``(x, y, a, b)``, n points each in dimension d, float32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, device=device, generator=gen)
    y = torch.randn(n, d, device=device, generator=gen) + 0.5
    a = torch.rand(n, device=device, generator=gen) + 0.1
    b = torch.rand(n, device=device, generator=gen) + 0.1
    return x, y, a / a.sum(), b / b.sum()


#: The symmetric runs' blur and first scale. With ``diameter == blur`` the
#: eps schedule is ``[blur**2, blur**2]`` (no annealing) and ``max_iter``
#: continues at that eps: every step at one eps, as the protocol wants, and one
#: run of equal eps (one CUDA graph). ``blur**2`` is EPS to one double ulp
#: (no double squares to 0.5), and exactly EPS once the kernels take it in float32.
_BLUR = math.sqrt(EPS)
#: A check period longer than any run: no marginal-error check (host sync)
#: inside a run; "alternating" checks once, at its last iteration.
_NO_CHECKS = 1 << 30


def ours_runner(method, x, y, a, b, precision, backend):
    """``run(k)``: one public ``otlinop.sinkhorn`` call running exactly k iterations at eps = EPS.

    Parameters
    ----------
    method : {"symmetric", "alternating"}
        The Sinkhorn method timed.
    x, y, a, b : Tensor
        The problem (:func:`inputs`).
    precision, backend
        Passed to ``sinkhorn``.

    Returns
    -------
    callable
        ``run(k)`` returns the call's ``SinkhornResult`` (``n_iter == k``).
        "symmetric": an initial half-step, k averaged steps and the final
        extrapolation (``blur = diameter = sqrt(EPS)``, ``max_iter=k``,
        ``threshold=0``; k >= 2, the schedule's length); "alternating": k
        (g, f) iterations (``eps=EPS, max_iter=k, threshold=0``). No
        marginal-error check runs inside (``check_every`` beyond k) but one at
        the end of the symmetric schedule (2 steps in, in both runs of the
        difference). The calls' ``ConvergenceWarning`` (threshold 0: a fixed
        count, not a convergence) is silenced.
    """
    from otlinop import ConvergenceWarning, sinkhorn

    if method == "symmetric":
        def options(k):
            return dict(blur=_BLUR, diameter=_BLUR, max_iter=k, threshold=0.0)
    elif method == "alternating":
        def options(k):
            return dict(eps=EPS, max_iter=k, threshold=0.0)
    else:
        raise ValueError(f"ours_runner: method must be 'symmetric' or 'alternating', got {method!r}")

    def run(k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return sinkhorn(x, y, a, b, method=method, check_every=_NO_CHECKS, backend=backend,
                            precision=precision, **options(k))

    return run


def _ours_rows(sizes, dims, precisions, backend, lo=LO, hi=HI, repeats=REPEATS, memory_iters=MEMORY_ITERS):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for n in sizes:
        for d in dims:
            x, y, a, b = inputs(n, d, device)
            for method in ("symmetric", "alternating"):
                for precision in precisions:
                    run = ours_runner(method, x, y, a, b, precision, backend)
                    try:
                        ms = per_iteration_ms(run, lo, hi, repeats)
                        mem = peak_mb(run, memory_iters)
                        label = precision or ("tf32x3 (default)" if torch.cuda.is_available() else "torch reference")
                        rows.append(dict(library="otlinop", method=method, precision=label,
                                         n=n, d=d, ms=ms, peak_mb=mem))
                    except Exception as exc:  # report, keep going
                        rows.append(dict(library="otlinop", method=method, precision=str(precision), n=n, d=d,
                                         error=f"{type(exc).__name__}: {exc}"))
                    print(_row(rows[-1]), flush=True)
            del x, y, a, b
    return rows


def _ours_default_call(sizes, dims, backend):
    from otlinop.loss import SamplesLoss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for n in sizes:
        for d in dims:
            x, y, a, b = inputs(n, d, device)
            for precision in (None, "tf32") if torch.cuda.is_available() else (None,):
                for debias in (False, True):
                    L = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=debias, cost_scale=1.0,
                                    backend="auto" if backend is None else backend, precision=precision)
                    with torch.no_grad():
                        L(a, x, b, y)
                        ms = statistics.median(_elapsed_ms(lambda: L(a, x, b, y)) for _ in range(REPEATS))
                    label = f"otlinop ({precision or 'default precision'})"
                    rows.append(dict(library=label, n=n, d=d, debias=debias, ms=ms))
            del x, y, a, b
    return rows


# --------------------------------------------------------------------------
# Peers, each in a subprocess
# --------------------------------------------------------------------------
_CHILD_COMMON = r'''
import json, os, statistics, sys, time
args = json.loads(sys.argv[1])
for p in args.get("peer_path") or []:
    sys.path.insert(0, p)

def emit(**row):
    print("ROW " + json.dumps(row), flush=True)

def inputs_torch(n, d):
    import torch
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    a = torch.rand(n, device="cuda", generator=gen) + 0.1
    b = torch.rand(n, device="cuda", generator=gen) + 0.1
    return x, y, a / a.sum(), b / b.sum()
'''

_CHILD_FLASH = _CHILD_COMMON + r'''
import torch

def elapsed(fn):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); s.record(); fn(); e.record(); e.synchronize()
    return s.elapsed_time(e)

def per_iteration(run, lo, hi, reps):
    run(lo)
    vals = []
    for _ in range(reps):
        th = elapsed(lambda: run(hi)); tl = elapsed(lambda: run(lo))
        vals.append((th - tl) / (hi - lo))
    return statistics.median(vals)

def peak(run, k):
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    run(k); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20

try:
    import flash_sinkhorn as lib
    from flash_sinkhorn.sinkhorn_solvers import sinkhorn_flashstyle_alternating as alt
    from flash_sinkhorn.sinkhorn_solvers import sinkhorn_flashstyle_symmetric as sym
    name = "flash-sinkhorn " + getattr(lib, "__version__", "?")
except ImportError:
    try:
        import ot_triton as lib
        from ot_triton.kernels import sinkhorn_geomloss_online_potentials_sqeuclid as _sym
        sym = lambda x, y, a, b, eps, n_iters, allow_tf32, **kw: _sym(
            x, y, a, b, use_epsilon_scaling=False, eps_list=[eps] * n_iters, allow_tf32=allow_tf32)
        alt = None
        name = "ot_triton " + getattr(lib, "__version__", "?")
    except ImportError as exc:
        emit(library="flash-sinkhorn", error="not importable: " + str(exc)); sys.exit(0)

eps, lo, hi, reps, mem_iters = args["eps"], args["lo"], args["hi"], args["reps"], args["mem_iters"]
for n in args["sizes"]:
    for d in args["dims"]:
        x, y, a, b = inputs_torch(n, d)
        for method, fn in (("symmetric", sym), ("alternating", alt)):
            if fn is None:
                continue
            for tf32 in (True, False):
                prec = "tf32" if tf32 else "strict fp32"
                if method == "symmetric":
                    run = lambda k: fn(x, y, a, b, use_epsilon_scaling=False, eps=eps, n_iters=k, allow_tf32=tf32)
                else:
                    run = lambda k: fn(x, y, a, b, eps=eps, n_iters=k, allow_tf32=tf32)
                try:
                    ms = per_iteration(run, lo, hi, reps)
                    emit(library=name, method=method, precision=prec, n=n, d=d, ms=ms, peak_mb=peak(run, mem_iters))
                except Exception as exc:
                    emit(library=name, method=method, precision=prec, n=n, d=d, error=type(exc).__name__ + ": " + str(exc)[:200])
        if args.get("default_call") and d == max(args["dims"]):
            for debias in (False, True):
                try:
                    L = lib.SamplesLoss("sinkhorn", blur=0.05, scaling=0.5, debias=debias)
                    with torch.no_grad():
                        L(a, x, b, y)
                        ms = statistics.median(elapsed(lambda: L(a, x, b, y)) for _ in range(reps))
                    emit(library=name, kind="default_call", n=n, d=d, debias=debias, ms=ms)
                except Exception as exc:
                    emit(library=name, kind="default_call", n=n, d=d, debias=debias,
                         error=type(exc).__name__ + ": " + str(exc)[:200])
        del x, y, a, b
        torch.cuda.empty_cache()
'''

_CHILD_OTT = _CHILD_COMMON + r'''
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
try:
    import jax
    import jax.numpy as jnp
    # OTT-JAX 0.6 predates JAX's removal of this hook (docs/benchmark-method.md section 5).
    jax.interpreters.batching.is_vmappable = lambda _: False
    import ott
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn
    name = "OTT-JAX " + getattr(ott, "__version__", "?")
except Exception as exc:
    emit(library="OTT-JAX", error="not importable: " + type(exc).__name__ + ": " + str(exc)[:200]); sys.exit(0)

eps, lo, hi, reps, bs = args["eps"], args["lo"], args["hi"], args["reps"], args["ott_batch_size"]

def make(k):
    solver = sinkhorn.Sinkhorn(min_iterations=k, max_iterations=k, threshold=-1.0)
    def run(x, y, a, b):
        geom = pointcloud.PointCloud(x, y, epsilon=eps, batch_size=min(bs, x.shape[0]))
        out = solver(linear_problem.LinearProblem(geom, a=a, b=b))
        return out.f, out.g
    return jax.jit(run)

for n in args["sizes"]:
    for d in args["dims"]:
        key = jax.random.PRNGKey(0)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        x = jax.random.normal(k1, (n, d), jnp.float32)
        y = jax.random.normal(k2, (n, d), jnp.float32) + 0.5
        a = jax.random.uniform(k3, (n,)) + 0.1
        b = jax.random.uniform(k4, (n,)) + 0.1
        a, b = a / a.sum(), b / b.sum()
        for prec in ("default", "highest"):
            try:
                import contextlib
                ctx = (lambda: jax.default_matmul_precision("highest")) if prec == "highest" else contextlib.nullcontext
                with ctx():
                    fns = {k: make(k) for k in (lo, hi)}
                    for f in fns.values():
                        f(x, y, a, b)[0].block_until_ready()
                    def timed(k):
                        t0 = time.perf_counter(); fns[k](x, y, a, b)[0].block_until_ready()
                        return 1e3 * (time.perf_counter() - t0)
                    vals = [(timed(hi) - timed(lo)) / (hi - lo) for _ in range(reps)]
                emit(library=name, method="alternating", precision=prec + " (wall clock)", n=n, d=d,
                     ms=statistics.median(vals), peak_mb=None)
            except Exception as exc:
                emit(library=name, method="alternating", precision=prec, n=n, d=d,
                     error=type(exc).__name__ + ": " + str(exc)[:200])
'''


def _run_child(code: str, payload: dict, timeout: float):
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    rows, exit_code, err = timing.child_rows(code, payload, timeout, env=env)
    if exit_code is None:
        rows.append(dict(library="peer", error=f"timed out after {timeout:.0f} s (rows above were completed)"))
    elif exit_code != 0 and not rows:
        tail = err.strip().splitlines()[-3:]
        rows.append(dict(library="peer", error=f"exit {exit_code}: " + " | ".join(tail)))
    return rows


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------
_HEADER = ("| library | method | precision | n = m | d | ms / iteration | peak MB ({} it.) |\n"
           "|---|---|---|---|---|---|---|")


def _row(r) -> str:
    if "error" in r:
        return (f"| {r.get('library', '?')} | {r.get('method', '-')} | {r.get('precision', '-')} | {r.get('n', '-')} | "
                f"{r.get('d', '-')} | error: {r['error']} | - |")
    mem = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.1f}"
    return (f"| {r['library']} | {r['method']} | {r['precision']} | {r['n']} | {r['d']} | {r['ms']:.4f} | {mem} |")


def build_parser() -> argparse.ArgumentParser:
    """The suite's command-line options (``python -m otlinop.bench sinkhorn --help``)."""
    parser = argparse.ArgumentParser(prog="python -m otlinop.bench sinkhorn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="n = m (default 10000 50000 on a GPU, 200 on a CPU)")
    parser.add_argument("--dims", type=int, nargs="*", default=[3, 64], help="dimensions d (default: 3 64)")
    parser.add_argument("--precisions", nargs="*", default=["tf32", "default"],
                        help="otlinop kernel precisions; 'default' is the strict default (tf32x3)")
    parser.add_argument("--backend", default=None, help="otlinop backend: None (auto), 'triton' or 'torch'")
    parser.add_argument("--libraries", nargs="*", default=["otlinop", "flash", "ott"],
                        choices=["otlinop", "flash", "ott"], help="what to run (default: all three)")
    parser.add_argument("--no-peers", action="store_true", help="skip flash-sinkhorn and OTT-JAX")
    parser.add_argument("--peer-path", nargs="*", default=None, help="folders holding the peers (pip --target)")
    parser.add_argument("--ott-batch-size", type=int, default=4096,
                        help="OTT PointCloud batch_size (online mode; default: %(default)s)")
    parser.add_argument("--no-default-call", action="store_true", help="skip the SamplesLoss(blur=0.05) table")
    parser.add_argument("--peer-timeout", type=float, default=1200.0,
                        help="seconds for each peer's process; the rows it finished are kept (default: %(default)s)")
    parser.add_argument("--iters", type=int, nargs=2, default=[LO, HI], metavar=("LO", "HI"),
                        help=f"per iteration = (T(HI) - T(LO)) / (HI - LO) (default {LO} {HI}; "
                             "fewer for n = 1M; LO >= 2, the symmetric schedule's length)")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help="median of this many measurements (default: %(default)s)")
    parser.add_argument("--memory-iters", type=int, default=MEMORY_ITERS,
                        help="iterations of the peak-memory run (default: %(default)s)")
    return parser


def collect(argv=None) -> dict:
    """Run the suite, print its Markdown tables and return what it measured.

    Parameters
    ----------
    argv : list of str, optional
        Command-line options (see ``--help``); default ``sys.argv[1:]``.

    Returns
    -------
    dict
        ``rows``: the per-iteration rows (otlinop's, then the peers'; error rows
        carry ``error`` instead of ``ms``), as printed in the first table;
        ``default_call``: the rows of the default-call table (empty with
        ``--no-default-call``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 2 <= args.iters[0] < args.iters[1]:
        parser.error(f"--iters LO HI needs 2 <= LO < HI, got {args.iters[0]} {args.iters[1]}")

    cuda = torch.cuda.is_available()
    sizes = args.sizes or ([10_000, 50_000] if cuda else [200])
    dims = args.dims
    precisions = [None if p == "default" else p for p in args.precisions] if cuda else [None]
    print(f"device: {timing.device_name()}")
    if not cuda:
        print("No CUDA GPU: a tiny size on the CPU (torch backend); these are NOT GPU figures, and the peers "
              "(CUDA only) are skipped.")
    lo, hi = args.iters
    print(f"eps = {EPS}, float32, cost |x-y|^2; per iteration = (T({hi}) - T({lo})) / {hi - lo}, "
          f"median of {args.repeats}")
    print()
    print(_HEADER.format(args.memory_iters))
    ours = "otlinop" in args.libraries
    rows = _ours_rows(sizes, dims, precisions, args.backend, args.iters[0], args.iters[1], args.repeats,
                      args.memory_iters) if ours else []
    payload = dict(sizes=sizes, dims=dims, eps=EPS, lo=args.iters[0], hi=args.iters[1], reps=args.repeats, mem_iters=args.memory_iters,
                   peer_path=args.peer_path, ott_batch_size=args.ott_batch_size,
                   default_call=not args.no_default_call)
    peer_rows = []
    if cuda and not args.no_peers:
        children = [code for name, code in (("flash", _CHILD_FLASH), ("ott", _CHILD_OTT)) if name in args.libraries]
        for code in children:
            got = _run_child(code, payload, args.peer_timeout)
            peer_rows += got
            for r in got:
                if r.get("kind") != "default_call":
                    print(_row(r), flush=True)
    rows += [r for r in peer_rows if r.get("kind") != "default_call"]

    call_rows = []
    if not args.no_default_call:
        print()
        print("Default GeomLoss-style call, SamplesLoss('sinkhorn', blur=0.05, scaling=0.5) forward, "
              "cost |x-y|^2, median of 5:")
        print()
        print("| library | n = m | d | debias | ms |\n|---|---|---|---|---|")
        call_sizes = sizes
        for r in _ours_default_call(call_sizes, [d for d in dims if d == max(dims)], args.backend) if ours else []:
            call_rows.append(r)
            print(f"| {r['library']} | {r['n']} | {r['d']} | {r['debias']} | {r['ms']:.2f} |")
        for r in peer_rows:
            if r.get("kind") == "default_call":
                call_rows.append(r)
                ms = f"{r['ms']:.2f}" if "ms" in r else "error: " + r["error"]
                print(f"| {r['library']} | {r['n']} | {r['d']} | {r['debias']} | {ms} |")

    # Ratios against flash-sinkhorn, same method / n / d.
    flash = {(r["method"], r["precision"], r["n"], r["d"]): r["ms"] for r in rows
             if r.get("library", "").startswith("flash-sinkhorn") and "ms" in r}
    if flash:
        print()
        print("otlinop time / flash-sinkhorn time (same method, n, d; tf32 vs tf32, strict vs strict fp32):")
        print()
        print("| method | n = m | d | tf32 | strict |\n|---|---|---|---|---|")
        for method in ("symmetric", "alternating"):
            for n in sizes:
                for d in dims:
                    cells = []
                    for ours_p, peer_p in (("tf32", "tf32"), ("tf32x3 (default)", "strict fp32")):
                        o = next((r["ms"] for r in rows if r.get("library") == "otlinop" and r.get("method") == method
                                  and r.get("precision") == ours_p and r.get("n") == n and r.get("d") == d
                                  and "ms" in r), None)
                        p = flash.get((method, peer_p, n, d))
                        cells.append(f"{o / p:.3f}" if (o and p) else "-")
                    print(f"| {method} | {n} | {d} | {cells[0]} | {cells[1]} |")
    return dict(rows=rows, default_call=call_rows)


def main(argv=None) -> int:
    collect(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
