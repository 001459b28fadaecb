"""Test-suite set-up.

Without a CUDA GPU, Triton kernels run in interpreter mode on CPU tensors. The
variable must be set before ``triton`` is first imported, hence here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Every problem in this suite is small: torch's intra-op thread pool only adds
    # overhead (on a loaded 2-core machine a 150 x 150 @ 150 x 16 product took
    # ~1 ms instead of ~30 us, and some tests ran 10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
