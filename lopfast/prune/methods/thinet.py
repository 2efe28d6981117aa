"""Layer-by-layer least-squares reconstruction of pruned layers (AMC's ``prune_kernel``; the
per-channel rescaling variant is ThiNet's, done inside :class:`~lopfast.prune.criteria.ThiNetCriterion`)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _inputs_of(model: nn.Module, name: str, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    module = model.get_submodule(name)
    got: List[torch.Tensor] = []
    h = module.register_forward_pre_hook(lambda m, inp: got.append(inp[0].detach()))
    try:
        for x in xs:
            model(x)
    finally:
        h.remove()
    return got


def _columns(module: nn.Module, x: torch.Tensor, img: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """(N, C_in * k) input patches of ``module`` at sampled (image, location) pairs."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])[img, loc]
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols[img, :, loc]


def _locations(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).shape[1]
    size = 1
    for i in range(2):
        k, s, p, d = module.kernel_size[i], module.stride[i], module.padding[i], module.dilation[i]
        size *= (x.shape[2 + i] + 2 * p - d * (k - 1) - 1) // s + 1
    return size


def _eligible(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                        and not isinstance(m.padding, str))


@torch.no_grad()
def reconstruct(original: nn.Module, pruned: nn.Module, record: Dict[Tuple[str, str], List[int]],
                xs: List[torch.Tensor], *, positions: int = 10, seed: int = 0, ridge: float = 1e-3) -> List[str]:
    """Least-squares reconstruction of every layer whose input channels were cut (AMC).

    Layer by layer in module order (later layers see the already reconstructed earlier
    ones), as the official AMC ``prune_kernel``: at ``positions`` random output locations per
    image of ``xs``, X are the pruned layer's input patches on the pruned network and Y the
    original layer's pre-bias outputs (its kept output channels) on the original network;
    the new weight solves min ||Y - X W^T||^2 + ridge * mean(diag X^T X) * ||W - W_kept||^2
    (the ridge keeps ill-determined directions at the magnitude-pruned weights). Conv layers
    with groups > 1 are left alone. Returns the reconstructed layer names.
    """
    flags = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    orig = dict(original.named_modules())
    done = []
    try:
        for name, pm in pruned.named_modules():
            om = orig.get(name)
            if not (_eligible(pm) and type(om) is type(pm)):
                continue
            if pm.weight.shape[1] == om.weight.shape[1]:
                continue  # input channels untouched
            n_out = om.weight.shape[0]
            removed_out = set(record.get((name, "out"), []))
            kept_out = torch.tensor([o for o in range(n_out) if o not in removed_out], dtype=torch.long)
            if len(kept_out) != pm.weight.shape[0]:
                continue
            gen = torch.Generator().manual_seed(seed)
            Xs, Ys = [], []
            for xo, xp in zip(_inputs_of(original, name, xs), _inputs_of(pruned, name, xs)):
                b = xo.shape[0]
                img = torch.arange(b).repeat_interleave(positions)
                loc = torch.randint(_locations(om, xo), (b * positions,), generator=gen)
                co = _columns(om, xo, img.to(xo.device), loc.to(xo.device)).double()
                Ys.append((co @ om.weight.detach().reshape(n_out, -1)[kept_out.to(co.device)].double().T).cpu())
                Xs.append(_columns(pm, xp, img.to(xp.device), loc.to(xp.device)).double().cpu())
            X, Y = torch.cat(Xs), torch.cat(Ys)
            w0 = pm.weight.detach().reshape(pm.weight.shape[0], -1).double().cpu()
            gram = X.T @ X
            lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)
            w = torch.linalg.solve(gram + lam * eye, X.T @ Y + lam * w0.T).T
            pm.weight.copy_(w.reshape(pm.weight.shape).to(pm.weight.dtype))
            done.append(name)
    finally:
        original.train(flags[0])
        pruned.train(flags[1])
    return done
