"""Test-suite set-up.

Without a CUDA GPU, Triton kernels run in interpreter mode on CPU tensors. The
variable must be set before ``triton`` is first imported, hence here.
"""

import contextlib
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# JAX (OTT-JAX, in the conventions tests) takes 75% of a GPU's memory when it is first
# imported, which left the other test workers out of memory on the GPU machine (56 failures
# in one run): its comparisons run on the CPU, and it allocates as it goes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: The gloo test processes: CPU only, one thread, their Triton parts in the interpreter (also where a GPU is).
GLOO_ENV = {"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}


def _gloo_process(rank, worker, *args):
    worker(rank, *args)
    # Every check passed: end without the interpreter's teardown, where a thread of gloo's can abort the
    # process (SIGABRT, "terminate called without an active exception", no Python frame) about one run
    # in twelve, which mp.spawn reports as a failure. A failing check raised before this line.
    os._exit(0)


def spawn_gloo(worker, world: int, tmp_path, monkeypatch) -> set:
    """Run ``worker(rank, world, store, report)`` in ``world`` spawned gloo processes with ``GLOO_ENV``;
    the names of the checks done, as rank 0 wrote them to ``report`` (JSON)."""
    import torch.multiprocessing as mp

    from otlinop.kernels._dispatch import interpreter_defect

    if interpreter_defect():      # the workers run their Triton parts in the interpreter
        pytest.skip(interpreter_defect())
    for name, value in GLOO_ENV.items():
        monkeypatch.setenv(name, value)
    report = tmp_path / "done.json"
    mp.spawn(_gloo_process, args=(worker, world, str(tmp_path / "store"), str(report)), nprocs=world, join=True)
    return set(json.loads(report.read_text()))


def _replaying_capture(step, state, copy, replayed):
    """A "graph" of ``state <- step(state)`` whose replay runs ``step`` (the closures of the
    capturing call) on its static copies, in place; ``replayed()`` is called at each replay."""
    clones = [t.clone() for t in state] if copy else list(state)
    static = type(state)(*clones) if hasattr(state, "_fields") else tuple(clones)

    class Graph:
        def replay(self):
            replayed()
            for dst, src in zip(static, step(static)):
                if dst is not src:
                    dst.copy_(src)
    return Graph(), static


class FakeGraphs:
    """``solvers.graphs.CudaGraphs``'s contract on the CPU, for the graph loops' tests.

    Graphs are available on every device, the warm-up needs no side stream,
    no product synchronises, and a captured "graph" replays by running the
    captured step (the first solve's closures) on its static state. Pass it
    where a loop takes its graph machinery: ``cg(A, b, graph=GraphCache(graphs=fake))``.
    Counts ``captures`` and ``replays``.
    """

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def available(self, device):
        return True

    def side_stream(self, device):
        return contextlib.nullcontext()

    def synchronises(self, probe, state):
        return False

    def capture(self, step, state, device, *, copy=True):
        self.captures += 1

        def replayed():
            self.replays += 1
        return _replaying_capture(step, state, copy, replayed)


def counting_graphs():
    """The real CUDA graph machinery (``solvers.graphs.CudaGraphs``), counting its ``captures``."""
    from solvers.graphs import CudaGraphs

    class Counting(CudaGraphs):
        captures = 0

        def capture(self, *args, **kwargs):
            self.captures += 1
            return super().capture(*args, **kwargs)
    return Counting()


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, *names) -> dict``: the functions ``module.<name>`` wrapped, for the
    rest of the test, so that the dict counts their calls (name -> count)."""
    def install(module, *names):
        calls = dict.fromkeys(names, 0)
        for name in names:
            def wrapped(*args, _fn=getattr(module, name), _name=name, **kwargs):
                calls[_name] += 1
                return _fn(*args, **kwargs)
            monkeypatch.setattr(module, name, wrapped)
        return calls
    return install


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
