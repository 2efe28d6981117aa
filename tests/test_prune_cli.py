"""`lopfast prune` / the pipeline's prune stage take --criterion, --allocation, --procedure and
--method-options (JSON) and pass them to lopfast.prune."""
import json

import pytest
import torch

pytest.importorskip("torch_pruning")

from lopfast import cli  # noqa: E402
from lopfast.pipeline import runner, stages  # noqa: E402


def test_flags_land_in_prune_options(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"prune_options": {"batches": 3, "seed": 1}}))
    args = cli.build_parser().parse_args([
        "prune", "--config", str(cfg), "--teacher", "t.pt", "--criterion", "hrank", "--allocation", "eagleeye",
        "--method-options", '{"candidates": 2, "batches": 1}'])
    settings = cli._settings(args, {})
    assert settings["prune_options"] == {"batches": 1, "seed": 1, "candidates": 2, "criterion": "hrank",
                                         "allocation": "eagleeye"}
    stages.RunConfig.from_dict(settings)  # the settings stay valid config keys
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prune", "--method-options", "[1]"])


def _digits_teacher(tmp_path):
    """A saved digitsnet (width 8) teacher file for `lopfast prune --teacher`."""
    from lopfast.pipeline.models import build_model

    torch.manual_seed(0)
    teacher = build_model("digitsnet", width=8).eval()
    path = tmp_path / "teacher.pt"
    runner.save_model_file(teacher, str(path), "digitsnet", {"width": 8})
    return path


def test_prune_command_with_a_combination(tmp_path, capsys):
    path = _digits_teacher(tmp_path)
    out = tmp_path / "run"
    rc = cli.main(["prune", "--model", "digitsnet", "--model-kwargs", '{"width": 8}', "--dataset", "digits",
                   "--teacher", str(path), "--target", "0.5", "--criterion", "hrank", "--allocation", "eagleeye",
                   "--method-options", '{"batches": 1, "candidates": 2, "calib_batches": 2, "eval_batches": 1}',
                   "--device", "cpu", "--batch-size", "64", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "prune" / "report.json").read_text())
    assert (report["criterion"], report["allocation"], report["procedure"]) == ("hrank", "eagleeye", "none")
    assert abs(report["removed_fraction"] - 0.5) <= 0.005
    rc = cli.main(["prune", "--model", "digitsnet", "--model-kwargs", '{"width": 8}', "--dataset", "digits",
                   "--teacher", str(path), "--target", "0.5", "--method-options", '{"episodes": 2}',
                   "--device", "cpu", "--out", str(tmp_path / "bad"), "--quiet"])
    assert rc == 2 and "allocation='amc'" in capsys.readouterr().err


def test_help_lists_every_part_lopfast_prune_accepts(capsys):
    from lopfast.cli import build_parser
    from lopfast.prune.compose import ALLOCATIONS, CRITERIA, PROCEDURES

    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, names in (("--criterion", CRITERIA), ("--allocation", ALLOCATIONS), ("--procedure", PROCEDURES)):
        assert f"{flag} NAME replace the preset's {flag[2:]}: {', '.join(names)}" in text


def test_prune_command_with_a_latency_budget(tmp_path, capsys, monkeypatch):
    """--target-speedup / --round-to / --measure (issue 19) reach lopfast.prune and its report."""
    from lopfast import dispatch

    monkeypatch.setenv("LOPFAST_CACHE_DIR", str(tmp_path / "cache"))
    dispatch.clear()
    path = _digits_teacher(tmp_path)
    out = tmp_path / "run"
    rc = cli.main(["prune", "--model", "digitsnet", "--model-kwargs", '{"width": 8}', "--dataset", "digits",
                   "--teacher", str(path), "--target-speedup", "1.2", "--round-to", "4", "--measure",
                   "--method-options", '{"lut_points": 3, "rounds": 3, "budget_s": 0.01, "repeats": 1}',
                   "--device", "cpu", "--batch-size", "32", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "prune" / "report.json").read_text())
    assert report["target_unit"] == "latency" and report["target_speedup"] == 1.2 and report["round_to"] == 4
    assert report["extra"]["netadapt"]["batch"] == 32 and "achieved_speedup" in report["extra"]
    assert report["latency"]["batches"] == [1, 32]
    text = capsys.readouterr().out
    assert "latency budget:" in text and "| pruned | 32 |" in text
    dispatch.clear()
