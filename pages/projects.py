"""Projects: create a project, import data (zip, manifest, parquet), see its counts."""
import pandas as pd
import streamlit as st

from leaml.app import service as app_service
from pages._common import (get_db, project_ui, require_page, select_project, show_flash,
                           user_errors)

user = require_page("view")
db = get_db()
st.title("Projects")
show_flash()


def counts_ui(project: dict, counts: dict) -> None:
    """Images and QA counts of the selected project as metric tiles."""
    st.subheader(f"{project['name']}  ·  base model `{project['base_model']}`")
    a, b, c, d = st.columns(4)
    a.metric("Images", counts["images"], help=f"{counts['train_images']} train, "
             f"{counts['test_images']} test")
    b.metric("Unlabeled train images", counts["unlabeled_images"])
    c.metric("Seed QA", counts["seed"],
             help=f"target {app_service.seed_target(project, counts)}")
    d.metric("Test QA", counts["test"])
    e, f, g, h = st.columns(4)
    e.metric("Pending pseudo QA", counts["pending"])
    f.metric("Accepted", counts["accepted"])
    g.metric("Edited", counts["edited"])
    h.metric("Rejected", counts["rejected"])


def create_ui() -> tuple[str, str, int, bool]:
    """The new-project form: name, base model, seed target, submitted?"""
    with st.form("new_project", clear_on_submit=False):
        name = st.text_input("Name", placeholder="kvasir-vqa")
        base = st.text_input("Base model", value=app_service.DEFAULT_BASE,
                             help="`tiny16` or `tiny` (bundled, run on a CPU), a Hugging Face "
                                  "id such as `HuggingFaceTB/SmolVLM-256M-Instruct`, or a "
                                  "local path")
        target = st.number_input("Seed target (0 = 1% of the images)", 0, 100000, 0)
        go = st.form_submit_button("Create project", type="primary")
    return name, base, int(target), go


def upload_ui() -> tuple[object, bool, bool]:
    """The import form: uploaded file, skip-invalid flag, submitted?"""
    with st.form("upload"):
        f = st.file_uploader(
            f"Zip of images + manifest, JSONL/CSV manifest, or Kvasir-VQA parquet "
            f"(at most {app_service.MAX_UPLOAD_MB} MB)", type=list(app_service.UPLOAD_TYPES))
        skip = st.checkbox("Skip invalid rows (import the rest)")
        go = st.form_submit_button("Import", type="primary")
    return f, skip, go


def report_ui(report) -> None:
    """An import report row by row: what was added, and every bad row with its reason."""
    st.write(f"Images: **{report.images_added}** added, {report.images_existing} already there. "
             f"QA pairs: **{report.qa_added}** added, {report.qa_existing} already there. "
             f"Rejected rows: **{report.rejected}**.")
    for note in report.notes:
        st.caption(note)
    if report.errors:
        st.dataframe(pd.DataFrame([{"file": e.file, "row": e.row, "problem": e.message}
                                   for e in report.errors]), hide_index=True, width="stretch")


def export_ui(project: dict) -> None:
    """Download the project's curated QA as one zip (what `leaml export` writes); the zip
    is made when the button is clicked, not on every rerun."""
    st.subheader("Export")
    with_test = st.checkbox("Include the test pairs", key="export_with_test")
    name = project["name"]

    def zip_bytes() -> bytes:  # runs in Streamlit's download thread: its own connection
        with app_service.export_zip(get_db(), user, name, with_test=with_test) as f:
            return f.read()
    st.download_button("Download curated QA (zip)", data=zip_bytes, file_name=f"{name}-qa.zip",
                       mime="application/zip", on_click="ignore", icon=":material/download:",
                       help="seed pairs and the pseudo pairs people accepted or edited, as "
                            "manifest.jsonl + images/ + data.parquet; the zip imports again "
                            "as it is (here, or with `python -m leaml import`)")


project = project_ui(db, user)
# the tiles are filled at the end of the run, so an import made below shows at once
tiles = st.container()
if project is None:
    st.info("No project yet. Create one below, then import images and QA into it.")

if app_service.can(user, "import"):
    left, right = st.columns(2)
    with left:
        st.subheader("New project")
        name, base, target, go = create_ui()
        if go:
            with user_errors():
                made = app_service.create_project(db, user, name, base, target or None)
                select_project(made["name"])
                st.rerun()
    with right:
        if project is not None:
            st.subheader(f"Import into {project['name']}")
            f, skip, go = upload_ui()
            if go and f is None:
                st.warning("Choose a file first.")
            elif go:
                try:
                    with st.spinner("Importing ..."):
                        report = app_service.import_upload(db, user, project["name"], f.name,
                                                           f.getvalue(), skip_invalid=skip)
                    st.success("Import done.")
                    report_ui(report)
                except app_service.ImportRejected as exc:
                    st.error("Nothing was imported: some rows are invalid. Fix them (or tick "
                             "'Skip invalid rows') and upload again.")
                    report_ui(exc.report)
                except (ValueError, PermissionError, LookupError) as exc:
                    st.error(str(exc))

st.subheader("All projects")
rows = app_service.projects_overview(db, user)
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

if project is not None:
    with tiles:
        counts_ui(project, app_service.project_counts(db, user, project["id"]))
        if app_service.can(user, "export"):
            export_ui(project)
