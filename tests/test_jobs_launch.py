"""Jobs on two CPU processes (the job param ``processes``, ``run --background --processes``):
the worker starts the job process through accelerate's launcher; only the main process takes
the job over and records it. A run job on two processes stores one runs row with the numbers
of the same job on one; a cancel in training ends it 'cancelled' and every process of the
launch ends; a worker shutdown in training ends it 'interrupted' at a step with its
checkpoint, and resumed it goes on from there. Same small project and knobs as
tests/test_multiprocess_run.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from leaml.config import fold_overrides
from leaml.jobs import queue as jobs
from leaml.store import connect
from servehelp import cli, wait_for
from test_multiprocess_run import KNOBS, _stored, small_demo

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def params(processes: int, *sets: str) -> dict:
    """The `run` kind's params as `run --background --device cpu --processes N` queues them."""
    knobs = [v for v in KNOBS if v != "--set"] + list(sets)
    p = {"method": "leaml", "label_fraction": 0.25, "seed": 1, "base_model": "tiny",
         "overrides": fold_overrides("leaml", sets=knobs), "device": "cpu"}
    return dict(p, processes=processes) if processes != 1 else p


def worker(home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leaml", "worker", "--once", "--home",
                             str(home)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def in_generator_training(db, job_id: int, home: Path) -> set[int]:
    """Once the job's generator trained a step: the pids of its launcher and two processes."""
    wait_for(lambda: any(r["stage"] == "generator" for r in jobs.train_log(db, job_id)),
             "a generator training step")
    pids = job_pids(job_id, home)
    assert len(pids) == 3, pids  # the launcher and its two processes
    return pids


def job_pids(job_id: int, home: Path) -> set[int]:
    """The live processes of the job: its launcher and the launch's processes."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--job-process" in argv and str(job_id).encode() in argv and str(home).encode() in argv:
            found.add(int(entry.name))
    return {p for p in found if jobs.pid_alive(p)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return small_demo(tmp_path_factory, "mpjobs")


def test_processes_param_is_checked_when_queued(base, tmp_path):
    home = tmp_path / "h"
    shutil.copytree(base, home)
    db = connect(home)
    for bad in (0, -1, 1.5, True, "2", (os.cpu_count() or 1) + 1):
        with pytest.raises(ValueError, match="processes"):
            jobs.enqueue(db, "run", "demo", dict(params(1), processes=bad))
    with pytest.raises(ValueError, match="one GPU each"):
        jobs.enqueue(db, "run", "demo", dict(params(2), device="cuda:1"))
    r = cli(home, "run", "--project", "demo", "--method", "leaml", "--background",
            "--processes", "0")
    assert r.returncode != 0 and "processes=0" in r.stderr
    r = cli(home, "run", "--project", "demo", "--method", "leaml", "--processes", "2")
    assert r.returncode != 0 and "--processes needs --background" in r.stderr
    assert not db.execute("SELECT count(*) FROM jobs").fetchone()[0]


def test_a_run_job_on_two_processes_stores_once_with_the_numbers_of_one(base, tmp_path):
    homes = {n: tmp_path / f"p{n}" for n in (1, 2)}
    ids = {}
    for n, home in homes.items():
        shutil.copytree(base, home)
        ids[n] = jobs.enqueue(connect(home), "run", "demo", params(n))
        assert worker(home).wait(timeout=900) == 0
    for n, home in homes.items():
        job = jobs.get_job(connect(home), ids[n])
        assert job["status"] == "succeeded", (n, job["message"], jobs.log_tail(home, job))
    log = jobs.log_tail(homes[2], ids[2], 400)
    assert "leaml-spread-" in log  # the second process trained beside the main one
    assert log.count(" starts, params ") == 1  # one process took the job
    a, b = _stored(homes[1]), _stored(homes[2])
    assert [m for m, _, _ in b["runs"]] == ["leaml", "generator"]  # one row each, not two
    assert a["runs"] == b["runs"] and a["metrics"] == b["metrics"] and b["metrics"]
    assert len(b["pairs"]) == len(a["pairs"]) > 0
    for p, q in zip(a["pairs"], b["pairs"]):
        assert p[:5] == q[:5] and p[5] == pytest.approx(q[5], abs=2e-3)
    one, two = (jobs.get_job(connect(h), ids[n]) for n, h in homes.items())
    assert one["message"] == two["message"]  # "leaml: accuracy ...% on N test questions (run 1)"

    # an evaluate job on two processes: each answers every other test question of the saved
    # model, the main one gathers and stores the same metrics
    db = connect(homes[2])
    run_id = db.execute("SELECT id FROM runs WHERE method = 'leaml'").fetchone()[0]
    eval_id = jobs.enqueue(db, "evaluate", "demo", {"run_id": run_id, "device": "cpu",
                                                    "processes": 2})
    assert worker(homes[2]).wait(timeout=900) == 0
    job = jobs.get_job(db, eval_id)
    assert job["status"] == "succeeded", (job["message"], jobs.log_tail(homes[2], job))
    log = jobs.log_tail(homes[2], eval_id, 400)
    assert log.count(" starts, params ") == 1 and log.count(f"run-{run_id} on cpu") == 2, log
    assert _stored(homes[2]) == b  # re-evaluated in two halves: the same metrics, nothing added
    assert job["message"].split(" (")[0] == two["message"].split(" (")[0]  # same accuracy


def test_a_job_on_two_processes_that_fails_is_recorded_once_and_every_process_ends(
        base, tmp_path):
    """The base model is a folder that holds no model: both processes have joined when the
    main one fails to load it; it records the failure and leaves non-zero, the launcher ends
    the other (waiting for the first call), and the worker keeps the recorded end."""
    home = tmp_path / "fail"
    shutil.copytree(base, home)
    (tmp_path / "empty-model").mkdir()
    job_id = jobs.enqueue(connect(home), "run", "demo",
                          dict(params(2), base_model=str(tmp_path / "empty-model")))
    assert worker(home).wait(timeout=600) == 0
    job = jobs.get_job(connect(home), job_id)
    assert job["status"] == "failed", (job["message"], jobs.log_tail(home, job))
    assert "empty-model" in job["message"] and "exited with code" not in job["message"]
    assert jobs.log_tail(home, job, 400).count(" starts, params ") == 1
    assert not job_pids(job_id, home)


def test_a_job_on_two_processes_cancelled_in_training_ends_every_process(base, tmp_path):
    home = tmp_path / "cancel"
    shutil.copytree(base, home)
    db = connect(home)
    job_id = jobs.enqueue(db, "run", "demo", params(2, "generator.min_qa_steps=400",
                                                    "generator.max_qa_steps=400"))
    w = worker(home)
    try:
        pids = in_generator_training(db, job_id, home)
        jobs.cancel(db, job_id)
        wait_for(lambda: jobs.get_job(db, job_id)["status"] != "running", "the job's end")
        job = jobs.get_job(db, job_id)
        assert job["status"] == "cancelled", (job["message"], jobs.log_tail(home, job))
        assert "cancelled at generator step" in job["message"]
        # the job's runs rows, the generator's among them, are closed with it: none looks alive
        assert db.execute("SELECT id FROM runs WHERE status = 'running'").fetchall() == []
        assert w.wait(timeout=300) == 0
        assert not {p for p in pids if jobs.pid_alive(p)}
        assert jobs.get_job(db, job_id)["status"] == "cancelled"  # the worker kept the end
        assert "exited with code" not in jobs.get_job(db, job_id)["message"]
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
        w.wait()


def test_a_job_on_two_processes_stopped_by_a_worker_shutdown_keeps_its_step_and_resumes(
        base, tmp_path):
    """SIGTERM to the worker in generator training: the launcher passes it on to both
    processes; the main one stops, the other (which ignores it while it follows) stops at the
    same step, the checkpoint of that step is written, the job ends 'interrupted', every
    process of the launch ends, and a resume goes on from that step to the end."""
    home = tmp_path / "shutdown"
    shutil.copytree(base, home)
    db = connect(home)
    steps = 20  # seed-QA steps: 110 generator steps in all
    job_id = jobs.enqueue(db, "run", "demo", params(2, f"generator.min_qa_steps={steps}",
                                                    f"generator.max_qa_steps={steps}"))
    w = worker(home)
    try:
        pids = in_generator_training(db, job_id, home)
        w.send_signal(signal.SIGTERM)  # the worker alone: it passes SIGTERM to the launcher
        assert w.wait(timeout=300) == 0
        job = jobs.get_job(db, job_id)
        assert job["status"] == "interrupted", (job["message"], jobs.log_tail(home, job))
        assert "worker shut down at generator step " in job["message"], job["message"]
        step, total = map(int, job["message"].split(" step ")[1].split(";")[0].split("/"))
        assert step < total, "training ended before the signal; slow it down"
        ckpt = home / "jobs" / f"job-{job_id}" / "generator" / "checkpoint" / "config.json"
        assert ckpt.exists(), jobs.log_tail(home, job, 200)  # no periodic ones: the stop's own
        assert json.loads(ckpt.read_text())["step"] == step
        assert not {p for p in pids if jobs.pid_alive(p)}
        assert "exited with code" not in job["message"]
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
        w.wait()

    seen = len([r for r in jobs.train_log(db, job_id) if r["stage"] == "generator"])
    jobs.resume(db, job_id)
    assert worker(home).wait(timeout=900) == 0
    job = jobs.get_job(db, job_id)
    assert job["status"] == "succeeded", (job["message"], jobs.log_tail(home, job, 200))
    gen = [r["step"] for r in jobs.train_log(db, job_id) if r["stage"] == "generator"]
    assert gen[seen] == step + 1  # went on from the stop's checkpoint, not from 0
    assert gen[seen:] == list(range(step + 1, total + 1))
    assert not job_pids(job_id, home)


WATCHED = """
import socket, subprocess, sys, time
from leaml.engine import spread
leader = subprocess.Popen(["sleep", "600"])
spread._LEADING["following"] = True  # as in follow(), which ignores SIGTERM from here on
spread._watch(socket.gethostname(), leader.pid)
time.sleep(2 * spread.WATCH_S)
print("followed", flush=True)
leader.kill()  # not reaped: a zombie is gone too
time.sleep(120)  # a hang guard: the watch ends this process long before
"""


def test_a_follower_leaves_when_its_main_process_is_gone():
    """A follower ignores the launcher's SIGTERM; should its main process die while it waits
    in a collective that does not notice (NCCL), it leaves by itself, exit status 1."""
    out = subprocess.run([sys.executable, "-c", WATCHED], cwd=ROOT, env=ENV, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == "followed\n" and "is gone; leaving" in out.stderr, out.stderr
