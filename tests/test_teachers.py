"""Portable teacher files (lopfast.pipeline.teachers): float16 on disk, float32 back, exactly the
rounded weights, and refused when damaged or not the teacher the run needs."""
import os
import shutil
import sys

import pytest
import torch

from lopfast.io import ModelFileError, save
from lopfast.pipeline import runner
from lopfast.pipeline.config import RunConfig
from lopfast.pipeline.models import build_model
from lopfast.pipeline.teachers import (TEACHER_FORMAT, load_teacher, round_to_half, save_teacher, teacher_info,
                                      tensor_digest)

sys.path.insert(0, os.path.dirname(__file__))
from damage import invert_bytes, truncate  # noqa: E402

KW = {"in_channels": 1, "num_classes": 10, "width": 16}
OLD = os.path.join(os.path.dirname(__file__), "fixtures", "old_format")


def _model():
    torch.manual_seed(0)
    m = build_model("digitsnet", **KW)
    m(torch.randn(8, 1, 8, 8))  # BN running stats that are not the defaults
    return m.eval()


def test_round_trip_is_half_the_size_and_exactly_the_rounded_weights(tmp_path):
    m = _model()
    full, small = str(tmp_path / "full.pt"), str(tmp_path / "teacher.pt")
    save(m, full, arch="digitsnet", arch_kwargs=KW)
    rounded = round_to_half(m)
    size = save_teacher(rounded, small, arch="digitsnet", arch_kwargs=KW, dataset="digits", acc=97.5, eval_split="test")
    assert size == os.path.getsize(small) < 0.6 * os.path.getsize(full)
    loaded, info = load_teacher(small, arch="digitsnet", dataset="digits", num_classes=10)
    assert info["acc"] == 97.5 and info["stored_dtype"] == "float16" and info["eval_split"] == "test"
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    for (k, a), b in zip(rounded.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(rounded(x), loaded.eval()(x))
    # rounding moved the weights by at most float16's step
    w, r = m.state_dict(), rounded.state_dict()
    for k in w:
        if w[k].is_floating_point():
            assert torch.allclose(w[k], r[k], rtol=2 ** -11, atol=1e-7), k
    # the record says what the file is; the file's own digest guards the weights
    info = teacher_info(small)
    assert info["format"] == TEACHER_FORMAT and info["dataset"] == "digits" and "digest" not in info
    assert torch.load(small, weights_only=True)["digest"].startswith("sha256:")


def test_values_float16_cannot_hold_stay_float32(tmp_path):
    m = _model()
    with torch.no_grad():
        next(b for n, b in m.named_buffers() if n.endswith("running_var"))[0] = 1e6
    path = str(tmp_path / "t.pt")
    save_teacher(m, path, arch="digitsnet", arch_kwargs=KW, dataset="digits")
    info = teacher_info(path)
    assert len(info["float32_tensors"]) == 1 and info["float32_tensors"][0].endswith("running_var")
    loaded, _ = load_teacher(path)
    assert float(dict(loaded.named_buffers())[info["float32_tensors"][0]][0]) == 1e6


def test_damaged_or_wrong_teachers_are_refused(tmp_path):
    path = str(tmp_path / "t.pt")
    save_teacher(_model(), path, arch="digitsnet", arch_kwargs=KW, dataset="digits", acc=90.0)
    payload = torch.load(path, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = payload["state_dict"][name].clone()
    payload["state_dict"][name].view(-1)[0] += 1
    bad = str(tmp_path / "edited.pt")
    torch.save(payload, bad)
    with pytest.raises(ModelFileError, match="edited.pt.*digest"):
        load_teacher(bad)
    with pytest.raises(ModelFileError, match="is a digitsnet, but the run's model is resnet20"):
        load_teacher(path, arch="resnet20")
    with pytest.raises(ModelFileError, match="trained on digits"):
        load_teacher(path, dataset="cifar10")
    with pytest.raises(ModelFileError, match="10 classes, the data has 100"):
        load_teacher(path, num_classes=100)
    # a plain lopfast.save file (a pipeline stage's model.pt) loads, with no record to check
    plain = str(tmp_path / "plain.pt")
    save(_model(), plain, arch="digitsnet", arch_kwargs=KW)
    assert load_teacher(plain, arch="digitsnet")[1] == {}


def test_a_run_takes_a_portable_teacher_in_float32(tmp_path):
    path = str(tmp_path / "t.pt")
    save_teacher(round_to_half(_model()), path, arch="digitsnet", arch_kwargs=KW, dataset="digits")
    cfg = RunConfig(model="digitsnet", model_kwargs={"width": 16}, dataset="digits", device="cpu", teacher=path,
                    test_subset=64)
    data, device = runner.prepare(cfg)
    teacher, acc = runner.Runner(cfg, runner.RunFolder(str(tmp_path)), data, device).teacher()
    assert next(teacher.parameters()).dtype == torch.float32 and 0 <= acc <= 100
    with pytest.raises(ModelFileError, match="resnet20"):
        runner.Runner(RunConfig(**{**cfg.to_dict(), "model": "resnet20", "model_kwargs": {}}),
                      runner.RunFolder(str(tmp_path)), data, device).teacher()


def test_a_damaged_or_truncated_teacher_is_refused_naming_it(tmp_path):
    path = str(tmp_path / "t.pt")
    save_teacher(round_to_half(_model()), path, arch="digitsnet", arch_kwargs=KW, dataset="digits")
    good = open(path, "rb").read()
    invert_bytes(path)
    with pytest.raises(ModelFileError, match=r"t\.pt: damaged: .*digest"):
        load_teacher(path)
    with pytest.raises(ModelFileError, match=r"t\.pt: damaged"):
        teacher_info(path)
    open(path, "wb").write(good)
    truncate(path, 0.8)
    with pytest.raises(ModelFileError, match=r"t\.pt: not a lopfast model file .*truncated"):
        load_teacher(path)


def test_a_teacher_file_of_the_previous_format_loads_bit_equal(tmp_path):
    """lopfast-teacher-1 files (float16 + a tensor digest, no file digest) load exactly, checked by
    their tensor digest and zip CRCs."""
    path = os.path.join(OLD, "teacher_v1.pt")
    raw = torch.load(path, weights_only=True)
    assert "digest" not in raw and raw["metadata"]["teacher"]["format"] == "lopfast-teacher-1"
    model, info = load_teacher(path, arch="digitsnet", dataset="digits", num_classes=10)
    assert info["acc"] == 50.0 and info["digest"] == tensor_digest(raw["state_dict"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["state_dict"][k].float()), k
    # edited and re-saved by torch (zip CRCs valid again): the tensor digest still catches it
    name = next(k for k, v in raw["state_dict"].items() if v.is_floating_point())
    raw["state_dict"][name].view(-1)[0] += 1
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(ModelFileError, match=r"edited\.pt: the stored weights do not match the teacher file's digest"):
        load_teacher(str(tmp_path / "edited.pt"))
    shutil.copy(path, tmp_path / "flipped.pt")
    invert_bytes(tmp_path / "flipped.pt")
    with pytest.raises(ModelFileError, match=r"flipped\.pt: damaged .*CRC"):
        load_teacher(str(tmp_path / "flipped.pt"))


@pytest.mark.usefixtures("no_training")
def test_a_damaged_model_file_given_as_teacher_stops_the_run_before_work(tmp_path, capsys):
    """Was: the damaged file trained a whole run."""
    from lopfast import cli

    path = str(tmp_path / "teacher.pt")
    save(_model(), path, arch="digitsnet", arch_kwargs=KW)
    invert_bytes(path)
    rc = cli.main(["run", "--model", "digitsnet", "--model-kwargs", '{"width": 16}', "--dataset", "digits",
                   "--device", "cpu", "--quiet", "--teacher", path, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}: damaged" in err and "Traceback" not in err, err
