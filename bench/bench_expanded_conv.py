"""One training step (forward + backward) of a single layer: compact conv vs ExpandedConv2d.

Variants, side by side in one run:
    compact          the pruned nn.Conv2d itself (the cost we want to stay near)
    collapsed        ExpandedConv2d, mode="collapsed" (ours: one conv on W3.W2.W1)
    chain            ExpandedConv2d, mode="chain" (three convs: the paper's / ExpandNets' way)
    collapsed-compile  torch.compile of the collapsed layer (only with LOPFAST_BENCH_COMPILE=1,
                       default on CUDA: inductor compilation costs minutes on a small CPU)

Layers (the issue's): CIFAR-sized 64 ch, 32x32, batch 64; late ImageNet-sized 512 ch, 7x7,
batch 32; rates 2 and 3. Run:

    pytest bench/bench_expanded_conv.py --benchmark-only

At the end a ratio table (median time / median compact time) is printed and written to
bench/results/expanded_conv-<host>.json.
"""
import json
import os
import platform
import socket

import pytest
import torch

from conftest import TINY, make_conv_layer, results_dir, sync, timing

LAYERS = {
    "cifar-64ch-32x32-b64": dict(channels=64, size=32, batch=64),
    "imagenet-512ch-7x7-b32": dict(channels=512, size=7, batch=32),
}
if TINY:  # the CI smoke test: every benchmark once, at sizes where only "it runs" is measured
    LAYERS = {"cifar-8ch-8x8-b2": dict(channels=8, size=8, batch=2),
              "imagenet-16ch-4x4-b2": dict(channels=16, size=4, batch=2)}
RATES = [2, 3]
COMPILE = os.environ.get("LOPFAST_BENCH_COMPILE", "1" if torch.cuda.is_available() else "0") == "1"
VARIANTS = ["compact", "collapsed", "chain"] + (["collapsed-compile"] if COMPILE else [])
ROUNDS = int(os.environ.get("LOPFAST_BENCH_ROUNDS", "7"))

_results = {}


def _make(variant, layer, rate, device):
    spec = LAYERS[layer]
    return make_conv_layer(variant, spec["channels"], spec["size"], spec["batch"], rate, device, input_grad=True)


@pytest.fixture(scope="module", autouse=True)
def ratio_table():
    # One CPU thread by default: on a shared 2-core machine two OpenMP threads make even the
    # plain conv's step swing several-fold between rounds (LOPFAST_BENCH_THREADS overrides).
    old_threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("LOPFAST_BENCH_THREADS", "1")))
    yield
    try:
        _write_table()
    finally:
        torch.set_num_threads(old_threads)


def _write_table():
    if not _results:
        return
    rows = []
    for (layer, rate), by_variant in sorted(_results.items()):
        base = by_variant.get("compact")
        for variant, median in by_variant.items():
            rows.append(dict(layer=layer, rate=rate, variant=variant, median_s=median,
                             ratio_to_compact=(median / base) if base else None))
    print("\n\nlayer                      rate  variant             median (ms)  x compact")
    for r in rows:
        ratio = f"{r['ratio_to_compact']:.2f}" if r["ratio_to_compact"] else "-"
        print(f"{r['layer']:<26} {r['rate']:>4}  {r['variant']:<18} {1e3 * r['median_s']:>11.2f}  {ratio:>9}")
    out = results_dir()
    machine = dict(
        host=socket.gethostname(), platform=platform.platform(), processor=platform.processor(),
        cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    (out / f"expanded_conv-{tag}.json").write_text(
        json.dumps(dict(command=f"LOPFAST_BENCH_COMPILE={int(COMPILE)} LOPFAST_BENCH_ROUNDS={ROUNDS} "
                                "pytest bench/bench_expanded_conv.py --benchmark-only", machine=machine,
                        results=rows), indent=2)
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_train_step(benchmark, layer, rate, variant, device):
    if variant == "compact" and rate != RATES[0]:
        # the compact layer does not depend on the rate: measure it once per layer
        pytest.skip("compact measured once per layer")
    module, x, grad = _make(variant, layer, rate, device)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)
        sync(device)

    step()  # warm-up (and compilation)
    benchmark.group = f"{layer}"
    benchmark.extra_info.update(layer=layer, rate=rate, variant=variant)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    st = timing(benchmark)
    if st is None:
        return
    median = st.median
    for r in RATES:
        if variant == "compact" or r == rate:
            _results.setdefault((layer, r), {})[variant] = median
