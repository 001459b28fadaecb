"""Incomplete factorisations with zero fill, IC(0) and ILU(0), as preconditioners.

``ichol0(A)`` computes a lower triangular L on the pattern of A's lower
triangle with ``(L L^H)_ij = A_ij`` wherever A has an entry (i <= j); the
preconditioner is ``M = (L L^H)^-1``, applied by two sparse triangular
solves. ``ilu0(A)`` computes a unit lower L and an upper U on A's pattern
with ``(L U)_ij = A_ij`` on it; ``M = U^-1 L^-1``.

The factorisation is the textbook one, entry by entry,

    L_ij = (A_ij - sum_{k < j} L_ik conj(L_jk)) / L_jj,
    L_ii = sqrt(A_ii - sum_{k < i} |L_ik|^2)                 (IC(0))

    F_ij = (A_ij - sum_{m < min(i, j)} F_im F_mj) / (F_jj if i > j else 1)   (ILU(0))

with the sums over the pattern only, but scheduled for vectorised
execution: every term of every sum (a "triple": the entry it updates and
the two entries it multiplies) is listed once; the rows are grouped in the
levels of the lower triangle (``row_levels``: a row waits for the rows its
entries point to), and the entries of a row by how many of their own row's
entries they wait for. Each group is then a handful of torch operations on
all its entries at once. A 2-D five-point Laplacian on a g x g grid has
2 g - 1 row levels and two steps per level.
"""

from __future__ import annotations

import numbers

import torch

from ._operator import DenseOperator, fmt_shape
from .preconditioners import PreconditionerFactory
from .sparse import CSRPattern, csr_parts
from .triangular import TriangularSolver, row_levels

__all__ = ["ichol0", "ilu0", "IncompleteCholesky", "IncompleteLU"]

#: Candidate triples examined at once (bounds the factorisation's temporaries).
_CANDIDATES = 1 << 19


def sparse_matrix(caller: str, A):
    """``(pattern, values)`` of a square sparse A, values detached.

    A may be an operator holding a ``CSRPattern`` and its ``values``
    (otlinop's ``SparseOperator``), a torch sparse or dense tensor, or any
    object with ``to_sparse_csr()``.
    """
    pattern = getattr(A, "pattern", None)
    if isinstance(pattern, CSRPattern) and isinstance(getattr(A, "values", None), torch.Tensor):
        P, values = pattern, A.values
    else:
        if isinstance(A, DenseOperator):
            A = A.M
        if isinstance(A, torch.Tensor) and A.layout == torch.strided:
            if A.ndim != 2:
                raise ValueError(f"{caller}: A must be 2-D, got shape {fmt_shape(A.shape)}")
            A = A.to_sparse_csr()
        elif not isinstance(A, torch.Tensor):
            fn = getattr(A, "to_sparse_csr", None)
            if not callable(fn):
                raise TypeError(f"{caller}: A ({type(A).__name__}) has no sparse form; pass an "
                                "otlinop.SparseOperator, a torch sparse (or dense) tensor, or an object with "
                                "to_sparse_csr()")
            A = fn()
        P, values, _, _ = csr_parts(caller, A)
    if P.shape[0] != P.shape[1]:
        raise ValueError(f"{caller}: A must be square, got shape {fmt_shape(P.shape)}")
    return P, values.detach()


def _submatrix(P: CSRPattern, values, keep):
    """The entries where ``keep`` holds, as a pattern and values."""
    rows = P.rows(torch.int32 if P.shape[0] < 2**31 else torch.int64)[keep]
    crow = torch.zeros(P.shape[0] + 1, dtype=torch.int64, device=P.device)
    torch.cumsum(torch.bincount(rows, minlength=P.shape[0]), 0, out=crow[1:])
    del rows
    return CSRPattern(crow, P.col[keep], P.shape), values[keep]


def _diagonal_positions(caller: str, P: CSRPattern):
    """Position of (i, i) in the values for every row i; every row must store one."""
    pos, rows = P.diagonal_entries()
    n = P.shape[0]
    if rows.numel() != n:
        has = torch.zeros(n, dtype=torch.bool, device=P.device)
        has[rows] = True
        i = int((~has).nonzero()[0, 0])
        raise ValueError(f"{caller}: A has no diagonal entry in row {i}; an incomplete factorisation needs "
                         "every diagonal entry stored (store explicit zeros and pass shift > 0, or add a ridge)")
    out = torch.empty(n, dtype=torch.int64, device=P.device)
    out[rows] = pos
    return out


def _triples(P: CSRPattern, rows, cholesky: bool, index_dtype):
    """Every term of the factorisation's sums: ``(target, left, right)`` entry positions with
    ``F[target] -= F[left] * F[right]`` (conj(F[right]) for IC).

    IC(0) on the lower pattern: target (i, j), left (i, k), right (j, k), k < j.
    ILU(0): target (i, j), left (i, m), right (m, j), m < min(i, j). In both,
    left is a strictly lower entry of the target's row before it; the
    candidates are enumerated in blocks of about ``_CANDIDATES``.
    """
    n, nnz = P.shape[0], P.nnz
    col = P.col
    key = rows.long() * n + col             # sorted: rows, then columns
    lefts = torch.nonzero(col < rows).flatten()
    after = (P.crow[1:][rows[lefts].long()] - lefts - 1).to(index_dtype)   # entries after each left in its row
    lefts = lefts.to(index_dtype)
    bounds = torch.searchsorted(torch.cumsum(after, 0),
                                torch.arange(_CANDIDATES, int(after.sum()) + _CANDIDATES, _CANDIDATES,
                                             device=P.device), right=True).tolist()
    found = []
    start = 0
    for stop in bounds:
        stop = min(max(stop, start + 1), lefts.numel())
        if stop <= start:
            continue
        counts = after[start:stop]
        total = int(counts.sum())
        left = torch.repeat_interleave(lefts[start:stop].long(), counts, output_size=total)
        offsets = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=total)
        start = stop
        target = left + 1 + torch.arange(total, device=P.device) - offsets
        del offsets
        if cholesky:
            partner = col[target] * n + col[left]       # (j, k)
        else:
            partner = col[left] * n + col[target]       # (m, j)
        right = torch.searchsorted(key, partner).clamp_(max=max(nnz - 1, 0))
        hit = key[right] == partner
        found.append(tuple(t[hit].to(index_dtype) for t in (target, left, right)))
    if not found:
        empty = torch.zeros(0, dtype=index_dtype, device=P.device)
        return empty, empty, empty
    return tuple(torch.cat(parts) for parts in zip(*found))


class _Factorisation:
    """The schedule of an IC(0) or ILU(0) factorisation on a pattern, and its numeric phase.

    The schedule's index arrays are int32 when they fit (they live while the
    factorisation runs and are dropped with this object).
    """

    def __init__(self, caller: str, P: CSRPattern, cholesky: bool):
        n, nnz = P.shape[0], P.nnz
        device = P.device
        index = torch.int32 if nnz < 2**31 - 1 else torch.int64
        self.cholesky = cholesky
        diag = _diagonal_positions(caller, P)
        rows = P.rows(index)
        target, left, right = _triples(P, rows, cholesky, index)
        # How many entries of its own row each entry waits for (through its lefts): a few
        # passes of a max over the triples, as many as the longest chain within a row.
        step = torch.zeros(nnz, dtype=torch.int32, device=device)
        while target.numel():
            new = torch.zeros_like(step).scatter_reduce_(0, target.long(), step[left] + 1, "amax")
            if torch.equal(new, step):
                break
            step = new
        new = None
        steps = int(step.max()) + 1 if nnz else 1
        order, bounds = row_levels(P, lower=True)
        level = torch.empty(n, dtype=torch.int64, device=device)
        level[order] = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=device),
                                               torch.tensor(bounds, device=device).diff(), output_size=n)
        del order
        # Entries that divide by a pivot: off-diagonal ones (IC), strictly lower ones (ILU).
        fits = (len(bounds) * steps + 1) * 2 < 2**31
        group = level.to(torch.int32 if fits else torch.int64)[rows.long()]
        del level
        group.mul_(steps).add_(step).mul_(2).add_(P.col < rows)
        del step, rows
        group, perm = torch.sort(group, stable=True)
        # Where each group (and each group's dividing half) ends, read once.
        ids, counts = torch.unique_consecutive(group, return_counts=True)
        del group
        position = torch.empty(nnz, dtype=index, device=device)
        position[perm] = torch.arange(nnz, dtype=index, device=device)
        self.perm = perm.to(index)
        del perm
        ends = torch.cumsum(counts, 0)
        t_target = position[target.long()]
        del target
        t_order = torch.argsort(t_target, stable=True)
        self.t_target = t_target[t_order]
        del t_target
        self.t_left = position[left.long()][t_order]
        del left
        self.t_right = position[right.long()][t_order]
        del right, t_order
        t_ends = torch.searchsorted(self.t_target, ends.to(index))
        ids, ends, t_ends = ids.tolist(), ends.tolist(), t_ends.tolist()
        # One step per (row level, step): its entries [e0, e1), those that divide from e_div on.
        self.steps = []
        e0 = t0 = 0
        i = 0
        while i < len(ids):
            base = ids[i] // 2
            if ids[i] % 2 == 0 and i + 1 < len(ids) and ids[i + 1] // 2 == base:
                e_div, e1, t1 = ends[i], ends[i + 1], t_ends[i + 1]
                i += 2
            else:
                e1, t1 = ends[i], t_ends[i]
                e_div = e0 if ids[i] % 2 else e1
                i += 1
            self.steps.append((e0, e_div, e1, t0, t1))
            e0, t0 = e1, t1
        starts = torch.tensor([s[0] for s in self.steps], dtype=index, device=device)
        sizes = torch.tensor([s[4] - s[3] for s in self.steps], dtype=torch.int64, device=device)
        self.t_local = self.t_target - torch.repeat_interleave(starts, sizes, output_size=self.t_target.numel())
        del self.t_target
        # The pivot each dividing entry divides by: (j, j) for an entry (i, j).
        self.pivot = position[diag[P.col[self.perm.long()]]]

    def run(self, values: torch.Tensor) -> torch.Tensor:
        """The factor's values in the pattern's order (NaN or inf on breakdown)."""
        F = values[self.perm]
        right = F.conj() if (self.cholesky and F.is_complex()) else F
        for e0, e_div, e1, t0, t1 in self.steps:
            if t1 > t0:
                s = F.new_zeros(e1 - e0).index_add_(0, self.t_local[t0:t1],
                                                    F[self.t_left[t0:t1]] * right[self.t_right[t0:t1]])
                F[e0:e1] -= s
            if e_div < e1:
                F[e_div:e1] /= F[self.pivot[e_div:e1]]
            if self.cholesky and e_div > e0:
                F[e0:e_div] = F[e0:e_div].sqrt()
        out = torch.empty_like(F)
        out[self.perm] = F
        return out


def _shift(caller: str, shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not shift >= 0:
        raise ValueError(f"{caller}: shift must be a non-negative float, got {shift!r}")
    return float(shift)


def _shifted(P, values, diag_positions, shift):
    if shift == 0:
        return values
    values = values.clone()
    values[diag_positions] = values[diag_positions] * (1 + shift)
    return values


class IncompleteCholesky:
    """``M = (L L^H)^-1`` for the IC(0) factor L of a Hermitian positive definite A.

    Built by ``ichol0(A)``. Shape (n, n); Hermitian positive definite (so
    cg and minres take it); one application is two sparse triangular solves,
    O(nnz(L)) each. Attributes: ``L`` (a torch CSR tensor, lower
    triangular), ``shift``, ``method`` ("native" or "levels").
    """

    is_symmetric = True
    is_psd = True
    why_not_definite = None

    def __init__(self, pattern: CSRPattern, values: torch.Tensor, shift: float, method=None):
        self.pattern, self.factor, self.shift = pattern, values, shift
        self.shape = pattern.shape
        self.dtype, self.device = values.dtype, values.device
        self._solver = TriangularSolver(pattern, lower=True, method=method, dtype=values.dtype)
        self.method = "native" if self._solver.native else "levels"

    @property
    def L(self) -> torch.Tensor:
        return self.pattern.tensor(self.factor)

    def __matmul__(self, R):
        vector = R.ndim == 1
        R2 = R[:, None] if vector else R
        Y = self._solver.solve(self.factor, R2)
        Z = self._solver.solve(self.factor, Y, adjoint=True)
        return Z[:, 0] if vector else Z

    @property
    def H(self):
        return self

    @property
    def T(self):
        return self if not self.dtype.is_complex else _Conjugated(self)

    def __repr__(self) -> str:
        return f"ichol0(A) (n={self.shape[0]}, nnz(L)={self.pattern.nnz}, shift={self.shift:g}, {self.method})"


class IncompleteLU:
    """``M = U^-1 L^-1`` for the ILU(0) factors of a square A (L unit lower, U upper).

    Built by ``ilu0(A)``. Shape (n, n); not symmetric; ``M.H`` and ``M.T``
    apply the adjoint and the transpose (for the adjoint solves of gmres and
    bicgstab). One application is two sparse triangular solves. Attributes:
    ``LU`` (a torch CSR tensor on A's pattern holding L's strictly lower
    part and U), ``shift``, ``method``.
    """

    is_symmetric = False
    is_psd = False
    why_not_definite = "an ILU(0) preconditioner is not symmetric; use ichol0 with cg or minres"

    def __init__(self, pattern: CSRPattern, values: torch.Tensor, shift: float, method=None, *, adjoint=False,
                 solvers=None):
        self.pattern, self.factor, self.shift = pattern, values, shift
        self.shape = pattern.shape
        self.dtype, self.device = values.dtype, values.device
        self._adjoint = adjoint
        self._solvers = solvers or (
            TriangularSolver(pattern, lower=True, unit_diagonal=True, method=method, dtype=values.dtype),
            TriangularSolver(pattern, lower=False, method=method, dtype=values.dtype))
        self.method = "native" if self._solvers[0].native else "levels"

    @property
    def LU(self) -> torch.Tensor:
        return self.pattern.tensor(self.factor)

    def __matmul__(self, R):
        vector = R.ndim == 1
        R2 = R[:, None] if vector else R
        lower, upper = self._solvers
        if self._adjoint:     # M^H = L^-H U^-H
            Z = lower.solve(self.factor, upper.solve(self.factor, R2, adjoint=True), adjoint=True)
        else:
            Z = upper.solve(self.factor, lower.solve(self.factor, R2))
        return Z[:, 0] if vector else Z

    @property
    def H(self):
        return IncompleteLU(self.pattern, self.factor, self.shift, adjoint=not self._adjoint, solvers=self._solvers)

    @property
    def T(self):
        return self.H if not self.dtype.is_complex else _Conjugated(self.H)

    def __repr__(self) -> str:
        return (f"ilu0(A){'.H' if self._adjoint else ''} (n={self.shape[0]}, nnz={self.pattern.nnz}, "
                f"shift={self.shift:g}, {self.method})")


class _Conjugated:
    """``conj(M)``: the transpose of a complex preconditioner whose adjoint is ``M``."""

    def __init__(self, M):
        self._M = M
        self.shape, self.dtype, self.device = M.shape, M.dtype, M.device
        self.is_symmetric = M.is_symmetric

    def __matmul__(self, R):
        return (self._M @ R.conj()).conj()


def _breakdown(caller: str, F, diag_positions, cholesky: bool):
    bad = ~torch.isfinite(F)
    pivots = F[diag_positions]
    # A breakdown's NaN spreads to the rows after it: the first bad pivot is where it happened.
    bad_pivot = ~torch.isfinite(pivots) | ((pivots.real <= 0) if cholesky else (pivots == 0))
    if bool(bad.any()) or bool(bad_pivot.any()):
        i = int(bad_pivot.nonzero()[0, 0]) if bool(bad_pivot.any()) else -1
        where = f" at row {i}" if i >= 0 else ""
        what = "a non-positive pivot" if cholesky else "a zero pivot"
        raise ValueError(f"{caller}: the incomplete factorisation broke down ({what}{where}); A is not "
                         f"{'positive definite enough for IC(0)' if cholesky else 'an M-matrix'}: pass shift > 0 "
                         "(factors A + shift * Diag(diag(A))), or use jacobi")


def _build_ichol0(A, shift: float, method):
    caller = "ichol0"
    P, values = sparse_matrix(caller, A)
    lower_pattern, lower_values = _submatrix(P, values, P.col <= P.rows(torch.int32 if P.shape[0] < 2**31 else
                                                                          torch.int64))
    diag = _diagonal_positions(caller, lower_pattern)
    F = _Factorisation(caller, lower_pattern, cholesky=True).run(_shifted(lower_pattern, lower_values, diag, shift))
    _breakdown(caller, F, diag, cholesky=True)
    return IncompleteCholesky(lower_pattern, F, shift, method)


def _build_ilu0(A, shift: float, method):
    caller = "ilu0"
    P, values = sparse_matrix(caller, A)
    diag = _diagonal_positions(caller, P)
    F = _Factorisation(caller, P, cholesky=False).run(_shifted(P, values, diag, shift))
    _breakdown(caller, F, diag, cholesky=False)
    return IncompleteLU(P, F, shift, method)


def ichol0(A=None, *, shift: float = 0.0, method=None):
    """The incomplete Cholesky preconditioner with zero fill, IC(0).

    Parameters
    ----------
    A : SparseOperator, Tensor (sparse or dense), shape (n, n), optional
        Hermitian positive definite; only its lower triangle is read.
        Without it, return a factory that a solver binds to its own A
        (``cg(A, b, M=ichol0())``); with it, the bound preconditioner.
    shift : float, default 0
        Factor ``A + shift * Diag(diag(A))`` instead (Manteuffel's shift),
        for matrices on which IC(0) breaks down.
    method : {None, "native", "levels"}
        How the triangular solves run (see ``spsolve_triangular``).

    Returns
    -------
    PreconditionerFactory or IncompleteCholesky
        ``M = (L L^H)^-1``, Hermitian positive definite, ``M @ r`` for r of
        shape (n,) or (n, k).

    Raises
    ------
    ValueError
        A is not square, a diagonal entry is not stored, ``shift`` is
        negative, or the factorisation breaks down (a non-positive pivot:
        the message suggests a shift).
    TypeError
        A has no sparse form.

    Notes
    -----
    ``L_ij = (A_ij - sum_{k<j} L_ik conj(L_jk)) / L_jj`` on the pattern of
    A's lower triangle, ``L_ii = sqrt(A_ii - sum_{k<i} |L_ik|^2)``: exact
    IC(0) (no drop tolerance, no fill), vectorised over the levels of the
    lower triangle (module docstring). It exists for M-matrices (discrete
    Laplacians, diagonally dominant matrices); on other SPD matrices it may
    break down. Memory: L's values and pattern, about half of A's. One
    application costs two triangular solves with L (torch's own on the CPU
    with MKL and on CUDA, a level schedule elsewhere). The factorisation
    reads A's values detached: no gradient flows through M (the solution of
    a preconditioned solve does not depend on M).

    Examples
    --------
    >>> import torch
    >>> from solvers import cg, ichol0
    >>> A = torch.tensor([[4.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 4.0]], dtype=torch.float64)
    >>> res = cg(A, torch.ones(3, dtype=torch.float64), M=ichol0(A), rtol=1e-12)
    >>> res.n_iter                          # IC(0) of a tridiagonal matrix is exact
    1
    """
    shift = _shift("ichol0", shift)
    if A is None:
        return PreconditionerFactory(lambda op: _build_ichol0(op, shift, method), "ichol0()")
    return _build_ichol0(A, shift, method)


def ilu0(A=None, *, shift: float = 0.0, method=None):
    """The incomplete LU preconditioner with zero fill, ILU(0).

    Parameters
    ----------
    A : SparseOperator, Tensor (sparse or dense), shape (n, n), optional
        Square, with every diagonal entry stored. Without it, return a
        factory that a solver binds to its own A (``gmres(A, b, M=ilu0())``);
        with it, the bound preconditioner.
    shift : float, default 0
        Factor ``A + shift * Diag(diag(A))`` instead.
    method : {None, "native", "levels"}
        How the triangular solves run (see ``spsolve_triangular``).

    Returns
    -------
    PreconditionerFactory or IncompleteLU
        ``M = U^-1 L^-1``, with ``M.H`` and ``M.T``.

    Raises
    ------
    ValueError
        A is not square, a diagonal entry is not stored, or a pivot is zero.
    TypeError
        A has no sparse form.

    Notes
    -----
    ``F_ij = (A_ij - sum_{m<min(i,j)} F_im F_mj) / (F_jj if i > j else 1)``
    on A's pattern: L is F's strictly lower part plus the identity, U its
    upper part. Not symmetric: use it with gmres or bicgstab (for a
    Hermitian positive definite A, ``ichol0`` keeps cg applicable).

    Examples
    --------
    >>> import torch
    >>> from solvers import gmres, ilu0
    >>> A = torch.tensor([[4.0, -2.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -3.0, 4.0]], dtype=torch.float64)
    >>> gmres(A, torch.ones(3, dtype=torch.float64), M=ilu0(A), rtol=1e-12).n_iter   # exact on a tridiagonal A
    1
    """
    shift = _shift("ilu0", shift)
    if A is None:
        return PreconditionerFactory(lambda op: _build_ilu0(op, shift, method), "ilu0()")
    return _build_ilu0(A, shift, method)
