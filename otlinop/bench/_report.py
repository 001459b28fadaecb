"""Files written by ``python -m otlinop.bench ... --results DIR``.

Pure functions of the benchmark rows and the measured ceilings (see
``timing.ceilings``), so that they can be tested without a GPU:

- :func:`floor_ms` / :func:`annotate`: the floor of one Sinkhorn iteration and
  the fraction of it that a measured row reaches;
- :func:`fraction_table`: that fraction as a Markdown table;
- :func:`write_figure`: time per iteration against n, log-log, one line per
  (library, method, precision), one subplot per d, the floors dashed;
- :func:`write_sinkhorn`: ``sinkhorn.json`` and ``sinkhorn.png`` in a folder;
- :func:`readme`: the text of ``README.md`` (command, date, device, versions,
  ceilings, files, fraction-of-floor table).

The floor of one full iteration (both potentials updated) on an n x m problem
in dimension d is ``max(2 n m / exp2 rate, 2 n m d / dot rate)``, the
definition of ``docs/benchmark-method.md`` section 3: each of the two half-steps evaluates
n m exponentials, and the n x m x d product (2 n m d flops) is computed once
when the two half-steps share it. A kernel that also shares the
exponentials (otlinop's fused symmetric step) can go below it: a fraction
above 1. The dot rate is the one of the row's precision: strict fp32 matmul for
"ieee" / "strict fp32" / "highest", TF32 for "tf32" (and OTT-JAX's "default":
JAX computes float32 dot products in TF32 on recent NVIDIA GPUs by default),
a third of TF32 for "tf32x3". A precision not in that list (e.g. the CPU's
"torch reference") has no floor.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone

from . import timing

#: Keys that ``timing.ceilings`` returns on a GPU and that the floor needs.
CEILING_KEYS = ("exp2_per_s", "fp32_flops", "tf32_flops")

#: Names of the files of the sinkhorn suite inside the results folder.
SINKHORN_JSON, SINKHORN_PNG = "sinkhorn.json", "sinkhorn.png"

_FAMILY_COLOURS = (("otlinop", "C0"), ("flash", "C1"), ("ot_triton", "C1"), ("ott", "C2"))
_METHOD_MARKERS = {"symmetric": "o", "alternating": "s"}
_CLASS_ORDER = ("tf32", "tf32x3", "ieee")
_FLOOR_GREYS = {"tf32": "0.0", "tf32x3": "0.35", "ieee": "0.6"}


# --------------------------------------------------------------------------
# Floors
# --------------------------------------------------------------------------
def precision_class(row: dict) -> str | None:
    """The matmul rate class of a row's precision label.

    Parameters
    ----------
    row : dict
        A benchmark row with ``library`` and ``precision`` keys (as built by
        ``sinkhorn_bench``).

    Returns
    -------
    str or None
        ``"tf32"``, ``"tf32x3"`` or ``"ieee"`` (strict fp32), the keys that
        ``timing.matmul_rate`` understands; None when the label names no known
        GPU precision (then the row has no floor).
    """
    label = str(row.get("precision", "")).lower()
    library = str(row.get("library", "")).lower()
    if "tf32x3" in label:
        return "tf32x3"
    if "tf32" in label:
        return "tf32"
    if "strict" in label or "ieee" in label or label.startswith("highest"):
        return "ieee"
    if library.startswith("ott") and label.startswith("default"):
        return "tf32"
    return None


def _check_ceilings(ceil: dict) -> None:
    missing = [k for k in CEILING_KEYS if k not in ceil]
    if missing:
        raise ValueError(f"ceilings lack {', '.join(missing)}: pass the dict of timing.ceilings() "
                         f"(empty when not measured), got keys {sorted(ceil)}")


def floor_ms(n: int, m: int, d: int, klass: str | None, ceil: dict | None) -> float | None:
    """Floor of one full Sinkhorn iteration in milliseconds.

    Parameters
    ----------
    n, m : int
        Numbers of source and target points.
    d : int
        Dimension of the points.
    klass : str or None
        Precision class (see :func:`precision_class`).
    ceil : dict or None
        Measured ceilings (``timing.ceilings()``); empty or None when they
        were not measured (no GPU).

    Returns
    -------
    float or None
        ``1e3 * max(2 n m / exp2 rate, 2 n m d / dot rate)``, or None when the
        ceilings were not measured or the precision class is unknown.
    """
    if not ceil or klass is None:
        return None
    _check_ceilings(ceil)
    exp_s = 2 * n * m / ceil["exp2_per_s"]
    dot_s = 2 * n * m * d / timing.matmul_rate(ceil, klass)
    return 1e3 * max(exp_s, dot_s)


def _timed(row: dict) -> bool:
    return "error" not in row and all(row.get(k) is not None for k in ("n", "d", "ms"))


def annotate(rows: list[dict], ceil: dict | None) -> list[dict]:
    """Copies of ``rows`` with ``floor_ms`` and ``fraction_of_floor`` (floor / measured) added.

    Both are None where there is no floor (no ceilings, unknown precision) or no
    measurement (error rows, rows without n, d or ms).
    """
    out = []
    for row in rows:
        row = dict(row)
        floor = frac = None
        if _timed(row):
            floor = floor_ms(row["n"], row.get("m", row["n"]), row["d"], precision_class(row), ceil)
            if floor is not None and row["ms"] > 0:
                frac = floor / row["ms"]
        row["floor_ms"], row["fraction_of_floor"] = floor, frac
        out.append(row)
    return out


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def fraction_table(rows: list[dict], ceil: dict | None) -> str:
    """Markdown table of each row's time, floor and fraction of the floor.

    Error rows keep their message in the time column; "-" marks what was not
    measured.
    """
    lines = ["| library | method | precision | n = m | d | ms / iteration | floor ms | fraction of floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in annotate(rows, ceil):
        if "error" in r:
            ms = f"error: {r['error']}"
        else:
            ms = "-" if r.get("ms") is None else f"{r['ms']:.4g}"
        floor = "-" if r["floor_ms"] is None else f"{r['floor_ms']:.4g}"
        frac = "-" if r["fraction_of_floor"] is None else f"{r['fraction_of_floor']:.3f}"
        cells = [r.get("library", "?"), r.get("method", "-"), r.get("precision", "-"), r.get("n", "-"),
                 r.get("d", "-"), ms, floor, frac]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------
def series(rows: list[dict], ceil: dict | None) -> dict:
    """What :func:`write_figure` draws, as data.

    Returns
    -------
    dict
        ``{d: {"lines": {(library, method, precision): [(n, ms), ...]},
        "floors": {label: [(n, floor_ms), ...]}}}`` with d and n sorted. Rows
        with errors or without n, d, ms are left out. Floors are computed for
        each precision class present at that d; classes whose floors coincide
        at every n (the exp2 bound dominating) share one line, labelled with
        all of them.
    """
    out = {}
    for r in rows:
        if not _timed(r):
            continue
        panel = out.setdefault(r["d"], {"lines": {}, "floors": {}, "_classes": set()})
        key = (str(r.get("library", "?")), str(r.get("method", "-")), str(r.get("precision", "-")))
        panel["lines"].setdefault(key, []).append((r["n"], r["ms"]))
        klass = precision_class(r)
        if klass is not None:
            panel["_classes"].add(klass)
    for d, panel in out.items():
        for key in panel["lines"]:
            panel["lines"][key].sort()
        ns = sorted({n for pts in panel["lines"].values() for n, _ in pts})
        curves = {}
        for klass in sorted(panel.pop("_classes"), key=_CLASS_ORDER.index):
            pts = [(n, floor_ms(n, n, d, klass, ceil)) for n in ns]
            if any(v is None for _, v in pts):
                continue
            same = next((k for k, other in curves.items()
                         if all(abs(a[1] - b[1]) <= 1e-9 * b[1] for a, b in zip(pts, other))), None)
            if same is None:
                curves[(klass,)] = pts
            else:
                curves[same + (klass,)] = curves.pop(same)
        panel["floors"] = {"floor (" + ", ".join(k) + ")": pts for k, pts in curves.items()}
    return dict(sorted(out.items()))


def _style(key: tuple) -> dict:
    library, method, precision = key
    lib = library.lower()
    colour = next((c for prefix, c in _FAMILY_COLOURS if lib.startswith(prefix)), None)
    klass = precision_class({"library": library, "precision": precision})
    style = dict(marker=_METHOD_MARKERS.get(method, "^"), linestyle=":" if klass in ("ieee", "tf32x3") else "-")
    if colour is not None:
        style["color"] = colour
    return style


def write_figure(path: str | os.PathLike, rows: list[dict], ceil: dict | None, *, title: str | None = None):
    """Draw time per iteration against n (log-log) and save it to ``path``.

    One subplot per d; one line per (library, method, precision), coloured by
    library, marked by method, dotted for the strict precisions; the floors
    (:func:`series`) dashed in grey. Uses matplotlib's Agg canvas directly, so
    pyplot's global backend is neither needed nor changed.

    Parameters
    ----------
    path : str or os.PathLike
        Where to write the figure (the format follows the suffix, e.g. .png).
    rows : list of dict
        Benchmark rows (``sinkhorn_bench.collect()["rows"]``); errors are skipped.
    ceil : dict or None
        Measured ceilings; empty or None draws no floor.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        The figure written.

    Raises
    ------
    ImportError
        If matplotlib is not importable.
    ValueError
        If no row has a time to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = series(rows, ceil)
    if not panels:
        raise ValueError(f"nothing to plot: none of the {len(rows)} rows has n, d and ms (all errors?)")
    fig = Figure(figsize=(5.0 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    handles = {}
    for ax, (d, panel) in zip(axes, panels.items()):
        for key, pts in panel["lines"].items():
            ns, ms = zip(*pts)
            (line,) = ax.plot(ns, ms, label=" ".join(key), **_style(key))
            handles.setdefault(line.get_label(), line)
        for label, pts in panel["floors"].items():
            ns, ms = zip(*pts)
            klass = label[len("floor ("):-1].split(", ")[0]
            (line,) = ax.plot(ns, ms, label=label, linestyle="--", color=_FLOOR_GREYS.get(klass, "0.5"),
                              marker="_" if len(ns) == 1 else None)
            handles.setdefault(label, line)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Ticks at the sizes measured, in plain numbers; plain numbers on y too.
        ns = sorted({n for pts in panel["lines"].values() for n, _ in pts})
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        # Within a decade there may be no major tick: label the minor ones then.
        lo, hi = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain if hi < 10 * lo else NullFormatter())
        ax.set_title(f"d = {d}")
        ax.set_xlabel("n = m")
        ax.set_ylabel("ms per iteration")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return fig


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------
def environment() -> dict:
    """Device name and versions of Python, torch, triton and otlinop, as strings."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import otlinop
    return dict(device=timing.device_name(), python=platform.python_version(), torch=torch.__version__,
                triton=triton_version, otlinop=getattr(otlinop, "__version__", "unknown"))


def write_sinkhorn(folder: str | os.PathLike, result: dict, ceil: dict | None, *,
                   env: dict | None = None) -> dict:
    """Write ``sinkhorn.json`` and, when matplotlib is importable, ``sinkhorn.png``.

    Parameters
    ----------
    folder : str or os.PathLike
        Existing results folder.
    result : dict
        ``sinkhorn_bench.collect()``'s return: ``rows`` (per-iteration rows) and
        ``default_call`` (rows of the default-call table).
    ceil : dict or None
        Measured ceilings (empty or None: no floor).
    env : dict, optional
        :func:`environment`'s dict (measured here when not given).

    Returns
    -------
    dict
        ``{"files": [names written], "skipped": {name: reason}}``. When the
        figure is skipped, one line saying why is printed.
    """
    env = environment() if env is None else env
    rows = annotate(result.get("rows", []), ceil)
    payload = dict(environment=env, ceilings=dict(ceil or {}), rows=rows,
                   default_call=list(result.get("default_call", [])))
    with open(os.path.join(folder, SINKHORN_JSON), "w") as fh:
        json.dump(payload, fh, indent=1)
    files, skipped = [SINKHORN_JSON], {}
    title = f"Sinkhorn, time per iteration (eps = 0.5, float32)\n{env['device']}"
    try:
        write_figure(os.path.join(folder, SINKHORN_PNG), rows, ceil, title=title)
        files.append(SINKHORN_PNG)
    except ImportError as exc:
        skipped[SINKHORN_PNG] = f"matplotlib is not importable ({exc}); pip install matplotlib"
    except ValueError as exc:
        skipped[SINKHORN_PNG] = str(exc)
    for name, why in skipped.items():
        print(f"plot skipped: {os.path.join(folder, name)} not written: {why}", flush=True)
    return dict(files=files, skipped=skipped)


def readme(*, command: str, env: dict, ceil: dict | None, suites: list[str], files: list[str],
           skipped: dict | None = None, sinkhorn_rows: list[dict] | None = None,
           date: datetime | None = None) -> str:
    """Text of the results folder's ``README.md``.

    Parameters
    ----------
    command : str
        The command line that produced the folder.
    env : dict
        :func:`environment`'s dict.
    ceil : dict or None
        Measured ceilings: empty when there is no GPU, None when this run did
        not measure them.
    suites : list of str
        Suites run, with their outcome (e.g. ``"plan (exit 0)"``).
    files : list of str
        Files of the folder, other than README.md.
    skipped : dict, optional
        Files not written, with the reason.
    sinkhorn_rows : list of dict, optional
        The sinkhorn suite's rows; their fraction-of-floor table is included
        when given.
    date : datetime, optional
        Time of the run (default: now, UTC).
    """
    date = datetime.now(timezone.utc) if date is None else date
    lines = [
        "# otlinop benchmark results",
        "",
        f"- command: `{command}`",
        f"- date: {date.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}",
        f"- device: {env['device']}",
        f"- versions: Python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
        f"otlinop {env['otlinop']}",
        "- ceilings: not measured in this run (no suite needed them)" if ceil is None
        else "- ceilings: none (no GPU)" if not ceil else f"- {timing.format_ceilings(ceil)}",
        f"- suites: {', '.join(suites) if suites else 'none'}",
        f"- files: {', '.join(files) if files else 'none'}",
    ]
    for name, why in (skipped or {}).items():
        lines.append(f"- not written: {name}: {why}")
    if sinkhorn_rows is not None:
        lines += [
            "",
            "## Sinkhorn: fraction of the floor",
            "",
            "Floor of one full iteration (both potentials): max(2 n m / exp2 rate, 2 n m d / dot rate) "
            "(docs/benchmark-method.md section 3: the dots shared by the two half-steps, not the exponentials), "
            "with the rates measured in this run and the dot rate of the row's precision (strict fp32, TF32, "
            "or a third of TF32 for tf32x3); fraction = floor / measured time, 1 at the floor. "
            + ("" if ceil else "No ceilings were measured (no CUDA GPU), so there is no floor. ")
            + (f"Figure: `{SINKHORN_PNG}`." if SINKHORN_PNG in files else ""),
            "",
            fraction_table(sinkhorn_rows, ceil),
        ]
    return "\n".join(lines).rstrip() + "\n"
