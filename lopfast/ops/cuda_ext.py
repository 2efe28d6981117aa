"""The CUDA C++ extension (``lopfast._C``, sources in ``csrc/``): loading and autograd wrappers.

``lopfast._C`` is built by ``LOPFAST_BUILD_CUDA=1 pip install --no-build-isolation .``. When it
was not built, ``jit_extension()`` compiles ``csrc/`` on first use with
``torch.utils.cpp_extension.load`` (``lopfast.backend.jit_extension``; needs a CUDA build of
torch, nvcc, and the source tree, i.e. an editable install; ``LOPFAST_JIT_CUDA=0`` turns this
off). Everything else gets None, and ``lopfast.backend.resolve_backend`` raises a RuntimeError naming CUDA for ``backend="cuda"``.
Both builds use the flags of ``lopfast/_build_flags.py``. A JIT build that fails where it should
work (CUDA torch, a GPU, nvcc) warns and keeps the error: ``jit_build_error()`` returns it, and
the tests fail on it rather than skipping.
"""
from __future__ import annotations

from typing import Sequence

import torch

# The loader lives in lopfast.backend (below the ops); re-exported here for callers of the
# old location.
from lopfast.backend import CSRC, _jit_state, cuda_extension, jit_extension  # noqa: F401


def can_build() -> bool:
    """True where the JIT build is expected to work: CUDA torch, a GPU, nvcc, the csrc/ sources."""
    if torch.version.cuda is None or not torch.cuda.is_available() or not CSRC.is_dir():
        return False
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None


def jit_build_error():
    """The error of a failed JIT build (a string), or None."""
    return _jit_state.get("error")


def _ext():
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError(
            "lopfast: the CUDA extension lopfast._C is not built (build it with "
            "`LOPFAST_BUILD_CUDA=1 pip install --no-build-isolation .` on a machine with CUDA torch and nvcc)"
        )
    return ext


class CollapseCuda(torch.autograd.Function):
    """One chain collapsed by the CUDA C++ kernels: 2 launches forward, 5 backward."""

    @staticmethod
    def forward(ctx, w1, w2, w3, groups):
        ctx.save_for_backward(w1, w2, w3)
        ctx.groups = groups
        return _ext().collapse_forward(w1.contiguous(), w2.contiguous(), w3.contiguous(), int(groups))

    @staticmethod
    def backward(ctx, grad):
        w1, w2, w3 = ctx.saved_tensors
        d1, d2, d3 = _ext().collapse_backward(
            w1.contiguous(), w2.contiguous(), w3.contiguous(), ctx.groups, grad.to(w1.dtype).contiguous()
        )
        return d1, d2, d3, None


class SPLossCuda(torch.autograd.Function):
    """SP Gram loss over (student, teacher) pairs by the CUDA C++ kernels.

    ``apply(n, *students, *teachers)``: returns the 0-d loss (fp32; fp64 for fp64 features).
    Teachers get no gradient (they are the distillation target)."""

    @staticmethod
    def forward(ctx, n: int, *feats):
        students = [f.reshape(f.shape[0], -1).contiguous() for f in feats[:n]]
        teachers = [f.detach().reshape(f.shape[0], -1).to(students[0].dtype).contiguous() for f in feats[n:]]
        ctx.save_for_backward(*students, *teachers)
        ctx.n = n
        ctx.shapes = [f.shape for f in feats[:n]]
        ctx.dtypes = [f.dtype for f in feats[:n]]
        return _ext().sp_loss_forward(students, teachers)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n = ctx.n
        grads = _ext().sp_loss_backward(list(saved[:n]), list(saved[n:]), grad.contiguous())
        out = [g.reshape(s).to(dt) for g, s, dt in zip(grads, ctx.shapes, ctx.dtypes)]
        return (None, *out, *([None] * n))


def sp_loss_cuda(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor]) -> torch.Tensor:
    """SP loss sum_pairs |Gn_T - Gn_S|_F^2 / b^2 on the CUDA C++ backend (differentiable in students)."""
    students, teachers = list(students), list(teachers)
    if len(students) != len(teachers) or not students:
        raise ValueError("sp_loss_cuda: need the same positive number of student and teacher features")
    return SPLossCuda.apply(len(students), *students, *teachers)


__all__ = ["CollapseCuda", "SPLossCuda", "can_build", "jit_build_error", "jit_extension", "sp_loss_cuda"]
