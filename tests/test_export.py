"""Export of a pruned, expanded-then-contracted model: torch.export (.pt2), ONNX (checked with
onnxruntime), TorchScript (kept, no longer the default)."""
import copy
import warnings

import pytest
import torch

import lopfast
from lopfast.pipeline.export import DEFAULT_FORMATS, check_formats, export_model, load_exported

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def contracted():
    """A pruned ResNet (torchvision when installed), expanded, trained one step, contracted."""
    torch.manual_seed(0)
    name = "tv:resnet18"
    try:
        model = lopfast.build_model(name, num_classes=10).eval()
    except ImportError:
        name = "resnet20"
        model = lopfast.build_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned, _ = lopfast.prune(model, x, ratio=0.3)
        student = lopfast.expand(pruned, 1.5).train()
        with lopfast.SPDistiller(model, student) as d:
            out, sp = d(x)
            (out.square().mean() + sp).backward()
        with torch.no_grad():
            for p in student.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad
        final = lopfast.contract(student).eval()
    finally:
        torch.set_num_threads(n)
    return final, x


def test_default_is_not_torchscript():
    assert DEFAULT_FORMATS == ("pt2",)
    assert check_formats(["torch.export", "onnx"]) == ["pt2", "onnx"]
    with pytest.raises(ValueError, match="format"):
        check_formats(["tflite"])


def test_pt2_roundtrip(contracted, tmp_path):
    model, x = contracted
    path = export_model(model, str(tmp_path / "m"), "pt2", x, log=lambda *a: None)
    assert path.endswith(".pt2")
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        for batch in (x, torch.randn(5, 3, 32, 32)):  # the batch dimension is dynamic
            ref = model(batch)
            assert torch.allclose(loaded(batch), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_onnx_matches_onnxruntime(contracted, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, x = contracted
    path = export_model(model, str(tmp_path / "m"), "onnx", x, log=lambda *a: None)
    run = load_exported(path)
    with torch.no_grad():
        for batch in (x, torch.randn(3, 3, 32, 32)):
            ref = model(batch)
            out = run(batch)
            assert out.shape == ref.shape
            assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_torchscript_kept(contracted, tmp_path):
    model, x = contracted
    path = export_model(model, str(tmp_path / "m"), "torchscript", x, log=lambda *a: None)
    with torch.no_grad():
        assert torch.allclose(load_exported(path)(x), model(x), rtol=1e-5, atol=1e-6)


def test_export_check_catches_a_wrong_file(contracted, tmp_path):
    """The check after writing compares against the model: a file of another model fails it."""
    from lopfast.pipeline.export import check_export

    model, x = contracted
    path = export_model(model, str(tmp_path / "m"), "pt2", x, log=lambda *a: None)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    assert check_export(other, path, x[:2]) > 1e-2


def test_cli_export_default_pt2(contracted, tmp_path):
    from lopfast.cli import main

    model, _ = contracted
    lopfast.save(model, tmp_path / "model.pt", arch="tv:resnet18", arch_kwargs={"num_classes": 10})
    assert main(["export", str(tmp_path / "model.pt"), "--input-shape", "3,32,32"]) == 0
    assert (tmp_path / "model.pt2").exists() and not (tmp_path / "model.ts").exists()
    assert main(["export", str(tmp_path / "model.pt"), "--format", "tflite", "--input-shape", "3,32,32"]) == 2
