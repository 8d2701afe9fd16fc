"""Undo of a bulk accept as one step, and the review page's quick counts.

Import these from ``leaml.store.qa``. A bulk accept writes one 'qa.bulk_accept' event per
pair, all with the same timestamp and user (one transaction): that (user, project, ts) is
the batch, so batches written before this module existed undo the same way.
"""
from __future__ import annotations

import sqlite_utils

from leaml.store.db import now, to_json

_NOT_UNDONE = """e.id NOT IN (SELECT json_extract(after, '$.undo_of') FROM events
                   WHERE action = 'qa.undo' AND project_id = :p AND user IS :u
                     AND json_extract(after, '$.undo_of') IS NOT NULL)"""


def last_decision_sql(actions: tuple[str, ...]) -> str:
    """The latest not-yet-undone decision event of user :u in project :p on a pseudo pair
    (seed and test pairs are never changed by review, so never by its undo either)."""
    return f"""
        SELECT e.* FROM events e JOIN qa ON qa.id = e.entity_id
        WHERE e.entity = 'qa' AND e.project_id = :p AND e.user IS :u
          AND qa.origin = 'pseudo'
          AND e.action IN ({', '.join(repr(a) for a in actions)})
          AND {_NOT_UNDONE}
        ORDER BY e.id DESC LIMIT 1"""


def undo_bulk(db: sqlite_utils.Database, ev: dict, user: str | None) -> dict:
    """Put the pairs of the bulk accept ``ev`` belongs to back to 'pending' (run inside the
    caller's transaction). A pair changed since (decided again, edited) is left as it is.

    Returns ``{"id": first pair id, "bulk": True, "restored": n, "kept": m}``. Every pair
    of the batch gets a 'qa.undo' event (``after.undo_of``), so its history stays complete
    and the batch is one step: a kept pair's event says ``kept`` and changes nothing.
    """
    params = {"p": ev["project_id"], "u": user, "ts": ev["ts"]}
    batch = list(db.query(f"""
        SELECT e.id AS event_id, qa.id, qa.question, qa.answer, qa.status, qa.version,
               json_extract(e.after, '$.version') AS after_version
        FROM events e JOIN qa ON qa.id = e.entity_id
        WHERE e.entity = 'qa' AND e.project_id = :p AND e.user IS :u AND e.ts = :ts
          AND e.action = 'qa.bulk_accept' AND {_NOT_UNDONE}
        ORDER BY qa.id""", params))
    # only pairs still exactly as the bulk accept left them go back
    todo = [r for r in batch if r["status"] == "accepted" and r["version"] == r["after_version"]]
    kept = [r for r in batch if r not in todo]
    ts = now()
    db.conn.executemany(
        "UPDATE qa SET status = 'pending', reviewed_by = NULL, reviewed_at = NULL,"
        " version = version + 1, updated_at = ? WHERE id = ? AND version = ?",
        [(ts, r["id"], r["version"]) for r in todo])
    db.conn.executemany(
        "INSERT INTO events (ts, user, action, entity, entity_id, project_id, before, after)"
        " VALUES (?, ?, 'qa.undo', 'qa', ?, ?, ?, ?)",
        [(ts, user, r["id"], ev["project_id"], _state(r, "accepted", 0),
          _state(r, "pending", 1, undo_of=r["event_id"])) for r in todo]
        + [(ts, user, r["id"], ev["project_id"], _state(r, r["status"], 0),
            _state(r, r["status"], 0, undo_of=r["event_id"], kept="changed since the bulk accept"))
           for r in kept])
    return {"id": todo[0]["id"] if todo else ev["entity_id"], "bulk": True,
            "restored": len(todo), "kept": len(kept)}


def _state(r: dict, status: str, bump: int, **extra) -> str:
    return to_json({"question": r["question"], "answer": r["answer"], "status": status,
                    "version": r["version"] + bump, **extra})


def decisions_by(db: sqlite_utils.Database, project_id: int, reviewer: str) -> int:
    """How many pseudo pairs of the project ``reviewer`` decided (accepted, rejected or
    edited, as they stand now; an undone decision no longer counts)."""
    return db.execute(
        "SELECT COUNT(*) FROM qa WHERE project_id = ? AND origin = 'pseudo'"
        " AND reviewed_by = ? AND status IN ('accepted', 'rejected', 'edited')",
        [project_id, reviewer]).fetchone()[0]
