"""Pruning methods checked against what their papers do, on a small CNN trained here on the
sklearn digits (8x8): ADMM keeps accuracy without fine-tuning and cuts Z's support, ThiNet's
rescaling helps and its memory stays bounded, AMC's reconstruction raises its reward, HRank
ranks after the activation, Taylor is Molchanov's score, slimming cuts by one threshold."""
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("torch_pruning")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

sys.path.insert(0, os.path.dirname(__file__))
from nets import TinyResNet, tiny_data  # noqa: E402

import lopfast  # noqa: E402
from lopfast.prune import TOLERANCE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def digits():
    """(trained net, train batches, test batches, test accuracy): trained once per module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    d = sklearn_datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train, test = _batches(x[:1400], y[:1400], 64), _batches(x[1400:], y[1400:], 200)
    torch.manual_seed(0)
    net = DigitsNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    net.train()
    for _ in range(8):
        for xb, yb in train:
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    net.eval()
    torch.set_num_threads(old)
    return net, train, test, _acc(net, test)


@torch.no_grad()
def _acc(net, batches):
    net.eval()
    return sum(int((net(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


@torch.no_grad()
def _loss(net, batches):
    net.eval()
    return sum(float(F.cross_entropy(net(x), y, reduction="sum")) for x, y in batches) / sum(len(y) for _, y in batches)


X8 = torch.zeros(1, 1, 8, 8)


def test_digits_net_trains(digits):
    assert digits[3] > 0.95


# ---------------------------------------------------------------------------- ADMM
def test_admm_keeps_accuracy_without_finetuning_and_cuts_z_support(digits):
    net, train, test, acc = digits
    admm, rep = lopfast.prune(net, X8, method="admm", ratio=0.5, data=train)
    l1, _ = lopfast.prune(net, X8, method="l1", ratio=0.5)
    assert rep.layers == _.layers  # the same shape as the magnitude cut
    assert rep.extra["converged"] and rep.extra["primal_residual"] < 1e-3
    # the channels cut are exactly those Z zeroed
    assert rep.extra["cut_is_support"]
    assert all(len(v) > 0 for v in rep.extra["zero_set"].values())
    a_admm, a_l1 = _acc(admm, test), _acc(l1, test)
    assert a_admm > acc - 0.03, (a_admm, acc)
    assert a_admm > a_l1 + 0.1, (a_admm, a_l1)


def test_admm_warns_when_not_converged(digits):
    net, train, _, _ = digits
    with pytest.warns(UserWarning, match="did not converge"):
        _, rep = lopfast.prune(net, X8, method="admm", ratio=0.5, data=train[:2], epochs=1, rho=1e-4, rho_growth=1.0)
    assert not rep.extra["converged"] and rep.extra["primal_residual"] > 1e-3


# ---------------------------------------------------------------------------- ThiNet
def test_thinet_rescaling_helps_and_memory_is_bounded(digits):
    net, train, test, _ = digits
    kw = dict(method="thinet", ratio=0.6, data=train, batches=2, positions=10)
    plain, _ = lopfast.prune(net, X8, rescale=False, **kw)
    rescaled, rep = lopfast.prune(net, X8, **kw)
    assert set(rep.extra["rescaled_layers"]) >= {"features.3", "features.7"}
    assert _loss(rescaled, test) < _loss(plain, test)
    # only the current group's samples are held: C_in x (batches * batch * positions) doubles per consumer,
    # plus the per-root copy; sampling every output channel (the old scheme) would hold 32x more
    n = 2 * 64 * 10
    assert rep.extra["thinet_peak_sample_bytes"] <= 3 * (32 + 1) * n * 8


# ---------------------------------------------------------------------------- AMC
def test_amc_reconstruction_raises_the_reward(digits):
    net, train, _, _ = digits
    # warm-up episodes only: both runs try the same random policies
    kw = dict(method="amc", target_removed=0.6, data=train[:6], episodes=3, warmup=3, hidden=16, batch_size=2,
              val_batches=3, recon_batches=3)
    _, off = lopfast.prune(net, X8, reconstruct=False, **kw)
    _, on = lopfast.prune(net, X8, **kw)
    assert [e["removed"] for e in on.extra["episodes"]] == [e["removed"] for e in off.extra["episodes"]]
    mean = lambda r: sum(e["reward"] for e in r.extra["episodes"]) / len(r.extra["episodes"])  # noqa: E731
    assert mean(on) > mean(off) + 0.02
    assert abs(on.extra["achieved"] - 0.6) <= TOLERANCE and on.target_unit == "params"


def test_amc_and_eagleeye_flops_budget(digits):
    net, train, _, _ = digits
    _, rep = lopfast.prune(net, X8, method="amc", target_removed=0.6, budget="flops", data=train[:4], episodes=2,
                           warmup=2, hidden=16, batch_size=2)
    assert rep.target_unit == "macs" and abs(rep.extra["achieved"] - 0.6) <= TOLERANCE
    assert abs(rep.macs_removed_fraction - 0.6) < 0.02  # torch-pruning's count also has BN/pool ops
    _, rep = lopfast.prune(net, X8, method="eagleeye", target_removed=0.6, budget="flops", data=train[:6],
                           candidates=2)
    assert rep.target_unit == "macs" and abs(rep.macs_removed_fraction - 0.6) < 0.02
    with pytest.warns(UserWarning, match="fewer than calib_batches"):
        lopfast.prune(net, X8, method="eagleeye", target_removed=0.6, data=train[:3], candidates=1)


# ---------------------------------------------------------------------------- HRank
def test_hrank_ranks_after_the_activation():
    from lopfast.prune.criteria import activation_sites, hrank_post_activation_scores
    from lopfast.prune.importance import hrank_scores

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[1].bias[1] = -50.0  # channel 1 is dead after the ReLU: rank 0, though its conv output is full rank
    data = tiny_data(n_batches=1, batch=4, size=8, num_classes=3)
    post, sites = hrank_post_activation_scores(net, data, batches=1)
    pre = hrank_scores(net, data, batches=1)
    assert sites["0"] == "after activation"
    assert float(post["0"][1]) == 0.0 and float(pre["0"][1]) == 8.0
    assert not torch.equal(post["0"], pre["0"])
    pruned, rep = lopfast.prune(net, torch.randn(1, 3, 8, 8), method="hrank", ratio=0.25, data=data, batches=1)
    assert rep.layers["0"] == [4, 3] and rep.extra["hrank_where"] == "after the activation"
    assert torch.equal(pruned[0].weight, net[0].weight[[0, 2, 3]])
    # in a residual block the second conv is ranked after the add and the ReLU, as the official code
    _, sites = activation_sites(TinyResNet())
    assert sites["layer1.conv2"][1] == "after activation (after residual add)"
    assert sites["layer1.conv1"][1] == "after activation"
    # linear layers have no feature map: either the documented L1 or an explicit error
    mlp = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(),
                        nn.Linear(8, 3))
    _, rep = lopfast.prune(mlp, torch.randn(1, 3, 8, 8), method="hrank", ratio=0.5, data=data, batches=1)
    assert rep.extra["hrank_l1_layers"] == ["3", "5"]
    with pytest.raises(ValueError, match="cannot rank the linear layer"):
        lopfast.prune(mlp, torch.randn(1, 3, 8, 8), method="hrank", ratio=0.5, data=data, batches=1,
                      linear_criterion="error")


# ---------------------------------------------------------------------------- Taylor, L1, slimming
def test_taylor_is_molchanovs_squared_per_batch_score():
    from lopfast.prune.criteria import MolchanovTaylorImportance, taylor_contributions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(6, 3))
    data = tiny_data(n_batches=3, batch=4, size=8, num_classes=3)
    direct = torch.zeros(6, dtype=torch.float64)
    for x, y in data:
        net.zero_grad()
        net.eval()
        F.cross_entropy(net(x), y).backward()
        s = (net[0].weight * net[0].weight.grad).sum((1, 2, 3)) + net[0].bias * net[0].bias.grad
        s = s + net[1].weight * net[1].weight.grad + net[1].bias * net[1].bias.grad
        direct += s.detach().double() ** 2
    direct /= 3
    net.zero_grad()
    imp = MolchanovTaylorImportance(taylor_contributions(net, data, 3, F.cross_entropy))
    import torch_pruning as tp

    imp.names = {m: n for n, m in net.named_modules()}
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, list(range(6)))
    assert torch.allclose(imp(group).double(), direct, rtol=1e-4, atol=1e-10)


def test_l1_is_li_et_al_per_filter_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    norms = net[0].weight.abs().sum((1, 2, 3))
    with torch.no_grad():  # the coupled layers rank the channels the other way round: a group mean would differ
        order = torch.argsort(norms)
        net[1].weight.copy_(torch.linspace(5, 0.1, 8)[torch.argsort(order)])
        net[3].weight.mul_(torch.linspace(50, 1, 8)[torch.argsort(order)].reshape(1, 8, 1, 1))
    pruned, _ = lopfast.prune(net, torch.randn(1, 3, 8, 8), ratio=0.5)
    kept = sorted(torch.argsort(norms, descending=True)[:4].tolist())
    assert torch.equal(pruned[0].weight, net[0].weight[kept])


def test_slimming_sparsity_phase_and_global_threshold(digits):
    net, train, _, _ = digits
    pruned, rep = lopfast.prune(net, X8, method="slimming", ratio=0.4, data=train, epochs=2, sparsity=1e-3)
    assert (rep.criterion, rep.allocation, rep.procedure) == ("bn", "global", "slimming")
    l1_before = sum(float(m.weight.detach().abs().sum()) for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert rep.extra["bn_l1"] < l1_before
    # one threshold across layers: per-layer ratios differ
    ratios = {n: a / b for n, (b, a) in rep.layers.items() if n != "fc"}
    assert len(set(round(r, 3) for r in ratios.values())) > 1
    assert pruned(X8).shape == (1, 10)
