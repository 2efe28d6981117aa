"""Benchmark setup shared by bench/bench_*.py (run with `pytest bench --benchmark-only`).

Sizes: ``LOPFAST_BENCH_SIZE=full`` runs the shapes of the issues (meant for a GPU);
the default ``small`` keeps every benchmark to seconds on a laptop CPU.
"""
import os

import pytest
import torch
import torch.nn as nn

import lopfast

BENCH_SIZE = os.environ.get("LOPFAST_BENCH_SIZE", "full" if torch.cuda.is_available() else "small")


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


def timing(benchmark):
    """The run's timing statistics, or None under ``--benchmark-disable`` (a smoke run that
    executes every benchmark once and records nothing)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats
