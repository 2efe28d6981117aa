"""The recovery methods (paper Sec. 3.2), one registry entry each.

A :class:`Recovery` says how a method turns the pruned model into the network it trains (its
*student*), which paper schedule that training follows, whether it distils from the unpruned
teacher and whether the student is contracted back to the compact architecture at the end.
:func:`lopfast.pipeline.stages.recover` runs any entry; ``RunConfig.methods`` accepts exactly
the names of :data:`RECOVERY`. A new method is one more entry in the list below.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from lopfast.layers import ExpandedConv2d, ExpandedLinear
from lopfast.pipeline import models as zoo
from lopfast.surgery import expand

__all__ = ["METHODS", "RECOVERY", "Recovery", "fresh_expanded", "reinitialize"]


@dataclass(frozen=True)
class Recovery:
    """One recovery method.

    ``student(pruned, cfg)`` builds the trained network from a CPU copy of the pruned model
    (``cfg``: the run's :class:`~lopfast.pipeline.config.RunConfig`: rate, seed ...).
    ``schedule``: the paper preset it trains with, ``"finetune"`` (``cfg.epochs`` / ``cfg.lr``)
    or ``"scratch"`` (``cfg.scratch_epochs`` / ``cfg.scratch_lr``). ``distill``: CE +
    ``cfg.gamma`` x SP loss from the unpruned teacher. ``contract``: the student holds expanded
    layers, contracted (and checked against it) into the compact model at the end.
    ``sp_layers(student)``: the layers paired with the teacher's when ``cfg.sp_layers`` is None
    (None: every expanded layer, :class:`lopfast.SPDistiller`'s default).
    """

    name: str
    student: Callable[[nn.Module, object], nn.Module]
    schedule: str
    distill: bool = False
    contract: bool = False
    sp_layers: Optional[Callable[[nn.Module], List[str]]] = None
    help: str = ""


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh random weights for the same (pruned) architecture (methods scratch / distill)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    zoo._kaiming_init(model)
    return model


def fresh_expanded(model: nn.Module, rate: float, linear: bool, linear_rate: Optional[float], depth: int,
                   seed: int) -> nn.Module:
    """ExpandNets: every conv (and optionally linear) replaced by a freshly initialised expanded layer."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d:
            new: nn.Module = ExpandedConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                            m.dilation, m.groups, m.bias is not None, m.padding_mode, rate=rate)
        elif linear and type(m) is nn.Linear:
            new = ExpandedLinear(m.in_features, m.out_features, m.bias is not None,
                                 rate=linear_rate or rate, depth=depth)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def _expanded(pruned: nn.Module, cfg) -> nn.Module:
    return expand(pruned, cfg.rate, linear=cfg.linear, linear_rate=cfg.linear_rate, linear_depth=cfg.linear_depth,
                  generator=torch.Generator().manual_seed(cfg.seed))


def _convs(student: nn.Module) -> List[str]:
    # no expanded layers to pair by default: the convs at the same paths
    return [n for n, m in student.named_modules() if isinstance(m, nn.Conv2d)]


#: every recovery method by name (the order is that of ``--help`` and the docs)
RECOVERY: Dict[str, Recovery] = {r.name: r for r in [
    Recovery("lop", _expanded, "finetune", distill=True, contract=True,
             help="expand every conv exactly (lopfast.expand), fine-tune with CE + gamma x SP distillation from the "
                  "unpruned teacher, contract back"),
    Recovery("ft", lambda pruned, cfg: pruned, "finetune", help="fine-tune the pruned model"),
    Recovery("scratch", lambda pruned, cfg: reinitialize(pruned, cfg.seed), "scratch",
             help="the pruned architecture from a random init, scratch schedule"),
    Recovery("expandnets", lambda pruned, cfg: fresh_expanded(reinitialize(pruned, cfg.seed), cfg.rate, cfg.linear,
                                                              cfg.linear_rate, cfg.linear_depth, cfg.seed),
             "scratch", contract=True,
             help="ExpandNets: fresh expanded layers in the pruned architecture, scratch schedule, contracted"),
    Recovery("distill", lambda pruned, cfg: reinitialize(pruned, cfg.seed), "scratch", distill=True,
             sp_layers=_convs, help="a random init of the pruned model with SP distillation (convs at the same "
                                    "paths paired), scratch schedule"),
    Recovery("lop-nokd", _expanded, "finetune", contract=True, help="lop without distillation (Tab. 4's ablation)"),
]}

METHODS = tuple(RECOVERY)
