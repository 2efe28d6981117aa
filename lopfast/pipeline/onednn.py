"""A workaround for a oneDNN heap corruption in the backward of strided 1x1 convs on CPU.

:func:`onednn_conv_guard` is entered by :func:`lopfast.pipeline.train.train` on CPU. The bug, its
reproduction and why the workaround is exact are below.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["onednn_conv_guard"]


# Heap corruption in oneDNN's AVX2 convolution backward ("double free or corruption",
# "corrupted size vs. prev_size", exit 134/139) for a 1x1 conv with stride > 1 on a
# channels_last (NHWC) CPU input whose channel count is not a multiple of 8. Minimal repro
# (torch 2.14.1+cu130, oneDNN v3.12.0; also torch 2.13.0; any CPU whose best ISA is AVX2, or
# ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 one; brgconv_strided:avx2 backward_data /
# jit_1x1:avx2 backward_weights in ONEDNN_VERBOSE=1):
#
#     conv = nn.Conv2d(5, 10, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
#     for _ in range(10):
#         x = torch.randn(2, 5, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
#         conv(x).sum().backward()          # MALLOC_CHECK_=3 aborts within a few steps
#
# Batch 1, stride 1, 3x3 kernels and NCHW inputs+weights ran clean in a sweep of channel counts
# 1-20; 2-6 input channels crashed (7-20 did not, but heap corruption is not always detected,
# so every channel count is treated as affected). Pruned digitsnet hits it: its 1-channel stem
# weight also counts as channels_last, so oneDNN runs the whole net NHWC, and at 97 % removed
# the downsampling shortcut keeps 5 channels. Making the input NCHW is not enough (a
# channels_last weight brings the NHWC path back). Workaround, narrow and exact: such a conv
# runs as pad -> subsample -> stride-1 1x1 conv (the same numbers: a 1x1 kernel reads one pixel
# per output), only on CPU while training; every other conv keeps oneDNN's fast paths.
# tests/test_pipeline.py::test_onednn_strided_1x1_repro runs the repro in a subprocess.
def _onednn_affected(m: nn.Module) -> bool:
    # an ExpandedConv2d is a Conv2d whose collapsed kernel has the compact shape: same test
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) != (1, 1)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _strided_1x1_as_subsample(m: nn.Conv2d):
    conv_forward = m._conv_forward  # the class's bound method

    def forward(input: torch.Tensor, weight: torch.Tensor, bias):
        if input.device.type != "cpu" or not torch.backends.mkldnn.enabled:
            return conv_forward(input, weight, bias)
        ph, pw = m.padding
        if ph or pw:
            input = F.pad(input, (pw, pw, ph, ph))
        sh, sw = m.stride
        return F.conv2d(input[:, :, ::sh, ::sw], weight, bias, 1, 0, 1, m.groups)

    return forward


@contextlib.contextmanager
def onednn_conv_guard(model: nn.Module):
    """While active, the strided 1x1 convs of ``model`` avoid the oneDNN AVX2 bug above on CPU.

    Yields the number of convs rerouted; they compute the same outputs and gradients.
    """
    affected = [m for m in model.modules() if _onednn_affected(m) and "_conv_forward" not in vars(m)]
    for m in affected:
        m._conv_forward = _strided_1x1_as_subsample(m)
    try:
        yield len(affected)
    finally:
        for m in affected:
            vars(m).pop("_conv_forward", None)
