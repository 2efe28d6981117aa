"""What a run reports: its plain-text table, mean +- std summaries over seeds, and plots.

* :func:`format_table`: one run (teacher, pruned, each method).
* :func:`summarize` / :func:`format_summary`: many runs (seeds) of the same cells, mean +- std
  and n per (target, method), plus the difference of two methods with its spread.
* :func:`plot_curves` (accuracy per epoch), :func:`plot_sweep` (accuracy against % of weights
  removed, one line per method, error bars over seeds: the paper's Fig. 3/4 style).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["format_table", "format_summary", "mean_std", "plot_curves", "plot_sweep", "summarize"]


def format_table(results: dict) -> str:
    """A plain-text table: params, MACs, % removed, accuracy and training time per model."""
    rows = [("model", "params", "MACs", "% removed", "accuracy", "train time")]
    t = results["teacher"]
    rows.append(("unpruned (teacher)", f"{t['params']:,}", f"{t['macs']:,}", "0.0", f"{t['acc']:.2f}%", ""))
    p = results["pruned"]
    rows.append(("pruned, no recovery", f"{p['params']:,}", f"{p['macs']:,}", f"{100 * p['removed']:.1f}",
                 f"{p['acc']:.2f}%", ""))
    for name, r in results["methods"].items():
        if "error" in r:
            rows.append((name, "-", "-", "-", "not run", "(see log)"))
            continue
        secs = r.get("train_seconds")
        rows.append((f"{name} ({r['epochs']} ep)", f"{r['params']:,}", f"{r['macs']:,}",
                     f"{100 * (r['removed'] or 0):.1f}", f"{r['acc']:.2f}%", f"{secs:.0f}s" if secs is not None else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    sep = "  ".join("-" * w for w in widths)
    seed = results.get("config", {}).get("seed")
    note = (f"one seed ({seed}), n=1: no spread; --seeds N gives mean ± std and whether lop − ft exceeds it"
            if len(results["methods"]) > 1 else None)
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]] + ([note] if note else []))


def plot_curves(results: dict, out: str) -> Optional[str]:
    """Test accuracy per epoch of every method (+ teacher line) -> out/accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["methods"].items():
        path = os.path.join(out, name, "result.json")
        if "error" in r:
            continue
        if os.path.exists(path):
            with open(path) as f:
                hist = json.load(f)["history"]
            ax.plot([h["epoch"] for h in hist], [h["test_acc"] for h in hist], label=name)
    ax.axhline(results["teacher"]["acc"], color="k", ls="--", lw=1, label="unpruned teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['config']['model']} on {results['config']['dataset']}, "
                 f"{100 * results['pruned']['removed']:.1f}% of weights removed")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "accuracy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mean_std(values: Iterable[float]):
    """(mean, sample standard deviation, n); the std of one value is 0."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(v) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return m, sd, n


def _fmt(m: float, sd: float, n: int) -> str:
    if n == 0:
        return "-"
    return f"{m:.2f} ± {sd:.2f} (n={n})"


def summarize(rows: Sequence[dict], by: Sequence[str] = ("target", "method"), value: str = "acc") -> List[dict]:
    """Group ``rows`` (one per cell and seed) by ``by``; mean, std and n of ``value`` (and of ``removed``)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        m, sd, n = mean_std(r.get(value) for r in rs)
        rm, _, _ = mean_std(r.get("removed") for r in rs)
        out.append({**dict(zip(by, key)), "mean": m, "std": sd, "n": n, "removed": rm,
                    "seeds": [r.get("seed") for r in rs], "values": [r.get(value) for r in rs]})
    return out


def paired_difference(rows: Sequence[dict], a: str, b: str, cell: Sequence[str] = ("target",),
                      value: str = "acc") -> List[dict]:
    """Per cell, ``a - b`` paired by seed: mean, std, n, and whether |mean| exceeds the std (the spread)."""
    index: Dict[tuple, Dict[object, Dict[str, float]]] = {}
    for r in rows:
        index.setdefault(tuple(r.get(k) for k in cell), {}).setdefault(r.get("seed"), {})[r["method"]] = r[value]
    out = []
    for key, by_seed in index.items():
        diffs = [d[a] - d[b] for d in by_seed.values() if a in d and b in d]
        if not diffs:
            continue
        m, sd, n = mean_std(diffs)
        out.append({**dict(zip(cell, key)), "a": a, "b": b, "mean": m, "std": sd, "n": n,
                    "exceeds_spread": n > 1 and abs(m) > sd, "values": diffs})
    return out


def format_summary(rows: Sequence[dict], *, cell: Sequence[str] = ("target",), paper: Optional[dict] = None,
                   compare: Sequence[tuple] = (("lop", "ft"),), title: Optional[str] = None) -> str:
    """A markdown table: one row per method, one column per cell, ``mean ± std (n)``, the paper's
    number in brackets where ``paper[(method, cell value)]`` has one; then ``a - b`` per cell,
    paired by seed, with its spread and whether the difference exceeds it."""
    paper = paper or {}
    cells = list(dict.fromkeys(tuple(r.get(k) for k in cell) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    stats = {(tuple(s[k] for k in cell), s["method"]): s for s in summarize(rows, (*cell, "method"))}

    def head(c):
        rm = [stats[(c, m)]["removed"] for m in methods if (c, m) in stats]
        label = " ".join(f"{k}={v}" for k, v in zip(cell, c) if k != "target")
        pct = f"{100 * rm[0]:.2f} % removed" if rm and rm[0] == rm[0] else ""
        return " ".join(x for x in (label, pct) if x) or str(c)

    lines = [f"**{title}**", ""] if title else []
    lines.append("| method | " + " | ".join(head(c) for c in cells) + " |")
    lines.append("|---" * (len(cells) + 1) + "|")
    for m in methods:
        row = []
        for c in cells:
            st = stats.get((c, m))
            txt = _fmt(st["mean"], st["std"], st["n"]) if st else "-"
            ref = paper.get((m, c[0] if len(c) == 1 else c))
            if ref is not None:
                txt += f" [paper {ref:.2f}]"
            row.append(txt)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    for a, b in compare:
        diffs = {tuple(d[k] for k in cell): d for d in paired_difference(rows, a, b, cell)}
        if not diffs:
            continue
        row = []
        for c in cells:
            d = diffs.get(c)
            if d is None:
                row.append("-")
                continue
            verdict = "exceeds spread" if d["exceeds_spread"] else "within spread"
            txt = f"{d['mean']:+.2f} ± {d['std']:.2f} (n={d['n']}, {verdict})"
            pa, pb = paper.get((a, c[0] if len(c) == 1 else c)), paper.get((b, c[0] if len(c) == 1 else c))
            if pa is not None and pb is not None:
                txt += f" [paper {pa - pb:+.2f}]"
            row.append(txt)
        lines.append(f"| **{a} − {b}** | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict], path: str, *, teacher_acc: Optional[float] = None, title: Optional[str] = None,
               paper: Optional[Dict[str, Sequence[tuple]]] = None) -> str:
    """Accuracy against % of weights removed, one line per method, error bars (std over seeds);
    ``paper[method] = [(% removed, acc), ...]`` adds the paper's points as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    stats = summarize(rows, ("target", "method"))
    for i, m in enumerate(dict.fromkeys(s["method"] for s in stats)):
        pts = sorted((100 * s["removed"], s["mean"], s["std"]) for s in stats if s["method"] == m)
        line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                           capsize=3, label=m)
        if paper and m in paper:
            pp = sorted(paper[m])
            ax.plot([p[0] for p in pp], [p[1] for p in pp], ls="--", marker="x", color=line[0].get_color(),
                    alpha=0.6, label=f"{m} (paper)")
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="k", ls="--", lw=1, label="unpruned")
    ax.set_xlabel("% of weights removed")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
