"""Host synchronisations of a SamplesLoss call (issue 17, item 1).

On the CPU a synchronisation is a read-back of a tensor value to Python:
``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``. The
tests count those calls during a forward and a backward. The budget: one per
call (the value checks and the default diameter share one read-back), none
with ``check_finite`` off and ``diameter`` given (so a call can be captured in
a CUDA graph).
"""
import pytest
import torch

from conftest import requires_cuda
from otlinop.loss import SamplesLoss, sinkhorn_loss

F64 = torch.float64
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def reads(monkeypatch):
    """The list of read-backs (method names) made from now on."""
    log = []
    for name in READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *args, _real=real, _name=name: log.append(_name) or _real(self, *args))
    return log


def _data(batch=()):
    x = torch.randn(*batch, 30, 3, dtype=F64, requires_grad=True)
    y = torch.randn(*batch, 25, 3, dtype=F64) + 0.5
    y.requires_grad_(True)
    return x, y


CASES = {
    "balanced": dict(),
    "reach": dict(reach=1.0),
    "no debias": dict(debias=False),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("diameter", [None, 6.0], ids=["default diameter", "diameter given"])
def test_reads_per_call(reads, override, case, batch, check_finite, diameter):
    """One read-back per forward (value checks and diameter fused), none when neither
    is needed; the backward reads nothing."""
    override(check_finite=check_finite)
    loss = SamplesLoss(blur=0.3, diameter=diameter, **CASES[case])
    x, y = _data(batch)
    reads.clear()
    value = loss(x, y)
    forward = list(reads)
    value.sum().backward()
    expected = int(check_finite or diameter is None)
    assert len(forward) == expected, forward
    assert reads == forward, "the backward read a value back"
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_functional_and_potentials_read_once(reads):
    x, y = _data()
    reads.clear()
    sinkhorn_loss(x, y, blur=0.3)
    assert reads == ["tolist"]
    reads.clear()
    F, G = sinkhorn_loss(x, y, blur=0.3, potentials=True)
    assert reads == ["tolist"] and F.shape == (30,) and G.shape == (25,)


def test_fused_read_back_keeps_every_check_and_the_diameter():
    """The fused read-back still raises each check's message, and its diameter is that of
    ``otlinop.sinkhorn``'s schedule (same value as a separate call)."""
    x, y = _data()
    x = x.detach()
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="SamplesLoss: x contains NaN"):
        SamplesLoss(blur=0.3)(bad, y)
    a = torch.full((30,), 1 / 30, dtype=F64)
    b = torch.full((25,), 2 / 25, dtype=F64)
    with pytest.raises(ValueError, match="balanced OT needs equal total masses"):
        SamplesLoss(blur=0.3)(a, x, b, y)
    from otlinop._sinkhorn_schedule import diameter as box_diameter
    D = box_diameter(x, y)
    assert SamplesLoss(blur=0.3)(x, y) == SamplesLoss(blur=0.3, diameter=D)(x, y)


def test_half_points_get_the_float32_diameter():
    """hi - lo in float64: half-precision points give exactly the diameter of the same
    values in float32 (the schedule does not depend on the rounding of a half difference)."""
    from otlinop._sinkhorn_schedule import diameter as box_diameter
    x = (torch.randn(40, 3) * 30).half()
    y = (torch.randn(40, 3) * 30 + 7).half()
    assert box_diameter(x, y) == box_diameter(x.float(), y.float())


@requires_cuda
def test_gpu_call_synchronises_nothing(override):
    """GPU: with check_finite off and diameter given, a forward and a backward raise no
    synchronisation under torch.cuda.set_sync_debug_mode("error"); the default call does
    exactly its one read-back (the debug mode then raises)."""
    from otlinop import config
    override(check_finite=False)
    x = torch.randn(2048, 3, device="cuda", requires_grad=True)
    y = torch.randn(2048, 3, device="cuda") + 0.5
    loss = SamplesLoss(blur=0.05, diameter=8.0)
    for graphs in (False, True):    # eager calls, then replays of the call's cached graphs
        with config.override(sinkhorn_graphs=graphs):
            for _ in range(2):      # warm-up: autotuning, compilation and the capture may synchronise
                loss(x, y).backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                value = loss(x, y)
                value.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            SamplesLoss(blur=0.05)(x, y)     # the default diameter is read back
    finally:
        torch.cuda.set_sync_debug_mode(0)


@requires_cuda
def test_gpu_default_diameter_replays_with_one_read(override):
    """GPU: a training loop with the default diameter (points moving between calls) reads
    back one value per step (the checks and the diameter, one reduction) and replays the
    cached graphs of its solve and gradients from the third step on: the schedule's values
    are data. Each step equals the eager one bitwise."""
    import warnings
    from otlinop import config
    from otlinop.loss import LOSS_GRAPHS
    LOSS_GRAPHS.clear()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, 3, device="cuda", generator=gen).requires_grad_()
    y = torch.randn(2048, 3, device="cuda", generator=gen) + 0.5
    x_eager = x.detach().clone().requires_grad_()
    loss = SamplesLoss(blur=0.05)
    reads = []
    for step in range(5):
        before = LOSS_GRAPHS.replays
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                (g,) = torch.autograd.grad(loss(x, y), x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        reads.append(sum("synchroniz" in str(w.message) for w in caught))
        with config.override(sinkhorn_graphs=False):
            (e,) = torch.autograd.grad(loss(x_eager, y), x_eager)
        assert torch.equal(g, e), step
        if step >= 2:
            assert LOSS_GRAPHS.replays == before + 2, step       # the solve and the gradients
        with torch.no_grad():
            x -= 0.1 * g
            x_eager -= 0.1 * e
    assert reads[2:] == [1, 1, 1], reads


@requires_cuda
def test_gpu_capture_needs_the_diameter(override):
    """GPU: inside a CUDA graph capture the default diameter cannot be read back: the call
    raises RuntimeError naming diameter= (rather than a capture error from a sync)."""
    x = torch.randn(256, 3, device="cuda")
    y = torch.randn(256, 3, device="cuda") + 0.5
    loss = SamplesLoss(blur=0.1)
    loss(x, y)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(RuntimeError, match="diameter="):
        graph.capture_begin()
        try:
            loss(x, y)
        finally:
            try:
                graph.capture_end()
            except RuntimeError:
                pass    # the aborted capture's own error: the loss's message is the one checked
