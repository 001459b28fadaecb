"""Sphinx configuration of the otlinop documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W -b html docs docs/_build/html

``-W`` turns every warning into an error; CI (``.ci/run``) builds it so. The
gallery runs every script of ``examples/`` at the small sizes of
``docs/_gallery.py`` and shows the figures they draw.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# The checkout's code, whatever is installed; _gallery (the gallery's argument hook) beside this file.
sys.path[:0] = [str(ROOT), str(DOCS)]
# Examples run on the CPU here: the kernels' torch references, or Triton's interpreter when
# a kernel is asked for by name. Set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import otlinop  # noqa: E402
import solvers  # noqa: E402

# The gallery's examples are small: one thread. With torch's default (a thread per
# core) on a 2-core CI machine busy with other jobs, sparse_hessian.py took 329 s
# instead of 11 s (README, "On a CPU").
torch.set_num_threads(1)

project = "otlinop"
author = "the otlinop authors"
copyright = "the otlinop authors, MIT licence"
release = version = otlinop.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
if os.environ.get("OTLINOP_DOCS_NO_GALLERY"):
    # A quick build of the pages and the API reference while editing them; the
    # gallery pages are then missing, so only without -W.
    extensions.remove("sphinx_gallery.gen_gallery")

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.md5", "auto_examples/*.json"]

# ---------------------------------------------------------------- API reference
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"            # the numpydoc Parameters sections carry the types
autodoc_member_order = "bysource"
numpydoc_show_class_members = False   # members are listed by the class template instead
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True

# ---------------------------------------------------------------- Markdown pages
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
suppress_warnings = [
    # The pages are also read on GitHub, where a link like `docs/math.md` is a
    # path: MyST would resolve it as a cross-reference to a missing document.
    "myst.xref_missing",
]

# ---------------------------------------------------------------- Gallery
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r".*\.py$",          # run every example, not only plot_*.py
    "reset_argv": "_gallery.reset_argv",      # the small sizes, and a figures folder under docs/_build
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 1,
    "show_memory": False,
    "show_signature": False,
    "write_computation_times": True,
    "abort_on_example_error": True,
}

# ---------------------------------------------------------------- HTML
html_theme = "pydata_sphinx_theme"
html_title = f"otlinop {release}"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"index": [], "getting-started": [], "conventions": [], "benchmarks": []}
html_show_sourcelink = False


# ---------------------------------------------------------------- Checks
def _documented_names(path: pathlib.Path) -> dict[str, set[str]]:
    """The names listed in each ``currentmodule`` section of an autosummary page."""
    names: dict[str, set[str]] = {}
    module = None
    for line in path.read_text().splitlines():
        match = re.match(r"\.\. currentmodule:: (\S+)", line.strip())
        if match:
            module = match.group(1)
            continue
        match = re.fullmatch(r"\s{3,}([A-Za-z_][A-Za-z0-9_]*)", line)
        if match and module is not None:
            names.setdefault(module, set()).add(match.group(1))
    return names


def _check_api_page(app) -> None:
    """Stop the build when a public name (``__all__``) is missing from docs/api.rst."""
    listed = _documented_names(DOCS / "api.rst")
    missing = []
    for name in solvers.__all__:
        if name not in listed.get("solvers", set()):
            missing.append(f"solvers.{name}")
    for name in otlinop.__all__:
        if name in listed.get("otlinop", set()):
            continue
        # otlinop re-exports the solvers: those are documented once, under solvers.
        if name in solvers.__all__ and getattr(otlinop, name) is getattr(solvers, name):
            continue
        missing.append(f"otlinop.{name}")
    if missing:
        raise RuntimeError("docs/api.rst does not list these public names (__all__): " + ", ".join(missing))


def _hide_private_keywords(app, what, name, obj, options, signature, return_annotation):
    """Drop ``_name=...`` keywords (the tests' hooks, e.g. ``sinkhorn(..., _graphs=None)``) from signatures."""
    if signature:
        signature = re.sub(r",\s*_[A-Za-z0-9_]*=[^,)]*", "", signature)
    return signature, return_annotation


def setup(app):
    app.connect("builder-inited", _check_api_page)
    app.connect("autodoc-process-signature", _hide_private_keywords)
