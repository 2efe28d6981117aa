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
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["Graph", "capturing", "copy_into"]

_state = threading.local()


def capturing() -> bool:
    """True inside a CUDA stream capture on the current stream, or inside an emulated capture
    or replay (``Graph(emulate=True)``)."""
    if getattr(_state, "emulated", 0):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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

    def capture(self, fn: Callable[[], Optional[List[torch.Tensor]]], outputs: bool = True) -> List[torch.Tensor]:
        """Record ``fn``; returns the tensors it returned (in graph memory on CUDA), or [].

        ``outputs=False``: ``fn`` returns nothing and works by side effects only; the stand-in
        then runs nothing now (as a CUDA capture executes nothing), the first replay does the work."""
        if self.emulate:
            self.fn = fn
            if outputs:
                with _emulating():
                    self.static = list(fn() or [])
        else:
            cur = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream):
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
