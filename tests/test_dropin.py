"""lopfast inside other people's training code: torch.fx / torch.export of the expanded layers,
distiller hooks that survive pickling and deep copies, and torch.compile before or after the distiller."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import lopfast
from lopfast.pipeline.models import build_model


def _conv_net(c=3, w=8, classes=4):
    return nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                         nn.Conv2d(w, w, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, classes))


# --------------------------------------------------------------------------- torch.fx / torch.export
@pytest.mark.parametrize("mode", ["collapsed", "chain"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_expanded_conv_traces_with_fx_bit_identical(mode, padding_mode):
    m = lopfast.ExpandedConv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode, rate=2)
    m.mode = mode
    x = torch.randn(2, 4, 7, 7)
    gm = torch.fx.symbolic_trace(m)
    assert torch.equal(gm(x), m(x))
    gm(x).sum().backward()  # the traced graph is differentiable through the factors
    assert m.weight1.grad is not None


@pytest.mark.parametrize("depth", [2, 3])
def test_expanded_linear_traces_with_fx_bit_identical(depth):
    m = lopfast.ExpandedLinear(5, 3, depth=depth)
    x = torch.randn(4, 5)
    gm = torch.fx.symbolic_trace(m)
    assert torch.equal(gm(x), m(x))


def test_traced_expanded_conv_follows_autocast_at_run_time():
    """The precision choice (bf16 collapse under autocast) is made when the graph runs, not baked in."""
    m = lopfast.ExpandedConv2d(4, 6, 3, padding=1)
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gm(x), m(x))
        assert gm(x).dtype == torch.bfloat16


def test_expanded_layers_export():
    for m, x in ((lopfast.ExpandedConv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)),
                 (lopfast.ExpandedLinear(5, 3, depth=3), torch.randn(2, 5))):
        ep = torch.export.export(m, (x,))
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-6)


def test_pruned_expanded_resnet18_traces_and_exports():
    tp = pytest.importorskip("torch_pruning")  # noqa: F841
    torch.manual_seed(0)
    net = build_model("tv:resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    pruned, _ = lopfast.prune(net, x, target_removed=0.9)
    student = lopfast.expand(pruned, rate=1.5, linear=True).eval()
    gm = torch.fx.symbolic_trace(student)
    assert torch.equal(gm(x), student(x))
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "effective" in getattr(n.target, "__name__", "")]
    assert len(calls) == len(lopfast.expanded_modules(student))
    ep = torch.export.export(student, (x,))
    torch.testing.assert_close(ep.module()(x), student(x), rtol=1e-4, atol=1e-5)
