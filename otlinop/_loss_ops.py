"""The Sinkhorn loss as two opaque ``torch.library`` custom ops, for ``torch.compile``.

``torch.compile`` (dynamo) cannot trace the loss's Python: the eps schedule
reads the diameter back (``.item()``), the loops are data-dependent, and
the value checks read flags back. Wrapped as custom ops, the loss is one
node of the graph, whose shapes and dtypes the fake (meta) functions give:

- ``otlinop::sinkhorn_loss``: the data ``(x, y, a, b)`` (batched) and plain
  options in; the per-entry value (B,) and the potentials out (the value
  checks and the default diameter are computed inside, in one read-back);
- ``otlinop::sinkhorn_loss_grad``: the gradients w.r.t. ``(x, y, a, b)``
  at those potentials, which the first op's autograd formula
  (``register_autograd``) calls, scaled by the incoming gradient.

Only plain values can be op arguments: the Python objects of the double
backward (``hvp_solver``, ``hvp_preconditioner``, the ``hvp_log`` and
``last_hvp_solve`` / ``last_refinement`` recorders) cannot. AOTAutograd does
not differentiate a compiled backward again (double backward through
``torch.compile`` raises there), so the gradient op's autograd formula raises
NotImplementedError (reached with dynamo's "eager" backend) and those objects
are not needed under compile; eager calls keep the
autograd Functions of ``otlinop._loss_functions`` (second order included).
Under compile, ``converge="always"`` converges in the forward op without a
``last_refinement`` report.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op

from ._checks import box_diameter, measures_and_read
from ._loss_derivatives import SecondOrder, Solution, Spec, converged, loss_value, sinkhorn_grad, solve
from ._sinkhorn_schedule import resolve_eps
from .kernels._layout import scoped_cache
from .kernels._reference import compute_dtype

__all__ = ["POTENTIALS", "checked_schedule", "loss_op"]

#: The potentials the forward op returns after the value, in order (empty
#: tensors for the debiasing ones without ``debias``).
POTENTIALS = ("f", "g", "f_pre", "g_pre", "f_aa", "g_bb", "f_aa_pre", "g_bb_pre")


def _spec(eps_list, eps, rho, debias, cost_scale, backend, precision) -> Spec:
    return Spec(eps_list=tuple(eps_list), eps=eps, rho_x=rho, rho_y=rho, debias=debias, cost_scale=cost_scale,
                backend=backend, precision=precision)


def checked_schedule(owner: str, x, y, a, b, *, blur: float, scaling: float, diameter, rho, check: bool,
                     cost_scale: float):
    """``(Inputs, eps, schedule)`` of one loss call: the value checks (when ``check``) and
    the default diameter share one host synchronisation; with ``check`` False and
    ``diameter`` given there is none (a CUDA graph can capture the call)."""
    inp, diam = measures_and_read(owner, x, y, a, b, balanced=rho is None, check=check,
                                  read=box_diameter if diameter is None else None, cost_scale=cost_scale)
    if diameter is None:
        diameter = blur if diam <= 0 else diam    # every point at one place: any positive scale works
    eps, schedule, _ = resolve_eps(owner, "symmetric", blur, None, scaling, diameter, inp)
    return inp, eps, schedule


@custom_op("otlinop::sinkhorn_loss", mutates_args=())
def _loss_forward(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, owner: str, blur: float,
                  scaling: float, diameter: Optional[float], rho: Optional[float], debias: bool,
                  cost_scale: float, backend: Optional[str], precision: Optional[str], check: bool,
                  converge: str, rtol: Optional[float], verbose: bool) -> list[torch.Tensor]:
    """[value (B,), *POTENTIALS] of batched data; the eager loss's forward, as one op."""
    with scoped_cache():     # nothing prepared here outlives the op (CUDA-graph pools under compile)
        return _forward(x, y, a, b, owner, blur, scaling, diameter, rho, debias, cost_scale, backend, precision,
                        check, converge, rtol, verbose)


def _forward(x, y, a, b, owner, blur, scaling, diameter, rho, debias, cost_scale, backend, precision, check,
             converge, rtol, verbose):
    inp, eps, schedule = checked_schedule(owner, x, y, a, b, blur=blur, scaling=scaling, diameter=diameter, rho=rho,
                                          check=check, cost_scale=cost_scale)
    spec = _spec(schedule, eps, rho, debias, cost_scale, backend, precision)
    sol = solve(inp, spec, verbose)
    if converge == "always":
        sol = converged(inp, sol, spec, SecondOrder(owner=owner, rtol=rtol, converge=converge))
    dt = inp.pot_dtype
    value = loss_value(inp.a.to(dt), inp.b.to(dt), sol, spec).to(compute_dtype(x.dtype))
    # An op's outputs may not share storage (the loops' potentials are views of one
    # buffer, refine's f_pre is f): copies, (B, n) each.
    return [value] + [x.new_empty((0,), dtype=dt) if getattr(sol, name) is None else getattr(sol, name).clone()
                      for name in POTENTIALS]


@_loss_forward.register_fake
def _(x, y, a, b, owner, blur, scaling, diameter, rho, debias, cost_scale, backend, precision, check, converge,
      rtol, verbose):
    dt = compute_dtype(x.dtype)
    B, n, m = x.shape[0], x.shape[1], y.shape[1]
    pots = [x.new_empty((B, n), dtype=dt), x.new_empty((B, m), dtype=dt)] * 2
    debiased = pots if debias else [x.new_empty((0,), dtype=dt)] * 4
    return [x.new_empty((B,), dtype=dt)] + [t.new_empty(t.shape) for t in pots + debiased]


@custom_op("otlinop::sinkhorn_loss_grad", mutates_args=())
def _loss_grad(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, potentials: list[torch.Tensor],
               eps: float, rho: Optional[float], debias: bool, cost_scale: float, backend: Optional[str],
               precision: Optional[str], needs: list[bool]) -> list[torch.Tensor]:
    """[grad_x, grad_y, grad_a, grad_b] (batched, in the potentials' dtype; empty where
    ``needs`` is False) of the per-entry loss at ``potentials``."""
    with scoped_cache():
        return _grad(x, y, a, b, potentials, eps, rho, debias, cost_scale, backend, precision, needs)


def _grad(x, y, a, b, potentials, eps, rho, debias, cost_scale, backend, precision, needs):
    sol = Solution(*potentials[:4], *(potentials[4:] if debias else [None] * 4))
    dt = sol.f.dtype
    spec = _spec((eps,), eps, rho, debias, cost_scale, backend, precision)
    grads = sinkhorn_grad(x.to(dt), y.to(dt), a.to(dt), b.to(dt), sol, spec, tuple(needs))
    return [x.new_empty((0,), dtype=dt) if g is None else g for g in grads]


@_loss_grad.register_fake
def _(x, y, a, b, potentials, eps, rho, debias, cost_scale, backend, precision, needs):
    dt = potentials[0].dtype
    like = (x, y, a, b)
    return [t.new_empty(t.shape, dtype=dt) if need else t.new_empty((0,), dtype=dt) for t, need in zip(like, needs)]


def _no_second_order(ctx, grad_outputs):
    raise NotImplementedError(
        "SamplesLoss: second derivatives of the Sinkhorn loss (double backward, Hessian-vector products) are "
        "not implemented under torch.compile (AOTAutograd does not differentiate a compiled backward again, and "
        "the inner solves' options are Python objects); compute them outside the compiled function (eager "
        "calls support them)")


_loss_grad.register_autograd(_no_second_order, setup_context=lambda ctx, inputs, output: None)


def _setup(ctx, inputs, output):
    x, y, a, b, owner, blur, scaling, diameter, rho, debias, cost_scale, backend, precision, *_ = inputs
    ctx.save_for_backward(x, y, a, b, *output[1:])
    ctx.options = dict(eps=blur * blur, rho=rho, debias=debias, cost_scale=cost_scale, backend=backend,
                       precision=precision)


def _backward(ctx, grad_outputs):
    grad_value = grad_outputs[0]    # the potentials' outputs have no derivative here (GeomLoss' semantics)
    x, y, a, b, *potentials = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    if not any(needs):
        return (None,) * 17
    grads = _loss_grad(x, y, a, b, potentials, needs=needs, **ctx.options)
    out = []
    for t, gt, need in zip((x, y, a, b), grads, needs):
        if not need:
            out.append(None)
            continue
        w = grad_value.to(gt.dtype)
        out.append((w.view(-1, *([1] * (gt.ndim - 1))) * gt).to(t.dtype))
    return (*out,) + (None,) * 13


_loss_forward.register_autograd(_backward, setup_context=_setup)


def loss_op(owner: str, x, y, a, b, *, blur: float, scaling: float, diameter, rho, debias: bool,
            cost_scale: float, backend, precision, check: bool, converge: str, rtol, verbose: bool) -> tuple:
    """``(value (B,), Solution-like dict)`` of batched data through ``otlinop::sinkhorn_loss``."""
    out = _loss_forward(x, y, a, b, owner, blur, scaling, diameter, rho, debias, cost_scale, backend, precision,
                        check, converge, rtol, verbose)
    return out[0], dict(zip(POTENTIALS, out[1:]))
