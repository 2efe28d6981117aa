"""The Python side of bench/gpu_proof.sh: the epoch phase, the caps check and the summary.

    python bench/gpu_proof.py caps BUDGET NAME=CAP ...    exit 2 when the caps exceed the budget
    python bench/gpu_proof.py epoch DATA OUT.json [--smoke]
    python bench/gpu_proof.py summary WORK OUT BUDGET SMOKE START

``epoch``: one CIFAR-10 epoch of ft and of lop timed through the pipeline's own ``train()``
(ResNet-56 pruned 90 % by l1 magnitude, b = 256, every switch on its default: amp, dispatch and
capture auto): 2 epochs each, the second one timed (the first pays the cold start: compilation,
the dispatch's measurements, the capture), and evaluation timed apart so the training epoch is
``epoch - eval``. The teacher is an untrained ResNet-56 (time does not depend on its accuracy).
``--smoke``: a tiny archive, ResNet-20 at width 4, b = 16, on the CPU (the plumbing only).

``summary``: ONE JSON (``proof.json``: budget, caps, phases with status and seconds, the machine,
each phase's results) and ONE markdown table (``proof.md``) from what the phases left in WORK.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    import torch

    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda, gpu=None,
               cpus=os.cpu_count(), nvcc=shutil.which("nvcc"))
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30), sms=p.multi_processor_count,
                   arch=f"sm_{p.major}{p.minor}")
    return out


def caps(budget: int, items) -> int:
    """Exit status 2 (with the arithmetic) when the phase caps add up to more than the budget."""
    named = [(n, int(c)) for n, c in (i.split("=", 1) for i in items)]
    total = sum(c for _, c in named)
    line = " + ".join(f"{n} {c}" for n, c in named) + f" = {total} s of a {budget} s budget"
    if total > budget:
        print(f"gpu_proof: the phase caps exceed the budget: {line}", file=sys.stderr)
        return 2
    print(f"caps: {line} ({budget - total} s left for the rest)")
    return 0


def epoch(data: str, out: str, smoke: bool) -> int:
    import torch

    sys.path.insert(0, str(HERE))
    import cifar_jpeg

    import lopfast
    from lopfast.pipeline.data import load_data
    from lopfast.pipeline.models import build_model
    from lopfast.pipeline.train import TrainConfig, evaluate, train

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    work = Path(tempfile.mkdtemp(prefix="gpu-proof-epoch-"))
    t0 = time.time()
    print(cifar_jpeg.decode(Path(data), work / "cifar10" / "cifar-10-batches-py"), flush=True)
    decode_s = time.time() - t0
    batch = 16 if smoke else 256
    bundle = load_data("cifar10", data_dir=str(work / "cifar10"), batch_size=batch, eval_batch_size=1000,
                       device=device, channels_last=device.type == "cuda")
    torch.manual_seed(0)
    teacher = build_model("resnet20" if smoke else "resnet56", width=4 if smoke else 16).to(device).eval()
    x0 = bundle.example_inputs(2, device)
    pruned, report = lopfast.prune(teacher, x0, method="l1", target_removed=0.9)
    removed = 1 - sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in teacher.parameters())
    res = dict(images=bundle.train.num_samples, test_images=bundle.test.num_samples, batch=batch,
               removed=round(removed, 4), decode_s=round(decode_s, 2), device=str(device))
    for kind in ("ft", "lop"):
        student = copy.deepcopy(pruned)
        if kind == "lop":
            student = lopfast.expand(student, rate=3.0, generator=torch.Generator().manual_seed(1))
        logs = []
        cfg = TrainConfig(2, 0.05, (), gamma=3000.0 if kind == "lop" else 0.0)
        t = time.time()
        hist = train(student, bundle, cfg, device=device, teacher=teacher if kind == "lop" else None,
                     log=logs.append)["history"]
        total = time.time() - t
        if device.type == "cuda":
            torch.cuda.synchronize()
        te = time.time()
        with lopfast.CollapsedForward(student) if kind == "lop" and device.type == "cuda" else contextlib.nullcontext():
            evaluate(student, bundle.test, device, "auto")  # as train() evaluates (its collapse hooks on)
        if device.type == "cuda":
            torch.cuda.synchronize()
        eval_s = time.time() - te
        res[kind] = dict(epoch1_s=round(hist[0]["seconds"], 3), epoch2_s=round(hist[1]["seconds"], 3),
                         eval_s=round(eval_s, 3), train_epoch_s=round(hist[1]["seconds"] - eval_s, 3),
                         total_s=round(total, 2), test_acc=hist[-1]["test_acc"],
                         notes=[s for s in logs if "step:" in s or "amp" in s][:4])
        print(kind, json.dumps(res[kind]), flush=True)
    Path(out).write_text(json.dumps(res, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


# ----------------------------------------------------------------------------- summary
def _pytest_line(text: str):
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)]
    return lines[-1].strip("= ") if lines else None


def _selfcheck(work: Path):
    path = work / "selfcheck.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["rows"]
    fails = [r for r in rows if r["status"] == "FAIL"]
    return dict(passed=sum(r["status"] == "pass" for r in rows), failed=len(fails),
                skipped=sum(r["status"] == "skip" for r in rows),
                failures=[f"{r['op']} {r['backend']} {r['dtype']} {r['direction']}: error {r['error']} budget "
                          f"{r['budget']} {r.get('note', '')}" for r in fails])


def _tables(work: Path) -> dict:
    out = {}
    for path in sorted(work.glob("table-*.json")):
        for name, m in json.loads(path.read_text()).get("measures", {}).items():
            out[name] = dict(ratios=m.get("ratios"), info=m.get("info"),
                             variants={k: {kk: v.get(kk) for kk in ("s", "peak_mem_GB", "captured", "why_eager", "status")}
                                       for k, v in m.get("variants", {}).items()})
    return out


def summary(work: Path, out: Path, budget: int, smoke: bool, start: int) -> int:
    phases = []
    for line in (work / "phases.tsv").read_text().splitlines():
        name, status, seconds, cap = line.split("\t")
        log = work / f"phase-{name.replace(':', '_')}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        phases.append(dict(phase=name, status=status, seconds=int(seconds), cap=int(cap), pytest=_pytest_line(text)))
    skipped = [dict(what=w, why=y) for w, y in (ln.split("\t", 1) for ln in
                                                 (work / "skips.tsv").read_text().splitlines() if "\t" in ln)]
    epoch_file = work / "epoch.json"
    cache = Path(os.environ.get("LOPFAST_CACHE_DIR", "")) / "dispatch.json"
    entries = json.loads(cache.read_text())["entries"] if cache.exists() else {}
    rejected = {k: e["rejected"] for k, e in entries.items() if e.get("rejected")}
    doc = dict(smoke=smoke, budget_s=budget, seconds=round(time.time() - start), machine=machine(), phases=phases,
               caps_s=sum(p["cap"] for p in phases), skipped=skipped, selfcheck=_selfcheck(work),
               epoch=json.loads(epoch_file.read_text()) if epoch_file.exists() else None,
               measures=_tables(work), dispatch=dict(entries=len(entries), rejected=rejected))
    (out / "proof.json").write_text(json.dumps(doc, indent=1, default=str))
    m = doc["machine"]
    md = [f"# bench/gpu_proof.sh{' --smoke' if smoke else ''}: {m.get('gpu') or 'CPU'}, torch {m['torch']}, "
          f"triton {m['triton']}, nvcc {'yes' if m['nvcc'] else 'no'}",
          "", f"{doc['seconds']} s of a {budget} s budget.", "",
          "| phase | status | seconds | cap | tests |", "|---|---|---:|---:|---|"]
    md += [f"| {p['phase']} | {p['status']} | {p['seconds']} | {p['cap']} | {p['pytest'] or ''} |" for p in phases]
    sc = doc["selfcheck"]
    if sc:
        md += ["", f"selfcheck: {sc['passed']} passed, {sc['failed']} failed, {sc['skipped']} skipped"]
        md += [f"- FAIL {f}" for f in sc["failures"]]
    steps = {k: v for k, v in doc["measures"].items() if k.startswith("train_step/")}
    if steps:
        md += ["", "| step measure | variant | ms | peak GB | captured |", "|---|---|---:|---:|---|"]
        for name, meas in steps.items():
            for var, v in meas["variants"].items():
                ms = f"{1e3 * v['s']:.2f}" if v.get("s") else (v.get("status") or "")
                md.append(f"| {name} | {var} | {ms} | {v.get('peak_mem_GB') or ''} | {v.get('captured')} |")
            ratios = ", ".join(f"{k} {r:.2f}" for k, r in (meas.get("ratios") or {}).items() if r is not None)
            md.append(f"| {name} | ratios | {ratios} | | |")
    ep = doc["epoch"]
    if ep:
        md += ["", f"CIFAR-10 epoch, ResNet-56 {100 * ep['removed']:.1f} % removed (l1), b = {ep['batch']}, "
               f"{ep['images']} images: " + "; ".join(
                   f"{k} {ep[k]['train_epoch_s']} s training (+ {ep[k]['eval_s']} s eval; first epoch "
                   f"{ep[k]['epoch1_s']} s)" for k in ("ft", "lop") if k in ep)]
    md += ["", f"dispatch: {len(entries)} cached choices, {len(rejected)} with a rejected candidate"]
    md += [f"- {k}: {v}" for k, v in rejected.items()]
    if skipped:
        md += ["", "skipped:"] + [f"- {s['what']}: {s['why']}" for s in skipped]
    (out / "proof.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "caps":
        sys.exit(caps(int(args[0]), args[1:]))
    if cmd == "epoch":
        sys.exit(epoch(args[0], args[1], "--smoke" in args))
    if cmd == "summary":
        sys.exit(summary(Path(args[0]), Path(args[1]), int(args[2]), args[3] == "1", int(args[4])))
    if cmd == "machine":
        print(json.dumps(machine()))
        sys.exit(0)
    sys.exit(__doc__)
