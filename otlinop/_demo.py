"""The main job run by ``python -m otlinop``."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m otlinop", description=__doc__)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    import scipy.sparse.linalg as sla

    import otlinop

    print(f"otlinop {otlinop.__version__} on {device}")
    gen = torch.Generator().manual_seed(0)
    n = 200
    M = torch.randn(n, n, dtype=torch.float64, generator=gen).to(device) / n ** 0.5
    A = otlinop.Dense(M)
    S = A.T @ A + otlinop.Identity(n, dtype=torch.float64, device=device)
    print(f"S = A.T @ A + I: {S}")
    b = np.ones(n)
    t0 = time.perf_counter()
    x, info = sla.cg(S.to_scipy(), b, rtol=1e-10)
    res = np.linalg.norm(S.to_scipy() @ x - b) / np.linalg.norm(b)
    print(f"scipy cg through S.to_scipy(): info={info}, relative residual {res:.1e}, "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms")
    return 0 if info == 0 and res < 1e-8 else 1
