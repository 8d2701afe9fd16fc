"""Streamlit helpers shared by the pages (the only UI module; leaml/ never imports streamlit).

Kept in pages/ (not a new top-level folder): st.navigation lists pages explicitly, so a
module starting with '_' here is never shown as a page.
"""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import streamlit as st
from PIL import Image
from streamlit.errors import StreamlitAPIException

from leaml.app import service as app_service
from leaml.app.service import ConflictError, NotFoundError, StoreError

VIEW_PX = app_service.VIEW_PX  # images are shown this wide (demo frames are 64-128 px: upscaled)
SESSION_COOKIE = "leaml_session"


def get_db():
    """A connection for this script run (SQLite connections must stay in their thread)."""
    return app_service.connect()


def current_user() -> dict | None:
    """The signed-in user as the database holds it now (read on every rerun), or None.

    Found through this tab's session token, else the browser's session cookie (a reload or
    a new tab). A token that was signed out, revoked (password, role change, disabled) or
    idle too long signs the tab out; so does an account disabled meanwhile.
    """
    db = get_db()
    token = st.session_state.get("session_token")
    if token is None and "user" not in st.session_state:
        token = st.context.cookies.get(SESSION_COOKIE) or None
    if token is not None:
        user = app_service.session_user(db, token)
    else:  # signed in without a token (set directly, as the page tests do)
        user = app_service.reload_user(db, st.session_state.get("user"))
    if user is None:
        if "user" in st.session_state or "session_token" in st.session_state:
            forget_user()  # only then: a signed-out tab keeps its form's state
        return None
    st.session_state["user"] = user
    if token is not None:
        st.session_state["session_token"] = token
    return user


def forget_user() -> None:
    """Drop the signed-in user, the token and everything the pages remembered."""
    for key in list(st.session_state):
        del st.session_state[key]


def session_cookie_ui() -> None:
    """Keep the browser's session cookie in step with this tab: the token while signed in,
    removed once signed out (the cookie then opens nothing anyway: the token is revoked)."""
    token = st.session_state.get("session_token")
    if token is None and not st.context.cookies.get(SESSION_COOKIE):
        return
    # 'renew' changes every 10 minutes, so the script runs again and renews the Max-Age
    _cookie_component()(data={"name": SESSION_COOKIE, "token": token,
                              "max_age": app_service.SESSION_IDLE_SECONDS,
                              "renew": int(time.time() // 600)},
                        key="leaml_session_cookie")


@functools.cache
def _cookie_component():
    """The cookie writer: Streamlit's own components v2 (its JavaScript runs in the page,
    where document.cookie is the app's). Script cannot make a cookie HttpOnly; SameSite=
    Strict keeps it off other sites' requests, and only its sha256 is stored server-side."""
    from streamlit.components.v2 import component
    return component("leaml_session_cookie", js=_COOKIE_JS)


_COOKIE_JS = """
export default function(component) {
  const d = component.data;
  if (!d || !d.name) return;
  const attrs = "; Path=/; SameSite=Strict" + (location.protocol === "https:" ? "; Secure" : "");
  document.cookie = d.token ? `${d.name}=${d.token}; Max-Age=${d.max_age}${attrs}`
                            : `${d.name}=; Max-Age=0${attrs}`;
}
"""


def require_page(perm: str) -> dict:
    """The signed-in user if they may ``perm`` (their role and disabled flag as the database
    holds them now); else a message and the page stops."""
    user = current_user()
    if user is None:
        # only reached when Streamlit ran this file by itself: a deep link as the first
        # request after the server started, before app.py set up the navigation. app.py
        # shows the sign-in form under this page's address, then comes back here.
        page = PurePosixPath(urlparse(st.context.url or "").path).name
        # (under app.py's navigation, app.py is no page: the session ended since app.py ran)
        with contextlib.suppress(StreamlitAPIException):
            st.switch_page("app.py", query_params={"next": page} if page else None)
        st.info("You are signed out. Reload the page to sign in again.")
        st.stop()
    if not app_service.can(user, perm):
        st.error(f"Your role ({user['role']}) cannot open this page. Ask an admin for access.")
        st.stop()
    return user


def project_ui(db, user: dict) -> dict | None:
    """Sidebar project picker; remembers the choice across pages. None without projects."""
    projects = app_service.list_projects(db, user)
    if not projects:
        return None
    names = [p["name"] for p in projects]
    wanted = st.session_state.get("project_name", app_service.LANDING_PROJECT)
    index = names.index(wanted) if wanted in names else 0
    # a new key after select_project(): the browser's remembered choice must not win
    key = f"project_picker_{st.session_state.get('project_picker_n', 0)}"
    name = st.sidebar.selectbox("Project", names, index=index, key=key)
    st.session_state["project_name"] = name
    return projects[names.index(name)]


def select_project(name: str) -> None:
    """Make ``name`` the current project (e.g. right after creating it)."""
    st.session_state["project_name"] = name
    st.session_state["project_picker_n"] = st.session_state.get("project_picker_n", 0) + 1


def no_project_stop() -> None:
    st.info("No project yet. Create one or import data on the **Projects** page.")
    st.stop()


@contextlib.contextmanager
def user_errors():
    """Show expected errors (bad input, conflicts, permissions) as messages, not tracebacks."""
    try:
        yield
    except ConflictError as exc:
        st.warning(f"Conflict: {exc}")
    except (PermissionError, NotFoundError, StoreError, ValueError) as exc:
        st.error(str(exc))


def flash(message: str, kind: str = "success") -> None:
    """A message shown once, on the next run (after st.rerun)."""
    st.session_state["_flash"] = (kind, message)


def show_flash() -> None:
    kind, message = st.session_state.pop("_flash", (None, None))
    if message:
        getattr(st, kind)(message)


@st.cache_data(max_entries=256, show_spinner=False)
def view_image(path: str, zoom: float = 1.0, cx: float = 0.5, cy: float = 0.5,
               width: int = VIEW_PX) -> Image.Image:
    """The image at ``path`` upscaled to ``width`` px; ``zoom`` > 1 crops around (cx, cy)."""
    return app_service.view_image(path, zoom, cx, cy, width)


def zoom_ui(key: str) -> tuple[float, float, float]:
    """Zoom factor and centre (x, y in 0..1) chosen in a small expander."""
    with st.expander("Zoom", expanded=False):
        zoom = st.slider("Zoom", 1.0, 4.0, 1.0, 0.5, key=f"{key}_zoom")
        cx = st.slider("Horizontal centre", 0.0, 1.0, 0.5, 0.05, key=f"{key}_cx")
        cy = st.slider("Vertical centre", 0.0, 1.0, 0.5, 0.05, key=f"{key}_cy")
    return zoom, cx, cy


def show_image(path: Path, caption: str | None = None, key: str = "img") -> None:
    zoom, cx, cy = zoom_ui(key)
    st.image(view_image(str(path), zoom, cx, cy), caption=caption, width="stretch")

