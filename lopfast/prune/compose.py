"""The three parts of a pruning strategy, their options, and the paper presets.

* **criterion**: which channels of a layer go (``l1``, ``l2``, ``bn``, ``taylor``, ``hrank``,
  ``thinet``, ``lamp``, ``fpgm``, ``hessian``, ``random``; ``admm`` = ADMM's Z support);
* **allocation**: how many channels each layer loses (``uniform`` ratio, ``global``
  threshold across layers, ``eagleeye`` search, ``amc`` agent, ``netadapt`` latency budget);
* **procedure**: training around the cut (``none``, ``admm``, ``slimming`` sparsity
  training, ``iterative`` steps).

``method=`` names a preset (:data:`PRESETS`, after the papers); ``criterion=``,
``allocation=`` and ``procedure=`` override its parts. Options (``**options`` of
:func:`lopfast.prune.prune`) go to every selected part that takes them; an option that
only another part takes is refused with that part's name.

Measured cost of every preset at ``target_removed=0.9`` on the zoo's CIFAR models
(``lopfast.pipeline.models``: ResNet-56, 0.86 M parameters; MobileNetV2, 2.24 M), CPU,
``OMP_NUM_THREADS=1`` on a 2-core box shared with other jobs (so upper bounds), batches of
128 random 32x32 images, default options unless noted; seconds and peak resident memory
above the loaded model and data (ResNet-56 / MobileNetV2):

============  =======================================  ================  ===============
preset        parts (criterion/allocation/procedure)   seconds           MB above start
============  =======================================  ================  ===============
l1, l2        l1|l2 / uniform / none                   0.7 / 1.3-1.5     47 / 95
bn            bn / uniform / none                      0.9 / 0.9         40 / 91
lamp          lamp / global / none                     1.6 / 3.7         68 / 279
fpgm          fpgm / uniform / none                    0.7 / 1.5         45 / 112
random        random / uniform / none                  0.6 / 1.5         43 / 91
obd           hessian / uniform / none (1 batch)       8.2 / 11.2        61 / 114
taylor        taylor / uniform / none (4 batches)      13.2 / 50.9       769 / 2698
hrank         hrank / uniform / none (5 batches)       34.0 / 165.5      61 / 564
thinet        thinet / uniform / none (2 batches)      26.2 / 73.7       175 / 371
eagleeye      l1 / eagleeye / none (2 candidates)      5.6 / 17.2        86 / 396
amc           l1 / amc / none                          see methods.amc
admm          admm / uniform / admm (1 epoch, 4 b.)    17.3 / 70.9       814 / 2864
slimming      bn / global / slimming (1 epoch, 4 b.)   14.0 / 58.7       911 / 2912
============  =======================================  ================  ===============

netadapt (l2 / netadapt / none, ``budget="latency"``) is measured in
:mod:`lopfast.prune.methods.netadapt` (its cost is the device's timings, not the model's size).

Taylor, ADMM and slimming hold one training step's activations (backward through a batch
of 128); ADMM and slimming cost what training costs, per epoch of ``data``. EagleEye costs
~2.8 / 8.6 s per candidate (10 by default). ThiNet runs one forward per channel group
(stopped after the group's consumers) and holds at most 24 / 39 MB of samples.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import torch.nn.functional as F


# ---------------------------------------------------------------------------- option checkers
class _Check:
    def __init__(self, what: str, ok: Callable[[Any], bool]) -> None:
        self.what, self.ok = what, ok


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POS_INT = _Check("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
NONNEG_INT = _Check("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
POS = _Check("a positive number", lambda v: _num(v) and v > 0)
NONNEG = _Check("a non-negative number", lambda v: _num(v) and v >= 0)
UNIT = _Check("a number in [0, 1)", lambda v: _num(v) and 0 <= v < 1)
OPEN_UNIT = _Check("a number in (0, 1]", lambda v: _num(v) and 0 < v <= 1)
BOOL = _Check("True or False", lambda v: isinstance(v, bool))
FN = _Check("a callable", callable)
OPT_FN = _Check("a callable or None", lambda v: v is None or callable(v))
OPT_POS_INT = _Check("a positive integer or None",
                     lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1))
GROWTH = _Check("a number >= 1", lambda v: _num(v) and v >= 1)


def _choice(*names):
    return _Check("one of " + ", ".join(repr(n) for n in names), lambda v: v in names)


CE = F.cross_entropy

#: options of each criterion: name -> (default, check)
CRITERIA: Dict[str, Dict[str, Tuple[Any, _Check]]] = {
    "l1": {},
    "l2": {},
    "bn": {},
    "taylor": {"batches": (4, POS_INT), "loss_fn": (CE, FN)},
    "hrank": {"batches": (5, POS_INT), "linear_criterion": ("l1", _choice("l1", "error"))},
    "thinet": {"batches": (2, POS_INT), "positions": (10, POS_INT), "seed": (0, NONNEG_INT), "rescale": (True, BOOL)},
    "lamp": {},
    "fpgm": {},
    "hessian": {"batches": (1, POS_INT), "loss_fn": (CE, FN)},
    "random": {"seed": (0, NONNEG_INT)},
    "admm": {},
}
DATA_CRITERIA = ("taylor", "hrank", "thinet", "hessian")

ALLOCATIONS: Dict[str, Dict[str, Tuple[Any, _Check]]] = {
    "uniform": {},
    "global": {"max_layer_ratio": (0.95, OPEN_UNIT)},
    "eagleeye": {"candidates": (10, POS_INT), "calib_batches": (4, POS_INT), "eval_batches": (2, POS_INT),
                 "low": (0.3, OPEN_UNIT), "seed": (0, NONNEG_INT), "loss_fn": (CE, FN),
                 "budget": ("params", _choice("params", "flops"))},
    "amc": {"episodes": (400, POS_INT), "warmup": (100, NONNEG_INT), "max_ratio": (0.8, UNIT),
            "min_ratio": (0.0, UNIT), "budget": ("params", _choice("params", "flops")),
            "val_batches": (2, POS_INT), "reconstruct": (True, BOOL), "recon_batches": (2, POS_INT),
            "positions": (10, POS_INT), "hidden": (300, POS_INT), "lr_actor": (1e-4, POS),
            "lr_critic": (1e-3, POS), "tau": (0.01, POS), "batch_size": (64, POS_INT), "buffer": (2000, POS_INT),
            "sigma": (0.5, POS), "sigma_decay": (0.95, POS), "seed": (0, NONNEG_INT)},
    "netadapt": {"batch": (None, OPT_POS_INT), "step": (0.025, OPEN_UNIT), "decay": (0.96, OPEN_UNIT),
                 "min_step": (0.005, UNIT), "max_iters": (500, POS_INT), "search_margin": (1.25, GROWTH), "recalibrate": (3, NONNEG_INT),
                 "lut_points": (5, _Check("an integer >= 2 or 'all'", lambda v: v == "all" or (
                     isinstance(v, int) and not isinstance(v, bool) and v >= 2))),
                 "compiled": (False, BOOL), "rounds": (20, POS_INT), "budget_s": (0.3, POS),
                 "repeats": (3, POS_INT)},
}
DATA_ALLOCATIONS = ("eagleeye", "amc")

PROCEDURES: Dict[str, Dict[str, Tuple[Any, _Check]]] = {
    "none": {},
    "admm": {"loss_fn": (CE, FN), "lr": (0.01, POS), "momentum": (0.9, UNIT), "weight_decay": (0.0, NONNEG),
             "epochs": (30, POS_INT), "rho": (1.0, POS), "rho_growth": (1.3, GROWTH), "rho_max": (10.0, POS),
             "admm_every": (None, OPT_POS_INT), "tol": (1e-3, POS), "retrain_epochs": (0, NONNEG_INT)},
    "slimming": {"loss_fn": (CE, FN), "lr": (0.01, POS), "momentum": (0.9, UNIT), "weight_decay": (1e-4, NONNEG),
                 "epochs": (10, POS_INT), "sparsity": (1e-4, NONNEG)},
    "iterative": {"steps": (4, POS_INT), "finetune": (None, OPT_FN)},
}
DATA_PROCEDURES = ("admm", "slimming")

#: the presets: method name -> (criterion, allocation, procedure, what it is)
PRESETS: Dict[str, Tuple[str, str, str, str]] = {
    "l1": ("l1", "uniform", "none", "Li et al. (ICLR 2017): per-filter L1 norm, the same ratio in every layer"),
    "l2": ("l2", "uniform", "none", "Li et al.'s L2 variant"),
    "bn": ("bn", "uniform", "none", "BN scale |gamma| per layer, no sparsity training (see slimming)"),
    "slimming": ("bn", "global", "slimming",
                 "network slimming (Liu et al., ICCV 2017): lambda*|gamma| sparsity training, then one global "
                 "|gamma| threshold"),
    "taylor": ("taylor", "uniform", "none", "Molchanov et al. (CVPR 2019): squared group Taylor score per batch"),
    "hrank": ("hrank", "uniform", "none", "HRank (Lin et al., CVPR 2020): feature-map rank after the activation"),
    "thinet": ("thinet", "uniform", "none",
               "ThiNet (Luo et al., ICCV 2017): greedy next-layer reconstruction, layer by layer, LS rescaling"),
    "eagleeye": ("l1", "eagleeye", "none",
                 "EagleEye (Li et al., ECCV 2020): random layer-wise ratios, adaptive-BN scoring, L1 filters"),
    "admm": ("admm", "uniform", "admm",
             "ADMM (Zhang et al., ECCV 2018): W/Z/U training towards channel sparsity, cut Z's support"),
    "amc": ("l1", "amc", "none", "AMC (He et al., ECCV 2018): DDPG agent sets layer ratios, LS reconstruction"),
    "lamp": ("lamp", "global", "none", "LAMP (Lee et al., ICLR 2021): layer-adaptive magnitude scores, global"),
    "fpgm": ("fpgm", "uniform", "none", "FPGM (He et al., CVPR 2019): filters nearest the geometric median"),
    "obd": ("hessian", "uniform", "none", "Optimal Brain Damage (LeCun et al. 1989), group version: w^2 * Fisher"),
    "random": ("random", "uniform", "none", "random channels (a baseline)"),
    "netadapt": ("l2", "netadapt", "none",
                 "NetAdapt (Yang et al., ECCV 2018): a latency budget (budget='latency', target_speedup) met by "
                 "per-layer proposals on a latency table measured on the device, L2 filters"),
}


def resolve(method, criterion, allocation, procedure, global_pruning: bool) -> Tuple[str, str, str, str]:
    """(preset name, criterion, allocation, procedure) from the arguments of ``prune``."""
    for name, value, table in (("criterion", criterion, CRITERIA), ("allocation", allocation, ALLOCATIONS),
                               ("procedure", procedure, PROCEDURES)):
        if value is not None and (not isinstance(value, str) or value not in table):
            raise ValueError(f"{name} must be one of {tuple(table)}, got {value!r}")
    if method is not None and (not isinstance(method, str) or method not in PRESETS):
        raise ValueError(f"method must be one of {tuple(PRESETS)}, got {method!r}")
    if method is None:
        method = "l1" if criterion is None and allocation is None and procedure is None else None
    c, a, p = PRESETS[method][:3] if method is not None else ("l1", "uniform", "none")
    c = criterion or c
    p = procedure or p
    if allocation is None and global_pruning and a in ("uniform", "global"):
        a = "global"
    else:
        a = allocation or a
    if global_pruning and a != "global":
        raise ValueError(f"global_pruning=True means allocation='global'; it cannot be combined with "
                         f"allocation={a!r}")
    if c == "admm" and p != "admm":
        raise ValueError("criterion='admm' (cut ADMM's Z support) exists only with procedure='admm'")
    if p == "admm" and c != "admm":
        raise ValueError(f"procedure='admm' cuts the channels ADMM drove to zero (criterion='admm'); "
                         f"criterion={c!r} cannot be combined with it")
    if a == "netadapt" and p != "none":
        raise ValueError(f"allocation='netadapt' chooses its channel counts by latency; procedure={p!r} cannot be "
                         "combined with it")
    if p in ("admm", "iterative") and a != "uniform":
        raise ValueError(f"procedure={p!r} needs allocation='uniform', got allocation={a!r}")
    if c == "thinet" and a == "global":
        raise ValueError("criterion='thinet' prunes layer by layer; it cannot rank channels globally "
                         "(allocation='global' / global_pruning=True)")
    if p == "slimming" and c != "bn":
        raise ValueError(f"procedure='slimming' trains BN scales for criterion='bn', got criterion={c!r}")
    name = method if method is not None else "+".join((c, a) + ((p,) if p != "none" else ()))
    return name, c, a, p


def split_options(options: Dict[str, Any], c: str, a: str, p: str) -> Tuple[dict, dict, dict]:
    """Distribute ``options`` to the selected parts, check them, fill in the defaults."""
    parts = (("criterion", c, CRITERIA[c]), ("allocation", a, ALLOCATIONS[a]), ("procedure", p, PROCEDURES[p]))
    for key, value in options.items():
        owners = [spec for _, _, spec in parts if key in spec]
        if not owners:
            elsewhere = [f"{kind}={name!r}" for kind, table in (("criterion", CRITERIA), ("allocation", ALLOCATIONS),
                                                                ("procedure", PROCEDURES))
                         for name, spec in table.items() if key in spec]
            accepted = sorted({k for _, _, spec in parts for k in spec})
            if elsewhere:
                raise TypeError(f"option {key!r} is only valid with {' or '.join(elsewhere)}; this call uses "
                                f"criterion={c!r}, allocation={a!r}, procedure={p!r} (which accept {accepted})")
            raise TypeError(f"unknown option(s) [{key!r}] for criterion={c!r}, allocation={a!r}, "
                            f"procedure={p!r}; they accept {accepted}")
        check = owners[0][key][1]
        if not check.ok(value):
            raise ValueError(f"option {key} must be {check.what}, got {value!r}")
    out = []
    for _, _, spec in parts:
        merged = {k: d for k, (d, _) in spec.items()}
        merged.update({k: v for k, v in options.items() if k in spec})
        out.append(merged)
    return tuple(out)


def needs_data(c: str, a: str, p: str) -> bool:
    """Whether criterion ``c``, allocation ``a`` or procedure ``p`` needs ``data`` (batches)."""
    return c in DATA_CRITERIA or a in DATA_ALLOCATIONS or p in DATA_PROCEDURES
