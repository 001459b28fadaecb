"""``triton`` and ``triton.language``, or stand-ins when Triton is not installed.

Triton is a dependency on Linux only. Elsewhere the package still imports: the
kernel definitions below use only decorators and ``tl.constexpr`` at import
time, which the stand-ins provide, and ``resolve_backend`` sends every call to
the torch references (``backend="triton"`` raises a clear error).
"""

from __future__ import annotations

import types


def cdiv(a: int, b: int) -> int:
    """Ceiling division of integers, in plain Python: ``triton.cdiv`` is a jit
    function whose host calls cost microseconds each (the launchers' hot path)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), in plain Python (see :func:`cdiv`)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


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

    tl = types.SimpleNamespace(constexpr=lambda value=None: value)
    triton = types.SimpleNamespace(jit=_decorator, autotune=_decorator, Config=lambda *a, **k: (a, k),
                                   cdiv=cdiv, next_power_of_2=next_power_of_2, language=tl)

__all__ = ["triton", "tl", "HAS_TRITON", "cdiv", "next_power_of_2"]
