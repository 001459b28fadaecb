"""Test-suite set-up.

Without a CUDA GPU, Triton kernels run in interpreter mode on CPU tensors. The
variable must be set before ``triton`` is first imported, hence here.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fake_capture(counts):
    """``solvers._loop.capture``'s contract on the CPU, for the graph loops' tests:
    the "graph" of ``state <- step(state)`` replays by running ``step`` (the
    closures of the capturing call) on its static copies, in place. Counts
    ``counts["captures"]`` and ``counts["replays"]``."""
    def capture(step, state, device, *, copy=True):
        counts["captures"] += 1
        clones = [t.clone() for t in state] if copy else list(state)
        static = type(state)(*clones) if hasattr(state, "_fields") else tuple(clones)

        class Graph:
            def replay(self):
                counts["replays"] += 1
                for dst, src in zip(static, step(static)):
                    if dst is not src:
                        dst.copy_(src)
        return Graph(), static
    return capture


def fake_graphs(monkeypatch):
    """solvers._loop's CUDA parts on the CPU: a "graph" whose replay runs the
    captured step (the first solve's closures) on its static state
    (:func:`fake_capture`). Returns its counts of captures and replays."""
    import contextlib

    import solvers._loop as L

    counts = {"captures": 0, "replays": 0}
    monkeypatch.setattr(L, "capture", fake_capture(counts))
    monkeypatch.setattr(L, "_graph_device", lambda device: True)
    monkeypatch.setattr(L, "_side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(L, "_synchronises", lambda probe, state: False)
    return counts


@pytest.fixture
def override():
    """``override(**switches)``: ``config.override`` for the rest of the test,
    restored at its teardown (failures included)."""
    from solvers import config

    with contextlib.ExitStack() as stack:
        yield lambda **switches: stack.enter_context(config.override(**switches))


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
