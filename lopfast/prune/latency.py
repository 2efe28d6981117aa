"""Measured speed of models on the device they run on: the latency reports of ``lopfast.prune``,
``lopfast run`` and ``lopfast zoo``.

:func:`measure_latency` times every model of a dict (the first is the reference, e.g. the
original model; then the pruned and the final contracted one) on the same inputs: batch 1 and
the training batch, eager and ``torch.compile``d, forward passes under ``torch.no_grad``.
Every number is the median of repeated timings with its spread (interquartile range, min, max
and the number of rounds), from the project's one timing loop
(:func:`lopfast.dispatch.timed_rounds`: CUDA events on CUDA, ``perf_counter`` elsewhere). The
speed-up of every model over the reference sits beside its MACs reduction, so a user sees
whether fewer MACs became less time on this device. The models are timed round-robin (one call
each per round): on a shared machine a change of load hits all of them alike, so the speed-ups
hold even when absolute times drift (the spread shows the drift).

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

__all__ = ["LayerTable", "measure_latency", "merge_latency", "format_latency", "device_label", "model_device",
           "model_ms"]


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
    copies = {}
    for name, model in models.items():
        m = copy.deepcopy(model).to(device).eval()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        copies[name] = m
    res: Dict[str, Dict[str, Any]] = {name: {str(b): {"eager": None, "compiled": None} for b in batches}
                                      for name in models}
    for b in batches:
        fns = {name: _call_fn(m, inputs[b], device, amp_dtype) for name, m in copies.items()}
        for name, times in _interleaved(fns, device, rounds, warmup, budget_s).items():
            res[name][str(b)]["eager"] = _stats(times, b)
        if compile:
            cfns = {}
            for name, m in copies.items():
                try:
                    with _recompile_room():
                        cm = torch.compile(m, mode=compile_mode, dynamic=False)
                        fn = _call_fn(cm, inputs[b], device, amp_dtype)
                        fn()  # compiles here, so a failure is this model's alone
                    cfns[name] = fn
                except Exception as exc:  # no compiler on this machine, an op inductor cannot lower, ...
                    res[name][str(b)]["compiled"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            if cfns:
                with _recompile_room():
                    for name, times in _interleaved(cfns, device, rounds, warmup, budget_s).items():
                        res[name][str(b)]["compiled"] = _stats(times, b)
    out["models"] = res
    del copies
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


def _call_fn(m: nn.Module, x: torch.Tensor, device, amp_dtype):
    """One no-grad forward of ``m`` on ``x`` (under autocast with ``amp_dtype``)."""
    def fn():
        with torch.no_grad():
            if amp_dtype is not None:
                with torch.autocast(device.type, dtype=amp_dtype):
                    return m(x)
            return m(x)
    return fn


def _interleaved(fns: Dict[str, Any], device: torch.device, rounds: int, warmup: int, budget_s: float
                 ) -> Dict[str, List[float]]:
    """Time every function of ``fns`` round-robin, one call each per round (the start rotating):
    on a shared machine a change of load falls on all of them alike, so their ratios (the
    speed-ups) hold even when the absolute times drift. Each call is a one-round
    :func:`lopfast.dispatch.timed_rounds`. The rounds are sized from one untimed call of each
    so that one function gets about ``budget_s`` seconds (at most ``rounds``, at least 3)."""
    from lopfast.dispatch import timed_rounds

    names = list(fns)
    one = 0.0
    for name in names:
        for _ in range(max(warmup - 1, 0)):
            fns[name]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fns[name]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        one = max(one, time.perf_counter() - t0)
    n = int(max(3, min(rounds, math.ceil(budget_s / max(one, 1e-6)))))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(n):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            times[name].extend(timed_rounds(fns[name], device, rounds=1, warmup=0))
    return times


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


# ---------------------------------------------------------------------------- per-layer latency tables
LAYER_OP = "prune.layer_latency"


def _layer_inputs(model: nn.Module, example_inputs) -> Dict[str, tuple]:
    """Input shape of every conv/linear layer in the eval forward (layers that do not run: absent)."""
    shapes: Dict[str, tuple] = {}
    names = {m: n for n, m in model.named_modules()}
    def hook(mod, inp):  # returns None: a pre-hook's return value would replace the inputs
        shapes.setdefault(names[mod], tuple(inp[0].shape))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            elif isinstance(example_inputs, dict):
                model(**example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return shapes


def _points(full: int, unit: int, points) -> List[int]:
    """Grid widths of a dimension of ``full`` channels: multiples of ``unit``; ``points`` of them
    spread from the smallest to ``full`` ("all": every multiple, NetAdapt's full table)."""
    unit = max(1, int(unit))
    mult = list(range(unit, full + 1, unit))
    if not mult or mult[-1] != full:
        mult.append(full)
    if points == "all" or len(mult) <= int(points):
        return mult
    k = int(points)
    idx = sorted({round(i * (len(mult) - 1) / (k - 1)) for i in range(k)})
    return [mult[i] for i in idx]


class LayerTable:
    """Measured latency of every conv/linear layer of a model as a function of its (input, output)
    channel counts, on one device: NetAdapt's lookup table.

    Each distinct layer configuration (kind, kernel, stride, padding, groups, input size, bias)
    is timed alone, once per device: on a grid of (in, out) widths (:func:`_points`; one axis
    for depthwise convs, whose in == out), eager, at ``batch`` with the settings of
    :func:`measure_latency` (amp, channels_last on CUDA). The grid of each configuration is
    cached with the dispatch's machinery (:func:`lopfast.dispatch.store_entry`, op
    ``prune.layer_latency``, keyed by the configuration, the batch, the grid, the amp and, on
    CPU, the processor and thread count), so a second model with the same layers, or the next
    process, measures nothing. :meth:`predict` interpolates bilinearly between grid points
    (the official NetAdapt code interpolates with a cubic RBF over every multiple of 8).
    ``measured`` / ``cached`` count the configurations timed now and read from the cache.
    """

    def __init__(self, model: nn.Module, example_inputs, *, batch: int, units: Optional[Dict[str, int]] = None,
                 points=5, amp="auto", device=None, rounds: int = 20, budget_s: float = 0.2) -> None:
        from lopfast import dispatch

        self.device = torch.device(device) if device is not None else model_device(model)
        self.amp = _resolve_amp(amp, self.device)
        self.channels_last = self.device.type == "cuda"
        self.batch = int(batch)
        shapes = _layer_inputs(model, example_inputs)
        self.layers: Dict[str, dict] = {}
        self.measured = self.cached = 0
        tables: Dict[tuple, dict] = {}
        mods = dict(model.named_modules())
        for name, shape in shapes.items():
            m = mods[name]
            unit = (units or {}).get(name, 1)
            if isinstance(m, nn.Conv2d):
                dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                g = 1 if dw else m.groups
                cfg = ("conv", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                       "dw" if dw else g, m.bias is not None, m.padding_mode, tuple(shape[2:]))
                cin = _points(m.in_channels, max(unit, g), points)
                cout = cin if dw else _points(m.out_channels, max(unit, g), points)
            else:
                cfg = ("linear", m.in_features, m.out_features, m.bias is not None, tuple(shape[1:-1]))
                cin = _points(m.in_features, 1, points)
                cout = _points(m.out_features, max(unit, 1), points)
            key = (cfg, self.batch, tuple(cin), tuple(cout), {None: "fp32", torch.bfloat16: "bf16",
                                                               torch.float16: "fp16"}[self.amp],
                   self.channels_last, device_label(self.device) if self.device.type != "cuda" else "")
            if key not in tables:
                entry = dispatch.cached_entry(LAYER_OP, repr(key), self.device)
                if entry is None or "ms" not in entry:
                    entry = {"cin": cin, "cout": cout, "ms": self._measure(cfg, cin, cout, rounds, budget_s),
                             "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
                    dispatch.store_entry(LAYER_OP, repr(key), self.device, entry)
                    self.measured += 1
                else:
                    self.cached += 1
                tables[key] = entry
            self.layers[name] = {"dw": cfg[0] == "conv" and cfg[7] == "dw", "table": tables[key],
                                 "full": (cin[-1], cout[-1])}

    def _module(self, cfg, ci: int, co: int) -> nn.Module:
        if cfg[0] == "conv":
            _, _, _, k, s, p, d, g, bias, pm, _ = cfg
            groups = ci if g == "dw" else g
            return nn.Conv2d(ci, co, k, s, p, d, groups=groups, bias=bias, padding_mode=pm)
        return nn.Linear(ci, co, bias=cfg[3])

    @torch.no_grad()
    def _measure(self, cfg, cin: List[int], cout: List[int], rounds: int, budget_s: float) -> List[List[float]]:
        dw = cfg[0] == "conv" and cfg[7] == "dw"
        out = []
        for ci in cin:
            row = []
            for co in ([ci] if dw else cout):
                m = self._module(cfg, ci, co).to(self.device).eval()
                shape = (self.batch, ci, *cfg[-1]) if cfg[0] == "conv" else (self.batch, *cfg[-1], ci)
                x = torch.randn(shape, device=self.device)
                if self.channels_last and x.dim() == 4:
                    x, m = x.contiguous(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
                amp = self.amp

                def fn(m=m, x=x):
                    if amp is not None:
                        with torch.autocast(self.device.type, dtype=amp):
                            return m(x)
                    return m(x)

                row.append(statistics.median(_time(fn, self.device, rounds, 2, budget_s)) * 1e3)
            out.append(row)
        return out

    def layer_ms(self, name: str, cin: float, cout: float) -> float:
        """Interpolated milliseconds of layer ``name`` with ``cin`` inputs and ``cout`` outputs (0 for
        layers that do not run in the eval forward)."""
        L = self.layers.get(name)
        if L is None:
            return 0.0
        t = L["table"]
        xs, ms = t["cin"], t["ms"]
        if L["dw"]:
            return _interp1(xs, [r[0] for r in ms], cout)
        ys = t["cout"]
        i0, i1, a = _bracket(xs, cin)
        j0, j1, b = _bracket(ys, cout)
        return ((1 - a) * (1 - b) * ms[i0][j0] + a * (1 - b) * ms[i1][j0] + (1 - a) * b * ms[i0][j1]
                + a * b * ms[i1][j1])

    def total_ms(self, dims: Dict[str, tuple]) -> float:
        """Sum of :meth:`layer_ms` over ``dims`` (name -> (in, out) channels)."""
        return sum(self.layer_ms(n, ci, co) for n, (ci, co) in dims.items())


def _bracket(xs: Sequence[float], x: float):
    if x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        n = len(xs) - 1
        return n, n, 0.0
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            return i, i + 1, (x - xs[i]) / (xs[i + 1] - xs[i])
    return len(xs) - 1, len(xs) - 1, 0.0


def _interp1(xs, ys, x) -> float:
    i0, i1, a = _bracket(xs, x)
    return (1 - a) * ys[i0] + a * ys[i1]


def model_ms(model: nn.Module, example: torch.Tensor, *, batch: int, amp="auto", device=None, compiled: bool = False,
             rounds: int = 30, budget_s: float = 1.0) -> Dict[str, Any]:
    """Median (and spread) milliseconds of one forward of ``model`` at ``batch`` (the timing of
    :func:`measure_latency`, one model, one batch, one mode)."""
    lat = measure_latency({"m": model}, example, batches=[batch], train_batch=batch, compile=compiled, amp=amp,
                          rounds=rounds, budget_s=budget_s, device=device)
    t = lat["models"]["m"][str(batch)]["compiled" if compiled else "eager"]
    if not isinstance(t, dict) or "median_ms" not in t:
        raise RuntimeError(f"could not time the model: {t}")
    return t
