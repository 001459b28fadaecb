"""Whole calls as cached CUDA graphs: the loss's solve and its gradient passes.

A ``SamplesLoss`` call at n = 2048 runs about 300 small kernels, and its
host work (Python, launches) is ten times its device time. A CUDA graph of
the whole solve (every eps step, the loss value) and one of the gradient
passes replay those kernels with one host call each. :class:`CallGraphCache`
keeps such graphs, keyed on everything that decides which kernels run:

- the function and its options (for the loss: the :class:`Spec`, i.e. the
  final eps, reach, debias, cost scale, backend and precision, and the
  length of the eps schedule; for the gradients also which ones are needed),
- the shape, dtype and device of every input tensor (not its strides: a
  call's inputs are copied into the graph's own buffers),
- every ``config`` switch (``config.state()``).

A key seen for the first time runs eagerly (which also compiles and
autotunes the kernels). The second time, the call is checked not to
synchronise with the host (a dry run under
``torch.cuda.set_sync_debug_mode("error")``; a call that does is never
captured), captured, and replayed; later calls copy their inputs into the
graph's buffers (one foreach copy), replay, and copy the outputs out (one
fused kernel per dtype), so nothing a caller holds is overwritten by a later replay.

What invalidates an entry: any change of the key. With the default
``diameter`` the schedule comes from the data's bounding box, which moves
with the points of a training loop. So the loss passes its schedule (but
the final eps) as an input tensor, whose kernels read eps from device
memory: the key holds the schedule's length, not its values, and a loop
whose points move replays the same graph until the diameter changes by a
factor that adds or removes a step (a factor 1/scaling). The gradient
passes depend on the final eps only; their key leaves the schedule out.
Both graphs replay from the third call of a key on.

Memory: an entry holds a copy of its inputs and outputs and the private
memory pool of the captured work (the intermediates of one call, a few times
the inputs' size). At most ``capacity`` entries are kept (least recently
used evicted), and calls whose inputs hold more than ``max_elements``
elements run eagerly (their device time dwarfs the host's). ``clear()``
releases everything.

Threads and streams: a cache's captures and replays run under one lock, and
a replay on one stream waits (a CUDA event) for the previous replay of its
entry, on whatever stream, to have copied its outputs out.

Graphs are used only where they are exact and safe: CUDA (or the graph
machinery a test passes), ``config.sinkhorn_graphs`` on, no capture or
``torch.compile`` tracing in progress, plain tensors (no torch.func wrappers,
no subclasses). A replay runs the captured kernels on the same kind of
buffers in the same order: the results equal those of the eager call, except
where the eager call made a host-side choice that a capture cannot make
(``precision="tf32"`` with ``config.half_tf32`` at d >= ``half_tf32_min_d``:
a captured pair keeps fp32 TF32 operands, see ``otlinop.kernels._layout``).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch

from solvers import config
from solvers.graphs import CUDA_GRAPHS

from .kernels._layout import scoped_cache

__all__ = ["CallGraphCache", "LOSS_GRAPHS"]


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


class _Entry:
    """A captured call: the graph, its input buffers and its output buffers."""

    def __init__(self, graph, inputs, outputs):
        self.graph, self.inputs, self.static_outputs = graph, inputs, outputs
        # Recorded after each replay's outputs are copied out: a call on another stream waits
        # for it before overwriting the inputs (calls on one stream are ordered anyway).
        self.done = torch.cuda.Event() if inputs[0].is_cuda else None

    def outputs(self) -> tuple:
        # Fresh copies (a later replay overwrites the buffers), made by one fused kernel
        # per dtype; multiplying by 1 is exact (NaN, inf and -0 included).
        return tuple(torch._foreach_mul(list(self.static_outputs), 1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.inputs, *self.static_outputs))


class CallGraphCache:
    """Cached CUDA graphs of pure tensor functions (module docstring).

    Parameters
    ----------
    graphs : solvers.graphs.CudaGraphs or compatible, optional
        The graph machinery (default ``CUDA_GRAPHS``); the test suite passes
        a CPU stand-in whose "graphs" replay the captured function.
    capacity : int, default 8
        Captured entries kept (least recently used evicted).
    max_elements : int, default 2**22
        Calls whose input tensors hold more elements run eagerly: an entry's
        memory is a small multiple of its inputs' (the prepared clouds are
        padded to the tensor-core width, 16 columns at d = 3: about 100 MiB
        for an entry at the bound), and calls that large spend their time on
        the device anyway. The loss's solve at n = m = 16384, d = 64 holds
        about 2^21 input elements; at d = 3 the bound is n = m = 2^19.
    """

    #: Keys remembered as seen once (a key is captured at its second sighting).
    SEEN = 64

    def __init__(self, graphs=None, *, capacity: int = 8, max_elements: int = 1 << 22):
        self.graphs = CUDA_GRAPHS if graphs is None else graphs
        self.capacity, self.max_elements = capacity, max_elements
        self._entries: OrderedDict = OrderedDict()   # key -> _Entry, or None: never capture
        self._seen: OrderedDict = OrderedDict()
        self._lock = threading.RLock()
        self.captures = self.replays = 0

    def __call__(self, fn, options, tensors: tuple) -> tuple:
        """``fn(options, *tensors)`` (a sequence of tensors), replayed from a cached graph where possible.

        ``fn`` is a module-level function (part of the key); ``options``
        (hashable, part of the key) holds everything besides the tensors that
        decides what it computes.
        """
        if not self.eligible(tensors):
            return tuple(fn(options, *tensors))
        key = (fn, options, config.state(),
               tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                entry = self._entries[key]
            elif key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > self.SEEN:
                    self._seen.popitem(last=False)
                entry = None
            else:
                del self._seen[key]
                entry = self._capture(fn, options, tensors)
                self._entries[key] = entry
                self._trim()
            if entry is not None:
                # Under the lock: another thread's call of this key waits for the copy-out.
                return self._replay(entry, tensors)
        return tuple(fn(options, *tensors))

    def eligible(self, tensors) -> bool:
        """Whether a call on ``tensors`` (a sequence) may use a graph now: the conditions of
        the module docstring. A caller may ask first, to pass values that a graph would
        otherwise bake in (the loss's eps schedule) as tensors."""
        # The cheap test first: on the CPU (no graphs) nothing else is looked at.
        if not config.sinkhorn_graphs or not tensors or not self.graphs.available(tensors[0].device):
            return False
        device = tensors[0].device
        if not all(_plain(t) and t.device == device for t in tensors):
            return False
        if sum(t.numel() for t in tensors) > self.max_elements or torch.compiler.is_compiling():
            return False
        return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    def _capture(self, fn, options, tensors) -> _Entry | None:
        """The entry of ``fn`` on buffers like ``tensors``, or None when ``fn`` synchronises."""
        device = tensors[0].device
        inputs = tuple(t.detach().clone() for t in tensors)
        k = len(inputs)
        with torch.no_grad():
            # Each run in its own scope of prepared pairs: the capture must record the
            # preparation of its buffers, not reuse the dry run's.
            probe = []
            with scoped_cache():
                # The dry run checks for host synchronisations (on CUDA) and gives the outputs' shapes.
                if self.graphs.synchronises(lambda s: probe.extend(fn(options, *s)), inputs):
                    return None
                if not probe:
                    probe = list(fn(options, *inputs))
            outputs = tuple(torch.empty_like(o) for o in probe)
            del probe
            try:
                with scoped_cache():
                    graph, _ = self.graphs.capture(lambda s: (*s[:k], *fn(options, *s[:k])),
                                                   (*inputs, *outputs), device, copy=False)
            except RuntimeError as exc:
                # Not expected after a clean dry run; the call (and its key, from now on) runs eagerly.
                warnings.warn(f"{getattr(fn, '__name__', 'a call')}: capturing it as a CUDA graph failed "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); this call and "
                              "later ones like it run eagerly", RuntimeWarning, stacklevel=4)
                return None
        self.captures += 1
        return _Entry(graph, inputs, outputs)

    def _replay(self, entry: _Entry, tensors) -> tuple:
        with torch.no_grad():
            if entry.done is not None:
                torch.cuda.current_stream(entry.inputs[0].device).wait_event(entry.done)
            torch._foreach_copy_(list(entry.inputs), [t.detach() for t in tensors])
            entry.graph.replay()
            self.replays += 1
            out = entry.outputs()
            if entry.done is not None:
                entry.done.record(torch.cuda.current_stream(entry.inputs[0].device))
            return out

    def _trim(self) -> None:
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every graph, its buffers and its memory pool, and forget the keys seen."""
        with self._lock:
            self._entries.clear()
            self._seen.clear()

    def nbytes(self) -> int:
        """Bytes of the entries' input and output buffers (their pools' intermediates not counted)."""
        return sum(e.nbytes() for e in self._entries.values() if e is not None)

    def __len__(self) -> int:
        return sum(e is not None for e in self._entries.values())

    def __repr__(self) -> str:
        return (f"CallGraphCache({len(self)} graphs, {self.nbytes() / 2**20:.1f} MiB of buffers, "
                f"capacity {self.capacity})")


#: The loss's cache (``otlinop.loss.LOSS_GRAPHS``): ``LOSS_GRAPHS.clear()`` frees it.
LOSS_GRAPHS = CallGraphCache()
