"""ExpandedLinear: a linear layer over-parameterized as 2 or 3 chained linears (paper Eq. 4-5)."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lopfast.layers.conv import _check_finite, _check_mode, warn_not_prepared
from lopfast.checks import InvalidArgumentType
from lopfast.layers.decompose import (
    check_factor_size,
    check_generator,
    check_init,
    check_rate,
    collapse_linear,
    decompose_linear,
    linear_widths,
)


def _check_depth(depth: object) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth not in (2, 3):
        raise ValueError(f"depth must be 2 or 3 (the paper expands a linear layer into 2-3 layers), got {depth!r}")
    return depth


def effective_matrix(*factors: torch.Tensor) -> torch.Tensor:
    """The effective weight W_depth ... W_1 of an expanded linear's factors (first layer first),
    in their dtype whatever autocast says; one opaque call for ``torch.fx`` (its autocast
    context reads the factors' device, which symbolic tracing cannot)."""
    with torch.autocast(factors[0].device.type, enabled=False):
        return collapse_linear(list(factors))


torch.fx.wrap("effective_matrix")


class ExpandedLinear(nn.Linear):
    """A drop-in ``nn.Linear`` whose weight is the product of ``depth`` chained linears.

    Parameters ``weight1`` ... ``weight{depth}`` with widths [m, p, ..., p, n],
    p = ceil(rate * min(m, n)) (enough for every factor to have the one-sided inverse Eq. 5
    needs, while a wide classifier head stays cheap), and ``bias`` (n,) on the last factor.
    ``mode`` is ``"collapsed"`` (one matmul with ``effective_weight()``) or ``"chain"``;
    ``weight`` is a read-only view of the effective weight; ``contract()`` returns the plain
    ``nn.Linear``. The constructor gives a fresh layer with the variance of a default
    ``nn.Linear``; ``from_linear`` expands a trained one exactly.
    """

    _fake_quantizes = False  # True on the quantization-aware subclass (lopfast.layers.qat)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rate: float = 3.0,
        depth: int = 2,
        init: str = "orthogonal",
        device=None,
        dtype=None,
    ) -> None:
        rate = check_rate(rate)
        depth = _check_depth(depth)
        check_init(init)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InvalidArgumentType("dtype", dtype, "a floating-point torch.dtype or None")
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.rate = rate
        self.depth = depth
        self.init = init
        self._mode = "collapsed"
        widths = linear_widths(in_features, out_features, rate, depth)
        factory = {"device": device, "dtype": dtype}
        check_factor_size(sum(a * b for a, b in zip(widths, widths[1:])), rate, device, dtype,
                          f"a {in_features}->{out_features} linear")
        for i in range(depth):
            self.register_parameter(f"weight{i + 1}", nn.Parameter(torch.empty(widths[i + 1], widths[i], **factory)))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def factors(self) -> List[torch.Tensor]:
        """The chain's weights, first layer first."""
        return [getattr(self, f"weight{i + 1}") for i in range(self.depth)]

    def reset_parameters(self) -> None:
        """Random factors whose product has the variance of a default nn.Linear weight (1/(3 m))."""
        if not hasattr(self, "weight1"):
            return
        factors = self.factors()
        with torch.no_grad():
            for f in factors[1:]:  # each later factor preserves the variance of what it multiplies
                nn.init.normal_(f, std=1.0 / math.sqrt(f.shape[1]))
            nn.init.normal_(factors[0], std=1.0 / math.sqrt(3.0 * self.in_features))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rate: float = 3.0,
        *,
        depth: int = 2,
        init: str = "orthogonal",
        generator: Optional[torch.Generator] = None,
    ) -> "ExpandedLinear":
        """Expand a trained ``nn.Linear`` into an exactly equivalent chain (Eq. 5, solved in float64)."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, ExpandedLinear):
            raise TypeError(f"linear must be an nn.Linear (not already expanded), got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError("linear is a lazy module whose weight is not initialised yet; run it once first")
        rate = check_rate(rate)
        depth = _check_depth(depth)
        check_init(init)
        check_generator(generator)
        _check_finite(linear.weight, "linear.weight")
        if linear.bias is not None:
            _check_finite(linear.bias, "linear.bias")
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            rate=rate, depth=depth, init=init, device="meta",
        )
        widths = linear_widths(linear.in_features, linear.out_features, rate, depth)
        # decompose_linear works in float64 on the CPU before the factors move to the layer's device
        check_factor_size(sum(a * b for a, b in zip(widths, widths[1:])), rate, "cpu", torch.float64,
                          f"a {linear.in_features}->{linear.out_features} linear")
        factors = decompose_linear(linear.weight, widths, init=init, generator=generator)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        for i, f in enumerate(factors):
            setattr(new, f"weight{i + 1}", nn.Parameter(f.to(**factory)))
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone())
        new.train(linear.training)
        return new

    @property
    def mode(self) -> str:
        """``"collapsed"`` (one matmul on the effective weight) or ``"chain"`` (``depth`` matmuls)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _check_mode(value)

    def effective_weight(self) -> torch.Tensor:
        """The differentiable effective weight W_depth ... W_1, shape (out_features, in_features)."""
        return effective_matrix(*self.factors())

    def effective_bias(self) -> Optional[torch.Tensor]:
        """The effective bias (carried by the last factor)."""
        return self.bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """Read-only view of ``effective_weight()``."""
        return self.effective_weight()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("qconfig") is not None and not self._fake_quantizes:
            warn_not_prepared(self)
        if self._mode == "collapsed":
            return F.linear(input, self.effective_weight(), self.bias)
        factors = self.factors()
        h = input
        for f in factors[:-1]:
            h = F.linear(h, f)
        return F.linear(h, factors[-1], self.bias)

    @torch.no_grad()
    def contract(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the collapsed weight and bias."""
        w = self.effective_weight()
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        widths = [self.in_features] + [f.shape[0] for f in self.factors()]
        return f"{super().extra_repr()}, rate={self.rate:g}, depth={self.depth}, widths={widths}, mode={self._mode}"

    def __setattr__(self, name, value):
        if name == "weight":
            # Tools that assign conv.weight (fusers, quantizers) must not silently
            # detach the factors: the effective weight is derived, never stored.
            raise AttributeError(
                "weight of an ExpandedLinear is the product of its factors (weight1, weight2, ...) and read-only; "
                "assign the factors, or call contract() to get a plain layer"
            )
        super().__setattr__(name, value)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_mode", "collapsed")
