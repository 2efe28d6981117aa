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
train_step/<net>/<unpruned|pruned90>
                     one training step of lopfast's own step engine (lopfast.pipeline.step.TrainStep),
                     bf16 autocast on CUDA, SGD momentum: ft (the student alone), compact (the student
                     + the teacher's forward: the fair baseline), lop (expanded r = 3, collapsed,
                     CollapsedForward, SPDistiller "auto"), chain (the paper's: chain mode, eager SP), each
                     eager and captured as one CUDA graph, plus the step in fp32 and the collapse in fp32
                     inside the bf16 step; peak memory of each. Nets: ResNet-56 and MobileNetV2 (CIFAR,
                     b = 256), ResNet-50 (ImageNet shapes, b = 128); the student unpruned (the teacher's
                     architecture) or with every channel count scaled by sqrt(0.1) (~90 % removed). See
                     the comment of that section for the variant names.
epoch/resnet56-pruned90
                     one CIFAR-10-sized epoch (50,000 images on the device, b = 256) of ft and lop at
                     90 % removed, captured: seconds per epoch.
collapse_host/<net>  host microseconds and launches per step of the collapse (forward + backward) of
                     every ResNet-56 / ResNet-50 conv at r = 3: the prepared CollapseProgram
                     (CollapsedForward's path) against a one-off collapse_many.

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

_STEP_TARGET = ("lop-captured / compact-captured (ft + the teacher's forward) <= 1.2; ft-captured / ft-eager "
                "<= 0.5; chain-eager / lop-captured >= 3; peak memory lop / compact <= 1.1")
TARGETS = {
    "collapse/resnet56": "ours <= 2x roofline; eager >= 10x ours",
    "collapse/resnet50": "ours <= 1.3x roofline of the chosen precision; never slower than per-layer matmul",
    "sp_loss/resnet56": "ours <= 1.5x one read; eager >= 5x ours; compile >= 2x ours",
    **{f"train_step/{n}/{p}": _STEP_TARGET for n in ("resnet56", "mobilenet_v2", "resnet50")
       for p in ("unpruned", "pruned90")},
    "epoch/resnet56-pruned90": "ft <= 1.5 s, lop <= 2 s per CIFAR-10 epoch (H200)",
    "collapse_host/resnet56": "host us and launches per step reported (program vs one-off collapse_many)",
    "collapse_host/resnet50": "host us and launches per step reported (program vs one-off collapse_many)",
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
    elif kind == "train_step":
        mem = {k: r.get("peak_mem_GB") for k, r in m["variants"].items()}
        m["ratios"] = dict(lop_over_compact_captured=_ratio(v.get("lop-captured"), v.get("compact-captured")),
                           lop_over_compact_eager=_ratio(v.get("lop-eager"), v.get("compact-eager")),
                           ft_captured_over_ft_eager=_ratio(v.get("ft-captured"), v.get("ft-eager")),
                           chain_over_lop_captured=_ratio(v.get("chain-eager"), v.get("lop-captured")),
                           chain_over_lop_eager=_ratio(v.get("chain-eager"), v.get("lop-eager")),
                           memory_lop_over_compact=_ratio(mem.get("lop-captured"), mem.get("compact-captured")),
                           collapse32_over_lop=_ratio(v.get("lop-captured-collapse32"), v.get("lop-captured")),
                           compact_fp32_over_bf16=_ratio(v.get("compact-captured-fp32"), v.get("compact-captured")),
                           lop_fp32_over_bf16=_ratio(v.get("lop-captured-fp32"), v.get("lop-captured")))
    elif kind == "epoch":
        m["ratios"] = dict(lop_over_ft=_ratio(v.get("lop"), v.get("ft")))
    elif kind == "collapse_host":
        us = {k: r.get("host_us") for k, r in m["variants"].items()}
        m["ratios"] = dict(host_collapse_many_over_program=_ratio(us.get("collapse_many"), us.get("program")))
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


def expanded_layers(net: str, device) -> tuple:
    """(layers, dW_eff, factors): fresh r = 3 expansions of every conv of ``net``, the collapse's
    inputs, and a fixed gradient of each effective kernel."""
    model, _, _ = build_net(net)
    torch.manual_seed(0)
    mods = [lopfast.ExpandedConv2d(cin, cout, k, groups=g, rate=RATE, bias=False, device=device)
            for cin, cout, k, g in conv_specs(model)]
    layers = [(m.weight1, m.weight2, m.weight3, m.groups) for m in mods]
    dws = [torch.randn(m.out_channels, m.in_channels // m.groups, *m.kernel_size, device=device) for m in mods]
    return layers, dws, [w for layer in layers for w in layer[:3]]


COLLAPSE_VARIANTS = (["ours", "eager", "matmul", "triton", "folded"] + (["compile"] if COMPILE else [])
                     + (["graph"] if CUDA else []))


@pytest.mark.parametrize("variant", COLLAPSE_VARIANTS)
@pytest.mark.parametrize("net", ["resnet56", "resnet50"])
def test_collapse_all_layers(benchmark, net, variant, device, ceilings):
    from lopfast.ops import collapse as op_collapse
    from lopfast.ops.collapse import collapse_many, reference_collapse
    from lopfast.ops.collapse_gemm import matmul_many

    layers, dws, params = expanded_layers(net, device)

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
# Every variant is one step of lopfast's own training-step engine (lopfast.pipeline.step.TrainStep),
# i.e. what `lopfast run` executes, named <kind>-<mode>[-<option>]:
#   kind     ft       the student alone (fine-tuning)
#            compact  the student + the teacher's forward on the same batch (no grad, no SP): the fair
#                     baseline of LOP, which must run the teacher too ("ft + teacher forward")
#            lop      the student expanded at r = 3, collapsed (CollapsedForward: one grouped collapse),
#                     SP distillation from the teacher (SPDistiller, "auto")
#            chain    the paper's way: expanded in chain mode (three convs), eager SP ("torch"), eager step
#   mode     eager    the step as Python launches it; captured: one CUDA graph replayed per step
#                     (on CPU through lopfast.graphs' stand-in: it runs, it times nothing meaningful)
#   option   fp32     amp off (fp32 step, TF32 as the user's setting) instead of bf16 autocast
#            collapse32  the collapse in fp32 inside the bf16 step (CollapsedForward precision="params"),
#                     the way before the collapse followed the step's precision
# Nets: ResNet-56 and MobileNetV2 (CIFAR, b = 256) and ResNet-50 (ImageNet shapes, b = 128); "unpruned"
# (student = teacher's architecture) and "pruned90" (every channel count scaled by sqrt(0.1): about
# 90 % of the parameters removed, close to what the pipeline's per-layer l1 pruning gives; the teacher
# stays unpruned).
STEP_NETS = ["resnet56", "mobilenet_v2", "resnet50"]
STEP_PRUNE = ["unpruned", "pruned90"]
# every variant at the GPU and CPU sizes; CI's smoke (tiny) runs one of each code path
STEP_VARIANTS = os.environ.get(
    "LOPFAST_BENCH_STEP_VARIANTS",
    "ft-eager,ft-captured,compact-captured,lop-eager,lop-captured-collapse32,chain-eager" if TINY else
    "ft-eager,ft-captured,compact-eager,compact-captured,lop-eager,lop-captured,lop-captured-collapse32,"
    "chain-eager,compact-captured-fp32,lop-captured-fp32").split(",")
AMP = "bf16" if CUDA else "off"
KEEP = math.sqrt(0.1)  # channel fraction of "pruned90"


def _thin_mobilenet_v2(keep: float) -> nn.Module:
    """The zoo's CIFAR MobileNetV2 with every channel count (stem, blocks, head) scaled by ``keep``."""
    from lopfast.pipeline.models import InvertedResidual, MobileNetV2Cifar

    def ch(c):
        return max(1, round(c * keep))

    net = MobileNetV2Cifar()
    stem = ch(32)
    layers = [nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)]
    c = stem
    for t, out, n, st in MobileNetV2Cifar.CFG:
        for i in range(n):
            block = InvertedResidual(c, ch(out), st if i == 0 else 1, t)
            layers.append(block)
            c = ch(out)
    layers += [nn.Conv2d(c, ch(1280), 1, bias=False), nn.BatchNorm2d(ch(1280)), nn.ReLU6(inplace=True)]
    net.features = nn.Sequential(*layers)
    net.classifier = nn.Linear(ch(1280), 10)
    return net


def build_step_nets(name: str, pruned: bool) -> tuple:
    """(teacher, student architecture, input C,H,W, batch): the student thinned for "pruned90"."""
    teacher, chw, batch = build_net(name)
    if not pruned:
        return teacher, copy.deepcopy(teacher), chw, batch
    from lopfast.pipeline.models import build_model

    if name == "resnet56":
        width = 16 if FULL else (4 if TINY else 8)
        student = build_model("resnet56", width=max(1, round(width * KEEP)))
    elif name == "mobilenet_v2":
        student = _thin_mobilenet_v2(KEEP)
    else:
        if FULL:
            student = bottleneck_resnet(round(64 * KEEP), num_classes=1000)
        else:
            student = bottleneck_resnet(max(1, round((4 if TINY else 8) * KEEP)), num_classes=10)
    return teacher, student, chw, batch


def _params(m):
    return sum(p.numel() for p in m.parameters())


class _StepRig:
    """One training step of a variant, run by lopfast's TrainStep (see the section comment)."""

    def __init__(self, variant: str, net: str, prune: str, device):
        from lopfast.pipeline import step as st
        from lopfast.pipeline.train import TrainConfig

        kind, mode, *opts = variant.split("-")
        self.kind, self.mode = kind, mode
        dev = torch.device(device)
        torch.manual_seed(0)
        teacher, student, chw, batch = build_step_nets(net, prune == "pruned90")
        self.removed = 1 - _params(student) / _params(teacher)
        cl = dev.type == "cuda"
        teacher = teacher.to(dev).eval()
        student = student.to(dev).train()
        if cl:
            teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        self.keep = []
        self.distiller = None
        forward = student
        if kind in ("lop", "chain"):
            # CPU sizes: the wide 1x1 convs of MobileNetV2 stay compact (their exact expansion, a QR
            # per layer, costs seconds on one CPU thread); at full size every conv is expanded
            skip = None if FULL else (lambda name, m: max(m.in_channels, m.out_channels) > 64)
            student = lopfast.expand(student, rate=RATE, inplace=True, skip=skip)
            lopfast.set_mode(student, "chain" if kind == "chain" else "collapsed")
            if kind == "lop":
                self.keep.append(lopfast.CollapsedForward(student, precision="params" if "collapse32" in opts else "step"))
            self.distiller = lopfast.SPDistiller(teacher, student, backend="torch" if kind == "chain" else "auto")
            self.keep.append(self.distiller)
        elif kind == "compact":
            def forward(x, student=student):
                with torch.no_grad():
                    teacher(x)
                return student(x)
        self.emulated = mode == "captured" and dev.type != "cuda"
        self._st, self._old_emulate = st, st.EMULATE
        st.EMULATE = self.emulated or st.EMULATE
        cfg = TrainConfig(1, 1e-4, (), gamma=3000.0 if self.distiller is not None else 0.0,
                          amp="off" if "fp32" in opts else AMP, capture="auto" if mode == "captured" else "off")
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, momentum=0.9,
                              weight_decay=5e-4)
        self.engine = st.TrainStep(student, opt, cfg, dev, steps_per_epoch=100_000, forward=forward,
                                   distiller=self.distiller)
        self.x = torch.randn(batch, *chw, device=dev)
        if cl:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (batch,), device=dev)
        self.batch, self.device = batch, dev

    def step(self):
        self.engine(self.x, self.y, self.batch)
        sync(self.device)

    def close(self):
        for obj in self.keep:
            (obj.close if hasattr(obj, "close") else obj.remove)()
        self._st.EMULATE = self._old_emulate


@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("prune", STEP_PRUNE)
@pytest.mark.parametrize("net", STEP_NETS)
def test_train_step(benchmark, net, prune, variant, device, ceilings):
    measure = f"train_step/{net}/{prune}"
    rig = None
    try:
        rig = _StepRig(variant, net, prune, device)
        from lopfast.pipeline.step import WARMUP

        for _ in range(WARMUP + 1):  # optimizer state, dispatch tuning, compilation, the capture
            rig.step()
        peak = None
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            rig.step()
            peak = torch.cuda.max_memory_allocated() / 1e9
        t = _measure(benchmark, rig.step, measure, net=net, prune=prune, variant=variant)
        info = dict(captured=rig.engine.graph is not None, why_eager=rig.engine.why_eager, emulated=rig.emulated)
    except torch.cuda.OutOfMemoryError as exc:  # the paper's chain at ImageNet sizes may not fit
        _table.setdefault(measure, dict(variants={}, ratios={}, info={}))["variants"][variant] = dict(
            s=None, status="out of memory", error=str(exc).splitlines()[0])
        _write()
        pytest.skip(f"{measure} {variant}: out of GPU memory")
    finally:
        if rig is not None:
            rig.close()
    m = _table.setdefault(measure, dict(variants={}, ratios={}, info={}))
    m["info"] = dict(batch=rig.batch, rate=RATE, removed=round(rig.removed, 4),
                     precision=f"{AMP} autocast (variants -fp32: off)" if CUDA else "fp32",
                     captured_on="CUDA graph" if CUDA else "CPU stand-in (no timing meaning)")
    _record(measure, variant, t, peak_mem_GB=peak, **info)
    del rig
    if CUDA:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- epoch
EPOCH_VARIANTS = ["ft", "lop"]


@pytest.mark.parametrize("variant", EPOCH_VARIANTS)
def test_epoch_resnet56_pruned90(benchmark, variant, device, ceilings):
    """One training epoch of ResNet-56 at 90 % removed on CIFAR-10-sized data held on the device
    (50,000 random 32x32 images at full size, b = 256, random crop and flip on the device), the
    step captured (``capture="auto"``) in the bench's precision; the first epoch warms up (dispatch,
    Triton compilation, the capture), the second is timed: loader + steps + the epoch-end read."""
    from lopfast.pipeline import step as st
    from lopfast.pipeline.data import TensorLoader
    from lopfast.pipeline.train import TrainConfig

    dev = torch.device(device)
    n, batch = (50_000, 256) if FULL else ((64, 16) if TINY else (512, 64))
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8).to(dev)
    labels = torch.randint(0, 10, (n,), generator=gen).to(dev)
    loader = TensorLoader(imgs, labels, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), batch, train=True, crop_pad=4,
                          flip=True, channels_last=dev.type == "cuda")
    rig = _StepRig(f"{variant}-captured", "resnet56", "pruned90", device)
    cfg = TrainConfig(2, 0.05, (), gamma=rig.engine.cfg.gamma, amp=AMP, capture="auto")
    eng = st.TrainStep(rig.engine.model, rig.engine.opt, cfg, dev, steps_per_epoch=len(loader),
                       forward=rig.engine.forward, distiller=rig.distiller)

    def epoch(e):
        eng.begin_epoch()
        for x, y, gbs in loader.epoch(e):
            eng(x, y, gbs)
        out = eng.end_epoch()
        sync(dev)
        return out

    try:
        epoch(0)
        t0 = time.perf_counter()
        sums = epoch(1)
        seconds = time.perf_counter() - t0
    finally:
        rig.close()
    assert sums["finite"]
    m = _table.setdefault("epoch/resnet56-pruned90", dict(variants={}, ratios={}, info={}))
    m["info"] = dict(images=n, batch=batch, steps=len(loader), removed=round(rig.removed, 4), precision=AMP,
                     captured=eng.graph is not None, why_eager=eng.why_eager)
    benchmark.extra_info.update(seconds=seconds)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _record("epoch/resnet56-pruned90", variant, seconds, images_per_s=n / seconds)


# ----------------------------------------------------------------------------- host work of the collapse
def _count_launches(fn, device) -> tuple:
    """(count, what): GPU kernels (and memcpy/memset) launched by ``fn()`` on CUDA, from the
    profiler; on CPU the ATen ops it dispatched (a stand-in: each is a launch on a GPU, Triton
    kernels aside)."""
    if torch.device(device).type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA), "GPU kernels"
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n, "ATen ops (CPU)"


@pytest.mark.parametrize("variant", ["program", "collapse_many"])
@pytest.mark.parametrize("net", ["resnet56", "resnet50"])
def test_collapse_host_work(benchmark, net, variant, device, ceilings):
    """Host microseconds and launches per step of the collapse, forward + backward, r = 3, fp32:
    ``program`` = what CollapsedForward runs each step (a CollapseProgram prepared once: no
    validation, routing or planning per call, only the signature check), ``collapse_many`` = a
    one-off call doing all of it. Host us: wall time of the call without waiting for the GPU
    (on CPU the computation is included: only the launch counts compare there)."""
    from lopfast.ops.collapse import CollapseProgram, collapse_many

    layers, dws, params = expanded_layers(net, device)
    prog = [CollapseProgram(layers)]

    def call():
        if variant == "program":
            if prog[0].signature != CollapseProgram.signature_of(layers):
                prog[0] = CollapseProgram(layers)
            outs = prog[0](layers)
        else:
            outs = collapse_many(layers)
        torch.autograd.backward(outs, dws)
        for w in params:
            w.grad = None

    call()  # dispatch tuning, Triton compilation
    sync(device)
    launches, what = _count_launches(call, device)
    host = []
    for _ in range(ROUNDS):
        sync(device)
        t0 = time.perf_counter()
        call()
        host.append(time.perf_counter() - t0)
    sync(device)
    host_us = 1e6 * sorted(host)[len(host) // 2]
    t = _measure(benchmark, lambda: (call(), sync(device)), f"collapse-host-{net}", net=net, variant=variant)
    m = _table.setdefault(f"collapse_host/{net}", dict(variants={}, ratios={}, info={}))
    m["info"] = dict(layers=len(layers), launches_are=what, rate=RATE, dtype="fp32")
    _record(f"collapse_host/{net}", variant, t, host_us=host_us, launches=launches)


def test_ratios_are_finite():
    """After the table: every measured ratio is a positive number (a broken measurement shows)."""
    for measure, m in _table.items():
        for k, v in m["ratios"].items():
            assert v is None or (math.isfinite(v) and v > 0), (measure, k, v)
