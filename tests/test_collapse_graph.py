"""``CollapsedForward(cuda_graph=True)``: the CPU fallback, and the graph plumbing on CPU.

Without a GPU, ``_emulate`` swaps each CUDA graph for a stand-in with the same aliasing (replay
re-runs the captured function and copies its results into the tensors of the capture), so the
autograd wiring, the fresh gradients, re-capture on new addresses and the fallbacks are tested
here; the real capture and replay run only on a GPU (test at the end).
"""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import requires_cuda

import lopfast


def _net(dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 5, 1),
    ).to(dtype)
    return lopfast.expand(net, rate=2).to(device)


def _train(net, steps, x, accumulate=1, set_to_none=True, crops=1):
    """SGD steps (in-place parameter updates); returns every loss and the final parameters."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for s in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        for a in range(accumulate):
            xs = x[a::accumulate]
            outs = [net(xs.flip(-1) if c else xs) for c in range(crops)]
            loss = sum((o * o).mean() for o in outs)
            loss.backward()
            losses.append(loss.detach())
        opt.step()
    return torch.stack(losses), [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("accumulate,set_to_none,crops", [(1, True, 1), (2, False, 1), (1, True, 2)])
def test_graphed_steps_equal_eager(accumulate, set_to_none, crops):
    """Several optimizer steps through the graph plumbing equal the eager collapse bitwise-close:
    in-place updates reach the replay, gradient accumulation and set_to_none=False accumulate
    into fresh .grad tensors, two forwards per step share the static kernels; one capture."""
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    a, b = _net(), None
    b = copy.deepcopy(a)
    with lopfast.CollapsedForward(a, backend="matmul"):
        want, pa = _train(a, 3, x, accumulate, set_to_none, crops)
    fast = lopfast.CollapsedForward(b, backend="matmul", cuda_graph=True)
    fast._emulate = True
    got, pb = _train(b, 3, x, accumulate, set_to_none, crops)
    assert fast.captures == 1
    static = {g.untyped_storage().data_ptr() for g in fast.graph.grads + fast.graph.out}
    assert all(p.grad.untyped_storage().data_ptr() not in static for p in b.parameters())
    fast.remove()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for u, v in zip(pb, pa):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_recapture_on_new_addresses_and_eager_fallbacks():
    net = _net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fast = lopfast.CollapsedForward(net, cuda_graph=True)
    fast._emulate = True
    net(x).sum().backward()
    net(x).sum().backward()
    assert fast.captures == 1
    layer = fast.layers[0]
    layer.weight2 = nn.Parameter(layer.weight2.detach() * 2)  # a new tensor: new address
    out = net(x)
    assert fast.captures == 2
    fast.cuda_graph = False
    torch.testing.assert_close(out, net(x), rtol=1e-12, atol=1e-12)
    fast.cuda_graph = True
    with torch.no_grad():  # no backward to capture: the eager collapse
        net(x)
    fast.layers[1].mode = "chain"  # another layer set: captured anew
    net(x).sum().backward()
    assert fast.captures == 3
    fast.remove()
    assert fast.graph is None


def test_cpu_model_runs_eager():
    """On a CPU model cuda_graph=True changes nothing: the eager collapse, no capture."""
    net = _net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = copy.deepcopy(net)
    with lopfast.CollapsedForward(ref):
        want = ref(x)
        want.sum().backward()
    with lopfast.CollapsedForward(net, cuda_graph=True) as fast:
        got = net(x)
        got.sum().backward()
        assert fast.captures == 0 and fast.graph is None
    torch.testing.assert_close(got, want)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(TypeError, match="cuda_graph"):
        lopfast.CollapsedForward(net, cuda_graph="yes")


@pytest.mark.gpu
@requires_cuda
def test_gpu_graphed_steps_equal_eager():
    """The real CUDA graphs: captured once, then replayed steps match the eager collapse."""
    x = torch.randn(4, 3, 8, 8, device="cuda")
    a = _net(torch.float32, "cuda")
    b = copy.deepcopy(a)
    with lopfast.CollapsedForward(a):
        want, pa = _train(a, 3, x, accumulate=2, set_to_none=False)
    with lopfast.CollapsedForward(b, cuda_graph=True) as fast:
        got, pb = _train(b, 3, x, accumulate=2, set_to_none=False)
        assert fast.captures == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for u, v in zip(pb, pa):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
