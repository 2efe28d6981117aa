"""Measured backend dispatch: what ``backend="auto"`` runs on CUDA.

The first time an op meets a key (a hashable description of the shapes and dtype of one call,
e.g. the layer list of a model for the collapse, the pair list of a step for the SP loss) on a
CUDA device, ``choose`` runs every candidate backend on that call's own inputs:

1. the reference first, then each candidate once, forward and (where the inputs require grad and
   grad mode is on) backward, on detached copies of the inputs, so the user's autograd graph,
   gradients and random number stream are untouched;
2. a candidate whose outputs or input gradients differ from the reference's by more than a
   dtype-dependent relative error (``TOLERANCE``; a tensor far smaller than the others of its
   list is measured against ``FLOOR`` times the largest), are not finite where the reference
   is, or raise, is rejected (a gate against wrong results, not a precision test: ``lopfast
   selfcheck`` and the tests hold the tight budgets);
3. the survivors are timed a few iterations each after a warm-up (CUDA events, median), and
   the fastest wins.

The choice is cached per (device name, torch and triton versions, op, key): in memory, and on disk
as JSON in ``$XDG_CACHE_HOME/lopfast/dispatch.json`` (``~/.cache/lopfast/dispatch.json``),
written atomically; an unreadable file is ignored and replaced. The next process on the same
machine skips the timing. Processes that share the file (the workers of ``lopfast reproduce
--parallel``, a warm-up process and the workers after it) measure one at a time: a measurement
holds an exclusive lock on ``dispatch.json.lock``, re-reads the file first (another process may
have measured the key meanwhile: then nothing is timed) and merges its entry into the file under
the same lock, so no process's entry is lost and no two processes' timings disturb each other.

A candidate being timed never measures the ops it calls: their ``choose`` returns the cached
choice or the static default, unmeasured and uncached. So timing the whole step in fp32 and in
bf16 (``amp="auto"``) does not also time every collapse class and SP call in both precisions:
those are measured once, in the precision the step then runs.

Environment:
    ``LOPFAST_DISPATCH=off``        no measuring: the op's static default (Triton on CUDA)
    ``LOPFAST_DISPATCH=<backend>``  force that backend wherever the op has it (``torch``, ``triton``,
                                    ``cuda``, an op's own such as ``matmul``); elsewhere the static default
    ``LOPFAST_DISPATCH_CACHE=0``    keep choices in memory only (no disk read or write)
    ``LOPFAST_CACHE_DIR``           another folder for the cache file

CPU tensors always run the reference, untimed. Under ``torch.compile`` (while dynamo traces) and
during CUDA graph capture nothing is timed: the cached choice is used when there is one, else the
static default. So call the model once eagerly (one training step) before compiling it or
capturing a graph, and the compiled code uses the measured choice.

What is timed depends on how the work will run (``timing_mode()``):

* ``"eager"`` (default): each candidate called as Python calls it, CUDA events around the call:
  the time includes the GPU idling while the host launches, which is what an eager step pays.
* ``"graph"`` (inside ``with lopfast.dispatch.graph_timing():``; the training-step engine enters
  it when it will capture the step as one CUDA graph): each candidate's forward and backward is
  captured once as a CUDA graph (``lopfast.graphs.Graph``) and its *replays* are timed, i.e. its
  GPU time alone: a grouped launch is not ruled out by Python launch cost that a replayed graph
  never pays. A candidate that cannot be captured (a host sync) is rejected in this mode.
  Choices are cached apart from the eager ones (the cache key names the mode).

An explicit ``backend=`` on an op, or a ``lopfast.use_backend`` block, bypasses all of this.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

from lopfast import files, graphs

__all__ = ["TOLERANCE", "cache_path", "cached_entry", "choose", "clear", "decisions", "graph_timing", "lookup",
           "median_time", "store_entry", "timed_rounds", "timing_mode", "untimed"]

ENV_DISPATCH = "LOPFAST_DISPATCH"
ENV_CACHE = "LOPFAST_DISPATCH_CACHE"
FILE_VERSION = 1

# relative error ||out - ref|| / ||ref|| above which a candidate is rejected, by dtype
TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
# a tensor's error is measured against at least this fraction of the largest norm among the
# outputs (or gradients) of the call (``_error``)
FLOOR = 1e-3

WARMUP = 2
ITERS = 5
# stop timing a candidate after this much time (first-call cost stays bounded on big keys)
BUDGET_S = 0.25

_lock = threading.RLock()
_timing: contextvars.ContextVar[str] = contextvars.ContextVar("lopfast_dispatch_timing", default="eager")
# True while a candidate runs inside _measure: nested choices are not measured (module docstring)
_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("lopfast_dispatch_inside", default=False)


@contextlib.contextmanager
def untimed():
    """Inside this block a choice not cached yet takes the static default instead of being
    measured: for one-off work (a check forward before training) whose shapes and timing mode
    are not the training step's, so it costs no measurement and caches nothing."""
    token = _inside.set(True)
    try:
        yield
    finally:
        _inside.reset(token)


def timing_mode() -> str:
    """How candidates are timed right now: "eager" (as called) or "graph" (replays of a captured
    CUDA graph: GPU time only); see the module docstring."""
    return _timing.get()


@contextlib.contextmanager
def graph_timing(on: bool = True):
    """Inside this block, choices are made (and cached) for work that will run inside a CUDA graph:
    candidates are timed by replaying each one captured as a graph. ``on=False``: eager timing."""
    token = _timing.set("graph" if on else "eager")
    try:
        yield
    finally:
        _timing.reset(token)


def _mode_op(op: str) -> str:
    """The name a choice of ``op`` is cached under in the current timing mode."""
    return f"{op} [graph]" if _timing.get() == "graph" else op
_memory: Dict[tuple, dict] = {}
_disk: Dict[str, dict] = {}  # entries of the cache file, by their string key
_disk_loaded: List[str] = []  # the path whose entries _disk holds
_warned: set = set()


# ----------------------------------------------------------------------------- identity of a choice
def tunable(device: torch.device) -> bool:
    """Whether choices are measured on ``device`` (CUDA only; tests patch this)."""
    return device.type == "cuda"


_names: Dict[Any, str] = {}


def _device_name(device: torch.device) -> str:
    """'NVIDIA H200' etc. (tests patch this to fake a GPU)."""
    name = _names.get(device.index)
    if name is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        _names[device.index] = name
    return name


def _versions() -> str:
    from lopfast.backend import triton_version

    return f"torch {torch.__version__}, triton {triton_version() or 'none'}"


def _disk_key(op: str, key: Any, dev: str) -> str:
    return f"{dev} | {_versions()} | {op} | {key!r}"


def cache_path() -> Path:
    """The JSON file holding measured choices across processes."""
    base = os.environ.get("LOPFAST_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "lopfast")
    return Path(base) / "dispatch.json"


def _disk_enabled() -> bool:
    return os.environ.get(ENV_CACHE, "1") not in ("0", "off", "false", "no")


def _read_entries(path) -> Dict[str, dict]:
    """The entries of the cache file at ``path`` ({} for another file version); raises when the
    file is missing or unreadable."""
    with open(path) as f:
        data = json.load(f)
    if data.get("version") == FILE_VERSION and isinstance(data.get("entries"), dict):
        return data["entries"]
    return {}


def _load_disk() -> None:
    path = str(cache_path())
    if _disk_loaded and _disk_loaded[0] == path:
        return
    _disk.clear()
    _disk_loaded[:] = [path]
    try:
        _disk.update(_read_entries(path))
    except FileNotFoundError:
        pass
    except Exception as exc:  # a corrupt or foreign file: start afresh, rewrite it on the next choice
        _warn_once(f"corrupt:{path}", f"lopfast.dispatch: ignoring unreadable cache {path} ({exc})")


@contextlib.contextmanager
def _file_lock():
    """An exclusive lock shared by every process using the cache file (``dispatch.json.lock``
    beside it; ``lopfast.files.file_lock``, released by the OS if the process dies). Re-entrant
    within this process (callers hold ``_lock``); no lock with ``LOPFAST_DISPATCH_CACHE=0`` or
    where the folder cannot be written."""
    if _held[0]:
        _held[0] += 1
        try:
            yield
        finally:
            _held[0] -= 1
        return
    with contextlib.ExitStack() as stack:
        if _disk_enabled():
            try:
                stack.enter_context(files.file_lock(str(cache_path()) + ".lock"))
            except OSError:
                pass
        _held[0] = 1
        try:
            yield
        finally:
            _held[0] = 0


_held = [0]  # nesting depth of _file_lock in this process


def _refresh_disk(skey: str) -> Optional[dict]:
    """The entry ``skey`` as the cache file holds it now (another process may have written it
    since this one loaded the file), or None."""
    if not _disk_enabled():
        return None
    try:
        entry = _read_entries(cache_path()).get(skey)
    except Exception:
        return None
    if entry is not None:
        _disk[skey] = entry
    return entry


def _save_disk(skey: str, entry: dict) -> None:
    with _file_lock():
        _save_disk_locked(skey, entry)


def _save_disk_locked(skey: str, entry: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries: Dict[str, dict] = {}
        try:  # merge with what other processes wrote since we loaded
            entries.update(_read_entries(path))
        except Exception:  # missing or corrupt: this write replaces it
            pass
        entries[skey] = entry
        # atomic: readers see the old file or the new one
        files.write_json(path, {"version": FILE_VERSION, "entries": entries}, indent=1, sort_keys=True,
                         what="dispatch cache")
        _disk[skey] = entry
    except OSError as exc:  # a read-only home must not break training
        _warn_once(f"write:{path}", f"lopfast.dispatch: cannot write cache {path} ({exc})")


def _warn_once(tag: str, msg: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- public API
def lookup(op: str, key: Any, device: torch.device) -> Optional[str]:
    """The cached choice for ``(op, key)`` on ``device``'s model of GPU, or None (nothing timed)."""
    entry = cached_entry(op, key, device)
    return None if entry is None else entry.get("choice")


def cached_entry(op: str, key: Any, device: torch.device) -> Optional[dict]:
    """The whole cached entry for ``(op, key)`` on ``device``'s model (memory, then the file), or None.

    With :func:`store_entry`, other measurements made once per device (the pruning latency
    tables, ``lopfast.prune.latency``) share this cache, its keys and its atomic file."""
    dev = _device_name(device)
    with _lock:
        entry = _memory.get((dev, op, key))
        if entry is None and _disk_enabled():
            _load_disk()
            entry = _disk.get(_disk_key(op, key, dev))
            if entry is not None:
                _memory[(dev, op, key)] = entry
    return entry


def store_entry(op: str, key: Any, device: torch.device, entry: dict) -> None:
    """Cache ``entry`` (a JSON-serialisable dict) for ``(op, key)`` on ``device``'s model, in memory
    and (unless ``LOPFAST_DISPATCH_CACHE=0``) in the cache file."""
    dev = _device_name(device)
    with _lock:
        _memory[(dev, op, key)] = entry
        if _disk_enabled():
            _save_disk(_disk_key(op, key, dev), entry)


def clear(disk: bool = False) -> None:
    """Forget every choice made in this process (and delete the cache file with ``disk=True``)."""
    with _lock:
        _memory.clear()
        _disk.clear()
        _disk_loaded.clear()
        if disk:
            try:
                cache_path().unlink()
            except FileNotFoundError:
                pass


def decisions() -> List[dict]:
    """Every choice this process made or read, with its timings (for reports and benchmarks)."""
    with _lock:
        return [dict(device=d, op=op, key=repr(k), **e) for (d, op, k), e in _memory.items()]


def choose(op: str, key: Any, device: torch.device, candidates: Mapping[str, Callable[..., Any]],
           reference: str = "torch", args: Sequence[Any] = (), static: Optional[str] = None) -> str:
    """The backend of ``op`` to run for a call described by ``key`` on ``device``.

    ``candidates`` maps backend names to callables computing the op on ``args`` (returning a
    tensor or a nested sequence of tensors) and must contain ``reference``. Only backends
    that can run here belong in it. ``static`` is the untimed choice (default: "triton" when a
    candidate, else ``reference``) used with ``LOPFAST_DISPATCH=off`` and under torch.compile
    before anything was measured. Returns a key of ``candidates``.
    """
    if torch.compiler.is_compiling():
        return _compiled_choice(op, key, device, tuple(candidates), reference, static)
    if reference not in candidates:
        raise ValueError(f"reference {reference!r} is not one of the candidates {sorted(candidates)}")
    if not tunable(device):
        return reference
    default = _static(candidates, reference, static)
    mode = _env_mode()
    if mode in _MODES_OFF:
        return default
    if mode not in _MODES_MEASURE:
        if mode in candidates:
            return mode
        _warn_once(f"force:{op}:{mode}",
                   f"lopfast.dispatch: {ENV_DISPATCH}={mode} is not a backend of {op} here "
                   f"(have {sorted(candidates)}); using {default!r}")
        return default
    op = _mode_op(op)
    cached = lookup(op, key, device)
    if cached in candidates:
        return cached
    if graphs.capturing():  # never time inside a capture: the static default until measured
        return default
    if _inside.get():  # called by a candidate being timed: measured later, in the precision that runs
        return default
    return _measure(op, key, device, candidates, reference, args)


_MODES_OFF = ("off", "0", "false", "no", "static")
_MODES_MEASURE = ("", "on", "1", "auto", "measure")


def _env_mode() -> str:
    """``LOPFAST_DISPATCH`` normalised: one of _MODES_OFF, _MODES_MEASURE, or a backend name."""
    return os.environ.get(ENV_DISPATCH, "").strip().lower()


def _static(candidates, reference: str, static: Optional[str]) -> str:
    if static is not None and static in candidates:
        return static
    return "triton" if "triton" in candidates else reference


@torch.compiler.assume_constant_result
def _compiled_choice(op: str, key: Any, device: torch.device, names: tuple, reference: str,
                     static: Optional[str]) -> str:
    # runs once while dynamo traces; its result is a constant of the graph (never times)
    if not tunable(device):
        return reference
    default = _static(names, reference, static)
    mode = _env_mode()
    if mode in _MODES_OFF:
        return default
    if mode in names:
        return mode
    cached = lookup(op, key, device)
    return cached if cached in names else default


# ----------------------------------------------------------------------------- measuring
def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _fresh_leaves(args):
    """``args`` with every tensor replaced by a detached alias (a leaf requiring grad where the
    original did): candidates run on the same memory but outside the user's graph."""
    def leaf(x):
        if isinstance(x, torch.Tensor):
            y = x.detach()
            return y.requires_grad_(x.requires_grad and x.is_floating_point())
        return x

    return pytree.tree_map(leaf, list(args))


class _Runner:
    """One candidate on one set of inputs: forward, then backward from fixed output gradients."""

    def __init__(self, fn, args, device, grad_seed: int = 0):
        self.fn, self.args, self.device = fn, _fresh_leaves(args), device
        self.leaves = [t for t in _tensors(self.args) if t.requires_grad]
        self.backward = torch.is_grad_enabled() and bool(self.leaves)
        self.grad_seed = grad_seed
        self.grad_out: Optional[List[torch.Tensor]] = None

    def __call__(self):
        out = self.fn(*self.args)
        outs = _tensors(out)
        if not self.backward:
            return outs, []
        diff = [(i, o) for i, o in enumerate(outs) if o.requires_grad]
        if not diff:
            return outs, []
        if self.grad_out is None:
            # a private generator: tuning must not move the user's random stream
            gen = torch.Generator(device=outs[0].device)
            gen.manual_seed(self.grad_seed)
            self.grad_out = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype)
                             for o in outs]
        grads = torch.autograd.grad([o for _, o in diff], self.leaves,
                                    [self.grad_out[i] for i, _ in diff], allow_unused=True)
        return [o.detach() for o in outs], [g for g in grads]


def _error(out: List[torch.Tensor], ref: List[torch.Tensor]) -> Optional[str]:
    """Why ``out`` does not match ``ref`` (None when it does).

    Each tensor's error is relative to its own norm, or to ``FLOOR`` times the largest norm of
    the list when it is smaller than that: a tensor that cancels to rounding noise (the SP-loss
    gradient of a layer where student and teacher agree) differs between two correct
    implementations by 100 % of itself, which says nothing about either."""
    if len(out) != len(ref):
        return f"{len(out)} tensors, reference has {len(ref)}"
    norms = [float(torch.linalg.vector_norm(torch.nan_to_num(r.detach().double(), nan=0.0, posinf=0.0, neginf=0.0)))
             if r is not None and r.numel() else 0.0 for r in ref]
    floor = FLOOR * max(norms, default=0.0)
    for i, (a, r) in enumerate(zip(out, ref)):
        if (a is None) != (r is None):
            return f"tensor {i}: gradient missing on one side"
        if a is None:
            continue
        if a.shape != r.shape:
            return f"tensor {i}: shape {tuple(a.shape)}, reference {tuple(r.shape)}"
        a64, r64 = a.detach().double(), r.detach().double()
        if not bool((torch.isfinite(a64) | ~torch.isfinite(r64)).all()):
            return f"tensor {i}: non-finite values where the reference is finite"
        finite = torch.isfinite(r64)
        diff = float(torch.linalg.vector_norm(torch.where(finite, a64 - r64, torch.zeros_like(a64))))
        scale = max(float(torch.linalg.vector_norm(torch.where(finite, r64, torch.zeros_like(r64)))), floor)
        tol = TOLERANCE.get(r.dtype, 5e-2)
        rel = diff / scale if scale > 0 else diff
        if not (rel <= tol):
            return f"tensor {i}: relative error {rel:.3g} > {tol:g}"
    return None


def median_time(fn: Callable[[], Any], device, *, rounds: int = 5, warmup: int = 2,
                budget_s: Optional[float] = None, graphed: bool = False, pool=None) -> float:
    """Median seconds of one ``fn()`` call on ``device`` over ``rounds`` timed calls, after
    ``warmup`` untimed ones (the loop of :func:`timed_rounds`). The dispatch and the
    benchmarks both time with it, so their numbers compare."""
    return statistics.median(timed_rounds(fn, device, rounds=rounds, warmup=warmup, budget_s=budget_s,
                                          graphed=graphed, pool=pool))


_streams: Dict[Any, Any] = {}  # one side stream per device for every timing capture


def _timing_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device)
    return _streams[index]


def timed_rounds(fn: Callable[[], Any], device, *, rounds: int = 5, warmup: int = 2,
                 budget_s: Optional[float] = None, graphed: bool = False, pool=None) -> List[float]:
    """Seconds of each of ``rounds`` timed ``fn()`` calls on ``device``, after ``warmup`` untimed
    ones: CUDA events on CUDA (the queue is drained first, so a call measures its own work),
    ``time.perf_counter`` elsewhere. With ``budget_s``, timing stops once that much time was
    spent (after at least two rounds). The project's one timing loop: :func:`median_time` and
    the latency reports (their median and spread) read it.

    ``graphed=True``: after the warm-up calls, ``fn`` is captured once as a CUDA graph (on a side
    stream, ``lopfast.graphs.Graph``; off CUDA its CPU stand-in) and the graph's replays are
    timed: the GPU time of ``fn``'s work without the host's launch cost. ``fn`` must then be
    capturable (no host syncs; its allocations come from the graph's own pool, freed after, or
    from ``pool``: the dispatch shares one pool between the candidates of a key, which are
    captured and replayed one after the other, so they reuse each other's blocks)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if graphed:
        graph = graphs.Graph(emulate=not cuda, pool=pool if cuda else None,
                             stream=_timing_stream(device) if cuda else None)
        with graphs.planned():  # the warm-up runs the kernels the capture records
            if cuda:  # warm up on the capture's stream (lazy cuBLAS / Triton state), as torch advises
                graph.stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(graph.stream):
                    for _ in range(max(warmup, 1)):
                        fn()
                torch.cuda.current_stream(device).wait_stream(graph.stream)
                torch.cuda.synchronize(device)
            else:
                for _ in range(warmup):
                    fn()
            graph.capture(lambda: _discard(fn()), outputs=False)
        return timed_rounds(graph.replay, device, rounds=rounds, warmup=1, budget_s=budget_s)
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: List[float] = []
    spent = 0.0
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if budget_s is not None and spent > budget_s and len(times) >= 2:
            break
    return times


def _discard(_) -> None:
    return None


def _measure(op, key, device, candidates, reference, args) -> str:
    # one tuning at a time: timings of two threads (the lock) or two processes on one GPU (the file
    # lock) would disturb each other
    with _lock, _file_lock():
        cached = lookup(op, key, device)
        if cached in candidates:
            return cached
        dev = _device_name(device)
        fresh = _refresh_disk(_disk_key(op, key, dev))  # measured by another process meanwhile
        if fresh is not None and fresh.get("choice") in candidates:
            _memory[(dev, op, key)] = fresh
            return fresh["choice"]
        token = _inside.set(True)
        # graph timing: every run of a candidate warms up its capture (the capturable launch paths)
        planned = graphs.planned() if _timing.get() == "graph" else contextlib.nullcontext()
        try:
            with planned:
                return _measure_locked(op, key, device, candidates, reference, args)
        finally:
            _inside.reset(token)


def _measure_locked(op, key, device, candidates, reference, args) -> str:
    ref_run = _Runner(candidates[reference], args, device)
    ref_out, ref_grads = ref_run()
    graphed = _timing.get() == "graph"
    pool = torch.cuda.graph_pool_handle() if graphed and device.type == "cuda" else None
    times: Dict[str, float] = {}
    rejected: Dict[str, str] = {}
    for name, fn in candidates.items():
        run = ref_run if name == reference else _Runner(fn, args, device)
        try:
            if name != reference:
                out, grads = run()
                why = _error(out, ref_out) or _error(grads, ref_grads)
                del out, grads
                if why is not None:
                    rejected[name] = why
                    continue
            times[name] = median_time(run, device, rounds=ITERS, warmup=WARMUP, budget_s=BUDGET_S,
                                      graphed=graphed, pool=pool)
        except Exception as exc:  # a candidate that cannot run this call is not a choice
            if name == reference:
                raise
            rejected[name] = f"{type(exc).__name__}: {exc}"[:300]
    choice = min(times, key=times.get)
    entry = dict(choice=choice, times_ms={k: round(v * 1e3, 5) for k, v in times.items()},
                 rejected=rejected, backward=ref_run.backward, timing=_timing.get(),
                 when=time.strftime("%Y-%m-%dT%H:%M:%S"))
    dev = _device_name(device)
    _memory[(dev, op, key)] = entry
    if _disk_enabled():
        _save_disk(_disk_key(op, key, dev), entry)
    for name, why in rejected.items():
        _warn_once(f"reject:{op}:{name}:{why}",
                   f"lopfast.dispatch: {op} backend {name!r} rejected on {dev}: {why}")
    return choice


def shape_key(*trees: Any) -> tuple:
    """A hashable key of the shapes, dtypes and memory layouts (strides) of the tensors in
    ``trees`` (nested lists / tuples; other values kept as they are): what decides which backend
    is fastest. Cheap (a few microseconds per tensor): ops compute it on every ``auto`` call."""
    def walk(x):
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.stride(), x.dtype, x.requires_grad)
        if isinstance(x, (list, tuple)):
            return tuple(walk(y) for y in x)
        return x

    return walk(trees)


__all__ += ["shape_key"]
