"""The task runner of lopfast reproduce (lopfast.pipeline.tasks): dependencies, worker processes,
failures that stay local, a worker that dies, the deadline, and the progress line's ETA."""
import math
import operator
import os
import time

import pytest

from lopfast.pipeline.tasks import Task, _epoch_eta, _Progress, run_tasks


def test_in_process_runs_in_order_and_reports_progress():
    lines, seen = [], []
    tasks = [Task("a", "k", operator.add, (1, 2)), Task("b", "k", math.factorial, (5,), deps=("a",), label="five!")]
    run = run_tasks(tasks, report=lines.append, on_done=lambda t, r: seen.append((t.key, r)) or f" = {r}")
    assert run.results == {"a": 3, "b": 120} and seen == [("a", 3), ("b", 120)] and not run.failed
    assert "done 2/2: five! = 120" in lines[-1] and "ETA 0:00" in lines[-1]
    with pytest.raises(ValueError):  # in this process a failure propagates with its traceback
        run_tasks([Task("x", "k", int, ("x",))], report=lines.append)
    with pytest.raises(ValueError, match="unknown tasks"):
        run_tasks([Task("x", "k", int, ("1",), deps=("y",))])


def test_workers_failures_and_deaths_stay_local():
    lines = []
    tasks = [
        Task("ok", "k", operator.add, (2, 3)),
        Task("bad", "k", int, ("not a number",)),
        Task("after-bad", "k", operator.add, (1, 1), deps=("bad",)),  # never runs
        Task("dies", "k", os._exit, (7,)),  # its worker process exits mid-task
        Task("after-ok", "k", operator.mul, (4, 5), deps=("ok",)),
    ]
    run = run_tasks(tasks, workers=2, report=lines.append)
    assert run.results == {"ok": 5, "after-ok": 20} and not run.timed_out and not run.unfinished
    assert "invalid literal" in run.failed["bad"] and "depends on bad" in run.failed["after-bad"]
    assert "died (exit code 7)" in run.failed["dies"]
    assert any("FAILED" in s and "bad" in s for s in lines)


def test_a_worker_that_dies_while_idle_is_replaced_before_its_next_task():
    import signal

    def kill_worker(task, pid):  # runs in the scheduler's process, between the two tasks
        if task.key == "pid":
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        return ""

    tasks = [Task("pid", "k", os.getpid), Task("next", "k", operator.add, (1, 1), deps=("pid",))]
    # two workers: one would run the tasks in this process (and the kill would end the test run)
    run = run_tasks(tasks, workers=2, report=lambda s: None, on_done=kill_worker)
    assert run.results["next"] == 2 and not run.failed


def test_the_deadline_stops_running_workers():
    t0 = time.time()
    run = run_tasks([Task("slow", "k", time.sleep, (300,)), Task("next", "k", operator.add, (1, 1), deps=("slow",))],
                    workers=1, deadline=time.time() + 3, report=lambda s: None)
    assert time.time() - t0 < 30  # the sleeping worker was terminated, not waited for
    assert run.timed_out and run.unfinished == ["slow", "next"] and not run.results and not run.failed


def test_eta_averages_finished_tasks_of_a_kind_over_the_workers():
    p = _Progress([Task(k, "cell", int) for k in "abcd"], workers=2, report=lambda s: None, name="x")
    assert p.eta(["b"], {}) == "ETA unknown"
    p.taken["cell"] = [10.0, 20.0]  # 15 s each: 3 left on 2 workers -> 22.5 s
    assert p.eta(["b", "c", "d"], {}) == "ETA ~0:22"
    p2 = _Progress([Task("a", "teacher", int)], workers=1, report=lambda s: None, name="x", prior={"teacher": 90})
    assert p2.eta(["a"], {}) == "ETA ~1:30"
    # a running teacher's own pace: 10 of 40 epochs in 30 s -> 90 s left
    assert _epoch_eta("[pretrain] epoch 10/40 loss 1.2 test acc 70.00% (3.0s)", 30.0) == ", ~1:30 left"
    assert _epoch_eta("[teacher] done", 30.0) == ""
