"""Operators and algorithms sharded over the ranks of a ``torch.distributed`` process group.

Columns sharded, x replicated:

- :class:`ShardedPlanOperator`: the entropic plan with its columns (the
  ``y`` cloud, its weights ``b`` and potential ``g``) split over the ranks,
  ``x``, ``f``, ``a`` replicated. Products and row soft-mins run the same
  streaming kernels as ``PlanOperator`` on each rank's block of columns and
  combine the partial results with collectives.
- :func:`merge_lse`: the fixed-order merge of per-rank log-sum-exps, so that
  every rank gets bitwise the same row soft-min.
- :class:`ShardedHessianOperator`, :class:`ShardedDualHessianOperator`: the
  dual Hessian and its Schur complement on a sharded plan (either layout),
  whose vectors declare their inner product over the group
  (``solvers.ShardedInnerProduct``): the Krylov solvers of ``solvers`` run on
  them unchanged.
- :func:`hvp`, :func:`hvp_x`, :func:`hvp_y`, :func:`loss_hessian_operator`:
  ``otlinop.hvp``'s functions over a group (``group=``), with ``y`` sharded
  (``sharded="y"``, the default) or both clouds (``sharded="xy"``, on a
  :class:`RingPlanOperator`); ``otlinop.hvp_x`` and the others route
  DTensors sharded on the point dimension to the latter.

Both clouds sharded (each rank a block of rows and a block of columns):

- :class:`RingPlanOperator`: the plan's products and log-sum-exps by a ring
  over the other cloud's blocks (``isend`` / ``irecv`` overlapping the kernels),
  merged in rank order.
- :func:`sinkhorn`: ``otlinop.sinkhorn`` on local shards plus a group
  (``otlinop.sinkhorn`` routes DTensors sharded on the point dimension here),
  returning a :class:`ShardedSinkhornResult`.
- :func:`sinkhorn_loss`: ``otlinop.sinkhorn_loss`` on local shards, with its
  gradients w.r.t. each rank's points and weights (``SamplesLoss`` and
  ``otlinop.sinkhorn_loss`` route DTensors here).

Any backend of ``torch.distributed`` works: gloo on the CPU (the tests),
NCCL on GPUs.
"""

from .plan import ShardedPlanOperator, merge_lse
# Both clouds sharded (issue 25, items 1-3).
from .plan import RingPlanOperator
from .sinkhorn import ShardedSinkhornResult, sinkhorn
from .loss import sinkhorn_loss

# Second order over the group (the Schur complement, HVPs, the loss Hessian).
from .hessian import ColumnShardedPlan, ShardedDualHessianOperator, ShardedHessianOperator  # noqa: E402
from .hvp import ShardedLossHessianOperator, hvp, hvp_x, hvp_y, loss_hessian_operator  # noqa: E402

__all__ = ["ShardedPlanOperator", "merge_lse",
           "RingPlanOperator", "sinkhorn", "ShardedSinkhornResult", "sinkhorn_loss"]
__all__ += ["ColumnShardedPlan", "ShardedHessianOperator", "ShardedDualHessianOperator", "hvp", "hvp_x", "hvp_y",
            "loss_hessian_operator", "ShardedLossHessianOperator"]
