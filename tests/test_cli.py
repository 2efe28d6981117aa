"""lopfast CLI: help, argument errors before any training, config files, export."""
import json

import pytest
import torch

from lopfast import cli
from lopfast.pipeline import runner, stages

BASE = ["--model", "digitsnet", "--dataset", "digits", "--device", "cpu"]


# argument errors must surface before training: any training call fails the test (conftest.py)
pytestmark = pytest.mark.usefixtures("no_training")


def run(args, capsys):
    rc = cli.main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["demo", "pretrain", "prune", "run", "sweep", "reproduce", "export"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: lopfast" in capsys.readouterr().out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--model", "resnet21", "--dataset", "digits"], "unknown model 'resnet21'"),
        (["run", *BASE, "--methods", "ft,lopp"], "--methods must be one of 'lop', .* got 'lopp'"),
        (["run", *BASE, "--target", "1.5"], "target must be a fraction"),
        (["run", *BASE, "--target", "0.9995"], "above what digitsnet can lose"),
        (["run", *BASE, "--rate", "0.5"], "rate .* >= 1"),
        (["run", *BASE, "--gamma", "-1"], "gamma"),
        (["run", *BASE, "--epochs", "0"], "epochs must be a positive int"),
        (["run", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"],
         "cifar10 not found in /nonexistent/cifar"),
        (["run", *BASE, "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["run", *BASE, "--prune-method", "magic"], "--prune-method must be one of 'l1', .* got 'magic'"),
        (["run", *BASE, "--export", "tflite"], "unknown export format"),
        (["run", *BASE, "--teacher", "/nonexistent/model.pt"], "teacher file"),
        (["prune", *BASE], "needs --teacher"),
        (["run", *BASE, "--sp-layers", "layer1,layer9"], "sp_layers \\['layer9'\\] are not modules"),
        (["sweep", *BASE, "--targets", "0.5,1.2"], "targets must be a fraction"),
        (["run", *BASE, "--resume", "--out", "/nonexistent/run"], "--resume needs --out"),
        (["export", "/nonexistent/model.pt"], "does not exist"),
    ],
)
def test_argument_errors(args, message, capsys):
    rc, err = run(args, capsys)
    assert rc == 2
    assert pytest.importorskip("re").search(message, err), err
    assert "Traceback" not in err


def test_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": "digitsnet", "dataset": "digits", "rate": 0.5}))
    rc, err = run(["run", "--config", str(cfg)], capsys)
    assert rc == 2 and "rate" in err
    cfg.write_text(json.dumps({"model": "digitsnet", "bogus": 1}))
    rc, err = run(["run", "--config", str(cfg)], capsys)
    assert rc == 2 and "unknown config keys ['bogus']" in err
    # flags override the file
    cfg.write_text(json.dumps({"model": "digitsnet", "dataset": "digits", "rate": 0.5}))
    args = cli.build_parser().parse_args(["run", "--config", str(cfg), "--rate", "2"])
    assert cli._settings(args, {})["rate"] == 2.0


def test_bad_list_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--targets", "a,b"])
    assert e.value.code == 2


def test_export_command(tmp_path, capsys):
    from lopfast.pipeline.models import build_model

    model = build_model("digitsnet", width=8).eval()
    path = tmp_path / "model.pt"
    runner.save_model_file(model, str(path), "digitsnet", {"width": 8})
    rc = cli.main(["export", str(path), "--input-shape", "1,8,8", "--out", str(tmp_path / "exp")])
    assert rc == 0
    exported = torch.export.load(str(tmp_path / "exp" / "model.pt2")).module()  # pt2 is the default
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))


def test_export_reads_lopfast_save_files(tmp_path, capsys):
    import lopfast
    from lopfast.pipeline.models import build_model

    if not hasattr(lopfast, "save"):
        pytest.skip("lopfast.save is not available")
    model = build_model("digitsnet", width=8).eval()
    path = tmp_path / "final.pt"
    lopfast.save(model, str(path), arch="digitsnet", arch_kwargs={"width": 8}, dataset="digits")
    rc = cli.main(["export", str(path)])  # input shape from the metadata's dataset
    assert rc == 0
    assert (tmp_path / "final.pt2").exists()


def test_reusing_out_dir_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = stages.RunConfig(model="digitsnet", dataset="digits", device="cpu", target=0.5)
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    rc, err = run(["run", *BASE, "--target", "0.6", "--out", str(out)], capsys)
    assert rc == 2 and "different settings (target)" in err


def test_bad_seeds_is_refused_before_training(capsys):
    rc, err = run(["run", *BASE, "--seeds", "0"], capsys)
    assert rc == 2 and "--seeds must be a positive int" in err


def test_one_gamma_default_everywhere():
    from lopfast.distill import DEFAULT_GAMMA

    assert stages.RunConfig().gamma == DEFAULT_GAMMA and stages.RunConfig().sp_reduction == "mean"
    assert "gamma" not in cli.DEMO_DEFAULTS  # the demo uses the package default too
