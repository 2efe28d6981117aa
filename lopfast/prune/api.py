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

from lopfast.checks import check_latency_budget
from lopfast.files import jsonable
from lopfast.layers import ExpandedConv2d, ExpandedLinear
from lopfast.prune.shuffle import shuffle_blocks
from lopfast.prune.shuffle import supported as shuffle_supported
from lopfast.prune.tracing import Tracing
from lopfast.prune.engine import Engine, RoundingMissed, _eval_forward, count_macs, count_params, output_layers
from lopfast.prune.compose import (
    ALLOCATIONS,
    CRITERIA,
    DATA_ALLOCATIONS,
    DATA_CRITERIA,
    DATA_PROCEDURES,
    PRESETS,
    PROCEDURES,
    needs_data,
    resolve,
    split_options,
)
from lopfast.prune.criteria import ThiNetCriterion, build_criterion
from lopfast.prune.importance import require_tp

#: the presets, named after their papers (see :data:`lopfast.prune.compose.PRESETS`)
METHODS = tuple(PRESETS)
#: what ``target_removed`` (or ``target_speedup``) counts
BUDGETS = ("params", "flops", "latency")
#: presets that need ``data``
DATA_METHODS = tuple(m for m, (c, a, p, _) in PRESETS.items() if needs_data(c, a, p))


@dataclass
class PruneReport:
    """What :func:`prune` did. ``to_dict()`` / ``to_json()`` give a JSON-serialisable form.

    ``removed_fraction`` is 1 - params_after / params_before over all parameters (weights,
    biases, BN affine). ``layers`` maps each conv/linear name to its output channels
    ``[before, after]``. ``ratio`` is the channel ratio used (searched when
    ``target_removed`` was given; ``None`` for per-layer methods, see ``extra``).
    ``criterion`` / ``allocation`` / ``procedure`` are the parts the strategy was made of;
    ``target_unit`` says what ``target_removed`` counted ("params", or "macs" for a FLOPs
    budget, then compare it with ``macs_removed_fraction``). ``latency`` holds the measured
    latency/throughput of the original and the pruned model with their speed-up beside the
    MACs reduction (``measure=``); :meth:`format_latency` prints it.
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
    criterion: str = "l1"
    allocation: str = "uniform"
    procedure: str = "none"
    #: what ``target_removed`` counts: "params" or "macs" (``budget="flops"``); "latency" with
    #: ``budget="latency"`` (then ``target_speedup`` is the asked speed-up)
    target_unit: str = "params"
    #: every pruned width is a multiple of it (None: exact counts); exceptions in extra["round_to_unmet"]
    round_to: Optional[int] = None
    #: measured speed of the original and the pruned model (``measure=``): see lopfast.prune.latency
    latency: Optional[Dict[str, Any]] = None
    #: the speed-up asked for with ``budget="latency"`` (the achieved one: ``extra["achieved_speedup"]``)
    target_speedup: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return jsonable(asdict(self))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def format_latency(self) -> str:
        """The latency table (markdown), or a line saying it was not measured."""
        if not self.latency:
            return "latency: not measured (prune(..., measure=True) / --measure)"
        from lopfast.prune.latency import format_latency

        return format_latency(self.latency)


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


# ---------------------------------------------------------------------------- allocation
def _allocate(engine: Engine, crit, allocation: str, ratio, target, data, a_opts, unit: str):
    """Prune ``engine.base`` with ``crit`` at the channel counts ``allocation`` decides."""
    if allocation in ("uniform", "global"):
        def prune_at(r):
            return crit.prune(engine, r)

        if target is None:
            model, rec = prune_at(ratio)
            return model, rec, ratio, {}
        hi = engine.max_layer_ratio if engine.global_pruning else 1.0
        return engine.search(prune_at, target, hi=hi, unit=unit) + ({},)
    if allocation == "netadapt":
        from lopfast.prune.methods.netadapt import netadapt

        return netadapt(engine, crit, ratio, target, data, a_opts, a_opts["_target_speedup"])
    if allocation == "eagleeye":
        from lopfast.prune.methods.eagleeye import eagleeye

        return eagleeye(engine, crit, ratio, target, data, a_opts)
    from lopfast.prune.methods.amc import amc

    return amc(engine, crit, ratio, target, data, a_opts)


# ---------------------------------------------------------------------------- entry point
def prune(
    model: nn.Module,
    example_inputs,
    *,
    method: Optional[str] = None,
    ratio: Optional[float] = None,
    target_removed: Optional[float] = None,
    data: Optional[Iterable] = None,
    ignored: Union[None, str, Iterable[Union[str, nn.Module]]] = None,
    global_pruning: bool = False,
    criterion: Optional[str] = None,
    allocation: Optional[str] = None,
    procedure: Optional[str] = None,
    method_options: Optional[Dict[str, Any]] = None,
    round_to: Union[None, int, str] = "auto",
    budget: Optional[str] = None,
    target_speedup: Optional[float] = None,
    measure: Union[bool, Dict[str, Any]] = False,
    **options,
) -> Tuple[nn.Module, PruneReport]:
    """Structured channel pruning: returns a smaller dense copy of ``model`` and a report.

    Channels are physically removed with torch-pruning's dependency graph, so residual
    additions, depthwise convs, concatenations and the classifier's inputs stay consistent.
    The layers producing the model output (the classifier) keep their outputs. Prune
    *before* expanding: an expanded model is refused.

    A strategy is a criterion (which channels), an allocation (how many per layer) and a
    procedure (training around the cut), see :mod:`lopfast.prune.compose`. ``method`` names
    a paper's preset (:data:`METHODS`; default ``"l1"``); ``criterion``, ``allocation``,
    ``procedure`` replace the preset's parts (e.g. ``method="hrank", allocation="eagleeye"``).

    Args:
        model: a plain model (not modified; a deep copy is pruned).
        example_inputs: a tensor (or tuple of tensors) to trace the model with; MACs are
            counted on it, so give it the real input size.
        method: a preset of :data:`METHODS` (see ``PRESETS`` in :mod:`lopfast.prune.compose`).
        ratio: fraction of the channels removed from every prunable layer, in (0, 1)
            (global allocation: of all channels).
        target_removed: fraction of the model's parameters to remove, in (0, 1) (e.g.
            0.6837 for the paper's 68.37 %; with ``budget="flops"``: of the conv/linear
            MACs); the ratio is searched until the removed fraction is within 0.005 of it.
            Give exactly one of ``ratio`` and ``target_removed``.
        data: iterable of (inputs, targets) batches, needed by the data-driven parts
            (taylor, hrank, thinet, hessian, eagleeye, amc, admm, slimming).
        ignored: module names (or modules of ``model``) whose output channels are kept.
        global_pruning: same as ``allocation="global"``.
        criterion, allocation, procedure: override the preset's parts.
        method_options: the parts' options as a dict (merged with ``**options``).
        round_to: every pruned width a multiple of this (tensor cores take channels in
            multiples of 8 in bf16/fp16). ``"auto"`` (default): :data:`ROUND_TO_DEFAULT` for
            the model's device (8 on CUDA, none on CPU), as a preference: when the rounded
            steps cannot meet ``target_removed`` within 0.5 points, the cut is redone with
            exact counts (``extra["round_to_auto_dropped"]`` says so); an explicit N keeps the
            rounding and takes the closest count, with a warning. ``None`` or 1: exact
            counts. Kept counts are rounded to the nearest multiple (never to 0); layers
            narrower than it keep their own count and are listed in ``extra["round_to_unmet"]``.
        budget: what ``target_removed`` counts: ``"params"`` (default), ``"flops"`` (the
            conv/linear MACs), or ``"latency"``: give ``target_speedup`` instead; the
            allocation is then ``"netadapt"`` (per-layer latencies measured on this device,
            :mod:`lopfast.prune.methods.netadapt`), with any criterion.
        target_speedup: with ``budget="latency"``: the speed-up to reach (> 1), measured on
            the model's device; the report gives the achieved one beside it.
        measure: time the original and the pruned model on the model's device (batch 1 and
            the training batch, eager and ``torch.compile``d; median and spread; speed-up
            beside the MACs reduction) into ``report.latency``. ``True`` or a dict of
            :func:`lopfast.prune.latency.measure_latency` options (``train_batch``,
            ``compile``, ``amp``, ``rounds``, ...). Needs a tensor ``example_inputs``.
        **options: options of the selected parts; an option of a part not selected raises
            TypeError naming the part it belongs to.
    """
    t0 = time.perf_counter()
    require_tp()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(global_pruning, bool):
        raise TypeError(f"global_pruning must be a bool, got {type(global_pruning).__name__}")
    if budget is not None and budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    latency = dict(budget_name="budget='latency' and target_speedup")
    allocation = check_latency_budget(budget == "latency", allocation, global_pruning, **latency)
    if budget == "latency":
        if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) \
                or not math.isfinite(target_speedup) or target_speedup <= 1.0:
            raise ValueError(f"target_speedup must be a number > 1 with budget='latency' (e.g. 2.0 for twice as "
                             f"fast), got {target_speedup!r}")
        if ratio is not None or target_removed is not None:
            raise ValueError("budget='latency' takes target_speedup, not ratio or target_removed")
    elif target_speedup is not None:
        raise ValueError("target_speedup needs budget='latency'")
    name, crit_name, alloc, proc = resolve(method, criterion, allocation, procedure, global_pruning)
    check_latency_budget(budget == "latency", alloc, global_pruning, **latency)  # a preset's netadapt too
    if method_options is not None and not isinstance(method_options, dict):
        raise TypeError(f"method_options must be a dict, got {type(method_options).__name__}")
    all_options = dict(method_options or {})
    dup = sorted(set(all_options) & set(options))
    if dup:
        raise TypeError(f"options {dup} given both in method_options and as keywords")
    all_options.update(options)
    if budget in ("params", "flops") and alloc in ("eagleeye", "amc"):
        if all_options.get("budget", budget) != budget:
            raise ValueError(f"budget={budget!r} and the option budget={all_options['budget']!r} disagree")
        all_options["budget"] = budget  # these allocations take it as their own option
    c_opts, a_opts, p_opts = split_options(all_options, crit_name, alloc, proc)
    rounding = _resolve_round_to(round_to, model)
    measure_opts = _measure_options(measure, example_inputs)
    if any(isinstance(m, (ExpandedConv2d, ExpandedLinear)) for m in model.modules()):
        raise ValueError("model contains expanded layers (ExpandedConv2d/ExpandedLinear): prune the plain model "
                         "first, then expand it (or contract() it before pruning)")
    if budget != "latency" and (ratio is None) == (target_removed is None):
        raise ValueError("give exactly one of ratio (channels removed per layer) and target_removed "
                         "(fraction of parameters removed)")
    for arg, v in (("ratio", ratio), ("target_removed", target_removed)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{arg} must be a number, got {v!r}")
        if not 0.0 < v < 1.0:
            hint = " (a fraction: 0.6837 for 68.37 %)" if v >= 1.0 else ""
            raise ValueError(f"{arg} must be in the open interval (0, 1){hint}, got {v!r}")
    unit = "macs" if (a_opts.get("budget") == "flops" or budget == "flops") else "params"
    if budget == "latency":
        unit = "latency"
    if unit == "macs" and target_removed is None:
        raise ValueError("budget='flops' needs target_removed (the fraction of MACs to remove), not ratio")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise TypeError(f"example_inputs must be a tensor (or tuple/list/dict of them), got "
                        f"{type(example_inputs).__name__}")
    _check_finite_inputs(model, example_inputs)
    _trial_forward(model, example_inputs)
    data = _as_reiterable(data)
    first = next(iter(model.parameters()), None)
    if data is not None and first is not None:
        data = _OnDevice(data, first.device)  # loaders usually yield CPU batches
    if needs_data(crit_name, alloc, proc) and data is None:
        parts = [f"{k}={v!r}" for k, v, d in (("criterion", crit_name, DATA_CRITERIA),
                                               ("allocation", alloc, DATA_ALLOCATIONS),
                                               ("procedure", proc, DATA_PROCEDURES)) if v in d]
        raise ValueError(f"{', '.join(parts)} is data-driven: pass data=<iterable of (inputs, targets) batches>")
    if data is not None:
        _check_data(model, example_inputs, data)

    base = copy.deepcopy(model)
    tracing = Tracing(base, example_inputs)
    tracing.check()
    if tracing.shuffle and not shuffle_supported(base):
        blocks = shuffle_blocks(base)
        raise ValueError(f"model: has channel-shuffle blocks ({blocks[0]!r} and {len(blocks) - 1} more) outside a "
                         "torchvision ShuffleNetV2, the layout lopfast.prune.shuffle prunes through the shuffle")
    if tracing.shuffle and (unit == "macs" or budget == "latency" or alloc == "amc"):
        raise ValueError(f"model: ShuffleNetV2's shuffle lanes are not in the analytic cost model that "
                         f"{'budget=' + repr(budget) if budget in ('flops', 'latency') else 'allocation=' + repr(alloc)} "
                         "needs; prune it with a ratio or target_removed (parameters)")
    ignored_names = _ignored_names(model, ignored)
    auto = output_layers(base, example_inputs, tracing)
    all_ignored = sorted(set(ignored_names) | set(auto))
    engine = Engine(base, example_inputs, all_ignored, global_pruning=alloc == "global",
                    max_layer_ratio=a_opts.get("max_layer_ratio", 0.95), round_to=rounding,
                    round_to_auto=round_to == "auto", tracing=tracing)
    if not engine.prunable:
        raise ValueError("model has no prunable conv/linear layer (all are ignored or produce the output)")
    params_before = engine.params_before
    macs_before = count_macs(base, example_inputs)
    latency_before = None
    if measure_opts is not None:
        # the original is timed before anything else loads the machine (same settings as the pruned one)
        latency_before = _measure({"original": base}, example_inputs, measure_opts)

    def run(engine: Engine):
        extra: Dict[str, Any] = {}
        if proc == "admm":
            from lopfast.prune.methods.admm import admm

            pruned, record, used_ratio, extra = admm(engine, ratio, target_removed, data, p_opts)
        elif proc == "iterative":
            pruned, record, used_ratio, extra = _iterative(engine, crit_name, ratio, target_removed, data, c_opts,
                                                           p_opts, alloc, unit)
        else:
            if proc == "slimming":
                from lopfast.prune.methods.slimming import sparsity_train

                trained, extra = sparsity_train(base, data, p_opts)
                engine = Engine(trained, example_inputs, all_ignored, global_pruning=alloc == "global",
                                max_layer_ratio=a_opts.get("max_layer_ratio", 0.95), round_to=engine.round_to,
                                round_to_auto=engine.round_to_auto, tracing=tracing)
            crit = build_criterion(crit_name, engine.base, data, c_opts, alloc)
            if alloc == "netadapt":
                a_opts["_target_speedup"] = float(target_speedup)
            pruned, record, used_ratio, more = _allocate(engine, crit, alloc, ratio, target_removed, data, a_opts,
                                                         unit)
            extra.update(crit.extra)
            extra.update(more)
            if isinstance(crit, ThiNetCriterion):
                extra["thinet_peak_sample_bytes"] = crit.peak_sample_bytes
        return engine, pruned, record, used_ratio, extra

    try:
        engine, pruned, record, used_ratio, extra = run(engine)
    except RoundingMissed as missed:
        # round_to="auto" is a preference: the asked target comes first (a paper's 68.37 %), so the
        # cut is redone with exact counts and the report says why
        rounding = None
        engine = Engine(base, example_inputs, all_ignored, global_pruning=alloc == "global",
                        max_layer_ratio=a_opts.get("max_layer_ratio", 0.95), tracing=tracing)
        engine, pruned, record, used_ratio, extra = run(engine)
        extra["round_to_auto_dropped"] = str(missed)

    _check_consistent(pruned, example_inputs, name, tracing)
    params_after = count_params(pruned)
    macs_after = count_macs(pruned, example_inputs)
    before = {n: _width(m) for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    after = {n: _width(m) for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    extra.setdefault("prune_evaluations", engine.evaluations)
    if tracing.train_only:
        extra["training_only_layers"] = tracing.train_only  # pruned consistently: the training forward was traced
    if engine.lane_info:
        extra["shuffle_lanes"] = engine.lane_info
    if rounding:
        # pruned widths that are not a multiple of round_to (a layer narrower than round_to, or a
        # shuffle stage whose step cannot reach one): listed, never silently
        extra["round_to_unmet"] = sorted(n for n in before if after.get(n, 0) != before[n]
                                         and after.get(n, 0) % rounding != 0)
    latency = None
    if measure_opts is not None:
        latency = _measure({"pruned": pruned}, example_inputs, measure_opts, reference=latency_before,
                           macs={"original": macs_before, "pruned": macs_after})
    if isinstance(used_ratio, dict):
        extra.setdefault("layer_ratios", used_ratio)
        used_ratio = None
    report = PruneReport(
        method=name,
        options=jsonable(all_options),
        ratio=None if used_ratio is None else float(used_ratio),
        target_removed=target_removed,
        global_pruning=alloc == "global",
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        removed_fraction=1.0 - params_after / params_before,
        macs_removed_fraction=1.0 - macs_after / macs_before if macs_before else 0.0,
        layers={n: [before[n], after.get(n, 0)] for n in before},
        ignored=all_ignored,
        wall_time_s=time.perf_counter() - t0,
        extra=jsonable(extra),
        criterion=crit_name,
        allocation=alloc,
        procedure=proc,
        target_unit=unit,
        round_to=rounding,
        latency=latency,
        target_speedup=target_speedup,
    )
    return pruned, report


def _measure(models, example_inputs, opts: Dict[str, Any], reference=None, macs=None) -> Dict[str, Any]:
    """:func:`lopfast.prune.latency.measure_latency` with ``opts``; a ``reference`` result (the
    original, timed earlier with the same settings) is merged in first."""
    from lopfast.prune.latency import measure_latency, merge_latency

    lat = measure_latency(models, example_inputs, **opts)
    if reference is not None:
        lat = merge_latency(reference, lat, macs=macs)
    return lat


MEASURE_OPTIONS = ("batches", "train_batch", "compile", "amp", "rounds", "warmup", "budget_s", "compile_mode")

#: the default ``round_to`` per device type. CUDA: 8, the channel multiple bf16/fp16 tensor cores
#: take whole (the GPU suite's ``bench/bench_prune_latency.py`` measures it; unconfirmed on a GPU
#: until it has run). CPU: none, measured in BENCHMARKS.md ("round_to"): on the CI box oneDNN ran
#: odd widths as fast as their rounded neighbours, so rounding only cost parameters.
ROUND_TO_DEFAULT = {"cuda": 8, "cpu": None}


def _resolve_round_to(round_to, model: nn.Module) -> Optional[int]:
    if isinstance(round_to, str):
        if round_to != "auto":
            raise ValueError(f"round_to must be a positive int, None or 'auto', got {round_to!r}")
        first = next(iter(list(model.parameters()) + list(model.buffers())), None)
        dev = first.device.type if first is not None else "cpu"
        return ROUND_TO_DEFAULT.get(dev)
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, None or 'auto', got {round_to!r}")
    return round_to if round_to > 1 else None


def _measure_options(measure, example_inputs) -> Optional[Dict[str, Any]]:
    if measure is False or measure is None:
        return None
    if measure is True:
        opts: Dict[str, Any] = {}
    elif isinstance(measure, dict):
        unknown = sorted(set(measure) - set(MEASURE_OPTIONS))
        if unknown:
            raise ValueError(f"measure: unknown keys {unknown}; it accepts {list(MEASURE_OPTIONS)}")
        opts = dict(measure)
    else:
        raise TypeError(f"measure must be True, False or a dict of {list(MEASURE_OPTIONS)}, got "
                        f"{type(measure).__name__}")
    if not isinstance(example_inputs, torch.Tensor):
        raise ValueError("measure: latency is measured on a single input tensor; example_inputs is a "
                         f"{type(example_inputs).__name__}")
    tb = opts.get("train_batch")
    if tb is not None and (isinstance(tb, bool) or not isinstance(tb, int) or tb < 1):
        raise ValueError(f"measure: train_batch must be a positive int, got {tb!r}")
    return opts


def _iterative(engine: Engine, crit_name, ratio, target, data, c_opts, p_opts, alloc, unit):
    """Prune in ``steps`` steps to the final per-layer channel counts, re-scoring (and, with
    ``finetune(model, step)``, training) the partially pruned network between steps."""
    from lopfast.prune.engine import _forward  # noqa: F401  (same tracing inputs for every step)

    if target is not None:
        # the final counts depend on the ratio only: search it on the cost model (L1 prunes once)
        _, _, ratio = engine.search(lambda r: engine.prune(build_criterion("l1", engine.base, None, {}, alloc)
                                                           .importance, r), target, unit=unit)
    caps = engine.caps(engine.base)
    per = ratio if isinstance(ratio, dict) else {n: float(ratio) for n in engine.prunable}
    width0 = {n: _width(m) for n, m in engine.base.named_modules() if n in caps}
    steps, current, record = p_opts["steps"], engine.base, {}
    for s in range(1, steps + 1):
        widths = {n: _width(m) for n, m in current.named_modules() if n in caps}
        rel = {}
        for n in caps:
            r = min(max(per.get(n, 0.0), 0.0), caps[n]) * s / steps
            # the last step lands on the one-shot counts (rounded to round_to)
            keep = engine._keep(n, width0[n], r) if s == steps else max(1, int(width0[n] * (1.0 - r)))
            keep = min(keep, widths[n])
            rel[n] = 1.0 - (keep + 0.5) / widths[n]
        step_engine = Engine(current, engine.example_inputs, engine.ignored, tracing=engine.tracing)
        crit = build_criterion(crit_name, current, data, c_opts, alloc)
        current, rec = crit.prune(step_engine, rel)
        record = rec
        engine.evaluations += step_engine.evaluations
        if p_opts["finetune"] is not None:
            p_opts["finetune"](current, s)
    return current, record, ratio, {"iterative_steps": steps}


def _check_finite_inputs(model: nn.Module, example_inputs) -> None:
    """NaN / inf in the weights or the example inputs would rank channels by NaN scores (issue 20)."""
    from lopfast.checks import check_finite_module, check_finite_tensors

    check_finite_module(model, "model", "pruning scores from NaN weights are meaningless")
    ex = example_inputs.values() if isinstance(example_inputs, dict) else (
        example_inputs if isinstance(example_inputs, (tuple, list)) else [example_inputs])
    check_finite_tensors([(f"example_inputs[{i}]", t) for i, t in enumerate(ex)], "example_inputs")


def _trial_forward(model: nn.Module, example_inputs) -> None:
    """Run ``model`` once on ``example_inputs`` so a wrong shape is reported as such."""
    try:
        _eval_forward(model, example_inputs)
    except Exception as e:
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__
        raise ValueError(f"example_inputs (shape {shape}) does not run through model: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _check_data(model: nn.Module, example_inputs, data) -> None:
    """First batch of ``data``: (inputs, targets), same per-sample shape as ``example_inputs``,
    and a trial forward on two of its samples."""
    try:
        batch = next(iter(data))
    except StopIteration:
        raise ValueError("data yielded no batches") from None
    if not (isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
        raise ValueError(f"data must yield (inputs, targets) batches with a tensor of inputs, got a "
                         f"{type(batch).__name__}")
    x, y = batch[0], batch[1]
    if isinstance(example_inputs, torch.Tensor) and tuple(x.shape[1:]) != tuple(example_inputs.shape[1:]):
        raise ValueError(f"data's inputs have per-sample shape {tuple(x.shape[1:])} but example_inputs has "
                         f"{tuple(example_inputs.shape[1:])}: give example_inputs the size of the data "
                         "(MACs are counted on it)")
    try:
        out = _eval_forward(model, x[:2])
    except Exception as e:
        raise ValueError(f"data's inputs (shape {tuple(x.shape)}) do not run through model: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(y, torch.Tensor) and isinstance(out, torch.Tensor) and y.shape[:1] != x.shape[:1]:
        raise ValueError(f"data's targets have {y.shape[0]} entries for {x.shape[0]} inputs")
    from lopfast.checks import check_finite_tensors

    # every batch, not only the first: data-driven criteria (taylor, hrank, ...) score from all of them
    for i, b in enumerate(data):
        if isinstance(b, (list, tuple)):
            check_finite_tensors([(f"batch {i} inputs", b[0])], "data", "scores from NaN inputs are meaningless")
            t = b[1] if len(b) > 1 else None
            if (isinstance(t, torch.Tensor) and not t.is_floating_point() and t.numel() and isinstance(out, torch.Tensor)
                    and out.dim() == 2 and (int(t.min()) < 0 or int(t.max()) >= out.shape[1])):
                raise ValueError(f"data's batch {i} has class targets in [{int(t.min())}, {int(t.max())}] but the "
                                 f"model has {out.shape[1]} outputs: is it the data set the model was trained on?")


def _check_consistent(pruned: nn.Module, example_inputs, method: str, tracing=None) -> None:
    """Run the pruned model once, in eval mode and (when it has training-only layers) in training
    mode: a dependency torch-pruning could not trace shows up here, not at the user's first step."""
    try:
        _eval_forward(pruned, example_inputs)
        if tracing is not None and tracing.train:
            tracing.forward(pruned, example_inputs)
    except RuntimeError as e:
        raise ValueError(
            f"method={method!r}: the pruned model no longer runs ({str(e).splitlines()[0]}); torch-pruning "
            "mis-traced a channel dependency of this architecture (seen with a single-parameter PReLU "
            "before a flatten). Keep the layers around it with ignored=[...]"
        ) from e


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
