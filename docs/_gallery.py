"""The arguments the documentation build passes to each example of the gallery.

sphinx-gallery runs every script in ``examples/`` while the site builds; these
arguments keep each one no larger than its default (``tests/test_examples.py``
checks it) and send its figures to ``docs/_build/example-figures`` instead of
the default ``figures/``. sphinx-gallery shows the figures that are still open
when a script ends, and writes each script's time to
``docs/sg_execution_times.rst``. At these sizes, one thread (``docs/conf.py``)
on a 2-core CPU otherwise idle: 3 s, 18 s and 7 s for the gradient flow, the
Newton registration and the sparse Hessian (each script's docstring says so).
"""

from __future__ import annotations

import pathlib

FIGURES = pathlib.Path(__file__).resolve().parent / "_build" / "example-figures"

#: Per example: the command-line arguments of the gallery run (small sizes).
SMALL = {
    "gradient_flow.py": ["--n", "200", "--steps", "12"],
    "newton_registration.py": ["--n", "40"],
    "sparse_hessian.py": ["--n", "100"],
}


def reset_argv(gallery_conf, script_vars) -> list[str]:
    """``sys.argv[1:]`` for one example: its small size and the figures folder."""
    name = pathlib.Path(script_vars["src_file"]).name
    return [*SMALL.get(name, []), "--figures", str(FIGURES)]
