"""LEAML Studio: the web app. `streamlit run app.py` (data home: $LEAML_HOME, else ./data).

Only navigation and sign-in live here; every page is a file in pages/ and every action a
function in leaml/app_service.py that checks the user's permission.
"""
from __future__ import annotations

import streamlit as st

from leaml import app_service, auth
from pages._common import current_user, get_db, user_errors

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
    """Build the small demo project once per data home and process (see ensure_demo)."""
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
            st.session_state["user"] = app_service.create_first_admin(get_db(), name, pw)
            st.rerun()


def login_page() -> None:
    st.title("Sign in to LEAML Studio")
    with st.form("login"):
        name = st.text_input("User name")
        pw = st.text_input("Password", type="password")
        done = st.form_submit_button("Sign in", type="primary")
    if done:
        user = app_service.sign_in(get_db(), name, pw)
        if user is None:
            st.error("Wrong user name or password (or the account is disabled).")
        else:
            st.session_state["user"] = user
            st.rerun()


def logout() -> None:
    """Button callback: forget the user and everything the pages remembered."""
    for key in list(st.session_state):
        del st.session_state[key]


def main() -> None:
    db = get_db()
    demo_ready(str(db.home))
    user = current_user()
    if user is None:
        page = setup_page if app_service.needs_first_admin(db) else login_page
        st.navigation([st.Page(page, title="Sign in", icon=":material/login:")]).run()
        return
    allowed = [st.Page(f, title=t, icon=i) for f, t, i, perm in PAGES if auth.can(user, perm)]
    with st.sidebar:
        st.caption(f"Signed in as **{user['name']}** ({user['role']})")
        st.button("Sign out", icon=":material/logout:", on_click=logout)
    st.navigation(allowed).run()


main()
