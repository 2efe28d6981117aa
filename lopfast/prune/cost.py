"""Exact parameter (and approximate MAC) counts of a pruned model, without pruning it."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from lopfast.prune.importance import require_tp


def _under(name: str, ignored) -> bool:
    return any(name == i or name.startswith(i + ".") for i in ignored)


class CostModel:
    """Parameter and MAC counts as a function of per-group pruning ratios, without pruning.

    Built once from torch-pruning's dependency graph: every conv/linear/BN dimension is tied
    to the channel groups that cover it (a concatenation's consumer is covered by several),
    and keeps ``max(1, int(C (1 - r)))`` of a group's C channels, as torch-pruning does.
    The ratio search counts its trials with it, and AMC enforces its budget with it while an
    episode is still running. Parameters of other layers are counted as unprunable.
    """

    def __init__(self, base: nn.Module, example_inputs, ignored: List[str], forward) -> None:
        tp = require_tp()
        names = {m: n for n, m in base.named_modules()}
        ignored_modules = [m for n, m in base.named_modules()
                           if _under(n, ignored) and isinstance(m, (nn.Conv2d, nn.Linear))]
        was_training = base.training
        base.eval()
        hw: Dict[str, int] = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: hw.__setitem__(n, o.shape[-1] * o.shape[-2]))
                 for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
        try:
            with torch.no_grad():
                forward(base, example_inputs)
        finally:
            for h in hooks:
                h.remove()
        dg = tp.DependencyGraph().build_dependency(base, example_inputs=example_inputs)
        base.train(was_training)
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
            for item in group:
                layer, fn = item.dep.layer, item.dep.pruning_fn
                name = names.get(layer)
                if name is None or not isinstance(layer, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                    continue
                side = "out" if dg.is_out_channel_pruning_fn(fn) else "in"
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    side = "out"
                cover.setdefault((name, side), {})[gi] = len(item.idxs)
                if side == "out" and isinstance(layer, (nn.Conv2d, nn.Linear)):
                    members.append(name)
            self.groups.append({"root": names[root], "channels": len(group[0].idxs), "members": members})
        self.layers = []
        for n, m in base.named_modules():
            if isinstance(m, nn.Conv2d):
                dw = m.groups == m.in_channels == m.out_channels and m.groups > 1
                per_out = (1 if dw else m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                self.layers.append(dict(name=n, out=m.out_channels, inn=m.in_channels, dw=dw, per=per_out,
                                        bias=m.bias is not None, hw=hw.get(n, 1), bn=False, groups=m.groups))
            elif isinstance(m, nn.Linear):
                self.layers.append(dict(name=n, out=m.out_features, inn=m.in_features, dw=False, per=m.in_features,
                                        bias=m.bias is not None, hw=1, bn=False, groups=1))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.layers.append(dict(name=n, out=m.num_features, inn=0, dw=False, per=0,
                                        bias=False, hw=0, bn=m.affine, groups=1))
        self.cover = cover
        self._fixed = 0.0
        modelled, self.macs0 = self.cost([0.0] * len(self.groups))
        self._fixed = float(sum(p.numel() for p in base.parameters())) - modelled
        self.params0 = modelled + self._fixed

    def keep(self, ratios: List[float]) -> List[int]:
        # exactly torch-pruning's rounding: it keeps int(C * (1 - r)) channels
        return [max(1, int(g["channels"] * (1.0 - r))) for g, r in zip(self.groups, ratios)]

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
