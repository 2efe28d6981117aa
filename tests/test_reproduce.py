"""lopfast reproduce: the registry, the smoke budget end to end (CI), resume, and the summary tables."""
import csv
import json
import os

import pytest

from lopfast import cli
from lopfast.pipeline import experiments, stages
from lopfast.pipeline.report import format_summary, mean_std, paired_difference


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def table1_smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("repro"))
    code = cli.main(["reproduce", "table1", "--budget", "smoke", "--seeds", "2", "--out", out, "--quiet"])
    assert code == 0
    return out


def test_table1_smoke_outputs(table1_smoke, capsys):
    exp_dir = os.path.join(table1_smoke, "table1-smoke")
    rows = _read(os.path.join(exp_dir, "results.csv"))
    exp = experiments.EXPERIMENTS["table1"]
    # one row per cell (4 targets x 5 methods) and seed
    assert len(rows) == len(exp.targets) * len(exp.methods) * 2
    assert {(float(r["target"]), r["method"], int(r["seed"])) for r in rows} == {
        (t, m, s) for t in exp.targets for m in exp.methods for s in (0, 1)}
    for r in rows:
        assert 0.0 <= float(r["acc"]) <= 100.0
        assert abs(float(r["removed"]) - float(r["target"])) < 0.02  # ADMM met the column's pruning level
        assert float(r["paper_acc"]) == exp.paper[(r["method"], float(r["target"]))]
        assert float(r["train_images_per_s"]) > 0
    # one teacher per seed, shared by every cell of that seed
    assert len(os.listdir(os.path.join(table1_smoke, "teachers"))) == 2
    md = open(os.path.join(exp_dir, "results.md")).read()
    assert "[paper 87.97]" in md and "**lop − ft**" in md and "(n=2" in md and "[paper +2.49]" in md
    assert os.path.getsize(os.path.join(exp_dir, "results.png")) > 0


def test_finished_cells_are_never_recomputed(table1_smoke, monkeypatch, capsys):
    exp_dir = os.path.join(table1_smoke, "table1-smoke")
    before = _read(os.path.join(exp_dir, "results.csv"))
    calls = []
    real_train = stages.train

    def counting_train(*a, **k):
        calls.append(k.get("desc"))
        return real_train(*a, **k)

    monkeypatch.setattr(stages, "train", counting_train)
    # drop one finished cell: only it runs again
    os.remove(os.path.join(exp_dir, "seed1", "t0.948", "lop", "result.json"))
    assert cli.main(["reproduce", "table1", "--budget", "smoke", "--seeds", "2", "--out", table1_smoke,
                     "--quiet"]) == 0
    assert calls == ["t0.948/lop"] or calls == ["lop"]
    after = _read(os.path.join(exp_dir, "results.csv"))
    assert len(after) == len(before)
    keep = [(r["target"], r["method"], r["seed"], r["acc"]) for r in before if (r["seed"], r["target"], r["method"]) != ("1", "0.948", "lop")]
    assert keep == [(r["target"], r["method"], r["seed"], r["acc"]) for r in after
                    if (r["seed"], r["target"], r["method"]) != ("1", "0.948", "lop")]
    # everything finished: nothing trains, nothing is pruned
    calls.clear()
    monkeypatch.setattr(stages, "prune_channels", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pruned again")))
    assert cli.main(["reproduce", "table1", "--budget", "smoke", "--seeds", "2", "--out", table1_smoke,
                     "--quiet"]) == 0
    assert calls == []


def test_list_and_errors(capsys, tmp_path):
    assert cli.main(["reproduce", "--list"]) == 0
    text = capsys.readouterr().out
    for name in ("table1", "table2", "table3", "table4", "table5", "fig3", "fig4", "gamma"):
        assert name in text
    assert cli.main(["reproduce", "table9", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert cli.main(["reproduce", "table2", "--out", str(tmp_path)]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert cli.main(["reproduce", "table1", "--budget", "smoke", "--methods", "ft,bogus", "--out", str(tmp_path)]) == 2
    assert "not part of table1" in capsys.readouterr().err
    assert cli.main(["reproduce", "table1", "--budget", "smoke", "--seeds", "0", "--out", str(tmp_path)]) == 2


def test_registry_is_complete():
    E = experiments.EXPERIMENTS
    assert E["table1"].paper[("lop", 0.9866)] == 56.88 and E["table1"].paper[("scratch", 0.6837)] == 86.22
    assert E["table2"].needs_data_dir and E["table3"].prune_method == "amc"
    assert "lop-nokd" in E["table4"].methods
    assert {v for v, _ in E["table5"].variants} == {"r2+fc", "r3", "r3+fc", "r5", "r5+fc"}
    assert {o["prune_method"] for _, o in E["fig3"].variants} == {"amc", "hrank", "thinet", "eagleeye"}
    cells = experiments._cells(E["table5"], E["table5"].targets, E["table5"].methods)
    assert [c[3] for c in cells].count("ft") == 1 and [c[3] for c in cells].count("lop") == 5


def test_summary_statistics():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)
    assert mean_std([5.0]) == (5.0, 0.0, 1)
    rows = [dict(target=0.9, method=m, seed=s, acc=a, removed=0.9)
            for m, s, a in [("ft", 1, 90.0), ("ft", 2, 91.0), ("lop", 1, 92.0), ("lop", 2, 92.5)]]
    (d,) = paired_difference(rows, "lop", "ft")
    assert d["mean"] == pytest.approx(1.75) and d["n"] == 2 and d["exceeds_spread"]
    md = format_summary(rows, paper={("ft", 0.9): 86.03, ("lop", 0.9): 87.97})
    assert "90.50 ± 0.71 (n=2) [paper 86.03]" in md and "+1.75 ± 0.35 (n=2, exceeds spread) [paper +1.94]" in md


def test_bad_counts_fail_before_any_work(tmp_path):
    from lopfast.pipeline.experiments import reproduce

    for kw, what in (({"seeds": 0}, "seeds"), ({"seeds": True}, "seeds"), ({"parallel": 0}, "parallel")):
        with pytest.raises(ValueError, match=f"{what} must be a positive int"):
            reproduce("table1", budget="smoke", out=str(tmp_path), **kw)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def table1_fast_smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fast"))
    assert cli.main(["reproduce", "table1", "--budget", "fast-smoke", "--seeds", "2", "--out", out, "--quiet"]) == 0
    return out


def test_fast_budget_cells_schedule_and_shared_teacher(table1_fast_smoke):
    from lopfast.pipeline.train import load_checkpoint

    exp_dir = os.path.join(table1_fast_smoke, "table1-fast-smoke")
    rows = _read(os.path.join(exp_dir, "results.csv"))
    # table1 at 94.80 and 98.66 % with Table 4's ablation, 2 seeds
    assert {(float(r["target"]), r["method"], int(r["seed"])) for r in rows} == {
        (t, m, s) for t in (0.948, 0.9866) for m in ("ft", "lop", "lop-nokd") for s in (0, 1)}
    # one teacher, trained with the first seed, cached as a portable file and shared by both seeds
    (tdir,) = os.listdir(os.path.join(table1_fast_smoke, "teachers"))
    assert os.path.exists(os.path.join(table1_fast_smoke, "teachers", tdir, "teacher.pt"))
    assert {r["teacher_seed"] for r in rows} == {"0"} and len({r["teacher_acc"] for r in rows}) == 1
    md = open(os.path.join(exp_dir, "results.md")).read()
    assert "**lop-nokd − ft**" in md and "**lop − lop-nokd**" in md and "[paper 86.28]" in md  # Table 4's number
    assert "schedule=linear" in md and "label_smoothing=0.1" in md and "one teacher shared by every seed" in md
    # ft gets exactly lop's epochs, LR schedule and data: the training configs differ in the SP weight only
    for s in (0, 1):
        for t in ("t0.948", "t0.9866"):
            cfgs = {m: load_checkpoint(os.path.join(exp_dir, f"seed{s}", t, m, "ckpt.pt"))["config"]
                    for m in ("ft", "lop", "lop-nokd")}
            assert cfgs["ft"]["schedule"] == "linear" and cfgs["ft"]["nesterov"] and cfgs["ft"]["label_smoothing"] == 0.1
            assert {k for k in cfgs["ft"] if cfgs["ft"][k] != cfgs["lop"][k]} == {"gamma"}
            assert cfgs["ft"] == cfgs["lop-nokd"]


def test_budget_settings_and_fast_errors(tmp_path, capsys):
    s = experiments.budget_settings("fast", "cifar10", "resnet56")
    assert s["pretrain_epochs"] == 40 and s["batch_size"] == 512 and s["schedule"] == "linear" and s["nesterov"]
    assert experiments.budget_settings("fast", "cifar10", "mobilenet_v2")["pretrain_epochs"] == 30
    d = experiments.budget_settings("fast", "digits", "digitsnet")
    assert d["epochs"] == 30 and d["schedule"] == "linear" and "device" not in d
    assert experiments.budget_settings("paper", "cifar10", "resnet56") == {}
    out = str(tmp_path)
    for argv, msg in ((["table2", "--budget", "fast", "--data-dir", out], "designed for CIFAR"),
                      (["table1", "--dataset", "cifar100"], "--dataset 'cifar100'"),
                      (["table1", "--budget", "fast-smoke", "--time-limit", "0"], "--time-limit"),
                      (["table1", "--budget", "fast-smoke", "--teachers", "some"], "--teachers"),
                      (["table1", "--budget", "fast-smoke", "--methods", "scratch"], "not part of table1 in the fast")):
        assert cli.main(["reproduce", *argv, "--out", out]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    fast1 = experiments.resolve_experiment("table1", "fast")
    assert fast1.targets == (0.948, 0.9866) and fast1.paper[("lop-nokd", 0.9866)] == 54.92
    g = experiments.resolve_experiment("gamma", "fast", "cifar10")
    assert g.model == "resnet56" and g.settings["eval_split"] == "val"


def test_cifar_gamma_choice_runs_on_the_validation_split(tmp_path):
    res = experiments.reproduce("gamma", dataset="cifar10", budget="fast-smoke", out=str(tmp_path), quiet=True)
    rows = res["rows"]
    assert {r["eval_split"] for r in rows} == {"val"}
    labels = {experiments._label(r["method"], r["variant"], experiments.resolve_experiment("gamma", "fast", "cifar10"))
              for r in rows}
    assert labels == {"ft", "lop base", "lop g300", "lop g30000", "ft lr0.4x", "lop lr0.4x", "ft lr2.5x",
                      "lop lr2.5x", "ft ep2x", "lop ep2x"}
    # variants relative to the budget: 2x epochs, 2.5x the LR
    assert {int(r["epochs"]) for r in rows if r["variant"] == "ep2x"} == {2}
    lr = {r["variant"]: json.load(open(os.path.join(res["csv"][:-len("results.csv")], "seed0", "t0.9", r["variant"],
                                                    r["method"], "result.json")))["lr"] for r in rows}
    assert lr["lr2.5x"] == pytest.approx(2.5 * lr["base"])
    assert "the test set is not read" in res["table"] and "lop, best first" in res["table"]
    # the teacher never saw the held-out images: its own cache entry
    assert any("val96" in d for d in os.listdir(os.path.join(str(tmp_path), "teachers")))


@pytest.mark.parametrize("argv,msg", [(["--seeds", "0"], "--seeds must be a positive integer"),
                                      ([], "give the CIFAR-10 copy"),
                                      (["/no/such/cifar.tar.gz"], "does not exist"),
                                      (["--smoke", "--state", "/no/state.tar"], "--state file"),
                                      (["--bogus"], "unknown option")])
def test_paper_fast_script_checks_its_arguments(argv, msg):
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "bench", "paper_fast.sh")
    r = subprocess.run(["bash", script, *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and msg in r.stderr, (r.returncode, r.stderr)
