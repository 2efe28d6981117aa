"""The shipped default path, end to end: a real ``train()`` of a LOP stage (teacher, expanded
student, SP distillation, the grouped collapse) with every switch on its default (``amp="auto"``,
``backend`` auto everywhere, ``capture="auto"``), against the same run with the step eager.

On a GPU (``-m gpu``): ResNet-56 and MobileNetV2 at full size on CIFAR-shaped random data, 5 full
batches of 128 and a short one (2 eager warm-up steps, the capture, 2 replays, the short batch
eager), the amp choice, the collapse routing and the SP backend all measured by the dispatch.
Checked: the captured run captured (no "eager from now on"), no dispatch candidate was rejected,
and it trains as the eager run does within bf16's rounding (stated at ``LOSS_RTOL`` /
``UPDATE_RTOL``: two runs may differ in precision and backends, each measured for its own mode;
a wrong step, a stale batch or a lost update differs by the size of the step itself).

On CPU the same function runs with the step captured through lopfast.graphs' stand-in (the
plumbing: static batch, warm-up, replays, the eager short batch, evaluate() in between) at reduced
sizes; there amp and the dispatch stay on their CPU defaults (fp32, the references), so both runs
must agree exactly.
"""
import copy
import warnings

import pytest
import torch

from conftest import requires_cuda

import lopfast
from lopfast import dispatch
from lopfast.pipeline import step as st
from lopfast.pipeline.data import DataBundle, TensorLoader
from lopfast.pipeline.models import build_model
from lopfast.pipeline.train import TrainConfig, train

LOSS_RTOL = 0.02  # per-epoch training loss, relative
UPDATE_RTOL = 0.05  # ||(w_captured - w0) - (w_eager - w0)|| / ||w_eager - w0|| over every parameter


def cifar_shaped(n_train: int, n_test: int, batch: int, device) -> DataBundle:
    """Random uint8 32x32 RGB images and labels on ``device``, CIFAR-10's augmentation."""
    g = torch.Generator().manual_seed(0)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)

    def loader(n, train):
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
        y = torch.randint(0, 10, (n,), generator=g).to(device)
        return TensorLoader(x, y, mean, std, batch, train=train, crop_pad=4 if train else 0, flip=train,
                            channels_last=torch.device(device).type == "cuda")

    return DataBundle("cifar10", loader(n_train, True), loader(n_test, False), 3, 10, 32)


def lop_nets(net: str, full: bool):
    """(teacher, expanded student at r = 3): the student is the teacher's architecture, expanded.
    Reduced for CPU: ResNet-56 at width 4, MobileNetV2 with its wide convs (> 64 channels) left
    compact (an exact expansion is a QR per layer: seconds each on a CPU)."""
    torch.manual_seed(0)
    teacher = build_model(net, **({} if full or net != "resnet56" else {"width": 4}))
    skip = None if full else (lambda name, m: max(m.in_channels, m.out_channels) > 64)
    student = lopfast.expand(copy.deepcopy(teacher), rate=3.0, skip=skip, generator=torch.Generator().manual_seed(1))
    return teacher.eval(), student


def run_default_path(net: str, device, *, batch: int, full_batches: int, short: int, full: bool) -> dict:
    """The LOP stage with every switch on its default, captured and eager: the two runs' losses,
    parameter updates, logs and dispatch decisions (see the module docstring)."""
    teacher, student0 = lop_nets(net, full)
    data = cifar_shaped(batch * full_batches + short, 2 * batch, batch, device)
    w0 = [p.detach().clone().to(device) for p in student0.parameters()]
    out = {}
    for capture in ("off", "auto"):
        student, logs = copy.deepcopy(student0), []
        cfg = TrainConfig(1, 0.02, (), gamma=3000.0, capture=capture, seed=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = train(student, data, cfg, device=device, teacher=copy.deepcopy(teacher), log=logs.append)
        out[capture] = dict(loss=res["history"][0]["train_loss"], sp=res["history"][0]["sp_loss"],
                            acc=res["final"]["acc"], logs=logs,
                            update=[p.detach() - w for p, w in zip(student.parameters(), w0)],
                            rejected=[str(w.message) for w in caught if "rejected" in str(w.message)])
    out["decisions"] = dispatch.decisions()
    return out


def check_default_path(out: dict, exact: bool) -> None:
    eager, cap = out["off"], out["auto"]
    assert any("captured as one CUDA graph" in s for s in cap["logs"]), cap["logs"]
    assert not any("eager from now on" in s for s in cap["logs"]), cap["logs"]
    assert not cap["rejected"] and not eager["rejected"], cap["rejected"] + eager["rejected"]
    assert not [d for d in out["decisions"] if d.get("rejected")], out["decisions"]
    num = sum(float((a - b).double().square().sum()) for a, b in zip(cap["update"], eager["update"])) ** 0.5
    den = sum(float(b.double().square().sum()) for b in eager["update"]) ** 0.5
    assert den > 0, "the eager run did not train"
    if exact:
        assert cap["loss"] == eager["loss"] and cap["sp"] == eager["sp"] and num == 0.0
    else:
        assert abs(cap["loss"] - eager["loss"]) <= LOSS_RTOL * abs(eager["loss"]), (cap["loss"], eager["loss"])
        assert num <= UPDATE_RTOL * den, (num, den)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["resnet56", "mobilenet_v2"])
def test_default_path_cpu(net, monkeypatch):
    """CPU: the stand-in capture, reduced sizes, 3 full batches and a short one; equal to eager.
    Slow: 15-30 s each on a 2-core CPU (55 layer pairs, two runs of a teacher and a student)."""
    monkeypatch.setattr(st, "EMULATE", True)
    torch.set_num_threads(2)
    out = run_default_path(net, "cpu", batch=8, full_batches=3, short=3, full=False)
    check_default_path(out, exact=True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("net", ["resnet56", "mobilenet_v2"])
def test_gpu_default_path(net):
    """GPU: full size, b = 128, everything on auto: captures, rejects nothing, trains as eager does."""
    out = run_default_path(net, "cuda", batch=128, full_batches=5, short=40, full=True)
    check_default_path(out, exact=False)
