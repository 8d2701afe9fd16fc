"""Background jobs: the queue API the app calls, the job kinds, and the job context.

Process model (see also :mod:`leaml.jobs.worker`): the app (or ``python -m leaml run
--background``) only writes a ``queued`` row with :func:`enqueue` and calls
:func:`ensure_worker`, which starts a detached ``python -m leaml worker`` when none is alive.
The worker claims the oldest queued job atomically and runs it in a child process of its own
(``python -m leaml worker --job-process ID``): the child loads torch, writes progress, loss
rows and a heartbeat thread's heartbeats, and honours cancel within a training step. When the
child dies its heartbeat stops; the worker marks a job whose child died ``interrupted`` at
once, and :func:`recover_stale` marks any job whose heartbeat is older than the timeout
(``LEAML_HEARTBEAT_TIMEOUT``, default 60 s) ``interrupted`` when the worker dies too.
:func:`resume` puts such a job back in the queue; its checkpoint folder
(``<home>/jobs/job-<id>``) is kept, so training goes on from the last checkpoint.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sqlite_utils

from leaml import auth, config
from leaml.jobs import launch
from leaml.serve import teacher as captions
from leaml.store import connect, home_dir
from leaml.store import jobs as q
from leaml.store.db import NotFoundError, transaction
from leaml.store.projects import get_project

DEFAULT_HEARTBEAT_TIMEOUT = 60.0
STOP_CACHE_S = 1.0  # should_stop() reads the cancel flag at most this often
STOP_POLL_S = 0.5  # the job process's heartbeat thread reads the cancel flag this often
STOP_GRACE_S = 2.0  # a loop that asks should_stop() gets this long to stop at a step


class JobStopped(BaseException):
    """Ends a stopped (cancelled, shut down) job inside loops that never ask
    ``should_stop()``: raised by an inference forward pass once the stop has waited
    ``STOP_GRACE_S`` (evaluation and pseudo sampling batches), and by a progress report
    of a loop that did not ask since its last report (the vision warmup). Training steps
    are never cut: the training loop asks at each step and keeps a checkpoint. A
    BaseException, so that no ``except Exception`` on the way swallows it."""


def heartbeat_timeout() -> float:
    """Seconds without a heartbeat after which a running job counts as dead
    (``LEAML_HEARTBEAT_TIMEOUT`` overrides the default of 60)."""
    raw = os.environ.get("LEAML_HEARTBEAT_TIMEOUT")
    try:
        return float(raw) if raw else DEFAULT_HEARTBEAT_TIMEOUT
    except ValueError:
        raise ValueError(f"LEAML_HEARTBEAT_TIMEOUT={raw!r} is not a number of seconds") from None


def heartbeat_interval() -> float:
    """How often heartbeats are written: a few per timeout, at most every 5 s."""
    return max(0.2, min(5.0, heartbeat_timeout() / 4))


# --- job kinds ------------------------------------------------------------------------------

@dataclass
class JobContext:
    """What a job kind's function gets besides its params.

    ``report(stage, progress, message)`` sets the job's visible state; ``progress`` is the
    callback to hand to ``train``/``pipeline`` (``(stage, step, total, loss)``: writes a
    train_log row, progress and ETA); ``should_stop()`` turns true once a cancel was
    requested (read at most every second) or the worker is shutting down; ``checkpoint_dir``
    is the job's own folder, kept across resumes; ``resume`` says where the last attempt got
    to (``{"stage", "step", "total", "attempt"}``) or is None on a first attempt.
    """
    db: sqlite_utils.Database
    home: Path
    job: dict
    user: str | None
    checkpoint_dir: Path
    resume: dict | None
    log: logging.Logger
    pid: int = field(default_factory=os.getpid)
    stop_reason: str | None = None   # 'cancel', 'shutdown' or 'lost' once a stop was seen
    stop_at: float | None = None  # time.monotonic() when it was seen
    plan: list = field(default_factory=list)  # the stages the kind will run, for overall progress
    notes: list = field(default_factory=list)  # problems worked around, kept in the last message
    _checked_at: float = 0.0
    _phase: bool = False  # the message says a start phase (cleared by the first progress)
    _asked: bool = False  # should_stop() was called since the last progress report
    _stages: list = field(default_factory=list)
    _timers: dict = field(default_factory=dict)

    @property
    def job_id(self) -> int:
        return self.job["id"]

    def report(self, stage: str | None, progress: float | None = None,
               message: str | None = None, eta_seconds: float | None = None) -> None:
        """Show the job's stage, progress (0..1) and a message in the app."""
        if progress is not None:
            progress = min(1.0, max(0.0, float(progress)))
        q.report(self.db, self.job_id, self.pid, stage=stage, progress=progress,
                 eta_seconds=eta_seconds, message=message)

    def phase(self, text: str) -> None:
        """What a starting job is doing before its first step (stage 'starting'); the
        first progress report replaces it."""
        self._phase = True
        self.report("starting", message=text)

    def note(self, text: str) -> None:
        """Something the job worked around (a corrupt checkpoint skipped, say): the job's
        message now, and appended to its final message so that it is not missed."""
        self.notes.append(text)
        self._phase = False  # the note, not the start phase, stays shown
        self.report(None, message=text)

    def log_loss(self, stage: str, step: int, total: int | None, loss: float | None,
                 lr: float | None = None) -> None:
        """One point of the loss curve (``jobs.train_log``)."""
        q.add_train_log(self.db, self.job_id, stage=stage, step=step, total=total,
                        loss=None if loss is None else float(loss), lr=lr)

    def progress(self, stage: str, step: int, total: int, loss: float | None = None) -> None:
        """Training callback: loss row, then stage progress and an ETA from this attempt's pace.
        Evaluation reports NaN losses: progress only, no loss row."""
        if loss is not None and loss == loss:
            self.log_loss(stage, step, total, loss)
        if stage not in self._stages:
            self._stages.append(stage)
        t0, step0 = self._timers.setdefault(stage, (time.monotonic(), step - 1))
        rate = (time.monotonic() - t0) / max(1, step - step0)
        frac = step / total if total else 0.0
        message = "" if self._phase and not self.stop_reason else None  # a start phase is over
        self._phase = False
        asked, self._asked = self._asked, False
        if self.stop_reason and not asked:  # a loop that never asks: stop it here
            raise JobStopped(self.stop_reason)
        self.report(stage, self._overall(stage, frac), message, rate * max(0, total - step))
        if step % 10 == 0 or step == total:
            shown = f" loss {loss:.4f}" if loss is not None and loss == loss else ""
            self.log.info("%s step %d/%d%s", stage, step, total, shown)

    def _overall(self, stage: str, frac: float) -> float:
        """Job progress over the stages of ``plan`` (stages not in it are appended). A part
        of a stage ("generator: scoring neurons", "train: vision warmup") counts as that
        stage's start, so the bar never jumps ahead and back."""
        plan = list(self.plan or self.job["params"].get("stages") or [])
        head = stage.split(":", 1)[0]
        if head != stage and head in plan:
            return plan.index(head) / len(plan)
        plan += [s for s in self._stages if s not in plan and s.split(":", 1)[0] not in plan]
        i = plan.index(stage)
        return (i + frac) / len(plan)

    def should_stop(self) -> bool:
        """True once the job is cancelled, the worker shuts down, or the job was taken away."""
        self._asked = True  # this loop stops by itself; progress() need not stop it
        if self.stop_reason:
            return True
        if time.monotonic() - self._checked_at >= STOP_CACHE_S:
            self._checked_at = time.monotonic()
            self.check_stop(q.get_job(self.db, self.job_id))
        return self.stop_reason is not None

    def check_stop(self, row: dict | None) -> None:
        """Note a stop from the job's row (None: gone): taken away, or cancel requested."""
        if row is None or row["status"] != "running" or row["worker_pid"] != self.pid:
            self.stop("lost")
        elif row["cancel_requested"]:
            self.stop("cancel")

    def stop(self, reason: str) -> None:
        """Ask the job to stop ('cancel', 'shutdown', 'lost'); the first reason counts."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_at = reason, time.monotonic()

    def raise_if_stopped(self) -> None:
        """The cancellation point of loops that never ask ``should_stop()``: raises
        JobStopped once a stop has waited ``STOP_GRACE_S`` (loops that ask stop cleanly at a
        step, with a checkpoint, before that)."""
        if self.stop_at is not None and time.monotonic() - self.stop_at >= STOP_GRACE_S:
            raise JobStopped(self.stop_reason)


Kind = Callable[[JobContext, dict], dict | None]
KINDS: dict[str, Kind] = {}


def job_kind(name: str) -> Callable[[Kind], Kind]:
    """Register ``fn(ctx, params) -> result dict | None`` as the job kind ``name``.

    A result may hold ``run_id`` (linked as jobs.run_id). Raising fails the job with the
    exception's message; returning after ``ctx.should_stop()`` said yes ends it cancelled.
    """
    def register(fn: Kind) -> Kind:
        KINDS[name] = fn
        return fn
    return register


RUNS_WHERE = (*launch.PLACEMENT, "processes")  # job params on where it runs, not what it does


def _place(params: dict) -> None:
    """A job's ``device``/``dtype`` params (like the CLI's --device/--dtype) for every model
    this job process loads (leaml.engine.models reads them from the environment)."""
    os.environ.update(launch.placement_env(params))


def _engine_kwargs(ctx: JobContext, params: dict) -> dict:
    """The job's params plus what every engine entry point takes from the job."""
    _place(params)
    p = {k: v for k, v in params.items()
         if k not in ("stages", "method", "requested_overrides", *RUNS_WHERE)}
    return dict(p, progress=ctx.progress, should_stop=ctx.should_stop,
                work_dir=ctx.checkpoint_dir, job_id=ctx.job_id, user=ctx.user)


def pin_config(ctx: JobContext, params: dict, method: str) -> dict:
    """Fix the job's full hyperparameters at its first start: ``params['overrides']`` becomes
    every field of the method's config (defaults included, seeds excepted: they follow the
    run's seed), the asked-for overrides stay in ``params['requested_overrides']``. A resume
    after the code's defaults changed, or a rerun from the stored params, trains with exactly
    the same config (a checkpoint refuses to resume under another one)."""
    if "requested_overrides" in params:
        return params  # pinned by an earlier attempt
    from leaml.methods import pipeline  # torch: the app imports this module, only jobs run methods
    asked = params.get("overrides") or {}
    cfg = pipeline.method_config(method, 0, asked)
    pinned = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.options.items()}
    for stage, tc in cfg.stages.items():
        fields = {k: v for k, v in tc.to_dict().items() if k != "seed"}
        pinned[stage] = {**pinned.get(stage, {}), **fields}
    pinned.update(eval_batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)
    if pipeline.method_config(method, 0, pinned).to_dict() != cfg.to_dict():
        ctx.log.warning("could not pin the config of %s; a resume uses the code's defaults", method)
        return params
    params = dict(params, overrides=pinned, requested_overrides=asked)
    q.update_params(ctx.db, ctx.job_id, ctx.pid, params)
    ctx.job["params"] = params
    return params


@job_kind("run")
def _run(ctx: JobContext, params: dict) -> dict:
    """A whole method (``params['method']``: leaml, seed-lora, ...) end to end; the params
    are ``pipeline.run_method``'s keywords (label_fraction, seed, base_model, overrides)."""
    method = params.get("method")
    if not method:
        raise ValueError("job kind 'run' needs params['method'] (leaml, seed-lora, seed-full, "
                         "caption-then-seed)")
    from leaml.methods import pipeline  # the engine: imported only inside the job's own process
    ctx.plan = pipeline.stage_names(method)
    params = pin_config(ctx, params, method)
    return pipeline.run_method(ctx.db, ctx.job["project_id"], method,
                               **_engine_kwargs(ctx, params))


def _stage_kind(name: str) -> Kind:
    def run(ctx: JobContext, params: dict) -> dict:
        """One LEAML stage alone (``leaml_method.STAGE_COMMANDS``), params = its keywords."""
        from leaml.methods import leaml as leaml_method  # torch: only in the job's own process
        ctx.plan = [name] if name != "finetune" else ["finetune", "evaluate"]
        command = leaml_method.STAGE_COMMANDS[name]
        params = dict(params)  # the page's flat options (k, max_images, rho ...) + data mix
        options, mix = params.pop("options", None), params.pop("data_mix", None)
        if options or mix is not None:  # would be swallowed by the commands' **_ignored
            params["overrides"] = config.fold_overrides(name, params.get("overrides"),
                                                        options=options, data_mix=mix)
        params = pin_config(ctx, params, "leaml")  # the stage commands read LEAML's config
        return command(ctx.db, ctx.job["project_id"], **_engine_kwargs(ctx, params))
    return run


for _name in ("generator", "pseudo", "finetune"):
    job_kind(_name)(_stage_kind(_name))


@job_kind("caption")
def _caption(ctx: JobContext, params: dict) -> dict:
    """Teacher captions for the project's images without one (``leaml.serve.teacher``); params:
    endpoint + model, or teacher (a local model ref), and optionally prompt, concurrency."""
    _place(params)
    return captions.caption_job(ctx, {k: v for k, v in params.items() if k not in RUNS_WHERE})


@job_kind("evaluate")
def _evaluate(ctx: JobContext, params: dict) -> dict:
    """Re-evaluate a stored run (``params['run_id']``) on its project's test split."""
    from leaml.methods import pipeline  # torch: only in the job's own process
    if not params.get("run_id"):
        raise ValueError("job kind 'evaluate' needs params['run_id'] (see `python -m leaml "
                         "jobs list` / the dashboard for run ids)")
    ctx.plan = ["evaluate"]
    _place(params)
    return pipeline.evaluate_run(ctx.db, int(params["run_id"]), progress=ctx.progress)


# --- the API the app and the CLI call -------------------------------------------------------

def _user_name(user: dict | str | None, perm: str = "train") -> str | None:
    """Check ``perm`` for a signed-in user (a users row); the CLI passes None or a name."""
    if isinstance(user, dict):
        return auth.require(user, perm)["name"]
    return user


def enqueue(db: sqlite_utils.Database, kind: str, project: str | int | None, params: dict,
            *, user: dict | str | None = None) -> int:
    """Queue a job of ``kind`` on ``project`` with ``params`` (the full config, stored as
    JSON so the job can be rerun) and return its id. A user dict must hold the 'train'
    permission (annotators and viewers get PermissionError). Call :func:`ensure_worker`
    afterwards so that something runs it."""
    name = _user_name(user)
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}; use one of {', '.join(sorted(KINDS))}")
    if not isinstance(params, dict):
        raise ValueError(f"job params must be a dict (JSON object), got {type(params).__name__}")
    launch.processes(params)  # 1 (default) to the CPUs; several on one GPU each
    project_id = get_project(db, project)["id"] if project is not None else None
    return q.insert_job(db, kind, project_id, params, created_by=name)


get_job = q.get_job
train_log = q.train_log


def list_jobs(db: sqlite_utils.Database, project_id: int | None = None,
              limit: int = 50) -> list[dict]:
    """Jobs newest first (of one project if given), after marking dead ones interrupted."""
    recover_stale(db)
    return q.list_jobs(db, project_id, limit)


def cancel(db: sqlite_utils.Database, job_id: int, *, user: dict | str | None = None) -> dict:
    """Cancel a job: queued/interrupted ones at once; a running one stops within a training
    step, saves its checkpoint and ends ``cancelled`` (resumable). Returns the job."""
    return q.request_cancel(db, job_id, user=_user_name(user))


def resume(db: sqlite_utils.Database, job_id: int, *, user: dict | str | None = None) -> dict:
    """Queue a cancelled, interrupted or failed job again; it continues from its last
    checkpoint (stage and step) with the same params and seed. Returns the job."""
    name = _user_name(user)
    recover_stale(db)
    return q.requeue(db, job_id, user=name)


def recover_stale(db: sqlite_utils.Database) -> list[int]:
    """Mark running jobs without a heartbeat for ``heartbeat_timeout()`` seconds
    ``interrupted``; returns their ids. Called where something acts: the worker (on start
    and while it waits), ensure_worker, resume, list_jobs and ``python -m leaml jobs``. The
    app never calls it to show a page: leaml.app.jobs shows such a job interrupted unwritten."""
    return q.mark_stale(db, heartbeat_timeout())


def job_progress(db: sqlite_utils.Database, job_id: int) -> dict:
    """What a progress bar needs: status, stage, progress, eta_seconds, message, run_id,
    the last loss point, and how old the heartbeat is (seconds)."""
    job = get_job(db, job_id)
    last = q.last_step(db, job_id)
    return {"id": job["id"], "kind": job["kind"], "status": job["status"],
            "stage": job["stage"], "progress": job["progress"], "eta": job["eta_seconds"],
            "eta_seconds": job["eta_seconds"], "message": job["message"],
            "run_id": job["run_id"], "step": last and last["step"],
            "total": last and last["total"], "loss": last and last["loss"],
            "heartbeat_age": _age(job["heartbeat_at"]) if job["status"] == "running" else None,
            "phase": _phase(db, job)}


def _phase(db: sqlite_utils.Database, job: dict) -> str:
    """What the job is doing, or for a queued job what it waits for, in words (the app's
    banner shows it, so a slow start never reads as 'in a moment')."""
    if job["status"] == "running":
        return job["stage"] or "starting"
    if job["status"] != "queued":
        return job["status"]
    running = q.list_jobs(db, status="running", limit=1)
    if running:
        r = running[0]
        return f"queued behind job #{r['id']} ({r['kind']}, {r['stage'] or 'starting'})"
    earlier = [j for j in q.list_jobs(db, status="queued", limit=100) if j["id"] < job["id"]]
    if earlier:
        return f"queued behind job #{earlier[-1]['id']}"
    workers = q.live_workers(db, heartbeat_timeout())
    if not workers:
        return "waiting for a worker: none is running (start one: python -m leaml worker)"
    age = _age(workers[-1]["started_at"]) or 0.0
    return f"waiting for the worker (pid {workers[-1]['pid']}, started {age:.0f} s ago) to " \
           f"pick it up"


def _age(stamp: str | None) -> float | None:
    from datetime import datetime, timezone
    if not stamp:
        return None
    return (datetime.now(timezone.utc) - datetime.fromisoformat(stamp)).total_seconds()


def log_path(home: str | os.PathLike, job: dict) -> Path:
    """The job's log file (``<home>/logs/job-<id>.log``)."""
    return Path(home) / (job.get("log_path") or f"logs/job-{job['id']}.log")


def log_tail(home: str | os.PathLike, job: dict | int, n: int = 50) -> str:
    """The last ``n`` lines of the job's log ('' while it has none)."""
    if isinstance(job, int):
        job = {"id": job}
    path = log_path(home, job)
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 256 * 1024))  # enough for 50 long lines; never the whole file
        lines = f.read().decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


# --- starting a worker (a process of its own: this module never imports the worker) ----------

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # so `-m leaml` works from any cwd


def child_env() -> dict:
    """The environment of the worker and its job processes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("TQDM_DISABLE", "1")  # progress bars belong in the database, not the log
    return env


def pid_alive(pid: int) -> bool:
    """The process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def ensure_worker(home: str | os.PathLike | None = None, *, idle_exit: float = 600.0) -> int | None:
    """Start a detached ``python -m leaml worker`` (``start_new_session``, output to
    ``<home>/logs/worker.log``) unless a live one exists: a workers row, not stopped, with a
    fresh heartbeat and, on this host, a live pid. Returns the new pid, or None if one was
    alive. The check and the start happen under the write lock, so two pages calling this at
    once start one worker."""
    home = home_dir(home)
    db = connect(home)
    recover_stale(db)
    host = socket.gethostname()
    (home / "logs").mkdir(exist_ok=True)
    with transaction(db):
        for w in q.live_workers(db, heartbeat_timeout()):
            if w["host"] != host or pid_alive(w["pid"]):
                return None
        with open(home / "logs" / "worker.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "leaml", "worker", "--home", str(home),
                 "--idle-exit", str(idle_exit)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=child_env(), cwd=str(home))
        q.register_worker(db, proc.pid, host)
    return proc.pid


__all__ = ["JobContext", "JobStopped", "KINDS", "job_kind", "enqueue", "get_job", "list_jobs", "cancel",
           "resume", "recover_stale", "train_log", "log_tail", "job_progress", "ensure_worker",
           "heartbeat_timeout", "NotFoundError"]
