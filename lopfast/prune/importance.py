"""Channel-importance plug-ins for torch-pruning: precomputed scores, HRank's ranks, ThiNet's greedy order.

torch-pruning asks an importance object for one score per channel of a *group* (all the
layer dimensions coupled to one prunable channel set: the conv's filters, its BN, the next
layers' input channels, residual partners...). The data-driven criteria here are computed
once on the unpruned model, keyed by module name, and looked up per group, so that the
channel-ratio search can prune many copies without running the data again (ThiNet, which
scores layer by layer on the pruned network, lives in :mod:`lopfast.prune.criteria`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # torch-pruning is an optional dependency (extra "prune")
    import torch_pruning as tp
except ImportError:  # pragma: no cover - exercised only without the extra
    tp = None


def require_tp():
    """Return the torch_pruning module or raise an ImportError saying how to get it."""
    if tp is None:
        raise ImportError("lopfast.prune needs torch-pruning: pip install 'lopfast[prune]'")
    return tp


_ImportanceBase = tp.importance.Importance if tp is not None else object


def _fn(name: str):
    return getattr(tp.pruner.function, name)


def _is_out_fn(fn) -> bool:
    return fn in (_fn("prune_conv_out_channels"), _fn("prune_linear_out_channels"),
                  _fn("prune_depthwise_conv_out_channels"))


def _is_in_fn(fn) -> bool:
    return fn in (_fn("prune_conv_in_channels"), _fn("prune_linear_in_channels"))


def magnitude_importance(p: int = 2):
    """torch-pruning's group magnitude importance (name differs across 1.x releases)."""
    cls = getattr(tp.importance, "GroupMagnitudeImportance", None) or tp.importance.MagnitudeImportance
    return cls(p=p)


class PrecomputedImportance(_ImportanceBase):
    """Group importance from per-module channel scores computed beforehand.

    ``out_scores[name]`` scores the output channels of the conv/linear ``name``;
    ``in_scores[name]`` scores its input channels (ThiNet scores a channel where it is
    consumed). Within a group every matching layer's scores are divided by their mean (so
    layers of different scale weigh alike) and averaged per channel. Groups with no scored
    layer fall back to ``fallback`` (L1 magnitude) so that every prunable group can still
    reach the requested ratio. Set ``names`` (module -> name of the model being pruned)
    before ``pruner.step()``: the pruned model is a copy, so modules are matched by name.
    """

    def __init__(self, out_scores: Optional[Dict[str, torch.Tensor]] = None,
                 in_scores: Optional[Dict[str, torch.Tensor]] = None, fallback=None) -> None:
        require_tp()
        self.out_scores = dict(out_scores or {})
        self.in_scores = dict(in_scores or {})
        self.fallback = fallback if fallback is not None else magnitude_importance(1)
        self.names: Dict[nn.Module, str] = {}

    @torch.no_grad()
    def __call__(self, group):
        total = None
        count = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            root_idxs = item.root_idxs
            name = self.names.get(dep.layer)
            if name is None or any(r is None for r in root_idxs):
                continue
            fn = dep.pruning_fn
            table = self.out_scores if _is_out_fn(fn) else self.in_scores if _is_in_fn(fn) else None
            if table is None or name not in table:
                continue
            local = table[name].float()[torch.as_tensor(idxs, dtype=torch.long)]
            local = local / local.mean().clamp_min(1e-12)
            if total is None:
                n = len(group[0].idxs)
                total, count = torch.zeros(n), torch.zeros(n)
            r = torch.as_tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, r, local)
            count.scatter_add_(0, r, torch.ones_like(local))
        if total is None:
            return self.fallback(group)
        return total / count.clamp_min(1)


# ---------------------------------------------------------------------------- HRank
def _batches(data: Iterable, limit: int):
    for i, batch in enumerate(data):
        if i >= limit:
            break
        if isinstance(batch, (list, tuple)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def _forward_batches(model: nn.Module, data, batches: int, handles, method: str) -> None:
    """Run ``model`` in eval mode over ``batches`` batches of ``data`` so the hooks in
    ``handles`` record what they need; the hooks are removed and the mode restored after."""
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for x, _ in _batches(data, batches):
            model(x)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError(f"data yielded no batches; {method} needs at least one batch of inputs")


def feature_map_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every feature map of a (B, C, H, W) activation, batched: returns (B, C).

    One ``torch.linalg.matrix_rank`` call on the (B*C, H, W) stack (SVD in float32/64).
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be a (B, C, H, W) tensor, got shape {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    stack = maps.detach().reshape(b * c, h, w)
    if stack.dtype not in (torch.float32, torch.float64):
        stack = stack.float()
    return torch.linalg.matrix_rank(stack).reshape(b, c)


@torch.no_grad()
def hrank_scores(model: nn.Module, data: Iterable, *, batches: int = 5) -> Dict[str, torch.Tensor]:
    """Average feature-map rank of every output channel of every conv (Lin et al., CVPR 2020).

    Runs ``batches`` batches of ``data`` through ``model`` (in eval mode, restored after)
    with a forward hook on each ``nn.Conv2d``; returns ``{conv name: (C_out,) mean rank}``.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive integer, got {batches!r}")
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            ranks = feature_map_ranks(output).double()
            sums[name] = sums.get(name, 0) + ranks.sum(0).cpu()
            counts[name] = counts.get(name, 0) + ranks.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    _forward_batches(model, data, batches, handles, "hrank")
    return {n: (sums[n] / counts[n]).float() for n in sums}


class HRankImportance(PrecomputedImportance):
    """HRank (Lin et al., CVPR 2020): filters whose output feature maps have low average rank
    carry little information and are pruned first. Build with :meth:`from_data`."""

    @classmethod
    def from_data(cls, model: nn.Module, data: Iterable, *, batches: int = 5) -> "HRankImportance":
        """Scores from the conv outputs of ``model`` over ``batches`` batches (:func:`hrank_scores`)."""
        return cls(out_scores=hrank_scores(model, data, batches=batches))


# ---------------------------------------------------------------------------- ThiNet
def thinet_order(z: torch.Tensor) -> torch.Tensor:
    """ThiNet's greedy order (Luo et al., ICCV 2017) of the rows of ``z`` (C, N).

    Channels are moved one at a time into the removed set T, each time the one that keeps
    ||sum_{c in T} z_c||^2 smallest. Vectorised through the Gram matrix, O(C^2 + C N).
    Returns ``order`` with ``order[i]`` the channel removed at step i.
    """
    gram = z.double() @ z.double().T
    c = gram.shape[0]
    diag = gram.diagonal().clone()
    cross = torch.zeros(c, dtype=torch.float64)  # sum_{t in T} gram[t, c]
    free = torch.ones(c, dtype=torch.bool)
    order = []
    for _ in range(c):
        # ||s + z_c||^2 - ||s||^2 = 2 s.z_c + ||z_c||^2
        cost = torch.where(free, 2 * cross + diag, torch.full_like(diag, float("inf")))
        best = int(torch.argmin(cost))
        order.append(best)
        free[best] = False
        cross += gram[best]
    return torch.tensor(order, dtype=torch.long)
