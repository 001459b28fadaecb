"""``torch.autograd.Function`` whose ``apply`` does not recompute ``forward``'s signature.

``torch.autograd.Function.apply`` binds its arguments to the signature of
``forward`` (``inspect.signature``) at every call of a Function that defines
``setup_context``: tens of microseconds of host time per plan product, solve or
loss call, more than a small CUDA kernel takes. :class:`Function` computes it
once per class and stores it on ``forward`` as ``__signature__``, which
``inspect.signature`` returns as it is. Nothing else changes.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["Function"]


class Function(torch.autograd.Function):
    """Base of the package's autograd Functions: ``forward``'s signature computed once."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None:
            fn = forward.__func__ if isinstance(forward, staticmethod) else forward
            fn.__signature__ = inspect.signature(fn)
