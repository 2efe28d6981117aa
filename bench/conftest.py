"""Benchmark setup shared by bench/bench_*.py (run with `pytest bench --benchmark-only`).

Sizes: ``LOPFAST_BENCH_SIZE=full`` runs the shapes of the issues (meant for a GPU);
the default ``small`` keeps every benchmark to seconds on a laptop CPU.
"""
import os

import pytest
import torch

BENCH_SIZE = os.environ.get("LOPFAST_BENCH_SIZE", "full" if torch.cuda.is_available() else "small")


def sync(device) -> None:
    """Wait for queued GPU work so a timed call measures the work, not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
