"""Model-level fast path: collapse every expanded conv of a model with one grouped launch.

In collapsed mode each ``ExpandedConv2d`` computes its effective kernel W3.W2.W1 when it runs:
a few small launches per layer forward and more backward, which for 50+ layers on a GPU
costs more than the maths. ``CollapsedForward(model)`` installs a forward pre-hook on the
model that collapses all of them at once (``lopfast.ops.collapse.collapse_many``: on the
Triton backend 2 grouped-GEMM launches forward and 4 backward for the whole model; on
"matmul" one batched GEMM per shape class and product; under ``auto`` on CUDA each shape
class on its measured fastest backend) and hands each layer its kernel for that forward; the
gradients of all layers then flow back through one grouped backward.

``cuda_graph=True`` replays that collapse, forward and backward, as two CUDA graphs
(``GraphedCollapse``): for a small network (ResNet-56 on CIFAR), where the collapse is
launch-bound, one step costs 2 graph replays plus 2 multi-tensor copies instead of tens of
launches. It is correct by construction for the usual training loop because:

* the optimizer updates the factors in place, so their addresses (what the graph reads) stay
  fixed; every call checks the addresses, shapes, dtypes and ``requires_grad`` of all
  factors and captures afresh when any changed (``model.to(...)``, a reloaded parameter, a
  layer switched to chain mode);
* the gradients handed to autograd are fresh tensors (one multi-tensor copy of the graph's
  static gradients), so ``.grad`` never aliases graph memory: accumulation over several
  backward passes and ``zero_grad(set_to_none=False)`` stay right (returning the static
  buffers, as ``torch.cuda.make_graphed_callables`` does, lets autograd adopt them as
  ``.grad`` and the next replay overwrite it: tests/test_collapse_graph.py fails that way);
* the effective kernels it returns live in graph memory and are overwritten by the next
  forward, with the same values while the parameters are unchanged, which autograd requires
  between a forward and its backward anyway (two forwards per step, e.g. two crops, are
  fine; changing the factors between a forward and its backward is not detected, where eager
  autograd would raise);
* only forwards with grad enabled, on one CUDA device and dtype, replay; ``no_grad``
  forwards, CPU models and calls under ``torch.compile`` run the eager collapse.

The first graphed call warms up on a side stream (Triton compilation, the measured dispatch,
cuBLAS workspaces), then captures; that costs a few eager steps once. Inside a capture of a
larger graph (the whole training step of ``lopfast.pipeline.step``) the collapse is simply
recorded as part of it: no graph inside the graph.

Precision: the collapse follows the step's (``precision="step"``, the default). Under autocast
(bf16 or fp16) the factors are rounded to autocast's dtype and multiplied with fp32 accumulation,
and the kernels come out in that dtype, which is what the autocast conv casts them to anyway;
outside autocast it runs in the factors' dtype (fp32: IEEE unless TF32 is allowed).
``precision="params"`` always collapses in the factors' dtype (the kernels are then rounded once
by the conv's autocast cast). The error against the step's own precision is stated in
``lopfast.ops.collapse.collapse_many`` and checked by ``lopfast selfcheck``.

Host work: the collapse of one layer list is a ``CollapseProgram`` (validation, the measured
routing and the Triton plan done once); each forward only checks the layers' signature (about
1 us per factor) and runs it.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from lopfast.backend import check_backend
from lopfast.graphs import Graph, capturing, copy_into
from lopfast.layers.conv import ExpandedConv2d
from lopfast.ops._precision import autocast_dtype
from lopfast.ops.collapse import CollapseProgram, collapse_many

_STASH = "_lopfast_weff"  # read by ExpandedConv2d.effective_weight


def _fresh(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """New tensors with the values of ``ts``: one multi-tensor launch (x * 1 is exact)."""
    return list(torch._foreach_mul(list(ts), 1.0)) if ts else []


class GraphedCollapse:
    """The collapse of fixed factors as a forward graph and a backward graph (see the module
    docstring for why replaying them is exact). ``layers``: ``(w1, w2, w3, groups)`` tuples on
    one CUDA device; ``backend`` and ``dtype`` as in ``collapse_many``. ``emulate=True`` runs the
    same plumbing without CUDA graphs (for tests on CPU)."""

    def __init__(self, layers: Sequence[tuple], backend: Optional[str] = None, *, emulate: bool = False,
                 warmup: int = 2, dtype: Optional[torch.dtype] = None) -> None:
        self.layers = [tuple(layer) for layer in layers]
        self.backend, self.dtype = backend, dtype
        self.params = [w for layer in self.layers for w in layer[:3]]
        self.key = self.signature(self.layers)
        self.needs = [w for w in self.params if w.requires_grad]
        self._live: Optional[List[torch.Tensor]] = None
        # one side stream for warm-up and both captures: autograd runs each backward op on the
        # stream of its forward op, so the backward capture must be on the forward's stream
        stream = None if emulate else torch.cuda.Stream()
        if not emulate:
            self._warm_up(warmup, stream)
        pool = None if emulate else torch.cuda.graph_pool_handle()
        self.fwd, self.bwd = Graph(emulate, pool, stream), Graph(emulate, pool, stream)
        self.out = self.fwd.capture(self._forward)
        self.gout = [torch.empty_like(o) for o in self.out]
        self.grads = self.bwd.capture(self._backward) if self.needs else []
        if not emulate:
            self._live = None  # the captured autograd graph is spent; replays need none

    signature = staticmethod(CollapseProgram.signature_of)

    def _collapse(self) -> List[torch.Tensor]:
        return collapse_many(self.layers, backend=self.backend, dtype=self.dtype)

    def _forward(self) -> List[torch.Tensor]:
        with torch.enable_grad():
            outs = self._collapse()
        self._live = outs
        return [o.detach() for o in outs]

    def _backward(self) -> List[torch.Tensor]:
        diff = [(o, g) for o, g in zip(self._live, self.gout) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in diff], self.needs, [g for _, g in diff],
                                    retain_graph=self.fwd.emulate, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, self.needs)]

    def _warm_up(self, iters: int, stream) -> None:
        # Triton compilation, the measured dispatch (it never times during a capture) and
        # cuBLAS workspaces happen here, outside the capture, on the stream it will use
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(iters):
                outs = self._collapse()
                diff = [o for o in outs if o.requires_grad]
                if diff and self.needs:
                    torch.autograd.grad(diff, self.needs, [torch.ones_like(o) for o in diff], allow_unused=True)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def __call__(self) -> List[torch.Tensor]:
        """The effective kernels (in graph memory), connected to the factors for autograd."""
        return list(_Replay.apply(self, *self.params))


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: GraphedCollapse, *params: torch.Tensor):  # type: ignore[override]
        ctx.g = g
        g.fwd.replay()
        return tuple(o.detach() for o in g.out)  # new tensor objects over the static memory

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts: torch.Tensor):  # type: ignore[override]
        g: GraphedCollapse = ctx.g
        copy_into(g.gout, gouts)
        g.bwd.replay()
        fresh = iter(_fresh(g.grads))  # never hand graph memory to autograd (it may keep it as .grad)
        return (None, *[next(fresh) if w.requires_grad else None for w in g.params])


class CollapsedForward:
    """Collapse all expanded convs of ``model`` in one grouped call before each forward.

    >>> fast = lopfast.CollapsedForward(model)      # hooks installed
    >>> loss = criterion(model(x), y); loss.backward()
    >>> fast.remove()                               # or: with lopfast.CollapsedForward(model): ...

    Layers in ``"chain"`` mode are left alone. The layer list is taken at construction (call
    ``refresh()`` after replacing modules). ``backend`` as in every lopfast op (None: on CUDA
    each shape class on its measured fastest backend, the reference on CPU). ``cuda_graph``:
    replay the collapse forward and backward as CUDA graphs (module docstring; CUDA models
    with grad enabled only, else the eager collapse runs). ``precision``: ``"step"`` (default:
    under autocast the collapse runs in autocast's dtype with fp32 accumulation) or
    ``"params"`` (always in the factors' dtype); see the module docstring. The state dict and
    parameters of ``model`` are unchanged: the factors are packed into one buffer per step
    ("triton") or stacked per shape class ("matmul"), copies of O(parameters) beside the
    collapse's O(parameters x width) GEMMs. Each forward of the model recollapses, so calling it
    twice in a step (e.g. two crops) stays correct.
    """

    def __init__(self, model: nn.Module, *, backend: Optional[str] = None, cuda_graph: bool = False,
                 precision: str = "step") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if precision not in ("step", "params"):
            raise ValueError(f"precision must be 'step' or 'params', got {precision!r}")
        if backend is not None:  # named now, not at the first forward
            check_backend(backend, "backend", op="collapse")
        self.model = model
        self.backend = backend
        self.cuda_graph = cuda_graph
        self.precision = precision
        self.graph: Optional[GraphedCollapse] = None
        self.program: Optional[CollapseProgram] = None  # the one used last
        self._programs: dict = {}  # by context (see _program)
        self.captures = 0  # how many times the graphs were (re)captured
        self.programs = 0  # how many times the collapse program was (re)built
        self._emulate = False  # tests: the graph plumbing without CUDA graphs
        self.layers: List[ExpandedConv2d] = []
        self.refresh()
        if not self.layers:
            warnings.warn(f"CollapsedForward: the {type(model).__name__} has no ExpandedConv2d, so there is nothing "
                          "to collapse (expand it first: lopfast.expand(model)); its forward runs as it is",
                          stacklevel=2)
        self._pre = model.register_forward_pre_hook(self._before)
        self._post = model.register_forward_hook(self._after)

    def refresh(self) -> None:
        """Re-scan the model for ``ExpandedConv2d`` layers."""
        self.layers = [m for m in self.model.modules() if isinstance(m, ExpandedConv2d)]

    def _graphable(self, active: List[ExpandedConv2d]) -> bool:
        if not self.cuda_graph or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        dev, dtype = active[0].weight1.device, active[0].weight1.dtype
        if any(w.device != dev or w.dtype != dtype for m in active for w in (m.weight1, m.weight2, m.weight3)):
            return False  # one graph pair per device and dtype is not worth the bookkeeping
        if capturing():
            return False  # inside a larger capture (the whole step): recorded as part of it
        if not self._emulate and dev.type != "cuda":
            return False
        return any(w.requires_grad for m in active for w in (m.weight1, m.weight2, m.weight3))

    def compute_dtype(self, factor: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype the collapse runs in now (None: the factors' dtype); see ``precision``."""
        if self.precision != "step" or factor.dtype != torch.float32:
            return None
        return autocast_dtype(factor.device.type)

    def collapse_all(self) -> List[torch.Tensor]:
        """Effective kernels of every collapsed-mode layer (one grouped call), also stashed on them."""
        active = [m for m in self.layers if m.mode == "collapsed"]
        if not active:
            return []
        w0 = active[0].weight1
        layers = [(m.weight1, m.weight2, m.weight3, m.groups) for m in active]
        dtype = self.compute_dtype(w0)
        # autocast off: the collapse picks its precision itself (dtype), autocast would recast
        with torch.autocast(w0.device.type, enabled=False):
            if self._graphable(active):
                if (self.graph is None or self.graph.key != GraphedCollapse.signature(layers)
                        or self.graph.dtype != dtype):
                    self.graph = None  # free the old graphs' memory before capturing anew
                    self.graph = GraphedCollapse(layers, self.backend, emulate=self._emulate, dtype=dtype)
                    self.captures += 1
                weffs = self.graph()
            elif torch.compiler.is_compiling():
                weffs = collapse_many(layers, backend=self.backend, dtype=dtype)
            else:
                weffs = self._program(layers, dtype)(layers)
        for m, w in zip(active, weffs):
            m.__dict__[_STASH] = w
        return weffs

    def _program(self, layers: List[tuple], dtype: Optional[torch.dtype]) -> CollapseProgram:
        """The prepared collapse of ``layers`` under the current settings. One program is kept per
        context (backend, compute dtype, dispatch timing mode...): training (its step captured,
        "graph" timing) and evaluation (eager, no grad) alternate every epoch and each keeps its
        own, so neither is rebuilt or re-routed; new factors (another signature) drop them all."""
        context = CollapseProgram.context_of(self.backend, dtype)
        prog = self._programs.get(context)
        if prog is None or prog.signature != CollapseProgram.signature_of(layers):
            if prog is not None:
                self._programs.clear()  # the factors changed: every context's program is stale
            prog = self._programs[context] = CollapseProgram(layers, backend=self.backend, dtype=dtype)
            self.programs += 1
        self.program = prog
        return prog

    def _clear(self) -> None:
        for m in self.layers:
            m.__dict__.pop(_STASH, None)

    def _before(self, module, args):
        self.collapse_all()

    def _after(self, module, args, output):
        # drop the references: the graph keeps what backward needs, and a later direct call
        # of a layer (outside the model's forward) must not see stale kernels
        self._clear()

    def remove(self) -> None:
        """Uninstall the hooks and forget any stashed kernels."""
        self._pre.remove()
        self._post.remove()
        self._clear()
        self.graph = None
        self.program = None
        self._programs.clear()

    def __enter__(self) -> "CollapsedForward":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


__all__ = ["CollapsedForward", "GraphedCollapse"]
