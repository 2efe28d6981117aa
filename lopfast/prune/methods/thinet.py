"""Least-squares reconstruction of pruned layers (AMC's ``prune_kernel``; ThiNet's per-channel
rescaling is done inside :class:`~lopfast.prune.criteria.ThiNetCriterion`)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from lopfast.prune.criteria import _columns, _locations, _thinet_eligible


@torch.no_grad()
def layer_features(original: nn.Module, xs: List[torch.Tensor], *, positions: int = 10, seed: int = 0
                   ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """AMC's ``_extract_layer_information``: for every conv (groups=1) / linear layer of the
    original network, ``positions`` random output locations per image of ``xs``: the input
    patches X (N, C_in * k) and the pre-bias outputs Y (N, C_out), float32 on the CPU.
    One forward pass per batch; the samples are reused by every reconstruction."""
    gen = torch.Generator().manual_seed(seed)
    feats: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    names = {m: n for n, m in original.named_modules() if _thinet_eligible(m)}

    def hook(module, inputs):
        x = inputs[0].detach()
        b = x.shape[0]
        img = torch.arange(b).repeat_interleave(positions)
        loc = torch.randint(_locations(module, x), (b * positions,), generator=gen)
        cols = _columns(module, x, img.to(x.device), loc.to(x.device))
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        feats.setdefault(names[module], []).append((cols.float().cpu(), (cols @ w.T).float().cpu()))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    was_training = original.training
    original.eval()
    try:
        for x in xs:
            original(x)
    finally:
        for h in handles:
            h.remove()
        original.train(was_training)
    return {n: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for n, v in feats.items()}


@torch.no_grad()
def reconstruct(original: nn.Module, pruned: nn.Module, record: Dict[Tuple[str, str], List[int]],
                features: Dict[str, Tuple[torch.Tensor, torch.Tensor]], *, ridge: float = 1e-3) -> List[str]:
    """Least-squares reconstruction of every layer whose input channels were cut (AMC's
    ``prune_kernel``): with X the original layer's sampled input patches restricted to the
    kept input channels and Y its sampled outputs at the kept output channels
    (:func:`layer_features`, taken once on the original network, as the official code
    does), the new weight solves min ||Y - X W^T||^2 + ridge * mean(diag X^T X) * ||W - W_kept||^2
    (the ridge keeps ill-determined directions at the magnitude-pruned weights). Layers
    without a record of their cut input channels, and conv layers with groups > 1, are left
    alone. Returns the reconstructed layer names.
    """
    orig = dict(original.named_modules())
    done = []
    for name, pm in pruned.named_modules():
        om = orig.get(name)
        if not (_thinet_eligible(pm) and type(om) is type(pm)) or name not in features:
            continue
        if pm.weight.shape[1] == om.weight.shape[1] or (name, "in") not in record:
            continue
        n_in, n_out = om.weight.shape[1], om.weight.shape[0]
        gone_in = set(record[(name, "in")])
        kept_in = torch.tensor([c for c in range(n_in) if c not in gone_in], dtype=torch.long)
        gone_out = set(record.get((name, "out"), []))
        kept_out = torch.tensor([o for o in range(n_out) if o not in gone_out], dtype=torch.long)
        if len(kept_in) != pm.weight.shape[1] or len(kept_out) != pm.weight.shape[0]:
            continue
        X, Y = features[name]
        k = X.shape[1] // n_in
        cols = (kept_in[:, None] * k + torch.arange(k)[None, :]).reshape(-1)
        X, Y = X[:, cols].double(), Y[:, kept_out].double()
        w0 = pm.weight.detach().reshape(pm.weight.shape[0], -1).double().cpu()
        gram = X.T @ X
        lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), X.T @ Y + lam * w0.T).T
        pm.weight.copy_(w.reshape(pm.weight.shape).to(pm.weight.dtype).to(pm.weight.device))
        done.append(name)
    return done
