"""The whole lopfast flow on torchvision and timm models: the zoo CI test and ``lopfast zoo``.

For each model (random weights, small inputs): prune about half the parameters (l1, channel
ratio 0.3) -> expand every conv and linear -> one SP-distilled SGD step -> contract -> save ->
``load(path)`` with no ``model=`` -> identical outputs. :func:`check_model` runs it and
checks every step; :data:`ZOO` lists the models (smallest variant per family), and
:func:`markdown_table` prints the covered-models table of the README.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ZOO", "ZooModel", "check_model", "markdown_table"]


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: the ``build_model`` name, input size, builder kwargs, and why it is heavy/skipped."""

    name: str
    size: int = 32
    kwargs: Dict[str, Any] = field(default_factory=dict)
    heavy: str = ""  # why it does not fit CI's time box (run with LOPFAST_ZOO=all)
    skip: str = ""  # why the flow cannot run (only what torch-pruning itself cannot trace)
    tag: str = ""  # tells two entries of one model apart (e.g. "aux": built with its auxiliary heads)

    @property
    def key(self) -> str:
        """The entry's name in the table and on the command line (``tv:googlenet+aux``)."""
        return self.name + (f"+{self.tag}" if self.tag else "")


_VIT_32 = {"img_size": 32}
ZOO: List[ZooModel] = [
    # torchvision classifiers, smallest variant per family
    ZooModel("tv:resnet18"),
    ZooModel("tv:resnext50_32x4d", heavy="25M params, 32-group convs: ~90 s"),
    ZooModel("tv:wide_resnet50_2", heavy="69M params: ~200 s"),
    ZooModel("tv:vgg11_bn", heavy="129M params, 4096-wide linears expanded: ~8 min"),
    ZooModel("tv:densenet121"),
    ZooModel("tv:googlenet"),
    # torchvision's default build (no weights): auxiliary heads on, pruned through the training forward
    ZooModel("tv:googlenet", kwargs={"aux_logits": True}, tag="aux"),
    ZooModel("tv:inception_v3", size=80),  # needs 75+ px
    ZooModel("tv:inception_v3", size=299, kwargs={"aux_logits": True}, tag="aux",
             heavy="its auxiliary head needs 299 px inputs: ~30 s"),
    ZooModel("tv:mobilenet_v2"),
    ZooModel("tv:mobilenet_v3_small"),
    ZooModel("tv:mnasnet0_5"),
    ZooModel("tv:shufflenet_v2_x0_5"),  # pruned through its channel shuffle: lopfast.prune.shuffle
    ZooModel("tv:squeezenet1_1"),
    ZooModel("tv:efficientnet_b0"),
    ZooModel("tv:efficientnet_v2_s", heavy="21M params, 171 expanded layers: ~75 s"),
    ZooModel("tv:regnet_x_400mf"),
    ZooModel("tv:regnet_y_400mf"),
    ZooModel("tv:convnext_tiny"),
    ZooModel("tv:swin_t", skip="torch-pruning 1.6 cannot trace the shifted-window partition: its reshape index "
                               "mapping grows without bound (MemoryError past 8 GB at 32 px)"),
    ZooModel("tv:vit_b_16", kwargs={"image_size": 32}),
    ZooModel("tv:maxvit_t", size=224, skip="torch-pruning 1.6 cannot trace the block/grid partitions: its reshape "
                                            "index mapping grows without bound (MemoryError past 8 GB at 224 px, "
                                            "the smallest size its 7x7 partitions take)"),
    ZooModel("tv:alexnet", size=64, heavy="61M params, 4096-wide linears expanded: ~85 s"),
    # timm families, smallest variant
    ZooModel("timm:resnet10t"),
    ZooModel("timm:convnext_atto"),
    ZooModel("timm:efficientnet_b0"),
    ZooModel("timm:mobilenetv3_small_050"),
    ZooModel("timm:regnetx_002"),
    ZooModel("timm:ghostnet_050"),
    ZooModel("timm:repvgg_a0"),
    ZooModel("timm:vit_tiny_patch16_224", kwargs=_VIT_32),
    ZooModel("timm:deit_tiny_patch16_224", kwargs=_VIT_32),
]


def _logits(out) -> torch.Tensor:
    """The classification logits of a forward's output (GoogLeNet/Inception return named tuples)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a {type(out).__name__}")


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set the BatchNorm running statistics from ``x`` (and draw zero-initialised linear weights):
    with random weights and fresh statistics the signal of a deep net fades to nothing
    (GoogLeNet's logits are its bias alone), and the exactness checks would compare constants."""
    for m in model.modules():
        # zero-initialised layers (torchvision ViT's head) would make every logit 0 and the checks vacuous
        if isinstance(m, nn.Linear) and not bool(m.weight.any()):
            nn.init.normal_(m.weight, std=0.02)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    model(x)
    model.eval()
    for m, mom in zip(bns, momenta):
        m.momentum = mom
        # a few samples at 1x1 resolution can give a channel almost no variance; dividing by it
        # would turn float rounding into large differences
        m.running_var.clamp_(min=1e-2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_model(entry: ZooModel, *, ratio: float = 0.3, rate: float = 2.0, batch: int = 2, seed: int = 0,
                num_classes: int = 10, workdir: Optional[str] = None, lr: float = 1e-2,
                measure: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run prune -> expand -> one SP step -> contract -> save -> load on ``entry``; check each step.

    Returns a dict (name, params before/after, removed fraction, relative errors of expansion and
    contraction, whether the reloaded model's outputs are bitwise identical, the distillation
    pairs and those left out, seconds). Raises AssertionError when a check fails. ``measure``
    (options of :func:`lopfast.prune.latency.measure_latency`, e.g. ``{"train_batch": 32}``):
    also the latency of the original, pruned and final model (``latency`` in the result; its
    seconds are not in ``seconds``).
    """
    from lopfast.distill import SPDistiller
    from lopfast.io import load, save
    from lopfast.prune import prune
    from lopfast.surgery import contract, expand
    from lopfast.pipeline.models import build_model, count_params

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(entry.kwargs)
    teacher = build_model(entry.name, num_classes=num_classes, **kwargs).eval()
    x = torch.randn(batch, 3, entry.size, entry.size, generator=gen)
    y = torch.arange(batch) % num_classes
    _calibrate_batchnorm(teacher, torch.randn(16, *x.shape[1:], generator=gen))
    pruned, report = prune(teacher, x, method="l1", ratio=ratio)
    pruned.eval()
    student = expand(pruned, rate, linear=True, generator=torch.Generator().manual_seed(seed))
    student.eval()
    with torch.no_grad():
        ref = _logits(pruned(x))
        expand_err = _rel(_logits(student(x)), ref)
    assert expand_err < 1e-4, f"{entry.name}: expanded model differs from the pruned one (rel. {expand_err:.1e})"

    student.train()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=lr)
    with SPDistiller(teacher, student) as distiller:
        out, sp = distiller(x)
        loss = F.cross_entropy(_logits(out), y) + sp
        assert torch.isfinite(loss), f"{entry.name}: non-finite loss {loss.item()}"
        loss.backward()
        # random weights give wild gradients; the step is about the mechanics, not the optimum
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        pairs, dropped = len(distiller.layers), list(distiller.dropped)
    student.eval()
    final = contract(student).eval()
    with torch.no_grad():
        expanded_out = _logits(student(x))
        final_out = _logits(final(x))
    assert torch.isfinite(final_out).all(), f"{entry.name}: the trained model gives non-finite outputs"
    contract_err = _rel(final_out, expanded_out)
    assert contract_err < 1e-3, f"{entry.name}: contracted model differs from the expanded one (rel. {contract_err:.1e})"

    arch_kwargs = {"num_classes": num_classes, **kwargs}
    own_dir = workdir is None
    folder = tempfile.mkdtemp(prefix="lopfast-zoo-") if own_dir else workdir
    path = os.path.join(folder, entry.name.replace(":", "_") + ".pt")
    try:
        save(final, path, arch=entry.name, arch_kwargs=arch_kwargs)
        loaded = load(path).eval()
    finally:
        if own_dir and os.path.exists(path):
            os.remove(path)
            os.rmdir(folder)
    with torch.no_grad():
        loaded_out = _logits(loaded(x))
    identical = bool(torch.equal(loaded_out, final_out))
    assert identical, f"{entry.name}: the reloaded model's outputs differ (max {float((loaded_out - final_out).abs().max()):.1e})"
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in final.state_dict().items()}, f"{entry.name}: reloaded shapes differ"
    seconds = time.perf_counter() - t0
    latency = None
    if measure is not None:
        from lopfast.prune import count_macs
        from lopfast.prune.latency import measure_latency

        models = {"original": teacher, "pruned": pruned, "final": final}
        latency = measure_latency(models, x, macs={k: count_macs(m, x[:1]) for k, m in models.items()}, **measure)
    return {
        "name": entry.key,
        "params_before": count_params(teacher),
        "params_after": count_params(final),
        "removed": report.removed_fraction,
        "expand_rel_err": expand_err,
        "contract_rel_err": contract_err,
        "load_identical": identical,
        "sp_pairs": pairs,
        "sp_dropped": dropped,
        "seconds": seconds,
        "training_forward": _runs_in_training(final, x),
        "latency": latency,
    }


def _runs_in_training(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model``'s training-mode forward runs (auxiliary heads included; BN statistics kept)."""
    from lopfast.prune.tracing import training_forward

    with torch.no_grad(), training_forward(model):
        model(x)
    return True


def markdown_table(results: List[Dict[str, Any]], skipped: Optional[Dict[str, str]] = None) -> str:
    """The covered-models table (README) from :func:`check_model` results and skip reasons; with
    measured latency, the final model's speed-up at batch 1 and the training batch (eager) beside
    its MACs reduction, and the device under the table."""
    lat = [r.get("latency") for r in results if r.get("latency")]
    head = "| model | params | after prune | removed | expand err | contract err | reload | SP pairs | s |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
    if lat:
        b = lat[0]["batches"]
        head += f" speed-up b{b[0]} | speed-up b{b[-1]} | MACs ÷ |"
        rule += " ---: | ---: | ---: |"
    lines = [head, rule]
    for r in results:
        pairs = f"{r['sp_pairs']}" + (f" ({len(r['sp_dropped'])} left out)" if r["sp_dropped"] else "")
        row = (f"| `{r['name']}` | {r['params_before'] / 1e6:.2f}M | {r['params_after'] / 1e6:.2f}M | "
               f"{100 * r['removed']:.0f}% | {r['expand_rel_err']:.0e} | {r['contract_rel_err']:.0e} | "
               f"{'identical' if r['load_identical'] else 'DIFFERS'} | {pairs} | {r['seconds']:.1f} |")
        if lat:
            L = r.get("latency")
            if L:
                sp = L["speedup"]["final"]
                cells = [f"{sp[str(b)]['eager']:.2f}x" if sp.get(str(b), {}).get("eager") else ""
                         for b in (L["batches"][0], L["batches"][-1])]
                red = (L.get("macs_reduction") or {}).get("final")
                row += f" {cells[0]} | {cells[1]} | {f'{red:.2f}' if red else ''} |"
            else:
                row += " | | |"
        lines.append(row)
    for name, why in (skipped or {}).items():
        lines.append(f"| `{name}` | | | | | | skipped: {why} | | |" + (" | | |" if lat else ""))
    if lat:
        lines.append(f"\nspeed-up: the final (contracted) model over the original, median of timed forwards, eager, on "
                     f"{lat[0]['device']} (amp {lat[0]['amp']})")
    return "\n".join(lines)
