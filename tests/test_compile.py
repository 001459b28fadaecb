"""``torch.compile`` of functions that call the Sinkhorn loss (issue 17, item 4).

Under compile the loss is the opaque custom ops of ``otlinop._loss_ops``:
``fullgraph=True`` (which raises at a graph break) compiles, the value and the
gradients equal the eager ones bitwise (the same kernels run in the ops), and
``torch._dynamo.explain`` reports no break. One compiled function per
variation; the file runs in about 40 s on one CPU core.
"""
import pytest
import torch

from conftest import requires_cuda
from otlinop.loss import SamplesLoss, sinkhorn_loss

F64 = torch.float64


def _data(batch=(), n=30, m=25, weights=False):
    x = torch.randn(*batch, n, 3, dtype=F64, requires_grad=True)
    y = (torch.randn(*batch, m, 3, dtype=F64) + 0.5).requires_grad_(True)
    if not weights:
        return (x, y)
    a = torch.rand(*batch, n, dtype=F64) + 0.5
    b = torch.rand(*batch, m, dtype=F64) + 0.5
    a = (a / a.sum(-1, keepdim=True)).requires_grad_(True)
    b = (b / b.sum(-1, keepdim=True)).requires_grad_(True)
    return (a, x, b, y)


CASES = {
    "balanced": (dict(), (), False),
    "reach": (dict(reach=1.0), (), True),
    "no debias": (dict(debias=False), (), False),
    "batched": (dict(), (2,), True),
    "diameter, converge always": (dict(diameter=5.0, converge="always"), (), False),
}


def _value_and_grads(fn, args):
    value = fn(*args)
    grads = torch.autograd.grad(value.sum(), args)
    return value, grads


@pytest.mark.parametrize("case", CASES)
def test_compiled_loss_equals_eager(case):
    """fullgraph compiles (no break), and the compiled value and gradients w.r.t. every
    input are bitwise the eager ones."""
    options, batch, weights = CASES[case]
    loss = SamplesLoss(blur=0.3, **options)
    args = _data(batch, weights=weights)
    compiled = torch.compile(loss, fullgraph=True)
    value, grads = _value_and_grads(compiled, args)
    value_e, grads_e = _value_and_grads(loss, args)
    assert value.shape == value_e.shape == batch
    assert torch.equal(value, value_e)
    for g, ge in zip(grads, grads_e):
        assert torch.equal(g, ge)
    # A second call with other data replays the compiled graph (no recompilation needed for equal shapes).
    args = _data(batch, weights=weights)
    value, grads = _value_and_grads(compiled, args)
    value_e, grads_e = _value_and_grads(loss, args)
    assert torch.equal(value, value_e) and all(torch.equal(g, ge) for g, ge in zip(grads, grads_e))


def test_compiled_functional_and_potentials():
    """sinkhorn_loss in a compiled function (with other tensor work around it), and
    potentials=True: equal to eager, the potentials shaped like the weights and detached."""
    x, y = _data()

    def step(x, y):
        return 2.0 * sinkhorn_loss(x, y, blur=0.3, reach=2.0) + (x ** 2).sum()

    def pots(x, y):
        return sinkhorn_loss(x, y, blur=0.3, potentials=True)

    value, grads = _value_and_grads(torch.compile(step, fullgraph=True), (x, y))
    value_e, grads_e = _value_and_grads(step, (x, y))
    assert torch.equal(value, value_e) and all(torch.equal(g, ge) for g, ge in zip(grads, grads_e))
    F, G = torch.compile(pots, fullgraph=True)(x, y)
    F_e, G_e = pots(x, y)
    assert F.shape == (30,) and G.shape == (25,) and not F.requires_grad
    assert torch.equal(F, F_e) and torch.equal(G, G_e)


def test_dynamic_shapes():
    """One compiled function with symbolic sizes serves other point counts (the fake
    functions give the shapes from the inputs)."""
    loss = SamplesLoss(blur=0.3)
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for n, m in ((30, 25), (41, 17)):
        args = _data(n=n, m=m)
        value, grads = _value_and_grads(compiled, args)
        value_e, grads_e = _value_and_grads(loss, args)
        assert torch.equal(value, value_e) and all(torch.equal(g, ge) for g, ge in zip(grads, grads_e))


def test_explain_reports_no_graph_break():
    loss = SamplesLoss(blur=0.3)
    x, y = _data()
    explanation = torch._dynamo.explain(lambda x, y: loss(x, y))(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_value_checks_run_inside_the_compiled_call():
    """The value checks moved into the forward op still raise under compile."""
    x, y = _data()
    bad = x.detach().clone()
    bad[2, 0] = float("nan")
    compiled = torch.compile(SamplesLoss(blur=0.3), fullgraph=True)
    with pytest.raises(Exception, match="SamplesLoss: x contains NaN"):
        compiled(bad, y)


def test_double_backward_through_compile_is_refused():
    """A compiled function's backward cannot be differentiated again (AOTAutograd);
    second order stays an eager feature: the backward with create_graph=True raises."""
    x, y = _data()
    compiled = torch.compile(SamplesLoss(blur=0.3), fullgraph=True)
    value = compiled(x, y)
    with pytest.raises(RuntimeError, match="create_graph|double backward"):
        (g,) = torch.autograd.grad(value, x, create_graph=True)
        torch.autograd.grad(g.sum(), x)
    # Dynamo alone (no AOTAutograd) records the ops' autograd: the gradient op's derivative raises.
    value = torch.compile(SamplesLoss(blur=0.3), fullgraph=True, backend="eager")(x, y)
    (g,) = torch.autograd.grad(value, x, create_graph=True)
    with pytest.raises(NotImplementedError, match="not implemented under torch.compile"):
        torch.autograd.grad(g.sum(), x)


@requires_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_triton_loss(mode, override):
    """GPU: the Triton backend under compile (and in reduce-overhead mode, CUDA graphs of
    the compiled region around the op) equals eager; fullgraph, float32, n = 2048."""
    override(check_finite=False)
    x = torch.randn(2048, 3, device="cuda", requires_grad=True)
    y = torch.randn(2048, 3, device="cuda") + 0.5
    loss = SamplesLoss(blur=0.05, diameter=8.0, backend="triton")

    def step(x, y):
        return loss(x, y)

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for _ in range(3):      # reduce-overhead records on the first calls, replays after
        value = compiled(x, y)
        (g,) = torch.autograd.grad(value, x)
    value_e = step(x, y)
    (g_e,) = torch.autograd.grad(value_e, x)
    torch.testing.assert_close(value, value_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(g, g_e, rtol=1e-5, atol=1e-7)
