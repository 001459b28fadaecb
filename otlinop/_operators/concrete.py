"""The concrete operators: ``Dense``, ``Diag``, ``Identity``, ``Zero`` and
``BlockOperator``.

Each holds its data as torch tensors (or operators, for the blocks) and
applies it with torch ops, so gradients flow to the data.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from .._base import LinearOperator, is_adjoint_pair
from .._checks import fmt_shape, real_tensor

__all__ = ["Dense", "Diag", "Identity", "Zero", "BlockOperator"]


class Dense(LinearOperator):
    """A dense (n, m) matrix held as a torch tensor.

    Parameters
    ----------
    M : Tensor, shape (n, m)
    is_symmetric : bool, optional
        Declare symmetry. When omitted, a square M is checked once with
        ``torch.allclose(M, M.T)``.
    is_psd : bool, optional
        Declare M symmetric positive semi-definite (not checked).

    Notes
    -----
    Adjoint: ``M.T``. Diagonal: ``M.diagonal()``. One matvec costs O(nm) time
    and no extra memory. Gradients flow to M.

    Examples
    --------
    >>> import torch, otlinop
    >>> A = otlinop.Dense(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    >>> A.is_symmetric, (A @ torch.ones(2)).tolist()
    (True, [3.0, 4.0])
    """

    def __init__(self, M: torch.Tensor, *, is_symmetric: bool | None = None, is_psd: bool = False):
        real_tensor("Dense", "M", M, 2)
        if M.layout != torch.strided:
            raise TypeError("Dense: M must be a strided (dense) tensor; use aslinearoperator for sparse tensors")
        if is_symmetric is None:
            is_symmetric = bool(M.shape[0] == M.shape[1] and torch.allclose(M, M.T))
        super().__init__(M.shape, M.dtype, M.device, is_symmetric=is_symmetric or is_psd, is_psd=is_psd)
        self.M = M

    def _matvec(self, v):
        return self.M @ v

    def _matmat(self, V):
        return self.M @ V

    def _rmatvec(self, u):
        return self.M.T @ u

    def _rmatmat(self, U):
        return self.M.T @ U

    def _diagonal(self):
        return self.M.diagonal()

    def to_dense(self):
        return self.M

    # What to_linear_operator rebuilds on other tensors (otlinop._interop_linop).
    def _parts(self):
        return (self.M,)

    def _from_parts(self, parts, *, dtype, device):
        return Dense(parts[0], is_symmetric=self.is_symmetric, is_psd=self.is_psd)


class Diag(LinearOperator):
    """The diagonal operator ``Diag(d)``, shape (n, n).

    Parameters
    ----------
    d : Tensor, shape (n,)
    psd : bool, optional
        Whether every ``d_i >= 0``, when the caller knows it (e.g. a
        marginal of a plan). None (default): checked at construction,
        which reads one flag back from the device.

    Notes
    -----
    Symmetric; PSD when every ``d_i >= 0``. One matvec costs O(n).
    ``inverse()`` gives ``Diag(1 / d)``.

    Examples
    --------
    >>> import torch, otlinop
    >>> D = otlinop.Diag(torch.tensor([1.0, 2.0]))
    >>> (D @ torch.ones(2)).tolist(), D.inverse().diagonal().tolist()
    ([1.0, 2.0], [1.0, 0.5])
    """

    def __init__(self, d: torch.Tensor, *, psd: bool | None = None):
        real_tensor("Diag", "d", d, 1)
        if psd is None:
            psd = bool((d >= 0).all()) if d.numel() else True
        elif not isinstance(psd, bool):
            raise TypeError(f"Diag: psd must be a bool or None, got {type(psd).__name__}")
        super().__init__((d.shape[0], d.shape[0]), d.dtype, d.device, is_symmetric=True, is_psd=psd)
        self.d = d

    def _matvec(self, v):
        return self.d * v

    def _matmat(self, V):
        return self.d.unsqueeze(1) * V

    def _diagonal(self):
        return self.d

    def splitting(self):
        return self.d, Zero((self.shape[0], self.shape[0]), dtype=self.dtype, device=self.device)

    def inverse(self) -> "Diag":
        """``Diag(1 / d)``; raises ValueError if some entry is zero."""
        if bool((self.d == 0).any()):
            raise ValueError("Diag.inverse: d has zero entries; the operator is singular")
        return Diag(1.0 / self.d)

    def to_dense(self):
        return torch.diag(self.d)

    def _parts(self):
        return (self.d,)

    def _from_parts(self, parts, *, dtype, device):
        return Diag(parts[0], psd=self.is_psd)


class Identity(LinearOperator):
    """The identity of size n: symmetric PSD, O(n) matvec (a copy-free return).

    Parameters
    ----------
    n : int
    dtype : torch.dtype, default float32
    device : torch.device or str, default "cpu"
    """

    def __init__(self, n: int, *, dtype=torch.float32, device="cpu"):
        super().__init__((n, n), dtype, device, is_symmetric=True, is_psd=True)

    def _matvec(self, v):
        return v

    def _matmat(self, V):
        return V

    def _diagonal(self):
        return torch.ones(self.shape[0], dtype=self.dtype, device=self.device)

    def _parts(self):
        return ()

    def _from_parts(self, parts, *, dtype, device):
        return Identity(self.shape[0], dtype=dtype, device=device)


class Zero(LinearOperator):
    """The zero operator of shape (n, m); symmetric PSD when square.

    Parameters
    ----------
    shape : (int, int) or int (square)
    dtype : torch.dtype, default float32
    device : torch.device or str, default "cpu"
    """

    def __init__(self, shape, *, dtype=torch.float32, device="cpu"):
        if isinstance(shape, numbers.Integral):
            shape = (shape, shape)
        shape = tuple(shape)
        square = len(shape) == 2 and shape[0] == shape[1]
        super().__init__(shape, dtype, device, is_symmetric=square, is_psd=square)

    def _matvec(self, v):
        return v.new_zeros(self.shape[0])

    def _matmat(self, V):
        return V.new_zeros((self.shape[0], V.shape[1]))

    def _rmatvec(self, u):
        return u.new_zeros(self.shape[1])

    def _rmatmat(self, U):
        return U.new_zeros((self.shape[1], U.shape[1]))

    def _adjoint(self):
        return Zero((self.shape[1], self.shape[0]), dtype=self.dtype, device=self.device)

    def _diagonal(self):
        return torch.zeros(min(self.shape), dtype=self.dtype, device=self.device)

    def _parts(self):
        return ()

    def _from_parts(self, parts, *, dtype, device):
        return Zero(self.shape, dtype=dtype, device=device)


class BlockOperator(LinearOperator):
    """A block matrix of operators, ``BlockOperator([[A, B], [C, None]])``.

    Parameters
    ----------
    blocks : list of lists
        A rectangular grid of operators (anything ``aslinearoperator`` takes)
        or ``None`` for a zero block. Every block row needs at least one
        operator to fix its height, every block column one to fix its width.
    is_symmetric : bool, optional
        Declare symmetry; by default it is inferred when the diagonal blocks
        are symmetric and each off-diagonal pair is known to be an adjoint pair
        (``blocks[j][i] is blocks[i][j].T``) or both are None.

    Notes
    -----
    Adjoint: the transposed grid of adjoints. Diagonal: when every diagonal
    block is square, the concatenation of their diagonals. One matvec costs
    one matvec of each block.

    Examples
    --------
    >>> import torch, otlinop
    >>> A = otlinop.Diag(torch.ones(2)); B = otlinop.Dense(torch.ones(2, 3))
    >>> K = otlinop.BlockOperator([[A, B], [B.T, None]])
    >>> K.shape, K.is_symmetric
    ((5, 5), True)
    """

    def __init__(self, blocks: Sequence[Sequence[Any]], *, is_symmetric: bool | None = None):
        if not isinstance(blocks, (list, tuple)) or not blocks or not all(
                isinstance(row, (list, tuple)) for row in blocks):
            raise TypeError("BlockOperator: blocks must be a non-empty list of lists, e.g. [[A, B], [C, None]]")
        ncols = len(blocks[0])
        if ncols == 0 or any(len(row) != ncols for row in blocks):
            raise ValueError("BlockOperator: every block row must have the same, non-zero number of blocks; "
                             f"got row lengths {[len(r) for r in blocks]}")
        grid = [[None if b is None else _as_operator(b) for b in row] for row in blocks]
        ops = [b for row in grid for b in row if b is not None]
        if not ops:
            raise ValueError("BlockOperator: all blocks are None; the sizes cannot be inferred")
        dtype, device = ops[0].dtype, ops[0].device
        heights: list[int | None] = [None] * len(grid)
        widths: list[int | None] = [None] * ncols
        for i, row in enumerate(grid):
            for j, b in enumerate(row):
                if b is None:
                    continue
                if b.dtype != dtype or b.device != device:
                    raise TypeError(f"BlockOperator: block [{i}][{j}] is {b.dtype} on {b.device}, expected "
                                    f"{dtype} on {device} like the first block")
                for sizes, idx, size, what in ((heights, i, b.shape[0], "rows"), (widths, j, b.shape[1], "columns")):
                    if sizes[idx] is None:
                        sizes[idx] = size
                    elif sizes[idx] != size:
                        raise ValueError(f"BlockOperator: block [{i}][{j}] has shape {fmt_shape(b.shape)}, "
                                         f"but its block {'row' if what == 'rows' else 'column'} has "
                                         f"{sizes[idx]} {what}")
        for name, sizes in (("row", heights), ("column", widths)):
            empty = [k for k, s in enumerate(sizes) if s is None]
            if empty:
                raise ValueError(f"BlockOperator: block {name} {empty[0]} holds only None; its size is unknown")
        self._grid, self._heights, self._widths = grid, heights, widths
        if is_symmetric is None:
            is_symmetric = heights == widths and all(
                (grid[i][i] is None or grid[i][i].is_symmetric) and all(
                    (grid[i][j] is None and grid[j][i] is None)
                    or (grid[i][j] is not None and grid[j][i] is not None
                        and is_adjoint_pair(grid[j][i], grid[i][j]))
                    for j in range(i + 1, ncols))
                for i in range(len(grid)))
        super().__init__((sum(heights), sum(widths)), dtype, device, is_symmetric=is_symmetric)

    def _apply(self, grid, heights, widths, V):
        parts = torch.split(V, widths, dim=0)
        rows = []
        for i, row in enumerate(grid):
            acc = None
            for j, b in enumerate(row):
                if b is not None:
                    y = b._matmat(parts[j])
                    acc = y if acc is None else acc + y
            rows.append(acc if acc is not None else V.new_zeros((heights[i], V.shape[1])))
        return torch.cat(rows, dim=0)

    def _matmat(self, V):
        return self._apply(self._grid, self._heights, self._widths, V)

    @property
    def has_adjoint(self):
        return self.is_symmetric or all(b is None or b.has_adjoint for row in self._grid for b in row)

    def _adjoint(self):
        if not self.has_adjoint:
            raise NotImplementedError(self._no_adjoint_message())
        transposed = [[None if self._grid[i][j] is None else self._grid[i][j].adjoint()
                       for i in range(len(self._grid))] for j in range(len(self._widths))]
        return BlockOperator(transposed, is_symmetric=self.is_symmetric)

    def _rmatmat(self, U):
        return self._adjoint()._matmat(U)

    def _diagonal(self):
        if self._heights != self._widths:
            return super()._diagonal()
        return torch.cat([
            torch.zeros(self._heights[i], dtype=self.dtype, device=self.device) if self._grid[i][i] is None
            else self._grid[i][i]._diagonal() for i in range(len(self._grid))])

    def block(self, i: int, j: int):
        """The operator in block row i, block column j (None for a zero block)."""
        return self._grid[i][j]


def _as_operator(block) -> LinearOperator:
    """A block of ``BlockOperator``: an operator, or anything ``aslinearoperator`` converts."""
    if isinstance(block, LinearOperator):
        return block
    from .._interop import aslinearoperator   # at call time: the interop module imports this one
    return aslinearoperator(block)
