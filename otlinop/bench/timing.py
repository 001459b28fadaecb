"""Timing helpers and hardware ceilings shared by the benchmarks.

Times are medians over repeated runs measured with CUDA events (through
``triton.testing.do_bench``) after a warm-up; on the CPU, wall-clock medians.
The ceilings are measured in the same run as the figures they scale.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import time

import torch


def bench(fn, *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median time of ``fn()`` in milliseconds."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while not times or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def graph_replay_ms(fn, reps: int = 20) -> float:
    """Device time of ``fn()`` in milliseconds: one call captured in a CUDA graph, replayed ``reps`` times.

    Without the host's launch cost (the graph replays the recorded kernels),
    so it tells a launch-bound call from a device-bound one. ``fn`` is run
    once on a side stream first (warm-up, autotuning), as capture requires.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def child_rows(code: str, payload: dict, timeout: float, *, env: dict | None = None):
    """Run ``python -c code json(payload)`` and collect the rows it prints as ``ROW <json>`` lines.

    Returns ``(rows, exit_code, stderr)``: ``exit_code`` is None when the child ran
    past ``timeout`` seconds (the rows printed before then are kept). Each suite
    turns a failure into its own error row.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True,
                              timeout=timeout, env=env)
        out, err, exit_code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, exit_code = "", None
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    return rows, exit_code, err or ""


def peak_memory(fn) -> int:
    """Peak extra bytes allocated on the current CUDA device while ``fn()`` runs."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _exp2_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, O, N_ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x0 = tl.load(X + offs)
        # Four independent chains keep the special-function unit busy while
        # each chain waits on its previous result.
        a, b, c, d = x0, x0 + 0.25, x0 + 0.5, x0 + 0.75
        for _ in range(N_ITERS):
            a = tl.exp2(a * -0.5)
            b = tl.exp2(b * -0.5)
            c = tl.exp2(c * -0.5)
            d = tl.exp2(d * -0.5)
        tl.store(O + offs, a + b + c + d)

    return kernel


def measure_ceilings() -> dict:
    """Measure the ceilings now (a few seconds of GPU work); see :func:`ceilings`."""
    if not torch.cuda.is_available():
        return {}
    out = {}
    n_iters, block = 256, 1024
    X = torch.rand(132 * 64 * block, device="cuda")
    O = torch.empty_like(X)
    kernel = _exp2_kernel()
    grid = (X.numel() // block,)
    t = bench(lambda: kernel[grid](X, O, N_ITERS=n_iters, BLOCK=block))
    out["exp2_per_s"] = 4 * n_iters * X.numel() / (t * 1e-3)

    A = torch.randn(8192, 8192, device="cuda")
    B = torch.randn(8192, 8192, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, tf32 in (("fp32_flops", False), ("tf32_flops", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            t = bench(lambda: A @ B)
            out[name] = 2 * 8192 ** 3 / (t * 1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    src = torch.empty(2 ** 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    out["copy_bytes_per_s"] = 2 * src.numel() * 4 / (t * 1e-3)
    del A, B, src, dst, X, O
    torch.cuda.empty_cache()
    return out


@functools.lru_cache(maxsize=None)
def _ceilings_by(measure) -> dict:
    return measure()


def ceilings(*, measure=measure_ceilings) -> dict:
    """The hardware ceilings, measured once per process.

    Parameters
    ----------
    measure : callable, optional
        What measures them (default :func:`measure_ceilings`). Its result
        is kept: it is called by the first call only (for each ``measure``),
        so that every suite of ``python -m otlinop.bench all`` scales by the
        same figures. A test passes a fake.

    Returns
    -------
    dict
        A copy of the measured exp2 rate (``exp2_per_s``, 1/s), fp32 strict
        and TF32 matmul rates (``fp32_flops``, ``tf32_flops``, FLOP/s) and
        device-memory copy bandwidth (``copy_bytes_per_s``, bytes read +
        written per second); empty without a GPU.
    """
    return dict(_ceilings_by(measure))


def ceilings_measured() -> bool:
    """Whether :func:`ceilings` has measured them in this process (since the last :func:`clear_ceilings`)."""
    return _ceilings_by.cache_info().currsize > 0


def clear_ceilings() -> None:
    """Forget the measured ceilings: the next :func:`ceilings` call measures again."""
    _ceilings_by.cache_clear()


def format_ceilings(c: dict) -> str:
    if not c:
        return "(no GPU: ceilings not measured)"
    return (f"measured ceilings: exp2 {c['exp2_per_s']:.3g}/s, fp32 matmul {c['fp32_flops'] / 1e12:.1f} TFLOP/s, "
            f"TF32 matmul {c['tf32_flops'] / 1e12:.1f} TFLOP/s, copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s")


def matmul_rate(c: dict, precision: str) -> float:
    """Dot-product rate for a kernel precision: tf32x3 does three TF32 products."""
    if precision == "ieee":
        return c["fp32_flops"]
    if precision == "tf32":
        return c["tf32_flops"]
    return c["tf32_flops"] / 3


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "CPU (not a GPU figure)"
