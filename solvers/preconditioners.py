"""Jacobi and truncated-Neumann preconditioners, and the factory that binds them.

A solver's ``M`` may be an operator, a dense tensor, a callable ``r -> M r``
or a ``PreconditionerFactory`` such as ``jacobi()`` or ``neumann(3)``, which
the solver binds to its ``A``. ``jacobi(A)`` and ``neumann(3, A)`` bind at
once and return the operator.
"""

from __future__ import annotations

import numbers
from typing import Callable

import torch

from ._operator import adjoint, as_operator, fmt_shape

__all__ = ["PreconditionerFactory", "jacobi", "neumann"]


class PreconditionerFactory:
    """A preconditioner recipe that a solver binds to its operator.

    Parameters
    ----------
    build : callable
        ``build(A) -> operator`` of shape (n, n) approximating ``A^-1``; A is
        any operator (``as_operator`` has already been applied).
    name : str
        How the factory prints, e.g. ``"neumann(3)"``.

    Notes
    -----
    Solvers call ``M.bind(A)`` when ``M`` has a ``bind`` method and is not
    an operator itself; ``solve`` binds the same factory to ``A.T`` for the
    adjoint solve of a non-symmetric method.

    Examples
    --------
    >>> import torch
    >>> from solvers import PreconditionerFactory, cg
    >>> scaled = PreconditionerFactory(lambda A: torch.diag(1 / A.diagonal()), "my_jacobi")
    >>> A = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
    >>> cg(A, torch.ones(3, dtype=torch.float64), M=scaled).n_iter
    1
    """

    def __init__(self, build: Callable, name: str):
        if not callable(build):
            raise TypeError(f"PreconditionerFactory: build must be callable as build(A), got "
                            f"{type(build).__name__}")
        self._build = build
        self._name = str(name)

    def bind(self, A):
        """Return the preconditioner for ``A`` (an operator of shape (n, n))."""
        return self._build(as_operator(A, caller=self._name))

    def __repr__(self) -> str:
        return self._name


def _square(caller: str, A) -> int:
    n, m = (int(s) for s in A.shape)
    if n != m:
        raise ValueError(f"{caller}: A must be square, got shape {fmt_shape(A.shape)}")
    return n


def _check_vector(caller: str, name: str, d, n: int, A) -> tuple[torch.Tensor, bool]:
    """``d`` checked (shape, dtype, finite, no zero); also whether it has an entry that is
    not a positive real (negative, or complex with a nonzero imaginary part)."""
    if not isinstance(d, torch.Tensor) or d.ndim != 1 or d.shape[0] != n:
        got = fmt_shape(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ValueError(f"{caller}: {name} must be a tensor of shape ({n},), got {got}")
    if d.dtype != A.dtype:
        raise TypeError(f"{caller}: {name} has dtype {d.dtype}, but A has dtype {A.dtype}")
    bad, zero = ~torch.isfinite(d), d == 0
    not_positive = (d.real < 0) | (d.imag != 0) if d.is_complex() else d < 0
    # One host synchronisation for both checks (and the sign, which jacobi reads).
    any_bad, any_zero, any_negative = torch.stack([bad.any(), zero.any(), not_positive.any()]).tolist()
    if any_bad:
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{caller}: {name} has a non-finite entry at index {i}")
    if any_zero:
        i = int(zero.nonzero()[0, 0])
        raise ValueError(f"{caller}: {name} has a zero entry at index {i}; the preconditioner needs a "
                         "nonzero diagonal (add a ridge, or use another M)")
    return d, any_negative


def _diagonal(caller: str, A) -> tuple[torch.Tensor, bool]:
    n = _square(caller, A)
    fn = getattr(A, "diagonal", None)
    if fn is None:
        raise TypeError(f"{caller}: A ({type(A).__name__}) has no diagonal() method; pass the operator as "
                        "an otlinop operator with a cheap diagonal, or build M yourself")
    try:
        d = fn()
    except NotImplementedError as err:
        raise TypeError(f"{caller}: A ({type(A).__name__}) provides no cheap diagonal ({err})") from None
    return _check_vector(caller, "diag(A)", d, n, A)   # (d, whether d has a negative entry)


class _DiagonalPreconditioner:
    """``Diag(inv)``: symmetric, shape (n, n), O(n) per application."""

    is_symmetric = True

    def __init__(self, inv: torch.Tensor, name: str, why_not_definite: str | None):
        self._inv = inv
        self._name = name
        self.shape = (inv.shape[0], inv.shape[0])
        self.dtype = inv.dtype
        self.device = inv.device
        # Read by the solvers that need an SPD preconditioner (bind_preconditioner).
        self.why_not_definite = why_not_definite
        self.is_psd = why_not_definite is None

    def __matmul__(self, V):
        return self._inv * V if V.ndim == 1 else self._inv[:, None] * V

    @property
    def T(self):
        return self

    @property
    def H(self):
        if not self._inv.is_complex():
            return self
        return _DiagonalPreconditioner(self._inv.conj(), self._name + ".H", self.why_not_definite)

    def diagonal(self) -> torch.Tensor:
        return self._inv

    def __repr__(self) -> str:
        return self._name


def jacobi(A=None):
    """The Jacobi preconditioner ``M = diag(A)^-1``.

    Parameters
    ----------
    A : operator or Tensor, shape (n, n), optional
        Without it, return a factory that a solver binds to its own A
        (``cg(A, b, M=jacobi())``); with it, the bound preconditioner.

    Returns
    -------
    PreconditionerFactory or operator
        The operator is symmetric, with ``M @ v`` and ``M.diagonal()``.

    Raises
    ------
    ValueError
        If diag(A) has a zero or non-finite entry, or A is not square. cg and
        minres also refuse it when diag(A) has a negative entry (M would not
        be positive definite).
    TypeError
        If A has no cheap ``diagonal()``.

    Notes
    -----
    One application costs n multiplications. It helps most when A is badly
    scaled (diagonal entries spanning orders of magnitude); for the Sinkhorn
    Schur complement, use ``diag(S)_j = bh_j - sum_i P_ij^2 / ah_i``, not
    ``bh`` (docs/math.md section 5).

    Examples
    --------
    >>> import torch
    >>> from solvers import cg, jacobi
    >>> A = torch.tensor([[100.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    >>> (jacobi(A) @ torch.ones(2, dtype=torch.float64)).tolist()
    [0.01, 1.0]
    >>> cg(A, torch.ones(2, dtype=torch.float64), M=jacobi()).converged
    True
    """
    if A is None:
        return PreconditionerFactory(_bind_jacobi, "jacobi()")
    return _bind_jacobi(as_operator(A, caller="jacobi"))


def _bind_jacobi(A):
    d, negative = _diagonal("jacobi", A)
    why = None
    if negative and d.is_complex():
        i = int(((d.real <= 0) | (d.imag != 0)).nonzero()[0, 0])
        why = f"diag(A) has an entry {complex(d[i]):.3g} at index {i} that is not a positive real"
    elif negative:
        i = int((d <= 0).nonzero()[0, 0])
        why = f"diag(A) has a negative entry {float(d[i]):.3g} at index {i}"
    return _DiagonalPreconditioner(1.0 / d, "jacobi(A)", why)


class _JacobiRemainder:
    """``N = Diag(d) - A``: the remainder of the Jacobi splitting; one A matvec each."""

    def __init__(self, A, d: torch.Tensor):
        self._A, self._d = A, d
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device
        self.is_symmetric = bool(getattr(A, "is_symmetric", False))

    def __matmul__(self, V):
        d = self._d if V.ndim == 1 else self._d[:, None]
        return d * V - self._A @ V

    @property
    def T(self):
        return _JacobiRemainder(self._A.T, self._d)

    @property
    def H(self):
        return _JacobiRemainder(adjoint(self._A), self._d.conj())


class _NeumannPreconditioner:
    """``M = D^-1/2 (sum_{k<=terms} T^k) D^-1/2``, T = D^-1/2 N D^-1/2 (signed for negative
    or complex D).

    Shape (n, n); ``terms`` N-matvecs per application; symmetric when D > 0
    and N is symmetric.
    """

    def __init__(self, D: torch.Tensor, N, terms: int, name: str):
        self._D, self._N, self._terms, self._name = D, N, terms, name
        self.shape = (D.shape[0], D.shape[0])
        self.dtype, self.device = D.dtype, D.device
        if D.is_complex():
            positive = bool(((D.real > 0) & (D.imag == 0)).all())
        else:
            positive = bool((D > 0).all())
        self._s = D.abs().rsqrt()
        # With D = S|D| (S = sign(D), or D/|D| for complex D) the series equals
        # |D|^-1/2 (sum (S^-1 T)^k) S^-1 |D|^-1/2 exactly; S^-1 = S for a real sign.
        if positive:
            self._sign = None
        else:
            self._sign = torch.sgn(D).conj() if D.is_complex() else torch.sign(D)
        self.is_symmetric = positive and bool(getattr(N, "is_symmetric", False))
        # Even terms: the eigenvalues (1 - t^(K+1)) / (1 - t) of sum T^k are positive for every real t.
        # (A complex symmetric N need not be Hermitian: no claim then.)
        self.is_psd = self.is_symmetric and terms % 2 == 0 and not D.is_complex()
        if positive:
            self.why_not_definite = None
        elif D.is_complex():
            self.why_not_definite = "the splitting's D has entries that are not positive reals"
        else:
            self.why_not_definite = "the splitting's D has negative entries"

    def __matmul__(self, Rv):
        s = self._s if Rv.ndim == 1 else self._s[:, None]
        sign = self._sign if (self._sign is None or Rv.ndim == 1) else self._sign[:, None]
        Y = s * Rv
        if sign is not None:
            Y = sign * Y
        Z = Y
        # Horner: sum_{k=0..K} U^k y = y + U (y + U (...)), K matvecs with N.
        for _ in range(self._terms):
            W = s * (self._N @ (s * Z))
            Z = Y + (W if sign is None else sign * W)
        return s * Z

    @property
    def T(self):
        if self.is_symmetric:
            return self
        return _NeumannPreconditioner(self._D, self._N.T, self._terms, self._name + ".T")

    @property
    def H(self):
        if not self._D.is_complex():
            return self.T
        return _NeumannPreconditioner(self._D.conj(), adjoint(self._N), self._terms, self._name + ".H")

    def __repr__(self) -> str:
        return self._name


def neumann(terms=3, A=None):
    """Truncated Neumann-series preconditioner on a splitting ``A = Diag(D) - N``.

    Parameters
    ----------
    terms : int
        K >= 0; ``M = sum_{k=0..K} (D^-1 N)^k D^-1``. ``neumann(0)`` is the
        diagonal preconditioner ``D^-1``.
    A : operator, Tensor or tuple (D, N), optional
        Without it, return a factory that a solver binds to its own A
        (``cg(A, b, M=neumann(3))``). With an operator, the splitting is
        ``A.splitting()`` when the operator provides one, else the Jacobi
        splitting ``D = diag(A)``, ``N = Diag(D) - A``. A pair ``(D, N)``
        (D of shape (n,), N an operator) gives the splitting directly.

    Returns
    -------
    PreconditionerFactory or operator
        The operator accepts (n,) and (n, k) inputs and has ``.T``.

    Raises
    ------
    ValueError
        If ``terms`` is not a non-negative int, A is not square, or D has a
        zero or non-finite entry. cg and minres refuse a D with negative
        entries.
    TypeError
        If A has neither ``splitting()`` nor a cheap ``diagonal()``.

    Notes
    -----
    Applied in the symmetric form of docs/math.md section 5,
    ``M = D^-1/2 (sum_{k=0..K} T^k) D^-1/2`` with ``T = D^-1/2 N D^-1/2``:
    equal to the series above, but visibly symmetric when D > 0 and N is
    symmetric, so plain preconditioned CG and MINRES stay valid. Never run
    CG on the left-scaled system ``(I - D^-1 N) x = D^-1 b``: it is not
    symmetric. Cost: K matvecs with N per application (for the Jacobi
    splitting, each is one matvec with A).

    ``M`` approximates ``A^-1`` only when ``spec(T)`` lies in (-1, 1): for a
    strictly diagonally dominant A, or the Sinkhorn Schur complement
    ``S = D - P^T A^-1 P`` with ``D = ky diag(bh) + ridge`` (then spec(T) is
    in [0, 1)). For a symmetric T, M is positive definite whenever K is
    even, and for odd K when spec(T) > -1.

    Examples
    --------
    >>> import torch
    >>> from solvers import cg, neumann
    >>> A = torch.tensor([[4.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 4.0]], dtype=torch.float64)
    >>> b = torch.ones(3, dtype=torch.float64)
    >>> cg(A, b, rtol=1e-10, M=neumann(3)).converged
    True
    """
    if isinstance(terms, bool) or not isinstance(terms, numbers.Integral) or terms < 0:
        raise ValueError(f"neumann: terms must be a non-negative int, got {terms!r}")
    terms = int(terms)
    name = f"neumann({terms})"
    if A is None:
        return PreconditionerFactory(lambda op: _bind_neumann(op, terms, name), name)
    if isinstance(A, tuple):
        if len(A) != 2:
            raise ValueError(f"neumann: a splitting must be a pair (D, N), got a tuple of length {len(A)}")
        D, N = A
        N = as_operator(N, name="N", caller="neumann")
        n = _square("neumann", N)
        return _NeumannPreconditioner(_check_vector("neumann", "D", D, n, N)[0], N, terms, name)
    return _bind_neumann(as_operator(A, caller="neumann"), terms, name)


def _bind_neumann(A, terms: int, name: str):
    n = _square("neumann", A)
    split = getattr(A, "splitting", None)
    pair = None
    if split is not None:
        try:
            pair = split()
        except NotImplementedError:
            pair = None
    if pair is None:
        d, _ = _diagonal("neumann", A)
        pair = (d, _JacobiRemainder(A, d))
    D, N = pair
    N = as_operator(N, name="N", caller="neumann")
    return _NeumannPreconditioner(_check_vector("neumann", "D", D, n, A)[0], N, terms, name)
