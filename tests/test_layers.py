"""ExpandedConv2d / ExpandedLinear: exact expansion (Eq. 3/5), contraction, chain == collapsed."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lopfast
from lopfast.layers.decompose import collapse, decompose

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups == 1
    if depthwise:
        groups = draw(st.integers(2, 6))
        m_g, n_g = 1, draw(st.sampled_from([1, 1, 2]))
    else:
        m_g, n_g = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    if stride == (1, 1) and draw(st.booleans()):
        padding = draw(st.sampled_from(["same", "valid"]))
    else:
        # reflect needs padding < input size; keep padding small
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    return dict(
        in_channels=m_g * groups,
        out_channels=n_g * groups,
        kernel_size=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
        rate=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
        init=draw(st.sampled_from(["orthogonal", "normal"])),
        batch=draw(st.integers(1, 3)),
        size=(draw(st.integers(9, 13)), draw(st.integers(9, 13))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_conv(cfg, dtype):
    kw = {k: cfg[k] for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                              "dilation", "groups", "bias", "padding_mode")}
    return nn.Conv2d(**kw, dtype=dtype)


@settings(max_examples=60, deadline=None)
@given(conv_configs())
@example(dict(in_channels=9, out_channels=9, kernel_size=(1, 2), stride=(1, 2), padding=(0, 0), dilation=(1, 1),
              groups=3, bias=False, padding_mode="zeros", rate=1.0, init="normal", batch=1, size=(9, 9), seed=0))
def test_from_conv_exact_in_float32(cfg):
    torch.manual_seed(cfg["seed"])
    conv = make_conv(cfg, torch.float32)
    gen = torch.Generator().manual_seed(cfg["seed"])
    exp = lopfast.ExpandedConv2d.from_conv(conv, cfg["rate"], init=cfg["init"], generator=gen)
    x = torch.randn(cfg["batch"], cfg["in_channels"], *cfg["size"])
    ref = conv(x)
    # Orthogonal factors are perfectly conditioned: float32 rounding only. The paper's Gaussian
    # factors amplify the rounding of the stored float32 factors by cond(W1) * cond(W3) (a
    # square Gaussian matrix at rate 1 can be badly conditioned), so their bound scales with it.
    tol = 1e-5
    if cfg["init"] == "normal":
        G = cfg["groups"]
        w1 = exp.weight1.detach().double().reshape(G, -1, exp.weight1.shape[1])
        w3 = exp.weight3.detach().double().reshape(G, exp.weight3.shape[0] // G, -1)
        cond = (torch.linalg.cond(w1).max() * torch.linalg.cond(w3).max()).item()
        tol = max(tol, 2e-6 * cond)
    for mode in ("collapsed", "chain"):
        exp.mode = mode
        out = exp(x)
        assert out.shape == ref.shape
        assert rel_err(out, ref) < tol, mode
    # the contracted conv gives the weight back
    back = exp.contract()
    assert type(back) is nn.Conv2d
    assert rel_err(back.weight, conv.weight) < tol
    if conv.bias is not None:
        assert torch.equal(back.bias, conv.bias)
    assert rel_err(back(x), ref) < tol
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(back, attr) == getattr(conv, attr)


@settings(max_examples=40, deadline=None)
@given(conv_configs())
def test_chain_and_collapsed_same_outputs_and_gradients_float64(cfg):
    torch.manual_seed(cfg["seed"])
    conv = make_conv(cfg, torch.float64)
    exp = lopfast.ExpandedConv2d.from_conv(conv, cfg["rate"], init=cfg["init"])
    # move away from the exact initialisation so the test does not rely on it
    with torch.no_grad():
        for p in exp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(cfg["batch"], cfg["in_channels"], *cfg["size"], dtype=torch.float64, requires_grad=True)
    results = {}
    for mode in ("collapsed", "chain"):
        exp.mode = mode
        exp.zero_grad()
        x.grad = None
        out = exp(x)
        g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        out.backward(g)
        grads = {n: p.grad.clone() for n, p in exp.named_parameters()}
        results[mode] = (out.detach(), x.grad.clone(), grads)
    out_a, gx_a, ga = results["collapsed"]
    out_b, gx_b, gb = results["chain"]
    assert rel_err(out_a, out_b) < 1e-9
    assert rel_err(gx_a, gx_b) < 1e-9
    for name in ga:
        assert rel_err(ga[name], gb[name]) < 1e-9, name


def test_decompose_recovers_weight_float64():
    w = torch.randn(12, 4, 3, 5, dtype=torch.float64)
    for init in ("orthogonal", "normal"):
        w1, w2, w3 = decompose(w, groups=2, rate=2.5, init=init)
        # m_g = 4, n_g = 6 -> p_g = ceil(2.5*4) = 10, q_g = ceil(2.5*6) = 15
        assert w1.shape == (20, 4, 1, 1) and w2.shape == (30, 10, 3, 5) and w3.shape == (12, 15, 1, 1)
        assert rel_err(collapse(w1, w2, w3, groups=2), w) < 1e-12


def test_expanded_widths_follow_the_paper():
    conv = nn.Conv2d(16, 32, 3)
    e = lopfast.ExpandedConv2d.from_conv(conv, rate=3)
    assert e.weight1.shape == (48, 16, 1, 1)  # p = r m
    assert e.weight2.shape == (96, 48, 3, 3)  # q = r n
    assert e.weight3.shape == (32, 96, 1, 1)
    e = lopfast.ExpandedConv2d.from_conv(nn.Conv2d(5, 7, 3), rate=1.5)
    assert e.weight1.shape[0] == math.ceil(1.5 * 5) and e.weight2.shape[0] == math.ceil(1.5 * 7)


def test_depthwise_stays_depthwise():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    e = lopfast.ExpandedConv2d.from_conv(conv, rate=3)
    assert e.groups == 8
    assert e.weight1.shape == (24, 1, 1, 1) and e.weight2.shape == (24, 3, 3, 3) and e.weight3.shape == (8, 3, 1, 1)
    x = torch.randn(2, 8, 7, 7)
    assert rel_err(e(x), conv(x)) < 1e-5


def test_fresh_layer_has_default_conv_variance():
    torch.manual_seed(0)
    fan_in = 32 * 9
    ws = torch.cat([lopfast.ExpandedConv2d(32, 64, 3).effective_weight().detach().flatten() for _ in range(8)])
    assert abs(ws.var().item() * 3 * fan_in - 1.0) < 0.1
    ref = torch.cat([nn.Conv2d(32, 64, 3).weight.detach().flatten() for _ in range(8)])
    assert abs(ws.var().item() / ref.var().item() - 1.0) < 0.1
    wl = torch.cat([lopfast.ExpandedLinear(64, 40, depth=3).effective_weight().detach().flatten() for _ in range(20)])
    assert abs(wl.var().item() * 3 * 64 - 1.0) < 0.1


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (10, 10), (1, 5)])
@pytest.mark.parametrize("init", ["orthogonal", "normal"])
def test_expanded_linear_exact_and_contracts(depth, shape, init):
    m, n = shape
    lin = nn.Linear(m, n)
    e = lopfast.ExpandedLinear.from_linear(lin, rate=2, depth=depth, init=init)
    assert len(e.factors()) == depth
    x = torch.randn(4, m)
    for mode in ("collapsed", "chain"):
        e.mode = mode
        assert rel_err(e(x), lin(x)) < 1e-5
    back = e.contract()
    assert type(back) is nn.Linear and rel_err(back.weight, lin.weight) < 1e-5


def test_expanded_linear_chain_equals_collapsed_gradients_float64():
    lin = nn.Linear(9, 4, dtype=torch.float64)
    e = lopfast.ExpandedLinear.from_linear(lin, rate=3, depth=3)
    x = torch.randn(5, 9, dtype=torch.float64)
    grads = {}
    for mode in ("collapsed", "chain"):
        e.mode = mode
        e.zero_grad()
        e(x).pow(2).sum().backward()
        grads[mode] = [p.grad.clone() for p in e.parameters()]
    for a, b in zip(grads["collapsed"], grads["chain"]):
        assert rel_err(a, b) < 1e-9


# ----------------------------------------------------------------------------- errors


def test_rate_below_one_is_refused_with_reason():
    with pytest.raises(ValueError, match="rate must be >= 1"):
        lopfast.ExpandedConv2d.from_conv(nn.Conv2d(3, 3, 3), rate=0.5)
    with pytest.raises(ValueError, match="rate"):
        lopfast.ExpandedConv2d(3, 3, 3, rate=0.9)
    with pytest.raises(ValueError, match="rate"):
        lopfast.ExpandedLinear(3, 3, rate=float("nan"))
    with pytest.raises(TypeError, match="rate"):
        lopfast.ExpandedConv2d(3, 3, 3, rate="3")


def test_non_finite_weights_are_refused():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="conv.weight"):
        lopfast.ExpandedConv2d.from_conv(conv)
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.bias[1] = float("inf")
    with pytest.raises(ValueError, match="linear.bias"):
        lopfast.ExpandedLinear.from_linear(lin)


@pytest.mark.parametrize("layer", [nn.ConvTranspose2d(3, 4, 3), nn.Conv1d(3, 4, 3), nn.Conv3d(3, 4, 3), nn.Linear(3, 4)])
def test_unsupported_layers_are_refused(layer):
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        lopfast.ExpandedConv2d.from_conv(layer)


def test_wrong_mode_init_depth_are_refused():
    e = lopfast.ExpandedConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="mode"):
        e.mode = "fused"
    with pytest.raises(ValueError, match="init"):
        lopfast.ExpandedConv2d(3, 4, 3, init="xavier")
    with pytest.raises(ValueError, match="depth"):
        lopfast.ExpandedLinear(3, 4, depth=4)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        lopfast.ExpandedLinear.from_linear(nn.Conv2d(3, 3, 1))


# ----------------------------------------------------------------------------- module plumbing


def test_is_a_conv_for_tools_and_exposes_effective_weight():
    e = lopfast.ExpandedConv2d(4, 6, (3, 5), stride=2, groups=2)
    assert isinstance(e, nn.Conv2d)
    assert e.weight.shape == (6, 2, 3, 5) and e.weight.requires_grad
    assert e.weight.grad_fn is not None  # differentiable: usable by quantization-aware training
    names = [n for n, _ in e.named_parameters()]
    assert names == ["weight1", "weight2", "weight3", "bias"]
    with pytest.raises(AttributeError, match="read-only"):
        e.weight = nn.Parameter(torch.zeros(6, 2, 3, 5))


def test_deepcopy_state_dict_and_to():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    e = lopfast.ExpandedConv2d.from_conv(conv)
    e.mode = "chain"
    c = copy.deepcopy(e)
    assert c.mode == "chain"
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(c(x), e(x))
    buf = io.BytesIO()
    torch.save(e.state_dict(), buf)
    buf.seek(0)
    fresh = lopfast.ExpandedConv2d(3, 5, 3, padding=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.mode = "chain"
    assert torch.equal(fresh(x), e(x))
    d = e.to(torch.float64)
    assert d.weight1.dtype == torch.float64
    assert rel_err(d(x.double()), conv.double()(x.double())) < 1e-6


def test_autocast_bf16_collapse_follows_the_step():
    """Under bf16 autocast the collapse runs in bf16 (fp32 accumulation) and hands the conv a bf16
    kernel, within bf16's rounding of the exact one; the factor gradients stay fp32, and
    contract() is full precision whatever the caller's autocast."""
    conv = nn.Conv2d(8, 8, 3, padding=1)
    e = lopfast.ExpandedConv2d.from_conv(conv)
    x = torch.randn(2, 8, 9, 9)
    exact = e.effective_weight().double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = e.effective_weight()
        assert w.dtype == torch.bfloat16
        out = e(x)
        assert e.contract().weight.dtype == torch.float32
    # the kernel the autocast conv would have used anyway: the exact one rounded to bf16
    rounded = exact.to(torch.bfloat16).double()
    assert rel_err(w.double(), exact) < 4 * max(rel_err(rounded, exact), 2 ** -9)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), conv(x)) < 2e-2
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in (e.weight1, e.weight2, e.weight3))


def test_torch_compile_fullgraph_collapsed():
    e = lopfast.ExpandedConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    x = torch.randn(2, 4, 8, 8)
    ref = e(x)
    compiled = torch.compile(e, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel_err(out, ref) < 1e-6
    out.sum().backward()
    assert e.weight1.grad is not None and e.weight2.grad is not None and e.weight3.grad is not None
