"""GPyTorch's ``linear_operator`` view of an otlinop operator:
``A.to_linear_operator()`` returns an ``OtlinopLinearOperator``.

linear_operator differentiates through an operator's *representation*: the
tensors it was built from, which its autograd Functions detach, rebuild the
operator on (``representation_tree()(*tensors)``) and differentiate
``_matmul`` with respect to. So the bridge's representation must be the
tensors that the otlinop operator's products depend on, and the bridge must
be able to rebuild the operator on other tensors (detached copies,
``.double()`` copies, clones).

An otlinop operator says what it is built from through two optional hooks:

``_parts()``
    A tuple of what the operator is built from, in a fixed order: tensors,
    other otlinop operators, and constants (numbers, None, strings).
``_from_parts(parts, *, dtype, device)``
    The same operator built from ``parts`` of the same structure, where
    tensors may have been replaced. ``dtype`` and ``device`` are what this
    operator's own dtype and device become: unchanged when the tensors kept
    theirs, converted as the bridge's tensors were (``.double()``) otherwise.
    Operators that hold tensors take their dtype from them and ignore it;
    ``Identity`` and ``Zero`` of a fixed dtype take it (adapting ones stay
    adapting), the algebra's ``CastOperator`` widens to it.

``Dense``, ``Diag``, ``Identity``, ``Zero``, ``BlockOperator``, the algebra's
operators (``A.H``, ``A.T``, ``A @ B``, ``A + B``, ``c * A``, ``A ** k`` and
the casts of mixed dtypes), ``PlanOperator``, ``HessianOperator`` and
``DualHessianOperator`` define them. The algebra's operators expose their
operands as written (``args``) and are rebuilt by the constructors that
promote dtypes, so a rebuilt operator promotes as the original did. An
operator without the hooks is opaque: it contributes no tensor (no gradient
reaches it), and it keeps its dtype and device (converting it raises a
TypeError that names it).

Complex operators multiply, transpose (without conjugation, as
linear_operator's ``mT``), index and differentiate through ``matmul``
(torch's autograd, not linear_operator's real-only Functions);
linear_operator's other autograd Functions (``solve``, ``inv_quad_logdet``,
...) differentiate real tensors only, so a gradient w.r.t. a complex tensor
through them raises a NotImplementedError.

Batch dimensions are copies of the one operator (``expand``, ``unsqueeze``,
``repeat``): products fold the batch into extra columns, so one otlinop
product serves the whole batch.
"""

from __future__ import annotations

import torch

try:
    import linear_operator
except ImportError as err:  # an optional dependency
    raise ImportError("to_linear_operator needs the optional linear_operator package: "
                      "pip install linear_operator") from err

from ._base import LinearOperator, known_adjoint
from ._checks import fmt_shape
from ._operators.algebra import conform

__all__ = ["OtlinopLinearOperator", "to_linear_operator", "operator_tensors", "operator_on"]


def _is_data(t) -> bool:
    """A tensor that linear_operator may differentiate, convert or clone."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def operator_tensors(op: LinearOperator) -> list[torch.Tensor]:
    """The distinct floating-point tensors ``op`` is built from, depth first.

    A tensor used twice (``X.T @ X``) is listed once, so a gradient reaches
    it as one sum. Opaque operators (no ``_parts`` hook) contribute nothing.
    """
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def visit(node):
        if id(node) in seen:
            return
        if _is_data(node):
            seen.add(id(node))
            found.append(node)
        elif isinstance(node, LinearOperator):
            seen.add(id(node))
            parts = getattr(node, "_parts", None)
            if parts is not None:
                for part in parts():
                    visit(part)

    visit(op)
    return found


def _conversion(template: LinearOperator, old, tensors, dtype: torch.dtype):
    """``dtype -> dtype``: what each dtype of ``template`` becomes when it is rebuilt on ``tensors``.

    A dtype converts as the template's own dtype (to ``dtype``) and the
    tensors of that dtype did; a dtype that nothing carried, as the template's
    when it is of the same kind (real or complex) and unchanged otherwise.
    linear_operator converts all tensors of a kind alike (``.double()`` the
    real floating ones, ``.to(dtype)`` all of them), so there is one answer.
    """
    seen = {template.dtype: dtype}
    for o, t in zip(old, tensors):
        seen.setdefault(o.dtype, t.dtype)
    moved = dtype != template.dtype

    def convert(d: torch.dtype) -> torch.dtype:
        if d in seen:
            return seen[d]
        return dtype if moved and d.is_complex == dtype.is_complex else d

    return convert


def operator_on(template: LinearOperator, tensors, *, dtype: torch.dtype, device) -> LinearOperator:
    """``template`` rebuilt on ``tensors`` (in the order of ``operator_tensors(template)``), as an
    operator of ``dtype`` on ``device``.

    A sub-operator used twice is rebuilt once, and one whose adjoint was
    rebuilt is that adjoint's adjoint, so ``X.H @ X`` (and ``S.H @ S`` for a
    sum S) stays a recognised adjoint pair. Operators that hold no tensor
    take their dtype as ``_conversion`` maps it; an adapting result is brought
    to ``dtype`` and ``device``.

    Raises
    ------
    ValueError
        If the number of tensors differs from the template's.
    TypeError
        If an opaque operator would have to change dtype or device.
    """
    old = operator_tensors(template)
    if len(tensors) != len(old):
        raise ValueError(f"to_linear_operator: {type(template).__name__} is built from {len(old)} tensors, "
                         f"got {len(tensors)}")
    device = torch.device(device)
    new_of = {id(o): t for o, t in zip(old, tensors)}
    convert = _conversion(template, old, tensors, dtype)
    memo: dict[int, LinearOperator] = {}

    def build(node):
        if isinstance(node, torch.Tensor):
            return new_of.get(id(node), node)
        if not isinstance(node, LinearOperator):
            return node
        if id(node) in memo:
            return memo[id(node)]
        partner = known_adjoint(node)
        parts = getattr(node, "_parts", None)
        node_dtype = convert(node.dtype)
        if partner is not None and id(partner) in memo:
            new = memo[id(partner)].adjoint()
        elif parts is not None:
            new = node._from_parts(tuple(build(p) for p in parts()), dtype=node_dtype, device=device)
        elif node_dtype == node.dtype and _same_device(node.device, device):
            new = node
        else:
            raise TypeError(
                f"to_linear_operator: cannot move {node!r} to {node_dtype} on {device}: it does not expose "
                "its tensors (no _parts/_from_parts hooks); convert the otlinop operator itself and call "
                "to_linear_operator() again")
        memo[id(node)] = new
        return new

    op = build(template)
    if (op.adapts_dtype and op.dtype != dtype) or (op.adapts_device and not _same_device(op.device, device)):
        op = conform(op, dtype, device)   # exact for adapting operators (an Identity rebuilt in dtype)
    return op


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a == b or (a.type == b.type and (a.index is None or b.index is None))


def _times(op: LinearOperator, X: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``A X``, or ``A.T X`` (linear_operator's transpose: no conjugation) when ``transposed``.

    The transpose of a real operator is its ``rmatmat`` (for a ``Dense``,
    ``M.T``, also when M is symmetric: gradients reach M's entries as in the
    dense computation); that of a complex one ``A.T`` (for a ``Dense``, M.T).
    """
    if transposed and op.dtype.is_complex:
        op, transposed = op.transpose(), False
    if X.ndim == 1:
        return op.rmatvec(X) if transposed else op.matvec(X)
    return op.rmatmat(X) if transposed else op.matmat(X)


def _is_noop(index) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


class OtlinopLinearOperator(linear_operator.LinearOperator):
    """A ``linear_operator.LinearOperator`` that applies an otlinop operator.

    Built by ``A.to_linear_operator()``; the constructor is what
    linear_operator calls to rebuild it.

    Parameters
    ----------
    anchor : Tensor, 0 elements
        Carries the dtype and device (linear_operator reads them from the
        first argument); it is converted and moved with the other tensors.
    *tensors : Tensor
        The tensors the operator is built from (``operator_tensors``): the
        representation through which gradients reach A's data.
    template : otlinop LinearOperator
        The operator; rebuilt on ``tensors`` when they are not its own.
    batch : tuple of ints, default ()
        Batch shape: that many copies of the one operator.
    transposed : bool, default False
        Represents the operator's transpose, applied with its ``rmatmat``:
        the exact transpose of its tensors (``Dense``: ``M.T``), also for a
        symmetric operator, whose ``.T`` is itself; so gradients w.r.t. a
        symmetric matrix's entries match those of the dense computation.

    Notes
    -----
    ``operator`` is the otlinop operator on this object's tensors. Products
    with ``(..., m, k)`` right-hand sides cost one otlinop product with the
    batch folded into columns. ``diagonal`` uses the operator's cheap
    diagonal, or else linear_operator's generic one (one product per
    column). Tensor indexing costs one product per distinct column (or row,
    through the adjoint).
    """

    def __init__(self, anchor, *tensors, template, batch=(), transposed=False):
        batch = tuple(int(s) for s in batch)
        transposed = bool(transposed)
        super().__init__(anchor, *tensors, template=template, batch=batch, transposed=transposed)
        self._ot_template = template
        self._ot_batch = torch.Size(batch)
        self._ot_transposed = transposed
        own = operator_tensors(template)
        if (len(own) == len(tensors) and all(a is b for a, b in zip(own, tensors))
                and template.dtype == anchor.dtype and _same_device(template.device, anchor.device)):
            self._ot_op = template
        else:
            self._ot_op = self._rebuilt()
        self._ot_state = self._grad_state()

    def _rebuilt(self) -> LinearOperator:
        anchor, *tensors = self._args
        op = operator_on(self._ot_template, tensors, dtype=anchor.dtype, device=anchor.device)
        if op.dtype != anchor.dtype or not _same_device(op.device, anchor.device):
            # E.g. .double() on a complex operator with real parts: linear_operator converts the real
            # tensors only, and the real float64 parts then promote the complex64 ones.
            raise TypeError(f"to_linear_operator: {op!r} was rebuilt as {op.dtype} on {op.device}, expected "
                            f"{anchor.dtype} on {anchor.device}; convert the otlinop operator itself and call "
                            "to_linear_operator() again")
        return op

    def _grad_state(self):
        """Which tensors require grad, when autograd records; None when nothing is recorded."""
        if not torch.is_grad_enabled():
            return None
        flags = tuple(t.requires_grad for t in self._args[1:])
        return flags if any(flags) else None

    @property
    def operator(self) -> LinearOperator:
        """The otlinop operator on this object's tensors.

        Rebuilt when tensors were set to require grad after it was built
        (``requires_grad_``), so that what it derives from them at
        construction (a Hessian's marginals) carries the autograd graph.
        """
        state = self._grad_state()
        if state is not None and state != self._ot_state:
            self._ot_op = self._rebuilt()
            self._ot_state = state
        return self._ot_op

    def _with(self, *, batch=None, transposed=None) -> "OtlinopLinearOperator":
        """The same tensors, another batch shape or orientation."""
        return OtlinopLinearOperator(*self._args, template=self._ot_template,
                                     batch=self._ot_batch if batch is None else batch,
                                     transposed=self._ot_transposed if transposed is None else transposed)

    # ------------------------------------------------------- the contract
    def _size(self) -> torch.Size:
        n, m = self._ot_template.shape
        return self._ot_batch + torch.Size((m, n) if self._ot_transposed else (n, m))

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        return self._apply(rhs, transposed=self._ot_transposed)

    def _t_matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        return self._apply(rhs, transposed=not self._ot_transposed)

    def _check_rhs(self, rhs: torch.Tensor, *, transposed: bool) -> None:
        """rhs of ``A @ rhs`` (or of the transpose): A's dtype and (m,) or (..., m, k)."""
        op = self.operator
        m = op.shape[0] if transposed else op.shape[1]
        name = "A.mT @ rhs" if transposed != self._ot_transposed else "A @ rhs"
        if rhs.dtype != op.dtype:
            raise TypeError(f"to_linear_operator: {name}: rhs has dtype {rhs.dtype}, expected {op.dtype}; "
                            f"convert with rhs.to({op.dtype})")
        if rhs.ndim == 0 or rhs.shape[-1 if rhs.ndim == 1 else -2] != m:
            raise ValueError(f"to_linear_operator: {name}: rhs has shape {fmt_shape(rhs.shape)}, expected "
                             f"({m},) or (..., {m}, k) for an operator of shape {fmt_shape(self.shape)}")

    def _apply(self, rhs: torch.Tensor, *, transposed: bool) -> torch.Tensor:
        """The operator (or its transpose) times rhs of shape (m,) or (..., m, k)."""
        self._check_rhs(rhs, transposed=transposed)
        op = self.operator
        n, m = op.shape[::-1] if transposed else op.shape
        if rhs.ndim == 1:
            out = _times(op, rhs, transposed)
            return out.expand(*self._ot_batch, n) if self._ot_batch else out
        rhs_batch, k = rhs.shape[:-2], rhs.shape[-1]
        # (..., m, k) -> (m, batch * k): one otlinop product for the whole batch.
        columns = rhs.movedim(-2, 0).reshape(m, -1)
        out = _times(op, columns, transposed)
        out = out.reshape(n, *rhs_batch, k).movedim(0, -2)
        batch = torch.broadcast_shapes(self._ot_batch, rhs_batch)
        return out.expand(*batch, n, k) if batch != rhs_batch else out

    def matmul(self, other):
        # linear_operator's Matmul Function is real: its backward applies the transpose, not the
        # adjoint, and gives complex tensors no gradient. A complex operator's product goes
        # through otlinop's own product instead, which torch's autograd differentiates.
        if self.dtype.is_complex and isinstance(other, torch.Tensor):
            return self._matmul(other)   # checks the shape as linear_operator would
        if isinstance(other, torch.Tensor):
            # Before linear_operator's own size check, whose RuntimeError names neither the
            # operator nor what it expected.
            self._check_rhs(other, transposed=self._ot_transposed)
        return super().matmul(other)

    def _bilinear_derivative(self, left_vecs, right_vecs):
        complex_grads = [t for t in self._args[1:] if t.is_complex() and t.requires_grad]
        if complex_grads:
            raise NotImplementedError(
                f"to_linear_operator: {self._ot_template!r} is built from complex tensors that require grad, "
                "and linear_operator's autograd Functions (solve, inv_quad_logdet, root decompositions, ...) "
                "differentiate real tensors only; differentiate matmul or to_dense of the bridge, or the "
                "otlinop operator itself, instead")
        return super()._bilinear_derivative(left_vecs, right_vecs)

    def _transpose_nonbatch(self) -> "OtlinopLinearOperator":
        op = self._ot_template
        if not op.has_adjoint:
            raise NotImplementedError(f"to_linear_operator: {op!r} has no adjoint, so no transpose")
        return self._with(transposed=not self._ot_transposed)

    def _diagonal(self) -> torch.Tensor:
        try:
            d = self.operator.diagonal()
        except NotImplementedError:
            # No cheap diagonal (e.g. X.T @ X + D): linear_operator's generic one,
            # through _get_indices (one product per column).
            return super()._diagonal()
        return d.expand(*self._ot_batch, d.shape[-1]) if self._ot_batch else d

    def to_dense(self) -> torch.Tensor:
        dense = self.operator.to_dense()
        if self._ot_transposed:
            dense = dense.mT
        return dense.expand(*self.shape) if self._ot_batch else dense

    def _get_indices(self, row_index, col_index, *batch_indices) -> torch.Tensor:
        # Every batch entry is the same operator: batch indices only shape the result.
        shape = torch.broadcast_shapes(*(i.shape for i in batch_indices), row_index.shape, col_index.shape)
        if self._ot_transposed:
            row_index, col_index = col_index, row_index
        rows = row_index.expand(shape).reshape(-1)
        cols = col_index.expand(shape).reshape(-1)
        op = self.operator
        unique_cols, col_pos = torch.unique(cols, return_inverse=True)
        unique_rows, row_pos = torch.unique(rows, return_inverse=True)
        if unique_rows.numel() < unique_cols.numel() and op.has_adjoint:
            picked = _times(op, self._unit_columns(op.shape[0], unique_rows), True)   # (m, rows): A[rows, :].T
            values = picked[cols, row_pos]
        else:
            picked = _times(op, self._unit_columns(op.shape[1], unique_cols), False)  # (n, cols): A[:, cols]
            values = picked[rows, col_pos]
        return values.reshape(shape)

    def _unit_columns(self, size: int, index: torch.Tensor) -> torch.Tensor:
        E = torch.zeros(size, index.numel(), dtype=self.dtype, device=self.device)
        E[index, torch.arange(index.numel(), device=self.device)] = 1
        return E

    def _getitem(self, row_index, col_index, *batch_indices):
        target = self
        if batch_indices:
            probe = torch.zeros((), device=self.device).expand(self._ot_batch)
            target = self._with(batch=probe[tuple(batch_indices)].shape)
        if _is_noop(row_index) and _is_noop(col_index):
            return target
        # Rows and columns through linear_operator's interpolation, on the batch-indexed view.
        return linear_operator.LinearOperator._getitem(target, row_index, col_index)

    def _expand_batch(self, batch_shape) -> "OtlinopLinearOperator":
        batch = list(batch_shape)
        current = list(self._ot_batch)
        if len(batch) < len(current):
            raise RuntimeError(f"to_linear_operator: cannot expand batch shape {tuple(current)} to "
                               f"{tuple(batch)}: fewer dimensions")
        for i, size in enumerate(reversed(current), start=1):
            if batch[-i] == -1:
                batch[-i] = size
            elif size != 1 and batch[-i] != size:
                raise RuntimeError(f"to_linear_operator: cannot expand batch shape {tuple(current)} to "
                                   f"{tuple(batch_shape)}")
        if any(s < 0 for s in batch):
            raise RuntimeError(f"to_linear_operator: invalid batch shape {tuple(batch_shape)}")
        return self._with(batch=batch)

    def repeat(self, *sizes) -> "OtlinopLinearOperator":
        if len(sizes) == 1 and not isinstance(sizes[0], int):
            sizes = tuple(sizes[0])
        if len(sizes) < 2 or tuple(sizes[-2:]) != (1, 1):
            raise RuntimeError(f"Invalid repeat arguments {tuple(sizes)}. Currently, repeat only works to create "
                               "repeated batches of a 2D LinearOperator.")
        reps = sizes[:-2]
        current = (1,) * (len(reps) - len(self._ot_batch)) + tuple(self._ot_batch)
        if len(current) > len(reps):
            raise RuntimeError(f"to_linear_operator: repeat {tuple(sizes)} has fewer dimensions than the "
                               f"operator's shape {fmt_shape(self.shape)}")
        return self._with(batch=tuple(c * r for c, r in zip(current, reps)))

    def _unsqueeze_batch(self, dim: int) -> "OtlinopLinearOperator":
        batch = list(self._ot_batch)
        batch.insert(dim, 1)
        return self._with(batch=batch)

    def _permute_batch(self, *dims: int) -> "OtlinopLinearOperator":
        return self._with(batch=[self._ot_batch[d] for d in dims])

    def _sum_batch(self, dim: int) -> "OtlinopLinearOperator":
        batch = list(self._ot_batch)
        copies = batch.pop(dim)
        scaled = self.operator * float(copies)     # on this object's tensors: gradients still reach them
        return OtlinopLinearOperator(self._args[0], *operator_tensors(scaled), template=scaled, batch=batch,
                                     transposed=self._ot_transposed)

    def _prod_batch(self, dim: int):
        if self._ot_batch[dim] == 1:
            return self.squeeze(dim)
        raise NotImplementedError(
            "to_linear_operator: the entrywise product over a batch dimension of an otlinop operator has no "
            "matrix-free form; use to_dense() first")

    def evaluate_kernel(self) -> "OtlinopLinearOperator":
        return self

    def __repr__(self) -> str:
        batch = f", batch {tuple(self._ot_batch)}" if self._ot_batch else ""
        of = "the transpose of " if self._ot_transposed else ""
        return f"<OtlinopLinearOperator of {of}{self._ot_op!r}{batch}>"


def to_linear_operator(A: LinearOperator) -> OtlinopLinearOperator:
    """``A.to_linear_operator()``: see ``LinearOperator.to_linear_operator``."""
    anchor = torch.zeros(0, dtype=A.dtype, device=A.device)
    return OtlinopLinearOperator(anchor, *operator_tensors(A), template=A)
