"""The prune -> expand -> distill -> contract pipeline, stage by stage.

Stages write into one run directory::

    out/
      config.json          everything needed to rerun (``lopfast run --config out/config.json``)
      log.txt              one line per epoch and stage
      pretrain/model.pt    the unpruned teacher (+ ckpt.pt while training)
      prune/model.pt       the pruned model, prune/report.json
      <method>/model.pt    final compact model, <method>/result.json
      results.json         every number of the run; plots (*.png)

Every model.pt is a ``lopfast.save`` file (written atomically, loads with weights_only=True and
rebuilds the pruned layers by itself: ``lopfast.load(path)``). A stage whose output exists is
loaded, never recomputed; ``resume=True`` continues an interrupted stage from its last epoch
checkpoint.

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

Files of the pipeline: ``config.py`` (RunConfig, validation, device), this file (the stages),
``train.py`` (the training loop), ``data.py``, ``models.py``, ``report.py`` (tables, plots),
``experiments.py`` (the paper's experiments for ``lopfast reproduce``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from lopfast.checks import (
    InvalidArgument,
    InvalidArgumentType,
    TrainingDiverged,
    check_finite_module,
    nonfinite,
)
from lopfast.io import ModelFileError, load, save
from lopfast.layers import ExpandedConv2d, ExpandedLinear
from lopfast.pipeline import models as zoo
from lopfast.pipeline._api import MissingAPIError, require
from lopfast.pipeline.config import (  # noqa: F401  (re-exported: lopfast.pipeline.stages.RunConfig ...)
    DISTILL_METHODS,
    EXPANDED_METHODS,
    METHOD_PRESET,
    METHODS,
    RunConfig,
    _check_fraction,
    check_out_dir,
    resolve_device,
)
from lopfast.pipeline.data import load_data
from lopfast.pipeline.export import export_model  # noqa: F401  (the export code lives in pipeline/export.py)
from lopfast.pipeline.report import format_table, plot_curves, plot_sweep, summarize  # noqa: F401
from lopfast.pipeline.train import TrainConfig, dist_info, evaluate, load_checkpoint, preset, train
from lopfast.surgery import contract, expand

__all__ = ["METHODS", "RunConfig", "count_macs", "run_pipeline", "run_seeds", "run_sweep", "recover",
           "pretrain_stage", "prune_stage", "seed_list"]


def count_macs(model: nn.Module, example: torch.Tensor) -> Optional[int]:
    """Multiply-accumulates of one forward pass per image: the package's one counter,
    ``lopfast.prune.count_macs`` (torch-pruning's). None when torch-pruning is not installed
    (the GPU image may lack it): the MAC column then says so instead of failing the run.
    """
    try:
        from lopfast.prune.engine import count_macs as _count
        return _count(model, example[:1])
    except ImportError:
        return None


# --------------------------------------------------------------------------- helpers
def _save_stage_model(model: nn.Module, path: str, arch: str, arch_kwargs: dict, **meta) -> None:
    """Write a stage's model with ``lopfast.save``, atomically, from a CPU copy (loads on any machine).

    The file records the architecture name (``arch`` / ``arch_kwargs``), every layer's structure
    and plain attributes and the state dict with its metadata, so :func:`load_model_file`
    rebuilds pruned layers of any class (a timm ViT's head counts, LayerNorm shapes, timm's norm
    layers, raw ``nn.Parameter`` s) without pickle. ``meta``: extra plain metadata.
    """
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    save(model, path, arch=arch, arch_kwargs=arch_kwargs, **meta)


def load_model_file(path: str) -> nn.Module:
    """Load a model written by a pipeline stage or by ``lopfast.save`` (any model.pt of a run), on the CPU.

    Raises :class:`lopfast.ModelFileError` (a ValueError naming the path) for unreadable files,
    and for the stage files of lopfast versions before the stages used ``lopfast.save`` (an
    architecture name and a state dict only), which cannot rebuild every pruned layer.
    """
    try:
        return load(path, map_location="cpu")
    except ModelFileError:
        if _is_old_stage_file(path):
            stage = os.path.dirname(os.path.abspath(path))
            raise ModelFileError(
                f"{path}: a stage file of an older lopfast (architecture name + state dict only, which cannot "
                f"rebuild pruned layers whose attributes changed); delete the folder {stage} and rerun to "
                f"recompute that stage, or load it with the lopfast version that wrote it") from None
        raise


def _is_old_stage_file(path: str) -> bool:
    try:
        ck = load_checkpoint(path)
    except Exception:
        return False
    return isinstance(ck, dict) and "format" not in ck and "arch" in ck and "state_dict" in ck


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
                       amp=cfg.amp, compile=cfg.compile, capture=cfg.capture, seed=cfg.seed, gamma=gamma,
                       sp_reduction=cfg.sp_reduction, factor_weight_decay=cfg.factor_weight_decay,
                       factor_lr_scale=cfg.factor_lr_scale, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
                       label_smoothing=cfg.label_smoothing, nesterov=cfg.nesterov, optimizer=cfg.optimizer)


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
        from lopfast.pipeline.teachers import load_teacher

        # checked: digest of a portable teacher file, architecture, data set, classes; float32
        model, _ = load_teacher(cfg.teacher, arch=cfg.model, dataset=cfg.dataset, num_classes=data.num_classes)
        return model.to(device), evaluate(model.to(device), data.test, device, cfg.amp)["acc"]
    d = os.path.join(out, "pretrain")
    final = os.path.join(d, "model.pt")
    if os.path.exists(final):
        log(f"[pretrain] done already: loading {final}")
        model = load_model_file(final).to(device)
        return model, evaluate(model, data.test, device, cfg.amp)["acc"]
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = zoo.build_model(cfg.model, **arch_kwargs)
    if cfg.pretrain_epochs == 0:
        log("[pretrain] --pretrain-epochs 0: using the model as built (pretrained weights), no training")
        check_finite_module(model, f"the {cfg.model} as built (--pretrain-epochs 0)")
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
                tag: str = "prune", measure: bool = False):
    """Prune ``teacher`` with ``lopfast.prune`` to remove ``target`` of its parameters (or, with
    ``cfg.target_speedup``, until it is that much faster); returns (model, report). ``measure``:
    the report gets the latency of the original and the pruned model (``lopfast prune --measure``;
    ``run`` measures them with the final models at its end instead)."""
    target = cfg.target if target is None else target
    d = os.path.join(out, tag)
    final, rep_path = os.path.join(d, "model.pt"), os.path.join(d, "report.json")
    if os.path.exists(final) and os.path.exists(rep_path):
        log(f"[{tag}] done already: loading {final}")
        with open(rep_path) as f:
            return load_model_file(final).to(device), json.load(f)
    prune = require("prune", f"pruning (--prune-method {cfg.prune_method})")
    limit = zoo.max_removable_fraction(teacher)
    speedup = cfg.target_speedup if tag == "prune" else None  # a sweep prunes to its targets
    if speedup is None and target >= limit:
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
    kw = dict(method=cfg.prune_method, global_pruning=cfg.global_pruning, round_to=cfg.round_to)
    if speedup is not None:
        kw.update(budget="latency", target_speedup=speedup)
        opts.setdefault("batch", cfg.batch_size)  # the speed-up of the training batch's forward
    else:
        kw["target_removed"] = target
    if measure and dist_info()[0] == 0:
        kw["measure"] = {"train_batch": cfg.batch_size, "compile": cfg.measure_compile}
    pruned, report = prune(src, example, **kw, **opts)
    bad = nonfinite(list(pruned.named_parameters()) + list(pruned.named_buffers()))
    if bad:  # the pruning procedures that train (admm, slimming) can diverge
        raise TrainingDiverged(f"[{tag}] the pruned model holds NaN or infinite values (in {', '.join(bad[:5])}): "
                               f"pruning with {cfg.prune_method} diverged; lower its lr in --method-options",
                               stage=tag)
    report = _report_dict(report)
    report["seconds"] = time.time() - t0
    arch_kwargs = {"in_channels": data.in_channels, "num_classes": data.num_classes, **cfg.model_kwargs}
    if dist_info()[0] == 0:
        _save_stage_model(pruned, final, cfg.model, arch_kwargs)
        _write_json(rep_path, report)
    log(f"[{tag}] {cfg.prune_method}: {report.get('params_before')} -> {report.get('params_after')} params "
        f"({100 * _removed(report):.1f}% removed)")
    extra = report.get("extra") or {}
    if "achieved_speedup" in extra:
        log(f"[{tag}] latency budget: {extra['achieved_speedup']:.2f}x faster measured (asked "
            f"{extra['target_speedup']:g}x) at batch {extra['netadapt']['batch']} on {extra['netadapt']['device']}")
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
        student = expand(base, cfg.rate, linear=cfg.linear, linear_rate=cfg.linear_rate,
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
        final = contract(student)
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
    _save_stage_model(model, path, cfg.model, arch_kwargs, dataset=cfg.dataset, **meta)


# --------------------------------------------------------------------------- the whole run
def prepare(cfg: RunConfig, device=None, rank: int = 0, world: int = 1):
    """Validate ``cfg`` and load its data (raises before any training)."""
    cfg.validate()
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    if device.type == "cpu":
        # 8x8 digits batches are far too small to split across threads: extra threads only
        # add synchronisation, and on a busy machine spinning OpenMP workers cost 5-10x
        threads = cfg.threads if cfg.threads is not None else (1 if cfg.dataset == "digits" else None)
        if threads is not None:
            torch.set_num_threads(threads)
    data = load_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size, device=device, seed=cfg.seed,
                     train_subset=cfg.train_subset, test_subset=cfg.test_subset, download=cfg.download,
                     workers=cfg.workers, rank=rank, world_size=world, channels_last=device.type == "cuda",
                     val_size=cfg.val_size, val_seed=cfg.val_seed)
    _warn_short_subsets(cfg, data)
    if cfg.eval_split == "val":
        # every accuracy of the run (teacher, pruned, each method, per epoch) on the held-out split
        data = dataclasses.replace(data, test=data.val, extra={**data.extra, "eval_split": "val"})
    # model-dependent checks, on a meta-free CPU build (cheap for the zoo)
    try:
        probe = zoo.build_model(cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
                                **cfg.model_kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # a builder's own checks, or a tensor of size -1
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not cfg.model_kwargs:  # e.g. tv:<a name torchvision does not have>
            raise ValueError(f"--model {cfg.model} cannot be built: {why}") from None
        raise InvalidArgument("model_kwargs", cfg.model_kwargs, f"arguments {cfg.model} accepts", why) from None
    if cfg.teacher:
        check_teacher(cfg, data, zoo.count_params(probe))
    limit = zoo.max_removable_fraction(probe)
    if cfg.target >= limit:
        raise ValueError(f"target={cfg.target} is above what {cfg.model} can lose by channel pruning "
                         f"(at most {limit:.4f}); choose a smaller --target")
    if cfg.sp_layers is not None:
        _check_layers(cfg.sp_layers, probe, probe)  # pruning and expansion keep module paths
    return data, device


def _warn_short_subsets(cfg: RunConfig, data) -> None:
    """Settings that cannot do what they say, said (they are not errors: the run is still sound)."""
    for name, asked, loader in (("train_subset", cfg.train_subset, data.train),
                                ("test_subset", cfg.test_subset, data.test)):
        have = getattr(loader, "num_samples", None)
        if asked is not None and isinstance(have, int) and asked > have:
            warnings.warn(f"{name}={asked} is more than the {have} images {cfg.dataset} has there: using all {have}",
                          stacklevel=3)
    have = getattr(data.train, "num_samples", None)
    if isinstance(have, int) and cfg.batch_size > have:
        warnings.warn(f"batch_size={cfg.batch_size} is more than the {have} training images: one step per epoch",
                      stacklevel=3)
    if cfg.dataset == "digits" and cfg.data_dir is not None:
        warnings.warn(f"data_dir={cfg.data_dir!r} is not used: the digits data set is embedded", stacklevel=3)


def check_teacher(cfg: RunConfig, data, built_params: Optional[int] = None) -> None:
    """Refuse a ``cfg.teacher`` file that is not what the run records: another architecture or
    builder arguments than ``cfg.model`` / ``model_kwargs``, another number of classes or input
    channels than the data, NaN / inf weights (raised by the load), or a model that does not run
    on the data. Called by :func:`prepare`, before any stage starts."""
    from lopfast.io import read

    path = cfg.teacher
    meta = read(path, map_location="cpu")["metadata"]
    arch, kw = meta.get("arch"), meta.get("arch_kwargs")
    if isinstance(arch, str) and arch != cfg.model:
        raise ValueError(f"--teacher {path} holds a {arch} but --model is {cfg.model}: the run would train one and "
                         f"record the other; pass --model {arch}" + (f" (its --model-kwargs: {_user_kwargs(kw)})"
                                                                     if _user_kwargs(kw) else ""))
    want = {"in_channels": data.in_channels, "num_classes": data.num_classes, **cfg.model_kwargs}
    if isinstance(kw, dict):
        for key, what in (("num_classes", "classes"), ("in_channels", "input channels")):
            if key in kw and kw[key] != want[key]:
                raise ValueError(f"--teacher {path} has {kw[key]} {what} but --dataset {cfg.dataset} has {want[key]}: "
                                 "pass a teacher trained on this data set")
        if _user_kwargs(kw) != _user_kwargs(want):
            raise ValueError(f"--teacher {path} was built with model arguments {_user_kwargs(kw)} but --model-kwargs "
                             f"gives {_user_kwargs(want)}: pass --model-kwargs '{json.dumps(_user_kwargs(kw))}'")
    from lopfast.pipeline.teachers import load_teacher

    # float32 whatever the file stores (portable teacher files hold float16), its digest checked;
    # lopfast.load refuses NaN / inf weights
    teacher, _ = load_teacher(path, arch=cfg.model, dataset=cfg.dataset, num_classes=data.num_classes)
    from lopfast.surgery import expanded_modules

    if expanded_modules(teacher):
        raise ValueError(f"--teacher {path} holds an expanded model (ExpandedConv2d/ExpandedLinear layers): pass "
                         "the plain unpruned model (lopfast.contract(model) gives it back from an expanded one)")
    n = zoo.count_params(teacher)
    if built_params is not None and n < built_params:
        warnings.warn(f"--teacher {path} has {n:,} parameters, fewer than the {built_params:,} of a freshly built "
                      f"{cfg.model}: is it a pruned model? It is pruned again and distilled from as it is",
                      stacklevel=3)
    x = data.example_inputs(2, "cpu")
    try:
        with torch.no_grad():
            out = teacher.eval()(x)
    except Exception as exc:
        raise ValueError(f"--teacher {path} does not run on {cfg.dataset} inputs of shape {tuple(x.shape[1:])}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == data.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"--teacher {path} gives outputs of shape {shape} on {cfg.dataset}, which has "
                         f"{data.num_classes} classes: pass a teacher trained on this data set")


def _user_kwargs(kw) -> dict:
    return {k: v for k, v in (kw or {}).items() if k not in ("in_channels", "num_classes")}


def run_pipeline(cfg: RunConfig, out: str, *, resume: bool = False, quiet: bool = False, data=None,
                 device=None) -> dict:
    """pretrain -> prune -> recover with every ``cfg.methods`` -> contract/verify/evaluate/save.

    Returns (and writes to ``out/results.json``) the teacher / pruned accuracies and one entry per method.
    """
    _check_cfg(cfg)
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
    if cfg.measure and rank == 0:
        results["latency"] = _latency(cfg, teacher, pruned, results, out, data, device, log)
    results["seconds"] = time.time() - t0
    _write_json(os.path.join(out, "results.json"), results)
    if rank == 0:
        try:
            plot_curves(results, out)
        except Exception as exc:  # a missing/broken matplotlib must not lose the results
            log(f"[plot] skipped: {exc}")
    return results


def _latency(cfg: RunConfig, teacher: nn.Module, pruned: nn.Module, results: dict, out: str, data, device, log):
    """Latency/throughput of the original, the pruned and every contracted final model on ``device``
    (batch 1 and the training batch; lopfast.prune.latency). A failure is logged, never fatal."""
    try:
        from lopfast.prune.latency import format_latency, measure_latency

        models = {"original": teacher, "pruned": pruned}
        macs = {"original": results["teacher"].get("macs"), "pruned": results["pruned"].get("macs")}
        for method, r in results["methods"].items():
            path = os.path.join(out, method, "model.pt")
            if method in EXPANDED_METHODS and "error" not in r and os.path.exists(path):
                models[f"final ({method})"] = load_model_file(path).to(device)
                macs[f"final ({method})"] = r.get("macs")
        lat = measure_latency(models, data.example_inputs(1, device), train_batch=cfg.batch_size,
                              compile=cfg.measure_compile, macs=macs)
        log(format_latency(lat))
        return lat
    except Exception as exc:  # timing is a report: it must not lose the trained results
        log(f"[latency] not measured: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def seed_list(seed: int, seeds: int) -> List[int]:
    """The seeds of a multi-seed run: ``seed``, ``seed + 1``, ... (``seeds`` of them)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    return [seed + i for i in range(seeds)]


def _write_csv(path: str, rows: List[dict]) -> None:
    import csv

    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def run_seeds(cfg: RunConfig, out: str, seeds: int = 1, *, resume: bool = False, quiet: bool = False,
              share_teacher: bool = False, data=None, device=None) -> dict:
    """:func:`run_pipeline` once per seed (``cfg.seed``, ``cfg.seed + 1`` ...) in ``out/seed<s>/``.

    ``share_teacher``: the first seed's teacher (and so its pruned model) serves every seed,
    which then varies only the recovery (data order, augmentation, expansion init): cheaper,
    and it isolates the spread of recovery from that of pretraining. Returns ``{"runs": [...],
    "rows": [one per method and seed], "seeds": [...]}`` and writes ``out/seeds.csv``.
    With ``seeds == 1`` it is exactly :func:`run_pipeline` on ``out``.
    """
    _check_cfg(cfg)
    ss = seed_list(cfg.seed, seeds)
    if seeds == 1:
        runs = [run_pipeline(cfg, out, resume=resume, quiet=quiet, data=data, device=device)]
    else:
        runs = []
        first_teacher = None
        for s in ss:
            scfg = dataclasses.replace(cfg, seed=s, methods=list(cfg.methods))
            if share_teacher and first_teacher is not None and scfg.teacher is None:
                scfg.teacher = first_teacher
            sdir = os.path.join(out, f"seed{s}")
            runs.append(run_pipeline(scfg, sdir, resume=resume or os.path.isdir(sdir), quiet=quiet))
            if first_teacher is None and scfg.teacher is None:
                first_teacher = os.path.join(sdir, "pretrain", "model.pt")
    rows = []
    for s, res in zip(ss, runs):
        for m, r in res["methods"].items():
            if "error" in r:
                continue
            rows.append({"target": cfg.target, "removed": r.get("removed"), "method": m, "seed": s, "acc": r["acc"],
                         "params": r.get("params"), "teacher_acc": res["teacher"]["acc"]})
    if dist_info()[0] == 0 and seeds > 1 and rows:
        _write_csv(os.path.join(out, "seeds.csv"), rows)
    return {"runs": runs, "rows": rows, "seeds": ss}


def run_sweep(cfg: RunConfig, targets: Sequence[float], out: str, *, resume: bool = False, quiet: bool = False,
              seeds: int = 1) -> List[dict]:
    """Methods x pruning targets (x seeds): one pretrain per seed, one prune per target, every method.

    Writes ``out/sweep.csv`` (one row per target, method and seed) and ``out/sweep.png``
    (accuracy vs % of weights removed, error bars over seeds); seed ``s`` runs in
    ``out/seed<s>/`` when ``seeds > 1``.
    """
    _check_cfg(cfg)
    targets = check_targets(targets)
    if seeds != 1:
        rows = []
        for s in seed_list(cfg.seed, seeds):
            scfg = dataclasses.replace(cfg, seed=s, methods=list(cfg.methods))
            sdir = os.path.join(out, f"seed{s}")
            rows += _sweep_one(scfg, targets, sdir, resume=resume or os.path.isdir(sdir), quiet=quiet)
        if dist_info()[0] == 0 and rows:
            _write_csv(os.path.join(out, "sweep.csv"), rows)
            try:
                plot_sweep(rows, os.path.join(out, "sweep.png"))
            except Exception as exc:  # noqa: BLE001  (a broken matplotlib must not lose the results)
                print(f"[plot] skipped: {exc}")
        return rows
    return _sweep_one(cfg, targets, out, resume=resume, quiet=quiet)


def check_targets(targets) -> List[float]:
    """The pruning targets of a sweep: a non-empty list of distinct fractions in (0, 1)."""
    if isinstance(targets, (int, float)) and not isinstance(targets, bool):
        targets = [targets]
    if not isinstance(targets, (list, tuple)):
        raise InvalidArgumentType("targets", targets, "a list of fractions, e.g. [0.5, 0.7, 0.9]")
    targets = [_check_fraction(t, "targets") for t in targets]
    if not targets:
        raise InvalidArgument("targets", targets, "a non-empty list of fractions, e.g. 0.5,0.7,0.9")
    if len(set(targets)) != len(targets):
        raise InvalidArgument("targets", targets, "distinct fractions", "each target is one prune and one row")
    return targets


def _check_cfg(cfg) -> None:
    if not isinstance(cfg, RunConfig):
        raise InvalidArgumentType("cfg", cfg, "a RunConfig", "RunConfig.from_dict(d) builds one from a dict")


def _sweep_one(cfg: RunConfig, targets: Sequence[float], out: str, *, resume: bool, quiet: bool) -> List[dict]:
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
            rows.append({"target": t, "removed": removed, "method": m, "seed": cfg.seed, "acc": r["acc"],
                         "params": r["params"], "macs": r["macs"], "teacher_acc": teacher_acc})
    if rank == 0 and rows:
        _write_csv(os.path.join(out, "sweep.csv"), rows)
        _write_json(os.path.join(out, "results.json"), {"teacher_acc": teacher_acc, "rows": rows})
        try:
            plot_sweep(rows, os.path.join(out, "sweep.png"), teacher_acc=teacher_acc)
        except Exception as exc:
            log(f"[plot] skipped: {exc}")
    return rows


