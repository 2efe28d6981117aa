"""Shared machinery: pruning a copy with torch-pruning, the channel-ratio search, counting."""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from lopfast.prune.attention import attention_kwargs, sync_attention, sync_widths
from lopfast.prune.importance import PrecomputedImportance, require_tp

#: the removed-parameter fraction must land within this of ``target_removed`` (0.5 points)
TOLERANCE = 0.005

RatioSpec = Union[float, Dict[str, float]]


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


def _under(name: str, ignored: Iterable[str]) -> bool:
    return any(name == i or name.startswith(i + ".") for i in ignored)


def output_layers(model: nn.Module, example_inputs) -> List[str]:
    """The conv/linear layers whose output *is* the model's output (the classifier).

    Found by identity of the output tensor during a forward pass; if the output is
    post-processed, the last conv/linear executed is taken instead.
    """
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


def _forward(model: nn.Module, example_inputs):
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(example_inputs)


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
                 max_layer_ratio: float = 0.95) -> None:
        self.tp = require_tp()
        self.base = base
        self.example_inputs = example_inputs
        self.ignored = list(ignored)
        self.global_pruning = global_pruning
        self.max_layer_ratio = max_layer_ratio
        self.params_before = count_params(base)
        self.prunable = prunable_layers(base, self.ignored)
        self.evaluations = 0
        # whether the cost model has matched a real pruning ("exact"), failed to ("wrong"), or is untested
        self._model_state = "untested"

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
        tp = self.tp
        model = copy.deepcopy(self.base if source is None else source)
        if prepare is not None:
            prepare(model)
        names = {m: n for n, m in model.named_modules()}
        by_name = dict(model.named_modules())
        if isinstance(importance, PrecomputedImportance):
            importance.names = names
        ignored_modules = [m for n, m in model.named_modules()
                           if _under(n, self.ignored) and isinstance(m, (nn.Conv2d, nn.Linear))]
        kwargs = dict(importance=importance, ignored_layers=ignored_modules)
        if self.global_pruning:
            if isinstance(ratio, dict):
                raise ValueError("global_pruning ranks all layers together and cannot take per-layer ratios")
            kwargs.update(global_pruning=True, pruning_ratio=float(ratio), max_pruning_ratio=self.max_layer_ratio)
        else:
            caps = self.caps(model)
            per = ratio if isinstance(ratio, dict) else {n: float(ratio) for n in self.prunable}
            kwargs.update(pruning_ratio=0.0, pruning_ratio_dict={
                by_name[n]: min(max(float(r), 0.0), caps[n]) for n, r in per.items() if n in caps})
        # attention blocks: whole heads at the channel ratio (lopfast.prune.attention)
        head_ratio = float(ratio) if not isinstance(ratio, dict) else sum(ratio.values()) / max(len(ratio), 1)
        kwargs.update(attention_kwargs(model, head_ratio))
        pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
        was_training = model.training
        model.eval()
        pruner = pruner_cls(model, self.example_inputs, **kwargs)
        record: Dict[Tuple[str, str], List[int]] = {}
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
        self.evaluations += 1
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
                           if _under(n, self.ignored) and isinstance(m, (nn.Conv2d, nn.Linear))]
        caps = self.caps(model)
        per = ratio if isinstance(ratio, dict) else {n: float(ratio) for n in self.prunable}
        was_training = model.training
        model.eval()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=self.example_inputs)
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
            keep = max(1, int(n * (1.0 - r)))
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
        self.evaluations += 1
        return model, record

    def removed_fraction(self, model: nn.Module) -> float:
        """Fraction of ``base``'s parameters that ``model`` no longer has."""
        return 1.0 - count_params(model) / self.params_before

    def cost_model(self, required: bool = False):
        """The analytic :class:`~lopfast.prune.cost.CostModel` of ``base`` (built once).

        ``None`` if it cannot be built (unless ``required``): callers then prune to count.
        """
        if not hasattr(self, "_cost_model"):
            from lopfast.prune.cost import CostModel

            try:
                self._cost_model = CostModel(self.base, self.example_inputs, self.ignored, _forward)
            except Exception:
                if required:
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
        ``hi`` removes too little, or if no trial lands in the band.
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
                if abs(self.removed_fraction(model) - target) <= TOLERANCE:
                    return model, rec, ratios
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
        lo, best = 0.0, 0.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            ratios = spec(mid)
            got = measure(ratios)
            best = got if abs(got - target) < abs(best - target) else best
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
                best = got if abs(got - target) < abs(best - target) else best
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
                    best = got if abs(got - target) < abs(best - target) else best
                    if abs(got - target) <= TOLERANCE:
                        return ratios
                    if got < target:
                        r_lo = ratios[layer]
                    else:
                        r_hi = ratios[layer]
                    if r_hi - r_lo < 1e-4:
                        break
        raise ValueError(
            f"no {what} removes {target:.4f} of the {counted} within {TOLERANCE}: removing a single "
            f"channel more jumps from below to above it (closest: {best:.4f}); the network is too small "
            f"for this precision"
        )

    def _per_layer(self, ratios: RatioSpec) -> Dict[str, float]:
        if isinstance(ratios, dict):
            return {n: float(ratios.get(n, 0.0)) for n in self.prunable}
        return {n: float(ratios) for n in self.prunable}
