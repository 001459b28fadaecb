"""Developer probe (GPU): CPU launch overhead against GPU time of the streaming kernels.

python scripts/profile_kernels.py  -- prints, per case, the host time per call
(no sync between calls) and the device time (CUDA events), for forced column
splits and both dot paths. Not a benchmark of record (see python -m otlinop.bench).

The dot path is chosen through ``config.fma_max_d`` and the finiteness checks
are off (``config.check_finite``), both restored on exit. A forced split count
is passed to the launchers as their private keyword ``_splits``
(``lse_cost(..., _splits=k)``, ``plan_apply(..., _splits=k)``); where they do
not take it yet, only the launchers' own split is timed.
"""
import inspect
import time

import torch

from otlinop import config
from otlinop.bench.timing import graph_replay_ms
from otlinop.kernels import lse_cost, plan_apply


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


def takes_splits() -> bool:
    """Whether both launchers take a forced split count (``_splits=``)."""
    return all("_splits" in inspect.signature(fn).parameters for fn in (lse_cost, plan_apply))


def main():
    forced = takes_splits()
    if not forced:
        print("(lse_cost / plan_apply take no _splits= keyword here: the forced-split rows are skipped)")
    print("case | host ms/call | wall ms/call | graph-replay (device) ms")
    for n, d in ((1000, 3), (10_000, 3), (10_000, 64), (50_000, 3), (50_000, 64)):
        x = torch.randn(n, d, device="cuda")
        y = torch.randn(n, d, device="cuda") + 0.5
        h = torch.randn(n, device="cuda") * 0.1
        V = torch.randn(n, device="cuda")
        for fma in (0, 8):
            if d > 8 and fma:
                continue
            for splits in (None, 1, 2, 4, 8) if (n == 10_000 and forced) else (None,):
                extra = {} if splits is None else {"_splits": splits}
                for prec in ("tf32", "tf32x3"):
                    with config.override(fma_max_d=fma):
                        r1 = timed(lambda: lse_cost(x, y, h, eps=0.5, precision=prec, **extra))
                        r2 = timed(lambda: plan_apply(x, y, h, h, V, eps=0.5, precision=prec, **extra))
                    print(f"n={n} d={d} fma_max={fma} splits={splits} {prec}: lse {r1[0]:.3f} {r1[1]:.3f} "
                          f"{r1[2]:.3f} | plan {r2[0]:.3f} {r2[1]:.3f} {r2[2]:.3f}", flush=True)


if __name__ == "__main__":
    with config.override(check_finite=False):
        main()
