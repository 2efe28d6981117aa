"""SP distillation loss, forward + backward over all layer pairs of a network.

Variants (one step = teacher Grams + student loss + backward to the student features):
    fused      lopfast.sp_loss(backend="triton"): the kernels of kernels/sp_gram.py (CUDA only;
               the CPU interpreter is far too slow to time); 55 pairs take the device-side pair
               table (one Gram launch per side, one dQ launch)
    fused-pairs  the same kernels with the table off (``USE_TABLE = False``): one launch per 8
               pairs (7 Gram launches per side and 7 dQ launches for ResNet-56)
    reference  lopfast.sp_loss(backend="torch"): the package's PyTorch path (fp32 accumulation)
    eager      the loop a user writes: per pair one matmul, F.normalize, squared error
               (same as ``torch_same_dtype`` in tests/test_sp_loss.py)
    compile    torch.compile of that loop (default on CUDA; on CPU only with
               LOPFAST_BENCH_COMPILE=1: inductor needs minutes of compilation on a small CPU)

Networks (the issue's): ResNet-56 / CIFAR at batch 256 (1 stem + 54 block convs = 55 pairs:
16x32x32, 32x16x16, 64x8x8) and ResNet-50 / ImageNet at batch 64 (53 convs, stem 64x112x112 ...
2048x7x7). The student is the pruned net: half the channels of the teacher at every pair.
``LOPFAST_BENCH_SIZE=small`` (default without CUDA) uses batch 32 for ResNet-56 and batch 8 with
half the spatial size for ResNet-50.

    pytest bench/bench_sp_loss.py --benchmark-only

``benchmark.extra_info`` records bytes read (each activation once; + gradient written) and FLOPs
(2 b^2 F per Gram, 2 b^2 F for dQ of the student) and the achieved GB/s and GFLOP/s. A ratio
table (median / median eager, and median / one read) is printed and written to
<results>/sp_loss-<cpu|gpu>.json (``$LOPFAST_BENCH_OUT`` or bench/results).

Issue 17's row, "SP loss, 55 pairs b256 bf16 / one read of the features" (target <= 1.5): the
``ratio_to_one_read`` of the resnet56-cifar bf16 rows, where one read = every teacher activation
read once, every student activation read once and its gradient written once (the bytes any
implementation must move), at the device-copy bandwidth measured in the same run
(``conftest.peaks``). ``auto`` is what training runs (the measured dispatch).

Host work (``test_sp_loss_host_work``): per call (teacher Grams + student loss + backward, the
distiller's three entries) the host microseconds and the launches, for the fused path with the
table, without it (per-pair launches) and the reference, after warm-up (tables built and cached):
on CUDA the wall time of issuing the call (no synchronisation inside) and every kernel, memset and
memcpy the CUDA profiler sees; on CPU, where the interpreter would execute the kernels during the
launch, the kernel launches are replaced by no-ops (the rest runs: lopfast's Python, the table
cache, torch's own small ops) and the launches are counted (Triton kernels + torch compute ops):
a proxy of the GPU's host work.
"""
import json
import os
import platform
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import lopfast
from conftest import BENCH_SIZE, TINY, peaks, results_dir, sync, timing

CUDA = torch.cuda.is_available()
COMPILE = os.environ.get("LOPFAST_BENCH_COMPILE", "1" if CUDA else "0") == "1"
ROUNDS = int(os.environ.get("LOPFAST_BENCH_ROUNDS", "5"))
SMALL = BENCH_SIZE != "full"


def resnet56_shapes():
    shapes = [(16, 32, 32)] * 19 + [(32, 16, 16)] * 18 + [(64, 8, 8)] * 18
    return shapes, (4 if TINY else 32 if SMALL else 256)


def resnet50_shapes():
    s = 8 if TINY else 2 if SMALL else 1
    shapes = [(64, 112 // s, 112 // s)]
    size = 56 // s
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            in_size = size
            if i == 0 and stride == 2:
                size = size // 2
            shapes += [(width, in_size, in_size), (width, size, size), (4 * width, size, size)]
            if i == 0:
                shapes.append((4 * width, size, size))  # downsample projection
    return shapes, (2 if TINY else 8 if SMALL else 64)


NETS = {"resnet56-cifar": resnet56_shapes, "resnet50-imagenet": resnet50_shapes}
VARIANTS = (["auto", "fused", "fused-pairs"] if CUDA else []) + ["reference", "eager"] + (["compile"] if COMPILE else [])
DTYPES = {"fp32": torch.float32} if not CUDA else {"fp32": torch.float32, "bf16": torch.bfloat16}

_results = {}
_host = {}


def eager_sp_loss(student, teacher):
    total = 0.0
    for a_s, a_t in zip(student, teacher):
        b = a_s.shape[0]
        q_s, q_t = a_s.reshape(b, -1), a_t.detach().reshape(b, -1)
        g_s = F.normalize(q_s @ q_s.T, dim=1)
        g_t = F.normalize(q_t @ q_t.T, dim=1)
        total = total + ((g_t - g_s) ** 2).sum() / b ** 2
    return total


def make(net, dtype, device):
    shapes, b = NETS[net]()
    torch.manual_seed(0)
    teacher = [torch.randn(b, c, h, w, device=device, dtype=dtype).relu_() for c, h, w in shapes]
    student = [torch.randn(b, max(c // 2, 1), h, w, device=device, dtype=dtype).relu_().requires_grad_()
               for c, h, w in shapes]
    elt = torch.tensor([], dtype=dtype).element_size()
    f_t = sum(t[0].numel() for t in teacher)
    f_s = sum(s[0].numel() for s in student)
    bytes_moved = b * elt * (f_t + 3 * f_s)       # read teacher, student (fwd + bwd), write grad
    one_read = b * elt * (f_t + 2 * f_s)          # the least: teacher and student read once, grad written
    flops = 2 * b * b * (f_t + 2 * f_s)           # Grams of both sides + (dG + dG^T) Q
    return student, teacher, dict(batch=b, pairs=len(shapes), bytes=bytes_moved, one_read_bytes=one_read,
                                  flops=flops)


@pytest.fixture(scope="module", autouse=True)
def ratio_table():
    # one CPU thread: on a shared 2-core box two OpenMP threads make medians swing several-fold
    old = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
    if not _results and not _host:
        return
    rows = []
    copy_gbps = peaks("cuda" if CUDA else "cpu")["copy_gbps"] if _results else None
    for (net, dt), by in sorted(_results.items()):
        base = by.get("eager")
        for variant, (median, info) in by.items():
            one_read_s = info["one_read_bytes"] / (copy_gbps * 1e9)
            rows.append(dict(net=net, dtype=dt, variant=variant, median_s=median,
                             ratio_to_eager=(median / base[0]) if base else None,
                             ratio_to_one_read=median / one_read_s, one_read_s=one_read_s,
                             GBps=info["bytes"] / median / 1e9, GFLOPs=info["flops"] / median / 1e9,
                             batch=info["batch"], pairs=info["pairs"]))
    if rows:
        print("\n\nnet                 dtype variant     batch pairs  median (ms)  x eager  x 1 read   GB/s  GFLOP/s")
    for r in rows:
        ratio = f"{r['ratio_to_eager']:.2f}" if r["ratio_to_eager"] else "-"
        print(f"{r['net']:<19} {r['dtype']:<5} {r['variant']:<11} {r['batch']:>5} {r['pairs']:>5} "
              f"{1e3 * r['median_s']:>11.2f}  {ratio:>7} {r['ratio_to_one_read']:>8.1f} {r['GBps']:>6.1f} "
              f"{r['GFLOPs']:>8.1f}")
    issue17 = {r["variant"]: r["ratio_to_one_read"] for r in rows
               if r["net"] == "resnet56-cifar" and r["dtype"] == ("bf16" if CUDA else "fp32")}
    if issue17:
        print("issue 17 row, SP loss 55 pairs / one read of the features (target <= 1.5): "
              + ", ".join(f"{k} {v:.1f}x" for k, v in issue17.items()))
    host = [dict(variant=k, **v) for k, v in sorted(_host.items())]
    if host:
        print("\nhost work per call (teacher Grams + loss + backward, 55 pairs, after warm-up)")
        for h in host:
            print(f"  {h['variant']:<12} {h['host_us']:>9.0f} us host  {h['launches']:>4} launches  "
                  f"{h['table_builds_per_call']:.2f} table builds  {h['grad_offset_uploads_per_call']:.2f} "
                  f"gradient-offset uploads  ({h['how']})")
    out = results_dir()
    machine = dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                   torch=torch.__version__, size=BENCH_SIZE, compile=COMPILE, rounds=ROUNDS,
                   threads=None if CUDA else 1, copy_gbps=copy_gbps,
                   gpu=torch.cuda.get_device_name() if CUDA else None)
    (out / f"sp_loss-{'gpu' if CUDA else 'cpu'}.json").write_text(json.dumps(
        dict(command=f"LOPFAST_BENCH_COMPILE={int(COMPILE)} LOPFAST_BENCH_ROUNDS={ROUNDS} "
                     "pytest bench/bench_sp_loss.py --benchmark-only", machine=machine, results=rows,
             issue17_sp_over_one_read=issue17, host_work=host), indent=2))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("net", list(NETS))
def test_sp_loss_fwd_bwd(benchmark, net, dtype, variant, device, monkeypatch):
    student, teacher, info = make(net, DTYPES[dtype], device)
    if variant == "fused-pairs":  # the per-pair launches, for the table's gain side by side
        from lopfast.kernels import sp_gram

        monkeypatch.setattr(sp_gram, "USE_TABLE", False)
    if variant == "auto":  # what training runs: the measured dispatch (tuned in the warm-up)
        fn = lambda s, t: lopfast.sp_loss_from_gram(s, lopfast.sp_gram(t))  # noqa: E731
    elif variant in ("fused", "fused-pairs"):
        fn = lambda s, t: lopfast.sp_loss(s, t, backend="triton")  # noqa: E731
    elif variant == "reference":
        fn = lambda s, t: lopfast.sp_loss(s, t, backend="torch")  # noqa: E731
    elif variant == "eager":
        fn = eager_sp_loss
    else:
        fn = torch.compile(eager_sp_loss)

    def step():
        loss = fn(student, teacher)
        torch.autograd.grad(loss, student)
        sync(device)

    step()  # warm-up (compilation, autotune)
    benchmark.group = f"{net}-{dtype}"
    benchmark.extra_info.update(net=net, dtype=dtype, variant=variant, **info)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    st = timing(benchmark)
    if st is None:
        return
    median = st.median
    benchmark.extra_info.update(GBps=info["bytes"] / median / 1e9, GFLOPs=info["flops"] / median / 1e9)
    _results.setdefault((net, dtype), {})[variant] = (median, info)


# ----------------------------------------------------------------------------- host work per call
_REAL_LAUNCHES = ("gram", "row_normalize", "sp_finish", "sp_grad_gram", "sp_grad_features")


class _NoLaunch:
    """A kernel whose launches do nothing (CPU host-work proxy: the interpreter would run it)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


_QUIET = ("empty", "view", "as_strided", "detach", "alias", "permute", "transpose", "t", "expand", "reshape",
          "_unsafe_view", "select", "slice", "unsqueeze", "squeeze", "lift_fresh", "result_type", "is_nonzero")


def _torch_compute_ops(fn) -> int:
    """The top-level aten ops of ``fn()`` that would launch a kernel on a GPU (the CPU profiler's
    outermost aten events, without views, metadata and allocations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    n = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        if parent is not None and parent.name.startswith("aten::"):
            continue  # nested inside another aten op
        name = e.name[len("aten::"):]
        if not any(name == q or name.startswith(q + "_") for q in _QUIET):
            n += 1
    return n


@pytest.mark.parametrize("variant", (["auto"] if CUDA else []) + ["fused", "fused-pairs", "reference"])
def test_sp_loss_host_work(variant, device, monkeypatch):
    """Host microseconds and launches of one distiller step's SP work (55 pairs), after warm-up."""
    from lopfast.kernels import sp_gram as K

    student, teacher, info = make("resnet56-cifar", DTYPES["bf16" if CUDA else "fp32"], device)
    if variant == "fused-pairs":
        monkeypatch.setattr(K, "USE_TABLE", False)
    elif variant == "fused" and not CUDA:
        monkeypatch.setattr(K, "USE_TABLE", True)
    backend = {"auto": "auto", "fused": "triton", "fused-pairs": "triton", "reference": "torch"}[variant]
    if not CUDA and variant != "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may take the Triton path (launches stubbed)
        for name in ("_gram_kernel", "_gram_table_kernel", "_row_normalize_kernel", "_sp_finish_kernel",
                     "_sp_grad_gram_kernel", "_sp_grad_features_kernel", "_sp_grad_features_table_kernel"):
            monkeypatch.setattr(K, name, _NoLaunch())

    def step():
        gt = lopfast.sp_gram(teacher, backend=backend)
        loss = lopfast.sp_loss_from_gram(student, gt, backend=backend)
        torch.autograd.grad(loss, student)

    for _ in range(3):  # warm-up: compilation, dispatch tuning, tables built and cached
        step()
    sync(device)
    times = []
    for _ in range(5 if TINY else 20):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        sync(device)  # outside the timed part: only the host's issuing is measured
    builds, uploads = K.LAUNCHES["table_build"], K.LAUNCHES["table_doffs_upload"]
    reps = len(times)
    for _ in range(reps):  # tables rebuilt in steady state (new addresses every step would show here)
        step()
    builds = (K.LAUNCHES["table_build"] - builds) / reps
    uploads = (K.LAUNCHES["table_doffs_upload"] - uploads) / reps
    sync(device)
    if CUDA:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
        launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        how = "CUDA profiler: kernels, memsets, memcpys"
    else:
        before = sum(K.LAUNCHES[k] for k in _REAL_LAUNCHES)
        torch_ops = _torch_compute_ops(step)
        launches = sum(K.LAUNCHES[k] for k in _REAL_LAUNCHES) - before + torch_ops
        how = "CPU proxy: Triton launches stubbed and counted, + torch compute ops"
    _host[variant] = dict(host_us=1e6 * statistics.median(times), launches=launches, table_builds_per_call=builds,
                          grad_offset_uploads_per_call=uploads, how=how, pairs=info["pairs"], batch=info["batch"])
