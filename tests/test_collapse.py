"""Collapse op: every backend against a float64 reference, on the test machine's device.

Tensors live on the ``device`` fixture (CUDA when present, else CPU with the Triton kernels
running through the interpreter); no test forces a backend onto tensors it cannot run on.
Every comparison follows the three-result rule: the backend in the working dtype, the PyTorch
reference in the same dtype, and the float64 reference on the same inputs;
``|backend - ref64| <= 2 |torch - ref64| + atol * scale``. Forward and all three factor
gradients, odd sizes, groups/depthwise, non-square kernels, both association orders, many
layers of mixed shape classes, and cases that span several tiles at the shipped GPU tile sizes.
"""
import contextlib
import math
import os

import pytest
import torch
import torch.nn as nn

from conftest import HAS_TRITON, requires_cuda, requires_triton

import lopfast
from lopfast.ops import collapse as op
from lopfast.ops.collapse import reference_collapse as ref_collapse
from lopfast.ops.collapse_gemm import shape_class

CUDA = torch.cuda.is_available()


@pytest.fixture
def device():
    # same as the shared fixture in conftest (OWNERS.md); local until it lands on this branch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


BACKENDS = list(op.available_backends(torch.device("cuda" if CUDA else "cpu"), torch.float32))

# (G, n_g, m_g, p_g, q_g, kh, kw)
CASES = {
    "odd3x3": (1, 17, 18, 19, 20, 3, 3),  # > 16 in every dim: masked edges, left order
    "right_order": (1, 21, 3, 11, 5, 3, 3),  # n >> m: A3.(A2.A1) is cheaper
    "groups_nonsquare": (2, 3, 5, 7, 4, 1, 3),
    "depthwise": (6, 1, 1, 3, 3, 3, 3),
    "pointwise": (1, 13, 11, 22, 26, 1, 1),
    "tall5x2": (3, 2, 3, 6, 5, 5, 2),
}
# dtypes every backend runs on this machine (the interpreter has no bf16)
DTYPES = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if CUDA else [])


def _factors(case, dtype, device, seed=0):
    G, n_g, m_g, p_g, q_g, kh, kw = case
    gen = torch.Generator().manual_seed(seed)
    # scaled so the effective kernel is O(1) (fp16 neither overflows nor underflows)
    w1 = torch.randn(G * p_g, m_g, 1, 1, dtype=torch.float64, generator=gen) / math.sqrt(m_g)
    w2 = torch.randn(G * q_g, p_g, kh, kw, dtype=torch.float64, generator=gen) / math.sqrt(p_g)
    w3 = torch.randn(G * n_g, q_g, 1, 1, dtype=torch.float64, generator=gen) / math.sqrt(q_g)
    return [w.to(device=device, dtype=dtype) for w in (w1, w2, w3)]


def _assert_close(got, same_dtype_torch, ref64, atol_rel, what):
    ref64 = ref64.double()
    scale = ref64.abs().max().item() or 1.0
    err_k = (got.double() - ref64).abs().max().item()
    err_t = (same_dtype_torch.double() - ref64).abs().max().item()
    assert err_k <= 2 * err_t + atol_rel * scale, f"{what}: backend err {err_k:.3g}, torch err {err_t:.3g}"


def _run(layers, backend):
    """Effective kernels and all factor gradients for a fixed random upstream gradient."""
    layers = [([w.detach().clone().requires_grad_() for w in ws], G) for ws, G in layers]
    outs = lopfast.collapse_many([(w1, w2, w3, G) for (w1, w2, w3), G in layers], backend=backend)
    gen = torch.Generator().manual_seed(1)
    gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    params = [w for ws, _ in layers for w in ws]
    grads = torch.autograd.grad(outs, params, gouts)
    return [o.detach() for o in outs], list(grads)


def _atol(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-3)


def _compare(cases, dtype, backend, device):
    work = [(_factors(c, dtype, device, seed=i), c[0]) for i, c in enumerate(cases)]
    # the float64 reference takes the working-dtype inputs, upcast: same numbers, exact maths
    ref_in = [([w.double() for w in ws], G) for ws, G in work]
    k_out, k_grad = _run(work, backend)
    r_out, r_grad = _run(ref_in, "torch")
    t_out, t_grad = _run(work, "torch")
    atol = _atol(dtype)
    for i in range(len(cases)):
        assert k_out[i].dtype == dtype and k_out[i].shape == r_out[i].shape
        assert k_out[i].device.type == device.type
        _assert_close(k_out[i], t_out[i], r_out[i], atol, f"{backend} layer {i} W_eff")
    for j, (kg, tg, rg) in enumerate(zip(k_grad, t_grad, r_grad)):
        assert kg.dtype == dtype and kg.shape == rg.shape
        _assert_close(kg, tg, rg, atol, f"{backend} layer {j // 3} dW{j % 3 + 1}")


def test_available_backends():
    dev = torch.device("cuda" if CUDA else "cpu")
    assert op.available_backends(dev, torch.float64) == ("torch", "matmul")
    assert ("triton" in BACKENDS) == (HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1"))


def test_cases_cover_both_orders():
    orders = {shape_class(*_factors(c, torch.float64, "cpu"), c[0]).left for c in CASES.values()}
    assert orders == {True, False}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_single_layer_fp32(name, backend, device):
    _compare([CASES[name]], torch.float32, backend, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_layers_mixed_classes(dtype, backend, device):
    """Every case plus repeats of two classes (stacked into one batched product each)."""
    cases = list(CASES.values()) + [CASES["odd3x3"], CASES["depthwise"], CASES["odd3x3"], (1, 4, 4, 8, 8, 3, 3)]
    _compare(cases, dtype, backend, device)


# all widths multiples of 16: the aligned (64 x 64 tile, 16-byte load) kernel variants
GPU_ALIGNED = [(1, 64, 80, 96, 112, 3, 3), (1, 144, 16, 48, 32, 3, 3), (2, 32, 48, 64, 64, 1, 1), (2, 32, 48, 64, 64, 1, 1)]
# odd widths: the unaligned (32 x 32 tile) variants, several tiles each way
GPU_UNALIGNED = [(1, 70, 80, 96, 100, 3, 3), (1, 130, 8, 40, 24, 3, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_sized_layers(backend, device):
    """Products that span several tiles in every dimension at the shipped GPU tile sizes,
    both association orders, K longer than one K step with a tail, two layers of one class,
    aligned and unaligned variants; through the interpreter a handful of tiles stays quick."""
    for cases in (GPU_ALIGNED[:2], GPU_UNALIGNED):
        assert {shape_class(*_factors(c, torch.float64, "cpu"), c[0]).left for c in cases} == {True, False}
    _compare(GPU_ALIGNED + GPU_UNALIGNED, torch.float32, backend, device)


def _plan(cases):
    kc = pytest.importorskip("lopfast.kernels.collapse")
    specs = []
    for c in cases:
        sc = shape_class(*_factors(c, torch.float64, "cpu"), c[0])
        specs.append(kc.ClassSpec(1, sc.G, sc.n, sc.m, sc.p, sc.q, sc.T, sc.left))
    return kc, kc.plan_collapse(specs)


def _launches(flat, kc):
    return [flat[i:i + kc.LAUNCH_FIELDS] for i in range(0, len(flat), kc.LAUNCH_FIELDS)]


@requires_triton
def test_plan_tiles_and_alignment():
    """The GPU-sized cases really run the aligned variants on several 64 x 64 tiles, the odd
    ones the unaligned variants; forward 2 launches and backward 4 for one association order."""
    kc, plan = _plan(GPU_ALIGNED[:1])
    fwd, bwd = _launches(plan.fwd, kc), _launches(plan.bwd, kc)
    assert len(fwd) == 2 and len(bwd) == 4
    assert all(lz[5] == 1 for lz in fwd + bwd)  # aligned
    assert all(lz[8] >= 2 for lz in fwd + bwd) and sum(lz[8] for lz in fwd + bwd) >= 50  # tiles
    _, plan = _plan(GPU_UNALIGNED[:1])
    assert all(lz[5] == 0 and lz[8] >= 4 for lz in _launches(plan.fwd + plan.bwd, kc))


@requires_triton
def test_triton_launch_counts(monkeypatch, device):
    """Many layers of several shape classes (one association order, all aligned): 2 kernel
    launches forward and 4 backward, whatever the number of layers."""
    import lopfast.kernels.collapse as kc

    launches = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    real_wrap = op._wrap()
    monkeypatch.setattr(op, "_wrap", lambda: (lambda k: Counting(real_wrap(k))))
    cases = [(1, 16, 16, 48, 48, 3, 3)] * 3 + [(1, 16, 32, 96, 48, 3, 3), (2, 16, 32, 48, 96, 1, 1)]
    assert len({shape_class(*_factors(c, torch.float64, "cpu"), c[0]).left for c in cases}) == 1
    layers = [(_factors(c, torch.float32, device, seed=i), c[0]) for i, c in enumerate(cases)]
    params = [w.requires_grad_() for ws, _ in layers for w in ws]
    outs = lopfast.collapse_many([(*ws, G) for ws, G in layers], backend="triton")
    assert len(launches) == 2
    launches.clear()
    torch.autograd.grad(sum((o * o).sum() for o in outs), params)
    assert len(launches) == 4


@requires_triton
def test_triton_fp64_runs_on_matmul(monkeypatch, device):
    """fp64 never reaches tl.dot (sm_90 cannot compile it): backend="triton" runs the folded
    GEMMs on torch.matmul for fp64 factors, exactly."""
    import lopfast.kernels.collapse as kc

    monkeypatch.setattr(kc, "run_launches", lambda *a, **k: pytest.fail("fp64 reached the Triton kernel"))
    _compare([CASES["odd3x3"], CASES["right_order"]], torch.float64, "triton", device)


@requires_triton
def test_triton_deterministic(device):
    """No atomics, fixed-order K loops: two runs agree bitwise, forward and backward."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton backend on this machine")
    layers = [(_factors(c, torch.float32, device, seed=i), c[0]) for i, c in enumerate([GPU_ALIGNED[2], CASES["tall5x2"]])]
    a_out, a_grad = _run(layers, "triton")
    b_out, b_grad = _run(layers, "triton")
    for a, b in zip(a_out + a_grad, b_out + b_grad):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_factors(backend, device):
    """channels_last W2, W1 a transposed view, W3 a slice of a bigger tensor: same results."""
    c = CASES["odd3x3"]
    w1, w2, w3 = _factors(c, torch.float32, device)
    w1_t = w1.reshape(w1.shape[0], -1).t().contiguous().t().reshape(w1.shape)  # column-major storage
    w2_cl = w2.contiguous(memory_format=torch.channels_last)
    w3_big = torch.cat([w3, torch.randn_like(w3)], dim=1)[:, : w3.shape[1]]
    assert not w1_t.is_contiguous() and not w2_cl.is_contiguous() and not w3_big.is_contiguous()
    got, g_got = _run([([w1_t, w2_cl, w3_big], 1)], backend)
    tor, g_tor = _run([([w1, w2, w3], 1)], "torch")
    ref, g_ref = _run([([w.double() for w in (w1, w2, w3)], 1)], "torch")
    for a, t, r in zip(got + g_got, tor + g_tor, ref + g_ref):
        _assert_close(a, t, r, _atol(torch.float32), f"{backend} non-contiguous")


def test_matmul_backend_compiles_fullgraph(device):
    """The folded GEMMs are plain differentiable torch ops: torch.compile traces them whole."""
    layers = [(_factors(c, torch.float32, device, seed=i), c[0]) for i, c in enumerate(CASES.values())]
    params = [w.requires_grad_() for ws, _ in layers for w in ws]

    def f(*ps):
        trip = [(ps[3 * i], ps[3 * i + 1], ps[3 * i + 2], layers[i][1]) for i in range(len(layers))]
        return sum((o * o).sum() for o in lopfast.collapse_many(trip, backend="matmul"))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*params)
    g_got = torch.autograd.grad(got, params)
    want = f(*params)
    g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_upstream_gradient_expanded_stride0(device):
    """The gradient of .sum() arrives as a stride-0 tensor; no backend may read garbage."""
    for backend in BACKENDS:
        w = [x.requires_grad_() for x in _factors(CASES["groups_nonsquare"], torch.float64, device)]
        wr = [x.detach().clone().requires_grad_() for x in w]
        op.collapse(*w, 2, backend=backend).sum().backward()
        ref_collapse(*wr, 2).sum().backward()
        for a, b in zip(w, wr):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_bad_inputs(device):
    w1, w2, w3 = _factors(CASES["groups_nonsquare"], torch.float32, device)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="inconsistent"):
            lopfast.collapse_many([(w1, w2, w3, 3)], backend=backend)
        # the layer that is wrong is named, and checked before any layer runs
        with pytest.raises(ValueError, match="layer 1: inconsistent chain shapes for groups=0"):
            lopfast.collapse_many([(w1, w2, w3, 2), (w1, w2, w3, 0)], backend=backend)
        with pytest.raises(TypeError, match="layer 0: groups must be an int"):
            lopfast.collapse_many([(w1, w2, w3, 2.0)], backend=backend)
        with pytest.raises(ValueError, match="share dtype"):
            lopfast.collapse_many([(w1, w2.double(), w3, 2)], backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        lopfast.collapse_many([(w1, w2, w3, 2)], backend="cublas")
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match="CUDA"):
            lopfast.collapse_many([(w1, w2, w3, 2)], backend="cuda")
    assert lopfast.collapse_many([]) == []


def _small_net(dtype, device):
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),  # depthwise
        nn.Conv2d(4, 6, (1, 3), padding=(0, 1), groups=2), nn.ReLU(),
        nn.Conv2d(6, 5, 1),
    ).to(dtype)
    return lopfast.expand(net, rate=2).to(device)


def _step(net, x):
    net.zero_grad()
    out = net(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_collapsed_via_backend_equals_chain(backend, device):
    layer = lopfast.ExpandedConv2d(5, 7, (3, 2), padding=1, groups=1, rate=2, dtype=torch.float64).to(device)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, device=device)
    layer.mode = "chain"
    out_c, g_c = _step(layer, x)
    layer.mode = "collapsed"
    # "matmul" is a collapse-only name (use_backend takes the shared ones): the fast path takes it
    ctx = lopfast.use_backend(backend) if backend in lopfast.backend.BACKENDS else lopfast.CollapsedForward(layer, backend=backend)
    with ctx:
        out_k, g_k = _step(layer, x)
    torch.testing.assert_close(out_k, out_c, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_k, g_c):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_collapsed_forward_model(backend, device):
    """CollapsedForward: one grouped call per forward, same outputs and grads as the chain."""
    net = _small_net(torch.float64, device)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device)
    lopfast.set_mode(net, "chain")
    out_c, g_c = _step(net, x)
    lopfast.set_mode(net, "collapsed")
    with lopfast.CollapsedForward(net, backend=backend) as fast:
        assert len(fast.layers) == 4
        out_k, g_k = _step(net, x)
        assert all("_lopfast_weff" not in m.__dict__ for m in fast.layers)
    torch.testing.assert_close(out_k, out_c, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_k, g_c):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@contextlib.contextmanager
def ieee_fp32():
    """Full IEEE fp32 for convolutions and matmuls inside the block (cuDNN runs fp32 convolutions
    in TF32 by default, 2**-11 per operand), through the API of this torch (from 2.9 on
    ``fp32_precision``: mixing it with the legacy ``allow_tf32`` flags raises)."""
    saved = []
    for mod in (torch.backends.cudnn, torch.backends.cuda.matmul):
        target = getattr(mod, "conv", mod)
        if hasattr(target, "fp32_precision"):
            saved.append((target, "fp32_precision", target.fp32_precision))
            target.fp32_precision = "ieee"
        else:
            saved.append((mod, "allow_tf32", mod.allow_tf32))
            mod.allow_tf32 = False
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def test_collapsed_forward_reference_backend_and_chain_layers(device):
    """Compared at IEEE fp32 (TF32 off for cuDNN and matmuls; with cuDNN's default TF32 the chain's
    three convolutions and the collapsed one differ by ~1e-3 on a GPU, 2.7e-5 absolute on the
    H200): the fast path, with one layer left in chain mode, against every layer collapsed."""
    with ieee_fp32():
        net = _small_net(torch.float32, device)
        x = torch.randn(2, 3, 5, 5, device=device)
        out_ref, g_ref = _step(net, x)
        list(net.modules())[3].mode = "chain"  # a chain-mode layer is skipped by the fast path
        fast = lopfast.CollapsedForward(net, backend="torch")
        out, g = _step(net, x)
        fast.remove()
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@requires_triton
def test_fallback_without_triton_op():
    """torch < 2.6 has no torch.library.triton_op: the same launchers run in an autograd.Function.

    On a GPU the child runs the compiled kernels on CUDA tensors; without one, the interpreter on
    CPU tensors. (It used to force the interpreter everywhere: on the GPU image, whose triton 3.6
    interpreter with numpy 2 cannot run the grouped GEMM's ``range(pid, n_tiles, nprog)`` loop,
    "only 0-dimensional arrays can be converted to Python scalars", that is what failed there.)"""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        del torch.library.triton_op, torch.library.wrap_triton  # what torch 2.4/2.5 look like
        import lopfast
        from lopfast.ops import collapse as op
        assert not op._HAS_TRITON_OP
        torch.manual_seed(0)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        ws = [torch.randn(s, dtype=torch.float32, device=dev, requires_grad=True)
              for s in [(6, 3, 1, 1), (4, 3, 3, 1), (4, 2, 1, 1)]]
        out = op.collapse(*ws, 2, backend="triton")
        ref = [w.detach().double().requires_grad_() for w in ws]
        r = op.reference_collapse(*ref, 2)
        assert torch.allclose(out.double(), r, atol=1e-5)
        g = torch.randn_like(r)
        for a, b in zip(torch.autograd.grad(out, ws, g.float()), torch.autograd.grad(r, ref, g)):
            assert torch.allclose(a.double(), b, atol=1e-5)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@requires_triton
def test_aot_variants_compile_for_sm90_without_spills():
    """The real (not interpreted) Triton compiler lowers the heaviest shipped variants to sm_90
    with no GPU present, with the divisibility specialisation runtime uses, and ptxas reports
    no spills (tests/test_aot.py compiles every variant of aot_variants(); this keeps the
    collapse honest on its own). Own process: the interpreter switch is on in this one."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, re, subprocess, tempfile
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from lopfast.kernels.collapse import aot_variants
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        want = ("collapse_gemm_fp32_ieee_ak_bk_al16", "collapse_gemm_bf16_am_bn_al16", "collapse_gemm_fp32_tf32_ak_bn")
        variants = {v["name"]: v for v in aot_variants()}
        assert len(variants) == 24, sorted(variants)
        for name in want:
            v = variants[name]
            args = list(v["signature"])
            attrs = {(args.index(a),): [["tt.divisibility", 16]] for a in v["divisible_by_16"]}
            k = triton.compile(ASTSource(fn=v["fn"], signature=v["signature"], constexprs=v["constexprs"], attrs=attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=v["num_warps"], num_stages=v["num_stages"]))
            ptx = k.asm["ptx"]
            assert ptx, name
            if name.startswith("collapse_gemm_bf16"):  # aligned 16-bit: Hopper MMA and 16-byte async copies
                assert "wgmma" in ptx and re.search(r"cp\\.async\\.cg\\.shared\\.global.*0x10", ptx), name
            if os.path.exists(ptxas):
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(ptx)
                r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                   capture_output=True, text=True)
                assert r.returncode == 0, r.stderr[-2000:]
                spills = re.findall(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", r.stderr)
                assert spills and all(s == ("0", "0") for s in spills), (name, r.stderr)
                print(name, re.search(r"Used \\d+ registers", r.stderr).group(0))
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and ("ASTSource" in res.stderr and "ImportError" in res.stderr):
        pytest.skip("this triton has no ASTSource/GPUTarget AOT API")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@requires_cuda
@requires_triton
def test_gpu_triton_op_opcheck_and_compile():
    """The grouped op itself (plan built outside the compiled region) passes opcheck and
    compiles whole; torch.compile of collapse_many traces the "matmul" path instead."""
    if not op._HAS_TRITON_OP:
        pytest.skip("torch without triton_op")
    import lopfast.kernels.collapse as kc

    layers = [(*_factors(c, torch.float32, "cuda", seed=i), c[0]) for i, c in enumerate(GPU_ALIGNED[:2])]
    classes = [shape_class(*lay) for lay in layers]
    plan = op._get_plan(tuple(kc.ClassSpec(1, c.G, c.n, c.m, c.p, c.q, c.T, c.left) for c in classes),
                        torch.device("cuda"))
    x = torch.randn(plan.x_numel, device="cuda", requires_grad=True)
    args = (plan.tables.view(-1), plan.fwd, plan.bwd, plan.sizes, "ieee")
    torch.library.opcheck(torch.ops.lopfast.collapse_grouped, (x,) + args)
    f = torch.compile(lambda t: torch.ops.lopfast.collapse_grouped(t, *args)[0], fullgraph=True)
    torch.testing.assert_close(f(x), torch.ops.lopfast.collapse_grouped(x, *args)[0])
