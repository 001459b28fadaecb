r"""Multiscale (block-sparse) transport in low dimension: clustering, the kept pattern, its certificate,
and the block-sparse plan operator.

In dimension d <= 3, at a blur much smaller than the spread of the points,
almost every entry of the plan ``P_ij = a_i b_j exp((f_i + g_j - c|x_i - y_j|^2) / eps)``
underflows. This module groups the points of both clouds into the cells of one
grid and keeps, for each pair of cells, either all of its entries or none:

- :func:`cluster_grid`: the cells of width ``scale`` (one grid for both clouds,
  cells in Morton / Z order so that neighbouring cells are near in memory),
  points permuted by a device sort, cluster starts, centroids, weights and
  bounding boxes by segment sums (no host loop over clusters).
- :func:`coarse_pattern`: GeomLoss' ``truncate`` rule on the centroids: the pair
  (I, J) is kept iff ``F_I + G_J > c |X_I - Y_J|^2 - truncate * eps`` for the
  coarse potentials ``(F, G)`` at the coarse ``eps``; and every row and column
  keeps at least its best pair.
- :func:`prune_pattern`: the re-pruning as eps decreases: the pairs of the
  jump's pattern whose box-gap bound on the plan mass, at finer potentials,
  is not below a tolerance.
- :func:`truncation_bound`: a certified bound on the plan mass that the pattern
  drops, at given potentials, from the clusters' bounding boxes.
- :class:`BlockSparsePlanOperator`: the plan restricted to the pattern, an
  operator in the caller's point order with the interface of ``PlanOperator``.
- :class:`Multiscale`: the public options (``cluster_scale``, ``truncate``, ``prune_tol``).

Layout (shared with the kernels of ``otlinop.kernels.blocksparse``): the
points of cluster I occupy rows ``starts[I]:starts[I + 1]`` of the permuted
cloud; the pattern is a CSR over row clusters (``ptr``, ``idx``, column ids
sorted inside a row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from solvers._function import Function

from ._base import LinearOperator
from ._checks import Geometry, fraction, matrix, positive_scalar
from ._operators.concrete import Diag
from .kernels.blocksparse import blocksparse_apply, blocksparse_softmin, transpose_pattern

__all__ = ["Multiscale", "MAX_DIMENSION", "Clustering", "Pattern", "cluster_grid", "default_cluster_scale",
           "coarse_pattern", "prune_pattern", "kept_entries", "truncation_bound", "BlockSparsePlanOperator"]

#: The largest dimension multiscale serves: a cell has 3^d - 1 neighbours and the
#: number of cells grows as (diameter / scale)^d, so the coarse problem and the pattern
#: stop being small against the points beyond d = 3 (and the plan stops being sparse).
MAX_DIMENSION = 3

#: Entries of one (row chunk x column clusters) block of the cluster-pair computations.
_PAIR_BLOCK = 1 << 22

#: Bits of the Morton key: 62 in all, shared out among the d coordinates.
_KEY_BITS = 62


class Multiscale:
    r"""Options of the multiscale (block-sparse) Sinkhorn solver: ``sinkhorn(..., multiscale=Multiscale(...))``.

    Parameters
    ----------
    cluster_scale : float, optional
        Width of the grid cells that cluster the points (the blur below which
        the solver leaves the centroids for the points). Default, as GeomLoss:
        ``diameter / (sqrt(d) * 2000 ** (1 / d))`` (about 2000 cells over the
        bounding box).
    truncate : float, default 5.0
        GeomLoss' kernel truncation: a pair of clusters (I, J) is kept iff
        ``F_I + G_J > c |X_I - Y_J|^2 - truncate * eps`` at the coarse
        potentials, centroids and eps of the jump to the points; larger keeps
        more pairs (more accurate, slower).
    prune_tol : float or None, default 1e-12
        After each step of the schedule below the jump, the kept pairs are
        re-pruned at that step's eps and potentials (``prune_pattern``): a
        pair goes when its certified plan mass, with an allowance for the
        potentials' last change, is below ``prune_tol`` of every row's and
        column's weight. If the certificate at the final potentials then
        exceeds the jump pattern's by more than ``prune_tol``, the solver
        returns to the jump's pattern and finishes there. None keeps the
        jump's pattern throughout.

    Raises
    ------
    TypeError, ValueError
        For a ``cluster_scale`` or ``truncate`` that is not a positive number,
        or a ``prune_tol`` that is neither None nor in (0, 1).

    Notes
    -----
    The algorithm, its certificate (``SinkhornResult.truncation_bound``) and
    its costs: docs/multiscale.md.

    Examples
    --------
    >>> import torch, otlinop
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.rand(300, 2, dtype=torch.float64), torch.rand(200, 2, dtype=torch.float64)
    >>> res = otlinop.sinkhorn(x, y, blur=0.1, multiscale=otlinop.Multiscale(cluster_scale=0.05))
    >>> res.converged, res.plan.shape, res.plan.fill < 0.25, res.truncation_bound[0] < 0.02
    (True, (300, 200), True, True)
    """

    def __init__(self, cluster_scale=None, truncate=5.0, prune_tol=1e-12):
        owner = "Multiscale"
        self.cluster_scale = None if cluster_scale is None else positive_scalar(owner, "cluster_scale",
                                                                                  cluster_scale)
        self.truncate = positive_scalar(owner, "truncate", truncate, "GeomLoss' default is 5")
        self.prune_tol = None if prune_tol is None else fraction(
            owner, "prune_tol", prune_tol, "the dropped plan mass allowed to the re-pruning, relative to the "
            "weights; None keeps the jump's pattern")

    def __repr__(self) -> str:
        return (f"Multiscale(cluster_scale={self.cluster_scale}, truncate={self.truncate}, "
                f"prune_tol={self.prune_tol})")

    def __eq__(self, other) -> bool:
        return (isinstance(other, Multiscale) and other.cluster_scale == self.cluster_scale
                and other.truncate == self.truncate and other.prune_tol == self.prune_tol)

    __hash__ = None


def default_cluster_scale(diameter: float, d: int) -> float:
    """GeomLoss' default cell width: ``diameter / (sqrt(d) * 2000 ** (1 / d))``."""
    return diameter / (math.sqrt(d) * 2000 ** (1.0 / d))


# --------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------
@dataclass
class Clustering:
    """One cloud grouped into grid cells.

    ``perm`` (n,): the permuted cloud is ``x[perm]``; ``inverse`` (n,) undoes it
    (``t_sorted[inverse]`` is in the caller's order); ``labels`` (n,): the cluster
    of each point in the caller's order; ``starts`` (K + 1,); ``centroid`` (K, d)
    (weighted by the weights, the plain mean for a cluster of zero weight),
    ``weight`` (K,), ``lo``, ``hi`` (K, d): bounding boxes; ``points`` (n, d) and
    ``weights`` (n,) permuted.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    labels: torch.Tensor
    starts: torch.Tensor
    centroid: torch.Tensor
    weight: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    points: torch.Tensor
    weights: torch.Tensor

    @property
    def size(self) -> int:
        return self.centroid.shape[0]

    def sorted_labels(self) -> torch.Tensor:
        """The cluster of each permuted point, (n,)."""
        counts = self.starts.diff()
        return torch.repeat_interleave(torch.arange(self.size, device=counts.device), counts,
                                       output_size=self.points.shape[0])


def _morton(cells: torch.Tensor) -> torch.Tensor:
    """Z-order keys (n,) of non-negative integer cell coordinates (n, d): the bits interleaved."""
    d = cells.shape[1]
    key = torch.zeros(cells.shape[0], dtype=torch.int64, device=cells.device)
    for bit in range(_KEY_BITS // d):
        for k in range(d):
            key |= ((cells[:, k] >> bit) & 1) << (bit * d + k)
    return key


def cluster_grid(owner: str, x: torch.Tensor, a: torch.Tensor, *, origin: torch.Tensor, scale: float) -> Clustering:
    """Cluster the points ``x`` (n, d) of weights ``a`` (n,) into the cells of width ``scale`` whose corner
    is ``origin`` (d,), on the points' device; one read-back (the number of clusters, by ``unique``).

    Raises ValueError (naming ``owner``) when the grid needs more cells per axis than the Morton key holds
    (``2^(62 // d)``): a ``cluster_scale`` far below the diameter.
    """
    n, d = x.shape
    bits = _KEY_BITS // d
    with torch.no_grad():
        cells = torch.floor((x.to(torch.float64) - origin.to(torch.float64)) / scale).clamp_min(0)
        extent = float(cells.max()) if n else 0.0
        if extent >= 2 ** bits:
            raise ValueError(f"{owner}: cluster_scale={scale:.3g} makes a grid of {extent + 1:.3g} cells per axis, "
                             f"more than the 2^{bits} that a {d}-d Morton key holds; pass a larger cluster_scale "
                             "(the default is about 2000 cells over the bounding box)")
        key = _morton(cells.to(torch.int64))
        sorted_key, perm = torch.sort(key, stable=True)
        _, counts = torch.unique_consecutive(sorted_key, return_counts=True)
        K = counts.numel()
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        sorted_labels = torch.repeat_interleave(torch.arange(K, device=x.device), counts)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n, device=x.device)
        labels = sorted_labels[inverse]
        xs, ws = x[perm], a[perm]
        wd = ws.to(xs.dtype)
        weight = torch.zeros(K, dtype=wd.dtype, device=x.device).index_add_(0, sorted_labels, wd)
        moment = torch.zeros(K, d, dtype=xs.dtype, device=x.device).index_add_(0, sorted_labels, wd[:, None] * xs)
        plain = torch.zeros(K, d, dtype=xs.dtype, device=x.device).index_add_(0, sorted_labels, xs)
        positive = weight > 0
        centroid = torch.where(positive[:, None], moment / torch.where(positive, weight, 1)[:, None],
                               plain / counts[:, None].to(xs.dtype))
        index = sorted_labels[:, None].expand(n, d)
        lo = torch.full((K, d), math.inf, dtype=xs.dtype, device=x.device).scatter_reduce(
            0, index, xs, reduce="amin", include_self=True)
        hi = torch.full((K, d), -math.inf, dtype=xs.dtype, device=x.device).scatter_reduce(
            0, index, xs, reduce="amax", include_self=True)
    return Clustering(perm=perm, inverse=inverse, labels=labels, starts=starts, centroid=centroid, weight=weight,
                      lo=lo, hi=hi, points=xs, weights=ws)


# --------------------------------------------------------------------------
# The pattern and its certificate
# --------------------------------------------------------------------------
@dataclass
class Pattern:
    """Kept cluster pairs in CSR over row clusters (``ptr`` (Kx + 1,), ``idx`` (nnz,)) and, built on first
    use and shared with the transposed pattern, the CSR of the transpose."""

    ptr: torch.Tensor
    idx: torch.Tensor
    num_cols: int
    _transpose: "Pattern | None" = None

    @property
    def num_rows(self) -> int:
        return self.ptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.idx.numel()

    @property
    def T(self) -> "Pattern":
        if self._transpose is None:
            ptr_t, idx_t = transpose_pattern(self.ptr, self.idx, self.num_cols)
            self._transpose = Pattern(ptr_t, idx_t, self.num_rows, self)
        return self._transpose

    def rows(self) -> torch.Tensor:
        """The row cluster of each kept pair, (nnz,)."""
        return torch.repeat_interleave(torch.arange(self.num_rows, device=self.ptr.device), self.ptr.diff(),
                                       output_size=self.nnz)

    def mask(self) -> torch.Tensor:
        """The (Kx, Ky) boolean matrix of kept pairs (tests and small problems)."""
        out = torch.zeros(self.num_rows, self.num_cols, dtype=torch.bool, device=self.ptr.device)
        out[self.rows(), self.idx] = True
        return out

    @classmethod
    def from_mask_rows(cls, rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int) -> "Pattern":
        """From kept pairs listed row-major (rows sorted, columns sorted inside a row)."""
        ptr = torch.cat([rows.new_zeros(1), torch.bincount(rows, minlength=num_rows).cumsum(0)])
        return cls(ptr, cols, num_cols)


def _row_chunks(rows: int, cols: int):
    step = max(1, _PAIR_BLOCK // max(1, cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def coarse_pattern(X, Y, F, G, *, eps: float, cost_scale: float, truncate: float) -> Pattern:
    """GeomLoss' kept pairs at the coarse level: ``F_I + G_J > c |X_I - Y_J|^2 - truncate * eps``.

    ``X`` (Kx, d), ``Y`` (Ky, d) centroids, ``F`` (Kx,), ``G`` (Ky,) coarse
    potentials at ``eps``. Each row and each column also keeps its largest
    ``F_I + G_J - C_IJ`` (so that no point loses all of its plan). Computed in
    row blocks of bounded size, on the device.
    """
    Kx, Ky = X.shape[0], Y.shape[0]
    kept_rows, kept_cols = [], []
    best_col = torch.empty(Ky, dtype=F.dtype, device=F.device).fill_(-math.inf)
    best_row = torch.zeros(Ky, dtype=torch.int64, device=F.device)
    for r0, r1 in _row_chunks(Kx, Ky):
        logit = F[r0:r1, None] + G[None, :] - cost_scale * torch.cdist(X[r0:r1], Y).square()
        keep = logit > -truncate * eps
        keep[torch.arange(r1 - r0, device=F.device), logit.argmax(1)] = True
        value, where = logit.max(0)
        better = value > best_col
        best_col = torch.where(better, value, best_col)
        best_row = torch.where(better, where + r0, best_row)
        i, j = keep.nonzero(as_tuple=True)
        kept_rows.append(i + r0)
        kept_cols.append(j)
    rows, cols = torch.cat(kept_rows), torch.cat(kept_cols)
    # The best row of every column joins (already there for most columns: unique removes repeats).
    key = torch.unique(torch.cat([rows * Ky + cols, best_row * Ky + torch.arange(Ky, device=F.device)]))
    return Pattern.from_mask_rows(key // Ky, key % Ky, Kx, Ky)


def _box_gap2(lo_x, hi_x, lo_y, hi_y) -> torch.Tensor:
    """Squared distance between the boxes ``[lo_x, hi_x]`` and ``[lo_y, hi_y]`` (last axis d, broadcast)."""
    gap = torch.clamp_min(torch.maximum(lo_y - hi_x, lo_x - hi_y), 0)
    return gap.square().sum(-1)


def _cluster_max(c: Clustering, pot: torch.Tensor) -> torch.Tensor:
    """The largest potential of each cluster over its points of positive weight, (K,) (``-inf`` when none)."""
    live = torch.where(c.weights > 0, pot, torch.full_like(pot, -math.inf))
    return torch.full((c.size,), -math.inf, dtype=pot.dtype, device=pot.device).scatter_reduce(
        0, c.sorted_labels(), live, reduce="amax")


def _dropped_bound(cx: Clustering, cy: Clustering, pattern: Pattern, f, g, eps: float, cost_scale: float):
    """``max_i e^{f_i / eps} U_{I(i)}`` over the points of positive weight, with
    ``U_I = sum_{J dropped from row I} B_J exp((max_J g - c gap2(box_I, box_J)) / eps)``
    (``f``, ``g`` permuted like the clusterings). A float."""
    Kx, Ky = cx.size, cy.size
    dt = f.dtype
    log_B = torch.log(cy.weight.to(dt))
    col_term = _cluster_max(cy, g) + eps * log_B          # eps log B_J + max_J g
    mask = pattern.mask()
    log_U = torch.empty(Kx, dtype=dt, device=f.device)
    for r0, r1 in _row_chunks(Kx, Ky):
        gap2 = _box_gap2(cx.lo[r0:r1, None], cx.hi[r0:r1, None], cy.lo[None], cy.hi[None])
        logit = (col_term[None] - cost_scale * gap2.to(dt)) / eps
        logit = logit.masked_fill(mask[r0:r1], -math.inf)
        log_U[r0:r1] = torch.logsumexp(logit, dim=1)
    per_point = f / eps + log_U[cx.sorted_labels()]
    per_point = torch.where(cx.weights > 0, per_point, torch.full_like(per_point, -math.inf))
    return float(torch.exp(per_point.max())) if per_point.numel() else 0.0


def truncation_bound(cx: Clustering, cy: Clustering, pattern: Pattern, f, g, *, eps: float,
                     cost_scale: float) -> tuple[float, float]:
    r"""Certified bounds on the plan mass that the pattern drops, relative to the weights.

    Parameters
    ----------
    cx, cy : Clustering
        The two clouds.
    pattern : Pattern
        The kept cluster pairs.
    f, g : Tensor, shapes (n,), (m,)
        Potentials, permuted like the clusterings.
    eps, cost_scale : float

    Returns
    -------
    (float, float)
        ``(rows, cols)``: ``rows >= max_i (sum_{j dropped} P_ij) / a_i`` and
        ``cols >= max_j (sum_{i dropped} P_ij) / b_j`` over points of positive
        weight.

    Notes
    -----
    With ``B_J = sum_{j in J} b_j``, ``G_J = max_{j in J} g_j`` and ``D_IJ`` the
    squared distance between the bounding boxes of clusters I and J, every
    dropped entry has ``|x_i - y_j|^2 >= D_IJ``, so

        sum_{j dropped} P_ij <= a_i e^{f_i/eps} U_I,
        U_I = sum_{J dropped} B_J exp((G_J - c D_IJ) / eps),

    and the same with the roles of the clouds swapped for the columns.
    Costs O(Kx Ky d) on the device.
    """
    rows = _dropped_bound(cx, cy, pattern, f, g, eps, cost_scale)
    cols = _dropped_bound(cy, cx, pattern.T, g, f, eps, cost_scale)
    return rows, cols


def kept_entries(cx: Clustering, cy: Clustering, pattern: Pattern) -> torch.Tensor:
    """Entries of the plan that the kept pairs cover, ``sum_(I, J) kept |I| |J|``: a 0-d int64 tensor
    on the pattern's device (nothing read back)."""
    return (cx.starts.diff()[pattern.rows()] * cy.starts.diff()[pattern.idx]).sum()


def prune_pattern(cx: Clustering, cy: Clustering, base: Pattern, f, g, *, eps: float, cost_scale: float,
                  tol: float, margin=0.0) -> Pattern:
    r"""Re-prune a pattern at finer potentials: drop the pairs whose certified plan mass is below ``tol``.

    Parameters
    ----------
    cx, cy : Clustering
        The two clouds.
    base : Pattern
        The widest pattern (the jump's); the result is a subset of it, recomputed from it at each
        call (so that every pair it drops is bounded at the same potentials).
    f, g : Tensor, shapes (n,), (m,)
        Potentials, permuted like the clusterings.
    eps : float
        The eps at which the masses are bounded.
    cost_scale : float
    tol : float
        The largest plan mass, relative to the weights, that the dropped pairs may hold in a row or
        a column at ``(f, g)`` raised by ``margin``.
    margin : float or 0-d Tensor, default 0
        An allowance for the potentials still rising: the bound holds for all potentials with
        ``f'_i + g'_j <= f_i + g_j + margin``.

    Returns
    -------
    Pattern
        The kept pairs of ``base``.

    Notes
    -----
    For the kept pair (I, J), ``s_IJ = max_I f + max_J g + margin - c D_IJ`` (maxima over the points
    of positive weight, ``D_IJ`` the squared distance between the clusters' bounding boxes) bounds
    ``f_i + g_j - c |x_i - y_j|^2`` on all its entries, so the pair holds at most
    ``a_i B_J exp(s_IJ / eps)`` of row i and ``b_j A_I exp(s_IJ / eps)`` of column j. The pair is
    dropped iff

        s_IJ / eps + log B_J + log n_I < log tol   and   s_IJ / eps + log A_I + log m_J < log tol,

    with ``n_I`` and ``m_J`` the pairs of row I and column J in ``base``: a row loses at most
    ``n_I`` terms below ``tol / n_I``, at most ``tol`` of its mass, and likewise a column. Every
    row and every column keeps its pair of largest ``s_IJ``. Costs O(nnz) on the device and one
    host read (the number of kept pairs).
    """
    rows, cols = base.rows(), base.idx
    dt = f.dtype
    gap2 = _box_gap2(cx.lo[rows], cx.hi[rows], cy.lo[cols], cy.hi[cols]).to(dt)
    s = _cluster_max(cx, f)[rows] + _cluster_max(cy, g)[cols] + margin - cost_scale * gap2
    n_I = base.ptr.diff().to(dt)
    m_J = torch.zeros(cy.size, dtype=dt, device=s.device).index_add_(0, cols, torch.ones_like(s))
    log_tol = math.log(tol)
    heavy = ((s / eps + torch.log(cy.weight.to(dt))[cols] + torch.log(n_I)[rows] >= log_tol)
             | (s / eps + torch.log(cx.weight.to(dt))[rows] + torch.log(m_J)[cols] >= log_tol))
    best_row = torch.full_like(n_I, -math.inf).scatter_reduce(0, rows, s, reduce="amax")[rows] == s
    best_col = torch.full_like(m_J, -math.inf).scatter_reduce(0, cols, s, reduce="amax")[cols] == s
    keep = heavy | best_row | best_col
    count = int(keep.sum())
    idx = base.idx[torch.nonzero_static(keep, size=count)[:, 0]]
    kept_before = torch.zeros(keep.numel() + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep, 0, out=kept_before[1:])
    return Pattern(kept_before[base.ptr], idx, base.num_cols)


# --------------------------------------------------------------------------
# The block-sparse plan
# --------------------------------------------------------------------------
class _BlockProduct(Function):
    """``P_s @ V_s`` on permuted data; the gradient flows to ``V_s`` (``P_s.T @ grad``)."""

    @staticmethod
    def forward(ctx, P, V):
        ctx.P = P
        return P._apply_sorted(V)

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.P.T._apply_sorted(grad)


class BlockSparsePlanOperator(LinearOperator):
    """The entropic plan restricted to kept cluster pairs, shape (n, m), in the caller's point order.

    Built by ``sinkhorn(..., multiscale=...)`` (``result.plan``), not
    directly. ``P_ij = a_i b_j exp((f_i + g_j - c |x_i - y_j|^2) / eps)`` when
    the pair (cluster of x_i, cluster of y_j) is kept, 0 otherwise.

    It has the interface of ``PlanOperator`` that the Hessian and HVP code
    use: ``@`` on vectors and (m, k) matrices (gradients flow to the operand),
    ``.T`` (a ``BlockSparsePlanOperator`` on the transposed pattern, ``P.T.T is
    P``), ``row_sums()``, ``col_sums()``, ``marginals()``, ``squared()``,
    ``bilinear()``, ``diagonal()``, ``to_dense()``; so
    ``HessianOperator.from_plan`` and ``DualHessianOperator`` take it.

    Notes
    -----
    - Adjoint: ``P.T``, the same kernel on the transposed pattern.
    - Null space: as ``PlanOperator`` on each kept block; rows or columns of
      zero weight are zero.
    - Cost of one product with k columns: O(sum over the kept pairs (I, J)
      of size(I) size(J) (d + k)), O((n + m) k) memory, plus two gathers
      (the points' permutation).
    """

    def __init__(self, cx: Clustering, cy: Clustering, pattern: Pattern, f_s, g_s, *, eps: float, a_s=None,
                 b_s=None, cost_scale: float = 1.0, backend=None, precision=None, transpose_of=None):
        n, m = cx.perm.numel(), cy.perm.numel()
        super().__init__((n, m), f_s.dtype, f_s.device, transpose_of=transpose_of)
        self.cx, self.cy, self.pattern = cx, cy, pattern
        self.f_s, self.g_s = f_s, g_s
        self.eps, self.cost_scale = eps, cost_scale
        self.backend, self.precision = backend, precision
        self._a_s, self._b_s = a_s, b_s
        self._row_sums = None

    # ------------------------------------------------------------ attributes
    @property
    def x(self) -> torch.Tensor:
        """Source points in the caller's order, (n, d)."""
        return self.cx.points[self.cx.inverse].to(self.dtype)

    @property
    def y(self) -> torch.Tensor:
        """Target points in the caller's order, (m, d)."""
        return self.cy.points[self.cy.inverse].to(self.dtype)

    @property
    def f(self) -> torch.Tensor:
        return self.f_s[self.cx.inverse]

    @property
    def g(self) -> torch.Tensor:
        return self.g_s[self.cy.inverse]

    @property
    def nnz_blocks(self) -> int:
        """Kept cluster pairs."""
        return self.pattern.nnz

    @property
    def fill(self) -> float:
        """Fraction of the plan's entries that the kept pairs cover."""
        return float(kept_entries(self.cx, self.cy, self.pattern)) / max(1, self.shape[0] * self.shape[1])

    def _kernel(self) -> dict:
        log = lambda w: None if w is None else torch.log(w.to(self.dtype))  # noqa: E731
        return dict(eps=self.eps, log_a=log(self._a_s), log_b=log(self._b_s), cost_scale=self.cost_scale,
                    backend=self.backend, precision=self.precision)

    def _apply_sorted(self, V_s):
        """``P_s @ V_s`` on permuted rows and columns; V_s None gives ``P_s 1``."""
        return blocksparse_apply(self.cx.points.to(self.dtype), self.cy.points.to(self.dtype), self.f_s, self.g_s,
                                 V_s, self.cx.starts, self.cy.starts, self.pattern.ptr, self.pattern.idx,
                                 **self._kernel())

    def _apply(self, V):
        V_s = V[self.cy.perm]
        out = _BlockProduct.apply(self, V_s) if V_s.requires_grad else self._apply_sorted(V_s)
        return out[self.cx.inverse]

    def _matvec(self, v):
        return self._apply(v)

    def _matmat(self, V):
        return self._apply(V)

    def _adjoint(self) -> "BlockSparsePlanOperator":
        return BlockSparsePlanOperator(self.cy, self.cx, self.pattern.T, self.g_s, self.f_s, eps=self.eps,
                                       a_s=self._b_s, b_s=self._a_s, cost_scale=self.cost_scale,
                                       backend=self.backend, precision=self.precision, transpose_of=self)

    def _kept(self, i_labels, j_labels) -> torch.Tensor:
        """Whether the pairs (cluster i_labels[k], cluster j_labels[k]) are kept, (len,) bool."""
        Ky = self.cy.size
        keys = self.pattern.rows() * Ky + self.pattern.idx      # sorted (row-major CSR)
        query = i_labels * Ky + j_labels
        pos = torch.searchsorted(keys, query).clamp_max(max(0, keys.numel() - 1))
        return (keys.numel() > 0) & (keys[pos] == query)

    def _diagonal(self):
        k = min(self.shape)
        x, y, f, g = self.x[:k], self.y[:k], self.f[:k], self.g[:k]
        P_ii = torch.exp((f + g - self.cost_scale * (x - y).square().sum(-1)) / self.eps)
        if self._a_s is not None:
            P_ii = self._a_s[self.cx.inverse][:k].to(self.dtype) * P_ii
        if self._b_s is not None:
            P_ii = P_ii * self._b_s[self.cy.inverse][:k].to(self.dtype)
        return torch.where(self._kept(self.cx.labels[:k], self.cy.labels[:k]), P_ii, torch.zeros_like(P_ii))

    # ---------------------------------------------------------------- public
    def row_sums(self) -> torch.Tensor:
        """``P 1``, shape (n,) (cached)."""
        if self._row_sums is None:
            self._row_sums = self._apply_sorted(None)[self.cx.inverse]
        return self._row_sums

    def col_sums(self) -> torch.Tensor:
        """``P.T 1``, shape (m,) (cached on ``P.T``)."""
        return self.adjoint().row_sums()

    def marginals(self) -> tuple[Diag, Diag]:
        """``(Diag(P 1), Diag(P.T 1))``."""
        return Diag(self.row_sums(), psd=True), Diag(self.col_sums(), psd=True)

    def squared(self) -> "BlockSparsePlanOperator":
        """``P∘P`` on the same pattern: ``eps/2`` and squared weights."""
        sq = lambda w: None if w is None else w * w  # noqa: E731
        return BlockSparsePlanOperator(self.cx, self.cy, self.pattern, self.f_s, self.g_s, eps=self.eps / 2,
                                       a_s=sq(self._a_s), b_s=sq(self._b_s), cost_scale=self.cost_scale,
                                       backend=self.backend, precision=self.precision)

    def bilinear(self, W: torch.Tensor, V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``out_i = sum_j P_ij <W_i, V_j> Y_j``: W (n, k), V (m, k), Y (m, e) -> (n, e), without autograd.

        One product with ``k e`` columns: ``sum_l W_il (P @ (V_l Y))_i``.
        """
        n, m = self.shape
        geo = Geometry("BlockSparsePlanOperator.bilinear", False, 1, n, m, self.cx.points.shape[1], self.dtype,
                       self.device, ref="P")
        matrix(geo, "W", W, n)
        matrix(geo, "V", V, m, W.shape[1], what="as many columns as W: <W_i, V_j>")
        matrix(geo, "Y", Y, m, cols_name="e")
        k, e = V.shape[1], Y.shape[1]
        with torch.no_grad():
            PVY = self._apply((V[:, :, None] * Y[:, None, :]).reshape(m, k * e)).reshape(n, k, e)
            return torch.einsum("nk,nke->ne", W, PVY)

    def truncated(self, tol: float = 1e-8, **options):
        """Not available: the plan is already block-sparse.

        Raises
        ------
        NotImplementedError
            Always. ``PlanOperator.truncated`` finds the kept entries with a
            streaming pass over all ``n m`` pairs (``kernels.plan_truncate``),
            which is what multiscale avoids; a truncation of the kept blocks
            would need a block-sparse variant of that kernel, which otlinop
            does not have. The block-sparse products already cost O(kept
            entries); ``truncation_bound`` certifies what the blocks drop.
        """
        raise NotImplementedError(
            "BlockSparsePlanOperator.truncated: the multiscale plan is already block-sparse, and otlinop has "
            "no block-sparse truncation pass (PlanOperator.truncated streams over all n x m pairs, which "
            "multiscale avoids); use the plan itself (its products cost O(kept entries)), or build a "
            "PlanOperator from result.f, result.g to truncate the dense plan")

    def to_dense(self) -> torch.Tensor:
        """The (n, m) matrix in the caller's order, zeros outside the kept pairs (tests, small problems)."""
        x, y, f, g = self.x, self.y, self.f, self.g
        C = self.cost_scale * torch.cdist(x, y).square()
        P = torch.exp((f[:, None] + g[None, :] - C) / self.eps)
        if self._a_s is not None:
            P = self._a_s[self.cx.inverse].to(self.dtype)[:, None] * P
        if self._b_s is not None:
            P = P * self._b_s[self.cy.inverse].to(self.dtype)[None, :]
        keep = self.pattern.mask()[self.cx.labels[:, None], self.cy.labels[None, :]]
        return torch.where(keep, P, torch.zeros_like(P))

    def __repr__(self) -> str:
        return (f"BlockSparsePlanOperator(shape={self.shape}, clusters=({self.cx.size}, {self.cy.size}), "
                f"kept pairs={self.pattern.nnz}, eps={self.eps:.4g})")
