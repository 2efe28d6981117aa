"""ADMM structured pruning (Zhang et al., "A Systematic DNN Weight Pruning Framework using
Alternating Direction Method of Multipliers", ECCV 2018), channel (group) sparsity variant."""
from __future__ import annotations

import copy
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lopfast.prune.engine import _under
from lopfast.prune.importance import _is_out_fn, magnitude_importance, require_tp


def _channel_groups(model: nn.Module, example_inputs, ignored: List[str], ratio_of) -> List[Tuple[list, int, int]]:
    """For each prunable channel group: ([(param, dim0 index map)], n_channels, n_keep)."""
    tp = require_tp()
    ignored_modules = [m for n, m in model.named_modules()
                       if _under(n, ignored) and isinstance(m, (nn.Conv2d, nn.Linear))]
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    model.train(was_training)
    out = []
    for group in dg.get_all_groups(ignored_layers=ignored_modules, root_module_types=[nn.Conv2d, nn.Linear]):
        n = len(group[0].idxs)
        root = names.get(group[0].dep.layer)
        keep = int(n * (1.0 - ratio_of(root))) if root is not None else n
        keep = max(1, keep)
        if keep >= n:
            continue
        slices = []
        for item in group:
            layer, fn = item.dep.layer, item.dep.pruning_fn
            is_bn = isinstance(layer, nn.modules.batchnorm._BatchNorm) and dg.is_out_channel_pruning_fn(fn)
            if not (_is_out_fn(fn) or is_bn):
                continue
            idx = torch.as_tensor(item.idxs, dtype=torch.long)
            root_idx = torch.as_tensor(item.root_idxs, dtype=torch.long)
            for p in (layer.weight, getattr(layer, "bias", None)):
                if isinstance(p, nn.Parameter):
                    slices.append((p, idx, root_idx))
        if slices:
            out.append((slices, n, keep))
    return out


def admm(engine, ratio, target, data, opts):
    """ADMM-regularised training towards channel sparsity, then hard pruning.

    The ratio is fixed first (``ratio``, or the uniform channel ratio whose L2 pruning meets
    ``target_removed``: for local pruning the pruned shape depends on the ratio only). Then
    the model is trained for ``epochs`` passes over ``data`` on
    loss_fn(model(x), y) + rho/2 sum ||W - Z + U||^2, where W are the filters (conv/linear
    output rows and BN affine entries) of each channel group coupled by the dependency
    graph, Z is W + U projected onto "only the n_keep channels of largest group norm are
    non-zero", and the dual U += W - Z; Z and U are updated every ``admm_every`` steps
    (default: once per epoch). Finally the channels with the smallest group L2 norm (the
    ones ADMM drove to zero) are removed. Options: loss_fn=cross_entropy, lr=0.01,
    momentum=0.9, weight_decay=5e-4, epochs=2, rho=1e-2, admm_every=None.
    Measured cost (2 epochs over 4 batches of 8x3x16x16, 1 CPU thread, TinyResNet /
    TinyMobileNetV2): ratio=0.5: 121 / 154 ms; target search: 150 / 226 ms. Real use needs
    many epochs: the cost is that of training with one extra elementwise term.
    """
    from lopfast.prune.api import _check_options, _pos_int, _unpack

    o = _check_options("admm", opts, {"loss_fn": F.cross_entropy, "lr": 0.01, "momentum": 0.9,
                                      "weight_decay": 5e-4, "epochs": 2, "rho": 1e-2, "admm_every": None})
    if engine.global_pruning:
        raise ValueError("method='admm' prunes every layer at the searched ratio; global_pruning must be False")
    epochs = _pos_int(o["epochs"], "epochs")
    for key in ("lr", "rho"):
        if not isinstance(o[key], (int, float)) or isinstance(o[key], bool) or o[key] <= 0:
            raise ValueError(f"{key} must be a positive number, got {o[key]!r}")
    imp = magnitude_importance(2)
    if target is not None:
        _, _, ratio = engine.search(lambda r: engine.prune(imp, r), target)
    caps = engine.caps(engine.base)
    per_layer = ratio if isinstance(ratio, dict) else {n: float(ratio) for n in engine.prunable}

    def ratio_of(name):
        return min(per_layer.get(name, 0.0), caps.get(name, 0.0))

    model = copy.deepcopy(engine.base)
    groups = _channel_groups(model, engine.example_inputs, engine.ignored, ratio_of)
    params = {id(p): p for slices, _, _ in groups for p, _, _ in slices}
    Z = {k: p.detach().clone() for k, p in params.items()}
    U = {k: torch.zeros_like(p) for k, p in params.items()}

    @torch.no_grad()
    def update_z_u(first: bool):
        # projection of W + U onto the channel-sparse set, group by group
        for slices, n, keep in groups:
            norm2 = torch.zeros(n, dtype=torch.float64)
            for p, idx, ridx in slices:
                v = (p + U[id(p)])[idx].reshape(len(idx), -1)
                norm2.index_add_(0, ridx, v.double().pow(2).sum(1).cpu())
            dropped = torch.argsort(norm2)[: n - keep]
            drop_mask = torch.zeros(n, dtype=torch.bool)
            drop_mask[dropped] = True
            for p, idx, ridx in slices:
                z = p + U[id(p)]
                z[idx[drop_mask[ridx]].to(z.device)] = 0
                Z[id(p)] = z
        if not first:
            for k, p in params.items():
                U[k] += p.detach() - Z[k]

    opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    was_training = model.training
    model.train()
    update_z_u(first=True)
    rho, step, history = float(o["rho"]), 0, []
    every = o["admm_every"]
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in data:
            x, y = _unpack(batch)
            loss = o["loss_fn"](model(x), y)
            reg = sum(((p - Z[k] + U[k]) ** 2).sum() for k, p in params.items())
            opt.zero_grad(set_to_none=True)
            (loss + 0.5 * rho * reg).backward()
            opt.step()
            total, count, step = total + loss.item(), count + 1, step + 1
            if every is not None and step % _pos_int(every, "admm_every") == 0:
                update_z_u(first=False)
        if count == 0:
            raise ValueError("data yielded no batches; admm needs training data")
        if every is None:
            update_z_u(first=False)
        history.append(total / count)
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    residual = float(sum(((params[k].detach() - Z[k]) ** 2).sum() for k in params)) ** 0.5
    pruned, rec = engine.prune(imp, ratio, source=model)
    return pruned, rec, ratio, {"train_loss": history, "primal_residual": residual}
