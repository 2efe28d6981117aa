"""Feature taps, teacher/student pairing after lopfast.expand, and SPDistiller."""
import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lopfast
from conftest import requires_triton


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyNet(nn.Module):
    def __init__(self, widths=(4, 6)):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1)
        self.layer1 = Block(widths[0], widths[0])
        self.layer2 = Block(widths[0], widths[1], stride=2)
        self.fc = nn.Linear(widths[1], 5)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def make_pair():
    teacher = TinyNet((4, 6))
    student = lopfast.expand(TinyNet((3, 5)), rate=2.0)  # a "pruned" net, expanded
    return teacher, student


# ----------------------------------------------------------------------------- taps


def test_taps_record_and_remove_hooks():
    net = TinyNet()
    x = torch.randn(2, 3, 8, 8)
    with lopfast.FeatureTaps(net, ["layer1", "layer2.conv1"]) as taps:
        net(x)
        a, b = taps.collect()
        assert a.shape == (2, 4, 8, 8) and b.shape == (2, 6, 4, 4)
        torch.testing.assert_close(a, net.layer1(F.relu(net.stem(x))))
        assert not no_hooks(net)
        with pytest.raises(RuntimeError, match="did not run"):
            taps.collect()
    assert no_hooks(net) and not taps.active
    taps.close()  # idempotent

    taps = lopfast.FeatureTaps(net, ["stem"], transform=lambda name, out: (name, out.sum()))
    net(x)
    assert taps.collect()[0][0] == "stem"
    taps.close()
    assert no_hooks(net)
    with pytest.raises(ValueError, match="nope"):
        lopfast.FeatureTaps(net, ["stem", "nope"])
    assert no_hooks(net)


# ----------------------------------------------------------------------------- pairs


def test_pairs_by_path_after_expand():
    teacher, student = make_pair()
    pairs = lopfast.sp_pairs(teacher, student)
    names = [n for n, _, _ in pairs]
    assert names == ["stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"]
    for n, t, s in pairs:
        assert isinstance(s, lopfast.ExpandedConv2d) and type(t) is nn.Conv2d
        assert t is teacher.get_submodule(n) and s is student.get_submodule(n)
    chosen = lopfast.sp_pairs(teacher, student, layers=["layer1", "layer2"])
    assert [n for n, _, _ in chosen] == ["layer1", "layer2"]
    with pytest.raises(ValueError, match="'layer9' in the teacher nor in the student"):
        lopfast.sp_pairs(teacher, student, layers=["layer9"])
    student.extra = nn.Identity()
    with pytest.raises(ValueError, match="'extra' in the teacher"):
        lopfast.sp_pairs(teacher, student, layers=["extra"])
    teacher.only_t = nn.Identity()
    with pytest.raises(ValueError, match="'only_t' in the student"):
        lopfast.sp_pairs(teacher, student, layers=["only_t"])
    with pytest.raises(ValueError, match="no expanded layer"):
        lopfast.sp_pairs(teacher, TinyNet())


# ----------------------------------------------------------------------------- distiller


def manual_loss(teacher, student, names, x):
    """Features computed by hand: one module at a time, no hooks."""
    feats = {}

    def walk(model, store):
        h = [model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: store.__setitem__(n, o)) for n in names]
        out = model(x)
        for hh in h:
            hh.remove()
        return out

    t_store, s_store = {}, {}
    teacher.eval()
    with torch.no_grad():
        walk(teacher, t_store)
    out = walk(student, s_store)
    loss = lopfast.sp_loss([s_store[n] for n in names], [t_store[n] for n in names], backend="torch")
    return out, loss / len(names)  # SPDistiller's default reduction: the mean over pairs


def test_distiller_matches_manual_and_trains():
    teacher, student = make_pair()
    teacher.train()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    with lopfast.SPDistiller(teacher, student, backend="torch", reduction="sum") as distiller:
        logits, sp = distiller(x)
        assert not teacher.training  # teacher runs in eval mode
        assert sp.dtype == torch.float32 and sp.dim() == 0 and sp.requires_grad
        # the teacher's activations are reduced to Grams in the hook and nothing is kept after a call
        assert distiller._teacher_taps.outputs == {} and distiller._student_taps.outputs == {}
        ref_out, ref_sp = manual_loss(teacher, student, distiller.layers, x)
        torch.testing.assert_close(logits, ref_out)
        torch.testing.assert_close(sp, ref_sp * len(distiller.layers))  # Eq. 11 literally
        loss = F.cross_entropy(logits, y) + 0.5 * sp
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert student.stem.weight1.grad is not None
    assert no_hooks(teacher) and no_hooks(student) and distiller.closed
    with pytest.raises(RuntimeError, match="closed"):
        distiller(x)

    d2 = lopfast.SPDistiller(teacher, student, layers=["layer1", "layer2"])
    _, sp2 = d2(x)
    _, ref2 = manual_loss(teacher, student, ["layer1", "layer2"], x)
    # the default reduction is the mean over pairs: DEFAULT_GAMMA does not depend on the pair count
    assert d2.reduction == "mean"
    torch.testing.assert_close(sp2, ref2)
    d2.close()
    assert no_hooks(teacher) and no_hooks(student)


def test_distiller_wrappers_and_student_forward():
    teacher, student = make_pair()
    x = torch.randn(4, 3, 8, 8)
    ref_out, ref_sp = manual_loss(teacher, student, [n for n, _, _ in lopfast.sp_pairs(teacher, student)], x)
    wrapped = nn.DataParallel(student)  # on CPU it just calls the module; hooks on the inner module
    with lopfast.SPDistiller(teacher, wrapped) as d:
        out, sp = d(x)
    torch.testing.assert_close(sp, ref_sp)
    calls = []

    def fwd(inp):
        calls.append(1)
        return student(inp)

    with lopfast.SPDistiller(teacher, student, student_forward=fwd) as d:
        out, sp = d(x)
    assert calls == [1]
    torch.testing.assert_close(sp, ref_sp)
    assert no_hooks(student) and no_hooks(teacher)


def test_distiller_ddp_single_process():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    teacher, student = make_pair()
    x = torch.randn(4, 3, 8, 8)
    names = [n for n, _, _ in lopfast.sp_pairs(teacher, student)]
    ref_out, ref_sp = manual_loss(teacher, student, names, x)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            ddp = nn.parallel.DistributedDataParallel(student)
            with lopfast.SPDistiller(teacher, ddp) as d:
                out, sp = d(x)
                (out.sum() + sp).backward()
            torch.testing.assert_close(sp, ref_sp)
            assert student.stem.weight1.grad is not None
        finally:
            dist.destroy_process_group()
    assert no_hooks(student)


@requires_triton
def test_distiller_triton_backend_matches_torch(device):
    """The Triton kernels (on the GPU, or through the interpreter on CPU) against the reference."""
    teacher, student = make_pair()
    teacher, student = teacher.to(device), student.to(device)
    x = torch.randn(5, 3, 8, 8, device=device)
    with lopfast.SPDistiller(teacher, student, backend="torch") as d:
        _, sp_ref = d(x)
        g_ref = torch.autograd.grad(sp_ref, student.stem.weight1)
    K = lopfast.kernels.sp_gram
    K.LAUNCHES.clear()
    with lopfast.SPDistiller(teacher, student, backend="triton") as d:
        _, sp = d(x)
        g = torch.autograd.grad(sp, student.stem.weight1)
    # the 5 teacher activations of the step in one Gram launch, the 5 student ones in another
    assert K.LAUNCHES["gram"] == 1 + 1 and K.LAUNCHES["sp_finish"] == 1
    torch.testing.assert_close(sp, sp_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-4, atol=1e-6)
