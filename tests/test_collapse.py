"""Collapse op: the Triton kernels (through the interpreter on CPU) against the PyTorch reference.

Every comparison follows the three-result rule: the kernel in the working dtype, PyTorch in
the same dtype, and a float64 reference; ``|kernel - ref64| <= 2 |torch - ref64| + atol``.
Shapes are tiny (the interpreter is slow) but odd and bigger than the 16-wide test tiles, so
masks and multi-tile paths run; both the fused (one launch) and the split (two-stage) plans
are exercised.
"""
import math
import os
import pytest
import torch
import torch.nn as nn

from conftest import requires_cuda, requires_triton

import lopfast
from lopfast.ops.collapse import reference_collapse as ref_collapse

pytestmark = requires_triton

# (G, n_g, m_g, p_g, q_g, kh, kw)
CASES = {
    "odd3x3": (1, 17, 18, 19, 20, 3, 3),  # > 16 in every dim: several tiles, masked edges
    "groups_nonsquare": (2, 3, 5, 7, 4, 1, 3),
    "depthwise": (6, 1, 1, 3, 3, 3, 3),
    "pointwise": (1, 13, 11, 22, 26, 1, 1),
    "tall5x2": (3, 2, 3, 6, 5, 5, 2),
}


def _factors(case, dtype, requires_grad=True, device="cpu"):
    G, n_g, m_g, p_g, q_g, kh, kw = case
    # scaled so the effective kernel is O(1) (fp16 neither overflows nor underflows)
    w1 = torch.randn(G * p_g, m_g, 1, 1, dtype=torch.float64) / math.sqrt(m_g)
    w2 = torch.randn(G * q_g, p_g, kh, kw, dtype=torch.float64) / math.sqrt(p_g)
    w3 = torch.randn(G * n_g, q_g, 1, 1, dtype=torch.float64) / math.sqrt(q_g)
    return [w.to(device=device, dtype=dtype).requires_grad_(requires_grad) for w in (w1, w2, w3)]


def _assert_close(kernel, same_dtype_torch, ref64, atol_rel, what):
    ref64 = ref64.double()
    scale = ref64.abs().max().item() or 1.0
    err_k = (kernel.double() - ref64).abs().max().item()
    err_t = (same_dtype_torch.double() - ref64).abs().max().item()
    assert err_k <= 2 * err_t + atol_rel * scale, f"{what}: kernel err {err_k:.3g}, torch err {err_t:.3g}"


def _run(layers, backend):
    """Effective kernels and all factor gradients for a fixed random upstream gradient."""
    outs = lopfast.collapse_many([(w1, w2, w3, G) for (w1, w2, w3), G in layers], backend=backend)
    gen = torch.Generator().manual_seed(1)
    gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    params = [w for ws, _ in layers for w in ws]
    grads = torch.autograd.grad(outs, params, gouts)
    return [o.detach() for o in outs], list(grads)


def _compare(cases, dtype, split, block=16):
    atol = 1e-12 if dtype == torch.float64 else 2e-3
    base = [(_factors(c, torch.float64), c[0]) for c in cases]
    work = [([w.detach().to(dtype).requires_grad_() for w in ws], G) for ws, G in base]
    # the float64 reference takes the working-dtype inputs, upcast: same numbers, exact maths
    ref_in = [([w.detach().double().requires_grad_() for w in ws], G) for ws, G in work]
    tor_in = [([w.detach().clone().requires_grad_() for w in ws], G) for ws, G in work]
    with lopfast.ops.collapse.plan_options(block=block, split=split):
        k_out, k_grad = _run(work, "triton")
    r_out, r_grad = _run(ref_in, "torch")
    t_out, t_grad = _run(tor_in, "torch")
    for i in range(len(cases)):
        assert k_out[i].dtype == dtype and k_out[i].shape == r_out[i].shape
        _assert_close(k_out[i], t_out[i], r_out[i], atol, f"layer {i} W_eff")
    for j, (kg, tg, rg) in enumerate(zip(k_grad, t_grad, r_grad)):
        assert kg.dtype == dtype and kg.shape == rg.shape
        _assert_close(kg, tg, rg, atol, f"layer {j // 3} dW{j % 3 + 1}")


@pytest.mark.parametrize("split", ["never", "always"])
@pytest.mark.parametrize("name", list(CASES))
def test_single_layer_float64(name, split):
    _compare([CASES[name]], torch.float64, split)


@pytest.mark.parametrize("name", ["odd3x3", "groups_nonsquare", "depthwise"])
def test_single_layer_float16(name):
    _compare([CASES[name]], torch.float16, "auto")


def test_single_layer_float32_split_auto():
    _compare([CASES["pointwise"], CASES["groups_nonsquare"]], torch.float32, "auto")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_grouped_many_mixed_layers(dtype):
    """Five different layers (groups, depthwise, 1x1, non-square, plain 3x3) in one grouped call."""
    cases = [c for n, c in CASES.items() if n != "odd3x3"] + [(1, 4, 4, 8, 8, 3, 3)]
    _compare(cases, dtype, "auto")


def test_launch_counts(monkeypatch):
    """Forced "triton" on CPU tensors really runs the kernel: one launcher call forward and
    one backward for a whole batch of layers, and one kernel launch each with a fused plan."""
    import lopfast.kernels.collapse as kc

    calls, launches = [], []
    real_launch = kc.launch_chain3

    def counting_launch(*args, **kwargs):
        calls.append(args[3].shape[0])  # descriptor rows of this call
        return real_launch(*args, **kwargs)

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    real_wrap = lopfast.ops.collapse._wrap()
    monkeypatch.setattr(kc, "launch_chain3", counting_launch)
    monkeypatch.setattr(lopfast.ops.collapse, "_wrap", lambda: (lambda k: Counting(real_wrap(k))))
    small = [(1, 3, 2, 4, 5, 3, 3), (2, 2, 3, 4, 3, 1, 3), (3, 1, 1, 2, 2, 1, 1)]
    layers = [(_factors(c, torch.float32), c[0]) for c in small]
    with lopfast.ops.collapse.plan_options(block=16, split="never"):
        outs, grads = _run(layers, "triton")
    assert len(calls) == 2 and len(launches) == 2  # 1 forward + 1 backward, 3 layers
    assert calls == [len(small), 3 * len(small)]  # products: W per layer; dW1, dW2, dW3 per layer
    calls.clear(), launches.clear()
    with lopfast.ops.collapse.plan_options(block=16, split="always"):
        _run(layers, "triton")
    assert len(calls) == 2 and len(launches) == 4  # two-stage plans: two launches each way


def test_auto_backend_on_cpu_is_reference(monkeypatch):
    import lopfast.kernels.collapse as kc

    monkeypatch.setattr(kc, "launch_chain3", lambda *a, **k: pytest.fail("kernel ran for backend=auto on CPU"))
    w1, w2, w3 = _factors(CASES["depthwise"], torch.float32)
    out = lopfast.ops.collapse.collapse(w1, w2, w3, 6)
    torch.testing.assert_close(out, ref_collapse(w1, w2, w3, 6))


def test_upstream_gradient_expanded_stride0():
    """The gradient of .sum() arrives as a stride-0 tensor; the kernel must not read garbage."""
    w = _factors(CASES["groups_nonsquare"], torch.float64)
    wr = [x.detach().clone().requires_grad_() for x in w]
    with lopfast.ops.collapse.plan_options(block=16):
        lopfast.ops.collapse.collapse(*w, 2, backend="triton").sum().backward()
    ref_collapse(*wr, 2).sum().backward()
    for a, b in zip(w, wr):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    w1, w2, w3 = _factors(CASES["groups_nonsquare"], torch.float32)
    with pytest.raises(ValueError, match="inconsistent"):
        lopfast.collapse_many([(w1, w2, w3, 3)], backend="triton")
    with pytest.raises(ValueError, match="share dtype"):
        lopfast.collapse_many([(w1, w2.double(), w3, 2)], backend="triton")
    with pytest.raises(RuntimeError, match="CUDA"):
        lopfast.collapse_many([(w1, w2, w3, 2)], backend="cuda")
    assert lopfast.collapse_many([]) == []


def _small_net(dtype=torch.float64):
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),  # depthwise
        nn.Conv2d(4, 6, (1, 3), padding=(0, 1), groups=2), nn.ReLU(),
        nn.Conv2d(6, 5, 1),
    ).to(dtype)
    return lopfast.expand(net, rate=2)


def _step(net, x):
    net.zero_grad()
    out = net(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


def test_layer_collapsed_via_kernel_equals_chain():
    layer = lopfast.ExpandedConv2d(5, 7, (3, 2), padding=1, groups=1, rate=2, dtype=torch.float64)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    layer.mode = "chain"
    out_c, g_c = _step(layer, x)
    layer.mode = "collapsed"
    with lopfast.use_backend("triton"), lopfast.ops.collapse.plan_options(block=16):
        out_k, g_k = _step(layer, x)
    torch.testing.assert_close(out_k, out_c, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_k, g_c):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_collapsed_forward_model(monkeypatch):
    """CollapsedForward: one grouped call per forward, same outputs and grads as the chain."""
    import lopfast.kernels.collapse as kc

    net = _small_net()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    lopfast.set_mode(net, "chain")
    out_c, g_c = _step(net, x)
    lopfast.set_mode(net, "collapsed")
    calls = []
    real = kc.launch_chain3
    monkeypatch.setattr(kc, "launch_chain3", lambda *a, **k: calls.append(1) or real(*a, **k))
    with lopfast.use_backend("triton"), lopfast.ops.collapse.plan_options(block=16, split="never"):
        with lopfast.CollapsedForward(net) as fast:
            assert len(fast.layers) == 4
            out_k, g_k = _step(net, x)
            assert len(calls) == 2  # 4 layers: 1 forward + 1 backward launch in all
            assert all("_lopfast_weff" not in m.__dict__ for m in fast.layers)
    torch.testing.assert_close(out_k, out_c, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_k, g_c):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # hooks removed: the plain per-layer path again (reference on CPU), nothing launched
    calls.clear()
    _step(net, x)
    assert calls == []


def test_collapsed_forward_reference_backend_and_chain_layers():
    net = _small_net(torch.float32)
    x = torch.randn(2, 3, 5, 5)
    out_ref, g_ref = _step(net, x)
    list(net.modules())[3].mode = "chain"  # a chain-mode layer is skipped by the fast path
    fast = lopfast.CollapsedForward(net, backend="torch")
    out, g = _step(net, x)
    fast.remove()
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_triton_matches_reference(dtype):
    cases = list(CASES.values()) + [(1, 64, 64, 192, 192, 3, 3)]  # the last one is split
    layers = [(_factors(c, dtype, device="cuda"), c[0]) for c in cases]
    ref = [([w.detach().double().requires_grad_() for w in ws], G) for ws, G in layers]
    tor = [([w.detach().clone().requires_grad_() for w in ws], G) for ws, G in layers]
    k_out, k_grad = _run(layers, "triton")
    r_out, r_grad = _run(ref, "torch")
    t_out, t_grad = _run(tor, "torch")
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for k, t, r in zip(k_out + k_grad, t_out + t_grad, r_out + r_grad):
        _assert_close(k, t, r, atol, str(dtype))


@requires_cuda
def test_gpu_opcheck_and_compile():
    from lopfast.kernels.collapse import layer_shape

    w1, w2, w3 = _factors(CASES["odd3x3"], torch.float32, device="cuda")
    out = lopfast.ops.collapse.collapse(w1, w2, w3, 1, backend="triton")
    plan = lopfast.ops.collapse._get_plan((layer_shape(w1.shape, w2.shape, w3.shape, 1),), w1.device)
    args = (plan.fwd_desc, plan.fwd_tiles, plan.fwd_split, plan.fwd_ws, plan.bwd_desc, plan.bwd_tiles,
            plan.bwd_split, plan.bwd_ws, plan.out_numel, plan.block)
    flat = torch.cat([w.detach().reshape(-1) for w in (w1, w2, w3)]).requires_grad_()
    f = torch.compile(lambda x: torch.ops.lopfast.collapse_packed(x, *args), fullgraph=True)
    torch.testing.assert_close(f(flat).view_as(out), out)
    torch.library.opcheck(torch.ops.lopfast.collapse_packed, (flat,) + args)


@requires_cuda
def test_gpu_cuda_extension_matches_reference():
    if lopfast.backend.cuda_extension() is None:
        pytest.skip("lopfast._C not built")
    for c in CASES.values():
        ws = _factors(c, torch.float32, device="cuda")
        ref = [w.detach().double().requires_grad_() for w in ws]
        out = lopfast.ops.collapse.collapse(*ws, c[0], backend="cuda")
        r = ref_collapse(*ref, c[0])
        torch.testing.assert_close(out.double(), r, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(r)
        gk = torch.autograd.grad(out, ws, g.float())
        gr = torch.autograd.grad(r, ref, g)
        for a, b in zip(gk, gr):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_fallback_without_triton_op():
    """torch < 2.6 has no torch.library.triton_op: the same launchers run in an autograd.Function."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        del torch.library.triton_op, torch.library.wrap_triton  # what torch 2.4/2.5 look like
        import lopfast
        from lopfast.ops import collapse as op
        assert not op._HAS_TRITON_OP
        torch.manual_seed(0)
        ws = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(6, 3, 1, 1), (4, 3, 3, 1), (4, 2, 1, 1)]]
        out = op.collapse(*ws, 2, backend="triton")
        ref = [w.detach().clone().requires_grad_() for w in ws]
        r = op.reference_collapse(*ref, 2)
        assert torch.allclose(out, r, atol=1e-12)
        g = torch.randn_like(r)
        for a, b in zip(torch.autograd.grad(out, ws, g), torch.autograd.grad(r, ref, g)):
            assert torch.allclose(a, b, atol=1e-12)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_kernel_compiles_for_sm90():
    """The real (not interpreted) Triton compiler lowers the kernel to sm_90 PTX/cubin with no
    GPU present: catches what the interpreter lets through (control flow yielding values,
    tl.dot shape/dtype rules) for every parameter dtype. Own process: the interpreter switch
    is already on in this one."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from lopfast.kernels.collapse import _chain3_kernel
        for pt, f64, tf32 in (("fp32", False, False), ("fp32", False, True), ("fp16", False, False),
                              ("bf16", False, False), ("fp64", True, False)):
            acc = "fp64" if f64 else "fp32"
            sig = {"a_ptr": "*" + pt, "b_ptr": "*" + pt, "w_ptr": "*" + acc, "o_ptr": "*" + pt,
                   "desc_ptr": "*i64", "tile_ptr": "*i64", "BI": "constexpr", "BJ": "constexpr",
                   "BK": "constexpr", "BL": "constexpr", "ACC": "constexpr", "F64": "constexpr",
                   "TF32": "constexpr"}
            consts = {"BI": 32, "BJ": 32, "BK": 32, "BL": 32,
                      "ACC": tl.float64 if f64 else tl.float32, "F64": f64, "TF32": tf32}
            k = triton.compile(ASTSource(fn=_chain3_kernel, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", 90, 32))
            assert k.asm["ptx"], pt
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"})
    if res.returncode != 0 and ("ASTSource" in res.stderr and "ImportError" in res.stderr):
        pytest.skip("this triton has no ASTSource/GPUTarget AOT API")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
