r"""A cost model of otlinop.distributed, and the scaling table it simulates.

``python -m otlinop.bench.scaling_model`` prints, as Markdown, the bytes
communicated and kernel launches per rank of a Sinkhorn iteration, a plan
product and a CG iteration of an HVP, as formulas in n, m, d, k and the
number of ranks R, for the two layouts (columns sharded:
``ShardedPlanOperator``; both clouds sharded, the other cloud's blocks passed
around a ring), then a simulated table of time per iteration from 1 to 64
GPUs. Nothing here is measured: the times come from single-GPU kernel rates
measured on an H100 (docs/benchmarks.md) and network figures that are
assumptions, every one of them a field of :class:`Assumptions`.
``docs/multi-gpu.md`` quotes the output, and a test checks that it is the
output of this module.

The model (α-β for collectives, with NCCL's tree latency and ring bandwidth):

- all-reduce of B bytes: ``2 ceil(log2 R) α + 2 (R - 1) / R · B / β``;
- all-gather of b bytes per rank: ``ceil(log2 R) α + (R - 1) b / β``;
- one ring step carrying b bytes: ``α + b / β``, overlapped with the pass on
  the block already there: a ring of R blocks takes
  ``t_block + (R - 1) max(t_block, α + b / β)``;
- a streaming pass over p point pairs takes ``c p`` (c from the measured
  single-GPU rates), plus the host's launch cost for every kernel.

R <= ``gpus_per_node`` runs over NVLink, a larger R over InfiniBand (its β
and α: a ring or tree through several nodes goes at the speed of the
inter-node links).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["Assumptions", "ASSUMPTIONS", "columns", "both", "markdown", "main"]


@dataclass(frozen=True)
class Assumptions:
    """Every number the simulated table rests on (SI units: seconds, bytes)."""

    #: Seconds per point pair of one soft-min (log-sum-exp) pass at d = 64, float32 inputs,
    #: otlinop's default tf32x3: 4.299 ms per symmetric Sinkhorn iteration (two passes) at
    #: n = m = 50k, measured on an H100 (docs/benchmarks.md, 2026-11-23, code e23a249).
    softmin_pair_s: float = 4.299e-3 / (2 * 50_000 ** 2)
    #: Seconds per point pair of one plan pass (P @ v, k = 1) at d = 64: the HVP with jacobi()
    #: and a CUDA graph, 54.5 ms for 53 CG iterations of two passes at n = m = 10k (H100,
    #: docs/benchmarks.md, 2026-11-23, code f492f4e). An upper bound: the time also holds the
    #: HVP's other passes and the CG vector work.
    plan_pair_s: float = 54.5e-3 / (53 * 2 * 10_000 ** 2)
    #: Bytes per value sent (float32).
    word: int = 4
    #: GPUs per node, joined by NVLink.
    gpus_per_node: int = 8
    #: NVLink 4 (H100 SXM): 450 GB/s per direction per GPU; NCCL's bus bandwidth taken as 80% of it.
    nvlink_bytes_per_s: float = 360e9
    #: Latency of one step of a collective inside a node (NCCL over NVLink).
    nvlink_latency_s: float = 5e-6
    #: One 400 Gb/s NDR InfiniBand adapter per GPU (50 GB/s), 80% of it reached.
    ib_bytes_per_s: float = 40e9
    #: Latency of one step of a collective between nodes (InfiniBand, GPUDirect RDMA).
    ib_latency_s: float = 10e-6
    #: Host cost of one kernel launch, counted in full (no CUDA graph over a process
    #: group: cg(graph=True) runs eagerly there; nothing hides it when the kernels are short).
    launch_s: float = 4e-6

    def link(self, R: int) -> tuple[float, float]:
        """(β, α) of a collective over R ranks."""
        if R <= self.gpus_per_node:
            return self.nvlink_bytes_per_s, self.nvlink_latency_s
        return self.ib_bytes_per_s, self.ib_latency_s

    def all_reduce(self, R: int, nbytes: float) -> float:
        if R == 1:
            return 0.0
        beta, alpha = self.link(R)
        return 2 * math.ceil(math.log2(R)) * alpha + 2 * (R - 1) / R * nbytes / beta

    def all_gather(self, R: int, nbytes_per_rank: float) -> float:
        if R == 1:
            return 0.0
        beta, alpha = self.link(R)
        return math.ceil(math.log2(R)) * alpha + (R - 1) * nbytes_per_rank / beta

    def ring(self, R: int, block_s: float, nbytes_per_step: float) -> float:
        """R passes of ``block_s`` each, the next block's transfer hidden behind the current pass."""
        if R == 1:
            return block_s
        beta, alpha = self.link(R)
        return block_s + (R - 1) * max(block_s, alpha + nbytes_per_step / beta)


ASSUMPTIONS = Assumptions()


@dataclass(frozen=True)
class Cost:
    """Per rank and per step: bytes sent, kernel launches, modelled seconds."""

    nbytes: float
    launches: int
    seconds: float


def _dots(R: int, k: int, count: int, A: Assumptions) -> tuple[float, float]:
    """``count`` inner products reduced over the group (ShardedInnerProduct): bytes, seconds."""
    return count * (R - 1) * k * A.word, count * A.all_gather(R, k * A.word)


def columns(op: str, n: int, m: int, d: int, k: int, R: int, A: Assumptions = ASSUMPTIONS) -> Cost:
    """The columns-sharded layout (``ShardedPlanOperator``; x replicated, m / R columns per rank).

    ``op``: "sinkhorn" (one iteration: the f update by ``row_softmin``, a pass
    and an all-gather of n values merged by ``merge_lse``; the g update, a local
    pass), "product" (``P @ V`` with k columns: a pass and an all-reduce of
    n k values; ``P.T @ U`` is local) or "cg" (one CG iteration of the HVP's
    Schur solve with jacobi(): ``S @ p`` is two passes and an all-reduce of
    n k values, plus three reduced inner products of k values).
    """
    w, pairs = A.word, n * m / R
    if op == "sinkhorn":
        nbytes = (R - 1) * n * w
        # 2 passes, 1 all-gather, merge_lse's loop over the R parts (max, then sub/exp/add each).
        launches = 2 + 1 + (R - 1) + 3 * R + 3
        seconds = 2 * A.softmin_pair_s * pairs + A.all_gather(R, n * w) + launches * A.launch_s
    elif op == "product":
        nbytes = 2 * (R - 1) / R * n * k * w
        launches = 2
        seconds = A.plan_pair_s * pairs + A.all_reduce(R, n * k * w) + launches * A.launch_s
    elif op == "cg":
        dot_bytes, dot_s = _dots(R, k, 3, A)
        nbytes = 2 * (R - 1) / R * n * k * w + dot_bytes
        # 2 passes, the all-reduce, S's diagonal terms (3), M (1), 3 reduced dots (vecdot, all-gather,
        # stack, sum) and CG's vector updates and flags (about 12, the unfused torch path).
        launches = 2 + 1 + 3 + 1 + 3 * 4 + 12
        seconds = 2 * A.plan_pair_s * pairs + A.all_reduce(R, n * k * w) + dot_s + launches * A.launch_s
    else:
        raise ValueError(f"columns: op must be 'sinkhorn', 'product' or 'cg', got {op!r}")
    return Cost(nbytes, launches, seconds)


def both(op: str, n: int, m: int, d: int, k: int, R: int, A: Assumptions = ASSUMPTIONS) -> Cost:
    """Both clouds sharded (n / R rows and m / R columns per rank; a ring over the other cloud's blocks).

    Each product or soft-min is R passes over (n / R) x (m / R) blocks while
    the other cloud's blocks travel around the ring (points, potential or
    log-weights, weights, and the k columns of V), R - 1 transfers per rank;
    rows stay local, so nothing is reduced at the end. "sinkhorn": the f update
    (ring over y) and the g update (ring over x), blocks of d + 2 values per
    point; "product": ``P @ V`` (ring over y with V, d + k + 2 values per
    point); "cg": ``P`` then ``P.T`` (rings over y and over x) and three
    reduced inner products.
    """
    w, block_pairs = A.word, (n / R) * (m / R)
    if op == "sinkhorn":
        nbytes = (R - 1) / R * (n + m) * (d + 2) * w
        # Per update: R passes, R - 1 send/receive pairs, the running (max, sum-exp) merge (3 per block).
        launches = 2 * (R + 2 * (R - 1) + 3 * R)
        seconds = (A.ring(R, A.softmin_pair_s * block_pairs, (m / R) * (d + 2) * w)
                   + A.ring(R, A.softmin_pair_s * block_pairs, (n / R) * (d + 2) * w) + launches * A.launch_s)
    elif op == "product":
        nbytes = (R - 1) / R * m * (d + k + 2) * w
        launches = R + 2 * (R - 1) + R
        seconds = A.ring(R, A.plan_pair_s * block_pairs, (m / R) * (d + k + 2) * w) + launches * A.launch_s
    elif op == "cg":
        dot_bytes, dot_s = _dots(R, k, 3, A)
        nbytes = (R - 1) / R * (n + m) * (d + k + 2) * w + dot_bytes
        launches = 2 * (R + 2 * (R - 1) + R) + 3 + 1 + 3 * 4 + 12
        seconds = (A.ring(R, A.plan_pair_s * block_pairs, (m / R) * (d + k + 2) * w)
                   + A.ring(R, A.plan_pair_s * block_pairs, (n / R) * (d + k + 2) * w) + dot_s
                   + launches * A.launch_s)
    else:
        raise ValueError(f"both: op must be 'sinkhorn', 'product' or 'cg', got {op!r}")
    return Cost(nbytes, launches, seconds)


#: The formulas of :func:`columns` and :func:`both`, as the docs print them (w = 4 bytes).
FORMULAS = [
    ("Sinkhorn iteration", "columns", "(R-1) n w", "2 pass + 1 all-gather + ~4R merge ops",
     "2 c_s n m / R + all-gather(n w)"),
    ("Sinkhorn iteration", "both (ring)", "(R-1)/R (n+m)(d+2) w", "2R pass + 4(R-1) send/recv + ~6R merge ops",
     "2 ring(c_s n m / R^2, (m/R)(d+2) w)"),
    ("P @ V (k columns)", "columns", "2 (R-1)/R n k w", "1 pass + 1 all-reduce", "c_p n m / R + all-reduce(n k w)"),
    ("P.T @ U", "columns", "0", "1 pass", "c_p n m / R"),
    ("P @ V (k columns)", "both (ring)", "(R-1)/R m (d+k+2) w", "R pass + 2(R-1) send/recv",
     "ring(c_p n m / R^2, (m/R)(d+k+2) w)"),
    ("CG iteration of an HVP (k rhs, jacobi)", "columns", "2 (R-1)/R n k w + 3 (R-1) k w",
     "2 pass + 1 all-reduce + 3 all-gather + ~25 small", "2 c_p n m / R + all-reduce(n k w) + 3 all-gather(k w)"),
    ("CG iteration of an HVP (k rhs, jacobi)", "both (ring)", "(R-1)/R (n+m)(d+k+2) w + 3 (R-1) k w",
     "2R pass + 4(R-1) send/recv + 3 all-gather + ~25 small",
     "2 ring(c_p n m / R^2, .) + 3 all-gather(k w)"),
]

RANKS = (1, 2, 4, 8, 16, 32, 64)


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def scaling_table(n: int, m: int, d: int, k: int, A: Assumptions = ASSUMPTIONS) -> list[str]:
    """Markdown rows: ms per Sinkhorn iteration and per CG iteration, speed-up against one GPU."""
    lines = [f"n = m = {n:,}, d = {d}, k = {k}: ms per step (speed-up over 1 GPU)", "",
             "| GPUs | Sinkhorn, columns | Sinkhorn, both (ring) | CG iteration, columns | CG iteration, both (ring) "
             "| MB sent per rank, Sinkhorn: columns / ring | MB sent per rank, CG: columns / ring |",
             "|---|---|---|---|---|---|---|"]
    base = {(lay, op): f(op, n, m, d, k, 1, A).seconds for lay, f in (("c", columns), ("b", both))
            for op in ("sinkhorn", "cg")}
    for R in RANKS:
        cells = []
        for op in ("sinkhorn", "cg"):
            for lay, f in (("c", columns), ("b", both)):
                s = f(op, n, m, d, k, R, A).seconds
                cells.append((op, lay, f"{_ms(s)} ({base[(lay, op)] / s:.1f}x)"))
        order = [c for op in ("sinkhorn", "cg") for lay in ("c", "b") for o, la, c in cells if o == op and la == lay]
        sent = [f"{columns(op, n, m, d, k, R, A).nbytes / 1e6:.3g} / {both(op, n, m, d, k, R, A).nbytes / 1e6:.3g}"
                for op in ("sinkhorn", "cg")]
        lines.append(f"| {R} | " + " | ".join(order + sent) + " |")
    return lines


def markdown(A: Assumptions = ASSUMPTIONS) -> str:
    """The formulas, the assumptions and the simulated tables, as Markdown."""
    out = ["| step | layout | bytes sent per rank | kernels per rank | modelled time |", "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in FORMULAS]
    out += ["", "| assumption | value |", "|---|---|"]
    for f in fields(A):
        out.append(f"| `{f.name}` | {getattr(A, f.name):.4g} |")
    for n in (1_000_000, 100_000):
        out += [""] + scaling_table(n, n, 64, 1, A)
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    """Print :func:`markdown` (no arguments)."""
    print(markdown(), end="")


if __name__ == "__main__":
    main()
