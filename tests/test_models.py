"""Model zoo: documented parameter counts, shapes, pruned-model rebuild, torchvision lazily."""
import pytest
import torch
import torch.nn as nn

from lopfast.pipeline import models as zoo

# documented in lopfast/pipeline/models.py (10 classes)
PARAMS = {
    "digitsnet": 77_290,
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet56": 855_770,
    "resnet110": 1_730_714,
    "vgg16": 14_724_042,
    "mobilenet_v2": 2_236_682,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_forward(name):
    model = zoo.build_model(name)
    assert zoo.count_params(model) == PARAMS[name]
    size, ch = (8, 1) if name == "digitsnet" else (32, 3)
    if name in ("resnet110", "vgg16", "mobilenet_v2"):
        return  # counts are enough; their forward is covered by the smaller nets' code paths
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, ch, size, size)).shape == (2, 10)


def test_in_channels_and_num_classes():
    m = zoo.build_model("resnet20", in_channels=1, num_classes=7)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    m = zoo.build_model("digitsnet", in_channels=3, num_classes=4, width=8)
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_mobilenet_forward_small_batch():
    m = zoo.build_model("mobilenet_v2", num_classes=3).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_bad_names_and_args():
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        zoo.build_model("resnet21")
    with pytest.raises(TypeError, match="model must be a model name"):
        zoo.check_model_name(3)
    with pytest.raises(ValueError, match="num_classes"):
        zoo.build_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="6n\\+2"):
        zoo.CifarResNet(depth=21)


def _stage_roundtrip(tmp_path, model, arch, arch_kwargs):
    """Through the pipeline's stage hand-off (lopfast.save / lopfast.load, no model=)."""
    from lopfast.pipeline import runner

    path = str(tmp_path / "model.pt")
    runner.save_model_file(model, path, arch, arch_kwargs)
    return runner.load_model_file(path)


def test_stage_file_rebuilds_pruned_model(tmp_path):
    torch.manual_seed(0)
    # hand-shrink like a channel pruner: halve layer1's inner width
    pruned = zoo.build_model("digitsnet", width=8)
    pruned.layer1.conv1 = nn.Conv2d(8, 4, 3, 1, 1, bias=False)
    pruned.layer1.bn1 = nn.BatchNorm2d(4)
    pruned.layer1.conv2 = nn.Conv2d(4, 8, 3, 1, 1, bias=False)
    model = _stage_roundtrip(tmp_path, pruned, "digitsnet", {"width": 8})
    x = torch.randn(2, 1, 8, 8)
    model.eval(), pruned.eval()
    assert torch.equal(model(x), pruned(x))


def test_stage_file_keeps_depthwise(tmp_path):
    m = zoo.build_model("mobilenet_v2")
    blk = m.features[4].conv  # expand 1x1 -> depthwise -> project
    keep = blk[0].out_channels // 2
    blk[0] = nn.Conv2d(blk[0].in_channels, keep, 1, bias=False)
    blk[1] = nn.BatchNorm2d(keep)
    blk[3] = nn.Conv2d(keep, keep, 3, blk[3].stride, 1, groups=keep, bias=False)
    blk[4] = nn.BatchNorm2d(keep)
    blk[6] = nn.Conv2d(keep, blk[6].out_channels, 1, bias=False)
    loaded = _stage_roundtrip(tmp_path, m, "mobilenet_v2", {})
    assert loaded.features[4].conv[3].groups == keep
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), m.eval()(x))


def test_max_removable_fraction_bounds():
    f = zoo.max_removable_fraction(zoo.build_model("digitsnet"))
    assert 0.99 < f < 1.0


def _torchvision_ok():
    try:
        import torchvision.models  # noqa: F401
        return True
    except Exception:
        return False


def test_torchvision_missing_message():
    if _torchvision_ok():
        pytest.skip("torchvision is importable here")
    with pytest.raises(ImportError, match="needs torchvision"):
        zoo.build_model("resnet50")


@pytest.mark.skipif(not _torchvision_ok(), reason="torchvision does not import here")
def test_torchvision_models():
    m = zoo.build_model("tv:resnet18", num_classes=5, in_channels=1)
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def _timm_ok():
    try:
        import timm  # noqa: F401

        return True
    except Exception:
        return False


@pytest.mark.skipif(not _torchvision_ok(), reason="torchvision does not import here")
def test_torchvision_names_checked_and_stem_replaced():
    m = zoo.build_model("tv:efficientnet_b0", num_classes=7, in_channels=4)
    assert m(torch.randn(2, 4, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="no model"):
        zoo.build_model("tv:resnet19")
    with pytest.raises(ValueError, match="weights"):
        zoo.build_model("tv:resnet18", weights="IMAGENET1K_V1")
    assert zoo.check_model_name("tv:anything") == "tv:anything"  # checked when built
    # googlenet/inception: no auxiliary heads by default (as torchvision builds them with weights)
    assert zoo.build_model("tv:googlenet").aux1 is None
    assert zoo.build_model("tv:googlenet", aux_logits=True).aux1 is not None


@pytest.mark.skipif(not _timm_ok(), reason="timm does not import here")
def test_timm_models():
    m = zoo.build_model("timm:resnet10t", num_classes=3, in_channels=2).eval()
    assert m(torch.randn(1, 2, 32, 32)).shape == (1, 3)
    vit = zoo.build_model("timm:vit_tiny_patch16_224", num_classes=4, img_size=32)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="timm has no model"):
        zoo.build_model("timm:not_a_model_at_all")
    with pytest.raises(ValueError, match="pretrained"):
        zoo.build_model("timm:resnet10t", pretrained=True)
    with pytest.raises(ValueError, match="unknown model"):
        zoo.check_model_name("timm:")
    assert "timm:<timm model name>" in zoo.available_models()


@pytest.mark.skipif(not (_timm_ok() and _torchvision_ok()), reason="timm or torchvision does not import here")
@pytest.mark.parametrize("name,kwargs", [("tv:squeezenet1_1", {"in_channels": 1}),
                                         ("timm:convnext_atto", {"in_channels": 1})])
def test_load_by_name_without_model(tmp_path, name, kwargs):
    """A model built by name loads with no model=: the name and kwargs are in the file."""
    import lopfast

    m = zoo.build_model(name, num_classes=6, **kwargs).eval()
    lopfast.save(m, tmp_path / "m.pt", arch=name, arch_kwargs={"num_classes": 6, **kwargs})
    loaded = lopfast.load(tmp_path / "m.pt").eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


@pytest.mark.skipif(not _timm_ok(), reason="timm does not import here")
def test_stage_file_norm_subclasses_and_raw_parameters(tmp_path):
    """The pipeline's stage hand-off on a pruned ConvNeXt (LayerNorm2d, gamma) and timm BN-act layers."""
    pytest.importorskip("torch_pruning")
    import lopfast

    x = torch.randn(2, 3, 32, 32)
    for name in ("timm:convnext_atto", "timm:regnetx_002"):
        torch.manual_seed(0)
        pruned, _ = lopfast.prune(zoo.build_model(name).eval(), x, ratio=0.3)
        fresh = _stage_roundtrip(tmp_path, pruned, name, {})
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), pruned.eval()(x))
