"""Per-shape-class routing of ``collapse_many`` under the measured dispatch, on a faked GPU.

``lopfast.dispatch.tunable`` and ``_device_name`` are patched (as in tests/test_dispatch.py), so
CPU tensors take the code path ``backend="auto"`` takes on CUDA: one ``choose`` per shape
class, every class that chose "triton" in one grouped call. Results are checked against the
float64 reference forward and backward with the rule of tests/test_collapse.py.
"""
import time

import pytest
import torch

from conftest import HAS_TRITON

import lopfast
from lopfast import dispatch
from lopfast.ops import collapse as op
from lopfast.ops.collapse_gemm import shape_class

from test_collapse import _assert_close, _atol, _factors, _run

# (G, n_g, m_g, p_g, q_g, kh, kw): a "large" class (two layers) and two small ones
BIG = (1, 24, 20, 40, 48, 3, 3)
SMALL_A = (1, 5, 4, 8, 9, 3, 3)
SMALL_B = (2, 3, 2, 4, 5, 1, 3)
CASES = [BIG, SMALL_A, BIG, SMALL_B]


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "tunable", lambda device: True)
    monkeypatch.setattr(dispatch, "_device_name", lambda device: "FakeGPU 9000")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for var in ("LOPFAST_CACHE_DIR", "LOPFAST_DISPATCH", "LOPFAST_DISPATCH_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dispatch, "ITERS", 3)
    monkeypatch.setattr(dispatch, "WARMUP", 1)
    dispatch.clear()
    yield tmp_path
    dispatch.clear()


def _layers(dtype=torch.float32):
    """Factor tuples as collapse_many sees them (leaves requiring grad), grouped by class."""
    work = [(_factors(c, dtype, "cpu", seed=i), c[0]) for i, c in enumerate(CASES)]
    layers = [(*[w.requires_grad_() for w in ws], G) for ws, G in work]
    by_class = {}
    for i, (w1, w2, w3, G) in enumerate(layers):
        by_class.setdefault(shape_class(w1, w2, w3, G), []).append(i)
    return work, layers, list(by_class.values())


def _spy_runs(monkeypatch):
    runs = []
    real = op._run

    def spy(name, layers, *dtype):
        runs.append((name, len(layers)))
        return real(name, layers, *dtype)

    monkeypatch.setattr(op, "_run", spy)
    return runs


def _check_against_fp64(work, backend, runs, dtype=torch.float32):
    """Runs ``backend`` on ``work`` and compares; returns the routed calls of that run only."""
    runs.clear()
    k_out, k_grad = _run(work, backend)
    routed = list(runs)
    r_out, r_grad = _run([([w.double() for w in ws], G) for ws, G in work], "torch")
    t_out, t_grad = _run(work, "torch")
    for a, t, r in zip(k_out + k_grad, t_out + t_grad, r_out + r_grad):
        assert a.dtype == dtype and a.shape == r.shape
        _assert_close(a, t, r, _atol(dtype), f"{backend}")
    return routed


def test_auto_routes_each_class_to_its_cached_choice(fake_gpu, monkeypatch):
    """Choices made per class (here planted in the cache): the big class on "matmul", the two
    small ones on the grouped Triton path in ONE call (or the reference without Triton);
    forward and every factor gradient match the float64 reference."""
    small = "triton" if "triton" in op.available_backends(torch.device("cpu"), torch.float32) else "torch"
    work, layers, classes = _layers()
    assert [len(c) for c in classes] == [2, 1, 1]
    plan = {0: "matmul", 1: small, 2: small}
    for k, idx in enumerate(classes):
        key = dispatch.shape_key([layers[i] for i in idx])
        dispatch._memory[("FakeGPU 9000", "collapse", key)] = {"choice": plan[k]}
    assert op.route(layers) == {"matmul": [0, 2], small: [1, 3]}
    launches = []
    if small == "triton":  # count the grouped kernel's launches (the spy of test_triton_launch_counts)
        real_wrap = op._wrap()

        def counting(kernel):
            wrapped = real_wrap(kernel)

            class Counting:
                def __getitem__(self, grid):
                    launches.append(grid)
                    return wrapped[grid]

            return Counting()

        monkeypatch.setattr(op, "_wrap", lambda: counting)
    runs = _spy_runs(monkeypatch)
    assert _check_against_fp64(work, None, runs) == [("matmul", 2), (small, 2)]
    if small == "triton":  # both small classes (one order, unaligned): 2 launches forward, 4 backward
        assert len(launches) == 6  # the small classes share one grouped call


def test_auto_measures_each_class(fake_gpu, monkeypatch):
    """The routing follows real measurements: candidates whose speed depends on the class
    (the reference slow on big classes, the folded GEMMs slow on small ones) split the model;
    one decision per class, cached, and a second call measures nothing."""
    real = op._auto_candidates(torch.device("cpu"), torch.float32)

    def big(ls):
        return ls[0][1].shape[0] >= 40

    def ref(ls):
        time.sleep(0.01 if big(ls) else 0.0)
        return real["torch"](ls)

    def mm(ls):
        time.sleep(0.0 if big(ls) else 0.01)
        return real["matmul"](ls)

    monkeypatch.setattr(op, "_auto_candidates", lambda device, dtype, *compute: {"torch": ref, "matmul": mm})
    work, layers, classes = _layers()
    assert op.route(layers) == {"matmul": [0, 2], "torch": [1, 3]}
    decided = dispatch.decisions()
    assert len(decided) == 3 and all(d["op"] == "collapse" and d["backward"] for d in decided)
    seen = []
    monkeypatch.setattr(dispatch, "_measure", lambda *a: seen.append(a) or "torch")
    runs = _spy_runs(monkeypatch)
    assert _check_against_fp64(work, "auto", runs) == [("matmul", 2), ("torch", 2)]
    assert seen == []


@pytest.mark.parametrize("backend", ["torch", "matmul"] + (["triton"] if HAS_TRITON else []))
def test_explicit_backend_takes_every_layer(fake_gpu, monkeypatch, backend):
    """backend="torch"/"matmul"/"triton" (argument or use_backend) means exactly that: no
    measurement, one route for all classes."""
    if backend not in op.available_backends(torch.device("cpu"), torch.float32):
        pytest.skip(f"no {backend} backend on this machine")
    monkeypatch.setattr(dispatch, "choose", lambda **kw: pytest.fail("an explicit backend was measured"))
    work, layers, _ = _layers()
    assert op.route(layers, backend) == {backend: [0, 1, 2, 3]}
    runs = _spy_runs(monkeypatch)
    assert _check_against_fp64(work, backend, runs) == [(backend, 4)]
    runs.clear()
    if backend in lopfast.backend.BACKENDS:
        with lopfast.use_backend(backend):
            lopfast.collapse_many(layers)
        assert runs == [(backend, 4)]


def test_fp64_triton_choice_runs_on_matmul(fake_gpu, monkeypatch):
    """Triton forced in fp64 runs the folded GEMMs on torch.matmul: fp64 is never a Triton
    candidate (no fp64 tl.dot on sm_90), so the forced name falls back to the static default."""
    monkeypatch.setenv("LOPFAST_DISPATCH", "triton")
    monkeypatch.setattr(op, "resolve_backend", lambda *a: "triton")  # the static default on CUDA
    _, layers, _ = _layers(torch.float64)
    assert "triton" not in op._auto_candidates(layers[0][0].device, torch.float64)
    with pytest.warns(RuntimeWarning, match="not a backend of collapse"):
        assert op.route(layers) == {"matmul": [0, 1, 2, 3]}


def test_cpu_auto_is_the_reference_untimed(monkeypatch):
    monkeypatch.setattr(dispatch, "choose", lambda **kw: pytest.fail("CPU must not measure"))
    _, layers, _ = _layers()
    assert op.route(layers) == {"torch": [0, 1, 2, 3]}


# ----------------------------------------------------------------------------- memory of "matmul"
def _saved_bytes(fn, layers):
    """Bytes autograd keeps for the backward of ``fn(layers)`` beyond the factors themselves."""
    params = {w.untyped_storage().data_ptr() for layer in layers for w in layer[:3]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = fn(layers)
    return sum(seen.values()), outs


def test_matmul_keeps_only_the_intermediate():
    """The eager "matmul" backward rebuilds the canonical copies of the factors (W2 with its
    taps moved, the stacked W1/W3) instead of saving them: autograd keeps exactly the
    intermediates S/U; plain autograd of the same GEMMs keeps the copies too. Same results."""
    from lopfast.ops.collapse_gemm import bucket, matmul_many

    work, layers, _ = _layers(torch.float64)
    inter = sum(len(idx) * c.inter_numel * 8 for (c, _, _), idx in bucket(layers).items())
    # the canonical copies: W2 of every layer, W1 and W3 where a class stacks several (BIG)
    copies = sum(layer[1].numel() * 8 for layer in layers)
    copies += sum((layers[i][0].numel() + layers[i][2].numel()) * 8 for i in (0, 2))
    lean, out_lean = _saved_bytes(lambda ls: matmul_many(ls), layers)
    plain, out_plain = _saved_bytes(lambda ls: matmul_many(ls, recompute=False), layers)
    assert lean == inter
    assert plain >= inter + copies
    g = [torch.randn_like(o) for o in out_lean]
    params = [w for layer in layers for w in layer[:3]]
    for a, b in zip(torch.autograd.grad(out_lean, params, g), torch.autograd.grad(out_plain, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(out_lean, out_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_shape_class_is_memoised_by_shapes_and_still_checks():
    from lopfast.ops.collapse_gemm import shape_class

    w1, w2, w3 = torch.randn(12, 4, 1, 1), torch.randn(18, 6, 3, 3), torch.randn(8, 9, 1, 1)
    c = shape_class(w1, w2, w3, 2)
    assert (c.G, c.n, c.m, c.p, c.q, c.kh, c.kw) == (2, 4, 4, 6, 9, 3, 3)
    assert shape_class(w1.clone(), w2.clone(), w3.clone(), 2) is c  # same shapes: the same object
    for bad in (3, 0):  # errors are never cached
        for _ in range(2):
            with pytest.raises(ValueError, match=f"inconsistent chain shapes for groups={bad}"):
                shape_class(w1, w2, w3, bad)


def _small_expanded_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3, padding=1))
    return lopfast.expand(net, rate=2, generator=torch.Generator().manual_seed(0))


def test_training_and_evaluation_keep_one_program_each(fake_gpu, monkeypatch):
    """A captured step routes the collapse in "graph" timing, evaluate() (eager, no grad) ran in
    eager timing: the program, whose context holds the timing mode, was rebuilt and re-routed
    twice per epoch. One program per context now: three epochs build two, measure each class
    once per mode."""
    real = op._auto_candidates(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(op, "_auto_candidates",
                        lambda device, dtype, *compute: {k: real[k] for k in ("torch", "matmul")})
    net = _small_expanded_net()
    fast = lopfast.CollapsedForward(net)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        with dispatch.graph_timing():
            net(x).square().mean().backward()
        with torch.no_grad():
            net(x)
    assert fast.programs == 2
    ops = [d["op"] for d in dispatch.decisions()]
    assert ops.count("collapse") == ops.count("collapse [graph]") == 2 == len(ops) // 2  # 2 shape classes
    fast.remove()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_a_captured_collapse_keeps_its_plan_tables_alive(monkeypatch):
    """The grouped collapse reads its plan's device tables at every replay of a graph that captured
    it: however many other plans the cache sees afterwards (it used to clear itself past 256),
    those tables live as long as the graph."""
    import gc
    import weakref

    from lopfast import graphs
    from lopfast.kernels.collapse import ClassSpec

    monkeypatch.setattr(op, "_plan_cache", {})
    layers = [(*ws, G) for ws, G in [(_factors(SMALL_A, torch.float32, "cpu", seed=0), SMALL_A[0])]]
    g = graphs.Graph(emulate=True)
    g.capture(lambda: op.collapse_many(layers, backend="triton"))
    (plan,) = op._plan_cache.values()
    tables = weakref.ref(plan.tables)
    del plan
    for i in range(300):  # other models' plans
        op._get_plan((ClassSpec(1, 1, 1, 1, 1, 1, 1 + i, False),), torch.device("cpu"))
    gc.collect()
    assert tables() is not None and len(op._plan_cache) <= 256
    g.replay()
