"""User accounts: name, role, scrypt password hash. Rows returned never hold the hash.

Every change is audited in ``events`` (entity 'user') without any password material.
"""
from __future__ import annotations

import functools
import re

import sqlite_utils

from leaml import auth
from leaml.store import logins
from leaml.store.db import NotFoundError, log_event, now, row, transaction

ROLES = auth.ROLES
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_PUBLIC = "id, name, role, created_at, disabled"


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the name is unknown, so a miss costs as long as a hit."""
    return auth.hash_password("not-a-real-password")


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"user name {name!r} is not valid: use 1-64 letters, digits, "
                         "'.', '_', '-' or '@', starting with a letter or digit")
    return name


def _public(db: sqlite_utils.Database, name: str) -> dict:
    found = row(db, f"SELECT {_PUBLIC} FROM users WHERE name = ?", [name])
    if found is None:
        known = ", ".join(r["name"] for r in db.query("SELECT name FROM users ORDER BY name"))
        raise NotFoundError(f"unknown user '{name}' (known: {known or 'none'}); "
                            f"add it with `python -m leaml users add {name} --role ROLE`")
    return found


def get_user(db: sqlite_utils.Database, name: str) -> dict:
    """The user ``name`` (id, name, role, created_at, disabled); NotFoundError if unknown."""
    return _public(db, name)


def add_user(db: sqlite_utils.Database, name: str, password: str, role: str, *,
             by: str | None = None) -> dict:
    """Create a user with a hashed password; ValueError on a bad name, role, short password
    or a name already taken."""
    _validate_name(name)
    auth.validate_role(role)
    pw_hash = auth.hash_password(auth.validate_password(password))
    with transaction(db):
        _insert(db, name, role, pw_hash, by)
    return _public(db, name)


def add_first_admin(db: sqlite_utils.Database, name: str, password: str) -> dict:
    """Create ``name`` as admin only if no account exists yet; PermissionError otherwise.

    The "no users yet" check and the insert share one write transaction (BEGIN IMMEDIATE),
    so of two processes racing to create the first admin exactly one wins.
    """
    _validate_name(name)
    pw_hash = auth.hash_password(auth.validate_password(password))  # slow: outside the lock
    with transaction(db):
        if db.execute("SELECT COUNT(*) FROM users").fetchone()[0]:
            raise PermissionError("an admin account already exists (created just now, or "
                                  "earlier); sign in, or ask that admin for an account")
        _insert(db, name, "admin", pw_hash, name)
    return _public(db, name)


def _insert(db: sqlite_utils.Database, name: str, role: str, pw_hash: str,
            by: str | None) -> None:
    """Insert one account; the caller holds the write transaction."""
    if row(db, "SELECT 1 FROM users WHERE name = ?", [name]):
        raise ValueError(f"user '{name}' already exists; pick another name, or change "
                         f"it with `python -m leaml users set-role {name} ROLE`")
    cur = db.execute("INSERT INTO users (name, role, pw_hash, created_at) VALUES (?, ?, ?, ?)",
                     [name, role, pw_hash, now()])
    log_event(db, user=by, action="user.create", entity="user", entity_id=cur.lastrowid,
              after={"name": name, "role": role})


def verify_password(db: sqlite_utils.Database, name: str, password: str) -> dict | None:
    """The user if ``password`` is right and the account is enabled, else None."""
    found = row(db, "SELECT pw_hash, disabled FROM users WHERE name = ?", [name])
    ok = auth.check_password(password or "", found["pw_hash"] if found else _dummy_hash())
    if not (found and ok) or found["disabled"]:
        return None
    return _public(db, name)


def set_role(db: sqlite_utils.Database, name: str, role: str, *, by: str | None = None) -> dict:
    """Change the role of ``name`` and end its open sessions; audited with the old and
    new role."""
    auth.validate_role(role)
    with transaction(db):
        before = _public(db, name)
        db.execute("UPDATE users SET role = ? WHERE name = ?", [role, name])
        if role != before["role"]:  # rights change: every open session signs in again
            logins.revoke_user(db, before["id"])
        log_event(db, user=by, action="user.role", entity="user", entity_id=before["id"],
                  before={"role": before["role"]}, after={"role": role})
    return _public(db, name)


def set_password(db: sqlite_utils.Database, name: str, password: str, *,
                 by: str | None = None) -> dict:
    """Replace the password of ``name`` (new random salt) and end its open sessions;
    audited without the password."""
    pw_hash = auth.hash_password(auth.validate_password(password))
    with transaction(db):
        user = _public(db, name)
        db.execute("UPDATE users SET pw_hash = ? WHERE name = ?", [pw_hash, name])
        logins.revoke_user(db, user["id"])
        log_event(db, user=by, action="user.password", entity="user", entity_id=user["id"])
    return user


def set_disabled(db: sqlite_utils.Database, name: str, disabled: bool = True, *,
                 by: str | None = None) -> dict:
    """Disable (or re-enable) an account; a disabled user cannot sign in, and its open
    sessions end."""
    with transaction(db):
        user = _public(db, name)
        db.execute("UPDATE users SET disabled = ? WHERE name = ?", [int(disabled), name])
        logins.revoke_user(db, user["id"])
        log_event(db, user=by, action="user.disable" if disabled else "user.enable",
                  entity="user", entity_id=user["id"])
    return _public(db, name)


def list_users(db: sqlite_utils.Database) -> list[dict]:
    """All users by name (no password hashes)."""
    return list(db.query(f"SELECT {_PUBLIC} FROM users ORDER BY name"))


def count_users(db: sqlite_utils.Database) -> int:
    """How many accounts exist (the app offers to create the first admin when 0)."""
    return db.execute("SELECT COUNT(*) FROM users").fetchone()[0]


def get_user_by_id(db: sqlite_utils.Database, user_id: int) -> dict | None:
    """The user with id ``user_id`` (no password hash), or None."""
    return row(db, f"SELECT {_PUBLIC} FROM users WHERE id = ?", [user_id])


def reload_user(db: sqlite_utils.Database, user: dict | None) -> dict | None:
    """The current row of ``user`` (a dict with its ``id`` and ``name``), read by id; None for
    None. The role and ``disabled`` flag come from the database, never from the dict, so a
    demoted or disabled account loses its rights at once and a made-up dict gains none.
    PermissionError when no account has that id and name (removed, or never signed in)."""
    if not user:
        return None
    user_id, name = user.get("id"), user.get("name")
    found = (get_user_by_id(db, user_id)
             if isinstance(user_id, int) and not isinstance(user_id, bool) else None)
    if found is None or found["name"] != name:
        raise PermissionError(f"user {name!r} (id {user_id!r}) is not a known account; "
                              "sign in again, or ask an admin to add the account")
    return found


def require_user(db: sqlite_utils.Database, name: str | None, perm: str) -> dict:
    """Load ``name`` and :func:`leaml.auth.require` ``perm`` of it; returns the user."""
    user = row(db, f"SELECT {_PUBLIC} FROM users WHERE name = ?", [name]) if name else None
    if name and user is None:
        raise PermissionError(f"unknown user '{name}'; ask an admin to add the account")
    return auth.require(user, perm)
