"""Developer probe (GPU): CPU launch overhead against GPU time of the streaming kernels.

python scripts/profile_kernels.py  -- prints, per case, the host time per call
(no sync between calls) and the device time (CUDA events), for forced column
splits and both dot paths. Not a benchmark of record (see python -m otlinop.bench).
"""
import time

import torch

from otlinop.bench.timing import graph_replay_ms
from otlinop.kernels import _common, lse_cost, plan_apply

_common._CHECK_FINITE = False


def timed(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps
    try:
        graph = graph_replay_ms(fn, reps)
    except Exception as exc:  # noqa: BLE001
        graph = float("nan")
        print("graph capture failed:", type(exc).__name__, exc)
    return host * 1e3, wall * 1e3, graph


print("case | host ms/call | wall ms/call | graph-replay (device) ms")
for n, d in ((1000, 3), (10_000, 3), (10_000, 64), (50_000, 3), (50_000, 64)):
    x = torch.randn(n, d, device="cuda")
    y = torch.randn(n, d, device="cuda") + 0.5
    h = torch.randn(n, device="cuda") * 0.1
    V = torch.randn(n, device="cuda")
    for fma in (0, 8):
        if d > 8 and fma:
            continue
        _common.FMA_MAX_D = fma
        for splits in (None, 1, 2, 4, 8) if n == 10_000 else (None,):
            _common._FORCE_SPLITS = splits
            for prec in ("tf32", "tf32x3"):
                r1 = timed(lambda: lse_cost(x, y, h, eps=0.5, precision=prec))
                r2 = timed(lambda: plan_apply(x, y, h, h, V, eps=0.5, precision=prec))
                print(f"n={n} d={d} fma_max={fma} splits={splits} {prec}: lse {r1[0]:.3f} {r1[1]:.3f} {r1[2]:.3f}"
                      f" | plan {r2[0]:.3f} {r2[1]:.3f} {r2[2]:.3f}", flush=True)
    _common._FORCE_SPLITS = None
