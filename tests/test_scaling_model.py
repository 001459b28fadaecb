"""``otlinop.bench.scaling_model``: its formulas, and the tables docs/multi-gpu.md quotes from it."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from otlinop.bench import scaling_model as sm

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
SIZES = dict(n=200_000, m=300_000, d=64, k=3)


def test_docs_quote_the_model_output():
    text = (DOCS / "multi-gpu.md").read_text()
    start, end = "<!-- scaling-model:start -->\n", "<!-- scaling-model:end -->"
    quoted = text[text.index(start) + len(start):text.index(end)]
    assert quoted == sm.markdown(), "docs/multi-gpu.md: rerun python -m otlinop.bench.scaling_model and paste"


def test_kernel_rates_are_the_measured_figures_quoted_in_benchmarks():
    """The two rates derive from figures of docs/benchmarks.md; if those change, so must the model."""
    text = (DOCS / "benchmarks.md").read_text()
    assert "| 50k | 1.551 / 4.299 |" in text           # symmetric tf32 / tf32x3 ms per iteration, d = 64
    assert "| otlinop | `jacobi()`, cg graph | 54.5 | 53 |" in text
    assert sm.ASSUMPTIONS.softmin_pair_s == pytest.approx(4.299e-3 / (2 * 50_000 ** 2))
    assert sm.ASSUMPTIONS.plan_pair_s == pytest.approx(54.5e-3 / (53 * 2 * 10_000 ** 2))


@pytest.mark.parametrize("layout", [sm.columns, sm.both])
@pytest.mark.parametrize("op", ["sinkhorn", "product", "cg"])
def test_one_rank_is_the_kernels_alone(layout, op):
    """R = 1: no bytes, no collective time: the passes at the measured rates and the launches."""
    cost = layout(op, R=1, **SIZES)
    A = sm.ASSUMPTIONS
    pairs = SIZES["n"] * SIZES["m"]
    kernels = {"sinkhorn": 2 * A.softmin_pair_s, "product": A.plan_pair_s, "cg": 2 * A.plan_pair_s}[op] * pairs
    assert cost.nbytes == 0
    assert cost.seconds == pytest.approx(kernels + cost.launches * A.launch_s)


def test_bytes_follow_the_formulas():
    n, m, d, k, w = SIZES["n"], SIZES["m"], SIZES["d"], SIZES["k"], 4
    for R in (2, 3, 8, 64):
        assert sm.columns("sinkhorn", R=R, **SIZES).nbytes == (R - 1) * n * w
        assert sm.columns("product", R=R, **SIZES).nbytes == pytest.approx(2 * (R - 1) / R * n * k * w)
        assert sm.columns("cg", R=R, **SIZES).nbytes == pytest.approx(2 * (R - 1) / R * n * k * w + 3 * (R - 1) * k * w)
        assert sm.both("sinkhorn", R=R, **SIZES).nbytes == pytest.approx((R - 1) / R * (n + m) * (d + 2) * w)
        assert sm.both("product", R=R, **SIZES).nbytes == pytest.approx((R - 1) / R * m * (d + k + 2) * w)


def test_collectives_and_the_ring():
    A = sm.Assumptions(nvlink_bytes_per_s=1e9, nvlink_latency_s=1e-6, ib_bytes_per_s=1e8, ib_latency_s=1e-5)
    assert A.all_reduce(4, 1e6) == pytest.approx(2 * 2 * 1e-6 + 2 * 3 / 4 * 1e6 / 1e9)
    assert A.all_gather(16, 1e3) == pytest.approx(4 * 1e-5 + 15 * 1e3 / 1e8)      # R > 8: InfiniBand
    # A ring hides transfers shorter than a block's pass, and is bound by them otherwise.
    assert A.ring(4, 1.0, 10.0) == pytest.approx(4.0)
    assert A.ring(4, 1e-6, 1e6) == pytest.approx(1e-6 + 3 * (1e-6 + 1e-3))


def test_more_ranks_never_cost_more_kernel_time_at_scale():
    """At n = m = 10^6 the kernels dominate: speed-up within 80% of linear up to 64 GPUs."""
    for layout in (sm.columns, sm.both):
        for op in ("sinkhorn", "cg"):
            one = layout(op, 1_000_000, 1_000_000, 64, 1, 1).seconds
            for R in sm.RANKS:
                speedup = one / layout(op, 1_000_000, 1_000_000, 64, 1, R).seconds
                assert 0.75 * R <= speedup <= R * (1 + 1e-9), (layout.__name__, op, R, speedup)


def test_every_assumption_is_printed():
    text = sm.markdown()
    for f in dataclasses.fields(sm.Assumptions):
        assert f"`{f.name}`" in text


def test_unknown_step_refused():
    with pytest.raises(ValueError, match="columns: op must be"):
        sm.columns("sort", R=2, **SIZES)
    with pytest.raises(ValueError, match="both: op must be"):
        sm.both("sort", R=2, **SIZES)
