"""The main job run by ``python -m otlinop``.

Sinkhorn between two built-in point clouds (generated, no downloads): the
GeomLoss-style loss, its gradient, the final marginal error, and a
Hessian-vector product through ``cg(HessianOperator, rhs, M=neumann(3))``, on
the GPU when present, else the CPU.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def _clouds(n: int, device, dtype):
    """A noisy circle and a two-lobed cloud in 2-D (deterministic)."""
    gen = torch.Generator().manual_seed(0)
    t = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    x = torch.stack([torch.cos(t), torch.sin(t)], 1) + 0.05 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    lobe = (torch.rand(n, generator=gen) < 0.5).to(torch.float64)
    y = 0.3 * torch.randn(n, 2, generator=gen, dtype=torch.float64) + torch.stack([2 * lobe - 1, 0.5 + 0 * lobe], 1)
    return x.to(device, dtype), y.to(device, dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m otlinop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("-n", type=int, default=None, help="points per cloud (default 20000 on a GPU, 500 on CPU)")
    parser.add_argument("--blur", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=1e-4, help="marginal error at which Sinkhorn stops")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.n or (20_000 if device.type == "cuda" else 500)
    dtype = torch.float32

    import otlinop
    from solvers import cg, neumann

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"otlinop {otlinop.__version__}: two built-in clouds of {n} points in 2-D on {name}")
    x, y = _clouds(n, device, dtype)
    x.requires_grad_(True)

    # 1. The loss and its gradient (GeomLoss' SamplesLoss convention: cost |x-y|^2 / 2).
    loss_fn = otlinop.SamplesLoss("sinkhorn", p=2, blur=args.blur, debias=True)
    _sync(device)
    t0 = time.perf_counter()
    value = loss_fn(x, y)
    (grad,) = torch.autograd.grad(value, x)
    _sync(device)
    t_loss = time.perf_counter() - t0
    print(f"SamplesLoss(blur={args.blur}, debias=True) = {value.item():.6f}; "
          f"|grad_x| = {grad.norm().item():.4e}; {1e3 * t_loss:.1f} ms (loss + gradient)")

    # 2. Converged potentials for the same eps: GeomLoss' eps-scaling schedule
    #    (a fixed number of steps: threshold=inf), then OTT-style alternating updates warm-started
    #    from it until the marginal error is below the threshold.
    _sync(device)
    t0 = time.perf_counter()
    warm = otlinop.sinkhorn(x.detach(), y, blur=args.blur, cost_scale=0.5, threshold=math.inf)
    res = otlinop.sinkhorn(x.detach(), y, eps=warm.eps, cost_scale=0.5, method="alternating",
                           f0=warm.f, g0=warm.g, threshold=args.threshold, max_iter=20_000)
    P = res.plan
    err_a = (P.row_sums() - res.a).abs().sum().item()
    err_b = (P.col_sums() - res.b).abs().sum().item()
    _sync(device)
    print(f"sinkhorn: {warm.n_iter} eps-scaling steps, then {res.n_iter} alternating iterations at "
          f"eps={res.eps:.2e} (converged: {res.converged}); cost {res.cost.item():.6f}; final marginal errors "
          f"|P1-a|_1 = {err_a:.2e}, |P.T 1-b|_1 = {err_b:.2e}; {1e3 * (time.perf_counter() - t0):.1f} ms")

    # 3. A Hessian-vector product: the Schur complement S of the dual Hessian,
    #    solved by CG with a Neumann(3) preconditioner, then the HVP of the loss.
    S = res.hessian()  # HessianOperator: k_y Diag(P.T 1) - P.T Diag(1/(k_x P 1)) P
    rhs = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, S.dtype)
    rhs = rhs - rhs.mean()  # balanced S has the constants as null space: a consistent right-hand side
    _sync(device)
    t0 = time.perf_counter()
    sol = cg(S, rhs, rtol=1e-5, M=neumann(3))
    _sync(device)
    print(f"cg(S, rhs, M=neumann(3)) on S = {S.shape[0]}x{S.shape[1]}: {sol.status} "
          f"({sol.n_iter} iterations, {1e3 * (time.perf_counter() - t0):.1f} ms)")
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    direction = direction.to(device, dtype)
    _sync(device)
    t0 = time.perf_counter()
    Hv, info = otlinop.hvp_x(x.detach(), y, res.f, res.g, direction, eps=res.eps, a=res.a, b=res.b,
                             cost_scale=res.cost_scale, solver=cg, M=neumann(3))
    _sync(device)
    print(f"HVP of the OT loss w.r.t. x (cg + neumann(3), {info.n_iter} iterations): "
          f"|H v| = {Hv.norm().item():.4e}, <v, H v> = {(direction * Hv).sum().item():.4e}; "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms")
    ok = bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all()) and sol.converged and info.converged and res.converged
    print("ok" if ok else "FAILED: see above")
    return 0 if ok else 1
