"""The Sinkhorn dual Hessian and its Schur complement on a plan sharded over a process group.

The dual Hessian of ``otlinop.hessian``

    K = [[kx Diag(ah), P], [P.T, ky Diag(bh)]],   ah = P 1, bh = P.T 1,

acts on ``(z1, z2)`` (z1 over the sources, z2 over the targets), and its Schur
complement on ``g`` is

    S = ky Diag(bh) - P.T Diag(1 / (kx ah)) P + shift I.

Two layouts of the plan, one code:

- the columns (a ``ShardedPlanOperator``, seen as a :class:`ColumnShardedPlan`):
  rank ``r`` holds the columns ``P_r`` (its block ``y_r, g_r, b_r``, the whole
  source side); ``ah`` and ``z1`` are replicated (the same on every rank),
  ``bh`` and ``z2`` split like the columns. ``S v_r = ky bh_r v_r - P_r.T (w *
  sum_s P_s v_s) + shift v_r``: one local pass, an all-reduce of n k values,
  one local pass.
- both clouds (a ``RingPlanOperator``): rank ``r`` holds a block of rows and one
  of columns; ``ah``, ``z1`` are split like the rows and ``bh``, ``z2`` like the
  columns. ``S v_r`` is two rings: ``P v`` (this rank's rows), then ``P.T``
  of ``w * P v`` (this rank's columns).

Both operators declare their vectors' inner product
(``solvers.ShardedInnerProduct``: the replicated rows counted once), so the
Krylov solvers run on them unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from solvers import ShardedInnerProduct, cg

from .._base import LinearOperator
from .._operators.concrete import Diag
from ..hessian import hessian_options, row_weight, schur_diagonal
from .plan import RingPlanOperator, ShardedPlanOperator

__all__ = ["ColumnShardedPlan", "ShardedHessianOperator", "ShardedDualHessianOperator", "sharded_plan",
           "replicated_rows"]


class ColumnShardedPlan(LinearOperator):
    """A ``ShardedPlanOperator`` seen with the methods that the HVP formulas call.

    Shape (n, m_local), as the sharded plan: ``P @ V`` takes this rank's block
    of V and returns the whole ``P V`` (one all-reduce); ``P.T`` is the local
    plan's transpose ``P_r.T`` (its products, ``row_sums`` and ``bilinear``
    need no communication). ``row_sums()`` is ``P 1`` over all columns,
    cached; ``bilinear`` sums the local passes over the group.

    Parameters
    ----------
    plan : ShardedPlanOperator

    Notes
    -----
    No autograd graph: the products run under ``torch.no_grad()`` (as the
    sharded plan's). One product costs one streaming pass over n x m_local and
    one all-reduce of n k values.
    """

    def __init__(self, plan: ShardedPlanOperator):
        if not isinstance(plan, ShardedPlanOperator):
            raise TypeError(f"ColumnShardedPlan: plan must be a ShardedPlanOperator, got {type(plan).__name__}")
        self.plan, self.group, self.eps = plan, plan.group, plan.eps
        self.local = plan.local
        self._row_sums = None
        super().__init__(plan.shape, plan.dtype, plan.device)

    def _matvec(self, v):
        return self.plan @ v

    def _matmat(self, V):
        return self.plan @ V

    def _rmatvec(self, u):
        return self.local.T @ u

    def _rmatmat(self, U):
        return self.local.T @ U

    def _adjoint(self):
        # Every product of P.T is local: the local plan's transpose is all of it.
        return self.local.T

    def row_sums(self) -> torch.Tensor:
        """``P 1`` over all columns, shape (n,), the same on every rank (cached)."""
        if self._row_sums is None:
            self._row_sums = self.plan.row_sums()
        return self._row_sums

    def col_sums(self) -> torch.Tensor:
        """This rank's block of ``P.T 1``, shape (m_local,)."""
        return self.plan.col_sums()

    def bilinear(self, W: torch.Tensor, V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``out_i = sum_j P_ij <W_i, V_j> Y_j`` over all columns, shape (n, e);
        ``V`` (m_local, k) and ``Y`` (m_local, e) are this rank's blocks."""
        out = self.local.bilinear(W, V, Y).contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def squared(self) -> "ColumnShardedPlan":
        """``P∘P`` in the same layout (no communication)."""
        return ColumnShardedPlan(self.plan.squared())


def sharded_plan(owner: str, P):
    """The plan of a sharded Hessian: a ``ColumnShardedPlan`` (a ``ShardedPlanOperator`` is wrapped in
    one) or a ``RingPlanOperator``; TypeError for anything else."""
    if isinstance(P, (ColumnShardedPlan, RingPlanOperator)):
        return P
    if isinstance(P, ShardedPlanOperator):
        return ColumnShardedPlan(P)
    raise TypeError(f"{owner}: P must be a ShardedPlanOperator (the columns sharded) or a RingPlanOperator (both "
                    f"clouds sharded), got {type(P).__name__}")


def replicated_rows(P) -> int:
    """How many of this rank's rows of the plan every rank holds too: all n of a ``ColumnShardedPlan``
    (the source side is replicated), none of a ``RingPlanOperator``."""
    return P.shape[0] if isinstance(P, ColumnShardedPlan) else 0


class ShardedHessianOperator(LinearOperator):
    r"""The Schur complement ``S`` of the dual Hessian, with ``g`` sharded over a process group.

    Every rank builds it with its own sharded plan and the same options;
    seen from one rank it maps this rank's block of a vector over the m
    targets to the same block of ``S v``.

    Parameters
    ----------
    P : ShardedPlanOperator or RingPlanOperator
        The plan: its columns split over the group (the rows replicated), or
        both clouds split (a block of rows and one of columns per rank).
    eps : float
        The entropic regularisation (the plan's).
    reach_x, reach_y : float, optional
        Relaxation of each marginal (None: hard), as in ``HessianOperator``.
    ridge : float, optional
        Relative ridge: ``ridge * mean(P.T 1)`` (the mean over all m columns)
        is added to the diagonal; default ``otlinop.hessian.DEFAULT_RIDGE``.

    Raises
    ------
    TypeError
        If ``P`` is neither a ``ShardedPlanOperator`` nor a ``RingPlanOperator``.
    ValueError
        For the checks of ``HessianOperator`` on eps, the reaches and ridge.

    Notes
    -----
    ``S = ky Diag(bh) - P.T Diag(1 / (kx ah)) P + ridge mean(bh) I`` with
    ``ah = P 1`` and ``bh = P.T 1`` (``otlinop.HessianOperator``; a row of zero
    mass gets weight 0).

    * Shape (m_local, m_local) on each rank; the whole S is (m, m), symmetric
      positive semi-definite (``is_symmetric``, ``is_psd``), with the constants
      as null space when both marginals are hard and ``ridge == 0``.
    * ``inner_products``: a ``solvers.ShardedInnerProduct`` over the group,
      so ``solvers.cg(S, rhs_r)`` solves the whole system, every dot reduced.
    * One product, columns sharded: a local pass (``P_r v_r``), an all-reduce
      of n k values, a local pass (``P_r.T``): O(n m_local (d + k)) time per
      rank. Both sharded: two rings (``P v`` for this rank's rows, ``P.T`` of
      ``w * P v`` for its columns), each W - 1 messages of about
      ``(m + n) / W (d + 2 + k)`` values and kernels over n_local x m and
      m_local x n entries.
    * ``diagonal()`` is the exact diagonal of this rank's block (one pass over
      ``P∘P``: local for the columns layout, a ring over the row blocks for
      both), for ``solvers.jacobi``; ``splitting()`` gives ``(D, N)`` for
      ``solvers.neumann``.
    * The construction costs the marginals (columns: a local pass and an
      all-reduce of n values for ``ah``, a local pass for ``bh``; both: a
      ring each) and one all-gather of the column counts and of ``sum bh``.

    Examples
    --------
    See :func:`otlinop.distributed.hvp_x`; on one process (a group of one
    rank) it equals ``otlinop.HessianOperator``:

    >>> import os, tempfile, torch, torch.distributed as dist, solvers
    >>> from otlinop import HessianOperator
    >>> from otlinop.distributed import ShardedPlanOperator, ShardedHessianOperator
    >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "s"),
    ...                         rank=0, world_size=1)
    >>> x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    >>> f, g = torch.zeros(6, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    >>> S = ShardedHessianOperator(ShardedPlanOperator(x, y, f, g, eps=1.0), eps=1.0)
    >>> v = torch.randn(5, dtype=torch.float64)
    >>> torch.allclose(S @ v, HessianOperator(x, y, f, g, eps=1.0) @ v)
    True
    >>> dist.destroy_process_group()
    """

    is_symmetric = True
    is_psd = True

    def __init__(self, P, *, eps, reach_x=None, reach_y=None, ridge=None):
        owner = "ShardedHessianOperator"
        self._build(sharded_plan(owner, P), hessian_options(owner, eps, reach_x, reach_y, ridge))

    @classmethod
    def _on_plan(cls, P, options: tuple) -> "ShardedHessianOperator":
        self = cls.__new__(cls)
        self._build(P, options)
        return self

    def _build(self, P, options: tuple):
        eps, kx, ky, ridge = options
        self.P, self.eps, self.kx, self.ky, self.group = P, eps, kx, ky, P.group
        m_local = P.shape[1]
        self.inner_products = ShardedInnerProduct(m_local, group=P.group, device=P.device)
        ah, bh = P.row_sums(), P.col_sums()
        # The ridge is relative to the mean of bh over all m columns, not this rank's.
        total = self.inner_products.reduce(bh.sum())
        self.shift = ridge * total / self.inner_products.size
        self.D = ky * bh + self.shift
        self._row_weight = row_weight(kx * ah)
        self.N = P.T @ Diag(self._row_weight, psd=True) @ P
        self._S = Diag(self.D, psd=True) - self.N
        super().__init__((m_local, m_local), P.dtype, P.device, is_symmetric=True, is_psd=True)

    def _matvec(self, v):
        return self._S._matvec(v)

    def _matmat(self, V):
        return self._S._matmat(V)

    def _diagonal(self):
        return schur_diagonal(self.D, self.P.squared().T @ self._row_weight)

    def splitting(self):
        return self.D, self.N


class ShardedDualHessianOperator(LinearOperator):
    r"""``K = [[kx Diag(P 1), P], [P.T, ky Diag(P.T 1)]]`` on a plan sharded over a group.

    Parameters
    ----------
    P : ShardedPlanOperator or RingPlanOperator
        The plan, its columns split over the group, or both clouds.
    eps, reach_x, reach_y, ridge
        As :class:`ShardedHessianOperator` (the ridge is its Schur complement's).

    Raises
    ------
    TypeError, ValueError
        As :class:`ShardedHessianOperator`.

    Notes
    -----
    * Seen from one rank, shape (n + m_local, n + m_local) (columns layout)
      or (n_local + m_local, n_local + m_local) (both): a vector is ``(z1,
      z2_r)``, ``z1`` over the n sources (the same on every rank) or this
      rank's block of them, and ``z2_r`` this rank's block over the targets.
      Its ``inner_products`` count a replicated ``z1`` once (on rank 0), a
      split one on every rank, and every rank's ``z2_r``.
    * The whole K is symmetric PSD; null space ``(1, -1)`` with hard marginals.
    * One product: ``kx ah z1 + P z2`` and ``P.T z1 + ky bh z2``: a local
      pass and an all-reduce, and a local pass (columns); two rings (both).
    * :meth:`solve` goes through the Schur complement ``schur`` (a
      :class:`ShardedHessianOperator`), as ``DualHessianOperator.solve``.
    """

    def __init__(self, P, *, eps, reach_x=None, reach_y=None, ridge=None):
        owner = "ShardedDualHessianOperator"
        self._setup(sharded_plan(owner, P), hessian_options(owner, eps, reach_x, reach_y, ridge))

    @classmethod
    def _on_plan(cls, P, options: tuple) -> "ShardedDualHessianOperator":
        self = cls.__new__(cls)
        self._setup(P, options)
        return self

    def _setup(self, P, options: tuple):
        self.schur = ShardedHessianOperator._on_plan(P, options)
        self.P, self.eps, self.kx, self.ky, self.group = P, self.schur.eps, self.schur.kx, self.schur.ky, P.group
        n, m_local = P.shape
        self._row_scale = self.kx * P.row_sums()
        self._col_scale = self.ky * P.col_sums()
        # A row of zero mass (a_i = 0) gives z1_i = 0 (otlinop.hessian.row_weight says why).
        self._has_mass = (self._row_scale > 0).to(self._row_scale.dtype)
        self._safe_scale = torch.where(self._row_scale > 0, self._row_scale, torch.ones_like(self._row_scale))
        self.inner_products = ShardedInnerProduct(n + m_local, group=P.group, replicated=replicated_rows(P),
                                                  device=P.device)
        super().__init__((n + m_local, n + m_local), P.dtype, P.device, is_symmetric=True, is_psd=True)

    def _matmat(self, Z):
        n = self.P.shape[0]
        z1, z2 = Z[:n], Z[n:]
        return torch.cat([self._row_scale[:, None] * z1 + self.P @ z2,
                          self.P.T @ z1 + self._col_scale[:, None] * z2])

    def solve(self, r: torch.Tensor, *, solver=cg, M=None, **options):
        r"""A solution of ``K z = r`` through the Schur complement, over the group.

        Parameters
        ----------
        r : Tensor, shape (rows,) or (rows, k)
            ``(r1, r2_r)``: ``r1`` over the sources (the same on every rank
            with the columns sharded, this rank's block with both), ``r2_r``
            this rank's block over the targets; ``rows = P.shape[0] + m_local``.
        solver : callable, default ``solvers.cg``
            ``solver(S, rhs, M=M, **options)`` returning a ``SolveResult``;
            it must take its inner products from the operator (every solver
            of ``solvers`` does).
        M : preconditioner for S, optional
            An operator or a factory such as ``solvers.jacobi()``.
        **options
            ``rtol``, ``atol``, ``maxiter``, ``x0``, passed on.

        Returns
        -------
        z : Tensor, shape of r
            ``(z1, z2_r)``, laid out as ``r``.
        result : SolveResult
            Of the inner solve (the same status and iterations on every rank).

        Raises
        ------
        ValueError
            If r does not have ``P.shape[0] + m_local`` rows.

        Notes
        -----
        ``S z2 = r2 - P.T (r1 / (kx ah))``, ``z1 = (r1 - P z2) / (kx ah)``:
        the products of ``P`` and ``P.T`` around the solve are local passes
        and an all-reduce (columns) or rings (both).
        """
        n = self.P.shape[0]
        if not isinstance(r, torch.Tensor) or r.ndim not in (1, 2) or r.shape[0] != self.shape[0]:
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"ShardedDualHessianOperator.solve: r must have shape ({self.shape[0]},) or "
                             f"({self.shape[0]}, k) ({n} rows over the sources, then this rank's "
                             f"{self.shape[0] - n} over the targets), got {got}")
        r1, r2 = r[:n], r[n:]
        scale, mass = self._safe_scale, self._has_mass
        if r.ndim == 2:
            scale, mass = scale[:, None], mass[:, None]
        result = solver(self.schur, r2 - self.P.T @ (r1 / scale * mass), M=M, **options)
        z2 = result.x
        z1 = (r1 - self.P @ z2) / scale * mass
        return torch.cat([z1, z2]), result
