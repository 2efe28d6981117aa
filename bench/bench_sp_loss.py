"""SP distillation loss, forward + backward over all layer pairs of a network.

Variants (one step = teacher Grams + student loss + backward to the student features):
    fused      lopfast.sp_loss(backend="triton"): the kernels of kernels/sp_gram.py (CUDA only;
               the CPU interpreter is far too slow to time)
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
table (median / median eager) is printed and written to bench/results/sp_loss-<cpu|gpu>.json.
"""
import json
import os
import platform

import pytest
import torch
import torch.nn.functional as F

import lopfast
from conftest import BENCH_SIZE, TINY, results_dir, sync, timing

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
VARIANTS = (["fused"] if CUDA else []) + ["reference", "eager"] + (["compile"] if COMPILE else [])
DTYPES = {"fp32": torch.float32} if not CUDA else {"fp32": torch.float32, "bf16": torch.bfloat16}

_results = {}


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
    flops = 2 * b * b * (f_t + 2 * f_s)           # Grams of both sides + (dG + dG^T) Q
    return student, teacher, dict(batch=b, pairs=len(shapes), bytes=bytes_moved, flops=flops)


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
    if not _results:
        return
    rows = []
    for (net, dt), by in sorted(_results.items()):
        base = by.get("eager")
        for variant, (median, info) in by.items():
            rows.append(dict(net=net, dtype=dt, variant=variant, median_s=median,
                             ratio_to_eager=(median / base[0]) if base else None,
                             GBps=info["bytes"] / median / 1e9, GFLOPs=info["flops"] / median / 1e9,
                             batch=info["batch"], pairs=info["pairs"]))
    print("\n\nnet                 dtype variant    batch pairs  median (ms)  x eager   GB/s  GFLOP/s")
    for r in rows:
        ratio = f"{r['ratio_to_eager']:.2f}" if r["ratio_to_eager"] else "-"
        print(f"{r['net']:<19} {r['dtype']:<5} {r['variant']:<10} {r['batch']:>5} {r['pairs']:>5} "
              f"{1e3 * r['median_s']:>11.2f}  {ratio:>7} {r['GBps']:>6.1f} {r['GFLOPs']:>8.1f}")
    out = results_dir()
    machine = dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                   torch=torch.__version__, size=BENCH_SIZE, compile=COMPILE, rounds=ROUNDS,
                   threads=None if CUDA else 1,
                   gpu=torch.cuda.get_device_name() if CUDA else None)
    (out / f"sp_loss-{'gpu' if CUDA else 'cpu'}.json").write_text(json.dumps(
        dict(command=f"LOPFAST_BENCH_COMPILE={int(COMPILE)} LOPFAST_BENCH_ROUNDS={ROUNDS} "
                     "pytest bench/bench_sp_loss.py --benchmark-only", machine=machine, results=rows), indent=2))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("net", list(NETS))
def test_sp_loss_fwd_bwd(benchmark, net, dtype, variant, device):
    student, teacher, info = make(net, DTYPES[dtype], device)
    if variant == "fused":
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
