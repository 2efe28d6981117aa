"""SP distillation loss (paper Eq. 7-11): Triton kernels and PyTorch reference against an independent
float64 reference, layouts, zero rows, errors, determinism, precision policy, torch.library registration.

Device-aware: every test takes the ``device`` fixture (conftest): CUDA tensors where a GPU is
present, CPU tensors otherwise, where ``backend="triton"`` runs the same kernels at the same (GPU)
tile sizes through the Triton interpreter. No test forces a backend onto tensors it cannot run on.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lopfast
from conftest import HAS_CUDA, HAS_TRITON, requires_cuda, requires_triton
from lopfast.backend import cuda_extension
from lopfast.ops import sp_loss as sp_ops


# ----------------------------------------------------------------------------- independent reference


def ref_sp_loss64(student, teacher):
    """Eq. 7-11 in float64, written out plainly."""
    total = torch.zeros((), dtype=torch.float64, device=student[0].device)
    for a_s, a_t in zip(student, teacher):
        b = a_s.shape[0]
        q_s = a_s.double().reshape(b, -1)                     # Q_S = reshape(A_S), b x m'h'w'
        q_t = a_t.double().detach().reshape(b, -1)            # Q_T = reshape(A_T), b x mhw
        g_s = q_s @ q_s.T                                     # Eq. 9
        g_t = q_t @ q_t.T                                     # Eq. 7
        g_s = g_s / g_s.norm(dim=1, keepdim=True).clamp_min(1e-12)  # Eq. 10 (F.normalize)
        g_t = g_t / g_t.norm(dim=1, keepdim=True).clamp_min(1e-12)  # Eq. 8
        total = total + ((g_t - g_s) ** 2).sum() / b ** 2     # Eq. 11
    return total


def torch_same_dtype(student, teacher):
    """The loop a user would write, in the input dtype (the error budget of the kernels)."""
    total = 0.0
    for a_s, a_t in zip(student, teacher):
        b = a_s.shape[0]
        q_s, q_t = a_s.reshape(b, -1), a_t.detach().reshape(b, -1)
        g_s = torch.nn.functional.normalize(q_s @ q_s.T, dim=1)
        g_t = torch.nn.functional.normalize(q_t @ q_t.T, dim=1)
        total = total + ((g_t - g_s) ** 2).sum() / b ** 2
    return total


def run(fn, student, teacher):
    s = [x.detach().clone().requires_grad_(True) for x in student]
    loss = fn(s, teacher)
    grads = torch.autograd.grad(loss, s)
    return loss.detach(), grads


def assert_close_to_ref(student, teacher, backend, atol_rel):
    ref_loss, ref_grads = run(ref_sp_loss64, [x.double() for x in student], teacher)  # fp64 leaves
    same_loss, same_grads = run(torch_same_dtype, student, teacher)
    loss, grads = run(lambda s, t: lopfast.sp_loss(s, t, backend=backend), student, teacher)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    err = (loss.double() - ref_loss).abs()
    budget = 2 * (same_loss.double() - ref_loss).abs() + atol_rel * max(ref_loss.abs().item(), 1e-3)
    assert err <= budget, (err, budget)
    for g, g_same, g_ref, x in zip(grads, same_grads, ref_grads, student):
        assert g.dtype == x.dtype and g.shape == x.shape
        scale = g_ref.abs().max().item() + 1e-12
        err = (g.double() - g_ref).abs()
        budget = 2 * (g_same.double() - g_ref).abs() + atol_rel * scale
        assert bool((err <= budget).all()), (err - budget).max()


# ----------------------------------------------------------------------------- shapes, dtypes, backends

SHAPES = {  # b -> list of (student shape, teacher shape) per pair; features never multiples of 16
    1: [((3, 5, 5), (2, 7, 7))],
    2: [((5, 3, 3), (6, 4, 3)), ((7,), (3, 11))],
    7: [((3, 5, 5), (2, 7, 7)), ((9, 2, 3), (5, 3, 3))],
    33: [((6, 3, 3), (5, 7)), ((37,), (3, 4, 3))],
}
# GPU-sized cases at the GPU tile sizes (also what the interpreter runs): b = 130 spans 3 Gram row
# tiles of 64 (mirrored off-diagonal tiles, atomics from several programs) and 2 backward row tiles
# of 128; 3 x 37 x 37 = 4107 features span 9 chunks of 512 (split-K accumulation across chunks)
BIG_SHAPES = {
    130: [((3, 7), (23,)), ((4, 5), (3, 7))],  # >= 20 features: no all-zero relu row (fp16 baseline NaNs)
    5: [((3, 37, 37), (2, 41, 41)), ((1100,), (17, 3))],
}
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=requires_cuda),  # the interpreter has no bf16
]


def make(b, shapes, dtype, device):
    s = [torch.randn(b, *ss, device=device).relu().to(dtype) for ss, _ in shapes]
    t = [torch.randn(b, *ts, device=device).relu().to(dtype) for _, ts in shapes]
    return s, t


def _check_kernels_ran(backend, before):
    if backend == "triton":  # the kernels ran (forward gram/finish + backward)
        launched = lopfast.kernels.sp_gram.LAUNCHES
        assert launched["gram"] > before["gram"] and launched["sp_grad_features"] > before["sp_grad_features"]


@pytest.mark.parametrize("b", sorted(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fp64_reference(b, dtype, backend, device):
    s, t = make(b, SHAPES[b], dtype, device)
    before = dict(lopfast.kernels.sp_gram.LAUNCHES) if HAS_TRITON else {}
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_close_to_ref(s, t, backend, atol)
    _check_kernels_ran(backend, {k: before.get(k, 0) for k in ("gram", "sp_grad_features")})


@pytest.mark.parametrize("b", sorted(BIG_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_sized_tiles_and_chunks(b, dtype, backend, device):
    """Several row tiles / several 512-feature chunks at the GPU block sizes (interpreter on CPU)."""
    K = lopfast.kernels.sp_gram if HAS_TRITON else None
    s, t = make(b, BIG_SHAPES[b], dtype, device)
    if K is not None:  # the case spans several row tiles or several split-K chunks of one tensor
        k_iters, programs = K.gram_plan([sp_ops.row_view(x) for x in s[:1]])
        assert b > K.GRAM_BLOCK_B or s[0][0].numel() > 2 * K.GRAM_BLOCK_K * k_iters
    before = dict(K.LAUNCHES) if K is not None else {}
    assert_close_to_ref(s, t, backend, 1e-5 if dtype == torch.float32 else 2e-3)
    _check_kernels_ran(backend, {k: before.get(k, 0) for k in ("gram", "sp_grad_features")})


@requires_triton
@pytest.mark.parametrize("sms", [1, 4, 132, None])  # 132: an H100/H200
def test_split_k_sized_to_the_machine(sms, device, monkeypatch):
    """The split-K adapts to the SM count (long chunks on a small machine, short ones on a big one);
    every split gives the same Gram, and the grid holds the upper-triangle tiles only."""
    K = lopfast.kernels.sp_gram
    monkeypatch.setattr(K, "NUM_SMS", sms)
    qs = [sp_ops.row_view(x) for x in make(130, [((7, 150), (1,)), ((3, 37), (1,))], torch.float32, device)[0]]
    k_iters, programs = K.gram_plan(qs)
    nt = -(-130 // K.GRAM_BLOCK_B)
    if sms is not None:
        target = K.GRAM_WAVES * sms
        assert programs <= target + len(qs) * nt * (nt + 1) // 2  # about GRAM_WAVES waves, no more
        # 19 feature blocks x 6 upper tiles = 114 programs at one block each: a big GPU takes them
        # as they are, a small one gets longer chunks
        assert (k_iters == 1) if sms == 132 else (k_iters > 1)
    ref = torch.stack([q.double() @ q.double().T for q in qs])
    for determ in (False, True):
        g = K.gram(qs, deterministic=determ)
        torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-4)


@requires_cuda
@requires_triton
@pytest.mark.parametrize("b", sorted(BIG_SHAPES))
def test_gpu_sized_bf16(b, device):
    s, t = make(b, BIG_SHAPES[b], torch.bfloat16, device)
    assert_close_to_ref(s, t, "triton", 2e-3)


def test_float64_runs_the_reference(device):
    """float64 never reaches tl.dot (no fp64 MMA on sm_90): "auto" computes it with the reference;
    an explicit Triton request says so."""
    s, t = make(6, SHAPES[7], torch.float64, device)
    K = lopfast.kernels.sp_gram if HAS_TRITON else None
    before = sum(K.LAUNCHES.values()) if K is not None else 0
    assert_close_to_ref(s, t, "auto", 1e-5)
    if K is not None:
        assert sum(K.LAUNCHES.values()) == before
        with pytest.raises(ValueError, match="float64"):
            lopfast.sp_loss(s, t, backend="triton")
        with lopfast.use_backend("triton"), pytest.raises(ValueError, match="float64"):
            lopfast.sp_loss(s, t)
        with pytest.raises(TypeError, match="float64"):  # the launcher refuses it too
            K.gram([sp_ops.row_view(s[0])])
    mixed = [s[0].float(), s[1]]  # one float64 pair is enough to route the call
    assert_close_to_ref(mixed, t, "auto", 1e-5)


@requires_triton
def test_many_pairs_one_launch_per_eight(device, monkeypatch):
    """10 pairs of different shapes: ceil(10/8) = 2 Gram launches per side (per-pair path). With
    mixed dtypes a launch holds one dtype (a run of consecutive pairs): one pointer type per
    compiled variant, no mixed-dtype kernels to compile."""
    K = lopfast.kernels.sp_gram
    monkeypatch.setattr(K, "USE_TABLE", False)
    b = 3
    shapes = [((i + 1, 2, 3), (2, i + 2)) for i in range(10)]
    s, t = make(b, shapes, torch.float32, device)
    K.LAUNCHES.clear()
    assert_close_to_ref(s, t, "triton", 1e-3)
    assert K.LAUNCHES["gram"] == 4          # teacher 2 + student 2
    assert K.LAUNCHES["row_normalize"] == 1 and K.LAUNCHES["sp_finish"] == 1
    assert K.LAUNCHES["sp_grad_gram"] == 1 and K.LAUNCHES["sp_grad_features"] == 2
    s[3] = s[3].half()
    t[5] = t[5].half()
    K.LAUNCHES.clear()
    assert_close_to_ref(s, t, "triton", 1e-3)
    assert K.LAUNCHES["gram"] == 6          # runs [0-2] [3] [4-9] and [0-4] [5] [6-9]
    assert K.LAUNCHES["sp_grad_features"] == 3


def test_auto_is_reference_on_cpu_and_use_backend():
    if HAS_CUDA:
        pytest.skip("CPU dispatch")
    K = lopfast.kernels.sp_gram
    s, t = make(4, SHAPES[7], torch.float32, "cpu")
    before = sum(K.LAUNCHES.values())
    lopfast.sp_loss(s, t)
    with lopfast.use_backend("torch"):
        lopfast.sp_loss(s, t)
    assert sum(K.LAUNCHES.values()) == before
    if HAS_TRITON:
        with lopfast.use_backend("triton"):
            lopfast.sp_loss(s, t)
        assert sum(K.LAUNCHES.values()) > before


# ----------------------------------------------------------------------------- layouts


def test_row_view_is_a_view_for_sample_dense_layouts():
    x = torch.randn(4, 6, 5, 3)
    cl = x.to(memory_format=torch.channels_last)
    sliced = x[:, :4]  # each sample still one dense block, sample stride 90 != 60 features
    for t in (x, cl, sliced, x.permute(0, 2, 3, 1)):
        q = sp_ops.row_view(t)
        assert q.shape == (4, t[0].numel()) and q.stride(1) == 1
        assert q.data_ptr() == t.data_ptr() and q.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        g = q @ q.T
        torch.testing.assert_close(g, t.reshape(4, -1) @ t.reshape(4, -1).T)
    # a batch-transposed tensor has no dense samples: copied
    y = torch.randn(30, 4).T
    q = sp_ops.row_view(y)
    assert q.is_contiguous() and q.data_ptr() != y.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_strided_inputs(backend, device):
    b = 5
    base = torch.randn(b, 7, 3, 5, device=device).relu()
    s_cl = torch.randn(b, 6, 4, 3, device=device).to(memory_format=torch.channels_last)
    s_sl = torch.randn(b, 9, 3, 3, device=device)[:, 2:7]  # sample stride 81, 45 features: unaligned
    s_tr = torch.randn(11, b, device=device).T  # not sample-dense: copied, still right
    student = [s_cl, s_sl, s_tr]
    teacher = [base, base[:, :3], torch.randn(b, 4, device=device)]
    assert_close_to_ref(student, teacher, backend, 1e-5)
    s = [x.detach().clone().requires_grad_(True) if i != 0 else
         x.detach().clone().to(memory_format=torch.channels_last).requires_grad_(True) for i, x in enumerate(student)]
    loss = lopfast.sp_loss(s, teacher, backend=backend)
    (g0,) = torch.autograd.grad(loss, s[:1])
    assert g0.is_contiguous(memory_format=torch.channels_last)  # gradient keeps the layout


@pytest.mark.parametrize("backend", BACKENDS)
def test_aligned_and_offset_row_views(backend, device):
    """Feature counts and sample strides that are multiples of 16 (the ALIGN=16 kernel variant) and
    a view starting at an odd element offset (pointer not 16-byte aligned)."""
    b = 9
    big = torch.randn(b, 3, 16, 16, device=device)
    off = torch.randn(b * 97 + 1, device=device)[1:].view(b, 97)[:, :48]  # stride 97, offset 1 element
    assert_close_to_ref([big, off], [big[:, :2], torch.randn(b, 32, device=device)], backend, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend, device):
    s, t = make(6, SHAPES[7], torch.float32, device)
    s[0][2] = 0.0   # a dead sample in a student layer
    t[1][4] = 0.0   # and in a teacher layer
    t[0][2] = 0.0
    assert_close_to_ref(s, t, backend, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_row_gradient_overflows_fp16_exactly_where_it_must(backend, device):
    """A dead sample (all-zero features) in fp16: F.normalize's gradient D / eps is ~1e10 in its
    row of dQ, beyond fp16's range. Every backend returns +-inf exactly there (the CUDA C++ one is
    checked the same way in test_cuda_ext.py) and the right finite values everywhere else."""
    from test_cuda_ext import assert_grads_match_with_overflow

    shapes = [((5, 7, 7), (9, 7, 7)), ((33,), (17,)), ((3, 4, 4), (3, 4, 4))]
    s, t = make(12, shapes, torch.float16, device)
    s[2][3] = 0
    _, ref = run(ref_sp_loss64, [x.double() for x in s], t)
    _, grads = run(lambda a, b: lopfast.sp_loss(a, b, backend=backend), s, t)
    assert assert_grads_match_with_overflow(grads, ref, torch.float16, 2e-3) == 48


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_detached_and_grad_output(backend, device):
    s, t = make(4, SHAPES[7], torch.float16, device)
    s = [x.requires_grad_() for x in s]
    t = [x.requires_grad_() for x in t]
    loss = lopfast.sp_loss(s, t, backend=backend)
    assert loss.dtype == torch.float32 and loss.requires_grad
    g1 = torch.autograd.grad(loss, s, retain_graph=True)
    g2 = torch.autograd.grad(loss, s, grad_outputs=torch.tensor(2.5, device=device))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(c.float(), 2.5 * a.float(), rtol=2e-3, atol=1e-6)
    loss2 = lopfast.sp_loss(s, t, backend=backend)
    (loss2 * 3).sum().backward()
    assert all(x.grad is None for x in t)
    assert all(x.grad is not None for x in s)


def test_sp_gram_and_from_gram_agree(device):
    s, t = make(7, SHAPES[7], torch.float32, device)
    gt = lopfast.sp_gram(t, backend="torch")
    assert gt.shape == (2, 7, 7) and gt.dtype == torch.float32
    torch.testing.assert_close(lopfast.sp_loss_from_gram(s, gt, backend="torch"), lopfast.sp_loss(s, t, backend="torch"))
    if HAS_TRITON:
        torch.testing.assert_close(lopfast.sp_gram(t, backend="triton"), gt, atol=1e-6, rtol=1e-5)


def test_module_form(device):
    s, t = make(3, SHAPES[2], torch.float32, device)
    m = lopfast.SPLoss(backend="torch")
    torch.testing.assert_close(m(s, t), lopfast.sp_loss(s, t))
    torch.testing.assert_close(m(s[0], t[0]), lopfast.sp_loss([s[0]], [t[0]]))
    assert "torch" in repr(m)


# ----------------------------------------------------------------------------- errors


def test_errors(device):
    s, t = make(4, SHAPES[7], torch.float32, device)
    with pytest.raises(ValueError, match="student has 2 .* teacher has 1"):
        lopfast.sp_loss(s, t[:1])
    with pytest.raises(ValueError, match=r"teacher\[1\] has batch size 3"):
        lopfast.sp_loss(s, [t[0], t[1][:3]])
    with pytest.raises(ValueError, match=r"student\[1\] has batch size 2"):
        lopfast.sp_loss([s[0], s[1][:2]], t)
    with pytest.raises(ValueError, match="student is empty"):
        lopfast.sp_loss([], [])
    with pytest.raises(ValueError, match="0-d"):
        lopfast.sp_loss(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(TypeError, match="teacher"):
        lopfast.sp_loss(s, 3)
    with pytest.raises(TypeError, match=r"student\[0\]"):
        lopfast.sp_loss([1], [t[0]])
    with pytest.raises(ValueError, match="backend"):
        lopfast.sp_loss(s, t, backend="tpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lopfast.sp_loss([x.cpu() for x in s], [x.cpu() for x in t], backend="cuda")
    with pytest.raises(ValueError, match="teacher_gram must have shape"):
        lopfast.sp_loss_from_gram(s, torch.zeros(1, 4, 4, device=device))


def test_cuda_backend_follows_the_extension(device):
    """backend="cuda" raises exactly when it cannot run: CPU tensors, or no built extension."""
    s, t = make(4, SHAPES[7], torch.float32, device)
    if device.type == "cuda" and cuda_extension() is not None:
        assert_close_to_ref(s, t, "cuda", 1e-5)
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            lopfast.sp_loss(s, t, backend="cuda")
    with pytest.raises(RuntimeError, match=r"only\s+implements the whole loss|backend 'cuda'"):
        lopfast.sp_gram(t, backend="cuda")


# ----------------------------------------------------------------------------- registration


OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_all(ops, device):
    s, t = make(5, SHAPES[7], torch.float32, device)
    s[0] = s[0].contiguous(memory_format=torch.channels_last) if s[0].dim() == 4 else s[0]
    s = [x.requires_grad_() for x in s]
    gt = lopfast.sp_gram(t, backend="torch")
    torch.library.opcheck(ops.sp_gram, ([x.detach() for x in t], "ieee", False), test_utils=OPCHECKS)
    torch.library.opcheck(ops.sp_loss_fwd, (s, gt, "ieee", False), test_utils=OPCHECKS)
    loss, graw = ops.sp_loss_fwd(s, gt, "ieee", False)
    torch.library.opcheck(ops.sp_loss_bwd,
                          (torch.tensor(1.0, device=device), [x.detach() for x in s], gt, graw.detach(), "ieee"),
                          test_utils=OPCHECKS)
    return s, gt, loss


@pytest.mark.skipif(sp_ops.OPS is None, reason="torch.library.custom_op needs torch >= 2.4 and triton")
def test_opcheck(device):
    """Schema, autograd registration, fake implementation against the real one (shapes, dtypes,
    strides: a channels_last feature's gradient included) and AOT dispatch with dynamic shapes:
    on the GPU the Triton implementation, on CPU the registered reference kernels."""
    s, gt, loss = _opcheck_all(sp_ops.OPS, device)
    # the registered op (CPU kernel = reference; Triton on CUDA) agrees with the plain reference
    ref = sp_ops.sp_loss_reference(s, gt)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for a, c in zip(torch.autograd.grad(loss, s), torch.autograd.grad(ref, s)):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6 * c.abs().max().item())


@pytest.fixture(scope="module")
def interp_ops():
    """The ops as they run on CUDA (Triton implementation, no CPU reference kernels), in their own
    namespace: CPU tensors reach the Triton kernels through the interpreter."""
    if HAS_CUDA or sp_ops.OPS is None:
        pytest.skip("interpreter check of the ops' Triton implementation (CPU only)")
    return sp_ops._Ops("lopfast_sptest", cpu_reference=False)


def test_triton_op_bodies_run_triton_under_interpreter(interp_ops):
    """The ops that run on CUDA, built without CPU kernels: CPU tensors reach the Triton kernels."""
    ops = interp_ops
    K = lopfast.kernels.sp_gram
    s, t = make(7, SHAPES[7], torch.float32, "cpu")
    s = [x.requires_grad_() for x in s]
    K.LAUNCHES.clear()
    gt = ops.gram(t)
    loss = ops.loss(s, gt)
    grads = torch.autograd.grad(loss, s)
    assert K.LAUNCHES["gram"] == 2 and K.LAUNCHES["sp_grad_features"] == 1
    ref_loss, ref_grads = run(ref_sp_loss64, s, t)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_opcheck_triton_implementation(interp_ops):
    """opcheck of the Triton implementation itself (interpreter): its outputs' metadata match the
    fake implementation's, under AOT dispatch with dynamic shapes too (on the H200 the op failed
    test_aot_dispatch_dynamic: Inductor could not analyse the wrapped Triton launch)."""
    _opcheck_all(interp_ops, torch.device("cpu"))


@pytest.mark.parametrize("table", [False, True])
def test_compile_fullgraph_dynamic_runs_the_kernels(interp_ops, table, monkeypatch):
    """torch.compile(fullgraph=True, dynamic=True) of the loss and its backward: the ops are opaque
    calls with fake implementations (no graph break, no look inside), two batch sizes share one
    dynamic graph, and at run time the Triton kernels run, the device-side pair table included."""
    K = lopfast.kernels.sp_gram
    monkeypatch.setattr(K, "USE_TABLE", table)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, g: interp_ops.loss(a, g), fullgraph=True, dynamic=True, backend="aot_eager")
    for b in (5, 7):
        s, t = make(b, SHAPES[7], torch.float32, "cpu")
        s = [x.requires_grad_() for x in s]
        gt = lopfast.sp_gram(t, backend="torch")
        K.LAUNCHES.clear()
        loss = compiled(s, gt)
        grads = torch.autograd.grad(loss, s)
        assert K.LAUNCHES["gram"] == 1 and K.LAUNCHES["sp_grad_features"] == 1
        assert K.LAUNCHES["gram_table"] == int(table)
        ref_loss, ref_grads = run(ref_sp_loss64, s, t)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5 * r.abs().max().item())


@requires_cuda
@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_gpu(device, dynamic):
    """Inductor on the GPU (the issue's crash: "Cannot access data pointer of Tensor"), dynamic
    shapes too, with the Triton backend and with the distiller's two calls."""
    torch._dynamo.reset()

    def f(s, t):
        return lopfast.sp_loss(s, t, backend="triton") + lopfast.sp_loss_from_gram(s, lopfast.sp_gram(t))

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for b in (16, 24):
        s, t = make(b, [((8, 5, 5), (6, 7, 7)), ((12, 3, 3), (9, 3, 3))], torch.float32, device)
        s = [x.requires_grad_() for x in s]
        loss = compiled(s, t)
        grads = torch.autograd.grad(loss, s)
        ref_loss, ref_grads = run(lambda a, c: 2 * ref_sp_loss64(a, c), s, t)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r.double(), rtol=1e-3, atol=1e-4 * r.abs().max().item())


def test_dynamo_traces_dispatch_fullgraph():
    """The Python around the op (checks, backend choice) traces with fullgraph=True (no GPU needed)."""
    s, t = make(4, SHAPES[7], torch.float32, "cpu")
    s = [x.requires_grad_() for x in s]

    def f(s, t):
        return lopfast.sp_loss(s, t)  # "auto": the reference on CPU

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    loss = compiled(s, t)
    torch.testing.assert_close(loss, lopfast.sp_loss(s, t))
    with lopfast.use_backend("torch"):
        torch.testing.assert_close(compiled(s, t), loss)


# ----------------------------------------------------------------------------- determinism


@requires_triton
@pytest.mark.parametrize("b", [7, 5])
def test_deterministic_mode_is_bitwise_repeatable(b, device):
    """torch.use_deterministic_algorithms(True): the Gram's split-K atomics give way to per-chunk
    partials summed in chunk order; loss and gradients repeat bit for bit (b = 5: several chunks)."""
    K = lopfast.kernels.sp_gram
    s, t = make(b, SHAPES[7] if b == 7 else BIG_SHAPES[5], torch.float32, device)

    def once():
        ss = [x.detach().clone().requires_grad_() for x in s]
        loss = lopfast.sp_loss(ss, t, backend="triton")
        return loss.detach(), torch.autograd.grad(loss, ss)

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        before = K.LAUNCHES["gram_deterministic"]
        runs = [once() for _ in range(3)]
        assert K.LAUNCHES["gram_deterministic"] == before + 3 * 2  # teacher + student side per run
    finally:
        torch.use_deterministic_algorithms(prev)
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert all(torch.equal(a, c) for a, c in zip(grads, runs[0][1]))
    loss, grads = once()  # default (atomic) mode: the same values up to the summation order
    assert K.LAUNCHES["gram_deterministic"] == before + 6
    torch.testing.assert_close(loss, runs[0][0], rtol=1e-5, atol=1e-7)
    for a, c in zip(grads, runs[0][1]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5 * c.abs().max().item())


@requires_triton
def test_deterministic_gram_matches_atomic_gram(device):
    K = lopfast.kernels.sp_gram
    qs = [sp_ops.row_view(x) for x in make(70, [((5, 13, 17), (1,)), ((3,), (1,))], torch.float32, device)[0]]
    torch.testing.assert_close(K.gram(qs, deterministic=True), K.gram(qs), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- precision policy


def test_fp32_matmul_precision_follows_torch():
    from lopfast.ops._precision import fp32_matmul_precision

    matmul = torch.backends.cuda.matmul
    assert fp32_matmul_precision() == "ieee"  # PyTorch's default
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        try:
            matmul.fp32_precision = "tf32"
            assert fp32_matmul_precision() == "tf32"
            matmul.fp32_precision = "ieee"
            assert fp32_matmul_precision() == "ieee"
        finally:
            matmul.fp32_precision = old
    else:  # torch < 2.9: the legacy flag
        old = matmul.allow_tf32
        try:
            matmul.allow_tf32 = True
            assert fp32_matmul_precision() == "tf32"
        finally:
            matmul.allow_tf32 = old
    assert fp32_matmul_precision() == "ieee"


def test_fp32_matmul_precision_legacy_and_mixed_apis_never_raise():
    """Own process: mixing the legacy and the new TF32 API leaves torch in a state where reading
    ``allow_tf32`` raises, which must not leak into other tests."""
    code = textwrap.dedent("""
        import torch
        from lopfast.ops._precision import fp32_matmul_precision as p
        m = torch.backends.cuda.matmul
        m.allow_tf32 = True                       # legacy API
        assert p() == "tf32", p()
        m.allow_tf32 = False
        assert p() == "ieee", p()
        torch.set_float32_matmul_precision("high")
        assert p() == "tf32", p()
        torch.set_float32_matmul_precision("highest")
        if hasattr(m, "fp32_precision"):          # new API on top of the legacy one
            m.fp32_precision = "tf32"
            try:
                m.allow_tf32                      # torch itself may refuse the mix ...
            except RuntimeError:
                pass
            assert p() == "tf32", p()             # ... the helper does not
            m.allow_tf32 = False
            m.fp32_precision = "ieee"
            assert p() == "ieee", p()
        c = torch.compile(lambda x: x * (2.0 if p() == "tf32" else 1.0), backend="eager", fullgraph=True)
        x = torch.ones(2)
        assert c(x)[0].item() == 1.0
        if hasattr(m, "fp32_precision"):
            m.fp32_precision = "tf32"
        else:
            m.allow_tf32 = True
        assert c(x)[0].item() == 2.0              # a changed flag is seen by the compiled code
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@requires_triton
def test_precision_policy_reaches_the_kernels(device, monkeypatch):
    """IEEE fp32 by default; TF32 only when the user switched PyTorch's fp32 matmuls to TF32."""
    K = lopfast.kernels.sp_gram
    seen = []
    real_gram, real_grad = K.gram, K.sp_grad_features

    def gram(*a, **k):
        seen.append(("gram", k["precision"]))
        return real_gram(*a, **k)

    def grad(*a, **k):
        seen.append(("grad", k["precision"]))
        return real_grad(*a, **k)

    monkeypatch.setattr(K, "gram", gram)
    monkeypatch.setattr(K, "sp_grad_features", grad)
    s, t = make(4, SHAPES[7], torch.float32, device)
    s = [x.requires_grad_() for x in s]
    torch.autograd.grad(lopfast.sp_loss(s, t, backend="triton"), s)
    assert seen and all(p == "ieee" for _, p in seen), seen
    seen.clear()
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    old = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        torch.autograd.grad(lopfast.sp_loss(s, t, backend="triton"), s)
    finally:
        if new_api:
            matmul.fp32_precision = old
        else:
            matmul.allow_tf32 = old
    assert {k for k, _ in seen} == {"gram", "grad"} and all(p == "tf32" for _, p in seen), seen
