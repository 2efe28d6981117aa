"""Attention blocks for torch-pruning: what its dependency graph cannot infer.

* Multi-head attention with a fused ``qkv`` projection (timm's ``Attention``, torchvision's
  Swin ``ShiftedWindowAttention``): the projection's outputs are ``3 x num_heads x head_dim``
  and the block reshapes them with its ``num_heads`` / ``head_dim`` attributes. torch-pruning
  keeps heads consistent only when it is told the head count (``num_heads={qkv: heads}``), and
  never updates the attributes, so after pruning the reshape fails ("shape '[1, 197, 3, 3, 64]'
  is invalid"). :func:`attention_kwargs` tells it; whole heads are removed
  (``prune_num_heads``), head dims are kept (the softmax scale stays right), and
  :func:`sync_attention` writes the new head count back into the blocks.

(Channel shuffles, ShuffleNetV2: :mod:`lopfast.prune.shuffle`.)
"""
from __future__ import annotations

import functools
import math
from typing import Dict, Iterator, List, Tuple

import torch.nn as nn


def attention_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the blocks with a fused ``qkv`` ``nn.Linear`` and an int ``num_heads``."""
    out = []
    for name, m in model.named_modules():
        qkv = getattr(m, "qkv", None)
        heads = getattr(m, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 \
                and qkv.out_features % (3 * heads) == 0:
            out.append((name, m))
    return out


def attention_kwargs(model: nn.Module, head_ratio: float) -> Dict:
    """torch-pruning pruner keywords for the attention blocks of ``model`` ({} if it has none).

    ``head_ratio``: fraction of the heads removed from every block (at least one head stays).
    """
    kwargs: Dict = {}
    mha = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if mha:
        # torch-pruning prunes nn.MultiheadAttention's embed_dim itself but needs it to stay a multiple
        # of the head count (else "embed_dim must divide evenly by num_heads" after pruning)
        kwargs["round_to"] = functools.reduce(lambda a, b: a * b // math.gcd(a, b), mha)
    blocks = attention_blocks(model)
    if not blocks:
        return kwargs
    heads = {m.qkv: m.num_heads for _, m in blocks}
    fewest = min(heads.values())
    # torch-pruning rounds the number of removed heads up: keep one head in the smallest block
    ratio = max(0.0, min(float(head_ratio), (fewest - 1) / fewest - 1e-6)) if fewest > 1 else 0.0
    return dict(kwargs, num_heads=heads, prune_num_heads=ratio > 0, prune_head_dims=False, head_pruning_ratio=ratio)


def sync_attention(model: nn.Module, pruner) -> None:
    """Write the pruned head counts of ``pruner`` back into the attention blocks of ``model``."""
    counts = getattr(pruner, "num_heads", None) or {}
    for _, m in _blocks_of(model, counts):
        heads = counts[m.qkv]
        head_dim = m.qkv.out_features // (3 * heads)
        m.num_heads = heads
        if hasattr(m, "head_dim"):
            m.head_dim = head_dim
        if hasattr(m, "attn_dim"):  # timm >= 1.0.10 reshapes the heads' output with it
            m.attn_dim = heads * head_dim


def sync_widths(model: nn.Module) -> None:
    """Write pruned widths back into the attributes that forwards read instead of tensor shapes.

    torchvision's VisionTransformer reshapes the patch embedding with ``hidden_dim``, which
    torch-pruning does not update when it prunes ``conv_proj``.
    """
    for m in model.modules():
        proj = getattr(m, "conv_proj", None)
        if isinstance(proj, nn.Conv2d) and isinstance(getattr(m, "hidden_dim", None), int):
            m.hidden_dim = proj.out_channels


def _blocks_of(model: nn.Module, counts) -> Iterator[Tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, nn.Linear) and qkv in counts and hasattr(m, "num_heads"):
            yield name, m
