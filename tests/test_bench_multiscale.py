"""``python -m otlinop.bench multiscale`` at tiny sizes on the CPU: its rows, tables and files."""

import json
import math

import pytest
import torch

from otlinop.bench import multiscale_bench
from otlinop.bench.__main__ import main as bench_main


def test_multiscale_suite_runs_its_tables_and_writes_its_files(tmp_path, capsys):
    code = bench_main(["multiscale", "--sizes", "120", "--data", "cube", "surface", "--repeats", "1",
                       "--warmup", "0", "--results", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| data | n = m | path | call | ms | peak MiB | loss | rel. diff from dense |" in out
    assert "| data | n = m | kernel | cell | clusters |" in out
    rows = json.loads((tmp_path / "multiscale.json").read_text())["rows"]
    kernel = [r for r in rows if "kernel" in r]
    assert {(r["data"], r["kernel"]) for r in kernel} == {(d, k) for d in ("cube", "surface")
                                                          for k in ("blocksparse_softmin", "softmin (dense)")}
    assert all(r["ms"] > 0 and 0 < r["kept"] <= 120 * 120 for r in kernel)
    dense = [r for r in rows if r.get("path") == "dense"]
    assert {(r["data"], r["call"]) for r in dense} == {(d, c) for d in ("cube", "surface")
                                                       for c in ("loss + grad", "sinkhorn")}
    assert all(r["ms"] > 0 for r in dense)
    # The multiscale rows: timed when the solver is in this build, else an error row saying why.
    ms_rows = [r for r in rows if r.get("path") == "multiscale"]
    assert len(ms_rows) == 4
    why = multiscale_bench.multiscale_available()
    assert all(("ms" in r) == (why is None) for r in ms_rows)
    # GeomLoss: timed where pykeops compiles, else one row saying why it is absent.
    geo = [r for r in rows if r.get("path") == "geomloss-multiscale"]
    assert geo and all("ms" in r or "error" in r for r in geo)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "multiscale.png").stat().st_size > 0


def test_grid_layout_keeps_each_cell_and_its_neighbours():
    x = multiscale_bench.sample("cube", 500, 0, "cpu")
    y = multiscale_bench.sample("cube", 400, 1, "cpu")
    xs, ys, x_starts, y_starts, ptr, idx = multiscale_bench.grid_layout(x, y, 0.25)
    assert int(x_starts[-1]) == 500 and int(y_starts[-1]) == 400 and ptr.numel() == x_starts.numel() == 65
    # Sorted clouds are permutations of the draws, each point inside its cell.
    assert torch.equal(xs.sort(0).values, x.sort(0).values)
    lo = torch.minimum(x.amin(0), y.amin(0))
    for I in (0, 21, 63):
        cell = (xs[x_starts[I]:x_starts[I + 1]] - lo).div(0.25).long().clamp(max=3)
        assert (cell == torch.tensor([I % 4, (I // 4) % 4, I // 16])).all()
    # 27 neighbours inside, 8 at a corner, ascending.
    counts = ptr[1:] - ptr[:-1]
    assert counts[0] == 8 and counts[21] == 27
    assert (idx[ptr[21]:ptr[22]].diff() > 0).all()


@pytest.mark.parametrize("kind", multiscale_bench.DATA)
def test_samples_lie_where_described(kind):
    p = multiscale_bench.sample(kind, 2000, 0, "cpu")
    assert p.shape == (2000, 3) and p.dtype == torch.float32
    if kind == "cube":
        assert (p >= 0).all() and (p <= 1).all()
    if kind == "surface":
        z = 0.5 + 0.15 * torch.sin(2 * math.pi * p[:, 0]) * torch.cos(2 * math.pi * p[:, 1])
        torch.testing.assert_close(p[:, 2], z)
    if kind == "mixture":
        assert p.std(0).min() > 0.05  # spread by the centres, not only by the 0.05 noise
