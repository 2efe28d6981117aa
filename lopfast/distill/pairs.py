"""Pair teacher layers with student layers by module path (after ``lopfast.expand``)."""
from typing import List, Optional, Sequence, Tuple

import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (``model`` otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def sp_pairs(teacher: nn.Module, student: nn.Module,
             layers: Optional[Sequence[str]] = None) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(name, teacher module, student module) of the layer pairs used for SP distillation.

    ``layers=None``: every expanded layer of the student (``ExpandedConv2d`` / ``ExpandedLinear``,
    as listed by ``lopfast.expanded_modules``) whose path also exists in the teacher; after
    ``lopfast.expand`` the expanded conv sits at the path of the conv it replaced. Otherwise the
    given module names (e.g. residual stages ``["layer1", "layer2", "layer3"]``), each of which
    must exist in both models. DDP/DataParallel wrappers are looked through.
    """
    from lopfast.surgery import expanded_modules

    t_mods = dict(unwrap(teacher).named_modules())
    s_mods = dict(unwrap(student).named_modules())
    if layers is None:
        names = [n for n, _ in expanded_modules(unwrap(student)) if n in t_mods]
        if not names:
            raise ValueError(
                "sp_pairs: the student has no expanded layer (ExpandedConv2d/ExpandedLinear) at a path that "
                "also exists in the teacher; expand the student with lopfast.expand or pass layers=[...]")
        return [(n, t_mods[n], s_mods[n]) for n in names]
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    if not names:
        raise ValueError("sp_pairs: layers is empty")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"sp_pairs: layer names must be str, got {type(n).__name__}")
        if n not in t_mods and n not in s_mods:
            raise ValueError(f"sp_pairs: no module named {n!r} in the teacher nor in the student")
        if n not in t_mods:
            raise ValueError(f"sp_pairs: no module named {n!r} in the teacher")
        if n not in s_mods:
            raise ValueError(f"sp_pairs: no module named {n!r} in the student")
    if len(set(names)) != len(names):
        raise ValueError(f"sp_pairs: duplicate layer names in {names}")
    return [(n, t_mods[n], s_mods[n]) for n in names]
