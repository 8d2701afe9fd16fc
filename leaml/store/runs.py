"""Runs and their metrics: one ``runs`` row per trained model, ``metrics`` rows per score.

A run is created ``running`` before training starts (so a job can point at it), finished
with its accuracy and seconds, or marked failed. Metrics are replaced as a whole when a run
is (re-)evaluated.
"""
from __future__ import annotations

import json

import sqlite_utils

from leaml.store.db import NotFoundError, log_event, now, row, to_json, transaction

def _decode(r: dict | None) -> dict | None:
    if r is not None:
        r = dict(r)
        r["params"] = json.loads(r["params"] or "{}")
    return r


def create_run(db: sqlite_utils.Database, project_id: int, *, method: str, base_model: str,
               params: dict, job_id: int | None = None, user: str | None = None) -> int:
    """Insert a ``running`` run and return its id."""
    with transaction(db):
        cur = db.execute(
            "INSERT INTO runs (project_id, job_id, method, base_model, params, status,"
            " created_by, created_at) VALUES (?, ?, ?, ?, ?, 'running', ?, ?)",
            [project_id, job_id, method, base_model, to_json(params), user, now()])
        run_id = cur.lastrowid
        log_event(db, user=user, action="run.create", entity="run", entity_id=run_id,
                  project_id=project_id, after={"method": method, "base_model": base_model})
    return run_id


def get_run(db: sqlite_utils.Database, run_id: int) -> dict:
    """The run row with ``params`` decoded; NotFoundError if there is none."""
    found = _decode(row(db, "SELECT * FROM runs WHERE id = ?", [run_id]))
    if found is None:
        raise NotFoundError(f"unknown run {run_id}; list runs with `python -m leaml jobs` "
                            "or the Runs page")
    return found


def list_runs(db: sqlite_utils.Database, project_id: int, *, method: str | None = None) -> list[dict]:
    """Runs of a project, newest first, optionally of one method."""
    sql, params = "SELECT * FROM runs WHERE project_id = ?", [project_id]
    if method is not None:
        sql, params = sql + " AND method = ?", params + [method]
    return [_decode(r) for r in db.query(sql + " ORDER BY id DESC", params)]


def update_run(db: sqlite_utils.Database, run_id: int, **changes) -> None:
    """Set columns of a run (model_dir, params, ...); params is given as a dict."""
    allowed = {"model_dir", "params", "status", "accuracy", "seconds", "finished_at", "job_id"}
    bad = set(changes) - allowed
    if bad:
        raise ValueError(f"update_run: cannot set {sorted(bad)}; allowed: {sorted(allowed)}")
    if "params" in changes:
        changes["params"] = to_json(changes["params"])
    sets = ", ".join(f"{k} = ?" for k in changes)
    with transaction(db):
        db.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*changes.values(), run_id])


def finish_run(db: sqlite_utils.Database, run_id: int, *, accuracy: float | None,
               seconds: float, status: str = "succeeded") -> None:
    """Mark a run finished (succeeded or failed) with its accuracy (percent) and seconds."""
    with transaction(db):
        db.execute("UPDATE runs SET status = ?, accuracy = ?, seconds = ?, finished_at = ?"
                   " WHERE id = ?", [status, accuracy, seconds, now(), run_id])
        log_event(db, user=None, action=f"run.{status}", entity="run", entity_id=run_id,
                  after={"accuracy": accuracy, "seconds": seconds})


def save_metrics(db: sqlite_utils.Database, run_id: int, summary: dict) -> int:
    """Replace the run's metrics by those of an evaluation summary; returns rows written.

    ``summary`` is :func:`leaml.engine.evaluate.summarize`'s dict: ``accuracy``, ``n_test``,
    ``by_category`` / ``by_question_type`` (percent) and their ``*_n`` counts.
    """
    rows = [(run_id, "overall", "", summary["accuracy"], summary["n_test"])]
    for scope, key in (("category", "by_category"), ("question_type", "by_question_type")):
        counts = summary.get(key + "_n", {})
        rows += [(run_id, scope, name, acc, counts.get(name, 0))
                 for name, acc in summary.get(key, {}).items()]
    with transaction(db):
        db.execute("DELETE FROM metrics WHERE run_id = ?", [run_id])
        db.conn.executemany("INSERT INTO metrics (run_id, scope, key, accuracy, n)"
                            " VALUES (?, ?, ?, ?, ?)", rows)
        db.execute("UPDATE runs SET accuracy = ? WHERE id = ?", [summary["accuracy"], run_id])
    return len(rows)


def get_metrics(db: sqlite_utils.Database, run_id: int) -> list[dict]:
    """Metric rows of a run: overall first, then categories and question types by key."""
    return list(db.query(
        "SELECT scope, key, accuracy, n FROM metrics WHERE run_id = ? ORDER BY"
        " CASE scope WHEN 'overall' THEN 0 WHEN 'category' THEN 1 ELSE 2 END, key", [run_id]))


def unlabeled_captions(db: sqlite_utils.Database, project_id: int, *,
                       exclude_image_ids=()) -> list[dict]:
    """Train images with a teacher caption that are not among ``exclude_image_ids``.

    For caption training: the images whose labels a run does not use (unlabeled, or
    outside its label fraction). Returns rows with id, sha256, ext, category, caption.
    """
    return list(db.query(
        "SELECT id, sha256, ext, category, caption FROM images WHERE project_id = :p"
        " AND split = 'train' AND caption IS NOT NULL AND TRIM(caption) != ''"
        " AND id NOT IN (SELECT value FROM json_each(:ex)) ORDER BY id",
        {"p": project_id, "ex": json.dumps([int(i) for i in exclude_image_ids])}))
