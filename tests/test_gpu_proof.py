"""bench/gpu_proof.sh and bench/paper_fast.sh fit one lent GPU: the caps check, the budget table, the
summary's one JSON and one markdown table, and the warm-up's argument lists (no GPU needed)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_proof  # noqa: E402

DEVICE_S = 900  # one lent GPU: 15 minutes of device time, the machine's start included
SPARE_S = 120
START_S = 120  # a fresh machine's start (README of the device tool: one to two minutes)
TRANSFER_S = 15  # per call, and the idle wait between the two calls


def _default(script: str, pattern: str) -> int:
    m = re.search(pattern, (ROOT / "bench" / script).read_text())
    assert m, (script, pattern)
    return int(m.group(1))


def test_the_two_scripts_fit_one_lent_gpu_with_two_minutes_to_spare():
    proof = _default("gpu_proof.sh", r"LOPFAST_PROOF_SECONDS:-(\d+)")
    paper = _default("paper_fast.sh", r"TOTAL=(\d+);")
    assert proof <= 360 and paper <= 420  # the ceilings: 6 and 7 minutes
    assert START_S + proof + TRANSFER_S + TRANSFER_S + paper + TRANSFER_S <= DEVICE_S - SPARE_S


def test_caps_over_the_budget_fail(capsys):
    assert gpu_proof.caps(100, ["a=40", "b=50"]) == 0
    assert gpu_proof.caps(100, ["a=40", "b=70"]) == 2
    assert "exceed the budget" in capsys.readouterr().err


def test_the_script_refuses_caps_over_its_budget(tmp_path):
    """--smoke checks the GPU caps before any work: a budget below them fails with exit 2."""
    env = dict(os.environ, LOPFAST_PROOF_SECONDS="100", OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_proof.sh"), "--smoke"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 2 and "exceed the budget" in res.stderr + res.stdout


def test_summary_writes_one_json_and_one_markdown_table(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    (work / "phases.tsv").write_text("setup\tok\t3\t20\nselfcheck\tfailed (exit 1)\t40\t50\n")
    (work / "skips.tsv").write_text("cuda_ext\tno nvcc on this machine\n")
    (work / "phase-selfcheck.log").write_text("collected\n===== 5 passed, 1 failed in 2.0s =====\n")
    (work / "selfcheck.json").write_text(json.dumps({"rows": [
        dict(op="sp_loss", backend="triton", dtype="bf16", direction="bwd", status="FAIL", error=1.0, budget=0.1),
        dict(op="collapse", backend="triton", dtype="fp32", direction="fwd", status="pass", error=0, budget=1)]}))
    (work / "epoch.json").write_text(json.dumps(dict(removed=0.9, batch=256, images=50000, ft=dict(
        train_epoch_s=1.2, eval_s=0.3, epoch1_s=9.0))))
    monkeypatch.setenv("LOPFAST_CACHE_DIR", str(tmp_path / "cache"))
    assert gpu_proof.summary(work, out, 290, False, int(time.time()) - 60) == 0
    assert sorted(p.name for p in out.iterdir()) == ["proof.json", "proof.md"]
    doc = json.loads((out / "proof.json").read_text())
    assert [p["phase"] for p in doc["phases"]] == ["setup", "selfcheck"] and doc["caps_s"] == 70
    assert doc["selfcheck"]["failed"] == 1 and doc["machine"]["torch"]
    md = (out / "proof.md").read_text()
    assert "| selfcheck | failed (exit 1) | 40 | 50 | 5 passed, 1 failed in 2.0s |" in md
    assert "FAIL sp_loss triton bf16 bwd" in md and "no nvcc" in md and "ft 1.2 s training" in md


def test_warm_up_builds_arguments_for_every_listed_variant():
    """bench/precompile.py compiles through Triton's launch path: every variant's signature must
    turn into arguments (here on CPU tensors; the GPU run puts them on the device)."""
    import precompile

    names = precompile.variants(precompile.DEFAULT)
    assert any("_nt8_" in n for _, n in names) and names[0][1].count("_nt8_") == 1  # the slow ones first
    from lopfast.kernels import collapse, sp_gram

    for mod in (sp_gram, collapse):
        for v in mod.aot_variants():
            args = precompile._args(v, "cpu")
            assert len(args) == sum(t != "constexpr" for t in v["signature"].values())
