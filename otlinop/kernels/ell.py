"""Products with the padded ("ELL") layout of a truncated plan.

A layout from :func:`otlinop.kernels.plan_truncate` holds, for each row
``i``, the kept entries ``values[s, i]`` at the columns ``columns[s, i]`` in
its slots ``s < counts[i]`` (slot-major; the padding holds 0 and column 0).
``ell_matmat`` applies it to a vector or a matrix, with an optional fused
epilogue (``sign * row_scale_i * out_i + add_scale_i * add_i``: the Schur
complement of a Hessian in two launches); ``ell_bilinear`` computes
``sum_s values[s, i] <W_i, V_j> Y_j``. One program per tile of rows sums its
slots in order: results are deterministic (no atomics).

Cost: O(nnz k) time for ``ell_matmat``, O(nnz (k + e)) for ``ell_bilinear``;
no temporary of size n x m.
"""

from __future__ import annotations

import torch

from solvers import config

from ._dispatch import interpreting, resolve_backend
from ._grid import device_guard
from ._reference import compute_dtype
from ._triton import cdiv, tl, triton

__all__ = ["ell_bilinear", "ell_matmat", "ell_matmat_torch", "live_slots"]

#: Widest chunk of columns of V per program of ``ell_matmat``.
_ELL_MAX_BLOCK_K = 64

#: Widest W / V (k) and Y (e) that the Triton ``ell_bilinear`` keeps in registers;
#: wider operands take the torch path.
_ELL_BILINEAR_MAX = 256
_ELL_BILINEAR_BLOCK_M = 32


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n", "k"])
def _ell_kernel(VALS, COLS, COUNT, V, OUT, ROW_SCALE, ADD, ADD_SCALE, n, k, sign,
                stride_vm, stride_vk, stride_on, stride_ok, stride_an, stride_ak,
                HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # A (slots, rows, columns of V) tile per step: BLOCK_S slots of BLOCK_M rows are
    # gathered at once, so that many independent loads are in flight (a loop over
    # single slots is bound by the latency of its dependent gathers).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n
    k_ok = kk < k
    cnt = tl.load(COUNT + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for s0 in range(0, tl.max(cnt, axis=0), BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        live = slots[:, None] < cnt[None, :]                                  # (S, M)
        where = slots[:, None].to(tl.int64) * n + rows[None, :]
        w = tl.load(VALS + where, mask=live, other=0.0).to(tl.float32)
        j = tl.load(COLS + where, mask=live, other=0).to(tl.int64)
        vt = tl.load(V + j[:, :, None] * stride_vm + kk[None, None, :] * stride_vk,
                     mask=live[:, :, None] & k_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, :, None] * vt, axis=0)
    # Epilogue: sign * row_scale_i * acc + add_scale_i * add (the fused Schur product).
    if HAS_SCALE:
        acc *= tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    acc *= sign
    mask = row_ok[:, None] & k_ok[None, :]
    if HAS_ADD:
        add = tl.load(ADD + rows[:, None] * stride_an + kk[None, :] * stride_ak, mask=mask, other=0.0)
        acc += tl.load(ADD_SCALE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None] * add.to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_on + kk[None, :] * stride_ok, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n", "k", "e"])
def _ell_bilinear_kernel(VALS, COLS, COUNT, W, V, Y, OUT, n, k, e,
                         stride_wn, stride_wk, stride_vm, stride_vk, stride_ym, stride_ye, stride_on, stride_oe,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    ee = tl.arange(0, BLOCK_E)
    row_ok = rows < n
    k_ok = kk < k
    e_ok = ee < e
    cnt = tl.load(COUNT + rows, mask=row_ok, other=0)
    w_i = tl.load(W + rows[:, None] * stride_wn + kk[None, :] * stride_wk, mask=row_ok[:, None] & k_ok[None, :],
                  other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for s in range(0, tl.max(cnt, axis=0)):
        live = s < cnt
        where = s * n + rows.to(tl.int64)
        p = tl.load(VALS + where, mask=live, other=0.0).to(tl.float32)
        j = tl.load(COLS + where, mask=live, other=0).to(tl.int64)
        v_j = tl.load(V + j[:, None] * stride_vm + kk[None, :] * stride_vk, mask=live[:, None] & k_ok[None, :],
                      other=0.0).to(tl.float32)
        y_j = tl.load(Y + j[:, None] * stride_ym + ee[None, :] * stride_ye, mask=live[:, None] & e_ok[None, :],
                      other=0.0).to(tl.float32)
        acc += (p * tl.sum(w_i * v_j, axis=1))[:, None] * y_j
    tl.store(OUT + rows[:, None] * stride_on + ee[None, :] * stride_oe, acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & e_ok[None, :])


def _ell_blocks(k: int):
    """(BLOCK_S, BLOCK_M, BLOCK_K) of ``_ell_kernel``, from an H100 sweep at 10k
    rows, 43 entries per row: a vector takes 32 slots of 16 rows per step (8.7
    us against 22 us for one slot of 128 rows); a matrix takes whole rows of V
    (up to 64 columns) of 16 rows, 128 / BLOCK_K slots per step."""
    if k == 1:
        return 32, 16, 1
    block_k = min(_ELL_MAX_BLOCK_K, triton.next_power_of_2(k))
    return max(1, 128 // block_k), 16, block_k


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def live_slots(counts, capacity: int) -> torch.Tensor:
    """The (capacity, n) mask of a layout's live slots: ``s < counts[i]``."""
    return torch.arange(capacity, device=counts.device)[:, None] < counts[None, :].to(torch.int64)


def _check_layout(fn, values, columns, counts, V, m):
    for name, t in (("values", values), ("columns", columns), ("counts", counts), ("V", V)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if values.ndim != 2 or columns.shape != values.shape or counts.shape != (values.shape[1],):
        raise ValueError(f"{fn}: values and columns must be (capacity, n) and counts (n,), got "
                         f"{tuple(values.shape)}, {tuple(columns.shape)} and {tuple(counts.shape)}")
    if columns.dtype != torch.int32 or counts.dtype != torch.int32:
        raise TypeError(f"{fn}: columns and counts must be int32, got {columns.dtype} and {counts.dtype}")
    if V.ndim not in (1, 2) or V.shape[0] != m:
        raise ValueError(f"{fn}: V has shape {tuple(V.shape)}, expected ({m},) or ({m}, k)")
    if V.dtype != values.dtype:
        raise TypeError(f"{fn}: V has dtype {V.dtype}, expected {values.dtype} like values")
    devices = {t.device for t in (values, columns, counts, V)}
    if len(devices) != 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def _epilogue(out, row_scale, sign, add, add_scale):
    """``sign * row_scale * out + add_scale * add`` (each part optional), rows first."""
    if row_scale is not None:
        out = out * row_scale.to(out.dtype)[:, None]
    if sign != 1.0:
        out = out * sign
    if add is not None:
        add2 = add[:, None] if add.ndim == 1 else add
        out = out + add_scale.to(out.dtype)[:, None] * add2.to(out.dtype)
    return out


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _ell_triton(values, columns, counts, V, row_scale=None, sign=1.0, add=None, add_scale=None):
    vector = V.ndim == 1
    V2 = V[:, None] if vector else V
    cap, n = values.shape
    k = V2.shape[1]
    out = torch.empty((n, k), device=V.device, dtype=values.dtype)
    if n == 0 or k == 0:
        out.zero_()
        out = _epilogue(out, row_scale, sign, add, add_scale).to(values.dtype)
        return out[:, 0] if vector else out
    if k > 1 and (V2.stride(1) != 1 or V2.stride(0) % 16):
        # Rows of V gathered from a row stride that is a multiple of 16 entries load
        # as wide vectors; with k = 65 columns they did not, and the product took 10x
        # longer (H100). One padded copy of V costs far less.
        padded = torch.zeros((V2.shape[0], cdiv(k, 16) * 16), device=V.device, dtype=V.dtype)
        padded[:, :k] = V2
        V2 = padded
    add2 = None if add is None else (add[:, None] if add.ndim == 1 else add)
    block_s, block_m, block_k = _ell_blocks(k)
    if interpreting():
        block_s = min(block_s, 4)    # the interpreter: small steps
    grid = (cdiv(n, block_m), cdiv(k, block_k))
    with device_guard(V.device):
        _ell_kernel[grid](values, columns, counts, V2, out,
                          values if row_scale is None else row_scale, V2 if add2 is None else add2,
                          values if add_scale is None else add_scale, n, k, float(sign),
                          V2.stride(0), V2.stride(1), out.stride(0), out.stride(1),
                          0 if add2 is None else add2.stride(0), 0 if add2 is None else add2.stride(1),
                          HAS_SCALE=row_scale is not None, HAS_ADD=add2 is not None,
                          BLOCK_S=block_s, BLOCK_M=block_m, BLOCK_K=block_k)
    return out[:, 0] if vector else out


def ell_matmat(values, columns, counts, V, *, m, row_scale=None, sign=1.0, add=None, add_scale=None,
               backend=None):
    """``out_i = sum_{s < counts_i} values[s, i] V[columns[s, i]]``: the product of
    a padded layout (from :func:`plan_truncate`) with V, with an optional
    epilogue ``sign * row_scale_i * out_i + add_scale_i * add_i``.

    Parameters
    ----------
    values : Tensor, shape (capacity, n)
    columns, counts : int32 Tensors, shapes (capacity, n) and (n,)
        Every ``counts[i]`` must be at most ``capacity`` (the product reads
        only the live slots).
    V : Tensor, shape (m,) or (m, k), dtype of values
    m : int
        The number of columns of the layout (rows of V).
    row_scale : Tensor, shape (n,), optional
    sign : float, default 1.0
    add : Tensor, shape like the output, optional
    add_scale : Tensor, shape (n,); required with ``add``
        The epilogue, applied in the same kernel: two products and a
        diagonal make the Schur complement ``Diag(D) - P.T Diag(w) P`` in two
        launches (``TruncatedPlanOperator``).
    backend : {None, "auto", "triton", "torch"}
        None or "auto": Triton for CUDA float32/float16/bfloat16, torch otherwise.

    Returns
    -------
    Tensor, shape (n,) or (n, k)

    Notes
    -----
    O(nnz k) time, no temporary of size n x m. Slots are summed in order:
    the result is deterministic. Accumulates in fp32 (float64 for float64).

    Examples
    --------
    >>> import torch
    >>> from otlinop.kernels import ell_matmat
    >>> vals = torch.tensor([[2.0, 3.0]]); cols = torch.tensor([[1, 0]], dtype=torch.int32)
    >>> ell_matmat(vals, cols, torch.ones(2, dtype=torch.int32), torch.tensor([10.0, 20.0]), m=2).tolist()
    [40.0, 30.0]
    """
    _check_layout("ell_matmat", values, columns, counts, V, m)
    n = values.shape[1]
    out_shape = (n,) if V.ndim == 1 else (n, V.shape[1])
    for name, t, shape in (("row_scale", row_scale, (n,)), ("add_scale", add_scale, (n,)), ("add", add, out_shape)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.device != V.device):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"ell_matmat: {name} must be a tensor of shape {shape} on {V.device}, got {got}")
    if (add is None) != (add_scale is None):
        raise ValueError("ell_matmat: add and add_scale go together (add_scale_i * add_i)")
    if resolve_backend("ell_matmat", backend, values) == "torch":
        return _ell_torch(values, columns, counts, V, row_scale, sign, add, add_scale)
    return _ell_triton(values, columns, counts, V, row_scale, sign, add, add_scale)


def ell_bilinear(values, columns, counts, W, V, Y, *, m, backend=None):
    """``out_i = sum_{s < counts_i} values[s, i] <W_i, V_j> Y_j`` with ``j = columns[s, i]``:
    the ``bilinear`` product of a padded layout (see :func:`ell_matmat`).

    Parameters
    ----------
    values, columns, counts
        A layout from :func:`plan_truncate` (every count at most the capacity).
    W : Tensor, shape (n, k)
    V : Tensor, shape (m, k)
    Y : Tensor, shape (m, e)
    m : int
    backend : {None, "auto", "triton", "torch"}

    Returns
    -------
    Tensor, shape (n, e)

    Notes
    -----
    O(nnz (k + e)) time; slots summed in order (deterministic). Operands
    wider than 256 columns take the torch path.
    """
    _check_layout("ell_bilinear", values, columns, counts, V, m)
    n = values.shape[1]
    for name, t, rows in (("W", W, n), ("Y", Y, m)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != rows or t.dtype != values.dtype:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"ell_bilinear: {name} must be a ({rows}, ...) tensor of dtype {values.dtype}, got {got}")
    if V.ndim != 2 or W.shape[1] != V.shape[1]:
        raise ValueError(f"ell_bilinear: W {tuple(W.shape)} and V {tuple(V.shape)} need the same number of columns")
    backend = resolve_backend("ell_bilinear", backend, values)
    k, e = V.shape[1], Y.shape[1]
    if backend == "torch" or max(k, e) > _ELL_BILINEAR_MAX:
        return _ell_bilinear_torch(values, columns, counts, W, V, Y)
    out = torch.empty((n, e), device=Y.device, dtype=values.dtype)
    if n == 0 or e == 0:
        return out.zero_()
    bk = max(1, triton.next_power_of_2(max(k, 1)))
    be = max(1, triton.next_power_of_2(e))
    with device_guard(Y.device):
        _ell_bilinear_kernel[(cdiv(n, _ELL_BILINEAR_BLOCK_M),)](
            values, columns, counts, W, V, Y, out, n, k, e,
            W.stride(0), W.stride(1), V.stride(0), V.stride(1), Y.stride(0), Y.stride(1),
            out.stride(0), out.stride(1), BLOCK_M=_ELL_BILINEAR_BLOCK_M, BLOCK_K=bk, BLOCK_E=be)
    return out


# --------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------


def _ell_torch(values, columns, counts, V, row_scale=None, sign=1.0, add=None, add_scale=None):
    vector = V.ndim == 1
    V2 = V[:, None] if vector else V
    cap, n = values.shape
    dtype = compute_dtype(values.dtype)
    out = torch.zeros((n, V2.shape[1]), device=V.device, dtype=dtype)
    if cap and n and V2.shape[1]:
        # Padding slots hold value 0 and column 0; they are masked so that a
        # non-finite V_0 cannot leak into other rows.
        live = live_slots(counts, cap)
        per = max(1, config.torch_block_bytes // max(1, n * V2.shape[1] * out.element_size() * 2))
        for s0 in range(0, cap, per):
            s1 = min(cap, s0 + per)
            gathered = V2.to(dtype)[columns[s0:s1].to(torch.int64)]               # (s, n, k)
            w = torch.where(live[s0:s1], values[s0:s1].to(dtype), 0.0)
            gathered = torch.where(live[s0:s1, :, None], gathered, 0.0)
            out += (w[..., None] * gathered).sum(0)
    out = _epilogue(out, row_scale, sign, add, add_scale).to(values.dtype)
    return out[:, 0] if vector else out


def ell_matmat_torch(values, columns, counts, V, *, m):
    """Torch reference of :func:`ell_matmat` (any device and dtype)."""
    _check_layout("ell_matmat_torch", values, columns, counts, V, m)
    return _ell_torch(values, columns, counts, V)


def _ell_bilinear_torch(values, columns, counts, W, V, Y):
    cap, n = values.shape
    dtype = compute_dtype(values.dtype)
    out = torch.zeros((n, Y.shape[1]), device=Y.device, dtype=dtype)
    if cap and n and Y.shape[1]:
        W, V, Y = W.to(dtype), V.to(dtype), Y.to(dtype)
        live = live_slots(counts, cap)
        per_slot = n * (V.shape[1] + Y.shape[1] + 1) * out.element_size()
        per = max(1, config.torch_block_bytes // max(1, per_slot))
        for s0 in range(0, cap, per):
            s1 = min(cap, s0 + per)
            j = columns[s0:s1].to(torch.int64)
            w = (V[j] * W[None]).sum(-1) * values[s0:s1].to(dtype)          # (s, n)
            w = torch.where(live[s0:s1], w, 0.0)
            out += (w[..., None] * torch.where(live[s0:s1, :, None], Y[j], 0.0)).sum(0)
    return out.to(values.dtype)
