"""``lstsq``: damped least squares by LSMR, differentiated by the implicit function theorem."""

from __future__ import annotations

import dataclasses
import numbers
import warnings

import torch

from ._function import Function
from ._operator import adjoint, as_operator
from .cg import cg
from .lsmr import lsmr
from .solve import operator_params

__all__ = ["lstsq"]


class _NormalOperator:
    """``A^H A + damp^2 I``, shape (m, m), Hermitian positive semi-definite; two products each."""

    is_symmetric = True
    is_psd = True

    def __init__(self, A, AH, damp: float):
        self._A, self._AH, self._damp2 = A, AH, damp * damp
        m = int(A.shape[1])
        self.shape, self.dtype, self.device = (m, m), A.dtype, A.device

    def __matmul__(self, V):
        out = self._AH @ (self._A @ V)
        return out + self._damp2 * V if self._damp2 else out


@dataclasses.dataclass
class _Spec:
    op: object
    AH: object
    damp: float
    options: dict
    adjoint_rtol: float
    params: tuple
    result: object = None


class _Lstsq(Function):
    """x = argmin ||A x - b||^2 + damp^2 ||x||^2; backward: one solve with A^H A + damp^2 I."""

    @staticmethod
    def forward(ctx, spec: _Spec, b, *params):
        spec.result = lsmr(spec.op, b, damp=spec.damp, **spec.options)
        ctx.spec = spec
        ctx.save_for_backward(b, spec.result.x)
        return spec.result.x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        spec = ctx.spec
        b, x = ctx.saved_tensors
        normal = _NormalOperator(spec.op, spec.AH, spec.damp)
        m = normal.shape[0]
        adj = cg(normal, g, rtol=spec.adjoint_rtol, maxiter=max(10 * m, 100))
        if not adj.converged:
            warnings.warn(f"lstsq: the adjoint solve of the backward pass did not converge, so the gradient is "
                          f"inaccurate: {adj.status}", RuntimeWarning, stacklevel=2)
        lam = adj.x
        with torch.no_grad():
            A_lam = spec.op @ lam
        grads = [None] * len(spec.params)
        if spec.params and any(ctx.needs_input_grad[2:]):
            # dL/dA = -(r lam^H + (A lam) x^H) with r = A x - b: one product of A with [lam, x].
            vector = x.ndim == 1
            V = torch.stack([lam, x], 1) if vector else torch.cat([lam, x], 1)
            with torch.enable_grad():
                Y = spec.op @ V.detach()
                with torch.no_grad():
                    r = (Y[:, 1] if vector else Y[:, lam.shape[1]:]) - b
                W = torch.stack([r, A_lam], 1) if vector else torch.cat([r, A_lam], 1)
                if Y.requires_grad:
                    found = torch.autograd.grad(Y, spec.params, grad_outputs=-W, allow_unused=True)
                    grads = [torch.zeros_like(p) if d is None else d for d, p in zip(found, spec.params)]
        return (None, A_lam if ctx.needs_input_grad[1] else None, *grads)


def lstsq(A, b, *, damp=0.0, params=None, adjoint_rtol=None, **options):
    """Solve ``min ||A x - b||^2 + damp^2 ||x||^2`` by LSMR, differentiably in b and in A's tensors.

    Parameters
    ----------
    A : operator or Tensor, shape (n, m)
        Anything ``lsmr`` accepts (it needs ``A.H`` or ``A.T``): a dense
        tensor, a ``SparseOperator``, any otlinop operator with an adjoint.
    b : Tensor, shape (n,) or (n, k)
    damp : float, default 0
        Tikhonov damping. With ``damp = 0`` the gradient assumes A has full
        column rank (a unique minimiser).
    params : tuple of Tensor, optional
        The tensors A depends on, found as in ``solve`` when omitted
        (``A._differentiable_tensors()``, e.g. a ``SparseOperator``'s values).
    adjoint_rtol : float, optional
        Relative tolerance of the backward pass's CG solve (default
        ``min(atol, btol)`` of the options, at least 1e-14).
    **options
        Passed to ``lsmr``: ``x0``, ``atol``, ``btol``, ``conlim``,
        ``maxiter``, ``callback``, ``check_every``.

    Returns
    -------
    SolveResult
        LSMR's result; its ``x`` (shape (m,) or (m, k)) is differentiable.

    Raises
    ------
    ValueError, TypeError
        As ``lsmr``; also for a negative ``damp`` or a non-tensor in params.

    Notes
    -----
    At the minimiser, ``A^H (A x - b) + damp^2 x = 0``. With an incoming
    gradient ``g = dL/dx`` the backward pass solves the normal equations
    once, ``(A^H A + damp^2 I) lam = g`` (CG: two products per iteration),
    and returns ``dL/db = A lam`` and
    ``dL/dA = -(r lam^H + (A lam) x^H)``, ``r = A x - b``: for a sparse A,
    the latter is read on A's pattern only (one product of A with
    ``[lam, x]`` differentiated w.r.t. A's tensors). Exact to the
    tolerances of both solves; a backward CG that does not converge warns.
    Not twice differentiable.

    Examples
    --------
    >>> import torch
    >>> from solvers import lstsq
    >>> A = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    >>> b = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    >>> x = lstsq(A, b, atol=1e-12, btol=1e-12).x
    >>> x.sum().backward()
    >>> expected = A.detach() @ torch.linalg.solve(A.detach().T @ A.detach(), torch.ones(2, dtype=torch.float64))
    >>> torch.allclose(b.grad, expected)
    True
    """
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not damp >= 0:
        raise ValueError(f"lstsq: damp must be a non-negative float, got {damp!r}")
    damp = float(damp)
    op = as_operator(A, caller="lstsq")
    found = operator_params(op, params, caller="lstsq")
    needs_grad = torch.is_grad_enabled() and (
        (isinstance(b, torch.Tensor) and b.requires_grad) or any(p.requires_grad for p in found))
    if not needs_grad:
        return lsmr(op, b, damp=damp, **options)
    try:
        AH = adjoint(op)
    except (AttributeError, NotImplementedError) as err:
        raise TypeError(f"lstsq: A must provide its adjoint A.H or A.T ({err})") from None
    if adjoint_rtol is None:
        adjoint_rtol = max(min(float(options.get("atol", 1e-6)), float(options.get("btol", 1e-6))), 1e-14)
    spec = _Spec(op=op, AH=AH, damp=damp, options=dict(options), adjoint_rtol=float(adjoint_rtol), params=found)
    x = _Lstsq.apply(spec, b, *found)
    return dataclasses.replace(spec.result, x=x)
