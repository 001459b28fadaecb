"""The README's Python examples run as written (in order, one namespace)."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["sol"].converged, namespace["sol"].status
    assert torch.isfinite(namespace["Hv"]).all()
    assert "converged" in capsys.readouterr().out
