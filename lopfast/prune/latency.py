"""Measured speed of models on the device they run on: the latency reports of ``lopfast.prune``,
``lopfast run`` and ``lopfast zoo``.

:func:`measure_latency` times every model of a dict (the first is the reference, e.g. the
original model; then the pruned and the final contracted one) on the same inputs: batch 1 and
the training batch, eager and ``torch.compile``d, forward passes under ``torch.no_grad``.
Every number is the median of repeated timings with its spread (interquartile range, min, max
and the number of rounds), from the project's one timing loop
(:func:`lopfast.dispatch.timed_rounds`: CUDA events on CUDA, ``perf_counter`` elsewhere). The
speed-up of every model over the reference sits beside its MACs reduction, so a user sees
whether fewer MACs became less time on this device.

On CUDA the models run in ``channels_last`` with bf16 autocast when ``amp`` says so (the
pipeline's default on CUDA), as they train; on CPU in float32. ``torch.compile`` is measured
by default on CUDA only: on a CPU it costs tens of seconds per model and batch size (19 s for
the first compile of a digits net on the 2-core CI box), so ``compile=True`` asks for it there.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["measure_latency", "merge_latency", "format_latency", "device_label", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU for a model without any)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def device_label(device) -> str:
    """'NVIDIA H200' on CUDA; on CPU the processor and the thread count, which decide CPU timings."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = _cpu_name()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resolve_amp(amp, device: torch.device) -> Optional[torch.dtype]:
    if amp in (None, "off", False):
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp in ("bf16", torch.bfloat16):
        return torch.bfloat16
    if amp in ("fp16", torch.float16):
        return torch.float16
    raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {amp!r}")


def _stats(times: List[float], batch: int) -> Dict[str, Any]:
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) >= 2 else [ms[0]] * 3
    med = statistics.median(ms)
    return {"median_ms": med, "iqr_ms": q[2] - q[0], "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms),
            "throughput": batch / (med / 1e3) if med > 0 else float("inf")}


def _time(fn, device: torch.device, rounds: int, warmup: int, budget_s: float) -> Dict[str, Any]:
    from lopfast.dispatch import timed_rounds

    # one untimed call sizes the number of rounds: slow calls get fewer (never under 3)
    for _ in range(max(warmup - 1, 0)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(max(3, min(rounds, math.ceil(budget_s / one))))
    return timed_rounds(fn, device, rounds=n, warmup=0)


def measure_latency(models: Dict[str, nn.Module], example, *, batches: Optional[Sequence[int]] = None,
                    train_batch: Optional[int] = None, compile: Optional[bool] = None, amp="auto",
                    rounds: Optional[int] = None, warmup: Optional[int] = None, budget_s: Optional[float] = None,
                    device=None, macs: Optional[Dict[str, Optional[int]]] = None,
                    compile_mode: str = "default") -> Dict[str, Any]:
    """Latency and throughput of every model of ``models`` (the first is the reference).

    Args:
        models: name -> model, e.g. ``{"original": m, "pruned": p, "final": f}``; measured on
            deep copies in eval mode (the models are not changed).
        example: an input tensor; its per-sample shape (``example.shape[1:]``) is used with
            fresh random inputs at each batch size.
        batches: batch sizes to measure (default: 1 and ``train_batch``).
        train_batch: the training batch (default: ``example``'s batch size).
        compile: also time ``torch.compile(model)`` (default: on CUDA only, see the module doc).
        amp: "auto" (bf16 autocast on CUDA, float32 on CPU, as the pipeline trains), "bf16",
            "fp16" or "off".
        rounds / warmup / budget_s: timed rounds at most (default 50 on CUDA, 20 on CPU),
            untimed warm-up calls (5 / 2), and the seconds one measurement aims at (1.0);
            slow calls get fewer rounds, never under 3.
        device: where to run (default: the reference model's device).
        macs: name -> MACs of one sample, for the MACs reduction beside the speed-up.
        compile_mode: ``torch.compile``'s mode.

    Returns a JSON-serialisable dict: ``device`` (its name; CPU model and threads), the
    settings, ``models[name][batch][eager|compiled]`` = {median_ms, iqr_ms, min_ms, max_ms,
    n, throughput (samples/s)} (or {"error": ...} for a compile that failed, None when not
    asked), ``speedup[name][batch][mode]`` over the reference and ``macs_reduction[name]``.
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict of name -> nn.Module")
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{name!r}] must be an nn.Module, got {type(m).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise TypeError("example must be an input tensor with a batch dimension (latency is measured on "
                        f"single-tensor inputs), got {type(example).__name__}")
    ref_name = next(iter(models))
    device = torch.device(device) if device is not None else model_device(models[ref_name])
    if train_batch is None:
        train_batch = int(example.shape[0])
    for arg, v in (("train_batch", train_batch),):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    if batches is None:
        batches = sorted({1, int(train_batch)})
    batches = [int(b) for b in batches]
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batches must be positive ints, got {batches!r}")
    cuda = device.type == "cuda"
    compile = cuda if compile is None else bool(compile)
    amp_dtype = _resolve_amp(amp, device)
    rounds = rounds if rounds is not None else (50 if cuda else 20)
    warmup = warmup if warmup is not None else (5 if cuda else 2)
    budget_s = budget_s if budget_s is not None else 1.0
    channels_last = cuda and example.dim() == 4
    sample_shape = tuple(example.shape[1:])
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn((b, *sample_shape), generator=gen, dtype=example.dtype if example.is_floating_point()
                             else torch.float32).to(device) for b in batches}
    if channels_last:
        inputs = {b: x.contiguous(memory_format=torch.channels_last) for b, x in inputs.items()}

    out: Dict[str, Any] = {
        "device": device_label(device),
        "device_type": device.type,
        "batches": batches,
        "train_batch": int(train_batch),
        "amp": {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
        "channels_last": channels_last,
        "compile": compile,
        "compile_mode": compile_mode if compile else None,
        "reference": ref_name,
        "models": {},
    }
    for name, model in models.items():
        m = copy.deepcopy(model).to(device).eval()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        res: Dict[str, Any] = {}
        for b in batches:
            res[str(b)] = {"eager": _timed(m, inputs[b], device, amp_dtype, rounds, warmup, budget_s), "compiled": None}
        if compile:
            for b in batches:
                try:
                    with _recompile_room():
                        cm = torch.compile(m, mode=compile_mode, dynamic=False)
                        res[str(b)]["compiled"] = _timed(cm, inputs[b], device, amp_dtype, rounds, warmup, budget_s)
                except Exception as exc:  # no compiler on this machine, an op inductor cannot lower, ...
                    res[str(b)]["compiled"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        out["models"][name] = res
        del m
    return _with_speedups(out, macs)


def _with_speedups(out: Dict[str, Any], macs: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, Any]:
    ref = out["models"][out["reference"]]
    out["speedup"] = {}
    for name, res in out["models"].items():
        out["speedup"][name] = {}
        for b, modes in res.items():
            out["speedup"][name][b] = {}
            for mode, t in modes.items():
                r = ref.get(b, {}).get(mode)
                ok = isinstance(t, dict) and "median_ms" in t and isinstance(r, dict) and "median_ms" in r
                out["speedup"][name][b][mode] = r["median_ms"] / t["median_ms"] if ok and t["median_ms"] > 0 else None
    if macs:
        base = macs.get(out["reference"])
        out["macs"] = {k: (int(v) if v is not None else None) for k, v in macs.items()}
        out["macs_reduction"] = {k: (base / v if base and v else None) for k, v in macs.items()}
    return out


_SETTINGS = ("device", "device_type", "batches", "train_batch", "amp", "channels_last", "compile", "compile_mode")


def merge_latency(first: Dict[str, Any], *more: Dict[str, Any], macs: Optional[Dict[str, Optional[int]]] = None
                  ) -> Dict[str, Any]:
    """One report of several :func:`measure_latency` results taken with the same settings (e.g. the
    original before pruning, the pruned and final models later): ``first``'s reference stays the
    reference, speed-ups are recomputed. Raises ValueError when the settings differ."""
    out = {k: v for k, v in first.items() if k not in ("speedup", "macs", "macs_reduction")}
    out["models"] = dict(first["models"])
    merged_macs = dict(first.get("macs") or {})
    for other in more:
        diff = [k for k in _SETTINGS if other.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"latency results measured with different settings ({diff}) cannot be compared")
        out["models"].update(other["models"])
        merged_macs.update(other.get("macs") or {})
    merged_macs.update(macs or {})
    return _with_speedups(out, merged_macs or None)


def _recompile_room():
    """Raise dynamo's recompile limit while measuring: every model and batch size is one more
    compiled entry of the same forward code, and past the limit (8) dynamo silently runs eager,
    which would be reported as compiled. (``torch._dynamo.reset()`` would also drop the user's
    own compiled models.)"""
    import contextlib

    cfg = getattr(getattr(torch, "_dynamo", None), "config", None)
    if cfg is None:
        return contextlib.nullcontext()
    keys = {k: 256 for k in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                             "accumulated_cache_size_limit") if hasattr(cfg, k)}
    return cfg.patch(**keys) if keys else contextlib.nullcontext()


@torch.no_grad()
def _timed(m: nn.Module, x: torch.Tensor, device, amp_dtype, rounds, warmup, budget_s) -> Dict[str, Any]:
    if amp_dtype is not None:
        def fn():
            with torch.autocast(device.type, dtype=amp_dtype):
                return m(x)
    else:
        def fn():
            return m(x)
    return _stats(_time(fn, device, rounds, warmup, budget_s), int(x.shape[0]))


def _fmt_t(t) -> str:
    if t is None:
        return "not measured"
    if "error" in t:
        return "failed"
    return f"{t['median_ms']:.3g} ± {t['iqr_ms'] / 2:.2g}"


def _fmt_x(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def format_latency(lat: Dict[str, Any]) -> str:
    """A markdown table of :func:`measure_latency`'s result: per model and batch, the median ms
    (± half the interquartile range) eager and compiled, throughput, and the speed-ups over the
    reference beside the MACs reduction."""
    lines = [f"latency on {lat['device']} (amp {lat['amp']}{', channels_last' if lat['channels_last'] else ''}; "
             f"median ± IQR/2 of n rounds; speed-up over {lat['reference']!r})",
             "| model | batch | eager ms | compiled ms | samples/s (eager) | speed-up eager | speed-up compiled "
             "| MACs reduction |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    red = lat.get("macs_reduction") or {}
    for name, res in lat["models"].items():
        for b, modes in res.items():
            e, c = modes["eager"], modes["compiled"]
            sp = lat["speedup"][name][b]
            thr = f"{e['throughput']:.4g}" if e and "throughput" in e else ""
            r = red.get(name)
            lines.append(f"| {name} | {b} | {_fmt_t(e)} (n={e['n']}) | {_fmt_t(c)} | {thr} | {_fmt_x(sp['eager'])} | "
                         f"{_fmt_x(sp['compiled'])} | {_fmt_x(r)} |")
    errors = {f"{n} b={b}": modes["compiled"]["error"] for n, res in lat["models"].items() for b, modes in res.items()
              if isinstance(modes["compiled"], dict) and "error" in modes["compiled"]}
    for k, v in errors.items():
        lines.append(f"compile failed ({k}): {v}")
    if not lat["compile"]:
        lines.append("compiled: not measured (default on CPU; ask with compile=True / --measure-compile)")
    return "\n".join(lines)
