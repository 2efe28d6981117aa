"""Run configuration: every setting of a pipeline run, its validation, and the device choice.

A :class:`RunConfig` is saved as ``config.json`` in the run directory; ``lopfast run --config``
reloads it. ``validate()`` checks every setting before any data is read or any model trained.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch

from lopfast.distill.loss import DEFAULT_GAMMA
from lopfast.pipeline import models as zoo
from lopfast.pipeline.data import check_dataset_name

__all__ = ["METHODS", "RunConfig", "check_out_dir", "resolve_device"]

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
    amp: str = "auto"
    compile: bool = False
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Check every setting; raise ValueError / TypeError naming the bad one. Cheap: no data, no training."""
        zoo.check_model_name(self.model)
        check_dataset_name(self.dataset)
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not self.methods:
            raise ValueError("methods is empty; choose from " + ", ".join(METHODS))
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        _check_fraction(self.target, "target")
        if not isinstance(self.prune_method, str) or not self.prune_method:
            raise ValueError(f"prune_method must be a method name, got {self.prune_method!r}")
        try:
            from lopfast.prune import METHODS as prune_methods
        except Exception:  # pruning unavailable: the prune stage will say so
            prune_methods = None
        if prune_methods is not None and self.prune_method not in prune_methods:
            raise ValueError(f"unknown prune_method {self.prune_method!r}; choose one of {', '.join(prune_methods)}")
        _check_rate(self.rate, "rate")
        if self.linear_rate is not None:
            _check_rate(self.linear_rate, "linear_rate")
        if self.linear_depth not in (2, 3):
            raise ValueError(f"linear_depth must be 2 or 3, got {self.linear_depth!r}")
        if not isinstance(self.gamma, (int, float)) or self.gamma < 0 or not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        if self.sp_reduction not in ("mean", "sum"):
            raise ValueError(f"sp_reduction must be 'mean' or 'sum', got {self.sp_reduction!r}")
        if self.factor_weight_decay is not None and not (
                isinstance(self.factor_weight_decay, (int, float)) and self.factor_weight_decay >= 0):
            raise ValueError(f"factor_weight_decay must be a number >= 0, got {self.factor_weight_decay!r}")
        if not (isinstance(self.factor_lr_scale, (int, float)) and self.factor_lr_scale > 0
                and math.isfinite(self.factor_lr_scale)):
            raise ValueError(f"factor_lr_scale must be a positive number, got {self.factor_lr_scale!r}")
        # pretrain_epochs may be 0: take the model as built (e.g. torchvision weights)
        positive = ("epochs", "scratch_epochs", "train_subset", "test_subset", "threads")
        if self.pretrain_epochs != 0:
            positive += ("pretrain_epochs",)
        for name in positive:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "scratch_lr", "pretrain_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        from lopfast.pipeline.export import check_formats

        check_formats(self.export, "export format")
        if self.teacher is not None and not os.path.isfile(self.teacher):
            raise ValueError(f"teacher file {self.teacher!r} does not exist; pass the model.pt of a pretrain run")
        if not (self.round_to is None or self.round_to == "auto" or (
                isinstance(self.round_to, int) and not isinstance(self.round_to, bool) and self.round_to >= 1)):
            raise ValueError(f"round_to must be a positive int, 'auto' or None, got {self.round_to!r}")
        if self.target_speedup is not None and (
                isinstance(self.target_speedup, bool) or not isinstance(self.target_speedup, (int, float))
                or not math.isfinite(self.target_speedup) or self.target_speedup <= 1):
            raise ValueError(f"target_speedup must be a number > 1 (e.g. 2.0 for twice as fast), "
                             f"got {self.target_speedup!r}")
        if not isinstance(self.measure, bool):
            raise ValueError(f"measure must be true or false, got {self.measure!r}")
        if self.measure_compile is not None and not isinstance(self.measure_compile, bool):
            raise ValueError(f"measure_compile must be true, false or null (on CUDA only), got {self.measure_compile!r}")
        resolve_device(self.device)
        return self


def _check_fraction(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ValueError(f"{name} must be a fraction of parameters to remove, strictly between 0 and 1 "
                         f"(e.g. 0.9 for 90%), got {v!r}")
    return float(v)


def _check_rate(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1 or not math.isfinite(v):
        raise ValueError(f"{name} (expansion rate) must be a number >= 1 (the expanded layers must be at least "
                         f"as wide as the compact ones), got {v!r}")
    return float(v)


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
_REUSABLE_KEYS = {"methods", "export", "device", "threads", "workers", "compile", "targets", "download",
                  "measure", "measure_compile"}


def check_out_dir(cfg: RunConfig, out: str) -> None:
    """Refuse to reuse a run directory whose saved config differs (its finished stages would be stale)."""
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
