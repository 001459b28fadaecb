"""``python -m otlinop.bench plan``: P @ V and P.T @ U throughput.

For n = m in {10k, 50k}, d in {3, 64}, k in {1, 64} and each kernel precision:
the time of one streaming pass, the exponentials per second it reaches, and the
fraction of the floor it reaches, where the floor is
max(n m / exp2 rate, 2 n m (d + k) / dot rate) with both rates measured in the
same run (``timing.ceilings``).
"""

from __future__ import annotations

import argparse

import torch

from . import timing


def _inputs(n, m, d, k, device, gen):
    x = torch.randn(n, d, device=device, generator=gen)
    y = torch.randn(m, d, device=device, generator=gen) + 0.5
    f = torch.randn(n, device=device, generator=gen) * 0.1
    g = torch.randn(m, device=device, generator=gen) * 0.1
    V = torch.randn(m, k, device=device, generator=gen)
    U = torch.randn(n, k, device=device, generator=gen)
    return x, y, f, g, V, U


def build_parser() -> argparse.ArgumentParser:
    """The suite's command-line options (``python -m otlinop.bench plan --help``)."""
    parser = argparse.ArgumentParser(prog="python -m otlinop.bench plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="n = m (default 10000 50000 on a GPU, 300 on a CPU)")
    parser.add_argument("--dims", type=int, nargs="*", default=[3, 64], help="dimensions d (default: 3 64)")
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 64],
                        help="columns k of the operand V in P @ V (default: 1 64)")
    parser.add_argument("--precisions", nargs="*", default=["tf32", "tf32x3", "ieee"],
                        help="kernel precisions (default: tf32 tf32x3 ieee)")
    parser.add_argument("--eps", type=float, default=0.5, help="entropic regularisation (default: %(default)s)")
    parser.add_argument("--fma-max-d", type=int, default=None,
                        help="override config.fma_max_d (0: tensor cores at every d) to compare the dot paths")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from otlinop import config
    from otlinop.kernels import plan_apply

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sizes = args.sizes or ([10_000, 50_000] if cuda else [300])
    precisions = args.precisions if cuda else [None]
    fma = {} if args.fma_max_d is None else {"fma_max_d": args.fma_max_d}
    with config.override(check_finite=False, **fma):     # restored on exit, errors included
        if fma:
            print(f"config.fma_max_d = {args.fma_max_d}")
        ceil = timing.ceilings()
        print(f"device: {timing.device_name()}")
        print(timing.format_ceilings(ceil))
        print()
        print("| n = m | d | k | precision | op | ms | exp/s | floor ms | fraction of floor |")
        print("|---|---|---|---|---|---|---|---|---|")
        gen = torch.Generator(device=device).manual_seed(0)
        for n in sizes:
            for d in args.dims:
                for k in args.ks:
                    x, y, f, g, V, U = _inputs(n, n, d, k, device, gen)
                    for precision in precisions:
                        ops = {
                            "P @ V": lambda: plan_apply(x, y, f, g, V, eps=args.eps, precision=precision),
                            "P.T @ U": lambda: plan_apply(y, x, g, f, U, eps=args.eps, precision=precision),
                        }
                        for name, fn in ops.items():
                            ms = timing.bench(fn)
                            rate = n * n / (ms * 1e-3)
                            if ceil:
                                floor = 1e3 * max(n * n / ceil["exp2_per_s"],
                                                  2 * n * n * (d + k) / timing.matmul_rate(ceil, precision))
                                frac = f"{floor / ms:.2f}"
                                floor_s = f"{floor:.3f}"
                            else:
                                floor_s = frac = "-"
                            print(f"| {n} | {d} | {k} | {precision or 'default'} | {name} | {ms:.3f} | {rate:.3g} | "
                                  f"{floor_s} | {frac} |", flush=True)
                    del x, y, f, g, V, U
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
