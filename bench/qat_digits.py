"""int8 after quantization-aware fine-tuning on the digits demo: LOP vs fine-tuning, and int8 latency.

    python bench/qat_digits.py                      # docs/quantization.md's tables (~4 min on a 2-core CPU)
    python bench/qat_digits.py --seeds 1 --epochs 2 --pretrain-epochs 2 --out /tmp/q   # a smoke run

The demo's setting (``lopfast demo``: digitsnet on the embedded digits, pretrained 40 epochs, l1 to
95 % of weights removed, 30 fine-tuning epochs at lr 0.01, gamma 3000, seeds 0-2 sharing the seed-0
teacher). Per seed it runs the demo's fp32 recoveries (``ft``, ``lop``; the same numbers as
``lopfast demo``) and their quantization-aware versions from the same pruned model, same schedule:

* ``ft`` QAT: ``prepare_qat_fx`` of the pruned net (torch's x86 QAT qconfig mapping, conv + BN
  (+ ReLU) fused), fine-tuned, ``convert_fx``;
* ``lop`` QAT: the pruned net expanded (rate 3), ``prepare_qat_fx`` with lopfast's configs (BN folded
  into the fake-quantized collapsed kernels), fine-tuned with SP distillation from the teacher
  fused the same way (``fuse_fx``), ``lopfast.contract`` then ``convert_fx``.

Both: observers and BatchNorm statistics frozen for the last quarter of the epochs; observers
off whenever the model is in eval mode (the per-epoch test evaluation does not calibrate).
Reported: the fake-quantized (QAT) and the int8 test accuracy, mean ± std (n), and lop − ft paired
by seed. Then the CPU latency of the int8 lop model beside its fp32 compact model at batch 1 and
the training batch (256), with 1 and 2 threads (``lopfast.prune.latency.measure_latency``,
eager, median ± IQR/2). Writes ``qat.json`` and ``qat.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings

import torch

import lopfast
from lopfast.cli import DEMO_DEFAULTS
from lopfast.layers import qat as lq
from lopfast.pipeline import RunConfig, stages
from lopfast.pipeline.train import evaluate, train
from lopfast.prune.latency import format_latency, measure_latency


def _quiet():
    # torch.ao.quantization's deprecation notices (it points to torchao's pt2e flow), once per call
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    warnings.filterwarnings("ignore", message=".*_aminmax.*")
    warnings.filterwarnings("ignore", message=".*reduce_range.*")


def _observe_while_training(model, state):
    """Observers run in training mode only (until frozen): evaluating never calibrates."""
    from torch.ao import quantization as tq

    def hook(module, args):
        module.apply(tq.enable_observer if module.training and not state["frozen"] else tq.disable_observer)

    model.register_forward_pre_hook(hook)


def qat_recover(method, cfg, teacher, pruned, data, log):
    """Quantization-aware ``ft`` or ``lop`` from ``pruned``: (fake-quant acc, int8 acc, int8 model)."""
    from torch.ao import quantization as tq
    from torch.ao.quantization.quantize_fx import convert_fx, fuse_fx, prepare_qat_fx

    example = (data.example_inputs(2, "cpu"),)
    qmap = tq.get_default_qat_qconfig_mapping("x86")
    base = copy.deepcopy(pruned).cpu().train()
    fused_teacher = None
    if method == "lop":
        student = lopfast.expand(base, cfg.rate, generator=torch.Generator().manual_seed(cfg.seed))
        model = prepare_qat_fx(student, qmap, example, prepare_custom_config=lq.prepare_custom_config(),
                               backend_config=lq.backend_config())
        fused_teacher = fuse_fx(copy.deepcopy(teacher).cpu().eval())  # taps the same fused outputs
    else:
        model = prepare_qat_fx(base, qmap, example)
    tc = stages._train_cfg(cfg, "finetune", cfg.epochs, cfg.lr, cfg.gamma if method == "lop" else 0.0)
    state = {"frozen": False}
    _observe_while_training(model, state)
    freeze_at = max(1, round(0.75 * tc.epochs))

    def on_epoch_end(epoch, rec):
        if epoch + 1 == freeze_at:
            state["frozen"] = True
            model.apply(lq.freeze_bn_stats)

    train(model, data, tc, device="cpu", teacher=fused_teacher, desc=f"qat-{method}", log=log,
          on_epoch_end=on_epoch_end)
    model.eval()
    fq_acc = evaluate(model, data.test, "cpu", "off")["acc"]
    int8 = convert_fx(lopfast.contract(model) if method == "lop" else model)
    return fq_acc, evaluate(int8, data.test, "cpu", "off")["acc"], int8


def _mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _cell(xs):
    m, s = _mean_std(xs)
    return f"{m:.2f} ± {s:.2f} (n={len(xs)})"


def table(rows, seeds):
    """Markdown: per method fp32 / QAT fake-quant / int8 accuracy, then lop − ft paired by seed."""
    by = {(r["method"], r["seed"]): r for r in rows}
    out = ["| method | fp32 (no QAT) | QAT, fake-quant | **int8** (QAT, converted) | int8 − fp32 |",
           "|---|---|---|---|---|"]
    for m in ("ft", "lop"):
        col = lambda k: [by[(m, s)][k] for s in seeds]  # noqa: E731
        drop = [by[(m, s)]["int8"] - by[(m, s)]["fp32"] for s in seeds]
        out.append(f"| {m} | {_cell(col('fp32'))} | {_cell(col('fq'))} | **{_cell(col('int8'))}** | "
                   f"{_cell(drop)} |")
    diff = lambda k: [by[("lop", s)][k] - by[("ft", s)][k] for s in seeds]  # noqa: E731
    out.append(f"| **lop − ft** | {_cell(diff('fp32'))} | {_cell(diff('fq'))} | **{_cell(diff('int8'))}** | |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/qat-digits")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"])
    p.add_argument("--pretrain-epochs", type=int, default=DEMO_DEFAULTS["pretrain_epochs"])
    p.add_argument("--no-latency", action="store_true")
    args = p.parse_args(argv)
    _quiet()
    t0 = time.time()
    demo = {k: v for k, v in DEMO_DEFAULTS.items() if k != "seeds"}
    cfg = RunConfig(**{**demo, "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs, "measure": False})
    fp32_dir = os.path.join(args.out, "fp32")
    runs = stages.run_seeds(cfg, fp32_dir, seeds=args.seeds, share_teacher=True, quiet=True)
    seeds = runs["seeds"]
    seed_dir = lambda s: fp32_dir if len(seeds) == 1 else os.path.join(fp32_dir, f"seed{s}")  # noqa: E731
    teacher = stages.load_model_file(os.path.join(seed_dir(seeds[0]), "pretrain", "model.pt"))
    rows, int8_lop = [], None
    for s, res in zip(seeds, runs["runs"]):
        scfg = dataclasses.replace(cfg, seed=s)
        data, _ = stages.prepare(scfg)  # the seed's data order and augmentation, one thread (as the demo)
        pruned = stages.load_model_file(os.path.join(seed_dir(s), "prune", "model.pt"))
        for m in ("ft", "lop"):
            fq, int8_acc, int8 = qat_recover(m, scfg, teacher, pruned, data, lambda msg: None)
            rows.append({"method": m, "seed": s, "fp32": res["methods"][m]["acc"], "fq": fq, "int8": int8_acc})
            print(f"seed {s} {m}: fp32 {rows[-1]['fp32']:.2f}  QAT fake-quant {fq:.2f}  int8 {int8_acc:.2f}",
                  flush=True)
            if m == "lop" and s == seeds[0]:
                int8_lop = int8
    md = [table(rows, seeds)]
    result = {"rows": rows, "seeds": seeds, "config": cfg.to_dict(), "command": " ".join(["python"] + sys.argv)}
    if not args.no_latency:
        fp32_lop = stages.load_model_file(os.path.join(seed_dir(seeds[0]), "lop", "model.pt"))
        result["latency"] = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            lat = measure_latency({"fp32 (lop, contracted)": fp32_lop, "int8 (lop, QAT)": int8_lop},
                                  data.example_inputs(1, "cpu"), batches=[1, cfg.batch_size], compile=False,
                                  rounds=50, budget_s=3.0)
            result["latency"][threads] = lat
            load = ", ".join(f"{v:.1f}" for v in os.getloadavg())  # a shared machine: say how busy it was
            md.append(f"\n{threads} thread{'s' if threads > 1 else ''} (load average {load}): " + format_latency(lat))
    result["seconds"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "qat.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = "\n".join(md) + f"\n\n{time.time() - t0:.0f} s in all"
    with open(os.path.join(args.out, "qat.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
