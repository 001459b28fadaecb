"""Which implementation runs a call: the Triton kernels or the torch references.

The argument checks themselves live in ``otlinop._checks``; this module adds
the kernels' facts (is Triton installed, do the kernels run in the
interpreter, which dtypes they take) and the default precision of the dots.
"""

from __future__ import annotations

import os

import torch

from .._checks import BACKENDS, PRECISIONS, backend_name, precision_name, triton_ready
from ._triton import HAS_TRITON

__all__ = [
    "BACKENDS",
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "TRITON_DTYPES",
    "check_backend",
    "interpreter_defect",
    "interpreting",
    "resolve_backend",
    "resolve_precision",
]

#: Default ``precision`` of the Triton dots, chosen for accuracy. "tf32x3"
#: splits each fp32 operand into a TF32 high part and a TF32 low part and sums
#: three tensor-core products: close to strict fp32 accuracy at a fraction of
#: the cost of "ieee" (fp32 FMAs on CUDA cores). For 3d <= SPLIT_MAX_K the
#: cost dot's split is done once per pair of clouds and its three products are
#: one TF32 dot of width 3d (see ``_layout.SPLIT_MAX_K``). "tf32" (one
#: tensor-core product with 11 significant bits per input: TF32, or fp16 from
#: d = ``config.half_tf32_min_d`` on) is faster but rounds the inputs of every
#: dot: a relative error 2^-11 to 2^-10 on each product, which the logits then
#: multiply by ``2c|x||y|/eps``.
#: Half-precision points are promoted to float32 when the pair is prepared (exactly):
#: the setting applies to them as to float32 points.
DEFAULT_PRECISION = "tf32x3"

#: Dtypes the Triton kernels accept for the points.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ``triton.jit`` reads TRITON_INTERPRET when it decorates a function, i.e. when
# the kernel modules are imported, so what matters is the value at import time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the Triton kernels of this package run in the interpreter."""
    return _INTERPRETED


def interpreter_defect() -> str | None:
    """Why the installed Triton's interpreter cannot run these kernels, or None.

    Before Triton 3.7 the interpreter holds scalars as one-element arrays and
    converts a loop bound with ``int()`` of one, which numpy 2.4 made an error:
    every kernel with a ``range`` over a runtime bound raises TypeError (found
    on the GPU machine: Triton 3.6.0, numpy 2.5.2).
    """
    if not HAS_TRITON:
        return None
    import numpy
    import triton

    def version(module):
        return tuple(int(p) for p in module.__version__.split("+")[0].split(".")[:2] if p.isdigit())

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        return (f"the Triton interpreter of triton {triton.__version__} cannot run with numpy {numpy.__version__} "
                "(it converts loop bounds held as one-element arrays with int(), an error since numpy 2.4); "
                "install triton>=3.7 or numpy<2.4, or use backend='torch' on CPU tensors")
    return None


def resolve_precision(owner: str, precision) -> str:
    """The dot precision to use: ``precision``, or ``DEFAULT_PRECISION`` for None."""
    return precision_name(owner, precision) or DEFAULT_PRECISION


def check_backend(owner: str, backend, x: torch.Tensor) -> str | None:
    """The backend asked for (None for None and "auto"), once it is known to run on points ``x``.

    "triton" on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1
    set before this package is imported).
    """
    backend = backend_name(owner, backend)
    if backend == "triton":
        triton_ready(owner, x, installed=HAS_TRITON, interpreted=_INTERPRETED, dtypes=TRITON_DTYPES)
        if not x.is_cuda and interpreter_defect():
            raise ValueError(f"{owner}: backend='triton' on CPU tensors: {interpreter_defect()}")
    return backend


def resolve_backend(owner: str, backend, x: torch.Tensor) -> str:
    """Return "triton" or "torch" for a call on points ``x``.

    None and "auto" pick Triton for CUDA tensors of dtype
    float32/float16/bfloat16 and the torch reference otherwise.
    """
    backend = check_backend(owner, backend, x)
    if backend is None:
        return "triton" if (HAS_TRITON and x.is_cuda and x.dtype in TRITON_DTYPES) else "torch"
    return backend
