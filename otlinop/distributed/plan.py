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
from ..kernels import lse_cost
from ..plan import plan_operator_for

__all__ = ["ShardedPlanOperator", "merge_lse"]


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
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # One all-gather at construction: the block sizes (for offsets) and the check
        # that every rank holds the same n and d (a mismatch would hang or garble a collective).
        mine = torch.tensor([x.shape[0], x.shape[1], y.shape[0]], dtype=torch.int64, device=x.device)
        everyone = self._all_gather(mine)
        n_d = {tuple(t[:2].tolist()) for t in everyone}
        if len(n_d) > 1:
            raise ValueError("ShardedPlanOperator: x must have the same shape (n, d) on every rank, got "
                             + ", ".join(f"{tuple(t[:2].tolist())} on rank {r}" for r, t in enumerate(everyone)))
        self.shard_sizes = tuple(int(t[2]) for t in everyone)
        self.column_offset = sum(self.shard_sizes[:self.rank])
        self.global_shape = (x.shape[0], sum(self.shard_sizes))
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
