"""Structured channel pruning of plain models (run before expanding them).

``prune(model, example_inputs, method=..., ratio=... | target_removed=...)`` returns a
physically smaller copy and a :class:`PruneReport`. A strategy is a criterion (which
channels), an allocation (how many per layer) and a procedure (training around the cut);
``method=`` names a paper's preset (:data:`METHODS`: l1, l2, bn, slimming, taylor, hrank,
thinet, eagleeye, admm, amc, lamp, fpgm, obd, random) and ``criterion=`` / ``allocation=`` /
``procedure=`` combine parts (:mod:`lopfast.prune.compose`). Speed (issue 19): ``measure=``
reports the measured latency of the original and the pruned model
(:mod:`lopfast.prune.latency`), ``round_to=`` keeps widths hardware-friendly, and
``budget="latency", target_speedup=`` prunes until the model is that much faster on its device
(:mod:`lopfast.prune.methods.netadapt`). Models with auxiliary heads are traced through their
training forward (:mod:`lopfast.prune.tracing`); ShuffleNetV2 is pruned through its channel
shuffle (:mod:`lopfast.prune.shuffle`). Needs torch-pruning (``pip install 'lopfast[prune]'``).
"""
from lopfast.prune.api import DATA_METHODS, METHODS, PruneReport, prune
from lopfast.prune.compose import ALLOCATIONS, CRITERIA, PRESETS, PROCEDURES
from lopfast.prune.criteria import activation_sites, hrank_post_activation_scores, sampled_contributions
from lopfast.prune.engine import TOLERANCE, count_macs, count_params
from lopfast.prune.latency import format_latency, measure_latency
from lopfast.prune.importance import (
    HRankImportance,
    PrecomputedImportance,
    feature_map_ranks,
    hrank_scores,
    thinet_order,
)

__all__ = [
    "ALLOCATIONS",
    "CRITERIA",
    "DATA_METHODS",
    "METHODS",
    "PRESETS",
    "PROCEDURES",
    "TOLERANCE",
    "HRankImportance",
    "PrecomputedImportance",
    "PruneReport",
    "count_macs",
    "count_params",
    "format_latency",
    "measure_latency",
    "feature_map_ranks",
    "activation_sites",
    "hrank_post_activation_scores",
    "hrank_scores",
    "sampled_contributions",
    "prune",
    "thinet_order",
]


class _CallablePackage(type(__import__("sys"))):
    """Lets ``lopfast.prune(...)`` call :func:`prune` while ``lopfast.prune`` stays this package.

    ``lopfast.prune`` is both the documented function and this subpackage's name; binding
    the function on ``lopfast`` would hide the package's other names, so the package itself
    is made callable instead.
    """

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallablePackage
