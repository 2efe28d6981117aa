"""Triton kernels and their launchers (installed as ``lopfast.kernels``).

Tensors in, tensors out: nothing here imports ``torch.nn`` or the rest of lopfast, so the
kernels can be read, tested and benchmarked on their own. ``triton`` is optional; the
modules that need it import it themselves and ``HAS_TRITON`` says whether it is there.
"""
try:  # triton is an optional dependency (present with CUDA builds of torch on Linux)
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
