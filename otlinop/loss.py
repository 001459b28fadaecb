"""The Sinkhorn loss between point clouds: a drop-in for ``geomloss.SamplesLoss``.

``SamplesLoss("sinkhorn", p=2, blur=..., reach=..., debias=...)`` computes
GeomLoss' (debiased) Sinkhorn divergence with the cost ``|x - y|^2 / 2``
(``cost_scale`` changes the factor), with the same algorithm (eps-scaling,
averaged updates, final extrapolation; ``otlinop.sinkhorn``) and gradients
w.r.t. the points and the weights from custom autograd Functions: the
iterations are never backpropagated through. A batch of problems runs in one
kernel launch per Sinkhorn step.

Gradients (docs/math.md section 4), with ``c2 = 2 cost_scale`` and the plans of the
final extrapolation step, ``P = P(f, g_pre)`` for x and ``P(f_pre, g)`` for y:

    grad_x OT = c2 (ah * x - P y),   ah = P 1,
    grad_x S  = grad_x OT - c2 (ah_aa * x - P_aa x)      (debias, P_aa = P(f_aa, f_aa_pre) on (x, x)),
    grad_a OT = f (balanced), (rho + eps)(1 - e^{-f/rho}) - eps/2 (relaxed side).

They are computed by ``sinkhorn_grad`` (``otlinop._loss_derivatives``) from
streaming plan products.

Second order (double backward, e.g. ``torch.autograd.grad(g @ v, x)`` with
``g = torch.autograd.grad(loss, x, create_graph=True)``): the grad-of-grad
directions ``(A, B)`` of ``(x, y)`` give, per batch entry, the Hessian-vector
products by implicit differentiation (``otlinop.hvp``, docs/math.md section 6) at
the final potentials ``(f, g)``,

    H_x = hvp(x, y, f, g, A, B).Hx - hvp_self(x, f_aa, A)     (the last term with debias only),
    H_y = hvp(x, y, f, g, A, B).Hy - hvp_self(y, g_bb, B),

one Schur-complement solve each (``hvp_solver``, ``hvp_preconditioner``,
``hvp_rtol``, ``hvp_maxiter``). They are exact at converged potentials, which
GeomLoss' schedule does not reach: by default (``converge="create_graph"``)
a backward that records a graph first iterates the potentials to convergence
at the final eps and returns the gradient there, so that the double backward
is its derivative (docs/second-order.md; ``refine`` in
``otlinop._loss_derivatives``).
Derivatives that are not implemented (second ones involving the weights,
third ones) raise NotImplementedError when autograd needs them, and only
then: ``_NotImplementedDerivative`` nodes carry those dependencies.

This module holds the public classes and their options; the solution, its
value and derivatives are in ``otlinop._loss_derivatives``, the autograd
Functions in ``otlinop._loss_functions``, and the custom ops that stand for
the loss under ``torch.compile`` in ``otlinop._loss_ops``.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

import solvers
from solvers import config

from ._call_graphs import LOSS_GRAPHS
from ._checks import (Inputs, backend_name, capturing, choice, flag, fraction, measures_and_read,
                      positive_int, positive_scalar, precision_name, preconditioner, reach_or_none,
                      solver_function)
from ._loss_derivatives import CONVERGE, SecondOrder, Spec, converged, solve
from ._loss_functions import SinkhornLoss, forward_mode_active, may_carry_tangent, over_vmap
from ._loss_multiscale import MultiscaleLoss, multiscale_potentials, refuse_for_multiscale
from ._loss_ops import checked_schedule, loss_op
from .kernels._dispatch import check_backend
from .kernels._reference import compute_dtype
from .multiscale import Multiscale

__all__ = ["LOSS_GRAPHS", "SamplesLoss", "sinkhorn_loss"]


# --------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------
def _squeeze_weights(w, pts):
    """GeomLoss accepts (N, 1) and (B, N, 1) weights: drop the trailing 1."""
    if isinstance(w, torch.Tensor) and isinstance(pts, torch.Tensor) and w.ndim == pts.ndim and w.shape[-1] == 1:
        return w.squeeze(-1)
    return w


def _resolve_backend(owner: str, backend):
    if isinstance(backend, str) and backend in ("tensorized", "online"):
        # Both compute the exact loss in GeomLoss; here one streaming
        # implementation serves both (Triton on CUDA, torch otherwise).
        return None
    if isinstance(backend, str) and backend == "multiscale":
        # The block-sparse kernels pick Triton or torch as the dense ones do.
        return None
    # GeomLoss' three names are mapped above; the rest are the package's.
    return backend_name(owner, backend)


def _multiscale_options(owner: str, backend, cluster_scale, truncate) -> Multiscale | None:
    """``Multiscale(cluster_scale, truncate)`` for ``backend="multiscale"``, checked for ``owner``; else None."""
    if not (isinstance(backend, str) and backend == "multiscale"):
        return None
    if cluster_scale is not None:
        cluster_scale = positive_scalar(owner, "cluster_scale", cluster_scale)
    truncate = positive_scalar(owner, "truncate", truncate, "GeomLoss' default is 5")
    return Multiscale(cluster_scale=cluster_scale, truncate=truncate)


def _check_options(owner: str, loss, p, blur, reach, diameter, scaling, cost, kernel, cluster_scale,
                   cost_scale, debias, potentials, precision, multiscale: bool = False):
    if loss != "sinkhorn":
        raise NotImplementedError(
            f"{owner}: only loss='sinkhorn' is implemented, got loss={loss!r}; for 'hausdorff', "
            "'energy', 'gaussian' or 'laplacian' use geomloss.SamplesLoss")
    if isinstance(p, bool) or p != 2:
        raise NotImplementedError(
            f"{owner}: only p=2 (the cost |x-y|^2/2, or cost_scale*|x-y|^2) is implemented, got p={p!r}")
    if cost is not None:
        raise NotImplementedError(
            f"{owner}: custom cost functions are not supported (the kernels stream the squared Euclidean "
            "cost); for C = c|x-y|^2 pass cost_scale=c instead of cost=...")
    if kernel is not None:
        raise NotImplementedError(f"{owner}: kernel= is only used by GeomLoss' kernel losses, which are not "
                                  "implemented here")
    if cluster_scale is not None and not multiscale:
        warnings.warn(f"{owner}: cluster_scale is ignored without backend='multiscale' (the loss is exact)",
                      stacklevel=3)
    blur = positive_scalar(owner, "blur", blur)
    reach = reach_or_none(owner, "reach", reach)
    if diameter is not None:
        diameter = positive_scalar(owner, "diameter", diameter)
    scaling = fraction(owner, "scaling", scaling)
    # GeomLoss' p=2 cost is |x-y|^2/2: cost_scale None means 0.5 here (1.0 elsewhere in the package).
    cost_scale = 0.5 if cost_scale is None else positive_scalar(owner, "cost_scale", cost_scale)
    flag(owner, "debias", debias)
    flag(owner, "potentials", potentials)
    precision_name(owner, precision)
    return blur, reach, diameter, scaling, cost_scale


def _check_second_order(owner: str, solver, M, rtol, maxiter, converge) -> dict:
    """The options of the double backward's inner solves and potentials; returns ``SecondOrder`` keywords."""
    solver_function(owner, "hvp_solver", solver)
    preconditioner(owner, "hvp_preconditioner", M)
    if rtol is not None:
        rtol = positive_scalar(owner, "hvp_rtol", rtol)
    if maxiter is not None:
        maxiter = positive_int(owner, "hvp_maxiter", maxiter)
    choice(owner, "converge", converge, CONVERGE, "when the potentials are iterated to convergence at the final "
           "eps: in a backward with create_graph=True, always, or never")
    return dict(owner=owner, solver=solver, M=M, rtol=rtol, maxiter=maxiter, converge=converge)


@over_vmap
def _samples_loss(owner: str, a, x, b, y, *, blur, reach, diameter, scaling, cost_scale, debias,
                  potentials, backend, precision, verbose, second: SecondOrder, multiscale=None):
    shape_a = a.shape if isinstance(a, torch.Tensor) else None
    shape_b = b.shape if isinstance(b, torch.Tensor) else None
    a = _squeeze_weights(a, x)
    b = _squeeze_weights(b, y)
    rho = None if reach is None else reach * reach
    # Imported here: otlinop.distributed builds on this layer's private modules.
    from .distributed.loss import is_dtensor, sinkhorn_loss_dtensor
    if is_dtensor(x) or is_dtensor(y):
        # Sharded on the point dimension: the same loop and gradients over the mesh's process group.
        if multiscale is not None:
            raise NotImplementedError(f"{owner}: backend='multiscale' is not implemented for DTensor inputs")
        if potentials:
            raise NotImplementedError(f"{owner}: potentials=True is not implemented for DTensor inputs; call "
                                      "otlinop.sinkhorn on them for the potentials")
        return sinkhorn_loss_dtensor(x, y, a, b, blur=blur, reach=reach, diameter=diameter, scaling=scaling,
                                     debias=debias, cost_scale=cost_scale, backend=backend, precision=precision,
                                     _owner=owner)
    if multiscale is not None:
        return _multiscale_loss(owner, a, x, b, y, shape_a, shape_b, blur=blur, reach=reach, diameter=diameter,
                                scaling=scaling, cost_scale=cost_scale, debias=debias, potentials=potentials,
                                backend=backend, precision=precision, multiscale=multiscale, second=second)
    if torch.compiler.is_compiling():
        return _compiled_loss(owner, a, x, b, y, shape_a, shape_b, blur=blur, rho=rho, diameter=diameter,
                              scaling=scaling, cost_scale=cost_scale, debias=debias, potentials=potentials,
                              backend=backend, precision=precision, verbose=verbose, second=second)
    check = config.check_finite and not capturing()
    # With diameter given nothing is needed before the solve: the value checks run inside it
    # (in its cached CUDA graph) and are read back once after it (Spec.check).
    late = check and diameter is not None and not potentials
    inp, eps, schedule = checked_schedule(owner, x, y, a, b, blur=blur, scaling=scaling, diameter=diameter,
                                          rho=rho, check=check and not late, cost_scale=cost_scale)
    check_backend(owner, backend, x)
    spec = Spec(eps_list=tuple(schedule), eps=eps, rho_x=rho, rho_y=rho, debias=debias,
                cost_scale=cost_scale, backend=backend, precision=precision, check=late)
    if potentials:
        data = Inputs(inp.x.detach(), inp.y.detach(), inp.a.detach(), inp.b.detach(), True)
        sol = solve(data, spec, verbose)
        if second.converge == "always":
            sol = converged(data, sol, spec, second)
        F = sol.f if sol.f_aa is None else sol.f - sol.f_aa
        G = sol.g if sol.g_bb is None else sol.g - sol.g_bb
        F, G = inp.unbatch(F).to(compute_dtype(x.dtype)), inp.unbatch(G).to(compute_dtype(x.dtype))
        # Shaped like the weights, as GeomLoss (view_as).
        return F.reshape(shape_a or F.shape), G.reshape(shape_b or G.shape)
    if second.weight_tangents is None and forward_mode_active():
        # Read here, outside the Functions (inside them a torch.func.jvp level hides it, and the
        # guards of the weights' second derivatives would go on every gradient). Default
        # weights are made here: no tangent, under any level. (Without forward mode no tangent
        # exists: a plain call skips this.)
        second = dataclasses.replace(second, weight_tangents=(a is not None and may_carry_tangent(inp.a),
                                                              b is not None and may_carry_tangent(inp.b)))
    value = SinkhornLoss.apply(inp.x, inp.y, inp.a, inp.b, spec, second, verbose)
    return value if inp.batched else value[0]


def _multiscale_loss(owner: str, a, x, b, y, shape_a, shape_b, *, blur, reach, diameter, scaling, cost_scale,
                     debias, potentials, backend, precision, multiscale: Multiscale, second: SecondOrder):
    """:func:`_samples_loss` with ``backend="multiscale"`` (``otlinop._loss_multiscale``). Without a
    double backward, ``converge`` is "always" (converged potentials) or not (GeomLoss' schedule)."""
    refuse_for_multiscale(owner, x, reach=reach)
    inp, eps, schedule = checked_schedule(owner, x, y, a, b, blur=blur, scaling=scaling, diameter=diameter,
                                          rho=None, check=True, cost_scale=cost_scale)
    check_backend(owner, backend, x)
    converge = None
    if second.converge == "always":
        converge = (second.tolerance(inp.pot_dtype), second.refine_max_iter)
    setup = (multiscale, list(schedule), cost_scale, debias, backend, precision, converge)
    x, y, a, b = inp.x[0], inp.y[0], inp.a[0], inp.b[0]
    if potentials:
        F, G = multiscale_potentials(owner, x, y, a, b, setup)
        F, G = F.to(compute_dtype(x.dtype)), G.to(compute_dtype(x.dtype))
        return F.reshape(shape_a or F.shape), G.reshape(shape_b or G.shape)
    return MultiscaleLoss.apply(x, y, a, b, owner, setup)


def _compiled_loss(owner: str, a, x, b, y, shape_a, shape_b, *, blur, rho, diameter, scaling, cost_scale, debias,
                   potentials, backend, precision, verbose, second: SecondOrder):
    """:func:`_samples_loss` under ``torch.compile``: the solve and its gradients are the
    opaque ops of ``otlinop._loss_ops`` (dynamo sees no Python of the loss); the shapes
    are checked here, the values and the default diameter inside the forward op."""
    inp, _ = measures_and_read(owner, x, y, a, b, balanced=rho is None, check=False)
    check_backend(owner, backend, x)
    options = dict(blur=blur, scaling=scaling, diameter=diameter, rho=rho, debias=debias, cost_scale=cost_scale,
                   backend=backend, precision=precision, check=config.check_finite, converge=second.converge,
                   rtol=second.rtol, verbose=verbose)
    if not potentials:
        value, _ = loss_op(owner, inp.x, inp.y, inp.a, inp.b, **options)
        return value if inp.batched else value[0]
    data = [t.detach() for t in (inp.x, inp.y, inp.a, inp.b)]
    _, sol = loss_op(owner, *data, **options)
    F = sol["f"] - sol["f_aa"] if debias else sol["f"]
    G = sol["g"] - sol["g_bb"] if debias else sol["g"]
    F, G = inp.unbatch(F).to(compute_dtype(x.dtype)), inp.unbatch(G).to(compute_dtype(x.dtype))
    return F.reshape(shape_a or F.shape), G.reshape(shape_b or G.shape)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
class SamplesLoss(torch.nn.Module):
    r"""Sinkhorn divergence between sampled measures; a drop-in for ``geomloss.SamplesLoss``.

    Parameters
    ----------
    loss : str, default "sinkhorn"
        Only "sinkhorn" is implemented (NotImplementedError otherwise).
    p : int, default 2
        Only 2 is implemented: the cost is ``|x - y|^2 / 2``.
    blur : float, default 0.05
        Final length scale; ``eps = blur**2``.
    reach : float, optional
        Unbalanced OT with marginal penalties ``rho = reach**2``; None: balanced
        (equal total masses required).
    diameter : float, optional
        First scale of the eps schedule; default the bounding-box diagonal,
        measured at every call. Given, it fixes the schedule, so that repeated
        calls on moving points replay their cached CUDA graphs.
    scaling : float, default 0.5
        Ratio of consecutive blur scales in the schedule, in (0, 1).
    truncate : float, default 5
        ``backend="multiscale"``: GeomLoss' kernel truncation, a pair of
        clusters (I, J) is kept iff ``F_I + G_J > C(X_I, Y_J) - truncate *
        eps`` at the coarse potentials and centroids of the jump to the
        points (larger: more pairs kept, more accurate, slower). The other
        backends compute the exact loss and ignore it.
    cost : None
        Custom costs are not supported (NotImplementedError); use ``cost_scale``.
    kernel : None
        Accepted for compatibility (GeomLoss' kernel losses only).
    cluster_scale : float, optional
        ``backend="multiscale"``: the width of the grid cells that cluster
        the points; default GeomLoss' ``diameter / (sqrt(D) 2000^(1/D))``.
        Ignored, with a warning, by the other backends.
    debias : bool, default True
        Return the Sinkhorn divergence ``S = OT(a,b) - OT(a,a)/2 - OT(b,b)/2``
        rather than ``OT(a,b)``.
    potentials : bool, default False
        Return the dual potentials ``(F, G)`` (debiased ones ``f - f_aa``,
        ``g - g_bb`` with ``debias=True``, as GeomLoss), shaped like the weights
        ((N,) or (B, N) for uniform weights; GeomLoss 0.3.1's tensorized backend
        returns (1, N) for unbatched inputs), detached from autograd.
    verbose : bool, default False
        Show a progress bar over the eps schedule.
    backend : {"auto", None, "torch", "triton", "multiscale"}, default "auto"
        "auto" (or None): Triton for CUDA float32/16/bf16 inputs, torch otherwise.
        GeomLoss' "tensorized" and "online" map to "auto" (both exact).
        "multiscale": GeomLoss' coarse-to-fine solver on block-sparse plans
        (``cluster_scale``, ``truncate``; docs/multiscale.md): one balanced
        problem (no batch, no reach) in dimension D <= 3, value and first
        derivatives (no double backward).
    cost_scale : float, optional
        ``c`` in ``C = c |x - y|^2``; default 0.5 (GeomLoss' ``p = 2``).
    precision : {None, "ieee", "tf32", "tf32x3"}
        Precision of the Triton dot products (None: accurate to fp32).
    hvp_solver : callable, default ``solvers.cg``
        Second order only: the solver of the Schur system of each
        Hessian-vector product, ``hvp_solver(S, rhs, M=, rtol=, atol=,
        maxiter=)`` returning a ``SolveResult`` (``solvers.minres`` works too).
    hvp_preconditioner : operator or preconditioner factory, optional
        Second order only: ``M`` for that solve, e.g. ``solvers.jacobi()``
        (helps with skewed weights) or ``solvers.neumann(3)``.
    hvp_rtol : float, optional
        Second order only: the inner solve's relative residual, and the L1
        marginal error (relative to the mass) to which ``converge`` iterates
        the potentials; default ``otlinop.hvp.inner_rtol`` (1e-11 in float64,
        1e-5 otherwise).
    hvp_maxiter : int, optional
        Second order only: the inner solve's iteration limit (default the
        solver's).
    converge : {"create_graph", "always", "never"}, default "create_graph"
        Which potentials the value and the derivatives come from. GeomLoss'
        eps schedule stops before the potentials converge at the final eps;
        a converging solve goes on there (Gauss-Seidel iterations from the
        schedule's potentials, to ``hvp_rtol``). "create_graph": a backward
        that records a graph (``create_graph=True``, as
        ``torch.autograd.functional.hessian`` and ``hvp`` do) converges
        first and returns the gradient at the converged potentials, whose
        double backward (the HVP there) is then its exact derivative; a
        plain backward returns GeomLoss' gradient, and the value is always
        GeomLoss'. "always": the forward converges: value, gradients and
        HVPs all at the converged potentials (derivatives of one function),
        ``potentials=True`` returns them. "never": the schedule's potentials
        throughout (the HVP at them is not the derivative of the gradient
        to better than the schedule's convergence). See docs/second-order.md.

    Attributes
    ----------
    last_hvp_solve : SolveResult or None
        The ``SolveResult`` of the last inner solve of the last double
        backward (None before any). Per batch entry the solves are that of
        ``OT(a, b)``, then, with ``debias``, those of ``OT(a, a)`` and
        ``OT(b, b)``; check ``converged`` and ``n_iter`` here.
    last_refinement : Refinement or None
        What the last converging solve ran (None before any): ``n_iter``
        (alternating iterations of OT(a, b), two soft-min passes each),
        ``n_iter_self`` (averaged steps of OT(a, a), OT(b, b)),
        ``marginal_error``, ``threshold``, ``converged``.

    Raises
    ------
    NotImplementedError
        For ``loss`` other than "sinkhorn", ``p`` other than 2, a custom
        ``cost`` or ``kernel``, cluster labels (the six-argument call); in a
        double backward, for second derivatives involving the weights, and
        for third derivatives.
    ValueError, TypeError
        For invalid options (at construction) or inputs (at the call).

    Warns
    -----
    RuntimeWarning
        When a converging solve stops at ``REFINE_MAX_ITER`` (10000)
        iterations before reaching its tolerance.

    Notes
    -----
    Call as ``loss(x, y)`` (uniform weights) or ``loss(a, x, b, y)``; x is
    (N, D) or (B, N, D), a is (N,), (N, 1), (B, N) or (B, N, 1). Returns a
    scalar, or a (B,) vector for a batch (solved in one launch per step), in
    the points' dtype, float32 for float16/bfloat16 points (as the returned
    potentials: a half loss overflows past 65504; docs/numerics-range.md). As
    in GeomLoss, the default ``diameter`` of a batch is that of all its
    entries together, so one entry may differ slightly from the same problem
    solved alone; pass ``diameter`` to make them identical.

    With the final potentials ``(f, g)`` (and ``f_aa``, ``g_bb`` of OT(a,a),
    OT(b,b)), the value is ``<a, f - f_aa> + <b, g - g_bb>`` when balanced and
    ``(rho + eps/2)(<a, e^{-f_aa/rho} - e^{-f/rho}> + <b, e^{-g_bb/rho} - e^{-g/rho}>)``
    when not (drop the ``_aa``, ``_bb`` terms without debias).

    Gradients w.r.t. x, y, a, b come from the final extrapolation step only
    (GeomLoss' semantics), never through the iterations; they equal GeomLoss'
    autograd gradients in the balanced case. In the unbalanced case they are
    the derivatives of the returned value (``(rho + eps)`` factor, Séjourné et
    al. 2019, Prop. 12), whereas GeomLoss 0.3.1's autograd applies its forward
    factor ``rho + eps/2``: its point gradients are ``(rho + eps/2)/(rho + eps)``
    times these.

    **Second order.** The point gradients can be differentiated again
    (double backward): with ``g = torch.autograd.grad(value, x,
    create_graph=True)``, ``torch.autograd.grad((g * v).sum(), (x, y))``
    returns ``(H_xx v, H_yx v)``, Hessian-vector products by implicit
    differentiation (``otlinop.hvp``; docs/math.md section 6), never by
    autograd through the iterations. For grad-of-grad directions ``(A, B)``
    of ``(x, y)``, each batch entry costs one ``otlinop.hvp.hvp`` call (one
    Schur solve, ``hvp_solver`` preconditioned by ``hvp_preconditioner``) at
    the final potentials ``(f, g)``; with ``debias``, ``otlinop.hvp.hvp_self``
    at ``f_aa`` (resp. ``g_bb``) is subtracted on each side that has a
    direction:

        H_x = Hx(x, y, f, g; A, B) - H_self(x, f_aa; A),
        H_y = Hy(x, y, f, g; A, B) - H_self(y, g_bb; B).

    The batch entries run one after the other (the Schur solves differ).
    The products are implicit-function derivatives, exact at converged
    potentials; GeomLoss' schedule (``scaling``, ``diameter``, ``blur``)
    stops before convergence, so by default (``converge="create_graph"``)
    the backward that records the graph first iterates the potentials to
    convergence at the final eps, and the gradient it returns, and the HVP,
    are those at the converged potentials: the double backward then agrees
    with central differences of gradients computed the same way
    (``create_graph=True``) to about 1e-8 in float64. It costs the
    iterations of ``last_refinement`` (docs/second-order.md measures them),
    once per forward. The inner solves' status is in ``last_hvp_solve``
    (``hvp_log`` for ``sinkhorn_loss``).
    Second derivatives that involve the weights raise NotImplementedError
    (a direction on the weight gradients, or a requested derivative of the
    gradients w.r.t. weights that require grad, e.g. ``.backward()`` on a
    function of the gradients); those w.r.t. the points work whether the
    weights require grad or not. The HVP is linear in its direction and can
    be differentiated w.r.t. it (``torch.autograd.functional.hvp`` and
    ``hessian`` work), but not w.r.t. the points: third derivatives raise.

    **Host synchronisations, CUDA graphs, torch.compile.** A call reads one
    value back to the host: the input checks (finite values, non-negative
    weights, positive and, when balanced, equal masses) and the default
    ``diameter`` share one reduction (with ``diameter`` given, the checks
    are computed with the solve, in its CUDA graph when it has one, and read
    after it: a bad input then raises once the solve has run). With ``diameter`` given and
    ``config.check_finite`` off it reads nothing (the masses are then not
    checked either), and the backward never reads: such a call can be
    captured in a CUDA graph, where a call that needs the default diameter
    raises RuntimeError (pass ``diameter=``). On CUDA, repeated calls with
    the same shapes and options and an eps schedule of the same length
    replay cached CUDA graphs of their solve and gradient passes
    (:data:`LOSS_GRAPHS`): the schedule's values are data, read by the
    kernels from device memory, so the default diameter, which moves with
    the points of a training loop, changes no key unless the schedule's
    length changes (docs/sinkhorn-and-loss.md). Under ``torch.compile`` the
    loss is two opaque custom ops (``otlinop::sinkhorn_loss`` and
    ``otlinop::sinkhorn_loss_grad``): ``fullgraph=True`` works, values and
    gradients equal eager ones; second derivatives are not available there
    (NotImplementedError or AOTAutograd's refusal of a double backward), and
    ``last_refinement`` is not updated by a compiled call.

    Examples
    --------
    >>> import torch
    >>> from otlinop.loss import SamplesLoss
    >>> x = torch.randn(200, 3, requires_grad=True); y = torch.randn(150, 3) + 1
    >>> L = SamplesLoss("sinkhorn", p=2, blur=0.05)
    >>> value = L(x, y)
    >>> value.backward()
    >>> x.grad.shape
    torch.Size([200, 3])

    A Hessian-vector product by double backward, with a preconditioned inner
    solve:

    >>> import solvers
    >>> x = torch.randn(40, 2, dtype=torch.float64, requires_grad=True)
    >>> y = torch.randn(30, 2, dtype=torch.float64)
    >>> L = SamplesLoss(blur=0.5, hvp_preconditioner=solvers.jacobi())
    >>> (g,) = torch.autograd.grad(L(x, y), x, create_graph=True)
    >>> v = torch.randn_like(x)
    >>> (Hv,) = torch.autograd.grad((g * v).sum(), x)
    >>> Hv.shape, L.last_hvp_solve.converged
    (torch.Size([40, 2]), True)

    The backward with ``create_graph=True`` converged the potentials first:

    >>> L.last_refinement.status, L.last_refinement.marginal_error <= L.last_refinement.threshold
    ('converged', True)
    """

    def __init__(self, loss="sinkhorn", p=2, blur=0.05, reach=None, diameter=None, scaling=0.5, truncate=5,
                 cost=None, kernel=None, cluster_scale=None, debias=True, potentials=False, verbose=False,
                 backend="auto", cost_scale=None, precision=None, hvp_solver=solvers.cg, hvp_preconditioner=None,
                 hvp_rtol=None, hvp_maxiter=None, converge="create_graph"):
        super().__init__()
        owner = "SamplesLoss"
        blur, reach, diameter, scaling, cost_scale = _check_options(
            owner, loss, p, blur, reach, diameter, scaling, cost, kernel, cluster_scale, cost_scale,
            debias, potentials, precision, multiscale=isinstance(backend, str) and backend == "multiscale")
        second = _check_second_order(owner, hvp_solver, hvp_preconditioner, hvp_rtol, hvp_maxiter, converge)
        self.hvp_solver, self.hvp_preconditioner = second["solver"], second["M"]
        self.hvp_rtol, self.hvp_maxiter = second["rtol"], second["maxiter"]
        self.converge = converge
        self.last_hvp_solve = None
        self.last_refinement = None
        self.loss, self.p = loss, p
        self.blur, self.reach, self.diameter, self.scaling = blur, reach, diameter, scaling
        self.truncate, self.cluster_scale = truncate, cluster_scale
        self.debias, self.potentials, self.verbose = debias, potentials, bool(verbose)
        self.backend = backend
        self._backend = _resolve_backend(owner, backend)
        self._multiscale = _multiscale_options(owner, backend, cluster_scale, truncate)
        self.cost_scale, self.precision = cost_scale, precision

    def forward(self, *args):
        """``loss(x, y)`` or ``loss(a, x, b, y)``; see the class docstring."""
        owner = "SamplesLoss"
        if len(args) == 2:
            x, y = args
            a = b = None
        elif len(args) == 4:
            a, x, b, y = args
        elif len(args) == 6:
            raise NotImplementedError(f"{owner}: cluster labels (the six-argument call l_x, a, x, l_y, b, y) "
                                      "belong to GeomLoss' multiscale backend and are not implemented; "
                                      "call loss(a, x, b, y)")
        else:
            raise TypeError(f"{owner}: expected loss(x, y) or loss(a, x, b, y), got {len(args)} arguments")
        second = SecondOrder(**_check_second_order(owner, self.hvp_solver, self.hvp_preconditioner,
                                                   self.hvp_rtol, self.hvp_maxiter, self.converge),
                             record=self._record_hvp_solve, report=self._record_refinement)
        return _samples_loss(owner, a, x, b, y, blur=self.blur, reach=self.reach, diameter=self.diameter,
                             scaling=self.scaling, cost_scale=self.cost_scale, debias=self.debias,
                             potentials=self.potentials, backend=self._backend, precision=self.precision,
                             verbose=self.verbose, second=second, multiscale=self._multiscale)

    def _record_hvp_solve(self, result) -> None:
        self.last_hvp_solve = result

    def _record_refinement(self, refinement) -> None:
        self.last_refinement = refinement

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, p={self.p}, blur={self.blur}, reach={self.reach}, "
                f"diameter={self.diameter}, scaling={self.scaling}, debias={self.debias}, "
                f"potentials={self.potentials}, cost_scale={self.cost_scale}, backend={self.backend!r}, "
                f"precision={self.precision!r}, converge={self.converge!r}")


def sinkhorn_loss(x, y, a=None, b=None, *, p=2, blur=0.05, reach=None, diameter=None, scaling=0.5,
                  debias=True, potentials=False, cost_scale=None, backend="auto", precision=None,
                  verbose=False, hvp_solver=solvers.cg, hvp_preconditioner=None, hvp_rtol=None,
                  hvp_maxiter=None, hvp_log=None, converge="create_graph", cluster_scale=None, truncate=5):
    """Functional form of :class:`SamplesLoss` (loss="sinkhorn").

    Parameters
    ----------
    x : Tensor, shape (N, D) or (B, N, D)
    y : Tensor, shape (M, D) or (B, M, D)
    a : Tensor, shape (N,), (N, 1), (B, N) or (B, N, 1), optional
        Weights of x; default uniform.
    b : Tensor, shape like a for y, optional
    p, blur, reach, diameter, scaling, debias, potentials, cost_scale, backend, precision, verbose
        As in :class:`SamplesLoss`.
    hvp_solver, hvp_preconditioner, hvp_rtol, hvp_maxiter
        The inner solves of a double backward, as in :class:`SamplesLoss`.
    hvp_log : list, optional
        Receives (``append``) the ``SolveResult`` of every inner solve of
        the double backwards through the returned value: per batch entry,
        that of ``OT(a, b)``, then with ``debias`` those of ``OT(a, a)`` and
        ``OT(b, b)`` (for the sides that have a direction). This is the
        functional counterpart of ``SamplesLoss.last_hvp_solve``.
    converge : {"create_graph", "always", "never"}, default "create_graph"
        Which potentials the value and derivatives come from, as in
        :class:`SamplesLoss` (a converging solve that stops short warns).
    cluster_scale, truncate
        ``backend="multiscale"`` only, as in :class:`SamplesLoss`.

    Returns
    -------
    Tensor
        A scalar, (B,) for a batch, or the pair ``(F, G)`` with ``potentials=True``.

    Raises
    ------
    NotImplementedError, ValueError, TypeError
        As :class:`SamplesLoss`; TypeError if ``hvp_log`` is not a list.

    Notes
    -----
    Double backward gives Hessian-vector products in the points (see
    :class:`SamplesLoss`, Notes, "Second order").

    Examples
    --------
    >>> import torch
    >>> from otlinop.loss import sinkhorn_loss
    >>> x = torch.randn(4, 50, 2); y = torch.randn(4, 60, 2)
    >>> sinkhorn_loss(x, y, blur=0.1).shape
    torch.Size([4])

    Second order, with the inner solves logged:

    >>> x = torch.randn(30, 2, dtype=torch.float64, requires_grad=True)
    >>> y = torch.randn(20, 2, dtype=torch.float64)
    >>> log = []
    >>> (g,) = torch.autograd.grad(sinkhorn_loss(x, y, blur=0.5, hvp_log=log), x, create_graph=True)
    >>> (Hv,) = torch.autograd.grad(g.sum(), x)
    >>> len(log), all(r.converged for r in log)     # OT(a, b) and the debiasing OT(a, a)
    (2, True)
    """
    owner = "sinkhorn_loss"
    multiscale = _multiscale_options(owner, backend, cluster_scale, truncate)
    blur, reach, diameter, scaling, cost_scale = _check_options(
        owner, "sinkhorn", p, blur, reach, diameter, scaling, None, None, cluster_scale, cost_scale, debias,
        potentials, precision, multiscale=multiscale is not None)
    if hvp_log is not None and not isinstance(hvp_log, list):
        raise TypeError(f"{owner}: hvp_log must be a list (it receives the SolveResult of every inner solve "
                        f"of a double backward) or None, got {type(hvp_log).__name__}")
    second = SecondOrder(**_check_second_order(owner, hvp_solver, hvp_preconditioner, hvp_rtol, hvp_maxiter,
                                               converge),
                         record=None if hvp_log is None else hvp_log.append)
    return _samples_loss(owner, a, x, b, y, blur=blur, reach=reach, diameter=diameter, scaling=scaling,
                         cost_scale=cost_scale, debias=debias, potentials=potentials,
                         backend=_resolve_backend(owner, backend), precision=precision, verbose=verbose,
                         second=second, multiscale=multiscale)
