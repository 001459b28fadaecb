"""``python -m otlinop.bench multiscale``: the multiscale (block-sparse) solver against the dense path, d = 3.

Protocol (docs/benchmark-method.md section 8). Data, float32, n = m, uniform
weights, x and y two independent draws of one distribution (seeds 0 and 1):

* ``cube``: uniform in the unit cube;
* ``mixture``: a mixture of 8 Gaussians (std 0.05) with centres uniform in
  the unit cube;
* ``surface``: a 2-D manifold in 3-D, the sheet
  ``z = 0.5 + 0.15 sin(2 pi u) cos(2 pi v)`` over ``(u, v)`` uniform in the
  unit square.

GeomLoss's loss ``SamplesLoss("sinkhorn", p=2, blur=--blur, scaling=0.5)``
(cost ``|x - y|^2 / 2``, eps from the diameter down to ``blur^2``). Two tables:

1. **Public calls.** ``SamplesLoss(..., backend="multiscale",
   truncate=--truncate, cluster_scale=--cluster-scale)``: the loss and its
   gradient with respect to x (``torch.autograd.grad``); ``sinkhorn(...,
   multiscale=...)``: the potentials alone (``threshold=--threshold``, by
   default inf: the eps schedule alone, as ``SamplesLoss``); beside them the same calls on the
   dense path where ``n <= --dense-max`` (default 200k), and the relative
   difference of the multiscale loss from the dense one. GeomLoss's multiscale
   ``SamplesLoss`` in a child process when pykeops imports and compiles there;
   otherwise a row says why it is absent.
2. **The kernel.** One ``blocksparse_softmin`` (one half Sinkhorn update) on
   a grid clustering made here (cells of width ``--cell``, by default about
   128 points per cell of the unit cube, each keeping its 3^3 neighbouring
   cells), against the dense ``softmin`` where it fits:
   kept entries, time, and the kept entries per second against the measured
   exp2 rate (the floor of any streaming kernel: one exp2 per entry).

Time: the wall clock of one call, synchronised before and after (host work,
clustering and launches included), the median of ``--repeats`` calls after
``--warmup`` calls (compilation, autotuning). Peak memory: the CUDA allocator's
peak during one call, above what was allocated before it (GPU only). Without
a GPU the sizes are tiny and the figures are not GPU figures.

With ``--results DIR`` (given by ``python -m otlinop.bench``), the rows go to
DIR/multiscale.json and a log-log figure of time against n to DIR/multiscale.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import time

import torch

from . import timing

SIZES_GPU = (10_000, 100_000, 1_000_000, 10_000_000)
SIZES_CPU = (200, 600)
DATA = ("cube", "mixture", "surface")
P, SCALING = 2, 0.5
COST_SCALE = 0.5  # GeomLoss' p = 2: |x - y|^2 / 2
#: Default cell of the kernel table: about this many points per cell of the unit cube
#: (the size of the multiscale solver's clusters).
POINTS_PER_CELL = 128


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def sample(kind: str, n: int, seed: int, device) -> torch.Tensor:
    """n points in 3-D of the distribution ``kind`` (see the module docstring), float32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "cube":
        return torch.rand(n, 3, device=device, generator=gen)
    if kind == "mixture":
        # The centres are shared by both clouds (their own generator), the draws are not.
        centres = torch.rand(8, 3, generator=torch.Generator().manual_seed(1234)).to(device)
        which = torch.randint(0, 8, (n,), device=device, generator=gen)
        return centres[which] + 0.05 * torch.randn(n, 3, device=device, generator=gen)
    if kind == "surface":
        uv = torch.rand(n, 2, device=device, generator=gen)
        z = 0.5 + 0.15 * torch.sin(2 * math.pi * uv[:, 0]) * torch.cos(2 * math.pi * uv[:, 1])
        return torch.cat([uv, z[:, None]], 1)
    raise ValueError(f"unknown data {kind!r}; expected one of {', '.join(DATA)}")


def grid_layout(x: torch.Tensor, y: torch.Tensor, cell: float):
    """A grid clustering of both clouds (cells of width ``cell`` over their joint box) and the pattern
    keeping each cell's 3^d neighbours: ``(x sorted, y sorted, x_starts, y_starts, ptr, idx)``.

    The kernel table's own layout (the multiscale solver builds its own).
    """
    d = x.shape[1]
    lo = torch.minimum(x.amin(0), y.amin(0))
    hi = torch.maximum(x.amax(0), y.amax(0))
    cells = [max(1, int(v)) for v in torch.ceil((hi - lo) / cell).clamp_min(1).tolist()]
    shape = torch.tensor(cells, device=x.device)
    strides = torch.tensor([math.prod(cells[:k]) for k in range(d)], device=x.device)
    K = math.prod(cells)

    def sort(p):
        coord = torch.minimum(((p - lo) / cell).long(), shape - 1)
        cid = (coord * strides).sum(1)
        order = torch.argsort(cid, stable=True)
        starts = torch.zeros(K + 1, dtype=torch.int64, device=p.device)
        torch.cumsum(torch.bincount(cid, minlength=K), 0, out=starts[1:])
        return p[order].contiguous(), starts

    xs_sorted, x_starts = sort(x)
    ys_sorted, y_starts = sort(y)
    ids = torch.arange(K, device=x.device)
    coord = torch.stack([(ids // strides[k]) % shape[k] for k in range(d)], 1)
    span = torch.arange(-1, 2, device=x.device)
    offsets = torch.cartesian_prod(*([span] * d)).reshape(-1, d)
    nb = coord[:, None, :] + offsets[None]
    ok = ((nb >= 0) & (nb < shape)).all(-1)
    nid = torch.where(ok, (torch.minimum(nb.clamp_min(0), shape - 1) * strides).sum(-1), K).sort(1).values
    ptr = torch.zeros(K + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(ok.sum(1), 0, out=ptr[1:])
    return xs_sorted, ys_sorted, x_starts, y_starts, ptr, nid[nid < K]


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeats: int):
    """``(median ms, peak MiB or None, last result)`` of ``fn()``: wall clock, synchronised."""
    for _ in range(warmup):
        fn()
    cuda = torch.device(device).type == "cuda"
    times, peak, out = [], None, None
    for i in range(repeats):
        _sync(device)
        if cuda and i == 0:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
        if cuda and i == 0:
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak, out


def _error(exc: BaseException) -> str:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


# --------------------------------------------------------------------------
# 1. Public calls
# --------------------------------------------------------------------------


def multiscale_available() -> str | None:
    """None when this otlinop has the multiscale solver, else why not."""
    if importlib.util.find_spec("otlinop.multiscale") is None:
        return ("this otlinop has no multiscale solver (otlinop.multiscale is absent: issue 21's solver is "
                "not in this build)")
    return None


def public_rows(kind, n, args, device) -> list[dict]:
    """The public calls on one problem: multiscale and (where n <= dense_max) dense."""
    from otlinop import SamplesLoss, sinkhorn

    x0, y = sample(kind, n, 0, device), sample(kind, n, 1, device)
    rows, losses = [], {}
    why_not = multiscale_available()
    paths = ["multiscale"] + (["dense"] if n <= args.dense_max else [])
    for path in paths:
        base = dict(data=kind, n=n, path=path)
        if path == "multiscale" and why_not:
            rows += [dict(base, call=c, error=why_not) for c in ("loss + grad", "sinkhorn")]
            continue
        if path == "multiscale":
            from otlinop.multiscale import Multiscale

            loss_fn = SamplesLoss("sinkhorn", p=P, blur=args.blur, scaling=SCALING, truncate=args.truncate,
                                  cluster_scale=args.cluster_scale, backend="multiscale")
            solve_kw = dict(multiscale=Multiscale(cluster_scale=args.cluster_scale, truncate=args.truncate))
        else:
            loss_fn = SamplesLoss("sinkhorn", p=P, blur=args.blur, scaling=SCALING)
            solve_kw = {}
        x = x0.clone().requires_grad_(True)

        def loss_and_grad():
            value = loss_fn(x, y)
            (grad,) = torch.autograd.grad(value, x)
            return value.detach(), grad

        try:
            ms, peak, (value, _) = timed(loss_and_grad, device, args.warmup, args.repeats)
            losses[path] = float(value)
            rows.append(dict(base, call="loss + grad", ms=ms, peak_mib=peak, loss=float(value)))
        except Exception as exc:  # noqa: BLE001 - an out-of-memory or a refusal is a row, not the end
            rows.append(dict(base, call="loss + grad", error=_error(exc)))
        try:
            ms, peak, _ = timed(lambda: sinkhorn(x0, y, blur=args.blur, scaling=SCALING, cost_scale=COST_SCALE,
                                                 threshold=args.threshold, **solve_kw),
                                device, args.warmup, args.repeats)
            rows.append(dict(base, call="sinkhorn", ms=ms, peak_mib=peak))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(base, call="sinkhorn", error=_error(exc)))
    if "multiscale" in losses and "dense" in losses:
        for r in rows:
            if r["path"] == "multiscale" and r["call"] == "loss + grad" and "ms" in r:
                r["rel_diff_dense"] = abs(losses["multiscale"] - losses["dense"]) / max(abs(losses["dense"]), 1e-30)
    return rows


_GEOMLOSS_CHILD = r'''
import json, statistics, sys, time
args = json.loads(sys.argv[1])
import torch
device = args["device"]

def emit(**row):
    print("ROW " + json.dumps(row), flush=True)

try:
    import pykeops
    from pykeops.torch import LazyTensor
    t = torch.randn(16, 3, device=device)
    ((LazyTensor(t[:, None, :]) - LazyTensor(t[None, :, :])) ** 2).sum(2).sum(1)   # compiles a reduction
    import geomloss
except Exception as exc:
    emit(error="GeomLoss multiscale absent: pykeops does not import or compile here (%s: %s)"
         % (type(exc).__name__, str(exc).splitlines()[0][:100] if str(exc) else ""))
    sys.exit(0)
from otlinop.bench.multiscale_bench import sample

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

for kind, n in args["problems"]:
    try:
        x = sample(kind, n, 0, device).requires_grad_(True)
        y = sample(kind, n, 1, device)
        loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=args["blur"], scaling=0.5, truncate=args["truncate"],
                                    cluster_scale=args["cluster_scale"], backend="multiscale")
        def call():
            value = loss(x, y)
            torch.autograd.grad(value, x)
            return value
        for _ in range(args["warmup"]):
            call()
        times = []
        for _ in range(args["repeats"]):
            sync()
            t0 = time.perf_counter()
            value = call()
            sync()
            times.append(1e3 * (time.perf_counter() - t0))
        emit(data=kind, n=n, path="geomloss-multiscale", call="loss + grad", ms=statistics.median(times),
             loss=float(value))
    except Exception as exc:
        emit(data=kind, n=n, path="geomloss-multiscale", call="loss + grad",
             error="%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:100] if str(exc) else ""))
'''


def geomloss_rows(problems, args, device) -> list[dict]:
    """GeomLoss's multiscale SamplesLoss in a child process, or one row saying why it is absent."""
    payload = dict(problems=problems, blur=args.blur, truncate=args.truncate, cluster_scale=args.cluster_scale,
                   warmup=args.warmup, repeats=args.repeats, device=device)
    rows, code, err = timing.child_rows(_GEOMLOSS_CHILD, payload, args.peer_timeout)
    if code != 0 and not rows:
        why = "ran past the timeout" if code is None else f"exit {code}: {err.strip().splitlines()[-1:] or ''}"
        rows = [dict(error=f"GeomLoss multiscale child failed ({why})")]
    return [dict(r, path="geomloss-multiscale", call="loss + grad") if "data" not in r else r for r in rows]


# --------------------------------------------------------------------------
# 2. The kernel
# --------------------------------------------------------------------------


def kernel_rows(kind, n, args, device, exp2_rate) -> list[dict]:
    """One block-sparse soft-min on a grid clustering, and the dense soft-min where it fits."""
    from otlinop.kernels import blocksparse_softmin, softmin

    x, y = sample(kind, n, 0, device), sample(kind, n, 1, device)
    eps = args.blur ** 2  # GeomLoss' p = 2: eps = blur^2 on the cost |x - y|^2 / 2
    cell = args.cell or (POINTS_PER_CELL / n) ** (1 / 3)
    xs, ys, x_starts, y_starts, ptr, idx = grid_layout(x, y, cell)
    counts = y_starts[1:] - y_starts[:-1]
    rows_per = x_starts[1:] - x_starts[:-1]
    per_cluster = torch.zeros_like(rows_per)
    pair_rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), ptr[1:] - ptr[:-1])
    per_cluster.index_add_(0, pair_rows, counts[idx])
    kept = int((rows_per * per_cluster).sum())
    h = torch.full((n,), -math.log(n), device=device)
    out = []
    base = dict(data=kind, n=n, cell=cell, clusters=int(ptr.numel() - 1), pairs=int(idx.numel()),
                kept=kept, kept_fraction=kept / (n * n))
    try:
        ms, peak, _ = timed(lambda: blocksparse_softmin(xs, ys, h, x_starts, y_starts, ptr, idx, eps=eps,
                                                        cost_scale=COST_SCALE),
                            device, args.warmup, args.repeats)
        out.append(dict(base, kernel="blocksparse_softmin", ms=ms, peak_mib=peak, entries_per_s=kept / ms * 1e3,
                        floor_fraction=(kept / exp2_rate * 1e3) / ms if exp2_rate else None))
    except Exception as exc:  # noqa: BLE001
        out.append(dict(base, kernel="blocksparse_softmin", error=_error(exc)))
    if n <= args.dense_max:
        try:
            ms, peak, _ = timed(lambda: softmin(x, y, h, eps=eps, cost_scale=COST_SCALE), device, args.warmup,
                                args.repeats)
            out.append(dict(base, kernel="softmin (dense)", kept=n * n, kept_fraction=1.0, ms=ms, peak_mib=peak,
                            entries_per_s=n * n / ms * 1e3,
                            floor_fraction=(n * n / exp2_rate * 1e3) / ms if exp2_rate else None))
        except Exception as exc:  # noqa: BLE001
            out.append(dict(base, kernel="softmin (dense)", error=_error(exc)))
    return out


# --------------------------------------------------------------------------
# Tables and figure
# --------------------------------------------------------------------------


def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def public_table(rows) -> str:
    lines = ["| data | n = m | path | call | ms | peak MiB | loss | rel. diff from dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('data', '-')} | {r.get('n', '-')} | {r.get('path', '-')} | {r.get('call', '-')} "
                         f"| {r['error']} | | | |")
        else:
            lines.append(f"| {r['data']} | {r['n']} | {r['path']} | {r['call']} | {r['ms']:.1f} | "
                         f"{_num(r.get('peak_mib'), '.0f')} | {_num(r.get('loss'), '.6g')} | "
                         f"{_num(r.get('rel_diff_dense'), '.2e')} |")
    return "\n".join(lines)


def kernel_table(rows) -> str:
    lines = ["| data | n = m | kernel | cell | clusters | kept pairs | kept entries | kept / n^2 | ms | peak MiB | "
             "G entries/s | fraction of exp2 floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['data']} | {r['n']} | {r['kernel']} | {r['cell']:.3g} | {r['clusters']} | {r['pairs']} | "
                f"{r['kept']} | {r['kept_fraction']:.2e} |")
        if "error" in r:
            lines.append(head + f" {r['error']} | | | |")
        else:
            lines.append(head + f" {r['ms']:.3f} | {_num(r.get('peak_mib'), '.0f')} | "
                                f"{r['entries_per_s'] / 1e9:.2f} | {_num(r.get('floor_fraction'), '.2f')} |")
    return "\n".join(lines)


def plot(rows, path: str) -> bool:
    """Log-log figure of ms against n, one panel per data set; False without matplotlib or rows."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed_rows = [r for r in rows if "ms" in r and "data" in r]
    kinds = [k for k in DATA if any(r["data"] == k for r in timed_rows)]
    if not kinds:
        return False
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        lines = sorted({(r.get("path") or r.get("kernel"), r.get("call", "one update")) for r in timed_rows
                        if r["data"] == kind})
        for label, call in lines:
            pts = sorted((r["n"], r["ms"]) for r in timed_rows if r["data"] == kind
                         and (r.get("path") or r.get("kernel")) == label and r.get("call", "one update") == call)
            ax.loglog(*zip(*pts), marker="o", label=f"{label}: {call}")
        ax.set_title(f"{kind}, d = 3", fontsize=9)
        ax.set_xlabel("n = m (points per cloud)")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The suite's command-line options (``python -m otlinop.bench multiscale --help``)."""
    parser = argparse.ArgumentParser(prog="python -m otlinop.bench multiscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help=f"n = m (default {' '.join(map(str, SIZES_GPU))} on a GPU, "
                             f"{' '.join(map(str, SIZES_CPU))} on the CPU)")
    parser.add_argument("--data", nargs="*", choices=DATA, default=list(DATA), help="data sets (default all)")
    parser.add_argument("--blur", type=float, default=0.01, help="final blur, eps = blur^2 (default 0.01)")
    parser.add_argument("--truncate", type=float, default=5.0, help="GeomLoss' truncate (default 5)")
    parser.add_argument("--cluster-scale", type=float, default=None,
                        help="GeomLoss' cluster_scale (default: the solver's, about 2000 cells)")
    parser.add_argument("--cell", type=float, default=None,
                        help=f"cell width of the kernel table's grid clustering (default (128 / n)^(1/3): about "
                             f"{POINTS_PER_CELL} points per cell of the unit cube)")
    parser.add_argument("--threshold", type=float, default=math.inf,
                        help="sinkhorn's marginal-error threshold (default inf: the eps schedule alone, as "
                             "SamplesLoss runs it)")
    parser.add_argument("--dense-max", type=int, default=200_000,
                        help="largest n timed on the dense path too (default 200000)")
    parser.add_argument("--tables", nargs="*", choices=["public", "kernel", "geomloss"],
                        default=["public", "kernel", "geomloss"], help="what to run (default all)")
    parser.add_argument("--peer-timeout", type=float, default=900.0, help="seconds allowed to GeomLoss")
    parser.add_argument("--warmup", type=int, default=1, help="calls before timing (compile, autotune)")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many calls")
    return parser


def main(argv=None, *, results: str | None = None) -> int:
    """Run the suite and print its tables; ``results``: folder for multiscale.json/png."""
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sizes = args.sizes or list(SIZES_GPU if cuda else SIZES_CPU)
    print(f"device: {timing.device_name()}")
    if not cuda:
        print("No CUDA GPU: tiny sizes on the CPU (torch references); these are NOT GPU figures.")
    print(f"SamplesLoss('sinkhorn', p=2, blur={args.blur}, scaling={SCALING}), float32, d = 3, cost |x-y|^2/2; "
          f"wall clock of a whole call, median of {args.repeats} after {args.warmup} warm-up calls")
    ceil = timing.ceilings() if cuda else {}
    public, kernel = [], []
    if "public" in args.tables:
        for kind in args.data:
            for n in sizes:
                got = public_rows(kind, n, args, device)
                for r in got:
                    print(f"  {kind} n={n} {r['path']} {r['call']}: "
                          + (f"{r['ms']:.1f} ms" if "ms" in r else r["error"]), flush=True)
                public += got
    if "geomloss" in args.tables:
        public += geomloss_rows([[k, n] for k in args.data for n in sizes], args, device)
    if "kernel" in args.tables:
        for kind in args.data:
            for n in sizes:
                kernel += kernel_rows(kind, n, args, device, ceil.get("exp2_per_s"))
    if public:
        print("\n### Public calls: multiscale against dense (ms, wall clock)\n")
        print(public_table(public))
    if kernel:
        print("\n### One block-sparse soft-min (a grid clustering, 27 neighbouring cells kept) against the "
              "dense soft-min\n")
        print(kernel_table(kernel))
        if cuda:
            print()
            print(timing.format_ceilings(ceil))
    rows = public + kernel
    if results is not None:
        with open(os.path.join(results, "multiscale.json"), "w") as fh:
            json.dump(dict(rows=rows, ceilings=ceil, options=vars(args), device=device), fh, indent=1)
        if plot(rows, os.path.join(results, "multiscale.png")):
            print(f"\nfigure: {os.path.join(results, 'multiscale.png')}")
    return 0 if any("ms" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
