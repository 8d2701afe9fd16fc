"""Training (experts): start generator / pseudo-QA / finetune jobs or a whole run; watch them."""
import pandas as pd
import plotly.express as px
import streamlit as st

from leaml.app import service as app_service
from pages._common import (flash, get_db, no_project_stop, project_ui, require_page, show_flash,
                           user_errors)
from pages._loop import loop_ui

user = require_page("train")
db = get_db()
project = project_ui(db, user) or no_project_stop()
pid = project["id"]
st.title("Training")
show_flash()
loop_ui(user, project)
loop = app_service.loop_status(db, user, pid)
status_counts = {"unlabeled_images": loop["unlabeled_images"]}


KIND_LABELS = {"loop": "1+2 · Generator, then pseudo pairs", "generator": "1 · Train the QA generator",
               "pseudo": "2 · Generate pseudo QA", "finetune": "3 · Finetune the target model",
               "run": "Whole run (a method end to end)"}


def budget_ui() -> str:
    """Quick (the default: a first look in minutes) or full (the method's defaults)."""
    return st.radio("Budget", list(app_service.PRESETS), format_func=app_service.PRESET_LABELS.get,
                    key="budget", horizontal=True,
                    help="Fills in the knobs below; any of them can still be changed.")


def hyperparameters_ui(kind: str, preset: str, title: str = "Settings") -> dict:
    """The main knobs of ``kind``, filled in from the budget; only the filled-in ones are
    returned (an empty field keeps the method's own default)."""
    out = {}
    values = app_service.preset_values(preset, kind) if kind in app_service.LOOP_KINDS else {}
    with st.expander(f"{title} (empty = the method's default)", expanded=False):
        cols = st.columns(3)
        for i, (name, typ, help_text) in enumerate(app_service.job_hyperparameters(kind)):
            col, key = cols[i % 3], f"hp_{preset}_{kind}_{name}"
            if typ is str:
                value = col.text_input(name, values.get(name, ""), help=help_text, key=key,
                                       placeholder="default")
            else:
                value = col.number_input(name, value=values.get(name), help=help_text, key=key,
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


def label_fraction_ui(key: str, default: float) -> float:
    return st.number_input(
        "Label fraction (share of the labeled train images whose seed QA is used; 1 = the "
        "project's seed set)", 0.001, 1.0, default, format="%g", key=key)


ENGINE_LABELS = {"hf": "transformers (default)", "vllm": "vLLM (fast sampling)"}


def where_ui(kind: str, method: str | None) -> dict:
    """Where the job runs: device, processes (data-parallel through accelerate) and, for the
    kinds that sample pseudo pairs, the sampling engine."""
    where = app_service.places()
    samples = app_service.samples_pairs(kind, method)
    with st.expander("Where it runs", expanded=False):
        gpus = where["gpus"]
        st.caption(f"{gpus} GPU{'s' if gpus != 1 else ''} seen on this machine. Auto: the "
                   "worker's GPU if it has one, else the CPU; bf16 where the GPU supports it.")
        c1, c2, c3 = st.columns(3)
        device = c1.selectbox("Device", where["devices"], key=f"device_{kind}")
        processes = c2.number_input(
            "Processes", 1, where["max_processes"], 1, key=f"procs_{kind}",
            help="Above 1: data-parallel training, evaluation and sampling through accelerate's "
                 "launcher, one GPU per process (or CPU processes with device cpu).")
        engine = "hf"
        if samples:
            engine = c3.selectbox(
                "Pseudo sampling", list(ENGINE_LABELS), format_func=ENGINE_LABELS.get,
                key=f"engine_{kind}", disabled=not where["vllm"],
                help=("vLLM samples the pseudo pairs faster on a GPU; one process only."
                      if where["vllm"] else "vLLM is not installed here (optional; see "
                      "docs/GPU.md): the default engine samples."))
    return {"device": device, "processes": int(processes), "engine": engine}


def start_ui(preset: str) -> list[tuple[str, dict]] | None:
    """The start-a-job form; the (kind, params) of the jobs to queue when submitted."""
    kind = st.radio("Job", list(KIND_LABELS), format_func=KIND_LABELS.get, horizontal=True,
                    key="job_kind")
    c1, c2, c3 = st.columns(3)
    form = {"base_model": c1.text_input("Base model", project["base_model"], key=f"base_{kind}"),
            "seed": int(c2.number_input("Seed", 0, 10**6, 0, key=f"seed_{kind}"))}
    default_fraction = app_service.default_label_fraction(status_counts)
    if kind == "run":
        form["method"] = c3.selectbox("Method", app_service.METHODS, key="run_method")
        form["label_fraction"] = label_fraction_ui("run_frac", default_fraction)
    if kind in ("loop", "generator"):
        form["label_fraction"] = label_fraction_ui(f"frac_{kind}", default_fraction)
    if form.get("method") == "caption-qa":
        t1, t2 = st.columns(2)
        form["teacher"] = {
            "endpoint": t1.text_input("Teacher endpoint (OpenAI-compatible)", key="qa_endpoint",
                                      placeholder="http://127.0.0.1:8000/v1"),
            "model": t2.text_input("Teacher model name", key="qa_model")}
    if kind == "finetune" or form.get("method") == "leaml":
        st.markdown("**Training data**")
        form["data_mix"] = data_mix_ui(kind)
    if kind == "loop":
        gen = hyperparameters_ui("generator", preset, "Generator settings")
        pseudo = hyperparameters_ui("pseudo", preset, "Pseudo-pair settings")
    else:
        form["hyperparameters"] = hyperparameters_ui(form.get("method") or kind, preset)
    baseline = kind == "finetune" and st.checkbox(
        f"Also train the seed-only baseline ({app_service.BASELINE_METHOD}, same seed set and "
        "settings) to compare with on the Dashboard",
        not app_service.has_baseline(db, pid), key="with_baseline")
    where = where_ui(kind, form.get("method"))
    if not st.button("Start job", type="primary", icon=":material/play_arrow:"):
        return None
    with user_errors():
        if kind == "loop":
            frac = form.pop("label_fraction")
            place = {k: where[k] for k in ("device", "processes")}
            return [("generator", app_service.job_params("generator", **form, hyperparameters=gen,
                                                         label_fraction=frac, **place)),
                    ("pseudo", app_service.job_params("pseudo", **form, hyperparameters=pseudo,
                                                      **where))]
        picked = [(kind, app_service.job_params(kind, **form, **where))]
        if baseline:
            gen_run = loop["generator"]
            frac = (gen_run["params"].get("label_fraction") if gen_run else None) or default_fraction
            picked.append(("run", app_service.baseline_params(picked[0][1], frac)))
        return picked
    return None


@st.fragment(run_every=2)
def live_ui() -> None:
    """The running job of the project (else the next queued one, else the last one) and the
    jobs queued after it, refreshed every 2 s without reloading the page."""
    fdb = get_db()
    recent = app_service.project_jobs(fdb, user, pid, limit=20)
    active = [j for j in recent if j["status"] in ("queued", "running")]
    if not recent:
        st.caption("No job yet. Start one above; it runs in the background, whatever "
                   "happens to this page.")
        return
    running = [j for j in active if j["status"] == "running"]
    job = (running or active[::-1] or recent)[0]  # the running job, else the next in line
    if not active:
        st.caption("No job running; the last one:")
    later = [f"#{j['id']} {j['kind']}" for j in active[::-1] if j["id"] != job["id"]]
    if later:
        st.caption(f"Then, in this order: {', '.join(later)}.")
    p = app_service.job_progress(fdb, user, job["id"])
    eta = f" · about {p['eta']:.0f} s left" if p.get("eta") else ""
    st.markdown(f"**Job #{job['id']} · {job['kind']}** · {p['status']} · stage "
                f"`{p['phase']}`{eta}")  # what it does, or what it waits for
    st.progress(float(p["progress"] or 0), text=p.get("message") or f"{p['progress']:.0%}")
    log = pd.DataFrame(app_service.job_train_log(fdb, user, job["id"]))
    if not log.empty and log["loss"].notna().any():
        log["point"] = range(len(log))
        fig = px.line(log, x="point", y="loss", color="stage", markers=len(log) < 60)
        fig.update_layout(height=260, margin=dict(l=0, r=0, t=10, b=0), xaxis_title="step")
        st.plotly_chart(fig, width="stretch")
    with st.expander("Log", expanded=False):
        st.code(app_service.job_log_tail(fdb, user, job, 30) or "(no output yet)", language=None)
    if active and st.button("Cancel job", key=f"cancel_{job['id']}", icon=":material/stop:"):
        with user_errors():
            app_service.cancel_job(fdb, user, job["id"])
            st.rerun()


st.subheader("Start")
picked = start_ui(budget_ui())
if picked:
    with user_errors():
        ids = [app_service.start_job(db, user, kind, project["name"], params)
               for kind, params in picked]
        flash(f"Job{'s' if len(ids) > 1 else ''} {', '.join(f'#{i}' for i in ids)} queued "
              "(run one after another); Current job below says what each waits for.")
        st.rerun()


def captions_ui() -> dict | None:
    """Teacher captions for the images without one (a background job); the form when clicked."""
    missing = app_service.captions_missing(db, user, pid)
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
                                       app_service.caption_job_params(**caption_form))
        flash(f"Caption job #{job_id} queued; Current job below says what it waits for.")
        st.rerun()

st.subheader("Current job")
live_ui()

@st.fragment(run_every=2)
def past_jobs_ui() -> None:
    """Every job of the project as the database holds it now (refreshed every 2 s, so a job
    that started, failed or was cancelled shows so without a reload)."""
    fdb = get_db()
    past = app_service.project_jobs(fdb, user, pid, limit=50)
    if not past:
        st.caption("No jobs yet.")
        return
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
                app_service.resume_job(fdb, user, which)
                flash(f"Job #{which} queued again.")
                st.rerun()


st.subheader("Past jobs")
past_jobs_ui()
