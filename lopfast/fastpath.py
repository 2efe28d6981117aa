"""Model-level fast path: collapse every expanded conv of a model with one grouped launch.

In collapsed mode each ``ExpandedConv2d`` computes its effective kernel W3.W2.W1 when it runs:
a few small launches per layer forward and more backward, which for 50+ layers on a GPU
costs more than the maths. ``CollapsedForward(model)`` installs a forward pre-hook on the
model that collapses all of them at once (``lopfast.ops.collapse.collapse_many``: on the
Triton backend 2 grouped-GEMM launches forward and 4 backward for the whole model; on
"matmul" one batched GEMM per shape class and product) and hands each layer its kernel for that
forward; the gradients of all layers then flow back through one grouped backward.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from lopfast.layers.conv import ExpandedConv2d
from lopfast.ops.collapse import collapse_many

_STASH = "_lopfast_weff"  # read by ExpandedConv2d.effective_weight


class CollapsedForward:
    """Collapse all expanded convs of ``model`` in one grouped call before each forward.

    >>> fast = lopfast.CollapsedForward(model)      # hooks installed
    >>> loss = criterion(model(x), y); loss.backward()
    >>> fast.remove()                               # or: with lopfast.CollapsedForward(model): ...

    Layers in ``"chain"`` mode are left alone. The layer list is taken at construction (call
    ``refresh()`` after replacing modules). ``backend`` as in every lopfast op (None: Triton on
    CUDA, the reference on CPU). The state dict and parameters of ``model`` are unchanged: the
    factors are concatenated each step (see ``lopfast.ops.collapse`` for why that copy is the
    chosen trade-off). Each forward of the model recollapses, so calling it twice in a step
    (e.g. two crops) stays correct.
    """

    def __init__(self, model: nn.Module, *, backend: Optional[str] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.backend = backend
        self.layers: List[ExpandedConv2d] = []
        self.refresh()
        self._pre = model.register_forward_pre_hook(self._before)
        self._post = model.register_forward_hook(self._after)

    def refresh(self) -> None:
        """Re-scan the model for ``ExpandedConv2d`` layers."""
        self.layers = [m for m in self.model.modules() if isinstance(m, ExpandedConv2d)]

    def collapse_all(self) -> List[torch.Tensor]:
        """Effective kernels of every collapsed-mode layer (one grouped call), also stashed on them."""
        active = [m for m in self.layers if m.mode == "collapsed"]
        if not active:
            return []
        dev = active[0].weight1.device.type
        # autocast off, as in ExpandedConv2d.effective_weight: collapse in the parameters' dtype
        with torch.autocast(dev, enabled=False):
            weffs = collapse_many([(m.weight1, m.weight2, m.weight3, m.groups) for m in active], backend=self.backend)
        for m, w in zip(active, weffs):
            m.__dict__[_STASH] = w
        return weffs

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

    def __enter__(self) -> "CollapsedForward":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


__all__ = ["CollapsedForward"]
