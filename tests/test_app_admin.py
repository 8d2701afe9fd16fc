"""pages/admin.py: add users, change roles, reset passwords; admins only (AppTest)."""
import pytest
from apphelp import PASSWORD, add_users, button, home_db, page

from leaml.app import service as app_service
from leaml.store import users as users_store


def test_add_user_and_set_role(monkeypatch, home):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    at = page("pages/admin.py", users["admin"])
    assert not at.exception
    at.text_input[0].set_value("nina")
    at.text_input[1].set_value(PASSWORD)
    button(at, "Add user").click().run()
    assert not at.exception
    assert users_store.get_user(db, "nina")["role"] == "expert"
    at.selectbox(key="admin_who").set_value("nina").run()
    at.selectbox(key="admin_role_nina").set_value("annotator").run()
    button(at, "Set role").click().run()
    assert users_store.get_user(db, "nina")["role"] == "annotator"
    at.text_input(key="admin_pw_nina").set_value("another-password").run()
    button(at, "Reset password").click().run()
    assert app_service.sign_in(db, "nina", "another-password")["name"] == "nina"


def test_short_password_is_a_message(monkeypatch, home):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    at = page("pages/admin.py", users["admin"])
    at.text_input[0].set_value("short")
    at.text_input[1].set_value("abc")
    button(at, "Add user").click().run()
    assert not at.exception and "too short" in at.error[0].value


def test_only_admins(monkeypatch, home):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    at = page("pages/admin.py", users["expert"])
    assert "cannot open this page" in at.error[0].value
    with pytest.raises(PermissionError):
        app_service.add_user(db, users["expert"], "x", PASSWORD, "admin")
    with pytest.raises(ValueError, match="only admin"):
        app_service.set_role(db, users["admin"], "admin1", "viewer")


def test_disable_ends_the_users_sessions_and_enable_lets_them_back(monkeypatch, home):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    _, token = app_service.open_session(db, "annotator1", PASSWORD)
    at = page("pages/admin.py", users["admin"])
    at.selectbox(key="admin_who").set_value("annotator1").run()
    button(at, "Disable account").click().run()
    assert not at.exception and "disabled" in at.success[0].value
    assert users_store.get_user(db, "annotator1")["disabled"] == 1
    assert app_service.session_user(db, token) is None
    assert app_service.sign_in(db, "annotator1", PASSWORD) is None
    button(at, "Enable account").click().run()
    assert app_service.sign_in(db, "annotator1", PASSWORD)["name"] == "annotator1"
