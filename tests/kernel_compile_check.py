"""Compile every Triton kernel variant that representative calls launch, for a Hopper GPU
(sm_90), on a machine without one (the helper of tests/test_kernels_compile.py).

The Triton interpreter, which runs the kernels in the CPU test suite, does not type-check
them as the compiler does: a loop-carried variable whose type changes, for one, runs in the
interpreter and fails to compile (the fifteenth session lost a GPU run to one). So:

    python tests/kernel_compile_check.py record OUT.json   (TRITON_INTERPRET=1)
    python tests/kernel_compile_check.py compile OUT.json  (without it)

``record`` runs the calls below in the interpreter and writes each distinct launch (the
kernel, its argument types and constexpr values); ``compile`` compiles each with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (TTIR to cubin, ptxas included) and
exits non-zero naming the kernels that fail, with the compiler's message.
"""

import importlib
import inspect
import json
import os
import sys

TYPES = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16", "int32": "i32",
         "int64": "i64", "bool": "i1", "uint8": "u8", "int8": "i8", "int16": "i16"}


def _calls():
    """Representative public calls: the loss (forward, backward, debiased and unbalanced), both
    Sinkhorn methods, plan products, an HVP through CG, a truncated plan, multiscale Sinkhorn,
    CG's fused iteration (float32 and float64), the one-launch value checks; d = 3 and 64 (other
    dot layouts), float32 and bfloat16 points."""
    import torch

    import otlinop
    from otlinop import PlanOperator, hvp_x, sinkhorn
    from solvers import cg, jacobi
    gen = torch.Generator().manual_seed(0)
    for d, dtype in ((3, torch.float32), (64, torch.float32), (3, torch.bfloat16)):
        x = torch.randn(40, d, generator=gen).to(dtype).requires_grad_()
        y = (torch.randn(30, d, generator=gen) + 0.5).to(dtype)
        for options in (dict(), dict(reach=1.0), dict(diameter=8.0, debias=False)):
            value = otlinop.SamplesLoss(blur=0.3, backend="triton", **options)(x, y)
            torch.autograd.grad(value, x)
        xf, yf = x.detach().float(), y.float()
        # The one-launch value checks (the CUDA path of measures_and_read), balanced or not.
        from otlinop._measure_flags import measure_flags
        w = torch.full((1, 40), 1 / 40), torch.full((1, 30), 1 / 30)
        for balanced in (True, False):
            measure_flags(x.detach().unsqueeze(0), y.unsqueeze(0), *w, balanced=balanced, cost_scale=0.5,
                          limit=3e38, tol=1e-3)
        # Few iterations: each variant's first launch is what counts.
        res = sinkhorn(xf, yf, blur=0.5, backend="triton", max_iter=12 if d == 3 else 14)
        sinkhorn(xf, yf, eps=0.25, method="alternating", backend="triton", max_iter=3, check_every=1)
        P = PlanOperator(xf, yf, res.f, res.g, eps=res.eps, backend="triton")
        P @ torch.randn(30, generator=gen)
        P.T @ torch.randn(40, 2, generator=gen)
        hvp_x(xf, yf, res.f, res.g, torch.randn(40, d, generator=gen), eps=res.eps, M=jacobi(), solver=cg,
              maxiter=2, backend="triton")
        if d == 3:
            for dt in (torch.float32, torch.float64):       # CG's fused vector kernels
                Q = torch.randn(20, 20, generator=gen, dtype=dt)
                for M, every in ((None, 1), (jacobi(), 3)):
                    cg(Q @ Q.T + 20 * torch.eye(20, dtype=dt), torch.randn(20, generator=gen, dtype=dt), M=M,
                       maxiter=4, check_every=every, _backend="triton")
            T = P.truncated(1e-6)
            T @ torch.randn(30, generator=gen)
            sinkhorn(xf, yf, blur=0.3, multiscale=True, backend="triton", threshold=float("inf"))


def record(path):
    import torch
    import triton.runtime.interpreter as interpreter
    seen = {}
    run = interpreter.InterpretedFunction.run

    def recording(self, *args, **kwargs):
        fn = self.fn
        sig = inspect.signature(fn)
        bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        desc = {}
        for name, v in bound.arguments.items():
            if isinstance(v, torch.Tensor):
                desc[name] = ["ptr", str(v.dtype).replace("torch.", "")]
            elif isinstance(v, bool):
                desc[name] = ["bool", v]
            elif isinstance(v, int):
                desc[name] = ["int", v]
            elif isinstance(v, float):
                desc[name] = ["float", v]
            elif isinstance(v, str):
                desc[name] = ["str", v]
            elif v is None:
                desc[name] = ["none", None]
            else:
                desc[name] = ["other", repr(v)]
        warps = kwargs.get("num_warps", 4)
        key = json.dumps([fn.__module__, fn.__qualname__, warps, sorted(
            (k, v) for k, v in desc.items() if v[0] in ("bool", "str", "none") or k.isupper() or "BLOCK" in k)],
            default=str)
        seen.setdefault(key, dict(module=fn.__module__, name=fn.__name__, args=desc, num_warps=warps))
        return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = recording
    _calls()
    with open(path, "w") as out:
        json.dump(list(seen.values()), out)
    print(f"{len(seen)} launch variants recorded")


def _jit(obj):
    import triton
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn
    return obj


def compile_all(path):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = []
    launches = json.load(open(path))
    for rec in launches:
        jit = _jit(getattr(importlib.import_module(rec["module"]), rec["name"]))
        signature, constexprs = {}, {}
        for p in jit.params:
            kind, v = rec["args"].get(p.name, ["none", None])
            if p.is_constexpr or kind in ("str", "none"):
                signature[p.name], constexprs[p.name] = "constexpr", v
            elif kind == "ptr":
                signature[p.name] = "*" + TYPES[v]
            elif kind == "int":
                signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif kind == "bool":
                signature[p.name] = "i1"
            else:
                signature[p.name] = "fp32"
        try:
            triton.compile(ASTSource(jit, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=rec["num_warps"]))
        except Exception as exc:     # noqa: BLE001 (every failure is reported, with its cause)
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            failures.append(f"{rec['module']}.{rec['name']} {constexprs}: {type(cause).__name__}: "
                            f"{str(cause)[-800:]}")
    print(f"{len(launches)} launch variants compiled for sm_90, {len(failures)} failed")
    for line in failures:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    what, out = sys.argv[1], sys.argv[2]
    if what == "record":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        record(out)
    else:
        assert os.environ.get("TRITON_INTERPRET") != "1"
        sys.exit(compile_all(out))
