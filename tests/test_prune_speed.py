"""Pruning users can feel (issue 19): measured speed, round_to, the latency budget, auxiliary heads,
ShuffleNetV2."""
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

import lopfast

pytest.importorskip("torch_pruning")
tv = pytest.importorskip("torchvision")

from lopfast.pipeline.models import build_model  # noqa: E402
from lopfast.prune import latency as L  # noqa: E402
from lopfast.prune.cost import round_keep  # noqa: E402
from lopfast.prune.criteria import magnitude_first  # noqa: E402
from lopfast.prune.engine import Engine, output_layers  # noqa: E402
from lopfast.prune.tracing import Tracing, training_forward  # noqa: E402

FAST = {"rounds": 3, "warmup": 1, "budget_s": 0.01}


@pytest.fixture(autouse=True)
def _quiet_and_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(n)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private dispatch cache (the latency tables are cached there)."""
    from lopfast import dispatch

    monkeypatch.setenv("LOPFAST_CACHE_DIR", str(tmp_path / "cache"))
    dispatch.clear()
    yield tmp_path / "cache"
    dispatch.clear()


def _record(model, x, ratio, round_to=None):
    """Prune with the engine directly, to get the removal record (original indices)."""
    tr = Tracing(model, x)
    eng = Engine(model, x, output_layers(model, x, tr), round_to=round_to, tracing=tr)
    return eng.prune(magnitude_first(1), ratio)


@torch.no_grad()
def _masked(model, record):
    """``model`` with every removed channel silenced (its producing filters and BN affine zeroed):
    an exact pruning must compute what this computes."""
    import copy

    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    for (name, side), idxs in record.items():
        if side != "out":
            continue
        mod, idx = mods[name], torch.as_tensor(sorted(set(idxs)), dtype=torch.long)
        for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
            if p is not None:
                p[idx] = 0
    return m


def _widths(model):
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


# ---------------------------------------------------------------------------- round_to
def test_round_keep():
    assert round_keep(9, 16, 8) == 8 and round_keep(13, 16, 8) == 16 and round_keep(12, 16, 8) == 16  # ties up
    assert round_keep(3, 64, 8) == 8  # never 0 (torch-pruning's own round_to would remove the layer)
    assert round_keep(19, 20, 8) == 16  # 24 is wider than the layer
    assert round_keep(5, 6, 8) == 5  # narrower than round_to: unchanged (reported)
    assert round_keep(16, 16, 8) == 16 and round_keep(7, 16, 1) == 7


def test_round_to_widths_are_multiples_and_survive_expand_contract():
    """round_to=8: every pruned width a multiple of 8 -> expand -> contract keeps the widths and the function."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = _widths(model)
    pruned, rep = lopfast.prune(model, x, ratio=0.4, round_to=8)
    after = _widths(pruned)
    changed = [n for n in before if after[n] != before[n]]
    assert changed and all(after[n] % 8 == 0 for n in changed), {n: after[n] for n in changed}
    assert rep.round_to == 8 and rep.extra["round_to_unmet"] == []
    without = _widths(lopfast.prune(model, x, ratio=0.4, round_to=None)[0])
    assert any(without[n] % 8 for n in changed)  # the rounding did something
    pruned.eval()
    student = lopfast.expand(pruned, 2.0, linear=True).eval()
    final = lopfast.contract(student).eval()
    assert _widths(final) == after
    with torch.no_grad():
        ref = pruned(x)
        assert torch.allclose(student(x), ref, rtol=1e-4, atol=1e-5)
        assert torch.allclose(final(x), ref, rtol=1e-4, atol=1e-5)


def test_round_to_with_the_parameter_search_and_global_ranking():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = _widths(model)
    # 8-channel steps (of a 64-channel group coupling a whole stage) cannot hit every target: the
    # closest count the search finds, with a warning that says so
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pruned, rep = lopfast.prune(model, x, target_removed=0.6, round_to=8)
    assert abs(rep.removed_fraction - 0.6) < 0.03
    assert abs(rep.removed_fraction - 0.6) <= 0.005 or any("closest" in str(i.message) for i in w)
    counted = lopfast.prune(model, x, ratio=0.37, round_to=8)[1].removed_fraction
    assert abs(lopfast.prune(model, x, target_removed=counted, round_to=8)[1].removed_fraction - counted) <= 0.005
    assert all(w % 8 == 0 for n, w in _widths(pruned).items() if w != before[n])
    pruned, rep = lopfast.prune(model, x, ratio=0.5, global_pruning=True, round_to=8)
    assert all(w % 8 == 0 for n, w in _widths(pruned).items() if w != before[n])


def test_round_to_arguments():
    model = build_model("digitsnet", width=8).eval()
    x = torch.randn(2, 1, 8, 8)
    _, rep = lopfast.prune(model, x, ratio=0.5)  # "auto" on a CPU model: the CPU default
    from lopfast.prune.api import ROUND_TO_DEFAULT

    assert rep.round_to == ROUND_TO_DEFAULT["cpu"]
    for bad in (0, -8, 2.5, "8", True):
        with pytest.raises(ValueError, match="round_to"):
            lopfast.prune(model, x, ratio=0.5, round_to=bad)


# ---------------------------------------------------------------------------- auxiliary heads
def test_googlenet_aux_heads_pruned_consistently():
    """Was: `weight of size [128, 512, 1, 1], expected input[4, 175, 4, 4] to have 512 channels` at the
    first training forward (torch-pruning traced the eval forward only)."""
    torch.manual_seed(0)
    model = tv.models.googlenet(num_classes=10, init_weights=False).eval()  # torchvision's default: aux heads on
    assert model.aux_logits
    x = torch.randn(2, 3, 32, 32)
    pruned, rep = lopfast.prune(model, x, ratio=0.3)
    assert sorted(rep.extra["training_only_layers"])[:2] == ["aux1.conv.conv", "aux1.fc1"]
    assert {"aux1.fc2", "aux2.fc2", "fc"} <= set(rep.ignored)  # the auxiliary classifiers keep their classes
    assert pruned.aux1.conv.conv.in_channels < 512
    pruned.train()
    out = pruned(torch.randn(4, 3, 32, 32))
    assert out.logits.shape == out.aux_logits1.shape == (4, 10)
    # exact: the pruned model computes what the original computes with the removed channels silenced,
    # in the training forward (auxiliary outputs) too
    p2, record = _record(model, x, 0.3)
    ref = _masked(model, record)
    with torch.no_grad(), training_forward(ref), training_forward(p2):
        a, b = ref(x), p2(x)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-4, atol=1e-5)


def test_inception_aux_refused_below_its_size_and_pruned_at_299(tmp_path):
    torch.manual_seed(0)
    model = tv.models.inception_v3(num_classes=10, init_weights=False).eval()
    with pytest.raises(ValueError, match="auxiliary heads.*299"):
        lopfast.prune(model, torch.randn(2, 3, 80, 80), ratio=0.3)
    x = torch.randn(2, 3, 299, 299)
    pruned, rep = lopfast.prune(model, x, ratio=0.3)
    assert "AuxLogits.fc" in rep.ignored and pruned.AuxLogits.conv0.conv.in_channels < 768
    with torch.no_grad(), training_forward(pruned):
        out = pruned(x)
    assert out.aux_logits.shape == (2, 10)
    lopfast.save(pruned, tmp_path / "m.pt", arch="tv:inception_v3", arch_kwargs={"num_classes": 10, "aux_logits": True})
    loaded = lopfast.load(tmp_path / "m.pt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))


# ---------------------------------------------------------------------------- ShuffleNetV2
@pytest.mark.parametrize("bf,n", [(24, 4), (48, 8), (96, 4), (58, 4), (116, 8), (244, 8), (30, 1), (12, 2)])
def test_shuffle_plans_keep_every_split_balanced(bf, n):
    from lopfast.prune.shuffle import _simulate, plan_stage

    scores = torch.rand(bf, generator=torch.Generator().manual_seed(bf))
    for target in range(0, bf, max(1, bf // 7)):
        pairs = plan_stage(bf, n, target, scores)
        assert len(pairs) % (2 ** (n - 1)) == 0 and len(pairs) < bf
        _simulate(bf, n, pairs)  # raises on an unbalanced split
    if (bf, n) == (48, 8):
        assert plan_stage(bf, n, 24, scores) == []  # ShuffleNetV2 x0.5's middle stage cannot be narrowed
    if (bf, n) == (96, 4):
        assert len(plan_stage(bf, n, 48, scores)) == 48
        assert (96 - len(plan_stage(bf, n, 45, scores, round_to=16))) % 16 == 0


def test_shufflenet_pruned_exactly_through_the_shuffle():
    torch.manual_seed(0)
    model = tv.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with torch.no_grad():  # give BN non-trivial statistics so the check is not vacuous
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.running_mean.normal_(0, 0.2)
    x = torch.randn(2, 3, 32, 32)
    pruned, record = _record(model, x, 0.5)
    assert pruned.stage2[0].branch2[5].out_channels == 8 and pruned.stage4[0].branch2[5].out_channels == 48
    assert pruned.stage3[0].branch2[5].out_channels == 48  # its 8 blocks admit no balanced removal
    assert pruned.stage2[1].branch2[0].out_channels < 24  # inner branch channels (torch-pruning's groups)
    with torch.no_grad():
        assert torch.allclose(pruned(x), _masked(model, record)(x), rtol=1e-4, atol=1e-5)
    pruned2, rep = lopfast.prune(model, x, target_removed=0.5)
    assert abs(rep.removed_fraction - 0.5) <= 0.005
    assert rep.extra["shuffle_lanes"]["stage3"]["removed_pairs"] == 0
    pruned2.train()
    pruned2(torch.randn(4, 3, 32, 32)).sum().backward()
    with pytest.raises(ValueError, match="cost model"):
        lopfast.prune(model, x, budget="flops", target_removed=0.5)


# ---------------------------------------------------------------------------- measured speed
def test_timed_rounds_is_the_loop_of_median_time():
    from lopfast import dispatch

    t = dispatch.timed_rounds(lambda: sum(range(100)), "cpu", rounds=4, warmup=1)
    assert len(t) == 4 and all(v >= 0 for v in t)
    slow = dispatch.timed_rounds(lambda: __import__("time").sleep(0.02), "cpu", rounds=50, warmup=0, budget_s=0.05)
    assert 2 <= len(slow) < 50


def test_prune_measures_original_and_pruned():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    _, rep = lopfast.prune(model, x, ratio=0.5, measure={"train_batch": 8, **FAST})
    lat = rep.latency
    assert lat["batches"] == [1, 8] and lat["reference"] == "original" and lat["compile"] is False
    assert set(lat["models"]) == {"original", "pruned"}
    for name in ("original", "pruned"):
        for b in ("1", "8"):
            t = lat["models"][name][b]["eager"]
            assert t["n"] >= 3 and t["median_ms"] > 0 and t["min_ms"] <= t["median_ms"] <= t["max_ms"]
            assert t["iqr_ms"] >= 0 and t["throughput"] == pytest.approx(int(b) / (t["median_ms"] / 1e3))
            assert lat["models"][name][b]["compiled"] is None
    sp = lat["speedup"]["pruned"]["8"]["eager"]
    assert sp == pytest.approx(lat["models"]["original"]["8"]["eager"]["median_ms"]
                               / lat["models"]["pruned"]["8"]["eager"]["median_ms"])
    assert lat["macs_reduction"]["pruned"] == pytest.approx(rep.macs_before / rep.macs_after)
    text = rep.format_latency()
    assert "| pruned | 8 |" in text and "MACs reduction" in text and "cpu" in lat["device"]
    json.loads(rep.to_json())
    with pytest.raises(ValueError, match="measure: unknown keys"):
        lopfast.prune(model, x, ratio=0.5, measure={"batch": 3})


def test_compiled_timing_plumbing(monkeypatch):
    """The compiled column, without paying for inductor on a CPU: torch.compile is stubbed (the real
    one runs in the GPU suite); a model whose compile fails gets an error entry, the rest are timed."""
    calls = []

    def fake_compile(m, **kw):
        calls.append(kw)
        if getattr(m, "_refuse", False):
            raise RuntimeError("inductor cannot lower this\nsecond line")
        return m

    monkeypatch.setattr(torch, "compile", fake_compile)
    a, b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3)
    b._refuse = True
    lat = L.measure_latency({"a": a, "b": b}, torch.randn(2, 3, 8, 8), compile=True, **FAST)
    assert calls and all(k == {"mode": "default", "dynamic": False} for k in calls)
    assert lat["models"]["a"]["2"]["compiled"]["median_ms"] > 0
    assert lat["models"]["b"]["2"]["compiled"] == {"error": "RuntimeError: inductor cannot lower this"}
    assert "compile failed (b b=2)" in L.format_latency(lat)


def test_merge_refuses_different_settings():
    x = torch.randn(2, 3, 8, 8)
    a = L.measure_latency({"o": nn.Conv2d(3, 8, 3)}, x, **FAST)
    b = L.measure_latency({"p": nn.Conv2d(3, 4, 3)}, x, **FAST)
    merged = L.merge_latency(a, b, macs={"o": 4, "p": 2})
    assert merged["macs_reduction"]["p"] == 2 and "p" in merged["speedup"]
    c = L.measure_latency({"p": nn.Conv2d(3, 4, 3)}, x, train_batch=4, **FAST)
    with pytest.raises(ValueError, match="different settings"):
        L.merge_latency(a, c)


# ---------------------------------------------------------------------------- latency budget
def _fake_clock(monkeypatch):
    """Deterministic latencies: a layer costs its MACs, a model its MACs plus a fixed part."""
    from lopfast.prune import count_macs

    def fake_layer(self, cfg, cin, cout, rounds, budget_s):
        dw = cfg[0] == "conv" and cfg[7] == "dw"
        k = cfg[3][0] * cfg[3][1] if cfg[0] == "conv" else 1
        hw = math.prod(cfg[-1]) if cfg[0] == "conv" else 1
        return [[(ci * k * hw if dw else ci * co * k * hw) * 1e-6 for co in ([ci] if dw else cout)] for ci in cin]

    def fake_model_ms(model, example, **kw):
        return {"median_ms": count_macs(model, example[:1]) * 1e-6 + 0.05}

    monkeypatch.setattr(L.LayerTable, "_measure", fake_layer)
    monkeypatch.setattr(L, "model_ms", fake_model_ms)


def test_latency_budget_meets_the_speedup_by_measurement(monkeypatch, cache_dir):
    _fake_clock(monkeypatch)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned, rep = lopfast.prune(model, x, budget="latency", target_speedup=2.0, criterion="l1")
    na = rep.extra["netadapt"]
    assert rep.target_unit == "latency" and rep.target_speedup == 2.0 and rep.allocation == "netadapt"
    assert rep.extra["achieved_speedup"] >= 2.0
    # the least-pruned iteration that meets it: the one before it measured short of 2x
    measured = {m["iteration"]: m["measured_speedup"] for m in na["measurements"]}
    assert na["chosen_iteration"] in measured
    assert na["chosen_iteration"] - 1 in measured and measured[na["chosen_iteration"] - 1] < 2.0
    assert rep.extra["achieved_speedup"] == pytest.approx(1 / (1 - rep.macs_removed_fraction), rel=0.1)
    assert na["table_configs_measured"] > 0 and na["table_configs_cached"] == 0
    # the table is cached per device and layer: the second run measures no layer
    _, rep2 = lopfast.prune(model, x, budget="latency", target_speedup=1.5)
    assert rep2.extra["netadapt"]["table_configs_measured"] == 0 and rep2.extra["netadapt"]["table_configs_cached"] > 0
    assert rep2.extra["achieved_speedup"] >= 1.5
    _, rep2 = lopfast.prune(model, x, budget="latency", target_speedup=1.5, round_to=8)  # grid on multiples of 8
    assert rep2.extra["achieved_speedup"] >= 1.5 and rep2.extra["round_to_unmet"] == []
    before = _widths(model)
    assert all(w % 8 == 0 for n, w in rep2.layers.items() if w[1] != before[n] for w in [w[1]])
    # an unreachable speed-up: the most pruned network, with a warning, achieved < asked
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, rep3 = lopfast.prune(model, x, budget="latency", target_speedup=500.0)
    assert rep3.extra["achieved_speedup"] < 500 and any("short of" in str(i.message) for i in w)


def test_latency_budget_on_the_real_clock(cache_dir):
    """The real measurements, on a tiny net (no assertion on the noisy CPU speed-up itself)."""
    torch.manual_seed(0)
    model = build_model("digitsnet", width=8).eval()
    x = torch.randn(16, 1, 8, 8)
    _, rep = lopfast.prune(model, x, budget="latency", target_speedup=1.2, measure=FAST,
                           lut_points=3, rounds=3, budget_s=0.01, repeats=1, max_iters=40)
    assert rep.extra["achieved_speedup"] > 0 and rep.extra["netadapt"]["measurements"]
    assert rep.latency["models"]["pruned"]["16"]["eager"]["median_ms"] > 0
    cached = lopfast.dispatch.decisions()
    assert any(d["op"] == "prune.layer_latency" for d in cached)


def test_latency_budget_arguments():
    model = build_model("digitsnet", width=8).eval()
    x = torch.randn(2, 1, 8, 8)
    cases = [(dict(target_speedup=2.0, ratio=0.5), "needs budget='latency'"),
             (dict(budget="latency", target_speedup=0.9), "target_speedup must be a number > 1"),
             (dict(budget="latency", target_speedup=2.0, ratio=0.5), "not ratio or target_removed"),
             (dict(budget="latency", target_speedup=2.0, allocation="eagleeye"), "netadapt allocation"),
             (dict(budget="latency", target_speedup=2.0, global_pruning=True), "global_pruning"),
             (dict(budget="time", ratio=0.5), "budget must be one of"),
             (dict(allocation="netadapt", ratio=0.5), "pass budget='latency'"),
             (dict(budget="latency", target_speedup=2.0, lut_points=1), "lut_points")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            lopfast.prune(model, x, **kw)


# ---------------------------------------------------------------------------- pipeline and CLI
def test_run_config_and_flags_are_checked_before_work():
    from lopfast import cli
    from lopfast.pipeline.config import RunConfig

    for key, bad, msg in (("round_to", 0, "round_to"), ("round_to", "8", "round_to"),
                          ("target_speedup", 1.0, "target_speedup"), ("measure", "yes", "measure"),
                          ("measure_compile", 1, "measure_compile")):
        with pytest.raises(ValueError, match=msg):
            RunConfig(**{key: bad}).validate()
    for argv, flag in ((["--round-to", "x"], "--round-to"), (["--target-speedup", "1"], "--target-speedup")):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["prune"] + argv)
    args = cli.build_parser().parse_args(["run", "--round-to", "none", "--target-speedup", "1.5", "--no-measure"])
    assert (args.round_to, args.target_speedup, args.measure) == (None, 1.5, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_latency_eager_and_compiled():
    """On a GPU: CUDA-event timings, bf16 autocast and channels_last, the real torch.compile column,
    and round_to="auto" = 8 for a model on CUDA."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).cuda().eval()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    pruned, rep = lopfast.prune(model, x, ratio=0.45, measure={"train_batch": 64, "compile": True})
    assert rep.round_to == 8 and rep.extra["round_to_unmet"] == []
    lat = rep.latency
    assert lat["device_type"] == "cuda" and lat["amp"] == "bf16" and lat["channels_last"]
    for name in ("original", "pruned"):
        for b in ("1", "64"):
            assert lat["models"][name][b]["eager"]["median_ms"] > 0
            assert lat["models"][name][b]["compiled"]["median_ms"] > 0, lat["models"][name][b]["compiled"]


def test_round_to_auto_yields_to_the_asked_target(monkeypatch):
    """round_to="auto" (8 on CUDA) is a preference: a ratio is rounded; a target_removed the 8-channel
    steps cannot meet is cut with exact counts instead, and the report says so (a paper's 68.37 % stays)."""
    from lopfast.prune import api

    monkeypatch.setitem(api.ROUND_TO_DEFAULT, "cpu", 8)  # what a CUDA model gets
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = _widths(model)
    pruned, rep = lopfast.prune(model, x, ratio=0.4)
    assert rep.round_to == 8 and all(w % 8 == 0 for n, w in _widths(pruned).items() if w != before[n])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pruned, rep = lopfast.prune(model, x, target_removed=0.6)
    assert abs(rep.removed_fraction - 0.6) <= 0.005 and rep.round_to is None
    assert "exact counts used" in rep.extra["round_to_auto_dropped"]
    assert not any("closest" in str(i.message) for i in w)
