"""Pickle-free save/load: round trips of pruned, expanded and contracted models; refusal of
pickled, truncated and tampered files; the architecture registry."""
import os
import sys
import zipfile

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from nets import TinyMobileNetV2, TinyResNet  # noqa: E402

import lopfast  # noqa: E402
import lopfast.io as lio  # noqa: E402
from lopfast.io import ModelFileError  # noqa: E402

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    monkeypatch.setattr(lio, "_ARCHITECTURES", {})


pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned(net_cls=TinyMobileNetV2):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    pruned, _ = lopfast.prune(net_cls(), X[:1], method="l1", ratio=0.4)
    return pruned.eval()


def _same(a, b):
    with torch.no_grad():
        return torch.equal(a(X), b(X))


@pytest.mark.parametrize("net_cls", [TinyMobileNetV2, TinyResNet])
def test_pruned_round_trip(tmp_path, net_cls):
    pruned = _pruned(net_cls)
    path = tmp_path / "pruned.pt"
    lopfast.save(pruned, path, note="pruned")
    loaded = lopfast.load(path, model=net_cls())
    assert _same(pruned, loaded)
    assert not loaded.training
    # the file is plain data: it opens with weights_only=True
    payload = torch.load(path, weights_only=True)
    assert payload["metadata"] == {"note": "pruned"}


def test_expanded_and_contracted_round_trip(tmp_path):
    pruned = _pruned()
    expanded = lopfast.expand(pruned, 2.0, linear=True, linear_depth=3,
                              generator=torch.Generator().manual_seed(0)).eval()
    lopfast.set_mode(expanded, "chain")
    lopfast.save(expanded, tmp_path / "e.pt")
    loaded = lopfast.load(tmp_path / "e.pt", model=TinyMobileNetV2())
    assert isinstance(loaded.stem[0], lopfast.ExpandedConv2d) and loaded.stem[0].mode == "chain"
    assert isinstance(loaded.classifier[1], lopfast.ExpandedLinear) and loaded.classifier[1].depth == 3
    assert loaded.stem[0].rate == 2.0
    assert _same(expanded, loaded)
    # training continues: factors are real, trainable parameters
    loaded.train()
    loaded(X).sum().backward()
    assert loaded.stem[0].weight2.grad is not None

    contracted = lopfast.contract(expanded)
    lopfast.save(contracted, tmp_path / "c.pt")
    loaded = lopfast.load(tmp_path / "c.pt", model=TinyMobileNetV2())
    assert type(loaded.stem[0]) is nn.Conv2d
    assert _same(contracted, loaded)


def test_unpruned_model_and_map_location(tmp_path):
    torch.manual_seed(1)
    net = TinyResNet().eval()
    lopfast.save(net, tmp_path / "n.pt")
    loaded = lopfast.load(tmp_path / "n.pt", model=TinyResNet(), map_location="cpu")
    assert _same(net, loaded)


def test_registry_rebuilds_without_model(tmp_path):
    pruned = _pruned(TinyResNet)
    lopfast.register_architecture("tiny-resnet", TinyResNet)
    lopfast.save(pruned, tmp_path / "r.pt", arch="tiny-resnet", arch_kwargs={"num_classes": 10})
    loaded = lopfast.load(tmp_path / "r.pt")
    assert _same(pruned, loaded)
    with pytest.raises(ValueError, match="already registered"):
        lopfast.register_architecture("tiny-resnet", TinyMobileNetV2)
    lopfast.register_architecture("tiny-resnet", TinyMobileNetV2, overwrite=True)
    with pytest.raises(ModelFileError):
        lopfast.load(tmp_path / "r.pt")  # a different architecture does not fit
    with pytest.raises(TypeError, match="builder"):
        lopfast.register_architecture("x", 3)


def test_unknown_or_missing_arch(tmp_path):
    net = TinyResNet()
    lopfast.save(net, tmp_path / "a.pt", arch="not-registered-anywhere")
    with pytest.raises(ModelFileError, match="not registered"):
        lopfast.load(tmp_path / "a.pt")
    lopfast.save(net, tmp_path / "b.pt")
    with pytest.raises(ModelFileError, match="model="):
        lopfast.load(tmp_path / "b.pt")


def test_torchvision_arch(tmp_path):
    tv = pytest.importorskip("torchvision")
    net = tv.models.get_model("resnet18", num_classes=5).eval()
    lopfast.save(net, tmp_path / "tv.pt", arch="resnet18", arch_kwargs={"num_classes": 5})
    loaded = lopfast.load(tmp_path / "tv.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


_EXECUTED = []


class _Plain:
    pass


class _Payload:
    """Unpickling this would run code (append to _EXECUTED)."""

    def __reduce__(self):
        return (_EXECUTED.append, ("ran",))


def test_pickled_object_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": lio.FORMAT, "version": 1, "state_dict": {}, "structure": {}, "metadata": {},
                "x": _Payload()}, path)
    with pytest.raises(ModelFileError, match="pickled") as info:
        lopfast.load(path, model=TinyResNet())
    assert str(path) in str(info.value)
    assert _EXECUTED == []

    torch.save(_Plain(), tmp_path / "plain.pt")
    with pytest.raises(ModelFileError):
        lopfast.load(tmp_path / "plain.pt", model=TinyResNet())


def test_truncated_and_garbage_files_refused(tmp_path):
    good = tmp_path / "good.pt"
    lopfast.save(TinyResNet(), good)
    blob = good.read_bytes()
    for i, cut in enumerate((len(blob) // 2, 100, 10)):
        bad = tmp_path / f"cut{i}.pt"
        bad.write_bytes(blob[:cut])
        with pytest.raises(ModelFileError, match="cut") as info:
            lopfast.load(bad, model=TinyResNet())
        assert isinstance(info.value, ValueError)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2048))
    with pytest.raises(ModelFileError, match="garbage"):
        lopfast.load(garbage, model=TinyResNet())
    with pytest.raises(FileNotFoundError):
        lopfast.load(tmp_path / "missing.pt")


def test_tampered_files_refused(tmp_path):
    pruned = _pruned(TinyResNet)
    lopfast.save(pruned, tmp_path / "p.pt")
    payload = torch.load(tmp_path / "p.pt", weights_only=True)

    def write(name, p):
        # a consistent file (its digest recomputed) whose content is wrong in one way
        lio.write_payload(tmp_path / name, p)
        return tmp_path / name

    bad = dict(payload, structure=dict(payload["structure"]))
    bad["structure"]["stem.0"] = dict(bad["structure"]["stem.0"], out_channels=3)
    with pytest.raises(ModelFileError, match="do not fit"):
        lopfast.load(write("shape.pt", bad), model=TinyResNet())

    bad = dict(payload, state_dict={k: v for k, v in payload["state_dict"].items() if k != "fc.bias"})
    with pytest.raises(ModelFileError, match="fc.bias"):
        lopfast.load(write("missing.pt", bad), model=TinyResNet())

    bad = dict(payload, structure=dict(payload["structure"]))
    bad["structure"]["stem.0"] = {"type": "Conv2d", "in_channels": 3}
    with pytest.raises(ModelFileError, match="stem.0"):
        lopfast.load(write("spec.pt", bad), model=TinyResNet())

    bad = dict(payload, structure=dict(payload["structure"], **{"nowhere.conv": {"type": "Linear"}}))
    with pytest.raises(ModelFileError, match="nowhere.conv"):
        lopfast.load(write("path.pt", bad), model=TinyResNet())

    with pytest.raises(ModelFileError, match="format"):
        lopfast.load(write("other.pt", {"weights": torch.zeros(2)}), model=TinyResNet())
    with pytest.raises(ModelFileError, match="version"):
        lopfast.load(write("future.pt", dict(payload, version=99)), model=TinyResNet())
    # edited and written back by torch.save, the digest left as it was
    torch.save(dict(payload, metadata={"note": "edited"}), tmp_path / "edited.pt")
    with pytest.raises(ModelFileError, match="edited.pt: damaged: .*digest"):
        lopfast.load(tmp_path / "edited.pt", model=TinyResNet())
    # the digest removed from a current-version file
    torch.save({k: v for k, v in payload.items() if k != "digest"}, tmp_path / "stripped.pt")
    with pytest.raises(ModelFileError, match="stripped.pt: a version-3 .* without its digest"):
        lopfast.load(tmp_path / "stripped.pt", model=TinyResNet())

    # a zip member rewritten after the fact (not a valid record any more)
    src = tmp_path / "p.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "zip.pt", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data[: len(data) // 2]
            zout.writestr(item, data)
    with pytest.raises(ModelFileError):
        lopfast.load(tmp_path / "zip.pt", model=TinyResNet())


def test_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        lopfast.save(TinyResNet(), tmp_path / "m.pt", opt=object())
    with pytest.raises(TypeError, match="arch"):
        lopfast.save(TinyResNet(), tmp_path / "m.pt", arch=3)
    with pytest.raises(TypeError, match="model"):
        lopfast.save("net", tmp_path / "m.pt")
    with pytest.raises(TypeError, match="path"):
        lopfast.save(TinyResNet(), 3)
    lopfast.save(TinyResNet(), tmp_path / "m.pt")
    with pytest.raises(TypeError, match="model"):
        lopfast.load(tmp_path / "m.pt", model="net")
    assert not any(p.name.startswith(".lopfast-") for p in tmp_path.iterdir())  # no temp files left


# ---------------------------------------------------------------------------- layers of any class (issue 12)
class _LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm, a subclass as torchvision's / timm's LayerNorm2d."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _BatchNormAct(nn.BatchNorm2d):
    """BatchNorm + activation in one subclass, as timm's BatchNormAct2d."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class _Attention(nn.Module):
    """Fused-qkv attention whose forward reshapes with its num_heads / head_dim attributes."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class _Versioned(nn.Module):
    """Refuses a state dict without its version, as MNASNet's _load_from_state_dict does."""

    _version = 2

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class _Odd(nn.Module):
    def __init__(self, c=8, heads=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = _LayerNorm2d(c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)  # a raw parameter, as ConvNeXt's
        self.bn = _BatchNormAct(c)
        self.ver = _Versioned(c)
        self.attn = _Attention(c, heads)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        h = self.ver(self.bn(self.norm(self.conv(x)) * self.layer_scale))
        t = self.attn(h.flatten(2).transpose(1, 2))
        return self.fc(t.mean(1))


@torch.no_grad()
def _shrink(m: _Odd, keep: int, heads: int) -> _Odd:
    """Remove channels by hand, as a pruner does: tensors and the attributes that size them."""
    idx = torch.arange(keep)
    old = m.conv
    m.conv = nn.Conv2d(3, keep, 3, padding=1)
    m.conv.weight.copy_(old.weight[idx])
    m.conv.bias.copy_(old.bias[idx])
    m.norm.weight = nn.Parameter(m.norm.weight[idx])
    m.norm.bias = nn.Parameter(m.norm.bias[idx])
    m.norm.normalized_shape = (keep,)
    m.layer_scale = nn.Parameter(m.layer_scale[idx])
    for name in ("weight", "bias"):
        setattr(m.bn, name, nn.Parameter(getattr(m.bn, name)[idx]))
    m.bn.running_mean, m.bn.running_var = m.bn.running_mean[idx], m.bn.running_var[idx]
    m.bn.num_features = keep
    m.ver.scale = nn.Parameter(m.ver.scale[idx])
    qkv = m.attn.qkv
    m.attn.qkv = nn.Linear(keep, 3 * keep)
    m.attn.qkv.weight.copy_(qkv.weight[: 3 * keep, :keep])
    m.attn.num_heads, m.attn.head_dim = heads, keep // heads
    m.attn.proj = nn.Linear(keep, keep)
    m.fc = nn.Linear(keep, 3)
    return m


def test_layers_of_any_class_round_trip(tmp_path):
    """Subclassed norms, raw parameters, attention head counts and state-dict versions are rebuilt
    (convnext's LayerNorm2d/layer_scale, timm's BatchNormAct2d, ViT heads, mnasnet's _version)."""
    torch.manual_seed(0)
    lio.register_architecture("odd", _Odd)
    small = _shrink(_Odd(), keep=4, heads=2).eval()
    x = torch.randn(2, 3, 5, 5)
    lopfast.save(small, tmp_path / "odd.pt", arch="odd")
    loaded = lopfast.load(tmp_path / "odd.pt")
    assert loaded.attn.num_heads == 2 and loaded.attn.head_dim == 2
    assert loaded.norm.normalized_shape == (4,) and type(loaded.norm) is _LayerNorm2d
    assert loaded.bn.num_features == 4 and type(loaded.bn) is _BatchNormAct
    assert loaded.layer_scale.shape == (4, 1, 1) and isinstance(loaded.layer_scale, nn.Parameter)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    # the same into a model passed by the caller
    with torch.no_grad():
        assert torch.equal(lopfast.load(tmp_path / "odd.pt", model=_Odd()).eval()(x), small(x))
    # the file is plain data: the attributes and versions are in it, readable with weights_only
    payload = torch.load(tmp_path / "odd.pt", weights_only=True)
    assert payload["attributes"]["attn"]["num_heads"] == 2
    assert payload["state_dict_metadata"]["ver"]["version"] == 2


def test_state_dict_version_kept(tmp_path):
    """Was "version should be set to 1 or 2 instead of None" (mnasnet): the metadata was dropped."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), _Versioned(4))
    lopfast.save(net, tmp_path / "v.pt")
    lopfast.load(tmp_path / "v.pt", model=nn.Sequential(nn.Conv2d(3, 4, 1), _Versioned(4)))
    payload = torch.load(tmp_path / "v.pt", weights_only=True)
    del payload["state_dict_metadata"], payload["digest"]
    torch.save(dict(payload, version=1), tmp_path / "v1.pt")  # a version-1 file has no metadata
    with pytest.raises(ModelFileError, match="version should be set"):
        lopfast.load(tmp_path / "v1.pt", model=nn.Sequential(nn.Conv2d(3, 4, 1), _Versioned(4)))


def test_version1_file_still_loads(tmp_path):
    pruned = _pruned(TinyResNet)
    lopfast.save(pruned, tmp_path / "p.pt")
    payload = torch.load(tmp_path / "p.pt", weights_only=True)
    old = {k: v for k, v in payload.items() if k not in ("attributes", "state_dict_metadata", "digest")}
    torch.save(dict(old, version=1), tmp_path / "old.pt")
    assert _same(lopfast.load(tmp_path / "old.pt", model=TinyResNet()).eval(), pruned)


def test_mnasnet_round_trip_without_model(tmp_path):
    pytest.importorskip("torchvision")
    net = lopfast.build_model("tv:mnasnet0_5", num_classes=4).eval()
    lopfast.save(net, tmp_path / "m.pt", arch="tv:mnasnet0_5", arch_kwargs={"num_classes": 4})
    loaded = lopfast.load(tmp_path / "m.pt").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


# ---------------------------------------------------------------------------- one file format, checked
from damage import invert_bytes, truncate  # noqa: E402

OLD = os.path.join(os.path.dirname(__file__), "fixtures", "old_format")


def _sd_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bytes_inverted_inside_a_tensor_record_refused_naming_the_file(tmp_path):
    """Was: 64 inverted bytes in a weight loaded silently (torch's reader ignores the zip CRC)."""
    torch.manual_seed(0)
    net = TinyResNet().eval()
    path = tmp_path / "net.pt"
    lopfast.save(net, path)
    assert torch.load(path, weights_only=True)["digest"].startswith("sha256:")
    invert_bytes(path)
    assert not _sd_equal(torch.load(path, weights_only=True)["state_dict"], net.state_dict())  # torch reads it
    with pytest.raises(ModelFileError, match=r"net\.pt: damaged: .*digest"):
        lopfast.load(path, model=TinyResNet())
    with pytest.raises(ModelFileError, match=r"net\.pt: damaged"):
        lio.read(path)


def test_old_format_files_load_bit_equal_and_are_crc_checked(tmp_path):
    """Files written before files carried a digest load, exactly; damage in them is caught by the zip CRC."""
    import shutil

    path = os.path.join(OLD, "model_v2.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == 2 and "digest" not in raw
    model = lopfast.load(path, model=lopfast.build_model("digitsnet", in_channels=1, num_classes=10, width=4))
    assert _sd_equal(model.state_dict(), raw["state_dict"])
    ck = lio.load_checkpoint(os.path.join(OLD, "ckpt_v2.pt"))
    raw = torch.load(os.path.join(OLD, "ckpt_v2.pt"), weights_only=True)
    assert ck["epoch"] == 0 and _sd_equal(ck["model"], raw["model"]) and ck["rng"]["python"] == raw["rng"]["python"]
    for name in ("model_v2.pt", "ckpt_v2.pt"):
        bad = tmp_path / name
        shutil.copy(os.path.join(OLD, name), bad)
        record = invert_bytes(bad)
        reader = lio.load_checkpoint if name.startswith("ckpt") else lio.read
        with pytest.raises(ModelFileError, match=rf"{name}: damaged .*{record}.* CRC"):
            reader(bad)


def _checkpoint_state():
    torch.manual_seed(0)
    net = TinyResNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(X).sum().backward()
    opt.step()
    import random

    return {"epoch": 3, "step": 12, "amp": None, "model": net.state_dict(), "optimizer": opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "history": [{"epoch": 1, "test_acc": 12.5, "sp_loss": None}], "config": {"lr": 0.1, "milestones": [2]}}


def test_checkpoint_round_trip_digest_checked_and_refused_when_damaged(tmp_path):
    state = _checkpoint_state()
    path = tmp_path / "sub" / "ckpt.pt"
    lio.save_checkpoint(state, path)  # makes the folder
    ck = lio.load_checkpoint(path)
    assert ck["format"] == lio.CHECKPOINT_FORMAT and ck["epoch"] == 3 and _sd_equal(ck["model"], state["model"])
    assert ck["model"]._metadata == state["model"]._metadata and ck["rng"]["python"] == state["rng"]["python"]
    assert lio.content_digest({k: v for k, v in ck.items() if k != "digest"}) == ck["digest"]
    good = path.read_bytes()
    invert_bytes(path)
    with pytest.raises(ModelFileError, match=r"ckpt\.pt: damaged: .*digest"):
        lio.load_checkpoint(path)
    path.write_bytes(good)
    truncate(path, 0.7)
    with pytest.raises(ModelFileError, match=r"ckpt\.pt: not a lopfast checkpoint .*truncated"):
        lio.load_checkpoint(path)
    # a model file is not a checkpoint, and the other way round
    lopfast.save(TinyResNet(), tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match=r"model\.pt: a model file, not a training checkpoint"):
        lio.load_checkpoint(tmp_path / "model.pt")
    path.write_bytes(good)
    with pytest.raises(ModelFileError, match=r"ckpt\.pt: a training checkpoint .*not a model file"):
        lopfast.load(path, model=TinyResNet())


def test_truncated_files_of_every_kind_refused(tmp_path):
    lopfast.save(TinyResNet(), tmp_path / "m.pt")
    lio.save_checkpoint(_checkpoint_state(), tmp_path / "c.pt")
    for name, reader in (("m.pt", lio.read), ("c.pt", lio.load_checkpoint)):
        for keep in (0.99, 0.5, 0.0):
            truncate(tmp_path / name, keep)
            with pytest.raises(ModelFileError, match=rf"{name}: not a lopfast"):
                reader(tmp_path / name)


class _Interrupt(BaseException):
    pass


@pytest.mark.parametrize("kind", ["model", "checkpoint"])
def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch, kind):
    path = tmp_path / "f.pt"
    write = ((lambda: lopfast.save(TinyResNet(), path)) if kind == "model"
             else (lambda: lio.save_checkpoint(_checkpoint_state(), path)))
    write()
    old = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise _Interrupt  # a kill or Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(_Interrupt):
        write()
    monkeypatch.undo()
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["f.pt"]
    (lio.read if kind == "model" else lio.load_checkpoint)(path)


def test_content_digest_is_canonical():
    d = lio.content_digest
    assert d({"a": 1, "b": [1, 2]}) == d({"b": (1, 2), "a": 1})  # order and list/tuple alike
    assert d({"a": 1}) != d({"a": 1.0}) != d({"a": True})
    assert d({0: "x"}) != d({"0": "x"})
    t = torch.arange(6.0).reshape(2, 3)
    assert d({"w": t}) == d({"w": t.t().contiguous().t()}) != d({"w": t.reshape(3, 2)})
    assert d({"w": t}) != d({"w": t.double()})
    with pytest.raises(TypeError, match="object"):
        d({"x": object()})
