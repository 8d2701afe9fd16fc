"""Jobs that never get stuck (README: Reliability, classes J2 and J3).

J2: a checkpoint whose ``state.pt`` was cut to half its size; the resumed job skips it for
the previous checkpoint, completes, and says in its message which file it skipped.
J3: not enough free space for a checkpoint (``LEAML_MIN_FREE_MB`` set above the disk's real
free space); the job ends ``failed`` with "disk full: free N MB in <home>", leaves no
``checkpoint.tmp``, and the same worker goes on to run the next job.

Real ``python -m leaml worker`` processes, real SQLite, the real tiny model, a few steps.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from leaml.jobs import queue as jobs
from servehelp import wait_for

ROOT = Path(__file__).resolve().parents[1]


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


def start_worker(home, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leaml", "worker", *args, "--home", str(home)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def finish(w: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a ``worker --once`` to drain the queue; its output (killed if it hangs)."""
    try:
        out, _ = w.communicate(timeout=timeout)
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
    return out


@pytest.mark.trust
def test_truncated_checkpoint_falls_back_to_the_previous_and_the_job_completes(home, db, demo):
    # enough steps that the cancel lands in training even on a loaded machine (a job whose
    # training ended keeps no checkpoints to damage)
    job_id = jobs.enqueue(db, "run", "demo", quick(60, checkpoint_every=2))
    w = start_worker(home, "--once")
    try:
        wait_for(lambda: len(jobs.train_log(db, job_id)) >= 5, "five steps (two checkpoints)")
        jobs.cancel(db, job_id)
        wait_for(lambda: jobs.get_job(db, job_id)["status"] == "cancelled", "cancelled", 120)
    finally:
        finish(w, 120)
    work = home / "jobs" / f"job-{job_id}" / "train"
    previous = json.loads((work / "checkpoint.prev" / "config.json").read_text())["step"]
    state = work / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a disk that lost half

    before = len(steps(db, job_id))
    jobs.resume(db, job_id)
    out = finish(start_worker(home, "--once"))
    job = jobs.get_job(db, job_id)
    assert job["status"] == "succeeded", f"{job['message']}\n{out}"
    assert str(state) in job["message"] and "previous checkpoint" in job["message"]
    assert steps(db, job_id)[before] == previous + 1  # went on from the previous checkpoint


def steps(db, job_id: int) -> list[int]:
    """Every loss row's step in the order written (a resume's rows come after)."""
    return [r["step"] for r in db.query("SELECT step FROM train_log WHERE job_id = ?"
                                        " ORDER BY id", [job_id])]


@pytest.mark.trust
def test_disk_full_fails_the_job_cleanly_and_the_worker_runs_the_next(home, db, demo):
    starved = jobs.enqueue(db, "run", "demo", quick(4, checkpoint_every=1))
    after = jobs.enqueue(db, "run", "demo", quick(2))  # no checkpoint: needs no spare space
    free_mb = shutil.disk_usage(home).free / 1024 / 1024
    w = start_worker(home, "--once", env={"LEAML_MIN_FREE_MB": str(int(free_mb * 2))})
    out = finish(w)
    assert w.returncode == 0, out
    job = jobs.get_job(db, starved)
    assert job["status"] == "failed", out
    assert job["message"].startswith("disk full: free ") and f" MB in {home}" in job["message"]
    assert not list(home.rglob("checkpoint.tmp")) and not list(home.rglob("state.pt"))
    assert jobs.get_job(db, after)["status"] == "succeeded", out
    assert "worker: ran 2 job(s)" in out
