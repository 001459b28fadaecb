"""scipy's own tests of ``scipy.sparse.linalg.LinearOperator``, run on otlinop operators.

scipy ships ``scipy/sparse/linalg/tests/test_interface.py``. Its cases build
their operators through the module it imports as ``interface``:
``interface.aslinearoperator(M)``, ``interface.LinearOperator(shape, matvec,
...)``, ``interface.MatrixLinearOperator(M)``, ``interface.IdentityOperator``.
This adapter runs the shipped tests twice with that module replaced, for the
duration of each test, by a stand-in whose factories build an otlinop operator
from the same matrix (``otlinop.aslinearoperator``; a matrix given by its
``matvec`` is read column by column), then hand scipy's test

- part ``to_scipy``: the operator's ``to_scipy()`` view, to which the test
  applies scipy's algebra;
- part ``direct``: the otlinop operator itself, whose own algebra and NumPy
  operands the test then exercises (the stand-in names otlinop's classes where
  a test checks the class of ``2 * A``, ``A + B``, ``A @ B`` or ``A ** k``).

``TestAsLinearOperator`` loops over a list of cases; here each case is a test
of its own. Every exclusion is in ``EXCLUDED`` below, with its reason. Nothing
of scipy's is copied: the tests are the installed ones (a newer scipy brings
its own; new tests run unless a pattern below excludes them).
"""

import fnmatch
import importlib
import types

import numpy as np
import pytest
import scipy
import scipy.sparse.linalg as sla
import torch

import otlinop

if np.lib.NumpyVersion(scipy.__version__) >= "1.18.0":
    # Where scipy is newer than the test extra's pin (a machine with scipy preinstalled).
    pytest.skip(f"scipy {scipy.__version__}: this adapter covers scipy's test_interface.py up to 1.17 (the test "
                "extra pins scipy<1.18); 1.18 rewrote it for array-API and batched operators, and porting the "
                "adapter is open (docs/operators.md)", allow_module_level=True)

try:
    shipped = importlib.import_module("scipy.sparse.linalg.tests.test_interface")
except ImportError as err:   # pragma: no cover - depends on how scipy was installed
    raise ImportError(
        "scipy's own test file scipy/sparse/linalg/tests/test_interface.py is not installed, so "
        "tests/test_scipy_interface_suite.py cannot run it: install a scipy that ships its tests "
        "(the PyPI wheels do)") from err

PARTS = ("to_scipy", "direct")

_INT = ("integer operators: otlinop converts integer matrices to float64 (torch has no integer "
        "matmul on CUDA, and every Krylov method divides), so the dtype scipy asserts (an int) differs")
_TORCH_DTYPE = ("an otlinop operator's dtype is a torch dtype (torch.complex128), which NumPy does not "
                "compare equal to np.complex128 and cannot interpret (the solvers' protocol and every "
                "torch call need a torch dtype); part to_scipy checks the same through the view's NumPy dtype")
_STAR = ("'*' as a matrix product (A * x, A * B) is scipy's legacy np.matrix convention; otlinop keeps '*' "
         "for scalars and raises a TypeError pointing to '@'")
_SCIPY_ONLY = ("the test defines its own subclass of scipy's LinearOperator and uses it directly: no otlinop "
               "object is involved, so a pass would only count scipy's behaviour as ours")
_CALLABLES = ("checks how scipy builds an operator from a matvec callable (the calls it makes, the dtype "
              "it infers); the adapter replaces that construction by otlinop's (it reads the matrix column "
              "by column), and otlinop builds no operator from a callable")

#: test id (fnmatch pattern over "part::Class::test[param]" or "part::test[param]") -> reason.
EXCLUDED = {
    # ----- integer operators (both parts)
    "*::test_determine_lo_dtype_from_matvec[int*]": _INT,
    "*::test_determine_lo_dtype_for_int": _INT,
    # ----- extended precision
    "to_scipy::test_determine_lo_dtype_from_matvec[longdouble]":
        "torch has no extended precision: a longdouble matrix becomes float64",
    "to_scipy::test_determine_lo_dtype_from_matvec[clongdouble]":
        "torch has no extended precision: a clongdouble matrix becomes complex128",
    # ----- scipy's construction from callables, and scipy's own subclasses
    "*::test_no_double_init": _CALLABLES,
    "*::test_inheritance": _SCIPY_ONLY,
    "*::test_transpose_multiplication": _SCIPY_ONLY,
    # ----- pickling compares every instance attribute with ==
    "to_scipy::test_pickle": (
        "compares each attribute of the view before and after pickling with ==; the view's `operator` "
        "is an otlinop operator, which has no value equality (it compares by identity, as torch modules "
        "do); pickling views is tested in tests/test_base.py"),
    "direct::test_pickle": (
        "compares each attribute of the operator before and after pickling with ==; an otlinop operator "
        "holds torch tensors, whose == is elementwise; pickling operators is tested in tests/test_base.py "
        "and tests/operator_battery.py"),
    # ----- part direct: a torch dtype where scipy asserts a NumPy one
    "direct::TestLinearOperator::test_matvec": _TORCH_DTYPE,
    "direct::test_dtypes_of_operator_sum": _TORCH_DTYPE,
    "direct::test_determine_lo_dtype_from_matvec[*]": _TORCH_DTYPE,
    # ----- part direct: '*' as a product
    "direct::TestLinearOperator::test_matmul": _STAR,
    "direct::test_attributes": _STAR,
}

_REAL_INTERFACE = shipped.interface


# --------------------------------------------------------------------------
# The stand-in for scipy's ``interface`` module
# --------------------------------------------------------------------------
def _handed(part, op):
    """What part ``part`` hands scipy's test for the otlinop operator ``op``."""
    return op.to_scipy() if part == "to_scipy" else op


def _from_matrix(part, M):
    """``interface.aslinearoperator(M)`` and ``MatrixLinearOperator(M)``."""
    if isinstance(getattr(M, "operator", None), otlinop.LinearOperator):   # a to_scipy() view
        return _handed(part, M.operator)
    if isinstance(M, otlinop.LinearOperator):
        return _handed(part, M)
    return _handed(part, otlinop.aslinearoperator(M))


def _from_callables(part, shape, matvec, rmatvec=None, matmat=None, dtype=None, rmatmat=None):
    """``interface.LinearOperator(shape, matvec, ...)``: the matrix is read with ``matvec``."""
    rows, cols = (int(s) for s in shape)
    if dtype is None:   # scipy's rule: the dtype of a product with an int8 zero vector
        dtype = np.asarray(matvec(np.zeros(cols, dtype=np.int8))).dtype
    dtype = np.dtype(dtype)
    probe = np.eye(cols, dtype=dtype if dtype.kind in "fc" else np.float64)
    M = np.zeros((rows, cols), dtype=probe.dtype)
    for j in range(cols):
        M[:, j] = np.asarray(matvec(probe[:, j])).reshape(rows)
    return _handed(part, otlinop.aslinearoperator(M))


def _identity(part, shape, dtype=None):
    n = int(shape[0])
    tdtype = None if dtype is None else {"float32": torch.float32, "float64": torch.float64,
                                         "complex64": torch.complex64,
                                         "complex128": torch.complex128}[np.dtype(dtype).name]
    return _handed(part, otlinop.Identity(n, dtype=tdtype))


def _algebra_classes():
    """otlinop's classes for ``c * A``, ``A + B``, ``A @ B``, ``A ** k`` (found by building them)."""
    A = otlinop.Dense(torch.eye(2, dtype=torch.float64))
    return {"_ScaledLinearOperator": type(2 * A), "_SumLinearOperator": type(A + A),
            "_ProductLinearOperator": type(A @ A), "_PowerLinearOperator": type(A ** 2)}


def stand_in(part):
    """A module that answers like scipy's ``interface`` but builds otlinop operators."""
    module = types.ModuleType(f"otlinop_interface_{part}")
    module.__getattr__ = lambda name: getattr(_REAL_INTERFACE, name)

    class LinearOperator(sla.LinearOperator):
        """Called, builds an operator from callables; subclassed, it is scipy's class."""

        def __new__(cls, *args, **kwargs):
            if cls is LinearOperator:
                return _from_callables(part, *args, **kwargs)
            return super().__new__(cls, *args, **kwargs)

    module.LinearOperator = LinearOperator
    module.aslinearoperator = lambda A: _from_matrix(part, A)
    module.MatrixLinearOperator = lambda A: _from_matrix(part, A)
    module.IdentityOperator = lambda shape, dtype=None: _identity(part, shape, dtype)
    if part == "direct":
        for name, cls in _algebra_classes().items():
            setattr(module, name, cls)
    return module


# --------------------------------------------------------------------------
# Exclusions and the stand-in, around each test
# --------------------------------------------------------------------------
def _test_key(request, part):
    cls = getattr(request, "cls", None)
    shipped_class = ""
    if cls is not None:
        shipped_class = next(base.__name__ for base in cls.__mro__ if getattr(shipped, base.__name__, None) is base)
        shipped_class += "::"
    name = _ALIASES.get(request.node.originalname, request.node.originalname)
    return f"{part}::{shipped_class}{name}{request.node.name[len(request.node.originalname):]}"


def _reason(key):
    for pattern, reason in EXCLUDED.items():
        if fnmatch.fnmatchcase(key, pattern.replace("[", "[[]")):   # "[" is literal in ids
            return reason
    return None


@pytest.fixture
def scipy_interface(request, monkeypatch):
    """Skip an excluded test (with its reason), else install the stand-in for it."""
    part = getattr(request.cls, "part", None) or _PART_OF[request.node.originalname]
    reason = _reason(_test_key(request, part))
    if reason is not None:
        pytest.skip(f"excluded: {reason}")
    monkeypatch.setattr(shipped, "interface", stand_in(part))
    return part


# --------------------------------------------------------------------------
# The shipped test classes, once per part
# --------------------------------------------------------------------------
def _shipped(name):
    cls = getattr(shipped, name, None)
    if cls is None:   # pragma: no cover - a scipy that renamed its tests
        raise AttributeError(f"scipy's test_interface.py no longer defines {name}; update this adapter")
    return cls


def _as_linear_operator_cases(part):
    """(ids) of ``TestAsLinearOperator``'s cases, as built with the stand-in of ``part``."""
    probe = _shipped("TestAsLinearOperator")()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shipped, "interface", stand_in(part))
        _shipped("TestAsLinearOperator").setup_method(probe)
    if not isinstance(getattr(probe, "cases", None), list):   # pragma: no cover - a scipy that changed its tests
        raise AttributeError("scipy's TestAsLinearOperator.setup_method no longer builds a list `cases` of "
                             "(operator, matrix) pairs; update this adapter")
    ids = []
    for i, (M, _) in enumerate(probe.cases):
        dtype = getattr(M, "dtype", None)
        dtype = str(dtype).replace("torch.", "") if dtype is not None else "none"
        ids.append(f"{i:02d}-{type(M).__name__}-{dtype}")
    return ids


def _linear_operator_class(part):
    class Tests(_shipped("TestLinearOperator")):
        """scipy's tests, with the stand-in of ``part`` (the module's ``pytestmark``)."""

    Tests.part = part
    Tests.__name__ = Tests.__qualname__ = f"TestLinearOperator_{part}"
    return Tests


def _as_linear_operator_class(part):
    ids = _as_linear_operator_cases(part)

    @pytest.mark.parametrize("case_index", range(len(ids)), ids=ids)
    class Tests(_shipped("TestAsLinearOperator")):
        def setup_method(self):
            """The cases are built by the fixture below, once the stand-in is installed."""

        @pytest.fixture(autouse=True)
        def _one_case(self, scipy_interface, case_index):
            _shipped("TestAsLinearOperator").setup_method(self)
            self.cases = [self.cases[case_index]]

    Tests.part = part
    Tests.__name__ = Tests.__qualname__ = f"TestAsLinearOperator_{part}"
    return Tests


TestLinearOperator_to_scipy = _linear_operator_class("to_scipy")
TestLinearOperator_direct = _linear_operator_class("direct")
TestAsLinearOperator_to_scipy = _as_linear_operator_class("to_scipy")
TestAsLinearOperator_direct = _as_linear_operator_class("direct")


# --------------------------------------------------------------------------
# The shipped test functions, once per part (the same function under two names)
# --------------------------------------------------------------------------
_ALIASES = {}   # our name -> scipy's
_PART_OF = {}   # our name -> part


for _name, _func in sorted(vars(shipped).items()):
    if _name.startswith("test_") and isinstance(_func, types.FunctionType):
        for _part in PARTS:
            _alias = f"test_{_part}__{_name[len('test_'):]}"
            _ALIASES[_alias], _PART_OF[_alias] = _name, _part
            globals()[_alias] = _func
del _name, _func, _part, _alias

# Every test of this module, the classes' included, runs with the stand-in (or is skipped as excluded).
pytestmark = pytest.mark.usefixtures("scipy_interface")
