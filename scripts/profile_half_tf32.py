"""Where half_tf32 pays: one symmetric Sinkhorn step, "tf32", fp16 against fp32 operands.

Usage (GPU, repo root): PYTHONPATH=. python3 scripts/profile_half_tf32.py [d ...]
Prints ms per iteration (the sinkhorn bench's protocol, through the public
``otlinop.sinkhorn``) at n = m = 10k and 50k for each d, with
``config.half_tf32`` off and on; set the kernels' smallest half_tf32
dimension (``config.half_tf32_min_d``, default 64) from it.

Dimensions below that smallest one keep fp32 operands whatever
``config.half_tf32`` says, so the probe lowers it to 0 for the sweep
(``config.override(half_tf32_min_d=0)``, restored on exit).
"""
import sys

from otlinop import config
from otlinop.bench.sinkhorn_bench import inputs, ours_runner, per_iteration_ms


def main(dims):
    for n in (10000, 50000):
        for d in dims:
            x, y, a, b = inputs(n, d, "cuda")
            times = {}
            for half in (False, True):
                # The prepared points are cached per layout, and half_tf32 is part of it: no stale pair.
                with config.override(half_tf32=half, half_tf32_min_d=0):
                    times[half] = per_iteration_ms(ours_runner("symmetric", x, y, a, b, "tf32", None), repeats=3)
            print(f"n={n} d={d}: fp32/TF32 {times[False]:.4f} ms, fp16 {times[True]:.4f} ms, "
                  f"ratio {times[True] / times[False]:.3f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [3, 8, 16, 32, 64, 128])
