"""Training (experts): start generator / pseudo-QA / finetune jobs or a whole run; watch them."""
import pandas as pd
import plotly.express as px
import streamlit as st

from leaml import app_service, captions, jobs
from pages._common import (flash, get_db, no_project_stop, project_ui, require_page, show_flash,
                           user_errors)

user = require_page("train")
db = get_db()
project = project_ui(db) or no_project_stop()
pid = project["id"]
jobs.recover_stale(db)  # a job whose worker died shows as interrupted (resumable), not running
st.title("Training")
show_flash()


def hyperparameters_ui(kind: str) -> dict:
    """The main hyperparameters of ``kind``; only the filled-in ones are returned (an empty
    field keeps the method's own default)."""
    out = {}
    with st.expander("Hyperparameters (empty = the method's default)", expanded=False):
        cols = st.columns(3)
        for i, (name, typ, help_text) in enumerate(app_service.job_hyperparameters(kind)):
            col, key = cols[i % 3], f"hp_{kind}_{name}"
            if typ is str:
                value = col.text_input(name, help=help_text, key=key, placeholder="default")
            else:
                value = col.number_input(name, value=None, help=help_text, key=key,
                                         placeholder="default", min_value=0 if typ is int else None,
                                         step=1 if typ is int else None,
                                         format="%d" if typ is int else "%g")
            if value not in (None, ""):
                out[name] = typ(value)
    return out


def data_mix_ui(kind: str) -> dict:
    """Which QA pairs train the target: seed, accepted/edited pseudo, pending above a
    confidence threshold (rejected pairs never train anything)."""
    c1, c2, c3 = st.columns(3)
    seed = c1.checkbox("Seed QA", True, key=f"mix_seed_{kind}")
    reviewed = c2.checkbox("Accepted + edited pseudo QA", True, key=f"mix_rev_{kind}")
    pending = c3.checkbox("Pending pseudo QA above a threshold", False, key=f"mix_pend_{kind}")
    thr = st.slider("Pending confidence threshold", 0.0, 1.0, 0.9, 0.01, key=f"mix_thr_{kind}",
                    disabled=not pending)
    return {"seed": seed, "reviewed": reviewed, "pending_min_conf": thr if pending else None}


def start_ui() -> tuple[str, dict] | None:
    """The start-a-job form; (kind, params) when submitted."""
    labels = {"run": "Whole run (a method end to end)", "generator": "1 · Train the QA generator",
              "pseudo": "2 · Generate pseudo QA", "finetune": "3 · Finetune the target model"}
    kind = st.radio("Job", list(labels), format_func=labels.get, horizontal=True, key="job_kind")
    c1, c2, c3 = st.columns(3)
    form = {"base_model": c1.text_input("Base model", project["base_model"], key=f"base_{kind}"),
            "seed": int(c2.number_input("Seed", 0, 10**6, 0, key=f"seed_{kind}"))}
    if kind == "run":
        form["method"] = c3.selectbox("Method", app_service.METHODS, key="run_method")
        form["label_fraction"] = st.number_input(
            "Label fraction (share of the labeled train images whose seed QA is used)",
            0.001, 1.0, 0.01, format="%g", key="run_frac")
    if form.get("method") == "caption-qa":
        t1, t2 = st.columns(2)
        form["teacher"] = {
            "endpoint": t1.text_input("Teacher endpoint (OpenAI-compatible)", key="qa_endpoint",
                                      placeholder="http://127.0.0.1:8000/v1"),
            "model": t2.text_input("Teacher model name", key="qa_model")}
    if kind == "finetune" or form.get("method") == "leaml":
        st.markdown("**Training data**")
        form["data_mix"] = data_mix_ui(kind)
    form["hyperparameters"] = hyperparameters_ui(form.get("method") or kind)
    if st.button("Start job", type="primary", icon=":material/play_arrow:"):
        with user_errors():
            return kind, app_service.job_params(kind, **form)
    return None


@st.fragment(run_every=2)
def live_ui() -> None:
    """The newest active job of the project (else the last one), refreshed every 2 s without
    reloading the page."""
    fdb = get_db()
    recent = jobs.list_jobs(fdb, pid, limit=20)
    active = [j for j in recent if j["status"] in ("queued", "running")]
    if not recent:
        st.caption("No job yet. Start one above; it runs in the background, whatever "
                   "happens to this page.")
        return
    job = (active or recent)[0]
    if not active:
        st.caption("No job running; the last one:")
    p = jobs.job_progress(fdb, job["id"])
    eta = f" · about {p['eta']:.0f} s left" if p.get("eta") else ""
    st.markdown(f"**Job #{job['id']} · {job['kind']}** · {p['status']} · stage "
                f"`{p['stage'] or 'waiting for the worker'}`{eta}")
    st.progress(float(p["progress"] or 0), text=p.get("message") or f"{p['progress']:.0%}")
    log = pd.DataFrame(jobs.train_log(fdb, job["id"]))
    if not log.empty and log["loss"].notna().any():
        log["point"] = range(len(log))
        fig = px.line(log, x="point", y="loss", color="stage", markers=len(log) < 60)
        fig.update_layout(height=260, margin=dict(l=0, r=0, t=10, b=0), xaxis_title="step")
        st.plotly_chart(fig, width="stretch")
    with st.expander("Log", expanded=False):
        st.code(jobs.log_tail(fdb.home, job, 30) or "(no output yet)", language=None)
    if active and st.button("Cancel job", key=f"cancel_{job['id']}", icon=":material/stop:"):
        with user_errors():
            app_service.cancel_job(fdb, user, job["id"])
            st.rerun()


picked = start_ui()
if picked:
    with user_errors():
        job_id = app_service.start_job(db, user, picked[0], project["name"], picked[1])
        flash(f"Job #{job_id} queued; the worker picks it up in a moment.")
        st.rerun()


def captions_ui() -> dict | None:
    """Teacher captions for the images without one (a background job); the form when clicked."""
    missing = captions.missing_count(db, pid)
    with st.expander(f"Teacher captions · {missing} image(s) without a caption"):
        c1, c2 = st.columns(2)
        endpoint = c1.text_input("OpenAI-compatible endpoint (blank: a local teacher model)",
                                 key="cap_endpoint", placeholder="http://127.0.0.1:8000/v1")
        model = c2.text_input("Model (the endpoint's model name, or a local model ref)",
                              key="cap_model")
        if st.button("Caption images without captions", disabled=missing == 0,
                     icon=":material/subtitles:"):
            return {"endpoint": endpoint, "model": model}
    return None


caption_form = captions_ui()
if caption_form:
    with user_errors():
        job_id = app_service.start_job(db, user, "caption", project["name"],
                                       captions.caption_job_params(**caption_form))
        flash(f"Caption job #{job_id} queued; the worker picks it up in a moment.")
        st.rerun()

st.subheader("Current job")
live_ui()

st.subheader("Past jobs")
past = jobs.list_jobs(db, pid, limit=50)
if not past:
    st.caption("No jobs yet.")
else:
    table = pd.DataFrame([{"job": j["id"], "kind": j["kind"], "status": j["status"],
                           "stage": j["stage"], "progress": j["progress"],
                           "message": j["message"], "by": j["created_by"],
                           "created": (j["created_at"] or "")[:19],
                           "params": str(j["params"])} for j in past])
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"progress": st.column_config.ProgressColumn(
                     "progress", min_value=0.0, max_value=1.0)})
    resumable = [j["id"] for j in past if j["status"] in ("cancelled", "interrupted", "failed")]
    if resumable:
        c1, c2 = st.columns([3, 1])
        which = c1.selectbox("Resume a stopped job from its last checkpoint", resumable,
                             key="resume_pick")
        if c2.button("Resume", icon=":material/replay:"):
            with user_errors():
                app_service.resume_job(db, user, which)
                flash(f"Job #{which} queued again.")
                st.rerun()
