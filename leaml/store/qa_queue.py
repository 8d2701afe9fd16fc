"""The review queue: pending pseudo pairs by confidence, claims, bulk accept.

Import these from ``leaml.store.qa``. The queue query walks the ``qa_review`` index
(project_id, status, confidence) or, with a category, ``qa_review_cat`` (project_id, status,
category, confidence) in order, so a page costs the same at 100 or 100,000 pending pairs.
The orders 'near-cut' and 'balanced' rank pairs within their question (see RANKED_ORDERS).
A claim (locked_by, locked_until) reserves a pair for one reviewer; it does not change the
version and is not audited (it is a lease, not an edit); decisions release it.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import sqlite_utils

from leaml.store.db import now, row, to_json, transaction

ORDERS = {"desc": "confidence DESC, id DESC", "asc": "confidence ASC, id ASC"}
# Orders by a pair's place among the pending pairs of its own question (as the finetune's
# confidence cut per question ranks them). They sort the matching pairs on each call (window
# functions) instead of walking an index: fine for a review queue of tens of thousands.
# near-cut: the pairs that train (at or above the cut, the top NEAR_CUT_KEEP of each question)
# come first, those just above the cut first (the likeliest wrong among them), then the ones
# below it, nearest first. balanced: one pair of each question in turn, each in near-cut order.
RANKED_ORDERS = ("near-cut", "balanced")
NEAR_CUT_KEEP = 0.6  # the finetune's default keep_top
_FREE = "(locked_by IS NULL OR locked_until <= :now OR locked_by = :reviewer)"


def _ranked(where: str) -> str:
    """SELECT id, k (near-cut key), n (place in its question's near-cut order) of the pairs
    matching ``where``. t: rank from the top within the question; c: how many the cut keeps
    (ceil(keep * m) of its m pairs)."""
    ceil = "(CAST(:keep * m AS INTEGER) + (:keep * m > CAST(:keep * m AS INTEGER)))"
    return ("SELECT id, k, ROW_NUMBER() OVER (PARTITION BY question ORDER BY k, id) AS n FROM ("
            " SELECT id, question, CASE WHEN t <= c THEN (c - t) * 1.0 / m"
            " ELSE 1 + (t - c) * 1.0 / m END AS k FROM ("
            f"  SELECT id, question, t, m, {ceil} AS c FROM ("
            "   SELECT id, question, ROW_NUMBER() OVER (PARTITION BY question"
            "   ORDER BY confidence DESC, id DESC) AS t, COUNT(*) OVER (PARTITION BY question) AS m"
            f"   FROM qa WHERE {where})))")


def _ranked_order(order: str) -> str:
    return "s.k, s.id" if order == "near-cut" else "s.n, s.k, s.id"


def _where(project_id: int, *, category=None, question_type=None, gen_run_id=None,
           source=None, min_conf=None, max_conf=None, exclude_ids=()) -> tuple[str, dict]:
    """WHERE clause and named parameters of the pending queue with its filters."""
    where = ["project_id = :project_id", "status = 'pending'"]
    params: dict = {"project_id": project_id}
    for column, value in (("category", category), ("question_type", question_type),
                          ("gen_run_id", gen_run_id), ("source", source)):
        if value is not None:
            where.append(f"{column} = :{column}")
            params[column] = value
    if min_conf is not None:
        where.append("confidence >= :min_conf")
        params["min_conf"] = float(min_conf)
    if max_conf is not None:
        where.append("confidence <= :max_conf")
        params["max_conf"] = float(max_conf)
    if exclude_ids:
        where.append("id NOT IN (SELECT value FROM json_each(:exclude))")
        params["exclude"] = json.dumps([int(i) for i in exclude_ids])
    return " AND ".join(where), params


def _order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order {order!r} is not valid: use 'desc' (most confident first), "
                         "'asc', 'near-cut' or 'balanced'")
    return ORDERS[order]


def queue_sql(project_id: int, *, order: str = "desc", reviewer: str | None = None,
              limit: int = 50, offset: int = 0, **filters) -> tuple[str, dict]:
    """The SQL and parameters of :func:`review_queue` (for EXPLAIN QUERY PLAN in tests)."""
    where, params = _where(project_id, **filters)
    free = ""
    if reviewer is not None:
        free = f" AND {_FREE}"
        params.update(now=now(), reviewer=reviewer)
    params.update(limit=int(limit), offset=int(offset))
    if order in RANKED_ORDERS:
        params["keep"] = NEAR_CUT_KEEP
        sql = (f"SELECT qa.* FROM qa JOIN ({_ranked(where)}) s ON s.id = qa.id WHERE 1{free}"
               f" ORDER BY {_ranked_order(order)} LIMIT :limit OFFSET :offset")
        return sql, params
    sql = f"SELECT * FROM qa WHERE {where}{free} ORDER BY {_order(order)} LIMIT :limit OFFSET :offset"
    return sql, params


def review_queue(db: sqlite_utils.Database, project_id: int, *, order: str = "desc",
                 category: str | None = None, question_type: str | None = None,
                 gen_run_id: int | None = None, min_conf: float | None = None,
                 max_conf: float | None = None, limit: int = 50, offset: int = 0,
                 reviewer: str | None = None, exclude_ids=(),
                 source: str | None = None) -> list[dict]:
    """A page of pending pseudo pairs, most confident first (``order='asc'``: least;
    'near-cut' and 'balanced': see RANKED_ORDERS).

    With ``reviewer``, pairs under a live claim of somebody else are left out. ``source``
    keeps the pairs of one source (qa.source: 'generator', or what an import named).
    """
    sql, params = queue_sql(project_id, order=order, reviewer=reviewer, limit=limit,
                            offset=offset, category=category, question_type=question_type,
                            gen_run_id=gen_run_id, min_conf=min_conf, max_conf=max_conf,
                            exclude_ids=exclude_ids, source=source)
    return list(db.query(sql, params))


def count_queue(db: sqlite_utils.Database, project_id: int, **filters) -> int:
    """How many pending pairs match the queue filters (category, min_conf, ...)."""
    where, params = _where(project_id, **filters)
    return db.execute(f"SELECT COUNT(*) FROM qa WHERE {where}", params).fetchone()[0]


def pending_sources(db: sqlite_utils.Database, project_id: int) -> list[str]:
    """The distinct sources (qa.source) of a project's pending pairs, sorted: the choices of
    the review queue's ``source`` filter (e.g. 'generator', 'vllm-72b' from an import)."""
    return [r["s"] for r in db.query(
        "SELECT DISTINCT source AS s FROM qa WHERE project_id = ? AND status = 'pending'"
        " AND source IS NOT NULL ORDER BY s", [project_id])]


def _until(ttl_seconds: float) -> str:
    until = datetime.now(timezone.utc) + timedelta(seconds=ttl_seconds)
    return until.isoformat(timespec="microseconds")


def claim_sql(project_id: int, reviewer: str, *, order: str = "desc",
              **queue_filters) -> tuple[str, str, dict]:
    """The two lookups of :func:`claim_next`: the reviewer's own live claim (through the
    ``qa_claims`` index) and the first free pair in queue order; plus their parameters."""
    where, params = _where(project_id, **queue_filters)
    params.update(now=now(), reviewer=reviewer)
    if order in RANKED_ORDERS:
        return _claim_ranked(where, params, order)
    order_by = _order(order)
    own = (f"SELECT id FROM qa WHERE {where} AND locked_by = :reviewer AND locked_until > :now"
           f" ORDER BY {order_by} LIMIT 1")
    free = f"SELECT id FROM qa WHERE {where} AND {_FREE} ORDER BY {order_by} LIMIT 1"
    return own, free, params


def _claim_ranked(where: str, params: dict, order: str) -> tuple[str, str, dict]:
    """claim_sql for RANKED_ORDERS: the reviewer's own claim (any), the first free pair."""
    params["keep"] = NEAR_CUT_KEEP
    own = (f"SELECT id FROM qa WHERE {where} AND locked_by = :reviewer AND locked_until > :now"
           " ORDER BY id LIMIT 1")
    free = (f"SELECT qa.id FROM qa JOIN ({_ranked(where)}) s ON s.id = qa.id WHERE {_FREE}"
            f" ORDER BY {_ranked_order(order)} LIMIT 1")
    return own, free, params


def claim_next(db: sqlite_utils.Database, project_id: int, reviewer: str, *,
               ttl_seconds: float = 300, order: str = "desc", **queue_filters) -> dict | None:
    """Claim the next pending pair for ``reviewer`` for ``ttl_seconds``; None if none is free.

    The reviewer's own live claim comes back first (so a reload resumes it), else the first
    pair in queue order that is unclaimed or whose claim expired. Runs under the write lock,
    so two reviewers never get the same pair at once. ``exclude_ids`` skips pairs.
    """
    if not reviewer:
        raise ValueError("reviewer is empty; sign in first")
    with transaction(db):
        own_sql, free_sql, params = claim_sql(project_id, reviewer, order=order, **queue_filters)
        found = row(db, own_sql, params) or row(db, free_sql, params)
        if found is None:
            return None
        db.execute("UPDATE qa SET locked_by = ?, locked_until = ? WHERE id = ?",
                   [reviewer, _until(ttl_seconds), found["id"]])
        return row(db, "SELECT * FROM qa WHERE id = ?", [found["id"]])


def release_claim(db: sqlite_utils.Database, qa_id: int, reviewer: str) -> bool:
    """Give back ``reviewer``'s claim on a pair (skip); False if they did not hold it."""
    with transaction(db):
        cur = db.execute("UPDATE qa SET locked_by = NULL, locked_until = NULL"
                         " WHERE id = ? AND locked_by = ?", [qa_id, reviewer])
        return cur.rowcount > 0


def bulk_accept(db: sqlite_utils.Database, project_id: int, *, min_conf: float,
                user: str | None, **queue_filters) -> int:
    """Accept every pending pair with confidence >= ``min_conf`` (and the queue filters),
    skipping pairs under a live claim of somebody else; returns how many.

    One transaction; one 'qa.bulk_accept' event per pair (before/after status and version),
    so each row's history stays complete. undo_last reverts the whole batch as one step.
    """
    min_conf = float(min_conf)
    if not 0.0 <= min_conf <= 1.0:
        raise ValueError(f"min_conf {min_conf} is not a probability; give a number in [0, 1]")
    queue_filters["min_conf"] = max(min_conf, queue_filters.get("min_conf") or 0.0)
    with transaction(db):
        where, params = _where(project_id, **queue_filters)
        ts = now()
        params.update(now=ts, reviewer=user)
        rows = list(db.query(f"SELECT id, question, answer, version FROM qa"
                             f" WHERE {where} AND {_FREE}", params))
        db.conn.executemany(
            "UPDATE qa SET status = 'accepted', reviewed_by = ?, reviewed_at = ?, locked_by = NULL,"
            " locked_until = NULL, version = version + 1, updated_at = ? WHERE id = ?",
            [(user, ts, ts, r["id"]) for r in rows])
        db.conn.executemany(
            "INSERT INTO events (ts, user, action, entity, entity_id, project_id, before, after)"
            " VALUES (?, ?, 'qa.bulk_accept', 'qa', ?, ?, ?, ?)",
            [(ts, user, r["id"], project_id, _state(r, "pending", 0),
              _state(r, "accepted", 1, min_conf=min_conf)) for r in rows])
    return len(rows)


def _state(r: dict, status: str, bump: int, **extra) -> str:
    return to_json({"question": r["question"], "answer": r["answer"], "status": status,
                    "version": r["version"] + bump, **extra})
