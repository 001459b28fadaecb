"""Developer probe (GPU): where the time of whole user calls goes.

python scripts/profile_calls.py [--out DIR]  -- torch.profiler over

* a SamplesLoss training step (forward + backward of the default debiased
  loss, blur = 0.05, scaling = 0.5, then an SGD step of the points; x ~ N(0, I),
  y ~ N(0.5, I), random weights) at n in {2048, 8192}, d in {3, 64};
* one ``hvp_x`` on a dense plan (n = 10k, d = 3, eps = 0.5; float32
  potentials from a float32 ``sinkhorn``) with M = jacobi().

For each: wall time per call (median of 5 after 2 warm-ups), device time,
kernel launches, host synchronisations and memcpys, and the kernels that take
the most device time. Public APIs only. Not a benchmark of record.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import otlinop
from solvers import jacobi


def wall(fn, reps=5, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def summarise(name, fn, out):
    ms = wall(fn)
    # with_stack: the host table below names the Python lines of the costliest host operations
    # (an H100 profile of a training step showed 2.1 ms of aten::fill_ that the flat table cannot place).
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                        "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if "Synchronize" in e.key)
    memcpy = sum(e.count for e in events if e.key.startswith("cudaMemcpy"))
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.self_device_time_total for e in on_device)
    # Kernels run, graph replays included (a replay is one cudaGraphLaunch, not a launch each).
    kernels = sum(e.count for e in on_device if not e.key.startswith("Memcpy") and not e.key.startswith("Memset"))
    graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    line = (f"{name}: wall {ms:.2f} ms, device {device_us / 1e3:.2f} ms, kernels {kernels}, launches {launches}, "
            f"graph replays {graphs}, syncs {syncs}, memcpy calls {memcpy}")
    print(line, flush=True)
    table = events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60)
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    by_stack = prof.key_averages(group_by_stack_n=8).table(sort_by="self_cpu_time_total", row_limit=15,
                                                           max_name_column_width=60)
    (out / f"{name}.txt").write_text(line + "\n\n" + table + "\n\nhost:\n" + cpu_table
                                     + "\n\nhost, by Python stack (8 frames):\n" + by_stack)
    return line


def train_step(n, d, precision=None):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen).requires_grad_()
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    a = torch.rand(n, device="cuda", generator=gen) + 0.5
    b = torch.rand(n, device="cuda", generator=gen) + 0.5
    a, b = a / a.sum(), b / b.sum()
    loss_fn = otlinop.SamplesLoss("sinkhorn", blur=0.05, scaling=0.5, precision=precision)

    def step():
        loss = loss_fn(a, x, b, y)
        (gx,) = torch.autograd.grad(loss, [x])
        with torch.no_grad():       # the points move, as in training (the default diameter too)
            x.sub_(0.1 * gx)
        return gx
    return step


def dense_hvp(n=10_000, d=3, eps=0.5):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randn(n, d, device="cuda", generator=gen) + 0.5
    a = torch.rand(n, device="cuda", generator=gen) + 0.5
    b = torch.rand(n, device="cuda", generator=gen) + 0.5
    a, b = a / a.sum(), b / b.sum()
    A = torch.randn(n, d, device="cuda", generator=gen)
    res = otlinop.sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-6)
    f, g = res.f, res.g

    def call():
        return otlinop.hvp_x(x, y, f, g, A, eps=eps, a=a, b=b, M=jacobi())
    _, result = call()
    print(f"dense hvp_x: {result.n_iter} CG iterations, status {result.status}", flush=True)
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile-calls", help="folder for the per-call profiler tables")
    parser.add_argument("--only", default="", help="comma-separated subset of: train, hvp")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192], help="n of the training steps")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(","))) or {"train", "hvp"}
    lines = []
    if "train" in only:
        for n in args.sizes:
            for d in (3, 64):
                for precision in (None, "tf32"):
                    tag = f"train_n{n}_d{d}_{precision or 'default'}"
                    lines.append(summarise(tag, train_step(n, d, precision), out))
    if "hvp" in only:
        lines.append(summarise("hvp_x_dense_n10k_d3", dense_hvp(), out))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
