"""``lopfast.prune``: structured channel pruning of a plain model, before expansion."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lopfast.layers import ExpandedConv2d, ExpandedLinear
from lopfast.prune.attention import channel_shuffle_blocks
from lopfast.prune.engine import Engine, count_macs, count_params, output_layers
from lopfast.prune.importance import (
    HRankImportance,
    ThiNetImportance,
    magnitude_importance,
    require_tp,
)

METHODS = ("l1", "l2", "bn", "taylor", "hrank", "thinet", "eagleeye", "admm", "amc")
DATA_METHODS = ("taylor", "hrank", "thinet", "eagleeye", "admm", "amc")


@dataclass
class PruneReport:
    """What :func:`prune` did. ``to_dict()`` / ``to_json()`` give a JSON-serialisable form.

    ``removed_fraction`` is 1 - params_after / params_before over all parameters (weights,
    biases, BN affine). ``layers`` maps each conv/linear name to its output channels
    ``[before, after]``. ``ratio`` is the channel ratio used (searched when
    ``target_removed`` was given; ``None`` for per-layer methods, see ``extra``).
    """

    method: str
    options: Dict[str, Any]
    ratio: Optional[float]
    target_removed: Optional[float]
    global_pruning: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    removed_fraction: float
    macs_removed_fraction: float
    layers: Dict[str, List[int]]
    ignored: List[str]
    wall_time_s: float
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if callable(obj):
        return getattr(obj, "__qualname__", None) or type(obj).__name__
    return repr(obj)


# ---------------------------------------------------------------------------- helpers
def _as_reiterable(data):
    if data is None:
        return None
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}") from None
    # a one-shot iterator would be empty the second time a method walks it
    return list(it) if it is data else data


class _OnDevice:
    """Re-iterable view of ``data`` with every tensor of a batch moved to ``device``."""

    def __init__(self, data, device):
        self.data, self.device = data, device

    def __iter__(self):
        for batch in self.data:
            if isinstance(batch, (list, tuple)):
                yield type(batch)(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in batch)
            else:
                yield batch.to(self.device) if isinstance(batch, torch.Tensor) else batch


def _unpack(batch):
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError("data must yield (inputs, targets) batches")


def _take(data, n: int):
    out = []
    for i, b in enumerate(data):
        if i >= n:
            break
        out.append(_unpack(b))
    return out


def _pos_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_options(method: str, options: Dict[str, Any], allowed: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method={method!r} got unknown option(s) {unknown}; it accepts {sorted(allowed)}")
    merged = dict(allowed)
    merged.update(options)
    return merged


def _run(engine: Engine, importance, ratio, target, prepare=None):
    """Uniform-ratio pruning, or the ratio search for ``target``."""
    if target is None:
        model, rec = engine.prune(importance, ratio, prepare=prepare)
        return model, rec, ratio
    return engine.search(lambda r: engine.prune(importance, r, prepare=prepare), target,
                         hi=engine.max_layer_ratio if engine.global_pruning else 1.0)



# ---------------------------------------------------------------------------- criteria
def _prune_l1(engine, ratio, target, data, opts):
    """L1 filter norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

    Score: sum |W| of each output channel, averaged (after mean-normalisation) over every
    layer coupled to the channel (residual partners, BN, depthwise). No data. Measured cost
    (1 CPU thread, tests/nets.py: TinyResNet 38.6k params / TinyMobileNetV2 17.2k params):
    ratio=0.5: 34 / 42 ms; target_removed=0.6837: 38 / 71 ms (the search runs on the cost
    model, one real prune). CIFAR MobileNetV2 / ResNet-56 / VGG-16 at the paper's four
    targets: 0.2-0.4 s each.
    """
    _check_options("l1", opts, {})
    return _run(engine, magnitude_importance(1), ratio, target) + ({},)


def _prune_l2(engine, ratio, target, data, opts):
    """L2 filter norm (the L2 variant studied by Li et al. 2017). No data.

    Measured cost as ``l1`` (ratio=0.5: 36 / 54 ms; target search: 41 / 44 ms on
    TinyResNet / TinyMobileNetV2, 1 CPU thread).
    """
    _check_options("l2", opts, {})
    return _run(engine, magnitude_importance(2), ratio, target) + ({},)


def _prune_bn(engine, ratio, target, data, opts):
    """BN scale |gamma| (network slimming, Liu et al., ICCV 2017).

    Meaningful after sparsity-regularised training of the BN scales; groups without a BN
    fall back to L1. No data. Measured cost as ``l1`` (ratio=0.5: 37 / 37 ms; target
    search: 35 / 40 ms on TinyResNet / TinyMobileNetV2, 1 CPU thread).
    """
    _check_options("bn", opts, {})
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in engine.base.modules()):
        raise ValueError("method='bn' needs BatchNorm layers (network slimming scores channels by BN scale)")
    tp = require_tp()
    imp = _Fallback(tp.importance.BNScaleImportance(), magnitude_importance(1))
    return _run(engine, imp, ratio, target) + ({},)


class _Fallback:
    """Use ``primary`` and fall back when it has nothing to say about a group."""

    def __init__(self, primary, fallback):
        self.primary, self.fallback = primary, fallback

    def __call__(self, group):
        imp = self.primary(group)
        if imp is None or (isinstance(imp, (list, tuple)) and len(imp) == 0):
            return self.fallback(group)
        return imp


def _prune_taylor(engine, ratio, target, data, opts):
    """First-order Taylor (Molchanov et al., CVPR 2019), torch-pruning's GroupTaylorImportance.

    Score: |sum W * dL/dW| per channel, gradients of ``loss_fn`` (default cross-entropy)
    accumulated over ``batches`` batches of ``data`` (default 4) once on the unpruned model.
    Measured cost (4 batches of 8x3x16x16, 1 CPU thread, TinyResNet / TinyMobileNetV2):
    ratio=0.5: 74 / 71 ms; target search: 66 / 73 ms.
    """
    o = _check_options("taylor", opts, {"loss_fn": F.cross_entropy, "batches": 4})
    batches = _take(data, _pos_int(o["batches"], "batches"))
    scratch = copy.deepcopy(engine.base)
    scratch.zero_grad(set_to_none=True)
    was_training = scratch.training
    scratch.eval()  # score the network as deployed (BN on running statistics), as pruning sees it
    for x, y in batches:
        o["loss_fn"](scratch(x), y).backward()
    scratch.train(was_training)
    grads = {n: p.grad.detach().clone() for n, p in scratch.named_parameters() if p.grad is not None}

    def prepare(model):
        for n, p in model.named_parameters():
            if n in grads:
                p.grad = grads[n].clone()

    tp = require_tp()
    cls = getattr(tp.importance, "GroupTaylorImportance", None) or tp.importance.TaylorImportance
    model, rec, r = _run(engine, cls(), ratio, target, prepare=prepare)
    model.zero_grad(set_to_none=True)
    return model, rec, r, {}


def _prune_hrank(engine, ratio, target, data, opts):
    """HRank (Lin et al., "HRank: Filter Pruning using High-Rank Feature Map", CVPR 2020).

    Score: average rank of each filter's output feature map over ``batches`` batches
    (default 4), one batched ``torch.linalg.matrix_rank`` per conv per batch. The rank is
    taken on the conv's own output (the HRank code hooks the activation after BN/ReLU,
    which can differ by one or more). Measured cost
    (4 batches of 8x3x16x16, 1 CPU thread, TinyResNet / TinyMobileNetV2): ratio=0.5:
    107 / 189 ms; target search: 105 / 191 ms (the ranks are computed once).
    """
    o = _check_options("hrank", opts, {"batches": 4})
    imp = HRankImportance.from_data(engine.base, data, batches=_pos_int(o["batches"], "batches"))
    return _run(engine, imp, ratio, target) + ({},)


def _prune_thinet(engine, ratio, target, data, opts):
    """ThiNet (Luo et al., ICCV 2017): greedy channel selection + least-squares rescaling.

    Each channel is scored where it is consumed: the next layer's sampled outputs are split
    into per-input-channel contributions and channels are removed greedily, smallest
    change of the next layer's output first (``batches`` default 2, ``samples`` output
    locations per batch default 256, ``seed``). After pruning, the kept input channels of
    every consuming conv/linear are rescaled by least squares so that, on the same data,
    the pruned layer reproduces the original layer's output (``rescale=True``). Depthwise
    consumers are pruned together with their producer and are not rescaled. Difference
    from the paper: the scores are collected once on the unpruned model (ThiNet re-collects
    them layer by layer on the partially pruned network); the rescaling, done layer by layer
    on the pruned network, compensates for earlier layers. Measured cost
    (2 batches of 8x3x16x16, 1 CPU thread, TinyResNet / TinyMobileNetV2): ratio=0.5:
    186 / 231 ms; target search: 224 / 192 ms.
    """
    o = _check_options("thinet", opts, {"batches": 2, "samples": 256, "seed": 0, "rescale": True})
    batches, samples = _pos_int(o["batches"], "batches"), _pos_int(o["samples"], "samples")
    imp = ThiNetImportance.from_data(engine.base, data, batches=batches, samples=samples, seed=o["seed"])
    model, rec, r = _run(engine, imp, ratio, target)
    extra = {}
    if o["rescale"]:
        from lopfast.prune.methods.thinet import rescale_consumers

        extra["rescaled_layers"] = rescale_consumers(engine.base, model, rec, data, batches=batches,
                                                     samples=samples, seed=o["seed"])
    return model, rec, r, extra


def _prune_eagleeye(engine, ratio, target, data, opts):
    from lopfast.prune.methods.eagleeye import eagleeye

    return eagleeye(engine, ratio, target, data, opts)


def _prune_admm(engine, ratio, target, data, opts):
    from lopfast.prune.methods.admm import admm

    return admm(engine, ratio, target, data, opts)


def _prune_amc(engine, ratio, target, data, opts):
    from lopfast.prune.methods.amc import amc

    return amc(engine, ratio, target, data, opts)


_IMPL = {"l1": _prune_l1, "l2": _prune_l2, "bn": _prune_bn, "taylor": _prune_taylor, "hrank": _prune_hrank,
         "thinet": _prune_thinet, "eagleeye": _prune_eagleeye, "admm": _prune_admm, "amc": _prune_amc}


# ---------------------------------------------------------------------------- entry point
def prune(
    model: nn.Module,
    example_inputs,
    *,
    method: str = "l1",
    ratio: Optional[float] = None,
    target_removed: Optional[float] = None,
    data: Optional[Iterable] = None,
    ignored: Union[None, str, Iterable[Union[str, nn.Module]]] = None,
    global_pruning: bool = False,
    **method_options,
) -> Tuple[nn.Module, PruneReport]:
    """Structured channel pruning: returns a smaller dense copy of ``model`` and a report.

    Channels are physically removed with torch-pruning's dependency graph, so residual
    additions, depthwise convs, concatenations and the classifier's inputs stay consistent.
    The layers producing the model output (the classifier) keep their outputs. Prune
    *before* expanding: an expanded model is refused.

    Args:
        model: a plain model (not modified; a deep copy is pruned).
        example_inputs: a tensor (or tuple of tensors) to trace the model with.
        method: one of :data:`METHODS`; see each ``_prune_<method>`` / ``methods.<method>``
            docstring for paper, cost and options.
        ratio: fraction of the channels removed from every prunable layer, in [0, 1).
        target_removed: fraction of the model's parameters to remove, in (0, 1) (e.g.
            0.6837 for the paper's 68.37 %); the channel ratio is searched until the
            removed fraction is within 0.005 of it. Give exactly one of ``ratio`` and
            ``target_removed``.
        data: iterable of (inputs, targets) batches, needed by taylor, hrank, thinet,
            eagleeye (calibration/scoring), amc (reward) and admm (training data).
        ignored: module names (or modules of ``model``) whose output channels are kept.
        global_pruning: rank channels across layers (l1, l2, bn, taylor, hrank, thinet).
        **method_options: the method's options (unknown ones raise TypeError).
    """
    t0 = time.perf_counter()
    require_tp()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if any(isinstance(m, (ExpandedConv2d, ExpandedLinear)) for m in model.modules()):
        raise ValueError("model contains expanded layers (ExpandedConv2d/ExpandedLinear): prune the plain model "
                         "first, then expand it (or contract() it before pruning)")
    if (ratio is None) == (target_removed is None):
        raise ValueError("give exactly one of ratio (channels removed per layer) and target_removed "
                         "(fraction of parameters removed)")
    for name, v in (("ratio", ratio), ("target_removed", target_removed)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{name} must be a number, got {v!r}")
        if not 0.0 <= v < 1.0:
            hint = " (a fraction: 0.6837 for 68.37 %)" if v >= 1.0 else ""
            raise ValueError(f"{name} must be in [0, 1){hint}, got {v!r}")
    if not isinstance(global_pruning, bool):
        raise TypeError(f"global_pruning must be a bool, got {type(global_pruning).__name__}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise TypeError(f"example_inputs must be a tensor (or tuple/list/dict of them), got "
                        f"{type(example_inputs).__name__}")
    data = _as_reiterable(data)
    first = next(iter(model.parameters()), None)
    if data is not None and first is not None:
        data = _OnDevice(data, first.device)  # loaders usually yield CPU batches
    if method in DATA_METHODS and data is None:
        raise ValueError(f"method={method!r} is data-driven: pass data=<iterable of (inputs, targets) batches>")

    shuffles = channel_shuffle_blocks(model)
    if shuffles:
        raise ValueError(f"model: cannot prune channel-shuffle blocks ({shuffles[0]!r} and {len(shuffles) - 1} more, "
                         "ShuffleNetV2): torch-pruning cannot trace channels through a shuffle (see "
                         "lopfast.prune.attention.channel_shuffle_blocks); expand/contract still work unpruned")
    base = copy.deepcopy(model)
    ignored_names = _ignored_names(model, ignored)
    auto = output_layers(base, example_inputs)
    all_ignored = sorted(set(ignored_names) | set(auto))
    max_layer_ratio = method_options.pop("max_layer_ratio", 0.95) if global_pruning else 0.95
    engine = Engine(base, example_inputs, all_ignored, global_pruning=global_pruning,
                    max_layer_ratio=max_layer_ratio)
    if not engine.prunable:
        raise ValueError("model has no prunable conv/linear layer (all are ignored or produce the output)")
    params_before = engine.params_before
    macs_before = count_macs(base, example_inputs)

    pruned, record, used_ratio, extra = _IMPL[method](engine, ratio, target_removed, data, method_options)

    _check_consistent(pruned, example_inputs, method)
    params_after = count_params(pruned)
    macs_after = count_macs(pruned, example_inputs)
    before = {n: _width(m) for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    after = {n: _width(m) for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    extra.setdefault("prune_evaluations", engine.evaluations)
    if isinstance(used_ratio, dict):
        extra.setdefault("layer_ratios", used_ratio)
        used_ratio = None
    report = PruneReport(
        method=method,
        options=_jsonable(method_options),
        ratio=None if used_ratio is None else float(used_ratio),
        target_removed=target_removed,
        global_pruning=global_pruning,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        removed_fraction=1.0 - params_after / params_before,
        macs_removed_fraction=1.0 - macs_after / macs_before if macs_before else 0.0,
        layers={n: [before[n], after.get(n, 0)] for n in before},
        ignored=all_ignored,
        wall_time_s=time.perf_counter() - t0,
        extra=_jsonable(extra),
    )
    return pruned, report


def _check_consistent(pruned: nn.Module, example_inputs, method: str) -> None:
    """Run the pruned model once: a dependency torch-pruning could not trace shows up here."""
    from lopfast.prune.engine import _forward

    was_training = pruned.training
    pruned.eval()
    try:
        with torch.no_grad():
            _forward(pruned, example_inputs)
    except RuntimeError as e:
        raise ValueError(
            f"method={method!r}: the pruned model no longer runs ({str(e).splitlines()[0]}); torch-pruning "
            "mis-traced a channel dependency of this architecture (seen with a single-parameter PReLU "
            "before a flatten). Keep the layers around it with ignored=[...]"
        ) from e
    finally:
        pruned.train(was_training)


def _width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _ignored_names(model: nn.Module, ignored) -> List[str]:
    if ignored is None:
        return []
    if isinstance(ignored, (str, nn.Module)):
        ignored = [ignored]
    try:
        items = list(ignored)
    except TypeError:
        raise TypeError(f"ignored must be module names or modules, got {type(ignored).__name__}") from None
    names = {m: n for n, m in model.named_modules()}
    mods = dict(model.named_modules())
    out = []
    for it in items:
        if isinstance(it, nn.Module):
            if it not in names:
                raise ValueError("ignored contains a module that is not part of model")
            out.append(names[it])
        elif isinstance(it, str):
            if it not in mods:
                raise ValueError(f"ignored names {it!r}, which is not a submodule of model")
            out.append(it)
        else:
            raise TypeError(f"ignored must contain module names (str) or modules, got {type(it).__name__}")
    return out
