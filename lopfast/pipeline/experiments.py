"""The paper's experiments as data, and ``lopfast reproduce`` to run them with seeds.

Each :class:`Experiment` names the model, data set, pruning strategy, targets (fractions of
weights removed), recovery methods, optional variants (settings that change per column:
expansion rate, FC expansion, pruning strategy, gamma) and the numbers the paper reports.
:func:`reproduce` runs every cell (target x variant x method) for every seed and writes, into
``out/<experiment>-<budget>/``:

* ``results.csv``: one row per cell and seed (accuracy, % removed, params, MACs, training
  images/s, the teacher's and the pruned model's accuracy);
* ``results.md``: mean +- std (n) beside the paper's number, lop - ft paired by seed with its
  spread, the recipe, the teachers, the machine and the time taken;
* ``results.png``: accuracy against % of weights removed, one line per method, error bars.

Budgets (:data:`BUDGETS`):

* ``paper``: the paper's schedules (150 fine-tuning epochs, 280 from scratch, their milestones;
  teachers 280 epochs).
* ``short``: the paper's schedule shape scaled down (8 / 15 / 15 epochs).
* ``fast``: a modern short recipe for one H200 (:data:`FAST`): batch 512, linear warm-up then
  linear decay to zero, label smoothing, Nesterov momentum, the data on the GPU; one teacher per
  experiment shared by the seeds, cached as a small checked file
  (:mod:`lopfast.pipeline.teachers`); fewer cells (:attr:`Experiment.shapes`): table1 at 94.80 and
  98.66 % removed with ft, lop and lop-nokd (Table 4's ablation at the same columns), fig3 at
  70 and 90 % with l1 and HRank. ft gets exactly lop's epochs, LR schedule and augmentation.
* ``smoke``: CI. The same cells, strategies and methods on a tiny model and data set on CPU;
  for CIFAR/ImageNet experiments that is the embedded digits data and ``digitsnet``, so its
  numbers check the machinery, not the paper. ``fast-smoke``: the same for the fast budget (its
  cells, schedule and shared teacher), what ``bench/paper_fast.sh --smoke`` runs.

The work is a graph of tasks (:mod:`lopfast.pipeline.tasks`): teachers, then one pruning per
(seed, target, strategy), then one task per cell; ``parallel=N`` runs N at once in separate
processes on the one GPU, a task starting as soon as what it needs exists, with per-task
progress and an ETA. ``time_limit`` stops an experiment (no task starts after it, running ones
are stopped and resume later from their last epoch).

Resume is automatic: a cell whose result exists (its ``result.json``) is read back, never
recomputed; an interrupted stage continues from its epoch checkpoint; teachers are trained once
per (model, data set, budget, seed, held-out split) under ``out/teachers/`` and reused by every
experiment that shares them (or given with ``--teacher``).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from lopfast.files import write_atomic, write_text

__all__ = ["BUDGETS", "EXPERIMENTS", "FAST", "Experiment", "Scale", "budget_settings", "format_registry",
           "reproduce"]


@dataclass(frozen=True)
class Scale:
    """A variant setting relative to the budget's: ``{"lr": Scale(2.5)}`` is 2.5 times the budget's LR."""

    factor: float


@dataclass(frozen=True)
class Experiment:
    """One table or figure of the paper.

    ``paper`` maps (method, target) -- or (method, (target, variant)) for experiments with
    variants -- to the reported top-1 accuracy (%). ``variants`` are (label, RunConfig
    overrides) pairs; ``variant_methods`` restricts which methods run per variant (e.g. ft has
    no expansion rate). ``budgets`` replaces :data:`BUDGETS` entries for this experiment;
    ``shapes`` changes the experiment's own fields (targets, methods, variants, paper, compare)
    under a budget (the fast budget runs fewer cells). ``datasets`` holds the same experiment on
    other data sets (``lopfast reproduce gamma --dataset cifar10``).
    """

    name: str
    title: str
    model: str
    dataset: str
    prune_method: str
    targets: Tuple[float, ...]
    methods: Tuple[str, ...]
    paper: Dict = field(default_factory=dict)
    variants: Tuple[Tuple[str, dict], ...] = (("", {}),)
    variant_methods: Optional[Dict[str, Tuple[str, ...]]] = None
    settings: Dict = field(default_factory=dict)
    budgets: Dict[str, dict] = field(default_factory=dict)
    needs_data_dir: bool = False
    compare: Tuple[Tuple[str, str], ...] = (("lop", "ft"),)
    notes: str = ""
    shapes: Dict[str, dict] = field(default_factory=dict)
    datasets: Dict[str, "Experiment"] = field(default_factory=dict)


# The fast budget's recipe, for CIFAR-10 on one H200 (the data set lives on the GPU; batches are
# cropped and flipped there). Its shape follows the fast CIFAR-10 trainers: a linear warm-up then
# a linear decay to zero (the triangular schedule of Page's DAWNBench ResNet and of airbench, whose
# ResNet-9 / airbench94 nets reach 94 % in 24 epochs / ~10 epochs), label smoothing, Nesterov
# momentum, a large batch with the LR scaled linearly (0.1 at batch 128 -> 0.4 at 512 for the
# teachers, the usual ResNet-on-CIFAR LR), and Smith and Topin's observation that one short cycle
# with a large peak LR trains a CIFAR ResNet-56 to about its full accuracy (super-convergence:
# 92.4 % in 10k iterations, where the step schedule needs 80k for 91.2 %).
# ESTIMATES, NOT MEASUREMENTS (no GPU has run this budget yet): ResNet-56 40 epochs and CIFAR
# MobileNetV2 30 epochs are expected to land near 92.5-93.5 % and 92-93 % on the JPEG copy of
# CIFAR-10, in about 40-90 s (ResNet-56: issue 17 measured a captured fp32 b256 step at 10.6 ms and
# b1024 at 32.1 ms on the H200, so b512 ~ 20 ms, 98 steps per epoch, ~2 s per epoch; eager ~2x
# more) and 90-180 s (MobileNetV2: ~40 ms per eager b256 step with the teacher's forward; captured
# unknown). Fine-tuning: 15 epochs for ft, lop and lop-nokd alike from the pruned net, LR 0.05 at
# batch 512 (the paper fine-tunes at 0.01, batch 256, over 150 epochs; 15 epochs from a net that
# lost 90-99 % of its weights need a larger step). gamma stays lopfast.distill.DEFAULT_GAMMA (chosen
# on digits). These three (gamma, the fine-tuning LR, its epochs) are what
# `lopfast reproduce gamma --dataset cifar10 --budget fast` measures on a validation split.
FAST_SCHEDULE = dict(schedule="linear", warmup_epochs=3.0, label_smoothing=0.1, nesterov=True)
FAST: dict = dict(batch_size=512, **FAST_SCHEDULE, epochs=15, lr=0.05, scratch_epochs=30, scratch_lr=0.4,
                  pretrain_epochs=30, pretrain_lr=0.4, momentum=0.9, weight_decay=5e-4)
#: teacher epochs of the fast budget per model (others: FAST["pretrain_epochs"])
FAST_TEACHER_EPOCHS = {"resnet56": 40, "mobilenet_v2": 30}
#: where the fast budget's gamma / LR / epochs come from (results.md prints it)
FAST_PROVENANCE = ("gamma, fine-tuning LR and epochs of the fast budget: chosen a priori from published fast CIFAR-10 "
                   "recipes (lopfast.pipeline.experiments.FAST), not yet confirmed on the validation split; "
                   "`lopfast reproduce gamma --dataset cifar10 --budget fast` measures them on 5,000 training images "
                   "held out (stratified, val_seed 0), never on the test set")

_SMOKE = dict(epochs=1, scratch_epochs=1, pretrain_epochs=2, model="digitsnet", model_kwargs={"width": 24},
              dataset="digits", data_dir=None, train_subset=256, test_subset=96, batch_size=64, device="cpu")
#: the fast budget's schedule where stages last 1-2 epochs (the warm-up must end inside each)
_SMOKE_SCHEDULE = {**FAST_SCHEDULE, "warmup_epochs": 0.5}
#: images held out for validation when a smoke budget stands in for an experiment that asks for some
_SMOKE_VAL_SIZE = 96

#: settings per budget (epochs None: the paper preset: 150 fine-tune, 280 scratch, 280 pretrain)
BUDGETS: Dict[str, dict] = {
    "paper": dict(epochs=None, scratch_epochs=None, pretrain_epochs=None),
    # the paper's schedule shape, scaled down: a few minutes per experiment on one H200
    "short": dict(epochs=8, scratch_epochs=15, pretrain_epochs=15),
    # the modern recipe above: one H200, minutes per experiment with its teacher
    "fast": FAST,
    # CI on a 2-core CPU: same cells on the embedded digits data with a narrow digitsnet
    "smoke": _SMOKE,
    # the fast budget's cells, schedule and shared teacher on the smoke budget's CPU stand-in
    "fast-smoke": {**_SMOKE, **_SMOKE_SCHEDULE},
}
#: budgets whose seeds share one teacher (trained with the first seed): the seeds then vary the
#: pruning data and the recovery, as in the paper, which prunes one pretrained model
SHARED_TEACHER_BUDGETS = ("fast", "fast-smoke")
#: a budget that borrows another's experiment shapes
_SHAPE_OF = {"fast-smoke": "fast"}
_CIFAR = ("cifar10", "cifar100")

_T1 = (0.6837, 0.7823, 0.9480, 0.9866)
_T2 = (0.2837, 0.5425, 0.7123, 0.9318)
_FIVE = ("scratch", "expandnets", "distill", "ft", "lop")


def _paper(methods: Sequence[str], targets: Sequence[float], rows: Sequence[Sequence[float]]) -> dict:
    return {(m, t): v for m, row in zip(methods, rows) for t, v in zip(targets, row)}


_DIGITS_BUDGETS = {  # digits runs fit a CPU: "paper" and "short" are the schedule of the measured sweep
    "paper": dict(epochs=30, pretrain_epochs=40, batch_size=256, device="cpu"),
    "short": dict(epochs=30, pretrain_epochs=40, batch_size=256, device="cpu"),
    # the fast budget's recipe shape on digits (its epochs and LRs stay the measured sweep's)
    "fast": dict(epochs=30, pretrain_epochs=40, batch_size=256, device="cpu", **FAST_SCHEDULE),
    "smoke": dict(epochs=1, pretrain_epochs=2, train_subset=256, test_subset=96, batch_size=64, device="cpu",
                  model_kwargs={"width": 24}),
}
_DIGITS_BUDGETS["fast-smoke"] = {**_DIGITS_BUDGETS["smoke"], **_SMOKE_SCHEDULE}

_TABLE1_PAPER = _paper(_FIVE, _T1, [(86.22, 83.47, 72.08, 49.08), (87.61, 84.99, 75.14, 51.25),
                                    (87.80, 85.03, 75.03, 51.31), (93.27, 92.74, 86.03, 54.39),
                                    (93.31, 93.26, 87.97, 56.88)])
_T4 = (0.6837, 0.8980, 0.9480, 0.9866)
_TABLE4_PAPER = _paper(("ft", "lop-nokd", "lop"), _T4,
                       [(93.27, 91.67, 86.03, 54.39), (93.25, 91.83, 86.28, 54.92), (93.31, 92.07, 87.97, 56.88)])
_T1_FAST = (0.9480, 0.9866)
# the fast table1 runs Table 4's ablation (lop-nokd) at the same two columns: one teacher, one
# pruning per seed and column, three recoveries
_TABLE1_FAST = dict(targets=_T1_FAST, methods=("ft", "lop", "lop-nokd"),
                    paper={k: v for k, v in {**_TABLE1_PAPER, **_TABLE4_PAPER}.items()
                           if k[1] in _T1_FAST and k[0] in ("ft", "lop", "lop-nokd")},
                    compare=(("lop", "ft"), ("lop-nokd", "ft"), ("lop", "lop-nokd")),
                    # ADMM trains the unpruned net towards the sparsity (up to 30 passes over 50 batches by
                    # default: most of a fast experiment on its own); here 6 passes, its residual reported
                    settings=dict(prune_options={"epochs": 6}))
_FIG_FAST = dict(targets=(0.7, 0.9), variants=tuple((m, {"prune_method": m}) for m in ("l1", "hrank")))

# gamma, the fine-tuning LR and its epochs on CIFAR-10, judged on a validation split: the fig3
# setting (ResNet-56, l1, 90 % removed); the budget's values, gamma x0.1 / x10, LR x0.4 / x2.5, 2x epochs
_GAMMA_CIFAR10 = Experiment(
    "gamma", "gamma, fine-tuning LR and epochs on a validation split (ResNet-56, CIFAR-10, l1, 90 %)", "resnet56",
    "cifar10", "l1", (0.9,), ("ft", "lop"),
    variants=(("base", {}), ("g300", {"gamma": 300.0}), ("g30000", {"gamma": 30000.0}),
              ("lr0.4x", {"lr": Scale(0.4)}), ("lr2.5x", {"lr": Scale(2.5)}), ("ep2x", {"epochs": Scale(2.0)})),
    variant_methods={"base": ("ft", "lop"), "lr0.4x": ("ft", "lop"), "lr2.5x": ("ft", "lop"), "ep2x": ("ft", "lop")},
    settings=dict(val_size=5000, eval_split="val"),
    notes="accuracy on 5,000 training images held out (stratified, val_seed 0), never the test set; "
          "it chooses the fast budget's gamma, LR and epochs")

EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in [
    Experiment(
        "table1", "Table 1: MobileNetV2, CIFAR-10, ADMM", "mobilenet_v2", "cifar10", "admm", _T1, _FIVE,
        paper=_TABLE1_PAPER, shapes={"fast": _TABLE1_FAST},
        notes="unpruned 94.17 (ExpandNets 94.36); fast budget: 94.80 and 98.66 % with ft, lop and lop-nokd (Table 4)"),
    Experiment(
        "table2", "Table 2: ResNet-50, ImageNet, ADMM", "resnet50", "imagenet", "admm", _T2, _FIVE,
        paper=_paper(_FIVE, _T2, [(74.14, 71.42, 67.39, 56.79), (74.28, 73.82, 71.06, 58.07),
                                  (75.32, 73.69, 72.61, 58.65), (77.63, 75.03, 72.88, 62.47),
                                  (77.47, 75.76, 73.36, 64.08)]),
        settings=dict(pretrain_epochs=0, model_kwargs={"weights": "DEFAULT"}), needs_data_dir=True,
        budgets={"paper": dict(pretrain_epochs=0), "short": dict(pretrain_epochs=0, epochs=1, scratch_epochs=1)},
        notes="unpruned 79.18; teacher: torchvision weights (cached) or --teacher"),
    Experiment(
        "table3", "Table 3: ResNet-50, ImageNet, AMC", "resnet50", "imagenet", "amc", (0.5264, 0.6328, 0.9563),
        ("ft", "lop"), paper=_paper(("ft", "lop"), (0.5264, 0.6328, 0.9563),
                                    [(74.60, 72.30, 50.52), (75.50, 73.15, 51.20)]),
        settings=dict(pretrain_epochs=0, model_kwargs={"weights": "DEFAULT"}), needs_data_dir=True,
        budgets={"paper": dict(pretrain_epochs=0), "short": dict(pretrain_epochs=0, epochs=1)},
        notes="unpruned 80.10 (the paper's own baseline)"),
    Experiment(
        "table4", "Table 4: KD ablation, MobileNetV2, CIFAR-10, ADMM", "mobilenet_v2", "cifar10", "admm",
        (0.6837, 0.8980, 0.9480, 0.9866), ("ft", "lop-nokd", "lop"),
        paper=_TABLE4_PAPER, compare=(("lop", "ft"), ("lop-nokd", "ft"), ("lop", "lop-nokd")),
        shapes={"fast": dict(targets=_T1_FAST, settings=_TABLE1_FAST["settings"])},
        notes="table1 --budget fast runs these cells too"),
    Experiment(
        "table5", "Table 5: expansion rate, with and without FC expansion (MobileNetV2, CIFAR-10, ADMM, 92.18 %)",
        "mobilenet_v2", "cifar10", "admm", (0.9218,), ("ft", "lop"),
        variants=(("r2+fc", {"rate": 2.0, "linear": True}), ("r3", {"rate": 3.0}),
                  ("r3+fc", {"rate": 3.0, "linear": True}), ("r5", {"rate": 5.0}),
                  ("r5+fc", {"rate": 5.0, "linear": True})),
        variant_methods={"r2+fc": ("ft", "lop")},  # ft (rate 0) runs once, with the first variant
        paper={("ft", (0.9218, "r2+fc")): 88.91, ("lop", (0.9218, "r2+fc")): 89.43,
               ("lop", (0.9218, "r3")): 90.15, ("lop", (0.9218, "r3+fc")): 90.12,
               ("lop", (0.9218, "r5")): 90.07, ("lop", (0.9218, "r5+fc")): 90.13},
        notes="rate 0 = vanilla fine-tuning (ft)"),
    Experiment(
        "fig3", "Fig. 3: ResNet-56, CIFAR-10, AMC / HRank / ThiNet / EagleEye", "resnet56", "cifar10", "hrank",
        (0.5, 0.7, 0.9), ("ft", "lop"),
        variants=tuple((m, {"prune_method": m}) for m in ("amc", "hrank", "thinet", "eagleeye")),
        shapes={"fast": _FIG_FAST},
        notes="the paper gives Fig. 3 as a plot only: no numbers to compare with; fast budget: l1 and HRank at 70, 90 %"),
    Experiment(
        "fig4", "Fig. 4: MobileNetV2, CIFAR-10, AMC / HRank / ThiNet / EagleEye", "mobilenet_v2", "cifar10", "hrank",
        (0.5, 0.7, 0.9), ("ft", "lop"),
        variants=tuple((m, {"prune_method": m}) for m in ("amc", "hrank", "thinet", "eagleeye")),
        shapes={"fast": _FIG_FAST},
        notes="the paper gives Fig. 4 as a plot only: no numbers to compare with; fast budget: l1 and HRank at 70, 90 %"),
    Experiment(
        "gamma", "SP weight gamma per layer pair and the LOP-only knobs (digitsnet, digits, l1, 95 %)", "digitsnet",
        "digits", "l1", (0.95,), ("ft", "lop"),
        variants=(("g300", {"gamma": 300.0}), ("g3000", {"gamma": 3000.0}), ("g30000", {"gamma": 30000.0}),
                  ("g3000-fwd0", {"gamma": 3000.0, "factor_weight_decay": 0.0}),
                  ("g3000-flr3", {"gamma": 3000.0, "factor_lr_scale": 3.0}),
                  ("lr0.03", {"gamma": 3000.0, "lr": 0.03})),
        # ft once at the default lr, and once at 3x lr: the control for the factors' 3x lr
        variant_methods={"g300": ("ft", "lop"), "lr0.03": ("ft", "lop")}, budgets=_DIGITS_BUDGETS,
        datasets={"cifar10": _GAMMA_CIFAR10},
        notes="the evidence behind lopfast.distill.DEFAULT_GAMMA (and the factor weight decay / LR knobs); "
              "--dataset cifar10: the fast budget's gamma, LR and epochs on a validation split"),
]}


def format_registry() -> str:
    """The registry as text (``lopfast reproduce --list``)."""
    lines = []
    for e in EXPERIMENTS.values():
        targets = ", ".join(f"{100 * t:.2f}" for t in e.targets)
        var = f"; variants {', '.join(v for v, _ in e.variants)}" if e.variants[0][0] else ""
        data = " (needs --data-dir)" if e.needs_data_dir else ""
        other = f" (also --dataset {', '.join(e.datasets)})" if e.datasets else ""
        lines.append(f"{e.name:<7} {e.title}{data}{other}\n        {e.model} / {e.dataset} / {e.prune_method}; "
                     f"% removed: {targets}; methods: {', '.join(e.methods)}{var}"
                     + (f"\n        {e.notes}" if e.notes else ""))
    lines.append("budgets: " + "; ".join(f"{b}: " + ", ".join(f"{k}={v}" for k, v in d.items()
                                                                if k in ("epochs", "scratch_epochs", "pretrain_epochs"))
                                         for b, d in BUDGETS.items()) + " (None: the paper's 150/280/280)")
    lines.append(f"fast: batch {FAST['batch_size']}, {FAST['schedule']} schedule after {FAST['warmup_epochs']:g} warm-up "
                 f"epochs, label smoothing {FAST['label_smoothing']}, Nesterov; teachers "
                 + ", ".join(f"{m} {n} epochs" for m, n in FAST_TEACHER_EPOCHS.items())
                 + "; one teacher shared by the seeds")
    return "\n".join(lines)


def resolve_experiment(name: str, budget: str, dataset: Optional[str] = None) -> Experiment:
    """The experiment ``name`` on ``dataset`` (default: its own), with the cells ``budget`` runs."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} "
                         "(lopfast reproduce --list)")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    exp = EXPERIMENTS[name]
    if dataset is not None and dataset != exp.dataset:
        if dataset not in exp.datasets:
            have = ", ".join([exp.dataset, *exp.datasets])
            raise ValueError(f"--dataset {dataset!r}: experiment {name} runs on {have}")
        exp = exp.datasets[dataset]
    shape = exp.shapes.get(budget) or exp.shapes.get(_SHAPE_OF.get(budget, ""))
    if shape:
        exp = dataclasses.replace(exp, **shape)
    if budget in ("fast", "fast-smoke") and exp.dataset not in (*_CIFAR, "digits"):
        raise ValueError(f"--budget {budget} is designed for CIFAR (and digits); experiment {name} runs on "
                         f"{exp.dataset}: use --budget short or paper")
    return exp


def budget_settings(budget: str, dataset: str, model: str) -> dict:
    """The RunConfig settings of ``budget`` for a run of ``model`` on ``dataset`` (``lopfast run --budget``).

    ``paper``: none (the defaults are the paper's); ``short``: the epochs; ``fast``: the fast
    recipe (:data:`FAST`, teacher epochs by model), or on digits its schedule with the digits
    epochs. The smoke budgets swap the model and data set and are for ``lopfast reproduce`` only.
    """
    if budget not in ("paper", "short", "fast"):
        raise ValueError(f"--budget must be paper, short or fast for a run, got {budget!r}")
    if budget == "paper":
        return {}
    if dataset == "digits":
        return {k: v for k, v in _DIGITS_BUDGETS[budget].items() if k != "device"}
    if budget == "fast":
        if dataset not in _CIFAR:
            raise ValueError(f"--budget fast is designed for CIFAR-10/100 and digits, not {dataset!r}: use short or paper")
        return {**FAST, "pretrain_epochs": FAST_TEACHER_EPOCHS.get(model, FAST["pretrain_epochs"])}
    return dict(BUDGETS[budget])


def _base_config(exp: Experiment, budget: str, *, data_dir, device, teacher) -> dict:
    """RunConfig settings shared by every cell: the experiment's, then the budget's (which, for
    the smoke budgets, swaps in the tiny model and data), then the caller's data dir, device, teacher."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    s = dict(model=exp.model, dataset=exp.dataset, prune_method=exp.prune_method, methods=list(exp.methods))
    s.update(exp.settings)
    if budget in exp.budgets:
        s.update(exp.budgets[budget])
    else:
        s.update(BUDGETS[budget])
        if budget == "fast":
            s["pretrain_epochs"] = FAST_TEACHER_EPOCHS.get(s["model"], FAST["pretrain_epochs"])
    if s["dataset"] == "digits" and s.get("val_size") and exp.dataset != "digits":
        s["val_size"] = _SMOKE_VAL_SIZE  # a stand-in's split, sized for its data
    if data_dir is not None and s["dataset"] != "digits":
        s["data_dir"] = data_dir
    if device is not None:
        s["device"] = device
    if teacher is not None:
        s["teacher"] = teacher
    return s


def _cells(exp: Experiment, targets, methods) -> List[Tuple[float, str, dict, str]]:
    out = []
    for t in targets:
        for i, (label, over) in enumerate(exp.variants):
            allowed = (exp.variant_methods or {}).get(label)
            for m in methods:
                if exp.variant_methods is not None and allowed is None and m in _NO_VARIANT:
                    continue  # e.g. ft: its result does not depend on the expansion rate
                if allowed is not None and m not in allowed:
                    continue
                out.append((t, label, over, m))
    return out


_NO_VARIANT = ("ft", "scratch", "distill")

_CSV_FIELDS = ["experiment", "budget", "model", "dataset", "prune_method", "target", "variant", "method", "seed",
               "acc", "removed", "params", "macs", "teacher_acc", "pruned_acc", "epochs", "train_seconds",
               "train_images_per_s", "paper_acc", "eval_split", "teacher_seed"]


def _resolved(base: dict, over: dict) -> dict:
    """``over`` with every :class:`Scale` turned into a value relative to ``base`` (None: the preset's)."""
    from lopfast.pipeline.train import PRESETS

    out = {}
    for k, v in over.items():
        if isinstance(v, Scale):
            ref = base.get(k)
            if ref is None:  # the paper preset's value
                ref = PRESETS["finetune"]["epochs" if k == "epochs" else "lr"]
            v = max(1, int(round(ref * v.factor))) if isinstance(ref, int) else ref * v.factor
        out[k] = v
    return out


def _cell_config(base: dict, seed: int, target: float, over: dict, teacher: Optional[str]):
    from lopfast.pipeline.config import RunConfig

    s = {**base, "seed": seed, "target": target, **_resolved(base, over)}
    if teacher is not None:
        s["teacher"] = teacher
    return RunConfig.from_dict(s)


TEACHER_FILE = "teacher.pt"


def _teacher_dir(out: str, base: dict, budget: str, seed: int) -> str:
    kw = json.dumps(base.get("model_kwargs", {}), sort_keys=True).replace(" ", "")
    sub = (f"{base['model']}{'' if kw == '{}' else kw}-{base['dataset']}-{budget}-"
           f"{base.get('train_subset') or 'all'}-seed{seed}")
    if base.get("val_size"):  # a teacher that never saw the held-out images
        sub += f"-val{base['val_size']}s{base.get('val_seed', 0)}"
    return os.path.join(out, "teachers", "".join(c if c.isalnum() or c in "-_.{}:," else "_" for c in sub))


def _unit_dir(exp_dir: str, seed: int, target: float) -> str:
    return os.path.join(exp_dir, f"seed{seed}", f"t{target:g}")


def _cell_tag(cell) -> str:
    t, label, over, method = cell
    return f"{label}/{method}" if label else method


def _prune_tag(base: dict, over: dict) -> str:
    return f"prune_{over.get('prune_method', base['prune_method'])}"


def _runner(cfg, out: str, log_dir: str, quiet: bool):
    """A Runner of the task's stages in ``out`` (the teacher's folder, or a (seed, target) unit),
    its log in ``log_dir``; finished stages are loaded, interrupted ones resume."""
    from lopfast.pipeline.runner import Runner, RunFolder, prepare

    data, device = prepare(cfg)
    return Runner(cfg, RunFolder(out, quiet, log_dir=log_dir), data, device, resume=True)


# --------------------------------------------------------------------------- the tasks
# Module-level functions of one dict argument: run in this process or pickled to a worker.
def _task_teacher(spec: dict) -> dict:
    """Train (or resume) the teacher of ``spec``; write its portable, checked file; return its record."""
    from lopfast.files import file_lock
    from lopfast.pipeline.teachers import teacher_info

    tdir = spec["tdir"]
    path = os.path.join(tdir, TEACHER_FILE)
    with file_lock(os.path.join(tdir, ".lock")):  # two experiments at once may share this teacher
        if os.path.exists(path):
            info = teacher_info(path)
            return {"path": path, "acc": info.get("acc"), "bytes": os.path.getsize(path), "cached": True}
        return _train_teacher(spec, tdir, path)


def _train_teacher(spec: dict, tdir: str, path: str) -> dict:
    from lopfast.pipeline.stages import arch_kwargs
    from lopfast.pipeline.teachers import round_to_half, save_teacher
    from lopfast.pipeline.train import evaluate

    cfg = _cell_config(spec["base"], spec["seed"], spec["target"], {}, None)
    cfg.teacher = None
    run = _runner(cfg, tdir, tdir, spec["quiet"])
    t0 = time.time()
    model, acc32 = run.teacher()
    # the experiments train against exactly the weights the portable file holds
    rounded = round_to_half(model)
    acc = evaluate(rounded.to(run.device), run.data.test, run.device, cfg.amp)["acc"]
    train_s = None
    if run.folder.exists("pretrain/history.json"):
        train_s = sum(h.get("seconds", 0.0) for h in run.folder.read_json("pretrain/history.json"))
    recipe = {k: getattr(cfg, k) for k in ("pretrain_epochs", "pretrain_lr", "batch_size", "schedule", "warmup_epochs",
                                           "label_smoothing", "nesterov", "momentum", "weight_decay", "amp")}
    size = save_teacher(rounded, path, arch=cfg.model, arch_kwargs=arch_kwargs(cfg, run.data), dataset=cfg.dataset,
                        acc=acc, acc_float32=acc32, eval_split=cfg.eval_split, val_size=cfg.val_size,
                        val_seed=cfg.val_seed, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                        seed=cfg.seed, budget=spec["budget"], recipe=recipe, train_seconds=train_s)
    run.log(f"[teacher] {cfg.model}: {acc:.2f}% with float16 weights ({acc32:.2f}% float32), {size / 1e6:.2f} MB "
            f"-> {path} ({time.time() - t0:.0f}s)")
    return {"path": path, "acc": acc, "bytes": size, "seconds": train_s, "cached": False}


def _checked_teacher(run):
    """The run's teacher file (checked by :func:`lopfast.pipeline.teachers.load_teacher`), its accuracy
    measured here and compared with the one it records on the same split."""
    from lopfast.pipeline.teachers import teacher_info

    cfg = run.cfg
    teacher, acc = run.teacher()
    info = teacher_info(cfg.teacher)
    same = all(info.get(k) == getattr(cfg, k) for k in ("eval_split", "val_size", "val_seed", "test_subset"))
    if info.get("acc") is not None and same and abs(acc - info["acc"]) > 1.0:
        raise ValueError(f"teacher file {cfg.teacher} records {info['acc']:.2f}% on its {cfg.eval_split} split, this "
                         f"run measures {acc:.2f}% on the same split: another copy of the data, or not the teacher "
                         "it claims to be")
    return teacher, acc


def _task_prune(spec: dict) -> dict:
    """Prune the teacher for one (seed, target, strategy); record the accuracies before recovery."""
    from lopfast.pipeline.models import count_params
    from lopfast.pipeline.train import evaluate

    cfg = _cell_config(spec["base"], spec["seed"], spec["target"], spec["over"], spec["teacher"])
    udir, tag = spec["udir"], spec["tag"]
    run = _runner(cfg, udir, os.path.join(udir, tag), spec["quiet"])
    teacher, tacc = _checked_teacher(run)
    pruned, _ = run.pruned(teacher, tag=tag)
    pacc = evaluate(pruned, run.data.test, run.device, cfg.amp)["acc"]
    rec = {"teacher_acc": tacc, "pruned_acc": pacc, "params_before": count_params(teacher)}
    run.folder.write_json(f"{tag}/accuracy.json", rec)
    return rec


def _task_cell(spec: dict) -> dict:
    """Recover one cell (method x variant) from its pruned model; write result.json and cell.json."""
    from lopfast.pipeline.models import count_params

    cfg = _cell_config(spec["base"], spec["seed"], spec["target"], spec["over"], spec["teacher"])
    udir, tag = spec["udir"], spec["tag"]
    done = os.path.join(udir, tag, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return {"acc": json.load(f)["acc"]}
    run = _runner(cfg, udir, os.path.join(udir, tag), spec["quiet"])
    teacher, tacc = _checked_teacher(run)
    pruned = run.folder.load_model(f"{spec['prune_tag']}/model.pt").to(run.device)
    pacc = run.folder.read_json(f"{spec['prune_tag']}/accuracy.json")["pruned_acc"]
    r = run.recovered(spec["method"], teacher, pruned, tag=tag, params_before=count_params(teacher))
    extra = {"teacher_acc": tacc, "pruned_acc": pacc, "teacher_seed": spec["teacher_seed"],
             "eval_split": cfg.eval_split,
             "train_images_per_s": (r["epochs"] * run.data.train.num_samples / r["train_seconds"])
             if r.get("train_seconds") else None}
    run.folder.write_json(f"{tag}/cell.json", extra)
    return {"acc": r["acc"], "train_seconds": r.get("train_seconds")}


# --------------------------------------------------------------------------- reproduce
def reproduce(name: str, *, budget: str = "short", seeds: int = 1, seed: int = 0, out: str = "runs/reproduce",
              data_dir: Optional[str] = None, device: Optional[str] = None, teacher: Optional[str] = None,
              targets: Optional[Sequence[float]] = None, methods: Optional[Sequence[str]] = None,
              parallel: int = 1, quiet: bool = False, dataset: Optional[str] = None, teachers: Optional[str] = None,
              time_limit: Optional[float] = None) -> dict:
    """Run experiment ``name`` for ``seeds`` seeds (``seed``, ``seed + 1``, ...); returns paths and rows.

    ``targets`` / ``methods`` restrict the run to part of the table (e.g. the two most pruned
    columns, ft and lop only). ``parallel`` > 1 runs that many tasks at once in separate
    processes (one GPU is shared: small CIFAR nets leave most of an H200 idle). ``dataset``:
    the experiment on another data set (``gamma`` on ``cifar10``). ``teachers``: ``"shared"``
    (one teacher, trained with the first seed, for every seed; the fast budgets' default) or
    ``"per-seed"`` (the other budgets' default); ``teacher`` (a file) replaces both.
    ``time_limit``: seconds; no task starts after it and running ones stop (rerun to resume).

    The returned dict: ``csv``, ``md``, ``png`` (paths), ``rows``, ``table`` (the markdown),
    ``seconds``, ``failed`` (task -> error) and ``unfinished`` (tasks not run in time).
    """
    from lopfast.pipeline.tasks import run_tasks

    r = _Reproduction.checked(name, budget=budget, seeds=seeds, seed=seed, out=out, data_dir=data_dir, device=device,
                              teacher=teacher, targets=targets, methods=methods, parallel=parallel, dataset=dataset,
                              teachers=teachers, time_limit=time_limit, quiet=quiet)
    os.makedirs(r.exp_dir, exist_ok=True)
    t0 = time.time()
    tasks, counts = r.tasks()
    status = {"failed": {}, "unfinished": []}

    def write_outputs(plot: bool) -> dict:
        # after every finished cell: a run cut short (a GPU lease ending) still leaves its table
        return _write_outputs(r.exp, name, budget, r.base, r.seeds, r.cells, r.exp_dir, r.teachers, r.teacher_path,
                              status, time.time() - t0, plot, quiet, parallel)

    def on_done(task, res) -> str:
        if task.kind == "teacher":
            return f": {res['acc']:.2f}%, {res['bytes'] / 1e6:.1f} MB file" if res.get("acc") is not None else ""
        if task.kind.startswith("cell"):
            write_outputs(False)
            return f": {res['acc']:.2f}%"
        return f": {res['pruned_acc']:.2f}% before recovery" if isinstance(res, dict) and "pruned_acc" in res else ""

    report = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    if tasks and not quiet:
        report(f"[{r.run_name}] {len(tasks)} tasks ({counts['teacher']} teachers, {counts['prune']} prunings, "
               f"{counts['cell']} cells) on {min(parallel, len(tasks))} process(es)"
               + (f", time limit {time_limit:.0f}s" if time_limit else ""))
    run = run_tasks(tasks, workers=parallel, deadline=(t0 + time_limit) if time_limit else None, on_done=on_done,
                    report=report, name=r.run_name, threads=_worker_threads(parallel))
    status["failed"], status["unfinished"] = run.failed, run.unfinished
    res = write_outputs(True)
    if run.unfinished and not quiet:
        report(f"[{r.run_name}] time limit reached: {len(run.unfinished)} tasks not finished; rerun the same command "
               "to resume (finished cells are kept, interrupted ones continue from their last epoch)")
    return {**res, "seconds": time.time() - t0, "failed": run.failed, "unfinished": run.unfinished}


@dataclass
class _Reproduction:
    """One ``reproduce`` call, its arguments checked: the experiment, its base settings, cells,
    seeds and folders; :meth:`tasks` is its graph of what is not finished yet."""

    name: str
    exp: Experiment
    budget: str
    base: dict
    seeds: List[int]
    targets: Tuple[float, ...]
    cells: list
    teachers: str
    teacher: Optional[str]
    teacher_path: Dict[int, str]
    out: str
    exp_dir: str
    run_name: str
    quiet: bool
    parallel: int

    @classmethod
    def checked(cls, name: str, *, budget, seeds, seed, out, data_dir, device, teacher, targets, methods, parallel,
                dataset, teachers, time_limit, quiet) -> "_Reproduction":
        """Every argument and every cell's settings checked, before any work."""
        from lopfast.pipeline.config import RunConfig, check_fraction
        from lopfast.pipeline.runner import check_out_path, seed_list

        exp = resolve_experiment(name, budget, dataset)
        seeds_run = seed_list(seed, seeds)  # checks seeds
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"parallel must be a positive int, got {parallel!r}")
        if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                       or not time_limit > 0 or not math.isfinite(time_limit)):
            raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
        teachers = teachers or ("shared" if budget in SHARED_TEACHER_BUDGETS else "per-seed")
        if teachers not in ("shared", "per-seed"):
            raise ValueError(f"teachers must be 'shared' or 'per-seed', got {teachers!r}")
        if exp.needs_data_dir and budget not in ("smoke", "fast-smoke") and not data_dir:
            raise ValueError(f"experiment {name} needs --data-dir pointing at an ImageNet folder "
                             f"(train/<class>/*.JPEG, val/<class>/*.JPEG); lopfast does not download ImageNet")
        targets = tuple(exp.targets) if not targets else tuple(check_fraction(t, "targets") for t in targets)
        methods = tuple(exp.methods) if not methods else tuple(methods)
        bad = [m for m in methods if m not in exp.methods]
        if bad:
            raise ValueError(f"methods {bad} are not part of {name} in the {budget} budget; it has "
                             f"{', '.join(exp.methods)}")
        if teacher is not None and not os.path.isfile(teacher):
            raise ValueError(f"--teacher file {teacher!r} does not exist")
        check_out_path(out)
        base = _base_config(exp, budget, data_dir=data_dir, device=device, teacher=None)
        # every bad setting before any work (a cell's own settings too: a variant's LR or epochs)
        probe = {**base, "target": max(targets), **({"teacher": teacher} if teacher else {})}
        for _, over in exp.variants:
            RunConfig.from_dict({**probe, **_resolved(base, over)}).validate()
        tag_dataset = "" if exp.dataset == EXPERIMENTS[name].dataset else f"-{exp.dataset}"
        run_name = f"{name}{tag_dataset}-{budget}"
        teacher_seed = {s: (seeds_run[0] if teachers == "shared" else s) for s in seeds_run}
        teacher_path = {s: teacher or os.path.join(_teacher_dir(out, base, budget, s), TEACHER_FILE)
                        for s in dict.fromkeys(teacher_seed.values())}
        return cls(name, exp, budget, base, seeds_run, targets, _cells(exp, targets, methods), teachers, teacher,
                   teacher_path, out, os.path.join(out, run_name), run_name, quiet, parallel)

    def teacher_seed(self, s: int) -> int:
        return self.seeds[0] if self.teachers == "shared" else s

    def tasks(self):
        """The task graph, teachers -> prunings -> cells, of what is not finished yet; and its counts."""
        from lopfast.pipeline.tasks import Task

        quiet = self.quiet or self.parallel > 1
        # seed-major: a run stopped early still has whole, paired seeds
        todo = [(s, cell) for s in self.seeds for cell in self.cells
                if not os.path.exists(os.path.join(_unit_dir(self.exp_dir, s, cell[0]), _cell_tag(cell),
                                                   "result.json"))]
        need_teachers = [] if self.teacher else list(dict.fromkeys(self.teacher_seed(s) for s, _ in todo))
        tasks: List = []
        for ts in need_teachers:
            tdir = _teacher_dir(self.out, self.base, self.budget, ts)
            tasks.append(Task(f"teacher/seed{ts}", "teacher", _task_teacher,
                              ({"tdir": tdir, "base": self.base, "seed": ts, "target": max(self.targets),
                                "budget": self.budget, "quiet": quiet},),
                              log=os.path.join(tdir, "log.txt"), label=f"teacher seed {ts}"))
        prunes = {}
        for s, (t, label, over, method) in todo:
            key = f"prune/seed{s}/t{t:g}/{_prune_tag(self.base, over)}"
            if key not in prunes:
                prunes[key] = self._prune_task(key, s, t, over, quiet)
        tasks += [tk for tk in prunes.values() if tk is not None]
        keys = {tk.key for tk in tasks}
        tasks += [self._cell_task(s, cell, keys, quiet) for s, cell in todo]
        return tasks, {"teacher": len(need_teachers), "prune": len(keys) - len(need_teachers), "cell": len(todo)}

    def _prune_task(self, key: str, s: int, t: float, over: dict, quiet: bool):
        from lopfast.pipeline.tasks import Task

        ptag, udir = _prune_tag(self.base, over), _unit_dir(self.exp_dir, s, t)
        if os.path.exists(os.path.join(udir, ptag, "accuracy.json")) and os.path.exists(
                os.path.join(udir, ptag, "model.pt")):
            return None  # pruned already
        deps = () if self.teacher else (f"teacher/seed{self.teacher_seed(s)}",)
        return Task(key, "prune", _task_prune,
                    ({"base": self.base, "seed": s, "target": t, "over": over,
                      "teacher": self.teacher_path[self.teacher_seed(s)], "udir": udir, "tag": ptag, "quiet": quiet},),
                    deps=deps, log=os.path.join(udir, ptag, "log.txt"),
                    label=f"prune seed {s} {100 * t:.2f}% {ptag[6:]}")

    def _cell_task(self, s: int, cell, keys, quiet: bool):
        from lopfast.pipeline.tasks import Task

        t, label, over, method = cell
        ptag, udir, tag, ts = _prune_tag(self.base, over), _unit_dir(self.exp_dir, s, t), _cell_tag(cell), \
            self.teacher_seed(s)
        deps = tuple(k for k in (f"prune/seed{s}/t{t:g}/{ptag}", f"teacher/seed{ts}") if k in keys)
        return Task(f"cell/seed{s}/t{t:g}/{tag}", "cell:" + method, _task_cell,
                    ({"base": self.base, "seed": s, "target": t, "over": over, "method": method, "udir": udir,
                      "tag": tag, "prune_tag": ptag, "teacher": self.teacher_path[ts], "teacher_seed": ts,
                      "quiet": quiet},),
                    deps=deps, log=os.path.join(udir, tag, "log.txt"),
                    label=f"seed {s} {100 * t:.2f}% {_label(method, label, self.exp)}")


def _worker_threads(parallel: int) -> Optional[int]:
    # CPU threads per worker process: the machine's cores shared out (GPU runs need few)
    return max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None


def _label(method: str, variant: str, exp: Experiment) -> str:
    if not variant or (exp.variant_methods is not None and method in _NO_VARIANT and variant == exp.variants[0][0]):
        return method
    return f"{method} {variant}"


def _compare(exp: Experiment, rows: List[dict]) -> List[Tuple[str, str]]:
    if not exp.variants[0][0]:
        return list(exp.compare)
    labels = list(dict.fromkeys(r["method"] for r in rows))
    out = []  # per variant, lop against the ft of the same variant (same strategy, LR, epochs), else the one ft
    for lab in labels:
        if lab.startswith("lop "):
            other = "ft " + lab[4:]
            if other in labels:
                out.append((lab, other))
            elif "ft" in labels:
                out.append((lab, "ft"))
    return out


def machine() -> dict:
    """What ran: the GPU (or CPU), torch, CUDA, Python, CPU count."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30), sms=p.multi_processor_count)
    else:
        info["gpu"] = None
    return info


def _machine_line(m: dict) -> str:
    dev = f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB, {m.get('sms')} SMs)" if m.get("gpu") else "CPU only"
    return f"{dev}; torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}, {m['cpus']} CPUs"


def _recipe_line(base: dict) -> str:
    keys = ("batch_size", "schedule", "warmup_epochs", "label_smoothing", "nesterov", "pretrain_epochs", "pretrain_lr",
            "epochs", "lr", "gamma", "rate", "weight_decay", "val_size", "eval_split")
    return ", ".join(f"{k}={base[k]}" for k in keys if base.get(k) is not None)


def _write_outputs(exp: Experiment, name: str, budget: str, base: dict, seeds_run, cells, exp_dir: str, teachers: str,
                   teacher_path: Dict[int, str], status: dict, seconds: float, plot: bool, quiet: bool,
                   parallel: int) -> dict:
    from lopfast.pipeline.report import format_summary, plot_sweep

    rows = _collect(exp, budget, base, seeds_run, cells, exp_dir)
    csv_path = os.path.join(exp_dir, "results.csv")
    write_atomic(csv_path, lambda f: _write_rows(f, rows), text=True)
    table_rows = [{**r, "method": _label(r["method"], r["variant"], exp)} for r in rows]
    var = bool(exp.variants[0][0])
    paper = {(_label(m, c[1], exp), c[0]): v for (m, c), v in exp.paper.items()} if var else dict(exp.paper)
    compare = _compare(exp, table_rows)
    stand_in = budget in ("smoke", "fast-smoke") and exp.dataset != "digits"
    split = "the validation split" if base.get("eval_split") == "val" else "the test set"
    prunings = ", ".join(dict.fromkeys(over.get("prune_method", base["prune_method"]) for _, over in exp.variants))
    header = (f"{exp.title}. Budget `{budget}`"
              f"{' (digitsnet on digits: checks the machinery, not the paper)' if stand_in else ''}; "
              f"seeds {', '.join(map(str, seeds_run))}; model {base['model']}, data {base['dataset']}, "
              f"pruning {prunings}. Top-1 % on {split} as mean ± std (n), paper in brackets; "
              "a − b is paired by seed ('exceeds spread': |mean| > std).")
    md = format_summary(table_rows, cell=("target",), paper=paper, compare=compare, title=header) if rows else header
    notes = _notes(rows, table_rows, budget, base, teachers, teacher_path, status, seconds, parallel)
    md = md + "\n\n" + "\n".join(notes)
    md_path = os.path.join(exp_dir, "results.md")
    write_text(md_path, md + "\n")
    png = None
    if plot and rows:
        try:
            paper_pts: Dict[str, list] = {}
            for (m, c), v in paper.items():
                paper_pts.setdefault(m, []).append((100 * c, v))
            png = plot_sweep(table_rows, os.path.join(exp_dir, "results.png"), title=exp.title[:60],
                             paper=paper_pts or None)
        except Exception as exc:  # a missing matplotlib must not lose the results
            if not quiet:
                print(f"[plot] skipped: {exc}")
    return {"csv": csv_path, "md": md_path, "png": png, "rows": rows, "table": md}


def _notes(rows: List[dict], table_rows: List[dict], budget: str, base: dict, teachers: str,
           teacher_path: Dict[int, str], status: dict, seconds: float, parallel: int) -> List[str]:
    """The lines under the table: recipe, teachers, split, timing, what failed, the machine."""
    from lopfast.pipeline.report import mean_std

    notes = [f"- recipe: {_recipe_line(base)}"]
    t_m, t_sd, t_n = mean_std(r["teacher_acc"] for r in {(r["teacher_seed"], r["teacher_acc"]): r
                                                          for r in rows}.values())
    if t_n:
        files = [p for p in dict.fromkeys(teacher_path.values()) if os.path.exists(p)]
        size = f"; teacher file{'s' if len(files) > 1 else ''} " + ", ".join(
            f"{os.path.getsize(p) / 1e6:.1f} MB" for p in files) if files else ""
        notes.append(f"- teacher: {t_m:.2f} ± {t_sd:.2f} % (n={t_n}; "
                     + ("one teacher shared by every seed: the spread is that of pruning and recovery" if
                        teachers == "shared" else "one teacher per seed") + f"{size})")
    if base.get("eval_split") == "val":
        notes.append(f"- every accuracy is on {base.get('val_size')} training images held out (val_seed "
                     f"{base.get('val_seed', 0)}, stratified); the test set is not read")
        notes += _ranking(table_rows)
    elif budget == "fast" and base["dataset"] in _CIFAR:
        notes.append(f"- {FAST_PROVENANCE}")
    if budget in ("fast", "fast-smoke"):
        notes.append(f"- cells packed onto one device as separate processes: --parallel {parallel}; several students "
                     "in one captured step were not built, so not measured")
    per = {}
    for r in rows:
        if r.get("train_seconds"):
            per.setdefault(r["method"], []).append(float(r["train_seconds"]))
    timing = ", ".join(f"{m} {sum(v) / len(v):.0f}s" for m, v in per.items())
    notes.append(f"- wall time of this run: {seconds:.0f}s" + (f"; training per cell, mean: {timing}" if timing else ""))
    if status["failed"]:
        notes.append(f"- FAILED tasks ({len(status['failed'])}): " + ", ".join(sorted(status["failed"])))
    if status["unfinished"]:
        notes.append(f"- not finished in the time limit ({len(status['unfinished'])} tasks): "
                     + ", ".join(status["unfinished"][:12]) + (" ..." if len(status["unfinished"]) > 12 else "")
                     + "; rerun to resume")
    notes.append(f"- machine: {_machine_line(machine())}")
    return notes


def _write_rows(f, rows: List[dict]) -> None:
    w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
    w.writeheader()
    w.writerows(rows)


def _ranking(rows: List[dict]) -> List[str]:
    """Per method, the variants by mean accuracy: what a validation run chooses from."""
    from lopfast.pipeline.report import summarize

    out = []
    stats = summarize([{**r, "family": r["method"].split(" ")[0]} for r in rows], ("family", "method"))
    for fam in dict.fromkeys(s["family"] for s in stats):
        ranked = sorted((s for s in stats if s["family"] == fam), key=lambda s: -s["mean"])
        out.append(f"- {fam}, best first: " + "; ".join(f"{s['method']} {s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})"
                                                        for s in ranked))
    return out


def _collect(exp: Experiment, budget: str, base: dict, seeds_run, cells, exp_dir: str) -> List[dict]:
    rows = []
    for s in seeds_run:
        for cell in cells:
            t, label, over, method = cell
            udir = _unit_dir(exp_dir, s, t)
            tag = _cell_tag(cell)
            path = os.path.join(udir, tag, "result.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                r = json.load(f)
            extra = {}
            if os.path.exists(os.path.join(udir, tag, "cell.json")):
                with open(os.path.join(udir, tag, "cell.json")) as f:
                    extra = json.load(f)
            key = (method, (t, label)) if exp.variants[0][0] else (method, t)
            if exp.variant_methods is not None and method in _NO_VARIANT and label not in exp.variant_methods:
                key = (method, (t, exp.variants[0][0]))
            rows.append({
                "experiment": exp.name, "budget": budget, "model": base["model"], "dataset": base["dataset"],
                "prune_method": over.get("prune_method", base["prune_method"]), "target": t, "variant": label,
                "method": method, "seed": s, "acc": r["acc"], "removed": r.get("removed"), "params": r.get("params"),
                "macs": r.get("macs"), "teacher_acc": extra.get("teacher_acc"), "pruned_acc": extra.get("pruned_acc"),
                "epochs": r.get("epochs"), "train_seconds": r.get("train_seconds"),
                "train_images_per_s": extra.get("train_images_per_s"), "paper_acc": exp.paper.get(key),
                "eval_split": extra.get("eval_split", base.get("eval_split", "test")),
                "teacher_seed": extra.get("teacher_seed", s),
            })
    return rows
