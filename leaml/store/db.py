"""Connection, transactions, errors and the audit log: the base of every store module.

One SQLite file per data home (``<home>/leaml.db``), WAL journal, a busy timeout and
foreign keys on. Connections are cheap: open one per thread or process with
:func:`connect` and never share it across threads. Writes that belong together run in
:func:`transaction`, which takes the write lock up front (``BEGIN IMMEDIATE``) so two
writers queue instead of failing half way.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from leaml.store.migrations import migrate

DB_NAME = "leaml.db"
BUSY_TIMEOUT_MS = 30_000


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class NotFoundError(StoreError, LookupError):
    """A project, image, QA pair, job or run that does not exist."""


class ConflictError(StoreError):
    """An update named a stale version, or an item claimed by somebody else."""


def home_dir(home: str | os.PathLike | None = None) -> Path:
    """The data home: ``home`` if given, else ``$LEAML_HOME``, else ``./data``; created if missing."""
    path = Path(home or os.environ.get("LEAML_HOME") or "data").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def connect(home: str | os.PathLike | None = None) -> sqlite_utils.Database:
    """Open (and migrate) the database of a data home; the result belongs to this thread."""
    path = home_dir(home) / DB_NAME
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    db = sqlite_utils.Database(conn)
    db.home = path.parent  # type: ignore[attr-defined]  # where images and models live
    migrate(db)
    return db


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """All-or-nothing block of writes; nests as a savepoint inside an open transaction."""
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


def now() -> str:
    """UTC timestamp as ISO 8601 text with microseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def log_event(db: sqlite_utils.Database, *, user: str | None, action: str, entity: str,
              entity_id: int | None, project_id: int | None = None,
              before: Any = None, after: Any = None) -> None:
    """Append one row to the audit log (the events table is never updated or deleted)."""
    db.execute(
        "INSERT INTO events (ts, user, action, entity, entity_id, project_id, before, after)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [now(), user, action, entity, entity_id, project_id, to_json(before), to_json(after)],
    )


def row(db: sqlite_utils.Database, sql: str, params: Any = ()) -> dict | None:
    """First row of a query as a dict, or None."""
    return next(iter(db.query(sql, params)), None)
