"""``python -m otlinop.bench solvers``: the cost of one CG iteration against its parts.

A dense SPD float32 system (n = 4096 on the GPU; eigenvalues in about
[1e-3, 5], so CG is still far from converged after the iterations timed) with
k = 1 and k = 8 right-hand sides. Per iteration, measured in the same run:

- ``A @ P``: the matvec alone (``torch.mv`` for k = 1, ``torch.mm`` for k = 8);
- textbook step: the matvec plus the vector updates of an unmasked CG step
  (two column dots, three axpys, the step sizes), written directly in torch;
- ``solvers.cg``: ``(T(N2 iterations) - T(N1 iterations)) / (N2 - N1)`` with
  ``rtol = atol = 0`` so it runs exactly N iterations, with the default
  ``check_every`` (10 on the GPU) and with ``check_every = 1`` (a host sync
  per iteration).

The last column is ``solvers.cg`` over the textbook step: the price of the
per-column masks, status codes and their extra kernel launches.

A second table isolates the vector work of an iteration (dots, axpys, step
sizes, flags): CG on a diagonal operator (one elementwise product per
matvec), one right-hand side, n from 1k to 128k, eager and as a CUDA graph,
with the work as torch operations and with cg's fused single-program
kernels (``config.cg_fused``; for this table also beyond
``config.cg_fused_max_n``, to show where one program stops paying).

Times are medians (CUDA events through ``triton.testing.do_bench``); on a
CPU-only machine the system is smaller and the figures are not GPU figures
(the fused kernels need a GPU: both rows of the second table then run the
torch operations).
"""

from __future__ import annotations

import argparse

import torch

from solvers import config

from . import timing


def _system(n: int, k: int, dtype, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    G = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
    A = G @ G.T / n + 1e-3 * torch.eye(n, dtype=dtype, device=device)
    B = torch.randn(n, k, dtype=dtype, device=device, generator=gen)
    return A, B


def _textbook_step(A, B):
    """One unmasked CG step on state (x, r, p, rho), allocated once; returns a closure."""
    k = B.shape[1]
    x, r, p = torch.zeros_like(B), B.clone(), B.clone()
    rho = (r * r).sum(0)
    if k == 1:
        x, r, p, rho = x[:, 0], r[:, 0], p[:, 0], rho[0]

        def step():
            q = torch.mv(A, p)
            alpha = rho / torch.dot(p, q)
            x.addcmul_(p, alpha)
            r.addcmul_(q, alpha, value=-1)
            rho_new = torch.dot(r, r)
            p.mul_(rho_new / rho).add_(r)

        return step

    def step():
        q = torch.mm(A, p)
        alpha = rho / torch.linalg.vecdot(p, q, dim=0)
        x.addcmul_(p, alpha)
        r.addcmul_(q, alpha, value=-1)
        rho_new = torch.linalg.vecdot(r, r, dim=0)
        p.mul_(rho_new / rho).add_(r)

    return step


def _vector_table(ns, dtype, device, n1: int, n2: int, cg) -> None:
    """Per-iteration time of cg on Diag(d) (d in [1e-3, 1]: far from converged), torch ops against fused."""
    from otlinop import Diag

    print("\nvector work of an iteration: cg on a diagonal operator, one right-hand side, ms per iteration")
    print(f"(fused kernels used up to n = {config.cg_fused_max_n} by default; raised here)\n")
    print("| n | eager, torch ops | eager, fused | graph, torch ops | graph, fused | graph: fused / torch |")
    print("|---|---|---|---|---|---|")
    for n in ns:
        gen = torch.Generator(device=device).manual_seed(0)
        D = Diag(torch.logspace(-3, 0, n, dtype=dtype, device=device), psd=True)
        b = torch.randn(n, dtype=dtype, device=device, generator=gen)
        cells = []
        for graph in (False, True):
            for fused in (False, True):
                try:
                    with config.override(cg_fused=fused, cg_fused_max_n=max(n, config.cg_fused_max_n)):
                        cells.append(_per_iteration(
                            lambda it: cg(D, b, rtol=0.0, atol=0.0, maxiter=it, graph=graph), n1, n2))
                except Exception as err:   # noqa: BLE001 - the fused kernels' first GPU runs: report, go on
                    if not fused:
                        raise
                    cells.append(f"failed: {type(err).__name__}: {err}")
        ratio = f"{cells[3] / cells[2]:.2f}" if all(isinstance(c, float) for c in cells) else "-"
        print(f"| {n} | " + " | ".join(c if isinstance(c, str) else f"{c:.4f}" for c in cells) + f" | {ratio} |",
              flush=True)


#: What a cell says when T(n2) - T(n1) is not positive: the iterations cost less than the
#: timing noise of a call (tiny sizes, a busy CPU); a negative time would mean nothing.
BELOW_NOISE = "below noise"


def _per_iteration(fn_of_iters, n1: int, n2: int):
    """ms per iteration as ``(T(n2) - T(n1)) / (n2 - n1)``, or :data:`BELOW_NOISE` when not positive."""
    ms = (timing.bench(lambda: fn_of_iters(n2)) - timing.bench(lambda: fn_of_iters(n1))) / (n2 - n1)
    return ms if ms > 0 else BELOW_NOISE


def run(args, *, cg=None) -> int:
    """Run the suite with parsed ``args``; ``cg`` is the solver timed (default ``solvers.cg``)."""
    if cg is None:
        from solvers import cg

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    n = args.n or (4096 if cuda else 1024)
    n1, n2 = args.iters
    print(f"device: {timing.device_name()}")
    if not cuda:
        print(f"(no GPU: n = {n} on the CPU; these are not GPU figures)")
    print(f"dense SPD {args.dtype} system, n = {n}; solvers.cg per iteration from "
          f"(T({n2}) - T({n1})) / {n2 - n1}, medians\n")
    print("| n | k | A @ P ms | textbook step ms | cg ms/iter | cg ms/iter (check_every=1) | cg / textbook |")
    print("|---|---|---|---|---|---|---|")
    for k in args.ks:
        A, B = _system(n, k, dtype, device)
        b = B[:, 0].contiguous() if k == 1 else B
        P = b.clone()
        if k == 1:
            t_mv = timing.bench(lambda: torch.mv(A, P))
        else:
            t_mv = timing.bench(lambda: torch.mm(A, P))
        t_step = timing.bench(_textbook_step(A, B))

        def solve(iters, every=None):
            res = cg(A, b, rtol=0.0, atol=0.0, maxiter=iters, check_every=every)
            return res

        check = solve(n2)
        if check.n_iter != n2:
            print(f"warning: cg stopped after {check.n_iter} < {n2} iterations ({check.status}); "
                  "the per-iteration time below is not meaningful")
        t_cg = _per_iteration(solve, n1, n2)
        t_cg1 = _per_iteration(lambda it: solve(it, 1), n1, n2)
        cells = [c if isinstance(c, str) else f"{c:.4f}" for c in (t_cg, t_cg1)]
        ratio = f"{t_cg / t_step:.2f}" if isinstance(t_cg, float) else "-"
        print(f"| {n} | {k} | {t_mv:.4f} | {t_step:.4f} | {cells[0]} | {cells[1]} | {ratio} |", flush=True)
        del A, B, b, P
    _vector_table(args.vector_ns or ([1024, 8192, 32768, 131072] if cuda else [256, 2048]), dtype, device, n1, n2,
                  cg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The suite's command-line options (``python -m otlinop.bench solvers --help``)."""
    parser = argparse.ArgumentParser(prog="python -m otlinop.bench solvers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="system size (default 4096 on a GPU, 1024 on CPU)")
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 8],
                        help="numbers of right-hand sides (default: 1 8)")
    parser.add_argument("--vector-ns", type=int, nargs="*", default=None,
                        help="sizes of the vector-work table (default 1k to 128k on a GPU)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the systems (default: %(default)s)")
    parser.add_argument("--iters", type=int, nargs=2, default=[10, 60], metavar=("N1", "N2"),
                        help="iteration counts whose time difference gives the per-iteration time (default: 10 60)")
    return parser


def main(argv=None, *, cg=None) -> int:
    """Run the suite (options: ``--help``); returns the exit status.

    ``cg`` is the solver timed (default ``solvers.cg``); a test passes one that fails.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters[1] <= args.iters[0] or args.iters[0] < 1:
        parser.error("--iters N1 N2 needs 1 <= N1 < N2")
    return run(args, cg=cg)


if __name__ == "__main__":
    raise SystemExit(main())
