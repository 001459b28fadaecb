"""``SparseOperator``: a torch sparse matrix (COO or CSR, optionally batched) as an
operator whose gradients keep the sparsity.

The matrix is held as a ``solvers.sparse.CSRPattern`` (structure) and a
values tensor of length nnz; every product goes through
``solvers.sparse.csr_matmul``, whose backward gives the values a gradient
of length nnz (on the pattern) and the operand a dense one, with no n x m
temporary.
"""

from __future__ import annotations

import torch

from solvers.sparse import CSRPattern, csr_matmul, csr_parts

from .._base import LinearOperator
from .._checks import fmt_shape

__all__ = ["SparseOperator"]


class SparseOperator(LinearOperator):
    """A sparse matrix as a differentiable operator, shape (n, m) or, for a batch, (B n, B m).

    Parameters
    ----------
    A : Tensor, sparse COO or CSR, shape (n, m) or (B, n, m)
        float32, float64, complex64 or complex128. Duplicate COO entries are
        summed; columns are sorted within rows. A batch of B matrices (each
        with its own pattern: a COO tensor may give them different numbers
        of entries) is the block-diagonal operator ``diag(A_1, ..., A_B)``.
        Gradients reach A's values (or the tensors they were computed
        from) with A's pattern.
    is_symmetric : bool, optional
        Declare ``A == A.H`` (symmetric, Hermitian for complex A). Not
        checked: a check would sort the pattern. Default False.
    is_psd : bool, optional
        Declare A Hermitian positive semi-definite (not checked).

    Attributes
    ----------
    values : Tensor, shape (nnz,)
        The stored entries in row-major order; differentiable.
    pattern : solvers.sparse.CSRPattern
        Row pointers ``pattern.crow`` and columns ``pattern.col`` (of the
        block-diagonal matrix for a batch).
    batch : int or None
        B for a batched operator.
    block_shape : (int, int)
        (n, m) of each matrix of the batch (the shape when not batched).

    Raises
    ------
    TypeError
        For a dense or other-layout tensor, or another dtype.
    ValueError
        For a tensor that is not 2-D or 3-D, or has dense dimensions.

    Notes
    -----
    * ``y = A @ X``: ``dL/dvalues[e] = sum_k G[i_e, k] conj(X[j_e, k])`` (the
      gradient on the pattern), ``dL/dX = A^H G``; O(nnz k) time, memory
      O(nnz + (n + m) k). Products with vectors and (m, k) matrices; a
      batched operator also takes (B, m, k) tensors (``S @ X`` as
      ``torch.bmm``).
    * Adjoint: ``A.H`` is a ``SparseOperator`` on the transposed pattern
      (one stable sort on first use, cached; none for a declared-symmetric
      A). ``A.T.T is A``.
    * ``diagonal()`` reads the stored diagonal (zero where none is
      stored), so ``jacobi(A)`` needs no product.
    * ``to_sparse_csr()`` gives the torch CSR tensor back (no autograd);
      ``solvers.ichol0``, ``solvers.ilu0`` and ``spsolve_triangular`` read
      the operator's pattern and values directly.
    * ``solve(A, b)`` differentiates w.r.t. ``values`` with one adjoint
      solve, the gradient again on the pattern.

    Examples
    --------
    >>> import torch, otlinop
    >>> i = torch.tensor([[0, 1, 1], [0, 0, 1]])
    >>> v = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    >>> A = otlinop.SparseOperator(torch.sparse_coo_tensor(i, v, (2, 2)))
    >>> y = A @ torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> y.tolist()
    [2.0, 7.0]
    >>> y.sum().backward(); v.grad.tolist()         # one entry per stored value
    [1.0, 1.0, 2.0]
    """

    def __init__(self, A: torch.Tensor, *, is_symmetric: bool | None = None, is_psd: bool = False):
        pattern, values, batch, source = csr_parts("SparseOperator", A)
        self._setup(pattern, values, batch, tuple(A.shape[-2:]), is_symmetric=bool(is_symmetric) or is_psd,
                    is_psd=is_psd)
        if source is not None and source.requires_grad:
            # Take the values from the tensor at each differentiable use: a fresh autograd node each
            # time, so that the operator serves any number of backward passes.
            self._source = ("tensor", source)
            self._values = values.detach()

    @classmethod
    def from_pattern(cls, pattern: CSRPattern, values: torch.Tensor, *, batch: int | None = None,
                     is_symmetric: bool = False, is_psd: bool = False) -> "SparseOperator":
        """The operator of a ``CSRPattern`` and its values (shape (nnz,)), without copying.

        ``batch`` = B says that the pattern is block diagonal with B blocks.
        Gradients reach ``values`` (a leaf, or any tensor computed from one).
        """
        if not isinstance(pattern, CSRPattern):
            raise TypeError(f"SparseOperator.from_pattern: pattern must be a solvers.sparse.CSRPattern, got "
                            f"{type(pattern).__name__}")
        if not isinstance(values, torch.Tensor) or values.shape != (pattern.nnz,):
            got = fmt_shape(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"SparseOperator.from_pattern: values must have shape ({pattern.nnz},), got {got}")
        if values.device != pattern.device:
            raise ValueError(f"SparseOperator.from_pattern: values are on {values.device}, the pattern on "
                             f"{pattern.device}")
        B = batch or 1
        op = cls.__new__(cls)
        op._setup(pattern, values, batch, (pattern.shape[0] // B, pattern.shape[1] // B),
                  is_symmetric=is_symmetric or is_psd, is_psd=is_psd)
        return op

    def _setup(self, pattern, values, batch, block_shape, *, is_symmetric, is_psd, transpose_of=None):
        super().__init__(pattern.shape, values.dtype, values.device, is_symmetric=is_symmetric, is_psd=is_psd,
                         transpose_of=transpose_of)
        self.pattern = pattern
        self._values = values
        # Where differentiable values come from, when not from _values itself: ("tensor", a sparse
        # tensor) or ("transpose", the operator transposed, perm, conjugate).
        self._source = None
        self.batch = batch
        self.block_shape = (int(block_shape[0]), int(block_shape[1]))

    @property
    def values_require_grad(self) -> bool:
        """Whether the values are differentiable (own values, the sparse tensor's, or those of
        the operator this one transposes)."""
        source = self._source
        if source is None:
            return self._values.requires_grad
        if source[0] == "tensor":
            return source[1].requires_grad
        return source[1].values_require_grad

    @property
    def values(self) -> torch.Tensor:
        """The stored entries, shape (nnz,), in row-major order (differentiable)."""
        source = self._source
        if source is None:
            return self._values
        differentiable = torch.is_grad_enabled() and self.values_require_grad
        if source[0] == "tensor":
            return source[1].values().reshape(-1) if differentiable else self._values
        _, parent, perm, conjugate = source
        if differentiable:
            # Gathered at each use: a cached gather would be one autograd node, freed by the first backward.
            values = parent.values[perm]
            return values.conj_physical() if conjugate else values
        if self._values is None:
            with torch.no_grad():
                values = parent.values[perm]
                self._values = values.conj_physical() if conjugate else values
        return self._values

    def _own_adjoint(self):
        """``(pattern, values)`` of A^H when A is declared Hermitian (no transposed pattern needed)."""
        if self.is_symmetric:
            return (self.pattern, self.values)
        return None

    def _matmat(self, V):
        return csr_matmul(self.pattern, self.values, V, adjoint=self._own_adjoint())

    def _matvec(self, v):
        return csr_matmul(self.pattern, self.values, v, adjoint=self._own_adjoint())

    def _transposed(self, conjugate: bool, adjoint: bool) -> "SparseOperator":
        PT, perm = self.pattern.transpose()
        op = type(self).__new__(type(self))
        op._setup(PT, self._values.detach()[:0] if self._values is not None else self.values.detach()[:0],
                  self.batch, self.block_shape[::-1], is_symmetric=False, is_psd=False,
                  transpose_of=self if adjoint else None)
        op._source, op._values = ("transpose", self, perm, conjugate), None
        return op

    def _adjoint(self):
        if self.is_symmetric:
            return self
        return self._transposed(conjugate=self.dtype.is_complex, adjoint=True)

    def _transpose(self):
        return self._transposed(conjugate=False, adjoint=False)

    def _astype(self, dtype, device):
        # Widening the values is exact: compute in the wider dtype directly.
        return SparseOperator.from_pattern(self.pattern, self.values.to(dtype), batch=self.batch,
                                           is_symmetric=self.is_symmetric, is_psd=self.is_psd)

    def _diagonal(self):
        pos, rows = self.pattern.diagonal_entries()
        out = torch.zeros(min(self.shape), dtype=self.dtype, device=self.device)
        return out.index_add(0, rows, self.values[pos])

    def __matmul__(self, other):
        if isinstance(other, torch.Tensor) and other.ndim == 3 and self.batch is not None:
            return self.bmm(other)
        return super().__matmul__(other)

    def bmm(self, X: torch.Tensor) -> torch.Tensor:
        """``A_b @ X_b`` for every matrix of a batch: X of shape (B, m, k) -> (B, n, k)."""
        B, (n, m) = self.batch or 1, self.block_shape
        if not isinstance(X, torch.Tensor) or X.ndim != 3 or tuple(X.shape[:2]) != (B, m):
            got = fmt_shape(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"SparseOperator.bmm: X must have shape ({B}, {m}, k), got {got}")
        return self.matmat(X.reshape(B * m, X.shape[2])).reshape(B, n, X.shape[2])

    # -------------------------------------------------------------- public
    @property
    def nnz(self) -> int:
        """Stored entries."""
        return self.pattern.nnz

    def to_dense(self) -> torch.Tensor:
        """The (n, m) matrix (block diagonal for a batch), differentiable in the values."""
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return out.index_put((self.pattern.rows(), self.pattern.col), self.values)

    def to_sparse_csr(self) -> torch.Tensor:
        """The torch CSR tensor of this operator (block diagonal for a batch), sharing its
        indices and values, outside autograd: gradients flow through the operator's products
        (torch's backward through its sparse constructor would form the dense matrix)."""
        return self.pattern.tensor(self.values)

    def _differentiable_tensors(self) -> tuple:
        """What ``solve`` and ``lstsq`` differentiate: the tensors the values are taken from
        (the values, or the sparse tensor they are read from at each use), when they require grad."""
        source = self._source
        if source is None:
            return (self._values,) if self._values.requires_grad else ()
        if source[0] == "tensor":
            return (source[1],) if source[1].requires_grad else ()
        return source[1]._differentiable_tensors()

    def _parts(self):
        return (self.values,)

    def _from_parts(self, parts, *, dtype, device):
        return SparseOperator.from_pattern(self.pattern.to(device), parts[0], batch=self.batch,
                                           is_symmetric=self.is_symmetric, is_psd=self.is_psd)

    def __repr__(self) -> str:
        batch = "" if self.batch is None else f", batch={self.batch} of {fmt_shape(self.block_shape)}"
        flags = ", psd" if self.is_psd else (", symmetric" if self.is_symmetric else "")
        return (f"<SparseOperator {self.shape[0]}x{self.shape[1]}, nnz={self.nnz}{batch}, {self.dtype} on "
                f"{self.device}{flags}>")
