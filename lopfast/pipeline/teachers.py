"""Teacher files small enough to carry between machines, checked when they are loaded.

A teacher is trained once and reused by every cell of every experiment that shares it (and by
the next machine: a GPU lease is short, the teacher is most of an experiment's time).
:func:`save_teacher` writes it with :func:`lopfast.save` (no pickle, ``weights_only`` loading)
with its floating-point tensors in float16: half the bytes (ResNet-56: 1.7 MB, CIFAR
MobileNetV2: 4.5 MB), and a relative rounding error of at most 2^-11 per weight. The model the
experiments then train against *is* the rounded one (:func:`round_to_half` before the teacher's
accuracy is measured and recorded), so a run from the carried file reproduces a run on the
machine that trained it. A tensor that float16 cannot hold (a value beyond its range) stays
float32.

The file is a :func:`lopfast.save` file like any other (docs/files.md): its digest is checked at
every load. Its metadata records what it is (architecture, data set, evaluation split, accuracy,
the training settings). :func:`load_teacher` refuses a damaged file, or one whose architecture or
data set is not the one asked for, with an error naming the file; it returns the model in
float32. It loads any :func:`lopfast.save` file (e.g. a pipeline stage's model.pt): those record
no data set and are checked for architecture only. Teacher files of older lopfast versions
(``lopfast-teacher-1``) carry a SHA-256 of their tensors instead of the file's digest
(:func:`tensor_digest`): it is checked in its place.
"""
from __future__ import annotations

import copy
import hashlib
import os
from typing import Optional, Tuple

import torch
import torch.nn as nn

from lopfast.io import ModelFileError, load, read, save

__all__ = ["TEACHER_FORMAT", "load_teacher", "round_to_half", "save_teacher", "tensor_digest"]

# 2: the file's own digest replaces the tensor digest of version 1
TEACHER_FORMAT = "lopfast-teacher-2"
_HALF_MAX = float(torch.finfo(torch.float16).max)


def _halvable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float16 and bool(torch.isfinite(t).all()) and (
        t.numel() == 0 or float(t.abs().max()) <= _HALF_MAX)


@torch.no_grad()
def round_to_half(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` whose floating-point parameters and buffers are rounded to float16
    values (those float16 cannot hold are kept): the weights :func:`save_teacher` stores, exactly."""
    out = copy.deepcopy(model).cpu().float()
    for t in list(out.parameters()) + list(out.buffers()):
        if _halvable(t):
            t.copy_(t.to(torch.float16).to(t.dtype))
    return out


def tensor_digest(state_dict) -> str:
    """SHA-256 over every tensor of ``state_dict`` in name order: name, dtype, shape and bytes (the
    digest ``lopfast-teacher-1`` files record)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def save_teacher(model: nn.Module, path: str, *, arch: str, arch_kwargs: dict, dataset: str,
                 acc: Optional[float] = None, **info) -> int:
    """Write ``model`` as a portable teacher file (float16 weights, metadata); returns its size in bytes.

    ``acc``: its accuracy (%) with exactly these weights (measure it on :func:`round_to_half`'s
    copy); ``info``: plain data recorded beside it (the evaluation split, training settings...).
    """
    small = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    kept = []
    for name, t in list(small.named_parameters()) + list(small.named_buffers()):
        if _halvable(t):
            t.data = t.data.to(torch.float16)
        elif t.is_floating_point() and t.dtype != torch.float16:
            kept.append(name)
    teacher = {"format": TEACHER_FORMAT, "dataset": dataset, "acc": acc, "stored_dtype": "float16",
               "float32_tensors": kept, **info}
    save(small, path, arch=arch, arch_kwargs=arch_kwargs, teacher=teacher)
    return os.path.getsize(path)


def teacher_info(path: str) -> dict:
    """The ``teacher`` metadata of a file written by :func:`save_teacher` (``{}`` for other model files)."""
    meta = read(path, map_location="cpu")["metadata"]
    info = meta.get("teacher")
    return dict(info) if isinstance(info, dict) else {}


def load_teacher(path: str, *, arch: Optional[str] = None, dataset: Optional[str] = None,
                 num_classes: Optional[int] = None) -> Tuple[nn.Module, dict]:
    """Load a teacher file on the CPU, in float32, after checking it; returns ``(model, info)``.

    Checks, each a :class:`lopfast.ModelFileError` naming ``path``: the file's content (its
    digest, :func:`lopfast.io.read_payload`), the architecture is ``arch``, the data set is
    ``dataset`` and the classifier has ``num_classes`` outputs (each when given and recorded).
    ``info`` is the recorded metadata (``{}`` for a plain :func:`lopfast.save` file).
    """
    payload = read(path, map_location="cpu")
    meta = payload["metadata"]
    info = dict(meta["teacher"]) if isinstance(meta.get("teacher"), dict) else {}
    if "digest" in info and tensor_digest(payload["state_dict"]) != info["digest"]:
        raise ModelFileError(f"{path}: the stored weights do not match the teacher file's digest (damaged or "
                             "edited after it was written); train the teacher again or copy the file anew")
    if arch is not None and isinstance(meta.get("arch"), str) and meta["arch"] != arch:
        raise ModelFileError(f"{path}: this teacher is a {meta['arch']}, but the run's model is {arch}; pass a "
                             f"teacher of {arch} or change the model")
    if dataset is not None and info.get("dataset") not in (None, dataset):
        raise ModelFileError(f"{path}: this teacher was trained on {info['dataset']}, but the run's data set is "
                             f"{dataset}")
    kwargs = meta.get("arch_kwargs") if isinstance(meta.get("arch_kwargs"), dict) else {}
    if num_classes is not None and kwargs.get("num_classes") not in (None, num_classes):
        raise ModelFileError(f"{path}: this teacher has {kwargs['num_classes']} classes, the data has {num_classes}")
    model = load(path, map_location="cpu")
    return model.float(), info
