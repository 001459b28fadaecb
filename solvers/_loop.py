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
sync debug mode finds it first, and the loop stays eager.

A ``GraphCache`` keeps the captured iteration for the next solve with the
same operator, preconditioner and right-hand-side shape: that solve copies
its initial state into the graph's buffers and replays at once, without the
eager iteration, the dry product and the capture.
"""

from __future__ import annotations

import contextlib

import torch


def _eager(update, direction, report, state, start, maxiter, every):
    """Iterations ``start .. maxiter - 1`` (fewer once every column stopped); returns the state."""
    for it in range(start, maxiter):
        state = update(state)
        report(state)
        if it == maxiter - 1 or ((it + 1) % every == 0 and not bool(state.active.any())):
            break
        state = direction(state)
    return state


class GraphCache:
    """The CUDA graph of one solver iteration, kept from one solve to the next.

    Pass it as ``cg(A, b, M=M, graph=cache)``: the first solve captures its
    iteration as ``graph=True`` does and leaves the graph here; a later solve
    with the same ``A`` and ``M`` objects and a right-hand side of the same
    shape, dtype and device copies its initial state into the graph's
    buffers and replays at once. It skips the eager first iteration, the dry
    product and the capture, which cost the host milliseconds: what repeated
    solves on one operator pay (a Hessian operator built once, Newton-CG,
    Lanczos). Results are bitwise those of the eager loop.

    The cache holds one graph and references to the operator and
    preconditioner it was captured with; another key replaces it. The
    graph replays the kernels on the memory they read at capture: an
    operator or preconditioner whose tensors are rebound (not updated in
    place) between two solves must not share a cache, and a factory such
    as ``jacobi()`` passed as the same object is bound once, at capture
    (pass a fresh factory, or ``clear()``, after changing ``A``).
    ``clear()`` drops the graph and its memory. Ignored on the CPU, like
    ``graph=True``.

    Examples
    --------
    >>> import functools, solvers
    >>> cache = solvers.GraphCache()
    >>> solver = functools.partial(solvers.cg, graph=cache)   # e.g. for loss_hessian_operator(..., solver=solver)
    >>> cache
    GraphCache(empty)
    """

    def __init__(self):
        self._key = None
        self._entry = None

    def lookup(self, key):
        """``(graph, static state)`` captured under ``key``, or None."""
        return self._entry[:2] if self._entry is not None and self._key == key else None

    def store(self, key, graph, static, keep):
        """Keep ``graph`` and its ``static`` state under ``key``; ``keep`` holds
        alive what the captured kernels read (the operator, the closures)."""
        self._key, self._entry = key, (graph, static, keep)

    def clear(self) -> None:
        """Drop the graph, its buffers and the references it holds."""
        self._key = self._entry = None

    def __repr__(self) -> str:
        if self._entry is None:
            return "GraphCache(empty)"
        first = self._entry[1][0]      # the solution's buffer, shaped like the right-hand side
        return f"GraphCache(shape={tuple(first.shape)}, dtype={first.dtype}, device={first.device})"


def _graph_device(device) -> bool:
    """Whether the loop can run as a CUDA graph on ``device``."""
    return device.type == "cuda"


@contextlib.contextmanager
def _side_stream(device):
    """Work on a side stream ordered after, and before, the current one (what graph warm-ups want)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _synchronises(probe, state) -> bool:
    """Whether ``probe(state)`` (the operator's and the preconditioner's products,
    on the current state, its results discarded) synchronises with the host,
    which a CUDA graph cannot hold: run under ``torch.cuda.set_sync_debug_mode
    ("error")``, which raises at any synchronising call.

    A capture that fails part way leaves torch's CUDA state unusable (its
    random generator and allocator stay in capture mode), so it is never
    attempted on such an operator.
    """
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        probe(state)
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return False


def capture(step, state, device, *, copy: bool = True):
    """A CUDA graph of ``state <- step(state)`` on static copies of ``state`` (a tuple of tensors).

    Returns ``(graph, static)``: each replay runs the captured kernels on
    ``static``, in place. ``copy=False`` captures on ``state``'s own tensors
    (``static`` is then ``state``): for a caller whose state buffers are its
    own. ``step`` must not synchronise with the host; a failed capture
    raises RuntimeError (torch's CUDA state may then be unusable).
    """
    if copy:
        clones = [t.clone() for t in state]
        static = type(state)(*clones) if hasattr(state, "_fields") else tuple(clones)   # NamedTuple or tuple
    else:
        static = state
    graph = torch.cuda.CUDAGraph()
    # capture_begin/end on a side stream, as torch.cuda.graph does, without its
    # gc.collect() and empty_cache() on entry: those cost milliseconds in a large
    # process, more than the loops this serves.
    with _side_stream(device):
        graph.capture_begin()
        try:
            out = step(static)
            for dst, src in zip(static, out):
                if dst is not src:      # a step that updates its state in place needs no copy
                    dst.copy_(src)
        finally:
            graph.capture_end()
    return graph, static


def _capture(update, direction, state, device):
    """A CUDA graph of one solver iteration on ``state``'s own buffers (the solver's,
    updated in place by every iteration)."""
    try:
        return capture(lambda s: direction(update(s)), state, device, copy=False)
    except RuntimeError as err:
        raise RuntimeError(
            "graph=True: capturing the solver's iteration as a CUDA graph failed although its products "
            "do not synchronise with the host; the operator or the preconditioner does something a CUDA "
            "graph cannot hold (torch's CUDA state may now be unusable). Use graph=False.") from err


def run_loop(update, direction, report, state, *, maxiter: int, every: int, graph: bool, device, probe=None,
             cache: GraphCache | None = None, key=None, keep=()):
    """Run up to ``maxiter`` iterations; return the final state.

    ``report(state)`` is called after each eager ``update`` (the solvers'
    callback; a solver passes ``graph=False`` when it has one). With
    ``graph``, ``probe(state)`` applies the operator and the preconditioner
    once (results discarded): if that synchronises with the host, the loop
    stays eager. With a ``cache``, a graph stored under ``key`` is replayed
    on a copy of ``state``; otherwise the one captured here is stored there,
    with ``keep`` (what the solver's closures read) held alive beside it.
    Either way the returned state is then the graph's buffers, which the
    next solve from that cache overwrites: the caller copies what it keeps.
    """
    if not (graph and _graph_device(device) and maxiter > 2):
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
        with _side_stream(device):
            state = update(state)
            report(state)
            state = direction(state)
        done = 1
        if probe is not None and _synchronises(probe, state):
            return _eager(update, direction, report, state, done, maxiter, every)
        # One iteration is captured and replayed: a replay costs the host one call
        # whatever the number of kernels, so the GPU, not the host, sets the pace.
        g, state = _capture(update, direction, state, device)
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
