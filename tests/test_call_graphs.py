"""Whole SamplesLoss calls as cached CUDA graphs (issue 17, items 2 and 3).

On the CPU the cache runs with the test suite's stand-in graph machinery
(``FakeGraphs``: a "replay" runs the captured function on the graph's own
buffers), which checks the cache's logic: when it captures, what it keys
on, that replays give the eager values and that a later replay overwrites
nothing a caller holds. The GPU tests check real graphs against eager calls
bitwise, and a user's own ``torch.cuda.graph`` capture of a whole training
step (forward, backward, optimizer step).
"""
import pytest
import torch

import otlinop._loss_functions as loss_functions
from conftest import FakeGraphs, requires_cuda
from otlinop import SamplesLoss, config
from otlinop._call_graphs import LOSS_GRAPHS, CallGraphCache

F64 = torch.float64


@pytest.fixture
def fake(monkeypatch):
    """The loss's cache on the CPU stand-in graphs; returns the cache (``.graphs`` counts)."""
    cache = CallGraphCache(graphs=FakeGraphs())
    monkeypatch.setattr(loss_functions, "LOSS_GRAPHS", cache)
    return cache


def _data(n=30, m=25, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=F64, generator=gen)
    y = torch.randn(m, d, dtype=F64, generator=gen) + 0.5
    return x.requires_grad_(), y.requires_grad_()


def _value_and_grads(loss, x, y, **kw):
    value = loss(x, y)
    gx, gy = torch.autograd.grad(value, (x, y), **kw)
    return value.detach(), gx, gy


CASES = {
    "debiased": dict(blur=0.3, diameter=6.0),
    "no debias": dict(blur=0.3, diameter=6.0, debias=False),
    "unbalanced": dict(blur=0.3, diameter=6.0, reach=1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_repeated_calls_capture_once_and_replay_the_eager_values(fake, case):
    """First call eager, second captures (solve and gradients), later ones replay; every
    call's value and gradients are bitwise the eager ones."""
    loss = SamplesLoss(**CASES[case])
    x, y = _data()
    with config.override(sinkhorn_graphs=False):
        eager = _value_and_grads(loss, x, y)
    counts = []
    for _ in range(4):
        got = _value_and_grads(loss, x, y)
        for g, e in zip(got, eager):
            assert torch.equal(g, e)
        counts.append((fake.captures, fake.replays))
    assert counts == [(0, 0), (2, 2), (2, 4), (2, 6)]


def test_a_replay_overwrites_nothing_a_caller_holds(fake):
    """Two calls of one shape before one backward: each keeps its own potentials."""
    loss = SamplesLoss(blur=0.3, diameter=6.0)
    x1, y = _data(seed=1)
    x2, _ = _data(seed=2)
    for _ in range(2):          # the key seen, then captured
        loss(x1, y)
    v1, v2 = loss(x1, y), loss(x2, y)       # both replays of one graph
    g1, g2 = torch.autograd.grad(v1 + 2 * v2, (x1, x2))
    with config.override(sinkhorn_graphs=False):
        e1, e2 = loss(x1, y), loss(x2, y)
        h1, h2 = torch.autograd.grad(e1 + 2 * e2, (x1, x2))
    assert fake.replays >= 3
    assert torch.equal(v1, e1) and torch.equal(v2, e2)
    assert torch.equal(g1, h1) and torch.equal(g2, h2)


def test_the_key_holds_the_schedule_length_shapes_and_switches(fake):
    """Another schedule length, shape or switch value is another key: seen first, eager.
    A schedule of the same length with other values replays (its eps are data)."""
    x, y = _data()
    for _ in range(2):
        SamplesLoss(blur=0.3, diameter=6.0)(x, y)
    assert fake.captures == 1           # the forward (no gradient asked)
    # 7 and 6 both give 7 eps steps down to blur 0.3 at scaling 0.5: a replay, with 7's values.
    got = SamplesLoss(blur=0.3, diameter=7.0)(x, y)
    assert fake.replays == 2
    with config.override(sinkhorn_graphs=False):
        assert torch.equal(got, SamplesLoss(blur=0.3, diameter=7.0)(x, y))
        assert not torch.equal(got, SamplesLoss(blur=0.3, diameter=6.0)(x, y))
    SamplesLoss(blur=0.3, diameter=13.0)(x, y)        # 8 steps: another schedule length
    SamplesLoss(blur=0.3, diameter=6.0)(*_data(n=31))  # another shape
    with config.override(check_finite=False):         # another switch value
        SamplesLoss(blur=0.3, diameter=6.0)(x, y)
    assert fake.captures == 1 and fake.replays == 2
    with config.override(sinkhorn_graphs=False):       # graphs off: nothing seen, nothing replayed
        for _ in range(3):
            SamplesLoss(blur=0.3, diameter=6.0)(x, y)
    assert fake.captures == 1 and fake.replays == 2


def _train_like_eager(loss, x, y, *, steps):
    """``steps`` gradient steps on x (graphs on) beside the same steps with graphs off, each
    gradient bitwise the eager one; returns the diameter of the points at each step."""
    from otlinop._sinkhorn_schedule import diameter
    x_eager = x.detach().clone().requires_grad_()
    diameters = []
    for _ in range(steps):
        diameters.append(diameter(x.detach(), y.detach()))
        (g,) = torch.autograd.grad(loss(x, y), x)
        with config.override(sinkhorn_graphs=False):
            (e,) = torch.autograd.grad(loss(x_eager, y), x_eager)
        assert torch.equal(g, e)
        with torch.no_grad():
            x -= 0.5 * g
            x_eager -= 0.5 * e
    return diameters


def test_moving_points_replay_solve_and_gradients(fake):
    """A training loop whose points move: the default diameter (hence the schedule's
    values) changes at every call, but not the schedule's length, so the solve and the
    gradient passes both capture at the second step and replay after it. Every step
    equals the eager one (whose kernels take eps as an argument)."""
    from otlinop.sinkhorn import epsilon_schedule
    x, y = _data()
    diameters = _train_like_eager(SamplesLoss(blur=0.3), x, y, steps=4)
    assert len(set(diameters)) == 4 and len({len(epsilon_schedule(d, 0.3, 0.5)) for d in diameters}) == 1
    assert fake.graphs.captures == 2 and fake.replays == 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter on CPU tensors (a GPU machine "
                    "runs the compiled kernels on CUDA tensors: the GPU tests below)")
@pytest.mark.parametrize("reach", [None, 1.0])
def test_moving_points_with_the_triton_kernels(fake, reach):
    """As above through the Triton kernels (the interpreter on the CPU), float32, debiased
    and unbalanced: the cached solve's kernels read eps from memory, the eager call's take
    it as an argument; every step is bitwise the eager one."""
    x, y = (t.detach().float() for t in _data())
    _train_like_eager(SamplesLoss(blur=0.3, reach=reach, backend="triton"), x.requires_grad_(), y, steps=3)
    assert fake.graphs.captures == 2 and fake.replays == 4


def test_capacity_evicts_the_least_recently_used_and_clear_frees_all():
    cache = CallGraphCache(graphs=FakeGraphs(), capacity=2)

    def double(options, t):
        return (options * t,)

    ts = [torch.ones(k) for k in (1, 2, 3)]
    for t in ts:
        for _ in range(2):
            assert torch.equal(cache(double, 2.0, (t,))[0], 2 * t)
    assert len(cache) == 2 and cache.captures == 3
    assert cache.nbytes() == 4 * (2 + 3) * 2       # float32 inputs and outputs of the last two
    assert "2 graphs" in repr(cache)
    cache(double, 2.0, (ts[0],))     # evicted: seen again, eager
    assert cache.captures == 3
    cache.clear()
    assert len(cache) == 0 and cache.nbytes() == 0


def test_a_function_that_synchronises_is_never_captured():
    """The dry run before a capture finds a synchronisation: the key runs eagerly from then on."""
    class Syncing(FakeGraphs):
        def synchronises(self, probe, state):
            return True

    cache = CallGraphCache(graphs=Syncing())
    calls = []

    def fn(options, t):
        calls.append(1)
        return (t + options,)

    for _ in range(4):
        assert torch.equal(cache(fn, 1.0, (torch.zeros(3),))[0], torch.ones(3))
    assert cache.captures == 0 and cache.graphs.replays == 0 and len(cache) == 0


def test_large_calls_and_wrapped_tensors_run_eagerly():
    cache = CallGraphCache(graphs=FakeGraphs(), max_elements=10)

    def fn(options, t):
        return (t * options,)

    for _ in range(3):
        cache(fn, 1.0, (torch.zeros(11),))
    assert cache.captures == 0
    # Under torch.func the tensors are wrapped: eager (the transform sees every operation).
    out = torch.func.vmap(lambda t: cache(fn, 3.0, (t,))[0])(torch.ones(2, 3))
    assert torch.equal(out, 3 * torch.ones(2, 3)) and cache.captures == 0


def test_double_backward_and_forward_mode_after_replays(fake):
    """Second-order and forward-mode derivatives still work on a replayed forward (the
    graphs hold first-order work only; the HVPs run eagerly)."""
    loss = SamplesLoss(blur=0.3, diameter=6.0)
    x, y = _data()
    v = torch.randn_like(x)
    results = []
    for graphs in (False, True, True, True):
        with config.override(sinkhorn_graphs=graphs):
            (g,) = torch.autograd.grad(loss(x, y), x, create_graph=True)
            (h,) = torch.autograd.grad((g * v).sum(), x)
            _, t = torch.func.jvp(lambda p: loss(p, y.detach()), (x.detach(),), (v,))
        results.append((g.detach(), h, t))
    assert fake.replays > 0
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("d, precision, dtype", [(3, None, torch.float32), (64, None, torch.float32),
                                                 (64, "tf32", torch.float32), (3, None, torch.float64)])
def test_gpu_replays_are_bitwise_the_eager_calls(d, precision, dtype):
    """Real graphs: the loss's values and gradients equal the eager call's bitwise, n = 2048
    (with "tf32" at d = 64 to 2% in norm: the eager call multiplies fp16 copies of the
    points, scaled by a factor read back from the device, which a capture cannot read);
    float64 runs the torch references, whose eps comes from device memory in a replay."""
    LOSS_GRAPHS.clear()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    y = torch.randn(2048, d, device="cuda", generator=gen).to(dtype) + 0.5
    # TF32's two roundings differ by ~1e-3 of a cost: compare them at a blur where that is small.
    loss = SamplesLoss(blur=0.05 if precision is None else 1.0, diameter=20.0, precision=precision)
    with config.override(sinkhorn_graphs=False):
        eager = _value_and_grads(loss, x, y.requires_grad_())
    before = LOSS_GRAPHS.replays
    for _ in range(4):
        got = _value_and_grads(loss, x, y)
        for g, e in zip(got, eager):
            if precision is None:
                assert torch.equal(g, e)
            else:
                assert (g - e).norm() <= 2e-2 * e.norm()
    assert LOSS_GRAPHS.replays - before == 6 and len(LOSS_GRAPHS) == 2
    LOSS_GRAPHS.clear()


@requires_cuda
def test_gpu_user_captures_a_whole_training_step():
    """A user's torch.cuda.graph of forward, backward and an SGD step replays the eager
    steps bitwise (diameter given: nothing is read back inside the capture)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.Parameter(torch.randn(2048, 3, device="cuda", generator=gen))
    y = torch.randn(2048, 3, device="cuda", generator=gen) + 0.5
    opt = torch.optim.SGD([x], lr=50.0)
    loss = SamplesLoss(blur=0.05, diameter=8.0)

    def step():
        opt.zero_grad(set_to_none=False)
        value = loss(x, y)
        value.backward()
        opt.step()
        return value.detach()

    x0 = x.detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):       # warm-up (compile, autotune) on a side stream
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_value = step()
    with torch.no_grad():
        x.copy_(x0)
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append((static_value.clone(), x.detach().clone()))
    with torch.no_grad():
        x.copy_(x0)
    with config.override(sinkhorn_graphs=False):
        eager = [(step(), x.detach().clone()) for _ in range(3)]
    for (rv, rx), (ev, ex) in zip(replayed, eager):
        assert torch.equal(rv, ev) and torch.equal(rx, ex)
    assert not torch.equal(eager[0][1], eager[2][1])      # the points moved


def test_threads_sharing_a_key_get_their_own_results():
    """Calls of one key from several threads: each gets the result of its own inputs."""
    import threading

    cache = CallGraphCache(graphs=FakeGraphs())

    def fn(options, t):
        return (t * options + t.sum(),)

    data = [torch.full((50,), float(i)) for i in range(8)]
    cache(fn, 2.0, (data[0],))
    cache(fn, 2.0, (data[0],))          # captured
    got, wrong = {}, []

    def worker(i):
        for _ in range(20):
            got[i] = cache(fn, 2.0, (data[i],))[0]
            if not torch.equal(got[i], fn(2.0, data[i])[0]):
                wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and len(got) == 8
    assert cache.graphs.replays >= 160


def test_a_failed_capture_warns_and_runs_eagerly():
    class Failing(FakeGraphs):
        def capture(self, step, state, device, *, copy=True):
            raise RuntimeError("operation not permitted when stream is capturing")

    cache = CallGraphCache(graphs=Failing())

    def fn(options, t):
        return (t + options,)

    cache(fn, 1.0, (torch.zeros(2),))
    with pytest.warns(RuntimeWarning, match="capturing it as a CUDA graph failed"):
        assert torch.equal(cache(fn, 1.0, (torch.zeros(2),))[0], torch.ones(2))
    assert torch.equal(cache(fn, 1.0, (torch.zeros(2),))[0], torch.ones(2))    # eager, no second warning
    assert len(cache) == 0


def test_value_checks_run_in_the_graph_and_raise_after_it(fake):
    """With diameter given the input checks are computed inside the solve (its graph) and
    read once after it: a bad input of a captured shape raises the eager call's ValueError."""
    loss = SamplesLoss(blur=0.3, diameter=6.0)
    x, y = _data()
    for _ in range(3):
        loss(x, y)
    assert fake.replays == 2
    bad = x.detach().clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        loss(bad, y)
    assert fake.replays == 3        # the replay computed the flags
    a = torch.full((30,), 1 / 30, dtype=F64)
    b = torch.full((25,), 1 / 25, dtype=F64)
    for _ in range(2):
        loss(a, x, b, y)
    a_bad = a.clone()
    a_bad[0] = -a_bad[0]
    with pytest.raises(ValueError, match="the weights a have negative entries"):
        loss(a_bad, x, b, y)
    with pytest.raises(ValueError, match="equal total masses"):
        loss(a, x, 2 * b, y)
    with config.override(sinkhorn_graphs=False), pytest.raises(ValueError, match="x contains NaN or inf"):
        loss(bad, y)                # the eager call: the same check, read after its solve
    batched = torch.stack([x.detach(), bad])
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        loss(batched, torch.stack([y.detach()] * 2))


def test_batched_and_weighted_calls_replay_the_eager_values(fake):
    """A batch (B, n, d) with given weights, gradients w.r.t. points and weights."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 2, dtype=F64, generator=gen).requires_grad_()
    y = (torch.randn(2, 15, 2, dtype=F64, generator=gen) + 0.5).requires_grad_()
    a = torch.rand(2, 20, dtype=F64, generator=gen) + 0.1
    b = torch.rand(2, 15, dtype=F64, generator=gen) + 0.1
    a = (a / a.sum(-1, keepdim=True)).requires_grad_()
    b = (b / b.sum(-1, keepdim=True)).requires_grad_()
    loss = SamplesLoss(blur=0.4, diameter=5.0)

    def run():
        value = loss(a, x, b, y)
        return (value.detach(), *torch.autograd.grad(value.sum(), (x, y, a, b)))

    with config.override(sinkhorn_graphs=False):
        eager = run()
    for _ in range(3):
        for got, want in zip(run(), eager):
            assert torch.equal(got, want)
    assert fake.replays == 4


# --------------------------------------------------------------------------
# sinkhorn(): its eps-scaling schedule as one cached graph (issue 17, item 5)
# --------------------------------------------------------------------------
@pytest.fixture
def fake_sinkhorn(monkeypatch):
    """``sinkhorn``'s schedule cache on the CPU stand-in graphs."""
    import importlib
    sinkhorn_module = importlib.import_module("otlinop.sinkhorn")    # the package re-exports the function
    cache = CallGraphCache(graphs=FakeGraphs())
    monkeypatch.setattr(sinkhorn_module, "SINKHORN_GRAPHS", cache)
    return cache


def _result(res):
    return (res.f, res.g, res.f_pre, res.g_pre, res.n_iter, res.marginal_error_history, res.status)


SINKHORN_CASES = {
    "refined": dict(blur=0.3),                                  # schedule, then checks to 1e-3
    "schedule only": dict(blur=0.3, threshold=float("inf")),
    "checks inside": dict(blur=0.2, check_every=3, threshold=1e-3),
    "unbalanced": dict(blur=0.3, reach=1.0),
    "triton": dict(blur=0.3, backend="triton", threshold=float("inf")),   # the interpreter: schedule only
}


@pytest.mark.parametrize("case", SINKHORN_CASES)
def test_sinkhorn_schedule_replays_the_eager_values(fake_sinkhorn, case):
    """Repeated sinkhorn calls with moving points (another diameter, the same schedule
    length): the first runs its schedule eagerly, the second captures it, later ones
    replay it; potentials, errors, steps and status are bitwise the eager ones."""
    from otlinop import sinkhorn
    options = SINKHORN_CASES[case]
    if options.get("backend") == "triton" and torch.cuda.is_available():
        pytest.skip("the Triton interpreter on CPU tensors (a GPU machine runs the compiled kernels: the GPU test)")
    x, y = (t.detach() for t in _data())
    if options.get("backend") == "triton":
        x, y = x.float(), y.float()
    counts = []
    for k in range(4):
        xk = x * (1.0 + 0.01 * k)
        got = _result(sinkhorn(xk, y, **options))
        with config.override(sinkhorn_graphs=False):
            expected = _result(sinkhorn(xk, y, **options))
        for g, e in zip(got, expected):
            assert torch.equal(g, e) if isinstance(g, torch.Tensor) else g == e
        counts.append((fake_sinkhorn.captures, fake_sinkhorn.replays))
    assert counts == [(0, 0), (1, 1), (1, 2), (1, 3)]


def test_sinkhorn_schedule_not_cached_for_warm_starts_callbacks_and_alternating(fake_sinkhorn):
    from otlinop import sinkhorn
    x, y = (t.detach() for t in _data())
    res = sinkhorn(x, y, blur=0.3)
    for _ in range(2):
        sinkhorn(x, y, blur=0.3, f0=res.f, g0=res.g)
        sinkhorn(x, y, blur=0.3, callback=lambda state: None)
        sinkhorn(x, y, eps=0.09, method="alternating")
    assert fake_sinkhorn.captures == 0 and fake_sinkhorn.replays == 0


@requires_cuda
@pytest.mark.parametrize("d", [3, 64])
def test_gpu_sinkhorn_schedule_replays_bitwise(d):
    """GPU: repeated sinkhorn calls on moving points replay their schedule's graph, with
    the eager results bitwise (potentials, errors, steps)."""
    import importlib
    from otlinop import sinkhorn
    cache = importlib.import_module("otlinop.sinkhorn").SINKHORN_GRAPHS
    cache.clear()
    # The counters add up over the process (clear() keeps them): compare this test's own.
    captures, replays = cache.captures, cache.replays
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3000, d, device="cuda", generator=gen)
    y = torch.randn(2500, d, device="cuda", generator=gen) + 0.5
    for k in range(4):
        xk = x * (1.0 + 1e-3 * k)
        got = _result(sinkhorn(xk, y, blur=0.1))
        with config.override(sinkhorn_graphs=False):
            expected = _result(sinkhorn(xk, y, blur=0.1))
        for g, e in zip(got, expected):
            assert torch.equal(g, e) if isinstance(g, torch.Tensor) else g == e, k
    assert (cache.captures - captures, cache.replays - replays) == (1, 3)
