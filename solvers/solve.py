"""``solve``: a Krylov solve that autograd differentiates by the implicit function theorem."""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.autograd.forward_ad as fwAD

from ._function import Function
from ._operator import COMPLEX_DTYPES, REAL_DTYPES, DenseOperator, adjoint, as_operator, complex_of, is_operator, promote
from .bicgstab import bicgstab
from .cg import cg
from .gmres import gmres
from .minres import minres
from .preconditioners import PreconditionerFactory

__all__ = ["solve", "operator_params"]

_METHODS = {"cg": cg, "minres": minres, "gmres": gmres, "bicgstab": bicgstab}
_SYMMETRIC_METHODS = ("cg", "minres")


def _graph_leaves(root) -> list:
    """Leaf tensors requiring grad reachable from the autograd node ``root``."""
    seen, stack, leaves, ids = set(), [root], [], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if isinstance(var, torch.Tensor) and var.requires_grad and id(var) not in ids:
            ids.add(id(var))
            leaves.append(var)
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves


def operator_params(op, params, caller: str = "solve") -> tuple:
    """The tensors requiring grad that ``op``'s matvec depends on (see ``solve``; ``lstsq`` shares it)."""
    if params is not None:
        if isinstance(params, torch.Tensor):
            params = (params,)
        params = tuple(params)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{caller}: params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        return tuple(p for p in params if p.requires_grad)
    for attr in ("_differentiable_tensors", "parameters"):
        fn = getattr(op, attr, None)
        if callable(fn):
            return tuple(p for p in fn() if isinstance(p, torch.Tensor) and p.requires_grad)
    if not torch.is_grad_enabled():
        return ()
    # No declared tensors: run one matvec and collect the leaves its autograd graph reaches.
    with torch.enable_grad():
        probe = torch.ones(int(op.shape[1]), dtype=op.dtype, device=op.device)
        y = op @ probe
    if not isinstance(y, torch.Tensor) or y.grad_fn is None:
        return ()
    return tuple(_graph_leaves(y.grad_fn))


def _adjoint_preconditioner(M, symmetric: bool):
    if M is None or symmetric:
        return M
    if isinstance(M, PreconditionerFactory) or (hasattr(M, "bind") and not is_operator(M)):
        return M  # the solver binds it to A^H
    if isinstance(M, torch.Tensor):
        return M.mH
    try:
        return adjoint(M)
    except (AttributeError, NotImplementedError):
        # A plain callable has no adjoint; reusing it still gives a valid (if weaker) preconditioner.
        return M


class _DenseAdjoint:
    """``M^T`` of a real dense operator, transposed at each product (under torch.func): a
    transpose made ahead (``DenseOperator.T``) belongs to the torch.func level it was made
    at, which a forward-mode rule running at a lower level cannot use."""

    def __init__(self, op: DenseOperator):
        self.op, self.shape, self.dtype, self.device = op, (op.shape[1], op.shape[0]), op.dtype, op.device

    def __matmul__(self, v):
        return self.op.M.mT @ v

    @property
    def T(self):
        return self.op

    def diagonal(self) -> torch.Tensor:
        return self.op.M.diagonal()

    def to_sparse_csr(self) -> torch.Tensor:
        return self.op.M.mT.to_sparse_csr()

    def _differentiable_tensors(self) -> tuple:
        return self.op._differentiable_tensors()


@dataclasses.dataclass
class _Spec:
    op: object
    adjoint: object
    method: str
    options: dict
    adjoint_options: dict
    params: tuple
    result: object = None


class _Solve(Function):
    """x = A(params)^-1 b; backward: one adjoint solve, then the parameter VJP."""

    @staticmethod
    def forward(spec: _Spec, b, *params):
        result = _METHODS[spec.method](spec.op, b, **spec.options)
        spec.result = result
        return result.x

    @staticmethod
    def setup_context(ctx, inputs, output):
        # forward without ctx (and this hook) is what torch.func asks of a Function.
        ctx.spec = inputs[0]
        ctx.save_for_backward(output)

    @staticmethod
    def jvp(ctx, _, db, *__):
        """``A dx = db``: one more solve. A tangent in A's matvec goes through _Tangent instead
        (solve() then passes b's primal here and supplies the whole tangent there)."""
        if db is None:
            return torch.zeros_like(ctx.spec.result.x)
        return _tangent_solve(ctx.spec, db)

    @staticmethod
    def vmap(info, in_dims, spec, b, *params):
        """A batch of right-hand sides (torch.func.vmap, jacrev's cotangents, jacfwd's tangents)
        becomes more columns of one solve: the mapped dimension goes last, next to b's own k.
        The columns go through :func:`solve` again, for the transforms below this one."""
        if any(d is not None for d in in_dims[2:]):
            raise NotImplementedError(
                "solve: torch.func.vmap over the operator's tensors is not supported (one Krylov solve "
                "serves one operator); map over the right-hand side only, or loop over the operators")
        if in_dims[1] is None:
            result = solve(spec.op, b, spec.method, params=params, **spec.options)
            spec.result = result
            return result.x, None
        B = info.batch_size
        columns = b.movedim(in_dims[1], -1)                          # (n, B) or (n, k, B)
        k = None if columns.ndim == 2 else columns.shape[-2]
        flat = columns if k is None else columns.flatten(-2)
        options = dict(spec.options)
        if options.get("x0") is not None:
            x0 = options["x0"]
            options["x0"] = x0.unsqueeze(-1).expand(*x0.shape, B).reshape(flat.shape)   # one start per column
        result = solve(spec.op, flat.contiguous(), spec.method, params=params, **options)
        spec.result = result
        x = result.x if k is None else result.x.unflatten(-1, (k, B))
        return x.movedim(-1, 0), 0

    @staticmethod
    def backward(ctx, grad_x):
        spec = ctx.spec
        (x,) = ctx.saved_tensors
        nparams = len(spec.params)
        if grad_x is None:
            return (None, None) + (None,) * nparams
        adj = solve(spec.adjoint, grad_x, spec.method, params=spec.params, **spec.adjoint_options)
        if not adj.converged:
            warnings.warn(f"solve: the adjoint solve of the backward pass did not converge, so the gradient "
                          f"is inaccurate: {adj.status}", RuntimeWarning, stacklevel=2)
        lam = adj.x
        grads = (None,) * nparams
        if nparams and any(ctx.needs_input_grad[2:]) and _wrapped(grad_x):
            # A torch.func transform runs a Function's forward on its own unwrapped tensors,
            # while A's matvec holds the transform's: the product could not be differentiated.
            raise NotImplementedError(
                "solve: reverse mode under torch.func (grad, jacrev, vjp, hessian) w.r.t. the operator's "
                "tensors is not supported; torch.func transforms w.r.t. b work, and so do forward mode "
                "(torch.func.jvp, jacfwd, torch.autograd.forward_ad) w.r.t. the operator and "
                "torch.autograd.grad / .backward() w.r.t. it")
        if nparams and any(ctx.needs_input_grad[2:]):
            grads = _ParamGrad.apply(spec, lam, x, *spec.params)
        return (None, lam if ctx.needs_input_grad[1] else None) + tuple(grads)


class _ParamGrad(Function):
    """g_i = -d<lam, A(params) x>/d params_i with x held fixed.

    A Function rather than inline autograd so that, under double backward,
    the dependence of g on x flows to x's own history without the first
    derivative walking through it.
    """

    @staticmethod
    def forward(ctx, spec: _Spec, lam, x, *params):
        with torch.enable_grad():
            y = spec.op @ x.detach()
            if isinstance(y, torch.Tensor) and y.requires_grad:
                # retain_graph: the matvec may share nodes with the caller's graph (params built from leaves).
                gs = torch.autograd.grad(y, params, grad_outputs=-lam.detach(), allow_unused=True,
                                         retain_graph=True)
            else:
                gs = (None,) * len(params)
        ctx.spec = spec
        ctx.save_for_backward(lam, x)
        return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(gs, params))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *vs):
        spec = ctx.spec
        lam, x = ctx.saved_tensors
        params = spec.params
        with torch.enable_grad():
            lam_l = lam.detach().requires_grad_(True)
            x_l = x.detach().requires_grad_(True)
            y = spec.op @ x_l
            gs = torch.autograd.grad(y, params, grad_outputs=-lam_l, create_graph=True, allow_unused=True,
                                     retain_graph=True)
            terms = [(g * v).sum() for g, v in zip(gs, vs) if g is not None and v is not None]
            if not terms:
                return (None, None, None) + (None,) * len(params)
            s = torch.stack(terms).sum()
            out = torch.autograd.grad(s, (lam_l, x_l) + tuple(params), allow_unused=True, retain_graph=True)
        return (None,) + tuple(out)


def _nested_forward_mode() -> bool:
    """Whether an outer torch.func.jvp (or jacfwd) transform encloses this jvp rule: torch
    then drops the rule's own dependence on the primals, so a second forward derivative
    would come out silently wrong. torch exposes this only through private names."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    # The rule runs under the jvp interpreter that calls it; another one below it is an outer jvp.
    jvps = [i for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp]
    return len(jvps) > 1


def _tangent_solve(spec: _Spec, dr):
    """``A^-1 dr``, the tangent of forward mode: the method and options of the primal solve."""
    if _nested_forward_mode():
        raise NotImplementedError("solve: forward mode over forward mode (torch.func.jvp of a jvp, "
                                  "jacfwd of jacfwd) is not supported: torch would drop the second-order "
                                  "terms; differentiate the outer level in reverse mode instead")
    options = {key: value for key, value in spec.options.items() if key not in ("x0", "callback")}
    # Through solve(), so that a batch of tangents (jacfwd) is one solve with more columns.
    tangent = solve(spec.op, dr, spec.method, params=(), **options)
    if not _mapped(dr) and not tangent.converged:
        warnings.warn(f"solve: the tangent solve of forward mode did not converge, so the derivative "
                      f"is inaccurate: {tangent.status}", RuntimeWarning, stacklevel=2)
    return tangent.x


class _Tangent(Function):
    """``x`` unchanged; its tangent ``A^-1 dr`` for ``r = b - A x`` (``dr = db - dA x``): one
    forward solve. Reverse mode passes through to x."""

    @staticmethod
    def forward(spec: _Spec, x, r):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[0]

    @staticmethod
    def jvp(ctx, _, dx, dr):
        return _tangent_solve(ctx.spec, dr)

    @staticmethod
    def vmap(info, in_dims, spec, x, r):
        return x, in_dims[1]

    @staticmethod
    def backward(ctx, grad):
        return None, grad, None


def _wrapped(t) -> bool:
    """Whether ``t`` is a torch.func transform's tensor (no public test exists)."""
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _mapped(t) -> bool:
    """Whether torch.func.vmap maps ``t`` at some level (under a jvp or grad wrapper too)."""
    while _wrapped(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def _dual_level() -> bool:
    """Whether a forward-mode dual level is open (torch keeps it in a private name)."""
    return getattr(fwAD, "_current_level", -1) >= 0


def _has_tangent(t) -> bool:
    """Whether forward mode sees a tangent on the tensor ``t``."""
    return _dual_level() and isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None


def _operator_tangent(op) -> bool:
    """Whether A's matvec carries a forward-mode tangent (one probe matvec, only under a dual level)."""
    if not _dual_level():
        return False
    return _has_tangent(op @ torch.ones(int(op.shape[1]), dtype=op.dtype, device=op.device))


def solve(A, b, method="cg", *, params=None, **options):
    """Solve ``A x = b`` with a Krylov method, differentiably in ``b`` and in A's tensors.

    Parameters
    ----------
    A : operator or Tensor, shape (n, n)
        Anything the chosen method accepts.
    b : Tensor, shape (n,) or (n, k)
    method : {"cg", "minres", "gmres", "bicgstab"}
        The solver, used for the forward solve and for the adjoint solve of
        the backward pass. For least squares use ``lstsq`` (LSMR with its
        own implicit gradient).
    params : tuple of Tensor, optional
        The tensors A's matvec depends on, for gradients with respect to
        them. When omitted they are taken from ``A._differentiable_tensors()``
        or ``A.parameters()`` if A has either; from A itself for a dense torch
        tensor; otherwise (with grad enabled) from one probe matvec, whose
        autograd graph is searched for leaf tensors that require grad.
    **options
        Passed to the method: ``x0``, ``rtol``, ``atol``, ``maxiter``, ``M``,
        ``callback``, ``check_every``, ``shift`` (minres), ``restart`` (gmres).
        Use tight tolerances when the gradient matters.

    Returns
    -------
    SolveResult
        Its ``x`` is differentiable.

    Raises
    ------
    ValueError
        For an unknown method, or any error the method raises.
    TypeError
        If a non-symmetric method needs ``A.T`` for the backward pass and A
        has none, or params holds a non-tensor.

    Notes
    -----
    Implicit function theorem: with ``A(theta) x = b`` and an incoming
    gradient ``g = dL/dx``, the backward pass solves ``A^H lam = g`` once
    (the same method and options, without x0 and callback; ``A`` itself for
    cg, minres (which assume a Hermitian A) or a real ``A.is_symmetric``
    operator, else the adjoint, ``A.H`` or ``A.T``; the preconditioner is
    replaced by its adjoint or re-bound to it), then returns
    ``dL/db = lam`` and ``dL/dtheta = -lam^H (dA/dtheta) x``, computed by
    autograd on one matvec ``A @ x`` with x held fixed. A complex b with a
    real A makes the solve complex (A is applied to real and imaginary
    parts); gradients follow torch's convention for complex tensors. The backward pass
    calls ``solve`` itself, so ``create_graph=True`` and double backward work
    when the matvec is twice differentiable. The gradient is exact only to
    the solver's tolerance; a backward solve that does not converge emits a
    RuntimeWarning. ``x0`` receives no gradient.

    Forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``) solves
    ``A dx = db - dA x`` once more, with the same method and options, where
    ``dA x`` is the tangent of one matvec ``A @ x`` (A's tensors carry their
    own tangents; a tangent on b alone is one solve ``A dx = db``).
    ``torch.func.vmap`` over b is one solve with the batch as more columns,
    so ``jacrev``, ``jacfwd``, ``hessian`` and ``jvp(grad(...))`` in b are
    a few solves with many columns. Forward over forward, vmap over A and
    reverse mode under torch.func w.r.t. A's tensors raise
    NotImplementedError (docs/forward-mode.md).

    Examples
    --------
    >>> import torch
    >>> from solvers import solve
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> x = solve(A, b, "cg", rtol=1e-12).x
    >>> x.sum().backward()
    >>> torch.allclose(b.grad, torch.linalg.solve(A.detach().T, torch.ones(2, dtype=torch.float64)))
    True
    """
    if not isinstance(method, str) or method not in _METHODS:
        if method == "lsmr":
            raise ValueError("solve: method='lsmr' is not supported here: least squares has its own "
                             "gradient formulas; use solvers.lstsq(A, b, damp=...), which runs LSMR and "
                             "differentiates it")
        raise ValueError(f"solve: unknown method {method!r}; expected one of 'cg', 'minres', 'gmres', "
                         "'bicgstab'")
    if isinstance(A, torch.Tensor) and _mapped(A):
        raise NotImplementedError("solve: torch.func.vmap over the operator A is not supported (one Krylov solve "
                                  "serves one operator); map over the right-hand side b only (a batch of b is "
                                  "one solve with more columns), or loop over the operators")
    op = as_operator(A, caller="solve")
    if (isinstance(b, torch.Tensor) and b.dtype in COMPLEX_DTYPES and op.dtype in REAL_DTYPES
            and b.dtype == complex_of(op.dtype)):
        # A complex b with a real A: the solve, and the VJP's product A x, run in complex.
        op = promote(op, b.dtype)
    found = operator_params(op, params)
    # A b mapped by torch.func.vmap (or jacrev, jacfwd) goes through _Solve, whose vmap rule
    # solves the whole batch as columns (the Krylov loop's stopping tests read values back,
    # which vmap refuses) and sees forward tangents below the mapped level.
    mapped = isinstance(b, torch.Tensor) and _mapped(b)
    # A tangent on b alone is _Solve's jvp rule (whatever the transforms above or below it);
    # one in A's matvec is seen outside any Function only, by _Tangent.
    forward = not mapped and _operator_tangent(op)
    if forward:
        b_dual, b = b, fwAD.unpack_dual(b).primal
    needs_grad = torch.is_grad_enabled() and (
        (isinstance(b, torch.Tensor) and b.requires_grad) or any(p.requires_grad for p in found))
    if not needs_grad and not forward and not mapped and not _has_tangent(b):
        return _METHODS[method](op, b, **options)
    # cg and minres assume a Hermitian A; a symmetric complex A is not its own adjoint.
    symmetric = method in _SYMMETRIC_METHODS or (
        op.dtype not in COMPLEX_DTYPES and bool(getattr(op, "is_symmetric", False)))
    if symmetric:
        adj = op
    else:
        try:
            transformed = torch._C._functorch.maybe_current_level() is not None   # under torch.func
            adj = _DenseAdjoint(op) if (transformed and type(op) is DenseOperator and op.dtype in REAL_DTYPES) \
                else adjoint(op)
        except (AttributeError, NotImplementedError) as err:
            raise TypeError(f"solve: method={method!r} needs A.T for the backward pass, but A "
                            f"({type(op).__name__}) has none ({err}); give the operator an adjoint, declare "
                            "is_symmetric=True, or use method='cg'/'minres' for a symmetric A") from None
    adjoint_options = {key: value for key, value in options.items() if key not in ("x0", "callback")}
    adjoint_options["M"] = _adjoint_preconditioner(options.get("M"), symmetric)
    spec = _Spec(op=op, adjoint=adj, method=method, options=dict(options), adjoint_options=adjoint_options,
                 params=found)
    # A Function's forward runs with forward mode off, so the Krylov loop sees A's primal.
    x = _Solve.apply(spec, b, *found)
    if forward:
        # Outside any Function, forward mode sees A's own tangents: r's is db - dA x.
        r = b_dual - op @ fwAD.unpack_dual(x).primal
        x = _Tangent.apply(spec, x, r)
    return dataclasses.replace(spec.result, x=x)
