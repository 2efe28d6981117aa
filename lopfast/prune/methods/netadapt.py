"""NetAdapt-style latency budget (Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation
for Mobile Applications", ECCV 2018; official code github.com/denru01/netadapt).

``lopfast.prune(model, x, budget="latency", target_speedup=2.0)`` (allocation ``"netadapt"``,
with any criterion) prunes until the model runs ``target_speedup`` times faster on the device
it is on, measured.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn


def _importance_scores(engine, crit) -> Dict[str, torch.Tensor]:
    """Per group root: the criterion's channel scores on the unpruned model (ascending = first to
    go). Criteria without per-group scores (ThiNet scores layer by layer on the partly pruned
    network) are ranked by the root's L2 filter norm here, NetAdapt's own choice."""
    import copy

    from lopfast.prune.criteria import magnitude_first

    model = copy.deepcopy(engine.base)
    if getattr(crit, "prepare", None) is not None:
        crit.prepare(model)
    importance = getattr(crit, "importance", None)
    if importance is None:
        importance = magnitude_first(2)
    if hasattr(importance, "names"):
        importance.names = {m: n for n, m in model.named_modules()}
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for n, m in model.named_modules() if n in engine.tp_ignored or
               any(n.startswith(i + ".") for i in engine.tp_ignored)]
    model.eval()
    dg = engine.tracing.graph(model, engine.example_inputs)
    out: Dict[str, torch.Tensor] = {}
    fallback = magnitude_first(2)
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        root = names.get(group[0].dep.layer)
        if root is None:
            continue
        imp = importance(group)
        if imp is None or len(imp) == 0:
            imp = fallback(group)
        n = len(group[0].idxs)
        imp = torch.as_tensor(imp, dtype=torch.float64).flatten()
        if imp.numel() != n:  # grouped channels: torch-pruning averages the groups' scores
            imp = imp.view(-1, n).mean(0) if imp.numel() % n == 0 else imp[:n]
        out[root] = imp.clamp_min(0)
    return out


class _State:
    """Kept channels per cost-model group and the predicted latency of the model they give.

    Predicted ms = ``fixed + per_act * act / act0 + sum(table ms of the conv/linear layers)``,
    ``act`` being the conv/linear output elements (what BatchNorm, activations and additions
    walk over); ``fixed`` and ``per_act`` are fitted to two measured forwards (the original and a
    uniformly half-pruned copy)."""

    def __init__(self, cm, table, keep: List[int]) -> None:
        self.cm, self.table = cm, table
        self.keep = list(keep)
        self.convs = [L for L in cm.layers if not L["bn"] and L["per"] > 0 and L["name"] in table.layers]
        self.ms = {L["name"]: self.layer_ms(L, self.keep) for L in self.convs}
        self.act = {L["name"]: self.layer_act(L, self.keep) for L in self.convs}
        self.act0 = sum(L["out"] * max(L["hw"], 1) for L in self.convs) or 1.0  # of the unpruned model
        self.fixed = self.per_act = 0.0

    def dims(self, L, keep) -> tuple:
        out = self.cm._dim(L["name"], "out", L["out"], keep)
        inn = out if L["dw"] else self.cm._dim(L["name"], "in", L["inn"], keep)
        return inn, out

    def layer_ms(self, L, keep) -> float:
        return self.table.layer_ms(L["name"], *self.dims(L, keep))

    def layer_act(self, L, keep) -> float:
        return self.cm._dim(L["name"], "out", L["out"], keep) * max(L["hw"], 1)

    def layers_ms(self, layers, keep) -> float:
        """Predicted ms of ``layers`` (their table ms and their share of the per-activation rest)."""
        return sum(self.layer_ms(L, keep) + self.per_act * self.layer_act(L, keep) / self.act0 for L in layers)

    def current_ms(self, layers) -> float:
        return sum(self.ms[L["name"]] + self.per_act * self.act[L["name"]] / self.act0 for L in layers)

    def update(self, layers) -> None:
        for L in layers:
            self.ms[L["name"]] = self.layer_ms(L, self.keep)
            self.act[L["name"]] = self.layer_act(L, self.keep)

    def total(self) -> float:
        return self.fixed + self.per_act * sum(self.act.values()) / self.act0 + sum(self.ms.values())


def netadapt(engine, crit, ratio, target, data, o, target_speedup: float):
    """NetAdapt allocation under a latency budget: returns (model, record, per-layer ratios, extra).

    As the paper and its official code: a per-layer latency lookup table measured on the device
    (:class:`lopfast.prune.latency.LayerTable`, cached per device and layer configuration), the
    model's latency taken as the sum of its layers', then iterations: iteration ``i`` asks for
    a latency reduction of
    ``step * T0 * decay^(i-1)`` (NetAdapt's ``init_resource_reduction_ratio`` 0.025 and
    ``resource_reduction_decay`` 0.96); every channel group proposes the fewest channels
    (in multiples of ``round_to`` when set, else of 1/64 of its width) whose removal meets it,
    taking its lowest-ranked channels; the proposal with the best damage-to-latency-saved
    ratio is kept (the official ``_find_best_model``: (accuracy drop + 1e-6) / (resource
    drop + 1e-5)).

    Departures, and why:

    * **The rest of the forward is modelled.** NetAdapt sums conv/FC latencies only; on a GPU
      at small batch, and on CPUs, BatchNorm, activations, additions and launches are much of
      the time (12 of 19 ms for a CIFAR ResNet-20 at batch 8 on the CI box). It is fitted as a
      fixed part plus a part proportional to the conv/linear output elements, from the
      original and a uniformly half-pruned copy, both measured (2 x ``repeats`` timings).
    * **No short-term fine-tuning and no accuracy per proposal.** NetAdapt fine-tunes every
      proposal (500 iterations in its MobileNet script) and measures its accuracy on a
      hold-out set; here a proposal's damage is the criterion's importance mass it removes
      (the fraction of its group's total score, times the number of layers whose outputs the
      group holds: a residual stage's channels are a dozen layers' channels), which makes a
      proposal free to evaluate,
      composes with every criterion, and leaves recovery to lopfast's LOP fine-tuning.
    * **The per-iteration reduction has a floor** (``min_step * T0``): the official schedule
      sums to at most 0.625 T0 (a 2.67x cap) at its defaults.
    * **The result is chosen by measurement.** The iterations run on the table's prediction
      until it promises ``target_speedup * search_margin`` (or nothing more can go); while the
      most pruned one measures short, the goal is corrected by the measured/predicted ratio and
      the iterations go on (``recalibrate`` times at most); then the least-pruned iteration whose *measured* speed-up (the whole pruned model against the
      original, timed back to back with :func:`lopfast.prune.latency.model_ms`) reaches the
      target is found by bisection over the iterations and returned. If none does, the most
      pruned one is returned with a warning; ``extra["achieved_speedup"]`` is always the
      measured one.
    * The table interpolates bilinearly on a grid of ``lut_points`` widths per axis (the
      official code times every multiple of 8 and interpolates with an RBF); ``lut_points="all"``
      times every multiple of the rounding unit.

    The latency is that of a forward at ``batch`` (default: ``example_inputs``' batch), eager
    (``compiled=True``: ``torch.compile``d, for the final measurements; the table is eager),
    with bf16 autocast and channels_last on CUDA as the pipeline runs. Every measured speed-up
    is the median of ``repeats`` back-to-back ratios (original, pruned) of medians of up to
    ``rounds`` timings (about ``budget_s`` seconds each). Options: batch, step=0.025,
    decay=0.96, min_step=0.005, max_iters=500, search_margin=1.25, recalibrate=3, lut_points=5,
    compiled=False, rounds=20, budget_s=0.3, repeats=3.
    """
    from lopfast.prune.latency import LayerTable, model_ms

    cm = engine.cost_model(required=True)
    example = engine.example_inputs
    if not isinstance(example, torch.Tensor):
        raise ValueError("budget='latency': latency is measured on a single input tensor; example_inputs is a "
                         f"{type(example).__name__}")
    batch = o["batch"] or int(example.shape[0])
    # every group moves in whole units: round_to (and grouped convs' group counts), else 1/64 of its width
    units = {}
    for g in cm.groups:
        cg = cm.conv_groups.get(g["root"], 1)
        u = engine.unit(g["root"]) if engine.round_to else cg * math.ceil(math.ceil(g["channels"] / 64) / cg)
        units[g["root"]] = u
    layer_units = {}
    for g in cm.groups:
        for m in g["members"]:
            layer_units[m] = units[g["root"]]
    table = LayerTable(engine.base, example, batch=batch, units=layer_units, points=o["lut_points"],
                       rounds=o["rounds"])
    scores = _importance_scores(engine, crit)

    def speedup_of(model: nn.Module):
        """Measured speed-up of ``model`` over the original: the median of ``repeats`` ratios of
        back-to-back timings (a shared machine's load changes between them)."""
        pairs = []
        for _ in range(o["repeats"]):
            a = model_ms(engine.base, example, batch=batch, compiled=o["compiled"], rounds=o["rounds"],
                         budget_s=o["budget_s"])["median_ms"]
            b = model_ms(model, example, batch=batch, compiled=o["compiled"], rounds=o["rounds"],
                         budget_s=o["budget_s"])["median_ms"]
            pairs.append((a / b, a, b))
        pairs.sort()
        return pairs[len(pairs) // 2]

    n_groups = len(cm.groups)
    state = _State(cm, table, [g["channels"] for g in cm.groups])
    s0 = state.total()
    caps = engine._caps0()
    # the removal order of each group and its cumulative damage (fraction of its score mass)
    cum: List[Optional[torch.Tensor]] = []
    for g in cm.groups:
        s = scores.get(g["root"])
        if s is None or s.numel() != g["channels"]:
            s = torch.ones(g["channels"], dtype=torch.float64)
        srt = torch.sort(s).values
        tot = float(srt.sum()) or 1.0
        cum.append(torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(srt, 0) / tot]))
    affected: List[List[dict]] = [[] for _ in range(n_groups)]
    for L in state.convs:
        touched = set(cm.cover.get((L["name"], "out"), {})) | set(cm.cover.get((L["name"], "in"), {}))
        for gi in touched:
            affected[gi].append(L)
    min_keep = []
    for gi, g in enumerate(cm.groups):
        cap = caps.get(g["root"], 0.0)
        lo = max(1, int(g["channels"] * (1.0 - cap)))
        u = units[g["root"]]
        min_keep.append(min(g["channels"], max(lo, u)))

    def ratios_of(keep):
        return {g["root"]: (1.0 - (k + 0.5) / g["channels"]) if k < g["channels"] else 0.0
                for g, k in zip(cm.groups, keep)}

    # fit the rest of the forward (what the table does not time) to two measurements: the original
    # and a copy with every group at half its channels
    half = [max(mk, (g["channels"] // 2) // units[g["root"]] * units[g["root"]] or mk)
            for g, mk in zip(cm.groups, min_keep)]
    half_model, _ = crit.prune(engine, ratios_of(half))
    sp_half, t0_meas, t_half = speedup_of(half_model)
    del half_model
    half_state = _State(cm, table, half)
    act_h = sum(half_state.act.values()) / half_state.act0
    rest0, rest_h = t0_meas - s0, t_half - half_state.total()
    per_act = (rest0 - rest_h) / (1.0 - act_h) if act_h < 1.0 else 0.0
    per_act = min(max(per_act, 0.0), max(rest0, 0.0))
    state.fixed, state.per_act = max(rest0 - per_act, 0.0), per_act
    t0 = state.total()
    calibration = {"original_ms": t0_meas, "half_ms": t_half, "half_speedup": sp_half, "table_ms": s0,
                   "fixed_ms": state.fixed, "per_activation_ms": state.per_act}

    history = []  # (iteration, keep vector, predicted speed-up)
    it = 0

    def iterate(goal: float) -> None:
        nonlocal it
        while it < o["max_iters"]:
            it += 1
            current = state.total()
            if t0 / current >= goal:
                break
            want = max(o["step"] * t0 * o["decay"] ** (it - 1), o["min_step"] * t0)
            want = min(want, current - t0 / goal) if current - t0 / goal > 0 else want
            best = None
            for gi, g in enumerate(cm.groups):
                k0 = state.keep[gi]
                u = units[g["root"]]
                if k0 <= min_keep[gi]:
                    continue
                base_ms = state.current_ms(affected[gi])
                prop = None
                k = k0
                while True:
                    k = max(min_keep[gi], (k - u) if k % u == 0 else (k // u) * u)
                    if k >= k0:
                        break
                    trial = list(state.keep)
                    trial[gi] = k
                    new_ms = state.layers_ms(affected[gi], trial)
                    saved = base_ms - new_ms
                    prop = (k, saved)
                    if saved >= want or k <= min_keep[gi]:
                        break
                if prop is None or prop[1] <= 0:
                    continue
                k, saved = prop
                # every conv/linear whose outputs the group holds loses that share of its channels (a
                # residual stage's group couples a dozen layers: cutting it costs a dozen layers' worth)
                dmg = float(cum[gi][g["channels"] - k] - cum[gi][g["channels"] - k0]) * max(len(g["members"]), 1)
                meets = saved >= want
                key = (not meets, (dmg + 1e-6) / (saved + 1e-5 * t0))
                if best is None or key < best[0]:
                    best = (key, gi, k)
            if best is None:
                break  # no group can lose another unit of channels with any saving
            _, gi, k = best
            state.keep[gi] = k
            state.update(affected[gi])
            history.append((it, list(state.keep), t0 / state.total()))

    measurements = []
    kept = {}  # the measured states still held: the last one and the best that met the target

    def measure(i):
        if i in kept:
            return kept[i]
        model, rec = crit.prune(engine, ratios_of(history[i][1]))
        sp, base_ms, ms = speedup_of(model)
        measurements.append({"iteration": history[i][0], "predicted_speedup": history[i][2], "measured_speedup": sp,
                             "original_ms": base_ms, "pruned_ms": ms})
        for j in [j for j in kept if not (kept[j][0] >= target_speedup and j > i)]:
            del kept[j]
        kept[i] = (sp, model, rec)
        return kept[i]

    iterate(target_speedup * o["search_margin"])
    if not history:
        raise ValueError(f"target_speedup={target_speedup}: no channel group of this model can be pruned under the "
                         "latency table (every group is ignored or at one channel)")
    # the prediction can be optimistic (a CPU runs a narrow layer less efficiently than its table cell
    # says): while the most pruned state measures short, carry on towards a goal corrected by the
    # measured/predicted ratio
    for _ in range(o["recalibrate"]):
        sp_last = measure(len(history) - 1)[0]
        if sp_last >= target_speedup:
            break
        n = len(history)
        iterate(target_speedup * history[-1][2] / sp_last * o["search_margin"])
        if len(history) == n:
            break  # nothing more can go
    # bisection over the iterations for the least-pruned one that meets the target, measured
    hi = len(history) - 1
    sp_hi = measure(hi)[0]
    chosen = hi
    if sp_hi >= target_speedup:
        lo = -1
        first = next((i for i, h in enumerate(history) if h[2] >= target_speedup), hi)
        if first < hi:
            if measure(first)[0] >= target_speedup:
                hi = first
            else:
                lo = first
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if measure(mid)[0] >= target_speedup:
                hi = mid
            else:
                lo = mid
        chosen = hi
    else:
        warnings.warn(f"budget='latency': the most pruned network measured {sp_hi:.2f}x faster, short of "
                      f"target_speedup={target_speedup:g} (channels of every group are at their limits, or this "
                      f"device's latency does not fall with channels at batch {batch})")
    sp, model, rec = measure(chosen)
    extra = {
        "target_speedup": target_speedup,
        "achieved_speedup": sp,
        "predicted_speedup": history[chosen][2],
        "netadapt": {"iterations": len(history), "chosen_iteration": history[chosen][0], "batch": batch,
                     "mode": "compiled" if o["compiled"] else "eager", "calibration": calibration,
                     "measurements": measurements,
                     "table_configs_measured": table.measured, "table_configs_cached": table.cached,
                     "device": _device_name(example)},
    }
    return model, rec, ratios_of(history[chosen][1]), extra


def _device_name(example) -> str:
    from lopfast.prune.latency import device_label

    return device_label(example.device)

