"""Quantization-aware LOP: train the expanded network with its *collapsed* weights fake-quantized.

An expanded conv computes ``conv(x, W3.W2.W1)``; what is deployed is the compact conv with that
collapsed kernel, quantized. So quantization-aware training of the expanded network fake-quantizes
the collapsed kernel (``weight_fake_quant(effective_weight())``), BatchNorm folded in first where
it is fused, exactly as ``torch.ao`` does for a plain conv; the gradients reach the factors through
the straight-through estimator and the collapse. ``lopfast.contract`` then turns every QAT expanded
layer into torch's own QAT layer (``nnqat.Conv2d``, ``nniqat.ConvBn2d``, ...) holding the collapsed
kernel and the same fake-quantizer and observers, and ``torch.ao.quantization.convert`` (eager) or
``convert_fx`` gives the int8 compact model, whose outputs equal the fake-quantized expanded
model's up to quantization rounding.

Eager mode (the model has its own ``QuantStub`` / ``DeQuantStub`` / ``FloatFunctional``)::

    from torch.ao import quantization as tq
    student = lopfast.expand(pruned).train()
    tq.fuse_modules_qat(student, [["conv1", "bn1", "relu"]], inplace=True)   # lopfast's fusers are registered
    student.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(student, mapping=lopfast.qat.qat_module_mappings(), inplace=True)
    ...                                               # fine-tune (SPDistiller works as before)
    int8 = tq.convert(lopfast.contract(student.eval()))

FX mode (no change to the model)::

    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
    qat = prepare_qat_fx(student.train(), get_default_qat_qconfig_mapping("x86"), (x,),
                         prepare_custom_config=lopfast.qat.prepare_custom_config(),
                         backend_config=lopfast.qat.backend_config())  # conv + BN (+ ReLU) fused
    ...
    int8 = convert_fx(lopfast.contract(qat.eval()))   # or convert_fx(qat, backend_config=lopfast.qat.backend_config())

Plain ``prepare_qat_fx`` without lopfast's configs also fake-quantizes the collapsed kernels (it
traces through the layers to a functional conv whose weight is the collapse), but fuses no
BatchNorm and leaves no expanded layer to contract. Without ``qat_module_mappings()``, eager
``prepare_qat`` leaves expanded layers unquantized: torch's mapping keys on exact classes.

Importing lopfast registers the fuser methods of (ExpandedConv2d, BatchNorm2d[, ReLU]) and
(ExpandedConv2d, ReLU) with ``torch.ao.quantization``, so ``fuse_modules`` (eval: BatchNorm
folded into the last factor and the bias, exactly) and ``fuse_modules_qat`` (a fused module
trained as one) work on expanded models. ``freeze_bn_stats`` / ``update_bn_stats`` are the
``model.apply`` helpers for lopfast's fused layers and torch's alike.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
import torch.ao.nn.quantized.reference as nnqr
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.quantization import fuser_method_mappings
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

from lopfast.layers.conv import ExpandedConv2d
from lopfast.layers.linear import ExpandedLinear

__all__ = [
    "ExpandedConvBn2d", "ExpandedConvBnReLU2d", "ExpandedConvReLU2d", "FUSER_METHODS", "QATExpandedConv2d",
    "QATExpandedConvBn2d", "QATExpandedConvBnReLU2d", "QATExpandedConvReLU2d", "QATExpandedLinear",
    "backend_config", "fold_bn", "freeze_bn_stats", "prepare_custom_config", "qat_module_mappings",
    "update_bn_stats",
]


# --------------------------------------------------------------------------- fused float modules
def _check_parts(fused: str, parts, kinds) -> None:
    for m, kind in zip(parts, kinds):
        if type(m) is not kind:
            raise TypeError(f"{fused} fuses an {kind.__name__} here, got {type(m).__name__}")


class ExpandedConvBn2d(nni._FusedModule):
    """An ExpandedConv2d and its BatchNorm2d, fused for quantization-aware training (what
    ``fuse_modules_qat`` makes; ``prepare_qat`` turns it into ``QATExpandedConvBn2d``)."""

    def __init__(self, conv: ExpandedConv2d, bn: nn.BatchNorm2d) -> None:
        _check_parts(type(self).__name__, (conv, bn), (ExpandedConv2d, nn.BatchNorm2d))
        super().__init__(conv, bn)

    def contract(self) -> nn.Module:
        """torch's fused float module on the contracted conv."""
        return nni.ConvBn2d(self[0].contract(), self[1])


class ExpandedConvBnReLU2d(nni._FusedModule):
    """ExpandedConv2d, BatchNorm2d and ReLU fused for quantization-aware training."""

    def __init__(self, conv: ExpandedConv2d, bn: nn.BatchNorm2d, relu: nn.ReLU) -> None:
        _check_parts(type(self).__name__, (conv, bn, relu), (ExpandedConv2d, nn.BatchNorm2d, nn.ReLU))
        super().__init__(conv, bn, relu)

    def contract(self) -> nn.Module:
        return nni.ConvBnReLU2d(self[0].contract(), self[1], self[2])


class ExpandedConvReLU2d(nni._FusedModule):
    """ExpandedConv2d and ReLU fused (quantized as one conv with a ReLU)."""

    def __init__(self, conv: ExpandedConv2d, relu: nn.ReLU) -> None:
        _check_parts(type(self).__name__, (conv, relu), (ExpandedConv2d, nn.ReLU))
        super().__init__(conv, relu)

    def contract(self) -> nn.Module:
        return nni.ConvReLU2d(self[0].contract(), self[1])


# --------------------------------------------------------------------------- QAT modules
def _carry_quant_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` (the contracted layer) what quantization preparation attached to ``src``: its
    qconfig, observer children (``activation_post_process``) and forward hooks (the observer hook)."""
    dst.qconfig = getattr(src, "qconfig", None)
    own = dict(dst.named_children())
    for name, child in src.named_children():
        if name not in own:
            setattr(dst, name, child)
    for attr in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
        getattr(dst, attr).update(getattr(src, attr))
    dst.train(src.training)
    return dst


def _dense(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the default strides of its shape (those of a layer's own weight Parameter)."""
    return w if w.stride() == torch.empty(w.shape, device="meta").stride() else w.clone(
        memory_format=torch.contiguous_format)


def _check_qconfig(mod: nn.Module) -> None:
    if not getattr(mod, "qconfig", None):
        raise ValueError(f"{type(mod).__name__} needs a qconfig to be prepared for quantization-aware training "
                         "(set model.qconfig, or pass a qconfig mapping to prepare_qat_fx)")


def _qat_conv_from(cls, conv: ExpandedConv2d, qconfig):
    """A ``cls`` sharing ``conv``'s factors and bias (no copy: an optimizer made before keeps them)."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
              conv.groups, conv.bias is not None, conv.padding_mode, rate=conv.rate, init=conv.init, device="meta")
    new.weight1, new.weight2, new.weight3, new.bias = conv.weight1, conv.weight2, conv.weight3, conv.bias
    new.qconfig = qconfig
    new.weight_fake_quant = qconfig.weight().to(conv.weight1.device)
    new.train(conv.training)
    return new


class QATExpandedConv2d(ExpandedConv2d):
    """An ExpandedConv2d for quantization-aware training: the conv runs on the fake-quantized
    collapsed kernel ``weight_fake_quant(effective_weight())`` (always collapsed: the chain has no
    single kernel to quantize). ``contract()`` gives ``torch.ao.nn.qat.Conv2d`` with that kernel,
    the same fake-quantizer and the observers attached to this layer; ``to_float()`` the compact
    ``nn.Conv2d`` (what ``convert_fx`` asks for)."""

    _FLOAT_MODULE = ExpandedConv2d
    _COMPACT = nnqat.Conv2d
    _fake_quantizes = True

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> "QATExpandedConv2d":
        """The QAT layer of ``mod`` (an ExpandedConv2d with a ``qconfig``), sharing its parameters."""
        if type(mod) is not cls._FLOAT_MODULE:
            raise TypeError(f"{cls.__name__}.from_float takes a {cls._FLOAT_MODULE.__name__}, got {type(mod).__name__}")
        _check_qconfig(mod)
        return cls._from_float(mod)

    @classmethod
    def _from_float(cls, mod: nn.Module) -> "QATExpandedConv2d":
        return _qat_conv_from(cls, mod, mod.qconfig)

    def _kernel(self) -> torch.Tensor:
        # with the strides of the contracted layer's weight: the conv then picks the same output
        # layout (the collapse can come out permuted, and a channels_last output would round
        # later reductions differently from the contracted model's)
        return _dense(self.effective_weight())

    def _fq_weight(self) -> torch.Tensor:
        return self.weight_fake_quant(self._kernel())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self._fq_weight(), self.bias)

    def _compact_args(self) -> tuple:
        return (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                self.groups, self.bias is not None, self.padding_mode)

    @torch.no_grad()
    def contract(self) -> nn.Module:
        """torch's QAT conv with the collapsed kernel, this layer's fake-quantizer and observers."""
        plain = ExpandedConv2d.contract(self)
        out = self._COMPACT(*self._compact_args(), qconfig=self.qconfig)
        out.weight, out.bias = plain.weight, plain.bias
        out.weight_fake_quant = self.weight_fake_quant
        return _carry_quant_state(self, out)

    def to_float(self) -> nn.Module:
        """The compact float layer (BatchNorm folded in where fused)."""
        return self.contract().to_float()


class QATExpandedConvReLU2d(QATExpandedConv2d):
    """``QATExpandedConv2d`` followed by ReLU (from ``ExpandedConvReLU2d``); contracts to ``nniqat.ConvReLU2d``."""

    _FLOAT_MODULE = ExpandedConvReLU2d
    _COMPACT = nniqat.ConvReLU2d

    @classmethod
    def _from_float(cls, mod: nn.Module) -> "QATExpandedConvReLU2d":
        return _qat_conv_from(cls, mod[0], mod.qconfig)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(input))


class QATExpandedConvBn2d(QATExpandedConv2d):
    """An ExpandedConv2d with its BatchNorm folded into the collapsed kernel before fake
    quantization, as ``torch.ao.nn.intrinsic.qat.ConvBn2d`` does for a plain conv: the kernel is
    scaled by gamma / sqrt(running_var + eps), fake-quantized, the conv's output scaled back and
    normalised by the BatchNorm (batch statistics while training, until ``freeze_bn_stats``).
    Contracts to ``nniqat.ConvBn2d``; ``to_float()`` folds the BatchNorm into a plain conv."""

    _FLOAT_MODULE = ExpandedConvBn2d
    _COMPACT = nniqat.ConvBn2d

    @classmethod
    def _from_float(cls, mod: nn.Module) -> "QATExpandedConvBn2d":
        new = _qat_conv_from(cls, mod[0], mod.qconfig)
        new.bn = mod[1]
        new.freeze_bn = False
        return new.train(mod.training)

    def _fq_conv(self, input: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = self.weight_fake_quant(self._kernel() * scale.reshape(-1, 1, 1, 1))
        zero = torch.zeros(self.out_channels, device=w.device, dtype=input.dtype)
        out = self._conv_forward(input, w, zero) / scale.reshape(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return bn(out)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._fq_conv(input)

    def train(self, mode: bool = True) -> "QATExpandedConvBn2d":
        """As torch's fused QAT modules: a frozen BatchNorm stays in eval mode."""
        self.training = mode
        if not getattr(self, "freeze_bn", False):
            for module in self.children():
                module.train(mode)
        return self

    def freeze_bn_stats(self) -> "QATExpandedConvBn2d":
        self.freeze_bn = True
        self.bn.training = False
        return self

    def update_bn_stats(self) -> "QATExpandedConvBn2d":
        self.freeze_bn = False
        self.bn.training = True
        return self

    @torch.no_grad()
    def contract(self) -> nn.Module:
        plain = ExpandedConv2d.contract(self)
        bn = self.bn
        out = self._COMPACT(*self._compact_args(), bn.eps, bn.momentum, self.freeze_bn, self.qconfig)
        out.weight, out.bias = plain.weight, plain.bias
        out.bn = bn
        out.weight_fake_quant = self.weight_fake_quant
        out.freeze_bn = self.freeze_bn
        return _carry_quant_state(self, out)


class QATExpandedConvBnReLU2d(QATExpandedConvBn2d):
    """``QATExpandedConvBn2d`` followed by ReLU; contracts to ``nniqat.ConvBnReLU2d``."""

    _FLOAT_MODULE = ExpandedConvBnReLU2d
    _COMPACT = nniqat.ConvBnReLU2d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(self._fq_conv(input))


class QATExpandedLinear(ExpandedLinear):
    """An ExpandedLinear for quantization-aware training on its fake-quantized collapsed weight;
    contracts to ``torch.ao.nn.qat.Linear``, ``to_float()`` gives the compact ``nn.Linear``."""

    _FLOAT_MODULE = ExpandedLinear
    _fake_quantizes = True

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> "QATExpandedLinear":
        if type(mod) is not ExpandedLinear:
            raise TypeError(f"{cls.__name__}.from_float takes an ExpandedLinear, got {type(mod).__name__}")
        _check_qconfig(mod)
        new = cls(mod.in_features, mod.out_features, mod.bias is not None, rate=mod.rate, depth=mod.depth,
                  init=mod.init, device="meta")
        for i, f in enumerate(mod.factors()):
            setattr(new, f"weight{i + 1}", f)
        new.bias = mod.bias
        new.qconfig = mod.qconfig
        new.weight_fake_quant = mod.qconfig.weight().to(mod.weight1.device)
        return new.train(mod.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight_fake_quant(_dense(self.effective_weight())), self.bias)

    @torch.no_grad()
    def contract(self) -> nn.Module:
        plain = ExpandedLinear.contract(self)
        out = nnqat.Linear(self.in_features, self.out_features, self.bias is not None, qconfig=self.qconfig)
        out.weight, out.bias = plain.weight, plain.bias
        out.weight_fake_quant = self.weight_fake_quant
        return _carry_quant_state(self, out)

    def to_float(self) -> nn.Module:
        return self.contract().to_float()


def freeze_bn_stats(mod: nn.Module) -> None:
    """``model.apply(freeze_bn_stats)``: stop updating the BatchNorm statistics of every fused
    QAT layer, lopfast's and torch's (the usual last epochs of quantization-aware training)."""
    if isinstance(mod, (QATExpandedConvBn2d, nniqat.modules.conv_fused._ConvBnNd)):
        mod.freeze_bn_stats()


def update_bn_stats(mod: nn.Module) -> None:
    """``model.apply(update_bn_stats)``: the inverse of :func:`freeze_bn_stats`."""
    if isinstance(mod, (QATExpandedConvBn2d, nniqat.modules.conv_fused._ConvBnNd)):
        mod.update_bn_stats()


# --------------------------------------------------------------------------- fusion
def fold_bn(conv: ExpandedConv2d, bn: nn.BatchNorm2d) -> ExpandedConv2d:
    """A copy of ``conv`` with the (eval-mode) BatchNorm ``bn`` folded in exactly: each output
    channel's row of the last factor scaled by gamma / sqrt(running_var + eps), the bias shifted."""
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        fused.weight3.mul_(scale.reshape(-1, 1, 1, 1).to(fused.weight3.dtype))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        bias = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0)
        fused.bias = nn.Parameter(bias.to(fused.weight3.dtype))
    return fused


def _same_mode(*mods: nn.Module) -> None:
    if len({m.training for m in mods}) != 1:
        raise ValueError("the modules to fuse must all be in the same mode (train() for QAT, eval() otherwise)")


def fuse_conv_bn(is_qat: bool, conv: ExpandedConv2d, bn: nn.BatchNorm2d) -> nn.Module:
    """Fuser method of (ExpandedConv2d, BatchNorm2d): ``ExpandedConvBn2d`` for QAT, else the
    conv with the BatchNorm folded in (``fold_bn``)."""
    _same_mode(conv, bn)
    return ExpandedConvBn2d(conv, bn) if is_qat else fold_bn(conv, bn)


def fuse_conv_bn_relu(is_qat: bool, conv: ExpandedConv2d, bn: nn.BatchNorm2d, relu: nn.ReLU) -> nn.Module:
    """Fuser method of (ExpandedConv2d, BatchNorm2d, ReLU)."""
    _same_mode(conv, bn)
    return ExpandedConvBnReLU2d(conv, bn, relu) if is_qat else ExpandedConvReLU2d(fold_bn(conv, bn), relu)


def fuse_conv_relu(is_qat: bool, conv: ExpandedConv2d, relu: nn.ReLU) -> nn.Module:
    """Fuser method of (ExpandedConv2d, ReLU)."""
    return ExpandedConvReLU2d(conv, relu)


#: the fuser methods lopfast registers with torch.ao.quantization (also usable as
#: ``fuse_custom_config_dict={"additional_fuser_method_mapping": FUSER_METHODS}``)
FUSER_METHODS: Dict[Tuple[type, ...], Callable] = {
    (ExpandedConv2d, nn.BatchNorm2d): fuse_conv_bn,
    (ExpandedConv2d, nn.BatchNorm2d, nn.ReLU): fuse_conv_bn_relu,
    (ExpandedConv2d, nn.ReLU): fuse_conv_relu,
}
# fuse_modules / fuse_modules_qat look fusers up in this table only (no registration API)
fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD.update(FUSER_METHODS)

_QAT = {
    ExpandedConv2d: QATExpandedConv2d,
    ExpandedLinear: QATExpandedLinear,
    ExpandedConvBn2d: QATExpandedConvBn2d,
    ExpandedConvBnReLU2d: QATExpandedConvBnReLU2d,
    ExpandedConvReLU2d: QATExpandedConvReLU2d,
}


def qat_module_mappings() -> Dict[type, type]:
    """torch's default QAT module mapping plus lopfast's expanded layers (for eager ``prepare_qat``)."""
    return {**get_default_qat_module_mappings(), **_QAT}


def prepare_custom_config(base=None):
    """``PrepareCustomConfig`` for ``prepare_qat_fx`` (``base``'s settings kept) that keeps expanded
    layers whole in the traced graph, one module each, so they can be fused, swapped for their
    QAT layers (``backend_config``) and contracted.

    They are declared as custom modules (whose QAT class they are swapped for before any custom
    handling), not as non-traceable ones: torch does not propagate a qconfig to a non-traceable
    child of the model's root, which would leave e.g. an expanded classifier unquantized."""
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quant_type import QuantType

    cfg = PrepareCustomConfig() if base is None else copy.deepcopy(base)
    for float_cls, qat_cls in ((ExpandedConv2d, QATExpandedConv2d), (ExpandedLinear, QATExpandedLinear)):
        cfg.set_float_to_observed_mapping(float_cls, qat_cls, QuantType.STATIC)
    return cfg


def _pattern_config(base, pattern) -> Optional[object]:
    return next((c for c in base.configs if c.pattern is pattern), None)


def backend_config(base=None):
    """A ``BackendConfig`` for FX quantization: ``base`` (default: torch's native one, fbgemm/x86
    and qnnpack) plus lopfast's patterns: ExpandedConv2d alone, with BatchNorm2d, with ReLU
    (module or functional) and with both, and ExpandedLinear, each with its fuser method, fused
    module, QAT layer and torch's reference quantized conv / linear; the dtypes are ``base``'s
    for nn.Conv2d / nn.Linear."""
    import torch.ao.quantization.backend_config.utils  # noqa: F401  (set_backend_pattern_config needs it loaded)
    from torch.ao.quantization.backend_config import BackendPatternConfig, get_native_backend_config

    cfg = get_native_backend_config() if base is None else copy.deepcopy(base)
    conv, linear = _pattern_config(cfg, nn.Conv2d), _pattern_config(cfg, nn.Linear)
    if conv is None or linear is None:
        raise ValueError("backend_config: base has no pattern for nn.Conv2d / nn.Linear to take the dtypes from")

    def quantized(pattern, root, qat, ref, src):
        c = (BackendPatternConfig(pattern).set_observation_type(src.observation_type)
             .set_dtype_configs(src.dtype_configs).set_root_module(root).set_reference_quantized_module(ref))
        return c if qat is None else c.set_qat_module(qat)

    configs = [quantized(ExpandedLinear, ExpandedLinear, QATExpandedLinear, nnqr.Linear, linear),
               quantized(QATExpandedLinear, ExpandedLinear, None, nnqr.Linear, linear)]
    for fused, qat in ((ExpandedConv2d, QATExpandedConv2d), (ExpandedConvBn2d, QATExpandedConvBn2d),
                       (ExpandedConvBnReLU2d, QATExpandedConvBnReLU2d), (ExpandedConvReLU2d, QATExpandedConvReLU2d)):
        configs += [quantized(fused, ExpandedConv2d, qat, nnqr.Conv2d, conv),
                    quantized(qat, ExpandedConv2d, None, nnqr.Conv2d, conv)]
    fusions = [((ExpandedConv2d, nn.BatchNorm2d), fuse_conv_bn, ExpandedConvBn2d)]
    for relu in (nn.ReLU, F.relu):
        fusions += [((ExpandedConv2d, nn.BatchNorm2d, relu), fuse_conv_bn_relu, ExpandedConvBnReLU2d),
                    ((ExpandedConv2d, relu), fuse_conv_relu, ExpandedConvReLU2d)]
    for pattern, fuser, fused in fusions:
        configs.append(BackendPatternConfig(pattern).set_dtype_configs(conv.dtype_configs)
                       .set_fuser_method(fuser).set_fused_module(fused))
    return cfg.set_backend_pattern_configs(configs)
