"""The README: its Python examples run as written, each on its own (a fresh namespace), each
states the one cost convention it uses, its links lead somewhere, and CI runs its commands."""

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
#: The two costs of the package, as the README's comments write them.
COSTS = re.compile(r"cost \|x - y\|\^2( / 2)?")


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_on_its_own(index, capsys):
    namespace = {}
    torch.manual_seed(0)
    exec(compile(BLOCKS[index], f"README.md, python block {index + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    if "sol" in namespace:
        assert namespace["sol"].converged, namespace["sol"].status
        assert "converged" in out
    if "Hv" in namespace:
        assert torch.isfinite(namespace["Hv"]).all()
    if "res" in namespace:
        assert torch.isfinite(namespace["res"].f).all()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_states_one_cost_convention(index):
    """A block that solves a transport problem names its cost, and only one (issue 24)."""
    block = BLOCKS[index]
    if "sinkhorn(" not in block and "SamplesLoss(" not in block:
        return
    stated = {match.group(0) for match in COSTS.finditer(block)}
    assert len(stated) == 1, f"python block {index + 1} states {sorted(stated) or 'no cost'}"
    half = stated == {"cost |x - y|^2 / 2"}
    # SamplesLoss' default cost is |x - y|^2 / 2, sinkhorn's |x - y|^2 (unless cost_scale says otherwise).
    if "cost_scale" not in block:
        assert half == ("SamplesLoss(" in block), f"python block {index + 1}: the stated cost is not the one used"


def test_readme_links_lead_to_files():
    links = re.findall(r"\]\(([^)#]+)\)", TEXT)
    assert links
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), link


def test_readme_speed_section_points_to_the_benchmarks_page():
    speed = TEXT.split("## Speed", 1)[1].split("\n## ", 1)[0]
    assert "docs/benchmarks.md" in speed and "python -m otlinop.bench all" in speed


def test_ci_runs_the_readme_commands():
    """.ci/run checks that these lines are in the README verbatim, then runs them."""
    ci = (ROOT / ".ci" / "run").read_text()
    for command in re.findall(r"^```bash\n(.*?)\n```", TEXT, flags=re.S | re.M):
        if command.startswith("pip install -e"):
            assert command in ci, command
