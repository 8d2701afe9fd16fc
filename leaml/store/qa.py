"""QA pairs: create, review (accept / reject / edit / undo), versions and the audit trail.

Every change to a row runs in one transaction with its event (who, when, action, before,
after). Updates name the version they read (``expected_version``); a stale one raises
:class:`ConflictError` and changes nothing. A pair claimed by another reviewer (see
:func:`claim_next`) cannot be reviewed until the claim is released or expires.

The review queue, claims and bulk accept live in ``qa_queue``; read-only summaries
(training pairs, calibration, ...) in ``qa_stats``; both are re-exported here, so callers
only ever import ``leaml.store.qa``.
"""
from __future__ import annotations

import json
import math
import sqlite3
from datetime import datetime, timedelta, timezone

import sqlite_utils

from leaml.store.db import (ConflictError, NotFoundError, StoreError, log_event, now, row,
                            transaction)
from leaml.store.qa_queue import (bulk_accept, claim_next, count_queue, pending_sources,
                                  release_claim, review_queue)
from leaml.store.qa_stats import (calibration, image_vocabulary, reviewer_stats, test_pairs,
                                  training_pairs)
from leaml.store.qa_undo import decisions_by, last_decision_sql, undo_bulk
from leaml.store.text import clean_text, optional_text

ORIGINS = ("seed", "pseudo", "test")
STATUSES = ("labeled", "pending", "accepted", "rejected", "edited")
STATUS_BY_ORIGIN = {"seed": ("labeled",), "test": ("labeled",),
                    "pseudo": ("pending", "accepted", "rejected", "edited")}
EDITABLE = ("question", "answer", "status", "category", "question_type", "confidence")
DECISIONS = ("qa.accept", "qa.reject", "qa.edit")
UNDOABLE = (*DECISIONS, "qa.bulk_accept")  # what undo_last reverts (bulk: as one step)
_INSERT_COLS = ("project_id", "image_id", "question", "answer", "origin", "status",
                "confidence", "question_type", "category", "gen_run_id", "source",
                "created_by", "created_at", "updated_at")
_INSERT = (f"INSERT INTO qa ({', '.join(_INSERT_COLS)})"
           f" VALUES ({', '.join('?' * len(_INSERT_COLS))})")

__all__ = ["ORIGINS", "STATUSES", "add_qa", "add_qa_many", "get_qa", "update_qa", "accept",
           "reject", "edit", "undo_last", "delete_qa", "list_qa", "review_queue", "claim_next",
           "release_claim", "count_queue", "bulk_accept", "pending_sources", "training_pairs",
           "test_pairs", "reviewer_stats", "calibration", "image_vocabulary", "decisions_by"]


# --- validation -----------------------------------------------------------------------------

def _text(value, field: str, where: str) -> str:
    """Question or answer text by leaml.store.text's rules (not blank, no control characters,
    at most 10,000 characters): imports, seed labeling and review edits alike."""
    return clean_text("" if value is None else value, field, where)


def _optional(value, field: str = "text", where: str = "") -> str | None:
    return optional_text(value, field, where)


def _confidence(value, where: str) -> float | None:
    if value is None:
        return None
    try:
        conf = float(value)
    except (TypeError, ValueError):
        conf = math.nan
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"{where}confidence {value!r} is not a probability; give a number in [0, 1]")
    return conf


def _status(origin: str, status: str | None, where: str) -> str:
    if origin not in ORIGINS:
        raise ValueError(f"{where}origin {origin!r} is not valid: use one of {', '.join(ORIGINS)}")
    allowed = STATUS_BY_ORIGIN[origin]
    status = status or allowed[0]
    if status not in allowed:
        raise ValueError(f"{where}status {status!r} is not valid for a {origin} pair: "
                         f"use one of {', '.join(allowed)}")
    return status


def _prepare(r: dict, where: str = "") -> dict:
    """Validated column values of one new pair (timestamps and creator added later)."""
    for key in ("project_id", "image_id"):
        if not isinstance(r.get(key), int):
            raise ValueError(f"{where}{key} is missing or not an integer id")
    return {"project_id": r["project_id"], "image_id": r["image_id"],
            "question": _text(r.get("question"), "question", where),
            "answer": _text(r.get("answer"), "answer", where),
            "origin": r.get("origin"), "status": _status(r.get("origin"), r.get("status"), where),
            "confidence": _confidence(r.get("confidence"), where),
            "question_type": _optional(r.get("question_type")),
            "category": _optional(r.get("category")),
            "gen_run_id": r.get("gen_run_id"), "source": _optional(r.get("source"))}


def _check_images(db: sqlite_utils.Database, prepared: list[dict]) -> None:
    """Every image exists in the pair's project; a pair without category takes the image's."""
    ids = sorted({p["image_id"] for p in prepared})
    images = {r["id"]: r for r in db.query(
        "SELECT id, project_id, category FROM images WHERE id IN (SELECT value FROM json_each(?))",
        [json.dumps(ids)])}
    for i, p in enumerate(prepared):
        where = f"row {i}: " if len(prepared) > 1 else ""
        image = images.get(p["image_id"])
        if image is None:
            raise NotFoundError(f"{where}unknown image {p['image_id']}; add the image first")
        if image["project_id"] != p["project_id"]:
            raise ValueError(f"{where}image {p['image_id']} belongs to project "
                             f"{image['project_id']}, not {p['project_id']}")
        if p["category"] is None:
            p["category"] = image["category"]


# --- create ---------------------------------------------------------------------------------

def _existing_labeled(db, p: dict) -> int | None:
    if p["origin"] == "pseudo":
        return None
    found = row(db, "SELECT id FROM qa WHERE image_id = ? AND origin = ? AND question = ?"
                " AND answer = ?", [p["image_id"], p["origin"], p["question"], p["answer"]])
    return found["id"] if found else None


def _values(p: dict, user: str | None, ts: str) -> list:
    return [*(p[c] for c in _INSERT_COLS[:11]), user, ts, ts]


def add_qa(db: sqlite_utils.Database, *, project_id: int, image_id: int, question: str,
           answer: str, origin: str, status: str | None = None, confidence: float | None = None,
           question_type: str | None = None, category: str | None = None,
           gen_run_id: int | None = None, source: str | None = None,
           user: str | None = None) -> int:
    """Add one QA pair and its 'qa.create' event; returns its id.

    Text is stripped and must not be blank (ValueError names the field). Status defaults to
    'labeled' for seed/test and 'pending' for pseudo; category defaults to the image's. A
    seed/test pair identical to an existing one (image, origin, question, answer) returns the
    existing id and adds nothing.
    """
    p = _prepare(dict(project_id=project_id, image_id=image_id, question=question, answer=answer,
                      origin=origin, status=status, confidence=confidence, source=source,
                      question_type=question_type, category=category, gen_run_id=gen_run_id))
    with transaction(db):
        _check_images(db, [p])
        existing = _existing_labeled(db, p)
        if existing is not None:
            return existing
        qa_id = db.execute(_INSERT, _values(p, user, now())).lastrowid
        log_event(db, user=user, action="qa.create", entity="qa", entity_id=qa_id,
                  project_id=project_id, after=get_qa(db, qa_id))
    return qa_id


def add_qa_many(db: sqlite_utils.Database, rows: list[dict], *, user: str | None = None,
                action: str = "qa.bulk_create") -> list[int]:
    """Add many pairs (dicts with add_qa's keyword names) in one transaction; returns their
    ids in input order.

    Everything is validated before anything is written (ValueError names the row). New pairs
    go in with one executemany; a seed/test pair already stored (or repeated in the batch)
    maps to the existing id. One summary event per project in the batch (``after``: count,
    first_id, last_id, duplicates, origins).
    """
    prepared = [_prepare(r, f"row {i}: ") for i, r in enumerate(rows)]
    ids: list = [None] * len(prepared)
    with transaction(db):
        _check_images(db, prepared)
        known = _labeled_ids(db, prepared)
        first: dict[tuple, int] = {}   # labeled key -> index of its first row in this batch
        new, repeats = [], {}
        for i, p in enumerate(prepared):
            key = None if p["origin"] == "pseudo" else _key(p)
            if key in known:
                ids[i] = known[key]
            elif key in first:
                repeats[i] = first[key]
            else:
                if key:
                    first[key] = i
                new.append(i)
        _insert_contiguous(db, prepared, new, ids, user, now())
        for i, j in repeats.items():
            ids[i] = ids[j]
        _log_batch(db, prepared, ids, set(new), user=user, action=action)
    return ids


def _key(p: dict) -> tuple:
    return (p["image_id"], p["origin"], p["question"], p["answer"])


def _labeled_ids(db, prepared: list[dict]) -> dict[tuple, int]:
    """Stored seed/test pairs on the batch's images, by (image, origin, question, answer)."""
    images = sorted({p["image_id"] for p in prepared if p["origin"] != "pseudo"})
    if not images:
        return {}
    return {_key(r): r["id"] for r in db.query(
        "SELECT id, image_id, origin, question, answer FROM qa WHERE origin IN ('seed', 'test')"
        " AND image_id IN (SELECT value FROM json_each(?))", [json.dumps(images)])}


def _insert_contiguous(db, prepared: list[dict], todo: list[int], ids: list, user,
                       ts: str) -> None:
    """executemany rows ``todo``; under the write lock their rowids are max+1 .. max+n."""
    if not todo:
        return
    start = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM qa").fetchone()[0]
    db.conn.executemany(_INSERT, (_values(prepared[i], user, ts) for i in todo))
    last = db.execute("SELECT MAX(id) FROM qa").fetchone()[0]
    if last != start + len(todo) - 1:
        raise StoreError(f"bulk insert got ids {start}..{last} for {len(todo)} rows; nothing saved")
    for offset, i in enumerate(todo):
        ids[i] = start + offset


def _log_batch(db, prepared: list[dict], ids: list, created: set, *, user, action) -> None:
    for project_id in sorted({p["project_id"] for p in prepared}):
        mine = [i for i, p in enumerate(prepared) if p["project_id"] == project_id]
        new = sorted(ids[i] for i in mine if i in created)
        origins: dict[str, int] = {}
        for i in mine:
            origins[prepared[i]["origin"]] = origins.get(prepared[i]["origin"], 0) + 1
        log_event(db, user=user, action=action, entity="qa", entity_id=None,
                  project_id=project_id,
                  after={"count": len(new), "duplicates": len(mine) - len(new),
                         "first_id": new[0] if new else None, "last_id": new[-1] if new else None,
                         "origins": origins})


# --- read -----------------------------------------------------------------------------------

def get_qa(db: sqlite_utils.Database, qa_id: int) -> dict:
    """The QA row; NotFoundError if it does not exist (any more)."""
    found = row(db, "SELECT * FROM qa WHERE id = ?", [qa_id])
    if found is None:
        raise NotFoundError(f"unknown QA pair {qa_id}; it may have been deleted: reload the list")
    return found


def list_qa(db: sqlite_utils.Database, project_id: int, *, origin: str | None = None,
            status: str | None = None, image_id: int | None = None, limit: int | None = None,
            offset: int = 0) -> list[dict]:
    """QA rows of a project by id, optionally of one origin, status or image."""
    where, params = ["project_id = ?"], [project_id]
    for column, value in (("origin", origin), ("status", status), ("image_id", image_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = f"SELECT * FROM qa WHERE {' AND '.join(where)} ORDER BY id LIMIT ? OFFSET ?"
    return list(db.query(sql, [*params, -1 if limit is None else limit, offset]))


# --- update ---------------------------------------------------------------------------------

def _last_change(db, qa_id: int, fallback: dict) -> tuple[str, str]:
    ev = row(db, "SELECT user, ts FROM events WHERE entity = 'qa' AND entity_id = ?"
             " ORDER BY id DESC LIMIT 1", [qa_id])
    return (ev["user"] or "somebody", ev["ts"]) if ev else ("somebody", fallback["updated_at"])


def _guard(db, before: dict, expected_version: int, user: str | None) -> None:
    """ConflictError on a stale version or a live claim held by somebody else."""
    if before["version"] != expected_version:
        who, when = _last_change(db, before["id"], before)
        raise ConflictError(f"QA {before['id']} was changed by {who} at {when} (version "
                            f"{before['version']}, you had {expected_version}); reload and try again")
    if before["locked_by"] not in (None, user) and (before["locked_until"] or "") > now():
        raise ConflictError(f"QA {before['id']} is being reviewed by {before['locked_by']} until "
                            f"{before['locked_until']}; pick another pair or try again later")


def _audit(r: dict, keys) -> dict:
    return {k: r[k] for k in ("question", "answer", "status", *keys, "version")}


def _update(db, qa_id: int, expected_version: int, user: str | None, action: str,
            changes: dict, *, review: bool = False, check=None, note: dict | None = None) -> dict:
    """Apply ``changes`` if the version matches; one event with before/after; returns the row."""
    with transaction(db):
        before = get_qa(db, qa_id)
        _guard(db, before, expected_version, user)
        if check:
            check(before)
        values, ts = dict(changes), now()
        if review:
            values.update(reviewed_by=user, reviewed_at=ts, locked_by=None, locked_until=None)
        sets = "".join(f"{k} = ?, " for k in values)
        try:
            cur = db.execute(f"UPDATE qa SET {sets}version = version + 1, updated_at = ?"
                             " WHERE id = ? AND version = ?",
                             [*values.values(), ts, qa_id, expected_version])
        except sqlite3.IntegrityError:
            raise ValueError(f"QA {qa_id}: image {before['image_id']} already has this "
                             f"{before['origin']} pair; change the text or delete one") from None
        if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; never log a lost write
            raise ConflictError(f"QA {qa_id} changed while saving; reload and try again")
        after = get_qa(db, qa_id)
        log_event(db, user=user, action=action, entity="qa", entity_id=qa_id,
                  project_id=before["project_id"], before=_audit(before, changes),
                  after={**_audit(after, changes), **(note or {})})
    return after


def update_qa(db: sqlite_utils.Database, qa_id: int, *, expected_version: int, user: str | None,
              action: str = "qa.edit", **changes) -> dict:
    """Change fields of a pair (question, answer, status, category, question_type, confidence).

    Raises ConflictError if the stored version is not ``expected_version`` (nothing changes);
    bumps the version and updated_at; audited with before/after. Returns the new row.
    """
    bad = sorted(set(changes) - set(EDITABLE))
    if bad or not changes:
        raise ValueError(f"cannot change {', '.join(bad) or 'nothing'} of a QA pair: "
                         f"give one or more of {', '.join(EDITABLE)}")
    for field in ("question", "answer"):
        if field in changes:
            changes[field] = _text(changes[field], field, f"QA {qa_id}: ")
    for field in ("category", "question_type"):
        if field in changes:
            changes[field] = _optional(changes[field])
    if "confidence" in changes:
        changes["confidence"] = _confidence(changes["confidence"], f"QA {qa_id}: ")

    def check(before):
        if "status" in changes:
            _status(before["origin"], changes["status"], f"QA {qa_id}: ")
    return _update(db, qa_id, expected_version, user, action, changes, check=check)


def _pseudo_only(before: dict, status: str) -> None:
    """Review decisions change pseudo pairs only: seed and test pairs are ground truth (the
    test pairs score every run) and change only through seed labeling (update_qa)."""
    if before["origin"] != "pseudo":
        raise ValueError(f"QA {before['id']} is a {before['origin']} pair; only pseudo pairs are "
                         f"{status} in review (change seed and test pairs on the Seed "
                         "labeling page, which needs the 'label' permission)")


def _decide(db, qa_id: int, status: str, expected_version: int, user: str | None) -> dict:
    def check(before):
        _pseudo_only(before, status)
    action = "qa.accept" if status == "accepted" else "qa.reject"
    return _update(db, qa_id, expected_version, user, action, {"status": status},
                   review=True, check=check)


def accept(db: sqlite_utils.Database, qa_id: int, *, expected_version: int,
           user: str | None) -> dict:
    """Accept a pseudo pair as it is (reviewed_by/at set, claim released); ValueError on seed/test."""
    return _decide(db, qa_id, "accepted", expected_version, user)


def reject(db: sqlite_utils.Database, qa_id: int, *, expected_version: int,
           user: str | None) -> dict:
    """Reject a pseudo pair: it will never train anything; ValueError on seed/test."""
    return _decide(db, qa_id, "rejected", expected_version, user)


def edit(db: sqlite_utils.Database, qa_id: int, *, expected_version: int, user: str | None,
         question: str | None = None, answer: str | None = None) -> dict:
    """Correct the text of a pseudo pair, which becomes 'edited'; ValueError on a seed or
    test pair (those change through :func:`update_qa`, from seed labeling)."""
    changes = {k: _text(v, k, f"QA {qa_id}: ") for k, v in
               (("question", question), ("answer", answer)) if v is not None}
    if not changes:
        raise ValueError(f"QA {qa_id}: nothing to edit; give a new question and/or answer")

    def check(before):
        _pseudo_only(before, "edited")
        changes["status"] = "edited"
    return _update(db, qa_id, expected_version, user, "qa.edit", changes, review=True,
                   check=check)


def undo_last(db: sqlite_utils.Database, *, user: str | None, project_id: int,
              reclaim_seconds: int = 300) -> dict | None:
    """Revert ``user``'s latest not-yet-undone accept/reject/edit in the project.

    Question, answer and status go back to the event's 'before' (a pair back to 'pending' is
    claimed for ``user`` again, so it comes up next). ConflictError if somebody changed the
    pair since. Audited as 'qa.undo' (``after.undo_of`` = the reverted event). None if there
    is nothing to undo. A bulk accept is one step: all its pairs go back to 'pending' at
    once, and the result is ``{"id", "bulk": True, "restored": n, "kept": m}``
    (:func:`leaml.store.qa_undo.undo_bulk`). Seed and test pairs are never touched.
    """
    with transaction(db):
        ev = row(db, last_decision_sql(UNDOABLE), {"p": project_id, "u": user})
        if ev is None:
            return None
        if ev["action"] == "qa.bulk_accept":
            return undo_bulk(db, ev, user)
        before, after = json.loads(ev["before"]), json.loads(ev["after"])
        current = get_qa(db, ev["entity_id"])
        if any(current[k] != after[k] for k in ("question", "answer", "status")):
            who, when = _last_change(db, current["id"], current)
            raise ConflictError(f"QA {current['id']} was changed by {who} at {when} after your "
                                f"{ev['action'].split('.')[1]}; nothing undone, review it again")
        changes = {k: before[k] for k in ("question", "answer", "status")}
        if changes["status"] == "pending":
            until = datetime.now(timezone.utc) + timedelta(seconds=reclaim_seconds)
            changes.update(reviewed_by=None, reviewed_at=None, locked_by=user,
                           locked_until=until.isoformat(timespec="microseconds"))
        return _update(db, current["id"], current["version"], user, "qa.undo", changes,
                       note={"undo_of": ev["id"]})


def delete_qa(db: sqlite_utils.Database, qa_id: int, *, expected_version: int,
              user: str | None) -> None:
    """Delete a pair if ``expected_version`` is current; audited with the full row as before."""
    with transaction(db):
        before = get_qa(db, qa_id)
        _guard(db, before, expected_version, user)
        db.execute("DELETE FROM qa WHERE id = ? AND version = ?", [qa_id, expected_version])
        log_event(db, user=user, action="qa.delete", entity="qa", entity_id=qa_id,
                  project_id=before["project_id"], before=before)
