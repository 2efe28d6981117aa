"""The paper's experiments as data, and ``lopfast reproduce`` to run them with seeds.

Each :class:`Experiment` names the model, data set, pruning strategy, targets (fractions of
weights removed), recovery methods, optional variants (settings that change per column:
expansion rate, FC expansion, pruning strategy, gamma) and the numbers the paper reports.
:func:`reproduce` runs every cell (target x variant x method) for every seed and writes, into
``out/<experiment>-<budget>/``:

* ``results.csv``: one row per cell and seed (accuracy, % removed, params, MACs, training
  images/s, the teacher's and the pruned model's accuracy);
* ``results.md``: mean +- std (n) beside the paper's number, and lop - ft paired by seed with
  its spread;
* ``results.png``: accuracy against % of weights removed, one line per method, error bars.

Budgets: ``paper`` (the paper's schedules: 150 fine-tuning epochs, 280 from scratch, their
milestones; teachers 280 epochs), ``short`` (scaled down to minutes per experiment on one
H200), ``smoke`` (CI: the same cells, strategies and methods on a tiny model and data set on
CPU; for CIFAR/ImageNet experiments that is the embedded digits data and ``digitsnet``, so its
numbers check the machinery, not the paper).

Resume is automatic: a cell whose result exists (its ``result.json``) is read back, never
recomputed; teachers are trained once per (model, data set, budget, seed) under
``out/teachers/`` and reused by every experiment that shares them (or given with ``--teacher``).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["BUDGETS", "EXPERIMENTS", "Experiment", "format_registry", "reproduce"]


@dataclass(frozen=True)
class Experiment:
    """One table or figure of the paper.

    ``paper`` maps (method, target) -- or (method, (target, variant)) for experiments with
    variants -- to the reported top-1 accuracy (%). ``variants`` are (label, RunConfig
    overrides) pairs; ``variant_methods`` restricts which methods run per variant (e.g. ft has
    no expansion rate). ``budgets`` overrides :data:`BUDGETS` per budget name.
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


#: epochs per budget (None: the paper preset: 150 fine-tune, 280 scratch, 280 pretrain)
BUDGETS: Dict[str, dict] = {
    "paper": dict(epochs=None, scratch_epochs=None, pretrain_epochs=None),
    # one H200, bf16 + channels_last, data on the device: a few minutes per experiment
    "short": dict(epochs=8, scratch_epochs=15, pretrain_epochs=15),
    # CI on a 2-core CPU: same cells on the embedded digits data with a narrow digitsnet
    "smoke": dict(epochs=1, scratch_epochs=1, pretrain_epochs=2, model="digitsnet", model_kwargs={"width": 24},
                  dataset="digits", data_dir=None, train_subset=256, test_subset=96, batch_size=64, device="cpu"),
}

_T1 = (0.6837, 0.7823, 0.9480, 0.9866)
_T2 = (0.2837, 0.5425, 0.7123, 0.9318)
_FIVE = ("scratch", "expandnets", "distill", "ft", "lop")


def _paper(methods: Sequence[str], targets: Sequence[float], rows: Sequence[Sequence[float]]) -> dict:
    return {(m, t): v for m, row in zip(methods, rows) for t, v in zip(targets, row)}


_DIGITS_BUDGETS = {  # digits runs fit a CPU: "paper" and "short" are the schedule of the measured sweep
    "paper": dict(epochs=30, pretrain_epochs=40, batch_size=256, device="cpu"),
    "short": dict(epochs=30, pretrain_epochs=40, batch_size=256, device="cpu"),
    "smoke": dict(epochs=1, pretrain_epochs=2, train_subset=256, test_subset=96, batch_size=64, device="cpu",
                  model_kwargs={"width": 24}),
}

EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in [
    Experiment(
        "table1", "Table 1: MobileNetV2, CIFAR-10, ADMM", "mobilenet_v2", "cifar10", "admm", _T1, _FIVE,
        paper=_paper(_FIVE, _T1, [(86.22, 83.47, 72.08, 49.08), (87.61, 84.99, 75.14, 51.25),
                                  (87.80, 85.03, 75.03, 51.31), (93.27, 92.74, 86.03, 54.39),
                                  (93.31, 93.26, 87.97, 56.88)]),
        notes="unpruned 94.17 (ExpandNets 94.36)"),
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
        paper=_paper(("ft", "lop-nokd", "lop"), (0.6837, 0.8980, 0.9480, 0.9866),
                     [(93.27, 91.67, 86.03, 54.39), (93.25, 91.83, 86.28, 54.92), (93.31, 92.07, 87.97, 56.88)]),
        compare=(("lop", "ft"), ("lop-nokd", "ft"), ("lop", "lop-nokd"))),
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
        notes="the paper gives Fig. 3 as a plot only: no numbers to compare with"),
    Experiment(
        "fig4", "Fig. 4: MobileNetV2, CIFAR-10, AMC / HRank / ThiNet / EagleEye", "mobilenet_v2", "cifar10", "hrank",
        (0.5, 0.7, 0.9), ("ft", "lop"),
        variants=tuple((m, {"prune_method": m}) for m in ("amc", "hrank", "thinet", "eagleeye")),
        notes="the paper gives Fig. 4 as a plot only: no numbers to compare with"),
    Experiment(
        "gamma", "SP weight gamma per layer pair and the LOP-only knobs (digitsnet, digits, l1, 95 %)", "digitsnet",
        "digits", "l1", (0.95,), ("ft", "lop"),
        variants=(("g300", {"gamma": 300.0}), ("g3000", {"gamma": 3000.0}), ("g30000", {"gamma": 30000.0}),
                  ("g3000-fwd0", {"gamma": 3000.0, "factor_weight_decay": 0.0}),
                  ("g3000-flr3", {"gamma": 3000.0, "factor_lr_scale": 3.0}),
                  ("lr0.03", {"gamma": 3000.0, "lr": 0.03})),
        # ft once at the default lr, and once at 3x lr: the control for the factors' 3x lr
        variant_methods={"g300": ("ft", "lop"), "lr0.03": ("ft", "lop")}, budgets=_DIGITS_BUDGETS,
        notes="the evidence behind lopfast.distill.DEFAULT_GAMMA (and the factor weight decay / LR knobs)"),
]}


def format_registry() -> str:
    """The registry as text (``lopfast reproduce --list``)."""
    lines = []
    for e in EXPERIMENTS.values():
        targets = ", ".join(f"{100 * t:.2f}" for t in e.targets)
        var = f"; variants {', '.join(v for v, _ in e.variants)}" if e.variants[0][0] else ""
        data = " (needs --data-dir)" if e.needs_data_dir else ""
        lines.append(f"{e.name:<7} {e.title}{data}\n        {e.model} / {e.dataset} / {e.prune_method}; "
                     f"% removed: {targets}; methods: {', '.join(e.methods)}{var}"
                     + (f"\n        {e.notes}" if e.notes else ""))
    lines.append("budgets: " + "; ".join(f"{b}: " + ", ".join(f"{k}={v}" for k, v in d.items()
                                                                if k in ("epochs", "scratch_epochs", "pretrain_epochs"))
                                         for b, d in BUDGETS.items()) + " (None: the paper's 150/280/280)")
    return "\n".join(lines)


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
               "train_images_per_s", "paper_acc"]


def _base_config(exp: Experiment, budget: str, *, data_dir, device, teacher) -> dict:
    """RunConfig settings shared by every cell: the experiment's, then the budget's (which, for
    ``smoke``, swaps in the tiny model and data), then the caller's data dir, device, teacher."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    s = dict(model=exp.model, dataset=exp.dataset, prune_method=exp.prune_method, methods=list(exp.methods))
    s.update(exp.settings)
    s.update(exp.budgets.get(budget, BUDGETS[budget]))
    if data_dir is not None and s["dataset"] != "digits":
        s["data_dir"] = data_dir
    if device is not None:
        s["device"] = device
    if teacher is not None:
        s["teacher"] = teacher
    return s


def reproduce(name: str, *, budget: str = "short", seeds: int = 1, seed: int = 0, out: str = "runs/reproduce",
              data_dir: Optional[str] = None, device: Optional[str] = None, teacher: Optional[str] = None,
              targets: Optional[Sequence[float]] = None, methods: Optional[Sequence[str]] = None,
              parallel: int = 1, quiet: bool = False) -> dict:
    """Run experiment ``name`` for ``seeds`` seeds (``seed``, ``seed + 1``, ...); returns paths and rows.

    ``targets`` / ``methods`` restrict the run to part of the table (e.g. the two most pruned
    columns, ft and lop only); ``parallel`` > 1 runs that many (seed, target) units at once in
    separate processes (one GPU is shared: small CIFAR nets leave most of an H200 idle).
    """
    from lopfast.pipeline.config import RunConfig, _check_fraction
    from lopfast.pipeline.report import format_summary, plot_sweep
    from lopfast.pipeline.stages import seed_list

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} "
                         "(lopfast reproduce --list)")
    exp = EXPERIMENTS[name]
    seeds_run = seed_list(seed, seeds)  # checks seeds
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be a positive int, got {parallel!r}")
    if exp.needs_data_dir and budget != "smoke" and not data_dir:
        raise ValueError(f"experiment {name} needs --data-dir pointing at an ImageNet folder (train/<class>/*.JPEG, "
                         f"val/<class>/*.JPEG); lopfast does not download ImageNet")
    targets = tuple(exp.targets) if not targets else tuple(_check_fraction(t, "targets") for t in targets)
    methods = tuple(exp.methods) if not methods else tuple(methods)
    bad = [m for m in methods if m not in exp.methods]
    if bad:
        raise ValueError(f"methods {bad} are not part of {name}; it has {', '.join(exp.methods)}")
    if teacher is not None and not os.path.isfile(teacher):
        raise ValueError(f"--teacher file {teacher!r} does not exist")
    base = _base_config(exp, budget, data_dir=data_dir, device=device, teacher=teacher)
    RunConfig.from_dict({**base, "target": max(targets)}).validate()  # every bad setting before any work
    exp_dir = os.path.join(out, f"{name}-{budget}")
    os.makedirs(exp_dir, exist_ok=True)
    units = [(s, t) for s in seeds_run for t in targets]
    cells = _cells(exp, targets, methods)
    t0 = time.time()

    def write_outputs(plot: bool) -> dict:
        # after every finished unit: a run cut short (a GPU lease ending) still leaves its table
        rows = _collect(exp, budget, base, units, cells, exp_dir)
        csv_path = os.path.join(exp_dir, "results.csv")
        with open(csv_path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(csv_path + ".tmp", csv_path)
        table_rows = [{**r, "method": _label(r["method"], r["variant"], exp)} for r in rows]
        var = bool(exp.variants[0][0])
        paper = {(_label(m, (c[1] if var else ""), exp) if var else m, c[0] if var else c): v
                 for (m, c), v in exp.paper.items()} if var else dict(exp.paper)
        compare = _compare(exp, table_rows)
        stand_in = budget == "smoke" and exp.dataset != "digits"
        header = (f"{exp.title}. Budget `{budget}`"
                  f"{' (digitsnet on digits: checks the machinery, not the paper)' if stand_in else ''}; "
                  f"seeds {', '.join(map(str, seeds_run))}; model {base['model']}, data {base['dataset']}, "
                  f"pruning {base['prune_method']}. Top-1 % as mean ± std (n), paper in brackets; "
                  "a − b is paired by seed ('exceeds spread': |mean| > std).")
        md = (format_summary(table_rows, cell=("target",), paper=paper, compare=compare, title=header)
              if rows else header)
        md_path = os.path.join(exp_dir, "results.md")
        with open(md_path, "w") as f:
            f.write(md + "\n")
        png = None
        if plot and rows:
            try:
                paper_pts: Dict[str, list] = {}
                for (m, c), v in paper.items():
                    t = c[0] if isinstance(c, tuple) else c
                    paper_pts.setdefault(m, []).append((100 * t, v))
                png = plot_sweep(table_rows, os.path.join(exp_dir, "results.png"), title=exp.title[:60],
                                 paper=paper_pts or None)
            except Exception as exc:  # a missing matplotlib must not lose the results
                if not quiet:
                    print(f"[plot] skipped: {exc}")
        return {"csv": csv_path, "md": md_path, "png": png, "rows": rows, "table": md}

    if parallel > 1 and len(units) > 1:
        _run_parallel(name, budget, base, units, cells, out, exp_dir, parallel, quiet,
                      on_done=lambda: write_outputs(False))
    else:
        for s, t in units:
            _run_unit(name, budget, base, s, t, cells, out, exp_dir, quiet)
            write_outputs(False)
    res = write_outputs(True)
    return {**res, "seconds": time.time() - t0}


def _label(method: str, variant: str, exp: Experiment) -> str:
    if not variant or (exp.variant_methods is not None and method in _NO_VARIANT and variant == exp.variants[0][0]):
        return method
    return f"{method} {variant}"


def _compare(exp: Experiment, rows: List[dict]) -> List[Tuple[str, str]]:
    if not exp.variants[0][0]:
        return list(exp.compare)
    labels = list(dict.fromkeys(r["method"] for r in rows))
    if exp.variant_methods is not None:  # e.g. table5: every lop variant against the one ft
        return [(lab, "ft") for lab in labels if lab != "ft" and "ft" in labels]
    out = []  # e.g. fig3: per strategy, lop vs ft
    for lab in labels:
        if lab.startswith("lop "):
            other = "ft " + lab[4:]
            if other in labels:
                out.append((lab, other))
    return out


def _teacher_dir(out: str, base: dict, budget: str, seed: int) -> str:
    kw = json.dumps(base.get("model_kwargs", {}), sort_keys=True).replace(" ", "")
    sub = (f"{base['model']}{'' if kw == '{}' else kw}-{base['dataset']}-{budget}-"
           f"{base.get('train_subset') or 'all'}-seed{seed}")
    return os.path.join(out, "teachers", "".join(c if c.isalnum() or c in "-_.{}:," else "_" for c in sub))


def _unit_dir(exp_dir: str, seed: int, target: float) -> str:
    return os.path.join(exp_dir, f"seed{seed}", f"t{target:g}")


def _run_unit(name: str, budget: str, base: dict, seed: int, target: float, cells, out: str, exp_dir: str,
              quiet: bool) -> None:
    """One seed and one target: teacher (trained once, shared), prune per strategy, every cell."""
    import torch

    from lopfast.pipeline import stages
    from lopfast.pipeline.config import RunConfig

    cfg = RunConfig.from_dict({**base, "seed": seed, "target": target})
    udir = _unit_dir(exp_dir, seed, target)
    mine = [c for c in cells if c[0] == target]
    if all(os.path.exists(os.path.join(udir, _cell_tag(c), "result.json")) for c in mine):
        return  # finished: nothing is loaded, nothing recomputed
    os.makedirs(udir, exist_ok=True)
    log = stages.RunLog(udir, quiet)
    data, device = stages.prepare(cfg)
    tdir = _teacher_dir(out, base, budget, seed)
    os.makedirs(tdir, exist_ok=True)
    teacher, teacher_acc = stages.pretrain_stage(cfg, data, tdir, device, log, resume=True)
    n0 = sum(p.numel() for p in teacher.parameters())
    pruned_by: Dict[str, tuple] = {}
    for t, label, over, method in mine:
        tag = _cell_tag((t, label, over, method))
        if os.path.exists(os.path.join(udir, tag, "result.json")):
            continue
        ccfg = dataclasses.replace(cfg, **over)
        pm = ccfg.prune_method
        if pm not in pruned_by:
            pruned, report = stages.prune_stage(ccfg, teacher, data, udir, device, log, tag=f"prune_{pm}")
            from lopfast.pipeline.train import evaluate

            pruned_by[pm] = (pruned, evaluate(pruned, data.test, device, ccfg.amp)["acc"])
        pruned, pacc = pruned_by[pm]
        r = stages.recover(method, ccfg, teacher, pruned, data, udir, device, log, resume=True, tag=tag,
                           params_before=n0)
        extra = {"teacher_acc": teacher_acc, "pruned_acc": pacc,
                 "train_images_per_s": (r["epochs"] * data.train.num_samples / r["train_seconds"])
                 if r.get("train_seconds") else None}
        with open(os.path.join(udir, tag, "cell.json"), "w") as f:
            json.dump(extra, f)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cell_tag(cell) -> str:
    t, label, over, method = cell
    return f"{label}/{method}" if label else method


def _worker(args):
    _run_unit(*args)
    return args[3], args[4]


def _run_parallel(name, budget, base, units, cells, out, exp_dir, parallel, quiet, on_done=None) -> None:
    """(seed, target) units in ``parallel`` processes (spawned: CUDA does not survive fork).

    Teachers first, one process per seed, so no two units train the same teacher.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    seeds = list(dict.fromkeys(s for s, _ in units))
    first = [(s, next(t for s2, t in units if s2 == s)) for s in seeds]
    rest = [u for u in units if u not in first]
    with ProcessPoolExecutor(max_workers=parallel, mp_context=ctx) as pool:
        for phase in (first, rest):
            futs = [pool.submit(_worker, (name, budget, base, s, t, cells, out, exp_dir, quiet)) for s, t in phase]
            for f in futs:
                f.result()  # re-raises a worker's error here
                if on_done is not None:
                    on_done()


def _collect(exp: Experiment, budget: str, base: dict, units, cells, exp_dir: str) -> List[dict]:
    rows = []
    for s, t in units:
        udir = _unit_dir(exp_dir, s, t)
        for cell in cells:
            if cell[0] != t:
                continue
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
            _, label, over, method = cell
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
            })
    return rows
