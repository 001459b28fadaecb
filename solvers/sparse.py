"""Sparse matrices as a pattern plus a values tensor, and their differentiable products.

A ``CSRPattern`` is the structure of a sparse matrix in compressed sparse
row form (row pointers, column indices sorted within each row, no
duplicates) without its values. The values are a separate dense tensor of
length nnz, so that autograd treats them as any other tensor: a gradient
with respect to them has length nnz, that is, it lives on the pattern and
never on the n x m matrix.

Two products close under differentiation:

- ``csr_matmul(P, values, X) = A X`` with ``A`` the matrix of ``(P, values)``;
  its backward is ``dX = A^H G`` (a product with the transposed pattern)
  and ``dvalues = csr_sampled(P, G, X)``;
- ``csr_sampled(P, G, X)[e] = sum_k G[i_e, k] conj(X[j_e, k])``, the
  "sampled" product ``G X^H`` read on the pattern only; its backward is
  made of ``csr_matmul`` calls.

So gradients of any order are products of the same two kinds, none of
which allocates more than O(nnz + (n + m) k) memory. ``csr_parts`` reads a
torch sparse COO or CSR tensor (2-D, or batched (B, n, m), per-batch
patterns allowed) into a pattern and differentiable values.

Torch only; used by ``spsolve_triangular``, the incomplete factorisations
and otlinop's ``SparseOperator``.
"""

from __future__ import annotations

import warnings

import torch

from ._function import Function
from ._operator import fmt_shape

__all__ = ["CSRPattern", "csr_matmul", "csr_sampled", "csr_parts", "SPARSE_DTYPES"]

#: Value dtypes of the sparse products (torch's CPU sparse kernels have no half precision).
SPARSE_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)

#: Entries x columns gathered at once by ``csr_sampled``: at least this many, and up to a
#: quarter of the stored entries, so that its temporaries (a few times this many numbers) stay
#: a fraction of the values while a large matrix takes tens of blocks, not thousands (each
#: block is a handful of launches: 2440 blocks made the backward of a 20M-entry product with
#: 32 columns 17x slower than torch's on an H100).
_SAMPLED_BLOCK = 1 << 18


def _quiet_csr(crow, col, values, shape):
    """A torch CSR tensor on the given parts; torch's "beta" and invariant-check
    warnings say nothing about parts that ``CSRPattern`` has already validated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class CSRPattern:
    """The structure of an (n, m) sparse matrix: row pointers and sorted column indices.

    Parameters
    ----------
    crow : int64 Tensor, shape (n + 1,)
        ``crow[i]:crow[i + 1]`` are the entries of row i.
    col : int64 Tensor, shape (nnz,)
        Column of each entry, strictly increasing within a row.
    shape : (int, int)

    Notes
    -----
    Immutable; what is derived from it (the transposed pattern and the
    permutation that maps values onto it, the positions of the diagonal
    entries, the row blocks of ``csr_sampled``) is built on first use and
    cached, so that an operator pays for it once. Each entry's row
    (``rows()``) is recomputed when asked for: nnz integers are as large as
    the column indices, and most products never need them.
    """

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, shape):
        self.crow = crow
        self.col = col
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = col.device
        self._transpose = None      # (pattern, perm): values of A.T are values[perm]
        self._diag = None           # (entry positions, their rows)
        self._blocks = {}
        self._tensor = None         # (values, their version, the torch CSR tensor on them)

    @property
    def nnz(self) -> int:
        return int(self.col.shape[0])

    def rows(self, dtype=torch.int64) -> torch.Tensor:
        """The row of each entry, shape (nnz,) (not cached); ``dtype=torch.int32`` halves it."""
        return torch.repeat_interleave(torch.arange(self.shape[0], dtype=dtype, device=self.device),
                                       self.crow.diff(), output_size=self.nnz)

    def tensor(self, values: torch.Tensor) -> torch.Tensor:
        """The torch CSR tensor of these values, outside autograd (torch's backward through its
        sparse constructor would form the dense matrix); the last one built is kept while the
        same values tensor, unmodified, asks again."""
        cached = self._tensor
        if cached is not None and cached[0] is values and cached[1] == values._version:
            return cached[2]
        tensor = _quiet_csr(self.crow, self.col, values.detach(), self.shape)
        self._tensor = (values, values._version, tensor)
        return tensor

    def transpose(self):
        """``(pattern of A.T, perm)`` with ``values_T = values[perm]`` (one stable sort, cached)."""
        if self._transpose is None:
            n, m = self.shape
            perm = torch.argsort(self.col, stable=True)
            rows = self.rows()[perm]
            crow = torch.zeros(m + 1, dtype=torch.int64, device=self.device)
            torch.cumsum(torch.bincount(self.col, minlength=m), 0, out=crow[1:])
            T = CSRPattern(crow, rows, (m, n))
            self._transpose = (T, perm)
        return self._transpose

    def diagonal_entries(self):
        """``(positions, rows)`` of the stored entries (i, i), each of shape (d,) (cached)."""
        if self._diag is None:
            rows = self.rows()
            pos = torch.nonzero(rows == self.col).flatten()
            self._diag = (pos, rows[pos])
        return self._diag

    def row_blocks(self, entries: int):
        """Row ranges ``(r0, r1, e0, e1)`` covering the matrix with about ``entries`` entries
        each (a single longer row is a block of its own); one host read, cached."""
        if entries not in self._blocks:
            n, nnz = self.shape[0], self.nnz
            if nnz == 0:
                self._blocks[entries] = []
                return []
            targets = torch.arange(0, nnz, entries, device=self.device)
            starts = torch.searchsorted(self.crow, targets, right=True) - 1
            starts = torch.unique(torch.cat([starts, torch.tensor([n], device=self.device)]))
            bounds = torch.stack([starts, self.crow[starts]]).tolist()
            self._blocks[entries] = [(r0, r1, e0, e1) for r0, r1, e0, e1 in
                                     zip(bounds[0][:-1], bounds[0][1:], bounds[1][:-1], bounds[1][1:])]
        return self._blocks[entries]

    def to(self, device) -> "CSRPattern":
        if torch.device(device) == self.device:
            return self
        return CSRPattern(self.crow.to(device), self.col.to(device), self.shape)

    def __getstate__(self):
        # Caches are rebuilt on demand; the pickle keeps the structure only.
        return {"crow": self.crow, "col": self.col, "shape": self.shape}

    def __setstate__(self, state):
        self.__init__(state["crow"], state["col"], state["shape"])

    def __repr__(self) -> str:
        return f"<CSR pattern {self.shape[0]}x{self.shape[1]}, nnz={self.nnz}, on {self.device}>"


def _as_2d(X):
    return X[:, None] if X.ndim == 1 else X


def _product(P, values, X):
    if P.nnz == 0 or X.shape[1] == 0:
        return X.new_zeros((P.shape[0], X.shape[1]))
    return P.tensor(values) @ X


class _CSRMatmul(Function):
    """Y = A X for A = (P, values); backward in ``csr_matmul`` and ``csr_sampled``."""

    @staticmethod
    def forward(ctx, P, adjoint, values, X):
        ctx.P, ctx.adjoint = P, adjoint
        ctx.save_for_backward(values, X)
        return _product(P, values, X)

    @staticmethod
    def backward(ctx, G):
        values, X = ctx.saved_tensors
        dvalues = dX = None
        if ctx.needs_input_grad[3]:
            dX = _adjoint_matmul(ctx.P, values, G, ctx.adjoint)
        if ctx.needs_input_grad[2]:
            dvalues = csr_sampled(ctx.P, G, X)
        return None, None, dvalues, dX


def _adjoint_matmul(P, values, G, adjoint):
    """``A^H G``: ``adjoint`` is ``(P.T, values_T)`` given by a caller that knows A^H
    (a Hermitian A is its own), else the transposed pattern is built (cached)."""
    if adjoint is not None:
        PT, vT = adjoint
    else:
        PT, perm = P.transpose()
        vT = values.index_select(0, perm)
        vT = vT.conj_physical() if vT.is_complex() else vT
    return csr_matmul(PT, vT, G)


class _CSRSampled(Function):
    """s[e] = sum_k G[i_e, k] conj(X[j_e, k]) on the pattern P."""

    @staticmethod
    def forward(ctx, P, G, X):
        ctx.P = P
        ctx.save_for_backward(G, X)
        return _sampled(P, G, X)

    @staticmethod
    def backward(ctx, ds):
        G, X = ctx.saved_tensors
        dG = dX = None
        if ctx.needs_input_grad[1]:
            dG = csr_matmul(ctx.P, ds, X)
        if ctx.needs_input_grad[2]:
            # s is conjugate-linear in X: d<s, ds>/dX = A(ds)^H G.
            dX = _adjoint_matmul(ctx.P, ds, G, None)
        return None, dG, dX


def _sampled(P, G, X):
    dtype = torch.promote_types(G.dtype, X.dtype)
    out = torch.zeros(P.nnz, dtype=dtype, device=G.device)
    k = G.shape[1]
    if k == 0:
        return out
    conj = X.is_complex()
    for r0, r1, e0, e1 in P.row_blocks(max(1, max(_SAMPLED_BLOCK, P.nnz // 4) // k)):
        # Row i of G repeated once per entry of row i: no index of rows is needed.
        Gi = torch.repeat_interleave(G[r0:r1], P.crow[r0:r1 + 1].diff(), dim=0, output_size=e1 - e0)
        Xj = X.index_select(0, P.col[e0:e1])
        prod = Gi.mul_(Xj.conj() if conj else Xj)
        out[e0:e1] = prod[:, 0] if k == 1 else prod.sum(1)
    return out


def csr_matmul(P: CSRPattern, values: torch.Tensor, X: torch.Tensor, *, adjoint=None) -> torch.Tensor:
    """``A @ X`` for the sparse A of pattern ``P`` and ``values``, differentiable in both.

    Parameters
    ----------
    P : CSRPattern, shape (n, m)
    values : Tensor, shape (nnz,)
    X : Tensor, shape (m,) or (m, k), dtype of values
    adjoint : (CSRPattern, Tensor), optional
        ``(pattern, values)`` of ``A^H`` when the caller has them (an
        operator declared Hermitian passes its own): the backward pass then
        builds no transposed pattern.

    Returns
    -------
    Tensor, shape (n,) or (n, k)

    Notes
    -----
    Forward: torch's CSR product (MKL on the CPU, cuSPARSE on CUDA).
    Backward: ``dX = A^H G``, ``dvalues[e] = sum_k G[i_e, k] conj(X[j_e, k])``
    (``csr_sampled``), so the gradient w.r.t. A has A's pattern. O(nnz k)
    time and no temporary larger than O(nnz + (n + m) k).

    Examples
    --------
    >>> import torch
    >>> from solvers.sparse import CSRPattern, csr_matmul
    >>> P = CSRPattern(torch.tensor([0, 1, 2]), torch.tensor([1, 0]), (2, 2))
    >>> v = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    >>> y = csr_matmul(P, v, torch.tensor([1.0, 10.0], dtype=torch.float64))
    >>> y.tolist()
    [20.0, 3.0]
    >>> y.sum().backward(); v.grad.tolist()
    [10.0, 1.0]
    """
    vector = X.ndim == 1
    if torch.is_grad_enabled() and (values.requires_grad or X.requires_grad):
        Y = _CSRMatmul.apply(P, adjoint, values, _as_2d(X))
    else:       # no autograd node: the product alone
        Y = _product(P, values, _as_2d(X))
    return Y[:, 0] if vector else Y


def csr_sampled(P: CSRPattern, G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``(G X^H)`` read on the pattern P: ``s[e] = sum_k G[i_e, k] conj(X[j_e, k])``.

    Parameters
    ----------
    P : CSRPattern, shape (n, m)
    G : Tensor, shape (n,) or (n, k)
    X : Tensor, shape (m,) or (m, k)

    Returns
    -------
    Tensor, shape (nnz,)
        Differentiable in G and X (its backward is two ``csr_matmul``).

    Notes
    -----
    The gradient of ``<G, A X>`` with respect to A's values; computed in
    row blocks of about 262k entries x columns, never as the (n, m) product.
    """
    return _CSRSampled.apply(P, _as_2d(G), _as_2d(X))


# --------------------------------------------------------------------------
# From torch sparse tensors
# --------------------------------------------------------------------------
def _csr_from_rows(rows, col, nrows):
    crow = torch.zeros(nrows + 1, dtype=torch.int64, device=col.device)
    torch.cumsum(torch.bincount(rows, minlength=nrows), 0, out=crow[1:])
    return crow


def csr_parts(caller: str, A: torch.Tensor, name: str = "A"):
    """Read a torch sparse COO or CSR tensor.

    Parameters
    ----------
    caller, name : str
        For error messages.
    A : Tensor, sparse COO or CSR, shape (n, m) or (B, n, m)
        A batch becomes the block-diagonal matrix of its B matrices, each
        with its own pattern (COO), or the same number of entries (CSR, as
        torch stores batches).

    Returns
    -------
    pattern : CSRPattern, shape (n, m) or (B n, B m)
    values : Tensor, shape (nnz,)
        Differentiable: a gradient reaches A (as a sparse tensor with A's
        pattern) or whatever A's values were computed from.
    batch : int or None
        B for a batched tensor.
    source : Tensor or None
        The sparse tensor whose ``values().reshape(-1)`` are ``values`` (A,
        or A coalesced), so that a caller can take them again for each use
        (a fresh autograd node each time); None when the values had to be
        reordered.

    Raises
    ------
    TypeError
        For another layout or a dtype outside float32, float64, complex64
        and complex128.
    ValueError
        For a tensor that is not 2-D or 3-D, or has dense dimensions.
    """
    if not isinstance(A, torch.Tensor) or A.layout not in (torch.sparse_coo, torch.sparse_csr):
        got = A.layout if isinstance(A, torch.Tensor) else type(A).__name__
        raise TypeError(f"{caller}: {name} must be a torch sparse COO or CSR tensor, got {got}; convert with "
                        f"{name}.to_sparse_csr()")
    if A.ndim not in (2, 3):
        raise ValueError(f"{caller}: {name} must be 2-D (n, m) or batched 3-D (B, n, m), got shape "
                         f"{fmt_shape(A.shape)}")
    if A.dtype not in SPARSE_DTYPES:
        raise TypeError(f"{caller}: {name} has dtype {A.dtype}, expected float32, float64, complex64 or "
                        f"complex128 (torch's sparse products have no other); convert with "
                        f"{name}.to(torch.float64)")
    batch = A.shape[0] if A.ndim == 3 else None
    n, m = A.shape[-2], A.shape[-1]
    B = batch or 1
    shape = (B * n, B * m)
    if A.layout == torch.sparse_coo:
        if A.dense_dim() != 0:
            raise ValueError(f"{caller}: {name} must have no dense dimensions, got {A.dense_dim()}")
        A = A.coalesce()                 # sorted, duplicates summed (differentiably)
        idx, values = A.indices(), A.values()
        if batch is None:
            rows, col = idx[0], idx[1]
        else:
            rows, col = idx[0] * n + idx[1], idx[0] * m + idx[2]
        return CSRPattern(_csr_from_rows(rows, col, shape[0]), col, shape), values, batch, A
    if A.dense_dim() != 0:
        raise ValueError(f"{caller}: {name} must have no dense dimensions, got {A.dense_dim()}")
    crow, col, values = A.crow_indices(), A.col_indices(), A.values()
    source = A
    if A.grad_fn is not None and type(A.grad_fn).__name__.startswith("SparseCompressedTensorBackward"):
        # A was built by torch.sparse_csr_tensor from values that require grad: torch's backward
        # through that constructor forms the dense (n, m) gradient. Take the values themselves.
        node = A.grad_fn.next_functions[0][0] if A.grad_fn.next_functions else None
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, torch.Tensor) and leaf.shape == values.shape:
            values, source = leaf, None
        else:
            warnings.warn(f"{caller}: {name} was built by torch.sparse_csr_tensor from values computed by "
                          "autograd; gradients through torch's constructor form the dense (n, m) matrix. Build the "
                          "operator from the values instead: SparseOperator.from_pattern(CSRPattern(crow, col, "
                          "shape), values)", UserWarning, stacklevel=3)
    if batch is not None:
        nnz_b = col.shape[-1]
        offsets = torch.arange(B, device=col.device)
        col = (col.to(torch.int64) + offsets[:, None] * m).reshape(-1)
        crow = torch.cat([torch.zeros(1, dtype=torch.int64, device=col.device),
                          (crow[:, 1:].to(torch.int64) + offsets[:, None] * nnz_b).reshape(-1)])
        values = values.reshape(-1)
    crow, col = crow.to(torch.int64), col.to(torch.int64)
    P = CSRPattern(crow, col, shape)
    if col.numel() > 1:
        # torch does not promise sorted, unique columns within a row: check (columns increase
        # except where a row starts), and sort them through a coalesced COO tensor if not.
        increasing = col[1:] > col[:-1]
        starts = crow[1:-1]
        increasing[starts[(starts > 0) & (starts < col.numel())] - 1] = True
        if not bool(increasing.all()):
            rows = P.rows()
            coo = torch.sparse_coo_tensor(torch.stack([rows, col]), values, shape).coalesce()
            rows, col = coo.indices()
            return CSRPattern(_csr_from_rows(rows, col, shape[0]), col, shape), coo.values(), batch, None
    return P, values, batch, source
