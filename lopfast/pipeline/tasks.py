"""Run a graph of training tasks on one machine: in this process, or packed onto N worker processes.

``lopfast reproduce`` splits an experiment into tasks (train or load a teacher; prune it per
seed, target and strategy; train each recovery cell) with dependencies between them, and hands
them to :func:`run_tasks`. With ``workers > 1`` each task runs in one of ``workers`` spawned
processes (CUDA does not survive fork), so the small, launch-bound networks of one experiment
share one GPU at once; a task starts as soon as the tasks it depends on have finished. What
the caller learns, as it happens: each finished task (``on_done``), a progress line with an ETA
after every task, and every ``heartbeat_s`` seconds the last line of each running task's log.

A deadline stops the run: no task starts after it, and running worker processes are
terminated (a task loses at most the epoch it was in: training checkpoints every epoch, and a
rerun resumes). A task that raises, or whose worker dies, fails alone; the tasks that depend on
it are not run, and everything else continues. In-process mode (``workers == 1`` without a
deadline) lets a task's exception propagate, traceback and all.
"""
from __future__ import annotations

import os
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["Task", "TaskRun", "run_tasks"]


@dataclass
class Task:
    """One unit of work: ``fn(*args)`` (a module-level function: it is pickled by name)."""

    key: str  # unique; dependencies name it
    kind: str  # tasks of one kind take similar times: the ETA averages them
    fn: Callable
    args: tuple = ()
    deps: Sequence[str] = ()
    log: Optional[str] = None  # a file whose last line the heartbeat shows
    label: str = ""


@dataclass
class TaskRun:
    """What :func:`run_tasks` did: results by key, failures (key -> error text), tasks not run."""

    results: Dict[str, object] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)
    unfinished: List[str] = field(default_factory=list)
    timed_out: bool = False


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}:{s % 60:02d}"


def _epoch_eta(line: str, elapsed: float) -> str:
    """``", ~M:SS left"`` from a training log line ``... epoch k/N ...`` (the task's own pace so far)."""
    m = re.search(r"epoch (\d+)/(\d+)", line)
    if not m or int(m.group(1)) < 1:
        return ""
    k, n = int(m.group(1)), int(m.group(2))
    return f", ~{_fmt_s(elapsed * (n - k) / k)} left" if n >= k else ""


def _last_line(path: Optional[str]) -> str:
    if not path or not os.path.exists(path):
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 400))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""
    except OSError:
        return ""


class _Progress:
    def __init__(self, tasks: Sequence[Task], workers: int, report: Callable[[str], None], name: str,
                 prior: Optional[Dict[str, float]] = None) -> None:
        self.total, self.workers, self.report, self.name = len(tasks), workers, report, name
        self.kind = {t.key: t.kind for t in tasks}
        self.prior = dict(prior or {})
        self.taken: Dict[str, List[float]] = {}
        self.t0 = time.time()

    def estimate(self, kind: str) -> Optional[float]:
        got = self.taken.get(kind)
        if got:
            return sum(got) / len(got)
        return self.prior.get(kind)

    def eta(self, left: Sequence[str], running: Dict[str, float]) -> str:
        work = 0.0
        for key in left:
            est = self.estimate(self.kind[key])
            if est is None:
                return "ETA unknown"
            work += max(0.0, est - (time.time() - running[key])) if key in running else est
        return f"ETA ~{_fmt_s(work / max(1, min(self.workers, len(left))))}" if left else "ETA 0:00"

    def done(self, task: Task, seconds: float, ok: bool, n_done: int, left: Sequence[str], running: Dict[str, float],
             note: str = "") -> None:
        if ok:
            self.taken.setdefault(task.kind, []).append(seconds)
        status = "done" if ok else "FAILED"
        self.report(f"[{self.name} {_fmt_s(time.time() - self.t0)}] {status} {n_done}/{self.total}: "
                    f"{task.label or task.key}{note} ({seconds:.0f}s); {len(running)} running, {len(left)} left, "
                    f"{self.eta(left, running)}")


def run_tasks(tasks: Sequence[Task], *, workers: int = 1, deadline: Optional[float] = None,
              on_done: Optional[Callable[[Task, object], Optional[str]]] = None,
              report: Callable[[str], None] = print, name: str = "run", heartbeat_s: float = 60.0,
              prior: Optional[Dict[str, float]] = None, threads: Optional[int] = None) -> TaskRun:
    """Run ``tasks`` (listed in the order to prefer), each after its ``deps``; returns a :class:`TaskRun`.

    ``workers``: processes (1 and no ``deadline``: in this process). ``deadline``: a
    ``time.time()`` after which nothing starts and running workers are terminated.
    ``on_done(task, result)`` runs in this process after each finished task and may return a
    note for the progress line. ``prior``: seconds per task kind for the ETA before any task of
    that kind has finished. ``threads``: torch CPU threads of each worker process.
    """
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError("task keys must be unique")
    by_key = {t.key: t for t in tasks}
    for t in tasks:
        missing = [d for d in t.deps if d not in by_key]
        if missing:
            raise ValueError(f"task {t.key} depends on unknown tasks {missing}")
    progress = _Progress(tasks, workers, report, name, prior)
    run = TaskRun()
    if workers <= 1 and deadline is None:
        _in_process(tasks, run, progress, on_done)
    else:
        _in_workers(tasks, by_key, run, progress, on_done, workers, deadline, report, heartbeat_s, threads)
    return run


def _in_process(tasks, run: TaskRun, progress: _Progress, on_done) -> None:
    left = [t.key for t in tasks]
    for i, t in enumerate(tasks):
        t0 = time.time()
        res = t.fn(*t.args)  # a failure propagates: one process, the caller sees the traceback
        run.results[t.key], run.seconds[t.key] = res, time.time() - t0
        left.remove(t.key)
        note = on_done(t, res) if on_done else None
        progress.done(t, run.seconds[t.key], True, i + 1, left, {}, note or "")


def _worker_main(inbox, results, threads: Optional[int]) -> None:
    """A worker: run the tasks ``inbox`` hands it, one at a time, and send each outcome on its own
    pipe ``results``. The send is synchronous: a result is fully written before the next task
    starts, so a task that ends its process cannot take an earlier result with it."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    while True:
        item = inbox.get()
        if item is None:
            return
        key, fn, args = item
        t0 = time.time()
        try:
            out = (key, True, fn(*args), time.time() - t0)
        except BaseException:  # noqa: BLE001  (reported to the scheduler, which carries on)
            out = (key, False, traceback.format_exc(), time.time() - t0)
        try:
            results.send(out)
        except Exception:  # noqa: BLE001  (a result that cannot be pickled is the task's failure)
            results.send((key, False, traceback.format_exc(), time.time() - t0))


class _Workers:
    """``n`` spawned worker processes, each with its own inbox and its own result pipe.

    One result pipe per worker, not one shared queue: a shared queue's writers share a lock, and a
    worker that dies while its feeder thread holds it (killed, os._exit, OOM) silenced every other
    worker for good (the scheduler then waited forever). A dead worker's own pipe reads EOF.
    """

    def __init__(self, n: int, threads: Optional[int]) -> None:
        import multiprocessing as mp

        self.ctx, self.threads = mp.get_context("spawn"), threads
        self.procs: List = [None] * n
        self.inboxes: List = [None] * n
        self.results: List = [None] * n
        self.busy: Dict[int, str] = {}  # worker -> task key

    def start(self, i: int) -> None:
        self.inboxes[i] = self.ctx.Queue()
        self.results[i], child_end = self.ctx.Pipe(duplex=False)
        self.procs[i] = self.ctx.Process(target=_worker_main, args=(self.inboxes[i], child_end, self.threads),
                                         daemon=True)
        self.procs[i].start()
        child_end.close()  # the worker holds the only writer: its death reads as EOF here

    def idle(self) -> List[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and i not in self.busy]

    def give(self, i: int, task: Task) -> None:
        if not self.procs[i].is_alive():  # died while idle: a fresh one, not a task lost to a dead one
            self.results[i].close()
            self.start(i)
        self.busy[i] = task.key
        self.inboxes[i].put((task.key, task.fn, task.args))

    def collect(self, timeout: float, started: Dict[str, float]) -> List[tuple]:
        """(key, ok, payload, seconds) of every task that ended within ``timeout``; a worker that
        died mid-task (killed, crashed, exited) fails its task and is replaced."""
        from multiprocessing.connection import wait as wait_ready

        by_conn = {self.results[i]: i for i in self.busy}
        out = []
        for conn in wait_ready(list(by_conn), timeout=timeout):
            i = by_conn[conn]
            key = self.busy.pop(i)
            try:
                _, ok, payload, seconds = conn.recv()
            except (EOFError, OSError):
                self.procs[i].join(timeout=5)
                ok, payload = False, f"its worker process died (exit code {self.procs[i].exitcode})"
                seconds = time.time() - started[key]
                conn.close()
                self.start(i)
            out.append((key, ok, payload, seconds))
        return out

    def close(self, stop: bool) -> None:
        """Stop the workers: terminated when ``stop`` (a deadline, a task still running), else
        asked to finish; then joined (killed if they do not end)."""
        for i, p in enumerate(self.procs):
            if p is None:
                continue
            if stop and p.is_alive():
                p.terminate()
            elif p.is_alive():
                self.inboxes[i].put(None)
        for i, p in enumerate(self.procs):
            if p is not None:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
                self.results[i].close()


def _in_workers(tasks, by_key, run: TaskRun, progress: _Progress, on_done, workers: int, deadline, report,
                heartbeat_s: float, threads) -> None:
    order = [t.key for t in tasks]
    pending = list(order)
    started: Dict[str, float] = {}
    pool = _Workers(workers, threads)
    last_beat, finished = time.time(), 0

    def finish(key: str, ok: bool, payload, seconds: float) -> None:
        nonlocal finished
        finished += 1
        started.pop(key, None)
        note = ""
        if ok:
            run.results[key], run.seconds[key] = payload, seconds
            note = (on_done(by_key[key], payload) or "") if on_done else ""
        else:
            run.failed[key] = str(payload)
            report(f"[{progress.name}] task {by_key[key].label or key} failed:\n{payload}")
            blocked = {key}  # what depends on it, directly or not, cannot run
            for k in order:
                if k in pending and any(d in blocked for d in by_key[k].deps):
                    blocked.add(k)
                    pending.remove(k)
                    run.failed[k] = f"not run: depends on {key}, which failed"
        progress.done(by_key[key], seconds, ok, finished, pending + list(started), started, note)

    try:
        for i in range(min(workers, len(tasks))):
            pool.start(i)
        while pending or pool.busy:
            if deadline is not None and time.time() >= deadline:
                run.timed_out = True
                break
            for i in pool.idle():  # hand ready tasks to idle workers, in the preferred order
                ready = next((k for k in pending if all(d in run.results for d in by_key[k].deps)), None)
                if ready is None:
                    break
                pending.remove(ready)
                started[ready] = time.time()
                pool.give(i, by_key[ready])
            if not pool.busy and pending:  # nothing can start: what is left waits on failures
                break
            wait = 1.0 if deadline is None else max(0.05, min(1.0, deadline - time.time()))
            ended = pool.collect(wait, started)
            for key, ok, payload, seconds in ended:
                finish(key, ok, payload, seconds)
            if not ended and started and time.time() - last_beat >= heartbeat_s:
                last_beat = time.time()
                _heartbeat(started, by_key, progress, report)
    finally:
        pool.close(stop=run.timed_out or bool(pool.busy))
    run.unfinished = [k for k in order if k not in run.results and k not in run.failed]


def _heartbeat(started: Dict[str, float], by_key, progress: _Progress, report) -> None:
    for key, t0 in started.items():
        line, spent = _last_line(by_key[key].log), time.time() - t0
        report(f"[{progress.name}]   running {by_key[key].label or key} "
               f"({spent:.0f}s{_epoch_eta(line, spent)}){': ' + line if line else ''}")
