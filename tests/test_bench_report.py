"""``python -m otlinop.bench ... --results DIR``: files, floors, figure (no GPU needed)."""

import builtins
import json
import os
from datetime import datetime, timezone

import pytest
import torch

from otlinop.bench import __main__ as bench_main
from otlinop.bench import _report, timing

# Tiny CPU run of the sinkhorn suite: 2 sizes x 2 dims x 2 methods = 8 rows.
SINKHORN_ARGS = ["--no-peers", "--no-default-call", "--sizes", "16", "32", "--dims", "2", "5"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Round synthetic ceilings: exp2 1e13/s, fp32 50 TFLOP/s, TF32 400 TFLOP/s.
CEIL = {"exp2_per_s": 1e13, "fp32_flops": 5e13, "tf32_flops": 4e14, "copy_bytes_per_s": 3e12}


def _synthetic_rows():
    """Rows as sinkhorn_bench builds them, for otlinop and both peers, plus errors."""
    kinds = [("otlinop", "symmetric", "tf32"), ("otlinop", "alternating", "tf32x3 (default)"),
             ("flash-sinkhorn 0.4.1", "symmetric", "tf32"), ("flash-sinkhorn 0.4.1", "alternating", "strict fp32"),
             ("OTT-JAX 0.6", "alternating", "default (wall clock)"), ("OTT-JAX 0.6", "alternating", "highest (wall clock)")]
    rows = []
    for n in (10_000, 20_000, 50_000):
        for d in (3, 64):
            for i, (library, method, precision) in enumerate(kinds):
                rows.append(dict(library=library, method=method, precision=precision, n=n, d=d,
                                 ms=(1 + i) * 0.1 * (n / 1e4) ** 2, peak_mb=None))
    rows.append(dict(library="otlinop", method="symmetric", precision="tf32", n=10_000, d=3,
                     error="RuntimeError: out of | memory"))
    rows.append(dict(library="flash-sinkhorn", error="not importable: No module named 'flash_sinkhorn'"))
    return rows


# The suite times otlinop at two precisions on a GPU ("tf32" and the default),
# at one (the torch reference) on the CPU.
_PRECISIONS = 2 if torch.cuda.is_available() else 1


def _run(args, capsys):
    status = bench_main.main(args)
    return status, capsys.readouterr()


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------
def test_sinkhorn_results_folder(tmp_path, capsys):
    out = tmp_path / "res"
    status, captured = _run(["sinkhorn", "--results", str(out), *SINKHORN_ARGS], capsys)
    assert status == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"sinkhorn.md", "sinkhorn.json", "sinkhorn.png", "README.md"}

    data = json.loads((out / "sinkhorn.json").read_text())
    rows = data["rows"]
    assert len(rows) == 8 * _PRECISIONS
    assert {(r["n"], r["d"], r["method"]) for r in rows} == {
        (n, d, m) for n in (16, 32) for d in (2, 5) for m in ("symmetric", "alternating")}
    assert all(r["library"] == "otlinop" and r["ms"] > 0 for r in rows)
    assert data["default_call"] == []
    assert data["environment"]["device"] == timing.device_name()
    if not data["ceilings"]:   # no GPU: no floor
        assert all(r["floor_ms"] is None and r["fraction_of_floor"] is None for r in rows)

    md = (out / "sinkhorn.md").read_text()
    assert "| library | method | precision | n = m | d | ms / iteration |" in md
    assert sum(line.startswith("| otlinop |") for line in md.splitlines()) == 8 * _PRECISIONS
    assert md in captured.out          # the terminal got the same text
    assert (out / "sinkhorn.png").read_bytes()[:8] == PNG_MAGIC

    readme = (out / "README.md").read_text()
    assert "`python -m otlinop.bench sinkhorn --results " in readme
    assert "sinkhorn (exit 0)" in readme
    assert timing.device_name() in readme
    table = readme.split("## Sinkhorn: fraction of the floor")[1]
    assert sum(line.startswith("| otlinop |") for line in table.splitlines()) == 8 * _PRECISIONS


def test_solvers_suite_tables(capsys):
    """Both tables of the solvers suite, and the fused kernels' switch restored after it."""
    from solvers import config

    saved = config.cg_fused, config.cg_fused_max_n
    status, captured = _run(["solvers", "--no-results", "--n", "64", "--ks", "1", "--iters", "2", "6",
                             "--vector-ns", "32", "96"], capsys)
    assert status == 0, captured.err
    lines = captured.out.splitlines()
    assert sum(line.startswith("| 64 | 1 |") for line in lines) == 1
    vector = [line for line in lines if line.startswith(("| 32 |", "| 96 |"))]
    assert len(vector) == 2
    for line in vector:
        cells = [c.strip() for c in line.strip("|").split("|")]
        # A busy CPU can make a tiny size's difference of two timings negative: said, never printed.
        assert len(cells) == 6 and all(c == "below noise" or float(c) > 0 for c in cells[1:5])
    assert (config.cg_fused, config.cg_fused_max_n) == saved


def _cg_failing_when_fused(everywhere=False):
    """solvers.cg whose fused kernels fail (a kernel this GPU cannot compile, say): it raises
    where ``config.cg_fused`` is on (everywhere: always)."""
    from solvers import cg, config

    def broken(*args, **kwargs):
        if everywhere:
            raise RuntimeError("broken everywhere")
        if config.cg_fused:
            raise RuntimeError("no kernel here")
        return cg(*args, **kwargs)

    return broken


def test_solvers_vector_table_reports_a_failing_fused_cell(capsys):
    from otlinop.bench import solvers_bench

    status = solvers_bench.main(["--n", "64", "--ks", "1", "--iters", "2", "6", "--vector-ns", "32"],
                                cg=_cg_failing_when_fused())
    captured = capsys.readouterr()
    assert status == 0, captured.err
    row = next(line for line in captured.out.splitlines() if line.startswith("| 32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == cells[4] == "failed: RuntimeError: no kernel here" and cells[5] == "-"
    # A measured cell: a time, or "below noise" when the difference of two timings is lost in a
    # busy machine's noise (seen on a loaded 2-core CPU).
    assert all(cell == "below noise" or float(cell) > 0 for cell in (cells[1], cells[3]))


def test_hvp_suite_reports_a_failing_fused_row_and_goes_on(capsys):
    """A fused-kernel row that raises (a kernel this GPU cannot compile, say) is reported
    under the table; the other rows, and the run, go on. Any other row's error still raises."""
    from otlinop import config
    from otlinop.bench import hvp_bench

    argv = ["--n", "40", "--d", "4", "--no-peer"]
    status = hvp_bench.main(argv, cg=_cg_failing_when_fused())
    captured = capsys.readouterr()
    assert status == 0, captured.err
    lines = captured.out.splitlines()
    failed = [line for line in lines if "failed: RuntimeError: no kernel here" in line]
    assert len(failed) == 4 and all(hvp_bench.FUSED_LABEL in line for line in failed)
    # 10 HVP rows measured (2 of them k = 16 batched), 4 failed (the fused rows), 4 SamplesLoss rows
    # and 2 torch.func rows.
    assert sum(line.startswith("| otlinop |") for line in lines) == 10 + 4 + 4 + 2
    assert not config.cg_fused

    with pytest.raises(RuntimeError, match="broken everywhere"):
        hvp_bench.main(argv, cg=_cg_failing_when_fused(everywhere=True))
    assert config.check_finite and not config.cg_fused   # the bench's overrides end, errors included


def test_hvp_suite_runs_tiny_on_the_cpu(capsys, tmp_path):
    """The dense d = 3 case beside another dimension, the batched rows against their
    one-direction rows, the SamplesLoss double-backward rows (issue 18, item 5), all with
    errors against the float64 reference; the reference cache serves the second run."""
    from otlinop.bench import hvp_bench

    cache = str(tmp_path / "ref.pt")
    argv = ["--n", "30", "--d", "5", "3", "--k", "4", "--no-peer", "--truncate", "--cache", cache]
    assert hvp_bench.main(argv) == 0
    out = capsys.readouterr().out
    tables = out.split("| library | HVP |")[1:]
    assert "d = 5:" in out and "d = 3:" in out and len(tables) == 2
    for table in tables:
        rows = {cells[1]: cells[2:] for cells in
                ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                 if line.startswith("| otlinop |"))}
        for label in ("M = jacobi()", "M = jacobi(), k = 4 directions in one call",
                      "SamplesLoss double backward, M = None", "SamplesLoss double backward, M = jacobi()"):
            ms, its, err = rows[label]
            assert float(ms) > 0 and int(its) > 0 and float(err) < 1e-3, (label, rows[label])
        first = next(label for label in rows if label.startswith("SamplesLoss forward + backward"))
        assert "converging iterations" in first and "(converged)" in first
        # Issue 23's forward-over-reverse HVP beside the analytic one: the same numbers.
        ms, its, err = rows[hvp_bench.FUNC_JVP_LABEL]
        assert float(ms) > 0 and int(its) > 0 and float(err) < 1e-3
        assert float(rows[hvp_bench.FUNC_GRAD_LABEL][0]) > 0
    assert out.count("forward over reverse: (jvp(grad) - grad) / hvp_x(M = jacobi()) = ") == 2
    assert out.count("4 directions in one call (M = jacobi(), k = 4 directions in one call): ") == 2
    assert out.count("float64 reference read from") == 0
    assert hvp_bench.main(argv) == 0
    assert capsys.readouterr().out.count("float64 reference read from") == 2


def _sinkhorn_reference(method, x, y, a, b, eps, k):
    """k iterations of the update formulas of ``otlinop.sinkhorn``'s Notes, in dense torch."""
    C = torch.cdist(x, y).square()

    def t_f(g):
        return -eps * torch.logsumexp(b.log()[None, :] + (g[None, :] - C) / eps, dim=1)

    def t_g(f):
        return -eps * torch.logsumexp(a.log()[:, None] + (f[:, None] - C) / eps, dim=0)

    if method == "alternating":
        f = torch.zeros_like(a)
        for _ in range(k):
            g = t_g(f)
            f = t_f(g)
        return f, g
    f, g = t_f(torch.zeros_like(b)), t_g(torch.zeros_like(a))
    for _ in range(k):
        f, g = (f + t_f(g)) / 2, (g + t_g(f)) / 2
    return t_f(g), t_g(f)


@pytest.mark.parametrize("method", ["symmetric", "alternating"])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_ours_runner_runs_k_iterations_at_the_protocol_eps(method, k):
    """The bench times the public sinkhorn call doing exactly k steps at eps = EPS (one eps)."""
    from otlinop.bench import sinkhorn_bench

    x, y, a, b = (t.double() for t in sinkhorn_bench.inputs(24, 3, "cpu"))
    res = sinkhorn_bench.ours_runner(method, x, y, a, b, None, "torch")(k)
    assert res.n_iter == k and res.method == method
    assert set(res.eps_schedule) == {res.eps} and res.eps == pytest.approx(sinkhorn_bench.EPS, rel=1e-15)
    # No check inside the run but one at its end, and (symmetric, refining past its 2-step
    # schedule) one at the end of the schedule.
    assert len(res.marginal_error_history) == (2 if method == "symmetric" and k > 2 else 1)
    for steps in (k - 1, k, k + 1):
        f, g = _sinkhorn_reference(method, x, y, a, b, res.eps, steps)
        same = torch.allclose(res.f, f, rtol=0, atol=1e-12) and torch.allclose(res.g, g, rtol=0, atol=1e-12)
        assert same == (steps == k), steps


def test_per_iteration_widens_a_span_below_the_noise():
    from otlinop.bench import sinkhorn_bench

    calls = []

    def run(k):
        calls.append(k)

    # A fake clock: a set-up cost that falls with k up to 70 iterations hides
    # 50 iterations' cost; past it, 0.02 ms per iteration.
    def elapsed(fn):
        fn()
        k = calls[-1]
        return 5.0 - 0.001 * k if k <= 70 else 0.02 * k

    ms = sinkhorn_bench.per_iteration_ms(run, 20, 70, repeats=3, clock=elapsed)
    assert set(calls) == {20, 70, 420}
    assert ms == pytest.approx((0.02 * 420 - (5.0 - 0.02)) / 400)

    with pytest.raises(RuntimeError, match="below the timing noise even over 3200 iterations"):
        sinkhorn_bench.per_iteration_ms(run, 20, 70, repeats=1, clock=lambda fn: (fn(), 1.0)[1])


def test_single_suite_writes_nothing_without_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, captured = _run(["sinkhorn", "--no-peers", "--no-default-call", "--sizes", "16", "--dims", "2"], capsys)
    assert status == 0
    assert "| otlinop | symmetric |" in captured.out
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_skips_only_the_plot(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "res"
    status, captured = _run(["sinkhorn", f"--results={out}", *SINKHORN_ARGS], capsys)
    assert status == 0
    assert {p.name for p in out.iterdir()} == {"sinkhorn.md", "sinkhorn.json", "README.md"}
    assert len(json.loads((out / "sinkhorn.json").read_text())["rows"]) == 8 * _PRECISIONS
    skipped = [line for line in captured.out.splitlines() if line.startswith("plot skipped")]
    assert len(skipped) == 1 and "matplotlib" in skipped[0]
    assert "not written: sinkhorn.png: matplotlib is not importable" in (out / "README.md").read_text()


NOW = datetime(2026, 11, 23, 4, 9, 15, tzinfo=timezone.utc)


@pytest.mark.parametrize("argv, rest, results", [
    (["all"], ["all"], os.path.join("bench-results", "20261123T040915Z")),
    (["all", "--no-results"], ["all"], None),
    (["all", "--results", "out"], ["all"], "out"),
    (["sinkhorn", "--no-peers"], ["sinkhorn", "--no-peers"], None),
    (["plan", "--results=r", "--sizes", "3"], ["plan", "--sizes", "3"], "r"),
    (["--results", "r", "hvp", "--n", "5"], ["hvp", "--n", "5"], "r"),
    (["all", "--help"], ["all", "--help"], None),
])
def test_split_results(argv, rest, results):
    got_rest, got_results = bench_main.split_results(argv, now=NOW)
    assert got_rest == rest
    assert got_results == results


@pytest.mark.parametrize("argv, message", [
    (["plan", "--results"], "needs a folder"),
    (["plan", "--results", "--sizes", "3"], "needs a folder"),
    (["plan", "--results="], "needs a folder"),
    (["plan", "--results", "a", "--results=b"], "given twice"),
    (["all", "--results", "a", "--no-results"], "contradict"),
])
def test_split_results_errors(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        bench_main.split_results(argv)
    assert bench_main.main(argv) == 2
    assert message in capsys.readouterr().err


def test_ceilings_measured_once():
    calls = []

    def fake():
        calls.append(1)
        return dict(CEIL)

    timing.clear_ceilings()
    try:
        assert not timing.ceilings_measured()
        first = timing.ceilings(measure=fake)
        first["exp2_per_s"] = 0.0          # a caller's copy: the shared figures stay
        assert timing.ceilings(measure=fake) == CEIL
        assert len(calls) == 1
        assert timing.ceilings_measured()
        timing.clear_ceilings()
        assert not timing.ceilings_measured()
        assert timing.ceilings(measure=fake) == CEIL
        assert len(calls) == 2
    finally:
        timing.clear_ceilings()


# --------------------------------------------------------------------------
# Floors and fractions
# --------------------------------------------------------------------------
@pytest.mark.parametrize("library, precision, klass", [
    ("otlinop", "tf32", "tf32"),
    ("otlinop", "tf32x3 (default)", "tf32x3"),
    ("otlinop", "ieee", "ieee"),
    ("otlinop", "torch reference", None),
    ("flash-sinkhorn 0.4.1", "tf32", "tf32"),
    ("flash-sinkhorn 0.4.1", "strict fp32", "ieee"),
    ("OTT-JAX 0.6", "default (wall clock)", "tf32"),
    ("OTT-JAX 0.6", "highest (wall clock)", "ieee"),
    ("otlinop", "default", None),
])
def test_precision_class(library, precision, klass):
    assert _report.precision_class(dict(library=library, precision=precision)) == klass


@pytest.mark.parametrize("d, klass, expected_ms", [
    (3, "tf32", 0.02),      # exp2 bound: 2 * 1e8 / 1e13 s
    (3, "ieee", 0.02),      # exp2 bound: the dot, 2 * 1e8 * 3 / 5e13 s = 0.012 ms, is below
    (64, "tf32", 0.032),    # dot bound: 2 * 1e8 * 64 / 4e14 s
    (64, "tf32x3", 0.096),  # three TF32 products
    (64, "ieee", 0.256),
])
def test_floor_ms(d, klass, expected_ms):
    assert _report.floor_ms(10_000, 10_000, d, klass, CEIL) == pytest.approx(expected_ms, rel=1e-12)


def test_floor_needs_ceilings_and_a_known_precision():
    assert _report.floor_ms(100, 100, 3, "tf32", {}) is None
    assert _report.floor_ms(100, 100, 3, "tf32", None) is None
    assert _report.floor_ms(100, 100, 3, None, CEIL) is None
    with pytest.raises(ValueError, match="tf32_flops"):
        _report.floor_ms(100, 100, 3, "tf32", {"exp2_per_s": 1.0, "fp32_flops": 1.0})


def test_annotate_and_fraction_table():
    rows = [dict(library="otlinop", method="symmetric", precision="tf32", n=10_000, d=64, ms=0.128),
            dict(library="OTT-JAX 0.6", method="alternating", precision="highest (wall clock)", n=10_000, d=64,
                 ms=2.048),
            dict(library="otlinop", method="symmetric", precision="torch reference", n=10_000, d=64, ms=1.0),
            dict(library="peer", error="exit 1: boom | bang")]
    before = [dict(r) for r in rows]
    out = _report.annotate(rows, CEIL)
    assert rows == before                          # inputs untouched
    assert out[0]["floor_ms"] == pytest.approx(0.032) and out[0]["fraction_of_floor"] == pytest.approx(0.25)
    assert out[1]["floor_ms"] == pytest.approx(0.256) and out[1]["fraction_of_floor"] == pytest.approx(0.125)
    assert out[2]["floor_ms"] is None and out[2]["fraction_of_floor"] is None
    assert out[3]["floor_ms"] is None and out[3]["fraction_of_floor"] is None

    lines = _report.fraction_table(rows, CEIL).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[2] == "| otlinop | symmetric | tf32 | 10000 | 64 | 0.128 | 0.032 | 0.250 |"
    assert lines[3].endswith("| 2.048 | 0.256 | 0.125 |")
    assert lines[4].endswith("| 1 | - | - |")
    assert "error: exit 1: boom \\| bang" in lines[5]   # pipes escaped: the table keeps 8 columns
    assert all(line.replace("\\|", "").count("|") == 9 for line in lines)
    # Without ceilings: no floor anywhere.
    assert all(line.endswith("| - | - |") for line in _report.fraction_table(rows, {}).splitlines()[2:])


# --------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------
def test_series_lines_and_floors():
    panels = _report.series(_synthetic_rows(), CEIL)
    assert list(panels) == [3, 64]
    for panel in panels.values():
        assert len(panel["lines"]) == 6
        for pts in panel["lines"].values():
            assert [n for n, _ in pts] == [10_000, 20_000, 50_000]
    assert panels[3]["lines"][("OTT-JAX 0.6", "alternating", "highest (wall clock)")][0][1] == pytest.approx(0.6)
    # d = 3: every precision has the exp2 bound (the shared dots cost less).
    assert set(panels[3]["floors"]) == {"floor (tf32, tf32x3, ieee)"}
    assert set(panels[64]["floors"]) == {"floor (tf32)", "floor (tf32x3)", "floor (ieee)"}
    assert panels[64]["floors"]["floor (ieee)"] == [
        (n, pytest.approx(0.256 * (n / 1e4) ** 2)) for n in (10_000, 20_000, 50_000)]
    assert all(not p["floors"] for p in _report.series(_synthetic_rows(), {}).values())


def test_write_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    path = tmp_path / "fig.png"
    fig = _report.write_figure(path, _synthetic_rows(), CEIL, title="synthetic")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.size[0] > im.size[1] > 100
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["d = 3", "d = 64"]
    for ax, n_floors in zip(axes, (1, 3)):
        assert ax.get_xscale() == ax.get_yscale() == "log"
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        others = [ln for ln in ax.get_lines() if ln.get_linestyle() != "--"]
        assert len(dashed) == n_floors and all(ln.get_label().startswith("floor") for ln in dashed)
        assert {ln.get_label() for ln in others} == {
            "otlinop symmetric tf32", "otlinop alternating tf32x3 (default)",
            "flash-sinkhorn 0.4.1 symmetric tf32", "flash-sinkhorn 0.4.1 alternating strict fp32",
            "OTT-JAX 0.6 alternating default (wall clock)", "OTT-JAX 0.6 alternating highest (wall clock)"}

    fig = _report.write_figure(tmp_path / "nofloor.png", _synthetic_rows(), {})
    assert all(ln.get_linestyle() != "--" for ax in fig.axes for ln in ax.get_lines())

    with pytest.raises(ValueError, match="nothing to plot"):
        _report.write_figure(tmp_path / "none.png", [dict(library="peer", error="timed out")], CEIL)
    assert not (tmp_path / "none.png").exists()


def test_readme_without_sinkhorn_or_ceilings():
    env = dict(device="CPU (not a GPU figure)", python="3", torch="2", triton="3", otlinop="0.1.0")
    text = _report.readme(command="python -m otlinop.bench plan --results r", env=env, ceil=None,
                          suites=["plan (exit 0)"], files=["plan.md"], date=NOW)
    assert "- date: 2026-11-23 04:09:15 UTC" in text
    assert "not measured in this run" in text
    assert "fraction of the floor" not in text
    text = _report.readme(command="c", env=env, ceil=CEIL, suites=[], files=[], sinkhorn_rows=_synthetic_rows(),
                          date=NOW)
    assert "measured ceilings: exp2 1e+13/s" in text
    assert "| otlinop | symmetric | tf32 | 10000 | 3 | 0.1 | 0.02 | 0.200 |" in text
