"""Criteria: which channels of a layer (a torch-pruning channel group) go.

A criterion is built once per call of :func:`lopfast.prune.prune` from the model being
pruned (and ``data`` where it needs it) and then prunes copies of that model at whatever
per-layer ratios the allocation asks for (:meth:`Criterion.prune`). Most criteria are
torch-pruning importances; the data-driven ones that score on the unpruned model (Taylor,
HRank, Hessian) are precomputed and looked up by module name so the ratio search and the
EagleEye/AMC allocations can prune many copies without running the data again. ThiNet
prunes layer by layer on the partially pruned network (:meth:`Engine.prune_sequential`).
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lopfast.prune.importance import (
    HRankImportance,
    PrecomputedImportance,
    _batches,
    _is_in_fn,
    _is_out_fn,
    require_tp,
    thinet_order,
)

_BN = nn.modules.batchnorm._BatchNorm


class Criterion:
    """A channel-selection rule bound to one model: ``prune(engine, ratios)`` returns
    (pruned copy, removal record) at per-layer ``ratios`` (or one global ratio)."""

    name = "?"
    sequential = False  # prunes group by group on the partially pruned network

    def __init__(self, importance=None, prepare: Optional[Callable[[nn.Module], None]] = None,
                 extra: Optional[Dict[str, Any]] = None) -> None:
        self.importance, self.prepare = importance, prepare
        self.extra: Dict[str, Any] = dict(extra or {})

    def prune(self, engine, ratios, source: Optional[nn.Module] = None):
        """A pruned copy of ``source`` (default ``engine.base``) at ``ratios``, and its removal record."""
        return engine.prune(self.importance, ratios, source=source, prepare=self.prepare)


# ---------------------------------------------------------------------------- magnitude & torch-pruning
def magnitude_first(p: int):
    """Li et al.'s per-filter norm: the ``p``-norm of the root layer's own filters only
    (torch-pruning's group_reduction="first"), not a mean over the coupled layers."""
    tp = require_tp()
    cls = getattr(tp.importance, "GroupMagnitudeImportance", None) or tp.importance.MagnitudeImportance
    return cls(p=p, group_reduction="first")


class _Fallback:
    """Use ``primary`` and fall back when it has nothing to say about a group."""

    def __init__(self, primary, fallback):
        self.primary, self.fallback = primary, fallback

    def __call__(self, group):
        imp = self.primary(group)
        if imp is None or (isinstance(imp, (list, tuple)) and len(imp) == 0):
            return self.fallback(group)
        return imp


class SeededRandomImportance:
    """Uniform random channel scores from a seeded generator (torch-pruning's RandomImportance
    draws from the global RNG, which would make repeated prunes disagree)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def __call__(self, group):
        n = len(group[0].idxs)
        # one stream per group size and root position keeps the search's copies consistent
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
        return torch.rand(n, generator=g)


# ---------------------------------------------------------------------------- Taylor (Molchanov)
class MolchanovTaylorImportance:
    """First-order Taylor importance of Molchanov et al. (CVPR 2019), group version.

    For every batch b the contribution of a channel is the sum over all parameters that
    belong to it in the group (the producing filters, its BN scale and shift) of
    w * dL/dw, squared; the score is the average of that square over the batches
    (paper Eq. 8 with their per-minibatch accumulation). ``per_batch[name]`` holds, per
    layer, the (batches, C) un-squared sums; the group sums them per batch and squares.
    Departure from the paper: Molchanov et al. prune a few channels every few minibatches
    while fine-tuning; here the scores come from ``batches`` batches (default 4) of the
    unpruned model and the cut is one-shot unless ``procedure="iterative"`` re-scores
    between steps. (torch-pruning's GroupTaylorImportance sums |W * g| without the square
    per batch; it is not used.)
    """

    def __init__(self, per_batch: Dict[str, torch.Tensor]) -> None:
        self.per_batch = per_batch
        self.names: Dict[nn.Module, str] = {}

    @torch.no_grad()
    def __call__(self, group):
        total = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer, fn = dep.layer, dep.pruning_fn
            name = self.names.get(layer)
            if name is None or name not in self.per_batch:
                continue
            is_bn = isinstance(layer, _BN) and not _is_in_fn(fn)
            if not (_is_out_fn(fn) or is_bn) or any(r is None for r in item.root_idxs):
                continue
            contrib = self.per_batch[name][:, torch.as_tensor(idxs, dtype=torch.long)]
            if total is None:
                total = torch.zeros(contrib.shape[0], len(group[0].idxs), dtype=torch.float64)
            total.index_add_(1, torch.as_tensor(item.root_idxs, dtype=torch.long), contrib)
        if total is None:
            return None
        return total.pow(2).mean(0).float()


def taylor_contributions(model: nn.Module, data, batches: int, loss_fn) -> Dict[str, torch.Tensor]:
    """Per batch, per output channel of every conv/linear/BN: sum of w * dL/dw (float64)."""
    scratch = copy.deepcopy(model)
    scratch.eval()  # score the network as deployed (BN on running statistics)
    layers = {n: m for n, m in scratch.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, _BN))}
    out: Dict[str, List[torch.Tensor]] = {n: [] for n in layers}
    seen = 0
    for x, y in _batches(data, batches):
        scratch.zero_grad(set_to_none=True)
        loss_fn(scratch(x), y).backward()
        for n, m in layers.items():
            s = None
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter) and p.grad is not None:
                    v = (p.detach() * p.grad).double()
                    v = v.reshape(v.shape[0], -1).sum(1) if v.dim() > 1 else v
                    s = v if s is None else s + v
            if s is not None:
                out[n].append(s.cpu())
        seen += 1
    if seen == 0:
        raise ValueError("data yielded no batches; taylor needs at least one batch")
    return {n: torch.stack(v) for n, v in out.items() if v}


# ---------------------------------------------------------------------------- Hessian / OBD
def squared_gradients(model: nn.Module, data, batches: int, loss_fn) -> Dict[str, torch.Tensor]:
    """Mean over samples of the per-sample squared gradient of every parameter, by name
    (the empirical-Fisher diagonal that torch-pruning's GroupHessianImportance uses)."""
    scratch = copy.deepcopy(model)
    scratch.eval()
    acc: Dict[str, torch.Tensor] = {}
    count = 0
    for x, y in _batches(data, batches):
        for i in range(x.shape[0]):
            scratch.zero_grad(set_to_none=True)
            loss_fn(scratch(x[i:i + 1]), y[i:i + 1]).backward()
            for n, p in scratch.named_parameters():
                if p.grad is not None:
                    g2 = p.grad.detach().pow(2)
                    acc[n] = acc[n] + g2 if n in acc else g2.clone()
            count += 1
    if count == 0:
        raise ValueError("data yielded no batches; hessian needs at least one batch")
    return {n: v / count for n, v in acc.items()}


# ---------------------------------------------------------------------------- HRank after the activation
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish, nn.GELU, nn.PReLU, nn.Mish)
_ACT_FUNCS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.hardswish, F.gelu, F.mish, torch.relu,
              getattr(torch, "relu_", None), getattr(F, "relu_", None)}
_ACT_METHODS = {"relu", "relu_", "clamp", "clamp_"}
_ADDS = {operator.add, operator.iadd, torch.add}


def activation_sites(model: nn.Module):
    """For every conv: the fx node whose output HRank ranks, and how it was reached.

    From the conv's output the graph is followed through single-use BatchNorm and residual
    additions to the first activation (conv -> BN -> ReLU; conv -> BN -> add -> ReLU in a
    residual block, as the official HRank code hooks ResNets). A conv with no activation
    downstream (a linear bottleneck) is ranked at the last BN/add output. Returns
    (GraphModule, {conv name: (node name, site kind)}); raises if fx cannot trace.
    """
    import torch.fx as fx

    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())

    def kind(node):
        if node.op == "call_module":
            m = mods.get(node.target)
            if isinstance(m, _BN):
                return "bn"
            if isinstance(m, _ACT_MODULES):
                return "act"
            return None
        if node.op == "call_function":
            if node.target in _ACT_FUNCS:
                return "act"
            if node.target in _ADDS:
                return "add"
            if node.target is F.batch_norm:
                return "bn"
        if node.op == "call_method":
            if node.target in _ACT_METHODS:
                return "act"
            if node.target in ("add", "add_"):
                return "add"
        return None

    sites = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.Conv2d):
            continue
        cur, how = node, "conv output"
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            k = kind(users[0])
            if k == "act":
                cur, how = users[0], "after activation" + (" (after residual add)" if "add" in how else "")
                break
            if k in ("bn", "add"):
                cur = users[0]
                how = "after add (no activation)" if k == "add" else ("after BN (no activation)"
                                                                     if "add" not in how else how)
                continue
            break
        sites[node.target] = (cur.name, how)
    return gm, sites


@torch.no_grad()
def hrank_post_activation_scores(model: nn.Module, data, *, batches: int = 5):
    """Average feature-map rank of every conv channel, taken where :func:`activation_sites`
    says (after the activation). Returns ({conv name: (C,) mean rank}, {conv name: site}).

    The HRank preset uses 5 batches (the official code: 5 batches of 128 training images;
    the batch size is ``data``'s). Linear layers have no feature map: they are scored by L1
    (``linear_criterion="l1"``, listed in ``extra["hrank_l1_layers"]``) or refused
    (``linear_criterion="error"``). If torch.fx cannot trace the model, the conv outputs
    are ranked instead, with a warning (``extra["hrank_where"]`` says which).
    """
    import torch.fx as fx

    from lopfast.prune.importance import feature_map_ranks

    gm, sites = activation_sites(model)
    by_node: Dict[str, List[str]] = {}
    for conv, (node, _) in sites.items():
        by_node.setdefault(node, []).append(conv)
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in by_node and isinstance(out, torch.Tensor) and out.dim() == 4:
                ranks = feature_map_ranks(out).double()
                for conv in by_node[n.name]:
                    sums[conv] = sums.get(conv, 0) + ranks.sum(0).cpu()
                    counts[conv] = counts.get(conv, 0) + ranks.shape[0]
            return out

    was_training = model.training
    gm.eval()
    seen = 0
    try:
        for x, _ in _batches(data, batches):
            _Rec(gm).run(x)
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("data yielded no batches; hrank needs at least one batch of inputs")
    return {n: (sums[n] / counts[n]).float() for n in sums}, {n: s[1] for n, s in sites.items()}


# ---------------------------------------------------------------------------- ThiNet, layer by layer
class _Stop(Exception):
    pass


def _thinet_eligible(m: nn.Module) -> bool:
    """Layers ThiNet and AMC sample: linear, and convs with groups=1 and explicit zero padding."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                        and not isinstance(m.padding, str))


def _locations(module: nn.Module, x: torch.Tensor) -> int:
    """Output locations per sample of ``module`` on input ``x`` (a linear's tokens, a conv's pixels)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).shape[1]
    size = 1
    for i in range(2):
        k, s, p, d = module.kernel_size[i], module.stride[i], module.padding[i], module.dilation[i]
        size *= (x.shape[2 + i] + 2 * p - d * (k - 1) - 1) // s + 1
    return size


def _columns(module: nn.Module, x: torch.Tensor, img: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """(N, C_in * k) input patches of ``module`` at sampled (image, location) pairs."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])[img, loc]
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols[img, :, loc]


def sampled_contributions(module: nn.Module, x: torch.Tensor, positions: int, gen: torch.Generator):
    """ThiNet's sampling (official code): per input image ``positions`` random output
    locations, each with one random output channel. Returns (z (C_in, N), y (N,)) with
    z[c, s] the contribution of input channel c to sampled output s (pre-bias) and
    y = z.sum(0)."""
    w = module.weight.detach()
    x = x.detach()
    n = x.shape[0] * positions
    img = torch.arange(x.shape[0]).repeat_interleave(positions)
    loc = torch.randint(_locations(module, x), (n,), generator=gen)
    o = torch.randint(w.shape[0], (n,), generator=gen)
    c = w.shape[1]
    patches = _columns(module, x, img.to(x.device), loc.to(x.device)).reshape(n, c, -1)  # (N, C, k)
    z = torch.einsum("sck,sck->cs", patches, w.reshape(w.shape[0], c, -1)[o.to(x.device)])
    return z.double().cpu(), z.sum(0).double().cpu()


class ThiNetCriterion(Criterion):
    """ThiNet (Luo et al., ICCV 2017), as the official code does it, layer by layer.

    For each channel group, in network order, on the network pruned so far: every
    consuming conv (groups=1) / linear layer is sampled at ``positions`` random output
    locations per image, one random output filter each, on ``batches`` batches of ``data``
    (one forward per group, stopped after the last consumer); the greedy rule removes
    first the channel whose removal changes those sampled outputs least; then the kept
    input channels of each consumer are rescaled by least squares on the same samples
    (paper Eq. 6, ``rescale=True``; a small ridge pulls ill-determined scales to 1). Only
    the sample matrices of the current group are held (C_in x batches*B*positions doubles
    per consumer), so memory does not grow with depth. Groups with no such consumer (only
    a depthwise conv reads them) fall back to Li et al.'s L1.

    Measured cost (target_removed=0.9, defaults: 2 batches of 128, 10 positions; one CPU
    thread on a shared box): CIFAR ResNet-56 26 s, 175 MB above the model, 24 MB of samples
    at most; CIFAR MobileNetV2 74 s, 371 MB above the model (the previous sampler, every
    output channel at 256 positions for all layers at once: 59-73 s and 5.1 GB), 39 MB of
    samples. Departure from the paper: ThiNet fine-tunes one or two epochs after each layer;
    here the layers are pruned back to back (recovery is the pipeline's job).
    """

    name = "thinet"
    sequential = True

    def __init__(self, data, *, batches: int, positions: int, seed: int, rescale: bool, ridge: float = 1e-3):
        super().__init__()
        self.data, self.batches, self.positions = data, batches, positions
        self.seed, self.rescale, self.ridge = seed, rescale, ridge
        self.fallback = magnitude_first(1)
        self.peak_sample_bytes = 0

    def prune(self, engine, ratios, source=None):
        """As :meth:`Criterion.prune`, group by group on the partially pruned copy."""
        return engine.prune_sequential(self, ratios, source=source)

    def score(self, model: nn.Module, group) -> torch.Tensor:
        """Per channel of ``group`` on ``model`` (pruned so far): its place in ThiNet's greedy
        removal order scaled to (0, 1], lowest goes first; the fallback importance where no
        consumer can be sampled (called by :meth:`Engine.prune_sequential`)."""
        consumers = [(item.dep.layer, item) for item in group
                     if _is_in_fn(item.dep.pruning_fn) and _thinet_eligible(item.dep.layer)
                     and all(r is not None for r in item.root_idxs)]
        self._samples = []
        if not consumers:
            return self.fallback(group)
        gen = torch.Generator().manual_seed(self.seed)
        got: Dict[int, List] = {id(m): [] for m, _ in consumers}
        layers = {id(m): m for m, _ in consumers}
        pending = set()

        def hook(module, inputs):
            got[id(module)].append(sampled_contributions(module, inputs[0], self.positions, gen))
            pending.discard(id(module))
            if not pending:
                raise _Stop

        handles = [m.register_forward_pre_hook(hook) for m in layers.values()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for x, _ in _batches(self.data, self.batches):
                    pending.update(layers)
                    try:
                        model(x)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        n = len(group[0].idxs)
        blocks = []
        for m, item in consumers:
            parts = got[id(m)]
            if not parts:
                continue
            z = torch.cat([p[0] for p in parts], dim=1)
            y = torch.cat([p[1] for p in parts])
            self._samples.append((m, item, z, y))
            zr = torch.zeros(n, z.shape[1], dtype=torch.float64)
            zr[torch.as_tensor(item.root_idxs, dtype=torch.long)] = z[torch.as_tensor(item.idxs, dtype=torch.long)]
            blocks.append(zr)
        held = sum(s[2].numel() * 8 + s[3].numel() * 8 for s in self._samples)
        self.peak_sample_bytes = max(self.peak_sample_bytes, held + sum(b.numel() * 8 for b in blocks))
        if not blocks:
            return self.fallback(group)
        order = thinet_order(torch.cat(blocks, dim=1))
        score = torch.empty(n)
        score[order] = torch.arange(1, n + 1, dtype=torch.float32) / n
        return score

    @torch.no_grad()
    def after_prune(self, model: nn.Module, removed_root: List[int]) -> List[nn.Module]:
        """Rescale each sampled consumer's kept input channels (least squares on its samples)."""
        done = []
        if not self.rescale:
            self._samples = []
            return done
        removed = set(int(i) for i in removed_root)
        for m, item, z, y in self._samples:
            gone = {int(c) for c, r in zip(item.idxs, item.root_idxs) if int(r) in removed}
            kept = [c for c in range(z.shape[0]) if c not in gone]
            zk = z[kept]
            gram = zk @ zk.T
            lam = self.ridge * float(gram.diagonal().mean().clamp_min(1e-12))
            eye = torch.eye(len(kept), dtype=gram.dtype)
            s = torch.linalg.solve(gram + lam * eye, zk @ y + lam * torch.ones(len(kept), dtype=gram.dtype))
            w = m.weight
            if w.shape[1] != len(kept):  # not this group's consumer after all (shape moved on)
                continue
            w.mul_(s.to(w.dtype).to(w.device).reshape((1, -1) + (1,) * (w.dim() - 2)))
            done.append(m)
        names = {m: n for n, m in model.named_modules()}
        rescaled = self.extra.setdefault("rescaled_layers", [])
        rescaled.extend(names[m] for m in done if names.get(m) and names[m] not in rescaled)
        self._samples = []
        return done


# ---------------------------------------------------------------------------- building a criterion
def build_criterion(name: str, model: nn.Module, data, opts: Dict[str, Any], allocation: str) -> Criterion:
    """The criterion ``name`` scored on ``model`` (the model the allocation prunes copies of).

    Measured costs (zoo CIFAR ResNet-56 / MobileNetV2, target_removed=0.9, one CPU thread):
    the table in :mod:`lopfast.prune.compose`.
    """
    tp = require_tp()
    if name in ("l1", "l2"):
        # Li et al. rank a layer's filters by their own norm; for a global ranking the groups'
        # scores are mean-normalised (torch-pruning's default) so layers of different scale compare
        imp = magnitude_first(1 if name == "l1" else 2)
        return Criterion(imp, extra={"criterion": f"{name} norm of the root layer's filters (group_reduction=first)"})
    if name == "bn":
        if not any(isinstance(m, _BN) for m in model.modules()):
            raise ValueError("criterion='bn' needs BatchNorm layers (network slimming scores channels by BN scale)")
        # network slimming's global threshold compares raw |gamma| across layers
        bn = tp.importance.BNScaleImportance(normalizer=None if allocation == "global" else "mean")
        return Criterion(_Fallback(bn, magnitude_first(1)))
    if name == "lamp":
        return Criterion(tp.importance.LAMPImportance())
    if name == "fpgm":
        return Criterion(tp.importance.FPGMImportance())
    if name == "random":
        return Criterion(SeededRandomImportance(opts["seed"]))
    if name == "taylor":
        imp = MolchanovTaylorImportance(taylor_contributions(model, data, opts["batches"], opts["loss_fn"]))

        def prepare(copy_):
            imp.names = {m: n for n, m in copy_.named_modules()}

        return Criterion(_Fallback(imp, magnitude_first(1)), prepare=prepare)
    if name == "hessian":
        g2 = squared_gradients(model, data, opts["batches"], opts["loss_fn"])
        imp = tp.importance.GroupHessianImportance()

        def prepare(copy_):
            # torch-pruning reads the accumulated second moments from .grad when its own buffer is empty
            for n, p in copy_.named_parameters():
                if n in g2:
                    p.grad = g2[n].clone()

        return Criterion(imp, prepare=prepare)
    if name == "hrank":
        return _hrank(model, data, opts)
    if name == "thinet":
        return ThiNetCriterion(data, batches=opts["batches"], positions=opts["positions"], seed=opts["seed"],
                               rescale=opts["rescale"])
    raise ValueError(f"criterion {name!r} is built by its procedure")


def _hrank(model: nn.Module, data, opts) -> Criterion:
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        scores, sites = hrank_post_activation_scores(model, data, batches=opts["batches"])
        where = "after the activation"
    except Exception as e:  # fx cannot trace data-dependent control flow
        warnings.warn(f"hrank: torch.fx could not trace the model ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "ranking the conv outputs instead of the post-activation maps")
        from lopfast.prune.importance import hrank_scores

        scores = hrank_scores(model, data, batches=opts["batches"])
        sites = {n: "conv output (fx trace failed)" for n in scores}
        where = "conv output"
    if not scores:
        raise ValueError("hrank ranks 2-D feature maps and the model has no Conv2d layer")
    if opts["linear_criterion"] == "error":
        fallback = _RefuseLinear()
    else:
        fallback = magnitude_first(1)
    imp = HRankImportance(out_scores=scores, fallback=fallback)
    return Criterion(imp, prepare=lambda copy_: setattr(imp, "names", {m: n for n, m in copy_.named_modules()}),
                     extra={"hrank_sites": sites, "hrank_where": where,
                            "hrank_l1_layers": linear if opts["linear_criterion"] == "l1" else []})


class _RefuseLinear:
    def __call__(self, group):
        raise ValueError(f"hrank cannot rank the linear layer {group[0].dep.layer} (no 2-D feature map); pass "
                         "linear_criterion='l1' or ignore the layer with ignored=[...]")
