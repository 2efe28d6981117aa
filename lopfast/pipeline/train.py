"""Training of every stage: the step engine (``lopfast.pipeline.step``) plus a short epoch loop.

One function, :func:`train`, serves every stage (pretraining, fine-tuning, training from
scratch, distillation). The step itself (teacher and student forward, loss, backward, SGD with
the lr read on the device, captured as one CUDA graph on a GPU) is ``TrainStep`` in
``lopfast/pipeline/step.py``; this file declares the training settings (:class:`TrainSettings`,
shared by every stage and by :class:`~lopfast.pipeline.config.RunConfig`; :class:`TrainConfig`,
one stage) and holds the loop over epochs, evaluation and the divergence check. Checkpoints are
read and written by ``lopfast/pipeline/checkpoint.py``; the oneDNN workaround of CPU training is
``lopfast/pipeline/onednn.py``. Choices and why:

* SGD with momentum and weight decay (Nesterov optional), lr schedules as a table of per-step
  factors (``lopfast.pipeline.schedule``; the paper's multi-step schedules, see
  :data:`PRESETS`; ``--epochs`` rescales the milestones proportionally).
* On CUDA: channels_last by default; ``amp="auto"`` times bf16 autocast against fp32 for the
  model at hand once and keeps the faster (``TrainStep.choose_amp``); the loss and the SP Gram
  matrices are computed in float32.
* Losses are accumulated on the device and read once per epoch, with the finiteness of every
  weight: a NaN or infinite loss or weight stops the stage with an error naming it and the
  epoch, before that epoch's checkpoint is written, so the last good checkpoint survives.
* Checkpoint after every epoch (``lopfast.pipeline.checkpoint``, lopfast's one file format:
  written atomically, so a crash never leaves a torn file, and its digest checked on resume). It holds model, optimizer (momentum buffers), the step counter, the amp
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
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lopfast import dispatch
from lopfast.checks import InvalidArgument, InvalidArgumentType, TrainingDiverged, check_bool, check_module
from lopfast.distill import SPDistiller
from lopfast.fastpath import CollapsedForward
from lopfast.files import jsonable
from lopfast.layers import ExpandedConv2d
from lopfast.pipeline import step as _step
from lopfast.pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lopfast.pipeline.data import check_model_matches_data
from lopfast.pipeline.onednn import onednn_conv_guard
from lopfast.pipeline.schedule import SCHEDULES, check_schedule
from lopfast.pipeline.settings import Settings, boolean, choice, custom, integer, number, optional, setting
from lopfast.pipeline.step import CAPTURE, OPTIMIZERS, TrainStep, autocast, build_optimizer

__all__ = ["PRESETS", "TrainConfig", "TrainSettings", "evaluate", "onednn_conv_guard", "preset", "train"]

# Paper Sec. 3.2.1: fine-tuning 150 epochs lr 0.01 x0.1 at 60/100/120; retraining from
# scratch 280 epochs lr 0.1 x0.1 at 100/160/210/250; batch 256 (Sec. 3.1).
PRESETS: Dict[str, dict] = {
    "finetune": {"epochs": 150, "lr": 0.01, "milestones": (60, 100, 120)},
    "scratch": {"epochs": 280, "lr": 0.1, "milestones": (100, 160, 210, 250)},
}


@dataclass(kw_only=True)
class TrainSettings(Settings):
    """The settings every training stage shares, each declared once (``lopfast.pipeline.settings``).

    :class:`TrainConfig` (one stage) and :class:`~lopfast.pipeline.config.RunConfig` (a whole
    run) both extend this class, so a setting declared here is a field of what :func:`train`
    takes, a key of a run's ``config.json`` and a command-line flag, with one check everywhere.
    """

    seed: int = setting(0, check=integer(min=0, max=2**32 - 1), help="random seed", group="run")
    momentum: float = setting(0.9, check=number(min=0, max=1, max_open=True), help="SGD momentum", group="training")
    weight_decay: float = setting(5e-4, check=number(min=0), help="weight decay", group="training")
    nesterov: bool = setting(False, check=boolean(), help="Nesterov momentum", group="training")
    clip_grad: Optional[float] = setting(None, check=optional(number(min=0, min_open=True)), group="training",
                                         help="max gradient norm (the paper does not clip)", default_text="off")
    schedule: str = setting("multistep", check=choice(*SCHEDULES), group="training",
                            help="LR schedule of every stage (lopfast.pipeline.schedule): multistep (the paper's "
                                 "milestones), linear or onecycle")
    warmup_epochs: float = setting(0.0, check=number(min=0), group="training",
                                   help="linear LR warm-up at the start of every stage, in epochs")
    label_smoothing: float = setting(0.0, check=number(min=0, max=1, max_open=True), group="training",
                                     help="label smoothing of the cross-entropy")
    amp: str = setting("auto", check=choice("auto", "bf16", "off"), group="training",
                       help="auto: on CUDA bf16 autocast or fp32, whichever the step measures faster (cached); "
                            "off elsewhere")
    compile: bool = setting(False, check=boolean(), help="torch.compile the trained model", group="training")
    capture: str = setting("auto", check=choice(*CAPTURE), group="training",
                           help="the training step as one CUDA graph: auto (captured by hand where it can be, else "
                                "eager, saying why), compile (torch.compile's CUDA graphs), off (eager)")
    sp_reduction: str = setting("mean", check=choice("mean", "sum"), group="recovery",
                                help="the SP loss over layer pairs: mean (gamma per pair) or sum (Eq. 11 literally: "
                                     "gamma grows with the pairs)")
    factor_weight_decay: Optional[float] = setting(None, check=optional(number(min=0)), group="recovery",
                                                   help="weight decay of the expanded factors",
                                                   default_text="the weight decay")
    factor_lr_scale: float = setting(1.0, check=number(min=0, min_open=True), group="recovery",
                                     help="LR multiplier of the expanded factors")
    optimizer: str = setting("sgd", check=choice(*OPTIMIZERS), group="training",
                             help="sgd (--momentum, --nesterov, --weight-decay as L2) or adamw (torch's AdamW, "
                                  "betas 0.9/0.999; --weight-decay decoupled: weights x (1 - lr x wd) each step; "
                                  "set --lr for it)")
    ema: Optional[float] = setting(None, check=optional(number(min=0, max=1, min_open=True, max_open=True)),
                                   group="training", metavar="DECAY", default_text="off",
                                   help="keep an exponential moving average of the weights (and BatchNorm statistics), "
                                        "updated inside every step on the device: avg = DECAY x avg + (1 - DECAY) x "
                                        "weights; evaluated every epoch (ema_acc in the history)")
    ema_final: bool = setting(False, check=boolean(), group="training",
                              help="the weight average becomes each stage's final model: evaluated, contracted and "
                                   "saved (needs --ema)")

    def _check_together(self) -> None:
        if self.nesterov and self.optimizer != "sgd":
            raise InvalidArgument("nesterov", self.nesterov, "off unless optimizer is 'sgd'",
                                  f"optimizer is {self.optimizer!r}: Nesterov momentum is SGD's")
        if self.nesterov and not self.momentum > 0:
            raise InvalidArgument("nesterov", self.nesterov, f"False while momentum is {self.momentum!r}",
                                  "nesterov needs momentum > 0")
        if self.ema_final and self.ema is None:
            raise InvalidArgument("ema_final", self.ema_final, "False without ema",
                                  "it makes the weight average the final model: set ema (--ema DECAY)")


def _milestones(v: Any, name: str) -> Tuple[int, ...]:
    accepted = "a list of epochs (ints >= 1) after which the lr is multiplied by lr_decay"
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise InvalidArgumentType(name, v, accepted)
    for m in v:
        if isinstance(m, bool) or not isinstance(m, int):
            raise InvalidArgumentType(name, v, accepted, f"{m!r} is not an int")
        if m < 1:
            raise InvalidArgument(name, v, accepted, f"a milestone of {m} would decay the lr from the first step")
    return tuple(v)


@dataclass
class TrainConfig(TrainSettings):
    """One training stage: its epochs, lr and schedule, its SP weight, and the shared
    :class:`TrainSettings` (keyword arguments). Checked when made: ``TrainConfig(3, 0.05, (2,))``."""

    epochs: int = setting(check=integer(min=1), help="epochs of the stage")
    lr: float = setting(check=number(min=0, min_open=True), help="base learning rate")
    milestones: Tuple[int, ...] = setting((), check=custom(_milestones, "a list of epochs (ints >= 1)"),
                                          help="epochs after which the lr is multiplied by lr_decay (multistep)")
    lr_decay: float = setting(0.1, check=number(min=0, min_open=True), help="lr factor at each milestone")
    gamma: float = setting(0.0, check=number(min=0), help="weight of the SP distillation loss (needs a teacher)")
    channels_last: Optional[bool] = setting(None, check=optional(boolean()), default_text="on for CUDA",
                                            help="train in the channels_last memory format")

    def _check_together(self) -> None:
        super()._check_together()
        check_schedule(self.schedule, self.warmup_epochs, self.epochs)
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            warnings.warn(f"milestones {late} are not before the last of the {self.epochs} epochs: they never change "
                          "the lr", stacklevel=4)


def preset(kind: str, epochs: Optional[int] = None, lr: Optional[float] = None) -> Tuple[int, float, Tuple[int, ...]]:
    """(epochs, lr, milestones) of a paper preset, milestones rescaled to ``epochs``."""
    if kind not in PRESETS:
        raise ValueError(f"unknown preset {kind!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[kind]
    n = p["epochs"] if epochs is None else epochs
    ms = tuple(sorted({max(1, round(m * n / p["epochs"])) for m in p["milestones"]} - {n}))
    ms = tuple(m for m in ms if m < n)
    return n, (p["lr"] if lr is None else lr), ms


def stage_config(settings: TrainSettings, kind: str, epochs: Optional[int] = None, lr: Optional[float] = None,
                 gamma: float = 0.0) -> TrainConfig:
    """The :class:`TrainConfig` of one stage of a run: the shared settings of ``settings`` (a
    :class:`~lopfast.pipeline.config.RunConfig`) as they are, the stage's epochs, lr and milestones
    from the paper preset ``kind`` (``epochs`` / ``lr``: None for the preset's)."""
    n, lr_, ms = preset(kind, epochs, lr)
    shared = {name: getattr(settings, name) for name in TrainSettings.__dataclass_fields__}
    return TrainConfig(n, lr_, ms, gamma=gamma, **shared)


# --------------------------------------------------------------------------- distributed helpers
def dist_info() -> Tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


# --------------------------------------------------------------------------- the weight average
class WeightAverage:
    """An exponential moving average of a model's weights (``ema``): after every step
    ``avg = decay * avg + (1 - decay) * w`` for every floating parameter and buffer (BatchNorm
    statistics too; counters keep the model's), one foreach lerp on the device, run inside the
    step (``TrainStep(after_update=...)``: captured with it, no host sync)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        named = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()]
        self.names = [n for n, _ in named]
        self.live = [t.detach() for _, t in named]  # the model's own tensors: the step updates them in place
        self.avg = [t.clone() for t in self.live]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.avg, self.live, 1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(zip(self.names, self.avg))

    @torch.no_grad()
    def load_state_dict(self, state: dict, checkpoint: str) -> None:
        if not isinstance(state, dict) or set(state) != set(self.names):
            raise CheckpointError(f"checkpoint {checkpoint}: its weight average does not fit this model")
        torch._foreach_copy_(self.avg, [state[n] for n in self.names])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.live, self.avg)

    @contextlib.contextmanager
    def swapped(self):
        """The model holds the average inside the block (to evaluate it), its own weights after."""
        with torch.no_grad():
            keep = [t.clone() for t in self.live]
            self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, keep)


# --------------------------------------------------------------------------- what train() is given
def _check_train_args(model, cfg, teacher, sp_layers, checkpoint, resume) -> None:
    """The arguments of :func:`train`, before any work: each error names its argument."""
    check_module(model, "model")
    if not isinstance(cfg, TrainConfig):
        raise InvalidArgumentType("cfg", cfg, "a TrainConfig", "TrainConfig(epochs, lr, ...) builds one")
    cfg.validate()  # again: a field may have been set since the config was made
    if teacher is not None:
        check_module(teacher, "teacher")
    elif cfg.gamma:
        raise InvalidArgument("gamma", cfg.gamma, "0 without a teacher",
                              "the SP loss distils from a teacher: pass teacher=..., or gamma=0")
    elif sp_layers is not None:
        raise InvalidArgument("sp_layers", sp_layers, "None without a teacher",
                              "they name the layers paired with a teacher's: pass teacher=..., or drop sp_layers")
    check_bool(resume, "resume")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise InvalidArgumentType("checkpoint", checkpoint, "a file path or None")
    if resume and checkpoint is None:
        raise InvalidArgument("checkpoint", checkpoint, "a file path with resume=True",
                              "resume continues from that file; without one the stage would start afresh")


# settings that change how a stage computes, not what: a checkpoint resumes under other values
_HOW = ("compile", "capture", "channels_last", "amp")


def _settings_changed(saved: Any, cfg: TrainConfig) -> Dict[str, Tuple[Any, Any]]:
    now = jsonable(asdict(cfg))
    if not isinstance(saved, dict):
        return {}
    return {k: (saved[k], now[k]) for k in now if k in saved and k not in _HOW and saved[k] != now[k]}


# --------------------------------------------------------------------------- the loop
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
        model: the network to train (moved to ``device``); its outputs must match the data's
            classes and its input the data's channels (checked before the first step).
        data: bundle with ``train`` / ``test`` loaders.
        cfg: :class:`TrainConfig` (checked again here).
        device: training device.
        teacher: if given, similarity-preserving distillation from it
            (``lopfast.SPDistiller``), loss = CE + ``cfg.gamma`` * SP. Without one, ``cfg.gamma``
            must be 0 and ``sp_layers`` None (they would be dropped).
        sp_layers: module names paired between teacher and student (None: every expanded
            layer of the student).
        checkpoint: path of the per-epoch checkpoint (rank 0 writes it).
        resume: continue from ``checkpoint`` (required) if it exists. A checkpoint of a
            finished stage resumed with other settings is refused (it would train nothing).
        desc: label for logs, progress bars and errors (the stage's name).
        log: callable receiving one line per epoch (and the step's capture and amp notices).
        on_epoch_end: ``f(epoch, record)`` after each epoch's checkpoint.
        progress: tqdm bars (default: only when stderr is a terminal, rank 0).

    Returns ``{"history": [...], "final": {"acc", "loss"}, "epochs": n, "seconds": t}``.
    Raises :class:`~lopfast.checks.TrainingDiverged` when the loss or a weight becomes NaN or
    infinite (checked once per epoch, before that epoch's checkpoint is written).
    """
    _check_train_args(model, cfg, teacher, sp_layers, checkpoint, resume)
    run = _Trainer(model, data, cfg, torch.device(device), desc, log, progress)
    run.begin(checkpoint if resume and os.path.exists(checkpoint) else None)
    t0 = time.time()
    with run.session(teacher, sp_layers) as engine:
        for epoch in range(run.start, cfg.epochs):
            run.epoch(engine, epoch, checkpoint)
            if on_epoch_end is not None:
                on_epoch_end(epoch, run.history[-1])
    return {"history": run.history, "final": run.final(engine), "epochs": cfg.epochs, "seconds": time.time() - t0}


class _Trainer:
    """The state of one :func:`train` call: model on its device, optimizer, history, where it starts."""

    def __init__(self, model: nn.Module, data, cfg: TrainConfig, device: torch.device, desc: str,
                 log: Optional[Callable[[str], None]], progress: Optional[bool]) -> None:
        self.model, self.data, self.cfg, self.device, self.desc = model, data, cfg, device, desc
        self.rank, self.world = dist_info()
        self.log = log or (lambda s: None)
        self.progress = self.rank == 0 and sys.stderr.isatty() if progress is None else progress
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        with dispatch.untimed():  # one forward of other shapes: not worth measuring backends for
            check_model_matches_data(model, data)
        self.opt = build_optimizer(_param_groups(model, cfg), cfg, device)
        self.history: List[dict] = []
        self.start = self.step0 = 0
        self.amp: Optional[str] = None
        self.ema: Optional[WeightAverage] = None

    def begin(self, checkpoint: Optional[str]) -> None:
        """Continue from ``checkpoint`` (model, optimizer, RNG, history, step, amp, weight average),
        or start afresh."""
        ck = self._resume(checkpoint) if checkpoint is not None else None
        if ck is None:
            torch.manual_seed(self.cfg.seed)
        if self.cfg.ema is not None:  # from the weights the stage starts from, unless the checkpoint holds one
            self.ema = WeightAverage(self.model, self.cfg.ema)
            if ck is not None and "ema" in ck:
                self.ema.load_state_dict(ck["ema"], checkpoint)

    def _resume(self, checkpoint: str) -> dict:
        ck = load_checkpoint(checkpoint, map_location=self.device)
        missing = [k for k in ("model", "optimizer", "rng", "epoch") if not (isinstance(ck, dict) and k in ck)]
        if missing:
            raise CheckpointError(f"checkpoint {checkpoint} is not a training checkpoint of lopfast.pipeline.train "
                                  f"(no {', '.join(missing)}); pass the ckpt.pt that train() wrote, or another path")
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {checkpoint} holds another model than the one given ({first[:300]}); "
                                  "resume it with its own model, or delete it to start afresh") from None
        self.start = int(ck["epoch"]) + 1
        self._check_settings(ck.get("config"), checkpoint)
        _set_rng_state(ck["rng"], self.device)
        self.history = list(ck.get("history", []))
        self.step0 = int(ck.get("step", self.start * len(self.data.train)))
        self.amp = ck.get("amp")  # the precision the run chose at its start: a resumed run keeps it
        self.log(f"[{self.desc}] resumed from {checkpoint} at epoch {self.start}/{self.cfg.epochs}")
        return ck

    def _check_settings(self, saved, checkpoint: str) -> None:
        changed = _settings_changed(saved, self.cfg)
        if not changed:
            return
        words = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        if self.start >= self.cfg.epochs:
            raise InvalidArgument("checkpoint", checkpoint, "a checkpoint of these settings, or of an unfinished stage",
                                  f"it finished all {self.start} epochs with other settings ({words}): resuming "
                                  "would return its old result; delete it, or pass resume=False, to train anew")
        self.log(f"[{self.desc}] resuming with settings that differ from the checkpoint's: {words}")

    @contextlib.contextmanager
    def session(self, teacher: Optional[nn.Module], sp_layers):
        """The step of this run (``TrainStep``) with what it needs around it for the epochs: the DDP
        wrapper, the SP distiller, the grouped collapse, torch.compile, the oneDNN guard on CPU."""
        model, cfg, device = self.model, self.cfg, self.device
        forward = _ddp(model, device) if self.world > 1 else model
        distiller = fast = None
        with contextlib.ExitStack() as stack:
            if teacher is not None:
                teacher.to(device).eval()
                if self.channels_last:
                    teacher.to(memory_format=torch.channels_last)
                # given the DDP wrapper, the distiller hooks the inner module and calls the wrapper
                distiller = SPDistiller(teacher, forward, layers=list(sp_layers) if sp_layers is not None else None,
                                        reduction=cfg.sp_reduction)
                stack.callback(distiller.close)
            if (device.type == "cuda" or _step.EMULATE) and any(isinstance(m, ExpandedConv2d) for m in model.modules()):
                # one grouped collapse of every expanded conv per forward instead of one per layer
                fast = CollapsedForward(model)
                stack.callback(fast.remove)
            if cfg.compile or cfg.capture == "compile":
                # compile the module in place: the distiller's hooks on inner layers keep working;
                # capture="compile": torch.compile's CUDA graphs around forward and backward
                model.compile(**({"mode": "reduce-overhead"} if cfg.capture == "compile" else {}))
            engine = TrainStep(model, self.opt, cfg, device, steps_per_epoch=len(self.data.train), forward=forward,
                               distiller=distiller, world=self.world, start_step=self.step0,
                               log=self.log if self.rank == 0 else None, desc=self.desc,
                               after_update=[self.ema.update] if self.ema is not None else ())
            if self.amp is not None:
                engine.amp = self.amp
            if device.type == "cpu":
                stack.enter_context(onednn_conv_guard(model))
            yield engine

    def epoch(self, engine: TrainStep, epoch: int, checkpoint: Optional[str]) -> None:
        """One epoch: the steps, the divergence check, the evaluation, the log line, the checkpoint."""
        cfg, desc = self.cfg, self.desc
        self.model.train()
        te = time.time()
        engine.begin_epoch()
        batches = _progress(self.data.train.epoch(epoch), len(self.data.train), f"{desc} {epoch + 1}/{cfg.epochs}",
                            self.progress)
        for x, y, gbs in batches:
            if engine.amp == "auto":
                engine.choose_amp(x, y, gbs)
            engine(x, y, gbs)
        sums = engine.end_epoch()
        # checked once per epoch (no per-step host sync) and before the checkpoint is
        # written, so the last good checkpoint survives for a --resume with other settings
        _check_diverged(sums["nonfinite"], desc, epoch, cfg, checkpoint)
        ev = self._evaluate(engine)
        if not math.isfinite(ev["loss"]):  # finite weights whose logits overflow
            _check_diverged("the test loss", desc, epoch, cfg, checkpoint)
        rec = {"epoch": epoch + 1, "train_loss": sums["loss"], "sp_loss": sums["sp"] if engine.distiller else None,
               "test_acc": ev["acc"], "test_loss": ev["loss"], "lr": engine.lr(), "seconds": time.time() - te}
        if self.ema is not None:
            with self.ema.swapped():
                avg = self._evaluate(engine)
            rec.update(ema_acc=avg["acc"], ema_loss=avg["loss"])
        self.history.append(rec)
        if self.rank == 0:
            sp_txt = f" sp {rec['sp_loss']:.4f}" if rec["sp_loss"] is not None else ""
            ema_txt = f", weight average {rec['ema_acc']:.2f}%" if self.ema is not None else ""
            self.log(f"[{desc}] epoch {epoch + 1}/{cfg.epochs} loss {rec['train_loss']:.4f}{sp_txt} "
                     f"test acc {ev['acc']:.2f}%{ema_txt} ({rec['seconds']:.1f}s)")
            if checkpoint:
                state = {"epoch": epoch, "step": engine.steps, "amp": engine.amp, "model": self.model.state_dict(),
                         "optimizer": self.opt.state_dict(), "rng": _rng_state(self.device), "history": self.history,
                         "config": jsonable(asdict(cfg))}
                if self.ema is not None:
                    state["ema"] = self.ema.state_dict()
                save_checkpoint(state, checkpoint)
        if self.world > 1:
            dist.barrier()

    def _evaluate(self, engine: TrainStep) -> Dict[str, float]:
        # in the step's dispatch timing mode: the collapse reuses the training step's routing
        # (no eager re-measurement, no second program)
        with dispatch.graph_timing(engine.captures):
            return evaluate(self.model, self.data.test, self.device, engine.amp)

    def final(self, engine: TrainStep) -> Dict[str, float]:
        """The accuracy and loss of the model the stage hands on: its last epoch's, or, with
        ``ema_final``, the weight average's, which the model then holds."""
        if self.cfg.ema_final:
            self.ema.copy_to_model()
            self.log(f"[{self.desc}] the weight average (decay {self.cfg.ema:g}) is the final model")
        if not self.history:
            return self._evaluate(engine)
        last, key = self.history[-1], "ema" if self.cfg.ema_final else "test"
        return {"acc": last[f"{key}_acc"], "loss": last[f"{key}_loss"]}


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # DDP broadcasts rank 0's parameters and buffers once here (identical start); BN buffers are
    # then synchronised per epoch, not at every forward
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
