"""Similarity-preserving distillation: feature taps (forward hooks), teacher/student layer pairs, the loss module."""
from lopfast.distill.loss import DEFAULT_GAMMA, SPDistiller, SPLoss
from lopfast.distill.pairs import sp_pairs, unwrap
from lopfast.distill.taps import FeatureTaps

__all__ = ["DEFAULT_GAMMA", "FeatureTaps", "SPDistiller", "SPLoss", "sp_pairs", "unwrap"]
