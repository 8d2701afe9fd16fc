"""Sessions in a real browser: a reload keeps you signed in, a deep link opens its page after
signing in, sign-out ends the session for good, and a role change revokes the cookie's token.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/apphelp.py
from browser import CHROMIUM_ARGS, streamlit_server, wait_idle  # noqa: E402

pytestmark = pytest.mark.e2e
PW = "correct-horse"
COOKIE = "leaml_session"


@pytest.fixture
def app_url(tmp_path):
    """A running app on a fresh data home with an admin, an expert and a small demo project."""
    from apphelp import make_project

    from leaml.app import service as app_service
    from leaml.store import connect
    from leaml.store import users as users_store
    home = tmp_path / "home"
    home.mkdir()
    db = connect(home)
    for name in {app_service.DEMO_PROJECT, getattr(app_service, "LANDING_PROJECT", "demo")}:
        make_project(db, tmp_path, name, n_train=8, n_test=2)  # the app builds no demo then
    users_store.add_user(db, "boss", PW, "admin")
    users_store.add_user(db, "eve", PW, "expert")
    with streamlit_server(home) as url:
        yield url, db


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def sign_in_form(page, name: str) -> None:
    page.get_by_label("User name").fill(name)
    page.get_by_role("textbox", name="Password").fill(PW)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_test_id("stSidebarNav").wait_for()
    wait_idle(page)


def signed_in_as(page, name: str) -> bool:
    return page.get_by_text(f"Signed in as {name}").count() > 0


def session_cookie(context) -> dict:
    found = [c for c in context.cookies() if c["name"] == COOKIE]
    assert found, f"no {COOKIE} cookie; cookies: {[c['name'] for c in context.cookies()]}"
    return found[0]


def wait_cookie(page, present: bool = True) -> None:
    page.wait_for_function(f"() => document.cookie.includes('{COOKIE}=') === {str(present).lower()}",
                           timeout=15_000)


def test_reload_keeps_the_user_signed_in_and_sign_out_ends_it(app_url, browser):
    url, db = app_url
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    sign_in_form(page, "eve")
    wait_cookie(page)
    cookie = session_cookie(context)
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    # only the token's sha256 is stored
    stored = [r["token_hash"] for r in db.query("SELECT token_hash FROM sessions")]
    assert cookie["value"] not in stored and len(stored) == 1

    page.reload()
    page.get_by_test_id("stSidebarNav").wait_for()
    wait_idle(page)
    assert signed_in_as(page, "eve")

    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="Sign in").wait_for()
    wait_cookie(page, present=False)
    assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
    page.reload()
    page.get_by_role("button", name="Sign in").wait_for()
    wait_idle(page)
    assert not signed_in_as(page, "eve")
    context.close()


def test_a_deep_link_opens_its_page_after_signing_in(app_url, browser):
    url, _ = app_url
    page = browser.new_page()
    page.goto(url + "/review")
    sign_in_form(page, "eve")
    page.get_by_role("heading", name="Review pseudo QA", exact=True).wait_for()
    assert page.url.rstrip("/").endswith("/review")
    page.close()


def test_a_token_revoked_by_a_role_change_no_longer_works(app_url, browser):
    url, db = app_url
    from leaml.app import service as app_service
    context = browser.new_context()
    page = context.new_page()
    page.goto(url + "/training")
    sign_in_form(page, "eve")
    page.get_by_role("heading", name="Training", exact=True).wait_for()
    wait_cookie(page)
    token = session_cookie(context)["value"]
    assert app_service.session_user(db, token)["name"] == "eve"

    boss = app_service.sign_in(db, "boss", PW)
    app_service.set_role(db, boss, "eve", "viewer")
    assert app_service.session_user(db, token) is None
    # a second tab with the old cookie is signed out, and so is the first one on its next run
    other = context.new_page()
    other.goto(url + "/training")
    other.get_by_role("button", name="Sign in").wait_for()
    page.reload()
    page.get_by_role("button", name="Sign in").wait_for()
    assert not signed_in_as(page, "eve") and not signed_in_as(other, "eve")
    context.close()
