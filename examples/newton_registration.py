"""Register a deformed point cloud with damped Newton steps on the entropic OT loss.

The unknown is a displacement field D (n, d) of the source points x0; the
objective is

    E(D) = OT_eps(x0 + D, y) + (mu / 2) <D, Lap D>,

with Lap the graph Laplacian of the k-nearest-neighbour graph of x0, which
asks for a smooth displacement. Its Hessian ``H_OT + mu Lap`` is symmetric and
indefinite away from the optimum (the OT Hessian has negative curvature along
the plan's "covariance" directions, docs/math.md section 7), so each Newton step
solves ``(H_OT + mu Lap + lam I) s = -grad E`` with MINRES (never CG), with a
Levenberg-Marquardt damping ``lam`` that shrinks after a successful step and
grows after a failed one. ``H_OT`` is ``otlinop.hvp.loss_hessian_operator``: every
MINRES iteration is one Hessian-vector product (one inner Schur solve by PCG).

The extreme eigenvalues of ``H_OT`` before and after come from scipy's
``eigsh`` on ``H_OT.to_scipy()``.

Run: ``python examples/newton_registration.py`` (CPU, float64, well under a minute).
"""

import math
import time

import numpy as np
import scipy.sparse.linalg as sla
import torch

from otlinop import Dense, Identity
from otlinop.hvp import grad_x, loss_hessian_operator
from otlinop.sinkhorn import sinkhorn
from solvers import jacobi, minres

F64 = torch.float64


def shape(n, gen):
    """n points on a thick, open arc (a 'C'), which a rotation does not map onto itself."""
    t = 1.6 * math.pi * torch.rand(n, dtype=F64, generator=gen) - 0.8 * math.pi
    r = 1.0 + 0.15 * torch.randn(n, dtype=F64, generator=gen)
    return torch.stack([r * torch.cos(t), r * torch.sin(t)], 1)


def knn_laplacian(x, k=6):
    """The symmetrised k-NN graph Laplacian of x, as a dense (n, n) tensor."""
    D = torch.cdist(x, x)
    idx = D.topk(k + 1, largest=False).indices[:, 1:]
    W = torch.zeros_like(D).scatter_(1, idx, 1.0)
    W = torch.maximum(W, W.T)
    return torch.diag(W.sum(1)) - W


def main():
    torch.set_num_threads(1)  # small problems: threads cost more than they give
    gen = torch.Generator().manual_seed(0)
    n, d, eps, mu = 60, 2, 0.05, 0.1
    x0 = shape(n, gen)
    angle = 0.5
    R = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=F64)
    y = 1.1 * shape(n, gen) @ R.T + torch.tensor([0.3, -0.2], dtype=F64)

    # mu Lap acting on flattened (n, d) displacements, row-major: kron(Lap, I_d).
    regulariser = Dense(mu * torch.kron(knn_laplacian(x0), torch.eye(d, dtype=F64)), is_symmetric=True,
                        is_psd=True)
    identity = Identity(n * d, dtype=F64)
    solve_options = dict(eps=eps, M=jacobi(), rtol=1e-9)

    def evaluate(D, f0=None):
        res = sinkhorn(x0 + D, y, eps=eps, method="alternating", threshold=1e-12, max_iter=20_000, f0=f0)
        energy = float(res.cost) + 0.5 * float(D.reshape(-1) @ (regulariser @ D.reshape(-1)))
        return res, energy

    def extreme_eigenvalues(H):
        lo = sla.eigsh(H.to_scipy(), k=2, which="SA", tol=1e-6, return_eigenvectors=False)
        hi = sla.eigsh(H.to_scipy(), k=1, which="LA", tol=1e-6, return_eigenvectors=False)
        return np.sort(lo), float(hi[0])

    def ot_hessian(res):
        return loss_hessian_operator(res.x, res.y, res.f, res.g, a=res.a, b=res.b, **solve_options)

    start = time.perf_counter()
    D = torch.zeros(n, d, dtype=F64)
    res, energy = evaluate(D)
    lo, hi = extreme_eigenvalues(ot_hessian(res))
    print(f"n = {n}, d = {d}, eps = {eps}, mu = {mu}")
    print(f"start: E = {energy:.6f}; OT Hessian eigenvalues: smallest {lo[0]:.4g}, {lo[1]:.4g}; largest {hi:.4g}")
    print("step           E    |grad E|      lam  minres its  inner CG its  accepted")
    lam = 1.0
    for step in range(1, 13):
        G = grad_x(res.x, res.y, res.f, res.g, eps=eps, a=res.a, b=res.b).reshape(-1)
        G = G + regulariser @ D.reshape(-1)
        if float(G.norm()) < 1e-8:
            break
        H = ot_hessian(res)
        while True:
            # Preconditioner: the inverse of the SPD part regulariser + (c2 mean(ah) + lam) I (dense, small).
            M = Dense(torch.linalg.inv(regulariser.M + (2 * float(res.a.mean()) + lam) * torch.eye(n * d, dtype=F64)))
            newton = minres(H + regulariser + lam * identity, -G, rtol=1e-8, maxiter=200, M=M)
            D_trial = D + newton.x.reshape(n, d)
            res_trial, energy_trial = evaluate(D_trial, f0=res.f)
            accepted = energy_trial < energy
            print(f"{step:4d}  {energy:.8f}  {float(G.norm()):.3e}  {lam:7.1e}  {newton.n_iter:10d}  "
                  f"{H.last_solve.n_iter:12d}  {'yes' if accepted else 'no'}")
            if accepted:
                D, res, energy = D_trial, res_trial, energy_trial
                lam = max(lam / 4, 1e-6)
                break
            lam *= 4
    H = ot_hessian(res)
    lo, hi = extreme_eigenvalues(H)
    print(f"end:   E = {energy:.8f}, |grad E| = {float(G.norm()):.1e}; OT Hessian eigenvalues: smallest "
          f"{lo[0]:.4g}, {lo[1]:.4g}; largest {hi:.4g}")
    lo, _ = extreme_eigenvalues(H + regulariser)
    print(f"       full Hessian H_OT + mu Lap: smallest eigenvalues {lo[0]:.4g}, {lo[1]:.4g} "
          f"({'a local minimum' if lo[0] > 0 else 'not a minimum'})")
    print(f"mean displacement {D.mean(0).tolist()}, time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
