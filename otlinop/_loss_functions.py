"""The autograd Functions of the Sinkhorn loss: value, gradients, Hessian-vector products.

:class:`SinkhornLoss` is the per-entry loss of ``otlinop.loss``. Its Function
(``_Loss``) returns the value and, as non-differentiable outputs, the
potentials it came from; its backward applies ``_SinkhornGrad`` (the gradient
map, by the formulas of ``otlinop._loss_derivatives``), whose backward (the
loss's double backward) and forward-mode rule both apply ``_SinkhornHvp``,
linear in the directions. Every tensor a derivative needs is an input or an
output of these Functions, never a Python attribute, so that torch.func sees
it: each Function has a ``setup_context``, a ``jvp`` rule and a ``vmap`` rule
(the mapped dimension joins the loss's batch, or, for HVP directions alone,
becomes more right-hand sides of one Schur solve).

- The JVP of the value is one gradient dot product, ``<grad_x, dx> +
  <grad_y, dy> + <grad_a, da> + <grad_b, db>`` per entry (the gradients at
  the forward's potentials: those of a plain backward).
- The JVP of the gradient (forward over reverse, ``jvp(grad(loss))``) is one
  analytic HVP (``otlinop.hvp``: a Schur solve), never a differentiation of
  the iterations.

Derivatives that are not implemented (second ones involving the weights,
third ones, forward over forward) are carried by ``_NotImplementedDerivative``
nodes or raise in the rules: they raise NotImplementedError when a derivative
needs them, and only then.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.autograd.forward_ad as fwAD

from solvers import config
from solvers._function import Function

from ._call_graphs import LOSS_GRAPHS
from ._checks import Inputs, box_diameter, measures_and_read, measures_ok
from ._loss_derivatives import Solution, converged, loss_value, sinkhorn_grad, sinkhorn_hvp, solve, weight_grad
from ._sinkhorn_schedule import schedule_tensor
from .kernels._reference import compute_dtype

__all__ = ["SinkhornLoss", "over_vmap"]

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

_FORWARD_OVER_FORWARD_MESSAGE = (
    "{owner}: forward mode over forward mode (torch.func.jvp of a jvp, jacfwd of jacfwd) is not supported: "
    "torch would drop the second-order terms. For second derivatives use forward over reverse "
    "(torch.func.jvp(torch.func.grad(loss), ...), torch.func.hessian, jacfwd(jacrev(...))) or reverse over "
    "reverse (jacrev(jacrev(...)), torch.autograd.grad with create_graph=True).")

#: The potentials of a :class:`Solution`, in the order the Functions pass them (the
#: last four only with debiasing).
_POTENTIALS = ("f", "g", "f_pre", "g_pre", "f_aa", "g_bb", "f_aa_pre", "g_bb_pre")


def _potentials(sol: Solution, debias: bool) -> tuple:
    # Function outputs may not alias one another (the loops' potentials are views of
    # one buffer; refine's f_pre is f): copies, (B, n) or (B, m) each.
    return tuple(getattr(sol, name).clone() for name in _POTENTIALS[:8 if debias else 4])


def _solution(pots) -> Solution:
    return Solution(*pots)


# --------------------------------------------------------------------------
# torch.func helpers (torch exposes these tests only through private names)
# --------------------------------------------------------------------------
def _nested_forward_mode() -> bool:
    """Whether an outer torch.func.jvp (or jacfwd) encloses the jvp rule that asks: torch
    then drops the rule's own dependence on the primals (a silently wrong answer)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return sum(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()) > 1


def forward_mode_active() -> bool:
    """Whether a tensor may carry a forward-mode tangent here: a forward-AD dual level is open,
    or a torch.func transform is running (its levels may be jvp ones)."""
    return getattr(fwAD, "_current_level", -1) >= 0 or torch._C._functorch.maybe_current_level() is not None


def may_carry_tangent(t) -> bool:
    """Outside any autograd Function: False only when ``t`` certainly carries no forward-mode
    tangent. Readable there: a plain tensor's forward-AD tangent, and that of a tensor
    wrapped by one torch.func.jvp level; under nested levels (jvp of grad) the outer
    levels' tangents are hidden, so any wrapped tensor there may carry one."""
    if t is None:
        return False
    F = torch._C._functorch
    if F.is_functorch_wrapped_tensor(t):
        inner = F.get_unwrapped(t)
        if F.is_batchedtensor(t) or F.is_functorch_wrapped_tensor(inner):
            return True
    return getattr(fwAD, "_current_level", -1) >= 0 and fwAD.unpack_dual(t).tangent is not None


def _has_tangent(t) -> bool:
    """Whether forward mode may carry a tangent on ``t``: a torch.autograd.forward_ad dual
    tensor, or one that a torch.func.jvp level wraps (also under grad or vmap levels, where
    the tangent itself cannot be read: a jvp primal counts, even with a zero tangent)."""
    if t is None:
        return False
    if getattr(fwAD, "_current_level", -1) >= 0 and not torch._C._functorch.is_functorch_wrapped_tensor(t) \
            and fwAD.unpack_dual(t).tangent is not None:
        return True
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    jvp_levels = {i.level() for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp}
    while jvp_levels and torch._C._functorch.is_functorch_wrapped_tensor(t):
        if not torch._C._functorch.is_batchedtensor(t) and torch._C._functorch.maybe_get_level(t) in jvp_levels:
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def _merged(B: int, tensors, in_dims) -> list:
    """Batched loss tensors (B0, ...) with vmap's mapped dimension (expanded where
    unmapped) merged into the loss batch: (B * B0, ...)."""
    out = []
    for t, dim in zip(tensors, in_dims):
        if t is None:
            out.append(None)
            continue
        t = t.movedim(dim, 0) if dim is not None else t.expand(B, *t.shape)
        out.append(t.flatten(0, 1).contiguous())
    return out


def _split(B: int, t):
    """(B * B0, ...) -> (B, B0, ...): the inverse of :func:`_merged` on an output."""
    return t.unflatten(0, (B, -1))


# --------------------------------------------------------------------------
# Guards for the derivatives that are not implemented
# --------------------------------------------------------------------------
class _NotImplementedDerivative(Function):
    """Zeros that depend on some tensors, with a backward and a jvp that raise.

    Added to a result whose derivative w.r.t. those tensors is not
    implemented: autograd runs this node (and raises) only when a requested
    derivative needs it, so the implemented ones keep working.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(message, like, *deps):
        return torch.zeros_like(like)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message, ctx.n_inputs = inputs[0], len(inputs)

    @staticmethod
    def backward(ctx, grad):
        if not torch._C._functorch.is_functorch_wrapped_tensor(grad) and not bool(grad.any()):
            return (None,) * ctx.n_inputs        # a zero direction carries nothing: no derivative needed
        raise NotImplementedError(ctx.message)

    @staticmethod
    def jvp(ctx, _message, dlike, *ddeps):
        if all(t is None for t in ddeps):
            return None                          # only the result carries a tangent: no derivative needed
        raise NotImplementedError(ctx.message)


def _guard(t, message: str, *deps):
    """``t``, made to depend on ``deps`` through a ``_NotImplementedDerivative`` when a
    derivative w.r.t. them may follow (a recorded graph, or a forward tangent):
    differentiating ``t`` w.r.t. ``deps`` then raises ``message``."""
    if t is None:
        return t
    deps = [u for u in deps if (torch.is_grad_enabled() and u.requires_grad) or _has_tangent(u)]
    if not deps:
        return t
    return t + _NotImplementedDerivative.apply(message, t.detach(), *deps)


# --------------------------------------------------------------------------
# The Hessian-vector product
# --------------------------------------------------------------------------
def _hessian_product(A, B, x, y, a, b, pots, spec, second, needs, weights) -> tuple:
    """``H [A; B]`` (``sinkhorn_hvp``): differentiable w.r.t. the directions, raising if
    differentiated w.r.t. the data (third order). ``weights``: the caller's weights."""
    Hx, Hy = _SinkhornHvp.apply(spec, second, needs, weights, A, B, x, y, a, b, *pots)
    message = _THIRD_ORDER_MESSAGE.format(owner=second.owner)
    return _guard(Hx, message, x, y, *weights), _guard(Hy, message, x, y, *weights)


class _SinkhornHvp(Function):
    """``(A, B) -> H [A; B]`` with the data ``(x, y, a, b)`` and the potentials held fixed.

    A (B0, n, d), B (B0, m, d), or with a trailing k for k directions per
    entry (one Schur solve with k right-hand sides); None for a zero part.
    Linear in the directions, with a symmetric H: its backward is the same
    product applied to the incoming gradients, its jvp the product of the
    tangents of the directions. The outputs are zeros where ``needs`` is False.
    """

    @staticmethod
    def forward(spec, second, needs, weights, A, B, x, y, a, b, *pots):
        cols = (A if A is not None else B).shape[x.ndim:] if (A is not None or B is not None) else ()
        if A is None and B is None:
            Hx = Hy = None
        else:
            Hx, Hy = sinkhorn_hvp(x, y, a, b, A, B, _solution(pots), spec, second, needs)
        return (x.new_zeros(x.shape + cols) if Hx is None else Hx,
                y.new_zeros(y.shape + cols) if Hy is None else Hy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, second, needs, weights, A, B, x, y, a, b, *pots = inputs
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.second, ctx.needs, ctx.weights, ctx.n_pots = spec, second, needs, weights, len(pots)
        ctx.save_for_backward(x, y, a, b, *pots)
        ctx.save_for_forward(x, y, a, b, *pots)

    @staticmethod
    def backward(ctx, gx, gy):
        x, y, a, b, *pots = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[4:6])
        rest = (None,) * (4 + ctx.n_pots)
        if not any(needs) or (gx is None and gy is None):
            return (None,) * 6 + rest
        dA, dB = _hessian_product(gx, gy, x, y, a, b, pots, ctx.spec, ctx.second, needs, ctx.weights)
        return (None,) * 4 + (dA if needs[0] else None, dB if needs[1] else None) + rest

    @staticmethod
    def jvp(ctx, _spec, _second, _needs, _weights, dA, dB, *data_tangents):
        if _nested_forward_mode():
            raise NotImplementedError(_FORWARD_OVER_FORWARD_MESSAGE.format(owner=ctx.second.owner))
        if any(t is not None for t in data_tangents):
            raise NotImplementedError(_THIRD_ORDER_MESSAGE.format(owner=ctx.second.owner))
        x, y, a, b, *pots = ctx.saved_tensors
        return _SinkhornHvp.apply(ctx.spec, ctx.second, ctx.needs, ctx.weights, dA, dB, x, y, a, b, *pots)

    @staticmethod
    def vmap(info, in_dims, spec, second, needs, weights, A, B, x, y, a, b, *pots):
        """Mapped directions over unmapped data (jacrev of a gradient, jacfwd's tangents, a
        batch of HVPs): the mapped dimension becomes k more right-hand sides of one Schur
        solve per loss entry. Mapped data: the mapped dimension joins the loss batch."""
        Bv = info.batch_size
        if all(dim is None for dim in in_dims[6:]):
            def last(D, dim, base):
                # (B0, n, d[, k]) with the mapped dimension moved last, merged with k.
                if D is None:
                    return None
                D = D.movedim(dim, -1) if dim is not None else D.unsqueeze(-1).expand(*D.shape, Bv)
                return D.flatten(-2) if D.ndim > base.ndim + 1 else D

            Am, Bm = last(A, in_dims[4], x), last(B, in_dims[5], y)
            Hx, Hy = _SinkhornHvp.apply(spec, second, needs, weights, Am, Bm, x, y, a, b, *pots)
            return (Hx.unflatten(-1, (-1, Bv)).movedim(-1, 0) if Hx.ndim > x.ndim + 1 else Hx.movedim(-1, 0),
                    Hy.unflatten(-1, (-1, Bv)).movedim(-1, 0) if Hy.ndim > y.ndim + 1 else Hy.movedim(-1, 0)), (0, 0)
        merged = _merged(Bv, (A, B, x, y, a, b, *pots), in_dims[4:])
        Hx, Hy = _SinkhornHvp.apply(spec, second, needs, weights, *merged)
        return (_split(Bv, Hx), _split(Bv, Hy)), (0, 0)


# --------------------------------------------------------------------------
# The work of a call, as pure tensor functions (cached as CUDA graphs)
# --------------------------------------------------------------------------
def _scheduled(spec, x, y, a, b, *, verbose: bool = False) -> tuple:
    """(value (B,), *potentials) on ``spec``'s schedule: the eager solve and loss value;
    with ``spec.check``, then the inputs' value checks as one 0-d bool (``measures_ok``)."""
    inp = Inputs(x, y, a, b, True)
    sol = solve(inp, spec, verbose)
    dt = inp.pot_dtype
    value = loss_value(inp.a.to(dt), inp.b.to(dt), sol, spec)
    out = (value.to(compute_dtype(x.dtype)), *_potentials(sol, spec.debias))
    if spec.check:
        out += (measures_ok(x, y, a, b, balanced=spec.rho_x is None and spec.rho_y is None,
                            cost_scale=spec.cost_scale),)
    return out


def _scheduled_in_memory(spec, x, y, a, b, E) -> tuple:
    """:func:`_scheduled` with the schedule but its last eps read from the 1-D tensor ``E``
    (float64, on the points' device): ``spec.eps_list`` is ignored, and the kernels of
    the solve read eps from memory, so that one cached graph (keyed on ``E``'s length)
    serves every schedule of that length: the default diameter moves with the points."""
    steps = tuple(E[k] for k in range(E.shape[0])) + (spec.eps,)
    return _scheduled(dataclasses.replace(spec, eps_list=steps), x, y, a, b)


def _raise_unless(ok, owner: str, spec, x, y, a, b) -> None:
    """The one host read of a call whose solve checked its inputs: the ValueError of the
    first failing check (``measures_and_read`` names it), if any."""
    if not bool(ok):
        measures_and_read(owner, x, y, a, b, balanced=spec.rho_x is None and spec.rho_y is None, check=True,
                          cost_scale=spec.cost_scale)
        raise ValueError(f"{owner}: the inputs failed a value check")   # not reached: the read above raises


def _point_gradients(options, x, y, a, b, *pots) -> tuple:
    """(grad_x, grad_y) at the potentials (zeros where not needed); ``options = (spec, needs)``."""
    spec, needs = options
    gx, gy, _, _ = sinkhorn_grad(x, y, a, b, _solution(pots), spec, tuple(needs) + (False, False))
    return torch.zeros_like(x) if gx is None else gx, torch.zeros_like(y) if gy is None else gy


# --------------------------------------------------------------------------
# The gradient map
# --------------------------------------------------------------------------
class _SinkhornGrad(Function):
    """The point gradients (x, y) -> (grad_x, grad_y) at given potentials (zeros where
    ``needs`` is False).

    The weights come in detached: derivatives w.r.t. them are guarded by the
    caller (:func:`_gradients`), so that differentiating the point gradients
    w.r.t. the points works whether the weights require grad or not.
    ``backward`` (the double backward of the loss) and ``jvp`` (forward over
    reverse) are Hessian-vector products ``H [A; B]`` in x and y.
    ``weights`` are the caller's weights (for the third-order _guard).
    """

    @staticmethod
    def forward(spec, second, needs, weights, x, y, a, b, *pots):
        # Repeated calls replay one CUDA graph of the gradient passes. They depend on the final
        # eps only, not on the schedule: keyed without it, they replay for moving points too.
        options = (dataclasses.replace(spec, eps_list=(), check=False), tuple(needs))
        gx, gy = LOSS_GRAPHS(_point_gradients, options, (x, y, a, b, *pots))
        return gx, gy

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, second, needs, weights, x, y, a, b, *pots = inputs
        ctx.set_materialize_grads(False)   # an unused gradient arrives as None: no HVP for it
        ctx.spec, ctx.second, ctx.needs, ctx.weights, ctx.n_pots = spec, second, needs, weights, len(pots)
        ctx.save_for_backward(x, y, a, b, *pots)
        ctx.save_for_forward(x, y, a, b, *pots)

    @staticmethod
    def backward(ctx, A, B):
        x, y, a, b, *pots = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[4:6])
        rest = (None,) * (2 + ctx.n_pots)
        # A direction on a gradient that was not computed (returned as zeros) carries nothing.
        A = A if ctx.needs[0] else None
        B = B if ctx.needs[1] else None
        if not any(needs) or (A is None and B is None):
            return (None,) * 6 + rest
        Hx, Hy = _hessian_product(A, B, x, y, a, b, pots, ctx.spec, ctx.second, needs, ctx.weights)
        return (None,) * 4 + (Hx if needs[0] else None, Hy if needs[1] else None) + rest

    @staticmethod
    def jvp(ctx, _spec, _second, _needs, _weights, dx, dy, da, db, *dpots):
        owner = ctx.second.owner
        if _nested_forward_mode():
            raise NotImplementedError(_FORWARD_OVER_FORWARD_MESSAGE.format(owner=owner))
        if da is not None or db is not None:
            # The weights come in detached (their tangents are caught by _gradients' guards).
            why = "a forward-mode tangent on the weights reaches the point gradients"
            raise NotImplementedError(_WEIGHT_SECOND_ORDER_MESSAGE.format(owner=owner, why=why))
        x, y, a, b, *pots = ctx.saved_tensors
        # The potentials are non-differentiable outputs of the loss: their tangents are zero.
        return _SinkhornHvp.apply(ctx.spec, ctx.second, ctx.needs, ctx.weights, dx, dy, x, y, a, b, *pots)

    @staticmethod
    def vmap(info, in_dims, spec, second, needs, weights, x, y, a, b, *pots):
        merged = _merged(info.batch_size, (x, y, a, b, *pots), in_dims[4:])
        gx, gy = _SinkhornGrad.apply(spec, second, needs, weights, *merged)
        return (_split(info.batch_size, gx), _split(info.batch_size, gy)), (0, 0)


def _gradients(x, y, a, b, pots, spec, second, needs) -> tuple:
    """Gradients of the per-entry loss w.r.t. (x, y, a, b) at the potentials ``pots``
    (None where ``needs`` is False), in the potentials' dtype: the point gradients
    through ``_SinkhornGrad`` (its derivatives are HVPs), the weight gradients
    elementwise in the potentials, their derivatives guarded (not implemented).
    Whether a and b carry forward-mode tangents is ``second.weight_tangents`` when the
    call read it (inside a Function, ``_has_tangent`` must count every tensor of a
    torch.func.jvp level, the weights that the level lifted included)."""
    dt = pots[0].dtype
    sol = _solution(pots)
    gx = gy = ga = gb = None
    if needs[0] or needs[1]:
        gx, gy = _SinkhornGrad.apply(spec, second, tuple(needs[:2]), (a, b), x.to(dt), y.to(dt),
                                     a.detach().to(dt), b.detach().to(dt), *pots)
        gx, gy = (gx if needs[0] else None), (gy if needs[1] else None)
    if needs[2]:
        ga = weight_grad(sol.f, sol.f_aa, spec.eps, spec.rho_x, spec.relaxed)
    if needs[3]:
        gb = weight_grad(sol.g, sol.g_bb, spec.eps, spec.rho_y, spec.relaxed)
    def depends(name: str) -> str:
        why = f"the function differentiated twice depends on the gradient w.r.t. the weights {name}"
        return _WEIGHT_SECOND_ORDER_MESSAGE.format(owner=second.owner, why=why)

    # The weight gradients are elementwise in the (constant) potentials: any derivative of
    # them (d^2 S / da dx, d^2 S / da^2) is not implemented, so a path from the data raises.
    ga, gb = _guard(ga, depends("a"), x, y, a, b), _guard(gb, depends("b"), x, y, a, b)
    tangents = second.weight_tangents or (_has_tangent(a), _has_tangent(b))
    names = " and ".join(n for n, t, tangent in (("a", a, tangents[0]), ("b", b, tangents[1]))
                         if (torch.is_grad_enabled() and t.requires_grad) or tangent)
    if names:
        # The gradients' derivatives w.r.t. the weights (d^2 S / da dx, d^2 S / da^2) are not implemented.
        why = f"a derivative of the gradients w.r.t. the weights {names} was requested"
        message = _WEIGHT_SECOND_ORDER_MESSAGE.format(owner=second.owner, why=why)
        gx, gy = (_guard(gt, message, a, b) for gt in (gx, gy))
    return gx, gy, ga, gb


# --------------------------------------------------------------------------
# The converging solve and the loss
# --------------------------------------------------------------------------
class _Converged(Function):
    """The potentials iterated to convergence at the final eps (``converged``), as a
    Function with a vmap rule (the iterations read errors back, which vmap refuses);
    non-differentiable outputs."""

    @staticmethod
    def forward(spec, second, x, y, a, b, *pots):
        sol = converged(Inputs(x, y, a, b, True), _solution(pots), spec, second)
        return _potentials(sol, spec.debias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)
        ctx.n_inputs = len(inputs)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * ctx.n_inputs

    @staticmethod
    def jvp(ctx, *tangents):
        return (None,) * (ctx.n_inputs - 6)

    @staticmethod
    def vmap(info, in_dims, spec, second, x, y, a, b, *pots):
        merged = _merged(info.batch_size, (x, y, a, b, *pots), in_dims[2:])
        out = _Converged.apply(spec, second, *merged)
        return tuple(_split(info.batch_size, t) for t in out), (0,) * len(out)


class _Loss(Function):
    """Per-entry Sinkhorn loss (B,) of batched (x, y, a, b), then its potentials
    (non-differentiable outputs: 4, or 8 with debiasing; :data:`_POTENTIALS`).

    ``second.converge`` picks the potentials (docs/second-order.md): "always"
    iterates them to convergence here, in the forward; "create_graph" in a
    backward that records a graph (``torch.is_grad_enabled()`` there: the
    gradient is then differentiated again; torch.func's grad, jacrev and
    hessian always record one), once per forward; "never" keeps the eps
    schedule's.
    """

    @staticmethod
    def forward(x, y, a, b, spec, second, verbose):
        if verbose:     # a progress bar per step: eager
            value, *pots = _scheduled(spec, x, y, a, b, verbose=True)
        elif LOSS_GRAPHS.eligible((x, y, a, b)):
            # Repeated calls with the same shapes, options and schedule length replay one
            # CUDA graph: the schedule is data (its kernels read eps from memory), so that
            # the default diameter, which moves with the points, changes no key.
            E = schedule_tensor(spec.eps_list, x.device)
            key = dataclasses.replace(spec, eps_list=())
            value, *pots = LOSS_GRAPHS(_scheduled_in_memory, key, (x, y, a, b, E))
        else:
            value, *pots = _scheduled(spec, x, y, a, b)
        if spec.check:
            *pots, ok = pots
            _raise_unless(ok, second.owner, spec, x, y, a, b)
        if second.converge == "always":
            inp = Inputs(x, y, a, b, True)
            sol = converged(inp, _solution(pots), spec, second)
            dt = inp.pot_dtype
            value = loss_value(inp.a.to(dt), inp.b.to(dt), sol, spec).to(compute_dtype(x.dtype))
            pots = _potentials(sol, spec.debias)
        return (value, *pots)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, a, b, spec, second, _ = inputs
        ctx.spec, ctx.second = spec, second
        ctx.converged = None      # "create_graph": the converged potentials, once computed
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, y, a, b, *output[1:])
        ctx.save_for_forward(x, y, a, b, *output[1:])

    @staticmethod
    def backward(ctx, grad_value, *_):
        x, y, a, b, *pots = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if not any(needs) or grad_value is None:
            return (None,) * 7
        spec, second = ctx.spec, ctx.second
        if second.converge == "create_graph" and torch.is_grad_enabled():
            # A graph is recorded: the gradient will be differentiated again, by the HVP
            # (an implicit-function derivative at a fixed point). Both must come from the
            # same, converged, potentials for the HVP to be the derivative of this gradient.
            if ctx.converged is None:
                ctx.converged = _Converged.apply(spec, second, *(t.detach() for t in (x, y, a, b)), *pots)
            pots = ctx.converged
        grads = _gradients(x, y, a, b, pots, spec, second, needs)
        out = []
        for t, gt in zip((x, y, a, b), grads):
            scale = grad_value.to(pots[0].dtype)
            out.append(None if gt is None else (scale.view(-1, *([1] * (gt.ndim - 1))) * gt).to(t.dtype))
        return (*out, None, None, None)

    @staticmethod
    def jvp(ctx, dx, dy, da, db, *_):
        """``<grad_x, dx> + <grad_y, dy> + <grad_a, da> + <grad_b, db>`` per entry, with the
        gradients of a plain backward (the forward's potentials)."""
        if _nested_forward_mode():
            raise NotImplementedError(_FORWARD_OVER_FORWARD_MESSAGE.format(owner=ctx.second.owner))
        x, y, a, b, *pots = ctx.saved_tensors
        known = ctx.second.weight_tangents
        if known is not None:
            # torch.func passes zero tangents for the weights it lifted (default weights): the
            # call read that they carry none, so their (guarded) gradients are not needed.
            da, db = (da if known[0] else None), (db if known[1] else None)
        tangents = (dx, dy, da, db)
        needs = tuple(t is not None for t in tangents)
        with torch.no_grad():
            grads = _gradients(x, y, a.detach(), b.detach(), pots, ctx.spec, ctx.second, needs)
        dvalue = torch.zeros(x.shape[0], dtype=pots[0].dtype, device=x.device)
        for gt, t in zip(grads, tangents):
            if gt is not None:
                dvalue = dvalue + (gt * t.to(gt.dtype)).flatten(1).sum(-1)
        return (dvalue.to(compute_dtype(x.dtype)),) + (None,) * len(pots)

    @staticmethod
    def vmap(info, in_dims, x, y, a, b, spec, second, verbose):
        """A mapped dimension joins the loss batch: one batched evaluation (one eps schedule,
        the one the caller computed for the call)."""
        merged = _merged(info.batch_size, (x, y, a, b), in_dims[:4])
        out = _Loss.apply(*merged, spec, second, verbose)
        return tuple(_split(info.batch_size, t) for t in out), (0,) * len(out)


class SinkhornLoss:
    """The per-entry Sinkhorn loss (B,) of batched ``(x, y, a, b)``: ``apply`` as an
    autograd Function's (the value of ``_Loss``, without its potentials)."""

    @staticmethod
    def apply(x, y, a, b, spec, second, verbose):
        return _Loss.apply(x, y, a, b, spec, second, verbose)[0]


# --------------------------------------------------------------------------
# torch.func.vmap over the loss's inputs
# --------------------------------------------------------------------------
def _mapped(t) -> bool:
    """Whether torch.func.vmap maps the tensor ``t`` at some level."""
    while isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def _peeled(t) -> tuple:
    """``(plain tensor, levels)``: ``t``'s values with the batch dimension of every vmap
    level that maps it in front (lowest level first), and those levels."""
    levels = []
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            levels.insert(0, torch._C._functorch.maybe_get_level(t))
            t = torch._C._functorch.get_unwrapped(t).movedim(torch._C._functorch.maybe_get_bdim(t), 0)
        else:
            t = torch._C._functorch.get_unwrapped(t)
    return t, levels


def _all_entries(tensors, own_batch: bool) -> list:
    """The plain values of the mapped tensors (None passes), every vmap level's dimension
    in front, expanded to common sizes and merged with the loss's own batch: what the
    batched path would see for the whole batch at once."""
    peeled = [None if t is None else _peeled(t) for t in tensors]
    levels = sorted({lvl for p in peeled if p is not None for lvl in p[1]})
    sizes = {}
    for p in peeled:
        if p is not None:
            sizes.update(zip(p[1], p[0].shape))
    out = []
    for p in peeled:
        if p is None:
            out.append(None)
            continue
        t, own = p
        for i, lvl in enumerate(levels):
            if lvl not in own:
                t = t.unsqueeze(i)
        t = t.expand(*(sizes[lvl] for lvl in levels), *t.shape[len(levels):])
        t = t.reshape(-1, *t.shape[len(levels):])
        # The loss's own batch (B0, ...), if any, joins the vmap levels'.
        out.append(t.flatten(0, 1) if own_batch else t)
    return out


def over_vmap(fn):
    """The loss function ``fn(owner, a, x, b, y, **options)`` (``otlinop.loss``) made to
    run under torch.func.vmap (per-sample gradients ``vmap(grad(loss))`` included).

    Mapped inputs cannot be read back, but the call reads values (their checks and
    the default diameter): both are computed here from all the mapped entries at
    once, the batch the mapped dimensions form (the diameter is that of all the
    points, as for a (B, n, d) batch), then ``fn`` runs with them; the loss's
    Functions map the batch onto the batched path (``_Loss.vmap``), one call.
    """
    @functools.wraps(fn)
    def call(owner, a, x, b, y, **options):
        # dynamo cannot trace torch.func's private tests (and compiles no vmapped call).
        if torch.compiler.is_compiling() or not any(_mapped(t) for t in (x, y, a, b)):
            return fn(owner, a, x, b, y, **options)
        if options.get("potentials"):
            raise NotImplementedError(f"{owner}: potentials=True under torch.func.vmap is not supported; "
                                      "call it on the batch (B, N, D) instead")

        def squeezed(w, pts):
            # GeomLoss' (N, 1) and (B, N, 1) weights.
            return w.squeeze(-1) if isinstance(w, torch.Tensor) and w.ndim == pts.ndim and w.shape[-1] == 1 else w

        a, b = squeezed(a, x), squeezed(b, y)
        xs, ys, as_, bs = _all_entries((x, y, a, b), own_batch=x.ndim == 3)
        diameter = options.get("diameter")
        read = None if diameter is not None else box_diameter
        cost_scale = 1.0 if options.get("cost_scale") is None else options["cost_scale"]
        _, diam = measures_and_read(owner, xs, ys, as_, bs, balanced=options.get("reach") is None,
                                    check=config.check_finite, read=read, cost_scale=cost_scale)
        if diameter is None:
            options["diameter"] = options["blur"] if diam <= 0 else diam
        with config.override(check_finite=False):
            return fn(owner, a, x, b, y, **options)

    return call
