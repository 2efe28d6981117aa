"""Shared machinery: pruning a copy with torch-pruning, the channel-ratio search, counting."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from lopfast.prune.attention import attention_kwargs, sync_attention, sync_widths
from lopfast.prune.importance import PrecomputedImportance, require_tp
from lopfast.prune.tracing import _call as _forward  # model(x), model(*x) or model(**x)

#: the removed-parameter fraction must land within this of ``target_removed`` (0.5 points)
TOLERANCE = 0.005

RatioSpec = Union[float, Dict[str, float]]


class RoundingMissed(ValueError):
    """``round_to="auto"``: the rounded widths cannot meet the target within TOLERANCE (the caller
    redoes the cut with exact counts)."""


def count_params(model: nn.Module) -> int:
    """Number of parameter entries (weights, biases, BN affine), shared ones counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (torch-pruning's counter).

    Run in eval mode so BN running statistics are not touched by the counting pass.
    """
    tp = require_tp()
    was_training = model.training
    model.eval()
    try:
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(was_training)
    return int(macs)


def prunable_layers(model: nn.Module, ignored: Iterable[str]) -> List[str]:
    """Names of the conv/linear layers whose output channels may be removed."""
    ignored = set(ignored)
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not _under(n, ignored)]


def _width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _under(name: str, ignored: Iterable[str]) -> bool:
    return any(name == i or name.startswith(i + ".") for i in ignored)


def output_layers(model: nn.Module, example_inputs, tracing=None) -> List[str]:
    """The conv/linear layers whose output *is* the model's output (the classifier).

    Found by identity of the output tensor during a forward pass; if the output is
    post-processed, the last conv/linear executed is taken instead. With a ``tracing`` that
    traces the training forward (:class:`lopfast.prune.tracing.Tracing`), the auxiliary
    classifiers of that forward are outputs too.
    """
    found = _eval_output_layers(model, example_inputs)
    if tracing is not None and tracing.train:
        from lopfast.prune.tracing import training_outputs

        found += [n for n in training_outputs(model, example_inputs) if n not in found]
    return found


def _eval_output_layers(model: nn.Module, example_inputs) -> List[str]:
    outputs: Dict[str, torch.Tensor] = {}
    order: List[str] = []

    def hook(name):
        def fn(module, inputs, output):
            outputs[name] = output
            order.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    leaves = out if isinstance(out, (tuple, list)) else (out,)
    found = [n for n, o in outputs.items() if any(o is leaf for leaf in leaves if isinstance(leaf, torch.Tensor))]
    if not found and order:
        found = [order[-1]]
    return found


def _eval_forward(model: nn.Module, example_inputs):
    """One no-grad forward of ``model`` in eval mode (BN statistics untouched; its mode restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _forward(model, example_inputs)
    finally:
        model.train(was_training)


class Engine:
    """Prunes deep copies of ``base`` with torch-pruning at a uniform or per-layer ratio.

    ``ignored`` are module names never pruned (their output channels; their inputs still
    follow their producers). ``record`` of :meth:`prune` maps (layer name, "out"/"in") to the
    original indices removed, so methods can relate pruned layers back to the original.
    """

    def __init__(self, base: nn.Module, example_inputs, ignored: List[str], global_pruning: bool = False,
                 max_layer_ratio: float = 0.95, round_to: Optional[int] = None, round_to_auto: bool = False,
                 tracing=None) -> None:
        from lopfast.prune.tracing import Tracing

        self.tp = require_tp()
        self.base = base
        self.example_inputs = example_inputs
        self.ignored = list(ignored)
        self.global_pruning = global_pruning
        self.max_layer_ratio = max_layer_ratio
        self.round_to = int(round_to) if round_to and round_to > 1 else None
        # round_to came from "auto": a missed target raises RoundingMissed instead of taking the closest
        self.round_to_auto = bool(round_to_auto)
        self.tracing = tracing if tracing is not None else Tracing(base, example_inputs)
        self.tracing.check()
        self.params_before = count_params(base)
        # layers torch-pruning must not root a group at (the user's, the classifier, and for
        # ShuffleNetV2 the channels that cross a shuffle, pruned by lopfast.prune.shuffle)
        self.tp_ignored = list(self.ignored)
        lanes: List[str] = []
        if self.tracing.shuffle:
            from lopfast.prune import shuffle

            if not shuffle.supported(base):
                raise ValueError("model: has ShuffleNetV2 blocks but is not a torchvision ShuffleNetV2 (stage2..4, "
                                 "conv5): lopfast.prune.shuffle prunes through the channel shuffle of that layout only")
            lanes = shuffle.lane_roots(base)
            stage_roots = {shuffle.stage_lane_root(s) for s in ("stage2", "stage3", "stage4")}
            self.tp_ignored += lanes
            lanes = [n for n in lanes if n not in stage_roots]
        # a stage's lane pruning is decided by its first block's branch2.5; the other lane layers follow it
        self.prunable = [n for n in prunable_layers(base, self.ignored) if n not in lanes]
        self.lane_info: Dict[str, dict] = {}
        self.evaluations = 0
        # whether the cost model has matched a real pruning ("exact"), failed to ("wrong"), or is untested
        self._model_state = "wrong" if self.tracing.shuffle else "untested"

    def unit(self, name: str) -> int:
        """The channel multiple the group rooted at ``name`` is rounded to: ``round_to``, or a
        multiple of it that grouped convs in the group also divide (torch-pruning removes the same
        channels from every group of a grouped conv)."""
        if not self.round_to:
            return 1
        cm = self._cost_model_obj()
        g = 1
        if cm is not None:
            g = cm.conv_groups.get(name, 1)
        return self.round_to * g // math.gcd(self.round_to, g)

    def _keep(self, name: str, channels: int, ratio: float) -> int:
        """Channels a group of ``channels`` keeps at ``ratio``: torch-pruning's ``int(C (1 - r))``
        (at least 1), rounded to :meth:`unit` when ``round_to`` is set."""
        from lopfast.prune.cost import round_keep

        keep = max(1, int(channels * (1.0 - ratio)))
        return round_keep(keep, channels, self.unit(name))

    def _tp_ratio(self, name: str, channels: int, ratio: float) -> float:
        """The ratio that makes torch-pruning keep exactly :meth:`_keep` channels."""
        if not self.round_to:
            return ratio
        keep = self._keep(name, channels, ratio)
        return 1.0 - (keep + 0.5) / channels if keep < channels else 0.0

    def caps(self, model: nn.Module) -> Dict[str, float]:
        """Largest ratio per layer that still keeps one channel.

        torch-pruning silently skips a group whose ratio would remove every channel, which
        would make the removed fraction fall as the ratio rises; capping keeps it monotone.
        """
        mods = dict(model.named_modules())
        out = {}
        for n in self.prunable:
            m = mods[n]
            c = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            out[n] = max(0.0, 1.0 - (1.0 + 1e-6) / c)
        return out

    def prune(self, importance, ratio: RatioSpec, *, source: Optional[nn.Module] = None,
              prepare: Optional[Callable[[nn.Module], None]] = None
              ) -> Tuple[nn.Module, Dict[Tuple[str, str], List[int]]]:
        """Prune a deep copy of ``source`` (default ``base``); returns it and the removal record."""
        if self.global_pruning and self.round_to:
            if isinstance(ratio, dict):
                raise ValueError("global_pruning ranks all layers together and cannot take per-layer ratios")
            # the global ranking decides each layer's count; round those counts, then cut each layer
            # at its rounded count with the same scores (the lowest-ranked channels of a layer are the
            # same channels either way)
            first, _ = self._prune_tp(importance, ratio, source, prepare, global_=True)
            widths = {n: _width(m) for n, m in first.named_modules() if n in self.prunable}
            src = dict((self.base if source is None else source).named_modules())
            per = {n: 1.0 - (w + 0.5) / _width(src[n]) for n, w in widths.items() if w < _width(src[n])}
            if self.tracing.shuffle:
                per.update(self._lane_ratios(ratio))
            model, record = self._prune_tp(importance, per, source, prepare, global_=False)
        else:
            model, record = self._prune_tp(importance, ratio, source, prepare, global_=self.global_pruning)
        if self.tracing.shuffle:
            self._prune_lanes(model, ratio, record)
        self.evaluations += 1
        return model, record

    def _lane_ratios(self, ratio: RatioSpec) -> Dict[str, float]:
        from lopfast.prune.shuffle import stage_lane_root

        roots = [stage_lane_root(s) for s in ("stage2", "stage3", "stage4")]
        if isinstance(ratio, dict):
            return {r: float(ratio[r]) for r in roots if r in ratio}
        return {r: float(ratio) for r in roots}

    def _prune_lanes(self, model: nn.Module, ratio: RatioSpec, record) -> None:
        from lopfast.prune.shuffle import prune_lanes

        caps = self.caps(self.base)
        lane = {n: min(max(r, 0.0), caps.get(n, 0.0)) for n, r in self._lane_ratios(ratio).items()}
        rec, self.lane_info = prune_lanes(model, lane, self.round_to)
        for key, idxs in rec.items():
            record.setdefault(key, []).extend(idxs)

    def _prune_tp(self, importance, ratio: RatioSpec, source, prepare, global_: bool):
        """One torch-pruning pass over a deep copy (no lanes, no evaluation count)."""
        tp = self.tp
        model = copy.deepcopy(self.base if source is None else source)
        if prepare is not None:
            prepare(model)
        names = {m: n for n, m in model.named_modules()}
        by_name = dict(model.named_modules())
        if isinstance(importance, PrecomputedImportance):
            importance.names = names
        ignored_modules = [m for n, m in model.named_modules()
                           if _under(n, self.tp_ignored) and isinstance(m, (nn.Conv2d, nn.Linear))]
        kwargs = dict(importance=importance, ignored_layers=ignored_modules)
        if global_:
            if isinstance(ratio, dict):
                raise ValueError("global_pruning ranks all layers together and cannot take per-layer ratios")
            kwargs.update(global_pruning=True, pruning_ratio=float(ratio), max_pruning_ratio=self.max_layer_ratio)
        else:
            caps = self.caps(model)
            per = ratio if isinstance(ratio, dict) else {n: float(ratio) for n in self.prunable}
            kwargs.update(pruning_ratio=0.0, pruning_ratio_dict={
                by_name[n]: self._tp_ratio(n, _width(by_name[n]), min(max(float(r), 0.0), caps[n]))
                for n, r in per.items() if n in caps and n not in self.tp_ignored})
        # attention blocks: whole heads at the channel ratio (lopfast.prune.attention)
        head_ratio = float(ratio) if not isinstance(ratio, dict) else sum(ratio.values()) / max(len(ratio), 1)
        kwargs.update(attention_kwargs(model, head_ratio))
        if self.tracing.forward_fn is not None:
            kwargs["forward_fn"] = self.tracing.forward_fn
        pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
        was_training = model.training
        model.eval()
        record: Dict[Tuple[str, str], List[int]] = {}
        with self.tracing.patched(model):
            pruner = pruner_cls(model, self.example_inputs, **kwargs)
            for group in pruner.step(interactive=True):
                for item in group:
                    dep, idxs = item.dep, item.idxs
                    name = names.get(dep.layer)
                    if name is None or not isinstance(dep.layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                        continue
                    side = "out" if pruner.DG.is_out_channel_pruning_fn(dep.pruning_fn) else "in"
                    record.setdefault((name, side), []).extend(int(i) for i in idxs)
                group.prune()
        sync_attention(model, pruner)
        sync_widths(model)
        model.train(was_training)
        return model, record

    def prune_sequential(self, criterion, ratio: RatioSpec, source: Optional[nn.Module] = None
                         ) -> Tuple[nn.Module, Dict[Tuple[str, str], List[int]]]:
        """Prune a copy group by group, in network order, scoring each group on the network
        pruned so far (ThiNet). ``criterion.score(model, group)`` returns one score per
        channel; ``criterion.after_prune(model, removed_root_idxs)`` runs after each cut.
        Each group keeps ``max(1, int(C (1 - r)))`` channels, as torch-pruning does, so the
        cost model and the ratio search apply unchanged. Local pruning only.
        """
        tp = self.tp
        if self.global_pruning:
            raise ValueError("this criterion prunes layer by layer; it needs a per-layer allocation "
                             "(allocation='uniform', 'eagleeye' or 'amc'), not global pruning")
        model = copy.deepcopy(self.base if source is None else source)
        names = {m: n for n, m in model.named_modules()}
        ignored_modules = [m for n, m in model.named_modules()
                           if _under(n, self.tp_ignored) and isinstance(m, (nn.Conv2d, nn.Linear))]
        caps = self.caps(model)
        per = ratio if isinstance(ratio, dict) else {n: float(ratio) for n in self.prunable}
        was_training = model.training
        model.eval()
        dg = self.tracing.graph(model, self.example_inputs)
        position = {m: i for i, m in enumerate(model.modules())}
        roots = sorted(((g[0].dep.layer, g[0].dep.pruning_fn) for g in
                        dg.get_all_groups(ignored_layers=ignored_modules, root_module_types=[nn.Conv2d, nn.Linear])),
                       key=lambda t: position.get(t[0], 0))
        record: Dict[Tuple[str, str], List[int]] = {}
        for layer, fn in roots:
            name = names.get(layer)
            if name not in caps:
                continue
            n = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            r = min(max(float(per.get(name, 0.0)), 0.0), caps[name])
            keep = self._keep(name, n, r)
            if keep >= n:
                continue
            group = dg.get_pruning_group(layer, fn, list(range(n)))
            scores = criterion.score(model, group)
            drop = torch.argsort(torch.as_tensor(scores, dtype=torch.float64), stable=True)[: n - keep]
            drop = sorted(int(i) for i in drop)
            cut = dg.get_pruning_group(layer, fn, drop)
            for item in cut:
                lname = names.get(item.dep.layer)
                if lname is not None and isinstance(item.dep.layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    side = "out" if dg.is_out_channel_pruning_fn(item.dep.pruning_fn) else "in"
                    record.setdefault((lname, side), []).extend(int(i) for i in item.idxs)
            cut.prune()
            criterion.after_prune(model, drop)
        model.train(was_training)
        if self.tracing.shuffle:
            self._prune_lanes(model, ratio, record)
        self.evaluations += 1
        return model, record

    def removed_fraction(self, model: nn.Module) -> float:
        """Fraction of ``base``'s parameters that ``model`` no longer has."""
        return 1.0 - count_params(model) / self.params_before

    def cost_model(self, required: bool = False):
        """The analytic :class:`~lopfast.prune.cost.CostModel` of ``base`` (built once).

        ``None`` if it cannot be built (unless ``required``): callers then prune to count.
        ShuffleNetV2's lanes (:mod:`lopfast.prune.shuffle`) are not in it: ``None`` for such models
        (``required``: a ValueError saying so).
        """
        if self.tracing.shuffle:
            if required:
                raise ValueError("model: ShuffleNetV2's shuffle lanes are not in the analytic cost model, which "
                                 "MAC and latency budgets and AMC need; use the parameter budget (target_removed) "
                                 "or a ratio")
            return None
        cm = self._cost_model_obj()
        if cm is None and required:
            self._cost_model_obj(raise_error=True)
        return cm

    def _cost_model_obj(self, raise_error: bool = False):
        if not hasattr(self, "_cost_model") or (raise_error and self._cost_model is None):
            from lopfast.prune.cost import CostModel

            try:
                self._cost_model = CostModel(self.base, self.example_inputs, self.tp_ignored, _forward,
                                             tracing=self.tracing, round_to=self.round_to)
            except Exception:
                if raise_error:
                    raise
                self._cost_model = None
        return self._cost_model

    def _predicted_cost(self, ratios: RatioSpec) -> Tuple[float, float]:
        """(parameters, conv/linear MACs) of ``prune(..., ratios)`` from the cost model.

        torch-pruning takes each group's ratio from its root layer, capped to keep a channel.
        """
        cm = self.cost_model(required=True)
        caps = self._caps0()
        per = []
        for g in cm.groups:
            r = float(ratios.get(g["root"], 0.0)) if isinstance(ratios, dict) else float(ratios)
            per.append(min(max(r, 0.0), caps.get(g["root"], 0.0)))
        return cm.cost(per)

    def predicted_fraction(self, ratios: RatioSpec) -> float:
        """Removed parameter fraction of ``prune(..., ratios)`` from the cost model (local pruning)."""
        return 1.0 - self._predicted_cost(ratios)[0] / self.params_before

    def predicted_macs_fraction(self, ratios: RatioSpec) -> float:
        """Removed conv/linear MAC fraction of ``prune(..., ratios)`` from the cost model."""
        return 1.0 - self._predicted_cost(ratios)[1] / self.cost_model(required=True).macs0

    def _caps0(self) -> Dict[str, float]:
        if not hasattr(self, "_caps"):
            self._caps = self.caps(self.base)
        return self._caps

    def search(self, prune_at: Callable[[RatioSpec], Tuple[nn.Module, dict]], target: float,
               spec: Optional[Callable[[float], RatioSpec]] = None, hi: float = 1.0,
               what: str = "channel ratio", unit: str = "params") -> Tuple[nn.Module, dict, RatioSpec]:
        """Find ratios whose pruned model removes ``target`` of the parameters (within TOLERANCE).

        Bisects ``x`` in [0, hi] with ratios ``spec(x)`` (default: ``x`` for every layer);
        removing one channel from every layer of a small net can jump over the 0.5-point band,
        so (for local pruning) the layers are then moved one at a time from the ratios just
        below the band to those just above, and finally the deciding layer through its
        intermediate ratios. For local pruning the parameter count of every trial comes from
        the cost model (it does not depend on which channels go) and only the result is
        pruned and checked; if the check disagrees, or for global pruning, every trial is
        pruned. ``prune_at(ratios)`` returns (model, record). Raises ValueError if even
        ``hi`` removes too little, or if no trial lands in the band (with ``round_to``, whose
        steps can be too coarse for the band, the closest trial is taken with a warning).
        With ``unit="macs"`` the target is a fraction of the multiply-accumulates, counted by
        the cost model (conv/linear MACs; local pruning only).
        Returns (model, record, ratios used).
        """
        if unit not in ("params", "macs"):
            raise ValueError(f"unit must be 'params' or 'macs', got {unit!r}")
        spec = spec or (lambda x: x)
        if unit == "macs":
            if self.global_pruning:
                raise ValueError("a MACs budget needs a per-layer allocation, not global pruning")
            ratios = self._search(self.predicted_macs_fraction, target, spec, hi, what, unit)
            model, rec = prune_at(ratios)
            return model, rec, ratios
        if not self.global_pruning and self.cost_model() is not None and self._model_state != "wrong":
            try:
                ratios = self._search(self.predicted_fraction, target, spec, hi, what)
            except ValueError:
                if self._model_state == "exact":
                    raise  # the model has matched real pruning: pruning every trial would fail too
                ratios = None
            if ratios is not None:
                model, rec = prune_at(ratios)
                exact = abs(self.removed_fraction(model) - self.predicted_fraction(ratios)) < 1e-12
                self._model_state = "exact" if exact else "wrong"
                # with round_to the closest count the rounded widths allow (it warned) is the answer
                if abs(self.removed_fraction(model) - target) <= TOLERANCE or (
                        exact and self.round_to and not self.round_to_auto):
                    return model, rec, ratios
                if exact and self.round_to:
                    raise RoundingMissed(f"round_to={self.round_to} (auto) cannot remove {target:.4f} of the "
                                         f"parameters within {TOLERANCE} (closest "
                                         f"{self.removed_fraction(model):.4f}); exact counts used")
        cache: Dict[int, Tuple[nn.Module, dict]] = {}

        def measure(ratios):
            model, rec = prune_at(ratios)
            cache.clear()  # keep only the latest copy alive
            cache[id(ratios)] = (model, rec)
            return self.removed_fraction(model)

        ratios = self._search(measure, target, spec, hi, what)
        if id(ratios) in cache:
            model, rec = cache[id(ratios)]
        else:
            model, rec = prune_at(ratios)
        return model, rec, ratios

    def _search(self, measure: Callable[[RatioSpec], float], target: float, spec: Callable[[float], RatioSpec],
                hi: float, what: str, unit: str = "params") -> RatioSpec:
        counted = "MACs" if unit == "macs" else "parameters"
        top_spec = spec(hi)
        top = measure(top_spec)
        if self.global_pruning and top < target - TOLERANCE:
            # torch-pruning's global ranking skips a group that would lose more than
            # max_layer_ratio, so the removed fraction can fall again near the top: scan down
            for h in [hi - 0.05 * k for k in range(1, int(hi / 0.05))]:
                got = measure(spec(h))
                if got > top:
                    top, top_spec, hi = got, spec(h), h
                if top >= target - TOLERANCE:
                    break
            if abs(top - target) <= TOLERANCE:
                return top_spec
        if abs(top - target) <= TOLERANCE:
            return top_spec
        if top < target - TOLERANCE:
            raise ValueError(
                f"target_removed={target:.4f} is more than this architecture can lose: with every prunable "
                f"layer cut as far as allowed only {top:.4f} of the {counted} go (the input channels, "
                f"the classifier outputs and the ignored layers {self.ignored} are kept)"
            )
        lo, best, best_ratios = 0.0, 0.0, None

        def closer(got, ratios):
            nonlocal best, best_ratios
            if best_ratios is None or abs(got - target) < abs(best - target):
                best, best_ratios = got, ratios

        for _ in range(40):
            mid = 0.5 * (lo + hi)
            ratios = spec(mid)
            got = measure(ratios)
            closer(got, ratios)
            if abs(got - target) <= TOLERANCE:
                return ratios
            if got < target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-3:  # then move single layers; finer uniform steps rarely help
                break
        if not self.global_pruning:
            below, above = self._per_layer(spec(lo)), self._per_layer(spec(hi))
            names = [n for n in self.prunable if below[n] != above[n]]
            a, b = 0, len(names)  # moving the first k layers; k=0 is below, k=len is above
            while b - a > 1:
                k = (a + b) // 2
                ratios = dict(below)
                ratios.update({n: above[n] for n in names[:k]})
                got = measure(ratios)
                closer(got, ratios)
                if abs(got - target) <= TOLERANCE:
                    return ratios
                if got < target:
                    a = k
                else:
                    b = k
            if names:
                # moving layer names[a] jumps over the band: try its intermediate ratios
                base_ratios = dict(below)
                base_ratios.update({n: above[n] for n in names[:a]})
                layer = names[a]
                r_lo, r_hi = below[layer], above[layer]
                for _ in range(12):
                    ratios = dict(base_ratios)
                    ratios[layer] = 0.5 * (r_lo + r_hi)
                    got = measure(ratios)
                    closer(got, ratios)
                    if abs(got - target) <= TOLERANCE:
                        return ratios
                    if got < target:
                        r_lo = ratios[layer]
                    else:
                        r_hi = ratios[layer]
                    if r_hi - r_lo < 1e-4:
                        break
        if self.round_to and best_ratios is not None:
            if self.round_to_auto:
                raise RoundingMissed(f"round_to={self.round_to} (auto) cannot remove {target:.4f} of the {counted} "
                                     f"within {TOLERANCE} (closest {best:.4f}); exact counts used")
            warnings.warn(f"round_to={self.round_to}: the closest the rounded widths get to removing {target:.4f} of "
                          f"the {counted} is {best:.4f} (outside {TOLERANCE}); pruned to that")
            return best_ratios
        raise ValueError(
            f"no {what} removes {target:.4f} of the {counted} within {TOLERANCE}: removing a single "
            f"channel more jumps from below to above it (closest: {best:.4f}); the network is too small "
            f"for this precision"
        )

    def _per_layer(self, ratios: RatioSpec) -> Dict[str, float]:
        if isinstance(ratios, dict):
            return {n: float(ratios.get(n, 0.0)) for n in self.prunable}
        return {n: float(ratios) for n in self.prunable}
