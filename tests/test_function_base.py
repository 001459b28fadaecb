"""solvers._function.Function: forward's signature computed once per class, apply unchanged."""
import inspect

import torch

import otlinop  # noqa: F401  (defines the package's Functions)
from solvers._function import Function


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_function_of_the_packages_carries_its_signature():
    classes = [c for c in _subclasses(Function) if c.__module__.startswith(("otlinop", "solvers"))]
    assert len(classes) >= 15
    for cls in classes:
        fn = cls.forward
        assert "__signature__" in fn.__dict__, cls
        code = fn.__code__
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & inspect.CO_VARARGS)]
        assert tuple(fn.__signature__.parameters) == names, cls


def test_apply_binds_defaults_and_differentiates():
    class Scale(Function):
        @staticmethod
        def forward(x, factor=3.0):
            return x * factor

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.factor = inputs[1]

        @staticmethod
        def backward(ctx, grad):
            return grad * ctx.factor, None

    x = torch.ones(2, requires_grad=True)
    assert "__signature__" in Scale.forward.__dict__
    y = Scale.apply(x)                  # the default, bound through the cached signature
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, torch.full((2,), 3.0)) and torch.equal(g, torch.full((2,), 3.0))
    # (Positionally: torch 2.11's apply passes a keyword argument both bound and as a keyword.)
    assert torch.equal(Scale.apply(x, 2.0), torch.full((2,), 2.0))
