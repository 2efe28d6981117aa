"""lopfast.graphs: the rules every capture of the package follows (capture mode, warm-up on the
capturable path, what a graph keeps alive), checked on CPU through fakes; the GPU test at the end
captures for real while another thread pins host memory."""
import ast
import contextlib
import threading
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda
from lopfast import graphs

ROOT = Path(__file__).resolve().parents[1]


def test_every_capture_leaves_other_threads_free(monkeypatch):
    """Graph.capture asks CUDA for capture_error_mode="thread_local": in the default "global" mode
    a DataLoader's pin-memory thread calling cudaHostAlloc during the capture gets a capture error
    (re-raised at the next batch, past the step's eager fallback)."""
    seen = {}

    class FakeCUDAGraph:
        pass

    @contextlib.contextmanager
    def fake_graph(graph, pool=None, stream=None, capture_error_mode="global"):
        seen["mode"] = capture_error_mode
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: "stream")
    g = graphs.Graph(emulate=False)
    g.capture(lambda: None, outputs=False)
    assert seen["mode"] == "thread_local" == graphs.CAPTURE_ERROR_MODE


def test_no_capture_bypasses_lopfast_graphs():
    """Every capture in the package (step, collapse, dispatch timing) goes through
    lopfast.graphs.Graph, so the capture mode and the keep-alive rule hold for all of them."""
    offenders = []
    for folder in ("lopfast", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "graphs.py" and path.parent.name == "lopfast":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("CUDAGraph", "make_graphed_callables", "graph") \
                        and ast.unparse(node.value) in ("torch.cuda", "cuda"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders


def test_retain_keeps_objects_with_the_graph_being_captured():
    kept = object()
    g = graphs.Graph(emulate=True)
    g.capture(lambda: (graphs.retain(kept), [torch.zeros(1)])[1])
    assert g.retained == [kept]
    graphs.retain(object())  # outside a capture: nothing to attach to
    assert g.retained == [kept]


def test_planned_is_seen_by_every_thread():
    """capture_planned() is process-wide: autograd runs a CUDA backward in its own thread."""
    seen = []
    with graphs.planned():
        t = threading.Thread(target=lambda: seen.append(graphs.capture_planned()))
        t.start()
        t.join()
    assert seen == [True] and not graphs.capture_planned()


@pytest.mark.gpu
@requires_cuda
def test_gpu_capture_while_another_thread_pins_host_memory():
    """A real capture while a thread allocates pinned host memory (what the image-folder loader's
    pin-memory thread does): the capture and its replay succeed."""
    stop = threading.Event()
    errors = []

    def pinner():
        try:
            while not stop.is_set():
                torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
        except Exception as exc:  # pragma: no cover - what global mode does
            errors.append(exc)

    x = torch.randn(256, 256, device="cuda")
    torch.cuda.synchronize(), (x @ x).sum().item()  # cuBLAS set up before the capture
    t = threading.Thread(target=pinner)
    t.start()
    try:
        g = graphs.Graph(emulate=False, stream=torch.cuda.Stream())
        outs = g.capture(lambda: [x @ x for _ in range(200)])  # long enough to overlap the pinning
        g.replay()
        torch.cuda.synchronize()
    finally:
        stop.set()
        t.join()
    assert not errors
    torch.testing.assert_close(outs[-1], x @ x)
