"""Pair teacher layers with student layers by module path (after ``lopfast.expand``)."""
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from lopfast.checks import InvalidArgumentType


def _optimized_module():
    """torch.compile's module wrapper class, or None while dynamo is not loaded (then none exists)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(frame, "OptimizedModule", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers
    (``model`` otherwise)."""
    compiled = _optimized_module()
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def is_compiled(*objs) -> bool:
    """Whether any of ``objs`` (modules, wrappers or callables) is or holds code made by
    ``torch.compile``: an ``OptimizedModule`` in its wrappers, a module compiled in place
    (``module.compile()``), or a compiled function."""
    compiled = _optimized_module()
    if compiled is None:
        return False
    for obj in objs:
        if isinstance(obj, compiled) or hasattr(obj, "_torchdynamo_orig_callable"):
            return True
        if isinstance(obj, nn.Module) and any(getattr(m, "_compiled_call_impl", None) is not None
                                              for m in obj.modules()):
            return True
    return False


def _same_kind(teacher_module: nn.Module, student_module: nn.Module) -> bool:
    """An expanded conv pairs with a conv, an expanded linear with a linear (expanded or not); a
    teacher layer fused for quantization (``torch.ao.nn.intrinsic``, e.g. ConvReLU2d) counts as
    the layer it starts with, so a student prepared for QAT with fused layers pairs with the
    teacher fused the same way (both tap the fused output)."""
    from torch.ao.nn.intrinsic import _FusedModule

    from lopfast.layers import ExpandedConv2d

    if isinstance(teacher_module, _FusedModule):
        teacher_module = teacher_module[0]
    if isinstance(student_module, ExpandedConv2d):
        return isinstance(teacher_module, nn.Conv2d)
    return isinstance(teacher_module, nn.Linear)


def default_pairing(teacher: nn.Module, student: nn.Module) -> Tuple[List[str], Dict[str, str]]:
    """(paired names, {left-out student layer: why}) of the default pairing (see :func:`sp_pairs`).

    Raises ValueError when no expanded layer of the student pairs with a layer of the same kind
    in the teacher (a different architecture, or an unexpanded student).
    """
    from lopfast.surgery import expanded_modules

    t_mods = dict(unwrap(teacher).named_modules())
    names: List[str] = []
    unpaired: Dict[str, str] = {}
    expanded = expanded_modules(unwrap(student))
    for n, m in expanded:
        t = t_mods.get(n)
        if t is None:
            unpaired[n] = "no module at this path in the teacher"
        elif not _same_kind(t, m):
            kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
            unpaired[n] = f"the teacher's {n!r} is a {type(t).__name__}, not a {kind} layer"
        else:
            names.append(n)
    if not expanded:
        raise ValueError(
            "sp_pairs: the student has no expanded layer (ExpandedConv2d/ExpandedLinear); expand the student with "
            "lopfast.expand or pass layers=[...]")
    if not names:
        why = "; ".join(f"{n}: {r}" for n, r in list(unpaired.items())[:4])
        raise ValueError(
            f"sp_pairs: none of the student's {len(expanded)} expanded layers pairs with a layer of the same kind at "
            f"the same path in the teacher ({why}{' ...' if len(unpaired) > 4 else ''}): is the teacher the unpruned "
            f"{type(unwrap(student)).__name__} the student was pruned from? Otherwise pass layers=[...]")
    return names, unpaired


def unpaired_message(unpaired: Dict[str, str], paired: int) -> str:
    """The warning text for a partial default pairing."""
    total = paired + len(unpaired)
    items = "; ".join(f"{n} ({r})" for n, r in list(unpaired.items())[:8])
    more = f" and {len(unpaired) - 8} more" if len(unpaired) > 8 else ""
    return (f"SP distillation pairs only {paired} of the student's {total} expanded layers; left out: {items}{more}. "
            "A teacher of another architecture pairs by coincidence only: pass the unpruned model the student "
            "was pruned from, or name the pairs with layers=[...]")


def sp_pairs(teacher: nn.Module, student: nn.Module,
             layers: Optional[Sequence[str]] = None) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(name, teacher module, student module) of the layer pairs used for SP distillation.

    ``layers=None``: every expanded layer of the student (``ExpandedConv2d`` / ``ExpandedLinear``,
    as listed by ``lopfast.expanded_modules``) whose path also exists in the teacher with a
    layer of the same kind (a conv for an expanded conv, a linear for an expanded linear);
    after ``lopfast.expand`` the expanded conv sits at the path of the conv it replaced. Layers
    left out are named in a warning (with the reason); none paired is a ValueError. Otherwise
    the given module names (e.g. residual stages ``["layer1", "layer2", "layer3"]``), each of
    which must exist in both models. DDP/DataParallel wrappers are looked through.
    """
    if not isinstance(teacher, nn.Module):
        raise InvalidArgumentType("teacher", teacher, "an nn.Module (the unpruned network)")
    if not isinstance(student, nn.Module):
        raise InvalidArgumentType("student", student, "an nn.Module (the expanded pruned network)")
    t_mods = dict(unwrap(teacher).named_modules())
    s_mods = dict(unwrap(student).named_modules())
    if layers is None:
        names, unpaired = default_pairing(teacher, student)
        if unpaired:
            warnings.warn(unpaired_message(unpaired, len(names)), stacklevel=2)
        return [(n, t_mods[n], s_mods[n]) for n in names]
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise InvalidArgumentType("layers", layers, "None or a list of module names")
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
