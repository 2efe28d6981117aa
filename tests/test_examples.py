"""The scripts in examples/ run, on tiny settings: the timm-style loop (and its resume), the plain
loop with bf16 autocast and DDP over 2 processes, the QAT route to int8.

They start together (each example is a few seconds of work behind several seconds of importing
torch and lopfast per process) and each test waits for its own.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 300


def _start(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc):
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("timm")
    pytest.importorskip("torch_pruning")
    tmp = tmp_path_factory.mktemp("examples")
    procs = {
        "timm": _start([EXAMPLES / "timm_loop.py", "--model", "test_resnet", "--out", tmp / "timm", "--epochs", "1",
                        "--steps", "2", "--batch-size", "4"], tmp),
        "ddp": _start([EXAMPLES / "ddp_amp_loop.py", "--world", "2", "--steps", "2", "--batch-size", "4",
                       "--out", tmp / "ddp"], tmp),
        "qat": _start([EXAMPLES / "qat_route.py", "--teacher-epochs", "1", "--epochs", "2", "--steps", "2"], tmp),
    }
    yield procs, tmp
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def test_timm_loop_trains_saves_and_resumes(runs):
    procs, tmp = runs
    out = _finish(procs["timm"])
    assert "epoch 1/1" in out and "contracted:" in out
    assert (tmp / "timm" / "last.pth.tar").exists() and (tmp / "timm" / "final_ema.pt").exists()
    out = _finish(_start([EXAMPLES / "timm_loop.py", "--model", "test_resnet", "--out", tmp / "timm", "--epochs", "2",
                          "--steps", "2", "--batch-size", "4", "--resume"], tmp))
    assert "epoch 2/2" in out and "epoch 1/2" not in out  # continued from the checkpoint


def test_ddp_amp_loop_two_processes(runs):
    procs, tmp = runs
    out = _finish(procs["ddp"])
    assert "step 2/2" in out and "2 ranks agree" in out
    assert (tmp / "ddp" / "final.pt").exists()


def test_qat_route_to_int8(runs):
    procs, _ = runs
    out = _finish(procs["qat"])
    assert "int8" in out and "predictions agree" in out
