"""expand / contract over whole models."""
import copy

import pytest
import torch
import torch.nn as nn

import lopfast
from nets import TinyMobileNetV2 as TinyMobileNet
from nets import TinyResNet


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("net", [TinyResNet, TinyMobileNet])
@pytest.mark.parametrize("linear", [False, True])
def test_expand_contract_round_trip(net, linear):
    model = _randomise_bn(net()).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 3, 16, 16)
    ref = model(x)
    expanded = lopfast.expand(model, rate=3, linear=linear, linear_depth=3)
    # the original is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_exp = sum(isinstance(m, lopfast.ExpandedConv2d) for m in expanded.modules())
    assert n_exp == n_conv
    assert any(isinstance(m, lopfast.ExpandedLinear) for m in expanded.modules()) == linear
    assert sum(p.numel() for p in expanded.parameters()) > sum(p.numel() for p in model.parameters())
    out = expanded(x)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max() + 1e-6
    lopfast.set_mode(expanded, "chain")
    assert (expanded(x) - ref).abs().max() < 1e-5 * ref.abs().max() + 1e-6
    contracted = lopfast.contract(expanded)
    assert not any(isinstance(m, (lopfast.ExpandedConv2d, lopfast.ExpandedLinear)) for m in contracted.modules())
    fresh = net()
    fresh.load_state_dict(contracted.state_dict(), strict=True)
    fresh.eval()
    assert (fresh(x) - ref).abs().max() < 1e-5 * ref.abs().max() + 1e-6


def test_training_the_expanded_model_then_contracting_keeps_the_function():
    model = TinyResNet()
    expanded = lopfast.expand(model, rate=2, linear=True)
    opt = torch.optim.SGD(expanded.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(expanded(x), y).backward()
        opt.step()
    expanded.eval()
    contracted = lopfast.contract(expanded)
    ref = expanded(x)
    assert (contracted(x) - ref).abs().max() < 1e-5 * ref.abs().max()


def test_skip_by_name_and_predicate_and_inplace():
    model = TinyResNet()
    e = lopfast.expand(model, skip=["stem", "layer2.shortcut"])
    assert type(e.stem[0]) is nn.Conv2d
    assert type(e.layer2.shortcut[0]) is nn.Conv2d
    assert isinstance(e.layer1.conv1, lopfast.ExpandedConv2d)
    e = lopfast.expand(model, skip=lambda name, m: m.kernel_size == (1, 1))
    assert type(e.layer2.shortcut[0]) is nn.Conv2d and isinstance(e.layer2.conv1, lopfast.ExpandedConv2d)
    same = lopfast.expand(model, inplace=True)
    assert same is model and isinstance(model.layer1.conv1, lopfast.ExpandedConv2d)
    # expanding again leaves expanded layers alone
    twice = lopfast.expand(model)
    assert twice.layer1.conv1.weight1.shape == model.layer1.conv1.weight1.shape
    with pytest.raises(TypeError, match="skip"):
        lopfast.expand(TinyResNet(), skip=3)


def test_other_layer_types_are_left_untouched():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Conv3d(4, 4, 1), nn.Conv2d(4, 4, 1))
    e = lopfast.expand(model)
    assert [type(m) for m in e] == [nn.Conv1d, nn.ConvTranspose2d, nn.Conv3d, lopfast.ExpandedConv2d]


def test_expand_a_single_conv_and_bad_arguments():
    conv = nn.Conv2d(3, 4, 3)
    e = lopfast.expand(conv)
    assert isinstance(e, lopfast.ExpandedConv2d)
    assert type(lopfast.contract(e)) is nn.Conv2d
    with pytest.raises(ValueError, match="rate"):
        lopfast.expand(conv, rate=0.5)
    with pytest.raises(ValueError, match="linear_rate"):
        lopfast.expand(conv, linear=True, linear_rate=0.2)
    with pytest.raises(ValueError, match="depth"):
        lopfast.expand(conv, linear_depth=5)
    with pytest.raises(TypeError, match="model"):
        lopfast.expand("resnet")


def test_expand_is_reproducible_with_a_generator():
    model = TinyMobileNet()
    a = lopfast.expand(model, generator=torch.Generator().manual_seed(3))
    b = lopfast.expand(model, generator=torch.Generator().manual_seed(3))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
