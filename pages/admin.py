"""Users (admins): add accounts, change roles, reset passwords, disable accounts."""
import pandas as pd
import streamlit as st

from leaml.app import service as app_service
from pages._common import flash, get_db, require_page, show_flash, user_errors

user = require_page("admin")
db = get_db()
st.title("Users")
show_flash()

ROLE_HELP = ("admin: everything and user accounts · expert: label, review, train, import · "
             "annotator: review · viewer: dashboards and exports")


def add_ui() -> tuple[str, str, str, bool]:
    with st.form("add_user", clear_on_submit=True):
        name = st.text_input("User name")
        pw = st.text_input("Initial password (at least 8 characters)", type="password")
        role = st.selectbox("Role", app_service.ROLES, index=1, help=ROLE_HELP)
        go = st.form_submit_button("Add user", type="primary")
    return name, pw, role, go


users = app_service.list_users(db, user)
st.dataframe(pd.DataFrame(users)[["name", "role", "created_at", "disabled"]],
             hide_index=True, width="stretch")
st.caption(ROLE_HELP)

left, right = st.columns(2)
with left:
    st.subheader("Add a user")
    name, pw, role, go = add_ui()
    if go:
        with user_errors():
            app_service.add_user(db, user, name, pw, role)
            flash(f"User '{name}' added as {role}.")
            st.rerun()
with right:
    st.subheader("Change a user")
    names = [u["name"] for u in users]
    who = st.selectbox("User", names, key="admin_who")
    current = next(u for u in users if u["name"] == who)
    new_role = st.selectbox("Role", app_service.ROLES,
                            index=app_service.ROLES.index(current["role"]),
                            key=f"admin_role_{who}")
    if st.button("Set role", disabled=new_role == current["role"]):
        with user_errors():
            app_service.set_role(db, user, who, new_role)
            flash(f"'{who}' is now {new_role}; they sign in again to use it.")
            st.rerun()
    new_pw = st.text_input("New password", type="password", key=f"admin_pw_{who}")
    if st.button("Reset password", disabled=not new_pw):
        with user_errors():
            app_service.reset_password(db, user, who, new_pw)
            flash(f"Password of '{who}' reset; they sign in again with it.")
            st.rerun()
    toggle = "Enable account" if current["disabled"] else "Disable account"
    if st.button(toggle, help="A disabled account cannot sign in; its open sessions end now."):
        with user_errors():
            app_service.set_disabled(db, user, who, not current["disabled"])
            flash(f"'{who}' is {'enabled' if current['disabled'] else 'disabled'}.")
            st.rerun()
