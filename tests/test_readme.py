"""The README's Python examples run as written, each on its own (a fresh namespace)."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


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
