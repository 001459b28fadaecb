"""Developer probe (GPU): softmin_pair and softmin_self against the softmin calls they replace.

python scripts/profile_pair.py [--ranges R S]  -- per case: wall ms per call
(host loop, then sync) and device ms per call (CUDA-graph replay) of one
softmin_pair call against two softmin calls, then of one softmin_self call
against one softmin call on (x, x), with the ratios. Not a benchmark of
record (see python -m otlinop.bench sinkhorn).

``--ranges R S`` forces the block grid: R row ranges and S column ranges
for softmin_pair (``softmin_pair(..., _ranges=(R, S))``), R ranges for
softmin_self (``softmin_self(..., _ranges=R)``), the launchers' private
keywords; the probe stops with a message where they do not take them. The
kernels' finiteness checks are off while it runs (``config.check_finite``,
restored on exit).
"""
import argparse
import inspect
import math
import sys

import torch

from otlinop import config
from otlinop.bench.timing import graph_replay_ms
from otlinop.kernels import softmin, softmin_pair, softmin_self


def wall_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / reps


def forced_ranges(ranges):
    """The keywords forcing the block grids: ``(pair_kwargs, self_kwargs)``, empty without ``ranges``.

    Raises SystemExit where the launchers take no ``_ranges`` keyword.
    """
    if ranges is None:
        return {}, {}
    missing = [fn.__name__ for fn in (softmin_pair, softmin_self) if "_ranges" not in inspect.signature(fn).parameters]
    if missing:
        sys.exit(f"--ranges needs the private keyword _ranges of {', '.join(missing)}, which this version lacks")
    r, s = ranges
    return {"_ranges": (r, s)}, {"_ranges": r}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranges", type=int, nargs=2, default=None)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 50_000])
    parser.add_argument("--dims", type=int, nargs="*", default=[3, 64])
    args = parser.parse_args()
    pair_kw, self_kw = forced_ranges(args.ranges)
    print("| n | d | precision, potentials | pair wall / device ms | two softmin wall / device ms | device ratio | exp floor ms |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for d in args.dims:
            x = torch.randn(n, d, device="cuda")
            y = torch.randn(n, d, device="cuda") + 0.5
            la = torch.full((n,), -math.log(n), device="cuda")
            eps = 0.5
            # Potentials as in a Sinkhorn loop (two c-transforms from f = 0), or random.
            g_eq = softmin(y, x, la, eps=eps)
            f_eq = softmin(x, y, la + g_eq / eps, eps=eps)
            for prec, kind in (("tf32", "c-transform"), ("tf32x3", "c-transform"), ("tf32", "random")):
                if kind == "random":
                    f, g = 0.1 * torch.randn(n, device="cuda"), 0.1 * torch.randn(n, device="cuda")
                else:
                    f, g = f_eq, g_eq
                def pair():
                    return softmin_pair(x, y, f, g, la, la, eps=eps, precision=prec, **pair_kw)

                def two():
                    return (softmin(x, y, torch.add(la, g, alpha=1 / eps), eps=eps, precision=prec),
                            softmin(y, x, torch.add(la, f, alpha=1 / eps), eps=eps, precision=prec))
                pw, pd = wall_ms(pair), graph_replay_ms(pair)
                tw, td = wall_ms(two), graph_replay_ms(two)
                floor = 2 * n * n / 3.93e12 * 1e3
                print(f"| {n} | {d} | {prec}, {kind} potentials | {pw:.3f} / {pd:.3f} | {tw:.3f} / {td:.3f} | {pd / td:.2f} | {floor:.3f} |",
                      flush=True)

    print()
    print("| n | d | precision | softmin_self wall / device ms | softmin (x, x) wall / device ms | device ratio |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        for d in args.dims:
            x = torch.randn(n, d, device="cuda")
            la = torch.full((n,), -math.log(n), device="cuda")
            eps = 0.5
            f = softmin(x, x, la, eps=eps)
            for prec in ("tf32", "tf32x3"):
                def self_():
                    return softmin_self(x, f, la, eps=eps, precision=prec, **self_kw)

                def plain():
                    return softmin(x, x, torch.add(la, f, alpha=1 / eps), eps=eps, precision=prec)
                sw, sd = wall_ms(self_), graph_replay_ms(self_)
                pw, pd = wall_ms(plain), graph_replay_ms(plain)
                print(f"| {n} | {d} | {prec} | {sw:.3f} / {sd:.3f} | {pw:.3f} / {pd:.3f} | {sd / pd:.2f} |", flush=True)


if __name__ == "__main__":
    with config.override(check_finite=False):
        main()
