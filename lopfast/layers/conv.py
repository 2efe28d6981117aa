"""ExpandedConv2d: a k x k conv over-parameterized as 1x1 -> k x k -> 1x1 (paper Sec. 2.1)."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lopfast.checks import InvalidArgument, InvalidArgumentType, check_int, check_finite_tensors
from lopfast.layers.decompose import (
    check_factor_size,
    check_generator,
    check_init,
    check_rate,
    decompose,
    expanded_width,
)
from lopfast.ops._precision import autocast_dtype
from lopfast.ops.collapse import collapse as collapse_op

MODES = ("collapsed", "chain")


def _check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _check_finite(t: torch.Tensor, argname: str) -> None:
    check_finite_tensors([(argname, t)], argname, "it cannot be expanded exactly")


def _pair(value, name: str, lo: int):
    """An int or a pair of ints, each >= ``lo`` (kernel_size, stride, dilation, padding)."""
    what = f"an int >= {lo} or a pair of them" if lo else "an int >= 0 or a pair of them"
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(items) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise InvalidArgumentType(name, value, what)
    if any(v < lo for v in items):
        raise InvalidArgument(name, value, what)
    return value


def _check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups) -> None:
    # checked here, by name, before nn.Conv2d's own checks (which let zeros through to a
    # ZeroDivisionError in the initialisation, and negative sizes to a tensor-shape error)
    check_int(in_channels, "in_channels", min=1)
    check_int(out_channels, "out_channels", min=1)
    _pair(kernel_size, "kernel_size", 1)
    _pair(stride, "stride", 1)
    _pair(dilation, "dilation", 1)
    if not isinstance(padding, str):
        _pair(padding, "padding", 0)
    check_int(groups, "groups", min=1)
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value % groups:
            raise InvalidArgument(name, value, f"a multiple of groups={groups}")


def effective_kernel(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, groups: int) -> torch.Tensor:
    """The effective kernel W3.W2.W1 of an expanded conv's factors, in the step's precision
    (see ``ExpandedConv2d.effective_weight``).

    One opaque call for ``torch.fx``: its precision choice reads the factors' dtype and
    autocast, which symbolic tracing cannot branch on, so a traced model records this call
    (``call_function``) and makes the choice when the graph runs, as the module does.
    """
    dev = w1.device.type
    dtype = autocast_dtype(dev) if w1.dtype == torch.float32 else None
    with torch.autocast(dev, enabled=False):
        # backend "auto": the Triton kernel on CUDA, the einsum reference on CPU
        return collapse_op(w1, w2, w3, groups, dtype=dtype)


torch.fx.wrap("effective_kernel")


def warn_not_prepared(layer: nn.Module) -> None:
    """Say (once per place) that an expanded layer holds a qconfig but was not swapped for its
    quantization-aware form: torch's own mappings key on exact classes and skip it silently."""
    warnings.warn(f"a {type(layer).__name__} has a qconfig but no fake quantization: torch's prepare_qat / prepare "
                  "mappings do not know expanded layers; pass mapping=lopfast.qat.qat_module_mappings() to "
                  "prepare_qat (or use prepare_qat_fx with lopfast.qat's configs), or quantize the contracted model",
                  stacklevel=3)


class ExpandedConv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` whose kernel is the product of a 1x1 -> kxk -> 1x1 chain.

    Parameters ``weight1`` (p, m/G, 1, 1), ``weight2`` (q, p/G, kh, kw), ``weight3``
    (n, q/G, 1, 1) and ``bias`` (n,) with p = G*ceil(rate*m/G), q = G*ceil(rate*n/G) for
    ``groups=G`` (expansion inside each group, so depthwise convs stay depthwise). Padding
    belongs to the first layer, stride and dilation to the middle one, the bias to the last,
    so the chain computes exactly ``conv(x, W3.W2.W1) + bias``.

    ``mode``:
        ``"collapsed"`` (default) runs one conv with the effective kernel
        ``effective_weight()``: the cost of the compact conv plus a small weight-space
        product, with the same outputs and gradients as the chain.
        ``"chain"`` runs the three convs literally (the paper's and ExpandNets' way).

    It subclasses ``nn.Conv2d`` so that tools which look for convs with ``isinstance`` (FLOP
    counters, hyper-parameter readers) still find one: ``weight`` is a read-only property
    returning the differentiable effective kernel, and ``in_channels``, ``kernel_size``,
    ``stride`` ... are those of the compact conv. ``contract()`` returns the plain ``nn.Conv2d``
    to deploy. Tools keyed on exact classes do not see it, quantization among them: torch's
    ``prepare_qat`` swaps only the classes in its mapping, so quantization-aware training goes
    through ``lopfast.layers.qat`` (its mapping for eager ``prepare_qat``, its configs for
    ``prepare_qat_fx``), which fake-quantizes the collapsed kernel. ``torch.fx`` traces it
    (``effective_kernel`` is recorded as one call) and ``torch.export`` exports it.

    The constructor builds a fresh layer for training from scratch (ExpandNets-style), its
    factors scaled so the effective kernel has the variance of a default ``nn.Conv2d``;
    ``from_conv`` expands a trained conv exactly (paper Eq. 3).
    """

    _fake_quantizes = False  # True on the quantization-aware subclasses (lopfast.layers.qat)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]],
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Union[str, int, Tuple[int, int]] = 0,
        dilation: Union[int, Tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rate: float = 3.0,
        init: str = "orthogonal",
        device=None,
        dtype=None,
    ) -> None:
        rate = check_rate(rate)
        check_init(init)
        _check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InvalidArgumentType("dtype", dtype, "a floating-point torch.dtype or None")
        # nn.Conv2d.__init__ would register a `weight` Parameter, which our read-only
        # `weight` property forbids; borrow its argument checks through a meta-device probe.
        probe = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias, padding_mode, device="meta",
        )
        nn.Module.__init__(self)
        for attr in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "transposed", "output_padding", "groups", "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(self, attr, getattr(probe, attr))
        self.rate = rate
        self.init = init
        self._mode = "collapsed"
        G = groups
        m_g, n_g = in_channels // G, out_channels // G
        p_g, q_g = expanded_width(rate, m_g), expanded_width(rate, n_g)
        kh, kw = self.kernel_size
        factory = {"device": device, "dtype": dtype}
        check_factor_size(G * p_g * m_g + G * q_g * p_g * kh * kw + out_channels * q_g, rate, device, dtype,
                          f"a {in_channels}->{out_channels} {kh}x{kw} conv")
        self.weight1 = nn.Parameter(torch.empty(G * p_g, m_g, 1, 1, **factory))
        self.weight2 = nn.Parameter(torch.empty(G * q_g, p_g, kh, kw, **factory))
        self.weight3 = nn.Parameter(torch.empty(out_channels, q_g, 1, 1, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        """Random factors whose product has the variance of a default nn.Conv2d kernel.

        nn.Conv2d draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in). With
        W1 ~ N(0, 1/p_g), W3 ~ N(0, 1/q_g) and W2 ~ N(0, 1/(3 fan_in)) every entry of
        W3.W2.W1 (a sum of p_g*q_g independent products) has exactly that variance.
        """
        if not hasattr(self, "weight1"):
            return
        p_g, q_g = self.weight2.shape[1], self.weight3.shape[1]
        fan_in = self.weight1.shape[1] * self.kernel_size[0] * self.kernel_size[1]
        with torch.no_grad():
            nn.init.normal_(self.weight1, std=1.0 / math.sqrt(p_g))
            nn.init.normal_(self.weight2, std=1.0 / math.sqrt(3.0 * fan_in))
            nn.init.normal_(self.weight3, std=1.0 / math.sqrt(q_g))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rate: float = 3.0,
        *,
        init: str = "orthogonal",
        generator: Optional[torch.Generator] = None,
    ) -> "ExpandedConv2d":
        """Expand a trained conv into an exactly equivalent chain (paper Eq. 3).

        The outer factors are random (orthonormal columns/rows for ``init="orthogonal"``,
        Gaussian for ``"normal"``), the middle one is solved in float64. Orthogonal factors
        reproduce the conv to float32 rounding; Gaussian ones (the paper's literal choice)
        amplify the rounding of the stored factors by cond(W1)*cond(W3), which for a rate
        near 1 (square random matrices) can reach 1e3 or more. ``generator`` (a CPU
        ``torch.Generator``) makes the draw reproducible. The result lives on the conv's
        device and dtype and has its ``training`` flag.
        """
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, ExpandedConv2d):
            raise TypeError(
                "conv must be an nn.Conv2d (ConvTranspose, Conv1d, Conv3d and already expanded "
                f"layers are not supported), got {type(conv).__name__}"
            )
        if isinstance(conv.weight, nn.parameter.UninitializedParameter):
            raise ValueError("conv is a lazy module whose weight is not initialised yet; run it once first")
        rate = check_rate(rate)
        check_init(init)
        check_generator(generator)
        _check_finite(conv.weight, "conv.weight")
        if conv.bias is not None:
            _check_finite(conv.bias, "conv.bias")
        weight = conv.weight
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            rate=rate, init=init, device="meta",
        )
        # decompose works in float64 on the CPU before the factors move to the conv's device
        check_factor_size(new.weight1.numel() + new.weight2.numel() + new.weight3.numel(), rate, "cpu",
                          torch.float64, f"a {conv.in_channels}->{conv.out_channels} {new.kernel_size[0]}x"
                          f"{new.kernel_size[1]} conv")
        w1, w2, w3 = decompose(weight, conv.groups, rate, init=init, generator=generator)
        factory = {"device": weight.device, "dtype": weight.dtype}
        new.weight1 = nn.Parameter(w1.to(**factory))
        new.weight2 = nn.Parameter(w2.to(**factory))
        new.weight3 = nn.Parameter(w3.to(**factory))
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.detach().clone())
        new.train(conv.training)
        return new

    # ------------------------------------------------------------------ mode
    @property
    def mode(self) -> str:
        """``"collapsed"`` (one conv on the effective kernel) or ``"chain"`` (three convs)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _check_mode(value)

    # ------------------------------------------------------------------ effective kernel
    def effective_weight(self) -> torch.Tensor:
        """The differentiable effective kernel W3.W2.W1, shape (n, m/G, kh, kw).

        Its precision follows the step's: in the parameters' dtype, except fp32 factors under
        autocast (bf16 / fp16), which are multiplied in autocast's dtype with fp32 accumulation
        and give the kernel in that dtype, the one the autocast conv casts it to anyway
        (``lopfast.ops.collapse.collapse_many``, ``dtype``; the error is stated there).
        """
        # A model-level fast path (lopfast.CollapsedForward) may have collapsed every layer
        # of the model in one grouped launch already; use its result for this forward.
        stashed = self.__dict__.get("_lopfast_weff")
        if stashed is not None:
            return stashed
        return effective_kernel(self.weight1, self.weight2, self.weight3, self.groups)

    def effective_bias(self) -> Optional[torch.Tensor]:
        """The effective bias (the last layer's bias: the first two carry none)."""
        return self.bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """Read-only view of ``effective_weight()`` for tools that expect ``conv.weight``."""
        return self.effective_weight()

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("qconfig") is not None and not self._fake_quantizes:
            warn_not_prepared(self)
        if self._mode == "collapsed":
            return self._conv_forward(input, self.effective_weight(), self.bias)
        return self.chain_forward(input)

    def chain_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The three convolutions run literally: pad -> 1x1 -> kxk (stride, dilation) -> 1x1 + bias."""
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        if any(self._reversed_padding_repeated_twice):
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
        h = F.conv2d(input, self.weight1, None, 1, 0, 1, self.groups)
        h = F.conv2d(h, self.weight2, None, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(h, self.weight3, self.bias, 1, 0, 1, self.groups)

    # ------------------------------------------------------------------ contraction
    @torch.no_grad()
    def contract(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with this layer's hyper-parameters and collapsed weight/bias."""
        with torch.autocast(self.weight1.device.type, enabled=False):  # full precision, whatever the caller's
            w = self.effective_weight()
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.bias is not None, self.padding_mode,
            device=w.device, dtype=w.dtype,
        )
        conv.weight.copy_(w)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rate={self.rate:g}, mode={self._mode}, "
            f"p={self.weight1.shape[0]}, q={self.weight2.shape[0]}"
        )

    def __setattr__(self, name, value):
        if name == "weight":
            # Tools that assign conv.weight (fusers, quantizers) must not silently
            # detach the factors: the effective weight is derived, never stored.
            raise AttributeError(
                "weight of an ExpandedConv2d is the product of its factors (weight1, weight2, ...) and read-only; "
                "assign the factors, or call contract() to get a plain layer"
            )
        super().__setattr__(name, value)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_mode", "collapsed")
