"""The autograd Functions of the Sinkhorn loss: value, gradients, Hessian-vector products.

:class:`SinkhornLoss` is the per-entry loss of ``otlinop.loss``; its backward
applies ``_SinkhornGrad`` (the gradient map, by the formulas of
``otlinop._loss_derivatives``), whose backward (the loss's double backward)
applies ``_SinkhornHvp``, linear in the directions. Derivatives that are not
implemented (second ones involving the weights, third ones) are carried by
``_NotImplementedDerivative`` nodes: they raise NotImplementedError when
autograd needs them, and only then.
"""

from __future__ import annotations

import torch

from ._checks import Inputs
from ._loss_derivatives import converged, loss_value, sinkhorn_grad, sinkhorn_hvp, solve

__all__ = ["SinkhornLoss"]

_WEIGHT_SECOND_ORDER_MESSAGE = (
    "{owner}: second derivatives of the Sinkhorn loss that involve the weights (d^2 S / da^2, d^2 S / da dx, "
    "...) are not implemented, but {why}. Second derivatives w.r.t. the points x and y are implemented: "
    "differentiate the point gradients w.r.t. the points only (torch.autograd.grad(..., inputs=(x, y))), "
    "pass the weights detached (a.detach(), b.detach()), and leave the weight gradients out of the function "
    "you differentiate twice. No approximate answer is returned (autograd through the Sinkhorn iterations "
    "would give a different, unrolled, one).")

_THIRD_ORDER_MESSAGE = (
    "{owner}: third derivatives of the Sinkhorn loss are not implemented: the Hessian-vector "
    "product of a double backward can be differentiated w.r.t. the direction (it is linear in it), not "
    "w.r.t. the points or the weights. Call the second torch.autograd.grad without create_graph, or with "
    "inputs= that exclude the points and weights.")


class _NotImplementedDerivative(torch.autograd.Function):
    """Zeros that depend on some tensors, with a backward that raises.

    Added to a result whose derivative w.r.t. those tensors is not
    implemented: autograd runs this node (and raises) only when a requested
    gradient needs that derivative, so the implemented ones keep working.
    """

    @staticmethod
    def forward(ctx, message, like, *deps):
        ctx.message = message
        return torch.zeros_like(like)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(ctx.message)


def _guard(t, message: str, *deps):
    """``t``, made to depend on ``deps`` through a ``_NotImplementedDerivative`` when
    recording a graph (differentiating ``t`` w.r.t. ``deps`` then raises ``message``)."""
    if t is None or not torch.is_grad_enabled():
        return t
    deps = [u for u in deps if u.requires_grad]
    if not deps:
        return t
    return t + _NotImplementedDerivative.apply(message, t.detach(), *deps)


def _hessian_product(A, B, data, sol, spec, second, needs) -> tuple:
    """``H [A; B]`` (``sinkhorn_hvp``) for ``data = (x, y, a, b)``: differentiable
    w.r.t. the directions, and raising if differentiated w.r.t. the data (third order)."""
    Hx, Hy = _SinkhornHvp.apply(A, B, data, sol, spec, second, needs)
    message = _THIRD_ORDER_MESSAGE.format(owner=second.owner)
    return _guard(Hx, message, *data), _guard(Hy, message, *data)


class _SinkhornHvp(torch.autograd.Function):
    """``(A, B) -> H [A; B]`` with the data ``(x, y, a, b)`` held fixed.

    Linear in the directions, with a symmetric H: its backward is the same
    product applied to the incoming gradients (what
    ``torch.autograd.functional.hvp``'s double-vjp trick differentiates).
    """

    @staticmethod
    def forward(ctx, A, B, data, sol, spec, second, needs):
        ctx.set_materialize_grads(False)
        ctx.data, ctx.sol, ctx.spec, ctx.second = data, sol, spec, second
        x, y, a, b = (t.detach() for t in data)
        return sinkhorn_hvp(x, y, a, b, A, B, sol, spec, second, needs)

    @staticmethod
    def backward(ctx, gx, gy):
        needs = tuple(ctx.needs_input_grad[:2])
        if not any(needs) or (gx is None and gy is None):
            return None, None, None, None, None, None, None
        dA, dB = _hessian_product(gx, gy, ctx.data, ctx.sol, ctx.spec, ctx.second, needs)
        return dA, dB, None, None, None, None, None


class _SinkhornGrad(torch.autograd.Function):
    """The gradient map (x, y) -> (grad_x, grad_y, grad_a, grad_b) at a solution.

    The weights come in detached: derivatives w.r.t. them are guarded by the
    caller (``SinkhornLoss.backward``), so that differentiating the point
    gradients w.r.t. the points works whether the weights require grad or
    not. ``backward`` (the double backward of the loss) returns the
    Hessian-vector products ``H [A; B]`` in x and y; a direction on the
    weight gradients raises (their derivatives are not implemented).
    ``weights`` are the caller's weights (for the third-order _guard).
    """

    @staticmethod
    def forward(ctx, x, y, a, b, sol, spec, needs, second, weights):
        ctx.set_materialize_grads(False)   # an unused gradient arrives as None: no HVP for it
        ctx.sol, ctx.spec, ctx.second, ctx.weights = sol, spec, second, weights
        ctx.save_for_backward(x, y, a, b)
        return sinkhorn_grad(x, y, a, b, sol, spec, needs)

    @staticmethod
    def backward(ctx, A, B, dA, dB):
        x, y, a, b = ctx.saved_tensors
        for name, D in (("a", dA), ("b", dB)):
            if D is not None and bool(D.any()):
                why = f"the function differentiated twice depends on the gradient w.r.t. the weights {name}"
                raise NotImplementedError(_WEIGHT_SECOND_ORDER_MESSAGE.format(owner=ctx.second.owner, why=why))
        needs = tuple(ctx.needs_input_grad[:2])
        if A is None and B is None:
            return (None,) * 9
        Hx, Hy = _hessian_product(A, B, (x, y, *ctx.weights), ctx.sol, ctx.spec, ctx.second, needs)
        return Hx, Hy, None, None, None, None, None, None, None


class SinkhornLoss(torch.autograd.Function):
    """Per-entry Sinkhorn loss (B,) of batched (x, y, a, b); gradients by ``_SinkhornGrad``.

    ``second.converge`` picks the potentials (docs/second-order.md): "always"
    iterates them to convergence here, in the forward; "create_graph" in a
    backward that records a graph (``torch.is_grad_enabled()`` there: the
    gradient is then differentiated again), once per forward; "never" keeps
    the eps schedule's.
    """

    @staticmethod
    def forward(ctx, x, y, a, b, spec, second, verbose):
        inp = Inputs(x.detach(), y.detach(), a.detach(), b.detach(), batched=True)
        sol = solve(inp, spec, verbose)
        if second.converge == "always":
            sol = converged(inp, sol, spec, second)
        dt = inp.pot_dtype
        value = loss_value(inp.a.to(dt), inp.b.to(dt), sol, spec)
        ctx.spec, ctx.sol, ctx.second = spec, sol, second
        ctx.converged_sol = None      # "create_graph": the converged potentials, once computed
        ctx.save_for_backward(x, y, a, b)
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_value):
        inputs = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if not any(needs):
            return None, None, None, None, None, None, None
        sol, spec, second = ctx.sol, ctx.spec, ctx.second
        if second.converge == "create_graph" and torch.is_grad_enabled():
            # A graph is recorded: the gradient will be differentiated again, by the HVP
            # (an implicit-function derivative at a fixed point). Both must come from the
            # same, converged, potentials for the HVP to be the derivative of this gradient.
            if ctx.converged_sol is None:
                inp = Inputs(*(t.detach() for t in inputs), batched=True)
                ctx.converged_sol = converged(inp, sol, spec, second)
            sol = ctx.converged_sol
        dt = sol.f.dtype
        x, y, a, b = (t.to(dt) for t in inputs)
        grads = _SinkhornGrad.apply(x, y, a.detach(), b.detach(), sol, spec, needs, second, (a, b))
        names = " and ".join(n for n, t in (("a", a), ("b", b)) if t.requires_grad)
        if names and torch.is_grad_enabled():
            # The gradients' derivatives w.r.t. the weights (d^2 S / da dx, d^2 S / da^2) are not implemented.
            why = f"a derivative of the gradients w.r.t. the weights {names} was requested"
            message = _WEIGHT_SECOND_ORDER_MESSAGE.format(owner=second.owner, why=why)
            grads = [_guard(gt, message, a, b) for gt in grads]
        w = grad_value.to(dt)
        out = []
        for t, gt in zip(inputs, grads):
            if gt is None:
                out.append(None)
                continue
            scale = w.view(-1, *([1] * (gt.ndim - 1)))
            out.append((scale * gt).to(t.dtype))
        return (*out, None, None, None)
