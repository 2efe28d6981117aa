"""Model surgery: ``expand`` every conv (and optionally linear) of a model, ``contract`` it back."""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from lopfast.checks import InvalidArgument, check_bool, check_finite_tensors, check_module, closest
from lopfast.layers import qat
from lopfast.layers.conv import ExpandedConv2d
from lopfast.layers.decompose import check_generator, check_init, check_rate
from lopfast.layers.linear import ExpandedLinear, _check_depth

SkipSpec = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _skip_predicate(skip: SkipSpec, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip  # type: ignore[return-value]
    if isinstance(skip, str):
        skip = [skip]
    try:
        names = set(skip)
    except TypeError:
        raise TypeError(
            f"skip must be None, a module name, a collection of names or a predicate (name, module) -> bool, "
            f"got {type(skip).__name__}"
        ) from None
    if not all(isinstance(n, str) for n in names):
        raise TypeError("skip must contain module names (str)")
    # a name that matches nothing is a typo or a model other than the one meant: skipping
    # nothing silently would expand (and train) the very layer the caller wanted left alone
    existing = [n for n, _ in model.named_modules() if n]
    unknown = sorted(n for n in names if n not in set(existing))
    if unknown:
        near = {n: closest(n, existing) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {c!r}?" for n, c in near.items() if c)
        raise InvalidArgument("skip", unknown, f"names of submodules of the model (e.g. {existing[:6]})",
                              hint or "names are module paths as in model.named_modules()")
    # a skipped name also protects everything below it
    return lambda name, module: any(name == n or name.startswith(n + ".") for n in names)


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, ExpandedConv2d)


def _is_plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(m, ExpandedLinear)


def expanded_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every ExpandedConv2d / ExpandedLinear in ``model`` (their quantization-aware
    forms included), in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ExpandedConv2d, ExpandedLinear))]


def _contract_targets(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """What ``contract`` replaces: every expanded layer, and every fused module holding one
    (``lopfast.layers.qat.ExpandedConvBn2d`` ...) as a whole, outermost first."""
    kinds = (ExpandedConv2d, ExpandedLinear, qat.ExpandedConvBn2d, qat.ExpandedConvBnReLU2d, qat.ExpandedConvReLU2d)
    out: List[Tuple[str, nn.Module]] = []
    for n, m in model.named_modules():  # a parent comes before its children
        if isinstance(m, kinds) and not any(p == "" or n.startswith(p + ".") for p, _ in out):
            out.append((n, m))
    return out


def expand(
    model: nn.Module,
    rate: float = 3.0,
    *,
    linear: bool = False,
    linear_rate: Optional[float] = None,
    linear_depth: int = 2,
    skip: SkipSpec = None,
    inplace: bool = False,
    init: str = "orthogonal",
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Replace every ``nn.Conv2d`` of ``model`` by an exactly equivalent ``ExpandedConv2d``.

    Args:
        model: any module (the model itself may be a single conv).
        rate: expansion rate r >= 1 of the convs (p = ceil(r m), q = ceil(r n) per group).
        linear: also expand every ``nn.Linear`` (paper Eq. 4-5).
        linear_rate: rate of the linear chains (default: ``rate``).
        linear_depth: 2 or 3 layers per expanded linear.
        skip: module names (a name skips its whole subtree; a name that is no submodule of
            ``model`` is an error) or a predicate ``(name, module) -> bool`` for layers to
            leave alone.
        inplace: modify ``model`` itself instead of a deep copy.
        init: ``"orthogonal"`` or ``"normal"`` random outer factors.
        generator: CPU ``torch.Generator`` for a reproducible draw.

    Returns the expanded model (a copy unless ``inplace``). Other layer types (ConvTranspose,
    Conv1d/3d, already expanded layers, BatchNorm, ...) are left as they are; a model with
    nothing to expand is returned unchanged with a warning. A layer to expand whose weight or
    bias holds NaN / inf is refused (ValueError naming it) before any layer is replaced.
    """
    check_module(model, "model")
    rate = check_rate(rate)
    linear_given = linear_rate
    linear_rate = rate if linear_rate is None else check_rate(linear_rate, "linear_rate")
    linear_depth = _check_depth(linear_depth)
    check_bool(linear, "linear")
    check_bool(inplace, "inplace")
    check_init(init)
    check_generator(generator)
    skipped = _skip_predicate(skip, model)
    targets = [
        name
        for name, m in model.named_modules()
        if (_is_plain_conv(m) or (linear and _is_plain_linear(m))) and not skipped(name, m)
    ]
    # every layer is checked before any is replaced: an error must not leave an inplace model half expanded
    check_finite_tensors([(f"{name}.{p}".lstrip("."), t) for name in targets
                          for p, t in model.get_submodule(name).named_parameters(recurse=False)],
                         "model", "a layer with NaN or inf weights cannot be expanded exactly")
    if not targets and not any(True for _ in expanded_modules(model)):
        warnings.warn(f"expand: the {type(model).__name__} has no nn.Conv2d" + (" or nn.Linear" if linear else "")
                      + " to expand (or all are skipped); it is returned unchanged", stacklevel=2)
    if not inplace:
        model = copy.deepcopy(model)
    # every expanded layer is built before any is put in: a layer that cannot be (a rate too large
    # for memory) must not leave an inplace model half expanded
    built = []
    for name in targets:
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            built.append((name, ExpandedConv2d.from_conv(m, rate, init=init, generator=generator)))
        else:
            try:
                new = ExpandedLinear.from_linear(m, linear_rate, depth=linear_depth, init=init, generator=generator)
            except InvalidArgument as exc:  # expand's own name for the linears' rate
                if exc.name != "rate" or linear_given is None:
                    raise
                raise InvalidArgument("linear_rate", exc.value, exc.accepted, exc.hint) from None
            built.append((name, new))
    for name, new in built:
        model = _replace(model, name, new)
    return model


def contract(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Collapse every ExpandedConv2d / ExpandedLinear of ``model`` into its plain layer.

    The result contains only standard PyTorch layers: its ``state_dict()`` loads with
    ``strict=True`` into the original, never-expanded architecture. Layers prepared for
    quantization-aware training (``lopfast.layers.qat``) become torch's QAT layers with the
    collapsed weight and the same fake-quantizers and observers, ready for ``convert``. Factors holding NaN or inf
    raise :class:`lopfast.checks.NonFiniteValues` naming them, before anything is changed.
    """
    check_module(model, "model")
    check_bool(inplace, "inplace")
    # checked before any layer is replaced: a factor gone NaN (a diverged fine-tuning) would
    # otherwise become a plain model that loads and runs and predicts garbage
    check_finite_tensors([(f"{name}.{p}".lstrip("."), t) for name, m in expanded_modules(model)
                          for p, t in m.named_parameters(recurse=False)],
                         "model", "an expanded layer with NaN or inf factors cannot be contracted into a usable layer")
    if not inplace:
        model = copy.deepcopy(model)
    for name, m in _contract_targets(model):
        model = _replace(model, name, m.contract())
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` ("collapsed" or "chain") on every expanded layer of ``model``; returns ``model``."""
    check_module(model, "model")
    for _, m in expanded_modules(model):
        m.mode = mode
    return model
