"""CUDA graphs for iterative loops: capture one step, replay it, keep it.

A loop that launches the same kernels on the same buffers at every step
can capture one step as a CUDA graph and replay it: a replay launches all
the step's kernels with one host call, so small kernels no longer wait on
the host. Replays run the captured kernels on the captured buffers in the
same order as the eager step: the results are bitwise the same.

- :func:`capture`: the graph of ``state <- step(state)``. ``cg(graph=True)``
  captures its iteration with it, and so do otlinop's Sinkhorn loops.
- :class:`CudaGraphs`: what a loop asks of the graph machinery (whether
  graphs run on a device, a side stream for warm-ups, whether a product
  synchronises with the host, a capture). The loops take it as an
  argument, ``CUDA_GRAPHS`` by default; any object with the same four
  methods replaces it (a stand-in that replays the step eagerly on the
  CPU, for tests; a wrapper that times captures, for profiling).
- :class:`GraphCache`: one solver iteration's graph, kept from one solve to
  the next (``cg(A, b, graph=cache)``), with the ``CudaGraphs`` it uses.

This module knows nothing of optimal transport.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["capture", "CudaGraphs", "CUDA_GRAPHS", "GraphCache"]


@contextlib.contextmanager
def side_stream(device):
    """Work on a side stream ordered after, and before, the current one (what graph warm-ups want)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def capture(step, state, device, *, copy: bool = True):
    """A CUDA graph of ``state <- step(state)`` on static copies of ``state``.

    Parameters
    ----------
    step : callable
        ``step(state)`` returns the next state, a sequence of tensors in
        the order of ``state`` (a tensor it returns that is the input's
        own, updated in place, needs no copy). It must not synchronise with
        the host.
    state : tuple or NamedTuple of Tensor
    device : torch.device
        The CUDA device the step runs on.
    copy : bool, default True
        Capture on clones of ``state``; ``False`` captures on ``state``'s
        own tensors (``static`` is then ``state``), for a caller whose
        state buffers are its own.

    Returns
    -------
    (graph, static)
        ``graph.replay()`` runs the captured kernels on ``static`` (of
        ``state``'s type), in place.

    Raises
    ------
    RuntimeError
        If the capture fails; torch's CUDA state may then be unusable, so
        a caller checks first that ``step`` does not synchronise.
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
    with side_stream(device):
        graph.capture_begin()
        try:
            out = step(static)
            for dst, src in zip(static, out):
                if dst is not src:      # a step that updates its state in place needs no copy
                    dst.copy_(src)
        finally:
            graph.capture_end()
    return graph, static


class CudaGraphs:
    """The CUDA-graph machinery a loop uses, as one object it takes as an argument.

    A loop asks it four things, through the methods below. The default,
    ``CUDA_GRAPHS``, is an instance of this class; an object with the same
    four methods replaces it, e.g. ``GraphCache(graphs=...)``: the test
    suite's CPU stand-in, whose ``capture`` returns a "graph" whose replay
    calls the step, or a subclass that counts or times captures. It holds
    no state.

    Examples
    --------
    >>> import torch
    >>> from solvers.graphs import CUDA_GRAPHS
    >>> CUDA_GRAPHS.available(torch.device("cpu"))
    False
    """

    def available(self, device) -> bool:
        """Whether a loop on ``device`` can run as a CUDA graph."""
        return device.type == "cuda"

    def side_stream(self, device):
        """A context manager: the warm-up iteration before a capture runs on a side stream."""
        return side_stream(device)

    def synchronises(self, probe, state) -> bool:
        """Whether ``probe(state)`` synchronises with the host, which a CUDA graph cannot hold.

        ``probe`` applies the loop's operator and preconditioner once (its
        results are discarded) under ``torch.cuda.set_sync_debug_mode
        ("error")``, which raises at any synchronising call. A capture that
        fails part way leaves torch's CUDA state unusable (its random
        generator and allocator stay in capture mode), so a loop never
        attempts one on such an operator.
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

    def capture(self, step, state, device, *, copy: bool = True):
        """:func:`capture`."""
        return capture(step, state, device, copy=copy)

    def __repr__(self) -> str:
        return "CudaGraphs()"


#: The graph machinery of the loops unless told otherwise.
CUDA_GRAPHS = CudaGraphs()

_METHODS = ("available", "side_stream", "synchronises", "capture")


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
    ``graph=True`` (where its ``graphs`` is not ``available``).

    Parameters
    ----------
    graphs : CudaGraphs or compatible object, optional
        The graph machinery the solves through this cache use (default
        ``CUDA_GRAPHS``): any object with the methods ``available``,
        ``side_stream``, ``synchronises`` and ``capture`` of
        :class:`CudaGraphs`. The test suite passes a CPU stand-in here.

    Examples
    --------
    >>> import functools, solvers
    >>> cache = solvers.GraphCache()
    >>> solver = functools.partial(solvers.cg, graph=cache)   # e.g. for loss_hessian_operator(..., solver=solver)
    >>> cache
    GraphCache(empty)
    """

    def __init__(self, graphs=None):
        if graphs is None:
            graphs = CUDA_GRAPHS
        missing = [name for name in _METHODS if not callable(getattr(graphs, name, None))]
        if missing:
            raise TypeError(f"GraphCache: graphs must have the methods {', '.join(_METHODS)} of "
                            f"solvers.graphs.CudaGraphs, got {type(graphs).__name__} without {', '.join(missing)}")
        self.graphs = graphs
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
