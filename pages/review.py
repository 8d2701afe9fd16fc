"""Review (annotators): pending pseudo QA pairs by confidence; accept, reject, edit, skip,
undo, one key each.

The pair is a fragment: a decision runs in its button's callback and reruns only the
fragment, so the next pair is on screen in well under 300 ms (bench/bench_review_browser.py;
``?rerun=page`` in the URL reruns the whole page per decision instead, for comparison).
"""
import pandas as pd
import plotly.express as px
import streamlit as st

from leaml.app import service as app_service
from leaml.app.service import ConflictError, NotFoundError, StoreError
from pages._common import (flash, get_db, no_project_stop, project_ui, require_page,
                           show_flash, zoom_ui)
from pages._keys import key_to_button

user = require_page("review")
db = get_db()
project = project_ui(db, user) or no_project_stop()
pid = project["id"]
state = st.session_state
st.title("Review pseudo QA")
show_flash()


@st.cache_data(ttl=30, show_spinner=False)
def filter_options(home: str, project_id: int) -> dict:
    """Filter choices; cached briefly (per data home and project) so each keypress does not
    recompute them."""
    return app_service.review_filter_options(get_db(), user, project_id)


ORDERS = {"high-first": "desc", "low-first": "asc", "near-cut": "near-cut",
          "balanced": "balanced"}  # the page's names -> the queue's
DEFAULT_ORDER = "high-first"
ORDER_HELP = ("high-first: confident pairs (fast accepts); low-first: doubtful ones; near-cut: "
              "the pairs that will train the target (at or above its confidence cut per "
              "question), those nearest the cut first: the likeliest wrong among them; "
              "balanced: near-cut, one question at a time in turn. A simulated reviewer "
              "(`python -m leaml simulate-review --quick`, demo at 1%, seeds 0-2) gained +0.8 "
              "points with 300 near-cut decisions, +0.3 random, -0.2 high-first, within seed "
              "noise; near-cut ranks every pending pair on each claim (about 1.4 s at 100,000 "
              "pending), so high-first, which walks an index, stays the default")


def worth_ui(order: str) -> None:
    """'The next 100 decisions: ~+x points' from the project's stored simulate-review curve."""
    gain = app_service.next_decisions_gain(db, user, pid, 100, order)
    if gain is None:
        return
    where = (f"partly past the largest simulated budget, {gain['largest']} decisions, where "
             "the curve is not measured" if gain["beyond"]
             else f"after the {gain['done']} decisions made so far")
    points = round(gain["points"], 1) + 0.0  # no "-0.0"
    st.caption(f"The next 100 decisions: ~{points:+.1f} points of target accuracy "
               f"({gain['order']} order, from the simulated reviewer's curve on the Dashboard; "
               f"{where}).")


def filters_ui() -> dict:
    """Queue order and filters from the sidebar, as claim_next keyword arguments."""
    sb = st.sidebar
    order = sb.radio("Order", list(ORDERS), index=list(ORDERS).index(DEFAULT_ORDER),
                     horizontal=True, key="rv_order", help=ORDER_HELP)
    opts = filter_options(str(db.home), pid)
    category = sb.selectbox("Category", ["(any)", *opts["categories"]], key="rv_cat")
    qtype = sb.selectbox("Question type", ["(any)", *opts["question_types"]], key="rv_qtype")
    source = sb.selectbox("Source", ["(any)", *opts["sources"]], key="rv_source",
                          help="what made the pairs: the generator, or what an import named")
    runs = {r["id"]: r["label"] for r in opts["gen_runs"]}
    gen = sb.selectbox("Generator run", [None, *runs], key="rv_gen",
                       format_func=lambda r: "(any)" if r is None else runs[r])
    lo, hi = sb.slider("Confidence range", 0.0, 1.0, (0.0, 1.0), 0.01, key="rv_conf")
    return {"order": ORDERS[order],
            "category": None if category == "(any)" else category,
            "question_type": None if qtype == "(any)" else qtype,
            "source": None if source == "(any)" else source,
            "gen_run_id": gen, "min_conf": lo if lo > 0 else None,
            "max_conf": hi if hi < 1 else None}


def follow_filters(filters: dict) -> None:
    """A new order or filter shows its own first pair at once: the pair held under the old
    ones goes back to the queue (claim_next would hand it out again while it still fits)."""
    if state.get("rv_filters", filters) != filters and state.get("rv_pair"):
        app_service.skip(db, user, state["rv_pair"])
        state["rv_pair"] = None
    state["rv_filters"] = filters


def current_pair(db, filters: dict) -> dict | None:
    """The pair this reviewer holds (claim_next returns one's own live claim first), else a
    freshly claimed one; pairs skipped in this session are left out."""
    pair = app_service.next_pair(db, user, pid, exclude_ids=tuple(state.get("rv_skipped", ())),
                                 **filters)
    if pair is None or pair["id"] != state.get("rv_pair"):
        state["rv_editing"] = False
    state["rv_pair"] = pair and pair["id"]
    return pair


def say(message: str, kind: str = "success") -> None:
    """A message shown once at the top of the pair (set in callbacks, before the rerun)."""
    state["rv_msg"] = (kind, message)


def act(action: str) -> None:
    """A decision button's callback: carry it out before the (fragment) rerun, which then
    shows the next pair. The version sent is the one on screen when the key was pressed, so
    a change made meanwhile by somebody else is a conflict, never overwritten."""
    seen_id, seen_version = state.get("rv_seen") or (None, None)
    if seen_id is None:
        return
    try:
        _act(get_db(), action, seen_id, seen_version)
    except ConflictError as exc:
        say(f"Conflict: {exc}", "warning")
    except (PermissionError, NotFoundError, StoreError, ValueError) as exc:
        say(str(exc), "error")


def _act(db, action: str, qa_id: int, version: int) -> None:
    if action in ("accept", "reject"):
        app_service.decide(db, user, qa_id, action, expected_version=version)
        say(f"{action.capitalize()}ed pair #{qa_id}.")
    elif action == "save":
        app_service.decide(db, user, qa_id, "edit", expected_version=version,
                           question=state.get(f"rv_q_{qa_id}"),
                           answer=state.get(f"rv_a_{qa_id}"))
        say(f"Edited and accepted pair #{qa_id}.")
    elif action == "skip":
        app_service.skip(db, user, qa_id)
        state.setdefault("rv_skipped", []).append(qa_id)
    elif action == "undo":
        _undo(db, qa_id)
    state["rv_editing"] = action == "edit"
    # the summaries below the pair (bulk count, calibration, reviewers) follow on a whole
    # rerun: after the first decision in this tab (they start to show) and after an undo
    if action in ("accept", "reject", "save", "undo") and (
            action == "undo" or not state.get("rv_summaries_fresh")):
        state["rv_summaries_fresh"] = True
        state["rv_whole_rerun"] = True


def _undo(db, held_id: int) -> None:
    undone = app_service.undo(db, user, pid)
    if undone is None:
        say("Nothing to undo.", "info")
    elif undone.get("bulk"):
        kept = f" ({undone['kept']} changed since, left as they are)" if undone["kept"] else ""
        say(f"Undid your bulk accept: {undone['restored']} pairs are pending again{kept}.",
            "info")
    else:  # back to pending and claimed by us: give back the held pair so it comes up next
        say(f"Undid your last decision on pair #{undone['id']}.", "info")
        state["rv_skipped"] = [i for i in state.get("rv_skipped", []) if i != undone["id"]]
        app_service.skip(db, user, held_id)


def decision_ui(editing: bool) -> None:
    """The action buttons (keyboard shortcuts shown on them); clicks run :func:`act`."""
    if editing:
        c1, c2 = st.columns(2)
        c1.button("Save edit", type="primary", shortcut="Ctrl+Enter", width="stretch",
                  on_click=act, args=("save",))
        c2.button("Cancel edit", shortcut="Esc", width="stretch", on_click=act,
                  args=("cancel",))
        return
    c1, c2, c3 = st.columns(3)
    c4, c5, _ = st.columns(3)
    c1.button("Accept", type="primary", shortcut="A", width="stretch", on_click=act,
              args=("accept",))
    # 'R' is reserved by Streamlit (rerun): pages/_keys.py maps it (key_to_button below)
    c2.button("Reject · R", width="stretch", on_click=act, args=("reject",))
    c3.button("Edit", shortcut="E", width="stretch", on_click=act, args=("edit",))
    c4.button("Skip", shortcut="S", width="stretch", on_click=act, args=("skip",))
    c5.button("Undo", shortcut="U", width="stretch", on_click=act, args=("undo",))


def image_ui(db, pair: dict) -> None:
    """The pair's image as a JPEG data URL (cached by the service): it arrives with the pair
    itself, no second request from the browser after the pair is on screen."""
    zoom, cx, cy = zoom_ui("rv")
    st.image(app_service.pair_image_url(db, user, pair, zoom, cx, cy),
             caption=f"image {pair['image_id']} · {pair.get('category') or ''}",
             width="stretch")


def pair_text_ui(pair: dict, editing: bool) -> None:
    conf = pair["confidence"] or 0.0
    st.caption(f"Pair #{pair['id']} · {pair.get('question_type') or 'question'} · "
               f"confidence {conf:.2f} · from {pair.get('source') or 'the generator'}")
    st.progress(conf, text=f"Confidence **{conf:.0%}**")
    if editing:
        st.text_input("Question", pair["question"], key=f"rv_q_{pair['id']}")
        st.text_area("Answer", pair["answer"], key=f"rv_a_{pair['id']}", height=80)
    else:
        st.markdown(f"**Q:** {pair['question']}")
        st.markdown(f"### {pair['answer']}")


def progress_ui(db, filters: dict) -> None:
    p = app_service.review_progress(db, user, pid, **filters)
    st.caption(f"**{p['left']}** pending pairs left under these filters · "
               f"you have decided **{p['mine']}** in this project")


def empty_ui() -> None:
    st.info("No pending pairs match. Start a generator job and a pseudo-QA job on the "
            "**Training** page, or widen the filters in the sidebar.")
    if state.get("rv_skipped"):
        if st.button(f"Show the {len(state['rv_skipped'])} pair(s) I skipped again"):
            state["rv_skipped"] = []
            st.rerun(scope="fragment" if FRAGMENT else "app")


def pair_ui(filters: dict) -> None:
    """The held pair with its buttons, the counts, and the last decision's message."""
    if FRAGMENT and state.pop("rv_whole_rerun", False):
        st.rerun(scope="app")
    db = get_db()
    kind, message = state.pop("rv_msg", (None, None))
    if message:
        getattr(st, kind)(message)
    pair = current_pair(db, filters)
    progress_ui(db, filters)
    if pair is None:
        empty_ui()
        return
    left, right = st.columns([3, 2])
    editing = state.get("rv_editing", False)
    with left:
        image_ui(db, pair)
    with right:
        pair_text_ui(pair, editing)
        decision_ui(editing)
    state["rv_seen"] = (pair["id"], pair["version"])


FRAGMENT = st.query_params.get("rerun") != "page"
filters = filters_ui()
worth_ui(state.get("rv_order", DEFAULT_ORDER))
follow_filters(filters)
(st.fragment(pair_ui) if FRAGMENT else pair_ui)(filters)
key_to_button("r", "Reject")

st.divider()
left, right = st.columns(2)
with left:
    st.subheader("Bulk accept")
    threshold = st.slider("Accept every pending pair with confidence at least", 0.5, 1.0, 0.95,
                          0.01, key="rv_bulk_thr")
    bulk_filters = {k: v for k, v in filters.items() if k in ("category", "question_type",
                                                              "source", "gen_run_id")
                    and v is not None}
    n = app_service.count_bulk(db, user, pid, threshold, **bulk_filters)
    st.write(f"This would accept **{n}** pending pairs (current category / type / source / "
             "run filters). **U** undoes a bulk accept as one step.")
    sure = st.checkbox(f"Yes, accept these {n} pairs", key="rv_bulk_sure", disabled=n == 0)
    if st.button("Bulk accept", disabled=not (sure and n)):
        try:
            done = app_service.bulk_accept(db, user, pid, threshold, **bulk_filters)
        except (PermissionError, StoreError, ValueError) as exc:
            st.error(str(exc))
        else:
            del state["rv_bulk_sure"]  # confirm again next time
            flash(f"Accepted {done} pairs (U undoes them as one step).")
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
st.caption("Bulk accept, calibration and this table are as of the page's last full load.")
stats = app_service.reviewer_stats(db, user, pid)
if stats:
    st.dataframe(pd.DataFrame(stats), hide_index=True, width="stretch")
else:
    st.caption("No review decisions yet.")
