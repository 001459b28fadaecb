"""Operators sharded over the ranks of a ``torch.distributed`` process group.

- :class:`ShardedPlanOperator`: the entropic plan with its columns (the
  ``y`` cloud, its weights ``b`` and potential ``g``) split over the ranks,
  ``x``, ``f``, ``a`` replicated. Products and row soft-mins run the same
  streaming kernels as ``PlanOperator`` on each rank's block of columns and
  combine the partial results with collectives.
- :func:`merge_lse`: the fixed-order merge of per-rank log-sum-exps, so that
  every rank gets bitwise the same row soft-min.

Any backend of ``torch.distributed`` works: gloo on the CPU (the tests),
NCCL on GPUs.
"""

from .plan import ShardedPlanOperator, merge_lse

__all__ = ["ShardedPlanOperator", "merge_lse"]
