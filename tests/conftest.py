"""Shared test setup.

Without a GPU the Triton kernels run through Triton's CPU interpreter; the switch must be set
before any kernel module is imported (triton.jit reads it at decoration time).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

# CI runs the property tests on a fixed sequence of examples, so a red build is reproducible;
# locally hypothesis explores new ones each run.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def no_training(monkeypatch):
    """The checks must refuse before any stage trains: reaching the training loop fails the test."""
    from lopfast.pipeline import stages

    def boom(*a, **k):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(stages, "train", boom)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny convs on a small shared machine spend far
    more time handing work between threads than computing."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def device():
    """Where kernel tests put their tensors: the GPU when there is one, else the CPU (where the
    Triton kernels run through the interpreter, TRITON_INTERPRET=1 above)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
