"""The stages of a pipeline run: functions from a model (with the data and the run's settings)
to a model and its metrics. They touch no paths: the runner (``lopfast.pipeline.runner``) gives
a training stage the checkpoint file it may write, and saves, loads and skips what they return.

* :func:`pretrain`: the unpruned model trained from scratch (the scratch preset), or as built.
* :func:`prune`: ``lopfast.prune`` to a fraction of the parameters, or to a latency budget.
* :func:`recover`: one recovery method of the registry (``lopfast.pipeline.methods.RECOVERY``):
  its student trained, contracted back when expanded, evaluated.

Recovery methods (paper Sec. 3.2): ``lop`` (expand, fine-tune with SP distillation, contract),
``lop-nokd`` (without distillation), ``ft`` (fine-tune), ``scratch``, ``expandnets`` (fresh
expanded layers from scratch, contracted) and ``distill`` (a fresh pruned model distilled);
``docs/pipeline.md`` tells how to add one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lopfast.checks import TrainingDiverged, check_choice, check_finite_module, nonfinite
from lopfast.pipeline import models as zoo
from lopfast.pipeline.config import RunConfig
from lopfast.pipeline.methods import METHODS, RECOVERY
from lopfast.pipeline.train import dist_info, evaluate, stage_config, train
from lopfast.prune.api import prune as prune_channels
from lopfast.prune.compose import needs_data, resolve
from lopfast.surgery import contract

__all__ = ["METHODS", "arch_kwargs", "count_macs", "pretrain", "prune", "recover", "verify_contraction"]


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


def arch_kwargs(cfg: RunConfig, data) -> dict:
    """The builder arguments of the run's model on ``data`` (what a model file records to rebuild it)."""
    return {"in_channels": data.in_channels, "num_classes": data.num_classes, **cfg.model_kwargs}


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


# --------------------------------------------------------------------------- pretrain
def pretrain(cfg: RunConfig, data, device, log, *, checkpoint: Optional[str] = None,
             resume: bool = False) -> Tuple[nn.Module, dict]:
    """Train the unpruned model from scratch (the scratch preset, ``cfg.pretrain_epochs`` /
    ``cfg.pretrain_lr``), or take it as built (``pretrain_epochs=0``); returns (model,
    ``{"acc", "history"}``)."""
    torch.manual_seed(cfg.seed)
    model = zoo.build_model(cfg.model, **arch_kwargs(cfg, data))
    if cfg.pretrain_epochs == 0:
        log("[pretrain] --pretrain-epochs 0: using the model as built (pretrained weights), no training")
        check_finite_module(model, f"the {cfg.model} as built (--pretrain-epochs 0)")
        model.to(device)
        return model, {"acc": evaluate(model, data.test, device, cfg.amp)["acc"], "history": []}
    tc = stage_config(cfg, "scratch", cfg.pretrain_epochs, cfg.pretrain_lr)
    res = train(model, data, tc, device=device, checkpoint=checkpoint, resume=resume, desc="pretrain", log=log)
    return model, {"acc": res["final"]["acc"], "history": res["history"]}


# --------------------------------------------------------------------------- prune
def prune(cfg: RunConfig, teacher: nn.Module, data, device, log, *, target: Optional[float] = None,
          speedup: Optional[float] = None, measure: bool = False, tag: str = "prune") -> Tuple[nn.Module, dict]:
    """Prune a copy of ``teacher`` with ``lopfast.prune`` to remove ``target`` of its parameters
    (default ``cfg.target``), or, with ``speedup``, until it runs that much faster; returns
    (pruned model, report dict). ``measure``: the report gets the latency of the original and the
    pruned model. ``tag`` names the stage in logs and errors."""
    target = cfg.target if target is None else target
    limit = zoo.max_removable_fraction(teacher)
    if speedup is None and target >= limit:
        raise ValueError(f"target={target} is above what {cfg.model} can lose by channel pruning "
                         f"(at most {limit:.4f}); choose a smaller --target")
    example = data.example_inputs(2, device)
    opts = dict(cfg.prune_options)  # may hold criterion / allocation / procedure and the parts' options
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
    pruned, report = prune_channels(src, example, **kw, **opts)
    bad = nonfinite(list(pruned.named_parameters()) + list(pruned.named_buffers()))
    if bad:  # the pruning procedures that train (admm, slimming) can diverge
        raise TrainingDiverged(f"[{tag}] the pruned model holds NaN or infinite values (in {', '.join(bad[:5])}): "
                               f"pruning with {cfg.prune_method} diverged; lower its lr in --method-options",
                               stage=tag)
    report = _report_dict(report)
    report["seconds"] = time.time() - t0
    _log_pruned(log, tag, cfg, report)
    return pruned.to(device), report


def _log_pruned(log, tag: str, cfg: RunConfig, report: dict) -> None:
    log(f"[{tag}] {cfg.prune_method}: {report.get('params_before')} -> {report.get('params_after')} params "
        f"({100 * _removed(report):.1f}% removed)")
    extra = report.get("extra") or {}
    if "achieved_speedup" in extra:
        log(f"[{tag}] latency budget: {extra['achieved_speedup']:.2f}x faster measured (asked "
            f"{extra['target_speedup']:g}x) at batch {extra['netadapt']['batch']} on {extra['netadapt']['device']}")


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


# --------------------------------------------------------------------------- recover
def recover(method: str, cfg: RunConfig, teacher: nn.Module, pruned: nn.Module, data, device, log, *,
            checkpoint: Optional[str] = None, resume: bool = False, tag: Optional[str] = None,
            params_before: Optional[int] = None) -> Tuple[nn.Module, dict]:
    """Recover ``pruned`` with ``method`` (an entry of ``lopfast.pipeline.methods.RECOVERY``):
    build its student, train it (distilling from ``teacher`` when the method does), contract it
    back when it is expanded; returns (the compact final model, its metrics)."""
    r = RECOVERY[check_choice(method, "method", METHODS)]
    tag = tag or method
    epochs, lr = (cfg.epochs, cfg.lr) if r.schedule == "finetune" else (cfg.scratch_epochs, cfg.scratch_lr)
    gamma = cfg.gamma if r.distill else 0.0
    tc = stage_config(cfg, r.schedule, epochs, lr, gamma)
    student = r.student(copy.deepcopy(pruned).cpu(), cfg)
    sp_layers = None
    if r.distill:
        sp_layers = cfg.sp_layers if cfg.sp_layers is not None or r.sp_layers is None else r.sp_layers(student)
        if sp_layers is not None:
            _check_layers(sp_layers, teacher, student)
    res = train(student, data, tc, device=device, teacher=teacher if r.distill else None, sp_layers=sp_layers,
                checkpoint=checkpoint, resume=resume, desc=tag, log=log)
    expanded_params = zoo.count_params(student)
    final, max_diff = student, None
    if r.contract:
        final = contract(student)
        max_diff = verify_contraction(student, final, data, device)
        if not max_diff < 1e-3:
            raise RuntimeError(f"[{tag}] contracted model disagrees with the expanded one (rel. diff {max_diff:.2e})")
        log(f"[{tag}] contracted: logits agree to {max_diff:.1e} (relative) on test inputs")
    ev = evaluate(final, data.test, device, cfg.amp)
    params = zoo.count_params(final)
    result = {
        "method": method, "acc": ev["acc"], "loss": ev["loss"], "params": params,
        "params_trained": expanded_params, "macs": count_macs(final, data.example_inputs(1, device)),
        "removed": (1 - params / params_before) if params_before else None,
        "contract_max_rel_diff": max_diff, "epochs": tc.epochs, "lr": tc.lr, "gamma": gamma,
        "train_seconds": res["seconds"], "history": res["history"],
    }
    return final, result


def _check_layers(names: Sequence[str], teacher: nn.Module, student: nn.Module) -> None:
    t = dict(teacher.named_modules())
    s = dict(student.named_modules())
    bad = [n for n in names if n not in t or n not in s]
    if bad:
        raise ValueError(f"sp_layers {bad} are not modules of the model; "
                         f"valid names include {[n for n in s if n in t and n][:8]} ...")


def check_layers(names: Optional[List[str]], model: nn.Module) -> None:
    """Every name of ``sp_layers`` a module of ``model`` (pruning and expansion keep module paths)."""
    if names is not None:
        _check_layers(names, model, model)
