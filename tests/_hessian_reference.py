"""Dense float64 references for the Hessian and HVP tests.

Independent of otlinop: a log-domain Sinkhorn loop, the dense plan, the dense
Schur complement, the Hessian of ``L = max Dual`` from autograd on the dual
(``D_tt - D_tp D_pp^+ D_pt``), and autograd through an unrolled Sinkhorn loop.
GeomLoss convention: ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``.
"""

import torch

F64 = torch.float64


def cost(x, y, c):
    return c * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def lam(reach, eps):
    return 1.0 if reach is None else reach ** 2 / (reach ** 2 + eps)


def k(reach, eps):
    return 1.0 / lam(reach, eps)


def _updates(x, y, a, b, eps, c, reach_x, reach_y):
    C = cost(x, y, c)
    la, lb = a.log(), b.log()
    lx, ly = lam(reach_x, eps), lam(reach_y, eps)

    def update_f(g):
        return -lx * eps * torch.logsumexp(lb[None, :] + (g[None, :] - C) / eps, dim=1)

    def update_g(f):
        return -ly * eps * torch.logsumexp(la[:, None] + (f[:, None] - C) / eps, dim=0)

    return update_f, update_g


def sinkhorn(x, y, a, b, eps, c=1.0, reach_x=None, reach_y=None, tol=1e-14, max_iter=200_000, f=None, g=None):
    """Alternating log-domain Sinkhorn to ``max |Delta f|, |Delta g| <= tol * scale``; returns (f, g)."""
    with torch.no_grad():
        update_f, update_g = _updates(x, y, a, b, eps, c, reach_x, reach_y)
        g = torch.zeros(y.shape[0], dtype=x.dtype) if g is None else g.clone()
        f = update_f(g) if f is None else f.clone()
        for it in range(max_iter):
            g_new = update_g(f)
            f_new = update_f(g_new)
            change = max(float((f_new - f).abs().max()), float((g_new - g).abs().max()))
            f, g = f_new, g_new
            if change <= tol * max(1.0, float(f.abs().max())):
                break
        else:
            raise RuntimeError(f"reference Sinkhorn did not converge (last change {change:.2e})")
    return f, g


def plan(x, y, f, g, a, b, eps, c=1.0):
    return a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - cost(x, y, c)) / eps)


def schur(x, y, f, g, a, b, eps, c=1.0, reach_x=None, reach_y=None, shift=0.0):
    P = plan(x, y, f, g, a, b, eps, c)
    ah, bh = P.sum(1), P.sum(0)
    kx, ky = k(reach_x, eps), k(reach_y, eps)
    return torch.diag(ky * bh + shift) - P.T @ torch.diag(1.0 / (kx * ah)) @ P


def grad(x, y, f, g, a, b, eps, c=1.0):
    """(grad_x, grad_y) of the loss at converged potentials."""
    P = plan(x, y, f, g, a, b, eps, c)
    return 2 * c * (P.sum(1)[:, None] * x - P @ y), 2 * c * (P.sum(0)[:, None] * y - P.T @ x)


def dual(f, g, x, y, a, b, eps, c=1.0, reach_x=None, reach_y=None):
    """GeomLoss' dual objective (balanced or unbalanced, generalized KL)."""
    def side(pot, w, reach):
        if reach is None:
            return (w * pot).sum()
        rho = reach ** 2
        return -rho * (w * (torch.exp(-pot / rho) - 1)).sum()
    P = plan(x, y, f, g, a, b, eps, c)
    return side(f, a, reach_x) + side(g, b, reach_y) - eps * (P - a[:, None] * b[None, :]).sum()


def loss_hessian(x, y, f, g, a, b, eps, c=1.0, reach_x=None, reach_y=None):
    """Dense Hessian of ``L(x, y) = max Dual`` over ``(x, y)`` (flattened, x first),
    from autograd on the dual: ``D_tt - D_tp D_pp^+ D_pt``."""
    n, m, d = x.shape[0], y.shape[0], x.shape[1]

    def fn(z):
        return dual(z[:n], z[n:n + m], z[n + m:n + m + n * d].reshape(n, d), z[n + m + n * d:].reshape(m, d),
                    a, b, eps, c, reach_x, reach_y)

    z = torch.cat([f, g, x.reshape(-1), y.reshape(-1)]).detach()
    Hz = torch.autograd.functional.hessian(fn, z)
    p, t = slice(0, n + m), slice(n + m, None)
    return Hz[t, t] - Hz[t, p] @ torch.linalg.pinv(Hz[p, p], hermitian=True, rtol=1e-12) @ Hz[p, t]


def unrolled_hvp(x, y, a, b, A, B, eps, c=1.0, reach_x=None, reach_y=None, iters=1000):
    """HVP by double backward through ``iters`` unrolled alternating Sinkhorn
    iterations, with the loss taken as the dual objective at the last iterate."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    update_f, update_g = _updates(x, y, a, b, eps, c, reach_x, reach_y)
    g = torch.zeros(y.shape[0], dtype=x.dtype)
    f = update_f(g)
    for _ in range(iters):
        g = update_g(f)
        f = update_f(g)
    L = dual(f, g, x, y, a, b, eps, c, reach_x, reach_y)
    gx, gy = torch.autograd.grad(L, (x, y), create_graph=True)
    Hx, Hy = torch.autograd.grad((gx * A).sum() + (gy * B).sum(), (x, y))
    return Hx, Hy


class Problem(dict):
    """A converged test problem; keys x, y, a, b, f, g, eps, c, reach_x, reach_y."""

    __getattr__ = dict.__getitem__

    def kwargs(self):
        """Keyword arguments of the otlinop Hessian functions."""
        return dict(eps=self.eps, a=self.a, b=self.b, cost_scale=self.c, reach_x=self.reach_x,
                    reach_y=self.reach_y)


_CACHE = {}


def problem(n=24, m=18, d=2, eps=0.5, c=1.0, reach_x=None, reach_y=None, weights="random", seed=0):
    """Gaussian clouds (y shifted by 0.5), converged to 1e-14; cached."""
    key = (n, m, d, eps, c, reach_x, reach_y, weights, seed)
    if key not in _CACHE:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, dtype=F64, generator=gen)
        y = torch.randn(m, d, dtype=F64, generator=gen) + 0.5
        if weights == "lognormal":  # about 3 decades
            a = torch.exp(1.3 * torch.randn(n, dtype=F64, generator=gen))
            b = torch.exp(1.3 * torch.randn(m, dtype=F64, generator=gen))
        elif weights == "uniform":
            a, b = torch.ones(n, dtype=F64), torch.ones(m, dtype=F64)
        else:
            a = 0.5 + torch.rand(n, dtype=F64, generator=gen)
            b = 0.5 + torch.rand(m, dtype=F64, generator=gen)
        a, b = a / a.sum(), b / b.sum()
        f, g = sinkhorn(x, y, a, b, eps, c, reach_x, reach_y)
        _CACHE[key] = Problem(x=x, y=y, a=a, b=b, f=f, g=g, eps=eps, c=c, reach_x=reach_x, reach_y=reach_y)
    return _CACHE[key]


def self_problem(n=20, d=2, eps=0.5, c=1.0, reach=None, seed=3):
    """The debiasing problem OT(a, a): x, a and the symmetric potential f."""
    key = ("self", n, d, eps, c, reach, seed)
    if key not in _CACHE:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, dtype=F64, generator=gen)
        a = 0.5 + torch.rand(n, dtype=F64, generator=gen)
        a = a / a.sum()
        f, g = sinkhorn(x, x, a, a, eps, c, reach, reach)
        _CACHE[key] = Problem(x=x, a=a, f=(f + g) / 2, eps=eps, c=c, reach=reach)
    return _CACHE[key]


def fd_hvp(p, A, B, h=1e-5):
    """Central finite differences of the analytic gradient (potentials re-solved
    to 1e-14 at each point) along (A, B); returns (Hx, Hy)."""
    def gradient(s):
        x, y = p.x + s * h * A, p.y + s * h * B
        f, g = sinkhorn(x, y, p.a, p.b, p.eps, p.c, p.reach_x, p.reach_y, f=p.f, g=p.g)
        return grad(x, y, f, g, p.a, p.b, p.eps, p.c)
    (gx1, gy1), (gx0, gy0) = gradient(1.0), gradient(-1.0)
    return (gx1 - gx0) / (2 * h), (gy1 - gy0) / (2 * h)


def fd_hvp_self(p, A, h=1e-5):
    """Central differences of the gradient of OT(x, x) / 2, i.e. (grad_x + grad_y) / 2 at y = x."""
    def gradient(s):
        x = p.x + s * h * A
        f, g = sinkhorn(x, x, p.a, p.a, p.eps, p.c, p.reach, p.reach, f=p.f, g=p.f)
        gx, gy = grad(x, x, f, g, p.a, p.a, p.eps, p.c)
        return (gx + gy) / 2
    return (gradient(1.0) - gradient(-1.0)) / (2 * h)


def rel(a, b):
    return float((a - b).norm() / b.norm())
