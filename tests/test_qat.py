"""Quantization-aware LOP (lopfast.layers.qat): the collapsed kernels of expanded layers are
fake-quantized by eager prepare_qat (lopfast's mapping) and by prepare_qat_fx, BatchNorm fused into
them, and contract -> convert gives an int8 compact model that matches the fake-quantized one."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.ao import quantization as tq
from torch.ao.quantization.quantize_fx import convert_fx, fuse_fx, prepare_qat_fx

import lopfast
from lopfast.layers import qat as lq
from lopfast.pipeline.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


class Net(nn.Module):
    """An eager-quantizable net: stubs, conv-bn-relu, conv-bn, conv-relu, a linear head."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.conv3, self.relu3 = nn.Conv2d(8, 8, 1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(self.quant(x))))
        x = self.relu3(self.conv3(self.bn2(self.conv2(x))))
        return self.dequant(self.fc(self.pool(x).flatten(1)))


FUSE = [["conv1", "bn1", "relu"], ["conv2", "bn2"], ["conv3", "relu3"]]


def _trained_net():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(16, 3, 8, 8)
    for _ in range(3):  # BatchNorm statistics that are not the defaults
        net(x)
    return net, x


def _weight_fq(model):
    return sum(n.endswith("weight_fake_quant") for n, _ in model.named_modules())


def _eager_qat(model, x, steps=4, mapping=None):
    model = copy.deepcopy(model).train()
    tq.fuse_modules_qat(model, FUSE, inplace=True)
    model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(model, mapping=mapping, inplace=True)
    for _ in range(steps):  # observers calibrate, BatchNorm statistics move (no optimizer: same weights)
        model(x)
    model.eval()
    model.apply(tq.disable_observer)
    return model


def _out_scale(model):
    return float(model.fc.activation_post_process.scale)


def test_eager_prepare_qat_fake_quantizes_every_expanded_layer():
    net, x = _trained_net()
    student = lopfast.expand(net, rate=2.0, linear=True)
    plain = _eager_qat(net, x)
    prepared = _eager_qat(student, x, mapping=lq.qat_module_mappings())
    assert _weight_fq(prepared) == _weight_fq(plain) == 4
    kinds = {n: type(m) for n, m in prepared.named_children()}
    assert kinds["conv1"] is lq.QATExpandedConvBnReLU2d and kinds["conv2"] is lq.QATExpandedConvBn2d
    assert kinds["conv3"] is lq.QATExpandedConvReLU2d and kinds["fc"] is lq.QATExpandedLinear


def test_qat_conv_runs_on_the_fake_quantized_collapsed_kernel_and_trains_the_factors():
    conv = lopfast.ExpandedConv2d(4, 6, 3, padding=1, rate=2.0)
    conv.qconfig = tq.get_default_qat_qconfig("x86")
    q = lq.QATExpandedConv2d.from_float(conv)
    x = torch.randn(2, 4, 5, 5)
    y = q(x)
    ref = F.conv2d(x, q.weight_fake_quant(conv.effective_weight()), conv.bias, padding=1)
    assert torch.equal(y, ref) and not torch.equal(y, conv(x))
    y.sum().backward()
    assert all(w.grad is not None for w in (conv.weight1, conv.weight2, conv.weight3))  # shared parameters


def test_fuse_modules_on_expanded_layers_eval_and_qat():
    net, x = _trained_net()
    student = lopfast.expand(net, rate=2.0).eval()
    fused = tq.fuse_modules(student, FUSE)  # eval: BatchNorm folded into the last factor and the bias
    assert type(fused.conv1).__name__ == "ExpandedConvReLU2d" and type(fused.conv2) is lopfast.ExpandedConv2d
    torch.testing.assert_close(fused(x), student(x), rtol=1e-5, atol=1e-6)
    qat_fused = tq.fuse_modules_qat(copy.deepcopy(student).train(), FUSE)
    assert type(qat_fused.conv1) is lq.ExpandedConvBnReLU2d and type(qat_fused.conv2) is lq.ExpandedConvBn2d
    with pytest.raises(ValueError, match="same mode"):
        lq.fuse_conv_bn(False, copy.deepcopy(student.conv1).train(), student.bn1)


def test_eager_contract_then_convert_gives_int8_matching_fake_quant():
    """contract: torch's QAT layers with the collapsed kernels, the same outputs bit for bit;
    convert: int8, off the fake-quantized outputs by quantization rounding only (as far as torch's
    own QAT of the never-expanded net is off: a few steps of the output's quantization)."""
    net, x = _trained_net()
    student = _eager_qat(lopfast.expand(net, rate=2.0, linear=True), x, mapping=lq.qat_module_mappings())
    fq = student(x)
    compact = lopfast.contract(student)
    assert type(compact.conv1) is torch.ao.nn.intrinsic.qat.ConvBnReLU2d
    assert not lopfast.expanded_modules(compact)
    assert torch.equal(compact(x), fq)
    int8 = tq.convert(compact)
    assert type(int8.conv2) is torch.ao.nn.quantized.Conv2d
    err = float((int8(x) - fq).abs().max()) / _out_scale(student)
    plain = _eager_qat(net, x)
    plain_err = float((tq.convert(copy.deepcopy(plain))(x) - plain(x)).abs().max()) / _out_scale(plain)
    assert err <= max(2 * plain_err, 2.0) + 1e-3, (err, plain_err)


def _digits_pair(seed=0):
    torch.manual_seed(seed)
    teacher = build_model("digitsnet", width=8)
    x = torch.randn(16, 1, 8, 8)
    for _ in range(3):
        teacher(x)
    return teacher, lopfast.expand(teacher, rate=2.0, linear=True), x


def _fx_qat(model, x, **kw):
    qat = prepare_qat_fx(copy.deepcopy(model).train(), tq.get_default_qat_qconfig_mapping("x86"), (x,), **kw)
    for _ in range(3):
        qat(x)
    qat.eval()
    qat.apply(tq.disable_observer)
    return qat


def test_fx_prepare_qat_with_lopfast_configs_fuses_and_fake_quantizes_collapsed_kernels():
    teacher, student, x = _digits_pair()
    qat = _fx_qat(student, x, prepare_custom_config=lq.prepare_custom_config(), backend_config=lq.backend_config())
    plain = _fx_qat(teacher, x)
    assert _weight_fq(qat) == _weight_fq(plain) == 7  # 6 convs (BatchNorm fused) + the classifier
    assert type(qat.conv1) is lq.QATExpandedConvBnReLU2d and type(qat.layer1.conv2) is lq.QATExpandedConvBn2d
    assert type(qat.fc) is lq.QATExpandedLinear  # a direct child of the root is quantized too
    fq = qat(x)
    compact = lopfast.contract(qat)
    assert torch.equal(compact(x), fq)
    int8 = convert_fx(compact)
    direct = convert_fx(copy.deepcopy(qat), backend_config=lq.backend_config())
    assert torch.equal(direct(x), int8(x))
    assert not any("Expanded" in type(m).__name__ for m in int8.modules())
    out_fq = [m for n, m in qat.named_children() if n.startswith("activation_post_process")][-1]
    err = float((int8(x) - fq).abs().max()) / float(out_fq.scale)
    assert err <= 8, err


def test_plain_fx_prepare_qat_fake_quantizes_the_collapsed_kernels_too():
    """Without lopfast's configs prepare_qat_fx traces through the expanded layers: the collapse
    feeds a functional conv / linear whose weight is fake-quantized (no BatchNorm fusion), and
    convert_fx folds the collapse into int8 packed weights."""
    _, student, x = _digits_pair()
    qat = _fx_qat(student, x)
    calls = [n for n in qat.graph.nodes if n.op == "call_function" and "effective" in getattr(n.target, "__name__", "")]
    assert len(calls) == len(lopfast.expanded_modules(student)) == 7
    users = {u.name for n in calls for u in n.users}
    assert all(name.startswith("activation_post_process") for name in users)  # each collapse is fake-quantized
    int8 = convert_fx(copy.deepcopy(qat))
    assert "quantized.conv2d" in int8.code and "effective_kernel" not in int8.code
    assert float((int8(x) - qat(x)).abs().max()) < 0.1 * float(qat(x).abs().max())


def test_fx_qat_student_distils_from_the_teacher_fused_the_same_way():
    teacher, student, x = _digits_pair()
    qat = prepare_qat_fx(student.train(), tq.get_default_qat_qconfig_mapping("x86"), (x,),
                         prepare_custom_config=lq.prepare_custom_config(), backend_config=lq.backend_config())
    fused_teacher = fuse_fx(teacher.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every expanded layer pairs: no "left out" warning
        with lopfast.SPDistiller(fused_teacher, qat) as d:
            _, sp = d(x)
    assert len(d.layers) == 7 and torch.isfinite(sp)
    qat.apply(lq.freeze_bn_stats)
    assert qat.conv1.freeze_bn and not qat.conv1.bn.training
    qat.apply(lq.update_bn_stats)
    assert not qat.conv1.freeze_bn


def test_eager_prepare_qat_without_lopfast_mapping_is_not_silent():
    """torch's own mapping skips expanded layers (exact classes): their forward says what to do."""
    net, x = _trained_net()
    student = lopfast.expand(net, rate=2.0)
    student.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(student.train(), inplace=True)
    assert type(student.conv1) is lopfast.ExpandedConv2d  # untouched by torch's mapping
    with pytest.warns(UserWarning, match=r"lopfast\.qat\.qat_module_mappings\(\)"):
        student(x)
