"""Seed labeling (clinicians): the next unlabeled image, a question, an answer, a category."""
import pandas as pd
import streamlit as st

from leaml.app import service as app_service
from pages._common import (flash, get_db, no_project_stop, project_ui, require_page, show_flash,
                           show_image, user_errors)

user = require_page("label")
db = get_db()
project = project_ui(db, user) or no_project_stop()
pid = project["id"]
state = st.session_state
state.setdefault("label_n", 0)  # bumped after each save: fresh, empty widgets
st.title("Seed labeling")
show_flash()


def progress_ui(counts: dict) -> None:
    target = app_service.seed_target(project, counts)
    done = counts["seed_images"]
    st.progress(min(1.0, done / target),
                text=f"Seed set: **{done} / {target}** images labeled "
                     f"({counts['seed']} QA pairs; {counts['unlabeled_images']} images left)")


def strategy_ui() -> str:
    return st.sidebar.radio("Next image", ["diverse", "random"], key="label_strategy",
                            help="diverse: the image least like those labeled so far "
                                 "(farthest-first over colour and layout), so a small seed "
                                 "set covers the data; random: any unlabeled image")


def qa_ui(choices: dict, image: dict, n: int) -> tuple[str, str, str]:
    """Question, answer and category pickers (quick picks + free text); plain strings back."""
    q = st.selectbox("Question", choices["questions"], index=None, accept_new_options=True,
                     placeholder="Pick a question or type a new one", key=f"label_q_{n}")
    answers = choices["answers"].get(q or "", [])
    a = st.selectbox("Answer", answers, index=None, accept_new_options=True,
                     placeholder="Pick a suggested answer or type one", key=f"label_a_{n}")
    cats = choices["categories"]
    default = cats.index(image["category"]) if image.get("category") in cats else None
    c = st.selectbox("Category", cats, index=default, accept_new_options=True,
                     placeholder="Image category", key=f"label_c_{n}")
    return q or "", a or "", c or ""


def current_image(strategy: str) -> dict | None:
    """The image being labeled: kept across reruns until saved or skipped, and only while
    it belongs to the project picked now (switching projects picks a new one)."""
    image = app_service.project_image(db, user, pid, state.get("label_image"))
    if image is not None:
        return image
    with st.spinner("Choosing the next image ..."):
        image = app_service.next_image(db, pid, strategy=strategy,
                                       exclude=tuple(state.get("label_skipped", ())))
    state["label_image"] = image and image["id"]
    return image


def next_image() -> None:
    state["label_image"] = None
    state["label_n"] += 1


counts = app_service.project_counts(db, user, pid)
progress_ui(counts)
strategy = strategy_ui()
image = current_image(strategy)
if image is None:
    st.success("Every train image has seed labels. Start a generator job on the Training page.")
else:
    left, right = st.columns([3, 2])
    with left:
        show_image(app_service.image_path(db, image),
                   caption=f"image {image['id']} · {image.get('source_name') or ''}", key="label")
    with right:
        q, a, c = qa_ui(app_service.label_choices(db, project), image, state["label_n"])
        save = st.button("Save & next image", type="primary", shortcut="Ctrl+Enter",
                         width="stretch")
        more = st.button("Save & ask another question", width="stretch")
        if st.button("Skip this image", width="stretch"):
            state.setdefault("label_skipped", []).append(image["id"])
            next_image()
            st.rerun()
        if save or more:
            with user_errors():
                app_service.label_seed(db, user, project_id=pid, image_id=image["id"],
                                       question=q, answer=a, category=c)
                flash(f"Saved: {q} → {a}")
                if save:
                    next_image()
                else:
                    state["label_n"] += 1
                st.rerun()

st.divider()
st.subheader("Seed labels")
pairs = app_service.seed_pairs(db, user, pid)
if not pairs:
    st.caption("No seed labels yet.")
else:
    table = pd.DataFrame(pairs)[["id", "image_id", "question", "answer", "category",
                                 "created_by", "updated_at", "version"]]
    st.dataframe(table, hide_index=True, width="stretch", height=240)
    by_id = {p["id"]: p for p in pairs}
    pick = st.selectbox("Edit or delete a label", list(by_id), index=None, key="label_pick",
                        format_func=lambda i: f"#{i}: {by_id[i]['question']} → {by_id[i]['answer']}")
    if pick is not None:
        # the version shown when the form was filled in: a change meanwhile is a conflict
        seen = state.setdefault("label_seen", {})
        pair = dict(by_id[pick], version=seen.get(pick, by_id[pick]["version"]))
        with st.form(f"edit_{pick}"):
            new_q = st.text_input("Question", pair["question"])
            new_a = st.text_input("Answer", pair["answer"])
            new_c = st.text_input("Category", pair["category"] or "")
            col1, col2 = st.columns(2)
            save_edit = col1.form_submit_button("Save changes", type="primary")
            delete = col2.form_submit_button("Delete label")
        with user_errors():
            if save_edit:
                app_service.edit_seed(db, user, pick, expected_version=pair["version"],
                                      question=new_q, answer=new_a, category=new_c or None)
                seen.pop(pick, None)
                flash(f"Label #{pick} updated.")
                st.rerun()
            if delete:
                app_service.delete_seed(db, user, pick, expected_version=pair["version"])
                seen.pop(pick, None)
                flash(f"Label #{pick} deleted.")
                st.rerun()
        seen[pick] = by_id[pick]["version"]
