"""CUDA graphs for lopfast, and the stand-in that tests their plumbing on the CPU.

One mechanism serves every capture in the package: the collapse replayed by
``lopfast.fastpath.GraphedCollapse``, the whole training step of ``lopfast.pipeline.step``, and
the dispatch's timing of candidates by their GPU time inside a graph (``lopfast.dispatch``).

``Graph(emulate=False)`` is a ``torch.cuda.CUDAGraph``. ``Graph(emulate=True)`` is a stand-in
with the same aliasing and the same observable order of work, so the plumbing around a capture
(static buffers, in-place state, the tensors a capture returns, what runs during a capture) is
tested on a machine without a GPU:

* ``capture(fn)`` records ``fn``. A CUDA capture runs the Python of ``fn`` but executes none of
  its GPU work; the tensors it returns live in graph memory and hold their values only after a
  replay. The stand-in runs ``fn`` once at capture only to allocate the tensors it returns
  (``outputs=True``, for pure functions such as the collapse); with ``outputs=False`` (functions
  whose work is their side effects, such as a training step) it runs nothing, as CUDA does.
* ``replay()`` reruns the recorded work: CUDA replays the graph; the stand-in calls ``fn`` again
  and copies its results into the tensors the capture returned.

``capturing()`` says whether lopfast code runs inside a capture: a CUDA stream capture on the
current stream, or the stand-in's capture or replay (both stand for Python that runs while CUDA
records). Code that must not time, allocate host tables or synchronise during a capture checks it.

Three rules every capture of the package follows (they live here, so no capture can miss them):

* **Other threads stay free** (``CAPTURE_ERROR_MODE = "thread_local"``). CUDA's default capture
  mode ("global") forbids potentially unsafe calls (``cudaMalloc``, ``cudaHostAlloc``, a
  synchronisation) in *every* thread of the process while any stream captures: a DataLoader's
  pin-memory thread pinning the next batch then gets a capture error, re-raises it at the next
  batch, and the step's eager fallback cannot catch it. "thread_local" forbids them only in the
  capturing thread, which is the one whose work is recorded.
* **Warm-up runs what the capture records** (``planned()``): code that would launch other
  kernels eagerly than under capture (the SP loss's device-side pair table exists only outside
  capture) asks ``capture_planned()`` and takes the capturable path already in the eager
  warm-up steps, so every kernel a graph records was compiled and loaded before the capture.
  It is a process-wide count, not a thread-local one: autograd runs CUDA backward passes in its
  own threads.
* **A graph keeps what it reads** (``retain(obj)``): device tables baked into a capture (the
  grouped collapse's launch tables) are held by the graph itself, so no cache eviction can
  free memory that a later replay still reads.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["CAPTURE_ERROR_MODE", "Graph", "capture_planned", "capturing", "copy_into", "planned", "retain"]

# cudaStreamCaptureMode of every capture (see the module docstring: other threads stay free)
CAPTURE_ERROR_MODE = "thread_local"

_state = threading.local()
_planned_lock = threading.Lock()
_planned = [0]  # process-wide: see planned()


def capturing() -> bool:
    """True inside a CUDA stream capture on the current stream, or inside an emulated capture
    or replay (``Graph(emulate=True)``)."""
    if getattr(_state, "emulated", 0):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def planned():
    """Inside this block the work is the warm-up or the capture of a CUDA graph (or its
    stand-in): ``capture_planned()`` is True in every thread, autograd's included."""
    with _planned_lock:
        _planned[0] += 1
    try:
        yield
    finally:
        with _planned_lock:
            _planned[0] -= 1


def capture_planned() -> bool:
    """True inside ``planned()`` or a capture: code with an eager-only fast path (launches a
    capture could not record) takes its capturable path, so warm-up and capture run the same
    kernels."""
    return _planned[0] > 0 or capturing()


def retain(obj) -> None:
    """Keep ``obj`` alive as long as the graph being captured in this thread (no-op outside a
    capture): for device memory a capture reads that the caller's caches might free later."""
    graph = getattr(_state, "graph", None)
    if graph is not None:
        graph.retained.append(obj)


@contextlib.contextmanager
def _capturing_into(graph: "Graph"):
    prev = getattr(_state, "graph", None)
    _state.graph = graph
    try:
        yield
    finally:
        _state.graph = prev


@contextlib.contextmanager
def _emulating():
    _state.emulated = getattr(_state, "emulated", 0) + 1
    try:
        yield
    finally:
        _state.emulated -= 1


def copy_into(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i, as one multi-tensor call."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(list(dst), list(src))
    else:  # pragma: no cover - torch < 2.1
        for d, t in zip(dst, src):
            d.copy_(t)


class Graph:
    """A ``torch.cuda.CUDAGraph``, or (``emulate=True``) the CPU stand-in described in the module
    docstring. ``pool``/``stream``: as ``torch.cuda.graph`` takes them (CUDA only)."""

    def __init__(self, emulate: bool, pool=None, stream=None) -> None:
        self.emulate, self.pool, self.stream = emulate, pool, stream
        self.graph = None if emulate else torch.cuda.CUDAGraph()
        self.fn: Optional[Callable[[], Optional[List[torch.Tensor]]]] = None
        self.static: List[torch.Tensor] = []
        self.retained: List[object] = []  # what the recorded work reads besides its arguments (retain())

    def capture(self, fn: Callable[[], Optional[List[torch.Tensor]]], outputs: bool = True) -> List[torch.Tensor]:
        """Record ``fn``; returns the tensors it returned (in graph memory on CUDA), or [].

        ``outputs=False``: ``fn`` returns nothing and works by side effects only; the stand-in
        then runs nothing now (as a CUDA capture executes nothing), the first replay does the work."""
        if self.emulate:
            self.fn = fn
            if outputs:
                with _emulating(), _capturing_into(self):
                    self.static = list(fn() or [])
        else:
            cur = torch.cuda.current_stream()
            try:
                with _capturing_into(self), torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream,
                                                             capture_error_mode=CAPTURE_ERROR_MODE):
                    out = fn()
            except BaseException:
                # a capture that ends in an error (a host sync inside fn) can leave its stream current
                torch.cuda.set_stream(cur)
                raise
            self.static = list(out or []) if outputs else []
        return self.static

    def replay(self) -> None:
        """Run the recorded work again (the stand-in also refreshes the captured outputs)."""
        if self.emulate:
            with _emulating():
                out = self.fn()
            if self.static:
                with torch.no_grad():  # through .data: a graph replay bumps no version counter either
                    copy_into([t.data for t in self.static], list(out))
        else:
            self.graph.replay()

    def pool_handle(self):
        """The memory pool of this graph (CUDA), to share with a later capture; None for the stand-in."""
        return None if self.emulate else self.graph.pool()
