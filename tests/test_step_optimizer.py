"""The training step's optimizers (lopfast.pipeline.step): SGD by hand, torch's Adam / AdamW stepped at
the scheduled lr (captured where torch's optimizer is capturable, eager otherwise, saying why once),
anything else refused by name; the --optimizer setting through the config, the CLI and train()."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import requires_cuda

from lopfast.pipeline import step as st
from lopfast.pipeline.config import RunConfig
from lopfast.pipeline.data import load_data
from lopfast.pipeline.models import build_model
from lopfast.pipeline.train import TrainConfig, load_checkpoint, train


def _data(n=192, batch=64, seed=3):
    return load_data("digits", batch_size=batch, train_subset=n, test_subset=64, seed=seed)


def _state(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("opt", [torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.NAdam])
def test_other_optimizers_are_refused_by_name(opt):
    model = _linear()
    with pytest.raises(TypeError, match=rf"SGD, Adam or AdamW .*got torch\.optim\.\w+\.{opt.__name__}"):
        st.TrainStep(model, opt(model.parameters(), lr=0.01), TrainConfig(1, 0.01), "cpu", steps_per_epoch=2)


def _adam_against_torch(kind, emulate=False, capturable=False):
    """TrainStep with torch's ``kind`` (3 epochs, multistep lr, decoupled / L2 weight decay) against the
    same optimizer driven by hand with MultiStepLR."""
    data = _data()
    model = _linear()
    ref = copy.deepcopy(model)
    cfg = TrainConfig(3, 0.01, (1, 2), lr_decay=0.5, seed=1, label_smoothing=0.1, weight_decay=0.05)
    opt = kind(model.parameters(), lr=0.01, weight_decay=0.05, capturable=capturable)
    logs = []
    eng = st.TrainStep(model, opt, cfg, "cpu", steps_per_epoch=len(data.train), log=logs.append)
    ref_opt = kind(ref.parameters(), lr=0.01, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(ref_opt, [1, 2], gamma=0.5)
    for epoch in range(3):
        for x, y, gbs in data.train.epoch(epoch):
            eng(x, y, gbs)
            ref_opt.zero_grad()
            F.cross_entropy(ref(x), y, label_smoothing=0.1).backward()
            ref_opt.step()
        assert eng.lr() == pytest.approx(ref_opt.param_groups[0]["lr"])
        sched.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    return eng, logs


@pytest.mark.parametrize("kind", [torch.optim.AdamW, torch.optim.Adam])
def test_adam_steps_equal_torch_with_its_scheduler(kind):
    eng, logs = _adam_against_torch(kind)
    assert not eng.captures and eng.kind == "adam"


def test_adamw_not_capturable_runs_eagerly_and_says_why_once(monkeypatch):
    monkeypatch.setattr(st, "EMULATE", True)  # a device that could capture: only the optimizer stops it
    eng, logs = _adam_against_torch(torch.optim.AdamW)
    assert not eng.captures and "AdamW(capturable=False)" in eng.why_eager
    assert sum("step:" in s for s in logs) == 1 and "capturable=False" in logs[0]


def test_capturable_adamw_is_captured_with_its_lr_on_the_device(monkeypatch):
    """The captured path (through lopfast.graphs' CPU stand-in): torch's capturable AdamW reads the lr
    from device tensors the step rewrites in place, so replays follow the schedule. torch allows
    capturable Adam on accelerators only; the test lets it run on the CPU."""
    import torch.optim.adam as adam_mod

    monkeypatch.setattr(st, "EMULATE", True)
    monkeypatch.setattr(adam_mod, "_get_capturable_supported_devices", lambda *a, **k: ["cpu", "cuda"])
    eng, logs = _adam_against_torch(torch.optim.AdamW, capturable=True)
    assert eng.captures and eng.replays > 0 and "captured as one CUDA graph" in logs[0]
    assert all(isinstance(g["lr"], torch.Tensor) for g in eng.opt.param_groups)


def test_train_with_adamw_resumes_bit_identically(tmp_path):
    cfg = TrainConfig(2, 0.003, (1,), seed=5, optimizer="adamw", weight_decay=0.05)

    def run(interrupt=None, resume=False, name="ck.pt"):
        torch.manual_seed(0)
        model = build_model("digitsnet", width=8)

        def stop(epoch, rec):
            if interrupt is not None and epoch == interrupt:
                raise KeyboardInterrupt

        try:
            res = train(model, _data(), cfg, checkpoint=str(tmp_path / name), resume=resume, on_epoch_end=stop)
        except KeyboardInterrupt:
            return None, None
        return model, res

    full, res = run(name="full.pt")
    assert res["final"]["acc"] > 15  # it learns (10 classes)
    run(interrupt=0)
    ck = load_checkpoint(str(tmp_path / "ck.pt"))
    assert "exp_avg_sq" in str(ck["optimizer"]) and ck["optimizer"]["param_groups"][0]["initial_lr"] == 0.003
    resumed, _ = run(resume=True)
    for u, v in zip(_state(full), _state(resumed)):
        assert torch.equal(u, v)


def test_optimizer_setting_config_and_cli(tmp_path, capsys, no_training):
    from lopfast.checks import InvalidArgument
    from lopfast.cli import build_parser
    from lopfast.pipeline.train import stage_config

    cfg = RunConfig(model="digitsnet", dataset="digits", optimizer="adamw").validate()
    tc = stage_config(cfg, "finetune", 2, 0.001)
    assert tc.optimizer == "adamw"
    assert isinstance(st.build_optimizer(nn.Linear(2, 2).parameters(), tc, "cpu"), torch.optim.AdamW)
    with pytest.raises(InvalidArgument, match="optimizer"):
        RunConfig(optimizer="adam").validate()
    with pytest.raises(InvalidArgument, match="nesterov"):
        RunConfig(optimizer="adamw", nesterov=True).validate()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(1, 0.1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="Nesterov momentum is SGD's"):
        TrainConfig(1, 0.1, optimizer="adamw", nesterov=True)
    args = build_parser().parse_args(["run", "--optimizer", "adamw"])
    assert args.optimizer == "adamw"
    from lopfast.cli import main

    rc = main(["run", "--model", "digitsnet", "--dataset", "digits", "--optimizer", "lion", "--quiet",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--optimizer" in err and "lion" in err, err


@pytest.mark.gpu
@requires_cuda
def test_gpu_captured_adamw_equals_eager():
    """Real CUDA graph: capturable AdamW (build_optimizer on CUDA), 6 steps captured vs eager."""
    out = {}
    for capture in ("off", "auto"):
        torch.manual_seed(0)
        model = build_model("digitsnet", width=8).cuda()
        cfg = TrainConfig(1, 0.003, (), optimizer="adamw", capture=capture, amp="off")
        opt = st.build_optimizer(model.parameters(), cfg, "cuda")
        eng = st.TrainStep(model, opt, cfg, "cuda", steps_per_epoch=6)
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(6):
            x = torch.randn(16, 1, 8, 8, device="cuda", generator=g)
            y = torch.randint(0, 10, (16,), device="cuda", generator=g)
            eng(x, y, 16)
        out[capture] = (eng, _state(model))
    assert out["auto"][0].replays == 6 - st.WARMUP and not out["off"][0].captures
    for u, v in zip(out["off"][1], out["auto"][1]):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-6)
