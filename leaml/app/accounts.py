"""Accounts of the web app: the first admin, sign-in (throttled), sessions, user management.

Part of the service the pages call (``leaml.app.service`` re-exports these names). Every
permission check goes through :func:`require`, which reads the user's role and ``disabled``
flag from the database by id: the caller's dict is never trusted, so a demoted or disabled
user is refused on the next action and a made-up ``{"role": "admin"}`` gains nothing.
"""
from __future__ import annotations

import sqlite_utils

from leaml import auth
from leaml.store import logins as sessions_store
from leaml.store import users as users_store

SESSION_IDLE_SECONDS = sessions_store.IDLE_SECONDS  # also the cookie's Max-Age, renewed on use


def require(db: sqlite_utils.Database, user: dict | None, perm: str) -> dict:
    """``user``'s row reloaded by id, if it may ``perm``; else PermissionError (auth.require)."""
    return auth.require(users_store.reload_user(db, user), perm)


def needs_first_admin(db: sqlite_utils.Database) -> bool:
    """True while the data home has no user at all (the app then asks for the admin account)."""
    return users_store.count_users(db) == 0


def create_first_admin(db: sqlite_utils.Database, name: str, password: str) -> dict:
    """Create the first account, as admin; PermissionError once any account exists (the
    check and the insert are one transaction: of two racing processes exactly one wins)."""
    return users_store.add_first_admin(db, (name or "").strip(), password)


def sign_in(db: sqlite_utils.Database, name: str, password: str) -> dict | None:
    """The user if the name and password match an enabled account, else None.

    Raises sessions.SignInThrottled ("too many failed sign-ins for 'x'; try again in N s")
    while that name is locked after repeated wrong passwords. Unknown names take the same
    path and time as known ones, so neither the answer nor the delay tells which exist.
    """
    name = (name or "").strip()[:64]
    sessions_store.check_throttle(db, name)
    user = users_store.verify_password(db, name, password or "")
    if user is None:
        sessions_store.record_failure(db, name)
    else:
        sessions_store.reset_failures(db, name)
    return user


def open_session(db: sqlite_utils.Database, name: str, password: str) -> tuple[dict, str] | None:
    """:func:`sign_in`, then a new session: (user, token) for the browser's cookie, or None.
    Only the token's sha256 is stored; the token ends after 12 h without any action."""
    user = sign_in(db, name, password)
    return None if user is None else (user, sessions_store.create(db, user["id"]))


def session_user(db: sqlite_utils.Database, token: str | None) -> dict | None:
    """The user of a live session ``token`` as the database holds it now, or None when the
    token is unknown, signed out, idle too long, revoked by a password or role change, or
    its account is disabled."""
    user_id = sessions_store.user_id_of(db, token)
    user = users_store.get_user_by_id(db, user_id) if user_id is not None else None
    return None if user is None or user["disabled"] else user


def reload_user(db: sqlite_utils.Database, user: dict | None) -> dict | None:
    """``user``'s row as the database holds it now; None when unknown, removed or disabled."""
    try:
        fresh = users_store.reload_user(db, user)
    except PermissionError:
        return None
    return None if fresh is None or fresh["disabled"] else fresh


def sign_out(db: sqlite_utils.Database, token: str | None) -> None:
    """End the session ``token`` (the cookie then opens nothing, even if a copy survives)."""
    sessions_store.revoke(db, token)


def list_users(db: sqlite_utils.Database, user: dict) -> list[dict]:
    """Admin only: every account by name (no password hashes)."""
    require(db, user, "admin")
    return users_store.list_users(db)


def add_user(db: sqlite_utils.Database, user: dict, name: str, password: str, role: str) -> dict:
    """Admin only: a new account."""
    user = require(db, user, "admin")
    return users_store.add_user(db, (name or "").strip(), password, role, by=user["name"])


def set_role(db: sqlite_utils.Database, user: dict, name: str, role: str) -> dict:
    """Admin only; an admin cannot demote the last admin (nobody could manage users then)."""
    user = require(db, user, "admin")
    admins = [u for u in users_store.list_users(db) if u["role"] == "admin" and not u["disabled"]]
    if role != "admin" and [u["name"] for u in admins] == [name]:
        raise ValueError(f"'{name}' is the only admin; make another user admin first")
    return users_store.set_role(db, name, role, by=user["name"])


def reset_password(db: sqlite_utils.Database, user: dict, name: str, password: str) -> dict:
    """Admin only: set a new password for ``name`` (its open sessions end)."""
    user = require(db, user, "admin")
    return users_store.set_password(db, name, password, by=user["name"])


def set_disabled(db: sqlite_utils.Database, user: dict, name: str, disabled: bool) -> dict:
    """Admin only: disable (its open sessions end) or re-enable ``name``; the last enabled
    admin cannot be disabled."""
    user = require(db, user, "admin")
    admins = [u for u in users_store.list_users(db) if u["role"] == "admin" and not u["disabled"]]
    if disabled and [u["name"] for u in admins] == [name]:
        raise ValueError(f"'{name}' is the only enabled admin; make another user admin first")
    return users_store.set_disabled(db, name, disabled, by=user["name"])
