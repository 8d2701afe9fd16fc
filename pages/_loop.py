"""Where the project stands in the LEAML loop, and what to do next: shown on the Training
page and the Dashboard (layout only; the app service decides what is shown per role)."""
from __future__ import annotations

import streamlit as st

from leaml.app import service as app_service
from pages._common import get_db


def _run_text(run: dict | None) -> str:
    if run is None:
        return "none"
    acc = f" · {run['accuracy']:.1f}%" if run.get("accuracy") is not None else ""
    return f"run #{run['id']}{acc}"


@st.fragment(run_every=3)
def loop_ui(user: dict, project: dict) -> None:
    """Seed pairs, generator, pseudo pairs, last finetune, and the next step(s) for this
    user, as the database holds them now (refreshed every 3 s)."""
    status = app_service.loop_status(get_db(), user, project["id"])
    with st.container(border=True):
        st.markdown("**The loop on this project**")
        c1, c2, c3, c4 = st.columns(4)
        c1.metric("Seed pairs", status["seed_pairs"],
                  help=f"on {status['seed_images']} images (target {status['seed_target']})")
        gen = status["generator"]
        c2.metric("Generator", f"#{gen['id']}" if gen else "none",
                  help="the newest trained QA generator run")
        c3.metric("Pseudo pairs pending / decided", f"{status['pending']} / {status['decided']}")
        c4.metric("Last finetune", _run_text(status["finetune"]),
                  help=f"seed-only baseline: {_run_text(status['baseline'])}")
        for step in status["next"]:
            st.markdown(f"**Next:** {step}")
