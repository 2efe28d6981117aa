"""Training checkpoints: the one place where the pipeline writes and reads them.

:func:`lopfast.pipeline.train.train` writes one after every epoch (model, optimizer, step
counter, RNG states, history, the stage's settings) and reads it back to resume. The file is
lopfast's one file format (:func:`lopfast.io.save_checkpoint`: a digest of the content checked
at every load, written atomically); this module gives the pipeline's errors their one type.
"""
from __future__ import annotations

import os

from lopfast import io as _io

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(_io.ModelFileError):
    """A checkpoint that cannot be read or does not fit what resumes from it; the message names the file."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` (tensors and plain containers) to ``path`` atomically: a reader, or a run
    resumed after a crash, never sees half a file."""
    _io.save_checkpoint(state, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a file written by :func:`save_checkpoint` (or by an older lopfast), its digest checked,
    with ``weights_only=True``. A missing, truncated or damaged file, or a file that is not a
    checkpoint, is a :class:`CheckpointError` naming it."""
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        return _io.load_checkpoint(path, map_location=map_location)
    except _io.ModelFileError as exc:
        why = str(exc)
        why = why[len(path) + 2:] if why.startswith(f"{path}: ") else why
        raise CheckpointError(f"checkpoint {path} cannot be read ({why}): delete it to start the stage afresh"
                              ) from None
