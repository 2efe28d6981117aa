"""Pruning torchvision's ShuffleNetV2 through its channel shuffles.

A ShuffleNetV2 block (``InvertedResidual``) ends with ``cat(a, b)`` followed by
``channel_shuffle(groups=2)``, which interleaves the two halves: output channel ``2i`` is
``a_i``, ``2i+1`` is ``b_i``. The next block (stride 1) splits its input in halves with
``chunk(2)``: the first half passes through untouched (``x1``), the second feeds its branch
(``x2``). torch-pruning cannot trace this (its reshape rule divides by an inferred channel count
of 0), and no single-block rule can: keeping a pruned block a ShuffleNetV2 block with the same
function needs

1. **matched pairs at every shuffle**: removing ``a_i`` requires removing ``b_i`` (the halves
   must stay equal and paired index by index), i.e. the same channel index from both
   branches;
2. **balanced halves at every split**: as many removed channels in ``x1`` as in ``x2``, or the
   split point moves and channels change roles.

Across a stage of ``n`` blocks these chain: a pair removed at the first block whose channels
stay in ``x1`` for ``k`` blocks forces ``2^k`` removals at the k-th block after it. Solving the
chain (:func:`plan_stage`) gives one free parameter per stage, ``c``: the stage's branch width
``bf`` loses ``c * 2^(n-1)`` channels, ``c`` pairs from each "depth class" of pair indices
(``2^(n-1-k) c`` from the class consumed after ``k`` blocks). So the stage's width moves in
steps of ``2^(n-1)``: 8 channels for ShuffleNetV2's 4-block stages; its 8-block middle stage
can only be narrowed where ``bf`` has enough factors of 2 (x2.0's 244: one step of 128), else
its width stays (reported in ``extra["shuffle_lanes"]``).

The pruning itself is split in two:

* :func:`unshuffled` traces the blocks without their shuffle, and :func:`lane_roots` names the
  layers whose channels cross a shuffle, which torch-pruning is told to keep. That leaves
  torch-pruning every group that does not cross one, with any criterion: the stem, every
  block's inner branch channels (1x1 conv -> BN -> depthwise -> BN -> 1x1 conv) and the last
  1x1 conv (``conv5``).
* :func:`prune_lanes` is the custom pruner for the shuffle: it removes the stage-width channels
  (the "lanes") that the plan picks, the same pair index from both branches of every shuffle,
  with torch-pruning's own per-layer pruning functions. Pairs are ranked by the summed
  mean-normalised L1 norm of every filter their removal takes out (all the matched ``b``
  channels of the later blocks included); the torch-pruning groups use the call's criterion.
  The stage's share is read from the ratio of its first block's ``branch2.5`` (a lane root).

The result is a torchvision ``ShuffleNetV2`` with narrower layers and the unchanged forward, so
it saves and reloads like any pruned torchvision model.
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lopfast.prune.importance import require_tp


def _classes():
    try:
        from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2
    except Exception:  # torchvision missing or broken: no such blocks
        return None, None
    return InvertedResidual, ShuffleNetV2


def shuffle_blocks(model: nn.Module) -> List[str]:
    """Names of the ShuffleNetV2 blocks (torchvision ``InvertedResidual``) of ``model``."""
    block_cls, _ = _classes()
    if block_cls is None:
        return []
    return [name for name, m in model.named_modules() if isinstance(m, block_cls)]


def supported(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision ShuffleNetV2 (stages ``stage2..4`` then ``conv5``), the
    layout :func:`prune_lanes` knows; other models with such blocks are refused."""
    _, net_cls = _classes()
    return net_cls is not None and isinstance(model, net_cls)


def _stages(model: nn.Module) -> List[Tuple[str, List[Tuple[str, nn.Module]]]]:
    out = []
    for sname in ("stage2", "stage3", "stage4"):
        stage = getattr(model, sname, None)
        if stage is not None:
            out.append((sname, [(f"{sname}.{i}", b) for i, b in enumerate(stage)]))
    return out


def _traced_forward(self, x):
    # InvertedResidual.forward without the final channel_shuffle (what torch-pruning traces)
    if self.stride == 1:
        x1, x2 = x.chunk(2, dim=1)
        return torch.cat((x1, self.branch2(x2)), dim=1)
    return torch.cat((self.branch1(x), self.branch2(x)), dim=1)


@contextlib.contextmanager
def unshuffled(model: nn.Module):
    """The ShuffleNetV2 blocks of ``model`` run without their channel shuffle while inside (an
    instance attribute over the class's forward, removed after)."""
    block_cls, _ = _classes()
    blocks = [m for m in model.modules() if block_cls is not None and isinstance(m, block_cls)]
    for b in blocks:
        b.forward = types.MethodType(_traced_forward, b)
    try:
        yield model
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


def lane_roots(model: nn.Module) -> List[str]:
    """Conv layers whose channels cross a shuffle (torch-pruning must not root a group at them):
    every block's last conv of each branch, and the depthwise conv that reads a previous stage's
    output (its input and output channels are tied)."""
    out = []
    first = True
    for _, blocks in _stages(model):
        for name, b in blocks:
            out.append(f"{name}.branch2.5")
            if len(b.branch1):
                out.append(f"{name}.branch1.2")
                if not first:
                    out.append(f"{name}.branch1.0")
            first = False
    return out


def stage_lane_root(stage_name: str) -> str:
    """The layer whose pruning ratio decides a stage's lane pruning (its first block's ``branch2.5``)."""
    return f"{stage_name}.0.branch2.5"


# ---------------------------------------------------------------------------- the plan
def depth_classes(bf: int, n: int) -> Dict[object, List[int]]:
    """Pair indices of a stage (branch width ``bf``, ``n`` blocks) by how long their channels stay
    in the passed-through half: class ``k`` (1..n-1) is split off into the branch after ``k``
    blocks; ``"deep"`` pairs reach the stage's output. Indices whose channels straddle a split
    point belong to no class (they are never removed)."""
    classes: Dict[object, List[int]] = {k: [] for k in range(1, n)}
    classes["deep"] = []
    for i in range(bf):
        if (2 ** (n - 1)) * (i + 1) <= bf:
            classes["deep"].append(i)
            continue
        for k in range(1, n):
            # after block k the pair's channels occupy [2^k i, 2^k (i + 1)) of that block's output
            in_x1_before = k == 1 or (2 ** (k - 1)) * (i + 1) <= bf
            if in_x1_before and (2 ** k) * i >= bf:
                classes[k].append(i)
                break
    return classes


def _needs(n: int, c: int) -> Dict[object, int]:
    need: Dict[object, int] = {"deep": c}
    for k in range(1, n):
        need[k] = (2 ** (n - 1 - k)) * c
    return need


def plan_stage(bf: int, n: int, target_pairs: int, scores: torch.Tensor, round_to: Optional[int] = None
               ) -> List[int]:
    """The pair indices to remove from a stage: about ``target_pairs`` of ``bf`` (in steps of
    ``2^(n-1)``), the lowest ``scores`` within each depth class; with ``round_to``, only counts
    leaving a multiple of it. Empty when no count fits."""
    classes = depth_classes(bf, n)
    step = 2 ** (n - 1)
    cmax = len(classes["deep"])
    for k in range(1, n):
        cmax = min(cmax, len(classes[k]) // (2 ** (n - 1 - k)))
    cmax = min(cmax, (bf - 1) // step)  # keep a pair
    options = [c for c in range(0, cmax + 1)
               if c == 0 or not round_to or round_to <= 1 or (bf - c * step) % round_to == 0]
    c = min(options, key=lambda c: (abs(c * step - target_pairs), -c))
    if c == 0:
        return []
    removed: List[int] = []
    for cls, need in _needs(n, c).items():
        idx = classes[cls]
        order = sorted(idx, key=lambda i: (float(scores[i]), i))
        removed.extend(order[:need])
    return sorted(removed)


def _simulate(bf: int, n: int, pairs: List[int]) -> List[Tuple[List[int], List[int], List[int]]]:
    """Per block: (branch output indices removed, branch2 input indices removed (stride 1), removed
    positions of the block's output); raises AssertionError when a split is unbalanced."""
    out = []
    removed = sorted({2 * i for i in pairs} | {2 * i + 1 for i in pairs})
    out.append((list(pairs), [], removed))
    for _ in range(1, n):
        s = [p for p in removed if p < bf]
        t = [p - bf for p in removed if p >= bf]
        assert len(s) == len(t), f"unbalanced split: {len(s)} vs {len(t)}"
        removed = sorted({2 * j for j in s} | {2 * j + 1 for j in s})
        out.append((s, t, removed))
    return out


def _l1(w: torch.Tensor) -> torch.Tensor:
    v = w.detach().abs().flatten(1).sum(1).double()
    return v / v.mean().clamp_min(1e-12)


def pair_scores(blocks: List[nn.Module], bf: int) -> torch.Tensor:
    """Cost of removing each pair of a stage: the mean-normalised L1 norms of every filter that
    removing it takes out (both branches of the first block and the matched branch channels of
    the later blocks while its channels pass through)."""
    n = len(blocks)
    scores = torch.zeros(bf, dtype=torch.float64)
    first = blocks[0]
    scores += _l1(first.branch1[2].weight) + _l1(first.branch2[5].weight)
    later = [_l1(b.branch2[5].weight) for b in blocks[1:]]
    for i in range(bf):
        for k in range(1, n):
            # the pair's channels at block k+1's input: positions [2^k i, 2^k (i+1)); those in x1
            # (< bf) force the matched branch channel j of block k+1
            lo, hi = (2 ** k) * i, (2 ** k) * (i + 1)
            js = [j for j in range(lo, min(hi, bf))]
            if not js:
                break
            scores[i] += later[k - 1][js].sum()
    return scores


def prune_lanes(model: nn.Module, ratios: Dict[str, float], round_to: Optional[int] = None
                ) -> Tuple[Dict[Tuple[str, str], List[int]], Dict[str, dict]]:
    """Remove the lane channels of every stage of a torchvision ShuffleNetV2, in place.

    ``ratios``: the fraction of each stage's branch width to remove, read from the stage's
    :func:`stage_lane_root`. Returns the removal record ((layer, "out"/"in") -> original
    indices, as :meth:`lopfast.prune.engine.Engine.prune` records) and, per stage, what was
    asked and done (``bf``, blocks, pairs removed, the step).
    """
    tp = require_tp()
    record: Dict[Tuple[str, str], List[int]] = {}
    info: Dict[str, dict] = {}
    stages = _stages(model)

    def note(name, side, idxs):
        record.setdefault((name, side), []).extend(int(i) for i in idxs)

    for si, (sname, blocks) in enumerate(stages):
        mods = [b for _, b in blocks]
        bf = mods[0].branch2[5].out_channels
        n = len(mods)
        r = float(ratios.get(stage_lane_root(sname), 0.0))
        target = int(round(bf * r))
        pairs = plan_stage(bf, n, target, pair_scores(mods, bf), round_to) if target > 0 else []
        info[sname] = {"bf": bf, "blocks": n, "asked_pairs": target, "removed_pairs": len(pairs),
                       "step": 2 ** (n - 1)}
        if not pairs:
            continue
        plan = _simulate(bf, n, pairs)
        for (bname, b), (out_idx, in_idx, _) in zip(blocks, plan):
            if len(b.branch1):
                tp.prune_conv_out_channels(b.branch1[2], out_idx)
                tp.prune_batchnorm_out_channels(b.branch1[3], out_idx)
                note(f"{bname}.branch1.2", "out", out_idx)
                note(f"{bname}.branch1.3", "out", out_idx)
            tp.prune_conv_out_channels(b.branch2[5], out_idx)
            tp.prune_batchnorm_out_channels(b.branch2[6], out_idx)
            note(f"{bname}.branch2.5", "out", out_idx)
            note(f"{bname}.branch2.6", "out", out_idx)
            if in_idx:
                tp.prune_conv_in_channels(b.branch2[0], in_idx)
                note(f"{bname}.branch2.0", "in", in_idx)
        gone = plan[-1][2]
        if si + 1 < len(stages):
            nname, nb = stages[si + 1][1][0]
            dw = nb.branch1[0]
            tp.prune_depthwise_conv_out_channels(dw, gone)  # in == out == groups for a depthwise conv
            tp.prune_batchnorm_out_channels(nb.branch1[1], gone)
            tp.prune_conv_in_channels(nb.branch1[2], gone)
            tp.prune_conv_in_channels(nb.branch2[0], gone)
            note(f"{nname}.branch1.0", "out", gone)
            note(f"{nname}.branch1.1", "out", gone)
            note(f"{nname}.branch1.2", "in", gone)
            note(f"{nname}.branch2.0", "in", gone)
        else:
            conv5 = model.conv5[0]
            tp.prune_conv_in_channels(conv5, gone)
            note("conv5.0", "in", gone)
    return record, info


__all__ = ["depth_classes", "lane_roots", "pair_scores", "plan_stage", "prune_lanes", "shuffle_blocks",
           "stage_lane_root", "supported", "unshuffled"]
