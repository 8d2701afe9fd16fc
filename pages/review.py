"""Review (annotators): pending pseudo QA pairs by confidence; accept, reject, edit, skip, undo."""
import pandas as pd
import plotly.express as px
import streamlit as st

from leaml import app_service, auth
from leaml.store import images as images_store
from pages._common import (flash, get_db, key_to_button, no_project_stop, project_ui,
                           require_page, show_flash, show_image, user_errors)

user = require_page("review")
db = get_db()
project = project_ui(db) or no_project_stop()
pid = project["id"]
state = st.session_state
st.title("Review pseudo QA")
show_flash()


@st.cache_data(ttl=30, show_spinner=False)
def filter_options(project_id: int) -> dict:
    """Filter choices; cached briefly so each keypress does not recompute them."""
    return app_service.review_filter_options(get_db(), user, project_id)


def filters_ui() -> dict:
    """Queue order and filters from the sidebar, as claim_next keyword arguments."""
    sb = st.sidebar
    order = sb.radio("Order", ["high-first", "low-first"], horizontal=True, key="rv_order",
                     help="high-first: confident pairs (fast accepts); low-first: doubtful ones")
    opts = filter_options(pid)
    category = sb.selectbox("Category", ["(any)", *opts["categories"]], key="rv_cat")
    qtype = sb.selectbox("Question type", ["(any)", *opts["question_types"]], key="rv_qtype")
    runs = {r["id"]: r["label"] for r in opts["gen_runs"]}
    gen = sb.selectbox("Generator run", [None, *runs], key="rv_gen",
                       format_func=lambda r: "(any)" if r is None else runs[r])
    lo, hi = sb.slider("Confidence range", 0.0, 1.0, (0.0, 1.0), 0.01, key="rv_conf")
    return {"order": "desc" if order == "high-first" else "asc",
            "category": None if category == "(any)" else category,
            "question_type": None if qtype == "(any)" else qtype,
            "gen_run_id": gen, "min_conf": lo if lo > 0 else None,
            "max_conf": hi if hi < 1 else None}


def current_pair(filters: dict) -> dict | None:
    """The pair this reviewer holds (claim_next returns one's own live claim first), else a
    freshly claimed one; pairs skipped in this session are left out."""
    pair = app_service.next_pair(db, user, pid, exclude_ids=tuple(state.get("rv_skipped", ())),
                                 **filters)
    if pair is None or pair["id"] != state.get("rv_pair"):
        state["rv_editing"] = False
    state["rv_pair"] = pair and pair["id"]
    return pair


def decision_ui(editing: bool) -> str | None:
    """The action buttons (keyboard shortcuts shown on them); the chosen action or None."""
    if editing:
        c1, c2 = st.columns(2)
        if c1.button("Save edit", type="primary", shortcut="Ctrl+Enter", width="stretch"):
            return "save"
        if c2.button("Cancel edit", shortcut="Esc", width="stretch"):
            return "cancel"
        return None
    c1, c2, c3 = st.columns(3)
    c4, c5, _ = st.columns(3)
    actions = {"accept": c1.button("Accept", type="primary", shortcut="A", width="stretch"),
               # 'R' is reserved by Streamlit (rerun): mapped by key_to_button below
               "reject": c2.button("Reject · R", width="stretch"),
               "edit": c3.button("Edit", shortcut="E", width="stretch"),
               "skip": c4.button("Skip", shortcut="S", width="stretch"),
               "undo": c5.button("Undo", shortcut="U", width="stretch")}
    key_to_button("r", "Reject")
    return next((k for k, v in actions.items() if v), None)


def apply(action: str, pair: dict, question: str | None, answer: str | None) -> None:
    """Carry out an action on the held pair, then rerun for the next one.

    The version sent is the one on screen when the key was pressed (kept from the previous
    run), so a change made meanwhile by somebody else is a conflict, never overwritten."""
    seen_id, seen_version = state.get("rv_seen") or (None, None)
    pair = dict(pair, version=seen_version if seen_id == pair["id"] else pair["version"])
    with user_errors():
        if action in ("accept", "reject"):
            app_service.decide(db, user, pair["id"], action, expected_version=pair["version"])
            flash(f"{action.capitalize()}ed pair #{pair['id']}.")
        elif action == "save":
            app_service.decide(db, user, pair["id"], "edit", expected_version=pair["version"],
                               question=question, answer=answer)
            flash(f"Edited and accepted pair #{pair['id']}.")
        elif action == "skip":
            app_service.skip(db, user, pair["id"])
            state.setdefault("rv_skipped", []).append(pair["id"])
        elif action == "undo":
            undone = app_service.undo(db, user, pid)
            flash(f"Undid your last decision on pair #{undone['id']}." if undone
                  else "Nothing to undo.", "info")
            if undone:  # back to pending and claimed by us: it comes up next
                state["rv_skipped"] = [i for i in state.get("rv_skipped", []) if i != undone["id"]]
                app_service.skip(db, user, pair["id"])
            st.rerun()
        if action in ("edit", "cancel"):
            state["rv_editing"] = action == "edit"
            st.rerun()
        st.rerun()


filters = filters_ui()
pair = current_pair(filters)
if pair is None:
    st.info("No pending pairs match. Start a generator job and a pseudo-QA job on the "
            "**Training** page, or widen the filters in the sidebar.")
    if state.get("rv_skipped"):
        if st.button(f"Show the {len(state['rv_skipped'])} pair(s) I skipped again"):
            state["rv_skipped"] = []
            st.rerun()
else:
    left, right = st.columns([3, 2])
    with left:
        show_image(images_store.image_path(db, pair["image_id"]),
                   caption=f"image {pair['image_id']} · {pair.get('category') or ''}", key="rv")
    with right:
        conf = pair["confidence"] or 0.0
        st.caption(f"Pair #{pair['id']} · {pair.get('question_type') or 'question'} · "
                   f"confidence {conf:.2f}")
        st.progress(conf, text=f"Confidence **{conf:.0%}**")
        editing = state.get("rv_editing", False)
        if editing:
            q = st.text_input("Question", pair["question"], key=f"rv_q_{pair['id']}")
            a = st.text_area("Answer", pair["answer"], key=f"rv_a_{pair['id']}", height=80)
        else:
            q, a = None, None
            st.markdown(f"**Q:** {pair['question']}")
            st.markdown(f"### {pair['answer']}")
        action = decision_ui(editing)
        if action:
            apply(action, pair, q, a)
        state["rv_seen"] = (pair["id"], pair["version"])

st.divider()
left, right = st.columns(2)
with left:
    st.subheader("Bulk accept")
    threshold = st.slider("Accept every pending pair with confidence at least", 0.5, 1.0, 0.95,
                          0.01, key="rv_bulk_thr")
    bulk_filters = {k: v for k, v in filters.items() if k in ("category", "question_type",
                                                              "gen_run_id") and v is not None}
    n = app_service.count_bulk(db, user, pid, threshold, **bulk_filters)
    st.write(f"This would accept **{n}** pending pairs (current category / type / run filters).")
    sure = st.checkbox(f"Yes, accept these {n} pairs", key="rv_bulk_sure", disabled=n == 0)
    if st.button("Bulk accept", disabled=not (sure and n)):
        with user_errors():
            done = app_service.bulk_accept(db, user, pid, threshold, **bulk_filters)
            del state["rv_bulk_sure"]  # confirm again next time
            flash(f"Accepted {done} pairs.")
            st.rerun()
with right:
    st.subheader("Calibration")
    cal = pd.DataFrame(app_service.calibration(db, user, pid))
    if cal.empty or cal["n"].sum() == 0:
        st.caption("No reviewed pairs yet: the acceptance rate by confidence shows up here.")
    else:
        cal["confidence"] = [f"{lo:.1f}–{hi:.1f}" for lo, hi in zip(cal["lo"], cal["hi"])]
        fig = px.bar(cal, x="confidence", y="acceptance_rate", hover_data=["n", "edited"],
                     labels={"acceptance_rate": "accepted (share)"}, range_y=[0, 1])
        fig.update_traces(text=[f"n={n}" if n else "" for n in cal["n"]],
                          textposition="outside")  # a 0% bin still shows it was reviewed
        fig.update_layout(height=260, margin=dict(l=0, r=0, t=10, b=0))
        st.plotly_chart(fig, width="stretch")

st.subheader("Reviewers")
stats = app_service.reviewer_stats(db, user, pid)
if stats:
    st.dataframe(pd.DataFrame(stats), hide_index=True, width="stretch")
else:
    st.caption("No review decisions yet.")
