"""app.py: first admin account, sign in, sign out, pages by role (AppTest)."""
import pytest
from apphelp import PASSWORD, ROOT, add_users, button, home_db, make_project, page
from streamlit.testing.v1 import AppTest

from leaml.store import users as users_store


def app(timeout: float = 60) -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)


def test_first_start_asks_for_the_admin_then_signs_in(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    make_project(db, tmp_path, "demo")  # the demo exists: no build on first start here
    at = app().run()
    assert not at.exception
    assert "Welcome" in at.title[0].value
    at.text_input[0].set_value("boss")
    at.text_input[1].set_value(PASSWORD)
    at.text_input[2].set_value(PASSWORD)
    at.button[0].click().run()
    assert not at.exception
    assert users_store.get_user(db, "boss")["role"] == "admin"
    assert at.session_state["user"]["name"] == "boss"


def test_mismatched_passwords_create_nothing(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    make_project(db, tmp_path, "demo")
    at = app().run()
    at.text_input[1].set_value(PASSWORD)
    at.text_input[2].set_value(PASSWORD + "x")
    at.button[0].click().run()
    assert "differ" in at.error[0].value
    assert users_store.count_users(db) == 0


def test_login_wrong_password_then_right(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    make_project(db, tmp_path, "demo")
    add_users(db)
    at = app().run()
    assert "Sign in" in at.title[0].value
    at.text_input[0].set_value("expert1")
    at.text_input[1].set_value("wrong-password")
    at.button[0].click().run()
    assert "Wrong user name or password" in at.error[0].value
    at.text_input[1].set_value(PASSWORD)
    at.button[0].click().run()
    assert not at.exception
    assert at.session_state["user"]["role"] == "expert"
    # signed in: the expert's home page is seed labeling; sign out forgets the user
    assert at.title[0].value == "Seed labeling"
    button(at, "Sign out").click().run()
    assert "user" not in at.session_state


def test_annotator_cannot_reach_training(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    make_project(db, tmp_path, "demo")
    users = add_users(db)
    at = app()
    at.session_state["user"] = users["annotator"]
    at.run()
    assert not at.exception
    assert at.title[0].value == "Review pseudo QA"
    # the annotator's navigation has no training page at all
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("pages/training.py")
    # and the page itself refuses when run directly (defence in depth)
    page_at = page("pages/training.py", users["annotator"], "demo")
    assert "cannot open this page" in page_at.error[0].value
    assert all("Start job" not in b.label for b in page_at.button)


def test_demo_is_built_on_first_start(monkeypatch, home):
    from leaml.app.service import ensure_demo
    db = home_db(monkeypatch, home)
    project = ensure_demo(db, n_train=8, n_test=2)
    assert project["name"] == "demo-1pct"  # the landing project, beside the full 'demo'
    assert ensure_demo(db)["id"] == project["id"]  # idempotent
