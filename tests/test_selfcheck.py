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


SC = __import__("sys").modules["lopfast.selfcheck"]


def test_budgets_reject_a_one_percent_error(monkeypatch):
    """The error model's budgets catch a result that is 1 % off: every fp32 and fp64 budget is
    below 1 %, and a reference collapse or SP loss scaled by 1.01 fails every row that uses it."""
    import lopfast.ops.collapse as oc
    from lopfast.ops import sp_loss as sp_ops

    clean = lopfast.selfcheck("cpu", dtypes=["fp64", "fp32"], verbose=False, nets=())
    assert clean["ok"]
    assert all(r["budget"] < SC.LOOSE for r in clean["rows"] if r["budget"] is not None)
    real_c, real_s = oc.reference_collapse, sp_ops.sp_loss_reference
    monkeypatch.setattr(oc, "reference_collapse", lambda *a: real_c(*a) * 1.01)
    monkeypatch.setattr(sp_ops, "sp_loss_reference", lambda *a: real_s(*a) * 1.01)
    report = lopfast.selfcheck("cpu", dtypes=["fp64", "fp32"], verbose=False, nets=())
    failed = {(r["op"], r["dtype"], r["direction"]) for r in report["rows"]
              if r["backend"] == "torch" and r["status"] == "FAIL"}
    for dt in ("fp64", "fp32"):
        for op in ("collapse", "collapse_many", "sp_loss", "expanded_conv"):
            assert {(op, dt, "fwd"), (op, dt, "bwd")} <= failed, (op, dt)


def test_budgets_hold_the_errors_measured_on_the_h200():
    """At the GPU's shapes the fp32 budgets sit above the errors correct kernels reached on the
    H200, where the old rule (2 x PyTorch's error + 2e-6) failed them (collapse_many triton and
    cuda backward 3.88e-6 vs 3.51e-6; sp_loss cuda backward 6.28e-6 vs 3.68e-6), and far below 1 %."""
    cases = {}
    for case in SC._cases(torch.device("cpu"), [torch.float32], True, 0, ()):
        cases[case.op] = case
        if case.op == "sp_loss":
            break
    assert 3.88e-6 < cases["collapse_many"].budgets[1] < SC.LOOSE / 10
    assert 6.28e-6 < cases["sp_loss"].budgets[1] < SC.LOOSE / 10
    assert cases["sp_loss"].budgets[0] < 1e-4  # the loss itself: fp32 from the inputs


def test_budget_model_terms():
    """eta: TF32 operand rounding only where allowed, sqrt(K) accumulation, intermediates stored in
    the input dtype; u_out the result's rounding."""
    x = torch.randn(8, 8, dtype=torch.float64)

    def inputs(dt, via=None, eta=0.0, seed=0):
        return [SC._inp(x, "cpu", dt, via, eta, seed, grad=True)]

    def plain(a):
        y = a @ a.T
        return [y.detach()], list(torch.autograd.grad(y.sum(), [a]))

    c = SC._Case("collapse", torch.float32, None, plain, inputs, K=64, n_int=1)
    assert abs(c.eta - (8 * 2.0**-24 + 2.0**-24)) < 1e-12
    t = SC._Case("collapse", torch.float32, None, plain, inputs, K=64, n_int=1, tf32=True)
    assert abs(t.eta - (2.0**-11 + 8 * 2.0**-24 + 2.0**-24)) < 1e-12 and t.budgets[0] > 100 * c.budgets[0]
    b = SC._Case("collapse", torch.bfloat16, None, plain, inputs, K=64, n_int=1)
    assert b.budgets[0] >= 2.0**-8  # the bf16 result's own rounding
