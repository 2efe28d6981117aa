"""The benchmark table of issue 10, side by side in one run, against ceilings measured in the same run.

Measures (GPU sizes with ``LOPFAST_BENCH_SIZE=full``, the default on CUDA):

collapse/<net>       forward + backward of the collapse of every expanded conv of the net, r = 3,
                     fp32 factors (weight-space work only: W_eff of every layer, then the factor
                     gradients from a given dW_eff):
                       ours      ``collapse_many`` with backend "auto" (the measured dispatch)
                       eager     the per-layer einsum reference, one layer after another
                       matmul    per layer, the taps folded into plain torch.matmul products (the "matmul"
                                 backend one layer at a time: plain autograd, no class stacking)
                       compile   torch.compile of the eager loop
                       triton    ``collapse_many`` forced onto the grouped Triton GEMM (every class)
                       folded    ``collapse_many`` forced onto "matmul" (one bmm per class and product)
                       graph     ours replayed as CUDA graphs (``lopfast.fastpath.GraphedCollapse``; CUDA)
                     (ours routes each shape class by measurement: the info names the routes)
                     nets: ResNet-56 (CIFAR) and ResNet-50 (ImageNet). Roofline: max(FLOPs / peak
                     FLOP/s, bytes / peak GB/s) with the peaks of this run, for IEEE fp32 (the
                     default precision policy), TF32 and bf16 products.
sp_loss/resnet56     SP loss forward + backward over the 55 ResNet-56 layer pairs, b = 256, bf16:
                     ours (``lopfast.sp_loss``, "auto"), eager (the loop a user writes), compile
                     (torch.compile of it); bound: one read of every activation and one write of
                     the student gradient at the measured copy bandwidth.
train_step/<net>     one training step (bf16 autocast, SGD momentum) of the student with the teacher
                     forward: compact (plain student + teacher forward, no SP), ours (expanded r = 3,
                     collapsed mode, ``CollapsedForward`` on CUDA, ``SPDistiller`` "auto"), paper
                     (expanded in chain mode: three convs, eager SP: ``SPDistiller`` "torch"); peak
                     memory of each. Nets: ResNet-56 and MobileNetV2 (CIFAR, b = 256), ResNet-50
                     (ImageNet shapes, b = 128). The student has the teacher's architecture (this
                     suite runs without torch-pruning): the ratio measures the expansion's cost.

    pytest bench/bench_table.py --benchmark-only

Results (ratios to the issue's targets, achieved TFLOP/s and GB/s, the peaks) are rewritten after
every measurement to ``<results>/table-<gpu|cpu>.json`` (``$LOPFAST_BENCH_OUT`` or bench/results),
so a run stopped by a time limit keeps what it measured. ``small`` (CPU default) and ``tiny``
(CI smoke) shrink every net and batch; their numbers say only that the code runs.
"""
import copy
import json
import math
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lopfast
from conftest import BENCH_SIZE, TINY, machine_info, peaks, results_dir, sync, timing

CUDA = torch.cuda.is_available()
FULL = BENCH_SIZE == "full"
COMPILE = os.environ.get("LOPFAST_BENCH_COMPILE", "1" if CUDA else "0") == "1"
ROUNDS = int(os.environ.get("LOPFAST_BENCH_ROUNDS", "5" if CUDA else "3"))
RATE = 3

TARGETS = {
    "collapse/resnet56": "ours <= 2x roofline; eager >= 10x ours",
    "collapse/resnet50": "ours <= 1.3x roofline of the chosen precision; never slower than per-layer matmul",
    "sp_loss/resnet56": "ours <= 1.5x one read; eager >= 5x ours; compile >= 2x ours",
    "train_step/resnet56": "ours/compact <= 1.15; memory <= 1.1; paper/ours >= 4",
    "train_step/mobilenet_v2": "ours/compact <= 1.15; memory <= 1.1; paper/ours >= 4",
    "train_step/resnet50": "ours/compact <= 1.2; memory <= 1.1; paper/ours >= 4",
}

_table: dict = {}


# ----------------------------------------------------------------------------- nets
def bottleneck_resnet(width: int = 64, layers=(3, 4, 6, 3), num_classes: int = 1000) -> nn.Module:
    """ResNet-50's structure (torchvision's Bottleneck blocks) at base width ``width``: 64 is
    ResNet-50 itself; smaller widths are the CPU stand-ins."""
    from torchvision.models.resnet import Bottleneck

    mods = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1)]
    inplanes = width
    for i, n in enumerate(layers):
        planes = width * 2 ** i
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            down = None
            if stride != 1 or inplanes != planes * 4:
                down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            mods.append(Bottleneck(inplanes, planes, stride, down))
            inplanes = planes * 4
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    return nn.Sequential(*mods)


def build_net(name: str) -> tuple:
    """(model, input C,H,W, batch) at this run's size."""
    from lopfast.pipeline.models import build_model

    if name == "resnet56":
        width = 16 if FULL else (4 if TINY else 8)
        return build_model("resnet56", width=width), (3, 32, 32), 256 if FULL else (4 if TINY else 16)
    if name == "mobilenet_v2":
        # no width option in the zoo's MobileNetV2: the CPU sizes shrink batch and image
        chw = (3, 8, 8) if TINY else (3, 32, 32)
        return build_model("mobilenet_v2"), chw, 256 if FULL else (2 if TINY else 8)
    if name == "resnet50":
        if FULL:
            from torchvision.models import resnet50

            return resnet50(), (3, 224, 224), 128
        chw = (3, 32, 32) if TINY else (3, 64, 64)
        return bottleneck_resnet(4 if TINY else 8, num_classes=10), chw, 2 if TINY else 8
    raise ValueError(name)


def conv_specs(model: nn.Module):
    """(in, out, kernel, groups) of every nn.Conv2d."""
    return [(m.in_channels, m.out_channels, m.kernel_size[0], m.groups) for m in model.modules()
            if isinstance(m, nn.Conv2d)]


# ----------------------------------------------------------------------------- report
def _write() -> None:
    out = results_dir() / f"table-{'gpu' if CUDA else 'cpu'}.json"
    doc = dict(command="pytest bench/bench_table.py --benchmark-only", size=BENCH_SIZE, machine=machine_info(),
               peaks=dict(peaks("cuda" if CUDA else "cpu")), targets=TARGETS, measures=_table)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out)


def _print_table() -> None:
    if not _table:
        return
    print(f"\n\nissue-10 table (size={BENCH_SIZE}); peaks: "
          + ", ".join(f"{k}={v:.1f}" for k, v in peaks("cuda" if CUDA else "cpu").items() if isinstance(v, float)))
    for measure, m in _table.items():
        ratios = ", ".join(f"{k}={v:.2f}" for k, v in m.get("ratios", {}).items() if v is not None)
        print(f"{measure:<26} {ratios}")
        for variant, r in m["variants"].items():
            extra = "".join(f" {k}={v:.1f}" for k, v in r.items() if k in ("TFLOPs", "GBps", "peak_mem_GB") and v)
            ms = f"{1e3 * r['s']:.3f} ms" if r.get("s") else r.get("status", "-")
            print(f"    {variant:<10} {ms:>14}{extra}")


@pytest.fixture(scope="module", autouse=True)
def _report():
    old = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)  # see bench_collapse.py: one thread is stable on a shared box
    try:
        yield
    finally:
        torch.set_num_threads(old)
        _print_table()


def _ratio(a, b):
    return None if not a or not b else a / b


def _record(measure: str, variant: str, seconds, **info) -> None:
    m = _table.setdefault(measure, dict(variants={}, ratios={}, info={}))
    row = dict(s=seconds, **info)
    if seconds and info.get("flops"):
        row["TFLOPs"] = info["flops"] / seconds / 1e12
    if seconds and info.get("bytes"):
        row["GBps"] = info["bytes"] / seconds / 1e9
    m["variants"][variant] = row
    v = {k: r.get("s") for k, r in m["variants"].items()}
    kind = measure.split("/")[0]
    if kind == "collapse":
        m["ratios"] = dict(ours_over_roofline=_ratio(v.get("ours"), m["info"].get("roofline_s")),
                           ours_over_roofline_tf32=_ratio(v.get("ours"), m["info"].get("roofline_tf32_s")),
                           eager_over_ours=_ratio(v.get("eager"), v.get("ours")),
                           matmul_over_ours=_ratio(v.get("matmul"), v.get("ours")),
                           compile_over_ours=_ratio(v.get("compile"), v.get("ours")),
                           triton_over_ours=_ratio(v.get("triton"), v.get("ours")),
                           folded_over_ours=_ratio(v.get("folded"), v.get("ours")),
                           graph_over_roofline=_ratio(v.get("graph"), m["info"].get("roofline_s")),
                           eager_over_graph=_ratio(v.get("eager"), v.get("graph")))
    elif kind == "sp_loss":
        m["ratios"] = dict(ours_over_one_read=_ratio(v.get("ours"), m["info"].get("one_read_s")),
                           eager_over_ours=_ratio(v.get("eager"), v.get("ours")),
                           compile_over_ours=_ratio(v.get("compile"), v.get("ours")))
    else:
        mem = {k: r.get("peak_mem_GB") for k, r in m["variants"].items()}
        m["ratios"] = dict(ours_over_compact=_ratio(v.get("ours"), v.get("compact")),
                           memory_ours_over_compact=_ratio(mem.get("ours"), mem.get("compact")),
                           paper_over_ours=_ratio(v.get("paper"), v.get("ours")))
    _write()


def _measure(benchmark, step, group: str, **extra) -> float:
    """Median seconds of ``step`` through pytest-benchmark (one timed call under
    --benchmark-disable, where pytest-benchmark keeps no statistics)."""
    benchmark.group = group
    benchmark.extra_info.update(extra)
    t0 = time.perf_counter()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    st = timing(benchmark)
    return st.median if st is not None else time.perf_counter() - t0


@pytest.fixture
def ceilings(device):
    return peaks(device)  # measured once per session


# ----------------------------------------------------------------------------- collapse
def _collapse_flops_bytes(layers, elt):
    from lopfast.ops.collapse_gemm import shape_class

    flops = nbytes = 0
    for w1, w2, w3, g in layers:
        m_g, T = w1.shape[1], w2.shape[2] * w2.shape[3]
        # 2 products forward, 4 backward, in the association order the backends choose
        flops += shape_class(w1, w2, w3, g).flops
        factors = w1.numel() + w2.numel() + w3.numel()
        weff = w3.shape[0] * m_g * T
        nbytes += elt * (2 * factors + 2 * weff)  # factors read, their grads written; W_eff written, dW_eff read
    return flops, nbytes


COLLAPSE_VARIANTS = (["ours", "eager", "matmul", "triton", "folded"] + (["compile"] if COMPILE else [])
                     + (["graph"] if CUDA else []))


@pytest.mark.parametrize("variant", COLLAPSE_VARIANTS)
@pytest.mark.parametrize("net", ["resnet56", "resnet50"])
def test_collapse_all_layers(benchmark, net, variant, device, ceilings):
    from lopfast.ops import collapse as op_collapse
    from lopfast.ops.collapse import collapse_many, reference_collapse
    from lopfast.ops.collapse_gemm import matmul_many

    model, _, _ = build_net(net)
    torch.manual_seed(0)
    mods = [lopfast.ExpandedConv2d(cin, cout, k, groups=g, rate=RATE, bias=False, device=device)
            for cin, cout, k, g in conv_specs(model)]
    layers = [(m.weight1, m.weight2, m.weight3, m.groups) for m in mods]
    dws = [torch.randn(m.out_channels, m.in_channels // m.groups, *m.kernel_size, device=device) for m in mods]
    params = [w for layer in layers for w in layer[:3]]

    def eager(ls):
        return [reference_collapse(*layer) for layer in ls]

    if variant == "triton" and "triton" not in op_collapse.available_backends(torch.device(device), torch.float32):
        pytest.skip("no Triton backend for these tensors")
    graphed = None
    if variant == "graph":
        from lopfast.fastpath import GraphedCollapse

        graphed = GraphedCollapse(layers)
    fn = {"ours": collapse_many, "eager": eager, "matmul": lambda ls: [matmul_many([layer], recompute=False)[0] for layer in ls],
          "compile": torch.compile(eager) if variant == "compile" else None,
          "triton": lambda ls: collapse_many(ls, backend="triton"),
          "folded": lambda ls: collapse_many(ls, backend="matmul"),
          "graph": lambda ls: graphed()}[variant]

    def step():
        for w in params:
            w.grad = None
        torch.autograd.backward(fn(layers), dws)
        sync(device)

    step()  # warm-up: dispatch tuning, Triton / inductor compilation
    flops, nbytes = _collapse_flops_bytes(layers, 4)
    pk = ceilings
    m = _table.setdefault(f"collapse/{net}", dict(variants={}, ratios={}, info={}))
    bw = pk["copy_gbps"] * 1e9
    m["info"] = dict(layers=len(layers), factor_numel=sum(p.numel() for p in params), rate=RATE, dtype="fp32",
                     flops=flops, bytes=nbytes,
                     roofline_s=max(flops / (pk["matmul_fp32_tflops"] * 1e12), nbytes / bw),
                     roofline_tf32_s=max(flops / (pk.get("matmul_tf32_tflops", pk["matmul_fp32_tflops"]) * 1e12),
                                         nbytes / bw),
                     roofline_bf16_s=max(flops / (pk.get("matmul_bf16_tflops", pk["matmul_fp32_tflops"]) * 1e12),
                                         nbytes / 2 / bw),
                     dispatch=[d for d in lopfast.dispatch.decisions() if d["op"] == "collapse"],
                     routes={k: len(v) for k, v in op_collapse.route(layers).items()})
    t = _measure(benchmark, step, f"collapse-{net}", net=net, variant=variant, layers=len(layers))
    _record(f"collapse/{net}", variant, t, flops=flops, bytes=nbytes)


# ----------------------------------------------------------------------------- SP loss
SP_VARIANTS = ["ours", "eager"] + (["compile"] if COMPILE else [])


@pytest.mark.parametrize("variant", SP_VARIANTS)
def test_sp_loss_resnet56_pairs(benchmark, variant, device, ceilings):
    from bench_sp_loss import eager_sp_loss, make  # the SP benchmark's inputs and eager loop

    dtype = torch.bfloat16 if CUDA else torch.float32
    student, teacher, info = make("resnet56-cifar", dtype, device)
    if TINY:
        student, teacher = student[:6], teacher[:6]
        info = dict(info, pairs=6)
    fn = {"ours": lopfast.sp_loss, "eager": eager_sp_loss,
          "compile": torch.compile(eager_sp_loss) if variant == "compile" else None}[variant]

    def step():
        loss = fn(student, teacher)
        torch.autograd.grad(loss, student)
        sync(device)

    step()
    elt = student[0].element_size()
    b = student[0].shape[0]
    one_read = b * elt * (sum(t[0].numel() for t in teacher) + 2 * sum(s[0].numel() for s in student))
    m = _table.setdefault("sp_loss/resnet56", dict(variants={}, ratios={}, info={}))
    m["info"] = dict(batch=b, pairs=len(student), dtype=str(dtype).replace("torch.", ""), one_read_bytes=one_read,
                     one_read_s=one_read / (ceilings["copy_gbps"] * 1e9), flops=info["flops"],
                     dispatch=[d for d in lopfast.dispatch.decisions() if d["op"].startswith("sp_loss")])
    t = _measure(benchmark, step, "sp_loss-resnet56", variant=variant)
    _record("sp_loss/resnet56", variant, t, flops=info["flops"], bytes=one_read)


# ----------------------------------------------------------------------------- training step
STEP_NETS = ["resnet56", "mobilenet_v2", "resnet50"]
STEP_VARIANTS = ["compact", "ours", "paper"]


def _train_step(variant, net, device):
    model, chw, batch = build_net(net)
    torch.manual_seed(0)
    teacher = model.to(device).eval()
    student = copy.deepcopy(teacher).train()
    distiller = fast = None
    if variant != "compact":
        # CPU sizes: the wide 1x1 convs of MobileNetV2 stay compact (their exact expansion, a QR
        # per layer, costs seconds on one CPU thread); at full size every conv is expanded
        skip = None if FULL else (lambda name, m: max(m.in_channels, m.out_channels) > 64)
        student = lopfast.expand(student, rate=RATE, inplace=True, skip=skip)
        lopfast.set_mode(student, "chain" if variant == "paper" else "collapsed")
        if variant == "ours" and CUDA:
            fast = lopfast.CollapsedForward(student)
        distiller = lopfast.SPDistiller(teacher, student, backend="torch" if variant == "paper" else "auto")
    opt = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, *chw, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=CUDA):
            if distiller is not None:
                logits, sp = distiller(x)
            else:
                with torch.no_grad():
                    teacher(x)
                logits, sp = student(x), None
        loss = F.cross_entropy(logits.float(), y % logits.shape[1])
        if sp is not None:
            loss = loss + 1000.0 * sp.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)

    return step, (distiller, fast), batch


@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("net", STEP_NETS)
def test_train_step(benchmark, net, variant, device, ceilings):
    measure = f"train_step/{net}"
    keep = None
    try:
        step, keep, batch = _train_step(variant, net, device)
        step()  # warm-up: optimizer state, dispatch tuning, compilation
        peak = None
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated() / 1e9
        t = _measure(benchmark, step, measure, net=net, variant=variant)
    except torch.cuda.OutOfMemoryError as exc:  # the paper's chain at ImageNet sizes may not fit
        _table.setdefault(measure, dict(variants={}, ratios={}, info={}))["variants"][variant] = dict(
            s=None, status="out of memory", error=str(exc).splitlines()[0])
        _write()
        pytest.skip(f"{measure} {variant}: out of GPU memory")
    finally:
        if keep is not None:
            for obj in keep:
                if obj is not None:
                    (obj.close if hasattr(obj, "close") else obj.remove)()
    _table.setdefault(measure, dict(variants={}, ratios={}, info={}))["info"] = dict(
        batch=batch, rate=RATE, precision="bf16 autocast" if CUDA else "fp32")
    _record(measure, variant, t, peak_mem_GB=peak)
    if CUDA:
        torch.cuda.empty_cache()


def test_ratios_are_finite():
    """After the table: every measured ratio is a positive number (a broken measurement shows)."""
    for measure, m in _table.items():
        for k, v in m["ratios"].items():
            assert v is None or (math.isfinite(v) and v > 0), (measure, k, v)
