"""The SP loss's device-side pair table (kernels/sp_gram.py): one Gram launch and one dQ launch per
dtype for every layer pair of a step, each pair addressed by an element offset (read from an int64
table) from pair 0's tensor.

Device-aware like tests/test_sp_loss.py: on CUDA the table kernels run compiled; on CPU they run
through the Triton interpreter (offsets from a real pointer are host addresses there), forced
with ``table=True`` / ``USE_TABLE = True`` since auto takes the table on CUDA only. bf16 and the
torch.compile / CUDA-graph fallbacks are GPU-only. The table *builder* is also checked on its own:
rows, work list, and an emulation in PyTorch that walks the work list as the kernel does (offset ->
tensor, tile, chunk, output offset) and must reproduce Q Q^T and (dG + dG^T) Q.
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
    esize = tensors[0].element_size()  # the kernel addresses pair p at pair 0's pointer + offset
    by_addr = {tensors[0].data_ptr() + esize * r[6]: q for r, q in zip(rows, tensors)}
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
                              deterministic, 4)
    tiles = K.gram_tiles(b)
    nt = -(-b // K.GRAM_BLOCK_B)
    assert len(tiles) == nt * (nt + 1) // 2 and all(ti <= tj for ti, tj in tiles)
    chunks = [-(-q.shape[1] // chunk) for q in qs]
    assert plan.n_pairs == 4 and plan.n_work == sum(chunks) * len(tiles)
    assert len(plan.ints) == 4 * K.PAIR_COLS + plan.n_work * K.GRAM_WORK_COLS
    for p, q in enumerate(qs):  # pair rows: address, feature count, sample stride, slot, offset
        row = plan.ints[p * K.PAIR_COLS:(p + 1) * K.PAIR_COLS]
        assert row[:4] == [q.data_ptr(), q.shape[1], q.stride(0), slots[p]]
        assert row[6] * 4 == q.data_ptr() - qs[0].data_ptr()
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
                               for q, d in zip(qs, dqs)], [0, 1, 2], K.GRAD_BLOCK_K, 4)
    blocks = [-(-q.shape[1] // K.GRAD_BLOCK_K) for q in qs]
    assert plan.n_work == sum(blocks)
    m = torch.randn(3, b, b, dtype=torch.float64)
    rows = [plan.ints[p * K.PAIR_COLS:(p + 1) * K.PAIR_COLS] for p in range(3)]
    by_addr = {qs[0].data_ptr() + 4 * r[6]: t for r, t in zip(rows, qs)}
    by_daddr = {dqs[0].data_ptr() + 4 * r[7]: t for r, t in zip(rows, dqs) if t.numel()}
    work = plan.ints[3 * K.PAIR_COLS:]
    seen = set()
    for w in range(plan.n_work):  # the dQ kernel: rows of M times a column block of Q
        p, c = work[w * K.GRAD_WORK_COLS:(w + 1) * K.GRAD_WORK_COLS]
        _, F, stride, slot, _, dstride, off, doff = rows[p]
        q, d = by_addr[qs[0].data_ptr() + 4 * off], by_daddr[dqs[0].data_ptr() + 4 * doff]
        assert d.stride(0) == dstride and (p, c) not in seen
        seen.add((p, c))
        ks = slice(c * K.GRAD_BLOCK_K, min((c + 1) * K.GRAD_BLOCK_K, F))
        d[:, ks] = (m[slot] @ q[:, ks].double()).to(d.dtype)
    for p in (0, 2):
        torch.testing.assert_close(dqs[p].double(), m[p] @ qs[p].double(), rtol=1e-5, atol=1e-5)


def test_offsets_must_be_whole_elements():
    with pytest.raises(ValueError, match=r"pairs\[1\]: address .* not a whole number of 4-byte"):
        K.build_gram_table([(4096, 16, 16), (4098, 16, 16)], [0, 1], 4, 64, False, 4)


def test_by_dtype_groups_in_order():
    qs = [torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 1), torch.zeros(2, 2).half()]
    assert K._by_dtype(qs) == [[0, 2], [1, 3]]
    assert K._by_dtype([torch.zeros(2, 0)] + qs, skip_empty=True) == [[1, 3], [2, 4]]


@requires_triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_table_featureless_pairs(deterministic, device, monkeypatch):
    """Pairs without features (first in the list, too) stay out of the table: zero Grams and empty
    gradients; the others are computed as usual."""
    if device.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    qs = [torch.randn(5, 0, device=device), torch.randn(5, 20, device=device), torch.randn(5, 0, device=device),
          torch.randn(5, 33, device=device)]
    g = K.gram(qs, deterministic=deterministic, table=True)
    ref = torch.stack([q.double() @ q.double().T for q in qs])
    torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-4)
    dg = torch.randn(4, 5, 5, device=device)
    dqs = [torch.empty_like(q) for q in qs]
    K.sp_grad_features(dg, qs, dqs, table=True)
    for p in (1, 3):
        torch.testing.assert_close(dqs[p].double(), (dg[p] + dg[p].T).double() @ qs[p].double(),
                                   rtol=1e-5, atol=1e-4)


def test_table_refused_where_it_cannot_run(monkeypatch):
    """Traced tensors, CUDA tensors under the interpreter and (without the interpreter) CPU tensors
    keep the per-pair launches; asking for the table there is an error naming why."""
    qs = [torch.randn(4, 8), torch.randn(4, 16)]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels: CPU tensors cannot take it
    assert not K.table_supported(qs)
    assert not K._use_table(qs, None) and not K._use_table(qs, False)
    with pytest.raises(ValueError, match="table=True needs real tensors on CUDA"):
        K.gram(qs, table=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs it on CPU tensors...
    assert K.table_supported(qs) and K._use_table(qs, True)
    assert not K._use_table(qs * 5, None)  # ...but auto takes it on CUDA only
    monkeypatch.setattr(K, "USE_TABLE", True)
    assert K._use_table(qs, None)
    monkeypatch.setattr(K, "USE_TABLE", False)
    assert not K._use_table(qs * 5, None)


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
@pytest.mark.parametrize("use_table", [None, True])
def test_distiller_launch_count(use_table, device, monkeypatch):
    """One distiller step with ten pairs: on the per-pair path (auto on the CPU interpreter) the
    teacher's and the student's Grams take ceil(10 / 8) = 2 launches each; the table (auto on
    CUDA, forced on CPU) takes 1 each. The loss is one launch (sp_finish) and the teacher
    normalisation one, whatever the path; the backward 1 (dGr) + the dQ launches (2 per-pair,
    1 table)."""
    monkeypatch.setattr(K, "USE_TABLE", use_table)
    table = device.type == "cuda" or use_table
    torch.manual_seed(0)
    teacher = Deep(4).to(device)
    student = lopfast.expand(Deep(3), rate=2.0).to(device)
    x = torch.randn(3, 3, 6, 6, device=device)
    K.LAUNCHES.clear()
    with lopfast.SPDistiller(teacher, student, backend="triton") as d:
        assert len(d.layers) == 10
        _, sp = d(x)
        grads = torch.autograd.grad(sp, [p for p in student.parameters() if p.requires_grad])
    per_side = 1 if table else 2
    assert K.LAUNCHES["gram"] == 2 * per_side
    assert K.LAUNCHES["gram_table"] == (2 if table else 0)
    assert K.LAUNCHES["row_normalize"] == 1 and K.LAUNCHES["sp_finish"] == 1
    assert K.LAUNCHES["sp_grad_gram"] == 1 and K.LAUNCHES["sp_grad_features"] == per_side
    with lopfast.SPDistiller(teacher, student, backend="torch") as d:
        _, sp_ref = d(x)
        ref = torch.autograd.grad(sp_ref, [p for p in student.parameters() if p.requires_grad])
    torch.testing.assert_close(sp, sp_ref, rtol=1e-4, atol=1e-6)
    scale = max(r.abs().max().item() for r in ref)  # fp32 both: cancellation in small entries
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- table kernels

BF16 = pytest.param(torch.bfloat16, marks=requires_cuda)  # the interpreter has no bf16


def resnet56_feats(b, dtype, device, width=1.0, unaligned=False):
    """Activations of the 55 ResNet-56 layers (on CPU at a quarter of the spatial size: the
    interpreter pays per element); ``unaligned``: each a view at an odd element offset with an odd
    sample stride (rows still dense: no copy, ALIGN = 1)."""
    shrink = 1 if device.type == "cuda" else 4
    out = []
    for c, h, w in resnet56_shapes(width):
        h, w = h // shrink, w // shrink
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


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("unaligned", [False, True])
def test_table_gram_resnet56(dtype, deterministic, unaligned, device):
    """All 55 pairs in one launch against the float64 reference (2x the same-dtype error) and the
    per-pair launches; aligned (ALIGN = 16) and odd offsets / strides (ALIGN = 1)."""
    qs = [sp_ops.row_view(x) for x in resnet56_feats(8 if device.type == "cuda" else 3, dtype, device,
                                                     unaligned=unaligned)]
    aligned = all(q.data_ptr() % 16 == 0 and q.stride(0) % 16 == 0 for q in qs)
    assert aligned != unaligned and all(q.stride(1) == 1 for q in qs)
    before = K.LAUNCHES["gram_table"]
    g = K.gram(qs, deterministic=deterministic, table=True)
    assert K.LAUNCHES["gram_table"] == before + 1  # all 55 pairs, one launch
    assert g.shape == (55, qs[0].shape[0], qs[0].shape[0]) and g.dtype == torch.float32
    _gram_budget_check(qs, g)
    if device.type == "cuda":  # (on CPU the interpreted per-pair run would double the test's time)
        per_pair = K.gram(qs, deterministic=deterministic, table=False)
        torch.testing.assert_close(g, per_pair, rtol=1e-5, atol=1e-5 * per_pair.abs().max().item())
    if deterministic:
        assert torch.equal(K.gram(qs, deterministic=True, table=True), g)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_table_loss_resnet56_fwd_bwd(dtype, device, monkeypatch):
    """55 pairs (pruned half-width student, full teacher): one Gram launch per side, one dQ launch,
    loss and gradients against the float64 reference with the 2x rule. On CUDA auto picks the table
    (55 >= 9 pairs); on CPU it is forced (auto keeps the per-pair launches there)."""
    from test_sp_loss import assert_close_to_ref

    if device.type != "cuda":
        monkeypatch.setattr(K, "USE_TABLE", True)
    b = 8 if device.type == "cuda" else 3
    s = resnet56_feats(b, dtype, device, width=0.5)
    t = resnet56_feats(b, dtype, device)
    K.LAUNCHES.clear()
    assert_close_to_ref(s, t, "triton", 1e-5 if dtype == torch.float32 else 2e-3)
    # assert_close_to_ref runs the loss once with grad: teacher + student Gram, one dQ
    assert K.LAUNCHES["gram_table"] == 2 and K.LAUNCHES["gram"] == 2
    assert K.LAUNCHES["sp_grad_features_table"] == 1 and K.LAUNCHES["sp_grad_features"] == 1


@requires_triton
def test_table_mixed_dtypes_one_launch_per_dtype(device, monkeypatch):
    from test_sp_loss import assert_close_to_ref

    monkeypatch.setattr(K, "USE_TABLE", True)
    s = [x if i % 2 else x.half() for i, x in enumerate(resnet56_feats(3, torch.float32, device, width=0.5))]
    t = resnet56_feats(3, torch.float32, device)
    K.LAUNCHES.clear()
    assert_close_to_ref(s, t, "triton", 2e-3)
    assert K.LAUNCHES["gram_table"] == 1 + 2  # teacher fp32; student fp16 and fp32
    assert K.LAUNCHES["sp_grad_features_table"] == 2


@requires_triton
def test_table_deterministic_loss_bitwise(device, monkeypatch):
    monkeypatch.setattr(K, "USE_TABLE", True)
    s = [x.requires_grad_() for x in resnet56_feats(3, torch.float32, device, width=0.5)]
    t = resnet56_feats(3, torch.float32, device)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    K.LAUNCHES.clear()
    try:
        runs = []
        for _ in range(2):
            loss = lopfast.sp_loss(s, t, backend="triton")
            runs.append((loss.detach(), torch.autograd.grad(loss, s)))
    finally:
        torch.use_deterministic_algorithms(old)
    assert K.LAUNCHES["gram_table"] == 4 and K.LAUNCHES["gram_deterministic"] == 4
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, c) for a, c in zip(runs[0][1], runs[1][1]))


@requires_cuda
@requires_triton
@pytest.mark.gpu
def test_table_under_compile_and_graph_capture(device, monkeypatch):
    """torch.compile records the SP ops as opaque calls: at run time they get real tensors and take
    the table like eager code. CUDA-graph capture keeps the per-pair launches (their addresses are
    launch arguments the graph replays); a captured loss replays right."""
    monkeypatch.setattr(K, "TABLE_MIN_PAIRS", 1)
    s = [x.requires_grad_() for x in resnet56_feats(4, torch.float32, device, width=0.5)[:12]]
    t = resnet56_feats(4, torch.float32, device)[:12]
    before = K.LAUNCHES["gram_table"]
    eager = lopfast.sp_loss(s, t, backend="triton")
    assert K.LAUNCHES["gram_table"] == before + 2  # eager: the table (teacher + student)
    compiled = torch.compile(lambda a, c: lopfast.sp_loss(a, c, backend="triton"), fullgraph=True)
    loss = compiled(s, t)
    assert K.LAUNCHES["gram_table"] == before + 4  # the compiled graph's op calls: the table too
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-6)
    qs = [x.detach() for x in s]
    assert K.table_supported(qs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with monkeypatch.context() as m:  # warm up (compile) the per-pair kernels outside the capture
            m.setattr(K, "USE_TABLE", False)
            lopfast.sp_loss([x.detach() for x in s], t, backend="triton")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            assert not K.table_supported(qs)
            before = K.LAUNCHES["gram_table"]
            static = lopfast.sp_loss([x.detach() for x in s], t, backend="triton")
            assert K.LAUNCHES["gram_table"] == before  # per-pair launches under capture
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static, eager.detach(), rtol=1e-4, atol=1e-6)


def test_table_kernels_are_in_the_aot_report():
    """tests/test_aot.py compiles every aot_variants() entry for sm_90 and refuses spills: the table
    kernels (which no CPU test can run) are listed for every dtype / precision, both alignments and
    both Gram reduction modes."""
    names = {v["name"] for v in K.aot_variants()}
    for align in (16, 1):
        for tag in ("fp32_ieee", "fp32_tf32", "fp16", "bf16"):
            assert {f"sp_gram_table_{tag}_align{align}_atomic", f"sp_gram_table_{tag}_align{align}_det"} <= names
        for tag in ("fp32_ieee", "fp32_tf32", "fp16_tf32x3", "fp16_tf32", "bf16"):  # fp16 under IEEE: 3xTF32
            assert {f"sp_grad_features_table_{tag}_bi{bi}_align{align}" for bi in (16, 128)} <= names


_KERNELS = ("_gram_kernel", "_gram_table_kernel", "_sp_grad_features_kernel", "_sp_grad_features_table_kernel",
            "_row_normalize_kernel", "_sp_finish_kernel", "_sp_grad_gram_kernel")
_PTR = {"_gram_kernel": "p0", "_gram_table_kernel": "ref_ptr", "_sp_grad_features_kernel": "p0",
        "_sp_grad_features_table_kernel": "ref_ptr"}
_NAMES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@requires_triton
def test_every_launch_is_a_listed_aot_variant(monkeypatch):
    """The launchers, over every axis they choose on (dtype and the fp32 matmul policy, mixed
    dtypes, 1 / 2-7 / 9 pairs, batch sizes giving every row tile and padded row length, aligned and
    not, atomic and deterministic, per-pair and table), launch only variants that aot_variants()
    lists: the AOT report (no spills, for both tritons) then covers everything that can run.
    Launches are recorded, not run (the kernels' own tests run them)."""
    listed = {}
    for v in K.aot_variants():
        ptr = _PTR.get(v["fn"].__name__ if hasattr(v["fn"], "__name__") else "")
        key = (v["fn"].__name__, tuple(sorted(v["constexprs"].items())), v["num_warps"], v["num_stages"],
               v["signature"].get(ptr) if ptr else None)
        listed[key] = v["name"]
    launched = []

    class Recorder:
        def __init__(self, name, real):
            self.name, self.arg_names = name, real.arg_names

        def __getitem__(self, grid):
            def launch(*args, num_warps=4, num_stages=3, **consts):
                ptr = _PTR.get(self.name)
                dtype = _NAMES[dict(zip(self.arg_names, args))[ptr].dtype] if ptr else None
                launched.append((self.name, tuple(sorted(consts.items())), num_warps, num_stages, dtype))
            return launch

    for name in _KERNELS:
        monkeypatch.setattr(K, name, Recorder(name, getattr(K, name)))
    K.clear_table_cache()
    for dtypes in ([torch.float32], [torch.float16], [torch.bfloat16], [torch.float32, torch.bfloat16, torch.bfloat16]):
        for p in (1, 3, 9):
            for b, f in ((1, 16), (20, 20), (40, 32), (100, 48), (300, 16)):  # both row tiles, aligned or not
                qs = [torch.ones(b, f, dtype=dtypes[i % len(dtypes)]) for i in range(p)]
                g = torch.zeros(p, b, b)
                for precision in ("ieee", "tf32"):
                    for table in (False, True):
                        for det in (False, True):
                            K.gram(qs, precision=precision, deterministic=det, table=table)
                        K.sp_grad_features(g, qs, [torch.empty_like(q) for q in qs], precision=precision, table=table)
    for b in (1, 17, 33, 65, 129, 257, 513, 1025, 2049, 4096):  # every padded row length up to K.MAX_BATCH
        g = torch.empty(1, b, b)
        K.row_normalize(g), K.sp_finish(g, g), K.sp_grad_gram(torch.ones(1), g, g)
    K.clear_table_cache()
    unlisted = sorted({str(k) for k in launched if k not in listed})
    assert launched and not unlisted, unlisted[:10]


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


@requires_triton
def test_aligned_gram_variants_load_16_bytes():
    """The aligned Gram variants (per-pair and table) compile for sm_90 to 16-byte async copies
    (the alignment ALIGN re-asserts reaches Triton's analysis) and Hopper MMAs; compiled in a child
    process, as tests/test_aot.py does (this one may run under the interpreter)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import lopfast.kernels.sp_gram as K
        vs = {v["name"]: v for v in K.aot_variants()}
        for name in ("sp_gram_bf16_nt1_align16_atomic", "sp_gram_table_bf16_align16_atomic"):
            v = vs[name]
            fn = v["fn"]
            attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in v["divisible_by_16"]}
            src = ASTSource(fn=fn, signature=v["signature"], constexprs=v["constexprs"], attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=v["num_warps"], num_stages=v["num_stages"]))
            ptx = k.asm["ptx"]
            assert "wgmma" in ptx, name
            assert re.search(r"cp\\.async\\.cg\\.shared\\.global.*0x10", ptx), name
            assert "ld.global.b16" not in ptx, name
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    if res.returncode != 0 and ("ASTSource" in res.stderr and "ImportError" in res.stderr):
        pytest.skip("this triton has no ASTSource/GPUTarget AOT API")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@requires_triton
@pytest.mark.parametrize("width", [48, 50])  # ALIGN 16 and 1
def test_table_negative_offsets(width, device, monkeypatch):
    """Pairs below pair 0 in memory (negative element offsets), aligned and not: two row views of
    one buffer, the second starting 128 elements before the first."""
    if device.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    buf = torch.randn(6, 256, device=device)
    qs = [buf[:, 128:128 + width], buf[:, :width - 16]]
    plan = K.build_gram_table([(q.data_ptr(), q.shape[1], q.stride(0)) for q in qs], [0, 1], 6, 64, False, 4)
    assert K._table_col(plan, 6) == [0, -128]
    ref = torch.stack([q.double() @ q.double().T for q in qs])
    for determ in (False, True):
        torch.testing.assert_close(K.gram(qs, deterministic=determ, table=True).double(), ref,
                                   rtol=1e-5, atol=1e-4)
    dg = torch.randn(2, 6, 6, device=device)
    out = torch.zeros(6, 512, device=device)
    dqs = [out[:, 256:256 + width], out[:, 64:64 + width - 16]]  # gradients at offsets too
    K.sp_grad_features(dg, qs, dqs, table=True)
    for p in range(2):
        torch.testing.assert_close(dqs[p].double(), (dg[p] + dg[p].T).double() @ qs[p].double(),
                                   rtol=1e-5, atol=1e-4)
    assert out[:, :64].abs().sum() == 0 and out[:, 256 + width:].abs().sum() == 0  # nothing else written


# ----------------------------------------------------------------------------- offsets beyond int32


@requires_triton
def test_offsets_and_strides_beyond_int32(device, monkeypatch):
    """Sample strides and pair offsets of more than 2**31 elements (ResNet-50's activations span
    several GB): both paths address them in int64. On CPU the 4.3 GB buffer is only reserved
    (untouched pages are never committed); a GPU holds it for real."""
    if device.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    n = 2**31 + 4096
    try:
        buf = torch.empty(n, dtype=torch.float16, device=device)
        out = torch.empty(n, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as exc:  # pragma: no cover - a machine that will not reserve it
        pytest.skip(f"cannot reserve 2 x 4.3 GB here: {exc}")
    stride = 2**31 + 1024
    qs = [buf.as_strided((2, 48), (stride, 1), 0),          # sample stride > 2**31 elements
          buf.as_strided((2, 32), (64, 1), 1600),
          buf.as_strided((2, 16), (32, 1), n - 64)]          # > 2**31 elements after pair 0
    for q in qs:
        q.copy_(torch.randn(q.shape, device=device).half())
    plan = K.build_gram_table([(q.data_ptr(), q.shape[1], q.stride(0)) for q in qs], [0, 1, 2], 2, 64, False, 2)
    assert K._table_col(plan, 6)[2] == n - 64 > 2**31
    ref = torch.stack([q.double() @ q.double().T for q in qs])
    dg = torch.randn(3, 2, 2, device=device)
    dqs = [out.as_strided(q.shape, q.stride(), q.storage_offset()) for q in qs]
    for table in (False, True):
        torch.testing.assert_close(K.gram(qs, table=table).double(), ref, rtol=1e-5, atol=1e-4)
        for d in dqs:
            d.zero_()
        K.sp_grad_features(dg, qs, dqs, table=table)
        for p, q in enumerate(qs):
            r = (dg[p] + dg[p].T).double() @ q.double()
            assert (dqs[p].double() - r).abs().max() <= 2**-10 * r.abs().max() + 1e-6  # fp16 storage


# ----------------------------------------------------------------------------- tables built once


def _step_feats(device, dtype=torch.float32, b=3):
    return [sp_ops.row_view(x) for x in resnet56_feats(b, dtype, device, width=0.5)[:12]]


@requires_triton
def test_tables_are_built_once_and_reused(device, monkeypatch):
    """Pair rows are cached by the address set, work lists by the shape set: a second call on the
    same tensors builds (and uploads) nothing; new tensors of the same shapes rebuild the pair rows
    only (a training loop's next step with other addresses); results stay right throughout."""
    if device.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    K.clear_table_cache()
    qs = _step_feats(device)
    dg = torch.randn(len(qs), 3, 3, device=device)
    dqs = [torch.empty_like(q) for q in qs]
    before = dict(K.LAUNCHES)

    def built(key):
        return K.LAUNCHES[key] - before.get(key, 0)

    g1 = K.gram(qs, table=True)
    K.sp_grad_features(dg, qs, dqs, table=True)
    assert built("table_build") == 2 and built("table_work_build") == 2  # Gram + dQ
    g2 = K.gram(qs, table=True)
    K.sp_grad_features(dg, qs, dqs, table=True)
    assert built("table_build") == 2 and built("table_work_build") == 2  # nothing rebuilt
    assert torch.equal(g1, g2) or torch.allclose(g1, g2, rtol=1e-6, atol=1e-6)
    others = [q.clone() + 1 for q in qs]  # same shapes, other addresses, other values
    g3 = K.gram(others, table=True)
    assert built("table_build") == 3 and built("table_work_build") == 2  # rows rebuilt, work list shared
    torch.testing.assert_close(g3.double(), torch.stack([q.double() @ q.double().T for q in others]),
                               rtol=1e-5, atol=1e-4)
    for p, (q, d) in enumerate(zip(qs, dqs)):
        torch.testing.assert_close(d.double(), (dg[p] + dg[p].T).double() @ q.double(), rtol=1e-5, atol=1e-4)


@requires_triton
def test_cached_tables_are_never_rewritten(device, monkeypatch):
    """A cached table is written once, when built: later calls with other addresses (which on
    a GPU would reuse a staging buffer while an earlier copy may still be in flight) leave every
    earlier table bit for bit as it was."""
    if device.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    K.clear_table_cache()
    qs = _step_feats(device)
    K.gram(qs, table=True)
    snap = {k: (t.pairs.dev.clone(), t.work.dev.clone()) for k, t in K._PAIRS.d.items()}
    copies = [[q.clone() for q in qs] for _ in range(3)]  # kept alive: three new address sets
    for c in copies:
        K.gram(c, table=True)
    for k, (pairs, work) in snap.items():
        t = K._PAIRS.d[k]
        assert torch.equal(t.pairs.dev, pairs) and torch.equal(t.work.dev, work)
    assert len(K._PAIRS.d) == 4


def test_table_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(K, "TABLE_CACHE_SIZE", 3)
    lru = K._LRU()
    for i in range(5):
        lru.put(i, str(i))
    assert list(lru.d) == [2, 3, 4] and lru.get(2) == "2" and list(lru.d) == [3, 4, 2]


@requires_triton
def test_table_mixed_dtypes_and_layouts_real_step(device, monkeypatch):
    """A real step's features in two dtypes at once (pairs alternate fp16 and fp32: one launch per
    dtype, element offsets in each dtype's size) and mixed NCHW / channels_last, gradients in the
    inputs' layouts, against the float64 formula."""
    from lopfast import selfcheck as _sc  # noqa: F401
    import sys

    SC = sys.modules["lopfast.selfcheck"]
    if device.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K, "USE_TABLE", True)
    s, t, b = SC.distill_features("resnet20", "cpu")
    s = [(x if i % 2 else x.half()).to(device) for i, x in enumerate(s)]
    t = [x.to(device) for x in t]
    K.LAUNCHES.clear()
    from test_sp_loss import assert_close_to_ref

    assert_close_to_ref(s, t, "triton", 2e-3)
    assert K.LAUNCHES["gram_table"] == 1 + 2 and K.LAUNCHES["sp_grad_features_table"] == 2
    leaves = [x.clone().requires_grad_() for x in s]
    grads = torch.autograd.grad(lopfast.sp_loss(leaves, t, backend="triton"), leaves)
    assert all(g.stride() == x.stride() for g, x in zip(grads, s))  # each gradient in its input's layout
