"""LEAML Studio: the web app. `streamlit run app.py` (data home: $LEAML_HOME, else ./data).

Only navigation and sign-in live here; every page is a file in pages/ and every action a
function in leaml/app/service.py that checks the user's permission.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from leaml.app import service as app_service
from pages._common import current_user, forget_user, get_db, session_cookie_ui, user_errors

st.set_page_config(page_title="LEAML Studio", page_icon=":material/biotech:", layout="wide")

# (file, title, icon, permission); the first page a role may see is its home page
PAGES = [
    ("pages/label.py", "Seed labeling", ":material/edit_note:", "label"),
    ("pages/review.py", "Review", ":material/fact_check:", "review"),
    ("pages/training.py", "Training", ":material/model_training:", "train"),
    ("pages/dashboard.py", "Dashboard", ":material/monitoring:", "view"),
    ("pages/projects.py", "Projects", ":material/folder_open:", "view"),
    ("pages/admin.py", "Users", ":material/manage_accounts:", "admin"),
]


@st.cache_resource(show_spinner="Preparing the demo project (first start only) ...")
def demo_ready(home: str) -> bool:
    """First-run setup, the one write the app makes without a user's action: the small demo
    project, built once per data home (ensure_demo is idempotent: afterwards it only reads)
    and checked once per process."""
    with user_errors():
        return app_service.ensure_demo(get_db()) is not None
    return False


def setup_page() -> None:
    st.title("Welcome to LEAML Studio")
    st.write("No account exists yet. Create the **admin** account to start; the admin then "
             "adds clinicians (experts), annotators and viewers on the Users page.")
    with st.form("first_admin"):
        name = st.text_input("Admin user name", value="admin")
        pw = st.text_input("Password (at least 8 characters)", type="password")
        pw2 = st.text_input("Repeat password", type="password")
        done = st.form_submit_button("Create admin account", type="primary")
    if done:
        if pw != pw2:
            st.error("The two passwords differ; type them again.")
            return
        with user_errors():
            app_service.create_first_admin(get_db(), name, pw)
            start_session(name, pw)


def login_page() -> None:
    st.title("Sign in to LEAML Studio")
    with st.form("login"):
        name = st.text_input("User name")
        pw = st.text_input("Password", type="password")
        done = st.form_submit_button("Sign in", type="primary")
    if done:
        with user_errors():
            start_session(name, pw)


def start_session(name: str, pw: str) -> None:
    """Sign in and rerun on the page the URL names (a deep link), or say what went wrong."""
    opened = app_service.open_session(get_db(), name, pw)
    if opened is None:
        st.error("Wrong user name or password (or the account is disabled).")
        return
    st.session_state["user"], st.session_state["session_token"] = opened
    st.rerun()


def logout() -> None:
    """Button callback: end the session (its cookie then opens nothing) and forget the user."""
    app_service.sign_out(get_db(), st.session_state.get("session_token"))
    forget_user()


def signed_out_pages(page) -> list:
    """The sign-in page under every page's address too: a deep link (/review) shows the
    sign-in form, and the rerun after signing in keeps that address, so it opens Review."""
    pages = [st.Page(page, title="Sign in", icon=":material/login:", url_path="sign-in")]
    return pages + [st.Page(page, title="Sign in", icon=":material/login:",
                            url_path=Path(f).stem) for f, _, _, _ in PAGES]


def main() -> None:
    db = get_db()
    demo_ready(str(db.home))
    user = current_user()
    session_cookie_ui()
    if user is None:
        page = setup_page if app_service.needs_first_admin(db) else login_page
        pages = signed_out_pages(page)
        nav = st.navigation(pages, position="hidden")
        # ?next=review: a page file sent its deep link here (see pages/_common.require_page)
        wanted = [p for p in pages[1:] if p.url_path == st.query_params.get("next")]
        if wanted:
            st.switch_page(wanted[0])
        nav.run()
        return
    allowed = [st.Page(f, title=t, icon=i) for f, t, i, perm in PAGES
               if app_service.can(user, perm)]
    with st.sidebar:
        st.caption(f"Signed in as **{user['name']}** ({user['role']})")
        st.button("Sign out", icon=":material/logout:", on_click=logout)
    st.navigation(allowed).run()


main()
