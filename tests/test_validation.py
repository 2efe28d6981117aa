"""Bad input never passes silently (issue 20): every entry point checks before work, names the argument.

One test (or one parametrised row) per case of the issue, plus the ones found by probing the API
and the CLI as a hostile new user would. Most fail before any training: the CLI tests replace
the training loop by a function that fails the test if it is ever reached.
"""
import dataclasses
import errno
import json
import os
import re
import stat
import warnings

import pytest
import torch
import torch.nn as nn

import lopfast
from lopfast import cli
from lopfast.checks import InvalidArgument, NonFiniteValues, TrainingDiverged, nonfinite
from lopfast.pipeline import RunConfig, TrainConfig, build_model, load_data, train
from lopfast.pipeline import runner, stages
from lopfast.pipeline.runner import Plan
from lopfast.pipeline.settings import check_fields, declared, setting

BASE = ["--model", "digitsnet", "--dataset", "digits", "--device", "cpu", "--quiet"]
KW = {"in_channels": 1, "num_classes": 10}


def digitsnet(**kw):
    return build_model("digitsnet", **{**KW, **kw})


def save_teacher(path, arch="digitsnet", nan=False, **kw):
    kw = {**KW, **kw}
    m = build_model(arch, **kw)
    if nan:
        with torch.no_grad():
            next(m.parameters())[0].fill_(float("nan"))
    lopfast.save(m, str(path), arch=arch, arch_kwargs=kw)
    return str(path)


def run_cli(args, capsys):
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# ============================================================================ layers and surgery
@pytest.mark.parametrize("args, kwargs, name", [
    ((3, 8, 0), {}, "kernel_size"),
    ((0, 8, 3), {}, "in_channels"),
    ((3, 0, 3), {}, "out_channels"),
    ((4, 8, -1), {}, "kernel_size"),
    ((4, 8, 2.5), {}, "kernel_size"),
    (("3", 8, 3), {}, "in_channels"),
    ((4, 8, 3), {"stride": 0}, "stride"),
    ((4, 8, 3), {"padding": -1}, "padding"),
    ((4, 8, 3), {"dilation": 0}, "dilation"),
    ((4, 8, 3), {"groups": 3}, "in_channels"),
    ((4, 8, 3), {"dtype": torch.int32}, "dtype"),
])
def test_expanded_conv_sizes_are_checked_by_name(args, kwargs, name):
    # was: ZeroDivisionError (kernel_size=0, in_channels=0), a negative-size tensor, a format error
    with pytest.raises(InvalidArgument, match=rf"^{name} must be"):
        lopfast.ExpandedConv2d(*args, **kwargs)


def test_generator_must_be_a_cpu_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        lopfast.expand(nn.Conv2d(2, 2, 3), generator=5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        lopfast.ExpandedLinear.from_linear(nn.Linear(2, 2), generator="cpu")


def test_expand_unknown_skip_name_is_an_error():
    m = digitsnet()
    with pytest.raises(ValueError, match=r"skip must be names of submodules.*'nosuchlayer'"):
        lopfast.expand(m, skip=["nosuchlayer"])
    with pytest.raises(ValueError, match="did you mean 'layer1.conv2'"):
        lopfast.expand(m, skip="layer1.conv")
    e = lopfast.expand(m, skip=["layer1"])  # a real name still skips its subtree
    assert not any(n.startswith("layer1.") for n, _ in lopfast.expanded_modules(e))


def test_expand_refuses_nan_naming_the_layer_before_changing_anything():
    m = digitsnet()
    with torch.no_grad():
        m.layer2.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model holds NaN or infinite values \(in layer2.conv1.weight\)"):
        lopfast.expand(m, inplace=True)
    assert not lopfast.expanded_modules(m)  # not half expanded


def test_a_rate_too_large_for_memory_is_named_before_allocating(monkeypatch):
    with pytest.raises(InvalidArgument, match=r"rate must be small enough for the expanded factors to fit in "
                                              r"memory, got 100000.0; a 64->64 3x3 conv would get 368,640,819,200,000"):
        lopfast.ExpandedConv2d(64, 64, 3, rate=1e5)
    with pytest.raises(InvalidArgument, match=r"linear_rate must be .* a 512->512 linear"):
        lopfast.expand(nn.Sequential(nn.Flatten(), nn.Linear(512, 512)), linear=True, rate=2, linear_rate=1e6)
    # a 64 MiB machine: at rate 20 digitsnet's first convs fit, layer2.conv2 (64->64) does not, and
    # nothing of the inplace model may be left expanded
    import importlib

    decompose = importlib.import_module("lopfast.layers.decompose")  # the module, not the function it exports
    monkeypatch.setattr(decompose, "_device_bytes", lambda device: 64 * 2**20)
    lopfast.expand(nn.Sequential(nn.Conv2d(1, 32, 3)), rate=20.0)
    m = digitsnet()
    with pytest.raises(InvalidArgument, match="rate must be small enough for the expanded factors to fit in memory, "
                                              "got 20.0; a 64->64 3x3 conv"):
        lopfast.expand(m, rate=20.0, inplace=True)
    assert not lopfast.expanded_modules(m)


def test_expand_of_a_model_without_convs_warns():
    with pytest.warns(UserWarning, match="no nn.Conv2d to expand"):
        lopfast.expand(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="linear must be True or False"):
        lopfast.expand(digitsnet(), linear="yes")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lopfast.set_mode("resnet20", "chain")


def test_contract_refuses_nonfinite_factors_before_changing_anything():
    m = lopfast.expand(digitsnet())
    name, layer = lopfast.expanded_modules(m)[1]
    with torch.no_grad():
        layer.weight2[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteValues, match=re.escape(f"model holds NaN or infinite values (in {name}.weight2)")):
        lopfast.contract(m, inplace=True)
    assert len(lopfast.expanded_modules(m)) == len(lopfast.expanded_modules(lopfast.expand(digitsnet())))


def test_collapsed_forward_on_a_model_without_expanded_layers_warns():
    with pytest.warns(UserWarning, match="has no ExpandedConv2d, so there is nothing to collapse"):
        fast = lopfast.CollapsedForward(digitsnet())
    fast.remove()
    with pytest.raises(ValueError, match="backend must be one of .*'matmul'\\), got 'nosuch'"):
        lopfast.CollapsedForward(lopfast.expand(digitsnet()), backend="nosuch")


# ============================================================================ prune
@pytest.fixture(scope="module")
def tp():
    return pytest.importorskip("torch_pruning")


def test_prune_refuses_nonfinite_weights_buffers_inputs_and_data(tp):
    ex = torch.randn(2, 1, 8, 8)
    m = digitsnet()
    with torch.no_grad():
        m.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model holds NaN .*conv1.weight"):
        lopfast.prune(m, ex, target_removed=0.5)
    m = digitsnet()
    m.bn1.running_var.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"model holds NaN .*bn1.running_var"):
        lopfast.prune(m, ex, target_removed=0.5)
    with pytest.raises(ValueError, match="example_inputs holds NaN"):
        lopfast.prune(digitsnet(), torch.full_like(ex, float("nan")), target_removed=0.5)
    good = (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    bad = (torch.full((8, 1, 8, 8), float("nan")), torch.randint(0, 10, (8,)))
    with pytest.raises(ValueError, match=r"data holds NaN .*batch 1 inputs"):  # every batch, not the first only
        lopfast.prune(digitsnet(), ex, method="taylor", target_removed=0.5, data=[good, bad])
    with pytest.raises(ValueError, match=r"class targets in \[99, 99\] but the model has 10 outputs"):
        lopfast.prune(digitsnet(), ex, method="taylor", target_removed=0.5,
                      data=[(good[0], torch.full((8,), 99))])


# ============================================================================ save / load
def test_load_refuses_nonfinite_weights_unless_asked(tmp_path):
    p = save_teacher(tmp_path / "nan.pt", nan=True)
    with pytest.raises(lopfast.ModelFileError, match=r"nan.pt: the stored weights hold NaN .*conv1.weight"):
        lopfast.load(p)
    m = lopfast.load(p, allow_nonfinite=True)
    assert nonfinite(m.named_parameters()) == ["conv1.weight"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_refused_not_read_forever(tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    code = (f"import lopfast\ntry:\n    lopfast.load({str(fifo)!r})\nexcept lopfast.ModelFileError as e:\n"
            f"    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "not a regular file" in out.stdout, out.stderr[-2000:]


def test_load_of_random_bytes_is_not_called_a_pickle(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"garbage" * 50)
    with pytest.raises(lopfast.ModelFileError, match="not the zip archive"):
        lopfast.load(str(p))
    with pytest.raises(ValueError, match="map_location must be a torch device"):
        lopfast.load(save_teacher(tmp_path / "ok.pt"), map_location="bogus")


def test_save_keeps_the_mode_of_an_existing_file_and_writes_through_symlinks(tmp_path):
    m = digitsnet()
    new = tmp_path / "new.pt"
    old_umask = os.umask(0o027)
    try:
        lopfast.save(m, str(new))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o640  # 0666 minus the umask, as open() gives
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"old")
    os.chmod(existing, 0o644)
    lopfast.save(m, str(existing))
    assert stat.S_IMODE(existing.stat().st_mode) == 0o644  # was turned into 0600
    link = tmp_path / "link.pt"
    os.symlink(existing.name, link)
    lopfast.save(digitsnet(width=8), str(link))
    assert link.is_symlink()  # was replaced by a regular file
    assert lopfast.load(str(existing), model=digitsnet()).conv1.out_channels == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.pt", "link.pt", "new.pt"]  # no temp left


def test_a_failed_save_names_the_users_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    lopfast.save(digitsnet(), str(target))
    before = target.read_bytes()

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        lopfast.save(digitsnet(), str(target))
    assert str(target) in str(e.value) and ".tmp" not in str(e.value)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]

    def zip_writer_error(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", zip_writer_error)
    with pytest.raises(OSError, match=re.escape(repr(str(target)))):
        lopfast.save(digitsnet(), str(target))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="path must be a file path, not a directory"):
        lopfast.save(digitsnet(), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory .*nosuch"):
        lopfast.save(digitsnet(), str(tmp_path / "nosuch" / "m.pt"))


# ============================================================================ distillation
def test_distiller_names_what_it_needs():
    with pytest.raises(TypeError, match="teacher must be an nn.Module .*got 'resnet20'"):
        lopfast.SPDistiller("resnet20", lopfast.expand(digitsnet()))  # was an AttributeError
    with pytest.raises(TypeError, match="student must be an nn.Module"):
        lopfast.SPDistiller(digitsnet(), "student")
    with pytest.raises(TypeError, match="layers must be None or a list"):
        lopfast.SPDistiller(digitsnet(), lopfast.expand(digitsnet()), layers=5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lopfast.FeatureTaps("model", ["conv1"])


def test_partial_pairing_says_which_layers_were_left_out_and_why():
    teacher = build_model("resnet20", **KW)
    student = lopfast.expand(digitsnet())
    with pytest.warns(UserWarning, match=r"pairs only 1 of the student's 6 expanded layers; left out: "
                                         r"layer1.conv1 \(no module at this path in the teacher\)"):
        d = lopfast.SPDistiller(teacher, student)
    assert d.layers == ["conv1"] and len(d.unpaired) == 5
    # nothing sensible pairs: refused
    t = digitsnet()
    t.conv1, t.layer1, t.layer2 = nn.Identity(), nn.Identity(), nn.Identity()
    with pytest.raises(ValueError, match="none of the student's 6 expanded layers pairs"):
        lopfast.SPDistiller(t, student)
    # a same-named module of another kind is not a pair
    t = digitsnet()
    t.layer1.conv1 = nn.Identity()
    with pytest.warns(UserWarning, match=r"layer1.conv1 \(the teacher's 'layer1.conv1' is a Identity"):
        d = lopfast.SPDistiller(t, student)
    assert "layer1.conv1" not in d.layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching teacher pairs everything, silently
        assert len(lopfast.SPDistiller(digitsnet(), student).layers) == 6


@pytest.mark.parametrize("student_dtype, teacher_dtype, input_dtype", [
    (torch.float16, torch.float32, torch.float16),
    (torch.float16, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),
])
def test_mixed_precision_teacher_and_student(student_dtype, teacher_dtype, input_dtype):
    # was a raw dtype error from the teacher's conv: each network now runs in its own dtype
    teacher = digitsnet().to(teacher_dtype)
    student = lopfast.expand(digitsnet()).to(student_dtype)
    x = torch.randn(4, 1, 8, 8, dtype=input_dtype)
    out, sp = lopfast.SPDistiller(teacher, student)(x)
    assert out.dtype == student_dtype and sp.dtype == torch.float32 and torch.isfinite(sp)


def test_sp_loss_of_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="batch size 0"):
        lopfast.sp_loss(torch.randn(0, 3), torch.randn(0, 3))


# ============================================================================ settings (RunConfig)
def test_every_setting_has_a_declared_check():
    # every field of a config class is declared with its check (and help, flag): a new setting too
    for cls in (RunConfig, TrainConfig, Plan):
        undeclared = {f.name for f in dataclasses.fields(cls)} - {f.name for f, _ in declared(cls)}
        assert undeclared == set(), f"declare {undeclared} of {cls.__name__} with lopfast.pipeline.settings.setting()"
        for f, s in declared(cls):
            assert s.help and s.check.accepted, f.name


def test_a_field_without_a_declaration_is_refused():
    from lopfast.pipeline.settings import integer

    @dataclasses.dataclass
    class C:
        a: int = setting(1, check=integer(min=0), help="a")
        b: int = 2  # no declaration: no check would run

    with pytest.raises(TypeError, match=r"C.b is not declared with lopfast.pipeline.settings.setting"):
        check_fields(C())
    with pytest.raises(TypeError, match="a must be an int >= 0, got '1'"):  # a declared one names itself
        check_fields(C(a="1"))


@pytest.mark.parametrize("setting, value, message", [
    ("momentum", float("nan"), "momentum must be a number in [0, 1), got nan"),
    ("weight_decay", -1.0, "weight_decay must be a finite number >= 0"),
    ("lr", float("inf"), "lr must be a positive number"),
    ("seed", -1, "seed must be an int in [0, 4294967295]"),
    ("seed", "x", "seed must be an int"),
    ("workers", -1, "workers must be an int >= 0"),
    ("download", "yes", "download must be True or False"),
    ("model_kwargs", [1], "model_kwargs must be a dict"),
    ("model_kwargs", {"num_classes": 3}, "in_channels / num_classes"),
    ("prune_options", [1], "prune_options must be"),
    ("prune_options", {"foo": 1}, "unknown option"),
    ("methods", ["ft", "ft"], "methods must be a list of distinct names"),
    ("sp_layers", [], "sp_layers must be a non-empty list"),
    ("linear_rate", 2.0, "linear_rate must be unset unless linear is on"),
    ("round_to", 0, "round_to must be a positive int (pruned widths a multiple of it), 'auto' or None, got 0"),
    ("round_to", "8", "round_to must be a positive int"),
    ("target_speedup", 1.0, "target_speedup must be a number > 1"),
    ("target_speedup", float("nan"), "target_speedup must be a number > 1"),
    ("measure", "yes", "measure must be True or False"),
    ("measure_compile", 1, "measure_compile must be True or False"),
])
def test_run_config_names_the_bad_setting(setting, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig(model="digitsnet", dataset="digits", device="cpu", **{setting: value}).validate()


def test_run_config_normalises_comma_strings():
    cfg = RunConfig(model="digitsnet", dataset="digits", device="cpu", methods="ft,lop", export="onnx",
                    sp_layers="layer1").validate()
    assert cfg.methods == ["ft", "lop"] and cfg.export == ["onnx"] and cfg.sp_layers == ["layer1"]


def test_train_config_refuses_nan_hyper_parameters():
    for kw in ({"momentum": float("nan")}, {"weight_decay": -1}, {"gamma": float("nan")}, {"lr_decay": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            TrainConfig(1, 0.1, **kw)


def test_pipeline_entry_points_want_a_run_config(tmp_path):
    with pytest.raises(TypeError, match="cfg must be a RunConfig, .*RunConfig.from_dict"):
        lopfast.run_pipeline({"model": "digitsnet"}, str(tmp_path))


def test_load_data_checks_its_arguments():
    with pytest.raises(ValueError, match="train_subset must be a positive int"):
        load_data("digits", train_subset=-5)
    with pytest.raises(ValueError, match="device 'x' is not a valid torch device"):
        load_data("digits", device="x")


# ============================================================================ divergence
def test_weights_that_go_nonfinite_while_the_loss_stays_finite_stop_training(tmp_path):
    # the probe's case: an inf BatchNorm running variance leaves the training loss finite (training
    # BN uses batch statistics), so the loss-only check let the run report an accuracy
    data = load_data("digits", batch_size=64, train_subset=128, test_subset=64, seed=3)
    torch.manual_seed(0)
    model = digitsnet(width=8)
    ck = str(tmp_path / "ck.pt")

    def poison(epoch, rec):
        model.bn1.running_var.fill_(float("inf"))

    with pytest.raises(TrainingDiverged, match=r"\[probe\] training diverged in epoch 2/3: bn1.running_var is "
                                               r"NaN or infinite.*last good checkpoint, .*ck.pt \(epoch 1\), is kept"):
        train(model, data, TrainConfig(3, 0.05, (), seed=5), checkpoint=ck, on_epoch_end=poison, desc="probe")
    good = torch.load(ck, weights_only=True)
    assert good["epoch"] == 0 and not nonfinite(good["model"].items())


def test_cli_divergence_names_stage_and_epoch_and_keeps_nothing_bad(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run_cli(["run", *BASE, "--pretrain-epochs", "2", "--pretrain-lr", "1e10", "--epochs", "1",
                       "--methods", "ft", "--train-subset", "256", "--test-subset", "64", "--out", str(out)], capsys)
    assert rc == 1
    assert re.search(r"error: \[pretrain\] training diverged in epoch 1/2: .* is NaN or infinite", err), err
    assert "no checkpoint was written" in err
    assert not (out / "pretrain" / "model.pt").exists() and not (out / "results.json").exists()


def test_cli_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_train = stages.train

    def train_that_diverges_after_epoch_1(model, *a, **k):
        def poison(epoch, rec):
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

        return real_train(model, *a, **k, on_epoch_end=poison)

    monkeypatch.setattr(stages, "train", train_that_diverges_after_epoch_1)
    out = tmp_path / "run"
    rc, err = run_cli(["pretrain", *BASE, "--pretrain-epochs", "3", "--train-subset", "128", "--test-subset", "64",
                       "--out", str(out)], capsys)
    assert rc == 1
    assert "[pretrain] training diverged in epoch 2/3" in err and "ckpt.pt (epoch 1), is kept" in err
    ck = torch.load(out / "pretrain" / "ckpt.pt", weights_only=True)
    assert ck["epoch"] == 0 and not nonfinite(ck["model"].items())
    assert not (out / "pretrain" / "model.pt").exists()


def test_a_diverged_pruning_procedure_is_caught_at_the_stage_boundary(tmp_path, monkeypatch):
    def nan_prune(model, *a, **k):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model, {"params_before": 1, "params_after": 1}

    monkeypatch.setattr(stages, "prune_channels", nan_prune)
    cfg = RunConfig(model="digitsnet", dataset="digits", device="cpu", target=0.5, test_subset=32).validate()
    data = load_data("digits", batch_size=32, test_subset=32)
    with pytest.raises(TrainingDiverged, match=r"\[prune\] the pruned model holds NaN"):
        runner.Runner(cfg, runner.RunFolder(str(tmp_path)), data, "cpu").pruned(digitsnet())
    assert not (tmp_path / "prune" / "model.pt").exists()


# ============================================================================ the CLI
@pytest.mark.usefixtures("no_training")
def test_teacher_of_another_architecture_is_refused_or_taken(tmp_path, capsys):
    r20 = save_teacher(tmp_path / "r20.pt", "resnet20")
    rc, err = run_cli(["run", *BASE, "--teacher", r20, "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "holds a resnet20 but --model is digitsnet" in err and "pass --model resnet20" in err
    # without --model the run is of the teacher's architecture, and says and records so
    args = cli.build_parser().parse_args(["run", "--dataset", "digits", "--device", "cpu", "--teacher", r20,
                                          "--out", str(tmp_path / "b")])
    plan = cli._check_pipeline_args(args)
    assert plan.cfg.model == "resnet20"
    assert "using the teacher's architecture, resnet20" in capsys.readouterr().err


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("teacher_kw, message", [
    ({"num_classes": 5}, "has 5 classes but --dataset digits has 10"),
    ({"nan": True}, "the stored weights hold NaN"),
    ({"width": 8}, "was built with model arguments {'width': 8}"),
])
def test_teacher_that_does_not_fit_is_refused_before_work(tmp_path, capsys, teacher_kw, message):
    p = save_teacher(tmp_path / "t.pt", **teacher_kw)  # was an IndexError in cross_entropy / a NaN run
    rc, err = run_cli(["run", *BASE, "--teacher", p, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and message in err, err


@pytest.mark.usefixtures("no_training")
def test_resume_needs_a_run_to_resume(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run_cli(["run", *BASE, "--resume", "--out", str(empty)], capsys)
    assert rc == 2 and "--out must be the folder of a run to continue" in err and "drop --resume" in err
    rc, err = run_cli(["run", *BASE, "--resume"], capsys)
    assert rc == 2 and "--resume needs --out DIR" in err


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("extra, message", [
    (["--method-options", '{"foo": 1}'], "--method-options must be options the pruning parts accept, got {'foo': 1}"),
    (["--criterion", "bogus"], "--criterion must be one of 'l1'"),
    (["--prune-method", "taylor", "--method-options", '{"batches": -1}'], "option batches must be a positive"),
    (["--prune-method", "thinet", "--global-pruning"], "the pruning settings do not combine"),
    (["--momentum", "nan"], "--momentum must be a number in [0, 1), got nan"),
    (["--seed", "-1"], "--seed must be an int in [0, 4294967295], got -1"),
    (["--model-kwargs", '{"width": -1}'], "--model-kwargs must be arguments digitsnet accepts"),
    (["--sp-layers", "conv1,conv1"], "--sp-layers must be a list of distinct names"),
    (["--linear-rate", "2"], "--linear-rate must be unset unless linear is on"),
    (["--model", "tv:nosuch"], "--model tv:nosuch cannot be built"),
    (["--target-speedup", "2", "--allocation", "uniform"], "--allocation must be unset with target_speedup"),
    (["--target-speedup", "2", "--global-pruning"], "--global-pruning must be unset with target_speedup"),
    (["--allocation", "netadapt"], "--allocation must be netadapt only with target_speedup"),
    (["--target-speedup", "2", "--target", "0.5"], "--target must be unset with --target-speedup"),
    (["--target-speedup", "2", "--method-options", '{"lut_points": 1}'], "lut_points"),
])
def test_every_option_is_checked_before_the_first_stage(tmp_path, capsys, extra, message):
    # no --teacher: a stage that ran before the check would pretrain (and hit no_training)
    rc, err = run_cli(["run", *BASE, *extra, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "o" / "pretrain").exists()


@pytest.mark.usefixtures("no_training")
def test_config_file_values_are_checked_and_named_by_flag(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    for content, message in (({"momentum": "high"}, "--momentum must be a number in [0, 1), got 'high'"),
                             ({"prune_options": [1]}, "--method-options must be"),
                             ({"download": "yes"}, "--download must be True or False")):
        cfg.write_text(json.dumps({"model": "digitsnet", "dataset": "digits", "device": "cpu", **content}))
        rc, err = run_cli(["run", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys)
        assert rc == 2 and message in err, err


@pytest.mark.usefixtures("no_training")
def test_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for cmd in (["run", *BASE], ["sweep", *BASE]):
        rc, err = run_cli([*cmd, "--out", str(f)], capsys)  # was a raw FileExistsError
        assert rc == 2 and "--out must be a directory (existing, or one to create)" in err, err
    rc, err = run_cli(["run", *BASE, "--out", str(f / "sub")], capsys)
    assert rc == 2 and "is a file, not a directory" in err
    rc, err = run_cli(["reproduce", "table1", "--budget", "smoke", "--out", str(f)], capsys)
    assert rc == 2 and "--out must be a directory" in err  # was a NotADirectoryError


@pytest.mark.usefixtures("no_training")
def test_sweep_refuses_a_latency_budget(tmp_path, capsys):
    rc, err = run_cli(["sweep", *BASE, "--target-speedup", "2", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--target-speedup must be unset for `lopfast sweep`" in err, err


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("targets, message", [("", "--targets must be a non-empty list"),
                                              ("0.5,0.5", "--targets must be distinct fractions")])
def test_sweep_targets(tmp_path, capsys, targets, message):
    rc, err = run_cli(["sweep", *BASE, "--targets", targets, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and message in err, err  # "" silently ran the default targets


def test_export_checks_shape_formats_and_weights(tmp_path, capsys):
    p = save_teacher(tmp_path / "m.pt")
    rc, err = run_cli(["export", p, "--input-shape", "3,8,8"], capsys)  # was a raw RuntimeError
    assert rc == 2 and "--input-shape must be the C,H,W of one input of this model, got [3, 8, 8]" in err
    rc, err = run_cli(["export", p, "--input-shape", "0,8,8"], capsys)
    assert rc == 2 and "--input-shape must be C,H,W: three positive ints" in err
    rc, err = run_cli(["export", p, "--format", ""], capsys)
    assert rc == 2 and "--format must be one or more of" in err
    rc, err = run_cli(["export", save_teacher(tmp_path / "nan.pt", nan=True), "--input-shape", "1,8,8"], capsys)
    assert rc == 2 and "NaN" in err
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "nan.pt"]  # nothing written


def test_reproduce_checks_its_arguments_first(capsys):
    rc, err = run_cli(["reproduce", "table1", "--budget", "smoke", "--seed", "-5"], capsys)
    assert rc == 2 and "--seed must be an int in [0, 4294967295], got -5" in err


def test_default_out_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20260101-000000")
    args = cli.build_parser().parse_args(["run"])
    first = cli._out_dir(args, "run")
    os.makedirs(first)
    assert cli._out_dir(args, "run") == first + "-2"


def test_every_run_flag_is_a_setting_or_a_known_cli_argument():
    # how a new flag plugs in: its dest is a declared setting (RunConfig or Plan) or one
    # of these command-line-only arguments, which _check_pipeline_args checks
    cli_only = {"out", "config", "resume", "quiet", "help", "budget"}  # budget: argparse choices
    fields = {f.name for f in dataclasses.fields(RunConfig)} | {f.name for f in dataclasses.fields(Plan)}
    for command in cli.PIPELINE_COMMANDS:
        flags = cli._flag_names(cli.build_parser(), command)
        assert flags, command
        for dest in flags:
            assert dest in fields or dest in cli_only or dest in ("criterion", "allocation", "procedure",
                                                                  "method_options", "prune_options"), dest


def test_cli_warnings_are_one_readable_line(tmp_path, capsys, no_training):
    rc, err = run_cli(["run", *BASE, "--test-subset", "100000", "--momentum", "2", "--out", str(tmp_path)], capsys)
    assert rc == 2  # the error is the momentum; checked before the data is read: no warning yet
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["run", *BASE, "--test-subset", "100000", "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert "lopfast run: warning: test_subset=100000 is more than the 360 images digits has there" in err
    assert "stages.prepare(" not in err


def test_non_finite_values_error_is_picklable():
    import pickle

    e = pickle.loads(pickle.dumps(NonFiniteValues("model", ["a.weight"], "hint")))
    assert str(e) == "model holds NaN or infinite values (in a.weight); hint"
    d = pickle.loads(pickle.dumps(TrainingDiverged("x", stage="lop", epoch=3, checkpoint="c")))
    assert (d.stage, d.epoch, d.checkpoint) == ("lop", 3, "c")


# ============================================================================ train() and its settings
def _digits_data():
    return load_data("digits", batch_size=64, train_subset=128, test_subset=64, seed=3)


def _ckpt(tmp_path, width=8, epochs=1, lr=0.05):
    """A finished checkpoint of a digitsnet of ``width``: (its path, the data)."""
    data = _digits_data()
    ck = str(tmp_path / f"ck{width}.pt")
    train(digitsnet(width=width), data, TrainConfig(epochs, lr, ()), checkpoint=ck)
    return ck, data


@pytest.mark.parametrize("kwargs, message", [
    ({"milestones": [-1]}, r"milestones must be a list of epochs \(ints >= 1\).*got \[-1\]; a milestone of -1 would "
                           r"decay the lr from the first step"),  # was: the lr divided by 10 from step 0
    ({"milestones": ["a"]}, r"milestones must be a list of epochs .*got \['a'\]; 'a' is not an int"),  # was int()'s
    ({"milestones": "60,100"}, r"milestones must be a list of epochs"),
    ({"lr": True}, r"lr must be a positive number, got True"),  # was: trained at lr 1.0
    ({"compile": "no"}, r"compile must be True or False, got 'no'"),  # was: compiled
    ({"epochs": 0}, r"epochs must be a positive int, got 0"),
    ({"seed": -1}, r"seed must be an int in \[0, 4294967295\], got -1"),
    ({"channels_last": "yes"}, r"channels_last must be True or False, got 'yes'"),
    ({"capture": "eager"}, r"capture must be one of 'auto', 'compile', 'off', got 'eager'"),
])
def test_train_config_names_the_bad_setting(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        TrainConfig(**{"epochs": 2, "lr": 0.1, **kwargs})


def test_a_milestone_after_the_last_epoch_is_said():
    with pytest.warns(UserWarning, match=r"milestones \[3\] are not before the last of the 3 epochs"):
        TrainConfig(3, 0.1, (1, 3))


@pytest.mark.parametrize("kwargs, message", [
    # was: the SP loss silently dropped
    (dict(cfg=TrainConfig(1, 0.05, gamma=3000.0)), r"gamma must be 0 without a teacher, got 3000.0; the SP loss"),
    (dict(sp_layers=["conv1"]), r"sp_layers must be None without a teacher, got \['conv1'\]"),
    # was: a fresh start (the CLI refuses it)
    (dict(resume=True), r"checkpoint must be a file path with resume=True, got None"),
    (dict(resume="yes", checkpoint="x.pt"), r"resume must be True or False, got 'yes'"),
    (dict(cfg={"epochs": 1, "lr": 0.1}), r"cfg must be a TrainConfig"),
    (dict(teacher="resnet20"), r"teacher must be an nn.Module"),
])
def test_train_names_the_bad_argument_before_any_work(no_training, kwargs, message):
    kw = {"cfg": TrainConfig(1, 0.05), **kwargs}
    with pytest.raises(InvalidArgument, match=message):
        train(digitsnet(width=8), _digits_data(), kw.pop("cfg"), **kw)


@pytest.mark.parametrize("model, message", [
    # was: IndexError: Target 7 is out of bounds, inside the first step's loss
    (lambda: digitsnet(num_classes=5), r"model must be a model with 10 outputs, one per class of digits, got a "
                                       r"DigitsNet; it gives 5: the labels above 4 would be out of range; build it with num_classes=10"),
    (lambda: build_model("digitsnet", in_channels=3, num_classes=10),
     r"model must be a model that runs on inputs of shape \(1, 8, 8\).*but digits has 1: build it with in_channels=1"),
])
def test_a_model_that_does_not_fit_the_data_is_refused_before_training(model, message):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(InvalidArgument, match=message):
        train(m, _digits_data(), TrainConfig(1, 0.05))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # nothing trained
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_model_with_more_outputs_than_classes_is_warned_about():
    with pytest.warns(UserWarning, match="the model gives 12 outputs but digits has 10 classes"):
        train(digitsnet(width=8, num_classes=12), _digits_data(), TrainConfig(1, 0.05))


def test_resuming_a_finished_checkpoint_with_other_settings_is_refused(tmp_path):
    ck, data = _ckpt(tmp_path)
    # was: the old history returned without a word, nothing trained at lr 0.02
    with pytest.raises(InvalidArgument, match=r"checkpoint must be a checkpoint of these settings.*finished all 1 "
                                              r"epochs with other settings \(lr 0.05 -> 0.02\)"):
        train(digitsnet(width=8), data, TrainConfig(1, 0.02, ()), checkpoint=ck, resume=True)
    # the same settings: the finished result, as before; more epochs: training continues
    assert len(train(digitsnet(width=8), data, TrainConfig(1, 0.05, ()), checkpoint=ck, resume=True)["history"]) == 1
    logs = []
    res = train(digitsnet(width=8), data, TrainConfig(2, 0.05, ()), checkpoint=ck, resume=True, log=logs.append)
    assert len(res["history"]) == 2 and any("differ from the checkpoint's: epochs 1 -> 2" in s for s in logs)


def test_a_truncated_or_foreign_checkpoint_is_named(tmp_path):
    from lopfast.pipeline.checkpoint import CheckpointError

    ck, data = _ckpt(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(ck, "rb").read()[:2000])
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(cut))} cannot be read .*truncated"):
        train(digitsnet(width=8), data, TrainConfig(1, 0.05), checkpoint=str(cut), resume=True)
    # another model's checkpoint (was torch's raw size-mismatch error, no file named)
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(ck)} holds another model than the one given"):
        train(digitsnet(width=16), data, TrainConfig(1, 0.05), checkpoint=ck, resume=True)
    model_file = save_teacher(tmp_path / "model.pt")  # a model file, not a training checkpoint
    with pytest.raises(CheckpointError, match=r"model.pt cannot be read \(a model file, not a training checkpoint"):
        train(digitsnet(), data, TrainConfig(1, 0.05), checkpoint=model_file, resume=True)


@pytest.mark.parametrize("entry", ["RunConfig", "TrainConfig", "from_dict", "train", "flag", "config file"])
def test_a_shared_setting_has_one_check_at_every_entry(entry, tmp_path, capsys, no_training):
    """momentum is declared once (TrainSettings): the same check, named the way each entry spells it."""
    want = "momentum must be a number in [0, 1), got 1.5"
    if entry == "RunConfig":
        call = lambda: RunConfig(momentum=1.5)  # noqa: E731
    elif entry == "TrainConfig":
        call = lambda: TrainConfig(1, 0.1, momentum=1.5)  # noqa: E731
    elif entry == "from_dict":
        call = lambda: RunConfig.from_dict({"momentum": 1.5}, source="my.json")  # noqa: E731
        want += "; key 'momentum' of my.json"
    elif entry == "train":
        cfg = TrainConfig(1, 0.1)
        cfg.momentum = 1.5  # set after the config was made: train() checks again
        call = lambda: train(digitsnet(), _digits_data(), cfg)  # noqa: E731
    if entry in ("flag", "config file"):
        argv = ["run", *BASE, "--out", str(tmp_path / "o")]
        if entry == "flag":
            argv += ["--momentum", "1.5"]
        else:
            (tmp_path / "c.json").write_text(json.dumps({"momentum": 1.5}))
            argv += ["--config", str(tmp_path / "c.json")]
        rc, err = run_cli(argv, capsys)
        assert rc == 2 and "--" + want in err, err
        if entry == "config file":
            assert f"(key 'momentum' of --config {tmp_path / 'c.json'})" in err
        return
    with pytest.raises(InvalidArgument) as e:
        call()
    assert str(e.value) == want
