"""Collapse fast path: one training step (forward + backward) of a layer and of a whole net.

Single layer (3x3 conv, rates 2, 3, 4):
    compact     the pruned nn.Conv2d (the floor)
    collapsed   ExpandedConv2d, one conv on W3.W2.W1 (ours; Triton collapse on CUDA)
    chain       ExpandedConv2d, three convs (the paper's / ExpandNets' way)
Whole net (small expanded ResNet-ish, rate 3):
    compact             the plain net
    chain               every expanded conv as three convs
    collapsed-eager     per-layer collapse with the einsum reference (several launches per layer)
    collapsed-triton    per-layer collapse with the Triton op (CUDA only: 1 launch per layer each way)
    collapsed-grouped   lopfast.CollapsedForward: all layers in one launch forward, one backward
                        (CUDA only; on CPU it would be the same reference loop as -eager)
Precisions: fp32, and bf16 autocast on CUDA.

Sizes: ``LOPFAST_BENCH_SIZE=full`` (default on CUDA) uses the issue's layers (CIFAR 64 ch
32x32 b64, ImageNet 512 ch 7x7 b32; net width 64 at 32x32 b64); ``small`` (default on CPU)
shrinks them so the whole file runs in a few minutes on a laptop CPU:

    pytest bench/bench_collapse.py --benchmark-only

A ratio table (median / median of compact) is printed at the end and written to
bench/results/collapse-<cpu|gpu>.json, with achieved GFLOP/s of the compact-equivalent work.
On CPU every benchmark runs with one intra-op thread (see ``_one_cpu_thread``).
"""
import json
import os
import platform

import pytest
import torch
import torch.nn as nn

import lopfast
from conftest import BENCH_SIZE, TINY, make_conv_layer, results_dir, sync, timing

CUDA = torch.cuda.is_available()
FULL = BENCH_SIZE == "full"
LAYERS = {
    "cifar": dict(channels=64, size=32, batch=64) if FULL else dict(channels=32, size=16, batch=16),
    "imagenet": dict(channels=512, size=7, batch=32) if FULL else dict(channels=128, size=7, batch=8),
}
NET = dict(width=64, size=32, batch=64) if FULL else dict(width=16, size=16, batch=8)
if TINY:  # the CI smoke test: every benchmark once, at sizes where only "it runs" is measured
    LAYERS = {"cifar": dict(channels=8, size=8, batch=2), "imagenet": dict(channels=16, size=4, batch=2)}
    NET = dict(width=4, size=8, batch=2)
RATES = [2, 3, 4]
PRECISIONS = ["fp32"] + (["bf16-autocast"] if CUDA else [])
LAYER_VARIANTS = ["compact", "collapsed", "chain"]
NET_VARIANTS = ["compact", "chain", "collapsed-eager"] + (["collapsed-triton", "collapsed-grouped"] if CUDA else [])
ROUNDS = int(os.environ.get("LOPFAST_BENCH_ROUNDS", "5" if CUDA else "11"))
WARMUP = 1 if CUDA else 3  # oneDNN builds its primitives over the first few CPU steps

_results = {}


def _step_fn(module, x, grad, precision, device):
    def step():
        module.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision != "fp32"):
            out = module(x)
        out.float().backward(grad)
        sync(device)

    return step


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """One intra-op thread on CPU: on a small shared box (2 cores, other jobs running) two
    OpenMP threads make a plain nn.Conv2d step swing between 1 and 60 ms, as one thread
    waits at every barrier for the other to be scheduled again; one thread is stable."""
    if CUDA:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _warm(step):
    step()  # warm-up: Triton compilation, allocator, oneDNN primitives
    return step


def _record(key, variant, benchmark, flops):
    st = timing(benchmark)
    if st is None:
        return
    _results.setdefault(key, {})[variant] = (st.median, st.min, flops)


# ----------------------------------------------------------------------------- single layer
def _make_layer(variant, layer, rate, device):
    spec = LAYERS[layer]
    c = spec["channels"]
    module, x, grad = make_conv_layer(variant, c, spec["size"], spec["batch"], rate, device)
    # fwd + bwd (input and weight grads) of the compact conv: 3 x 2*b*c*c*9*h*w
    flops = 3 * 2 * spec["batch"] * c * c * 9 * spec["size"] ** 2
    return module, x, grad, flops


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", LAYER_VARIANTS)
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_train_step(benchmark, layer, rate, variant, precision, device):
    if variant == "compact" and rate != RATES[0]:
        pytest.skip("compact does not depend on the rate: measured once per layer")
    def build():
        module, x, grad, flops = _make_layer(variant, layer, rate, device)
        return _step_fn(module, x, grad, precision, device), flops

    step, flops = build()
    _warm(step)
    benchmark.group = f"layer-{layer}-{precision}"
    benchmark.extra_info.update(layer=layer, rate=rate, variant=variant, precision=precision, bench_size=BENCH_SIZE)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    for r in RATES:
        if variant == "compact" or r == rate:
            _record(("layer", layer, r, precision), variant, benchmark, flops)


# ----------------------------------------------------------------------------- whole net
class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


def resnetish(width: int, num_classes: int = 10) -> nn.Sequential:
    """A small CIFAR ResNet: stem + 3 stages x 2 basic blocks (15 convs) + linear head."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        _Block(w, w, 1), _Block(w, w, 1),
        _Block(w, 2 * w, 2), _Block(2 * w, 2 * w, 1),
        _Block(2 * w, 4 * w, 2), _Block(4 * w, 4 * w, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


def _net_flops(net, size, batch):
    total, s = 0, size
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, lopfast.ExpandedConv2d):
            s_out = s // m.stride[0] if m.stride[0] > 1 else s
            total += 2 * batch * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] * s_out**2
            if m.stride[0] > 1 and m.kernel_size[0] == 3:
                s = s_out
    return 3 * total


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", NET_VARIANTS)
def test_net_train_step(benchmark, variant, precision, device):
    hooks = []

    def build():
        torch.manual_seed(0)
        net = resnetish(NET["width"]).to(device)
        flops = _net_flops(net, NET["size"], NET["batch"])
        backend = None
        if variant != "compact":
            net = lopfast.expand(net, rate=3)
            lopfast.set_mode(net, "chain" if variant == "chain" else "collapsed")
            if variant == "collapsed-grouped":
                hooks.append(lopfast.CollapsedForward(net))
            backend = "torch" if variant == "collapsed-eager" else None
        x = torch.randn(NET["batch"], 3, NET["size"], NET["size"], device=device)
        grad = torch.randn(NET["batch"], 10, device=device)
        inner = _step_fn(net, x, grad, precision, device)

        def step():
            with lopfast.use_backend(backend or "auto"):
                inner()

        return step, flops

    step, flops = build()
    _warm(step)
    benchmark.group = f"net-{precision}"
    benchmark.extra_info.update(variant=variant, precision=precision, bench_size=BENCH_SIZE, **NET)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    for hook in hooks:
        hook.remove()
    _record(("net", f"resnetish-w{NET['width']}", 3, precision), variant, benchmark, flops)


# ----------------------------------------------------------------------------- weight space only
COLLAPSE_VARIANTS = ["pack-only", "reference-per-layer"] + (["triton-per-layer", "triton-grouped"] if CUDA else [])


@pytest.mark.parametrize("variant", COLLAPSE_VARIANTS)
def test_net_collapse_only(benchmark, variant, device):
    """Only the weight-space work of one step of the expanded net: W_eff of every layer and
    the factor gradients from given dW_eff. ``pack-only`` is the torch.cat of all factors the
    grouped path pays each step (the price of not keeping them in one flat buffer)."""
    torch.manual_seed(0)
    net = lopfast.expand(resnetish(NET["width"]).to(device), rate=3)
    layers = [(m.weight1, m.weight2, m.weight3, m.groups) for m in net.modules()
              if isinstance(m, lopfast.ExpandedConv2d)]
    params = [w for layer in layers for w in layer[:3]]
    grads = [torch.randn(m.weight.shape, device=device) for m in net.modules() if isinstance(m, lopfast.ExpandedConv2d)]

    def step():
        if variant == "pack-only":
            torch.cat([w.detach().reshape(-1) for w in params])
        elif variant == "triton-grouped":
            outs = lopfast.collapse_many(layers, backend="triton")
            torch.autograd.backward(outs, grads)
        else:
            backend = "torch" if variant == "reference-per-layer" else "triton"
            outs = [lopfast.ops.collapse.collapse(*layer, backend=backend) for layer in layers]
            torch.autograd.backward(outs, grads)
        sync(device)

    step()
    benchmark.group = "net-collapse-only"
    benchmark.extra_info.update(variant=variant, layers=len(layers), factor_numel=sum(p.numel() for p in params))
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    # flops of the weight-space work: forward + 3 backward triple products per tap and group
    flops = 0
    for w1, w2, w3, g in layers:
        p_g, m_g = w1.shape[0] // g, w1.shape[1]
        q_g, T = w2.shape[0] // g, w2.shape[2] * w2.shape[3]
        n_g = w3.shape[0] // g
        flops += 4 * 2 * g * T * (q_g * p_g * m_g + n_g * q_g * m_g)
    _record(("collapse", f"resnetish-w{NET['width']}", 3, "fp32"), variant, benchmark, flops)


# ----------------------------------------------------------------------------- report
@pytest.fixture(scope="module", autouse=True)
def ratio_table():
    yield
    if not _results:
        return
    rows = []
    for key, by_variant in sorted(_results.items(), key=lambda kv: str(kv[0])):
        kind, name, rate, precision = key
        base, base_min, _ = by_variant.get("compact", (None, None, None))
        for variant, (median, tmin, flops) in by_variant.items():
            rows.append(dict(kind=kind, name=name, rate=rate, precision=precision, variant=variant,
                             median_ms=1e3 * median, min_ms=1e3 * tmin,
                             x_compact=(median / base) if base else None,
                             x_compact_min=(tmin / base_min) if base_min else None,
                             compact_equiv_gflops=flops / median / 1e9))
    # min next to median: on a shared CPU the minimum is the run least disturbed by others
    print(f"\n\nsize={BENCH_SIZE}  {'kind':<5} {'name':<16} rate {'precision':<13} {'variant':<18}"
          f" {'median ms':>10} {'x compact':>9} {'min ms':>8} {'x (min)':>8} {'GFLOP/s':>8}")
    f = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
    for r in rows:
        print(f"{'':<11}{r['kind']:<5} {r['name']:<16} {r['rate']:>4} {r['precision']:<13} {r['variant']:<18}"
              f" {r['median_ms']:>10.2f} {f(r['x_compact']):>9} {r['min_ms']:>8.2f} {f(r['x_compact_min']):>8}"
              f" {r['compact_equiv_gflops']:>8.1f}")
    out = results_dir()
    # CPU timings ran on one thread (the fixture above); it is restored by the time we get here
    machine = dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                   gpu=torch.cuda.get_device_name() if CUDA else None, threads=None if CUDA else 1)
    (out / f"collapse-{'gpu' if CUDA else 'cpu'}.json").write_text(json.dumps(
        dict(command="pytest bench/bench_collapse.py --benchmark-only", size=BENCH_SIZE, machine=machine,
             results=rows), indent=2))
