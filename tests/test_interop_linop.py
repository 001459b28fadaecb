"""The GPyTorch bridge ``A.to_linear_operator()`` (otlinop._interop_linop):
gradients through linear_operator's functions, indexing, batches, dtype
conversion, pickling, opaque operators. linear_operator's own test cases run
in tests/test_linear_operator_suite.py."""

import math
import pickle

import pytest
import torch

from otlinop import BlockOperator, Dense, Diag, Identity, LinearOperator, Zero
from otlinop.hessian import DualHessianOperator, HessianOperator
from otlinop.plan import PlanOperator

import _hessian_reference as ref

linear_operator = pytest.importorskip("linear_operator")

from otlinop._interop_linop import OtlinopLinearOperator, operator_on, operator_tensors  # noqa: E402

F64 = torch.float64

# linear_operator's interpolation (behind slice indexing) builds sparse tensors without invariant checks.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning")


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def crand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(seed))


def spd(n, seed=0):
    Q, _ = torch.linalg.qr(rand(n, n, seed=seed))
    return (Q * torch.linspace(1.0, 10.0, n, dtype=F64)) @ Q.T


class _Opaque(LinearOperator):
    """An operator without the _parts hooks: its data stays invisible to the bridge."""

    def __init__(self, M):
        super().__init__(M.shape, M.dtype, M.device, is_symmetric=True)
        self.M = M

    def _matmat(self, V):
        return self.M @ V


class _NoAdjoint(LinearOperator):
    def __init__(self, M):
        super().__init__(M.shape, M.dtype, M.device)
        self.M = M

    def _matmat(self, V):
        return self.M @ V


def _hessian_problem():
    p = ref.problem(n=12, m=10, eps=0.5, reach_x=1.0, reach_y=1.0, seed=3)
    a, b = 5.0 * p.a, 5.0 * p.b

    def dense(x, y, f, g):
        return ref.schur(x, y, f, g, a, b, p.eps, p.c, p.reach_x, p.reach_y)

    def operator(x, y, f, g):
        return HessianOperator(x, y, f, g, eps=p.eps, a=a, b=b, cost_scale=p.c, reach_x=p.reach_x,
                               reach_y=p.reach_y, ridge=0.0)

    return p, dense, operator


# ------------------------------------------------------- gradients (GPyTorch style)
_MAKERS = {
    "dense": lambda M: Dense(M, is_psd=True),
    "diag": lambda d: Diag(d),
    "sum": lambda X, d: Dense(X).T @ Dense(X) + Diag(d),
}


def _tensors_of(kind):
    return {"dense": [spd(7, seed=1)], "diag": [torch.linspace(0.5, 3.0, 7, dtype=F64)],
            "sum": [rand(9, 7, seed=2), torch.linspace(0.5, 3.0, 7, dtype=F64)]}[kind]


def _bridge_and_dense(kind):
    """GPyTorch style: the bridge, with requires_grad_ on its representation; and leaf copies of
    the same tensors with the dense matrix built from them."""
    make, tensors = _MAKERS[kind], _tensors_of(kind)
    L = make(*[t.clone() for t in tensors]).to_linear_operator().requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    return L, L.representation()[1:], make(*leaves).to_dense(), leaves


@pytest.mark.parametrize("kind", ["dense", "diag", "sum"])
def test_inv_quad_logdet_backward_matches_dense(kind):
    L, tensors, K, leaves = _bridge_and_dense(kind)
    rhs = rand(7, 3, seed=3)
    inv_quad, logdet = L.inv_quad_logdet(inv_quad_rhs=rhs, logdet=True)     # Cholesky at this size
    inv_quad_ref = (rhs * torch.linalg.solve(K, rhs)).sum()
    logdet_ref = torch.linalg.slogdet(K)[1]
    torch.testing.assert_close(inv_quad, inv_quad_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-10, atol=0)
    (inv_quad + logdet).backward()
    (inv_quad_ref + logdet_ref).backward()
    for t, t_ref in zip(tensors, leaves):
        torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "diag", "sum"])
def test_inv_quad_logdet_backward_through_cg_matches_dense(kind):
    # No Cholesky: linear_operator's CG and Lanczos quadrature, and their backward through the
    # bridge's representation (_bilinear_derivative rebuilds the operator on detached copies).
    L, tensors, K, leaves = _bridge_and_dense(kind)
    rhs = rand(7, 2, seed=5)
    with linear_operator.settings.max_cholesky_size(0):
        with linear_operator.settings.cg_tolerance(1e-11):
            inv_quad = L.inv_quad(rhs)
        with linear_operator.settings.num_trace_samples(2000), linear_operator.settings.cg_tolerance(1e-6):
            _, logdet = L.inv_quad_logdet(logdet=True)
    inv_quad_ref = (rhs * torch.linalg.solve(K, rhs)).sum()
    logdet_ref = torch.linalg.slogdet(K)[1]
    torch.testing.assert_close(inv_quad, inv_quad_ref, rtol=1e-8, atol=0)
    grads = torch.autograd.grad(inv_quad, tensors)
    grads_ref = torch.autograd.grad(inv_quad_ref, leaves, retain_graph=True)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-10)
    # The log det is a stochastic estimate (2000 probes): a few percent, its gradient too.
    assert abs(logdet.item() - logdet_ref.item()) < 0.03 * abs(logdet_ref.item()) + 0.03
    grads = torch.autograd.grad(logdet, tensors)
    grads_ref = torch.autograd.grad(logdet_ref, leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert float((g - g_ref).norm() / g_ref.norm()) < 0.1


def test_gradients_reach_tensors_the_operator_was_built_from():
    # GPyTorch builds its operators from parameters: no requires_grad_ on the bridge needed.
    W = rand(6, 6, seed=6).requires_grad_(True)
    L = Dense(W @ W.T + torch.eye(6, dtype=F64)).to_linear_operator()
    rhs = rand(6, 2, seed=7)
    with linear_operator.settings.max_cholesky_size(0), linear_operator.settings.cg_tolerance(1e-12):
        iq = L.inv_quad(rhs)
    iq.backward()
    W2 = W.detach().clone().requires_grad_(True)
    K = W2 @ W2.T + torch.eye(6, dtype=F64)
    (rhs * torch.linalg.solve(K, rhs)).sum().backward()
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-7, atol=1e-10)


def test_hessian_gradients_to_points_and_potentials():
    p, dense, operator = _hessian_problem()
    tensors = [p.x.clone(), p.y.clone(), p.f.clone(), p.g.clone()]
    L = operator(*tensors).to_linear_operator()
    L.requires_grad_(True)                  # after construction: the marginals are rebuilt with a graph
    v = rand(10, 2, seed=8)
    ((L @ v).square().sum() + L.to_dense().sum() + torch.diagonal(L, dim1=-2, dim2=-1).sum()).backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    K = dense(*leaves)
    ((K @ v).square().sum() + K.sum() + K.diagonal().sum()).backward()
    for t, t_ref in zip(tensors, leaves):
        torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-8, atol=1e-12)


def test_hessian_inv_quad_logdet_through_cg():
    p, dense, operator = _hessian_problem()
    x = p.x.clone().requires_grad_(True)
    L = operator(x, p.y, p.f, p.g).to_linear_operator()
    rhs = rand(10, 2, seed=9)
    with linear_operator.settings.max_cholesky_size(0), linear_operator.settings.cg_tolerance(1e-12):
        iq = L.inv_quad(rhs)
    iq.backward()
    x2 = p.x.clone().requires_grad_(True)
    K = dense(x2, p.y, p.f, p.g)
    iq_ref = (rhs * torch.linalg.solve(K, rhs)).sum()
    iq_ref.backward()
    torch.testing.assert_close(iq, iq_ref, rtol=1e-8, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-10)


def test_transpose_of_a_symmetric_dense_differentiates_its_entries():
    # A symmetric Dense is its own .T in otlinop; the bridge's transpose uses M.T all the same,
    # so the gradient w.r.t. M's entries is the dense one (not its transpose).
    M = spd(5, seed=10).requires_grad_(True)
    lhs = rand(3, 5, seed=11)
    (lhs @ Dense(M).to_linear_operator()).square().sum().backward()
    M2 = M.detach().clone().requires_grad_(True)
    (lhs @ M2).square().sum().backward()
    torch.testing.assert_close(M.grad, M2.grad)


def test_operator_without_tensors_works_without_grad():
    M = spd(5, seed=12)
    L = _Opaque(M).to_linear_operator()
    assert len(L.representation()) == 1           # the dtype anchor only
    v = rand(5, 2, seed=13)
    torch.testing.assert_close(L @ v, M @ v)
    L.requires_grad_(True)
    torch.testing.assert_close(linear_operator.solve(L, v), torch.linalg.solve(M, v), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.diagonal(L, dim1=-2, dim2=-1), M.diagonal())


# ------------------------------------------------------------- the protocol
def test_representation_is_the_distinct_tensors():
    X, d = rand(6, 4, seed=14), torch.rand(4, dtype=F64)
    A = Dense(X).T @ Dense(X) + 2.0 * Diag(d) + Identity(4, dtype=F64)
    assert [id(t) for t in operator_tensors(A)] == [id(X), id(d)]
    L = A.to_linear_operator()
    assert [id(t) for t in L.representation()[1:]] == [id(X), id(d)]
    assert L.operator is A


def test_rebuild_keeps_adjoint_pairs_and_symmetry():
    X, d = rand(6, 4, seed=15), torch.rand(6, dtype=F64) + 0.5
    D = Dense(X)
    A = D.T @ Diag(d) @ D
    assert A.is_psd
    B = operator_on(A, [X.clone(), d.clone()], dtype=F64, device="cpu")
    assert B.is_psd and B is not A
    v = rand(4, seed=16)
    torch.testing.assert_close(B @ v, A @ v)
    with pytest.raises(ValueError, match="built from 2 tensors, got 1"):
        operator_on(A, [X], dtype=F64, device="cpu")


def _dual_hessian_problem():
    p = ref.problem(n=8, m=6, eps=0.5, reach_x=1.0, reach_y=None, seed=4)

    def dense(x, y, f, g, a, b):
        P = ref.plan(x, y, f, g, a, b, p.eps, p.c)
        kx, ky = ref.k(p.reach_x, p.eps), ref.k(p.reach_y, p.eps)
        return torch.cat([torch.cat([torch.diag(kx * P.sum(1)), P], 1), torch.cat([P.T, torch.diag(ky * P.sum(0))], 1)])

    def operator(x, y, f, g, a, b):
        return DualHessianOperator(PlanOperator(x, y, f, g, eps=p.eps, a=a, b=b, cost_scale=p.c), eps=p.eps,
                                   reach_x=p.reach_x, reach_y=p.reach_y)

    return p, dense, operator, [p.x, p.y, p.f, p.g, p.a, p.b]


def _dual_hessian():
    _, _, operator, tensors = _dual_hessian_problem()
    return operator(*tensors)


#: One operator of each class (and each way the merged algebra builds one): the rebuild on copies of
#: its tensors must be the same operator.
_EVERY_CLASS = {
    "Dense": lambda: Dense(rand(5, 4, seed=40)),
    "Diag complex": lambda: Diag(crand(4, seed=41)),
    "AdjointOperator": lambda: Dense(rand(5, 4, seed=42)).H,
    "TransposeOperator complex": lambda: Dense(crand(5, 4, seed=43)).H.T,
    "CastOperator (adjoint of a mixed sum)":
        lambda: (Dense(rand(4, 4, seed=44).float()) + Dense(rand(4, 4, seed=45))).H,
    "ProductOperator mixed real-complex": lambda: Dense(rand(3, 4, seed=46)) @ Dense(crand(4, 4, seed=47)),
    "SumOperator with a fixed Identity": lambda: Dense(rand(4, 4, seed=48)) + Identity(4, dtype=torch.float32),
    "SumOperator with an adapting Zero": lambda: Zero((5, 4)) - Dense(rand(5, 4, seed=49)),
    "ScaledOperator complex": lambda: (2 - 1j) * Dense(rand(4, 4, seed=50)),
    "ScaledOperator tensor": lambda: torch.tensor(3.0, dtype=F64) * Diag(torch.rand(4, dtype=F64)),
    "PowerOperator": lambda: Dense(spd(4, seed=51), is_psd=True) ** 3,
    "BlockOperator": lambda: BlockOperator([[Diag(torch.rand(3, dtype=F64) + 1.0), Dense(rand(3, 2, seed=52))],
                                            [Dense(rand(3, 2, seed=52)).T, None]]),
    "DualHessianOperator": _dual_hessian,
}


@pytest.mark.parametrize("name", list(_EVERY_CLASS))
def test_every_operator_class_rebuilds_itself(name):
    A = _EVERY_CLASS[name]()
    old = operator_tensors(A)
    assert old, "each of these is built from tensors"
    new = [t.clone() for t in old]
    B = operator_on(A, new, dtype=A.dtype, device=A.device)
    assert B is not A and type(B) is type(A)
    assert (B.shape, B.dtype, B.is_symmetric, B.is_psd, B.adapts_dtype) == \
        (A.shape, A.dtype, A.is_symmetric, A.is_psd, A.adapts_dtype)
    assert [id(t) for t in operator_tensors(B)] == [id(t) for t in new]
    torch.testing.assert_close(B.to_dense(), A.to_dense())
    if A.has_adjoint:
        torch.testing.assert_close(B.H.to_dense(), A.to_dense().mH)


@pytest.mark.parametrize("name", [n for n in _EVERY_CLASS if "complex" not in n])
def test_every_real_operator_class_converts_with_its_tensors(name):
    A = _EVERY_CLASS[name]()
    L = A.to_linear_operator().float()
    assert L.operator.dtype == torch.float32 and L.operator.adapts_dtype == A.adapts_dtype
    torch.testing.assert_close(L.to_dense(), A.to_dense().float(), rtol=1e-5, atol=1e-5)


def test_rebuild_keeps_the_adjoint_pair_of_a_sum():
    # S.H is a new SumOperator (not an AdjointOperator): the rebuild makes it the rebuilt S's adjoint.
    S = Dense(rand(6, 4, seed=53)) + Dense(rand(6, 4, seed=54))
    A = S.H @ S
    assert A.is_psd
    B = operator_on(A, [t.clone() for t in operator_tensors(A)], dtype=F64, device="cpu")
    assert B.is_psd
    torch.testing.assert_close(B.to_dense(), A.to_dense())


def test_mixed_dtypes_rebuild_convert_and_differentiate():
    # float32 data in a float64 congruence: the float32 part computes in float32 (a CastOperator).
    X32, Y = rand(6, 4, seed=55).float(), rand(6, 4, seed=56)
    S = Dense(X32.clone().requires_grad_(True)) + Dense(Y.clone().requires_grad_(True))
    L = (S.H @ S).to_linear_operator()
    assert L.dtype == F64 and [t.dtype for t in L.representation()[1:]] == [torch.float32, F64]
    assert L.detach().operator.is_psd
    assert L.float().operator.dtype == torch.float32 and L.double().operator.dtype == F64
    rhs = rand(4, 2, seed=57)
    with linear_operator.settings.max_cholesky_size(0), linear_operator.settings.cg_tolerance(1e-6):
        iq = L.inv_quad(rhs)
    gX, gY = torch.autograd.grad(iq, L.representation()[1:])
    Xr, Yr = X32.double().requires_grad_(True), Y.clone().requires_grad_(True)
    K = (Xr + Yr).T @ (Xr + Yr)
    gX_ref, gY_ref = torch.autograd.grad((rhs * torch.linalg.solve(K, rhs)).sum(), (Xr, Yr))
    assert gX.dtype == torch.float32
    torch.testing.assert_close(gX.double(), gX_ref, rtol=1e-4, atol=1e-6)   # float32 products
    torch.testing.assert_close(gY, gY_ref, rtol=1e-4, atol=1e-6)


def test_adapting_operators_take_the_bridge_dtype():
    L = Identity(3).to_linear_operator()
    assert L.dtype == torch.get_default_dtype()
    D = L.double()
    assert D.operator.dtype == F64 and D.to_dense().dtype == F64
    torch.testing.assert_close(D @ torch.ones(3, dtype=F64), torch.ones(3, dtype=F64))
    S = (2.0 * Identity(3) + Zero(3)).to_linear_operator().half()
    assert S.operator.dtype == torch.float16
    torch.testing.assert_close(S.to_dense(), 2 * torch.eye(3, dtype=torch.float16))


def test_block_and_dual_hessian_gradients():
    # BlockOperator: gradients reach its blocks' tensors.
    d, X = torch.rand(3, dtype=F64) + 1.0, rand(3, 2, seed=58)
    L = BlockOperator([[Diag(d), Dense(X)], [Dense(X).T, None]]).to_linear_operator().requires_grad_(True)
    v = rand(5, 2, seed=59)
    (L @ v).square().sum().backward()
    d2, X2 = d.detach().clone().requires_grad_(True), X.detach().clone().requires_grad_(True)
    K = torch.cat([torch.cat([torch.diag(d2), X2], 1), torch.cat([X2.T, torch.zeros(2, 2, dtype=F64)], 1)])
    (K @ v).square().sum().backward()
    dl, Xl = L.representation()[1:]
    torch.testing.assert_close(dl.grad, d2.grad)
    torch.testing.assert_close(Xl.grad, X2.grad)
    # DualHessianOperator: requires_grad_ after construction, so its diagonal blocks (the plan's
    # marginals) are derived again with a graph.
    _, dense, operator, tensors = _dual_hessian_problem()
    L = operator(*[t.clone() for t in tensors]).to_linear_operator().requires_grad_(True)
    v = rand(14, 2, seed=60)
    ((L @ v).square().sum() + L.to_dense().sum()).backward()
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    K = dense(*leaves)
    ((K @ v).square().sum() + K.sum()).backward()
    for t, t_ref in zip(L.representation()[1:], leaves):
        torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------- complex operators
def test_complex_products_transpose_index_and_differentiate_through_matmul():
    M, v, u = crand(5, 4, seed=61), crand(4, seed=62), crand(5, 3, seed=63)
    L = Dense(M.clone()).to_linear_operator()
    torch.testing.assert_close(L @ v, M @ v)
    torch.testing.assert_close(L.mT @ u, M.T @ u)          # linear_operator's mT: no conjugation
    torch.testing.assert_close(u.mT @ L, u.mT @ M)
    torch.testing.assert_close(L.mT.to_dense(), M.T)
    rows, cols = torch.tensor([0, 1, 4]), torch.tensor([3, 0, 2])
    torch.testing.assert_close(L[rows, cols], M[rows, cols])
    torch.testing.assert_close(L[torch.zeros(4, dtype=torch.long), torch.arange(4)], M[0])   # through A.T
    torch.testing.assert_close(L.mT[cols, rows], M.T[cols, rows])
    torch.testing.assert_close(torch.diagonal(Dense(M[:4]).to_linear_operator(), dim1=-2, dim2=-1), M[:4].diagonal())
    # matmul and to_dense differentiate through torch's autograd, for the operator's tensor and the rhs.
    Ml, vl = M.clone().requires_grad_(True), v.clone().requires_grad_(True)
    L = Dense(Ml).to_linear_operator()
    ((L @ vl).abs().square().sum() + L.to_dense().real.sum()).backward()
    Mr, vr = M.clone().requires_grad_(True), v.clone().requires_grad_(True)
    ((Mr @ vr).abs().square().sum() + Mr.real.sum()).backward()
    torch.testing.assert_close(Ml.grad, Mr.grad)
    torch.testing.assert_close(vl.grad, vr.grad)


def test_complex_gradients_through_linear_operator_functions_are_a_clear_error():
    Q = crand(4, 4, seed=64)
    H = (Q @ Q.mH + 4 * torch.eye(4, dtype=torch.complex128)).requires_grad_(True)
    L = Dense(H, is_psd=True).to_linear_operator()
    x = linear_operator.solve(L, crand(4, 2, seed=65))      # the forward runs (Cholesky at this size)
    with pytest.raises(NotImplementedError, match="differentiate real tensors only"):
        x.abs().sum().backward()


def test_conversion_that_breaks_the_promotion_is_a_clear_error():
    # .double() converts the real tensors only: a float64 part then promotes the complex64 sum.
    A = Dense(rand(3, 3, seed=66).float()) + Diag(crand(3, seed=67).to(torch.complex64))
    with pytest.raises(TypeError, match="rebuilt as torch.complex128 .* expected torch.complex64"):
        A.to_linear_operator().double()


# ------------------------------------------------------------ tensor protocol
def test_tensor_indexing():
    X = rand(7, 5, seed=17)
    L = Dense(X).to_linear_operator()
    rows, cols = torch.tensor([0, 0, 1, 6]), torch.tensor([0, 4, 1, 2])
    torch.testing.assert_close(L[rows, cols], X[rows, cols])
    torch.testing.assert_close(L[rows[:, None], cols[None, :]], X[rows[:, None], cols[None, :]])
    torch.testing.assert_close(linear_operator.to_dense(L[rows, :]), X[rows, :])
    torch.testing.assert_close(L.mT[cols, rows], X.T[cols, rows])


def test_diagonal_falls_back_to_the_generic_one():
    X, d = rand(8, 5, seed=18), torch.rand(5, dtype=F64)
    A = Dense(X).T @ Dense(X) + Diag(d)
    with pytest.raises(NotImplementedError):
        A.diagonal()
    L = A.to_linear_operator()
    torch.testing.assert_close(torch.diagonal(L, dim1=-2, dim2=-1), (X * X).sum(0) + d)


def test_unsqueeze_adds_a_batch_dimension():
    M = spd(4, seed=19)
    L = Dense(M).to_linear_operator()
    U = torch.unsqueeze(L, -3)
    assert U.shape == (1, 4, 4)
    torch.testing.assert_close(U.to_dense(), M.unsqueeze(0))
    S = torch.squeeze(U, -3)
    assert S.shape == (4, 4)
    with pytest.raises(ValueError, match="Can only unsqueeze batch dimensions"):
        L.unsqueeze(-1)


def test_batches_are_copies_of_the_operator():
    X = rand(4, 3, seed=20)
    L = Dense(X).to_linear_operator()
    B = L.expand(2, 5, 4, 3)
    assert B.shape == (2, 5, 4, 3) and B.batch_shape == (2, 5)
    torch.testing.assert_close(B.to_dense(), X.expand(2, 5, 4, 3))
    rhs = rand(5, 3, 2, seed=21)                 # broadcast against the batch
    torch.testing.assert_close(B @ rhs, X @ rhs.expand(2, 5, 3, 2))
    torch.testing.assert_close(L @ rhs, X @ rhs)   # a batched rhs on a 2-D operator
    torch.testing.assert_close(B.mT @ rand(4, seed=22), (X.T @ rand(4, seed=22)).expand(2, 5, 3))
    torch.testing.assert_close(B[1, 2:4].to_dense(), X.expand(2, 5, 4, 3)[1, 2:4])
    torch.testing.assert_close(torch.sum(B, -3).to_dense(), 5 * X.expand(2, 4, 3))
    torch.testing.assert_close(B.repeat(3, 1, 1, 1).to_dense(), X.expand(6, 5, 4, 3))
    torch.testing.assert_close(B.permute(1, 0, 2, 3).to_dense(), X.expand(5, 2, 4, 3))
    with pytest.raises(RuntimeError, match="cannot expand batch shape"):
        B._expand_batch(torch.Size([2, 3]))
    with pytest.raises(NotImplementedError, match="no matrix-free form"):
        torch.prod(B, -3)


def test_batched_gradients_sum_over_the_copies():
    M = spd(4, seed=23)
    L = Dense(M).to_linear_operator().expand(3, 4, 4).requires_grad_(True)
    (M_leaf,) = L.representation()[1:]
    rhs = rand(3, 4, 2, seed=24)
    (L @ rhs).sum().backward()
    torch.testing.assert_close(M_leaf.grad, torch.ones(3, 4, 2, dtype=F64).matmul(rhs.mT).sum(0))


@pytest.mark.parametrize("convert", [lambda L: L.double(), lambda L: L.to(torch.float64),
                                     lambda L: L.type(torch.float64)])
def test_dtype_conversion_converts_the_operator(convert):
    X = torch.randn(5, 4)
    A = Dense(X).T @ Dense(X) + Identity(4)          # float32, Identity included
    L = convert(A.to_linear_operator())
    assert L.dtype == F64 and L.operator.dtype == F64
    v = torch.randn(4, dtype=F64)
    torch.testing.assert_close(L @ v, (X.double().T @ X.double() + torch.eye(4, dtype=F64)) @ v)
    assert L.half().operator.dtype == torch.float16


def test_dtype_conversion_of_an_opaque_operator_is_a_clear_error():
    L = _Opaque(spd(3, seed=25)).to_linear_operator()
    with pytest.raises(TypeError, match="cannot move <_Opaque 3x3 torch.float64.*to torch.float32.*does not "
                                        "expose its tensors"):
        L.float()
    assert L.double().dtype == F64                   # no conversion needed: fine


def test_rhs_of_another_dtype_is_a_clear_error():
    L = Dense(spd(3, seed=26)).to_linear_operator()
    with pytest.raises(TypeError, match=r"A @ rhs: rhs has dtype torch.float32, expected torch.float64"):
        L._matmul(torch.ones(3, 1))


def test_transpose_needs_an_adjoint():
    L = _NoAdjoint(rand(3, 4, seed=27)).to_linear_operator()
    torch.testing.assert_close(L @ torch.ones(4, dtype=F64), rand(3, 4, seed=27).sum(1))
    with pytest.raises(NotImplementedError, match="has no adjoint"):
        L.mT


@pytest.mark.parametrize("kind", ["sum", "hessian"])
def test_pickle_round_trip(kind):
    if kind == "sum":
        X = rand(5, 4, seed=28)
        A = Dense(X).T @ Dense(X) + Diag(torch.rand(4, dtype=F64))
    else:
        p, _, operator = _hessian_problem()
        A = operator(p.x, p.y, p.f, p.g)
    L = A.to_linear_operator().expand(2, *A.shape)
    _ = L.to_dense()
    M = pickle.loads(pickle.dumps(L))
    assert isinstance(M, OtlinopLinearOperator) and M.shape == L.shape
    torch.testing.assert_close(M.to_dense(), L.to_dense())
