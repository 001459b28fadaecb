"""Where HALF_TF32 pays: one symmetric Sinkhorn step, "tf32", fp16 against fp32 operands.

Usage (GPU, repo root): PYTHONPATH=. python3 scripts/profile_half_tf32.py [d ...]
Prints ms per iteration (the bench's protocol) at n = m = 10k and 50k for each d,
with HALF_TF32 off and on; set otlinop.kernels._common.HALF_TF32_MIN_D from it.
"""
import sys

from otlinop.bench.sinkhorn_bench import _inputs, _ours_runner, per_iteration_ms
from otlinop.kernels import _common


def main(dims):
    for n in (10000, 50000):
        for d in dims:
            x, y, a, b = _inputs(n, d, "cuda")
            times = {}
            for half in (False, True):
                _common.HALF_TF32, _common.HALF_TF32_MIN_D = half, 0
                _common.clear_cache()
                times[half] = per_iteration_ms(_ours_runner("symmetric", x, y, a, b, "tf32", None), repeats=3)
            print(f"n={n} d={d}: fp32/TF32 {times[False]:.4f} ms, fp16 {times[True]:.4f} ms, "
                  f"ratio {times[True] / times[False]:.3f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [3, 8, 16, 32, 64, 128])
