"""
Gradient flow of one point cloud onto another
=============================================

The source points ``x`` follow ``dx/dt = -grad_x S(x, y) / a`` with ``S`` the
debiased Sinkhorn divergence of :class:`otlinop.SamplesLoss`, explicit Euler
steps. Dividing by the weights ``a = 1/n`` turns each gradient into a
displacement field that does not depend on n.

**Cost convention:** ``C(x, y) = |x - y|^2 / 2``, GeomLoss' ``p = 2`` (the
default of ``SamplesLoss``), with ``eps = blur^2``.

Run::

    python examples/gradient_flow.py [--figures DIR] [--n N] [--steps K] [--device cuda]

Default size: ``--n 400 --steps 30``. Measured on a 2-core CPU,
``OMP_NUM_THREADS=1``, torch 2.13: 5 s for the whole script with the machine
otherwise idle, 8 s while other jobs shared it. The documentation runs it with
``--n 200 --steps 12`` (3 s). The figure goes to ``DIR/gradient_flow.png``
(default ``figures/``).
"""

import argparse
import math
import pathlib
import time

import matplotlib.pyplot as plt
import torch

import otlinop

parser = argparse.ArgumentParser(description="Wasserstein gradient flow of a 2-D point cloud onto another.")
parser.add_argument("--figures", default="figures", help="folder for the figure (default: %(default)s)")
parser.add_argument("--n", type=int, default=400, help="points per cloud (default: %(default)s)")
parser.add_argument("--steps", type=int, default=30, help="Euler steps (default: %(default)s)")
parser.add_argument("--lr", type=float, default=0.1, help="Euler step size (default: %(default)s)")
parser.add_argument("--blur", type=float, default=0.02,
                    help="final length scale of the loss, eps = blur^2 (default: %(default)s)")
parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
parser.add_argument("--seed", type=int, default=0, help="random seed of the clouds (default: %(default)s)")
args = parser.parse_args()
device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# %%
# Two clouds
# ----------
# The source is two interleaved half circles, the target a noisy ring, both
# in the unit square.


def two_moons(n, gen):
    t = math.pi * torch.rand(n, generator=gen)
    upper = torch.rand(n, generator=gen) < 0.5
    u = torch.where(upper, torch.cos(t), 1.0 - torch.cos(t))
    v = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([u, v], dim=1) + 0.05 * torch.randn(n, 2, generator=gen)
    return 0.25 * pts + torch.tensor([0.28, 0.45])


def ring(n, gen):
    t = 2 * math.pi * torch.rand(n, generator=gen)
    r = 0.25 + 0.02 * torch.randn(n, generator=gen)
    return torch.stack([0.5 + r * torch.cos(t), 0.5 + r * torch.sin(t)], dim=1)


gen = torch.Generator().manual_seed(args.seed)
x = two_moons(args.n, gen).to(device)
y = ring(args.n, gen).to(device)

# %%
# The flow
# --------
# Each step evaluates the loss and its gradient. The gradient comes from the
# final potentials (never by backpropagating through the iterations), so a
# step costs one Sinkhorn solve and one streaming pass.
#
# Both clouds stay in the unit square, so the diameter is given: it fixes the
# eps schedule (by default it is measured on the moving points at every
# call), and on a GPU every step after the second replays the loss's cached
# CUDA graphs instead of launching its few hundred kernels one by one.

loss = otlinop.SamplesLoss("sinkhorn", p=2, blur=args.blur, scaling=0.7, diameter=math.sqrt(2.0))
x = x.clone().requires_grad_(True)
a = 1.0 / args.n
keep = {round(k * args.steps / 4) for k in range(5)}
frames, values = [], []
start = time.perf_counter()
for step in range(args.steps + 1):
    value = loss(x, y)
    values.append(float(value.detach()))
    if step in keep:
        frames.append((step, x.detach().cpu().clone()))
    if step == args.steps:
        break
    (grad,) = torch.autograd.grad(value, x)
    with torch.no_grad():
        x -= args.lr * grad / a
elapsed = time.perf_counter() - start
print(f"{args.steps} steps, n = {args.n}, in {elapsed:.1f} s on {device}; "
      f"Sinkhorn divergence S(x, y): {values[0]:.3e} at the start, {values[-1]:.3e} at the end")

# %%
# The figure
# ----------
# Five snapshots of the particles over the target, and the divergence along
# the flow.

fig, axes = plt.subplots(1, len(frames) + 1, figsize=(3.2 * (len(frames) + 1), 3.4))
target = y.cpu()
for ax, (step, pts) in zip(axes, frames):
    ax.scatter(target[:, 0], target[:, 1], s=3, c="tab:blue", alpha=0.35, label="target y")
    ax.scatter(pts[:, 0], pts[:, 1], s=3, c="tab:red", label="x(t)")
    ax.set_title(f"step {step}")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("first coordinate")
    ax.set_ylabel("second coordinate")
axes[0].legend(loc="lower left", fontsize=7, markerscale=3)
axes[-1].semilogy(values)
axes[-1].set_xlabel("Euler step")
axes[-1].set_ylabel("S(x(t), y)")
axes[-1].set_title("Sinkhorn divergence")
fig.suptitle(f"Gradient flow with otlinop.SamplesLoss (n = {args.n}, blur = {args.blur}, {device})")
fig.tight_layout()
out = pathlib.Path(args.figures)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "gradient_flow.png", dpi=110)
print(f"figure saved to {out / 'gradient_flow.png'}")
