"""Precision and determinism policy shared by every lopfast op.

``fp32_matmul_precision()`` says how fp32 matrix products may run: ``"ieee"`` (full fp32, PyTorch's
default) unless the user asked for TF32 through PyTorch's own switch:

* torch >= 2.9: ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (``"none"`` there inherits
  ``torch.backends.fp32_precision``); ``torch.set_float32_matmul_precision("high")`` sets it too;
* older torch: ``torch.backends.cuda.matmul.allow_tf32 = True``.

The new getter is read first: reading the legacy ``allow_tf32`` after the new API was used raises
a RuntimeError on torch >= 2.9 ("mix of the legacy and new APIs"), so the legacy flag is only a
fallback, and any error while reading falls back to IEEE (never raises).

Ops read the policy once per call, in Python before any kernel launch, and pass it down as a
plain argument. Under torch.compile the read is a constant of the traced graph
(``assume_constant_result``); Dynamo's global-state guard covers the TF32 flag, so changing it
recompiles rather than reusing a graph traced with the old setting.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["autocast_dtype", "deterministic", "fp32_matmul_precision"]


def _read_fp32_precision() -> str:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        try:
            p = str(matmul.fp32_precision)
            if p == "none":  # inherit the global setting
                p = str(getattr(torch.backends, "fp32_precision", "none"))
            return "tf32" if p == "tf32" else "ieee"
        except Exception:  # pragma: no cover - a torch whose new getter misbehaves
            pass
    try:
        return "tf32" if bool(matmul.allow_tf32) else "ieee"
    except Exception:  # pragma: no cover - mixing APIs may raise on some versions
        return "ieee"


@torch.compiler.assume_constant_result
def fp32_matmul_precision() -> str:
    """``"tf32"`` when the user allowed TF32 for fp32 matmuls, else ``"ieee"`` (never raises)."""
    return _read_fp32_precision()


def deterministic() -> bool:
    """True when ``torch.use_deterministic_algorithms(True)`` is on: ops then avoid atomics."""
    return bool(torch.are_deterministic_algorithms_enabled())


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes matrix products in on ``device_type`` right now (bf16 / fp16),
    or None when autocast is off there: the step's precision, which the collapse follows
    (``lopfast.ops.collapse.collapse_many(dtype=...)``, ``lopfast.CollapsedForward``)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # pragma: no cover - torch < 2.4: the old per-device getters
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None
