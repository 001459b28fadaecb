"""Sparse triangular solves: ``spsolve_triangular`` and the ``TriangularSolver`` behind it.

Two ways to run one solve, chosen per device:

- torch's own sparse triangular solve (``torch.triangular_solve`` on a CSR
  tensor): MKL on the CPU when torch has it, cuSPARSE on CUDA;
- a level schedule, in torch, on any device: the rows are grouped into
  levels such that a row depends only on rows of earlier levels (Kahn's
  algorithm on the graph of the strictly triangular entries), and each
  level is one gather, one product and one scatter-add over its entries.
  A 2-D five-point Laplacian on a g x g grid has 2 g - 1 levels.

The backward pass of ``x = A^-1 b`` solves the transposed system once,
``lam = A^-H g``, and returns ``db = lam`` and ``dvalues[e] = -lam_i conj(x_j)``
for each entry e = (i, j) of the triangle: a gradient on A's pattern.
"""

from __future__ import annotations

import torch

from ._function import Function
from ._operator import fmt_shape
from .sparse import CSRPattern, csr_parts, csr_sampled

__all__ = ["spsolve_triangular", "TriangularSolver", "native_triangular_solve"]


def native_triangular_solve(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch solves sparse triangular systems itself on ``device`` for ``dtype``
    (cuSPARSE on CUDA, MKL on the CPU when torch was built with it)."""
    if dtype not in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.mkl.is_available()


def _segment_arange(starts, counts, total):
    """``cat([arange(s, s + c) for s, c in zip(starts, counts)])`` without a Python loop."""
    offsets = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - offsets, counts, output_size=total) + torch.arange(
        total, device=starts.device)


def row_levels(P: CSRPattern, lower: bool):
    """The rows of a triangular pattern grouped into levels.

    Returns
    -------
    order : int64 Tensor, shape (n,)
        The rows, level after level (sorted within a level).
    bounds : list of int
        ``order[bounds[l]:bounds[l + 1]]`` is level l.

    Notes
    -----
    Kahn's algorithm on the strictly triangular entries (row i waits for
    the rows j of its entries): each level is found from the previous one
    by visiting its dependants only, O(nnz) in all, plus a few small torch
    operations and one host read per level.
    """
    n = P.shape[0]
    small = torch.int32 if max(n, P.nnz) < 2**31 - 1 else torch.int64   # halves the temporaries
    rows, col = P.rows(small), P.col
    off = col < rows if lower else col > rows
    waiting_row, waited_for = rows[off], col[off].to(small)
    del rows, off
    indegree = torch.bincount(waiting_row, minlength=n)
    dependants = waiting_row[torch.argsort(waited_for, stable=True)]
    del waiting_row
    starts_of = torch.zeros(n + 1, dtype=torch.int64, device=col.device)
    torch.cumsum(torch.bincount(waited_for, minlength=n), 0, out=starts_of[1:])
    del waited_for
    frontier = torch.nonzero(indegree == 0).flatten()
    levels, sizes = [], []
    while frontier.numel():
        levels.append(frontier)
        sizes.append(frontier.numel())
        starts = starts_of[frontier]
        counts = starts_of[frontier + 1] - starts
        total = int(counts.sum())
        if total == 0:
            break
        d = dependants[_segment_arange(starts, counts, total)].long()
        indegree.index_add_(0, d, torch.full_like(d, -1))
        frontier = torch.unique(d[indegree[d] == 0])
    order = torch.cat(levels) if levels else torch.zeros(0, dtype=torch.int64, device=col.device)
    if order.numel() != n:   # pragma: no cover - a triangle has no cycle
        raise RuntimeError("row_levels: the pattern's dependency graph has a cycle")
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return order, bounds


class _Levels:
    """The entries of a triangular pattern ordered for a level-scheduled solve by A
    (``adjoint=False``: grouped by the level of their row) or by A^H (by the level of
    their column, levels taken in reverse)."""

    def __init__(self, P: CSRPattern, lower: bool, order, bounds, adjoint: bool):
        n = P.shape[0]
        position = torch.empty_like(order)
        position[order] = torch.arange(n, device=order.device)
        rows, col = P.rows(), P.col
        entries = torch.nonzero(col < rows if lower else col > rows).flatten()
        target, source = position[rows[entries]], position[col[entries]]
        if adjoint:
            target, source = source, target
        by_target = torch.argsort(target, stable=True)
        self.entries = entries[by_target]                 # positions in the values
        self.target = target[by_target]
        self.source = source[by_target]
        ends = torch.searchsorted(self.target, torch.tensor(bounds, device=order.device)).tolist()
        spans = list(zip(bounds[:-1], bounds[1:], ends[:-1], ends[1:]))
        self.spans = spans[::-1] if adjoint else spans
        # Local row of each entry within its level (for index_add_ on the level's slice).
        level_start = torch.repeat_interleave(torch.tensor(bounds[:-1], device=order.device),
                                              torch.tensor([e1 - e0 for _, _, e0, e1 in spans], device=order.device))
        self.local = self.target - level_start


class TriangularSolver:
    """Solves with the triangle of a sparse square matrix, its pattern analysed once.

    Parameters
    ----------
    pattern : CSRPattern, shape (n, n)
    lower : bool
        Use the lower (else upper) triangle; entries of the other triangle
        are ignored.
    unit_diagonal : bool
        Take the diagonal as ones (stored diagonal entries are ignored).
    method : {None, "native", "levels"}
        None: torch's own solve where it exists (``native_triangular_solve``),
        else the level schedule. "levels" forces the schedule (any device).
    dtype : torch.dtype, optional
        The values' dtype, for the choice of method.

    Notes
    -----
    ``solve(values, B, adjoint=False)`` returns ``A^-1 B`` (``A^-H B`` with
    ``adjoint``), B of shape (n, k), without autograd; ``apply`` is the
    same solve, differentiable (what ``spsolve_triangular`` calls after its
    checks). The level schedule is built on first use (per direction) and
    kept: keep a solver to solve repeatedly with one pattern.
    """

    def __init__(self, pattern: CSRPattern, *, lower: bool, unit_diagonal: bool = False, method=None,
                 dtype=torch.float64):
        if method not in (None, "native", "levels"):
            raise ValueError(f"TriangularSolver: method must be None, 'native' or 'levels', got {method!r}")
        self.pattern = pattern
        self.lower = bool(lower)
        self.unit_diagonal = bool(unit_diagonal)
        self.native = method == "native" or (method is None and native_triangular_solve(pattern.device, dtype))
        self._levels = None             # (order, bounds)
        self._by_direction = {}
        self._mask = None
        self._native_part = None        # CUDA: (pattern of the entries read, their positions)

    @property
    def levels(self) -> int:
        """Number of levels of the schedule (builds it)."""
        return len(self._schedule()[1]) - 1

    def _schedule(self):
        if self._levels is None:
            self._levels = row_levels(self.pattern, self.lower)
        return self._levels

    def _direction(self, adjoint: bool) -> _Levels:
        if adjoint not in self._by_direction:
            order, bounds = self._schedule()
            self._by_direction[adjoint] = _Levels(self.pattern, self.lower, order, bounds, adjoint)
        return self._by_direction[adjoint]

    def diagonal(self, values: torch.Tensor) -> torch.Tensor:
        """The diagonal as stored (zero where absent), shape (n,)."""
        pos, rows = self.pattern.diagonal_entries()
        return torch.zeros(self.pattern.shape[0], dtype=values.dtype, device=values.device).index_add(
            0, rows, values[pos])

    def used(self) -> torch.Tensor | None:
        """1 on the entries the solve reads (the triangle, less the diagonal when unit), 0 elsewhere;
        None when it reads them all."""
        if self._mask is None:
            rows, col = self.pattern.rows(), self.pattern.col
            keep = (col <= rows) if self.lower else (col >= rows)
            if self.unit_diagonal:
                keep = keep & (col != rows)
            self._mask = (None if bool(keep.all()) else keep,)
        return self._mask[0]

    def apply(self, values: torch.Tensor, B: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        """``A^-1 B`` (``A^-H B`` when ``adjoint``) for B of shape (n, k), differentiable in
        ``values`` (gradient on the pattern) and B; no checks (``spsolve_triangular`` checks)."""
        return _TriangularSolve.apply(self, bool(adjoint), values, B)

    def solve(self, values: torch.Tensor, B: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        """``A^-1 B`` (``A^-H B`` when ``adjoint``) for B of shape (n, k), without autograd."""
        with torch.no_grad():
            values = values.detach()
            if B.shape[1] == 0 or B.shape[0] == 0:
                return B.clone()
            if self.native:
                return self._native(values, B, adjoint)
            return self._by_levels(values, B, adjoint)

    def _native(self, values, B, adjoint):
        if self.pattern.device.type == "cuda" and self.used() is not None:
            # cuSPARSE is not documented to skip the other triangle (or a stored diagonal taken as
            # unit): give it the entries the solve reads, and nothing else.
            if self._native_part is None:
                keep = torch.nonzero(self.used()).flatten()
                rows = self.pattern.rows()[keep]
                crow = torch.zeros(self.pattern.shape[0] + 1, dtype=torch.int64, device=keep.device)
                torch.cumsum(torch.bincount(rows, minlength=self.pattern.shape[0]), 0, out=crow[1:])
                self._native_part = (CSRPattern(crow, self.pattern.col[keep], self.pattern.shape), keep)
            part, keep = self._native_part
            T = part.tensor(values[keep])
        else:
            T = self.pattern.tensor(values)
        conjugate = adjoint and values.is_complex()
        rhs = B.conj() if conjugate else B
        # torch's sparse solve reads B's storage as if it were dense (a strided view gives wrong
        # answers): give it a contiguous copy.
        X = torch.triangular_solve(rhs.resolve_conj().contiguous(), T, upper=not self.lower, transpose=adjoint,
                                   unitriangular=self.unit_diagonal).solution
        return X.conj().resolve_conj() if conjugate else X

    def _by_levels(self, values, B, adjoint):
        order, _ = self._schedule()
        sched = self._direction(adjoint)
        w = values[sched.entries]
        if adjoint and w.is_complex():
            w = w.conj()
        X = B[order]
        if not self.unit_diagonal:
            d = self.diagonal(values)[order]
            if adjoint and d.is_complex():
                d = d.conj()
            # x_i = b_i / d_i - sum_j (a_ij / d_i) x_j: each level is one scatter-add and no division.
            X = X / d[:, None]
            w = w / d[sched.target]
        w = -w[:, None]
        for r0, r1, e0, e1 in sched.spans:
            if e1 > e0:
                X[r0:r1].index_add_(0, sched.local[e0:e1], w[e0:e1] * X[sched.source[e0:e1]])
        out = torch.empty_like(X)
        out[order] = X
        return out


class _TriangularSolve(Function):
    """X = A^-1 B (A^-H B when ``adjoint``); its backward is the other direction's solve."""

    @staticmethod
    def forward(ctx, solver, adjoint, values, B):
        X = solver.solve(values, B, adjoint)
        ctx.solver, ctx.adjoint = solver, adjoint
        ctx.save_for_backward(values, X)
        return X

    @staticmethod
    def backward(ctx, G):
        values, X = ctx.saved_tensors
        solver = ctx.solver
        # The other direction: A^-H G for a solve by A, A^-1 G for a solve by A^H.
        Z = _TriangularSolve.apply(solver, not ctx.adjoint, values, G)
        dvalues = None
        if ctx.needs_input_grad[2]:
            # -Z X^H on the pattern (solve by A), -X Z^H (solve by A^H).
            dvalues = -(csr_sampled(solver.pattern, X, Z) if ctx.adjoint else csr_sampled(solver.pattern, Z, X))
            mask = solver.used()
            if mask is not None:
                dvalues = dvalues * mask
        return None, None, dvalues, Z if ctx.needs_input_grad[3] else None


def _as_matrix(A, caller):
    """(pattern, values, batch) of A: an operator holding a ``CSRPattern`` and its ``values``
    (otlinop's ``SparseOperator``), a torch sparse tensor, or an object with ``to_sparse_csr()``."""
    pattern = getattr(A, "pattern", None)
    if isinstance(pattern, CSRPattern) and isinstance(getattr(A, "values", None), torch.Tensor):
        return pattern, A.values, getattr(A, "batch", None)
    if not isinstance(A, torch.Tensor) and callable(getattr(A, "to_sparse_csr", None)):
        A = A.to_sparse_csr()
    return csr_parts(caller, A)[:3]


def spsolve_triangular(A, B, lower: bool = True, unit_diagonal: bool = False, *, method=None):
    """Solve ``A X = B`` for a sparse triangular A, differentiably in A's values and in B.

    Parameters
    ----------
    A : Tensor, sparse CSR or COO, shape (n, n) or (Bt, n, n); or a SparseOperator
        float32, float64, complex64 or complex128. Only the triangle named
        by ``lower`` is read (entries of the other triangle are ignored and
        get a zero gradient). A batch holds one pattern per matrix.
    B : Tensor, shape (n,), (n, k), or for a batched A (Bt, n) or (Bt, n, k)
        A's dtype and device.
    lower : bool, default True
        Solve with the lower (else upper) triangle.
    unit_diagonal : bool, default False
        Take the diagonal as ones; stored diagonal entries are ignored.
    method : {None, "native", "levels"}
        None: torch's own sparse solve where it exists (MKL on the CPU,
        cuSPARSE on CUDA), else the level schedule; "native" or "levels"
        forces one (the level schedule runs on any device).

    Returns
    -------
    Tensor, B's shape
        Differentiable: the gradient w.r.t. A is a sparse tensor with A's
        pattern (w.r.t. its values, when A was built from them).

    Raises
    ------
    TypeError
        A is not sparse, or dtypes differ.
    ValueError
        A is not square, B's shape does not match, or (without
        ``unit_diagonal``) a diagonal entry of A is missing or zero: A is
        singular.

    Notes
    -----
    ``x = A^-1 b``; backward: ``lam = A^-H g`` (one solve with the other
    triangle's transpose), ``db = lam``, ``dA_ij = -lam_i conj(x_j)`` for the
    stored (i, j) of the triangle only. On the CPU (with MKL) and on CUDA
    the solves are torch's (``torch.triangular_solve`` on CSR); elsewhere,
    or for ``method="levels"``, a level schedule in torch (one gather and
    one scatter-add per level; built on each call: keep a
    ``TriangularSolver`` to reuse it). Like scipy's ``spsolve_triangular``.

    Examples
    --------
    >>> import torch
    >>> from solvers import spsolve_triangular
    >>> L = torch.tensor([[2.0, 0.0], [1.0, 4.0]], dtype=torch.float64).to_sparse_csr()
    >>> spsolve_triangular(L, torch.tensor([2.0, 9.0], dtype=torch.float64)).tolist()
    [1.0, 2.0]
    """
    caller = "spsolve_triangular"
    pattern, values, batch = _as_matrix(A, caller)
    Bt = batch or 1
    n = pattern.shape[0] // Bt
    if pattern.shape[0] != pattern.shape[1]:
        raise ValueError(f"{caller}: A must be square, got shape {fmt_shape(pattern.shape)}")
    if not isinstance(B, torch.Tensor):
        raise TypeError(f"{caller}: B must be a torch.Tensor, got {type(B).__name__}")
    lead = (Bt, n) if batch is not None else (n,)
    if B.ndim not in (len(lead), len(lead) + 1) or tuple(B.shape[:len(lead)]) != lead:
        want = ", ".join(str(s) for s in lead)
        raise ValueError(f"{caller}: B has shape {fmt_shape(B.shape)}, expected ({want},) or ({want}, k)")
    if B.dtype != values.dtype:
        raise TypeError(f"{caller}: B has dtype {B.dtype}, but A has dtype {values.dtype}; convert with "
                        f"B.to({values.dtype})")
    if B.device != values.device:
        raise ValueError(f"{caller}: B is on {B.device}, but A is on {values.device}")
    solver = TriangularSolver(pattern, lower=lower, unit_diagonal=unit_diagonal, method=method,
                              dtype=values.dtype)
    if not unit_diagonal:
        d = solver.diagonal(values.detach())
        zero = d == 0
        if bool(zero.any()):
            i = int(zero.nonzero()[0, 0])
            where = f"row {i % n} of matrix {i // n}" if batch is not None else f"row {i}"
            raise ValueError(f"{caller}: A is singular: {where} has no nonzero diagonal entry; pass "
                             "unit_diagonal=True if the diagonal is implicitly ones")
    shape = B.shape
    B2 = B.reshape(pattern.shape[0], -1)
    return solver.apply(values, B2).reshape(shape)
