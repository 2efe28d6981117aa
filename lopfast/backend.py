"""Backend selection shared by every lopfast op.

Backends:
    ``"auto"``   on CUDA tensors the fastest correct backend, measured once per op and shapes by
                 ``lopfast.dispatch`` (``LOPFAST_DISPATCH=off``: Triton when installed); the
                 PyTorch reference elsewhere.
    ``"torch"``  the plain PyTorch reference (always available; what runs on CPU).
    ``"triton"`` the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``.
    ``"cuda"``   the CUDA C++ extension (``lopfast._C``), when it was built.

``use_backend(name)`` sets the default for every op inside a ``with`` block; an op's own
``backend=`` argument wins over it. An op may add backends of its own
(``register_backend("collapse", "matmul")``); ``lopfast.dispatch`` measures which one ``auto``
runs on CUDA.

This module is the bottom of the op stack: it loads the CUDA extension itself
(``jit_extension``) and imports nothing from ``lopfast.ops``, which imports it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

# backends that exist for one op only (e.g. gemm's "matmul" collapse), by op name
_OP_BACKENDS: Dict[str, Tuple[str, ...]] = {}


def register_backend(op: str, name: str) -> None:
    """Declare an extra backend ``name`` of ``op`` (accepted by ``backend=`` and ``use_backend``).

    The op itself implements it; for other ops the name falls back to ``"auto"`` when it comes
    from ``use_backend`` and raises when passed explicitly."""
    if not isinstance(name, str) or not name or name in BACKENDS:
        raise ValueError(f"name must be a new backend name, got {name!r}")
    _OP_BACKENDS[op] = tuple(dict.fromkeys(_OP_BACKENDS.get(op, ()) + (name,)))


def op_backends(op: str) -> Tuple[str, ...]:
    """Every backend name of ``op``: the common ones plus those it registered ("auto" first)."""
    return BACKENDS + _OP_BACKENDS.get(op, ())

_default_backend: contextvars.ContextVar[str] = contextvars.ContextVar("lopfast_backend", default="auto")


def check_backend(name: object, argname: str = "backend", op: Optional[str] = None) -> str:
    """Return ``name`` if it is a known backend (of ``op``, or of any op when None), otherwise
    raise a ValueError naming ``argname``."""
    if op is not None:
        known = op_backends(op)
    else:
        known = BACKENDS + tuple(n for names in _OP_BACKENDS.values() for n in names)
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"{argname} must be one of {known}, got {name!r}")
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


def triton_version() -> Optional[str]:
    """The installed triton's version, or None without triton (for reports and cache keys)."""
    if not triton_available():
        return None
    import triton

    return triton.__version__


from lopfast._build_flags import CXX_FLAGS, NVCC_FLAGS  # noqa: E402  (one set for setup.py and the JIT build)

CSRC = Path(__file__).resolve().parents[1] / "csrc"

_jit_state: dict = {}


def jit_extension():
    """The extension compiled from ``csrc/`` on first call (cached), or None where impossible.

    Needs a CUDA build of torch, a GPU, nvcc and the source tree (an editable install);
    ``LOPFAST_JIT_CUDA=0`` turns it off."""
    if "module" in _jit_state:
        return _jit_state["module"]
    module = None
    if (
        os.environ.get("LOPFAST_JIT_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and torch.cuda.is_available()
        and CSRC.is_dir()
    ):
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is not None:
            arch = os.environ.get("LOPFAST_CUDA_ARCH")
            if arch and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch
            sources = sorted(str(p) for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
            try:
                module = cpp_extension.load(
                    name="lopfast_C_jit", sources=sources, extra_cflags=list(CXX_FLAGS),
                    extra_cuda_cflags=list(NVCC_FLAGS), extra_include_paths=[str(CSRC)], verbose=False,
                )
            except Exception as exc:  # a broken toolchain must not break the torch/triton paths
                _jit_state["error"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"lopfast: compiling the CUDA extension from {CSRC} failed: {exc}")
    _jit_state["module"] = module
    return module


def cuda_extension():
    """The compiled CUDA extension module, or None when it was not built.

    Falls back to compiling ``csrc/`` on first use where CUDA torch and nvcc exist
    (``jit_extension``)."""
    if "ext" not in _jit_state:  # looked up once: ops ask on every call under backend="auto"
        try:
            from lopfast import _C  # type: ignore[attr-defined]
        except Exception:
            _C = jit_extension()
        _jit_state["ext"] = _C
    return _jit_state["ext"]


def resolve_backend(backend: Optional[str], device: torch.device, op: str) -> str:
    """Decide which implementation of ``op`` runs for tensors on ``device``.

    Returns ``"torch"``, ``"triton"``, ``"cuda"`` or a backend ``op`` registered (``register_backend``;
    the op checks that one's availability). An explicit request that cannot be
    honoured raises a RuntimeError that says why, rather than silently falling back.
    """
    name = check_backend("auto" if backend is None else backend, op=op)
    if name == "auto":
        name = get_backend()
        if name not in op_backends(op):  # use_backend("matmul") around an op without it
            name = "auto"
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
    return name  # "torch", or a backend the op registered (the op checks its availability)


def is_auto(backend: Optional[str], op: Optional[str] = None) -> bool:
    """True when ``backend`` (an op's argument) leaves the choice to lopfast: None or "auto",
    and no ``use_backend`` block names a backend of ``op``. Where this holds on CUDA, the op asks
    ``lopfast.dispatch.choose`` for the measured fastest backend."""
    if backend is not None and backend != "auto":
        return False
    name = get_backend()
    return name == "auto" or (op is not None and name not in op_backends(op))
