"""The main job run by ``python -m otlinop``.

Entropic optimal transport between two built-in 2-D point clouds (generated,
no downloads), on the GPU when present, else the CPU, in three parts:

1. the loss, GeomLoss' debiased Sinkhorn divergence (``SamplesLoss``), and its
   gradient with respect to the points;
2. the transport problem OT(x, y) solved to convergence (``sinkhorn``): its
   value, split into the transport cost <P, C> and the entropic term, and
   the marginal errors of the plan P;
3. second order: a solve with the Hessian of the dual problem
   (``cg(S, r, M=neumann(3))``) and a Hessian-vector product of OT(x, y)
   with respect to the points (``hvp_x``).

Every line says what was computed, on which device, with which kernels and
in how long; the last line gives the total time.
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


class _Clock:
    """Wall-clock time of a block, with the GPU's queued work included."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.ms = 1e3 * (time.perf_counter() - self.start)


def _seconds(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1e3:.1f} s"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m otlinop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("-n", type=int, default=None,
                        help="points per cloud (default: 20000 on a GPU, 500 on a CPU)")
    parser.add_argument("--blur", type=float, default=0.1,
                        help="length scale of the entropic blur, eps = blur^2 (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=1e-4,
                        help="L1 marginal error at which Sinkhorn stops (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    """Run the main job; return the exit status (0 when every step converged)."""
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.n or (20_000 if device.type == "cuda" else 500)
    dtype = torch.float32

    import otlinop
    from otlinop.kernels import DEFAULT_PRECISION
    from otlinop.solvers import cg, neumann

    from .kernels._dispatch import resolve_backend

    x, y = _clouds(n, device, dtype)
    backend = resolve_backend("python -m otlinop", None, x)
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
        kernels = (f"Triton kernels, precision {DEFAULT_PRECISION!r} (the default: dot products as accurate as "
                   "float32)" if backend == "triton" else "torch reference kernels (Triton is not installed)")
    else:
        where = f"CPU, {torch.get_num_threads()} torch thread(s)"
        kernels = "torch reference kernels, blockwise (Triton's kernels need a CUDA GPU)"
    eps = args.blur ** 2
    print(f"otlinop {otlinop.__version__}, torch {torch.__version__}")
    print(f"device:  {where}")
    if device.type == "cpu" and torch.get_num_threads() > 1:
        print(f"         (on a machine shared with other jobs, OMP_NUM_THREADS=1 python -m otlinop is often several "
              f"times faster than {torch.get_num_threads()} threads)")
    print(f"kernels: {kernels}; data in float32")
    print(f"data:    x = {n} points on a noisy circle, y = {n} points in two blobs, in 2-D, weights 1/{n} each")
    print(f"cost:    C(x, y) = |x - y|^2 / 2 (GeomLoss' p = 2 convention), entropic blur {args.blur}: "
          f"eps = blur^2 = {eps:g}")
    x.requires_grad_(True)

    print("\n1. The loss and its gradient (otlinop.SamplesLoss, a drop-in for geomloss.SamplesLoss)")
    loss_fn = otlinop.SamplesLoss("sinkhorn", p=2, blur=args.blur, debias=True)
    with _Clock(device) as clock:
        value = loss_fn(x, y)
        (grad,) = torch.autograd.grad(value, x)
    print(f"   loss S(x, y) = {value.item():.6f}: the debiased Sinkhorn divergence "
          "S = OT(x, y) - OT(x, x)/2 - OT(y, y)/2,")
    print("   which is >= 0 and 0 when the two clouds coincide (what you minimise to fit one cloud to another)")
    print(f"   gradient with respect to the points of x: norm {grad.norm().item():.4e}")
    print(f"   {_seconds(clock.ms)} for the loss and its gradient (GeomLoss' eps-scaling schedule: a fixed number "
          "of steps, no convergence check)")

    print("\n2. The transport problem OT(x, y) solved to convergence (otlinop.sinkhorn)")
    xd = x.detach()
    with _Clock(device) as clock:
        # GeomLoss' eps-scaling schedule (a fixed number of steps), then OTT-style
        # alternating updates warm-started from it until the marginal error is small.
        warm = otlinop.sinkhorn(xd, y, blur=args.blur, cost_scale=0.5, threshold=math.inf)
        res = otlinop.sinkhorn(xd, y, eps=warm.eps, cost_scale=0.5, method="alternating",
                               f0=warm.f, g0=warm.g, threshold=args.threshold, max_iter=20_000)
        P = res.plan
        ah, bh = P.row_sums(), P.col_sums()
        err_a = (ah - res.a).abs().sum().item()
        err_b = (bh - res.b).abs().sum().item()
        transport = res.transport_cost()   # <P, C>: one streaming pass, no n x m matrix
    ot_value = res.cost.item()
    print(f"   {warm.n_iter} eps-scaling steps, then {res.n_iter} alternating iterations at eps = {res.eps:g}: "
          f"{'converged' if res.converged else 'NOT converged'}, in {_seconds(clock.ms)}")
    print(f"   marginal errors of the plan P: |P 1 - a|_1 = {err_a:.1e}, |P.T 1 - b|_1 = {err_b:.1e} "
          f"(threshold {args.threshold:g})")
    print(f"   OT(x, y) = <a, f> + <b, g> = {ot_value:.6f}: the entropic transport value (res.cost; GeomLoss' "
          "value without debias, OTT's reg_ot_cost)")
    print(f"            = <P, C> {transport.item():.6f} (the transport cost alone, POT's sinkhorn2) "
          f"+ eps KL(P | a x b) {ot_value - transport.item():.6f}")
    print(f"   It is larger than the loss in 1.: the loss subtracts OT(x, x)/2 + OT(y, y)/2, the blur's "
          "bias, from OT(x, y).")

    print("\n3. Second order")
    S = res.hessian()  # HessianOperator: k_y Diag(P.T 1) - P.T Diag(1/(k_x P 1)) P
    rhs = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, S.dtype)
    rhs = rhs - rhs.mean()  # balanced S has the constants as null space: a consistent right-hand side
    with _Clock(device) as clock:
        sol = cg(S, rhs, rtol=1e-5, M=neumann(3))
    print(f"   S = the Schur complement of the dual problem's Hessian, {S.shape[0]} x {S.shape[1]}, never stored "
          "(each product streams the plan twice)")
    print(f"   cg(S, r, M=neumann(3)) solves S z = r: {sol.status}; {_seconds(clock.ms)}")
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    direction = direction.to(device, dtype)
    with _Clock(device) as clock:
        Hv, info = otlinop.hvp_x(xd, y, res.f, res.g, direction, eps=res.eps, a=res.a, b=res.b,
                                 cost_scale=res.cost_scale, solver=cg, M=neumann(3))
    curvature = (direction * Hv).sum().item()
    print(f"   Hessian-vector product H v of OT(x, y) with respect to the points of x, v a random direction: "
          f"|H v| = {Hv.norm().item():.4e};")
    print(f"   one Schur solve inside ({info.n_iter} CG iterations, {'converged' if info.converged else 'NOT '}"
          f"{'' if info.converged else 'converged'}); {_seconds(clock.ms)}")
    print(f"   <v, H v> = {curvature:.4e}", end="")
    if curvature < 0:
        print(": negative, as it may be. OT(x, y) is not convex in the points: its Hessian has a negative")
        print("   semi-definite part, -(1/eps) sum_j P_ij (x_i - y_j)(x_i - y_j)^T for point i (this cost), which wins")
        print("   along some directions (with two points, x1 - x2 is one; docs/math.md section 7). Not an error, but")
        print("   Newton steps with this Hessian need a solver for indefinite systems (minres), not cg.")
    else:
        print(": positive along this direction; OT(x, y) is not convex in the points, and other directions")
        print("   have negative curvature (docs/math.md section 7)")

    ok = (bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all()) and sol.converged and info.converged
          and res.converged)
    total = 1e3 * (time.perf_counter() - started)
    print(f"\ntotal time {_seconds(total)} on {where}" + ("" if ok else "; a step did not converge, see above"))
    print("ok" if ok else "FAILED: see above")
    return 0 if ok else 1
