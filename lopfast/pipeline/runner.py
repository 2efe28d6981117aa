"""The one runner behind every command: the run folder, the stages in order, resume.

* :class:`RunFolder` owns a run's directory: its paths, ``log.txt``, and every file written in
  it, through one atomic writer (``lopfast.files``), by rank 0 only.
* :class:`Runner` runs the stages (``lopfast.pipeline.stages``) of one configuration in one
  folder: :meth:`~Runner.teacher`, :meth:`~Runner.pruned`, :meth:`~Runner.recovered`. A stage
  whose files exist is loaded, never recomputed; one that was interrupted continues from its
  epoch checkpoint (``resume``).
* The commands are short functions over it: :func:`run_pretrain` (``lopfast pretrain``),
  :func:`run_prune` (``lopfast prune``), :func:`run_pipeline` (``lopfast run``), :func:`run_seeds`
  (``--seeds N``, ``lopfast demo``), :func:`run_sweep` (``lopfast sweep``); ``lopfast reproduce``
  runs its tasks (``lopfast.pipeline.experiments``) through the same Runner.

A run directory::

    out/
      config.json          everything needed to rerun (``lopfast run --config out/config.json``)
      log.txt              one line per epoch and stage
      pretrain/model.pt    the unpruned teacher (+ ckpt.pt while training, history.json)
      prune/model.pt       the pruned model, prune/report.json
      <method>/model.pt    final compact model, <method>/result.json (+ ckpt.pt)
      results.json         every number of the run; plots (*.png)

Every model.pt is a ``lopfast.save`` file (loads with weights_only=True and rebuilds the pruned
layers by itself: ``lopfast.load(path)``). ``docs/pipeline.md`` describes it all.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lopfast.checks import InvalidArgument, InvalidArgumentType
from lopfast.files import write_json, write_text
from lopfast.io import ModelFileError, load, read_payload, save
from lopfast.pipeline import models as zoo
from lopfast.pipeline import stages
from lopfast.pipeline.checkpoint import load_checkpoint
from lopfast.pipeline.config import RunConfig, check_fraction, resolve_device
from lopfast.pipeline.data import load_data
from lopfast.pipeline.export import export_model
from lopfast.pipeline.methods import RECOVERY
from lopfast.pipeline.report import plot_curves, plot_sweep
from lopfast.pipeline.settings import Settings, choice, custom, integer, optional, setting
from lopfast.pipeline.train import dist_info, evaluate

__all__ = ["Plan", "RunFolder", "RunLog", "Runner", "check_out_dir", "check_targets", "load_model_file", "prepare",
           "run_pipeline", "run_prune", "run_pretrain", "run_seeds", "run_sweep", "seed_list"]


# --------------------------------------------------------------------------- the run folder
class RunLog:
    """Appends to ``<folder>/log.txt`` and prints (rank 0 only)."""

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


class RunFolder:
    """A run's directory: paths relative to it, its log, and the one writer of its files (rank 0,
    atomic). ``log_dir``: where ``log.txt`` goes (default ``out``; a reproduce task logs per cell)."""

    def __init__(self, out: str, quiet: bool = False, log_dir: Optional[str] = None) -> None:
        self.out = out
        self.rank = dist_info()[0]
        os.makedirs(log_dir or out, exist_ok=True)
        self.log = RunLog(log_dir or out, quiet)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def exists(self, *paths: str) -> bool:
        """Whether every one of ``paths`` (relative) exists: a stage's outputs, so it is finished."""
        return all(os.path.exists(self.path(p)) for p in paths)

    def read_json(self, rel: str):
        with open(self.path(rel)) as f:
            return json.load(f)

    def write_json(self, rel: str, obj) -> None:
        if self.rank == 0:
            write_json(self.path(rel), obj, make_dirs=True)

    def write_csv(self, rel: str, rows: List[dict]) -> None:
        if self.rank == 0 and rows:
            write_text(self.path(rel), csv_text(rows), make_dirs=True)

    def save_model(self, rel: str, model: nn.Module, cfg: RunConfig, data, **meta) -> None:
        """A stage's model as a ``lopfast.save`` file (from a CPU copy: it loads on any machine)."""
        if self.rank == 0:
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            save_model_file(model, self.path(rel), cfg.model, stages.arch_kwargs(cfg, data), **meta)

    def load_model(self, rel: str) -> nn.Module:
        return load_model_file(self.path(rel))


def csv_text(rows: List[dict]) -> str:
    """``rows`` as CSV, the columns in the order they first appear."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def save_model_file(model: nn.Module, path: str, arch: str, arch_kwargs: dict, **meta) -> None:
    """Write a stage's model with ``lopfast.save``, atomically, from a CPU copy.

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
        ck = read_payload(path)
    except Exception:
        return False
    return isinstance(ck, dict) and "format" not in ck and "arch" in ck and "state_dict" in ck


# --------------------------------------------------------------------------- how a command runs
def check_targets(targets, name: str = "targets") -> List[float]:
    """The pruning targets of a sweep: a non-empty list of distinct fractions in (0, 1)."""
    if isinstance(targets, (int, float)) and not isinstance(targets, bool):
        targets = [targets]
    if not isinstance(targets, (list, tuple)):
        raise InvalidArgumentType(name, targets, "a list of fractions, e.g. [0.5, 0.7, 0.9]")
    targets = [check_fraction(t, name) for t in targets]
    if not targets:
        raise InvalidArgument(name, targets, "a non-empty list of fractions, e.g. 0.5,0.7,0.9")
    if len(set(targets)) != len(targets):
        raise InvalidArgument(name, targets, "distinct fractions", "each target is one prune and one row")
    return targets


TEACHERS = ("per-seed", "shared")


@dataclass(kw_only=True)
class Plan(Settings):
    """How a command runs a :class:`~lopfast.pipeline.config.RunConfig`: how many seeds, which
    pruning targets (``lopfast sweep``), whose teachers. Declared like the run's settings: each
    is a flag and a key of a ``--config`` file."""

    seeds: int = setting(1, check=integer(min=1), group="recovery",
                         help="run N seeds (--seed, --seed+1, ...) in out/seed<s>/; tables show mean ± std and n")
    teachers: str = setting("per-seed", check=choice(*TEACHERS), group="recovery",
                            help="with --seeds: per-seed (each seed pretrains and prunes its own teacher: the spread "
                                 "covers them) or shared (the first seed's teacher, and so its pruned model, serves "
                                 "every seed: the spread covers the recovery only)")
    targets: Optional[List[float]] = setting(None, check=optional(custom(check_targets, "distinct fractions in "
                                                                                       "(0, 1)")),
                                             group="recovery", commands=("sweep",), default_text="0.5,0.7,0.9",
                                             help="comma list of fractions to remove: one prune each")


def seed_list(seed: int, seeds: int) -> List[int]:
    """The seeds of a multi-seed run: ``seed``, ``seed + 1``, ... (``seeds`` of them)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    return [seed + i for i in range(seeds)]


# --------------------------------------------------------------------------- the folder before a run
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


# --------------------------------------------------------------------------- data and the checks that need it
def prepare(cfg: RunConfig, device=None, rank: int = 0, world: int = 1):
    """Validate ``cfg``, load its data and check what depends on it (the model builds with these
    arguments, the teacher file fits, the target is reachable, ``sp_layers`` exist): raises
    before any training. Returns (data, device)."""
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
    probe = _probe_model(cfg, data)  # model-dependent checks, on a CPU build (cheap for the zoo)
    if cfg.teacher:
        check_teacher(cfg, data, zoo.count_params(probe))
    limit = zoo.max_removable_fraction(probe)
    if cfg.target >= limit:
        raise ValueError(f"target={cfg.target} is above what {cfg.model} can lose by channel pruning "
                         f"(at most {limit:.4f}); choose a smaller --target")
    stages.check_layers(cfg.sp_layers, probe)
    return data, device


def _probe_model(cfg: RunConfig, data) -> nn.Module:
    try:
        return zoo.build_model(cfg.model, **stages.arch_kwargs(cfg, data))
    except (TypeError, ValueError, RuntimeError) as exc:  # a builder's own checks, or a tensor of size -1
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not cfg.model_kwargs:  # e.g. tv:<a name torchvision does not have>
            raise ValueError(f"--model {cfg.model} cannot be built: {why}") from None
        raise InvalidArgument("model_kwargs", cfg.model_kwargs, f"arguments {cfg.model} accepts", why) from None


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


def teacher_from_file(cfg: RunConfig, data, device) -> Tuple[nn.Module, float]:
    """``cfg.teacher`` loaded (checked: the digest of a portable teacher file, its architecture,
    data set and classes; float32) onto ``device``, with its accuracy on the run's test split."""
    from lopfast.pipeline.teachers import load_teacher

    model, _ = load_teacher(cfg.teacher, arch=cfg.model, dataset=cfg.dataset, num_classes=data.num_classes)
    return model.to(device), evaluate(model.to(device), data.test, device, cfg.amp)["acc"]


# --------------------------------------------------------------------------- the runner
class Runner:
    """The stages of one configuration in one :class:`RunFolder`: each stage's outputs are loaded
    when they exist, else computed (continuing from its epoch checkpoint when ``resume``) and saved.

    ``Runner.open(cfg, out)`` checks the folder, loads the data and writes ``config.json``; a
    reproduce task builds one on its own folder and data.
    """

    def __init__(self, cfg: RunConfig, folder: RunFolder, data, device, resume: bool = False) -> None:
        self.cfg, self.folder, self.data, self.device, self.resume = cfg, folder, data, device, resume
        self.log = folder.log

    @classmethod
    def open(cls, cfg: RunConfig, out: str, *, resume: bool = False, quiet: bool = False, data=None, device=None,
             record: Optional[dict] = None) -> "Runner":
        """Check ``cfg`` and the folder ``out`` (a finished run of other settings is refused), load
        the data (unless given), write ``config.json`` (``cfg`` plus ``record``)."""
        if not isinstance(cfg, RunConfig):
            raise InvalidArgumentType("cfg", cfg, "a RunConfig", "RunConfig.from_dict(d) builds one from a dict")
        if data is None:
            data, device = prepare(cfg, device, *dist_info())
        check_out_dir(cfg, out)
        folder = RunFolder(out, quiet)
        folder.write_json("config.json", {**cfg.to_dict(), **(record or {})})
        return cls(cfg, folder, data, device, resume)

    def teacher(self) -> Tuple[nn.Module, float]:
        """The unpruned model and its accuracy: ``cfg.teacher`` (a file), ``pretrain/model.pt`` when
        it exists, else pretrained here (and saved)."""
        cfg, folder, data, device = self.cfg, self.folder, self.data, self.device
        if cfg.teacher:
            return teacher_from_file(cfg, data, device)
        if folder.exists("pretrain/model.pt"):
            self.log(f"[pretrain] done already: loading {folder.path('pretrain', 'model.pt')}")
            model = folder.load_model("pretrain/model.pt").to(device)
            return model, evaluate(model, data.test, device, cfg.amp)["acc"]
        model, res = stages.pretrain(cfg, data, device, self.log, checkpoint=folder.path("pretrain", "ckpt.pt"),
                                     resume=self.resume)
        folder.save_model("pretrain/model.pt", model, cfg, data)
        folder.write_json("pretrain/history.json", res["history"])
        return model, res["acc"]

    def pruned(self, teacher: nn.Module, *, target: Optional[float] = None, speedup: Optional[float] = None,
               tag: str = "prune", measure: bool = False) -> Tuple[nn.Module, dict]:
        """``teacher`` pruned (:func:`lopfast.pipeline.stages.prune`) and its report, from
        ``<tag>/model.pt`` and ``<tag>/report.json`` when both exist."""
        model_file, report_file = f"{tag}/model.pt", f"{tag}/report.json"
        if self.folder.exists(model_file, report_file):
            self.log(f"[{tag}] done already: loading {self.folder.path(model_file)}")
            return self.folder.load_model(model_file).to(self.device), self.folder.read_json(report_file)
        pruned, report = stages.prune(self.cfg, teacher, self.data, self.device, self.log, target=target,
                                      speedup=speedup, measure=measure, tag=tag)
        self.folder.save_model(model_file, pruned, self.cfg, self.data)
        self.folder.write_json(report_file, report)
        return pruned, report

    def recovered(self, method: str, teacher: nn.Module, pruned: nn.Module, *, tag: Optional[str] = None,
                  params_before: Optional[int] = None) -> dict:
        """``pruned`` recovered with ``method`` (:func:`lopfast.pipeline.stages.recover`): its metrics,
        from ``<tag>/result.json`` when it exists; else trained, its compact model saved (and
        exported, ``cfg.export``) as ``<tag>/model.pt``."""
        cfg, folder, tag = self.cfg, self.folder, tag or method
        if folder.exists(f"{tag}/result.json"):
            self.log(f"[{tag}] done already: {folder.path(tag, 'result.json')}")
            return folder.read_json(f"{tag}/result.json")
        final, result = stages.recover(method, cfg, teacher, pruned, self.data, self.device, self.log,
                                       checkpoint=folder.path(tag, "ckpt.pt"), resume=self.resume, tag=tag,
                                       params_before=params_before)
        folder.save_model(f"{tag}/model.pt", final, cfg, self.data, dataset=cfg.dataset, method=method,
                          acc=result["acc"])
        if folder.rank == 0:
            for fmt in cfg.export:
                try:
                    export_model(final, folder.path(tag, "model"), fmt, self.data.example_inputs(1, self.device),
                                 self.log)
                except Exception as exc:  # an exporter failure must not lose the trained result
                    self.log(f"[export] {fmt} export failed: {type(exc).__name__}: {exc}")
        folder.write_json(f"{tag}/result.json", result)
        self.log(f"[{tag}] final accuracy {result['acc']:.2f}% with {result['params']} params")
        return result

    def latency(self, teacher: nn.Module, pruned: nn.Module, results: dict) -> dict:
        """Latency/throughput of the original, the pruned and every contracted final model on the
        run's device (batch 1 and the training batch; lopfast.prune.latency). A failure is logged,
        never fatal: timing is a report, it must not lose the trained results."""
        try:
            from lopfast.prune.latency import format_latency, measure_latency

            models = {"original": teacher, "pruned": pruned}
            macs = {"original": results["teacher"].get("macs"), "pruned": results["pruned"].get("macs")}
            for method, r in results["methods"].items():
                if RECOVERY[method].contract and "error" not in r and self.folder.exists(f"{method}/model.pt"):
                    models[f"final ({method})"] = self.folder.load_model(f"{method}/model.pt").to(self.device)
                    macs[f"final ({method})"] = r.get("macs")
            lat = measure_latency(models, self.data.example_inputs(1, self.device), train_batch=self.cfg.batch_size,
                                  compile=self.cfg.measure_compile, macs=macs)
            self.log(format_latency(lat))
            return lat
        except Exception as exc:
            self.log(f"[latency] not measured: {type(exc).__name__}: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}


def _plot(fn, *args, log=print, **kw) -> None:
    if dist_info()[0] != 0:
        return
    try:
        fn(*args, **kw)
    except Exception as exc:  # a missing/broken matplotlib must not lose the results
        log(f"[plot] skipped: {exc}")


# --------------------------------------------------------------------------- the commands
def run_pretrain(cfg: RunConfig, out: str, *, resume: bool = False, quiet: bool = False, device=None) -> dict:
    """``lopfast pretrain``: the teacher in ``out/pretrain/model.pt``; writes results.json."""
    run = Runner.open(cfg, out, resume=resume, quiet=quiet, device=device)
    _, acc = run.teacher()
    run.log(f"pretrained {cfg.model}: {acc:.2f}% -> {run.folder.path('pretrain', 'model.pt')}")
    results = {"teacher": {"acc": acc}}
    run.folder.write_json("results.json", results)
    return results


def run_prune(cfg: RunConfig, out: str, *, resume: bool = False, quiet: bool = False, device=None) -> dict:
    """``lopfast prune``: ``cfg.teacher`` pruned into ``out/prune/`` (report, latency when
    ``cfg.measure``); writes results.json."""
    run = Runner.open(cfg, out, resume=resume, quiet=quiet, device=device)
    teacher, acc = run.teacher()
    pruned, report = run.pruned(teacher, speedup=cfg.target_speedup, measure=cfg.measure)
    pacc = evaluate(pruned, run.data.test, run.device, cfg.amp)["acc"]
    results = {"teacher": {"acc": acc}, "pruned": {"acc": pacc, "report": report}}
    run.folder.write_json("results.json", results)
    run.log(f"pruned: accuracy {acc:.2f}% -> {pacc:.2f}% before recovery; {run.folder.path('prune', 'model.pt')}")
    if (report.get("latency") or {}).get("models"):
        from lopfast.prune.latency import format_latency

        run.log(format_latency(report["latency"]))
    return results


def run_pipeline(cfg: RunConfig, out: str, *, resume: bool = False, quiet: bool = False, data=None,
                 device=None) -> dict:
    """pretrain -> prune -> recover with every ``cfg.methods`` -> contract/verify/evaluate/save.

    Returns (and writes to ``out/results.json``) the teacher / pruned accuracies and one entry per method.
    """
    run = Runner.open(cfg, out, resume=resume, quiet=quiet, data=data, device=device)
    data, device, log = run.data, run.device, run.log
    t0 = time.time()
    teacher, teacher_acc = run.teacher()
    log(f"[pretrain] teacher accuracy {teacher_acc:.2f}%")
    example = data.example_inputs(1, device)
    teacher_params, teacher_macs = zoo.count_params(teacher), stages.count_macs(teacher, example)
    pruned, report = run.pruned(teacher, speedup=cfg.target_speedup)
    pruned_acc = evaluate(pruned, data.test, device, cfg.amp)["acc"]
    log(f"[prune] accuracy right after pruning {pruned_acc:.2f}%")
    results = {
        "config": cfg.to_dict(),
        "teacher": {"acc": teacher_acc, "params": teacher_params, "macs": teacher_macs},
        "pruned": {"acc": pruned_acc, "params": zoo.count_params(pruned), "macs": stages.count_macs(pruned, example),
                   "removed": 1 - zoo.count_params(pruned) / teacher_params, "report": report},
        "methods": {},
    }
    for method in cfg.methods:
        try:
            r = run.recovered(method, teacher, pruned, params_before=teacher_params)
        except ImportError as exc:  # a method whose optional dependency is missing fails alone
            log(f"[{method}] not run: {exc}")
            results["methods"][method] = {"method": method, "error": str(exc)}
            continue
        results["methods"][method] = {k: v for k, v in r.items() if k != "history"}
    if cfg.measure and run.folder.rank == 0:
        results["latency"] = run.latency(teacher, pruned, results)
    results["seconds"] = time.time() - t0
    run.folder.write_json("results.json", results)
    _plot(plot_curves, results, out, log=log)
    return results


def _seed_configs(cfg: RunConfig, out: str, seeds: int):
    """(seed, its config, its folder) of a multi-seed run: ``out/seed<s>/``."""
    return [(s, dataclasses.replace(cfg, seed=s, methods=list(cfg.methods)), os.path.join(out, f"seed{s}"))
            for s in seed_list(cfg.seed, seeds)]


def _check_teachers(teachers: str) -> str:
    return choice(*TEACHERS)(teachers, "teachers")


def run_seeds(cfg: RunConfig, out: str, seeds: int = 1, *, teachers: str = "per-seed", resume: bool = False,
              quiet: bool = False, data=None, device=None) -> dict:
    """:func:`run_pipeline` once per seed (``cfg.seed``, ``cfg.seed + 1`` ...) in ``out/seed<s>/``.

    ``teachers="per-seed"``: each seed pretrains (unless ``cfg.teacher`` is given) and prunes its
    own teacher, so the spread over seeds covers pretraining, pruning and recovery.
    ``teachers="shared"``: the first seed's teacher (and so its pruned model) serves every seed,
    which then varies only the recovery (data order, augmentation, expansion init): cheaper, and
    it isolates the spread of recovery. Returns ``{"runs": [...], "rows": [one per method and
    seed], "seeds": [...], "teachers": ...}`` and writes ``out/seeds.csv``. With ``seeds == 1`` it
    is exactly :func:`run_pipeline` on ``out``.
    """
    if not isinstance(cfg, RunConfig):
        raise InvalidArgumentType("cfg", cfg, "a RunConfig", "RunConfig.from_dict(d) builds one from a dict")
    teachers = _check_teachers(teachers)
    plan = _seed_configs(cfg, out, seeds)
    if seeds > 1:  # the base settings, for `--config out/config.json` and a resume's check
        check_out_dir(cfg, out)
        RunFolder(out, quiet=True).write_json("config.json", cfg.to_dict())
    if seeds == 1:
        runs = [run_pipeline(cfg, out, resume=resume, quiet=quiet, data=data, device=device)]
    else:
        runs, first_teacher = [], None
        for _, scfg, sdir in plan:
            if teachers == "shared" and first_teacher is not None and scfg.teacher is None:
                scfg.teacher = first_teacher
            runs.append(run_pipeline(scfg, sdir, resume=resume or os.path.isdir(sdir), quiet=quiet))
            if first_teacher is None and scfg.teacher is None:
                first_teacher = os.path.join(sdir, "pretrain", "model.pt")
    rows = [{"target": cfg.target, "removed": r.get("removed"), "method": m, "seed": s, "acc": r["acc"],
             "params": r.get("params"), "teacher_acc": res["teacher"]["acc"]}
            for (s, _, _), res in zip(plan, runs) for m, r in res["methods"].items() if "error" not in r]
    if seeds > 1:
        RunFolder(out, quiet=True).write_csv("seeds.csv", rows)
    return {"runs": runs, "rows": rows, "seeds": [s for s, _, _ in plan], "teachers": teachers}


def run_sweep(cfg: RunConfig, targets: Sequence[float], out: str, *, resume: bool = False, quiet: bool = False,
              seeds: int = 1, teachers: str = "per-seed") -> List[dict]:
    """Methods x pruning targets (x seeds): one pretrain per seed (``teachers="shared"``: the first
    seed's for all), one prune per target, every method.

    Writes ``out/sweep.csv`` (one row per target, method and seed) and ``out/sweep.png``
    (accuracy vs % of weights removed, error bars over seeds); seed ``s`` runs in
    ``out/seed<s>/`` when ``seeds > 1``.
    """
    if not isinstance(cfg, RunConfig):
        raise InvalidArgumentType("cfg", cfg, "a RunConfig", "RunConfig.from_dict(d) builds one from a dict")
    targets = check_targets(targets)
    teachers = _check_teachers(teachers)
    if seeds == 1:
        return _sweep_one(cfg, targets, out, resume=resume, quiet=quiet)
    rows, first_teacher = [], None
    for _, scfg, sdir in _seed_configs(cfg, out, seeds):
        if teachers == "shared" and first_teacher is not None and scfg.teacher is None:
            scfg.teacher = first_teacher
        rows += _sweep_one(scfg, targets, sdir, resume=resume or os.path.isdir(sdir), quiet=quiet)
        if first_teacher is None and scfg.teacher is None:
            first_teacher = os.path.join(sdir, "pretrain", "model.pt")
    RunFolder(out, quiet=True).write_csv("sweep.csv", rows)
    if rows:
        _plot(plot_sweep, rows, os.path.join(out, "sweep.png"))
    return rows


def _sweep_one(cfg: RunConfig, targets: Sequence[float], out: str, *, resume: bool, quiet: bool) -> List[dict]:
    cfg.target = max(targets)  # validated against the architecture in prepare()
    run = Runner.open(cfg, out, resume=resume, quiet=quiet, record={"targets": list(targets)})
    teacher, teacher_acc = run.teacher()
    n0 = zoo.count_params(teacher)
    rows = []
    for t in targets:
        tag = f"prune_{t:g}"
        pruned, _ = run.pruned(teacher, target=t, tag=tag)
        removed = 1 - zoo.count_params(pruned) / n0
        for m in cfg.methods:
            try:
                r = run.recovered(m, teacher, pruned, tag=f"{tag}/{m}", params_before=n0)
            except ImportError as exc:  # a method whose optional dependency is missing fails alone
                run.log(f"[{tag}/{m}] not run: {exc}")
                continue
            rows.append({"target": t, "removed": removed, "method": m, "seed": cfg.seed, "acc": r["acc"],
                         "params": r["params"], "macs": r["macs"], "teacher_acc": teacher_acc})
    if rows:
        run.folder.write_csv("sweep.csv", rows)
        run.folder.write_json("results.json", {"teacher_acc": teacher_acc, "rows": rows})
        _plot(plot_sweep, rows, os.path.join(out, "sweep.png"), teacher_acc=teacher_acc, log=run.log)
    return rows
