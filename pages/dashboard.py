"""Dashboard (PIs): accuracy of runs per category and question type, vs. seed-only baselines."""
import pandas as pd
import plotly.express as px
import streamlit as st

from leaml.app import service as app_service
from pages._common import get_db, no_project_stop, project_ui, require_page
from pages._loop import loop_ui

user = require_page("view")
db = get_db()
project = project_ui(db, user) or no_project_stop()
pid = project["id"]
st.title("Dashboard")


def progress_ui() -> None:
    """Labeling and review progress of the project."""
    p = app_service.dashboard_progress(db, user, project)
    c1, c2 = st.columns(2)
    c1.progress(p["seed_share"],
                text=f"Seed labeling: {p['seed_images']} / {p['seed_target']} images "
                     f"({p['seed']} QA pairs)")
    c2.progress(p["review_share"],
                text=f"Review: {p['reviewed']} / {p['pseudo']} pseudo pairs decided "
                     f"({p['accepted']} accepted, {p['edited']} edited, "
                     f"{p['rejected']} rejected)")


def runs_ui(results: list[dict]) -> list[int]:
    """Pick the runs to compare: by default the newest run of each method."""
    labels, default = app_service.run_choices(results)
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


def paper_table(results: list[dict], chosen: list[int]) -> pd.DataFrame:
    """Runs x categories with the average over categories, like the paper's table."""
    return pd.DataFrame(app_service.results_table(results, chosen)).set_index("run")


def review_worth_ui() -> None:
    """What review decisions are worth: the stored simulate-review curve of this project and
    the accuracy of its real LEAML finetunes against the reviewed pairs they trained on."""
    sim = app_service.simulation(db, user, pid)
    real = pd.DataFrame(app_service.decision_runs(db, user, pid))
    if sim is None and real.empty:
        return
    st.subheader("What review decisions are worth")
    if sim is not None:
        st.caption(
            f"Simulated reviewer who knows the hidden answers ({sim['created_at']}; label "
            f"fraction {sim['label_fraction']}, seed {sim['seed']}; {sim['n_pending']} pending "
            f"pairs, {sim['pseudo_precision']}% right): the target's accuracy after the first N "
            f"decisions in each review order, finetuned as the Training page's finetune does. "
            f"Best order: **{sim['best']}**. Right: the same against reviewer minutes "
            f"(accept/reject {sim['costs']['accept']:g} s, edit {sim['costs']['edit']:g} s), "
            f"beside spending them on seed labels ({sim['costs']['seed_pair']:g} s a pair). "
            "`python -m leaml simulate-review` makes it.")
        left, right = st.columns(2)
        for col, fig in ((left, sim["fig_decisions"]), (right, sim["fig_minutes"])):
            fig.update_layout(height=320)
            col.plotly_chart(fig, width="stretch")
    if not real.empty:
        fig = px.scatter(real, x="decisions", y="accuracy", hover_data=["run_id", "finished_at"],
                         labels={"decisions": "reviewed pairs it trained on",
                                 "accuracy": "accuracy (%)"})
        fig.update_layout(height=280, margin=dict(l=0, r=0, t=10, b=0))
        st.caption("Your LEAML finetunes: accuracy against the accepted and edited pairs they "
                   "trained on.")
        st.plotly_chart(fig, width="stretch")


loop_ui(user, project)
progress_ui()
review_worth_ui()
results = app_service.results(db, user, pid)
rows = pd.DataFrame(results)
if rows.empty:
    st.info("No evaluated runs yet. An expert starts one on the **Training** page "
            "(a whole LEAML run, and the seed-only baselines to compare with).")
    st.stop()

chosen = runs_ui(results)
sel = pd.DataFrame(app_service.chosen_rows(results, chosen))
if sel.empty:
    st.caption("Pick at least one run.")
else:
    st.subheader("Accuracy, like the paper's table")
    st.dataframe(paper_table(results, chosen), width="stretch")
    left, right = st.columns(2)
    with left:
        grouped_bars(sel, "category", "Category")
    with right:
        grouped_bars(sel, "question_type", "Question type")

st.subheader("Accuracy across runs over time")
overall = pd.DataFrame(app_service.overall_over_time(results))
fig = px.line(overall, x="finished_at", y="accuracy", color="method", markers=True,
              hover_data=["run_id", "base_model"], labels={"finished_at": "finished",
                                                           "accuracy": "accuracy (%)"})
fig.update_layout(height=300, margin=dict(l=0, r=0, t=10, b=0))
st.plotly_chart(fig, width="stretch")

st.download_button("Download results (CSV)", rows.to_csv(index=False).encode(),
                   file_name=f"{project['name']}-results.csv", mime="text/csv",
                   icon=":material/download:")
