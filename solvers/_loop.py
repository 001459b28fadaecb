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
"""

from __future__ import annotations

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


def capture(step, state, device):
    """A CUDA graph of ``state <- step(state)`` on static copies of ``state`` (a tuple of tensors).

    Returns ``(graph, static)``: each replay runs the captured kernels on
    ``static``, in place. ``step`` must not synchronise with the host; a
    failed capture raises RuntimeError (torch's CUDA state may then be
    unusable).
    """
    clones = [t.clone() for t in state]
    static = type(state)(*clones) if hasattr(state, "_fields") else tuple(clones)   # NamedTuple or tuple
    graph = torch.cuda.CUDAGraph()
    # capture_begin/end on a side stream, as torch.cuda.graph does, without its
    # gc.collect() and empty_cache() on entry: those cost milliseconds in a large
    # process, more than the loops this serves.
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        graph.capture_begin()
        try:
            out = step(static)
            for dst, src in zip(static, out):
                if dst is not src:      # a step that updates its state in place needs no copy
                    dst.copy_(src)
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return graph, static


def _capture(update, direction, state, device):
    """A CUDA graph of one solver iteration on static copies of ``state``."""
    try:
        return capture(lambda s: direction(update(s)), state, device)
    except RuntimeError as err:
        raise RuntimeError(
            "graph=True: capturing the solver's iteration as a CUDA graph failed although its products "
            "do not synchronise with the host; the operator or the preconditioner does something a CUDA "
            "graph cannot hold (torch's CUDA state may now be unusable). Use graph=False.") from err


def run_loop(update, direction, report, state, *, maxiter: int, every: int, graph: bool, device, probe=None):
    """Run up to ``maxiter`` iterations; return the final state.

    ``report(state)`` is called after each eager ``update`` (the solvers'
    callback; a solver passes ``graph=False`` when it has one). With
    ``graph``, ``probe(state)`` applies the operator and the preconditioner
    once (results discarded): if that synchronises with the host, the loop
    stays eager.
    """
    if not (graph and device.type == "cuda" and maxiter > 2):
        return _eager(update, direction, report, state, 0, maxiter, every)
    # One eager iteration on a side stream, as CUDA graphs want: it compiles and
    # tunes the kernels and creates the library handles before the capture.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        state = update(state)
        report(state)
        state = direction(state)
    torch.cuda.current_stream(device).wait_stream(side)
    done = 1
    if probe is None or not _synchronises(probe, state):
        # One iteration is captured and replayed: a replay costs the host one call
        # whatever the number of kernels, so the GPU, not the host, sets the pace.
        g, state = _capture(update, direction, state, device)
        while maxiter - done > 1:
            reps = min(every, maxiter - 1 - done)
            for _ in range(reps):
                g.replay()
            done += reps
            if not bool(state.active.any()):
                return state
    # The last iteration (it skips the direction), or all the rest when the operator synchronises.
    return _eager(update, direction, report, state, done, maxiter, every)
