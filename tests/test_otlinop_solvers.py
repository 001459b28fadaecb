"""``otlinop.solvers``: the top-level package ``solvers`` under otlinop's name."""

import os
import subprocess
import sys

import torch

import otlinop
import otlinop.solvers
import solvers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_same_objects():
    assert otlinop.solvers.__all__ == solvers.__all__
    for name in solvers.__all__:
        assert getattr(otlinop.solvers, name) is getattr(solvers, name), name
    assert otlinop.solvers.cg is solvers.cg is otlinop.cg
    assert otlinop.solvers.config is solvers.config is otlinop.config


def test_from_import():
    from otlinop.solvers import cg, jacobi

    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    res = cg(A, b, rtol=1e-12, M=jacobi())
    assert res.converged and torch.allclose(A @ res.x, b)


# Every exported object, used in a fresh interpreter that imports otlinop.solvers first.
_USE_ALL = r"""
import torch
import otlinop.solvers as S
F64 = torch.float64
A = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=F64)
b = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
exact = torch.linalg.solve(A, b)
for fn in (S.cg, S.minres, S.gmres, S.bicgstab):
    res = fn(A, b, rtol=1e-12, M=S.jacobi())
    assert isinstance(res, S.SolveResult) and res.converged and torch.allclose(res.x, exact), fn
assert torch.allclose(S.lsmr(A, b, atol=1e-12, btol=1e-12).x, exact)
assert torch.allclose(S.cg(A, b, rtol=1e-12, M=S.neumann(2)).x, exact)
factory = S.PreconditionerFactory(lambda op: S.jacobi(op), name="mine")
assert torch.allclose(S.cg(A, b, rtol=1e-12, M=factory).x, exact)
assert torch.allclose(S.cg(A, b, rtol=1e-12, graph=S.GraphCache()).x, exact)
B = b.clone().requires_grad_(True)
S.solve(A, B, "cg", rtol=1e-12).x.sum().backward()
assert torch.allclose(B.grad, torch.linalg.solve(A, torch.ones(3, dtype=F64)))
assert isinstance(S.config, S.Config)
with S.config.override(cg_fused=not S.config.cg_fused):
    pass
import solvers, otlinop
assert all(getattr(S, name) is getattr(solvers, name) for name in solvers.__all__)
assert otlinop.solvers is S
print("ok", len(S.__all__))
"""


def _python(code, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)


def test_every_export_works_in_a_fresh_process(tmp_path):
    proc = _python(_USE_ALL, tmp_path)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", str(len(solvers.__all__))], proc.stderr


def test_a_folder_named_solvers_is_reported(tmp_path):
    """A project's own solvers/ folder in the current directory hides the package:
    importing otlinop says so and names the folder, rather than failing on a missing name."""
    (tmp_path / "solvers").mkdir()
    (tmp_path / "solvers" / "__init__.py").write_text("def mine():\n    return 1\n")
    for code in ("import otlinop", "from otlinop.solvers import cg"):
        proc = _python(code, tmp_path)
        assert proc.returncode != 0
        assert "otlinop: the module 'solvers' imported from " + str(tmp_path / "solvers") in proc.stderr, proc.stderr
        assert "rename that folder, or run from another directory" in proc.stderr
