"""Model zoo for the pipeline: CIFAR ResNets, VGG-16, MobileNetV2, a tiny digits net, torchvision.

Every zoo builder takes ``in_channels`` and ``num_classes``. Parameter counts (10 classes,
3 input channels unless noted) are asserted in tests/test_models.py:

==================  ===========  ==========================================================
name                parameters   notes
==================  ===========  ==========================================================
``resnet20``            272,474  He et al. CIFAR ResNet 6n+2, n=3, **option-B** shortcuts
``resnet32``            466,906  n=5
``resnet56``            855,770  n=9
``resnet110``         1,730,714  n=18
``vgg16``            14,724,042  VGG-16 with BatchNorm, one 512->classes classifier
``mobilenet_v2``      2,236,682  MobileNetV2, first conv and first stride-2 stage at stride 1
``digitsnet``            77,290  (1 input channel) 2-block ResNet-ish for 8x8 digits
==================  ===========  ==========================================================

Shortcuts are option B (1x1 conv + BN projection where the shape changes, identity
elsewhere), not option A (zero-padded identity). Option A's padding ties the residual
channels through a parameter-free slicing op that structural pruners cannot trace, and has
no weights to prune; with B every channel dependency goes through a conv, so ``l1`` and the
other pruners can remove residual channels consistently. B adds ~2.7K parameters to
ResNet-20 compared with the 0.27M usually quoted for option A.

``torchvision`` ImageNet models (``resnet50``, ``mobilenet_v2_imagenet``, any name that
``torchvision.models.get_model`` knows, prefixed ``tv:``) and timm models (any name that
``timm.create_model`` knows, prefixed ``timm:``) are built lazily, with random weights: torchvision
and timm are only imported when such a model is asked for. ``in_channels`` / ``num_classes`` are
honoured for both (timm's ``in_chans``; for torchvision the stem conv is rebuilt). Saved with
``arch=<name>`` (the pipeline does), they are rebuilt by ``lopfast.load(path)`` with no ``model=``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lopfast.prune.engine import count_params  # the package's one parameter counter

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "DigitsNet",
    "MobileNetV2Cifar",
    "VGGCifar",
    "available_models",
    "build_model",
    "count_params",
]


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-B (1x1 conv + BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of n basic blocks, widths 16/32/64."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: List[nn.Module] = []
        in_planes = width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(in_planes, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class DigitsNet(nn.Module):
    """A small ResNet-ish net for the 8x8 digits demo: stem, one block at 8x8, one at 4x4."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------- VGG
VGG16_CFG: Sequence = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGGCifar(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs (5 max-pools leave 1x1x512, one linear classifier)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, cfg: Sequence = VGG16_CFG) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 project, identity when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs.

    The ImageNet net downsamples 32x; on 32x32 images that leaves 1x1 maps after the
    third stage. As in the usual CIFAR adaptation, the stem conv and the first stride-2
    stage (24 channels) run at stride 1, so the net downsamples 8x (32 -> 4).
    """

    # (expansion t, channels c, repeats n, stride s)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)]
        c = 32
        for t, out, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers += [nn.Conv2d(c, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- registry
_ZOO: Dict[str, Callable[..., nn.Module]] = {
    "digitsnet": lambda in_channels=1, num_classes=10, **kw: DigitsNet(in_channels, num_classes, **kw),
    "resnet20": lambda in_channels=3, num_classes=10, **kw: CifarResNet(20, in_channels, num_classes, **kw),
    "resnet32": lambda in_channels=3, num_classes=10, **kw: CifarResNet(32, in_channels, num_classes, **kw),
    "resnet56": lambda in_channels=3, num_classes=10, **kw: CifarResNet(56, in_channels, num_classes, **kw),
    "resnet110": lambda in_channels=3, num_classes=10, **kw: CifarResNet(110, in_channels, num_classes, **kw),
    "vgg16": lambda in_channels=3, num_classes=10, **kw: VGGCifar(in_channels, num_classes, **kw),
    "mobilenet_v2": lambda in_channels=3, num_classes=10, **kw: MobileNetV2Cifar(in_channels, num_classes, **kw),
}
# ImageNet names mapped onto torchvision; any other torchvision name works as "tv:<name>".
_TORCHVISION_ALIASES = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "mobilenet_v2_imagenet": "mobilenet_v2",
    "vgg16_imagenet": "vgg16_bn",
}


def available_models() -> List[str]:
    """Names accepted by :func:`build_model` (torchvision ones need torchvision installed)."""
    return sorted(_ZOO) + sorted(_TORCHVISION_ALIASES) + ["tv:<torchvision model name>", "timm:<timm model name>"]


def _import_torchvision():
    try:
        import torchvision  # noqa: F401
        import torchvision.models as tvm
    except Exception as exc:  # ImportError, or a broken binary install raising RuntimeError
        raise ImportError(
            f"this model needs torchvision, which could not be imported ({type(exc).__name__}: {exc}); "
            "install a torchvision matching your torch, or pick a zoo model: " + ", ".join(sorted(_ZOO))
        ) from exc
    return tvm


def check_model_name(name: object, argname: str = "model") -> str:
    """Validate a model name without building it (no torchvision import for zoo names)."""
    if not isinstance(name, str):
        raise TypeError(f"{argname} must be a model name (str), got {type(name).__name__}")
    if name in _ZOO or name in _TORCHVISION_ALIASES:
        return name
    for prefix in _PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name
    raise ValueError(f"unknown {argname} {name!r}; choose one of: {', '.join(available_models())}")


def build_model(name: str, in_channels: Optional[int] = None, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a zoo model by name (see the module docstring for the list and parameter counts).

    Args:
        name: zoo name, an ImageNet alias (``resnet50``, ``mobilenet_v2_imagenet``, ...) or
            ``"tv:<name>"`` for any torchvision classification model.
        in_channels: input image channels (default: 1 for ``digitsnet``, 3 otherwise).
        num_classes: classifier outputs.
        **kwargs: passed to the builder (e.g. ``width`` for ``digitsnet`` / ResNets).
    """
    check_model_name(name)
    if in_channels is None:
        in_channels = 1 if name == "digitsnet" else 3
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if name in _ZOO:
        try:
            return _ZOO[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
        except RuntimeError as exc:  # e.g. width=-1: a tensor of negative size, not a message about width
            raise ValueError(f"{name}: the model arguments {kwargs} do not build a model: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if name.startswith("timm:"):
        return _build_timm(name[len("timm:"):], in_channels, num_classes, **kwargs)
    tvm = _import_torchvision()
    tv_name = _TORCHVISION_ALIASES.get(name, name[3:] if name.startswith("tv:") else name)
    if tv_name not in tvm.list_models():
        raise ValueError(f"torchvision has no model {tv_name!r}; its classifiers are: "
                         f"{', '.join(tvm.list_models(module=tvm))}")
    if kwargs.get("weights") is not None:
        raise ValueError("weights: lopfast builds models with random weights (no network); load trained "
                         "weights into the built model yourself")
    kwargs.pop("weights", None)
    if tv_name in ("googlenet", "inception_v3"):
        # PyTorch's default layer init: torchvision's own (init_weights=True, truncated normal with
        # std 0.01) shrinks the signal so much that random-weight logits are the bias alone
        kwargs.setdefault("init_weights", False)
        # as torchvision builds them with pretrained weights: the auxiliary heads run only in
        # training, so the pruner (which traces the eval forward) cannot see their inputs
        kwargs.setdefault("aux_logits", False)
    model = tvm.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first conv that reads the 3 image channels for one reading ``in_channels``."""
    for mod_name, m in model.named_modules():
        if type(m) is nn.Conv2d and m.in_channels == 3 and m.groups == 1:
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1,
                            m.bias is not None, m.padding_mode)
            _set(model, mod_name, new)
            return
    raise ValueError(f"in_channels={in_channels}: found no 3-channel stem conv to replace in {type(model).__name__}")


def _import_timm():
    try:
        import timm
    except Exception as exc:
        raise ImportError(f"timm: models need timm, which could not be imported ({type(exc).__name__}: {exc}); "
                          "pip install timm (or lopfast[models])") from exc
    return timm


def _build_timm(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    timm = _import_timm()
    if kwargs.pop("pretrained", False):
        raise ValueError("pretrained: lopfast builds models with random weights (no network); load trained "
                         "weights into the built model yourself")
    if not timm.list_models(name):
        raise ValueError(f"timm has no model {name!r} (timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


# name prefix -> the library it comes from (lazily imported)
_PREFIXES = {"tv:": "torchvision", "timm:": "timm"}


def register_zoo() -> bool:
    """Register every zoo builder with ``lopfast.io.register_architecture`` (if io exists).

    Lets ``lopfast.load(path)`` rebuild models saved with ``arch=<zoo name>``. Returns whether
    the registration happened.
    """
    try:
        from lopfast.io import register_architecture  # type: ignore
    except Exception:
        return False
    for name in list(_ZOO) + list(_TORCHVISION_ALIASES):
        try:
            register_architecture(name, lambda _n=name, **kw: build_model(_n, **kw))
        except Exception:
            pass  # already registered (e.g. module reloaded) or io declined: not fatal
    try:  # tv:<name> / timm:<name>: one builder per prefix (io versions before it have no prefixes)
        from lopfast.io import register_architecture_prefix  # type: ignore
    except Exception:
        return True
    for prefix in _PREFIXES:
        try:
            register_architecture_prefix(prefix, build_model)
        except Exception:
            pass
    return True


# --------------------------------------------------------------------------- helpers
def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def max_removable_fraction(model: nn.Module, in_channels: Optional[int] = None) -> float:
    """Upper bound on the fraction of parameters channel pruning can remove from ``model``.

    Every prunable layer keeps at least one channel; the input channels of the first conv
    and the classifier outputs can never go. Used to reject impossible targets up front.
    """
    total = count_params(model)
    keep = 0
    first_conv = True
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            cin = m.in_channels if first_conv else 1
            keep += cin * k + (1 if m.bias is not None else 0)
            first_conv = False
        elif isinstance(m, nn.Linear):
            out = m.out_features if m is linears[-1] else 1
            keep += out + (out if m.bias is not None else 0)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            keep += 2
    return max(0.0, 1.0 - keep / max(total, 1))
