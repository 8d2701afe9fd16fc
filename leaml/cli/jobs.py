"""The ``worker`` and ``jobs`` subcommands (registered in leaml/cli/main.py's ADDERS).
Thin: every line of work is in leaml.jobs.queue / leaml.jobs.worker.
"""
from __future__ import annotations

import argparse
import json
import sys

from leaml.cli.common import print_json
from leaml.jobs import queue as jobs
from leaml.jobs import worker
from leaml.store import connect
from leaml.store.projects import get_project

JSON_KEYS = ("id", "status", "stage", "progress", "message", "run_id")


# --- worker ---------------------------------------------------------------------------------

def _add_worker(sub, common) -> None:
    text = "run queued background jobs (each in a child process); Ctrl-C stops after a checkpoint"
    p = sub.add_parser("worker", help=text, description=text, parents=[common])
    p.add_argument("--once", action="store_true",
                   help="drain: exit when no job is queued or running (waits for jobs other "
                        "workers run)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between queue polls")
    p.add_argument("--idle-exit", type=float, default=None, metavar="S",
                   help="exit after S seconds without a job (used by ensure_worker)")
    # internal: the child process that runs one claimed job
    p.add_argument("--job-process", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--claimed-by", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--spare", action="store_true", help=argparse.SUPPRESS)  # a warm job process
    p.set_defaults(func=cmd_worker)


def cmd_worker(args) -> int:
    if args.spare:
        return worker.run_spare(args.home, args.claimed_by)
    if args.job_process is not None:
        return worker.run_claimed(args.home, args.job_process, args.claimed_by)
    n = worker.work(args.home, once=args.once, poll_s=args.poll, idle_exit=args.idle_exit)
    print(f"worker: ran {n} job(s)", file=sys.stderr)
    return 0


# --- jobs -----------------------------------------------------------------------------------

def _add_jobs(sub, common) -> None:
    text = "list, show, cancel or resume background jobs"
    p = sub.add_parser("jobs", help=text, description=text, parents=[common])
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = acts.add_parser("list", help="jobs, newest first", parents=[common])
    ls.add_argument("--project", default=None, help="only this project's jobs")
    ls.add_argument("--limit", type=int, default=50)
    for name, helptext in (("show", "one job: status, progress, message, log tail"),
                           ("cancel", "stop a job (within one training step); it stays resumable"),
                           ("resume", "queue a cancelled/interrupted/failed job again, from "
                                      "its last checkpoint")):
        a = acts.add_parser(name, help=helptext, parents=[common])
        a.add_argument("id", type=int, help="job id (see `jobs list`)")
        if name == "show":
            a.add_argument("--log", type=int, default=20, metavar="N", help="log lines to show")
    for a in acts.choices.values():
        a.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)


def cmd_jobs(args) -> int:
    db = connect(args.home)
    jobs.recover_stale(db)
    if args.action == "list":
        return _jobs_list(db, args)
    if args.action == "show":
        return _jobs_show(db, args)
    job = (jobs.cancel if args.action == "cancel" else jobs.resume)(db, args.id, user=None)
    if args.json:
        print_json({k: job[k] for k in JSON_KEYS})
    else:
        verb = {"cancel": "cancel requested for", "resume": "queued again:"}[args.action]
        print(f"{verb} job {job['id']} (now {job['status']}); "
              + ("start a worker: python -m leaml worker" if args.action == "resume" else
                 "a running job stops within one training step"))
    return 0


def _jobs_list(db, args) -> int:
    project_id = get_project(db, args.project)["id"] if args.project else None
    rows = jobs.list_jobs(db, project_id, args.limit)
    if args.json:
        print_json([{k: j[k] for k in JSON_KEYS + ("kind", "created_at")} for j in rows])
        return 0
    print(f"{'id':>4}  {'kind':<9} {'status':<11} {'stage':<10} {'progress':>8}  message")
    for j in rows:
        print(f"{j['id']:>4}  {j['kind']:<9} {j['status']:<11} {(j['stage'] or '-'):<10} "
              f"{j['progress'] * 100:>7.0f}%  {j['message'] or ''}")
    return 0


def _jobs_show(db, args) -> int:
    job = jobs.get_job(db, args.id)
    if args.json:
        info = jobs.job_progress(db, args.id)
        print_json({**{k: job[k] for k in JSON_KEYS},
                     **{k: info[k] for k in ("kind", "eta_seconds", "step", "total", "loss",
                                             "phase")},
                     "attempts": job["attempts"], "params": job["params"]})
        return 0
    for key in ("id", "kind", "status", "stage", "progress", "eta_seconds", "message", "run_id",
                "attempts", "created_by", "created_at", "started_at", "finished_at",
                "checkpoint_dir", "log_path"):
        print(f"{key:>15}: {job[key]}")
    print(f"{'now':>15}: {jobs.job_progress(db, args.id)['phase']}")  # or what it waits for
    print(f"{'params':>15}: {json.dumps(job['params'], sort_keys=True)}")
    tail = jobs.log_tail(db.home, job, args.log)
    if tail:
        print(f"--- last {args.log} lines of {job['log_path']} ---\n{tail}")
    return 0

