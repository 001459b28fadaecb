"""Developer probe (GPU): where the host time of one kernel call goes.

python scripts/profile_host.py  -- cProfile of 300 calls of lse_cost and
plan_apply at n = m = 1000 (device time negligible), sorted by own time.
The kernels' per-call finiteness checks are off while it runs
(``config.check_finite``, restored on exit).
"""
import cProfile
import pstats
import time

import torch

from otlinop import config
from otlinop.kernels import lse_cost, plan_apply


def main():
    x = torch.randn(1000, 3, device="cuda")
    y = torch.randn(1000, 3, device="cuda")
    h = torch.randn(1000, device="cuda")
    for name, fn in (("lse_cost", lambda: lse_cost(x, y, h, eps=0.5)),
                     ("plan_apply", lambda: plan_apply(x, y, h, h, h, eps=0.5)),
                     ("torch add (reference)", lambda: torch.add(h, h, alpha=2.0))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(300):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - t0) / 300 * 1e6:.1f} us per call")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    with config.override(check_finite=False):
        main()
