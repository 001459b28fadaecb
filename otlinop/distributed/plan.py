"""The entropic plan with its columns sharded over a process group.

Rank ``r`` holds the block ``y[o_r : o_r + m_r]`` of the target cloud (with
the same blocks of ``g`` and ``b``) and the whole source side ``x, f, a``.
Its local plan ``P_r`` is the (n, m_r) block of columns of ``P``, so

- ``P V = sum_r P_r V_r``: local products, then one all-reduce (sum);
- ``P.T U`` has the blocks ``P_r.T U``: local, no communication;
- ``LSE_j`` over all columns merges the per-rank log-sum-exps ``L_r``: they
  are all-gathered and combined in rank order on every rank (:func:`merge_lse`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._base import LinearOperator
from ..kernels import lse_cost, plan_apply, plan_bilinear
from ..plan import plan_operator_for

__all__ = ["ShardedPlanOperator", "RingPlanOperator", "Ring", "merge_lse", "ordered_sum", "ordered_max",
           "ring_lse", "merge_lse_or_empty", "gather_sizes", "require_group", "sharded_plan_on", "ring_plan_on",
           "checked_over_group", "same_dimension"]


def merge_lse(parts) -> torch.Tensor:
    r"""The log-sum-exp of a union of blocks from the log-sum-exps of the blocks.

    Parameters
    ----------
    parts : sequence of Tensor, each of shape (n,)
        ``L_r = log sum_{j in block r} exp(z_j)``, ``-inf`` for an empty block;
        the same shape, dtype and device.

    Returns
    -------
    Tensor, shape (n,)
        ``log sum_r exp(L_r)``; ``-inf`` where every part is ``-inf``.

    Notes
    -----
    .. math:: \mathrm{out} = M + \log \sum_r \exp(L_r - M), \quad M = \max_r L_r

    The pair ``(M, sum_r exp(L_r - M))`` is the (max, sum-exp) pair of the union.
    The sum runs over the parts in the order given, one at a time: the same
    parts in the same order give bitwise the same result on every process,
    whatever collective gathered them.

    Examples
    --------
    >>> import torch
    >>> from otlinop.distributed import merge_lse
    >>> z = torch.randn(3, 7, dtype=torch.float64)
    >>> parts = [torch.logsumexp(z[:, :2], 1), torch.logsumexp(z[:, 2:2], 1), torch.logsumexp(z[:, 2:], 1)]
    >>> torch.allclose(merge_lse(parts), torch.logsumexp(z, 1))
    True
    """
    parts = list(parts)
    M = parts[0]
    for L in parts[1:]:
        M = torch.maximum(M, L)
    # All parts -inf (no column, or only zero weights): shift by 0 so exp gives 0, not nan.
    shift = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    s = torch.zeros_like(M)
    for L in parts:
        s = s + torch.exp(L - shift)
    return shift + torch.log(s)


class ShardedPlanOperator(LinearOperator):
    """The entropic plan ``P`` with its columns sharded over a process group.

    Every rank of ``group`` builds it with the same ``x, f, a, eps`` and its own
    block of columns ``y, g, b``; the blocks, in rank order, make up the target
    cloud (sizes may differ between ranks, and a block may be empty). Seen from
    one rank, it is the (n, m_local) operator whose product with the local block
    ``V_r`` of ``V`` gives the whole ``P V``.

    Parameters
    ----------
    x : Tensor, shape (n, d)
        Source points, the same on every rank.
    y : Tensor, shape (m_local, d)
        This rank's block of the target points (m_local may be 0).
    f : Tensor, shape (n,)
        Source potential, the same on every rank.
    g : Tensor, shape (m_local,)
        This rank's block of the target potential.
    eps : float
        Entropic regularisation, > 0, the same on every rank.
    a : Tensor, shape (n,), optional
        Source weights (not logs), >= 0; None means ones.
    b : Tensor, shape (m_local,), optional
        This rank's block of the target weights; None means ones.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    backend, precision : optional
        Passed to the kernels, as for ``PlanOperator``.
    group : ProcessGroup, optional
        The process group; None means the default group.

    Raises
    ------
    RuntimeError
        When ``torch.distributed`` is not initialised.
    ValueError
        When ``n`` or ``d`` differ between ranks, and for the checks of
        ``PlanOperator`` on the local data.
    TypeError
        As ``PlanOperator``.

    Notes
    -----
    ``P_ij = a_i b_j exp((f_i + g_j - c |x_i - y_j|^2) / eps)``, with ``P_r`` the
    columns ``o_r .. o_r + m_r - 1`` (``o_r`` = the sizes of the lower ranks' blocks).

    - ``P @ V``: ``V`` of shape (m_local,) or (m_local, k), the local block;
      returns ``sum_r P_r V_r``, shape (n,) or (n, k), the same on every rank
      (one streaming pass per rank, one all-reduce of n k values).
    - ``P.T @ U``: ``U`` of shape (n,) or (n, k), the same on every rank;
      returns the local block ``P_r.T U``, shape (m_local, ...), with no
      communication. ``<U, P V> = sum_r <P_r.T U, V_r>``: inner products of
      the column side need an all-reduce.
    - :meth:`row_lse` and :meth:`row_softmin`: one streaming pass per rank and an
      all-gather of n values per rank, merged in rank order (:func:`merge_lse`).
    - The construction runs one all-gather (the sizes, and the check that n and d
      agree); it does not check that ``x, f, a`` are equal across ranks.
    - The products carry no autograd graph: gradients through sharded inputs
      are not available yet.

    Examples
    --------
    On one process (a group of one rank) it is the plain plan:

    >>> import os, tempfile, torch, torch.distributed as dist
    >>> from otlinop import PlanOperator
    >>> from otlinop.distributed import ShardedPlanOperator
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> f, g = torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    >>> S = ShardedPlanOperator(x, y, f, g, eps=1.0)
    >>> v = torch.randn(4, dtype=torch.float64)
    >>> torch.allclose(S @ v, PlanOperator(x, y, f, g, eps=1.0) @ v), S.shard_sizes
    (True, (4,))
    >>> dist.destroy_process_group()
    """

    def __init__(self, x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None,
                 group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedPlanOperator: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (or pass a group)")
        local = plan_operator_for("ShardedPlanOperator", x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale,
                                  backend=backend, precision=precision)
        self.group = group
        # One all-gather at construction: the block sizes (for offsets) and the check
        # that every rank holds the same n and d (a mismatch would hang or garble a collective).
        mine = torch.tensor([x.shape[0], x.shape[1], y.shape[0]], dtype=torch.int64, device=x.device)
        everyone = self._all_gather(mine)
        n_d = {tuple(t[:2].tolist()) for t in everyone}
        if len(n_d) > 1:
            raise ValueError("ShardedPlanOperator: x must have the same shape (n, d) on every rank, got "
                             + ", ".join(f"{tuple(t[:2].tolist())} on rank {r}" for r, t in enumerate(everyone)))
        self._setup(local, tuple(int(t[2]) for t in everyone), group)

    def _setup(self, local, shard_sizes: tuple, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.shard_sizes = shard_sizes
        self.column_offset = sum(shard_sizes[:self.rank])
        self.global_shape = (local.shape[0], sum(shard_sizes))
        self.local = local
        super().__init__(local.shape, local.dtype, local.device)

    # --------------------------------------------------------- collectives
    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    # ----------------------------------------------------------------- hooks
    def _matvec(self, v):
        with torch.no_grad():
            return self._all_reduce(self.local.matvec(v))

    def _matmat(self, V):
        with torch.no_grad():
            return self._all_reduce(self.local.matmat(V))

    def _rmatvec(self, u):
        with torch.no_grad():
            return self.local.rmatvec(u)

    def _rmatmat(self, U):
        with torch.no_grad():
            return self.local.rmatmat(U)

    # ---------------------------------------------------------------- public
    @property
    def x(self) -> torch.Tensor:
        """Source points, shape (n, d) (replicated)."""
        return self.local.x

    @property
    def y(self) -> torch.Tensor:
        """This rank's block of target points, shape (m_local, d)."""
        return self.local.y

    @property
    def f(self) -> torch.Tensor:
        """Source potential, shape (n,) (replicated)."""
        return self.local.f

    @property
    def g(self) -> torch.Tensor:
        """This rank's block of the target potential, shape (m_local,)."""
        return self.local.g

    @property
    def eps(self) -> float:
        """The entropic regularisation."""
        return self.local.eps

    def row_sums(self) -> torch.Tensor:
        """``P 1`` over all columns, shape (n,), the same on every rank (one all-reduce)."""
        with torch.no_grad():
            return self._all_reduce(self.local.row_sums().clone())

    def col_sums(self) -> torch.Tensor:
        """This rank's block of ``P.T 1``, shape (m_local,) (no communication)."""
        return self.local.col_sums()

    def squared(self) -> "ShardedPlanOperator":
        """``P∘P`` (entrywise square) sharded the same way, without communication
        (``PlanOperator.squared`` on this rank's block)."""
        return sharded_plan_on(self.local.squared(), self.shard_sizes, self.group)

    def row_lse(self, h: torch.Tensor | None = None) -> torch.Tensor:
        r"""``log sum_j exp(h_j - C_ij / eps)`` over all columns, shape (n,).

        Parameters
        ----------
        h : Tensor, shape (m_local,), optional
            This rank's block of the column log-weights (``-inf`` for a zero
            weight); None means ``log b + g / eps``, the Sinkhorn update's.

        Returns
        -------
        Tensor, shape (n,)
            Bitwise the same on every rank; ``-inf`` for a row with no term.

        Notes
        -----
        Each rank computes ``L_r`` with ``otlinop.kernels.lse_cost`` on its block
        (``-inf`` for an empty block); the ``L_r`` are all-gathered and merged in
        rank order by :func:`merge_lse`. Time O(n m_local d) per rank; n values
        sent per rank.
        """
        with torch.no_grad():
            if h is None:
                h = self.local.log_b + self.local.g / self.eps
            elif not (isinstance(h, torch.Tensor) and h.shape == (self.shape[1],)):
                got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(f"ShardedPlanOperator.row_lse: h must be a tensor of shape ({self.shape[1]},) "
                                 f"(this rank's block of columns), got {got}")
            x, y = self.local.x, self.local.y
            if y.shape[0] == 0:
                L = x.new_full((x.shape[0],), float("-inf"))
            else:
                L = lse_cost(x, y, h, eps=self.eps, cost_scale=self.local.cost_scale,
                             backend=self.local.backend, precision=self.local.precision)
            return merge_lse(self._all_gather(L))

    def row_softmin(self, h: torch.Tensor | None = None) -> torch.Tensor:
        r"""The soft-min ``-eps log sum_j exp(h_j - C_ij / eps)`` over all columns, shape (n,).

        Parameters
        ----------
        h : Tensor, shape (m_local,), optional
            As in :meth:`row_lse`; None means ``log b + g / eps``, which makes
            the result the Sinkhorn update of ``f``.

        Returns
        -------
        Tensor, shape (n,)
            Bitwise the same on every rank; ``+inf`` for a row with no term.

        Notes
        -----
        ``-eps * row_lse(h)``: one streaming pass per rank and one all-gather.

        Examples
        --------
        See the class example; with a group of one rank,
        ``S.row_softmin()`` equals ``otlinop.kernels.softmin(x, y, g / eps, eps=eps)``.
        """
        return -self.eps * self.row_lse(h)


def sharded_plan_on(local, shard_sizes, group=None) -> ShardedPlanOperator:
    """The ``ShardedPlanOperator`` of this rank's checked ``PlanOperator`` block ``local`` (the whole
    rows, this rank's columns), given every rank's column count ``shard_sizes``: no communication, for
    a caller that gathered the sizes and checked that n and d agree."""
    P = ShardedPlanOperator.__new__(ShardedPlanOperator)
    P._setup(local, tuple(int(s) for s in shard_sizes), group)
    return P


# --------------------------------------------------------------------------
# Both clouds sharded: a ring over the other cloud's blocks
# --------------------------------------------------------------------------
class Ring:
    """The ranks of a process group as a ring, and the block size each rank holds.

    ``sizes[r]``: the number of points (rows of a payload) rank ``r`` holds;
    every rank passes the same list. Built once per operator (one all-gather).
    """

    def __init__(self, sizes, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sizes = tuple(int(s) for s in sizes)
        self.offset = sum(self.sizes[:self.rank])

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def map(self, block: torch.Tensor, compute) -> list:
        """``[compute(s, block_s) for s in ranks]``, the list indexed by the rank ``s`` whose block it is.

        ``block``: this rank's payload, shape (sizes[rank], w) (the same w on
        every rank). Each rank computes on its own block first, then on the
        block of rank ``r - 1``, ``r - 2``, ...: at step k it sends the block it
        holds to rank ``r + 1`` and receives the next one from ``r - 1``
        (``isend`` / ``irecv`` in one ``batch_isend_irecv``, posted before
        ``compute`` runs, so the transfer overlaps the kernel). An empty block is neither sent nor
        received: both ends know its size. ``compute`` is not called on it.
        """
        W, r = self.world_size, self.rank
        out = [None] * W
        cur = block.contiguous()
        for k in range(W):
            src, nxt = (r - k) % W, (r - k - 1) % W
            ops, recv = [], None
            if k < W - 1:
                recv = block.new_empty((self.sizes[nxt],) + tuple(block.shape[1:]))
                if self.sizes[src]:
                    ops.append(dist.P2POp(dist.isend, cur, self._global((r + 1) % W), group=self.group))
                if self.sizes[nxt]:
                    ops.append(dist.P2POp(dist.irecv, recv, self._global((r - 1) % W), group=self.group))
            # One batch for the send and the receive: NCCL then posts both in one group call,
            # so that a ring of sends cannot wait on receives not yet posted.
            reqs = dist.batch_isend_irecv(ops) if ops else []
            if self.sizes[src]:
                out[src] = compute(src, cur)
            for q in reqs:
                q.wait()
            cur = recv
        return out


def ordered_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """``sum_r t_r`` over the ranks of ``group``, added in rank order: bitwise the same on every rank.

    One all-gather; ``t`` is small (scalars, per-batch values). The backend's
    all-reduce may add in an order that depends on the algorithm it picks.
    """
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def ordered_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """The elementwise maximum of ``t`` over the ranks (exact, so any order gives the same)."""
    t = t.clone().contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def _sum_in_order(parts, like: torch.Tensor) -> torch.Tensor:
    out = None
    for p in parts:
        if p is not None:
            out = p if out is None else out + p
    return torch.zeros_like(like) if out is None else out


def merge_lse_or_empty(parts, n: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`merge_lse` of the parts that exist (None: an empty block), in the order given;
    ``-inf`` (n,) like ``like`` where there is none."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return like.new_full((n,), float("-inf"))
    return merge_lse(parts)


def gather_sizes(owner: str, x: torch.Tensor, y: torch.Tensor, group) -> tuple[tuple, tuple]:
    """``(row sizes, column sizes)`` of every rank (one all-gather); refuses a ``d`` that differs."""
    mine = torch.tensor([x.shape[0], y.shape[0], x.shape[-1]], dtype=torch.int64, device=x.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    same_dimension(owner, [int(t[2]) for t in everyone])
    return tuple(int(t[0]) for t in everyone), tuple(int(t[1]) for t in everyone)


def same_dimension(owner: str, dims) -> None:
    """ValueError unless every rank's points have the same dimension (``dims``: d of each rank)."""
    if len(set(dims)) > 1:
        raise ValueError(f"{owner}: the points must have the same dimension d on every rank, got "
                         + ", ".join(f"d={d} on rank {r}" for r, d in enumerate(dims)))


def require_group(owner: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{owner}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or pass a group)")


def ring_plan_on(local, row_sizes, col_sizes, group=None) -> "RingPlanOperator":
    """The ``RingPlanOperator`` of this rank's checked ``PlanOperator`` block ``local``, given every
    rank's row and column counts: no communication, for a caller that gathered the sizes."""
    P = RingPlanOperator.__new__(RingPlanOperator)
    P._setup(local, Ring(row_sizes, group), Ring(col_sizes, group), group)
    return P


def checked_over_group(owner: str, check, group=None, *, what: str = "inputs") -> tuple:
    """Run this rank's checks ``check()`` and learn every rank's outcome: ``(value, summaries)``.

    ``check()`` returns ``(value, summary)`` (``summary``: anything picklable that
    describes this rank's inputs, e.g. their sizes) or raises TypeError or
    ValueError. One ``all_gather_object`` of the outcomes: a refusal on one rank
    raises on every rank (the refused rank its own error, the others one that
    names it), so that no rank goes on to a collective that another left.
    ``summaries``: every rank's, in rank order; ``what`` names what was
    checked in the others' message.
    """
    try:
        value, summary = check()
        refused = None
    except (TypeError, ValueError) as err:
        value, summary, refused = None, None, err
    mine = (None if refused is None else f"{type(refused).__name__}: {refused}", summary)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if refused is not None:
        raise refused
    bad = [r for r, (message, _) in enumerate(everyone) if message is not None]
    if bad:
        raise ValueError(f"{owner}: the {what} of rank {bad[0]} were refused ({everyone[bad[0]][0]}); every rank "
                         "of the group stops")
    return value, [summary for _, summary in everyone]


class RingPlanOperator(LinearOperator):
    """The entropic plan ``P`` with both clouds sharded over a process group.

    Rank ``r`` holds a block of rows (``x, f, a``) and a block of columns
    (``y, g, b``); the blocks, in rank order, make up the two clouds (sizes
    may differ, and a block may be empty). Seen from one rank, it is the
    (n_local, m_local) operator whose product with the local block ``V_r`` of
    ``V`` gives this rank's block of rows of ``P V``.

    Parameters
    ----------
    x : Tensor, shape (n_local, d)
        This rank's block of the source points (n_local may be 0).
    y : Tensor, shape (m_local, d)
        This rank's block of the target points (m_local may be 0).
    f : Tensor, shape (n_local,)
        This rank's block of the source potential.
    g : Tensor, shape (m_local,)
        This rank's block of the target potential.
    eps : float
        Entropic regularisation, > 0, the same on every rank.
    a, b : Tensor, shapes (n_local,) and (m_local,), optional
        This rank's blocks of the weights (not logs), >= 0; None means ones.
    cost_scale : float, default 1.0
        ``c`` in ``C_ij = c |x_i - y_j|^2``.
    backend, precision : optional
        Passed to the kernels, as for ``PlanOperator``.
    group : ProcessGroup, optional
        The process group; None means the default group.

    Raises
    ------
    RuntimeError
        When ``torch.distributed`` is not initialised.
    ValueError
        When ``d`` differs between ranks, and for the checks of ``PlanOperator``
        on the local data.
    TypeError
        As ``PlanOperator``.

    Notes
    -----
    ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``; the block ``P_rs`` (rows
    of rank r, columns of rank s) is a ``PlanOperator`` on the pair
    ``(x_r, y_s)``. Every operation is a ring (:class:`Ring`): each rank
    computes on its own block of the other cloud, then on the blocks of ranks
    ``r - 1, r - 2, ...``, which arrive from rank ``r - 1`` while the kernel
    runs on the previous one (``isend`` / ``irecv``); the partial results are
    combined in rank order of the blocks, not in the order they arrived, so
    results are deterministic and bitwise the same wherever they are
    replicated.

    - ``P @ V``: ``(P V)_r = sum_s P_rs V_s``, the blocks ``[y_s | g_s | log b_s | V_s]``
      passed around; (n_local, k).
    - ``P.T @ U``: ``(P.T U)_r = sum_s P_sr.T U_s``, the blocks ``[x_s | f_s | log a_s | U_s]``
      passed around; (m_local, k).
    - :meth:`row_lse` / :meth:`col_lse` (and the soft-mins): partial
      log-sum-exps per block merged by :func:`merge_lse` in rank order.

    - :meth:`bilinear`: ``sum_j P_ij <W_i, V_j> Y_j``, a ring of
      ``plan_bilinear`` passes; :meth:`squared`: ``P∘P`` on the same blocks.

    Per operation and rank: W - 1 messages of the other cloud's blocks
    (about ``m (d + 2 + k) / W`` values each for ``P @ V``) and kernels
    over ``n_local x m`` entries in all. The products carry no autograd
    graph. ``P.T`` is the ring plan of the transpose (the same blocks, rows
    and columns swapped; built once, no communication); ``row_sums()`` and
    ``col_sums()`` are cached. Not symmetric.

    Examples
    --------
    >>> import os, tempfile, torch, torch.distributed as dist
    >>> from otlinop import PlanOperator
    >>> from otlinop.distributed import RingPlanOperator
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> f, g = torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    >>> S = RingPlanOperator(x, y, f, g, eps=1.0)
    >>> u = torch.randn(5, dtype=torch.float64)
    >>> torch.allclose(S.T @ u, PlanOperator(x, y, f, g, eps=1.0).T @ u), S.global_shape
    (True, (5, 4))
    >>> dist.destroy_process_group()
    """

    def __init__(self, x, y, f, g, *, eps, a=None, b=None, cost_scale=1.0, backend=None, precision=None,
                 group=None):
        owner = "RingPlanOperator"
        require_group(owner)
        local = plan_operator_for(owner, x, y, f, g, eps=eps, a=a, b=b, cost_scale=cost_scale,
                                  backend=backend, precision=precision)
        rows, cols = gather_sizes(owner, x, y, group)
        self._setup(local, Ring(rows, group), Ring(cols, group), group)

    def _setup(self, local, rows: Ring, cols: Ring, group, transpose_of=None):
        self.group = group
        self.rows, self.cols = rows, cols
        self.rank, self.world_size = rows.rank, rows.world_size
        self.global_shape = (sum(rows.sizes), sum(cols.sizes))
        self.local = local
        self.x, self.y, self.f, self.g = local.x, local.y, local.f, local.g
        self.eps, self.cost_scale = local.eps, local.cost_scale
        self.backend, self.precision = local.backend, local.precision
        self._row_sums = None
        super().__init__(local.shape, local.dtype, local.device, transpose_of=transpose_of)

    # ------------------------------------------------------------ attributes
    @property
    def row_sizes(self) -> tuple:
        """The number of rows each rank holds, in rank order."""
        return self.rows.sizes

    @property
    def col_sizes(self) -> tuple:
        """The number of columns each rank holds, in rank order."""
        return self.cols.sizes

    @property
    def row_offset(self) -> int:
        """The index of this rank's first row in the whole plan."""
        return self.rows.offset

    @property
    def col_offset(self) -> int:
        """The index of this rank's first column in the whole plan."""
        return self.cols.offset

    def _opts(self) -> dict:
        return dict(eps=self.eps, cost_scale=self.cost_scale, backend=self.backend, precision=self.precision)

    # ----------------------------------------------------------------- hooks
    def _ring_columns(self, V, width: int, kernel):
        """``sum_s kernel(y_s, g_s, log b_s, V_s)`` over every rank's block of columns, added in rank
        order: the blocks ``[y_s | g_s | log b_s | V_s]`` pass around the ring; ``V`` (m_local, c) is
        this rank's operand block, ``kernel`` returns (n_local, width) for this rank's rows."""
        y, g, d, n = self.y, self.g, self.x.shape[-1], self.x.shape[0]
        dt = V.dtype
        payload = torch.cat([y.to(dt), g.unsqueeze(-1).to(dt), self.local.log_b.unsqueeze(-1).to(dt), V], -1)

        def compute(s, blk):
            if n == 0:
                return None
            return kernel(blk[:, :d].to(y.dtype), blk[:, d].to(g.dtype), blk[:, d + 1], blk[:, d + 2:])

        with torch.no_grad():
            return _sum_in_order(self.cols.map(payload, compute), V.new_zeros((n, width)))

    def _matmat(self, V):
        def kernel(ys, gs, log_bs, Vs):
            return plan_apply(self.x, ys, self.f, gs, Vs, log_a=self.local.log_a, log_b=log_bs, **self._opts())
        return self._ring_columns(V, V.shape[1], kernel)

    def _matvec(self, v):
        return self._matmat(v.unsqueeze(-1)).squeeze(-1)

    def _adjoint(self) -> "RingPlanOperator":
        # P.T is the ring of the other cloud: the same blocks, the roles of rows and columns swapped.
        T = RingPlanOperator.__new__(RingPlanOperator)
        T._setup(self.local.T, self.cols, self.rows, self.group, transpose_of=self)
        return T

    def _rmatvec(self, u):
        return self.adjoint()._matvec(u)

    def _rmatmat(self, U):
        return self.adjoint()._matmat(U)

    # ---------------------------------------------------------------- public
    def row_sums(self) -> torch.Tensor:
        """This rank's block of ``P 1``, shape (n_local,) (a ring over the column blocks; cached)."""
        if self._row_sums is None:
            self._row_sums = self._matvec(self.y.new_ones(self.shape[1]))
        return self._row_sums

    def col_sums(self) -> torch.Tensor:
        """This rank's block of ``P.T 1``, shape (m_local,) (a ring over the row blocks; cached on ``P.T``)."""
        return self.adjoint().row_sums()

    def squared(self) -> "RingPlanOperator":
        """``P∘P`` (entrywise square) on the same blocks, without communication: the plan of
        ``PlanOperator.squared`` (``eps / 2``, squared weights) around the same rings."""
        sq = RingPlanOperator.__new__(RingPlanOperator)
        sq._setup(self.local.squared(), self.rows, self.cols, self.group)
        return sq

    def bilinear(self, W: torch.Tensor, V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``out_i = sum_j P_ij <W_i, V_j> Y_j`` over all columns, for this rank's rows.

        Parameters
        ----------
        W : Tensor, shape (n_local, k)
            This rank's rows of the row factors.
        V : Tensor, shape (m_local, k)
        Y : Tensor, shape (m_local, e)
            This rank's blocks of the column factors and of the operand.

        Returns
        -------
        Tensor, shape (n_local, e)
            No autograd graph.

        Notes
        -----
        A ring of ``plan_bilinear`` passes (``PlanOperator.bilinear``'s kernel)
        over the blocks ``[y_s | g_s | log b_s | V_s | Y_s]``, added in rank order.
        """
        n, m = self.shape
        if not (W.ndim == V.ndim == Y.ndim == 2 and W.shape[0] == n and tuple(V.shape) == (m, W.shape[1])
                and Y.shape[0] == m):
            raise ValueError(f"RingPlanOperator.bilinear: expected W ({n}, k), V ({m}, k) and Y ({m}, e) (this "
                             f"rank's blocks), got W {tuple(W.shape)}, V {tuple(V.shape)}, Y {tuple(Y.shape)}")
        k = W.shape[1]

        def kernel(ys, gs, log_bs, VY):
            return plan_bilinear(self.x, ys, self.f, gs, W, VY[:, :k], VY[:, k:], log_a=self.local.log_a,
                                 log_b=log_bs, **self._opts())
        return self._ring_columns(torch.cat([V, Y], 1), Y.shape[1], kernel)

    def _lse(self, x, y, h, ring: Ring, name: str, owner: str) -> torch.Tensor:
        if not (isinstance(h, torch.Tensor) and h.shape == (y.shape[0],)):
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"RingPlanOperator.{owner}: h must be a tensor of shape ({y.shape[0]},) (this rank's "
                             f"block of the {name}), got {got}")
        return ring_lse(x, y, h, ring, **self._opts())

    def row_lse(self, h: torch.Tensor | None = None) -> torch.Tensor:
        r"""``log sum_j exp(h_j - C_ij / eps)`` over all columns, for this rank's rows, shape (n_local,).

        Parameters
        ----------
        h : Tensor, shape (m_local,), optional
            This rank's block of the column log-weights (``-inf`` for a zero
            weight); None means ``log b + g / eps``, the Sinkhorn update's.

        Returns
        -------
        Tensor, shape (n_local,)
            ``-inf`` for a row with no term.

        Notes
        -----
        A ring over the blocks ``[y_s | h_s]``: one ``lse_cost`` pass per block,
        the parts merged in rank order (:func:`merge_lse`).
        """
        h = self.local.log_b + self.g / self.eps if h is None else h
        return self._lse(self.x, self.y, h, self.cols, "columns", "row_lse")

    def col_lse(self, h: torch.Tensor | None = None) -> torch.Tensor:
        r"""``log sum_i exp(h_i - C_ij / eps)`` over all rows, for this rank's columns, shape (m_local,).

        Parameters
        ----------
        h : Tensor, shape (n_local,), optional
            This rank's block of the row log-weights; None means ``log a + f / eps``.

        Returns
        -------
        Tensor, shape (m_local,)
            ``-inf`` for a column with no term.
        """
        h = self.local.log_a + self.f / self.eps if h is None else h
        return self._lse(self.y, self.x, h, self.rows, "rows", "col_lse")

    def row_softmin(self, h: torch.Tensor | None = None) -> torch.Tensor:
        """``-eps * row_lse(h)``: the Sinkhorn update of this rank's block of ``f``."""
        return -self.eps * self.row_lse(h)

    def col_softmin(self, h: torch.Tensor | None = None) -> torch.Tensor:
        """``-eps * col_lse(h)``: the Sinkhorn update of this rank's block of ``g``."""
        return -self.eps * self.col_lse(h)


def ring_lse(x, y, h, ring: Ring, *, eps, cost_scale=1.0, backend=None, precision=None) -> torch.Tensor:
    """``log sum_j exp(h_j - C_ij / eps)`` for the local rows ``x`` (n, d) over the columns of every
    rank (``y`` (m_local, d) and ``h`` (m_local,) this rank's block; ``ring`` their sizes), merged in rank order."""
    d, n = x.shape[-1], x.shape[0]
    payload = torch.cat([y.to(h.dtype), h.unsqueeze(-1)], -1)

    def compute(s, blk):
        if n == 0:
            return None
        return lse_cost(x, blk[:, :d].to(y.dtype), blk[:, d], eps=eps, cost_scale=cost_scale, backend=backend,
                        precision=precision)

    with torch.no_grad():
        return merge_lse_or_empty(ring.map(payload, compute), n, h)
