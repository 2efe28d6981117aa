"""``lopfast selfcheck``: every available backend of every op on this machine, against float64.

Ops checked, forward and backward each (one row per op, backend, dtype and direction):
    collapse        one expanded conv's W3.W2.W1 (``lopfast.ops.collapse.collapse``)
    collapse_many   a model's layer list in one grouped call (``collapse_many``)
    collapse_step   the same with fp32 factors in a bf16 step: the collapse follows the step's
                    precision (``collapse_many(dtype=bf16)``, what ``CollapsedForward`` runs under
                    bf16 autocast); budget from PyTorch's einsum on the factors rounded to bf16,
                    i.e. the error is stated against the step's own precision (bf16 rows only)
    sp_loss         the SP distillation loss over several layer pairs (``lopfast.sp_loss``)
    expanded_conv   ``ExpandedConv2d`` in collapsed mode (its collapse on the backend), input,
                    weight and bias gradients included

Backends: "torch" (the reference), "triton", "cuda" (where the extension is built), any backend
an op registered (``lopfast.backend.register_backend``), and "auto" (on CUDA: the measured
dispatch). A backend that cannot run here is listed as ``skip`` with the reason. On CPU, Triton
runs through its interpreter, which must be switched on before the kernels are imported:
the ``lopfast selfcheck`` command does that itself (it re-runs itself with ``TRITON_INTERPRET=1``);
``lopfast.selfcheck()`` in a process that imported lopfast without it skips Triton on CPU.

Error measure: ``max|out - ref| / max|ref|`` over every output (every gradient for the backward),
``ref`` computed in float64 by plain formulas independent of lopfast's code (einsums, three
``F.conv2d``, the eager SP loss). Budget, the flash-attention rule: twice the error of the same
plain formulas run by PyTorch in the op's compute dtype, plus a small tolerance (``ATOL``) of
that dtype. The SP loss computes in float32 whatever its inputs (documented), so its float64
rows are held to float32's budget. A backend fails when its error exceeds the budget, it
returns non-finite values, or raises.

On a GPU it uses larger shapes than on CPU: several row tiles and feature chunks of the
kernels, unaligned feature counts, channels_last inputs, batch 1.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ATOL", "main", "selfcheck"]

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
_DT = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------- plain formulas
def _plain_collapse(w1, w2, w3, groups):
    """W_eff = W3.W2.W1 per tap and group, written out once more (independent of lopfast)."""
    G = groups
    p, m_g = w1.shape[:2]
    q, p_g, kh, kw = w2.shape
    n, q_g = w3.shape[:2]
    outs = []
    for g in range(G):
        a1 = w1[g * p_g:(g + 1) * p_g, :, 0, 0]                      # (p_g, m_g)
        a2 = w2[g * q_g:(g + 1) * q_g].reshape(q_g, p_g, kh * kw)     # (q_g, p_g, T)
        a3 = w3[g * (n // G):(g + 1) * (n // G), :, 0, 0]           # (n_g, q_g)
        outs.append(torch.einsum("nq,qpt,pm->nmt", a3, a2, a1))
    return torch.cat(outs).reshape(n, m_g, kh, kw)


def _plain_sp_loss(student, teacher):
    total = 0.0
    for s, t in zip(student, teacher):
        b = s.shape[0]
        qs, qt = s.reshape(b, -1), t.detach().reshape(b, -1)
        gs, gt = F.normalize(qs @ qs.T, dim=1), F.normalize(qt @ qt.T, dim=1)
        total = total + ((gt - gs) ** 2).sum() / (b * b)
    return total


def _plain_expanded_conv(x, w1, w2, w3, bias, layer):
    h = F.conv2d(x, w1, None, 1, layer.padding, 1, layer.groups)
    h = F.conv2d(h, w2, None, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(h, w3, bias, 1, 0, 1, layer.groups)


# ----------------------------------------------------------------------------- cases
def _collapse_layers(big: bool) -> List[Tuple[int, int, int, int, int]]:
    """(m, n, k, groups, rate) of expanded convs."""
    layers = [(8, 8, 3, 1, 3), (6, 10, 3, 2, 2), (4, 4, 3, 4, 3), (5, 7, 1, 1, 2)]
    if big:  # GPU: CIFAR ResNet widths, a late ImageNet layer, a MobileNet depthwise conv
        layers += [(16, 16, 3, 1, 3), (64, 64, 3, 1, 3), (256, 256, 3, 1, 3), (96, 96, 3, 96, 3), (3, 16, 3, 1, 3)]
    return layers


def _factors(m, n, k, groups, rate, gen):
    from lopfast.layers.decompose import expanded_width

    p = groups * expanded_width(rate, m // groups)
    q = groups * expanded_width(rate, n // groups)
    shapes = [(p, m // groups, 1, 1), (q, p // groups, k, k), (n, q // groups, 1, 1)]
    return [(torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(s[1] * s[2] * s[3])) for s in shapes]


def _sp_pairs(big: bool) -> List[Tuple[Tuple[int, ...], Tuple[int, ...], bool]]:
    """(student shape, teacher shape, channels_last student)."""
    pairs = [((8, 6, 4, 4), (8, 12, 4, 4), False), ((8, 5, 3, 3), (8, 10, 3, 3), True), ((8, 37), (8, 50), False)]
    if big:  # several 64/128-row tiles, several 512-feature chunks, unaligned feature counts
        pairs = [((300, 16, 16, 16), (300, 32, 16, 16), False), ((300, 1000), (300, 1001), False),
                 ((300, 8, 12, 12), (300, 16, 12, 12), True)]
    return pairs


def _err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for o, r in zip(outs, refs):
        if o is None or r is None:
            if (o is None) != (r is None):
                return math.inf
            continue
        o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
        if o64.shape != r64.shape or not bool(torch.isfinite(o64).all()):
            return math.inf
        scale = float(r64.abs().max()) if r64.numel() else 0.0
        diff = float((o64 - r64).abs().max()) if r64.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


class _Case:
    """One op at one dtype: ``run(backend) -> (fwd outputs, bwd outputs)``, the float64 reference
    and the plain same-dtype baseline."""

    def __init__(self, op: str, dtype, run: Callable, plain: Callable, inputs64: Callable):
        self.op, self.dtype, self.run, self.plain = op, dtype, run, plain
        self.ref = plain(*inputs64(torch.float64))
        self.base = plain(*inputs64(self.compute_dtype()))

    def compute_dtype(self):
        # the SP loss accumulates in fp32 whatever the input dtype: its fp64 budget is fp32's
        if self.op == "sp_loss" and self.dtype == torch.float64:
            return torch.float32
        return self.dtype


def _cases(device: torch.device, dtypes, big: bool, seed: int) -> List[_Case]:
    import lopfast
    from lopfast.ops.collapse import collapse, collapse_many

    cases = []
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(seed)
        layers64 = [(_factors(*spec, gen), spec[3]) for spec in _collapse_layers(big)]
        dws64 = [torch.randn(f[2].shape[0], f[0].shape[1], f[1].shape[2], f[1].shape[3], generator=gen,
                             dtype=torch.float64) for f, _ in layers64]

        def collapse_inputs(dt, one=False, layers64=layers64, dws64=dws64):
            chosen = layers64[:1] if one else layers64
            ls = [([w.to(device, dt).requires_grad_() for w in f], g) for f, g in chosen]
            return ls, [d.to(device, dt) for d in dws64[:len(chosen)]]

        def plain_collapse(ls, dws):
            outs = [_plain_collapse(*f, g) for f, g in ls]
            grads = torch.autograd.grad(outs, [w for f, _ in ls for w in f], dws)
            return [o.detach() for o in outs], list(grads)

        def run_collapse(backend, inputs=collapse_inputs, one=False, dtype=dtype):
            ls, dws = inputs(dtype, one)
            if one:
                (f, g), = ls
                outs = [collapse(*f, g, backend=backend)]
            else:
                outs = collapse_many([(*f, g) for f, g in ls], backend=backend)
            grads = torch.autograd.grad(outs, [w for f, _ in ls for w in f], dws)
            return [o.detach() for o in outs], list(grads)

        cases.append(_Case("collapse", dtype, lambda b, r=run_collapse: r(b, one=True), plain_collapse,
                           lambda dt, i=collapse_inputs: i(dt, one=True)))
        cases.append(_Case("collapse_many", dtype, run_collapse, plain_collapse, collapse_inputs))
        if dtype in (torch.bfloat16, torch.float16):  # (h17) the collapse of an fp32 model in a bf16 step
            def run_step_collapse(backend, inputs=collapse_inputs, dtype=dtype):
                ls, dws = inputs(torch.float32)
                outs = collapse_many([(*f, g) for f, g in ls], backend=backend, dtype=dtype)
                grads = torch.autograd.grad(outs, [w for f, _ in ls for w in f], [d.to(dtype) for d in dws])
                return [o.detach() for o in outs], list(grads)

            cases.append(_Case("collapse_step", dtype, run_step_collapse, plain_collapse, collapse_inputs))

        pairs = _sp_pairs(big)
        s64 = [torch.randn(s, generator=gen, dtype=torch.float64).relu_() for s, _, _ in pairs]
        t64 = [torch.randn(t, generator=gen, dtype=torch.float64).relu_() for _, t, _ in pairs]
        cl = [c for _, _, c in pairs]

        def sp_inputs(dt, s64=s64, t64=t64, cl=cl):
            s = [x.to(device, dt).to(memory_format=torch.channels_last) if c else x.to(device, dt)
                 for x, c in zip(s64, cl)]
            return [x.requires_grad_() for x in s], [x.to(device, dt) for x in t64]

        def plain_sp(s, t):
            loss = _plain_sp_loss(s, t)
            return [loss.detach()], list(torch.autograd.grad(loss, s))

        def run_sp(backend, sp_inputs=sp_inputs, dtype=dtype):
            s, t = sp_inputs(dtype)
            loss = lopfast.sp_loss(s, t, backend=backend)
            return [loss.detach()], list(torch.autograd.grad(loss, s))

        cases.append(_Case("sp_loss", dtype, run_sp, plain_sp, sp_inputs))

        c, hw, bsz = (32, 16, 16) if big else (6, 6, 4)
        layer = lopfast.ExpandedConv2d(c, c, 3, stride=1, padding=1, rate=3, dtype=torch.float64)
        with torch.no_grad():
            layer.bias.normal_(generator=gen)
        x64 = torch.randn(bsz, c, hw, hw, generator=gen, dtype=torch.float64)
        dy64 = torch.randn(bsz, c, hw, hw, generator=gen, dtype=torch.float64)

        def conv_inputs(dt, layer=layer, x64=x64, dy64=dy64):
            ws = [p.detach().to(device, dt).requires_grad_() for p in
                  (layer.weight1, layer.weight2, layer.weight3, layer.bias)]
            x = x64.to(device, dt).to(memory_format=torch.channels_last).requires_grad_()
            return x, ws, dy64.to(device, dt)

        def plain_conv(x, ws, dy, layer=layer):
            y = _plain_expanded_conv(x, *ws, layer)
            return [y.detach()], list(torch.autograd.grad(y, [x, *ws], dy))

        def run_conv(backend, conv_inputs=conv_inputs, dtype=dtype, c=c):
            x, ws, dy = conv_inputs(dtype)
            mod = lopfast.ExpandedConv2d(c, c, 3, stride=1, padding=1, rate=3, device=device, dtype=dtype)
            with torch.no_grad():
                for p, w in zip((mod.weight1, mod.weight2, mod.weight3, mod.bias), ws):
                    p.copy_(w)
            mod.mode = "collapsed"
            with lopfast.use_backend(backend):
                y = mod(x)
                grads = torch.autograd.grad(y, [x, mod.weight1, mod.weight2, mod.weight3, mod.bias], dy)
            return [y.detach()], list(grads)

        cases.append(_Case("expanded_conv", dtype, run_conv, plain_conv, conv_inputs))
    return cases


# ----------------------------------------------------------------------------- backends
def _interpreter_active() -> bool:
    """True when lopfast's Triton kernels were built for the CPU interpreter (the switch is read
    when the kernels are imported, so setting TRITON_INTERPRET afterwards has no effect)."""
    from lopfast.backend import triton_available, triton_interpreting

    if not triton_available():
        return False
    try:
        from lopfast.kernels import sp_gram
    except Exception:
        return False
    kinds = {type(v).__name__ for v in vars(sp_gram).values()}
    if "InterpretedFunction" in kinds:
        return True
    if "JITFunction" in kinds:
        return False
    return triton_interpreting()


def _backends(op: str, device: torch.device, dtype: torch.dtype) -> List[Tuple[str, Optional[str]]]:
    """(backend, reason it cannot run here or None) for every backend of ``op`` at ``dtype``."""
    from lopfast.backend import op_backends, resolve_backend

    base = "sp_loss" if op == "sp_loss" else "collapse"
    out = []
    for name in op_backends(base):
        if name == "auto" and device.type != "cuda":
            continue  # on CPU auto is the reference: the "torch" row
        why = None
        try:
            resolve_backend(name, device, base)
        except RuntimeError as exc:
            why = str(exc)
        if why is None and name == "triton" and device.type == "cpu" and not _interpreter_active():
            why = "the Triton kernels were imported without TRITON_INTERPRET=1 (run `lopfast selfcheck`)"
        if why is None and name == "triton" and base == "sp_loss" and dtype == torch.float64:
            # by design: tl.dot has no fp64 form on the GPU, so sp_loss refuses an explicit
            # backend="triton" for float64 and "auto" runs the float64 reference (the "torch" row)
            why = "sp_loss never runs float64 on Triton (auto runs the float64 reference)"
        out.append((name, why))
    return out


# ----------------------------------------------------------------------------- driver
def selfcheck(device: Optional[str] = None, *, json_path: Optional[str] = None, big: Optional[bool] = None,
              dtypes: Optional[Sequence[str]] = None, seed: int = 0, verbose: bool = True,
              file=None) -> dict:
    """Check every available backend of every lopfast op against float64 on this machine.

    Args:
        device: "cuda" or "cpu" (default: CUDA when available).
        json_path: also write the report there as JSON.
        big: GPU-sized shapes (default: on CUDA).
        dtypes: names among "fp64", "fp32", "bf16" (default: fp64, fp32 and on CUDA bf16).
        seed: seed of the random inputs.
        verbose: print the table to ``file`` (default stdout).

    Returns the report: ``{"ok": bool, "rows": [...], ...}``; ``ok`` is False when any row failed.
    """
    from lopfast.backend import triton_version

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available")
    big = dev.type == "cuda" if big is None else bool(big)
    names = list(dtypes) if dtypes else (["fp64", "fp32", "bf16"] if dev.type == "cuda" else ["fp64", "fp32"])
    lookup = {v: k for k, v in _DT.items()}
    bad = [n for n in names if n not in lookup]
    if bad:
        raise ValueError(f"dtypes must be among {sorted(lookup)}, got {bad}")
    out = file or sys.stdout
    t_start = time.perf_counter()
    rows: List[Dict] = []

    def make_report(complete: bool) -> dict:
        return dict(
            ok=complete and all(r["status"] != "FAIL" for r in rows), complete=complete, device=str(dev),
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            torch=torch.__version__, triton=triton_version(),
            interpreter=dev.type == "cpu" and _interpreter_active(),
            big_shapes=big, seed=seed, seconds=round(time.perf_counter() - t_start, 2),
            error_measure="max|out-ref|/max|ref| vs float64 plain formulas; budget = 2 x plain PyTorch "
                          "same-dtype error + ATOL[dtype]",
            rows=rows,
        )

    def write(report: dict) -> None:
        if not json_path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        tmp = f"{json_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(tmp, json_path)

    for case in _cases(dev, [lookup[n] for n in names], big, seed):
        budgets = [2 * _err(b, r) + ATOL[case.compute_dtype()] for b, r in zip(case.base, case.ref)]
        for backend, why in _backends(case.op, dev, case.dtype):
            row_base = dict(op=case.op, backend=backend, dtype=_DT[case.dtype])
            if why is not None:
                for direction in ("fwd", "bwd"):
                    rows.append(dict(row_base, direction=direction, status="skip", error=None,
                                     budget=None, ms=None, note=why))
                continue
            t0 = time.perf_counter()
            try:
                if dev.type == "cuda":  # warm-up: compilation and dispatch tuning stay out of the time
                    case.run(backend)
                    _sync(dev)
                t0 = time.perf_counter()
                got = case.run(backend)
                _sync(dev)
                note, errs = "", [_err(g, r) for g, r in zip(got, case.ref)]
            except Exception as exc:  # a backend that raises fails the check (and the rest goes on)
                note, errs = f"{type(exc).__name__}: {exc}".splitlines()[0][:200], [math.inf, math.inf]
            ms = 1e3 * (time.perf_counter() - t0)
            for direction, e, b in zip(("fwd", "bwd"), errs, budgets):
                rows.append(dict(row_base, direction=direction, status="pass" if e <= b else "FAIL",
                                 error=e, budget=b, ms=ms, note=note))
        write(make_report(False))  # a run stopped by a time limit keeps what it checked
    report = make_report(True)
    write(report)
    if verbose:
        print(format_table(report), file=out)
    return report


def format_table(report: dict) -> str:
    """The report as a fixed-width table (one line per op, backend, dtype, direction)."""
    lines = [f"lopfast selfcheck on {report['device']} ({report['device_name']}), torch {report['torch']}, "
             f"triton {report['triton']}" + (", Triton through the interpreter" if report["interpreter"] else ""),
             f"{'op':<14} {'backend':<8} {'dtype':<5} {'dir':<4} {'max error':>10} {'budget':>10} "
             f"{'result':<6} {'ms':>9}  note"]
    for r in report["rows"]:
        e = "-" if r["error"] is None else f"{r['error']:.2e}"
        b = "-" if r["budget"] is None else f"{r['budget']:.2e}"
        ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
        lines.append(f"{r['op']:<14} {r['backend']:<8} {r['dtype']:<5} {r['direction']:<4} {e:>10} {b:>10} "
                     f"{r['status']:<6} {ms:>9}  {r['note']}")
    n_fail = sum(r["status"] == "FAIL" for r in report["rows"])
    n_pass = sum(r["status"] == "pass" for r in report["rows"])
    n_skip = sum(r["status"] == "skip" for r in report["rows"])
    lines.append(f"{'OK' if report['ok'] else 'FAILED'}: {n_pass} passed, {n_fail} failed, {n_skip} skipped "
                 f"in {report['seconds']:.1f} s")
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lopfast selfcheck``: exit status 0 when every row passed."""
    import argparse

    p = argparse.ArgumentParser(prog="lopfast selfcheck", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args)


def add_arguments(p) -> None:
    """The options of ``lopfast selfcheck``."""
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtypes", default=None, help="comma list among fp64,fp32,bf16")
    p.add_argument("--big", action="store_true", default=None, help="GPU-sized shapes (default on CUDA)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    """Run the check from parsed arguments. On a machine without CUDA, where the Triton kernels
    were imported without the interpreter, re-runs itself in a fresh process with
    ``TRITON_INTERPRET=1`` so that the Triton backend is checked too."""
    if (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and os.environ.get("_LOPFAST_SELFCHECK_CHILD") != "1"):
        from lopfast.backend import triton_available

        if triton_available():
            import subprocess

            env = dict(os.environ, TRITON_INTERPRET="1", _LOPFAST_SELFCHECK_CHILD="1")
            argv = []
            if args.json_path:
                argv += ["--json", args.json_path]
            if args.device:
                argv += ["--device", args.device]
            if args.dtypes:
                argv += ["--dtypes", args.dtypes]
            if args.big:
                argv += ["--big"]
            argv += ["--seed", str(args.seed)]
            code = "import sys; from lopfast.selfcheck import main; sys.exit(main(sys.argv[1:]))"
            return subprocess.call([sys.executable, "-c", code, *argv], env=env)
    dtypes = [d for d in args.dtypes.split(",") if d] if args.dtypes else None
    report = selfcheck(args.device, json_path=args.json_path, big=args.big, dtypes=dtypes, seed=args.seed)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
