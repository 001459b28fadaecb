"""``triton`` and ``triton.language``, or stand-ins when Triton is not installed.

Triton is a dependency on Linux only. Elsewhere the package still imports: the
kernel definitions below use only decorators and ``tl.constexpr`` at import
time, which the stand-ins provide, and ``resolve_backend`` sends every call to
the torch references (``backend="triton"`` raises a clear error).
"""

from __future__ import annotations

import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    HAS_TRITON = False

    def _unavailable(*args, **kwargs):
        raise RuntimeError("Triton is not installed: otlinop's Triton kernels cannot run here; "
                           "use backend='torch' (the default without CUDA)")

    class _Kernel:
        """A decorated kernel that cannot be launched."""

        def __init__(self, fn=None):
            self.fn = fn

        def __getitem__(self, grid):
            return _unavailable

        def __call__(self, *args, **kwargs):
            _unavailable()

    def _decorator(fn=None, **kwargs):
        # Used bare (@triton.jit) or with arguments (@triton.jit(...), @triton.autotune(...)).
        if fn is not None and callable(fn):
            return _Kernel(fn)
        return lambda f: _Kernel(f)

    def _cdiv(a, b):
        return -(-a // b)

    def _next_power_of_2(n):
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    tl = types.SimpleNamespace(constexpr=lambda value=None: value)
    triton = types.SimpleNamespace(jit=_decorator, autotune=_decorator, Config=lambda *a, **k: (a, k),
                                   cdiv=_cdiv, next_power_of_2=_next_power_of_2, language=tl)

__all__ = ["triton", "tl", "HAS_TRITON"]
