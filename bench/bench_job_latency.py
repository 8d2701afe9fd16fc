"""Benchmark: how fast a job starts and how fast a cancel is honoured, as the app sees it.

    python bench/bench_job_latency.py [--stages generator,pseudo,finetune,evaluate]

Start: on a fresh data home with a small demo project, queue a LEAML job and start the
worker as the app does (``jobs.ensure_worker``); print every change of the job row (status,
stage, message) with its time, up to the first training step. Target: a stage or message
within 10 s, the first step as soon as the model is loaded.

Then a second job queued after the worker idled 30 s (its spare job process warm).

Cancel: the same job is cancelled once in each long stage (generator training, pseudo
sampling, target finetuning, evaluation), resumed, and cancelled in the next stage; for each,
the seconds from the cancel to the row saying so (message) and to status ``cancelled``.
Target: both under 5 s. Real processes, the real tiny model; minutes on two cores.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml.jobs import queue as jobs  # noqa: E402
from leaml.data.demo.build import DemoConfig  # noqa: E402
from leaml.data.ingest import load_demo  # noqa: E402
from leaml.store import connect  # noqa: E402
from leaml.store import jobs as q  # noqa: E402

LONG = {  # each stage long enough to cancel in on two cores
    "generator": {"batch_size": 4, "min_qa_steps": 1, "max_qa_steps": 20,
                  "max_captions": 8},  # 20 QA steps, 6 x 20 with the caption/answer streams
    "pseudo": {"k": 12, "max_images": 64},
    "finetune": {"max_steps": 60, "min_steps": 0, "batch_size": 4, "vision_warmup_epochs": 0},
    "eval_batch_size": 64, "max_new_tokens": 24,
}


def watch(db, job_id: int, until, t0: float, timeout: float, show: bool = True) -> float | None:
    """Poll the job row every 50 ms, printing each change; seconds until ``until(job)``."""
    last = None
    while time.monotonic() - t0 < timeout:
        job = q.get_job(db, job_id)
        seen = (job["status"], job["stage"], job["message"])
        if seen != last and show:
            print(f"  {time.monotonic() - t0:6.2f} s  {job['status']:<10} "
                  f"stage={job['stage']!s:<28} {job['message'] or ''}", flush=True)
            last = seen
        if until(job):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def stop_workers(db) -> None:
    for w in q.live_workers(db, 3600):
        try:
            os.kill(w["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def cancel_in(db, home: Path, job_id: int, stage: str, timeout: float) -> dict:
    """Wait for ``stage`` to run for a second, cancel, time the message and the status."""
    t0 = time.monotonic()
    if watch(db, job_id, lambda j: (j["stage"] or "").startswith(stage), t0, 900,
             show=False) is None:
        return {"stage": stage, "error": "never reached"}
    time.sleep(1.0)
    before = q.get_job(db, job_id)["message"]
    t0 = time.monotonic()
    jobs.cancel(db, job_id)
    shown = watch(db, job_id, lambda j: j["message"] != before or j["status"] != "running",
                  t0, timeout, show=False)
    ended = watch(db, job_id, lambda j: j["status"] == "cancelled", t0, timeout, show=False)
    job = q.get_job(db, job_id)
    return {"stage": stage, "shown_s": shown, "cancelled_s": ended, "message": job["message"]}


def warm_start(db, home: Path, job_id: int) -> None:
    """A job queued after the worker idled a while (its spare job process is warm)."""
    if q.get_job(db, job_id)["status"] in ("queued", "running"):
        jobs.cancel(db, job_id)
    watch(db, job_id, lambda j: j["status"] != "running", time.monotonic(), 120, show=False)
    jobs.ensure_worker(home)
    time.sleep(30)
    quick = {"method": "seed-lora", "label_fraction": 0.1, "seed": 0,
             "overrides": {"train": {"max_steps": 3, "min_steps": 0, "batch_size": 2}}}
    print("start after the worker idled 30 s:")
    t0 = time.monotonic()
    second = jobs.enqueue(db, "run", "demo", quick)
    first = watch(db, second, lambda j: bool(jobs.train_log(db, second)), t0, 600)
    print(f"first training step after {first:.1f} s")
    jobs.cancel(db, second)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="generator,pseudo,finetune,evaluate",
                    help="stages to cancel in ('' = only the two starts)")
    ap.add_argument("--timeout", type=float, default=120.0, help="give up on a cancel after S")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        home = Path(tmp)
        db = connect(home)
        load_demo(db, DemoConfig(n_train=160, n_test=60))
        job_id = jobs.enqueue(db, "run", "demo", {"method": "leaml", "label_fraction": 0.1,
                                                  "seed": 0, "overrides": LONG})
        print("start (ensure_worker, as the Training page does):")
        t0 = time.monotonic()
        jobs.ensure_worker(home)
        first = watch(db, job_id, lambda j: bool(jobs.train_log(db, job_id)), t0, 600)
        print(f"first training step after {first:.1f} s")
        try:
            print("cancel, per stage (seconds from the click):")
            stages = [s for s in args.stages.split(",") if s]
            for i, stage in enumerate(stages):
                r = cancel_in(db, home, job_id, stage, args.timeout)
                print(f"  {r}", flush=True)
                if r.get("cancelled_s") is None:
                    return 1
                if i + 1 < len(stages):
                    jobs.resume(db, job_id)
                    jobs.ensure_worker(home)
            warm_start(db, home, job_id)
        finally:
            if q.get_job(db, job_id)["status"] in ("queued", "running"):
                jobs.cancel(db, job_id)
            stop_workers(db)
            time.sleep(3)  # the worker ends its spare and writes its last row
    return 0


if __name__ == "__main__":
    sys.exit(main())
