"""``python -m otlinop.bench train``: whole ``SamplesLoss`` calls, as a training loop makes them.

Protocol (docs/benchmark-method.md section 6): x ~ N(0, I), y ~ N(0.5, I),
random positive weights summing to 1, float32, GeomLoss' default loss
``SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5)`` (cost |x - y|^2 / 2,
eps-scaling from the diameter down to blur^2), with and without debiasing.
Two kinds of call:

* "train step": the forward, the backward (``torch.autograd.grad`` of the
  loss w.r.t. x, which requires grad) and an SGD step ``x -= LR * grad``, so
  that the points (and their bounding box, the default diameter) move from
  one call to the next, as in training;
* "forward": the loss alone, under ``torch.no_grad()``.

Each time is the wall clock of one whole call, synchronised before and after
(host work, launches and synchronisations included: that is what a training
loop waits for), the median of ``--repeats`` calls after ``--warmup`` calls
(which compile, autotune and capture). Every library runs in its own
subprocess on the same data (same generator and seed).

Rows: otlinop at its default precision and at "tf32", otlinop with
``diameter=`` given once (1.1 times the first data's bounding-box diagonal:
a fixed eps schedule and no value read back but the checks; the default
diameter changes with the points, but not the schedule's length, so both
rows replay their cached CUDA graphs, ``otlinop._call_graphs``),
flash-sinkhorn's
``SamplesLoss`` (CUDA only), GeomLoss's tensorized backend, and GeomLoss's
online backend where KeOps is importable (an error row says why not).
The "floor" column is the exponentials alone: (schedule steps) x (pairs
evaluated per step) / (the measured exp2 rate), with 2nm pairs per step for
OT(a, b) and n^2 + m^2 more with debiasing, and as many again for the
backward's gradient passes; a bound no library can beat, not a target.

With ``--results DIR`` (given by ``python -m otlinop.bench``), the rows go to
DIR/train.json and a log-log figure of time against n to DIR/train.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from . import timing

BLUR, SCALING = 0.05, 0.5
SIZES_GPU = (512, 2048, 8192, 32768)
SIZES_CPU = (64,)

# The child's code: one library, every (n, d, debias, kind) of the payload, one ROW line each.
_CHILD = r'''
import json, statistics, sys, time
args = json.loads(sys.argv[1])
for p in args.get("peer_path") or []:
    sys.path.insert(0, p)
import torch

device = args["device"]

def emit(**row):
    print("ROW " + json.dumps(row), flush=True)

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

def inputs(n, d):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=gen)
    y = torch.randn(n, d, device=device, generator=gen) + 0.5
    a = torch.rand(n, device=device, generator=gen) + 0.1
    b = torch.rand(n, device=device, generator=gen) + 0.1
    return x, y, a / a.sum(), b / b.sum()

def timed(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)

def make_loss(library, debias, diameter):
    if library.startswith("otlinop"):
        import otlinop
        precision = "tf32" if library.endswith("tf32") else None
        # "otlinop-diameter": the diameter given once (a fixed schedule: the call's CUDA graphs replay).
        return otlinop.SamplesLoss("sinkhorn", p=2, blur=args["blur"], scaling=args["scaling"], debias=debias,
                                   precision=precision, diameter=diameter if library.endswith("diameter") else None)
    if library == "flash-sinkhorn":
        import flash_sinkhorn
        return flash_sinkhorn.SamplesLoss("sinkhorn", p=2, blur=args["blur"], scaling=args["scaling"],
                                          debias=debias)
    import geomloss
    backend = "online" if library == "geomloss-online" else "tensorized"
    if backend == "online":
        import pykeops  # noqa: F401  (an error row when KeOps is missing)
    return geomloss.SamplesLoss("sinkhorn", p=2, blur=args["blur"], scaling=args["scaling"], debias=debias,
                                backend=backend)

library = args["library"]
try:
    version = "?"
    if library.startswith("otlinop"):
        import otlinop; version = otlinop.__version__
    elif library == "flash-sinkhorn":
        import flash_sinkhorn; version = getattr(flash_sinkhorn, "__version__", "?")
    else:
        import geomloss; version = getattr(geomloss, "__version__", "?")
except Exception as exc:
    emit(library=library, error="not importable: " + type(exc).__name__ + ": " + str(exc)[:200]); sys.exit(0)

for n in args["sizes"]:
    for d in args["dims"]:
        x, y, a, b = inputs(n, d)
        pts = torch.cat([x, y])
        diameter = float((pts.amax(0) - pts.amin(0)).norm()) * 1.1   # a bound with room for the points to move
        for debias in args["debias"]:
            xg = x.clone().requires_grad_()
            try:
                L = make_loss(library, debias, diameter)
            except Exception as exc:
                emit(library=library, version=version, n=n, d=d, debias=debias, kind="train step",
                     error=type(exc).__name__ + ": " + str(exc)[:200])
                continue
            def step():
                (g,) = torch.autograd.grad(L(a, xg, b, y), [xg])
                with torch.no_grad():
                    xg.sub_(args["lr"] * g)      # an SGD step: the points move between calls, as in training
                return g
            def forward():
                with torch.no_grad():
                    return L(a, x, b, y)
            for kind, fn in (("train step", step), ("forward", forward)):
                try:
                    ms = timed(fn, args["warmup"], args["repeats"])
                    emit(library=library, version=version, n=n, d=d, debias=debias, kind=kind, ms=ms)
                except Exception as exc:
                    emit(library=library, version=version, n=n, d=d, debias=debias, kind=kind,
                         error=type(exc).__name__ + ": " + str(exc)[:200])
                    if device == "cuda":
                        torch.cuda.empty_cache()
        del x, y, a, b, xg, pts
        if device == "cuda":
            torch.cuda.empty_cache()
'''


def run_library(library: str, payload: dict, timeout: float) -> list[dict]:
    """Run one library's rows in a subprocess; returns its rows (error rows carry ``error``)."""
    payload = dict(payload, library=library)
    env = dict(os.environ)
    # The child imports otlinop from where this process found it.
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rows, exit_code, err = timing.child_rows(_CHILD, payload, timeout, env=env)
    if exit_code is None:
        rows.append(dict(library=library, error=f"timed out after {timeout:.0f} s (rows above were completed)"))
    elif exit_code != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])
        rows.append(dict(library=library, error=f"exit {exit_code}: {tail}"))
    return rows


def schedule_steps(n: int, d: int) -> int:
    """Length of the eps schedule of the protocol's problem (its diameter measured on the data)."""
    from otlinop._sinkhorn_schedule import diameter, epsilon_schedule

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    y = torch.randn(n, d, generator=gen) + 0.5
    return len(epsilon_schedule(diameter(x, y), BLUR, SCALING))


def floor_ms(n: int, d: int, debias: bool, kind: str, exp2_per_s: float | None) -> float | None:
    """The exponentials of one call at the measured exp2 rate (see the module docstring), in ms."""
    if not exp2_per_s:
        return None
    pairs = 2 * n * n + (2 * n * n if debias else 0)
    steps = schedule_steps(min(n, 4096), d)   # the diameter barely moves with n
    total = steps * pairs
    if kind == "train step":
        total += pairs   # the gradient's passes
    return 1e3 * total / exp2_per_s


def _cell(r) -> str:
    return f"{r['ms']:.2f}" if "ms" in r else "error: " + r.get("error", "?")


def table(rows: list[dict], libraries: list[str], ceil: dict) -> str:
    """Markdown: one line per (kind, n, d, debias), one column per library, then the floor."""
    keys = sorted({(r["kind"], r["n"], r["d"], r["debias"]) for r in rows if "kind" in r},
                  key=lambda k: (k[0] != "train step", k[3] is False, k[2], k[1]))
    head = "| call | n = m | d | debias | " + " | ".join(libraries) + " | floor (exp) |"
    lines = [head, "|" + "---|" * (5 + len(libraries))]
    for kind, n, d, debias in keys:
        cells = []
        for lib in libraries:
            r = next((r for r in rows if r.get("library") == lib and r.get("kind") == kind and r.get("n") == n
                      and r.get("d") == d and r.get("debias") == debias), None)
            cells.append("-" if r is None else _cell(r))
        fl = floor_ms(n, d, debias, kind, ceil.get("exp2_per_s"))
        lines.append(f"| {kind} | {n} | {d} | {debias} | " + " | ".join(cells)
                     + f" | {'-' if fl is None else f'{fl:.3f}'} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """otlinop's time over the fastest peer's, per (kind, n, d, debias)."""
    peers = ("flash-sinkhorn", "geomloss-tensorized", "geomloss-online")
    lines = ["| call | n = m | d | debias | otlinop (best of its rows) / fastest peer | fastest peer |",
             "|---|---|---|---|---|---|"]
    keys = sorted({(r["kind"], r["n"], r["d"], r["debias"]) for r in rows if "ms" in r},
                  key=lambda k: (k[0] != "train step", k[3] is False, k[2], k[1]))
    for key in keys:
        match = [r for r in rows if "ms" in r and (r["kind"], r["n"], r["d"], r["debias"]) == key]
        ours = [r["ms"] for r in match if r["library"].startswith("otlinop")]
        theirs = [(r["ms"], r["library"]) for r in match if r["library"] in peers]
        if ours and theirs:
            best = min(theirs)
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {min(ours) / best[0]:.3f} | {best[1]} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(rows: list[dict], path: str) -> bool:
    """Log-log figure of time against n, one panel per (call, d, debias); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(r["kind"], r["d"], r["debias"]) for r in rows if "ms" in r})
    if not panels:
        return False
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.4 * nrows), squeeze=False)
    for ax, (kind, d, debias) in zip(axes.flat, panels):
        for lib in sorted({r["library"] for r in rows if "ms" in r}):
            pts = sorted((r["n"], r["ms"]) for r in rows if "ms" in r and r["library"] == lib
                         and (r["kind"], r["d"], r["debias"]) == (kind, d, debias))
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=lib)
        ax.set_title(f"{kind}, d = {d}, debias = {debias}", fontsize=9)
        ax.set_xlabel("n = m (points per cloud)")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


CHOICES = ["otlinop", "otlinop-tf32", "otlinop-diameter", "flash-sinkhorn", "geomloss-tensorized",
           "geomloss-online"]
#: The train step's SGD step size (x -= LR * grad): small, but it moves the points, hence
#: the default diameter (the bounding box) and the eps schedule's values, at every call.
LR = 0.1


def build_parser() -> argparse.ArgumentParser:
    """The suite's command-line options (``python -m otlinop.bench train --help``)."""
    parser = argparse.ArgumentParser(prog="python -m otlinop.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help=f"n = m (default {' '.join(map(str, SIZES_GPU))} on a GPU, "
                             f"{' '.join(map(str, SIZES_CPU))} on the CPU)")
    parser.add_argument("--dims", type=int, nargs="*", default=[3, 64], help="dimensions d (default 3 64)")
    parser.add_argument("--debias", choices=["on", "off", "both"], default="both",
                        help="debiased loss, plain OT(a, b), or both rows (default both)")
    parser.add_argument("--libraries", nargs="*", choices=CHOICES, default=None,
                        help="what to run (default: all on a GPU; otlinop and geomloss-tensorized on the CPU)")
    parser.add_argument("--peer-path", nargs="*", default=None, help="folders holding the peers (pip --target)")
    parser.add_argument("--peer-timeout", type=float, default=900.0, help="seconds allowed to each library")
    parser.add_argument("--warmup", type=int, default=3, help="calls before timing (compile, autotune, capture)")
    parser.add_argument("--repeats", type=int, default=10, help="median of this many calls")
    return parser


def main(argv=None, *, results: str | None = None) -> int:
    """Run the suite and print its tables; see the module docstring. ``results``: folder for train.json/png."""
    cuda = torch.cuda.is_available()
    args = build_parser().parse_args(argv)
    sizes = args.sizes or list(SIZES_GPU if cuda else SIZES_CPU)
    libraries = args.libraries or (CHOICES if cuda else ["otlinop", "geomloss-tensorized"])
    if not cuda:
        skipped = [lib for lib in libraries if lib in ("flash-sinkhorn", "otlinop-tf32")]
        libraries = [lib for lib in libraries if lib not in skipped]
        print("No CUDA GPU: tiny sizes on the CPU; these are NOT GPU figures"
              + (f" ({', '.join(skipped)} need CUDA: skipped)." if skipped else "."))
    debias = {"on": [True], "off": [False], "both": [True, False]}[args.debias]
    print(f"device: {timing.device_name()}")
    print(f"SamplesLoss('sinkhorn', p=2, blur={BLUR}, scaling={SCALING}), float32, cost |x-y|^2/2; "
          f"wall clock of a whole call, median of {args.repeats} after {args.warmup} warm-up calls; ms")
    payload = dict(sizes=sizes, dims=args.dims, debias=debias, blur=BLUR, scaling=SCALING, warmup=args.warmup,
                   repeats=args.repeats, peer_path=args.peer_path, device="cuda" if cuda else "cpu", lr=LR)
    rows = []
    for lib in libraries:
        got = run_library(lib, payload, args.peer_timeout)
        for r in got:
            if "kind" in r:
                print(f"  {lib} {r['kind']} n={r['n']} d={r['d']} debias={r['debias']}: {_cell(r)}", flush=True)
            else:
                print(f"  {lib}: {_cell(r)}", flush=True)
        rows += got
    ceil = timing.ceilings() if cuda else {}
    print()
    print(timing.format_ceilings(ceil))
    print()
    print(table(rows, libraries, ceil))
    text = ratios(rows)
    if text:
        print()
        print("otlinop / fastest peer:")
        print()
        print(text)
    if results is not None:
        with open(os.path.join(results, "train.json"), "w") as fh:
            json.dump(dict(rows=rows, ceilings=ceil, payload=payload), fh, indent=1)
        if plot(rows, os.path.join(results, "train.png")):
            print(f"\nfigure: {os.path.join(results, 'train.png')}")
    return 1 if not any("ms" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
