"""Where half_tf32 pays: one symmetric Sinkhorn step, "tf32", fp16 against fp32 operands.

Usage (GPU, repo root): PYTHONPATH=. python3 scripts/profile_half_tf32.py [d ...]
Prints ms per iteration (the sinkhorn bench's protocol, through the public
``otlinop.sinkhorn``) at n = m = 10k and 50k for each d, with
``config.half_tf32`` off and on; set the kernels' smallest half_tf32
dimension from it.

Dimensions below that smallest one keep fp32 operands whatever
``config.half_tf32`` says, so the probe lowers it to 0 through the int switch
``config.half_tf32_min_d``. Where the kernels declare no such switch, it says
so and measures anyway: below the kernels' smallest dimension both columns
are then fp32.
"""
import sys

from otlinop import config
from otlinop.bench.sinkhorn_bench import inputs, ours_runner, per_iteration_ms


def switches(half: bool) -> dict:
    """The config overrides of one column: half_tf32, and every d allowed where the switch exists."""
    out = {"half_tf32": half}
    if hasattr(config, "half_tf32_min_d"):
        out["half_tf32_min_d"] = 0
    return out


def main(dims):
    if not hasattr(config, "half_tf32_min_d"):
        print("config has no half_tf32_min_d switch: dimensions below the kernels' smallest half_tf32 "
              "dimension compare fp32 with fp32", flush=True)
    for n in (10000, 50000):
        for d in dims:
            x, y, a, b = inputs(n, d, "cuda")
            times = {}
            for half in (False, True):
                # The prepared points are cached per layout, and half_tf32 is part of it: no stale pair.
                with config.override(**switches(half)):
                    times[half] = per_iteration_ms(ours_runner("symmetric", x, y, a, b, "tf32", None), repeats=3)
            print(f"n={n} d={d}: fp32/TF32 {times[False]:.4f} ms, fp16 {times[True]:.4f} ms, "
                  f"ratio {times[True] / times[False]:.3f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [3, 8, 16, 32, 64, 128])
