"""Data-parallel training with two gloo processes matches one process to rounding."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import lopfast
from lopfast.pipeline.data import load_data
from lopfast.pipeline.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")


class NoBNNet(nn.Module):
    """Per-sample network (no BatchNorm): the global-batch gradient is the sum of the ranks' shares."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


CFG = dict(epochs=2, lr=0.05, milestones=(1,), seed=7)


def _run(rank, world, ckpt_dir, init_file, distill=False):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = load_data("digits", batch_size=50, train_subset=300, test_subset=100, seed=1, rank=rank, world_size=world)
        torch.manual_seed(0)
        model = NoBNNet()
        teacher = None
        if distill:
            teacher = NoBNNet().eval()
            model = lopfast.expand(model, 2.0, generator=torch.Generator().manual_seed(0))
        cfg = TrainConfig(**CFG, gamma=10.0 if distill else 0.0)
        res = train(model, data, cfg, teacher=teacher, checkpoint=os.path.join(ckpt_dir, "ck.pt"))
        torch.save({"state": model.state_dict(), "acc": res["final"]["acc"]}, os.path.join(ckpt_dir, f"out{rank}.pt"))
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(tmp_path):
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    _run(0, 1, str(single), None)
    mp.spawn(_run, args=(2, str(multi), str(tmp_path / "init")), nprocs=2, join=True)
    ref = torch.load(single / "out0.pt", weights_only=True)
    r0 = torch.load(multi / "out0.pt", weights_only=True)
    r1 = torch.load(multi / "out1.pt", weights_only=True)
    for k, v in ref["state"].items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(r1["state"][k], r0["state"][k], rtol=0, atol=0, msg=k)  # ranks stay identical
    assert r0["acc"] == pytest.approx(ref["acc"], abs=1.0)  # metrics are all-reduced: both ranks report the same
    assert r0["acc"] == r1["acc"]
    assert (multi / "ck.pt").exists()  # only rank 0 writes, once per epoch


def test_two_gloo_ranks_with_sp_distillation_stay_identical(tmp_path):
    # The SP loss is a batch statistic (a b x b Gram per rank), so unlike the task loss it is not
    # the single-process value; what must hold is that DDP keeps the ranks in lockstep.
    multi = tmp_path / "multi"
    multi.mkdir()
    mp.spawn(_run, args=(2, str(multi), str(tmp_path / "init"), True), nprocs=2, join=True)
    r0 = torch.load(multi / "out0.pt", weights_only=True)
    r1 = torch.load(multi / "out1.pt", weights_only=True)
    assert any(k.endswith("weight2") for k in r0["state"])  # the expanded student was trained
    for k, v in r0["state"].items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(r1["state"][k], v, rtol=0, atol=0, msg=k)
