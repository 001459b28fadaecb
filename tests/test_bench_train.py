"""``python -m otlinop.bench train`` at a tiny size on the CPU: its rows, tables and files."""

import json

import pytest

from otlinop.bench import train_bench
from otlinop.bench.__main__ import main as bench_main


def test_train_suite_times_every_call_and_writes_its_files(tmp_path, capsys):
    code = bench_main(["train", "--sizes", "24", "--dims", "2", "--debias", "both", "--repeats", "1",
                       "--warmup", "1", "--libraries", "otlinop", "--results", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| call | n = m | d | debias | otlinop | floor (exp) |" in out
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert {(r["kind"], r["debias"]) for r in rows} == {(k, d) for k in ("train step", "forward")
                                                        for d in (True, False)}
    assert all(r["ms"] > 0 and r["n"] == 24 and r["d"] == 2 for r in rows)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "train.png").stat().st_size > 0


def test_train_suite_reports_a_missing_library_as_an_error_row(tmp_path):
    rows = train_bench.run_library("geomloss-online", dict(sizes=[8], dims=[2], debias=[True], blur=0.05,
                                                           scaling=0.5, warmup=1, repeats=1, peer_path=None,
                                                           device="cpu"), timeout=120)
    pytest.importorskip("geomloss")
    try:
        import pykeops  # noqa: F401
    except ImportError:
        assert rows and all("error" in r for r in rows)
        assert "pykeops" in rows[0]["error"].lower() or "keops" in rows[0]["error"].lower()
    else:
        assert rows


def test_floor_counts_the_debias_and_backward_passes():
    c = {"exp2_per_s": 1e12}
    plain = train_bench.floor_ms(1000, 3, False, "forward", c["exp2_per_s"])
    assert train_bench.floor_ms(1000, 3, True, "forward", c["exp2_per_s"]) == pytest.approx(2 * plain)
    steps = train_bench.schedule_steps(1000, 3)
    assert train_bench.floor_ms(1000, 3, False, "train step", c["exp2_per_s"]) == pytest.approx(
        plain * (steps + 1) / steps)
    assert train_bench.floor_ms(1000, 3, False, "forward", None) is None
