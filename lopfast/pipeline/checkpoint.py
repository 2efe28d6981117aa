"""Training checkpoints: the one place where they are written and read.

:func:`lopfast.pipeline.train.train` writes one after every epoch (model, optimizer, step
counter, RNG states, history, the stage's settings) and reads it back to resume. Both go
through this module, so the file format is a swap of these two functions.
"""
from __future__ import annotations

import os

import torch

from lopfast.files import write_atomic

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what resumes from it; the message names the file."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` (tensors and plain containers) to ``path`` atomically: a reader, or a run
    resumed after a crash, never sees half a file."""
    write_atomic(path, lambda f: torch.save(state, f), what="checkpoint", make_dirs=True)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a file written by :func:`save_checkpoint` (or any ``torch.save`` of tensors and plain
    containers), with ``weights_only=True``. A missing, truncated or damaged file is a
    :class:`CheckpointError` naming it."""
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch's zip reader, unpickler and storage errors: one message naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first[:200]}): a truncated "
                              "or damaged file; delete it to start the stage afresh") from None
