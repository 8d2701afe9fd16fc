"""Live job status: a queued job says what it waits for, a starting job says what it loads,
and a cancel in a loop that never asks ``should_stop()`` (evaluation) ends the job
``cancelled`` within seconds.

Real ``python -m leaml worker`` processes, real SQLite, the real tiny model.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leaml.jobs import queue as jobs

ROOT = Path(__file__).resolve().parents[1]
CANCEL_BOUND_S = 5.0 + 1.0  # the promise, plus a second for a busy two-core machine


@pytest.fixture
def demo(db):
    from leaml.data.demo.build import DemoConfig
    from leaml.data.ingest import load_demo
    load_demo(db, DemoConfig(n_train=8, n_test=40))


def long_evaluation() -> dict:
    """One training step, then an evaluation of many small batches (tens of seconds)."""
    return {"method": "seed-lora", "label_fraction": 0.5, "seed": 0,
            "overrides": {"train": {"max_steps": 1, "min_steps": 0, "batch_size": 2},
                          "eval_batch_size": 2, "max_new_tokens": 32}}


def start_worker(home) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leaml", "worker", "--once", "--home",
                             str(home)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def follow(db, job_id: int, until, timeout: float = 600) -> list[str]:
    """Poll the job every 50 ms until ``until(job)``; the distinct messages seen, in order."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        job = jobs.get_job(db, job_id)
        if job["message"] and (not seen or seen[-1] != job["message"]):
            seen.append(job["message"])
        if until(job):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"timed out; job {job_id} is {jobs.get_job(db, job_id)}")


def test_start_phases_and_a_cancel_in_evaluation_within_seconds(home, db, demo):
    first = jobs.enqueue(db, "run", "demo", long_evaluation())
    second = jobs.enqueue(db, "run", "demo", long_evaluation())
    assert "none is running" in jobs.job_progress(db, first)["phase"]
    assert jobs.job_progress(db, second)["phase"] == f"queued behind job #{first}"
    w = start_worker(home)
    try:
        seen = follow(db, first, lambda j: j["stage"] == "evaluate")
        assert any("loading torch" in m for m in seen), seen  # said before the slow imports
        assert any("loading the data and the model" in m for m in seen), seen
        assert jobs.job_progress(db, second)["phase"].startswith(f"queued behind job #{first} (")
        follow(db, first, lambda j: (j["progress"] or 0) > 0.55)  # a few batches evaluated
        asked = time.monotonic()
        assert jobs.cancel(db, first)["message"].startswith("cancel requested")  # at once
        follow(db, first, lambda j: j["status"] != "running", timeout=120)
        took = time.monotonic() - asked
        job = jobs.get_job(db, first)
        assert job["status"] == "cancelled", job["message"]
        assert took < CANCEL_BOUND_S, f"the cancel took {took:.1f} s"
        assert job["message"].startswith("cancelled in evaluate;"), job["message"]
        jobs.cancel(db, second)  # still queued: at once; the worker then drains
        assert w.wait(timeout=120) == 0
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
        w.wait()


def children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def test_a_spare_job_process_waits_warm_and_runs_the_next_job(home, db, demo):
    w = subprocess.Popen([sys.executable, "-m", "leaml", "worker", "--idle-exit", "120",
                          "--home", str(home)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        spare = follow_value(lambda: children(w.pid), "the worker's spare job process")
        job_id = jobs.enqueue(db, "run", "demo", {**long_evaluation(), "overrides": {
            "train": {"max_steps": 1, "min_steps": 0, "batch_size": 2}, "max_new_tokens": 4}})
        follow(db, job_id, lambda j: j["status"] not in ("queued", "running"))
        job = jobs.get_job(db, job_id)
        assert job["status"] == "succeeded", job["message"]
        assert job["worker_pid"] in spare  # started before the job was queued
        assert "succeeded" in jobs.log_tail(home, job, 5)  # its output went to the job's log
        fresh = follow_value(lambda: children(w.pid) - spare, "a new spare")
        w.send_signal(signal.SIGTERM)  # the worker alone: it ends its spare itself
        assert w.wait(timeout=60) == 0
        assert follow_value(lambda: not any(Path(f"/proc/{p}").exists() for p in fresh),
                            "the spare to end with its worker")
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
        w.wait()


def follow_value(fn, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := fn():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_progress_stops_a_loop_that_never_asks_but_not_one_that_does(db):
    """Neuron scoring and the vision warmup report progress but never ask should_stop();
    a cancel stops them at their next report. The training loop asks at every step (and
    keeps a checkpoint), so its reports never raise."""
    import logging
    import math

    from leaml.store import jobs as q
    from leaml.store.projects import create_project
    create_project(db, "demo")
    job_id = jobs.enqueue(db, "run", "demo", {"method": "leaml"})
    ctx = jobs.JobContext(db=db, home=db.home, job=q.claim_next(db, os.getpid()), user=None,
                          checkpoint_dir=db.home, resume=None, log=logging.getLogger("test"))
    ctx.plan = ["generator", "pseudo"]
    ctx.progress("generator: scoring neurons", 1, 4, math.nan)
    assert jobs.get_job(db, job_id)["progress"] == 0  # a part of a stage: that stage's start
    jobs.cancel(db, job_id)
    assert ctx.should_stop()  # the training loop asks before its step ...
    ctx.progress("generator", 3, 10, 1.0)  # ... so the step's report does not raise
    assert jobs.get_job(db, job_id)["progress"] == pytest.approx(0.15)
    with pytest.raises(jobs.JobStopped):
        ctx.progress("generator: scoring neurons", 2, 4, math.nan)  # never asked: stopped
