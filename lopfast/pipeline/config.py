"""Run configuration: every setting of a pipeline run, declared once with its check, and the device choice.

A :class:`RunConfig` is checked when it is made (each setting by its declaration, then the
settings that depend on each other) and again by :meth:`RunConfig.validate`, which also checks
the machine (the device, the teacher file) before any data is read or any model trained. It is
saved as ``config.json`` in the run directory; ``lopfast run --config`` reloads it. The training
settings every stage shares are declared on :class:`~lopfast.pipeline.train.TrainSettings`, which
RunConfig extends; the command-line flags and ``docs/configuration.md`` are derived from these
declarations (``lopfast.pipeline.settings``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from lopfast.checks import (
    InvalidArgument,
    InvalidArgumentType,
    check_choice,
    check_latency_budget,
    check_number,
    check_str,
    check_str_list,
)
from lopfast.distill.loss import DEFAULT_GAMMA
from lopfast.pipeline import models as zoo
from lopfast.pipeline.data import check_dataset_name
from lopfast.pipeline.methods import METHODS, RECOVERY
from lopfast.pipeline.settings import (
    boolean,
    choice,
    custom,
    from_dict,
    integer,
    like,
    names,
    number,
    optional,
    setting,
    text,
)
from lopfast.pipeline.train import PRESETS, TrainConfig, TrainSettings

__all__ = ["METHODS", "RunConfig", "check_fraction", "resolve_device"]

_FT, _SCRATCH = PRESETS["finetune"], PRESETS["scratch"]


# ---------------------------------------------------------------------------- the checks that need words
def check_fraction(v, n: str) -> float:
    return check_number(v, n, min=0, max=1, min_open=True, max_open=True,
                        accepted="a fraction of parameters to remove, strictly between 0 and 1 (e.g. 0.9 for 90%)")


def _rate(v, n: str) -> float:
    return check_number(v, n, min=1, accepted="a number >= 1",
                        hint="the expansion rate: the expanded layers must be at least as wide as the compact ones")


def _model(v, n):
    return zoo.check_model_name(check_str(v, n), n)


def _model_kwargs(v, n):
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise InvalidArgumentType(n, v, 'a dict of builder arguments (JSON object), e.g. {"width": 16}')
    taken = sorted(set(v) & {"in_channels", "num_classes"})
    if taken:
        raise InvalidArgument(n, v, "builder arguments other than in_channels / num_classes",
                              f"{taken} follow from the dataset")
    return v


def _prune_method(v, n):
    check_str(v, n)
    try:
        from lopfast.prune import METHODS as prune_methods
    except Exception:  # pruning unavailable (no torch-pruning): the prune stage will say so
        return v
    return check_choice(v, n, tuple(prune_methods))


def _teacher(v, n):
    # the file itself is checked by RunConfig.validate (the machine), and against the data by the runner
    return check_str(v, n, none=True)


def _export(v, n):
    from lopfast.pipeline.export import check_formats

    return check_formats(check_str_list(v, n, empty=True), "export format")


def _device(v, n):
    check_str(v, n)
    if v != "auto":
        try:
            torch.device(v)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {v!r} is not a valid torch device") from exc
    return v


def _round_to(v, n):
    if v is None or v == "auto":
        return v
    accepted = "a positive int (pruned widths a multiple of it), 'auto' or None"
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgumentType(n, v, accepted)
    if v < 1:
        raise InvalidArgument(n, v, accepted)
    return v


def _dict(v, n):
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise InvalidArgumentType(n, v, "options of the pruning parts (JSON object)")
    return v


def _flag_round_to(s: str):
    import argparse

    if s.strip().lower() == "auto":
        return "auto"
    if s.strip().lower() in ("none", "off", "0", "1"):
        return None
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, auto or none, got {s!r}")
    return v


def _flag_speedup(s: str) -> float:
    import argparse

    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not v > 1 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 1 (e.g. 2.0), got {s!r}")
    return v


_POSITIVE = number(min=0, min_open=True)
_SEED = integer(min=0, max=2**32 - 1)


@dataclass
class RunConfig(TrainSettings):
    """Every setting of a pipeline run (saved as config.json; :meth:`from_dict` reloads it).

    ``epochs`` / ``scratch_epochs`` / ``pretrain_epochs`` of None use the paper presets
    (150 / 280 / 280); a smaller number rescales the LR milestones proportionally.
    ``pretrain_epochs=0`` takes the model as built as the teacher (e.g. torchvision weights
    through ``model_kwargs={"weights": "DEFAULT"}``). The training settings every stage shares
    (``momentum``, ``schedule``, ``seed`` ...) come from
    :class:`~lopfast.pipeline.train.TrainSettings`. ``val_size`` holds that many training images
    out (stratified, seeded by ``val_seed`` only); ``eval_split="val"`` then reports every
    accuracy on them instead of the test set: the split on which hyper-parameters are chosen.
    Every setting, its default, flag and check: ``docs/configuration.md``.
    """

    # ---- the machine
    device: str = setting("auto", check=custom(_device, "auto, cpu, cuda, cuda:1 ... (a torch device)"),
                          help="where to train: auto (CUDA when available), cpu, cuda, cuda:1 ...", group="run")
    threads: Optional[int] = setting(None, check=optional(integer(min=1)), group="run", help="CPU threads",
                                     default_text="1 for digits, torch's default otherwise")
    # ---- model and data
    model: str = setting("resnet20", group="model and data",
                         check=custom(_model, "a zoo model name, tv:<torchvision name> or timm:<timm name>"),
                         help="zoo model: digitsnet, resnet20/32/56/110, vgg16, mobilenet_v2, resnet50 (torchvision), "
                              "tv:<torchvision name> or timm:<timm name> (random weights)")
    model_kwargs: dict = setting(default_factory=dict, group="model and data",
                                 check=custom(_model_kwargs, "a dict of builder arguments but in_channels / "
                                                             "num_classes"),
                                 help='extra builder arguments as JSON, e.g. \'{"width": 16}\'')
    dataset: str = setting("cifar10", check=custom(lambda v, n: check_dataset_name(v), "digits, cifar10, cifar100, "
                                                                                         "imagenet"),
                           help="digits, cifar10, cifar100 or imagenet", group="model and data")
    data_dir: Optional[str] = setting(None, check=optional(text()), group="model and data",
                                      help="data directory (cifar: pickle or image-folder layout)")
    download: bool = setting(False, check=boolean(), help="download CIFAR if missing (MD5 checked)",
                             group="model and data")
    train_subset: Optional[int] = setting(None, check=optional(integer(min=1)), group="model and data",
                                          help="use only N training images", default_text="all")
    test_subset: Optional[int] = setting(None, check=optional(integer(min=1)), group="model and data",
                                         help="use only N test images", default_text="all")
    batch_size: int = setting(256, check=integer(min=1), help="global batch size", group="model and data")
    workers: int = setting(8, check=integer(min=0), help="DataLoader workers for imagenet", group="model and data")
    # ---- the teacher and the held-out split
    teacher: Optional[str] = setting(None, check=custom(_teacher, "a file path or None"), group="training",
                                     help="pretrained model.pt to start from (skips pretraining)",
                                     default_text="none: pretrain one")
    pretrain_epochs: Optional[int] = setting(None, check=optional(integer(min=0)), group="training",
                                             help="pretraining epochs (milestones rescale; 0: the model as built "
                                                  "is the teacher, e.g. torchvision weights)",
                                             default_text=f"{_SCRATCH['epochs']}, the scratch preset")
    pretrain_lr: Optional[float] = setting(None, check=optional(_POSITIVE), help="pretraining LR", group="training",
                                           default_text=f"{_SCRATCH['lr']:g}, the scratch preset")
    val_size: Optional[int] = setting(None, check=optional(integer(min=1)), group="training",
                                      help="hold N training images out as a validation split (stratified, fixed by "
                                           "--val-seed)")
    val_seed: int = setting(0, check=_SEED, help="seed of the validation split", group="training")
    eval_split: str = setting("test", check=choice("test", "val"), group="training",
                              help="test or val: report every accuracy on the validation split (choose settings there)")
    # ---- pruning
    prune_method: str = setting("l1", check=custom(_prune_method, "a lopfast.prune method (lopfast.prune.METHODS)"),
                                help="lopfast.prune method", group="pruning")
    target: float = setting(0.9, check=custom(check_fraction, "a fraction strictly between 0 and 1"), group="pruning",
                            help="fraction of parameters to remove")
    global_pruning: bool = setting(False, check=boolean(), group="pruning",
                                   help="rank channels across layers instead of per layer")
    prune_options: dict = setting(default_factory=dict, check=custom(_dict, "a dict of options"), group="pruning",
                                  flag=None, help="criterion / allocation / procedure and the options of the pruning "
                                                  "parts; flags --criterion, --allocation, --procedure, "
                                                  "--method-options")
    round_to: Union[int, str, None] = setting("auto", check=custom(_round_to, "a positive int, 'auto' or None"),
                                              parse=_flag_round_to, metavar="N|auto|none", group="pruning",
                                              help="every pruned width a multiple of N (tensor cores: 8); auto: 8 on "
                                                   "CUDA, none on CPU")
    target_speedup: Optional[float] = setting(
        None, check=optional(number(min=1, min_open=True, accepted="a number > 1 (e.g. 2.0 for twice as fast)")),
        parse=_flag_speedup, metavar="X", group="pruning",
        help="prune until the model runs X times faster on this device (a latency budget, NetAdapt allocation with "
             "any --criterion), measured at the training batch (--batch-size; --method-options '{\"batch\": 1}' "
             "for batch-1 latency); replaces --target")
    measure: bool = setting(True, check=boolean(), group="pruning",
                            help="report latency and throughput of the original, pruned and final models on the run's "
                                 "device (batch 1 and --batch-size; `lopfast prune` measures only when asked)")
    measure_compile: Optional[bool] = setting(None, check=optional(boolean()), group="pruning",
                                              help="also time the torch.compile'd models (tens of seconds per model "
                                                   "on CPU)", default_text="on CUDA only")
    # ---- recovery
    methods: List[str] = setting(default_factory=lambda: ["ft", "lop"], check=names(among=METHODS), group="recovery",
                                 help="comma list of recovery methods: " + ", ".join(METHODS))
    epochs: Optional[int] = setting(None, check=optional(integer(min=1)), group="recovery",
                                    help="epochs of " + "/".join(m for m, r in RECOVERY.items()
                                                                 if r.schedule == "finetune")
                                         + " (milestones rescale)",
                                    default_text=f"{_FT['epochs']}, the fine-tune preset")
    lr: Optional[float] = setting(None, check=optional(_POSITIVE), help="fine-tune LR", group="recovery",
                                  default_text=f"{_FT['lr']:g}, the fine-tune preset")
    scratch_epochs: Optional[int] = setting(None, check=optional(integer(min=1)), group="recovery",
                                            help="epochs of " + "/".join(m for m, r in RECOVERY.items()
                                                                         if r.schedule == "scratch"),
                                            default_text=f"{_SCRATCH['epochs']}, the scratch preset")
    scratch_lr: Optional[float] = setting(None, check=optional(_POSITIVE), help="from-scratch LR", group="recovery",
                                          default_text=f"{_SCRATCH['lr']:g}, the scratch preset")
    rate: float = setting(3.0, check=custom(_rate, "a number >= 1"), help="expansion rate r", group="recovery")
    linear: bool = setting(False, check=boolean(), help="also expand the linear classifier", group="recovery")
    linear_rate: Optional[float] = setting(None, check=optional(custom(_rate, "a number >= 1")), group="recovery",
                                           help="rate of the linear expansion (needs --linear)", default_text="--rate")
    linear_depth: int = setting(2, check=choice(2, 3), help="2 or 3 layers per expanded linear", group="recovery")
    gamma: float = like(TrainConfig, "gamma", DEFAULT_GAMMA, group="recovery",
                        help="SP distillation weight per distilled layer pair, for the methods that distil "
                             "(lopfast.distill.DEFAULT_GAMMA; the SP loss is averaged over pairs)")
    sp_layers: Optional[List[str]] = setting(None, check=optional(names()), group="recovery",
                                             help="comma list of module names paired for SP distillation",
                                             default_text="every expanded layer")
    export: List[str] = setting(default_factory=list, check=custom(_export, "a list of pt2, onnx, torchscript"),
                                group="recovery", help="also export the final models: pt2 (torch.export), onnx, "
                                                       "torchscript")

    @classmethod
    def from_dict(cls, d: dict, source: Optional[str] = None) -> "RunConfig":
        """Build from a dict (e.g. a config.json); unknown keys are an error; ``source`` (the file)
        is named in errors."""
        return from_dict(cls, d, source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Check every setting, the settings that depend on each other, and what the machine must
        have (the device, the teacher file); raise ValueError / TypeError naming the bad one
        (:class:`lopfast.checks.InvalidArgument`: ``.name`` is the setting; the CLI names its flag).
        Cheap: no data, no training. Returns self."""
        self._check()
        resolve_device(self.device)
        if self.teacher is not None and not os.path.isfile(self.teacher):
            what = "is not a regular file" if os.path.exists(self.teacher) else "does not exist"
            raise ValueError(f"teacher file {self.teacher!r} {what}; pass the model.pt of a pretrain run")
        return self

    def _check_together(self) -> None:
        super()._check_together()
        if self.linear_rate is not None and not self.linear:
            raise InvalidArgument("linear_rate", self.linear_rate, "unset unless linear is on",
                                  "it sets the rate of the linear expansion: add --linear (or drop --linear-rate)")
        self._check_warmup()
        if self.eval_split == "val" and self.val_size is None:
            raise InvalidArgument("eval_split", self.eval_split, "'test' unless val_size is set",
                                  "'val' needs val_size (how many training images to hold out for validation)")
        self._check_prune_options()

    def _check_warmup(self) -> None:
        """The warm-up must end inside every stage that trains (None: the paper presets' epochs)."""
        kinds = {RECOVERY[m].schedule for m in self.methods}
        stages = {"epochs": (self.epochs or _FT["epochs"]) if "finetune" in kinds else None,
                  "scratch_epochs": (self.scratch_epochs or _SCRATCH["epochs"]) if "scratch" in kinds else None,
                  "pretrain_epochs": None if self.teacher or self.pretrain_epochs == 0
                  else (self.pretrain_epochs or _SCRATCH["epochs"])}
        for name, n in stages.items():
            if n is not None and self.warmup_epochs > 0 and not self.warmup_epochs < n:
                raise InvalidArgument("warmup_epochs", self.warmup_epochs, f"fewer epochs than {name} ({n})",
                                      "the warm-up must end inside every stage that trains")

    def _check_prune_options(self) -> None:
        """criterion / allocation / procedure and every option of the pruning parts, before any stage
        runs (the prune stage would refuse them only after pretraining)."""
        try:
            from lopfast.prune.compose import ALLOCATIONS, CRITERIA, PROCEDURES, resolve, split_options
        except ImportError:  # pruning unavailable: the prune stage will say so
            return
        opts = dict(self.prune_options)
        parts = {k: opts.pop(k, None) for k in ("criterion", "allocation", "procedure")}
        opts.pop("data", None)  # batches given through the API, not a setting
        for (part, value), table in zip(parts.items(), (CRITERIA, ALLOCATIONS, PROCEDURES)):
            if value is not None:
                check_choice(value, part, tuple(table))
        parts["allocation"] = check_latency_budget(self.target_speedup is not None, parts["allocation"],
                                                   self.global_pruning)
        try:
            _, c, a, p = resolve(self.prune_method, parts["criterion"], parts["allocation"], parts["procedure"],
                                 self.global_pruning)
        except ValueError as exc:
            raise ValueError(f"the pruning settings do not combine: {exc}") from None
        try:
            split_options(opts, c, a, p)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("prune_options", opts, "options the pruning parts accept", str(exc)) from None


def resolve_device(device: str) -> torch.device:
    """The torch device of a ``--device`` value: ``auto`` is CUDA when available, else CPU; a
    malformed name, or CUDA on a machine without it, is a ValueError naming the device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a valid torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev
