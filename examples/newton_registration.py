"""
Newton registration with the OT Hessian and MINRES
==================================================

Register a deformed point cloud with damped Newton steps on the entropic OT
loss. The unknown is a displacement field ``D`` (n, d) of the source points
``x0``; the objective is

.. math::

    E(D) = \\mathrm{OT}_\\varepsilon(x_0 + D, y) + \\frac{\\mu}{2} \\langle D, L D \\rangle,

with ``L`` the graph Laplacian of the k-nearest-neighbour graph of ``x0``,
which asks for a smooth displacement. Its Hessian ``H_OT + mu L`` is symmetric
and indefinite away from the optimum (the OT Hessian has negative curvature
along the plan's "covariance" directions, docs/math.md section 7), so each
Newton step solves ``(H_OT + mu L + lam I) s = -grad E`` with MINRES (not
CG), with a Levenberg-Marquardt damping ``lam`` that shrinks after a
successful step and grows after a failed one. ``H_OT`` is
:func:`otlinop.loss_hessian_operator`: every MINRES iteration is one
Hessian-vector product (one inner Schur solve by preconditioned CG). The
extreme eigenvalues of ``H_OT`` before and after come from scipy's ``eigsh``
on ``H_OT.to_scipy()``.

**Cost convention:** ``C(x, y) = |x - y|^2`` (``otlinop.sinkhorn``'s default
``cost_scale=1``), ``eps = 0.05``, converged potentials (``method="alternating"``).

Run::

    python examples/newton_registration.py [--figures DIR] [--n N]

Default size: ``--n 60 --steps 12``. Measured on a 2-core CPU,
``OMP_NUM_THREADS=1``, torch 2.13, float64: 18 s with the machine otherwise
idle, 26 s while other jobs shared it; half of it in ``eigsh``, and the time
hardly depends on n at this size, where every product is a few small torch
calls. The documentation runs it with ``--n 40`` (18 s). The figure goes to
``DIR/newton_registration.png`` (default ``figures/``).
"""

import argparse
import math
import pathlib
import time

import matplotlib.pyplot as plt
import numpy as np
import scipy.sparse.linalg as sla
import torch

import otlinop
from otlinop.solvers import jacobi, minres

parser = argparse.ArgumentParser(description="Damped Newton registration of two point clouds with MINRES.")
parser.add_argument("--figures", default="figures", help="folder for the figure (default: %(default)s)")
parser.add_argument("--n", type=int, default=60, help="points per cloud (default: %(default)s)")
parser.add_argument("--steps", type=int, default=12, help="most Newton steps (default: %(default)s)")
args = parser.parse_args()

F64 = torch.float64
torch.set_num_threads(1)  # small dense problems: threads cost more than they give


# %%
# The problem
# -----------
# A thick open arc (a "C", which a rotation does not map onto itself), and a
# rotated, scaled and shifted copy of another sample of it.


def arc(n, gen):
    t = 1.6 * math.pi * torch.rand(n, dtype=F64, generator=gen) - 0.8 * math.pi
    r = 1.0 + 0.15 * torch.randn(n, dtype=F64, generator=gen)
    return torch.stack([r * torch.cos(t), r * torch.sin(t)], 1)


def knn_laplacian(x, k=6):
    """The symmetrised k-NN graph Laplacian of x, as a dense (n, n) tensor."""
    dist = torch.cdist(x, x)
    idx = dist.topk(k + 1, largest=False).indices[:, 1:]
    W = torch.zeros_like(dist).scatter_(1, idx, 1.0)
    W = torch.maximum(W, W.T)
    return torch.diag(W.sum(1)) - W


gen = torch.Generator().manual_seed(0)
n, d, eps, mu = args.n, 2, 0.05, 0.1
x0 = arc(n, gen)
angle = 0.5
R = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=F64)
y = 1.1 * arc(n, gen) @ R.T + torch.tensor([0.3, -0.2], dtype=F64)

# mu L acting on flattened (n, d) displacements, row-major: kron(L, I_d).
regulariser = otlinop.Dense(mu * torch.kron(knn_laplacian(x0), torch.eye(d, dtype=F64)), is_symmetric=True,
                            is_psd=True)
identity = otlinop.Identity(n * d, dtype=F64)
solve_options = dict(eps=eps, M=jacobi(), rtol=1e-9)


def evaluate(D, f0=None):
    res = otlinop.sinkhorn(x0 + D, y, eps=eps, method="alternating", threshold=1e-12, max_iter=20_000, f0=f0)
    energy = float(res.cost) + 0.5 * float(D.reshape(-1) @ (regulariser @ D.reshape(-1)))
    return res, energy


def extreme_eigenvalues(H):
    lo = sla.eigsh(H.to_scipy(), k=2, which="SA", tol=1e-4, return_eigenvectors=False)
    hi = sla.eigsh(H.to_scipy(), k=1, which="LA", tol=1e-4, return_eigenvectors=False)
    return np.sort(lo), float(hi[0])


def ot_hessian(res):
    return otlinop.loss_hessian_operator(res.x, res.y, res.f, res.g, a=res.a, b=res.b, **solve_options)


# %%
# Damped Newton steps
# -------------------
# Each step solves the damped Newton system with MINRES, preconditioned by the
# inverse of the positive definite part ``mu L + (c2 mean(P 1) + lam) I``.

start = time.perf_counter()
D = torch.zeros(n, d, dtype=F64)
res, energy = evaluate(D)
lo, hi = extreme_eigenvalues(ot_hessian(res))
print(f"n = {n}, d = {d}, eps = {eps}, mu = {mu}")
print(f"start: E = {energy:.6f}; OT Hessian eigenvalues: smallest {lo[0]:.4g}, {lo[1]:.4g}; largest {hi:.4g}")
print("step           E    |grad E|      lam  minres its  inner CG its  accepted")
history = [(0, energy, None)]
lam = 1.0
for step in range(1, args.steps + 1):
    G = otlinop.grad_x(res.x, res.y, res.f, res.g, eps=eps, a=res.a, b=res.b).reshape(-1)
    G = G + regulariser @ D.reshape(-1)
    history[-1] = (*history[-1][:2], float(G.norm()))
    if float(G.norm()) < 1e-8:
        break
    H = ot_hessian(res)
    while True:
        M = otlinop.Dense(torch.linalg.inv(regulariser.M + (2 * float(res.a.mean()) + lam)
                                           * torch.eye(n * d, dtype=F64)))
        newton = minres(H + regulariser + lam * identity, -G, rtol=1e-8, maxiter=200, M=M)
        D_trial = D + newton.x.reshape(n, d)
        res_trial, energy_trial = evaluate(D_trial, f0=res.f)
        accepted = energy_trial < energy
        print(f"{step:4d}  {energy:.8f}  {float(G.norm()):.3e}  {lam:7.1e}  {newton.n_iter:10d}  "
              f"{H.last_solve.n_iter:12d}  {'yes' if accepted else 'no'}")
        if accepted:
            D, res, energy = D_trial, res_trial, energy_trial
            history.append((step, energy, None))
            lam = max(lam / 4, 1e-6)
            break
        lam *= 4
H = ot_hessian(res)
lo, hi = extreme_eigenvalues(H)
print(f"end:   E = {energy:.8f}, |grad E| = {float(G.norm()):.1e}; OT Hessian eigenvalues: smallest "
      f"{lo[0]:.4g}, {lo[1]:.4g}; largest {hi:.4g}")
lo, _ = extreme_eigenvalues(H + regulariser)
print(f"       full Hessian H_OT + mu L: smallest eigenvalues {lo[0]:.4g}, {lo[1]:.4g} "
      f"({'a local minimum' if lo[0] > 0 else 'not a minimum'})")
print(f"mean displacement {D.mean(0).tolist()}, time {time.perf_counter() - start:.1f} s")

# %%
# The figure
# ----------
# The clouds before and after, and the gradient norm per accepted step.

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2))
moved = x0 + D
ax0.scatter(y[:, 0], y[:, 1], s=12, c="tab:blue", label="target y")
ax0.scatter(x0[:, 0], x0[:, 1], s=12, c="tab:gray", alpha=0.6, label="source x0")
ax0.scatter(moved[:, 0], moved[:, 1], s=12, marker="x", c="tab:red", label="registered x0 + D")
ax0.set_aspect("equal")
ax0.set_xlabel("first coordinate")
ax0.set_ylabel("second coordinate")
ax0.set_title("clouds")
ax0.legend(fontsize=8)
steps = [h[0] for h in history if h[2] is not None]
norms = [h[2] for h in history if h[2] is not None]
ax1.semilogy(steps, norms, "o-")
ax1.set_xlabel("Newton step (accepted)")
ax1.set_ylabel("|grad E|")
ax1.set_title("gradient norm")
fig.tight_layout()
out = pathlib.Path(args.figures)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "newton_registration.png", dpi=110)
print(f"figure saved to {out / 'newton_registration.png'}")
