"""The iteration loop of the Krylov solvers: eager, or replayed as a CUDA graph.

A solver describes one iteration as two functions of its state (a
NamedTuple of device tensors with an ``active`` mask): ``update`` (the
operator's application and the updates it feeds) and ``direction`` (the
preparation of the next iteration, skipped after the last one). Stopping is
decided on the device (frozen columns take zero steps); the host looks at
``active`` only every ``every`` iterations.

With ``graph=True`` on a CUDA device, after one eager iteration (which
compiles and tunes every kernel involved), one iteration is captured into a
CUDA graph and replayed, ``every`` replays between two looks at ``active``:
a replay launches all the iteration's kernels with one call, so the loop no
longer pays the host's cost of each of its small kernels. Replays run the
same kernels on the same buffers in the same order as the eager loop: the
results are bitwise the same. An operator or preconditioner that
synchronises with the host cannot be captured; one dry product under torch's
sync debug mode finds it first, and the loop stays eager. The graph
machinery (where graphs run, the warm-up stream, the sync probe, the
capture) is an argument, a ``solvers.graphs.CudaGraphs`` by default.

A ``GraphCache`` keeps the captured iteration for the next solve with the
same operator, preconditioner and right-hand-side shape: that solve copies
its initial state into the graph's buffers and replays at once, without the
eager iteration, the dry product and the capture.
"""

from __future__ import annotations

from .graphs import GraphCache


def _eager(update, direction, report, state, start, maxiter, every):
    """Iterations ``start .. maxiter - 1`` (fewer once every column stopped); returns the state."""
    for it in range(start, maxiter):
        state = update(state)
        report(state)
        if it == maxiter - 1 or ((it + 1) % every == 0 and not bool(state.active.any())):
            break
        state = direction(state)
    return state


def _capture(update, direction, state, device, graphs):
    """A CUDA graph of one solver iteration on ``state``'s own buffers (the solver's,
    updated in place by every iteration)."""
    try:
        return graphs.capture(lambda s: direction(update(s)), state, device, copy=False)
    except RuntimeError as err:
        raise RuntimeError(
            "graph=True: capturing the solver's iteration as a CUDA graph failed although its products "
            "do not synchronise with the host; the operator or the preconditioner does something a CUDA "
            "graph cannot hold (torch's CUDA state may now be unusable). Use graph=False.") from err


def run_loop(update, direction, report, state, *, maxiter: int, every: int, graphs, device, probe=None,
             cache: GraphCache | None = None, key=None, keep=()):
    """Run up to ``maxiter`` iterations; return the final state.

    ``report(state)`` is called after each eager ``update`` (the solvers'
    callback; a solver passes ``graphs=None`` when it has one). ``graphs``:
    None for the eager loop, or the graph machinery (a
    ``solvers.graphs.CudaGraphs``), used where it is ``available`` on
    ``device``. Then ``probe(state)`` applies the operator and the
    preconditioner once (results discarded): if that synchronises with the
    host, the loop stays eager. With a ``cache``, a graph stored under ``key`` is replayed
    on a copy of ``state``; otherwise the one captured here is stored there,
    with ``keep`` (what the solver's closures read) held alive beside it.
    Either way the returned state is then the graph's buffers, which the
    next solve from that cache overwrites: the caller copies what it keeps.
    """
    if not (graphs is not None and graphs.available(device) and maxiter > 2):
        return _eager(update, direction, report, state, 0, maxiter, every)
    hit = cache.lookup(key) if cache is not None else None
    if hit is not None:
        g, static = hit
        for dst, src in zip(static, state):
            dst.copy_(src)
        state, done = static, 0
    else:
        # One eager iteration on a side stream, as CUDA graphs want: it compiles and
        # tunes the kernels and creates the library handles before the capture.
        with graphs.side_stream(device):
            state = update(state)
            report(state)
            state = direction(state)
        done = 1
        if probe is not None and graphs.synchronises(probe, state):
            return _eager(update, direction, report, state, done, maxiter, every)
        # One iteration is captured and replayed: a replay costs the host one call
        # whatever the number of kernels, so the GPU, not the host, sets the pace.
        g, state = _capture(update, direction, state, device, graphs)
        if cache is not None:
            cache.store(key, g, state, (update, direction, keep))
    while maxiter - done > 1:
        reps = min(every, maxiter - 1 - done)
        for _ in range(reps):
            g.replay()
        done += reps
        if not bool(state.active.any()):
            break
    else:
        # The last iteration (it skips the direction).
        state = _eager(update, direction, report, state, done, maxiter, every)
    return state
