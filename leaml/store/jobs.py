"""Job queue SQL: enqueue, claim, heartbeat, progress, loss log, cancel, resume, stale recovery.

Every state change of a job is one short ``BEGIN IMMEDIATE`` transaction guarded by the
state it expects (``WHERE status = 'running' AND worker_pid = ?``), so a worker that lost its
job (marked ``interrupted`` after a stale heartbeat, say) cannot overwrite what came after.
States: queued -> running -> succeeded | failed | cancelled | interrupted; cancelled,
interrupted and failed jobs go back to queued on resume. Also the ``workers`` table, which
tells :func:`leaml.jobs.queue.ensure_worker` whether a worker process is alive.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlite_utils

from leaml.store.db import ConflictError, NotFoundError, log_event, now, row, to_json, transaction

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")
RESUMABLE = ("cancelled", "interrupted", "failed")


def _job(r: dict | None, job_id: int | None = None) -> dict:
    if r is None:
        raise NotFoundError(f"job {job_id} not found; `python -m leaml jobs list` shows the jobs")
    r = dict(r)
    r["params"] = json.loads(r["params"] or "{}")
    return r


def _ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(
        timespec="microseconds")


# --- the app side: enqueue, look, cancel, resume -------------------------------------------

def insert_job(db: sqlite_utils.Database, kind: str, project_id: int | None, params: dict,
               *, created_by: str | None) -> int:
    """Queue a job; its log file and checkpoint folder are named after its id."""
    with transaction(db):
        cur = db.execute(
            "INSERT INTO jobs (kind, project_id, params, status, created_by, created_at)"
            " VALUES (?, ?, ?, 'queued', ?, ?)",
            [kind, project_id, to_json(params or {}), created_by, now()])
        job_id = cur.lastrowid
        db.execute("UPDATE jobs SET log_path = ?, checkpoint_dir = ? WHERE id = ?",
                   [f"logs/job-{job_id}.log", f"jobs/job-{job_id}", job_id])
        log_event(db, user=created_by, action="job.enqueue", entity="job", entity_id=job_id,
                  project_id=project_id, after={"kind": kind, "params": params})
    return job_id


def get_job(db: sqlite_utils.Database, job_id: int) -> dict:
    """One job as a dict (``params`` decoded); NotFoundError if there is none."""
    return _job(row(db, "SELECT * FROM jobs WHERE id = ?", [job_id]), job_id)


def find_job(db: sqlite_utils.Database, job_id: int) -> dict | None:
    """status, worker_pid and cancel_requested of a job (a cheap read, polled twice a
    second by a running job); None if there is no such job."""
    return row(db, "SELECT status, worker_pid, cancel_requested FROM jobs WHERE id = ?",
               [job_id])


def list_jobs(db: sqlite_utils.Database, project_id: int | None = None, limit: int = 50,
              status: str | None = None) -> list[dict]:
    """Newest first, optionally of one project and/or one status."""
    where, args = [], []
    if project_id is not None:
        where.append("project_id = ?")
        args.append(project_id)
    if status is not None:
        where.append("status = ?")
        args.append(status)
    sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
    return [_job(r) for r in db.query(sql + " ORDER BY id DESC LIMIT ?", args + [limit])]


def request_cancel(db: sqlite_utils.Database, job_id: int, *, user: str | None) -> dict:
    """Cancel: a queued or interrupted job at once, a running one by the flag its worker
    reads within a step. Finished jobs raise ConflictError. Returns the job after."""
    with transaction(db):
        job = get_job(db, job_id)
        if job["status"] in ("queued", "interrupted"):
            db.execute("UPDATE jobs SET status = 'cancelled', cancel_requested = 1,"
                       " finished_at = ?, message = ? WHERE id = ?",
                       [now(), f"cancelled by {user or 'cli'}", job_id])
        elif job["status"] == "running":  # the message shows at once, the stop in seconds
            db.execute("UPDATE jobs SET cancel_requested = 1, message = ? WHERE id = ?",
                       [f"cancel requested by {user or 'cli'}; stopping", job_id])
        else:
            raise ConflictError(f"job {job_id} is already {job['status']}; nothing to cancel")
        log_event(db, user=user, action="job.cancel", entity="job", entity_id=job_id,
                  project_id=job["project_id"], before={"status": job["status"]})
    return get_job(db, job_id)


def requeue(db: sqlite_utils.Database, job_id: int, *, user: str | None) -> dict:
    """Resume: a cancelled, interrupted or failed job goes back to the queue, keeping its
    checkpoint folder (the job picks up from its last checkpoint) and its loss log."""
    with transaction(db):
        job = get_job(db, job_id)
        if job["status"] not in RESUMABLE:
            raise ConflictError(f"job {job_id} is {job['status']}; only "
                                f"{', '.join(RESUMABLE)} jobs can be resumed")
        db.execute("UPDATE jobs SET status = 'queued', cancel_requested = 0, worker_pid = NULL,"
                   " finished_at = NULL, message = ? WHERE id = ?",
                   [f"resumed by {user or 'cli'} (was {job['status']})", job_id])
        log_event(db, user=user, action="job.resume", entity="job", entity_id=job_id,
                  project_id=job["project_id"], before={"status": job["status"]})
    return get_job(db, job_id)


def mark_stale(db: sqlite_utils.Database, timeout_s: float) -> list[int]:
    """Running jobs whose heartbeat is older than ``timeout_s`` become ``interrupted``."""
    cutoff = _ago(timeout_s)
    stale = "status = 'running' AND COALESCE(heartbeat_at, started_at, created_at) < ?"
    if not row(db, f"SELECT 1 FROM jobs WHERE {stale} LIMIT 1", [cutoff]):
        return []  # the common case (pages poll this): no write lock taken
    with transaction(db):
        ids = [r[0] for r in db.execute(
            "UPDATE jobs SET status = 'interrupted', worker_pid = NULL, finished_at = ?,"
            " message = 'worker stopped sending heartbeats (crashed or killed); resume it'"
            f" WHERE {stale} RETURNING id", [now(), cutoff]).fetchall()]
        for job_id in ids:
            log_event(db, user=None, action="job.interrupted", entity="job", entity_id=job_id)
    return sorted(ids)


def train_log(db: sqlite_utils.Database, job_id: int) -> list[dict]:
    """The job's loss curve in order: stage, step, total, loss, lr, ts. A resumed job redoes
    the steps after its last checkpoint; for those only the latest row counts."""
    return list(db.query(
        "SELECT stage, step, total, loss, lr, ts FROM train_log WHERE id IN"
        " (SELECT MAX(id) FROM train_log WHERE job_id = ? GROUP BY stage, step) ORDER BY id",
        [job_id]))


# --- the worker side: claim, report, finish -------------------------------------------------

def claim_next(db: sqlite_utils.Database, pid: int) -> dict | None:
    """Take the oldest queued job for process ``pid`` in one atomic update; None if none.

    The subquery and the ``status = 'queued'`` guard run under the write lock, so two workers
    racing here never get the same job."""
    stamp = now()
    with transaction(db):
        r = db.execute(
            "UPDATE jobs SET status = 'running', worker_pid = ?, heartbeat_at = ?,"
            " started_at = COALESCE(started_at, ?), attempts = attempts + 1,"
            " cancel_requested = 0, stage = 'starting',"
            " message = 'picked up by the worker; starting its job process'"
            " WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1)"
            " AND status = 'queued' RETURNING id", [pid, stamp, stamp]).fetchall()
    return get_job(db, r[0][0]) if r else None


def set_pid(db: sqlite_utils.Database, job_id: int, old_pid: int, new_pid: int) -> bool:
    """Hand a claimed job to the process that runs it (the worker's child)."""
    return _update_running(db, job_id, old_pid, "worker_pid = ?, heartbeat_at = ?",
                           [new_pid, now()])


def update_params(db: sqlite_utils.Database, job_id: int, pid: int, params: dict) -> bool:
    """Replace a running job's params (the job pins its full config on its first start)."""
    return _update_running(db, job_id, pid, "params = ?", [to_json(params)])


def heartbeat(db: sqlite_utils.Database, job_id: int, pid: int) -> dict | None:
    """Refresh the heartbeat; returns {cancel_requested} or None if the job is no longer ours."""
    with transaction(db):
        r = db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND status = 'running'"
                       " AND worker_pid = ? RETURNING cancel_requested",
                       [now(), job_id, pid]).fetchall()  # fetchall: finish the statement
    return {"cancel_requested": bool(r[0][0])} if r else None


def report(db: sqlite_utils.Database, job_id: int, pid: int, *, stage: str | None,
           progress: float | None, eta_seconds: float | None, message: str | None) -> bool:
    """Write stage, progress (0..1), ETA and message of a running job (and a heartbeat)."""
    return _update_running(
        db, job_id, pid, "stage = COALESCE(?, stage), progress = COALESCE(?, progress),"
        " eta_seconds = ?, message = COALESCE(?, message), heartbeat_at = ?",
        [stage, progress, eta_seconds, message, now()])


def add_train_log(db: sqlite_utils.Database, job_id: int, *, stage: str, step: int,
                  total: int | None, loss: float | None, lr: float | None = None,
                  run_id: int | None = None) -> None:
    """One loss point of the job's curve."""
    with transaction(db):
        db.execute("INSERT INTO train_log (job_id, run_id, stage, step, total, loss, lr, ts)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [job_id, run_id, stage, step, total, loss, lr, now()])


def finish(db: sqlite_utils.Database, job_id: int, pid: int, status: str, *,
           message: str | None = None, run_id: int | None = None) -> bool:
    """End a running job (if it is still this process's); False if it was taken away."""
    if status not in FINISHED:
        raise ValueError(f"finish(): status must be one of {FINISHED}, got {status!r}")
    extra = ", progress = 1" if status == "succeeded" else ""
    ok = _update_running(
        db, job_id, pid, "status = ?, message = ?, run_id = COALESCE(?, run_id),"
        " finished_at = ?, eta_seconds = NULL" + extra, [status, message, run_id, now()])
    if ok:
        log_event(db, user=None, action=f"job.{status}", entity="job", entity_id=job_id,
                  after={"message": message, "run_id": run_id})
    return ok


def _update_running(db, job_id: int, pid: int, assignments: str, args: list[Any]) -> bool:
    with transaction(db):
        cur = db.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND status = 'running'"
                         " AND worker_pid = ?", args + [job_id, pid])
    return cur.rowcount == 1


def close_runs(db: sqlite_utils.Database, job_id: int) -> list[int]:
    """A job that did not succeed leaves no run looking alive: its runs rows still
    'running' (half written) become 'failed'. Kept, not deleted, for the audit trail."""
    with transaction(db):
        ids = [r[0] for r in db.execute(
            "UPDATE runs SET status = 'failed', finished_at = ? WHERE job_id = ?"
            " AND status = 'running' RETURNING id", [now(), job_id]).fetchall()]
    return ids


def last_step(db: sqlite_utils.Database, job_id: int) -> dict | None:
    """The last loss row (stage, step, total, loss) of a job: where a resume picks up."""
    return row(db, "SELECT stage, step, total, loss FROM train_log WHERE job_id = ?"
                   " ORDER BY id DESC LIMIT 1", [job_id])


# --- workers --------------------------------------------------------------------------------

def register_worker(db: sqlite_utils.Database, pid: int, host: str) -> int:
    """A worker announces itself (or refreshes the row ensure_worker wrote for it)."""
    with transaction(db):
        r = row(db, "SELECT id FROM workers WHERE pid = ? AND host = ? AND stopped_at IS NULL",
                [pid, host])
        if r:
            db.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", [now(), r["id"]])
            return r["id"]
        stamp = now()
        return db.execute("INSERT INTO workers (pid, host, started_at, heartbeat_at)"
                          " VALUES (?, ?, ?, ?)", [pid, host, stamp, stamp]).lastrowid


def worker_heartbeat(db: sqlite_utils.Database, worker_id: int, job_id: int | None) -> None:
    with transaction(db):
        db.execute("UPDATE workers SET heartbeat_at = ?, job_id = ? WHERE id = ?",
                   [now(), job_id, worker_id])


def worker_stopped(db: sqlite_utils.Database, worker_id: int) -> None:
    with transaction(db):
        db.execute("UPDATE workers SET stopped_at = ?, job_id = NULL WHERE id = ?",
                   [now(), worker_id])


def live_workers(db: sqlite_utils.Database, timeout_s: float) -> list[dict]:
    """Workers not stopped whose heartbeat is younger than ``timeout_s``."""
    return list(db.query("SELECT * FROM workers WHERE stopped_at IS NULL AND heartbeat_at >= ?"
                         " ORDER BY id", [_ago(timeout_s)]))
