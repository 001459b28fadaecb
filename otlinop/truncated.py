r"""The entropic plan with its negligible entries dropped: a sparse operator
with a certified error.

For small ``eps`` relative to the spread of the costs (high dimension, or
well-separated points) the plan is numerically sparse: each row carries a
few significant entries and the rest are below any float precision. At
n = m = 2000, d = 64, eps = 0.5 (the HVP benchmark's problem), the entries
kept for ``tol = 1e-8`` are 1.2% of the plan. ``PlanOperator.truncated(tol)``
finds them in one streaming pass and returns a ``TruncatedPlanOperator``
whose products cost O(nnz k) instead of O(n m (d + k)).

The rule: entry (i, j) is kept iff

    P_ij >= tol * sqrt(ah_i bh_j / (n m)),    ah = P 1, bh = P.T 1,

so that the dropped part ``E`` has, in the metric of the plan's own
marginals, ``||Diag(ah)^-1/2 E Diag(bh)^-1/2||_2 <= tol`` (Schur's test:
every row sum of the scaled ``E`` is at most ``tol sqrt(m / n)``, every
column sum at most ``tol sqrt(n / m)``), where the scaled ``P`` has norm
exactly 1. It also bounds each dropped row mass by ``tol sqrt(ah_i M / n)``
(``M = sum(ah)``): ``tol ah_i`` for a row of average mass.
"""

from __future__ import annotations

import math

import torch

from solvers import config
from solvers._function import Function

from ._base import LinearOperator
from ._checks import Geometry, fmt_shape, fraction, matrix, positive_int, real_operator_dtype
from .kernels._reference import compute_dtype
from .kernels.ell import ell_bilinear, ell_matmat, live_slots
from .kernels.plan_truncate import plan_truncate
from .kernels.softmin_pair import softmin_pair

__all__ = ["TruncatedPlanOperator", "truncate_plan"]

#: Slots per row of the first truncation pass; rows with more entries cost a
#: second pass with exactly as many slots as the fullest row needs.
DEFAULT_CAPACITY = 256

#: Largest padded layout (slots x rows) built: 2^28 slots take 2 GiB in float32
#: with their int32 columns. A plan that needs more keeps streaming.
MAX_LAYOUT_ENTRIES = 1 << 28


class TruncatedPlanOperator(LinearOperator):
    """A plan restricted to its significant entries, in a padded row layout.

    Built by ``PlanOperator.truncated(tol)`` (or ``truncate_plan``), not
    directly. It has the interface of ``PlanOperator`` that the Hessian and
    HVP code use: ``@`` on vectors and matrices, ``.T`` (``P.T.T is P``),
    ``row_sums()``, ``col_sums()``, ``squared()``, ``bilinear()``,
    ``to_dense()``, so ``HessianOperator.from_plan`` and
    ``DualHessianOperator`` take it as they take a ``PlanOperator``.

    Parameters
    ----------
    values, columns, counts : Tensor
        The layout, shapes (capacity, n), (capacity, n) and (n,).
    shape : (int, int)
        ``(n, m)``.
    tol : float
        The tolerance the entries were kept for.
    backend : {None, "torch", "triton"}, optional
        Passed to the products' kernels.
    nnz : int, optional
        ``counts.sum()`` when the builder knows it (spares a read-back).
    transposed : tuple of Tensor, optional
        ``(values, columns, counts)`` of the transpose's layout when the
        builder has it: ``.T`` then needs no sort.
    transpose_of : TruncatedPlanOperator, optional
        The operator whose transpose this one is (``P.T.T is P``).

    Attributes
    ----------
    tol : float
        The certified bound of the truncation (module docstring).
    values, columns, counts : Tensor
        The layout: ``values[s, i]``, ``columns[s, i]`` for ``s < counts[i]``
        (see ``otlinop.kernels.plan_truncate``).

    Notes
    -----
    * Shape (n, m); no symmetry is declared (the transpose is a separate
      layout, built on first use by a sort: deterministic).
    * One product: O(nnz k) time on the GPU (Triton, rows summed in slot
      order: deterministic), O(capacity (n + m)) memory for the layout and
      its transpose.
    * Gradients: the products are differentiable in the operand (a torch
      path is taken when it requires grad) and in ``values`` when they
      require grad (``P.values.requires_grad_()``): then ``dL/dvalues`` has
      the layout's shape (capacity, n), zero on padding, and ``P.T``'s
      products reach ``values`` too; no n x m temporary. Not in the points
      or potentials (the layout is a fixed snapshot of P).
    * The padding holds value 0; products skip it, so a NaN in V reaches
      only the rows that use it.
    """

    def __init__(self, values, columns, counts, shape, *, tol, backend=None, nnz=None, transposed=None,
                 transpose_of=None):
        real_operator_dtype("TruncatedPlanOperator", "values", values.dtype)
        super().__init__(tuple(shape), values.dtype, values.device, transpose_of=transpose_of)
        self.values, self.columns, self.counts = values, columns, counts
        self.tol = float(tol)
        self.backend = backend
        self._nnz: int | None = nnz       # counts.sum() when the builder read it already
        self._row_sums: torch.Tensor | None = None
        self._transposed: tuple | None = transposed   # the transpose's layout, once known
        # For a transpose built by _adjoint: the operator it transposes, and where each of its
        # slots comes from (built with the layout, or on demand), so that products reach that
        # operator's values when they require grad.
        self._source: TruncatedPlanOperator | None = None
        self._slot_map: tuple | None = None

    # ------------------------------------------------------------ products
    def _backend_for(self, V):
        if V.requires_grad and torch.is_grad_enabled():
            return "torch"
        return self.backend

    def _differentiable_values(self):
        """The values when products must differentiate w.r.t. them (own or, for a transpose,
        gathered from the transposed operator's), else None."""
        if not torch.is_grad_enabled():
            return None
        if self.values.requires_grad:
            return self.values
        P = self._source
        if P is not None and P.values.requires_grad:
            if self._slot_map is None:
                self._slot_map = _transpose_layout(P.values.detach(), P.columns, P.counts, P.shape[1], P._nnz)[3]
            slots, rows, flat = self._slot_map
            out = torch.zeros(self.values.shape, dtype=self.dtype, device=self.device)
            return out.index_put((slots, rows), P.values.reshape(-1)[flat])
        return None

    def _matmat(self, V):
        values = self._differentiable_values()
        if values is not None:
            return _LayoutProduct.apply(self, values, V)
        return ell_matmat(self.values, self.columns, self.counts, V, m=self.shape[1], backend=self._backend_for(V))

    def _matvec(self, v):
        return self._matmat(v)

    def schur_product(self, V, row_weight, diag):
        """``diag * V - P.T @ (row_weight * (P @ V))`` in two launches (the fused
        Schur complement of ``HessianOperator``: the diagonal and the row
        weights ride in the products' epilogues).

        Parameters
        ----------
        V : Tensor, shape (m,) or (m, k)
        row_weight : Tensor, shape (n,)
        diag : Tensor, shape (m,)
        """
        if self._differentiable_values() is not None:
            rows = row_weight if V.ndim == 1 else row_weight[:, None]
            d = diag if V.ndim == 1 else diag[:, None]
            return d * V - self.adjoint()._matmat(rows * self._matmat(V))
        backend = self._backend_for(V)
        T = self.adjoint()
        u = ell_matmat(self.values, self.columns, self.counts, V, m=self.shape[1], row_scale=row_weight,
                       backend=backend)
        return ell_matmat(T.values, T.columns, T.counts, u, m=self.shape[0], sign=-1.0, add=V, add_scale=diag,
                          backend=backend)

    def _adjoint(self) -> "TruncatedPlanOperator":
        slot_map = None
        if self._transposed is None:
            vals, cols, counts, slot_map = _transpose_layout(self.values.detach(), self.columns, self.counts,
                                                             self.shape[1], self._nnz)
            self._transposed = (vals, cols, counts)
        vals, cols, counts = self._transposed
        T = TruncatedPlanOperator(vals, cols, counts, (self.shape[1], self.shape[0]), tol=self.tol,
                                  backend=self.backend, nnz=self._nnz,
                                  transposed=(self.values, self.columns, self.counts), transpose_of=self)
        T._source, T._slot_map = self, slot_map
        return T

    def _diagonal(self):
        k = min(self.shape)
        rows = torch.arange(self.shape[0], device=self.device)
        live = live_slots(self.counts, self.values.shape[0])
        on_diag = live & (self.columns.to(torch.int64) == rows[None, :])
        return torch.where(on_diag, self.values, 0.0).sum(0)[:k]

    # -------------------------------------------------------------- public
    @property
    def nnz(self) -> int:
        """Entries kept (one host synchronisation, then cached)."""
        if self._nnz is None:
            self._nnz = int(self.counts.sum())
        return self._nnz

    @property
    def fill(self) -> float:
        """Fraction of the n m entries kept."""
        n, m = self.shape
        return self.nnz / max(1, n * m)

    def row_sums(self) -> torch.Tensor:
        """``P 1`` of the kept entries, shape (n,) (cached)."""
        if self._row_sums is None:
            self._row_sums = self._matvec(torch.ones(self.shape[1], dtype=self.dtype, device=self.device))
        return self._row_sums

    def col_sums(self) -> torch.Tensor:
        """``P.T 1`` of the kept entries, shape (m,) (cached on ``.T``)."""
        return self.adjoint().row_sums()

    def squared(self) -> "TruncatedPlanOperator":
        """The entrywise square ``P∘P`` on the same entries (and transpose, when built)."""
        transposed = None
        if self._transposed is not None:
            vals, cols, counts = self._transposed
            transposed = (vals * vals, cols, counts)
        return TruncatedPlanOperator(self.values * self.values, self.columns, self.counts, self.shape,
                                     tol=self.tol, backend=self.backend, nnz=self._nnz, transposed=transposed)

    def bilinear(self, W: torch.Tensor, V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``out_i = sum_j P_ij <W_i, V_j> Y_j`` over the kept entries, shape (n, e).

        As ``PlanOperator.bilinear`` (no autograd graph); O(nnz (k + e)).
        """
        n, m = self.shape
        geo = Geometry("TruncatedPlanOperator.bilinear", False, 1, n, m, 0, self.dtype, self.device, ref="P")
        matrix(geo, "W", W, n)
        matrix(geo, "V", V, m, W.shape[1], what="as many columns as W: <W_i, V_j>")
        matrix(geo, "Y", Y, m, cols_name="e")
        with torch.no_grad():
            return ell_bilinear(self.values, self.columns, self.counts, W, V, Y, m=m, backend=self.backend)

    def to_dense(self) -> torch.Tensor:
        """The (n, m) matrix with zeros where entries were dropped."""
        n, m = self.shape
        out = torch.zeros((n, m), dtype=self.dtype, device=self.device)
        live = live_slots(self.counts, self.values.shape[0])
        s, i = live.nonzero(as_tuple=True)
        out[i, self.columns[s, i].to(torch.int64)] = self.values[s, i]
        return out

    def __repr__(self) -> str:
        return (f"TruncatedPlanOperator(shape={fmt_shape(self.shape)}, nnz={self.nnz}, fill={self.fill:.2e}, "
                f"tol={self.tol:g}, dtype={self.dtype}, device={self.device})")


class _LayoutProduct(Function):
    """``P @ V`` for a padded layout whose values require grad.

    Forward: the operator's kernel (Triton on CUDA). Backward:
    ``dV = P.T @ G`` (the transposed layout) and
    ``dvalues[s, i] = <G_i, V_{columns[s, i]}>`` on the live slots
    (``_layout_sampled``), both differentiable again; nothing of size n x m.
    """

    @staticmethod
    def forward(ctx, P, values, V):
        ctx.P = P
        ctx.save_for_backward(values, V)
        return ell_matmat(values.detach(), P.columns, P.counts, V, m=P.shape[1], backend=P.backend)

    @staticmethod
    def backward(ctx, G):
        values, V = ctx.saved_tensors
        P = ctx.P
        dvalues = dV = None
        if ctx.needs_input_grad[2]:
            dV = P.adjoint()._matmat(G)
        if ctx.needs_input_grad[1]:
            dvalues = _layout_sampled(P.columns, P.counts, G, V)
        return None, dvalues, dV


def _layout_sampled(columns, counts, G, V):
    """``out[s, i] = <G_i, V_{columns[s, i]}>`` on live slots, 0 on padding: shape (capacity, n),
    computed in slot blocks whose (slots, n, k) temporaries fit ``config.torch_block_bytes``."""
    cap, n = columns.shape
    G2 = G[:, None] if G.ndim == 1 else G
    V2 = V[:, None] if V.ndim == 1 else V
    k = G2.shape[1]
    live = live_slots(counts, cap)
    per = max(1, config.torch_block_bytes // max(1, n * k * G2.element_size() * 2))
    blocks = []
    for s0 in range(0, cap, per):
        s1 = min(cap, s0 + per)
        dots = (G2[None, :, :] * V2[columns[s0:s1].to(torch.int64)]).sum(-1)
        blocks.append(torch.where(live[s0:s1], dots, 0.0))
    if not blocks:
        return torch.zeros((cap, n), dtype=G.dtype, device=G.device)
    return torch.cat(blocks)


def _transpose_layout(values, columns, counts, m, nnz=None):
    """The padded layout of the transpose: entries sorted by (column, row).

    Returns the transpose's values, columns and counts, and the slot map
    ``(slots, columns, source)``: entry ``source[e]`` of ``values.reshape(-1)``
    sits at ``[slots[e], columns[e]]`` of the transpose's layout.

    The live entries are enumerated row by row from the running sum of
    ``counts`` (``nnz`` of them: read back here unless the caller knows
    it), then sorted once; the column boundaries come from a binary search
    in the sorted keys (a histogram would pile the padding's atomics onto
    one bin). One host synchronisation, for the new layout's size (two
    without ``nnz``).
    """
    cap, n = values.shape
    device = values.device
    counts64 = counts.to(torch.int64)
    ends = torch.cumsum(counts64, 0)               # entries of rows 0..i
    if nnz is None:
        nnz = int(ends[-1]) if n else 0
    e = torch.arange(nnz, device=device)
    i = torch.searchsorted(ends, e, right=True)    # the row of entry e (empty rows skipped)
    s = e - (ends - counts64)[i]                   # its slot in that row
    j = columns[s, i].to(torch.int64)
    key_dtype = torch.int32 if (m + 1) * max(n, 1) < 2**31 else torch.int64
    key, order = torch.sort((j * max(n, 1) + i).to(key_dtype))   # unique keys: the same order on every run
    bounds = torch.searchsorted(key, torch.arange(m + 1, device=device, dtype=key_dtype) * max(n, 1))
    ccount = bounds[1:] - bounds[:-1]
    j = j[order]
    pos = torch.arange(j.numel(), device=device) - bounds[j]
    capT = int(ccount.max()) if m and j.numel() else 0
    valsT = torch.zeros((capT, m), dtype=values.dtype, device=device)
    colsT = torch.zeros((capT, m), dtype=torch.int32, device=device)
    source = (s * n + i)[order]                    # the flat slot of each entry in the layout
    valsT[pos, j] = values.reshape(-1)[source]
    colsT[pos, j] = i[order].to(torch.int32)
    return valsT, colsT, ccount.to(torch.int32), (pos, j, source)


def truncate_plan(P, tol: float = 1e-8, *, max_fill: float = 0.25, capacity: int | None = None):
    """``P.truncated(tol)`` for a ``PlanOperator`` P: see ``PlanOperator.truncated``."""
    return truncate_plan_for("truncate_plan", P, tol, max_fill=max_fill, capacity=capacity)


def truncate_plan_for(owner: str, P, tol, *, max_fill, capacity, max_entries: int = MAX_LAYOUT_ENTRIES):
    """:func:`truncate_plan` for the public function ``owner``, whose name its argument errors carry;
    ``max_entries`` bounds the layout's slots (tests lower it)."""
    tol = fraction(owner, "tol", tol)
    max_fill = fraction(owner, "max_fill", max_fill, closed=True)
    if capacity is not None:
        capacity = positive_int(owner, "capacity", capacity, "the slots per row of the first pass, or None")
    n, m = P.shape
    if n == 0 or m == 0:
        return P
    with torch.no_grad():
        a, b = P.weights
        log_a = None if a is None else torch.log(a)
        log_b = None if b is None else torch.log(b)
        ah, bh = _marginals(P, log_a, log_b)
        cdt = compute_dtype(P.dtype)
        log_ah, log_bh = torch.log(ah.to(cdt)), torch.log(bh.to(cdt))
        inf = torch.tensor(math.inf, dtype=cdt, device=P.device)
        # log P_ij >= log tol - log(n m) / 2 + (log ah_i + log bh_j) / 2; an empty row or column keeps nothing.
        rt = torch.where(ah > 0, math.log(tol) - 0.5 * math.log(n * m) + 0.5 * log_ah, inf)
        ct = torch.where(bh > 0, 0.5 * log_bh, inf)
        rt, ct = _as(rt, P.x), _as(ct, P.x)
        # Slots per row: at most max_fill of a row, and a layout of at most
        # max_entries slots (a value and a column index each) in all.
        limit = max(1, min(int(max_fill * m), max_entries // n))
        cap = min(limit, m, capacity if capacity is not None else DEFAULT_CAPACITY)
        x, y, f, g = P.x.detach(), P.y.detach(), P.f.detach(), P.g.detach()
        opts = dict(eps=P.eps, cost_scale=P.cost_scale, backend=P.backend, precision=P.precision)
        while True:
            vals, cols, counts = plan_truncate(x, y, f, g, row_threshold=rt, col_threshold=ct,
                                               capacity=cap, log_a=log_a, log_b=log_b, **opts)
            # One read-back for both: the slots the fullest row needs, and the entries
            # kept (which spares the transpose's compaction its own).
            need, nnz = torch.stack([counts.max().to(torch.int64), counts.sum(dtype=torch.int64)]).tolist()
            if need <= cap:
                break
            if need > limit:
                return P          # too dense to pay: keep streaming
            cap = need
    if need < cap:
        vals, cols = vals[:need].contiguous(), cols[:need].contiguous()
    return TruncatedPlanOperator(vals, cols, counts, P.shape, tol=tol, backend=P.backend, nnz=nnz)


def _marginals(P, log_a, log_b):
    """``(P 1, P.T 1)``: the cached ones, else both from one fused pass
    (``softmin_pair``: ``P 1 = a exp((f - sf) / eps)``, likewise for the columns);
    ``log_a``, ``log_b``: the log-weights (None for unit weights), under no_grad."""
    ah, bh = P.cached_row_sums(), P.adjoint().cached_row_sums()
    if ah is not None and bh is not None:
        return ah.detach(), bh.detach()
    f, g = P.f.detach(), P.g.detach()
    sf, sg = softmin_pair(P.x.detach(), P.y.detach(), f, g, log_a, log_b, eps=P.eps, cost_scale=P.cost_scale,
                          backend=P.backend, precision=P.precision)
    ah = torch.exp((f - sf) / P.eps)
    bh = torch.exp((g - sg) / P.eps)
    a, b = P.weights
    if a is not None:
        ah = ah * a.detach()
    if b is not None:
        bh = bh * b.detach()
    return ah, bh


def _as(t, x):
    """Thresholds in a dtype the kernels accept for points ``x`` (float32 for half points)."""
    return t.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else t.to(x.dtype)
