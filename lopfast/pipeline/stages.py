"""The prune -> expand -> distill -> contract pipeline, stage by stage.

Stages write into one run directory::

    out/
      config.json          everything needed to rerun (``lopfast run --config out/config.json``)
      log.txt              one line per epoch and stage
      pretrain/model.pt    the unpruned teacher (+ ckpt.pt while training)
      prune/model.pt       the pruned model, prune/report.json
      <method>/model.pt    final compact model (lopfast.save), <method>/result.json
      results.json         every number of the run; plots (*.png)

A stage whose output exists is loaded, never recomputed; ``resume=True`` continues an
interrupted stage from its last epoch checkpoint.

Recovery methods (paper Sec. 3.2):

* ``lop``: expand every conv of the pruned model (exactly, ``lopfast.expand``), fine-tune
  with CE + gamma * SP distillation from the unpruned teacher, contract back.
* ``lop-nokd``: the same without distillation (ablation, Tab. 4).
* ``ft``: fine-tune the pruned model.
* ``scratch``: pruned architecture, random init, scratch schedule.
* ``expandnets``: pruned architecture with fresh ``ExpandedConv2d`` layers (ExpandNets), random
  init, scratch schedule, no distillation; contracted at the end.
* ``distill``: re-initialised pruned model + SP distillation (pairs the convs at the same
  paths), scratch schedule.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import lopfast
from lopfast.layers import ExpandedConv2d, ExpandedLinear
from lopfast.pipeline import models as zoo
from lopfast.pipeline._api import MissingAPIError, has, require
from lopfast.pipeline.export import check_formats, export_model  # export code lives in pipeline/export.py
from lopfast.pipeline.data import DATASETS, check_dataset_name, load_data
from lopfast.pipeline.train import TrainConfig, dist_info, evaluate, load_checkpoint, preset, save_atomic, train

__all__ = ["METHODS", "RunConfig", "count_macs", "run_pipeline", "recover", "pretrain_stage", "prune_stage"]

METHODS = ("lop", "ft", "scratch", "expandnets", "distill", "lop-nokd")
# which paper schedule each method uses
METHOD_PRESET = {"lop": "finetune", "lop-nokd": "finetune", "ft": "finetune",
                 "scratch": "scratch", "expandnets": "scratch", "distill": "scratch"}
DATA_PRUNE_METHODS = ("taylor", "hrank", "thinet", "eagleeye", "admm")
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
    gamma: float = 3000.0  # SP loss weight (Tung & Mori use 3000 on CIFAR)
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
        check_formats(self.export, "export format")
        if self.teacher is not None and not os.path.isfile(self.teacher):
            raise ValueError(f"teacher file {self.teacher!r} does not exist; pass the model.pt of a pretrain run")
        _resolve_device(self.device)
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


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a valid torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


# --------------------------------------------------------------------------- helpers
@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass per image (Conv2d and Linear layers)."""
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin_hook(m, inp, out):
        total[0] += out[0].numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    was = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return int(total[0])


def _save_stage_model(model: nn.Module, path: str, arch: str, arch_kwargs: dict) -> None:
    """Stage hand-off format: architecture name + state dict (loads with weights_only)."""
    save_atomic({"arch": arch, "arch_kwargs": arch_kwargs,
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def load_model_file(path: str) -> nn.Module:
    """Load a model written by a pipeline stage or by ``lopfast.save`` (e.g. a run's final model.pt)."""
    try:
        ck = load_checkpoint(path)
    except Exception as exc:
        raise ValueError(f"{path!r} is not a readable model file ({type(exc).__name__}: {exc})") from None
    if isinstance(ck, dict) and "arch" in ck and "state_dict" in ck:
        return load_stage_model(path)
    load = require("load", f"reading {path}")
    return load(path, map_location="cpu")


def load_stage_model(path: str) -> nn.Module:
    """Rebuild a (possibly pruned) zoo model written by a stage: arch + shapes from the state dict."""
    ck = load_checkpoint(path)
    model = zoo.build_model(ck["arch"], **ck["arch_kwargs"])
    zoo.resize_to_state_dict(model, ck["state_dict"])
    model.load_state_dict(ck["state_dict"], strict=True)
    return model


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh random weights for the same (pruned) architecture (methods scratch / distill)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    zoo._kaiming_init(model)
    return model


def fresh_expanded(model: nn.Module, rate: float, linear: bool, linear_rate: Optional[float], depth: int,
                   seed: int) -> nn.Module:
    """ExpandNets: every conv (and optionally linear) replaced by a freshly initialised expanded layer."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d:
            new: nn.Module = ExpandedConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                            m.dilation, m.groups, m.bias is not None, m.padding_mode, rate=rate)
        elif linear and type(m) is nn.Linear:
            new = ExpandedLinear(m.in_features, m.out_features, m.bias is not None,
                                 rate=linear_rate or rate, depth=depth)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


@torch.no_grad()
def verify_contraction(expanded: nn.Module, contracted: nn.Module, data, device, batches: int = 2) -> float:
    """Max |expanded - contracted| / max |expanded| of the logits on real test inputs, eval mode."""
    expanded.eval(), contracted.eval()
    worst = 0.0
    for i, (x, _, _) in enumerate(data.test.epoch(0)):
        if i >= batches:
            break
        a = expanded(x.to(device)).float()
        b = contracted(x.to(device)).float()
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    return worst


class RunLog:
    """Appends to out/log.txt and prints (rank 0 only)."""

    def __init__(self, out: Optional[str], quiet: bool = False) -> None:
        self.path = os.path.join(out, "log.txt") if out else None
        self.quiet = quiet
        self.rank = dist_info()[0]

    def __call__(self, msg: str) -> None:
        if self.rank != 0:
            return
        if not self.quiet:
            print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")


def _train_cfg(cfg: RunConfig, kind: str, epochs: Optional[int], lr: Optional[float], gamma: float = 0.0) -> TrainConfig:
    n, lr_, ms = preset(kind, epochs, lr)
    return TrainConfig(n, lr_, ms, momentum=cfg.momentum, weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad,
                       amp=cfg.amp, compile=cfg.compile, seed=cfg.seed, sp_gamma=gamma)


def _write_json(path: str, obj) -> None:
    if dist_info()[0] != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- stages
def pretrain_stage(cfg: RunConfig, data, out: str, device, log, resume: bool = False):
    """Train the unpruned model from scratch (scratch preset) or load ``cfg.teacher``; returns (model, acc)."""
    arch_kwargs = {"in_channels": data.in_channels, "num_classes": data.num_classes, **cfg.model_kwargs}
    if cfg.teacher:
        model = load_model_file(cfg.teacher)
        return model.to(device), evaluate(model.to(device), data.test, device, cfg.amp)["acc"]
    d = os.path.join(out, "pretrain")
    final = os.path.join(d, "model.pt")
    if os.path.exists(final):
        log(f"[pretrain] done already: loading {final}")
        model = load_stage_model(final).to(device)
        return model, evaluate(model, data.test, device, cfg.amp)["acc"]
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = zoo.build_model(cfg.model, **arch_kwargs)
    if cfg.pretrain_epochs == 0:
        log("[pretrain] --pretrain-epochs 0: using the model as built (pretrained weights), no training")
        model.to(device)
        res = {"history": [], "final": evaluate(model, data.test, device, cfg.amp)}
    else:
        tc = _train_cfg(cfg, "scratch", cfg.pretrain_epochs, cfg.pretrain_lr)
        res = train(model, data, tc, device=device, checkpoint=os.path.join(d, "ckpt.pt"), resume=resume,
                    desc="pretrain", log=log)
    if dist_info()[0] == 0:
        _save_stage_model(model, final, cfg.model, arch_kwargs)
        _write_json(os.path.join(d, "history.json"), res["history"])
    return model, res["final"]["acc"]


def prune_stage(cfg: RunConfig, teacher: nn.Module, data, out: str, device, log, target: Optional[float] = None,
                tag: str = "prune"):
    """Prune ``teacher`` with ``lopfast.prune`` to remove ``target`` of its parameters; returns (model, report)."""
    target = cfg.target if target is None else target
    d = os.path.join(out, tag)
    final, rep_path = os.path.join(d, "model.pt"), os.path.join(d, "report.json")
    if os.path.exists(final) and os.path.exists(rep_path):
        log(f"[{tag}] done already: loading {final}")
        with open(rep_path) as f:
            return load_stage_model(final).to(device), json.load(f)
    prune = require("prune", f"pruning (--prune-method {cfg.prune_method})")
    limit = zoo.max_removable_fraction(teacher)
    if target >= limit:
        raise ValueError(f"target={target} is above what {cfg.model} can lose by channel pruning "
                         f"(at most {limit:.4f}); choose a smaller --target")
    os.makedirs(d, exist_ok=True)
    example = data.example_inputs(2, device)
    opts = dict(cfg.prune_options)  # may hold criterion / allocation / procedure and the parts' options
    from lopfast.prune.compose import needs_data, resolve

    _, crit, alloc, proc = resolve(cfg.prune_method, opts.get("criterion"), opts.get("allocation"),
                                   opts.get("procedure"), cfg.global_pruning)
    if needs_data(crit, alloc, proc) and "data" not in opts:
        # data-driven parts score channels on a few training batches (ADMM / slimming train on more)
        opts["data"] = _calibration_batches(data, 50 if proc in ("admm", "slimming") else 8)
    t0 = time.time()
    src = copy.deepcopy(teacher).eval()
    pruned, report = prune(src, example, method=cfg.prune_method, target_removed=target,
                           global_pruning=cfg.global_pruning, **opts)
    report = _report_dict(report)
    report["seconds"] = time.time() - t0
    arch_kwargs = {"in_channels": data.in_channels, "num_classes": data.num_classes, **cfg.model_kwargs}
    if dist_info()[0] == 0:
        _save_stage_model(pruned, final, cfg.model, arch_kwargs)
        _write_json(rep_path, report)
    log(f"[{tag}] {cfg.prune_method}: {report.get('params_before')} -> {report.get('params_after')} params "
        f"({100 * _removed(report):.1f}% removed)")
    return pruned.to(device), report


def _calibration_batches(data, n: int):
    out = []
    for i, (x, y, _) in enumerate(data.train.epoch(0)):
        if i >= n:
            break
        out.append((x, y))
    return out


def _report_dict(report) -> dict:
    if isinstance(report, dict):
        return json.loads(json.dumps(report, default=lambda o: getattr(o, "__dict__", str(o))))
    for attr in ("to_dict", "as_dict"):
        if hasattr(report, attr):
            return json.loads(json.dumps(getattr(report, attr)(), default=str))
    if dataclasses.is_dataclass(report):
        return json.loads(json.dumps(dataclasses.asdict(report), default=str))
    return json.loads(json.dumps(vars(report), default=str))


def _removed(report: dict) -> float:
    for k in ("removed", "fraction_removed", "params_removed_fraction", "removed_fraction"):
        if k in report:
            return float(report[k])
    if "params_before" in report and "params_after" in report:
        return 1.0 - report["params_after"] / report["params_before"]
    return float("nan")


def recover(method: str, cfg: RunConfig, teacher: nn.Module, pruned: nn.Module, data, out: str, device, log,
            resume: bool = False, tag: Optional[str] = None, params_before: Optional[int] = None) -> dict:
    """Run one recovery method on the pruned model; save the compact result; return its metrics."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    tag = tag or method
    d = os.path.join(out, tag)
    res_path = os.path.join(d, "result.json")
    if os.path.exists(res_path):
        log(f"[{tag}] done already: {res_path}")
        with open(res_path) as f:
            return json.load(f)
    if method in DISTILL_METHODS:
        require("SPDistiller", f"method {method!r} (SP distillation)")
    os.makedirs(d, exist_ok=True)
    kind = METHOD_PRESET[method]
    epochs, lr = (cfg.epochs, cfg.lr) if kind == "finetune" else (cfg.scratch_epochs, cfg.scratch_lr)
    gamma = cfg.gamma if method in DISTILL_METHODS else 0.0
    tc = _train_cfg(cfg, kind, epochs, lr, gamma)
    base = copy.deepcopy(pruned).cpu()
    seed_gen = torch.Generator().manual_seed(cfg.seed)
    if method in ("lop", "lop-nokd"):
        student = lopfast.expand(base, cfg.rate, linear=cfg.linear, linear_rate=cfg.linear_rate,
                                 linear_depth=cfg.linear_depth, generator=seed_gen)
    elif method == "expandnets":
        student = fresh_expanded(reinitialize(base, cfg.seed), cfg.rate, cfg.linear, cfg.linear_rate,
                                 cfg.linear_depth, cfg.seed)
    elif method in ("scratch", "distill"):
        student = reinitialize(base, cfg.seed)
    else:  # ft
        student = base
    sp_layers = cfg.sp_layers
    if method == "distill" and sp_layers is None:
        # no expanded layers to pair by default: pair the convs at the same paths
        sp_layers = [n for n, m in student.named_modules() if isinstance(m, nn.Conv2d)]
    if sp_layers is not None:
        _check_layers(sp_layers, teacher, student)
    res = train(student, data, tc, device=device, teacher=teacher if method in DISTILL_METHODS else None,
                sp_layers=sp_layers, checkpoint=os.path.join(d, "ckpt.pt"), resume=resume, desc=tag, log=log)
    expanded_params = zoo.count_params(student)
    max_diff = None
    if method in EXPANDED_METHODS:
        final = lopfast.contract(student)
        max_diff = verify_contraction(student, final, data, device)
        if not max_diff < 1e-3:
            raise RuntimeError(f"[{tag}] contracted model disagrees with the expanded one (rel. diff {max_diff:.2e})")
        log(f"[{tag}] contracted: logits agree to {max_diff:.1e} (relative) on test inputs")
    else:
        final = student
    ev = evaluate(final, data.test, device, cfg.amp)
    example = data.example_inputs(1, device)
    params = zoo.count_params(final)
    result = {
        "method": method,
        "acc": ev["acc"],
        "loss": ev["loss"],
        "params": params,
        "params_trained": expanded_params,
        "macs": count_macs(final, example),
        "removed": (1 - params / params_before) if params_before else None,
        "contract_max_rel_diff": max_diff,
        "epochs": tc.epochs,
        "lr": tc.lr,
        "gamma": gamma,
        "train_seconds": res["seconds"],
        "history": res["history"],
    }
    if dist_info()[0] == 0:
        save_final(final, os.path.join(d, "model.pt"), cfg, data, method=method, acc=ev["acc"])
        for fmt in cfg.export:
            try:
                export_model(final, os.path.join(d, "model"), fmt, example, log)
            except Exception as exc:  # an exporter failure must not lose the trained result
                log(f"[export] {fmt} export failed: {type(exc).__name__}: {exc}")
        _write_json(res_path, result)
    log(f"[{tag}] final accuracy {ev['acc']:.2f}% with {params} params")
    return result


def _check_layers(names: Sequence[str], teacher: nn.Module, student: nn.Module) -> None:
    t = dict(teacher.named_modules())
    s = dict(student.named_modules())
    bad = [n for n in names if n not in t or n not in s]
    if bad:
        raise ValueError(f"sp_layers {bad} are not modules of the model; "
                         f"valid names include {[n for n in s if n in t and n][:8]} ...")


def save_final(model: nn.Module, path: str, cfg: RunConfig, data, **meta) -> None:
    """Save the deployable compact model with ``lopfast.save`` (arch metadata lets ``lopfast.load`` rebuild it)."""
    arch_kwargs = {"in_channels": data.in_channels, "num_classes": data.num_classes, **cfg.model_kwargs}
    # a CPU, contiguous copy: the file loads anywhere (map_location not needed)
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    if has("save"):
        lopfast.save(model, path, arch=cfg.model, arch_kwargs=arch_kwargs, dataset=cfg.dataset, **meta)
    else:  # lopfast.io missing: keep the result in the stage format so nothing is lost
        _save_stage_model(model, path, cfg.model, arch_kwargs)


# --------------------------------------------------------------------------- the whole run
def prepare(cfg: RunConfig, device=None, rank: int = 0, world: int = 1):
    """Validate ``cfg`` and load its data (raises before any training)."""
    cfg.validate()
    device = _resolve_device(cfg.device) if device is None else torch.device(device)
    if device.type == "cpu":
        # 8x8 digits batches are far too small to split across threads: extra threads only
        # add synchronisation, and on a busy machine spinning OpenMP workers cost 5-10x
        threads = cfg.threads if cfg.threads is not None else (1 if cfg.dataset == "digits" else None)
        if threads is not None:
            torch.set_num_threads(threads)
    data = load_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size, device=device, seed=cfg.seed,
                     train_subset=cfg.train_subset, test_subset=cfg.test_subset, download=cfg.download,
                     workers=cfg.workers, rank=rank, world_size=world, channels_last=device.type == "cuda")
    # model-dependent checks, on a meta-free CPU build (cheap for the zoo)
    try:
        probe = zoo.build_model(cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
                                **cfg.model_kwargs)
    except TypeError as exc:
        raise ValueError(f"model_kwargs {cfg.model_kwargs} are not accepted by {cfg.model}: {exc}") from None
    limit = zoo.max_removable_fraction(probe)
    if cfg.target >= limit:
        raise ValueError(f"target={cfg.target} is above what {cfg.model} can lose by channel pruning "
                         f"(at most {limit:.4f}); choose a smaller --target")
    if cfg.sp_layers is not None:
        _check_layers(cfg.sp_layers, probe, probe)  # pruning and expansion keep module paths
    return data, device


# settings that do not change what earlier stages computed: a run directory may be reused with others
_REUSABLE_KEYS = {"methods", "export", "device", "threads", "workers", "compile", "targets", "download"}


def check_out_dir(cfg: RunConfig, out: str) -> None:
    """Refuse to reuse a run directory whose saved config differs (its finished stages would be stale)."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = cfg.to_dict()
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _REUSABLE_KEYS and json.dumps(old.get(k)) != json.dumps(new.get(k)))
    if diff:
        raise ValueError(f"--out {out} holds a run with different settings ({', '.join(diff)}); its finished stages "
                         "would not match: choose a new --out, or rerun with the settings of its config.json")


def run_pipeline(cfg: RunConfig, out: str, *, resume: bool = False, quiet: bool = False, data=None,
                 device=None) -> dict:
    """pretrain -> prune -> recover with every ``cfg.methods`` -> contract/verify/evaluate/save.

    Returns (and writes to ``out/results.json``) the teacher / pruned accuracies and one entry per method.
    """
    rank, world = dist_info()
    if data is None:
        data, device = prepare(cfg, device, rank, world)
    check_out_dir(cfg, out)
    os.makedirs(out, exist_ok=True)
    log = RunLog(out, quiet)
    _write_json(os.path.join(out, "config.json"), cfg.to_dict())
    t0 = time.time()
    teacher, teacher_acc = pretrain_stage(cfg, data, out, device, log, resume)
    log(f"[pretrain] teacher accuracy {teacher_acc:.2f}%")
    example = data.example_inputs(1, device)
    teacher_params, teacher_macs = zoo.count_params(teacher), count_macs(teacher, example)
    pruned, report = prune_stage(cfg, teacher, data, out, device, log)
    pruned_acc = evaluate(pruned, data.test, device, cfg.amp)["acc"]
    log(f"[prune] accuracy right after pruning {pruned_acc:.2f}%")
    results = {
        "config": cfg.to_dict(),
        "teacher": {"acc": teacher_acc, "params": teacher_params, "macs": teacher_macs},
        "pruned": {"acc": pruned_acc, "params": zoo.count_params(pruned), "macs": count_macs(pruned, example),
                   "removed": 1 - zoo.count_params(pruned) / teacher_params, "report": report},
        "methods": {},
    }
    for method in cfg.methods:
        try:
            r = recover(method, cfg, teacher, pruned, data, out, device, log, resume, params_before=teacher_params)
        except MissingAPIError as exc:
            # a method whose building block is missing fails alone; the others still run
            log(f"[{method}] not run: {exc}")
            results["methods"][method] = {"method": method, "error": str(exc)}
            continue
        results["methods"][method] = {k: v for k, v in r.items() if k != "history"}
    results["seconds"] = time.time() - t0
    _write_json(os.path.join(out, "results.json"), results)
    if rank == 0:
        try:
            plot_curves(results, out)
        except Exception as exc:  # a missing/broken matplotlib must not lose the results
            log(f"[plot] skipped: {exc}")
    return results


def format_table(results: dict) -> str:
    """A plain-text table: params, MACs, % removed, accuracy and training time per model."""
    rows = [("model", "params", "MACs", "% removed", "accuracy", "train time")]
    t = results["teacher"]
    rows.append(("unpruned (teacher)", f"{t['params']:,}", f"{t['macs']:,}", "0.0", f"{t['acc']:.2f}%", ""))
    p = results["pruned"]
    rows.append(("pruned, no recovery", f"{p['params']:,}", f"{p['macs']:,}", f"{100 * p['removed']:.1f}",
                 f"{p['acc']:.2f}%", ""))
    for name, r in results["methods"].items():
        if "error" in r:
            rows.append((name, "-", "-", "-", "not run", "(see log)"))
            continue
        secs = r.get("train_seconds")
        rows.append((f"{name} ({r['epochs']} ep)", f"{r['params']:,}", f"{r['macs']:,}",
                     f"{100 * (r['removed'] or 0):.1f}", f"{r['acc']:.2f}%", f"{secs:.0f}s" if secs is not None else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def plot_curves(results: dict, out: str) -> Optional[str]:
    """Test accuracy per epoch of every method (+ teacher line) -> out/accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["methods"].items():
        path = os.path.join(out, name, "result.json")
        if "error" in r:
            continue
        if os.path.exists(path):
            with open(path) as f:
                hist = json.load(f)["history"]
            ax.plot([h["epoch"] for h in hist], [h["test_acc"] for h in hist], label=name)
    ax.axhline(results["teacher"]["acc"], color="k", ls="--", lw=1, label="unpruned teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['config']['model']} on {results['config']['dataset']}, "
                 f"{100 * results['pruned']['removed']:.1f}% of weights removed")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "accuracy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_sweep(cfg: RunConfig, targets: Sequence[float], out: str, *, resume: bool = False, quiet: bool = False) -> List[dict]:
    """Methods x pruning targets: one pretrain, one prune per target, every method per target.

    Writes ``out/sweep.csv`` and ``out/sweep.png`` (accuracy vs % of weights removed).
    """
    targets = [_check_fraction(t, "targets") for t in targets]
    if not targets:
        raise ValueError("targets is empty; pass e.g. --targets 0.5,0.7,0.9")
    cfg.target = max(targets)  # validated against the architecture in prepare()
    rank, world = dist_info()
    data, device = prepare(cfg, None, rank, world)
    check_out_dir(cfg, out)
    os.makedirs(out, exist_ok=True)
    log = RunLog(out, quiet)
    _write_json(os.path.join(out, "config.json"), {**cfg.to_dict(), "targets": list(targets)})
    teacher, teacher_acc = pretrain_stage(cfg, data, out, device, log, resume)
    n0 = zoo.count_params(teacher)
    rows = []
    for t in targets:
        tag = f"prune_{t:g}"
        pruned, report = prune_stage(cfg, teacher, data, out, device, log, target=t, tag=tag)
        removed = 1 - zoo.count_params(pruned) / n0
        for m in cfg.methods:
            try:
                r = recover(m, cfg, teacher, pruned, data, out, device, log, resume, tag=f"{tag}/{m}",
                            params_before=n0)
            except MissingAPIError as exc:
                log(f"[{tag}/{m}] not run: {exc}")
                continue
            rows.append({"target": t, "removed": removed, "method": m, "acc": r["acc"], "params": r["params"],
                         "macs": r["macs"], "teacher_acc": teacher_acc})
    if rank == 0:
        import csv

        with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        _write_json(os.path.join(out, "results.json"), {"teacher_acc": teacher_acc, "rows": rows})
        try:
            _plot_sweep(rows, teacher_acc, out)
        except Exception as exc:
            log(f"[plot] skipped: {exc}")
    return rows


def _plot_sweep(rows: List[dict], teacher_acc: float, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((100 * r["removed"], r["acc"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.axhline(teacher_acc, color="k", ls="--", lw=1, label="unpruned")
    ax.set_xlabel("% of weights removed")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "sweep.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
