"""Measured backend dispatch (lopfast.dispatch) and the layering of lopfast.backend."""
import ast
import inspect

import lopfast.backend
import lopfast.dispatch


def _lopfast_imports(module):
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("lopfast")}


def test_backend_and_dispatch_import_nothing_above_them():
    # both sit below lopfast.ops (which imports them): any import of an op module is a circle
    for module in (lopfast.backend, lopfast.dispatch):
        allowed = ("lopfast.kernels.", "lopfast._C", "lopfast.backend.", "lopfast._build_flags", "lopfast.graphs",
                   "lopfast.files")
        assert all(n.startswith(allowed) for n in _lopfast_imports(module)), module.__name__


# ----------------------------------------------------------------------------- the machinery, on CPU
# A fake GPU: choose() measures where _tunable says so; the candidates below are plain torch
# functions with known speeds, one of them wrong.
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lopfast import dispatch  # noqa: E402


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "tunable", lambda device: True)
    monkeypatch.setattr(dispatch, "_device_name", lambda device: "FakeGPU 9000")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LOPFAST_CACHE_DIR", raising=False)
    monkeypatch.delenv("LOPFAST_DISPATCH", raising=False)
    monkeypatch.delenv("LOPFAST_DISPATCH_CACHE", raising=False)
    monkeypatch.setattr(dispatch, "ITERS", 3)
    monkeypatch.setattr(dispatch, "WARMUP", 1)
    dispatch.clear()
    yield tmp_path
    dispatch.clear()


def _candidates(calls):
    def slow(x, w):
        calls.append("slow")
        time.sleep(0.004)
        return x @ w

    def fast(x, w):
        calls.append("fast")
        return x @ w

    def wrong(x, w):  # fastest of all, and wrong: must never be chosen
        calls.append("wrong")
        return (x @ w) * 1.01

    def broken(x, w):
        calls.append("broken")
        raise RuntimeError("no kernel for this shape")

    return {"torch": slow, "triton": fast, "wrong": wrong, "broken": broken}


def _args(requires_grad=True):
    x = torch.randn(16, 8, requires_grad=requires_grad)
    return x, torch.randn(8, 4)


def test_choose_keeps_the_fastest_correct_candidate_and_caches_it(fake_gpu):
    calls = []
    args = _args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = dispatch.choose("matmul", ("k", 1), torch.device("cpu"), _candidates(calls), args=args)
    assert name == "triton"
    text = " ".join(str(w.message) for w in caught)
    assert "'wrong' rejected" in text and "'broken' rejected" in text
    (entry,) = dispatch.decisions()
    assert set(entry["times_ms"]) == {"torch", "triton"} and entry["backward"] is True
    assert "relative error" in entry["rejected"]["wrong"] and "no kernel" in entry["rejected"]["broken"]
    # tuning worked on copies: the user's tensors got no gradient
    assert args[0].grad is None
    calls.clear()
    assert dispatch.choose("matmul", ("k", 1), torch.device("cpu"), _candidates(calls), args=args) == "triton"
    assert calls == []  # a cache hit runs nothing


def test_wrong_gradient_is_rejected(fake_gpu):
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(w)
            return x @ w

        @staticmethod
        def backward(ctx, g):
            (w,) = ctx.saved_tensors
            return 2 * g @ w.t(), None

    cands = {"torch": lambda x, w: x @ w, "triton": BadGrad.apply}
    with pytest.warns(RuntimeWarning, match="tensor 0"):
        name = dispatch.choose("badgrad", 1, torch.device("cpu"), cands, args=_args())
    assert name == "torch"


def test_disk_round_trip_and_corrupt_file(fake_gpu):
    calls = []
    dispatch.choose("matmul", (3,), torch.device("cpu"), _candidates(calls), args=_args())
    path = fake_gpu / "lopfast" / "dispatch.json"
    data = json.loads(path.read_text())
    (skey,) = data["entries"]
    assert "FakeGPU 9000" in skey and "matmul" in skey and f"torch {torch.__version__}" in skey
    dispatch.clear()  # a new process: memory empty, the file remains
    calls.clear()
    assert dispatch.choose("matmul", (3,), torch.device("cpu"), _candidates(calls), args=_args()) == "triton"
    assert calls == []
    # a corrupt file is ignored (with a warning) and rewritten by the next measurement
    path.write_text("{not json")
    dispatch.clear()
    dispatch._warned.clear()
    with pytest.warns(RuntimeWarning, match="unreadable cache"):
        assert dispatch.choose("matmul", (3,), torch.device("cpu"), _candidates(calls), args=_args()) == "triton"
    assert "fast" in calls
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_cache_env_off_touches_no_disk(fake_gpu, monkeypatch):
    monkeypatch.setenv("LOPFAST_DISPATCH_CACHE", "0")
    dispatch.choose("matmul", (4,), torch.device("cpu"), _candidates([]), args=_args())
    assert not (fake_gpu / "lopfast").exists()
    assert len(dispatch.decisions()) == 1


def test_env_off_and_force(fake_gpu, monkeypatch):
    calls = []
    monkeypatch.setenv("LOPFAST_DISPATCH", "off")
    assert dispatch.choose("matmul", (5,), torch.device("cpu"), _candidates(calls), args=_args()) == "triton"
    cands = {"torch": lambda x, w: x @ w, "cuda": lambda x, w: x @ w}
    assert dispatch.choose("matmul", (5,), torch.device("cpu"), cands, args=_args()) == "torch"
    assert dispatch.choose("matmul", (5,), torch.device("cpu"), cands, args=_args(), static="cuda") == "cuda"
    monkeypatch.setenv("LOPFAST_DISPATCH", "torch")
    assert dispatch.choose("matmul", (5,), torch.device("cpu"), _candidates(calls), args=_args()) == "torch"
    monkeypatch.setenv("LOPFAST_DISPATCH", "nosuch")
    with pytest.warns(RuntimeWarning, match="not a backend"):
        assert dispatch.choose("matmul", (5,), torch.device("cpu"), _candidates(calls), args=_args()) == "triton"
    assert calls == [] and dispatch.decisions() == []


def test_cpu_runs_the_reference_untimed(monkeypatch):
    calls = []
    monkeypatch.delenv("LOPFAST_DISPATCH", raising=False)
    assert dispatch.choose("matmul", (6,), torch.device("cpu"), _candidates(calls), args=_args()) == "torch"
    assert calls == []
    with pytest.raises(ValueError, match="reference"):
        dispatch.choose("matmul", (6,), torch.device("cpu"), {"triton": None}, args=())


def test_forward_only_under_no_grad(fake_gpu):
    with torch.no_grad():
        dispatch.choose("matmul", (7,), torch.device("cpu"), _candidates([]), args=_args())
    assert dispatch.decisions()[0]["backward"] is False


def test_compile_never_times(fake_gpu):
    calls = []
    cands = _candidates(calls)

    def f(x, w, key):
        name = dispatch.choose("matmul", key, x.device, cands, args=(x, w))
        return x @ w * (2.0 if name == "triton" else 3.0)

    x, w = _args(requires_grad=False)
    # nothing cached: the static default ("triton"), untimed
    out = torch.compile(f, backend="eager", fullgraph=True)(x, w, (8,))
    torch.testing.assert_close(out, x @ w * 2.0)
    assert calls == [] and dispatch.decisions() == []
    # cached eagerly first: the compiled code uses that choice
    dispatch._memory[("FakeGPU 9000", "matmul", (9,))] = {"choice": "torch"}
    torch._dynamo.reset()
    out = torch.compile(f, backend="eager", fullgraph=True)(x, w, (9,))
    torch.testing.assert_close(out, x @ w * 3.0)
    assert calls == []


def test_graph_timing_times_replays_and_is_cached_apart(fake_gpu):
    """Under graph_timing() each candidate is captured once (lopfast.graphs; on CPU its stand-in)
    and its replays are timed: host work a replayed graph never pays (here a sleep outside any
    capture, standing for Python launch cost) does not count, so the launch-bound candidate that
    loses eagerly wins for a captured step; the two choices are cached under separate keys."""
    from lopfast import graphs

    calls = []

    def launch_bound(x, w):
        if not graphs.capturing():
            time.sleep(0.006)  # host launch cost: paid when called eagerly, not by a replay
        calls.append("launch_bound")
        return x @ w

    def device_bound(x, w):
        time.sleep(0.002)  # device work: paid by every replay too
        return x @ w

    cands = {"torch": device_bound, "triton": launch_bound}
    cpu = torch.device("cpu")
    assert dispatch.timing_mode() == "eager"
    assert dispatch.choose("mm", (3,), cpu, cands, args=_args()) == "torch"
    with dispatch.graph_timing():
        assert dispatch.timing_mode() == "graph"
        calls.clear()
        assert dispatch.choose("mm", (3,), cpu, cands, args=_args()) == "triton"
        assert "launch_bound" in calls  # warm-up, correctness check, then replays
    entries = {d["op"]: d for d in dispatch.decisions()}
    assert entries["mm"]["timing"] == "eager" and entries["mm [graph]"]["timing"] == "graph"
    assert entries["mm [graph]"]["times_ms"]["triton"] < entries["mm [graph]"]["times_ms"]["torch"]
    calls.clear()  # both cached: no new measurement in either mode
    assert dispatch.choose("mm", (3,), cpu, cands, args=_args()) == "torch"
    with dispatch.graph_timing():
        assert dispatch.choose("mm", (3,), cpu, cands, args=_args()) == "triton"
    assert calls == []


def test_nothing_is_timed_inside_a_capture(fake_gpu):
    """Inside a capture (here the stand-in's) choose() answers the cached choice or the static
    default and times nothing (a CUDA capture would fail on the timing's synchronisation)."""
    from lopfast import graphs

    calls = []
    cands = _candidates(calls)
    got = []
    g = graphs.Graph(emulate=True)
    g.capture(lambda: got.append(dispatch.choose("mm", (4,), torch.device("cpu"), cands, args=_args())), outputs=False)
    g.replay()
    assert got == ["triton"] and calls == [] and dispatch.decisions() == []


def test_a_candidate_being_timed_measures_nothing_it_calls(fake_gpu):
    """Timing the whole step in two precisions (amp="auto") must not time every op inside it in
    both: a choose() called by a candidate under measurement answers the static default, caches
    nothing and times nothing; the inner op is measured later, once, when it runs for real."""
    inner_calls = []
    inner = {"torch": lambda x, w: (inner_calls.append("torch"), x @ w)[1],
             "triton": lambda x, w: (inner_calls.append("triton"), x @ w)[1]}
    cpu = torch.device("cpu")

    def outer(x, w):
        name = dispatch.choose("inner", ("k",), cpu, inner, args=(x, w))
        return inner[name](x, w)

    assert dispatch.choose("outer", ("k",), cpu, {"torch": outer, "triton": outer}, args=_args()) in ("torch", "triton")
    assert [d["op"] for d in dispatch.decisions()] == ["outer"]
    assert set(inner_calls) == {"triton"}  # the static default ran, nothing else was tried
    inner_calls.clear()
    dispatch.choose("inner", ("k",), cpu, inner, args=_args())  # outside a measurement: measured now
    assert {d["op"] for d in dispatch.decisions()} == {"outer", "inner"} and set(inner_calls) == {"torch", "triton"}


def _measure_in_child(cache, key, log, hold_s):
    """A separate process choosing ``key`` on the fake GPU; its candidates append to ``log`` and
    (the reference) sleep ``hold_s`` (a measurement in progress)."""
    import os

    os.environ["XDG_CACHE_HOME"] = cache
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.pop("LOPFAST_CACHE_DIR", None)
    dispatch.tunable = lambda device: True
    dispatch._device_name = lambda device: "FakeGPU 9000"
    dispatch.ITERS, dispatch.WARMUP = 2, 0
    dispatch.clear()

    def cand(name):
        def fn(x, w):
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {key} {name}\n")
            if name == "torch":
                time.sleep(hold_s)
            return x @ w
        return fn

    dispatch.choose("mm", (key,), torch.device("cpu"), {"torch": cand("torch"), "triton": cand("triton")},
                    args=_args())


@pytest.mark.slow
def test_processes_sharing_the_cache_measure_one_at_a_time_and_lose_no_entry(fake_gpu, tmp_path):
    """Workers started together (lopfast reproduce --parallel) share dispatch.json: a process that
    needs a key another process is measuring waits for it and reads its entry instead of timing it
    again on the same GPU; processes measuring different keys all end up in the file. Slow: three
    spawned processes, each importing torch (10-20 s on a 2-core CPU)."""
    import multiprocessing as mp

    # spawned: a forked child of a process that has run autograd or CUDA cannot use either
    ctx = mp.get_context("spawn")
    log = tmp_path / "calls.log"
    first = ctx.Process(target=_measure_in_child, args=(str(fake_gpu), 1, str(log), 0.4))
    first.start()
    deadline = time.time() + 20
    while not (log.exists() and log.read_text()) and time.time() < deadline and first.is_alive():
        time.sleep(0.02)  # the first process is measuring key 1 now
    others = [ctx.Process(target=_measure_in_child, args=(str(fake_gpu), k, str(log), 0.0)) for k in (1, 2)]
    for p in others:
        p.start()
    for p in [first] + others:
        p.join(60)
        assert p.exitcode == 0
    lines = [line.split() for line in log.read_text().splitlines()]
    assert {pid for pid, key, _ in lines if key == "1"} == {str(first.pid)}  # key 1 timed once, by the first
    entries = json.loads((fake_gpu / "lopfast" / "dispatch.json").read_text())["entries"]
    assert sorted(k.split(" | ")[-1] for k in entries) == ["(1,)", "(2,)"]


def test_shape_key_distinguishes_shape_dtype_layout():
    a = torch.randn(2, 3, 4, 4)
    k = dispatch.shape_key([a], 1)
    assert k == dispatch.shape_key([torch.randn(2, 3, 4, 4)], 1)
    assert k != dispatch.shape_key([a.double()], 1)
    assert k != dispatch.shape_key([a.to(memory_format=torch.channels_last)], 1)
    assert k != dispatch.shape_key([a], 2)
    assert k != dispatch.shape_key([a.requires_grad_()], 1)
    hash(k)
    assert "float32" in repr(k)  # the disk key names the dtype


# ----------------------------------------------------------------------------- wired into the ops
def test_ops_ask_the_dispatch_for_auto(fake_gpu, monkeypatch):
    """On a (fake) GPU, backend="auto" of collapse and sp_loss goes through choose(): the
    reference and, where Triton imports, the Triton kernels (interpreter here) are measured,
    and the result of the op is unchanged."""
    import lopfast
    from lopfast.ops.collapse import collapse_many, reference_collapse

    seen = []
    real = dispatch.choose

    def spy(**kw):
        seen.append((kw["op"], sorted(kw["candidates"])))
        return real(**kw)

    monkeypatch.setattr(dispatch, "choose", spy)
    monkeypatch.setenv("LOPFAST_DISPATCH", "torch")  # no timing of the interpreter: the wiring is the point
    w = [torch.randn(6, 4, 1, 1), torch.randn(6, 6, 3, 3), torch.randn(4, 6, 1, 1)]
    out = collapse_many([(*w, 1)])[0]
    torch.testing.assert_close(out, reference_collapse(*w, 1))
    s, t = [torch.randn(4, 3, 2, 2, requires_grad=True)], [torch.randn(4, 5, 2, 2)]
    loss = lopfast.sp_loss(s, t)
    gt = lopfast.sp_gram(t)
    loss2 = lopfast.sp_loss_from_gram(s, gt)
    torch.testing.assert_close(loss, loss2)
    ops = [op for op, _ in seen]
    assert ops == ["collapse", "sp_loss.loss", "sp_loss.gram", "sp_loss.from_gram"]
    assert all("torch" in names for _, names in seen)
    # an explicit backend is never second-guessed
    seen.clear()
    lopfast.sp_loss(s, t, backend="torch")
    with lopfast.use_backend("torch"):
        collapse_many([(*w, 1)])
    assert seen == []


def test_measured_collapse_and_sp_loss_through_the_interpreter(fake_gpu):
    """The real candidates (reference, Triton through the interpreter) pass the correctness gate
    forward and backward and get timed."""
    pytest.importorskip("triton")
    import lopfast
    from lopfast.ops.collapse import collapse_many
    from lopfast.selfcheck import _interpreter_active

    if not _interpreter_active():
        pytest.skip("Triton on CPU tensors needs the interpreter (on only without CUDA, tests/conftest.py)")

    w = [torch.randn(6, 4, 1, 1, requires_grad=True), torch.randn(6, 6, 3, 3, requires_grad=True),
         torch.randn(4, 6, 1, 1, requires_grad=True)]
    collapse_many([(*w, 1)])[0].sum().backward()
    s, t = [torch.randn(4, 3, 2, 2, requires_grad=True)], [torch.randn(4, 5, 2, 2)]
    lopfast.sp_loss(s, t).backward()
    by_op = {d["op"]: d for d in dispatch.decisions()}
    # the collapse also has its folded-GEMM backend "matmul" (lopfast.ops.collapse_gemm)
    for op, names in (("collapse", {"torch", "matmul", "triton"}), ("sp_loss.loss", {"torch", "triton"})):
        assert set(by_op[op]["times_ms"]) == names, by_op[op]
        assert by_op[op]["rejected"] == {} and by_op[op]["backward"] is True


def test_median_time_is_the_median_of_the_timed_rounds(monkeypatch):
    # fake clock: each fn() call advances it by the next duration; warm-up calls are not timed
    durations = iter([100.0, 100.0, 0.3, 0.1, 0.2, 9.0, 0.4])
    now = [0.0]

    def fn():
        now[0] += next(durations)

    monkeypatch.setattr(dispatch.time, "perf_counter", lambda: now[0])
    assert dispatch.median_time(fn, "cpu", rounds=5, warmup=2) == pytest.approx(0.3)
    # the budget stops timing after two rounds once spent
    durations = iter([1.0, 2.0, 3.0])
    assert dispatch.median_time(fn, "cpu", rounds=3, warmup=0, budget_s=0.5) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="rounds"):
        dispatch.median_time(fn, "cpu", rounds=0)


def test_cache_key_names_the_installed_versions():
    from lopfast.backend import triton_available, triton_version

    v = triton_version()
    assert (v is None) == (not triton_available())
    assert dispatch._versions() == f"torch {torch.__version__}, triton {v or 'none'}"
