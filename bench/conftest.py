"""Benchmark setup shared by bench/bench_*.py (run with `pytest bench --benchmark-only`).

Sizes: ``LOPFAST_BENCH_SIZE=full`` runs the shapes of the issues (meant for a GPU);
the default ``small`` keeps every benchmark to seconds on a laptop CPU; ``tiny`` is the
smoke test CI runs (`LOPFAST_BENCH_SIZE=tiny pytest bench -q --benchmark-disable`): every
benchmark once, at sizes where only "does it run" is measured.

Result files go to ``$LOPFAST_BENCH_OUT`` (the GPU suite points it at its output folder),
else bench/results/.
"""
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lopfast
from lopfast import dispatch

BENCH_SIZE = os.environ.get("LOPFAST_BENCH_SIZE", "full" if torch.cuda.is_available() else "small")
if BENCH_SIZE not in ("full", "small", "tiny"):
    raise ValueError(f"LOPFAST_BENCH_SIZE must be full, small or tiny, got {BENCH_SIZE!r}")
TINY = BENCH_SIZE == "tiny"


def results_dir() -> Path:
    """Where benchmarks write their JSON: $LOPFAST_BENCH_OUT, else bench/results."""
    out = Path(os.environ.get("LOPFAST_BENCH_OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def machine_info() -> dict:
    """The machine a result was measured on."""
    cuda = torch.cuda.is_available()
    return dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                torch=torch.__version__, triton=lopfast.backend.triton_version(), cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name() if cuda else None,
                threads=None if cuda else torch.get_num_threads(), size=BENCH_SIZE)


def median_time(fn, device, *, rounds: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (CUDA events on CUDA, perf_counter elsewhere), after ``warmup`` calls.

    For the table benchmarks, whose ratios are computed from medians measured the same way in
    one run (and the same way the measured dispatch times its candidates); pytest-benchmark
    still times every one of them as well."""
    return dispatch.median_time(fn, device, rounds=rounds, warmup=warmup)


_PEAKS: dict = {}


class _matmul_tf32:
    """TF32 on or off for fp32 matmuls inside the block, through the API of this torch
    (``fp32_precision`` from 2.9 on: mixing it with the old ``allow_tf32`` flag raises)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self.new_api = hasattr(m, "fp32_precision")
        if self.new_api:
            self.old = m.fp32_precision
            m.fp32_precision = "tf32" if self.on else "ieee"
        else:
            self.old = m.allow_tf32
            m.allow_tf32 = self.on

    def __exit__(self, *exc):
        m = torch.backends.cuda.matmul
        if self.new_api:
            m.fp32_precision = self.old
        else:
            m.allow_tf32 = self.old


def peaks(device) -> dict:
    """Ceilings measured in this run (once per session): achieved TFLOP/s of a big bf16 and fp32
    (IEEE, and TF32) matrix product and GB/s of a big device copy (bytes read + written).
    On CPU the same at small sizes, one thread."""
    dev = torch.device(device)
    if _PEAKS:
        return _PEAKS
    cuda = dev.type == "cuda"
    n = 8192 if cuda else 256
    copy_numel = (1 << 30) // 4 if cuda else (1 << 22)  # 4 GiB fp32 on GPU (several times L2)
    rounds = 10 if cuda else 3
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False),
                              ("tf32", torch.float32, True)):
        if not cuda and name != "fp32":
            continue
        a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)  # random: zeros run faster
        b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
        with _matmul_tf32(tf32):
            t = median_time(lambda: a @ b, dev, rounds=rounds, warmup=3)
        out[f"matmul_{name}_tflops"] = 2 * n**3 / t / 1e12
        del a, b
    src = torch.randn(copy_numel, device=dev, generator=gen)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), dev, rounds=rounds, warmup=2)
    out["copy_gbps"] = 2 * src.numel() * 4 / t / 1e9
    del src, dst
    out.update(matmul_n=n, copy_bytes=copy_numel * 4 * 2)
    _PEAKS.update(out)
    return _PEAKS


def sync(device) -> None:
    """Wait for queued GPU work so a timed call measures the work, not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_conv_layer(variant: str, channels: int, size: int, batch: int, rate: float, device,
                    *, input_grad: bool = False):
    """(module, x, grad) for one training step of a 3x3 conv layer in one of the benchmark variants.

    ``compact`` is the plain conv; ``collapsed`` / ``chain`` its ExpandedConv2d (same weights,
    ``from_conv``) in that mode; ``collapsed-compile`` the collapsed layer under torch.compile.
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, device=device)
    if variant == "compact":
        module = conv
    else:
        module = lopfast.ExpandedConv2d.from_conv(conv, rate)
        module.mode = "chain" if variant == "chain" else "collapsed"
        if variant == "collapsed-compile":
            module = torch.compile(module)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=input_grad)
    grad = torch.randn(batch, channels, size, size, device=device)
    return module, x, grad


@pytest.fixture(autouse=True)
def _suite_deadline():
    """The GPU suite's time budget (bench/gpu_suite.sh): past ``LOPFAST_BENCH_DEADLINE`` (epoch
    seconds) a benchmark that has not started skips, with the reason in the run's summary,
    instead of the phase running out of time mid-measurement."""
    deadline = os.environ.get("LOPFAST_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the GPU suite's time budget is spent (LOPFAST_BENCH_DEADLINE)")
    yield


def timing(benchmark):
    """The run's timing statistics, or None under ``--benchmark-disable`` (a smoke run that
    executes every benchmark once and records nothing)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats


def pytest_collection_modifyitems(config, items):
    # the issue-10 table first: under the GPU suite's time limit it is what must finish
    # and the torch.compile variants (minutes of compilation) after every other measurement
    items.sort(key=lambda it: (0 if it.nodeid.split("::")[0].endswith("bench_table.py") else 1,
                               "compile" in it.nodeid))


def pytest_collect_file(file_path, parent):
    """Collect bench/bench_*.py (pytest's default pattern is test_*.py only, so
    `pytest bench --benchmark-only` used to find nothing). Applies to this folder only:
    `pytest -q` of tests/ is unaffected."""
    # a file named on the command line is collected by pytest itself already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
