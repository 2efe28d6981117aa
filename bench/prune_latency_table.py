"""BENCHMARKS.md's pruned-latency tables from ``bench/bench_prune_latency.py``'s JSON.

    python bench/prune_latency_table.py bench/results/prune_latency-cpu.json

Prints markdown: per net, the original and the pruned models with parameters, MACs reduction,
median latency ± IQR at batch 1 and the training batch (eager; compiled where measured) and the
measured speed-up beside the MACs reduction; then the ``round_to`` study and the latency-budget
rows when the file has them. Nothing is computed here that the JSON does not hold.
"""
from __future__ import annotations

import json
import sys


def _ms(cell) -> str:
    if not cell:
        return "–"
    return f"{cell['median_ms']:.1f} ± {cell['iqr_ms']:.1f}"


def _sp(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def net_rows(name: str, rec: dict) -> list:
    b1, bt = rec["batches"][0], rec["batches"][-1]
    compiled = rec.get("compile")
    head = (f"| {name} | model | params | MACs ÷ | b{b1} eager ms | b{b1} speed-up | b{bt} eager ms | "
            f"b{bt} speed-up |" + (f" b{b1} / b{bt} compiled speed-up |" if compiled else ""))
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, lat in rec["models"].items():
        sp = rec["speedup"][m]
        row = (f"| | {m} | {rec.get('params', {}).get(m, '–'):,} | {rec['macs_reduction'][m]:.2f}× | "
               f"{_ms(lat[str(b1)]['eager'])} | {_sp(sp[str(b1)]['eager'])} | {_ms(lat[str(bt)]['eager'])} | "
               f"{_sp(sp[str(bt)]['eager'])} |")
        if compiled:
            row += f" {_sp(sp[str(b1)]['compiled'])} / {_sp(sp[str(bt)]['compiled'])} |"
        rows.append(row)
    return rows


def markdown(doc: dict) -> str:
    out = []
    for name, rec in doc.get("nets", {}).items():
        out += net_rows(name, rec) + [""]
    if doc.get("round_to"):
        out += ["round_to study (channel ratio 0.45, eager speed-up against the original; MACs ÷):", "",
                "| net | round_to | MACs ÷ | speed-up b1 | speed-up, training batch |", "|---|---|---|---|---|"]
        for name, rec in doc["round_to"].items():
            b1, bt = rec["batches"][0], rec["batches"][-1]
            for m in rec["models"]:
                if m == "original":
                    continue
                sp = rec["speedup"][m]
                out.append(f"| {name} | {m.split('=')[1]} | {rec['macs_reduction'][m]:.2f}× | "
                           f"{_sp(sp[str(b1)]['eager'])} | {_sp(sp[str(bt)]['eager'])} (b{bt}) |")
        out.append("")
    if doc.get("latency_budget"):
        out += ["| net | asked | measured | predicted | batch | params removed | MACs removed | seconds |",
                "|---|---|---|---|---|---|---|---|"]
        for name, r in doc["latency_budget"].items():
            out.append(f"| {name} | {r['asked']:.2f}× | {r['achieved']:.2f}× | {r['predicted']:.2f}× | {r['batch']} | "
                       f"{100 * r['params_removed']:.1f} % | {100 * r['macs_removed']:.1f} % | {r['seconds']:.0f} |")
        out.append("")
    m = doc.get("machine") or {}
    out.append(f"Machine: {m.get('platform', '?')}, {m.get('cpus', '?')} CPUs, {m.get('threads', '?')} threads, "
               f"GPU {m.get('gpu')}, torch {m.get('torch', '?')}, triton {m.get('triton', '?')}.")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/prune_latency_table.py <prune_latency-*.json>")
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
