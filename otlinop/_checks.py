"""Argument validation: every check of otlinop's public arguments, written once.

The public functions of the package (``sinkhorn``, ``SamplesLoss``,
``PlanOperator``, ``hvp_x``, the kernels, ...) validate their arguments with
the functions below, so that one odd input meets the same answer everywhere.
The conventions:

- **Messages** begin with the public function the user called (``owner``:
  ``"hvp_x"`` even when a ``PlanOperator`` is built inside it), name the
  argument, say what was expected and what was received, and how to fix it.
- **Scalars**: one accepted set everywhere: Python ints and floats, NumPy
  scalars, and 0-d tensors that do not require grad. Bools, strings, None
  where a number is required, tensors of other shapes and tensors that
  require grad raise TypeError; NaN, inf (where not meaningful) and values
  out of range (``<= 0`` for a positive one) raise ValueError. Integer
  arguments take Python and NumPy integers and 0-d integer tensors.
- **Names**: ``backend`` is None or "auto" (Triton for CUDA tensors of a
  Triton dtype, torch otherwise), "torch" or "triton" at every entry point
  that takes one; ``precision`` is None (the kernels' default) or one of
  :data:`PRECISIONS`. An unknown name raises ValueError.
- **Tensors**: a non-tensor or a wrong dtype raises TypeError, a wrong shape
  or device ValueError (as torch does). Points are real floating tensors
  (float16, bfloat16, float32, float64); every other tensor of a call has the
  dtype and the device of ``x``.
- **Values** (NaN, inf, negative weights, masses) are read back from the
  device in one synchronisation per call, whatever the number of tensors.
  :func:`finite` stands aside when ``config.check_finite`` is False (the
  benchmarks) and while a CUDA graph is being captured (no synchronisation is
  allowed there; the warm-up call that every capture needs ran the check).

This module sits below the kernels: it imports torch and ``solvers.config``,
nothing from otlinop. Facts that belong to the kernels (whether Triton is
installed, which dtypes it takes) are passed in as arguments.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

from solvers import config

from ._measure_flags import box_diameter_from, measure_flags
from ._measure_flags import usable as fused_checks_usable

__all__ = [
    "REAL_DTYPES", "HALF_DTYPES", "BACKENDS", "PRECISIONS", "fmt_shape",
    "positive_scalar", "nonnegative_scalar", "fraction", "positive_int", "nonnegative_int", "flag",
    "function", "solver_function", "preconditioner", "reach_or_none",
    "backend_name", "precision_name", "triton_ready",
    "Geometry", "points", "vector", "weights", "potential", "matrix", "directions", "operand", "finite", "choice",
    "block_pattern", "cluster_layout",
    "capturing", "compute_dtype", "measures_and_read", "measures_ok",
    "COMPLEX_DTYPES", "OPERATOR_DTYPES", "operator_dtype", "real_operator_dtype", "operator_tensor",
    "operator_operand_shape",
    "operator_operand", "operator_shape", "operator_scalar", "operator_output", "same_space", "composable",
    "Inputs", "measures",
]

#: Dtypes of the points (and of every operator): the real floating ones.
REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Complex dtypes of the operator algebra (the OT operators stay real).
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
#: Dtypes of the operator algebra (``Dense``, ``Diag``, sums, products, ...).
OPERATOR_DTYPES = REAL_DTYPES + COMPLEX_DTYPES
#: Half dtypes: their potentials live in float32, and float32 vectors are accepted beside them.
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: Accepted values of ``backend`` besides None and "auto", which pick Triton for
#: CUDA tensors of a Triton dtype and torch otherwise.
BACKENDS = ("triton", "torch")

#: Accepted values of ``precision`` (None means the kernels' ``DEFAULT_PRECISION``).
PRECISIONS = ("ieee", "tf32", "tf32x3")

config.declare("check_finite", True, owner="otlinop", doc=(
    "every public call checks its inputs for NaN / +inf with one device-to-host synchronisation, "
    "and so does a PlanOperator's construction (with its weights' signs); benchmarks turn it off"))

# What an argument is, for the messages that refuse a value of it.
_HINTS = {
    "eps": "eps is the entropic regularisation, e.g. eps=0.1",
    "blur": "blur is the final length scale, eps = blur**2, e.g. blur=0.05",
    "cost_scale": "use 1.0 for |x-y|^2 or 0.5 for |x-y|^2/2 (GeomLoss' p=2)",
    "reach": "None (or inf) means a balanced (hard) marginal constraint",
    "reach_x": "None (or inf) means a hard constraint on the first marginal",
    "reach_y": "None (or inf) means a hard constraint on the second marginal",
    "scaling": "it is the ratio between consecutive blur scales (GeomLoss' default 0.5)",
    "diameter": "it is the first blur scale of the schedule; None takes the diameter of the data",
    "ridge": "0 disables the ridge; None gives the default",
    "tol": "e.g. tol=1e-8",
    "truncate": "the truncation tolerance, e.g. truncate=1e-8; None keeps the exact plan",
    "max_fill": "e.g. max_fill=0.25",
    "threshold": "the L1 marginal error at which to stop, e.g. threshold=1e-3",
    "rtol": "the inner solve's relative residual, e.g. rtol=1e-10",
    "atol": "the inner solve's absolute residual, e.g. atol=0.0",
    "hvp_rtol": "the inner solve's relative residual, e.g. 1e-10",
}


def fmt_shape(shape) -> str:
    """A shape as Python writes a tuple: ``(5,)``, ``(2, 3)``."""
    shape = tuple(shape)
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _describe(value) -> str:
    """The received value for a message: its type, and its repr when short."""
    if value is None:
        return "None"
    text = repr(value)
    return type(value).__name__ + (f" {text}" if len(text) <= 40 else "")


def _hint(name: str, hint) -> str:
    hint = _HINTS.get(name, "") if hint is None else hint
    return f"; {hint}" if hint else ""


# --------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------
def _number(owner: str, name: str, value, kind: str, hint, *, integer: bool = False):
    """``value`` as a Python number, or TypeError naming ``kind`` ("a positive number")."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise TypeError(f"{owner}: {name} must be {kind}, got a tensor of shape {fmt_shape(value.shape)}; "
                            f"pass a Python number or a 0-d tensor{_hint(name, hint)}")
        if value.requires_grad:
            raise TypeError(f"{owner}: {name} is a tensor that requires grad, but gradients w.r.t. {name} "
                            f"are not implemented; pass {name}.detach() or float({name})")
        value = value.item()
    wanted = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise TypeError(f"{owner}: {name} must be {kind}, got {_describe(value)}{_hint(name, hint)}")
    return int(value) if integer else float(value)


def positive_scalar(owner: str, name: str, value, hint: str | None = None, *, allow_inf: bool = False) -> float:
    """``value`` as a positive finite float (``+inf`` too with ``allow_inf``).

    ``hint`` completes the message (default: a line on what ``name`` is, for
    the common names); TypeError for a value that is not a number, ValueError
    for NaN, inf or ``<= 0``.
    """
    value = _number(owner, name, value, "a positive number", hint)
    if not (value > 0 and (math.isfinite(value) or (allow_inf and value == math.inf))):
        raise ValueError(f"{owner}: {name} must be positive{'' if allow_inf else ' and finite'}, got {value}"
                         f"{_hint(name, hint)}")
    return value


def nonnegative_scalar(owner: str, name: str, value, hint: str | None = None, *,
                       allow_inf: bool = False) -> float:
    """``value`` as a float ``>= 0``, finite unless ``allow_inf``."""
    value = _number(owner, name, value, "a non-negative number", hint)
    if not (value >= 0 and (math.isfinite(value) or allow_inf)):
        raise ValueError(f"{owner}: {name} must be non-negative{'' if allow_inf else ' and finite'}, "
                         f"got {value}{_hint(name, hint)}")
    return value


def fraction(owner: str, name: str, value, hint: str | None = None, *, closed: bool = False) -> float:
    """``value`` as a float in (0, 1), or in (0, 1] with ``closed``."""
    interval = "(0, 1]" if closed else "(0, 1)"
    value = _number(owner, name, value, f"a number in {interval}", hint)
    if not (0.0 < value < 1.0 or (closed and value == 1.0)):
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value}{_hint(name, hint)}")
    return value


def positive_int(owner: str, name: str, value, hint: str | None = None) -> int:
    """``value`` as an int ``>= 1`` (Python or NumPy integer, or a 0-d integer tensor)."""
    value = _number(owner, name, value, "a positive integer", hint, integer=True)
    if value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value}{_hint(name, hint)}")
    return value


def nonnegative_int(owner: str, name: str, value, hint: str | None = None) -> int:
    """``value`` as an int ``>= 0``."""
    value = _number(owner, name, value, "a non-negative integer", hint, integer=True)
    if value < 0:
        raise ValueError(f"{owner}: {name} must be a non-negative integer, got {value}{_hint(name, hint)}")
    return value


def flag(owner: str, name: str, value) -> bool:
    """A bool option: True or False, nothing else (``"no"`` would be true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {_describe(value)}")
    return value


def function(owner: str, name: str, value, expected: str):
    """A callable argument; ``expected`` says which ("a solver function such as solvers.cg")."""
    if not callable(value):
        raise TypeError(f"{owner}: {name} must be {expected}, got {_describe(value)}")
    return value


def choice(owner: str, name: str, value, options: tuple, what: str = "") -> str:
    """One of the strings ``options`` (``what`` says what each means, for the message)."""
    if not (isinstance(value, str) and value in options):
        listed = ", ".join(repr(o) for o in options)
        raise ValueError(f"{owner}: {name} must be one of {listed}, got {value!r}" + (f" ({what})" if what else ""))
    return value


def solver_function(owner: str, name: str, value):
    """A solver argument: a callable such as ``solvers.cg``, called as ``solver(A, b, M=..., rtol=..., ...)``."""
    return function(owner, name, value, "a solver function such as solvers.cg or solvers.minres")


def preconditioner(owner: str, name: str, M):
    """A preconditioner argument: None, an operator or a factory, never a name or a number."""
    if isinstance(M, (str, bool, numbers.Number)):
        raise TypeError(f"{owner}: {name} must be None, an operator, or a factory such as solvers.jacobi() or "
                        f"solvers.neumann(3), got {_describe(M)}")
    return M


def reach_or_none(owner: str, name: str, value) -> float | None:
    """A marginal relaxation ``reach`` (``rho = reach**2``): a positive float, or
    None for a hard constraint (None or ``+inf``)."""
    if value is None:
        return None
    value = positive_scalar(owner, name, value, allow_inf=True)
    return None if value == math.inf else value


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------
def backend_name(owner: str, backend) -> str | None:
    """The backend asked for: None (for None and "auto"), "torch" or "triton"."""
    if backend is None or (isinstance(backend, str) and backend == "auto"):
        return None
    if isinstance(backend, str) and backend in BACKENDS:
        return str(backend)
    raise ValueError(f"{owner}: backend must be None or 'auto' (Triton for CUDA tensors of a Triton dtype, "
                     f"torch otherwise), 'torch' or 'triton', got {backend!r}")


def precision_name(owner: str, precision) -> str | None:
    """The dot precision asked for: None (the kernels' default) or one of :data:`PRECISIONS`."""
    if precision is None or (isinstance(precision, str) and precision in PRECISIONS):
        return precision
    raise ValueError(f"{owner}: precision must be None (the kernels' default, accurate to fp32) or one of "
                     f"{', '.join(repr(p) for p in PRECISIONS)}, got {precision!r}")


def triton_ready(owner: str, x: torch.Tensor, *, installed: bool, interpreted: bool, dtypes: tuple) -> None:
    """That ``backend="triton"`` can run on points ``x``.

    ``installed``: whether triton imports; ``interpreted``: whether the
    kernels were created by the Triton interpreter; ``dtypes``: the dtypes
    the kernels take (the kernels' facts, passed in).
    """
    if not installed:
        raise ValueError(f"{owner}: backend='triton' needs the triton package, which is not installed; "
                         "use backend='torch' (or None)")
    if x.dtype not in dtypes:
        names = ", ".join(str(t).replace("torch.", "") for t in dtypes[:-1]) + " and " + \
            str(dtypes[-1]).replace("torch.", "")
        raise TypeError(f"{owner}: backend='triton' supports {names} points; x has dtype {x.dtype}. "
                        f"Use backend='torch' (or None) for {x.dtype}.")
    if not x.is_cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{owner}: backend='triton' needs CUDA tensors, but x is on {x.device}. Move the "
                             "inputs to a GPU, use backend='torch', or (for tests) set TRITON_INTERPRET=1 before "
                             "importing otlinop to run the Triton interpreter on CPU.")
        if not interpreted:
            raise ValueError(f"{owner}: TRITON_INTERPRET=1 was set after otlinop.kernels was imported, so its "
                             "kernels were compiled for a GPU; set it before the import to run backend='triton' "
                             "on CPU tensors.")


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Sizes of one call: ``x`` is (n, d) or (B, n, d), ``y`` is (m, d) or (B, m, d).

    ``owner`` names the public function in messages; ``ref`` is the tensor
    whose dtype and device the others must share ("x", or "P" for an operator).
    """

    owner: str
    batched: bool
    B: int
    n: int
    m: int
    d: int
    dtype: torch.dtype
    device: torch.device
    ref: str = "x"

    def shape(self, *dims) -> tuple:
        """The full shape of an output whose unbatched shape is ``dims``."""
        return ((self.B,) if self.batched else ()) + tuple(dims)


def points(owner: str, x, y, *, batch: str = "same", allow_empty: bool = True, max_batch: int | None = None,
           hint: str | None = None) -> Geometry:
    """Validate two point clouds and return the sizes of the call.

    ``batch``: "none" takes (n, d) and (m, d) only (``hint`` says what to do
    with batched clouds); "same" also (B, n, d) and (B, m, d) with one B;
    "broadcast" also lets one side be unbatched (shared by the batch).
    ``allow_empty=False`` refuses clouds without points; ``max_batch`` bounds B.
    """
    ndims = (2,) if batch == "none" else (2, 3)
    if batch == "none" and hint is None:
        hint = "batched point clouds are not supported here; call once per problem"
    for name, t, rows in (("x", x, "n"), ("y", y, "m")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {_describe(t)}; "
                            "convert with torch.as_tensor(...)")
        if t.ndim not in ndims:
            want = f"({rows}, d)" if batch == "none" else f"({rows}, d) or (B, {rows}, d)"
            raise ValueError(f"{owner}: {name} has shape {fmt_shape(t.shape)}, expected {want}"
                             + (f"; {hint}" if hint and t.ndim == 3 else ""))
        if t.dtype.is_complex:
            raise TypeError(f"{owner}: {name} has dtype {t.dtype}, but points, plans and their Hessians are real "
                            "(float16, bfloat16, float32 or float64); complex dtypes are for the operator algebra "
                            "(Dense, Diag, Identity, their sums and products)")
        if t.dtype not in REAL_DTYPES:
            raise TypeError(f"{owner}: {name} must have a real floating dtype, got {t.dtype} (float16, bfloat16, "
                            f"float32 or float64 are accepted); convert with {name}.to(torch.float32)")
    if batch == "same" and x.ndim != y.ndim:
        raise ValueError(f"{owner}: x has shape {fmt_shape(x.shape)} and y has shape {fmt_shape(y.shape)}; "
                         "both must be unbatched (n, d), (m, d) or both batched (B, n, d), (B, m, d)")
    if x.ndim == 3 and y.ndim == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"{owner}: x has batch size {x.shape[0]} but y has {y.shape[0]} (shapes "
                         f"{fmt_shape(x.shape)} and {fmt_shape(y.shape)}); the batch sizes (first dims) must match")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{owner}: x and y must have the same dimension d, got x {fmt_shape(x.shape)} "
                         f"and y {fmt_shape(y.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{owner}: the points have 0 coordinates (x has shape {fmt_shape(x.shape)}); "
                         "each point needs d >= 1")
    batched = x.ndim == 3 or y.ndim == 3
    B = x.shape[0] if x.ndim == 3 else (y.shape[0] if y.ndim == 3 else 1)
    if not allow_empty:
        for name, t in (("x", x), ("y", y)):
            if t.shape[-2] == 0:
                raise ValueError(f"{owner}: {name} is an empty point cloud (shape {fmt_shape(t.shape)}); "
                                 "each measure needs at least one point")
        if batched and B == 0:
            raise ValueError(f"{owner}: the batch is empty (x has shape {fmt_shape(x.shape)})")
    if max_batch is not None and B > max_batch:
        raise ValueError(f"{owner}: batch size {B} exceeds the maximum of {max_batch}; split the batch")
    if y.dtype != x.dtype:
        raise TypeError(f"{owner}: y has dtype {y.dtype}, expected {x.dtype} like x; convert with y.to({x.dtype})")
    if y.device != x.device:
        raise ValueError(f"{owner}: y is on device {y.device}, but x is on {x.device}; "
                         f"move it with y.to('{x.device}')")
    if x.device.type == "meta":
        # Meta tensors have shapes but no values: nothing can be computed from them.
        raise ValueError(f"{owner}: x and y are on the meta device, which holds shapes but no values; "
                         "pass point clouds with data (on 'cpu' or 'cuda')")
    return Geometry(owner, batched, B, x.shape[-2], y.shape[-2], x.shape[-1], x.dtype, x.device)


def _tensor(geo: Geometry, name: str, t, expected: str, *, optional: bool) -> None:
    """That ``t`` is a tensor (``expected``: its shape, for a None where one is required)."""
    if t is None and not optional:
        raise TypeError(f"{geo.owner}: {name} must be a torch.Tensor of shape {expected}, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{geo.owner}: {name} must be a torch.Tensor{' or None' if optional else ''}, got "
                        f"{_describe(t)}; convert with torch.as_tensor(...)")


def _dtype_device(geo: Geometry, name: str, t: torch.Tensor, *, wide: bool) -> None:
    """``t`` has the call's dtype (or float32 beside half points, with ``wide``) and device."""
    allowed = (geo.dtype, torch.float32) if (wide and geo.dtype in HALF_DTYPES) else (geo.dtype,)
    if t.dtype not in allowed:
        raise TypeError(f"{geo.owner}: {name} has dtype {t.dtype}, expected {' or '.join(map(str, allowed))} "
                        f"like {geo.ref}; convert with {name}.to({geo.dtype})")
    if t.device != geo.device:
        raise ValueError(f"{geo.owner}: {name} is on device {t.device}, but {geo.ref} is on {geo.device}; "
                         f"move it with {name}.to('{geo.device}')")


def vector(geo: Geometry, name: str, t, length: int, *, what: str = "", optional: bool = False,
           shared: bool = False, wide: bool = False):
    """A per-point vector: (length,), or (B, length) in a batched call.

    ``shared``: a batched call also takes an unbatched (length,) vector,
    shared by the batch. ``optional``: None passes through. ``what`` says
    what the vector is ("one weight per point of x"); ``wide`` accepts
    float32 beside half points.
    """
    expected = geo.shape(length)

    def want():
        # Formatted only for a message: under torch.compile the sizes may be symbolic.
        return fmt_shape(expected) + (f" or ({length},)" if shared and geo.batched else "")

    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor):
        _tensor(geo, name, t, want(), optional=optional)
    shape = tuple(t.shape)
    if not (shape == expected or (shared and shape == (length,))):
        want = want()
        hint = ""
        if geo.batched and not shared and shape == (length,):
            hint = f"; a batched call needs a batched {name}, e.g. {name}.expand({geo.B}, {length})"
        raise ValueError(f"{geo.owner}: {name} has shape {fmt_shape(shape)}, expected {want}"
                         + (f" ({what})" if what else "") + hint)
    _dtype_device(geo, name, t, wide=wide)
    return t


def weights(geo: Geometry, name: str, w, side: str) -> torch.Tensor:
    """The weights of the cloud ``side`` ("x" or "y"): None gives uniform weights 1/n,
    in float32 beside half points (1/n in half precision is off by up to 2^-9, and so
    would be the total mass and the loss)."""
    length = geo.n if side == "x" else geo.m
    if w is None:
        dtype = torch.float32 if geo.dtype in HALF_DTYPES else geo.dtype
        return torch.full(geo.shape(length), 1.0 / length, dtype=dtype, device=geo.device)
    return vector(geo, name, w, length, what=f"one weight per point of {side}", optional=True)


def potential(owner: str, name: str, t, like: torch.Tensor, *, batched: bool, dtype: torch.dtype):
    """A warm-start potential shaped like the weights ``like`` (batched, (B, n)),
    of any real dtype: returned detached, in ``dtype`` and batched (None
    passes through). Its values are checked (one synchronisation), whatever
    ``config.check_finite``, as those of :func:`measures`."""
    if t is None:
        return None
    expected = tuple(like.shape) if batched else tuple(like.shape[1:])
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor or None, got {_describe(t)}; "
                        "convert with torch.as_tensor(...)")
    if tuple(t.shape) != expected:
        raise ValueError(f"{owner}: {name} has shape {fmt_shape(t.shape)}, expected {fmt_shape(expected)} "
                         "(one value per point)")
    if t.device != like.device:
        raise ValueError(f"{owner}: {name} is on device {t.device}, but x is on {like.device}; "
                         f"move it with {name}.to('{like.device}')")
    if t.dtype not in REAL_DTYPES:
        raise TypeError(f"{owner}: {name} must have a real floating dtype, got {t.dtype}; "
                        f"convert with {name}.to({dtype})")
    t = t.detach().to(dtype)
    _raise_first(owner, _value_flags({name: t}))
    return t if batched else t.unsqueeze(0)


def matrix(geo: Geometry, name: str, t, rows: int, cols: int | None = None, *, cols_name: str = "k",
           what: str = "", shared: bool = False, wide: bool = False):
    """A per-point matrix: (rows, cols), or (B, rows, cols) in a batched call.

    ``cols=None`` takes any number of columns (``cols_name`` in messages);
    ``shared``: a batched call also takes an unbatched matrix.
    """
    c = cols_name if cols is None else cols
    want = (f"({geo.B}, {rows}, {c})" if geo.batched else f"({rows}, {c})")
    if geo.batched and shared:
        want += f" or ({rows}, {c})"
    _tensor(geo, name, t, want, optional=False)
    shape = tuple(t.shape)
    ok = (t.ndim == 2 and (shared or not geo.batched)) or (geo.batched and t.ndim == 3 and shape[0] == geo.B)
    if not (ok and shape[-2] == rows and (cols is None or shape[-1] == cols)):
        raise ValueError(f"{geo.owner}: {name} has shape {fmt_shape(shape)}, expected {want}"
                         + (f" ({what})" if what else ""))
    _dtype_device(geo, name, t, wide=wide)
    return t


def directions(geo: Geometry, name: str, t, rows: int, *, k: int | None = None, what: str = ""):
    """Directions at the points of an unbatched call: one, (rows, d), or k >= 1
    of them stacked along a last axis, (rows, d, k).

    ``k``: what another argument of the call already fixed, None if nothing
    did (either form), 0 for a single direction ((rows, d) only), else the
    count ((rows, d, k) only).
    """
    d = geo.d
    want = {None: f"({rows}, {d}) or ({rows}, {d}, k), k >= 1", 0: f"({rows}, {d})"}.get(k, f"({rows}, {d}, {k})")
    _tensor(geo, name, t, want, optional=False)
    shape = tuple(t.shape)
    ok = shape[:2] == (rows, d) and t.ndim in (2, 3)
    if ok and k is not None:
        ok = shape[2:] == (() if k == 0 else (k,))
    if ok and t.ndim == 3 and shape[2] == 0:
        ok = False
    if not ok:
        raise ValueError(f"{geo.owner}: {name} has shape {fmt_shape(shape)}, expected {want}"
                         + (f" ({what})" if what else ""))
    _dtype_device(geo, name, t, wide=False)
    return t


def operand(geo: Geometry, name: str, V, rows: int, *, what: str = "", transpose: str = "", wide: bool = False):
    """The operand of a product: (rows,) or (rows, k), with a leading B in a
    batched call (an unbatched one would be ambiguous: (B, m) or (m, k)?).

    None passes through. ``transpose`` names the call of the transposed
    product, suggested when V has one row per point of x instead.
    """
    if V is None:
        return None
    lead = geo.shape()
    want = f"{fmt_shape(lead + (rows,))} or (" + ", ".join(str(s) for s in lead + (rows,)) + ", k)"
    _tensor(geo, name, V, want, optional=True)
    L = len(lead)
    if not (V.ndim in (L + 1, L + 2) and tuple(V.shape[:L + 1]) == lead + (rows,)):
        hint = ""
        if transpose and V.ndim > L and V.shape[L] == geo.n != rows:
            hint = f"; it has one row per point of x: did you mean the transpose, {transpose}?"
        raise ValueError(f"{geo.owner}: {name} has shape {fmt_shape(V.shape)}, expected {want}"
                         + (f" ({what})" if what else "") + hint)
    _dtype_device(geo, name, V, wide=wide)
    return V


def _index_vector(owner: str, name: str, t, expected: str, device) -> None:
    """An int64 vector of shape ``expected`` (formatted) on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor of dtype int64 and shape {expected}, got "
                        f"{_describe(t)}; convert with torch.as_tensor(..., dtype=torch.int64)")
    if t.dtype != torch.int64:
        raise TypeError(f"{owner}: {name} has dtype {t.dtype}, expected torch.int64; convert with "
                        f"{name}.to(torch.int64)")
    if t.device != device:
        raise ValueError(f"{owner}: {name} is on device {t.device}, but x is on {device}; "
                         f"move it with {name}.to('{device}')")


def block_pattern(owner: str, ptr, idx, num_rows: int, num_cols: int, device, *, values: bool = True) -> list:
    """A CSR pattern of kept (row cluster, column cluster) pairs; returns value flags.

    ``ptr`` (num_rows + 1,) and ``idx`` (nnz,), int64 on ``device``: row
    cluster I keeps the column clusters ``idx[ptr[I]:ptr[I + 1]]``. Shapes,
    dtypes and devices raise here; the values (``ptr`` from 0 to nnz,
    non-decreasing; ids in ``[0, num_cols)``, strictly ascending per row) come
    back as ``(flag, message)`` pairs of 0-d device tensors for :func:`finite`'s
    ``flags``: one read-back with the other checks of the call. ``values=False``
    (``config.check_finite`` off) returns no flags and launches nothing.
    """
    _index_vector(owner, "ptr", ptr, f"({num_rows + 1},)", device)
    if tuple(ptr.shape) != (num_rows + 1,):
        raise ValueError(f"{owner}: ptr has shape {fmt_shape(ptr.shape)}, expected ({num_rows + 1},): one entry "
                         f"per row cluster ({num_rows}) plus one")
    _index_vector(owner, "idx", idx, "(nnz,)", device)
    if idx.ndim != 1:
        raise ValueError(f"{owner}: idx has shape {fmt_shape(idx.shape)}, expected (nnz,): the kept column "
                         "cluster ids, row cluster after row cluster")
    nnz = idx.numel()
    if not values:
        return []
    with torch.no_grad():
        flags = [((ptr[0] == 0) & (ptr[-1] == nnz) & (ptr[1:] >= ptr[:-1]).all(),
                  f"ptr must start at 0, end at idx.numel() = {nnz} and never decrease")]
        if nnz:
            row = torch.searchsorted(ptr, torch.arange(nnz, device=ptr.device), right=True) - 1
            ascending = ((idx[1:] > idx[:-1]) | (row[1:] != row[:-1])).all()
            flags.append((ascending & (idx.amin() >= 0) & (idx.amax() < num_cols),
                          f"idx must hold column cluster ids in [0, {num_cols}), strictly ascending inside each "
                          "row cluster (sort them, drop repeats)"))
    return flags


def cluster_layout(geo: Geometry, x_starts, y_starts, ptr, idx, *, values: bool = True) -> list:
    """Clustered clouds and a block pattern of an unbatched call; returns value flags.

    ``x_starts`` (Kx + 1,) and ``y_starts`` (Ky + 1,): cluster I of x holds the
    rows ``x_starts[I]:x_starts[I + 1]``; ``ptr`` and ``idx``: the pattern of
    :func:`block_pattern` over Kx row and Ky column clusters. All int64 on the
    device of x. Shapes, dtypes and devices raise here; the values (starts
    from 0 to n, non-decreasing, and the pattern's) come back as flags for
    :func:`finite`'s ``flags`` (none with ``values=False``).
    """
    owner = geo.owner
    flags = []
    for name, t, rows, count in (("x_starts", x_starts, "(Kx + 1,)", geo.n),
                                 ("y_starts", y_starts, "(Ky + 1,)", geo.m)):
        _index_vector(owner, name, t, rows, geo.device)
        if t.ndim != 1 or t.numel() < 1:
            raise ValueError(f"{owner}: {name} has shape {fmt_shape(t.shape)}, expected {rows} with K >= 0 "
                             "(the first row of each cluster, then the number of points)")
        if not values:
            continue
        with torch.no_grad():
            ok = (t[0] == 0) & (t[-1] == count) & (t[1:] >= t[:-1]).all()
        flags.append((ok, f"{name} must start at 0, end at the number of points ({count}) and never "
                          "decrease (an empty cluster repeats a value)"))
    return flags + block_pattern(owner, ptr, idx, x_starts.numel() - 1, y_starts.numel() - 1, geo.device,
                                 values=values)


# --------------------------------------------------------------------------
# Operators: their data, their operands, their algebra
# --------------------------------------------------------------------------
# The operators are duck-typed here (``shape``, ``dtype``, ``device``): this
# module sits below the one that defines them.
_OPERATOR_DTYPE_NAMES = "float16, bfloat16, float32, float64, complex64, complex128"


def operator_dtype(owner: str, dtype) -> None:
    """The dtype of an operator: a real floating or a complex one."""
    if dtype not in OPERATOR_DTYPES:
        raise TypeError(f"{owner}: dtype must be one of {_OPERATOR_DTYPE_NAMES}, got {dtype}")


def real_operator_dtype(owner: str, name: str, dtype) -> None:
    """The dtype of an OT operator's data (a plan's entries): a real floating one."""
    if dtype.is_complex:
        raise TypeError(f"{owner}: {name} has dtype {dtype}, but {owner} is a real operator (the entries of a "
                        "transport plan are real); complex dtypes are for the operator algebra (Dense, Diag, ...)")
    if dtype not in REAL_DTYPES:
        raise TypeError(f"{owner}: {name} must have a real floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {dtype}")


def operator_tensor(owner: str, name: str, t, ndim: int) -> torch.Tensor:
    """The data of a concrete operator (``Dense``'s M, ``Diag``'s d): a tensor
    with ``ndim`` dimensions and a real floating or complex dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{owner}: {name} must be {ndim}-D, got shape {fmt_shape(t.shape)}")
    if t.dtype not in OPERATOR_DTYPES:
        raise TypeError(f"{owner}: {name} must have a floating or complex dtype ({_OPERATOR_DTYPE_NAMES}), "
                        f"got {t.dtype}; convert with {name}.to(torch.float64)")
    return t


def operator_operand_shape(A, method: str, name: str, shape, form: str, length: int, what: str) -> None:
    """The shape of the operand of ``A.<method>``: its first dimension has
    ``length`` entries, one per ``what`` ("columns" for ``A @ v``, "rows" for
    ``A.H @ u``) of A. ``form`` is "vector" ((length,) or a column (length, 1)),
    "matrix" ((length, k)) or "either" ((length,) or (length, k))."""
    owner = type(A).__name__
    shape = tuple(shape)
    ndim = len(shape)
    if form == "vector" and not (ndim == 1 or (ndim == 2 and shape[1] == 1)):
        more = "; use matmat for several columns" if ndim == 2 else ""
        raise ValueError(f"{owner}.{method}: {name} must be 1-D (m,) or a column (m, 1), got shape "
                         f"{fmt_shape(shape)}{more}")
    if form == "matrix" and ndim != 2:
        raise ValueError(f"{owner}.{method}: {name} must be 2-D, got shape {fmt_shape(shape)}")
    if form == "either" and ndim not in (1, 2):
        raise ValueError(f"{owner}.{method}: {name} must be 1-D (m,) or 2-D (m, k), got shape {fmt_shape(shape)}")
    if shape[0] != length:
        if ndim == 1:
            expected = f"({length},)"
        else:
            expected = f"({length}, 1)" if form == "vector" else f"({length}, k)"
        hint = ""
        if A.shape[0] != A.shape[1] and shape[0] == (A.shape[0] if what == "columns" else A.shape[1]):
            hint = "; did you mean A.T @ " + name + "?" if what == "columns" else "; did you mean A @ " + name + "?"
        raise ValueError(
            f"{owner}.{method}: {name} has shape {fmt_shape(shape)}, expected {expected} "
            f"(the operator has shape {fmt_shape(A.shape)}, {length} {what}){hint}")


def operator_operand(A, method: str, name: str, t, form: str, length: int, what: str) -> None:
    """The tensor operand ``t`` of ``A.<method>``: its shape (``operator_operand_shape``),
    A's dtype and device (a device without an index matches any of its type).
    An operator whose dtype (device) adapts (``Identity(n)``) takes any
    operator dtype (device)."""
    owner = type(A).__name__
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{owner}.{method}: {name} must be a torch.Tensor, got {type(t).__name__}; "
            "convert with torch.as_tensor(...)")
    # The common shapes pass without the full check (this runs at every product).
    if not (t.ndim == 1 and form != "matrix" and t.shape[0] == length) and not (
            t.ndim == 2 and t.shape[0] == length and (form != "vector" or t.shape[1] == 1)):
        operator_operand_shape(A, method, name, t.shape, form, length, what)
    if t.dtype != A.dtype and not (getattr(A, "adapts_dtype", False) and t.dtype in OPERATOR_DTYPES):
        raise TypeError(
            f"{owner}.{method}: {name} has dtype {t.dtype}, expected {A.dtype}; "
            f"convert with {name}.to({A.dtype})")
    if (t.device != A.device and not (t.device.type == A.device.type and A.device.index is None)
            and not getattr(A, "adapts_device", False)):
        raise ValueError(
            f"{owner}.{method}: {name} is on device {t.device}, expected {A.device}; "
            f"move it with {name}.to('{A.device}')")


def operator_shape(owner: str, shape) -> tuple:
    """The shape of an operator: two non-negative integers (Python, NumPy or
    0-d integer tensors). A float is refused, not truncated (``2.5`` is not 2)."""
    try:
        entries = tuple(shape)
    except TypeError:
        raise ValueError(f"{owner}: shape must be a pair of ints, got {shape!r}") from None
    for s in entries:
        if isinstance(s, torch.Tensor) and s.ndim == 0 and not s.dtype.is_floating_point \
                and not s.dtype.is_complex and s.dtype != torch.bool:
            continue
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"{owner}: shape must be a pair of ints, got {shape!r} "
                             f"({_describe(s)} is not an integer)")
    entries = tuple(int(s) for s in entries)
    if len(entries) != 2 or min(entries, default=0) < 0:
        raise ValueError(f"{owner}: shape must be two non-negative ints (n, m), got {shape!r}")
    return entries


def operator_scalar(owner: str, c) -> None:
    """ValueError if the factor ``c`` of ``c * A`` (or the divisor of ``A / c``) is
    NaN or infinite: the scaled operator would return NaN for every vector. A
    tensor is read back once (``finite``'s rules: not while capturing a graph,
    nor with ``config.check_finite`` off)."""
    if isinstance(c, torch.Tensor):
        finite(owner, {"c": c}, hint="the factor must be finite")
        return
    if isinstance(c, numbers.Number) and not all(map(math.isfinite, (complex(c).real, complex(c).imag))):
        raise ValueError(f"{owner}: c is {c!r}; the factor must be finite")


def operator_output(A, hook: str, out, shape: tuple, dtype) -> None:
    """What the hook ``A.<hook>`` returned: a tensor of ``shape`` and ``dtype``
    (None: any operator dtype). A user operator's hook is trusted nowhere
    else, and a wrong shape would otherwise travel on (or broadcast) silently."""
    owner = type(A).__name__
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{owner}.{hook} returned {_describe(out)}, expected a torch.Tensor of shape "
                        f"{fmt_shape(shape)}; fix {owner}.{hook}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{owner}.{hook} returned shape {fmt_shape(out.shape)}, expected {fmt_shape(shape)} "
                         f"(the operator has shape {fmt_shape(A.shape)}); fix {owner}.{hook}")
    if dtype is not None and out.dtype != dtype:
        raise TypeError(f"{owner}.{hook} returned dtype {out.dtype}, expected {dtype} (the operator's); "
                        f"fix {owner}.{hook}")


def _fixed_device(A) -> bool:
    return not getattr(A, "adapts_device", False)


def same_space(A, B, op: str) -> None:
    """``A <op> B`` (``+``, ``-``): the same shape and device (the dtypes promote)."""
    if B.shape != A.shape:
        raise ValueError(f"A {op} B: shapes differ, A is {fmt_shape(A.shape)} and B is "
                         f"{fmt_shape(B.shape)}")
    if B.device != A.device and _fixed_device(A) and _fixed_device(B):
        raise ValueError(f"A {op} B: devices differ, A is on {A.device} and B on {B.device}")


def composable(A, B) -> None:
    """``A @ B``: A's columns are B's rows, one device (the dtypes promote)."""
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"A @ B: inner dimensions differ, A is {fmt_shape(A.shape)} and B is "
                         f"{fmt_shape(B.shape)}")
    if A.device != B.device and _fixed_device(A) and _fixed_device(B):
        raise ValueError(f"A @ B: devices differ, A is on {A.device} and B on {B.device}")


# --------------------------------------------------------------------------
# Values: one synchronisation per call
# --------------------------------------------------------------------------
def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (no value may be read back)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def plain_values(t):
    """``t``'s values as a tensor outside every torch.func grad or jvp level and without a
    forward-AD tangent (None passes through): what the value checks read.

    The checks and the default diameter only read values; on a wrapped tensor each of
    their ops would run through the transforms' interpreters (torch.func.jvp
    decomposes some of them in Python). A vmap level stays (its batch is part of
    the values).
    """
    if t is None or torch.compiler.is_compiling():     # (dynamo traces no functorch internals)
        return t
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t) and not F.is_batchedtensor(t):
        t = F.get_unwrapped(t)
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0 and not F.is_functorch_wrapped_tensor(t):
        t = torch.autograd.forward_ad.unpack_dual(t).primal
    return t


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: no entry of ``t`` is NaN or infinite; no synchronisation.

    For floating ``t``, two launches on a GPU (the max-abs reduction, which
    propagates NaN, and a comparison) where ``torch.isfinite(t).all()`` takes five.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return torch.isfinite(t).all()
    return torch.linalg.vector_norm(t, math.inf) < math.inf


def _value_flags(tensors: dict, *, allow_neg_inf=(), allow_pos_inf=(), nonnegative=(), hint: str = "",
                 messages_only: bool = False) -> list:
    """``(flag, message)`` pairs, the flags 0-d bool tensors still on the device (None with
    ``messages_only``: the messages of a caller that computes the flags otherwise)."""
    out = []

    def flag(compute):
        return None if messages_only else compute()

    with torch.no_grad():
        for name, t in tensors.items():
            if t is None or t.numel() == 0:
                continue
            if name in allow_neg_inf:
                # The max is NaN or +inf iff t holds one (amax propagates NaN); -inf stays below.
                out.append((flag(lambda: t.amax() < math.inf), f"{name} contains NaN or +inf values; -inf is "
                                                               "allowed (a zero weight), NaN and +inf are not"))
            elif name in allow_pos_inf:
                out.append((flag(lambda: t.amin() > -math.inf), f"{name} contains NaN or -inf values; +inf is "
                                                                "allowed, NaN and -inf are not"))
            else:
                out.append((flag(lambda: all_finite(t)), f"{name} contains NaN or inf values; "
                                                         + (hint or "every entry must be finite")))
            if name in nonnegative:
                out.append((flag(lambda: (t >= 0).all()), f"the weights {name} have negative entries; weights "
                                                          "must be >= 0 (zeros are allowed)"))
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the costs and potentials of points of ``dtype`` are computed in (float32 for half)."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _box(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """``(lo, hi)``: the per-coordinate extremes of both clouds (every batch entry), float64 (d,)
    each; NaN where a coordinate holds one."""
    d = x.shape[-1]
    with torch.no_grad():
        pts = (x.reshape(-1, d), y.reshape(-1, d))
        return (torch.minimum(pts[0].amin(0), pts[1].amin(0)).double(),
                torch.maximum(pts[0].amax(0), pts[1].amax(0)).double())


def _extent_flag(x: torch.Tensor, y: torch.Tensor, cost_scale: float, messages_only: bool = False,
                 box: tuple | None = None) -> list:
    """``(flag, message)``: the largest cost ``c |x_i - y_j|^2`` stays finite in the compute dtype.

    Bounded by ``c diam^2`` (diam: the diagonal of the joint bounding box); the kernels
    form ``|x|^2 + |y|^2 - 2 x.y`` on centred points, up to ``4 c diam^2``, which must
    be finite. No synchronisation: the flag joins the others. ``box``: :func:`_box` of the
    clouds, when the caller has it.
    """
    if x.numel() == 0 or y.numel() == 0:
        return []
    dtype = compute_dtype(x.dtype)
    limit = torch.finfo(dtype).max
    name = str(dtype).replace("torch.", "")
    flag = None
    if not messages_only:
        lo, hi = _box(x, y) if box is None else box
        with torch.no_grad():
            flag = 4.0 * cost_scale * ((hi - lo) ** 2).sum() <= limit
    return [(flag, f"the points are too far apart: their costs c |x_i - y_j|^2 (c = cost_scale = "
                             f"{cost_scale:g}) overflow {name} (4 c diam^2 exceeds {limit:.1e}, diam the "
                             "diagonal of the points' bounding box); rescale the points (scaling them by s "
                             "scales the costs by s^2: pass eps * s^2)")]


def _raise_first(owner: str, flags: list) -> None:
    """Read all the flags back at once; ValueError with the message of the first false one."""
    if not flags:
        return
    with torch.no_grad():
        values = torch.stack([f for f, _ in flags]).tolist()
    for ok, (_, message) in zip(values, flags):
        if not ok:
            raise ValueError(f"{owner}: {message}")


def _result_flags(results: dict, allow_neg_inf, hint: str) -> list:
    """``(flag, message)`` pairs for computed results: NaN or inf there means an overflow."""
    out = []
    with torch.no_grad():
        for name, t in results.items():
            if t is None or t.numel() == 0:
                continue
            # amax propagates NaN: below +inf means neither NaN nor +inf.
            ok = t.amax() < math.inf if name in allow_neg_inf else all_finite(t)
            out.append((ok, f"{name} overflowed {str(t.dtype).replace('torch.', '')}: it holds inf or NaN "
                            f"although every input is finite; {hint or 'the result is out of its dtype range'}"))
    return out


def finite(owner: str, tensors: dict, *, allow_neg_inf=(), allow_pos_inf=(), nonnegative=(),
           hint: str = "", results: dict | None = None, result_hint: str = "",
           cost_scale: float | None = None, flags: list | None = None) -> None:
    """ValueError if a tensor of ``tensors`` (name -> tensor or None) holds NaN or inf.

    ``allow_neg_inf`` / ``allow_pos_inf``: names that may hold -inf (a zero
    weight in log space) or +inf; ``nonnegative``: names that must be ``>= 0``
    (weights); ``hint`` completes the message of a non-finite tensor.
    ``results`` (name -> tensor): what a call computed from ``tensors``,
    checked after them in the same read-back, so that a result that overflowed
    its dtype raises (``result_hint`` says why it can and what to do) instead
    of travelling on as inf; a name in ``allow_neg_inf`` may hold -inf there
    too. With ``cost_scale``, the points ``tensors["x"]`` and ``tensors["y"]``
    must also keep their costs ``cost_scale |x_i - y_j|^2`` finite in the
    compute dtype. ``flags``: more ``(flag, message)`` pairs of 0-d device
    tensors (e.g. :func:`cluster_layout`'s), read back first, with the
    others. One device-to-host synchronisation, none when
    ``config.check_finite`` is False or a CUDA graph is being captured.
    """
    if not config.check_finite or capturing():
        # Inside a CUDA graph capture (a user's torch.cuda.graph) no synchronisation is
        # allowed: the check stands aside there; the warm-up call that every capture
        # needs ran it. (solvers.cg(graph=True) does not capture an operator that
        # checks: its dry product under sync debug mode finds the synchronisation.)
        return
    flags = list(flags or []) + _value_flags(tensors, allow_neg_inf=allow_neg_inf, allow_pos_inf=allow_pos_inf,
                                             nonnegative=nonnegative, hint=hint)
    if cost_scale is not None:
        flags += _extent_flag(tensors["x"], tensors["y"], cost_scale)
    if results:
        flags += _result_flags(results, allow_neg_inf, result_hint)
    _raise_first(owner, flags)


# --------------------------------------------------------------------------
# Two weighted measures (Sinkhorn and the loss)
# --------------------------------------------------------------------------
@dataclass
class Inputs:
    """Validated data of one Sinkhorn call, always batched: x (B, n, d), a (B, n), ...

    ``pot_dtype`` is the dtype of the potentials: that of x, float32 for half
    inputs (potentials in half precision lose the small eps scales).
    """

    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    batched: bool

    @property
    def pot_dtype(self) -> torch.dtype:
        return torch.float32 if self.x.dtype in HALF_DTYPES else self.x.dtype

    @property
    def log_a(self) -> torch.Tensor:
        return torch.log(self.a.to(self.pot_dtype))

    @property
    def log_b(self) -> torch.Tensor:
        return torch.log(self.b.to(self.pot_dtype))

    def unbatch(self, t):
        return t if (t is None or self.batched) else t[0]


def measures(owner: str, x, y, a, b, *, balanced: bool, cost_scale: float = 1.0) -> Inputs:
    """Two weighted point clouds, batched for the Sinkhorn loops.

    Shapes, dtypes and devices, then the values in one synchronisation:
    finite points whose costs ``cost_scale |x_i - y_j|^2`` are finite in the
    compute dtype, finite non-negative weights with a positive total mass
    whose product (the mass of ``a⊗b``, the reference measure of the problem)
    is finite in that dtype, and with ``balanced`` equal masses. The values
    are checked whatever ``config.check_finite``: they are preconditions of
    the iterations.
    """
    inp, _ = measures_and_read(owner, x, y, a, b, balanced=balanced, check=True, cost_scale=cost_scale)
    return inp


def measures_and_read(owner: str, x, y, a, b, *, balanced: bool, check: bool, read=None,
                      cost_scale: float = 1.0):
    """:func:`measures`, whose value checks (when ``check``) and the read-back of
    ``read(inp)`` (a 0-d tensor computed from the batched inputs, when given) share
    one host synchronisation; returns ``(Inputs, float or None)``.

    With ``check`` False and no ``read``, nothing is read back (the caller
    vouches for the values: masses are then not checked either). Inside a
    CUDA graph capture no synchronisation is allowed: the value checks stand
    aside there, and a ``read`` raises (the caller names the option that
    avoids it).
    """
    geo = points(owner, x, y, batch="same", allow_empty=False)
    a = weights(geo, "a", a, "x")
    b = weights(geo, "b", b, "y")
    inp = Inputs(x, y, a, b, True) if geo.batched else \
        Inputs(x.unsqueeze(0), y.unsqueeze(0), a.unsqueeze(0), b.unsqueeze(0), False)
    # The values of the data, outside any torch.func level: the flags and read only read them.
    values = Inputs(*(plain_values(t) for t in (inp.x, inp.y, inp.a, inp.b)), inp.batched)
    flags, box = _mass_flags_and_box(values.x, values.y, values.a, values.b, balanced, cost_scale) \
        if check and not capturing() else ([], None)
    if read is None:
        _raise_first(owner, flags)
        return inp, None
    if capturing():
        raise RuntimeError(f"{owner}: a CUDA graph is being captured, where no value can be read back to "
                           "the host; pass the option that provides it (e.g. diameter=...) to capture this call")
    with torch.no_grad():
        # The default diameter from the extremes the checks found, when they ran.
        extra = (box_diameter_from(*box) if read is box_diameter and box is not None else read(values))
        extra = extra.to(torch.float64).reshape(1)
        values = torch.cat([torch.stack([f for f, _ in flags]).to(torch.float64), extra]) if flags else extra
        values = values.tolist()
    for ok, (_, message) in zip(values, flags):
        if not ok:
            raise ValueError(f"{owner}: {message}")
    return inp, values[-1]


def box_diameter(inp: Inputs) -> torch.Tensor:
    """The diagonal of the joint bounding box of all the points of ``inp`` (every batch entry),
    a 0-d float64 tensor: the default diameter of the eps schedule, as a ``read`` of
    :func:`measures_and_read` (which takes it from its checks' extremes when it has them)."""
    # In float64 (_box): the difference of two half-precision extremes can round to a
    # different schedule than the same points in float32.
    return box_diameter_from(*_box(inp.x, inp.y))


def measures_ok(x, y, a, b, *, balanced: bool, cost_scale: float = 1.0) -> torch.Tensor:
    """All of :func:`measures_and_read`'s value checks as one 0-d bool tensor, still on the
    device (no synchronisation: a CUDA graph can compute it). Where it is False,
    ``measures_and_read(..., check=True)`` on the same data raises the ValueError
    that names the first failing check."""
    with torch.no_grad():
        return torch.stack([f for f, _ in _mass_flags(x, y, a, b, balanced, cost_scale)]).all()


def _mass_flags(x, y, a, b, balanced: bool, cost_scale: float) -> list:
    """The value flags of :func:`measures` (finite points whose costs stay finite,
    finite weights >= 0, positive masses whose product is finite, equal ones when
    ``balanced``), still on the device."""
    return _mass_flags_and_box(x, y, a, b, balanced, cost_scale)[0]


def _mass_flags_and_box(x, y, a, b, balanced: bool, cost_scale: float) -> tuple:
    """``(flags, box)``: :func:`_mass_flags`, and the per-coordinate extremes ``(lo, hi)``
    of both clouds (float64; the default diameter's). On CUDA (float32 or half points,
    contiguous data) all of it is one launch (``otlinop._measure_flags``), where the torch
    ops below are about forty."""
    limit = torch.finfo(compute_dtype(x.dtype)).max
    name = str(compute_dtype(x.dtype)).replace("torch.", "")
    tol = max(1e-3, 8 * torch.finfo(a.dtype).eps)     # half-precision weights cannot even represent 1/n exactly
    mass_messages = [
        "the weights a have zero total mass; each measure needs a positive mass",
        "the weights b have zero total mass; each measure needs a positive mass",
        f"the weights' total masses are too large: their product sum(a) * sum(b), the mass of a⊗b "
        f"in eps KL(P | a⊗b), overflows {name} (above {limit:.1e}); rescale the weights (scaling both "
        "by s scales the plan by s and shifts the potentials by -eps log(s) in total)"]
    if balanced:
        mass_messages.append("balanced OT needs equal total masses, but sum(a) != sum(b) (relative difference "
                             "above 1e-3, or 8 ulps for half precision); normalise the weights, or pass reach=... "
                             "for unbalanced OT")
    if fused_checks_usable(x, y, a, b):
        values, lo, hi = measure_flags(x, y, a, b, balanced=balanced, cost_scale=cost_scale, limit=limit, tol=tol)
        # The torch path's messages, in its order, beside the kernel's flags (views: no launch).
        messages = [m for _, m in _value_flags({"x": x, "y": y, "a": a, "b": b}, nonnegative=("a", "b"),
                                               messages_only=True)]
        messages += [m for _, m in _extent_flag(x, y, cost_scale, messages_only=True)] + mass_messages
        return list(zip(values.unbind(0), messages)), (lo, hi)
    box = _box(x, y) if x.numel() and y.numel() else None     # (the default diameter's extremes too)
    flags = _value_flags({"x": x, "y": y, "a": a, "b": b}, nonnegative=("a", "b"))
    flags += _extent_flag(x, y, cost_scale, box=box)
    with torch.no_grad():
        ma, mb = a.sum(-1, dtype=torch.float64), b.sum(-1, dtype=torch.float64)
        checks = [(ma > 0).all(), (mb > 0).all(), (ma * mb <= limit).all()]
        if balanced:
            checks.append(((ma - mb).abs() <= tol * torch.maximum(ma, mb)).all())
    return flags + list(zip(checks, mass_messages)), box
