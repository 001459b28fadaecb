"""The Triton kernels compile for a Hopper GPU (sm_90), checked on machines without one.

The CPU suite runs the kernels in Triton's interpreter, which does not type-check them
as the compiler does (a loop-carried variable whose type changes runs there and fails
to compile). tests/kernel_compile_check.py records the launches of representative calls
in the interpreter, then compiles each variant with ``triton.compile`` for sm_90, in two
processes (the interpreter is chosen at import).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from otlinop.kernels._dispatch import interpreter_defect

HELPER = Path(__file__).with_name("kernel_compile_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine compiles the kernels for its GPU in the GPU tests")
@pytest.mark.skipif(interpreter_defect() is not None, reason=f"the interpreter cannot record: {interpreter_defect()}")
def test_every_recorded_kernel_variant_compiles_for_sm90(tmp_path):
    launches = tmp_path / "launches.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    recorded = subprocess.run([sys.executable, "-W", "ignore", str(HELPER), "record", str(launches)], env=env,
                              capture_output=True, text=True, timeout=900)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr[-3000:]
    env.pop("TRITON_INTERPRET")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")     # compiled here, not found in a cache
    compiled = subprocess.run([sys.executable, "-W", "ignore", str(HELPER), "compile", str(launches)], env=env,
                              capture_output=True, text=True, timeout=900)
    assert compiled.returncode == 0, compiled.stdout[-6000:] + compiled.stderr[-3000:]
    assert "0 failed" in compiled.stdout and int(compiled.stdout.split()[0]) >= 40, compiled.stdout
