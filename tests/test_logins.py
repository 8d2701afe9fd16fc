"""Sign-in sessions: a token only its sha256 of which is stored, ended by sign-out, idle time,
a password or role change and disabling; and the app resuming or dropping them (AppTest)."""
from __future__ import annotations

import hashlib

import pytest
from apphelp import PASSWORD, ROOT, add_users, home_db, make_project
from streamlit.testing.v1 import AppTest

from leaml.app import service as app_service
from leaml.store import logins as sessions_store
from leaml.store import users as users_store


def _open(db, name: str) -> str:
    user, token = app_service.open_session(db, name, PASSWORD)
    assert user["name"] == name and len(token) >= 40
    return token


def test_only_the_tokens_sha256_is_stored(db):
    add_users(db)
    token = _open(db, "expert1")
    stored = [r["token_hash"] for r in db.query("SELECT token_hash FROM sessions")]
    assert stored == [hashlib.sha256(token.encode()).hexdigest()]
    assert app_service.session_user(db, token)["name"] == "expert1"
    assert app_service.session_user(db, stored[0]) is None  # the hash opens nothing
    assert app_service.open_session(db, "expert1", "wrong-password") is None


def test_sign_out_ends_the_session(db):
    add_users(db)
    token, other = _open(db, "expert1"), _open(db, "expert1")
    app_service.sign_out(db, token)
    assert app_service.session_user(db, token) is None
    assert app_service.session_user(db, other)["name"] == "expert1"  # another browser stays


@pytest.mark.parametrize("change", ["role", "password", "disable"])
def test_password_role_change_and_disable_end_every_session(db, change):
    users = add_users(db)
    token, bystander = _open(db, "expert1"), _open(db, "annotator1")
    admin = users["admin"]
    if change == "role":
        app_service.set_role(db, admin, "expert1", "viewer")
    elif change == "password":
        app_service.reset_password(db, admin, "expert1", "a-new-password")
    else:
        app_service.set_disabled(db, admin, "expert1", True)
    assert app_service.session_user(db, token) is None
    assert sessions_store.count_live(db, users["expert"]["id"]) == 0
    assert app_service.session_user(db, bystander)["name"] == "annotator1"


def test_a_session_idle_for_12_hours_is_over(db):
    add_users(db)
    token, fresh = _open(db, "expert1"), _open(db, "expert1")
    db.execute("UPDATE sessions SET last_seen_at = '2000-01-01T00:00:00+00:00'"
               " WHERE token_hash = ?", [hashlib.sha256(token.encode()).hexdigest()])
    assert app_service.session_user(db, token) is None
    assert app_service.session_user(db, fresh)["name"] == "expert1"
    _open(db, "viewer1")  # writing a new session drops the dead one
    assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 2


def test_the_last_enabled_admin_cannot_be_disabled(db):
    users = add_users(db)
    with pytest.raises(ValueError, match="only enabled admin"):
        app_service.set_disabled(db, users["admin"], "admin1", True)
    assert app_service.set_disabled(db, users["admin"], "expert1", True)["disabled"] == 1
    assert app_service.set_disabled(db, users["admin"], "expert1", False)["disabled"] == 0


# --- the app ----------------------------------------------------------------------------------

def _app_with_users(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    for name in {app_service.DEMO_PROJECT, getattr(app_service, "LANDING_PROJECT", "demo")}:
        make_project(db, tmp_path, name)  # the demo projects exist: no build on start
    return db, add_users(db)


def _sign_in(at: AppTest, name: str) -> AppTest:
    at.text_input[0].set_value(name)
    at.text_input[1].set_value(PASSWORD)
    return at.button[0].click().run()


def test_signing_in_opens_a_session_that_a_role_change_ends(monkeypatch, home, tmp_path):
    db, users = _app_with_users(monkeypatch, home, tmp_path)
    at = _sign_in(AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run(), "expert1")
    assert not at.exception and at.title[0].value == "Seed labeling"
    token = at.session_state["session_token"]
    assert app_service.session_user(db, token)["name"] == "expert1"
    app_service.set_role(db, users["admin"], "expert1", "annotator")
    at.run()  # the next rerun finds the token revoked: signed out, asked to sign in again
    assert not at.exception
    assert "Sign in" in at.title[0].value and "user" not in at.session_state


@pytest.mark.trust
def test_a_demoted_user_loses_the_page_on_the_next_rerun(monkeypatch, home, tmp_path):
    """R4 on pages: the role shown and checked is the database's, read on every rerun."""
    db, users = _app_with_users(monkeypatch, home, tmp_path)
    at = AppTest.from_file(str(ROOT / "pages/training.py"), default_timeout=60)
    at.session_state["user"] = users["expert"]
    at.session_state["project_name"] = app_service.DEMO_PROJECT
    at.run()
    assert not at.exception and not at.error
    users_store.set_role(db, "expert1", "viewer")
    at.run()
    assert "cannot open this page" in at.error[0].value
    users_store.set_disabled(db, "expert1", True)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["user"] = users["expert"]
    at.run()
    assert "Sign in" in at.title[0].value  # a disabled account is signed out


def test_the_sign_in_page_shows_the_throttle_and_writes_nothing_on_load(monkeypatch, home,
                                                                       tmp_path):
    db, _ = _app_with_users(monkeypatch, home, tmp_path)
    before = db.execute("PRAGMA data_version").fetchone()[0]
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.run()
    assert db.execute("PRAGMA data_version").fetchone()[0] == before  # nobody wrote
    for _ in range(5):
        at.text_input[0].set_value("expert1")
        at.text_input[1].set_value("wrong-password")
        at.button[0].click().run()
    at = _sign_in(at, "expert1")
    assert at.error[0].value.startswith("too many failed sign-ins for 'expert1'; try again in")
    assert "user" not in at.session_state


def test_a_page_run_without_a_user_shows_nothing_of_its_own(monkeypatch, home, tmp_path):
    _app_with_users(monkeypatch, home, tmp_path)
    at = AppTest.from_file(str(ROOT / "pages/training.py"), default_timeout=60).run()
    assert not at.exception
    assert "signed out" in at.info[0].value and not at.title and not at.button
