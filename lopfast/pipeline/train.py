"""Training of every stage: the step engine (``lopfast.pipeline.step``) plus a short epoch loop.

One function, :func:`train`, serves every stage (pretraining, fine-tuning, training from
scratch, distillation). The step itself (teacher and student forward, loss, backward, SGD with
the lr read on the device, captured as one CUDA graph on a GPU) is ``TrainStep`` in
``lopfast/pipeline/step.py``; this file holds the configuration, the loop over epochs,
evaluation, checkpoints and the divergence check. Choices and why:

* SGD with momentum and weight decay (Nesterov optional), lr schedules as a table of per-step
  factors (``lopfast.pipeline.schedule``; the paper's multi-step schedules, see
  :data:`PRESETS`; ``--epochs`` rescales the milestones proportionally).
* On CUDA: channels_last by default; ``amp="auto"`` times bf16 autocast against fp32 for the
  model at hand once and keeps the faster (``TrainStep.choose_amp``); the loss and the SP Gram
  matrices are computed in float32.
* Losses are accumulated on the device and read once per epoch, with the finiteness of every
  weight: a NaN or infinite loss or weight stops the stage with an error naming it and the
  epoch, before that epoch's checkpoint is written, so the last good checkpoint survives.
* Checkpoint after every epoch, written to a temp file then ``os.replace``d so a crash never
  leaves a torn file. It holds model, optimizer (momentum buffers), the step counter, the amp
  choice, epoch, history and the RNG states; the data order of an epoch is seeded by (seed,
  epoch) in the loaders, so a resumed run replays exactly the batches an uninterrupted one
  would, and gives a bit-identical result.
* Data parallel with ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU, started by
  torchrun), so gradient all-reduces overlap the backward: every rank draws the same global
  batch and keeps its slice; per-rank losses are scaled by ``world * local / global`` batch
  size, so DDP's gradient average equals the single-process gradient for per-sample losses.
  The SP distiller hooks the layers of the wrapped module and calls the DDP wrapper. The
  teacher runs in inference mode on every rank. BatchNorm buffers are broadcast from rank 0
  before evaluation and checkpointing (not at every forward); metrics are all-reduced; only
  rank 0 writes. A DDP step runs eagerly (``lopfast.pipeline.step``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lopfast import dispatch
from lopfast.checks import TrainingDiverged
from lopfast.distill import SPDistiller
from lopfast.fastpath import CollapsedForward
from lopfast.layers import ExpandedConv2d
from lopfast.pipeline import step as _step
from lopfast.pipeline.schedule import check_schedule, lr_factors
from lopfast.pipeline.step import CAPTURE, TrainStep, autocast

__all__ = ["PRESETS", "TrainConfig", "evaluate", "onednn_conv_guard", "preset", "train"]

# Paper Sec. 3.2.1: fine-tuning 150 epochs lr 0.01 x0.1 at 60/100/120; retraining from
# scratch 280 epochs lr 0.1 x0.1 at 100/160/210/250; batch 256 (Sec. 3.1).
PRESETS: Dict[str, dict] = {
    "finetune": {"epochs": 150, "lr": 0.01, "milestones": (60, 100, 120)},
    "scratch": {"epochs": 280, "lr": 0.1, "milestones": (100, 160, 210, 250)},
}


@dataclass
class TrainConfig:
    """Hyper-parameters of one training stage."""

    epochs: int
    lr: float
    milestones: Tuple[int, ...] = ()
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad: Optional[float] = None  # max grad norm; None = off (the paper does not clip)
    amp: str = "auto"  # "auto" (CUDA: bf16 or fp32, whichever measures faster; off elsewhere), "bf16", "off"
    channels_last: Optional[bool] = None  # None = on for CUDA
    compile: bool = False
    seed: int = 0
    gamma: float = 0.0
    sp_reduction: str = "mean"  # SP loss over layer pairs: "mean" (gamma per pair) or "sum" (Eq. 11 literally)
    factor_weight_decay: Optional[float] = None  # weight decay of expanded factors (weight1..); None: weight_decay
    factor_lr_scale: float = 1.0  # LR multiplier of expanded factors
    schedule: str = "multistep"  # lr schedule kind (lopfast.pipeline.schedule)
    warmup_epochs: float = 0.0  # linear lr warm-up at the start (lopfast.pipeline.schedule)
    label_smoothing: float = 0.0  # of the cross-entropy (0: none)
    nesterov: bool = False  # Nesterov momentum
    capture: str = "auto"  # the step as one CUDA graph: "auto" (by hand, where it can), "compile", "off"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if self.capture not in CAPTURE:
            raise ValueError(f"capture must be one of {', '.join(map(repr, CAPTURE))}, got {self.capture!r}")
        if self.clip_grad is not None and not (self.clip_grad > 0 and math.isfinite(self.clip_grad)):
            raise ValueError(f"clip_grad must be positive or None, got {self.clip_grad!r}")
        if not (isinstance(self.gamma, (int, float)) and self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma (SP loss weight) must be a finite number >= 0, got {self.gamma!r}")
        for name in ("momentum", "weight_decay"):  # NaN would pass a plain `< 0` test
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.lr_decay, (int, float)) and self.lr_decay > 0 and math.isfinite(self.lr_decay)):
            raise ValueError(f"lr_decay must be a positive number, got {self.lr_decay!r}")
        if self.sp_reduction not in ("mean", "sum"):
            raise ValueError(f"sp_reduction must be 'mean' or 'sum', got {self.sp_reduction!r}")
        if self.factor_weight_decay is not None and not self.factor_weight_decay >= 0:
            raise ValueError(f"factor_weight_decay must be >= 0 or None, got {self.factor_weight_decay!r}")
        if not (self.factor_lr_scale > 0 and math.isfinite(self.factor_lr_scale)):
            raise ValueError(f"factor_lr_scale must be a positive number, got {self.factor_lr_scale!r}")
        check_schedule(self.schedule, self.warmup_epochs, self.epochs)
        if (isinstance(self.label_smoothing, bool) or not isinstance(self.label_smoothing, (int, float))
                or not 0 <= self.label_smoothing < 1):
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and not self.momentum > 0:
            raise ValueError(f"nesterov needs momentum > 0, got momentum {self.momentum!r}")
        self.milestones = tuple(int(m) for m in self.milestones)
        lr_factors(self, 1)  # the schedule module checks its own settings (schedule kind ...) now, not mid-run


def preset(kind: str, epochs: Optional[int] = None, lr: Optional[float] = None) -> Tuple[int, float, Tuple[int, ...]]:
    """(epochs, lr, milestones) of a paper preset, milestones rescaled to ``epochs``."""
    if kind not in PRESETS:
        raise ValueError(f"unknown preset {kind!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[kind]
    n = p["epochs"] if epochs is None else epochs
    ms = tuple(sorted({max(1, round(m * n / p["epochs"])) for m in p["milestones"]} - {n}))
    ms = tuple(m for m in ms if m < n)
    return n, (p["lr"] if lr is None else lr), ms


# --------------------------------------------------------------------------- distributed helpers
def dist_info() -> Tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- oneDNN workaround
# Heap corruption in oneDNN's AVX2 convolution backward ("double free or corruption",
# "corrupted size vs. prev_size", exit 134/139) for a 1x1 conv with stride > 1 on a
# channels_last (NHWC) CPU input whose channel count is not a multiple of 8. Minimal repro
# (torch 2.14.1+cu130, oneDNN v3.12.0; also torch 2.13.0; any CPU whose best ISA is AVX2, or
# ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 one; brgconv_strided:avx2 backward_data /
# jit_1x1:avx2 backward_weights in ONEDNN_VERBOSE=1):
#
#     conv = nn.Conv2d(5, 10, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
#     for _ in range(10):
#         x = torch.randn(2, 5, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
#         conv(x).sum().backward()          # MALLOC_CHECK_=3 aborts within a few steps
#
# Batch 1, stride 1, 3x3 kernels and NCHW inputs+weights ran clean in a sweep of channel counts
# 1-20; 2-6 input channels crashed (7-20 did not, but heap corruption is not always detected,
# so every channel count is treated as affected). Pruned digitsnet hits it: its 1-channel stem
# weight also counts as channels_last, so oneDNN runs the whole net NHWC, and at 97 % removed
# the downsampling shortcut keeps 5 channels. Making the input NCHW is not enough (a
# channels_last weight brings the NHWC path back). Workaround, narrow and exact: such a conv
# runs as pad -> subsample -> stride-1 1x1 conv (the same numbers: a 1x1 kernel reads one pixel
# per output), only on CPU while training; every other conv keeps oneDNN's fast paths.
# tests/test_pipeline.py::test_onednn_strided_1x1_repro runs the repro in a subprocess.
def _onednn_affected(m: nn.Module) -> bool:
    # an ExpandedConv2d is a Conv2d whose collapsed kernel has the compact shape: same test
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) != (1, 1)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _strided_1x1_as_subsample(m: nn.Conv2d):
    conv_forward = m._conv_forward  # the class's bound method

    def forward(input: torch.Tensor, weight: torch.Tensor, bias):
        if input.device.type != "cpu" or not torch.backends.mkldnn.enabled:
            return conv_forward(input, weight, bias)
        ph, pw = m.padding
        if ph or pw:
            input = F.pad(input, (pw, pw, ph, ph))
        sh, sw = m.stride
        return F.conv2d(input[:, :, ::sh, ::sw], weight, bias, 1, 0, 1, m.groups)

    return forward


@contextlib.contextmanager
def onednn_conv_guard(model: nn.Module):
    """While active, the strided 1x1 convs of ``model`` avoid the oneDNN AVX2 bug above on CPU.

    Yields the number of convs rerouted; they compute the same outputs and gradients.
    """
    affected = [m for m in model.modules() if _onednn_affected(m) and "_conv_forward" not in vars(m)]
    for m in affected:
        m._conv_forward = _strided_1x1_as_subsample(m)
    try:
        yield len(affected)
    finally:
        for m in affected:
            vars(m).pop("_conv_forward", None)


# --------------------------------------------------------------------------- misc helpers
def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to ``path + '.tmp'`` then ``os.replace``: readers never see a torn file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`train` (tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "auto", forward=None) -> Dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``loader`` (all ranks reduced)."""
    was_training = model.training
    model.eval()
    fwd = forward or model
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for x, y, _ in loader.epoch(0):
        with autocast(device, amp):
            logits = fwd(x)
        logits = logits.float()
        stats[0] += (logits.argmax(1) == y).sum()
        stats[1] += F.cross_entropy(logits, y, reduction="sum")
        stats[2] += len(y)
    if dist_info()[1] > 1:
        dist.all_reduce(stats)
    model.train(was_training)
    n = max(float(stats[2]), 1.0)
    return {"acc": 100.0 * float(stats[0]) / n, "loss": float(stats[1]) / n}


def _param_groups(model: nn.Module, cfg: TrainConfig) -> List[dict]:
    """One SGD group for the expanded factors (``weight1``, ``weight2`` ... of expanded layers), one for the rest.

    The factors' product is the compact weight, so weight decay on the factors regularises it
    differently from weight decay on the compact weight; both knobs default to the plain setting.
    """
    factors, rest = [], []
    for mod in model.modules():
        expanded = hasattr(mod, "contract") or type(mod).__name__.startswith("Expanded")
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (factors if expanded and name.startswith("weight") and name != "weight" else rest).append(p)
    groups = [{"params": rest}]
    if factors:
        wd = cfg.weight_decay if cfg.factor_weight_decay is None else cfg.factor_weight_decay
        groups.append({"params": factors, "weight_decay": wd, "lr": cfg.lr * cfg.factor_lr_scale})
    return groups


def _check_diverged(what: Optional[str], desc: str, epoch: int, cfg: TrainConfig, checkpoint: Optional[str]) -> None:
    if what is None:
        return
    good = checkpoint if checkpoint and os.path.exists(checkpoint) else None
    kept = (f"the last good checkpoint, {good} (epoch {epoch}), is kept" if good
            else "no checkpoint was written (it diverged in its first epoch)")
    gamma = f", SP weight gamma {cfg.gamma:g}" if cfg.gamma else ""
    raise TrainingDiverged(
        f"[{desc}] training diverged in epoch {epoch + 1}/{cfg.epochs}: {what} is NaN or infinite "
        f"(lr {cfg.lr:g}{gamma}); {kept}. To continue: lower --lr or --gamma (--pretrain-lr / --scratch-lr "
        f"in those stages), or set --clip-grad",
        stage=desc, epoch=epoch + 1, checkpoint=good)


def train(
    model: nn.Module,
    data,
    cfg: TrainConfig,
    *,
    device="cpu",
    teacher: Optional[nn.Module] = None,
    sp_layers: Optional[Sequence[str]] = None,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    desc: str = "train",
    log: Optional[Callable[[str], None]] = None,
    on_epoch_end: Optional[Callable[[int, dict], None]] = None,
    progress: Optional[bool] = None,
) -> dict:
    """Train ``model`` in place on ``data`` (a :class:`~lopfast.pipeline.data.DataBundle`).

    Args:
        model: the network to train (moved to ``device``).
        data: bundle with ``train`` / ``test`` loaders.
        cfg: :class:`TrainConfig`.
        device: training device.
        teacher: if given, similarity-preserving distillation from it
            (``lopfast.SPDistiller``), loss = CE + ``cfg.gamma`` * SP.
        sp_layers: module names paired between teacher and student (None: every expanded
            layer of the student).
        checkpoint: path of the per-epoch checkpoint (rank 0 writes it).
        resume: continue from ``checkpoint`` if it exists.
        desc: label for logs, progress bars and errors (the stage's name).
        log: callable receiving one line per epoch (and the step's capture and amp notices).
        on_epoch_end: ``f(epoch, record)`` after each epoch's checkpoint (tests use it to
            simulate an interruption).
        progress: tqdm bars (default: only when stderr is a terminal, rank 0).

    Returns ``{"history": [...], "final": {"acc", "loss"}, "epochs": n, "seconds": t}``.
    Raises ``RuntimeError`` when the loss or a weight becomes NaN or infinite (checked once per
    epoch, before that epoch's checkpoint is written).
    """
    device = torch.device(device)
    rank, world = dist_info()
    log = log or (lambda s: None)
    if progress is None:
        progress = rank == 0 and sys.stderr.isatty()
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    history: List[dict] = []
    start = step0 = 0
    amp = None
    if resume and checkpoint and os.path.exists(checkpoint):
        ck = load_checkpoint(checkpoint, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"], device)
        history = list(ck.get("history", []))
        start = int(ck["epoch"]) + 1
        step0 = int(ck.get("step", start * len(data.train)))
        amp = ck.get("amp")  # the precision the run chose at its start: a resumed run keeps it
        log(f"[{desc}] resumed from {checkpoint} at epoch {start}/{cfg.epochs}")
    else:
        torch.manual_seed(cfg.seed)
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters and buffers once here (identical start); BN
        # buffers are then synchronised per epoch, not at every forward
        forward = DistributedDataParallel(
            model, device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda" else None, broadcast_buffers=False,
        )

    distiller = None
    if teacher is not None:
        teacher.to(device).eval()
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        # given the DDP wrapper, the distiller hooks the inner module and calls the wrapper
        distiller = SPDistiller(teacher, forward, layers=list(sp_layers) if sp_layers is not None else None,
                                reduction=cfg.sp_reduction)
    fast = None
    if (device.type == "cuda" or _step.EMULATE) and any(isinstance(m, ExpandedConv2d) for m in model.modules()):
        # one grouped collapse of every expanded conv per forward instead of one per layer
        fast = CollapsedForward(model)
    if cfg.compile or cfg.capture == "compile":
        # compile the module in place: the distiller's hooks on inner layers keep working;
        # capture="compile": torch.compile's CUDA graphs around forward and backward
        model.compile(**({"mode": "reduce-overhead"} if cfg.capture == "compile" else {}))
    engine = TrainStep(model, opt, cfg, device, steps_per_epoch=len(data.train), forward=forward,
                       distiller=distiller, world=world, start_step=step0, log=log if rank == 0 else None, desc=desc)
    if amp is not None:
        engine.amp = amp
    t0 = time.time()
    guard = contextlib.ExitStack()
    if device.type == "cpu":
        guard.enter_context(onednn_conv_guard(model))
    try:
        for epoch in range(start, cfg.epochs):
            model.train()
            te = time.time()
            engine.begin_epoch()
            batches = _progress(data.train.epoch(epoch), len(data.train), f"{desc} {epoch + 1}/{cfg.epochs}", progress)
            for x, y, gbs in batches:
                if engine.amp == "auto":
                    engine.choose_amp(x, y, gbs)
                engine(x, y, gbs)
            sums = engine.end_epoch()
            # checked once per epoch (no per-step host sync) and before the checkpoint is
            # written, so the last good checkpoint survives for a --resume with other settings
            _check_diverged(sums["nonfinite"], desc, epoch, cfg, checkpoint)
            # in the step's dispatch timing mode: the collapse reuses the training step's routing
            # (no eager re-measurement, no second program)
            with dispatch.graph_timing(engine.captures):
                ev = evaluate(model, data.test, device, engine.amp)
            if not math.isfinite(ev["loss"]):  # finite weights whose logits overflow
                _check_diverged("the test loss", desc, epoch, cfg, checkpoint)
            rec = {
                "epoch": epoch + 1,
                "train_loss": sums["loss"],
                "sp_loss": sums["sp"] if distiller is not None else None,
                "test_acc": ev["acc"],
                "test_loss": ev["loss"],
                "lr": engine.lr(),
                "seconds": time.time() - te,
            }
            history.append(rec)
            if rank == 0:
                sp_txt = f" sp {rec['sp_loss']:.4f}" if rec["sp_loss"] is not None else ""
                log(f"[{desc}] epoch {epoch + 1}/{cfg.epochs} loss {rec['train_loss']:.4f}{sp_txt} "
                    f"test acc {ev['acc']:.2f}% ({rec['seconds']:.1f}s)")
                if checkpoint:
                    save_atomic(
                        {
                            "epoch": epoch,
                            "step": engine.steps,
                            "amp": engine.amp,
                            "model": model.state_dict(),
                            "optimizer": opt.state_dict(),
                            "rng": _rng_state(device),
                            "history": history,
                            "config": _jsonable(asdict(cfg)),
                        },
                        checkpoint,
                    )
            if world > 1:
                dist.barrier()
            if on_epoch_end is not None:
                on_epoch_end(epoch, rec)
    finally:
        guard.close()
        if distiller is not None:
            distiller.close()
        if fast is not None:
            fast.remove()
    final = history[-1] if history else evaluate(model, data.test, device, engine.amp)
    return {
        "history": history,
        "final": {"acc": final.get("test_acc", final.get("acc")), "loss": final.get("test_loss", final.get("loss"))},
        "epochs": cfg.epochs,
        "seconds": time.time() - t0,
    }


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))
