"""LR schedules (lopfast.pipeline.schedule) and their use in training: values at chosen steps,
multistep == MultiStepLR per epoch, label smoothing and Nesterov really applied, resume
mid-schedule == uninterrupted."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lopfast.pipeline.data import load_data
from lopfast.pipeline.schedule import SCHEDULES, check_schedule, lr_factors
from lopfast.pipeline.train import TrainConfig, load_checkpoint, train


def _cfg(**kw):
    return TrainConfig(**{"epochs": 10, "lr": 0.1, **kw})


@pytest.mark.parametrize("milestones,epochs,spe", [((3, 6, 8), 10, 7), ((), 4, 3), ((1,), 2, 5), ((2, 2, 5), 6, 1)])
def test_multistep_equals_multisteplr_stepped_per_epoch(milestones, epochs, spe):
    cfg = _cfg(epochs=epochs, milestones=milestones, lr_decay=0.2)
    f = lr_factors(cfg, spe)
    assert f.dtype == torch.float64 and f.device.type == "cpu" and f.shape == (epochs * spe,)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma=0.2)
    want = []
    for _ in range(epochs):
        want += [opt.param_groups[0]["lr"]] * spe
        opt.step()
        sched.step()
    torch.testing.assert_close(f, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_linear_and_onecycle_values_at_chosen_steps():
    # 10 epochs x 10 steps, 2 epochs of warm-up: W = 20, T = 100
    lin = lr_factors(_cfg(schedule="linear", warmup_epochs=2), 10)
    assert lin[0] == pytest.approx(1 / 20) and lin[9] == pytest.approx(10 / 20) and lin[19] == 1.0
    assert lin[20] == 1.0 and lin[60] == pytest.approx(0.5) and lin[99] == pytest.approx(1 / 80)
    assert bool((lin[20:].diff() < 0).all()) and bool((lin[:20].diff() > 0).all())
    cyc = lr_factors(_cfg(schedule="onecycle", warmup_epochs=2), 10)
    torch.testing.assert_close(cyc[:20], lin[:20])  # the same warm-up
    assert cyc[20] == 1.0 and cyc[60] == pytest.approx(0.5) and cyc[40] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert 0 < cyc[99] < 1e-3
    # no warm-up: the decay starts at the first step
    assert lr_factors(_cfg(schedule="linear"), 10)[0] == 1.0
    # a warm-up on multistep multiplies the step factors
    ms = lr_factors(_cfg(milestones=(1,), warmup_epochs=1.5), 4)
    assert ms.tolist()[:8] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 0.1 * 5 / 6, 0.1, 0.1, 0.1])


def test_warmup_rounds_to_steps_and_bad_settings_are_named():
    assert lr_factors(_cfg(schedule="linear", warmup_epochs=0.01), 10)[0] == 1.0  # rounds to one step: factor 1
    for kw, what in (({"schedule": "cosine"}, "schedule must be one of"), ({"warmup_epochs": -1}, "warmup_epochs"),
                     ({"warmup_epochs": 10}, "warmup_epochs .* shorter"), ({"label_smoothing": 1.0}, "label_smoothing"),
                     ({"nesterov": True, "momentum": 0.0}, "nesterov"), ({"nesterov": "yes"}, "nesterov")):
        with pytest.raises(ValueError, match=what):
            _cfg(**kw)
    with pytest.raises(ValueError, match="--schedule"):
        check_schedule("step", 0.0, prefix="--")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_factors(_cfg(), 0)
    assert set(SCHEDULES) == {"multistep", "linear", "onecycle"}


@pytest.mark.parametrize("schedule", ["linear", "onecycle", "multistep"])
def test_warmup_rounded_up_to_the_whole_run_ends_one_step_early(schedule):
    # half an epoch of one-step epochs rounds to one warm-up step: the whole one-step run
    f = lr_factors(_cfg(epochs=1, schedule=schedule, warmup_epochs=0.5), 1)
    assert f.tolist() == [1.0]
    f = lr_factors(_cfg(epochs=2, schedule=schedule, warmup_epochs=1.5), 1)  # 2 warm-up steps of 2
    assert f[0] == 1.0 and len(f) == 2


def _data():
    return load_data("digits", batch_size=64, train_subset=256, test_subset=64, seed=3)


def _linear_model(scale: float = 1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def test_label_smoothing_is_applied_to_the_task_loss():
    data = _data()
    # an LR so small the weights do not move: the epoch's mean loss is the loss of the initial model
    fitted = _linear_model()
    train(fitted, data, TrainConfig(5, 0.5, ()))  # a confident, mostly right classifier: smoothing matters
    losses = {}
    for ls in (0.0, 0.2):
        model = _linear_model()
        model.load_state_dict(fitted.state_dict())
        init = [p.detach().clone() for p in model.parameters()]
        rec = train(model, data, TrainConfig(1, 1e-12, (), label_smoothing=ls, momentum=0.0))["history"][0]
        losses[ls] = rec["train_loss"]
        ref = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        with torch.no_grad():
            for p, q in zip(ref.parameters(), init):
                p.copy_(q)
        want = [F.cross_entropy(ref(x), y, label_smoothing=ls).item() for x, y, _ in data.train.epoch(0)]
        assert rec["train_loss"] == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert abs(losses[0.2] - losses[0.0]) > 0.1 * losses[0.0]


def test_nesterov_and_per_step_lr_reach_the_optimizer(tmp_path):
    data = _data()  # 4 steps per epoch
    ck = str(tmp_path / "ck.pt")
    cfg = TrainConfig(3, 0.05, (), schedule="linear", warmup_epochs=1, nesterov=True)
    seen = []
    hist = train(_linear_model(), data, cfg, checkpoint=ck,
                 on_epoch_end=lambda e, r: seen.append(load_checkpoint(ck)["optimizer"]["param_groups"][0]))["history"]
    f = lr_factors(cfg, len(data.train))
    assert all(g["nesterov"] for g in seen)
    # the step engine keeps the base LR in the groups and scales it by the table on the device;
    # after epoch e the record holds the LR of that epoch's last step
    assert [g["lr"] for g in seen] == pytest.approx([0.05] * 3)
    assert [r["lr"] for r in hist] == pytest.approx([0.05 * float(f[4 * e + 3]) for e in range(3)])


@pytest.mark.parametrize("schedule", ["onecycle", "linear"])
def test_resume_mid_schedule_matches_uninterrupted(tmp_path, schedule):
    data = _data()
    cfg = TrainConfig(4, 0.05, (), schedule=schedule, warmup_epochs=1.5, label_smoothing=0.1, nesterov=True, seed=2)
    full = _linear_model()
    train(full, data, cfg, checkpoint=str(tmp_path / "full.pt"))

    class Stop(Exception):
        pass

    def stop_after_two(epoch, rec):
        if epoch == 1:  # mid-schedule: inside the decay, after the warm-up
            raise Stop

    ck = str(tmp_path / "cut.pt")
    with pytest.raises(Stop):
        train(_linear_model(), data, cfg, checkpoint=ck, on_epoch_end=stop_after_two)
    torch.manual_seed(99)  # other work in between must not matter
    resumed = _linear_model()
    res = train(resumed, data, cfg, checkpoint=ck, resume=True)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
