"""Exact parameter (and approximate MAC) counts of a pruned model, without pruning it."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lopfast.prune.importance import require_tp


def _under(name: str, ignored) -> bool:
    return any(name == i or name.startswith(i + ".") for i in ignored)


def round_keep(keep: int, channels: int, unit: int) -> int:
    """``keep`` of ``channels`` rounded to the nearest multiple of ``unit`` (ties up) between
    ``unit`` and ``channels``; unchanged when ``unit`` is 1, when nothing is removed, or when no
    multiple fits (``channels < unit``: such a layer keeps its own count, reported as unrounded).

    Rounding to the nearest (torch-pruning's own ``round_to`` rounds the kept count down, to 0
    below ``round_to``) keeps the search's parameter count close to its target."""
    if unit <= 1 or keep >= channels:
        return keep
    lo = keep // unit * unit
    cands = [c for c in (lo, lo + unit) if unit <= c <= channels]
    if not cands:
        return keep
    return min(cands, key=lambda c: (abs(c - keep), -c))


class CostModel:
    """Parameter and MAC counts as a function of per-group pruning ratios, without pruning.

    Built once from torch-pruning's dependency graph: every conv/linear/BN dimension is tied
    to the channel groups that cover it (a concatenation's consumer is covered by several),
    and keeps ``max(1, int(C (1 - r)))`` of a group's C channels, as torch-pruning does.
    The ratio search counts its trials with it, and AMC enforces its budget with it while an
    episode is still running. Parameters of other layers are counted as unprunable.
    """

    def __init__(self, base: nn.Module, example_inputs, ignored: List[str], forward, tracing=None,
                 round_to: Optional[int] = None) -> None:
        tp = require_tp()
        names = {m: n for n, m in base.named_modules()}
        ignored_modules = [m for n, m in base.named_modules()
                           if _under(n, ignored) and isinstance(m, (nn.Conv2d, nn.Linear))]
        was_training = base.training
        base.eval()
        # MACs of the inference forward: layers that run only in training (auxiliary heads) count none
        hw: Dict[str, int] = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: hw.__setitem__(n, o.shape[-1] * o.shape[-2]))
                 for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
        ran = set()
        hooks += [m.register_forward_hook(lambda mod, i, o, n=n: ran.add(n))
                  for n, m in base.named_modules() if isinstance(m, nn.Linear)]
        try:
            with torch.no_grad():
                forward(base, example_inputs)
        finally:
            for h in hooks:
                h.remove()
        if tracing is not None:
            dg = tracing.graph(base, example_inputs)
        else:
            dg = tp.DependencyGraph().build_dependency(base, example_inputs=example_inputs)
        base.train(was_training)
        self.round_to = int(round_to) if round_to and round_to > 1 else None
        #: per group root: the largest ``groups`` of a (non-depthwise) grouped conv the group touches
        self.conv_groups: Dict[str, int] = {}
        self.groups: List[dict] = []
        cover: Dict[Tuple[str, str], Dict[int, int]] = {}
        position = {m: i for i, m in enumerate(base.modules())}
        # AMC walks the network from input to output
        ordered = sorted(dg.get_all_groups(ignored_layers=ignored_modules, root_module_types=[nn.Conv2d, nn.Linear]),
                         key=lambda g: position.get(g[0].dep.layer, 0))
        for group in ordered:
            root = group[0].dep.layer
            gi = len(self.groups)
            members = []
            g = 1
            for item in group:
                layer, fn = item.dep.layer, item.dep.pruning_fn
                name = names.get(layer)
                if isinstance(layer, nn.Conv2d) and layer.groups > 1 and not (
                        layer.groups == layer.in_channels == layer.out_channels):
                    g = max(g, layer.groups)
                if name is None or not isinstance(layer, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                    continue
                side = "out" if dg.is_out_channel_pruning_fn(fn) else "in"
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    side = "out"
                cover.setdefault((name, side), {})[gi] = len(item.idxs)
                if side == "out" and isinstance(layer, (nn.Conv2d, nn.Linear)):
                    members.append(name)
            self.groups.append({"root": names[root], "channels": len(group[0].idxs), "members": members})
            self.conv_groups[names[root]] = g
        self.layers = []
        for n, m in base.named_modules():
            if isinstance(m, nn.Conv2d):
                dw = m.groups == m.in_channels == m.out_channels and m.groups > 1
                per_out = (1 if dw else m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                self.layers.append(dict(name=n, out=m.out_channels, inn=m.in_channels, dw=dw, per=per_out,
                                        bias=m.bias is not None, hw=hw.get(n, 0), bn=False, groups=m.groups))
            elif isinstance(m, nn.Linear):
                self.layers.append(dict(name=n, out=m.out_features, inn=m.in_features, dw=False, per=m.in_features,
                                        bias=m.bias is not None, hw=1 if n in ran else 0, bn=False, groups=1))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.layers.append(dict(name=n, out=m.num_features, inn=0, dw=False, per=0,
                                        bias=False, hw=0, bn=m.affine, groups=1))
        self.cover = cover
        self._fixed = 0.0
        modelled, self.macs0 = self.cost([0.0] * len(self.groups))
        self._fixed = float(sum(p.numel() for p in base.parameters())) - modelled
        self.params0 = modelled + self._fixed

    def keep(self, ratios: List[float]) -> List[int]:
        # exactly torch-pruning's rounding: it keeps int(C * (1 - r)) channels (then round_to's)
        out = []
        for g, r in zip(self.groups, ratios):
            keep = max(1, int(g["channels"] * (1.0 - r)))
            if self.round_to:
                u = self.round_to * self.conv_groups[g["root"]] // math.gcd(self.round_to, self.conv_groups[g["root"]])
                keep = round_keep(keep, g["channels"], u)
            out.append(keep)
        return out

    def _dim(self, name: str, side: str, full: int, keep: List[int]) -> float:
        cov = self.cover.get((name, side), {})
        kept = full - sum(cov.values())
        for gi, n in cov.items():
            kept += n * keep[gi] / self.groups[gi]["channels"]
        return kept

    def cost(self, ratios: List[float]) -> Tuple[float, float]:
        """(parameters, MACs) of the model pruned at ``ratios`` (one per group)."""
        keep = self.keep(ratios)
        params, macs = self._fixed, 0.0
        for L in self.layers:
            out = self._dim(L["name"], "out", L["out"], keep)
            if L["bn"]:
                params += 2 * out
                continue
            if L["per"] == 0:
                continue
            if L["dw"]:
                w = out * L["per"]
            else:
                inn = self._dim(L["name"], "in", L["inn"], keep)
                w = out * inn / L["groups"] * (L["per"] / (L["inn"] // L["groups"]))
            params += w + (out if L["bias"] else 0)
            macs += w * L["hw"]
        return params, macs
