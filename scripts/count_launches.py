"""Developer probe (CPU): how many launches a call makes, counted under the Triton interpreter.

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python scripts/count_launches.py [train|hvp|jvp ...] [--depth K]

Runs each call twice (warm caches), then once more counting:

- the Triton kernel launches, by kernel and launching line;
- the torch operators that launch work on a device: every dispatched aten op but
  views, metadata and allocations (``torch.utils._python_dispatch.TorchDispatchMode``),
  grouped by the last ``--depth`` frames of this repository that called them.

On a GPU each of them is a kernel launch (a few microseconds each in a latency-bound
call), so the counts say where a small call's kernels come from without a device.
They are not GPU profiles: the counts follow the code paths that CPU tensors take
(``backend="triton"`` forces the Triton kernels, but, for example, the CG vector work
runs as torch ops, as on CUDA while ``config.cg_fused`` is off, its default). Calls:

- ``train``: a training step of the default debiased ``SamplesLoss`` (blur 0.05,
  scaling 0.5), n = m = 64, d = 3, its forward, backward and an SGD update;
- ``hvp``: ``hvp_x`` with ``M = jacobi()`` at converged potentials, n = m = 200, d = 3,
  eps = 0.5;
- ``jvp``: ``torch.func.jvp(torch.func.grad(loss))`` of ``sinkhorn_loss`` (blur 1.5,
  ``converge="always"``), n = m = 100, d = 3.
"""
import argparse
import collections
import os
import sys
import traceback

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (before Python starts): the launches are counted in the interpreter")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import otlinop  # noqa: E402
from solvers import jacobi  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Ops that launch nothing on a device: views, metadata, allocations.
NO_LAUNCH = {"view", "as_strided", "unsqueeze", "reshape", "expand", "select", "slice", "alias", "_unsafe_view",
             "transpose", "t", "permute", "squeeze", "split", "split_with_sizes", "detach", "unbind",
             "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "resolve_conj",
             "resolve_neg", "promote_types", "_local_scalar_dense"}


def _frames(depth: int) -> str:
    stack = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(ROOT)]
    return " < ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in stack[::-1][:depth]) or "?"


class _Count(TorchDispatchMode):
    def __init__(self, depth: int):
        super().__init__()
        self.depth, self.ops = depth, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # The interpreter's own tensor work (inside a kernel) is not a launch.
        inside = any("triton/runtime" in f.filename for f in traceback.extract_stack()[-12:-1])
        if name not in NO_LAUNCH and not inside:
            self.ops[f"{_frames(self.depth)} {name}"] += 1
        return func(*args, **(kwargs or {}))


def count(name: str, fn, depth: int, top: int) -> None:
    launches = collections.Counter()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[f"{self.fn.__name__} @ {_frames(1)}"] += 1
        return run(self, *args, **kwargs)

    fn()
    fn()
    InterpretedFunction.run = counted
    mode = _Count(depth)
    try:
        with mode:
            fn()
    finally:
        InterpretedFunction.run = run
    print(f"== {name}: {sum(launches.values())} Triton launches, {sum(mode.ops.values())} torch ops that launch")
    for key, c in launches.most_common():
        print(f"   triton {c:4d}  {key}")
    for key, c in mode.ops.most_common(top):
        print(f"   torch  {c:4d}  {key}")


def _train():
    gen = torch.Generator().manual_seed(0)
    n, d = 64, 3
    x = torch.randn(n, d, generator=gen).requires_grad_()
    y = torch.randn(n, d, generator=gen) + 0.5
    a, b = torch.rand(n, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
    a, b = a / a.sum(), b / b.sum()
    loss = otlinop.SamplesLoss("sinkhorn", blur=0.05, scaling=0.5, backend="triton")

    def step():
        (gx,) = torch.autograd.grad(loss(a, x, b, y), [x])
        with torch.no_grad():
            x.sub_(0.1 * gx)
    return step


def _hvp():
    gen = torch.Generator().manual_seed(0)
    n, d, eps = 200, 3, 0.5
    x, y = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen) + 0.5
    a, b = torch.rand(n, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
    a, b = a / a.sum(), b / b.sum()
    A = torch.randn(n, d, generator=gen)
    res = otlinop.sinkhorn(x, y, a, b, eps=eps, method="alternating", threshold=1e-6)
    return lambda: otlinop.hvp_x(x, y, res.f, res.g, A, eps=eps, a=a, b=b, M=jacobi(), backend="triton")


def _jvp():
    gen = torch.Generator().manual_seed(0)
    n, d = 100, 3
    x, y = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen) + 0.5
    A = torch.randn(n, d, generator=gen)
    grad = torch.func.grad(lambda x: otlinop.sinkhorn_loss(x, y, blur=1.5, converge="always"))
    return lambda: torch.func.jvp(grad, (x,), (A,))[1]


CALLS = {"train": _train, "hvp": _hvp, "jvp": _jvp}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", nargs="*", default=list(CALLS), choices=list(CALLS),
                        help="which calls to count (default: all)")
    parser.add_argument("--depth", type=int, default=1, help="frames of this repository per torch-op group")
    parser.add_argument("--top", type=int, default=40, help="torch-op groups printed per call")
    args = parser.parse_args(argv)
    for name in args.calls:
        count(name, CALLS[name](), args.depth, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
