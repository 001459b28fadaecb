"""The differentiable product ``P @ V`` with the entropic plan, never stored.

``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``, ``C_ij = c |x_i - y_j|^2``.
``plan_matmul`` (batched inputs allowed) and ``transport_gradient`` are the
public functions (``otlinop.plan`` exports them); ``PlanMatmul``, the autograd
Function under both and under ``PlanOperator``, computes the gradients w.r.t.
``V, f, g, x, y, a, b`` with the same streaming kernels
(``otlinop.kernels``). ``validated_plan_data`` checks a plan's data once for
all of them.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.function import once_differentiable

from solvers import config
from solvers._function import Function

from .._checks import backend_name, finite, operand, points, positive_scalar, precision_name, vector
from ..kernels._dispatch import check_backend
from ..kernels.plan_apply import OVERFLOW_HINT, plan_apply, plan_apply_scaled
from ..kernels.plan_bilinear import plan_bilinear

__all__ = ["PlanMatmul", "plan_matmul", "plan_values", "softmin_gradient", "transport_gradient",
           "transport_gradient_for", "validated_plan_data"]


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
_UNDEFINED = "the plan would be undefined: check the solver of the potentials, or the point clouds"


def validated_plan_data(owner: str, x, y, f, g, V, a, b, eps, cost_scale, backend, precision, *,
                        batched: bool, finite_potentials: bool, hint: str | None = None,
                        values: bool = True) -> tuple:
    """Check the data of a plan for the public function ``owner``; return
    ``(eps, cost_scale, backend, precision)``.

    x (n, d), y (m, d), f and a (n,), g and b (m,), V (m,) or (m, k); with
    ``batched`` a common leading batch dimension B on every tensor. Then, with
    ``values``, the values (:func:`plan_values`): finite data and weights
    ``>= 0``, costs ``cost_scale |x_i - y_j|^2`` finite in the compute dtype;
    a caller that computes a product passes ``values=False`` and calls
    :func:`plan_values` with its result, so that one read-back checks both.
    """
    eps = positive_scalar(owner, "eps", eps)
    cost_scale = positive_scalar(owner, "cost_scale", cost_scale)
    backend = backend_name(owner, backend)
    precision = precision_name(owner, precision)
    geo = points(owner, x, y, batch="same" if batched else "none", hint=hint)
    vector(geo, "f", f, geo.n, what="one potential per point of x")
    vector(geo, "g", g, geo.m, what="one potential per point of y")
    vector(geo, "a", a, geo.n, what="one weight per point of x", optional=True)
    vector(geo, "b", b, geo.m, what="one weight per point of y", optional=True)
    operand(geo, "V", V, geo.m, what=f"y has {geo.m} points", transpose=f"{owner}(y, x, g, f, V, a=b, b=a, ...)")
    check_backend(owner, backend, x)
    if values:
        plan_values(owner, x, y, f, g, V, a, b, finite_potentials=finite_potentials, cost_scale=cost_scale)
    return eps, cost_scale, backend, precision


def plan_values(owner: str, x, y, f, g, V, a, b, *, finite_potentials: bool, results: dict | None = None,
                cost_scale: float | None = None) -> None:
    """The values of a plan's data, read back in one synchronisation (none when
    ``config.check_finite`` is off): finite data and weights ``>= 0``; the
    potentials may hold -inf (a zero row or column) unless ``finite_potentials``;
    with ``cost_scale``, costs ``cost_scale |x_i - y_j|^2`` finite in the compute
    dtype. ``results``: what was computed from them, refused if it overflowed."""
    finite(owner, {"x": x, "y": y, "f": f, "g": g, "V": V, "a": a, "b": b},
           allow_neg_inf=() if finite_potentials else ("f", "g"), nonnegative=("a", "b"), hint=_UNDEFINED,
           results=results, result_hint=OVERFLOW_HINT, cost_scale=cost_scale)


# --------------------------------------------------------------------------
# The differentiable product
# --------------------------------------------------------------------------
def _rowdot(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(..., n, k) x (..., n, k) -> (..., n): <U_i, V_i>."""
    return (U * V).sum(-1)


def _nested_forward_mode() -> bool:
    """Whether an outer torch.func.jvp (or jacfwd) transform encloses this jvp rule: torch
    then drops the rule's own dependence on the primals, so a second forward derivative
    would come out silently wrong. torch exposes this only through private names."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    # The rule runs under the jvp interpreter that calls it; another one below it is an outer jvp.
    jvps = [i for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp]
    return len(jvps) > 1


class PlanMatmul(Function):
    """``P @ V`` for the plan of (x, y, f, g, a, b); V=None means ``P 1``.

    Backward (W = grad_out, s_ij = <W_i, V_j>, L = sum_ij P_ij s_ij):
    dL/dV = P.T W; dL/df_i = rowdot(W, PV)_i / eps; dL/dg_j = rowdot(V, P.T W)_j / eps;
    dL/dx_i = -(2c/eps) [x_i rowdot(W, PV)_i - sum_j P_ij s_ij y_j];
    dL/dy_j = -(2c/eps) [y_j rowdot(V, P.T W)_j - sum_i P_ij s_ij x_i];
    dL/da_i = sum_j (P_ij / a_i) s_ij = rowdot(W, P' V)_i with P' the plan without the a
    factor (well defined at a_i = 0); dL/db likewise. Every term is one streaming pass.
    """

    @staticmethod
    def forward(x, y, f, g, V, a, b, eps, cost_scale, backend, precision):
        log_a = None if a is None else torch.log(a)
        log_b = None if b is None else torch.log(b)
        return plan_apply(x, y, f, g, V, log_a=log_a, log_b=log_b, eps=eps, cost_scale=cost_scale,
                          backend=backend, precision=precision)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # forward without ctx (and this hook) is what torch.func asks of a Function.
        x, y, f, g, V, a, b, eps, cost_scale, backend, precision = inputs
        ctx.opts = dict(eps=eps, cost_scale=cost_scale, backend=backend, precision=precision)
        ctx.save_for_backward(x, y, f, g, V, a, b, output)
        ctx.save_for_forward(x, y, f, g, V, a, b, output)

    @staticmethod
    def backward(ctx, W):
        if _transformed(*ctx.saved_tensors, W):
            # Under torch.func the backward is made of PlanMatmul products and torch ops:
            # differentiable again (jacrev of jacrev, vmap of a double backward).
            return PlanMatmul._gradients(ctx, W)
        return PlanMatmul._gradients_once(ctx, W)

    @staticmethod
    def _gradients(ctx, W):
        x, y, f, g, V, a, b, PV = ctx.saved_tensors
        nx, ny, nf, ng, nV, na, nb = ctx.needs_input_grad[:7]
        opts = ctx.opts
        eps, c2 = opts["eps"], 2.0 * opts["cost_scale"]
        vector = PV.ndim == x.ndim - 1
        col = (lambda t: t.unsqueeze(-1)) if vector else (lambda t: t)
        Wm = col(W)
        if V is None:
            Vm = x.new_ones(y.shape[:-1] + (1,))
        else:
            Vm = col(V)

        if nx or ny:
            # dx_i = -(2c/eps) sum_j P_ij s_ij (x_i - y_j) holds with both clouds shifted by any z;
            # a common centre keeps the two terms small, so that their difference cancels less.
            z = (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)) / 2
            xz, yz = x - z, y - z

        if _transformed(x, y, f, g, V, a, b, PV, W):
            # Under torch.func (jacrev, hessian, vmap of a vjp) the kernels cannot take the
            # transforms' wrapped tensors: the passes go through PlanMatmul itself, whose vmap
            # and jvp rules see them. The bilinear sums become plain products:
            # sum_j P_ij <W_i, V_j> Y_j = sum_l W_il (P (V_l Y))_i, so that a batch of
            # cotangents W (jacrev) shares one pass of the plan with the unbatched V Y.
            def matmul(x, y, f, g, V, a, b):
                return PlanMatmul.apply(x, y, f, g, V, a, b, eps, opts["cost_scale"], opts["backend"],
                                        opts["precision"])

            def bilinear(x, y, f, g, W, V, Y, a, b):
                k, e = V.shape[-1], Y.shape[-1]
                S = matmul(x, y, f, g, (V.unsqueeze(-1) * Y.unsqueeze(-2)).flatten(-2), a, b)
                return (W.unsqueeze(-1) * S.unflatten(-1, (k, e))).sum(-2)
        else:
            def matmul(x, y, f, g, V, a, b):
                return plan_apply(x, y, f, g, V, log_a=None if a is None else torch.log(a),
                                  log_b=None if b is None else torch.log(b), **opts)

            def bilinear(x, y, f, g, W, V, Y, a, b):
                return plan_bilinear(x, y, f, g, W, V, Y, log_a=None if a is None else torch.log(a),
                                     log_b=None if b is None else torch.log(b), **opts)

        grad_x = grad_y = grad_f = grad_g = grad_V = grad_a = grad_b = None
        if nf or nx:
            rw = _rowdot(Wm, col(PV))                      # sum_j P_ij s_ij
            if nf:
                grad_f = rw / eps
            if nx:
                Py_s = bilinear(x, y, f, g, Wm, Vm, yz, a, b)
                grad_x = (-c2 / eps) * (xz * rw.unsqueeze(-1) - Py_s)
        if nV or ng or ny:
            PTW = matmul(y, x, g, f, W, b, a)
            if nV:
                grad_V = PTW
            if ng or ny:
                rv = _rowdot(Vm, col(PTW))                 # sum_i P_ij s_ij
                if ng:
                    grad_g = rv / eps
                if ny:
                    PTx_s = bilinear(y, x, g, f, Vm, Wm, xz, b, a)
                    grad_y = (-c2 / eps) * (yz * rv.unsqueeze(-1) - PTx_s)
        if na:
            grad_a = _rowdot(Wm, col(matmul(x, y, f, g, V, None, b)))
        if nb:
            grad_b = _rowdot(Vm, col(matmul(y, x, g, f, W, None, a)))
        return grad_x, grad_y, grad_f, grad_g, grad_V, grad_a, grad_b, None, None, None, None

    # Outside torch.func: the streaming kernels, and a double backward raises.
    _gradients_once = staticmethod(once_differentiable(_gradients.__func__))

    @staticmethod
    def vmap(info, in_dims, x, y, f, g, V, a, b, eps, cost_scale, backend, precision):
        """One batched product for a vmapped call: the mapped dimension becomes the
        kernels' leading batch dimension (merged with the plan's own batch, if any)."""
        B = info.batch_size
        batched = (x.ndim - (in_dims[0] is not None)) == 3   # the plan's own batch B0
        if V is not None and in_dims[4] is not None and all(d is None for i, d in enumerate(in_dims[:7]) if i != 4):
            # Only the operand is mapped (jacrev's cotangents, a batch of directions): its
            # batch becomes more columns of one product, one pass over the plan for all.
            Vc = V.movedim(in_dims[4], -1)                # (..., m, B) or (..., m, k, B)
            k = None if V.ndim - 1 == x.ndim - 1 else Vc.shape[-2]
            out = PlanMatmul.apply(x, y, f, g, (Vc if k is None else Vc.flatten(-2)).contiguous(), a, b, eps,
                                   cost_scale, backend, precision)
            if k is not None:
                out = out.unflatten(-1, (k, B))
            return out.movedim(-1, 0), 0
        B0 = None
        if batched:
            B0 = (x if in_dims[0] is None else x.movedim(in_dims[0], 0)).shape[-3]

        def lead(t, dim, core):
            # core: ndim of the tensor in an unbatched plan; returns (B * B0 or B, ...).
            if t is None:
                return None
            t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0)
            if batched and t.ndim - 1 == core:                   # shared by the plan's batch
                t = t.unsqueeze(1).expand(t.shape[0], B0, *t.shape[1:])
            t = t.expand(B, *t.shape[1:])
            return t.flatten(0, 1) if batched else t

        v_core = None if V is None else (V.ndim - (in_dims[4] is not None) - batched)
        xs, ys = lead(x, in_dims[0], 2), lead(y, in_dims[1], 2)
        fs, gs = lead(f, in_dims[2], 1), lead(g, in_dims[3], 1)
        Vs = None if V is None else lead(V, in_dims[4], v_core)
        a_s, b_s = lead(a, in_dims[5], 1), lead(b, in_dims[6], 1)
        if Vs is None:
            Vs = xs.new_ones(ys.shape[:-1])
        out = PlanMatmul.apply(xs.contiguous(), ys.contiguous(), fs.contiguous(), gs.contiguous(),
                               Vs.contiguous(), None if a_s is None else a_s.contiguous(),
                               None if b_s is None else b_s.contiguous(), eps, cost_scale, backend, precision)
        if batched:
            out = out.unflatten(0, (B, B0))
        return out, 0

    @staticmethod
    def jvp(ctx, dx, dy, df, dg, dV, da, db, *_):
        """Tangent of ``P V``: ``dP_ij = P_ij (df_i + dg_j - dC_ij) / eps + (da_i / a_i + db_j / b_j) P_ij``,
        ``dC_ij = 2c (x_i - y_j).(dx_i - dy_j)``. With xz, yz the clouds shifted by a common centre
        (``(x_i - y_j)`` is unchanged) and ``r = P V``::

            d(P V) = P U + (df / eps - (2c/eps) xz.dx) r + (2c/eps) [sum_l xz_l P(dy_l V) + sum_l dx_l P(yz_l V)]
                     + da P_{a=1} V + P_{b=1}(db V),
            U = dV + (dg / eps - (2c/eps) yz.dy) V,

        one plan pass on ``[U | dy_l V | yz_l V]`` (the columns needed) plus one per weight
        tangent. The passes go through ``PlanMatmul`` itself, so that vmap and nested
        transforms see them."""
        if _nested_forward_mode():
            raise NotImplementedError("plan_matmul: forward mode over forward mode (torch.func.jvp of a jvp, "
                                      "jacfwd of jacfwd) is not supported: torch would drop the "
                                      "second-order terms; use forward over reverse, jvp(grad(...)), or "
                                      "reverse over forward, grad of a jvp, instead")
        x, y, f, g, V, a, b, PV = ctx.saved_tensors
        opts = ctx.opts
        eps, c2 = opts["eps"], 2.0 * opts["cost_scale"]
        args = (opts["eps"], opts["cost_scale"], opts["backend"], opts["precision"])
        vector = PV.ndim == x.ndim - 1
        col = (lambda t: t.unsqueeze(-1)) if vector else (lambda t: t)
        Vm = x.new_ones(y.shape[:-1] + (1,)) if V is None else col(V)
        r = col(PV)
        n_k = Vm.shape[-1]
        d = x.shape[-1]
        z = (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)) / 2
        xz, yz = x - z, y - z

        out = torch.zeros_like(r)
        U = None if dV is None else col(dV)
        if dg is not None:
            U = (dg / eps).unsqueeze(-1) * Vm if U is None else U + (dg / eps).unsqueeze(-1) * Vm
        if dy is not None:
            t = (-c2 / eps) * _rowdot(yz, dy).unsqueeze(-1) * Vm
            U = t if U is None else U + t
        parts = [] if U is None else [U]
        if dy is not None:
            parts.append((dy.unsqueeze(-1) * Vm.unsqueeze(-2)).flatten(-2))      # (m, d k): dy_l V
        if dx is not None:
            parts.append((yz.unsqueeze(-1) * Vm.unsqueeze(-2)).flatten(-2))      # (m, d k): yz_l V
        if parts:
            S = PlanMatmul.apply(x, y, f, g, torch.cat(parts, -1), a, b, *args)
            if U is not None:
                out = out + S[..., :n_k]
                S = S[..., n_k:]
            if dy is not None:
                Pdy = S[..., :d * n_k].unflatten(-1, (d, n_k))
                out = out + (c2 / eps) * (xz.unsqueeze(-1) * Pdy).sum(-2)
                S = S[..., d * n_k:]
            if dx is not None:
                Pyz = S.unflatten(-1, (d, n_k))
                out = out + (c2 / eps) * (dx.unsqueeze(-1) * Pyz).sum(-2) - (c2 / eps) * _rowdot(xz, dx).unsqueeze(-1) * r
        if df is not None:
            out = out + (df / eps).unsqueeze(-1) * r
        if da is not None:
            out = out + da.unsqueeze(-1) * PlanMatmul.apply(x, y, f, g, Vm, None, b, *args)
        if db is not None:
            out = out + PlanMatmul.apply(x, y, f, g, db.unsqueeze(-1) * Vm, a, None, *args)
        return out.squeeze(-1) if vector else out


def plan_matmul(x, y, f, g, V=None, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None):
    """The differentiable product ``P @ V`` with the entropic plan ``P``, never stored.

    Parameters
    ----------
    x : Tensor, shape (n, d) or (B, n, d)
        Source points.
    y : Tensor, shape (m, d) or (B, m, d)
        Target points.
    f : Tensor, shape (n,) or (B, n)
        Source potential.
    g : Tensor, shape (m,) or (B, m)
        Target potential.
    V : Tensor, shape (m,), (m, k), (B, m) or (B, m, k), or None
        The operand; None gives the row sums ``P 1``.
    eps : float
        Entropic regularisation, > 0.
    a : Tensor, shape (n,) or (B, n), optional
        Source weights (not logs), >= 0; None means ones.
    b : Tensor, shape (m,) or (B, m), optional
        Target weights, >= 0; None means ones.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2`` (GeomLoss' p=2 cost is ``c = 1/2``).
    backend : {None, "auto", "torch", "triton"}
        None or "auto" picks Triton for CUDA float16/bfloat16/float32 tensors, torch otherwise.
    precision : optional
        Passed to the kernel (see ``otlinop.kernels.plan_apply``).

    Returns
    -------
    Tensor, shape (n,), (n, k), (B, n) or (B, n, k)
        ``P V`` (or ``P 1``), with V's layout.

    Raises
    ------
    TypeError
        For non-tensor data, mismatched dtypes, or an ``eps`` that requires grad.
    ValueError
        For mismatched shapes or devices, ``eps <= 0``, ``cost_scale <= 0`` or an
        unknown backend.

    Notes
    -----
    ``P_ij = a_i b_j exp((f_i + g_j - c |x_i - y_j|^2) / eps)``; ``log 0 = -inf``,
    so zero weights give zero rows or columns. ``P.T @ U`` is
    ``plan_matmul(y, x, g, f, U, a=b, b=a, ...)``.

    Gradients w.r.t. ``V, f, g, x, y, a, b`` are computed by the same
    streaming kernels (``plan_apply``, ``plan_bilinear``), only for the inputs
    that need them: up to five plan passes, O(nm(d + k)) time, O((n + m)(d + k))
    memory. With ``W`` the output gradient and ``s_ij = <W_i, V_j>``::

        dV = P.T W,  df = rowdot(W, P V) / eps,  dg = rowdot(V, P.T W) / eps,
        dx_i = -(2c/eps) (x_i rowdot(W, P V)_i - sum_j P_ij s_ij y_j),
        dy_j = -(2c/eps) (y_j rowdot(V, P.T W)_j - sum_i P_ij s_ij x_i),
        da_i = sum_j P_ij s_ij / a_i (computed without dividing by a_i).

    With plain autograd the backward is ``once_differentiable``: double
    backward through this function raises. Second-order derivatives of the
    OT loss go through the analytic Hessian-vector products of
    ``otlinop.hvp`` instead. Gradients w.r.t. ``eps`` and ``cost_scale`` are
    not provided.

    torch.func (``grad``, ``jacrev``, ``jacfwd``, ``hessian``, ``jvp``,
    ``vmap``) and ``torch.autograd.forward_ad`` go through it: the tangent
    costs one more plan pass (plus one per weight tangent); a vmapped call is
    one batched call, a mapped operand alone more columns of one pass; under
    torch.func the backward is made of such products, and is differentiable
    again. Forward over forward raises ``NotImplementedError``
    (docs/forward-mode.md: what each transform costs).

    Examples
    --------
    >>> import torch
    >>> from otlinop.plan import plan_matmul
    >>> x = torch.randn(5, 2, dtype=torch.float64); y = torch.randn(4, 2, dtype=torch.float64)
    >>> f = torch.zeros(5, dtype=torch.float64, requires_grad=True); g = torch.zeros(4, dtype=torch.float64)
    >>> out = plan_matmul(x, y, f, g, torch.ones(4, dtype=torch.float64), eps=1.0)
    >>> out.sum().backward(); f.grad.shape
    torch.Size([5])
    """
    opts = validated_plan_data("plan_matmul", x, y, f, g, V, a, b, eps, cost_scale, backend, precision,
                               batched=True, finite_potentials=False, values=False)
    if _vmapped(x, y, f, g, V, a, b):
        # Values cannot be read back from torch.func.vmap's batched tensors: the kernels
        # check them (and the product) inside PlanMatmul.vmap, on the whole batch at once.
        return PlanMatmul.apply(x, y, f, g, V, a, b, *opts)
    out = _checked_product(x, y, f, g, V, a, b, *opts)
    plan_values("plan_matmul", x, y, f, g, V, a, b, finite_potentials=False, results={"P @ V": out},
                cost_scale=opts[1])
    return out


def _vmapped(*tensors) -> bool:
    """Whether torch.func.vmap maps a tensor at some level, under grad or jvp levels too
    (no public test exists)."""
    for t in tensors:
        while t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t):
            if torch._C._functorch.is_batchedtensor(t):
                return True
            t = torch._C._functorch.get_unwrapped(t)
    return False


def recorded(*tensors) -> bool:
    """Whether a product of these tensors must go through its autograd Function: grad
    mode is on and one of them requires grad, one of them carries a forward-mode tangent,
    or a torch.func transform is running. Otherwise the Function (about 0.1 ms of host time
    per call, where binding its arguments dominates) records nothing and the kernel is
    called directly. A dual level alone does not count: torch.func.jvp opens one for its
    whole call, and the jvp rules inside it (an HVP's products) run on plain tensors."""
    if torch._C._functorch.maybe_current_level() is not None:
        return True
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    return getattr(fwAD, "_current_level", -1) >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _transformed(*tensors) -> bool:
    """Whether a tensor is wrapped by a torch.func transform (vmap, grad, jvp; no public test exists)."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _checked_product(x, y, f, g, V, a, b, eps, cost_scale, backend, precision):
    """``P @ V`` on data whose shapes ``validated_plan_data`` checked, and whose
    values ``plan_values`` checks with the result: the kernels' own value checks
    of the forward pass would read the same values back a second time."""
    with config.override(check_finite=False):
        return PlanMatmul.apply(x, y, f, g, V, a, b, eps, cost_scale, backend, precision)


def transport_gradient(x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None):
    """``sum_j P_ij dC_ij/dx_i = 2c ((P 1) * x - P y)``: the gradient of the OT loss w.r.t. x.

    Parameters
    ----------
    x, y, f, g, eps, a, b, cost_scale, backend, precision
        As in ``plan_matmul`` (batched inputs allowed).

    Returns
    -------
    Tensor, shape (n, d) or (B, n, d)

    Notes
    -----
    One streaming pass, ``P @ [y - z | 1]``, differentiable through
    ``plan_matmul``. Both clouds are shifted by the common centre
    ``z = (mean x + mean y) / 2`` first: the result is unchanged
    (``P 1 * z - P z = 0``) but the two terms stay small, so that their
    difference loses less in float32. With converged potentials this is the
    gradient of the entropic OT loss w.r.t. x; ``transport_gradient(y, x, g, f,
    a=b, b=a, ...)`` gives the one w.r.t. y.
    """
    return transport_gradient_for("transport_gradient", x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale,
                                  backend=backend, precision=precision)


def transport_gradient_for(owner: str, x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None,
                           precision=None, batched: bool = True, wrt: str = "x"):
    """:func:`transport_gradient` for the public function ``owner``, whose name
    its argument errors carry: the gradient w.r.t. x, or w.r.t. y with
    ``wrt="y"`` (the arguments keep their names in the messages either way);
    ``batched=False`` refuses batched clouds."""
    eps, cost_scale, backend, precision = validated_plan_data(owner, x, y, f, g, None, a, b, eps, cost_scale,
                                                              backend, precision, batched=batched,
                                                              finite_potentials=False, values=False)
    data = (x, y, f, g, None, a, b)
    if wrt == "y":
        x, y, f, g, a, b = y, x, g, f, b, a
    z = (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)) / 2
    xz, yz = x - z, y - z
    d = x.shape[-1]
    V = torch.cat([yz, yz.new_ones(yz.shape[:-1] + (1,))], dim=-1)
    PV = _checked_product(x, y, f, g, V, a, b, eps, cost_scale, backend, precision)
    out = (2.0 * cost_scale) * (PV[..., d:] * xz - PV[..., :d])
    plan_values(owner, *data, finite_potentials=False, results={"the transport gradient": out},
                cost_scale=cost_scale)
    return out


def softmin_gradient(x, y, g, w, *, eps, b=None, cost_scale=1.0, backend=None, precision=None):
    """``2c w_i (x_i - ybar_i)``: the gradient w.r.t. x of ``sum_i w_i smin_i(g)`` at fixed g.

    ``smin_i(g) = -eps log sum_j b_j exp((g_j - C_ij) / eps)`` and ``ybar_i =
    sum_j pi_ij y_j`` with ``pi_ij`` its soft-max weights, the rows of
    ``P(f, g)`` normalised to 1. For data that the caller checked: x (B, n, d),
    y (B, m, d), g and b (B, m), w (B, n) (the row masses); returns (B, n, d)
    in the dtype of x.

    With ``f`` the (damped) soft-min of ``g``, the plan ``P(f, g)`` is
    ``Diag(w) pi`` for ``w = P 1``: this is ``transport_gradient(x, y, f, g)``
    without ``f``. One pass of ``plan_apply_scaled`` on ``V = [y - z | 1]``
    gives ``ybar`` as the ratio of two sums that share their row factor, so
    that factor (``exp(f_i / eps + ...)``, whose exponent float32 only knows to
    ``|f| / eps * 2^-24``) never enters: what GeomLoss differentiates, and
    as accurate in float32 as the soft-min itself. A row without a finite
    logit (every ``b_j = 0``) takes ``ybar_i = 0``.
    """
    z = (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)) / 2
    xz, yz = x - z, y - z
    d = x.shape[-1]
    V = torch.cat([yz, yz.new_ones(yz.shape[:-1] + (1,))], dim=-1)
    log_b = None if b is None else torch.log(b)
    with config.override(check_finite=False):
        # f does not enter the ratio: zeros keep the row scales (unused) finite.
        S, _ = plan_apply_scaled(x, y, g.new_zeros(x.shape[:-1]), g, V, eps=eps, log_b=log_b,
                                 cost_scale=cost_scale, backend=backend, precision=precision)
    mass = S[..., d:]
    ybar = torch.where(mass > 0, S[..., :d] / mass, torch.zeros_like(S[..., :d]))
    return ((2.0 * cost_scale) * w.unsqueeze(-1) * (xz - ybar.to(xz.dtype))).to(x.dtype)
