"""Settings declared once (lopfast/pipeline/settings.py): flags, docs and checks derived from one declaration."""
import argparse
import dataclasses
import os

import pytest

from lopfast import cli
from lopfast.checks import InvalidArgument
from lopfast.pipeline.config import RunConfig
from lopfast.pipeline.runner import Plan
from lopfast.pipeline.settings import GROUP_COMMANDS, add_flags, choice, declared, from_dict, setting
from lopfast.pipeline.train import TrainConfig, TrainSettings, stage_config

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")


def test_the_configuration_page_is_the_declarations():
    page = cli.settings_page()
    if os.environ.get("LOPFAST_WRITE_DOCS"):
        with open(DOCS, "w") as f:
            f.write(page)
    with open(DOCS) as f:
        assert f.read() == page, "docs/configuration.md is stale: rerun this test with LOPFAST_WRITE_DOCS=1"
    for cls in (RunConfig, TrainConfig, Plan):
        for f, _ in declared(cls):
            assert f"| `{f.name}`" in page, f.name


@pytest.mark.parametrize("command", cli.PIPELINE_COMMANDS)
def test_each_command_has_exactly_the_flags_its_settings_declare(command):
    flags = cli._flag_names(cli.build_parser(), command)
    want = {f.name for cls in (RunConfig, Plan) for f, s in declared(cls) if s.shown_in(command)}
    own = {"out", "config", "resume", "quiet", "budget", "help"}
    parts = {"criterion", "allocation", "procedure", "method_options", "prune_options"}
    assert set(flags) - own - parts == want
    assert ("targets" in flags) == (command == "sweep") and ("methods" in flags) == (command in
                                                                                      GROUP_COMMANDS["recovery"])


def test_help_shows_the_declared_default_once():
    text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "SGD momentum (default: 0.9)" in " ".join(text.split())
    assert "--amp {auto,bf16,off}" in text  # a choice's flag shows its options
    for cls in (RunConfig, TrainConfig, Plan):
        for f, s in declared(cls):
            assert "(default" not in s.help, f"{f.name}: the default is added where the help is shown"


def test_a_stage_takes_the_runs_shared_settings_as_they_are():
    cfg = RunConfig(momentum=0.8, schedule="linear", warmup_epochs=1.0, seed=7, label_smoothing=0.1, gamma=5.0)
    tc = stage_config(cfg, "finetune", epochs=10, gamma=cfg.gamma)
    for f, _ in declared(TrainSettings):
        assert getattr(tc, f.name) == getattr(cfg, f.name), f.name
    assert (tc.epochs, tc.lr, tc.milestones, tc.gamma) == (10, 0.01, (4, 7, 8), 5.0)


def test_a_new_setting_is_one_entry():
    """A setting added to a config (here an optimizer choice) is a flag, a config key and a check at once."""
    @dataclasses.dataclass
    class Run(RunConfig):
        optimizer: str = setting("sgd", check=choice("sgd", "adamw"), help="the optimizer", group="training")

    parser = argparse.ArgumentParser()
    groups = {g: parser.add_argument_group(g) for g in ("run", "model and data", "training", "pruning", "recovery")}
    add_flags(groups, (Run,), "run")
    args = parser.parse_args(["--optimizer", "adamw"])
    assert from_dict(Run, vars(args)).optimizer == "adamw" and Run().optimizer == "sgd"
    with pytest.raises(InvalidArgument, match="optimizer must be one of 'sgd', 'adamw', got 'adam'; did you mean"):
        Run(optimizer="adam")
    with pytest.raises(InvalidArgument, match="optimizer must be .*; key 'optimizer' of my.json"):
        from_dict(Run, {"optimizer": "lbfgs"}, source="my.json")
    with pytest.raises(ValueError, match=r"unknown config keys \['optimiser'\] in my.json \('optimiser': did you mean "
                                         r"'optimizer'\?\)"):
        from_dict(Run, {"optimiser": "sgd"}, source="my.json")
