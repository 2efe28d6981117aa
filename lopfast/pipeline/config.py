"""Run configuration: every setting of a pipeline run, its validation, and the device choice.

A :class:`RunConfig` is saved as ``config.json`` in the run directory; ``lopfast run --config``
reloads it. ``validate()`` checks every setting before any data is read or any model trained.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from lopfast.checks import (
    InvalidArgument,
    InvalidArgumentType,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
    check_str_list,
    closest,
)
from lopfast.distill.loss import DEFAULT_GAMMA
from lopfast.pipeline import models as zoo
from lopfast.pipeline.data import check_dataset_name
from lopfast.pipeline.schedule import SCHEDULES
from lopfast.pipeline.step import OPTIMIZERS

__all__ = ["METHODS", "SETTING_CHECKS", "RunConfig", "check_out_dir", "check_out_path", "has_run", "resolve_device"]

METHODS = ("lop", "ft", "scratch", "expandnets", "distill", "lop-nokd")
# which paper schedule each method uses
METHOD_PRESET = {"lop": "finetune", "lop-nokd": "finetune", "ft": "finetune",
                 "scratch": "scratch", "expandnets": "scratch", "distill": "scratch"}
EXPANDED_METHODS = ("lop", "lop-nokd", "expandnets")
DISTILL_METHODS = ("lop", "distill")


@dataclass
class RunConfig:
    """Every setting of a pipeline run (saved as config.json; ``from_dict`` reloads it).

    ``epochs`` / ``scratch_epochs`` / ``pretrain_epochs`` of None use the paper presets
    (150 / 280 / 280); a smaller number rescales the LR milestones proportionally.
    ``pretrain_epochs=0`` takes the model as built as the teacher (e.g. torchvision weights
    through ``model_kwargs={"weights": "DEFAULT"}``).

    ``schedule`` / ``warmup_epochs`` / ``label_smoothing`` / ``nesterov`` apply to every
    training stage (``lopfast.pipeline.schedule``). ``val_size`` holds that many training images
    out (stratified, seeded by ``val_seed`` only); ``eval_split="val"`` then reports every
    accuracy on them instead of the test set: the split on which hyper-parameters are chosen.
    """

    model: str = "resnet20"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    download: bool = False
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    batch_size: int = 256
    workers: int = 8
    teacher: Optional[str] = None  # path of a pretrained model: skips the pretrain stage
    pretrain_epochs: Optional[int] = None
    pretrain_lr: Optional[float] = None
    prune_method: str = "l1"
    target: float = 0.9  # fraction of parameters to remove
    global_pruning: bool = False
    prune_options: dict = field(default_factory=dict)
    methods: List[str] = field(default_factory=lambda: ["ft", "lop"])
    epochs: Optional[int] = None  # fine-tune-style methods (ft, lop, lop-nokd)
    lr: Optional[float] = None
    scratch_epochs: Optional[int] = None  # scratch-style methods (scratch, expandnets, distill)
    scratch_lr: Optional[float] = None
    rate: float = 3.0
    linear: bool = False
    linear_rate: Optional[float] = None
    linear_depth: int = 2
    gamma: float = DEFAULT_GAMMA  # SP weight per distilled layer pair (lopfast.distill.DEFAULT_GAMMA: evidence there)
    sp_reduction: str = "mean"  # SP loss averaged over pairs ("sum": Eq. 11 literally, gamma grows with pairs)
    factor_weight_decay: Optional[float] = None  # weight decay of the expanded factors (None: weight_decay)
    factor_lr_scale: float = 1.0  # LR multiplier of the expanded factors
    sp_layers: Optional[List[str]] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad: Optional[float] = None
    schedule: str = "multistep"  # lopfast.pipeline.schedule.SCHEDULES
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    nesterov: bool = False
    optimizer: str = "sgd"  # "sgd" or "adamw" (lopfast.pipeline.step.build_optimizer)
    val_size: Optional[int] = None  # training images held out as a validation split
    val_seed: int = 0
    eval_split: str = "test"  # "val": every accuracy on the validation split (choosing settings)
    amp: str = "auto"
    compile: bool = False
    capture: str = "auto"  # the training step as one CUDA graph (lopfast.pipeline.step): auto, compile, off
    device: str = "auto"
    threads: Optional[int] = None  # CPU intra-op threads; None: 1 for digits, torch's default otherwise
    seed: int = 0
    export: List[str] = field(default_factory=list)
    # pruning for speed (lopfast.prune): pruned widths a multiple of round_to ("auto": 8 on CUDA, none
    # on CPU; None: exact); target_speedup: a latency budget instead of target (NetAdapt allocation)
    round_to: Union[int, str, None] = "auto"
    target_speedup: Optional[float] = None
    # latency of the original, pruned and final models in results.json (lopfast.prune.latency);
    # measure_compile: also torch.compile'd (None: on CUDA only)
    measure: bool = True
    measure_compile: Optional[bool] = None

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from a dict (e.g. a config.json); unknown keys are an error."""
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
            raise InvalidArgumentType("config", d, "a dict of settings (as in config.json)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            near = {k: closest(k, names) for k in unknown}
            hint = "".join(f" ({k!r}: did you mean {c!r}?)" for k, c in near.items() if c)
            raise ValueError(f"unknown config keys {unknown}{hint}; valid keys: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Check every setting; raise ValueError / TypeError naming the bad one. Cheap: no data, no training.

        Each field is checked (and normalised: a comma-separated string becomes a list) by its
        entry in :data:`SETTING_CHECKS`, then the settings that depend on each other
        (:func:`_check_together`: pruning options against the pruning method, ...). A bad value
        raises :class:`lopfast.checks.InvalidArgument` (``.name`` is the setting; the CLI names
        its flag).
        """
        for f in dataclasses.fields(self):
            check = SETTING_CHECKS.get(f.name) or _check_from_annotation(f)
            value = check(getattr(self, f.name), f.name)
            setattr(self, f.name, value)
        _check_together(self)
        return self


def _check_fraction(v, name: str) -> float:
    return check_number(v, name, min=0, max=1, min_open=True, max_open=True,
                        accepted="a fraction of parameters to remove, strictly between 0 and 1 (e.g. 0.9 for 90%)")


def _check_rate(v, name: str) -> float:
    return check_number(v, name, min=1, accepted="a number >= 1",
                        hint="the expansion rate: the expanded layers must be at least as wide as the compact ones")


# ---------------------------------------------------------------------------- the settings' checks
def _opt(check):
    """``check`` that also lets None through (the field's "use the default" value)."""
    return lambda v, n: None if v is None else check(v, n)


def _pos_int(v, n):
    return check_int(v, n, min=1)


def _pos_number(v, n):
    return check_number(v, n, min=0, min_open=True)


def _nonneg_number(v, n):
    return check_number(v, n, min=0)


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


def _methods(v, n):
    v = check_str_list(v, n)
    for m in v:
        check_choice(m, n, METHODS)
    return v


def _prune_method(v, n):
    check_str(v, n)
    try:
        from lopfast.prune import METHODS as prune_methods
    except Exception:  # pruning unavailable (no torch-pruning): the prune stage will say so
        return v
    return check_choice(v, n, tuple(prune_methods))


def _teacher(v, n):
    if v is None:
        return None
    check_str(v, n)
    if not os.path.isfile(v):
        what = "is not a regular file" if os.path.exists(v) else "does not exist"
        raise ValueError(f"teacher file {v!r} {what}; pass the model.pt of a pretrain run")
    return v


def _export(v, n):
    from lopfast.pipeline.export import check_formats

    return check_formats(check_str_list(v, n, empty=True), "export format")


def _device(v, n):
    resolve_device(check_str(v, n))
    return v


#: How each RunConfig field is checked: ``check(value, name) -> normalised value``, raising
#: InvalidArgument (a ValueError) / InvalidArgumentType (also a TypeError) naming the setting.
#: A new setting adds its field to RunConfig and its check here (tests/test_validation.py fails
#: for a field without one; until then a type check from its annotation applies). Checks that
#: need two settings go into _check_together.
SETTING_CHECKS: Dict[str, Callable[[Any, str], Any]] = {
    "model": _model,
    "model_kwargs": _model_kwargs,
    "dataset": lambda v, n: check_dataset_name(v),
    "data_dir": lambda v, n: check_str(v, n, none=True),
    "download": check_bool,
    "train_subset": _opt(_pos_int),
    "test_subset": _opt(_pos_int),
    "batch_size": _pos_int,
    "workers": lambda v, n: check_int(v, n, min=0),
    "teacher": _teacher,
    "pretrain_epochs": lambda v, n: check_int(v, n, min=0, none=True),  # 0: the model as built is the teacher
    "pretrain_lr": _opt(_pos_number),
    "prune_method": _prune_method,
    "target": lambda v, n: _check_fraction(v, n),
    "global_pruning": check_bool,
    "prune_options": lambda v, n: _dict(v, n, "options of the pruning parts (JSON object)"),
    "methods": _methods,
    "epochs": _opt(_pos_int),
    "lr": _opt(_pos_number),
    "scratch_epochs": _opt(_pos_int),
    "scratch_lr": _opt(_pos_number),
    "rate": lambda v, n: _check_rate(v, n),
    "linear": check_bool,
    "linear_rate": _opt(lambda v, n: _check_rate(v, n)),
    "linear_depth": lambda v, n: check_choice(v, n, (2, 3)),
    "gamma": _nonneg_number,
    "sp_reduction": lambda v, n: check_choice(v, n, ("mean", "sum")),
    "factor_weight_decay": _opt(_nonneg_number),
    "factor_lr_scale": _pos_number,
    "sp_layers": lambda v, n: check_str_list(v, n, none=True),
    "momentum": lambda v, n: check_number(v, n, min=0, max=1, max_open=True),
    "weight_decay": _nonneg_number,
    "clip_grad": _opt(_pos_number),
    "amp": lambda v, n: check_choice(v, n, ("auto", "bf16", "off")),
    "compile": check_bool,
    "capture": lambda v, n: check_choice(v, n, ("auto", "compile", "off")),
    "device": _device,
    "threads": _opt(_pos_int),
    "seed": lambda v, n: check_int(v, n, min=0, max=2**32 - 1),
    "export": _export,
    "schedule": lambda v, n: check_choice(v, n, SCHEDULES),
    "warmup_epochs": _nonneg_number,
    "label_smoothing": lambda v, n: check_number(v, n, min=0, max=1, max_open=True),
    "nesterov": check_bool,
    "optimizer": lambda v, n: check_choice(v, n, OPTIMIZERS),
    "val_size": _opt(_pos_int),
    "val_seed": lambda v, n: check_int(v, n, min=0, max=2**32 - 1),
    "eval_split": lambda v, n: check_choice(v, n, ("test", "val")),
    "round_to": lambda v, n: _round_to(v, n),
    "target_speedup": _opt(lambda v, n: check_number(
        v, n, min=1, min_open=True, accepted="a number > 1 (e.g. 2.0 for twice as fast)")),
    "measure": check_bool,
    "measure_compile": lambda v, n: None if v is None else check_bool(v, n),
}


def _round_to(v, n):
    if v is None or v == "auto":
        return v
    accepted = "a positive int (pruned widths a multiple of it), 'auto' or None"
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgumentType(n, v, accepted)
    if v < 1:
        raise InvalidArgument(n, v, accepted)
    return v


def _dict(v, n, what):
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise InvalidArgumentType(n, v, what)
    return v


_ANNOTATION_CHECKS = {
    "int": lambda v, n: check_int(v, n),
    "float": lambda v, n: check_number(v, n),
    "bool": check_bool,
    "str": lambda v, n: check_str(v, n, empty=True),
    "dict": lambda v, n: _dict(v, n, "a dict"),
    "List[str]": lambda v, n: check_str_list(v, n, empty=True, unique=False),
}


def _check_from_annotation(f: dataclasses.Field) -> Callable[[Any, str], Any]:
    """A type check from the field's annotation, for a setting added without an entry in SETTING_CHECKS."""
    ann = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "").replace(" ", "")
    optional = ann.startswith("Optional[")
    base = ann[len("Optional["):-1] if optional else ann
    check = _ANNOTATION_CHECKS.get(base, lambda v, n: v)
    return _opt(check) if optional else check


def _check_together(cfg: "RunConfig") -> None:
    """The checks that involve several settings."""
    if cfg.linear_rate is not None and not cfg.linear:
        raise InvalidArgument("linear_rate", cfg.linear_rate, "unset unless linear is on",
                              "it sets the rate of the linear expansion: add --linear (or drop --linear-rate)")
    _check_schedule(cfg)
    if cfg.eval_split == "val" and cfg.val_size is None:
        raise InvalidArgument("eval_split", cfg.eval_split, "'test' unless val_size is set",
                              "'val' needs val_size (how many training images to hold out for validation)")
    _check_prune_options(cfg)


def _check_schedule(cfg: "RunConfig") -> None:
    """The warm-up must end inside every stage that trains (None: the paper presets' epochs);
    Nesterov needs momentum."""
    stages = {"epochs": (cfg.epochs or 150) if any(METHOD_PRESET[m] == "finetune" for m in cfg.methods) else None,
              "scratch_epochs": (cfg.scratch_epochs or 280)
              if any(METHOD_PRESET[m] == "scratch" for m in cfg.methods) else None,
              "pretrain_epochs": None if cfg.teacher or cfg.pretrain_epochs == 0 else (cfg.pretrain_epochs or 280)}
    for name, n in stages.items():
        if n is not None and cfg.warmup_epochs > 0 and not cfg.warmup_epochs < n:
            raise InvalidArgument("warmup_epochs", cfg.warmup_epochs, f"fewer epochs than {name} ({n})",
                                  "the warm-up must end inside every stage that trains")
    if cfg.nesterov and not cfg.momentum > 0:
        raise InvalidArgument("nesterov", cfg.nesterov, "off unless momentum > 0", f"momentum is {cfg.momentum!r}")
    if cfg.nesterov and cfg.optimizer != "sgd":
        raise InvalidArgument("nesterov", cfg.nesterov, "off unless optimizer is 'sgd'", f"optimizer is {cfg.optimizer!r}")


def _check_prune_options(cfg: "RunConfig") -> None:
    """criterion / allocation / procedure and every option of the pruning parts, before any stage runs
    (the prune stage would refuse them only after pretraining)."""
    try:
        from lopfast.prune.compose import resolve, split_options
    except ImportError:  # pruning unavailable: the prune stage will say so
        return
    from lopfast.prune.compose import ALLOCATIONS, CRITERIA, PROCEDURES

    opts = dict(cfg.prune_options)
    parts = {k: opts.pop(k, None) for k in ("criterion", "allocation", "procedure")}
    opts.pop("data", None)  # batches given through the API, not a setting
    for (part, value), table in zip(parts.items(), (CRITERIA, ALLOCATIONS, PROCEDURES)):
        if value is not None:
            check_choice(value, part, tuple(table))
    if cfg.target_speedup is not None:  # a latency budget: lopfast.prune's netadapt allocation meets it
        if parts["allocation"] not in (None, "netadapt") or cfg.global_pruning:
            what = "global_pruning" if cfg.global_pruning else "allocation"
            raise InvalidArgument(what, True if cfg.global_pruning else parts["allocation"],
                                  "unset with target_speedup",
                                  "a latency budget is met by the netadapt allocation (per-layer latencies)")
        parts["allocation"] = "netadapt"
    elif parts["allocation"] == "netadapt":
        raise InvalidArgument("allocation", "netadapt", "netadapt only with target_speedup",
                              "netadapt meets a latency budget: pass --target-speedup")
    try:
        _, c, a, p = resolve(cfg.prune_method, parts["criterion"], parts["allocation"], parts["procedure"],
                             cfg.global_pruning)
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


# settings that do not change what earlier stages computed: a run directory may be reused with others
_REUSABLE_KEYS = {"methods", "export", "device", "threads", "workers", "compile", "capture", "targets", "download",
                  "measure", "measure_compile"}


def check_out_path(out) -> str:
    """``out`` names a directory to write into: an existing one, or a path where one can be made."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise InvalidArgumentType("out", out, "a directory path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InvalidArgument("out", out, "a directory (existing, or one to create)", "that path is a file")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InvalidArgument("out", out, "a directory path", f"{parent} is a file, not a directory")
    return os.fspath(out)


def has_run(out: str) -> bool:
    """Whether ``out`` holds a run to resume: its config.json, or that of a per-seed subfolder."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return True
    try:
        subs = os.listdir(out)
    except OSError:
        return False
    return any(n.startswith("seed") and os.path.isfile(os.path.join(out, n, "config.json")) for n in subs)


def check_out_dir(cfg: RunConfig, out: str) -> None:
    """Refuse to reuse a run directory whose saved config differs (its finished stages would be stale),
    and an ``out`` that is an existing file."""
    check_out_path(out)
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = cfg.to_dict()
    defaults = RunConfig().to_dict()  # a setting newer than the saved run had its default there
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _REUSABLE_KEYS and json.dumps(old.get(k, defaults.get(k))) != json.dumps(new.get(k)))
    if diff:
        raise ValueError(f"--out {out} holds a run with different settings ({', '.join(diff)}); its finished stages "
                         "would not match: choose a new --out, or rerun with the settings of its config.json")
