"""Sign-in sessions and the sign-in throttle.

A session is a random token the browser keeps in a cookie; the database holds only its
sha256, so a copy of the database opens no session. A session ends after
:data:`IDLE_SECONDS` without any action, on sign-out, and when its user's password, role
or ``disabled`` flag changes (:func:`revoke_user`, called by the users store in the same
transaction as the change).

The throttle counts wrong passwords per typed account name (known or not, so it tells
nobody which names exist): after :data:`FREE_FAILURES` in a row, each further attempt for
that name waits 1, 2, 4 ... seconds, at most :data:`MAX_LOCK_SECONDS`. It lives in the
database, so restarts and several app processes share it; a right password resets it.
"""
from __future__ import annotations

import hashlib
import math
import secrets
from datetime import datetime, timedelta, timezone

import sqlite_utils

from leaml.store.db import StoreError, now, row, transaction

IDLE_SECONDS = 12 * 3600        # a session unused this long is over
TOUCH_SECONDS = 60              # last_seen_at is refreshed at most this often (one write)
FREE_FAILURES = 5               # wrong passwords in a row before the throttle starts
MAX_LOCK_SECONDS = 15 * 60
TOKEN_BYTES = 32


class SignInThrottled(StoreError):
    """Too many wrong passwords in a row for one account name; try again later."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(
        timespec="microseconds")


# --- sessions -------------------------------------------------------------------------------

def create(db: sqlite_utils.Database, user_id: int) -> str:
    """A new session for ``user_id``; returns the token (only its hash is stored)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    stamp = now()
    with transaction(db):
        # sessions over their idle time are dead anyway: drop them while writing
        db.execute("DELETE FROM sessions WHERE last_seen_at < ?", [_ago(IDLE_SECONDS)])
        db.execute("INSERT INTO sessions (token_hash, user_id, created_at, last_seen_at)"
                   " VALUES (?, ?, ?, ?)", [_hash(token), user_id, stamp, stamp])
    return token


def user_id_of(db: sqlite_utils.Database, token: str | None) -> int | None:
    """The user id of a live session ``token``, else None (unknown, revoked or idle too long).

    Refreshes the session's last use at most once a :data:`TOUCH_SECONDS`, so a page that
    reruns on every key press does not write on every key press.
    """
    if not token or not isinstance(token, str):
        return None
    found = row(db, "SELECT id, user_id, last_seen_at FROM sessions WHERE token_hash = ?",
                [_hash(token)])
    if found is None or found["last_seen_at"] < _ago(IDLE_SECONDS):
        return None
    if found["last_seen_at"] < _ago(TOUCH_SECONDS):
        db.execute("UPDATE sessions SET last_seen_at = ? WHERE id = ?", [now(), found["id"]])
    return found["user_id"]


def revoke(db: sqlite_utils.Database, token: str | None) -> None:
    """End the session ``token`` (sign-out); nothing happens for an unknown token."""
    if token:
        db.execute("DELETE FROM sessions WHERE token_hash = ?", [_hash(token)])


def revoke_user(db: sqlite_utils.Database, user_id: int) -> int:
    """End every session of ``user_id``; returns how many there were."""
    return db.execute("DELETE FROM sessions WHERE user_id = ?", [user_id]).rowcount


def count_live(db: sqlite_utils.Database, user_id: int) -> int:
    """How many sessions of ``user_id`` are still live (for the Users page and tests)."""
    return db.execute("SELECT COUNT(*) FROM sessions WHERE user_id = ? AND last_seen_at >= ?",
                      [user_id, _ago(IDLE_SECONDS)]).fetchone()[0]


# --- the sign-in throttle -------------------------------------------------------------------

def check_throttle(db: sqlite_utils.Database, name: str) -> None:
    """Raise SignInThrottled while ``name`` is locked after too many wrong passwords."""
    found = row(db, "SELECT locked_until FROM sign_in_failures WHERE name = ?", [name])
    if not found or not found["locked_until"]:
        return
    wait = (datetime.fromisoformat(found["locked_until"]) -
            datetime.now(timezone.utc)).total_seconds()
    if wait > 0:
        raise SignInThrottled(f"too many failed sign-ins for '{name}'; try again in "
                              f"{math.ceil(wait)} s")


def record_failure(db: sqlite_utils.Database, name: str) -> int:
    """Count one more wrong password for ``name`` and lock it from the fifth on (1, 2, 4 ...
    s, at most :data:`MAX_LOCK_SECONDS`); returns the failures in a row."""
    with transaction(db):
        db.execute("INSERT INTO sign_in_failures (name, failures) VALUES (?, 1)"
                   " ON CONFLICT (name) DO UPDATE SET failures = failures + 1", [name])
        failures = row(db, "SELECT failures FROM sign_in_failures WHERE name = ?",
                       [name])["failures"]
        if failures >= FREE_FAILURES:
            lock = min(2.0 ** min(failures - FREE_FAILURES, 20), MAX_LOCK_SECONDS)
            until = (datetime.now(timezone.utc) + timedelta(seconds=lock)).isoformat(
                timespec="microseconds")
            db.execute("UPDATE sign_in_failures SET locked_until = ? WHERE name = ?",
                       [until, name])
    return failures


def reset_failures(db: sqlite_utils.Database, name: str) -> None:
    """Forget the wrong passwords of ``name`` (after a right one); no write when none."""
    if row(db, "SELECT 1 FROM sign_in_failures WHERE name = ?", [name]):
        db.execute("DELETE FROM sign_in_failures WHERE name = ?", [name])
