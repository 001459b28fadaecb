"""``python -m otlinop.bench {solvers,plan,sinkhorn,hvp,all} [options]``.

Benchmarks measure on the GPU (CUDA events, medians) and print Markdown
tables; on a CPU-only machine they run tiny sizes and say so.
"""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "solvers": "otlinop.bench.solvers_bench",
    "plan": "otlinop.bench.plan_bench",
    "sinkhorn": "otlinop.bench.sinkhorn_bench",
    "hvp": "otlinop.bench.hvp_bench",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*SUITES, "all"):
        print(__doc__.strip())
        print("suites: " + ", ".join(SUITES) + ", all")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    names = list(SUITES) if name == "all" else [name]
    status = 0
    for suite in names:
        print(f"\n## otlinop.bench {suite}\n", flush=True)
        module = importlib.import_module(SUITES[suite])
        status |= int(module.main(rest) or 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
