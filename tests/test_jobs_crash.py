"""A worker killed with SIGKILL mid-training: the job turns ``interrupted`` once its heartbeat
is stale, ``jobs resume`` queues it again, and a new worker finishes it from the last
checkpoint with the same model and the same metrics as an uninterrupted run (same seed).

Real processes (``python -m leaml worker --once``), real SQLite, the real tiny model.
The job is a quick LEAML run (generator, pseudo QA, target); the kill lands in the target's training.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from leaml.jobs import queue as jobs
from leaml.data.demo.build import DemoConfig
from leaml.data.ingest import load_demo
from leaml.store.runs import get_metrics, get_run
from servehelp import wait_for

ROOT = Path(__file__).resolve().parents[1]
METHOD = "leaml"
_TRAIN = {"max_steps": 8, "min_steps": 0, "batch_size": 2, "checkpoint_every": 2}
QUICK = {  # a few steps, a checkpoint every 2, short answers: seconds, not minutes
    "seed-lora": {"train": _TRAIN, "max_new_tokens": 6},
    "leaml": {"generator": {**_TRAIN, "max_steps": 6, "min_qa_steps": 1, "max_qa_steps": 3,
                            "rho": 0.1, "max_captions": 4},
              "pseudo": {"k": 1, "max_new_tokens": 12},
              # one vision warmup pass, not the method's 85: a resumed run skips it all the same
              "finetune": {**_TRAIN, "vision_warmup_epochs": 1.0}, "max_new_tokens": 6},
}
TRAIN_STAGE = {"seed-lora": "train", "leaml": "finetune"}[METHOD]


def quick_params(seed: int = 0) -> dict:
    return {"method": METHOD, "label_fraction": 0.5, "seed": seed, "overrides": QUICK[METHOD]}


def leaml(home, *args, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "leaml", *args, "--home", str(home)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"leaml {args}: {out.stdout}\n{out.stderr}"
    return out


def worker(home) -> subprocess.Popen:
    """``worker --once`` in a session of its own, so killpg takes its job process too."""
    return subprocess.Popen([sys.executable, "-m", "leaml", "worker", "--once", "--home",
                             str(home)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def outcome(db, job_id: int, home: Path) -> dict:
    """Everything a run produced that must not depend on having been interrupted."""
    job = jobs.get_job(db, job_id)
    run = get_run(db, job["run_id"])
    model = home / run["model_dir"]
    from safetensors.torch import load_file
    # LoRA targets save adapters, full finetuning (LEAML's target) the whole model
    adapter = model / "adapter_model.safetensors"
    weights = load_file(str(adapter if adapter.exists() else model / "model.safetensors"))
    return {"accuracy": run["accuracy"], "status": run["status"],
            "metrics": sorted((m["scope"], m["key"], m["accuracy"], m["n"])
                              for m in get_metrics(db, run["id"])),
            "predictions": (model / "predictions.jsonl").read_text(),
            "weights": {k: v.tolist() for k, v in sorted(weights.items())}}


def test_sigkill_mid_training_then_resume_equals_uninterrupted(home, db):
    load_demo(db, DemoConfig(n_train=8, n_test=1))
    reference = jobs.enqueue(db, "run", "demo", quick_params())
    victim = jobs.enqueue(db, "run", "demo", quick_params())
    w = worker(home)  # runs the reference job to the end, then starts on the victim
    past_checkpoint = lambda: any(r["stage"] == TRAIN_STAGE and r["step"] >= 3  # noqa: E731
                                  for r in jobs.train_log(db, victim))
    try:
        wait_for(past_checkpoint, "the victim job to pass its first checkpoint")
    finally:
        os.killpg(w.pid, signal.SIGKILL)  # the worker and its job process, mid-training
        w.wait(timeout=30)
    assert jobs.get_job(db, reference)["status"] == "succeeded"
    killed_at = max(r["step"] for r in jobs.train_log(db, victim) if r["stage"] == TRAIN_STAGE)
    assert killed_at < _TRAIN["max_steps"], "training ended before the kill; slow it down"
    assert jobs.get_job(db, victim)["status"] == "running"  # nobody knows yet

    time.sleep(1.5)
    out = leaml(home, "jobs", "list", env={"LEAML_HEARTBEAT_TIMEOUT": "1"})
    assert jobs.get_job(db, victim)["status"] == "interrupted", out.stdout
    ckpt = home / "jobs" / f"job-{victim}" / TRAIN_STAGE / "checkpoint" / "config.json"
    saved_step = json.loads(ckpt.read_text())["step"]
    assert 2 <= saved_step <= killed_at and saved_step % 2 == 0

    leaml(home, "jobs", "resume", str(victim))
    resumed_from = len(list(db.query("SELECT 1 FROM train_log WHERE job_id = ? AND stage = ?",
                                     [victim, TRAIN_STAGE])))
    w = worker(home)
    try:
        assert w.wait(timeout=600) == 0
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
    job = jobs.get_job(db, victim)
    assert job["status"] == "succeeded" and job["attempts"] == 2 and job["run_id"]
    new_rows = list(db.query("SELECT stage, step FROM train_log WHERE job_id = ? AND stage = ?"
                             " ORDER BY id LIMIT -1 OFFSET ?", [victim, TRAIN_STAGE, resumed_from]))
    assert new_rows[0]["step"] == saved_step + 1  # went on from the checkpoint, not from 0
    assert "resuming from" in jobs.log_tail(home, job, 400)
    got, want = outcome(db, victim, home), outcome(db, reference, home)
    differ = [k for k in want if got[k] != want[k]]  # names, not pytest's diff of the weights
    assert not differ, f"the resumed run differs from the uninterrupted one in {differ}"
    curve = [r["step"] for r in jobs.train_log(db, victim) if r["stage"] == TRAIN_STAGE]
    assert curve == list(range(1, _TRAIN["max_steps"] + 1))  # one point per step
