"""The main job, the examples and the benchmarks' help run and say what they should.

Each example states in its docstring its default size (``Default size:
``--n 400 --steps 30````) and the time that size took; the tests below keep
the parser's defaults equal to the stated size (a larger default would make
the stated time a guess), keep the documentation's gallery sizes no larger,
and run each example at a small size with its figure written where asked.
"""

import ast
import importlib.util
import os
import pathlib
import re
import runpy
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SIZE_OPTIONS = ("--n", "--steps", "--d")


def _defaults(path: pathlib.Path) -> dict[str, object]:
    """The ``default=`` of every ``parser.add_argument("--name", ...)`` in a script, read without running it."""
    defaults = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and node.args and isinstance(node.args[0], ast.Constant)):
            for keyword in node.keywords:
                if keyword.arg == "default":
                    defaults[node.args[0].value] = ast.literal_eval(keyword.value)
    return defaults


def _stated(path: pathlib.Path) -> tuple[dict[str, int], str]:
    """The size an example's docstring states (``Default size: ``--n 60````) and the sentence with its time."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    flat = " ".join(doc.split())
    match = re.search(r"Default size: ``([^`]*)``\. (Measured .*?\d s\b.*?\.)(?:\s|$)", flat)
    assert match, f"{path.name}: the docstring must state 'Default size: ``--n N ...``. Measured ... N s ...'"
    tokens = match.group(1).split()
    return {tokens[i]: int(tokens[i + 1]) for i in range(0, len(tokens), 2)}, match.group(2)


def _gallery_sizes() -> dict[str, list[str]]:
    spec = importlib.util.spec_from_file_location("otlinop_docs_gallery", ROOT / "docs" / "_gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SMALL


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES} == {"gradient_flow.py", "newton_registration.py", "sparse_hessian.py"}
    assert set(_gallery_sizes()) == {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_defaults_are_the_stated_size(path):
    stated, sentence = _stated(path)
    defaults = _defaults(path)
    sizes = {name: value for name, value in defaults.items() if name in SIZE_OPTIONS}
    # Every size option is stated, at its default: the docstring's time is for what runs by default.
    assert stated == sizes, f"{path.name}: docstring states {stated}, the parser's defaults are {sizes}"
    assert "OMP_NUM_THREADS=1" in sentence
    assert defaults.get("--figures") == "figures"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_gallery_runs_each_example_no_larger_than_its_default(path):
    small = _gallery_sizes()[path.name]
    stated, _ = _stated(path)
    doc = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split())
    assert f"The documentation runs it with ``{' '.join(small)}``" in doc, "the docstring names the gallery's size"
    given = {small[i]: int(small[i + 1]) for i in range(0, len(small), 2)}
    assert given and set(given) <= set(stated)
    assert all(given[name] <= stated[name] for name in given), (given, stated)


def _run_example(name, monkeypatch, *args):
    """Run ``examples/<name>`` with ``args``; check that every axis of its figures is labelled."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    plt.close("all")
    monkeypatch.setattr(sys, "argv", [name, *args])
    try:
        runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
        figures = [plt.figure(k) for k in plt.get_fignums()]
        assert figures, f"{name} drew no figure"
        for fig in figures:
            for ax in fig.axes:
                assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: an axis without a label ({ax.get_title()!r})"
    finally:
        plt.close("all")


def test_gradient_flow_example_saves_a_figure(tmp_path, monkeypatch, capsys):
    _run_example("gradient_flow.py", monkeypatch, "--n", "60", "--steps", "4", "--device", "cpu",
                 "--figures", str(tmp_path / "figs"))
    out = tmp_path / "figs" / "gradient_flow.png"
    assert out.exists() and out.stat().st_size > 10_000
    assert "figure saved to" in capsys.readouterr().out


def test_sparse_hessian_example_runs(tmp_path, monkeypatch, capsys):
    _run_example("sparse_hessian.py", monkeypatch, "--n", "120", "--figures", str(tmp_path))
    out = capsys.readouterr().out
    assert "| 1e-08 |" in out and out.rstrip().endswith("ok"), out
    assert (tmp_path / "sparse_hessian.png").stat().st_size > 10_000


def test_newton_registration_example_runs(tmp_path, monkeypatch, capsys):
    _run_example("newton_registration.py", monkeypatch, "--n", "20", "--steps", "2", "--figures", str(tmp_path))
    out = capsys.readouterr().out
    assert "OT Hessian eigenvalues" in out and "figure saved to" in out, out
    assert (tmp_path / "newton_registration.png").stat().st_size > 10_000


def test_main_job_runs_on_cpu_and_says_what_it_computed():
    # One thread, as the test session has (conftest): the job itself runs with what it is given.
    proc = subprocess.run([sys.executable, "-m", "otlinop", "--device", "cpu", "-n", "200"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for needle in ("device:  CPU", "kernels: torch reference kernels", "C(x, y) = |x - y|^2 / 2",
                   "debiased Sinkhorn divergence", "OT(x, y) = <a, f> + <b, g>", "<P, C>",
                   "It is larger than the loss", "marginal errors", "cg(S, r, M=neumann(3))",
                   "Hessian-vector product", "<v, H v> = ", "total time", "ok"):
        assert needle in out, (needle, out)
    # The built-in clouds give a negative <v, H v>: the job must explain it.
    assert "negative, as it may be" in out and "minres" in out, out


def test_main_job_help_explains_every_option():
    proc = subprocess.run([sys.executable, "-m", "otlinop", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for option, words in (("--device", "cuda or cpu"), ("-n N", "points per cloud"), ("--blur", "eps = blur^2"),
                          ("--threshold", "marginal error")):
        assert option in text and words in text, (option, proc.stdout)


def test_bench_help_lists_every_option_with_help():
    from otlinop.bench.__main__ import SUITES, help_text

    text = help_text()
    for suite, module_name in SUITES.items():
        parser = importlib.import_module(module_name).build_parser()
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, (suite, option)
            assert action.help, (suite, action.option_strings)
    for option in ("--results", "--no-results"):
        assert option in text
    proc = subprocess.run([sys.executable, "-m", "otlinop.bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == text.strip()
