"""Structured pruning: every method on a residual CNN and a MobileNetV2-style net, the target
search, the report, and HRank/ThiNet scores against direct slow computations."""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("torch_pruning")

sys.path.insert(0, os.path.dirname(__file__))
from nets import TinyMobileNetV2, TinyResNet, tiny_data  # noqa: E402

import lopfast  # noqa: E402
from lopfast.prune import (  # noqa: E402
    TOLERANCE,
    count_params,
    feature_map_ranks,
    hrank_scores,
    sampled_contributions,
    thinet_order,
)


pytestmark = pytest.mark.usefixtures("one_thread")


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
DATA = tiny_data(n_batches=2, batch=8)
NETS = {"resnet": TinyResNet, "mobilenetv2": TinyMobileNetV2}
FAST_OPTIONS = {
    "l1": {}, "l2": {}, "bn": {}, "taylor": {"batches": 2}, "hrank": {"batches": 1},
    "thinet": {"batches": 1, "positions": 8},
    "eagleeye": {"candidates": 2, "calib_batches": 1, "eval_batches": 1, "seed": 3},
    "admm": {"epochs": 1, "lr": 0.01},
    "amc": {"episodes": 4, "warmup": 2, "batch_size": 4, "hidden": 32, "val_batches": 1, "recon_batches": 1},
    "slimming": {"epochs": 1}, "lamp": {}, "fpgm": {}, "obd": {"batches": 1}, "random": {},
}


def _net(name, seed=0):
    torch.manual_seed(seed)
    return NETS[name]()


@pytest.mark.filterwarnings("ignore:admm did not converge")  # one epoch on random data
@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("method", sorted(FAST_OPTIONS))
def test_every_method_meets_target(net, method):
    model = _net(net)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = 0.6837  # the paper's lightest MobileNetV2 setting
    pruned, report = lopfast.prune(model, X, method=method, target_removed=target, data=DATA,
                                   **FAST_OPTIONS[method])
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert abs(report.removed_fraction - target) <= TOLERANCE
    assert report.params_before == count_params(model)
    assert report.params_after == count_params(pruned)
    assert report.removed_fraction == pytest.approx(1 - count_params(pruned) / count_params(model))
    assert report.macs_after < report.macs_before
    assert report.method == method
    d = json.loads(report.to_json())
    assert d["params_after"] == report.params_after and d["method"] == method
    # physically smaller, the classifier keeps its outputs, forward + backward run
    head = "fc" if net == "resnet" else "classifier.1"
    assert report.layers[head] == [10, 10]
    assert sum(after < before for before, after in report.layers.values()) > 0
    sd1 = {k: v.clone() for k, v in pruned.state_dict().items()}
    out = pruned(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
    # same seed, same result
    again, report2 = lopfast.prune(model, X, method=method, target_removed=target, data=DATA,
                                   **FAST_OPTIONS[method])
    assert report2.params_after == report.params_after
    sd2 = again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


@pytest.mark.parametrize("target", [0.7823, 0.9480, 0.9866])
def test_paper_targets_mobilenet(target):
    pruned, report = lopfast.prune(_net("mobilenetv2"), X, method="l1", target_removed=target)
    assert abs(report.removed_fraction - target) <= TOLERANCE
    assert pruned(X).shape == (1, 10)


def test_ratio_mode_and_global_pruning():
    model = _net("resnet")
    pruned, report = lopfast.prune(model, X, method="l2", ratio=0.5)
    assert report.ratio == 0.5 and report.target_removed is None
    assert report.layers["layer1.conv1"] == [16, 8]
    pruned, report = lopfast.prune(model, X, method="l1", target_removed=0.5, global_pruning=True)
    assert abs(report.removed_fraction - 0.5) <= TOLERANCE
    assert pruned(X).shape == (1, 10)


def test_ignored_layers_keep_their_channels():
    pruned, report = lopfast.prune(_net("resnet"), X, ratio=0.5, ignored=["layer1.conv1"])
    assert report.layers["layer1.conv1"] == [16, 16]
    assert "layer1.conv1" in report.ignored and "fc" in report.ignored


def test_target_beyond_the_architecture_raises():
    with pytest.raises(ValueError, match="more than this architecture can lose"):
        lopfast.prune(_net("mobilenetv2"), X, target_removed=0.999)


def test_argument_errors():
    model = _net("resnet")
    with pytest.raises(ValueError, match="exactly one"):
        lopfast.prune(model, X)
    with pytest.raises(ValueError, match="exactly one"):
        lopfast.prune(model, X, ratio=0.5, target_removed=0.5)
    with pytest.raises(ValueError, match="fraction"):
        lopfast.prune(model, X, target_removed=68.37)
    with pytest.raises(ValueError, match="method"):
        lopfast.prune(model, X, method="l3", ratio=0.5)
    with pytest.raises(ValueError, match="data"):
        lopfast.prune(model, X, method="hrank", ratio=0.5)
    with pytest.raises(TypeError, match="unknown option"):
        lopfast.prune(model, X, method="l1", ratio=0.5, foo=1)
    with pytest.raises(TypeError, match="model"):
        lopfast.prune("net", X, ratio=0.5)
    with pytest.raises(ValueError, match="ignored"):
        lopfast.prune(model, X, ratio=0.5, ignored=["nope"])
    with pytest.raises(ValueError, match="expand"):
        lopfast.prune(lopfast.expand(model, 2.0), X, ratio=0.5)


def test_bad_inputs_name_the_argument():
    model = _net("resnet")
    with pytest.raises(ValueError, match=r"target_removed must be in the open interval \(0, 1\)"):
        lopfast.prune(model, X, target_removed=0)
    with pytest.raises(ValueError, match="ratio must be in the open interval"):
        lopfast.prune(model, X, ratio=0.0)
    with pytest.raises(ValueError, match="example_inputs"):
        lopfast.prune(model, torch.randn(1, 5, 16, 16), ratio=0.5)
    bad_data = tiny_data(n_batches=1, batch=4, size=16)
    bad_data = [(torch.randn(4, 4, 16, 16), bad_data[0][1])]
    with pytest.raises(ValueError, match="data's inputs"):
        lopfast.prune(model, torch.randn(1, 4, 16, 16)[:, :3], method="taylor", ratio=0.5, data=bad_data)
    # a wrong-size example input would count MACs at the wrong size
    with pytest.raises(ValueError, match="example_inputs has"):
        lopfast.prune(model, torch.randn(1, 3, 32, 32), method="taylor", ratio=0.5, data=DATA)
    with pytest.raises(ValueError, match="targets"):
        lopfast.prune(model, X, method="taylor", ratio=0.5, data=[(DATA[0][0], DATA[0][1][:3])])
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        lopfast.prune(model, X, method="taylor", ratio=0.5, data=[DATA[0][0]])
    # options that exist only with another setting say which
    with pytest.raises(TypeError, match="max_layer_ratio.*allocation='global'"):
        lopfast.prune(model, X, ratio=0.5, max_layer_ratio=0.5)
    with pytest.raises(TypeError, match="episodes.*allocation='amc'"):
        lopfast.prune(model, X, ratio=0.5, episodes=3)
    with pytest.raises(ValueError, match="option batches must be a positive integer"):
        lopfast.prune(model, X, method="taylor", ratio=0.5, data=DATA, batches=0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        lopfast.prune(model, X, criterion="l3", ratio=0.5)
    with pytest.raises(ValueError, match="procedure='admm'"):
        lopfast.prune(model, X, method="admm", criterion="l1", ratio=0.5, data=DATA)
    with pytest.raises(ValueError, match="global_pruning=True means allocation='global'"):
        lopfast.prune(model, X, method="eagleeye", global_pruning=True, ratio=0.5, data=DATA)
    with pytest.raises(TypeError, match="both in method_options and as keywords"):
        lopfast.prune(model, X, method="taylor", ratio=0.5, data=DATA, batches=1, method_options={"batches": 2})


def test_combinations_and_method_options():
    model = _net("resnet")
    _, rep = lopfast.prune(model, X, method="hrank", allocation="eagleeye", target_removed=0.6837, data=tiny_data(3),
                           method_options={"batches": 1, "candidates": 2, "calib_batches": 2, "eval_batches": 1})
    assert (rep.criterion, rep.allocation, rep.procedure) == ("hrank", "eagleeye", "none")
    assert abs(rep.removed_fraction - 0.6837) <= TOLERANCE and "layer_ratios" in rep.extra
    _, rep = lopfast.prune(model, X, criterion="fpgm", target_removed=0.6837)
    assert rep.method == "fpgm+uniform" and abs(rep.removed_fraction - 0.6837) <= TOLERANCE
    # iterative steps reach the one-shot channel counts
    one, r1 = lopfast.prune(model, X, criterion="taylor", ratio=0.5, data=DATA, batches=1)
    it, r2 = lopfast.prune(model, X, criterion="taylor", procedure="iterative", steps=3, ratio=0.5, data=DATA,
                           batches=1)
    assert r2.layers == r1.layers and r2.extra["iterative_steps"] == 3


def test_bn_method_needs_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4))
    with pytest.raises(ValueError, match="BatchNorm"):
        lopfast.prune(net, X, method="bn", ratio=0.5)


# ---------------------------------------------------------------------------- HRank
def test_feature_map_ranks_match_one_map_at_a_time():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 4, 6, 5, generator=g)
    maps[0, 1] = torch.outer(torch.randn(6, generator=g), torch.randn(5, generator=g))  # rank 1
    maps[2, 3] = 0  # rank 0
    slow = torch.tensor([[int(torch.linalg.matrix_rank(maps[b, c])) for c in range(4)] for b in range(3)])
    assert torch.equal(feature_map_ranks(maps), slow)


def _hrank_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight[2] = 0  # filter 2 outputs a constant map: rank <= 1
        net[0].bias[2] = 1.0
    return net


def test_hrank_scores_match_direct_computation():
    net = _hrank_net()
    data = tiny_data(n_batches=2, batch=3, size=8, num_classes=3)
    scores = hrank_scores(net, data, batches=2)
    direct = torch.zeros(6)
    for x, _ in data:
        with torch.no_grad():
            out = net[0](x)
        for b in range(out.shape[0]):
            for c in range(6):
                direct[c] += float(torch.linalg.matrix_rank(out[b, c]))
    direct /= 6
    assert torch.allclose(scores["0"], direct)
    assert int(torch.argmin(scores["0"])) == 2
    # the low-rank filter is the one HRank removes
    pruned, report = lopfast.prune(net, torch.randn(1, 3, 8, 8), method="hrank", ratio=1 / 6 - 1e-3, data=data)
    assert report.layers["0"] == [6, 5]
    kept = [0, 1, 3, 4, 5]
    assert torch.equal(pruned[0].weight, net[0].weight[kept])


# ---------------------------------------------------------------------------- ThiNet
def test_thinet_samples_one_filter_per_position_and_sum_to_the_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 5, 9, 9)
    z, y = sampled_contributions(conv, x, 7, torch.Generator().manual_seed(3))
    assert z.shape == (5, 2 * 7) and torch.allclose(z.sum(0), y)
    # every sample is one output value of the conv (pre-bias) at some (image, location, filter)
    ref = F.conv2d(x, conv.weight, None, 2, 1).double()  # (B, O, H, W)
    for s in range(2 * 7):
        img = s // 7  # positions are drawn per image
        assert torch.isclose(ref[img], y[s], atol=1e-5).any()
    lin = nn.Linear(5, 3)
    xl = torch.randn(4, 5)
    z, y = sampled_contributions(lin, xl, 2, torch.Generator().manual_seed(0))
    assert z.shape == (5, 8) and any(torch.isclose((xl.double() @ lin.weight.double().T), v).any() for v in y)


def test_thinet_order_matches_brute_force_greedy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 40, generator=g)
    z[4] *= 0.01  # nearly useless channel
    removed, order = [], []
    for _ in range(6):
        best = min((c for c in range(6) if c not in removed),
                   key=lambda c: float(z[removed + [c]].sum(0).pow(2).sum()))
        removed.append(best)
        order.append(best)
    assert thinet_order(z).tolist() == order
    assert order[0] == 4


def test_thinet_rescaling_brings_the_next_layer_closer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    data = tiny_data(n_batches=1, batch=4, size=8, num_classes=3)
    x = data[0][0]

    @torch.no_grad()
    def err(pruned):
        ref = net[2](net[1](net[0](x)))
        got = pruned[2](pruned[1](pruned[0](x)))
        return float((ref - got).pow(2).mean())

    kw = dict(method="thinet", ratio=0.5, data=data, positions=64, ignored=["2"])
    plain, _ = lopfast.prune(net, x[:1], rescale=False, **kw)
    rescaled, report = lopfast.prune(net, x[:1], **kw)
    assert "2" in report.extra["rescaled_layers"]
    assert err(rescaled) < err(plain)


# ---------------------------------------------------------------------------- EagleEye / ADMM
def test_eagleeye_adaptive_bn_and_seed():
    model = _net("mobilenetv2")
    opts = dict(method="eagleeye", target_removed=0.78, data=tiny_data(3), candidates=3, calib_batches=2,
                eval_batches=1)
    _, r1 = lopfast.prune(model, X, seed=0, **opts)
    _, r2 = lopfast.prune(model, X, seed=0, **opts)
    assert r1.extra["layer_ratios"] == r2.extra["layer_ratios"]
    assert len(r1.extra["candidate_scores"]) + r1.extra["failed_candidates"] == 3


@pytest.mark.filterwarnings("ignore:admm did not converge")
def test_admm_drives_dropped_channels_to_zero():
    model = _net("resnet")
    data = tiny_data(n_batches=4, batch=8)
    _, weak = lopfast.prune(model, X, method="admm", ratio=0.5, data=data, epochs=1, rho=1e-3)
    _, strong = lopfast.prune(model, X, method="admm", ratio=0.5, data=data, epochs=3, rho=1.0, lr=0.05)
    assert len(strong.extra["train_loss"]) == 3
    # a larger rho pulls the filters onto the channel-sparse set
    assert strong.extra["primal_residual"] < weak.extra["primal_residual"]


def test_amc_cost_model_matches_pruning_and_agent_learns():
    from lopfast.prune.engine import Engine, _forward, output_layers
    from lopfast.prune.importance import magnitude_importance
    from lopfast.prune.cost import CostModel

    model = _net("mobilenetv2")
    ignored = output_layers(model, X)
    engine, cm = Engine(model, X, ignored), CostModel(model, X, ignored, _forward)
    order = [n for n, _ in model.named_modules()]
    roots = [order.index(grp["root"]) for grp in cm.groups]
    assert roots == sorted(roots)  # AMC walks from input to output
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ratios = (0.9 * torch.rand(len(cm.groups), generator=g)).tolist()
        per_layer = {n: r for grp, r in zip(cm.groups, ratios) for n in grp["members"]}
        pruned, _ = engine.prune(magnitude_importance(1), per_layer)
        assert cm.cost(ratios)[0] == count_params(pruned)
    # budget walls keep every episode on target; the report carries the episode rewards
    _, report = lopfast.prune(model, X, method="amc", target_removed=0.78, data=DATA, episodes=6, warmup=3,
                              batch_size=4, hidden=32, val_batches=1, recon_batches=1)
    assert all(abs(ep["removed"] - 0.78) < 0.02 for ep in report.extra["episodes"])
    assert len(report.extra["episodes"]) == 6
    with pytest.raises(ValueError, match="max_ratio"):
        lopfast.prune(model, X, method="amc", target_removed=0.97, data=DATA, episodes=2, warmup=1, val_batches=1,
                      recon_batches=1)


def test_search_without_cost_model_prunes_every_trial(monkeypatch):
    from lopfast.prune.engine import Engine

    monkeypatch.setattr(Engine, "cost_model", lambda self, required=False: None)
    pruned, report = lopfast.prune(_net("resnet"), X, method="l1", target_removed=0.6837)
    assert abs(report.removed_fraction - 0.6837) <= TOLERANCE
    assert report.extra["prune_evaluations"] > 1
    assert pruned(X).shape == (1, 10)


def test_mlp_head_with_batchnorm1d_and_broken_trace():
    def net(act):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), act,
                             nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))

    x = torch.randn(2, 3, 8, 8)
    pruned, report = lopfast.prune(net(nn.ReLU()), x, target_removed=0.5)
    assert abs(report.removed_fraction - 0.5) <= TOLERANCE and report.extra["prune_evaluations"] == 1
    assert pruned.eval()(x).shape == (2, 5)
    # torch-pruning mis-maps the flatten behind PReLU(1): refused rather than returned broken
    with pytest.raises(ValueError, match="no longer runs"):
        lopfast.prune(net(nn.PReLU()), x, target_removed=0.5)


def test_search_units_and_predicted_fractions():
    from lopfast.prune.engine import Engine, count_macs, output_layers
    from lopfast.prune.importance import magnitude_importance

    model = _net("resnet")
    engine = Engine(model, X, output_layers(model, X))
    pruned, _ = engine.prune(magnitude_importance(1), 0.5)
    # the cost model's two predictions are those of the real pruned model
    assert engine.predicted_fraction(0.5) == pytest.approx(engine.removed_fraction(pruned), abs=1e-12)
    assert engine.predicted_macs_fraction(0.5) == pytest.approx(1 - count_macs(pruned, X) / count_macs(model, X),
                                                               abs=0.02)
    prune_at = lambda r: engine.prune(magnitude_importance(1), r)  # noqa: E731
    with pytest.raises(ValueError, match="unit must be 'params' or 'macs', got 'flops'"):
        engine.search(prune_at, 0.5, unit="flops")
    with pytest.raises(ValueError, match="only .* of the MACs go"):
        engine.search(prune_at, 0.9, hi=0.3, unit="macs")
    with pytest.raises(ValueError, match="only .* of the parameters go"):
        engine.search(prune_at, 0.9, hi=0.3)


def test_inputs_and_data_are_checked_by_a_trial_forward():
    model = _net("resnet")
    model.train()
    with pytest.raises(ValueError, match=r"example_inputs \(shape \(1, 5, 16, 16\)\) does not run through model"):
        lopfast.prune(model, torch.randn(1, 5, 16, 16), method="l1", ratio=0.5)
    with pytest.raises(ValueError, match="data yielded no batches"):
        lopfast.prune(model, X, method="taylor", ratio=0.5, data=[])
    small = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"per-sample shape \(3, 8, 8\) but example_inputs has \(3, 16, 16\)"):
        lopfast.prune(model, X, method="taylor", ratio=0.5, data=small)
    short = [(torch.randn(4, 3, 16, 16), torch.zeros(3, dtype=torch.long))]
    with pytest.raises(ValueError, match="targets have 3 entries for 4 inputs"):
        lopfast.prune(model, X, method="taylor", ratio=0.5, data=short)
    assert model.training  # the trial forwards restore the mode


def test_flops_budget_needs_target_removed():
    with pytest.raises(ValueError, match="budget='flops' needs target_removed"):
        lopfast.prune(_net("resnet"), X, method="eagleeye", ratio=0.5, data=DATA, budget="flops")
