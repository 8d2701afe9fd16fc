"""Background jobs: queue, claims, worker processes, failures, stale heartbeats, cancel.

Real SQLite in tmp_path, real ``python -m leaml worker`` processes. The tests that train the
tiny model are at the end (and the SIGKILL/resume one in test_jobs_crash.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leaml.jobs import queue as jobs
from leaml.store import ConflictError, NotFoundError
from leaml.store import jobs as q
from leaml.store.projects import create_project
from servehelp import wait_for

ROOT = Path(__file__).resolve().parents[1]


def leaml(home, *args, env=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    """Run ``python -m leaml ARGS --home HOME`` as a new user would."""
    out = subprocess.run([sys.executable, "-m", "leaml", *args, "--home", str(home)],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(f"leaml {args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def start_worker(home, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leaml", "worker", *args, "--home", str(home)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def snapshot(db, skip=("jobs", "events", "workers", "train_log", "schema_version")) -> dict:
    """Every row of every table a job must not touch."""
    return {t: list(db.query(f"SELECT * FROM [{t}] ORDER BY rowid"))
            for t in db.table_names() if t not in skip}


@pytest.fixture
def project(db):
    return create_project(db, "demo")


EXPERT = {"id": 1, "name": "eve", "role": "expert", "disabled": 0}
ANNOTATOR = {"id": 2, "name": "ann", "role": "annotator", "disabled": 0}


# --- the queue ------------------------------------------------------------------------------

def test_enqueue_stores_params_and_checks_permission(db, project):
    job_id = jobs.enqueue(db, "run", "demo", {"method": "seed-lora", "seed": 3}, user=EXPERT)
    job = jobs.get_job(db, job_id)
    assert job["status"] == "queued" and job["kind"] == "run"
    assert job["params"] == {"method": "seed-lora", "seed": 3}
    assert job["created_by"] == "eve" and job["project_id"] == project["id"]
    assert job["log_path"] == f"logs/job-{job_id}.log"
    with pytest.raises(PermissionError, match="annotator 'ann' may not train"):
        jobs.enqueue(db, "run", "demo", {"method": "seed-lora"}, user=ANNOTATOR)
    with pytest.raises(ValueError, match="unknown job kind 'nope'"):
        jobs.enqueue(db, "nope", "demo", {})
    with pytest.raises(NotFoundError, match="unknown project 'other'"):
        jobs.enqueue(db, "run", "other", {"method": "seed-lora"})
    assert [j["id"] for j in jobs.list_jobs(db)] == [job_id]


def test_cancel_and_resume_rules(db, project):
    job_id = jobs.enqueue(db, "run", "demo", {"method": "seed-lora"})
    assert jobs.cancel(db, job_id)["status"] == "cancelled"  # queued: at once
    with pytest.raises(ConflictError, match="already cancelled"):
        jobs.cancel(db, job_id)
    assert jobs.resume(db, job_id)["status"] == "queued"
    with pytest.raises(ConflictError, match="only cancelled, interrupted, failed"):
        jobs.resume(db, job_id)
    with pytest.raises(PermissionError):
        jobs.cancel(db, job_id, user=ANNOTATOR)
    with pytest.raises(NotFoundError, match="job 99 not found"):
        jobs.get_job(db, 99)


# Each claimer is a fresh interpreter (not multiprocessing's spawn: after an AppTest run in
# the same session, spawn re-runs the last page script as the children's __main__).
CLAIM_ALL = """
import json, os, sys
from leaml.store import connect
from leaml.store import jobs as q
db = connect(sys.argv[1])
mine = []
while (job := q.claim_next(db, os.getpid())) is not None:
    mine.append(job["id"])
print(json.dumps(mine))
"""


def test_concurrent_claims_never_share_a_job(home, db, project):
    ids = [jobs.enqueue(db, "run", "demo", {"method": "seed-lora", "i": i}) for i in range(40)]
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_ALL, str(home)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    claimed = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        claimed.append(json.loads(out.strip().splitlines()[-1]))
    flat = [i for mine in claimed for i in mine]
    assert sorted(flat) == ids  # every job claimed, none twice
    assert all(j["attempts"] == 1 and j["status"] == "running" for j in jobs.list_jobs(db))


def test_two_workers_one_job_exactly_one_runs_it(home, db, project):
    job_id = jobs.enqueue(db, "run", "demo", {})  # fails fast inside its process: no method
    workers = [start_worker(home, "--once") for _ in range(2)]
    outputs = [w.communicate(timeout=60) for w in workers]
    ran = sorted(int(err.rsplit("ran ", 1)[1].split()[0]) for _, err in outputs)
    assert ran == [0, 1], outputs
    job = jobs.get_job(db, job_id)
    assert job["attempts"] == 1 and job["status"] == "failed"
    assert jobs.log_tail(home, job).count("worker ") == 1  # one start line: one process ran it


# --- failures -------------------------------------------------------------------------------

def test_failing_job_is_failed_with_message_and_traceback(home, db, project):
    before = snapshot(db)
    bad = jobs.enqueue(db, "run", "demo", {"seed": 1})                 # no method
    unknown = q.insert_job(db, "teleport", project["id"], {}, created_by=None)  # kind unknown
    leaml(home, "worker", "--once")
    job = jobs.get_job(db, bad)
    assert job["status"] == "failed"
    assert job["message"].startswith("ValueError: job kind 'run' needs params['method']")
    log = jobs.log_tail(home, job, 200)
    assert "Traceback (most recent call last)" in log and "needs params['method']" in log
    other = jobs.get_job(db, unknown)
    assert other["status"] == "failed" and "unknown job kind 'teleport'" in other["message"]
    assert snapshot(db) == before  # nothing but the jobs (and the audit log) changed
    show = json.loads(leaml(home, "jobs", "show", str(bad), "--json").stdout.splitlines()[-1])
    assert {k: show[k] for k in ("id", "status", "run_id")} == {"id": bad, "status": "failed",
                                                                "run_id": None}
    assert set(show) >= {"id", "status", "stage", "progress", "message", "run_id"}


# --- stale heartbeats -----------------------------------------------------------------------

def test_stale_heartbeat_becomes_interrupted_then_resumable(home, db, project, monkeypatch):
    job_id = jobs.enqueue(db, "run", "demo", {"method": "seed-lora"})
    assert q.claim_next(db, 999_999)["id"] == job_id  # a worker that will never beat again
    assert jobs.recover_stale(db) == []               # fresh heartbeat: still running
    time.sleep(1.2)
    out = leaml(home, "jobs", "list", env={"LEAML_HEARTBEAT_TIMEOUT": "1"})
    assert "interrupted" in out.stdout
    job = jobs.get_job(db, job_id)
    assert job["status"] == "interrupted" and "heartbeat" in job["message"]
    assert q.heartbeat(db, job_id, 999_999) is None  # the lost worker cannot write any more
    assert jobs.resume(db, job_id)["status"] == "queued"
    monkeypatch.setenv("LEAML_HEARTBEAT_TIMEOUT", "0.5")
    assert jobs.recover_stale(db) == []  # queued jobs are never stale


def test_ensure_worker_starts_one_detached_worker(home, db, project, monkeypatch):
    monkeypatch.setenv("LEAML_HEARTBEAT_TIMEOUT", "5")
    pid = jobs.ensure_worker(home)
    try:
        assert pid and jobs.ensure_worker(home) is None  # alive: no second one
        job_id = jobs.enqueue(db, "run", "demo", {})
        deadline = time.time() + 60
        while jobs.get_job(db, job_id)["status"] in ("queued", "running"):
            assert time.time() < deadline, "the detached worker never ran the job"
            time.sleep(0.2)
        assert jobs.get_job(db, job_id)["status"] == "failed"
        assert os.getsid(pid) == pid  # its own session: survives the app's restarts
    finally:
        os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    assert jobs.ensure_worker(home) not in (None, pid)  # stopped cleanly: a new one starts
    new = q.live_workers(db, 5)[-1]["pid"]
    os.kill(new, signal.SIGTERM)
    _wait_gone(new)


def _wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it
        except ChildProcessError:
            done = pid
        if done == pid:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} did not exit")


def test_job_pins_its_full_config_so_resume_survives_new_defaults(db, project):
    """Regression: a job resumed after an upgrade changed pipeline defaults (lr, epochs)
    failed with "checkpoint ... was written by another config"; jobs now pin every field."""
    import logging

    from leaml.methods import pipeline
    asked = {"train": {"max_steps": 5}}
    job_id = jobs.enqueue(db, "run", "demo", {"method": "seed-lora", "seed": 2, "overrides": asked})
    job = q.claim_next(db, os.getpid())
    ctx = jobs.JobContext(db=db, home=db.home, job=job, user=None, checkpoint_dir=db.home,
                          resume=None, log=logging.getLogger("test"))
    params = jobs.pin_config(ctx, job["params"], "seed-lora")
    stored = jobs.get_job(db, job_id)["params"]
    assert stored == params and stored["requested_overrides"] == asked
    default_lr = pipeline.method_config("seed-lora").stages["train"].lr
    assert stored["overrides"]["train"]["lr"] == default_lr
    assert "seed" not in stored["overrides"]["train"]  # seeds follow the job's seed
    assert (pipeline.method_config("seed-lora", 2, stored["overrides"]).to_dict()
            == pipeline.method_config("seed-lora", 2, asked).to_dict())
    assert jobs.pin_config(ctx, stored, "seed-lora") == stored  # a resume keeps the pin


# --- jobs that train the tiny model -------------------------------------------------------------

def quick(max_steps: int, **train) -> dict:
    """A seed-only LoRA run of a few steps on a few images (the `run` kind's params)."""
    return {"method": "seed-lora", "label_fraction": 0.5, "seed": 0,
            "overrides": {"train": {"max_steps": max_steps, "min_steps": 0, "batch_size": 2,
                                    **train}, "max_new_tokens": 6}}


@pytest.fixture
def demo(db):
    from leaml.data.demo.build import DemoConfig
    from leaml.data.ingest import load_demo
    load_demo(db, DemoConfig(n_train=8, n_test=1))


def _ts(stamp: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(stamp).timestamp()


def test_running_job_reports_progress_and_cancels_within_a_step(home, db, demo):
    job_id = jobs.enqueue(db, "run", "demo", quick(400), user=EXPERT)
    w = start_worker(home, "--once")
    try:
        wait_for(lambda: len(jobs.train_log(db, job_id)) >= 3, "three loss rows")
        job, info = jobs.get_job(db, job_id), jobs.job_progress(db, job_id)
        assert job["status"] == "running" and job["stage"] == "train"
        assert job["worker_pid"] != w.pid  # the job runs in a child process of the worker
        assert 0 < info["progress"] < 1 and info["eta"] > 0 and info["heartbeat_age"] < 10
        rows = jobs.train_log(db, job_id)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(r["total"] == 400 and r["loss"] > 0 for r in rows)

        asked = time.time()
        jobs.cancel(db, job_id, user=EXPERT)
        wait_for(lambda: jobs.get_job(db, job_id)["status"] == "cancelled", "cancelled", 60)
        rows = jobs.train_log(db, job_id)
        step_s = (_ts(rows[-1]["ts"]) - _ts(rows[0]["ts"])) / max(1, len(rows) - 1)
        assert _ts(rows[-1]["ts"]) - asked <= jobs.STOP_CACHE_S + 2 * step_s + 1.0
        stopped_at = rows[-1]["step"]
        assert stopped_at < 400
        job = jobs.get_job(db, job_id)
        assert f"cancelled at train step {stopped_at}/400" in job["message"]
        ckpt = home / "jobs" / f"job-{job_id}" / "train" / "checkpoint"
        assert json.loads((ckpt / "config.json").read_text())["step"] == stopped_at
        assert w.wait(timeout=60) == 0  # --once: nothing queued or running any more

        jobs.resume(db, job_id, user=EXPERT)  # goes on from the checkpoint
        w = start_worker(home, "--once")
        wait_for(lambda: len(jobs.train_log(db, job_id)) > stopped_at, "a step after resume")
        assert jobs.train_log(db, job_id)[stopped_at]["step"] == stopped_at + 1
        jobs.cancel(db, job_id)
        wait_for(lambda: jobs.get_job(db, job_id)["status"] == "cancelled", "cancelled again", 60)
        assert jobs.get_job(db, job_id)["attempts"] == 2
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
        w.wait()


def test_new_user_background_run_then_worker_once(home, db, demo):
    """`run --background` (which also starts a detached worker), `worker --once`, `jobs show`."""
    sets = ["--set", "train.max_steps=3", "--set", "train.min_steps=0",
            "--set", "train.batch_size=2", "--set", "max_new_tokens=6"]
    out = leaml(home, "run", "--project", "demo", "--method", "seed-lora",
                "--label-fraction", "0.01", "--background", *sets)
    job_id = int(out.stdout.strip().splitlines()[-1])
    try:
        leaml(home, "worker", "--once", timeout=600)
        shown = leaml(home, "jobs", "show", str(job_id), "--json").stdout
        show = json.loads(shown.splitlines()[-1])
    finally:
        for w in q.live_workers(db, 3600):  # the detached worker `run --background` started
            os.kill(w["pid"], signal.SIGTERM)
    assert show["status"] == "succeeded" and show["progress"] == 1, show
    from leaml.store.runs import get_metrics, get_run
    run = get_run(db, show["run_id"])
    assert run["status"] == "succeeded" and run["job_id"] == job_id
    assert run["method"] == "seed-lora" and run["params"]["label_fraction"] == 0.01
    assert (home / run["model_dir"] / "adapter_config.json").exists()  # peft's own format
    assert get_metrics(db, run["id"])
    assert not (home / "jobs" / f"job-{job_id}").exists()  # checkpoints go once it succeeded
