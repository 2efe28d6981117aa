"""Structured channel pruning of plain models (run before expanding them).

``prune(model, example_inputs, method=..., ratio=... | target_removed=...)`` returns a
physically smaller copy and a :class:`PruneReport`. Methods: l1, l2, bn, taylor, hrank,
thinet, eagleeye, admm (amc raises NotImplementedError). Needs torch-pruning
(``pip install 'lopfast[prune]'``).
"""
from lopfast.prune.api import METHODS, PruneReport, prune
from lopfast.prune.engine import TOLERANCE, count_macs, count_params
from lopfast.prune.importance import (
    HRankImportance,
    PrecomputedImportance,
    ThiNetImportance,
    channel_contributions,
    feature_map_ranks,
    hrank_scores,
    thinet_order,
    thinet_scores,
)

__all__ = [
    "METHODS",
    "TOLERANCE",
    "HRankImportance",
    "PrecomputedImportance",
    "PruneReport",
    "ThiNetImportance",
    "channel_contributions",
    "count_macs",
    "count_params",
    "feature_map_ranks",
    "hrank_scores",
    "prune",
    "thinet_order",
    "thinet_scores",
]
