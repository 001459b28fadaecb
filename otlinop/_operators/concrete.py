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
from .._checks import fmt_shape, nonnegative_int, operator_tensor

__all__ = ["Dense", "Diag", "Identity", "Zero", "BlockOperator"]


class Dense(LinearOperator):
    """A dense (n, m) matrix held as a torch tensor, real or complex.

    Parameters
    ----------
    M : Tensor, shape (n, m)
        Of a floating or complex dtype.
    is_symmetric : bool, optional
        Declare ``M == M.H`` (symmetric, or Hermitian for a complex M). When
        omitted, a square M is checked once with ``torch.allclose(M, M.mH)``.
    is_psd : bool, optional
        Declare M self-adjoint positive semi-definite (not checked).

    Notes
    -----
    Adjoint: ``M.mH``; transpose: ``M.T``. Diagonal: ``M.diagonal()``. One
    matvec costs O(nm) time and no extra memory. Gradients flow to M.

    Examples
    --------
    >>> import torch, otlinop
    >>> A = otlinop.Dense(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    >>> A.is_symmetric, (A @ torch.ones(2)).tolist()
    (True, [3.0, 4.0])
    """

    def __init__(self, M: torch.Tensor, *, is_symmetric: bool | None = None, is_psd: bool = False):
        operator_tensor("Dense", "M", M, 2)
        if M.layout != torch.strided:
            raise TypeError("Dense: M must be a strided (dense) tensor; use aslinearoperator for sparse tensors")
        if is_symmetric is None:
            is_symmetric = bool(M.shape[0] == M.shape[1] and torch.allclose(M, M.mH))
        super().__init__(M.shape, M.dtype, M.device, is_symmetric=is_symmetric or is_psd, is_psd=is_psd)
        self.M = M

    def _matvec(self, v):
        return self.M @ v

    def _matmat(self, V):
        return self.M @ V

    def _rmatvec(self, u):
        return self.M.mH @ u

    def _rmatmat(self, U):
        return self.M.mH @ U

    def _transpose(self):
        return Dense(self.M.T, is_symmetric=self.is_symmetric, is_psd=self.is_psd)

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
    """The diagonal operator ``Diag(d)``, shape (n, n), real or complex.

    Parameters
    ----------
    d : Tensor, shape (n,)
        Of a floating or complex dtype.
    psd : bool, optional
        Whether every ``d_i >= 0`` (real), when the caller knows it (e.g. a
        marginal of a plan). None (default): checked at construction,
        which reads one flag back from the device.

    Notes
    -----
    Self-adjoint (Hermitian) when d is real; PSD when every ``d_i >= 0``.
    Adjoint: ``Diag(conj(d))``; transpose: itself. One matvec costs O(n).
    ``inverse()`` gives ``Diag(1 / d)``.

    Examples
    --------
    >>> import torch, otlinop
    >>> D = otlinop.Diag(torch.tensor([1.0, 2.0]))
    >>> (D @ torch.ones(2)).tolist(), D.inverse().diagonal().tolist()
    ([1.0, 2.0], [1.0, 0.5])
    """

    def __init__(self, d: torch.Tensor, *, psd: bool | None = None):
        operator_tensor("Diag", "d", d, 1)
        if psd is not None and not isinstance(psd, bool):
            raise TypeError(f"Diag: psd must be a bool or None, got {type(psd).__name__}")
        hermitian = True
        if d.is_complex():
            # One read-back for both flags: real entries, and non-negative ones.
            flags = torch.stack([(d.imag == 0).all(), ((d.imag == 0) & (d.real >= 0)).all()]).tolist() \
                if d.numel() else [True, True]
            hermitian = flags[0]
            psd = flags[1] if psd is None else psd
        elif psd is None:
            psd = bool((d >= 0).all()) if d.numel() else True
        super().__init__((d.shape[0], d.shape[0]), d.dtype, d.device, is_symmetric=hermitian or psd, is_psd=psd)
        self.d = d

    def _matvec(self, v):
        return self.d * v

    def _matmat(self, V):
        return self.d.unsqueeze(1) * V

    def _rmatvec(self, u):
        return self.d.conj() * u

    def _rmatmat(self, U):
        return self.d.conj().unsqueeze(1) * U

    def _transpose(self):
        return self

    def _astype(self, dtype, device):
        # Widening d is exact and costs O(n): no need to compute in the narrower dtype.
        return Diag(self.d.to(dtype), psd=self.is_psd)

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
    dtype : torch.dtype, optional
        None (default): the dtype adapts to the operators the identity is
        combined with (``Dense(M) + Identity(n)`` has M's dtype), and the
        identity alone takes operands of any dtype (``dtype`` then reads
        torch's default dtype). An explicit dtype stays.
    device : torch.device or str, optional
        None (default): adapts likewise (``device`` then reads "cpu").

    Examples
    --------
    >>> import torch, otlinop
    >>> A = otlinop.Dense(torch.eye(2, dtype=torch.float64)) + otlinop.Identity(2)
    >>> A.dtype, (A @ torch.ones(2, dtype=torch.float64)).tolist()
    (torch.float64, [2.0, 2.0])
    """

    def __init__(self, n: int, *, dtype=None, device=None):
        n = nonnegative_int("Identity", "n", n)   # 2.5 is refused, not truncated to 2
        super().__init__((n, n), torch.get_default_dtype() if dtype is None else dtype,
                         "cpu" if device is None else device, is_symmetric=True, is_psd=True)
        self.adapts_dtype, self.adapts_device = dtype is None, device is None

    def _matvec(self, v):
        return v

    def _matmat(self, V):
        return V

    def _transpose(self):
        return self

    def _astype(self, dtype, device):
        return Identity(self.shape[0], dtype=dtype, device=device)

    def _diagonal(self):
        return torch.ones(self.shape[0], dtype=self.dtype, device=self.device)

    def _parts(self):
        return ()

    def _from_parts(self, parts, *, dtype, device):
        # An adapting identity stays adapting: the operators it is combined with decide again.
        return Identity(self.shape[0], dtype=None if self.adapts_dtype else dtype,
                        device=None if self.adapts_device else device)


class Zero(LinearOperator):
    """The zero operator of shape (n, m); symmetric PSD when square.

    Parameters
    ----------
    shape : (int, int) or int (square)
    dtype : torch.dtype, optional
        None (default): adapts to the operators it is combined with, as
        ``Identity``'s does. An explicit dtype stays.
    device : torch.device or str, optional
        None (default): adapts likewise.
    """

    def __init__(self, shape, *, dtype=None, device=None):
        if isinstance(shape, (numbers.Number, torch.Tensor)):   # Zero(n): n x n (2.5 is refused, not truncated)
            shape = (nonnegative_int("Zero", "shape", shape),) * 2
        shape = tuple(shape)
        square = len(shape) == 2 and shape[0] == shape[1]
        super().__init__(shape, torch.get_default_dtype() if dtype is None else dtype,
                         "cpu" if device is None else device, is_symmetric=square, is_psd=square)
        self.adapts_dtype, self.adapts_device = dtype is None, device is None

    def _matvec(self, v):
        return v.new_zeros(self.shape[0])

    def _matmat(self, V):
        return V.new_zeros((self.shape[0], V.shape[1]))

    def _rmatvec(self, u):
        return u.new_zeros(self.shape[1])

    def _rmatmat(self, U):
        return U.new_zeros((self.shape[1], U.shape[1]))

    def _adjoint(self):
        return Zero((self.shape[1], self.shape[0]), dtype=None if self.adapts_dtype else self.dtype,
                    device=None if self.adapts_device else self.device)

    def _transpose(self):
        return self.adjoint()

    def _astype(self, dtype, device):
        return Zero(self.shape, dtype=dtype, device=device)

    def _diagonal(self):
        return torch.zeros(min(self.shape), dtype=self.dtype, device=self.device)

    def _parts(self):
        return ()

    def _from_parts(self, parts, *, dtype, device):
        return Zero(self.shape, dtype=None if self.adapts_dtype else dtype,
                    device=None if self.adapts_device else device)


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
        (``blocks[j][i] is blocks[i][j].H``) or both are None.

    Notes
    -----
    Adjoint: the transposed grid of adjoints. Diagonal: when every diagonal
    block is square, the concatenation of their diagonals. One matvec costs
    one matvec of each block. The blocks' dtypes promote as in ``A + B``
    (``Identity(n)`` and ``Zero`` blocks adapt).

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
        fixed = [b for b in ops if not b.adapts_device]
        heights: list[int | None] = [None] * len(grid)
        widths: list[int | None] = [None] * ncols
        for i, row in enumerate(grid):
            for j, b in enumerate(row):
                if b is None:
                    continue
                if fixed and not b.adapts_device and b.device != fixed[0].device:
                    raise ValueError(f"BlockOperator: block [{i}][{j}] is on {b.device}, expected "
                                     f"{fixed[0].device} like the other blocks")
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
        self._heights, self._widths = heights, widths
        self._blocks = grid   # as written (converted, not promoted): what _parts exposes
        if is_symmetric is None:
            is_symmetric = heights == widths and all(
                (grid[i][i] is None or grid[i][i].is_symmetric) and all(
                    (grid[i][j] is None and grid[j][i] is None)
                    or (grid[i][j] is not None and grid[j][i] is not None
                        and is_adjoint_pair(grid[j][i], grid[i][j]))
                    for j in range(i + 1, ncols))
                for i in range(len(grid)))
        from .algebra import conform, promoted   # at call time: the algebra imports this module
        dtype, device = promoted(ops)
        self._grid = [[None if b is None else conform(b, dtype, device) for b in row] for row in grid]
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
        # Through each block's own adjoint product (rmatmat), not the grid of their adjoint
        # operators: no grid is built per call, and a symmetric Dense block applies M.mH, not
        # itself, so gradients w.r.t. its entries are those of the dense matrix (to_linear_operator).
        if not all(b is None or b.has_adjoint for row in self._grid for b in row):
            return self._matmat(U)   # declared symmetric, with blocks that have no adjoint
        parts = torch.split(U, self._heights, dim=0)
        cols = []
        for j, width in enumerate(self._widths):
            acc = None
            for i, row in enumerate(self._grid):
                if row[j] is not None:
                    y = row[j]._rmatmat(parts[i])
                    acc = y if acc is None else acc + y
            cols.append(acc if acc is not None else U.new_zeros((width, U.shape[1])))
        return torch.cat(cols, dim=0)

    def _transpose(self):
        transposed = [[None if self._grid[i][j] is None else self._grid[i][j].transpose()
                       for i in range(len(self._grid))] for j in range(len(self._widths))]
        return BlockOperator(transposed, is_symmetric=self.is_symmetric)

    def _diagonal(self):
        if self._heights != self._widths:
            return super()._diagonal()
        return torch.cat([
            torch.zeros(self._heights[i], dtype=self.dtype, device=self.device) if self._grid[i][i] is None
            else self._grid[i][i]._diagonal() for i in range(len(self._grid))])

    def block(self, i: int, j: int):
        """The operator in block row i, block column j (None for a zero block)."""
        return self._grid[i][j]

    # What to_linear_operator rebuilds on other tensors (otlinop._interop_linop): the
    # blocks as written, row by row (None for a zero block); their dtypes promote again.
    def _parts(self):
        return tuple(b for row in self._blocks for b in row)

    def _from_parts(self, parts, *, dtype, device):
        ncols = len(self._widths)
        grid = [list(parts[i:i + ncols]) for i in range(0, len(parts), ncols)]
        return BlockOperator(grid, is_symmetric=self.is_symmetric)


def _as_operator(block) -> LinearOperator:
    """A block of ``BlockOperator``: an operator, or anything ``aslinearoperator`` converts."""
    if isinstance(block, LinearOperator):
        return block
    from .._interop import aslinearoperator   # at call time: the interop module imports this one
    return aslinearoperator(block)
