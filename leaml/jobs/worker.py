"""The worker process: claim queued jobs, run each in a child process, survive its crashes.

``python -m leaml worker`` (this module's :func:`work`) never imports torch. For each job it
claims (one atomic UPDATE, so two workers never share a job) it starts
``python -m leaml worker --job-process ID --claimed-by PID`` (:func:`run_claimed`) with
stdout/stderr appended to ``<home>/logs/job-<id>.log``, and waits. The child takes the job
over (``jobs.worker_pid`` becomes its pid), runs the kind's function with a heartbeat thread,
and writes the final status itself. If the child dies first (SIGKILL, out of memory, a
segfault) the worker marks the job ``interrupted`` (killed by a signal) or ``failed`` (exit
code), and goes on with the next job. If the worker dies too, nobody writes heartbeats and
``recover_stale`` marks the job interrupted after the timeout. SIGTERM/SIGINT to the worker
are passed to the child, which checkpoints and ends the job ``interrupted`` (resumable).
A job whose ``processes`` param is above 1 starts through accelerate's launcher instead, its
main process taking the job over and, on SIGTERM, stopping every process at one step
(leaml/jobs/launch.py).
"""
from __future__ import annotations

import errno
import faulthandler
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from leaml.jobs import launch
from leaml.jobs import queue as jobs
from leaml.store import connect, home_dir
from leaml.store import jobs as q

log = logging.getLogger("leaml.jobs.worker")
RETRY_S = 2.0  # wait before retrying a database write that failed (locked, disk full)
UNRECORDED = 75  # the job process's exit code when it could not record the job's end


class _Beat(threading.Thread):
    """Calls ``fn(db)`` every ``interval`` seconds on its own connection until stopped."""

    def __init__(self, home: Path, fn, interval: float):
        super().__init__(daemon=True, name="heartbeat")
        self.home, self.fn, self.interval = home, fn, interval
        self.done = threading.Event()

    def run(self) -> None:
        db = connect(self.home)  # connections belong to one thread
        while not self.done.wait(self.interval):
            try:
                self.fn(db)
            except Exception:  # a locked database for a moment must not kill the heartbeat
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


# --- the worker ----------------------------------------------------------------------------

def work(home=None, *, once: bool = False, poll_s: float = 1.0,
         idle_exit: float | None = None) -> int:
    """Run queued jobs until stopped. ``once``: drain, i.e. exit when no job is queued or
    running (jobs other workers run are waited for, so `run --background; worker --once`
    returns when the job has ended whoever ran it); ``idle_exit``: exit after that many
    idle seconds. Returns the number of jobs this worker ran."""
    home = home_dir(home)
    db = connect(home)
    pid, host = os.getpid(), socket.gethostname()
    jobs.recover_stale(db)
    worker_id = q.register_worker(db, pid, host)
    state = {"job": None, "child": None, "stop": False, "spare": None}
    beat = _Beat(home, lambda d: _worker_beat(d, worker_id, pid, state), jobs.heartbeat_interval())
    beat.start()
    _on_signals(lambda: _shutdown(state))
    n, idle_since, checked = 0, time.monotonic(), time.monotonic()
    try:
        while not state["stop"]:
            if state["spare"] is None and not once:  # --once drains and exits: no spare
                state["spare"] = _Spare(home)
            try:
                job = q.claim_next(db, pid)
            except sqlite3.Error as exc:  # locked for long, or the disk is full: try again
                log.error("could not claim a job (%s); retrying in %.0f s", exc, RETRY_S)
                time.sleep(RETRY_S)
                continue
            if job is None:
                if time.monotonic() - checked > jobs.heartbeat_interval():
                    jobs.recover_stale(db)  # a dead worker's job must not block --once forever
                    checked = time.monotonic()
                if once and not q.list_jobs(db, status="running", limit=1):
                    break  # drained: nothing queued, nothing running (here or elsewhere)
                if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                    break
                time.sleep(poll_s)
                continue
            _run_child(db, home, job, state)
            n, idle_since = n + 1, time.monotonic()
    finally:
        if state["spare"] is not None:
            state["spare"].close()
        beat.stop()
        q.worker_stopped(db, worker_id)
    return n


def _worker_beat(db, worker_id: int, pid: int, state: dict) -> None:
    job = state["job"]
    q.worker_heartbeat(db, worker_id, job)
    if job is not None:
        q.heartbeat(db, job, pid)  # covers the hand-over; a no-op once the child owns the job


def _on_signals(handler) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: handler())


def _shutdown(state: dict) -> None:
    state["stop"] = True
    child = state["child"]
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)  # the child checkpoints and ends 'interrupted'


def _run_child(db, home: Path, job: dict, state: dict) -> None:
    """Run one claimed job in its own process and make sure it does not stay 'running'."""
    pid = os.getpid()
    path = jobs.log_path(home, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as out:
        out.write(f"--- {q.now()} worker {pid}: job {job['id']} ({job['kind']}), attempt "
                  f"{job['attempts']}\n".encode())
        out.flush()
        state["job"] = job["id"]
        n = launch.wanted(job["params"])  # processes > 1: through accelerate's launcher
        spare = state["spare"] if n == 1 else None  # (a launched job leaves the spare be)
        state["spare"] = None if n == 1 else state["spare"]
        child = spare.take(job["id"]) if spare is not None else None
        if child is None:  # no spare, or it died: a fresh process
            cmd = [sys.executable, "-m", "leaml", "worker", "--home", str(home),
                   "--job-process", str(job["id"]), "--claimed-by", str(pid)]
            env = jobs.child_env()
            if n > 1:
                cmd, env = launch.command(home, job, pid, env)
            child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        state["child"] = child
        rc = child.wait()
    state["job"], state["child"] = None, None
    _after_child(db, job["id"], {pid, child.pid}, rc, state["stop"], launched=n > 1)


class _Spare:
    """A job process started ahead of its job: it loads torch and the engine while the
    worker waits for work, then runs the job whose id the worker writes to its stdin, so
    a job's start does not wait for those imports (seconds to tens of seconds on a busy
    machine). It holds no job until then: closing it (end of stdin, then a kill) is safe."""

    def __init__(self, home: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leaml", "worker", "--home", str(home), "--spare",
             "--claimed-by", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=jobs.child_env())

    def take(self, job_id: int) -> subprocess.Popen | None:
        """Hand it the claimed job; None if it died meanwhile."""
        if self.proc.poll() is not None:
            return None
        try:
            self.proc.stdin.write(f"{job_id}\n".encode())
            self.proc.stdin.close()
        except OSError:
            return None
        return self.proc

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()  # still loading, or waiting: nothing of a job to lose
        self.proc.wait()


def _after_child(db, job_id: int, pids: set[int], rc: int, stopping: bool, *,
                 launched: bool = False) -> None:
    """The child exited; if the job still says it runs there, it died without finishing.
    A database that cannot be written (disk full) is logged and retried, never fatal: the
    worker goes on with the next job."""
    for attempt in range(3):
        try:
            _record_exit(db, job_id, pids, rc, stopping, launched)
            return
        except sqlite3.Error as exc:
            log.error("job %s: could not record how its process ended (%s); %s", job_id, exc,
                      "retrying" if attempt < 2 else "the heartbeat timeout marks it interrupted")
            time.sleep(RETRY_S * (attempt + 1))


def _record_exit(db, job_id: int, pids: set[int], rc: int, stopping: bool,
                 launched: bool = False) -> None:
    job = q.get_job(db, job_id)
    if launched and job["worker_pid"] and not jobs.pid_alive(job["worker_pid"]):
        pids = pids | {job["worker_pid"]}  # the launch's main process took it over and ended
    if job["status"] != "running" or job["worker_pid"] not in pids:
        return
    if stopping:  # e.g. Ctrl-C reached the child before it could checkpoint
        status, msg = "interrupted", "worker shut down; resume it to continue"
    elif rc < 0:
        name = signal.Signals(-rc).name
        status, msg = "interrupted", (f"job process was killed by {name} (out of memory?); "
                                      f"resume it to continue from its last checkpoint")
    elif rc == UNRECORDED:
        status, msg = "failed", ("the job process could not record how the job ended (disk "
                                 "full or database locked?); see the job's log, then resume it")
    else:
        status, msg = "failed", f"job process exited with code {rc}; see the job's log"
    q.finish(db, job_id, job["worker_pid"], status, message=msg)
    q.close_runs(db, job_id)


# --- the job process -----------------------------------------------------------------------

def run_spare(home, claimed_by: int) -> int:
    """Body of a spare job process (:class:`_Spare`): load the engine, wait for a job id on
    stdin, send the output to that job's log, and run it as :func:`run_claimed` does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the worker, not the spare
    import leaml.methods.pipeline  # noqa: F401  (torch, transformers: the slow part of a start)
    import leaml.engine.train  # noqa: F401  (accelerate, peft)
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the worker stopped before it had a job for us
    job_id = int(line)
    home = home_dir(home)
    path = jobs.log_path(home, q.get_job(connect(home), job_id))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)  # from here on, like a process started for the job
    os.dup2(fd, 2)
    os.close(fd)
    return run_claimed(home, job_id, claimed_by)


def run_claimed(home, job_id: int, claimed_by: int) -> int:
    """Body of the child process: take the job over from the worker and run it to an end."""
    faulthandler.enable()  # a segfault still leaves a traceback in the job's log
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = home_dir(home)
    if launch.world_size() > 1 and not launch.join():  # a follower: it ran beside the main one
        return 0
    db = connect(home)
    pid = os.getpid()
    if not q.set_pid(db, job_id, claimed_by, pid):
        log.warning("job %s is no longer claimed by worker %s; nothing to do", job_id, claimed_by)
        launch.release()
        return 0
    ctx = _context(db, home, q.get_job(db, job_id))
    beat = _Beat(home, _JobBeat(ctx), min(jobs.STOP_POLL_S, jobs.heartbeat_interval()))
    beat.start()
    _on_signals(lambda: ctx.stop("shutdown"))
    ctx.phase("job process started; loading torch and transformers")
    _stop_in_forward(ctx)
    import leaml.methods.pipeline  # noqa: F401  (the engine: the bulk of the start, said above)
    ctx.phase("loading the data and the model")
    notes = _Notes(ctx)
    logging.getLogger("leaml.engine.checkpoints").addHandler(notes)
    try:
        recorded, at_step = _execute(ctx)
    finally:
        logging.getLogger("leaml.engine.checkpoints").removeHandler(notes)
        beat.stop()
    if at_step:  # ended at a step: the other processes of a launch wait for the next call
        launch.release()
    else:  # they may wait inside a collective: leave, the launcher stops them
        launch.abandon(UNRECORDED if not recorded else 1)
    return 0 if recorded else UNRECORDED


class _Notes(logging.Handler):
    """Warnings of the checkpoint code (a corrupt file skipped) become notes of the job:
    shown as its message at once and kept in its final message."""

    def __init__(self, ctx: jobs.JobContext):
        super().__init__(logging.WARNING)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ctx.note(record.getMessage())
        except Exception:  # a note that cannot be written must not stop the job
            self.handleError(record)


def _context(db, home: Path, job: dict) -> jobs.JobContext:
    ckpt = home / (job["checkpoint_dir"] or f"jobs/job-{job['id']}")
    ckpt.mkdir(parents=True, exist_ok=True)
    last = q.last_step(db, job["id"])
    resume = dict(last, attempt=job["attempts"]) if last and job["attempts"] > 1 else None
    return jobs.JobContext(db=db, home=home, job=job, user=job["created_by"],
                           checkpoint_dir=ckpt, resume=resume,
                           log=logging.getLogger(f"leaml.job.{job['id']}"))


class _JobBeat:
    """The job process's heartbeat thread body, called every ``STOP_POLL_S``: reads the
    cancel flag each time (a cancel is seen within half a second, whatever the job does)
    and writes the heartbeat every ``heartbeat_interval()``."""

    def __init__(self, ctx: jobs.JobContext):
        self.ctx, self.last = ctx, 0.0

    def __call__(self, db) -> None:
        if time.monotonic() - self.last >= jobs.heartbeat_interval():
            self.last = time.monotonic()
            got = q.heartbeat(db, self.ctx.job_id, self.ctx.pid)
            if got is None:
                self.ctx.stop("lost")
            elif got["cancel_requested"]:
                self.ctx.stop("cancel")
        else:
            self.ctx.check_stop(q.find_job(db, self.ctx.job_id))


def _stop_in_forward(ctx: jobs.JobContext) -> None:
    """Make every inference forward pass (no gradients: evaluation, pseudo sampling,
    captioning) a cancellation point (:meth:`JobContext.raise_if_stopped`), so those loops
    stop within a batch. Training forwards are left alone: the training loop stops at a
    step and keeps a checkpoint. This process runs this one job, so a process-wide hook is
    the job's own."""
    import torch  # the job process only: the worker itself never loads torch

    def hook(module, args) -> None:
        if not torch.is_grad_enabled():
            ctx.raise_if_stopped()
    torch.nn.modules.module.register_module_forward_pre_hook(hook)


def _execute(ctx: jobs.JobContext) -> tuple[bool, bool]:
    """Run the kind's function and record how it ended: succeeded, cancelled, interrupted
    (worker shut down) or failed (message = the exception; traceback in the log). Returns
    (recorded: False when the database could not be written, at_step: False when the
    function raised)."""
    job, db = ctx.job, ctx.db
    ctx.log.info("job %s (%s) starts, params %s%s", job["id"], job["kind"], job["params"],
                 f", resuming from {ctx.resume}" if ctx.resume else "")
    fn = jobs.KINDS.get(job["kind"])
    try:
        if fn is None:
            raise ValueError(f"unknown job kind {job['kind']!r}; this version knows "
                             f"{', '.join(sorted(jobs.KINDS))}")
        launch.processes(job["params"])  # a bad processes param fails the job with the reason
        launch.check_devices(job["params"])
        result, at_step = fn(ctx, dict(job["params"])) or {}, True
    except (Exception, jobs.JobStopped) as exc:
        if ctx.stop_reason is None:
            ctx.log.error("job %s failed:\n%s", job["id"], traceback.format_exc())
            return _end(ctx, "failed", _failure(ctx, exc)), False
        ctx.log.info("job stopped (%s) with %s: %s", ctx.stop_reason, type(exc).__name__, exc)
        result, at_step = {}, False
    if result.get("stopped") or (ctx.stop_reason is not None and not result.get("run_id")):
        return _end_stopped(ctx), at_step  # the engine returned early and kept a checkpoint
    ctx.log.info("job %s succeeded: %s", job["id"], result)
    recorded = _end(ctx, "succeeded", _summary(result), result.get("run_id"))
    # checkpoints and stage folders are for resuming; the result lives in models/run-<id>
    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    return recorded, True


def _failure(ctx: jobs.JobContext, exc: Exception) -> str:
    """The failed job's message: the exception, or for a full disk (a checkpoint refused,
    ENOSPC, SQLite's "database or disk is full") how much is free where."""
    text = str(exc)
    if text.startswith("disk full"):
        return text
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "disk is full" in text:
        free = shutil.disk_usage(ctx.home).free / 1024 / 1024
        return (f"disk full: free {free:.0f} MB in {ctx.home} ({type(exc).__name__}: {text}); "
                f"free some space and resume the job")
    return f"{type(exc).__name__}: {text}"


def _end_stopped(ctx: jobs.JobContext) -> bool:
    """End a stopped job: where it stopped (the step of a training stage, else the stage)."""
    where, stage = q.last_step(ctx.db, ctx.job_id), q.get_job(ctx.db, ctx.job_id)["stage"]
    if where and where["stage"] == stage:
        at = f" at {stage} step {where['step']}/{where['total']}"
    else:  # pseudo sampling and evaluation write no loss rows
        at = f" in {stage}" if stage else ""
    keep = f"checkpoint kept in {ctx.job['checkpoint_dir']}; resume to continue"
    if ctx.stop_reason == "cancel":
        return _end(ctx, "cancelled", f"cancelled{at}; {keep}")
    if ctx.stop_reason == "shutdown":
        return _end(ctx, "interrupted", f"worker shut down{at}; {keep}")
    if ctx.stop_reason == "lost":
        ctx.log.warning("job %s was taken away from this process (marked %s); stopping",
                        ctx.job_id, q.get_job(ctx.db, ctx.job_id)["status"])
        return True
    return _end(ctx, "interrupted", f"stopped early{at}; {keep}")


def _end(ctx: jobs.JobContext, status: str, message: str, run_id: int | None = None) -> bool:
    """Write the job's final status; the notes it collected follow the message. False when
    the database refused the write (logged; the worker then records the end itself)."""
    if ctx.notes:
        message = f"{message}; note: {'; '.join(ctx.notes)}"
    ctx.log.info("job %s %s: %s", ctx.job_id, status, message)
    try:
        if q.finish(ctx.db, ctx.job_id, ctx.pid, status, message=message, run_id=run_id) \
                and status != "succeeded":
            q.close_runs(ctx.db, ctx.job_id)
    except sqlite3.Error as exc:
        ctx.log.error("job %s: could not record '%s' (%s)", ctx.job_id, status, exc)
        return False
    return True


def _summary(result: dict) -> str:
    if result.get("accuracy") is not None:
        return f"{result.get('method', 'run')}: accuracy {result['accuracy']:.1f}% " \
               f"on {result.get('n_test', '?')} test questions (run {result.get('run_id')})"
    return f"done (run {result['run_id']})" if result.get("run_id") else "done"
