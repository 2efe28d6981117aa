"""The training-step engine (lopfast.pipeline.step): captured == eager, the schedule on the
device, the short batch, resume, divergence, the capture decision, amp by measurement.

On CPU the capture runs through lopfast.graphs' stand-in (``step.EMULATE``): the static batch
buffers, the in-place state, the device lr and step counter, the replays and the eager short
batch are exercised exactly as on a GPU; only the CUDA graph itself is not. The GPU tests at
the end run the real capture.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import requires_cuda
from test_dispatch import fake_gpu  # noqa: F401  (the fake-GPU fixture of the dispatch tests)

import lopfast
from lopfast import dispatch
from lopfast.pipeline import step as st
from lopfast.pipeline.data import TensorLoader, load_data
from lopfast.pipeline.models import build_model
from lopfast.pipeline.schedule import lr_factors
from lopfast.io import save_checkpoint
from lopfast.pipeline.train import TrainConfig, load_checkpoint, train


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setattr(st, "EMULATE", True)


def _data(n=200, batch=64, seed=3):
    return load_data("digits", batch_size=batch, train_subset=n, test_subset=64, seed=seed)


def _lop(teacher_seed=0):
    """A distillation setup: an expanded digitsnet student (BatchNorm, expanded convs) and a teacher."""
    torch.manual_seed(teacher_seed)
    teacher = build_model("digitsnet", width=8).eval()
    student = lopfast.expand(build_model("digitsnet", width=8), 2.0, generator=torch.Generator().manual_seed(1))
    return student, teacher


def _state(model):
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("distill", [False, True])
def test_captured_training_equals_eager_bitwise(emulate, distill):
    """Three epochs (4 batches each, the last one short) captured through the stand-in equal the
    eager step bitwise: losses of every epoch and every weight and buffer."""
    out = {}
    for capture in ("off", "auto"):
        student, teacher = _lop()
        logs = []
        res = train(student, _data(), TrainConfig(3, 0.05, (2,), seed=5, gamma=10.0 if distill else 0.0,
                                                  capture=capture, nesterov=True, label_smoothing=0.1),
                    teacher=teacher if distill else None, log=logs.append)
        out[capture] = ([h["train_loss"] for h in res["history"]], [h["sp_loss"] for h in res["history"]],
                        _state(student), logs[0])
    (la, sa, wa, say_a), (lb, sb, wb, say_b) = out["off"], out["auto"]
    assert "eager (capture='off')" in say_a and "captured as one CUDA graph" in say_b
    assert la == lb and sa == sb
    for u, v in zip(wa, wb):
        assert torch.equal(u, v)


def test_capture_compile_trains_as_eager_does():
    """capture="compile" (torch.compile of the model, mode="reduce-overhead") through the whole
    train(): same losses and weights as the eager step up to the compiled kernels' rounding. On
    CPU this checks the wiring (compiled distillation hooks, the engine around a compiled model);
    the CUDA graphs inductor adds on a GPU are the GPU benchmark's business."""
    out = {}
    for capture in ("off", "compile"):
        student, teacher = _lop()
        logs = []
        res = train(student, _data(), TrainConfig(2, 0.05, (1,), seed=5, gamma=10.0, capture=capture),
                    teacher=teacher, log=logs.append)
        out[capture] = ([h["train_loss"] for h in res["history"]], [h["sp_loss"] for h in res["history"]],
                        _state(student), logs[0])
    (la, sa, wa, say_a), (lb, sb, wb, say_b) = out["off"], out["compile"]
    assert "capture='compile'" in say_b
    assert la == pytest.approx(lb, rel=1e-5) and sa == pytest.approx(sb, rel=1e-4)
    for u, v in zip(wa, wb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def _engine(model, cfg, data, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    return st.TrainStep(model, opt, cfg, "cpu", steps_per_epoch=len(data.train), **kw), opt


def test_graph_plumbing_warm_up_capture_replays_and_short_batch(emulate):
    """2 eager warm-up steps, one capture, then replays for full batches; the short batch of every
    epoch runs eagerly; the replays read the batch copied into the static buffers (a replay that
    missed the copy would train on a stale batch, and the weights would differ from eager)."""
    data = _data(200, 64)  # 64, 64, 64, 8
    torch.manual_seed(0)
    model = build_model("digitsnet", width=8)
    ref = copy.deepcopy(model)
    cfg = TrainConfig(3, 0.05, (1, 2), seed=5)
    eng, _ = _engine(model, cfg, data)
    eng_ref, _ = _engine(ref, TrainConfig(3, 0.05, (1, 2), seed=5, capture="off"), data)
    assert eng.captures and not eng_ref.captures
    for epoch in range(3):
        eng.begin_epoch(), eng_ref.begin_epoch()
        for x, y, gbs in data.train.epoch(epoch):
            eng(x, y, gbs)
            eng_ref(x, y, gbs)
        a, b = eng.end_epoch(), eng_ref.end_epoch()
        assert a == b and a["finite"] and a["batches"] == 4
    assert eng.warm == st.WARMUP and eng.graph is not None
    assert eng.replays == 9 - st.WARMUP and eng.eager_steps == st.WARMUP + 3  # 3 short batches
    assert eng.steps == 12 and int(eng.step_t) == 12
    assert eng.static_x.shape[0] == 64
    for u, v in zip(_state(model), _state(ref)):
        assert torch.equal(u, v)


def test_after_update_runs_inside_every_step_captured_or_eager(emulate):
    """The step's after-update functions run once per step, after the update, in the warm-up, the
    captured replays and the short batch alike (device work: a replay runs it without Python)."""
    data = _data(200, 64)  # 64, 64, 64, 8
    torch.manual_seed(0)
    model = build_model("digitsnet", width=8)
    counts, seen = torch.zeros(1), torch.zeros(1)
    weight = next(model.parameters())

    def after():
        counts.add_(1)
        seen.copy_(weight.detach().flatten()[:1])  # the updated weight, not the one before the step

    eng, _ = _engine(model, TrainConfig(2, 0.05, (), seed=5), data, after_update=[after])
    for epoch in range(2):
        eng.begin_epoch()
        for x, y, gbs in data.train.epoch(epoch):
            eng(x, y, gbs)
        eng.end_epoch()
    assert eng.replays > 0 and int(counts) == 8 and float(seen) == float(weight.detach().flatten()[0])


def test_sgd_with_device_lr_matches_torch_sgd_and_multistep(emulate):
    """The engine's SGD (lr from the device table) equals torch.optim.SGD + MultiStepLR stepped per
    epoch, with weight decay, Nesterov and label smoothing, captured or not."""
    data = _data(192, 64)
    for nesterov in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        ref = copy.deepcopy(model)
        cfg = TrainConfig(3, 0.1, (1, 2), lr_decay=0.5, seed=1, nesterov=nesterov, label_smoothing=0.2)
        eng, _ = _engine(model, cfg, data)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1, 2], gamma=0.5)
        for epoch in range(3):
            for x, y, gbs in data.train.epoch(epoch):
                eng(x, y, gbs)
                opt.zero_grad()
                F.cross_entropy(ref(x), y, label_smoothing=0.2).backward()
                opt.step()
            assert eng.lr() == pytest.approx(opt.param_groups[0]["lr"])  # the lr of this epoch's steps
            sched.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_of_a_captured_run_is_bit_identical(emulate, tmp_path):
    def run(interrupt=None, resume=False):
        student, teacher = _lop()
        ck = str(tmp_path / "ck.pt") if interrupt is not None or resume else str(tmp_path / "full.pt")

        def stop(epoch, rec):
            if interrupt is not None and epoch == interrupt:
                raise KeyboardInterrupt

        try:
            train(student, _data(), TrainConfig(3, 0.05, (1,), seed=5, gamma=10.0), teacher=teacher,
                  checkpoint=ck, resume=resume, on_epoch_end=stop)
        except KeyboardInterrupt:
            return None
        return student

    full = run()
    assert run(interrupt=0) is None
    ck = load_checkpoint(str(tmp_path / "ck.pt"))
    assert ck["step"] == 4 and ck["amp"] == "off" and "momentum_buffer" in str(ck["optimizer"])
    resumed = run(resume=True)
    for u, v in zip(_state(full), _state(resumed)):
        assert torch.equal(u, v)


def test_divergence_in_the_weights_of_the_last_epoch_is_caught(emulate, tmp_path):
    """A weight or BatchNorm statistic that turns infinite while the training loss stays finite
    (here: a running variance, set by a hook in the last epoch) stops the stage with its name and
    epoch, and the checkpoint of the last good epoch is kept."""
    data = _data(128, 64)
    torch.manual_seed(0)
    model = build_model("digitsnet", width=8)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    epochs_seen = []

    def poison(mod, args, out):
        if len(epochs_seen) == 1:
            mod.running_var.data[0] = float("inf")  # as a diverging update of the statistics would

    bn.register_forward_hook(poison)
    ck = str(tmp_path / "ck.pt")
    with pytest.raises(RuntimeError, match=r"\[ft\] training diverged in epoch 2/2: bn1\.running_var is NaN or infinite .*ck\.pt \(epoch 1\), is kept"):
        train(model, data, TrainConfig(2, 0.05, (), seed=5), checkpoint=ck, desc="ft",
              on_epoch_end=lambda e, r: epochs_seen.append(e))
    assert epochs_seen == [0] and load_checkpoint(ck)["epoch"] == 0


def test_capture_failure_names_its_first_cause(emulate, monkeypatch):
    """CUDA reports a failed capture at its end ("operation failed due to a previous error during
    capture"); the step's message names the error that broke it (the host sync), not only that."""
    def failing(self, fn, outputs=True):
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n(x.item())")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(st.Graph, "capture", failing)
    data = _data(128, 64)
    torch.manual_seed(0)
    logs = []
    eng, _ = _engine(build_model("digitsnet", width=8), TrainConfig(3, 0.05), data, log=logs.append)
    for _ in range(st.WARMUP + 2):
        x, y, gbs = next(iter(data.train.epoch(0)))
        eng(x, y, gbs)
    assert eng.graph is None and eng.eager_steps == st.WARMUP + 2
    said = [s for s in logs if "eager from now on" in s]
    assert len(said) == 1 and "not permitted when stream is capturing" in said[0]
    assert "previous error during capture" in said[0]  # what CUDA said last, after the cause


def test_warm_up_steps_launch_the_kernels_the_capture_records(emulate, monkeypatch):
    """The SP loss has an eager-only launch path (the device-side pair table; a capture records the
    per-pair launches): the eager warm-up steps of a captured step must take the capture's path,
    so that every kernel the graph records was compiled and loaded before the capture. Here the
    table is on wherever it can run (the GPU's auto at >= 9 pairs) and the stand-in reports a
    capture to the kernels as CUDA does."""
    from lopfast import graphs
    from lopfast.kernels import sp_gram as K

    monkeypatch.setattr(K, "USE_TABLE", True)
    monkeypatch.setattr(K, "_stream_capturing", graphs.capturing)
    K.clear_table_cache()
    student, teacher = _lop()
    data = _data(128, 64)
    cfg = TrainConfig(1, 0.05, (), gamma=10.0)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    launched = []
    with lopfast.SPDistiller(teacher, student, backend="triton") as d:
        eng = st.TrainStep(student, opt, cfg, "cpu", steps_per_epoch=4, distiller=d)
        x, y, gbs = next(iter(data.train.epoch(0)))
        for _ in range(st.WARMUP + 2):
            before = dict(K.LAUNCHES)
            eng(x, y, gbs)
            launched.append({k for k, v in K.LAUNCHES.items() if v != before.get(k, 0) and "table_" not in k})
    assert eng.replays == 2
    warm, replays = launched[:st.WARMUP], launched[st.WARMUP:]
    assert all(w == replays[0] for w in warm + replays), launched
    assert "gram" in replays[0] and not any("table" in k for k in replays[0])


def test_evaluation_reuses_the_captured_steps_collapse_routing(emulate, fake_gpu, monkeypatch):
    """evaluate() between epochs ran the collapse in eager timing: a second program, its shape
    classes measured again eagerly. It now runs in the step's timing mode: every collapse choice
    of the run is the captured step's."""
    from lopfast.ops import collapse as op

    real = op._auto_candidates(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(op, "_auto_candidates",
                        lambda device, dtype, *compute: {k: real[k] for k in ("torch", "matmul")})
    student = lopfast.expand(build_model("digitsnet", width=8), 2.0, generator=torch.Generator().manual_seed(1))
    res = train(student, _data(128, 64), TrainConfig(2, 0.05, ()))
    ops = {d["op"] for d in dispatch.decisions()}
    assert "collapse [graph]" in ops and "collapse" not in ops and len(res["history"]) == 2


def test_distiller_step_indexes_with_no_host_data_after_its_first_call():
    """A paired layer that runs in the teacher only (here in eval mode only) is left out of the
    student's loss by indexing the teacher Grams; with a Python list that index is host data
    copied to the device at every step, which a captured step cannot do. After the first (eager)
    call the index is a device tensor made once."""
    from torch.overrides import TorchFunctionMode

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            x = self.a(x)
            return self.c(x if self.training else self.b(x)).mean((2, 3))

    class HostIndex(TorchFunctionMode):
        seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__getitem__ and isinstance(args[1], (list, tuple)):
                HostIndex.seen.append(args[1])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    teacher, student = Net().eval(), lopfast.expand(Net(), 2.0).train()
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match="left out"):
        d = lopfast.SPDistiller(teacher, student)
        _, first = d(x)
    with HostIndex():
        _, again = d(x)
    d.close()
    assert d.dropped == ["b"] and HostIndex.seen == [] and torch.equal(first, again)


def test_eager_reasons_are_said_once():
    data = _data(128, 64)
    torch.manual_seed(0)
    model = build_model("digitsnet", width=8)
    logs = []
    train(model, data, TrainConfig(1, 0.05, ()), log=logs.append)
    assert sum("step:" in s for s in logs) == 1 and "eager (the device is cpu" in logs[0]
    cum = build_model("digitsnet", width=8)
    next(m for m in cum.modules() if isinstance(m, nn.BatchNorm2d)).momentum = None
    assert "momentum=None" in st._eager_reasons(cum, TrainConfig(1, 0.1), torch.device("cuda"), 1)
    assert "DDP" in st._eager_reasons(model, TrainConfig(1, 0.1), torch.device("cuda"), 2)
    assert st._eager_reasons(model, TrainConfig(1, 0.1), torch.device("cuda"), 1) is None
    assert "compile" in st._eager_reasons(model, TrainConfig(1, 0.1, capture="compile"), torch.device("cuda"), 1)
    with pytest.raises(ValueError, match="capture must be one of"):
        TrainConfig(1, 0.1, capture="yes")
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        TrainConfig(1, 0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(1, 0.1, label_smoothing=1.0)


def test_schedule_table_is_multistep_per_epoch():
    cfg = TrainConfig(5, 0.1, (2, 4), lr_decay=0.1)
    f = lr_factors(cfg, 3)
    assert f.dtype == torch.float64 and f.shape == (15,)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4], gamma=0.1)
    for epoch in range(5):
        assert f[3 * epoch:3 * epoch + 3].tolist() == pytest.approx([opt.param_groups[0]["lr"]] * 3)
        sched.step()
    warm = lr_factors(TrainConfig(2, 0.1, warmup_epochs=1.0), 4)
    assert warm.tolist() == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_factors(cfg, 0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(1, 0.1, schedule="nope")  # refused when the config is made, not mid-run


def test_the_step_is_past_the_schedule_is_an_error():
    data = _data(128, 64)
    model = build_model("digitsnet", width=8)
    eng, _ = _engine(model, TrainConfig(1, 0.05), data)
    for x, y, gbs in data.train.epoch(0):
        eng(x, y, gbs)
    with pytest.raises(RuntimeError, match="past the schedule"):
        eng(x, y, gbs)


# ----------------------------------------------------------------------------- amp by measurement
def test_amp_auto_is_off_on_cpu():
    data = _data(128, 64)
    logs = []
    train(build_model("digitsnet", width=8), data, TrainConfig(1, 0.05, ()), log=logs.append)
    assert "amp off" in logs[0] and not any("amp=auto" in s for s in logs)


@pytest.mark.parametrize("captured", [False, True])
def test_amp_auto_measures_once_caches_and_says(fake_gpu, monkeypatch, captured):
    """On a (faked) GPU amp='auto' times the step's forward and backward in both precisions (as
    graph replays when the step will be captured), keeps the faster, prints it with the times; the
    choice is cached (memory and the dispatch's file), a second run measures nothing; the timing
    leaves weights, BatchNorm statistics, gradients and the random stream as they were."""
    monkeypatch.setattr(st, "EMULATE", captured)
    data = _data(128, 64)
    torch.manual_seed(0)
    model = build_model("digitsnet", width=8)
    cfg = TrainConfig(1, 0.05, ())
    eng, _ = _engine(model, cfg, data, log=(logs := []).append)
    x, y, gbs = next(iter(data.train.epoch(0)))
    calls = []
    real = st.TrainStep._loss

    def counting(self, x, y, gbs, amp):
        calls.append(amp)
        return real(self, x, y, gbs, amp)

    monkeypatch.setattr(st.TrainStep, "_loss", counting)
    before = _state(model)
    rng = torch.get_rng_state()
    assert eng.captures == captured
    choice = eng.choose_amp(x, y, gbs)
    assert choice == eng.amp and set(calls) == {"off", "bf16"}
    (entry,) = dispatch.decisions()
    assert entry["timing"] == ("graph" if captured else "eager") and entry["op"].startswith("amp")
    assert choice == min(entry["times_ms"], key=entry["times_ms"].get)  # the faster one
    assert f"amp=auto: {'fp32' if choice == 'off' else 'bf16 autocast'} (measured: fp32" in logs[-1]
    for u, v in zip(before, _state(model)):
        assert torch.equal(u, v)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert (fake_gpu / "lopfast" / "dispatch.json").exists()
    calls.clear()
    eng2, _ = _engine(copy.deepcopy(model), cfg, data)
    assert eng2.choose_amp(x, y, gbs) == choice and calls == []  # cached


def test_amp_choice_is_kept_on_resume(tmp_path, monkeypatch):
    """The amp of a run is stored in its checkpoint and a resumed run keeps it (no new measurement)."""
    data = _data(128, 64)
    ck = str(tmp_path / "ck.pt")
    model = build_model("digitsnet", width=8)

    def stop(epoch, rec):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, data, TrainConfig(2, 0.05, ()), checkpoint=ck, on_epoch_end=stop)
    saved = load_checkpoint(ck)
    saved["amp"] = "bf16"  # as a GPU run that chose bf16 would have stored it
    save_checkpoint(saved, ck)
    monkeypatch.setattr(st.TrainStep, "choose_amp", lambda *a: pytest.fail("a resumed run must not re-measure"))
    logs = []
    res = train(build_model("digitsnet", width=8), data, TrainConfig(2, 0.05, ()), checkpoint=ck, resume=True,
                log=logs.append)
    assert res["history"][-1]["epoch"] == 2 and any("amp bf16" in s for s in logs)


# ----------------------------------------------------------------------------- GPU
def _gpu_equal(net: str, steps: int = 6, batch: int = 64):
    """(eager, captured) losses and weights after ``steps`` lop steps (expanded r=3 student, SP from the
    teacher, CollapsedForward), same data, same start, the same backends in both (the grouped Triton
    collapse and the reference SP loss forced: the dispatch's eager and graph timings may otherwise
    choose differently) and cuDNN deterministic."""
    from lopfast.pipeline.models import build_model as bm

    torch.manual_seed(0)
    teacher = bm(net).cuda().eval()
    student0 = lopfast.expand(teacher, 3.0)  # a deep copy, expanded on the GPU
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (batch * steps, 3, 32, 32), generator=g, dtype=torch.uint8).cuda()
    labels = torch.randint(0, 10, (batch * steps,), generator=g).cuda()
    loader = TensorLoader(imgs, labels, (0.5,) * 3, (0.25,) * 3, batch, train=True, crop_pad=4, flip=True,
                          channels_last=True)
    out = {}
    det = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        for capture in ("off", "auto"):
            out[capture] = _gpu_run(student0, teacher, loader, capture, steps)
    finally:
        torch.backends.cudnn.deterministic = det
    return out


def _gpu_run(student0, teacher, loader, capture, steps):
    student = copy.deepcopy(student0).to(memory_format=torch.channels_last).train()
    cfg = TrainConfig(1, 0.01, (), gamma=3000.0, capture=capture, amp="off")
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    fast = lopfast.CollapsedForward(student, backend="triton")
    with lopfast.SPDistiller(teacher, student, backend="torch") as d:
        eng = st.TrainStep(student, opt, cfg, "cuda", steps_per_epoch=steps, distiller=d)
        losses = []
        for x, y, gbs in loader.epoch(0):
            eng.begin_epoch()
            eng(x, y, gbs)
            losses.append(eng.sums[0].item())
    fast.remove()
    assert eng.captures == (capture == "auto")
    return losses, [p.detach().clone() for p in student.parameters()], eng


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("net", ["resnet56", "mobilenet_v2"])
def test_gpu_captured_lop_steps_equal_eager(net):
    """Real CUDA graph: 6 fp32 lop steps (2 eager warm-up, capture, 4 replays) of ResNet-56 and
    MobileNetV2 equal the eager steps. Tolerance (fp32, same backends, cuDNN deterministic): the
    same kernels run in both, so the losses agree to 1e-5 relative and the weights to 1e-4
    relative (+1e-6 absolute); what may differ is only the algorithm cuBLAS picks under capture
    (another accumulation order: rounding, never a wrong step)."""
    out = _gpu_equal(net)
    (la, wa, _), (lb, wb, eng) = out["off"], out["auto"]
    assert eng.replays == 6 - st.WARMUP and eng.graph is not None
    for a, b in zip(la, lb):
        assert math.isfinite(a) and abs(a - b) <= 1e-5 * abs(a) + 1e-7
    for u, v in zip(wa, wb):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@requires_cuda
def test_gpu_capture_failure_falls_back_to_eager_once():
    """A model that branches on its data (a host sync) cannot be captured: the engine says why,
    once, and trains eagerly."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x) if float(x.sum()) > -1e9 else -self.fc(x)

    model = Branchy().cuda()
    cfg = TrainConfig(1, 0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logs = []
    eng = st.TrainStep(model, opt, cfg, "cuda", steps_per_epoch=5, log=logs.append)
    x, y = torch.randn(8, 12, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    for _ in range(5):
        eng(x, y, 8)
    assert eng.graph is None and eng.eager_steps == 5 and "capture failed" in eng.why_eager
    assert sum("eager from now on" in s for s in logs) == 1
    assert eng.end_epoch()["finite"]


# ---------------------------------------------------------------------------- the weight average (ema)
def test_weight_average_is_updated_in_every_step(emulate):
    """avg = d * avg + (1 - d) * w after each step, for every weight and BatchNorm statistic,
    through the captured step (warm-up, replays, the short batch)."""
    from lopfast.pipeline.train import WeightAverage

    data = _data(200, 64)
    torch.manual_seed(0)
    model = build_model("digitsnet", width=8)
    avg = WeightAverage(model, 0.8)
    ref = {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}
    eng, _ = _engine(model, TrainConfig(2, 0.05, (), seed=5), data, after_update=[avg.update])
    for epoch in range(2):
        eng.begin_epoch()
        for x, y, gbs in data.train.epoch(epoch):
            eng(x, y, gbs)
            for n, w in model.state_dict().items():
                if n in ref:
                    ref[n] = 0.8 * ref[n] + 0.2 * w.detach()
        eng.end_epoch()
    assert eng.replays > 0 and "bn1.running_var" in ref
    for n, a in avg.state_dict().items():
        torch.testing.assert_close(a, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_ema_final_makes_the_average_the_stages_model_and_resumes_bit_identically(emulate, tmp_path):
    data = _data(200, 64)

    def run(ck, capture="auto", stop=None, resume=False):
        torch.manual_seed(0)
        model = build_model("digitsnet", width=8)

        def interrupt(epoch, rec):
            if epoch == stop:
                raise KeyboardInterrupt

        cfg = TrainConfig(3, 0.05, (2,), seed=5, ema=0.9, ema_final=True, capture=capture)
        try:
            res = train(model, data, cfg, checkpoint=str(tmp_path / ck), resume=resume, on_epoch_end=interrupt)
        except KeyboardInterrupt:
            return None, None
        return model, res

    model, res = run("a.pt")
    hist = res["history"]
    assert all("ema_acc" in h for h in hist) and res["final"]["acc"] == hist[-1]["ema_acc"]
    saved = load_checkpoint(str(tmp_path / "a.pt"))
    for n, t in model.state_dict().items():  # the model holds the average, not its last weights
        if n in saved["ema"]:
            assert torch.equal(t, saved["ema"][n]), n
    assert not torch.equal(saved["ema"]["conv1.weight"], saved["model"]["conv1.weight"])
    eager, _ = run("b.pt", capture="off")  # captured == eager, the average too
    run("c.pt", stop=0)
    resumed, res_c = run("c.pt", resume=True)
    for other in (eager, resumed):
        for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), n
    assert [h["ema_acc"] for h in res_c["history"]] == [h["ema_acc"] for h in hist]


def test_ema_settings_are_checked_and_reach_every_stage(tmp_path):
    from lopfast import cli
    from lopfast.checks import InvalidArgument
    from lopfast.pipeline.config import RunConfig
    from lopfast.pipeline.train import stage_config

    for kw, msg in (({"ema": 1.0}, r"ema must be a number in \(0, 1\), got 1.0"),
                    ({"ema": 0}, r"ema must be a number in \(0, 1\)"),
                    ({"ema_final": True}, r"ema_final must be False without ema")):
        with pytest.raises(InvalidArgument, match=msg):
            TrainConfig(1, 0.1, **kw)
        with pytest.raises(InvalidArgument, match=msg):
            RunConfig(**kw)
    args = cli.build_parser().parse_args(["run", "--ema", "0.999", "--ema-final", "--out", str(tmp_path)])
    cfg = cli._check_pipeline_args(args).cfg
    tc = stage_config(cfg, "finetune")
    assert (cfg.ema, cfg.ema_final, tc.ema, tc.ema_final) == (0.999, True, 0.999, True)


def test_a_run_with_ema_final_contracts_and_saves_the_average(tmp_path):
    from lopfast.pipeline import runner
    from lopfast.pipeline.config import RunConfig

    cfg = RunConfig(model="digitsnet", model_kwargs={"width": 16}, dataset="digits", train_subset=256,
                    test_subset=128, batch_size=64, pretrain_epochs=1, epochs=2, target=0.7, methods=["lop"],
                    device="cpu", measure=False, ema=0.8, ema_final=True)
    res = runner.run_pipeline(cfg, str(tmp_path / "run"), quiet=True)
    lop = json.load(open(tmp_path / "run" / "lop" / "result.json"))
    assert res["methods"]["lop"]["contract_max_rel_diff"] < 1e-4  # the contracted average equals the average
    assert abs(lop["acc"] - lop["history"][-1]["ema_acc"]) <= 100 / 128 + 1e-9  # one image at most, from rounding
    final = lopfast.load(str(tmp_path / "run" / "lop" / "model.pt"))
    assert sum(p.numel() for p in final.parameters()) == res["pruned"]["params"]
