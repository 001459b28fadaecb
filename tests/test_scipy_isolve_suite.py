"""scipy's own tests of its iterative solvers, run on otlinop's solvers.

scipy ships ``scipy/sparse/linalg/_isolve/tests/test_iterative.py`` and
``test_lsmr.py`` inside the installed package. This adapter imports those
modules and runs their test functions and classes unchanged, with the names
of scipy's solvers (``cg``, ``minres``, ``gmres``, ``bicgstab``, ``lsmr``)
bound to thin wrappers around ``solvers.cg`` & co.: each function is rebuilt
from its own code object over a copy of its module's namespace (nothing is
copied into this repository), the test classes are subclassed with their
methods rebuilt the same way, and the module-level functions are
parametrized here as scipy parametrizes them (its ``case`` and ``solver``
fixtures, its ``parametrize`` marks, its other marks kept).

The wrappers speak scipy's calling convention and nothing more:

- ``A`` and ``M``: NumPy arrays become dense torch tensors (the solvers wrap
  2-D tensors); scipy matrices and scipy LinearOperators, real or complex, go
  through the converter ``import otlinop`` registers
  (``otlinop.aslinearoperator``), in the solve's dtype except a real
  LinearOperator, which keeps a real dtype (the solvers apply it to complex
  vectors themselves);
- the dtype is scipy's ``make_system`` rule (the common type of A and b, so
  a float32 matrix with a float64 b is solved in float64; lsmr: at least
  float64, as scipy's ``result_type(A, b, float)``), b is raveled as scipy
  does, ``x0='Mb'`` means ``M @ b``, a scipy LinearOperator's ``psolve`` is
  the preconditioner when M is not given;
- the result is ``(x, info)`` (0 converged, the iteration limit when it was
  reached, -1 for another stop: breakdown, indefiniteness), or lsmr's
  8-tuple from ``SolveResult.extras``;
- gmres: scipy's ``callback_type`` keyword (which otlinop's gmres does not
  have) with its DeprecationWarning when omitted; ``'legacy'`` and
  ``'pr_norm'`` callbacks receive ``||b - A x_k|| / ||b||`` after each
  inner iteration, ``'x'`` callbacks x after each restart cycle, and
  ``maxiter`` counts restart cycles except in ``'legacy'`` mode, as in scipy.

Every other keyword goes to otlinop's solver untouched, so scipy's checks
of positional arguments and invalid tolerances test otlinop's own errors.

Solvers scipy has and otlinop does not (``NOT_APPLICABLE``) appear as
skipped parametrizations; the tests left out, with their reasons, are in
``EXCLUDED``: both at the top of this file.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import re
import types
import warnings

import numpy as np
import pytest
import scipy
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from scipy._lib._array_api import array_namespace
import torch

import otlinop  # noqa: F401  (registers the converter the solvers use for scipy objects)
import solvers

# ------------------------------------------------------------------ exclusions
#: scipy's solvers that otlinop does not have: their parametrizations are skipped as not applicable.
NOT_APPLICABLE = {
    "bicg": "otlinop has no BiCG (bicgstab covers non-symmetric systems)",
    "cgs": "otlinop has no CGS",
    "gcrotmk": "otlinop has no GCROT(m, k)",
    "lgmres": "otlinop has no LGMRES",
    "qmr": "otlinop has no QMR (and so no M1/M2 split preconditioners)",
    "tfqmr": "otlinop has no TFQMR",
}

#: Test ids (``*`` matches anything) -> why they do not run against otlinop.
EXCLUDED = {
    "test_iterative.py::test_show[*]":
        "tfqmr only: it checks tfqmr's show=True log (not applicable)",
    "test_iterative.py::TestQMR::*":
        "qmr only (not applicable)",
    "test_iterative.py::TestGMRES::test_callback":
        "checks scipy's legacy callback values with M: the left-preconditioned residual norm "
        "||M (b - A x)|| / ||b||; otlinop's gmres preconditions on the right and its residual is the "
        "true one, so the numbers differ by design",
}

ITERATIVE_MODULE = "scipy.sparse.linalg._isolve.tests.test_iterative"
LSMR_MODULE = "scipy.sparse.linalg._isolve.tests.test_lsmr"


def _load(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:  # pragma: no cover - depends on how scipy was installed
        raise ImportError(
            f"test_scipy_isolve_suite: scipy {scipy.__version__} does not ship {name.replace('.', '/')}.py "
            f"({err}); this adapter runs scipy's own tests, so install a scipy wheel that includes them") from err


with warnings.catch_warnings():
    # scipy marks some tests with its own pytest plugin's fail_slow, unknown here.
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    iterative = _load(ITERATIVE_MODULE)
    lsmr_tests = _load(LSMR_MODULE)


def _excluded(test_id: str):
    """The reason ``test_id`` is excluded, or None (``*`` is the only wildcard of the patterns)."""
    for pattern, reason in EXCLUDED.items():
        if re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), test_id):
            return reason
    return None


# ------------------------------------------------------------------ conversions
_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
          np.dtype(np.complex64): torch.complex64, np.dtype(np.complex128): torch.complex128}


def _solve_dtype(*dtypes, at_least=None) -> np.dtype:
    """scipy's ``make_system`` coercion: the common type of the inputs among float32,
    float64, complex64 and complex128 (other types count as float64)."""
    chars = [np.dtype(d).char if np.dtype(d).char in "fdFD" else "d" for d in dtypes if d is not None]
    if at_least is not None:
        chars.append(np.dtype(at_least).char)
    return np.result_type(*[np.dtype(c) for c in chars])


def _operator(A, dtype: np.dtype):
    """``A`` (NumPy array, scipy matrix or LinearOperator) as something otlinop's solvers take,
    applied in ``dtype``; a real scipy LinearOperator keeps its real dtype (of that
    precision) and the solvers apply it to complex vectors themselves."""
    if isinstance(A, np.ndarray) or np.isscalar(A):
        return torch.as_tensor(np.array(A, dtype=dtype, ndmin=2))
    if sp.issparse(A):
        return otlinop.aslinearoperator(A, dtype=_TORCH[dtype])
    if isinstance(A, sla.LinearOperator):
        own = np.dtype(A.dtype) if A.dtype is not None else np.dtype(np.float64)
        if np.issubdtype(own, np.complexfloating):
            return otlinop.aslinearoperator(A, dtype=_TORCH[dtype])
        real = np.dtype(dtype.char.lower())
        return otlinop.aslinearoperator(A, dtype=_TORCH[real])
    raise TypeError(f"scipy suite adapter: cannot convert {type(A).__name__}")


def _host_callable(fn, dtype: np.dtype):
    """A NumPy function r -> M r (scipy's psolve) as a torch callable."""
    def apply(r):
        return torch.as_tensor(np.array(fn(r.numpy()), dtype=dtype))
    return apply


class _System:
    """What scipy's ``make_system`` makes of (A, b, M, x0), for otlinop's solvers."""

    def __init__(self, A, b, M):
        b = np.asanyarray(b)
        own = getattr(A, "dtype", None)
        self.dtype = _solve_dtype(own if own is not None else np.float64, b.dtype)
        self.A = _operator(A, self.dtype)
        self.b = torch.as_tensor(np.array(b, dtype=self.dtype).ravel())
        if M is None and hasattr(A, "psolve"):
            self.M = _host_callable(A.psolve, self.dtype)
        elif isinstance(M, (np.ndarray, sla.LinearOperator)) or sp.issparse(M):
            self.M = _operator(M, self.dtype)
        else:
            self.M = M

    def x0(self, x0):
        if x0 is None:
            return None
        if isinstance(x0, str) and x0 == "Mb":
            if self.M is None:
                return self.b.clone()
            return self.M(self.b) if callable(self.M) and not hasattr(self.M, "shape") else self.M @ self.b
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)  # scipy casts x0 like this
            return torch.as_tensor(np.array(x0, dtype=self.dtype).ravel())

    def residual(self, x: torch.Tensor) -> float:
        return np.float64(torch.linalg.vector_norm(self.b - self.A @ x) / torch.linalg.vector_norm(self.b))


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().copy()


def _info(res, maxiter) -> int:
    if res.converged:
        return 0
    if res.status.startswith("maxiter="):
        return int(maxiter) if maxiter is not None else res.n_iter
    return -1


def _iterative_wrapper(ours, name: str):
    """scipy's ``name(A, b, x0=None, *, rtol, atol, maxiter, M, callback)`` on otlinop's ``ours``."""

    def wrapper(A, b, x0=None, *args, M=None, callback=None, **kwargs):
        system = _System(A, b, M)
        cb = None if callback is None else (lambda xk: callback(_numpy(xk)))
        res = ours(system.A, system.b, system.x0(x0), *args, M=system.M, callback=cb, **kwargs)
        return _numpy(res.x), _info(res, kwargs.get("maxiter"))

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


_CB_TYPE_MESSAGE = (  # scipy's own wording, which its tests match
    "scipy.sparse.linalg.gmres called without specifying `callback_type`. The default value will be changed in a "
    "future release. For compatibility, specify a value for `callback_type` explicitly, e.g., "
    "``gmres(..., callback_type='pr_norm')``, or to retain the old behavior ``gmres(..., callback_type='legacy')``")


def gmres(A, b, x0=None, *args, restart=None, maxiter=None, M=None, callback=None, callback_type=None,
          **kwargs):
    """scipy's gmres signature on ``solvers.gmres`` (see the module docstring for callback_type)."""
    if callback is not None and callback_type is None:
        warnings.warn(_CB_TYPE_MESSAGE, DeprecationWarning, stacklevel=2)
    callback_type = "legacy" if callback_type is None else callback_type
    if callback_type not in ("x", "pr_norm", "legacy"):
        raise ValueError(f"Unknown callback_type: {callback_type!r}")
    if callback is None:
        callback_type = None
    system = _System(A, b, M)
    n = system.b.shape[0]
    restart = min(20 if restart is None else restart, n)
    x = system.x0(x0)
    if callback_type == "x":
        # scipy calls back after each restart cycle: run otlinop's gmres one cycle at a time
        # (each restart starts afresh from the explicit residual, so this is the same iteration).
        for _ in range(10 * n if maxiter is None else maxiter):
            res = solvers.gmres(system.A, system.b, x, *args, restart=restart, maxiter=restart, M=system.M,
                                **kwargs)
            x = res.x
            callback(_numpy(x))
            if res.converged:
                break
        return _numpy(res.x), _info(res, maxiter)
    if callback_type in ("legacy", "pr_norm"):
        cb = lambda xk: callback(system.residual(xk))  # noqa: E731
    else:
        cb = None
    cycles = callback_type != "legacy"
    inner = maxiter * restart if (cycles and maxiter is not None) else maxiter
    res = solvers.gmres(system.A, system.b, x, *args, restart=restart, maxiter=inner, M=system.M, callback=cb,
                        **kwargs)
    return _numpy(res.x), _info(res, maxiter)


def lsmr(A, b, damp=0.0, atol=1e-6, btol=1e-6, conlim=1e8, maxiter=None, x0=None, **kwargs):
    """scipy's lsmr signature and 8-tuple on ``solvers.lsmr`` (b and x0 keep their kind, real or
    complex: otlinop promotes; the precision is at least float64, as scipy's)."""
    b_arr = np.asanyarray(b)
    x0_dtype = None if x0 is None else np.asarray(x0).dtype
    a_own = np.dtype(np.float64) if getattr(A, "dtype", None) is None else np.dtype(A.dtype)
    dtype = _solve_dtype(a_own, b_arr.dtype, x0_dtype, at_least=np.float64)
    a_dtype = np.dtype(np.complex128) if np.issubdtype(a_own, np.complexfloating) else np.dtype(dtype.char.lower())
    op = _operator(A, a_dtype)

    def kind(arr):
        return np.complex128 if np.issubdtype(arr.dtype, np.complexfloating) else np.float64

    if b_arr.ndim == 0 and isinstance(b, (float, int, complex)):
        bt = b  # a Python scalar: otlinop's lsmr takes it for an A of one row, as scipy
    else:
        bt = torch.as_tensor(np.array(b_arr, dtype=kind(b_arr)))
    xt = None if x0 is None else torch.as_tensor(np.array(x0, dtype=kind(np.asarray(x0))))
    res = solvers.lsmr(op, bt, xt, damp=damp, atol=atol, btol=btol, conlim=conlim, maxiter=maxiter, **kwargs)
    if res.converged:
        istop = 0 if res.n_iter == 0 else (2 if "least-squares" in res.status else 1)
    else:
        istop = 7 if res.status.startswith("maxiter=") else 3
    e = {name: float(value) for name, value in res.extras.items()}
    return (_numpy(res.x).ravel(), istop, res.n_iter, e["normr"], e["normar"], e["normA"], e["condA"],
            e["normx"])


# ------------------------------------------------------------------ rebinding
OURS = {"cg": _iterative_wrapper(solvers.cg, "cg"), "minres": _iterative_wrapper(solvers.minres, "minres"),
        "bicgstab": _iterative_wrapper(solvers.bicgstab, "bicgstab"), "gmres": gmres}


def _not_applicable(name: str):
    def solver(*args, **kwargs):
        raise NotImplementedError(f"{name}: {NOT_APPLICABLE[name]} (not applicable)")
    solver.__name__ = solver.__qualname__ = name
    return solver


SCIPY_SOLVERS = {fn.__name__: fn for fn in iterative._SOLVERS}
missing = set(SCIPY_SOLVERS) - set(OURS) - set(NOT_APPLICABLE)
if missing:  # a newer scipy tests a solver this adapter does not know
    raise ImportError(f"test_scipy_isolve_suite: scipy's test_iterative.py tests {sorted(missing)}; "
                      "add them to OURS or NOT_APPLICABLE")
REPLACEMENT = {name: OURS.get(name) or _not_applicable(name) for name in SCIPY_SOLVERS}


def _namespace(module, names: dict) -> dict:
    ns = dict(vars(module))
    ns.update(names)
    return ns


ITERATIVE_NS = _namespace(iterative, dict(REPLACEMENT, _SOLVERS=[OURS[n] for n in SCIPY_SOLVERS if n in OURS]))
LSMR_NS = _namespace(lsmr_tests, {"lsmr": lsmr})


def _rebind(fn, ns: dict):
    """``fn``'s code over the namespace ``ns`` (its marks kept)."""
    new = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__dict__.update(fn.__dict__)
    return new


def _subclass(base, ns: dict, prefix: str):
    """``base`` with every function of its body rebuilt over ``ns``; excluded tests skipped."""
    body = {}
    for attr, value in vars(base).items():
        if inspect.isfunction(value):
            value = _rebind(value, ns)
            reason = _excluded(f"{prefix}::{base.__name__}::{attr}")
            if attr.startswith("test") and reason:
                value = pytest.mark.skip(reason=f"excluded: {reason}")(value)
            body[attr] = value
    return type(base.__name__, (base,), body)


# scipy's Case list, built by scipy's own code with our solvers in its skip lists.
_params = iterative.IterativeParams.__new__(iterative.IterativeParams)
_rebind(iterative.IterativeParams.__init__, ITERATIVE_NS)(_params)
OUR_CASES = {case.name: case for case in _params.cases}
OUR_TESTS = {t.name: t for t in _rebind(iterative.IterativeParams.generate_tests, ITERATIVE_NS)(_params)}


def _translate(value):
    """A parameter of scipy's (a solver, a Case, a SingleTest) -> (ours, its id, the name of a
    solver otlinop does not have or None)."""
    if inspect.isfunction(value) and value in iterative._SOLVERS:
        name = value.__name__
        return (OURS[name], name, None) if name in OURS else (None, name, name)
    if isinstance(value, iterative.SingleTest):
        solver = value.name.rsplit("-", 1)[1]
        return (OUR_TESTS[value.name], value.name, None) if solver in OURS else (None, value.name, solver)
    if isinstance(value, iterative.Case):
        return OUR_CASES[value.name], value.name, None
    return value, repr(value), None


def _axis(argnames, values, ids=None):
    """[(our kwargs, id, not-applicable solver or None, marks)] for one parametrized group of arguments
    (values may be tuples, for several argnames, and pytest.param objects)."""
    out = []
    for i, value in enumerate(values):
        marks, given_id = (), None
        if all(hasattr(value, attr) for attr in ("values", "marks", "id")):  # a pytest.param
            marks, given_id = tuple(value.marks), value.id
            value = value.values[0] if len(argnames) == 1 else value.values
        translated = [_translate(v) for v in ((value,) if len(argnames) == 1 else tuple(value))]
        if given_id is None:
            given_id = ids[i] if isinstance(ids, (list, tuple)) else "-".join(t[1] for t in translated)
        missing = next((t[2] for t in translated if t[2] is not None), None)
        out.append(({a: t[0] for a, t in zip(argnames, translated)}, given_id, missing, marks))
    return out


_KEPT_MARKS = ("xfail", "skip", "skipif", "filterwarnings")


def _function_params(module, ns, file: str, fixtures: dict):
    """pytest.params (name, kwargs) for every module-level ``test_*`` function of ``module``:
    its parametrize marks (scipy's values translated) and its ``case`` / ``solver`` fixtures."""
    params = []
    for name, fn in vars(module).items():
        if not name.startswith("test") or not inspect.isfunction(fn):
            continue
        marks = list(getattr(fn, "pytestmark", []))
        kept = [m for m in marks if m.name in _KEPT_MARKS]
        axes, covered = [], set()
        for m in marks:
            if m.name == "parametrize":
                argnames = [a.strip() for a in m.args[0].split(",")] if isinstance(m.args[0], str) \
                    else list(m.args[0])
                axes.append(_axis(argnames, m.args[1], m.kwargs.get("ids")))
                covered.update(argnames)
        for arg in inspect.signature(fn).parameters:
            if arg not in covered and arg in fixtures:
                axes.append(_axis([arg], fixtures[arg]))
        for combo in itertools.product(*axes):
            label = "-".join(c[1] for c in combo)
            test_id = f"{file}::{name}[{label}]" if combo else f"{file}::{name}"
            kwargs = {k: v for c in combo for k, v in c[0].items()}
            na = next((c[2] for c in combo if c[2] is not None), None)
            extra = list(kept) + [m for c in combo for m in c[3]]
            reason = _excluded(test_id)
            if na is not None:
                extra.append(pytest.mark.skip(reason=f"not applicable: {NOT_APPLICABLE[na]}"))
            elif reason:
                extra.append(pytest.mark.skip(reason=f"excluded: {reason}"))
            params.append(pytest.param(name, kwargs, id=test_id.split("::", 1)[1], marks=extra))
    return params


ITERATIVE_PARAMS = _function_params(iterative, ITERATIVE_NS, "test_iterative.py",
                                    {"case": iterative.cases, "solver": iterative._SOLVERS})


@pytest.fixture
def xp():
    """scipy's ``xp`` fixture (scipy >= 1.18 passes the array namespace to its tests) as scipy's own
    conftest makes it when SCIPY_ARRAY_API is unset: NumPy, through scipy's ``array_namespace``
    (the array_api_compat wrapper scipy's operators compare namespaces with)."""
    return array_namespace(np.empty(0))


@pytest.mark.parametrize("name, kwargs", ITERATIVE_PARAMS)
def test_iterative(name, kwargs, request):
    """One of scipy's test_iterative.py functions, with otlinop's solvers."""
    fn = _rebind(getattr(iterative, name), ITERATIVE_NS)
    for arg in inspect.signature(fn).parameters:
        if arg not in kwargs:
            kwargs = dict(kwargs, **{arg: request.getfixturevalue(arg)})
    fn(**kwargs)


# scipy's test classes, subclassed with otlinop's solvers.
TestGMRES = _subclass(iterative.TestGMRES, ITERATIVE_NS, "test_iterative.py")
TestQMR = _subclass(iterative.TestQMR, ITERATIVE_NS, "test_iterative.py")
_lsmr_classes = [cls for name, cls in vars(lsmr_tests).items() if name.startswith("Test") and inspect.isclass(cls)]
for _cls in _lsmr_classes:
    globals()[_cls.__name__] = _subclass(_cls, LSMR_NS, "test_lsmr.py")
if not _lsmr_classes:  # pragma: no cover
    raise ImportError("test_scipy_isolve_suite: scipy's test_lsmr.py defines no Test* class any more")
