"""The SP loss's device-side pair table (kernels/sp_gram.py): one Gram launch and one dQ launch per
dtype for every layer pair of a step, the kernel following device addresses loaded from an int64
table.

The interpreter cannot follow loaded pointers, so the table *kernels* run only on CUDA (the GPU
tests below, skipped without one; the AOT test compiles them for sm_90 without a GPU). On CPU the
table *builder* is checked: its rows, its work list, and an emulation in PyTorch that walks the
work list exactly as the kernel does (address -> tensor, tile, chunk, output offset) and must
reproduce Q Q^T and (dG + dG^T) Q.
"""
import pytest
import torch
import torch.nn as nn

import lopfast
from conftest import requires_cuda, requires_triton
from lopfast.ops import sp_loss as sp_ops

K = pytest.importorskip("lopfast.kernels.sp_gram")


# ----------------------------------------------------------------------------- ResNet-56 shapes


def resnet56_shapes(width=1.0):
    """(C, H, W) of the 55 conv outputs of a CIFAR ResNet-56 (stem + 3 stages x 9 blocks x 2 convs),
    channels scaled by ``width`` (a pruned student)."""
    shapes = [(max(1, int(16 * width)), 32, 32)]
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        shapes += [(max(1, int(c * width)), hw, hw)] * 18
    return shapes


def test_resnet56_has_55_pairs():
    assert len(resnet56_shapes()) == 55


# ----------------------------------------------------------------------------- builder (CPU)


def emulate_gram(plan, tensors, b, chunk, deterministic):
    """The Gram table kernel, written in PyTorch over the table's ints (float64)."""
    ints = plan.ints
    rows = [ints[p * K.PAIR_COLS:(p + 1) * K.PAIR_COLS] for p in range(plan.n_pairs)]
    by_addr = {q.data_ptr(): q for q in tensors}
    work = ints[plan.n_pairs * K.PAIR_COLS:]
    n_slots = plan.n_partials
    out = torch.zeros(n_slots * b * b, dtype=torch.float64)
    bb, B = b * b, K.GRAM_BLOCK_B
    for w in range(plan.n_work):
        p, ti, tj, c, off = work[w * K.GRAM_WORK_COLS:(w + 1) * K.GRAM_WORK_COLS]
        addr, F, stride = rows[p][:3]
        q = by_addr[addr]
        assert q.shape[1] == F and q.stride(0) == stride
        assert off % bb == 0 and 0 <= off < n_slots * bb
        ks = slice(c * chunk, min((c + 1) * chunk, F))
        ri, rj = slice(ti * B, min((ti + 1) * B, b)), slice(tj * B, min((tj + 1) * B, b))
        part = q[ri, ks].double() @ q[rj, ks].double().T
        g = out[off:off + bb].view(b, b)
        g[ri, rj] += part
        if ti != tj:
            g[rj, ri] += part.T
    return out.view(n_slots, b, b)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("b", [3, 64, 130])
def test_gram_table_rows_work_list_and_emulation(b, deterministic):
    feats = [torch.randn(b, 5, 7), torch.randn(b, 0), torch.randn(b, 300), torch.randn(b, 2, 64)]
    qs = [sp_ops.row_view(x) for x in feats]
    chunk = 128
    slots = [3, 0, 1, 2]  # the pairs' slots of the (P, b, b) output need not follow the table order
    plan = K.build_gram_table([(q.data_ptr(), q.shape[1], q.stride(0)) for q in qs], slots, b, chunk,
                              deterministic)
    tiles = K.gram_tiles(b)
    nt = -(-b // K.GRAM_BLOCK_B)
    assert len(tiles) == nt * (nt + 1) // 2 and all(ti <= tj for ti, tj in tiles)
    chunks = [-(-q.shape[1] // chunk) for q in qs]
    assert plan.n_pairs == 4 and plan.n_work == sum(chunks) * len(tiles)
    assert len(plan.ints) == 4 * K.PAIR_COLS + plan.n_work * K.GRAM_WORK_COLS
    for p, q in enumerate(qs):  # pair rows: address, feature count, sample stride, slot
        assert plan.ints[p * K.PAIR_COLS:p * K.PAIR_COLS + 4] == [q.data_ptr(), q.shape[1], q.stride(0), slots[p]]
    work = [tuple(plan.ints[4 * K.PAIR_COLS + w * K.GRAM_WORK_COLS:][:K.GRAM_WORK_COLS]) for w in range(plan.n_work)]
    assert len({w[:4] for w in work}) == plan.n_work  # every (pair, tile, chunk) exactly once
    if deterministic:  # one partial slot per (pair, chunk), pair after pair, in chunk order
        assert plan.n_partials == sum(chunks)
        lo = 0
        for (a, z), n in zip(plan.partials, chunks):
            assert (a, z) == (lo, lo + n)
            lo += n
    else:
        assert plan.partials == [(s, s + 1) for s in slots] and plan.n_partials == 4
    g = emulate_gram(plan, qs, b, chunk, deterministic)
    for p, q in enumerate(qs):
        ref = q.double() @ q.double().T
        lo, hi = plan.partials[p]
        got = g[lo:hi].sum(0) if hi > lo else torch.zeros(b, b, dtype=torch.float64)
        torch.testing.assert_close(got if deterministic else g[slots[p]], ref)


def test_grad_table_rows_and_emulation():
    b = 70
    feats = [torch.randn(b, 3, 9, 9), torch.randn(b, 0), torch.randn(b, 130)]
    qs = [sp_ops.row_view(x.contiguous()) for x in feats]
    dqs = [torch.empty_like(q) for q in qs]
    plan = K.build_grad_table([(q.data_ptr(), q.shape[1], q.stride(0), d.data_ptr(), d.stride(0))
                               for q, d in zip(qs, dqs)], [0, 1, 2], K.GRAD_BLOCK_K)
    blocks = [-(-q.shape[1] // K.GRAD_BLOCK_K) for q in qs]
    assert plan.n_work == sum(blocks)
    m = torch.randn(3, b, b, dtype=torch.float64)
    rows = [plan.ints[p * K.PAIR_COLS:(p + 1) * K.PAIR_COLS] for p in range(3)]
    by_addr = {t.data_ptr(): t for t in qs}
    by_daddr = {t.data_ptr(): t for t in dqs if t.numel()}
    work = plan.ints[3 * K.PAIR_COLS:]
    seen = set()
    for w in range(plan.n_work):  # the dQ kernel: rows of M times a column block of Q
        p, c = work[w * K.GRAD_WORK_COLS:(w + 1) * K.GRAD_WORK_COLS]
        addr, F, stride, slot, daddr, dstride = rows[p][:6]
        q, d = by_addr[addr], by_daddr[daddr]
        assert d.stride(0) == dstride and (p, c) not in seen
        seen.add((p, c))
        ks = slice(c * K.GRAD_BLOCK_K, min((c + 1) * K.GRAD_BLOCK_K, F))
        d[:, ks] = (m[slot] @ q[:, ks].double()).to(d.dtype)
    for p in (0, 2):
        torch.testing.assert_close(dqs[p].double(), m[p] @ qs[p].double(), rtol=1e-5, atol=1e-5)


def test_by_dtype_groups_in_order():
    qs = [torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 1), torch.zeros(2, 2).half()]
    assert K._by_dtype(qs) == [[0, 2], [1, 3]]


def test_table_refused_where_it_cannot_run():
    """CPU tensors (and the interpreter, and traced tensors) keep the per-pair launches; asking for
    the table there is an error naming why."""
    qs = [torch.randn(4, 8), torch.randn(4, 16)]
    assert not K.table_supported(qs)
    assert not K._use_table(qs, None) and not K._use_table(qs, False)
    with pytest.raises(ValueError, match="table=True needs real CUDA tensors"):
        K.gram(qs, table=True)


# ----------------------------------------------------------------------------- launch counts, per-pair path


class Deep(nn.Module):
    """Ten 3x3 convs in a row: ten SP layer pairs (more than one per-pair launch holds)."""

    def __init__(self, width):
        super().__init__()
        chans = [3] + [width] * 10
        self.convs = nn.ModuleList(nn.Conv2d(a, c, 3, 1, 1) for a, c in zip(chans[:-1], chans[1:]))

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x.mean((1, 2, 3))


@requires_triton
def test_distiller_launch_count(device):
    """One distiller step with ten pairs: on the per-pair path (CPU interpreter) the teacher's and
    the student's Grams take ceil(10 / 8) = 2 launches each; on CUDA the table takes 1 each. The
    loss is one launch (sp_finish) and the teacher normalisation one, whatever the path; the
    backward 1 (dGr) + the dQ launches (2 per-pair, 1 table)."""
    torch.manual_seed(0)
    teacher = Deep(4).to(device)
    student = lopfast.expand(Deep(3), rate=2.0).to(device)
    x = torch.randn(3, 3, 6, 6, device=device)
    K.LAUNCHES.clear()
    with lopfast.SPDistiller(teacher, student, backend="triton") as d:
        assert len(d.layers) == 10
        _, sp = d(x)
        grads = torch.autograd.grad(sp, [p for p in student.parameters() if p.requires_grad])
    per_side = 1 if device.type == "cuda" else 2
    assert K.LAUNCHES["gram"] == 2 * per_side
    assert K.LAUNCHES["gram_table"] == (2 if device.type == "cuda" else 0)
    assert K.LAUNCHES["row_normalize"] == 1 and K.LAUNCHES["sp_finish"] == 1
    assert K.LAUNCHES["sp_grad_gram"] == 1 and K.LAUNCHES["sp_grad_features"] == per_side
    with lopfast.SPDistiller(teacher, student, backend="torch") as d:
        _, sp_ref = d(x)
        ref = torch.autograd.grad(sp_ref, [p for p in student.parameters() if p.requires_grad])
    torch.testing.assert_close(sp, sp_ref, rtol=1e-4, atol=1e-6)
    scale = max(r.abs().max().item() for r in ref)  # fp32 both: cancellation in small entries
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- table kernels (CUDA)

def resnet56_feats(b, dtype, device, width=1.0, unaligned=False):
    """Activations of the 55 ResNet-56 layers; ``unaligned``: each a view at an odd element offset
    with an odd sample stride (rows still dense: no copy, ALIGN = 1)."""
    out = []
    for c, h, w in resnet56_shapes(width):
        if unaligned:
            buf = torch.randn(b, c * h * w + 1, device=device).relu().to(dtype)
            out.append(buf[:, 1:].view(b, c, h, w))
        else:
            out.append(torch.randn(b, c, h, w, device=device).relu().to(dtype))
    return out


def _gram_budget_check(qs, g):
    for q, gk in zip(qs, g):
        ref = q.double() @ q.double().T
        same = (q @ q.T).double()
        err = (gk.double() - ref).abs()
        assert bool((err <= 2 * (same - ref).abs() + 1e-5 * ref.abs().max()).all()), err.max()


@requires_cuda
@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("unaligned", [False, True])
def test_table_gram_resnet56(dtype, deterministic, unaligned, device):
    """All 55 pairs in one launch against the float64 reference (2x the same-dtype error) and the
    per-pair launches; aligned (ALIGN = 16) and odd addresses / strides (ALIGN = 1)."""
    qs = [sp_ops.row_view(x) for x in resnet56_feats(8, dtype, device, unaligned=unaligned)]
    aligned = all(q.data_ptr() % 16 == 0 and q.stride(0) % 16 == 0 for q in qs)
    assert aligned != unaligned and all(q.stride(1) == 1 for q in qs)
    before = K.LAUNCHES["gram_table"]
    g = K.gram(qs, deterministic=deterministic, table=True)
    assert K.LAUNCHES["gram_table"] == before + 1  # all 55 pairs, one launch
    assert g.shape == (55, 8, 8) and g.dtype == torch.float32
    _gram_budget_check(qs, g)
    per_pair = K.gram(qs, deterministic=deterministic, table=False)
    torch.testing.assert_close(g, per_pair, rtol=1e-5, atol=1e-5 * per_pair.abs().max().item())
    if deterministic:
        torch.testing.assert_close(K.gram(qs, deterministic=True, table=True), g, rtol=0, atol=0)


@requires_cuda
@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_loss_resnet56_fwd_bwd(dtype, device):
    """55 pairs (pruned half-width student, full teacher), b = 8: one Gram launch per side, one dQ
    launch, against the float64 reference with the 2x rule (auto picks the table: 55 >= 9 pairs)."""
    from test_sp_loss import assert_close_to_ref

    s = resnet56_feats(8, dtype, device, width=0.5)
    t = resnet56_feats(8, dtype, device)
    K.LAUNCHES.clear()
    assert_close_to_ref(s, t, "triton", 1e-5 if dtype == torch.float32 else 2e-3)
    # assert_close_to_ref runs the loss once with grad: teacher + student Gram, one dQ
    assert K.LAUNCHES["gram_table"] == 2 and K.LAUNCHES["gram"] == 2
    assert K.LAUNCHES["sp_grad_features_table"] == 1 and K.LAUNCHES["sp_grad_features"] == 1


@requires_cuda
@requires_triton
@pytest.mark.gpu
def test_table_mixed_dtypes_one_launch_per_dtype(device):
    from test_sp_loss import assert_close_to_ref

    s = [x if i % 2 else x.half() for i, x in enumerate(resnet56_feats(4, torch.float32, device, width=0.5))]
    t = resnet56_feats(4, torch.float32, device)
    K.LAUNCHES.clear()
    assert_close_to_ref(s, t, "triton", 2e-3)
    assert K.LAUNCHES["gram_table"] == 1 + 2  # teacher fp32; student fp16 and fp32
    assert K.LAUNCHES["sp_grad_features_table"] == 2


@requires_cuda
@requires_triton
@pytest.mark.gpu
def test_table_deterministic_loss_bitwise(device):
    s = [x.requires_grad_() for x in resnet56_feats(6, torch.float32, device, width=0.5)]
    t = resnet56_feats(6, torch.float32, device)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            loss = lopfast.sp_loss(s, t, backend="triton")
            runs.append((loss.detach(), torch.autograd.grad(loss, s)))
    finally:
        torch.use_deterministic_algorithms(old)
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, c) for a, c in zip(runs[0][1], runs[1][1]))


@requires_cuda
@requires_triton
@pytest.mark.gpu
def test_table_not_used_under_compile_or_graph_capture(device, monkeypatch):
    """torch.compile traces the op with FakeTensors (no data_ptr): the traced op keeps the per-pair
    launches; CUDA-graph capture would bake the table's addresses: refused there too."""
    monkeypatch.setattr(K, "TABLE_MIN_PAIRS", 1)
    s = [x.requires_grad_() for x in resnet56_feats(4, torch.float32, device, width=0.5)[:12]]
    t = resnet56_feats(4, torch.float32, device)[:12]
    eager = lopfast.sp_loss(s, t, backend="triton")
    before = K.LAUNCHES["gram_table"]
    compiled = torch.compile(lambda a, c: lopfast.sp_loss(a, c, backend="triton"), fullgraph=True)
    loss = compiled(s, t)
    assert K.LAUNCHES["gram_table"] == before
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-6)
    qs = [sp_ops.row_view(x.detach()) for x in s]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            assert not K.table_supported(qs)


def test_table_kernels_are_in_the_aot_report():
    """tests/test_aot.py compiles every aot_variants() entry for sm_90 and refuses spills: the table
    kernels (which no CPU test can run) are listed for every dtype / precision, both alignments and
    both Gram reduction modes."""
    names = {v["name"] for v in K.aot_variants()}
    for dt, prec in K.TABLE_AOT_DTYPES:
        tag = dt if dt != "fp32" else f"fp32_{prec}"
        for align in (16, 1):
            assert {f"sp_gram_table_{tag}_align{align}_atomic", f"sp_gram_table_{tag}_align{align}_det",
                    f"sp_grad_features_table_{tag}_bi16_align{align}",
                    f"sp_grad_features_table_{tag}_bi128_align{align}"} <= names


def test_traced_tensors_never_take_the_table(monkeypatch):
    """torch.compile traces the ops with fake CUDA tensors (no data_ptr): they keep the per-pair
    launches even with the interpreter switched off."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        with FakeTensorMode():
            qs = [torch.empty(4, 32, device="cuda"), torch.empty(4, 16, device="cuda")]
            assert all(q.is_cuda for q in qs)
            assert not K.table_supported(qs) and not K._use_table(qs, None)
    except RuntimeError as exc:  # pragma: no cover - a torch that cannot fake CUDA tensors
        pytest.skip(f"fake CUDA tensors unavailable here: {exc}")
