"""Backend selection shared by every lopfast op.

Backends:
    ``"auto"``   Triton on CUDA tensors when Triton is installed, the PyTorch reference elsewhere.
    ``"torch"``  the plain PyTorch reference (always available; what runs on CPU).
    ``"triton"`` the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``.
    ``"cuda"``   the CUDA C++ extension (``lopfast._C``), when it was built.

``use_backend(name)`` sets the default for every op inside a ``with`` block; an op's own
``backend=`` argument wins over it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

_default_backend: contextvars.ContextVar[str] = contextvars.ContextVar("lopfast_backend", default="auto")


def check_backend(name: object, argname: str = "backend") -> str:
    """Return ``name`` if it is a known backend, otherwise raise a ValueError naming ``argname``."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argname} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: make ``name`` the default backend of every lopfast op inside it.

    >>> with lopfast.use_backend("torch"):
    ...     loss = lopfast.sp_loss(student_feats, teacher_feats)
    """
    token = _default_backend.set(check_backend(name, "name"))
    try:
        yield name
    finally:
        _default_backend.reset(token)


def get_backend() -> str:
    """The backend that ``backend="auto"`` arguments currently defer to (set by ``use_backend``)."""
    return _default_backend.get()


def triton_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    from lopfast.kernels import HAS_TRITON

    return HAS_TRITON


def cuda_extension():
    """The compiled CUDA extension module, or None when it was not built.

    Falls back to compiling ``csrc/`` on first use where CUDA torch and nvcc exist
    (``lopfast.ops.cuda_ext.jit_extension``)."""
    try:
        from lopfast import _C  # type: ignore[attr-defined]
    except Exception:
        from lopfast.ops.cuda_ext import jit_extension

        return jit_extension()
    return _C


def resolve_backend(backend: Optional[str], device: torch.device, op: str) -> str:
    """Decide which implementation of ``op`` runs for tensors on ``device``.

    Returns ``"torch"``, ``"triton"`` or ``"cuda"``. An explicit request that cannot be
    honoured raises a RuntimeError that says why, rather than silently falling back.
    """
    name = check_backend("auto" if backend is None else backend)
    if name == "auto":
        name = get_backend()
    if name == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 to run the kernels on CPU through the interpreter"
            )
        return "triton"
    if name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' needs CUDA tensors (got {device.type})")
        if cuda_extension() is None:
            raise RuntimeError(
                f"{op}: backend 'cuda' requested but the CUDA extension lopfast._C is not built; "
                "build it with `LOPFAST_BUILD_CUDA=1 pip install --no-build-isolation .`"
            )
        return "cuda"
    return "torch"
