"""Compiler flags of the CUDA C++ extension, shared by ``setup.py`` and the JIT build.

Plain constants, no imports: ``setup.py`` loads this file by path (importing ``lopfast`` would
import torch before setuptools has decided anything), ``lopfast.ops.cuda_ext`` imports it. One set
of flags, so the extension built by ``pip install`` and the one compiled on first use compute the
same numbers. No ``--use_fast_math``: it flushes denormals and uses approximate division and
square roots, which the float64/fp32 checks against the reference would feel.
"""

# no -std: torch's build helper adds the standard its headers need (c++17 or c++20 by version)
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]
DEFAULT_ARCHS = "90"  # Hopper (H100/H200); LOPFAST_CUDA_ARCH overrides, e.g. "80;90"


def gencode_flags(archs: str) -> list:
    """``-gencode`` flags for a list of compute capabilities such as ``"80;90"`` or ``"8.0,9.0"``."""
    out = []
    for arch in archs.replace(";", ",").split(","):
        arch = arch.strip().replace(".", "")
        if arch:
            out += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return out
