"""The LEAML loop as the app shows it: budgets (quick, full), where a project stands in the
loop, what to do next (per role), and starting its stages (no Streamlit, no torch here).

The loop: label seed pairs -> train the generator G -> generate pseudo pairs -> review them
-> finetune the target on seed + reviewed (+ pending above the cut) -> the dashboard, next
to a seed-only baseline trained on the same seed set with the same budget.
"""
from __future__ import annotations

import sqlite_utils

from leaml import auth
from leaml.app import jobs as app_jobs
from leaml.app.accounts import require as _require
from leaml.app.projects import seed_target
from leaml.store import projects as projects_store
from leaml.store import runs as runs_store

# Form values per budget and job kind; a knob left out keeps the method's own default. The
# quick budget takes a first-time user from a click to pairs on the Review page in about
# two minutes on two CPU cores (demo-1pct: 30 seed images, 359 seed pairs).
PRESETS = {
    "quick": {"generator": {"qa_epochs": 12.0, "min_qa_steps": 15, "max_qa_steps": 15,
                            "max_captions": 300},
              "pseudo": {"k": 6, "max_images": 100},
              "finetune": {"max_steps": 40, "vision_warmup_epochs": 5.0}},
    "full": {"generator": {}, "pseudo": {}, "finetune": {}},
}
PRESET_LABELS = {"quick": "Quick: a first look in minutes (small budgets)",
                 "full": "Full: the method's defaults, for real results (an hour or more "
                         "on a laptop CPU)"}
DEFAULT_PRESET = "quick"
BASELINE_METHOD = "seed-full"  # the seed-only baseline LEAML is compared with
LOOP_KINDS = ("generator", "pseudo", "finetune", "run")


def preset_values(preset: str, kind: str) -> dict:
    """The form values of ``preset`` for a job ``kind`` (empty: the method's defaults)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown budget {preset!r}; use one of {', '.join(PRESETS)}")
    return dict(PRESETS[preset].get(kind, {}))


def default_label_fraction(counts: dict) -> float:
    """The share of the labeled train images whose QA trains G by default: all of them (the
    project's own seed set) when the project has unlabeled train images for G to write pairs
    for; 1% where every train image is labeled (a benchmark set like ``demo``), so that the
    other 99% are left as unlabeled images, as ``run --label-fraction 0.01`` does."""
    return 1.0 if counts.get("unlabeled_images", 0) > 0 else 0.01


def start_generator_and_pseudo(db: sqlite_utils.Database, user: dict, project: str,
                               generator: dict, pseudo: dict) -> tuple[int, int]:
    """Queue step 1 (train G) and step 2 (pseudo pairs from the G it trains) at once; the
    worker runs jobs in order, so the pseudo job starts when G is stored. Both need 'train'.
    ``generator``/``pseudo`` are app_service.job_params results. Returns both job ids."""
    first = app_jobs.start_job(db, user, "generator", project, generator)
    return first, app_jobs.start_job(db, user, "pseudo", project, pseudo)


def has_baseline(db: sqlite_utils.Database, project_id: int) -> bool:
    """Whether the project has a succeeded seed-only baseline run to compare with."""
    return any(r["status"] == "succeeded"
               for r in runs_store.list_runs(db, project_id, method=BASELINE_METHOD))


def baseline_params(finetune: dict, label_fraction: float) -> dict:
    """A seed-only baseline run with the finetune job's base model, seed and training knobs
    (the target's overrides become the baseline's one stage), on the same seed set."""
    train = (finetune.get("overrides") or {}).get("finetune") or {}
    params = {"base_model": finetune["base_model"], "seed": finetune["seed"],
              "method": BASELINE_METHOD, "label_fraction": float(label_fraction)}
    if train:
        params["overrides"] = {"train": dict(train)}
    params.update({k: finetune[k] for k in ("device", "processes") if k in finetune})  # same place
    return params


# --- where the loop stands ----------------------------------------------------------------

def _latest(db, project_id: int, method: str | None = None, *, evaluated: bool = False):
    for r in runs_store.list_runs(db, project_id, method=method):
        if r["status"] == "succeeded" and (not evaluated or r["accuracy"] is not None):
            return r
    return None


def loop_status(db: sqlite_utils.Database, user: dict, project_id: int) -> dict:
    """Where the project stands in the loop (needs 'view'): seed pairs and images, the seed
    target, the newest generator run, pending and decided pseudo pairs, the last finetune
    (a LEAML run) and seed-only baseline with their accuracy, the active jobs; and
    ``next``, what this user can do next (only pages their role can open)."""
    user = _require(db, user, "view")
    project = projects_store.get_project(db, project_id)
    counts = projects_store.project_counts(db, project_id)
    active = app_jobs.active_jobs(db, user, project_id)  # a dead worker's job is not active
    status = {"seed_pairs": counts["seed"], "seed_images": counts["seed_images"],
              "seed_target": seed_target(project, counts),
              "unlabeled_images": counts["unlabeled_images"],
              "generator": _latest(db, project_id, "generator"),
              "pending": counts["pending"],
              "decided": counts["accepted"] + counts["edited"] + counts["rejected"],
              "finetune": _latest(db, project_id, "leaml", evaluated=True),
              "baseline": _latest(db, project_id, BASELINE_METHOD, evaluated=True),
              "active_jobs": active}
    status["next"] = next_steps(status, user)
    return status


def next_steps(status: dict, user: dict) -> list[str]:
    """What ``user`` can do next, in Markdown; pages their role cannot open are never named
    (they get who to wait for instead)."""
    can = lambda perm: auth.can(user, perm)  # noqa: E731
    if status["active_jobs"]:  # newest first: say the running one, else the next in line
        running = [j for j in status["active_jobs"] if j["status"] == "running"]
        job = (running or status["active_jobs"][::-1])[0]
        where = "follow it on **Training**" if can("train") else "the results follow"
        return [f"Job #{job['id']} ({job['kind']}) is {job['status']}; {where}."]
    if status["seed_pairs"] == 0:
        return ["Label a few seed pairs on **Seed labeling**." if can("label") else
                "Waiting for an expert to label seed pairs."]
    if status["generator"] is None:
        return ["Train the generator and let it write pseudo pairs (job 1+2, quick budget: "
                "pairs to review in minutes) on **Training**." if can("train") else
                "Waiting for an expert to train the QA generator."]
    out = []
    if status["pending"]:
        out.append(f"Review the {status['pending']} pending pseudo pairs on **Review** "
                   "(A accept, R reject, E edit)." if can("review") else
                   f"{status['pending']} pseudo pairs wait for review by annotators.")
    elif not status["decided"]:
        out.append("Let the generator write pseudo pairs (job 2) on **Training**."
                   if can("train") else "Waiting for an expert to generate pseudo pairs.")
    if status["pending"] or status["decided"]:
        if can("train"):
            out.append("Finetune the target on seed + reviewed pairs (job 3) on **Training**; "
                       "it trains the seed-only baseline beside it for the Dashboard.")
        elif status["finetune"] is None:
            out.append("Then an expert finetunes the target model.")
    if status["finetune"] is not None:
        out.append(f"See run #{status['finetune']['id']} per category on **Dashboard**.")
    return out
