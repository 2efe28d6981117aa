"""How torch-pruning must trace a model so that every path that will ever run is pruned consistently.

torch-pruning builds its dependency graph from one forward pass and always runs it in eval
mode. Two kinds of torchvision classifiers need more:

* **Layers that run only in training** (GoogLeNet's ``aux1``/``aux2``, Inception-v3's
  ``AuxLogits``, torchvision's default when built without weights): traced in eval mode, the
  auxiliary heads are not in the graph, keep their old input widths after pruning, and the
  first training forward fails (``weight of size [128, 512, 1, 1], expected input[4, 175, 4, 4]
  to have 512 channels``). :class:`Tracing` finds them (conv/linear layers that run in a
  training-mode forward but not in the eval one) and then traces the *training* forward
  (BatchNorm and dropout kept in eval mode, so statistics are untouched and the trace is
  deterministic). The eval path is part of the training path in these models, so one graph
  covers both. If the training forward cannot run on ``example_inputs`` (Inception-v3's
  auxiliary head needs 299 px inputs), pruning is refused up front with that reason.
* **ShuffleNetV2's channel shuffle** (see :mod:`lopfast.prune.shuffle`): the blocks are traced
  without the shuffle, which makes every group that does not cross a shuffle (the stem, each
  block's inner branch channels, the last 1x1 conv) traceable; the lanes that do cross it are
  pruned by :func:`lopfast.prune.shuffle.prune_lanes`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from lopfast.prune.importance import require_tp

_NORM_OR_DROPOUT = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _call(model: nn.Module, example_inputs):
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def training_forward(model: nn.Module):
    """``model`` in training mode with BatchNorm and dropout in eval mode (modes restored after):
    the training-only paths run, the statistics stay untouched and the output is deterministic."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, _NORM_OR_DROPOUT):
            m.eval()
    try:
        yield model
    finally:
        for m, t in modes.items():
            m.training = t


def _ran_layers(model: nn.Module, example_inputs, train: bool) -> List[str]:
    ran: List[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda mod, i, o: ran.append(names[mod]))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            if train:
                with training_forward(model):
                    _call(model, example_inputs)
            else:
                was = model.training
                model.eval()
                try:
                    _call(model, example_inputs)
                finally:
                    model.train(was)
    finally:
        for h in handles:
            h.remove()
    return ran


class Tracing:
    """How to trace ``model`` for torch-pruning (built once per :func:`lopfast.prune` call).

    ``train_only``: the conv/linear layers that run in training mode only (auxiliary heads);
    when there are any, :attr:`forward_fn` traces the training forward. ``shuffle``: whether the
    model has ShuffleNetV2 blocks (traced without their shuffle, see :meth:`patched`).
    """

    def __init__(self, model: nn.Module, example_inputs) -> None:
        from lopfast.prune.shuffle import shuffle_blocks

        self.shuffle = bool(shuffle_blocks(model))
        self.train_only: List[str] = []
        self.train_error: Optional[str] = None
        with self.patched(model):
            eval_ran = set(_ran_layers(model, example_inputs, train=False))
            try:
                train_ran = _ran_layers(model, example_inputs, train=True)
            except Exception as e:  # reported only when the training path matters (train_only)
                self.train_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                train_ran = None
        if train_ran is None:
            # the eval forward ran: a training path that fails can only differ by extra layers;
            # find them by the modules that never ran (the auxiliary heads)
            every = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            self.train_only = [n for n in every if n not in eval_ran and _has_aux_parent(n)]
        else:
            self.train_only = sorted(set(train_ran) - eval_ran)

    @property
    def train(self) -> bool:
        """Whether the training forward is traced (the model has training-only layers)."""
        return bool(self.train_only)

    def check(self) -> None:
        """Raise ValueError when training-only layers exist but the training forward fails."""
        if self.train_only and self.train_error is not None:
            raise ValueError(
                f"example_inputs: the model has layers that run only in training ({self.train_only[:3]}"
                f"{' ...' if len(self.train_only) > 3 else ''}: auxiliary heads) and its training forward fails on "
                f"example_inputs ({self.train_error}); they could not be pruned consistently with the rest, so the "
                "pruned model would break at its first training step. Give example_inputs at the size you train "
                "on (Inception-v3's auxiliary head needs 299x299), or build the model without auxiliary heads "
                "(aux_logits=False)")

    @property
    def forward_fn(self) -> Optional[Callable]:
        """torch-pruning's ``forward_fn``: the training forward when needed (it forces eval mode first)."""
        if not self.train:
            return None

        def fn(model, example_inputs):
            with training_forward(model):
                return _call(model, example_inputs)

        return fn

    @contextlib.contextmanager
    def patched(self, model: nn.Module):
        """``model``'s shuffle blocks run without their channel shuffle for the duration (torch-pruning
        traces them then; see :mod:`lopfast.prune.shuffle`). A no-op for other models."""
        if not self.shuffle:
            yield model
            return
        from lopfast.prune.shuffle import unshuffled

        with unshuffled(model):
            yield model

    def graph(self, model: nn.Module, example_inputs):
        """torch-pruning's dependency graph of ``model`` traced this way (the mode of ``model`` is kept)."""
        tp = require_tp()
        was = model.training
        try:
            with self.patched(model):
                return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                             forward_fn=self.forward_fn)
        finally:
            model.train(was)

    def forward(self, model: nn.Module, example_inputs):
        """The forward torch-pruning traces (no grad), e.g. to run a pruned copy in training mode."""
        with torch.no_grad():
            if self.train:
                with training_forward(model):
                    return _call(model, example_inputs)
            return _call(model, example_inputs)


def _has_aux_parent(name: str) -> bool:
    return any(part.lower().startswith("aux") for part in name.split("."))


def training_outputs(model: nn.Module, example_inputs) -> Dict[str, torch.Tensor]:
    """Conv/linear layers whose output is one of the training forward's outputs (auxiliary classifiers)."""
    outputs: Dict[str, torch.Tensor] = {}
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda mod, i, o: outputs.__setitem__(names[mod], o))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad(), training_forward(model):
            out = _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    leaves = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
    return {n: o for n, o in outputs.items() if any(o is leaf for leaf in leaves)}
