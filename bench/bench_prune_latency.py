"""Does pruning make the model faster? Measured latency of pruned models (issue 19).

For ResNet-18, ResNet-50, MobileNetV2 (torchvision, ImageNet shapes, 224 px) and the CIFAR
ResNet-56 (lopfast's zoo, 32 px): the original and the model with 50 % and 90 % of its parameters
removed (``lopfast.prune``, l1, ``target_removed``), timed by :func:`lopfast.prune.latency.measure_latency`
(round-robin, median ± IQR of repeated forwards, no grad) at batch 1 and the training batch,
eager and ``torch.compile``d, speed-up beside the MACs reduction. Then the ``round_to`` study
at channel ratio 0.45: exact counts against widths rounded to 8 and to 16 (bf16 autocast on CUDA: tensor cores
take channels in multiples of 8), the measurement the CUDA default ``round_to=8``
(``lopfast.prune.api.ROUND_TO_DEFAULT``) rests on. Last, the latency budget: the CIFAR ResNet-56
and MobileNetV2 asked to run 2x faster at the training batch (``budget="latency"``), the
achieved (measured) speed-up beside the asked one.

    LOPFAST_BENCH_PRUNE=1 pytest bench/bench_prune_latency.py --benchmark-only -q     # GPU: ~6 min on one H200

Sizes: on CUDA the training batch is 256 (ImageNet shapes 128) and compile is on; on CPU
(``small``) the ImageNet models run at batch 32, compile only with ``LOPFAST_BENCH_COMPILE=1``
(inductor costs tens of seconds per model and batch on a CPU); ``tiny`` (CI smoke) prunes a
small net once. On a GPU the benchmark runs only with ``LOPFAST_BENCH_PRUNE=1``; ``bench/gpu_suite.sh``
sets it and runs the ResNet-56 rows last, inside its deadline (``-k resnet56``); the ImageNet nets
stay outside its time budget. It needs torch-pruning (``wheels/``, see the suite).
Results: ``<results>/prune_latency-<gpu|cpu>.json`` (rewritten after every model) and a markdown
table on stdout (``-s``), the form of BENCHMARKS.md's table.
"""
import json
import os
import time

import pytest
import torch

from conftest import TINY, machine_info, results_dir

pytest.importorskip("torch_pruning")

import lopfast  # noqa: E402
from lopfast.pipeline.models import build_model  # noqa: E402
from lopfast.prune import count_macs  # noqa: E402
from lopfast.prune.latency import format_latency, measure_latency  # noqa: E402

CUDA = torch.cuda.is_available()
COMPILE = os.environ.get("LOPFAST_BENCH_COMPILE", "1" if CUDA else "0") == "1"
if CUDA and not TINY and os.environ.get("LOPFAST_BENCH_PRUNE") != "1":
    pytest.skip("pruned-model latency on a GPU: run with LOPFAST_BENCH_PRUNE=1 (outside the suite's time budget)",
                allow_module_level=True)

# name -> (builder name, input size, training batch on CUDA, on CPU)
NETS = {
    "resnet18": ("tv:resnet18", 224, 128, 32),
    "resnet50": ("tv:resnet50", 224, 128, 32),
    "mobilenet_v2": ("tv:mobilenet_v2", 224, 128, 32),
    "resnet56": ("resnet56", 32, 256, 256),
}
if TINY:
    NETS = {"resnet20": ("resnet20", 16, 8, 8)}
TARGETS = (0.5, 0.9)
ROUND_TOS = (None, 8, 16)
# channel ratio of the round_to study: 0.45 leaves odd counts (64 -> 35, 256 -> 140, 512 -> 281) that
# rounding changes; at 0.5 the power-of-two widths of these nets stay multiples of 8 anyway
RT_RATIO = 0.45

def _path():
    return results_dir() / f"prune_latency-{'gpu' if CUDA else 'cpu'}.json"


# a run of some tests (-k) updates their sections and keeps the others' from the last run
try:
    _doc: dict = json.loads(_path().read_text())
except (OSError, ValueError):
    _doc = {}


def _save() -> None:
    _doc["machine"] = machine_info()
    _path().write_text(json.dumps(_doc, indent=1))


def _opts():
    if TINY:
        return dict(rounds=3, warmup=1, budget_s=0.01)
    return dict(rounds=50 if CUDA else 20, budget_s=2.0 if CUDA else 3.0)


def _net(net: str):
    """(builder name, size, training batch, model, one input) of ``net`` on this run's device."""
    name, size, tb_cuda, tb_cpu = NETS[net]
    dev = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    model = build_model(name, num_classes=1000 if name.startswith("tv:") else 10).eval().to(dev)
    return name, size, tb_cuda if CUDA else tb_cpu, model, torch.randn(1, 3, size, size, device=dev)


@pytest.mark.parametrize("net", list(NETS))
def test_pruned_latency(benchmark, net):
    name, size, train_batch, model, x = _net(net)
    models, macs, prune_s = {"original": model}, {"original": count_macs(model, x)}, {}
    with _quiet():
        for t in TARGETS:
            t0 = time.perf_counter()
            # exact counts here (round_to=None): the 50/90 % rows are the plain pruning a user gets
            # by counting parameters; the round_to rows below show what rounding changes
            pruned, rep = lopfast.prune(model, x, target_removed=t, round_to=None)
            prune_s[f"{int(t * 100)}%"] = time.perf_counter() - t0
            models[f"{int(t * 100)}% removed"] = pruned
            macs[f"{int(t * 100)}% removed"] = rep.macs_after
    lat = measure_latency(models, x, train_batch=train_batch, compile=COMPILE, macs=macs, **_opts())
    lat["prune_seconds"] = prune_s
    lat["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    _doc.setdefault("nets", {})[net] = lat
    _save()
    print(f"\n{net}: {name} at {size}px\n{format_latency(lat)}")
    small = models[f"{int(TARGETS[0] * 100)}% removed"]
    with torch.no_grad():
        benchmark.pedantic(lambda: small(x), rounds=3 if TINY else 20, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("net", list(NETS))
def test_round_to(benchmark, net):
    name, size, train_batch, model, x = _net(net)
    models, macs = {"original": model}, {"original": count_macs(model, x)}
    with _quiet():
        for rt in ROUND_TOS:
            pruned, rep = lopfast.prune(model, x, ratio=RT_RATIO, round_to=rt)
            key = f"round_to={rt}"
            models[key], macs[key] = pruned, rep.macs_after
    lat = measure_latency(models, x, train_batch=train_batch, compile=False, macs=macs, **_opts())
    _doc.setdefault("round_to", {})[net] = lat
    _save()
    print(f"\n{net} round_to (channel ratio {RT_RATIO}, eager)\n{format_latency(lat)}")
    with torch.no_grad():
        benchmark.pedantic(lambda: models["round_to=8"](x), rounds=3 if TINY else 20, iterations=1, warmup_rounds=1)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)



# the latency budget (NetAdapt allocation): CIFAR ResNet-56 and MobileNetV2, asked 2x at the training batch
BUDGET_NETS = {"resnet56": ("resnet56", 32, 256, 64), "mobilenet_v2_cifar": ("mobilenet_v2", 32, 256, 64)}
if TINY:
    BUDGET_NETS = {"resnet20": ("resnet20", 16, 8, 8)}


@pytest.mark.parametrize("net", list(BUDGET_NETS))
def test_latency_budget(benchmark, net):
    name, size, tb_cuda, tb_cpu = BUDGET_NETS[net]
    dev = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval().to(dev)
    x = torch.randn(2, 3, size, size, device=dev)
    batch = tb_cuda if CUDA else tb_cpu
    target = 1.3 if TINY else 2.0
    opts = dict(lut_points=3, rounds=3, budget_s=0.01, repeats=1) if TINY else {}
    t0 = time.perf_counter()
    with _quiet():
        pruned, rep = lopfast.prune(model, x, budget="latency", target_speedup=target, batch=batch, **opts)
    seconds = time.perf_counter() - t0
    na = rep.extra["netadapt"]
    _doc.setdefault("latency_budget", {})[net] = {
        "asked": target, "achieved": rep.extra["achieved_speedup"], "predicted": rep.extra["predicted_speedup"],
        "batch": batch, "round_to": rep.round_to, "params_removed": rep.removed_fraction,
        "macs_removed": rep.macs_removed_fraction, "seconds": seconds, "iterations": na["iterations"],
        "chosen_iteration": na["chosen_iteration"], "measurements": na["measurements"],
        "calibration": na["calibration"], "table_configs_measured": na["table_configs_measured"]}
    _save()
    print(f"\n{net}: asked {target}x at batch {batch}, measured {rep.extra['achieved_speedup']:.2f}x "
          f"(predicted {rep.extra['predicted_speedup']:.2f}x), {100 * rep.removed_fraction:.1f}% of the parameters "
          f"and {100 * rep.macs_removed_fraction:.1f}% of the MACs removed, {seconds:.0f}s")
    xb = torch.randn(batch, 3, size, size, device=dev)
    with torch.no_grad():
        benchmark.pedantic(lambda: pruned(xb), rounds=3, iterations=1, warmup_rounds=1)
