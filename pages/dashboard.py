"""Dashboard (PIs): accuracy of runs per category and question type, vs. seed-only baselines."""
import pandas as pd
import plotly.express as px
import streamlit as st

from leaml.app import service as app_service
from leaml.store import projects as projects_store
from pages._common import get_db, no_project_stop, project_ui, require_page
from pages._loop import loop_ui

user = require_page("view")
db = get_db()
project = project_ui(db) or no_project_stop()
pid = project["id"]
st.title("Dashboard")


def progress_ui(counts: dict) -> None:
    """Labeling and review progress of the project."""
    target = app_service.seed_target(project, counts)
    reviewed = counts["accepted"] + counts["edited"] + counts["rejected"]
    pseudo = reviewed + counts["pending"]
    c1, c2 = st.columns(2)
    c1.progress(min(1.0, counts["seed_images"] / target),
                text=f"Seed labeling: {counts['seed_images']} / {target} images "
                     f"({counts['seed']} QA pairs)")
    c2.progress(reviewed / pseudo if pseudo else 0.0,
                text=f"Review: {reviewed} / {pseudo} pseudo pairs decided "
                     f"({counts['accepted']} accepted, {counts['edited']} edited, "
                     f"{counts['rejected']} rejected)")


def runs_ui(df: pd.DataFrame) -> list[int]:
    """Pick the runs to compare: by default the newest run of each method."""
    runs = df.drop_duplicates("run_id").sort_values("run_id", ascending=False)
    labels = {r.run_id: f"#{r.run_id} {r.method}" + (f" ({r.label_fraction:g})"
              if pd.notna(r.label_fraction) else "") for r in runs.itertuples()}
    default = runs.drop_duplicates("method")["run_id"].tolist()
    return st.multiselect("Runs to compare", list(labels), default=default,
                          format_func=labels.get, key="dash_runs")


def grouped_bars(df: pd.DataFrame, scope: str, title: str) -> None:
    part = df[df["scope"] == scope]
    if part.empty:
        st.caption(f"No {title.lower()} metrics.")
        return
    fig = px.bar(part, x="key", y="accuracy", color="run", barmode="group",
                 labels={"key": title, "accuracy": "accuracy (%)"}, range_y=[0, 100])
    fig.update_layout(height=340, margin=dict(l=0, r=0, t=30, b=0), title=title,
                      legend_title_text="")
    st.plotly_chart(fig, width="stretch")


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """Runs x categories with the average over categories, like the paper's table."""
    part = df[df["scope"] == "category"]
    table = part.pivot_table(index="run", columns="key", values="accuracy")
    table["Average"] = table.mean(axis=1)
    overall = df[df["scope"] == "overall"].set_index("run")["accuracy"]
    table["Overall"] = overall
    return table.round(1)


loop_ui(user, project)
counts = projects_store.project_counts(db, pid)
progress_ui(counts)
rows = pd.DataFrame(app_service.results(db, user, pid))
if rows.empty:
    st.info("No evaluated runs yet. An expert starts one on the **Training** page "
            "(a whole LEAML run, and the seed-only baselines to compare with).")
    st.stop()

chosen = runs_ui(rows)
sel = rows[rows["run_id"].isin(chosen)].copy()
sel["run"] = "#" + sel["run_id"].astype(str) + " " + sel["method"]
if sel.empty:
    st.caption("Pick at least one run.")
else:
    st.subheader("Accuracy, like the paper's table")
    st.dataframe(paper_table(sel), width="stretch")
    left, right = st.columns(2)
    with left:
        grouped_bars(sel, "category", "Category")
    with right:
        grouped_bars(sel, "question_type", "Question type")

st.subheader("Accuracy across runs over time")
overall = rows[rows["scope"] == "overall"].sort_values("finished_at")
fig = px.line(overall, x="finished_at", y="accuracy", color="method", markers=True,
              hover_data=["run_id", "base_model"], labels={"finished_at": "finished",
                                                           "accuracy": "accuracy (%)"})
fig.update_layout(height=300, margin=dict(l=0, r=0, t=10, b=0))
st.plotly_chart(fig, width="stretch")

st.download_button("Download results (CSV)", rows.to_csv(index=False).encode(),
                   file_name=f"{project['name']}-results.csv", mime="text/csv",
                   icon=":material/download:")
