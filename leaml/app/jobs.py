"""Jobs as the app starts and shows them: start, cancel, resume (needs 'train'); a
project's jobs, a job's progress, loss curve and log; teacher-caption jobs.

Reading never writes. A running job whose worker stopped sending heartbeats (for
``jobs.heartbeat_timeout()`` seconds) is *shown* ``interrupted`` with the message the
database will get; recording it is stale-job recovery (``jobs.recover_stale``), which runs
where something acts: the worker on start and while it waits for work, starting a job
(``ensure_worker``), resuming one (``jobs.resume``), and ``python -m leaml jobs``.
"""
from __future__ import annotations

import importlib.util
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlite_utils

from leaml.app.accounts import require as _require
from leaml.jobs import launch
from leaml.jobs import queue as jobs
from leaml.serve import teacher as captions
from leaml.store import jobs as jobs_store

STALE_MESSAGE = "worker stopped sending heartbeats (crashed or killed); resume it"
caption_job_params = captions.caption_job_params  # the caption form's params, checked


def _stale_cutoff() -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=jobs.heartbeat_timeout())
            ).isoformat(timespec="microseconds")


def shown(job: dict, cutoff: str | None = None) -> dict:
    """``job`` as the app shows it: a running job with a stale heartbeat as ``interrupted``
    (what recovery will record), anything else as it is. Writes nothing."""
    last = job.get("heartbeat_at") or job.get("started_at") or job.get("created_at") or ""
    if job.get("status") != "running" or last >= (cutoff or _stale_cutoff()):
        return job
    return {**job, "status": "interrupted", "message": STALE_MESSAGE, "worker_pid": None}


def project_jobs(db: sqlite_utils.Database, user: dict, project_id: int,
                 limit: int = 50) -> list[dict]:
    """The project's jobs, newest first, as :func:`shown` (needs 'view')."""
    _require(db, user, "view")
    cutoff = _stale_cutoff()
    return [shown(j, cutoff) for j in jobs_store.list_jobs(db, project_id, limit)]


def active_jobs(db: sqlite_utils.Database, user: dict, project_id: int) -> list[dict]:
    """The project's queued and running jobs (of its newest 20), newest first."""
    return [j for j in project_jobs(db, user, project_id, limit=20)
            if j["status"] in ("queued", "running")]


def job_progress(db: sqlite_utils.Database, user: dict, job_id: int) -> dict:
    """What a progress bar needs (jobs.job_progress): status, stage, progress, eta, message,
    the last loss point, and ``phase``, what the job does or waits for (needs 'view')."""
    _require(db, user, "view")
    job = shown(jobs_store.get_job(db, job_id))
    progress = jobs.job_progress(db, job_id)
    if job["status"] != progress["status"]:  # its worker died: as recovery will record it
        progress.update(status=job["status"], message=job["message"], phase=job["status"],
                        heartbeat_age=None)
    return progress


def job_train_log(db: sqlite_utils.Database, user: dict, job_id: int) -> list[dict]:
    """The job's loss curve in order: stage, step, total, loss, lr, ts (needs 'view')."""
    _require(db, user, "view")
    return jobs.train_log(db, job_id)


def job_log_tail(db: sqlite_utils.Database, user: dict, job: dict, n: int = 30) -> str:
    """The last ``n`` lines of the job's log, '' while it has none (needs 'view')."""
    _require(db, user, "view")
    return jobs.log_tail(db.home, job, n)


DEVICES = ("auto", "cpu", "cuda")  # the form's choices; 'auto': the worker's GPU if any
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the NVIDIA driver sees


def gpu_count() -> int:
    """GPUs a job could use, as seen without loading torch: CUDA_VISIBLE_DEVICES when it is
    set, else the NVIDIA driver's list (0 on a machine without one). A hint for the form;
    a launched job checks its GPUs when it starts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return sum(1 for _ in NVIDIA_GPUS.iterdir())
    except OSError:
        return 0


def places() -> dict:
    """Where the start form can send a job: ``devices``, ``gpus``, ``max_processes`` (one
    per CPU, the most a job may ask) and ``vllm`` (whether pseudo sampling can use vLLM)."""
    return {"devices": DEVICES, "gpus": gpu_count(), "max_processes": launch.limit(),
            "vllm": importlib.util.find_spec("vllm") is not None}


def start_job(db: sqlite_utils.Database, user: dict, kind: str, project: str | int,
              params: dict) -> int:
    """Queue a background job (needs 'train') and make sure a worker runs; returns its id."""
    user = _require(db, user, "train")
    job_id = jobs.enqueue(db, kind, project, params, user=user)
    jobs.ensure_worker(db.home)
    return job_id


def cancel_job(db: sqlite_utils.Database, user: dict, job_id: int):
    """Cancel a job (needs 'train'): a queued one at once, a running one within a step."""
    user = _require(db, user, "train")
    return jobs.cancel(db, job_id, user=user)


def resume_job(db: sqlite_utils.Database, user: dict, job_id: int):
    """Queue a stopped job again from its last checkpoint (needs 'train'); a job whose
    worker died is recorded ``interrupted`` first. Makes sure a worker runs."""
    user = _require(db, user, "train")
    result = jobs.resume(db, job_id, user=user)
    jobs.ensure_worker(db.home)
    return result


def captions_missing(db: sqlite_utils.Database, user: dict, project_id: int) -> int:
    """How many images of the project have no caption yet (needs 'view')."""
    _require(db, user, "view")
    return captions.missing_count(db, project_id)
