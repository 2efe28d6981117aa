"""lopfast inside other people's training code: torch.fx / torch.export of the expanded layers,
distiller hooks that survive pickling and deep copies, and torch.compile before or after the distiller."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import lopfast
from lopfast.pipeline.models import build_model


def _conv_net(c=3, w=8, classes=4):
    return nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                         nn.Conv2d(w, w, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, classes))


# --------------------------------------------------------------------------- torch.fx / torch.export
@pytest.mark.parametrize("mode", ["collapsed", "chain"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_expanded_conv_traces_with_fx_bit_identical(mode, padding_mode):
    m = lopfast.ExpandedConv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode, rate=2)
    m.mode = mode
    x = torch.randn(2, 4, 7, 7)
    gm = torch.fx.symbolic_trace(m)
    assert torch.equal(gm(x), m(x))
    gm(x).sum().backward()  # the traced graph is differentiable through the factors
    assert m.weight1.grad is not None


@pytest.mark.parametrize("depth", [2, 3])
def test_expanded_linear_traces_with_fx_bit_identical(depth):
    m = lopfast.ExpandedLinear(5, 3, depth=depth)
    x = torch.randn(4, 5)
    gm = torch.fx.symbolic_trace(m)
    assert torch.equal(gm(x), m(x))


def test_traced_expanded_conv_follows_autocast_at_run_time():
    """The precision choice (bf16 collapse under autocast) is made when the graph runs, not baked in."""
    m = lopfast.ExpandedConv2d(4, 6, 3, padding=1)
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gm(x), m(x))
        assert gm(x).dtype == torch.bfloat16


def test_expanded_layers_export():
    for m, x in ((lopfast.ExpandedConv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)),
                 (lopfast.ExpandedLinear(5, 3, depth=3), torch.randn(2, 5))):
        ep = torch.export.export(m, (x,))
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-6)


def test_pruned_expanded_resnet18_traces_and_exports():
    tp = pytest.importorskip("torch_pruning")  # noqa: F841
    torch.manual_seed(0)
    net = build_model("tv:resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    pruned, _ = lopfast.prune(net, x, target_removed=0.9)
    student = lopfast.expand(pruned, rate=1.5, linear=True).eval()
    gm = torch.fx.symbolic_trace(student)
    assert torch.equal(gm(x), student(x))
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "effective" in getattr(n.target, "__name__", "")]
    assert len(calls) == len(lopfast.expanded_modules(student))
    ep = torch.export.export(student, (x,))
    torch.testing.assert_close(ep.module()(x), student(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- hooks: pickle and deep copies
def _pair():
    torch.manual_seed(0)
    teacher = _conv_net()
    student = lopfast.expand(_conv_net(), rate=1.5)
    return teacher, student, torch.randn(4, 3, 6, 6)


def _tap_hooks(model):
    from lopfast.distill.taps import inert_hook

    live = [h for m in model.modules() for h in m._forward_hooks.values() if h is not inert_hook]
    inert = [h for m in model.modules() for h in m._forward_hooks.values() if h is inert_hook]
    return live, inert


def test_student_pickles_and_saves_while_distilling():
    teacher, student, x = _pair()
    with lopfast.SPDistiller(teacher, student) as d:
        d(x)
        buf = io.BytesIO()
        torch.save(student, buf)                 # a whole-model checkpoint mid-distillation
        clone = pickle.loads(pickle.dumps(student))
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for copy_ in (clone, loaded):
            assert _tap_hooks(copy_)[0] == []    # nothing of the distiller survives in the copy
            torch.testing.assert_close(copy_(x), student(x), rtol=0, atol=0)
        assert len(_tap_hooks(student)[0]) == len(d.layers)
        _, sp = d(x)                             # the distiller keeps working
        assert torch.isfinite(sp)


def test_deepcopy_inside_distiller_carries_no_live_hook():
    teacher, student, x = _pair()
    with lopfast.SPDistiller(teacher, student) as d:
        ema = copy.deepcopy(student)             # how EMA / SWA copies are made
        live, inert = _tap_hooks(ema)
        assert live == [] and len(inert) == len(d.layers)
        d._student_taps.clear()
        ema(x)
        assert d._student_taps.outputs == {}     # the copy records nothing into the open taps
        _, sp = d(x)
    assert _tap_hooks(student) == ([], [])       # close() removed every hook of the original
    ema(x)
    assert d._student_taps.outputs == {}
    torch.save(ema, io.BytesIO())                # and the copy can be saved


def test_timm_ema_made_inside_the_distiller_carries_no_live_hook():
    pytest.importorskip("timm")
    from timm.utils import ModelEmaV3

    teacher, student, x = _pair()
    with lopfast.SPDistiller(teacher, student) as d:
        ema = ModelEmaV3(student, decay=0.9)
        assert _tap_hooks(ema)[0] == []
        assert len(_tap_hooks(ema)[1]) == len(d.layers)
        d(x)
        ema.update(student)
    torch.save(ema, io.BytesIO())


def test_abandoned_taps_are_collected_and_leave_inert_calls():
    import gc

    _, student, x = _pair()
    taps = lopfast.FeatureTaps(student, ["0"])
    ref = __import__("weakref").ref(taps)
    del taps
    gc.collect()
    assert ref() is None                         # the module's hook does not keep the taps alive
    assert _tap_hooks(student) == ([], [])       # and __del__ removed it
    student(x)


# --------------------------------------------------------------------------- torch.compile in either order
def _sp_eager(teacher, student, x):
    with lopfast.SPDistiller(teacher, student) as d:
        return d(x)[1].detach()


@pytest.mark.parametrize("how", ["wrapper", "inplace", "forward"])
def test_student_compiled_and_run_before_the_distiller(how):
    teacher, student, x = _pair()
    ref = _sp_eager(teacher, student, x)
    compiled = None
    if how == "inplace":
        student.compile(backend="eager")
        run = student
    else:
        compiled = torch.compile(student, backend="eager")
        run = compiled
    for _ in range(3):                           # warm: no guard of the compiled code fails later by itself
        run(x)
    kwargs = {"wrapper": dict(student=compiled), "inplace": dict(student=student),
              "forward": dict(student=student, student_forward=compiled)}[how]
    with lopfast.SPDistiller(teacher, **kwargs) as d:
        for _ in range(2):
            _, sp = d(x)
            torch.testing.assert_close(sp.detach(), ref, rtol=1e-5, atol=1e-8)
    torch._dynamo.reset()


def test_student_compiled_after_the_distiller_and_after_close():
    teacher, student, x = _pair()
    ref = _sp_eager(teacher, student, x)
    d = lopfast.SPDistiller(teacher, student)
    compiled = torch.compile(student, backend="aot_eager")
    d.student_forward = compiled
    for _ in range(3):
        _, sp = d(x)
    torch.testing.assert_close(sp.detach(), ref, rtol=1e-5, atol=1e-7)
    taps = d._student_taps
    d.close()
    compiled(x)
    assert taps.outputs == {}                    # the compiled code stops calling the removed hooks
    torch._dynamo.reset()


def test_compiled_code_the_distiller_cannot_see_is_reported_with_the_remedy():
    teacher, student, x = _pair()
    step = torch.compile(lambda t: student(t), backend="eager")
    for _ in range(3):
        step(x)
    with lopfast.SPDistiller(teacher, student, student_forward=lambda t: step(t)) as d:
        with pytest.raises(RuntimeError, match=r"torch\.compiler\.reset\(\)"):
            d(x)
    torch._dynamo.reset()
