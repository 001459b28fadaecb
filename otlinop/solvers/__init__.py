"""``otlinop.solvers``: the Krylov solvers and preconditioners under otlinop's name.

This is the top-level package ``solvers`` seen from inside otlinop: the
same objects, not copies (``otlinop.solvers.cg is solvers.cg``), so the
documentation of ``solvers`` applies (see docs/solvers.md). It exposes
``solvers.__all__``: ``cg``, ``minres``, ``gmres``, ``bicgstab``, ``lsmr``,
``solve``, ``SolveResult``, ``GraphCache``, ``jacobi``, ``neumann``,
``PreconditionerFactory``, ``config`` and ``Config``.

Why a second name: ``solvers`` is a common name. Another distribution on
the package index is called ``solvers``, and a folder named ``solvers`` in
a project (in the current directory, or beside the script being run) comes
first on ``sys.path`` and hides this one. ``from otlinop.solvers import cg``
says in the code which package is meant. otlinop itself imports the solvers
under their top-level name, so such a folder still hides them from it:
``import otlinop`` then fails with an ImportError that names the folder
found instead; rename it, or run from another directory.

Examples
--------
>>> import torch
>>> from otlinop.solvers import cg, jacobi
>>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
>>> res = cg(A, torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=1e-10, M=jacobi())
>>> res.converged
True
"""

import solvers as _top


def _shadowed() -> ImportError:
    where = getattr(_top, "__file__", None) or ", ".join(getattr(_top, "__path__", [])) or repr(_top)
    return ImportError(
        f"otlinop: the module 'solvers' imported from {where} is not otlinop's Krylov solvers package "
        "(it lacks solvers.cg and solvers.GraphCache): a folder or another package named 'solvers' earlier on "
        "sys.path (the current directory, the script's folder) hides the one installed with otlinop; rename "
        "that folder, or run from another directory")


# The package installed with otlinop names its exports; another one called 'solvers' would not.
if not all(hasattr(_top, name) for name in ("__all__", "cg", "GraphCache", "config")):
    raise _shadowed()

from solvers import *  # noqa: E402,F401,F403  (the same objects as the top-level package)
from solvers import __all__  # noqa: E402,F401
