"""The prune -> expand -> distill -> contract pipeline: models, data, training, stages (issue 6).

Entry points: :func:`run_pipeline` (whole run), :func:`train`, :func:`build_model`,
:func:`load_data`, and the ``lopfast`` command line (``lopfast.cli``).
"""
from lopfast.pipeline.data import DataBundle, load_data
from lopfast.pipeline.models import available_models, build_model, count_params, register_zoo
from lopfast.pipeline.config import METHODS, RunConfig
from lopfast.pipeline.experiments import EXPERIMENTS, reproduce
from lopfast.pipeline.report import format_summary, format_table, summarize
from lopfast.pipeline.methods import RECOVERY
from lopfast.pipeline.runner import run_pipeline, run_seeds, run_sweep
from lopfast.pipeline.stages import count_macs, recover
from lopfast.pipeline.train import PRESETS, TrainConfig, evaluate, train

register_zoo()  # lets lopfast.load(path) rebuild zoo models (no-op until lopfast.io exists)

__all__ = [
    "DataBundle",
    "EXPERIMENTS",
    "METHODS",
    "PRESETS",
    "RECOVERY",
    "RunConfig",
    "TrainConfig",
    "available_models",
    "build_model",
    "count_macs",
    "count_params",
    "evaluate",
    "format_summary",
    "format_table",
    "load_data",
    "recover",
    "register_zoo",
    "reproduce",
    "run_pipeline",
    "run_seeds",
    "run_sweep",
    "summarize",
    "train",
]
