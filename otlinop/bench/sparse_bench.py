"""``python -m otlinop.bench sparse``: sparse products, triangular solves and a differentiable Poisson solve.

Three tables, each measured in one run on one device:

1. ``SparseOperator @ V`` against ``torch.sparse.mm`` on the same CSR
   tensor (forward), and forward + backward (gradients w.r.t. the values
   and V) against torch's own autograd through ``torch.sparse.mm`` and
   torchsparsegradutils' ``sparse_mm`` when it is installed; the matrix is
   the 2-D five-point Laplacian on a g x g grid (g = 2000 on a GPU: 4M
   rows, 20M entries).
2. The sparse triangular solve ``solvers.spsolve_triangular`` (torch's own
   solve, and the level schedule) against torchsparsegradutils'
   ``sparse_triangular_solve`` and the dense ``torch.linalg.solve_triangular``
   (the last only where the dense matrix fits), forward and forward +
   backward, on the IC(0) factor of the Laplacian.
3. The acceptance run of issue 22: ``solve(A, b, "cg", M=ichol0(A))`` in
   float64 on the g x g Laplacian, then the gradient of ``<c, x>`` w.r.t.
   A's values by the implicit solve: factorisation time, iterations of the
   forward and adjoint solves, times, peak memory against the matrix's own
   storage (CSR: values, column indices and row pointers). On the CPU the
   run is in a fresh subprocess and its memory is the peak resident set
   (``VmHWM``, reset after the matrix is built; large allocations are
   mmapped so that freed memory is returned); on a GPU, the allocator's
   peak. Default grid: 1000 on a GPU and with ``--poisson-grid 1000`` on
   the CPU (the acceptance: about 5 minutes on 2 cores), 100 otherwise.

Times are medians (CUDA events on a GPU). Without a GPU the sizes are tiny
and the figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

from . import timing


def poisson_2d(g: int, *, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The five-point Laplacian on a g x g grid (Dirichlet): a CSR tensor of shape (g^2, g^2),
    4 on the diagonal and -1 for each neighbour, int64 indices, rows in natural order."""
    n = g * g
    idx = torch.arange(n, device=device)
    i, j = idx // g, idx % g
    # Per row, the neighbours in column order: up, left, centre, right, down.
    offsets = (-g, -1, 0, 1, g)
    valid = (i > 0, j > 0, torch.ones_like(i, dtype=torch.bool), j < g - 1, i < g - 1)
    counts = sum(v.to(torch.int64) for v in valid)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=crow[1:])
    nnz = int(crow[-1])
    col = torch.empty(nnz, dtype=torch.int64, device=device)
    values = torch.empty(nnz, dtype=dtype, device=device)
    slot = crow[:-1].clone()
    for off, v in zip(offsets, valid):
        rows = torch.nonzero(v).flatten()
        col[slot[rows]] = rows + off
        values[slot[rows]] = 4.0 if off == 0 else -1.0
        slot[rows] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


def csr_bytes(A: torch.Tensor) -> int:
    """Storage of a CSR tensor: values, column indices and row pointers."""
    return sum(t.numel() * t.element_size() for t in (A.values(), A.col_indices(), A.crow_indices()))


def _tsgu():
    try:
        import torchsparsegradutils
    except ImportError:
        return None
    return torchsparsegradutils


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------
# 1. products
# --------------------------------------------------------------------------
def product_table(g: int, ks, dtypes, device) -> None:
    from otlinop import SparseOperator

    tsgu = _tsgu()
    print(f"\n### SparseOperator @ V against torch.sparse.mm: five-point Laplacian, g = {g} "
          f"({g * g} rows, {5 * g * g - 4 * g} entries), ms (medians)\n")
    print("| dtype | k | torch.sparse.mm | SparseOperator @ V | ratio | fwd+bwd: torch autograd | "
          "fwd+bwd: SparseOperator | fwd+bwd: torchsparsegradutils |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        A = poisson_2d(g, dtype=dtype, device=device)
        values = A.values().clone().requires_grad_(True)
        A_leaf = A.detach().clone().requires_grad_(True)
        op = SparseOperator(A)
        op_grad = SparseOperator.from_pattern(op.pattern, values)
        for k in ks:
            V = torch.randn(g * g, k, dtype=dtype, device=device)
            Vg = V.clone().requires_grad_(True)
            t_torch = timing.bench(lambda: torch.sparse.mm(A, V))
            t_ours = timing.bench(lambda: op @ V)

            def with_grad(product):
                # A leaf sparse tensor: torch's backward through torch.sparse_csr_tensor(..., values) would
                # form the dense gradient whatever the product does.
                return lambda: torch.autograd.grad(product(A_leaf, Vg).sum(), (A_leaf, Vg))

            cells = [_maybe(with_grad(torch.sparse.mm)),
                     _maybe(lambda: torch.autograd.grad((op_grad @ Vg).sum(), (values, Vg)))]
            cells.append(_maybe(with_grad(tsgu.sparse_mm)) if tsgu is not None else "not installed")
            print(f"| {str(dtype)[6:]} | {k} | {t_torch:.3f} | {t_ours:.3f} | {t_ours / t_torch:.2f} | "
                  + " | ".join(cells) + " |", flush=True)
        del A, A_leaf, op, op_grad, values


def _maybe(fn) -> str:
    """The median time of fn as a cell, or why it failed (torch's own backward may run out of memory)."""
    try:
        return f"{timing.bench(fn):.3f}"
    except (RuntimeError, MemoryError) as err:   # noqa: PERF203 - report and go on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:60]}"


# --------------------------------------------------------------------------
# 2. triangular solves
# --------------------------------------------------------------------------
def triangular_table(grids, k: int, dtypes, device, dense_limit: int) -> None:
    from solvers import ichol0, spsolve_triangular
    from solvers.sparse import CSRPattern
    from solvers.triangular import TriangularSolver

    tsgu = _tsgu()
    print(f"\n### Sparse triangular solve L X = B (L: the IC(0) factor of the g x g Laplacian), k = {k}, ms\n")
    print("spsolve_triangular checks and reads its input at each call; the level schedule's analysis (once per "
          "pattern: a kept TriangularSolver) is timed apart.\n")
    print("| dtype | g | n | levels | analysis | spsolve_triangular (torch's solve) | level schedule | "
          "torchsparsegradutils | dense solve_triangular | fwd+bwd: ours (torch's) | fwd+bwd: ours (levels) | "
          "fwd+bwd: torchsparsegradutils | fwd+bwd: dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for g in grids:
            n = g * g
            L = ichol0(poisson_2d(g, dtype=dtype, device=device)).L
            values = L.values().clone().requires_grad_(True)
            B = torch.randn(n, k, dtype=dtype, device=device)
            Bg = B.clone().requires_grad_(True)
            pattern = CSRPattern(L.crow_indices(), L.col_indices(), L.shape)
            _sync(device)
            t0 = time.perf_counter()
            levels = TriangularSolver(pattern, lower=True, method="levels", dtype=dtype)
            count = levels.levels
            levels.solve(L.values(), B)
            levels.solve(L.values(), B, adjoint=True)
            _sync(device)
            analysis = f"{1e3 * (time.perf_counter() - t0):.1f}"

            L_leaf = L.detach().clone().requires_grad_(True)     # what torchsparsegradutils differentiates

            fwd = [_maybe(lambda: spsolve_triangular(L, B, method="native")),
                   _maybe(lambda: levels.solve(L.values(), B)),
                   _maybe(lambda: tsgu.sparse_triangular_solve(L, B, upper=False)) if tsgu else "not installed"]
            Ld = None
            if n <= dense_limit:
                Ld = L.to_dense()
                Ldg = Ld.clone().requires_grad_(True)
                fwd.append(_maybe(lambda: torch.linalg.solve_triangular(Ld, B, upper=False)))
            else:
                fwd.append(f"n > {dense_limit}")

            def grads(fn, wrt):
                return lambda: torch.autograd.grad(fn().sum(), (wrt, Bg))

            fb = [_maybe(grads(lambda: spsolve_triangular(L_leaf, Bg, method="native"), L_leaf)),
                  _maybe(grads(lambda: levels.apply(values, Bg), values)),
                  _maybe(grads(lambda: tsgu.sparse_triangular_solve(L_leaf, Bg, upper=False), L_leaf)) if tsgu
                  else "not installed"]
            if Ld is not None:
                fb.append(_maybe(lambda: torch.autograd.grad(
                    torch.linalg.solve_triangular(Ldg, Bg, upper=False).sum(), (Ldg, Bg))))
            else:
                fb.append(f"n > {dense_limit}")
            print(f"| {str(dtype)[6:]} | {g} | {n} | {count} | {analysis} | " + " | ".join(fwd + fb) + " |",
                  flush=True)
            del L, L_leaf, values, B, Bg, Ld, levels


# --------------------------------------------------------------------------
# 3. the Poisson acceptance run
# --------------------------------------------------------------------------
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def poisson_run(g: int, *, device="cpu", rtol: float = 1e-8, memory: str = "none") -> dict:
    """cg + IC(0) on the g x g Laplacian in float64, then d<c, x>/d values by the implicit solve.

    ``memory``: "rss" (CPU: peak resident set after the matrix is built,
    through /proc/self/status; run it in a fresh process), "cuda" (the
    allocator's peak) or "none". Returns the figures as a dict.
    """
    import gc

    from otlinop import SparseOperator
    from solvers import ichol0, solve

    A = poisson_2d(g, device=device)
    storage = csr_bytes(A)
    values = A.values().clone().requires_grad_(True)
    op = SparseOperator.from_pattern(SparseOperator(A).pattern, values, is_psd=True)
    del A
    n = g * g
    gen = torch.Generator(device=device).manual_seed(0)
    b = torch.rand(n, dtype=torch.float64, device=device, generator=gen)
    c = torch.rand(n, dtype=torch.float64, device=device, generator=gen)
    gc.collect()
    if memory == "rss":
        with open("/proc/self/clear_refs", "w") as fh:    # resets VmHWM to the current RSS
            fh.write("5")
        base = _status_mib("VmRSS")
    elif memory == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20

    def peak():
        if memory == "rss":
            return _status_mib("VmHWM") - base
        if memory == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20 - base
        return float("nan")

    t0 = time.perf_counter()
    M = ichol0(op)
    _sync(device)
    t_factor = time.perf_counter() - t0
    peak_factor = peak()
    counted = _Counting(M)
    t0 = time.perf_counter()
    res = solve(op, b, "cg", M=counted, rtol=rtol, maxiter=20 * g)
    _sync(device)
    t_solve = time.perf_counter() - t0
    forward_applications = counted.applications
    t0 = time.perf_counter()
    (c * res.x).sum().backward()
    _sync(device)
    t_grad = time.perf_counter() - t0
    grad = values.grad
    return dict(grid=g, n=n, nnz=int(values.numel()), storage_mib=storage / 2**20, factor_s=t_factor,
                factor_method=M.method, nnz_L=M.pattern.nnz, iterations=int(res.n_iter), converged=bool(res.converged),
                solve_s=t_solve, adjoint_iterations=counted.applications - forward_applications - 1,
                gradient_s=t_grad, grad_shape=list(grad.shape), grad_finite=bool(torch.isfinite(grad).all()),
                peak_factor_mib=peak_factor, peak_mib=peak(), memory=memory, device=str(device))


class _Counting:
    """A preconditioner that counts its applications (one per CG iteration, one at the start)."""

    def __init__(self, M):
        self._M = M
        self.applications = 0
        for name in ("shape", "dtype", "device", "is_symmetric", "is_psd", "why_not_definite"):
            setattr(self, name, getattr(M, name))

    def __matmul__(self, R):
        self.applications += 1
        return self._M @ R

    @property
    def H(self):
        return self

    T = H


def poisson_table(g: int, device) -> None:
    print(f"\n### cg + IC(0) on the {g} x {g} Laplacian (float64), gradient w.r.t. the values by the implicit "
          "solve\n")
    if torch.device(device).type == "cpu":
        code = (f"import json, torch; from otlinop.bench.sparse_bench import poisson_run; "
                f"print(json.dumps(poisson_run({g}, memory='rss')))")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")   # freed large blocks go back to the system
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"the run failed:\n```\n{out.stderr[-2000:]}\n```")
            return
        row = json.loads(out.stdout.strip().splitlines()[-1])
        how = "peak resident set of a fresh process, after the matrix is built"
    else:
        row = poisson_run(g, device=device, memory="cuda")
        how = "CUDA allocator's peak, after the matrix is built"
    print("| n | nnz | matrix MiB | IC(0) s | triangular solves | cg iterations | solve s | adjoint iterations | "
          "gradient s | peak MiB (IC(0)) | peak MiB (all) | peak / matrix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['n']} | {row['nnz']} | {row['storage_mib']:.1f} | {row['factor_s']:.2f} | {row['factor_method']} | "
          f"{row['iterations']}{'' if row['converged'] else ' (not converged)'} | {row['solve_s']:.1f} | "
          f"{row['adjoint_iterations']} | {row['gradient_s']:.1f} | {row['peak_factor_mib']:.0f} | "
          f"{row['peak_mib']:.0f} | {row['peak_mib'] / row['storage_mib']:.2f} |")
    print(f"\nmemory: {how}; the gradient has shape {tuple(row['grad_shape'])} (one entry per stored value), "
          f"finite: {row['grad_finite']}")


def build_parser() -> argparse.ArgumentParser:
    """The suite's command-line options (``python -m otlinop.bench sparse --help``)."""
    parser = argparse.ArgumentParser(prog="python -m otlinop.bench sparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=None, help="grid side of the product table (default 2000 "
                        "on a GPU, 60 on the CPU)")
    parser.add_argument("--ks", type=int, nargs="*", default=None, help="columns of V (default 1 8 32)")
    parser.add_argument("--tri-grids", type=int, nargs="*", default=None,
                        help="grid sides of the triangular-solve table (default 64 1000 on a GPU, 16 40 on the CPU)")
    parser.add_argument("--poisson-grid", type=int, default=None,
                        help="grid side of the Poisson run (default 1000 on a GPU, 100 on the CPU; 1000 is the "
                             "acceptance run); 0 skips it")
    return parser


def main(argv=None) -> int:
    """Run the suite (options: ``--help``); returns the exit status."""
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"device: {timing.device_name()}")
    if not cuda:
        print("(no GPU: tiny sizes on the CPU; these are not GPU figures)")
    dtypes = (torch.float32, torch.float64)
    product_table(args.grid or (2000 if cuda else 60), args.ks or [1, 8, 32], dtypes, device)
    triangular_table(args.tri_grids or ([64, 1000] if cuda else [16, 40]), 1, dtypes, device,
                     dense_limit=8192 if cuda else 2048)
    g = args.poisson_grid if args.poisson_grid is not None else (1000 if cuda else 100)
    if g:
        poisson_table(g, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
