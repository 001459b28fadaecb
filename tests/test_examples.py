"""The main job and the examples run and say what they should."""

import pathlib
import runpy
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_main_job_runs_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "otlinop", "--device", "cpu", "-n", "200"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for needle in ("SamplesLoss(", "grad_x", "final marginal errors", "neumann(3)", "HVP of the OT loss", "ok"):
        assert needle in out, out


def test_gradient_flow_example_saves_a_figure(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "flow.png"
    monkeypatch.setattr(sys, "argv", ["gradient_flow.py", "--n", "60", "--steps", "4", "--device", "cpu",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "examples" / "gradient_flow.py"), run_name="__main__")
    assert stop.value.code == 0
    assert out.exists() and out.stat().st_size > 10_000
    assert "figure saved" in capsys.readouterr().out


def test_sparse_hessian_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sparse_hessian.py", "--n", "120"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "examples" / "sparse_hessian.py"), run_name="__main__")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "| 1e-08 |" in out and out.rstrip().endswith("ok"), out
