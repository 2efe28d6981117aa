"""`lopfast selfcheck`: the CLI on this machine (CPU: reference + Triton interpreter), and that it fails."""
import json
import math

import torch

import lopfast
from lopfast import cli
from lopfast import selfcheck as sc_module  # the function (lopfast.selfcheck) shadows the module name
from lopfast.selfcheck import _err, format_table


def test_cli_selfcheck_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "sc.json"
    # the default dtypes (fp64 and fp32 on CPU): what `lopfast selfcheck` and the GPU suite run
    assert cli.main(["selfcheck", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["ok"] is True
    ran = {(r["op"], r["backend"], r["direction"]) for r in report["rows"] if r["status"] == "pass"}
    ops = {"collapse", "collapse_many", "sp_loss", "expanded_conv"}
    assert {(op, "torch", d) for op in ops for d in ("fwd", "bwd")} <= ran
    # float64 never reaches Triton's sp_loss by design: listed as a skip with the reason, not a failure
    fp64_sp = [r for r in report["rows"] if (r["op"], r["backend"], r["dtype"]) == ("sp_loss", "triton", "fp64")]
    assert all(r["status"] == "skip" and "float64" in r["note"] for r in fp64_sp)
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    # without a GPU the CLI switches the interpreter on: the Triton kernels were really checked
    assert {(op, "triton", d) for op in ops for d in ("fwd", "bwd")} <= ran or torch.cuda.is_available()


def test_selfcheck_fails_on_a_wrong_backend(monkeypatch, capsys):
    import lopfast.ops.collapse as oc

    real = oc.reference_collapse
    monkeypatch.setattr(oc, "reference_collapse", lambda *a: real(*a) * (1 + 1e-4))
    report = lopfast.selfcheck("cpu", dtypes=["fp32"], verbose=False)
    assert not report["ok"]
    failed = {r["op"] for r in report["rows"] if r["status"] == "FAIL"}
    assert {"collapse", "collapse_many", "expanded_conv"} <= failed and "sp_loss" not in failed
    assert "FAILED" in format_table(report)


def test_error_measure():
    r = torch.tensor([1.0, -2.0])
    assert abs(_err([r + 0.02], [r]) - 0.01) < 1e-6
    assert _err([torch.tensor([float("nan"), 1.0])], [r]) == math.inf
    assert _err([None], [None]) == 0.0 and _err([r], [None]) == math.inf
    assert callable(sc_module) and sc_module is lopfast.selfcheck
