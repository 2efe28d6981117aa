"""The collapse follows the step's precision (``dtype=``, autocast) and is prepared once per layer
list (``CollapseProgram``, held by ``CollapsedForward``).

Precision rule checked here (the three-result rule of test_collapse.py): fp32 factors collapsed
in a 16-bit dtype are within twice the error of PyTorch's own einsum on the same factors rounded
to that dtype, against the float64 collapse of the fp32 factors; the kernels come out in the
16-bit dtype and the factor gradients in fp32. fp16 runs on every backend here (the Triton
interpreter has fp16); bf16 on the Triton kernel only on a GPU (the interpreter has no real bf16).
"""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import requires_cuda
from test_collapse import CASES, _assert_close, _factors

import lopfast
from lopfast.ops import collapse as op
from lopfast.ops.collapse import CollapseProgram, collapse_many, reference_collapse

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
LOW = [torch.float16] + ([torch.bfloat16] if CUDA else [])


def _grads(layers, dtype, backend):
    ps = [[w.detach().clone().requires_grad_() for w in ws] for ws, _ in layers]
    outs = collapse_many([(*p, g) for p, (_, g) in zip(ps, layers)], backend=backend, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    grads = torch.autograd.grad(outs, [w for p in ps for w in p], gouts)
    return outs, list(grads), gouts


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", list(op.available_backends(DEV, torch.float16)))
def test_fp32_factors_collapsed_in_the_step_dtype(backend, dtype):
    _check_step_dtype(backend, dtype)


@pytest.mark.gpu
@requires_cuda
def test_gpu_bf16_step_collapse_every_backend():
    """The same on the GPU in bf16, every backend (the Triton kernel's bf16 MMA included), for the
    GPU suite's `-m gpu` run."""
    for backend in op.available_backends(DEV, torch.bfloat16):
        _check_step_dtype(backend, torch.bfloat16)


def _check_step_dtype(backend, dtype):
    cases = [CASES["odd3x3"], CASES["right_order"], CASES["depthwise"], CASES["groups_nonsquare"]]
    layers = [(_factors(c, torch.float32, DEV, seed=i), c[0]) for i, c in enumerate(cases)]
    outs, grads, gouts = _grads(layers, dtype, backend)
    # float64 reference on the same fp32 factors; plain PyTorch on them rounded to `dtype`
    ps64 = [[w.double().requires_grad_() for w in ws] for ws, _ in layers]
    ref = [reference_collapse(*p, g) for p, (_, g) in zip(ps64, layers)]
    rgrads = torch.autograd.grad(ref, [w for p in ps64 for w in p], [g.double() for g in gouts])
    pl = [[w.to(dtype).requires_grad_() for w in ws] for ws, _ in layers]
    plain = [reference_collapse(*p, g) for p, (_, g) in zip(pl, layers)]
    pgrads = torch.autograd.grad(plain, [w for p in pl for w in p], gouts)
    for i, (o, r, t) in enumerate(zip(outs, ref, plain)):
        assert o.dtype == dtype
        _assert_close(o, t, r, 2e-3, f"{backend} layer {i} W_eff in {dtype}")
    for j, (g, r, t) in enumerate(zip(grads, rgrads, pgrads)):
        assert g.dtype == torch.float32
        _assert_close(g, t, r, 2e-3, f"{backend} layer {j // 3} dW{j % 3 + 1} in {dtype}")


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=2),
                        nn.ReLU(), nn.Conv2d(6, 4, 1))
    return lopfast.expand(net, rate=2, generator=torch.Generator().manual_seed(0))


def test_collapsed_forward_prepares_its_program_once():
    """Steps with in-place updates reuse one CollapseProgram (no validation, routing or planning per
    step) and equal the per-layer collapse; a replaced factor, another backend block or autocast
    (another compute dtype) rebuild it."""
    a, b = _net(), _net()
    x = torch.randn(4, 3, 6, 6)
    fast = lopfast.CollapsedForward(b)
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    assert fast.programs == 1
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    layer = fast.layers[0]
    layer.weight2 = nn.Parameter(layer.weight2.detach().clone())
    b(x)
    assert fast.programs == 2
    with lopfast.use_backend("matmul"):
        b(x)
    assert fast.programs == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b(x)
    assert fast.programs == 4 and fast.program.dtype == torch.bfloat16
    fast.remove()
    assert fast.program is None


def test_collapsed_forward_follows_autocast_unless_told_params():
    net = _net()
    x = torch.randn(2, 3, 6, 6)
    seen = {}

    def keep(mod, args):
        seen[mod] = mod.__dict__.get("_lopfast_weff").dtype

    layer = next(m for m in net.modules() if isinstance(m, lopfast.ExpandedConv2d))
    layer.register_forward_pre_hook(keep)
    for precision, want in (("step", torch.bfloat16), ("params", torch.float32)):
        with lopfast.CollapsedForward(net, precision=precision):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                net(x)
            assert seen[layer] == want
            net(x)
            assert seen[layer] == torch.float32  # no autocast: the factors' dtype
    with pytest.raises(ValueError, match="precision"):
        lopfast.CollapsedForward(net, precision="bf16")


def test_program_equals_collapse_many_and_checks_length():
    layers = [(*_factors(c, torch.float32, DEV, seed=i), c[0]) for i, c in enumerate(CASES.values())]
    prog = CollapseProgram(layers)
    assert prog.signature == CollapseProgram.signature_of(layers)
    for got, want in zip(prog(layers), collapse_many(layers)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="built for"):
        prog(layers[:2])
    with pytest.raises(TypeError, match="dtype"):
        collapse_many(layers, dtype="bf16")
    assert copy.copy(prog)(layers)[0].shape == layers[0][2].shape[:1] + layers[0][0].shape[1:2] + layers[0][1].shape[2:]
