"""The inner products the Krylov solvers take their dots and norms from.

A solver's vectors are those of its operator. For most operators they are
whole tensors, and an inner product is a local ``vecdot`` (:data:`EUCLIDEAN`).
An operator whose vectors are split over the ranks of a ``torch.distributed``
process group says so with an attribute ``inner_products``: a
:class:`ShardedInnerProduct` (the same for its inputs and outputs), or a pair
``(outputs, inputs)`` for a rectangular operator (``lsmr``). Each rank then
computes the partial dot of its rows, and the partials are summed over the
group; every rank gets bitwise the same scalars, so every rank takes the same
steps and stops at the same iteration (a rank that stopped alone would leave
the others waiting in a collective).

The solvers find these through ``_common.setup`` (``Problem.space``); an
operator without the attribute costs nothing more than before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Euclidean", "EUCLIDEAN", "ShardedInnerProduct", "inner_products_of"]


class Euclidean:
    """The plain column-wise inner product of whole (n,) or (n, k) tensors.

    ``dot`` conjugates its first argument (``numpy.vdot``); ``dot_real`` is its
    real part (the Hermitian methods' ``r^H M r``); ``norm`` is the 2-norm per
    column; ``real_inner`` is CG's (0-d for vectors, ``out`` optional).
    ``rows`` is the slice of rows that this process counts (all of them), and
    ``reduce`` the identity: a sum over one process.
    """

    sharded = False
    rows = slice(None)

    @staticmethod
    def dot(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(U, V, dim=0)

    @staticmethod
    def dot_real(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(U, V, dim=0).real

    @staticmethod
    def norm(U: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(U, dim=0)

    @staticmethod
    def reduce(partial: torch.Tensor) -> torch.Tensor:
        return partial

    @staticmethod
    def total(rows: int) -> int:
        """The number of rows of the whole vector, given this process's."""
        return rows

    def __repr__(self) -> str:
        return "EUCLIDEAN"


#: The inner product of operators that declare none.
EUCLIDEAN = Euclidean()


class ShardedInnerProduct:
    r"""The inner product of vectors whose rows are split over a process group.

    Parameters
    ----------
    rows : int
        The number of rows of this rank's piece of a vector (``replicated``
        included); may be 0.
    group : ProcessGroup, optional
        The ``torch.distributed`` process group (None: the default group).
    replicated : int, default 0
        The first ``replicated`` rows are the same on every rank (a
        replicated block, e.g. the ``x`` part of a vector over ``(x, y)``
        with ``y`` sharded): rank 0 counts them, the other ranks skip them.
        The same on every rank.
    device : torch.device or str, optional
        Where the collective of the construction runs: the device of the
        vectors for NCCL (a GPU), the CPU (default) for gloo.

    Raises
    ------
    RuntimeError
        If ``torch.distributed`` is not initialised.
    ValueError
        If ``rows`` or ``replicated`` is negative, ``replicated > rows``, or
        ``replicated`` differs between ranks.

    Notes
    -----
    With ``U_r`` the rows of rank r's piece that it counts,

    .. math:: \langle U, V \rangle = \sum_r U_r^H V_r

    Each rank computes its partial per column, the (R, k) partials are
    all-gathered and every rank sums the same gathered tensor in the same
    way: the scalars are bitwise the same on every rank, and the same from
    run to run (the sum's order is fixed by the shape, not by the timing of
    the collective). One dot costs one all-gather of k values per rank; a
    norm is the square root of the reduced ``sum |U|^2`` (without the
    rescaling of ``torch.linalg.vector_norm``, so entries beyond ~1e154
    overflow in float64). The construction runs one all-gather (the row
    counts, so that ``size`` is the whole vector's length and every rank
    derives the same default ``maxiter`` and restart length).

    An operator declares it as its attribute ``inner_products``; the
    solvers (``cg``, ``minres``, ``gmres``, ``bicgstab``, ``lsmr``) then run
    unchanged on each rank's pieces.

    Examples
    --------
    >>> import os, tempfile, torch, torch.distributed as dist
    >>> from solvers import ShardedInnerProduct
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    >>> ip = ShardedInnerProduct(3)
    >>> U = torch.tensor([[1.0], [2.0], [2.0]], dtype=torch.float64)
    >>> ip.size, ip.norm(U).tolist()
    (3, [3.0])
    >>> dist.destroy_process_group()
    """

    sharded = True

    def __init__(self, rows: int, *, group=None, replicated: int = 0, device=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedInnerProduct: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first")
        rows, replicated = int(rows), int(replicated)
        if rows < 0 or replicated < 0 or replicated > rows:
            raise ValueError(f"ShardedInnerProduct: need 0 <= replicated <= rows, got rows={rows}, "
                             f"replicated={replicated}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.local_rows = rows
        self.replicated = replicated
        mine = torch.tensor([rows - replicated, replicated], dtype=torch.int64,
                            device=torch.device("cpu") if device is None else device)
        counts = [t.tolist() for t in self._gather(mine)]
        if len({c[1] for c in counts}) > 1:
            raise ValueError("ShardedInnerProduct: replicated must be the same on every rank, got "
                             + ", ".join(f"{c[1]} on rank {r}" for r, c in enumerate(counts)))
        #: The rows of the whole vector: the replicated block once, then every rank's own rows.
        self.size = replicated + sum(c[0] for c in counts)
        self.shard_sizes = tuple(c[0] for c in counts)
        #: The rows of this rank's piece that it counts in a dot.
        self.rows = slice(0 if self.rank == 0 else replicated, rows)

    def _gather(self, t: torch.Tensor) -> list:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of ``partial`` (any shape), the same bits on every rank."""
        if partial.is_complex():
            return torch.view_as_complex(self.reduce(torch.view_as_real(partial)))
        # Every rank reduces the same (R, ...) tensor with the same kernel: equal bits
        # everywhere, which an all_reduce does not promise across backends and algorithms.
        return torch.stack(self._gather(partial)).sum(dim=0)

    def dot(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``U^H V`` per column (0-d for vectors), summed over the group."""
        return self.reduce(torch.linalg.vecdot(U[self.rows], V[self.rows], dim=0))

    def dot_real(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """The real part of :meth:`dot` (real partials are reduced: half the bytes for complex)."""
        return self.reduce(torch.linalg.vecdot(U[self.rows], V[self.rows], dim=0).real)

    def norm(self, U: torch.Tensor) -> torch.Tensor:
        """The 2-norm per column of the whole vector."""
        return torch.sqrt(self.dot_real(U, U))

    def real_inner(self, U: torch.Tensor, V: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """CG's inner product: :meth:`dot_real`, written into ``out`` when given."""
        d = self.dot_real(U, V)
        return d if out is None else out.copy_(d)

    def total(self, rows: int) -> int:
        """The rows of the whole vector (``size``), given this rank's ``rows``."""
        if int(rows) != self.local_rows:
            raise ValueError(f"ShardedInnerProduct: built for pieces of {self.local_rows} rows, "
                             f"applied to {int(rows)}")
        return self.size

    def __repr__(self) -> str:
        return (f"ShardedInnerProduct(rows={self.local_rows}, replicated={self.replicated}, "
                f"rank={self.rank} of {self.world_size}, size={self.size})")


def inner_products_of(op) -> tuple:
    """``(outputs, inputs)``: the inner products of ``op``'s output and input
    vectors, from its ``inner_products`` attribute (one object for both, or a
    pair); :data:`EUCLIDEAN` where it has none."""
    declared = getattr(op, "inner_products", None)
    if declared is None:
        return EUCLIDEAN, EUCLIDEAN
    if isinstance(declared, tuple):
        out, inp = declared
        return (EUCLIDEAN if out is None else out), (EUCLIDEAN if inp is None else inp)
    return declared, declared
