"""``python -m otlinop.bench {solvers,plan,sinkhorn,hvp,train,sparse,multiscale,all} [--results DIR | --no-results] [options]``.

Benchmarks measure on the GPU (CUDA events, medians) and print Markdown
tables; on a CPU-only machine they run tiny sizes and say so.

``--results DIR`` also writes each suite's Markdown to DIR/<suite>.md, the
sinkhorn rows to DIR/sinkhorn.json with a log-log figure DIR/sinkhorn.png
(time per iteration against n, the floor dashed), and DIR/README.md (command,
date, device, versions, ceilings, fraction of the floor of each Sinkhorn row).
``all`` writes to bench-results/<UTC timestamp>/ unless given --results DIR or
--no-results; a single suite writes files only when given --results DIR. The
other options go to the suites (``python -m otlinop.bench <suite> --help``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shlex
import sys
from datetime import datetime, timezone

SUITES = {
    "solvers": "otlinop.bench.solvers_bench",
    "plan": "otlinop.bench.plan_bench",
    "sinkhorn": "otlinop.bench.sinkhorn_bench",
    "hvp": "otlinop.bench.hvp_bench",
    "train": "otlinop.bench.train_bench",
    "sparse": "otlinop.bench.sparse_bench",
    "multiscale": "otlinop.bench.multiscale_bench",
}

#: Parent of the default results folder of ``all`` (relative to the working directory).
DEFAULT_RESULTS_ROOT = "bench-results"


class _Tee(io.TextIOBase):
    """Text stream writing to several streams (the terminal and a suite's .md file)."""

    def __init__(self, *streams):
        self._streams = streams

    def write(self, text):
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self._streams:
            stream.flush()


def split_results(argv: list[str], *, now: datetime | None = None) -> tuple[list[str], str | None]:
    """Take ``--results DIR`` / ``--results=DIR`` / ``--no-results`` out of ``argv``.

    Parameters
    ----------
    argv : list of str
        The arguments after ``python -m otlinop.bench`` (suite name included).
    now : datetime, optional
        Time for the default folder of ``all`` (default: now, UTC).

    Returns
    -------
    rest : list of str
        ``argv`` without the results options, for the suites' own parsers.
    results : str or None
        The folder to write to: the one given; for ``all`` without one,
        ``bench-results/<UTC timestamp>``; otherwise (or with ``--no-results``,
        or when help is asked for) None.

    Raises
    ------
    ValueError
        If ``--results`` has no folder after it, is given twice, or is given
        with ``--no-results``.
    """
    rest, results, disabled = [], None, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--results" or arg.startswith("--results="):
            if arg == "--results":
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    raise ValueError("--results needs a folder: --results DIR")
                value = argv[i + 1]
                i += 1
            else:
                value = arg.split("=", 1)[1]
                if not value:
                    raise ValueError("--results needs a folder: --results=DIR")
            if results is not None:
                raise ValueError(f"--results given twice ({results!r} and {value!r})")
            results = value
        elif arg == "--no-results":
            disabled = True
        else:
            rest.append(arg)
        i += 1
    if disabled and results is not None:
        raise ValueError("--results and --no-results contradict each other")
    if "-h" in rest or "--help" in rest:
        return rest, None   # only help is printed: nothing to write
    if results is None and not disabled and rest[:1] == ["all"]:
        now = datetime.now(timezone.utc) if now is None else now
        results = os.path.join(DEFAULT_RESULTS_ROOT, now.strftime("%Y%m%dT%H%M%SZ"))
    return rest, results


def usage_text() -> str:
    """The one-paragraph usage: the command line, the suites and where the options are listed."""
    return ("usage: python -m otlinop.bench {" + ",".join(SUITES) + ",all} [--results DIR | --no-results] "
            "[suite options]\n(python -m otlinop.bench --help lists every option)")


def help_text() -> str:
    """``--help``: what the benchmarks do, the results options, and every suite's options with their help."""
    parts = [usage_text().splitlines()[0], "", __doc__.strip().split("\n\n", 1)[1], "",
             "options of every command:",
             "  -h, --help      show this help and exit (after a suite name: that suite's help alone)",
             "  --results DIR   also write each suite's Markdown, the sinkhorn rows (JSON) and figure, and",
             "                  DIR/README.md (command, date, device, versions, ceilings)",
             "  --no-results    write no files (the default of a single suite; 'all' writes to",
             f"                  {DEFAULT_RESULTS_ROOT}/<UTC timestamp>/ unless given this)"]
    for suite, module_name in SUITES.items():
        parser = importlib.import_module(module_name).build_parser()
        options = parser.format_help().split("options:", 1)[-1]
        parts += ["", f"options of the {suite} suite (python -m otlinop.bench {suite} ...):" + options.rstrip()]
    parts += ["", "'all' runs the four suites in turn with the same options: give only options every suite "
                  "accepts, or none."]
    return "\n".join(parts)


def main(argv=None) -> int:
    """Run the suite(s) named in ``argv``; see the module docstring. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m otlinop.bench " + shlex.join(argv)
    try:
        argv, results = split_results(argv)
    except ValueError as exc:
        print(f"otlinop.bench: {exc}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*SUITES, "all"):
        asked = bool(argv) and argv[0] in ("-h", "--help")
        if not asked:
            print(f"otlinop.bench: name a suite ({', '.join(SUITES)}) or all"
                  + (f"; got {argv[0]!r}" if argv else ""), file=sys.stderr)
        print(help_text() if asked else usage_text())
        return 0 if asked else 2
    name, rest = argv[0], argv[1:]
    names = list(SUITES) if name == "all" else [name]
    if results is not None:
        os.makedirs(results, exist_ok=True)
    status = 0
    ran, files, skipped, sinkhorn = [], [], {}, None
    try:
        for suite in names:
            module = importlib.import_module(SUITES[suite])
            with contextlib.ExitStack() as stack:
                if results is not None:
                    md = stack.enter_context(open(os.path.join(results, f"{suite}.md"), "w"))
                    files.append(f"{suite}.md")
                    stack.enter_context(contextlib.redirect_stdout(_Tee(sys.stdout, md)))
                print(f"\n## otlinop.bench {suite}\n", flush=True)
                try:
                    if suite == "sinkhorn":
                        sinkhorn = module.collect(rest)
                        code = 0
                    elif suite in ("train", "multiscale"):
                        code = int(module.main(rest, results=results) or 0)
                        if results is not None:
                            files += [f for f in (f"{suite}.json", f"{suite}.png")
                                      if os.path.exists(os.path.join(results, f))]
                    else:
                        code = int(module.main(rest) or 0)
                except BaseException as exc:
                    ran.append(f"{suite} (stopped: {type(exc).__name__})")
                    raise
            ran.append(f"{suite} (exit {code})")
            status |= code
    finally:
        if results is not None:
            _write_report(results, command, ran, files, skipped, sinkhorn)
    return status


def _write_report(results, command, ran, files, skipped, sinkhorn) -> None:
    """Write the sinkhorn files (when that suite ran) and README.md into ``results``."""
    from ._report import environment, readme, write_sinkhorn
    from .timing import ceilings, ceilings_measured

    env = environment()
    # The floors need the ceilings; otherwise report them only if a suite measured them.
    ceil = ceilings() if (sinkhorn is not None or ceilings_measured()) else None
    if sinkhorn is not None:
        written = write_sinkhorn(results, sinkhorn, ceil, env=env)
        files += written["files"]
        skipped.update(written["skipped"])
    text = readme(command=command, env=env, ceil=ceil, suites=ran, files=files, skipped=skipped,
                          sinkhorn_rows=None if sinkhorn is None else sinkhorn["rows"])
    with open(os.path.join(results, "README.md"), "w") as fh:
        fh.write(text)
    print(f"\nresults written to {results}/: README.md, " + ", ".join(files), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
