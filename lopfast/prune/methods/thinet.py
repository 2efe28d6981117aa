"""ThiNet's second step: least-squares rescaling of the next layer's kept weights."""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

from lopfast.prune.importance import _batches, _consumers, channel_contributions


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


def _out_hw(conv: nn.Conv2d, x: torch.Tensor) -> int:
    size = 1
    for i in range(2):
        k, s, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]
        size *= (x.shape[2 + i] + 2 * p - d * (k - 1) - 1) // s + 1
    return size


@torch.no_grad()
def rescale_consumers(original: nn.Module, pruned: nn.Module, record: Dict[Tuple[str, str], List[int]],
                      data: Iterable, *, batches: int = 2, samples: int = 256, seed: int = 0,
                      ridge: float = 1e-3) -> List[str]:
    """Rescale the kept input channels of every pruned conv (groups=1) / linear layer.

    For each such layer, in module order (so later layers see the already rescaled earlier
    ones), one scale s_c per kept input channel minimises
    ||y - sum_c s_c z_c||^2 + ridge * mean(diag) * ||s - 1||^2 over sampled outputs, where
    y is the original layer's pre-bias output on the original model's activations and z_c
    the pruned layer's per-channel contributions on the pruned model's activations (ThiNet
    Eq. 6; the ridge pulls ill-determined scales back to 1). Returns the rescaled names.
    """
    xs = [x for x, _ in _batches(data, batches)]
    if not xs:
        raise ValueError("data yielded no batches; thinet rescaling needs inputs")
    flags = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    orig_modules = dict(original.named_modules())
    done = []
    try:
        for name in _consumers(pruned):
            if (name, "in") not in record or name not in orig_modules:
                continue
            om, pm = orig_modules[name], pruned.get_submodule(name)
            n_out = om.out_features if isinstance(om, nn.Linear) else om.out_channels
            removed_out = set(record.get((name, "out"), []))
            kept_out = torch.tensor([o for o in range(n_out) if o not in removed_out], dtype=torch.long)
            gen = torch.Generator().manual_seed(seed)
            ys, zs = [], []
            for xo, xp in zip(_inputs_of(original, name, xs), _inputs_of(pruned, name, xs)):
                if isinstance(om, nn.Linear):
                    total = xo.reshape(-1, xo.shape[-1]).shape[0]
                else:
                    total = xo.shape[0] * _out_hw(om, xo)
                pos = torch.randperm(total, generator=gen)[:samples].to(xo.device)
                ys.append(channel_contributions(om, xo, pos, kept_out.to(xo.device)).sum(0).double().cpu())
                zs.append(channel_contributions(pm, xp, pos).double().cpu())
            y, z = torch.cat(ys), torch.cat(zs, dim=1)
            gram = z @ z.T
            lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)
            s = torch.linalg.solve(gram + lam * eye, z @ y + lam * torch.ones(gram.shape[0], dtype=gram.dtype))
            w = pm.weight
            shape = (1, -1) + (1,) * (w.dim() - 2)
            w.mul_(s.to(w.dtype).to(w.device).reshape(shape))
            done.append(name)
    finally:
        original.train(flags[0])
        pruned.train(flags[1])
    return done
