"""The whole flow on torchvision and timm models (issue 12), and the failures it found.

Every model of ``lopfast.pipeline.zoocheck.ZOO``: prune half the parameters -> expand convs and
linears -> one SP-distilled step -> contract -> save -> ``lopfast.load(path)`` without
``model=`` -> bitwise identical outputs. Models marked heavy run with ``LOPFAST_ZOO=all``;
``python -m lopfast.cli zoo`` prints the README table.
"""
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lopfast

pytest.importorskip("torch_pruning")
tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from lopfast.pipeline.zoocheck import ZOO, ZooModel, check_model  # noqa: E402

RUN_HEAVY = os.environ.get("LOPFAST_ZOO", "") == "all"


def _param(entry: ZooModel):
    marks = []
    if entry.skip:
        marks.append(pytest.mark.skip(reason=entry.skip))
    elif entry.heavy:
        marks.append(pytest.mark.heavy)
        if not RUN_HEAVY:
            marks.append(pytest.mark.skip(reason=f"heavy ({entry.heavy}); LOPFAST_ZOO=all runs it"))
    return pytest.param(entry, id=entry.key, marks=marks)


@pytest.fixture(autouse=True)
def _one_thread():
    # small inputs: extra threads only add synchronisation on a shared 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("entry", [_param(e) for e in ZOO])
def test_zoo_flow(entry, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's and the models' own warnings
        r = check_model(entry, workdir=str(tmp_path))
    assert 0.35 < r["removed"] < 0.75, r
    assert r["load_identical"]
    assert r["sp_pairs"] > 0
    assert r["training_forward"]  # auxiliary heads included (tv:googlenet+aux)


def test_zoo_measures_latency(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = check_model(ZooModel("timm:regnetx_002"), workdir=str(tmp_path),
                        measure={"train_batch": 4, "rounds": 3, "warmup": 1, "budget_s": 0.01})
    lat = r["latency"]
    assert set(lat["models"]) == {"original", "pruned", "final"} and lat["batches"] == [1, 4]
    assert lat["speedup"]["final"]["4"]["eager"] > 0 and lat["macs_reduction"]["final"] > 1
    from lopfast.pipeline.zoocheck import markdown_table

    assert "speed-up b4" in markdown_table([r]) and "final (contracted)" in markdown_table([r])


# ---------------------------------------------------------------------------- the failures of issue 12
def test_shufflenet_is_pruned_not_refused():
    """Was a bare ZeroDivisionError from torch-pruning's reshape rule, then (issue 12) a refusal; now
    pruned through the shuffle (lopfast.prune.shuffle; the zoo flow covers save/load)."""
    model = tv.models.shufflenet_v2_x0_5().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, rep = lopfast.prune(model, torch.randn(2, 3, 32, 32), target_removed=0.5)
    assert abs(rep.removed_fraction - 0.5) <= 0.005
    assert pruned.stage4[0].branch1[2].out_channels == pruned.stage4[0].branch2[5].out_channels < 96


def test_vit_heads_pruned_and_recovered(tmp_path):
    """ViT recovery: whole heads and MLP channels pruned (num_heads given to torch-pruning), linears
    expanded, SP distillation from each block's output tokens, contracted, saved, reloaded.

    The taps are the transformer blocks' outputs (``blocks.i``, the residual stream, B x N x C):
    every later block reads it, teacher and student have it for the same tokens, and one tap per
    block covers both its attention and its MLP (tapping the expanded linears instead would give
    4 taps per block, the qkv one mixing queries, keys and values of all heads).
    """
    torch.manual_seed(0)
    teacher = lopfast.build_model("timm:vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8).eval()
    x = torch.randn(4, 3, 32, 32)
    y = torch.arange(4) % 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = lopfast.prune(teacher, x, ratio=0.4)
    heads = [b.attn.num_heads for b in pruned.blocks]
    assert heads == [1] * len(pruned.blocks), heads  # 3 heads, ceil(0.4 * 3) = 2 removed
    assert all(b.attn.head_dim == 64 for b in pruned.blocks)  # whole heads go, head dims stay
    assert all(b.mlp.fc1.out_features < 768 for b in pruned.blocks)
    assert 0.3 < report.removed_fraction < 0.8
    with torch.no_grad():
        ref = pruned(x)
    student = lopfast.expand(pruned, 2.0, linear=True)
    assert any(isinstance(m, lopfast.ExpandedLinear) for m in student.modules())
    with torch.no_grad():
        assert torch.allclose(student.eval()(x), ref, rtol=1e-4, atol=1e-5)
    taps = [f"blocks.{i}" for i in range(len(student.blocks))]
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=2e-5)
    losses = []
    with lopfast.SPDistiller(teacher, student, layers=taps) as d:
        for _ in range(5):
            out, sp = d(x)
            opt.zero_grad()
            sp.backward()  # SP alone: the student's token similarities must move toward the teacher's
            opt.step()
            losses.append(sp.item())
        out, sp = d(x)
        (F.cross_entropy(out, y) + sp).backward()  # and the usual step runs
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None for m in student.modules() if isinstance(m, lopfast.ExpandedLinear)
               for p in m.parameters() if p.requires_grad)
    final = lopfast.contract(student.eval())
    with torch.no_grad():
        assert torch.allclose(final(x), student(x), rtol=1e-4, atol=1e-5)
    lopfast.save(final, tmp_path / "vit.pt", arch="timm:vit_tiny_patch16_224",
                 arch_kwargs={"num_classes": 10, "img_size": 32, "patch_size": 8})
    loaded = lopfast.load(tmp_path / "vit.pt").eval()
    assert [b.attn.num_heads for b in loaded.blocks] == heads
    with torch.no_grad():
        assert torch.equal(loaded(x), final(x))


class _AuxNet(nn.Module):
    """An auxiliary head that runs only in training (as GoogLeNet's / Inception's)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        out = self.head(h.mean((2, 3)))
        if self.training:
            return out, self.aux(h).mean((1, 2, 3))
        return out


def test_sp_default_pairing_leaves_out_layers_that_do_not_run_in_both():
    """Was 'tapped modules ['aux1.conv.conv', ...] did not run' on googlenet."""
    torch.manual_seed(0)
    teacher = _AuxNet().eval()
    student = lopfast.expand(teacher, 2.0, linear=True).train()
    x = torch.randn(4, 3, 8, 8)
    with lopfast.SPDistiller(teacher, student) as d:
        with pytest.warns(UserWarning, match="aux"):
            (out, _), sp = d(x)
        assert d.dropped == ["aux"]
        assert torch.isfinite(sp)
        sp.backward()
    assert any(p.grad is not None for p in student.stem.parameters())
    # named layers must all run: the error stays
    with lopfast.SPDistiller(teacher, student, layers=["stem", "aux"]) as d:
        with pytest.raises(RuntimeError, match="aux"):
            d(x)


def test_googlenet_aux_heads_distilled_unpruned():
    """googlenet with its auxiliary heads: the default pairing drops them (they never run in the
    teacher's eval forward) and distils the rest."""
    torch.manual_seed(0)
    teacher = lopfast.build_model("tv:googlenet", num_classes=10, aux_logits=True).eval()
    student = lopfast.expand(teacher, 1.5, linear=True).train()
    with lopfast.SPDistiller(teacher, student) as d:
        with pytest.warns(UserWarning):
            out, sp = d(torch.randn(2, 3, 32, 32))
        assert sorted(d.dropped) == sorted(n for n in d.layers if n.startswith("aux"))
        assert len(d.dropped) == 6 and torch.isfinite(sp)


def test_cli_zoo_prints_the_table(capsys):
    from lopfast.cli import main

    assert main(["zoo", "timm:regnetx_002", "tv:swin_t", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "| `timm:regnetx_002` |" in out and "identical" in out
    assert "| `tv:swin_t` |" in out and "skipped: torch-pruning" in out
    assert main(["zoo", "tv:resnet19"]) == 2
    assert main(["zoo", "timm:regnetx_002", "--measure-batch", "0"]) == 2
